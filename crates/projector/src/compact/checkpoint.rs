//! The checkpoint: the projection at the log's anchor, stored beside the projection (outside
//! its keyspaces, so a rebuild's comparison skips it) with the payloads of the events it keeps
//! whose records were dropped; read back checked against its hash.
//!
//! | byte | key | value |
//! | --- | --- | --- |
//! | `0x90` | (alone) | checkpoint seq (u64 BE) ++ blake3 of its pairs and payloads |
//! | `0x91` | projection key | value at the checkpoint |
//! | `0x92` | event id | payload of a kept event whose record was dropped |

use std::collections::BTreeMap;
use std::ops::ControlFlow;

use herald_log::{LogError, Store, Tx};

use super::{corrupt, CompactError};
use crate::ids::EventId;
use crate::index;
use crate::keys;
use crate::tables::{MemTables, ReadTables, Tables};

pub const KS_CHECKPOINT_META: u8 = 0x90;
pub const KS_CHECKPOINT: u8 = 0x91;
pub const KS_CHECKPOINT_PAYLOAD: u8 = 0x92;
pub(super) const CHECKPOINT_META: &[u8] = &[KS_CHECKPOINT_META];
const _: () = assert!(KS_CHECKPOINT_META > keys::KS_LAST, "the checkpoint is outside the projection");
pub(super) fn payload_key(id: EventId) -> Vec<u8> {
    keys::key(KS_CHECKPOINT_PAYLOAD, &[id.as_bytes()])
}

/// The blake3 of a checkpoint: its pairs, then its payloads, each length-prefixed.
pub(super) fn checkpoint_hash<'p>(
    pairs: impl Iterator<Item = (&'p [u8], &'p [u8])>,
    payloads: impl Iterator<Item = (&'p [u8], &'p [u8])>,
) -> [u8; 32] {
    let mut hasher = CheckpointHasher::default();
    pairs.for_each(|(key, value)| hasher.add(b'p', key, value));
    payloads.for_each(|(key, value)| hasher.add(b'b', key, value));
    hasher.finish()
}

/// [`checkpoint_hash`] fed one item at a time, for a reader that streams the checkpoint.
#[derive(Default)]
struct CheckpointHasher(blake3::Hasher);

impl CheckpointHasher {
    /// Adds a pair (`tag` `p`) or a payload (`b`); all pairs come before the payloads.
    fn add(&mut self, tag: u8, key: &[u8], value: &[u8]) {
        self.0.update(&[tag]);
        self.0.update(&(key.len() as u64).to_be_bytes());
        self.0.update(key);
        self.0.update(&(value.len() as u64).to_be_bytes());
        self.0.update(value);
    }

    fn finish(&self) -> [u8; 32] {
        *self.0.finalize().as_bytes()
    }
}

/// Replaces the stored checkpoint with `tables` and `payloads`, as of `seq`.
pub(super) fn write_checkpoint(
    tx: &mut Tx<'_>,
    seq: u64,
    tables: &MemTables,
    payloads: &BTreeMap<EventId, Vec<u8>>,
) {
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
pub(super) fn checkpoint_pairs<'p>(
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
    let mut tables = MemTables::new();
    let mut payloads = Vec::new();
    load_checkpoint_into(store, anchor_seq, &mut tables, &mut |key, value| {
        payloads.push((key.to_vec(), value.to_vec()))
    })?;
    Ok((tables, payloads))
}

