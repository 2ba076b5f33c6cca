//! The command machine through the log: validation, organisation isolation, fan-out,
//! idempotency, retrigger/redeliver rules and the batch retrigger of seed 002.

use std::sync::Arc;

use herald_engine::{Actor, BatchItem, Command, CommandError, CommandLimits, Commands, Reply, Submitted};
use herald_log::{Durability, Log, LogConfig, LogError, MemStore};
use herald_projector::{
    get_delivery, ApiKeyId, AttemptOutcome, DeliveryId, DeliveryStatus, EndpointId, EventId, OrgId, Scope,
    StoreTables,
};
use uuid::Uuid;

struct World {
    store: MemStore,
    log: Log<Commands>,
    now_ms: u64,
}

fn org(n: u128) -> OrgId {
    OrgId(Uuid::from_u128(n))
}

fn member(n: u128) -> Actor {
    Actor { org_id: Some(org(n)), key_id: None }
}

impl World {
    fn new(limits: CommandLimits) -> World {
        let store = MemStore::new();
        let config =
            LogConfig { batch_commands_max: 16, queue_commands_max: 64, durability: Durability::Flush };
        let log = Log::open(Arc::new(store.clone()), Commands::new(limits), config).unwrap();
        World { store, log, now_ms: 1_700_000_000_000 }
    }

    fn run(&mut self, actor: Actor, command: Command) -> Result<Reply, CommandError> {
        self.now_ms += 1;
        self.run_at(actor, self.now_ms, command)
    }

    /// A command stamped `at_ms`, which may repeat an earlier stamp.
    fn run_at(&mut self, actor: Actor, at_ms: u64, command: Command) -> Result<Reply, CommandError> {
        self.now_ms = self.now_ms.max(at_ms);
        let out: Result<Result<Reply, CommandError>, LogError> =
            self.log.submit(Submitted { actor, at_ms, command, request: None });
        out.unwrap()
    }

    fn endpoint(&mut self, actor: Actor, org_n: u128, events: &[&str]) -> EndpointId {
        let id = EndpointId(Uuid::now_v7());
        let reply = self.run(
            actor,
            Command::CreateEndpoint {
                id,
                org_id: org(org_n),
                url: "https://receiver.example/hook".into(),
                name: "crm".into(),
                enabled_events: events.iter().map(|s| s.to_string()).collect(),
                secret: None,
                settings: Default::default(),
            },
        );
        match reply {
            Ok(Reply::Endpoint { secret, .. }) => assert!(secret.starts_with("whsec_")),
            other => panic!("create endpoint: {other:?}"),
        }
        id
    }

    fn publish(
        &mut self,
        actor: Actor,
        org_n: u128,
        event_type: &str,
        key: Option<&str>,
    ) -> Result<Reply, CommandError> {
        self.run(
            actor,
            Command::Publish {
                id: EventId(Uuid::now_v7()),
                org_id: org(org_n),
                event_type: event_type.into(),
                payload: br#"{"call":1}"#.to_vec(),
                call_id: None,
                webhook_url: None,
                idempotency_key: key.map(String::from),
                ordering_key: None,
            },
        )
    }

    fn snapshot(&self) -> std::collections::BTreeMap<Vec<u8>, Vec<u8>> {
        self.store.with_map(|m| m.clone())
    }

    fn status(&self, id: DeliveryId) -> DeliveryStatus {
        get_delivery(&StoreTables(&self.store), id).unwrap().unwrap().status
    }
}

/// A publish of a fresh event to organisation `org_n`.
fn publish_command(org_n: u128) -> Command {
    Command::Publish {
        id: EventId(Uuid::now_v7()),
        org_id: org(org_n),
        event_type: "call.ended".into(),
        payload: b"{}".to_vec(),
        call_id: None,
        webhook_url: None,
        idempotency_key: None,
        ordering_key: None,
    }
}

fn deliveries(reply: Result<Reply, CommandError>) -> Vec<DeliveryId> {
    match reply {
        Ok(Reply::Published { delivery_ids, .. }) => delivery_ids,
        other => panic!("publish: {other:?}"),
    }
}

#[test]
fn invalid_endpoints_are_refused_naming_the_field_and_write_nothing() {
    let mut w = World::new(CommandLimits::default());
    let before = w.snapshot();
    let mut create = |url: &str, events: Vec<String>, secret: Option<String>| {
        w.run(
            member(1),
            Command::CreateEndpoint {
                id: EndpointId(Uuid::now_v7()),
                org_id: org(1),
                url: url.into(),
                name: "x".into(),
                enabled_events: events,
                secret,
                settings: Default::default(),
            },
        )
    };
    let field = |r: Result<Reply, CommandError>| match r {
        Err(CommandError::Validation { field, .. }) => field,
        other => panic!("expected a validation error, got {other:?}"),
    };
    assert_eq!(field(create("ftp://x.example/", vec!["*".into()], None)), "url");
    assert_eq!(field(create("http://127.0.0.1:9/", vec!["*".into()], None)), "url");
    assert_eq!(field(create("http://169.254.169.254/", vec!["*".into()], None)), "url");
    assert_eq!(field(create("https://ok.example/", vec![], None)), "enabled_events");
    assert_eq!(field(create("https://ok.example/", vec!["bad type!".into()], None)), "enabled_events");
    assert_eq!(field(create("https://ok.example/", vec!["*".into()], Some("nope".into()))), "secret");
    assert_eq!(w.snapshot(), before);
}

