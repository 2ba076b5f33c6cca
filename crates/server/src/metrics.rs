//! Prometheus text metrics: what a person running herald watches.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use herald_engine::Engine;

/// Counters the server keeps itself; the engine's figures are read at scrape time.
#[derive(Default)]
pub struct Metrics {
    published: AtomicU64,
    /// (route, method, status) → requests.
    requests: Mutex<BTreeMap<(String, String, u16), u64>>,
}

/// Distinct (route, method, status) series kept, at most (routes are matched paths, so this
/// only bounds a pathological spread of statuses).
const REQUEST_SERIES_MAX: usize = 4096;

impl Metrics {
    pub fn published(&self) {
        self.published.fetch_add(1, Ordering::Relaxed);
    }

    pub fn request(&self, route: &str, method: &str, status: u16) {
        let mut map = self.requests.lock().unwrap_or_else(|e| e.into_inner());
        let key = (route.to_owned(), method.to_owned(), status);
        if map.len() >= REQUEST_SERIES_MAX && !map.contains_key(&key) {
            return;
        }
        *map.entry(key).or_default() += 1;
    }

    /// The exposition text.
    pub fn render(&self, engine: &Engine) -> String {
        let mut out = String::new();
        let d = engine.dispatch_stats();
        let w = engine.writer_stats();
        let now = engine.now_ms();
        let mut metric = |name: &str, kind: &str, help: &str, value: String| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}");
        };
        metric(
            "herald_events_published_total",
            "counter",
            "Events published through the API.",
            self.published.load(Ordering::Relaxed).to_string(),
        );
        metric(
            "herald_due_queue_length",
            "gauge",
            "Deliveries in the in-memory due queue.",
            d.queued.to_string(),
        );
        let lag_s = d.oldest_due_ms.map_or(0.0, |t| now.saturating_sub(t) as f64 / 1000.0);
        metric(
            "herald_delivery_lag_seconds",
            "gauge",
            "Age of the oldest due delivery not yet attempted.",
            format!("{lag_s:.3}"),
        );
        metric("herald_attempts_in_flight", "gauge", "Attempts in flight.", d.in_flight.to_string());
        metric(
            "herald_deliveries_parked",
            "gauge",
            "Due deliveries waiting for a busy endpoint.",
            d.parked.to_string(),
        );
        metric(
            "herald_log_committed_seq",
            "gauge",
            "The last durable log seq.",
            engine.committed_seq().to_string(),
        );
        metric(
            "herald_commit_batches_total",
            "counter",
            "Group-commit batches written.",
            w.batches.to_string(),
        );
        metric("herald_commit_commands_total", "counter", "Commands committed.", w.commands.to_string());
        metric(
            "herald_commit_failed_batches_total",
            "counter",
            "Batches the store refused.",
            w.failed_batches.to_string(),
        );
        metric(
            "herald_commit_last_batch_commands",
            "gauge",
            "Commands in the last batch.",
            w.last_batch_commands.to_string(),
        );
        metric(
            "herald_store_refusing_writes",
            "gauge",
            "1 while the last batch failed to commit (a full disk): writes answer 503.",
            u8::from(w.last_batch_failed).to_string(),
        );
        metric(
            "herald_flush_seconds_total",
            "counter",
            "Time spent flushing batches (divide by batches for the mean flush latency).",
            format!("{:.6}", w.flush_us_total as f64 / 1e6),
        );
        let _ = writeln!(out, "# HELP herald_attempts_total Delivery attempts by outcome.\n# TYPE herald_attempts_total counter");
        let _ = writeln!(out, "herald_attempts_total{{outcome=\"delivered\"}} {}", d.attempts_delivered);
        let _ = writeln!(out, "herald_attempts_total{{outcome=\"failed\"}} {}", d.attempts_failed);
        let _ = writeln!(out, "herald_attempts_total{{outcome=\"unrecorded\"}} {}", d.attempts_unrecorded);
        let _ =
            writeln!(out, "# HELP herald_deliveries Deliveries by status.\n# TYPE herald_deliveries gauge");
        if let Ok(counts) = herald_projector::delivery_counts(&engine.tables()) {
            for (status, n) in counts {
                let _ = writeln!(out, "herald_deliveries{{status=\"{}\"}} {n}", status.name());
            }
        }
        let _ = writeln!(out, "# HELP herald_http_requests_total HTTP requests by route and status.\n# TYPE herald_http_requests_total counter");
        let map = self.requests.lock().unwrap_or_else(|e| e.into_inner());
        for ((route, method, status), n) in map.iter() {
            let _ = writeln!(
                out,
                "herald_http_requests_total{{route=\"{}\",method=\"{method}\",status=\"{status}\"}} {n}",
                route.replace('"', "")
            );
        }
        out
    }
}
