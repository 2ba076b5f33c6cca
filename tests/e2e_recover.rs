//! Bulk recover and event-type patterns against the real binary and real receivers: a recover of
//! many inactive deliveries that all arrive once the receiver is back, a dry run that writes
//! nothing, bad input refused naming the field, organisation isolation, and patterns in fan-out.

mod common;

use std::time::{Duration, Instant};

use common::{Receiver, Server, ADMIN_KEY, ORG_SCOPES};
use serde_json::{json, Value};

/// Endpoints (all at one receiver) and events per endpoint of the large recover: every event
/// fans out to every endpoint, 100 x 1,000 = 100,000 deliveries, the figure. A debug
/// build commits them in about 20 s, so the recover's request may take up to
/// `LARGE_RECOVER_MAX` (and the server's `[server] request_timeout` is raised to match); the
/// release figures are `benches/recover.rs`'s (committed in 6.0 s, all delivered in 23 s).
const ENDPOINTS: usize = 100;
const EVENTS: usize = 1_000;
/// The large recover's one request, at most.
const LARGE_RECOVER_MAX: Duration = Duration::from_secs(240);
/// The large recover's whole run is bounded by this.
const LARGE_WAIT_MAX: Duration = Duration::from_secs(480);

/// A server whose endpoints go inactive at their first failure. Its attempts in flight are
/// bounded well below what the test receiver (a thread per connection) answers on a loaded
/// machine: a refused connection would be a failure, and would make its endpoint inactive again.
fn server() -> Server {
    Server::start_with(&[
        ("HERALD_ENDPOINT_HEALTH_FAILURES", "1"),
        ("HERALD_DELIVERY_MAX_IN_FLIGHT_TOTAL", "32"),
        ("HERALD_SERVER_REQUEST_TIMEOUT", "240s"),
    ])
}

fn recover(server: &Server, key: &str, body: Value) -> (u16, Value) {
    server.call("POST", "/v1/webhook_deliveries/recover", Some(key), Some(body))
}

fn metric_deliveries(server: &Server, status: &str) -> u64 {
    server.metric(&format!("herald_deliveries{{status=\"{status}\"}} ")) as u64
}

