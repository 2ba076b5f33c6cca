//! herald-server: the HTTP API of `docs/API.md` over the engine, and the configuration of
//! `herald serve`.
//!
//! - [`router`]: every route, each handler authenticated by the `Auth` extractor (`auth`) and
//!   answering errors in its route family's shape (`error`).
//! - [`openapi_document`]: the OpenAPI 3 document, generated from the handlers' annotations and
//!   the JSON types in `json`, so it cannot drift from them.
//! - `ui`: the operator's console at `/ui/`, a static page that calls this API.
//! - [`serve`]: opens the engine, bootstraps the admin key, listens, and stops gracefully; under
//!   systemd (`Type=notify`) it says READY=1 once listening and STOPPING=1 when the stop begins.

mod auth;
pub mod cluster;
// A namespace of its own: the configuration of `herald serve` (its struct, the default TOML, the
// environment and command-line overrides) reads best as `config::Config`, `config::DEFAULT_TOML`.
pub mod config;
mod edge;
mod error;
mod json;
mod listener;
mod metrics;
pub mod request_id;
mod routes;
mod state;
mod ui;
mod util;

use std::future::Future;
use std::io::Write as _;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use herald_engine::{list_api_keys, Actor, ApiKeyId, Command, Engine, Scope};
use sd_notify::NotifyState;
use utoipa::OpenApi;

use crate::config::Config;

pub use crate::auth::{generate_key, key_hash, Buckets, KEY_PREFIX};
pub use crate::routes::ops::{audit_actor, audit_event, audit_record};
pub use crate::state::{AppState, ServerLimits};
pub use crate::util::{parse_id, parse_ts, ts};

#[derive(OpenApi)]
#[openapi(
    info(title = "herald", description = "A webhook delivery engine: publish events, deliver them signed, retry, park and retrigger failures."),
    paths(
        routes::endpoints::create, routes::endpoints::list, routes::endpoints::get, routes::endpoints::patch,
        routes::endpoints::delete, routes::endpoints::rotate, routes::endpoints::enable,
        routes::events::publish, routes::events::get,
        routes::deliveries::list, routes::deliveries::get, routes::deliveries::attempts, routes::deliveries::history, routes::deliveries::redeliver,
        routes::api_keys::create, routes::api_keys::list, routes::api_keys::revoke,
        routes::seeds::retrigger, routes::seeds::get_failure, routes::seeds::list_failures,
        routes::seeds::batch_retrigger,
        routes::recover::recover, routes::recover::get,
        routes::ops::audit_log, routes::ops::healthz, routes::ops::readyz, routes::ops::metrics, routes::ops::openapi,
    ),
    modifiers(&BearerAuth)
)]
struct ApiDoc;

struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new().scheme(HttpAuthScheme::Bearer).bearer_format("sk_...").build(),
            ),
        );
    }
}

/// The OpenAPI 3 document of every route.
pub fn openapi_document() -> utoipa::openapi::OpenApi {
    ApiDoc::openapi()
}

/// Every route: `(method, path)` as the router and the document name them.
pub const ROUTES: &[(&str, &str)] = &[
    ("post", "/v1/endpoints"),
    ("get", "/v1/endpoints"),
    ("get", "/v1/endpoints/{id}"),
    ("patch", "/v1/endpoints/{id}"),
    ("delete", "/v1/endpoints/{id}"),
    ("post", "/v1/endpoints/{id}/secret/rotate"),
    ("post", "/v1/endpoints/{id}/enable"),
    ("post", "/v1/events"),
    ("get", "/v1/events/{id}"),
    ("get", "/v1/webhook_deliveries"),
    ("get", "/v1/webhook_deliveries/{id}"),
    ("get", "/v1/webhook_deliveries/{id}/attempts"),
    ("get", "/v1/webhook_deliveries/{id}/history"),
    ("post", "/v1/webhook_deliveries/{id}/redeliver"),
    ("post", "/v1/webhook_deliveries/recover"),
    ("get", "/v1/recoveries/{id}"),
    ("post", "/v1/api_keys"),
    ("get", "/v1/api_keys"),
    ("delete", "/v1/api_keys/{id}"),
    ("get", "/v1/audit/log"),
    ("post", "/api/webhooks/v1/failures/{id}/retrigger"),
    ("get", "/api/v4/tasks/webhook_failures/{webhook_failure_id}"),
    ("get", "/api/v4/tasks/webhook_failures"),
    ("post", "/api/notifications/v1/admin/webhooks/{webhookId}/notifications/retrigger"),
    ("get", "/healthz"),
    ("get", "/readyz"),
    ("get", "/metrics"),
    ("get", "/openapi.json"),
];

