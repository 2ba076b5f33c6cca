//! `/v1/api_keys` (admin): create (the key is shown once), list, revoke.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use herald_engine::{get_api_key, list_api_keys, ApiKeyId, Command, OrgId, Scope};
use serde::Deserialize;
use uuid::Uuid;

use crate::auth::{generate_key, key_hash, scope, Auth};
use crate::error::{ApiError, AuthErrors, Family, NamedError};
use crate::json::{ApiKeyCreate, ApiKeyList, ApiKeyOut};
use crate::state::AppState;
use crate::util::{encode_cursor, json_body, parse_cursor, parse_id, parse_limit, PathId};

const F: Family = Family::Named;

#[utoipa::path(post, path = "/v1/api_keys", tag = "api_keys", request_body = ApiKeyCreate,
    responses((status = 201, body = ApiKeyOut, description = "the key is shown this once"),
        (status = 400, body = NamedError), AuthErrors),
    security(("bearer" = [])))]
pub async fn create(
    State(state): State<Arc<AppState>>,
    who: Auth<scope::AdminOfNoOrg>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let input: ApiKeyCreate = json_body(F, body)?;
    let org_id = match input.org_id.as_deref() {
        None => None,
        Some(text) => {
            Some(OrgId(parse_id(text).ok_or_else(|| ApiError::validation(F, "org_id", "must be a UUID"))?))
        }
    };
    let mut scopes = Vec::new();
    for name in &input.scopes {
        let scope = Scope::from_name(name).ok_or_else(|| {
            let known: Vec<&str> = Scope::ALL.iter().map(|s| s.name()).collect();
            ApiError::validation(F, "scopes", format!("{name:?} is not one of {}", known.join(", ")))
        })?;
        if !scopes.contains(&scope) {
            scopes.push(scope);
        }
    }
    if org_id.is_none() && !scopes.contains(&Scope::Admin) {
        return Err(ApiError::validation(F, "org_id", "required unless the key has the admin scope"));
    }
    let key = generate_key().map_err(|e| ApiError::internal(F, e))?;
    let id = ApiKeyId(Uuid::now_v7());
    let command = Command::CreateApiKey {
        id,
        org_id,
        scopes,
        name: input.name.unwrap_or_default(),
        key_hash: key_hash(&key),
    };
    state.engine.execute(who.actor(), command).await.map_err(|e| ApiError::from_engine(F, e))?;
    let stored = state
        .engine
        .read(|t| get_api_key(t, id))
        .map_err(|e| ApiError::from_read(F, e))?
        .ok_or_else(|| ApiError::internal(F, "the new key vanished"))?;
    Ok((StatusCode::CREATED, Json(ApiKeyOut::new(&stored, Some(key)))).into_response())
}

#[derive(Debug, Deserialize)]
pub struct ListQuery {
    limit: Option<String>,
    cursor: Option<String>,
}

#[utoipa::path(get, path = "/v1/api_keys", tag = "api_keys",
    params(("limit" = Option<u32>, Query), ("cursor" = Option<String>, Query)),
    responses((status = 200, body = ApiKeyList), (status = 400, body = NamedError), AuthErrors),
    security(("bearer" = [])))]
pub async fn list(
    State(state): State<Arc<AppState>>,
    _who: Auth<scope::AdminOfNoOrg>,
    query: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(q) = query.map_err(|e| ApiError::bad_request(F, e.body_text()))?;
    let limit = parse_limit(F, q.limit.as_deref(), 50, 250)?;
    let after = parse_cursor::<16>(F, q.cursor.as_deref())?.map(ApiKeyId::from_bytes);
    let page =
        state.engine.read(|t| list_api_keys(t, after, limit)).map_err(|e| ApiError::from_read(F, e))?;
    let data = page.items.iter().map(|k| ApiKeyOut::new(k, None)).collect();
    Ok(Json(ApiKeyList { data, next_cursor: page.next.map(|id| encode_cursor(id.as_bytes())) })
        .into_response())
}

#[utoipa::path(delete, path = "/v1/api_keys/{id}", tag = "api_keys", params(("id" = String, Path)),
    responses((status = 204, description = "revoked, effective at once"), (status = 404, body = NamedError), AuthErrors),
    security(("bearer" = [])))]
pub async fn revoke(
    State(state): State<Arc<AppState>>,
    who: Auth<scope::AdminOfNoOrg>,
    PathId(id): PathId,
) -> Result<Response, ApiError> {
    let uuid = parse_id(&id).ok_or_else(|| ApiError::not_found(F, format!("api key {id} not found")))?;
    state
        .engine
        .execute(who.actor(), Command::RevokeApiKey { id: ApiKeyId(uuid) })
        .await
        .map_err(|e| ApiError::from_engine(F, e))?;
    Ok(StatusCode::NO_CONTENT.into_response())
}
