//! Prometheus text metrics: what a person running herald watches.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU16, AtomicU64, Ordering};
use std::sync::Mutex;

use herald_engine::{DispatchStats, Engine, WriterStats};

/// Counters the server keeps itself; the engine's figures are read at scrape time.
pub struct Metrics {
    published: AtomicU64,
    /// Connections answered 503 and closed because the cap on open connections was reached
    /// (counted by the listener, see [`crate::listener::CappedListener`]).
    pub connections_refused: std::sync::Arc<AtomicU64>,
    /// Requests of a known route label and method: per (route, method), a few status slots, so
    /// counting a request takes no lock and allocates nothing.
    known: Box<[StatusSlots]>,
    /// (route, method, status) → requests, for the rest: a route or method outside the static
    /// labels, or a (route, method) whose slots are all taken by other statuses.
    others: Mutex<BTreeMap<(String, String, u16), u64>>,
}

/// Distinct (route, method, status) series kept, at most (routes are matched paths, so this
/// only bounds a pathological spread of statuses).
const REQUEST_SERIES_MAX: usize = 4096;

/// The route label of a request no route matched.
pub const UNMATCHED: &str = "unmatched";

/// Every route label: the router's paths, each once, and [`UNMATCHED`].
static ROUTE_LABELS: std::sync::LazyLock<Vec<&'static str>> = std::sync::LazyLock::new(|| {
    let mut labels: Vec<&'static str> = Vec::new();
    for &(_, path) in crate::ROUTES {
        if !labels.contains(&path) {
            labels.push(path);
        }
    }
    labels.push(UNMATCHED);
    labels
});

/// The method labels counted without a lock (any other method is counted by name).
const METHOD_LABELS: [&str; 9] =
    ["GET", "POST", "PATCH", "DELETE", "PUT", "HEAD", "OPTIONS", "CONNECT", "TRACE"];

/// Distinct statuses counted without a lock per (route, method).
const STATUS_SLOTS: usize = 8;

/// Up to [`STATUS_SLOTS`] (status, requests) pairs; a slot's status is 0 while it is free.
#[derive(Default)]
struct StatusSlots([(AtomicU16, AtomicU64); STATUS_SLOTS]);

impl StatusSlots {
    /// Counts one request of `status`; false when every slot holds another status.
    fn count(&self, status: u16) -> bool {
        for (slot_status, n) in &self.0 {
            let mut current = slot_status.load(Ordering::Acquire);
            if current == 0 {
                current = match slot_status.compare_exchange(0, status, Ordering::AcqRel, Ordering::Acquire) {
                    Ok(_) => status,
                    Err(taken) => taken,
                };
            }
            if current == status {
                n.fetch_add(1, Ordering::Relaxed);
                return true;
            }
        }
        false
    }
}

/// The index of a route label, `None` for a path that is not one.
pub fn route_label(path: &str) -> Option<usize> {
    ROUTE_LABELS.iter().position(|&label| label == path)
}

/// The index of a method label, `None` for a method that is not one.
pub fn method_label(method: &str) -> Option<usize> {
    METHOD_LABELS.iter().position(|&label| label == method)
}

impl Default for Metrics {
    fn default() -> Self {
        let series = ROUTE_LABELS.len() * METHOD_LABELS.len();
        Metrics {
            published: AtomicU64::new(0),
            connections_refused: Default::default(),
            known: (0..series).map(|_| StatusSlots::default()).collect(),
            others: Mutex::new(BTreeMap::new()),
        }
    }
}

