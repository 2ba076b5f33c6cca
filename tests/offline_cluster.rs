//! The offline tools on cluster mode's data, with the real `herald` binary: a node's partition
//! store (`--partition N`) written by an engine writing ahead to its JetStream stream (real
//! nats-servers) verifies, replays and exports as a single node's does, and its stream exports
//! (`--from-nats`) the same NDJSON, a break in the stream's chain named; a single node's log
//! splits into partitions (`export --partitions`) that each import and verify, and load into
//! their streams (`import --to-nats`, the control partition too), on which a cluster node
//! starts and serves every organisation and key.

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::time::Duration;

use herald::engine::clock::SystemClock;
use herald::engine::sender::{AttemptRequest, SendFuture, SendOutcome, Sender};
use herald::log::{Record, SledStore, Store, WriteAhead};
use herald::projector::{
    stored_projection, ApiKeyId, DeliveryId, DeliveryStatus, EndpointId, EventId, OrgId, RecoveryFilter,
    RecoveryId, Scope,
};
use herald::{Actor, Command as Cmd, DeliveryConfig, Engine, EngineConfig, Parts, Reply};
use herald_cluster::offline::connect;
use herald_cluster::partition::partition_of;
use herald_cluster::testing::{messages, NatsCluster};
use herald_cluster::{catch_up, PartitionStream, StreamSettings, StreamWriteAhead};
use uuid::Uuid;

/// Every attempt answered 200.
struct Ok200;

impl Sender for Ok200 {
    fn send(&self, _: AttemptRequest) -> SendFuture<'_> {
        Box::pin(async { SendOutcome::Response { status: 200, excerpt: Vec::new(), retry_after_ms: None } })
    }
}

fn config(dir: &Path) -> EngineConfig {
    EngineConfig {
        data_dir: dir.to_owned(),
        delivery: DeliveryConfig { shutdown_timeout: Duration::from_secs(1), ..DeliveryConfig::default() },
        ..EngineConfig::default()
    }
}

fn org(n: u128) -> OrgId {
    OrgId(Uuid::from_u128(0x0190f1f4_0000_7000_8000_000000000000 + n))
}

/// Each organisation's endpoint, two events delivered to it, one delivery redelivered, a
/// changed endpoint, a recovery, and API keys (an admin key, one organisation's key, one
/// revoked). Returns each organisation's deliveries.
fn workload(engine: &Engine, orgs: &[OrgId]) -> Vec<(OrgId, Vec<DeliveryId>)> {
    let run = |command| engine.execute_blocking(Actor::admin(), command).unwrap();
    let mut out = Vec::new();
    for (i, &org_id) in orgs.iter().enumerate() {
        let i = i as u128;
        let endpoint = EndpointId(Uuid::from_u128(0xE0_0000 + i));
        run(Cmd::CreateEndpoint {
            id: endpoint,
            org_id,
            url: format!("https://receiver-{i}.example.com/hooks"),
            name: format!("e{i}"),
            enabled_events: vec!["*".into()],
            secret: None,
            settings: Default::default(),
        });
        let mut deliveries = Vec::new();
        for n in 0..2 {
            let published = run(Cmd::Publish {
                id: EventId(Uuid::from_u128(0xF0_0000 + i * 16 + n)),
                org_id,
                event_type: "call.ended".into(),
                payload: format!(r#"{{"org":{i},"n":{n}}}"#).into_bytes(),
                call_id: None,
                webhook_url: None,
                idempotency_key: Some(format!("k{n}")),
                ordering_key: None,
            });
            match published {
                Reply::Published { delivery_ids, .. } => deliveries.extend(delivery_ids),
                other => panic!("{other:?}"),
            }
        }
        out.push((org_id, deliveries));
    }
    assert!(engine.settle(Duration::from_secs(20)));
    for (i, (org_id, deliveries)) in out.iter().enumerate() {
        assert_eq!(engine.delivery(deliveries[0]).unwrap().unwrap().status, DeliveryStatus::Delivered);
        run(Cmd::Redeliver { delivery_id: deliveries[0] });
        if i == 1 {
            let filter = RecoveryFilter {
                statuses: vec![DeliveryStatus::Delivered],
                endpoint_id: None,
                event_type: None,
                created_after_ms: None,
                created_before_ms: None,
                max: 10,
            };
            run(Cmd::Recover { id: RecoveryId(Uuid::from_u128(0xAB)), org_id: *org_id, filter });
        }
    }
    run(Cmd::UpdateEndpoint {
        id: EndpointId(Uuid::from_u128(0xE0_0000)),
        url: None,
        name: Some("renamed".into()),
        enabled_events: None,
        settings: Default::default(),
    });
    let key = |n: u128, org_id| Cmd::CreateApiKey {
        id: ApiKeyId(Uuid::from_u128(0xA0 + n)),
        org_id,
        scopes: vec![Scope::DeliveriesRead],
        name: format!("key{n}"),
        key_hash: [n as u8; 32],
    };
    run(key(1, None));
    run(key(2, Some(orgs[0])));
    run(Cmd::RevokeApiKey { id: ApiKeyId(Uuid::from_u128(0xA2)) });
    assert!(engine.settle(Duration::from_secs(20)));
    out
}

fn herald(args: &[&str], stdin: Option<&[u8]>) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_herald"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("cannot run herald");
    if let Some(input) = stdin {
        use std::io::Write;
        child.stdin.take().unwrap().write_all(input).unwrap();
    }
    drop(child.stdin.take());
    child.wait_with_output().unwrap()
}

