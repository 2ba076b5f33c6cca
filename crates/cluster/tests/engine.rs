//! herald's engine on a partition's stream, as cluster mode will run it (real NATS, three
//! servers): an engine that took the partition over (lease, catch-up, `ClaimPartition`) is
//! fenced by the next one, whose replica then equals what the stream holds; the largest legal
//! publish goes through, a command past the limit is refused whole, batches are cut so that
//! every message holds one whole batch; a server below herald's `max_payload` is refused.

use std::sync::Arc;
use std::time::Duration;

use herald_cluster::testing::NatsCluster;
use herald_cluster::{
    catch_up, unix_ms, ClusterError, LeaseSettings, Leases, PartitionStream, StreamSettings,
    StreamWriteAhead, MAX_PAYLOAD_NEEDED,
};
use herald_engine::clock::SystemClock;
use herald_engine::sender::{AttemptRequest, SendFuture, SendOutcome, Sender};
use herald_engine::{
    Actor, Command, CommandError, DeliverySettingsPatch, Engine, EngineConfig, EngineError, Parts, Reply,
};
use herald_log::{read_records, LogError, MemStore, Store, WriteAheadError};
use herald_projector::{decode, stored_projection, EndpointId, Event, EventId, OrgId, Policy};
use uuid::Uuid;

/// No receiver: nothing here is delivered.
struct NoSender;

impl Sender for NoSender {
    fn send(&self, _: AttemptRequest) -> SendFuture<'_> {
        Box::pin(async { SendOutcome::Response { status: 200, excerpt: Vec::new(), retry_after_ms: None } })
    }
}

/// Takes the partition over for `leases`' node: the lease, the catch-up, the engine on the
/// stream, and its claim record.
fn take_over(
    rt: &tokio::runtime::Runtime,
    leases: &Leases,
    stream: &PartitionStream,
    store: &Arc<dyn Store>,
) -> Engine {
    let held = rt.block_on(leases.claim(stream.partition(), unix_ms())).unwrap();
    let caught = rt.block_on(catch_up(store, stream)).unwrap();
    let write_ahead = Arc::new(StreamWriteAhead::new(stream.clone(), rt.handle().clone(), caught.position));
    let parts = Parts { store: store.clone(), clock: Arc::new(SystemClock), sender: Arc::new(NoSender) };
    let engine = Engine::open_with_write_ahead(EngineConfig::default(), parts, write_ahead).unwrap();
    let claim = Command::ClaimPartition { node_id: held.lease.node_id.clone(), epoch: held.lease.epoch };
    engine.execute_blocking(Actor::admin(), claim).unwrap();
    engine
}

fn policy(failures_max: u32) -> Command {
    Command::SetPolicy(Policy { failures_max, ..Policy::default() })
}

#[test]
fn an_engine_is_fenced_by_the_next_owners_claim_and_the_stream_is_the_new_owners_log() {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let nats = rt.block_on(async {
        tokio::time::timeout(Duration::from_secs(40), NatsCluster::start(3)).await.unwrap()
    });
    let js =
        rt.block_on(async { async_nats::jetstream::new(async_nats::connect(nats.addrs()).await.unwrap()) });
    let settings =
        LeaseSettings { lease: Duration::from_millis(600), skew_margin: Duration::from_millis(200) };
    let leases_a = rt.block_on(Leases::open(&js, 3, "a", "http://a", settings)).unwrap();
    let leases_b = rt.block_on(Leases::open(&js, 3, "b", "http://b", settings)).unwrap();
    let stream = rt.block_on(PartitionStream::open(js.clone(), 7, StreamSettings::default())).unwrap();
    let store_a: Arc<dyn Store> = Arc::new(MemStore::new());
    let a = take_over(&rt, &leases_a, &stream, &store_a);
    a.execute_blocking(Actor::admin(), policy(7)).unwrap();
    // A stalls past its lease; B takes the partition over.
    std::thread::sleep(settings.lease + settings.skew_margin + Duration::from_millis(100));
    let store_b: Arc<dyn Store> = Arc::new(MemStore::new());
    let b = take_over(&rt, &leases_b, &stream, &store_b);
    match a.execute_blocking(Actor::admin(), policy(8)) {
        Err(EngineError::Log(LogError::WriteAhead(WriteAheadError::Fenced(_)))) => {}
        other => panic!("A was not fenced: {other:?}"),
    }
    b.execute_blocking(Actor::admin(), policy(9)).unwrap();
    a.shutdown();
    b.shutdown();
    let records = read_records(store_b.as_ref(), 1, usize::MAX).unwrap();
    let claims: Vec<(String, u64)> = records
        .iter()
        .filter_map(|r| match decode(&r.body).unwrap() {
            Event::PartitionClaimed { node_id, epoch } => Some((node_id, epoch)),
            _ => None,
        })
        .collect();
    assert_eq!(claims, [("a".to_string(), 1), ("b".to_string(), 2)]);
    let policies: Vec<u32> = records
        .iter()
        .filter_map(|r| match decode(&r.body).unwrap() {
            Event::PolicySet(p) => Some(p.failures_max),
            _ => None,
        })
        .collect();
    assert!(!policies.contains(&8), "nothing of A after the fence: {policies:?}");
    // A's 7; B's open records its configured policy (the default) over the 7 in force; B's 9.
    assert_eq!(policies, [7, Policy::default().failures_max, 9]);
    let replica: Arc<dyn Store> = Arc::new(MemStore::new());
    rt.block_on(catch_up(&replica, &stream)).unwrap();
    assert_eq!(read_records(replica.as_ref(), 1, usize::MAX).unwrap(), records);
    assert_eq!(stored_projection(replica.as_ref()).unwrap(), stored_projection(store_b.as_ref()).unwrap());
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

/// A receiver that never answers: an attempt stays in flight (nothing recorded) until the stop.
struct Silent;

impl Sender for Silent {
    fn send(&self, _: AttemptRequest) -> SendFuture<'_> {
        Box::pin(std::future::pending())
    }
}

