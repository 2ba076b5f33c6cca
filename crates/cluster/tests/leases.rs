//! Leases and take-over against a real three-server NATS cluster: compare-and-set claims, the
//! fence record a new owner writes, renewal, and node heartbeats with their TTL.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use herald_cluster::testing::NatsCluster;
use herald_cluster::{
    fair_share, keep_renewed, take_over, unix_ms, LeaseError, LeaseSettings, Leases, Nodes, Owned,
    PartitionStream, StreamSettings,
};
use herald_log::{read_records, Durability, Log, LogConfig, LogError, MemStore, Store, WriteAheadError};
use herald_projector::{decode, stored_projection, Event, Projector, RULES_CURRENT};

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

/// A short lease, so that the tests wait for its end in well under a second.
fn lease_settings() -> LeaseSettings {
    LeaseSettings { lease: Duration::from_millis(600), skew_margin: Duration::from_millis(200) }
}

struct Cluster {
    rt: tokio::runtime::Runtime,
    _nats: NatsCluster,
    js: async_nats::jetstream::Context,
}

fn cluster() -> Cluster {
    let rt = runtime();
    let (nats, js) = rt.block_on(async {
        let nats = tokio::time::timeout(Duration::from_secs(40), NatsCluster::start(3)).await.unwrap();
        let client = async_nats::connect(nats.addrs()).await.unwrap();
        (nats, async_nats::jetstream::new(client))
    });
    Cluster { rt, _nats: nats, js }
}

impl Cluster {
    fn leases(&self, node: &str) -> Leases {
        self.rt
            .block_on(Leases::open(&self.js, 3, node, &format!("http://{node}"), lease_settings()))
            .unwrap()
    }

    fn stream(&self, partition: u32) -> PartitionStream {
        let settings = StreamSettings { ack_wait: Duration::from_secs(1), ..StreamSettings::default() };
        self.rt.block_on(PartitionStream::open(self.js.clone(), partition, settings)).unwrap()
    }

    /// Takes `stream`'s partition over for `leases`' node, on a replica in `store`.
    fn take_over(
        &self,
        leases: &Leases,
        stream: &PartitionStream,
        store: Arc<dyn Store>,
    ) -> Owned<Projector> {
        let open = |store, write_ahead| {
            let config = LogConfig { durability: Durability::Flush, ..LogConfig::default() };
            Log::open_write_ahead(store, Projector, config, write_ahead)
        };
        let claim = |log: &Log<Projector>, fence: Event| {
            // A log that never adopted the rules that fold the claim adopts them in the same batch.
            let mut events = Vec::new();
            if log.committed_seq() == 0 {
                events.push((unix_ms(), Event::RulesAdopted { version: RULES_CURRENT }));
            }
            events.push((unix_ms(), fence));
            log.submit(events).map(drop)
        };
        take_over(self.rt.handle(), leases, stream, store, unix_ms(), open, claim).unwrap()
    }
}

fn publish(n: u32) -> Vec<(u64, Event)> {
    let id = uuid::Uuid::from_u128(u128::from(n) + 1);
    let event = Event::EndpointCreated {
        id: herald_projector::EndpointId(id),
        org_id: herald_projector::OrgId(uuid::Uuid::from_u128(1)),
        url: format!("https://e{n}.example/hook"),
        name: format!("e{n}"),
        enabled_events: vec!["*".into()],
        secret: format!("whsec_{n}"),
    };
    vec![(unix_ms(), event)]
}