/// Runs herald and asserts it succeeded; its stdout.
fn ok(args: &[&str], stdin: Option<&[u8]>) -> String {
    let out = herald(args, stdin);
    assert!(out.status.success(), "herald {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

/// Runs herald and asserts it failed with exit code `code`; its stderr.
fn fails(args: &[&str], code: i32) -> String {
    let out = herald(args, None);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(code), "herald {args:?}: {stderr}");
    stderr
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

/// Three nats-servers, and their client urls as `--from-nats` takes them.
fn three_servers(rt: &tokio::runtime::Runtime) -> (NatsCluster, String) {
    let nats = rt.block_on(async {
        tokio::time::timeout(Duration::from_secs(40), NatsCluster::start(3)).await.expect("NATS ready")
    });
    let urls: Vec<String> = (0..3).map(|i| nats.url(i)).collect();
    (nats, urls.join(","))
}

/// Partition `n`'s stream (created if missing) on the servers `urls`.
fn open_stream(rt: &tokio::runtime::Runtime, urls: &str, n: u32) -> PartitionStream {
    rt.block_on(async { PartitionStream::open(connect(urls).await?, n, StreamSettings::default()).await })
        .unwrap()
}

/// An engine on a node's replica of partition `n` (a sled store in `<node>/cluster/p<n>`),
/// writing ahead to the partition's stream from its start.
fn partition_engine(rt: &tokio::runtime::Runtime, stream: &PartitionStream, dir: &Path) -> Engine {
    let store = Arc::new(SledStore::open(dir, 8 << 20).unwrap());
    let write_ahead = Arc::new(StreamWriteAhead::new(stream.clone(), rt.handle().clone(), 0));
    let parts = Parts { store, clock: Arc::new(SystemClock), sender: Arc::new(Ok200) };
    Engine::open_with_write_ahead(config(dir), parts, write_ahead).unwrap()
}

#[test]
fn a_partition_of_a_node_verifies_replays_and_exports_as_a_single_node_and_from_its_stream() {
    let rt = runtime();
    let (_nats, urls) = three_servers(&rt);
    let node = tempfile::tempdir().unwrap();
    let data = node.path().to_str().unwrap();
    let stream = open_stream(&rt, &urls, 3);
    let engine = partition_engine(&rt, &stream, &node.path().join("cluster/p3"));
    let orgs = workload(&engine, &[org(1), org(2), org(3)]);
    engine.shutdown();
    drop(engine);

    // The partition's store is a single node's store: the same answers by --partition.
    let p3 = node.path().join("cluster/p3");
    let p3 = p3.to_str().unwrap();
    let verified = ok(&["verify", "--data-dir", data, "--partition", "3"], None);
    assert!(verified.starts_with("ok: "), "{verified}");
    assert_eq!(verified, ok(&["verify", "--data-dir", p3], None));
    let exported = ok(&["export", "--data-dir", data, "--partition", "3"], None);
    assert_eq!(exported, ok(&["export", "--data-dir", p3], None));
    let delivery = orgs[1].1[0].to_string();
    let story = ok(&["replay", "--data-dir", data, "--partition", "3", "--delivery", &delivery], None);
    assert!(story.contains("pending -> delivered"), "{story}");
    assert_eq!(story, ok(&["replay", "--data-dir", p3, "--delivery", &delivery], None));

    // The stream holds the same log: --from-nats writes the same NDJSON, record for record.
    let from_nats = ok(&["export", "--from-nats", &urls, "--partition", "3"], None);
    assert_eq!(from_nats, exported);
    assert!(from_nats.lines().count() > 20, "{from_nats}");
    let redacted = ok(&["export", "--from-nats", &urls, "--partition", "3", "--redact-secrets"], None);
    assert!(redacted.starts_with("{\"redacted\""), "{redacted}");
    assert!(!redacted.contains("\"body\""));

    // Without --partition a node's data directory is refused, naming the option; a partition
    // it has no store of names the path; a stream NATS does not have is named.
    let err = fails(&["export", "--data-dir", data], 2);
    assert!(
        err.contains("cluster node") && err.contains("--partition") && err.contains("(here: 3)"),
        "{err}"
    );
    let err = fails(&["verify", "--data-dir", data, "--partition", "4"], 2);
    assert!(err.contains(&node.path().join("cluster/p4").display().to_string()), "{err}");
    let err = fails(&["replay", "--data-dir", data, "--partition", "control", "--delivery", &delivery], 2);
    assert!(err.contains("cluster/control"), "{err}");
    let err = fails(&["export", "--from-nats", &urls, "--partition", "5"], 1);
    assert!(err.contains("no stream HERALD_P5"), "{err}");
    let err = fails(&["export", "--from-nats", &urls], 2);
    assert!(err.contains("--partition"), "{err}");

    // A stream whose messages do not chain (message 2 of partition 3 left out) is refused,
    // naming the stream message and the record where the chain breaks.
    let batches = rt.block_on(messages(&stream));
    let broken = open_stream(&rt, &urls, 6);
    let write_ahead = StreamWriteAhead::new(broken, rt.handle().clone(), 0);
    write_ahead.append(&batches[0]).unwrap();
    write_ahead.append(&batches[2]).unwrap();
    let err = fails(&["export", "--from-nats", &urls, "--partition", "6"], 1);
    let missing = batches[1][0].seq;
    let want = format!(
        "HERALD_P6: stream message 2: record {missing}: missing (next record found is {})",
        batches[2][0].seq
    );
    assert!(err.contains(&want), "{err}\nwant: {want}");
    // A message whose records continue the seqs but chain to another hash is refused too.
    let forked = open_stream(&rt, &urls, 7);
    let write_ahead = StreamWriteAhead::new(forked, rt.handle().clone(), 0);
    write_ahead.append(&batches[0]).unwrap();
    let next = &batches[1][0];
    write_ahead.append(&[Record::seal(next.seq, next.at_ms, next.body.clone(), [9; 32])]).unwrap();
    let err = fails(&["export", "--from-nats", &urls, "--partition", "7"], 1);
    let want = format!("HERALD_P7: stream message 2: record {}: hash chain broken", next.seq);
    assert!(err.contains(&want), "{err}\nwant: {want}");
}

/// A single node's data directory holding [`workload`] for six organisations.
fn single_node(dir: &Path) -> (Vec<(OrgId, Vec<DeliveryId>)>, String) {
    let store = Arc::new(SledStore::open(dir, 8 << 20).unwrap());
    let parts = Parts { store, clock: Arc::new(SystemClock), sender: Arc::new(Ok200) };
    let engine = Engine::open_with(config(dir), parts).unwrap();
    let orgs: Vec<OrgId> = (1..=6).map(org).collect();
    let out = workload(&engine, &orgs);
    engine.shutdown();
    drop(engine);
    let export = ok(&["export", "--data-dir", dir.to_str().unwrap()], None);
    (out, export)
}

/// The event types of an export's lines, in order.
fn types(export: &str) -> Vec<String> {
    export
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            v["event"]["type"].as_str().unwrap_or("?").to_owned()
        })
        .collect()
}

