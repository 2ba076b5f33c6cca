//! The domain events: every fact herald records, and their durable encoding: a record written
//! now is `[EVENT_FORMAT_V2] ++ bincode(RecordActor) ++ bincode(Event)`; one written before
//! records named who acted is `[EVENT_FORMAT_V1] ++ bincode(Event)`, and still decodes.

#[cfg(test)]
use crate::delivery_settings::DeliveryOrder;
use crate::delivery_settings::DeliverySettings;
use crate::ids::{ApiKeyId, DeliveryId, EndpointId, EventId, OrgId, RecoveryId};
use crate::policy::Policy;
use crate::recovery::RecoveryFilter;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// The format byte of a record written before records named their actor:
/// `[EVENT_FORMAT_V1] ++ bincode(event)`. Still read; no longer written.
pub const EVENT_FORMAT_V1: u8 = 1;
/// The format byte of every record written now: `[EVENT_FORMAT_V2] ++ bincode(actor) ++
/// bincode(event)`. The actor is in the envelope, so no [`Event`] variant changed its layout.
pub const EVENT_FORMAT_V2: u8 = 2;

/// Who made a record (its envelope, not its event): the fold never reads it, so a record of
/// either format folds the same. Not to be confused with the engine's `Actor`, the organisation
/// and key a command is checked against.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum RecordActor {
    /// herald's own decision (attempt outcomes, retention, the policy and rules records), or
    /// whoever acts without a key: the host's operator through the offline tools (`herald keys
    /// create`, `herald compact`) or the admin key's bootstrap, an embedder calling the library.
    System,
    /// The API key whose request made the record (an admin key included).
    Key(ApiKeyId),
}

/// What an API key may do. `Admin` implies every other scope.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Scope {
    EventsWrite,
    EndpointsRead,
    EndpointsWrite,
    DeliveriesRead,
    DeliveriesWrite,
    TasksWebhooksRead,
    Admin,
}

impl Scope {
    /// Every scope, in API.md's order.
    pub const ALL: [Scope; 7] = [
        Scope::EventsWrite,
        Scope::EndpointsRead,
        Scope::EndpointsWrite,
        Scope::DeliveriesRead,
        Scope::DeliveriesWrite,
        Scope::TasksWebhooksRead,
        Scope::Admin,
    ];

    /// The scope's name in API.md (`events.write`, ...).
    pub fn name(self) -> &'static str {
        match self {
            Scope::EventsWrite => "events.write",
            Scope::EndpointsRead => "endpoints.read",
            Scope::EndpointsWrite => "endpoints.write",
            Scope::DeliveriesRead => "deliveries.read",
            Scope::DeliveriesWrite => "deliveries.write",
            Scope::TasksWebhooksRead => "tasks.webhooks.read",
            Scope::Admin => "admin",
        }
    }

    /// The scope named `name`, if there is one.
    pub fn from_name(name: &str) -> Option<Scope> {
        Scope::ALL.into_iter().find(|scope| scope.name() == name)
    }
}

/// What started an attempt.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Trigger {
    /// The automatic schedule (the first attempt included).
    Auto,
    /// A retrigger or a redeliver.
    Manual,
}

/// How an attempt ended.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum AttemptOutcome {
    /// A 2xx answer.
    Delivered { status: u16 },
    /// A timeout, a connection error (`status: None`) or a non-2xx answer (redirects included).
    Failed { status: Option<u16>, error: String },
    /// Cut short by a stop of herald before the receiver answered (rules 3 on): recorded, since
    /// the request may have reached the receiver, but not a failure. It uses no step of the
    /// schedule and does not count against the endpoint's health; the delivery stays pending
    /// and is attempted again once herald is back.
    Interrupted { error: String },
}

