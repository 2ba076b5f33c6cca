//! A store that refuses writes (a full disk): the requests of that batch get a clean 503 in
//! their route's shape, nothing is written, and herald serves again once the store heals.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use axum::body::Body;
use axum::http::Request;
use herald_engine::clock::SystemClock;
use herald_engine::sender::{AttemptRequest, SendFuture, SendOutcome, Sender};
use herald_engine::{Engine, EngineConfig, Parts};
use herald_log::{
    Durability, FailingStore, MemStore, Pair, Store, StoreError, Visit, VolatileStore, WriteBatch,
};
use herald_server::{AppState, ServerLimits};
use tower::ServiceExt;

const ADMIN: &str = "sk_faults_admin_key_0123456789abcdef";

struct Accepting;

impl Sender for Accepting {
    fn send(&self, _req: AttemptRequest) -> SendFuture<'_> {
        Box::pin(async { SendOutcome::Response { status: 200, excerpt: Vec::new(), retry_after_ms: None } })
    }
}

/// An engine over `store` with the admin key, and the server's router in front of it.
fn serve(store: Arc<dyn Store>) -> (Engine, axum::Router) {
    let parts = Parts { store, clock: Arc::new(SystemClock), sender: Arc::new(Accepting) };
    let engine = Engine::open_with(EngineConfig::default(), parts).unwrap();
    let dir = tempfile::tempdir().unwrap();
    herald_server::bootstrap_admin(&engine, dir.path(), Some(ADMIN.to_owned())).unwrap();
    let router = herald_server::router(Arc::new(AppState {
        engine: engine.clone(),
        limits: ServerLimits::default(),
        buckets: herald_server::Buckets::new(1_000, 1_000),
        keys: Default::default(),
        metrics: Default::default(),
        ready: AtomicBool::new(true),
    }));
    (engine, router)
}

