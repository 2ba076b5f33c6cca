//! `verify`: one pass over the log that checks every record's checksum and the hash chain and
//! rebuilds the projection from them into scratch storage on disk (a redb file,
//! `scratch_store.rs`), then the rebuild compared with the stored projection, both read in key
//! order a page at a time, all within a memory bound (above what opening the live store takes:
//! see `resident.rs`). Each phase keeps both cores busy: a second thread applies the rebuild's
//! batches to the scratch store while the fold goes on, then reads the stored projection a
//! page ahead of the comparison.

use std::fmt;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::sync::mpsc;

use herald_log::record::CHUNK_BYTES;
use herald_log::{LogError, Pair, Record, Store, StoreError};
use herald_projector::{
    rebuilt_pages, stored_pages, ProjectionPages, RebuildError, Refold, ScratchTables, Tables,
};

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
    /// How often the live store was reopened to hold the memory bound, and the time that took.
    pub reopens: (u32, std::time::Duration),
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
/// grown by three eighths of the bound. The rebuild's buffered writes take a sixty-fourth, up
/// to three times over (those buffered, those in flight to the scratch store's writer thread,
/// the batch it builds of them) and the scratch store's own copy while it applies one, and its
/// filter of written keys four times that; the records read ahead of the fold a sixteenth; the
/// pages read take the rest (of the stored projection up to four at once: the reader's own,
/// the one it fills, one sent, one compared; one of the rebuilt projection).
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
    /// Batches of records (each at most [`BATCH_BYTES`] of bodies, and one record) the reader of
    /// the log may be ahead of the fold: a sixteenth of the bound, a second or so of folding.
    batches_ahead: usize,
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
            batches_ahead: share(16, BATCH_BYTES as u64, 2, 64) as usize,
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
    // One pass over the log: each record checked (checksum, chain) and then folded, while a
    // second thread applies the rebuild's batches to the scratch store.
    progress.begin("checking the chain and rebuilding the projection", last);
    let chain = std::thread::scope(|scope| {
        let tables = ScratchTables::rebuilt(&scratch, budget.pending_bytes).writing_beside(scope);
        check_and_rebuild(store.as_ref(), tables, &budget, &mut bound, &scratch_dir, progress)
    })?;
    progress.end();
    progress.begin("comparing with the stored projection", 0);
    let stored = stored_pages(store.as_ref(), &scratch, budget.pending_bytes, budget.page_pairs)
        .map_err(|e| OfflineError::Log(e.into()))?;
    // The stored projection is read a page ahead on a second thread, which also relieves the
    // live store between its pages (when no scan of it is open).
    let pairs = std::thread::scope(|scope| {
        let (pages, ahead) = mpsc::sync_channel(1);
        let (live, bound) = (store.as_ref(), &mut bound);
        scope.spawn(move || read_ahead(stored, budget.page_pairs, &mut || bound.relieve(live), pages));
        compare(ahead, rebuilt_pages(&scratch, budget.page_pairs), &scratch_dir, progress)
    })?;
    progress.end();
    Ok(VerifyReport { chain, pairs: usize::try_from(pairs).unwrap_or(usize::MAX), reopens: bound.spent() })
}

