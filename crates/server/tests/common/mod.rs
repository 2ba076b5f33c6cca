//! What the cluster tests share: one HTTP call to a node on 127.0.0.1, its answer read whole.

use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;

pub struct Answer {
    pub status: StatusCode,
    pub headers: axum::http::HeaderMap,
    pub body: Vec<u8>,
}

impl Answer {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// `method path` at `addr` (`http://host:port`) with `key` (none when empty), a JSON body and
/// extra headers; bounded at 20 s.
pub async fn call(
    addr: &str,
    method: &str,
    path: &str,
    key: &str,
    body: Option<Value>,
    extra: &[(&str, &str)],
) -> Answer {
    let client = Client::builder(TokioExecutor::new()).build_http::<Body>();
    let mut request = Request::builder().method(method).uri(format!("{addr}{path}"));
    if !key.is_empty() {
        request = request.header("authorization", format!("Bearer {key}"));
    }
    for (k, v) in extra {
        request = request.header(*k, *v);
    }
    let body = body.map_or(Body::empty(), |b| Body::from(b.to_string()));
    let answer = tokio::time::timeout(Duration::from_secs(20), client.request(request.body(body).unwrap()))
        .await
        .expect("answered in time")
        .unwrap();
    let (parts, body) = answer.into_parts();
    let body = axum::body::to_bytes(Body::new(body), 1 << 24).await.unwrap().to_vec();
    Answer { status: parts.status, headers: parts.headers, body }
}

/// Publishes an event of `event_type` through `addr` with `key`: its id.
pub async fn publish(addr: &str, key: &str, event_type: &str) -> String {
    let body = serde_json::json!({"event_type": event_type, "payload": {"n": 1}});
    let published = call(addr, "POST", "/v1/events", key, Some(body), &[]).await;
    assert_eq!(published.status, StatusCode::ACCEPTED, "{}", published.text());
    published.json()["id"].as_str().unwrap().to_owned()
}
