//! Prometheus text metrics: what a person running herald watches, encoded by `prometheus-client`.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::atomic::{AtomicU16, AtomicU64, Ordering};
use std::sync::Mutex;

use herald_engine::{
    CacheStats, DispatchStats, Engine, EngineStatsSnapshot, HistogramSnapshot, RetentionStats, WriterStats,
    FLUSH_BUCKETS_US,
};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{
    prometheus_text, DescriptorEncoder, EncodeCounterValue, EncodeGaugeValue, MetricEncoder, NoLabelSet,
};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

/// Counters the server keeps itself (requests, refused connections); the engine's figures,
/// events published among them, are read at scrape time.
pub struct Metrics {
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
            connections_refused: Default::default(),
            known: (0..series).map(|_| StatusSlots::default()).collect(),
            others: Mutex::new(BTreeMap::new()),
        }
    }
}

impl Metrics {
    /// Metrics whose refused connections are counted in `refused` (shared with a listener).
    pub fn counting_refusals_into(refused: std::sync::Arc<AtomicU64>) -> Metrics {
        Metrics { connections_refused: refused, ..Metrics::default() }
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

    /// The exposition text (Prometheus text format 0.0.4), read from the engine at this moment.
    pub fn render(&self, engine: &Engine) -> String {
        let scrape = Scrape {
            refused: self.connections_refused.load(Ordering::Relaxed),
            dispatch: engine.dispatch_stats(),
            writer: engine.writer_stats(),
            engine: engine.stats(),
            now_ms: engine.now_ms(),
            // Read after the committed seq: a batch being flushed shows here first.
            committed: engine.committed_seq(),
            applied: engine.read(|t| herald_engine::applied_seq(t)).ok(),
            refusing_writes: engine.store_refusal().is_some(),
            cache: engine.read_cache_stats(),
            retention: engine.retention_stats(),
            deliveries: engine
                .read(|t| herald_engine::delivery_counts(t))
                .map(|counts| counts.into_iter().map(|(status, n)| (status.name(), n)).collect())
                .unwrap_or_default(),
            requests: self.request_series(),
        };
        scrape.text()
    }
}

/// Everything a scrape shows, read at one moment; encoded by `prometheus-client`, which escapes
/// help texts and label values.
#[derive(Debug)]
struct Scrape {
    refused: u64,
    dispatch: DispatchStats,
    writer: WriterStats,
    engine: EngineStatsSnapshot,
    now_ms: u64,
    committed: u64,
    /// `None`: the store failed the read (shown as NaN).
    applied: Option<u64>,
    refusing_writes: bool,
    cache: CacheStats,
    retention: RetentionStats,
    deliveries: Vec<(&'static str, u64)>,
    requests: BTreeMap<(String, String, u16), u64>,
}

impl Scrape {
    fn text(self) -> String {
        let mut registry = Registry::default();
        registry.register_collector(Box::new(self));
        let mut out = String::new();
        // Writing into a String cannot fail; the collector's own writes go to the same String.
        let _ = prometheus_text::encode(&mut out, &registry);
        out
    }
}

impl Collector for Scrape {
    fn encode(&self, mut e: DescriptorEncoder<'_>) -> fmt::Result {
        let e = &mut e;
        counter(e, "herald_events_published", "Events published (through the API or an embedder's Engine::publish), counted once durable, whether or not the client waited for the answer.", self.engine.events_published)?;
        counter(
            e,
            "herald_connections_refused",
            "Connections answered 503 at once because the cap on open connections was reached.",
            self.refused,
        )?;
        self.dispatch_gauges(e)?;
        self.log_metrics(e)?;
        self.store_metrics(e)?;
        self.attempt_counts(e)?;
        self.histograms(e)?;
        let mut m =
            e.encode_descriptor("herald_deliveries", "Deliveries by status.", None, MetricType::Gauge)?;
        for (status, n) in &self.deliveries {
            m.encode_family(&[("status", *status)])?.encode_gauge(n)?;
        }
        self.request_counts(e)?;
        let mut m = e.encode_descriptor(
            "herald_build_info",
            "The running herald's version (always 1).",
            None,
            MetricType::Gauge,
        )?;
        m.encode_family(&[("version", env!("CARGO_PKG_VERSION"))])?.encode_gauge(&1u64)
    }
}

/// An unlabelled counter; `name` without its `_total`, which the encoder appends.
fn counter(
    e: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    value: impl EncodeCounterValue,
) -> fmt::Result {
    e.encode_descriptor(name, help, None, MetricType::Counter)?
        .encode_counter::<NoLabelSet, _, u64>(&value, None)
}

/// An unlabelled gauge.
fn gauge(e: &mut DescriptorEncoder<'_>, name: &str, help: &str, value: impl EncodeGaugeValue) -> fmt::Result {
    e.encode_descriptor(name, help, None, MetricType::Gauge)?.encode_gauge(&value)
}

/// A histogram's buckets for the encoder: (upper bound in seconds, count), the last `+Inf`.
fn buckets(h: &HistogramSnapshot) -> Vec<(f64, u64)> {
    let bounds = h.bounds_us.iter().map(|&us| us as f64 / 1e6).chain([f64::INFINITY]);
    bounds.zip(h.counts.iter().copied()).collect()
}

/// Encodes `h` (durations in microseconds) as seconds.
fn histogram(m: &mut MetricEncoder<'_>, h: &HistogramSnapshot) -> fmt::Result {
    m.encode_histogram::<NoLabelSet>(h.sum_us as f64 / 1e6, h.count(), &buckets(h), None)
}

impl Scrape {
    /// The dispatcher's queue, lag, attempts in flight, parked and throttled deliveries.
    fn dispatch_gauges(&self, e: &mut DescriptorEncoder<'_>) -> fmt::Result {
        let d = &self.dispatch;
        let lag_s = d.oldest_due_ms.map_or(0.0, |t| self.now_ms.saturating_sub(t) as f64 / 1000.0);
        gauge(e, "herald_due_queue_length", "Deliveries in the in-memory due queue.", d.queued)?;
        gauge(e, "herald_delivery_lag_seconds", "Age of the oldest due delivery not yet attempted.", lag_s)?;
        gauge(e, "herald_attempts_in_flight", "Attempts in flight.", d.in_flight)?;
        gauge(e, "herald_deliveries_parked", "Due deliveries waiting for a busy endpoint.", d.parked)?;
        gauge(
            e,
            "herald_deliveries_throttled",
            "Due deliveries held for their endpoint's rate limit or Retry-After pause (pending, nothing recorded).",
            d.throttled,
        )
    }

