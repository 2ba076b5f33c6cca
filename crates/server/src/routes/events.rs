//! `/v1/events`: publish (with `Idempotency-Key`) and get.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use herald_engine::{Command, Reply};
use herald_projector::{EventId, Scope};
use uuid::Uuid;

use crate::auth::authenticate;
use crate::error::{ApiError, Family, NamedError};
use crate::json::{EventOut, PublishIn, PublishOut};
use crate::routes::org_of;
use crate::state::AppState;
use crate::util::{json_body, parse_id, ts, PathId};

const F: Family = Family::Named;

#[utoipa::path(post, path = "/v1/events", tag = "events", request_body = PublishIn,
    params(("Idempotency-Key" = Option<String>, Header, description = "the same key within 24 h returns the first answer")),
    responses((status = 202, body = PublishOut, description = "the event and its deliveries are durable"),
        (status = 400, body = NamedError), (status = 401, body = NamedError), (status = 403, body = NamedError),
        (status = 413, body = NamedError), (status = 429, body = NamedError), (status = 503, body = NamedError)),
    security(("bearer" = [])))]
pub async fn publish(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let who = authenticate(&state, &headers, F, Scope::EventsWrite)?;
    let input: PublishIn = json_body(F, body)?;
    let org_id = org_of(F, &who, input.org_id.as_deref())?;
    let idempotency_key = match headers.get("idempotency-key") {
        None => None,
        Some(v) => Some(
            v.to_str()
                .map_err(|_| ApiError::validation(F, "Idempotency-Key", "must be visible ASCII"))?
                .to_owned(),
        ),
    };
    let call_id = match input.call_id.as_deref() {
        None => None,
        Some(text) => {
            Some(parse_id(text).ok_or_else(|| ApiError::validation(F, "call_id", "must be a UUID"))?)
        }
    };
    let event_type = input.event_type;
    let command = Command::Publish {
        id: EventId(Uuid::now_v7()),
        org_id,
        event_type: event_type.clone(),
        payload: input.payload.get().as_bytes().to_vec(),
        call_id,
        webhook_url: input.webhook_url,
        idempotency_key,
    };
    let reply = state.engine.execute(who.actor(), command).await.map_err(|e| ApiError::from_engine(F, e))?;
    match reply {
        Reply::Published { id, created_at_ms, delivery_ids, replayed } => {
            if !replayed {
                state.metrics.published();
            }
            let event_type = match replayed {
                true => state.engine.event(id).ok().flatten().map_or(event_type, |e| e.record.event_type),
                false => event_type,
            };
            let out = PublishOut {
                id: id.to_string(),
                event_type,
                created_at: ts(created_at_ms),
                delivery_ids: delivery_ids.iter().map(|d| d.to_string()).collect(),
            };
            Ok((StatusCode::ACCEPTED, Json(out)).into_response())
        }
        other => Err(ApiError::internal(F, format!("unexpected reply {other:?}"))),
    }
}

#[utoipa::path(get, path = "/v1/events/{id}", tag = "events", params(("id" = String, Path)),
    responses((status = 200, body = EventOut), (status = 401, body = NamedError), (status = 403, body = NamedError),
        (status = 404, body = NamedError), (status = 429, body = NamedError)),
    security(("bearer" = [])))]
pub async fn get(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    PathId(id): PathId,
) -> Result<Response, ApiError> {
    let who = authenticate(&state, &headers, F, Scope::DeliveriesRead)?;
    let not_found = || ApiError::not_found(F, format!("event {id} not found"));
    let uuid = parse_id(&id).ok_or_else(not_found)?;
    let event = match state.engine.event(EventId(uuid)).map_err(|e| ApiError::from_engine(F, e))? {
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
