//! Forwarding a request to the node that owns its partition, and checking that a forwarded
//! request really comes from a node: `x-herald-forwarded: <partition>` and
//! `x-herald-forwarded-auth: <unix seconds>:<hex>`, a keyed blake3 hash (key derived from
//! `[cluster] cluster_secret`) over the method, the path and query, the partition and the time,
//! accepted within [`FORWARD_SKEW_S`] seconds.

use std::time::Duration;

use axum::body::Body;
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, Request, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use crate::config::Secret;
use crate::error::{ApiError, Family};

/// The partition a forwarded request is for.
pub const X_FORWARDED: HeaderName = HeaderName::from_static("x-herald-forwarded");
/// Its authentication.
pub const X_FORWARDED_AUTH: HeaderName = HeaderName::from_static("x-herald-forwarded-auth");
/// How far a forwarded request's time may be from the receiver's clock.
pub const FORWARD_SKEW_S: u64 = 30;

/// Headers that belong to one connection, never passed on (RFC 9110, 7.6.1), and the ones the
/// forwarder sets itself.
const NOT_PASSED: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "host",
    "content-length",
    "x-herald-forwarded",
    "x-herald-forwarded-auth",
];

/// The MAC key of a cluster secret.
#[derive(Clone)]
pub struct ForwardKey([u8; 32]);

impl ForwardKey {
    pub fn new(secret: &Secret) -> ForwardKey {
        ForwardKey(blake3::derive_key("herald cluster forward v1", secret.expose().as_bytes()))
    }

    fn mac(&self, method: &Method, path_and_query: &str, partition: u32, unix_s: u64) -> blake3::Hash {
        let mut h = blake3::Hasher::new_keyed(&self.0);
        for part in [method.as_str(), path_and_query, &partition.to_string(), &unix_s.to_string()] {
            h.update(&(part.len() as u64).to_be_bytes());
            h.update(part.as_bytes());
        }
        h.finalize()
    }

    /// The auth header's value for a request forwarded at `unix_s`.
    pub fn sign(&self, method: &Method, path_and_query: &str, partition: u32, unix_s: u64) -> String {
        format!("{unix_s}:{}", self.mac(method, path_and_query, partition, unix_s).to_hex())
    }

    /// The partition of a forwarded request whose headers prove it comes from a node; `Err`
    /// says why not (answered 401, nothing served).
    pub fn verify(&self, method: &Method, uri: &Uri, headers: &HeaderMap, now_s: u64) -> Result<u32, String> {
        let partition = headers
            .get(X_FORWARDED)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u32>().ok())
            .ok_or("x-herald-forwarded is not a partition number")?;
        let auth = headers
            .get(X_FORWARDED_AUTH)
            .and_then(|v| v.to_str().ok())
            .ok_or("x-herald-forwarded-auth is missing")?;
        let (at, hex) = auth.split_once(':').ok_or("x-herald-forwarded-auth is malformed")?;
        let at: u64 = at.parse().map_err(|_| "x-herald-forwarded-auth is malformed")?;
        if at.abs_diff(now_s) > FORWARD_SKEW_S {
            return Err(format!(
                "x-herald-forwarded-auth is {} s away from this node's clock",
                at.abs_diff(now_s)
            ));
        }
        let given = blake3::Hash::from_hex(hex).map_err(|_| "x-herald-forwarded-auth is malformed")?;
        let path_and_query = uri.path_and_query().map_or("/", |p| p.as_str());
        // `Hash`'s equality is constant-time.
        match given == self.mac(method, path_and_query, partition, at) {
            true => Ok(partition),
            false => Err("x-herald-forwarded-auth does not match".into()),
        }
    }
}

/// Unix seconds now.
pub fn unix_s() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// The HTTP client forwarded requests go through (pooled connections to the other nodes).
pub type ForwardClient = Client<HttpConnector, Body>;

pub fn client() -> ForwardClient {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    connector.set_connect_timeout(Some(Duration::from_secs(2)));
    Client::builder(TokioExecutor::new()).pool_idle_timeout(Duration::from_secs(30)).build(connector)
}

/// One request to forward: what the client sent, its body read.
pub struct Outgoing<'a> {
    pub method: &'a Method,
    pub uri: &'a Uri,
    pub headers: &'a HeaderMap,
    pub body: Bytes,
}

