//! Test helpers: short ids and event builders, a compact rendering of the projection, the
//! data-driven `check`, and the index consistency check every test runs.

use crate::codec;
use crate::keys;
use crate::model::{ApiKey, Delivery, DeliveryStatus, Endpoint, EndpointStatus, EventRecord};
use crate::policy::FAILURES_MAX_LIMIT;
use crate::{
    apply, ApiKeyId, ApplyError, AttemptOutcome, DeliveryId, EndpointId, Event, EventId, MemTables, OrgId,
    ReadTables, TableBatch, Trigger,
};
use std::collections::BTreeSet;
use uuid::Uuid;

const KIND_ENDPOINT: u128 = 1;
const KIND_DELIVERY: u128 = 2;
const KIND_EVENT: u128 = 3;
const KIND_ORG: u128 = 4;
const KIND_KEY: u128 = 5;

fn uuid(kind: u128, n: u32) -> Uuid {
    Uuid::from_u128((kind << 32) | u128::from(n))
}

pub fn ep(n: u32) -> EndpointId {
    EndpointId(uuid(KIND_ENDPOINT, n))
}
pub fn dl(n: u32) -> DeliveryId {
    DeliveryId(uuid(KIND_DELIVERY, n))
}
pub fn ev(n: u32) -> EventId {
    EventId(uuid(KIND_EVENT, n))
}
pub fn org(n: u32) -> OrgId {
    OrgId(uuid(KIND_ORG, n))
}
pub fn key_id(n: u32) -> ApiKeyId {
    ApiKeyId(uuid(KIND_KEY, n))
}

/// `e1`, `d2`, `v3`, `o1`, `k4`: the short name of a test id.
pub fn label(id: Uuid) -> String {
    let n = id.as_u128() & u128::from(u32::MAX);
    let prefix = match id.as_u128() >> 32 {
        KIND_ENDPOINT => "e",
        KIND_DELIVERY => "d",
        KIND_EVENT => "v",
        KIND_ORG => "o",
        KIND_KEY => "k",
        _ => return id.to_string(),
    };
    format!("{prefix}{n}")
}

pub const HOUR_MS: u64 = 60 * 60 * 1_000;

/// Endpoint `e{n}` of organisation `o1`, subscribed to everything.
pub fn endpoint(n: u32) -> Event {
    Event::EndpointCreated {
        id: ep(n),
        org_id: org(1),
        url: format!("https://e{n}.example/hook"),
        name: format!("e{n}"),
        enabled_events: vec!["*".into()],
        secret: format!("whsec_e{n}"),
    }
}

/// Event `v{n}` of organisation `o1`, type `call.queued`.
pub fn publish(n: u32) -> Event {
    Event::EventPublished {
        id: ev(n),
        org_id: org(1),
        event_type: "call.queued".into(),
        payload: br#"{"n":1}"#.to_vec(),
        call_id: None,
        idempotency_key: None,
    }
}

/// Delivery `d{d}` of event `v{v}` (organisation `o1`) to endpoint `e{e}`, or inline for `None`.
pub fn delivery(d: u32, v: u32, e: Option<u32>, next_attempt_at_ms: u64) -> Event {
    Event::DeliveryCreated {
        id: dl(d),
        event_id: ev(v),
        org_id: org(1),
        endpoint_id: e.map(ep),
        url: "https://target.example/hook".into(),
        next_attempt_at_ms,
    }
}

/// An attempt of `d{d}`. Started and finished at 0: `check` moves them to the step's `at_ms`.
pub fn attempt(
    d: u32,
    attempt: u32,
    trigger: Trigger,
    outcome: AttemptOutcome,
    retry_at_ms: Option<u64>,
) -> Event {
    Event::AttemptRecorded {
        delivery_id: dl(d),
        attempt,
        trigger,
        started_at_ms: 0,
        finished_at_ms: 0,
        outcome,
        response_excerpt: b"busy".to_vec(),
        retry_at_ms,
    }
}

