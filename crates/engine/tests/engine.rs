//! The engine as a whole: commands through the log, the dispatcher making signed attempts through
//! a scripted sender, on a manual clock. Each test is bounded: `settle` gives up after its timeout.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use herald_engine::clock::{Clock, ManualClock};
use herald_engine::sender::{AttemptRequest, FailureKind, SendFuture, SendOutcome, Sender};
use herald_engine::signing::{verify, Secret};
use herald_engine::{
    Actor, Command, DeliveryConfig, DeliverySettingsPatch, Engine, EngineConfig, EngineError, Parts, Reply,
};
use herald_log::{HeldStore, MemStore, Store};
use herald_projector::{
    DeliveryId, DeliveryStatus, EndpointId, EndpointStatus, EventId, OrgId, Policy, Trigger,
};
use uuid::Uuid;

const SETTLE: Duration = Duration::from_secs(10);
const T0: u64 = 1_800_000_000_000;

/// What the scripted receiver does with one request.
#[derive(Clone, Debug)]
enum Script {
    Status(u16),
    Fail,
    /// Waits this long (real time) before answering 200.
    Hold(Duration),
    /// A fault of this host: no file descriptor left for the connection.
    LocalFault,
    /// This status with a `Retry-After` of so many milliseconds (as the sender parsed it).
    RetryAfter(u16, u64),
}

/// A sender that records every request and answers by script (200 when the script is empty).
#[derive(Default)]
struct Scripted {
    requests: Mutex<Vec<AttemptRequest>>,
    script: Mutex<VecDeque<Script>>,
    active: AtomicUsize,
    active_max: AtomicUsize,
}

impl Scripted {
    fn push(&self, s: Script, times: usize) {
        let mut q = self.script.lock().unwrap();
        for _ in 0..times {
            q.push_back(s.clone());
        }
    }

    fn requests(&self) -> Vec<AttemptRequest> {
        self.requests.lock().unwrap().clone()
    }
}

impl Sender for Scripted {
    fn send(&self, req: AttemptRequest) -> SendFuture<'_> {
        Box::pin(async move {
            self.requests.lock().unwrap().push(req);
            let step = self.script.lock().unwrap().pop_front().unwrap_or(Script::Status(200));
            let now = self.active.fetch_add(1, Ordering::SeqCst) + 1;
            self.active_max.fetch_max(now, Ordering::SeqCst);
            let out = match step {
                Script::Status(status) => {
                    SendOutcome::Response { status, excerpt: b"ok".to_vec(), retry_after_ms: None }
                }
                Script::Fail => {
                    SendOutcome::Failed { kind: FailureKind::Connect, error: "connection refused".into() }
                }
                Script::Hold(d) => {
                    tokio::time::sleep(d).await;
                    SendOutcome::Response { status: 200, excerpt: Vec::new(), retry_after_ms: None }
                }
                Script::RetryAfter(status, ms) => {
                    SendOutcome::Response { status, excerpt: Vec::new(), retry_after_ms: Some(ms) }
                }
                Script::LocalFault => SendOutcome::Failed {
                    kind: FailureKind::Local,
                    error: "a fault of this host, not the receiver's: Too many open files (os error 24)"
                        .into(),
                },
            };
            self.active.fetch_sub(1, Ordering::SeqCst);
            out
        })
    }
}

struct World {
    store: Arc<MemStore>,
    clock: ManualClock,
    sender: Arc<Scripted>,
    engine: Engine,
    config: EngineConfig,
}

fn config(schedule_ms: Vec<u64>) -> EngineConfig {
    EngineConfig {
        policy: Policy { retry_schedule_ms: schedule_ms, ..Policy::default() },
        delivery: DeliveryConfig {
            max_in_flight_per_endpoint: 4,
            shutdown_timeout: Duration::from_millis(300),
            ..DeliveryConfig::default()
        },
        ..EngineConfig::default()
    }
}

impl World {
    fn new(config: EngineConfig) -> World {
        let store = Arc::new(MemStore::new());
        let clock = ManualClock::new(T0);
        let sender = Arc::new(Scripted::default());
        let engine = open(&store, &clock, &sender, &config);
        World { store, clock, sender, engine, config }
    }

    /// Drops the engine without a stop (a crash), then opens a new one on the same store.
    fn restart(&mut self) {
        let engine = open(&self.store, &self.clock, &self.sender, &self.config);
        self.engine = engine;
    }

    fn endpoint(&self, org: OrgId) -> (EndpointId, Secret) {
        create_endpoint(&self.engine, org)
    }

    /// Publishes for `org()` with an inline `webhook_url` (besides any subscribed endpoint).
    fn publish_inline(&self, webhook_url: &str) -> Vec<DeliveryId> {
        match self.engine.execute_blocking(Actor::admin(), publish_command(Some(webhook_url))) {
            Ok(Reply::Published { delivery_ids, .. }) => delivery_ids,
            other => panic!("{other:?}"),
        }
    }

    fn publish(&self, org: OrgId, payload: &[u8]) -> (EventId, Vec<DeliveryId>) {
        match self.engine.publish(org, "call.ended", payload) {
            Ok(Reply::Published { id, delivery_ids, .. }) => (id, delivery_ids),
            other => panic!("{other:?}"),
        }
    }

    fn settle(&self) {
        assert!(
            self.engine.settle(SETTLE),
            "the dispatcher did not settle: {:?}",
            self.engine.dispatch_stats()
        );
    }

    fn advance(&self, ms: u64) {
        self.clock.advance_ms(ms);
        self.settle();
    }

    fn status(&self, id: DeliveryId) -> DeliveryStatus {
        self.engine.delivery(id).unwrap().unwrap().status
    }
}

/// An endpoint of `org` subscribed to everything, with a generated secret.
fn create_endpoint(engine: &Engine, org: OrgId) -> (EndpointId, Secret) {
    let id = EndpointId(Uuid::now_v7());
    let reply = engine.execute_blocking(
        Actor::admin(),
        Command::CreateEndpoint {
            id,
            org_id: org,
            url: "https://receiver.example/hook".into(),
            name: "crm".into(),
            enabled_events: vec!["*".into()],
            secret: None,
            settings: Default::default(),
        },
    );
    match reply {
        Ok(Reply::Endpoint { secret, .. }) => (id, Secret::parse(&secret).unwrap()),
        other => panic!("{other:?}"),
    }
}

fn open(store: &Arc<MemStore>, clock: &ManualClock, sender: &Arc<Scripted>, config: &EngineConfig) -> Engine {
    let parts = Parts {
        store: store.clone() as Arc<dyn Store>,
        clock: Arc::new(clock.clone()),
        sender: sender.clone(),
    };
    Engine::open_with(config.clone(), parts).unwrap()
}

/// A publish for `org()` under a new event id, with an optional inline url.
fn publish_command(webhook_url: Option<&str>) -> Command {
    Command::Publish {
        id: EventId(Uuid::now_v7()),
        org_id: org(),
        event_type: "call.ended".into(),
        payload: b"{}".to_vec(),
        call_id: None,
        webhook_url: webhook_url.map(str::to_owned),
        idempotency_key: None,
        ordering_key: None,
    }
}

fn header<'a>(req: &'a AttemptRequest, name: &str) -> &'a str {
    req.headers
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v.as_str())
        .unwrap_or_else(|| panic!("no {name}"))
}

fn org() -> OrgId {
    OrgId(Uuid::from_u128(7))
}