#[test]
fn another_organisations_endpoint_answers_like_a_missing_one() {
    let mut w = World::new(CommandLimits::default());
    let theirs = w.endpoint(member(2), 2, &["*"]);
    let missing = EndpointId(Uuid::now_v7());
    for id in [theirs, missing] {
        let err = w.run(member(1), Command::DeleteEndpoint { id }).unwrap_err();
        assert!(matches!(err, CommandError::NotFound { what: "endpoint", .. }), "{err:?}");
    }
    let err = w
        .run(
            member(1),
            Command::CreateEndpoint {
                id: EndpointId(Uuid::now_v7()),
                org_id: org(2),
                url: "https://x.example/".into(),
                name: String::new(),
                enabled_events: vec!["*".into()],
                secret: None,
                settings: Default::default(),
            },
        )
        .unwrap_err();
    assert!(matches!(err, CommandError::Validation { field: "org_id", .. }));
    // The admin sees every organisation.
    w.run(Actor::admin(), Command::EnableEndpoint { id: theirs }).unwrap();
}

#[test]
fn publish_fans_out_to_subscribed_endpoints_of_the_organisation_only() {
    let mut w = World::new(CommandLimits::default());
    w.endpoint(member(1), 1, &["*"]);
    w.endpoint(member(1), 1, &["call.ended", "call.queued"]);
    w.endpoint(member(1), 1, &["call.ringing"]);
    w.endpoint(member(2), 2, &["*"]);
    let ids = deliveries(w.publish(member(1), 1, "call.queued", None));
    assert_eq!(ids.len(), 2);
    for id in &ids {
        assert_eq!(w.status(*id), DeliveryStatus::Pending);
    }
    assert_eq!(deliveries(w.publish(member(1), 1, "call.ringing", None)).len(), 2);
    assert!(deliveries(w.publish(member(3), 3, "call.queued", None)).is_empty());
    let err = w.publish(member(1), 1, "no spaces", None).unwrap_err();
    assert!(matches!(err, CommandError::Validation { field: "event_type", .. }));
    let err = w.publish(member(1), 2, "call.queued", None).unwrap_err();
    assert!(matches!(err, CommandError::Validation { field: "org_id", .. }));
}

/// The machine keeps each organisation's endpoint list for publishes: every change of an endpoint
/// (created, its events or url changed, deleted) shows in the next publish, and so does a change
/// staged earlier in the same batch or rolled back with a rejected one.
#[test]
fn a_publish_fans_out_to_the_endpoints_as_they_are_now() {
    let mut w = World::new(CommandLimits::default());
    let urls = |w: &World, ids: &[DeliveryId]| -> Vec<String> {
        ids.iter().map(|id| get_delivery(&StoreTables(&w.store), *id).unwrap().unwrap().url).collect()
    };
    let a = w.endpoint(member(1), 1, &["call.ended"]);
    assert_eq!(deliveries(w.publish(member(1), 1, "call.ended", None)).len(), 1);
    let b = w.endpoint(member(1), 1, &["*"]);
    assert_eq!(deliveries(w.publish(member(1), 1, "call.ended", None)).len(), 2);
    let update = |id, url: Option<&str>, events: Option<&[&str]>| Command::UpdateEndpoint {
        id,
        url: url.map(String::from),
        name: None,
        enabled_events: events.map(|e| e.iter().map(|s| s.to_string()).collect()),
        settings: Default::default(),
    };
    w.run(member(1), update(a, None, Some(&["call.queued"]))).unwrap();
    assert_eq!(deliveries(w.publish(member(1), 1, "call.ended", None)).len(), 1);
    w.run(member(1), update(b, Some("https://moved.example/hook"), None)).unwrap();
    let ids = deliveries(w.publish(member(1), 1, "call.ended", None));
    assert_eq!(urls(&w, &ids), ["https://moved.example/hook"]);
    w.run(member(1), Command::DeleteEndpoint { id: b }).unwrap();
    assert!(deliveries(w.publish(member(1), 1, "call.ended", None)).is_empty());
    // A rejected update changes nothing.
    let err = w.run(member(1), update(a, Some("ftp://nope"), Some(&["*"]))).unwrap_err();
    assert!(matches!(err, CommandError::Validation { field: "url", .. }));
    assert!(deliveries(w.publish(member(1), 1, "call.ended", None)).is_empty());
    assert_eq!(deliveries(w.publish(member(1), 1, "call.queued", None)).len(), 1);
}

/// Deliveries made in the same millisecond get ids in the order they were made (the
/// sub-millisecond counter of UUID v7), so a list in creation order is the order of the log,
/// and a batch's index entries go to the end of their windows.
#[test]
fn delivery_ids_made_in_one_millisecond_sort_in_the_order_they_were_made() {
    let mut w = World::new(CommandLimits::default());
    for _ in 0..3 {
        w.endpoint(member(1), 1, &["*"]);
    }
    let mut made = Vec::new();
    for _ in 0..5 {
        let at_ms = w.now_ms;
        made.extend(deliveries(w.run_at(member(1), at_ms, publish_command(1))));
    }
    assert_eq!(made.len(), 15);
    let mut sorted = made.clone();
    sorted.sort();
    assert_eq!(made, sorted, "ids sort in the order they were made");
    assert!(made.iter().all(|d| d.0.get_version_num() == 7));
    // A new millisecond starts over, still after every id of the earlier one.
    let later = deliveries(w.run_at(member(1), w.now_ms + 1, publish_command(1)));
    assert!(later.iter().all(|d| d > made.last().unwrap()));
}

