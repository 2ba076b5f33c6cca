//! The four seed routes: retrigger an inactive webhook (seed 000), get and list webhook failures
//! (seed 001), the admin batch retrigger (seed 002). Seed 003's redeliver is a native route.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Query, State};
use axum::response::{IntoResponse, Response};
use axum::Json;
use herald_engine::{
    Command, CommandError, Delivery, DeliveryId, DeliveryIndex, DeliveryQuery, DeliveryStatus, EndpointId,
    EngineError, Reply,
};
use serde::Deserialize;

use crate::auth::{scope, Auth, Plain};
use crate::error::{ApiError, AuthErrors, Family, NamedError, PlainAuthErrors, PlainError};
use crate::json::{
    is_failure, BatchItemOut, BatchRetriggerIn, BatchRetriggerOut, FailureList, FailureOut, RetriggerOut,
    WebhookFailure,
};
use crate::routes::deliveries::{cursor_text, filtered_page, parse_cursor, parse_status, visible};
use crate::routes::{list_scope, scope_orgs};
use crate::state::AppState;
use crate::util::{json_body, parse_id, parse_limit, PathId};

const P: Family = Family::Plain;
const N: Family = Family::Named;

fn no_failure(id: &str) -> ApiError {
    ApiError::not_found(P, format!("No failed webhook found with ID {id}"))
}

#[utoipa::path(post, path = "/api/webhooks/v1/failures/{id}/retrigger", tag = "seeds", params(("id" = String, Path)),
    responses((status = 200, body = RetriggerOut),
        (status = 404, body = PlainError), PlainAuthErrors),
    security(("bearer" = [])))]
pub async fn retrigger(
    State(state): State<Arc<AppState>>,
    who: Auth<scope::DeliveriesWrite, Plain>,
    PathId(id): PathId,
) -> Result<Response, ApiError> {
    let d = visible(&state, P, &who, &id)?.filter(|d| is_failure(d.status)).ok_or_else(|| no_failure(&id))?;
    match state.engine.execute(who.actor(), Command::Retrigger { delivery_id: d.id }).await {
        // The lowercase hyphenated form, whichever form the path used.
        Ok(_) => {
            Ok(Json(RetriggerOut { status: "success".into(), failure_id: d.id.to_string() }).into_response())
        }
        Err(EngineError::Command(CommandError::NotFound { .. })) => Err(no_failure(&id)),
        Err(e) => Err(ApiError::from_engine(P, e)),
    }
}

fn failure(state: &AppState, d: &Delivery) -> WebhookFailure {
    // Best effort: a name the store cannot read now is left out, the failure is still shown.
    let name = d.endpoint_id.and_then(|e| state.engine.endpoint(e).ok().flatten()).map(|e| e.name);
    WebhookFailure::new(d, name)
}

#[utoipa::path(get, path = "/api/v4/tasks/webhook_failures/{webhook_failure_id}", tag = "seeds",
    params(("webhook_failure_id" = String, Path)),
    responses((status = 200, body = FailureOut),
        (status = 404, body = PlainError), PlainAuthErrors),
    security(("bearer" = [])))]
pub async fn get_failure(
    State(state): State<Arc<AppState>>,
    who: Auth<scope::TasksWebhooksRead, Plain>,
    PathId(id): PathId,
) -> Result<Response, ApiError> {
    let d = visible(&state, P, &who, &id)?
        .filter(|d| is_failure(d.status))
        .ok_or_else(|| ApiError::not_found(P, format!("No webhook failure found with ID {id}")))?;
    Ok(Json(FailureOut { webhook_failure: failure(&state, &d) }).into_response())
}

#[derive(Debug, Deserialize)]
pub struct FailureQuery {
    status: Option<String>,
    webhook_id: Option<String>,
    limit: Option<String>,
    cursor: Option<String>,
    org_id: Option<String>,
}

#[utoipa::path(get, path = "/api/v4/tasks/webhook_failures", tag = "seeds",
    params(("status" = Option<String>, Query, description = "inactive or exhausted"),
        ("webhook_id" = Option<String>, Query, description = "an endpoint id"),
        ("limit" = Option<u32>, Query, description = "1 to 250, default 50"), ("cursor" = Option<String>, Query),
        ("org_id" = Option<String>, Query, description = "admin keys only: one organisation; without it, every organisation (up to 64 with deliveries)")),
    responses((status = 200, body = FailureList), (status = 400, body = PlainError), PlainAuthErrors),
    security(("bearer" = [])))]
