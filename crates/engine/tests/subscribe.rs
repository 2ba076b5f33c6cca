//! `Engine::subscribe`: every delivery change of each durable batch, the endpoint's cascade
//! included, told in order; a subscriber that falls behind is told how many it missed and the
//! engine never waits for it. And the engine's own counts (`Engine::stats`), kept where the facts
//! happen. On a manual clock and a scripted sender; every wait is bounded.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use herald_engine::clock::ManualClock;
use herald_engine::sender::{AttemptRequest, FailureKind, SendFuture, SendOutcome, Sender};
use herald_engine::{
    Actor, AttemptKind, Command, DeliveryChange, DeliveryConfig, Engine, EngineConfig, Parts, Reply,
    SubscriptionError, SUBSCRIPTION_BUFFER,
};
use herald_log::{MemStore, Store};
use herald_projector::{DeliveryId, DeliveryStatus, EndpointId, EventId, OrgId, Policy};
use uuid::Uuid;

const WAIT: Duration = Duration::from_secs(10);
const T0: u64 = 1_800_000_000_000;

/// Answers 200, or fails while `fails` says so.
#[derive(Default)]
struct Scripted {
    fails: Mutex<VecDeque<bool>>,
}

impl Sender for Scripted {
    fn send(&self, _req: AttemptRequest) -> SendFuture<'_> {
        Box::pin(async move {
            if self.fails.lock().unwrap().pop_front().unwrap_or(false) {
                SendOutcome::Failed { kind: FailureKind::Connect, error: "connection refused".into() }
            } else {
                SendOutcome::Response { status: 200, excerpt: Vec::new(), retry_after_ms: None }
            }
        })
    }
}

fn open(failures_max: u32) -> (Engine, Arc<Scripted>) {
    let sender = Arc::new(Scripted::default());
    let config = EngineConfig {
        policy: Policy { retry_schedule_ms: vec![1_000; 5], failures_max, ..Policy::default() },
        delivery: DeliveryConfig {
            shutdown_timeout: Duration::from_millis(300),
            ..DeliveryConfig::default()
        },
        ..EngineConfig::default()
    };
    let parts = Parts {
        store: Arc::new(MemStore::new()) as Arc<dyn Store>,
        clock: Arc::new(ManualClock::new(T0)),
        sender: sender.clone(),
    };
    (Engine::open_with(config, parts).unwrap(), sender)
}

fn org() -> OrgId {
    OrgId(Uuid::from_u128(7))
}

fn endpoint(engine: &Engine) -> EndpointId {
    let id = EndpointId(Uuid::now_v7());
    let reply = engine.execute_blocking(
        Actor::admin(),
        Command::CreateEndpoint {
            id,
            org_id: org(),
            url: "https://receiver.example/hook".into(),
            name: "crm".into(),
            enabled_events: vec!["*".into()],
            secret: None,
            settings: Default::default(),
        },
    );
    assert!(matches!(reply, Ok(Reply::Endpoint { .. })), "{reply:?}");
    id
}

fn publish(engine: &Engine) -> DeliveryId {
    match engine.publish(org(), "call.ended", b"{}") {
        Ok(Reply::Published { delivery_ids, .. }) => delivery_ids[0],
        other => panic!("{other:?}"),
    }
}

fn change(d: DeliveryId, status: DeliveryStatus, attempt_count: u32, e: EndpointId) -> DeliveryChange {
    DeliveryChange { delivery_id: d, status, attempt_count, endpoint_id: Some(e) }
}

#[test]
fn a_publish_and_its_attempt_are_told_in_order_and_counted() {
    let (engine, _) = open(5);
    let e = endpoint(&engine);
    let mut sub = engine.subscribe();
    let d = publish(&engine);
    assert_eq!(sub.recv_timeout(WAIT), Ok(change(d, DeliveryStatus::Pending, 0, e)));
    assert_eq!(sub.recv_timeout(WAIT), Ok(change(d, DeliveryStatus::Delivered, 1, e)));
    assert!(engine.settle(WAIT));
    assert_eq!(sub.try_recv(), Err(SubscriptionError::Timeout), "nothing else changed");

    let stats = engine.stats();
    assert_eq!(stats.events_published, 1);
    assert_eq!(stats.publish_durations.count(), 1);
    let attempts: Vec<(AttemptKind, u64)> =
        stats.attempt_durations.iter().map(|(k, h)| (*k, h.count())).collect();
    assert_eq!(
        attempts,
        vec![(AttemptKind::Delivered, 1), (AttemptKind::Failed, 0), (AttemptKind::Interrupted, 0)]
    );
    // An idempotent replay is not a new event.
    let replay = |key: &str| Command::Publish {
        id: EventId(Uuid::now_v7()),
        org_id: org(),
        event_type: "call.ended".into(),
        payload: b"{}".to_vec(),
        call_id: None,
        webhook_url: None,
        idempotency_key: Some(key.into()),
        ordering_key: None,
    };
    engine.execute_blocking(Actor::admin(), replay("k")).unwrap();
    engine.execute_blocking(Actor::admin(), replay("k")).unwrap();
    assert_eq!(engine.stats().events_published, 2);
    assert_eq!(engine.stats().publish_durations.count(), 3);
    engine.shutdown();
    // The writer has stopped: the stream ends, after what it held.
    let rest: Vec<_> = std::iter::from_fn(|| sub.recv_timeout(WAIT).ok()).collect();
    assert!(rest.iter().all(|c| c.endpoint_id == Some(e)), "{rest:?}");
    assert_eq!(sub.recv_timeout(WAIT), Err(SubscriptionError::Closed));
    assert_eq!(engine.subscribe().recv_timeout(WAIT), Err(SubscriptionError::Closed));
}

