//! Folds a retrigger or a redeliver: the delivery back to pending, its schedule restarted.

use super::{check_transition, ApplyError, Fold};
use crate::event::Trigger;
use crate::ids::DeliveryId;
use crate::model::{Cause, DeliveryStatus};
use crate::query;
use crate::tables::Tables;

impl<T: Tables> Fold<'_, T> {
    /// A retrigger or a redeliver: restart the schedule and attempt now.
    pub(super) fn manual(&mut self, delivery_id: DeliveryId, cause: Cause) -> Result<(), ApplyError> {
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
            if self.rules()?.delivery_url_follows_endpoint() {
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
}