/// A 503 answer to automatic attempt `n` of `d{d}`, retried at `retry_at_ms`.
pub fn fail(d: u32, n: u32, retry_at_ms: Option<u64>) -> Event {
    let outcome = AttemptOutcome::Failed { status: Some(503), error: "HTTP 503".into() };
    attempt(d, n, Trigger::Auto, outcome, retry_at_ms)
}

/// A 200 answer to automatic attempt `n` of `d{d}`.
pub fn ok(d: u32, n: u32) -> Event {
    attempt(d, n, Trigger::Auto, AttemptOutcome::Delivered { status: 200 }, None)
}

pub fn retrigger(d: u32) -> Event {
    Event::RetriggerRequested { delivery_id: dl(d), by_key: None, request_id: Uuid::from_u128(u128::from(d)) }
}

pub fn redeliver(d: u32) -> Event {
    Event::RedeliverRequested { delivery_id: dl(d), by_key: None }
}

/// Attempts built with started = finished = 0 happen at their step's `at_ms`.
pub fn stamped(at_ms: u64, event: &Event) -> Event {
    let mut event = event.clone();
    if let Event::AttemptRecorded { started_at_ms: started @ 0, finished_at_ms: finished @ 0, .. } =
        &mut event
    {
        *started = at_ms;
        *finished = at_ms;
    }
    event
}

/// Applies `events` (seq 1, 2, ...) to fresh tables, panicking on the first error.
pub fn run(events: &[(u64, Event)]) -> MemTables {
    let mut tables = MemTables::new();
    for (i, (at_ms, event)) in events.iter().enumerate() {
        let seq = i as u64 + 1;
        if let Err(e) = apply(&mut tables, seq, *at_ms, &stamped(*at_ms, event)) {
            panic!("step {seq} ({}) rejected: {e}", event.kind());
        }
    }
    tables
}

fn all<V: serde::de::DeserializeOwned>(t: &MemTables, keyspace: u8) -> Vec<V> {
    t.scan(&[keyspace], &[keyspace + 1], usize::MAX)
        .into_iter()
        .map(|(k, v)| match codec::from_bytes(&v) {
            Some(v) => v,
            None => panic!("undecodable value at {k:02x?}"),
        })
        .collect()
}

pub fn deliveries(t: &MemTables) -> Vec<Delivery> {
    all(t, keys::KS_DELIVERY)
}
pub fn endpoints(t: &MemTables) -> Vec<Endpoint> {
    all(t, keys::KS_ENDPOINT)
}

/// One line per endpoint, then one per delivery:
/// `e1 inactive run=5 [5 consecutive failures within 24h]`,
/// `d1 pending a=2 m=1 next=5000 manual [reason]`.
pub fn render(t: &MemTables) -> String {
    let mut lines = Vec::new();
    for e in endpoints(t) {
        let mut line = label(e.id.0);
        line += match (e.is_deleted(), e.status) {
            (true, _) => " deleted",
            (false, EndpointStatus::Active) => " active",
            (false, EndpointStatus::Inactive) => " inactive",
        };
        if !e.failure_run_at_ms.is_empty() {
            line += &format!(" run={}", e.failure_run_at_ms.len());
        }
        if let Some(reason) = &e.inactive_reason {
            line += &format!(" [{reason}]");
        }
        lines.push(line);
    }
    for d in deliveries(t) {
        let mut line = format!("{} {} a={}", label(d.id.0), d.status.name(), d.attempt_count);
        if d.manual_retry_count > 0 {
            line += &format!(" m={}", d.manual_retry_count);
        }
        if let Some(next_ms) = d.next_attempt_at_ms {
            line += &format!(" next={next_ms}");
        }
        if d.next_trigger == Trigger::Manual {
            line += " manual";
        }
        if let Some(reason) = &d.inactive_reason {
            line += &format!(" [{reason}]");
        }
        lines.push(line);
    }
    lines.join("\n")
}

