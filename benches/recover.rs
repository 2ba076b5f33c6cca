//! Bulk recover figures (issue 21), beside a plain publish of as many events in the same run,
//! against the same in-process receiver (a hyper 1 keep-alive server on 127.0.0.1 answering 204,
//! or 503 while herald's endpoints are to fail):
//! - the time one recover of 100,000 inactive deliveries takes to commit (the command answered:
//!   selected, re-queued, durable, handed to the dispatcher), beside the time 100,000 publishes
//!   take to be acknowledged;
//! - the time from the recover's start until every recovered delivery is `delivered`, beside the
//!   time from the publishes' start until every published delivery is.
//!
//! The inactive deliveries are made through the engine: `ENDPOINTS` endpoints at the receiver
//! while it answers 503, made inactive by one failed delivery each (a policy of one failure),
//! then `EVENTS - 1` more events that fan out to every endpoint and are stored inactive.
//!
//! Run: `cargo bench --bench recover`. Prints a table; `--json FILE` also writes JSON.
//! `HERALD_BENCH_RECOVER_EVENTS` sets the events per endpoint (default 1,000: 100 x 1,000 =
//! 100,000 deliveries).

mod common;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{cpu_now, Row};
use herald_engine::{delivery_counts, Actor, Command, Engine, EngineConfig, Reply};
use herald_log::{Durability, LogConfig};
use herald_projector::{DeliveryStatus, EndpointId, EventId, OrgId, Policy, RecoveryFilter, RecoveryId};
use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use uuid::Uuid;

/// Endpoints of the recovered organisation, all at the one receiver.
const ENDPOINTS: u64 = 100;
/// Attempts in flight in all: the delivery bench's per-endpoint figure.
const IN_FLIGHT_TOTAL: usize = 64;
/// Publishing threads of the plain publish (as the delivery bench's burst).
const PUBLISHERS: u64 = 4;
const PAYLOAD: &[u8] = br#"{"call_id":"0190d7a0-0000-7000-8000-000000000000","n":1}"#;
/// Any wait of the run is bounded by this.
const WAIT_MAX: Duration = Duration::from_secs(600);

/// A receiver that counts requests and answers 204, or 503 while `fail` is set.
struct Receiver {
    addr: SocketAddr,
    requests: Arc<AtomicU64>,
    fail: Arc<AtomicBool>,
    _runtime: tokio::runtime::Runtime,
}