#[test]
fn the_same_idempotency_key_returns_the_first_answer_and_writes_nothing() {
    let mut w = World::new(CommandLimits::default());
    w.endpoint(member(1), 1, &["*"]);
    let first = w.publish(member(1), 1, "call.queued", Some("k-1")).unwrap();
    let before = w.snapshot();
    let again = w.publish(member(1), 1, "call.queued", Some("k-1")).unwrap();
    assert_eq!(w.snapshot(), before);
    match (first, again) {
        (
            Reply::Published { id: a, delivery_ids: da, replayed: false, .. },
            Reply::Published { id: b, delivery_ids: db, replayed: true, .. },
        ) => {
            assert_eq!((a, da), (b, db));
        }
        other => panic!("{other:?}"),
    }
    // The same key in another organisation is another event.
    w.endpoint(member(2), 2, &["*"]);
    assert!(matches!(
        w.publish(member(2), 2, "call.queued", Some("k-1")),
        Ok(Reply::Published { replayed: false, .. })
    ));
}

#[test]
fn retrigger_needs_a_failed_delivery_and_redeliver_refuses_a_pending_one() {
    let mut w = World::new(CommandLimits::default());
    w.endpoint(member(1), 1, &["*"]);
    let d = deliveries(w.publish(member(1), 1, "call.queued", None))[0];
    let before = w.snapshot();
    let err = w.run(member(1), Command::Retrigger { delivery_id: d }).unwrap_err();
    assert!(matches!(err, CommandError::NotFound { what: "failed webhook", .. }), "{err:?}");
    let err = w.run(member(1), Command::Redeliver { delivery_id: d }).unwrap_err();
    assert!(matches!(err, CommandError::Conflict { .. }), "{err:?}");
    let err = w.run(member(2), Command::Redeliver { delivery_id: d }).unwrap_err();
    assert!(matches!(err, CommandError::NotFound { .. }), "{err:?}");
    assert_eq!(w.snapshot(), before);
}

#[test]
fn batch_retrigger_validates_the_list_and_answers_per_item() {
    let mut w = World::new(CommandLimits::default());
    let mine = w.endpoint(member(1), 1, &["*"]);
    let other = w.endpoint(member(1), 1, &["*"]);
    let ids = deliveries(w.publish(member(1), 1, "call.queued", None));
    let of =
        |w: &World, id: DeliveryId| get_delivery(&StoreTables(&w.store), id).unwrap().unwrap().endpoint_id;
    let (on_mine, on_other) = if of(&w, ids[0]) == Some(mine) { (ids[0], ids[1]) } else { (ids[1], ids[0]) };
    assert_eq!(w.status(on_mine), DeliveryStatus::Pending);
    assert_eq!(of(&w, on_other), Some(other));
    let batch = |ids: Vec<DeliveryId>| Command::BatchRetrigger { endpoint_id: mine, delivery_ids: ids };
    let field = |r: Result<Reply, CommandError>| match r {
        Err(CommandError::Validation { field, message }) => format!("{field}: {message}"),
        other => panic!("{other:?}"),
    };
    assert!(field(w.run(Actor::admin(), batch(vec![]))).starts_with("webhookNotificationIds"));
    let many: Vec<DeliveryId> = (0..26).map(|_| DeliveryId(Uuid::now_v7())).collect();
    assert!(field(w.run(Actor::admin(), batch(many))).contains("got 26"));
    assert!(field(w.run(Actor::admin(), batch(vec![on_mine, on_mine]))).contains("twice"));
    let unknown_endpoint =
        Command::BatchRetrigger { endpoint_id: EndpointId(Uuid::now_v7()), delivery_ids: vec![on_mine] };
    assert!(matches!(
        w.run(Actor::admin(), unknown_endpoint),
        Err(CommandError::NotFound { what: "webhook", .. })
    ));
    let unknown = DeliveryId(Uuid::now_v7());
    let Reply::Batch(items) = w.run(Actor::admin(), batch(vec![on_mine, on_other, unknown])).unwrap() else {
        panic!("not a batch reply")
    };
    let errors: Vec<_> = items.iter().map(|BatchItem { result, .. }| result.clone().unwrap_err()).collect();
    assert!(errors[0].contains("already pending"), "{errors:?}");
    assert!(errors[1].contains("not found for webhook"), "{errors:?}");
    assert!(errors[2].contains("not found for webhook"), "{errors:?}");
}