/// The router over a shared state.
pub fn router(state: Arc<AppState>) -> Router {
    // Outside the panic catcher and the time limit: every answer, theirs included, echoes the
    // request's id.
    partition_router(state).layer(request_id::RequestIdLayer)
}

/// [`router`] without the request-id layer: in cluster mode each partition's router runs inside
/// the cluster layer, itself inside the one request-id layer.
pub(crate) fn partition_router(state: Arc<AppState>) -> Router {
    use routes::*;
    let body = DefaultBodyLimit::max(state.limits.body_bytes);
    let event_body = DefaultBodyLimit::max(state.limits.event_body_bytes);
    Router::new()
        .route("/v1/endpoints", post(endpoints::create).get(endpoints::list))
        .route("/v1/endpoints/{id}", get(endpoints::get).patch(endpoints::patch).delete(endpoints::delete))
        .route("/v1/endpoints/{id}/secret/rotate", post(endpoints::rotate))
        .route("/v1/endpoints/{id}/enable", post(endpoints::enable))
        .route("/v1/events", post(events::publish).layer(event_body))
        .route("/v1/events/{id}", get(events::get))
        .route("/v1/webhook_deliveries", get(deliveries::list))
        .route("/v1/webhook_deliveries/{id}", get(deliveries::get))
        .route("/v1/webhook_deliveries/{id}/attempts", get(deliveries::attempts))
        .route("/v1/webhook_deliveries/{id}/history", get(deliveries::history))
        .route("/v1/webhook_deliveries/{id}/redeliver", post(deliveries::redeliver))
        .route("/v1/webhook_deliveries/recover", post(recover::recover))
        .route("/v1/recoveries/{id}", get(recover::get))
        .route("/v1/api_keys", post(api_keys::create).get(api_keys::list))
        .route("/v1/api_keys/{id}", axum::routing::delete(api_keys::revoke))
        .route("/v1/audit/log", get(ops::audit_log))
        .route("/api/webhooks/v1/failures/{id}/retrigger", post(seeds::retrigger))
        .route("/api/v4/tasks/webhook_failures/{webhook_failure_id}", get(seeds::get_failure))
        .route("/api/v4/tasks/webhook_failures", get(seeds::list_failures))
        .route(
            "/api/notifications/v1/admin/webhooks/{webhookId}/notifications/retrigger",
            post(seeds::batch_retrigger),
        )
        .route("/healthz", get(ops::healthz))
        .route("/readyz", get(ops::readyz))
        .route("/metrics", get(ops::metrics))
        .route("/openapi.json", get(ops::openapi))
        // The operator's console: a static page outside the JSON API (not in ROUTES).
        .merge(ui::router())
        .fallback(no_route)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(body)
        .layer(axum::middleware::from_fn_with_state(state.clone(), edge::time_limit))
        .layer(axum::middleware::from_fn_with_state(state.clone(), count_requests))
        .layer(tower_http::catch_panic::CatchPanicLayer::custom(|_| {
            error::ApiError::internal(error::Family::Named, "the server hit a bug answering this request")
                .into_response()
        }))
        .with_state(state)
}

/// The error shape of the route family a path belongs to (seeds 000 and 001 answer `{"error"}`).
fn family_of(path: &str) -> error::Family {
    if path.starts_with("/api/webhooks/") || path.starts_with("/api/v4/") {
        error::Family::Plain
    } else {
        error::Family::Named
    }
}

/// A path that no route serves: 404 in its family's error shape.
async fn no_route(method: axum::http::Method, uri: axum::http::Uri) -> Response {
    let message = format!("no route for {method} {}", uri.path());
    error::ApiError::not_found(family_of(uri.path()), message).into_response()
}

/// A route asked with a method it does not serve: 405 in its family's error shape (axum adds
/// `Allow`).
async fn method_not_allowed(method: axum::http::Method, uri: axum::http::Uri) -> Response {
    let message = format!("{method} is not allowed on {}", uri.path());
    let status = axum::http::StatusCode::METHOD_NOT_ALLOWED;
    error::ApiError::new(family_of(uri.path()), status, "MethodNotAllowed", message).into_response()
}

