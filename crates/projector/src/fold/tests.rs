//! The fold, rule by rule (API.md's delivery states, endpoint health, retrigger and redeliver),
//! then every `ApplyError`. Each test is data: events in, rendered projection out.

use super::*;
use crate::query::*;
use crate::query::{DeliveryCursor, DeliveryIndex, DeliveryQuery};
use crate::testkit::*;
use crate::{
    EndpointStatus, MemTables, Policy, Scope, Trigger, IDEMPOTENCY_WINDOW_MS, RESPONSE_EXCERPT_BYTES_MAX,
};

const H: u64 = HOUR_MS;

/// Endpoint e1, event v1, and `n` deliveries d1..dn of v1 to e1, due at 1000.
fn setup(n: u32) -> Vec<(u64, Event)> {
    let mut events = vec![(0, endpoint(1)), (0, publish(1))];
    events.extend((1..=n).map(|d| (0, delivery(d, 1, Some(1), 1_000))));
    events
}

fn with(mut events: Vec<(u64, Event)>, more: &[(u64, Event)]) -> Vec<(u64, Event)> {
    events.extend_from_slice(more);
    events
}

/// `count` failures of d1 (attempts 1..=count), `step_ms` apart from `start_ms`, each retried.
fn failures(d: u32, count: u32, start_ms: u64, step_ms: u64) -> Vec<(u64, Event)> {
    (1..=count)
        .map(|n| {
            let at_ms = start_ms + u64::from(n - 1) * step_ms;
            (at_ms, fail(d, n, Some(at_ms + 5_000)))
        })
        .collect()
}

#[test]
fn created_pending_with_an_active_endpoint_and_inline() {
    check(
        &[
            (0, endpoint(1)),
            (0, publish(1)),
            (10, delivery(1, 1, Some(1), 1_000)),
            (10, delivery(2, 1, None, 1_000)),
        ],
        "e1 active
         d1 pending a=0 next=1000
         d2 pending a=0 next=1000",
    );
}

#[test]
fn success_delivers_and_clears_the_failure_run() {
    let t = check(
        &with(setup(1), &[(1_000, fail(1, 1, Some(6_000))), (6_000, ok(1, 2))]),
        "e1 active
         d1 delivered a=2",
    );
    let d = get_delivery(&t, dl(1)).unwrap().unwrap();
    assert_eq!(d.delivered_at_ms, Some(6_000));
    assert_eq!(d.last_response_status, Some(200));
    assert_eq!(d.last_error, None);
    assert_eq!(d.last_attempt_at_ms, Some(6_000));
    assert_eq!(d.attempts_since_reset, 2);
}

#[test]
fn failure_with_a_retry_stays_pending_and_without_one_exhausts() {
    let t = check(
        &with(setup(1), &[(1_000, fail(1, 1, Some(6_000)))]),
        "e1 active run=1
         d1 pending a=1 next=6000",
    );
    let d = get_delivery(&t, dl(1)).unwrap().unwrap();
    assert_eq!(d.last_error.as_deref(), Some("HTTP 503"));
    assert_eq!(d.last_response_status, Some(503));
    check(
        &with(setup(1), &[(1_000, fail(1, 1, Some(6_000))), (6_000, fail(1, 2, None))]),
        "e1 active run=2
         d1 exhausted a=2",
    );
}

#[test]
fn four_failures_in_the_window_keep_the_endpoint_active() {
    check(
        &with(setup(2), &failures(1, 4, 1_000, H)),
        "e1 active run=4
         d1 pending a=4 next=10806000
         d2 pending a=0 next=1000",
    );
}

#[test]
fn five_failures_in_the_window_make_the_endpoint_and_its_pending_deliveries_inactive() {
    let mut events = setup(4);
    events.extend([
        (500, fail(4, 1, None)), // exhausted: stays so
        (600, ok(3, 1)),         // clears the run
        // failures of several deliveries count together: d2 once, then d1 four times
        (1_000, fail(2, 1, Some(9_000))),
    ]);
    events.extend(failures(1, 4, 1_000 + H, H));
    events.extend([
        (5 * H, publish(2)),
        (5 * H, delivery(5, 2, Some(1), 5 * H)),
        (5 * H, delivery(6, 2, None, 5 * H)),
    ]);
    let reason = "[5 consecutive failures within 24h]";
    check(
        &events,
        &format!(
            "e1 inactive run=5 {reason}
             d1 inactive a=4 {reason}
             d2 inactive a=1 {reason}
             d3 delivered a=1
             d4 exhausted a=1
             d5 inactive a=0 {reason}
             d6 pending a=0 next={}",
            5 * H
        ),
    );
}

#[test]
fn a_success_in_between_resets_the_run() {
    let mut events = setup(2);
    events.extend(failures(1, 4, 1_000, 1_000));
    events.push((5_000, ok(2, 1)));
    events.extend(failures(1, 8, 1_000, 1_000).into_iter().skip(4).map(|(at, e)| (at + 5_000, e)));
    check(
        &events,
        "e1 active run=4
         d1 pending a=8 next=13000
         d2 delivered a=1",
    );
}

#[test]
fn the_window_edge() {
    // newest - oldest == 24h: inside the window.
    let edge = 24 * H / 4;
    check(
        &with(setup(1), &failures(1, 5, 0, edge)),
        "e1 inactive run=5 [5 consecutive failures within 24h]
         d1 inactive a=5 [5 consecutive failures within 24h]",
    );
    // one millisecond more: outside.
    let mut events = with(setup(1), &failures(1, 4, 0, edge));
    events.push((24 * H + 1, fail(1, 5, Some(25 * H))));
    check(
        &events,
        &format!(
            "e1 active run=5
             d1 pending a=5 next={}",
            25 * H
        ),
    );
}

#[test]
fn failures_25_hours_apart_keep_the_endpoint_active() {
    check(
        &with(setup(1), &failures(1, 7, 0, 25 * H)),
        &format!(
            "e1 active run=5
             d1 pending a=7 next={}",
            6 * 25 * H + 5_000
        ),
    );
}