/// Splits the single node in `src` into `partitions` files in `out` through the binary; checks
/// that every record went where its organisation lives and that each file imports and
/// verifies, and holds exactly the deliveries of the organisations that live in it.
fn split_checked(src: &Path, out: &Path, partitions: u32, orgs: &[(OrgId, Vec<DeliveryId>)], all: &str) {
    let listed = ok(
        &[
            "export",
            "--data-dir",
            src.to_str().unwrap(),
            "--partitions",
            &partitions.to_string(),
            "--out",
            out.to_str().unwrap(),
        ],
        None,
    );
    assert_eq!(listed.lines().count(), partitions as usize + 1, "{listed}");
    let read = |name: &str| std::fs::read_to_string(out.join(name)).unwrap();
    // Every record of the single node is in exactly one file, but for the rules and the
    // policy, which every partition has.
    let shared = types(all).iter().filter(|t| *t == "RulesAdopted" || *t == "PolicySet").count();
    let mut written = 0;
    for n in 0..partitions {
        let file = read(&format!("p{n}.ndjson"));
        written += file.lines().count();
        assert!(!types(&file).iter().any(|t| t.starts_with("ApiKey")), "keys only in control");
    }
    let control = read("control.ndjson");
    written += control.lines().count();
    assert_eq!(written, all.lines().count() + shared * partitions as usize);
    let mut control_types = types(&control);
    control_types.retain(|t| t != "RulesAdopted" && t != "PolicySet");
    assert_eq!(control_types, ["ApiKeyCreated", "ApiKeyCreated", "ApiKeyRevoked"]);
    // Each file is a log of its own: it imports and verifies; each organisation's deliveries
    // are in its partition's log and in no other.
    for n in 0..partitions {
        let name = format!("p{n}.ndjson");
        let dir = out.join(format!("imported-p{n}"));
        ok(&["import", "--data-dir", dir.to_str().unwrap()], Some(read(&name).as_bytes()));
        for (org_id, deliveries) in orgs {
            let replay = herald(
                &["replay", "--data-dir", dir.to_str().unwrap(), "--delivery", &deliveries[1].to_string()],
                None,
            );
            assert_eq!(replay.status.success(), partition_of(org_id, partitions) == n, "{org_id} in p{n}");
        }
    }
}