#[test]
fn batch_retrigger_is_rate_limited_per_endpoint_in_a_sliding_window() {
    let limits =
        CommandLimits { retrigger_max_per_window: 3, retrigger_window_ms: 1_000, ..CommandLimits::default() };
    let mut w = World::new(limits);
    let a = w.endpoint(member(1), 1, &["*"]);
    let b = w.endpoint(member(1), 1, &["*"]);
    let d = deliveries(w.publish(member(1), 1, "call.queued", None))[0];
    let batch = |endpoint_id| Command::BatchRetrigger { endpoint_id, delivery_ids: vec![d] };
    for _ in 0..3 {
        assert!(matches!(w.run(Actor::admin(), batch(a)), Ok(Reply::Batch(_))));
    }
    // Invalid requests do not count, and do not reach the limiter.
    let invalid = Command::BatchRetrigger { endpoint_id: a, delivery_ids: vec![] };
    assert!(matches!(w.run(Actor::admin(), invalid), Err(CommandError::Validation { .. })));
    match w.run(Actor::admin(), batch(a)) {
        Err(CommandError::RateLimited { retry_after_ms }) => {
            assert!(retry_after_ms > 0 && retry_after_ms <= 1_000)
        }
        other => panic!("{other:?}"),
    }
    // Another endpoint has its own window, and the window slides.
    assert!(matches!(w.run(Actor::admin(), batch(b)), Ok(Reply::Batch(_))));
    w.now_ms += 1_000;
    assert!(matches!(w.run(Actor::admin(), batch(a)), Ok(Reply::Batch(_))));
}

fn fail(w: &mut World, d: DeliveryId) -> Option<u64> {
    let at = w.now_ms;
    let outcome = AttemptOutcome::Failed { status: Some(503), error: "HTTP 503".into() };
    match w.run(
        Actor::admin(),
        Command::RecordAttempt {
            delivery_id: d,
            started_at_ms: at,
            finished_at_ms: at + 5,
            outcome,
            response_excerpt: vec![b'x'; 10_000],
            retry_after_ms: None,
        },
    ) {
        Ok(Reply::Attempted { retry_at_ms }) => retry_at_ms,
        other => panic!("{other:?}"),
    }
}

/// Seeds 000 and 001's story at the command level: five failures make the endpoint inactive,
/// its pending deliveries and new events park as inactive, a retrigger brings one back, and a
/// success delivers it and makes the endpoint active again.
#[test]
fn failures_park_deliveries_as_inactive_and_a_retrigger_brings_them_back() {
    let mut w = World::new(CommandLimits::default());
    let endpoint = w.endpoint(member(1), 1, &["*"]);
    let first = deliveries(w.publish(member(1), 1, "call.ended", None))[0];
    let second = deliveries(w.publish(member(1), 1, "call.ended", None))[0];
    // The schedule's first step is 5 s, plus at most 10 % jitter, after the attempt finished.
    let finished = w.now_ms + 1 + 5;
    let retry = fail(&mut w, first).unwrap();
    assert!((finished + 5_000..=finished + 5_500).contains(&retry), "{retry} vs {finished}");
    for _ in 0..3 {
        assert!(fail(&mut w, first).is_some());
    }
    assert_eq!(w.status(first), DeliveryStatus::Pending);
    fail(&mut w, first);
    assert_eq!(w.status(first), DeliveryStatus::Inactive);
    assert_eq!(
        w.status(second),
        DeliveryStatus::Inactive,
        "a pending delivery of an inactive endpoint parks"
    );
    let third = deliveries(w.publish(member(1), 1, "call.ended", None))[0];
    assert_eq!(
        w.status(third),
        DeliveryStatus::Inactive,
        "an event for an inactive endpoint is stored inactive"
    );
    let d = get_delivery(&StoreTables(&w.store), first).unwrap().unwrap();
    assert_eq!(d.attempt_count, 5);
    assert_eq!(d.last_error.as_deref(), Some("HTTP 503"));

    assert!(matches!(
        w.run(member(1), Command::Retrigger { delivery_id: first }),
        Ok(Reply::Retriggered { .. })
    ));
    assert_eq!(w.status(first), DeliveryStatus::Pending);
    let at = w.now_ms;
    let delivered = AttemptOutcome::Delivered { status: 204 };
    let reply = w.run(
        Actor::admin(),
        Command::RecordAttempt {
            delivery_id: first,
            started_at_ms: at,
            finished_at_ms: at + 3,
            outcome: delivered,
            response_excerpt: vec![],
            retry_after_ms: None,
        },
    );
    assert_eq!(reply, Ok(Reply::Attempted { retry_at_ms: None }));
    assert_eq!(w.status(first), DeliveryStatus::Delivered);
    let e = herald_projector::get_endpoint(&StoreTables(&w.store), endpoint).unwrap().unwrap();
    assert_eq!(e.status, herald_projector::EndpointStatus::Active);
    assert_eq!(
        w.status(second),
        DeliveryStatus::Inactive,
        "already-inactive deliveries stay so until retriggered"
    );
    let d = get_delivery(&StoreTables(&w.store), first).unwrap().unwrap();
    assert_eq!((d.attempt_count, d.manual_retry_count), (6, 1));
    let attempts = herald_projector::attempts(&StoreTables(&w.store), first, 0, 10).unwrap();
    assert_eq!(attempts.len(), 6);
    assert_eq!(attempts[0].response_excerpt.len(), 4096, "the excerpt is cut to 4 KiB");
    assert_eq!(attempts[5].trigger, herald_projector::Trigger::Manual);
}

