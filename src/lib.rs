//! herald: a webhook delivery engine in one binary, and a library to embed it.
//!
//! An embedding service opens an [`Engine`] on a data directory, creates endpoints and publishes
//! events through it; the engine fans each event out to the subscribed endpoints, signs and sends
//! every attempt (Standard Webhooks), retries on the configured schedule, parks what keeps failing
//! and records every fact in its append-only log. `examples/embed.rs` runs the whole path against a
//! receiver on 127.0.0.1:
//!
//! ```no_run
//! use herald::{Actor, Command, Engine, EngineConfig, Reply};
//! use herald::projector::{EndpointId, OrgId};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let engine = Engine::open(EngineConfig { data_dir: "./herald-data".into(), ..EngineConfig::default() })?;
//! let org = OrgId(uuid::Uuid::now_v7());
//! engine.execute_blocking(Actor::admin(), Command::CreateEndpoint {
//!     id: EndpointId(uuid::Uuid::now_v7()),
//!     org_id: org,
//!     url: "https://crm.example.com/webhooks".into(),
//!     name: "crm".into(),
//!     enabled_events: vec!["*".into()],
//!     secret: None,
//!     settings: Default::default(),
//! })?;
//! if let Reply::Published { delivery_ids, .. } = engine.publish(org, "call.ended", br#"{"call":1}"#)? {
//!     println!("{} deliveries, durable on disk", delivery_ids.len());
//! }
//! engine.shutdown();
//! # Ok(())
//! # }
//! ```
//!
//! The layers underneath are re-exported for services that need them: the durable log ([`log`]),
//! the domain and its queries ([`projector`]) and the engine's parts ([`engine`]). The tools the
//! binary runs on a stopped server's data (verify, export, import, replay, compact) are in
//! [`offline`], callable without the binary.

pub mod offline;

pub use herald_engine as engine;
pub use herald_engine::{
    Actor, BatchItem, Command, CommandError, CommandLimits, DeliveryChange, DeliveryConfig, DispatchStats,
    Engine, EngineConfig, EngineError, EngineStatsSnapshot, Parts, PublishedEvent, Reply, StopReport,
    Subscription, SubscriptionError,
};
pub use herald_log as log;
pub use herald_projector as projector;
