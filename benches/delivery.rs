//! Delivery figures (issue 3), each beside a limit measured in the same run against the same
//! in-process receiver (a hyper 1 keep-alive server on 127.0.0.1 answering 204):
//! - deliveries/s from publish to 2xx (and to `delivered` in the projection), `sync` and `flush`,
//!   beside the raw request rate of the same client (`HttpSender`, same pool settings) at the same
//!   concurrency (64 requests in flight), measured right before and right after each burst (the
//!   limit is the mean of the two: this shared machine's speed drifts between runs);
//! - publish-to-receipt latency p50/p99 at a paced 1,000 events/s, beside its floor: the mean raw
//!   sled commit of one record (same durability) plus the raw `HttpSender` request latency at the
//!   same pace;
//! - retrigger-to-receipt latency p50/p99 of exhausted deliveries, paced, beside the same floor;
//! - beside a rate-limited endpoint (issue 21): the unconstrained endpoint's deliveries/s in the
//!   same burst, beside the raw limit, and the limited endpoint's steady attempts/s at its receiver,
//!   beside its configured rate.
//! - ordered delivery (issue 21): deliveries/s of a burst over a few hundred ordering keys to a
//!   `per_key` endpoint, beside the same burst to an unconstrained endpoint in the same run, and
//!   the store writes per delivery of each (what ordering costs the writer).
//!
//! Under the table, notes give the timing counters that say what bounds each figure: the writer's
//! batches and flush time, and CPU seconds per thread (from /proc) with the whole machine's, since
//! the machine is shared.
//!
//! Run: `cargo bench --bench delivery`. Prints a table; `--json FILE` also writes JSON;
//! `--only burst|paced|retrigger|throttle|ordered` runs one part. `HERALD_BENCH_DELIVERY_EVENTS` sets the burst
//! size (default 20,000).

mod common;

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{cpu_now, Row};
use herald_engine::sender::{AttemptRequest, HttpSender, Sender, SenderConfig};
use herald_engine::{Actor, Command, DeliverySettingsPatch, Engine, EngineConfig, Reply};
use herald_log::baseline::raw_sled_batches;
use herald_log::{Durability, LogConfig};
use herald_projector::{
    DeliveryId, DeliveryIndex, DeliveryOrder, DeliveryQuery, DeliveryStatus, EndpointId, EventId, OrgId,
    Policy,
};
use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use uuid::Uuid;

/// Attempts in flight: herald's per-endpoint limit in the figures, and the raw client's tasks.
const CONCURRENCY: usize = 64;
const PAYLOAD_BYTES: usize = 256;
/// How long each raw measurement runs: one right before and one right after each burst, since
/// this machine's speed drifts over tens of seconds (the limit is their mean).
const RAW_FOR: Duration = Duration::from_millis(1_500);
const PACED_PER_S: u64 = 1_000;
const PACED_FOR: Duration = Duration::from_secs(5);
const WARMUP_EVENTS: u64 = 300;
/// Deliveries made to fail into `exhausted` and then retriggered, paced.
const RETRIGGERED: u64 = 300;
const RETRIGGER_PER_S: u64 = 200;
/// Worker threads of the raw client's runtime: the dispatcher's default.
const CLIENT_WORKERS: usize = 2;
const WAIT_MAX: Duration = Duration::from_secs(60);

// ---------------------------------------------------------------------------------------------
// The receiver

/// What the receiver saw, shared with the bench.
struct Seen {
    base: Instant,
    requests: AtomicU64,
    /// Answer 500 instead of 204.
    fail: AtomicBool,
    /// `webhook-id` and receipt time (ns since `base`) of every request.
    receipts: Mutex<Vec<(String, u64)>>,
}

impl Seen {
    fn now_ns(&self) -> u64 {
        self.base.elapsed().as_nanos() as u64
    }

    /// Forgets what was seen so far.
    fn reset(&self) {
        self.receipts.lock().unwrap().clear();
        self.requests.store(0, Ordering::SeqCst);
    }

    fn take(&self) -> Vec<(String, u64)> {
        std::mem::take(&mut *self.receipts.lock().unwrap())
    }

    /// Waits until `n` requests arrived; false on timeout.
    fn wait_for(&self, n: u64) -> bool {
        let deadline = Instant::now() + WAIT_MAX;
        while self.requests.load(Ordering::SeqCst) < n {
            if Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_micros(500));
        }
        true
    }
}

struct Receiver {
    addr: SocketAddr,
    seen: Arc<Seen>,
    _runtime: tokio::runtime::Runtime,
}

async fn receive(seen: Arc<Seen>, req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let at = seen.now_ns();
    let id = req.headers().get("webhook-id").and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
    let _ = req.into_body().collect().await;
    let status = if seen.fail.load(Ordering::Relaxed) {
        StatusCode::INTERNAL_SERVER_ERROR
    } else {
        StatusCode::NO_CONTENT
    };
    seen.receipts.lock().unwrap().push((id, at));
    seen.requests.fetch_add(1, Ordering::SeqCst);
    let mut response = Response::new(Full::new(Bytes::new()));
    *response.status_mut() = status;
    Ok(response)
}

