//! The dispatcher: makes the attempts that the log says are due, and records what became of them.
//!
//! One loop task owns the in-memory state: the bounded [`DueQueue`], the attempts in flight (in
//! total and per endpoint), and deliveries parked behind a busy endpoint. It is fed from two
//! places, both through the [`Inbox`]:
//!
//! - the command machine's due hook, after each durable batch (new deliveries, retriggers,
//!   redeliveries): a hint with the delivery and its due time;
//! - each finished attempt, once its `RecordAttempt` is durable: the retry time the engine chose.
//!
//! The stored due index is the truth; the queue is a cache of it. On start the queue is filled
//! from the index, and whenever it had to drop entries (full queue, full inbox, a busy endpoint's
//! overflow) it is refilled from the index. Before each attempt the delivery is read again from
//! the store: only a `pending` delivery whose time has come is attempted, so a stale hint costs a
//! read, never a wrong attempt. An attempt in flight when the process dies stays `pending` in the
//! index and is made again after restart, with the same `webhook-id` (at least once).
//!
//! The parts, a file each: the loop and its turn (here), the [`Inbox`] it is fed through
//! (`inbox`), the per-endpoint and per-origin bookkeeping of slots, parking and overflow
//! (`slots`), the payloads handed over with hints (`payloads`), the ordering gate (`order`), the
//! refills from the stored index (`refill`), one attempt (`attempt`), the stop (`stop`), what the
//! engine handle holds (`shared`), and the endpoints' rate limits, pauses and settings (`throttle`).

mod attempt;
mod inbox;
mod order;
mod origins;
mod payloads;
mod refill;
mod shared;
mod slots;
mod stop;
mod throttle;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use herald_log::{Log, Store};
use herald_projector::{
    get_delivery, CheckedTables, Delivery, DeliveryId, DeliverySettings, DeliveryStatus, Due, EndpointId,
};
use tokio::task::JoinSet;

pub(crate) use self::inbox::Inbox;
pub use self::shared::DispatchStats;
pub(crate) use self::shared::Shared;
pub use self::stop::{StopReport, INTERRUPTED_ERROR};

use self::inbox::{Finished, NotRecorded};
use self::order::Waiting;
use self::origins::Origins;
use self::payloads::Payloads;
use self::slots::{Admission, Freed, Park, ReadBack, Slots};
use self::throttle::{SettingsCache, Throttle};
use crate::clock::Clock;
use crate::commands::{Commands, DueHint};
use crate::config::DeliveryConfig;
use crate::due::DueQueue;
use crate::sender::Sender;

/// Payload bytes held for deliveries about to be attempted, at most (counted once per delivery,
/// although the deliveries of one event share them); beyond it an attempt reads its payload
/// from the store.
const HANDED_PAYLOAD_BYTES_MAX: usize = 16 << 20;
/// The loop looks at the clock at least this often, so a wall clock that jumps is noticed.
const TICK_MAX_MS: u64 = 1_000;
/// After a failure to record an attempt (the store refused), the delivery is tried again this much
/// later (it is still pending in the store).
const RECORD_RETRY_MS: u64 = 1_000;

type Id = [u8; 16];

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Everything an attempt task needs; cheap to clone.
#[derive(Clone)]
struct Ctx {
    log: Log<Commands>,
    store: Arc<dyn Store>,
    clock: Arc<dyn Clock>,
    sender: Arc<dyn Sender>,
    shared: Arc<Shared>,
}

struct InFlight {
    /// The endpoint (or, for an inline delivery, the origin) whose slot this attempt holds,
    /// until its receiver answers.
    target: Option<Park>,
    /// The receiver has answered: the attempt waits for its record only.
    answered: bool,
    /// Set by whichever settles the attempt first: its task, once it knows how the attempt
    /// ended (it then records that, or nothing), or the stop, which cuts it short and records
    /// it as interrupted. So an attempt is never recorded both ways.
    settled: Arc<AtomicBool>,
    abort: tokio::task::AbortHandle,
    delivery: Delivery,
    started_at_ms: u64,
}

