//! Gathers the figures the other benchmarks wrote (`--json`) into one table in
//! `docs/BENCHMARKS.md` (between its `figures` markers) and one JSON file beside it, with the
//! machine and the date. `just bench` runs it last:
//! `cargo bench --bench report -- <dir of JSON files> <BENCHMARKS.md> <benchmarks.json>`.

mod common;

use std::path::Path;

use common::fmt_value;

const START: &str = "<!-- figures:start -->";
const END: &str = "<!-- figures:end -->";
/// The benchmarks, in the order of the table, with what each measures.
const BENCHES: &[(&str, &str)] = &[
    ("core", "log and projector"),
    ("delivery", "delivery from publish to a 2xx"),
    ("http", "HTTP publish"),
    ("footprint", "memory, restart, disk"),
    ("retention", "disk under retention"),
    ("recover", "bulk recover of 100,000 deliveries"),
    ("audit", "replay of one delivery and verify on 1,000,000 records"),
    ("cluster", "cluster mode: 1, 2 and 3 nodes on NATS beside single node"),
];

fn machine() -> String {
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mem_kib: u64 = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines().find_map(|l| {
                l.strip_prefix("MemTotal:").map(|v| v.trim().trim_end_matches("kB").trim().to_owned())
            })
        })
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    format!("{cores} cores, {:.0} GiB memory, {}", mem_kib as f64 / 1024.0 / 1024.0, std::env::consts::OS)
}

fn today() -> String {
    // Days since the epoch to a civil date (UTC), without a date crate.
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let z = (secs / 86_400) as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}")
}

fn num(v: &serde_json::Value) -> f64 {
    v.as_f64().unwrap_or(0.0)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).filter(|a| a != "--bench").collect();
    let [dir, md, json] = args.as_slice() else {
        println!("report: run through `just bench` (it needs the other benchmarks' JSON); nothing to do");
        return;
    };
    let date = today();
    let machine = machine();
    let mut table = vec![
        format!("Latest run: {date}, on {machine}. Command: `just bench`."),
        String::new(),
        "| benchmark | figure | value | limit (same run) | ratio | target |".to_owned(),
        "| --- | --- | ---: | --- | ---: | --- |".to_owned(),
    ];
    let mut all = serde_json::Map::new();
    for (bench, what) in BENCHES {
        let path = Path::new(dir).join(format!("{bench}.json"));
        let Ok(text) = std::fs::read_to_string(&path) else {
            table.push(format!("| {bench} ({what}) | not run | | | | |"));
            continue;
        };
        let rows: Vec<serde_json::Value> = serde_json::from_str(&text).unwrap_or_default();
        for r in &rows {
            let limit = match num(&r["limit"]) {
                l if l > 0.0 => format!("{}: {}", r["limit_name"].as_str().unwrap_or(""), fmt_value(l)),
                _ => String::new(),
            };
            // Rates read as a share of their limit; times as a multiple of theirs.
            let ratio = match (r["ratio"].as_f64(), r["unit"].as_str()) {
                (Some(x), Some("ms")) => format!("{x:.1}×"),
                (Some(x), _) => format!("{:.0} %", x * 100.0),
                _ => String::new(),
            };
            let target = match (r["target"].as_str().unwrap_or(""), r["met"].as_bool()) {
                ("", _) => String::new(),
                (t, Some(true)) => format!("{t} — met"),
                (t, Some(false)) => format!("{t} — **missed**"),
                (t, None) => t.to_owned(),
            };
            table.push(format!(
                "| {bench} | {} | {} {} | {limit} | {ratio} | {target} |",
                r["figure"].as_str().unwrap_or(""),
                fmt_value(num(&r["value"])),
                r["unit"].as_str().unwrap_or(""),
            ));
        }
        all.insert((*bench).to_owned(), serde_json::Value::Array(rows));
    }
    let generated = table.join("\n");
    let doc = std::fs::read_to_string(md).unwrap_or_default();
    let updated = match (doc.find(START), doc.find(END)) {
        (Some(s), Some(e)) if s < e => format!("{}{START}\n{generated}\n{}", &doc[..s], &doc[e..]),
        _ => format!("{doc}\n## All figures\n\n{START}\n{generated}\n{END}\n"),
    };
    std::fs::write(md, updated).expect("cannot write BENCHMARKS.md");
    let out = serde_json::json!({"date": date, "machine": machine, "benches": all});
    std::fs::write(json, format!("{out:#}\n")).expect("cannot write the JSON");
    println!("{generated}");
}
