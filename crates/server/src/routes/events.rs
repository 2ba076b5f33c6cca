//! `/v1/events`: publish (with `Idempotency-Key`) and get.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{FromRequestParts, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use herald_engine::{Command, DeliveryId, EventId, Reply};
use serde::Deserialize as _;
use uuid::Uuid;

use crate::auth::{scope, Auth};
use crate::error::{ApiError, AuthErrors, Family, NamedError};
use crate::json::{EventOut, PublishIn, PublishInRef, PublishOut};
use crate::routes::org_of;
use crate::state::AppState;
use crate::util::{body_bytes, parse_id, parse_json, ts, PathId};

const F: Family = Family::Named;

#[utoipa::path(post, path = "/v1/events", tag = "events", request_body = PublishIn,
    params(("Idempotency-Key" = Option<String>, Header, description = "the same key within 24 h returns the first answer")),
    responses((status = 202, body = PublishOut, description = "the event and its deliveries are durable"),
        (status = 400, body = NamedError),
        (status = 413, body = NamedError), (status = 503, body = NamedError), AuthErrors),
    security(("bearer" = [])))]
pub async fn publish(
    State(state): State<Arc<AppState>>,
    who: Auth<scope::EventsWrite>,
    headers: PublishHeaders,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let bytes = body_bytes(F, body)?;
    // One pass over the body, borrowing from it. A body this refuses is parsed again the way every
    // other route parses, for the error that names the field (and so that what is accepted and
    // refused stays exactly that of `PublishIn`).
    let fallback: PublishIn;
    let input = match PublishInRef::deserialize(&mut serde_json::Deserializer::from_slice(&bytes)) {
        Ok(input) => input,
        Err(_) => {
            fallback = parse_json(F, &bytes)?;
            PublishInRef {
                event_type: fallback.event_type.as_str().into(),
                payload: &fallback.payload,
                call_id: fallback.call_id.as_deref().map(Into::into),
                webhook_url: fallback.webhook_url.clone(),
                org_id: fallback.org_id.as_deref().map(Into::into),
                ordering_key: fallback.ordering_key.clone(),
            }
        }
    };
    let org_id = org_of(F, &who, input.org_id.as_deref())?;
    let idempotency_key = headers.idempotency_key()?;
    let call_id = match input.call_id.as_deref() {
        None => None,
        Some(text) => {
            Some(parse_id(text).ok_or_else(|| ApiError::validation(F, "call_id", "must be a UUID"))?)
        }
    };
    let event_type = input.event_type.into_owned();
    let command = Command::Publish {
        id: EventId(Uuid::now_v7()),
        org_id,
        event_type: event_type.clone(),
        payload: input.payload.get().as_bytes().to_vec(),
        call_id,
        webhook_url: input.webhook_url,
        idempotency_key,
        ordering_key: input.ordering_key,
    };
    let reply = state.engine.execute(who.actor(), command).await.map_err(|e| ApiError::from_engine(F, e))?;
    match reply {
        Reply::Published { id, created_at_ms, delivery_ids, replayed } => {
            // Nothing per publish at info; at debug, the event and its request.
            tracing::debug!(
                request_id = crate::request_id::current().map(tracing::field::display),
                event_id = %id,
                deliveries = delivery_ids.len(),
                replayed,
                "event published"
            );
            let event_type = match replayed {
                true => state
                    .engine
                    .event(id)
                    .map_err(|e| ApiError::from_read(F, e))?
                    .map_or(event_type, |e| e.record.event_type),
                false => event_type,
            };
            let body = publish_out_json(id, &event_type, &ts(created_at_ms), &delivery_ids);
            let json = HeaderValue::from_static("application/json");
            Ok((StatusCode::ACCEPTED, [(header::CONTENT_TYPE, json)], body).into_response())
        }
        other => Err(ApiError::internal(F, format!("unexpected reply {other:?}"))),
    }
}

/// The header a publish reads besides `Authorization` (which [`Auth`] reads), taken from the
/// request without copying its whole header map (what the `HeaderMap` extractor does): its first
/// value, as `HeaderMap::get`.
pub struct PublishHeaders {
    idempotency_key: Option<HeaderValue>,
}

impl PublishHeaders {
    /// The `Idempotency-Key` header's value, which must be visible ASCII.
    fn idempotency_key(&self) -> Result<Option<String>, ApiError> {
        let Some(v) = &self.idempotency_key else { return Ok(None) };
        let key =
            v.to_str().map_err(|_| ApiError::validation(F, "Idempotency-Key", "must be visible ASCII"))?;
        Ok(Some(key.to_owned()))
    }
}

impl<S: Send + Sync> FromRequestParts<S> for PublishHeaders {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        Ok(PublishHeaders { idempotency_key: parts.headers.get("idempotency-key").cloned() })
    }
}

/// The JSON of [`PublishOut`], byte for byte what `serde_json` writes for it, without building
/// its strings first: ids and the timestamp need no escaping, the event type goes through
/// `serde_json`.
fn publish_out_json(id: EventId, event_type: &str, created_at: &str, delivery_ids: &[DeliveryId]) -> Vec<u8> {
    use std::io::Write as _;
    let mut out = Vec::with_capacity(96 + event_type.len() + created_at.len() + 39 * delivery_ids.len());
    let mut uuid = Uuid::encode_buffer();
    out.extend_from_slice(b"{\"id\":\"");
    out.extend_from_slice(id.0.hyphenated().encode_lower(&mut uuid).as_bytes());
    out.extend_from_slice(b"\",\"event_type\":");
    // Writing a string to a Vec cannot fail.
    let _ = serde_json::to_writer(&mut out, event_type);
    out.extend_from_slice(b",\"created_at\":");
    let _ = serde_json::to_writer(&mut out, created_at);
    out.extend_from_slice(b",\"delivery_ids\":[");
    for (n, d) in delivery_ids.iter().enumerate() {
        if n > 0 {
            out.push(b',');
        }
        let _ = write!(out, "\"{}\"", d.0.hyphenated().encode_lower(&mut uuid));
    }
    out.extend_from_slice(b"]}");
    out
}