fn start_receiver(base: Instant) -> Receiver {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("bench-receiver")
        .enable_all()
        .build()
        .unwrap();
    let seen = Arc::new(Seen {
        base,
        requests: AtomicU64::new(0),
        fail: AtomicBool::new(false),
        receipts: Mutex::new(Vec::with_capacity(1 << 16)),
    });
    let listener = runtime.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).unwrap();
    let addr = listener.local_addr().unwrap();
    let accept_seen = seen.clone();
    runtime.spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { continue };
            let _ = stream.set_nodelay(true);
            let seen = accept_seen.clone();
            tokio::spawn(async move {
                let service = service_fn(move |req| receive(seen.clone(), req));
                let _ = hyper::server::conn::http1::Builder::new()
                    .keep_alive(true)
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    Receiver { addr, seen, _runtime: runtime }
}

// ---------------------------------------------------------------------------------------------
// The limits: the same client, alone

fn payload() -> Vec<u8> {
    let mut p = br#"{"call_id":"0190d7a0-0000-7000-8000-000000000000","data":""#.to_vec();
    p.resize(PAYLOAD_BYTES - 2, b'x');
    p.extend_from_slice(b"\"}");
    p
}

/// The same sender `Engine::open` builds for `config` (private targets allowed, same pool).
fn sender_like_engine(config: &EngineConfig) -> HttpSender {
    HttpSender::new(SenderConfig {
        timeout: config.delivery.timeout,
        allow_private_targets: true,
        retry_after_max_ms: config.delivery.retry_after_max.as_millis() as u64,
        pool_idle_per_host_max: config.delivery.max_in_flight_per_endpoint.max(1),
        ..SenderConfig::default()
    })
    .unwrap()
}

/// A request shaped like herald's attempts (same headers, same body size).
fn raw_request(url: &str, n: u64) -> AttemptRequest {
    let id = Uuid::from_u128(n as u128).hyphenated().to_string();
    let headers = vec![
        ("content-type".to_owned(), "application/json".to_owned()),
        ("webhook-id".to_owned(), id.clone()),
        ("webhook-timestamp".to_owned(), "1700000000".to_owned()),
        ("webhook-signature".to_owned(), "v1,K5oZfzN95Z9UVu1EsfQmfVNQhnkZ2pj9o9NDN/H/pI4=".to_owned()),
        ("herald-delivery-id".to_owned(), id),
        ("herald-event-type".to_owned(), "call.queued".to_owned()),
        ("herald-attempt".to_owned(), "1".to_owned()),
    ];
    AttemptRequest { url: url.to_owned(), headers, body: Bytes::from(payload()) }
}

fn client_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(CLIENT_WORKERS)
        .thread_name("bench-client")
        .enable_all()
        .build()
        .unwrap()
}

/// Requests/s of `concurrency` tasks each sending back to back through one shared sender.
fn raw_rate(receiver: &Receiver, config: &EngineConfig, concurrency: usize) -> (f64, String) {
    let rt = client_runtime();
    let cpu_before = std::cell::Cell::new(None);
    let sender = Arc::new(sender_like_engine(config));
    let url = format!("http://{}/hook", receiver.addr);
    let rate = rt.block_on(async {
        let run = |for_: Duration| {
            let started = Instant::now();
            let tasks: Vec<_> = (0..concurrency)
                .map(|t| {
                    let (sender, url) = (sender.clone(), url.clone());
                    tokio::spawn(async move {
                        let mut n = 0u64;
                        while started.elapsed() < for_ {
                            let outcome = sender.send(raw_request(&url, (t as u64) << 32 | n)).await;
                            assert!(outcome.is_success(), "raw request failed: {outcome:?}");
                            n += 1;
                        }
                        n
                    })
                })
                .collect();
            async move {
                let mut total = 0;
                for t in tasks {
                    total += t.await.unwrap();
                }
                total as f64 / started.elapsed().as_secs_f64()
            }
        };
        run(Duration::from_millis(300)).await; // connections made, pool warm
        cpu_before.set(Some(cpu_now()));
        run(RAW_FOR).await
    });
    let cpu = cpu_now().since(
        &cpu_before.take().unwrap_or_default(),
        (rate * RAW_FOR.as_secs_f64()) as u64,
        "request",
    );
    receiver.seen.reset();
    (rate, cpu)
}

/// The mean time (ms) of one raw sled commit of one record (apply_batch + flush, + fsync for
/// Sync), on a fresh database configured like the log's: the floor of a publish's durability.
fn raw_commit_ms(durability: Durability) -> f64 {
    let dir = tempfile::tempdir().unwrap();
    let n = 300;
    let took = raw_sled_batches(&dir.path().join("raw"), n, 1, PAYLOAD_BYTES, durability).unwrap();
    took.as_secs_f64() * 1e3 / n as f64
}

