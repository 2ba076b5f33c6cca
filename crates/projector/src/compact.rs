//! Retention: the log's oldest records are dropped together with the deliveries that were
//! delivered before a cutoff, and the state the kept records start from is kept as a checkpoint.
//!
//! A compaction is planned away from the writer and applied inside it:
//!
//! 1. [`plan`] folds the records after the anchor that are older than the cutoff (at most a
//!    bounded number per pass) into scratch tables that start from the current checkpoint. That
//!    is the state at `through_seq`, the last record to drop. In it, an event whose every delivery
//!    was delivered before the cutoff (or that had none) is a candidate *unit*: the event row,
//!    its idempotency row, its deliveries' rows, index entries and attempts. The new checkpoint is
//!    the scratch state without the candidates, plus the payloads of the events it keeps (their
//!    records are about to go).
//! 2. [`apply_plan`], in the writer's batch, drops each candidate from the live projection only if
//!    its delivery rows are byte for byte what they were at `through_seq` (no later record touched
//!    them); otherwise the unit goes back into the checkpoint. It writes the checkpoint, cuts the
//!    log through `through_seq` (the anchor keeps that record's hash) and returns the
//!    [`Event::Compacted`] to append, all in the same atomic batch.
//!
//! Why it is exact: a dropped unit's rows are the same at `through_seq` and at the head, so the
//! live projection minus the unit equals the checkpoint folded forward with the kept records,
//! which is what [`rebuild`](crate::rebuild) and `herald verify` compute. Pending, exhausted and
//! inactive deliveries are never candidates.
//!
//! Stored beside the projection (outside its keyspaces, so a rebuild's comparison skips them):
//!
//! | byte | key | value |
//! | --- | --- | --- |
//! | `0x90` | (alone) | checkpoint seq (u64 BE) ++ blake3 of its pairs and payloads |
//! | `0x91` | projection key | value at the checkpoint |
//! | `0x92` | event id | payload of a kept event whose record was dropped |

use std::collections::BTreeMap;
use std::ops::ControlFlow;

use std::ops::Bound::{Excluded, Included};

use herald_log::{read_head, read_records, scan_vec, LogError, Store, Tx};

use crate::codec;
use crate::event::{decode, Event};
use crate::fold::add_count;
use crate::ids::EventId;
use crate::index;
use crate::keys::{self, KS_EVENT};
use crate::model::{Delivery, DeliveryStatus, EventRecord, IdempotencyHit};
use crate::persist::{fold_record, RebuildError, TxTables};
use crate::tables::{MemTables, ReadTables, Tables};

pub const KS_CHECKPOINT_META: u8 = 0x90;
pub const KS_CHECKPOINT: u8 = 0x91;
pub const KS_CHECKPOINT_PAYLOAD: u8 = 0x92;
const CHECKPOINT_META: &[u8] = &[KS_CHECKPOINT_META];
const _: () = assert!(KS_CHECKPOINT_META > keys::KS_LAST, "the checkpoint is outside the projection");

/// Records read per page while planning.
const PLAN_READ_RECORDS: usize = 4096;

/// Why a compaction could not be planned or applied. Nothing was written.
#[derive(Debug, Clone, PartialEq)]
pub enum CompactError {
    Log(LogError),
    /// The records to drop do not fold (a damaged log).
    Rebuild(RebuildError),
    /// The stored checkpoint does not match its hash, or is missing what the anchor needs.
    Checkpoint(String),
    /// Another compaction moved the anchor since this plan was made: plan again.
    Stale {
        planned_at: u64,
        anchor: u64,
    },
}

impl std::fmt::Display for CompactError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CompactError::Log(e) => write!(f, "{e}"),
            CompactError::Rebuild(e) => write!(f, "{e}"),
            CompactError::Checkpoint(e) => write!(f, "checkpoint: {e}"),
            CompactError::Stale { planned_at, anchor } => {
                write!(f, "the plan starts at anchor {planned_at} but the anchor is now {anchor}")
            }
        }
    }
}

