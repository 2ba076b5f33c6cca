//! The fold: [`apply`] is the only way the projection changes.

use crate::codec;
use crate::event::{AttemptOutcome, Event, Trigger};
use crate::ids::{ApiKeyId, DeliveryId, EndpointId, EventId, OrgId};
use crate::index;
use crate::keys;
use crate::model::{
    transition_allowed, ApiKey, AttemptRecord, Cause, Delivery, DeliveryStatus, Endpoint, EndpointStatus,
    EventRecord, IdempotencyHit, PreviousSecret, PREVIOUS_SECRETS_MAX, RESPONSE_EXCERPT_BYTES_MAX,
};
use crate::policy::{human_duration, Policy};
use crate::query::{self, Corrupt};
use crate::tables::{Batch, Tables};
use uuid::Uuid;

/// How many pending deliveries one page of a cascade (an endpoint going inactive or being
/// deleted) reads at a time.
pub const CASCADE_PAGE_LEN: usize = 256;

/// The reason an endpoint's deliveries carry when it is deleted.
pub const ENDPOINT_DELETED_REASON: &str = "endpoint deleted";

/// The fold's rules version this code writes with [`Event::RulesAdopted`] (the engine adopts it
/// when it opens a store that has an earlier one). What each version adds:
/// 1. Everything before version 2.
/// 2. An endpoint's `updated_at` moves when an attempt changes its health (`status`,
///    `inactive_reason`); a delivery to an endpoint takes the endpoint's url when an attempt of
///    it is recorded and when it is retriggered or redelivered, so after a `PATCH` of the
///    endpoint its `url` is the one its next attempt goes to, and the one its last attempt went
///    to unless the url changed while that attempt was in flight (the record does not carry the
///    url the dispatcher used).
/// 3. [`AttemptOutcome::Interrupted`] may be recorded: an attempt cut short by a stop is in the
///    delivery's history, its `attempt_count` and `last_attempt_at`, but it is not a failure
///    (API.md: a timeout, a connection error or a non-2xx answer): the endpoint's health, the
///    delivery's place in its schedule and its last error and status stay as they were, and the
///    delivery stays pending. Before, such an attempt
///    was recorded as a failure, so restarts could exhaust deliveries and make endpoints inactive.
pub const RULES_CURRENT: u32 = 3;

/// Whether rules `version` may follow the rules `in_force`: forward only, up to the ones this
/// code knows.
pub fn rules_may_follow(in_force: u32, version: u32) -> bool {
    in_force < version && version <= RULES_CURRENT
}

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
    /// A stored value does not decode.
    Corrupt(Corrupt),
}

impl From<Corrupt> for ApplyError {
    fn from(corrupt: Corrupt) -> Self {
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
            ApplyError::Corrupt(corrupt) => corrupt.fmt(f),
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
    let mut batch = Batch::new(tables);
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
    let applied_seq = query::applied_seq(tables)?;
    let expected = applied_seq.saturating_add(1);
    if seq != expected || applied_seq == u64::MAX {
        return Err(ApplyError::SeqNotNext { expected, got: seq });
    }
    Fold { t: tables, seq, at_ms }.event(event)?;
    tables.put(keys::META_APPLIED_SEQ.to_vec(), seq.to_be_bytes().to_vec());
    Ok(())
}

/// One event being applied to staged tables.
struct Fold<'b, T: Tables> {
    t: &'b mut T,
    seq: u64,
    at_ms: u64,
}

