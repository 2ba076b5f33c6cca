//! Replay by index: the story of a subject told from the records the projection's record refs
//! name (rules 4 on), each read by seq and checked against the record before it (or the
//! anchor), instead of a scan of the whole log. Its cost grows with the subject's history.
//!
//! What a subject's story reads: for each of its deliveries, its event's publish record
//! (`EventRecord::seq`: the creation of a delivery that started pending there) and the records
//! its refs name (with its status after each); for an endpoint, its own records; for every
//! story, the policy and rules records. For a recovery, reached from rows the projection
//! already keeps (no refs of its own): its `RecoveryRequested` record (the recovery row's
//! `seq`), and the refs of each of its members from that record on, which name the
//! `RecoveryDeliveries` records that re-queued them and everything after; a member is followed
//! from the recovery record that names it, as the scan follows it.

use std::collections::{BTreeMap, BTreeSet};

use herald_log::{read_record_linked, Head, LogError, Store};
use herald_projector::compact::CheckpointView;
use herald_projector::{
    decode, delivery_refs, get_delivery, get_endpoint, get_event, get_recovery, list_deliveries, record_refs,
    recovery_members, refs_from, CheckedTables, CorruptValue, Delivery, DeliveryId, DeliveryIndex,
    DeliveryQuery, DeliveryStatus, Event, EventId, ReadTables, RecoveryId, PAGE_LEN_MAX, STORE_WIDE,
};

use super::replay::{ScanReason, Story};
use super::{OfflineError, Progress, Subject};

/// What a replay by index reads: the seqs of the story's records, and the followed
/// deliveries' statuses the refs give.
#[derive(Debug, Default)]
struct Plan {
    seqs: BTreeSet<u64>,
    /// (seq, delivery) -> the delivery's status after that record.
    touched: BTreeMap<(u64, DeliveryId), DeliveryStatus>,
    deliveries: Vec<Delivery>,
}

/// Tells `story` by index. `Ok(Some(reason))`: the refs cannot tell it (nothing was written),
/// scan instead.
pub(super) fn replay_by_index(
    store: &dyn Store,
    head: &Head,
    story: &mut Story<'_>,
    progress: &mut dyn Progress,
) -> Result<Option<ScanReason>, OfflineError> {
    let tables = CheckedTables::new(store);
    let told = tell(&tables, store, head, story, progress);
    let read = tables.finish().map_err(|e| OfflineError::Log(LogError::Store(e)));
    let told = told?;
    read?;
    Ok(told)
}

fn tell(
    tables: &CheckedTables<'_>,
    store: &dyn Store,
    head: &Head,
    story: &mut Story<'_>,
    progress: &mut dyn Progress,
) -> Result<Option<ScanReason>, OfflineError> {
    let corrupt = OfflineError::ProjectionCorrupt;
    match refs_from(tables).map_err(corrupt)? {
        None => return Ok(Some(ScanReason::NoRefs)),
        Some(from) if from > head.anchor_seq + 1 => return Ok(Some(ScanReason::RefsFrom(from))),
        Some(_) => {}
    }
    let plan = plan_on(tables, head.anchor_seq, story.subject).map_err(corrupt)?;
    progress.begin("replaying by index", plan.seqs.len() as u64);
    for d in &plan.deliveries {
        story.followed.insert(d.id, None);
    }
    if head.anchor_seq > 0 {
        let checkpoint = CheckpointView::open(tables, head.anchor_seq).map_err(OfflineError::Compact)?;
        let (kept, endpoint_kept) =
            kept_at_checkpoint(&checkpoint, story.subject, &plan.deliveries).map_err(corrupt)?;
        story.found = story.kept_at_checkpoint(&checkpoint, &kept, endpoint_kept, head.anchor_seq)?;
    }
    let anchor = (head.anchor_seq, head.anchor_hash);
    for (n, &seq) in plan.seqs.iter().enumerate() {
        let record = read_record_linked(store, seq, anchor).map_err(|e| match e {
            LogError::Corrupt(c) => OfflineError::StoryDamaged(c),
            other => OfflineError::Log(other),
        })?;
        let event = decode(&record.body).map_err(|error| OfflineError::Decode { seq, error })?;
        story.report.records_read += 1;
        let status = |_: &_, id: DeliveryId| {
            let created = creates(&event, id).then_some(DeliveryStatus::Pending);
            plan.touched.get(&(seq, id)).copied().or(created)
        };
        story.tell(&record, &event, &status)?;
        progress.advance(n as u64 + 1);
    }
    progress.end();
    Ok(None)
}

/// Whether `event` creates delivery `id`.
fn creates(event: &Event, id: DeliveryId) -> bool {
    match event {
        Event::EventPublishedWithDeliveries { deliveries, .. } => deliveries.iter().any(|d| d.id == id),
        Event::DeliveryCreated { id: created, .. } => *created == id,
        _ => false,
    }
}