/// An engine writing ahead to `stream` from an empty replica (no lease: one writer here),
/// whose attempts never end: the stream holds only what the test writes, until the stop.
fn engine_on(rt: &tokio::runtime::Runtime, stream: &PartitionStream) -> (Engine, Arc<dyn Store>) {
    engine_sending(rt, stream, Arc::new(Silent))
}

/// [`engine_on`] whose attempts go to `sender`.
fn engine_sending(
    rt: &tokio::runtime::Runtime,
    stream: &PartitionStream,
    sender: Arc<dyn Sender>,
) -> (Engine, Arc<dyn Store>) {
    let store: Arc<dyn Store> = Arc::new(MemStore::new());
    let write_ahead = Arc::new(StreamWriteAhead::new(stream.clone(), rt.handle().clone(), 0));
    let parts = Parts { store: store.clone(), clock: Arc::new(SystemClock), sender };
    let mut config = EngineConfig::default();
    config.delivery.shutdown_timeout = Duration::from_millis(400);
    config.delivery.max_in_flight_total = 8;
    (Engine::open_with_write_ahead(config, parts, write_ahead).unwrap(), store)
}

/// `n` endpoints of `org`, each subscribed to every event type, at a url of about `url_bytes`,
/// submitted together (the writer batches them).
fn endpoints(engine: &Engine, org: OrgId, n: u32, url_bytes: usize) {
    let (tx, rx) = crossbeam_channel::unbounded();
    for i in 0..n {
        let tx = tx.clone();
        let path = "h".repeat(url_bytes.saturating_sub(40));
        let command = Command::CreateEndpoint {
            id: EndpointId(Uuid::from_u128((u128::from(org.0.as_u128() as u32) << 32) + u128::from(i) + 1)),
            org_id: org,
            url: format!("https://receiver-{i:05}.example.com/{path}"),
            name: format!("e{i}"),
            enabled_events: vec!["*".into()],
            secret: None,
            settings: DeliverySettingsPatch::default(),
        };
        engine.submit_with(Actor::admin(), command, move |out| tx.send(out.map(drop)).unwrap());
    }
    for _ in 0..n {
        rx.recv_timeout(Duration::from_secs(60)).unwrap().unwrap();
    }
}

fn publish(org: OrgId, n: u128, payload_bytes: usize) -> Command {
    Command::Publish {
        id: EventId(Uuid::from_u128(0xE000 + n)),
        org_id: org,
        event_type: "call.ended".into(),
        payload: format!("\"{}\"", "p".repeat(payload_bytes - 2)).into_bytes(),
        call_id: None,
        webhook_url: None,
        idempotency_key: None,
        ordering_key: None,
    }
}

/// A runtime, three NATS servers (herald's `max_payload`) and a JetStream context on them.
fn three_servers() -> (tokio::runtime::Runtime, NatsCluster, async_nats::jetstream::Context) {
    let rt = runtime();
    let nats = rt.block_on(async {
        tokio::time::timeout(Duration::from_secs(40), NatsCluster::start(3)).await.unwrap()
    });
    let js =
        rt.block_on(async { async_nats::jetstream::new(async_nats::connect(nats.addrs()).await.unwrap()) });
    (rt, nats, js)
}

fn messages(rt: &tokio::runtime::Runtime, stream: &PartitionStream) -> Vec<Vec<herald_log::Record>> {
    rt.block_on(herald_cluster::testing::messages(stream))
}