/// Polls until `done` holds, at most `max`.
fn wait_until(max: Duration, what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + max;
    while !done() {
        assert!(Instant::now() < deadline, "{what}: not within {max:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// `ENDPOINTS` endpoints of a new organisation at a receiver that fails, made inactive by one
/// failed delivery each, then `events` more events stored inactive: returns (key, deliveries).
fn inactive_deliveries(
    server: &Server,
    receiver: &Receiver,
    endpoints: usize,
    events: usize,
) -> (String, u64) {
    let (_, key) = server.org_key(ORG_SCOPES);
    receiver.set_status(503);
    for _ in 0..endpoints {
        server.endpoint(&key, &receiver.url("/hook"), &["call.*"]);
    }
    server.publish(&key, "call.ended", json!({"n": 0}));
    let first = endpoints as u64;
    wait_until(Duration::from_secs(20), "endpoints inactive", || {
        metric_deliveries(server, "inactive") == first
    });
    std::thread::scope(|s| {
        for part in 0..4 {
            let key = &key;
            s.spawn(move || {
                for n in (1..events).filter(|n| n % 4 == part) {
                    server.publish(key, "call.ended", json!({ "n": n }));
                }
            });
        }
    });
    let total = (endpoints * events) as u64;
    assert_eq!(metric_deliveries(server, "inactive"), total);
    (key, total)
}

#[test]
fn a_recover_of_many_inactive_deliveries_delivers_every_one_once_the_receiver_is_back() {
    let started = Instant::now();
    let server = server();
    let receiver = Receiver::start();
    let (key, total) = inactive_deliveries(&server, &receiver, ENDPOINTS, EVENTS);
    let made = started.elapsed();
    receiver.set_status(200);
    let asked = Instant::now();
    let body = json!({"status": ["inactive"], "max": 100_000}).to_string();
    let url = server.url("/v1/webhook_deliveries/recover");
    let (status, text) =
        common::call_raw_within(&url, "POST", Some(&key), Some(&body), &[], LARGE_RECOVER_MAX)
            .expect("the recover is answered");
    let body: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
    assert_eq!(status, 200, "{body}");
    let committed = asked.elapsed();
    assert_eq!((body["matched"].as_u64(), body["queued"].as_u64()), (Some(total), Some(total)), "{body}");
    assert_eq!((body["truncated"].as_bool(), body["dry_run"].as_bool()), (Some(false), Some(false)));
    assert_eq!(body["sample"].as_array().map(Vec::len), Some(25));
    let id = body["recovery_id"].as_str().expect("a recovery id").to_owned();

    let path = format!("/v1/recoveries/{id}");
    let remaining = LARGE_WAIT_MAX.saturating_sub(started.elapsed());
    wait_until(remaining, "every recovered delivery delivered", || {
        let delivered = metric_deliveries(&server, "delivered");
        if delivered != total {
            eprintln!(
                "delivered {delivered}, pending {}, inactive {}, exhausted {}",
                metric_deliveries(&server, "pending"),
                metric_deliveries(&server, "inactive"),
                metric_deliveries(&server, "exhausted")
            );
        }
        delivered == total
    });
    let delivered_after = asked.elapsed();
    let (status, recovery) = server.call("GET", &path, Some(&key), None);
    assert_eq!(status, 200, "{recovery}");
    assert_eq!(
        (
            recovery["queued"].as_u64(),
            recovery["delivered"].as_u64(),
            recovery["pending"].as_u64(),
            recovery["failed"].as_u64()
        ),
        (Some(total), Some(total), Some(0), Some(0)),
        "{recovery}"
    );
    let got = receiver.received();
    let ids: std::collections::HashSet<&str> = got.iter().map(|r| r.header("herald-delivery-id")).collect();
    assert_eq!(ids.len() as u64, total, "each recovered delivery arrived");
    eprintln!(
        "recover of {total}: made in {made:?}, committed in {committed:?}, all delivered {delivered_after:?} after the request"
    );
}

/// The contract's example body with `changes` applied.
fn body_with(changes: Value) -> Value {
    let mut body = json!({"status": ["exhausted", "inactive"], "dry_run": false, "max": 10});
    for (k, v) in changes.as_object().expect("an object") {
        body[k] = v.clone();
    }
    body
}

#[test]
fn a_dry_run_writes_nothing_and_bad_input_is_refused_naming_the_field() {
    let server = server();
    let receiver = Receiver::start();
    let (key, total) = inactive_deliveries(&server, &receiver, 3, 2);
    let (_, own_key) = server.org_key(&["deliveries.write", "deliveries.read"]);
    server.wait_durable();
    let seq = server.applied_seq();

    let (status, dry) = recover(&server, &key, body_with(json!({"dry_run": true, "max": 4})));
    assert_eq!(status, 200, "{dry}");
    assert_eq!(dry["recovery_id"], Value::Null);
    assert_eq!(
        (dry["matched"].as_u64(), dry["queued"].as_u64(), dry["truncated"].as_bool()),
        (Some(4), Some(0), Some(true))
    );
    assert_eq!(dry["sample"].as_array().map(Vec::len), Some(4));

    let bad: &[(Value, &str)] = &[
        (json!({"status": []}), "status"),
        (json!({"status": ["pending"]}), "status"),
        (json!({"status": ["lost"]}), "status"),
        (json!({"status": "inactive"}), "status"),
        (json!({"max": 0}), "max"),
        (json!({"max": 100_001}), "max"),
        (json!({"max": -1}), "max"),
        (json!({"created_after": "yesterday"}), "created_after"),
        (json!({"created_before": "2026-13-01T00:00:00Z"}), "created_before"),
        (json!({"event_type": "call*"}), "event_type"),
        (json!({"event_type": "*.ended"}), "event_type"),
        (json!({"endpoint_id": "not-a-uuid"}), "endpoint_id"),
        (json!({"dry_run": "yes"}), "dry_run"),
        (json!({"org_id": "nope"}), "org_id"),
        (json!({"colour": "blue"}), "colour"),
    ];
    for (changes, field) in bad {
        let (status, body) = recover(&server, &key, body_with(changes.clone()));
        assert_eq!(status, 400, "{changes}: {body}");
        assert!(
            body["error"].as_str().is_some_and(|e| e.contains(field)),
            "{changes} should name {field}: {body}"
        );
    }
    let (status, body) = recover(&server, ADMIN_KEY, body_with(json!({})));
    assert_eq!(status, 400, "{body}");
    assert!(body["error"].as_str().is_some_and(|e| e.contains("org_id")), "{body}");
    let other_org = uuid::Uuid::now_v7().to_string();
    let (status, body) = recover(&server, &own_key, body_with(json!({"org_id": other_org})));
    assert_eq!(status, 400, "another organisation's org_id: {body}");
    assert!(body["error"].as_str().is_some_and(|e| e.contains("org_id")), "{body}");

    assert_eq!(server.applied_seq(), seq, "the log's last seq did not move");
    server.wait_durable();
    assert_eq!(server.metric("herald_log_committed_seq ") as u64, seq);
    assert_eq!(metric_deliveries(&server, "inactive"), total, "nothing was re-queued");
}

#[test]
fn a_recovery_is_its_organisations_alone_and_filters_by_pattern_endpoint_and_time() {
    let server = server();
    let receiver = Receiver::start();
    let (key, total) = inactive_deliveries(&server, &receiver, 2, 3);
    assert_eq!(total, 6);
    // Only the filter's pattern and time range: `callback.*` matches none, `call.*` all, and a
    // window after everything none.
    let none = recover(&server, &key, body_with(json!({"event_type": "callback.*", "dry_run": true}))).1;
    assert_eq!(none["matched"], 0);
    let later =
        recover(&server, &key, body_with(json!({"created_after": "2999-01-01T00:00:00Z", "dry_run": true})))
            .1;
    assert_eq!(later["matched"], 0);
    let endpoints = server.call("GET", "/v1/endpoints", Some(&key), None).1;
    let endpoint = endpoints["data"][0]["id"].as_str().expect("an endpoint").to_owned();
    let one = recover(&server, &key, body_with(json!({"endpoint_id": endpoint, "dry_run": true}))).1;
    assert_eq!(one["matched"], 3, "{one}");

    receiver.set_status(200);
    let (status, body) = recover(&server, &key, body_with(json!({"event_type": "call.*"})));
    assert_eq!((status, body["queued"].as_u64()), (200, Some(6)), "{body}");
    let id = body["recovery_id"].as_str().expect("an id").to_owned();
    let path = format!("/v1/recoveries/{id}");
    let (status, r) = server.call("GET", &path, Some(&key), None);
    assert_eq!(status, 200, "{r}");
    assert_eq!(r["filter"]["status"], json!(["exhausted", "inactive"]));
    assert_eq!(r["filter"]["event_type"], "call.*");
    assert_eq!(r["actor"]["kind"], "key");
    assert!(r["actor"]["key_id"].as_str().is_some(), "{r}");
    assert_eq!(r["queued"], 6);

    let (_, other) = server.org_key(ORG_SCOPES);
    let (status, body) = server.call("GET", &path, Some(&other), None);
    assert_eq!((status, body["name"].as_str()), (404, Some("NotFound")), "{body}");
    let (status, _) = server.call("GET", &path, Some(ADMIN_KEY), None);
    assert_eq!(status, 200, "an admin sees every organisation's recovery");
    let (status, _) = server.call("GET", "/v1/recoveries/not-an-id", Some(&key), None);
    assert_eq!(status, 404);

    // The audit log shows the recovery with its filter and its deliveries.
    server.wait_durable();
    let (status, text) =
        common::call_raw(&server.url("/v1/audit/log?after=0&limit=10000"), "GET", Some(ADMIN_KEY), None, &[])
            .expect("audit log");
    assert_eq!(status, 200);
    let record = text
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).expect("a JSON line"))
        .find(|r| r["event"]["type"] == "RecoveryRequested")
        .expect("a RecoveryRequested record");
    assert_eq!(record["event"]["id"], id.as_str());
    assert_eq!(record["event"]["filter"]["statuses"], json!(["exhausted", "inactive"]));
    assert_eq!(record["event"]["filter"]["event_type"], "call.*");
    assert_eq!(record["event"]["delivery_ids"].as_array().map(Vec::len), Some(6));
    let member = record["event"]["delivery_ids"][0].as_str().expect("a delivery id").to_owned();

    // `herald replay --recovery` on the stopped server's data: the recovery, then its deliveries.
    let mut server = server;
    assert!(server.terminate(), "herald stops");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_herald"))
        .args(["replay", "--recovery", &id, "--format", "ndjson", "--data-dir"])
        .arg(&server.data_dir)
        .output()
        .expect("herald replay");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("RecoveryRequested"), "{text}");
    assert!(text.contains(&member), "the story of its deliveries: {text}");
}

