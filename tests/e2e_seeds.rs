//! The seed routes and the native API end to end, against the real binary: seeds 000 and 001 (an
//! endpoint that fails into the inactive state, its failures, the retrigger), seed 002 (the admin
//! batch retrigger, its validation and rate limit), seed 003 (redeliver), idempotent publish,
//! pagination without loss or repetition, events, attempts and the audit log, secret rotation.

mod common;

use std::collections::{BTreeSet, HashSet};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

use base64::Engine as _;
use common::{call_raw, Receiver, Server, ADMIN_KEY, ORG_SCOPES, WAIT_MAX};
use hmac::{Hmac, Mac};
use serde_json::{json, Value};

/// The seed 003 delivery fields, plus `event_id`.
const DELIVERY_KEYS: &[&str] = &[
    "id",
    "event_id",
    "org_id",
    "endpoint_id",
    "call_id",
    // API.md "Ordering key" (issue 21): on every delivery, null without a key.
    "ordering_key",
    "event_type",
    "url",
    "status",
    "attempt_count",
    "manual_retry_count",
    "next_attempt_at",
    "last_error",
    "last_response_status",
    "delivered_at",
    "created_at",
    "updated_at",
];

fn keys(v: &Value) -> BTreeSet<String> {
    v.as_object().unwrap_or_else(|| panic!("not an object: {v}")).keys().cloned().collect()
}

fn key_set(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(|s| s.to_string()).collect()
}

fn s(v: &Value) -> String {
    v.as_str().unwrap_or_else(|| panic!("not a string: {v}")).to_owned()
}

/// Asserts a native error: exactly `{"name", "error", "status"}`.
fn assert_named(status: u16, body: &Value, want_status: u16, want_name: &str) {
    assert_eq!(status, want_status, "{body}");
    assert_eq!(keys(body), key_set(&["name", "error", "status"]), "{body}");
    assert_eq!(body["name"], want_name, "{body}");
    assert_eq!(body["status"], want_status, "{body}");
    assert!(!s(&body["error"]).is_empty(), "{body}");
}

/// Asserts a seed 000/001 error: exactly `{"error"}`.
fn assert_plain(status: u16, body: &Value, want_status: u16) {
    assert_eq!(status, want_status, "{body}");
    assert_eq!(keys(body), key_set(&["error"]), "{body}");
    assert!(!s(&body["error"]).is_empty(), "{body}");
}