impl<T: Tables> Fold<'_, T> {
    fn event(&mut self, event: &Event) -> Result<(), ApplyError> {
        match event {
            Event::PolicySet(policy) => {
                if let Some(reason) = policy.problem() {
                    return Err(ApplyError::InvalidPolicy { reason });
                }
                self.t.put(keys::META_POLICY.to_vec(), codec::to_bytes(policy));
                Ok(())
            }
            Event::ApiKeyCreated { id, org_id, scopes, name, key_hash } => {
                if query::get_api_key(self.t, *id)?.is_some() {
                    return Err(ApplyError::AlreadyExists { kind: "api key", id: id.0 });
                }
                if let Some(taken) = query::get_api_key_by_hash(self.t, key_hash)? {
                    return Err(ApplyError::ApiKeyHashTaken { id: taken.id });
                }
                let key = ApiKey {
                    id: *id,
                    org_id: *org_id,
                    scopes: scopes.clone(),
                    name: name.clone(),
                    key_hash: *key_hash,
                    created_at_ms: self.at_ms,
                    revoked_at_ms: None,
                };
                self.t.put(keys::api_key(*id), codec::to_bytes(&key));
                self.t.put(keys::api_key_by_hash(key_hash), id.as_bytes().to_vec());
                Ok(())
            }
            Event::ApiKeyRevoked { id } => {
                let mut key = query::get_api_key(self.t, *id)?.ok_or(ApplyError::UnknownApiKey(*id))?;
                if key.revoked_at_ms.is_some() {
                    return Err(ApplyError::ApiKeyAlreadyRevoked(*id));
                }
                key.revoked_at_ms = Some(self.at_ms);
                self.t.put(keys::api_key(*id), codec::to_bytes(&key));
                self.t.delete(&keys::api_key_by_hash(&key.key_hash));
                Ok(())
            }
            Event::OrgSecretSet { org_id, secret } => {
                self.t.put(keys::org_secret(*org_id), codec::to_bytes(secret));
                Ok(())
            }
            Event::EndpointCreated { id, org_id, url, name, enabled_events, secret } => {
                if query::get_endpoint(self.t, *id)?.is_some() {
                    return Err(ApplyError::AlreadyExists { kind: "endpoint", id: id.0 });
                }
                let endpoint = Endpoint {
                    id: *id,
                    org_id: *org_id,
                    name: name.clone(),
                    url: url.clone(),
                    enabled_events: enabled_events.clone(),
                    status: EndpointStatus::Active,
                    inactive_reason: None,
                    secret: secret.clone(),
                    previous_secrets: Vec::new(),
                    deleted_at_ms: None,
                    failure_run_at_ms: Vec::new(),
                    created_at_ms: self.at_ms,
                    updated_at_ms: self.at_ms,
                };
                self.t.put(keys::endpoint_by_org(*org_id, *id), Vec::new());
                self.put_endpoint(&endpoint);
                Ok(())
            }
            Event::EndpointUpdated { id, url, name, enabled_events } => {
                let mut endpoint = self.live_endpoint(*id)?;
                if let Some(url) = url {
                    endpoint.url = url.clone();
                }
                if let Some(name) = name {
                    endpoint.name = name.clone();
                }
                if let Some(enabled_events) = enabled_events {
                    endpoint.enabled_events = enabled_events.clone();
                }
                endpoint.updated_at_ms = self.at_ms;
                self.put_endpoint(&endpoint);
                Ok(())
            }
            Event::EndpointDeleted { id } => {
                let mut endpoint = self.live_endpoint(*id)?;
                endpoint.deleted_at_ms = Some(self.at_ms);
                endpoint.updated_at_ms = self.at_ms;
                self.t.delete(&keys::endpoint_by_org(endpoint.org_id, *id));
                self.put_endpoint(&endpoint);
                self.deactivate_pending(*id, ENDPOINT_DELETED_REASON, Cause::EndpointDeleted)
            }
            Event::EndpointSecretRotated { id, secret, previous_expires_at_ms } => {
                let mut endpoint = self.live_endpoint(*id)?;
                let at_ms = self.at_ms;
                endpoint.previous_secrets.retain(|p| p.expires_at_ms > at_ms);
                let previous = std::mem::replace(&mut endpoint.secret, secret.clone());
                endpoint
                    .previous_secrets
                    .insert(0, PreviousSecret { secret: previous, expires_at_ms: *previous_expires_at_ms });
                endpoint.previous_secrets.truncate(PREVIOUS_SECRETS_MAX);
                endpoint.updated_at_ms = at_ms;
                self.put_endpoint(&endpoint);
                Ok(())
            }
            Event::EndpointEnabled { id } => {
                let mut endpoint = self.live_endpoint(*id)?;
                endpoint.status = EndpointStatus::Active;
                endpoint.inactive_reason = None;
                endpoint.failure_run_at_ms.clear();
                endpoint.updated_at_ms = self.at_ms;
                self.put_endpoint(&endpoint);
                Ok(())
            }
            Event::EventPublished { id, org_id, event_type, payload: _, call_id, idempotency_key } => {
                let record = self.event_published(*id, *org_id, event_type, *call_id, idempotency_key)?;
                self.put_event(&record);
                Ok(())
            }
            Event::EventPublishedWithDeliveries {
                id,
                org_id,
                event_type,
                payload: _,
                call_id,
                idempotency_key,
                deliveries,
            } => {
                // The event row is written once, with all its deliveries.
                let mut record = self.event_published(*id, *org_id, event_type, *call_id, idempotency_key)?;
                for d in deliveries {
                    self.absent_delivery(d.id)?;
                    self.delivery_created(
                        &mut record,
                        d.id,
                        *org_id,
                        d.endpoint_id,
                        &d.url,
                        d.next_attempt_at_ms,
                    )?;
                }
                self.put_event(&record);
                Ok(())
            }
            Event::DeliveryCreated { id, event_id, org_id, endpoint_id, url, next_attempt_at_ms } => {
                self.absent_delivery(*id)?;
                let mut event =
                    query::get_event(self.t, *event_id)?.ok_or(ApplyError::UnknownEvent(*event_id))?;
                self.delivery_created(&mut event, *id, *org_id, *endpoint_id, url, *next_attempt_at_ms)?;
                self.put_event(&event);
                Ok(())
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
            } => self.attempt_recorded(
                *delivery_id,
                AttemptRecord {
                    attempt: *attempt,
                    trigger: *trigger,
                    started_at_ms: *started_at_ms,
                    finished_at_ms: *finished_at_ms,
                    response_status: match outcome {
                        AttemptOutcome::Delivered { status } => Some(*status),
                        AttemptOutcome::Failed { status, .. } => *status,
                        AttemptOutcome::Interrupted { .. } => None,
                    },
                    error: match outcome {
                        AttemptOutcome::Delivered { .. } => None,
                        AttemptOutcome::Failed { error, .. } | AttemptOutcome::Interrupted { error } => {
                            Some(error.clone())
                        }
                    },
                    response_excerpt: response_excerpt.clone(),
                },
                *retry_at_ms,
                matches!(outcome, AttemptOutcome::Interrupted { .. }),
            ),
            Event::RetriggerRequested { delivery_id, .. } => self.manual(*delivery_id, Cause::Retrigger),
            Event::RedeliverRequested { delivery_id, .. } => self.manual(*delivery_id, Cause::Redeliver),
            // The drop it records was written with it, outside the fold (see `compact`).
            Event::Compacted { .. } => Ok(()),
            Event::RulesAdopted { version } => {
                let in_force = query::rules(self.t)?;
                if !rules_may_follow(in_force, *version) {
                    return Err(ApplyError::UnknownRules { in_force, got: *version });
                }
                self.t.put(keys::META_RULES.to_vec(), version.to_be_bytes().to_vec());
                Ok(())
            }
        }
    }

    fn event_published(
        &mut self,
        id: EventId,
        org_id: OrgId,
        event_type: &str,
        call_id: Option<Uuid>,
        idempotency_key: &Option<String>,
    ) -> Result<EventRecord, ApplyError> {
        if query::get_event(self.t, id)?.is_some() {
            return Err(ApplyError::AlreadyExists { kind: "event", id: id.0 });
        }
        if let Some(key) = idempotency_key {
            if let Some(hit) = query::idempotency_lookup(self.t, org_id, key, self.at_ms)? {
                return Err(ApplyError::IdempotencyKeyReused {
                    org_id,
                    key: key.clone(),
                    event_id: hit.event_id,
                });
            }
            let hit = IdempotencyHit { event_id: id, at_ms: self.at_ms };
            self.t.put(keys::idempotency(org_id, key), codec::to_bytes(&hit));
        }
        let record = EventRecord {
            id,
            org_id,
            event_type: event_type.to_string(),
            call_id,
            idempotency_key: idempotency_key.clone(),
            created_at_ms: self.at_ms,
            seq: self.seq,
            delivery_ids: Vec::new(),
        };
        Ok(record)
    }

    fn put_event(&mut self, event: &EventRecord) {
        self.t.put(keys::event(event.id), codec::to_bytes(event));
    }

    fn absent_delivery(&self, id: DeliveryId) -> Result<(), ApplyError> {
        match query::get_delivery(self.t, id)? {
            Some(_) => Err(ApplyError::AlreadyExists { kind: "delivery", id: id.0 }),
            None => Ok(()),
        }
    }

    /// A delivery of `event` (whose row the caller writes, with this delivery in its list).
    fn delivery_created(
        &mut self,
        event: &mut EventRecord,
        id: DeliveryId,
        org_id: OrgId,
        endpoint_id: Option<EndpointId>,
        url: &str,
        next_attempt_at_ms: u64,
    ) -> Result<(), ApplyError> {
        let event_id = event.id;
        same_org("event", event_id.0, event.org_id, org_id)?;
        let mut inactive_reason = None;
        if let Some(endpoint_id) = endpoint_id {
            let endpoint = self.live_endpoint(endpoint_id)?;
            same_org("endpoint", endpoint_id.0, endpoint.org_id, org_id)?;
            if endpoint.status == EndpointStatus::Inactive {
                inactive_reason = Some(endpoint.inactive_reason.unwrap_or_default());
            }
        }
        let status = match inactive_reason {
            Some(_) => DeliveryStatus::Inactive,
            None => DeliveryStatus::Pending,
        };
        check_transition(id, None, status, Cause::Created)?;
        let delivery = Delivery {
            id,
            event_id,
            org_id,
            endpoint_id,
            call_id: event.call_id,
            event_type: event.event_type.clone(),
            url: url.to_string(),
            status,
            attempt_count: 0,
            manual_retry_count: 0,
            attempts_since_reset: 0,
            next_attempt_at_ms: (status == DeliveryStatus::Pending).then_some(next_attempt_at_ms),
            next_trigger: Trigger::Auto,
            last_error: None,
            last_response_status: None,
            last_attempt_at_ms: None,
            delivered_at_ms: None,
            inactive_reason,
            created_at_ms: self.at_ms,
            updated_at_ms: self.at_ms,
        };
        self.put_delivery(None, &delivery)?;
        event.delivery_ids.push(id);
        Ok(())
    }

    fn attempt_recorded(
        &mut self,
        delivery_id: DeliveryId,
        record: AttemptRecord,
        retry_at_ms: Option<u64>,
        interrupted: bool,
    ) -> Result<(), ApplyError> {
        let old = self.delivery(delivery_id)?;
        let expected = old.attempt_count.saturating_add(1);
        if record.attempt != expected {
            return Err(ApplyError::AttemptOutOfOrder { delivery_id, expected, got: record.attempt });
        }
        let invalid = |reason| ApplyError::InvalidAttempt { delivery_id, reason };
        let succeeded = record.error.is_none();
        let status_2xx = matches!(record.response_status, Some(200..=299));
        if record.finished_at_ms < record.started_at_ms {
            return Err(invalid("finished before it started"));
        }
        if record.response_excerpt.len() > RESPONSE_EXCERPT_BYTES_MAX {
            return Err(invalid("response excerpt over RESPONSE_EXCERPT_BYTES_MAX"));
        }
        if succeeded && !status_2xx {
            return Err(invalid("a success without a 2xx status"));
        }
        if !succeeded && status_2xx {
            return Err(invalid("a failure with a 2xx status"));
        }
        if succeeded && retry_at_ms.is_some() {
            return Err(invalid("a retry after a success"));
        }
        if interrupted {
            if query::rules(self.t)? < 3 {
                return Err(invalid("an interrupted attempt under rules before 3"));
            }
            if record.response_status.is_some() || retry_at_ms.is_none() {
                return Err(invalid("an interrupted attempt with an answer or without a retry"));
            }
        }

        // The endpoint's health first: this failure may be the one that makes it inactive.
        let mut endpoint = match old.endpoint_id {
            Some(id) => Some(query::get_endpoint(self.t, id)?.ok_or(ApplyError::UnknownEndpoint(id))?),
            None => None,
        };
        let endpoint_before = endpoint.clone();
        let mut became_inactive = false;
        if let Some(endpoint) = endpoint.as_mut().filter(|e| !e.is_deleted()) {
            if succeeded {
                endpoint.failure_run_at_ms.clear();
                endpoint.status = EndpointStatus::Active;
                endpoint.inactive_reason = None;
            } else if !interrupted {
                let policy = query::policy(self.t)?;
                became_inactive = record_failure(endpoint, &policy, self.at_ms);
            }
            let health = |e: &Endpoint| (e.status, e.inactive_reason.clone());
            if endpoint_before.as_ref().map(health) != Some(health(endpoint)) && query::rules(self.t)? >= 2 {
                endpoint.updated_at_ms = self.at_ms;
            }
        }
        // Why the delivery cannot go on automatically, if it cannot.
        let endpoint_stop_reason = endpoint.as_ref().and_then(|e| {
            if e.is_deleted() {
                Some(ENDPOINT_DELETED_REASON.to_string())
            } else if e.status == EndpointStatus::Inactive {
                Some(e.inactive_reason.clone().unwrap_or_default())
            } else {
                None
            }
        });

        let mut new = old.clone();
        let (status, cause) = if succeeded {
            (DeliveryStatus::Delivered, Cause::AttemptSucceeded)
        } else if old.status == DeliveryStatus::Inactive {
            (DeliveryStatus::Inactive, Cause::AttemptFailed)
        } else if let Some(reason) = endpoint_stop_reason {
            new.inactive_reason = Some(reason);
            (DeliveryStatus::Inactive, Cause::AttemptFailed)
        } else if interrupted || retry_at_ms.is_some() {
            (DeliveryStatus::Pending, Cause::AttemptFailed)
        } else {
            (DeliveryStatus::Exhausted, Cause::AttemptFailed)
        };
        check_transition(delivery_id, Some(old.status), status, cause)?;
        new.status = status;
        new.attempt_count = record.attempt;
        new.next_attempt_at_ms = match status {
            DeliveryStatus::Pending => retry_at_ms,
            _ => None,
        };
        // An interrupted attempt is made again as the one it was: same step, same trigger.
        if !interrupted {
            new.attempts_since_reset = old.attempts_since_reset.saturating_add(1);
            new.next_trigger = Trigger::Auto;
        }
        // An interrupted attempt leaves the last failure's error and status: they say why the
        // delivery failed, if it has (the attempt itself is in the history).
        if !interrupted {
            new.last_error = record.error.clone();
            new.last_response_status = record.response_status;
        }
        new.last_attempt_at_ms = Some(record.started_at_ms);
        if succeeded {
            new.delivered_at_ms = Some(record.finished_at_ms);
            new.inactive_reason = None;
        }
        new.updated_at_ms = self.at_ms;
        if let Some(endpoint) = endpoint.as_ref().filter(|e| !e.is_deleted() && e.url != new.url) {
            if query::rules(self.t)? >= 2 {
                new.url = endpoint.url.clone();
            }
        }
        self.t.put(keys::attempt(delivery_id, record.attempt), codec::to_bytes(&record));
        self.put_delivery(Some(&old), &new)?;
        if let Some(endpoint) = endpoint {
            let reason = endpoint.inactive_reason.clone().unwrap_or_default();
            let id = endpoint.id;
            // Most attempts (a success on a healthy endpoint) leave it as it was: no write then.
            if endpoint_before.as_ref() != Some(&endpoint) {
                self.put_endpoint(&endpoint);
            }
            if became_inactive {
                self.deactivate_pending(id, &reason, Cause::EndpointInactive)?;
            }
        }
        Ok(())
    }

    /// A retrigger or a redeliver: restart the schedule and attempt now.
    fn manual(&mut self, delivery_id: DeliveryId, cause: Cause) -> Result<(), ApplyError> {
        let old = self.delivery(delivery_id)?;
        check_transition(delivery_id, Some(old.status), DeliveryStatus::Pending, cause)?;
        let mut new = old.clone();
        new.status = DeliveryStatus::Pending;
        new.manual_retry_count = old.manual_retry_count.saturating_add(1);
        new.attempts_since_reset = 0;
        new.next_attempt_at_ms = Some(self.at_ms);
        new.next_trigger = Trigger::Manual;
        new.inactive_reason = None;
        new.updated_at_ms = self.at_ms;
        if let Some(endpoint_id) = old.endpoint_id {
            if query::rules(self.t)? >= 2 {
                let endpoint = query::get_endpoint(self.t, endpoint_id)?
                    .ok_or(ApplyError::UnknownEndpoint(endpoint_id))?;
                if !endpoint.is_deleted() {
                    new.url = endpoint.url;
                }
            }
        }
        self.put_delivery(Some(&old), &new)?;
        Ok(())
    }

    /// Every pending delivery of the endpoint turns inactive with `reason`. Pages through the
    /// (endpoint, pending) index; each page moves the cursor forward, so the loop ends after at
    /// most (pending deliveries / CASCADE_PAGE_LEN + 1) pages.
    fn deactivate_pending(
        &mut self,
        endpoint_id: EndpointId,
        reason: &str,
        cause: Cause,
    ) -> Result<(), ApplyError> {
        let prefix = keys::key(
            keys::KS_DELIVERY_BY_ENDPOINT_STATUS,
            &[endpoint_id.as_bytes(), &[keys::status_byte(DeliveryStatus::Pending)]],
        );
        let end = keys::prefix_end(&prefix).unwrap_or_else(|| vec![0xff; prefix.len() + 1]);
        let mut from = prefix.clone();
        loop {
            let page = index::scan(self.t, &prefix, &from, &end, CASCADE_PAGE_LEN, index::Walk::Forward)?;
            let Some(last) = page.last() else {
                return Ok(());
            };
            from = keys::successor(last);
            for key in &page {
                let (_, id) = keys::parse_timed(key).ok_or_else(|| Corrupt { key: key.clone() })?;
                let old = self.delivery(id)?;
                check_transition(id, Some(old.status), DeliveryStatus::Inactive, cause)?;
                let mut new = old.clone();
                new.status = DeliveryStatus::Inactive;
                new.next_attempt_at_ms = None;
                new.inactive_reason = Some(reason.to_string());
                new.updated_at_ms = self.at_ms;
                self.put_delivery(Some(&old), &new)?;
            }
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

/// Adds a failure at `at_ms` to the endpoint's run; returns whether this made it inactive.
fn record_failure(endpoint: &mut Endpoint, policy: &Policy, at_ms: u64) -> bool {
    let failures_max = usize::try_from(policy.failures_max).unwrap_or(usize::MAX);
    let run = &mut endpoint.failure_run_at_ms;
    run.push(at_ms);
    if run.len() > failures_max {
        run.drain(..run.len() - failures_max);
    }
    if endpoint.status == EndpointStatus::Inactive || run.len() < failures_max {
        return false;
    }
    let newest_ms = run.iter().copied().max().unwrap_or(at_ms);
    let oldest_ms = run.iter().copied().min().unwrap_or(at_ms);
    if newest_ms - oldest_ms > policy.failure_window_ms {
        return false;
    }
    endpoint.status = EndpointStatus::Inactive;
    endpoint.inactive_reason = Some(format!(
        "{} consecutive failures within {}",
        policy.failures_max,
        human_duration(policy.failure_window_ms)
    ));
    true
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
