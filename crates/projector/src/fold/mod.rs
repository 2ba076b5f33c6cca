//! The fold: [`apply`] is the only way the projection changes.
//!
//! [`Fold::event`] dispatches each event to the function that folds it, in the module of its
//! subject: `settings` (the policy, the rules), `api_keys`, `endpoints`, `publish` (events and
//! their deliveries), `attempts`, `retrigger` (retrigger and redeliver). What changed from one
//! version of the fold's rules to the next is named in `rules`.

use crate::codec;
use crate::event::{AttemptOutcome, Event};
use crate::ids::{ApiKeyId, DeliveryId, EndpointId, EventId, OrgId, RecoveryId};
use crate::index;
use crate::keys;
use crate::model::{transition_allowed, Cause, Delivery, DeliveryStatus, Endpoint};
use crate::query::{self, CorruptValue};
use crate::tables::{TableBatch, Tables};
use uuid::Uuid;

mod api_keys;
mod attempts;
mod cluster;
mod endpoints;
mod order;
mod publish;
mod recover;
mod refs;
mod retrigger;
mod rules;
mod settings;

pub use endpoints::{CASCADE_PAGE_LEN, ENDPOINT_DELETED_REASON};
pub use rules::{rules_may_follow, Rules, RULES_CURRENT};

use attempts::{attempt_record, Attempt};

/// Why an event cannot be applied. The engine validates commands before appending their events,
/// so this means a bug or a corrupt log. A rejected event leaves the tables as they were.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ApplyError {
    /// Seqs are gapless: each event must carry the applied seq plus one.
    SeqNotNext {
        expected: u64,
        got: u64,
    },
    /// An object with this id exists already.
    AlreadyExists {
        kind: &'static str,
        id: Uuid,
    },
    UnknownEndpoint(EndpointId),
    UnknownEvent(EventId),
    UnknownDelivery(DeliveryId),
    UnknownApiKey(ApiKeyId),
    /// The endpoint is deleted: it takes no new delivery and no change.
    EndpointDeleted(EndpointId),
    /// An object refers to an object of another organisation.
    OrgMismatch {
        kind: &'static str,
        id: Uuid,
        expected: OrgId,
        got: OrgId,
    },
    /// The delivery state machine forbids this change ([`transition_allowed`]).
    TransitionNotAllowed {
        delivery_id: DeliveryId,
        from: Option<DeliveryStatus>,
        to: DeliveryStatus,
        cause: Cause,
    },
    /// Attempts are numbered 1, 2, 3... over a delivery's life.
    AttemptOutOfOrder {
        delivery_id: DeliveryId,
        expected: u32,
        got: u32,
    },
    /// The attempt contradicts itself (a 2xx failure, a retry after a success, ...).
    InvalidAttempt {
        delivery_id: DeliveryId,
        reason: &'static str,
    },
    InvalidPolicy {
        reason: &'static str,
    },
    /// Rules are adopted forward only, up to the ones this code knows.
    UnknownRules {
        in_force: u32,
        got: u32,
    },
    /// Another key has this hash already.
    ApiKeyHashTaken {
        id: ApiKeyId,
    },
    ApiKeyAlreadyRevoked(ApiKeyId),
    /// The idempotency key answered another event less than 24 h ago.
    IdempotencyKeyReused {
        org_id: OrgId,
        key: String,
        event_id: EventId,
    },
    /// The event is folded only from a later rules version on than the one in force.
    BeforeItsRules {
        kind: &'static str,
        in_force: u32,
    },
    /// An ordering key that is not 1 to 128 visible ASCII characters.
    InvalidOrderingKey {
        event_id: EventId,
    },
    /// A stored value does not decode.
    Corrupt(CorruptValue),
    /// The event folds only under later rules than those in force.
    NotUnderRules {
        event: &'static str,
        in_force: u32,
    },
    UnknownRecovery(RecoveryId),
}

impl From<CorruptValue> for ApplyError {
    fn from(corrupt: CorruptValue) -> Self {
        ApplyError::Corrupt(corrupt)
    }
}