/// Polls `check` until it gives a value, for at most [`WAIT_MAX`].
fn wait_for<T>(what: &str, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + WAIT_MAX;
    loop {
        if let Some(v) = check() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A target that accepts connections (the kernel's backlog) and never answers: an attempt to it
/// stays in flight until the delivery timeout, so its delivery stays `pending`.
fn blackhole() -> (TcpListener, String) {
    let l = TcpListener::bind("127.0.0.1:0").expect("no port for a blackhole");
    let url = format!("http://127.0.0.1:{}/hole", l.local_addr().expect("addr").port());
    (l, url)
}

/// Every item of a list route, following `next_cursor` (`path` holds its query, if any).
fn walk(server: &Server, key: &str, path: &str, field: &str, limit: usize) -> Vec<Value> {
    let mut out = Vec::new();
    let mut cursor: Option<String> = None;
    let sep = if path.contains('?') { '&' } else { '?' };
    for _ in 0..10_000 {
        let mut url = format!("{path}{sep}limit={limit}");
        if let Some(c) = &cursor {
            url.push_str(&format!("&cursor={c}"));
        }
        let (status, body) = server.call("GET", &url, Some(key), None);
        assert_eq!(status, 200, "{url}: {body}");
        let page = body[field].as_array().unwrap_or_else(|| panic!("{url}: {body}"));
        assert!(page.len() <= limit, "{url}: {} items over the limit", page.len());
        out.extend(page.iter().cloned());
        match &body["next_cursor"] {
            Value::Null => return out,
            Value::String(c) => cursor = Some(c.clone()),
            other => panic!("{url}: next_cursor {other}"),
        }
    }
    panic!("{path}: the cursor never ended");
}

fn ids(items: &[Value]) -> Vec<String> {
    items.iter().map(|v| s(&v["id"])).collect()
}

/// Asserts every id appears once and the ids are newest first (UUID v7: descending).
fn assert_newest_first_once(what: &str, ids: &[String]) {
    let unique: HashSet<&String> = ids.iter().collect();
    assert_eq!(unique.len(), ids.len(), "{what}: an id appears twice");
    for pair in ids.windows(2) {
        assert!(pair[0] > pair[1], "{what}: {} before {} is not newest first", pair[0], pair[1]);
    }
}

/// RFC 3339 UTC (`...Z`, optional fraction) as unix milliseconds.
fn rfc3339_ms(text: &str) -> i64 {
    let t = text.strip_suffix('Z').unwrap_or_else(|| panic!("{text}: no Z"));
    let (date, time) = t.split_once('T').unwrap_or_else(|| panic!("{text}: no T"));
    let d: Vec<i64> = date.split('-').map(|p| p.parse().expect("date")).collect();
    let (hms, frac) = time.split_once('.').unwrap_or((time, ""));
    let h: Vec<i64> = hms.split(':').map(|p| p.parse().expect("time")).collect();
    let ms = if frac.is_empty() { 0 } else { format!("{frac:0<3}")[..3].parse::<i64>().expect("fraction") };
    // Days from the civil date (Howard Hinnant's algorithm).
    let (y, m) = if d[1] <= 2 { (d[0] - 1, d[1] + 9) } else { (d[0], d[1] - 3) };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * m + 2) / 5 + d[2] - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    ((days * 24 + h[0]) * 60 + h[1]) * 60_000 + h[2] * 1000 + ms
}

fn assert_ts(v: &Value) {
    let text = s(v);
    assert!(text.ends_with('Z'), "{text}");
    rfc3339_ms(&text);
}

/// A GET answered in full: status, headers (lowercase names), body text.
fn get_full(server: &Server, path: &str, key: &str) -> (u16, Vec<(String, String)>, String) {
    let mut stream = TcpStream::connect(("127.0.0.1", server.port)).expect("connect");
    stream.set_read_timeout(Some(WAIT_MAX)).expect("timeout");
    let req = format!(
        "GET {path} HTTP/1.1\r\nhost: 127.0.0.1\r\nconnection: close\r\nauthorization: Bearer {key}\r\n\r\n"
    );
    stream.write_all(req.as_bytes()).expect("write");
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).expect("read");
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n").expect("no header end");
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let mut body = raw[split + 4..].to_vec();
    let mut lines = head.lines();
    let status: u16 =
        lines.next().and_then(|l| l.split_whitespace().nth(1)).and_then(|c| c.parse().ok()).expect("status");
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    if headers.iter().any(|(k, v)| k == "transfer-encoding" && v.eq_ignore_ascii_case("chunked")) {
        let mut out = Vec::new();
        let mut rest = &body[..];
        loop {
            let end = rest.windows(2).position(|w| w == b"\r\n").expect("chunk size");
            let n = usize::from_str_radix(String::from_utf8_lossy(&rest[..end]).trim(), 16).expect("hex");
            if n == 0 {
                break;
            }
            out.extend_from_slice(&rest[end + 2..end + 2 + n]);
            rest = &rest[end + 2 + n + 2..];
        }
        body = out;
    }
    (status, headers, String::from_utf8_lossy(&body).into_owned())
}

fn endpoint_status(server: &Server, key: &str, id: &str) -> Value {
    let (status, body) = server.call("GET", &format!("/v1/endpoints/{id}"), Some(key), None);
    assert_eq!(status, 200, "{body}");
    body
}

fn attempts(server: &Server, key: &str, delivery: &str) -> Vec<Value> {
    let (status, body) =
        server.call("GET", &format!("/v1/webhook_deliveries/{delivery}/attempts"), Some(key), None);
    assert_eq!(status, 200, "{body}");
    assert_eq!(keys(&body), key_set(&["data"]), "{body}");
    body["data"].as_array().expect("data").clone()
}

fn delivery(server: &Server, key: &str, id: &str) -> Value {
    let (status, body) = server.call("GET", &format!("/v1/webhook_deliveries/{id}"), Some(key), None);
    assert_eq!(status, 200, "{body}");
    body
}

fn first_delivery(event: &Value) -> String {
    s(&event["delivery_ids"][0])
}

// ---------------------------------------------------------------------------------------------
// 1. Seeds 000 and 001.
// ---------------------------------------------------------------------------------------------

#[test]
fn seeds_000_001_failures_go_inactive_and_are_retriggered() {
    // 3 attempts per delivery (1 + 2 retries); the 4th failure in a row makes the endpoint inactive.
    let server = Server::start_with(&[("HERALD_ENDPOINT_HEALTH_FAILURES", "4")]);
    let receiver = Receiver::start();
    receiver.set_status(503);
    let (_, key) = server.org_key(ORG_SCOPES);
    let endpoint = server.endpoint(&key, &receiver.url("/hook"), &["*"]);
    let ep = s(&endpoint["id"]);

    // The schedule used up while the endpoint stays active: exhausted.
    let d1 = first_delivery(&server.publish(&key, "call.ended", json!({"n": 1})));
    let d = server.wait_status(&key, &d1, "exhausted");
    assert_eq!(d["attempt_count"], 3, "{d}");
    assert_eq!(d["last_response_status"], 503, "{d}");
    assert_eq!(d["last_error"], "HTTP 503", "{d}");
    assert_eq!(d["next_attempt_at"], Value::Null, "{d}");
    assert_eq!(d["delivered_at"], Value::Null, "{d}");
    assert_eq!(receiver.received().len(), 3);
    assert_eq!(endpoint_status(&server, &key, &ep)["status"], "active");

    // Seed 001: the exhausted delivery is a failure, in the exact shape.
    let (status, body) =
        server.call("GET", &format!("/api/v4/tasks/webhook_failures/{d1}"), Some(&key), None);
    assert_eq!(status, 200, "{body}");
    assert_eq!(keys(&body), key_set(&["webhook_failure"]), "{body}");
    let f = &body["webhook_failure"];
    assert_eq!(
        keys(f),
        key_set(&[
            "id",
            "event",
            "status",
            "reason",
            "webhook",
            "last_attempt_at",
            "created_at",
            "updated_at"
        ]),
        "{f}"
    );
    assert_eq!(f["id"], d1.as_str());
    assert_eq!(f["event"], "call.ended");
    assert_eq!(f["status"], "exhausted");
    assert_eq!(f["reason"], "HTTP 503");
    assert_eq!(f["webhook"], json!({"id": ep, "name": "e2e receiver"}));
    for field in ["last_attempt_at", "created_at", "updated_at"] {
        assert_ts(&f[field]);
    }
    assert!(rfc3339_ms(&s(&f["last_attempt_at"])) >= rfc3339_ms(&s(&f["created_at"])), "{f}");

    // Two more events: the 4th failure makes the endpoint inactive; both deliveries end inactive
    // (the one not yet attempted by the cascade, or its own failure against an inactive endpoint).
    let d2 = first_delivery(&server.publish(&key, "call.ended", json!({"n": 2})));
    let d3 = first_delivery(&server.publish(&key, "call.ended", json!({"n": 3})));
    server.wait_status(&key, &d2, "inactive");
    server.wait_status(&key, &d3, "inactive");
    let e = endpoint_status(&server, &key, &ep);
    assert_eq!(e["status"], "inactive", "{e}");
    assert!(e["inactive_reason"].is_string(), "{e}");
    // The run that made it inactive: the 4 failures the rule counts, oldest to newest.
    assert_eq!(e["failure_run"]["failures"], 4, "{e}");
    assert!(
        rfc3339_ms(&s(&e["failure_run"]["first_at"])) <= rfc3339_ms(&s(&e["failure_run"]["last_at"])),
        "{e}"
    );
    let seen = receiver.received().len();
    assert!((4..=5).contains(&seen), "{seen} requests");

    // While inactive, a new event is stored as an inactive delivery that gets no attempt.
    let d4 = first_delivery(&server.publish(&key, "call.ended", json!({"n": 4})));
    let d = delivery(&server, &key, &d4);
    assert_eq!(d["status"], "inactive", "{d}");
    assert_eq!(d["next_attempt_at"], Value::Null, "{d}");
    std::thread::sleep(Duration::from_millis(900)); // longer than the whole schedule
    let d = delivery(&server, &key, &d4);
    assert_eq!((d["status"].clone(), d["attempt_count"].clone()), (json!("inactive"), json!(0)), "{d}");
    assert_eq!(receiver.received().len(), seen, "an inactive endpoint got a request");
    assert!(attempts(&server, &key, &d4).is_empty());
    let (status, body) =
        server.call("GET", &format!("/api/v4/tasks/webhook_failures/{d4}"), Some(&key), None);
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["webhook_failure"]["status"], "inactive");
    assert_eq!(body["webhook_failure"]["last_attempt_at"], Value::Null, "{body}");
    assert!(body["webhook_failure"]["reason"].is_string(), "{body}");
    let (_, body) = server.call("GET", &format!("/api/v4/tasks/webhook_failures/{d2}"), Some(&key), None);
    assert_eq!(body["webhook_failure"]["reason"], "HTTP 503", "{body}");

    // The list: newest first, filters, cursors.
    let mut inactive = vec![d2.clone(), d3.clone(), d4.clone()];
    inactive.sort_by(|a, b| b.cmp(a));
    let mut all = inactive.clone();
    all.push(d1.clone());
    let list = |query: &str| -> Vec<String> {
        let (status, body) =
            server.call("GET", &format!("/api/v4/tasks/webhook_failures{query}"), Some(&key), None);
        assert_eq!(status, 200, "{query}: {body}");
        assert_eq!(keys(&body), key_set(&["webhook_failures", "next_cursor"]), "{body}");
        body["webhook_failures"].as_array().expect("list").iter().map(|f| s(&f["id"])).collect()
    };
    assert_eq!(list(""), all);
    assert_eq!(list("?status=exhausted"), vec![d1.clone()]);
    assert_eq!(list("?status=inactive"), inactive);
    assert_eq!(list(&format!("?webhook_id={ep}")), all);
    assert_eq!(list(&format!("?webhook_id={ep}&status=inactive")), inactive);
    assert_eq!(list(&format!("?webhook_id={}", uuid::Uuid::now_v7())), Vec::<String>::new());
    for limit in [1, 2, 3] {
        assert_eq!(
            ids(&walk(&server, &key, "/api/v4/tasks/webhook_failures", "webhook_failures", limit)),
            all
        );
    }
    let paged = walk(&server, &key, "/api/v4/tasks/webhook_failures?status=inactive", "webhook_failures", 1);
    assert_eq!(ids(&paged), inactive);
    for bad in ["?status=pending", "?status=nope", "?limit=0", "?webhook_id=xyz", "?cursor=@@"] {
        let (status, body) =
            server.call("GET", &format!("/api/v4/tasks/webhook_failures{bad}"), Some(&key), None);
        assert_plain(status, &body, 400);
    }

    // Seed 000: the receiver is fixed; the retrigger delivers and makes the endpoint active again.
    receiver.set_status(200);
    let (status, body) =
        server.call("POST", &format!("/api/webhooks/v1/failures/{d2}/retrigger"), Some(&key), None);
    assert_eq!((status, body.clone()), (200, json!({"status": "success", "failure_id": d2})));
    let d = server.wait_status(&key, &d2, "delivered");
    assert_eq!(d["manual_retry_count"], 1, "{d}");
    assert_eq!(d["last_response_status"], 200, "{d}");
    assert_eq!(d["last_error"], Value::Null, "{d}");
    assert_ts(&d["delivered_at"]);
    let tries = attempts(&server, &key, &d2);
    let last = tries.last().expect("attempts");
    assert_eq!((last["trigger"].clone(), last["response_status"].clone()), (json!("manual"), json!(200)));
    assert!(tries[..tries.len() - 1].iter().all(|a| a["trigger"] == "auto"), "{tries:?}");
    let e = wait_for("the endpoint active again", || {
        let e = endpoint_status(&server, &key, &ep);
        (e["status"] == "active").then_some(e)
    });
    assert_eq!(e["inactive_reason"], Value::Null, "{e}");
    assert_eq!(e["failure_run"], Value::Null, "a success ends the run: {e}");
    // Deliveries already inactive stay so until retriggered.
    assert_eq!(delivery(&server, &key, &d3)["status"], "inactive");
    assert_eq!(delivery(&server, &key, &d4)["status"], "inactive");
    // No longer a failure.
    let (status, body) =
        server.call("GET", &format!("/api/v4/tasks/webhook_failures/{d2}"), Some(&key), None);
    assert_plain(status, &body, 404);
    let (status, body) =
        server.call("POST", &format!("/api/webhooks/v1/failures/{d2}/retrigger"), Some(&key), None);
    assert_eq!((status, body), (404, json!({"error": format!("No failed webhook found with ID {d2}")})));
    // An exhausted one, by its simple (32-hex) id.
    let simple = d1.replace('-', "");
    let (status, body) =
        server.call("POST", &format!("/api/webhooks/v1/failures/{simple}/retrigger"), Some(&key), None);
    // Responses use the lowercase hyphenated form, whatever form the path used.
    assert_eq!((status, body), (200, json!({"status": "success", "failure_id": d1})));
    let d = server.wait_status(&key, &d1, "delivered");
    assert_eq!((d["manual_retry_count"].clone(), d["attempt_count"].clone()), (json!(1), json!(4)), "{d}");

    // The errors of seed 000.
    let unknown = uuid::Uuid::now_v7().to_string();
    for id in [unknown.as_str(), "aabbccddeeff", "not-a-uuid"] {
        let (status, body) =
            server.call("POST", &format!("/api/webhooks/v1/failures/{id}/retrigger"), Some(&key), None);
        assert_eq!((status, body), (404, json!({"error": format!("No failed webhook found with ID {id}")})));
    }
    let path = format!("/api/webhooks/v1/failures/{d3}/retrigger");
    for bad_key in [None, Some("sk_not_a_key_of_this_server_000000"), Some("nonsense")] {
        let (status, body) = server.call("POST", &path, bad_key, None);
        assert_eq!((status, body), (401, json!({"error": "Invalid API key"})));
    }
    let (_, scopeless) = server.org_key(&["tasks.webhooks.read"]);
    let (status, body) = server.call("POST", &path, Some(&scopeless), None);
    assert_plain(status, &body, 403);
    // Another organisation's failure is not found, even with the scope.
    let (_, other) = server.org_key(&["deliveries.write", "tasks.webhooks.read"]);
    let (status, body) = server.call("POST", &path, Some(&other), None);
    assert_eq!((status, body), (404, json!({"error": format!("No failed webhook found with ID {d3}")})));
    let (status, body) =
        server.call("GET", &format!("/api/v4/tasks/webhook_failures/{d3}"), Some(&other), None);
    assert_plain(status, &body, 404);
    let (status, body) = server.call("GET", "/api/v4/tasks/webhook_failures", Some(&other), None);
    assert_eq!((status, body), (200, json!({"webhook_failures": [], "next_cursor": null})));
    // The errors of seed 001.
    let failure = format!("/api/v4/tasks/webhook_failures/{d3}");
    let (status, body) = server.call("GET", &failure, None, None);
    assert_eq!((status, body), (401, json!({"error": "Invalid API key"})));
    let (_, no_scope) = server.org_key(&["deliveries.read"]);
    let (status, body) = server.call("GET", &failure, Some(&no_scope), None);
    assert_plain(status, &body, 403);
    let (status, body) = server.call("GET", "/api/v4/tasks/webhook_failures", Some(&no_scope), None);
    assert_plain(status, &body, 403);
    for id in [unknown.as_str(), "aabbccddeeff001122334455"] {
        let (status, body) =
            server.call("GET", &format!("/api/v4/tasks/webhook_failures/{id}"), Some(&key), None);
        assert_plain(status, &body, 404);
    }
    // The original key still sees d3 as a failure and can retrigger it.
    let (status, _) = server.call("POST", &path, Some(&key), None);
    assert_eq!(status, 200);
    server.wait_status(&key, &d3, "delivered");
}

