//! Hostile receivers against the real binary: one that never answers, one that trickles its body
//! a byte a second, one with a 50 MB body, one that resets the connection, one with an invalid
//! TLS certificate, one that redirects, one that answers 429 with `Retry-After`. herald records
//! each as the right failure within its timeout and memory bounds, and meanwhile keeps delivering
//! to a healthy endpoint.

mod common;
#[path = "common/peak.rs"]
mod peak;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{Receiver, Server, WAIT_MAX};
use serde_json::{json, Value};

/// A raw receiver: each connection is handed to `behave` on its own thread. Stopped on drop.
struct Raw {
    port: u16,
    stop: Arc<AtomicBool>,
}

impl Raw {
    fn start(behave: fn(TcpStream)) -> Raw {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        std::thread::spawn(move || {
            while !stopped.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((s, _)) => {
                        let _ = s.set_nonblocking(false);
                        std::thread::spawn(move || behave(s));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(2)),
                }
            }
        });
        Raw { port, stop }
    }

    fn url(&self, scheme: &str) -> String {
        format!("{scheme}://127.0.0.1:{}/hook", self.port)
    }
}

impl Drop for Raw {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// Reads one request (head and body) from the connection.
fn read_request(s: &TcpStream) -> Option<()> {
    let _ = s.set_read_timeout(Some(WAIT_MAX));
    let mut reader = BufReader::new(s.try_clone().ok()?);
    let mut len = 0;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).ok()? == 0 {
            return None;
        }
        let line = line.trim_end().to_ascii_lowercase();
        if line.is_empty() {
            break;
        }
        if let Some(v) = line.strip_prefix("content-length:") {
            len = v.trim().parse().ok()?;
        }
    }
    let mut body = vec![0; len];
    reader.read_exact(&mut body).ok()
}

fn never_answers(s: TcpStream) {
    let _ = read_request(&s);
    std::thread::sleep(WAIT_MAX);
}

fn trickles(mut s: TcpStream) {
    if read_request(&s).is_none() {
        return;
    }
    let _ = s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n");
    for _ in 0..100 {
        if s.write_all(b"x").is_err() {
            return;
        }
        std::thread::sleep(Duration::from_secs(1));
    }
}

fn huge_body(mut s: TcpStream) {
    if read_request(&s).is_none() {
        return;
    }
    let _ = s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 52428800\r\n\r\n");
    let chunk = vec![b'y'; 1 << 20];
    for _ in 0..50 {
        if s.write_all(&chunk).is_err() {
            return;
        }
    }
}

fn resets(s: TcpStream) {
    let _ = read_request(&s);
    // SO_LINGER 0: closing sends a RST instead of a FIN.
    use std::os::fd::AsRawFd;
    let linger = libc::linger { l_onoff: 1, l_linger: 0 };
    // SAFETY: setsockopt on a socket this thread owns, with a pointer to a live `linger` of the
    // size passed.
    unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            size_of::<libc::linger>() as libc::socklen_t,
        );
    }
    drop(s);
}

fn redirects(mut s: TcpStream) {
    if read_request(&s).is_some() {
        let _ = s.write_all(
            b"HTTP/1.1 302 Found\r\nlocation: http://127.0.0.1:9/elsewhere\r\ncontent-length: 0\r\n\r\n",
        );
    }
}

fn too_many(mut s: TcpStream) {
    if read_request(&s).is_some() {
        let _ = s.write_all(
            b"HTTP/1.1 429 Too Many Requests\r\nretry-after: 3600\r\ncontent-length: 4\r\n\r\nslow",
        );
    }
}

/// A TLS server whose certificate no client trusts (self-signed).
fn bad_tls(s: TcpStream) {
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
    let Ok(certified) = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned()]) else { return };
    let cert = CertificateDer::from(certified.cert.der().to_vec());
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(certified.signing_key.serialize_der()));
    let Ok(builder) =
        rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
    else {
        return;
    };
    let Ok(config) = builder.with_no_client_auth().with_single_cert(vec![cert], key) else { return };
    let Ok(conn) = rustls::ServerConnection::new(Arc::new(config)) else { return };
    let mut tls = rustls::StreamOwned::new(conn, s);
    let mut buf = [0u8; 1024];
    let _ = tls.read(&mut buf);
}

fn attempts(server: &Server, key: &str, delivery: &str) -> Vec<Value> {
    let (status, body) =
        server.call("GET", &format!("/v1/webhook_deliveries/{delivery}/attempts"), Some(key), None);
    assert_eq!(status, 200, "{body}");
    body["data"].as_array().cloned().unwrap_or_default()
}