fn inactive_endpoint() -> Vec<(u64, Event)> {
    with(setup(2), &failures(1, 5, 1_000, 1_000))
}

const REASON: &str = "[5 consecutive failures within 24h]";

#[test]
fn retrigger_from_inactive_then_a_failed_manual_attempt_is_inactive_again() {
    let events = with(inactive_endpoint(), &[(10_000, retrigger(1))]);
    let t = check(
        &events,
        &format!(
            "e1 inactive run=5 {REASON}
             d1 pending a=5 m=1 next=10000 manual
             d2 inactive a=0 {REASON}"
        ),
    );
    assert_eq!(get_delivery(&t, dl(1)).unwrap().unwrap().attempts_since_reset, 0);
    let manual_failure = attempt(
        1,
        6,
        Trigger::Manual,
        AttemptOutcome::Failed { status: None, error: "Connection timeout".into() },
        Some(15_000),
    );
    let t = check(
        &with(events, &[(11_000, manual_failure)]),
        &format!(
            "e1 inactive run=5 {REASON}
             d1 inactive a=6 m=1 {REASON}
             d2 inactive a=0 {REASON}"
        ),
    );
    let d = get_delivery(&t, dl(1)).unwrap().unwrap();
    assert_eq!(d.last_error.as_deref(), Some("Connection timeout"));
    assert_eq!(d.last_response_status, None);
}

#[test]
fn inactive_retriggered_and_delivered_reactivates_the_endpoint() {
    let manual_ok = attempt(1, 6, Trigger::Manual, AttemptOutcome::Delivered { status: 204 }, None);
    let t = check(
        &with(
            inactive_endpoint(),
            &[
                (10_000, retrigger(1)),
                (10_500, manual_ok),
                (11_000, publish(2)),
                (11_000, delivery(3, 2, Some(1), 12_000)),
            ],
        ),
        &format!(
            "e1 active
             d1 delivered a=6 m=1
             d2 inactive a=0 {REASON}
             d3 pending a=0 next=12000"
        ),
    );
    let trail: Vec<(u32, Trigger, Option<u16>)> = attempts(&t, dl(1), 0, 100)
        .unwrap()
        .iter()
        .map(|a| (a.attempt, a.trigger, a.response_status))
        .collect();
    assert_eq!(trail.len(), 6);
    assert_eq!(trail[5], (6, Trigger::Manual, Some(204)));
    assert_eq!(trail[0], (1, Trigger::Auto, Some(503)));
}

#[test]
fn retrigger_and_redeliver_from_exhausted() {
    let exhausted = with(setup(1), &[(1_000, fail(1, 1, None))]);
    for event in [retrigger(1), redeliver(1)] {
        check(
            &with(exhausted.clone(), &[(2_000, event)]),
            "e1 active run=1
             d1 pending a=1 m=1 next=2000 manual",
        );
    }
}

#[test]
fn redeliver_from_inactive() {
    check(
        &with(inactive_endpoint(), &[(9_000, redeliver(2))]),
        &format!(
            "e1 inactive run=5 {REASON}
             d1 inactive a=5 {REASON}
             d2 pending a=0 m=1 next=9000 manual"
        ),
    );
}

#[test]
fn redeliver_from_delivered_keeps_delivered_at_until_the_next_success() {
    let events = with(setup(1), &[(1_000, ok(1, 1)), (2_000, redeliver(1))]);
    let t = check(&events, "e1 active\nd1 pending a=1 m=1 next=2000 manual");
    let d = get_delivery(&t, dl(1)).unwrap().unwrap();
    assert_eq!(d.delivered_at_ms, Some(1_000));
    let again = attempt(1, 2, Trigger::Manual, AttemptOutcome::Delivered { status: 200 }, None);
    let t = check(&with(events, &[(2_100, again)]), "e1 active\nd1 delivered a=2 m=1");
    assert_eq!(get_delivery(&t, dl(1)).unwrap().unwrap().delivered_at_ms, Some(2_100));
}

#[test]
fn an_attempt_in_flight_when_the_endpoint_went_inactive_records_the_truth() {
    // d2's attempt was in flight while d1's fifth failure made e1 inactive.
    check(
        &with(inactive_endpoint(), &[(7_000, ok(2, 1))]),
        "e1 active
         d1 inactive a=5 [5 consecutive failures within 24h]
         d2 delivered a=1",
    );
    check(
        &with(inactive_endpoint(), &[(7_000, fail(2, 1, Some(12_000)))]),
        &format!(
            "e1 inactive run=5 {REASON}
             d1 inactive a=5 {REASON}
             d2 inactive a=1 {REASON}"
        ),
    );
}

#[test]
fn enable_makes_the_endpoint_active_and_leaves_inactive_deliveries() {
    check(
        &with(
            inactive_endpoint(),
            &[
                (8_000, Event::EndpointEnabled { id: ep(1) }),
                (8_000, publish(2)),
                (8_000, delivery(3, 2, Some(1), 9_000)),
                (9_000, fail(3, 1, Some(14_000))),
            ],
        ),
        &format!(
            "e1 active run=1
             d1 inactive a=5 {REASON}
             d2 inactive a=0 {REASON}
             d3 pending a=0 next=9000"
        )
        .replace("d3 pending a=0 next=9000", "d3 pending a=1 next=14000"),
    );
}

#[test]
fn delete_turns_pending_deliveries_inactive_and_keeps_history() {
    let events = with(
        setup(3),
        &[(500, ok(3, 1)), (600, fail(2, 1, None)), (700, Event::EndpointDeleted { id: ep(1) })],
    );
    let t = check(
        &events,
        "e1 deleted run=1
         d1 inactive a=0 [endpoint deleted]
         d2 exhausted a=1
         d3 delivered a=1",
    );
    assert!(list_endpoints(&t, org(1), None, 10).unwrap().items.is_empty());
    assert!(get_endpoint(&t, ep(1)).unwrap().unwrap().is_deleted());
    // still retriggerable; a failed attempt to a deleted endpoint leaves it inactive.
    check(
        &with(events, &[(800, retrigger(1)), (900, fail(1, 1, Some(5_000)))]),
        "e1 deleted run=1
         d1 inactive a=1 m=1 [endpoint deleted]
         d2 exhausted a=1
         d3 delivered a=1",
    );
}

