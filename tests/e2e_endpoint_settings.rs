//! API.md "Endpoint delivery settings" on the real binary: how they are given, shown, changed
//! and refused. What the dispatcher does with them is tested beside it (throttle, ordering).

mod common;

use common::Server;
use serde_json::{json, Value};

fn create(server: &Server, key: &str, extra: Value) -> (u16, Value) {
    let mut body = json!({"url": "http://127.0.0.1:9/hook", "enabled_events": ["*"]});
    body.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
    server.call("POST", "/v1/endpoints", Some(key), Some(body))
}

#[test]
fn settings_are_given_shown_changed_and_unset() {
    let server = Server::start();
    let (_, key) = server.org_key(&["endpoints.write", "endpoints.read"]);

    let (status, plain) = create(&server, &key, json!({}));
    assert_eq!(status, 201, "{plain}");
    for (field, unset) in [
        ("rate_limit_per_s", Value::Null),
        ("max_in_flight", Value::Null),
        ("ordering", json!("none")),
        ("headers", Value::Null),
    ] {
        assert_eq!(plain.get(field), Some(&unset), "{field} always present: {plain}");
    }

    let (status, e) = create(
        &server,
        &key,
        json!({"rate_limit_per_s": 50, "max_in_flight": 4, "ordering": "per_key", "headers": {"x-tenant": "a", "X-Env": "prod eu"}}),
    );
    assert_eq!(status, 201, "{e}");
    assert_eq!((e["rate_limit_per_s"].clone(), e["max_in_flight"].clone()), (json!(50), json!(4)));
    assert_eq!(e["ordering"], "per_key");
    assert_eq!(e["headers"], json!({"x-tenant": "a", "X-Env": "prod eu"}));
    let id = e["id"].as_str().unwrap();
    let path = format!("/v1/endpoints/{id}");

    // absent keeps, null unsets, a value replaces
    let (status, patched) = server.call(
        "PATCH",
        &path,
        Some(&key),
        Some(json!({"rate_limit_per_s": null, "headers": {"x-b": "1"}})),
    );
    assert_eq!(status, 200, "{patched}");
    assert_eq!(patched["rate_limit_per_s"], Value::Null);
    assert_eq!(patched["max_in_flight"], 4);
    assert_eq!(patched["ordering"], "per_key");
    assert_eq!(patched["headers"], json!({"x-b": "1"}));
    assert!(patched["updated_at"].as_str() >= e["updated_at"].as_str());

    let (status, got) = server.call("GET", &path, Some(&key), None);
    assert_eq!(status, 200);
    assert_eq!(got, patched, "GET shows what PATCH answered");
    let (status, list) = server.call("GET", "/v1/endpoints", Some(&key), None);
    assert_eq!(status, 200);
    let listed = list["data"].as_array().unwrap().iter().find(|x| x["id"] == id).cloned().unwrap();
    assert_eq!(listed, got, "the list shows the settings too");

    let (status, back) = server.call(
        "PATCH",
        &path,
        Some(&key),
        Some(json!({"max_in_flight": null, "ordering": "none", "headers": null})),
    );
    assert_eq!(status, 200, "{back}");
    for field in ["rate_limit_per_s", "max_in_flight", "headers"] {
        assert_eq!(back[field], Value::Null, "{field}: {back}");
    }
    assert_eq!(back["ordering"], "none");
}

#[test]
fn invalid_settings_are_400s_naming_the_field_and_write_nothing() {
    let server = Server::start();
    let (_, key) = server.org_key(&["endpoints.write", "endpoints.read"]);
    let (_, e) = create(&server, &key, json!({}));
    let path = format!("/v1/endpoints/{}", e["id"].as_str().unwrap());
    let too_many: serde_json::Map<String, Value> = (0..21).map(|i| (format!("x-{i}"), json!("v"))).collect();
    let cases = [
        ("rate_limit_per_s", json!(0)),
        ("rate_limit_per_s", json!(10_001)),
        ("rate_limit_per_s", json!(-1)),
        ("rate_limit_per_s", json!("10")),
        ("rate_limit_per_s", json!(1.5)),
        ("max_in_flight", json!(0)),
        ("max_in_flight", json!(1025)),
        ("max_in_flight", json!(true)),
        ("ordering", json!("fifo")),
        ("ordering", json!(1)),
        ("headers", json!({"content-type": "text/plain"})),
        ("headers", json!({"Webhook-Signature": "x"})),
        ("headers", json!({"herald-attempt": "x"})),
        ("headers", json!({"user-agent": "x"})),
        ("headers", json!({"bad name": "x"})),
        ("headers", json!({"x-a": "caf\u{e9}"})),
        ("headers", json!({"x-a": "v".repeat(1025)})),
        ("headers", json!({"x-a": 1})),
        ("headers", json!(["x-a"])),
        ("headers", Value::Object(too_many)),
    ];
    for (field, value) in cases {
        let seq = server.applied_seq();
        let (status, body) = create(&server, &key, json!({ field: value.clone() }));
        assert_eq!(status, 400, "create {field}={value}: {body}");
        assert!(body["error"].as_str().unwrap().contains(field), "create {field}={value}: {body}");
        let (status, body) = server.call("PATCH", &path, Some(&key), Some(json!({ field: value.clone() })));
        assert_eq!(status, 400, "patch {field}={value}: {body}");
        assert!(body["error"].as_str().unwrap().contains(field), "patch {field}={value}: {body}");
        assert_eq!(server.applied_seq(), seq, "{field}={value} wrote something");
    }
    let (_, now) = server.call("GET", &path, Some(&key), None);
    assert_eq!(
        now,
        e.as_object()
            .map(|o| {
                let mut o = o.clone();
                o.remove("secret");
                Value::Object(o)
            })
            .unwrap()
    );
}
