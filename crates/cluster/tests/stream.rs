//! A partition's stream as the log's write-ahead, against a real three-server NATS cluster:
//! fencing of a second writer, catch-up of a replica to the owner's bytes (and the discard of a
//! replica that diverged or is ahead), and publishes that go on through a kill -9 of a server.

use std::sync::Arc;
use std::time::{Duration, Instant};

use herald_cluster::testing::NatsCluster;
use herald_cluster::{catch_up, CaughtUp, ClusterError, PartitionStream, StreamSettings, StreamWriteAhead};
use herald_log::{
    keyspace, read_head, read_records, verify, write_ahead_position, Durability, Log, LogConfig, LogError,
    MemStore, Record, Store, WriteAheadError, WriteBatch,
};
use herald_projector::{stored_projection, DeliveryId, EndpointId, Event, EventId, OrgId, Projector};
use uuid::Uuid;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

fn settings() -> StreamSettings {
    StreamSettings {
        replicas: 3,
        max_message_bytes: 64 * 1024,
        command_bytes_max: 8 * 1024,
        ack_wait: Duration::from_secs(1),
        publish_timeout: Duration::from_secs(15),
    }
}

fn start_nats(rt: &tokio::runtime::Runtime) -> NatsCluster {
    rt.block_on(async { tokio::time::timeout(Duration::from_secs(40), NatsCluster::start(3)).await.unwrap() })
}

/// A runtime, a NATS cluster of three, and partition `partition`'s stream on it.
fn setup(partition: u32) -> (tokio::runtime::Runtime, NatsCluster, PartitionStream) {
    let rt = runtime();
    let nats = start_nats(&rt);
    let stream = open_stream(&rt, &nats, partition);
    (rt, nats, stream)
}

fn open_stream(rt: &tokio::runtime::Runtime, nats: &NatsCluster, partition: u32) -> PartitionStream {
    rt.block_on(async {
        let client = async_nats::connect(nats.addrs()).await.unwrap();
        PartitionStream::open(async_nats::jetstream::new(client), partition, settings()).await.unwrap()
    })
}

/// A node serving one partition: its replica, caught up, and its log writing ahead to the stream.
struct Node {
    store: Arc<dyn Store>,
    log: Log<Projector>,
    caught: CaughtUp,
}

impl Node {
    fn start(rt: &tokio::runtime::Runtime, stream: &PartitionStream) -> Node {
        Node::on(rt, stream, Arc::new(MemStore::new()))
    }

    fn on(rt: &tokio::runtime::Runtime, stream: &PartitionStream, store: Arc<dyn Store>) -> Node {
        let caught = rt.block_on(catch_up(&store, stream)).unwrap();
        let write_ahead =
            Arc::new(StreamWriteAhead::new(stream.clone(), rt.handle().clone(), caught.position));
        let config = LogConfig { durability: Durability::Flush, ..LogConfig::default() };
        let log = Log::open_write_ahead(store.clone(), Projector, config, write_ahead).unwrap();
        Node { store, log, caught }
    }

    /// A node that wrote commands `0..n` one at a time (a message each).
    fn wrote(rt: &tokio::runtime::Runtime, stream: &PartitionStream, n: u32) -> Node {
        let node = Node::start(rt, stream);
        for i in 0..n {
            node.publish(i).unwrap();
        }
        node
    }

    fn publish(&self, n: u32) -> Result<Vec<u64>, LogError> {
        self.log.submit(events(n)).map(|r| r.unwrap())
    }
}

fn id(n: u32) -> Uuid {
    Uuid::from_u128(u128::from(n) + 1)
}