impl Metrics {
    pub fn published(&self) {
        self.published.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a request by its route label (the matched path, or [`UNMATCHED`]), method and status.
    pub fn request(&self, route: &str, method: &str, status: u16) {
        self.request_labelled(route_label(route), method_label(method), route, method, status);
    }

    /// [`Metrics::request`] with the labels' indexes already looked up ([`route_label`],
    /// [`method_label`]); `route` and `method` are only read when an index is `None`.
    pub fn request_labelled(
        &self,
        route_index: Option<usize>,
        method_index: Option<usize>,
        route: &str,
        method: &str,
        status: u16,
    ) {
        if let (Some(r), Some(m)) = (route_index, method_index) {
            // Status 0 marks a free slot; no response has it, but count it by name if one did.
            if status != 0 && self.known[r * METHOD_LABELS.len() + m].count(status) {
                return;
            }
        }
        let mut map = self.others.lock().unwrap_or_else(|e| e.into_inner());
        let key = (route.to_owned(), method.to_owned(), status);
        if map.len() + self.known.len() * STATUS_SLOTS >= REQUEST_SERIES_MAX && !map.contains_key(&key) {
            return;
        }
        *map.entry(key).or_default() += 1;
    }

    /// Every (route, method, status) series with its requests, in label order.
    fn request_series(&self) -> BTreeMap<(String, String, u16), u64> {
        let mut all = self.others.lock().unwrap_or_else(|e| e.into_inner()).clone();
        for (i, slots) in self.known.iter().enumerate() {
            let (route, method) =
                (ROUTE_LABELS[i / METHOD_LABELS.len()], METHOD_LABELS[i % METHOD_LABELS.len()]);
            for (status, n) in &slots.0 {
                let (status, n) = (status.load(Ordering::Acquire), n.load(Ordering::Relaxed));
                if status != 0 && n > 0 {
                    *all.entry((route.to_owned(), method.to_owned(), status)).or_default() += n;
                }
            }
        }
        all
    }

    /// The exposition text.
    pub fn render(&self, engine: &Engine) -> String {
        let mut out = String::new();
        let d = engine.dispatch_stats();
        let w = engine.writer_stats();
        let now = engine.now_ms();
        let published = self.published.load(Ordering::Relaxed).to_string();
        let refused = self.connections_refused.load(Ordering::Relaxed).to_string();
        write_rows(
            &mut out,
            &[
                ("herald_events_published_total", "counter", "Events published through the API.", published),
                (
                    "herald_connections_refused_total",
                    "counter",
                    "Connections answered 503 at once because the cap on open connections was reached.",
                    refused,
                ),
            ],
        );
        dispatch_gauges(&mut out, &d, now);
        log_metrics(&mut out, engine, &w);
        store_metrics(&mut out, engine);
        attempt_counts(&mut out, &d);
        delivery_counts(&mut out, engine);
        self.request_counts(&mut out);
        out
    }

    /// `herald_http_requests_total`, one line per (route, method, status).
    fn request_counts(&self, out: &mut String) {
        let _ = writeln!(out, "# HELP herald_http_requests_total HTTP requests by route and status.\n# TYPE herald_http_requests_total counter");
        for ((route, method, status), n) in self.request_series().iter() {
            let _ = writeln!(
                out,
                "herald_http_requests_total{{route=\"{}\",method=\"{method}\",status=\"{status}\"}} {n}",
                route.replace('"', "")
            );
        }
    }
}

/// Unlabelled metrics, one a row: name, type, help, value.
type Rows<const N: usize> = [(&'static str, &'static str, &'static str, String); N];

/// Writes each row as its help, its type and its value.
fn write_rows(out: &mut String, rows: &[(&str, &str, &str, String)]) {
    for (name, kind, help, value) in rows {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}");
    }
}

/// The dispatcher's queue, lag, attempts in flight, parked and throttled deliveries.
fn dispatch_gauges(out: &mut String, d: &DispatchStats, now: u64) {
    let lag_s = d.oldest_due_ms.map_or(0.0, |t| now.saturating_sub(t) as f64 / 1000.0);
    #[rustfmt::skip]
    let rows: Rows<5> = [
        ("herald_due_queue_length", "gauge", "Deliveries in the in-memory due queue.", d.queued.to_string()),
        ("herald_delivery_lag_seconds", "gauge", "Age of the oldest due delivery not yet attempted.", format!("{lag_s:.3}")),
        ("herald_attempts_in_flight", "gauge", "Attempts in flight.", d.in_flight.to_string()),
        ("herald_deliveries_parked", "gauge", "Due deliveries waiting for a busy endpoint.", d.parked.to_string()),
        ("herald_deliveries_throttled", "gauge", "Due deliveries held for their endpoint's rate limit or Retry-After pause (pending, nothing recorded).", d.throttled.to_string()),
    ];
    write_rows(out, &rows);
}

/// The log's durable seq, the projection's applied seq, and the writer's batches and flushes.
fn log_metrics(out: &mut String, engine: &Engine, w: &WriterStats) {
    let committed = engine.committed_seq().to_string();
    // Read after the committed seq: a batch being flushed shows here first.
    let applied =
        engine.read(|t| herald_engine::applied_seq(t)).map_or_else(|_| "NaN".to_owned(), |s| s.to_string());
    #[rustfmt::skip]
    let rows: Rows<9> = [
        ("herald_log_committed_seq", "gauge", "The last durable log seq.", committed),
        ("herald_projection_applied_seq", "gauge", "The last log seq folded into the projection; ahead of the committed seq while a batch is being flushed.", applied),
        ("herald_commit_batches_total", "counter", "Group-commit batches written.", w.batches.to_string()),
        ("herald_commit_commands_total", "counter", "Commands committed.", w.commands.to_string()),
        ("herald_commit_failed_batches_total", "counter", "Batches the store refused.", w.failed_batches.to_string()),
        ("herald_commit_last_batch_commands", "gauge", "Commands in the last batch.", w.last_batch_commands.to_string()),
        ("herald_store_refusing_writes", "gauge", "1 while the store refuses writes (a full disk): writes answer 503 until herald resumes by itself.", u8::from(engine.store_refusal().is_some()).to_string()),
        ("herald_flush_seconds_total", "counter", "Time spent flushing batches (divide by batches for the mean flush latency).", format!("{:.6}", w.flush_us_total as f64 / 1e6)),
        ("herald_flush_seconds_max", "gauge", "The longest single flush since the process started: a disk stall shows here.", format!("{:.6}", w.flush_us_max as f64 / 1e6)),
    ];
    write_rows(out, &rows);
}

/// The store's read cache and retention's compactions and what they dropped.
fn store_metrics(out: &mut String, engine: &Engine) {
    let (c, r) = (engine.read_cache_stats(), engine.retention_stats());
    #[rustfmt::skip]
    let rows: Rows<7> = [
        ("herald_read_cache_hits_total", "counter", "Reads answered by the cache in front of the store (rows the dispatcher reads for each attempt).", c.hits.to_string()),
        ("herald_read_cache_misses_total", "counter", "Reads of cached kinds of rows that went to the store.", c.misses.to_string()),
        ("herald_read_cache_known_absent_total", "counter", "Reads of new event and delivery ids answered as absent from the ids kept since the store's last id, without a read.", c.known_absent.to_string()),
        ("herald_retention_runs_total", "counter", "Compactions run ([store] retain).", r.runs.to_string()),
        ("herald_retention_failures_total", "counter", "Compactions that failed (each is written to stderr).", r.failures.to_string()),
        ("herald_retention_records_dropped_total", "counter", "Log records dropped by retention.", r.records_dropped.to_string()),
        ("herald_retention_deliveries_dropped_total", "counter", "Delivered deliveries dropped by retention.", r.deliveries_dropped.to_string()),
    ];
    write_rows(out, &rows);
}

/// `herald_attempts_total` by outcome.
fn attempt_counts(out: &mut String, d: &DispatchStats) {
    let _ = writeln!(
        out,
        "# HELP herald_attempts_total Delivery attempts by outcome.\n# TYPE herald_attempts_total counter"
    );
    let _ = writeln!(out, "herald_attempts_total{{outcome=\"delivered\"}} {}", d.attempts_delivered);
    let _ = writeln!(out, "herald_attempts_total{{outcome=\"failed\"}} {}", d.attempts_failed);
    let _ = writeln!(out, "herald_attempts_total{{outcome=\"unrecorded\"}} {}", d.attempts_unrecorded);
    // Not made: a fault of this host (no descriptor, memory or local port), not the receiver's.
    let _ = writeln!(out, "herald_attempts_total{{outcome=\"local_fault\"}} {}", d.attempts_local_faults);
    let _ = writeln!(
        out,
        "# HELP herald_order_waits_total Due deliveries set aside behind an earlier pending one of their \
         ordering key.\n# TYPE herald_order_waits_total counter\nherald_order_waits_total {}",
        d.order_waits
    );
}

/// `herald_deliveries` by status, as the projection counts them.
fn delivery_counts(out: &mut String, engine: &Engine) {
    let _ = writeln!(out, "# HELP herald_deliveries Deliveries by status.\n# TYPE herald_deliveries gauge");
    if let Ok(counts) = engine.read(|t| herald_engine::delivery_counts(t)) {
        for (status, n) in counts {
            let _ = writeln!(out, "herald_deliveries{{status=\"{}\"}} {n}", status.name());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn series(m: &Metrics) -> Vec<(String, String, u16, u64)> {
        m.request_series().into_iter().map(|((r, me, s), n)| (r, me, s, n)).collect()
    }

    #[test]
    fn every_route_of_the_router_has_a_static_label() {
        for &(method, path) in crate::ROUTES {
            assert!(route_label(path).is_some(), "{path}");
            assert!(method_label(&method.to_uppercase()).is_some(), "{method}");
        }
        assert!(route_label(UNMATCHED).is_some());
        assert_eq!(route_label("/v1/nothing"), None);
    }

    #[test]
    fn requests_are_counted_by_route_method_and_status_in_label_order() {
        let m = Metrics::default();
        for _ in 0..3 {
            m.request("/v1/events", "POST", 202);
        }
        m.request("/v1/events", "POST", 401);
        m.request("/v1/events/{id}", "GET", 404);
        m.request(UNMATCHED, "GET", 404);
        // Outside the static labels: counted by name.
        m.request("/v1/events", "BREW", 405);
        m.request("/not/a/route", "GET", 200);
        assert_eq!(
            series(&m),
            vec![
                ("/not/a/route".into(), "GET".into(), 200, 1),
                ("/v1/events".into(), "BREW".into(), 405, 1),
                ("/v1/events".into(), "POST".into(), 202, 3),
                ("/v1/events".into(), "POST".into(), 401, 1),
                ("/v1/events/{id}".into(), "GET".into(), 404, 1),
                (UNMATCHED.into(), "GET".into(), 404, 1),
            ]
        );
    }

    #[test]
    fn statuses_beyond_the_slots_are_still_counted() {
        let m = Metrics::default();
        let statuses: Vec<u16> = (200..200 + 2 * STATUS_SLOTS as u16).collect();
        for &s in &statuses {
            m.request("/v1/endpoints", "GET", s);
            m.request("/v1/endpoints", "GET", s);
        }
        let got = series(&m);
        assert_eq!(got.len(), statuses.len());
        for (&s, (route, method, status, n)) in statuses.iter().zip(got) {
            assert_eq!((route.as_str(), method.as_str(), status, n), ("/v1/endpoints", "GET", s, 2));
        }
    }

    #[test]
    fn concurrent_requests_are_all_counted() {
        let m = std::sync::Arc::new(Metrics::default());
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let m = m.clone();
                std::thread::spawn(move || {
                    for i in 0..1000u16 {
                        m.request("/v1/events", "POST", 200 + (i + t) % 12);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(series(&m).iter().map(|s| s.3).sum::<u64>(), 4000);
    }
}
