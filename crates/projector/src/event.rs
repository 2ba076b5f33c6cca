//! The domain events: every fact herald records, and their one durable encoding,
//! `[EVENT_FORMAT_V1] ++ bincode(Event)`.

#[cfg(test)]
use crate::delivery_settings::DeliveryOrder;
use crate::delivery_settings::DeliverySettings;
use crate::ids::{ApiKeyId, DeliveryId, EndpointId, EventId, OrgId};
use crate::policy::Policy;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// The format byte that opens every encoded event.
pub const EVENT_FORMAT_V1: u8 = 1;

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
    /// The ordering key of an event (rules 4 on), in its publish's command after the records
    /// that created its deliveries: written when the publish created deliveries and gave
    /// `ordering_key`, or has a call id and goes to an endpoint whose ordering is `per_key`
    /// (`None`: the call id is the key). (An event without deliveries gets none: retention may
    /// drop it before the next record.) Its deliveries pending to `per_key` endpoints enter their key order.
    OrderingKeySet {
        event_id: EventId,
        ordering_key: Option<String>,
    },
}

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
            Event::OrderingKeySet { .. } => "OrderingKeySet",
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

/// The event's durable bytes: `[EVENT_FORMAT_V1] ++ bincode(event)`.
pub fn encode(event: &Event) -> Vec<u8> {
    let mut bytes = vec![EVENT_FORMAT_V1];
    bytes.extend(crate::codec::to_bytes(event));
    bytes
}

/// The event in `bytes`. Any input gives an event or a [`DecodeError`], never a panic, and no
/// length prefix makes it allocate more than [`DECODE_BYTES_MAX`](crate::DECODE_BYTES_MAX).
/// An event encoded larger than that does not decode: the engine keeps events far below it.
pub fn decode(bytes: &[u8]) -> Result<Event, DecodeError> {
    let (&format, body) = bytes.split_first().ok_or(DecodeError::Empty)?;
    if format != EVENT_FORMAT_V1 {
        return Err(DecodeError::UnknownFormat { format });
    }
    let (event, read) = bincode::serde::decode_from_slice::<Event, _>(body, crate::codec::decode_config())
        .map_err(|e| DecodeError::Malformed { reason: e.to_string() })?;
    if read != body.len() {
        return Err(DecodeError::TrailingBytes { count: body.len() - read });
    }
    Ok(event)
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
            (uuid(), proptest::option::of(text()))
                .prop_map(|(id, ordering_key)| Event::OrderingKeySet { event_id: EventId(id), ordering_key }),
        ]
    }

    proptest! {
        #[test]
        fn every_event_round_trips(event in event()) {
            let bytes = encode(&event);
            prop_assert_eq!(bytes[0], EVENT_FORMAT_V1);
            prop_assert_eq!(decode(&bytes), Ok(event.clone()));
            // the encoding is a function of the event
            prop_assert_eq!(encode(&decode(&bytes).unwrap()), bytes);
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = decode(&bytes);
            let mut v1 = vec![EVENT_FORMAT_V1];
            v1.extend_from_slice(&bytes);
            let _ = decode(&v1);
        }

        #[test]
        fn damaged_events_never_panic(
            event in event(),
            flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..4),
            cut in any::<usize>(),
        ) {
            let mut bytes = encode(&event);
            for (at, value) in flips {
                let at = at % bytes.len();
                bytes[at] = value;
            }
            let _ = decode(&bytes);
            let _ = decode(&bytes[..cut % (bytes.len() + 1)]);
        }
    }

    #[test]
    fn typed_decode_errors() {
        let good = encode(&Event::EndpointEnabled { id: EndpointId(Uuid::from_u128(1)) });
        let mut unknown = good.clone();
        unknown[0] = 2;
        let mut trailing = good.clone();
        trailing.push(0);
        assert_eq!(decode(&[]), Err(DecodeError::Empty));
        assert_eq!(decode(&unknown), Err(DecodeError::UnknownFormat { format: 2 }));
        assert_eq!(decode(&trailing), Err(DecodeError::TrailingBytes { count: 1 }));
        assert!(matches!(decode(&good[..good.len() - 1]), Err(DecodeError::Malformed { .. })));
        // a variant index past the last
        assert!(matches!(decode(&[EVENT_FORMAT_V1, 99]), Err(DecodeError::Malformed { .. })));
        // a length prefix far past the end asks for no huge allocation
        let huge = [EVENT_FORMAT_V1, 9, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff];
        assert!(decode(&huge).is_err());
    }

    /// A length prefix of 2^40 in the payload or in a string: an error, not a huge allocation.
    #[test]
    fn huge_length_prefixes_are_errors() {
        let published = |event_type: &str, payload: Vec<u8>| {
            encode(&Event::EventPublished {
                id: EventId(Uuid::from_u128(1)),
                org_id: OrgId(Uuid::from_u128(2)),
                event_type: event_type.into(),
                payload,
                call_id: None,
                idempotency_key: None,
            })
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
