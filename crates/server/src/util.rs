//! Small shared pieces: ids in paths, timestamps, cursors, JSON bodies with named errors.

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{FromRequestParts, MatchedPath, Path};
use axum::http::request::Parts;
use axum::http::StatusCode;
use base64::Engine as _;
use serde::de::DeserializeOwned;
use time::format_description::well_known::Rfc3339;
use time::format_description::BorrowedFormatItem;
use time::macros::format_description;
use time::OffsetDateTime;
use uuid::Uuid;

use crate::error::{ApiError, Family};

/// The `{id}` of a route's path as text. A segment that does not decode to UTF-8 (`%ff`) is kept
/// as sent, still percent-encoded, so [`parse_id`] refuses it and the route answers its family's
/// 404 like any other unknown id, not axum's plain-text 400.
pub struct PathId(pub String);

impl<S: Send + Sync> FromRequestParts<S> for PathId {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        if let Ok(Path(id)) = Path::<String>::from_request_parts(parts, state).await {
            return Ok(PathId(id));
        }
        let position = parts
            .extensions
            .get::<MatchedPath>()
            .and_then(|m| m.as_str().split('/').position(|s| s.starts_with('{')));
        let raw = position.and_then(|i| parts.uri.path().split('/').nth(i)).unwrap_or_default();
        Ok(PathId(raw.to_owned()))
    }
}

/// A path id: the hyphenated or the 32-hex simple form; anything else is `None` (answered 404).
pub fn parse_id(text: &str) -> Option<Uuid> {
    let ok_len = text.len() == 36 || text.len() == 32;
    if !ok_len {
        return None;
    }
    Uuid::try_parse(text).ok()
}

/// Unix milliseconds as RFC 3339 UTC with a `Z` (milliseconds shown when not zero).
/// Unix milliseconds as RFC 3339 in UTC, always with three fractional digits
/// (`2026-03-15T10:32:14.000Z`): one width, so text order is time order.
pub fn ts(ms: u64) -> String {
    const MILLIS: &[BorrowedFormatItem<'static>] =
        format_description!("[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z");
    let nanos = i128::from(ms) * 1_000_000;
    OffsetDateTime::from_unix_timestamp_nanos(nanos)
        .ok()
        .and_then(|t| t.format(MILLIS).ok())
        .unwrap_or_else(|| "1970-01-01T00:00:00.000Z".to_owned())
}

pub fn ts_opt(ms: Option<u64>) -> Option<String> {
    ms.map(ts)
}

/// An RFC 3339 timestamp as unix milliseconds.
pub fn parse_ts(text: &str) -> Option<u64> {
    let t = OffsetDateTime::parse(text, &Rfc3339).ok()?;
    u64::try_from(t.unix_timestamp_nanos() / 1_000_000).ok()
}

/// An opaque cursor: base64url of the bytes.
pub fn encode_cursor(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// A `cursor` query parameter: absent or empty is the first page; otherwise it must be an
/// [`encode_cursor`] of exactly `N` bytes, or the request is refused naming `cursor`.
pub fn parse_cursor<const N: usize>(family: Family, text: Option<&str>) -> Result<Option<[u8; N]>, ApiError> {
    match text {
        None | Some("") => Ok(None),
        Some(t) => base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(t)
            .ok()
            .and_then(|b| <[u8; N]>::try_from(b).ok())
            .map(Some)
            .ok_or_else(|| ApiError::validation(family, "cursor", "not a cursor this server gave")),
    }
}

/// A request body read within its limit and parsed, or the error that names what is wrong.
pub fn json_body<T: DeserializeOwned>(
    family: Family,
    body: Result<Bytes, BytesRejection>,
) -> Result<T, ApiError> {
    parse_json(family, &body_bytes(family, body)?)
}

/// A request body read within its limit, or the error that says why it could not be.
pub fn body_bytes(family: Family, body: Result<Bytes, BytesRejection>) -> Result<Bytes, ApiError> {
    body.map_err(|r| {
        if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(
                family,
                StatusCode::PAYLOAD_TOO_LARGE,
                "PayloadTooLarge",
                "the request body is over the limit",
            )
        } else {
            ApiError::bad_request(family, format!("the request body could not be read: {r}"))
        }
    })
}

/// A JSON body parsed, or the error that names what is wrong (the field's path).
pub fn parse_json<T: DeserializeOwned>(family: Family, bytes: &[u8]) -> Result<T, ApiError> {
    let de = &mut serde_json::Deserializer::from_slice(bytes);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if inner.is_syntax() || inner.is_eof() {
            ApiError::bad_request(family, format!("malformed JSON: {inner}"))
        } else if let Some(field) = missing_field(&inner.to_string()) {
            // serde names a missing field in its message, at the path of the object it is missing from.
            let field = if path == "." { field.to_owned() } else { format!("{path}.{field}") };
            ApiError::validation(family, &field, "is required")
        } else if path == "." || path.starts_with('[') {
            // The body itself is not an object (an array, a string, a number).
            ApiError::validation(family, "body", format!("must be a JSON object ({inner})"))
        } else {
            ApiError::validation(family, &path, inner)
        }
    })
}