/// Checks each record of `store`'s log (checksum, chain) on a thread of its own, which also
/// relieves the live store between its pages, and folds the records into `tables` here as they
/// come, a batch at a time: the fold goes on through a reopen with the batches read ahead.
fn check_and_rebuild(
    store: &dyn Store,
    mut tables: ScratchTables<'_>,
    budget: &Budget,
    bound: &mut ResidentBound,
    scratch_dir: &ScratchDir,
    progress: &mut dyn Progress,
) -> Result<herald_log::VerifyReport, OfflineError> {
    let mut refold = Refold::start(store, &mut tables, budget.page_records).map_err(OfflineError::Rebuild)?;
    let (batches, inbox) = mpsc::sync_channel(budget.batches_ahead);
    let page_keys = budget.page_keys;
    let (chain, folded) = std::thread::scope(|scope| {
        let reader = scope.spawn(move || read_log(store, page_keys, bound, batches));
        let folded = fold_batches(&mut refold, inbox, progress);
        (reader.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic)), folded)
    });
    let folded = folded.and_then(|()| refold.finish().map(drop));
    let written = tables.finish().map_err(|e| scratch_dir.error(e));
    // A fold that failed stopped the reader: its record came before any the reader found bad.
    // A scratch write that failed (a full disk) comes first: the fold read on without it.
    if let Err(e) = folded {
        written?;
        return Err(OfflineError::Rebuild(e));
    }
    let chain = chain.map_err(|e| match e {
        LogError::Corrupt(c) => OfflineError::Damaged(c),
        other => OfflineError::Unreadable(other),
    })?;
    written?;
    Ok(chain)
}

/// Records handed from the reader of the log to the fold at once: at most this many, or the
/// first that take [`BATCH_BYTES`] of bodies.
const BATCH_RECORDS: usize = 1024;
const BATCH_BYTES: usize = 512 * 1024;

/// Reads and checks the log, sending its records to `batches` (each checked one, up to an
/// error); stops early when the receiver is gone (the fold failed). Relieves the live store between pages, when no scan is open.
fn read_log(
    store: &dyn Store,
    page_keys: usize,
    bound: &mut ResidentBound,
    batches: mpsc::SyncSender<Vec<Record>>,
) -> Result<herald_log::VerifyReport, LogError> {
    let (mut batch, mut bytes) = (Vec::new(), 0);
    let report = herald_log::verify_paged_each(
        store,
        page_keys,
        &mut || bound.relieve(store),
        &mut |_| {},
        &mut |record| {
            bytes += record.body.len();
            batch.push(record);
            if batch.len() < BATCH_RECORDS && bytes < BATCH_BYTES {
                return ControlFlow::Continue(());
            }
            bytes = 0;
            match batches.send(std::mem::take(&mut batch)) {
                Ok(()) => ControlFlow::Continue(()),
                Err(_) => ControlFlow::Break(()),
            }
        },
    );
    // The records checked before an error too: a fold that fails on one of them is told first.
    if !batch.is_empty() {
        let _ = batches.send(batch);
    }
    report
}

/// Folds each batch from `inbox` until the reader is done, telling `progress` the last seq of
/// each. Returning (on an error too) drops `inbox`, which stops the reader.
fn fold_batches<T: Tables>(
    refold: &mut Refold<T>,
    inbox: mpsc::Receiver<Vec<Record>>,
    progress: &mut dyn Progress,
) -> Result<(), RebuildError> {
    for batch in inbox {
        for record in &batch {
            refold.push(record)?;
        }
        if let Some(last) = batch.last() {
            progress.advance(last.seq);
        }
    }
    Ok(())
}

/// A page of the stored projection read ahead, or why it could not be.
type StoredPage = Result<Vec<Pair>, StoreError>;

/// Sends `stored` a page at a time to `pages`, relieving the live store after each full one
/// is sent (so the comparison goes on meanwhile), then an empty page after the last; stops at
/// an error (sent) or when the receiver is gone.
fn read_ahead(
    mut stored: ProjectionPages<'_>,
    page_pairs: usize,
    relieve: &mut dyn FnMut() -> Result<(), StoreError>,
    pages: mpsc::SyncSender<StoredPage>,
) {
    loop {
        let mut page = Vec::with_capacity(page_pairs.min(1024));
        let read = loop {
            match stored.next_pair() {
                Ok(Some(pair)) => page.push(pair),
                Ok(None) => break Ok(()),
                Err(e) => break Err(e),
            }
            if page.len() >= page_pairs {
                break Ok(());
            }
        };
        if let Err(e) = read {
            let _ = pages.send(Err(e));
            return;
        }
        let (empty, full) = (page.is_empty(), page.len() >= page_pairs);
        if pages.send(Ok(page)).is_err() || empty {
            return;
        }
        let next = if full { relieve().map(|()| None) } else { Ok(Some(Vec::new())) };
        match next {
            Ok(None) => continue,
            Ok(Some(end)) => drop(pages.send(Ok(end))),
            Err(e) => drop(pages.send(Err(e))),
        }
        return;
    }
}