#[utoipa::path(get, path = "/v1/events/{id}", tag = "events", params(("id" = String, Path)),
    responses((status = 200, body = EventOut),
        (status = 404, body = NamedError), AuthErrors),
    security(("bearer" = [])))]
pub async fn get(
    State(state): State<Arc<AppState>>,
    who: Auth<scope::DeliveriesRead>,
    PathId(id): PathId,
) -> Result<Response, ApiError> {
    let not_found = || ApiError::not_found(F, format!("event {id} not found"));
    let uuid = parse_id(&id).ok_or_else(not_found)?;
    let event = match state.engine.event(EventId(uuid)).map_err(|e| ApiError::from_read(F, e))? {
        Some(e) if who.sees(e.record.org_id) => e,
        _ => return Err(not_found()),
    };
    let payload =
        serde_json::value::RawValue::from_string(String::from_utf8_lossy(&event.payload).into_owned())
            .map_err(|e| ApiError::internal(F, format!("stored payload is not JSON: {e}")))?;
    let r = event.record;
    Ok(Json(EventOut {
        id: r.id.to_string(),
        org_id: r.org_id.to_string(),
        event_type: r.event_type,
        call_id: r.call_id.map(|c| c.hyphenated().to_string()),
        payload,
        created_at: ts(r.created_at_ms),
        delivery_ids: r.delivery_ids.iter().map(|d| d.to_string()).collect(),
    })
    .into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_publish_answer_is_byte_for_byte_what_serde_json_writes_for_publish_out() {
        let id = EventId(Uuid::from_u128(0x0190_d7a0_0000_7000_8000_0000_0000_00ab));
        let deliveries: Vec<DeliveryId> = (0..3u128)
            .map(|n| DeliveryId(Uuid::from_u128(0x0190_d7a0_ffff_7000_8000_0000_0000_0000 + n)))
            .collect();
        for (event_type, delivery_ids) in [
            ("call.queued", &deliveries[..0]),
            ("call.queued", &deliveries[..1]),
            ("a-b_c.D9", &deliveries[..]),
            ("quote\"back\\slash\u{1}é", &deliveries[..2]),
        ] {
            for ms in [0, 1_773_570_734_000, 1_773_570_734_123] {
                let expected = serde_json::to_vec(&PublishOut {
                    id: id.to_string(),
                    event_type: event_type.to_owned(),
                    created_at: ts(ms),
                    delivery_ids: delivery_ids.iter().map(|d| d.to_string()).collect(),
                })
                .unwrap();
                let got = publish_out_json(id, event_type, &ts(ms), delivery_ids);
                assert_eq!(String::from_utf8(got).unwrap(), String::from_utf8(expected).unwrap());
            }
        }
    }

    /// The one-pass parse accepts only what `PublishIn` accepts, with the same values (what it
    /// refuses is parsed as `PublishIn`, so refusals and their messages are `PublishIn`'s).
    #[test]
    fn the_borrowed_publish_body_accepts_what_publish_in_accepts_with_the_same_values() {
        let bodies: &[&str] = &[
            r#"{"event_type":"call.queued","payload":{"a":[1,2,{"b":null}]}}"#,
            r#"{"payload":"x","event_type":"a\"b\u00e9\n"}"#,
            r#"{"event_type":"t","payload":null,"call_id":null,"webhook_url":null,"org_id":null}"#,
            r#"{"event_type":"t","payload":7,"call_id":"0190d7a0-0000-7000-8000-000000000000","webhook_url":"https://example.com/h","org_id":"o\/1"}"#,
            r#"  {"event_type":"t","payload":{} }  trailing"#,
            r#"{"event_type":"t","payload":{},"extra":1}"#,
            r#"{"event_type":"t","event_type":"u","payload":{}}"#,
            r#"{"event_type":"t"}"#,
            r#"{"event_type":5,"payload":{}}"#,
            r#"{"event_type":"t","payload":{"unclosed":[}"#,
            r#"[1,2]"#,
            r#""string""#,
            r#"{"event_type":"t","payload":{},"call_id":5}"#,
            "",
        ];
        for body in bodies {
            let fast = PublishInRef::deserialize(&mut serde_json::Deserializer::from_slice(body.as_bytes()));
            let slow = parse_json::<PublishIn>(F, body.as_bytes());
            match (fast, slow) {
                (Ok(f), Ok(s)) => {
                    assert_eq!(f.event_type, s.event_type, "{body}");
                    assert_eq!(f.payload.get(), s.payload.get(), "{body}");
                    assert_eq!(f.call_id.as_deref(), s.call_id.as_deref(), "{body}");
                    assert_eq!(f.webhook_url, s.webhook_url, "{body}");
                    assert_eq!(f.org_id.as_deref(), s.org_id.as_deref(), "{body}");
                }
                (Ok(f), Err(e)) => {
                    panic!("{body}: accepted as {f:?} but PublishIn refuses it: {}", e.message)
                }
                // Refused by the fast parse: the handler answers what `PublishIn` answers.
                (Err(_), _) => {}
            }
        }
    }
}
