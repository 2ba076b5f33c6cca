//! herald's engine on a partition's stream, as cluster mode will run it (real NATS, three
//! servers): an engine that took the partition over (lease, catch-up, `ClaimPartition`) is
//! fenced by the next one, whose replica then equals what the stream holds.

use std::sync::Arc;
use std::time::Duration;

use herald_cluster::testing::NatsCluster;
use herald_cluster::{
    catch_up, unix_ms, LeaseSettings, Leases, PartitionStream, StreamSettings, StreamWriteAhead,
};
use herald_engine::clock::SystemClock;
use herald_engine::sender::{AttemptRequest, SendFuture, SendOutcome, Sender};
use herald_engine::{Actor, Command, Engine, EngineConfig, EngineError, Parts};
use herald_log::{read_records, LogError, MemStore, Store, WriteAheadError};
use herald_projector::{decode, stored_projection, Event, Policy};

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
