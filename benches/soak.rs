//! Soak: steady mixed load on the real binary for a long time (30 minutes by default), sampling
//! what must not grow without bound: resident memory, open file descriptors, the due queue and
//! its lag. Load: publishes to a healthy endpoint and to one that fails half the time (its
//! receiver flips between 503 and 200 every minute), and a retrigger of every failure each minute.
//!
//! Run: `cargo bench --bench soak` (`HERALD_SOAK_SECS=120` for a short look, `--json FILE`).
//! Not part of `just bench` (it takes half an hour); its latest samples are in BENCHMARKS.md.

mod common;
#[path = "../tests/common/mod.rs"]
mod harness;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{report, Row};
use harness::{Receiver, Server, ADMIN_KEY};
use serde_json::json;

struct Sample {
    at_s: u64,
    rss_mib: f64,
    fds: usize,
    due_queue: f64,
    lag_s: f64,
    published: u64,
    pending: f64,
    inactive_or_exhausted: f64,
}

fn rss_mib(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(0.0, |kib| kib / 1024.0)
}

fn fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn main() {
    let secs: u64 = std::env::var("HERALD_SOAK_SECS").ok().and_then(|v| v.parse().ok()).unwrap_or(1800);
    let server = Server::start_with(&[
        ("HERALD_DELIVERY_RETRY_SCHEDULE", "1s,5s,30s"),
        ("HERALD_ENDPOINT_HEALTH_FAILURES", "20"),
        ("HERALD_ENDPOINT_HEALTH_WINDOW", "1m"),
        ("HERALD_RETRIGGER_MAX_PER_WINDOW", "1000"),
    ]);
    let pid = server.pid().expect("herald is not running");
    let healthy = Receiver::start();
    let flaky = Receiver::start();
    let (_, key) = server.org_key(&[
        "events.write",
        "endpoints.write",
        "deliveries.read",
        "deliveries.write",
        "tasks.webhooks.read",
    ]);
    server.endpoint(&key, &healthy.url("/ok"), &["call.ended", "call.started"]);
    let flaky_endpoint = server.endpoint(&key, &flaky.url("/flaky"), &["call.ended"]);
    let flaky_id = flaky_endpoint["id"].as_str().unwrap().to_owned();

    let stop = Arc::new(AtomicBool::new(false));
    let published = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let server = Arc::new(server);
    // Publishers: about 100 events a second in all, half of them also to the flaky endpoint.
    let publishers: Vec<_> = (0..2)
        .map(|t| {
            let (server, key, stop, published) =
                (server.clone(), key.clone(), stop.clone(), published.clone());
            std::thread::spawn(move || {
                let mut n = 0u64;
                while !stop.load(Ordering::SeqCst) {
                    let kind = if n % 2 == 0 { "call.ended" } else { "call.started" };
                    server.publish(&key, kind, json!({"thread": t, "n": n, "pad": "x".repeat(200)}));
                    published.fetch_add(1, Ordering::Relaxed);
                    n += 1;
                    std::thread::sleep(Duration::from_millis(20));
                }
            })
        })
        .collect();

    let mut samples = Vec::new();
    let mut minute = 0;
    while started.elapsed() < Duration::from_secs(secs) {
        std::thread::sleep(Duration::from_secs(10));
        let elapsed = started.elapsed().as_secs();
        // Every minute: flip the flaky receiver and retrigger every failure of its endpoint.
        if elapsed / 60 > minute {
            minute = elapsed / 60;
            flaky.set_status(if minute % 2 == 0 { 200 } else { 503 });
            let path = format!("/api/v4/tasks/webhook_failures?webhook_id={flaky_id}&limit=250");
            let (_, failures) = server.call("GET", &path, Some(&key), None);
            let ids: Vec<String> = failures["webhook_failures"]
                .as_array()
                .map(|a| a.iter().filter_map(|f| f["id"].as_str().map(str::to_owned)).collect())
                .unwrap_or_default();
            for chunk in ids.chunks(25) {
                let body = json!({ "webhookNotificationIds": chunk });
                let path = format!("/api/notifications/v1/admin/webhooks/{flaky_id}/notifications/retrigger");
                server.call("POST", &path, Some(ADMIN_KEY), Some(body));
            }
        }
        let text = harness::call_raw(&server.url("/metrics"), "GET", None, None, &[])
            .map(|(_, t)| t)
            .unwrap_or_default();
        let s = Sample {
            at_s: elapsed,
            rss_mib: rss_mib(pid),
            fds: fds(pid),
            due_queue: metric(&text, "herald_due_queue_length"),
            lag_s: metric(&text, "herald_delivery_lag_seconds"),
            published: published.load(Ordering::Relaxed),
            pending: metric(&text, "herald_deliveries{status=\"pending\"}"),
            inactive_or_exhausted: metric(&text, "herald_deliveries{status=\"inactive\"}")
                + metric(&text, "herald_deliveries{status=\"exhausted\"}"),
        };
        eprintln!(
            "{:>5} s  rss {:>6.1} MiB  fds {:>4}  due queue {:>6.0}  lag {:>6.2} s  published {:>7}  pending {:>6.0}  failed {:>6.0}",
            s.at_s, s.rss_mib, s.fds, s.due_queue, s.lag_s, s.published, s.pending, s.inactive_or_exhausted
        );
        samples.push(s);
    }
    stop.store(true, Ordering::SeqCst);
    for p in publishers {
        let _ = p.join();
    }
    // Growth: the last third's peak against the middle third's (the first third warms up).
    let third = samples.len() / 3;
    let peak = |from: usize, to: usize, f: &dyn Fn(&Sample) -> f64| {
        samples[from..to].iter().map(f).fold(0.0f64, f64::max)
    };
    let n = samples.len();
    let mut rows = Vec::new();
    if third > 0 {
        for (name, unit, f) in [
            ("resident memory", "MiB", &(|s: &Sample| s.rss_mib) as &dyn Fn(&Sample) -> f64),
            ("open file descriptors", "fds", &|s: &Sample| s.fds as f64),
            ("due queue length", "entries", &|s: &Sample| s.due_queue),
        ] {
            let middle = peak(third, 2 * third, f);
            let last = peak(2 * third, n, f);
            rows.push(Row {
                name: format!("soak {secs} s: {name}, peak of the last third"),
                value: last,
                unit,
                limit_name: "peak of the middle third".into(),
                limit: middle.max(1e-9),
                target: "no growth without bound (≤ 120 %)".into(),
                met: Some(last <= middle * 1.2 + 1.0),
            });
        }
    }
    println!("| time | rss MiB | fds | due queue | lag s | published | pending | inactive+exhausted |");
    println!("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    for s in samples.iter().filter(|s| s.at_s % 120 < 10) {
        println!(
            "| {} s | {:.1} | {} | {:.0} | {:.2} | {} | {:.0} | {:.0} |",
            s.at_s, s.rss_mib, s.fds, s.due_queue, s.lag_s, s.published, s.pending, s.inactive_or_exhausted
        );
    }
    report(&rows);
}
