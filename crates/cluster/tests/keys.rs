//! API keys across nodes against real NATS (three `nats-server -js` on 127.0.0.1): once the
//! control owner's `settle_control` returns after a key's creation or revocation, every other
//! node answers the change from its replica without a refresh; a stalled node (no heartbeat)
//! stops answering keys before the owner stops waiting for it, and answers the revocation once
//! resumed; `place_fresh` finds an owner through the lease in NATS.

use std::path::Path;
use std::time::{Duration, Instant};

use herald_cluster::testing::NatsCluster;
use herald_cluster::{Node, NodeConfig, Place};
use herald_engine::{Actor, ApiKeyId, Command, EngineConfig, Scope};
use uuid::Uuid;

const PARTITIONS: u32 = 3;
const LEASE: Duration = Duration::from_millis(900);

/// One test of this file at a time (three NATS servers and three nodes each).
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn nats() -> NatsCluster {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async { tokio::time::timeout(Duration::from_secs(40), NatsCluster::start(3)).await.unwrap() })
}

fn config(nats: &NatsCluster, id: &str, dir: &Path) -> NodeConfig {
    let mut engine = EngineConfig::default();
    engine.delivery.shutdown_timeout = Duration::from_millis(300);
    NodeConfig {
        nats_url: format!("{},{}", nats.url(0), nats.url(1)),
        node_id: id.into(),
        advertise: format!("http://{id}.example:8080"),
        partitions: PARTITIONS,
        replicas: 3,
        lease: LEASE,
        data_dir: dir.join(id),
        engine,
    }
}

fn wait_until(within: Duration, what: &str, mut ok: impl FnMut() -> bool) {
    let started = Instant::now();
    while !ok() {
        assert!(started.elapsed() < within, "not {what} within {within:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn owner_engine(node: &Node) -> herald_engine::Engine {
    match node.place(node.control()) {
        Place::Local(engine) => engine,
        other => panic!("{} does not own the control partition: {other:?}", node.node_id()),
    }
}

fn create_key(owner: &Node, n: u128) -> [u8; 32] {
    let key_hash = *blake3::hash(&n.to_be_bytes()).as_bytes();
    let command = Command::CreateApiKey {
        id: ApiKeyId(Uuid::from_u128(n)),
        org_id: None,
        scopes: vec![Scope::Admin],
        name: format!("k{n}"),
        key_hash,
    };
    owner_engine(owner).execute_blocking(Actor::admin(), command).unwrap();
    key_hash
}

/// Whether `node` answers `hash` as a live key (a revoked key is found as revoked, or not at
/// all: the projection finds only live keys by hash).
fn takes(node: &Node, hash: &[u8; 32]) -> Result<bool, String> {
    Ok(node.api_key_by_hash(hash)?.is_some_and(|k| k.revoked_at_ms.is_none()))
}

fn revoke_key(owner: &Node, n: u128) {
    let command = Command::RevokeApiKey { id: ApiKeyId(Uuid::from_u128(n)) };
    owner_engine(owner).execute_blocking(Actor::admin(), command).unwrap();
}

/// Three nodes, each ready; returns them with the control owner first.
fn three(nats: &NatsCluster, dir: &Path) -> Vec<Node> {
    let mut nodes: Vec<Node> =
        ["a", "b", "c"].iter().map(|id| Node::start(config(nats, id, dir)).unwrap()).collect();
    wait_until(Duration::from_secs(60), "three nodes ready", || nodes.iter().all(|n| n.readiness().is_ok()));
    let owner = nodes.iter().position(|n| matches!(n.place(n.control()), Place::Local(_))).unwrap();
    nodes.swap(0, owner);
    nodes
}

#[test]
fn a_key_change_answered_by_the_owner_is_answered_by_every_node_without_a_refresh() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let nats = nats();
    let dir = tempfile::tempdir().unwrap();
    let nodes = three(&nats, dir.path());
    let (owner, others) = (&nodes[0], &nodes[1..]);
    for others_node in others {
        assert_eq!(others_node.settle_control(), Ok(()), "every node has what a follower has");
        assert_eq!(others_node.keys_current(), Ok(()));
    }
    let mut settles = Vec::new();
    for round in 1..=5u128 {
        let hash = create_key(owner, round);
        let started = Instant::now();
        owner.settle_control().unwrap();
        settles.push(started.elapsed());
        for node in others {
            let key = node
                .api_key_by_hash(&hash)
                .unwrap()
                .unwrap_or_else(|| panic!("{} round {round}", node.node_id()));
            assert_eq!(key.revoked_at_ms, None);
        }
        revoke_key(owner, round);
        let started = Instant::now();
        owner.settle_control().unwrap();
        settles.push(started.elapsed());
        for node in others {
            assert_eq!(takes(node, &hash), Ok(false), "{} still takes key {round}", node.node_id());
        }
    }
    settles.sort();
    eprintln!("settle after a key change: median {:?}, max {:?} (lease {LEASE:?})", settles[5], settles[9]);
    assert!(settles[9] < LEASE, "the live nodes confirmed within a lease: {settles:?}");
    // The lease of a partition another node holds, read afresh: that node.
    let p = (0..PARTITIONS).find(|&p| matches!(owner.place(p), Place::Remote { .. })).unwrap();
    let (Place::Remote { node_id, .. }, Place::Remote { node_id: fresh, .. }) =
        (owner.place(p), owner.place_fresh(p))
    else {
        panic!("partition {p} moved")
    };
    assert_eq!(node_id, fresh);
    for node in nodes {
        node.shutdown(Duration::from_secs(5));
    }
}

#[test]
fn a_stalled_node_stops_answering_keys_before_the_owner_stops_waiting_and_catches_up_when_resumed() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let nats = nats();
    let dir = tempfile::tempdir().unwrap();
    let nodes = three(&nats, dir.path());
    let (owner, stalled) = (&nodes[0], &nodes[1]);
    let hash = create_key(owner, 7);
    owner.settle_control().unwrap();
    assert_eq!(takes(stalled, &hash), Ok(true));
    stalled.stall_for_tests();
    revoke_key(owner, 7);
    let started = Instant::now();
    let settled = owner.settle_control();
    let waited = started.elapsed();
    // The stalled node reports nothing more: the owner waits until it leaves the live set
    // (one lease after its last beat), within two leases.
    assert!(waited < 2 * LEASE + Duration::from_millis(500), "waited {waited:?}: {settled:?}");
    // From then on, it never answers the key as it was: refused outright, or revoked.
    let answer = stalled.api_key_by_hash(&hash);
    assert!(answer.is_err(), "a node out of the live set answered {answer:?}");
    assert!(stalled.keys_current().is_err());
    // The other follower has it.
    assert_eq!(takes(&nodes[2], &hash), Ok(false));
    stalled.resume_for_tests();
    stalled.refresh_control().unwrap();
    assert_eq!(stalled.keys_current(), Ok(()));
    assert_eq!(takes(stalled, &hash), Ok(false));
    eprintln!("a stalled node held the owner's answer {waited:?} ({settled:?})");
    for node in nodes {
        node.shutdown(Duration::from_secs(5));
    }
}