impl std::error::Error for CompactError {}

impl From<LogError> for CompactError {
    fn from(e: LogError) -> Self {
        CompactError::Log(e)
    }
}

/// One event and everything derived from it, dropped together or not at all.
#[derive(Debug, Clone, PartialEq)]
struct Unit {
    event: EventRecord,
    /// Every pair it has at `through_seq`: the event row, its deliveries' rows, plain index
    /// keys and attempts.
    pairs: Vec<(Vec<u8>, Vec<u8>)>,
    /// Its deliveries' entries in the chunked list indexes (logical keys, see `index.rs`).
    entries: Vec<Vec<u8>>,
    /// Its idempotency row, when it still points at this event; dropped only if unchanged.
    idempotency: Option<(Vec<u8>, Vec<u8>)>,
    /// The rows that must be unchanged at the head for the unit to be dropped: the event's
    /// (its delivery list grows in the records after its own) and its deliveries'.
    guards: Vec<(Vec<u8>, Vec<u8>)>,
    deliveries: u64,
}

impl Unit {
    fn deliveries(&self) -> u64 {
        self.deliveries
    }
}

/// A compaction worked out from the stored log, to be applied by [`apply_plan`].
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    anchor_seq: u64,
    through_seq: u64,
    cutoff_ms: u64,
    /// The state at `through_seq` without any candidate unit.
    checkpoint: MemTables,
    /// Payloads of the events the checkpoint keeps.
    payloads: BTreeMap<EventId, Vec<u8>>,
    units: Vec<Unit>,
}

impl Plan {
    /// The last record this plan drops.
    pub fn through_seq(&self) -> u64 {
        self.through_seq
    }

    /// Candidate events (each with its deliveries).
    pub fn candidates(&self) -> usize {
        self.units.len()
    }
}

/// What a compaction did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CompactReport {
    /// Records dropped from the log.
    pub records_dropped: u64,
    pub deliveries_dropped: u64,
    pub events_dropped: u64,
    /// The new anchor: the kept log starts after it.
    pub through_seq: u64,
}

/// Plans the drop of the records after the anchor stamped before `cutoff_ms`, at most
/// `records_max` of them. `None`: there is no such record.
pub fn plan(store: &dyn Store, cutoff_ms: u64, records_max: usize) -> Result<Option<Plan>, CompactError> {
    let head = read_head(store)?;
    let anchor_seq = head.anchor_seq;
    let (mut state, _) = load_checkpoint(store, anchor_seq)?;
    let mut through_seq = anchor_seq;
    let records_max = records_max.max(1) as u64;
    'pages: loop {
        let left = records_max - (through_seq - anchor_seq);
        if left == 0 {
            break;
        }
        let page = read_records(store, through_seq + 1, PLAN_READ_RECORDS.min(left as usize))?;
        if page.is_empty() {
            break;
        }
        for rec in &page {
            if rec.at_ms >= cutoff_ms {
                break 'pages;
            }
            fold_record(&mut state, rec).map_err(CompactError::Rebuild)?;
            through_seq = rec.seq;
        }
    }
    if through_seq == anchor_seq {
        return Ok(None);
    }
    let mut units = Vec::new();
    for (key, value) in state.scan(&[KS_EVENT], &[KS_EVENT + 1], usize::MAX) {
        let event: EventRecord = decode_value(&key, &value)?;
        if event.created_at_ms >= cutoff_ms {
            continue;
        }
        if let Some(unit) = candidate(&state, event, (key, value))? {
            units.push(unit);
        }
    }
    for unit in &units {
        for (key, _) in &unit.pairs {
            state.delete(key);
        }
        for entry in &unit.entries {
            state.remove_entry(entry).map_err(corrupt)?;
        }
        if let Some((key, _)) = &unit.idempotency {
            state.delete(key);
        }
        add_count(&mut state, DeliveryStatus::Delivered, -(unit.deliveries() as i64));
    }
    let mut payloads = BTreeMap::new();
    for (key, value) in state.scan(&[KS_EVENT], &[KS_EVENT + 1], usize::MAX) {
        let event: EventRecord = decode_value(&key, &value)?;
        payloads.insert(event.id, stored_payload(store, anchor_seq, &event)?);
    }
    Ok(Some(Plan { anchor_seq, through_seq, cutoff_ms, checkpoint: state, payloads, units }))
}