#[test]
fn a_single_nodes_log_splits_into_partitions_that_each_import_and_verify() {
    let src = tempfile::tempdir().unwrap();
    let (orgs, all) = single_node(src.path());
    let out = tempfile::tempdir().unwrap();
    split_checked(src.path(), &out.path().join("split"), 4, &orgs, &all);
    // The organisations fell in more than one partition (else the split proved little).
    let used: std::collections::HashSet<u32> = orgs.iter().map(|(o, _)| partition_of(o, 4)).collect();
    assert!(used.len() > 1, "{used:?}");
    // A second split into the same directory is refused, and so are 0 partitions.
    let args = |n: &'static str| {
        ["export", "--data-dir", src.path().to_str().unwrap(), "--partitions", n, "--out"]
            .into_iter()
            .map(str::to_owned)
            .chain([out.path().join("split").display().to_string()])
            .collect::<Vec<String>>()
    };
    let again = args("4");
    let err = fails(&again.iter().map(String::as_str).collect::<Vec<_>>(), 2);
    assert!(err.contains("already exists"), "{err}");
    let zero = args("0");
    let err = fails(&zero.iter().map(String::as_str).collect::<Vec<_>>(), 2);
    assert!(err.contains("--partitions 0"), "{err}");
    // A compacted log is refused: its checkpoint holds every organisation's state in one piece.
    std::thread::sleep(Duration::from_millis(1100));
    ok(&["compact", "--data-dir", src.path().to_str().unwrap(), "--retain", "1s"], None);
    let mut compacted = args("4");
    *compacted.last_mut().unwrap() = out.path().join("compacted").display().to_string();
    let err = fails(&compacted.iter().map(String::as_str).collect::<Vec<_>>(), 2);
    assert!(err.contains("this log was compacted"), "{err}");
}

