//! Retrigger and redeliver: a delivery back to `pending`, one at a time (seeds 000 and 003) or up
//! to 25 of one endpoint at once (seed 002, rate limited per endpoint).

use std::collections::HashSet;

use herald_projector::{get_delivery, get_endpoint, DeliveryId, DeliveryStatus, EndpointId, Event};
use uuid::Uuid;

use super::{derived_id, invalid, BatchItem, CommandError, Commands, Reply, Run, BATCH_RETRIGGER_MAX};

/// Endpoints whose retrigger windows are remembered, at most.
const RATE_WINDOWS_MAX: usize = 100_000;

fn request_id(at_ms: u64, delivery_id: DeliveryId, manual_retry_count: u32) -> Uuid {
    derived_id(at_ms, &[b"retrigger", delivery_id.as_bytes(), &manual_retry_count.to_be_bytes()])
}

impl Commands {
    /// Counts a batch retrigger request for the endpoint, or refuses it when over the window's limit.
    fn rate_check(&mut self, endpoint: EndpointId, at_ms: u64) -> Result<(), CommandError> {
        let window_ms = self.limits.retrigger_window_ms;
        if self.retrigger_windows.len() >= RATE_WINDOWS_MAX && !self.retrigger_windows.contains_key(&endpoint)
        {
            self.retrigger_windows
                .retain(|_, times| times.back().is_some_and(|t| at_ms.saturating_sub(*t) < window_ms));
        }
        let times = self.retrigger_windows.entry(endpoint).or_default();
        while times.front().is_some_and(|t| at_ms.saturating_sub(*t) >= window_ms) {
            times.pop_front();
        }
        if times.len() >= self.limits.retrigger_max_per_window {
            let oldest = times.front().copied().unwrap_or(at_ms);
            return Err(CommandError::RateLimited {
                retry_after_ms: (oldest + window_ms).saturating_sub(at_ms),
            });
        }
        times.push_back(at_ms);
        Ok(())
    }
}

impl Run<'_, '_> {
    pub(super) fn retrigger(&mut self, delivery_id: DeliveryId) -> Result<Reply, CommandError> {
        let d = get_delivery(&self.read(), delivery_id)?
            .filter(|d| self.actor.sees(d.org_id))
            .filter(|d| matches!(d.status, DeliveryStatus::Inactive | DeliveryStatus::Exhausted));
        if d.is_none() {
            return Err(CommandError::NotFound { what: "failed webhook", id: delivery_id.to_string() });
        }
        let request_id = request_id(self.at_ms, delivery_id, d.map_or(0, |d| d.manual_retry_count));
        self.events.push(Event::RetriggerRequested { delivery_id, by_key: self.actor.key_id, request_id });
        Ok(Reply::Retriggered { request_id })
    }

    pub(super) fn redeliver(&mut self, delivery_id: DeliveryId) -> Result<Reply, CommandError> {
        let d = get_delivery(&self.read(), delivery_id)?.filter(|d| self.actor.sees(d.org_id));
        match d {
            None => return Err(CommandError::NotFound { what: "delivery", id: delivery_id.to_string() }),
            Some(d) if d.status == DeliveryStatus::Pending => {
                return Err(CommandError::Conflict {
                    reason: format!("delivery {delivery_id} is already pending"),
                })
            }
            Some(_) => {}
        }
        self.events.push(Event::RedeliverRequested { delivery_id, by_key: self.actor.key_id });
        Ok(Reply::Done)
    }

    pub(super) fn batch_retrigger(
        &mut self,
        endpoint_id: EndpointId,
        delivery_ids: Vec<DeliveryId>,
    ) -> Result<Reply, CommandError> {
        if delivery_ids.is_empty() || delivery_ids.len() > BATCH_RETRIGGER_MAX {
            return Err(invalid(
                "webhookNotificationIds",
                format!("1 to {BATCH_RETRIGGER_MAX} ids, got {}", delivery_ids.len()),
            ));
        }
        let mut seen = HashSet::new();
        if let Some(dup) = delivery_ids.iter().find(|id| !seen.insert(**id)) {
            return Err(invalid("webhookNotificationIds", format!("{dup} is listed twice")));
        }
        // Admin only, but the endpoint must exist (deleted ones keep their history).
        match get_endpoint(&self.read(), endpoint_id)? {
            Some(e) if self.actor.sees(e.org_id) => {}
            _ => return Err(CommandError::NotFound { what: "webhook", id: endpoint_id.to_string() }),
        }
        self.machine.rate_check(endpoint_id, self.at_ms)?;
        let mut items = Vec::with_capacity(delivery_ids.len());
        for delivery_id in delivery_ids {
            let result = self.batch_item(endpoint_id, delivery_id)?;
            items.push(BatchItem { delivery_id, result });
        }
        Ok(Reply::Batch(items))
    }

    /// One delivery of a batch retrigger: a delivered one is redelivered, a failed one
    /// retriggered; its request id, or why it was neither.
    fn batch_item(
        &mut self,
        endpoint_id: EndpointId,
        delivery_id: DeliveryId,
    ) -> Result<Result<Uuid, String>, CommandError> {
        let (at_ms, by_key) = (self.at_ms, self.actor.key_id);
        let d = get_delivery(&self.read(), delivery_id)?;
        Ok(match d {
            Some(d) if d.endpoint_id == Some(endpoint_id) => match d.status {
                DeliveryStatus::Pending => Err("notification is already pending".to_string()),
                DeliveryStatus::Delivered => {
                    self.events.push(Event::RedeliverRequested { delivery_id, by_key });
                    Ok(request_id(at_ms, delivery_id, d.manual_retry_count))
                }
                DeliveryStatus::Inactive | DeliveryStatus::Exhausted => {
                    let request_id = request_id(at_ms, delivery_id, d.manual_retry_count);
                    self.events.push(Event::RetriggerRequested { delivery_id, by_key, request_id });
                    Ok(request_id)
                }
            },
            _ => Err(format!("notification {delivery_id} not found for webhook {endpoint_id}")),
        })
    }
}