#[test]
fn a_schedule_used_up_exhausts_the_delivery() {
    let mut w = World::new(CommandLimits::default());
    w.endpoint(member(1), 1, &["*"]);
    // Failures spread over more than the window never make the endpoint inactive.
    let d = deliveries(w.publish(member(1), 1, "call.ended", None))[0];
    let mut retries = Vec::new();
    for _ in 0..8 {
        w.now_ms += 25 * 3_600_000;
        retries.push(fail(&mut w, d));
    }
    assert!(retries[..7].iter().all(Option::is_some), "{retries:?}");
    assert_eq!(retries[7], None);
    assert_eq!(w.status(d), DeliveryStatus::Exhausted);
}

#[test]
fn retry_after_pushes_the_retry_later_but_never_beyond_the_schedule() {
    let mut w = World::new(CommandLimits::default());
    w.endpoint(member(1), 1, &["*"]);
    let d = deliveries(w.publish(member(1), 1, "call.ended", None))[0];
    let attempt = |w: &mut World, retry_after_ms: Option<u64>| {
        w.now_ms += 1;
        let at = w.now_ms;
        let outcome = AttemptOutcome::Failed { status: Some(429), error: "HTTP 429".into() };
        let command = Command::RecordAttempt {
            delivery_id: d,
            started_at_ms: at,
            finished_at_ms: at,
            outcome,
            response_excerpt: vec![],
            retry_after_ms,
        };
        match w.run(Actor::admin(), command) {
            Ok(Reply::Attempted { retry_at_ms }) => (w.now_ms, retry_at_ms),
            other => panic!("{other:?}"),
        }
    };
    // First retry: 5 s ± 10 % by the schedule; a Retry-After of an hour wins.
    let (at, retry) = attempt(&mut w, Some(3_600_000));
    assert_eq!(retry, Some(at - 1 + 3_600_000));
    // Second retry: 5 min by the schedule; a Retry-After of 1 s is shorter and is ignored.
    let (at, retry) = attempt(&mut w, Some(1_000));
    let retry = retry.unwrap();
    assert!(retry >= at - 1 + 270_000 && retry <= at - 1 + 330_000, "{retry} vs {at}");
}

#[test]
fn set_policy_is_admin_only_and_checked() {
    let mut w = World::new(CommandLimits::default());
    let policy = herald_projector::Policy { retry_schedule_ms: vec![10, 20], ..Default::default() };
    assert!(matches!(
        w.run(member(1), Command::SetPolicy(policy.clone())),
        Err(CommandError::NotFound { .. })
    ));
    let bad = herald_projector::Policy { failures_max: 0, ..Default::default() };
    assert!(matches!(
        w.run(Actor::admin(), Command::SetPolicy(bad)),
        Err(CommandError::Validation { field: "policy", .. })
    ));
    assert_eq!(w.run(Actor::admin(), Command::SetPolicy(policy.clone())), Ok(Reply::Done));
    assert_eq!(herald_projector::policy(&StoreTables(&w.store)).unwrap(), policy);
}

#[test]
fn api_keys_are_created_and_revoked_by_the_admin_only() {
    let mut w = World::new(CommandLimits::default());
    let id = ApiKeyId(Uuid::now_v7());
    let create = |org_id| Command::CreateApiKey {
        id,
        org_id,
        scopes: vec![Scope::EventsWrite],
        name: "ci".into(),
        key_hash: [7; 32],
    };
    let key = |w: &World| herald_projector::get_api_key(&StoreTables(&w.store), id).unwrap();
    assert!(matches!(w.run(member(1), create(Some(org(1)))), Err(CommandError::NotFound { .. })));
    assert!(key(&w).is_none(), "a refused creation wrote");
    assert_eq!(w.run(Actor::admin(), create(Some(org(1)))), Ok(Reply::Done));
    // A key of the organisation itself may not revoke it (nor the admin's key) through the engine.
    for actor in [member(1), member(2)] {
        assert!(matches!(w.run(actor, Command::RevokeApiKey { id }), Err(CommandError::NotFound { .. })));
    }
    assert_eq!(key(&w).unwrap().revoked_at_ms, None, "a refused revocation wrote");
    assert_eq!(w.run(Actor::admin(), Command::RevokeApiKey { id }), Ok(Reply::Done));
    assert!(key(&w).unwrap().revoked_at_ms.is_some());
}

#[test]
fn only_the_dispatcher_records_attempts() {
    let mut w = World::new(CommandLimits::default());
    w.endpoint(member(1), 1, &["*"]);
    let d = deliveries(w.run(member(1), publish_command(1)))[0];
    let made_up = Command::RecordAttempt {
        delivery_id: d,
        started_at_ms: w.now_ms,
        finished_at_ms: w.now_ms,
        outcome: AttemptOutcome::Delivered { status: 200 },
        response_excerpt: Vec::new(),
        retry_after_ms: None,
    };
    assert!(matches!(w.run(member(1), made_up), Err(CommandError::NotFound { .. })));
    let d = get_delivery(&StoreTables(&w.store), d).unwrap().unwrap();
    assert_eq!((d.status, d.attempt_count), (DeliveryStatus::Pending, 0), "a refused record wrote");
}

