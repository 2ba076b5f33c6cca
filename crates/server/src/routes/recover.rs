//! Bulk recover: `POST /v1/webhook_deliveries/recover` (with its dry run) and
//! `GET /v1/recoveries/{id}`.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Json;
use herald_engine::{
    check_recovery_filter, select_recovery, Command, DeliveryStatus, EndpointId, Recovered, RecoveryFilter,
    RecoveryId, Reply,
};
use uuid::Uuid;

use crate::auth::{scope, Auth};
use crate::error::{ApiError, AuthErrors, Family, NamedError};
use crate::json::{RecoverIn, RecoverOut, RecoveryOut};
use crate::routes::org_of;
use crate::state::AppState;
use crate::util::{json_body, parse_id, parse_ts, PathId};

const F: Family = Family::Named;
/// `max` when the body gives none (API.md's example).
pub const RECOVER_MAX_DEFAULT: u32 = 10_000;

fn parse_recover_status(text: &str) -> Result<DeliveryStatus, ApiError> {
    match text {
        "exhausted" => Ok(DeliveryStatus::Exhausted),
        "inactive" => Ok(DeliveryStatus::Inactive),
        "delivered" => Ok(DeliveryStatus::Delivered),
        _ => Err(ApiError::validation(
            F,
            "status",
            format!("{text:?} is not one of exhausted, inactive, delivered"),
        )),
    }
}

/// The filter of a recover's body, every field checked and named when wrong.
fn filter_of(input: &RecoverIn) -> Result<RecoveryFilter, ApiError> {
    let mut statuses = Vec::new();
    for text in input.status.as_deref().unwrap_or(&["exhausted".to_owned(), "inactive".to_owned()]) {
        let status = parse_recover_status(text)?;
        if !statuses.contains(&status) {
            statuses.push(status);
        }
    }
    let time = |field: &'static str, v: &Option<String>| -> Result<Option<u64>, ApiError> {
        v.as_deref()
            .map(|t| {
                parse_ts(t).ok_or_else(|| ApiError::validation(F, field, "must be an RFC 3339 timestamp"))
            })
            .transpose()
    };
    let endpoint_id = match input.endpoint_id.as_deref() {
        None => None,
        Some(text) => Some(EndpointId(
            parse_id(text).ok_or_else(|| ApiError::validation(F, "endpoint_id", "must be a UUID"))?,
        )),
    };
    let max = match input.max {
        None => RECOVER_MAX_DEFAULT,
        Some(n) => u32::try_from(n).unwrap_or(u32::MAX),
    };
    let filter = RecoveryFilter {
        statuses,
        endpoint_id,
        event_type: input.event_type.clone(),
        created_after_ms: time("created_after", &input.created_after)?,
        created_before_ms: time("created_before", &input.created_before)?,
        max,
    };
    check_recovery_filter(&filter).map_err(|e| ApiError::from_command(F, e))?;
    Ok(filter)
}

#[utoipa::path(post, path = "/v1/webhook_deliveries/recover", tag = "deliveries", request_body = RecoverIn,
    responses((status = 200, body = RecoverOut, description = "selected (and, unless a dry run, re-queued in one commit)"),
        (status = 400, body = NamedError), (status = 413, body = NamedError), (status = 503, body = NamedError), AuthErrors),
    security(("bearer" = [])))]
pub async fn recover(
    State(state): State<Arc<AppState>>,
    who: Auth<scope::DeliveriesWrite>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let input: RecoverIn = json_body(F, body)?;
    let org_id = org_of(F, &who, input.org_id.as_deref())?;
    let filter = filter_of(&input)?;
    if input.dry_run.unwrap_or(false) {
        // A read, never a command: the log is left as it is.
        let selection = state
            .engine
            .read(|t| select_recovery(t, org_id, &filter))
            .map_err(|e| ApiError::from_read(F, e))?;
        return Ok(Json(RecoverOut::new(&Recovered::of(&selection, None), true)).into_response());
    }
    let id = RecoveryId(Uuid::now_v7());
    let request_id = crate::request_id::current().map(tracing::field::display);
    tracing::info!(recovery_id = %id.0, org_id = %org_id, request_id, max = filter.max, "recovery started");
    let command = Command::Recover { id, org_id, filter };
    let reply = state.engine.execute(who.actor(), command).await.map_err(|e| {
        tracing::warn!(recovery_id = %id.0, request_id, error = %e, "recovery failed: nothing queued");
        ApiError::from_engine(F, e)
    })?;
    match reply {
        Reply::Recovered(r) => {
            tracing::info!(
                recovery_id = %id.0,
                request_id,
                matched = r.matched,
                queued = r.queued,
                truncated = r.truncated,
                "recovery done: its deliveries are queued, in one commit"
            );
            Ok(Json(RecoverOut::new(&r, false)).into_response())
        }
        other => Err(ApiError::internal(F, format!("unexpected reply {other:?}"))),
    }
}

#[utoipa::path(get, path = "/v1/recoveries/{id}", tag = "deliveries", params(("id" = String, Path)),
    responses((status = 200, body = RecoveryOut, description = "the recovery, with its deliveries counted by their status now"),
        (status = 404, body = NamedError), AuthErrors),
    security(("bearer" = [])))]
pub async fn get(
    State(state): State<Arc<AppState>>,
    who: Auth<scope::DeliveriesRead>,
    PathId(id): PathId,
) -> Result<Response, ApiError> {
    let not_found = || ApiError::not_found(F, format!("recovery {id} not found"));
    let recovery_id = RecoveryId(parse_id(&id).ok_or_else(not_found)?);
    let found = state
        .engine
        .read(|t| match herald_engine::get_recovery(t, recovery_id)? {
            Some(r) if who.sees(r.org_id) => Ok(Some((herald_engine::recovery_counts(t, &r)?, r))),
            _ => Ok(None),
        })
        .map_err(|e| ApiError::from_read(F, e))?;
    let (counts, recovery) = found.ok_or_else(not_found)?;
    Ok(Json(RecoveryOut::new(&recovery, &counts)).into_response())
}
