//! Disk under retention: eight retention periods of simulated time (retention 1 day, a step every
//! 2 hours) of steady load, written through the projector as herald's own writes are, with a
//! compaction after every step and `herald compact --vacuum`'s rewrite once a day. It reports the
//! bytes on disk per live delivery after the last rewrite and how that size moved over the
//! second half of the run, beside the same load without retention in the same run (the limit:
//! what herald would use if it kept everything).
//!
//! Load per step: 1,000 delivered events (1 KiB payload, one endpoint, two failures then a 2xx)
//! and 10 that stay pending (due in a year: never dropped). Data lives in temporary directories,
//! removed at the end. `HERALD_BENCH_RETENTION_PERIODS` changes the number of days (8).
//! Run: `cargo bench --bench retention` (`--json FILE` also writes JSON).

mod common;

use std::ops::ControlFlow;
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
const STEPS_PER_DAY: u64 = RETAIN_MS / STEP_MS;
const DELIVERED_PER_STEP: u64 = 1_000;
const PENDING_PER_STEP: u64 = 10;
const MIB: f64 = 1024.0 * 1024.0;

fn periods() -> u64 {
    std::env::var("HERALD_BENCH_RETENTION_PERIODS").ok().and_then(|v| v.parse().ok()).unwrap_or(8).max(2)
}

/// The store at the end of a day (after its rewrite, with retention).
struct Sample {
    /// Bytes on disk just before the day's rewrite (the peak), and after it.
    peak: u64,
    bytes: u64,
    live: u64,
    /// Keys and values held: what the files would be without sled's garbage.
    held: u64,
}

struct Run {
    days: Vec<Sample>,
    written: u64,
    longest_pass: Duration,
    longest_vacuum: Duration,
}

fn live(store: &dyn Store) -> u64 {
    delivery_counts(&StoreTables(store)).unwrap().iter().map(|(_, n)| n).sum()
}

fn held(store: &dyn Store) -> u64 {
    let mut held = 0u64;
    store
        .scan(&[], &[0xff; 2], &mut |k, v| {
            held += (k.len() + v.len()) as u64;
            ControlFlow::Continue(())
        })
        .unwrap();
    held
}

fn compact(store: &std::sync::Arc<dyn Store>, now: u64, longest: &mut Duration) {
    let config = LogConfig { durability: Durability::Flush, ..LogConfig::default() };
    let log = Log::open(store.clone(), Compactor, config).unwrap();
    let cutoff = now.saturating_sub(RETAIN_MS);
    while let Some(plan) = plan(store.as_ref(), cutoff, herald_engine::COMPACT_PASS_RECORDS).unwrap() {
        let started = Instant::now();
        log.submit((now, Box::new(plan))).unwrap().unwrap();
        *longest = (*longest).max(started.elapsed());
    }
    log.close();
}

fn run(dir: &Path, retain: bool) -> Run {
    let mut written = 0;
    let mut days = Vec::new();
    let (mut longest_pass, mut longest_vacuum) = (Duration::ZERO, Duration::ZERO);
    let mut store = sled(dir);
    for step in 0..periods() * STEPS_PER_DAY {
        let now = START_MS + step * STEP_MS;
        // write_history stamps delivery n at start + n: start so that this step's begin at `now`.
        let delivered = Fate::Delivered { failures: 2 };
        write_history(store.clone(), now - written, DELIVERED_PER_STEP, written, 1024, delivered);
        written += DELIVERED_PER_STEP;
        let pending = Fate::Pending { due_at_ms: now + 365 * RETAIN_MS };
        write_history(store.clone(), now - written, PENDING_PER_STEP, written, 1024, pending);
        written += PENDING_PER_STEP;
        if retain {
            compact(&store, now + STEP_MS, &mut longest_pass);
        }
        if (step + 1) % STEPS_PER_DAY != 0 {
            continue;
        }
        store.flush(Durability::Sync).unwrap();
        let peak = store.size_on_disk().unwrap();
        if retain {
            drop(store);
            let started = Instant::now();
            herald_log::vacuum(dir, 64 << 20, &mut |_| {}).unwrap();
            longest_vacuum = longest_vacuum.max(started.elapsed());
            store = sled(dir);
        }
        let (live, held) = (live(store.as_ref()), held(store.as_ref()));
        days.push(Sample { peak, bytes: store.size_on_disk().unwrap(), live, held });
    }
    Run { days, written, longest_pass, longest_vacuum }
}