/// Latency (ns) of single requests through the same sender, paced at `per_s`.
fn raw_latencies(receiver: &Receiver, config: &EngineConfig, per_s: u64, n: u64) -> Vec<u64> {
    let rt = client_runtime();
    let sender = sender_like_engine(config);
    let url = format!("http://{}/hook", receiver.addr);
    let seen = receiver.seen.clone();
    let out = rt.block_on(async {
        let interval = Duration::from_nanos(1_000_000_000 / per_s);
        let mut latencies = Vec::with_capacity(n as usize);
        let started = tokio::time::Instant::now();
        for i in 0..(n + WARMUP_EVENTS) {
            tokio::time::sleep_until(started + interval * i as u32).await;
            let before = seen.now_ns();
            let outcome = sender.send(raw_request(&url, i)).await;
            assert!(outcome.is_success());
            if i >= WARMUP_EVENTS {
                // The receipt time, as for herald: the receiver's clock when the request arrived.
                let at = seen.receipts.lock().unwrap().last().map_or(before, |r| r.1);
                latencies.push(at.saturating_sub(before));
            }
        }
        latencies
    });
    receiver.seen.reset();
    out
}

// ---------------------------------------------------------------------------------------------
// herald

struct Herald {
    engine: Engine,
    org: OrgId,
    _dir: tempfile::TempDir,
}

fn engine_config(dir: &std::path::Path, durability: Durability, policy: Policy) -> EngineConfig {
    let mut config = EngineConfig {
        data_dir: dir.to_path_buf(),
        durability,
        // `Engine::open` takes the writer's durability from `log`, not from `durability`.
        log: LogConfig { durability, ..LogConfig::default() },
        policy,
        ..EngineConfig::default()
    };
    config.delivery.allow_private_targets = true;
    config.delivery.max_in_flight_per_endpoint = CONCURRENCY;
    config.delivery.max_in_flight_total = config.delivery.max_in_flight_total.max(CONCURRENCY);
    config.delivery.shutdown_timeout = Duration::from_secs(2);
    config
}

fn open_herald(receiver: &Receiver, durability: Durability, policy: Policy) -> Herald {
    open_herald_with(receiver, durability, policy, DeliverySettingsPatch::default())
}

/// [`open_herald`] whose endpoint has `settings`.
fn open_herald_with(
    receiver: &Receiver,
    durability: Durability,
    policy: Policy,
    settings: DeliverySettingsPatch,
) -> Herald {
    let dir = tempfile::tempdir().unwrap();
    let engine = Engine::open(engine_config(dir.path(), durability, policy)).unwrap();
    let org = OrgId(Uuid::now_v7());
    let created = engine
        .execute_blocking(
            actor(org),
            Command::CreateEndpoint {
                id: EndpointId(Uuid::now_v7()),
                org_id: org,
                url: format!("http://{}/hook", receiver.addr),
                name: "bench receiver".into(),
                enabled_events: vec!["*".into()],
                secret: None,
                settings,
            },
        )
        .unwrap();
    assert!(matches!(created, Reply::Endpoint { .. }));
    Herald { engine, org, _dir: dir }
}

fn actor(org: OrgId) -> Actor {
    Actor { org_id: Some(org), key_id: None }
}

/// Event ids carry the phase in the high half and the index in the low half, so the receiver's
/// `webhook-id` maps back to the publish.
fn event_id(phase: u64, i: u64) -> EventId {
    EventId(Uuid::from_u128((phase as u128) << 64 | i as u128))
}

fn index_of(webhook_id: &str, phase: u64) -> Option<u64> {
    let n = Uuid::parse_str(webhook_id).ok()?.as_u128();
    ((n >> 64) as u64 == phase).then_some(n as u64)
}

fn publish_command(org: OrgId, id: EventId, payload: &[u8]) -> Command {
    Command::Publish {
        id,
        org_id: org,
        event_type: "call.queued".into(),
        payload: payload.to_vec(),
        call_id: None,
        webhook_url: None,
        idempotency_key: None,
        ordering_key: None,
    }
}

fn count_status(h: &Herald, status: DeliveryStatus, stop_at: usize) -> usize {
    let query = DeliveryQuery::all(DeliveryIndex::OrgStatus(h.org, status));
    let (mut cursor, mut n) = (None, 0);
    loop {
        let page = h.engine.deliveries(&query, cursor, 1000).unwrap();
        n += page.items.len();
        match page.next {
            Some(next) if n < stop_at => cursor = Some(next),
            _ => return n,
        }
    }
}

fn deliveries_with(h: &Herald, status: DeliveryStatus) -> Vec<(DeliveryId, EventId)> {
    let query = DeliveryQuery::all(DeliveryIndex::OrgStatus(h.org, status));
    let (mut cursor, mut out) = (None, Vec::new());
    loop {
        let page = h.engine.deliveries(&query, cursor, 1000).unwrap();
        out.extend(page.items.iter().map(|d| (d.id, d.event_id)));
        match page.next {
            Some(next) => cursor = Some(next),
            None => return out,
        }
    }
}

