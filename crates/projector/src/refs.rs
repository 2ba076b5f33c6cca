//! Reads the record refs the fold keeps from rules 4 on (`KS_RECORD_REFS`, written by
//! `fold/refs.rs`): for a delivery, an endpoint or the store-wide settings, the seqs of the
//! records that touched it, so that a replay or a delivery's history reads those records alone.

use crate::ids::DeliveryId;
use crate::keys::{self, KS_RECORD_REFS};
use crate::model::DeliveryStatus;
use crate::query::CorruptValue;
use crate::tables::ReadTables;

/// The subject id of the records every story shows: the policy and the rules adopted.
pub const STORE_WIDE: [u8; 16] = [0; 16];
/// The key of the seq from which the refs are kept (the record that adopted rules 4).
pub const REFS_FROM: &[u8] = &[KS_RECORD_REFS];

/// One record that touched a subject.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct RecordRef {
    pub seq: u64,
    /// For a delivery: its status after that record.
    pub status: Option<DeliveryStatus>,
}

/// The seq from which the fold keeps refs (`None`: rules 4 were never adopted). Records before
/// it have none: a story that reaches back before it must be read by a scan.
pub fn refs_from(t: &impl ReadTables) -> Result<Option<u64>, CorruptValue> {
    let Some(value) = t.get(REFS_FROM) else { return Ok(None) };
    let bytes =
        <[u8; 8]>::try_from(value.as_slice()).map_err(|_| CorruptValue { key: REFS_FROM.to_vec() })?;
    Ok(Some(u64::from_be_bytes(bytes)))
}

/// The refs to the subject whose 16-byte id is `id` (a delivery's, an endpoint's, or
/// [`STORE_WIDE`]) of the records after `after_seq`, in seq order.
pub fn record_refs(
    t: &impl ReadTables,
    id: &[u8; 16],
    after_seq: u64,
) -> Result<Vec<RecordRef>, CorruptValue> {
    let from = keys::record_ref(id, after_seq.saturating_add(1));
    let to = keys::prefix_end(&keys::key(KS_RECORD_REFS, &[id])).unwrap_or_else(|| vec![KS_RECORD_REFS + 1]);
    let mut out = Vec::new();
    for (key, value) in t.scan(&from, &to, usize::MAX) {
        let corrupt = || CorruptValue { key: key.clone() };
        let seq = key.get(17..25).and_then(|b| <[u8; 8]>::try_from(b).ok()).ok_or_else(corrupt)?;
        let status = match value.as_slice() {
            [] => None,
            [byte] => Some(status_of_byte(*byte).ok_or_else(corrupt)?),
            _ => return Err(corrupt()),
        };
        out.push(RecordRef { seq: u64::from_be_bytes(seq), status });
    }
    Ok(out)
}

/// The refs to delivery `id` after `after_seq` (see [`record_refs`]).
pub fn delivery_refs(
    t: &impl ReadTables,
    id: DeliveryId,
    after_seq: u64,
) -> Result<Vec<RecordRef>, CorruptValue> {
    record_refs(t, id.as_bytes(), after_seq)
}

/// Every ref key (not [`REFS_FROM`]) in `t`: what a compaction drops with the records.
pub(crate) fn all_ref_keys(t: &impl ReadTables) -> Vec<Vec<u8>> {
    let from = keys::successor(REFS_FROM);
    t.scan(&from, &[KS_RECORD_REFS + 1], usize::MAX).into_iter().map(|(k, _)| k).collect()
}

fn status_of_byte(byte: u8) -> Option<DeliveryStatus> {
    DeliveryStatus::ALL.into_iter().find(|s| keys::status_byte(*s) == byte)
}
