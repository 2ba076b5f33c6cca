//! The OpenAPI document is generated from the handlers; this checks it names every route the
//! router serves, and nothing else.

use std::collections::BTreeSet;

#[test]
fn every_route_is_in_the_openapi_document() {
    let doc = serde_json::to_value(herald_server::openapi_document()).unwrap();
    let mut documented = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for method in item.as_object().unwrap().keys() {
            documented.insert((method.clone(), path.clone()));
        }
    }
    let served: BTreeSet<(String, String)> =
        herald_server::ROUTES.iter().map(|(m, p)| (m.to_string(), p.to_string())).collect();
    assert_eq!(served, documented);
}

#[test]
fn every_documented_operation_declares_its_error_answers() {
    let doc = serde_json::to_value(herald_server::openapi_document()).unwrap();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            let responses = op["responses"].as_object().unwrap();
            assert!(!responses.is_empty(), "{method} {path}");
            if op.get("security").is_some() {
                assert!(responses.contains_key("401"), "{method} {path} lacks its 401");
            }
        }
    }
}

#[test]
fn a_delivery_history_is_documented_as_ndjson_with_its_404() {
    let doc = serde_json::to_value(herald_server::openapi_document()).unwrap();
    let op = &doc["paths"]["/v1/webhook_deliveries/{id}/history"]["get"];
    let ok = &op["responses"]["200"]["content"];
    assert!(ok.get("application/x-ndjson").is_some(), "{op}");
    assert!(op["responses"].get("404").is_some(), "{op}");
    let text = op["responses"]["200"]["description"].as_str().unwrap_or_default();
    assert!(text.contains("seq, at, hash, prev_hash, event"), "{text}");
}
