//! Closing a node's partitions: [`Partitions`] owns the NATS runtime and the partitions' logs,
//! and its drop closes the logs first, cutting a publish in progress short, then the runtime.
//! Here every nats-server is killed while the writer waits on a publish: the drop still ends
//! within seconds, and the command waiting is refused, not acknowledged.

use std::sync::Arc;
use std::time::{Duration, Instant};

use herald_cluster::testing::NatsCluster;
use herald_cluster::{
    take_over, unix_ms, LeaseSettings, Leases, PartitionStream, Partitions, StreamSettings,
};
use herald_log::{Durability, Log, LogConfig, LogError, MemStore, Store, WriteAheadError};
use herald_projector::{Policy, Projector};

#[test]
fn dropping_the_partitions_closes_their_logs_before_the_runtime_and_does_not_hang() {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let mut nats = rt.block_on(async {
        tokio::time::timeout(Duration::from_secs(40), NatsCluster::start(3)).await.unwrap()
    });
    let mut partitions: Partitions<Projector> = Partitions::new(rt, Duration::from_secs(2));
    let handle = partitions.handle();
    let (leases, stream) = handle.block_on(async {
        let js = async_nats::jetstream::new(async_nats::connect(nats.addrs()).await.unwrap());
        let settings =
            LeaseSettings { lease: Duration::from_secs(5), skew_margin: Duration::from_millis(200) };
        let leases = Leases::open(&js, 3, "a", "http://a", settings).await.unwrap();
        // A publish tries for 60 s before it gives up: far past this test's bound.
        let settings =
            StreamSettings { publish_timeout: Duration::from_secs(60), ..StreamSettings::default() };
        (leases, PartitionStream::open(js, 2, settings).await.unwrap())
    });
    let store: Arc<dyn Store> = Arc::new(MemStore::new());
    let config = LogConfig { durability: Durability::Flush, ..LogConfig::default() };
    let owned = take_over(
        &handle,
        &leases,
        &stream,
        store,
        unix_ms(),
        |store, write_ahead| Log::open_write_ahead(store, Projector, config, write_ahead),
        |log, claim| log.submit(vec![(unix_ms(), claim)]).map(drop),
    )
    .unwrap();
    partitions.insert(2, owned);
    assert_eq!(partitions.served(), [2]);
    // Every server gone: the next batch's publish waits (up to its 60 s).
    for i in 0..3 {
        nats.kill(i);
    }
    let (tx, rx) = crossbeam_channel::bounded(1);
    let policy = herald_projector::Event::PolicySet(Policy::default());
    partitions.get(2).unwrap().log.submit_with(vec![(unix_ms(), policy)], move |out| {
        let _ = tx.send(out.map(drop));
    });
    std::thread::sleep(Duration::from_millis(500));
    assert!(rx.try_recv().is_err(), "the publish is still waiting on the runtime");
    let started = Instant::now();
    let dropped = std::thread::spawn(move || drop(partitions));
    while !dropped.is_finished() {
        assert!(started.elapsed() < Duration::from_secs(10), "dropping the partitions hangs");
        std::thread::sleep(Duration::from_millis(20));
    }
    dropped.join().unwrap();
    eprintln!("dropped in {:?}", started.elapsed());
    match rx.recv_timeout(Duration::from_secs(1)).unwrap() {
        Err(LogError::WriteAhead(WriteAheadError::Unavailable(why))) => {
            assert!(why.contains("closing"), "{why}")
        }
        other => panic!("the waiting command was not refused: {other:?}"),
    }
    drop(handle);
}
