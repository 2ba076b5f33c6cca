//! Crashes and stops, against the real binary: kill -9 in the middle of a publish load loses no
//! acknowledged event nor its delivery; SIGTERM finishes or records the attempt in flight and
//! exits cleanly; `/readyz` says when the server serves.

mod common;

use std::collections::HashSet;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::{call_raw, Receiver, Server};
use serde_json::{json, Value};

const SCOPES: &[&str] = &["events.write", "endpoints.write", "endpoints.read", "deliveries.read"];
/// Publishing threads in the kill -9 test.
const PUBLISHERS: usize = 4;
/// Rounds of load, kill -9 and restart.
const ROUNDS: u64 = 3;

/// An acknowledged publish: the event id and its one delivery.
type Acked = (String, String);

/// Acknowledged publishes a round waits for before its kill -9, at least.
const ACKED_BEFORE_KILL_MIN: usize = 20;

/// Publishes from `PUBLISHERS` threads as fast as they can until `stop` or the server is gone,
/// counting acknowledgements in `count`; each returns what was answered 202.
fn publishers(
    url: String,
    key: String,
    round: u64,
    stop: Arc<AtomicBool>,
    count: Arc<AtomicUsize>,
) -> Vec<JoinHandle<Vec<Acked>>> {
    (0..PUBLISHERS)
        .map(|thread| {
            let (url, key, stop, count) = (url.clone(), key.clone(), stop.clone(), count.clone());
            std::thread::spawn(move || {
                let mut acked = Vec::new();
                let deadline = Instant::now() + common::WAIT_MAX;
                for n in 0u64.. {
                    if stop.load(Ordering::SeqCst) || Instant::now() > deadline {
                        break;
                    }
                    let body = json!({
                        "event_type": "crash.load",
                        "payload": {"round": round, "thread": thread, "n": n},
                    })
                    .to_string();
                    match call_raw(&url, "POST", Some(&key), Some(&body), &[]) {
                        Ok((202, text)) => {
                            let v: Value = serde_json::from_str(&text).expect("a 202 answer is JSON");
                            let ids = v["delivery_ids"].as_array().expect("delivery ids");
                            assert_eq!(ids.len(), 1, "one endpoint, one delivery: {v}");
                            acked.push((
                                v["id"].as_str().unwrap().to_owned(),
                                ids[0].as_str().unwrap().to_owned(),
                            ));
                            count.fetch_add(1, Ordering::SeqCst);
                        }
                        Ok((status, text)) => {
                            assert!(status >= 500, "a publish refused with {status}: {text}");
                        }
                        // The server was killed: this publish was never acknowledged.
                        Err(_) => break,
                    }
                }
                acked
            })
        })
        .collect()
}

/// Every acknowledged event is there with its delivery, every delivery gets delivered, and the
/// receiver saw every event at least once (its `webhook-id`).
fn check_nothing_lost(server: &Server, key: &str, acked: &[Acked], receiver: &Receiver) {
    for (event, delivery) in acked {
        let (status, body) = server.call("GET", &format!("/v1/events/{event}"), Some(key), None);
        assert_eq!(status, 200, "acknowledged event {event} is lost: {body}");
        assert_eq!(body["delivery_ids"], json!([delivery]), "{body}");
    }
    for (_, delivery) in acked {
        server.wait_status(key, delivery, "delivered");
    }
    let seen: HashSet<String> =
        receiver.received().iter().map(|r| r.header("webhook-id").to_owned()).collect();
    let missing: Vec<&String> = acked.iter().map(|(e, _)| e).filter(|e| !seen.contains(*e)).collect();
    assert!(
        missing.is_empty(),
        "{} acknowledged events never reached the receiver: {missing:?}",
        missing.len()
    );
}

