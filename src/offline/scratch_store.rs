//! The scratch store `verify` rebuilds the projection into: a redb database of one table in a
//! file of its own. It is written once and read back once, never by another process, and
//! deleted after; what it needs is cheap inserts of sorted batches and a memory bound that
//! holds by itself. sled 0.34 gave neither: each insert split and copied nodes (most of a
//! rebuild's time), and it kept every page a pass touched, so `verify` had to reopen it to stay
//! under `--memory-max`. redb keeps its cache within the size it is given.

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};

use herald_log::{Durability, Pair, Store, StoreError, Visit, WriteBatch};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

const TABLE: TableDefinition<'static, &[u8], &[u8]> = TableDefinition::new("scratch");

/// A [`Store`] on a redb database file, for scratch data only: a batch is applied atomically,
/// and nothing is made durable (a crash leaves a file the next `verify` deletes).
pub(crate) struct ScratchStore {
    db: Database,
    path: PathBuf,
}

fn err(path: &Path, what: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError::Io(format!("{what} the scratch store {}: {e}", path.display()))
}

impl ScratchStore {
    /// Creates the database at `path` (replacing any file there), its cache at most `cache_bytes`.
    pub(crate) fn create(path: &Path, cache_bytes: u64) -> Result<ScratchStore, StoreError> {
        let _ = std::fs::remove_file(path);
        let cache = usize::try_from(cache_bytes).unwrap_or(usize::MAX);
        let db =
            Database::builder().set_cache_size(cache).create(path).map_err(|e| err(path, "creating", e))?;
        let store = ScratchStore { db, path: path.to_path_buf() };
        // The table exists from the start, so that a read before the first write finds it empty.
        store.apply(&WriteBatch::default())?;
        Ok(store)
    }

    fn read<T>(
        &self,
        f: impl FnOnce(&redb::ReadOnlyTable<&[u8], &[u8]>) -> Result<T, redb::StorageError>,
    ) -> Result<T, StoreError> {
        let txn = self.db.begin_read().map_err(|e| err(&self.path, "reading", e))?;
        let table = txn.open_table(TABLE).map_err(|e| err(&self.path, "reading", e))?;
        f(&table).map_err(|e| err(&self.path, "reading", e))
    }
}

impl Store for ScratchStore {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        self.read(|t| Ok(t.get(key)?.map(|v| v.value().to_vec())))
    }

    fn scan(&self, from: &[u8], to: &[u8], visit: Visit<'_>) -> Result<(), StoreError> {
        if from >= to {
            return Ok(());
        }
        self.read(|t| {
            for pair in t.range(from..to)? {
                let (k, v) = pair?;
                if let ControlFlow::Break(()) = visit(k.value(), v.value()) {
                    break;
                }
            }
            Ok(())
        })
    }

    fn last(&self, from: &[u8], to: &[u8]) -> Result<Option<Pair>, StoreError> {
        if from >= to {
            return Ok(None);
        }
        self.read(|t| {
            let last = t.range(from..to)?.next_back().transpose()?;
            Ok(last.map(|(k, v)| (k.value().to_vec(), v.value().to_vec())))
        })
    }

    fn apply(&self, batch: &WriteBatch) -> Result<(), StoreError> {
        let mut txn = self.db.begin_write().map_err(|e| err(&self.path, "writing", e))?;
        txn.set_durability(redb::Durability::None).map_err(|e| err(&self.path, "writing", e))?;
        {
            let mut table = txn.open_table(TABLE).map_err(|e| err(&self.path, "writing", e))?;
            for (key, value) in &batch.writes {
                match value {
                    Some(value) => table.insert(key.as_slice(), value.as_slice()).map(drop),
                    None => table.remove(key.as_slice()).map(drop),
                }
                .map_err(|e| err(&self.path, "writing", e))?;
            }
        }
        txn.commit().map_err(|e| err(&self.path, "writing", e))
    }

    fn flush(&self, _durability: Durability) -> Result<(), StoreError> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use herald_log::{scan_vec, MemStore};
    use proptest::prelude::*;

    use super::*;

    proptest! {
        /// Batches of puts and deletes leave the scratch store reading as a store in memory given
        /// the same batches: every get, scan (up to a limit) and last, after each batch.
        #[test]
        fn reads_as_a_store_in_memory(
            batches in proptest::collection::vec(
                proptest::collection::vec((0u8..24, proptest::option::of(0u8..4)), 0..12), 1..10),
            reads in proptest::collection::vec((0u8..25, 0u8..25, 0usize..8), 1..6),
        ) {
            let dir = tempfile::tempdir().unwrap();
            let scratch = ScratchStore::create(&dir.path().join("s.redb"), 1 << 20).unwrap();
            let mem = MemStore::new();
            for ops in &batches {
                let mut batch = WriteBatch::default();
                for (k, v) in ops {
                    match v {
                        Some(v) => batch.put(vec![*k, 1], vec![*v; *v as usize]),
                        None => batch.delete(vec![*k, 1]),
                    }
                }
                scratch.apply(&batch).unwrap();
                mem.apply(&batch).unwrap();
                for &(from, to, limit) in &reads {
                    let (from, to) = ([from], [to]);
                    prop_assert_eq!(scan_vec(&scratch, &from, &to, limit).unwrap(), scan_vec(&mem, &from, &to, limit).unwrap());
                    prop_assert_eq!(scratch.last(&from, &to).unwrap(), mem.last(&from, &to).unwrap());
                    prop_assert_eq!(scratch.get(&[from[0], 1]).unwrap(), mem.get(&[from[0], 1]).unwrap());
                }
            }
        }
    }

    #[test]
    fn a_file_left_at_the_path_is_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.redb");
        std::fs::write(&path, b"left by a killed verify").unwrap();
        let scratch = ScratchStore::create(&path, 1 << 20).unwrap();
        assert_eq!(scratch.get(b"k").unwrap(), None);
    }
}
