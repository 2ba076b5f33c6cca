//! A delivery's history over HTTP, against the real binary: the records that touched it, line
//! for line as `/v1/audit/log` shows them, organisation-isolated, and after a compaction only
//! what the log kept.

mod common;

use std::collections::HashMap;

use common::{Receiver, Server, ADMIN_KEY};
use serde_json::{json, Value};

const SCOPES: &[&str] = &["events.write", "endpoints.write", "deliveries.read", "deliveries.write"];

/// The NDJSON lines of a 200 answer.
fn lines(status: u16, body: &str) -> Vec<Value> {
    assert_eq!(status, 200, "{body}");
    body.lines().map(|l| serde_json::from_str(l).expect("a JSON line")).collect()
}

fn history(server: &Server, key: &str, delivery: &str) -> (u16, String) {
    let url = server.url(&format!("/v1/webhook_deliveries/{delivery}/history"));
    common::call_raw(&url, "GET", Some(key), None, &[]).unwrap()
}

/// The whole audit log, by seq.
fn audit_log(server: &Server) -> HashMap<u64, Value> {
    let (status, body) =
        common::call_raw(&server.url("/v1/audit/log?limit=10000"), "GET", Some(ADMIN_KEY), None, &[])
            .unwrap();
    lines(status, &body).into_iter().map(|l| (l["seq"].as_u64().unwrap(), l)).collect()
}

fn types(history: &[Value]) -> Vec<&str> {
    history.iter().map(|l| l["event"]["type"].as_str().unwrap()).collect()
}

/// Two endpoints of one organisation: `first` subscribed to `call.first`, `second` to
/// `call.second`; one event published to each. Returns the key and the two deliveries.
fn two_deliveries(server: &Server, first: &str, second: &str) -> (String, String, String) {
    let (_, key) = server.org_key(SCOPES);
    server.endpoint(&key, first, &["call.first"]);
    server.endpoint(&key, second, &["call.second"]);
    let delivery_of = |event_type: &str, n: u32| {
        let event = server.publish(&key, event_type, json!({ "call": n }));
        event["delivery_ids"][0].as_str().unwrap().to_owned()
    };
    let a = delivery_of("call.first", 1);
    let b = delivery_of("call.second", 2);
    (key, a, b)
}

#[test]
fn a_delivery_history_is_its_records_as_the_audit_log_shows_them() {
    let server = Server::start();
    let failing = Receiver::start();
    failing.set_status(500);
    // Two endpoints, so that five failures in a row on one do not make it inactive.
    let (key, delivery, other_delivery) =
        two_deliveries(&server, &failing.url("/down"), &failing.url("/other"));
    server.wait_status(&key, &delivery, "exhausted");
    server.wait_status(&key, &other_delivery, "exhausted");
    server.wait_durable();
    let (status, body) = history(&server, &key, &delivery);
    let story = lines(status, &body);
    // Its publish, its three attempts (the test schedule retries twice); nothing of the other.
    assert_eq!(
        types(&story),
        ["EventPublishedWithDeliveries", "AttemptRecorded", "AttemptRecorded", "AttemptRecorded"]
    );
    assert!(story[0]["event"]["deliveries"].to_string().contains(&delivery), "{body}");
    assert!(story[1..].iter().all(|l| l["event"]["delivery_id"] == delivery.as_str()), "{body}");
    let log = audit_log(&server);
    for line in &story {
        assert_eq!(Some(line), log.get(&line["seq"].as_u64().unwrap()), "as the audit log has it");
    }
    // Another organisation's key: a 404 exactly like an unknown delivery's.
    let (_, b) = server.org_key(SCOPES);
    let (theirs, theirs_body) = history(&server, &b, &delivery);
    let unknown = uuid::Uuid::now_v7().to_string();
    let (missing, missing_body) = history(&server, &b, &unknown);
    assert_eq!((theirs, missing), (404, 404));
    assert_eq!(theirs_body.replace(&delivery, "ID"), missing_body.replace(&unknown, "ID"));
    // A key without deliveries.read is refused.
    let (_, writer) = server.org_key(&["events.write"]);
    assert_eq!(history(&server, &writer, &delivery).0, 403);
}

#[test]
fn after_a_compaction_the_history_holds_what_the_log_kept() {
    let server =
        Server::start_with(&[("HERALD_STORE_RETAIN", "1s"), ("HERALD_DELIVERY_RETRY_SCHEDULE", "[]")]);
    let receiver = Receiver::start();
    let failing = Receiver::start();
    failing.set_status(500);
    let (key, ok_delivery, bad_delivery) =
        two_deliveries(&server, &receiver.url("/ok"), &failing.url("/down"));
    server.wait_status(&key, &bad_delivery, "exhausted");
    // Retention (1 s, every second) drops the delivered story and cuts the log past both.
    let deadline = std::time::Instant::now() + common::WAIT_MAX;
    while history(&server, &key, &ok_delivery).0 != 404 {
        assert!(std::time::Instant::now() < deadline, "the delivered delivery was never dropped");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    // The kept delivery's records are cut with the log, its refs with them: its history empties.
    loop {
        let (status, body) = history(&server, &key, &bad_delivery);
        if lines(status, &body).is_empty() {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the log was never cut past the failed delivery");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    // A redeliver writes new records, which chain to the anchor or what came after it.
    failing.set_status(200);
    let path = format!("/v1/webhook_deliveries/{bad_delivery}/redeliver");
    let (status, answer) = server.call("POST", &path, Some(&key), None);
    assert_eq!(status, 200, "{answer}");
    server.wait_status(&key, &bad_delivery, "delivered");
    server.wait_durable();
    let (status, body) = history(&server, &key, &bad_delivery);
    let story = lines(status, &body);
    assert_eq!(types(&story), ["RedeliverRequested", "AttemptRecorded"], "{body}");
    let log = audit_log(&server);
    for line in &story {
        assert_eq!(Some(line), log.get(&line["seq"].as_u64().unwrap()));
    }
}
