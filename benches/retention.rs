//! Disk under retention: eight retention periods of simulated time (retention 1 day, a step every
//! 2 hours) of steady load, written through the projector as herald's own writes are, with a
//! compaction after every step; the bytes on disk per live delivery at the end, and how much
//! the disk grew over the second half, beside the same load without retention in the
//! same run (the limit: what herald would use if it kept everything).
//!
//! Load per step: 1,000 delivered events (1 KiB payload, one endpoint, two failures then a 2xx)
//! and 10 that stay pending (due in a year: never dropped). Data lives in temporary directories,
//! removed at the end. Run: `cargo bench --bench retention` (`--json FILE` also writes JSON).

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::{report, sled, write_history, Fate, Row};
use herald_log::{Durability, Log, LogConfig, Store};
use herald_projector::compact::{plan, Compactor};
use herald_projector::{delivery_counts, StoreTables};

const START_MS: u64 = 1_800_000_000_000;
const HOUR_MS: u64 = 3_600_000;
const RETAIN_MS: u64 = 24 * HOUR_MS;
const STEP_MS: u64 = 2 * HOUR_MS;
/// Retention periods simulated (`HERALD_BENCH_RETENTION_PERIODS`, 10 by default).
fn periods() -> u64 {
    std::env::var("HERALD_BENCH_RETENTION_PERIODS").ok().and_then(|v| v.parse().ok()).unwrap_or(8).max(2)
}
const DELIVERED_PER_STEP: u64 = 1_000;
const PENDING_PER_STEP: u64 = 10;
const MIB: f64 = 1024.0 * 1024.0;

/// The store at the end of a step.
struct Sample {
    bytes: u64,
    live: u64,
    /// Keys and values the store holds, bytes: what sled's files would be without garbage.
    held: u64,
}

fn held_bytes(store: &dyn Store) -> u64 {
    let mut held = 0u64;
    store
        .scan(&[], &[0xff], &mut |k, v| {
            held += (k.len() + v.len()) as u64;
            std::ops::ControlFlow::Continue(())
        })
        .unwrap();
    held
}

struct Run {
    samples: Vec<Sample>,
    written: u64,
    longest_pass: Duration,
}

/// Wall-clock pause after each simulated step (`HERALD_BENCH_RETENTION_GC_MS`, 1000 by default).
fn gc_pause() -> Duration {
    let ms = std::env::var("HERALD_BENCH_RETENTION_GC_MS").ok().and_then(|v| v.parse().ok()).unwrap_or(1000);
    Duration::from_millis(ms)
}

fn live(store: &dyn Store) -> u64 {
    delivery_counts(&StoreTables(store)).unwrap().iter().map(|(_, n)| n).sum()
}

fn run(dir: &Path, retain: bool) -> Run {
    let steps = periods() * RETAIN_MS / STEP_MS;
    let mut written = 0;
    let mut samples = Vec::new();
    let mut longest_pass = Duration::ZERO;
    // One store for the whole run, as one server process keeps it: sled cleans its segments as
    // it goes, and a reopen would forget what it was about to clean.
    let store = sled(dir);
    for step in 0..steps {
        let now = START_MS + step * STEP_MS;
        // write_history stamps delivery n at start + n: start so that this step's begin at `now`.
        let delivered = Fate::Delivered { failures: 2 };
        write_history(store.clone(), now - written, DELIVERED_PER_STEP, written, 1024, delivered);
        written += DELIVERED_PER_STEP;
        let pending = Fate::Pending { due_at_ms: now + 365 * RETAIN_MS };
        write_history(store.clone(), now - written, PENDING_PER_STEP, written, 1024, pending);
        written += PENDING_PER_STEP;
        if retain {
            let config = LogConfig { durability: Durability::Flush, ..LogConfig::default() };
            let log = Log::open(store.clone(), Compactor, config).unwrap();
            let cutoff = (now + STEP_MS).saturating_sub(RETAIN_MS);
            while let Some(plan) = plan(store.as_ref(), cutoff, herald_engine::COMPACT_PASS_RECORDS).unwrap()
            {
                let started = Instant::now();
                log.submit((now + STEP_MS, Box::new(plan))).unwrap().unwrap();
                longest_pass = longest_pass.max(started.elapsed());
            }
            log.close();
        }
        // Real time is compressed here (2 hours of load are written in a fraction of a second);
        // give sled's background segment cleaning some of the time it would have had.
        if retain {
            std::thread::sleep(gc_pause());
        }
        store.flush(Durability::Sync).unwrap();
        let held = held_bytes(store.as_ref());
        samples.push(Sample { bytes: store.size_on_disk().unwrap(), live: live(store.as_ref()), held });
    }
    Run { samples, written, longest_pass }
}

