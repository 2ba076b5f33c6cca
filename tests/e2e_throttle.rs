//! What the dispatcher does with an endpoint's delivery settings (API.md "Endpoint delivery
//! settings"), on the real binary against receivers on 127.0.0.1: the rate limit measured at the
//! receiver, the in-flight bound seen by a slow receiver, the extra headers on the request, and the
//! pause a `429` with `Retry-After` asks for.

mod common;

use std::time::{Duration, Instant};

use common::{Receiver, Server, WAIT_MAX};
use serde_json::{json, Value};

/// An endpoint of the key's organisation at `url` for `events`, with `settings` merged in.
fn endpoint_with(server: &Server, key: &str, url: &str, events: &[&str], settings: Value) -> Value {
    let mut body = json!({"url": url, "name": "throttled", "enabled_events": events});
    body.as_object_mut().unwrap().extend(settings.as_object().unwrap().clone());
    let (status, endpoint) = server.call("POST", "/v1/endpoints", Some(key), Some(body));
    assert_eq!(status, 201, "{endpoint}");
    endpoint
}

/// 100 deliveries to an endpoint limited to 20/s: after the burst, they arrive at 20 a second
/// (within 10 %), none counted as a failure.
#[test]
fn a_rate_limit_of_20_per_second_is_what_the_receiver_sees() {
    let server = Server::start();
    let (_, key) = server.org_key(common::ORG_SCOPES);
    let receiver = Receiver::start();
    endpoint_with(&server, &key, &receiver.url("/rate"), &["*"], json!({"rate_limit_per_s": 20}));
    let published = Instant::now();
    let events: Vec<Value> = (0..100).map(|n| server.publish(&key, "call.ended", json!({"n": n}))).collect();
    let publish_s = published.elapsed().as_secs_f64();
    let throttled = server.metric("herald_deliveries_throttled ");
    assert!(throttled > 0.0, "the backlog over the rate is held by the dispatcher: {throttled}");
    let got = receiver.wait_for(100);
    // The steady part: from the 25th arrival (past the burst of 20 and the tokens that came while
    // publishing) to the 100th.
    let steady_s = got[99].at.duration_since(got[24].at).as_secs_f64();
    let rate = 75.0 / steady_s;
    eprintln!("rate limit 20/s: {rate:.2}/s over the steady part ({steady_s:.2} s); publishing took {publish_s:.2} s");
    assert!((18.0..=22.0).contains(&rate), "{rate:.2} attempts a second, not 20 within 10 %");
    let first_second = got.iter().filter(|r| r.at.duration_since(got[0].at) < Duration::from_secs(1)).count();
    assert!(first_second <= 20 + 20 + 1, "{first_second} in the first second: burst plus rate at most");
    let id = events[99]["delivery_ids"][0].as_str().unwrap().to_owned();
    let delivery = server.wait_status(&key, &id, "delivered");
    assert_eq!(delivery["attempt_count"], 1, "waiting is not a failure: {delivery}");
}

/// A slow receiver sees at most `max_in_flight` requests at once, and that many.
#[test]
fn max_in_flight_bounds_what_a_slow_receiver_sees_at_once() {
    let server = Server::start();
    let (_, key) = server.org_key(common::ORG_SCOPES);
    let receiver = Receiver::start();
    receiver.set_delay(Duration::from_millis(300));
    endpoint_with(&server, &key, &receiver.url("/slow"), &["*"], json!({"max_in_flight": 3}));
    for n in 0..12 {
        server.publish(&key, "call.ended", json!({"n": n}));
    }
    receiver.wait_for(12);
    assert_eq!(receiver.concurrency_max(), 3, "in flight at once, at most and reached");
}