    /// The log's durable seq, the projection's applied seq, and the writer's batches and flushes.
    fn log_metrics(&self, e: &mut DescriptorEncoder<'_>) -> fmt::Result {
        let w = &self.writer;
        gauge(e, "herald_log_committed_seq", "The last durable log seq.", self.committed)?;
        let applied_help = "The last log seq folded into the projection; ahead of the committed seq while a batch is being flushed.";
        match self.applied {
            Some(seq) => gauge(e, "herald_projection_applied_seq", applied_help, seq)?,
            None => gauge(e, "herald_projection_applied_seq", applied_help, f64::NAN)?,
        }
        counter(e, "herald_commit_batches", "Group-commit batches written.", w.batches)?;
        counter(e, "herald_commit_commands", "Commands committed.", w.commands)?;
        counter(e, "herald_commit_failed_batches", "Batches the store refused.", w.failed_batches)?;
        gauge(e, "herald_commit_last_batch_commands", "Commands in the last batch.", w.last_batch_commands)?;
        gauge(e, "herald_store_refusing_writes", "1 while the store refuses writes (a full disk): writes answer 503 until herald resumes by itself.", u64::from(self.refusing_writes))?;
        counter(
            e,
            "herald_flush_seconds",
            "Time spent flushing batches (divide by batches for the mean flush latency).",
            w.flush_us_total as f64 / 1e6,
        )?;
        gauge(
            e,
            "herald_flush_seconds_max",
            "The longest single flush since the process started: a disk stall shows here.",
            w.flush_us_max as f64 / 1e6,
        )
    }

    /// The store's read cache and retention's compactions and what they dropped.
    fn store_metrics(&self, e: &mut DescriptorEncoder<'_>) -> fmt::Result {
        let (c, r) = (&self.cache, &self.retention);
        counter(
            e,
            "herald_read_cache_hits",
            "Reads answered by the cache in front of the store (rows the dispatcher reads for each attempt).",
            c.hits,
        )?;
        counter(
            e,
            "herald_read_cache_misses",
            "Reads of cached kinds of rows that went to the store.",
            c.misses,
        )?;
        counter(e, "herald_read_cache_known_absent", "Reads of new event and delivery ids answered as absent from the ids kept since the store's last id, without a read.", c.known_absent)?;
        counter(e, "herald_retention_runs", "Compactions run ([store] retain).", r.runs)?;
        counter(
            e,
            "herald_retention_failures",
            "Compactions that failed (each is logged: retention pass failed).",
            r.failures,
        )?;
        counter(
            e,
            "herald_retention_records_dropped",
            "Log records dropped by retention.",
            r.records_dropped,
        )?;
        counter(
            e,
            "herald_retention_deliveries_dropped",
            "Delivered deliveries dropped by retention.",
            r.deliveries_dropped,
        )
    }

    /// `herald_attempts_total` by outcome.
    fn attempt_counts(&self, e: &mut DescriptorEncoder<'_>) -> fmt::Result {
        let d = &self.dispatch;
        let mut m = e.encode_descriptor(
            "herald_attempts",
            "Delivery attempts by outcome.",
            None,
            MetricType::Counter,
        )?;
        // local_fault: not made, a fault of this host (no descriptor, memory or local port).
        for (outcome, n) in [
            ("delivered", d.attempts_delivered),
            ("failed", d.attempts_failed),
            ("unrecorded", d.attempts_unrecorded),
            ("local_fault", d.attempts_local_faults),
        ] {
            m.encode_family(&[("outcome", outcome)])?.encode_counter::<NoLabelSet, _, u64>(&n, None)?;
        }
        counter(
            e,
            "herald_order_waits",
            "Due deliveries set aside behind an earlier pending one of their ordering key.",
            d.order_waits,
        )
    }

