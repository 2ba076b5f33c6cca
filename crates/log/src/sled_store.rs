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
use std::sync::{RwLock, RwLockReadGuard};

use crate::store::{Durability, Pair, Store, StoreError, Visit, WriteBatch};

/// sled's segment size here: blob threshold is a quarter of it (512 KiB), 64 times a value chunk.
pub const SEGMENT_BYTES: usize = 2 * 1024 * 1024;
const TREE_NAME: &[u8] = b"herald";
/// How long `open` waits for sled's directory lock.
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(3);

/// A [`Store`] on a sled database in a directory.
///
/// After an IO error sled 0.34.7 refuses every later operation with that error (its "global
/// error") and may hold in memory a batch it wrote only in part, so [`Store::reopen`] drops the
/// database and opens it again from its files: what the disk holds, whole batches only.
pub struct SledStore {
    /// The database, or why reopening it failed.
    open: RwLock<Result<Open, StoreError>>,
    dir: PathBuf,
    cache_bytes: u64,
}

/// The database while it is open, with its data file and directory held open for the fsyncs of
/// [`Durability::Sync`] (opened once, so a flush needs no descriptor).
struct Open {
    db: sled::Db,
    tree: sled::Tree,
    db_file: File,
    dir_file: File,
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
        let (copy, old) = vacuum_paths(dir);
        if !dir.exists() && old.exists() {
            return Err(StoreError::Io(format!(
                "{} is missing but {} is there: a vacuum was interrupted while swapping directories; \
                 rename {} to {} (the complete copy) or {} back to {} (the original), then start again",
                dir.display(),
                old.display(),
                copy.display(),
                dir.display(),
                old.display(),
                dir.display()
            )));
        }
        std::fs::create_dir_all(dir)
            .map_err(|e| StoreError::Io(format!("creating {}: {e}", dir.display())))?;
        let open = open_db(dir, cache_bytes)?;
        Ok(SledStore { open: RwLock::new(Ok(open)), dir: dir.to_path_buf(), cache_bytes })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The open database; an error while a failed [`Store::reopen`] left it closed.
    fn db(&self) -> Result<DbGuard<'_>, StoreError> {
        let guard = self.open.read().unwrap_or_else(|e| e.into_inner());
        if let Err(e) = guard.as_ref() {
            return Err(StoreError::Io(format!(
                "{} is closed: reopening it after a failed write failed ({e}); herald tries again",
                self.dir.display()
            )));
        }
        Ok(DbGuard(guard))
    }
}

/// A read lock on an open database.
struct DbGuard<'a>(RwLockReadGuard<'a, Result<Open, StoreError>>);

impl std::ops::Deref for DbGuard<'_> {
    type Target = Open;

    fn deref(&self) -> &Open {
        match self.0.as_ref() {
            Ok(open) => open,
            Err(_) => unreachable!("SledStore::db hands out open databases only"),
        }
    }
}

/// Opens sled in `dir` (which exists), waiting briefly for its directory lock.
fn open_db(dir: &Path, cache_bytes: u64) -> Result<Open, StoreError> {
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
                return Err(StoreError::InUse(dir.display().to_string()));
            }
            Err(e) => return Err(io(e)),
        }
    };
    let tree = db.open_tree(TREE_NAME).map_err(io)?;
    let open_file =
        |p: &Path| File::open(p).map_err(|e| StoreError::Io(format!("opening {}: {e}", p.display())));
    Ok(Open { db, tree, db_file: open_file(&dir.join("db"))?, dir_file: open_file(dir)? })
}

impl SledStore {
    fn fsync_files(&self, open: &Open) -> Result<(), StoreError> {
        let fsync = |f: &File, p: &Path| {
            f.sync_all().map_err(|e| StoreError::Io(format!("fsync {}: {e}", p.display())))
        };
        fsync(&open.db_file, &self.dir.join("db"))?;
        fsync(&open.dir_file, &self.dir)
    }
}

