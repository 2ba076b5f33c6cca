//! `verify`: one pass over the log that checks every record's checksum and the hash chain and
//! rebuilds the projection from them into scratch storage on disk (a redb file,
//! `scratch_store.rs`), then the rebuild compared with the stored projection, both read in key
//! order a page at a time, all within a memory bound (above what opening the live store takes:
//! see `resident.rs`).

use std::fmt;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};

use herald_log::record::CHUNK_BYTES;
use herald_log::{LogError, StoreError};
use herald_projector::{rebuilt_pages, stored_pages, ProjectionPages, Refold, ScratchTables};

use super::resident::ResidentBound;
use super::scratch_store::ScratchStore;
use super::{hex, last_seq, open_existing_cached, Difference, OfflineError, Progress};

/// What `verify` keeps its memory under unless told otherwise.
pub const MEMORY_MAX_DEFAULT_BYTES: u64 = 512 << 20;
/// The least memory bound `verify` takes: below it sled's own needs and a page of records do not fit.
pub const MEMORY_MAX_LEAST_BYTES: u64 = 32 << 20;
/// The scratch store's directory inside the data directory, with the process id after it.
const SCRATCH_DIR_PREFIX: &str = "verify-scratch-";
/// Pairs compared between two progress reports.
const PROGRESS_PAIRS: u64 = 65_536;

/// What [`verify`] checks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyOptions {
    /// The data directory of a stopped server.
    pub data_dir: PathBuf,
    /// The memory `verify` keeps under: it sizes sled's caches, the buffered writes of the
    /// rebuild and the pages it reads (at least [`MEMORY_MAX_LEAST_BYTES`]).
    pub memory_max_bytes: u64,
}

impl VerifyOptions {
    /// Verifies `data_dir` within [`MEMORY_MAX_DEFAULT_BYTES`].
    pub fn new(data_dir: impl Into<PathBuf>) -> VerifyOptions {
        VerifyOptions { data_dir: data_dir.into(), memory_max_bytes: MEMORY_MAX_DEFAULT_BYTES }
    }
}

/// A log whose chain is intact and whose stored projection equals a rebuild.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyReport {
    /// The chain checked: its records, their seqs and the last hash.
    pub chain: herald_log::VerifyReport,
    /// The pairs of the projection.
    pub pairs: usize,
}

impl fmt::Display for VerifyReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "ok: {} records (seq {}..={}), chain intact (last hash {}), projection equal to a rebuild ({} pairs)",
            self.chain.records,
            self.chain.first_seq,
            self.chain.last_seq,
            hex(&self.chain.last_hash),
            self.pairs
        )?;
        match self.chain.first_seq {
            1 => Ok(()),
            first => write!(
                f,
                "; records through seq {} were compacted: the kept log chains to their last hash and starts from a checkpoint",
                first - 1
            ),
        }
    }
}

/// How a memory bound is shared out. The live store's sled cache and the scratch store's redb
/// cache take an eighth each. sled keeps much more of what a pass reads than its cache size
/// (see `resident.rs`): the live store is reopened between pages once what the process holds has
/// grown by three eighths of the bound. The rebuild's buffered writes take a sixty-fourth
/// (applying a batch holds several copies of it for a moment) and its filter of written keys
/// four times that; the pages read take the rest.
#[derive(Debug, Clone, Copy)]
struct Budget {
    live_cache_bytes: u64,
    scratch_cache_bytes: u64,
    /// Writes of the rebuild held in memory before they are applied to the scratch store.
    pending_bytes: usize,
    /// Records folded between two folds of their index entries into chunks (the entries are
    /// held aside meanwhile).
    page_records: usize,
    /// Pairs read at once from each projection while comparing (each at most `CHUNK_BYTES`).
    page_pairs: usize,
    /// Stored keys of records read at once while checking the chain (each at most `CHUNK_BYTES`).
    page_keys: usize,
}

impl Budget {
    fn of(memory_max_bytes: u64) -> Budget {
        let m = memory_max_bytes.max(MEMORY_MAX_LEAST_BYTES);
        let share = |divisor: u64, unit: u64, least: u64, most: u64| (m / divisor / unit).clamp(least, most);
        Budget {
            live_cache_bytes: m / 8,
            scratch_cache_bytes: m / 8,
            pending_bytes: usize::try_from(m / 64).unwrap_or(usize::MAX),
            page_records: share(16, 16 * 1024, 64, 4096) as usize,
            page_pairs: share(32, CHUNK_BYTES as u64, 64, 4096) as usize,
            page_keys: share(16, CHUNK_BYTES as u64, 64, 4096) as usize,
        }
    }
}

/// Reads a memory size: bytes (`536870912`), or a number with `KiB`, `MiB`, `GiB` or `TiB`
/// (`512MiB`, `1GiB`; also `K`, `M`, `G`, `T`, in powers of 1024).
pub fn parse_memory(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let digits = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    let (number, unit) = text.split_at(digits);
    let shift = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kib" => 10,
        "m" | "mib" => 20,
        "g" | "gib" => 30,
        "t" | "tib" => 40,
        _ => return Err(format!("{text:?} is not a size: give bytes, or a number with KiB, MiB or GiB")),
    };
    let n: u64 =
        number.parse().map_err(|_| format!("{text:?} is not a size: it does not start with a number"))?;
    let bytes = n.checked_mul(1 << shift).ok_or_else(|| format!("{text:?} is too large"))?;
    if bytes < MEMORY_MAX_LEAST_BYTES {
        return Err(format!("{text:?} is below the least bound, {} MiB", MEMORY_MAX_LEAST_BYTES >> 20));
    }
    Ok(bytes)
}

