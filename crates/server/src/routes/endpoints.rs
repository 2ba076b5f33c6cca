//! `/v1/endpoints`: create, list, get, patch, delete, rotate the secret, enable.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use herald_engine::{Command, EndpointId, Reply};
use serde::Deserialize;
use uuid::Uuid;

use crate::auth::{scope, Auth, Principal};
use crate::error::{ApiError, AuthErrors, Family, NamedError};
use crate::json::{settings_patch, EndpointCreate, EndpointList, EndpointOut, EndpointPatch};
use crate::routes::{list_scope, org_of};
use crate::state::AppState;
use crate::util::{encode_cursor, json_body, parse_cursor, parse_id, parse_limit, PathId};

const F: Family = Family::Named;
pub const PAGE_DEFAULT: usize = 50;
pub const PAGE_MAX: usize = 250;

fn not_found(id: &str) -> ApiError {
    ApiError::not_found(F, format!("endpoint {id} not found"))
}

/// The live endpoint `id` as this caller may see it.
fn visible(state: &AppState, who: &Principal, id: &str) -> Result<herald_engine::Endpoint, ApiError> {
    let uuid = parse_id(id).ok_or_else(|| not_found(id))?;
    match state.engine.endpoint(EndpointId(uuid)).map_err(|e| ApiError::from_read(F, e))? {
        Some(e) if who.sees(e.org_id) && !e.is_deleted() => Ok(e),
        _ => Err(not_found(id)),
    }
}

async fn run(state: &AppState, who: &Principal, command: Command) -> Result<Reply, ApiError> {
    state.engine.execute(who.actor(), command).await.map_err(|e| ApiError::from_engine(F, e))
}

fn answer(
    state: &AppState,
    status: StatusCode,
    id: EndpointId,
    secret: Option<String>,
) -> Result<Response, ApiError> {
    let (e, settings) = state
        .engine
        .read(|t| Ok((herald_engine::get_endpoint(t, id)?, herald_engine::get_endpoint_settings(t, id)?)))
        .map_err(|e| ApiError::from_read(F, e))?;
    let e = e.ok_or_else(|| ApiError::internal(F, format!("endpoint {id} vanished after its command")))?;
    Ok((status, Json(EndpointOut::new(&e, &settings, secret))).into_response())
}

#[utoipa::path(post, path = "/v1/endpoints", tag = "endpoints", request_body = EndpointCreate,
    responses((status = 201, body = EndpointOut), (status = 400, body = NamedError), (status = 413, body = NamedError), AuthErrors),
    security(("bearer" = [])))]
pub async fn create(
    State(state): State<Arc<AppState>>,
    who: Auth<scope::EndpointsWrite>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let input: EndpointCreate = json_body(F, body)?;
    let org_id = org_of(F, &who, input.org_id.as_deref())?;
    let id = EndpointId(Uuid::now_v7());
    let command = Command::CreateEndpoint {
        id,
        org_id,
        url: input.url,
        name: input.name.unwrap_or_default(),
        enabled_events: input.enabled_events.unwrap_or_else(|| vec!["*".to_owned()]),
        secret: input.secret,
        settings: settings_patch(
            input.rate_limit_per_s,
            input.max_in_flight,
            input.ordering.as_deref(),
            input.headers,
        )
        .map_err(|e| ApiError::bad_request(F, e))?,
    };
    match run(&state, &who, command).await? {
        Reply::Endpoint { id, secret } => answer(&state, StatusCode::CREATED, id, Some(secret)),
        other => Err(ApiError::internal(F, format!("unexpected reply {other:?}"))),
    }
}

#[derive(Debug, Deserialize)]
pub struct ListQuery {
    limit: Option<String>,
    cursor: Option<String>,
    org_id: Option<String>,
}

#[utoipa::path(get, path = "/v1/endpoints", tag = "endpoints",
    params(("limit" = Option<u32>, Query, description = "1 to 250, default 50"),
        ("cursor" = Option<String>, Query, description = "next_cursor of the previous page"),
        ("org_id" = Option<String>, Query, description = "admin keys only: one organisation; without it, every organisation")),
    responses((status = 200, body = EndpointList), (status = 400, body = NamedError), AuthErrors),
    security(("bearer" = [])))]
pub async fn list(
    State(state): State<Arc<AppState>>,
    who: Auth<scope::EndpointsRead>,
    query: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(q) = query.map_err(|e| ApiError::bad_request(F, e.body_text()))?;
    let scope = list_scope(F, &who, q.org_id.as_deref())?;
    let limit = parse_limit(F, q.limit.as_deref(), PAGE_DEFAULT, PAGE_MAX)?;
    let before = parse_cursor::<16>(F, q.cursor.as_deref())?.map(EndpointId::from_bytes);
    let (page, settings) = state
        .engine
        .read(|t| {
            let page = match scope {
                Some(org_id) => herald_engine::list_endpoints_rev(t, org_id, before, limit),
                // An admin key naming no organisation: every organisation's endpoints.
                None => herald_engine::list_all_endpoints_rev(t, before, limit),
            }?;
            let settings = page
                .items
                .iter()
                .map(|e| herald_engine::get_endpoint_settings(t, e.id))
                .collect::<Result<Vec<_>, _>>()?;
            Ok((page, settings))
        })
        .map_err(|e| ApiError::from_read(F, e))?;
    let next_cursor = page.next.map(|id| encode_cursor(id.as_bytes()));
    let data = page.items.iter().zip(&settings).map(|(e, s)| EndpointOut::new(e, s, None)).collect();
    Ok(Json(EndpointList { data, next_cursor }).into_response())
}