/// Waits until the delivery has at least one attempt recorded; returns the first.
fn first_attempt(server: &Server, key: &str, delivery: &str) -> Value {
    let deadline = Instant::now() + WAIT_MAX;
    loop {
        if let Some(a) = attempts(server, key, delivery).into_iter().next() {
            return a;
        }
        assert!(Instant::now() < deadline, "no attempt recorded for {delivery}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn hostile_receivers_are_recorded_as_failures_and_do_not_starve_a_healthy_one() {
    // One attempt each (the retry is an hour out) and a 4 s whole-attempt timeout.
    let server =
        Server::start_with(&[("HERALD_DELIVERY_RETRY_SCHEDULE", "1h"), ("HERALD_DELIVERY_TIMEOUT", "4s")]);
    let (_, key) = server.org_key(&["events.write", "endpoints.write", "deliveries.read"]);
    let hostile: Vec<(&str, Raw, &str)> = vec![
        ("never answers", Raw::start(never_answers), "http"),
        ("trickles", Raw::start(trickles), "http"),
        ("50 MB body", Raw::start(huge_body), "http"),
        ("resets", Raw::start(resets), "http"),
        ("invalid TLS", Raw::start(bad_tls), "https"),
        ("redirects", Raw::start(redirects), "http"),
        ("429", Raw::start(too_many), "http"),
    ];
    for (name, raw, scheme) in &hostile {
        let e = server.endpoint(&key, &raw.url(scheme), &[name.split(' ').next().unwrap_or("x")]);
        assert_eq!(e["status"], "active");
    }
    let healthy = Receiver::start();
    server.endpoint(&key, &healthy.url("/ok"), &["healthy"]);

    // Each hostile receiver gets one event.
    let mut deliveries = Vec::new();
    for (name, _, _) in &hostile {
        let event = server.publish(&key, name.split(' ').next().unwrap_or("x"), json!({"to": name}));
        deliveries.push(event["delivery_ids"][0].as_str().unwrap().to_owned());
    }
    // Meanwhile the healthy endpoint's events arrive one after the other at their own pace: each
    // is received long before the hostile attempts (which hold their slots for the 4 s timeout)
    // are done. The latency is measured from each publish's answer, so a slow machine's publish
    // rate does not count against it.
    let mut slowest = Duration::ZERO;
    for i in 0..30 {
        server.publish(&key, "healthy", json!({"n": i}));
        let published = Instant::now();
        healthy.wait_for(i + 1);
        slowest = slowest.max(published.elapsed());
    }
    assert!(slowest < Duration::from_secs(2), "a healthy delivery waited {slowest:?} behind hostile ones");

    let outcome = |i: usize| first_attempt(&server, &key, &deliveries[i]);
    let never = outcome(0);
    assert_eq!(never["error"], "Connection timeout", "{never}");
    assert!(never["duration_ms"].as_u64().unwrap() < 4_700, "{never}");
    let trickle = outcome(1);
    assert_eq!(trickle["error"], "Connection timeout", "{trickle}");
    assert!(trickle["duration_ms"].as_u64().unwrap() < 4_700, "{trickle}");
    let huge = outcome(2);
    // A 2xx whose body is over the kept excerpt: delivered, 4 KiB kept.
    assert_eq!(huge["response_status"], 200, "{huge}");
    assert!(huge["response_excerpt"].as_str().unwrap().len() <= 4096);
    let reset = outcome(3);
    assert!(reset["error"].is_string() && reset["response_status"].is_null(), "{reset}");
    let tls = outcome(4);
    assert!(tls["error"].as_str().unwrap().starts_with("TLS"), "{tls}");
    let redirect = outcome(5);
    assert_eq!(redirect["response_status"], 302, "{redirect}");
    assert_eq!(redirect["error"], "HTTP 302");
    let limited = outcome(6);
    assert_eq!(limited["response_status"], 429);
    // Retry-After: 3600 pushes the next attempt an hour out, beyond the schedule's own hour
    // minus its jitter.
    let (_, d) = server.call("GET", &format!("/v1/webhook_deliveries/{}", deliveries[6]), Some(&key), None);
    assert_eq!(d["status"], "pending");
    let next = herald_server::parse_ts(d["next_attempt_at"].as_str().unwrap()).unwrap();
    let finished = herald_server::parse_ts(limited["finished_at"].as_str().unwrap()).unwrap();
    assert!(next >= finished + 3_600_000, "next attempt {next} only {} ms after {finished}", next - finished);

    // Memory stayed bounded while a receiver sent 50 MB.
    let rss_mib = peak::hwm_kib(server.pid().unwrap()) / 1024;
    assert!(rss_mib < 200, "herald peaked at {rss_mib} MiB");
    let (status, _) = server.call("GET", "/healthz", None, None);
    assert_eq!(status, 200);
}
