//! The connection loop in front of the router: hyper's HTTP/1 server with a header-read timeout
//! (a client that trickles its headers is cut off, its connection closed), and a whole-request
//! time limit (`[server] request_timeout`, the body read included) answered in the API's error
//! shape. Connections come from the [`CappedListener`](crate::listener::CappedListener), which
//! bounds how many are open; a graceful stop accepts no more and lets requests in progress end.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::serve::Listener;
use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;

use crate::error::ApiError;
use crate::state::AppState;

/// Serves `app` on every connection `listener` accepts until `shutdown` resolves; then accepts
/// no more and waits for the connections' requests in progress to end (the caller bounds that
/// wait). A client must send each request's headers within `header_read_timeout`.
pub async fn serve<L>(
    mut listener: L,
    app: Router,
    header_read_timeout: Duration,
    shutdown: impl Future<Output = ()>,
) where
    L: Listener,
    L::Io: Send + 'static,
{
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new()).header_read_timeout(header_read_timeout);
    let graceful = GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        let (io, _) = tokio::select! {
            accepted = listener.accept() => accepted,
            () = &mut shutdown => break,
        };
        let connection = http.serve_connection(TokioIo::new(io), TowerToHyperService::new(app.clone()));
        let connection = graceful.watch(connection);
        // An error here is the client's (a reset, headers too slow or malformed): hyper has
        // answered what it could; nothing else to do.
        tokio::spawn(async move {
            let _ = connection.await;
        });
    }
    drop(listener);
    graceful.shutdown().await;
}

/// Answers `408 RequestTimeout` when the request takes longer than `[server] request_timeout`.
/// A command the request had submitted may still commit (as when a client hangs up): a publish
/// retried with its `Idempotency-Key` is answered once.
pub async fn time_limit(State(state): State<Arc<AppState>>, request: Request, next: Next) -> Response {
    let family = crate::family_of(request.uri().path());
    let limit = state.limits.request_timeout;
    match tokio::time::timeout(limit, next.run(request)).await {
        Ok(response) => response,
        Err(_) => timed_out(family, limit),
    }
}

/// The 408 of a request that took longer than `limit`.
pub fn timed_out(family: crate::error::Family, limit: Duration) -> Response {
    ApiError::new(
        family,
        StatusCode::REQUEST_TIMEOUT,
        "RequestTimeout",
        format!("the request took longer than {} ms ([server] request_timeout)", limit.as_millis()),
    )
    .into_response()
}
