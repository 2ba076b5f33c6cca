//! The cluster layer: the router of a cluster node. Inside the request-id layer, outside the
//! routes: every route of [`crate::ROUTES`] is matched here, its partition decided
//! (`route.rs`), and the request served by that partition's own router (the handlers of one
//! node, unchanged, over the partition's engine), forwarded to its owner, or answered 503.
//! Health, readiness, metrics, the OpenAPI document and the console are this node's.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, request, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, on, MethodFilter};
use axum::{Json, Router};
use bytes::Bytes;
use herald_engine::{ApiKey, Engine, Scope};
use http_body_util::BodyExt as _;

use super::forward::{self, ForwardClient, ForwardKey, Outgoing, X_FORWARDED};
use super::merge;
use super::route::{self, Layout, ListKind, RouteClass, Target};
use super::{Place, Placement, UNAVAILABLE};
use crate::auth::{bearer_key, key_hash, Buckets, CachedKey, KeyCache, KeySource, KEY_CACHE_MAX};
use crate::config::Config;
use crate::error::{ApiError, Family};
use crate::json::Health;
use crate::metrics::Metrics;
use crate::state::{AppState, ServerLimits};

/// Marks a 503 for a partition this node does not serve (it served nothing): the forwarding
/// node reads the lease afresh and tries the owner it names. Never sent to a client.
const X_NOT_OWNER: header::HeaderName = header::HeaderName::from_static("x-herald-not-owner");

/// A merged page read from one partition, at most (250 items of a few KiB).
const PAGE_BYTES_MAX: usize = 16 * 1024 * 1024;

/// What the cluster layer shares: the placement, what every partition's handlers share (limits,
/// key buckets, the key cache), the forwarding client and key, each local partition's router.
pub struct Front {
    placement: Arc<dyn Placement>,
    limits: ServerLimits,
    buckets: Buckets,
    keys: KeyCache,
    key: ForwardKey,
    client: ForwardClient,
    /// Each local partition's state and router, built once per change of what this node serves.
    routers: Mutex<HashMap<u32, Built>>,
    changes: tokio::sync::watch::Receiver<u64>,
    /// False once a stop began: `/readyz` answers 503.
    pub ready: AtomicBool,
    /// Connections the node's listener refused (one counter, shown once in `/metrics`).
    pub connections_refused: Arc<std::sync::atomic::AtomicU64>,
}

/// A local partition's state and router, and the generation of `Placement::changes` it was built at.
type Built = (u64, Arc<AppState>, Router);

/// The API keys as the placement has them (the control partition).
struct PlacementKeys(Arc<dyn Placement>);

impl KeySource for PlacementKeys {
    fn api_key_epoch(&self) -> u64 {
        self.0.api_key_epoch()
    }

    fn api_key_by_hash(&self, hash: &[u8; 32]) -> Result<Option<ApiKey>, String> {
        self.0.api_key_by_hash(hash)
    }

    fn refresh_control(&self) -> Result<(), String> {
        self.0.refresh_control()
    }

    fn keys_current(&self) -> Result<(), String> {
        self.0.keys_current()
    }
}

impl Front {
    /// The layer of a node placed by `placement`, with the limits and key buckets of `config`.
    pub fn new(placement: Arc<dyn Placement>, config: &Config) -> Front {
        let keys = KeyCache::with_source(KEY_CACHE_MAX, Arc::new(PlacementKeys(placement.clone())));
        Front {
            changes: placement.changes(),
            placement,
            limits: crate::state::limits_of(config),
            buckets: crate::state::buckets_of(config),
            keys,
            key: ForwardKey::new(&config.cluster.cluster_secret),
            client: forward::client(),
            routers: Mutex::new(HashMap::new()),
            ready: AtomicBool::new(true),
            connections_refused: Arc::default(),
        }
    }

    /// The router of local partition `p` over `engine`: the cached one unless what this node
    /// serves changed since it was built.
    fn local(&self, p: u32, engine: Engine) -> (Arc<AppState>, Router) {
        let generation = *self.changes.borrow();
        let mut routers = self.routers.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((built, state, router)) = routers.get(&p) {
            if *built == generation {
                return (state.clone(), router.clone());
            }
        }
        let state = Arc::new(AppState {
            engine,
            limits: self.limits.clone(),
            buckets: self.buckets.clone(),
            keys: self.keys.clone(),
            metrics: Metrics::counting_refusals_into(self.connections_refused.clone()),
            ready: AtomicBool::new(true),
        });
        let router = crate::partition_router(state.clone());
        routers.insert(p, (generation, state.clone(), router.clone()));
        (state, router)
    }

