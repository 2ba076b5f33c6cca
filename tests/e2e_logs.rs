//! The JSON log of a real `herald serve`: a failed attempt, its endpoint going inactive and the
//! request id of the publish that caused them are all found in it (at the default level, info),
//! and the admin key never is.

mod common;

use std::time::{Duration, Instant};

use common::{call_raw_headers, RawRequest, Receiver, Server, ORG_SCOPES, WAIT_MAX};
use serde_json::{json, Value};

/// The JSON lines of the log so far (a line that is not JSON fails the test: every line must be).
fn lines(server: &Server) -> Vec<Value> {
    server
        .log()
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not a JSON line ({e}): {l}")))
        .collect()
}

/// Waits until a line of the log matches `found`; returns it.
fn wait_line(server: &Server, what: &str, found: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + WAIT_MAX;
    loop {
        if let Some(line) = lines(server).into_iter().find(|l| found(l)) {
            return line;
        }
        assert!(Instant::now() < deadline, "no log line for {what} in:\n{}", server.log());
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn message(line: &Value) -> &str {
    line["fields"]["message"].as_str().unwrap_or("")
}

/// The value of `name` in the line's own fields or in the fields of any of its spans.
fn field<'a>(line: &'a Value, name: &str) -> Option<&'a Value> {
    let own = line["fields"].get(name);
    own.or_else(|| line["spans"].as_array()?.iter().find_map(|span| span.get(name)))
}

/// The line of `message` (or starting with it) that names `request_id`.
fn line_of_request(server: &Server, what: &str, message_start: &str, request_id: &str) -> Value {
    wait_line(server, what, |l| {
        message(l).starts_with(message_start)
            && field(l, "request_id").and_then(Value::as_str) == Some(request_id)
    })
}

fn request_id_of(headers: &[(String, String)]) -> Option<&str> {
    headers.iter().find(|(name, _)| name == "x-request-id").map(|(_, v)| v.as_str())
}

