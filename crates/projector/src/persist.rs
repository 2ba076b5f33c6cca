//! The bridge to the log: the projection kept in the log's store, written in the same atomic
//! batch as the records it derives from, and rebuilt from the log for audit.
//!
//! [`Projector`] is a [`herald_log::Machine`]: each command is a list of events; each is appended
//! as a record and folded into the tables through the batch's [`Tx`], so the log and the projection
//! commit together or not at all. Restart reads the stored projection; it does not replay the log.

use std::ops::ControlFlow;

use herald_log::{keyspace, read_records, LogError, Machine, Pair, Record, Store, StoreError, Tx};

use crate::event::{decode, encode, DecodeError, Event, RecordActor};
use crate::fold::{apply, apply_unstaged, ApplyError};
use crate::index::IndexRange;
use crate::keys::{KS_FIRST, KS_LAST};
use crate::query::applied_seq;
use crate::query::CorruptValue;
use crate::staged::{fold_staged_entries, Deferring, StagedIndex};
use crate::tables::{MemTables, ReadTables, Tables};

/// [`Tables`] over a log batch: reads see the store plus the batch so far.
///
/// Index entries are staged in the batch under their logical keys (a put adds, a delete
/// removes; keys that are never stored) and folded into their chunks once, at the end of the
/// batch, by [`fold_staged_entries`]: a batch of a few hundred deliveries reads and writes each
/// chunk it touches once instead of once per entry. A rejected command's entries are undone
/// with the rest of it; lists read during the batch see them: `StagedIndex` keeps and merges them.
pub struct TxTables<'t, 'a>(pub &'t mut Tx<'a>);

/// Reads as [`TxRead`] does.
impl ReadTables for TxTables<'_, '_> {
    fn get(&self, key: &[u8]) -> Option<Vec<u8>> {
        TxRead(self.0).get(key)
    }

    fn scan(&self, from: &[u8], to: &[u8], limit: usize) -> Vec<(Vec<u8>, Vec<u8>)> {
        TxRead(self.0).scan(from, to, limit)
    }

    fn scan_index(
        &self,
        chunks: &dyn ReadTables,
        range: &IndexRange<'_>,
    ) -> Result<Vec<Vec<u8>>, CorruptValue> {
        TxRead(self.0).scan_index(chunks, range)
    }
}

impl Tables for TxTables<'_, '_> {
    fn put(&mut self, key: Vec<u8>, value: Vec<u8>) {
        self.0.put(key, value)
    }

    fn delete(&mut self, key: &[u8]) {
        self.0.delete(key)
    }

    fn add_entry(&mut self, key: &[u8]) -> Result<(), CorruptValue> {
        StagedIndex::stage(self.0, key, true)
    }

    fn remove_entry(&mut self, key: &[u8]) -> Result<(), CorruptValue> {
        StagedIndex::stage(self.0, key, false)
    }
}

/// Read-only [`ReadTables`] over a log batch, for checks before writing.
pub struct TxRead<'t, 'a>(pub &'t Tx<'a>);

impl ReadTables for TxRead<'_, '_> {
    fn get(&self, key: &[u8]) -> Option<Vec<u8>> {
        self.0.get(key)
    }

    fn scan(&self, from: &[u8], to: &[u8], limit: usize) -> Vec<(Vec<u8>, Vec<u8>)> {
        self.0.scan(from, to, limit)
    }

    fn scan_index(
        &self,
        chunks: &dyn ReadTables,
        range: &IndexRange<'_>,
    ) -> Result<Vec<Vec<u8>>, CorruptValue> {
        StagedIndex::Batch(self.0).scan(chunks, range)
    }
}

/// Read-only tables over a store, for queries outside the writer thread. A store error reads
/// as absent: a caller that must tell them apart reads through [`CheckedTables`].
pub struct StoreTables<'a>(pub &'a dyn Store);

impl ReadTables for StoreTables<'_> {
    fn get(&self, key: &[u8]) -> Option<Vec<u8>> {
        CheckedTables::new(self.0).get(key)
    }

    fn scan(&self, from: &[u8], to: &[u8], limit: usize) -> Vec<(Vec<u8>, Vec<u8>)> {
        CheckedTables::new(self.0).scan(from, to, limit)
    }

    fn scan_rev(&self, from: &[u8], to: &[u8], limit: usize) -> Vec<(Vec<u8>, Vec<u8>)> {
        CheckedTables::new(self.0).scan_rev(from, to, limit)
    }
}

