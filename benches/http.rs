//! HTTP publish figures (issue 4), each beside a limit measured in the same run with the same
//! client: `POST /v1/events` through herald's real router (`herald_server::router` over an
//! `AppState` built as `herald_server::serve` builds it, served by axum on 127.0.0.1), one event
//! per request, 64 keep-alive connections each sending back to back; publishes/s and latency
//! p50/p99. The limit is a trivial hyper server on loopback answering 202 with a small JSON body,
//! driven by the same client over 64 connections.
//!
//! Measured with 0 endpoints (the publish alone) and with 1 endpoint (publish, fan-out and the
//! deliveries to an in-process receiver happening at the same time).
//!
//! Run: `cargo bench --bench http`. Prints a table; `--json FILE` also writes JSON. With
//! `HERALD_BENCH_LOG=json` (or `text`) the bench installs the subscriber `herald serve` installs,
//! at `info`, writing to stderr: the cost of the logging on the publish path, as in production.

mod common;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{cpu_now, Row};
use herald_engine::Engine;
use herald_log::Durability;
use herald_server::config::Config;
use herald_server::AppState;
use herald_server::{bootstrap_admin, router};
use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::client::conn::http1::SendRequest;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;

const CONNECTIONS: usize = 64;
const WARMUP: Duration = Duration::from_millis(500);
const MEASURE: Duration = Duration::from_secs(3);
/// Worker threads of the server's runtime: `herald serve`'s default on this 2-core machine.
const SERVER_WORKERS: usize = 2;
const CLIENT_WORKERS: usize = 2;
const PAYLOAD_DATA_BYTES: usize = 200;

fn runtime(workers: usize, name: &str) -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .thread_name(name)
        .enable_all()
        .build()
        .unwrap()
}

// ---------------------------------------------------------------------------------------------
// Trivial hyper servers: the baseline (202 + JSON) and the endpoint's receiver (204)

const BASELINE_BODY: &str = r#"{"id":"0190d7a0-0000-7000-8000-000000000000","event_type":"call.queued","created_at":"2026-11-23T12:00:00.000Z","delivery_ids":[]}"#;