#[test]
fn seed_001_a_timeout_is_a_connection_timeout_failure() {
    let server = Server::start_with(&[("HERALD_DELIVERY_TIMEOUT", "250ms")]);
    let (_hole, hole_url) = blackhole();
    let (_, key) = server.org_key(ORG_SCOPES);
    let (status, endpoint) = server.call(
        "POST",
        "/v1/endpoints",
        Some(&key),
        Some(json!({"url": hole_url, "name": "CRM call events"})),
    );
    assert_eq!(status, 201, "{endpoint}");
    assert_eq!(endpoint["enabled_events"], json!(["*"]));
    let id = first_delivery(&server.publish(&key, "call.ended", json!({})));
    let d = server.wait_status(&key, &id, "exhausted");
    assert_eq!(
        (d["attempt_count"].clone(), d["last_response_status"].clone()),
        (json!(3), Value::Null),
        "{d}"
    );
    let (status, body) =
        server.call("GET", &format!("/api/v4/tasks/webhook_failures/{id}"), Some(&key), None);
    assert_eq!(status, 200, "{body}");
    let f = &body["webhook_failure"];
    assert_eq!(f["reason"], "Connection timeout", "{f}");
    assert_eq!(f["webhook"], json!({"id": endpoint["id"], "name": "CRM call events"}));
    assert!(attempts(&server, &key, &id).iter().all(|a| a["response_status"].is_null()));
}

