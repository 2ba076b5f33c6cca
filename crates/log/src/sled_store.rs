//! The one place herald names sled.
//!
//! Everything lives in a single sled tree: sled applies a [`sled::Batch`] on one tree
//! atomically and far faster than a multi-tree transaction, and the first byte of every key
//! already names its keyspace, so the log's records and the projection's tables are logical
//! trees inside it and one batch commits both together.
//!
//! Assumptions about sled 0.34.7 that this module designs around:
//! - an applied batch is lost on kill -9 until `flush` returns, so the log answers only after it;
//! - `flush` uses `sync_file_range`, which does not make file metadata or the drive's cache durable,
//!   so [`Durability::Sync`] also calls `fsync` on the data file and the directory;
//! - a log message larger than `segment_size / 4` goes to a blob file that is never fsynced: the log
//!   keeps every stored value under [`crate::record::CHUNK_BYTES`] and sets the segment size so that
//!   even a whole leaf of such values stays far below the threshold (a test checks that no blob
//!   file appears);
//! - one process per database: sled takes a file lock and `open` fails while another process holds it.

use std::fs::File;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};

use crate::store::{Batch, Durability, Pair, Store, StoreError, Visit};

/// sled's segment size here: blob threshold is a quarter of it (512 KiB), 64 times a value chunk.
pub const SEGMENT_BYTES: usize = 2 * 1024 * 1024;
const TREE_NAME: &[u8] = b"herald";
/// How long `open` waits for sled's directory lock.
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(3);

/// A [`Store`] on a sled database in a directory.
pub struct SledStore {
    db: sled::Db,
    tree: sled::Tree,
    dir: PathBuf,
}

/// sled reports a held lock as an `Other` error whose message says so (0.34.7, `config.rs`).
fn is_lock_error(e: &std::io::Error) -> bool {
    e.kind() == std::io::ErrorKind::WouldBlock || e.to_string().contains("could not acquire lock")
}

fn io(e: sled::Error) -> StoreError {
    StoreError::Io(e.to_string())
}

impl SledStore {
    /// Opens (creating if needed) the database in `dir`. `cache_bytes` bounds sled's page cache.
    pub fn open(dir: &Path, cache_bytes: u64) -> Result<SledStore, StoreError> {
        std::fs::create_dir_all(dir)
            .map_err(|e| StoreError::Io(format!("creating {}: {e}", dir.display())))?;
        let config = sled::Config::new()
            .path(dir)
            .segment_size(SEGMENT_BYTES)
            .cache_capacity(cache_bytes)
            .mode(sled::Mode::HighThroughput)
            // herald flushes itself, once per batch; sled's background flusher would only add writes.
            .flush_every_ms(None);
        // sled releases its file lock when its last epoch-deferred reference goes, which can be a
        // moment after the previous `Db` in this process was dropped: retry the lock briefly.
        // Another process holding the directory still fails, after LOCK_WAIT.
        let started = std::time::Instant::now();
        let db = loop {
            match config.open() {
                Ok(db) => break db,
                Err(sled::Error::Io(e)) if is_lock_error(&e) && started.elapsed() < LOCK_WAIT => {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                Err(sled::Error::Io(e)) if is_lock_error(&e) => {
                    return Err(StoreError::Io(format!(
                        "{} is in use by another herald process (sled's lock is held): {e}",
                        dir.display()
                    )));
                }
                Err(e) => return Err(io(e)),
            }
        };
        let tree = db.open_tree(TREE_NAME).map_err(io)?;
        Ok(SledStore { db, tree, dir: dir.to_path_buf() })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn fsync_files(&self) -> Result<(), StoreError> {
        let sync = |p: &Path| -> Result<(), StoreError> {
            File::open(p)
                .and_then(|f| f.sync_all())
                .map_err(|e| StoreError::Io(format!("fsync {}: {e}", p.display())))
        };
        sync(&self.dir.join("db"))?;
        sync(&self.dir)
    }
}

impl Store for SledStore {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.tree.get(key).map_err(io)?.map(|v| v.to_vec()))
    }

    fn scan(&self, from: &[u8], to: &[u8], visit: Visit<'_>) -> Result<(), StoreError> {
        if from >= to {
            return Ok(());
        }
        for item in self.tree.range(from..to) {
            let (k, v) = item.map_err(io)?;
            if let ControlFlow::Break(()) = visit(&k, &v) {
                break;
            }
        }
        Ok(())
    }

    fn last(&self, from: &[u8], to: &[u8]) -> Result<Option<Pair>, StoreError> {
        if from >= to {
            return Ok(None);
        }
        match self.tree.range(from..to).next_back() {
            None => Ok(None),
            Some(item) => {
                let (k, v) = item.map_err(io)?;
                Ok(Some((k.to_vec(), v.to_vec())))
            }
        }
    }

    fn apply(&self, batch: &Batch) -> Result<(), StoreError> {
        let mut b = sled::Batch::default();
        for (k, v) in &batch.writes {
            match v {
                Some(v) => b.insert(k.as_slice(), v.as_slice()),
                None => b.remove(k.as_slice()),
            }
        }
        self.tree.apply_batch(b).map_err(io)
    }

    fn flush(&self, durability: Durability) -> Result<(), StoreError> {
        self.db.flush().map_err(io)?;
        if durability == Durability::Sync {
            self.fsync_files()?;
        }
        Ok(())
    }

    fn size_on_disk(&self) -> Result<u64, StoreError> {
        self.db.size_on_disk().map_err(io)
    }
}