/// The unit of `event` when every delivery of it is delivered (before the cutoff: every record
/// folded into `state` is older than it).
fn candidate(
    state: &MemTables,
    event: EventRecord,
    row: (Vec<u8>, Vec<u8>),
) -> Result<Option<Unit>, CompactError> {
    // Every record folded so far is older than the cutoff, so is every change of a delivery.
    let mut unit = Unit {
        event,
        pairs: vec![row.clone()],
        entries: Vec::new(),
        idempotency: None,
        guards: vec![row],
        deliveries: 0,
    };
    for id in unit.event.delivery_ids.clone() {
        let key = keys::delivery(id);
        let Some(raw) = state.get(&key) else { return Ok(None) };
        let delivery: Delivery = decode_value(&key, &raw)?;
        if delivery.status != DeliveryStatus::Delivered {
            return Ok(None);
        }
        for index in delivery.index_keys() {
            if index::is_chunked(&index) {
                unit.entries.push(index);
            } else if let Some(v) = state.get(&index) {
                unit.pairs.push((index, v));
            }
        }
        let prefix = keys::key(keys::KS_ATTEMPT, &[id.as_bytes()]);
        let end = keys::prefix_end(&prefix).unwrap_or_else(|| vec![0xff; prefix.len() + 1]);
        unit.pairs.extend(state.scan(&prefix, &end, usize::MAX));
        unit.guards.push((key.clone(), raw.clone()));
        unit.pairs.push((key, raw));
        unit.deliveries += 1;
    }
    if let Some(idempotency_key) = &unit.event.idempotency_key {
        let key = keys::idempotency(unit.event.org_id, idempotency_key);
        if let Some(raw) = state.get(&key) {
            let hit: IdempotencyHit = decode_value(&key, &raw)?;
            if hit.event_id == unit.event.id {
                unit.idempotency = Some((key, raw));
            }
        }
    }
    Ok(Some(unit))
}

fn decode_value<T: serde::de::DeserializeOwned>(key: &[u8], value: &[u8]) -> Result<T, CompactError> {
    codec::from_bytes(value)
        .ok_or_else(|| CompactError::Rebuild(RebuildError::Projection(crate::Corrupt { key: key.to_vec() })))
}

/// A log machine that only applies compaction plans, stamping the [`Event::Compacted`] record
/// with the time given beside each plan: for `herald compact` on a stopped server's data and for
/// benchmarks. The engine applies plans through its own command machine.
pub struct Compactor;

impl herald_log::Machine for Compactor {
    type Command = (u64, Box<Plan>);
    type Reply = CompactReport;
    type Rejection = CompactError;

    fn execute(
        &mut self,
        (at_ms, plan): Self::Command,
        tx: &mut Tx<'_>,
    ) -> Result<CompactReport, CompactError> {
        let (event, report) = apply_plan(tx, *plan)?;
        let seq = tx.append(at_ms, crate::event::encode(&event)).seq;
        crate::fold::apply(&mut TxTables(tx), seq, at_ms, &event)
            .map_err(|error| CompactError::Rebuild(RebuildError::Apply { seq, error }))?;
        Ok(report)
    }
}