// ---------------------------------------------------------------------------------------------
// 2. Seed 002.
// ---------------------------------------------------------------------------------------------

#[test]
fn seed_002_admin_batch_retrigger() {
    let server = Server::start_with(&[
        ("HERALD_RETRIGGER_MAX_PER_WINDOW", "2"),
        ("HERALD_RETRIGGER_WINDOW", "5m"),
        ("HERALD_ENDPOINT_HEALTH_FAILURES", "100"),
        ("HERALD_DELIVERY_TIMEOUT", "15s"),
    ]);
    let failing = Receiver::start();
    failing.set_status(503);
    let ok = Receiver::start();
    let (_hole, hole_url) = blackhole();
    let (_, key) = server.org_key(ORG_SCOPES);
    let a = s(&server.endpoint(&key, &failing.url("/a"), &["a.event"])["id"]);
    let b = s(&server.endpoint(&key, &ok.url("/b"), &["b.event"])["id"]);

    let failed = first_delivery(&server.publish(&key, "a.event", json!({"k": "failed"})));
    server.wait_status(&key, &failed, "exhausted");
    // The endpoint now points at a target that never answers: its next delivery stays pending.
    let (status, body) =
        server.call("PATCH", &format!("/v1/endpoints/{a}"), Some(&key), Some(json!({"url": hole_url})));
    assert_eq!(status, 200, "{body}");
    let pending = first_delivery(&server.publish(&key, "a.event", json!({"k": "pending"})));
    let other = first_delivery(&server.publish(&key, "b.event", json!({"k": "other endpoint"})));
    server.wait_status(&key, &other, "delivered");
    let unknown = uuid::Uuid::now_v7().to_string();
    assert_eq!(delivery(&server, &key, &pending)["status"], "pending");

    let path_a = format!("/api/notifications/v1/admin/webhooks/{a}/notifications/retrigger");
    let batch = |path: &str, key: Option<&str>, body: &str| -> (u16, Value) {
        server.call_with("POST", path, key, Some(body), &[])
    };

    // A mix: one success, three failed items. Ids in the simple or uppercase form are answered
    // in the lowercase hyphenated form.
    let ids = [failed.to_uppercase(), pending.replace('-', ""), other.clone(), unknown.clone()];
    let (status, body) = batch(&path_a, Some(ADMIN_KEY), &json!({"webhookNotificationIds": ids}).to_string());
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        keys(&body),
        key_set(&[
            "totalRequested",
            "totalSuccess",
            "totalFailed",
            "successfulNotifications",
            "failedNotifications"
        ]),
        "{body}"
    );
    assert_eq!(
        (body["totalRequested"].clone(), body["totalSuccess"].clone(), body["totalFailed"].clone()),
        (json!(4), json!(1), json!(3))
    );
    let ok_items = body["successfulNotifications"].as_array().expect("successes");
    assert_eq!(ok_items.len(), 1, "{body}");
    let item = &ok_items[0];
    assert_eq!(keys(item), key_set(&["webhookNotificationId", "retriggeredNotificationRequestId", "error"]));
    assert_eq!(item["webhookNotificationId"], failed.as_str());
    assert_eq!(item["error"], Value::Null);
    let request_id = s(&item["retriggeredNotificationRequestId"]);
    assert!(uuid::Uuid::parse_str(&request_id).is_ok(), "{request_id}");
    let bad_items = body["failedNotifications"].as_array().expect("failures");
    let bad_ids: Vec<String> = bad_items.iter().map(|i| s(&i["webhookNotificationId"])).collect();
    assert_eq!(bad_ids, vec![pending.clone(), other.clone(), unknown.clone()]);
    for i in bad_items {
        assert_eq!(keys(i), key_set(&["webhookNotificationId", "retriggeredNotificationRequestId", "error"]));
        assert_eq!(i["retriggeredNotificationRequestId"], Value::Null, "{i}");
        assert!(!s(&i["error"]).is_empty(), "{i}");
    }
    // The retriggered one was re-queued (its attempt now goes to the endpoint's current url, the
    // target that never answers, so it stays pending).
    let d = delivery(&server, &key, &failed);
    assert_eq!((d["status"].clone(), d["manual_retry_count"].clone()), (json!("pending"), json!(1)), "{d}");
    assert_eq!(delivery(&server, &key, &pending)["manual_retry_count"], 0);
    assert_eq!(delivery(&server, &key, &other)["manual_retry_count"], 0);

    // Invalid requests: 400 ValidationFailed, and they do not count against the rate limit.
    let many: Vec<String> = (0..26).map(|_| uuid::Uuid::now_v7().to_string()).collect();
    let invalid = [
        json!({"webhookNotificationIds": []}).to_string(),
        json!({"webhookNotificationIds": many}).to_string(),
        json!({"webhookNotificationIds": [failed, "not-a-uuid"]}).to_string(),
        json!({"webhookNotificationIds": [failed, failed]}).to_string(),
        json!({"webhookNotificationIds": [failed, failed.replace('-', "")]}).to_string(),
        json!({}).to_string(),
        json!({"webhookNotificationIds": failed}).to_string(),
        json!({"webhookNotificationIds": [1, 2]}).to_string(),
        json!({"webhookNotificationIds": null}).to_string(),
    ];
    for body_text in &invalid {
        let (status, body) = batch(&path_a, Some(ADMIN_KEY), body_text);
        assert_named(status, &body, 400, "ValidationFailed");
    }
    let (status, body) = batch(&path_a, Some(ADMIN_KEY), "{not json");
    assert_eq!(status, 400, "{body}");
    assert_eq!(keys(&body), key_set(&["name", "error", "status"]), "{body}");
    // Unknown webhooks, non-admin keys, no key.
    let one = json!({"webhookNotificationIds": [failed]}).to_string();
    for webhook in [uuid::Uuid::now_v7().to_string(), "nope".to_owned(), pending.clone()] {
        let path = format!("/api/notifications/v1/admin/webhooks/{webhook}/notifications/retrigger");
        let (status, body) = batch(&path, Some(ADMIN_KEY), &one);
        assert_named(status, &body, 404, "NotFound");
    }
    let (status, body) = batch(&path_a, Some(&key), &one);
    assert_named(status, &body, 403, "AccessDenied");
    let (status, body) = batch(&path_a, None, &one);
    assert_named(status, &body, 401, "Unauthorized");

    // The second counted request passes (none of the rejected ones counted)...
    let (status, body) =
        batch(&path_a, Some(ADMIN_KEY), &json!({"webhookNotificationIds": [pending]}).to_string());
    assert_eq!(status, 200, "{body}");
    assert_eq!((body["totalRequested"].clone(), body["totalFailed"].clone()), (json!(1), json!(1)), "{body}");
    // ...the third is over the window's limit.
    let (status, body) = batch(&path_a, Some(ADMIN_KEY), &one);
    assert_named(status, &body, 400, "RETRIGGER_RATE_LIMITED");
    // The limit is per endpoint: endpoint b has its own window. A delivered notification is sent again.
    let path_b = format!("/api/notifications/v1/admin/webhooks/{b}/notifications/retrigger");
    let (status, body) =
        batch(&path_b, Some(ADMIN_KEY), &json!({"webhookNotificationIds": [other]}).to_string());
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["totalSuccess"], 1, "{body}");
    wait_for("the batch-retriggered delivery sent again", || (ok.received().len() >= 2).then_some(()));
    let d = server.wait_status(&key, &other, "delivered");
    assert_eq!(d["manual_retry_count"], 1, "{d}");
}