/// Read-only tables over a store that keep the first store error. The read that met it reads
/// as absent (so a query goes on to its end), and [`CheckedTables::finish`] returns the error:
/// an answer built from such reads may miss what the store holds (a row, a page's entries), so
/// it must not be given as "not found" or as a whole list.
pub struct CheckedTables<'a> {
    store: &'a dyn Store,
    error: std::cell::RefCell<Option<StoreError>>,
}

impl<'a> CheckedTables<'a> {
    pub fn new(store: &'a dyn Store) -> CheckedTables<'a> {
        CheckedTables { store, error: std::cell::RefCell::new(None) }
    }

    /// The first store error any read met, if one did.
    pub fn finish(self) -> Result<(), StoreError> {
        self.error.into_inner().map_or(Ok(()), Err)
    }

    /// Runs `query` over `store`: its answer, or the first store error one of its reads met
    /// (the answer would have been built from what the store did not return).
    pub fn run<T>(store: &dyn Store, query: impl FnOnce(&CheckedTables<'_>) -> T) -> Result<T, StoreError> {
        let t = CheckedTables::new(store);
        let out = query(&t);
        t.finish().map(|()| out)
    }

    fn kept<T>(&self, read: Result<T, StoreError>) -> Option<T> {
        match read {
            Ok(value) => Some(value),
            Err(e) => {
                self.error.borrow_mut().get_or_insert(e);
                None
            }
        }
    }
}

impl ReadTables for CheckedTables<'_> {
    fn get(&self, key: &[u8]) -> Option<Vec<u8>> {
        self.kept(self.store.get(key)).flatten()
    }

    fn scan(&self, from: &[u8], to: &[u8], limit: usize) -> Vec<(Vec<u8>, Vec<u8>)> {
        self.kept(herald_log::scan_vec(self.store, from, to, limit)).unwrap_or_default()
    }

    /// One `last` per pair: each is a seek from the end of the shrinking range.
    fn scan_rev(&self, from: &[u8], to: &[u8], limit: usize) -> Vec<(Vec<u8>, Vec<u8>)> {
        let mut out = Vec::new();
        let mut to = to.to_vec();
        while out.len() < limit {
            match self.kept(self.store.last(from, &to)) {
                Some(Some((k, v))) => {
                    to = k.clone();
                    out.push((k, v));
                }
                _ => break,
            }
        }
        out
    }
}

/// The log machine that appends events and folds them into the stored projection. No key asks
/// (tests, benches, tools): each record names the system as its actor.
#[derive(Debug, Default)]
pub struct Projector;

impl Machine for Projector {
    /// Events with the time to stamp on each, committed together.
    type Command = Vec<(u64, Event)>;
    /// The seqs they got.
    type Reply = Vec<u64>;
    type Rejection = ApplyError;

    fn execute(&mut self, events: Self::Command, tx: &mut Tx<'_>) -> Result<Vec<u64>, ApplyError> {
        let mut seqs = Vec::with_capacity(events.len());
        for (at_ms, event) in events {
            let seq = tx.append(at_ms, encode(RecordActor::System, &event)).seq;
            // The log's writer rolls the batch back to this command's savepoint on an error.
            apply_unstaged(&mut TxTables(tx), seq, at_ms, &event)?;
            seqs.push(seq);
        }
        Ok(seqs)
    }