/// Applies `plan` in the writer's batch: drops the candidates no later record touched, writes
/// the checkpoint and cuts the log. Returns the event to append (after this) and the figures.
pub fn apply_plan(tx: &mut Tx<'_>, plan: Plan) -> Result<(Event, CompactReport), CompactError> {
    let (anchor, _) = tx.anchor()?;
    if anchor != plan.anchor_seq {
        return Err(CompactError::Stale { planned_at: plan.anchor_seq, anchor });
    }
    let Plan { anchor_seq, through_seq, cutoff_ms, mut checkpoint, mut payloads, units } = plan;
    let mut report =
        CompactReport { records_dropped: through_seq - anchor_seq, through_seq, ..Default::default() };
    for unit in units {
        let unchanged = unit.guards.iter().all(|(key, value)| tx.get(key).as_ref() == Some(value));
        if unchanged {
            for (key, _) in &unit.pairs {
                tx.delete(key);
            }
            // Removed from the chunks at once, not staged (see `TxTables`): machines that apply
            // plans need not fold staged entries, and no earlier command of the batch staged
            // one of these (the guards saw the deliveries unchanged).
            for entry in &unit.entries {
                index::remove_now(&mut TxTables(tx), entry).map_err(corrupt)?;
            }
            if let Some((key, value)) = &unit.idempotency {
                if tx.get(key).as_ref() == Some(value) {
                    tx.delete(key);
                }
            }
            report.deliveries_dropped += unit.deliveries();
            report.events_dropped += 1;
        } else {
            // A later record changed it (a redeliver): the kept records need its state.
            let deliveries = unit.deliveries();
            payloads.insert(unit.event.id, stored_payload(tx.store(), anchor_seq, &unit.event)?);
            for (key, value) in unit.pairs.into_iter().chain(unit.idempotency) {
                checkpoint.put(key, value);
            }
            for entry in &unit.entries {
                checkpoint.add_entry(entry).map_err(corrupt)?;
            }
            add_count(&mut checkpoint, DeliveryStatus::Delivered, deliveries as i64);
        }
    }
    add_count(&mut TxTables(tx), DeliveryStatus::Delivered, -(report.deliveries_dropped as i64));
    write_checkpoint(tx, through_seq, &checkpoint, &payloads);
    tx.cut_through(through_seq)?;
    let event = Event::Compacted {
        through_seq,
        cutoff_ms,
        deliveries_dropped: report.deliveries_dropped,
        events_dropped: report.events_dropped,
    };
    Ok((event, report))
}

fn corrupt(e: crate::query::Corrupt) -> CompactError {
    CompactError::Checkpoint(e.to_string())
}

fn payload_key(id: EventId) -> Vec<u8> {
    keys::key(KS_CHECKPOINT_PAYLOAD, &[id.as_bytes()])
}

/// The blake3 of a checkpoint: its pairs, then its payloads, each length-prefixed.
fn checkpoint_hash<'p>(
    pairs: impl Iterator<Item = (&'p [u8], &'p [u8])>,
    payloads: impl Iterator<Item = (&'p [u8], &'p [u8])>,
) -> [u8; 32] {
    let mut hasher = blake3::Hasher::new();
    for (tag, items) in [(b'p', Box::new(pairs) as Box<dyn Iterator<Item = _>>), (b'b', Box::new(payloads))] {
        for (key, value) in items {
            hasher.update(&[tag]);
            hasher.update(&(key.len() as u64).to_be_bytes());
            hasher.update(key);
            hasher.update(&(value.len() as u64).to_be_bytes());
            hasher.update(value);
        }
    }
    *hasher.finalize().as_bytes()
}

/// Replaces the stored checkpoint with `tables` and `payloads`, as of `seq`.
fn write_checkpoint(tx: &mut Tx<'_>, seq: u64, tables: &MemTables, payloads: &BTreeMap<EventId, Vec<u8>>) {
    // Only what changed is written: most of a checkpoint (endpoints, deliveries that stay
    // undelivered) is the same from one compaction to the next. A read error here is kept by the
    // batch, which then fails as a whole.
    let mut old: BTreeMap<Vec<u8>, Vec<u8>> =
        tx.scan(&[KS_CHECKPOINT], &[KS_CHECKPOINT_PAYLOAD + 1], usize::MAX).into_iter().collect();
    for (key, value) in checkpoint_pairs(seq, tables, payloads.iter().map(|(id, p)| (*id, p.as_slice()))) {
        if old.remove(&key).as_ref() != Some(&value) {
            tx.put(key, value);
        }
    }
    for key in old.into_keys() {
        tx.delete(&key);
    }
}

