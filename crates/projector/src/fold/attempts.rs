//! Folds an attempt: its record in the delivery's history, the endpoint's health (a run of
//! failures may make it inactive, a success makes it active again) and the delivery's next state.

use super::{check_transition, ApplyError, Fold, ENDPOINT_DELETED_REASON};
use crate::codec;
use crate::event::{AttemptOutcome, Trigger};
use crate::ids::DeliveryId;
use crate::keys;
use crate::model::{
    AttemptRecord, Cause, Delivery, DeliveryStatus, Endpoint, EndpointStatus, RESPONSE_EXCERPT_BYTES_MAX,
};
use crate::policy::{human_duration, Policy};
use crate::query;
use crate::tables::Tables;

/// What the history keeps of an attempt of an `AttemptRecorded` event.
pub(super) fn attempt_record(
    attempt: u32,
    trigger: Trigger,
    (started_at_ms, finished_at_ms): (u64, u64),
    outcome: &AttemptOutcome,
    response_excerpt: &[u8],
) -> AttemptRecord {
    AttemptRecord {
        attempt,
        trigger,
        started_at_ms,
        finished_at_ms,
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
        response_excerpt: response_excerpt.to_vec(),
    }
}

/// An attempt as the fold takes it.
pub(super) struct Attempt {
    pub(super) delivery_id: DeliveryId,
    pub(super) record: AttemptRecord,
    pub(super) retry_at_ms: Option<u64>,
    /// Cut short by a stop ([`AttemptOutcome::Interrupted`]).
    pub(super) interrupted: bool,
}

/// The endpoint of a delivery as an attempt of it found it and as the attempt leaves it.
struct Health {
    before: Option<Endpoint>,
    after: Option<Endpoint>,
    /// Whether this attempt was the failure that made the endpoint inactive.
    became_inactive: bool,
}

impl<T: Tables> Fold<'_, T> {
    pub(super) fn attempt_recorded(&mut self, attempt: Attempt) -> Result<(), ApplyError> {
        let delivery_id = attempt.delivery_id;
        let old = self.delivery(delivery_id)?;
        self.check_attempt(&old, &attempt)?;
        // The endpoint's health first: this failure may be the one that makes it inactive.
        let health = self.health_after(&old, attempt.record.error.is_none(), attempt.interrupted)?;
        let stop_reason = stop_reason(health.after.as_ref());
        let mut new = self.delivery_after(&old, &attempt, stop_reason)?;
        if let Some(endpoint) = health.after.as_ref().filter(|e| !e.is_deleted() && e.url != new.url) {
            if self.rules()?.delivery_url_follows_endpoint() {
                new.url = endpoint.url.clone();
            }
        }
        let record = &attempt.record;
        self.t.put(keys::attempt(delivery_id, record.attempt), codec::to_bytes(record));
        self.put_delivery(Some(&old), &new)?;
        self.put_health(health)
    }

    /// Refuses an attempt out of order, or one that contradicts itself.
    fn check_attempt(&self, old: &Delivery, attempt: &Attempt) -> Result<(), ApplyError> {
        let Attempt { delivery_id, ref record, retry_at_ms, interrupted } = *attempt;
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
            if !self.rules()?.interrupted_is_not_a_failure() {
                return Err(invalid("an interrupted attempt under rules before 3"));
            }
            if record.response_status.is_some() || retry_at_ms.is_none() {
                return Err(invalid("an interrupted attempt with an answer or without a retry"));
            }
        }
        Ok(())
    }

    /// The delivery's endpoint, if it has one, after an attempt that `succeeded` or not.
    fn health_after(&self, old: &Delivery, succeeded: bool, interrupted: bool) -> Result<Health, ApplyError> {
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
            if endpoint_before.as_ref().map(health) != Some(health(endpoint))
                && self.rules()?.attempt_moves_endpoint_updated_at()
            {
                endpoint.updated_at_ms = self.at_ms;
            }
        }
        Ok(Health { before: endpoint_before, after: endpoint, became_inactive })
    }

    /// The delivery after the attempt: its new state (checked against the state machine), its
    /// next attempt, its last error and status. `stop_reason`: why it cannot go on automatically.
    fn delivery_after(
        &self,
        old: &Delivery,
        attempt: &Attempt,
        stop_reason: Option<String>,
    ) -> Result<Delivery, ApplyError> {
        let Attempt { delivery_id, ref record, retry_at_ms, interrupted } = *attempt;
        let succeeded = record.error.is_none();
        let mut new = old.clone();
        let (status, cause) = if succeeded {
            (DeliveryStatus::Delivered, Cause::AttemptSucceeded)
        } else if old.status == DeliveryStatus::Inactive {
            (DeliveryStatus::Inactive, Cause::AttemptFailed)
        } else if let Some(reason) = stop_reason {
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
        Ok(new)
    }

    /// Writes the endpoint if the attempt changed it, and turns its pending deliveries inactive
    /// if the attempt made it inactive.
    fn put_health(&mut self, health: Health) -> Result<(), ApplyError> {
        let Health { before, after, became_inactive } = health;
        if let Some(endpoint) = after {
            let reason = endpoint.inactive_reason.clone().unwrap_or_default();
            let id = endpoint.id;
            // Most attempts (a success on a healthy endpoint) leave it as it was: no write then.
            if before.as_ref() != Some(&endpoint) {
                self.put_endpoint(&endpoint);
            }
            if became_inactive {
                self.deactivate_pending(id, &reason, Cause::EndpointInactive)?;
            }
        }
        Ok(())
    }
}

/// Why a delivery to `endpoint` cannot go on automatically, if it cannot.
fn stop_reason(endpoint: Option<&Endpoint>) -> Option<String> {
    endpoint.and_then(|e| {
        if e.is_deleted() {
            Some(ENDPOINT_DELETED_REASON.to_string())
        } else if e.status == EndpointStatus::Inactive {
            Some(e.inactive_reason.clone().unwrap_or_default())
        } else {
            None
        }
    })
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