#[test]
fn the_largest_legal_publish_goes_through_as_one_message() {
    let (rt, _nats, js) = three_servers();
    // herald's own settings: 256 KiB payload, fanned out to 10,000 endpoints.
    let stream = rt.block_on(PartitionStream::open(js, 11, StreamSettings::default())).unwrap();
    let (engine, _store) = engine_on(&rt, &stream);
    let org = OrgId(Uuid::from_u128(1));
    let started = std::time::Instant::now();
    endpoints(&engine, org, 10_000, 50);
    eprintln!("10,000 endpoints in {:?}", started.elapsed());
    let before = rt.block_on(stream.last_sequence()).unwrap();
    match engine.execute_blocking(Actor::admin(), publish(org, 1, 256 * 1024)).unwrap() {
        Reply::Published { delivery_ids, .. } => assert_eq!(delivery_ids.len(), 10_000),
        other => panic!("{other:?}"),
    }
    eprintln!("published at {:?} (a debug build folds a 10,000-delivery fan-out slowly)", started.elapsed());
    let all = messages(&rt, &stream);
    assert_eq!(all.len() as u64, before + 1, "the publish is one message");
    let largest = herald_log::encode_records(all.last().unwrap()).len();
    eprintln!(
        "the largest legal publish: one message of {largest} bytes ({} records)",
        all[all.len() - 1].len()
    );
    assert!(largest < StreamSettings::default().command_bytes_max);
    assert!(engine.event(EventId(Uuid::from_u128(0xE001))).unwrap().is_some());
    engine.shutdown();
}

#[test]
fn batches_past_the_message_limit_are_cut_so_that_each_message_is_one_whole_batch() {
    let (rt, _nats, js) = three_servers();
    let settings = StreamSettings {
        max_message_bytes: 256 * 1024,
        command_bytes_max: 64 * 1024,
        ..StreamSettings::default()
    };
    let stream = rt.block_on(PartitionStream::open(js, 12, settings)).unwrap();
    let (engine, store) = engine_on(&rt, &stream);
    let org = OrgId(Uuid::from_u128(3));
    endpoints(&engine, org, 3, 50);
    // 400 publishes of 4 KiB submitted at once: about 1.7 MB, many batches.
    let (tx, rx) = crossbeam_channel::unbounded();
    for n in 0..400 {
        let tx = tx.clone();
        engine.submit_with(Actor::admin(), publish(org, 100 + n, 4 * 1024), move |out| {
            tx.send(out.map(drop)).unwrap()
        });
    }
    for _ in 0..400 {
        rx.recv_timeout(Duration::from_secs(60)).unwrap().unwrap();
    }
    // One publish of 70 KiB (over the 64 KiB one command may write) is refused whole, with a
    // clear error; nothing of it is written, and the writer goes on.
    let last = rt.block_on(stream.last_sequence()).unwrap();
    match engine.execute_blocking(Actor::admin(), publish(org, 999, 70 * 1024)) {
        Err(EngineError::Command(CommandError::Conflict { reason })) => {
            assert!(reason.contains("one whole batch") && reason.contains("65536 bytes"), "{reason}")
        }
        other => panic!("not refused: {other:?}"),
    }
    assert!(engine.event(EventId(Uuid::from_u128(0xE000 + 999))).unwrap().is_none());
    assert_eq!(rt.block_on(stream.last_sequence()).unwrap(), last, "nothing published");
    engine.execute_blocking(Actor::admin(), publish(org, 1000, 100)).unwrap();
    engine.shutdown();
    let all = messages(&rt, &stream);
    let sizes: Vec<usize> = all.iter().map(|m| herald_log::encode_records(m).len()).collect();
    assert!(sizes.iter().all(|&b| b <= settings.max_message_bytes), "{sizes:?}");
    assert!(sizes.iter().filter(|&&b| b > 128 * 1024).count() >= 3, "cut near the limit: {sizes:?}");
    // Whole batches: each message begins a command (a publish with its deliveries never straddles
    // two), and the stream holds the owner's log record for record.
    for m in &all {
        let first = decode(&m[0].body).unwrap();
        assert!(!matches!(first, Event::DeliveryCreated { .. }), "a message starts mid-command");
    }
    let in_stream: Vec<_> = all.into_iter().flatten().collect();
    let refused_id = EventId(Uuid::from_u128(0xE000 + 999));
    assert!(
        !in_stream.iter().any(|r| matches!(decode(&r.body).unwrap(),
            Event::EventPublishedWithDeliveries { id, .. } if id == refused_id)),
        "nothing of the refused command is in the stream"
    );
    assert_eq!(in_stream, read_records(store.as_ref(), 1, usize::MAX).unwrap());
}