#[test]
fn cascades_page_through_many_pending_deliveries() {
    let n = CASCADE_PAGE_LEN as u32 * 2 + 3;
    let t = run(&with(setup(n), &[(1, Event::EndpointDeleted { id: ep(1) })]));
    assert_consistent(&t);
    let statuses: std::collections::BTreeSet<_> = deliveries(&t).iter().map(|d| d.status).collect();
    assert_eq!(statuses, [DeliveryStatus::Inactive].into());
    assert_eq!(deliveries(&t).len(), n as usize);
}

#[test]
fn secret_rotation_keeps_older_secrets_until_they_expire() {
    let rotate = |secret: &str, previous_expires_at_ms| Event::EndpointSecretRotated {
        id: ep(1),
        secret: secret.into(),
        previous_expires_at_ms,
    };
    let t = run(&[(0, endpoint(1)), (1_000, rotate("whsec_b", 5_000)), (2_000, rotate("whsec_c", 6_000))]);
    let e = get_endpoint(&t, ep(1)).unwrap().unwrap();
    let cases: [(u64, &[&str]); 3] = [
        (2_000, &["whsec_c", "whsec_b", "whsec_e1"]),
        (5_000, &["whsec_c", "whsec_b"]),
        (6_000, &["whsec_c"]),
    ];
    for (now_ms, expected) in cases {
        assert_eq!(e.secrets_valid_at(now_ms), expected, "at {now_ms}");
    }
    // a rotation drops the secrets expired by then.
    let t = run(&[(0, endpoint(1)), (1_000, rotate("whsec_b", 5_000)), (5_000, rotate("whsec_c", 9_000))]);
    let e = get_endpoint(&t, ep(1)).unwrap().unwrap();
    assert_eq!(e.previous_secrets.len(), 1);
    assert_eq!(e.secrets_valid_at(5_000), ["whsec_c", "whsec_b"]);
}

#[test]
fn policy_events_change_the_window() {
    let policy = Policy {
        retry_schedule_ms: vec![1_000],
        failures_max: 2,
        failure_window_ms: H,
        rotation_overlap_ms: 0,
    };
    let mut events = vec![(0, Event::PolicySet(policy.clone()))];
    events.extend(setup(1));
    events.extend(failures(1, 2, 1_000, H));
    let t = check(
        &events,
        "e1 inactive run=2 [2 consecutive failures within 1h]
         d1 inactive a=2 [2 consecutive failures within 1h]",
    );
    assert_eq!(crate::policy(&t).unwrap(), policy);
    assert_eq!(crate::policy(&MemTables::new()).unwrap(), Policy::default());
    // 2 failures more than an hour apart: still active.
    let mut events = vec![(0, Event::PolicySet(policy))];
    events.extend(setup(1));
    events.extend(failures(1, 2, 1_000, H + 1));
    check(&events, &format!("e1 active run=2\nd1 pending a=2 next={}", H + 6_001));
}

#[test]
fn endpoint_updates_change_the_given_fields() {
    let t = run(&[
        (0, endpoint(1)),
        (
            5,
            Event::EndpointUpdated {
                id: ep(1),
                url: Some("https://new.example".into()),
                name: None,
                enabled_events: Some(vec!["call.queued".into()]),
            },
        ),
    ]);
    let e = get_endpoint(&t, ep(1)).unwrap().unwrap();
    assert_eq!(
        (e.url.as_str(), e.name.as_str(), e.updated_at_ms, e.created_at_ms),
        ("https://new.example", "e1", 5, 0)
    );
    assert!(e.subscribes_to("call.queued") && !e.subscribes_to("call.ended"));
}

#[test]
fn events_keep_their_seq_and_deliveries_not_their_payload() {
    let t = check(
        &[
            (0, endpoint(1)),
            (0, endpoint(2)),
            (7, publish(1)),
            (7, delivery(1, 1, Some(1), 7)),
            (7, delivery(2, 1, Some(2), 7)),
        ],
        "e1 active\ne2 active\nd1 pending a=0 next=7\nd2 pending a=0 next=7",
    );
    let record = get_event(&t, ev(1)).unwrap().unwrap();
    assert_eq!(record.seq, 3);
    assert_eq!(record.delivery_ids, vec![dl(1), dl(2)]);
    assert_eq!(record.created_at_ms, 7);
    let payload = br#"{"n":1}"#;
    assert!(!t.iter().any(|(_, v)| v.windows(payload.len()).any(|w| w == payload)));
}

#[test]
fn idempotency_keys_answer_for_24_hours() {
    let keyed = |n, key: &str| match publish(n) {
        Event::EventPublished { id, org_id, event_type, payload, call_id, .. } => Event::EventPublished {
            id,
            org_id,
            event_type,
            payload,
            call_id,
            idempotency_key: Some(key.into()),
        },
        other => other,
    };
    let day_ms = IDEMPOTENCY_WINDOW_MS;
    let t = run(&[(1_000, keyed(1, "k"))]);
    let hit = |now_ms| idempotency_lookup(&t, org(1), "k", now_ms).unwrap();
    assert_eq!(hit(1_000).map(|h| h.event_id), Some(ev(1)));
    assert_eq!(hit(1_000 + day_ms - 1).map(|h| h.at_ms), Some(1_000));
    assert_eq!(hit(1_000 + day_ms), None);
    assert_eq!(idempotency_lookup(&t, org(2), "k", 1_000).unwrap(), None);
    check_err(
        &[(1_000, keyed(1, "k")), (2_000, keyed(2, "k"))],
        ApplyError::IdempotencyKeyReused { org_id: org(1), key: "k".into(), event_id: ev(1) },
    );
    let t = run(&[(1_000, keyed(1, "k")), (1_000 + day_ms, keyed(2, "k"))]);
    let hit = idempotency_lookup(&t, org(1), "k", 1_000 + day_ms).unwrap();
    assert_eq!(hit.map(|h| h.event_id), Some(ev(2)));
}

