//! What every handler shares.

use std::sync::atomic::AtomicBool;
use std::time::Duration;

use herald_engine::Engine;

use crate::auth::{Buckets, KeyCache};
use crate::metrics::Metrics;

/// The limits the server checks itself (the engine checks the rest).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerLimits {
    /// `POST /v1/events` bodies, at most.
    pub event_body_bytes: usize,
    /// Every other body, at most.
    pub body_bytes: usize,
    /// One request, from its headers to its answer, at most (`[server] request_timeout`).
    pub request_timeout: Duration,
}

impl Default for ServerLimits {
    fn default() -> Self {
        ServerLimits {
            event_body_bytes: 256 * 1024,
            body_bytes: 64 * 1024,
            request_timeout: Duration::from_secs(30),
        }
    }
}

/// What the handlers share: the engine, the limits, the per-key buckets, the key cache, the
/// metrics.
pub struct AppState {
    pub engine: Engine,
    pub limits: ServerLimits,
    pub buckets: Buckets,
    /// API keys by hash, as last read from the projection (see `KeyCache`).
    pub keys: KeyCache,
    pub metrics: Metrics,
    /// False once a stop began: `/readyz` answers 503.
    pub ready: AtomicBool,
}

impl AppState {
    /// The state `herald serve` runs with: limits and key buckets from the configuration.
    pub fn new(engine: Engine, config: &crate::config::Config) -> AppState {
        AppState {
            engine,
            limits: limits_of(config),
            buckets: buckets_of(config),
            keys: KeyCache::default(),
            metrics: Metrics::default(),
            ready: AtomicBool::new(true),
        }
    }
}

/// The limits of `config`.
pub(crate) fn limits_of(config: &crate::config::Config) -> ServerLimits {
    ServerLimits {
        event_body_bytes: config.server.max_event_bytes,
        body_bytes: config.server.max_body_bytes,
        request_timeout: config.server.request_timeout,
    }
}

/// The per-key buckets of `config` (clones share them).
pub(crate) fn buckets_of(config: &crate::config::Config) -> Buckets {
    Buckets::new(u64::from(config.server.key_requests_per_s), u64::from(config.server.key_burst))
}
