//! The cluster node runtime against real NATS (three `nats-server -js` on 127.0.0.1): a node
//! alone serves every partition and the control partition; a second node joins and the
//! partitions spread, never served by both at once; a key written through the control owner
//! is found through the other node; a node that stops hands everything to the other; a node
//! configured with another partition count is refused; a stalled node is fenced, and once
//! resumed takes its share back; sixteen partitions spread over three nodes and stay put; a
//! write answered `Fenced` ends `Local` at once; a restarted node serves its partitions again
//! at once; a stalled one of three nodes is replaced within about a lease.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use herald_cluster::testing::NatsCluster;
use herald_cluster::{catch_up, Node, NodeConfig, PartitionStream, Place, StreamSettings, StreamWriteAhead};
use herald_engine::{
    decode, Actor, ApiKeyId, Command, Engine, EngineConfig, EngineError, Event, Policy, Scope,
};
use herald_log::{LogError, MemStore, Store, WriteAheadError};
use uuid::Uuid;

const PARTITIONS: u32 = 4;
const LEASE: Duration = Duration::from_millis(900);

/// One test of this file at a time: each runs three NATS servers and two nodes, and the
/// machine running the suite may have two cores.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner())
}

fn nats() -> NatsCluster {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async { tokio::time::timeout(Duration::from_secs(40), NatsCluster::start(3)).await.unwrap() })
}

fn config(nats: &NatsCluster, id: &str, dir: &Path, partitions: u32) -> NodeConfig {
    let mut engine = EngineConfig::default();
    engine.delivery.shutdown_timeout = Duration::from_millis(300);
    NodeConfig {
        nats_url: format!("{},{}", nats.url(0), nats.url(1)),
        node_id: id.into(),
        advertise: format!("http://{id}.example:8080"),
        partitions,
        replicas: 3,
        lease: LEASE,
        data_dir: dir.join(id),
        engine,
    }
}