fn api_key(n: u32, hash: u8) -> Event {
    Event::ApiKeyCreated {
        id: key_id(n),
        org_id: Some(org(1)),
        scopes: vec![Scope::DeliveriesRead],
        name: format!("k{n}"),
        key_hash: [hash; 32],
    }
}

#[test]
fn api_keys_are_found_by_hash_until_revoked() {
    let t = run(&[(1, api_key(1, 0xaa)), (2, api_key(2, 0xbb)), (3, Event::ApiKeyRevoked { id: key_id(1) })]);
    assert_eq!(get_api_key_by_hash(&t, &[0xaa; 32]).unwrap(), None);
    let k2 = get_api_key_by_hash(&t, &[0xbb; 32]).unwrap().unwrap();
    assert_eq!((k2.id, k2.created_at_ms), (key_id(2), 2));
    let k1 = get_api_key(&t, key_id(1)).unwrap().unwrap();
    assert_eq!(k1.revoked_at_ms, Some(3));
    let first = list_api_keys(&t, None, 1).unwrap();
    assert_eq!(first.items.len(), 1);
    assert_eq!(first.next, Some(key_id(1)));
    let second = list_api_keys(&t, first.next, 1).unwrap();
    assert_eq!((second.items[0].id, second.next), (key_id(2), None));
    assert_consistent(&t);
}

#[test]
fn org_secrets() {
    let set = |secret: &str| Event::OrgSecretSet { org_id: org(1), secret: secret.into() };
    let t = run(&[(0, set("whsec_a")), (1, set("whsec_b"))]);
    assert_eq!(org_secret(&t, org(1)).unwrap().as_deref(), Some("whsec_b"));
    assert_eq!(org_secret(&t, org(2)).unwrap(), None);
}

#[test]
fn attempts_keep_what_the_api_shows() {
    let mut failed = fail(1, 1, Some(9_000));
    if let Event::AttemptRecorded { started_at_ms, finished_at_ms, .. } = &mut failed {
        *started_at_ms = 1_000;
        *finished_at_ms = 1_250;
    }
    let t = run(&with(setup(1), &[(1_300, failed), (9_000, ok(1, 2))]));
    let all = attempts(&t, dl(1), 0, 10).unwrap();
    assert_eq!(all.len(), 2);
    assert_eq!(all[0].duration_ms(), 250);
    assert_eq!(all[0].error.as_deref(), Some("HTTP 503"));
    assert_eq!(all[0].response_excerpt, b"busy");
    assert_eq!(all[1].error, None);
    assert_eq!(attempts(&t, dl(1), 1, 10).unwrap()[0].attempt, 2);
    assert_eq!(attempts(&t, dl(1), 0, 1).unwrap().len(), 1);
    assert!(attempts(&t, dl(2), 0, 10).unwrap().is_empty());
}

type ListRev<'a> =
    dyn Fn(&DeliveryQuery, Option<DeliveryCursor>, usize) -> Page<Delivery, DeliveryCursor> + 'a;

#[test]
fn delivery_lists_page_through_each_index() {
    let mut events = vec![(0, endpoint(1)), (0, endpoint(2)), (0, publish(1))];
    // d1..d6 created at 10, 20, ... alternately to e1 and e2; d6 inline.
    for d in 1..=6u32 {
        let e = match d {
            6 => None,
            d => Some(1 + d % 2),
        };
        events.push((u64::from(d) * 10, delivery(d, 1, e, 100)));
    }
    events.push((70, fail(2, 1, None))); // d2 exhausted
    let t = run(&events);
    assert_consistent(&t);
    let ids = |query: DeliveryQuery, limit| {
        let mut out = Vec::new();
        let mut after = None;
        for _ in 0..20 {
            let page = list_deliveries(&t, &query, after, limit).unwrap();
            out.extend(page.items.iter().map(|d| label(d.id.0)));
            match page.next {
                Some(next) => after = Some(next),
                None => return out.join(" "),
            }
        }
        panic!("no last page");
    };
    let cases = [
        (DeliveryQuery::all(DeliveryIndex::Org(org(1))), "d1 d2 d3 d4 d5 d6"),
        (DeliveryQuery::all(DeliveryIndex::Org(org(2))), ""),
        (DeliveryQuery::all(DeliveryIndex::OrgStatus(org(1), DeliveryStatus::Exhausted)), "d2"),
        (DeliveryQuery::all(DeliveryIndex::OrgStatus(org(1), DeliveryStatus::Pending)), "d1 d3 d4 d5 d6"),
        (DeliveryQuery::all(DeliveryIndex::Endpoint(ep(1))), "d2 d4"),
        (DeliveryQuery::all(DeliveryIndex::EndpointStatus(ep(1), DeliveryStatus::Pending)), "d4"),
        (DeliveryQuery::all(DeliveryIndex::OrgEventType(org(1), "call.queued".into())), "d1 d2 d3 d4 d5 d6"),
        (DeliveryQuery::all(DeliveryIndex::OrgEventType(org(1), "call.queue".into())), ""),
        // An admin's list over organisations.
        (
            DeliveryQuery::all(DeliveryIndex::Union(vec![
                DeliveryIndex::Org(org(2)),
                DeliveryIndex::OrgStatus(org(1), DeliveryStatus::Exhausted),
            ])),
            "d2",
        ),
        // A delivery met in two parts (its status changed between their reads) is listed once.
        (
            DeliveryQuery::all(DeliveryIndex::Union(vec![
                DeliveryIndex::Org(org(1)),
                DeliveryIndex::OrgStatus(org(1), DeliveryStatus::Pending),
            ])),
            "d1 d2 d3 d4 d5 d6",
        ),
        (
            DeliveryQuery {
                index: DeliveryIndex::Org(org(1)),
                created_from_ms: Some(20),
                created_before_ms: Some(50),
            },
            "d2 d3 d4",
        ),
    ];
    // Newest first, over the tables in memory and over a store (which walks back with `last`).
    let store = herald_log::MemStore::new();
    store.with_map(|m| m.extend(t.dump()));
    let stored = crate::StoreTables(&store);
    let ids_rev = |tables: &ListRev<'_>, query: DeliveryQuery, limit| {
        let mut out = Vec::new();
        let mut before = None;
        for _ in 0..20 {
            let page = tables(&query, before, limit);
            out.extend(page.items.iter().map(|d| label(d.id.0)));
            match page.next {
                Some(next) => before = Some(next),
                None => return out.join(" "),
            }
        }
        panic!("no last page");
    };
    let mem = |q: &DeliveryQuery, c, l| list_deliveries_rev(&t, q, c, l).unwrap();
    let on_store = |q: &DeliveryQuery, c, l| list_deliveries_rev(&stored, q, c, l).unwrap();
    for (query, expected) in cases {
        let reversed: Vec<&str> = expected.split_whitespace().rev().collect();
        for limit in [1, 2, 100] {
            assert_eq!(ids(query.clone(), limit), expected, "{query:?} by {limit}");
            assert_eq!(ids_rev(&mem, query.clone(), limit), reversed.join(" "), "rev {query:?} by {limit}");
            assert_eq!(
                ids_rev(&on_store, query.clone(), limit),
                reversed.join(" "),
                "stored {query:?} by {limit}"
            );
        }
    }
    let after = DeliveryCursor { created_at_ms: 30, id: dl(3) };
    let page = list_deliveries(&t, &DeliveryQuery::all(DeliveryIndex::Org(org(1))), Some(after), 2).unwrap();
    assert_eq!(page.items.iter().map(|d| d.id).collect::<Vec<_>>(), [dl(4), dl(5)]);
}

