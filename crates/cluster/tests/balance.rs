//! Partitions spread over the live nodes through real leases and heartbeats (three NATS
//! servers): three nodes share eight partitions, a fourth joins and gets its share handed back,
//! and at no moment do two nodes hold an unexpired lease of one partition.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use herald_cluster::balance::{plan, View};
use herald_cluster::testing::NatsCluster;
use herald_cluster::{fair_share, unix_ms, Held, LeaseError, LeaseSettings, Leases, Nodes};

const PARTITIONS: u32 = 8;

struct Node {
    leases: Leases,
    held: BTreeMap<u32, Held>,
}

impl Node {
    /// One turn: beat, look, hand back, claim, renew.
    async fn turn(&mut self, nodes: &Nodes) {
        let id = self.leases.node_id().to_string();
        nodes.beat(&id, "http://x", unix_ms()).await.unwrap();
        let view = View {
            node_id: id,
            live: nodes.live().await.unwrap().len(),
            leases: self.leases.all(PARTITIONS).await.unwrap(),
            now_ms: unix_ms(),
            skew_margin_ms: self.leases.settings().skew_margin.as_millis() as u64,
        };
        let plan = plan(&view);
        for p in plan.release {
            if let Some(held) = self.held.remove(&p) {
                self.leases.release(&held).await.unwrap();
            }
        }
        for p in plan.claim {
            match self.leases.claim(p, unix_ms()).await {
                Ok(held) => {
                    self.held.insert(p, held);
                }
                Err(LeaseError::HeldBy(_) | LeaseError::Lost(_)) => {}
                Err(e) => panic!("{e}"),
            }
        }
        let mut kept = BTreeMap::new();
        for (p, held) in std::mem::take(&mut self.held) {
            if let Ok(renewed) = self.leases.renew(&held, unix_ms()).await {
                kept.insert(p, renewed);
            }
        }
        self.held = kept;
    }
}

/// No partition has two nodes holding an unexpired lease of it.
fn assert_one_holder_each(nodes: &[Node]) {
    let now = unix_ms();
    for p in 0..PARTITIONS {
        let holders: Vec<&str> = nodes
            .iter()
            .filter(|n| n.held.get(&p).is_some_and(|h| h.lease.lease_until_ms >= now))
            .map(|n| n.leases.node_id())
            .collect();
        assert!(holders.len() <= 1, "partition {p} held by {holders:?}");
    }
}

/// Turns until every partition is held and each node has its fair share, within 15 s.
async fn settle(nodes: &mut [Node], registry: &Nodes) {
    let started = Instant::now();
    loop {
        for i in 0..nodes.len() {
            nodes[i].turn(registry).await;
            assert_one_holder_each(nodes);
        }
        let share = fair_share(PARTITIONS, nodes.len()) as usize;
        let total: usize = nodes.iter().map(|n| n.held.len()).sum();
        if total == PARTITIONS as usize && nodes.iter().all(|n| (1..=share).contains(&n.held.len())) {
            return;
        }
        let counts: Vec<usize> = nodes.iter().map(|n| n.held.len()).collect();
        assert!(started.elapsed() < Duration::from_secs(15), "not settled: {counts:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitions_spread_over_the_live_nodes_and_a_joining_node_gets_its_share() {
    let nats = tokio::time::timeout(Duration::from_secs(40), NatsCluster::start(3)).await.unwrap();
    let client = async_nats::connect(nats.addrs()).await.unwrap();
    let js = async_nats::jetstream::new(client);
    let registry = Nodes::open(&js, 3, Duration::from_secs(3)).await.unwrap();
    let settings = LeaseSettings { lease: Duration::from_secs(2), skew_margin: Duration::from_millis(200) };
    let mut nodes = Vec::new();
    for id in ["a", "b", "c"] {
        let leases = Leases::open(&js, 3, id, "http://x", settings).await.unwrap();
        nodes.push(Node { leases, held: BTreeMap::new() });
    }
    settle(&mut nodes, &registry).await;
    assert!(nodes.iter().all(|n| n.held.len() <= 3), "ceil(8 / 3) each at most");
    // A fourth node joins: the others hand partitions back until each holds ceil(8 / 4) = 2.
    let leases = Leases::open(&js, 3, "d", "http://x", settings).await.unwrap();
    nodes.push(Node { leases, held: BTreeMap::new() });
    settle(&mut nodes, &registry).await;
    let counts: Vec<usize> = nodes.iter().map(|n| n.held.len()).collect();
    assert_eq!(counts, vec![2, 2, 2, 2]);
}
