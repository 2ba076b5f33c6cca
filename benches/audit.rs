//! Audit at scale (issue 26): one delivery's story and a whole verify on a history of N records,
//! each beside what raw sled does with the same data in the same run:
//! - `herald replay --delivery ID` (the real binary, a child process; replay by the record
//!   refs): its wall time and peak resident memory, beside a raw sled open and `get`s of the
//!   story's records (in a child process of its own: this bench run with `--raw-gets`), their
//!   time and the resident memory the open adds;
//! - `herald verify` (default `--memory-max`, 512 MiB): its time, its rate in records/s as a
//!   share of a raw sled scan of the record keyspace, and its peak resident memory;
//! - the same delivery's history over HTTP (`GET /v1/webhook_deliveries/{id}/history`) from a
//!   running `herald serve` on the history: the median and the slowest of its requests, beside
//!   the raw gets of the story's records.
//!
//! The history is written through the log and the projector directly (no HTTP): fold rules
//! adopted first (so the projection keeps record refs), an admin key, one endpoint, then per
//! delivery a publish, a failed attempt and a delivered one (three records).
//!
//! Run: `cargo bench --bench audit` (1,000,000 records); `-- --records 10000000` for the large
//! run; `--json FILE` also writes JSON; `--data DIR` builds the history in DIR and keeps it, or
//! reuses the one a finished earlier run left there (a large history takes minutes). Targets at 10,000,000 records: replay under 50 ms and
//! 64 MB; verify under 512 MB at 50 % or more of the raw scan's rate.

mod common;
#[path = "../tests/common/peak.rs"]
mod peak;
#[path = "common/serve.rs"]
mod serve;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{endpoint_created, report, write_history, Fate, Row};
use herald_log::baseline::{raw_sled_gets, raw_sled_scan, RawGets};
use herald_log::{Durability, Log, LogConfig, SledStore, Store};
use herald_projector::{ApiKeyId, DeliveryId, Event, Projector, Scope, RULES_CURRENT};
use uuid::Uuid;

const START_MS: u64 = 1_700_000_000_000;
const RECORDS_DEFAULT: u64 = 1_000_000;
/// Records of one delivery's story: its publish, a failed attempt, the delivered one.
const RECORDS_PER_DELIVERY: u64 = 3;
/// Records before the deliveries': the rules adopted, the admin key, the endpoint.
const RECORDS_BEFORE: u64 = 3;
/// Requests of the history route timed; the figures are their median and slowest.
const HISTORY_REQUESTS: usize = 50;
const PAYLOAD_BYTES: usize = 256;
/// Replays timed; the figure is their median.
const REPLAYS: usize = 5;
const MIB: f64 = 1024.0 * 1024.0;
const CHILD_TIMEOUT: Duration = Duration::from_secs(3600);

/// Beside a kept history: its deliveries and last seq, written once the build is complete.
const BUILT_FILE: &str = "built";
/// The kind of history this bench builds, first in [`BUILT_FILE`]: a history of another kind
/// (an earlier version of this bench's) is refused, not measured.
const HISTORY_KIND: &str = "audit-v2";

fn arg(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).cloned()
}

fn records_wanted() -> u64 {
    arg("--records")
        .map(|v| v.replace(['_', ','], "").parse().expect("--records takes a number"))
        .unwrap_or(RECORDS_DEFAULT)
}

/// The last seq of the history of `deliveries` deliveries in `data`: the one a finished earlier
/// build left there, or one built now (what an unfinished build left is removed first).
fn build_or_reuse(data: &Path, deliveries: u64) -> u64 {
    let built = data.with_file_name(BUILT_FILE);
    if let Ok(text) = std::fs::read_to_string(&built) {
        let mut words = text.split_whitespace();
        let kind = words.next();
        match words.map(str::parse::<u64>).collect::<Result<Vec<_>, _>>() {
            Ok(v) if kind == Some(HISTORY_KIND) && v.len() == 2 && v[0] == deliveries => {
                eprintln!("reusing the history of {} records in {}", v[1], data.display());
                return v[1];
            }
            _ => panic!(
                "{} holds another history ({text:?}): remove it or pick another --data",
                data.display()
            ),
        }
    }
    let _ = std::fs::remove_dir_all(data);
    let started = Instant::now();
    let last = build(data, deliveries);
    eprintln!("built {last} records ({deliveries} deliveries) in {:.1} s", started.elapsed().as_secs_f64());
    std::fs::write(&built, format!("{HISTORY_KIND} {deliveries} {last}")).unwrap();
    last
}