#[test]
fn a_server_below_heralds_max_payload_or_an_older_smaller_stream_is_refused_naming_both_numbers() {
    let rt = runtime();
    let nats = rt.block_on(async {
        tokio::time::timeout(Duration::from_secs(40), NatsCluster::start_with_max_payload(1, None))
            .await
            .unwrap()
    });
    let js =
        rt.block_on(async { async_nats::jetstream::new(async_nats::connect(nats.addrs()).await.unwrap()) });
    let settings = StreamSettings { replicas: 1, ..StreamSettings::default() };
    let refused = rt.block_on(PartitionStream::open(js.clone(), 0, settings)).err().expect("refused");
    assert_eq!(refused, ClusterError::MaxPayload { server: 1024 * 1024, needed: MAX_PAYLOAD_NEEDED });
    let text = refused.to_string();
    assert!(text.contains("1048576") && text.contains("8388608"), "{text}");
    // A stream made earlier with a smaller message limit is refused too, naming both.
    let small =
        StreamSettings { replicas: 1, max_message_bytes: 64 * 1024, command_bytes_max: 8 * 1024, ..settings };
    rt.block_on(PartitionStream::open(js.clone(), 1, small)).unwrap();
    let refused =
        rt.block_on(PartitionStream::open(js, 1, StreamSettings { max_message_bytes: 512 * 1024, ..small }));
    let text = refused.err().expect("refused").to_string();
    assert!(text.contains("65536") && text.contains("524288"), "{text}");
}

/// The log's records after its anchor.
fn records_from_anchor(store: &dyn Store) -> Vec<herald_log::Record> {
    let anchor = herald_log::read_head(store).unwrap().anchor_seq;
    read_records(store, anchor + 1, usize::MAX).unwrap()
}

/// Every key and value the store holds above the log's own keys: the projection, the
/// checkpoint, and whatever else herald keeps beside the log.
fn whole(store: &dyn Store) -> Vec<(Vec<u8>, Vec<u8>)> {
    let mut out = Vec::new();
    store
        .scan(&[herald_log::keyspace::USER_FIRST], &[0xFF; 8], &mut |k, v| {
            out.push((k.to_vec(), v.to_vec()));
            std::ops::ControlFlow::Continue(())
        })
        .unwrap();
    out
}

#[test]
fn after_a_retention_pass_on_the_owner_a_replica_holds_the_same_bytes() {
    let (rt, _nats, js) = three_servers();
    let stream = rt.block_on(PartitionStream::open(js, 13, StreamSettings::default())).unwrap();
    let (engine, store) = engine_sending(&rt, &stream, Arc::new(NoSender));
    let org = OrgId(Uuid::from_u128(4));
    endpoints(&engine, org, 3, 50);
    for n in 0..20 {
        engine.execute_blocking(Actor::admin(), publish(org, 200 + n, 100)).unwrap();
    }
    assert!(engine.settle(Duration::from_secs(20)), "delivered");
    // One replica follows up to here; the compaction reaches it later, on its own.
    let early: Arc<dyn Store> = Arc::new(MemStore::new());
    rt.block_on(catch_up(&early, &stream)).unwrap();
    std::thread::sleep(Duration::from_millis(5));
    let report = engine.compact(Duration::ZERO).unwrap();
    assert!(report.deliveries_dropped >= 60 && report.events_dropped >= 20, "{report:?}");
    // Writes after the pass, some of them to the kept state.
    for n in 20..25 {
        engine.execute_blocking(Actor::admin(), publish(org, 200 + n, 100)).unwrap();
    }
    assert!(engine.settle(Duration::from_secs(20)), "delivered");
    engine.shutdown();
    let owner = whole(store.as_ref());
    assert!(herald_log::read_head(store.as_ref()).unwrap().anchor_seq > 0, "the owner's log was cut");
    let fresh: Arc<dyn Store> = Arc::new(MemStore::new());
    for replica in [early, fresh] {
        let caught = rt.block_on(catch_up(&replica, &stream)).unwrap();
        assert!(!caught.discarded);
        assert_eq!(stored_projection(replica.as_ref()).unwrap(), stored_projection(store.as_ref()).unwrap());
        // The records (read back: a follower batching several messages groups their stored
        // records otherwise), the log's head and anchor, and every key above the log's own
        // (projection, checkpoint) byte for byte.
        assert_eq!(records_from_anchor(replica.as_ref()), records_from_anchor(store.as_ref()));
        assert_eq!(
            herald_log::read_head(replica.as_ref()).unwrap(),
            herald_log::read_head(store.as_ref()).unwrap()
        );
        assert_eq!(whole(replica.as_ref()), owner, "the replica's projection and checkpoint are the owner's");
        herald_log::verify(replica.as_ref(), &mut |_| {}).unwrap();
    }
}
