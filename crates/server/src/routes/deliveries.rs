//! `/v1/webhook_deliveries`: list with filters and cursors, get, attempts, redeliver (seed 003).

use std::sync::Arc;

use axum::extract::{Query, State};
use axum::response::{IntoResponse, Response};
use axum::Json;
use herald_engine::{
    list_deliveries_rev, Command, Delivery, DeliveryCursor, DeliveryId, DeliveryIndex, DeliveryQuery,
    DeliveryStatus, EndpointId, OrgId,
};
use serde::Deserialize;

use crate::auth::{scope, Auth, Principal};
use crate::error::{ApiError, AuthErrors, Family, NamedError};
use crate::json::{AttemptList, AttemptOut, DeliveryList, DeliveryOut};
use crate::routes::{list_scope, scope_orgs};
use crate::state::AppState;
use crate::util::{self, encode_cursor, parse_id, parse_limit, parse_ts, PathId};

const F: Family = Family::Named;
pub const PAGE_DEFAULT: usize = 50;
pub const PAGE_MAX: usize = 250;
/// Index entries a filtered page reads at most, per item asked, before it answers with what it
/// has and a cursor: a page's cost stays bounded whatever the store holds.
const SCAN_PER_ITEM_MAX: usize = 20;

pub fn parse_status(family: Family, text: &str) -> Result<DeliveryStatus, ApiError> {
    match text {
        "pending" => Ok(DeliveryStatus::Pending),
        "delivered" => Ok(DeliveryStatus::Delivered),
        "exhausted" => Ok(DeliveryStatus::Exhausted),
        "inactive" => Ok(DeliveryStatus::Inactive),
        _ => Err(ApiError::validation(
            family,
            "status",
            format!("{text:?} is not one of pending, delivered, exhausted, inactive"),
        )),
    }
}

pub fn cursor_text(c: &DeliveryCursor) -> String {
    let mut bytes = c.created_at_ms.to_be_bytes().to_vec();
    bytes.extend_from_slice(c.id.as_bytes());
    encode_cursor(&bytes)
}

pub fn parse_cursor(family: Family, text: Option<&str>) -> Result<Option<DeliveryCursor>, ApiError> {
    let Some(bytes) = util::parse_cursor::<24>(family, text)? else { return Ok(None) };
    let mut at = [0u8; 8];
    at.copy_from_slice(&bytes[..8]);
    let mut id = [0u8; 16];
    id.copy_from_slice(&bytes[8..]);
    Ok(Some(DeliveryCursor { created_at_ms: u64::from_be_bytes(at), id: DeliveryId::from_bytes(id) }))
}

/// Walks `query` newest first from `cursor`, keeping what `keep` accepts, until `limit` are kept
/// or the scan budget is spent. Returns the kept deliveries and the cursor to go on from.
pub fn filtered_page(
    state: &AppState,
    family: Family,
    query: &DeliveryQuery,
    mut cursor: Option<DeliveryCursor>,
    limit: usize,
    keep: impl Fn(&Delivery) -> bool,
) -> Result<(Vec<Delivery>, Option<DeliveryCursor>), ApiError> {
    let mut kept = Vec::new();
    let mut budget = limit.saturating_mul(SCAN_PER_ITEM_MAX);
    loop {
        // One state of the store for the whole merged page, so a delivery whose status changes
        // meanwhile is neither missed nor listed twice.
        let page = state
            .engine
            .consistent_read(|t| list_deliveries_rev(t, query, cursor, limit))
            .map_err(|e| ApiError::from_read(family, e))?;
        budget = budget.saturating_sub(page.items.len());
        for (i, d) in page.items.iter().enumerate() {
            if keep(d) {
                kept.push(d.clone());
                if kept.len() == limit {
                    let more = i + 1 < page.items.len() || page.next.is_some();
                    let next = DeliveryCursor { created_at_ms: d.created_at_ms, id: d.id };
                    return Ok((kept, more.then_some(next)));
                }
            }
        }
        match page.next {
            None => return Ok((kept, None)),
            Some(next) if budget == 0 => return Ok((kept, Some(next))),
            Some(next) => cursor = Some(next),
        }
    }
}

#[derive(Debug, Deserialize)]
pub struct ListQuery {
    status: Option<String>,
    endpoint_id: Option<String>,
    event_type: Option<String>,
    created_after: Option<String>,
    created_before: Option<String>,
    limit: Option<String>,
    cursor: Option<String>,
    org_id: Option<String>,
}

#[utoipa::path(get, path = "/v1/webhook_deliveries", tag = "deliveries",
    params(("status" = Option<String>, Query, description = "pending, delivered, exhausted or inactive"),
        ("endpoint_id" = Option<String>, Query), ("event_type" = Option<String>, Query),
        ("created_after" = Option<String>, Query, description = "RFC 3339"),
        ("created_before" = Option<String>, Query, description = "RFC 3339"),
        ("limit" = Option<u32>, Query, description = "1 to 250, default 50"), ("cursor" = Option<String>, Query),
        ("org_id" = Option<String>, Query, description = "admin keys only: one organisation; without it, every organisation (up to 64 with deliveries)")),
    responses((status = 200, body = DeliveryList), (status = 400, body = NamedError), AuthErrors),
    security(("bearer" = [])))]