/// Every stored pair of a checkpoint of `tables` and `payloads` as of `seq`, its header included.
fn checkpoint_pairs<'p>(
    seq: u64,
    tables: &MemTables,
    payloads: impl Iterator<Item = (EventId, &'p [u8])> + Clone,
) -> Vec<(Vec<u8>, Vec<u8>)> {
    let mut out: Vec<(Vec<u8>, Vec<u8>)> =
        tables.iter().map(|(key, value)| ([&[KS_CHECKPOINT], key].concat(), value.to_vec())).collect();
    out.extend(payloads.clone().map(|(id, payload)| (payload_key(id), payload.to_vec())));
    let ids: Vec<(EventId, &[u8])> = payloads.collect();
    let hash = checkpoint_hash(tables.iter(), ids.iter().map(|(id, p)| (id.as_bytes().as_slice(), *p)));
    out.push((CHECKPOINT_META.to_vec(), [&seq.to_be_bytes()[..], &hash].concat()));
    out
}

/// The payloads a checkpoint keeps: (event id bytes, payload).
pub type Payloads = Vec<(Vec<u8>, Vec<u8>)>;

/// The projection at the anchor: the stored checkpoint, checked against its hash (empty tables
/// for a log that was never compacted), with the payloads it keeps.
pub fn load_checkpoint(store: &dyn Store, anchor_seq: u64) -> Result<(MemTables, Payloads), CompactError> {
    let meta = store.get(CHECKPOINT_META).map_err(LogError::from)?;
    let Some(meta) = meta else {
        if anchor_seq == 0 {
            return Ok((MemTables::new(), Vec::new()));
        }
        return Err(CompactError::Checkpoint(format!(
            "the log starts after seq {anchor_seq} but no checkpoint is stored"
        )));
    };
    let (seq, hash) = match meta.len() {
        40 => (u64::from_be_bytes(meta[..8].try_into().unwrap_or_default()), &meta[8..]),
        n => return Err(CompactError::Checkpoint(format!("its header has {n} bytes, not 40"))),
    };
    if seq != anchor_seq {
        return Err(CompactError::Checkpoint(format!(
            "it is at seq {seq} but the log starts after seq {anchor_seq}"
        )));
    }
    let mut tables = MemTables::new();
    store
        .scan(&[KS_CHECKPOINT], &[KS_CHECKPOINT + 1], &mut |key, value| {
            tables.put(key[1..].to_vec(), value.to_vec());
            ControlFlow::Continue(())
        })
        .map_err(LogError::from)?;
    let mut payloads = Vec::new();
    store
        .scan(&[KS_CHECKPOINT_PAYLOAD], &[KS_CHECKPOINT_PAYLOAD + 1], &mut |key, value| {
            payloads.push((key[1..].to_vec(), value.to_vec()));
            ControlFlow::Continue(())
        })
        .map_err(LogError::from)?;
    let computed = checkpoint_hash(tables.iter(), payloads.iter().map(|(k, v)| (k.as_slice(), v.as_slice())));
    if computed.as_slice() != hash {
        return Err(CompactError::Checkpoint(format!("its content does not match its hash (seq {seq})")));
    }
    // A checkpoint written by an earlier version may hold index keys this one no longer keeps:
    // checked with the rest above, left out of the state; entries it kept one key each are
    // chunked from its delivery rows instead.
    let legacy: Vec<Vec<u8>> =
        tables.iter().filter(|(k, _)| keys::is_legacy(k[0])).map(|(k, _)| k.to_vec()).collect();
    let unchunked = legacy.iter().any(|k| keys::LEGACY_INDEX_KEYSPACES.contains(&k[0]));
    for key in legacy {
        tables.delete(&key);
    }
    if unchunked {
        index::rebuild_from_deliveries(&mut tables).map_err(corrupt)?;
    }
    Ok((tables, payloads))
}