impl Store for SledStore {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.db()?.tree.get(key).map_err(io)?.map(|v| v.to_vec()))
    }

    fn scan(&self, from: &[u8], to: &[u8], visit: Visit<'_>) -> Result<(), StoreError> {
        if from >= to {
            return Ok(());
        }
        // A clone of the tree, not the lock: a visitor may read the store again meanwhile.
        let tree = self.db()?.tree.clone();
        for item in tree.range(from..to) {
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
        match self.db()?.tree.range(from..to).next_back() {
            None => Ok(None),
            Some(item) => {
                let (k, v) = item.map_err(io)?;
                Ok(Some((k.to_vec(), v.to_vec())))
            }
        }
    }

    fn apply(&self, batch: &WriteBatch) -> Result<(), StoreError> {
        let mut b = sled::Batch::default();
        for (k, v) in &batch.writes {
            match v {
                Some(v) => b.insert(k.as_slice(), v.as_slice()),
                None => b.remove(k.as_slice()),
            }
        }
        self.db()?.tree.apply_batch(b).map_err(io)
    }

    fn flush(&self, durability: Durability) -> Result<(), StoreError> {
        let open = self.db()?;
        open.db.flush().map_err(io)?;
        if durability == Durability::Sync {
            self.fsync_files(&open)?;
        }
        Ok(())
    }

    fn size_on_disk(&self) -> Result<u64, StoreError> {
        self.db()?.db.size_on_disk().map_err(io)
    }

    fn reopen(&self) -> Result<(), StoreError> {
        // sled writes as it opens: on a disk still full the open would fail and leave nothing to
        // read from, so the database in hand (which still answers reads) is kept until there is room.
        room_to_reopen(&self.dir)?;
        let mut open = self.open.write().unwrap_or_else(|e| e.into_inner());
        // Dropped first: sled holds its directory lock until then (`open_db` waits for it).
        *open = Err(StoreError::Io("reopening".into()));
        release_deferred();
        *open = open_db(&self.dir, self.cache_bytes);
        open.as_ref().map(|_| ()).map_err(Clone::clone)
    }
}

/// Runs what sled left for its epoch collector to free (the pages of a database just dropped,
/// which sled hands over a few at a time): otherwise a reopen frees the old database's memory
/// only as later reads advance the epoch. Each pass moves this thread's deferred frees to the
/// global queue and runs a few of its bags once the epoch allows.
fn release_deferred() {
    const PASSES: usize = 4096;
    for _ in 0..PASSES {
        sled::crossbeam_pin().flush();
    }
}

/// Free bytes a reopen needs on the store's filesystem: sled writes as it opens, then needs a
/// segment to write into.
pub const REOPEN_ROOM_BYTES: u64 = 2 * SEGMENT_BYTES as u64;

/// Whether the filesystem of `dir`, and this process's file-size limit, leave the room a reopen
/// needs; the error says which does not.
fn room_to_reopen(dir: &Path) -> Result<(), StoreError> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes())
        .map_err(|_| StoreError::Io(format!("{} has a NUL byte", dir.display())))?;
    // SAFETY: statvfs is a plain C struct, for which all zero bytes are a valid value.
    let mut fs: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: statvfs writes into the zeroed struct we own; the path is NUL-terminated.
    if unsafe { libc::statvfs(path.as_ptr(), &mut fs) } != 0 {
        let e = std::io::Error::last_os_error();
        return Err(StoreError::Io(format!("statvfs {}: {e}", dir.display())));
    }
    let free_bytes = fs.f_bavail.saturating_mul(fs.f_frsize);
    if free_bytes < REOPEN_ROOM_BYTES {
        return Err(StoreError::Io(format!(
            "no space left on the filesystem of {}: {free_bytes} bytes free, {REOPEN_ROOM_BYTES} needed to resume",
            dir.display()
        )));
    }
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes into the struct we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_FSIZE, &mut limit) } == 0
        && limit.rlim_cur != libc::RLIM_INFINITY
    {
        let db_bytes = std::fs::metadata(dir.join("db")).map(|m| m.len()).unwrap_or(0);
        if db_bytes.saturating_add(REOPEN_ROOM_BYTES) > limit.rlim_cur {
            return Err(StoreError::Io(format!(
                "the file-size limit of this process (RLIMIT_FSIZE, {} bytes) leaves {} no room to grow",
                limit.rlim_cur,
                dir.join("db").display()
            )));
        }
    }
    Ok(())
}