/// The loop's own state.
pub(crate) struct Dispatcher {
    ctx: Ctx,
    cfg: DeliveryConfig,
    queue: DueQueue,
    in_flight: HashMap<Id, InFlight>,
    /// How many of `in_flight` have been answered (they count against `max_awaiting_record`,
    /// not `max_in_flight_total`).
    answered: usize,
    /// Slots held, deliveries parked and what overflowed, per endpoint and per origin.
    slots: Slots,
    /// Rate limits and pauses per endpoint, and the deliveries they hold back.
    throttle: Throttle,
    /// The endpoints' delivery settings, as the attempts apply them.
    settings: SettingsCache,
    /// Endpoints to refill from their pending index on the next turn.
    endpoint_refills: Vec<EndpointId>,
    /// Popped while an attempt of theirs was in flight: looked at again when it finishes.
    recheck: HashSet<Id>,
    /// Payloads handed over with new deliveries' hints, until their first attempt starts.
    payloads: Payloads,
    /// The requests that published deliveries, for their log lines.
    origins: Origins,
    /// Set aside behind an earlier pending delivery of their key, until a hint wakes them
    /// (`order`).
    waiting: Waiting,
    full_refill: bool,
    tasks: JoinSet<()>,
    refills: u64,
    generation: u64,
}

impl Dispatcher {
    pub(crate) fn new(
        log: Log<Commands>,
        clock: Arc<dyn Clock>,
        sender: Arc<dyn Sender>,
        shared: Arc<Shared>,
        cfg: DeliveryConfig,
    ) -> Dispatcher {
        let store = log.store().clone();
        Dispatcher {
            ctx: Ctx { log, store, clock, sender, shared },
            queue: DueQueue::new(cfg.due_queue_capacity),
            waiting: Waiting::default(),
            slots: Slots::for_config(&cfg),
            throttle: Throttle::new(cfg.due_queue_capacity.max(64)),
            settings: SettingsCache::default(),
            cfg,
            in_flight: HashMap::new(),
            answered: 0,
            endpoint_refills: Vec::new(),
            recheck: HashSet::new(),
            payloads: Payloads::default(),
            origins: Origins::default(),
            full_refill: true,
            tasks: JoinSet::new(),
            refills: 0,
            generation: 0,
        }
    }

    /// The loop: runs until a stop is asked, then drains what is in flight (bounded by the
    /// shutdown timeout) and records the rest as interrupted.
    pub(crate) async fn run(mut self) -> StopReport {
        let shared = self.ctx.shared.clone();
        loop {
            let notified = shared.inbox.notified();
            if shared.stopping.load(Ordering::SeqCst) {
                break;
            }
            let next_due = self.turn();
            self.publish_stats();
            let now = self.ctx.clock.now_ms();
            let sleep_ms = next_due.map_or(TICK_MAX_MS, |t| t.saturating_sub(now)).clamp(1, TICK_MAX_MS);
            tokio::select! {
                _ = notified => {}
                _ = tokio::time::sleep(Duration::from_millis(sleep_ms)) => {}
                Some(_) = self.tasks.join_next(), if !self.tasks.is_empty() => {}
            }
        }
        self.drain().await
    }