/// Brings a store an earlier version wrote to this version's keys, then flushes; returns how
/// many stored pairs went. Run before the log opens.
///
/// - The pairs of [`keys::LEGACY_KEYSPACES`] are deleted.
/// - The list index entries an earlier version stored one key each
///   ([`keys::LEGACY_INDEX_KEYSPACES`]) are chunked from the delivery rows (`index.rs`), over
///   whatever chunks a crashed earlier run left, and only then deleted: a crash midway leaves
///   them, and the next run starts again.
/// - The checkpoint gets the same, with its hash recomputed, in one batch.
///
/// A store without any costs a few seeks (the checkpoint is read and hashed only when it holds
/// some).
pub fn drop_legacy(store: &dyn Store) -> Result<u64, CompactError> {
    let unchunked = keys::LEGACY_INDEX_KEYSPACES
        .iter()
        .map(|ks| scan_vec(store, &[*ks], &[*ks + 1], 1).map(|page| !page.is_empty()))
        .collect::<Result<Vec<bool>, _>>()
        .map_err(LogError::from)?
        .contains(&true);
    if unchunked {
        for ks in [
            keys::KS_CHUNKS_BY_ORG_STATUS,
            keys::KS_CHUNKS_BY_ENDPOINT_STATUS,
            keys::KS_CHUNKS_BY_ORG_TYPE,
            keys::KS_CHUNKS_DUE,
        ] {
            delete_range(store, &[ks], &[ks + 1])?;
        }
        chunk_stored_entries(store)?;
    }
    let mut dropped = 0u64;
    for keyspace in keys::LEGACY_KEYSPACES.into_iter().chain(keys::LEGACY_INDEX_KEYSPACES) {
        dropped += delete_range(store, &[keyspace], &[keyspace + 1])?;
    }
    let mut stale = herald_log::Batch::default();
    for keyspace in keys::LEGACY_KEYSPACES.into_iter().chain(keys::LEGACY_INDEX_KEYSPACES) {
        store
            .scan(&[KS_CHECKPOINT, keyspace], &[KS_CHECKPOINT, keyspace + 1], &mut |key, _| {
                stale.delete(key.to_vec());
                ControlFlow::Continue(())
            })
            .map_err(LogError::from)?;
    }
    if !stale.is_empty() {
        // Checked against the hash that covers the stale pairs, loaded without them (and with
        // its entries chunked).
        let anchor_seq = read_head(store)?.anchor_seq;
        let (tables, payloads) = load_checkpoint(store, anchor_seq)?;
        dropped += stale.len() as u64;
        for (key, value) in tables.iter().filter(|(k, _)| index::is_chunk_keyspace(k[0])) {
            stale.put([&[KS_CHECKPOINT], key].concat(), value.to_vec());
        }
        let hash = checkpoint_hash(tables.iter(), payloads.iter().map(|(k, v)| (k.as_slice(), v.as_slice())));
        stale.put(CHECKPOINT_META.to_vec(), [&anchor_seq.to_be_bytes()[..], &hash].concat());
        store.apply(&stale).map_err(LogError::from)?;
    }
    if dropped > 0 || unchunked {
        store.flush(herald_log::Durability::Sync).map_err(LogError::from)?;
    }
    Ok(dropped)
}

/// Deletes every stored pair in `from..to`, in batches; returns how many.
fn delete_range(store: &dyn Store, from: &[u8], to: &[u8]) -> Result<u64, CompactError> {
    const BATCH_KEYS: usize = 10_000;
    let mut deleted = 0;
    loop {
        let mut batch = herald_log::Batch::default();
        store
            .scan(from, to, &mut |key, _| {
                batch.delete(key.to_vec());
                if batch.len() < BATCH_KEYS {
                    ControlFlow::Continue(())
                } else {
                    ControlFlow::Break(())
                }
            })
            .map_err(LogError::from)?;
        if batch.is_empty() {
            return Ok(deleted);
        }
        deleted += batch.len() as u64;
        store.apply(&batch).map_err(LogError::from)?;
    }
}