/// A figure beside its limit, with no target of its own.
fn row(
    name: impl Into<String>,
    value: f64,
    unit: &'static str,
    limit_name: impl Into<String>,
    limit: f64,
) -> Row {
    Row {
        name: name.into(),
        value,
        unit,
        limit_name: limit_name.into(),
        limit,
        target: String::new(),
        met: None,
    }
}

fn main() {
    let kept_dir = tempfile::tempdir().unwrap();
    let started = Instant::now();
    let all = run(&kept_dir.path().join("data"), false);
    eprintln!("without retention: {:.0} s", started.elapsed().as_secs_f64());
    drop(kept_dir);
    let retained_dir = tempfile::tempdir().unwrap();
    let started = Instant::now();
    let retained = run(&retained_dir.path().join("data"), true);
    eprintln!("with retention: {:.0} s", started.elapsed().as_secs_f64());
    drop(retained_dir);

    eprintln!("day  MiB, kept all  MiB before rewrite  MiB after rewrite  MiB held  live deliveries");
    for (i, (a, r)) in all.days.iter().zip(&retained.days).enumerate() {
        eprintln!(
            "{:>3} {:>14.1} {:>19.1} {:>18.1} {:>9.1} {:>16}",
            i + 1,
            a.bytes as f64 / MIB,
            r.peak as f64 / MIB,
            r.bytes as f64 / MIB,
            r.held as f64 / MIB,
            r.live
        );
    }
    let periods = periods();
    let end = retained.days.last().unwrap();
    let all_end = all.days.last().unwrap();
    let half = (periods / 2) as usize;
    let growth = |run: &Run| {
        let mid = run.days[half - 1].bytes as f64;
        100.0 * (run.days.last().unwrap().bytes as f64 - mid) / mid
    };
    let (growth_retained, growth_all) = (growth(&retained), growth(&all));
    let peak = retained.days.iter().map(|d| d.peak).max().unwrap_or(0);
    let second_half = &retained.days[half - 1..];
    let live_growth = 100.0 * (end.live as f64 / retained.days[half - 1].live as f64 - 1.0);
    let rows = vec![
        row(format!(
                "disk bytes per live delivery, retention 1 day, after {periods} days and a rewrite ({} live of {} written)",
                end.live, retained.written
            ), end.bytes as f64 / end.live as f64, "bytes", "without retention, per delivery written", all_end.bytes as f64 / all.written as f64),
        row(format!(
                "disk after each daily rewrite, days {half}-{periods}: highest (lowest {:.0} MiB; held data {:.0}-{:.0} MiB)",
                second_half.iter().map(|d| d.bytes).min().unwrap_or(0) as f64 / MIB,
                second_half.iter().map(|d| d.held).min().unwrap_or(0) as f64 / MIB,
                second_half.iter().map(|d| d.held).max().unwrap_or(0) as f64 / MIB,
            ), second_half.iter().map(|d| d.bytes).max().unwrap_or(0) as f64 / MIB, "MiB", format!("without retention after {periods} days"), all_end.bytes as f64 / MIB),
        row(format!("disk growth from day {half} to day {periods}, with retention (live deliveries +{live_growth:.0} %)"), growth_retained, "%", "without retention", growth_all),
        row("highest disk between two daily rewrites, with retention", peak as f64 / MIB, "MiB", format!("without retention after {periods} days"), all_end.bytes as f64 / MIB),
        row(format!(
                "longest compaction pass (one writer batch, ≤ {} records)",
                herald_engine::COMPACT_PASS_RECORDS
            ), retained.longest_pass.as_secs_f64() * 1e3, "ms", String::new(), 0.0),
        row("longest rewrite (herald compact --vacuum, stopped server)", retained.longest_vacuum.as_secs_f64() * 1e3, "ms", String::new(), 0.0),
    ];
    report(&rows);
}