/// Walks both projections in key order (the stored one as pages from [`read_ahead`]) and names
/// the first key where they part. Returns the stored pairs.
fn compare(
    ahead: mpsc::Receiver<StoredPage>,
    mut rebuilt: ProjectionPages<'_>,
    scratch: &ScratchDir,
    progress: &mut dyn Progress,
) -> Result<u64, OfflineError> {
    let unreadable = |e: StoreError| OfflineError::Log(e.into());
    let stopped = || unreadable(StoreError::Io("the reader of the stored projection stopped".to_string()));
    let mut page = Vec::new().into_iter();
    let mut more = true;
    let mut pairs = 0u64;
    loop {
        let a = match page.next() {
            Some(pair) => Some(pair),
            None if more => {
                let next = ahead.recv().map_err(|_| stopped())?.map_err(unreadable)?;
                more = !next.is_empty();
                page = next.into_iter();
                page.next()
            }
            None => None,
        };
        let b = rebuilt.next_pair().map_err(|e| scratch.error(e))?;
        let difference = match (a, b) {
            (None, None) => return Ok(pairs),
            (Some((k, _)), None) => Difference::ExtraKey(k),
            (None, Some((k, _))) => Difference::MissingKey(k),
            (Some((ka, _)), Some((kb, _))) if ka != kb => Difference::OtherKey { stored: ka, rebuilt: kb },
            (Some((key, va)), Some((_, vb))) if va != vb => Difference::Value { key },
            _ => {
                pairs += 1;
                if pairs % PROGRESS_PAIRS == 0 {
                    progress.advance(pairs);
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

#[cfg(test)]
mod tests {
    use herald_log::{MemStore, WriteBatch};

    use super::*;

    /// A scratch directory (never created) for `compare` to name in its errors.
    fn scratch_dir(test: &str) -> ScratchDir {
        ScratchDir(std::env::temp_dir().join(format!("herald-compare-{test}-{}", std::process::id())))
    }

    /// A scratch store whose rebuilt area holds `n` pairs.
    fn rebuilt_of(n: u32) -> (MemStore, Vec<Pair>) {
        let store = MemStore::new();
        let mut batch = WriteBatch::default();
        let pairs: Vec<Pair> = (0..n).map(|i| (i.to_be_bytes().to_vec(), vec![i as u8])).collect();
        for (k, v) in &pairs {
            batch.put([&[1u8], k.as_slice()].concat(), v.clone());
        }
        store.apply(&batch).expect("apply");
        (store, pairs)
    }

    #[test]
    fn reading_ahead_sends_every_pair_in_pages_then_an_empty_one_and_relieves_after_each_full_page() {
        for n in [0, 1, 3, 4, 5, 8, 9] {
            let (store, pairs) = rebuilt_of(n);
            let (tx, rx) = mpsc::sync_channel(16);
            let mut reliefs = 0;
            let mut relieve = || {
                reliefs += 1;
                Ok(())
            };
            read_ahead(rebuilt_pages(&store, 4), 4, &mut relieve, tx);
            let pages: Vec<Vec<Pair>> = rx.iter().map(|p| p.expect("page")).collect();
            assert_eq!(pages.last(), Some(&Vec::new()), "{n} pairs: the last page is empty");
            assert!(pages.iter().all(|p| p.len() <= 4), "{n} pairs: no page above 4");
            assert_eq!(pages.concat(), pairs, "{n} pairs");
            assert_eq!(reliefs, n / 4, "{n} pairs: one relief a full page");
        }
    }

    #[test]
    fn a_failed_relief_is_sent_as_the_error_after_the_page_before_it_and_ends_the_pages() {
        let (store, pairs) = rebuilt_of(9);
        let (tx, rx) = mpsc::sync_channel(16);
        let mut relieve = || Err(StoreError::Io("reopen failed".to_string()));
        read_ahead(rebuilt_pages(&store, 4), 4, &mut relieve, tx);
        let pages: Vec<StoredPage> = rx.iter().collect();
        assert!(
            matches!(pages.as_slice(), [Ok(p), Err(StoreError::Io(m))] if *p == pairs[..4] && m == "reopen failed"),
            "{pages:?}"
        );
    }

    #[test]
    fn a_comparison_that_parts_early_stops_a_reader_blocked_on_a_full_channel() {
        let dir = scratch_dir("early");
        let (stored, _) = rebuilt_of(40);
        let (rebuilt, _) = rebuilt_of(40);
        let key = 2u32.to_be_bytes().to_vec();
        rebuilt
            .apply(&{
                let mut b = WriteBatch::default();
                b.put([&[1u8], key.as_slice()].concat(), vec![99]);
                b
            })
            .expect("apply");
        let compared = std::thread::scope(|scope| {
            let (tx, rx) = mpsc::sync_channel(1);
            let stored = rebuilt_pages(&stored, 3);
            let reader = scope.spawn(move || read_ahead(stored, 3, &mut || Ok(()), tx));
            let compared = compare(rx, rebuilt_pages(&rebuilt, 3), &dir, &mut super::super::Silent);
            reader.join().expect("the reader ends once the comparison has dropped its channel");
            compared
        });
        assert!(
            matches!(&compared, Err(OfflineError::ProjectionDiffers(Difference::Value { key: k })) if *k == key),
            "{compared:?}"
        );
    }

    #[test]
    fn an_error_after_good_pages_is_the_comparisons_error() {
        let dir = scratch_dir("error");
        let (rebuilt, pairs) = rebuilt_of(8);
        let (tx, rx) = mpsc::sync_channel(4);
        tx.send(Ok(pairs[..4].to_vec())).expect("send");
        tx.send(Err(StoreError::Io("read failed".to_string()))).expect("send");
        let compared = compare(rx, rebuilt_pages(&rebuilt, 3), &dir, &mut super::super::Silent);
        assert!(compared.unwrap_err().to_string().contains("read failed"));
        let (tx, rx) = mpsc::sync_channel(4);
        tx.send(Ok(pairs[..4].to_vec())).expect("send");
        drop(tx);
        let compared = compare(rx, rebuilt_pages(&rebuilt, 3), &dir, &mut super::super::Silent);
        assert!(compared.unwrap_err().to_string().contains("reader of the stored projection stopped"));
    }

    #[test]
    fn comparing_pages_read_ahead_counts_every_pair_or_names_where_they_part() {
        let dir = scratch_dir("test");
        for (stored_n, rebuilt_n) in [(0, 0), (9, 9), (8, 8), (9, 8), (8, 9)] {
            let (stored, _) = rebuilt_of(stored_n);
            let (rebuilt, _) = rebuilt_of(rebuilt_n);
            let (tx, rx) = mpsc::sync_channel(16);
            read_ahead(rebuilt_pages(&stored, 4), 4, &mut || Ok(()), tx);
            let compared = compare(rx, rebuilt_pages(&rebuilt, 3), &dir, &mut super::super::Silent);
            match (stored_n, rebuilt_n) {
                (s, r) if s == r => assert_eq!(compared.expect("equal"), u64::from(s)),
                (_, 8) => {
                    assert!(matches!(compared, Err(OfflineError::ProjectionDiffers(Difference::ExtraKey(_)))))
                }
                _ => assert!(matches!(
                    compared,
                    Err(OfflineError::ProjectionDiffers(Difference::MissingKey(_)))
                )),
            }
        }
    }
}