async fn count_requests(State(state): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let route = req.extensions().get::<MatchedPath>().map_or(metrics::UNMATCHED, |p| p.as_str());
    let method = req.method().as_str();
    let (route_index, method_index) = (metrics::route_label(route), metrics::method_label(method));
    // The labels are copied only when they are not static ones (a method outside the usual).
    let names = match (route_index, method_index) {
        (Some(_), Some(_)) => None,
        _ => Some((route.to_owned(), method.to_owned())),
    };
    let response = next.run(req).await;
    let (route, method) = names.as_ref().map_or(("", ""), |(r, m)| (r.as_str(), m.as_str()));
    state.metrics.request_labelled(route_index, method_index, route, method, response.status().as_u16());
    response
}

/// A given admin key shorter than this, or without the `sk_` prefix, is used with a warning.
const GIVEN_KEY_ADVISED_LEN: usize = 20;
/// The longest admin key accepted from `HERALD_ADMIN_KEY`.
const GIVEN_KEY_LEN_MAX: usize = 256;

/// A key from `HERALD_ADMIN_KEY` must fit a bearer header unchanged: visible ASCII, no spaces.
fn check_given_key(key: &str) -> Result<(), String> {
    if key.is_empty() || key.len() > GIVEN_KEY_LEN_MAX {
        return Err(format!("HERALD_ADMIN_KEY must be 1 to {GIVEN_KEY_LEN_MAX} characters"));
    }
    if !key.bytes().all(|b| b.is_ascii_graphic()) {
        return Err("HERALD_ADMIN_KEY must be visible ASCII characters without spaces".into());
    }
    Ok(())
}

/// The admin key file in the data directory.
pub const ADMIN_KEY_FILE: &str = "admin.key";

/// On a store without any key: creates the admin key (`HERALD_ADMIN_KEY`'s value, or a generated
/// one), writes it to `<data dir>/admin.key` (0600) and returns it so the caller prints it once.
pub fn bootstrap_admin(
    engine: &Engine,
    data_dir: &Path,
    given: Option<String>,
) -> Result<Option<String>, String> {
    let existing = engine.read(|t| list_api_keys(t, None, 1)).map_err(|e| e.to_string())?;
    if !existing.items.is_empty() {
        return Ok(None);
    }
    let key = match given {
        Some(k) => {
            check_given_key(&k)?;
            if !k.starts_with(KEY_PREFIX) || k.len() < GIVEN_KEY_ADVISED_LEN {
                tracing::warn!(
                    "HERALD_ADMIN_KEY is used as given; a key of the form {KEY_PREFIX}<random>, at least \
                     {GIVEN_KEY_ADVISED_LEN} characters, is harder to guess"
                );
            }
            k
        }
        None => generate_key()?,
    };
    let command = Command::CreateApiKey {
        id: ApiKeyId(uuid::Uuid::now_v7()),
        org_id: None,
        scopes: vec![Scope::Admin],
        name: "admin (bootstrap)".into(),
        key_hash: key_hash(&key),
    };
    engine.execute_blocking(Actor::admin(), command).map_err(|e| format!("creating the admin key: {e}"))?;
    let path = data_dir.join(ADMIN_KEY_FILE);
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options.open(&path).map_err(|e| format!("writing {}: {e}", path.display()))?;
    writeln!(file, "{key}").map_err(|e| format!("writing {}: {e}", path.display()))?;
    Ok(Some(key))
}

/// The cap on open API connections (`[server] max_connections`, or sized from the open-file
/// limit when 0) and that limit, after raising it to its hard limit.
fn connections_max(
    config: &Config,
    engine_config: &herald_engine::EngineConfig,
) -> Result<(usize, u64), String> {
    let open_files_max =
        listener::raise_open_files_limit().map_err(|e| format!("reading RLIMIT_NOFILE: {e}"))?;
    let attempts_max = u64::try_from(engine_config.delivery.max_in_flight_total).unwrap_or(u64::MAX);
    let cap = match config.server.max_connections {
        0 => listener::default_connections_max(open_files_max, attempts_max),
        n => n,
    };
    Ok((cap, open_files_max))
}