/// Each request carries the endpoint's extra headers beside herald's own; a PATCH changes them
/// for the next attempt.
#[test]
fn extra_headers_arrive_on_the_request() {
    let server = Server::start();
    let (_, key) = server.org_key(common::ORG_SCOPES);
    let receiver = Receiver::start();
    let headers = json!({"headers": {"x-tenant": "acme", "X-Trace-Mode": "full on"}});
    let endpoint = endpoint_with(&server, &key, &receiver.url("/h"), &["*"], headers);
    server.publish(&key, "call.ended", json!({}));
    let got = receiver.wait_for(1);
    assert_eq!(got[0].header("x-tenant"), "acme");
    assert_eq!(got[0].header("x-trace-mode"), "full on");
    assert!(!got[0].header("webhook-id").is_empty() && !got[0].header("webhook-signature").is_empty());
    let path = format!("/v1/endpoints/{}", endpoint["id"].as_str().unwrap());
    let (status, body) =
        server.call("PATCH", &path, Some(&key), Some(json!({"headers": {"x-tenant": "other"}})));
    assert_eq!(status, 200, "{body}");
    server.publish(&key, "call.ended", json!({}));
    let got = receiver.wait_for(2);
    assert_eq!(got[1].header("x-tenant"), "other");
    assert_eq!(got[1].header("x-trace-mode"), "", "removed by the PATCH");
}

/// A 429 with `Retry-After: 2` pauses the endpoint's other deliveries for about 2 s, while another
/// endpoint keeps receiving; the attempt that got it is a failure as before.
#[test]
fn a_retry_after_pauses_the_endpoint_while_another_keeps_receiving() {
    let server = Server::start_with(&[("HERALD_DELIVERY_RETRY_SCHEDULE", "5s,10s")]);
    let (_, key) = server.org_key(common::ORG_SCOPES);
    let (paused, other) = (Receiver::start(), Receiver::start());
    endpoint_with(&server, &key, &paused.url("/paused"), &["alpha"], json!({}));
    endpoint_with(&server, &key, &other.url("/other"), &["beta"], json!({}));
    paused.answer_next(429, Some("2"));
    let first = server.publish(&key, "alpha", json!({"n": 0}));
    let asked = paused.wait_for(1)[0].at;
    // Once the 429 is recorded, herald has read the answer and paused the endpoint.
    let id = first["delivery_ids"][0].as_str().unwrap().to_owned();
    let deadline = Instant::now() + WAIT_MAX;
    loop {
        let (status, delivery) =
            server.call("GET", &format!("/v1/webhook_deliveries/{id}"), Some(&key), None);
        assert_eq!(status, 200, "{delivery}");
        if delivery["attempt_count"] == 1 {
            break;
        }
        assert!(Instant::now() < deadline, "the 429 was never recorded: {delivery}");
        std::thread::sleep(Duration::from_millis(10));
    }
    for n in 1..4 {
        server.publish(&key, "alpha", json!({"n": n}));
    }
    let deadline = Instant::now() + WAIT_MAX;
    while asked.elapsed() < Duration::from_millis(2_500) {
        server.publish(&key, "beta", json!({}));
        std::thread::sleep(Duration::from_millis(100));
        assert!(Instant::now() < deadline);
    }
    let got = paused.wait_for(4);
    let waited = got[1].at.duration_since(asked);
    eprintln!("the next request to the paused endpoint came {waited:?} after the 429");
    assert!(
        waited >= Duration::from_millis(1_900) && waited < Duration::from_millis(3_500),
        "the pause lasted {waited:?}, not about 2 s"
    );
    let during =
        other.received().iter().filter(|r| r.at > asked && r.at < asked + Duration::from_secs(2)).count();
    assert!(during >= 10, "the other endpoint got only {during} requests during the pause");
    let (status, delivery) = server.call("GET", &format!("/v1/webhook_deliveries/{id}"), Some(&key), None);
    assert_eq!(status, 200);
    assert_eq!((delivery["status"].as_str(), delivery["attempt_count"].as_u64()), (Some("pending"), Some(1)));
    assert_eq!(delivery["last_response_status"], 429, "{delivery}");
}