#[test]
fn due_deliveries_up_to_a_time() {
    let mut events = vec![(0, endpoint(1)), (0, publish(1))];
    for (d, next_ms) in [(1, 300), (2, 100), (3, 200), (4, 200)] {
        events.push((0, delivery(d, 1, Some(1), next_ms)));
    }
    events.push((0, ok(4, 1)));
    let t = run(&events);
    let due = |after, until_ms, limit| -> Vec<(u64, String)> {
        due_deliveries(&t, after, until_ms, limit)
            .unwrap()
            .iter()
            .map(|d| (d.next_attempt_at_ms, label(d.delivery_id.0)))
            .collect()
    };
    let s = |pairs: &[(u64, &str)]| -> Vec<(u64, String)> {
        pairs.iter().map(|(at, l)| (*at, l.to_string())).collect()
    };
    assert_eq!(due(None, 99, 10), s(&[]));
    assert_eq!(due(None, 200, 10), s(&[(100, "d2"), (200, "d3")]));
    assert_eq!(due(None, u64::MAX, 2), s(&[(100, "d2"), (200, "d3")]));
    let after = Due { next_attempt_at_ms: 200, delivery_id: dl(3) };
    assert_eq!(due(Some(after), u64::MAX, 10), s(&[(300, "d1")]));
}

// --- every ApplyError ---

#[test]
fn seq_must_be_the_next_one() {
    let mut t = MemTables::new();
    let e = endpoint(1);
    assert_eq!(apply(&mut t, 2, 0, &e), Err(ApplyError::SeqNotNext { expected: 1, got: 2 }));
    assert_eq!(apply(&mut t, 0, 0, &e), Err(ApplyError::SeqNotNext { expected: 1, got: 0 }));
    apply(&mut t, 1, 0, &e).unwrap();
    assert_eq!(applied_seq(&t).unwrap(), 1);
    for seq in [1, 3] {
        assert_eq!(
            apply(&mut t, seq, 0, &endpoint(2)),
            Err(ApplyError::SeqNotNext { expected: 2, got: seq })
        );
    }
    assert_eq!(applied_seq(&t).unwrap(), 1);
}

#[test]
fn objects_exist_once() {
    let cases = [
        (vec![(0, endpoint(1)), (0, endpoint(1))], "endpoint", ep(1).0),
        (vec![(0, publish(1)), (0, publish(1))], "event", ev(1).0),
        (with(setup(1), &[(0, delivery(1, 1, None, 0))]), "delivery", dl(1).0),
        (vec![(0, api_key(1, 1)), (0, api_key(1, 2))], "api key", key_id(1).0),
    ];
    for (events, kind, id) in cases {
        check_err(&events, ApplyError::AlreadyExists { kind, id });
    }
    check_err(&[(0, api_key(1, 7)), (0, api_key(2, 7))], ApplyError::ApiKeyHashTaken { id: key_id(1) });
}

#[test]
fn unknown_ids() {
    let cases = [
        (vec![(0, publish(1)), (0, delivery(1, 1, Some(9), 0))], ApplyError::UnknownEndpoint(ep(9))),
        (vec![(0, endpoint(1)), (0, delivery(1, 9, Some(1), 0))], ApplyError::UnknownEvent(ev(9))),
        (vec![(0, Event::EndpointEnabled { id: ep(9) })], ApplyError::UnknownEndpoint(ep(9))),
        (vec![(0, Event::EndpointDeleted { id: ep(9) })], ApplyError::UnknownEndpoint(ep(9))),
        (
            vec![(0, Event::EndpointUpdated { id: ep(9), url: None, name: None, enabled_events: None })],
            ApplyError::UnknownEndpoint(ep(9)),
        ),
        (
            vec![(
                0,
                Event::EndpointSecretRotated { id: ep(9), secret: "s".into(), previous_expires_at_ms: 0 },
            )],
            ApplyError::UnknownEndpoint(ep(9)),
        ),
        (vec![(0, ok(9, 1))], ApplyError::UnknownDelivery(dl(9))),
        (vec![(0, retrigger(9))], ApplyError::UnknownDelivery(dl(9))),
        (vec![(0, redeliver(9))], ApplyError::UnknownDelivery(dl(9))),
        (vec![(0, Event::ApiKeyRevoked { id: key_id(9) })], ApplyError::UnknownApiKey(key_id(9))),
    ];
    for (events, expected) in cases {
        check_err(&events, expected);
    }
}

