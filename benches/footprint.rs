//! herald's footprint, measured on the real binary (`herald serve`, release):
//! - disk bytes per delivered event (1 KiB payload, one endpoint, three attempts), beside the
//!   payload itself;
//! - resident memory idle (an empty data directory) and with 1,000,000 delivered and 100,000
//!   pending deliveries;
//! - restart to ready (`/readyz` answering 200) with 10,000,000 records in the log, beside the
//!   start of the same binary on an empty directory.
//!
//! The histories are written through the projector (what herald's own writes produce) in a
//! temporary directory, removed at the end (`HERALD_BENCH_FOOTPRINT_KEEP=1` keeps the large one,
//! to profile a restart by hand). `HERALD_BENCH_FOOTPRINT_SCALE=0.1` shrinks them for a quick look. Run: `cargo bench --bench footprint` (`--json FILE` also writes JSON).

mod common;
#[path = "common/serve.rs"]
mod serve;

use std::time::{Duration, Instant};

use common::{report, sled, write_history, Fate, Row};
use serve::Herald;

const START_MS: u64 = 1_800_000_000_000;
const MIB: f64 = 1024.0 * 1024.0;

fn scale() -> f64 {
    std::env::var("HERALD_BENCH_FOOTPRINT_SCALE").ok().and_then(|v| v.parse().ok()).unwrap_or(1.0)
}

fn scaled(n: u64) -> u64 {
    ((n as f64 * scale()) as u64).max(1)
}

fn main() {
    let mut rows = Vec::new();

    // Disk per delivered event: 1 KiB payload, 2 failed attempts and a delivered one.
    let disk_dir = tempfile::tempdir().unwrap();
    let n = scaled(50_000);
    {
        let store = sled(disk_dir.path());
        let before = store.size_on_disk().unwrap();
        write_history(store.clone(), START_MS, n, 0, 1024, Fate::Delivered { failures: 2 });
        store.flush(herald_log::Durability::Sync).unwrap();
        let per_event = (store.size_on_disk().unwrap().saturating_sub(before)) as f64 / n as f64;
        rows.push(Row {
            name: format!("disk bytes per delivered event (1 KiB payload, 3 attempts, {n} events)"),
            value: per_event,
            unit: "bytes",
            limit_name: "the payload".into(),
            limit: 1024.0,
            target: String::new(),
            met: None,
        });
    }
    drop(disk_dir);

    // Idle: an empty data directory.
    let empty = tempfile::tempdir().unwrap();
    let (idle, empty_start) = Herald::start(empty.path());
    std::thread::sleep(Duration::from_secs(1));
    let idle_mib = idle.rss_mib();
    idle.stop();
    rows.push(Row {
        name: "resident memory, idle".into(),
        value: idle_mib,
        unit: "MiB",
        limit_name: String::new(),
        limit: 0.0,
        target: "≤ 50 MB".into(),
        met: Some(idle_mib * MIB <= 50e6),
    });

    // 1,000,000 delivered and 100,000 pending (due tomorrow, so nothing is attempted).
    let big = tempfile::tempdir().unwrap();
    let (delivered, pending) = (scaled(1_000_000), scaled(100_000));
    let written = Instant::now();
    let store = sled(big.path());
    write_history(store.clone(), START_MS, delivered, 0, 256, Fate::Delivered { failures: 0 });
    let tomorrow = herald_engine::clock::Clock::now_ms(&herald_engine::clock::SystemClock) + 86_400_000;
    let records = write_history(
        store.clone(),
        START_MS,
        pending,
        delivered,
        256,
        Fate::Pending { due_at_ms: tomorrow },
    );
    drop(store);
    eprintln!("wrote {records} records in {:.0} s", written.elapsed().as_secs_f64());
    let (loaded, _) = Herald::start(big.path());
    std::thread::sleep(Duration::from_secs(2));
    let loaded_mib = loaded.rss_mib();
    loaded.stop();
    rows.push(Row {
        name: format!("resident memory, {delivered} delivered + {pending} pending deliveries"),
        value: loaded_mib,
        unit: "MiB",
        limit_name: "idle".into(),
        limit: idle_mib,
        target: "≤ 300 MB".into(),
        met: Some(loaded_mib * MIB <= 300e6),
    });

    // Restart to ready with 10,000,000 records: grow the same log.
    let target_records = scaled(10_000_000);
    let store = sled(big.path());
    // A delivered delivery is two records: its publish (with the delivery) and its attempt.
    let more = target_records.saturating_sub(records) / 2;
    let records = if more > 0 {
        write_history(
            store.clone(),
            START_MS,
            more,
            delivered + pending,
            256,
            Fate::Delivered { failures: 0 },
        )
    } else {
        records
    };
    drop(store);
    eprintln!("log now {records} records ({:.0} s writing)", written.elapsed().as_secs_f64());
    // The first open after writing pays for sled's recovery of its own segments; measure the
    // restart that follows a clean stop, as an operator's restart is.
    Herald::start(big.path()).0.stop();
    let (ready, restart) = Herald::start(big.path());
    ready.stop();
    rows.push(Row {
        name: format!("restart to ready, {records} records in the log"),
        value: restart.as_secs_f64() * 1000.0,
        unit: "ms",
        limit_name: "the same binary on an empty directory".into(),
        limit: empty_start.as_secs_f64() * 1000.0,
        target: "≤ 2 s".into(),
        met: Some(restart <= Duration::from_secs(2)),
    });
    // `HERALD_BENCH_FOOTPRINT_KEEP=1`: keep the large data directory (printed) for profiling
    // a restart by hand.
    if std::env::var_os("HERALD_BENCH_FOOTPRINT_KEEP").is_some() {
        eprintln!("kept the data directory {}", big.keep().display());
    } else {
        drop(big);
    }
    report(&rows);
}
