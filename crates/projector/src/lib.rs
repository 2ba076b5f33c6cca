//! herald's domain: the events, the pure fold into delivery and endpoint states, and the read
//! models the engine queries.
//!
//! - [`Event`]: every fact herald records, encoded with [`encode`] as
//!   `[EVENT_FORMAT_V2] ++ bincode(actor) ++ bincode(event)` (the [`RecordActor`] who made it) and
//!   read back with [`decode`] (or [`decode_recorded`], with its actor); a record written before
//!   actors (`[EVENT_FORMAT_V1] ++ bincode(event)`) still decodes, with none.
//! - [`apply`]: the fold, the only way the projection changes. It does no IO, reads no clock and
//!   draws no random number: time comes stamped on each event (`at_ms`), and decisions that need
//!   time or chance (an attempt's `retry_at_ms`) are made by the engine and recorded in the event.
//!   It rejects an event that is not applicable with a typed [`ApplyError`] and writes nothing.
//! - [`Tables`]: the ordered key-value tables the projection lives in (keyspace bytes
//!   `0x10..=0x7F`, mapped in [`keys`]); [`MemTables`] keeps them in memory, [`TableBatch`] stages
//!   changes over any of them.
//! - The read models: [`Delivery`] (its [`DeliveryStatus`] moves only along
//!   [`transition_allowed`]), [`Endpoint`], [`EventRecord`], [`ApiKey`], [`AttemptRecord`], and
//!   the [`Policy`] in force; the `get_*`, `list_*`, [`due_deliveries`] and [`attempts`] queries.
//!
//! - [`Projector`] (in `persist`): the bridge to herald-log. It appends events and folds them
//!   into the projection stored beside the log, in the same atomic batch; [`rebuild`] folds the
//!   whole log into scratch tables for `verify`.
//!
//! Architecture invariant: the fold knows nothing of HTTP, sled, the log crate or the clock;
//! only `persist`, `staged`, `cache_policy`, `scratch` and `compact` know the log. Memory does not grow with history: everything lives in the tables.
//!
//! ```
//! use herald_projector::*;
//! use uuid::Uuid;
//!
//! let org = OrgId(Uuid::from_u128(1));
//! let endpoint = EndpointId(Uuid::from_u128(2));
//! let event = EventId(Uuid::from_u128(3));
//! let delivery = DeliveryId(Uuid::from_u128(4));
//! let events = [
//!     Event::EndpointCreated {
//!         id: endpoint,
//!         org_id: org,
//!         url: "https://example.com/hook".into(),
//!         name: "crm".into(),
//!         enabled_events: vec!["*".into()],
//!         secret: "whsec_c2VjcmV0".into(),
//!     },
//!     Event::EventPublished {
//!         id: event,
//!         org_id: org,
//!         event_type: "call.queued".into(),
//!         payload: br#"{"a":1}"#.to_vec(),
//!         call_id: None,
//!         idempotency_key: None,
//!     },
//!     Event::DeliveryCreated {
//!         id: delivery,
//!         event_id: event,
//!         org_id: org,
//!         endpoint_id: Some(endpoint),
//!         url: "https://example.com/hook".into(),
//!         next_attempt_at_ms: 1_000,
//!     },
//! ];
//! let mut tables = MemTables::new();
//! for (i, event) in events.iter().enumerate() {
//!     let bytes = encode(RecordActor::System, event);
//!     assert_eq!(&decode(&bytes).unwrap(), event);
//!     apply(&mut tables, i as u64 + 1, 1_000, event).unwrap();
//! }
//! let d = get_delivery(&tables, delivery).unwrap().unwrap();
//! assert_eq!(d.status, DeliveryStatus::Pending);
//! assert_eq!(due_deliveries(&tables, None, 1_000, 10).unwrap().len(), 1);
//!
//! // A failure with the schedule used up exhausts it; a retrigger asks for an attempt now.
//! let failed = Event::AttemptRecorded {
//!     delivery_id: delivery,
//!     attempt: 1,
//!     trigger: Trigger::Auto,
//!     started_at_ms: 1_000,
//!     finished_at_ms: 1_200,
//!     outcome: AttemptOutcome::Failed { status: Some(503), error: "HTTP 503".into() },
//!     response_excerpt: Vec::new(),
//!     retry_at_ms: None,
//! };
//! apply(&mut tables, 4, 1_200, &failed).unwrap();
//! assert_eq!(get_delivery(&tables, delivery).unwrap().unwrap().status, DeliveryStatus::Exhausted);
//! let retrigger = Event::RetriggerRequested { delivery_id: delivery, by_key: None, request_id: Uuid::nil() };
//! apply(&mut tables, 5, 9_000, &retrigger).unwrap();
//! let d = get_delivery(&tables, delivery).unwrap().unwrap();
//! assert_eq!((d.status, d.manual_retry_count, d.next_attempt_at_ms), (DeliveryStatus::Pending, 1, Some(9_000)));
//!
//! // A seq that is not the next one is refused.
//! assert!(matches!(apply(&mut tables, 7, 9_000, &retrigger), Err(ApplyError::SeqNotNext { expected: 6, got: 7 })));
//! ```