/// Every fact herald records. The engine validates commands before it appends their events, so
/// [`apply`](crate::apply) rejecting one means a bug or a corrupt log.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Event {
    /// The rules from this record on. Before the first, [`Policy::default`] applies.
    PolicySet(Policy),
    ApiKeyCreated {
        id: ApiKeyId,
        /// `None`: an admin key, for every organisation.
        org_id: Option<OrgId>,
        scopes: Vec<Scope>,
        name: String,
        key_hash: [u8; 32],
    },
    ApiKeyRevoked {
        id: ApiKeyId,
    },
    /// The organisation's default secret, which signs its inline `webhook_url` deliveries.
    OrgSecretSet {
        org_id: OrgId,
        secret: String,
    },
    EndpointCreated {
        id: EndpointId,
        org_id: OrgId,
        url: String,
        name: String,
        enabled_events: Vec<String>,
        secret: String,
    },
    /// `None` leaves a field as it was.
    EndpointUpdated {
        id: EndpointId,
        url: Option<String>,
        name: Option<String>,
        enabled_events: Option<Vec<String>>,
    },
    /// No new deliveries; its pending deliveries turn inactive; history is kept.
    EndpointDeleted {
        id: EndpointId,
    },
    /// `secret` becomes current; the one it replaces keeps signing until `previous_expires_at_ms`.
    EndpointSecretRotated {
        id: EndpointId,
        secret: String,
        previous_expires_at_ms: u64,
    },
    /// The endpoint is active again and its failure run forgotten.
    EndpointEnabled {
        id: EndpointId,
    },
    /// The payload bytes stay in the log; the projection keeps the seq of this record.
    EventPublished {
        id: EventId,
        org_id: OrgId,
        event_type: String,
        payload: Vec<u8>,
        call_id: Option<Uuid>,
        idempotency_key: Option<String>,
    },
    /// The projector decides the state: `inactive` when the endpoint is, else `pending` with its
    /// first attempt at `next_attempt_at_ms`.
    DeliveryCreated {
        id: DeliveryId,
        event_id: EventId,
        org_id: OrgId,
        /// `None`: an inline delivery to a `webhook_url`, signed with the organisation's secret.
        endpoint_id: Option<EndpointId>,
        url: String,
        next_attempt_at_ms: u64,
    },
    AttemptRecorded {
        delivery_id: DeliveryId,
        /// 1-based, over the delivery's whole life.
        attempt: u32,
        trigger: Trigger,
        started_at_ms: u64,
        finished_at_ms: u64,
        outcome: AttemptOutcome,
        /// At most [`RESPONSE_EXCERPT_BYTES_MAX`](crate::RESPONSE_EXCERPT_BYTES_MAX) bytes.
        response_excerpt: Vec<u8>,
        /// Decided by the engine (schedule and jitter); `None` after a failure: the schedule
        /// is used up. Always `None` after a success.
        retry_at_ms: Option<u64>,
    },
    /// Seeds 000 and 002: an inactive or exhausted delivery, attempted again now.
    RetriggerRequested {
        delivery_id: DeliveryId,
        by_key: Option<ApiKeyId>,
        request_id: Uuid,
    },
    /// Seed 003: any delivery that is not pending, attempted again now.
    RedeliverRequested {
        delivery_id: DeliveryId,
        by_key: Option<ApiKeyId>,
    },
    /// Retention: the records through `through_seq` were dropped, with the deliveries delivered
    /// before `cutoff_ms` (and their events); the state the kept records start from is the
    /// checkpoint stored beside the log. Changes nothing in the projection: the drop is written
    /// with this record, in the same batch.
    Compacted {
        through_seq: u64,
        cutoff_ms: u64,
        deliveries_dropped: u64,
        events_dropped: u64,
    },
    /// A publish in one record: the event, then the deliveries it fans out to, folded exactly as
    /// an `EventPublished` followed by one `DeliveryCreated` per delivery (what earlier versions
    /// wrote, and what this one still writes for deliveries beyond
    /// [`PUBLISHED_DELIVERIES_BYTES_MAX`]). One record and one stored key fewer per delivery.
    EventPublishedWithDeliveries {
        id: EventId,
        org_id: OrgId,
        event_type: String,
        payload: Vec<u8>,
        call_id: Option<Uuid>,
        idempotency_key: Option<String>,
        deliveries: Vec<NewDelivery>,
    },
    /// The fold's rules from this record on are those of `version` (see
    /// [`RULES_CURRENT`](crate::RULES_CURRENT)); before the first such record, version 1. How an
    /// event is folded can then change without changing what an earlier record means: a rebuild
    /// folds each record under the rules in force when it was written, so it still gives the
    /// stored projection byte for byte.
    RulesAdopted {
        version: u32,
    },
    /// The endpoint's delivery settings from now on, whole (rules 4 on).
    EndpointDeliverySettingsSet {
        id: EndpointId,
        settings: DeliverySettings,
    },
    /// A bulk recover (rules 4 on): the recovery, who asked and the filter it selected by, with
    /// the first of the deliveries it re-queues (each as a retrigger is, a delivered one as a
    /// redeliver is); the rest follow in [`Event::RecoveryDeliveries`] records of the same batch,
    /// at most [`RECOVERY_IDS_PER_RECORD`] ids a record.
    RecoveryRequested {
        id: RecoveryId,
        org_id: OrgId,
        filter: RecoveryFilter,
        by_key: Option<ApiKeyId>,
        delivery_ids: Vec<DeliveryId>,
    },
    /// More deliveries of the recovery `recovery_id`, re-queued as those of its
    /// [`Event::RecoveryRequested`] (rules 4 on).
    RecoveryDeliveries {
        recovery_id: RecoveryId,
        delivery_ids: Vec<DeliveryId>,
    },
    /// The ordering key of an event (rules 4 on), in its publish's command after the records
    /// that created its deliveries: written when the publish created deliveries and gave
    /// `ordering_key`, or has a call id and goes to an endpoint whose ordering is `per_key`
    /// (`None`: the call id is the key). (An event without deliveries gets none: retention may
    /// drop it before the next record.) Its deliveries pending to `per_key` endpoints enter their key order.
    OrderingKeySet {
        event_id: EventId,
        ordering_key: Option<String>,
    },
    /// Cluster mode (rules 5 on): node `node_id` took the partition this log is over, under its
    /// lease's `epoch` (one more at each claim). The first record a new owner writes, once
    /// caught up, published with the expected last stream sequence: the fence that fails any
    /// write the previous owner still had in flight. Changes no table.
    PartitionClaimed {
        node_id: String,
        epoch: u64,
    },
}

