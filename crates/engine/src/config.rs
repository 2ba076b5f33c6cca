//! What an [`Engine`](crate::Engine) is opened with. Every limit is a named number here; the server
//! fills this from its TOML file, the environment and the command line.

use std::path::PathBuf;
use std::time::Duration;

use herald_log::{Durability, LogConfig};
use herald_projector::Policy;

use crate::commands::CommandLimits;

/// The engine's whole configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct EngineConfig {
    /// Where the store lives (`[store] data_dir`).
    pub data_dir: PathBuf,
    /// `[store] durability`.
    pub durability: Durability,
    /// sled's page cache, bytes.
    pub cache_bytes: u64,
    /// herald's cache of the rows the dispatcher reads for each attempt, in front of the store,
    /// bytes (see [`herald_log::CachedStore`]): while the writer applies a batch, sled makes
    /// every read wait, and these are served without it. 4 MiB: in the delivery burst (20,000
    /// events) 2 MiB served the dispatcher as well as 16 MiB did.
    pub read_cache_bytes: usize,
    /// Group commit and the writer queue (its `durability` is replaced by the field above).
    pub log: LogConfig,
    /// Retry schedule, failure window, rotation overlap: written to the log as a policy event
    /// whenever it differs from the one in force.
    pub policy: Policy,
    /// What commands are checked against. `Engine::open` overrides its `allow_private_targets`
    /// with the delivery section's.
    pub limits: CommandLimits,
    pub delivery: DeliveryConfig,
    /// `[store] retain`: history of deliveries delivered longer ago than this is dropped by a
    /// compaction that runs every quarter of it (not more often than every second) and at least
    /// every `compact_every`. `None`: kept forever.
    pub retain: Option<Duration>,
    /// The longest wait between two compactions (1 h).
    pub compact_every: Duration,
}

/// `[delivery]`: how the dispatcher makes attempts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeliveryConfig {
    /// The whole attempt (`[delivery] timeout`).
    pub timeout: Duration,
    /// Attempts in flight to one endpoint, at most.
    pub max_in_flight_per_endpoint: usize,
    /// Attempts in flight in total, at most: from the request until the receiver answers.
    pub max_in_flight_total: usize,
    /// Attempts whose receiver has answered but whose record is not yet durable, at most, beyond
    /// `max_in_flight_total` (they hold no connection, only memory). Records queue behind
    /// publishes in the writer, so without this room a burst of publishes stalls delivery until
    /// it is written. 0: an attempt holds its place until its record is durable.
    pub max_awaiting_record: usize,
    /// Due deliveries kept in memory, at most (the rest stay in the stored due index).
    pub due_queue_capacity: usize,
    /// Whether loopback, private and link-local targets are allowed.
    pub allow_private_targets: bool,
    /// PEM file of extra root certificates for private receivers.
    pub extra_ca_file: Option<PathBuf>,
    /// The longest receiver `Retry-After` honoured.
    pub retry_after_max: Duration,
    /// How long a stop waits for attempts in flight before recording them as interrupted.
    pub shutdown_timeout: Duration,
    /// Worker threads of the dispatcher's runtime.
    pub worker_threads: usize,
}

impl Default for DeliveryConfig {
    fn default() -> Self {
        DeliveryConfig {
            timeout: Duration::from_secs(15),
            max_in_flight_per_endpoint: 16,
            max_in_flight_total: 1024,
            max_awaiting_record: 8192,
            due_queue_capacity: 100_000,
            allow_private_targets: false,
            extra_ca_file: None,
            retry_after_max: Duration::from_secs(3600),
            shutdown_timeout: Duration::from_secs(10),
            worker_threads: 2,
        }
    }
}

impl Default for EngineConfig {
    /// API.md's embedded defaults: data in `./herald-data`, `sync` durability.
    fn default() -> Self {
        EngineConfig {
            data_dir: PathBuf::from("./herald-data"),
            durability: Durability::Sync,
            cache_bytes: 64 * 1024 * 1024,
            read_cache_bytes: 4 * 1024 * 1024,
            log: LogConfig::default(),
            policy: Policy::default(),
            limits: CommandLimits::default(),
            delivery: DeliveryConfig::default(),
            retain: None,
            compact_every: Duration::from_secs(3600),
        }
    }
}

impl EngineConfig {
    /// Why this configuration cannot be used, naming the setting, if it cannot.
    pub fn problem(&self) -> Option<String> {
        if let Some(p) = self.policy.problem() {
            return Some(format!("policy: {p}"));
        }
        let d = &self.delivery;
        if d.timeout.is_zero() {
            return Some("delivery.timeout must be above 0".into());
        }
        if d.max_in_flight_per_endpoint == 0 {
            return Some("delivery.max_in_flight_per_endpoint must be at least 1".into());
        }
        if d.max_in_flight_total == 0 {
            return Some("delivery.max_in_flight_total must be at least 1".into());
        }
        if d.due_queue_capacity == 0 {
            return Some("delivery.due_queue_capacity must be at least 1".into());
        }
        if d.worker_threads == 0 {
            return Some("delivery.worker_threads must be at least 1".into());
        }
        if self.compact_every.is_zero() {
            return Some("compact_every must be above 0".into());
        }
        if self.retain.is_some_and(|r| r < Duration::from_secs(1)) {
            return Some("store.retain must be at least 1s".into());
        }
        None
    }
}