#[test]
fn a_deleted_endpoint_takes_no_delivery_and_no_change() {
    let deleted = vec![(0, endpoint(1)), (0, publish(1)), (0, Event::EndpointDeleted { id: ep(1) })];
    let changes = [
        delivery(1, 1, Some(1), 0),
        Event::EndpointDeleted { id: ep(1) },
        Event::EndpointEnabled { id: ep(1) },
        Event::EndpointUpdated { id: ep(1), url: None, name: Some("x".into()), enabled_events: None },
        Event::EndpointSecretRotated { id: ep(1), secret: "s".into(), previous_expires_at_ms: 0 },
    ];
    for change in changes {
        check_err(&with(deleted.clone(), &[(1, change)]), ApplyError::EndpointDeleted(ep(1)));
    }
}

#[test]
fn deliveries_stay_in_their_organisation() {
    let other_org_event = Event::EventPublished {
        id: ev(2),
        org_id: org(2),
        event_type: "t".into(),
        payload: vec![],
        call_id: None,
        idempotency_key: None,
    };
    check_err(
        &[(0, other_org_event), (0, delivery(1, 2, None, 0))],
        ApplyError::OrgMismatch { kind: "event", id: ev(2).0, expected: org(2), got: org(1) },
    );
    let other_org_endpoint = Event::EndpointCreated {
        id: ep(2),
        org_id: org(2),
        url: "u".into(),
        name: "n".into(),
        enabled_events: vec![],
        secret: "s".into(),
    };
    check_err(
        &[(0, other_org_endpoint), (0, publish(1)), (0, delivery(1, 1, Some(2), 0))],
        ApplyError::OrgMismatch { kind: "endpoint", id: ep(2).0, expected: org(2), got: org(1) },
    );
}

#[test]
fn forbidden_transitions() {
    use DeliveryStatus::*;
    let not_allowed = |from, to, cause| ApplyError::TransitionNotAllowed {
        delivery_id: dl(1),
        from: Some(from),
        to,
        cause,
    };
    let delivered = with(setup(1), &[(1, ok(1, 1))]);
    let exhausted = with(setup(1), &[(1, fail(1, 1, None))]);
    let cases = [
        (with(setup(1), &[(1, retrigger(1))]), not_allowed(Pending, Pending, Cause::Retrigger)),
        (with(setup(1), &[(1, redeliver(1))]), not_allowed(Pending, Pending, Cause::Redeliver)),
        (with(delivered.clone(), &[(2, retrigger(1))]), not_allowed(Delivered, Pending, Cause::Retrigger)),
        (
            with(delivered.clone(), &[(2, ok(1, 2))]),
            not_allowed(Delivered, Delivered, Cause::AttemptSucceeded),
        ),
        (with(delivered, &[(2, fail(1, 2, None))]), not_allowed(Delivered, Exhausted, Cause::AttemptFailed)),
        (
            with(exhausted.clone(), &[(2, ok(1, 2))]),
            not_allowed(Exhausted, Delivered, Cause::AttemptSucceeded),
        ),
        (with(exhausted, &[(2, fail(1, 2, Some(9)))]), not_allowed(Exhausted, Pending, Cause::AttemptFailed)),
    ];
    for (events, expected) in cases {
        check_err(&events, expected);
    }
}

#[test]
fn attempts_are_numbered_in_order() {
    for (events, expected, got) in [
        (with(setup(1), &[(1, ok(1, 2))]), 1, 2),
        (with(setup(1), &[(1, fail(1, 1, Some(5))), (5, fail(1, 1, Some(9)))]), 2, 1),
    ] {
        check_err(&events, ApplyError::AttemptOutOfOrder { delivery_id: dl(1), expected, got });
    }
}

#[test]
fn attempts_that_contradict_themselves() {
    let mut backwards = fail(1, 1, Some(5));
    let mut too_long = fail(1, 1, Some(5));
    match (&mut backwards, &mut too_long) {
        (
            Event::AttemptRecorded { started_at_ms, finished_at_ms, .. },
            Event::AttemptRecorded { response_excerpt, .. },
        ) => {
            *started_at_ms = 10;
            *finished_at_ms = 9;
            *response_excerpt = vec![b'x'; RESPONSE_EXCERPT_BYTES_MAX + 1];
        }
        _ => unreachable!(),
    }
    let cases = [
        (backwards, "finished before it started"),
        (too_long, "response excerpt over RESPONSE_EXCERPT_BYTES_MAX"),
        (
            attempt(1, 1, Trigger::Auto, AttemptOutcome::Delivered { status: 302 }, None),
            "a success without a 2xx status",
        ),
        (
            attempt(
                1,
                1,
                Trigger::Auto,
                AttemptOutcome::Failed { status: Some(200), error: "e".into() },
                None,
            ),
            "a failure with a 2xx status",
        ),
        (
            attempt(1, 1, Trigger::Auto, AttemptOutcome::Delivered { status: 200 }, Some(9)),
            "a retry after a success",
        ),
    ];
    for (event, reason) in cases {
        check_err(&with(setup(1), &[(20, event)]), ApplyError::InvalidAttempt { delivery_id: dl(1), reason });
    }
}

