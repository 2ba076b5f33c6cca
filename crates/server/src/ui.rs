//! The operator's console at `/ui/`: one static page, its stylesheet and its script, compiled
//! into the binary (`crates/server/ui/`) and served without a key under a strict
//! Content-Security-Policy. The page holds no data: its script calls the JSON API with the key
//! the operator signed in with, so the console can do exactly what that key may do.

use std::sync::LazyLock;

use axum::extract::Request;
use axum::http::header::{self, HeaderName, HeaderValue};
use axum::http::{HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;
use axum::Router;

/// The page's Content-Security-Policy: its own script, stylesheet and API only; no inline script
/// or style, no other origin, no framing, no `<base>`, forms posted only to itself.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
     connect-src 'self'; img-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'";

/// The headers every `/ui` answer carries (its 404 too).
const SECURITY_HEADERS: [(&str, &str); 4] = [
    ("content-security-policy", CONTENT_SECURITY_POLICY),
    ("x-frame-options", "DENY"),
    ("x-content-type-options", "nosniff"),
    ("referrer-policy", "no-referrer"),
];

/// One file of the console: its bytes, content type and entity tag.
struct Asset {
    body: &'static str,
    content_type: &'static str,
    etag: LazyLock<String>,
}

impl Asset {
    const fn new(body: &'static str, content_type: &'static str, etag: fn() -> String) -> Asset {
        Asset { body, content_type, etag: LazyLock::new(etag) }
    }

    /// The file, or 304 when the browser already holds this version. `no-cache`: the browser may
    /// keep it but asks each time, so a new herald binary's page is never mixed with an old script.
    fn answer(&self, request: &HeaderMap) -> Response {
        let etag = self.etag.as_str();
        let cached = request
            .get(header::IF_NONE_MATCH)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|tags| tags.split(',').any(|t| t.trim() == etag));
        let headers = [
            (header::CONTENT_TYPE, self.content_type),
            (header::CACHE_CONTROL, "no-cache"),
            (header::ETAG, etag),
        ];
        if cached {
            return (StatusCode::NOT_MODIFIED, headers).into_response();
        }
        (headers, self.body).into_response()
    }
}

/// A strong entity tag of a body: the first 16 hex digits of its blake3 hash.
fn etag_of(body: &str) -> String {
    let hash = blake3::hash(body.as_bytes()).to_hex();
    format!("\"{}\"", &hash.as_str()[..16])
}

const INDEX_HTML: &str = include_str!("../ui/index.html");
const APP_JS: &str = include_str!("../ui/app.js");
const APP_CSS: &str = include_str!("../ui/app.css");

static INDEX: Asset = Asset::new(INDEX_HTML, "text/html; charset=utf-8", || etag_of(INDEX_HTML));
static SCRIPT: Asset = Asset::new(APP_JS, "text/javascript; charset=utf-8", || etag_of(APP_JS));
static STYLE: Asset = Asset::new(APP_CSS, "text/css; charset=utf-8", || etag_of(APP_CSS));

/// The console's routes: `/ui` (redirected to `/ui/`), the page, its two assets, and a plain 404
/// for any other path under `/ui/`; each with the security headers.
pub fn router<S: Clone + Send + Sync + 'static>() -> Router<S> {
    Router::new()
        .route("/ui", get(|| async { Redirect::permanent("/ui/") }))
        .route("/ui/", get(|h: HeaderMap| async move { INDEX.answer(&h) }))
        .route("/ui/app.js", get(|h: HeaderMap| async move { SCRIPT.answer(&h) }))
        .route("/ui/app.css", get(|h: HeaderMap| async move { STYLE.answer(&h) }))
        .route("/ui/{*rest}", get(not_found))
        .layer(axum::middleware::from_fn(security_headers))
}

async fn not_found() -> Response {
    let headers = [(header::CONTENT_TYPE, "text/plain; charset=utf-8")];
    (StatusCode::NOT_FOUND, headers, "no such page of the console; it is at /ui/\n").into_response()
}

async fn security_headers(request: Request, next: Next) -> Response {
    let mut response = next.run(request).await;
    let headers = response.headers_mut();
    for (name, value) in SECURITY_HEADERS {
        headers.insert(HeaderName::from_static(name), HeaderValue::from_static(value));
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_names_only_its_own_assets_and_nothing_inline() {
        assert!(INDEX_HTML.contains(r#"<script src="app.js" defer></script>"#));
        assert!(INDEX_HTML.contains(r#"<link rel="stylesheet" href="app.css">"#));
        for inline in
            ["<style", " style=", "onclick=", "onload=", "onsubmit=", "javascript:", "http://", "https://"]
        {
            assert!(!INDEX_HTML.contains(inline), "the page holds {inline:?}, which the CSP blocks");
        }
        assert_eq!(INDEX_HTML.matches("<script").count(), 1);
    }

    #[test]
    fn the_script_never_writes_markup() {
        for sink in
            ["innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function"]
        {
            assert!(!APP_JS.contains(sink), "app.js uses {sink}: build the DOM with textContent");
        }
    }

    #[test]
    fn an_entity_tag_changes_with_the_body() {
        assert_ne!(etag_of("a"), etag_of("b"));
        assert_eq!(etag_of("a").len(), 18);
    }
}
