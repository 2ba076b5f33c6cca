//! The legacy migration: converts what an earlier version stored (whole-list index keys, list
//! entries one key each) to this version's keys, live and in the checkpoint. It reads the
//! store and writes through a log of its own ([`Migration`]), opened before the engine's: so
//! nothing writes the store beside a running log writer.

use std::collections::BTreeMap;
use std::ops::Bound::{Excluded, Included};
use std::ops::ControlFlow;

use std::sync::Arc;

use herald_log::{read_head, scan_vec, Durability, Log, LogConfig, LogError, Machine, Store, Tx, WriteBatch};

use super::checkpoint::{checkpoint_hash, load_checkpoint, CHECKPOINT_META, KS_CHECKPOINT};
use super::CompactError;
use crate::index;
use crate::keys;
use crate::persist::RebuildError;
use crate::tables::{ReadTables, Tables};

/// Brings a store an earlier version wrote to this version's keys, each batch written through
/// a log and made durable; returns how many stored pairs went. Run before the log opens.
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
pub fn drop_legacy(store: Arc<dyn Store>) -> Result<u64, CompactError> {
    let mut out = Writer::new(store.clone());
    let store = store.as_ref();
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
            delete_range(store, &mut out, &[ks], &[ks + 1])?;
        }
        chunk_stored_entries(store, &mut out)?;
    }
    let mut dropped = 0u64;
    for keyspace in keys::LEGACY_KEYSPACES.into_iter().chain(keys::LEGACY_INDEX_KEYSPACES) {
        dropped += delete_range(store, &mut out, &[keyspace], &[keyspace + 1])?;
    }
    let mut stale = WriteBatch::default();
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
        out.apply(stale)?;
    }
    out.close();
    Ok(dropped)
}

/// Deletes every stored pair in `from..to`, in batches; returns how many.
fn delete_range(store: &dyn Store, out: &mut Writer, from: &[u8], to: &[u8]) -> Result<u64, CompactError> {
    const BATCH_KEYS: usize = 10_000;
    let mut deleted = 0;
    loop {
        let mut batch = WriteBatch::default();
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
        out.apply(batch)?;
    }
}

/// Adds every stored delivery's index entries to the chunks, a page of deliveries per store
/// batch.
fn chunk_stored_entries(store: &dyn Store, out: &mut Writer) -> Result<(), CompactError> {
    const PAGE: usize = 1024;
    let mut from = Some(vec![keys::KS_DELIVERY]);
    while let Some(start) = from {
        let mut staged = StagedStore { store, changes: BTreeMap::new() };
        from = index::chunk_deliveries(&mut staged, &start, PAGE)
            .map_err(|c| CompactError::Rebuild(RebuildError::Projection(c)))?;
        let mut batch = WriteBatch::default();
        for (key, value) in staged.changes {
            match value {
                Some(value) => batch.put(key, value),
                None => batch.delete(key),
            }
        }
        out.apply(batch)?;
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

/// The log machine the migration writes through: each command is a batch of writes worked out
/// from what the store holds, applied as a log batch of its own (no record).
struct Migration;

impl Machine for Migration {
    type Command = WriteBatch;
    type Reply = ();
    type Rejection = std::convert::Infallible;

    fn execute(&mut self, batch: WriteBatch, tx: &mut Tx<'_>) -> Result<(), Self::Rejection> {
        for (key, value) in batch.writes {
            match value {
                Some(value) => tx.put(key, value),
                None => tx.delete(&key),
            }
        }
        Ok(())
    }
}

/// Where the migration's batches go: a [`Migration`] log, opened on the first batch (a store
/// without anything to convert opens none), each batch durable before the next is worked out.
struct Writer {
    store: Arc<dyn Store>,
    log: Option<Log<Migration>>,
}

impl Writer {
    fn new(store: Arc<dyn Store>) -> Writer {
        Writer { store, log: None }
    }

    fn apply(&mut self, batch: WriteBatch) -> Result<(), CompactError> {
        let log = match &mut self.log {
            Some(log) => log,
            None => {
                let config =
                    LogConfig { batch_commands_max: 1, durability: Durability::Sync, ..LogConfig::default() };
                self.log.insert(Log::open(self.store.clone(), Migration, config)?)
            }
        };
        match log.submit(batch)? {
            Ok(()) => Ok(()),
            Err(never) => match never {},
        }
    }

    /// Stops the log's writer, once every batch is durable.
    fn close(self) {
        if let Some(log) = self.log {
            log.close();
        }
    }
}