fn start_receiver() -> Receiver {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    let runtime = builder.enable_all().thread_name("bench-receiver").worker_threads(1).build().unwrap();
    let (requests, fail) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicBool::new(false)));
    let listener = runtime.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).unwrap();
    let addr = listener.local_addr().unwrap();
    let (counted, failing) = (requests.clone(), fail.clone());
    runtime.spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { continue };
            let _ = stream.set_nodelay(true);
            let (counted, failing) = (counted.clone(), failing.clone());
            tokio::spawn(async move {
                let service = service_fn(move |req: Request<Incoming>| {
                    let (counted, failing) = (counted.clone(), failing.clone());
                    async move {
                        let _ = req.into_body().collect().await;
                        counted.fetch_add(1, Ordering::SeqCst);
                        let mut response = Response::new(Full::new(Bytes::new()));
                        *response.status_mut() = match failing.load(Ordering::SeqCst) {
                            true => StatusCode::SERVICE_UNAVAILABLE,
                            false => StatusCode::NO_CONTENT,
                        };
                        Ok::<_, Infallible>(response)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .keep_alive(true)
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    Receiver { addr, requests, fail, _runtime: runtime }
}

struct Herald {
    engine: Engine,
    org: OrgId,
    _dir: tempfile::TempDir,
}

/// An engine (`Sync`, as `herald serve` runs) whose endpoints go inactive at their first failure.
fn open_herald() -> Herald {
    let dir = tempfile::tempdir().unwrap();
    let mut config = EngineConfig {
        data_dir: dir.path().to_path_buf(),
        durability: Durability::Sync,
        log: LogConfig { durability: Durability::Sync, ..LogConfig::default() },
        policy: Policy { failures_max: 1, ..Policy::default() },
        ..EngineConfig::default()
    };
    config.delivery.allow_private_targets = true;
    config.delivery.max_in_flight_total = IN_FLIGHT_TOTAL;
    config.delivery.shutdown_timeout = Duration::from_secs(2);
    let engine = Engine::open(config).unwrap();
    Herald { engine, org: OrgId(Uuid::now_v7()), _dir: dir }
}

impl Herald {
    fn actor(&self) -> Actor {
        Actor { org_id: Some(self.org), key_id: None }
    }

    fn create_endpoint(&self, receiver: &Receiver) {
        let created = self.engine.execute_blocking(
            self.actor(),
            Command::CreateEndpoint {
                id: EndpointId(Uuid::now_v7()),
                org_id: self.org,
                url: format!("http://{}/hook", receiver.addr),
                name: "bench receiver".into(),
                enabled_events: vec!["*".into()],
                secret: None,
                settings: Default::default(),
            },
        );
        assert!(matches!(created, Ok(Reply::Endpoint { .. })), "{created:?}");
    }

    fn publish(&self) -> Command {
        Command::Publish {
            id: EventId(Uuid::now_v7()),
            org_id: self.org,
            event_type: "call.ended".into(),
            payload: PAYLOAD.to_vec(),
            call_id: None,
            webhook_url: None,
            idempotency_key: None,
            ordering_key: None,
        }
    }

    /// Submits `n` publishes from [`PUBLISHERS`] threads; returns once all are acknowledged.
    fn publish_many(&self, n: u64) {
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        std::thread::scope(|s| {
            for t in 0..PUBLISHERS {
                let done_tx = done_tx.clone();
                s.spawn(move || {
                    for _ in (t..n).step_by(PUBLISHERS as usize) {
                        let done_tx = done_tx.clone();
                        self.engine.submit_with(self.actor(), self.publish(), move |r| {
                            let _ = done_tx.send(r.is_ok());
                        });
                    }
                });
            }
        });
        let acked = (0..n).filter(|_| done_rx.recv_timeout(WAIT_MAX).unwrap_or(false)).count();
        assert_eq!(acked as u64, n, "every publish acknowledged");
    }

    fn count(&self, status: DeliveryStatus) -> u64 {
        let counts = self.engine.read(|t| delivery_counts(t)).unwrap();
        counts.into_iter().find(|(s, _)| *s == status).map_or(0, |(_, n)| n)
    }

    /// Waits until `n` deliveries are in `status`.
    fn wait_for(&self, status: DeliveryStatus, n: u64) {
        let deadline = Instant::now() + WAIT_MAX;
        while self.count(status) < n {
            assert!(Instant::now() < deadline, "{n} deliveries not {} in time", status.name());
            std::thread::sleep(Duration::from_millis(2));
        }
    }
}

/// Times a plain publish of `n` events to one endpoint: (to every publish acknowledged, to every
/// delivery `delivered`), s.
fn plain_publish(receiver: &Receiver, n: u64) -> (f64, f64, String) {
    let h = open_herald();
    h.create_endpoint(receiver);
    let cpu_before = cpu_now();
    let started = Instant::now();
    h.publish_many(n);
    let acked = started.elapsed().as_secs_f64();
    h.wait_for(DeliveryStatus::Delivered, n);
    let delivered = started.elapsed().as_secs_f64();
    let cpu = cpu_now().since(&cpu_before, n, "delivery");
    h.engine.shutdown();
    (acked, delivered, cpu)
}

/// `ENDPOINTS x events` inactive deliveries (see the module documentation).
fn inactive_deliveries(receiver: &Receiver, events: u64) -> Herald {
    let h = open_herald();
    receiver.fail.store(true, Ordering::SeqCst);
    for _ in 0..ENDPOINTS {
        h.create_endpoint(receiver);
    }
    h.engine.execute_blocking(h.actor(), h.publish()).unwrap();
    h.wait_for(DeliveryStatus::Inactive, ENDPOINTS);
    h.publish_many(events - 1);
    assert_eq!(h.count(DeliveryStatus::Inactive), ENDPOINTS * events);
    receiver.fail.store(false, Ordering::SeqCst);
    h
}

struct Recovered {
    commit_s: f64,
    delivered_s: f64,
    cpu: String,
    batch: String,
}

/// Recovers every inactive delivery in one command and times it.
fn recover(h: &Herald, n: u64) -> Recovered {
    let filter = RecoveryFilter {
        statuses: vec![DeliveryStatus::Inactive],
        endpoint_id: None,
        event_type: None,
        created_after_ms: None,
        created_before_ms: None,
        max: u32::try_from(n).unwrap(),
    };
    let writer_before = h.engine.writer_stats();
    let cpu_before = cpu_now();
    let started = Instant::now();
    let reply = h.engine.execute_blocking(
        h.actor(),
        Command::Recover { id: RecoveryId(Uuid::now_v7()), org_id: h.org, filter },
    );
    let commit_s = started.elapsed().as_secs_f64();
    match reply {
        Ok(Reply::Recovered(r)) => assert_eq!((r.queued, r.truncated), (n, false)),
        other => panic!("the recover failed: {other:?}"),
    }
    let w = h.engine.writer_stats();
    let batch = format!(
        "writer: the recover's batch and those beside it: {} batches, {:.2} s in flush, {:.0} store writes",
        w.batches - writer_before.batches,
        (w.flush_us_total - writer_before.flush_us_total) as f64 / 1e6,
        (w.store_writes - writer_before.store_writes) as f64,
    );
    h.wait_for(DeliveryStatus::Delivered, n);
    let delivered_s = started.elapsed().as_secs_f64();
    Recovered { commit_s, delivered_s, cpu: cpu_now().since(&cpu_before, n, "delivery"), batch }
}

fn main() {
    let events: u64 =
        std::env::var("HERALD_BENCH_RECOVER_EVENTS").ok().and_then(|v| v.parse().ok()).unwrap_or(1_000);
    let n = ENDPOINTS * events;
    let receiver = start_receiver();
    let (acked_s, published_s, publish_cpu) = plain_publish(&receiver, n);
    let made = Instant::now();
    let h = inactive_deliveries(&receiver, events);
    let made_s = made.elapsed().as_secs_f64();
    let requests_before = receiver.requests.load(Ordering::SeqCst);
    let r = recover(&h, n);
    let received = receiver.requests.load(Ordering::SeqCst) - requests_before;
    h.engine.shutdown();

    let limit_of = |what: &str| format!("plain publish of {n} events, all {what}");
    let row = |name: String, s: f64, limit_name: String, limit_s: f64| Row {
        name,
        value: s * 1e3,
        unit: "ms",
        limit_name,
        limit: limit_s * 1e3,
        target: String::new(),
        met: None,
    };
    let committed = Row {
        target: "≤ 30,000 ms (the request timeout)".into(),
        met: Some(r.commit_s <= 30.0),
        ..row(
            format!("recover of {n} inactive deliveries: committed, one command"),
            r.commit_s,
            limit_of("acknowledged"),
            acked_s,
        )
    };
    let delivered = row(
        format!("recover of {n} inactive deliveries: all delivered"),
        r.delivered_s,
        limit_of("delivered"),
        published_s,
    );
    let rows = vec![committed, delivered];
    common::report(&rows);
    println!(
        "- {n} inactive deliveries ({ENDPOINTS} endpoints x {events} events) made in {made_s:.1} s; the \
         receiver got {received} requests after the recover ({} duplicates)",
        received.saturating_sub(n)
    );
    println!("- recover: {}; {}", r.batch, r.cpu);
    println!("- plain publish: {publish_cpu}");
}