struct Burst {
    /// Publish start to the receiver's last first-receipt, s.
    to_receipt_s: f64,
    /// Publish start to no delivery `pending` in the projection, s.
    to_delivered_s: f64,
    /// Publish start to every publish acknowledged (durable), s.
    to_acked_s: f64,
    duplicates: usize,
    /// Events that reached the receiver before the last publish was acknowledged.
    during_publish: u64,
    batch_avg: f64,
    batches: u64,
    /// Store keys (records, projection rows, meta) put or deleted per delivery.
    writes_per_delivery: f64,
    /// Store keys per writer batch, on average.
    writes_per_batch: f64,
    /// Time the writer spent in flush (+ fsync), s.
    flush_s: f64,
    refills: u64,
    cpu: String,
}

/// What sled alone allows the writer: raw `apply_batch` + flush of batches as large as the
/// writer's (in keys), in the same run, divided by the keys the writer wrote per delivery.
fn sled_ceiling(durability: Durability, b: &Burst) -> String {
    let dir = tempfile::tempdir().unwrap();
    let batch_len = (b.writes_per_batch.round() as usize).max(1);
    let batches = (200_000 / batch_len).max(1);
    let took = raw_sled_batches(&dir.path().join("raw"), batches, batch_len, 200, durability).unwrap();
    let keys_per_s = (batches * batch_len) as f64 / took.as_secs_f64();
    format!(
        "{durability:?} store writes: {:.1} keys put or deleted per delivery (batches of {batch_len}); \
         raw sled apply_batch + flush of {batch_len}-key batches in this run: {keys_per_s:.0} keys/s, \
         so sled alone allows the single writer {:.0} deliveries/s",
        b.writes_per_delivery,
        keys_per_s / b.writes_per_delivery.max(1.0)
    )
}

/// Publishes `n` events from `threads` threads as fast as `submit_with` takes them and times
/// their delivery.
fn burst(receiver: &Receiver, durability: Durability, n: u64, threads: u64) -> Burst {
    let h = open_herald(receiver, durability, Policy::default());
    let seen = receiver.seen.clone();
    // A few deliveries first, so the pool holds its connections as it would in steady state.
    for i in 0..WARMUP_EVENTS {
        h.engine.execute_blocking(actor(h.org), publish_command(h.org, event_id(9, i), &payload())).unwrap();
    }
    assert!(seen.wait_for(WARMUP_EVENTS), "warm-up deliveries did not arrive");
    while count_status(&h, DeliveryStatus::Pending, 1) > 0 {
        std::thread::sleep(Duration::from_millis(1));
    }
    seen.reset();
    let batches_before = h.engine.writer_stats();
    let cpu_before = cpu_now();

    let acked = Arc::new(AtomicU64::new(0));
    let acked_at = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let body = payload();
    let started_ns = seen.now_ns();
    let publishers: Vec<_> = (0..threads)
        .map(|t| {
            let (engine, org, body) = (h.engine.clone(), h.org, body.clone());
            let (acked, acked_at, failed, seen) =
                (acked.clone(), acked_at.clone(), failed.clone(), seen.clone());
            std::thread::Builder::new()
                .name("bench-publish".into())
                .spawn(move || {
                    for i in (t..n).step_by(threads as usize) {
                        let (acked, acked_at, failed, seen) =
                            (acked.clone(), acked_at.clone(), failed.clone(), seen.clone());
                        engine.submit_with(
                            actor(org),
                            publish_command(org, event_id(1, i), &body),
                            move |r| {
                                if r.is_err() {
                                    failed.fetch_add(1, Ordering::Relaxed);
                                }
                                if acked.fetch_add(1, Ordering::SeqCst) + 1 == n {
                                    acked_at.store(seen.now_ns(), Ordering::SeqCst);
                                }
                            },
                        );
                    }
                })
                .unwrap()
        })
        .collect();
    for p in publishers {
        p.join().unwrap();
    }
    assert!(seen.wait_for(n), "the receiver got {} of {n}", seen.requests.load(Ordering::SeqCst));
    loop {
        if count_status(&h, DeliveryStatus::Pending, 1) == 0 {
            break;
        }
        std::thread::sleep(Duration::from_micros(500));
    }
    let delivered_ns = seen.now_ns();
    assert_eq!(failed.load(Ordering::SeqCst), 0, "publishes failed");
    let receipts = seen.take();
    let mut first: HashMap<u64, u64> = HashMap::with_capacity(n as usize);
    for (id, at) in &receipts {
        if let Some(i) = index_of(id, 1) {
            first.entry(i).and_modify(|t| *t = (*t).min(*at)).or_insert(*at);
        }
    }
    assert_eq!(first.len() as u64, n, "every event reached the receiver");
    let last_ns = first.values().copied().max().unwrap();
    let acked_ns = acked_at.load(Ordering::SeqCst);
    let during_publish = first.values().filter(|at| **at <= acked_ns).count() as u64;
    let delivered = count_status(&h, DeliveryStatus::Delivered, usize::MAX);
    assert_eq!(delivered as u64, n + WARMUP_EVENTS, "every delivery is delivered in the projection");
    let stats = h.engine.writer_stats();
    let batches = stats.batches - batches_before.batches;
    let batch_avg = (stats.commands - batches_before.commands) as f64 / batches.max(1) as f64;
    let flush_s = (stats.flush_us_total - batches_before.flush_us_total) as f64 / 1e6;
    let store_writes = (stats.store_writes - batches_before.store_writes) as f64;
    let refills = h.engine.dispatch_stats().refills;
    let cpu = cpu_now().since(&cpu_before, n, "delivery");
    h.engine.shutdown();
    seen.reset();
    let s = |ns: u64| ns.saturating_sub(started_ns) as f64 / 1e9;
    Burst {
        to_receipt_s: s(last_ns),
        to_delivered_s: s(delivered_ns),
        to_acked_s: s(acked_ns),
        during_publish,
        duplicates: receipts.len() - first.len(),
        writes_per_delivery: store_writes / n as f64,
        writes_per_batch: store_writes / batches.max(1) as f64,
        batch_avg,
        batches,
        flush_s,
        refills,
        cpu,
    }
}