pub async fn list(
    State(state): State<Arc<AppState>>,
    who: Auth<scope::DeliveriesRead>,
    query: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(q) = query.map_err(|e| ApiError::bad_request(F, e.body_text()))?;
    let scope = list_scope(F, &who, q.org_id.as_deref())?;
    let limit = parse_limit(F, q.limit.as_deref(), PAGE_DEFAULT, PAGE_MAX)?;
    let status = q.status.as_deref().map(|s| parse_status(F, s)).transpose()?;
    let event_type = q.event_type.clone();
    if let Some(t) = &event_type {
        if !herald_engine::valid_event_type(t) {
            return Err(ApiError::validation(F, "event_type", "must match [A-Za-z0-9._-]{1,128}"));
        }
    }
    let time = |field: &'static str, v: &Option<String>| -> Result<Option<u64>, ApiError> {
        v.as_deref()
            .map(|t| {
                parse_ts(t).ok_or_else(|| ApiError::validation(F, field, "must be an RFC 3339 timestamp"))
            })
            .transpose()
    };
    let created_from_ms = time("created_after", &q.created_after)?.map(|ms| ms.saturating_add(1));
    let created_before_ms = time("created_before", &q.created_before)?;
    let cursor = parse_cursor(F, q.cursor.as_deref())?;
    let endpoint = match q.endpoint_id.as_deref() {
        None => None,
        Some(text) => Some(EndpointId(
            parse_id(text).ok_or_else(|| ApiError::validation(F, "endpoint_id", "must be a UUID"))?,
        )),
    };
    // The index that answers most of the filter; the rest is checked per delivery. An admin's
    // list without an organisation walks every organisation's index as one.
    let org_index = |org_id: OrgId| match (status, &event_type) {
        (Some(s), _) => DeliveryIndex::OrgStatus(org_id, s),
        (None, Some(t)) => DeliveryIndex::OrgEventType(org_id, t.clone()),
        (None, None) => DeliveryIndex::Org(org_id),
    };
    let index = match (endpoint, status) {
        (Some(e), Some(s)) => DeliveryIndex::EndpointStatus(e, s),
        (Some(e), None) => DeliveryIndex::Endpoint(e),
        (None, _) => match scope {
            Some(org_id) => org_index(org_id),
            None => DeliveryIndex::Union(scope_orgs(&state, F, None)?.into_iter().map(org_index).collect()),
        },
    };
    let query = DeliveryQuery { index, created_from_ms, created_before_ms };
    let (items, next) = filtered_page(&state, F, &query, cursor, limit, |d| {
        scope.is_none_or(|org_id| d.org_id == org_id)
            && status.is_none_or(|s| d.status == s)
            && event_type.as_ref().is_none_or(|t| &d.event_type == t)
    })?;
    let data = items.iter().map(|d| delivery_out(&state, F, d)).collect::<Result<_, _>>()?;
    Ok(Json(DeliveryList { data, next_cursor: next.as_ref().map(cursor_text) }).into_response())
}

/// The delivery `id` as this caller may see it.
pub fn visible(
    state: &AppState,
    family: Family,
    who: &Principal,
    id: &str,
) -> Result<Option<Delivery>, ApiError> {
    let Some(uuid) = parse_id(id) else { return Ok(None) };
    let d = state.engine.delivery(DeliveryId(uuid)).map_err(|e| ApiError::from_read(family, e))?;
    Ok(d.filter(|d| who.sees(d.org_id)))
}

/// The delivery object of `d`, with its event's ordering key (a read of an ascending keyspace,
/// answered by the cache for recent events without one).
pub fn delivery_out(state: &AppState, family: Family, d: &Delivery) -> Result<DeliveryOut, ApiError> {
    let ordering_key =
        state.engine.ordering_key(d.event_id, d.call_id).map_err(|e| ApiError::from_read(family, e))?;
    Ok(DeliveryOut::new(d, ordering_key))
}

fn not_found(id: &str) -> ApiError {
    ApiError::not_found(F, format!("delivery {id} not found"))
}

#[utoipa::path(get, path = "/v1/webhook_deliveries/{id}", tag = "deliveries", params(("id" = String, Path)),
    responses((status = 200, body = DeliveryOut),
        (status = 404, body = NamedError), AuthErrors),
    security(("bearer" = [])))]
pub async fn get(
    State(state): State<Arc<AppState>>,
    who: Auth<scope::DeliveriesRead>,
    PathId(id): PathId,
) -> Result<Response, ApiError> {
    let d = visible(&state, F, &who, &id)?.ok_or_else(|| not_found(&id))?;
    Ok(Json(delivery_out(&state, F, &d)?).into_response())
}

