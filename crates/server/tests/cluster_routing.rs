//! The cluster layer over real sockets: three in-process nodes on 127.0.0.1, each serving "its"
//! partitions with real engines (MemStore) and forwarding the rest to the others, placed by a
//! test double of the cluster (`FakeNode`, the server's `Placement`). Each node sees the API
//! keys through its own replica, caught up only by `refresh_control`, as a real node's control
//! follower would be.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::http::StatusCode;
use herald_engine::clock::SystemClock;
use herald_engine::sender::{AttemptRequest, SendFuture, SendOutcome, Sender};
use herald_engine::{get_api_key_by_hash, list_api_keys, ApiKey, Engine, EngineConfig, OrgId, Parts};
use herald_log::MemStore;
use herald_server::cluster::{cluster_router, Front, Place, Placement};
use herald_server::config::{Config, Secret};
use serde_json::json;

mod common;

use common::{call, publish};

const ADMIN: &str = "sk_cluster_routing_admin_0123456789";
const PARTITIONS: u32 = 4;
const SECRET: &str = "the-cluster-secret-of-the-tests";

struct Accepting;

impl Sender for Accepting {
    fn send(&self, _req: AttemptRequest) -> SendFuture<'_> {
        Box::pin(async { SendOutcome::Response { status: 200, excerpt: Vec::new(), retry_after_ms: None } })
    }
}

fn engine() -> Engine {
    let parts =
        Parts { store: Arc::new(MemStore::new()), clock: Arc::new(SystemClock), sender: Arc::new(Accepting) };
    Engine::open_with(EngineConfig::default(), parts).unwrap()
}

/// What every fake node shares: one engine per partition (control last), who owns each
/// (`None`: nobody), and the nodes' names and addresses.
struct World {
    engines: Vec<Engine>,
    owners: Mutex<Vec<Option<usize>>>,
    nodes: Vec<(String, String)>,
}

/// One node's view of the cluster.
struct FakeNode {
    me: usize,
    world: Arc<World>,
    /// Owners this node believes in that differ from the world's (a stale view).
    stale: Mutex<HashMap<u32, usize>>,
    /// This node's replica of the keys: only what the last refresh copied.
    replica: Mutex<HashMap<[u8; 32], ApiKey>>,
    epoch: AtomicU64,
    refreshes: AtomicU64,
    changes: tokio::sync::watch::Sender<u64>,
    /// Whether `place_fresh` reads the world (the lease afresh) rather than this node's view,
    /// and how many times it was asked.
    fresh: AtomicBool,
    fresh_reads: AtomicU64,
}

impl FakeNode {
    fn control_engine(&self) -> &Engine {
        &self.world.engines[PARTITIONS as usize]
    }

    /// Where `partition` is served when `owner` (`None`, or no such node: nobody) holds it.
    fn place_of(&self, partition: u32, owner: Option<usize>) -> Place {
        match owner.filter(|&n| n < self.world.nodes.len()) {
            Some(n) if n == self.me => Place::Local(self.world.engines[partition as usize].clone()),
            Some(n) => {
                let (node_id, advertise) = self.world.nodes[n].clone();
                Place::Remote { node_id, advertise }
            }
            None => Place::Unowned,
        }
    }
}

impl Placement for FakeNode {
    fn node_id(&self) -> &str {
        &self.world.nodes[self.me].0
    }

    fn partitions(&self) -> u32 {
        PARTITIONS
    }

    fn partition_of(&self, org: &OrgId) -> u32 {
        herald_cluster::partition::partition_of(org, PARTITIONS)
    }

    fn place(&self, partition: u32) -> Place {
        let owner = match self.stale.lock().unwrap().get(&partition) {
            Some(&n) => Some(n),
            None => self.world.owners.lock().unwrap()[partition as usize],
        };
        self.place_of(partition, owner)
    }

    fn place_fresh(&self, partition: u32) -> Place {
        if !self.fresh.load(Ordering::SeqCst) {
            return self.place(partition);
        }
        self.fresh_reads.fetch_add(1, Ordering::SeqCst);
        let owner = self.world.owners.lock().unwrap()[partition as usize];
        self.place_of(partition, owner)
    }

    fn api_key_epoch(&self) -> u64 {
        self.epoch.load(Ordering::SeqCst)
    }

    fn api_key_by_hash(&self, hash: &[u8; 32]) -> Result<Option<ApiKey>, String> {
        Ok(self.replica.lock().unwrap().get(hash).cloned())
    }