fn url_update(e: u32, url: &str) -> Event {
    Event::EndpointUpdated { id: ep(e), url: Some(url.into()), name: None, enabled_events: None }
}

/// The same history under rules 1 and under rules 2 (adopted first): what version 2 changes is
/// an endpoint's `updated_at` on a health change, and a delivery's `url` after its endpoint's
/// url changed. Everything else is the same.
#[test]
fn rules_2_move_updated_at_on_health_changes_and_urls_with_the_endpoint() {
    let history = with(
        inactive_endpoint(), // e1 inactive at 5_000 by d1's fifth failure; d2 inactive with it
        &[
            (6_000, url_update(1, "https://moved.example")),
            (7_000, retrigger(2)),
            (7_500, ok(2, 1)), // e1 active again
        ],
    );
    for rules in [1, 2] {
        let events = if rules == 1 {
            history.clone()
        } else {
            [vec![(0, Event::RulesAdopted { version: 2 })], history.clone()].concat()
        };
        let t = run(&events);
        assert_eq!(rules_in_force(&t), rules);
        let e = get_endpoint(&t, ep(1)).unwrap().unwrap();
        let (d1, d2) = (get_delivery(&t, dl(1)).unwrap().unwrap(), get_delivery(&t, dl(2)).unwrap().unwrap());
        let old_url = d1.url.clone();
        assert_ne!(old_url, "https://moved.example");
        if rules == 1 {
            // Only the url update moved it; the deliveries keep the url they were made with.
            assert_eq!(e.updated_at_ms, 6_000);
            assert_eq!(d2.url, old_url);
        } else {
            // Active again at 7_500, after the url update at 6_000.
            assert_eq!(e.updated_at_ms, 7_500);
            // d2 went to the new url; d1, not attempted since, still names the one it went to.
            assert_eq!(d2.url, "https://moved.example");
            assert_eq!(d1.url, old_url);
        }
        assert_eq!((e.status, d2.status), (EndpointStatus::Active, DeliveryStatus::Delivered));
    }

    // Under rules 2 the inactivation moves it too, and a retrigger takes the new url at once.
    let t = run(&with(
        [vec![(0, Event::RulesAdopted { version: 2 })], inactive_endpoint()].concat(),
        &[(6_000, url_update(1, "https://moved.example")), (7_000, retrigger(2))],
    ));
    assert_eq!(get_endpoint(&t, ep(1)).unwrap().unwrap().updated_at_ms, 6_000);
    let inactive_at = run(&[vec![(0, Event::RulesAdopted { version: 2 })], inactive_endpoint()].concat());
    assert_eq!(get_endpoint(&inactive_at, ep(1)).unwrap().unwrap().updated_at_ms, 5_000);
    assert_eq!(get_delivery(&t, dl(2)).unwrap().unwrap().url, "https://moved.example");
}

fn interrupted(d: u32, n: u32, retry_at_ms: u64) -> Event {
    let outcome = AttemptOutcome::Interrupted { error: "interrupted: herald stopped".into() };
    attempt(d, n, Trigger::Auto, outcome, Some(retry_at_ms))
}

/// Rules 3: an attempt cut short by a stop is in the history and the attempt count, but it is
/// not a failure: the endpoint's failure run and the delivery's step in its schedule stay.
#[test]
fn rules_3_record_an_interrupted_attempt_without_counting_it_as_a_failure() {
    let adopt = |version| (0, Event::RulesAdopted { version });
    let four_failures = with(setup(2), &failures(1, 4, 1_000, H));
    let events = with(
        [vec![adopt(2), adopt(3)], four_failures.clone()].concat(),
        &[(5 * H, interrupted(1, 5, 5 * H))],
    );
    // A fifth failure would have made e1 inactive (see the test above).
    let t = check(
        &events,
        &format!(
            "e1 active run=4
             d1 pending a=5 next={}
             d2 pending a=0 next=1000",
            5 * H
        ),
    );
    let d1 = get_delivery(&t, dl(1)).unwrap().unwrap();
    assert_eq!(d1.attempts_since_reset, 4, "the interrupted attempt used a step of the schedule");
    assert_eq!(d1.last_error.as_deref(), Some("HTTP 503"), "the last failure's error is kept");
    assert_eq!(d1.last_response_status, Some(503));
    let history = attempts(&t, dl(1), 0, 10).unwrap();
    assert_eq!(history.len(), 5, "the interrupted attempt is not in the history");

    // The attempt made again after the restart is the fifth failure of the run.
    let t = run(&with(events.clone(), &[(5 * H + 10, fail(1, 6, Some(6 * H)))]));
    assert_eq!(get_endpoint(&t, ep(1)).unwrap().unwrap().status, EndpointStatus::Inactive);
    assert_eq!(get_delivery(&t, dl(1)).unwrap().unwrap().attempts_since_reset, 5);

    // Never exhausted, never without its retry, and not under earlier rules.
    let reason = "an interrupted attempt with an answer or without a retry";
    let mut no_retry = interrupted(1, 5, 5 * H);
    if let Event::AttemptRecorded { retry_at_ms, .. } = &mut no_retry {
        *retry_at_ms = None;
    }
    check_err(
        &with([vec![adopt(2), adopt(3)], four_failures.clone()].concat(), &[(5 * H, no_retry)]),
        ApplyError::InvalidAttempt { delivery_id: dl(1), reason },
    );
    check_err(
        &with([vec![adopt(2)], four_failures].concat(), &[(5 * H, interrupted(1, 5, 5 * H))]),
        ApplyError::InvalidAttempt {
            delivery_id: dl(1),
            reason: "an interrupted attempt under rules before 3",
        },
    );
}

fn rules_in_force(t: &MemTables) -> u32 {
    rules(t).unwrap()
}

