//! API.md "Ordering key" on the real binary: with `ordering: "per_key"`, a delivery is not
//! attempted while an earlier delivery to the same endpoint with the same ordering key is
//! pending; through failures, a restart and a retrigger; deliveries without a key are not held;
//! `ordering_key` is shown on deliveries, and bad values are refused.

mod common;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{Received, Receiver, Server, WAIT_MAX};
use serde_json::{json, Value};

const SCOPES: &[&str] =
    &["events.write", "endpoints.write", "endpoints.read", "deliveries.read", "deliveries.write"];

/// A `per_key` endpoint of the key's organisation at the receiver.
fn ordered_endpoint(server: &Server, key: &str, receiver: &Receiver) -> Value {
    let body = json!({"url": receiver.url("/hook"), "enabled_events": ["*"], "ordering": "per_key"});
    let (status, endpoint) = server.call("POST", "/v1/endpoints", Some(key), Some(body));
    assert_eq!(status, 201, "{endpoint}");
    assert_eq!(endpoint["ordering"], "per_key");
    endpoint
}

/// Publishes `payload` with `extra` fields (`ordering_key`, `call_id`); returns the answer.
fn publish(server: &Server, key: &str, payload: Value, extra: Value) -> Value {
    let mut body = json!({"event_type": "call.ended", "payload": payload});
    body.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
    let (status, answer) = server.call("POST", "/v1/events", Some(key), Some(body));
    assert_eq!(status, 202, "{answer}");
    answer
}

fn payload_of(r: &Received) -> Value {
    serde_json::from_slice(&r.body).expect("a JSON payload")
}

