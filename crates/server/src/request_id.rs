//! The outermost layer of the router: every request gets an id (`x-request-id`: the client's when
//! it is a valid one, else one made here) that the response echoes, and is handled inside a
//! [`RequestScope`] holding that id and its arrival time. The engine reads the scope: a command
//! carries the id (the log lines of the attempts it causes name it), and a publish's latency
//! starts at the arrival.
//!
//! Cheap on purpose (it runs for every request): no span, no random draw, nothing formatted or
//! allocated unless a line is written; a made id's header value is cut from a per-thread buffer.
//! A line is written for a request that answers 5xx (at warn) and, at debug, for every request.

use std::cell::RefCell;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use axum::http::{HeaderName, HeaderValue, Method, Request, Uri};
use axum::response::Response;
use bytes::BytesMut;
use herald_engine::request::REQUEST_ID_BYTES_MAX;
use herald_engine::{RequestId, RequestScope};
use tokio::task::futures::TaskLocalFuture;

/// The request id header.
pub const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// The size of each thread's buffer the echoed ids are cut from (about 2,000 ids each).
const ECHO_BUFFER_BYTES: usize = 64 * 1024;

/// The id of the request being handled by this task, for a log line written while handling it.
pub fn current() -> Option<RequestId> {
    RequestScope::current().map(|scope| scope.id)
}

/// Gives each request its id and scope (see the module's header).
#[derive(Debug, Clone, Copy, Default)]
pub struct RequestIdLayer;

impl<S> tower_layer::Layer<S> for RequestIdLayer {
    type Service = RequestIdService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RequestIdService { inner }
    }
}

/// [`RequestIdLayer`]'s service.
#[derive(Debug, Clone)]
pub struct RequestIdService<S> {
    inner: S,
}

impl<S, B> tower_service::Service<Request<B>> for RequestIdService<S>
where
    S: tower_service::Service<Request<B>, Response = Response>,
{
    type Response = Response;
    type Error = S::Error;
    type Future = Answered<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let arrived = Instant::now();
        let given = request.headers().get(X_REQUEST_ID);
        // A valid given id is echoed as it came (the header value is shared, not copied); an
        // invalid one is replaced by a made one, not refused: the header is for tracing only.
        let (id, echo) = match given.and_then(|v| RequestId::given(v.as_bytes())) {
            Some(id) => (id, given.cloned()),
            None => (RequestId::made(), None),
        };
        let scope = RequestScope { id, arrived };
        // Both are shared (a refcount), kept for the line of a failed request.
        let (method, uri) = (request.method().clone(), request.uri().clone());
        Answered { inner: scope.scope(self.inner.call(request)), scope, echo, method, uri }
    }
}

pin_project_lite::pin_project! {
    /// A request being handled in its scope; its answer gets the id.
    pub struct Answered<F> {
        #[pin]
        inner: TaskLocalFuture<RequestScope, F>,
        scope: RequestScope,
        echo: Option<HeaderValue>,
        method: Method,
        uri: Uri,
    }
}

impl<F, E> Future for Answered<F>
where
    F: Future<Output = Result<Response, E>>,
{
    type Output = Result<Response, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let mut response = match this.inner.poll(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
            Poll::Ready(Ok(response)) => response,
        };
        let id = this.scope.id;
        let value = this.echo.take().unwrap_or_else(|| header_value(id));
        response.headers_mut().insert(X_REQUEST_ID, value);
        let status = response.status().as_u16();
        let latency_ms = this.scope.arrived.elapsed().as_secs_f64() * 1000.0;
        if response.status().is_server_error() {
            tracing::warn!(
                request_id = %id,
                method = %this.method,
                path = this.uri.path(),
                status,
                latency_ms,
                "request failed"
            );
        } else {
            // Short: one line per request at debug; a failed one names its method and path.
            tracing::debug!(request_id = %id, status, latency_ms, "request answered");
        }
        Poll::Ready(Ok(response))
    }
}

thread_local! {
    static ECHO_BUFFER: RefCell<BytesMut> = RefCell::new(BytesMut::new());
}

/// A made id as a header value, its bytes cut from this thread's buffer: one allocation per
/// [`ECHO_BUFFER_BYTES`], not one per request.
fn header_value(id: RequestId) -> HeaderValue {
    let mut text = [0u8; REQUEST_ID_BYTES_MAX];
    let len = id.write_to(&mut text);
    ECHO_BUFFER.with(|buffer| {
        let mut buffer = buffer.borrow_mut();
        if buffer.capacity() < len {
            *buffer = BytesMut::with_capacity(ECHO_BUFFER_BYTES);
        }
        buffer.extend_from_slice(&text[..len]);
        let bytes = buffer.split().freeze();
        // Always valid: an id is visible ASCII (checked when given, digits and hex when made).
        HeaderValue::from_maybe_shared(bytes).unwrap_or(HeaderValue::from_static("invalid"))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn made_header_values_are_the_ids_and_do_not_overlap() {
        let ids: Vec<RequestId> = (0..5_000).map(|_| RequestId::made()).collect();
        let values: Vec<HeaderValue> = ids.iter().map(|id| header_value(*id)).collect();
        for (id, value) in ids.iter().zip(&values) {
            assert_eq!(value.to_str().unwrap(), id.to_string());
        }
    }

    /// Inside the layer the handler sees the request's scope; the answer echoes its id.
    #[tokio::test]
    async fn the_handler_runs_in_the_scope_and_the_answer_echoes_its_id() {
        use tower::ServiceExt;
        use tower_layer::Layer;
        let handler = tower::service_fn(|_: Request<()>| async {
            let id = current().expect("inside the scope").to_string();
            Ok::<_, std::convert::Infallible>(Response::new(axum::body::Body::from(id)))
        });
        let service = RequestIdLayer.layer(handler);
        let given = Request::builder().header("x-request-id", "abc-123").body(()).unwrap();
        let answer = service.clone().oneshot(given).await.unwrap();
        assert_eq!(answer.headers()[X_REQUEST_ID], "abc-123");
        for request in [
            Request::builder().body(()).unwrap(),
            Request::builder().header("x-request-id", "not valid").body(()).unwrap(),
        ] {
            let answer = service.clone().oneshot(request).await.unwrap();
            let echoed = answer.headers()[X_REQUEST_ID].to_str().unwrap().to_owned();
            let body = axum::body::to_bytes(answer.into_body(), 1024).await.unwrap();
            assert_eq!(echoed.as_bytes(), &body[..], "the id the handler saw is the one echoed");
            assert_ne!(echoed, "not valid");
        }
    }
}
