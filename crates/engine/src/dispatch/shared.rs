//! The part of the dispatcher the engine handle holds: the inbox, the stop, and the figures.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use super::{lock, Inbox};

/// Figures of the dispatcher, for metrics and tests.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct DispatchStats {
    /// Deliveries in the in-memory due queue.
    pub queued: u64,
    /// The due time of the earliest queued delivery (its lag is now minus this).
    pub oldest_due_ms: Option<u64>,
    pub in_flight: u64,
    /// Deliveries waiting for a busy endpoint.
    pub parked: u64,
    /// Deliveries held for their endpoint's rate limit or pause (still pending, nothing recorded).
    pub throttled: u64,
    /// When the next of them may go (a token, or a pause's end).
    pub throttle_wake_ms: Option<u64>,
    pub attempts_started: u64,
    pub attempts_delivered: u64,
    pub attempts_failed: u64,
    /// Attempts whose outcome could not be recorded (they are made again).
    pub attempts_unrecorded: u64,
    /// Attempts not made for a fault of this host (no file descriptor, memory or local port;
    /// the resolver not answering): not counted against the receiver, made again shortly.
    pub attempts_local_faults: u64,
    /// Times a due delivery was set aside because an earlier delivery of its endpoint with its
    /// ordering key was pending (`ordering: per_key`); it goes once that one leaves pending.
    pub order_waits: u64,
    /// Refills of the queue from the stored due index.
    pub refills: u64,
    /// Entries were dropped from the queue and wait in the stored index for a refill.
    pub refill_pending: bool,
    /// The earliest due time among them (the queue is complete before it).
    pub refill_from_ms: Option<u64>,
    /// Loop iterations, so a waiter can tell that the loop has looked since it asked.
    pub generation: u64,
}

/// The part of the dispatcher shared with the engine handle.
pub(crate) struct Shared {
    pub(crate) inbox: Arc<Inbox>,
    pub(super) stopping: AtomicBool,
    /// When the stop must be over (set by [`Shared::stop_by`]); the drain keeps to it.
    pub(super) stop_deadline: Mutex<Option<std::time::Instant>>,
    pub(super) stats: Mutex<DispatchStats>,
    pub(super) started: AtomicU64,
    pub(super) delivered: AtomicU64,
    pub(super) failed: AtomicU64,
    pub(super) unrecorded: AtomicU64,
    pub(super) local_faults: AtomicU64,
    pub(super) order_waits: AtomicU64,
    /// When the last local fault was logged (ms since the epoch), so a storm of them
    /// is one line a second.
    local_fault_logged_ms: AtomicU64,
}

impl Shared {
    pub(crate) fn new(inbox: Arc<Inbox>) -> Shared {
        Shared {
            inbox,
            stopping: AtomicBool::new(false),
            stop_deadline: Mutex::new(None),
            stats: Mutex::new(DispatchStats::default()),
            started: AtomicU64::new(0),
            delivered: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            unrecorded: AtomicU64::new(0),
            local_faults: AtomicU64::new(0),
            order_waits: AtomicU64::new(0),
            local_fault_logged_ms: AtomicU64::new(0),
        }
    }

    pub(crate) fn stats(&self) -> DispatchStats {
        let mut s = *lock(&self.stats);
        s.attempts_started = self.started.load(Ordering::Relaxed);
        s.attempts_delivered = self.delivered.load(Ordering::Relaxed);
        s.attempts_failed = self.failed.load(Ordering::Relaxed);
        s.attempts_unrecorded = self.unrecorded.load(Ordering::Relaxed);
        s.attempts_local_faults = self.local_faults.load(Ordering::Relaxed);
        s.order_waits = self.order_waits.load(Ordering::Relaxed);
        s
    }

    /// Counts an attempt not made for a fault of this host, and says why in the log at most once
    /// a second (with how many there were in all).
    pub(super) fn local_fault(&self, delivery: &herald_projector::Delivery, error: &str) {
        let total = self.local_faults.fetch_add(1, Ordering::Relaxed) + 1;
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        let last = self.local_fault_logged_ms.load(Ordering::Relaxed);
        if now_ms.saturating_sub(last) >= 1_000
            && self
                .local_fault_logged_ms
                .compare_exchange(last, now_ms, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            tracing::warn!(
                delivery_id = %delivery.id,
                error,
                attempts_not_made = total,
                "attempt not made for a fault of this host; the delivery stays pending and is made again shortly"
            );
        }
    }

    /// Asks the loop to look at the clock and its inbox now.
    pub(crate) fn wake(&self) {
        self.inbox.wake();
    }

    pub(crate) fn inbox_is_empty(&self) -> bool {
        self.inbox.is_empty()
    }

    pub(crate) fn stop(&self) {
        self.stopping.store(true, Ordering::SeqCst);
        self.inbox.wake();
    }

    /// The stop, to be over by `deadline` (without one, the shutdown timeout from when the loop
    /// sees the stop).
    pub(crate) fn stop_by(&self, deadline: std::time::Instant) {
        lock(&self.stop_deadline).get_or_insert(deadline);
        self.stop();
    }
}
