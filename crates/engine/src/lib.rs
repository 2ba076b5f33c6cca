//! herald-engine: commands in, events out, and the attempts that deliver them.
//!
//! [`Engine`] is the whole of it behind one handle (re-exported as `herald::Engine`): it opens the
//! store, runs the writer ([`Commands`], the log's machine that validates each
//! [`Command`] and turns it into events) and the dispatcher (`dispatch`: the timer queue of due
//! deliveries, the in-flight bounds, one signed attempt per due delivery, its outcome recorded),
//! and answers queries from the projection. [`clock::Clock`] and [`sender::Sender`] are traits,
//! so a simulation drives it with a manual clock and scripted receivers.
//!
//! Two pieces stand on their own and serve embedders directly:
//!
//! - [`signing`]: Standard Webhooks signatures. [`signing::Secret`] is an endpoint's
//!   `whsec_<base64>` key; [`signing::sign`] writes the `webhook-signature` header value with every
//!   valid secret (current first), [`signing::verify`] checks one.
//! - [`sender`]: the [`sender::Sender`] trait (one attempt in, one [`sender::SendOutcome`] out),
//!   the real [`sender::HttpSender`] (keep-alive pool, no redirects, whole-attempt timeout, a 4 KiB
//!   body excerpt, a guard against private targets on the resolved address), and
//!   [`sender::check_url`] for validating endpoint URLs.
//!
//! ```no_run
//! use herald_engine::sender::{AttemptRequest, HttpSender, Sender, SenderConfig};
//! use herald_engine::signing::{sign, Secret};
//!
//! # async fn example() -> Result<(), Box<dyn std::error::Error>> {
//! let secret = Secret::parse("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")?;
//! let body = br#"{"type":"invoice.paid"}"#;
//! let (id, timestamp_s) = ("evt_018f3c", 1_700_000_000);
//! let request = AttemptRequest {
//!     url: "https://example.com/webhooks".to_owned(),
//!     headers: vec![
//!         ("content-type".to_owned(), "application/json".to_owned()),
//!         ("webhook-id".to_owned(), id.to_owned()),
//!         ("webhook-timestamp".to_owned(), timestamp_s.to_string()),
//!         ("webhook-signature".to_owned(), sign(&[&secret], id, timestamp_s, body)),
//!     ],
//!     body: body.to_vec().into(),
//! };
//! let sender = HttpSender::new(SenderConfig::default())?;
//! let outcome = sender.send(request).await;
//! println!("delivered: {}", outcome.is_success());
//! # Ok(())
//! # }
//! ```

// Namespaces of their own: a clock and a sender are what an embedder or a simulation supplies
// (`Parts`), and signing serves an embedder's receivers; each reads best under its module's name
// (`sender::HttpSender`, `signing::verify`). The rest is private and re-exported below.
pub mod clock;
mod commands;
mod config;
mod dispatch;
mod due;
mod engine;
mod history;
pub mod request;
mod schedule;
pub mod sender;
pub mod signing;
mod stats;
mod subscribe;

pub use crate::commands::{
    check_recovery_filter, valid_event_pattern, valid_event_type, Actor, BatchItem, Command, CommandError,
    CommandLimits, Commands, DeliverySettingsPatch, Recovered, Reply, Submitted, BATCH_RETRIGGER_MAX,
    RECOVER_MAX, RECOVER_SAMPLE_LEN,
};
pub use crate::config::{DeliveryConfig, EngineConfig};
pub use crate::dispatch::{DispatchStats, StopReport, INTERRUPTED_ERROR};
pub use crate::engine::{Engine, EngineError, Parts, PublishedEvent, RetentionStats, COMPACT_PASS_RECORDS};
pub use crate::history::DeliveryHistory;
pub use crate::request::{RequestId, RequestScope};
pub use crate::stats::{
    AttemptKind, EngineStats, EngineStatsSnapshot, Histogram, HistogramSnapshot, ATTEMPT_BUCKETS_US,
    PUBLISH_BUCKETS_US,
};
pub use crate::subscribe::{DeliveryChange, Subscription, SubscriptionError, SUBSCRIPTION_BUFFER};

// What the server (and any embedder's edge) needs of the layers below, so that it depends on the
// engine alone: the domain types and queries of the projection, and the log's settings and figures.
pub use herald_log::record::BODY_BYTES_MAX as RECORD_BODY_BYTES_MAX;
pub use herald_log::{CacheStats, Durability, Record, WriterStats, FLUSH_BUCKETS_US};
pub use herald_projector::{
    applied_seq, decode, decode_actor, decode_recorded, delivery_counts, delivery_orgs, get_api_key,
    get_api_key_by_hash, get_endpoint, get_endpoint_settings, list_all_endpoints_rev, list_api_keys,
    list_deliveries_rev, list_endpoints_rev, ApiKey, ApiKeyId, AttemptRecord, Delivery, DeliveryCursor,
    DeliveryId, DeliveryIndex, DeliveryOrder, DeliveryQuery, DeliverySettings, DeliveryStatus, Endpoint,
    EndpointId, Event, EventId, OrgId, Policy, RecordActor, Scope, Trigger, FAILURES_MAX_LIMIT,
    RETRY_SCHEDULE_LEN_MAX,
};
pub use herald_projector::{
    event_type_matches, get_recovery, recovery_counts, select_recovery, Recovery, RecoveryCounts,
    RecoveryFilter, RecoveryId, RecoverySelection,
};