/// Waits until `ok` holds, polling, or panics with `what` and the last `state` after `within`.
fn wait_until(within: Duration, what: &str, mut ok: impl FnMut() -> bool, state: impl Fn() -> String) {
    let started = Instant::now();
    while !ok() {
        assert!(started.elapsed() < within, "not {what} within {within:?}: {}", state());
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn local(node: &Node) -> Vec<u32> {
    (0..=node.partitions()).filter(|&p| matches!(node.place(p), Place::Local(_))).collect()
}

fn describe(nodes: &[&Node]) -> String {
    nodes
        .iter()
        .map(|n| format!("{}: local {:?}, readiness {:?}", n.node_id(), local(n), n.readiness()))
        .collect::<Vec<_>>()
        .join("; ")
}

fn create_key(node: &Node, n: u128) -> [u8; 32] {
    let Place::Local(engine) = node.place(node.control()) else { panic!("not the control owner") };
    let key_hash = *blake3::hash(&n.to_be_bytes()).as_bytes();
    let command = Command::CreateApiKey {
        id: ApiKeyId(Uuid::from_u128(n)),
        org_id: None,
        scopes: vec![Scope::Admin],
        name: format!("k{n}"),
        key_hash,
    };
    engine.execute_blocking(Actor::admin(), command).unwrap();
    key_hash
}

#[test]
fn a_node_alone_serves_everything_and_another_partition_count_is_refused() {
    let _one = one_at_a_time();
    let nats = nats();
    let dir = tempfile::tempdir().unwrap();
    let a = Node::start(config(&nats, "a", dir.path(), PARTITIONS)).unwrap();
    let changes = a.changes();
    assert_eq!(a.control(), PARTITIONS);
    wait_until(
        Duration::from_secs(30),
        "serving every partition",
        || a.readiness().is_ok(),
        || describe(&[&a]),
    );
    assert_eq!(local(&a), (0..=PARTITIONS).collect::<Vec<_>>(), "the control partition too");
    assert!(*changes.borrow() > u64::from(PARTITIONS), "a change per take-over");
    for p in 0..=PARTITIONS {
        assert!(dir
            .path()
            .join("a/cluster")
            .join(if p == PARTITIONS { "control".into() } else { format!("p{p}") })
            .is_dir());
    }
    // Keys: the owner's engine answers, and its epoch moves with a new key.
    let epoch = a.api_key_epoch();
    let hash = create_key(&a, 1);
    assert_ne!(a.api_key_epoch(), epoch);
    assert_eq!(a.api_key_by_hash(&hash).unwrap().unwrap().name, "k1");
    assert_eq!(a.api_key_by_hash(&[0; 32]).unwrap(), None);
    a.refresh_control().unwrap();
    // Another partition count is refused, naming both numbers.
    let refused = Node::start(config(&nats, "b", dir.path(), 8)).err().expect("refused").to_string();
    assert!(refused.contains(&PARTITIONS.to_string()) && refused.contains('8'), "{refused}");
    let started = Instant::now();
    a.shutdown(Duration::from_secs(5));
    assert!(started.elapsed() < Duration::from_secs(8), "shut down in {:?}", started.elapsed());
}

#[test]
fn a_second_node_takes_its_share_never_both_serving_one_partition_and_everything_when_the_first_stops() {
    let _one = one_at_a_time();
    let nats = nats();
    let dir = tempfile::tempdir().unwrap();
    let a = Node::start(config(&nats, "a", dir.path(), PARTITIONS)).unwrap();
    wait_until(Duration::from_secs(30), "a ready", || a.readiness().is_ok(), || describe(&[&a]));
    let hash_1 = create_key(&a, 1);
    let b = Node::start(config(&nats, "b", dir.path(), PARTITIONS)).unwrap();
    // Not ready while its take-overs are due; the reason says what is missing.
    let early = b.readiness().expect_err("b serves nothing yet");
    assert!(
        ["not read the cluster", "of its share 3", "taking partition"].iter().any(|why| early.contains(why)),
        "{early}"
    );
    // While they move: never Local on both. (And how long a moving partition is Local on
    // neither, a figure: a's engine stops, its lease is released, b takes it over.)
    let started = Instant::now();
    let mut unserved_since: Vec<Option<Instant>> = vec![None; PARTITIONS as usize + 1];
    let mut longest_unserved = Duration::ZERO;
    loop {
        let (on_a, on_b) = (local(&a), local(&b));
        assert!(on_a.iter().all(|p| !on_b.contains(p)), "both serve: a {on_a:?}, b {on_b:?}");
        for (p, since) in unserved_since.iter_mut().enumerate() {
            let served = on_a.contains(&(p as u32)) || on_b.contains(&(p as u32));
            match (served, *since) {
                (false, None) => *since = Some(Instant::now()),
                (true, Some(at)) => {
                    longest_unserved = longest_unserved.max(at.elapsed());
                    *since = None;
                }
                _ => {}
            }
        }
        if a.readiness().is_ok()
            && b.readiness().is_ok()
            && on_a.len() + on_b.len() == PARTITIONS as usize + 1
        {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(40), "not spread: {}", describe(&[&a, &b]));
        std::thread::sleep(Duration::from_millis(10));
    }
    let (on_a, on_b) = (local(&a), local(&b));
    assert!(on_a.len() >= 2 && on_b.len() >= 2, "spread: a {on_a:?}, b {on_b:?}");
    eprintln!(
        "spread in {:?}; a moving partition was served nowhere for {longest_unserved:?} at most (lease {LEASE:?})",
        started.elapsed()
    );
    for p in 0..=PARTITIONS {
        let (owner, other) = if on_a.contains(&p) { (&a, &b) } else { (&b, &a) };
        match other.place(p) {
            Place::Remote { node_id, advertise } => {
                assert_eq!(node_id, owner.node_id());
                assert_eq!(advertise, format!("http://{}.example:8080", owner.node_id()));
            }
            other_place => panic!("partition {p} on {} reads {other_place:?}", other.node_id()),
        }
    }
    // A key written through the control owner is found through the other node.
    let (owner, follower) = if on_a.contains(&PARTITIONS) { (&a, &b) } else { (&b, &a) };
    wait_until(
        Duration::from_secs(5),
        "the first key followed",
        || matches!(follower.api_key_by_hash(&hash_1), Ok(Some(_))),
        || format!("{:?}", follower.api_key_by_hash(&hash_1)),
    );
    let epoch = follower.api_key_epoch();
    let hash_2 = create_key(owner, 2);
    follower.refresh_control().unwrap();
    assert_eq!(follower.api_key_by_hash(&hash_2).unwrap().unwrap().name, "k2");
    assert_ne!(follower.api_key_epoch(), epoch, "the epoch moved");
    // The node with the control stops: the other takes everything within lease + a few s.
    let owner_is_a = on_a.contains(&PARTITIONS);
    let (stays, goes) = if owner_is_a { (b, a) } else { (a, b) };
    let before = *stays.changes().borrow();
    let stopping = Instant::now();
    goes.shutdown(Duration::from_secs(5));
    wait_until(
        LEASE + Duration::from_secs(8),
        "everything taken over",
        || local(&stays).len() == PARTITIONS as usize + 1 && stays.readiness().is_ok(),
        || describe(&[&stays]),
    );
    eprintln!("took everything over {:?} after the other's stop began", stopping.elapsed());
    assert!(*stays.changes().borrow() > before);
    assert_eq!(
        stays.api_key_by_hash(&hash_2).unwrap().unwrap().name,
        "k2",
        "the keys moved with the control"
    );
    stays.shutdown(Duration::from_secs(5));
}

#[test]
fn a_stalled_node_is_fenced_and_stops_serving_and_the_stream_stays_one_line() {
    let _one = one_at_a_time();
    let nats = nats();
    let dir = tempfile::tempdir().unwrap();
    let a = Node::start(config(&nats, "a", dir.path(), 1)).unwrap();
    wait_until(Duration::from_secs(30), "a ready", || a.readiness().is_ok(), || describe(&[&a]));
    let Place::Local(stale) = a.place(0) else { panic!("a serves partition 0") };
    a.stall_for_tests();
    let b = Node::start(config(&nats, "b", dir.path(), 1)).unwrap();
    wait_until(
        LEASE * 3 + Duration::from_secs(10),
        "b took everything",
        || local(&b).len() == 2,
        || describe(&[&a, &b]),
    );
    assert!(local(&a).is_empty(), "a's leases passed: it serves nothing ({})", describe(&[&a, &b]));
    // A write through a's engine (a request from before the stall) is fenced.
    match stale.execute_blocking(Actor::admin(), policy(7)) {
        Err(EngineError::Log(LogError::WriteAhead(WriteAheadError::Fenced(_)))) => {}
        other => panic!("a was not fenced: {other:?}"),
    }
    assert!(matches!(a.place(0), Place::Unowned | Place::Remote { .. }));
    // a resumes: it steps down from what it lost and takes its share back from b, the two
    // never serving one partition at once.
    let steps = a.changes();
    let before = *steps.borrow();
    a.resume_for_tests();
    let started = Instant::now();
    loop {
        let (on_a, on_b) = (local(&a), local(&b));
        assert!(on_a.iter().all(|p| !on_b.contains(p)), "both serve: a {on_a:?}, b {on_b:?}");
        if on_a.len() == 1 && on_b.len() == 1 && a.readiness().is_ok() && b.readiness().is_ok() {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(30), "not spread again: {}", describe(&[&a, &b]));
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(*steps.borrow() >= before + 2, "a stepped down, then took its share");
    // The owner of partition 0 goes on writing: its log is the stream's, one line.
    let Place::Local(engine) = (if local(&a) == [0] { a.place(0) } else { b.place(0) }) else {
        panic!("partition 0 is served")
    };
    engine.execute_blocking(Actor::admin(), policy(9)).unwrap();
    b.shutdown(Duration::from_secs(5));
    a.shutdown(Duration::from_secs(5));
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let records: Vec<herald_log::Record> = rt.block_on(async {
        let js = async_nats::jetstream::new(async_nats::connect(nats.addrs()).await.unwrap());
        let settings = StreamSettings { replicas: 3, ..StreamSettings::default() };
        let stream = PartitionStream::open(js, 0, settings).await.unwrap();
        herald_cluster::testing::messages(&stream).await.into_iter().flatten().collect()
    });
    for pair in records.windows(2) {
        assert_eq!(pair[1].seq, pair[0].seq + 1, "seqs one line");
        assert_eq!(pair[1].prev_hash, pair[0].hash, "one hash chain");
    }
    let events: Vec<Event> = records.iter().map(|r| decode(&r.body).unwrap()).collect();
    let claims: Vec<(String, u64)> = events
        .iter()
        .filter_map(|e| match e {
            Event::PartitionClaimed { node_id, epoch } => Some((node_id.clone(), *epoch)),
            _ => None,
        })
        .collect();
    assert_eq!(claims[..2], [("a".to_string(), 1), ("b".to_string(), 2)]);
    assert!(claims.windows(2).all(|w| w[1].1 == w[0].1 + 1), "one claim per epoch: {claims:?}");
    let policies: Vec<u32> = events
        .iter()
        .filter_map(|e| match e {
            Event::PolicySet(p) => Some(p.failures_max),
            _ => None,
        })
        .collect();
    assert!(!policies.contains(&7) && policies.contains(&9), "nothing of a after the fence: {policies:?}");
}

fn policy(failures_max: u32) -> Command {
    Command::SetPolicy(Policy { failures_max, ..Policy::default() })
}

#[test]
fn sixteen_partitions_spread_over_three_nodes_starting_together_and_stay_put() {
    let _one = one_at_a_time();
    let nats = nats();
    let dir = tempfile::tempdir().unwrap();
    let config = |id: &str| NodeConfig { lease: Duration::from_secs(2), ..config(&nats, id, dir.path(), 16) };
    let started = Instant::now();
    let nodes: Vec<Node> = ["a", "b", "c"].iter().map(|id| Node::start(config(id)).unwrap()).collect();
    let all: Vec<&Node> = nodes.iter().collect();
    loop {
        let served: Vec<Vec<u32>> = nodes.iter().map(local).collect();
        let mut every: Vec<u32> = served.concat();
        every.sort();
        let before = every.len();
        every.dedup();
        assert_eq!(every.len(), before, "served twice: {served:?}");
        if every.len() == 17 && nodes.iter().all(|n| n.readiness().is_ok()) {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(90), "{}", describe(&all));
        std::thread::sleep(Duration::from_millis(20));
    }
    eprintln!("spread in {:?}: {}", started.elapsed(), describe(&all));
    // Each holds 5 or 6 (its share is 6), and nothing moves once spread.
    assert!(nodes.iter().all(|n| (5..=6).contains(&local(n).len())), "{}", describe(&all));
    let changes: Vec<u64> = nodes.iter().map(|n| *n.changes().borrow()).collect();
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        nodes.iter().map(|n| *n.changes().borrow()).collect::<Vec<_>>(),
        changes,
        "{}",
        describe(&all)
    );
    let stopping = Instant::now();
    for node in nodes {
        node.shutdown(Duration::from_secs(5));
    }
    assert!(stopping.elapsed() < Duration::from_secs(10), "stopped in {:?}", stopping.elapsed());
}

#[test]
fn when_one_of_three_nodes_stalls_the_other_two_take_all_its_partitions_within_two_leases() {
    let _one = one_at_a_time();
    let nats = nats();
    let dir = tempfile::tempdir().unwrap();
    // Its partitions pass after a lease (and the skew margin, a fifth of it); the stalled node
    // stops counting as live after a lease too, so that the survivors' share covers them all
    // (a heartbeat TTL of three leases made one wait three leases).
    let lease = Duration::from_secs(2);
    let config = |id: &str| NodeConfig { lease, ..config(&nats, id, dir.path(), PARTITIONS) };
    let nodes: Vec<Node> = ["a", "b", "c"].iter().map(|id| Node::start(config(id)).unwrap()).collect();
    let all: Vec<&Node> = nodes.iter().collect();
    wait_until(
        Duration::from_secs(40),
        "spread",
        || {
            nodes.iter().map(|n| local(n).len()).sum::<usize>() == 5
                && nodes.iter().all(|n| n.readiness().is_ok())
        },
        || describe(&all),
    );
    // The node with the most partitions stalls (as a process killed or stopped would).
    let stalled = nodes.iter().max_by_key(|n| local(n).len()).unwrap();
    let moved = local(stalled);
    stalled.stall_for_tests();
    let stalled_at = Instant::now();
    let others: Vec<&Node> = nodes.iter().filter(|n| n.node_id() != stalled.node_id()).collect();
    wait_until(
        lease * 2 + Duration::from_millis(500),
        "taken over",
        || {
            others.iter().map(|n| local(n).len()).sum::<usize>() == 5
                && others.iter().all(|n| n.readiness().is_ok())
        },
        || describe(&all),
    );
    eprintln!("partitions {moved:?} taken over {:?} after the stall (lease {lease:?})", stalled_at.elapsed());
    for node in nodes {
        node.shutdown(Duration::from_secs(5));
    }
}

#[test]
fn a_node_restarted_on_its_data_takes_its_partitions_back_at_once_and_keeps_its_keys() {
    let _one = one_at_a_time();
    let nats = nats();
    let dir = tempfile::tempdir().unwrap();
    let a = Node::start(config(&nats, "a", dir.path(), PARTITIONS)).unwrap();
    wait_until(Duration::from_secs(30), "a ready", || a.readiness().is_ok(), || describe(&[&a]));
    let hash = create_key(&a, 7);
    a.shutdown(Duration::from_secs(5));
    let restarted = Instant::now();
    let a = Node::start(config(&nats, "a", dir.path(), PARTITIONS)).unwrap();
    wait_until(
        Duration::from_secs(20),
        "a ready again",
        || a.readiness().is_ok() && local(&a).len() == PARTITIONS as usize + 1,
        || describe(&[&a]),
    );
    eprintln!("serving everything again {:?} after the restart", restarted.elapsed());
    assert_eq!(a.api_key_by_hash(&hash).unwrap().unwrap().name, "k7");
    a.shutdown(Duration::from_secs(5));
    // Once more without the hand-back (its leases still live, as after a crash): it claims them
    // again at once, its own, without waiting for them to pass (a lease of 3 s here).
    let lease = Duration::from_secs(3);
    let config = |id: &str| NodeConfig { lease, ..config(&nats, id, dir.path(), PARTITIONS) };
    let a = Node::start(config("a")).unwrap();
    wait_until(Duration::from_secs(20), "a ready", || a.readiness().is_ok(), || describe(&[&a]));
    a.crash_for_tests();
    let restarted = Instant::now();
    let a = Node::start(config("a")).unwrap();
    wait_until(
        lease,
        "a ready after a crash",
        || a.readiness().is_ok() && local(&a).len() == PARTITIONS as usize + 1,
        || describe(&[&a]),
    );
    eprintln!("serving everything again {:?} after a restart without hand-back", restarted.elapsed());
    assert_eq!(a.api_key_by_hash(&hash).unwrap().unwrap().name, "k7");
    a.shutdown(Duration::from_secs(5));
}

#[test]
fn a_write_answered_fenced_ends_local_at_once_and_the_node_takes_the_partition_back() {
    let _one = one_at_a_time();
    let nats = nats();
    let dir = tempfile::tempdir().unwrap();
    let a = Node::start(config(&nats, "a", dir.path(), 1)).unwrap();
    wait_until(Duration::from_secs(30), "a ready", || a.readiness().is_ok(), || describe(&[&a]));
    let Place::Local(engine) = a.place(0) else { panic!("a serves partition 0") };
    // Another writer appends to the stream behind a's back (as a node that claimed it would).
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    let js =
        rt.block_on(async { async_nats::jetstream::new(async_nats::connect(nats.addrs()).await.unwrap()) });
    let settings = StreamSettings { replicas: 3, ..StreamSettings::default() };
    let stream = rt.block_on(PartitionStream::open(js, 0, settings)).unwrap();
    let store: Arc<dyn Store> = Arc::new(MemStore::new());
    let caught = rt.block_on(catch_up(&store, &stream)).unwrap();
    let write_ahead = Arc::new(StreamWriteAhead::new(stream, rt.handle().clone(), caught.position));
    let other = Engine::open_store_with_write_ahead(EngineConfig::default(), store, write_ahead).unwrap();
    other.execute_blocking(Actor::admin(), policy(3)).unwrap();
    other.shutdown();
    // a's next write is fenced, and from that answer on a does not say Local.
    match engine.execute_blocking(Actor::admin(), policy(4)) {
        Err(EngineError::Log(LogError::WriteAhead(WriteAheadError::Fenced(_)))) => {}
        other => panic!("a was not fenced: {other:?}"),
    }
    assert!(!matches!(a.place(0), Place::Local(_)), "fenced, yet Local");
    // Its lease is still its own: it takes the partition back (catching the other's write up,
    // a new epoch), and serves it again.
    let fenced_at = Instant::now();
    wait_until(
        Duration::from_secs(10),
        "a serving partition 0 again",
        || matches!(a.place(0), Place::Local(_)) && a.readiness().is_ok(),
        || describe(&[&a]),
    );
    eprintln!("served again {:?} after the fence", fenced_at.elapsed());
    let Place::Local(engine) = a.place(0) else { panic!("a serves partition 0") };
    let events: Vec<Event> =
        engine.records(1, usize::MAX).unwrap().iter().map(|r| decode(&r.body).unwrap()).collect();
    assert!(events.iter().any(|e| matches!(e, Event::PolicySet(p) if p.failures_max == 3)));
    assert!(!events.iter().any(|e| matches!(e, Event::PolicySet(p) if p.failures_max == 4)));
    let epochs: Vec<u64> = events
        .iter()
        .filter_map(|e| match e {
            Event::PartitionClaimed { node_id, epoch } if node_id == "a" => Some(*epoch),
            _ => None,
        })
        .collect();
    assert_eq!(epochs, [1, 2]);
    engine.execute_blocking(Actor::admin(), policy(5)).unwrap();
    a.shutdown(Duration::from_secs(5));
}