    /// The caller's key, to route by; refused (401) as the routes refuse it. A key unknown here
    /// is looked for again once the keys are caught up (one created through another node).
    async fn caller(&self, headers: &axum::http::HeaderMap, family: Family) -> Result<CachedKey, ApiError> {
        let key = bearer_key(headers).ok_or_else(|| ApiError::unauthorized(family))?;
        if self.keys.stale() {
            // Out of the live nodes or not caught up lately: back in and caught up first.
            self.keys.refresh().await;
        }
        let hash = key_hash(key);
        let found = match self.keys.find(None, &hash).map_err(|e| e.into_api(family))? {
            Some(k) => Some(k),
            None => {
                self.keys.refresh().await;
                self.keys.find(None, &hash).map_err(|e| e.into_api(family))?
            }
        };
        found.filter(|k| !k.revoked).ok_or_else(|| ApiError::unauthorized(family))
    }

    fn unowned(&self, family: Family, why: String) -> Response {
        let mut e = ApiError::new(family, StatusCode::SERVICE_UNAVAILABLE, UNAVAILABLE, why);
        e.retry_after_s = Some(self.placement.retry_after_s());
        e.into_response()
    }

    /// [`Front::unowned`] for a partition this node does not serve, marked [`X_NOT_OWNER`].
    fn not_owner(&self, family: Family, why: String) -> Response {
        let mut response = self.unowned(family, why);
        response.headers_mut().insert(X_NOT_OWNER, header::HeaderValue::from_static("1"));
        response
    }

    fn partition_name(&self, p: u32) -> String {
        herald_cluster::partition::PartitionId::of(p, self.placement.partitions()).arg()
    }

    /// Serves the request on partition `p`: its router here, its owner, or a 503. Where this
    /// node knows no owner, or the node it forwarded to no longer owns `p` (neither served
    /// it), the lease is read afresh once and the request served where it says.
    async fn call(&self, p: u32, parts: &request::Parts, body: Bytes, family: Family) -> Response {
        let place = self.placement.place(p);
        let asked = match &place {
            Place::Remote { node_id, .. } => Some(node_id.clone()),
            _ => None,
        };
        let mut answer = self.call_at(p, place, parts, body.clone(), family).await;
        if answer.headers().contains_key(X_NOT_OWNER) {
            let placement = self.placement.clone();
            let fresh = tokio::task::spawn_blocking(move || placement.place_fresh(p)).await;
            let moved = match &fresh {
                Ok(Place::Local(_)) => true,
                Ok(Place::Remote { node_id, .. }) => asked.as_ref() != Some(node_id),
                _ => false,
            };
            if let (true, Ok(place)) = (moved, fresh) {
                answer = self.call_at(p, place, parts, body, family).await;
            }
        }
        answer.headers_mut().remove(X_NOT_OWNER);
        answer
    }