/// A failure that makes the endpoint inactive turns its other pending delivery inactive in the
/// same batch: the subscriber hears of both.
#[test]
fn the_endpoint_going_inactive_is_told_for_every_delivery_it_takes_along() {
    let (engine, sender) = open(2);
    let e = endpoint(&engine);
    sender.fails.lock().unwrap().extend([true, true]);
    let mut sub = engine.subscribe();
    let first = publish(&engine);
    assert_eq!(sub.recv_timeout(WAIT), Ok(change(first, DeliveryStatus::Pending, 0, e)));
    // Failed once: still pending, its retry a second away on a clock that does not move.
    assert_eq!(sub.recv_timeout(WAIT), Ok(change(first, DeliveryStatus::Pending, 1, e)));
    let second = publish(&engine);
    assert_eq!(sub.recv_timeout(WAIT), Ok(change(second, DeliveryStatus::Pending, 0, e)));
    let mut told = vec![sub.recv_timeout(WAIT).unwrap(), sub.recv_timeout(WAIT).unwrap()];
    told.sort_by_key(|c| c.delivery_id != second);
    assert_eq!(
        told,
        vec![change(second, DeliveryStatus::Inactive, 1, e), change(first, DeliveryStatus::Inactive, 1, e)]
    );
    assert!(engine.settle(WAIT));
    assert_eq!(sub.try_recv(), Err(SubscriptionError::Timeout));
    assert_eq!(engine.stats().attempt_durations[AttemptKind::Failed as usize].1.count(), 2);
    engine.shutdown();
}

/// Nobody reads: the engine publishes and delivers at full speed all the same, and the subscriber,
/// when it reads at last, is told how many changes it missed, then gets the newest ones in order.
#[test]
fn a_subscriber_that_falls_behind_is_told_how_many_it_missed_and_never_slows_the_engine() {
    let (engine, _) = open(5);
    let e = endpoint(&engine);
    let mut sub = engine.subscribe();
    let publishes = SUBSCRIPTION_BUFFER / 2 + 100;
    let (done_tx, done) = std::sync::mpsc::channel();
    for _ in 0..publishes {
        let done_tx = done_tx.clone();
        let command = Command::Publish {
            id: EventId(Uuid::now_v7()),
            org_id: org(),
            event_type: "call.ended".into(),
            payload: b"{}".to_vec(),
            call_id: None,
            webhook_url: None,
            idempotency_key: None,
            ordering_key: None,
        };
        engine.submit_with(Actor::admin(), command, move |out| {
            let _ = done_tx.send(out.is_ok());
        });
    }
    for _ in 0..publishes {
        assert!(done.recv_timeout(WAIT).unwrap());
    }
    assert!(engine.settle(WAIT));
    // Each delivery was told twice: created pending, then delivered.
    let total = 2 * publishes as u64;
    let Err(SubscriptionError::Missed(missed)) = sub.try_recv() else { panic!("not told of a miss") };
    let mut kept = Vec::new();
    while let Ok(c) = sub.try_recv() {
        kept.push(c);
    }
    assert_eq!(kept.len(), SUBSCRIPTION_BUFFER);
    assert_eq!(missed + kept.len() as u64, total);
    assert!(kept.iter().all(|c| c.endpoint_id == Some(e)));
    // The newest changes are the deliveries' last: each kept delivery ends delivered.
    let last = kept.last().unwrap();
    assert_eq!((last.status, last.attempt_count), (DeliveryStatus::Delivered, 1));
    assert_eq!(engine.stats().events_published, publishes as u64);
    engine.shutdown();
}

/// Inside a request's scope (the server's edge sets it), a publish is timed from the request's
/// arrival, not from its submission to the engine; outside one, from its submission.
#[test]
fn a_publish_in_a_request_is_timed_from_its_arrival() {
    use herald_engine::{RequestId, RequestScope};
    let (engine, _) = open(5);
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let arrived = std::time::Instant::now() - Duration::from_millis(300);
    let scope = RequestScope { id: RequestId::made(), arrived };
    // The engine reads the scope wherever the command is submitted while the request's task runs.
    runtime.block_on(scope.scope(async { engine.publish(org(), "call.ended", b"{}") })).unwrap();
    let timed = engine.stats().publish_durations;
    assert_eq!(timed.count(), 1);
    assert!(timed.sum_us >= 300_000, "timed from the arrival: {} us", timed.sum_us);
    engine.publish(org(), "call.ended", b"{}").unwrap();
    let timed = engine.stats().publish_durations;
    assert!(timed.sum_us - 300_000 < 250_000, "the second from its submission: {:?}", timed);
    engine.shutdown();
}
