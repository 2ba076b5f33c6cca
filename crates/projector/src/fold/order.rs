//! Folds ordered delivery per key: an event's ordering key ([`Event::OrderingKeySet`]), and the
//! order index (`crate::order`) kept equal to the pending deliveries of `per_key` endpoints that
//! have a key, through every change of a delivery's status and of an endpoint's ordering. When
//! the first delivery of an (endpoint, key) leaves `pending`, the next one is *woken*: the fold
//! names it to its caller, which tells the dispatcher it may go.
//!
//! [`Event::OrderingKeySet`]: crate::Event::OrderingKeySet

use super::{ApplyError, Fold};
use crate::codec;
use crate::delivery_settings::DeliveryOrder;
use crate::ids::{DeliveryId, EndpointId, EventId};
use crate::keys;
use crate::model::{Delivery, DeliveryStatus};
use crate::order;
use crate::query::{self, CorruptValue, Due};
use crate::tables::Tables;

/// Order index entries one page of an endpoint's switch away from `per_key` reads at a time.
const SWITCH_PAGE_LEN: usize = 256;

impl<T: Tables> Fold<'_, T> {
    /// The event's ordering key (`None`: its call id is the key), written in its publish's
    /// command after the records that created its deliveries: those pending to a `per_key`
    /// endpoint enter the order index.
    pub(super) fn ordering_key_set(
        &mut self,
        event_id: EventId,
        ordering_key: Option<&str>,
    ) -> Result<(), ApplyError> {
        let rules = self.rules()?;
        if !rules.ordered_delivery() {
            return Err(ApplyError::BeforeItsRules { kind: "OrderingKeySet", in_force: rules.0 });
        }
        let event = query::get_event(self.t, event_id)?.ok_or(ApplyError::UnknownEvent(event_id))?;
        let stored = keys::ordering_key(event_id);
        if self.t.get(&stored).is_some() {
            return Err(ApplyError::AlreadyExists { kind: "ordering key", id: event_id.0 });
        }
        if let Some(key) = ordering_key {
            if !order::valid_ordering_key(key) {
                return Err(ApplyError::InvalidOrderingKey { event_id });
            }
            self.t.put(stored, codec::to_bytes(&key.to_string()));
        }
        for id in &event.delivery_ids {
            let delivery = self.delivery(*id)?;
            if self.t.get(&keys::order_by_delivery(*id)).is_none() {
                self.order_enter(&delivery, Some(event.seq))?;
            }
        }
        Ok(())
    }

    /// A pending delivery enters its endpoint's key order, if the endpoint is `per_key` and the
    /// delivery has a key. `seq`: its event's record, when the caller has it.
    pub(super) fn order_enter(&mut self, d: &Delivery, seq: Option<u64>) -> Result<(), ApplyError> {
        let Some(endpoint) = d.endpoint_id.filter(|_| d.status == DeliveryStatus::Pending) else {
            return Ok(());
        };
        if query::get_endpoint_settings(self.t, endpoint)?.ordering != DeliveryOrder::PerKey {
            return Ok(());
        }
        self.order_add(endpoint, d, seq)
    }

    fn order_add(&mut self, endpoint: EndpointId, d: &Delivery, seq: Option<u64>) -> Result<(), ApplyError> {
        let Some(key) = order::ordering_key(self.t, d.event_id, d.call_id)? else { return Ok(()) };
        let seq = match seq {
            Some(seq) => seq,
            None => query::get_event(self.t, d.event_id)?.ok_or(ApplyError::UnknownEvent(d.event_id))?.seq,
        };
        let entry = order::entry(endpoint, &key, seq, d.id);
        self.t.put(keys::order_by_delivery(d.id), entry.clone());
        self.t.put(entry, Vec::new());
        Ok(())
    }

    /// A delivery that left `pending` leaves its key order; when it was first, the next one of
    /// its endpoint and key is woken. One read (of `KS_ORDER_BY_DELIVERY`) for any other.
    pub(super) fn order_leave(&mut self, id: DeliveryId) -> Result<(), ApplyError> {
        let back = keys::order_by_delivery(id);
        let Some(entry) = self.t.get(&back) else { return Ok(()) };
        let group = order::group_of(&entry).ok_or_else(|| CorruptValue { key: back.clone() })?;
        let head = order::group_head(self.t, group, 2);
        self.t.delete(&back);
        self.t.delete(&entry);
        if head.first() == Some(&entry) {
            if let Some(next) = head.get(1) {
                let next = order::delivery_of(next).ok_or_else(|| CorruptValue { key: next.clone() })?;
                self.wake(next)?;
            }
        }
        Ok(())
    }

    /// Names `id`, now free to go, to the caller, at its due time (so the dispatcher takes it
    /// in due order with the rest).
    fn wake(&mut self, id: DeliveryId) -> Result<(), ApplyError> {
        let d = self.delivery(id)?;
        if let Some(next_attempt_at_ms) = d.next_attempt_at_ms {
            self.woken.push(Due { next_attempt_at_ms, delivery_id: id });
        }
        Ok(())
    }

    /// The endpoint's ordering changed: to `per_key`, its pending deliveries with a key enter
    /// the order (a walk of its pending deliveries); away from it, every entry of it goes, and
    /// every delivery that waited is woken.
    pub(super) fn order_switched(&mut self, endpoint: EndpointId, per_key: bool) -> Result<(), ApplyError> {
        if per_key {
            let mut from = None;
            while let Some(page) = self.pending_page(endpoint, &mut from)? {
                for id in page {
                    let d = self.delivery(id)?;
                    self.order_add(endpoint, &d, None)?;
                }
            }
            return Ok(());
        }
        let prefix = order::endpoint_prefix(endpoint);
        let end = keys::prefix_end(&prefix).unwrap_or_else(|| vec![0xff; prefix.len() + 1]);
        let mut last_group: Option<Vec<u8>> = None;
        loop {
            // Each page deletes what it read: the next one starts where this one ended.
            let page = self.t.scan(&prefix, &end, SWITCH_PAGE_LEN);
            if page.is_empty() {
                return Ok(());
            }
            for (entry, _) in page {
                let corrupt = || CorruptValue { key: entry.clone() };
                let group = order::group_of(&entry).ok_or_else(corrupt)?.to_vec();
                let id = order::delivery_of(&entry).ok_or_else(corrupt)?;
                self.t.delete(&keys::order_by_delivery(id));
                self.t.delete(&entry);
                if last_group.as_ref() == Some(&group) {
                    self.wake(id)?;
                }
                last_group = Some(group);
            }
        }
    }
}
