//! Retention, checkpoint and legacy migration, through a log whose machine appends events and
//! applies plans.

use std::sync::Arc;

use herald_log::{verify, Durability, Log, LogConfig, Machine, MemStore, WriteBatch};

use super::checkpoint::checkpoint_pairs;
use super::*;
use crate::codec;
use crate::event::encode;
use crate::event::Event;
use crate::fold::apply;
use crate::ids::EventId;
use crate::index;
use crate::keys;
use crate::model::{Delivery, DeliveryStatus};
use crate::persist::{rebuild, stored_projection, RebuildError, TxTables};
use crate::query::{delivery_counts, get_delivery, get_event};
use crate::tables::{MemTables, ReadTables, Tables};
use crate::testkit::{delivery, dl, endpoint, ev, fail, ok, publish, redeliver, retrigger, stamped};
use herald_log::{read_head, Store, Tx};

enum Cmd {
    Events(Vec<(u64, Event)>),
    Compact(Box<Plan>, u64),
}

struct Machine1;

impl Machine for Machine1 {
    type Command = Cmd;
    type Reply = Option<CompactReport>;
    type Rejection = CompactError;

    fn execute(&mut self, cmd: Cmd, tx: &mut Tx<'_>) -> Result<Option<CompactReport>, CompactError> {
        let (events, report) = match cmd {
            Cmd::Events(events) => (events, None),
            Cmd::Compact(plan, at_ms) => {
                let (event, report) = apply_plan(tx, *plan)?;
                (vec![(at_ms, event)], Some(report))
            }
        };
        for (at_ms, event) in events {
            let event = stamped(at_ms, &event);
            let seq = tx.append(at_ms, encode(crate::RecordActor::System, &event)).seq;
            apply(&mut TxTables(tx), seq, at_ms, &event)
                .map_err(|error| CompactError::Rebuild(RebuildError::Apply { seq, error }))?;
        }
        Ok(report)
    }
}

fn open(store: &MemStore) -> Log<Machine1> {
    let config = LogConfig { batch_commands_max: 8, queue_commands_max: 64, durability: Durability::Flush };
    Log::open(Arc::new(store.clone()), Machine1, config).unwrap()
}

fn events(log: &Log<Machine1>, at_ms: u64, events: Vec<Event>) {
    let stamped = events.into_iter().map(|e| (at_ms, e)).collect();
    log.submit(Cmd::Events(stamped)).unwrap().unwrap();
}

/// The live projection is what a rebuild from the checkpoint and the kept log gives, the
/// kept log verifies from its anchor, and the counters match the rows.
fn assert_exact(store: &MemStore) {
    let stored = stored_projection(store).unwrap();
    assert_eq!(stored, rebuild(store, &mut |_| {}).unwrap().dump());
    assert_eq!(crate::scratch::through_scratch(store), (stored.clone(), stored), "through scratch storage");
    verify(store, &mut |_| {}).unwrap();
    let tables = crate::persist::StoreTables(store);
    let rows: Vec<Delivery> = tables
        .scan(&[keys::KS_DELIVERY], &[keys::KS_DELIVERY + 1], usize::MAX)
        .iter()
        .map(|(_, v)| codec::from_bytes(v).unwrap())
        .collect();
    for (status, count) in delivery_counts(&tables).unwrap() {
        assert_eq!(count, rows.iter().filter(|d| d.status == status).count() as u64, "{status:?}");
    }
}

fn status(store: &MemStore, d: u32) -> Option<DeliveryStatus> {
    get_delivery(&crate::persist::StoreTables(store), dl(d)).unwrap().map(|d| d.status)
}