    /// Attempt duration by outcome, publish latency and flush duration (buckets: the engine's
    /// `ATTEMPT_BUCKETS_US`, `PUBLISH_BUCKETS_US`, the log's `FLUSH_BUCKETS_US`).
    fn histograms(&self, e: &mut DescriptorEncoder<'_>) -> fmt::Result {
        let mut m = e.encode_descriptor("herald_attempt_duration_seconds", "Recorded attempts, from the request's start to the receiver's answer or the error, by outcome (millisecond resolution).", None, MetricType::Histogram)?;
        for (kind, h) in &self.engine.attempt_durations {
            histogram(&mut m.encode_family(&[("outcome", kind.name())])?, h)?;
        }
        let mut m = e.encode_descriptor("herald_publish_duration_seconds", "Publishes, from the arrival of their HTTP request to their durable answer (body read, queue, group commit, flush).", None, MetricType::Histogram)?;
        histogram(&mut m, &self.engine.publish_durations)?;
        let flush = HistogramSnapshot {
            bounds_us: &FLUSH_BUCKETS_US,
            counts: self.writer.flush_us_buckets.to_vec(),
            sum_us: self.writer.flush_us_total,
        };
        let mut m = e.encode_descriptor(
            "herald_flush_duration_seconds",
            "Flushes (+ fsync under sync durability) of the log's batches.",
            None,
            MetricType::Histogram,
        )?;
        histogram(&mut m, &flush)
    }

    /// `herald_http_requests_total`, one line per (route, method, status).
    fn request_counts(&self, e: &mut DescriptorEncoder<'_>) -> fmt::Result {
        let mut m = e.encode_descriptor(
            "herald_http_requests",
            "HTTP requests by route and status.",
            None,
            MetricType::Counter,
        )?;
        for ((route, method, status), n) in &self.requests {
            let status = status.to_string();
            let labels =
                [("route", route.as_str()), ("method", method.as_str()), ("status", status.as_str())];
            m.encode_family(&labels)?.encode_counter::<NoLabelSet, _, u64>(n, None)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn series(m: &Metrics) -> Vec<(String, String, u16, u64)> {
        m.request_series().into_iter().map(|((r, me, s), n)| (r, me, s, n)).collect()
    }

    /// A scrape of an idle engine with `requests` counted.
    fn scrape(requests: BTreeMap<(String, String, u16), u64>) -> Scrape {
        Scrape {
            refused: 0,
            dispatch: DispatchStats::default(),
            writer: WriterStats::default(),
            engine: herald_engine::EngineStats::default().snapshot(),
            now_ms: 0,
            committed: 0,
            applied: None,
            refusing_writes: false,
            cache: CacheStats::default(),
            retention: RetentionStats::default(),
            deliveries: vec![("pending", 2)],
            requests,
        }
    }

    #[test]
    fn label_values_are_escaped() {
        let mut requests = BTreeMap::new();
        requests.insert(("/a\"b\\c\nd".to_owned(), "GET".to_owned(), 200), 3);
        let text = scrape(requests).text();
        assert!(
            text.contains(
                "herald_http_requests_total{route=\"/a\\\"b\\\\c\\nd\",method=\"GET\",status=\"200\"} 3\n"
            ),
            "{text}"
        );
        // Still one line per sample: the newline did not break the exposition.
        assert!(text.lines().all(|l| l.starts_with('#') || l.starts_with("herald_")), "{text}");
        assert!(text.contains("herald_deliveries{status=\"pending\"} 2\n"), "{text}");
        assert!(text.contains("herald_projection_applied_seq NaN\n"), "{text}");
    }

    #[test]
    fn histograms_are_cumulative_in_seconds_with_an_inf_bucket() {
        let stats = herald_engine::EngineStats::default();
        let mut s = scrape(BTreeMap::new());
        s.writer.flush_us_buckets[0] = 2;
        s.writer.flush_us_buckets[3] = 1;
        s.writer.flush_us_buckets[FLUSH_BUCKETS_US.len()] = 1;
        s.writer.flush_us_total = 2_000_150;
        s.engine = stats.snapshot();
        let text = s.text();
        for line in [
            "herald_flush_duration_seconds_bucket{le=\"0.0001\"} 2\n",
            "herald_flush_duration_seconds_bucket{le=\"0.00025\"} 2\n",
            "herald_flush_duration_seconds_bucket{le=\"0.001\"} 3\n",
            "herald_flush_duration_seconds_bucket{le=\"1\"} 3\n",
            "herald_flush_duration_seconds_bucket{le=\"+Inf\"} 4\n",
            "herald_flush_duration_seconds_sum 2.00015\n",
            "herald_flush_duration_seconds_count 4\n",
            "herald_attempt_duration_seconds_bucket{outcome=\"failed\",le=\"30\"} 0\n",
            "herald_publish_duration_seconds_bucket{le=\"0.0005\"} 0\n",
            "# TYPE herald_publish_duration_seconds histogram\n",
        ] {
            assert!(text.contains(line), "no {line} in {text}");
        }
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
