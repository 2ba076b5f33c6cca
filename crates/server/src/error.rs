//! Errors as each route family answers them.
//!
//! - Native (`/v1/...`) and the admin batch retrigger of seed 002 answer
//!   `{"name": "<Code>", "error": "<message>", "status": <http status>}`.
//! - The webhooks v1 route of seed 000 and the v4 task routes of seed 001 answer
//!   `{"error": "<message>"}`.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use herald_engine::{CommandError, EngineError};
use serde::Serialize;
use utoipa::ToSchema;

/// Which shape an error takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// `{"name", "error", "status"}`.
    Named,
    /// `{"error"}`.
    Plain,
}

/// An error answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub family: Family,
    pub status: StatusCode,
    pub name: &'static str,
    pub message: String,
    pub retry_after_s: Option<u64>,
}

/// The native error body.
#[derive(Debug, Serialize, ToSchema)]
pub struct NamedError {
    /// The error code (`ValidationFailed`, `NotFound`, ...).
    pub name: String,
    /// What went wrong, for a person.
    pub error: String,
    /// The HTTP status.
    pub status: u16,
}

/// The seed 000/001 error body.
#[derive(Debug, Serialize, ToSchema)]
pub struct PlainError {
    pub error: String,
}

/// What every authenticated route of the native and admin family may answer before its own
/// work, in OpenAPI: no valid key, a missing scope, the key over its rate.
#[derive(utoipa::IntoResponses)]
#[allow(dead_code)] // a documentation type: never built
pub enum AuthErrors {
    /// No valid API key.
    #[response(status = 401)]
    Unauthorized(NamedError),
    /// The key lacks the scope the route needs.
    #[response(status = 403)]
    Forbidden(NamedError),
    /// The key is over its rate; `Retry-After` says when to come back.
    #[response(status = 429)]
    TooManyRequests(NamedError),
}

/// [`AuthErrors`] for the seed 000/001 routes, in their `{"error"}` shape.
#[derive(utoipa::IntoResponses)]
#[allow(dead_code)] // a documentation type: never built
pub enum PlainAuthErrors {
    /// No valid API key.
    #[response(status = 401)]
    Unauthorized(PlainError),
    /// The key lacks the scope the route needs.
    #[response(status = 403)]
    Forbidden(PlainError),
    /// The key is over its rate; `Retry-After` says when to come back.
    #[response(status = 429)]
    TooManyRequests(PlainError),
}

impl ApiError {
    pub fn new(
        family: Family,
        status: StatusCode,
        name: &'static str,
        message: impl Into<String>,
    ) -> ApiError {
        ApiError { family, status, name, message: message.into(), retry_after_s: None }
    }

    pub fn validation(family: Family, field: &str, message: impl std::fmt::Display) -> ApiError {
        ApiError::new(family, StatusCode::BAD_REQUEST, "ValidationFailed", format!("{field}: {message}"))
    }

    pub fn bad_request(family: Family, message: impl Into<String>) -> ApiError {
        ApiError::new(family, StatusCode::BAD_REQUEST, "BadRequest", message)
    }

    pub fn not_found(family: Family, message: impl Into<String>) -> ApiError {
        ApiError::new(family, StatusCode::NOT_FOUND, "NotFound", message)
    }

    pub fn unauthorized(family: Family) -> ApiError {
        ApiError::new(family, StatusCode::UNAUTHORIZED, "Unauthorized", "Invalid API key")
    }

    pub fn forbidden(family: Family, message: impl Into<String>) -> ApiError {
        ApiError::new(family, StatusCode::FORBIDDEN, "AccessDenied", message)
    }

    pub fn internal(family: Family, message: impl Into<String>) -> ApiError {
        ApiError::new(family, StatusCode::INTERNAL_SERVER_ERROR, "UnexpectedError", message)
    }

    /// An engine error in this family's shape. Store failures are 503: nothing was written, and
    /// the same request may succeed later.
    pub fn from_engine(family: Family, e: EngineError) -> ApiError {
        match e {
            EngineError::Command(c) => ApiError::from_command(family, c),
            EngineError::Log(e) => ApiError::new(
                family,
                StatusCode::SERVICE_UNAVAILABLE,
                "ServiceUnavailable",
                format!("the store could not commit; nothing was written: {e}"),
            ),
            EngineError::Open(e) => ApiError::internal(family, e),
        }
    }

    /// An engine error met while reading, in this family's shape. A store that failed a read
    /// is 503: the answer would have been built from what it did not return.
    pub fn from_read(family: Family, e: EngineError) -> ApiError {
        match e {
            EngineError::Log(e) => ApiError::new(
                family,
                StatusCode::SERVICE_UNAVAILABLE,
                "ServiceUnavailable",
                format!("the store could not be read: {e}"),
            ),
            e => ApiError::from_engine(family, e),
        }
    }

    pub fn from_command(family: Family, e: CommandError) -> ApiError {
        match e {
            CommandError::NotFound { .. } => ApiError::not_found(family, e.to_string()),
            CommandError::Conflict { reason } => {
                ApiError::new(family, StatusCode::CONFLICT, "Conflict", reason)
            }
            CommandError::Validation { field, message } => ApiError::validation(family, field, message),
            CommandError::RateLimited { retry_after_ms } => {
                let mut err = ApiError::new(
                    family,
                    StatusCode::BAD_REQUEST,
                    "RETRIGGER_RATE_LIMITED",
                    format!(
                        "too many retrigger requests for this webhook; try again in {} s",
                        retry_after_ms.div_ceil(1000)
                    ),
                );
                err.retry_after_s = Some(retry_after_ms.div_ceil(1000).max(1));
                err
            }
            CommandError::Internal { message } => ApiError::internal(family, message),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = match self.family {
            Family::Named => serde_json::to_vec(&NamedError {
                name: self.name.to_owned(),
                error: self.message,
                status: self.status.as_u16(),
            }),
            Family::Plain => serde_json::to_vec(&PlainError { error: self.message }),
        }
        .unwrap_or_default();
        let mut response = (self.status, [(header::CONTENT_TYPE, "application/json")], body).into_response();
        if let Some(s) = self.retry_after_s {
            if let Ok(v) = HeaderValue::from_str(&s.to_string()) {
                response.headers_mut().insert(header::RETRY_AFTER, v);
            }
        }
        response
    }
}