    fn refresh_control(&self) -> Result<(), String> {
        self.refreshes.fetch_add(1, Ordering::SeqCst);
        let keys = self.control_engine().read(|t| list_api_keys(t, None, 250)).map_err(|e| e.to_string())?;
        let mut replica = self.replica.lock().unwrap();
        for key in keys.items {
            let stored = self.control_engine().read(|t| get_api_key_by_hash(t, &key.key_hash));
            if let Ok(Some(k)) = stored {
                replica.insert(k.key_hash, k);
            }
        }
        self.epoch.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    fn readiness(&self) -> Result<(), String> {
        let owned = self.world.owners.lock().unwrap().iter().filter(|o| **o == Some(self.me)).count();
        match owned {
            0 => Err("owns 0 of its share".into()),
            _ => Ok(()),
        }
    }

    fn changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changes.subscribe()
    }
}

struct Cluster {
    world: Arc<World>,
    nodes: Vec<Arc<FakeNode>>,
    addrs: Vec<String>,
}

/// Three nodes; partition p owned by node p % 3, control by node 1.
async fn cluster() -> Cluster {
    let mut listeners = Vec::new();
    let mut names = Vec::new();
    for n in 0..3 {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        names.push((format!("node{n}"), format!("http://{}", listener.local_addr().unwrap())));
        listeners.push(listener);
    }
    let engines: Vec<Engine> = (0..=PARTITIONS).map(|_| engine()).collect();
    let dir = tempfile::tempdir().unwrap();
    herald_server::bootstrap_admin(&engines[PARTITIONS as usize], dir.path(), Some(ADMIN.into())).unwrap();
    let mut owners: Vec<Option<usize>> = (0..PARTITIONS).map(|p| Some(p as usize % 3)).collect();
    owners.push(Some(1));
    let world = Arc::new(World { engines, owners: Mutex::new(owners), nodes: names.clone() });
    let mut config = Config::default();
    config.cluster.cluster_secret = Secret::new(SECRET);
    config.server.request_timeout = Duration::from_secs(10);
    let mut nodes = Vec::new();
    for (me, listener) in listeners.into_iter().enumerate() {
        let node = Arc::new(FakeNode {
            me,
            world: world.clone(),
            stale: Mutex::new(HashMap::new()),
            replica: Mutex::new(HashMap::new()),
            epoch: AtomicU64::new(0),
            refreshes: AtomicU64::new(0),
            changes: tokio::sync::watch::channel(0).0,
            fresh: AtomicBool::new(false),
            fresh_reads: AtomicU64::new(0),
        });
        node.refresh_control().unwrap();
        let front = Arc::new(Front::new(node.clone(), &config));
        tokio::spawn(async move { axum::serve(listener, cluster_router(front)).await.unwrap() });
        nodes.push(node);
    }
    Cluster { world, nodes, addrs: names.into_iter().map(|(_, a)| a).collect() }
}

/// An organisation whose partition is `p`.
fn org_in(p: u32, skip: u128) -> OrgId {
    (skip..)
        .map(|n| OrgId(uuid::Uuid::from_u128(0x0190_0000_0000_7000_8000_0000_0000_0000 + n)))
        .find(|o| herald_cluster::partition::partition_of(o, PARTITIONS) == p)
        .unwrap()
}