mod cache_policy;
mod codec;
mod delivery_settings;
// Namespaces of their own: the retention and checkpoint operations the engine and the offline
// tools run (`compact::plan`, `compact::load_checkpoint`), and the keyspace map the tests and
// replay read stored keys with (`keys::KS_DELIVERY`). The rest is private and re-exported below.
pub mod compact;
mod event;
mod event_row;
mod fold;
mod ids;
mod index;
pub mod keys;
mod model;
mod order;
mod pattern;
mod persist;
mod policy;
mod query;
mod recovery;
mod refs;
mod scratch;
mod staged;
mod tables;

#[cfg(test)]
mod testkit;

pub use cache_policy::{cache_policy, CachePolicy};
pub use codec::DECODE_BYTES_MAX;
pub use compact::{event_payload, CompactError, CompactReport};
pub use delivery_settings::{
    is_reserved_header, DeliveryOrder, DeliverySettings, HEADERS_MAX, HEADER_VALUE_BYTES_MAX,
    MAX_IN_FLIGHT_MAX, RATE_LIMIT_PER_S_MAX,
};
pub use event::{
    decode, decode_actor, decode_recorded, encode, encode_v1, AttemptOutcome, DecodeError, Event,
    NewDelivery, RecordActor, Scope, Trigger, EVENT_FORMAT_V1, EVENT_FORMAT_V2, NEW_DELIVERY_BYTES,
    PUBLISHED_DELIVERIES_BYTES_MAX, RECOVERY_IDS_PER_RECORD,
};
pub use fold::{
    apply, apply_unstaged, apply_unstaged_waking, rules_may_follow, ApplyError, Rules, CASCADE_PAGE_LEN,
    ENDPOINT_DELETED_REASON, RULES_CURRENT,
};
pub use ids::{ApiKeyId, DeliveryId, EndpointId, EventId, OrgId, RecoveryId};
/// Named by [`ReadTables::scan_index`], for tables that wrap others (the engine's watcher).
#[doc(hidden)]
pub use index::IndexRange;
pub use model::{
    subscribes, transition_allowed, ApiKey, AttemptRecord, Cause, Delivery, DeliveryStatus, Endpoint,
    EndpointStatus, EventRecord, IdempotencyHit, PreviousSecret, IDEMPOTENCY_WINDOW_MS, PREVIOUS_SECRETS_MAX,
    RESPONSE_EXCERPT_BYTES_MAX,
};
pub use order::{learn_order_floors, ordering_key, valid_ordering_key, waits_behind, ORDERING_KEY_BYTES_MAX};
pub use pattern::event_type_matches;
pub use persist::{
    catch_up, projection_lag, rebuild, rebuild_into, stored_projection, CheckedTables, Projector,
    RebuildError, Refold, StoreTables, TxRead, TxTables,
};
pub use policy::{Policy, FAILURES_MAX_LIMIT, RETRY_SCHEDULE_LEN_MAX};
pub use query::{
    applied_seq, attempts, delivery_counts, delivery_orgs, due_deliveries, get_api_key, get_api_key_by_hash,
    get_delivery, get_endpoint, get_endpoint_settings, get_event, idempotency_lookup, list_all_endpoints_rev,
    list_api_keys, list_deliveries, list_deliveries_rev, list_endpoints, list_endpoints_rev, org_secret,
    policy, rules, CorruptValue, DeliveryCursor, DeliveryIndex, DeliveryQuery, Due, Page, PAGE_LEN_MAX,
};
pub use recovery::{
    get_recovery, recovery_counts, recovery_members, select_recovery, Recovery, RecoveryCounts,
    RecoveryFilter, RecoverySelection, RECOVERY_CHUNK_IDS,
};
pub use refs::{delivery_refs, record_refs, refs_from, RecordRef, REFS_FROM, STORE_WIDE};
pub use scratch::{rebuilt_pages, stored_pages, ProjectionPages, ScratchTables};
pub use staged::fold_staged_entries;
pub use tables::{MemTables, ReadTables, TableBatch, Tables};