#[test]
fn rules_are_adopted_forward_only_and_up_to_the_current_ones() {
    let adopt = |version| Event::RulesAdopted { version };
    check_err(&[(0, adopt(1))], ApplyError::UnknownRules { in_force: 1, got: 1 });
    check_err(&[(0, adopt(0))], ApplyError::UnknownRules { in_force: 1, got: 0 });
    check_err(
        &[(0, adopt(RULES_CURRENT + 1))],
        ApplyError::UnknownRules { in_force: 1, got: RULES_CURRENT + 1 },
    );
    check_err(&[(0, adopt(2)), (0, adopt(2))], ApplyError::UnknownRules { in_force: 2, got: 2 });
    assert_eq!(rules_in_force(&run(&[])), 1);
    assert_eq!(rules_in_force(&run(&[(0, adopt(2))])), 2);
}

#[test]
fn invalid_policies_and_revocations() {
    let zero = Policy { failures_max: 0, ..Policy::default() };
    check_err(
        &[(0, Event::PolicySet(zero))],
        ApplyError::InvalidPolicy { reason: "failures_max must be at least 1" },
    );
    check_err(
        &[
            (0, api_key(1, 1)),
            (0, Event::ApiKeyRevoked { id: key_id(1) }),
            (0, Event::ApiKeyRevoked { id: key_id(1) }),
        ],
        ApplyError::ApiKeyAlreadyRevoked(key_id(1)),
    );
}

#[test]
fn corrupt_values_are_typed_errors() {
    let mut t = run(&setup(1));
    let key = keys::delivery(dl(1));
    t.put(key.clone(), vec![0xff, 0xff, 0xff]);
    let before = t.dump();
    assert_eq!(apply(&mut t, 4, 1, &ok(1, 1)), Err(ApplyError::Corrupt(CorruptValue { key: key.clone() })));
    assert_eq!(t.dump(), before);
    assert_eq!(get_delivery(&t, dl(1)), Err(CorruptValue { key }));
    t.put(keys::META_APPLIED_SEQ.to_vec(), vec![1, 2]);
    assert!(matches!(apply(&mut t, 4, 1, &ok(1, 1)), Err(ApplyError::Corrupt(_))));
}

/// A publish in one record folds exactly as the event and then each delivery in records of
/// their own (what earlier versions wrote): the same tables, but for the applied seq.
#[test]
fn a_publish_with_its_deliveries_folds_as_the_event_then_each_delivery() {
    let new = |event: Event| match event {
        Event::DeliveryCreated { id, endpoint_id, url, next_attempt_at_ms, .. } => {
            crate::NewDelivery { id, endpoint_id, url, next_attempt_at_ms }
        }
        other => panic!("not a delivery: {other:?}"),
    };
    let Event::EventPublished { id, org_id, event_type, payload, call_id, idempotency_key } = publish(1)
    else {
        panic!("publish(1) publishes");
    };
    let merged = Event::EventPublishedWithDeliveries {
        id,
        org_id,
        event_type,
        payload,
        call_id,
        idempotency_key,
        deliveries: vec![new(delivery(1, 1, Some(1), 1_000)), new(delivery(2, 1, None, 1_000))],
    };
    let separate = run(&[
        (0, endpoint(1)),
        (10, publish(1)),
        (10, delivery(1, 1, Some(1), 1_000)),
        (10, delivery(2, 1, None, 1_000)),
        (20, ok(1, 1)),
    ]);
    let together = run(&[(0, endpoint(1)), (10, merged), (20, ok(1, 1))]);
    let without_seq = |t: &MemTables| -> Vec<(Vec<u8>, Vec<u8>)> {
        t.dump().into_iter().filter(|(k, _)| k != keys::META_APPLIED_SEQ).collect()
    };
    assert_eq!(without_seq(&together), without_seq(&separate));
    assert_eq!(applied_seq(&together).unwrap(), 3);
    assert_consistent(&together);
}

fn settings_set(e: u32, rate_limit_per_s: Option<u32>) -> Event {
    Event::EndpointDeliverySettingsSet {
        id: ep(e),
        settings: crate::DeliverySettings {
            rate_limit_per_s,
            max_in_flight: Some(4),
            ordering: crate::DeliveryOrder::PerKey,
            headers: vec![("x-tenant".into(), "a".into())],
        },
    }
}

#[test]
fn delivery_settings_fold_from_rules_4_and_the_default_stores_nothing() {
    let rules4 = (0, Event::RulesAdopted { version: 4 });
    let t = run(&[(0, endpoint(1)), rules4.clone(), (7, settings_set(1, Some(50)))]);
    let settings = get_endpoint_settings(&t, ep(1)).unwrap();
    assert_eq!(settings.rate_limit_per_s, Some(50));
    assert_eq!(settings.headers, vec![("x-tenant".to_string(), "a".to_string())]);
    assert_eq!(get_endpoint(&t, ep(1)).unwrap().unwrap().updated_at_ms, 7, "a change of the endpoint");
    assert_eq!(get_endpoint_settings(&t, ep(2)).unwrap(), crate::DeliverySettings::default());

    let back = Event::EndpointDeliverySettingsSet { id: ep(1), settings: crate::DeliverySettings::default() };
    let t = run(&[(0, endpoint(1)), rules4.clone(), (7, settings_set(1, Some(50))), (8, back)]);
    assert_eq!(get_endpoint_settings(&t, ep(1)).unwrap(), crate::DeliverySettings::default());
    assert!(
        t.dump().iter().all(|(k, _)| k[0] != keys::KS_ENDPOINT_SETTINGS),
        "nothing stored for the default"
    );

    check_err(
        &[(0, endpoint(1)), (0, settings_set(1, None))],
        ApplyError::BeforeItsRules { kind: "EndpointDeliverySettingsSet", in_force: 1 },
    );
    check_err(&[rules4.clone(), (0, settings_set(9, None))], ApplyError::UnknownEndpoint(ep(9)));
    check_err(
        &[(0, endpoint(1)), rules4, (0, Event::EndpointDeleted { id: ep(1) }), (1, settings_set(1, None))],
        ApplyError::EndpointDeleted(ep(1)),
    );
}