/// The first attempt is handed the payload by the batch that published it; a retry, and an attempt
/// after a restart, read it back from the store. Every one sends the same bytes, signed alike.
#[test]
fn retries_and_attempts_after_a_restart_send_the_payload_read_back_from_the_store() {
    let mut w = World::new(config(vec![1_000, 1_000, 1_000]));
    let (_, secret) = w.endpoint(org());
    let payload = br#"{"call_id": 2, "note": "read back"}"#;
    w.sender.push(Script::Fail, 2);
    let (event, deliveries) = w.publish(org(), payload);
    w.settle();
    w.advance(1_100);
    assert_eq!(w.sender.requests().len(), 2);
    w.restart();
    w.advance(1_100);
    assert_eq!(w.status(deliveries[0]), DeliveryStatus::Delivered);
    let reqs = w.sender.requests();
    assert_eq!(reqs.len(), 3, "two failures and a success");
    for (n, req) in reqs.iter().enumerate() {
        assert_eq!(&req.body[..], payload, "attempt {}", n + 1);
        assert_eq!(header(req, "herald-attempt"), (n + 1).to_string());
        let ts: i64 = header(req, "webhook-timestamp").parse().unwrap();
        assert!(verify(&secret, &event.to_string(), ts, payload, header(req, "webhook-signature")));
    }
}

#[test]
fn a_published_event_is_delivered_signed_with_the_payload_as_published() {
    let w = World::new(config(vec![1_000]));
    let (endpoint, secret) = w.endpoint(org());
    let payload = br#"{"call_id": 1, "spaces":  "kept"}"#;
    let (event, deliveries) = w.publish(org(), payload);
    w.settle();
    assert_eq!(w.status(deliveries[0]), DeliveryStatus::Delivered);
    let reqs = w.sender.requests();
    assert_eq!(reqs.len(), 1);
    let req = &reqs[0];
    assert_eq!(req.url, "https://receiver.example/hook");
    assert_eq!(&req.body[..], payload);
    assert_eq!(header(req, "webhook-id"), event.to_string());
    assert_eq!(header(req, "herald-delivery-id"), deliveries[0].to_string());
    assert_eq!(header(req, "herald-event-type"), "call.ended");
    assert_eq!(header(req, "herald-attempt"), "1");
    assert_eq!(header(req, "content-type"), "application/json");
    let ts: i64 = header(req, "webhook-timestamp").parse().unwrap();
    assert_eq!(ts, (T0 / 1000) as i64);
    assert!(verify(&secret, &event.to_string(), ts, payload, header(req, "webhook-signature")));
    let attempts = w.engine.attempts(deliveries[0], 0, 10).unwrap();
    assert_eq!(attempts.len(), 1);
    assert_eq!(attempts[0].response_status, Some(200));
    assert_eq!(w.engine.endpoint(endpoint).unwrap().unwrap().status, EndpointStatus::Active);
}

#[test]
fn new_ids_are_known_new_without_a_read_from_the_store() {
    let mut w = World::new(config(vec![1_000]));
    w.endpoint(org());
    w.publish(org(), b"{}");
    w.settle();
    // After a restart the cache learns each keyspace's floor from the store once; every later
    // publish's event id and delivery id sort above it, so the writer's "is it new" reads stop
    // at the cache.
    w.restart();
    w.advance(5);
    let before = w.engine.read_cache_stats().known_absent;
    let (_, deliveries) = w.publish(org(), b"{}");
    w.advance(5);
    w.publish(org(), b"{}");
    assert!(w.engine.read_cache_stats().known_absent >= before + 4, "{:?}", w.engine.read_cache_stats());
    w.settle();
    assert_eq!(w.status(deliveries[0]), DeliveryStatus::Delivered);
}

#[test]
fn failures_follow_the_schedule_then_exhaust() {
    let w = World::new(config(vec![1_000, 10_000]));
    w.endpoint(org());
    w.sender.push(Script::Status(503), 3);
    let (_, deliveries) = w.publish(org(), b"{}");
    let d = deliveries[0];
    w.settle();
    assert_eq!(w.sender.requests().len(), 1);
    let first = w.engine.delivery(d).unwrap().unwrap();
    assert_eq!(first.status, DeliveryStatus::Pending);
    assert_eq!(first.last_error.as_deref(), Some("HTTP 503"));
    let retry = first.next_attempt_at_ms.unwrap();
    assert!((T0 + 900..=T0 + 1_100).contains(&retry), "{retry}");
    // Not yet due: nothing happens.
    w.advance(retry - T0 - 1);
    assert_eq!(w.sender.requests().len(), 1);
    w.advance(1);
    assert_eq!(w.sender.requests().len(), 2);
    assert_eq!(header(&w.sender.requests()[1], "herald-attempt"), "2");
    w.advance(11_000);
    assert_eq!(w.sender.requests().len(), 3);
    assert_eq!(w.status(d), DeliveryStatus::Exhausted);
    // Nothing more, however long we wait.
    w.advance(3_600_000);
    assert_eq!(w.sender.requests().len(), 3);
}

#[test]
fn an_inactive_endpoint_gets_no_automatic_attempt_until_a_retrigger() {
    let w = World::new(config(vec![1_000; 10]));
    let (endpoint, _) = w.endpoint(org());
    w.sender.push(Script::Fail, 5);
    let (_, deliveries) = w.publish(org(), b"{}");
    let d = deliveries[0];
    for _ in 0..5 {
        w.advance(1_100);
    }
    assert_eq!(w.sender.requests().len(), 5);
    assert_eq!(w.status(d), DeliveryStatus::Inactive);
    assert_eq!(w.engine.endpoint(endpoint).unwrap().unwrap().status, EndpointStatus::Inactive);
    // A new event for the inactive endpoint is stored inactive and never attempted.
    let (_, later) = w.publish(org(), b"{}");
    w.advance(3_600_000);
    assert_eq!(w.sender.requests().len(), 5);
    assert_eq!(w.status(later[0]), DeliveryStatus::Inactive);
    // A retrigger brings one back; its success makes the endpoint active again.
    let reply = w.engine.execute_blocking(Actor::admin(), Command::Retrigger { delivery_id: d });
    assert!(matches!(reply, Ok(Reply::Retriggered { .. })), "{reply:?}");
    w.settle();
    assert_eq!(w.sender.requests().len(), 6);
    assert_eq!(w.status(d), DeliveryStatus::Delivered);
    let attempts = w.engine.attempts(d, 0, 10).unwrap();
    assert_eq!(attempts.last().unwrap().trigger, Trigger::Manual);
    assert_eq!(w.engine.endpoint(endpoint).unwrap().unwrap().status, EndpointStatus::Active);
    assert_eq!(w.status(later[0]), DeliveryStatus::Inactive);
}

#[test]
fn in_flight_attempts_are_bounded_per_endpoint() {
    let w = World::new(config(vec![1_000]));
    w.endpoint(org());
    w.sender.push(Script::Hold(Duration::from_millis(20)), 40);
    let all: Vec<DeliveryId> = (0..40).flat_map(|_| w.publish(org(), b"{}").1).collect();
    all_delivered_with_at_most_4_in_flight(&w, &all, "one endpoint");
}

/// Settles, then checks every delivery is delivered and no more than 4 attempts (the tests'
/// `max_in_flight_per_endpoint`) were ever in flight at once to `target`.
fn all_delivered_with_at_most_4_in_flight(w: &World, all: &[DeliveryId], target: &str) {
    w.settle();
    assert!(all.iter().all(|d| w.status(*d) == DeliveryStatus::Delivered));
    let max = w.sender.active_max.load(Ordering::SeqCst);
    assert!((1..=4).contains(&max), "{max} attempts in flight to {target}");
}

#[test]
fn in_flight_attempts_to_inline_urls_are_bounded_per_origin() {
    let w = World::new(config(vec![1_000]));
    w.sender.push(Script::Hold(Duration::from_millis(20)), 40);
    // Two spellings of one origin: the bound is on where the requests go, not on the url.
    let urls = ["https://inline.example/calls/a", "https://INLINE.example:443/calls/b"];
    let all: Vec<DeliveryId> = (0..40).flat_map(|n| w.publish_inline(urls[n % 2])).collect();
    all_delivered_with_at_most_4_in_flight(&w, &all, "one origin");
}