/// Delivery ids one recovery record carries at most (17 bytes each encoded: a record of about
/// 70 KiB, far below a record's largest body), so 100,000 take 25 records.
pub const RECOVERY_IDS_PER_RECORD: usize = 4096;

/// A delivery created with its event ([`Event::EventPublishedWithDeliveries`]): the fields of
/// a `DeliveryCreated` that the event does not already say.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewDelivery {
    pub id: DeliveryId,
    /// `None`: an inline delivery to a `webhook_url`, signed with the organisation's secret.
    pub endpoint_id: Option<EndpointId>,
    pub url: String,
    pub next_attempt_at_ms: u64,
}

/// How many bytes of urls (plus [`NEW_DELIVERY_BYTES`] each) a publish record carries at most;
/// the deliveries beyond follow it as `DeliveryCreated` records, so a fan-out to thousands of
/// endpoints stays far below a record's largest body.
pub const PUBLISHED_DELIVERIES_BYTES_MAX: usize = 64 * 1024;
/// What [`PUBLISHED_DELIVERIES_BYTES_MAX`] counts for a delivery besides its url.
pub const NEW_DELIVERY_BYTES: usize = 64;

impl Event {
    /// The variant's name, for logs and timelines.
    pub fn kind(&self) -> &'static str {
        match self {
            Event::PolicySet(_) => "PolicySet",
            Event::ApiKeyCreated { .. } => "ApiKeyCreated",
            Event::ApiKeyRevoked { .. } => "ApiKeyRevoked",
            Event::OrgSecretSet { .. } => "OrgSecretSet",
            Event::EndpointCreated { .. } => "EndpointCreated",
            Event::EndpointUpdated { .. } => "EndpointUpdated",
            Event::EndpointDeleted { .. } => "EndpointDeleted",
            Event::EndpointSecretRotated { .. } => "EndpointSecretRotated",
            Event::EndpointEnabled { .. } => "EndpointEnabled",
            Event::EventPublished { .. } => "EventPublished",
            Event::DeliveryCreated { .. } => "DeliveryCreated",
            Event::AttemptRecorded { .. } => "AttemptRecorded",
            Event::RetriggerRequested { .. } => "RetriggerRequested",
            Event::RedeliverRequested { .. } => "RedeliverRequested",
            Event::Compacted { .. } => "Compacted",
            Event::EventPublishedWithDeliveries { .. } => "EventPublishedWithDeliveries",
            Event::RulesAdopted { .. } => "RulesAdopted",
            Event::EndpointDeliverySettingsSet { .. } => "EndpointDeliverySettingsSet",
            Event::RecoveryRequested { .. } => "RecoveryRequested",
            Event::RecoveryDeliveries { .. } => "RecoveryDeliveries",
            Event::OrderingKeySet { .. } => "OrderingKeySet",
            Event::PartitionClaimed { .. } => "PartitionClaimed",
        }
    }
}