/// Publish-to-receipt latencies (ns) at a paced `per_s`, one publishing thread.
fn paced(receiver: &Receiver, durability: Durability, per_s: u64, n: u64) -> (Vec<u64>, String) {
    let h = open_herald(receiver, durability, Policy::default());
    let seen = receiver.seen.clone();
    let body = payload();
    let interval = Duration::from_nanos(1_000_000_000 / per_s);
    let mut before = vec![0u64; (n + WARMUP_EVENTS) as usize];
    let cpu_before = cpu_now();
    let writer_before = h.engine.writer_stats();
    let started = Instant::now();
    for i in 0..(n + WARMUP_EVENTS) {
        let due = started + interval * i as u32;
        let now = Instant::now();
        if due > now {
            std::thread::sleep(due - now);
        }
        before[i as usize] = seen.now_ns();
        h.engine.submit_with(actor(h.org), publish_command(h.org, event_id(2, i), &body), |r| {
            r.unwrap();
        });
    }
    assert!(seen.wait_for(n + WARMUP_EVENTS), "paced deliveries did not all arrive");
    let w = h.engine.writer_stats();
    let batches = (w.batches - writer_before.batches).max(1);
    let cpu = format!(
        "writer: {batches} batches of {:.1} commands, {:.2} ms in flush per batch, the longest flush \
         {:.1} ms; {}",
        (w.commands - writer_before.commands) as f64 / batches as f64,
        (w.flush_us_total - writer_before.flush_us_total) as f64 / 1e3 / batches as f64,
        w.flush_us_max as f64 / 1e3,
        cpu_now().since(&cpu_before, n + WARMUP_EVENTS, "delivery")
    );
    h.engine.shutdown();
    let latencies = first_receipt_latencies(&seen.take(), 2, &before, WARMUP_EVENTS);
    seen.reset();
    (latencies, cpu)
}

/// For each index at or above `skip`: its first receipt minus `before[index]`.
fn first_receipt_latencies(receipts: &[(String, u64)], phase: u64, before: &[u64], skip: u64) -> Vec<u64> {
    let mut first: HashMap<u64, u64> = HashMap::new();
    for (id, at) in receipts {
        if let Some(i) = index_of(id, phase) {
            first.entry(i).and_modify(|t| *t = (*t).min(*at)).or_insert(*at);
        }
    }
    first
        .into_iter()
        .filter(|(i, _)| *i >= skip)
        .map(|(i, at)| at.saturating_sub(before[i as usize]))
        .collect()
}

/// Retrigger-to-receipt latencies (ns): `n` deliveries fail into `exhausted` (a 1-entry retry
/// schedule, a receiver answering 500), then are retriggered one at a time at `per_s`.
fn retriggered(receiver: &Receiver, durability: Durability, n: u64, per_s: u64) -> Vec<u64> {
    let policy = Policy { retry_schedule_ms: vec![1], failures_max: 1_000, ..Policy::default() };
    assert!(2 * n < 1_000, "the endpoint must not become inactive");
    let h = open_herald(receiver, durability, policy);
    let seen = receiver.seen.clone();
    seen.fail.store(true, Ordering::SeqCst);
    let body = payload();
    for i in 0..n {
        h.engine.submit_with(actor(h.org), publish_command(h.org, event_id(3, i), &body), |r| {
            r.unwrap();
        });
    }
    let deadline = Instant::now() + WAIT_MAX;
    while count_status(&h, DeliveryStatus::Exhausted, usize::MAX) < n as usize {
        assert!(Instant::now() < deadline, "deliveries did not become exhausted");
        std::thread::sleep(Duration::from_millis(5));
    }
    seen.fail.store(false, Ordering::SeqCst);
    seen.reset();
    let mut exhausted = deliveries_with(&h, DeliveryStatus::Exhausted);
    exhausted.sort_by_key(|(_, e)| *e.as_bytes());
    let mut before = vec![0u64; n as usize];
    let interval = Duration::from_nanos(1_000_000_000 / per_s);
    let started = Instant::now();
    for (k, (delivery_id, event)) in exhausted.iter().enumerate() {
        let due = started + interval * k as u32;
        let now = Instant::now();
        if due > now {
            std::thread::sleep(due - now);
        }
        let i = index_of(&event.to_string(), 3).unwrap();
        before[i as usize] = seen.now_ns();
        h.engine.submit_with(actor(h.org), Command::Retrigger { delivery_id: *delivery_id }, |r| {
            r.unwrap();
        });
    }
    assert!(seen.wait_for(n), "retriggered deliveries did not all arrive");
    h.engine.shutdown();
    let latencies = first_receipt_latencies(&seen.take(), 3, &before, 0);
    seen.reset();
    latencies
}

