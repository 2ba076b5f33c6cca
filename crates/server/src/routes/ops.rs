//! Health, readiness, metrics, the OpenAPI document, and the audit log.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::extract::{Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use herald_engine::{decode_recorded, RecordActor};
use serde::Deserialize;
use serde_json::{Map, Value};

use crate::auth::{scope, Auth};
use crate::error::{ApiError, AuthErrors, Family, NamedError};
use crate::json::Health;
use crate::state::AppState;
use crate::util::parse_limit;

#[utoipa::path(get, path = "/healthz", tag = "ops", responses((status = 200, body = Health)))]
pub async fn healthz() -> Response {
    Json(Health { status: "ok".into() }).into_response()
}

#[utoipa::path(get, path = "/readyz", tag = "ops",
    responses((status = 200, body = Health), (status = 503, body = Health)))]
pub async fn readyz(State(state): State<Arc<AppState>>) -> Response {
    // The projection is written in the same transaction as its records, before they are flushed
    // and counted durable: while writes go on it is ahead of `committed_seq`, never behind once
    // caught up. Read the durable seq first so a commit in between cannot look like a lag.
    let committed = state.engine.committed_seq();
    let caught_up =
        state.engine.read(|t| herald_engine::applied_seq(t)).is_ok_and(|applied| applied >= committed);
    // A store that refuses writes (a full disk) leaves herald serving reads and answering 503 to
    // writes, and says why; herald resumes by itself once the store takes writes again.
    let refusal = state.engine.store_refusal();
    // A refusing store may fail the read of the applied seq too: the refusal is the reason then.
    let status = match (state.ready.load(Ordering::SeqCst), refusal, caught_up) {
        (true, None, true) => return Json(Health { status: "ready".into() }).into_response(),
        (false, _, _) => "stopping".to_owned(),
        (_, Some(e), _) => format!("the store refuses writes: {e}"),
        (_, None, false) => "projection behind the log".to_owned(),
    };
    (StatusCode::SERVICE_UNAVAILABLE, Json(Health { status })).into_response()
}

#[utoipa::path(get, path = "/metrics", tag = "ops",
    responses((status = 200, content_type = "text/plain", body = String, description = "Prometheus text")))]
pub async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    let text = state.metrics.render(&state.engine);
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
}

#[utoipa::path(get, path = "/openapi.json", tag = "ops",
    responses((status = 200, content_type = "application/json", body = Object, description = "this document")))]
pub async fn openapi() -> Response {
    Json(crate::openapi_document()).into_response()
}

#[derive(Debug, Deserialize)]
pub struct AuditQuery {
    after: Option<String>,
    limit: Option<String>,
}

/// Records per page of the audit log, at most.
pub const AUDIT_PAGE_MAX: usize = 10_000;

#[utoipa::path(get, path = "/v1/audit/log", tag = "audit",
    params(("after" = Option<u64>, Query, description = "records with a greater seq"),
        ("limit" = Option<u32>, Query, description = "1 to 10000, default 1000"),
        ("partition" = Option<String>, Query, description = "cluster mode: the partition whose log to read, 0 to partitions - 1 or control (the default); one node ignores it")),
    responses((status = 200, content_type = "application/x-ndjson", body = String,
        description = "one record a line: {seq, at, hash, prev_hash, actor, event: {type, ...}}; \
            actor is {kind: \"key\", key_id} (the API key whose request wrote the record), \
            {kind: \"system\"} (herald's own decisions: attempt outcomes, retention, policy and rules; \
            the offline tools), or null for a record written before records named their actor"),
        (status = 400, body = NamedError), AuthErrors),
    security(("bearer" = [])))]
pub async fn audit_log(
    State(state): State<Arc<AppState>>,
    _who: Auth<scope::AdminOfNoOrg>,
    query: Result<Query<AuditQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    const F: Family = Family::Named;
    let Query(q) = query.map_err(|e| ApiError::bad_request(F, e.body_text()))?;
    let after = match q.after.as_deref() {
        None => 0,
        Some(t) => t
            .parse::<u64>()
            .map_err(|_| ApiError::validation(F, "after", "must be a seq (an unsigned integer)"))?,
    };
    let limit = parse_limit(F, q.limit.as_deref(), 1000, AUDIT_PAGE_MAX)?;
    let records =
        state.engine.records(after.saturating_add(1), limit).map_err(|e| ApiError::from_read(F, e))?;
    Ok(([(header::CONTENT_TYPE, "application/x-ndjson")], audit_lines(&records)).into_response())
}