fn normalize(text: &str) -> String {
    text.lines().map(str::trim).filter(|l| !l.is_empty()).collect::<Vec<_>>().join("\n")
}

/// Applies `events` to fresh tables and compares the rendered projection with `expected`
/// (lines, indentation ignored). Also checks the indexes, and that applying the same events
/// again, or all in one batch, gives byte-identical tables. Returns the tables for more checks.
pub fn check(events: &[(u64, Event)], expected: &str) -> MemTables {
    let tables = run(events);
    assert_consistent(&tables);
    assert_eq!(run(events).dump(), tables.dump(), "apply is not deterministic");
    let mut batched = MemTables::new();
    let mut batch = TableBatch::new(&mut batched);
    for (i, (at_ms, event)) in events.iter().enumerate() {
        if let Err(e) = apply(&mut batch, i as u64 + 1, *at_ms, &stamped(*at_ms, event)) {
            panic!("batched step {} rejected: {e}", i + 1);
        }
    }
    batch.commit();
    assert_eq!(batched.dump(), tables.dump(), "one batch differs from event by event");
    let rendered = render(&tables);
    assert_eq!(
        rendered,
        normalize(expected),
        "\n--- rendered:\n{rendered}\n--- expected:\n{}\n",
        normalize(expected)
    );
    tables
}

/// Applies `events`: all but the last must succeed, the last must fail with `expected` and
/// leave the tables as they were.
pub fn check_err(events: &[(u64, Event)], expected: ApplyError) {
    let (last, before) = events.split_last().expect("at least one event");
    let mut tables = run(before);
    let dump = tables.dump();
    let seq = events.len() as u64;
    let got = apply(&mut tables, seq, last.0, &stamped(last.0, &last.1));
    assert_eq!(got, Err(expected));
    assert_eq!(tables.dump(), dump, "a rejected event changed the tables");
}

/// Every index entry points at an existing object with matching fields and every object has
/// its entries; the due queue holds exactly the pending deliveries; the read models agree.
pub fn assert_consistent(t: &MemTables) {
    let deliveries = deliveries(t);
    let endpoints = endpoints(t);
    let events: Vec<EventRecord> = all(t, keys::KS_EVENT);

    // The per-status counters agree with the deliveries themselves.
    for (status, n) in crate::query::delivery_counts(t).unwrap() {
        let actual = deliveries.iter().filter(|d| d.status == status).count() as u64;
        assert_eq!(n, actual, "the {} counter", status.name());
    }
    assert_indexes_match_rows(t, &deliveries, &endpoints);
    assert_due_queue_is_the_pending(t, &deliveries);
    assert_order_index_is_the_pending(t, &deliveries, &events);
    for d in &deliveries {
        assert_delivery_agrees(t, d, &events, &endpoints);
    }
    for e in &events {
        for id in &e.delivery_ids {
            assert!(deliveries.iter().any(|d| d.id == *id && d.event_id == e.id));
        }
    }
    for e in &endpoints {
        assert_eq!(e.status == EndpointStatus::Inactive, e.inactive_reason.is_some(), "{e:?}");
        assert!(e.failure_run_at_ms.len() <= FAILURES_MAX_LIMIT as usize);
    }
    assert_recoveries_hold_their_members(t, &deliveries);
}

/// Each recovery's member chunks hold exactly `queued` distinct deliveries of its organisation,
/// every chunk but the last full; no chunk belongs to no recovery.
fn assert_recoveries_hold_their_members(t: &MemTables, deliveries: &[Delivery]) {
    let recoveries: Vec<crate::Recovery> = all(t, keys::KS_RECOVERY);
    let mut chunks_seen = 0;
    for r in &recoveries {
        let mut members = Vec::new();
        for chunk in 0u32.. {
            let ids = crate::recovery_members(t, r.id, chunk).unwrap();
            if ids.is_empty() {
                break;
            }
            chunks_seen += 1;
            members.extend(ids);
        }
        assert_eq!(members.len() as u64, r.queued, "{r:?}");
        assert_eq!(members.iter().collect::<BTreeSet<_>>().len(), members.len(), "a member twice: {r:?}");
        for id in &members {
            let d = deliveries.iter().find(|d| d.id == *id).unwrap_or_else(|| panic!("member {id} missing"));
            assert_eq!(d.org_id, r.org_id);
        }
    }
    let stored = t.scan(&[keys::KS_RECOVERY_MEMBERS], &[keys::KS_RECOVERY_MEMBERS + 1], usize::MAX).len();
    assert_eq!(stored, chunks_seen, "member chunks of no recovery");
}

