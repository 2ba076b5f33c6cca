//! The order index through the fold: who waits behind whom, who is woken when the first of a key
//! leaves `pending`, and what retriggers and switches of an endpoint's ordering do.

use super::*;
use crate::testkit::*;
use crate::{ordering_key, waits_behind, DeliveryOrder, DeliverySettings, MemTables};

/// Applies `events` one by one; returns the tables and, per event, the deliveries it woke.
fn fold(events: &[Event]) -> (MemTables, Vec<Vec<u32>>) {
    let mut t = MemTables::new();
    let mut woken_by = Vec::new();
    for (i, event) in events.iter().enumerate() {
        let mut batch = TableBatch::new(&mut t);
        let mut woken = Vec::new();
        let at_ms = 1_000 + i as u64;
        apply_unstaged_waking(&mut batch, i as u64 + 1, at_ms, &stamped(at_ms, event), &mut woken)
            .unwrap_or_else(|e| panic!("step {} ({}): {e}", i + 1, event.kind()));
        batch.commit();
        woken_by.push(woken.iter().map(|d| number(d.delivery_id.0)).collect());
    }
    assert_consistent(&t);
    (t, woken_by)
}

fn number(id: Uuid) -> u32 {
    (id.as_u128() & 0xffff_ffff) as u32
}

fn per_key(e: u32, on: bool) -> Event {
    let ordering = if on { DeliveryOrder::PerKey } else { DeliveryOrder::Unordered };
    Event::EndpointDeliverySettingsSet {
        id: ep(e),
        settings: DeliverySettings { ordering, ..Default::default() },
    }
}

/// Event `v{v}` with call id `c` (or none), one delivery `d{v}` to e1, and its ordering key.
fn keyed(v: u32, call: Option<u128>, key: Option<&str>) -> Vec<Event> {
    let Event::EventPublished { id, org_id, event_type, payload, idempotency_key, .. } = publish(v) else {
        unreachable!()
    };
    let call_id = call.map(Uuid::from_u128);
    let mut events = vec![
        Event::EventPublished { id, org_id, event_type, payload, call_id, idempotency_key },
        delivery(v, v, Some(1), 0),
    ];
    if key.is_some() || call.is_some() {
        events.push(Event::OrderingKeySet { event_id: ev(v), ordering_key: key.map(String::from) });
    }
    events
}

/// Who each of d1..=n waits behind (0: nobody).
fn waits(t: &MemTables, n: u32) -> Vec<u32> {
    (1..=n).map(|d| waits_behind(t, dl(d)).unwrap().map_or(0, |w| number(w.0))).collect()
}

fn history(parts: &[Vec<Event>]) -> Vec<Event> {
    let mut events = vec![Event::RulesAdopted { version: 4 }, endpoint(1), per_key(1, true)];
    events.extend(parts.iter().flatten().cloned());
    events
}

#[test]
fn a_key_goes_one_at_a_time_in_event_order_and_the_next_is_woken() {
    let events = history(&[
        keyed(1, None, Some("a")),
        keyed(2, None, Some("b")),
        keyed(3, None, Some("a")),
        keyed(4, None, None),
    ]);
    let (t, _) = fold(&events);
    assert_eq!(waits(&t, 4), [0, 0, 1, 0], "d3 waits behind d1; other keys and no key go");
    assert_eq!(ordering_key(&t, ev(1), None).unwrap().as_deref(), Some("a"));

    let more = [events.clone(), vec![fail(1, 1, Some(9_000))]].concat();
    let (t, woken) = fold(&more);
    assert_eq!(waits(&t, 4), [0, 0, 1, 0], "a retry keeps d1 first");
    assert!(woken.last().unwrap().is_empty());

    let more = [more, vec![fail(1, 2, None)]].concat();
    let (t, woken) = fold(&more);
    assert_eq!(waits(&t, 4), [0, 0, 0, 0], "exhausted d1 releases d3");
    assert_eq!(woken.last().unwrap(), &[3]);

    let more = [more, vec![retrigger(1)]].concat();
    let (t, _) = fold(&more);
    assert_eq!(waits(&t, 4), [0, 0, 1, 0], "a retriggered d1 is first again");
}

#[test]
fn the_call_id_is_the_default_key() {
    let (t, _) = fold(&history(&[keyed(1, Some(7), None), keyed(2, Some(7), None), keyed(3, Some(8), None)]));
    assert_eq!(waits(&t, 3), [0, 1, 0]);
    assert_eq!(
        ordering_key(&t, ev(1), Some(Uuid::from_u128(7))).unwrap(),
        Some(Uuid::from_u128(7).hyphenated().to_string())
    );
}

#[test]
fn switching_ordering_on_enters_the_pending_and_off_wakes_the_waiting() {
    let events = [
        vec![Event::RulesAdopted { version: 4 }, endpoint(1)],
        keyed(1, Some(7), None),
        keyed(2, Some(7), None),
        keyed(3, Some(7), None),
        vec![ok(1, 1), per_key(1, true)],
    ]
    .concat();
    let (t, _) = fold(&events);
    assert_eq!(waits(&t, 3), [0, 0, 2], "d1 delivered before the switch; d2 first");
    let (t, woken) = fold(&[events, vec![per_key(1, false)]].concat());
    assert_eq!(waits(&t, 3), [0, 0, 0]);
    assert_eq!(woken.last().unwrap(), &[3], "the one that waited");
}

#[test]
fn an_endpoint_that_goes_inactive_takes_its_deliveries_out_of_the_order() {
    let events = history(&[
        keyed(1, None, Some("a")),
        keyed(2, None, Some("a")),
        vec![Event::EndpointDeleted { id: ep(1) }],
    ]);
    let (t, _) = fold(&events);
    assert_eq!(waits(&t, 2), [0, 0]);
    assert!(t.iter().all(|(k, _)| k[0] != keys::KS_ORDER && k[0] != keys::KS_ORDER_BY_DELIVERY));
}

#[test]
fn ordering_keys_fold_from_rules_4_once_per_event_and_valid() {
    let set = |key: &str| Event::OrderingKeySet { event_id: ev(1), ordering_key: Some(key.into()) };
    check_err(
        &[(0, endpoint(1)), (0, publish(1)), (0, set("a"))],
        ApplyError::BeforeItsRules { kind: "OrderingKeySet", in_force: 1 },
    );
    let rules4 = (0, Event::RulesAdopted { version: 4 });
    check_err(&[rules4.clone(), (0, set("a"))], ApplyError::UnknownEvent(ev(1)));
    check_err(
        &[rules4.clone(), (0, publish(1)), (0, set("a b"))],
        ApplyError::InvalidOrderingKey { event_id: ev(1) },
    );
    check_err(
        &[rules4, (0, publish(1)), (0, set("a")), (0, set("b"))],
        ApplyError::AlreadyExists { kind: "ordering key", id: ev(1).0 },
    );
}