async fn call(router: &axum::Router, method: &str, uri: &str, body: &str) -> (u16, serde_json::Value) {
    let req = Request::builder()
        .method(method)
        .uri(uri)
        .header("authorization", format!("Bearer {ADMIN}"))
        .header("content-type", "application/json")
        .body(Body::from(body.to_owned()))
        .unwrap();
    let response = router.clone().oneshot(req).await.unwrap();
    let status = response.status().as_u16();
    let bytes = axum::body::to_bytes(response.into_body(), 1 << 20).await.unwrap();
    (status, serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_answers_503_writes_nothing_and_resumes_by_itself() {
    // A disk under a page cache (what is not flushed is lost on a reopen), whose failed writes
    // leave half of their batch in memory, as sled's can.
    let disk = VolatileStore::new();
    let store = FailingStore::new(disk.clone(), u64::MAX).with_torn_writes();
    let (engine, router) = serve(Arc::new(store.clone()));
    let org = "0190f1f4-0000-7000-8000-0000000000f5";
    let publish = format!(r#"{{"event_type":"call.ended","payload":{{"n":1}},"org_id":"{org}"}}"#);
    let (status, body) = call(&router, "POST", "/v1/events", &publish).await;
    assert_eq!(status, 202, "{body}");
    let mut acknowledged = vec![body["id"].as_str().unwrap().to_owned()];
    let seq = engine.committed_seq();
    let pairs = disk.with_memory(|m| m.clone());

    store.fail_after(0);
    let (status, body) = call(&router, "POST", "/v1/events", &publish).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["name"], "ServiceUnavailable", "{body}");
    assert!(body["error"].as_str().unwrap().contains("nothing was written"), "{body}");
    let endpoint = format!(r#"{{"url":"https://example.com/h","org_id":"{org}"}}"#);
    let (status, _) = call(&router, "POST", "/v1/endpoints", &endpoint).await;
    assert_eq!(status, 503);
    assert_eq!(engine.committed_seq(), seq);
    assert_eq!(disk.with_memory(|m| m.clone()), pairs, "nothing partial is visible");
    // Reads still answer while writes fail, and /readyz says why it is not ready.
    let (status, _) = call(&router, "GET", &format!("/v1/webhook_deliveries?org_id={org}"), "").await;
    assert_eq!(status, 200);
    let (status, _) = call(&router, "GET", &format!("/v1/events/{}", acknowledged[0]), "").await;
    assert_eq!(status, 200);
    let (status, body) = call(&router, "GET", "/readyz", "").await;
    assert_eq!(status, 503, "{body}");
    assert!(body["status"].as_str().unwrap().starts_with("the store refuses writes: "), "{body}");

    // Space returns: herald resumes by itself, without a restart.
    store.heal();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let (status, body) = call(&router, "GET", "/readyz", "").await;
        if status == 200 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "not ready again: {body}");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let (status, body) = call(&router, "POST", "/v1/events", &publish).await;
    assert_eq!(status, 202, "{body}");
    acknowledged.push(body["id"].as_str().unwrap().to_owned());
    assert!(engine.committed_seq() > seq);
    engine.shutdown();
    // Every acknowledged event is on the disk, and it verifies: the chain, and the projection
    // equal to a rebuild of the log.
    disk.crash();
    assert_eq!(herald_log::verify(&disk, &mut |_| {}).unwrap().last_seq, engine.committed_seq());
    let stored = herald_projector::stored_projection(&disk).unwrap();
    assert_eq!(stored, herald_projector::rebuild(&disk, &mut |_| {}).unwrap().dump());
    for id in &acknowledged {
        let id = herald_projector::EventId(id.parse().unwrap());
        let found = herald_projector::CheckedTables::run(&disk, |t| herald_projector::get_event(t, id));
        assert!(matches!(found, Ok(Ok(Some(_)))), "acknowledged event {id}");
    }
}

/// A store whose reads fail while `failing` is set (sled refuses some reads after an IO error);
/// writes go through.
struct ReadsFail {
    inner: MemStore,
    failing: Arc<AtomicBool>,
}

impl ReadsFail {
    fn check(&self) -> Result<(), StoreError> {
        if self.failing.load(Ordering::SeqCst) {
            return Err(StoreError::Io("read refused".into()));
        }
        Ok(())
    }
}

impl Store for ReadsFail {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        self.check()?;
        self.inner.get(key)
    }
    fn scan(&self, from: &[u8], to: &[u8], visit: Visit<'_>) -> Result<(), StoreError> {
        self.check()?;
        self.inner.scan(from, to, visit)
    }
    fn last(&self, from: &[u8], to: &[u8]) -> Result<Option<Pair>, StoreError> {
        self.check()?;
        self.inner.last(from, to)
    }
    fn apply(&self, batch: &WriteBatch) -> Result<(), StoreError> {
        self.inner.apply(batch)
    }
    fn flush(&self, durability: Durability) -> Result<(), StoreError> {
        self.inner.flush(durability)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_the_store_refuses_answers_503_not_404_or_an_empty_page() {
    let failing = Arc::new(AtomicBool::new(false));
    let store = ReadsFail { inner: MemStore::new(), failing: failing.clone() };
    let (engine, router) = serve(Arc::new(store));
    let org = "0190f1f4-0000-7000-8000-0000000000f6";
    let endpoint = format!(r#"{{"url":"https://example.com/h","org_id":"{org}"}}"#);
    assert_eq!(call(&router, "POST", "/v1/endpoints", &endpoint).await.0, 201);
    let publish = format!(r#"{{"event_type":"call.ended","payload":{{"n":1}},"org_id":"{org}"}}"#);
    let (status, event) = call(&router, "POST", "/v1/events", &publish).await;
    assert_eq!(status, 202, "{event}");
    let event_path = format!("/v1/events/{}", event["id"].as_str().unwrap());
    let reads = [
        event_path.clone(),
        format!("/v1/endpoints?org_id={org}"),
        format!("/v1/webhook_deliveries?org_id={org}"),
        "/v1/api_keys".to_owned(),
    ];
    for path in &reads {
        let (status, body) = call(&router, "GET", path, "").await;
        assert_eq!(status, 200, "{path}: {body}");
    }

    failing.store(true, Ordering::SeqCst);
    for path in &reads {
        let (status, body) = call(&router, "GET", path, "").await;
        assert_eq!(status, 503, "{path}: {body}");
        assert_eq!(body["name"], "ServiceUnavailable", "{path}: {body}");
        assert!(body["error"].as_str().unwrap().contains("could not be read"), "{path}: {body}");
    }

    failing.store(false, Ordering::SeqCst);
    let (status, body) = call(&router, "GET", &event_path, "").await;
    assert_eq!(status, 200, "{body}");
    engine.shutdown();
}