/// Tells the service manager (systemd, `Type=notify`) about a change of state; without
/// `NOTIFY_SOCKET` in the environment it does nothing. A failure is reported and never fatal:
/// herald serves either way, and systemd times the start out by itself if READY=1 never came.
fn notify_service_manager(state: &[NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(state) {
        tracing::warn!(error = %e, "notifying the service manager (NOTIFY_SOCKET) failed");
    }
}

/// Runs the server until `stop` resolves, then stops gracefully: no new requests, the engine's
/// stop (attempts in flight finished or recorded as interrupted), the log closed. With
/// `[cluster] nats_url` set it runs as a cluster node instead (`cluster::serve_node`).
pub async fn serve(
    config: Config,
    admin_key: Option<String>,
    stop: impl Future<Output = ()> + Send + 'static,
) -> Result<(), String> {
    if !config.cluster.nats_url.is_empty() {
        return cluster::serve_node(config, admin_key, stop).await;
    }
    let engine_config = config.engine_config();
    // Before the store opens: sled and the dispatcher's connections need descriptors too.
    let (connections_max, open_files_max) = connections_max(&config, &engine_config)?;
    let data_dir = engine_config.data_dir.clone();
    std::fs::create_dir_all(&data_dir).map_err(|e| format!("creating {}: {e}", data_dir.display()))?;
    let engine = tokio::task::spawn_blocking(move || Engine::open(engine_config))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
    if let Some(key) = bootstrap_admin(&engine, &data_dir, admin_key)? {
        print_admin_key(&data_dir, &key);
    }
    let state = Arc::new(AppState::new(engine.clone(), &config));
    let listener = bind(&config, connections_max, state.metrics.connections_refused.clone()).await?;
    tracing::info!(
        listen = %listener.1,
        data_dir = %data_dir.display(),
        connections_max,
        open_files_max,
        "herald listening on http://{}", listener.1
    );
    // At the signal the engine's stop begins (no new attempt; those in flight get the shutdown
    // timeout) while requests in progress get the same timeout to finish; then the engine stops
    // within what is left of it.
    let (ready, stopping_engine) = (state.clone(), engine.clone());
    let on_stop = move || {
        ready.ready.store(false, Ordering::SeqCst);
        stopping_engine.begin_shutdown();
    };
    let result = serve_until(listener, router(state), &config, stop, on_stop).await;
    let report = tokio::task::spawn_blocking(move || engine.shutdown()).await.map_err(|e| e.to_string())?;
    log_stopped(&report);
    result
}

/// The admin key made at the first start, to the terminal (stdout) only, never through the
/// log: a log line is kept and shipped.
fn print_admin_key(data_dir: &Path, key: &str) {
    println!(
        "herald: admin API key (shown once, also in {}): {key}",
        data_dir.join(ADMIN_KEY_FILE).display()
    );
}

/// The API listener, capped at `connections_max` (refusals counted into `refused`), and its
/// address.
async fn bind(
    config: &Config,
    connections_max: usize,
    refused: Arc<std::sync::atomic::AtomicU64>,
) -> Result<(listener::CappedListener, std::net::SocketAddr), String> {
    let listener = tokio::net::TcpListener::bind(config.server.listen)
        .await
        .map_err(|e| format!("listening on {}: {e}", config.server.listen))?;
    let local = listener.local_addr().map_err(|e| e.to_string())?;
    Ok((listener::CappedListener::new(listener, connections_max).counting_into(refused), local))
}

/// Serves `app` until `stop`, then stops taking requests (`on_stop` runs at the signal) and
/// gives those in progress `[server] shutdown_timeout` to end. Says READY=1 to systemd first:
/// herald is ready once its store is open and its listener bound (the kernel queues
/// connections from here on; they are accepted as soon as the loop runs).
async fn serve_until(
    (listener, local): (listener::CappedListener, std::net::SocketAddr),
    app: Router,
    config: &Config,
    stop: impl Future<Output = ()> + Send + 'static,
    on_stop: impl FnOnce() + Send + 'static,
) -> Result<(), String> {
    notify_service_manager(&[NotifyState::Ready, NotifyState::Status(&format!("listening on {local}"))]);
    let (stopping_tx, stopping) = tokio::sync::oneshot::channel::<()>();
    let shutdown = async move {
        stop.await;
        notify_service_manager(&[NotifyState::Stopping, NotifyState::Status("stopping")]);
        on_stop();
        let _ = stopping_tx.send(());
    };
    let mut server = tokio::spawn(edge::serve(listener, app, config.server.header_read_timeout, shutdown));
    tokio::select! {
        r = &mut server => r.map_err(|e| e.to_string()),
        _ = stopping => {
            match tokio::time::timeout(config.server.shutdown_timeout, &mut server).await {
                Ok(r) => r.map_err(|e| e.to_string()),
                Err(_) => {
                    server.abort();
                    Ok(())
                }
            }
        }
    }
}

/// The stop line.
fn log_stopped(report: &herald_engine::StopReport) {
    tracing::info!(
        finished = report.finished,
        interrupted = report.interrupted,
        unrecorded = report.unrecorded,
        "herald stopped ({} attempts finished during the stop, {} recorded as interrupted, {} left pending \
         unrecorded)",
        report.finished,
        report.interrupted,
        report.unrecorded
    );
}