/// Why bytes are not an event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DecodeError {
    /// No bytes at all.
    Empty,
    /// A format byte this version does not know (a newer herald wrote it?).
    UnknownFormat { format: u8 },
    /// The body is not a bincode event.
    Malformed { reason: String },
    /// The event ends before the bytes do.
    TrailingBytes { count: usize },
}

impl std::fmt::Display for DecodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DecodeError::Empty => write!(f, "empty event"),
            DecodeError::UnknownFormat { format } => {
                write!(f, "unknown event format {format} (newer herald?)")
            }
            DecodeError::Malformed { reason } => write!(f, "malformed event: {reason}"),
            DecodeError::TrailingBytes { count } => {
                write!(f, "{count} bytes after the end of the event")
            }
        }
    }
}

impl std::error::Error for DecodeError {}

/// A record's durable bytes: `[EVENT_FORMAT_V2] ++ bincode(actor) ++ bincode(event)`. The
/// actor adds 1 byte (`System`) or 18 (`Key`: a variant byte, a length byte, 16 id bytes).
pub fn encode(actor: RecordActor, event: &Event) -> Vec<u8> {
    let mut bytes = vec![EVENT_FORMAT_V2];
    crate::codec::write_bytes(&actor, &mut bytes);
    crate::codec::write_bytes(event, &mut bytes);
    bytes
}

/// The bytes of format 1 (`[EVENT_FORMAT_V1] ++ bincode(event)`), which herald wrote before
/// records named their actor: for tests and fixtures of older stores. Herald writes [`encode`].
pub fn encode_v1(event: &Event) -> Vec<u8> {
    let mut bytes = vec![EVENT_FORMAT_V1];
    crate::codec::write_bytes(event, &mut bytes);
    bytes
}

/// The event in `bytes`, of either format (the actor, if any, is read past and dropped: see
/// [`decode_recorded`]). Any input gives an event or a [`DecodeError`], never a panic, and no
/// length prefix makes it allocate more than [`DECODE_BYTES_MAX`](crate::DECODE_BYTES_MAX).
/// An event encoded larger than that does not decode: the engine keeps events far below it.
pub fn decode(bytes: &[u8]) -> Result<Event, DecodeError> {
    decode_recorded(bytes).map(|(_, event)| event)
}

/// The actor and the event in `bytes`: `None` for a record of format 1, written before records
/// named their actor. The same guarantees as [`decode`].
pub fn decode_recorded(bytes: &[u8]) -> Result<(Option<RecordActor>, Event), DecodeError> {
    let (&format, body) = bytes.split_first().ok_or(DecodeError::Empty)?;
    let (actor, body) = match format {
        EVENT_FORMAT_V1 => (None, body),
        EVENT_FORMAT_V2 => {
            let (actor, read) = decode_prefix::<RecordActor>(body)?;
            (Some(actor), &body[read..])
        }
        format => return Err(DecodeError::UnknownFormat { format }),
    };
    let (event, read) = decode_prefix::<Event>(body)?;
    if read != body.len() {
        return Err(DecodeError::TrailingBytes { count: body.len() - read });
    }
    Ok((actor, event))
}

/// Only the actor of the record in `bytes`, its envelope: the event is not read (a damaged one is
/// not noticed). `None` for a record of format 1.
pub fn decode_actor(bytes: &[u8]) -> Result<Option<RecordActor>, DecodeError> {
    match bytes.split_first() {
        None => Err(DecodeError::Empty),
        Some((&EVENT_FORMAT_V1, _)) => Ok(None),
        Some((&EVENT_FORMAT_V2, body)) => decode_prefix(body).map(|(actor, _)| Some(actor)),
        Some((&format, _)) => Err(DecodeError::UnknownFormat { format }),
    }
}