#[utoipa::path(get, path = "/v1/endpoints/{id}", tag = "endpoints", params(("id" = String, Path)),
    responses((status = 200, body = EndpointOut),
        (status = 404, body = NamedError), AuthErrors),
    security(("bearer" = [])))]
pub async fn get(
    State(state): State<Arc<AppState>>,
    who: Auth<scope::EndpointsRead>,
    PathId(id): PathId,
) -> Result<Response, ApiError> {
    let e = visible(&state, &who, &id)?;
    let settings = state
        .engine
        .read(|t| herald_engine::get_endpoint_settings(t, e.id))
        .map_err(|e| ApiError::from_read(F, e))?;
    Ok(Json(EndpointOut::new(&e, &settings, None)).into_response())
}

#[utoipa::path(patch, path = "/v1/endpoints/{id}", tag = "endpoints", params(("id" = String, Path)),
    request_body = EndpointPatch,
    responses((status = 200, body = EndpointOut), (status = 400, body = NamedError), (status = 404, body = NamedError), (status = 413, body = NamedError), AuthErrors),
    security(("bearer" = [])))]
pub async fn patch(
    State(state): State<Arc<AppState>>,
    who: Auth<scope::EndpointsWrite>,
    PathId(id): PathId,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let e = visible(&state, &who, &id)?;
    let input: EndpointPatch = json_body(F, body)?;
    let command = Command::UpdateEndpoint {
        id: e.id,
        url: input.url,
        name: input.name,
        enabled_events: input.enabled_events,
        settings: settings_patch(
            input.rate_limit_per_s,
            input.max_in_flight,
            input.ordering.as_deref(),
            input.headers,
        )
        .map_err(|e| ApiError::bad_request(F, e))?,
    };
    run(&state, &who, command).await?;
    answer(&state, StatusCode::OK, e.id, None)
}

#[utoipa::path(delete, path = "/v1/endpoints/{id}", tag = "endpoints", params(("id" = String, Path)),
    responses((status = 204, description = "deleted; its deliveries and history are kept"), (status = 404, body = NamedError), AuthErrors),
    security(("bearer" = [])))]
pub async fn delete(
    State(state): State<Arc<AppState>>,
    who: Auth<scope::EndpointsWrite>,
    PathId(id): PathId,
) -> Result<Response, ApiError> {
    let e = visible(&state, &who, &id)?;
    run(&state, &who, Command::DeleteEndpoint { id: e.id }).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RotateIn {
    /// The new `whsec_` secret; generated when absent.
    pub secret: Option<String>,
}

#[utoipa::path(post, path = "/v1/endpoints/{id}/secret/rotate", tag = "endpoints", params(("id" = String, Path)),
    request_body(content = Option<RotateIn>, description = "optional"),
    responses((status = 200, body = EndpointOut), (status = 400, body = NamedError), (status = 404, body = NamedError), AuthErrors),
    security(("bearer" = [])))]
pub async fn rotate(
    State(state): State<Arc<AppState>>,
    who: Auth<scope::EndpointsWrite>,
    PathId(id): PathId,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let e = visible(&state, &who, &id)?;
    let secret = match &body {
        Ok(b) if b.iter().all(u8::is_ascii_whitespace) => None,
        _ => json_body::<RotateIn>(F, body)?.secret,
    };
    match run(&state, &who, Command::RotateSecret { id: e.id, secret }).await? {
        Reply::Endpoint { id, secret } => answer(&state, StatusCode::OK, id, Some(secret)),
        other => Err(ApiError::internal(F, format!("unexpected reply {other:?}"))),
    }
}

#[utoipa::path(post, path = "/v1/endpoints/{id}/enable", tag = "endpoints", params(("id" = String, Path)),
    responses((status = 200, body = EndpointOut),
        (status = 404, body = NamedError), AuthErrors),
    security(("bearer" = [])))]
pub async fn enable(
    State(state): State<Arc<AppState>>,
    who: Auth<scope::EndpointsWrite>,
    PathId(id): PathId,
) -> Result<Response, ApiError> {
    let e = visible(&state, &who, &id)?;
    run(&state, &who, Command::EnableEndpoint { id: e.id }).await?;
    answer(&state, StatusCode::OK, e.id, None)
}