    /// Partition `p`'s router here over `engine`, serving `request`. A key created or revoked
    /// (a control partition write that succeeded) is answered once every live node has it.
    async fn serve_local(&self, p: u32, engine: Engine, request: Request) -> Response {
        let write = p == self.placement.control() && request.method() != axum::http::Method::GET;
        let (_, router) = self.local(p, engine);
        let answer = serve_with(router, request).await;
        if write && answer.status().is_success() {
            let placement = self.placement.clone();
            match tokio::task::spawn_blocking(move || placement.settle_control()).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::warn!(error = %e, "a key change not confirmed by every live node"),
                Err(e) => tracing::warn!(error = %e, "waiting for the live nodes after a key change"),
            }
        }
        answer
    }

    /// [`Front::call`] at `place`.
    async fn call_at(
        &self,
        p: u32,
        place: Place,
        parts: &request::Parts,
        body: Bytes,
        family: Family,
    ) -> Response {
        match place {
            Place::Local(engine) => self.serve_local(p, engine, rebuilt(parts, Body::from(body))).await,
            Place::Remote { node_id, advertise } => {
                let out = Outgoing { method: &parts.method, uri: &parts.uri, headers: &parts.headers, body };
                let timeout = self.limits.request_timeout;
                forward::forward(&self.client, &self.key, (&node_id, &advertise), p, out, family, timeout)
                    .await
            }
            Place::Unowned => {
                let name = self.partition_name(p);
                self.not_owner(
                    family,
                    format!("partition {name} is not served by any node now; retry shortly"),
                )
            }
        }
    }

    /// The data partitions, this node's first (an admin's by-id request tries them in turn).
    fn data_partitions(&self) -> Vec<u32> {
        let mut all: Vec<(bool, u32)> = (0..self.placement.partitions())
            .map(|p| (!matches!(self.placement.place(p), Place::Local(_)), p))
            .collect();
        all.sort();
        all.into_iter().map(|(_, p)| p).collect()
    }

    /// An admin's request for an object by id: each partition in turn until one answers other
    /// than 404 (a 404 wrote nothing). Not found anywhere while a partition could not answer:
    /// that partition's 503, never a 404.
    async fn each(&self, parts: &request::Parts, body: Bytes, family: Family) -> Response {
        let (mut not_found, mut unavailable) = (None, None);
        for p in self.data_partitions() {
            let answer = self.call(p, parts, body.clone(), family).await;
            match answer.status() {
                StatusCode::NOT_FOUND => not_found = Some(answer),
                StatusCode::SERVICE_UNAVAILABLE => unavailable = Some(answer),
                _ => return answer,
            }
        }
        match (unavailable, not_found) {
            (Some(answer), _) | (None, Some(answer)) => answer,
            (None, None) => ApiError::not_found(family, "not found").into_response(),
        }
    }

    /// An admin's list of no organisation: every data partition's page, merged.
    async fn merged(&self, kind: ListKind, parts: &request::Parts, family: Family) -> Response {
        let mut pages = Vec::new();
        for p in 0..self.placement.partitions() {
            let answer = self.call(p, parts, Bytes::new(), family).await;
            if answer.status() != StatusCode::OK {
                return answer;
            }
            match axum::body::to_bytes(answer.into_body(), PAGE_BYTES_MAX).await {
                Ok(page) => pages.push(page),
                Err(e) => {
                    let why = format!("partition {p}'s page could not be read: {e}");
                    return self.unowned(family, why);
                }
            }
        }
        let limit = merge::limit_of(parts.uri.query());
        match merge::merge(kind, &pages, limit) {
            Ok(body) => ([(header::CONTENT_TYPE, "application/json")], body).into_response(),
            Err(e) => {
                ApiError::internal(family, format!("merging the partitions' pages: {e}")).into_response()
            }
        }
    }

    /// A request another node forwarded: served here if this node serves its partition, never
    /// forwarded again; refused (401) unless its MAC proves it came from a node.
    async fn forwarded(&self, parts: request::Parts, body: Body, family: Family) -> Response {
        let p = match self.key.verify(&parts.method, &parts.uri, &parts.headers, forward::unix_s()) {
            Ok(p) => p,
            Err(why) => {
                let message = format!("forwarded request refused: {why}");
                return ApiError::new(family, StatusCode::UNAUTHORIZED, "Unauthorized", message)
                    .into_response();
            }
        };
        match self.placement.place(p) {
            Place::Local(engine) => self.serve_local(p, engine, rebuilt(&parts, body)).await,
            Place::Remote { node_id, advertise } => {
                let name = self.partition_name(p);
                let why = format!("partition {name} is served by node {node_id} ({advertise}), not this one");
                self.not_owner(family, why)
            }
            Place::Unowned => {
                let name = self.partition_name(p);
                self.not_owner(
                    family,
                    format!("partition {name} is not served by any node now; retry shortly"),
                )
            }
        }
    }
}

/// `parts`' method, URI, version and headers over `body`, without the outer router's extensions.
fn rebuilt(parts: &request::Parts, body: Body) -> Request {
    let mut request = Request::new(body);
    *request.method_mut() = parts.method.clone();
    *request.uri_mut() = parts.uri.clone();
    *request.version_mut() = parts.version;
    *request.headers_mut() = parts.headers.clone();
    request
}

async fn serve_with(mut router: Router, request: Request) -> Response {
    match tower_service::Service::call(&mut router, request).await {
        Ok(response) => response,
        Err(never) => match never {},
    }
}

/// The body of a request, read up to `limit`: over it, the 413 every route answers.
async fn read_body(body: Body, limit: usize, family: Family) -> Result<Bytes, ApiError> {
    match http_body_util::Limited::new(body, limit).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(ApiError::new(
            family,
            StatusCode::PAYLOAD_TOO_LARGE,
            "PayloadTooLarge",
            "the request body is over the limit",
        )),
        Err(e) => Err(ApiError::bad_request(family, format!("the request body could not be read: {e}"))),
    }
}