/// The rate limit of the limited endpoint beside the unconstrained one.
const RATE_LIMITED_PER_S: u32 = 1_000;
/// Receipts at the limited endpoint the bench waits for, at most: its burst and 3 s of its rate.
const RATE_LIMITED_RECEIPTS_MAX: u64 = RATE_LIMITED_PER_S as u64 * 4;

struct BesideLimit {
    /// The unconstrained endpoint: every event received, events/s from the first publish.
    unconstrained_per_s: f64,
    /// The limited endpoint: attempts/s at its receiver past its burst.
    limited_per_s: f64,
    limited_receipts: usize,
    /// Deliveries the dispatcher held for the rate limit when the unconstrained endpoint had all.
    held: u64,
}

/// One herald with two endpoints for every event: the unconstrained one at `receiver` and one
/// limited to `RATE_LIMITED_PER_S` at `limited`. Publishes `n` events as fast as `submit_with`
/// takes them, and times both.
fn beside_a_rate_limit(
    receiver: &Receiver,
    limited: &Receiver,
    durability: Durability,
    n: u64,
) -> BesideLimit {
    let h = open_herald(receiver, durability, Policy::default());
    let (seen, limited_seen) = (receiver.seen.clone(), limited.seen.clone());
    for i in 0..WARMUP_EVENTS {
        h.engine.execute_blocking(actor(h.org), publish_command(h.org, event_id(9, i), &payload())).unwrap();
    }
    assert!(seen.wait_for(WARMUP_EVENTS), "warm-up deliveries did not arrive");
    seen.reset();
    let settings =
        DeliverySettingsPatch { rate_limit_per_s: Some(Some(RATE_LIMITED_PER_S)), ..Default::default() };
    let command = Command::CreateEndpoint {
        id: EndpointId(Uuid::now_v7()),
        org_id: h.org,
        url: format!("http://{}/limited", limited.addr),
        name: "rate-limited bench receiver".into(),
        enabled_events: vec!["*".into()],
        secret: None,
        settings,
    };
    assert!(matches!(h.engine.execute_blocking(actor(h.org), command), Ok(Reply::Endpoint { .. })));
    let body = payload();
    let started_ns = seen.now_ns();
    for i in 0..n {
        h.engine.submit_with(actor(h.org), publish_command(h.org, event_id(4, i), &body), |r| {
            r.unwrap();
        });
    }
    assert!(
        seen.wait_for(n),
        "the unconstrained receiver got {} of {n}",
        seen.requests.load(Ordering::SeqCst)
    );
    let held = h.engine.dispatch_stats().throttled;
    let unconstrained_last = seen.take().iter().map(|(_, at)| *at).max().unwrap_or(started_ns);
    let want = n.min(RATE_LIMITED_RECEIPTS_MAX);
    assert!(
        limited_seen.wait_for(want),
        "the limited receiver got {} of {want}",
        limited_seen.requests.load(Ordering::SeqCst)
    );
    h.engine.shutdown();
    let mut at: Vec<u64> = limited_seen.take().iter().map(|(_, at)| *at).collect();
    at.sort_unstable();
    // Past the burst (the bucket holds RATE_LIMITED_PER_S) and the tokens that came meanwhile.
    let from = (RATE_LIMITED_PER_S as usize * 5 / 4).min(at.len().saturating_sub(2));
    let steady = &at[from..];
    let span_s = (steady[steady.len() - 1] - steady[0]) as f64 / 1e9;
    seen.reset();
    limited_seen.reset();
    BesideLimit {
        unconstrained_per_s: n as f64 / (unconstrained_last.saturating_sub(started_ns) as f64 / 1e9),
        limited_per_s: (steady.len() - 1) as f64 / span_s,
        limited_receipts: at.len(),
        held,
    }
}

/// The rows of [`beside_a_rate_limit`] (Flush durability): the unconstrained endpoint beside the
/// raw limit, and the limited one beside its configured rate.
fn throttle_rows(
    receiver: &Receiver,
    config: &EngineConfig,
    events: u64,
    rows: &mut Vec<Row>,
    notes: &mut Vec<String>,
) {
    let limited = start_receiver(receiver.seen.base);
    let (raw, _) = raw_rate(receiver, config, CONCURRENCY);
    let b = beside_a_rate_limit(receiver, &limited, Durability::Flush, events);
    rows.push(Row {
        name: format!(
            "deliveries/s publish → 2xx, {events} events, Flush, beside a {RATE_LIMITED_PER_S}/s endpoint"
        ),
        value: b.unconstrained_per_s,
        unit: "/s",
        limit_name: format!("raw HttpSender, {CONCURRENCY} in flight (before)"),
        limit: raw,
        target: String::new(),
        met: None,
    });
    let within = (b.limited_per_s / f64::from(RATE_LIMITED_PER_S) - 1.0).abs() <= 0.1;
    rows.push(Row {
        name: "rate-limited endpoint: attempts/s at its receiver past the burst".into(),
        value: b.limited_per_s,
        unit: "/s",
        limit_name: "its rate_limit_per_s".into(),
        limit: f64::from(RATE_LIMITED_PER_S),
        target: "within 10 %".into(),
        met: Some(within),
    });
    notes.push(format!(
        "beside a rate limit: {} receipts at the limited endpoint measured; {} deliveries held for its rate (pending, nothing recorded) when the unconstrained endpoint had every event",
        b.limited_receipts, b.held
    ));
}