/// The value `bytes` open with, and how many bytes it took.
fn decode_prefix<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<(T, usize), DecodeError> {
    bincode::serde::decode_from_slice::<T, _>(bytes, crate::codec::decode_config())
        .map_err(|e| DecodeError::Malformed { reason: e.to_string() })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn uuid() -> impl Strategy<Value = Uuid> {
        any::<u128>().prop_map(Uuid::from_u128)
    }

    fn text() -> impl Strategy<Value = String> {
        "[a-z.*_ ]{0,12}"
    }

    fn actor() -> impl Strategy<Value = RecordActor> {
        prop_oneof![Just(RecordActor::System), uuid().prop_map(|id| RecordActor::Key(ApiKeyId(id)))]
    }

    fn scope() -> impl Strategy<Value = Scope> {
        proptest::sample::select(Scope::ALL.to_vec())
    }

    fn outcome() -> impl Strategy<Value = AttemptOutcome> {
        prop_oneof![
            any::<u16>().prop_map(|status| AttemptOutcome::Delivered { status }),
            (proptest::option::of(any::<u16>()), text())
                .prop_map(|(status, error)| AttemptOutcome::Failed { status, error }),
            text().prop_map(|error| AttemptOutcome::Interrupted { error }),
        ]
    }

    /// Any event of any variant, fields arbitrary.
    fn event() -> impl Strategy<Value = Event> {
        let bytes = || proptest::collection::vec(any::<u8>(), 0..64);
        let strings = || proptest::collection::vec(text(), 0..4);
        prop_oneof![
            (proptest::collection::vec(any::<u64>(), 0..8), any::<u32>(), any::<u64>(), any::<u64>())
                .prop_map(|(retry_schedule_ms, failures_max, failure_window_ms, rotation_overlap_ms)| {
                    Event::PolicySet(Policy {
                        retry_schedule_ms,
                        failures_max,
                        failure_window_ms,
                        rotation_overlap_ms,
                    })
                }),
            (
                uuid(),
                proptest::option::of(uuid()),
                proptest::collection::vec(scope(), 0..7),
                text(),
                any::<[u8; 32]>()
            )
                .prop_map(|(id, org, scopes, name, key_hash)| Event::ApiKeyCreated {
                    id: ApiKeyId(id),
                    org_id: org.map(OrgId),
                    scopes,
                    name,
                    key_hash,
                }),
            uuid().prop_map(|id| Event::ApiKeyRevoked { id: ApiKeyId(id) }),
            (uuid(), text()).prop_map(|(org, secret)| Event::OrgSecretSet { org_id: OrgId(org), secret }),
            (uuid(), uuid(), text(), text(), strings(), text()).prop_map(
                |(id, org, url, name, enabled_events, secret)| Event::EndpointCreated {
                    id: EndpointId(id),
                    org_id: OrgId(org),
                    url,
                    name,
                    enabled_events,
                    secret,
                }
            ),
            (
                uuid(),
                proptest::option::of(text()),
                proptest::option::of(text()),
                proptest::option::of(strings())
            )
                .prop_map(|(id, url, name, enabled_events)| Event::EndpointUpdated {
                    id: EndpointId(id),
                    url,
                    name,
                    enabled_events,
                }),
            uuid().prop_map(|id| Event::EndpointDeleted { id: EndpointId(id) }),
            (uuid(), text(), any::<u64>()).prop_map(|(id, secret, previous_expires_at_ms)| {
                Event::EndpointSecretRotated { id: EndpointId(id), secret, previous_expires_at_ms }
            }),
            uuid().prop_map(|id| Event::EndpointEnabled { id: EndpointId(id) }),
            (uuid(), uuid(), text(), bytes(), proptest::option::of(uuid()), proptest::option::of(text()))
                .prop_map(|(id, org, event_type, payload, call_id, idempotency_key)| {
                    Event::EventPublished {
                        id: EventId(id),
                        org_id: OrgId(org),
                        event_type,
                        payload,
                        call_id,
                        idempotency_key,
                    }
                }),
            (uuid(), uuid(), uuid(), proptest::option::of(uuid()), text(), any::<u64>()).prop_map(
                |(id, event, org, endpoint, url, next_attempt_at_ms)| Event::DeliveryCreated {
                    id: DeliveryId(id),
                    event_id: EventId(event),
                    org_id: OrgId(org),
                    endpoint_id: endpoint.map(EndpointId),
                    url,
                    next_attempt_at_ms,
                }
            ),
            (
                uuid(),
                any::<u32>(),
                any::<bool>(),
                any::<u64>(),
                any::<u64>(),
                outcome(),
                bytes(),
                proptest::option::of(any::<u64>())
            )
                .prop_map(
                    |(
                        id,
                        attempt,
                        manual,
                        started_at_ms,
                        finished_at_ms,
                        outcome,
                        response_excerpt,
                        retry_at_ms,
                    )| {
                        Event::AttemptRecorded {
                            delivery_id: DeliveryId(id),
                            attempt,
                            trigger: if manual { Trigger::Manual } else { Trigger::Auto },
                            started_at_ms,
                            finished_at_ms,
                            outcome,
                            response_excerpt,
                            retry_at_ms,
                        }
                    }
                ),
            (uuid(), proptest::option::of(uuid()), uuid()).prop_map(|(id, key, request_id)| {
                Event::RetriggerRequested {
                    delivery_id: DeliveryId(id),
                    by_key: key.map(ApiKeyId),
                    request_id,
                }
            }),
            (uuid(), proptest::option::of(uuid())).prop_map(|(id, key)| Event::RedeliverRequested {
                delivery_id: DeliveryId(id),
                by_key: key.map(ApiKeyId),
            }),
            (
                uuid(),
                proptest::option::of(any::<u32>()),
                proptest::option::of(any::<u32>()),
                any::<bool>(),
                proptest::collection::vec((text(), text()), 0..3)
            )
                .prop_map(|(id, rate_limit_per_s, max_in_flight, per_key, headers)| {
                    Event::EndpointDeliverySettingsSet {
                        id: EndpointId(id),
                        settings: DeliverySettings {
                            rate_limit_per_s,
                            max_in_flight,
                            ordering: if per_key { DeliveryOrder::PerKey } else { DeliveryOrder::Unordered },
                            headers,
                        },
                    }
                }),
            (uuid(), uuid(), recovery_filter(), proptest::option::of(uuid()), delivery_ids()).prop_map(
                |(id, org, filter, key, delivery_ids)| Event::RecoveryRequested {
                    id: RecoveryId(id),
                    org_id: OrgId(org),
                    filter,
                    by_key: key.map(ApiKeyId),
                    delivery_ids,
                }
            ),
            (uuid(), delivery_ids()).prop_map(|(id, delivery_ids)| Event::RecoveryDeliveries {
                recovery_id: RecoveryId(id),
                delivery_ids,
            }),
            (uuid(), proptest::option::of(text()))
                .prop_map(|(id, ordering_key)| Event::OrderingKeySet { event_id: EventId(id), ordering_key }),
            (text(), any::<u64>()).prop_map(|(node_id, epoch)| Event::PartitionClaimed { node_id, epoch }),
        ]
    }

    fn delivery_ids() -> impl Strategy<Value = Vec<DeliveryId>> {
        proptest::collection::vec(uuid().prop_map(DeliveryId), 0..8)
    }

    fn recovery_filter() -> impl Strategy<Value = RecoveryFilter> {
        let status = proptest::sample::select(crate::model::DeliveryStatus::ALL.to_vec());
        (
            proptest::collection::vec(status, 0..4),
            proptest::option::of(uuid()),
            proptest::option::of(text()),
            proptest::option::of(any::<u64>()),
            proptest::option::of(any::<u64>()),
            any::<u32>(),
        )
            .prop_map(
                |(statuses, endpoint, event_type, created_after_ms, created_before_ms, max)| RecoveryFilter {
                    statuses,
                    endpoint_id: endpoint.map(EndpointId),
                    event_type,
                    created_after_ms,
                    created_before_ms,
                    max,
                },
            )
    }

    proptest! {
        #[test]
        fn every_event_round_trips(event in event(), actor in actor()) {
            let bytes = encode(actor, &event);
            prop_assert_eq!(bytes[0], EVENT_FORMAT_V2);
            prop_assert_eq!(decode_recorded(&bytes), Ok((Some(actor), event.clone())));
            prop_assert_eq!(decode(&bytes), Ok(event.clone()));
            // the encoding is a function of the actor and the event
            prop_assert_eq!(encode(actor, &decode(&bytes).unwrap()), bytes.clone());
            // the envelope changes no byte of the event: format 1 is the same event bytes
            let v1 = encode_v1(&event);
            let envelope = match actor { RecordActor::System => 1, RecordActor::Key(_) => 18 };
            prop_assert_eq!(bytes.len(), v1.len() + envelope);
            prop_assert_eq!(&bytes[1 + envelope..], &v1[1..]);
            prop_assert_eq!(decode_recorded(&v1), Ok((None, event)));
            prop_assert_eq!(decode_actor(&bytes), Ok(Some(actor)));
            prop_assert_eq!(decode_actor(&v1), Ok(None));
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = decode(&bytes);
            for format in [EVENT_FORMAT_V1, EVENT_FORMAT_V2] {
                let mut framed = vec![format];
                framed.extend_from_slice(&bytes);
                let _ = decode_recorded(&framed);
                let _ = decode_actor(&framed);
            }
            // a well-formed actor followed by anything
            for actor in [RecordActor::System, RecordActor::Key(ApiKeyId(Uuid::from_u128(7)))] {
                let mut framed = encode(actor, &Event::RulesAdopted { version: 1 });
                framed.truncate(framed.len() - 2);
                framed.extend_from_slice(&bytes);
                let _ = decode_recorded(&framed);
            }
        }

        #[test]
        fn damaged_events_never_panic(
            event in event(),
            actor in proptest::option::of(actor()),
            flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..4),
            cut in any::<usize>(),
        ) {
            let mut bytes = match actor {
                Some(actor) => encode(actor, &event),
                None => encode_v1(&event),
            };
            for (at, value) in flips {
                let at = at % bytes.len();
                bytes[at] = value;
            }
            let _ = decode_recorded(&bytes);
            let _ = decode_actor(&bytes);
            let _ = decode_recorded(&bytes[..cut % (bytes.len() + 1)]);
            let _ = decode_actor(&bytes[..cut % (bytes.len() + 1)]);
        }
    }

    #[test]
    fn typed_decode_errors() {
        let enabled = Event::EndpointEnabled { id: EndpointId(Uuid::from_u128(1)) };
        for good in [encode_v1(&enabled), encode(RecordActor::Key(ApiKeyId(Uuid::from_u128(2))), &enabled)] {
            let mut unknown = good.clone();
            unknown[0] = 3;
            let mut trailing = good.clone();
            trailing.push(0);
            assert_eq!(decode(&unknown), Err(DecodeError::UnknownFormat { format: 3 }));
            assert_eq!(decode(&trailing), Err(DecodeError::TrailingBytes { count: 1 }));
            assert!(matches!(decode(&good[..good.len() - 1]), Err(DecodeError::Malformed { .. })));
        }
        assert_eq!(decode(&[]), Err(DecodeError::Empty));
        assert_eq!(decode_actor(&[]), Err(DecodeError::Empty));
        assert_eq!(decode_actor(&[3, 0]), Err(DecodeError::UnknownFormat { format: 3 }));
        assert!(matches!(decode_actor(&[EVENT_FORMAT_V2]), Err(DecodeError::Malformed { .. })));
        // a variant index past the last: of an event, of an actor
        assert!(matches!(decode(&[EVENT_FORMAT_V1, 99]), Err(DecodeError::Malformed { .. })));
        assert!(matches!(decode(&[EVENT_FORMAT_V2, 2, 16]), Err(DecodeError::Malformed { .. })));
        // an actor and no event; a key id of the wrong length
        assert!(matches!(decode(&[EVENT_FORMAT_V2, 0]), Err(DecodeError::Malformed { .. })));
        assert!(matches!(decode(&[EVENT_FORMAT_V2, 1, 3, 1, 2, 3, 16]), Err(DecodeError::Malformed { .. })));
        // a length prefix far past the end asks for no huge allocation
        let huge = [EVENT_FORMAT_V1, 9, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff];
        assert!(decode(&huge).is_err());
        let huge_actor = [EVENT_FORMAT_V2, 1, 0xfd, 0, 0, 0, 0, 0, 1, 0, 0];
        assert!(decode(&huge_actor).is_err());
    }

    /// The bytes herald wrote for this `EndpointCreated` before records named their actor (from
    /// `encode` at 5d55a99): a record of an older store, which must keep decoding as it was.
    const V1_ENDPOINT_CREATED: [u8; 117] = [
        1, 4, 16, 1, 144, 241, 244, 0, 0, 112, 0, 128, 0, 0, 0, 0, 0, 0, 225, 16, 1, 144, 241, 244, 0, 0,
        112, 0, 128, 0, 0, 0, 0, 0, 0, 1, 29, 104, 116, 116, 112, 115, 58, 47, 47, 99, 114, 109, 46, 101,
        120, 97, 109, 112, 108, 101, 46, 99, 111, 109, 47, 104, 111, 111, 107, 115, 3, 67, 82, 77, 1, 6, 99,
        97, 108, 108, 46, 42, 38, 119, 104, 115, 101, 99, 95, 77, 102, 75, 81, 57, 114, 56, 71, 75, 89, 113,
        114, 84, 119, 106, 85, 80, 68, 56, 73, 76, 80, 90, 73, 111, 50, 76, 97, 76, 97, 83, 119,
    ];

    #[test]
    fn a_record_of_format_1_decodes_with_no_actor() {
        let event = Event::EndpointCreated {
            id: EndpointId(Uuid::from_u128(0x0190f1f4_0000_7000_8000_0000000000e1)),
            org_id: OrgId(Uuid::from_u128(0x0190f1f4_0000_7000_8000_000000000001)),
            url: "https://crm.example.com/hooks".into(),
            name: "CRM".into(),
            enabled_events: vec!["call.*".into()],
            secret: "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw".into(),
        };
        assert_eq!(decode_recorded(&V1_ENDPOINT_CREATED), Ok((None, event.clone())));
        assert_eq!(decode(&V1_ENDPOINT_CREATED), Ok(event.clone()));
        assert_eq!(encode_v1(&event), V1_ENDPOINT_CREATED);
        // the same record written now: format 2, the key's envelope, then the same event bytes
        let key = ApiKeyId(Uuid::from_u128(0x0190f1f4_0000_7000_8000_0000000000a1));
        let v2 = encode(RecordActor::Key(key), &event);
        assert_eq!(v2[..3], [EVENT_FORMAT_V2, 1, 16]);
        assert_eq!(v2[3..19], *key.as_bytes());
        assert_eq!(v2[19..], V1_ENDPOINT_CREATED[1..]);
        assert_eq!(encode(RecordActor::System, &event)[..2], [EVENT_FORMAT_V2, 0]);
    }

    /// A length prefix of 2^40 in the payload or in a string: an error, not a huge allocation.
    #[test]
    fn huge_length_prefixes_are_errors() {
        let published = |event_type: &str, payload: Vec<u8>| {
            encode(
                RecordActor::Key(ApiKeyId(Uuid::from_u128(9))),
                &Event::EventPublished {
                    id: EventId(Uuid::from_u128(1)),
                    org_id: OrgId(Uuid::from_u128(2)),
                    event_type: event_type.into(),
                    payload,
                    call_id: None,
                    idempotency_key: None,
                },
            )
        };
        let mut huge_len = vec![0xfd]; // bincode varint: a u64 follows, little-endian
        huge_len.extend_from_slice(&(1u64 << 40).to_le_bytes());
        for (bytes, marker) in [
            (published("t", vec![0xab; 3]), vec![3, 0xab, 0xab, 0xab]),
            (published("qqq", vec![]), b"\x03qqq".to_vec()),
        ] {
            let at =
                bytes.windows(marker.len()).position(|w| w == marker.as_slice()).expect("marker present");
            let mut damaged = bytes[..at].to_vec();
            damaged.extend_from_slice(&huge_len);
            damaged.extend_from_slice(&bytes[at + marker.len()..]);
            assert!(matches!(decode(&damaged), Err(DecodeError::Malformed { .. })));
        }
    }

    #[test]
    fn scope_names() {
        for scope in Scope::ALL {
            assert_eq!(Scope::from_name(scope.name()), Some(scope));
        }
        assert_eq!(Scope::from_name("root"), None);
        assert_eq!(Scope::TasksWebhooksRead.name(), "tasks.webhooks.read");
    }
}
