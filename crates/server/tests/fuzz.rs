//! Property tests of the API's request parsing (the toolchain here is stable, so these stand in
//! for cargo fuzz): random bodies, paths, queries and headers on every route, through the real
//! router over an engine in memory. No request may get a 5xx or stop the server answering, and
//! none that is refused may write anything.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use axum::body::Body;
use axum::http::{Method, Request};
use herald_engine::clock::SystemClock;
use herald_engine::sender::{AttemptRequest, SendFuture, SendOutcome, Sender};
use herald_engine::{Engine, EngineConfig, Parts};
use herald_log::MemStore;
use herald_server::{AppState, ServerLimits};
use proptest::prelude::*;
use tower::ServiceExt;

const ADMIN: &str = "sk_fuzz_admin_key_0123456789abcdef";

/// Receivers that always answer 200 at once (nothing leaves the process).
struct Accepting;

impl Sender for Accepting {
    fn send(&self, _req: AttemptRequest) -> SendFuture<'_> {
        Box::pin(async { SendOutcome::Response { status: 200, excerpt: Vec::new(), retry_after_ms: None } })
    }
}

fn app() -> (axum::Router, Engine) {
    let parts =
        Parts { store: Arc::new(MemStore::new()), clock: Arc::new(SystemClock), sender: Arc::new(Accepting) };
    let engine = Engine::open_with(EngineConfig::default(), parts).unwrap();
    let dir = tempfile::tempdir().unwrap();
    herald_server::bootstrap_admin(&engine, dir.path(), Some(ADMIN.to_owned())).unwrap();
    let state = Arc::new(AppState {
        engine: engine.clone(),
        limits: ServerLimits::default(),
        buckets: herald_server::Buckets::new(1_000_000, 1_000_000),
        keys: Default::default(),
        metrics: Default::default(),
        ready: AtomicBool::new(true),
    });
    (herald_server::router(state), engine)
}

/// A path for one of the routes, its parameters replaced by `id`.
fn path_for(template: &str, id: &str) -> String {
    let mut out = String::new();
    for part in template.split('/') {
        if part.is_empty() {
            continue;
        }
        out.push('/');
        if part.starts_with('{') {
            out.push_str(id);
        } else {
            out.push_str(part);
        }
    }
    out
}

fn body_strategy() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..300),
        // JSON-shaped text with the fields the routes know, with wrong and right types.
        (
            proptest::sample::select(vec![
                "url",
                "name",
                "enabled_events",
                "secret",
                "org_id",
                "event_type",
                "payload",
                "call_id",
                "webhook_url",
                "scopes",
                "webhookNotificationIds",
            ]),
            proptest::sample::select(vec![
                "1",
                "null",
                "true",
                "\"x\"",
                "[]",
                "{}",
                "[\"*\"]",
                "\"https://example.com/h\"",
                "\"whsec_\"",
                "[\"01890000-0000-7000-8000-000000000000\"]",
                "\"sk_\"",
                "-1e999",
                "\"\\u0000\"",
            ]),
            proptest::sample::select(vec!["event_type", "url", "scopes", "payload"]),
            proptest::sample::select(vec![
                "\"a.b\"",
                "\"http://127.0.0.1/\"",
                "[\"admin\"]",
                "{\"k\":[1,2]}",
                "7"
            ]),
        )
            .prop_map(|(k1, v1, k2, v2)| format!("{{\"{k1}\": {v1}, \"{k2}\": {v2}}}").into_bytes()),
        Just(b"[".repeat(5000)),
        Just(b"{\"payload\":".iter().chain(b"[".repeat(20000).iter()).copied().collect()),
    ]
}

fn id_strategy() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("01890000-0000-7000-8000-000000000000".to_owned()),
        Just("0189000000007000800000000000000".to_owned()),
        Just("%00".to_owned()),
        Just("..".to_owned()),
        "[a-zA-Z0-9%._~-]{0,80}",
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    #[test]
    fn no_request_gets_a_5xx_and_refused_ones_write_nothing(
        route in 0..herald_server::ROUTES.len(),
        id in id_strategy(),
        query in "[a-z_]{0,12}=[a-zA-Z0-9%:.-]{0,30}",
        body in body_strategy(),
        admin in any::<bool>(),
        idempotency in proptest::option::of("[ -~]{0,40}"),
    ) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let (router, engine) = app();
        let (method, template) = herald_server::ROUTES[route];
        let uri = format!("{}?{query}", path_for(template, &id));
        let seq_before = engine.committed_seq();
        let mut req = Request::builder()
            .method(Method::from_bytes(method.to_uppercase().as_bytes()).unwrap())
            .uri(&uri)
            .header("content-type", "application/json");
        if admin {
            req = req.header("authorization", format!("Bearer {ADMIN}"));
        }
        if let Some(key) = &idempotency {
            req = req.header("idempotency-key", key.as_str());
        }
        let Ok(req) = req.body(Body::from(body.clone())) else { return Ok(()) };
        let response = rt.block_on(router.clone().oneshot(req)).unwrap();
        let status = response.status().as_u16();
        prop_assert!(status < 500, "{method} {uri} with {:?} answered {status}", String::from_utf8_lossy(&body));
        if status >= 400 {
            prop_assert_eq!(engine.committed_seq(), seq_before, "{} {} was refused ({}) but wrote", method, uri, status);
        }
        let health = Request::builder().uri("/healthz").body(Body::empty()).unwrap();
        prop_assert_eq!(rt.block_on(router.oneshot(health)).unwrap().status().as_u16(), 200);
        engine.shutdown();
    }
}