#[test]
fn a_split_single_node_loads_into_its_streams_and_a_cluster_node_serves_it() {
    let src = tempfile::tempdir().unwrap();
    let (orgs, _) = single_node(src.path());
    let split = tempfile::tempdir().unwrap();
    let listed = ok(
        &[
            "export",
            "--data-dir",
            src.path().to_str().unwrap(),
            "--partitions",
            "4",
            "--out",
            split.path().to_str().unwrap(),
        ],
        None,
    );
    assert!(listed.contains("control"), "{listed}");
    let rt = runtime();
    let (_nats, urls) = three_servers(&rt);
    let node = tempfile::tempdir().unwrap();
    let data = node.path().to_str().unwrap();
    let other = tempfile::tempdir().unwrap();
    let load = |dir: &Path, part: &str, partitions: &str, file: &[u8]| {
        let dir = dir.to_str().unwrap();
        let args = [
            "import",
            "--data-dir",
            dir,
            "--to-nats",
            &urls,
            "--partition",
            part,
            "--partitions",
            partitions,
        ];
        herald(&args, Some(file))
    };
    let file_of = |part: &str| {
        let name = if part == "control" { "control.ndjson".to_owned() } else { format!("p{part}.ndjson") };
        std::fs::read(split.path().join(name)).unwrap()
    };
    // The file of an organisation's partition loaded as another partition is refused before
    // anything is written, naming the partition it belongs in.
    let home = partition_of(&orgs[0].0, 4);
    let (wrong, right) = (((home + 1) % 4).to_string(), home.to_string());
    let refused = load(other.path(), &wrong, "4", &file_of(&right));
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(err.contains(&format!("belongs in partition {home}")), "{err}");
    for part in (0..4u32).map(|n| n.to_string()).chain(["control".to_owned()]) {
        let file = file_of(&part);
        let loaded = load(node.path(), &part, "4", &file);
        assert!(loaded.status.success(), "{part}: {}", String::from_utf8_lossy(&loaded.stderr));
        // The stream holds the file's log, record for record, and so does the node's replica.
        let from_nats = ok(&["export", "--from-nats", &urls, "--partition", &part], None);
        assert_eq!(from_nats.as_bytes(), &file[..], "{part}");
        ok(&["verify", "--data-dir", data, "--partition", &part], None);
        // A stream that holds a log already is refused (from another node's directory too).
        let again = load(other.path(), &part, "4", &file);
        assert!(String::from_utf8_lossy(&again.stderr).contains("already holds"), "{part}: {again:?}");
    }
    // The cluster's partition count is stored: a load that says another is refused.
    let err = load(other.path(), "0", "8", &file_of("0"));
    let err = String::from_utf8_lossy(&err.stderr);
    assert!(err.contains("the cluster has 4 partitions"), "{err}");
    // Another node catching a partition up from its stream gets the same replica.
    let (org_id, _) = &orgs[0];
    let stream = open_stream(&rt, &urls, partition_of(org_id, 4));
    let fresh: Arc<dyn Store> = Arc::new(herald::log::MemStore::new());
    rt.block_on(catch_up(&fresh, &stream)).unwrap();
    let dir = node.path().join(format!("cluster/p{}", partition_of(org_id, 4)));
    let loaded = SledStore::open(&dir, 8 << 20).unwrap();
    assert_eq!(stored_projection(fresh.as_ref()).unwrap(), stored_projection(&loaded).unwrap());
    drop(loaded);
    // A cluster node started on the loaded data takes every partition over and serves each
    // organisation's deliveries from its partition, and the keys from the control partition.
    let mut engine = config(node.path());
    engine.delivery.shutdown_timeout = Duration::from_millis(300);
    let started = herald_cluster::Node::start(herald_cluster::NodeConfig {
        nats_url: urls.clone(),
        node_id: "n1".into(),
        advertise: "http://127.0.0.1:1".into(),
        partitions: 4,
        replicas: 3,
        lease: Duration::from_millis(900),
        data_dir: node.path().to_owned(),
        engine,
    })
    .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while let Err(why) = started.readiness() {
        assert!(std::time::Instant::now() < deadline, "not ready: {why}");
        std::thread::sleep(Duration::from_millis(50));
    }
    for (org_id, deliveries) in &orgs {
        let herald_cluster::Place::Local(engine) = started.place(started.partition_of(org_id)) else {
            panic!("{org_id}'s partition is not served here")
        };
        for d in deliveries {
            assert_eq!(engine.delivery(*d).unwrap().unwrap().status, DeliveryStatus::Delivered);
        }
    }
    let admin = started.api_key_by_hash(&[1; 32]).unwrap().expect("the admin key");
    assert_eq!(admin.id, ApiKeyId(Uuid::from_u128(0xA1)));
    started.shutdown(Duration::from_secs(5));
}