pub async fn list_failures(
    State(state): State<Arc<AppState>>,
    who: Auth<scope::TasksWebhooksRead, Plain>,
    query: Result<Query<FailureQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(q) = query.map_err(|e| ApiError::bad_request(P, e.body_text()))?;
    let scope = list_scope(P, &who, q.org_id.as_deref())?;
    let limit = parse_limit(P, q.limit.as_deref(), 50, 250)?;
    let statuses = match q.status.as_deref() {
        None => vec![DeliveryStatus::Inactive, DeliveryStatus::Exhausted],
        Some(s) => match parse_status(P, s)? {
            s if is_failure(s) => vec![s],
            _ => return Err(ApiError::validation(P, "status", "must be inactive or exhausted")),
        },
    };
    let webhook = match q.webhook_id.as_deref() {
        None => None,
        Some(t) => Some(EndpointId(
            parse_id(t).ok_or_else(|| ApiError::validation(P, "webhook_id", "must be a UUID"))?,
        )),
    };
    let cursor = parse_cursor(P, q.cursor.as_deref())?;
    // Each status (of each organisation, for an admin key naming none) has its own index, all in
    // the same (created, id) order: one list walks them as one.
    let orgs = if webhook.is_none() { scope_orgs(&state, P, scope)? } else { Vec::new() };
    let parts = statuses.iter().flat_map(|status| match webhook {
        Some(e) => vec![DeliveryIndex::EndpointStatus(e, *status)],
        None => orgs.iter().map(|o| DeliveryIndex::OrgStatus(*o, *status)).collect(),
    });
    let query = DeliveryQuery::all(DeliveryIndex::Union(parts.collect()));
    let (merged, next) =
        filtered_page(&state, P, &query, cursor, limit, |d| scope.is_none_or(|o| d.org_id == o))?;
    let next_cursor = next.as_ref().map(cursor_text);
    let webhook_failures = merged.iter().map(|d| failure(&state, d)).collect();
    Ok(Json(FailureList { webhook_failures, next_cursor }).into_response())
}

#[utoipa::path(post, path = "/api/notifications/v1/admin/webhooks/{webhookId}/notifications/retrigger", tag = "seeds",
    params(("webhookId" = String, Path, description = "an endpoint id")), request_body = BatchRetriggerIn,
    responses((status = 200, body = BatchRetriggerOut), (status = 400, body = NamedError), (status = 404, body = NamedError), (status = 500, body = NamedError), AuthErrors),
    security(("bearer" = [])))]
pub async fn batch_retrigger(
    State(state): State<Arc<AppState>>,
    who: Auth<scope::Admin>,
    PathId(webhook_id): PathId,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let endpoint_id = parse_id(&webhook_id)
        .map(EndpointId)
        .ok_or_else(|| ApiError::not_found(N, format!("webhook {webhook_id} not found")))?;
    let input: BatchRetriggerIn = json_body(N, body)?;
    let ids = &input.webhook_notification_ids;
    if ids.is_empty() || ids.len() > herald_engine::BATCH_RETRIGGER_MAX {
        return Err(ApiError::validation(
            N,
            "webhookNotificationIds",
            format!("1 to 25 ids, got {}", ids.len()),
        ));
    }
    let mut delivery_ids = Vec::with_capacity(ids.len());
    for text in ids {
        let id = parse_id(text).ok_or_else(|| {
            ApiError::validation(N, "webhookNotificationIds", format!("{text:?} is not a UUID"))
        })?;
        delivery_ids.push(DeliveryId(id));
    }
    let command = Command::BatchRetrigger { endpoint_id, delivery_ids };
    let items = match state.engine.execute(who.actor(), command).await {
        Ok(Reply::Batch(items)) => items,
        Ok(other) => return Err(ApiError::internal(N, format!("unexpected reply {other:?}"))),
        Err(EngineError::Command(CommandError::NotFound { .. })) => {
            return Err(ApiError::not_found(N, format!("webhook {webhook_id} not found")))
        }
        Err(e) => return Err(ApiError::from_engine(N, e)),
    };
    let mut out = BatchRetriggerOut {
        total_requested: items.len() as u32,
        total_success: 0,
        total_failed: 0,
        successful_notifications: Vec::new(),
        failed_notifications: Vec::new(),
    };
    // Each id in the lowercase hyphenated form, whichever form the request used.
    for item in items {
        match item.result {
            Ok(request_id) => out.successful_notifications.push(BatchItemOut {
                webhook_notification_id: item.delivery_id.to_string(),
                retriggered_notification_request_id: Some(request_id.hyphenated().to_string()),
                error: None,
            }),
            Err(why) => out.failed_notifications.push(BatchItemOut {
                webhook_notification_id: item.delivery_id.to_string(),
                retriggered_notification_request_id: None,
                error: Some(why),
            }),
        }
    }
    out.total_success = out.successful_notifications.len() as u32;
    out.total_failed = out.failed_notifications.len() as u32;
    Ok(Json(out).into_response())
}