/// Serves `status` with `body` to every request on 127.0.0.1, keep-alive, on `rt`.
fn trivial_server(rt: &tokio::runtime::Runtime, status: StatusCode, body: &'static str) -> SocketAddr {
    let listener = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).unwrap();
    let addr = listener.local_addr().unwrap();
    rt.spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { continue };
            let _ = stream.set_nodelay(true);
            tokio::spawn(async move {
                let service = service_fn(move |req: Request<Incoming>| async move {
                    let _ = req.into_body().collect().await;
                    let mut response = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
                    *response.status_mut() = status;
                    if !body.is_empty() {
                        response
                            .headers_mut()
                            .insert(hyper::header::CONTENT_TYPE, "application/json".parse().unwrap());
                    }
                    Ok::<_, Infallible>(response)
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .keep_alive(true)
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    addr
}

// ---------------------------------------------------------------------------------------------
// The client: hyper over N keep-alive connections

async fn connect(addr: SocketAddr) -> SendRequest<Full<Bytes>> {
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream.set_nodelay(true).unwrap();
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.unwrap();
    tokio::spawn(conn);
    sender
}

fn request(addr: SocketAddr, path: &str, key: Option<&str>, body: Bytes) -> Request<Full<Bytes>> {
    let mut b = Request::post(path)
        .header(hyper::header::HOST, addr.to_string())
        .header(hyper::header::CONTENT_TYPE, "application/json");
    if let Some(key) = key {
        b = b.header(hyper::header::AUTHORIZATION, format!("Bearer {key}"));
    }
    b.body(Full::new(body)).unwrap()
}

/// One request on a fresh connection: status and body.
async fn call(addr: SocketAddr, path: &str, key: Option<&str>, body: String) -> (StatusCode, Bytes) {
    let mut sender = connect(addr).await;
    let response = sender.send_request(request(addr, path, key, Bytes::from(body))).await.unwrap();
    let status = response.status();
    (status, response.into_body().collect().await.unwrap().to_bytes())
}

struct Load {
    per_s: f64,
    /// Latencies in ns of requests started within the measured window, sorted.
    latencies: Vec<u64>,
    /// Answers other than 202 within the window.
    unexpected: u64,
    /// Requests made, the warm-up's included.
    all: u64,
}

impl Load {
    fn percentile_ms(&self, p: f64) -> f64 {
        let s = &self.latencies;
        let i = ((s.len() as f64 * p).ceil() as usize).clamp(1, s.len()) - 1;
        s[i] as f64 / 1e6
    }
}

/// `CONNECTIONS` connections each posting `body` to `path` back to back: a warm-up, then
/// `MEASURE` counted.
fn load(
    client: &tokio::runtime::Runtime,
    addr: SocketAddr,
    path: &str,
    key: Option<&str>,
    body: Bytes,
) -> Load {
    client.block_on(async {
        let mut senders = Vec::with_capacity(CONNECTIONS);
        for _ in 0..CONNECTIONS {
            senders.push(connect(addr).await);
        }
        let measure_from = Instant::now() + WARMUP;
        let until = measure_from + MEASURE;
        let tasks: Vec<_> = senders
            .into_iter()
            .map(|mut sender| {
                let (path, key, body) = (path.to_owned(), key.map(str::to_owned), body.clone());
                tokio::spawn(async move {
                    let (mut latencies, mut unexpected, mut all) = (Vec::with_capacity(1 << 14), 0u64, 0u64);
                    loop {
                        let t0 = Instant::now();
                        if t0 >= until {
                            break;
                        }
                        sender.ready().await.unwrap();
                        let response = sender
                            .send_request(request(addr, &path, key.as_deref(), body.clone()))
                            .await
                            .unwrap();
                        let status = response.status();
                        let _ = response.into_body().collect().await.unwrap();
                        all += 1;
                        if t0 >= measure_from {
                            latencies.push(t0.elapsed().as_nanos() as u64);
                            if status != StatusCode::ACCEPTED {
                                unexpected += 1;
                            }
                        }
                    }
                    (latencies, unexpected, all)
                })
            })
            .collect();
        let (mut latencies, mut unexpected, mut all) = (Vec::new(), 0, 0);
        for t in tasks {
            let (l, u, a) = t.await.unwrap();
            latencies.extend(l);
            unexpected += u;
            all += a;
        }
        latencies.sort_unstable();
        Load { per_s: latencies.len() as f64 / MEASURE.as_secs_f64(), latencies, unexpected, all }
    })
}

fn publish_body() -> Bytes {
    let data = "x".repeat(PAYLOAD_DATA_BYTES);
    Bytes::from(format!(
        r#"{{"event_type":"call.queued","payload":{{"call_id":"0190d7a0-0000-7000-8000-000000000000","data":"{data}"}}}}"#
    ))
}

// ---------------------------------------------------------------------------------------------
// herald's server, in process

struct Herald {
    addr: SocketAddr,
    engine: Engine,
    org_key: String,
    runtime: tokio::runtime::Runtime,
    _dir: tempfile::TempDir,
}

/// Opens an engine in a temp dir and serves `router` over an `AppState` built as `serve` builds
/// it; creates an org key with `events.write` (and `endpoints` endpoints to `receiver`) through
/// the router with the bootstrapped admin key.
fn start_herald(
    client: &tokio::runtime::Runtime,
    endpoints: usize,
    durability: Durability,
    receiver: SocketAddr,
) -> Herald {
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config::default();
    config.store.data_dir = dir.path().to_path_buf();
    config.store.durability = durability;
    config.delivery.allow_private_targets = true;
    config.server.shutdown_timeout = Duration::from_secs(2);
    // One key drives the whole load: its bucket must not be what is measured (the default,
    // 10,000/s with a burst of 20,000, would cap this run below the target).
    config.server.key_requests_per_s = 10_000_000;
    config.server.key_burst = 10_000_000;
    let engine = Engine::open(config.engine_config()).unwrap();
    let admin = bootstrap_admin(&engine, dir.path(), None).unwrap().expect("a fresh store bootstraps");
    let state = Arc::new(AppState::new(engine.clone(), &config));
    let rt = runtime(SERVER_WORKERS, "herald-http");
    let listener = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).unwrap();
    let addr = listener.local_addr().unwrap();
    rt.spawn(async move { axum::serve(listener, router(state)).await });

    let org = uuid::Uuid::now_v7().to_string();
    let org_key = client.block_on(async {
        let body = format!(r#"{{"org_id":"{org}","scopes":["events.write"],"name":"bench"}}"#);
        let (status, answer) = call(addr, "/v1/api_keys", Some(&admin), body).await;
        assert_eq!(status, StatusCode::CREATED, "{}", String::from_utf8_lossy(&answer));
        let json: serde_json::Value = serde_json::from_slice(&answer).unwrap();
        let key = json["key"].as_str().unwrap().to_owned();
        for n in 0..endpoints {
            let body = format!(
                r#"{{"org_id":"{org}","url":"http://{receiver}/hook/{n}","name":"bench {n}","enabled_events":["*"]}}"#
            );
            let (status, answer) = call(addr, "/v1/endpoints", Some(&admin), body).await;
            assert!(status.is_success(), "{status}: {}", String::from_utf8_lossy(&answer));
        }
        key
    });
    Herald { addr, engine, org_key, runtime: rt, _dir: dir }
}

fn rows_for(name: &str, herald: &Load, raw: &Load, rows: &mut Vec<Row>) {
    let limit_name = format!("raw hyper 202, {CONNECTIONS} connections");
    rows.push(Row {
        name: format!("publishes/s, {CONNECTIONS} connections, {name}"),
        value: herald.per_s,
        unit: "/s",
        limit_name: limit_name.clone(),
        limit: raw.per_s,
        target: "≥ 20,000/s".into(),
        met: Some(herald.per_s >= 20_000.0),
    });
    for (p, pname, target) in [(0.5, "p50", None), (0.99, "p99", Some(20.0))] {
        let value = herald.percentile_ms(p);
        rows.push(Row {
            name: format!("publish latency {pname}, {name}"),
            value,
            unit: "ms",
            limit_name: format!("{limit_name}, {pname}"),
            limit: raw.percentile_ms(p),
            target: target.map(|t| format!("≤ {t} ms")).unwrap_or_default(),
            met: target.map(|t| value <= t),
        });
    }
}

/// Installs `herald serve`'s subscriber (its EnvFilter at `info`, text or JSON on stderr) when
/// `HERALD_BENCH_LOG` asks for it.
fn install_log_subscriber() {
    let format = std::env::var("HERALD_BENCH_LOG").unwrap_or_default();
    let builder = || {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new("info"))
            .with_writer(std::io::stderr)
    };
    match format.as_str() {
        "json" => builder().json().init(),
        "text" => builder().with_ansi(false).init(),
        _ => return,
    }
    eprintln!("bench: the {format} subscriber at info is installed");
}

fn main() {
    install_log_subscriber();
    let client = runtime(CLIENT_WORKERS, "bench-client");
    let side = runtime(1, "bench-receiver");
    let receiver = trivial_server(&side, StatusCode::NO_CONTENT, "");
    let body = publish_body();
    let mut rows = Vec::new();
    let mut notes = Vec::new();

    let raw = {
        let rt = runtime(SERVER_WORKERS, "bench-baseline");
        let addr = trivial_server(&rt, StatusCode::ACCEPTED, BASELINE_BODY);
        let cpu_before = cpu_now();
        let raw = load(&client, addr, "/v1/events", None, body.clone());
        notes.push(format!("raw hyper limit: {}", cpu_now().since(&cpu_before, raw.all, "request")));
        rt.shutdown_timeout(Duration::from_secs(1));
        raw
    };
    assert_eq!(raw.unexpected, 0);

    // The default durability with 0 and 1 endpoint, and `flush` to show what the fsync costs.
    for (endpoints, durability) in [(0usize, Durability::Sync), (1, Durability::Sync), (0, Durability::Flush)]
    {
        let h = start_herald(&client, endpoints, durability, receiver);
        let before = h.engine.dispatch_stats();
        let writer_before = h.engine.writer_stats();
        let cpu_before = cpu_now();
        let l = load(&client, h.addr, "/v1/events", Some(&h.org_key), body.clone());
        let cpu = cpu_now().since(&cpu_before, l.all, "publish");
        let after = h.engine.dispatch_stats();
        let writer = h.engine.writer_stats();
        assert_eq!(l.unexpected, 0, "every publish answered 202");
        let name = format!("{endpoints} endpoint{}, {durability:?}", if endpoints == 1 { "" } else { "s" });
        let batches = (writer.batches - writer_before.batches).max(1);
        notes.push(format!(
            "{name}: writer: {batches} batches of {:.1} commands, {:.2} ms in flush per batch; {} deliveries \
             made during the run (warm-up included); {cpu}",
            (writer.commands - writer_before.commands) as f64 / batches as f64,
            (writer.flush_us_total - writer_before.flush_us_total) as f64 / 1e3 / batches as f64,
            after.attempts_delivered - before.attempts_delivered,
        ));
        rows_for(&name, &l, &raw, &mut rows);
        h.engine.shutdown();
        h.runtime.shutdown_timeout(Duration::from_secs(1));
    }

    common::report(&rows);
    for n in &notes {
        println!("- {n}");
    }
}