    /// One turn: take in what the inbox holds, refill if needed, start what is due and allowed.
    /// Returns when the next queued delivery is due.
    fn turn(&mut self) -> Option<u64> {
        self.generation += 1;
        let inbox = self.ctx.shared.inbox.take();
        self.throttle_inbox(inbox.paused, inbox.endpoints);
        for id in inbox.released {
            self.release(id);
        }
        for f in inbox.finished {
            self.finish(f);
        }
        if inbox.overflowed {
            self.full_refill = true;
        }
        for DueHint { due, payload, request } in inbox.hints {
            let id = *due.delivery_id.as_bytes();
            self.waiting.woken(&id);
            // The queue keeps the earliest; it remembers that it must refill. A parked one is
            // looked at when it is moved back.
            if !self.slots.is_parked(&id) {
                let _ = self.queue.insert(id, due.next_attempt_at_ms);
            }
            if let Some(payload) = payload {
                self.payloads.hold(id, payload);
            }
            if let Some(request) = request {
                self.origins.hold(id, request);
            }
        }
        let now = self.ctx.clock.now_ms();
        self.throttle_release(now);
        self.refill_as_needed(now);
        self.start_due(now);
        match (self.queue.next_due_ms(), self.throttle.next_wake_ms()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Pops what is due, as far as the total bounds allow, and considers each.
    fn start_due(&mut self, now: u64) {
        let held_max = self.cfg.max_in_flight_total.saturating_add(self.cfg.max_awaiting_record);
        let mut refilled = false;
        loop {
            let sending = self.in_flight.len().saturating_sub(self.answered);
            let room = (self.cfg.max_in_flight_total.saturating_sub(sending))
                .min(held_max.saturating_sub(self.in_flight.len()));
            if room == 0 {
                break;
            }
            // What this loop queued (a retry, a woken delivery) may come after one the queue
            // dropped: one at a time then, and a refill (once a turn) before one that may not be
            // the earliest due.
            if !self.queue.first_is_complete() && !refilled {
                refilled = true;
                self.refill_as_needed(now);
            }
            let limit = if self.queue.needs_refill() { 1 } else { room.min(256) };
            let ids = self.queue.pop_due(now, limit);
            if ids.is_empty() {
                break;
            }
            for id in ids {
                let unparked = self.slots.take_unparked(&id);
                self.consider(id, now);
                if let Some(park) = unparked {
                    if !self.in_flight.contains_key(&id) && !self.slots.is_parked(&id) {
                        let freed = self.slots.unpark_next(&park);
                        self.requeue(freed);
                    }
                }
            }
        }
    }

    /// A queued delivery whose time has come: attempt it, park it, or let it go.
    fn consider(&mut self, id: Id, now: u64) {
        if self.in_flight.contains_key(&id) {
            self.recheck.insert(id);
            return;
        }
        if self.slots.is_parked(&id) || self.throttle.is_held(&id) {
            return; // already waiting for room behind its endpoint or origin, or for its rate
        }
        let Ok(read) =
            CheckedTables::run(self.ctx.store.as_ref(), |t| get_delivery(t, DeliveryId::from_bytes(id)))
        else {
            // The store failed the read: looked at again shortly, as it may well be due.
            self.queue.insert(id, now.saturating_add(RECORD_RETRY_MS));
            return;
        };
        let delivery = match read {
            Ok(Some(d)) if d.status == DeliveryStatus::Pending && d.next_attempt_at_ms.is_some() => d,
            // Gone, damaged or not waiting for an attempt: nothing to attempt (the due index
            // is the truth on refill).
            _ => {
                self.payloads.take(&id);
                self.origins.forget(&id);
                return;
            }
        };
        // A handed-over payload stays held while the delivery waits (for its time or for room
        // at its endpoint), until its attempt starts.
        if let Some(at) = delivery.next_attempt_at_ms.filter(|at| *at > now) {
            self.queue.insert(id, at);
            return;
        }
        // Behind an earlier pending one of its key: set aside until the fold wakes it (`order`).
        if !self.order_allows(&delivery, now) {
            return;
        }
        let target = Park::of(&delivery);
        let due =
            Due { next_attempt_at_ms: delivery.next_attempt_at_ms.unwrap_or(now), delivery_id: delivery.id };
        // Held for its endpoint's pause or rate limit (`throttle`).
        let Some(limits) = self.throttle_admit(&delivery, due, now) else { return };
        // Parked, or dropped to be read back once the target has room (`Slots::free`).
        if self.slots.admit(&target, due, limits.max_in_flight) != Admission::Start {
            return;
        }
        if let Some(endpoint) = delivery.endpoint_id {
            self.throttle.started(endpoint, &id, now);
        }
        let payload = self.payloads.take(&id);
        self.start(delivery, now, payload, target, limits.settings);
    }

    fn start(
        &mut self,
        delivery: Delivery,
        now: u64,
        payload: Option<Bytes>,
        target: Park,
        settings: Arc<DeliverySettings>,
    ) {
        self.ctx.shared.started.fetch_add(1, Ordering::Relaxed);
        let ctx = self.ctx.clone();
        let d = delivery.clone();
        let settled = Arc::new(AtomicBool::new(false));
        let settled_by_task = settled.clone();
        let origin = self.origins.get(delivery.id.as_bytes());
        let abort = self.tasks.spawn(async move {
            attempt::attempt(ctx, d, (payload, origin), settings, settled_by_task).await
        });
        self.in_flight.insert(
            *delivery.id.as_bytes(),
            InFlight { target: Some(target), answered: false, settled, abort, delivery, started_at_ms: now },
        );
    }

    /// An attempt's record is durable (or failed to be).
    fn finish(&mut self, f: Finished) {
        let Some(flight) = self.in_flight.remove(&f.id) else { return };
        if flight.answered {
            self.answered -= 1;
        }
        match f.result {
            Ok(Some(retry_at)) => {
                self.queue.insert(f.id, retry_at);
            }
            // No retry: its attempts are over (delivered, or no longer pending).
            Ok(None) => self.origins.forget(&f.id),
            Err(not_recorded) => {
                if matches!(not_recorded, NotRecorded::Store) {
                    self.ctx.shared.unrecorded.fetch_add(1, Ordering::Relaxed);
                }
                self.queue.insert(f.id, self.ctx.clock.now_ms().saturating_add(RECORD_RETRY_MS));
            }
        }
        if self.recheck.remove(&f.id) {
            self.recheck_after(f.id);
        }
        if let Some(target) = flight.target {
            self.free_slot(target);
        }
    }

    /// A delivery popped while its attempt was in flight: queued again if it is still due.
    fn recheck_after(&mut self, id: Id) {
        match CheckedTables::run(self.ctx.store.as_ref(), |t| get_delivery(t, DeliveryId::from_bytes(id))) {
            // Unknown whether it is due again: looked at again shortly (`consider` reads it).
            Err(_) => {
                self.queue.insert(id, self.ctx.clock.now_ms().saturating_add(RECORD_RETRY_MS));
            }
            Ok(Ok(Some(d))) => {
                if let (DeliveryStatus::Pending, Some(at)) = (d.status, d.next_attempt_at_ms) {
                    self.queue.insert(id, at);
                }
            }
            Ok(_) => {}
        }
    }

    /// The receiver answered: the attempt's endpoint slot and its place in the total bound are free
    /// while its outcome is recorded (it then counts against `max_awaiting_record`).
    fn release(&mut self, id: Id) {
        let Some(flight) = self.in_flight.get_mut(&id) else { return };
        if !flight.answered {
            flight.answered = true;
            self.answered += 1;
        }
        if let Some(target) = flight.target.take() {
            self.free_slot(target);
        }
    }

    /// An attempt to `target` no longer holds its slot: the next delivery parked behind it goes
    /// back to the queue, or what overflowed is read back.
    fn free_slot(&mut self, target: Park) {
        let freed = self.slots.free(target);
        self.requeue(freed);
    }

    /// Does what a freed slot calls for: the next parked delivery back into the queue, then what
    /// overflowed read back (an endpoint's pending index on the next turn, or the due index from
    /// the earliest time dropped).
    fn requeue(&mut self, freed: Freed) {
        if let Some(due) = freed.unparked {
            self.queue.insert(*due.delivery_id.as_bytes(), due.next_attempt_at_ms);
        }
        match freed.read_back {
            None => {}
            Some(ReadBack::Endpoint(endpoint)) => self.endpoint_refills.push(endpoint),
            Some(ReadBack::DueFrom(from)) => self.queue.note_incomplete_from(from),
        }
    }

    fn publish_stats(&self) {
        self.check();
        let mut s = lock(&self.ctx.shared.stats);
        s.queued = self.queue.len() as u64;
        s.oldest_due_ms = self.queue.oldest_due_ms();
        s.in_flight = self.in_flight.len() as u64;
        s.parked = self.slots.parked_len() as u64;
        s.throttled = self.throttle.held_len() as u64;
        s.throttle_wake_ms = self.throttle.next_wake_ms();
        s.refills = self.refills;
        s.refill_pending = self.queue.needs_refill() || self.full_refill;
        s.refill_from_ms = self.queue.refill_from_ms();
        s.generation = self.generation;
    }

    /// Checks, in debug builds, that the books agree with the attempts in flight: each attempt
    /// that holds a slot is counted once, and so is each answered one.
    fn check(&self) {
        if cfg!(debug_assertions) {
            self.slots.check();
            self.throttle.check();
            let holding = self.in_flight.values().filter(|f| f.target.is_some()).count();
            debug_assert_eq!(self.slots.held_total(), holding, "slots held and attempts holding one");
            let answered = self.in_flight.values().filter(|f| f.answered).count();
            debug_assert_eq!(self.answered, answered, "answered attempts");
        }
    }
}