#[test]
fn a_rotation_keeps_the_old_secret_for_the_overlap_of_the_policy_in_force() {
    let mut w = World::new(CommandLimits::default());
    let policy = herald_projector::Policy { rotation_overlap_ms: 5_000, ..Default::default() };
    assert_eq!(w.run(Actor::admin(), Command::SetPolicy(policy)), Ok(Reply::Done));
    let endpoint = w.endpoint(member(1), 1, &["*"]);
    w.run(member(1), Command::RotateSecret { id: endpoint, secret: None }).unwrap();
    let e = herald_projector::get_endpoint(&StoreTables(&w.store), endpoint).unwrap().unwrap();
    assert_eq!(e.previous_secrets.len(), 1);
    assert_eq!(e.previous_secrets[0].expires_at_ms, w.now_ms + 5_000, "not the policy's overlap");
}

#[test]
fn adopt_rules_is_admin_only_and_forward_only() {
    let mut w = World::new(CommandLimits::default());
    let rules = |w: &World| herald_projector::rules(&StoreTables(&w.store)).unwrap();
    assert_eq!(rules(&w), 1, "a store no engine opened is under the first rules");
    let current = herald_projector::RULES_CURRENT;
    assert!(matches!(w.run(member(1), Command::AdoptRules(current)), Err(CommandError::NotFound { .. })));
    for refused in [0, 1, current + 1] {
        assert!(
            matches!(w.run(Actor::admin(), Command::AdoptRules(refused)), Err(CommandError::Conflict { .. })),
            "{refused}"
        );
    }
    assert_eq!(rules(&w), 1, "a refused adoption wrote");
    assert_eq!(w.run(Actor::admin(), Command::AdoptRules(current)), Ok(Reply::Done));
    assert_eq!(rules(&w), current);
    assert!(matches!(
        w.run(Actor::admin(), Command::AdoptRules(current)),
        Err(CommandError::Conflict { .. })
    ));
}

#[test]
fn delivery_ids_are_derived_from_the_event_so_a_replay_gives_the_same_ids() {
    let run = || {
        let mut w = World::new(CommandLimits::default());
        w.endpoint(member(1), 1, &["*"]);
        w.endpoint(member(1), 1, &["*"]);
        let reply = w.run(
            member(1),
            Command::Publish {
                id: EventId(Uuid::from_u128(42)),
                org_id: org(1),
                event_type: "call.ended".into(),
                payload: b"{}".to_vec(),
                call_id: None,
                webhook_url: None,
                idempotency_key: None,
                ordering_key: None,
            },
        );
        deliveries(reply)
    };
    let (first, second) = (run(), run());
    assert_eq!(first.len(), 2);
    assert_ne!(first[0], first[1]);
    assert_eq!(first, second);
    assert_eq!(first[0].0.get_version_num(), 7);
}

/// A publish is one record with its deliveries, up to `PUBLISHED_DELIVERIES_BYTES_MAX` of urls;
/// the deliveries beyond it follow in records of their own, in the same batch, in fan-out order.
#[test]
fn a_large_fan_out_spills_its_deliveries_into_records_of_their_own() {
    use herald_projector::{decode, Event, NEW_DELIVERY_BYTES, PUBLISHED_DELIVERIES_BYTES_MAX};
    let mut w = World::new(CommandLimits::default());
    let url = format!("https://receiver.example/{}", "p".repeat(3_000));
    for _ in 0..30 {
        let reply = w.run(
            member(1),
            Command::CreateEndpoint {
                id: EndpointId(Uuid::now_v7()),
                org_id: org(1),
                url: url.clone(),
                name: "crm".into(),
                enabled_events: vec!["*".into()],
                secret: None,
                settings: Default::default(),
            },
        );
        assert!(reply.is_ok(), "{reply:?}");
    }
    let first = herald_log::read_head(&w.store).unwrap().next_seq;
    let ids = deliveries(w.publish(member(1), 1, "call.queued", None));
    assert_eq!(ids.len(), 30);
    let fit = PUBLISHED_DELIVERIES_BYTES_MAX / (url.len() + NEW_DELIVERY_BYTES);
    let records = herald_log::read_records(&w.store, first, 100).unwrap();
    let events: Vec<Event> = records.iter().map(|r| decode(&r.body).unwrap()).collect();
    assert_eq!(events.len(), 1 + 30 - fit, "{:?}", events.iter().map(Event::kind).collect::<Vec<_>>());
    let mut logged = Vec::new();
    match &events[0] {
        Event::EventPublishedWithDeliveries { deliveries, .. } => {
            assert_eq!(deliveries.len(), fit);
            logged.extend(deliveries.iter().map(|d| d.id));
        }
        other => panic!("first record: {other:?}"),
    }
    for event in &events[1..] {
        match event {
            Event::DeliveryCreated { id, .. } => logged.push(*id),
            other => panic!("then: {other:?}"),
        }
    }
    assert_eq!(logged, ids, "the reply lists the deliveries in the records' order");
    for id in &ids {
        assert_eq!(w.status(*id), DeliveryStatus::Pending);
    }
}

