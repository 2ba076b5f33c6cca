//! The core's figures, each beside a limit measured in the same run on the same disk:
//! - durable appends/s through group commit at 1, 16 and 64 appenders (256-byte events), beside
//!   raw sled `apply_batch` + flush (+ fsync) at the batch size the group commit actually reached;
//! - projection rebuild in records/s, beside a raw sled scan of the same data.
//!
//! Run: `cargo bench --bench core` (or `just bench`). Prints a table; `--json FILE` also writes JSON.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::Row;
use herald_log::baseline::{raw_sled_batches, raw_sled_scan};
use herald_log::{AppendOnly, Durability, Log, LogConfig, SledStore, Store};
use herald_projector::rebuild;

const EVENT_BYTES: usize = 256;
const RUN_FOR: Duration = Duration::from_secs(3);

fn appends(appenders: usize, durability: Durability) -> (f64, f64) {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn Store> = Arc::new(SledStore::open(dir.path(), 64 << 20).unwrap());
    let config = LogConfig { batch_commands_max: 1024, queue_commands_max: 65_536, durability };
    let log = Log::open(store, AppendOnly, config).unwrap();
    let started = Instant::now();
    let threads: Vec<_> = (0..appenders)
        .map(|t| {
            let log = log.clone();
            std::thread::spawn(move || {
                let mut n = 0u64;
                while started.elapsed() < RUN_FOR {
                    log.submit(vec![(n, vec![t as u8; EVENT_BYTES])]).unwrap().unwrap();
                    n += 1;
                }
                n
            })
        })
        .collect();
    let total: u64 = threads.into_iter().map(|t| t.join().unwrap()).sum();
    let elapsed = started.elapsed().as_secs_f64();
    let stats = log.stats();
    log.close();
    (total as f64 / elapsed, stats.commands as f64 / stats.batches.max(1) as f64)
}

fn raw(batch_len: usize, durability: Durability) -> f64 {
    let dir = tempfile::tempdir().unwrap();
    // As many batches as fit in about the same time, measured by a short probe first.
    let probe = raw_sled_batches(&dir.path().join("probe"), 20, batch_len, EVENT_BYTES, durability).unwrap();
    let per_batch = probe.as_secs_f64() / 20.0;
    let batches = ((RUN_FOR.as_secs_f64() / per_batch) as usize).clamp(20, 200_000);
    let took =
        raw_sled_batches(&dir.path().join("run"), batches, batch_len, EVENT_BYTES, durability).unwrap();
    (batches * batch_len) as f64 / took.as_secs_f64()
}

/// Writes a log of `cycles` × (publish, delivery created, delivered attempt) after one endpoint,
/// through the projector, and returns its directory and record count.
fn write_history(cycles: u64) -> (tempfile::TempDir, u64) {
    let dir = tempfile::tempdir().unwrap();
    let records = common::write_history(
        common::sled(dir.path()),
        1_700_000_000_000,
        cycles,
        0,
        EVENT_BYTES,
        common::Fate::Delivered { failures: 0 },
    );
    (dir, records)
}

fn rebuild_rate(cycles: u64) -> (f64, f64, u64) {
    let (dir, records) = write_history(cycles);
    let (pairs, raw_took) = raw_sled_scan(dir.path()).unwrap();
    let store = SledStore::open(dir.path(), 64 << 20).unwrap();
    let started = Instant::now();
    let tables = rebuild(&store, &mut |_| {}).unwrap();
    let took = started.elapsed().as_secs_f64();
    std::hint::black_box(tables.len());
    let raw_records_per_s = pairs as f64 / raw_took.as_secs_f64();
    (records as f64 / took, raw_records_per_s, records)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let mut rows = Vec::new();
    let only_rebuild = args.iter().any(|a| a == "--rebuild-only");
    for durability in [Durability::Sync, Durability::Flush].into_iter().filter(|_| !only_rebuild) {
        for appenders in [1usize, 16, 64] {
            let (rate, batch) = appends(appenders, durability);
            let batch_len = batch.round().max(1.0) as usize;
            let limit = raw(batch_len, durability);
            let targeted = appenders == 64;
            rows.push(Row {
                name: format!("durable appends/s, {appenders} appenders, {durability:?}"),
                value: rate,
                unit: "appends/s",
                limit_name: format!("raw sled batch of {batch_len} + flush"),
                limit,
                target: if targeted { "≥ 80 % of the limit".into() } else { String::new() },
                met: targeted.then_some(rate >= 0.8 * limit),
            });
        }
    }
    let cycles: u64 =
        std::env::var("HERALD_BENCH_REBUILD_CYCLES").ok().and_then(|v| v.parse().ok()).unwrap_or(100_000);
    let (rate, raw_rate, records) = rebuild_rate(cycles);
    rows.push(Row {
        name: format!("projection rebuild, {records} records"),
        value: rate,
        unit: "records/s",
        limit_name: "raw sled scan of the same records".into(),
        limit: raw_rate,
        target: "≥ 1,000,000 records/s".into(),
        met: Some(rate >= 1e6),
    });
    common::report(&rows);
}