/// Adds every stored delivery's index entries to the chunks, a page of deliveries per store
/// batch.
fn chunk_stored_entries(store: &dyn Store) -> Result<(), CompactError> {
    const PAGE: usize = 1024;
    let mut from = Some(vec![keys::KS_DELIVERY]);
    while let Some(start) = from {
        let mut staged = StagedStore { store, changes: BTreeMap::new() };
        from = index::chunk_deliveries(&mut staged, &start, PAGE)
            .map_err(|c| CompactError::Rebuild(RebuildError::Projection(c)))?;
        let mut batch = herald_log::Batch::default();
        for (key, value) in staged.changes {
            match value {
                Some(value) => batch.put(key, value),
                None => batch.delete(key),
            }
        }
        store.apply(&batch).map_err(LogError::from)?;
    }
    Ok(())
}

/// Writes staged over a store, read back before they are applied. A store error reads as
/// absent; the batch that follows then fails with it.
struct StagedStore<'s> {
    store: &'s dyn Store,
    changes: BTreeMap<Vec<u8>, Option<Vec<u8>>>,
}

impl ReadTables for StagedStore<'_> {
    fn get(&self, key: &[u8]) -> Option<Vec<u8>> {
        match self.changes.get(key) {
            Some(change) => change.clone(),
            None => self.store.get(key).ok().flatten(),
        }
    }

    fn scan(&self, from: &[u8], to: &[u8], limit: usize) -> Vec<(Vec<u8>, Vec<u8>)> {
        if from >= to || limit == 0 {
            return Vec::new();
        }
        let staged: Vec<_> = self.changes.range::<[u8], _>((Included(from), Excluded(to))).collect();
        let stored = scan_vec(self.store, from, to, limit.saturating_add(staged.len())).unwrap_or_default();
        herald_log::merge_staged(stored, staged, limit)
    }
}

impl Tables for StagedStore<'_> {
    fn put(&mut self, key: Vec<u8>, value: Vec<u8>) {
        self.changes.insert(key, Some(value));
    }

    fn delete(&mut self, key: &[u8]) {
        self.changes.insert(key.to_vec(), None);
    }
}

/// Writes a checkpoint into an empty store (an import): the checkpoint itself and the
/// projection it is, standing at `seq`. The log's anchor is the caller's.
pub fn restore_checkpoint(
    store: &dyn Store,
    seq: u64,
    tables: &MemTables,
    payloads: &[(EventId, Vec<u8>)],
) -> Result<(), CompactError> {
    if tables.iter().any(|(key, _)| key.first().is_none_or(|b| !(keys::KS_FIRST..=keys::KS_LAST).contains(b)))
    {
        return Err(CompactError::Checkpoint("a pair is outside the projection's keyspaces".into()));
    }
    if crate::query::applied_seq(tables).ok() != Some(seq) {
        return Err(CompactError::Checkpoint(format!("its pairs do not stand at seq {seq}")));
    }
    let mut batch = herald_log::Batch::default();
    for (key, value) in tables.iter() {
        batch.put(key.to_vec(), value.to_vec());
    }
    for (key, value) in checkpoint_pairs(seq, tables, payloads.iter().map(|(id, p)| (*id, p.as_slice()))) {
        batch.put(key, value);
    }
    store.apply(&batch).map_err(LogError::from)?;
    Ok(())
}

/// The payload of a published event: in its log record, or in the checkpoint once that record
/// was dropped by a compaction.
pub fn event_payload(store: &dyn Store, event: &EventRecord) -> Result<Vec<u8>, CompactError> {
    // The record first: the common case, and no anchor to read. Read by key, so a cache in
    // front of the store answers it.
    let record = herald_log::read_record(store, event.seq)?;
    match record {
        Some(record) => published_payload(event, &record.body),
        None => stored_payload(store, event.seq, event),
    }
}

fn published_payload(event: &EventRecord, body: &[u8]) -> Result<Vec<u8>, CompactError> {
    match decode(body) {
        Ok(
            Event::EventPublished { id, payload, .. }
            | Event::EventPublishedWithDeliveries { id, payload, .. },
        ) if id == event.id => Ok(payload),
        _ => Err(CompactError::Checkpoint(format!(
            "the payload of event {} is not at seq {}",
            event.id, event.seq
        ))),
    }
}