/// Waits until `done` holds for what the receiver got.
fn wait_until(receiver: &Receiver, what: &str, done: impl Fn(&[Received]) -> bool) -> Vec<Received> {
    let deadline = Instant::now() + WAIT_MAX;
    loop {
        let got = receiver.received();
        if done(&got) {
            return got;
        }
        assert!(Instant::now() < deadline, "{what}: the receiver got {} requests", got.len());
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// N events over three keys, each answered 500 on its first request (and every other one
/// after), with a kill -9 and a restart halfway: every event arrives, and per key the receipts
/// (all of them, and the first successful ones) follow event order.
#[test]
fn per_key_order_holds_while_the_receiver_fails_every_other_request_and_across_a_restart() {
    const EVENTS: usize = 24;
    let mut server = Server::start_with(&[
        ("HERALD_DELIVERY_RETRY_SCHEDULE", "50ms,100ms,100ms,100ms,100ms,100ms,100ms,100ms"),
        ("HERALD_ENDPOINT_HEALTH_FAILURES", "1000"),
    ]);
    let receiver = Receiver::start();
    // Every other request of each event fails, its first included.
    let seen = Arc::new(std::sync::Mutex::new(BTreeMap::<i64, usize>::new()));
    let counts = seen.clone();
    receiver.set_rule(move |r, _| {
        let i = payload_of(r)["i"].as_i64().unwrap_or(-1);
        let mut counts = counts.lock().unwrap();
        let n = counts.entry(i).or_insert(0);
        *n += 1;
        if *n % 2 == 1 {
            500
        } else {
            200
        }
    });
    let (_, key) = server.org_key(SCOPES);
    ordered_endpoint(&server, &key, &receiver);
    let keys = ["a", "b", "c"];
    let mut deliveries = Vec::new();
    for i in 0..EVENTS {
        if i == EVENTS / 2 {
            server.restart();
        }
        let k = keys[i % 3];
        let answer = publish(&server, &key, json!({"i": i, "key": k}), json!({"ordering_key": k}));
        deliveries.push(answer["delivery_ids"][0].as_str().unwrap().to_owned());
    }
    let got = wait_until(&receiver, "every event delivered", |got| {
        let delivered: std::collections::BTreeSet<i64> =
            got.iter().filter(|r| r.status == 200).map(|r| payload_of(r)["i"].as_i64().unwrap()).collect();
        delivered.len() == EVENTS
    });
    for k in keys {
        let receipts: Vec<(i64, u16)> = got
            .iter()
            .map(|r| (payload_of(r), r.status))
            .filter(|(p, _)| p["key"] == k)
            .map(|(p, status)| (p["i"].as_i64().unwrap(), status))
            .collect();
        let all: Vec<i64> = receipts.iter().map(|(i, _)| *i).collect();
        assert!(
            all.windows(2).all(|w| w[0] <= w[1]),
            "key {k}: a later event before an earlier one: {all:?}"
        );
        let mut firsts: Vec<i64> = Vec::new();
        for (i, status) in &receipts {
            if *status == 200 && !firsts.contains(i) {
                firsts.push(*i);
            }
        }
        let expected: Vec<i64> = (0..EVENTS as i64).filter(|i| keys[*i as usize % 3] == k).collect();
        assert_eq!(firsts, expected, "key {k}: first successful receipts out of event order");
    }
    for (i, d) in deliveries.iter().enumerate() {
        let delivery = server.wait_status(&key, d, "delivered");
        assert_eq!(delivery["ordering_key"], keys[i % 3], "{delivery}");
    }
}

/// A retrigger of an exhausted earlier delivery makes a later pending one of its key wait again
/// (its due retries pass unattempted), while a delivery without a key goes at once; once the
/// earlier one is delivered, the later ones follow in order.
#[test]
fn a_retriggered_earlier_delivery_holds_later_ones_and_unkeyed_ones_go() {
    let server = Server::start_with(&[
        ("HERALD_DELIVERY_RETRY_SCHEDULE", "100ms,1s,1s,1s"),
        ("HERALD_ENDPOINT_HEALTH_FAILURES", "1000"),
    ]);
    let receiver = Receiver::start();
    let stuck = Arc::new(AtomicBool::new(true));
    let s = stuck.clone();
    receiver.set_rule(move |r, _| {
        let n = payload_of(r)["n"].as_str().unwrap_or("").to_owned();
        if s.load(Ordering::SeqCst) && (n == "A" || n == "B") {
            500
        } else {
            200
        }
    });
    let (_, key) = server.org_key(SCOPES);
    ordered_endpoint(&server, &key, &receiver);
    let count = |n: &str| receiver.received().iter().filter(|r| payload_of(r)["n"] == n).count();

    let a = publish(&server, &key, json!({"n": "A"}), json!({"ordering_key": "x"}));
    let a = a["delivery_ids"][0].as_str().unwrap().to_owned();
    server.wait_status(&key, &a, "exhausted");
    // A is not pending: B, later with the same key, goes, and fails (retries at 100 ms, then 1 s).
    publish(&server, &key, json!({"n": "B"}), json!({"ordering_key": "x"}));
    wait_until(&receiver, "B attempted twice", |got| {
        got.iter().filter(|r| payload_of(r)["n"] == "B").count() >= 2
    });
    let (status, body) =
        server.call("POST", &format!("/api/webhooks/v1/failures/{a}/retrigger"), Some(&key), None);
    assert_eq!(status, 200, "{body}");
    let b_at_retrigger = count("B");
    let a_at_retrigger = count("A");

    publish(&server, &key, json!({"n": "U"}), json!({}));
    wait_until(&receiver, "the delivery without a key", |got| got.iter().any(|r| payload_of(r)["n"] == "U"));
    publish(&server, &key, json!({"n": "C"}), json!({"ordering_key": "x"}));
    // A is pending again (failing) for about 2 s more: B's due retry comes and goes unattempted.
    std::thread::sleep(Duration::from_millis(1_800));
    assert!(count("A") > a_at_retrigger, "the retriggered A is attempted");
    assert_eq!(count("B"), b_at_retrigger, "B was attempted while the earlier A was pending");
    assert_eq!(count("C"), 0, "C was attempted while the earlier A was pending");

    stuck.store(false, Ordering::SeqCst);
    let got = wait_until(&receiver, "C delivered", |got| got.iter().any(|r| payload_of(r)["n"] == "C"));
    let first = |n: &str, status: Option<u16>| {
        got.iter()
            .position(|r| payload_of(r)["n"] == n && status.is_none_or(|s| r.status == s))
            .unwrap_or_else(|| panic!("no {n}"))
    };
    let a_delivered = first("A", Some(200));
    let b_after: Vec<usize> = got
        .iter()
        .enumerate()
        .filter(|(_, r)| payload_of(r)["n"] == "B")
        .map(|(i, _)| i)
        .skip(b_at_retrigger)
        .collect();
    assert!(b_after.first().is_some_and(|b| *b > a_delivered), "B went again before A was delivered");
    assert!(first("C", None) > first("B", Some(200)), "C went before B was delivered");
    assert!(server.metric("herald_order_waits_total ") >= 1.0, "the set-asides are counted");
}

/// `ordering_key`: shown on the delivery (given, else the call id, else null);
/// every bad value is a 400 naming it that writes nothing.
#[test]
fn ordering_key_is_shown_and_bad_values_are_refused() {
    let (server, receiver) = (Server::start(), Receiver::start());
    let (_, key) = server.org_key(SCOPES);
    server.endpoint(&key, &receiver.url("/hook"), &["*"]);
    let call_id = "0190e5a0-0000-7000-8000-000000000001";
    for (extra, shown) in [
        (json!({"ordering_key": "call-7"}), json!("call-7")),
        (json!({"call_id": call_id}), json!(call_id)),
        (json!({"call_id": call_id, "ordering_key": "k"}), json!("k")),
        (json!({}), Value::Null),
    ] {
        let answer = publish(&server, &key, json!({}), extra.clone());
        let d = answer["delivery_ids"][0].as_str().unwrap();
        let (status, delivery) = server.call("GET", &format!("/v1/webhook_deliveries/{d}"), Some(&key), None);
        assert_eq!(status, 200);
        assert_eq!(delivery["ordering_key"], shown, "{extra}: {delivery}");
        // Delivered before the refusals below, so that its attempt's record cannot land among them.
        server.wait_status(&key, d, "delivered");
    }
    let (status, list) = server.call("GET", "/v1/webhook_deliveries", Some(&key), None);
    assert_eq!(status, 200);
    assert!(list["data"].as_array().unwrap().iter().all(|d| d.get("ordering_key").is_some()), "{list}");

    let seq = server.applied_seq();
    for bad in
        [json!(""), json!("x".repeat(129)), json!("a b"), json!("é"), json!("a\n"), json!(5), json!(["a"])]
    {
        let body = json!({"event_type": "call.ended", "payload": {}, "ordering_key": bad});
        let (status, answer) = server.call("POST", "/v1/events", Some(&key), Some(body));
        assert_eq!(status, 400, "{bad}: {answer}");
        assert!(answer["error"].as_str().unwrap().contains("ordering_key"), "{bad}: {answer}");
    }
    assert_eq!(server.applied_seq(), seq, "a refused ordering_key wrote something");
    let ok = publish(&server, &key, json!({}), json!({"ordering_key": "x".repeat(128)}));
    assert_eq!(ok["delivery_ids"].as_array().unwrap().len(), 1);
}