/// Command `n`: endpoint `n` of organisation 1 (every third command), or event `n` published
/// with a delivery to the last endpoint.
fn events(n: u32) -> Vec<(u64, Event)> {
    let at = 1_700_000_000_000 + u64::from(n) * 1_000;
    let org = OrgId(id(0));
    if n % 3 == 0 {
        let event = Event::EndpointCreated {
            id: EndpointId(id(n)),
            org_id: org,
            url: format!("https://e{n}.example/hook"),
            name: format!("e{n}"),
            enabled_events: vec!["*".into()],
            secret: format!("whsec_e{n}"),
        };
        return vec![(at, event)];
    }
    let published = Event::EventPublished {
        id: EventId(id(n)),
        org_id: org,
        event_type: "call.queued".into(),
        payload: format!(r#"{{"n":{n}}}"#).into_bytes(),
        call_id: None,
        idempotency_key: None,
    };
    let delivery = Event::DeliveryCreated {
        id: DeliveryId(id(n)),
        event_id: EventId(id(n)),
        org_id: org,
        endpoint_id: Some(EndpointId(id(n - n % 3))),
        url: "https://target.example/hook".into(),
        next_attempt_at_ms: at,
    };
    vec![(at, published), (at, delivery)]
}

/// The index of the server that leads stream `name` (asked again while it has none, up to 20 s).
fn stream_leader(rt: &tokio::runtime::Runtime, nats: &NatsCluster, name: &str) -> usize {
    rt.block_on(async {
        let client = async_nats::connect(nats.addrs()).await.unwrap();
        let js = async_nats::jetstream::new(client);
        let started = Instant::now();
        loop {
            if let Ok(mut s) = js.get_stream(name).await {
                let leader =
                    s.info().await.ok().and_then(|i| i.cluster.as_ref().and_then(|c| c.leader.clone()));
                if let Some(leader) = leader {
                    return leader.trim_start_matches('n').parse().unwrap();
                }
            }
            assert!(started.elapsed() < Duration::from_secs(20), "stream {name} has no leader");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
}

/// Every record the stream holds, message by message.
fn stream_records(rt: &tokio::runtime::Runtime, stream: &PartitionStream) -> Vec<Record> {
    rt.block_on(herald_cluster::testing::messages(stream)).into_iter().flatten().collect()
}

fn records(store: &dyn Store) -> Vec<Record> {
    read_records(store, 1, usize::MAX).unwrap()
}

/// The replica holds the owner's records and projection, byte for byte, at the same position.
fn assert_same(owner: &dyn Store, replica: &dyn Store) {
    assert_eq!(records(replica), records(owner));
    assert_eq!(stored_projection(replica).unwrap(), stored_projection(owner).unwrap());
    assert_eq!(write_ahead_position(replica).unwrap(), write_ahead_position(owner).unwrap());
    verify(replica, &mut |_| {}).unwrap();
}

#[test]
fn a_second_writer_fences_the_first_and_nothing_the_first_wrote_after_is_anywhere() {
    let (rt, _nats, stream) = setup(0);
    let a = Node::start(&rt, &stream);
    assert_eq!(a.publish(0).unwrap(), vec![1]);
    assert_eq!(a.publish(1).unwrap(), vec![2, 3]);
    // B takes the partition over: it catches up, then writes (its claim).
    let b = Node::start(&rt, &stream);
    assert_eq!(b.caught, CaughtUp { position: 2, messages: 2, discarded: false });
    assert_eq!(b.publish(2).unwrap(), vec![4, 5]);
    // A's next write is fenced: not applied, not in the stream; and so is every one after.
    let fenced = a.publish(3).unwrap_err();
    assert!(matches!(fenced, LogError::WriteAhead(WriteAheadError::Fenced(_))), "{fenced:?}");
    assert!(a.log.fenced().is_some());
    assert!(matches!(a.publish(6), Err(LogError::WriteAhead(WriteAheadError::Fenced(_)))));
    assert_eq!(read_head(a.store.as_ref()).unwrap().next_seq, 4, "A applied nothing after the fence");
    let in_stream = stream_records(&rt, &stream);
    assert_eq!(in_stream.iter().map(|r| r.seq).collect::<Vec<_>>(), vec![1, 2, 3, 4, 5], "one line");
    assert_eq!(in_stream, records(b.store.as_ref()));
    let a_bodies: Vec<Vec<u8>> = [3, 6]
        .iter()
        .flat_map(|&n| events(n))
        .map(|(_, e)| herald_projector::encode(herald_projector::RecordActor::System, &e))
        .collect();
    assert!(
        in_stream.iter().all(|r| !a_bodies.contains(&r.body)),
        "none of A's fenced events is in the stream"
    );
    // B goes on writing.
    assert_eq!(b.publish(9).unwrap(), vec![6]);
    a.log.close();
    b.log.close();
}

#[test]
fn a_replica_catches_up_to_the_owners_bytes_and_one_that_diverged_or_is_ahead_is_rebuilt() {
    let (rt, _nats, stream) = setup(3);
    // Single commands, then a burst that the writer groups into batches of several commands.
    let owner = Node::wrote(&rt, &stream, 20);
    let (tx, rx) = crossbeam_channel::unbounded();
    for n in 20..120 {
        let tx = tx.clone();
        owner.log.submit_with(events(n), move |out| tx.send(out).unwrap());
    }
    for _ in 20..120 {
        rx.recv_timeout(Duration::from_secs(20)).unwrap().unwrap().unwrap();
    }
    let replica: Arc<dyn Store> = Arc::new(MemStore::new());
    let caught = rt.block_on(catch_up(&replica, &stream)).unwrap();
    assert_eq!(caught.position, write_ahead_position(owner.store.as_ref()).unwrap());
    assert!(!caught.discarded);
    assert_same(owner.store.as_ref(), replica.as_ref());
    // More writes: the replica catches up from where it was.
    for n in 120..125 {
        owner.publish(n).unwrap();
    }
    let again = rt.block_on(catch_up(&replica, &stream)).unwrap();
    assert_eq!((again.messages, again.discarded), (5, false));
    assert_same(owner.store.as_ref(), replica.as_ref());
    // A replica that wrote a record of its own (a write the stream never took) diverged.
    let local = Log::open(replica.clone(), Projector, LogConfig::default()).unwrap();
    local.submit(events(999)).unwrap().unwrap();
    local.close();
    let rebuilt = rt.block_on(catch_up(&replica, &stream)).unwrap();
    assert!(rebuilt.discarded);
    assert_same(owner.store.as_ref(), replica.as_ref());
    // A replica ahead of the stream (a position past its end) is rebuilt too.
    let mut ahead = WriteBatch::default();
    ahead.put(keyspace::META_WRITE_AHEAD.to_vec(), 1_000_000u64.to_be_bytes().to_vec());
    replica.apply(&ahead).unwrap();
    assert!(rt.block_on(catch_up(&replica, &stream)).unwrap().discarded);
    assert_same(owner.store.as_ref(), replica.as_ref());
    owner.log.close();
}

#[test]
fn a_message_that_does_not_continue_the_replica_is_refused_by_the_fold() {
    let (rt, nats, stream) = setup(4);
    let owner = Node::start(&rt, &stream);
    owner.publish(0).unwrap();
    owner.log.close();
    // Another stream's first record, published raw at message 2: seq 1 again, after seq 1.
    let other = open_stream(&rt, &nats, 5);
    let node = Node::start(&rt, &other);
    node.publish(3).unwrap();
    node.log.close();
    let foreign = herald_log::encode_records(&records(node.store.as_ref()));
    rt.block_on(async {
        let client = async_nats::connect(nats.addrs()).await.unwrap();
        let js = async_nats::jetstream::new(client);
        js.publish("herald.p.4", foreign.into()).await.unwrap().await.unwrap();
    });
    let replica: Arc<dyn Store> = Arc::new(MemStore::new());
    let err = rt.block_on(catch_up(&replica, &stream)).unwrap_err();
    assert!(matches!(err, ClusterError::Diverged { stream_seq: 2, .. }), "{err}");
    assert_eq!(records(replica.as_ref()), records(owner.store.as_ref()), "message 1 applied, 2 not");
}

#[test]
fn publishes_go_on_through_a_kill_9_of_the_streams_leader() {
    let (rt, mut nats, stream) = setup(1);
    let owner = Arc::new(Node::start(&rt, &stream));
    let writer = {
        let owner = owner.clone();
        std::thread::spawn(move || {
            let mut acknowledged = 0u32;
            let mut slowest = Duration::ZERO;
            for n in 0..300 {
                let started = Instant::now();
                owner.publish(n).unwrap_or_else(|e| panic!("publish {n} after {:?}: {e}", started.elapsed()));
                slowest = slowest.max(started.elapsed());
                acknowledged += 1;
            }
            (acknowledged, slowest)
        })
    };
    // Wait for some load, then kill -9 the stream's leader.
    while write_ahead_position(owner.store.as_ref()).unwrap() < 50 {
        std::thread::sleep(Duration::from_millis(5));
    }
    let index = stream_leader(&rt, &nats, "HERALD_P1");
    nats.kill(index);
    let at_kill = write_ahead_position(owner.store.as_ref()).unwrap();
    assert!(at_kill < 300, "the leader was killed under load, at message {at_kill}");
    let (acknowledged, slowest) = writer.join().unwrap();
    assert_eq!(acknowledged, 300, "every publish acknowledged");
    eprintln!("leader n{index} killed at message {at_kill}; slowest publish {slowest:?}");
    assert!(write_ahead_position(owner.store.as_ref()).unwrap() >= 300);
    // What was acknowledged is in the stream, read through the servers left.
    let replica: Arc<dyn Store> = Arc::new(MemStore::new());
    rt.block_on(catch_up(&replica, &stream)).unwrap();
    assert_same(owner.store.as_ref(), replica.as_ref());
    owner.log.close();
}

/// Rounds of kill -9 of the stream's leader under a steady publish load, each followed by the
/// server's restart: 2 in `cargo test`, more for the long version
/// (`HERALD_KILL_ROUNDS=10 cargo test -p herald-cluster --test stream rounds_of_kill_9`). Prints
/// the commands acknowledged and refused, and the acknowledged records lost or duplicated.
#[test]
fn rounds_of_kill_9_of_the_streams_leader_lose_nothing_acknowledged() {
    let rounds: u32 = std::env::var("HERALD_KILL_ROUNDS").ok().and_then(|v| v.parse().ok()).unwrap_or(2);
    let (rt, mut nats, stream) = setup(6);
    let owner = Arc::new(Node::start(&rt, &stream));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (owner, stop) = (owner.clone(), stop.clone());
        std::thread::spawn(move || {
            let (mut acknowledged, mut refused) = (Vec::new(), 0u32);
            let mut n = 0;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                match owner.publish(n) {
                    Ok(seqs) => acknowledged.extend(seqs),
                    Err(e) => {
                        eprintln!("command {n} refused: {e}");
                        refused += 1
                    }
                }
                n += 1;
            }
            (acknowledged, refused)
        })
    };
    for _ in 0..rounds {
        std::thread::sleep(Duration::from_millis(300));
        let index = stream_leader(&rt, &nats, "HERALD_P6");
        nats.kill(index);
        std::thread::sleep(Duration::from_millis(1_000));
        nats.restart(index);
        rt.block_on(nats.wait_ready());
    }
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let (acknowledged, refused) = writer.join().unwrap();
    let in_stream = stream_records(&rt, &stream);
    let seqs: std::collections::BTreeSet<u64> = in_stream.iter().map(|r| r.seq).collect();
    let lost = acknowledged.iter().filter(|s| !seqs.contains(s)).count();
    let duplicated = in_stream.len() - seqs.len();
    eprintln!(
        "{rounds} leader kills: {} records acknowledged, {refused} commands refused, {lost} lost, {duplicated} duplicated",
        acknowledged.len()
    );
    assert_eq!((lost, duplicated), (0, 0));
    // The owner's log is the stream's, up to a batch refused as unavailable whose publish went
    // unanswered and which the stream stored after all: the owner's next write is fenced by it
    // (and a real node then steps down and catches up), never appended past it.
    let local = records(owner.store.as_ref());
    assert_eq!(in_stream[..local.len()], local[..], "the owner's log is the stream's beginning");
    if in_stream.len() > local.len() {
        assert!(refused > 0, "records in the stream no command was refused for: {}", in_stream.len());
        let next = owner.publish(n_after(&acknowledged));
        assert!(
            matches!(&next, Err(LogError::WriteAhead(WriteAheadError::Fenced(why))) if why.contains("own earlier batch")),
            "{next:?}"
        );
    }
    owner.log.close();
}

/// A command number no command of the writer used.
fn n_after(acknowledged: &[u64]) -> u32 {
    1_000_000 + acknowledged.len() as u32
}

/// Catch-up's speed: a replica rebuilt from 1,500 stream messages (about 2,500 records, one
/// command per message as an owner under a light load writes them). Prints records/s.
#[test]
fn a_replica_catches_up_on_thousands_of_messages_and_says_how_fast() {
    let (rt, _nats, stream) = setup(8);
    let owner = Node::wrote(&rt, &stream, 1_500);
    owner.log.close();
    let replica: Arc<dyn Store> = Arc::new(MemStore::new());
    let started = Instant::now();
    let caught = rt.block_on(catch_up(&replica, &stream)).unwrap();
    let took = started.elapsed();
    let records = records(replica.as_ref()).len();
    eprintln!(
        "catch-up: {} messages, {records} records in {took:?}: {:.0} records/s, {:.0} messages/s",
        caught.messages,
        records as f64 / took.as_secs_f64(),
        caught.messages as f64 / took.as_secs_f64()
    );
    assert_eq!(caught.messages, 1_500);
    assert_same(owner.store.as_ref(), replica.as_ref());
}