fn stored_payload(store: &dyn Store, anchor_seq: u64, event: &EventRecord) -> Result<Vec<u8>, CompactError> {
    if event.seq <= anchor_seq {
        return store.get(&payload_key(event.id)).map_err(LogError::from)?.ok_or_else(|| {
            CompactError::Checkpoint(format!("the payload of event {} is missing", event.id))
        });
    }
    match read_records(store, event.seq, 1)?.pop().filter(|r| r.seq == event.seq) {
        Some(record) => published_payload(event, &record.body),
        None => Err(CompactError::Checkpoint(format!(
            "the payload of event {} is not at seq {}",
            event.id, event.seq
        ))),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use herald_log::{verify, Batch, Durability, Log, LogConfig, Machine, MemStore};

    use super::*;
    use crate::event::encode;
    use crate::fold::apply;
    use crate::persist::{rebuild, stored_projection};
    use crate::query::{delivery_counts, get_delivery, get_event};
    use crate::testkit::{delivery, dl, endpoint, ev, fail, ok, publish, redeliver, retrigger, stamped};

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
                let seq = tx.append(at_ms, encode(&event)).seq;
                apply(&mut TxTables(tx), seq, at_ms, &event)
                    .map_err(|error| CompactError::Rebuild(RebuildError::Apply { seq, error }))?;
            }
            Ok(report)
        }
    }

    fn open(store: &MemStore) -> Log<Machine1> {
        let config =
            LogConfig { batch_commands_max: 8, queue_commands_max: 64, durability: Durability::Flush };
        Log::open(Arc::new(store.clone()), Machine1, config).unwrap()
    }

    fn events(log: &Log<Machine1>, at_ms: u64, events: Vec<Event>) {
        let stamped = events.into_iter().map(|e| (at_ms, e)).collect();
        log.submit(Cmd::Events(stamped)).unwrap().unwrap();
    }

    /// The live projection is what a rebuild from the checkpoint and the kept log gives, the
    /// kept log verifies from its anchor, and the counters match the rows.
    fn assert_exact(store: &MemStore) {
        assert_eq!(stored_projection(store).unwrap(), rebuild(store, &mut |_| {}).unwrap().dump());
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
        assert_eq!(
            kept,
            vec![Some(Delivered), Some(Exhausted), Some(Pending), Some(Pending), Some(Delivered)]
        );
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
        let mut batch = Batch::default();
        batch.put(key, b"tampered".to_vec());
        store.apply(&batch).unwrap();
        let err = rebuild(&store, &mut |_| {}).unwrap_err();
        assert!(
            matches!(&err, RebuildError::Checkpoint(m) if m.contains("does not match its hash")),
            "{err}"
        );
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
        let mut live = Batch::default();
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
            payloads
                .iter()
                .map(|(id, p)| (EventId::from_bytes(id.as_slice().try_into().unwrap()), p.as_slice())),
        );
        let expected = live.len() + kept.iter().map(|d| legacy(d).len()).sum::<usize>();
        for (key, value) in old_checkpoint {
            live.put(key, value);
        }
        store.apply(&live).unwrap();

        // As it is: the legacy pairs are not part of the projection, the checkpoint checks out.
        assert_exact(&store);
        assert_eq!(drop_legacy(&store).unwrap(), expected as u64);
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
        assert_eq!(drop_legacy(&store).unwrap(), 0, "nothing left the second time");
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
        let mut old = Batch::default();
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

        assert_eq!(drop_legacy(&store).unwrap(), expected as u64);
        let after: Vec<(Vec<u8>, Vec<u8>)> =
            store.with_map(|m| m.iter().map(|(k, v)| (k.clone(), v.clone())).collect());
        assert_eq!(after, now, "the store is what this version wrote");
        assert_eq!(drop_legacy(&store).unwrap(), 0, "nothing left the second time");
    }
}