#[utoipa::path(get, path = "/v1/webhook_deliveries/{id}/attempts", tag = "deliveries", params(("id" = String, Path)),
    responses((status = 200, body = AttemptList),
        (status = 404, body = NamedError), AuthErrors),
    security(("bearer" = [])))]
pub async fn attempts(
    State(state): State<Arc<AppState>>,
    who: Auth<scope::DeliveriesRead>,
    PathId(id): PathId,
) -> Result<Response, ApiError> {
    let d = visible(&state, F, &who, &id)?.ok_or_else(|| not_found(&id))?;
    let mut data = Vec::new();
    let mut after = 0;
    loop {
        let page = state.engine.attempts(d.id, after, 250).map_err(|e| ApiError::from_read(F, e))?;
        let Some(last) = page.last() else { break };
        after = last.attempt;
        data.extend(page.iter().map(AttemptOut::from));
    }
    Ok(Json(AttemptList { data }).into_response())
}

/// Why a history answer may not reach back to the delivery's creation (see `DeliveryHistory`).
pub const HISTORY_PARTIAL_HEADER: &str = "herald-history-partial";

#[utoipa::path(get, path = "/v1/webhook_deliveries/{id}/history", tag = "deliveries", params(("id" = String, Path)),
    responses((status = 200, content_type = "application/x-ndjson", body = String,
        description = "the records that touched the delivery (its creation, attempts, retriggers and redelivers, \
            a cascade that changed it), oldest first, one a line as in /v1/audit/log: \
            {seq, at, hash, prev_hash, event: {type, ...}}. Records a compaction dropped are not in it. \
            A delivery older than the record index (fold rules 4) has a herald-history-partial header."),
        (status = 404, body = NamedError), (status = 503, body = NamedError), AuthErrors),
    security(("bearer" = [])))]
pub async fn history(
    State(state): State<Arc<AppState>>,
    who: Auth<scope::DeliveriesRead>,
    PathId(id): PathId,
) -> Result<Response, ApiError> {
    let d = visible(&state, F, &who, &id)?.ok_or_else(|| not_found(&id))?;
    let engine = state.engine.clone();
    let history = tokio::task::spawn_blocking(move || engine.delivery_history(&d))
        .await
        .map_err(|e| ApiError::internal(F, format!("reading the history: {e}")))?
        .map_err(|e| ApiError::from_read(F, e))?;
    let body = crate::routes::ops::audit_lines(&history.records);
    let mut response = ([(axum::http::header::CONTENT_TYPE, "application/x-ndjson")], body).into_response();
    if let Some(from) = history.indexed_from {
        let why = match from {
            0 => "this store keeps no record index: herald replay --scan tells the whole history".to_owned(),
            from => format!("records before seq {from} are not indexed: herald replay --scan tells them"),
        };
        if let Ok(value) = axum::http::HeaderValue::from_str(&why) {
            response.headers_mut().insert(HISTORY_PARTIAL_HEADER, value);
        }
    }
    Ok(response)
}

#[utoipa::path(post, path = "/v1/webhook_deliveries/{id}/redeliver", tag = "deliveries", params(("id" = String, Path)),
    responses((status = 200, body = DeliveryOut, description = "re-queued: pending, manual_retry_count + 1"), (status = 404, body = NamedError),
        (status = 409, body = NamedError, description = "already pending"),
        (status = 503, body = NamedError), AuthErrors),
    security(("bearer" = [])))]
pub async fn redeliver(
    State(state): State<Arc<AppState>>,
    who: Auth<scope::DeliveriesWrite>,
    PathId(id): PathId,
) -> Result<Response, ApiError> {
    let d = visible(&state, F, &who, &id)?.ok_or_else(|| not_found(&id))?;
    state
        .engine
        .execute(who.actor(), Command::Redeliver { delivery_id: d.id })
        .await
        .map_err(|e| ApiError::from_engine(F, e))?;
    // The answer is the delivery as the redeliver left it; the dispatcher may already be at it.
    let after =
        state.engine.delivery(d.id).map_err(|e| ApiError::from_read(F, e))?.ok_or_else(|| not_found(&id))?;
    let answer = if after.status == DeliveryStatus::Pending && after.attempt_count == d.attempt_count {
        after
    } else {
        // Its attempt was made before this read: the state between the two, with the url that
        // attempt went to (the endpoint's, which the redeliver took) and, for both times, when
        // that attempt started (the redeliver's own time is not kept apart from it).
        Delivery {
            status: DeliveryStatus::Pending,
            manual_retry_count: d.manual_retry_count + 1,
            next_attempt_at_ms: after.last_attempt_at_ms,
            updated_at_ms: after.last_attempt_at_ms.unwrap_or(d.updated_at_ms),
            inactive_reason: None,
            url: after.url,
            ..d
        }
    };
    Ok(Json(delivery_out(&state, F, &answer)?).into_response())
}
