//! A retention pass: [`plan`] works out, away from the writer, which units (an event and
//! everything derived from it) can go; [`apply_plan`] drops them in the writer's batch, writes
//! the new checkpoint and cuts the log.

use std::collections::BTreeMap;

use herald_log::{read_head, read_records, Store, Tx};

use super::checkpoint::{load_checkpoint, write_checkpoint};
use super::payload::stored_payload;
use super::{corrupt, decode_value, CompactError};
use crate::event::Event;
use crate::fold::add_count;
use crate::ids::EventId;
use crate::index;
use crate::keys::{self, KS_EVENT};
use crate::model::{Delivery, DeliveryStatus, EventRecord, IdempotencyHit};
use crate::persist::{fold_record, RebuildError, TxTables};
use crate::tables::{MemTables, ReadTables, Tables};

/// Records read per page while planning.
const PLAN_READ_RECORDS: usize = 4096;
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
    /// The record refs of the records it drops (every ref at `through_seq`): they go with them.
    refs: Vec<Vec<u8>>,
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
    // Every ref in the state points at a record this pass drops (or an earlier one did not
    // keep): the checkpoint keeps none, and the live projection drops the same keys.
    let refs = crate::refs::all_ref_keys(&state);
    for key in &refs {
        state.delete(key);
    }
    let mut payloads = BTreeMap::new();
    for (key, value) in state.scan(&[KS_EVENT], &[KS_EVENT + 1], usize::MAX) {
        let event: EventRecord = decode_value(&key, &value)?;
        payloads.insert(event.id, stored_payload(store, anchor_seq, &event)?);
    }
    Ok(Some(Plan { anchor_seq, through_seq, cutoff_ms, checkpoint: state, payloads, units, refs }))
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
    let ordering_key = keys::ordering_key(unit.event.id);
    if let Some(raw) = state.get(&ordering_key) {
        unit.pairs.push((ordering_key, raw));
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
        // Retention is herald's own decision, whoever runs it (`herald compact` included).
        let seq = tx.append(at_ms, crate::event::encode(crate::RecordActor::System, &event)).seq;
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
    let Plan { anchor_seq, through_seq, cutoff_ms, mut checkpoint, mut payloads, units, refs } = plan;
    for key in &refs {
        tx.delete(key);
    }
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