impl std::fmt::Display for ApplyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ApplyError::SeqNotNext { expected, got } => {
                write!(f, "seq {got} applied where {expected} was expected")
            }
            ApplyError::AlreadyExists { kind, id } => write!(f, "{kind} {id} exists already"),
            ApplyError::UnknownEndpoint(id) => write!(f, "unknown endpoint {id}"),
            ApplyError::UnknownEvent(id) => write!(f, "unknown event {id}"),
            ApplyError::UnknownDelivery(id) => write!(f, "unknown delivery {id}"),
            ApplyError::UnknownApiKey(id) => write!(f, "unknown api key {id}"),
            ApplyError::EndpointDeleted(id) => write!(f, "endpoint {id} is deleted"),
            ApplyError::OrgMismatch { kind, id, expected, got } => {
                write!(f, "{kind} {id} belongs to organisation {expected}, not {got}")
            }
            ApplyError::TransitionNotAllowed { delivery_id, from, to, cause } => match from {
                Some(from) => write!(
                    f,
                    "delivery {delivery_id}: {} -> {} by {cause:?} is not allowed",
                    from.name(),
                    to.name()
                ),
                None => {
                    write!(f, "delivery {delivery_id}: created {} by {cause:?} is not allowed", to.name())
                }
            },
            ApplyError::AttemptOutOfOrder { delivery_id, expected, got } => {
                write!(f, "delivery {delivery_id}: attempt {got} recorded where {expected} was expected")
            }
            ApplyError::InvalidAttempt { delivery_id, reason } => {
                write!(f, "delivery {delivery_id}: invalid attempt: {reason}")
            }
            ApplyError::InvalidPolicy { reason } => write!(f, "invalid policy: {reason}"),
            ApplyError::UnknownRules { in_force, got } => write!(
                f,
                "rules version {got} cannot follow version {in_force} (this code knows up to {RULES_CURRENT})"
            ),
            ApplyError::ApiKeyHashTaken { id } => {
                write!(f, "api key {id}: another key has this hash")
            }
            ApplyError::ApiKeyAlreadyRevoked(id) => write!(f, "api key {id} is revoked already"),
            ApplyError::IdempotencyKeyReused { org_id, key, event_id } => write!(
                f,
                "organisation {org_id}: idempotency key {key:?} answered event {event_id} less than 24h ago"
            ),
            ApplyError::BeforeItsRules { kind, in_force } => {
                write!(f, "{kind} does not fold under rules version {in_force}")
            }
            ApplyError::InvalidOrderingKey { event_id } => {
                write!(f, "event {event_id}: an ordering key must be 1 to 128 visible ASCII characters")
            }
            ApplyError::Corrupt(corrupt) => corrupt.fmt(f),
            ApplyError::NotUnderRules { event, in_force } => {
                write!(f, "{event} does not fold under rules version {in_force}")
            }
            ApplyError::UnknownRecovery(id) => write!(f, "unknown recovery {id}"),
        }
    }
}

impl std::error::Error for ApplyError {}

/// Applies the event the log holds at `seq`, stamped `at_ms` (unix ms), to the projection.
///
/// Deterministic and pure: it reads and writes only `tables`, so the same events give
/// byte-identical tables. `seq` must be the applied seq plus one (the first event is seq 1).
/// On an error nothing is written.
pub fn apply(tables: &mut impl Tables, seq: u64, at_ms: u64, event: &Event) -> Result<(), ApplyError> {
    let mut batch = TableBatch::new(tables);
    apply_unstaged(&mut batch, seq, at_ms, event)?;
    batch.commit();
    Ok(())
}

/// Like [`apply`], but writes straight into `tables`, without staging the event's writes first:
/// on an error, part of the event may have been written. Only for tables that are rolled back
/// when a command fails: the log's batch, whose writer undoes a rejected command (its
/// savepoint). It saves a second overlay over the batch's own for every read and write.
pub fn apply_unstaged(
    tables: &mut impl Tables,
    seq: u64,
    at_ms: u64,
    event: &Event,
) -> Result<(), ApplyError> {
    apply_unstaged_waking(tables, seq, at_ms, event, &mut Vec::new())
}