/// Records as the audit log's NDJSON: one `{seq, at, hash, prev_hash, event}` a line. The
/// audit log and a delivery's history both answer with it.
pub fn audit_lines(records: &[herald_engine::Record]) -> String {
    let mut body = String::new();
    for r in records {
        let (actor, event) = audit_record(&r.body);
        let line = serde_json::json!({
            "seq": r.seq,
            "at": crate::util::ts(r.at_ms),
            "hash": hex(&r.hash),
            "prev_hash": hex(&r.prev_hash),
            "actor": actor,
            "event": event,
        });
        body.push_str(&line.to_string());
        body.push('\n');
    }
    body
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A record's body as the audit log shows it: its actor ([`audit_actor`]) and its event
/// ([`audit_event`]); a body that does not decode is an `Undecodable` event by nobody.
pub fn audit_record(body: &[u8]) -> (Value, Value) {
    match decode_recorded(body) {
        Ok((actor, event)) => (audit_actor(actor), audit_event(&event)),
        Err(e) => (Value::Null, serde_json::json!({"type": "Undecodable", "error": e.to_string()})),
    }
}

/// Who acted, as audit JSON: `{"kind": "key", "key_id": uuid}`, `{"kind": "system"}`, or null
/// for a record written before records named their actor (none is known, and API.md shows an
/// unknown value as null, never leaves it out).
pub fn audit_actor(actor: Option<RecordActor>) -> Value {
    match actor {
        Some(RecordActor::Key(id)) => serde_json::json!({"kind": "key", "key_id": id.to_string()}),
        Some(RecordActor::System) => serde_json::json!({"kind": "system"}),
        None => Value::Null,
    }
}

/// An event as audit JSON: `{"type": "<Variant>", ...fields}`. Secrets are redacted, key hashes
/// shown as hex, payloads as the JSON they are, response excerpts as text.
pub fn audit_event(event: &herald_engine::Event) -> Value {
    let raw = serde_json::to_value(event).unwrap_or(Value::Null);
    let (kind, inner) = match raw {
        Value::Object(map) if map.len() == 1 => match map.into_iter().next() {
            Some((k, v)) => (k, v),
            None => (String::new(), Value::Null),
        },
        Value::String(s) => (s, Value::Null),
        other => ("Unknown".to_owned(), other),
    };
    let mut fields = match inner {
        Value::Object(map) => map,
        Value::Null => Map::new(),
        other => {
            let mut m = Map::new();
            m.insert("value".into(), other);
            m
        }
    };
    for (k, v) in fields.iter_mut() {
        match k.as_str() {
            "secret" => *v = Value::String("[redacted]".into()),
            "key_hash" => *v = Value::String(bytes_of(v).map(|b| hex(&b)).unwrap_or_default()),
            "payload" => {
                *v = bytes_of(v).and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or(Value::Null)
            }
            // A recovery's filter: its statuses by their API names.
            "filter" => {
                if let Some(Value::Array(statuses)) = v.get_mut("statuses") {
                    for s in statuses.iter_mut() {
                        *s = Value::String(s.as_str().unwrap_or_default().to_ascii_lowercase());
                    }
                }
            }
            "response_excerpt" => {
                *v = Value::String(
                    bytes_of(v).map(|b| String::from_utf8_lossy(&b).into_owned()).unwrap_or_default(),
                )
            }
            _ => {}
        }
    }
    let mut out = Map::new();
    out.insert("type".into(), Value::String(kind));
    out.extend(fields);
    Value::Object(out)
}

fn bytes_of(v: &Value) -> Option<Vec<u8>> {
    v.as_array()?.iter().map(|n| n.as_u64().and_then(|n| u8::try_from(n).ok())).collect()
}
