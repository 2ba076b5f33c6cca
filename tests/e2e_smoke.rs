//! The quickest end-to-end story: a key, an endpoint, a publish, a signed delivery.

mod common;

use common::{Receiver, Server, ADMIN_KEY};
use serde_json::json;

#[test]
fn publish_is_delivered_signed_to_a_receiver() {
    let server = Server::start();
    let receiver = Receiver::start();
    let (_, key) = server.org_key(&["events.write", "endpoints.write", "endpoints.read", "deliveries.read"]);
    let endpoint = server.endpoint(&key, &receiver.url("/hook"), &["call.ended"]);
    let event = server.publish(&key, "call.ended", json!({"call": 1, "text": "héllo"}));
    let delivery = event["delivery_ids"][0].as_str().unwrap().to_owned();
    let got = receiver.wait_for(1);
    assert_eq!(got[0].path, "/hook");
    assert_eq!(got[0].header("webhook-id"), event["id"].as_str().unwrap());
    assert_eq!(String::from_utf8_lossy(&got[0].body), r#"{"call":1,"text":"héllo"}"#);
    assert!(got[0].header("user-agent").starts_with("herald/"));
    assert!(got[0].header("webhook-signature").starts_with("v1,"));
    let d = server.wait_status(&key, &delivery, "delivered");
    assert_eq!(d["endpoint_id"], endpoint["id"]);
    assert_eq!(d["attempt_count"], 1);
    // The dispatcher read that delivery's rows from the cache the writer filled.
    let (status, text) = common::call_raw(&server.url("/metrics"), "GET", None, None, &[]).unwrap();
    assert_eq!(status, 200);
    let hits = metric(&text, "herald_read_cache_hits_total");
    assert!(hits.is_some_and(|n| n >= 1), "{text}");
    // The writer knew the new event and delivery ids were new without reading the store.
    let known_absent = metric(&text, "herald_read_cache_known_absent_total");
    assert!(known_absent.is_some_and(|n| n >= 2), "{text}");
    let flush_max =
        text.lines().find_map(|l| l.strip_prefix("herald_flush_seconds_max ")?.trim().parse::<f64>().ok());
    assert!(flush_max.is_some_and(|s| s > 0.0), "{text}");
    let (status, _) = server.call("GET", "/v1/api_keys", Some(ADMIN_KEY), None);
    assert_eq!(status, 200);
}

/// `[store] retain` on the real server: a delivered story older than the retention disappears
/// by itself, a failing one stays, and the data still verifies after the stop.
#[test]
fn retention_drops_delivered_history_on_a_running_server() {
    let mut server =
        Server::start_with(&[("HERALD_STORE_RETAIN", "1s"), ("HERALD_DELIVERY_RETRY_SCHEDULE", "[]")]);
    let receiver = Receiver::start();
    let failing = Receiver::start();
    failing.set_status(500);
    let (_, key) = server.org_key(&["events.write", "endpoints.write", "deliveries.read"]);
    server.endpoint(&key, &receiver.url("/ok"), &["call.ended"]);
    server.endpoint(&key, &failing.url("/down"), &["call.failed"]);
    let ok = server.publish(&key, "call.ended", json!({"call": 1}));
    let bad = server.publish(&key, "call.failed", json!({"call": 2}));
    let ok_delivery = ok["delivery_ids"][0].as_str().unwrap().to_owned();
    let bad_delivery = bad["delivery_ids"][0].as_str().unwrap().to_owned();
    server.wait_status(&key, &ok_delivery, "delivered");
    server.wait_status(&key, &bad_delivery, "exhausted");
    // Compaction runs every second with a retention of 1 s: the delivered story goes.
    let deadline = std::time::Instant::now() + common::WAIT_MAX;
    loop {
        let (status, _) =
            server.call("GET", &format!("/v1/webhook_deliveries/{ok_delivery}"), Some(&key), None);
        if status == 404 {
            break;
        }
        assert_eq!(status, 200);
        assert!(std::time::Instant::now() < deadline, "the delivered delivery was never dropped");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let (status, _) =
        server.call("GET", &format!("/v1/events/{}", ok["id"].as_str().unwrap()), Some(&key), None);
    assert_eq!(status, 404);
    // The exhausted one stays, with its event and payload.
    let (status, d) = server.call("GET", &format!("/v1/webhook_deliveries/{bad_delivery}"), Some(&key), None);
    assert_eq!((status, d["status"].as_str()), (200, Some("exhausted")));
    let (status, e) =
        server.call("GET", &format!("/v1/events/{}", bad["id"].as_str().unwrap()), Some(&key), None);
    assert_eq!((status, &e["payload"]), (200, &json!({"call": 2})));
    // What retention did is in the metrics.
    let (status, text) = common::call_raw(&server.url("/metrics"), "GET", None, None, &[]).unwrap();
    assert_eq!(status, 200);
    let dropped = metric(&text, "herald_retention_deliveries_dropped_total");
    assert!(dropped.is_some_and(|n| n >= 1), "{text}");
    assert!(text.contains("herald_retention_failures_total 0"), "{text}");
    assert!(server.terminate());
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_herald"))
        .args(["verify", "--data-dir"])
        .arg(&server.data_dir)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("were compacted"));
}

/// The value of an unlabelled series in Prometheus text.
fn metric(text: &str, name: &str) -> Option<u64> {
    text.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}