#[test]
fn kill_9_during_a_publish_load_loses_no_acknowledged_event() {
    let mut server = Server::start();
    let receiver = Receiver::start();
    let (_, key) = server.org_key(SCOPES);
    server.endpoint(&key, &receiver.url("/crash"), &["*"]);
    let mut acked: Vec<Acked> = Vec::new();
    for round in 0..ROUNDS {
        let stop = Arc::new(AtomicBool::new(false));
        let count = Arc::new(AtomicUsize::new(0));
        let threads = publishers(server.url("/v1/events"), key.clone(), round, stop.clone(), count.clone());
        // Kill at a different point of each round's load, while the publishers run.
        let started = Instant::now();
        let kill_at = Duration::from_millis(400 + 250 * round);
        while started.elapsed() < kill_at || count.load(Ordering::SeqCst) < ACKED_BEFORE_KILL_MIN {
            assert!(started.elapsed() < common::WAIT_MAX, "the publishers got too few acknowledgements");
            std::thread::sleep(Duration::from_millis(5));
        }
        server.kill9();
        stop.store(true, Ordering::SeqCst);
        let mut this_round = Vec::new();
        for t in threads {
            this_round.extend(t.join().expect("a publisher panicked"));
        }
        assert!(
            this_round.len() >= ACKED_BEFORE_KILL_MIN,
            "round {round}: {} acknowledged",
            this_round.len()
        );
        server.restart();
        let (status, _) = server.call("GET", "/readyz", None, None);
        assert_eq!(status, 200, "ready after the restart");
        check_nothing_lost(&server, &key, &this_round, &receiver);
        acked.extend(this_round);
    }
    // After every crash, still all there.
    check_nothing_lost(&server, &key, &acked, &receiver);
    let (status, list) = server.call("GET", "/v1/webhook_deliveries?status=pending", Some(&key), None);
    assert_eq!(status, 200);
    assert_eq!(list["data"], json!([]), "deliveries left pending: {list}");
    // The receiver always answers 200, so each delivery needs one attempt: the one recorded, and
    // at most one more per crash (an attempt cut off before it was recorded is made again).
    let mut sent: std::collections::HashMap<String, u64> = std::collections::HashMap::new();
    for r in receiver.received() {
        *sent.entry(r.header("webhook-id").to_owned()).or_default() += 1;
    }
    for (event, delivery) in &acked {
        let (_, d) = server.call("GET", &format!("/v1/webhook_deliveries/{delivery}"), Some(&key), None);
        assert_eq!(d["attempt_count"], 1, "{d}");
        let times = sent.get(event).copied().unwrap_or(0);
        assert!((1..=1 + ROUNDS).contains(&times), "event {event} reached the receiver {times} times");
    }
    // And the log the crashes left is intact: the chain and the projection against a rebuild.
    server.kill9();
    let verify = std::process::Command::new(env!("CARGO_BIN_EXE_herald"))
        .arg("verify")
        .arg("--data-dir")
        .arg(&server.data_dir)
        .output()
        .expect("cannot run herald verify");
    assert!(
        verify.status.success(),
        "herald verify after the crashes: {}{}",
        String::from_utf8_lossy(&verify.stdout),
        String::from_utf8_lossy(&verify.stderr)
    );
}

/// A receiver that holds each request for `hold` before answering 200, and records the
/// `webhook-id` of each request as it arrives.
struct HoldReceiver {
    port: u16,
    hold_ms: Arc<AtomicU64>,
    got: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
}

impl HoldReceiver {
    fn start(hold: Duration) -> HoldReceiver {
        let listener = TcpListener::bind("127.0.0.1:0").expect("a port for the receiver");
        listener.set_nonblocking(true).expect("nonblocking");
        let port = listener.local_addr().expect("addr").port();
        let hold_ms = Arc::new(AtomicU64::new(hold.as_millis() as u64));
        let got = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (h, g, s) = (hold_ms.clone(), got.clone(), stop.clone());
        std::thread::spawn(move || {
            while !s.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((stream, _)) => {
                        let (h, g) = (h.clone(), g.clone());
                        std::thread::spawn(move || hold_conn(stream, h, g));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(2)),
                }
            }
        });
        HoldReceiver { port, hold_ms, got, stop }
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    fn set_hold(&self, hold: Duration) {
        self.hold_ms.store(hold.as_millis() as u64, Ordering::SeqCst);
    }

    fn received(&self) -> Vec<String> {
        self.got.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn wait_for(&self, n: usize) {
        let deadline = Instant::now() + common::WAIT_MAX;
        while self.received().len() < n {
            assert!(Instant::now() < deadline, "the receiver got {} of {n} requests", self.received().len());
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for HoldReceiver {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

fn hold_conn(stream: TcpStream, hold_ms: Arc<AtomicU64>, got: Arc<Mutex<Vec<String>>>) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(30)));
    let Ok(clone) = stream.try_clone() else { return };
    let mut reader = BufReader::new(clone);
    let mut stream = stream;
    loop {
        let mut line = String::new();
        if !matches!(reader.read_line(&mut line), Ok(n) if n > 0) {
            return;
        }
        let mut len = 0;
        let mut id = String::new();
        loop {
            let mut h = String::new();
            if reader.read_line(&mut h).is_err() {
                return;
            }
            let Some((k, v)) = h.trim_end().split_once(':') else { break };
            match k.trim().to_ascii_lowercase().as_str() {
                "content-length" => len = v.trim().parse().unwrap_or(0),
                "webhook-id" => id = v.trim().to_owned(),
                _ => {}
            }
        }
        let mut body = vec![0; len];
        if reader.read_exact(&mut body).is_err() {
            return;
        }
        got.lock().unwrap_or_else(|e| e.into_inner()).push(id);
        std::thread::sleep(Duration::from_millis(hold_ms.load(Ordering::SeqCst)));
        if stream.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok").is_err() {
            return;
        }
    }
}

