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
    let (status, _) = server.call("GET", "/metrics", None, None);
    assert_eq!(status, 200);
    let (status, _) = server.call("GET", "/v1/api_keys", Some(ADMIN_KEY), None);
    assert_eq!(status, 200);
}