    fn finish(&mut self, tx: &mut Tx<'_>) -> Result<(), StoreError> {
        fold_staged_entries(tx)
    }
}

/// Why a rebuild stopped.
#[derive(Debug, Clone, PartialEq)]
pub enum RebuildError {
    Log(LogError),
    Decode {
        seq: u64,
        error: DecodeError,
    },
    Apply {
        seq: u64,
        error: ApplyError,
    },
    /// The projection being caught up holds a value that does not decode.
    Projection(CorruptValue),
    /// The checkpoint the kept log starts from is missing or damaged.
    Checkpoint(String),
}

impl std::fmt::Display for RebuildError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RebuildError::Log(e) => write!(f, "{e}"),
            RebuildError::Decode { seq, error } => write!(f, "record {seq}: undecodable event: {error:?}"),
            RebuildError::Apply { seq, error } => write!(f, "record {seq}: event not applicable: {error:?}"),
            RebuildError::Projection(c) => write!(f, "projection: {c}"),
            RebuildError::Checkpoint(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for RebuildError {}

const REBUILD_READ_RECORDS: usize = 4096;
const _: () = assert!(KS_FIRST >= keyspace::USER_FIRST, "the projector's keyspaces overlap the log's");

/// Folds the log's records after `tables`' applied seq into `tables`, in pages of records.
/// `progress` is called after each page with the seq reached, the tables whole at that seq.
///
/// Each event is applied straight into `tables`, and the index entries of a page are folded
/// into their chunks once, at its end (`staged::Deferring`): on an error the tables are left
/// part-way through a page, to be discarded (a rebuild's scratch tables are).
pub fn catch_up(
    store: &dyn Store,
    tables: &mut impl Tables,
    progress: &mut dyn FnMut(u64),
) -> Result<u64, RebuildError> {
    fold_pages(store, Refold::after(tables, REBUILD_READ_RECORDS)?, progress)
}

/// Folds the records after `refold`'s into it, read a page of its `page_records` at a time; `progress` is
/// called after each page with the seq reached, the tables whole at that seq.
fn fold_pages<T: Tables>(
    store: &dyn Store,
    mut refold: Refold<T>,
    progress: &mut dyn FnMut(u64),
) -> Result<u64, RebuildError> {
    loop {
        let records = read_records(store, refold.next, refold.page_records).map_err(RebuildError::Log)?;
        let Some(last) = records.last().map(|r| r.seq) else { return refold.finish() };
        for rec in &records {
            refold.push(rec)?;
        }
        refold.fold_aside()?;
        progress(last);
    }
}

pub(crate) fn fold_record(tables: &mut impl Tables, rec: &Record) -> Result<(), RebuildError> {
    let event = decode(&rec.body).map_err(|error| RebuildError::Decode { seq: rec.seq, error })?;
    apply(tables, rec.seq, rec.at_ms, &event).map_err(|error| RebuildError::Apply { seq: rec.seq, error })
}

/// Rebuilds the whole projection into scratch tables in memory: the checkpoint the kept log
/// starts from (none before a compaction), then every kept record.
pub fn rebuild(store: &dyn Store, progress: &mut dyn FnMut(u64)) -> Result<MemTables, RebuildError> {
    let mut tables = MemTables::new();
    rebuild_into(store, &mut tables, REBUILD_READ_RECORDS, progress)?;
    Ok(tables)
}

/// [`rebuild`] into `tables` (empty) of the caller's, such as [`ScratchTables`](crate::ScratchTables)
/// on disk: the checkpoint streamed into them, then the kept records folded, `page_records` at
/// a time. Returns the last seq folded. On an error `tables` hold part of the rebuild, to be
/// discarded.
pub fn rebuild_into(
    store: &dyn Store,
    tables: &mut impl Tables,
    page_records: usize,
    progress: &mut dyn FnMut(u64),
) -> Result<u64, RebuildError> {
    fold_pages(store, Refold::start(store, tables, page_records)?, progress)
}

/// A rebuild fed the kept records one at a time, in log order, by a reader of the log that
/// checks them as it goes (`herald verify` checks the chain in the same pass): the checkpoint
/// the kept log starts from is loaded first, each record is folded as it comes, and the index
/// entries of every `page_records` records are folded into their chunks together. On an error
/// the tables hold part of the rebuild, to be discarded.
pub struct Refold<T: Tables> {
    tables: Deferring<T>,
    /// The seq of the record to fold next.
    next: u64,
    page_records: usize,
    /// Records folded since the index entries were last folded.
    in_page: usize,
}

impl<T: Tables> Refold<T> {
    /// Loads into `tables` (empty) the checkpoint the kept log of `store` starts from (none
    /// before a compaction).
    pub fn start(store: &dyn Store, mut tables: T, page_records: usize) -> Result<Refold<T>, RebuildError> {
        let anchor_seq = herald_log::read_head(store).map_err(RebuildError::Log)?.anchor_seq;
        crate::compact::load_checkpoint_into(store, anchor_seq, &mut tables, &mut |_, _| {}).map_err(
            |e| match e {
                crate::compact::CompactError::Log(e) => RebuildError::Log(e),
                other => RebuildError::Checkpoint(other.to_string()),
            },
        )?;
        Refold::after(tables, page_records)
    }

    /// Folds into `tables` the records after the seq they have applied.
    fn after(tables: T, page_records: usize) -> Result<Refold<T>, RebuildError> {
        let next = applied_seq(&tables).map_err(RebuildError::Projection)? + 1;
        Ok(Refold { tables: Deferring::new(tables), next, page_records: page_records.max(1), in_page: 0 })
    }

    /// Folds `rec`, which must be the record after the last one folded.
    pub fn push(&mut self, rec: &Record) -> Result<(), RebuildError> {
        let event = decode(&rec.body).map_err(|error| RebuildError::Decode { seq: rec.seq, error })?;
        apply_unstaged(&mut self.tables, rec.seq, rec.at_ms, &event)
            .map_err(|error| RebuildError::Apply { seq: rec.seq, error })?;
        self.next = rec.seq + 1;
        self.in_page += 1;
        if self.in_page >= self.page_records {
            self.fold_aside()?;
        }
        Ok(())
    }

    /// Folds the index entries held aside into their chunks: the tables are then whole at the
    /// last record folded.
    fn fold_aside(&mut self) -> Result<(), RebuildError> {
        if self.in_page == 0 {
            return Ok(());
        }
        self.in_page = 0;
        self.tables.fold().map_err(RebuildError::Projection)
    }

    /// Folds the index entries still aside; returns the last seq folded.
    pub fn finish(mut self) -> Result<u64, RebuildError> {
        self.fold_aside()?;
        Ok(self.next - 1)
    }
}

/// Every pair of the projection stored in `store`, ascending: compare it with a rebuild's dump.
/// Pairs that an earlier version left ([`is_legacy`](crate::keys::is_legacy)) are not part of it,
/// except list index entries it stored one key each: those are read as the chunks this version
/// would store them in (`index.rs`), so a store not yet converted verifies as it is.
pub fn stored_projection(store: &dyn Store) -> Result<Vec<Pair>, LogError> {
    let mut out = Vec::new();
    let mut unchunked = MemTables::new();
    let end = [KS_LAST + 1];
    store.scan(&[KS_FIRST], &end, &mut |k, v| {
        if crate::keys::LEGACY_INDEX_KEYSPACES.contains(&k[0]) {
            unchunked.put(k.to_vec(), Vec::new());
        } else if !crate::keys::is_legacy(k[0]) {
            out.push((k.to_vec(), v.to_vec()));
        }
        ControlFlow::Continue(())
    })?;
    if unchunked.is_empty() {
        return Ok(out);
    }
    let mut chunks = MemTables::new();
    for (key, _) in unchunked.iter() {
        // A key that is not an entry is kept as it is, to show up in the comparison.
        if chunks.add_entry(key).is_err() {
            chunks.put(key.to_vec(), Vec::new());
        }
    }
    out.retain(|(k, _)| !crate::index::is_chunk_keyspace(k[0]));
    out.extend(chunks.dump());
    out.sort();
    Ok(out)
}

/// The projection's applied seq and the log's last seq: equal unless something is wrong, since
/// both are written in one atomic batch.
pub fn projection_lag(store: &dyn Store) -> Result<(u64, u64), RebuildError> {
    let applied = applied_seq(&StoreTables(store)).map_err(RebuildError::Projection)?;
    let head = herald_log::read_head(store).map_err(RebuildError::Log)?;
    Ok((applied, head.next_seq - 1))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use herald_log::{Durability, Log, LogConfig, MemStore};

    use super::*;
    use crate::testkit::{delivery, endpoint, publish};

    fn config() -> LogConfig {
        LogConfig { batch_commands_max: 16, queue_commands_max: 64, durability: Durability::Flush }
    }

    /// A store whose reads of keyspace 0x50 fail (sled after an IO error refuses some reads).
    struct ReadsFail(MemStore);

    impl Store for ReadsFail {
        fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
            if key[0] == 0x50 {
                return Err(StoreError::Io("refused".into()));
            }
            self.0.get(key)
        }
        fn scan(&self, from: &[u8], to: &[u8], visit: herald_log::Visit<'_>) -> Result<(), StoreError> {
            if from[0] == 0x50 {
                return Err(StoreError::Io("refused".into()));
            }
            self.0.scan(from, to, visit)
        }
        fn last(&self, from: &[u8], to: &[u8]) -> Result<Option<Pair>, StoreError> {
            if from[0] == 0x50 {
                return Err(StoreError::Io("refused".into()));
            }
            self.0.last(from, to)
        }
        fn apply(&self, batch: &herald_log::WriteBatch) -> Result<(), StoreError> {
            self.0.apply(batch)
        }
        fn flush(&self, durability: Durability) -> Result<(), StoreError> {
            self.0.flush(durability)
        }
    }

    #[test]
    fn checked_tables_keep_the_first_store_error_where_store_tables_read_absent() {
        let mem = MemStore::new();
        let mut batch = herald_log::WriteBatch::default();
        batch.put(vec![0x50, 1], b"row".to_vec());
        batch.put(vec![0x30, 1], b"other".to_vec());
        mem.apply(&batch).unwrap();
        let store = ReadsFail(mem);

        // Reads the store refuses read as absent in both; only the checked ones say so.
        let t = CheckedTables::new(&store);
        assert_eq!(t.get(&[0x30, 1]), Some(b"other".to_vec()));
        assert!(t.scan(&[0x30], &[0x31], 10).len() == 1 && t.scan_rev(&[0x30], &[0x31], 10).len() == 1);
        assert!(t.finish().is_ok(), "no read failed");
        for read in [0, 1, 2] {
            let t = CheckedTables::new(&store);
            let empty = match read {
                0 => t.get(&[0x50, 1]).is_none(),
                1 => t.scan(&[0x50], &[0x51], 10).is_empty(),
                _ => t.scan_rev(&[0x50], &[0x51], 10).is_empty(),
            };
            assert!(empty);
            assert_eq!(t.get(&[0x30, 1]), Some(b"other".to_vec()), "later reads still answer");
            assert_eq!(t.finish(), Err(StoreError::Io("refused".into())), "read {read}");
        }
        assert_eq!(StoreTables(&store).get(&[0x50, 1]), None);
    }

    #[test]
    fn a_rejected_command_writes_neither_records_nor_projection() {
        let store = MemStore::new();
        let log = Log::open(Arc::new(store.clone()), Projector, config()).unwrap();
        log.submit(vec![(1, endpoint(1)), (1, publish(1))]).unwrap().unwrap();
        let before = store.with_map(|m| m.clone());
        // The delivery refers to an event that does not exist: the whole command is refused,
        // including the valid endpoint creation before it.
        let out = log.submit(vec![(2, endpoint(2)), (2, delivery(1, 99, Some(1), 2))]).unwrap();
        assert!(matches!(out, Err(ApplyError::UnknownEvent(_))), "{out:?}");
        assert_eq!(store.with_map(|m| m.clone()), before);
        assert_eq!(log.submit(vec![(3, delivery(1, 1, Some(1), 3))]).unwrap().unwrap(), vec![3]);
        log.close();
        assert_eq!(projection_lag(&store).unwrap(), (3, 3));
        assert_eq!(stored_projection(&store).unwrap(), rebuild(&store, &mut |_| {}).unwrap().dump());
    }

    #[test]
    fn catch_up_folds_only_the_records_after_the_applied_seq() {
        let store = MemStore::new();
        let log = Log::open(Arc::new(store.clone()), Projector, config()).unwrap();
        log.submit(vec![(1, endpoint(1)), (1, publish(1))]).unwrap().unwrap();
        log.submit(vec![(2, delivery(1, 1, Some(1), 2))]).unwrap().unwrap();
        log.close();
        let mut partial = MemTables::new();
        apply(&mut partial, 1, 1, &endpoint(1)).unwrap();
        let mut pages = Vec::new();
        assert_eq!(catch_up(&store, &mut partial, &mut |seq| pages.push(seq)).unwrap(), 3);
        assert_eq!(pages, vec![3]);
        assert_eq!(partial.dump(), stored_projection(&store).unwrap());
    }

    #[test]
    fn an_undecodable_record_stops_a_rebuild_at_its_seq() {
        let store = MemStore::new();
        let log = Log::open(Arc::new(store.clone()), herald_log::AppendOnly, config()).unwrap();
        log.submit(vec![(1, encode(RecordActor::System, &endpoint(1))), (1, vec![9, 9, 9])])
            .unwrap()
            .unwrap();
        log.close();
        let err = rebuild(&store, &mut |_| {}).unwrap_err();
        assert!(matches!(err, RebuildError::Decode { seq: 2, .. }), "{err:?}");
    }
}