/// Every record names who acted: the key of the command that wrote it (each record of a publish
/// that spills into several, an admin key's too), or the system for a command without a key
/// (attempt outcomes, the policy, an embedder).
#[test]
fn each_record_names_the_key_of_its_command_or_the_system() {
    use herald_projector::{decode_recorded, Event, RecordActor, NEW_DELIVERY_BYTES};
    let mut w = World::new(CommandLimits::default());
    let key = ApiKeyId(Uuid::from_u128(0xa1));
    let admin_key = ApiKeyId(Uuid::from_u128(0xad));
    let keyed = Actor { org_id: Some(org(1)), key_id: Some(key) };
    let admin = Actor { org_id: None, key_id: Some(admin_key) };
    let url = format!("https://receiver.example/{}", "p".repeat(3_000));
    let mut endpoint = None;
    for _ in 0..25 {
        let id = EndpointId(Uuid::now_v7());
        let create = Command::CreateEndpoint {
            id,
            org_id: org(1),
            url: url.clone(),
            name: "crm".into(),
            enabled_events: vec!["*".into()],
            secret: None,
            settings: Default::default(),
        };
        w.run(admin, create).unwrap();
        endpoint = Some(id);
    }
    let first = herald_log::read_head(&w.store).unwrap().next_seq;
    let ids = deliveries(w.run(keyed, publish_command(1)));
    let attempt = Command::RecordAttempt {
        delivery_id: ids[0],
        started_at_ms: w.now_ms,
        finished_at_ms: w.now_ms,
        outcome: AttemptOutcome::Failed { status: Some(503), error: "HTTP 503".into() },
        response_excerpt: Vec::new(),
        retry_after_ms: None,
    };
    w.run(Actor::admin(), attempt).unwrap();
    let policy = herald_projector::Policy { rotation_overlap_ms: 5_000, ..Default::default() };
    w.run(Actor::admin(), Command::SetPolicy(policy)).unwrap();
    w.run(member(1), publish_command(1)).unwrap();
    w.run(admin, Command::DeleteEndpoint { id: endpoint.unwrap() }).unwrap();
    let records = herald_log::read_records(&w.store, 1, 1_000).unwrap();
    let named: Vec<(Option<RecordActor>, &'static str)> = records
        .iter()
        .skip_while(|r| r.seq < first)
        .map(|r| decode_recorded(&r.body).map(|(actor, e)| (actor, e.kind())).unwrap())
        .collect();
    // a publish is a record and, for the deliveries that do not fit in it, records of their own
    let spilled = 25 - herald_projector::PUBLISHED_DELIVERIES_BYTES_MAX / (url.len() + NEW_DELIVERY_BYTES);
    assert!(spilled > 0);
    let publish = |actor| {
        let mut records = vec![(actor, "EventPublishedWithDeliveries")];
        records.extend(std::iter::repeat_n((actor, "DeliveryCreated"), spilled));
        records
    };
    let system = Some(RecordActor::System);
    let mut expected = publish(Some(RecordActor::Key(key)));
    expected.extend([(system, "AttemptRecorded"), (system, "PolicySet")]);
    expected.extend(publish(system));
    expected.push((Some(RecordActor::Key(admin_key)), "EndpointDeleted"));
    assert_eq!(named, expected);
    assert!(records[..(first - 1) as usize].iter().all(|r| {
        matches!(decode_recorded(&r.body), Ok((Some(RecordActor::Key(k)), Event::EndpointCreated { .. })) if k == admin_key)
    }));
}

#[test]
fn enabled_events_take_prefix_patterns_and_fan_out_by_them() {
    let mut w = World::new(CommandLimits::default());
    let calls = w.endpoint(member(1), 1, &["call.*"]);
    let exact = w.endpoint(member(1), 1, &["call"]);
    let fan_out = |w: &mut World, event_type: &str| -> Vec<Option<EndpointId>> {
        deliveries(w.publish(member(1), 1, event_type, None))
            .into_iter()
            .map(|d| get_delivery(&StoreTables(&w.store), d).unwrap().unwrap().endpoint_id)
            .collect()
    };
    assert_eq!(fan_out(&mut w, "call.ended"), [Some(calls)]);
    assert_eq!(fan_out(&mut w, "call.queue.left"), [Some(calls)]);
    assert_eq!(fan_out(&mut w, "call"), [Some(exact)]);
    assert!(fan_out(&mut w, "callback.x").is_empty());

    let before = w.snapshot();
    for bad in ["call*", "*.ended", ".*", "call.**", "c*"] {
        let create = Command::CreateEndpoint {
            id: EndpointId(Uuid::now_v7()),
            org_id: org(1),
            url: "https://receiver.example/hook".into(),
            name: String::new(),
            enabled_events: vec![bad.into()],
            secret: None,
            settings: Default::default(),
        };
        let update = Command::UpdateEndpoint {
            id: calls,
            url: None,
            name: None,
            enabled_events: Some(vec![bad.into()]),
            settings: Default::default(),
        };
        for command in [create, update] {
            match w.run(member(1), command) {
                Err(CommandError::Validation { field: "enabled_events", .. }) => {}
                other => panic!("{bad}: {other:?}"),
            }
        }
    }
    assert_eq!(w.snapshot(), before, "a refused pattern wrote");
}

fn recover(w: &mut World, actor: Actor, org_n: u128, filter: herald_projector::RecoveryFilter) -> Reply {
    let id = herald_projector::RecoveryId(Uuid::now_v7());
    w.run(actor, Command::Recover { id, org_id: org(org_n), filter }).unwrap()
}

fn failures_filter(max: u32) -> herald_projector::RecoveryFilter {
    herald_projector::RecoveryFilter {
        statuses: vec![DeliveryStatus::Exhausted, DeliveryStatus::Inactive],
        endpoint_id: None,
        event_type: None,
        created_after_ms: None,
        created_before_ms: None,
        max,
    }
}

/// Organisation 1 with an endpoint made inactive by one failure, and `n` inactive deliveries.
fn inactive_world(n: usize) -> (World, Vec<DeliveryId>) {
    let mut w = World::new(CommandLimits::default());
    w.run(Actor::admin(), Command::AdoptRules(herald_projector::RULES_CURRENT)).unwrap();
    let policy = herald_projector::Policy { failures_max: 1, ..herald_projector::Policy::default() };
    w.run(Actor::admin(), Command::SetPolicy(policy)).unwrap();
    w.endpoint(member(1), 1, &["*"]);
    let mut ids = deliveries(w.publish(member(1), 1, "call.ended", None));
    fail(&mut w, ids[0]);
    for _ in 1..n {
        ids.extend(deliveries(w.publish(member(1), 1, "call.ended", None)));
    }
    (w, ids)
}

/// A recover over more ids than one record holds: every selected delivery re-queued as a
/// retrigger, oldest first, in one commit of several records; selected again, nothing matches.
#[test]
fn a_recover_requeues_every_match_in_one_commit_of_several_records() {
    let n = herald_projector::RECOVERY_IDS_PER_RECORD + 10;
    let (mut w, ids) = inactive_world(n);
    assert!(ids.iter().all(|d| w.status(*d) == DeliveryStatus::Inactive));
    let seq_before = herald_projector::applied_seq(&StoreTables(&w.store)).unwrap();
    let Reply::Recovered(r) = recover(&mut w, member(1), 1, failures_filter(100_000)) else { panic!() };
    assert_eq!((r.matched, r.queued, r.truncated), (n as u64, n as u64, false));
    assert_eq!(r.sample, ids[..25]);
    let seq_after = herald_projector::applied_seq(&StoreTables(&w.store)).unwrap();
    assert_eq!(seq_after - seq_before, 2, "one RecoveryRequested and one RecoveryDeliveries");
    for d in &ids {
        let d = get_delivery(&StoreTables(&w.store), *d).unwrap().unwrap();
        assert_eq!(
            (d.status, d.manual_retry_count, d.next_attempt_at_ms),
            (DeliveryStatus::Pending, 1, Some(w.now_ms))
        );
    }
    let t = StoreTables(&w.store);
    let recovery = herald_projector::get_recovery(&t, r.recovery_id.unwrap()).unwrap().unwrap();
    let counts = herald_projector::recovery_counts(&t, &recovery).unwrap();
    assert_eq!((counts.queued, counts.pending), (n as u64, n as u64));
    let Reply::Recovered(again) = recover(&mut w, member(1), 1, failures_filter(10)) else { panic!() };
    assert_eq!((again.matched, again.queued, again.truncated), (0, 0, false));
}

#[test]
fn a_recover_is_bounded_by_max_and_refuses_bad_filters_and_other_organisations_writing_nothing() {
    let (mut w, ids) = inactive_world(5);
    let Reply::Recovered(r) = recover(&mut w, member(1), 1, failures_filter(2)) else { panic!() };
    assert_eq!((r.matched, r.queued, r.truncated, r.sample.as_slice()), (2, 2, true, &ids[..2]));
    assert_eq!(w.status(ids[2]), DeliveryStatus::Inactive);

    let before = w.snapshot();
    let refused = |w: &mut World, actor: Actor, org_n: u128, filter| {
        let id = herald_projector::RecoveryId(Uuid::now_v7());
        match w.run(actor, Command::Recover { id, org_id: org(org_n), filter }) {
            Err(CommandError::Validation { field, .. }) => field,
            other => panic!("{other:?}"),
        }
    };
    let with = |f: &dyn Fn(&mut herald_projector::RecoveryFilter)| {
        let mut filter = failures_filter(10);
        f(&mut filter);
        filter
    };
    assert_eq!(refused(&mut w, member(2), 1, failures_filter(10)), "org_id");
    assert_eq!(refused(&mut w, member(1), 1, with(&|f| f.statuses.clear())), "status");
    assert_eq!(
        refused(&mut w, member(1), 1, with(&|f| f.statuses = vec![DeliveryStatus::Pending])),
        "status"
    );
    assert_eq!(refused(&mut w, member(1), 1, with(&|f| f.max = 0)), "max");
    assert_eq!(refused(&mut w, member(1), 1, with(&|f| f.max = 100_001)), "max");
    assert_eq!(refused(&mut w, member(1), 1, with(&|f| f.event_type = Some("call*".into()))), "event_type");
    assert_eq!(w.snapshot(), before, "a refused recover wrote");

    // Another organisation's recover selects none of organisation 1's deliveries.
    let Reply::Recovered(other) = recover(&mut w, member(2), 2, failures_filter(10)) else { panic!() };
    assert_eq!(other.matched, 0);
    assert_eq!(w.status(ids[2]), DeliveryStatus::Inactive);
}