/// Like [`apply_unstaged`], and adds to `woken` each delivery (at its due time) the event made
/// first of its endpoint's key order (`ordering: per_key`): it waited behind one that left `pending`, and
/// may be attempted now (the engine tells the dispatcher).
pub fn apply_unstaged_waking(
    tables: &mut impl Tables,
    seq: u64,
    at_ms: u64,
    event: &Event,
    woken: &mut Vec<query::Due>,
) -> Result<(), ApplyError> {
    let applied_seq = query::applied_seq(tables)?;
    let expected = applied_seq.saturating_add(1);
    if seq != expected || applied_seq == u64::MAX {
        return Err(ApplyError::SeqNotNext { expected, got: seq });
    }
    let mut fold = Fold { t: tables, seq, at_ms, woken };
    fold.event(event)?;
    fold.refs_of(event)?;
    tables.put(keys::META_APPLIED_SEQ.to_vec(), seq.to_be_bytes().to_vec());
    Ok(())
}

/// One event being applied to staged tables.
struct Fold<'b, T: Tables> {
    t: &'b mut T,
    seq: u64,
    at_ms: u64,
    /// Deliveries this event made first of their key order (see `order`).
    woken: &'b mut Vec<query::Due>,
}

impl<T: Tables> Fold<'_, T> {
    fn event(&mut self, event: &Event) -> Result<(), ApplyError> {
        match event {
            Event::PolicySet(policy) => self.policy_set(policy),
            Event::ApiKeyCreated { id, org_id, scopes, name, key_hash } => {
                self.api_key_created(*id, *org_id, scopes, name, key_hash)
            }
            Event::ApiKeyRevoked { id } => self.api_key_revoked(*id),
            Event::OrgSecretSet { org_id, secret } => self.org_secret_set(*org_id, secret),
            Event::EndpointCreated { id, org_id, url, name, enabled_events, secret } => {
                self.endpoint_created(*id, *org_id, url, name, enabled_events, secret)
            }
            Event::EndpointUpdated { id, url, name, enabled_events } => {
                self.endpoint_updated(*id, url.as_deref(), name.as_deref(), enabled_events.as_deref())
            }
            Event::EndpointDeleted { id } => self.endpoint_deleted(*id),
            Event::EndpointSecretRotated { id, secret, previous_expires_at_ms } => {
                self.endpoint_secret_rotated(*id, secret, *previous_expires_at_ms)
            }
            Event::EndpointEnabled { id } => self.endpoint_enabled(*id),
            Event::EventPublished { id, org_id, event_type, payload: _, call_id, idempotency_key } => {
                self.event_published(*id, *org_id, event_type, *call_id, idempotency_key, &[])
            }
            Event::EventPublishedWithDeliveries {
                id,
                org_id,
                event_type,
                payload: _,
                call_id,
                idempotency_key,
                deliveries,
            } => self.event_published(*id, *org_id, event_type, *call_id, idempotency_key, deliveries),
            Event::DeliveryCreated { id, event_id, org_id, endpoint_id, url, next_attempt_at_ms } => {
                self.delivery_created(*id, *event_id, *org_id, *endpoint_id, url, *next_attempt_at_ms)
            }
            Event::AttemptRecorded {
                delivery_id,
                attempt,
                trigger,
                started_at_ms,
                finished_at_ms,
                outcome,
                response_excerpt,
                retry_at_ms,
            } => self.attempt_recorded(Attempt {
                delivery_id: *delivery_id,
                record: attempt_record(
                    *attempt,
                    *trigger,
                    (*started_at_ms, *finished_at_ms),
                    outcome,
                    response_excerpt,
                ),
                retry_at_ms: *retry_at_ms,
                interrupted: matches!(outcome, AttemptOutcome::Interrupted { .. }),
            }),
            Event::RetriggerRequested { delivery_id, .. } => self.manual(*delivery_id, Cause::Retrigger),
            Event::RedeliverRequested { delivery_id, .. } => self.manual(*delivery_id, Cause::Redeliver),
            // The drop it records was written with it, outside the fold (see `compact`).
            Event::Compacted { .. } => Ok(()),
            Event::RulesAdopted { version } => self.rules_adopted(*version),
            Event::EndpointDeliverySettingsSet { id, settings } => self.delivery_settings_set(*id, settings),
            Event::RecoveryRequested { .. } | Event::RecoveryDeliveries { .. } => self.recovery(event),
            Event::OrderingKeySet { event_id, ordering_key } => {
                self.ordering_key_set(*event_id, ordering_key.as_deref())
            }
            Event::PartitionClaimed { .. } => self.partition_claimed(),
        }
    }

    fn delivery(&self, id: DeliveryId) -> Result<Delivery, ApplyError> {
        query::get_delivery(self.t, id)?.ok_or(ApplyError::UnknownDelivery(id))
    }

    /// The endpoint, which must exist and not be deleted.
    fn live_endpoint(&self, id: EndpointId) -> Result<Endpoint, ApplyError> {
        let endpoint = query::get_endpoint(self.t, id)?.ok_or(ApplyError::UnknownEndpoint(id))?;
        if endpoint.is_deleted() {
            return Err(ApplyError::EndpointDeleted(id));
        }
        Ok(endpoint)
    }

    fn put_endpoint(&mut self, endpoint: &Endpoint) {
        self.t.put(keys::endpoint(endpoint.id), codec::to_bytes(endpoint));
    }

    /// Writes the delivery and moves its index entries from `old`'s to its own.
    fn put_delivery(&mut self, old: Option<&Delivery>, new: &Delivery) -> Result<(), ApplyError> {
        debug_assert_eq!(
            new.status == DeliveryStatus::Pending,
            new.next_attempt_at_ms.is_some(),
            "a delivery has a next attempt exactly when pending"
        );
        let new_keys = new.index_keys();
        let old_keys = old.map(Delivery::index_keys).unwrap_or_default();
        for key in &old_keys {
            if !new_keys.contains(key) {
                if index::is_chunked(key) {
                    self.t.remove_entry(key)?;
                } else {
                    self.t.delete(key);
                }
            }
        }
        // Keys the delivery already had stay as they are: no write for them.
        for key in new_keys {
            if !old_keys.contains(&key) {
                if index::is_chunked(&key) {
                    self.t.add_entry(&key)?;
                } else {
                    self.t.put(key, Vec::new());
                }
            }
        }
        self.t.put(keys::delivery(new.id), codec::to_bytes(new));
        self.t.delivery_written(new);
        // A delivery created pending needs no ref: its creation record is its event's (or the
        // `DeliveryCreated` that refs it itself).
        if old.is_some() || new.status != DeliveryStatus::Pending {
            self.touched(new.id, new.status)?;
        }
        // Only a delivery that was pending before can be in a key order: one entering pending
        // anew (a retrigger, a redeliver) joins it; a new one joins with its event's
        // `OrderingKeySet` (no read on a publish that has none).
        let was_pending = old.map(|o| o.status) == Some(DeliveryStatus::Pending);
        let is_pending = new.status == DeliveryStatus::Pending;
        if was_pending && !is_pending {
            self.order_leave(new.id)?;
        } else if old.is_some() && !was_pending && is_pending {
            self.order_enter(new, None)?;
        }
        if old.map(|o| o.status) != Some(new.status) {
            if let Some(old) = old {
                self.add_count(old.status, -1);
            }
            self.add_count(new.status, 1);
        }
        Ok(())
    }

    fn add_count(&mut self, status: DeliveryStatus, delta: i64) {
        add_count(&mut *self.t, status, delta)
    }
}

/// Moves the count of deliveries in `status` by `delta`.
pub(crate) fn add_count(t: &mut impl Tables, status: DeliveryStatus, delta: i64) {
    if delta == 0 {
        return;
    }
    let key = keys::count(status);
    let now = t.get(&key).and_then(|v| <[u8; 8]>::try_from(v.as_slice()).ok()).map_or(0, u64::from_be_bytes);
    let next = now.saturating_add_signed(delta);
    t.put(key, next.to_be_bytes().to_vec());
}

fn check_transition(
    delivery_id: DeliveryId,
    from: Option<DeliveryStatus>,
    to: DeliveryStatus,
    cause: Cause,
) -> Result<(), ApplyError> {
    if transition_allowed(from, to, cause) {
        Ok(())
    } else {
        Err(ApplyError::TransitionNotAllowed { delivery_id, from, to, cause })
    }
}

fn same_org(kind: &'static str, id: Uuid, expected: OrgId, got: OrgId) -> Result<(), ApplyError> {
    if expected == got {
        Ok(())
    } else {
        Err(ApplyError::OrgMismatch { kind, id, expected, got })
    }
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod props;

#[cfg(test)]
mod order_tests;