/// A key of `org` made through node `via`.
async fn org_key(c: &Cluster, via: usize, org: OrgId) -> String {
    let scopes =
        json!(["endpoints.read", "endpoints.write", "events.write", "deliveries.read", "deliveries.write"]);
    let made = call(
        &c.addrs[via],
        "POST",
        "/v1/api_keys",
        ADMIN,
        Some(json!({"org_id": org.0.to_string(), "scopes": scopes})),
        &[],
    )
    .await;
    assert_eq!(made.status, StatusCode::CREATED, "{}", made.text());
    made.json()["key"].as_str().unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn any_node_answers_for_any_partition_and_keys_work_at_once_everywhere() {
    let c = cluster().await;
    // Partition 1 is node 1's: a key made through node 0 (control is node 1's: forwarded) and
    // used at once through node 2, whose replica has not seen it yet (one refresh, then served).
    let org = org_in(1, 0);
    let key = org_key(&c, 0, org).await;
    let before = c.nodes[2].refreshes.load(Ordering::SeqCst);
    let owner_before = c.nodes[1].refreshes.load(Ordering::SeqCst);
    let made =
        call(&c.addrs[2], "POST", "/v1/endpoints", &key, Some(json!({"url": "https://example.com/h"})), &[])
            .await;
    assert_eq!(made.status, StatusCode::CREATED, "{}", made.text());
    assert!(c.nodes[2].refreshes.load(Ordering::SeqCst) > before, "a miss caught the keys up");
    // The owner of partition 1 (node 1) had not seen the key either: its route's extractor
    // caught up once too, and served the forwarded request.
    assert!(c.nodes[1].refreshes.load(Ordering::SeqCst) > owner_before, "the owner caught up on its miss");
    let id = made.json()["id"].as_str().unwrap().to_owned();
    let stored = c.world.engines[1].endpoint(herald_engine::EndpointId(id.parse().unwrap())).unwrap();
    assert_eq!(stored.map(|e| e.org_id), Some(org), "written in the organisation's partition");

    // Published through node 0, read through each node: the same answer everywhere.
    let event = publish(&c.addrs[0], &key, "a.b").await;
    let mut seen = HashSet::new();
    for addr in &c.addrs {
        let got = call(addr, "GET", &format!("/v1/events/{event}"), &key, None, &[]).await;
        assert_eq!(got.status, StatusCode::OK);
        assert!(got.headers.contains_key("x-request-id"));
        seen.insert(got.body);
    }
    assert_eq!(seen.len(), 1, "every node answers the same");

    // An admin's request by id with no organisation finds it on its partition, from any node;
    // an unknown id is a 404 in the route's shape.
    for addr in &c.addrs {
        let got = call(addr, "GET", &format!("/v1/endpoints/{id}"), ADMIN, None, &[]).await;
        assert_eq!(got.status, StatusCode::OK, "{}", got.text());
        let missing =
            call(addr, "GET", &format!("/v1/endpoints/{}", uuid::Uuid::now_v7()), ADMIN, None, &[]).await;
        assert_eq!(
            (missing.status, missing.json()["name"].clone()),
            (StatusCode::NOT_FOUND, json!("NotFound"))
        );
        let plain = call(
            addr,
            "GET",
            &format!("/api/v4/tasks/webhook_failures/{}", uuid::Uuid::now_v7()),
            ADMIN,
            None,
            &[],
        )
        .await;
        assert_eq!(plain.status, StatusCode::NOT_FOUND);
        assert!(plain.json().get("name").is_none() && plain.json()["error"].is_string(), "seed 001's shape");
    }
    // Node routes are this node's; unknown keys are refused before anything.
    assert_eq!(call(&c.addrs[0], "GET", "/healthz", "", None, &[]).await.status, StatusCode::OK);
    assert_eq!(call(&c.addrs[0], "GET", "/readyz", "", None, &[]).await.status, StatusCode::OK);
    let refused = call(&c.addrs[0], "GET", "/v1/endpoints", "sk_nobody_0123456789", None, &[]).await;
    assert_eq!(refused.status, StatusCode::UNAUTHORIZED);
    assert_eq!(call(&c.addrs[0], "GET", "/v1/nothing", "", None, &[]).await.status, StatusCode::NOT_FOUND);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_admins_list_merges_every_partition_newest_first_with_a_working_cursor() {
    let c = cluster().await;
    let mut made = Vec::new();
    for p in 0..PARTITIONS {
        let org = org_in(p, u128::from(p) * 1000);
        for _ in 0..2 {
            let body = json!({"url": "https://example.com/h", "org_id": org.0.to_string()});
            let answer =
                call(&c.addrs[(p as usize + 1) % 3], "POST", "/v1/endpoints", ADMIN, Some(body), &[]).await;
            assert_eq!(answer.status, StatusCode::CREATED, "{}", answer.text());
            made.push(answer.json()["id"].as_str().unwrap().to_owned());
        }
    }
    // Pages of 3 through node 2: every endpoint once, newest first (ids are time-ordered).
    let (mut listed, mut cursor) = (Vec::new(), String::new());
    for _ in 0..10 {
        let path = format!("/v1/endpoints?limit=3&cursor={cursor}");
        let page = call(&c.addrs[2], "GET", &path, ADMIN, None, &[]).await;
        assert_eq!(page.status, StatusCode::OK, "{}", page.text());
        let page = page.json();
        assert!(page["data"].as_array().unwrap().len() <= 3);
        listed.extend(page["data"].as_array().unwrap().iter().map(|e| e["id"].as_str().unwrap().to_owned()));
        match page["next_cursor"].as_str() {
            Some(next) => cursor = next.to_owned(),
            None => break,
        }
    }
    let mut newest_first = made.clone();
    newest_first.sort_by(|a, b| b.cmp(a));
    assert_eq!(listed, newest_first);
    // With an organisation named, only its partition answers.
    let org = org_in(2, 2000);
    let one = call(&c.addrs[0], "GET", &format!("/v1/endpoints?org_id={}", org.0), ADMIN, None, &[]).await;
    assert_eq!(one.json()["data"].as_array().unwrap().len(), 2);
    // The deliveries list merges too (none yet: an empty page, no cursor).
    let deliveries = call(&c.addrs[1], "GET", "/v1/webhook_deliveries?limit=5", ADMIN, None, &[]).await;
    assert_eq!(deliveries.status, StatusCode::OK);
    assert_eq!(deliveries.json(), json!({"data": [], "next_cursor": null}));
    // One event per organisation (an admin naming it in the body): two deliveries each, listed
    // in pages of 3 merged by (created_at, id), newest first, each once.
    let mut made = Vec::new();
    for p in 0..PARTITIONS {
        let org = org_in(p, u128::from(p) * 1000).0.to_string();
        let body = json!({"event_type": "a.b", "payload": {}, "org_id": org});
        let published = call(&c.addrs[p as usize % 3], "POST", "/v1/events", ADMIN, Some(body), &[]).await;
        assert_eq!(published.status, StatusCode::ACCEPTED, "{}", published.text());
        let ids = published.json()["delivery_ids"].as_array().unwrap().clone();
        made.extend(ids.iter().map(|d| d.as_str().unwrap().to_owned()));
    }
    let (mut listed, mut cursor) = (Vec::<(String, String)>::new(), String::new());
    for _ in 0..10 {
        let path = format!("/v1/webhook_deliveries?limit=3&cursor={cursor}");
        let page = call(&c.addrs[0], "GET", &path, ADMIN, None, &[]).await.json();
        let data = page["data"].as_array().unwrap();
        listed.extend(
            data.iter().map(|d| (d["created_at"].as_str().unwrap().into(), d["id"].as_str().unwrap().into())),
        );
        match page["next_cursor"].as_str() {
            Some(next) => cursor = next.to_owned(),
            None => break,
        }
    }
    let mut newest_first = listed.clone();
    newest_first.sort_by(|a, b| b.cmp(a));
    assert_eq!(listed, newest_first, "newest first");
    let mut ids: Vec<String> = listed.into_iter().map(|(_, id)| id).collect();
    ids.sort();
    made.sort();
    assert_eq!(ids, made, "every delivery once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn forged_forwards_unowned_partitions_and_stale_views_are_refused_cleanly() {
    let c = cluster().await;
    let org = org_in(2, 0);
    let key = org_key(&c, 1, org).await;
    // A request claiming to be forwarded, without the nodes' MAC: 401, nothing written.
    let body = json!({"url": "https://example.com/h"});
    for auth in ["", "1:00", &format!("{}:{}", 1, "ab".repeat(32))] {
        let mut extra = vec![("x-herald-forwarded", "2")];
        if !auth.is_empty() {
            extra.push(("x-herald-forwarded-auth", auth));
        }
        let forged = call(&c.addrs[2], "POST", "/v1/endpoints", &key, Some(body.clone()), &extra).await;
        assert_eq!(forged.status, StatusCode::UNAUTHORIZED, "{auth}");
    }
    let listed = call(&c.addrs[2], "GET", "/v1/endpoints", &key, None, &[]).await;
    assert_eq!(listed.json()["data"], json!([]), "nothing was written");

    // Nobody owns partition 2: 503 "unavailable" with Retry-After, in each route's shape.
    c.world.owners.lock().unwrap()[2] = None;
    let refused = call(&c.addrs[0], "POST", "/v1/endpoints", &key, Some(body.clone()), &[]).await;
    assert_eq!(refused.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(refused.json()["name"], "unavailable");
    assert!(refused.headers.contains_key("retry-after"));
    let plain = call(&c.addrs[0], "GET", "/api/v4/tasks/webhook_failures", &key, None, &[]).await;
    assert_eq!(plain.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(plain.json().get("name").is_none() && plain.json()["error"].is_string());
    // An admin's by-id request cannot say "not found" while a partition is unowned.
    let by_id =
        call(&c.addrs[0], "GET", &format!("/v1/events/{}", uuid::Uuid::now_v7()), ADMIN, None, &[]).await;
    assert_eq!(by_id.status, StatusCode::SERVICE_UNAVAILABLE);

    // Node 0 still believes node 1 owns partition 2, which node 2 took: node 1 does not forward
    // again, it answers 503 naming the owner it knows.
    c.world.owners.lock().unwrap()[2] = Some(2);
    c.nodes[0].stale.lock().unwrap().insert(2, 1);
    let stale = call(&c.addrs[0], "POST", "/v1/endpoints", &key, Some(body.clone()), &[]).await;
    assert_eq!(stale.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(stale.json()["error"].as_str().unwrap().contains("node2"), "{}", stale.json());
    c.nodes[0].stale.lock().unwrap().clear();
    let served = call(&c.addrs[0], "POST", "/v1/endpoints", &key, Some(body), &[]).await;
    assert_eq!(served.status, StatusCode::CREATED);

    // A body over the limit is the 413 of one node; the audit log reads the partition asked for.
    let big = json!({"url": "https://example.com/h", "name": "x".repeat(70 * 1024)});
    let too_big = call(&c.addrs[1], "POST", "/v1/endpoints", &key, Some(big), &[]).await;
    assert_eq!(
        (too_big.status, too_big.json()["name"].clone()),
        (StatusCode::PAYLOAD_TOO_LARGE, json!("PayloadTooLarge"))
    );
    let audit = call(&c.addrs[0], "GET", "/v1/audit/log?partition=2", ADMIN, None, &[]).await;
    assert_eq!(audit.status, StatusCode::OK);
    assert!(audit.text().contains("EndpointCreated"));
    let control = call(&c.addrs[0], "GET", "/v1/audit/log", ADMIN, None, &[]).await;
    assert!(control.text().contains("ApiKeyCreated"));
    assert!(!control.text().contains("EndpointCreated"));
    let bad = call(&c.addrs[0], "GET", "/v1/audit/log?partition=9", ADMIN, None, &[]).await;
    assert_eq!(bad.status, StatusCode::BAD_REQUEST);
    assert!(bad.json()["error"].as_str().unwrap().starts_with("partition"));
    // This node's metrics: each partition it serves, labelled.
    let metrics = call(&c.addrs[1], "GET", "/metrics", "", None, &[]).await;
    let text = metrics.text();
    assert!(text.contains("partition=\"1\"") && text.contains("partition=\"control\""), "{text}");
    assert!(!text.contains("partition=\"2\""));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_partition_that_moved_is_routed_by_its_lease_read_afresh_and_only_then() {
    let c = cluster().await;
    let org = org_in(2, 0);
    let key = org_key(&c, 1, org).await;
    let body = json!({"url": "https://example.com/h"});
    let reads = || c.nodes[0].fresh_reads.load(Ordering::SeqCst);
    c.nodes[0].fresh.store(true, Ordering::SeqCst);
    // Served where node 0's view says: no lease read afresh.
    let served = call(&c.addrs[0], "POST", "/v1/endpoints", &key, Some(body.clone()), &[]).await;
    assert_eq!(served.status, StatusCode::CREATED, "{}", served.text());
    assert_eq!(reads(), 0, "the hot path reads no lease");

    // Node 2 handed partition 2 to node 1; node 0 still believes node 2 has it. Node 2 answers
    // that it does not serve it, node 0 reads the lease, and node 1 serves the request.
    c.world.owners.lock().unwrap()[2] = Some(1);
    c.nodes[0].stale.lock().unwrap().insert(2, 2);
    let moved = call(&c.addrs[0], "POST", "/v1/endpoints", &key, Some(body.clone()), &[]).await;
    assert_eq!(moved.status, StatusCode::CREATED, "{}", moved.text());
    assert_eq!(reads(), 1);
    assert!(!moved.headers.contains_key("x-herald-not-owner"), "the mark stays between nodes");
    // Node 0 believes nobody has it (a take-over it has not read yet): read afresh, served.
    c.nodes[0].stale.lock().unwrap().insert(2, usize::MAX);
    let unowned_here = call(&c.addrs[0], "GET", "/v1/endpoints", &key, None, &[]).await;
    assert_eq!(unowned_here.status, StatusCode::OK, "{}", unowned_here.text());
    assert_eq!(unowned_here.json()["data"].as_array().map(Vec::len), Some(2));
    assert_eq!(reads(), 2);
    // When the lease read afresh says nobody either, the 503 stands, unmarked.
    c.world.owners.lock().unwrap()[2] = None;
    let refused = call(&c.addrs[0], "POST", "/v1/endpoints", &key, Some(body), &[]).await;
    assert_eq!(refused.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(refused.json()["name"], "unavailable");
    assert!(refused.json()["error"].as_str().unwrap().contains("not served by any node"));
    assert!(!refused.headers.contains_key("x-herald-not-owner"));
    assert_eq!(reads(), 3);
}