/// The stored index keys are exactly those the rows give, and every key is in the projector's
/// keyspaces.
fn assert_indexes_match_rows(t: &MemTables, deliveries: &[Delivery], endpoints: &[Endpoint]) {
    let api_keys: Vec<ApiKey> = all(t, keys::KS_API_KEY);
    let mut expected: BTreeSet<(Vec<u8>, Vec<u8>)> = BTreeSet::new();
    let mut chunks = MemTables::new();
    for d in deliveries {
        for k in d.index_keys() {
            if crate::index::is_chunked(&k) {
                crate::tables::Tables::add_entry(&mut chunks, &k).unwrap();
            } else {
                expected.insert((k, Vec::new()));
            }
        }
    }
    expected.extend(chunks.dump());
    for e in endpoints.iter().filter(|e| !e.is_deleted()) {
        expected.insert((keys::endpoint_by_org(e.org_id, e.id), Vec::new()));
    }
    for k in api_keys.iter().filter(|k| k.revoked_at_ms.is_none()) {
        expected.insert((keys::api_key_by_hash(&k.key_hash), k.id.as_bytes().to_vec()));
    }
    let index_spaces = [
        keys::KS_API_KEY_BY_HASH,
        keys::KS_ENDPOINT_BY_ORG,
        keys::KS_DELIVERY_BY_ORG,
        keys::KS_DELIVERY_BY_ORG_STATUS,
        keys::KS_DELIVERY_BY_ENDPOINT,
        keys::KS_DELIVERY_BY_ENDPOINT_STATUS,
        keys::KS_DELIVERY_BY_ORG_TYPE,
        keys::KS_DUE,
        keys::KS_CHUNKS_BY_ORG_STATUS,
        keys::KS_CHUNKS_BY_ENDPOINT_STATUS,
        keys::KS_CHUNKS_BY_ORG_TYPE,
        keys::KS_CHUNKS_DUE,
    ];
    assert_keyspaces_hold(t, &index_spaces, &expected, "index entries");
    for (k, _) in t.iter() {
        assert!(
            (keys::KS_FIRST..=keys::KS_LAST).contains(&k[0]),
            "key outside the projector's keyspaces: {k:02x?}"
        );
    }
}

/// The pairs stored in `keyspaces` are exactly `expected`.
fn assert_keyspaces_hold(
    t: &MemTables,
    keyspaces: &[u8],
    expected: &BTreeSet<(Vec<u8>, Vec<u8>)>,
    what: &str,
) {
    let actual: BTreeSet<(Vec<u8>, Vec<u8>)> =
        t.iter().filter(|(k, _)| keyspaces.contains(&k[0])).map(|(k, v)| (k.to_vec(), v.to_vec())).collect();
    let stale: Vec<_> = actual.difference(expected).collect();
    let missing: Vec<_> = expected.difference(&actual).collect();
    assert!(stale.is_empty() && missing.is_empty(), "stale {what} {stale:02x?}, missing {missing:02x?}");
}