fn wait_past(until_ms: u64) {
    while unix_ms() <= until_ms {
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_lease_is_claimed_by_compare_and_set_and_only_once_it_passed() {
    let c = cluster();
    let (a, b) = (c.leases("a"), c.leases("b"));
    let held = c.rt.block_on(a.claim(0, unix_ms())).unwrap();
    assert_eq!((held.lease.node_id.as_str(), held.lease.epoch), ("a", 1));
    let refused = c.rt.block_on(b.claim(0, unix_ms())).unwrap_err();
    assert!(matches!(refused, LeaseError::HeldBy(ref l) if l.node_id == "a"), "{refused}");
    let held = c.rt.block_on(a.renew(&held, unix_ms())).unwrap();
    // Past the lease and the margin, B may claim it, with the next epoch; A's renewal is lost.
    wait_past(held.lease.lease_until_ms + lease_settings().skew_margin.as_millis() as u64);
    let taken = c.rt.block_on(b.claim(0, unix_ms())).unwrap();
    assert_eq!((taken.lease.node_id.as_str(), taken.lease.epoch), ("b", 2));
    let lost = c.rt.block_on(a.renew(&held, unix_ms())).unwrap_err();
    assert!(matches!(lost, LeaseError::Lost(Some(ref l)) if l.node_id == "b"), "{lost}");
    // Two nodes claiming one passed lease at once: exactly one gets it. (nats-server 2.9 lets
    // two writes expecting one revision of a key both through; the leases do not rely on that.)
    let d = c.leases("d");
    wait_past(taken.lease.lease_until_ms + lease_settings().skew_margin.as_millis() as u64);
    let mut epoch = taken.lease.epoch;
    for round in 0..10 {
        let now = unix_ms();
        let (one, other) = c.rt.block_on(async { tokio::join!(a.claim(0, now), d.claim(0, now)) });
        assert_eq!(one.is_ok() as u8 + other.is_ok() as u8, 1, "round {round}: {one:?} / {other:?}");
        let winner = one.or(other).unwrap();
        epoch += 1;
        assert_eq!(winner.lease.epoch, epoch);
        // A released lease may be claimed at once.
        let winner_leases = if winner.lease.node_id == "a" { &a } else { &d };
        c.rt.block_on(winner_leases.release(&winner)).unwrap();
    }
    assert_eq!(c.rt.block_on(b.claim(0, unix_ms())).unwrap().lease.epoch, epoch + 1);
}

#[test]
fn a_new_owner_fences_the_old_one_with_its_claim_record_and_the_stream_stays_one_line() {
    let c = cluster();
    let stream = c.stream(2);
    let (leases_a, leases_b) = (c.leases("a"), c.leases("b"));
    let store_a: Arc<dyn Store> = Arc::new(MemStore::new());
    let a = c.take_over(&leases_a, &stream, store_a.clone());
    assert_eq!(a.held.lease.epoch, 1);
    a.log.submit(publish(1)).unwrap().unwrap();
    // A stalls (no renewal, as under SIGSTOP); B claims the passed lease and takes over.
    let until = a.held.lease.lease_until_ms + lease_settings().skew_margin.as_millis() as u64;
    let store_b: Arc<dyn Store> = Arc::new(MemStore::new());
    assert!(matches!(c.rt.block_on(leases_b.claim(2, unix_ms())), Err(LeaseError::HeldBy(_))));
    wait_past(until);
    let b = c.take_over(&leases_b, &stream, store_b.clone());
    assert_eq!((b.held.lease.epoch, b.caught.messages), (2, 2), "B applied A's claim and write first");
    // A resumes: its next write is fenced, and nothing of it is anywhere.
    let fenced = a.log.submit(publish(2)).unwrap_err();
    assert!(matches!(fenced, LogError::WriteAhead(WriteAheadError::Fenced(_))), "{fenced:?}");
    b.log.submit(publish(3)).unwrap().unwrap();
    let records = read_records(store_b.as_ref(), 1, usize::MAX).unwrap();
    let kinds: Vec<String> = records
        .iter()
        .map(|r| match decode(&r.body).unwrap() {
            Event::PartitionClaimed { node_id, epoch } => format!("claim {node_id} {epoch}"),
            Event::EndpointCreated { name, .. } => name,
            other => other.kind().to_string(),
        })
        .collect();
    assert_eq!(kinds, ["RulesAdopted", "claim a 1", "e1", "claim b 2", "e3"]);
    let replica: Arc<dyn Store> = Arc::new(MemStore::new());
    c.rt.block_on(herald_cluster::catch_up(&replica, &stream)).unwrap();
    assert_eq!(read_records(replica.as_ref(), 1, usize::MAX).unwrap(), records, "the stream is B's log");
    assert_eq!(stored_projection(replica.as_ref()).unwrap(), stored_projection(store_b.as_ref()).unwrap());
    a.log.close();
    b.log.close();
}

#[test]
fn a_renewed_lease_is_kept_and_a_lost_one_steps_the_owner_down() {
    let c = cluster();
    let (a, b) = (Arc::new(c.leases("a")), c.leases("b"));
    let held = c.rt.block_on(a.claim(5, unix_ms())).unwrap();
    let stepped_down = Arc::new(AtomicBool::new(false));
    let flag = stepped_down.clone();
    let renewal = keep_renewed(c.rt.handle(), a.clone(), held, move |_| flag.store(true, Ordering::SeqCst));
    // Three leases long, B never gets it.
    let started = Instant::now();
    while started.elapsed() < Duration::from_millis(1_800) {
        assert!(matches!(c.rt.block_on(b.claim(5, unix_ms())), Err(LeaseError::HeldBy(_))));
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(!stepped_down.load(Ordering::SeqCst));
    // Renewal stops (a stalled node): B takes the lease once it passed.
    renewal.abort();
    let (current, _) = c.rt.block_on(a.current(5)).unwrap().unwrap();
    wait_past(current.lease_until_ms + lease_settings().skew_margin.as_millis() as u64);
    let taken = c.rt.block_on(b.claim(5, unix_ms())).unwrap();
    // A renewal task that finds the lease taken steps its owner down.
    let stale = herald_cluster::Held { lease: current, ..taken.clone() };
    let stale = herald_cluster::Held { revision: taken.revision - 1, ..stale };
    let flag = stepped_down.clone();
    let renewal = keep_renewed(c.rt.handle(), a.clone(), stale, move |_| flag.store(true, Ordering::SeqCst));
    let started = Instant::now();
    while !stepped_down.load(Ordering::SeqCst) {
        assert!(started.elapsed() < Duration::from_secs(5), "not stepped down");
        std::thread::sleep(Duration::from_millis(20));
    }
    c.rt.block_on(renewal).unwrap();
}

#[test]
fn nodes_that_stop_beating_drop_out_after_the_ttl_and_the_fair_share_follows() {
    let c = cluster();
    let nodes = c.rt.block_on(Nodes::open(&c.js, 3, Duration::from_secs(1))).unwrap();
    for node in ["a", "b", "c"] {
        c.rt.block_on(nodes.beat(node, &format!("http://{node}"), unix_ms())).unwrap();
    }
    assert_eq!(c.rt.block_on(nodes.live()).unwrap(), ["a", "b", "c"]);
    assert_eq!(fair_share(16, 3), 6);
    // a and b keep beating, c stops: after the TTL only two are alive, and each takes 8.
    let started = Instant::now();
    loop {
        for node in ["a", "b"] {
            c.rt.block_on(nodes.beat(node, &format!("http://{node}"), unix_ms())).unwrap();
        }
        let live = c.rt.block_on(nodes.live()).unwrap();
        if live == ["a", "b"] {
            assert!(started.elapsed() >= Duration::from_millis(900), "c dropped before its TTL");
            break;
        }
        // The servers expire a TTL on a timer of their own, late under load (parallel tests).
        assert!(started.elapsed() < Duration::from_secs(10), "c still alive: {live:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(fair_share(16, 2), 8);
}
