//! The ordering gate (API.md `ordering: "per_key"`): a due delivery that waits behind an earlier
//! pending delivery of its endpoint with its ordering key is not attempted and records nothing.
//!
//! It is set aside, not requeued: it stays in the stored due index (so a restart finds it, and
//! sets it aside again while it waits), and when the one before it leaves `pending` the fold
//! names it, and the engine hands it back as a due hint (see `commands::Commands::stage`). A
//! follower of a head whose retry is hours away costs one read when it comes due, not a read per
//! turn. [`Waiting`] remembers what was set aside, so refills from the due index skip it (else a
//! small queue refilled from the same time would load the same waiting deliveries again and
//! again); a full refill, after hints were lost, forgets it and looks at each once more.

use std::collections::HashSet;
use std::sync::atomic::Ordering;

use herald_projector::{waits_behind, CheckedTables, Delivery};

use super::{Dispatcher, Id, RECORD_RETRY_MS};

/// Deliveries [`Waiting`] remembers at most (about 64 MiB): past it, one set aside is not
/// remembered, and each refill that reaches its due time loads it (and sets it aside) again.
pub(super) const WAITING_MAX: usize = 1 << 20;

/// The deliveries set aside behind an earlier pending one of their key, at most [`WAITING_MAX`].
#[derive(Default)]
pub(super) struct Waiting {
    ids: HashSet<Id>,
}

impl Waiting {
    fn set_aside(&mut self, id: Id) {
        if self.ids.len() < WAITING_MAX {
            self.ids.insert(id);
        }
    }

    /// A hint names it: it is looked at again.
    pub(super) fn woken(&mut self, id: &Id) {
        self.ids.remove(id);
    }

    pub(super) fn holds(&self, id: &Id) -> bool {
        self.ids.contains(id)
    }

    pub(super) fn clear(&mut self) {
        self.ids.clear();
    }
}

impl Dispatcher {
    /// Whether the key order lets `delivery` (pending, due) be attempted now. One read of the
    /// order index's back map, which the read cache answers for a delivery newer than the last
    /// ordered one; a scan of its group's first entry for an ordered one.
    pub(super) fn order_allows(&mut self, delivery: &Delivery, now: u64) -> bool {
        if delivery.endpoint_id.is_none() {
            return true; // an inline delivery has no endpoint to be ordered by
        }
        let id = *delivery.id.as_bytes();
        match CheckedTables::run(self.ctx.store.as_ref(), |t| waits_behind(t, delivery.id)) {
            Ok(Ok(None)) => true,
            Ok(Ok(Some(_))) => {
                self.ctx.shared.order_waits.fetch_add(1, Ordering::Relaxed);
                self.waiting.set_aside(id);
                // Its attempt reads the payload from the store when it goes.
                self.payloads.take(&id);
                false
            }
            // A damaged entry: not attempted, like a damaged delivery (the index is the truth).
            Ok(Err(_)) => {
                self.payloads.take(&id);
                false
            }
            // The store failed the read: looked at again shortly.
            Err(_) => {
                self.queue.insert(id, now.saturating_add(RECORD_RETRY_MS));
                false
            }
        }
    }
}
