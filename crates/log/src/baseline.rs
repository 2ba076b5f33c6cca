//! Limits measured beside herald's own figures in the benchmarks: what raw sled does on this
//! machine in the same run, with nothing of herald's in the way. Lives here because this crate is
//! the only one that names sled.

use std::path::Path;
use std::time::{Duration, Instant};

use crate::sled_store::SEGMENT_BYTES;
use crate::store::Durability;

/// Writes `batches` batches of `batch_len` values of `value_bytes` each with `apply_batch`, then
/// a flush (and an fsync of the data file and directory for [`Durability::Sync`]) per batch, on a
/// fresh sled database in `dir` configured as the log's. Returns the time taken.
pub fn raw_sled_batches(
    dir: &Path,
    batches: usize,
    batch_len: usize,
    value_bytes: usize,
    durability: Durability,
) -> Result<Duration, sled::Error> {
    let db = sled::Config::new()
        .path(dir)
        .segment_size(SEGMENT_BYTES)
        .mode(sled::Mode::HighThroughput)
        .flush_every_ms(None)
        .open()?;
    let tree = db.open_tree(b"raw")?;
    let value = vec![0x5au8; value_bytes];
    let mut key = 0u64;
    let started = Instant::now();
    for _ in 0..batches {
        let mut batch = sled::Batch::default();
        for _ in 0..batch_len {
            key += 1;
            batch.insert(&key.to_be_bytes(), value.as_slice());
        }
        tree.apply_batch(batch)?;
        db.flush()?;
        if durability == Durability::Sync {
            std::fs::File::open(dir.join("db"))?.sync_all()?;
            std::fs::File::open(dir)?.sync_all()?;
        }
    }
    Ok(started.elapsed())
}

/// Scans the log's record keyspace of the sled database at `dir` (freshly opened, as a rebuild
/// opens it), touching each value; returns the pairs seen and the time taken.
pub fn raw_sled_scan(dir: &Path) -> Result<(u64, Duration), sled::Error> {
    let db = sled::Config::new().path(dir).segment_size(SEGMENT_BYTES).open()?;
    let tree = db.open_tree(b"herald")?;
    let started = Instant::now();
    let mut pairs = 0u64;
    let mut bytes = 0usize;
    for item in tree.range(vec![crate::keyspace::RECORD]..vec![crate::keyspace::RECORD + 1]) {
        let (_k, v) = item?;
        bytes = bytes.wrapping_add(v.len());
        pairs += 1;
    }
    std::hint::black_box(bytes);
    Ok((pairs, started.elapsed()))
}

/// Opens the sled database at `dir` (as an offline tool opens it) and reads each of `keys` with
/// a `get`, touching each value.
pub fn raw_sled_gets(dir: &Path, keys: &[Vec<u8>]) -> Result<RawGets, sled::Error> {
    let resident_before = resident_bytes();
    let started = Instant::now();
    let db = sled::Config::new().path(dir).segment_size(SEGMENT_BYTES).open()?;
    let tree = db.open_tree(b"herald")?;
    let open = started.elapsed();
    let started = Instant::now();
    let mut bytes = 0usize;
    for key in keys {
        bytes = bytes.wrapping_add(tree.get(key)?.map_or(0, |v| v.len()));
    }
    std::hint::black_box(bytes);
    let gets = started.elapsed();
    let resident_growth =
        resident_bytes().zip(resident_before).map(|(after, before)| after.saturating_sub(before));
    Ok(RawGets { open, gets, resident_growth })
}

/// What [`raw_sled_gets`] measured.
#[derive(Debug, Clone, Copy)]
pub struct RawGets {
    /// Opening the database and its tree.
    pub open: Duration,
    /// The gets, after the open.
    pub gets: Duration,
    /// How much this process's resident memory grew from before the open to after the gets,
    /// with the database still open (`None` where `/proc/self/status` cannot be read): what
    /// holding the store open costs, as the first thing a process does.
    pub resident_growth: Option<u64>,
}

/// This process's resident memory in bytes (`VmRSS` in `/proc/self/status`).
fn resident_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse::<u64>().ok().map(|kib| kib * 1024)
}