// ---------------------------------------------------------------------------------------------
// 3. Seed 003.
// ---------------------------------------------------------------------------------------------

#[test]
fn seed_003_redeliver() {
    let server = Server::start_with(&[("HERALD_DELIVERY_TIMEOUT", "15s")]);
    let receiver = Receiver::start();
    let (_hole, hole_url) = blackhole();
    let (org, key) = server.org_key(ORG_SCOPES);
    let ep = s(&server.endpoint(&key, &receiver.url("/r"), &["call.queued"])["id"]);
    server.endpoint(&key, &hole_url, &["call.ringing"]);

    let call_id = uuid::Uuid::now_v7().to_string();
    let (status, event) = server.call(
        "POST",
        "/v1/events",
        Some(&key),
        Some(json!({"event_type": "call.queued", "payload": {"c": 1}, "call_id": call_id})),
    );
    assert_eq!(status, 202, "{event}");
    let event_id = s(&event["id"]);
    let id = first_delivery(&event);
    let before = server.wait_status(&key, &id, "delivered");
    assert_eq!(keys(&before), key_set(DELIVERY_KEYS), "{before}");

    let (status, d) =
        server.call("POST", &format!("/v1/webhook_deliveries/{id}/redeliver"), Some(&key), None);
    assert_eq!(status, 200, "{d}");
    assert_eq!(keys(&d), key_set(DELIVERY_KEYS), "{d}");
    assert_eq!(d["id"], id.as_str());
    assert_eq!(d["event_id"], event_id.as_str());
    assert_eq!(d["org_id"], org.as_str());
    assert_eq!(d["endpoint_id"], ep.as_str());
    assert_eq!(d["call_id"], call_id.as_str());
    assert_eq!(d["event_type"], "call.queued");
    assert_eq!(d["url"], receiver.url("/r"));
    assert_eq!(d["status"], "pending");
    assert_eq!(d["attempt_count"], 1);
    assert_eq!(d["manual_retry_count"], 1);
    assert_ts(&d["next_attempt_at"]);
    assert_ts(&d["created_at"]);
    assert_ts(&d["updated_at"]);
    assert_eq!(d["created_at"], before["created_at"]);

    // Sent again with the same webhook-id and the next attempt number.
    let got = receiver.wait_for(2);
    assert_eq!(got.len(), 2);
    for (n, r) in got.iter().enumerate() {
        assert_eq!(r.header("webhook-id"), event_id, "request {n}");
        assert_eq!(r.header("herald-delivery-id"), id, "request {n}");
        assert_eq!(r.header("herald-attempt"), (n + 1).to_string(), "request {n}");
        assert_eq!(r.body, br#"{"c":1}"#);
    }
    let after = server.wait_status(&key, &id, "delivered");
    assert_eq!((after["attempt_count"].clone(), after["manual_retry_count"].clone()), (json!(2), json!(1)));
    let tries = attempts(&server, &key, &id);
    let triggers: Vec<&Value> = tries.iter().map(|a| &a["trigger"]).collect();
    assert_eq!(triggers, vec!["auto", "manual"]);

    // After the endpoint moved, a redeliver goes to its new url, and the delivery says so.
    let (status, moved) = server.call(
        "PATCH",
        &format!("/v1/endpoints/{ep}"),
        Some(&key),
        Some(json!({"url": receiver.url("/moved")})),
    );
    assert_eq!(status, 200, "{moved}");
    let (status, d) =
        server.call("POST", &format!("/v1/webhook_deliveries/{id}/redeliver"), Some(&key), None);
    assert_eq!(status, 200, "{d}");
    assert_eq!(d["url"], receiver.url("/moved"), "{d}");
    assert_eq!(receiver.wait_for(3)[2].path, "/moved");
    let after = server.wait_status(&key, &id, "delivered");
    assert_eq!(
        (after["url"].clone(), after["attempt_count"].clone()),
        (json!(receiver.url("/moved")), json!(3))
    );

    // A pending delivery (its attempt hangs until the timeout): 409.
    let slow = first_delivery(&server.publish(&key, "call.ringing", json!({})));
    assert_eq!(delivery(&server, &key, &slow)["status"], "pending");
    let (status, body) =
        server.call("POST", &format!("/v1/webhook_deliveries/{slow}/redeliver"), Some(&key), None);
    assert_named(status, &body, 409, "Conflict");
    assert_eq!(delivery(&server, &key, &slow)["manual_retry_count"], 0);

    // Unknown, malformed, another organisation's: 404. No key: 401. No scope: 403.
    let (_, stranger) = server.org_key(ORG_SCOPES);
    for (path_id, k) in
        [(uuid::Uuid::now_v7().to_string(), &key), ("xyz".to_owned(), &key), (id.clone(), &stranger)]
    {
        let (status, body) =
            server.call("POST", &format!("/v1/webhook_deliveries/{path_id}/redeliver"), Some(k), None);
        assert_named(status, &body, 404, "NotFound");
    }
    let path = format!("/v1/webhook_deliveries/{id}/redeliver");
    let (status, body) = server.call("POST", &path, None, None);
    assert_named(status, &body, 401, "Unauthorized");
    let (_, reader) = server.org_key(&["deliveries.read"]);
    let (status, body) = server.call("POST", &path, Some(&reader), None);
    assert_named(status, &body, 403, "AccessDenied");
    assert_eq!(delivery(&server, &key, &id)["manual_retry_count"], 2);
}

// ---------------------------------------------------------------------------------------------
// 4. Idempotent publish.
// ---------------------------------------------------------------------------------------------

#[test]
fn idempotent_publish_delivers_once() {
    let server = Server::start();
    let receiver = Receiver::start();
    let (_, key) = server.org_key(ORG_SCOPES);
    server.endpoint(&key, &receiver.url("/i"), &["*"]);
    let body = json!({"event_type": "order.paid", "payload": {"order": 7}}).to_string();
    let publish = |idem: &str, body: &str| -> Value {
        let (status, out) =
            server.call_with("POST", "/v1/events", Some(&key), Some(body), &[("Idempotency-Key", idem)]);
        assert_eq!(status, 202, "{out}");
        out
    };
    let first = publish("key-1", &body);
    assert_eq!(keys(&first), key_set(&["id", "event_type", "created_at", "delivery_ids"]));
    let second = publish("key-1", &body);
    assert_eq!(first, second);
    // The first answer even if the body differs: nothing is written.
    let third = publish("key-1", &json!({"event_type": "order.refunded", "payload": 1}).to_string());
    assert_eq!(first, third);

    receiver.wait_for(1);
    server.wait_status(&key, &first_delivery(&first), "delivered");
    // A replay writes nothing to the log. (The log is read up to its durable end, which may
    // trail the projection by a group commit: wait until it is durable first.)
    let audit = || get_full(&server, "/v1/audit/log?after=0&limit=10000", ADMIN_KEY).2;
    server.wait_durable();
    let text = audit();
    assert!(text.contains(r#""type":"AttemptRecorded""#), "the attempt is in the audit log: {text}");
    let before = text.lines().count();
    assert_eq!(publish("key-1", &body), first);
    assert_eq!(audit().lines().count(), before, "a replayed publish wrote to the log");
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(receiver.received().len(), 1, "one event, one delivery, one request");
    let all = walk(&server, &key, "/v1/webhook_deliveries", "data", 50);
    assert_eq!(ids(&all), vec![first_delivery(&first)]);

    let other = publish("key-2", &body);
    assert_ne!(other["id"], first["id"]);
    assert_ne!(other["delivery_ids"], first["delivery_ids"]);
    receiver.wait_for(2);
    assert_eq!(walk(&server, &key, "/v1/webhook_deliveries", "data", 50).len(), 2);
    // Another organisation's same key is its own.
    let (_, key2) = server.org_key(ORG_SCOPES);
    let (status, out) =
        server.call_with("POST", "/v1/events", Some(&key2), Some(&body), &[("Idempotency-Key", "key-1")]);
    assert_eq!(status, 202, "{out}");
    assert_ne!(out["id"], first["id"]);
}

// ---------------------------------------------------------------------------------------------
// 5. Pagination.
// ---------------------------------------------------------------------------------------------

#[test]
fn pagination_neither_loses_nor_repeats() {
    let server = Server::start();
    let ra = Receiver::start();
    let rb = Receiver::start();
    let (_, key) = server.org_key(ORG_SCOPES);
    let a = s(&server.endpoint(&key, &ra.url("/a"), &["*"])["id"]);
    let b = s(&server.endpoint(&key, &rb.url("/b"), &["*"])["id"]);
    let mut published = Vec::new();
    for n in 0..60 {
        let kind = if n % 2 == 0 { "p.even" } else { "p.odd" };
        let e = server.publish(&key, kind, json!({"n": n}));
        assert_eq!(e["delivery_ids"].as_array().map(Vec::len), Some(2), "{e}");
        published.push(e);
    }
    let expected: HashSet<String> =
        published.iter().flat_map(|e| e["delivery_ids"].as_array().expect("ids").iter().map(s)).collect();
    assert_eq!(expected.len(), 120);
    wait_for("120 delivered", || {
        (walk(&server, &key, "/v1/webhook_deliveries?status=delivered", "data", 250).len() == 120)
            .then_some(())
    });

    let full = walk(&server, &key, "/v1/webhook_deliveries", "data", 7);
    let full_ids = ids(&full);
    assert_newest_first_once("all", &full_ids);
    assert_eq!(full_ids.iter().cloned().collect::<HashSet<_>>(), expected);
    for d in &full {
        assert_eq!(keys(d), key_set(DELIVERY_KEYS), "{d}");
    }
    let created: Vec<i64> = full.iter().map(|d| rfc3339_ms(&s(&d["created_at"]))).collect();
    assert!(created.windows(2).all(|w| w[0] >= w[1]), "created_at not newest first");

    // Filtered walks give exactly the matching subsequence of the full walk.
    let subseq = |pred: &dyn Fn(&Value) -> bool| -> Vec<String> {
        full.iter().filter(|d| pred(d)).map(|d| s(&d["id"])).collect()
    };
    let check = |query: &str, pred: &dyn Fn(&Value) -> bool, count: Option<usize>| {
        let got = ids(&walk(&server, &key, &format!("/v1/webhook_deliveries?{query}"), "data", 7));
        assert_newest_first_once(query, &got);
        let want = subseq(pred);
        if let Some(n) = count {
            assert_eq!(want.len(), n, "{query}");
        }
        assert_eq!(got, want, "{query}");
    };
    check("status=delivered", &|_| true, Some(120));
    check(&format!("endpoint_id={a}"), &|d| d["endpoint_id"] == a.as_str(), Some(60));
    check(&format!("endpoint_id={b}&status=delivered"), &|d| d["endpoint_id"] == b.as_str(), Some(60));
    check("event_type=p.odd", &|d| d["event_type"] == "p.odd", Some(60));
    check(
        &format!("endpoint_id={a}&event_type=p.even&status=delivered"),
        &|d| d["endpoint_id"] == a.as_str() && d["event_type"] == "p.even",
        Some(30),
    );
    let (hi_text, lo_text) = (s(&full[30]["created_at"]), s(&full[90]["created_at"]));
    let (hi, lo) = (rfc3339_ms(&hi_text), rfc3339_ms(&lo_text));
    let window = |d: &Value| {
        let t = rfc3339_ms(&s(&d["created_at"]));
        t > lo && t < hi
    };
    check(&format!("created_after={lo_text}&created_before={hi_text}"), &window, None);
    check(&format!("created_after={lo_text}"), &|d| rfc3339_ms(&s(&d["created_at"])) > lo, None);
    check(&format!("created_before={hi_text}"), &|d| rfc3339_ms(&s(&d["created_at"])) < hi, None);
    check(
        &format!("created_after={lo_text}&created_before={hi_text}&event_type=p.even&endpoint_id={b}"),
        &|d| window(d) && d["event_type"] == "p.even" && d["endpoint_id"] == b.as_str(),
        None,
    );
    check("status=pending", &|_| false, Some(0));
    for bad in [
        "status=done",
        "limit=251",
        "limit=0",
        "endpoint_id=zz",
        "event_type=a%20b",
        "created_after=yesterday",
        "cursor=%21",
    ] {
        let (status, body) = server.call("GET", &format!("/v1/webhook_deliveries?{bad}"), Some(&key), None);
        assert_named(status, &body, 400, "ValidationFailed");
    }

    // Events published while a walk is under way come before its cursor: the walk still sees
    // every delivery it started with exactly once.
    let mut seen: Vec<String> = Vec::new();
    let mut cursor: Option<String> = None;
    for n in 0.. {
        let query = match &cursor {
            Some(c) => format!("/v1/webhook_deliveries?limit=7&cursor={c}"),
            None => "/v1/webhook_deliveries?limit=7".to_owned(),
        };
        let (status, body) = server.call("GET", &query, Some(&key), None);
        assert_eq!(status, 200, "{body}");
        seen.extend(ids(body["data"].as_array().expect("data")));
        if n < 5 {
            server.publish(&key, "p.late", json!({"late": n}));
        }
        match &body["next_cursor"] {
            Value::String(c) => cursor = Some(c.clone()),
            _ => break,
        }
    }
    assert_eq!(seen, full_ids, "a walk under concurrent publishes lost or repeated a delivery");

    // Endpoints: 12 of another organisation, 5 a page, newest first.
    let (_, key2) = server.org_key(ORG_SCOPES);
    let mut made: Vec<String> =
        (0..12).map(|n| s(&server.endpoint(&key2, &ra.url(&format!("/e{n}")), &["*"])["id"])).collect();
    made.reverse();
    let listed = walk(&server, &key2, "/v1/endpoints", "data", 5);
    assert_eq!(ids(&listed), made);
    assert_newest_first_once("endpoints", &made);
    for e in &listed {
        assert!(e.get("secret").is_none(), "a listed endpoint shows its secret: {e}");
    }
    // The first organisation still sees only its own two.
    assert_eq!(ids(&walk(&server, &key, "/v1/endpoints", "data", 1)), vec![b.clone(), a.clone()]);
}

// ---------------------------------------------------------------------------------------------
// 6. Events, attempts, the audit log.
// ---------------------------------------------------------------------------------------------

#[test]
fn events_attempts_and_the_audit_chain() {
    let server = Server::start();
    let receiver = Receiver::start();
    receiver.set_status(503);
    let (_, key) = server.org_key(ORG_SCOPES);
    let endpoint = server.endpoint(&key, &receiver.url("/x"), &["*"]);
    let ep = s(&endpoint["id"]);
    let first_secret = s(&endpoint["secret"]);
    let (status, rotated) =
        server.call("POST", &format!("/v1/endpoints/{ep}/secret/rotate"), Some(&key), None);
    assert_eq!(status, 200, "{rotated}");
    let second_secret = s(&rotated["secret"]);

    // The payload, byte for byte: key order, number forms, escapes.
    let payload =
        r#"{"z":1,"a":[1.50,"\u00e9é",-0.0,1e3],"n":null,"big":123456789012345678901234567890,"o":{}}"#;
    let body = format!(r#"{{"event_type":"call.ended","payload":{payload}}}"#);
    let (status, event) = server.call_with("POST", "/v1/events", Some(&key), Some(&body), &[]);
    assert_eq!(status, 202, "{event}");
    let event_id = s(&event["id"]);
    let id = first_delivery(&event);
    let (status, text) =
        call_raw(&server.url(&format!("/v1/events/{event_id}")), "GET", Some(&key), None, &[])
            .expect("get event");
    assert_eq!(status, 200, "{text}");
    assert!(text.contains(&format!(r#""payload":{payload}"#)), "payload changed: {text}");
    let got: Value = serde_json::from_str(&text).expect("event JSON");
    assert_eq!(got["id"], event_id.as_str());
    assert_eq!(got["event_type"], "call.ended");
    assert_eq!(got["delivery_ids"], event["delivery_ids"]);
    assert_eq!(got["created_at"], event["created_at"]);
    let (status, body) =
        server.call("GET", &format!("/v1/events/{}", uuid::Uuid::now_v7()), Some(&key), None);
    assert_named(status, &body, 404, "NotFound");
    let (_, stranger) = server.org_key(ORG_SCOPES);
    let (status, body) = server.call("GET", &format!("/v1/events/{event_id}"), Some(&stranger), None);
    assert_named(status, &body, 404, "NotFound");

    // Three attempts, oldest first, with the documented fields.
    server.wait_status(&key, &id, "exhausted");
    let received = receiver.wait_for(3);
    assert!(received.iter().all(|r| r.body == payload.as_bytes()), "the receiver got other bytes");
    let tries = attempts(&server, &key, &id);
    assert_eq!(tries.len(), 3, "{tries:?}");
    let mut previous_start = i64::MIN;
    for (n, a) in tries.iter().enumerate() {
        assert_eq!(
            keys(a),
            key_set(&[
                "attempt",
                "trigger",
                "started_at",
                "finished_at",
                "duration_ms",
                "response_status",
                "error",
                "response_excerpt"
            ]),
            "{a}"
        );
        assert_eq!(a["attempt"], n + 1, "{a}");
        assert_eq!(a["trigger"], "auto", "{a}");
        assert_eq!(a["response_status"], 503, "{a}");
        assert_eq!(a["error"], "HTTP 503", "{a}");
        assert_eq!(a["response_excerpt"], "ok", "{a}");
        let (start, end) = (rfc3339_ms(&s(&a["started_at"])), rfc3339_ms(&s(&a["finished_at"])));
        assert!(start <= end, "{a}");
        assert!(a["duration_ms"].as_u64().is_some(), "{a}");
        assert!(start >= previous_start, "attempts not oldest first");
        previous_start = start;
    }
    let (status, body) = server.call(
        "GET",
        &format!("/v1/webhook_deliveries/{}/attempts", uuid::Uuid::now_v7()),
        Some(&key),
        None,
    );
    assert_named(status, &body, 404, "NotFound");

    // The audit log: NDJSON, a hash chain, no secret. (It shows durable records only: wait until
    // the last attempt's record is.)
    server.wait_durable();
    let (status, headers, text) = get_full(&server, "/v1/audit/log?after=0&limit=1000", ADMIN_KEY);
    assert_eq!(status, 200, "{text}");
    let content_type = headers.iter().find(|(k, _)| k == "content-type").map(|(_, v)| v.as_str());
    assert!(content_type.is_some_and(|v| v.starts_with("application/x-ndjson")), "{headers:?}");
    let lines: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    // At least: two organisation keys, the endpoint, its rotation, the publish (one record with
    // its delivery) and three attempts.
    assert!(lines.len() >= 8, "{} records", lines.len());
    let mut types = HashSet::new();
    for (n, r) in lines.iter().enumerate() {
        for field in ["seq", "at", "hash", "prev_hash", "event"] {
            assert!(r.get(field).is_some(), "no {field}: {r}");
        }
        assert_ts(&r["at"]);
        types.insert(s(&r["event"]["type"]));
        if n > 0 {
            let prev = &lines[n - 1];
            assert!(r["seq"].as_u64() > prev["seq"].as_u64(), "seqs not increasing at {r}");
            assert_eq!(r["prev_hash"], prev["hash"], "the chain breaks at {r}");
        }
    }
    assert_eq!(lines[0]["seq"], 1);
    for t in [
        "ApiKeyCreated",
        "EndpointCreated",
        "EndpointSecretRotated",
        "EventPublishedWithDeliveries",
        "AttemptRecorded",
    ] {
        assert!(types.contains(t), "no {t} in {types:?}");
    }
    for secret in [&first_secret, &second_secret] {
        let raw = secret.strip_prefix("whsec_").expect("whsec_");
        assert!(!text.contains(raw), "the audit log shows an endpoint secret");
    }
    assert!(!text.contains(&key), "the audit log shows an API key");
    // `after` skips what was seen.
    let mid = lines[4]["seq"].as_u64().expect("seq");
    let (status, _, rest) = get_full(&server, &format!("/v1/audit/log?after={mid}&limit=1000"), ADMIN_KEY);
    assert_eq!(status, 200);
    let first_rest: Value = serde_json::from_str(rest.lines().next().expect("a record")).expect("JSON");
    assert_eq!(first_rest["seq"], mid + 1);
    assert_eq!(first_rest["prev_hash"], lines[4]["hash"]);
    let (status, body) = server.call("GET", "/v1/audit/log?after=0", Some(&key), None);
    assert_named(status, &body, 403, "AccessDenied");
}

// ---------------------------------------------------------------------------------------------
// 7. Secret rotation.
// ---------------------------------------------------------------------------------------------

fn signature(secret: &str, msg_id: &str, timestamp: &str, body: &[u8]) -> String {
    let key = base64::engine::general_purpose::STANDARD
        .decode(secret.strip_prefix("whsec_").expect("whsec_"))
        .expect("base64 secret");
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(&key).expect("any key length");
    mac.update(format!("{msg_id}.{timestamp}.").as_bytes());
    mac.update(body);
    format!("v1,{}", base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes()))
}

#[test]
fn rotated_secrets_both_sign() {
    let server = Server::start();
    let receiver = Receiver::start();
    let (_, key) = server.org_key(ORG_SCOPES);
    let endpoint = server.endpoint(&key, &receiver.url("/s"), &["*"]);
    let ep = s(&endpoint["id"]);
    let old = s(&endpoint["secret"]);

    // Before the rotation: one signature, by the only secret.
    let e1 = server.publish(&key, "k.one", json!({"before": true}));
    let got = receiver.wait_for(1);
    let r = &got[0];
    let (msg_id, ts) = (r.header("webhook-id"), r.header("webhook-timestamp"));
    assert_eq!(msg_id, e1["id"].as_str().unwrap());
    assert_eq!(r.header("webhook-signature"), signature(&old, msg_id, ts, &r.body));

    let (status, rotated) =
        server.call("POST", &format!("/v1/endpoints/{ep}/secret/rotate"), Some(&key), None);
    assert_eq!(status, 200, "{rotated}");
    assert_eq!(rotated["id"], ep.as_str());
    let new = s(&rotated["secret"]);
    assert!(new.starts_with("whsec_") && new != old, "{new}");
    let shown = endpoint_status(&server, &key, &ep);
    assert!(shown.get("secret").is_none(), "{shown}");

    let e2 = server.publish(&key, "k.two", json!({"after": "rotation"}));
    let got = receiver.wait_for(2);
    let r = &got[1];
    let (msg_id, ts) = (r.header("webhook-id"), r.header("webhook-timestamp"));
    assert_eq!(msg_id, e2["id"].as_str().unwrap());
    let now_s = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_secs();
    let ts_s: u64 = ts.parse().expect("unix seconds");
    assert!(now_s.abs_diff(ts_s) < 60, "webhook-timestamp {ts_s}, now {now_s}");
    let sigs: Vec<&str> = r.header("webhook-signature").split(' ').collect();
    assert_eq!(sigs.len(), 2, "{sigs:?}");
    assert!(sigs.iter().all(|s| s.starts_with("v1,")), "{sigs:?}");
    assert_eq!(sigs[0], signature(&new, msg_id, ts, &r.body), "the new secret signs first");
    assert_eq!(sigs[1], signature(&old, msg_id, ts, &r.body), "the old secret still signs");
    // A signature over other bytes does not match.
    assert_ne!(sigs[0], signature(&new, msg_id, ts, b"{}"));
}