/// Forwards `out` for `partition` to the node at `advertise` (`http://host:port`) and answers
/// what it answered; a node that cannot be reached in `timeout` is a 503 in `family`'s shape.
pub async fn forward(
    client: &ForwardClient,
    key: &ForwardKey,
    (node_id, advertise): (&str, &str),
    partition: u32,
    out: Outgoing<'_>,
    family: Family,
    timeout: Duration,
) -> Response {
    let path_and_query = out.uri.path_and_query().map_or("/", |p| p.as_str());
    let target = format!("{}{path_and_query}", advertise.trim_end_matches('/'));
    let mut request = Request::builder().method(out.method.clone()).uri(target);
    if let Some(headers) = request.headers_mut() {
        for (name, value) in out.headers {
            if !NOT_PASSED.contains(&name.as_str()) {
                headers.append(name.clone(), value.clone());
            }
        }
        let auth = key.sign(out.method, path_and_query, partition, unix_s());
        headers.insert(X_FORWARDED, HeaderValue::from(partition));
        if let Ok(v) = HeaderValue::from_str(&auth) {
            headers.insert(X_FORWARDED_AUTH, v);
        }
        if let Some(id) = crate::request_id::current() {
            if let Ok(v) = HeaderValue::from_str(&id.to_string()) {
                headers.insert(crate::request_id::X_REQUEST_ID, v);
            }
        }
    }
    let unreachable = |why: String| {
        let mut e = ApiError::new(
            family,
            StatusCode::SERVICE_UNAVAILABLE,
            super::UNAVAILABLE,
            format!("partition {partition} is served by node {node_id} ({advertise}), which did not answer: {why}"),
        );
        e.retry_after_s = Some(1);
        e.into_response()
    };
    let request = match request.body(Body::from(out.body)) {
        Ok(r) => r,
        Err(e) => return unreachable(format!("the request could not be built: {e}")),
    };
    match tokio::time::timeout(timeout, client.request(request)).await {
        Ok(Ok(answer)) => {
            let (mut parts, body) = answer.into_parts();
            for name in ["connection", "keep-alive", "transfer-encoding"] {
                parts.headers.remove(name);
            }
            Response::from_parts(parts, Body::new(body)).into_response()
        }
        Ok(Err(e)) => unreachable(e.to_string()),
        Err(_) => unreachable(format!("no answer within {} ms", timeout.as_millis())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_forwarded_request_is_accepted_only_with_its_own_fresh_mac() {
        let key = ForwardKey::new(&Secret::new("0123456789abcdef-secret"));
        let uri: Uri = "/v1/endpoints?limit=5".parse().unwrap();
        let headers = |partition: &str, auth: String| {
            let mut h = HeaderMap::new();
            h.insert(X_FORWARDED, HeaderValue::from_str(partition).unwrap());
            h.insert(X_FORWARDED_AUTH, HeaderValue::from_str(&auth).unwrap());
            h
        };
        let now = 1_800_000_000;
        let good = key.sign(&Method::GET, "/v1/endpoints?limit=5", 3, now);
        assert_eq!(key.verify(&Method::GET, &uri, &headers("3", good.clone()), now + 29), Ok(3));
        // Another partition, method, path, time, key; too old; malformed: refused.
        assert!(key.verify(&Method::GET, &uri, &headers("4", good.clone()), now).is_err());
        assert!(key.verify(&Method::POST, &uri, &headers("3", good.clone()), now).is_err());
        let other: Uri = "/v1/endpoints?limit=6".parse().unwrap();
        assert!(key.verify(&Method::GET, &other, &headers("3", good.clone()), now).is_err());
        assert!(key.verify(&Method::GET, &uri, &headers("3", good.clone()), now + 31).is_err());
        let stranger = ForwardKey::new(&Secret::new("another secret of 16+ bytes"));
        let forged = stranger.sign(&Method::GET, "/v1/endpoints?limit=5", 3, now);
        assert!(key.verify(&Method::GET, &uri, &headers("3", forged), now).is_err());
        assert!(key.verify(&Method::GET, &uri, &headers("3", "x:y".into()), now).is_err());
        assert!(key.verify(&Method::GET, &uri, &HeaderMap::new(), now).is_err());
    }
}