/// The due queue, read on its own: exactly the pending deliveries, at their next attempt.
fn assert_due_queue_is_the_pending(t: &MemTables, deliveries: &[Delivery]) {
    let due = crate::due_deliveries(t, None, u64::MAX, usize::MAX).expect("due queue decodes");
    let pending: Vec<&Delivery> = deliveries.iter().filter(|d| d.status == DeliveryStatus::Pending).collect();
    assert!(due.len() <= pending.len(), "due queue longer than the pending deliveries");
    for entry in &due {
        let d = deliveries.iter().find(|d| d.id == entry.delivery_id);
        let d = d.unwrap_or_else(|| panic!("due entry of a missing delivery {entry:?}"));
        assert_eq!(d.status, DeliveryStatus::Pending, "due but not pending: {d:?}");
        assert_eq!(d.next_attempt_at_ms, Some(entry.next_attempt_at_ms));
    }
    assert_eq!(due.len(), pending.len(), "a pending delivery missing from the due queue");
}

/// The order index (`order.rs`) holds exactly the pending deliveries to `per_key` endpoints that
/// have an ordering key, in (endpoint, key, event seq) order, each mapped back from its delivery;
/// every stored ordering key is of an existing event.
fn assert_order_index_is_the_pending(t: &MemTables, deliveries: &[Delivery], events: &[EventRecord]) {
    let mut expected: BTreeSet<(Vec<u8>, Vec<u8>)> = BTreeSet::new();
    for d in deliveries.iter().filter(|d| d.status == DeliveryStatus::Pending) {
        let Some(endpoint) = d.endpoint_id else { continue };
        let per_key =
            crate::get_endpoint_settings(t, endpoint).unwrap().ordering == crate::DeliveryOrder::PerKey;
        let key = crate::ordering_key(t, d.event_id, d.call_id).unwrap();
        if let (true, Some(key)) = (per_key, key) {
            let seq = events.iter().find(|e| e.id == d.event_id).expect("its event").seq;
            let entry = crate::order::entry(endpoint, &key, seq, d.id);
            expected.insert((keys::order_by_delivery(d.id), entry.clone()));
            expected.insert((entry, Vec::new()));
        }
    }
    assert_keyspaces_hold(t, &[keys::KS_ORDER, keys::KS_ORDER_BY_DELIVERY], &expected, "order entries");
    for (k, _) in t.iter().filter(|(k, _)| k[0] == keys::KS_ORDERING_KEY) {
        assert!(
            events.iter().any(|e| keys::ordering_key(e.id) == k),
            "ordering key of a missing event {k:02x?}"
        );
    }
}

/// One delivery's row agrees with itself, its attempts, its event and its endpoint.
fn assert_delivery_agrees(t: &MemTables, d: &Delivery, events: &[EventRecord], endpoints: &[Endpoint]) {
    let pending = d.status == DeliveryStatus::Pending;
    assert_eq!(pending, d.next_attempt_at_ms.is_some(), "next attempt iff pending: {d:?}");
    if d.status == DeliveryStatus::Delivered {
        assert!(d.delivered_at_ms.is_some(), "delivered without delivered_at: {d:?}");
    }
    assert_eq!(
        d.status == DeliveryStatus::Inactive,
        d.inactive_reason.is_some(),
        "inactive reason iff inactive: {d:?}"
    );
    let numbers: Vec<u32> =
        crate::attempts(t, d.id, 0, usize::MAX).expect("attempts decode").iter().map(|a| a.attempt).collect();
    assert_eq!(numbers, (1..=d.attempt_count).collect::<Vec<_>>(), "{d:?}");
    let event = events.iter().find(|e| e.id == d.event_id);
    let event = event.unwrap_or_else(|| panic!("delivery of a missing event: {d:?}"));
    assert_eq!(event.org_id, d.org_id);
    assert_eq!(event.event_type, d.event_type);
    assert!(event.delivery_ids.contains(&d.id));
    if let Some(endpoint_id) = d.endpoint_id {
        let endpoint = endpoints.iter().find(|e| e.id == endpoint_id);
        let endpoint = endpoint.unwrap_or_else(|| panic!("missing endpoint: {d:?}"));
        assert_eq!(endpoint.org_id, d.org_id);
    }
}