#[test]
fn a_pattern_subscribes_to_its_prefix_and_not_to_its_neighbours() {
    let server = Server::start();
    let receiver = Receiver::start();
    let (_, key) = server.org_key(ORG_SCOPES);
    server.endpoint(&key, &receiver.url("/calls"), &["call.*"]);
    for bad in ["call*", "*.ended", ".*", "call.**"] {
        let (status, body) = server.call(
            "POST",
            "/v1/endpoints",
            Some(&key),
            Some(json!({"url": receiver.url("/x"), "enabled_events": [bad]})),
        );
        assert_eq!(status, 400, "{bad}: {body}");
        assert!(body["error"].as_str().is_some_and(|e| e.contains("enabled_events")), "{body}");
    }
    let published = |event_type: &str| server.publish(&key, event_type, json!({"t": event_type}));
    let matching = published("call.queue.left");
    assert_eq!(matching["delivery_ids"].as_array().map(Vec::len), Some(1));
    for neighbour in ["call", "callback.x"] {
        assert_eq!(published(neighbour)["delivery_ids"].as_array().map(Vec::len), Some(0), "{neighbour}");
    }
    let got = receiver.wait_for(1);
    assert_eq!(got[0].header("herald-event-type"), "call.queue.left");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(receiver.received().len(), 1, "nothing else arrived");
}