#[test]
fn old_delivered_history_goes_everything_else_stays_and_the_log_still_proves_it() {
    let store = MemStore::new();
    let log = open(&store);
    events(&log, 1, vec![endpoint(1), endpoint(2)]);
    // v1: delivered early, the whole story droppable.
    events(&log, 10, vec![publish(1), delivery(1, 1, Some(1), 10)]);
    events(&log, 20, vec![ok(1, 1)]);
    // v2: one delivery delivered, the other exhausted: the event and both stay.
    events(&log, 30, vec![publish(2), delivery(2, 2, Some(1), 30), delivery(3, 2, Some(2), 30)]);
    events(&log, 40, vec![ok(2, 1), fail(3, 1, None)]);
    // v3: delivered early, redelivered after the plan was made: it must stay.
    events(&log, 50, vec![publish(3), delivery(4, 3, Some(1), 50)]);
    events(&log, 60, vec![ok(4, 1)]);
    // v4: still pending. v5: no delivery at all.
    events(&log, 70, vec![publish(4), delivery(5, 4, Some(1), 5_000)]);
    events(&log, 80, vec![publish(5)]);
    // After the cutoff.
    events(&log, 150, vec![publish(6), delivery(6, 6, Some(1), 150)]);
    events(&log, 160, vec![ok(6, 1)]);

    let plan = plan(&store, 100, 10_000).unwrap().unwrap();
    assert_eq!(plan.through_seq(), 16, "the records stamped before the cutoff");
    let stale = plan.clone();
    events(&log, 200, vec![redeliver(4)]);
    let report = log.submit(Cmd::Compact(Box::new(plan), 210)).unwrap().unwrap().unwrap();
    assert_eq!(
        report,
        CompactReport { records_dropped: 16, deliveries_dropped: 1, events_dropped: 2, through_seq: 16 }
    );
    assert_eq!(status(&store, 1), None);
    assert_eq!(get_event(&crate::persist::StoreTables(&store), ev(1)).unwrap(), None);
    assert_eq!(get_event(&crate::persist::StoreTables(&store), ev(5)).unwrap(), None);
    use DeliveryStatus::*;
    let kept: Vec<_> = (2..=6).map(|d| status(&store, d)).collect();
    assert_eq!(kept, vec![Some(Delivered), Some(Exhausted), Some(Pending), Some(Pending), Some(Delivered)]);
    assert_exact(&store);
    // Kept events whose records were dropped still have their payloads.
    let v2 = get_event(&crate::persist::StoreTables(&store), ev(2)).unwrap().unwrap();
    assert!(v2.seq <= 16);
    assert_eq!(event_payload(&store, &v2).unwrap(), br#"{"n":1}"#.to_vec());
    // A plan made before another compaction moved the anchor is refused, writing nothing.
    let before = store.with_map(|m| m.clone());
    assert!(matches!(
        log.submit(Cmd::Compact(Box::new(stale), 220)).unwrap(),
        Err(CompactError::Stale { planned_at: 0, anchor: 16 })
    ));
    assert_eq!(store.with_map(|m| m.clone()), before);

    // Everything finishes; a later compaction drops it all but the configuration.
    events(&log, 300, vec![retrigger(3)]);
    events(&log, 310, vec![ok(3, 2), ok(4, 2), ok(5, 1)]);
    let plan = super::plan(&store, 1_000, 10_000).unwrap().unwrap();
    let report = log.submit(Cmd::Compact(Box::new(plan), 1_000)).unwrap().unwrap().unwrap();
    assert_eq!((report.deliveries_dropped, report.events_dropped), (5, 4));
    assert!((1..=6).all(|d| status(&store, d).is_none()));
    assert_exact(&store);
    // Only the compaction record itself is left after the new anchor; nothing more to plan.
    assert_eq!(super::plan(&store, 1_000, 10_000).unwrap().map(|p| p.through_seq()), None);
    log.close();
}

#[test]
fn a_pass_is_bounded_and_passes_add_up() {
    let store = MemStore::new();
    let log = open(&store);
    events(&log, 1, vec![endpoint(1)]);
    for n in 1..=20u32 {
        events(&log, 10 + u64::from(n), vec![publish(n), delivery(n, n, Some(1), 10)]);
        events(&log, 40 + u64::from(n), vec![ok(n, 1)]);
    }
    let mut dropped = 0;
    while let Some(plan) = plan(&store, 100, 7).unwrap() {
        let report = log.submit(Cmd::Compact(Box::new(plan), 500)).unwrap().unwrap().unwrap();
        assert!(report.records_dropped <= 7);
        dropped += report.deliveries_dropped;
        assert_exact(&store);
    }
    assert_eq!(dropped, 20);
    log.close();
}

#[test]
fn a_damaged_checkpoint_is_named_by_rebuild() {
    let store = MemStore::new();
    let log = open(&store);
    events(&log, 1, vec![endpoint(1)]);
    events(&log, 10, vec![publish(1), delivery(1, 1, Some(1), 5_000)]);
    let plan = plan(&store, 100, 100).unwrap().unwrap();
    log.submit(Cmd::Compact(Box::new(plan), 200)).unwrap().unwrap();
    log.close();
    assert_exact(&store);
    let key = store.with_map(|m| m.keys().find(|k| k[0] == KS_CHECKPOINT).unwrap().clone());
    let mut batch = WriteBatch::default();
    batch.put(key, b"tampered".to_vec());
    store.apply(&batch).unwrap();
    let err = rebuild(&store, &mut |_| {}).unwrap_err();
    assert!(matches!(&err, RebuildError::Checkpoint(m) if m.contains("does not match its hash")), "{err}");
}

/// A compacted store whose checkpoint keeps a pending delivery (1), with one delivered
/// delivery dropped (2) and one more after the anchor (3); the log still open.
fn compacted_with_one_pending() -> (MemStore, Log<Machine1>) {
    let store = MemStore::new();
    let log = open(&store);
    events(&log, 1, vec![endpoint(1)]);
    events(&log, 10, vec![publish(1), delivery(1, 1, Some(1), 5_000)]);
    events(&log, 20, vec![publish(2), delivery(2, 2, Some(1), 20)]);
    events(&log, 30, vec![ok(2, 1)]);
    let plan = plan(&store, 15, 100).unwrap().unwrap();
    log.submit(Cmd::Compact(Box::new(plan), 200)).unwrap().unwrap();
    events(&log, 300, vec![publish(3), delivery(3, 3, Some(1), 300)]);
    (store, log)
}

/// The delivery rows a checkpoint keeps (at least one).
fn kept_deliveries(checkpoint: &MemTables) -> Vec<Delivery> {
    let kept: Vec<Delivery> = checkpoint
        .scan(&[keys::KS_DELIVERY], &[keys::KS_DELIVERY + 1], usize::MAX)
        .iter()
        .map(|(_, v)| codec::from_bytes(v).unwrap())
        .collect();
    assert!(!kept.is_empty(), "the checkpoint keeps the pending delivery");
    kept
}

/// A store as an earlier version left it: whole-list index keys in the live projection and in
/// a checkpoint whose hash covers them. It reads and verifies as it is, and `drop_legacy`
/// deletes them (the checkpoint's in one batch with its new hash) and then finds nothing.
#[test]
fn index_keys_an_earlier_version_wrote_are_skipped_then_dropped() {
    let (store, log) = compacted_with_one_pending();
    log.close();
    assert_exact(&store);

    // What the earlier version also wrote: an org's and an endpoint's whole-list keys.
    let legacy = |d: &Delivery| {
        let mut out = vec![keys::timed(
            &keys::key(keys::KS_DELIVERY_BY_ORG, &[d.org_id.as_bytes()]),
            d.created_at_ms,
            d.id,
        )];
        if let Some(e) = d.endpoint_id {
            out.push(keys::timed(
                &keys::key(keys::KS_DELIVERY_BY_ENDPOINT, &[e.as_bytes()]),
                d.created_at_ms,
                d.id,
            ));
        }
        out
    };
    let mut live = WriteBatch::default();
    for d in (1..=3).filter_map(|d| get_delivery(&crate::persist::StoreTables(&store), dl(d)).unwrap()) {
        for key in legacy(&d) {
            live.put(key, Vec::new());
        }
    }
    let anchor = read_head(&store).unwrap().anchor_seq;
    let (mut checkpoint, payloads) = load_checkpoint(&store, anchor).unwrap();
    let kept = kept_deliveries(&checkpoint);
    for d in &kept {
        for key in legacy(d) {
            checkpoint.put(key, Vec::new());
        }
    }
    let old_checkpoint = checkpoint_pairs(
        anchor,
        &checkpoint,
        payloads.iter().map(|(id, p)| (EventId::from_bytes(id.as_slice().try_into().unwrap()), p.as_slice())),
    );
    let expected = live.len() + kept.iter().map(|d| legacy(d).len()).sum::<usize>();
    for (key, value) in old_checkpoint {
        live.put(key, value);
    }
    store.apply(&live).unwrap();

    // As it is: the legacy pairs are not part of the projection, the checkpoint checks out.
    assert_exact(&store);
    assert_eq!(drop_legacy(Arc::new(store.clone())).unwrap(), expected as u64);
    let left = store.with_map(|m| {
        m.keys()
            .filter(|k| {
                keys::LEGACY_KEYSPACES.contains(&k[0])
                    || (k[0] == KS_CHECKPOINT && keys::LEGACY_KEYSPACES.contains(&k[1]))
            })
            .count()
    });
    assert_eq!(left, 0);
    assert_exact(&store);
    assert_eq!(drop_legacy(Arc::new(store.clone())).unwrap(), 0, "nothing left the second time");
}

/// A store as the version before chunked list indexes left it: one key per list index entry,
/// live and in the checkpoint. `drop_legacy` chunks them from the delivery rows and deletes
/// them, and the store is then byte for byte what this version writes.
#[test]
fn list_entries_an_earlier_version_stored_one_key_each_are_chunked_then_dropped() {
    let (store, log) = compacted_with_one_pending();
    events(&log, 310, vec![ok(3, 1)]);
    log.close();
    assert_exact(&store);
    let now: Vec<(Vec<u8>, Vec<u8>)> =
        store.with_map(|m| m.iter().map(|(k, v)| (k.clone(), v.clone())).collect());

    let chunked = |d: &Delivery| -> Vec<Vec<u8>> {
        d.index_keys().into_iter().filter(|k| index::is_chunked(k)).collect()
    };
    let mut old = WriteBatch::default();
    for (key, _) in now.iter().filter(|(k, _)| {
        index::is_chunk_keyspace(k[0]) || (k[0] == KS_CHECKPOINT && index::is_chunk_keyspace(k[1]))
    }) {
        old.delete(key.clone());
    }
    let mut expected = 0;
    for d in (1..=3).filter_map(|d| get_delivery(&crate::persist::StoreTables(&store), dl(d)).unwrap()) {
        for key in chunked(&d) {
            old.put(key, Vec::new());
            expected += 1;
        }
    }
    let anchor = read_head(&store).unwrap().anchor_seq;
    let (checkpoint, payloads) = load_checkpoint(&store, anchor).unwrap();
    let mut unchunked = MemTables::from_pairs(
        checkpoint
            .iter()
            .filter(|(k, _)| !index::is_chunk_keyspace(k[0]))
            .map(|(k, v)| (k.to_vec(), v.to_vec())),
    );
    let kept = kept_deliveries(&checkpoint);
    for d in &kept {
        for key in chunked(d) {
            unchunked.put(key, Vec::new());
            expected += 1;
        }
    }
    let ids = |payloads: &Payloads| -> Vec<(EventId, Vec<u8>)> {
        payloads
            .iter()
            .map(|(id, p)| (EventId::from_bytes(id.as_slice().try_into().unwrap()), p.clone()))
            .collect()
    };
    let payloads = ids(&payloads);
    for (key, value) in
        checkpoint_pairs(anchor, &unchunked, payloads.iter().map(|(id, p)| (*id, p.as_slice())))
    {
        old.put(key, value);
    }
    store.apply(&old).unwrap();
    assert!(load_checkpoint(&store, anchor).is_ok(), "the old checkpoint checks out as it is");
    assert_exact(&store);

    assert_eq!(drop_legacy(Arc::new(store.clone())).unwrap(), expected as u64);
    let after: Vec<(Vec<u8>, Vec<u8>)> =
        store.with_map(|m| m.iter().map(|(k, v)| (k.clone(), v.clone())).collect());
    assert_eq!(after, now, "the store is what this version wrote");
    assert_eq!(drop_legacy(Arc::new(store.clone())).unwrap(), 0, "nothing left the second time");
}