/// Where a vacuum of `dir` writes its copy, and where it moves the original while swapping.
fn vacuum_paths(dir: &Path) -> (PathBuf, PathBuf) {
    let name = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "data".into());
    (dir.with_file_name(format!("{name}.vacuum")), dir.with_file_name(format!("{name}.vacuum-old")))
}

/// sled's own files in a data directory; anything else (herald's `admin.key`) moves with a vacuum.
fn is_sled_file(name: &str) -> bool {
    matches!(name, "conf" | "db" | "blobs") || name.starts_with("snap.")
}

/// What [`vacuum`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VacuumReport {
    pub pairs: u64,
    pub bytes_before: u64,
    pub bytes_after: u64,
}

/// Rewrites the store in `dir` (not in use by any process) into a fresh sled database holding
/// only its current pairs, then puts it in place of the old one. sled 0.34 reclaims little of
/// the space of deleted data by itself, so after retention drops history this is what gives the
/// disk back. The copy is checked (count and blake3 of every pair) before the swap; the swap is
/// two renames, and an interruption between them is reported by [`SledStore::open`] with what
/// to do. `progress` is told the pairs copied so far.
pub fn vacuum(
    dir: &Path,
    cache_bytes: u64,
    progress: &mut dyn FnMut(u64),
) -> Result<VacuumReport, StoreError> {
    let fail = |what: &str, e: std::io::Error| StoreError::Io(format!("vacuum: {what}: {e}"));
    let (copy_dir, old_dir) = vacuum_paths(dir);
    if copy_dir.exists() {
        // Left by a vacuum interrupted before its swap: the original is intact.
        std::fs::remove_dir_all(&copy_dir).map_err(|e| fail("removing an unfinished copy", e))?;
    }
    let (pairs, bytes_before) = {
        let source = SledStore::open(dir, cache_bytes)?;
        let bytes_before = source.size_on_disk()?;
        let copy = SledStore::open(&copy_dir, cache_bytes)?;
        (copy_checked(&source, &copy, &copy_dir, progress)?, bytes_before)
    };
    // herald's own files (admin.key) go with the data.
    for entry in std::fs::read_dir(dir).map_err(|e| fail("listing the directory", e))? {
        let entry = entry.map_err(|e| fail("listing the directory", e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if !is_sled_file(&name) && entry.file_type().map(|t| t.is_file()).unwrap_or(false) {
            std::fs::copy(entry.path(), copy_dir.join(&name))
                .map_err(|e| fail(&format!("copying {name}"), e))?;
        }
    }
    std::fs::rename(dir, &old_dir).map_err(|e| fail("moving the original aside", e))?;
    std::fs::rename(&copy_dir, dir).map_err(|e| fail("moving the copy in place", e))?;
    if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        File::open(parent)
            .and_then(|f| f.sync_all())
            .map_err(|e| fail("fsync of the parent directory", e))?;
    }
    std::fs::remove_dir_all(&old_dir).map_err(|e| fail("removing the original", e))?;
    let bytes_after = SledStore::open(dir, cache_bytes)?.size_on_disk()?;
    Ok(VacuumReport { pairs, bytes_before, bytes_after })
}

/// Copies every pair of `source` into `copy` (at `copy_dir`) and reads the copy back: the same
/// pairs, byte for byte (counted and blake3-hashed), or an error that leaves the original alone.
fn copy_checked(
    source: &SledStore,
    copy: &SledStore,
    copy_dir: &Path,
    progress: &mut dyn FnMut(u64),
) -> Result<u64, StoreError> {
    let mut hasher = blake3::Hasher::new();
    let mut batch = WriteBatch::default();
    let mut pairs = 0u64;
    let mut error = None;
    source.scan(&[], &[0xff; 2], &mut |k, v| {
        hash_pair(&mut hasher, k, v);
        batch.put(k.to_vec(), v.to_vec());
        pairs += 1;
        if batch.writes.len() >= 4096 {
            if let Err(e) = copy.apply(&std::mem::take(&mut batch)) {
                error = Some(e);
                return ControlFlow::Break(());
            }
            progress(pairs);
        }
        ControlFlow::Continue(())
    })?;
    if let Some(e) = error {
        return Err(e);
    }
    copy.apply(&batch)?;
    copy.flush(Durability::Sync)?;
    // Read the copy back: the same pairs, byte for byte.
    let mut check = blake3::Hasher::new();
    let mut copied = 0u64;
    copy.scan(&[], &[0xff; 2], &mut |k, v| {
        hash_pair(&mut check, k, v);
        copied += 1;
        ControlFlow::Continue(())
    })?;
    if copied != pairs || check.finalize() != hasher.finalize() {
        return Err(StoreError::Io(format!(
            "vacuum: the copy in {} does not match the original ({copied} of {pairs} pairs); \
             the original is untouched",
            copy_dir.display()
        )));
    }
    Ok(pairs)
}

fn hash_pair(hasher: &mut blake3::Hasher, key: &[u8], value: &[u8]) {
    hasher.update(&(key.len() as u64).to_be_bytes());
    hasher.update(key);
    hasher.update(&(value.len() as u64).to_be_bytes());
    hasher.update(value);
}

#[cfg(test)]
mod vacuum_tests {
    use super::*;

    fn dump(store: &SledStore) -> Vec<Pair> {
        crate::store::scan_vec(store, &[], &[0xff; 2], usize::MAX).unwrap()
    }

    #[test]
    fn vacuum_keeps_every_pair_and_herald_files_and_gives_space_back() {
        let scratch = tempfile::tempdir().unwrap();
        let dir = scratch.path().join("data");
        let expected = {
            let store = SledStore::open(&dir, 8 << 20).unwrap();
            for round in 0..20u32 {
                let mut b = WriteBatch::default();
                for i in 0..500u32 {
                    b.put(
                        [&[0x10], &round.to_be_bytes()[..], &i.to_be_bytes()].concat(),
                        vec![round as u8; 1024],
                    );
                }
                store.apply(&b).unwrap();
                store.flush(Durability::Flush).unwrap();
            }
            // Most of it deleted, as retention does.
            let mut b = WriteBatch::default();
            for round in 0..18u32 {
                for i in 0..500u32 {
                    b.delete([&[0x10], &round.to_be_bytes()[..], &i.to_be_bytes()].concat());
                }
            }
            store.apply(&b).unwrap();
            store.flush(Durability::Sync).unwrap();
            dump(&store)
        };
        std::fs::write(dir.join("admin.key"), "sk_test\n").unwrap();
        let report = vacuum(&dir, 8 << 20, &mut |_| {}).unwrap();
        assert_eq!(report.pairs, 1000);
        assert!(report.bytes_after * 2 < report.bytes_before, "{report:?}");
        let store = SledStore::open(&dir, 8 << 20).unwrap();
        assert_eq!(dump(&store), expected);
        assert_eq!(std::fs::read_to_string(dir.join("admin.key")).unwrap(), "sk_test\n");
        let (copy, old) = vacuum_paths(&dir);
        assert!(!copy.exists() && !old.exists());
    }

    #[test]
    fn an_interrupted_swap_is_reported_not_papered_over_with_an_empty_store() {
        let scratch = tempfile::tempdir().unwrap();
        let dir = scratch.path().join("data");
        drop(SledStore::open(&dir, 8 << 20).unwrap());
        let (_, old) = vacuum_paths(&dir);
        std::fs::rename(&dir, &old).unwrap();
        let err = SledStore::open(&dir, 8 << 20).err().unwrap();
        assert!(err.to_string().contains("vacuum was interrupted"), "{err}");
        assert!(!dir.exists(), "nothing created in its place");
    }
}