/// The seqs of the subject's story after `anchor_seq`, from the projection and its refs.
fn plan_on(t: &impl ReadTables, anchor_seq: u64, subject: Subject) -> Result<Plan, CorruptValue> {
    let mut plan = Plan::default();
    let kept_after = |seqs: &mut BTreeSet<u64>, seq: u64| {
        if seq > anchor_seq {
            seqs.insert(seq);
        }
    };
    match subject {
        Subject::Delivery(id) => plan.deliveries.extend(get_delivery(t, id)?),
        Subject::Event(id) => {
            for r in record_refs(t, id.as_bytes(), anchor_seq)? {
                plan.seqs.insert(r.seq);
            }
            if let Some(event) = get_event(t, id)? {
                kept_after(&mut plan.seqs, event.seq);
                for d in event.delivery_ids {
                    plan.deliveries.extend(get_delivery(t, d)?);
                }
            }
        }
        Subject::Recovery(id) => {
            if let Some(recovery) = get_recovery(t, id)? {
                kept_after(&mut plan.seqs, recovery.seq);
                let after = anchor_seq.max(recovery.seq.saturating_sub(1));
                for d in members(t, id)? {
                    plan.refs_of(t, d, after)?;
                }
            }
        }
        Subject::Endpoint(id) => {
            for r in record_refs(t, id.as_bytes(), anchor_seq)? {
                plan.seqs.insert(r.seq);
            }
            plan.deliveries = endpoint_deliveries(t, id)?;
        }
    }
    let mut events: BTreeMap<EventId, u64> = BTreeMap::new();
    for i in 0..plan.deliveries.len() {
        let (id, event_id) = (plan.deliveries[i].id, plan.deliveries[i].event_id);
        if let std::collections::btree_map::Entry::Vacant(slot) = events.entry(event_id) {
            let seq = get_event(t, event_id)?.map_or(0, |e| e.seq);
            kept_after(&mut plan.seqs, *slot.insert(seq));
        }
        plan.refs_of(t, id, anchor_seq)?;
    }
    for r in record_refs(t, &STORE_WIDE, anchor_seq)? {
        plan.seqs.insert(r.seq);
    }
    Ok(plan)
}

impl Plan {
    /// Adds the records that touched delivery `id` after `after_seq`, with its status after each.
    fn refs_of(&mut self, t: &impl ReadTables, id: DeliveryId, after_seq: u64) -> Result<(), CorruptValue> {
        for r in delivery_refs(t, id, after_seq)? {
            self.seqs.insert(r.seq);
            if let Some(status) = r.status {
                self.touched.insert((r.seq, id), status);
            }
        }
        Ok(())
    }
}

/// The members of recovery `id` (the deliveries it re-queued), chunk after chunk.
fn members(t: &impl ReadTables, id: RecoveryId) -> Result<Vec<DeliveryId>, CorruptValue> {
    let mut out = Vec::new();
    for chunk in 0u32.. {
        let ids = recovery_members(t, id, chunk)?;
        if ids.is_empty() {
            break;
        }
        out.extend(ids);
    }
    Ok(out)
}

/// Every delivery of endpoint `id`, through its status indexes, a page at a time.
fn endpoint_deliveries(
    t: &impl ReadTables,
    id: herald_projector::EndpointId,
) -> Result<Vec<Delivery>, CorruptValue> {
    let query = DeliveryQuery::all(DeliveryIndex::Endpoint(id));
    let mut out = Vec::new();
    let mut after = None;
    loop {
        let page = list_deliveries(t, &query, after, PAGE_LEN_MAX)?;
        out.extend(page.items);
        match page.next {
            Some(next) => after = Some(next),
            None => return Ok(out),
        }
    }
}

/// The subject's deliveries as the checkpoint kept them, in the order a scan tells them (the
/// event's list; else by id), and whether the endpoint subject is kept there.
fn kept_at_checkpoint(
    checkpoint: &impl ReadTables,
    subject: Subject,
    deliveries: &[Delivery],
) -> Result<(Vec<Delivery>, bool), CorruptValue> {
    let mut kept = Vec::new();
    match subject {
        Subject::Delivery(id) => kept.extend(get_delivery(checkpoint, id)?),
        Subject::Event(id) => {
            if let Some(event) = get_event(checkpoint, id)? {
                for d in event.delivery_ids {
                    kept.extend(get_delivery(checkpoint, d)?);
                }
            }
        }
        Subject::Endpoint(id) => {
            for d in deliveries {
                kept.extend(get_delivery(checkpoint, d.id)?.filter(|d| d.endpoint_id == Some(id)));
            }
            kept.sort_by(|a, b| a.id.as_bytes().cmp(b.id.as_bytes()));
            return Ok((kept, get_endpoint(checkpoint, id)?.is_some()));
        }
        Subject::Recovery(id) => {
            for d in members(checkpoint, id)? {
                kept.extend(get_delivery(checkpoint, d)?);
            }
        }
    }
    Ok((kept, false))
}
