//! The dispatcher's report of one attempt, with the time of the next one decided here.

use herald_projector::{
    get_delivery, get_endpoint, policy, AttemptOutcome, Delivery, DeliveryId, EndpointStatus, Event, TxRead,
    RESPONSE_EXCERPT_BYTES_MAX,
};

use super::{CommandError, Reply, Run};
use crate::schedule::{retry_at_ms, JITTER_PERMILLE_DEFAULT};

impl Run<'_, '_> {
    /// See [`Command::RecordAttempt`](super::Command::RecordAttempt).
    pub(super) fn record_attempt(
        &mut self,
        delivery_id: DeliveryId,
        (started_at_ms, finished_at_ms): (u64, u64),
        outcome: AttemptOutcome,
        mut response_excerpt: Vec<u8>,
        retry_after_ms: Option<u64>,
    ) -> Result<Reply, CommandError> {
        // Only the dispatcher reports attempts; an organisation's key cannot make one up.
        self.admin_only("attempts")?;
        let t = self.read();
        let d = get_delivery(&t, delivery_id)?
            .ok_or_else(|| CommandError::NotFound { what: "delivery", id: delivery_id.to_string() })?;
        let attempt = d.attempt_count + 1;
        let mut active_before = None;
        let retry_at_ms = match outcome {
            AttemptOutcome::Delivered { .. } => None,
            // Made again as soon as herald is back, at the same step of the schedule.
            AttemptOutcome::Interrupted { .. } => Some(finished_at_ms.max(started_at_ms)),
            AttemptOutcome::Failed { .. } => {
                // Whether this failure makes the endpoint inactive is the fold's to decide; one
                // read here (failures only) lets the machine see it happen and log it.
                if let Some(endpoint_id) = d.endpoint_id {
                    if get_endpoint(&t, endpoint_id)?.is_some_and(|e| e.status == EndpointStatus::Active) {
                        active_before = Some((endpoint_id, delivery_id));
                    }
                }
                scheduled_retry(&t, delivery_id, &d, finished_at_ms, retry_after_ms)?
            }
        };
        self.active_before = active_before;
        response_excerpt.truncate(RESPONSE_EXCERPT_BYTES_MAX);
        self.events.push(Event::AttemptRecorded {
            delivery_id,
            attempt,
            trigger: d.next_trigger,
            started_at_ms,
            finished_at_ms: finished_at_ms.max(started_at_ms),
            outcome,
            response_excerpt,
            retry_at_ms,
        });
        Ok(Reply::Attempted { retry_at_ms })
    }
}

/// When a failed attempt of `d` (the next of its attempts) that finished at `finished_at_ms` is made again, if it
/// is: the next step of the policy's schedule, with jitter, pushed later by a receiver's
/// `Retry-After` (never made to exist beyond the schedule).
fn scheduled_retry(
    t: &TxRead<'_, '_>,
    delivery_id: DeliveryId,
    d: &Delivery,
    finished_at_ms: u64,
    retry_after_ms: Option<u64>,
) -> Result<Option<u64>, CommandError> {
    Ok(retry_at_ms(
        &policy(t)?.retry_schedule_ms,
        d.attempts_since_reset + 1,
        finished_at_ms,
        *delivery_id.0.as_bytes(),
        d.attempt_count + 1,
        JITTER_PERMILLE_DEFAULT,
    )
    .map(|at| match retry_after_ms {
        Some(after) => at.max(finished_at_ms.saturating_add(after)),
        None => at,
    }))
}