/// The history of `deliveries` deliveries in `dir`, after the rules and the endpoint; its last seq.
fn build(dir: &Path, deliveries: u64) -> u64 {
    let store: Arc<dyn Store> = Arc::new(SledStore::open(dir, 64 << 20).unwrap());
    let config =
        LogConfig { batch_commands_max: 64, queue_commands_max: 1024, durability: Durability::Flush };
    let log = Log::open(store.clone(), Projector, config).unwrap();
    let admin_key = Event::ApiKeyCreated {
        id: ApiKeyId(Uuid::from_u128(1)),
        org_id: None,
        scopes: vec![Scope::Admin],
        name: "bench".into(),
        key_hash: herald_server::key_hash(serve::ADMIN_KEY),
    };
    log.submit(vec![
        (START_MS, Event::RulesAdopted { version: RULES_CURRENT }),
        (START_MS, admin_key),
        (START_MS, endpoint_created()),
    ])
    .unwrap()
    .unwrap();
    log.close();
    drop(log);
    let last =
        write_history(store.clone(), START_MS, deliveries, 0, PAYLOAD_BYTES, Fate::Delivered { failures: 1 });
    store.flush(Durability::Sync).unwrap();
    last
}

/// The id `write_history` gave its `n`th delivery.
fn delivery_id(n: u64) -> DeliveryId {
    DeliveryId(Uuid::from_u128(2 << 64 | n as u128))
}

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_herald"))
}

/// Median wall time and highest peak of [`REPLAYS`] replays of `delivery`; the records told.
fn replay(data: &Path, delivery: DeliveryId, out: &Path) -> (Duration, u64, usize) {
    let id = delivery.0.to_string();
    let args = ["replay", "--data-dir", data.to_str().unwrap(), "--delivery", &id, "--format", "ndjson"];
    let mut times = Vec::new();
    let (mut peak_bytes, mut lines) = (0, 0);
    for _ in 0..REPLAYS {
        let run = peak::run_measured(bin(), &args, out, CHILD_TIMEOUT);
        assert_eq!(run.code, 0, "replay failed: {}", run.stderr);
        assert!(!run.stderr.contains("read by a scan"), "replay fell back to a scan: {}", run.stderr);
        times.push(run.elapsed);
        peak_bytes = peak_bytes.max(run.peak_bytes);
        lines = run.stdout.lines().count();
    }
    times.sort();
    (times[REPLAYS / 2], peak_bytes, lines)
}

/// The median and slowest of [`HISTORY_REQUESTS`] requests of `delivery`'s history from a
/// herald serving `data` (a new connection each, as a script would make them), and the records
/// its answer holds.
fn history_over_http(data: &Path, delivery: DeliveryId) -> (Duration, Duration, usize) {
    let (herald, _) = serve::Herald::start(data);
    let path = format!("/v1/webhook_deliveries/{}/history", delivery.0);
    let (mut times, mut records) = (Vec::new(), 0);
    for _ in 0..HISTORY_REQUESTS {
        let started = Instant::now();
        let (status, body) = serve::get(herald.port, &path, Some(serve::ADMIN_KEY)).expect("herald answered");
        times.push(started.elapsed());
        assert_eq!(status, 200, "the history route answered {status}: {body}");
        records = body.matches("\"prev_hash\"").count();
    }
    herald.stop();
    times.sort();
    (times[HISTORY_REQUESTS / 2], times[HISTORY_REQUESTS - 1], records)
}

/// The keys of the story's records, from its first seq.
fn story_keys(first_seq: u64) -> Vec<Vec<u8>> {
    (first_seq..first_seq + RECORDS_PER_DELIVERY).map(herald_log::record::head_key).collect()
}

/// `--raw-gets DIR FIRST_SEQ`: this bench run as a child to open `DIR` with raw sled and get the
/// story's records, printing what [`raw_sled_gets`] measured (nanoseconds, nanoseconds, bytes).
fn raw_gets_child() -> bool {
    let Some(dir) = arg("--raw-gets") else { return false };
    let first_seq: u64 = arg("--first-seq").and_then(|v| v.parse().ok()).expect("--first-seq");
    let raw = raw_sled_gets(Path::new(&dir), &story_keys(first_seq)).unwrap();
    println!("{} {} {}", raw.open.as_nanos(), raw.gets.as_nanos(), raw.resident_growth.unwrap_or(0));
    true
}