/// Ordering keys of the ordered burst: each key's events go one at a time, so the burst has at
/// most this many deliveries in flight.
const ORDERED_KEYS: u64 = 256;

/// One ordered-or-not burst of `n` events, their ordering keys `i % ORDERED_KEYS`, `Flush`:
/// (deliveries/s publish start → none pending, store writes per delivery). For a `per_key`
/// endpoint, checks that each key's receipts came in event order.
fn ordered_burst(receiver: &Receiver, n: u64, ordering: DeliveryOrder) -> (f64, f64) {
    let settings = DeliverySettingsPatch { ordering: Some(ordering), ..DeliverySettingsPatch::default() };
    let h = open_herald_with(receiver, Durability::Flush, Policy::default(), settings);
    let seen = receiver.seen.clone();
    seen.reset();
    let before = h.engine.writer_stats();
    let started_ns = seen.now_ns();
    let body = payload();
    let failed = Arc::new(AtomicU64::new(0));
    for i in 0..n {
        let mut command = publish_command(h.org, event_id(3, i), &body);
        if let Command::Publish { ordering_key, .. } = &mut command {
            *ordering_key = Some(format!("key-{}", i % ORDERED_KEYS));
        }
        let failed = failed.clone();
        h.engine.submit_with(actor(h.org), command, move |r| {
            if r.is_err() {
                failed.fetch_add(1, Ordering::Relaxed);
            }
        });
    }
    assert!(seen.wait_for(n), "the receiver got {} of {n}", seen.requests.load(Ordering::SeqCst));
    while count_status(&h, DeliveryStatus::Pending, 1) > 0 {
        std::thread::sleep(Duration::from_micros(500));
    }
    let secs = seen.now_ns().saturating_sub(started_ns) as f64 / 1e9;
    assert_eq!(failed.load(Ordering::SeqCst), 0, "publishes failed");
    let writes = (h.engine.writer_stats().store_writes - before.store_writes) as f64 / n as f64;
    if ordering == DeliveryOrder::PerKey {
        let mut last: HashMap<u64, u64> = HashMap::new();
        for (id, _) in seen.take() {
            let Some(i) = index_of(&id, 3) else { continue };
            let previous = last.insert(i % ORDERED_KEYS, i);
            assert!(
                previous.is_none_or(|p| p <= i),
                "key {}: event {i} after {previous:?}",
                i % ORDERED_KEYS
            );
        }
    }
    h.engine.shutdown();
    seen.reset();
    (n as f64 / secs, writes)
}

/// The ordered endpoint's figures beside the unconstrained one's, measured in the same run.
fn ordered_rows(receiver: &Receiver, events: u64, rows: &mut Vec<Row>, notes: &mut Vec<String>) {
    let (free_per_s, free_writes) = ordered_burst(receiver, events, DeliveryOrder::Unordered);
    let (ordered_per_s, ordered_writes) = ordered_burst(receiver, events, DeliveryOrder::PerKey);
    rows.push(Row {
        name: format!(
            "deliveries/s publish → none pending, per_key over {ORDERED_KEYS} keys, {events} events, Flush"
        ),
        value: ordered_per_s,
        unit: "/s",
        limit_name: "the same burst to an unconstrained endpoint, same run".into(),
        limit: free_per_s,
        target: String::new(),
        met: None,
    });
    notes.push(format!(
        "ordered: {ordered_per_s:.0}/s ({:.0} % of unconstrained {free_per_s:.0}/s); store writes per \
         delivery {ordered_writes:.1} ordered, {free_writes:.1} unconstrained (an ordered delivery puts and \
         deletes its order entry and back map, its event adds an OrderingKeySet record); every key's \
         receipts in event order",
        100.0 * ordered_per_s / free_per_s
    ));
}

