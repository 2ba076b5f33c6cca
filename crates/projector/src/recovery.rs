//! Bulk recovery: the filter a recover selects by, the selection over the delivery indexes, and
//! the stored recovery with its members and their counts now.
//!
//! The selection walks the status partitions of the organisation's (or, given an endpoint, the
//! endpoint's) delivery index, oldest first, merged, and checks the rest of the filter on each
//! delivery. The failure partitions (`exhausted`, `inactive`) hold only what a recover can pick
//! up, so the walk grows with the failures in the time range rather than with the store's
//! delivered history. The organisation + event-type index is walked instead only for an exact
//! type when `delivered` is asked for (its own partition being the store's bulk): a pattern is
//! no one range of that index (its keys are org ++ type length ++ type), and finding the
//! organisation's types one seek each would grow with the types, not with the selection.

use serde::{Deserialize, Serialize};

use crate::codec;
use crate::ids::{ApiKeyId, DeliveryId, EndpointId, OrgId, RecoveryId};
use crate::keys;
use crate::model::{Delivery, DeliveryStatus};
use crate::pattern::event_type_matches;
use crate::query::{get_delivery, list_deliveries, CorruptValue, DeliveryIndex, DeliveryQuery, PAGE_LEN_MAX};
use crate::tables::ReadTables;

/// Delivery ids one stored member chunk holds (16 bytes each: 4 KiB, below a stored value's
/// largest); every chunk of a recovery but its last is full.
pub const RECOVERY_CHUNK_IDS: usize = 256;

/// What a recover selects: the organisation's deliveries in one of `statuses`, and each other
/// field given. Stored in the log as the operator gave it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecoveryFilter {
    pub statuses: Vec<DeliveryStatus>,
    pub endpoint_id: Option<EndpointId>,
    /// An exact type, `*` or a prefix pattern (`call.*`).
    pub event_type: Option<String>,
    /// Created strictly after.
    pub created_after_ms: Option<u64>,
    /// Created strictly before.
    pub created_before_ms: Option<u64>,
    /// Deliveries selected at most.
    pub max: u32,
}

impl RecoveryFilter {
    /// Whether the organisation's delivery `d` matches the filter.
    pub fn matches(&self, org_id: OrgId, d: &Delivery) -> bool {
        d.org_id == org_id
            && self.statuses.contains(&d.status)
            && self.endpoint_id.is_none_or(|e| d.endpoint_id == Some(e))
            && self.event_type.as_deref().is_none_or(|p| event_type_matches(p, &d.event_type))
            && self.created_after_ms.is_none_or(|after| d.created_at_ms > after)
            && self.created_before_ms.is_none_or(|before| d.created_at_ms < before)
    }

    /// The index walk that answers the filter (see the module documentation).
    fn query(&self, org_id: OrgId) -> DeliveryQuery {
        let parts = |part: &dyn Fn(DeliveryStatus) -> DeliveryIndex| {
            DeliveryIndex::Union(self.statuses.iter().map(|s| part(*s)).collect())
        };
        let exact_type = self.event_type.as_deref().filter(|t| !t.contains('*'));
        let index = match (self.endpoint_id, exact_type) {
            (Some(e), _) => parts(&|s| DeliveryIndex::EndpointStatus(e, s)),
            (None, Some(t)) if self.statuses.contains(&DeliveryStatus::Delivered) => {
                DeliveryIndex::OrgEventType(org_id, t.to_owned())
            }
            (None, _) => parts(&|s| DeliveryIndex::OrgStatus(org_id, s)),
        };
        DeliveryQuery {
            index,
            created_from_ms: self.created_after_ms.map(|ms| ms.saturating_add(1)),
            created_before_ms: self.created_before_ms,
        }
    }
}

/// What a recover selects: the matching deliveries, oldest first, at most the filter's `max`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RecoverySelection {
    pub delivery_ids: Vec<DeliveryId>,
    /// More deliveries matched than `max`.
    pub truncated: bool,
}

/// The organisation's deliveries that match `filter`, oldest first, at most its `max`: reads
/// the index pages the walk needs and the rows it meets, stopping one match past `max`.
pub fn select_recovery(
    t: &impl ReadTables,
    org_id: OrgId,
    filter: &RecoveryFilter,
) -> Result<RecoverySelection, CorruptValue> {
    let max = usize::try_from(filter.max).unwrap_or(usize::MAX);
    let query = filter.query(org_id);
    let mut selection = RecoverySelection::default();
    let mut cursor = None;
    loop {
        let page = list_deliveries(t, &query, cursor, PAGE_LEN_MAX)?;
        for d in page.items.iter().filter(|d| filter.matches(org_id, d)) {
            if selection.delivery_ids.len() == max {
                selection.truncated = true;
                return Ok(selection);
            }
            selection.delivery_ids.push(d.id);
        }
        match page.next {
            Some(next) => cursor = Some(next),
            None => return Ok(selection),
        }
    }
}

/// A recovery as stored: who asked, by what filter, and how many deliveries it re-queued.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Recovery {
    pub id: RecoveryId,
    pub org_id: OrgId,
    pub filter: RecoveryFilter,
    /// `None`: herald's own (no key).
    pub by_key: Option<ApiKeyId>,
    pub created_at_ms: u64,
    /// The log record of its `RecoveryRequested`.
    pub seq: u64,
    /// Deliveries re-queued (its members).
    pub queued: u64,
}

/// A recovery's deliveries by their status now.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RecoveryCounts {
    pub queued: u64,
    /// Delivered, counting those retention dropped since (it drops only delivered deliveries).
    pub delivered: u64,
    pub pending: u64,
    /// Exhausted or inactive again.
    pub failed: u64,
}

pub fn get_recovery(t: &impl ReadTables, id: RecoveryId) -> Result<Option<Recovery>, CorruptValue> {
    let key = keys::recovery(id);
    match t.get(&key) {
        None => Ok(None),
        Some(bytes) => codec::from_bytes(&bytes).map(Some).ok_or(CorruptValue { key }),
    }
}

/// The member chunk `chunk` of the recovery: its delivery ids (none past the last chunk).
pub fn recovery_members(
    t: &impl ReadTables,
    id: RecoveryId,
    chunk: u32,
) -> Result<Vec<DeliveryId>, CorruptValue> {
    let key = keys::recovery_members(id, chunk);
    let Some(bytes) = t.get(&key) else { return Ok(Vec::new()) };
    if bytes.len() % 16 != 0 {
        return Err(CorruptValue { key });
    }
    Ok(bytes.chunks_exact(16).map(|b| DeliveryId::from_bytes(b.try_into().unwrap_or_default())).collect())
}

/// The recovery's deliveries by their status now: reads each member's row (cost grows with the
/// recovery). A member whose row retention dropped counts as delivered.
pub fn recovery_counts(t: &impl ReadTables, recovery: &Recovery) -> Result<RecoveryCounts, CorruptValue> {
    let mut counts = RecoveryCounts { queued: recovery.queued, ..RecoveryCounts::default() };
    let chunks = recovery.queued.div_ceil(RECOVERY_CHUNK_IDS as u64);
    for chunk in 0..u32::try_from(chunks).unwrap_or(u32::MAX) {
        for id in recovery_members(t, recovery.id, chunk)? {
            match get_delivery(t, id)?.map(|d| d.status) {
                None | Some(DeliveryStatus::Delivered) => counts.delivered += 1,
                Some(DeliveryStatus::Pending) => counts.pending += 1,
                Some(DeliveryStatus::Exhausted | DeliveryStatus::Inactive) => counts.failed += 1,
            }
        }
    }
    Ok(counts)
}