/// One request of a route of `class`: its partition decided, then served there.
async fn dispatch(front: Arc<Front>, class: RouteClass, request: Request) -> Response {
    let family = crate::family_of(request.uri().path());
    let limit = front.limits.request_timeout;
    match tokio::time::timeout(limit, route_one(&front, class, family, request)).await {
        Ok(response) => response,
        Err(_) => crate::edge::timed_out(family, limit),
    }
}

async fn route_one(front: &Front, class: RouteClass, family: Family, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    if parts.headers.contains_key(X_FORWARDED) {
        return front.forwarded(parts, body, family).await;
    }
    let who = match front.caller(&parts.headers, family).await {
        Ok(who) => who,
        Err(e) => return e.into_response(),
    };
    let body_max = match (&parts.method, parts.uri.path()) {
        (&axum::http::Method::POST, "/v1/events") => front.limits.event_body_bytes,
        _ => front.limits.body_bytes,
    };
    let body = match read_body(body, body_max, family).await {
        Ok(body) => body,
        Err(e) => return e.into_response(),
    };
    let target = {
        let placement = &front.placement;
        let partition_of = |org: &herald_engine::OrgId| placement.partition_of(org);
        let layout = Layout { partitions: placement.partitions(), partition_of: &partition_of };
        let admin_of_no_org = who.org_id.is_none() && who.allows(Scope::Admin);
        route::target(&layout, class, who.org_id, admin_of_no_org, parts.uri.query(), &body)
    };
    match target {
        Target::One(p) => front.call(p, &parts, body, family).await,
        Target::Each => front.each(&parts, body, family).await,
        Target::Merge(kind) => front.merged(kind, &parts, family).await,
        Target::Invalid(field, message) => ApiError::validation(family, field, message).into_response(),
    }
}

/// `/readyz` of a cluster node: ready once it serves its share, caught up, and is not stopping.
async fn readyz(State(front): State<Arc<Front>>) -> Response {
    let status = match (front.ready.load(Ordering::SeqCst), front.placement.readiness()) {
        (false, _) => "stopping".to_owned(),
        (true, Err(why)) => why,
        (true, Ok(())) => return Json(Health { status: "ready".into() }).into_response(),
    };
    (StatusCode::SERVICE_UNAVAILABLE, Json(Health { status })).into_response()
}

/// `/metrics` of a cluster node: each partition it serves, its series labelled `partition`.
async fn metrics(State(front): State<Arc<Front>>) -> Response {
    let mut texts = Vec::new();
    for p in 0..=front.placement.control() {
        if let Place::Local(engine) = front.placement.place(p) {
            let (state, _) = front.local(p, engine);
            texts.push((front.partition_name(p), state.metrics.render(&state.engine)));
        }
    }
    let text = super::relabel::by_partition(&texts, front.placement.node_id());
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
}

fn method_filter(method: &str) -> Option<MethodFilter> {
    Some(match method {
        "get" => MethodFilter::GET,
        "post" => MethodFilter::POST,
        "patch" => MethodFilter::PATCH,
        "delete" => MethodFilter::DELETE,
        "put" => MethodFilter::PUT,
        _ => return None,
    })
}

/// The router of a cluster node (see the module's header); the request-id layer outermost.
pub fn cluster_router(front: Arc<Front>) -> Router {
    let mut router: Router<Arc<Front>> = Router::new();
    for &(method, path) in crate::ROUTES {
        let (Some(class), Some(filter)) = (route::class_of(method, path), method_filter(method)) else {
            continue;
        };
        router = router.route(
            path,
            on(filter, move |State(front): State<Arc<Front>>, request: Request| {
                dispatch(front, class, request)
            }),
        );
    }
    router
        .route("/healthz", get(crate::routes::ops::healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/openapi.json", get(crate::routes::ops::openapi))
        .merge(crate::ui::router())
        .fallback(crate::no_route)
        .method_not_allowed_fallback(crate::method_not_allowed)
        .layer(tower_http::catch_panic::CatchPanicLayer::custom(|_| {
            ApiError::internal(Family::Named, "the server hit a bug answering this request").into_response()
        }))
        .with_state(front)
        .layer(crate::request_id::RequestIdLayer)
}