fn percentile(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i] as f64 / 1e6
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    // `--only burst|paced|retrigger`: one part (with the limits it is printed beside), for profiling.
    let only = args.iter().position(|a| a == "--only").and_then(|i| args.get(i + 1)).cloned();
    let runs = |part: &str| only.as_deref().is_none_or(|o| o == part);
    let events: u64 =
        std::env::var("HERALD_BENCH_DELIVERY_EVENTS").ok().and_then(|v| v.parse().ok()).unwrap_or(20_000);
    let base = Instant::now();
    let receiver = start_receiver(base);
    let probe_dir = tempfile::tempdir().unwrap();
    let config = engine_config(probe_dir.path(), Durability::Sync, Policy::default());
    let mut rows = Vec::new();
    let mut notes = Vec::new();

    for durability in [Durability::Sync, Durability::Flush].into_iter().filter(|_| runs("burst")) {
        let (raw_before, cpu_before) = raw_rate(&receiver, &config, CONCURRENCY);
        let b = burst(&receiver, durability, events, 4);
        let (raw_after, cpu_after) = raw_rate(&receiver, &config, CONCURRENCY);
        let raw = (raw_before + raw_after) / 2.0;
        notes.push(format!(
            "{durability:?}: raw HttpSender limit {raw:.0}/s, the mean of {raw_before:.0}/s measured right \
             before the burst ({cpu_before}) and {raw_after:.0}/s right after it ({cpu_after})"
        ));
        let to_2xx = events as f64 / b.to_receipt_s;
        let to_delivered = events as f64 / b.to_delivered_s;
        let limit_name = format!("raw HttpSender, {CONCURRENCY} in flight (mean before/after)");
        let met = to_2xx >= 15_000.0 && to_2xx >= 0.5 * raw;
        rows.push(Row {
            name: format!("deliveries/s publish → 2xx, {events} events, {durability:?}"),
            value: to_2xx,
            unit: "/s",
            limit_name: limit_name.clone(),
            limit: raw,
            target: "≥ 15,000/s and ≥ 50 %".into(),
            met: Some(met),
        });
        rows.push(Row {
            name: format!("deliveries/s publish → `delivered` recorded, {durability:?}"),
            value: to_delivered,
            unit: "/s",
            limit_name,
            limit: raw,
            target: String::new(),
            met: None,
        });
        notes.push(format!(
            "{durability:?}: {events} publishes acknowledged after {:.2} s ({:.0}/s), {} of them received \
             by then; last receipt after {:.2} s; none pending after {:.2} s; {} duplicate receipts; \
             writer: {} batches of {:.1} commands (publishes and attempt records), {:.2} s in flush; {} \
             due-queue refills",
            b.to_acked_s,
            events as f64 / b.to_acked_s,
            b.during_publish,
            b.to_receipt_s,
            b.to_delivered_s,
            b.duplicates,
            b.batches,
            b.batch_avg,
            b.flush_s,
            b.refills
        ));
        notes.push(format!("{durability:?} burst: {}", b.cpu));
        notes.push(sled_ceiling(durability, &b));
    }

    if runs("throttle") {
        throttle_rows(&receiver, &config, events, &mut rows, &mut notes);
    }

    let paced_n = PACED_PER_S * PACED_FOR.as_secs();
    let mut commit_floor = Vec::new();
    let mut raw_lat = raw_latencies(&receiver, &config, PACED_PER_S, paced_n);
    raw_lat.sort_unstable();
    for durability in [Durability::Sync, Durability::Flush].into_iter().filter(|_| runs("paced")) {
        let (mut lat, cpu) = paced(&receiver, durability, PACED_PER_S, paced_n);
        lat.sort_unstable();
        notes.push(format!("{durability:?} paced: {cpu}"));
        let commit_ms = raw_commit_ms(durability);
        commit_floor.push((durability, commit_ms));
        for (p, name, target_ms) in [(0.5, "p50", 2.0), (0.99, "p99", 10.0)] {
            let value = percentile(&lat, p);
            rows.push(Row {
                name: format!("publish → receipt {name}, paced {PACED_PER_S}/s, {durability:?}"),
                value,
                unit: "ms",
                limit_name: format!(
                    "raw sled commit of 1 ({durability:?}, mean {commit_ms:.2} ms) + raw HttpSender request {name}"
                ),
                limit: commit_ms + percentile(&raw_lat, p),
                target: format!("≤ {target_ms} ms"),
                met: Some(value <= target_ms),
            });
        }
    }

    let mut lat = if runs("retrigger") {
        retriggered(&receiver, Durability::Sync, RETRIGGERED, RETRIGGER_PER_S)
    } else {
        Vec::new()
    };
    lat.sort_unstable();
    let retrigger_commit_ms = match commit_floor.iter().find(|(d, _)| *d == Durability::Sync) {
        Some((_, ms)) => *ms,
        None if runs("retrigger") => raw_commit_ms(Durability::Sync),
        None => 0.0,
    };
    for (p, name, target_ms) in
        [(0.5, "p50", None), (0.99, "p99", Some(10.0))].into_iter().filter(|_| runs("retrigger"))
    {
        let value = percentile(&lat, p);
        rows.push(Row {
            name: format!(
                "retrigger → receipt {name}, {RETRIGGERED} exhausted, paced {RETRIGGER_PER_S}/s, Sync"
            ),
            value,
            unit: "ms",
            limit_name: format!("raw sled commit of 1 (Sync, mean {retrigger_commit_ms:.2} ms) + raw HttpSender request {name}"),
            limit: retrigger_commit_ms + percentile(&raw_lat, p),
            target: target_ms.map(|t| format!("≤ {t} ms")).unwrap_or_default(),
            met: target_ms.map(|t| value <= t),
        });
    }

    if runs("ordered") {
        ordered_rows(&receiver, events, &mut rows, &mut notes);
    }

    common::report(&rows);
    for n in &notes {
        println!("- {n}");
    }
}