/// The field that serde's "missing field `x`" message names.
fn missing_field(message: &str) -> Option<&str> {
    message.strip_prefix("missing field `")?.split('`').next().filter(|f| !f.is_empty())
}

/// A `limit` query parameter: 1 to `max`, `default` when absent.
pub fn parse_limit(
    family: Family,
    value: Option<&str>,
    default: usize,
    max: usize,
) -> Result<usize, ApiError> {
    match value {
        None => Ok(default),
        Some(v) => match v.parse::<usize>() {
            Ok(n) if (1..=max).contains(&n) => Ok(n),
            _ => Err(ApiError::validation(family, "limit", format!("must be an integer from 1 to {max}"))),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_accept_both_forms_and_nothing_else() {
        let id = Uuid::from_u128(0x0123_4567_89ab_cdef_0123_4567_89ab_cdef);
        assert_eq!(parse_id(&id.hyphenated().to_string()), Some(id));
        assert_eq!(parse_id(&id.simple().to_string()), Some(id));
        assert_eq!(parse_id(&id.urn().to_string()), None);
        assert_eq!(parse_id("{01234567-89ab-cdef-0123-456789abcdef}"), None);
        assert_eq!(parse_id("aabbccddeeff"), None);
    }

    #[test]
    fn a_body_that_is_not_an_object_is_named_as_the_body() {
        #[derive(Debug, serde::Deserialize)]
        #[allow(dead_code)]
        struct In {
            url: String,
        }
        for body in [&b"[1,2]"[..], b"\"x\"", b"7"] {
            let err = json_body::<In>(Family::Named, Ok(Bytes::from_static(body))).unwrap_err();
            assert_eq!(err.status, StatusCode::BAD_REQUEST);
            assert!(err.message.starts_with("body: must be a JSON object"), "{}", err.message);
        }
        let err = json_body::<In>(Family::Named, Ok(Bytes::from_static(b"{\"url\": 5}"))).unwrap_err();
        assert!(err.message.starts_with("url: "), "{}", err.message);
        let err = json_body::<In>(Family::Named, Ok(Bytes::from_static(b"{\"url\""))).unwrap_err();
        assert!(err.message.starts_with("malformed JSON"), "{}", err.message);
    }

    #[test]
    fn cursors_round_trip_and_refuse_anything_else_naming_the_cursor() {
        let bytes = [7u8; 16];
        assert_eq!(parse_cursor::<16>(Family::Named, Some(&encode_cursor(&bytes))).unwrap(), Some(bytes));
        assert_eq!(parse_cursor::<16>(Family::Named, None).unwrap(), None);
        assert_eq!(parse_cursor::<16>(Family::Named, Some("")).unwrap(), None);
        for bad in [encode_cursor(&[7u8; 24]), "!!".to_owned()] {
            let err = parse_cursor::<16>(Family::Plain, Some(&bad)).unwrap_err();
            assert!(err.message.starts_with("cursor: "), "{}", err.message);
        }
    }

    #[derive(Debug, serde::Deserialize)]
    #[allow(dead_code)]
    struct Outer {
        url: String,
        inner: Option<Inner>,
    }

    #[derive(Debug, serde::Deserialize)]
    #[allow(dead_code)]
    struct Inner {
        name: String,
    }

    #[test]
    fn a_missing_field_is_named() {
        let err = parse_json::<Outer>(Family::Named, b"{}").unwrap_err();
        assert_eq!(err.message, "url: is required");
        let err = parse_json::<Outer>(Family::Named, br#"{"url": "x", "inner": {}}"#).unwrap_err();
        assert_eq!(err.message, "inner.name: is required");
        let err = parse_json::<Outer>(Family::Named, b"[]").unwrap_err();
        assert!(err.message.starts_with("body: must be a JSON object"), "{}", err.message);
    }

    #[test]
    fn timestamps_are_rfc3339_utc_and_round_trip() {
        assert_eq!(ts(1_773_570_734_000), "2026-03-15T10:32:14.000Z");
        assert_eq!(ts(1_773_570_734_010), "2026-03-15T10:32:14.010Z");
        assert_eq!(ts(1_773_570_734_123), "2026-03-15T10:32:14.123Z");
        assert_eq!(ts(0), "1970-01-01T00:00:00.000Z");
        // One width: text order is time order.
        assert!(ts(1_773_570_734_100) < ts(1_773_570_734_123));
        assert_eq!(parse_ts(&ts(1_773_570_734_010)), Some(1_773_570_734_010));
        assert_eq!(parse_ts("2026-03-15T10:32:14.123Z"), Some(1_773_570_734_123));
        assert_eq!(parse_ts("yesterday"), None);
    }
}