/// A due queue far smaller than the backlog, one attempt at a time per endpoint and per origin:
/// deliveries park, overflow, are dropped and read back by refills (which bring parked ones
/// back too), and every one is still delivered, with nothing left parked.
#[test]
fn a_backlog_behind_busy_endpoints_and_origins_through_a_tiny_queue_is_all_delivered() {
    let mut cfg = config(vec![1_000]);
    cfg.delivery.max_in_flight_per_endpoint = 1;
    cfg.delivery.due_queue_capacity = 4;
    let w = World::new(cfg);
    w.endpoint(org());
    w.endpoint(org());
    w.sender.push(Script::Hold(Duration::from_millis(2)), 120);
    let mut all = Vec::new();
    for n in 0..30 {
        all.extend(w.publish_inline(&format!("https://inline{}.example/calls", n % 2)));
    }
    assert_eq!(all.len(), 90, "two endpoints and one inline url per event");
    w.settle();
    let left: Vec<_> = all.iter().filter(|d| w.status(**d) != DeliveryStatus::Delivered).collect();
    assert!(left.is_empty(), "{} not delivered: {:?}", left.len(), w.engine.dispatch_stats());
    assert_eq!(w.engine.dispatch_stats().parked, 0);
    assert_eq!(w.sender.requests().len(), 90, "each delivery attempted once");
}

#[test]
fn an_attempt_in_flight_at_a_crash_is_made_again_after_restart_with_the_same_webhook_id() {
    let mut w = World::new(config(vec![1_000]));
    w.endpoint(org());
    w.sender.push(Script::Hold(Duration::from_secs(30)), 1);
    let (event, deliveries) = w.publish(org(), b"{}");
    // Wait until the attempt is in flight, then crash.
    let deadline = std::time::Instant::now() + SETTLE;
    while w.sender.requests().is_empty() {
        assert!(std::time::Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(1));
    }
    w.restart();
    w.settle();
    let reqs = w.sender.requests();
    assert_eq!(reqs.len(), 2);
    assert_eq!(header(&reqs[0], "webhook-id"), event.to_string());
    assert_eq!(header(&reqs[1], "webhook-id"), event.to_string());
    assert_eq!(w.status(deliveries[0]), DeliveryStatus::Delivered);
}

#[test]
fn a_graceful_stop_records_attempts_cut_short_as_interrupted_not_as_failures() {
    let w = World::new(config(vec![1_000]));
    let (endpoint, _) = w.endpoint(org());
    w.sender.push(Script::Hold(Duration::from_secs(30)), 1);
    let (_, deliveries) = w.publish(org(), b"{}");
    let deadline = std::time::Instant::now() + SETTLE;
    while w.sender.requests().is_empty() {
        assert!(std::time::Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(1));
    }
    let stop_began = std::time::Instant::now();
    let report = w.engine.shutdown();
    assert!(stop_began.elapsed() < Duration::from_secs(2), "the stop outlasted its 300 ms timeout");
    assert_eq!((report.interrupted, report.unrecorded, report.finished), (1, 0, 0));
    let d = w.engine.delivery(deliveries[0]).unwrap().unwrap();
    assert_eq!(d.status, DeliveryStatus::Pending);
    assert_eq!(d.last_error, None, "an interrupted attempt is not the delivery's last failure");
    let history = w.engine.attempts(deliveries[0], 0, 10).unwrap();
    assert_eq!(history.len(), 1);
    assert_eq!(history[0].error.as_deref(), Some(herald_engine::INTERRUPTED_ERROR));
    // In the history and the count, but not a failure: no step of the schedule used (a failure
    // would be retried 1 s later), the same attempt made again at once, the endpoint's run empty.
    assert_eq!((d.attempt_count, d.attempts_since_reset), (1, 0));
    assert_eq!(d.next_attempt_at_ms, Some(w.clock.now_ms()));
    let e = w.engine.endpoint(endpoint).unwrap().unwrap();
    assert!(e.failure_run_at_ms.is_empty(), "{:?}", e.failure_run_at_ms);
    // After the stop, commands are refused cleanly.
    let refused =
        w.engine.execute_blocking(Actor::admin(), Command::EnableEndpoint { id: EndpointId(Uuid::nil()) });
    assert!(matches!(refused, Err(EngineError::Log(_))), "{refused:?}");
}

#[test]
fn after_a_rotation_both_secrets_sign_until_the_old_one_expires() {
    let w = World::new(config(vec![1_000]));
    let (endpoint, old) = w.endpoint(org());
    let rotated =
        w.engine.execute_blocking(Actor::admin(), Command::RotateSecret { id: endpoint, secret: None });
    let new = match rotated {
        Ok(Reply::Endpoint { secret, .. }) => Secret::parse(&secret).unwrap(),
        other => panic!("{other:?}"),
    };
    let (event, _) = w.publish(org(), b"{}");
    w.settle();
    let req = &w.sender.requests()[0];
    let ts: i64 = header(req, "webhook-timestamp").parse().unwrap();
    let sig = header(req, "webhook-signature");
    assert_eq!(sig.split(' ').count(), 2, "{sig}");
    assert!(verify(&new, &event.to_string(), ts, b"{}", sig));
    assert!(verify(&old, &event.to_string(), ts, b"{}", sig));
    // A day later the old secret no longer signs.
    w.clock.advance_ms(24 * 3_600_000 + 1);
    let (event, _) = w.publish(org(), b"{}");
    w.settle();
    let req = &w.sender.requests()[1];
    let ts: i64 = header(req, "webhook-timestamp").parse().unwrap();
    let sig = header(req, "webhook-signature");
    assert!(verify(&new, &event.to_string(), ts, b"{}", sig));
    assert!(!verify(&old, &event.to_string(), ts, b"{}", sig));
}

#[test]
fn a_changed_policy_is_logged_once_at_open() {
    let mut w = World::new(config(vec![1_000]));
    assert_eq!(w.engine.policy().unwrap().retry_schedule_ms, vec![1_000]);
    let seq = w.engine.committed_seq();
    w.restart();
    assert_eq!(w.engine.committed_seq(), seq, "an unchanged policy wrote a record");
    w.config.policy.retry_schedule_ms = vec![2_000, 3_000];
    w.restart();
    assert_eq!(w.engine.committed_seq(), seq + 1);
    // The fold's rules were adopted when the store was made, once.
    assert_eq!(
        herald_projector::rules(&herald_projector::StoreTables(w.store.as_ref())).unwrap(),
        herald_projector::RULES_CURRENT
    );
    assert_eq!(w.engine.policy().unwrap().retry_schedule_ms, vec![2_000, 3_000]);
}