#[test]
fn the_json_log_tells_the_failed_attempt_the_inactive_endpoint_and_the_request_id() {
    let receiver = Receiver::start();
    receiver.set_status(500);
    // No HERALD_ADMIN_KEY: herald makes one at first start, prints it to the terminal (stdout) and
    // the key file; it must not reach the log. The level is the default (info): nothing is logged
    // per publish, yet the attempt's lines name the publish's request.
    let mut server = Server::start_logged(&[
        ("HERALD_ADMIN_KEY", ""),
        ("HERALD_LOG_FORMAT", "json"),
        ("HERALD_ENDPOINT_HEALTH_FAILURES", "2"),
        ("RUST_LOG", ""),
    ]);
    let admin_key = std::fs::read_to_string(server.data_dir.join("admin.key")).expect("admin.key");
    let admin_key = admin_key.trim().to_owned();
    assert!(admin_key.starts_with("sk_"), "{admin_key}");

    let org = uuid::Uuid::now_v7().to_string();
    let (status, body) = server.call(
        "POST",
        "/v1/api_keys",
        Some(&admin_key),
        Some(json!({"org_id": org, "scopes": ORG_SCOPES, "name": "e2e logs"})),
    );
    assert_eq!(status, 201, "{body}");
    let key = body["key"].as_str().expect("key").to_owned();
    let endpoint = server.endpoint(&key, &receiver.url("/hook"), &["order.created"]);
    let endpoint_id = endpoint["id"].as_str().expect("endpoint id").to_owned();

    let request_id = "e2e-logs-request-0001";
    let publish = json!({"event_type": "order.created", "payload": {"n": 1}}).to_string();
    let url = server.url("/v1/events");
    let request =
        RawRequest { url: &url, method: "POST", key: Some(&key), body: Some(&publish), headers: &[] };
    let (status, headers, body) =
        call_raw_headers(&RawRequest { headers: &[("x-request-id", request_id)], ..request }, WAIT_MAX)
            .expect("publish");
    assert_eq!(status, 202, "{body}");
    assert_eq!(request_id_of(&headers), Some(request_id), "the given id is echoed: {headers:?}");
    let published: Value = serde_json::from_str(&body).expect("publish JSON");
    let event_id = published["id"].as_str().expect("event id").to_owned();
    let delivery_id = published["delivery_ids"][0].as_str().expect("delivery id").to_owned();

    // A request without an id, or with an invalid one, gets one made (prefix-number), echoed.
    let url = server.url("/healthz");
    let healthz = RawRequest { url: &url, method: "GET", key: None, body: None, headers: &[] };
    let (_, headers, _) = call_raw_headers(&healthz, WAIT_MAX).expect("healthz");
    let made = request_id_of(&headers).expect("a made id").to_owned();
    let (prefix, number) = made.split_once('-').expect("prefix-number");
    assert!(prefix.len() == 8 && number.parse::<u64>().is_ok(), "{made}");
    let invalid = RawRequest { headers: &[("x-request-id", "has\"quote")], ..healthz };
    let (_, headers, _) = call_raw_headers(&invalid, WAIT_MAX).expect("healthz");
    let replaced = request_id_of(&headers).expect("a made id");
    assert!(replaced.starts_with(prefix) && replaced != made, "{replaced} after {made}");

    // Two failures in a row make the endpoint inactive (HERALD_ENDPOINT_HEALTH_FAILURES=2).
    server.wait_status(&key, &delivery_id, "inactive");

    // Both failed attempts name the publish's request, its event and delivery.
    let failed = line_of_request(&server, "the failed attempt", "attempt failed", request_id);
    assert_eq!(failed["level"], "WARN", "{failed}");
    assert_eq!(field(&failed, "delivery_id").and_then(Value::as_str), Some(delivery_id.as_str()), "{failed}");
    assert_eq!(field(&failed, "event_id").and_then(Value::as_str), Some(event_id.as_str()), "{failed}");
    assert_eq!(field(&failed, "status").and_then(Value::as_u64), Some(500), "{failed}");
    assert_eq!(field(&failed, "endpoint_id").and_then(Value::as_str), Some(endpoint_id.as_str()), "{failed}");
    assert!(field(&failed, "next_attempt_at_ms").is_some(), "{failed}");
    // The second (a retry, from the loop's memory of the delivery's request), once it is durable.
    wait_line(&server, "the second failed attempt", |l| {
        message(l) == "attempt failed" && field(l, "attempt").and_then(Value::as_u64) == Some(2)
    });
    let failures = lines(&server)
        .iter()
        .filter(|l| message(l) == "attempt failed")
        .map(|l| field(l, "request_id").and_then(Value::as_str).map(str::to_owned))
        .collect::<Vec<_>>();
    assert!(failures.len() >= 2 && failures.iter().all(|r| r.as_deref() == Some(request_id)), "{failures:?}");

    let inactive = line_of_request(&server, "the endpoint going inactive", "endpoint inactive", request_id);
    assert_eq!(inactive["level"], "WARN", "{inactive}");
    assert_eq!(field(&inactive, "endpoint_id").and_then(Value::as_str), Some(endpoint_id.as_str()));
    assert_eq!(field(&inactive, "delivery_id").and_then(Value::as_str), Some(delivery_id.as_str()));
    // Once: the failures after it do not make it inactive again.
    let inactive_lines =
        lines(&server).iter().filter(|l| message(l).starts_with("endpoint inactive")).count();
    assert_eq!(inactive_lines, 1, "{}", server.log());
    // At info nothing is logged per request that succeeds.
    assert!(!lines(&server).iter().any(|l| message(l) == "request answered"), "{}", server.log());

    // Enabled again: the endpoint-active line.
    let (status, body) =
        server.call("POST", &format!("/v1/endpoints/{endpoint_id}/enable"), Some(&key), None);
    assert!(status < 300, "{status} {body}");
    wait_line(&server, "the endpoint active again", |l| {
        message(l).starts_with("endpoint active again")
            && field(l, "endpoint_id").and_then(Value::as_str) == Some(&endpoint_id)
    });

    // A bulk recover: its start and end, naming its request.
    let recover = json!({"status": ["inactive"]}).to_string();
    let url = server.url("/v1/webhook_deliveries/recover");
    let request = RawRequest {
        url: &url,
        method: "POST",
        key: Some(&key),
        body: Some(&recover),
        headers: &[("x-request-id", "e2e-logs-recover")],
    };
    let (status, _, body) = call_raw_headers(&request, WAIT_MAX).expect("recover");
    assert_eq!(status, 200, "{body}");
    line_of_request(&server, "the recovery's start", "recovery started", "e2e-logs-recover");
    let done = line_of_request(&server, "the recovery's end", "recovery done", "e2e-logs-recover");
    assert_eq!(field(&done, "queued").and_then(Value::as_u64), Some(1), "{done}");

    // The start and stop lines.
    assert!(server.terminate(), "herald stopped cleanly");
    let log = server.log();
    assert!(lines(&server).iter().any(|l| message(l).starts_with("herald listening on")), "{log}");
    assert!(lines(&server).iter().any(|l| message(l).starts_with("herald stopped")), "{log}");
    assert!(!log.contains(&admin_key), "the admin key is in the log:\n{log}");
    assert!(!log.contains(&key), "an API key is in the log:\n{log}");
}