#[test]
fn sigterm_stops_gracefully_and_records_the_attempt_in_flight() {
    let mut server =
        Server::start_with(&[("HERALD_SERVER_SHUTDOWN_TIMEOUT", "1s"), ("HERALD_DELIVERY_TIMEOUT", "10s")]);
    let receiver = HoldReceiver::start(Duration::from_secs(5));
    let (_, key) = server.org_key(SCOPES);
    server.endpoint(&key, &receiver.url("/slow"), &["*"]);
    let event = server.publish(&key, "slow.one", json!({"n": 1}));
    let event_id = event["id"].as_str().unwrap().to_owned();
    let delivery = event["delivery_ids"][0].as_str().unwrap().to_owned();
    // The attempt is in flight: the receiver has it and holds it.
    receiver.wait_for(1);
    let (status, body) = server.call("GET", "/readyz", None, None);
    assert_eq!(status, 200, "{body}");

    let asked = Instant::now();
    assert!(server.terminate(), "herald did not exit successfully on SIGTERM");
    let took = asked.elapsed();
    assert!(took < Duration::from_secs(4), "the stop took {took:?} with a 1 s shutdown timeout");
    assert!(receiver.received().len() == 1, "no new attempt while stopping");

    receiver.set_hold(Duration::ZERO);
    server.restart();
    let (status, body) = server.call("GET", "/readyz", None, None);
    assert_eq!(status, 200, "{body}");
    // The attempt cut short is recorded, and the delivery is not lost: pending, then delivered.
    let (status, attempts) =
        server.call("GET", &format!("/v1/webhook_deliveries/{delivery}/attempts"), Some(&key), None);
    assert_eq!(status, 200, "{attempts}");
    let first = &attempts["data"][0];
    assert!(
        first["error"].as_str().is_some_and(|e| e.contains("interrupted")),
        "the first attempt is not recorded as interrupted: {attempts}"
    );
    assert_eq!(first["response_status"], Value::Null, "{attempts}");
    let (status, d) = server.call("GET", &format!("/v1/webhook_deliveries/{delivery}"), Some(&key), None);
    assert_eq!(status, 200, "{d}");
    assert!(d["status"] == "pending" || d["status"] == "delivered", "{d}");
    let d = server.wait_status(&key, &delivery, "delivered");
    assert!(d["attempt_count"].as_u64().unwrap() >= 2, "{d}");
    let seen = receiver.received();
    assert!(seen.len() >= 2 && seen.iter().all(|id| *id == event_id), "{seen:?}");
}

#[test]
fn readyz_is_200_while_serving() {
    let mut server = Server::start();
    for path in ["/readyz", "/healthz"] {
        let (status, body) = server.call("GET", path, None, None);
        assert_eq!(status, 200, "{path}: {body}");
        assert!(body["status"].is_string(), "{path}: {body}");
    }
    let (_, key) = server.org_key(SCOPES);
    server.publish(&key, "ready.check", json!({}));
    let (status, _) = server.call("GET", "/readyz", None, None);
    assert_eq!(status, 200);
    server.kill9();
    server.restart();
    let (status, body) = server.call("GET", "/readyz", None, None);
    assert_eq!(status, 200, "ready after a restart: {body}");
}