#[test]
fn a_failing_store_refuses_cleanly_and_the_engine_recovers_when_it_heals() {
    use herald_log::FailingStore;
    let store = FailingStore::new(MemStore::new(), u64::MAX);
    let clock = ManualClock::new(T0);
    let sender = Arc::new(Scripted::default());
    let parts =
        Parts { store: Arc::new(store.clone()), clock: Arc::new(clock.clone()), sender: sender.clone() };
    let engine = Engine::open_with(config(vec![1_000]), parts).unwrap();
    let org = org();
    engine
        .execute_blocking(
            Actor::admin(),
            Command::CreateEndpoint {
                id: EndpointId(Uuid::now_v7()),
                org_id: org,
                url: "https://receiver.example/hook".into(),
                name: "crm".into(),
                enabled_events: vec!["*".into()],
                secret: None,
                settings: Default::default(),
            },
        )
        .unwrap();
    let seq = engine.committed_seq();
    let pairs_before = store.inner().with_map(|m| m.clone());

    // The disk refuses the batch: a clean error, nothing written.
    store.fail_after(0);
    let refused = engine.publish(org, "call.ended", b"{}");
    assert!(matches!(refused, Err(EngineError::Log(_))), "{refused:?}");
    assert_eq!(engine.committed_seq(), seq);
    assert_eq!(store.inner().with_map(|m| m.clone()), pairs_before, "the store is exactly as it was");
    let lag = herald_projector::projection_lag(&store).unwrap();
    assert_eq!(lag, (seq, seq), "neither records nor projection changed");

    // While the store refuses writes, every write is refused without running, with the cause.
    assert!(engine.store_refusal().is_some());
    store.heal();
    wait_resumed(&engine);

    // The batch is applied but its flush fails: not acknowledged, yet its records exist (a store
    // in memory keeps them through the reopen), so the dispatcher reloads the due index rather
    // than strand the delivery.
    store.fail_after(1);
    let unacknowledged = engine.publish(org, "call.ended", b"{}");
    assert!(matches!(unacknowledged, Err(EngineError::Log(_))), "{unacknowledged:?}");

    // Space returns: once the writer has resumed by itself, commands succeed again and every
    // delivery in the store is delivered.
    store.heal();
    wait_resumed(&engine);
    let (_, later) = match engine.publish(org, "call.ended", b"{}") {
        Ok(Reply::Published { id, delivery_ids, .. }) => (id, delivery_ids),
        other => panic!("{other:?}"),
    };
    assert!(engine.settle(SETTLE));
    assert_eq!(engine.delivery(later[0]).unwrap().unwrap().status, DeliveryStatus::Delivered);
    // The applied-but-unflushed publish is delivered too. Its delivery may be attempted twice:
    // both failed batches make the dispatcher reload the due index, and a reload that comes after
    // an attempt whose record the failing store refused finds the delivery still pending (at
    // least once), so distinct events are counted, not requests.
    let events: std::collections::BTreeSet<String> = sender
        .requests()
        .iter()
        .flat_map(|r| r.headers.iter().filter(|(k, _)| k == "webhook-id").map(|(_, v)| v.clone()))
        .collect();
    assert_eq!(events.len(), 2, "the applied-but-unflushed publish is delivered too");
    let (applied, last) = herald_projector::projection_lag(&store).unwrap();
    assert_eq!(applied, last);
    assert_eq!(herald_log::verify(&store, &mut |_| {}).unwrap().last_seq, last);
}

/// A store earlier versions wrote (format 1): an organisation's and an endpoint's whole-list
/// index keys, and every index entry one key each instead of in chunks. The engine converts it
/// when it opens: the old keys are gone, the format is this version's, the pending delivery is
/// attempted again (its due entry came through), the whole lists (the partitions merged) hold
/// every delivery once, in order, page by page, and the stored projection is what a rebuild
/// gives.
#[test]
fn opening_a_store_with_index_keys_this_version_no_longer_keeps_deletes_them() {
    use herald_projector::keys::{KS_DELIVERY_BY_ENDPOINT, KS_DELIVERY_BY_ORG, LEGACY_KEYSPACES};
    use herald_projector::{DeliveryIndex, DeliveryQuery};
    let mut w = World::new(config(vec![1_000]));
    let (endpoint, _) = w.endpoint(org());
    w.sender.push(Script::Status(500), 1);
    let published: Vec<DeliveryId> = (0..5).flat_map(|_| w.publish(org(), b"{}").1).collect();
    w.settle();
    let statuses: Vec<DeliveryStatus> = published.iter().map(|d| w.status(*d)).collect();
    assert!(statuses.contains(&DeliveryStatus::Pending) && statuses.contains(&DeliveryStatus::Delivered));

    // What the earlier versions wrote for each delivery: whole-list keys, and every index
    // entry one key each (format 1), instead of the chunks.
    let mut legacy = herald_log::WriteBatch::default();
    w.store.with_map(|m| {
        for key in m.keys().filter(|k| (0x57..=0x5A).contains(&k[0])) {
            legacy.delete(key.clone());
        }
    });
    for id in &published {
        let d = w.engine.delivery(*id).unwrap().unwrap();
        let tail = [&d.created_at_ms.to_be_bytes()[..], d.id.as_bytes()].concat();
        legacy.put([&[KS_DELIVERY_BY_ORG][..], d.org_id.as_bytes(), &tail].concat(), Vec::new());
        legacy.put([&[KS_DELIVERY_BY_ENDPOINT][..], endpoint.as_bytes(), &tail].concat(), Vec::new());
        let status = [
            DeliveryStatus::Pending,
            DeliveryStatus::Delivered,
            DeliveryStatus::Exhausted,
            DeliveryStatus::Inactive,
        ]
        .iter()
        .position(|s| *s == d.status)
        .unwrap() as u8;
        legacy.put([&[0x52][..], d.org_id.as_bytes(), &[status], &tail].concat(), Vec::new());
        legacy.put([&[0x54][..], endpoint.as_bytes(), &[status], &tail].concat(), Vec::new());
        let event_type = d.event_type.as_bytes();
        let len = (event_type.len() as u32).to_be_bytes();
        legacy.put([&[0x55][..], d.org_id.as_bytes(), &len, event_type, &tail].concat(), Vec::new());
        if let Some(at_ms) = d.next_attempt_at_ms {
            legacy.put([&[0x56][..], &at_ms.to_be_bytes(), d.id.as_bytes()].concat(), Vec::new());
        }
    }
    legacy.put(herald_log::keyspace::META_FORMAT.to_vec(), vec![1]);
    w.store.apply(&legacy).unwrap();
    w.restart();
    let left = w.store.with_map(|m| {
        m.keys().filter(|k| LEGACY_KEYSPACES.contains(&k[0]) || (0x52..=0x56).contains(&k[0])).count()
    });
    assert_eq!(left, 0, "the legacy keys are gone after the open");
    assert_eq!(
        w.store.get(herald_log::keyspace::META_FORMAT).unwrap(),
        Some(vec![herald_log::STORE_FORMAT]),
        "the store is this version's once converted"
    );
    // The pending delivery's due entry came through the conversion: it is attempted again
    // (its retry is due 1 s after the failure, plus jitter).
    w.advance(60_000);
    w.settle();
    for id in &published {
        assert_eq!(w.status(*id), DeliveryStatus::Delivered, "{id}");
    }

    for index in [DeliveryIndex::Org(org()), DeliveryIndex::Endpoint(endpoint)] {
        let mut seen = Vec::new();
        let mut after = None;
        loop {
            let page = w.engine.deliveries(&DeliveryQuery::all(index.clone()), after, 2).unwrap();
            seen.extend(page.items.iter().map(|d| d.id));
            match page.next {
                Some(next) => after = Some(next),
                None => break,
            }
        }
        // All created at the same instant of the manual clock: in id order.
        let mut expected = published.clone();
        expected.sort_by_key(|d| *d.as_bytes());
        assert_eq!(seen, expected, "{index:?}: every delivery once, in (created_at, id) order");
    }
    w.engine.shutdown();
    herald_log::verify(w.store.as_ref(), &mut |_| {}).unwrap();
    let rebuilt = herald_projector::rebuild(w.store.as_ref(), &mut |_| {}).unwrap().dump();
    assert_eq!(herald_projector::stored_projection(w.store.as_ref()).unwrap(), rebuilt);
}