/// Checks the log's chain, then the stored projection against a rebuild of the log.
pub fn verify(options: &VerifyOptions, progress: &mut dyn Progress) -> Result<VerifyReport, OfflineError> {
    let budget = Budget::of(options.memory_max_bytes);
    let store = open_existing_cached(&options.data_dir, budget.live_cache_bytes)?;
    let mut bound = ResidentBound::from_now(options.memory_max_bytes);
    let last = last_seq(store.as_ref())?;
    let scratch_dir = ScratchDir::create(&options.data_dir);
    let scratch = scratch_dir.open(budget.scratch_cache_bytes)?;
    let mut tables = ScratchTables::rebuilt(&scratch, budget.pending_bytes);
    let mut refold =
        Refold::start(store.as_ref(), &mut tables, budget.page_records).map_err(OfflineError::Rebuild)?;
    // One pass over the log: each record checked (checksum, chain) and then folded.
    progress.begin("checking the chain and rebuilding the projection", last);
    let mut folding = Ok(());
    let chain = herald_log::verify_paged_each(
        store.as_ref(),
        budget.page_keys,
        &mut || bound.relieve(store.as_ref()),
        &mut |seq| progress.advance(seq),
        &mut |record| match refold.push(record) {
            Ok(()) => ControlFlow::Continue(()),
            Err(e) => {
                folding = Err(e);
                ControlFlow::Break(())
            }
        },
    )
    .map_err(|e| match e {
        LogError::Corrupt(c) => OfflineError::Damaged(c),
        other => OfflineError::Unreadable(other),
    })?;
    folding.map_err(OfflineError::Rebuild)?;
    refold.finish().map_err(OfflineError::Rebuild)?;
    tables.finish().map_err(|e| scratch_dir.error(e))?;
    progress.end();
    progress.begin("comparing with the stored projection", 0);
    let stored = stored_pages(store.as_ref(), &scratch, budget.pending_bytes, budget.page_pairs)
        .map_err(|e| OfflineError::Log(e.into()))?;
    let mut relieve = |pairs: u64| match pairs % budget.page_pairs as u64 {
        0 => bound.relieve(store.as_ref()).map_err(|e| OfflineError::Log(e.into())),
        _ => Ok(()),
    };
    let pairs =
        compare(stored, rebuilt_pages(&scratch, budget.page_pairs), &scratch_dir, &mut relieve, progress)?;
    progress.end();
    Ok(VerifyReport { chain, pairs: usize::try_from(pairs).unwrap_or(usize::MAX) })
}

/// Walks both projections in key order and names the first key where they part. Returns the
/// stored pairs.
fn compare(
    mut stored: ProjectionPages<'_>,
    mut rebuilt: ProjectionPages<'_>,
    scratch: &ScratchDir,
    between_pages: &mut dyn FnMut(u64) -> Result<(), OfflineError>,
    progress: &mut dyn Progress,
) -> Result<u64, OfflineError> {
    loop {
        let a = stored.next_pair().map_err(|e| OfflineError::Log(e.into()))?;
        let b = rebuilt.next_pair().map_err(|e| scratch.error(e))?;
        let difference = match (a, b) {
            (None, None) => return Ok(stored.pairs()),
            (Some((k, _)), None) => Difference::ExtraKey(k),
            (None, Some((k, _))) => Difference::MissingKey(k),
            (Some((ka, _)), Some((kb, _))) if ka != kb => Difference::OtherKey { stored: ka, rebuilt: kb },
            (Some((key, va)), Some((_, vb))) if va != vb => Difference::Value { key },
            _ => {
                between_pages(stored.pairs())?;
                if stored.pairs() % PROGRESS_PAIRS == 0 {
                    progress.advance(stored.pairs());
                }
                continue;
            }
        };
        return Err(OfflineError::ProjectionDiffers(difference));
    }
}

/// The directory of the scratch store a rebuild goes into, inside the data directory (the disk
/// that holds the log has room for its projection). Deleted when dropped, on an error as after
/// success (declared before the store in it, it is dropped after it); one a killed `verify`
/// left is deleted by the next.
struct ScratchDir(PathBuf);

impl ScratchDir {
    fn create(data_dir: &Path) -> ScratchDir {
        remove_left_over(data_dir);
        let dir = data_dir.join(format!("{SCRATCH_DIR_PREFIX}{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        ScratchDir(dir)
    }

    fn open(&self, cache_bytes: u64) -> Result<ScratchStore, OfflineError> {
        std::fs::create_dir_all(&self.0).map_err(|e| self.error(StoreError::Io(e.to_string())))?;
        ScratchStore::create(&self.0.join("scratch.redb"), cache_bytes).map_err(|e| self.error(e))
    }

    fn error(&self, error: StoreError) -> OfflineError {
        OfflineError::Scratch { dir: self.0.clone(), error }
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Deletes the scratch directories an earlier `verify` left in `data_dir` (killed before it
/// could). None can be in use: sled's lock on the data directory lets one tool in at a time.
fn remove_left_over(data_dir: &Path) {
    let Ok(entries) = std::fs::read_dir(data_dir) else { return };
    for entry in entries.flatten() {
        if entry.file_name().to_string_lossy().starts_with(SCRATCH_DIR_PREFIX) {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}