/// [`load_checkpoint`] streamed: the checkpoint's pairs are put into `tables` (empty) as they
/// are read and its payloads handed to `payload`, so nothing of it is held in memory; the hash
/// is checked at the end. On an error `tables` hold part of it, to be discarded.
pub fn load_checkpoint_into(
    store: &dyn Store,
    anchor_seq: u64,
    tables: &mut impl Tables,
    payload: &mut dyn FnMut(&[u8], &[u8]),
) -> Result<(), CompactError> {
    let meta = store.get(CHECKPOINT_META).map_err(LogError::from)?;
    let Some(meta) = meta else {
        if anchor_seq == 0 {
            return Ok(());
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
    let mut hasher = CheckpointHasher::default();
    // A checkpoint written by an earlier version may hold index keys this one no longer keeps:
    // hashed with the rest, left out of the state; entries it kept one key each are chunked
    // from its delivery rows instead.
    let mut unchunked = false;
    store
        .scan(&[KS_CHECKPOINT], &[KS_CHECKPOINT + 1], &mut |key, value| {
            let inner = &key[1..];
            hasher.add(b'p', inner, value);
            match inner.first() {
                Some(ks) if keys::is_legacy(*ks) => unchunked |= keys::LEGACY_INDEX_KEYSPACES.contains(ks),
                _ => tables.put(inner.to_vec(), value.to_vec()),
            }
            ControlFlow::Continue(())
        })
        .map_err(LogError::from)?;
    store
        .scan(&[KS_CHECKPOINT_PAYLOAD], &[KS_CHECKPOINT_PAYLOAD + 1], &mut |key, value| {
            hasher.add(b'b', &key[1..], value);
            payload(&key[1..], value);
            ControlFlow::Continue(())
        })
        .map_err(LogError::from)?;
    if hasher.finish().as_slice() != hash {
        return Err(CompactError::Checkpoint(format!("its content does not match its hash (seq {seq})")));
    }
    if unchunked {
        index::rebuild_from_deliveries(tables).map_err(corrupt)?;
    }
    Ok(())
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
    let mut batch = herald_log::WriteBatch::default();
    for (key, value) in tables.iter() {
        batch.put(key.to_vec(), value.to_vec());
    }
    for (key, value) in checkpoint_pairs(seq, tables, payloads.iter().map(|(id, p)| (*id, p.as_slice()))) {
        batch.put(key, value);
    }
    store.apply(&batch).map_err(LogError::from)?;
    Ok(())
}

/// The checkpoint read in place, key by key: the projection at the anchor as [`ReadTables`],
/// for a reader that needs a few rows of it (a replay of one delivery), not all of it. Unlike
/// [`load_checkpoint`] it does not check the checkpoint's hash, which takes reading it whole;
/// `herald verify` does.
pub struct CheckpointView<'t, T: ReadTables> {
    tables: &'t T,
}

impl<'t, T: ReadTables> CheckpointView<'t, T> {
    /// The checkpoint stored in `tables` (the store's pairs), which must stand at `anchor_seq`.
    pub fn open(tables: &'t T, anchor_seq: u64) -> Result<CheckpointView<'t, T>, CompactError> {
        let meta = tables.get(CHECKPOINT_META);
        let seq = meta.as_deref().and_then(|m| <[u8; 8]>::try_from(m.get(..8)?).ok()).map(u64::from_be_bytes);
        if seq != Some(anchor_seq) {
            return Err(CompactError::Checkpoint(format!(
                "the log starts after seq {anchor_seq} but the checkpoint stands at {seq:?}"
            )));
        }
        Ok(CheckpointView { tables })
    }

    fn inner(key: &[u8]) -> Vec<u8> {
        [&[KS_CHECKPOINT], key].concat()
    }

    fn strip(pairs: Vec<(Vec<u8>, Vec<u8>)>) -> Vec<(Vec<u8>, Vec<u8>)> {
        pairs.into_iter().map(|(k, v)| (k[1..].to_vec(), v)).collect()
    }
}

impl<T: ReadTables> ReadTables for CheckpointView<'_, T> {
    fn get(&self, key: &[u8]) -> Option<Vec<u8>> {
        self.tables.get(&Self::inner(key))
    }

    fn scan(&self, from: &[u8], to: &[u8], limit: usize) -> Vec<(Vec<u8>, Vec<u8>)> {
        Self::strip(self.tables.scan(&Self::inner(from), &Self::inner(to), limit))
    }

    fn scan_rev(&self, from: &[u8], to: &[u8], limit: usize) -> Vec<(Vec<u8>, Vec<u8>)> {
        Self::strip(self.tables.scan_rev(&Self::inner(from), &Self::inner(to), limit))
    }
}