/// A store whose writes wait while its gate is closed: a writer stuck behind a long queue.
/// An answered attempt waits for its record outside the total bound: with one attempt in flight
/// at a time and the writer held up (as behind a burst of publishes), the next deliveries are
/// still attempted; once the writer moves, every record lands and all are delivered.
#[test]
fn attempts_go_on_while_their_records_wait_for_the_writer() {
    let store = Arc::new(HeldStore::new(MemStore::new()));
    let sender = Arc::new(Scripted::default());
    let mut cfg = config(vec![1_000]);
    cfg.delivery.max_in_flight_total = 1;
    let parts = Parts { store: store.clone(), clock: Arc::new(ManualClock::new(T0)), sender: sender.clone() };
    let engine = Engine::open_with(cfg, parts).unwrap();
    create_endpoint(&engine, org());
    // The first attempt is held at the receiver while the other events are published.
    sender.push(Script::Hold(Duration::from_millis(300)), 1);
    let deliveries: Vec<DeliveryId> = (0..3)
        .flat_map(|_| match engine.publish(org(), "call.ended", b"{}") {
            Ok(Reply::Published { delivery_ids, .. }) => delivery_ids,
            other => panic!("{other:?}"),
        })
        .collect();
    store.hold(true);
    let deadline = std::time::Instant::now() + SETTLE;
    while sender.requests().len() < 3 {
        assert!(
            std::time::Instant::now() < deadline,
            "{} of 3 attempted while the writer is held: {:?}",
            sender.requests().len(),
            engine.dispatch_stats()
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    assert!(sender.active_max.load(Ordering::SeqCst) <= 1, "one request at a time");
    store.hold(false);
    assert!(engine.settle(SETTLE));
    for d in deliveries {
        assert_eq!(engine.delivery(d).unwrap().unwrap().status, DeliveryStatus::Delivered);
    }
    assert_eq!(sender.requests().len(), 3, "each delivery attempted once");
}

/// A stalled disk does not hold the stop past its timeout: the writer, stuck in a write, is left
/// to finish in the background, and nothing it had not made durable was acknowledged.
#[test]
fn the_stop_keeps_to_its_timeout_when_the_disk_stalls() {
    let store = Arc::new(HeldStore::new(MemStore::new()));
    let parts = Parts {
        store: store.clone(),
        clock: Arc::new(ManualClock::new(T0)),
        sender: Arc::new(Scripted::default()),
    };
    let engine = Engine::open_with(config(vec![1_000]), parts).unwrap();
    store.hold(true);
    let (answered_tx, answered) = std::sync::mpsc::channel();
    for _ in 0..3 {
        let answered_tx = answered_tx.clone();
        engine.submit_with(Actor::admin(), publish_command(None), move |reply| {
            let _ = answered_tx.send(format!("{reply:?}"));
        });
    }
    let began = std::time::Instant::now();
    engine.shutdown();
    let took = began.elapsed();
    // 300 ms of shutdown timeout and 100 ms of grace for the writer.
    assert!(took < Duration::from_millis(1_500), "the stop took {took:?} over a stalled disk");
    assert!(answered.try_recv().is_err(), "a publish was answered while its write was stuck");
    // Closed for good: refused at once, not queued behind the stuck writer.
    let refused = engine.execute_blocking(Actor::admin(), publish_command(None));
    assert!(matches!(refused, Err(EngineError::Log(_))), "{refused:?}");
    // Dropping the engine does not wait for the stuck writer either.
    let began = std::time::Instant::now();
    drop(engine);
    assert!(began.elapsed() < Duration::from_secs(1), "the drop waited for the stalled disk");
    // The disk comes back: the writer left behind finishes, and no one waits for it.
    store.hold(false);
}

/// Publishes made while the writer is busy wait in its queue and are written and flushed
/// together: each caller is answered once its event is durable, not after a flush of its own.
#[test]
fn concurrent_publishes_share_one_batch_and_one_flush() {
    const PUBLISHERS: usize = 32;
    let store = Arc::new(HeldStore::new(MemStore::new()));
    let parts = Parts {
        store: store.clone(),
        clock: Arc::new(ManualClock::new(T0)),
        sender: Arc::new(Scripted::default()),
    };
    // No endpoint: no deliveries, so no attempt records join the writer's count.
    let engine = Engine::open_with(config(vec![1_000]), parts).unwrap();
    let before = engine.writer_stats();
    // The writer is held in its next apply: the first publish's batch, which takes it there.
    store.hold(true);
    let answered = AtomicUsize::new(0);
    std::thread::scope(|scope| {
        for _ in 0..PUBLISHERS {
            scope.spawn(|| {
                let reply = engine.publish(org(), "call.ended", b"{}");
                assert!(matches!(reply, Ok(Reply::Published { .. })), "{reply:?}");
                answered.fetch_add(1, Ordering::SeqCst);
            });
        }
        // Every publisher has submitted (or is about to) while the writer is held.
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(answered.load(Ordering::SeqCst), 0, "answered before its batch was written");
        store.hold(false);
    });
    let after = engine.writer_stats();
    let batches = after.batches - before.batches;
    assert_eq!(after.commands - before.commands, PUBLISHERS as u64);
    assert!(batches <= 3, "{PUBLISHERS} publishes took {batches} batches (and as many flushes)");
    engine.shutdown();
}

/// A read of several parts that a batch overtakes is made again: a delivery that moves from a
/// part not yet read into one already read (a redeliver: delivered → pending) is not missed.
#[test]
fn a_consistent_read_is_made_again_when_a_batch_lands_during_it() {
    use herald_projector::{list_deliveries, DeliveryIndex, DeliveryQuery};
    let w = World::new(config(vec![1_000]));
    w.endpoint(org());
    let (_, deliveries) = w.publish(org(), b"{}");
    w.settle();
    let d = deliveries[0];
    assert_eq!(w.status(d), DeliveryStatus::Delivered);
    // The redelivered attempt is held, so the delivery stays pending while the test reads.
    w.sender.push(Script::Hold(Duration::from_secs(5)), 1);
    let calls = AtomicUsize::new(0);
    let part = |t: &herald_projector::CheckedTables<'_>, status| {
        let query = DeliveryQuery::all(DeliveryIndex::OrgStatus(org(), status));
        list_deliveries(t, &query, None, 10).unwrap().items.into_iter().map(|d| d.id).collect::<Vec<_>>()
    };
    let seen = w.engine.consistent_read(|t| {
        let pending = part(t, DeliveryStatus::Pending);
        if calls.fetch_add(1, Ordering::SeqCst) == 0 {
            // A batch lands between the reads of the two parts.
            w.engine.execute_blocking(Actor::admin(), Command::Redeliver { delivery_id: d }).unwrap();
        }
        let delivered = part(t, DeliveryStatus::Delivered);
        Ok([pending, delivered].concat())
    });
    let seen = seen.unwrap();
    assert_eq!(calls.load(Ordering::SeqCst), 2, "read again once");
    assert_eq!(seen, vec![d], "found once, in one state of the store");
}

#[test]
fn a_store_under_the_first_rules_adopts_the_current_ones_at_open_and_still_rebuilds_equal() {
    use herald_projector::{AttemptOutcome as Outcome, Event, Projector, RULES_CURRENT};
    let store = Arc::new(MemStore::new());
    let (endpoint, event, delivery) =
        (EndpointId(Uuid::now_v7()), EventId(Uuid::now_v7()), DeliveryId(Uuid::now_v7()));
    let (old_url, new_url) = ("https://old.example/hook", "https://new.example/hook");
    // What an earlier version left: a history under the first rules. The endpoint moved, then an
    // attempt failed: under rules 1 the delivery keeps the url it was made with.
    {
        let log =
            herald_log::Log::open(store.clone() as Arc<dyn Store>, Projector, Default::default()).unwrap();
        let events = vec![
            (
                T0,
                Event::EndpointCreated {
                    id: endpoint,
                    org_id: org(),
                    url: old_url.into(),
                    name: "crm".into(),
                    enabled_events: vec!["*".into()],
                    secret: Secret::generate().unwrap().to_whsec(),
                },
            ),
            (
                T0,
                Event::EventPublished {
                    id: event,
                    org_id: org(),
                    event_type: "call.ended".into(),
                    payload: b"{}".to_vec(),
                    call_id: None,
                    idempotency_key: None,
                },
            ),
            (
                T0,
                Event::DeliveryCreated {
                    id: delivery,
                    event_id: event,
                    org_id: org(),
                    endpoint_id: Some(endpoint),
                    url: old_url.into(),
                    next_attempt_at_ms: T0,
                },
            ),
            (
                T0,
                Event::EndpointUpdated {
                    id: endpoint,
                    url: Some(new_url.into()),
                    name: None,
                    enabled_events: None,
                },
            ),
            (
                T0,
                Event::AttemptRecorded {
                    delivery_id: delivery,
                    attempt: 1,
                    trigger: Trigger::Auto,
                    started_at_ms: T0,
                    finished_at_ms: T0,
                    outcome: Outcome::Failed { status: Some(503), error: "HTTP 503".into() },
                    response_excerpt: Vec::new(),
                    retry_at_ms: Some(T0 + 1_000),
                },
            ),
        ];
        log.submit(events).unwrap().unwrap();
        log.close();
    }
    let rules = |store: &MemStore| herald_projector::rules(&herald_projector::StoreTables(store)).unwrap();
    assert_eq!(rules(&store), 1);
    let url = |w: &World| w.engine.delivery(delivery).unwrap().unwrap().url;

    let (clock, sender) = (ManualClock::new(T0), Arc::new(Scripted::default()));
    let config = config(vec![1_000]);
    let w = World { engine: open(&store, &clock, &sender, &config), store, clock, sender, config };
    assert_eq!(rules(&w.store), RULES_CURRENT, "adopted at open");
    assert_eq!(url(&w), old_url, "what was folded under rules 1 stays");
    // The retry, recorded under the current rules, went to the endpoint's url and says so.
    w.advance(1_000);
    assert_eq!(w.status(delivery), DeliveryStatus::Delivered);
    assert_eq!(url(&w), new_url);
    assert_eq!(w.sender.requests().last().map(|r| r.url.clone()), Some(new_url.to_owned()));

    w.engine.shutdown();
    herald_log::verify(w.store.as_ref(), &mut |_| {}).unwrap();
    let rebuilt = herald_projector::rebuild(w.store.as_ref(), &mut |_| {}).unwrap().dump();
    assert_eq!(herald_projector::stored_projection(w.store.as_ref()).unwrap(), rebuilt);
}

#[test]
fn a_store_under_newer_rules_than_this_code_knows_is_refused_without_a_write() {
    let store = Arc::new(MemStore::new());
    let mut b = herald_log::WriteBatch::default();
    b.put(herald_log::keyspace::META_FORMAT.to_vec(), vec![herald_log::STORE_FORMAT]);
    b.put(
        herald_projector::keys::META_RULES.to_vec(),
        (herald_projector::RULES_CURRENT + 1).to_be_bytes().to_vec(),
    );
    store.apply(&b).unwrap();
    let before = store.with_map(|m| m.clone());
    let parts = Parts {
        store: store.clone() as Arc<dyn Store>,
        clock: Arc::new(ManualClock::new(T0)),
        sender: Arc::new(Scripted::default()),
    };
    match Engine::open_with(config(vec![1_000]), parts) {
        Err(EngineError::Open(message)) => assert!(message.contains("newer than this binary"), "{message}"),
        Err(e) => panic!("{e}"),
        Ok(_) => panic!("opened a store under newer rules"),
    }
    assert_eq!(store.with_map(|m| m.clone()), before);
}

/// A store whose reads of one keyspace fail while `failing` is set (sled after an IO error).
struct KeyspaceReadsFail {
    inner: MemStore,
    keyspace: u8,
    failing: std::sync::atomic::AtomicBool,
}

impl KeyspaceReadsFail {
    fn new(keyspace: u8) -> Arc<KeyspaceReadsFail> {
        Arc::new(KeyspaceReadsFail { inner: MemStore::new(), keyspace, failing: Default::default() })
    }

    fn check(&self, key: &[u8]) -> Result<(), herald_log::StoreError> {
        if self.failing.load(Ordering::SeqCst) && key.first() == Some(&self.keyspace) {
            return Err(herald_log::StoreError::Io("read refused".into()));
        }
        Ok(())
    }
}

impl Store for KeyspaceReadsFail {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, herald_log::StoreError> {
        self.check(key)?;
        self.inner.get(key)
    }
    fn scan(
        &self,
        from: &[u8],
        to: &[u8],
        visit: herald_log::Visit<'_>,
    ) -> Result<(), herald_log::StoreError> {
        self.check(from)?;
        self.inner.scan(from, to, visit)
    }
    fn last(&self, from: &[u8], to: &[u8]) -> Result<Option<herald_log::Pair>, herald_log::StoreError> {
        self.check(from)?;
        self.inner.last(from, to)
    }
    fn apply(&self, batch: &herald_log::WriteBatch) -> Result<(), herald_log::StoreError> {
        self.inner.apply(batch)
    }
    fn flush(&self, durability: herald_log::Durability) -> Result<(), herald_log::StoreError> {
        self.inner.flush(durability)
    }
}

/// An engine over `store` with the retry schedule `schedule_ms`.
fn open_over(
    store: &Arc<KeyspaceReadsFail>,
    clock: &ManualClock,
    sender: &Arc<Scripted>,
    schedule_ms: Vec<u64>,
) -> Engine {
    let parts = Parts {
        store: store.clone() as Arc<dyn Store>,
        clock: Arc::new(clock.clone()),
        sender: sender.clone(),
    };
    Engine::open_with(config(schedule_ms), parts).unwrap()
}

/// One endpoint and one delivery to it, whose first attempt the receiver fails (its retry is
/// due about 1 s later and reads the event back from the store).
fn failed_once(engine: &Engine, sender: &Scripted) -> DeliveryId {
    create_endpoint(engine, org());
    sender.push(Script::Status(500), 1);
    let Ok(Reply::Published { delivery_ids, .. }) = engine.publish(org(), "call.ended", b"{}") else {
        panic!()
    };
    assert!(engine.settle(SETTLE), "{:?}", engine.dispatch_stats());
    let d = engine.delivery(delivery_ids[0]).unwrap().unwrap();
    assert_eq!((d.status, d.attempt_count), (DeliveryStatus::Pending, 1));
    d.id
}

#[test]
fn an_attempt_whose_reads_the_store_fails_is_not_recorded_as_a_failure_and_is_made_again() {
    let store = KeyspaceReadsFail::new(herald_projector::keys::KS_EVENT);
    let (clock, sender) = (ManualClock::new(T0), Arc::new(Scripted::default()));
    let engine = open_over(&store, &clock, &sender, vec![1_000, 1_000]);
    let settle = || assert!(engine.settle(SETTLE), "{:?}", engine.dispatch_stats());
    let id = failed_once(&engine, &sender);

    // The retry's read of the event fails: nothing is sent and nothing is recorded.
    store.failing.store(true, Ordering::SeqCst);
    clock.advance_ms(1_500); // the schedule's 1 s, and its jitter
    settle();
    assert_eq!(sender.requests().len(), 1, "sent without its payload");
    let d = engine.delivery(id).unwrap().unwrap();
    assert_eq!((d.status, d.attempt_count), (DeliveryStatus::Pending, 1), "{d:?}");
    assert_eq!(engine.dispatch_stats().attempts_unrecorded, 1, "{:?}", engine.dispatch_stats());

    // Once the store reads again, it is made shortly after.
    store.failing.store(false, Ordering::SeqCst);
    clock.advance_ms(1_500);
    settle();
    let d = engine.delivery(id).unwrap().unwrap();
    assert_eq!((d.status, d.attempt_count), (DeliveryStatus::Delivered, 2), "{d:?}");
    assert_eq!(sender.requests().len(), 2);
    engine.shutdown();
}

#[test]
fn a_refill_the_store_fails_is_made_again_once_it_reads() {
    let store = KeyspaceReadsFail::new(herald_projector::keys::KS_CHUNKS_DUE);
    let (clock, sender) = (ManualClock::new(T0), Arc::new(Scripted::default()));
    let open = || open_over(&store, &clock, &sender, vec![1_000]);
    let engine = open();
    let id = failed_once(&engine, &sender);
    engine.shutdown();

    // A restart loads the due index into the queue; the store fails that read.
    store.failing.store(true, Ordering::SeqCst);
    let engine = open();
    clock.advance_ms(1_500);
    let deadline = std::time::Instant::now() + SETTLE;
    while !engine.dispatch_stats().refill_pending {
        assert!(std::time::Instant::now() < deadline, "{:?}", engine.dispatch_stats());
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(sender.requests().len(), 1);

    // It reads again: the retry is found and made.
    store.failing.store(false, Ordering::SeqCst);
    clock.advance_ms(1_000);
    assert!(engine.settle(SETTLE), "{:?}", engine.dispatch_stats());
    let d = engine.delivery(id).unwrap().unwrap();
    assert_eq!((d.status, d.attempt_count), (DeliveryStatus::Delivered, 2), "{d:?}");
    engine.shutdown();
}

/// Waits (bounded) until the log's writer has resumed after the store refused a write.
fn wait_resumed(engine: &Engine) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while let Some(refusal) = engine.store_refusal() {
        assert!(std::time::Instant::now() < deadline, "the writer did not resume: {refusal}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn faults_of_this_host_never_count_against_the_receiver_and_the_deliveries_arrive_once_they_clear() {
    let w = World::new(config(vec![10, 10]));
    let (endpoint, _) = w.endpoint(org());
    // Far more faults than the failure run that makes an endpoint inactive, and than the schedule.
    let faults = 3 * w.config.policy.failures_max as usize + 10;
    w.sender.push(Script::LocalFault, faults);
    let deliveries: Vec<DeliveryId> =
        (0..3).flat_map(|i| w.publish(org(), format!("{{\"n\":{i}}}").as_bytes()).1).collect();
    let mut rounds = 0;
    while !w.sender.script.lock().unwrap().is_empty() {
        rounds += 1;
        assert!(rounds < 10 * faults, "the faulty attempts were not made again");
        w.settle();
        assert_eq!(w.engine.endpoint(endpoint).unwrap().unwrap().status, EndpointStatus::Active);
        for id in &deliveries {
            let d = w.engine.delivery(*id).unwrap().unwrap();
            assert_eq!((d.status, d.attempt_count), (DeliveryStatus::Pending, 0), "{d:?}");
        }
        w.advance(1_000);
    }
    // The fault cleared: the attempts put off by the last ones are made.
    w.advance(1_000);
    for id in &deliveries {
        let d = w.engine.delivery(*id).unwrap().unwrap();
        assert_eq!((d.status, d.attempt_count), (DeliveryStatus::Delivered, 1), "{d:?}");
    }
    let endpoint = w.engine.endpoint(endpoint).unwrap().unwrap();
    assert_eq!(endpoint.status, EndpointStatus::Active);
    let stats = w.engine.dispatch_stats();
    assert_eq!((stats.attempts_local_faults, stats.attempts_failed), (faults as u64, 0), "{stats:?}");
}

/// An endpoint of `org()` with these delivery settings.
fn endpoint_with(w: &World, settings: DeliverySettingsPatch) -> EndpointId {
    let id = EndpointId(Uuid::now_v7());
    let command = Command::CreateEndpoint {
        id,
        org_id: org(),
        url: "https://receiver.example/hook".into(),
        name: "throttled".into(),
        enabled_events: vec!["*".into()],
        secret: None,
        settings,
    };
    w.engine.execute_blocking(Actor::admin(), command).unwrap();
    id
}

fn patch(w: &World, id: EndpointId, settings: DeliverySettingsPatch) {
    let command = Command::UpdateEndpoint { id, url: None, name: None, enabled_events: None, settings };
    w.engine.execute_blocking(Actor::admin(), command).unwrap();
}

fn publish_n(w: &World, n: usize) -> Vec<DeliveryId> {
    (0..n).flat_map(|_| w.publish(org(), b"{}").1).collect()
}

/// A rate limit of 5/s: the burst of 5 goes at once, then one every 200 ms. The deliveries that
/// wait stay pending with no attempt recorded (waiting uses no step of the schedule).
#[test]
fn a_rate_limited_endpoint_starts_its_burst_then_one_attempt_per_token() {
    let w = World::new(config(vec![1_000]));
    endpoint_with(&w, DeliverySettingsPatch { rate_limit_per_s: Some(Some(5)), ..Default::default() });
    let all = publish_n(&w, 12);
    w.settle();
    assert_eq!(w.sender.requests().len(), 5, "the burst");
    let waiting: Vec<_> = all.iter().filter(|d| w.status(**d) == DeliveryStatus::Pending).collect();
    assert_eq!(waiting.len(), 7);
    assert!(waiting.iter().all(|d| w.engine.attempts(**d, 0, 10).unwrap().is_empty()), "nothing recorded");
    assert_eq!(w.engine.dispatch_stats().throttled, 7);
    w.advance(199);
    assert_eq!(w.sender.requests().len(), 5, "no token yet");
    w.advance(1);
    assert_eq!(w.sender.requests().len(), 6);
    w.advance(1_000);
    assert_eq!(w.sender.requests().len(), 11, "five a second");
    w.advance(200);
    assert_eq!(w.sender.requests().len(), 12);
    for d in &all {
        assert_eq!(w.status(*d), DeliveryStatus::Delivered);
        assert_eq!(w.engine.attempts(*d, 0, 10).unwrap().len(), 1, "one attempt each");
    }
    assert_eq!(w.engine.dispatch_stats().throttled, 0);
}

/// An endpoint's `max_in_flight` replaces the configured bound (4 here), below or above it.
#[test]
fn an_endpoint_max_in_flight_replaces_the_configured_bound() {
    for n in [2usize, 6] {
        let w = World::new(config(vec![1_000]));
        let max_in_flight = Some(Some(n as u32));
        endpoint_with(&w, DeliverySettingsPatch { max_in_flight, ..Default::default() });
        w.sender.push(Script::Hold(Duration::from_millis(30)), 30);
        let all = publish_n(&w, 30);
        w.settle();
        assert!(all.iter().all(|d| w.status(*d) == DeliveryStatus::Delivered));
        assert_eq!(w.sender.active_max.load(Ordering::SeqCst), n, "in flight at once, at most and reached");
    }
}

/// Each attempt carries the endpoint's extra headers, herald's own after them; a changed setting
/// applies from the next attempt (the dispatcher's cache hears of the change).
#[test]
fn attempts_carry_the_endpoint_headers_and_a_change_applies_to_the_next_attempt() {
    let w = World::new(config(vec![1_000]));
    let headers =
        Some(vec![("x-tenant".to_owned(), "a".to_owned()), ("X-Region".to_owned(), "eu".to_owned())]);
    let id = endpoint_with(&w, DeliverySettingsPatch { headers, ..Default::default() });
    publish_n(&w, 1);
    w.settle();
    let req = &w.sender.requests()[0];
    assert_eq!((header(req, "x-tenant"), header(req, "X-Region")), ("a", "eu"));
    let names: Vec<&str> = req.headers.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names[..3], ["X-Region", "x-tenant", "content-type"], "extra headers first");
    patch(
        &w,
        id,
        DeliverySettingsPatch { headers: Some(vec![("x-tenant".into(), "b".into())]), ..Default::default() },
    );
    publish_n(&w, 1);
    w.settle();
    let req = &w.sender.requests()[1];
    assert_eq!(header(req, "x-tenant"), "b");
    assert!(!req.headers.iter().any(|(n, _)| n == "X-Region"));
}

/// Lifting a rate limit lets what it held go at once; deleting a throttled endpoint drops what
/// the dispatcher held for it (its deliveries are inactive).
#[test]
fn a_lifted_limit_releases_what_it_held_and_a_deleted_endpoint_is_forgotten() {
    let w = World::new(config(vec![1_000]));
    let limited = DeliverySettingsPatch { rate_limit_per_s: Some(Some(1)), ..Default::default() };
    let id = endpoint_with(&w, limited.clone());
    let all = publish_n(&w, 4);
    w.settle();
    assert_eq!(w.sender.requests().len(), 1);
    patch(&w, id, DeliverySettingsPatch { rate_limit_per_s: Some(None), ..Default::default() });
    w.settle();
    assert_eq!(w.sender.requests().len(), 4, "no limit any more: the three held go now");
    assert!(all.iter().all(|d| w.status(*d) == DeliveryStatus::Delivered));
    patch(&w, id, limited);
    let held = publish_n(&w, 3);
    w.settle();
    assert_eq!(w.engine.dispatch_stats().throttled, 2);
    w.engine.execute_blocking(Actor::admin(), Command::DeleteEndpoint { id }).unwrap();
    w.advance(5_000);
    assert_eq!(w.engine.dispatch_stats().throttled, 0);
    assert_eq!(w.sender.requests().len(), 5);
    assert_eq!(held.iter().filter(|d| w.status(**d) == DeliveryStatus::Inactive).count(), 2);
}

/// A 429 with `Retry-After` pauses the endpoint's automatic attempts (the attempt that got it is a
/// failure as before), at most the schedule's longest step; a retrigger still goes; another
/// endpoint is not paused.
#[test]
fn a_retry_after_pauses_the_endpoint_automatic_attempts_but_not_manual_ones() {
    let w = World::new(config(vec![10_000]));
    let (paused, _) = w.endpoint(org());
    w.sender.push(Script::Status(500), 2);
    let (_, first) = w.publish(org(), b"{}");
    w.settle();
    w.advance(12_000);
    assert_eq!(w.status(first[0]), DeliveryStatus::Exhausted);
    w.sender.push(Script::RetryAfter(429, 3_000), 1);
    let (_, second) = w.publish(org(), b"{}");
    w.settle();
    let attempts = w.engine.attempts(second[0], 0, 10).unwrap();
    assert_eq!(attempts.len(), 1);
    assert_eq!(attempts[0].response_status, Some(429), "a failure as before");
    let (_, third) = w.publish(org(), b"{}");
    w.settle();
    assert_eq!(w.sender.requests().len(), 3, "the third waits for the pause");
    assert_eq!(w.status(third[0]), DeliveryStatus::Pending);
    assert!(w.engine.attempts(third[0], 0, 10).unwrap().is_empty());
    let reply = w.engine.execute_blocking(Actor::admin(), Command::Retrigger { delivery_id: first[0] });
    assert!(matches!(reply, Ok(Reply::Retriggered { .. })), "{reply:?}");
    w.settle();
    assert_eq!(w.status(first[0]), DeliveryStatus::Delivered, "a manual attempt is not paused");
    w.advance(2_900);
    assert_eq!(w.status(third[0]), DeliveryStatus::Pending);
    w.advance(100);
    assert_eq!(w.status(third[0]), DeliveryStatus::Delivered, "the pause is over");
    // A Retry-After longer than the longest step (10 s) pauses for that step only.
    w.sender.push(Script::RetryAfter(503, 60_000), 1);
    let (_, fourth) = w.publish(org(), b"{}");
    w.settle();
    let (_, fifth) = w.publish(org(), b"{}");
    w.settle();
    w.advance(9_000);
    assert_eq!(w.status(fifth[0]), DeliveryStatus::Pending);
    w.advance(1_000);
    assert_eq!(w.status(fifth[0]), DeliveryStatus::Delivered);
    assert_eq!(w.engine.endpoint(paused).unwrap().unwrap().status, EndpointStatus::Active);
    let _ = fourth;
}

/// A backlog held for one endpoint's rate does not hold up another endpoint of the same events.
#[test]
fn a_rate_limited_backlog_does_not_starve_another_endpoint() {
    let w = World::new(config(vec![1_000]));
    endpoint_with(&w, DeliverySettingsPatch { rate_limit_per_s: Some(Some(1)), ..Default::default() });
    w.endpoint(org());
    let all = publish_n(&w, 50);
    w.settle();
    assert_eq!(all.len(), 100, "each event to both endpoints");
    let delivered = all.iter().filter(|d| w.status(**d) == DeliveryStatus::Delivered).count();
    assert_eq!(delivered, 51, "all 50 of the open endpoint, the burst of 1 of the limited one");
    assert_eq!(w.engine.dispatch_stats().throttled, 49);
    assert_eq!(w.sender.requests().len(), 51, "a held delivery is not attempted");
}

/// A publish for `org()` with ordering key `key`.
fn publish_keyed(engine: &Engine, key: Option<&str>) -> (EventId, DeliveryId) {
    let mut command = publish_command(None);
    if let Command::Publish { ordering_key, .. } = &mut command {
        *ordering_key = key.map(str::to_owned);
    }
    match engine.execute_blocking(Actor::admin(), command) {
        Ok(Reply::Published { id, delivery_ids, .. }) => (id, delivery_ids[0]),
        other => panic!("{other:?}"),
    }
}

/// API.md "Ordering key": with `ordering: per_key`, the second delivery of a key waits (not
/// attempted, nothing recorded) while the first is pending, however long its retry is, and goes
/// as soon as the first leaves pending; another key and no key are not held; a retrigger of the
/// first makes a later one wait again.
#[test]
fn a_per_key_endpoint_holds_a_key_behind_its_pending_head() {
    let w = World::new(config(vec![10 * 3_600_000]));
    let (endpoint, _) = w.endpoint(org());
    let settings = DeliverySettingsPatch {
        ordering: Some(herald_projector::DeliveryOrder::PerKey),
        ..Default::default()
    };
    let patch =
        Command::UpdateEndpoint { id: endpoint, url: None, name: None, enabled_events: None, settings };
    w.engine.execute_blocking(Actor::admin(), patch).unwrap();
    w.sender.push(Script::Status(500), 1);
    let (event_a, a) = publish_keyed(&w.engine, Some("call-1"));
    w.settle();
    assert_eq!(w.engine.ordering_key(event_a, None).unwrap().as_deref(), Some("call-1"));
    let (_, b) = publish_keyed(&w.engine, Some("call-1"));
    let (_, other) = publish_keyed(&w.engine, Some("call-2"));
    let (_, none) = publish_keyed(&w.engine, None);
    w.settle();
    let attempted = |id: DeliveryId| {
        w.sender.requests().iter().filter(|r| header(r, "herald-delivery-id") == id.to_string()).count()
    };
    assert_eq!((attempted(a), attempted(b), attempted(other), attempted(none)), (1, 0, 1, 1));
    assert_eq!(w.status(b), DeliveryStatus::Pending);
    let waits = w.engine.dispatch_stats().order_waits;
    assert!(waits >= 1, "b was set aside");
    // Time passes, short of a's retry 10 h away: b is not looked at again and again.
    w.advance(60_000);
    w.advance(60_000);
    assert_eq!(w.engine.dispatch_stats().order_waits, waits, "a waiting delivery does not spin");
    assert_eq!(attempted(b), 0);

    // a's retry succeeds: b goes at once, without waiting for a clock tick.
    w.advance(11 * 3_600_000);
    assert_eq!((attempted(a), attempted(b)), (2, 1));
    assert_eq!((w.status(a), w.status(b)), (DeliveryStatus::Delivered, DeliveryStatus::Delivered));

    // A redeliver of a puts it first again: a later pending one waits behind it.
    let (_, c) = {
        w.sender.push(Script::Status(500), 1);
        w.engine.execute_blocking(Actor::admin(), Command::Redeliver { delivery_id: a }).unwrap();
        w.settle();
        publish_keyed(&w.engine, Some("call-1"))
    };
    w.settle();
    assert_eq!((w.status(a), attempted(c)), (DeliveryStatus::Pending, 0));
}
