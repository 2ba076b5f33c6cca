//! Folds a publish: the organisation's signing secret for inline urls, the event, and its
//! deliveries (in the event's record or in records of their own).

use uuid::Uuid;

use super::{check_transition, same_org, ApplyError, Fold};
use crate::codec;
use crate::event::{NewDelivery, Trigger};
use crate::event_row;
use crate::ids::{DeliveryId, EndpointId, EventId, OrgId};
use crate::keys;
use crate::model::{Cause, Delivery, DeliveryStatus, EndpointStatus, EventRecord, IdempotencyHit};
use crate::query::{self, CorruptValue};
use crate::tables::Tables;

/// What a delivery takes from its event.
struct EventOf<'a> {
    id: EventId,
    org_id: OrgId,
    event_type: &'a str,
    call_id: Option<Uuid>,
}

impl<T: Tables> Fold<'_, T> {
    pub(super) fn org_secret_set(&mut self, org_id: OrgId, secret: &str) -> Result<(), ApplyError> {
        self.t.put(keys::org_secret(org_id), codec::to_bytes(&secret));
        Ok(())
    }

    /// An event, with the deliveries its record carries (none for an `EventPublished`): the
    /// event row is written once, with all its deliveries.
    pub(super) fn event_published(
        &mut self,
        id: EventId,
        org_id: OrgId,
        event_type: &str,
        call_id: Option<Uuid>,
        idempotency_key: &Option<String>,
        deliveries: &[NewDelivery],
    ) -> Result<(), ApplyError> {
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
        let mut record = EventRecord {
            id,
            org_id,
            event_type: event_type.to_string(),
            call_id,
            idempotency_key: idempotency_key.clone(),
            created_at_ms: self.at_ms,
            seq: self.seq,
            delivery_ids: Vec::new(),
        };
        let event = EventOf { id, org_id, event_type, call_id };
        for d in deliveries {
            self.absent_delivery(d.id)?;
            self.add_delivery(&event, d.id, org_id, d.endpoint_id, &d.url, d.next_attempt_at_ms)?;
            record.delivery_ids.push(d.id);
        }
        self.put_event(&record);
        Ok(())
    }

    /// A delivery in a record of its own, of an event folded before.
    pub(super) fn delivery_created(
        &mut self,
        id: DeliveryId,
        event_id: EventId,
        org_id: OrgId,
        endpoint_id: Option<EndpointId>,
        url: &str,
        next_attempt_at_ms: u64,
    ) -> Result<(), ApplyError> {
        self.absent_delivery(id)?;
        // The row grows by this id without its list being decoded (see `event_row`).
        let key = keys::event(event_id);
        let row = self.t.get(&key).ok_or(ApplyError::UnknownEvent(event_id))?;
        let (head, grown) = event_row::append_delivery(&row, id)
            .ok_or(ApplyError::Corrupt(CorruptValue { key: key.clone() }))?;
        let event =
            EventOf { id: head.id, org_id: head.org_id, event_type: &head.event_type, call_id: head.call_id };
        let status = self.add_delivery(&event, id, org_id, endpoint_id, url, next_attempt_at_ms)?;
        self.t.put(key, grown);
        // Not in the publish record that the event row names: its creation needs a ref.
        self.touched(id, status)
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

    /// A delivery of `event` (whose row the caller writes, with this delivery in its list);
    /// returns the status it starts in.
    fn add_delivery(
        &mut self,
        event: &EventOf<'_>,
        id: DeliveryId,
        org_id: OrgId,
        endpoint_id: Option<EndpointId>,
        url: &str,
        next_attempt_at_ms: u64,
    ) -> Result<DeliveryStatus, ApplyError> {
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
            event_type: event.event_type.to_string(),
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
        Ok(status)
    }
}
