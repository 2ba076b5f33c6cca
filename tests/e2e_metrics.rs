//! `/metrics` of the real server: every series of earlier versions with its type, the histograms,
//! the build info, and a publish counted even though its client hung up before the answer.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Instant;

use common::{Receiver, Server, WAIT_MAX};
use serde_json::json;

/// Every series earlier versions showed, with its type: dashboards and alerts read them.
const KEPT: &[(&str, &str)] = &[
    ("herald_events_published_total", "counter"),
    ("herald_connections_refused_total", "counter"),
    ("herald_due_queue_length", "gauge"),
    ("herald_delivery_lag_seconds", "gauge"),
    ("herald_attempts_in_flight", "gauge"),
    ("herald_deliveries_parked", "gauge"),
    ("herald_log_committed_seq", "gauge"),
    ("herald_projection_applied_seq", "gauge"),
    ("herald_commit_batches_total", "counter"),
    ("herald_commit_commands_total", "counter"),
    ("herald_commit_failed_batches_total", "counter"),
    ("herald_commit_last_batch_commands", "gauge"),
    ("herald_store_refusing_writes", "gauge"),
    ("herald_flush_seconds_total", "counter"),
    ("herald_flush_seconds_max", "gauge"),
    ("herald_read_cache_hits_total", "counter"),
    ("herald_read_cache_misses_total", "counter"),
    ("herald_read_cache_known_absent_total", "counter"),
    ("herald_retention_runs_total", "counter"),
    ("herald_retention_failures_total", "counter"),
    ("herald_retention_records_dropped_total", "counter"),
    ("herald_retention_deliveries_dropped_total", "counter"),
    ("herald_attempts_total", "counter"),
    ("herald_deliveries", "gauge"),
    ("herald_http_requests_total", "counter"),
    ("herald_build_info", "gauge"),
    ("herald_attempt_duration_seconds", "histogram"),
    ("herald_publish_duration_seconds", "histogram"),
    ("herald_flush_duration_seconds", "histogram"),
];

/// Publishes whose client closes the connection right after sending the request.
const HUNG_UP: usize = 10;

/// `/metrics` with its content type.
fn scrape(server: &Server) -> (String, String) {
    let url = server.url("/metrics");
    let host = url.strip_prefix("http://").unwrap().split('/').next().unwrap().to_owned();
    let mut s = TcpStream::connect(&host).unwrap();
    s.set_read_timeout(Some(WAIT_MAX)).unwrap();
    write!(s, "GET /metrics HTTP/1.1\r\nhost: {host}\r\nconnection: close\r\n\r\n").unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let content_type = head
        .lines()
        .find_map(|l| l.split_once(':').filter(|(n, _)| n.eq_ignore_ascii_case("content-type")))
        .map(|(_, v)| v.trim().to_owned())
        .unwrap();
    (content_type, body.to_owned())
}

/// The value of the line that starts with `series ` (labels included).
fn value(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.trim().parse().ok())
}

#[test]
fn a_publish_whose_client_hung_up_is_counted_and_every_series_keeps_its_name_and_type() {
    let server = Server::start();
    let receiver = Receiver::start();
    let (_, key) = server.org_key(&["events.write", "endpoints.write"]);
    server.endpoint(&key, &receiver.url("/hook"), &["call.ended"]);

    // Requests, each connection closed at once after its request: no one waits for an answer.
    // (One the server drops before it reaches the engine is not published, nor counted.)
    let url = server.url("/v1/events");
    let host = url.strip_prefix("http://").unwrap().split('/').next().unwrap().to_owned();
    for n in 0..HUNG_UP {
        let body = json!({"event_type": "call.ended", "payload": {"n": n}}).to_string();
        let mut s = TcpStream::connect(&host).unwrap();
        write!(
            s,
            "POST /v1/events HTTP/1.1\r\nhost: {host}\r\nauthorization: Bearer {key}\r\n\
             content-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        drop(s);
    }
    // Counted by the engine once durable, whatever became of the request: as many as arrived.
    let deadline = Instant::now() + WAIT_MAX;
    let (text, arrived) = loop {
        let (content_type, text) = scrape(&server);
        assert_eq!(content_type, "text/plain; version=0.0.4");
        let arrived = receiver.received().len();
        let delivered = value(&text, "herald_attempt_duration_seconds_count{outcome=\"delivered\"}");
        let published = value(&text, "herald_events_published_total");
        let pending = value(&text, "herald_deliveries{status=\"pending\"}").unwrap_or(0.0);
        let settled = arrived > 0 && pending == 0.0 && delivered == Some(arrived as f64);
        if (settled && published == Some(arrived as f64)) || Instant::now() > deadline {
            break (text, arrived);
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    assert!(arrived >= 1, "no hung-up publish was made: {text}");
    let arrived = arrived as f64;
    assert_eq!(value(&text, "herald_events_published_total"), Some(arrived), "{text}");
    assert_eq!(
        value(&text, "herald_attempt_duration_seconds_count{outcome=\"delivered\"}"),
        Some(arrived),
        "{text}"
    );
    assert_eq!(value(&text, "herald_publish_duration_seconds_count"), Some(arrived), "{text}");
    assert_eq!(
        value(&text, "herald_attempt_duration_seconds_count{outcome=\"failed\"}"),
        Some(0.0),
        "{text}"
    );
    assert_eq!(
        value(&text, "herald_attempt_duration_seconds_bucket{outcome=\"delivered\",le=\"+Inf\"}"),
        Some(arrived),
        "{text}"
    );
    let flushes = value(&text, "herald_flush_duration_seconds_count").unwrap();
    assert!(flushes >= 3.0, "a key, an endpoint, a publish and an attempt were each flushed: {text}");
    assert_eq!(value(&text, "herald_flush_duration_seconds_bucket{le=\"+Inf\"}"), Some(flushes), "{text}");
    assert!(value(&text, "herald_flush_duration_seconds_bucket{le=\"0.0001\"}").is_some(), "{text}");
    let version = format!("herald_build_info{{version=\"{}\"}}", env!("CARGO_PKG_VERSION"));
    assert_eq!(value(&text, &version), Some(1.0), "{text}");
    for (name, kind) in KEPT {
        assert!(text.contains(&format!("\n# TYPE {name} {kind}\n")), "no {name} of type {kind} in {text}");
    }
    // Buckets are cumulative.
    let buckets: Vec<f64> = text
        .lines()
        .filter(|l| l.starts_with("herald_publish_duration_seconds_bucket"))
        .map(|l| l.rsplit(' ').next().unwrap().parse().unwrap())
        .collect();
    assert!(buckets.len() >= 10 && buckets.windows(2).all(|w| w[0] <= w[1]), "{text}");
}