fn main() {
    let kept_dir = tempfile::tempdir().unwrap();
    let started = Instant::now();
    let all = run(kept_dir.path(), false);
    eprintln!("without retention: {:.0} s", started.elapsed().as_secs_f64());
    drop(kept_dir);
    let retained_dir = tempfile::tempdir().unwrap();
    let started = Instant::now();
    let retained = run(retained_dir.path(), true);
    eprintln!("with retention: {:.0} s", started.elapsed().as_secs_f64());
    drop(retained_dir);

    let steps_per_period = (RETAIN_MS / STEP_MS) as usize;
    eprintln!("day  disk MiB kept all  disk MiB retained  data MiB retained  live deliveries retained");
    for (i, (a, r)) in all.samples.iter().zip(&retained.samples).enumerate() {
        if (i + 1) % (steps_per_period / 2) == 0 {
            let day = (i + 1) as f64 / steps_per_period as f64;
            eprintln!(
                "{day:>4.1} {:>17.1} {:>18.1} {:>18.1} {:>25}",
                a.bytes as f64 / MIB,
                r.bytes as f64 / MIB,
                r.held as f64 / MIB,
                r.live
            );
        }
    }
    let end = retained.samples.last().unwrap();
    let all_end = all.samples.last().unwrap();
    let per_live = end.bytes as f64 / end.live as f64;
    let per_written = all_end.bytes as f64 / all.written as f64;
    // Growth over the second half of the run.
    let periods = periods();
    let half = (periods / 2) as usize;
    let growth = |run: &Run| {
        let mid = run.samples[half * steps_per_period - 1].bytes as f64;
        100.0 * (run.samples.last().unwrap().bytes as f64 - mid) / mid
    };
    let (growth_retained, growth_all) = (growth(&retained), growth(&all));
    let rows = vec![
        Row {
            name: format!(
                "disk bytes per live delivery, retention 1 day, after {periods} days ({} live of {} written)",
                end.live, retained.written
            ),
            value: per_live,
            unit: "bytes",
            limit_name: "without retention, per delivery written".into(),
            limit: per_written,
            target: String::new(),
            met: None,
        },
        Row {
            name: format!("disk growth from day {half} to day {periods}, with retention"),
            value: growth_retained,
            unit: "%",
            limit_name: "without retention".into(),
            limit: growth_all,
            target: "bounded: ≤ 10 %".into(),
            met: Some(growth_retained <= 10.0),
        },
        Row {
            name: format!("disk with retention after {periods} days"),
            value: end.bytes as f64 / MIB,
            unit: "MiB",
            limit_name: "without retention".into(),
            limit: all_end.bytes as f64 / MIB,
            target: String::new(),
            met: None,
        },
        Row {
            name: format!(
                "longest compaction pass (one writer batch, ≤ {} records)",
                herald_engine::COMPACT_PASS_RECORDS
            ),
            value: retained.longest_pass.as_secs_f64() * 1e3,
            unit: "ms",
            limit_name: String::new(),
            limit: 0.0,
            target: String::new(),
            met: None,
        },
    ];
    report(&rows);
}
