//! Refills: the due queue is a cache of the stored due index, and what it had to drop (a full
//! queue, a full inbox, a busy endpoint's overflow) is read back from the store here.

use herald_projector::{
    due_deliveries, list_deliveries, CheckedTables, DeliveryId, DeliveryIndex, DeliveryQuery, DeliveryStatus,
    Due, EndpointId,
};

use super::Dispatcher;

/// Due index entries read per page while refilling.
const REFILL_PAGE_LEN: usize = 1_000;

impl Dispatcher {
    /// Pending deliveries loaded at once for an endpoint whose backlog overflowed.
    fn endpoint_refill_max(&self) -> usize {
        (self.cfg.max_in_flight_per_endpoint * 16).max(256)
    }

    /// Reads back what the queue is missing: the whole due index after an inbox overflow, the
    /// entries it dropped when they are needed, and the endpoints whose backlog overflowed.
    pub(super) fn refill_as_needed(&mut self, now: u64) {
        if self.full_refill {
            self.full_refill = false;
            // Hints were lost: a delivery set aside may have been woken meanwhile.
            self.waiting.clear();
            self.refill(None);
        } else if self.refill_due(now) {
            let from = self.queue.refill_from_ms();
            self.queue.clear_refill();
            self.refill(from);
        }
        for endpoint in std::mem::take(&mut self.endpoint_refills) {
            self.refill_endpoint(endpoint);
        }
    }

    /// Whether entries dropped from the queue must be loaded back now: when the queue has room
    /// again, or when a dropped entry may be due before anything the queue holds (the queue is
    /// complete only before `refill_from_ms`). A refill leaves `refill_from_ms` at or after the
    /// earliest queued entry, so a full queue of due work does not rescan the index every turn.
    fn refill_due(&self, now: u64) -> bool {
        if !self.queue.needs_refill() {
            return false;
        }
        if self.queue.len() <= self.queue.capacity() / 2 {
            return true;
        }
        let next_due = self.queue.next_due_ms().unwrap_or(u64::MAX);
        let from = self.queue.refill_from_ms().unwrap_or(0);
        // A dropped entry may come before everything queued (so attempts keep their due order),
        // or may be due now while nothing queued is, or be due with the first queued one and
        // come before it (a smaller id: a hint queued after the drop, such as a delivery woken
        // by its key order, at its old due time).
        from < next_due
            || (from <= now && next_due > now)
            || (next_due <= now && !self.queue.first_is_complete())
    }

    /// Loads due index entries into the queue, from `from_ms` on (all of them when `None`), until
    /// the queue is full.
    fn refill(&mut self, from_ms: Option<u64>) {
        self.refills += 1;
        let mut after = from_ms
            .and_then(|ms| ms.checked_sub(1))
            .map(|ms| Due { next_attempt_at_ms: ms, delivery_id: DeliveryId::from_bytes([0xFF; 16]) });
        loop {
            let store = self.ctx.store.as_ref();
            let Ok(page) = CheckedTables::run(store, |t| due_deliveries(t, after, u64::MAX, REFILL_PAGE_LEN))
            else {
                // The store failed the read: what it did not return waits for the next refill.
                let read_to = after.map_or(from_ms.unwrap_or(0), |d| d.next_attempt_at_ms);
                self.queue.note_incomplete_from(read_to);
                return;
            };
            let page = match page {
                Ok(page) => page,
                Err(_) => {
                    // A damaged index entry: leave the rest for the next refill rather than spin.
                    return;
                }
            };
            let Some(last) = page.last().copied() else { return };
            for due in page {
                let id = due.delivery_id.as_bytes();
                if self.in_flight.contains_key(id)
                    || self.slots.is_parked(id)
                    || self.throttle.is_held(id)
                    || self.waiting.holds(id)
                {
                    continue;
                }
                if self.queue.insert(*due.delivery_id.as_bytes(), due.next_attempt_at_ms).dropped() {
                    // The entries after this one in the index were not read: the queue is
                    // complete only before them (not before the evicted one).
                    self.queue.note_incomplete_after(due.next_attempt_at_ms, *due.delivery_id.as_bytes());
                    return;
                }
            }
            after = Some(last);
        }
    }

    /// Loads an endpoint's pending deliveries into the queue after its parked list overflowed.
    fn refill_endpoint(&mut self, endpoint: EndpointId) {
        let query = DeliveryQuery::all(DeliveryIndex::EndpointStatus(endpoint, DeliveryStatus::Pending));
        let mut cursor = None;
        let mut loaded = 0;
        loop {
            let store = self.ctx.store.as_ref();
            let Ok(page) = CheckedTables::run(store, |t| list_deliveries(t, &query, cursor, REFILL_PAGE_LEN))
            else {
                // The store failed the read: only a reload of the whole due index is sure to
                // find what it did not return.
                self.queue.note_incomplete_from(0);
                return;
            };
            let Ok(page) = page else { return };
            for d in page.items {
                let id = d.id.as_bytes();
                if self.in_flight.contains_key(id)
                    || self.slots.is_parked(id)
                    || self.throttle.is_held(id)
                    || self.waiting.holds(id)
                {
                    continue;
                }
                if let Some(at) = d.next_attempt_at_ms {
                    if self.queue.insert(*d.id.as_bytes(), at).dropped() {
                        // The rest of this endpoint's pending list was not read, and it is in
                        // creation order, not due order: only a reload of the whole due index
                        // is sure to find them.
                        self.queue.note_incomplete_from(0);
                        return;
                    }
                    loaded += 1;
                }
            }
            match page.next {
                Some(next) if loaded < self.endpoint_refill_max() => cursor = Some(next),
                Some(_) => {
                    // More than a few rounds' worth: come back when these have drained.
                    self.slots.overflowed_endpoint(endpoint);
                    return;
                }
                None => return,
            }
        }
    }
}