/// [`raw_sled_gets`] of the story from `first_seq`, in a child process (this bench again).
fn raw_gets_in_a_child(data: &Path, first_seq: u64) -> RawGets {
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--raw-gets", data.to_str().unwrap(), "--first-seq", &first_seq.to_string()])
        .output()
        .unwrap();
    assert!(out.status.success(), "the raw gets failed: {}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).unwrap();
    let n: Vec<u64> = text.split_whitespace().map(|w| w.parse().unwrap()).collect();
    RawGets {
        open: Duration::from_nanos(n[0]),
        gets: Duration::from_nanos(n[1]),
        resident_growth: Some(n[2]),
    }
}

fn main() {
    if raw_gets_child() {
        return;
    }
    let records = records_wanted();
    let deliveries = (records / RECORDS_PER_DELIVERY).max(1);
    let temp = tempfile::tempdir().unwrap();
    let dir = match arg("--data") {
        Some(kept) => std::path::PathBuf::from(kept),
        None => temp.path().to_path_buf(),
    };
    std::fs::create_dir_all(&dir).unwrap();
    let data = dir.join("data");
    let last = build_or_reuse(&data, deliveries);

    // A delivery in the middle of the history, its story's records read by a raw get each, in a
    // process of their own: the resident memory the open adds is then that process's first. The
    // second of two such runs: the first open after a build replays sled's log since its last
    // snapshot and writes a new one, which none of the replays timed below pays.
    let target = deliveries / 2;
    let first_seq = RECORDS_BEFORE + target * RECORDS_PER_DELIVERY + 1;
    raw_gets_in_a_child(&data, first_seq);
    let raw = raw_gets_in_a_child(&data, first_seq);
    let raw_open_resident = raw.resident_growth.unwrap_or(0);
    eprintln!(
        "raw sled open {:.1} ms (resident {:.1} MiB) + {RECORDS_PER_DELIVERY} gets {:.3} ms",
        raw.open.as_secs_f64() * 1e3,
        raw_open_resident as f64 / MIB,
        raw.gets.as_secs_f64() * 1e3
    );

    let (pairs, scan_took) = raw_sled_scan(&data).unwrap();
    let scan_rate = last as f64 / scan_took.as_secs_f64();
    eprintln!("raw scan: {pairs} record keys in {:.2} s", scan_took.as_secs_f64());

    let (replay_took, replay_peak, told) = replay(&data, delivery_id(target), &dir);
    eprintln!("replay: {told} lines in {:.1} ms", replay_took.as_secs_f64() * 1e3);

    let args = ["verify", "--data-dir", data.to_str().unwrap()];
    let verify = peak::run_measured(bin(), &args, &dir, CHILD_TIMEOUT);
    assert_eq!(verify.code, 0, "verify failed: {}", verify.stderr);
    let verify_rate = last as f64 / verify.elapsed.as_secs_f64();
    eprintln!("verify took {:.1} s", verify.elapsed.as_secs_f64());

    let (history_median, history_slowest, history_records) = history_over_http(&data, delivery_id(target));
    eprintln!(
        "history over HTTP: {history_records} records, median {:.2} ms, slowest {:.2} ms",
        history_median.as_secs_f64() * 1e3,
        history_slowest.as_secs_f64() * 1e3
    );

    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    // The targets are set at 10,000,000 records: a smaller history is not judged by them.
    let at_scale = last >= 10_000_000;
    let rows = vec![
        Row {
            name: format!("replay of one delivery ({told} lines), {last} records: time"),
            value: ms(replay_took),
            unit: "ms",
            limit_name: format!("raw sled open + {RECORDS_PER_DELIVERY} gets"),
            limit: ms(raw.open + raw.gets),
            target: "≤ 50 ms at 10,000,000 records".into(),
            met: at_scale.then_some(ms(replay_took) <= 50.0),
        },
        Row {
            name: format!("replay of one delivery, {last} records: peak memory"),
            value: replay_peak as f64 / MIB,
            unit: "MiB",
            limit_name: "raw sled open: resident memory it adds".into(),
            limit: raw_open_resident as f64 / MIB,
            target: "≤ 64 MB at 10,000,000 records".into(),
            met: at_scale.then_some(replay_peak as f64 <= 64e6),
        },
        Row {
            name: format!("verify, {last} records: rate"),
            value: verify_rate,
            unit: "records/s",
            limit_name: "raw sled scan of the record keyspace".into(),
            limit: scan_rate,
            target: "≥ 50 % of the limit".into(),
            met: Some(verify_rate >= 0.5 * scan_rate),
        },
        Row {
            name: format!("verify, {last} records: peak memory (--memory-max 512MiB)"),
            value: verify.peak_bytes as f64 / MIB,
            unit: "MiB",
            limit_name: "raw sled open: resident memory it adds".into(),
            limit: raw_open_resident as f64 / MIB,
            target: "≤ 512 MB at 10,000,000 records".into(),
            met: at_scale.then_some(verify.peak_bytes as f64 <= 512e6),
        },
        Row {
            name: format!(
                "history of one delivery over HTTP ({history_records} records), running server, {last} records: median of {HISTORY_REQUESTS}"
            ),
            value: ms(history_median),
            unit: "ms",
            limit_name: format!("raw sled {RECORDS_PER_DELIVERY} gets"),
            limit: ms(raw.gets),
            target: String::new(),
            met: None,
        },
        Row {
            name: format!("history of one delivery over HTTP, running server, {last} records: slowest"),
            value: ms(history_slowest),
            unit: "ms",
            limit_name: format!("raw sled {RECORDS_PER_DELIVERY} gets"),
            limit: ms(raw.gets),
            target: String::new(),
            met: None,
        },
    ];
    report(&rows);
}
