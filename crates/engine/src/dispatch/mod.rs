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

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use herald_log::{Log, Store};
use herald_projector::{
    due_deliveries, event_payload, get_delivery, get_endpoint, get_event, list_deliveries, org_secret,
    CheckedTables, CompactError, Corrupt, Delivery, DeliveryId, DeliveryIndex, DeliveryQuery, DeliveryStatus,
    Due, EndpointId,
};
use tokio::sync::Notify;
use tokio::task::JoinSet;

use crate::clock::Clock;
use crate::commands::{Actor, Command, Commands, DueHint, Reply, Submitted};
use crate::config::DeliveryConfig;
use crate::due::DueQueue;
use crate::sender::{AttemptOutcome, AttemptRequest, Sender};
use crate::signing::{sign, Secret};

/// Hints waiting for the loop, at most; beyond it they are dropped and the queue is refilled
/// from the stored index.
const INBOX_HINTS_MAX: usize = 65_536;
/// Payload bytes held for deliveries about to be attempted, at most (counted once per delivery,
/// although the deliveries of one event share them); beyond it an attempt reads its payload
/// from the store.
const HANDED_PAYLOAD_BYTES_MAX: usize = 16 << 20;
/// Due index entries read per page while refilling.
const REFILL_PAGE_LEN: usize = 1_000;
/// The loop looks at the clock at least this often, so a wall clock that jumps is noticed.
const TICK_MAX_MS: u64 = 1_000;
/// After a failure to record an attempt (the store refused), the delivery is tried again this much
/// later (it is still pending in the store).
const RECORD_RETRY_MS: u64 = 1_000;
/// The error recorded for an attempt cut short by a stop.
pub const INTERRUPTED_ERROR: &str = "interrupted: herald stopped before the receiver answered";

type Id = [u8; 16];

/// What the writer thread hands to the loop. Callbacks only push here: the loop does the work.
#[derive(Default)]
pub(crate) struct Inbox {
    state: Mutex<InboxState>,
    wake: Notify,
}

#[derive(Default)]
struct InboxState {
    hints: Vec<DueHint>,
    /// Payload bytes the hints hold; past [`HANDED_PAYLOAD_BYTES_MAX`] further hints come
    /// without theirs (their attempts read it from the store), so a stalled loop does not
    /// hold a burst's payloads.
    hint_payload_bytes: usize,
    /// Attempts whose receiver has answered (their outcome is being recorded): their endpoint's
    /// slot is free for the next attempt.
    released: Vec<Id>,
    /// Hints were dropped: the loop must refill from the whole index.
    overflowed: bool,
    finished: Vec<Finished>,
}

struct Finished {
    id: Id,
    /// `Ok(Some(t))`: pending again at `t`; `Ok(None)`: no automatic retry; `Err`: not recorded.
    result: Result<Option<u64>, String>,
}

impl Inbox {
    /// Called by the command machine after each durable batch (`None`: after a failed one).
    pub(crate) fn hints(&self, due: Option<Vec<DueHint>>) {
        let mut st = lock(&self.state);
        let Some(due) = due else {
            st.overflowed = true;
            drop(st);
            self.wake.notify_one();
            return;
        };
        if st.hints.len() + due.len() > INBOX_HINTS_MAX {
            st.overflowed = true;
        } else {
            for mut hint in due {
                if let Some(payload) = &hint.payload {
                    if st.hint_payload_bytes + payload.len() > HANDED_PAYLOAD_BYTES_MAX {
                        hint.payload = None;
                    } else {
                        st.hint_payload_bytes += payload.len();
                    }
                }
                st.hints.push(hint);
            }
        }
        drop(st);
        self.wake.notify_one();
    }

    fn released(&self, id: Id) {
        lock(&self.state).released.push(id);
        self.wake.notify_one();
    }

    fn finished(&self, f: Finished) {
        lock(&self.state).finished.push(f);
        self.wake.notify_one();
    }

    fn take(&self) -> InboxState {
        std::mem::take(&mut *lock(&self.state))
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

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
    pub attempts_started: u64,
    pub attempts_delivered: u64,
    pub attempts_failed: u64,
    /// Attempts whose outcome could not be recorded (they are made again).
    pub attempts_unrecorded: u64,
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
    stopping: AtomicBool,
    /// When the stop must be over (set by [`Shared::stop_by`]); the drain keeps to it.
    stop_deadline: Mutex<Option<std::time::Instant>>,
    stats: Mutex<DispatchStats>,
    started: AtomicU64,
    delivered: AtomicU64,
    failed: AtomicU64,
    unrecorded: AtomicU64,
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
        }
    }

    pub(crate) fn stats(&self) -> DispatchStats {
        let mut s = *lock(&self.stats);
        s.attempts_started = self.started.load(Ordering::Relaxed);
        s.attempts_delivered = self.delivered.load(Ordering::Relaxed);
        s.attempts_failed = self.failed.load(Ordering::Relaxed);
        s.attempts_unrecorded = self.unrecorded.load(Ordering::Relaxed);
        s
    }

    /// Asks the loop to look at the clock and its inbox now.
    pub(crate) fn wake(&self) {
        self.inbox.wake.notify_one();
    }

    pub(crate) fn inbox_is_empty(&self) -> bool {
        let st = lock(&self.inbox.state);
        st.hints.is_empty() && st.finished.is_empty() && st.released.is_empty() && !st.overflowed
    }

    pub(crate) fn stop(&self) {
        self.stopping.store(true, Ordering::SeqCst);
        self.inbox.wake.notify_one();
    }

    /// The stop, to be over by `deadline` (without one, the shutdown timeout from when the loop
    /// sees the stop).
    pub(crate) fn stop_by(&self, deadline: std::time::Instant) {
        lock(&self.stop_deadline).get_or_insert(deadline);
        self.stop();
    }
}

/// How a stop went.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct StopReport {
    /// Attempts that finished (and were recorded) during the stop.
    pub finished: u64,
    /// Attempts cut short by the timeout and recorded as interrupted (durably, before the stop
    /// returned).
    pub interrupted: u64,
    /// Attempts cut short whose record was refused or not durable in time: they are still
    /// pending in the store and are made again after the restart.
    pub unrecorded: u64,
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

/// What a parked delivery waits behind.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum Park {
    Endpoint(EndpointId),
    Origin(String),
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
    /// Attempts in flight to each endpoint, and to each origin of inline deliveries (which have
    /// no endpoint), until their receiver answers: each bounded by `max_in_flight_per_endpoint`.
    in_flight_to: HashMap<Park, usize>,
    /// Deliveries parked behind a busy endpoint or origin, in the order they came due.
    parked: HashMap<Park, VecDeque<Due>>,
    /// Every parked id, so a refill or a hint that brings one back does not park it twice.
    parked_ids: HashSet<Id>,
    /// Parked entries moved back to the queue when a slot freed, with where they were parked:
    /// if one is then not attempted (already delivered, in flight, gone), the next one moves,
    /// so the freed slot is not left unused while others wait.
    unparked: HashMap<Id, Park>,
    parked_len: usize,
    /// Endpoints and origins whose parked list overflowed, with the earliest due time dropped.
    /// Once they have room again, what was dropped is read back: an endpoint's pending index,
    /// or for an origin (no index of its own) the due index from that time.
    overflowed: HashMap<Park, u64>,
    /// Endpoints to refill from their pending index on the next turn.
    endpoint_refills: Vec<EndpointId>,
    /// Popped while an attempt of theirs was in flight: looked at again when it finishes.
    recheck: HashSet<Id>,
    /// Payloads handed over with new deliveries' hints, until their first attempt starts (an
    /// event never changes, so these save reading it back); bounded by
    /// [`HANDED_PAYLOAD_BYTES_MAX`].
    payloads: HashMap<Id, Bytes>,
    payload_bytes: usize,
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
            cfg,
            in_flight: HashMap::new(),
            answered: 0,
            in_flight_to: HashMap::new(),
            parked: HashMap::new(),
            parked_ids: HashSet::new(),
            unparked: HashMap::new(),
            parked_len: 0,
            overflowed: HashMap::new(),
            endpoint_refills: Vec::new(),
            recheck: HashSet::new(),
            payloads: HashMap::new(),
            payload_bytes: 0,
            full_refill: true,
            tasks: JoinSet::new(),
            refills: 0,
            generation: 0,
        }
    }

    /// Deliveries parked behind busy endpoints, at most, all endpoints together: as many as the
    /// due queue holds, since a parked entry is a due entry taken out of the queue. A hot
    /// endpoint's backlog then waits here instead of being dropped and read back from the store
    /// over and over (each read is a sled get and a decode).
    fn parked_total_max(&self) -> usize {
        self.cfg.due_queue_capacity.max(self.cfg.max_in_flight_per_endpoint * 4).max(64)
    }

    /// Pending deliveries loaded at once for an endpoint whose backlog overflowed.
    fn endpoint_refill_max(&self) -> usize {
        (self.cfg.max_in_flight_per_endpoint * 16).max(256)
    }

    /// The loop: runs until a stop is asked, then drains what is in flight (bounded by the
    /// shutdown timeout) and records the rest as interrupted.
    pub(crate) async fn run(mut self) -> StopReport {
        let shared = self.ctx.shared.clone();
        loop {
            let notified = shared.inbox.wake.notified();
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
        for id in inbox.released {
            self.release(id);
        }
        for f in inbox.finished {
            self.finish(f);
        }
        if inbox.overflowed {
            self.full_refill = true;
        }
        for DueHint { due, payload } in inbox.hints {
            let id = *due.delivery_id.as_bytes();
            // The queue keeps the earliest; it remembers that it must refill. A parked one is
            // looked at when it is moved back.
            if !self.parked_ids.contains(&id) {
                let _ = self.queue.insert(id, due.next_attempt_at_ms);
            }
            if let Some(payload) = payload {
                self.hold_payload(id, payload);
            }
        }
        let now = self.ctx.clock.now_ms();
        if self.full_refill {
            self.full_refill = false;
            self.refill(None);
        } else if self.refill_due(now) {
            let from = self.queue.refill_from_ms();
            self.queue.clear_refill();
            self.refill(from);
        }
        for endpoint in std::mem::take(&mut self.endpoint_refills) {
            self.refill_endpoint(endpoint);
        }
        let held_max = self.cfg.max_in_flight_total.saturating_add(self.cfg.max_awaiting_record);
        loop {
            let sending = self.in_flight.len().saturating_sub(self.answered);
            let room = (self.cfg.max_in_flight_total.saturating_sub(sending))
                .min(held_max.saturating_sub(self.in_flight.len()));
            if room == 0 {
                break;
            }
            let ids = self.queue.pop_due(now, room.min(256));
            if ids.is_empty() {
                break;
            }
            for id in ids {
                let unparked = self.unparked.remove(&id);
                self.consider(id, now);
                if let Some(park) = unparked {
                    if !self.in_flight.contains_key(&id) && !self.parked_ids.contains(&id) {
                        self.unpark_next(&park);
                    }
                }
            }
        }
        self.queue.next_due_ms()
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
        // or may be due now while nothing queued is.
        from < next_due || (from <= now && next_due > now)
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
                if self.in_flight.contains_key(id) || self.parked_ids.contains(id) {
                    continue;
                }
                if self.queue.insert(*due.delivery_id.as_bytes(), due.next_attempt_at_ms).dropped() {
                    // The entries after this one in the index were not read: the queue is
                    // complete only before this entry's time (not before the evicted one's).
                    self.queue.note_incomplete_from(due.next_attempt_at_ms);
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
                if self.in_flight.contains_key(d.id.as_bytes()) || self.parked_ids.contains(d.id.as_bytes()) {
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
                    self.overflowed.entry(Park::Endpoint(endpoint)).or_insert(0);
                    return;
                }
                None => return,
            }
        }
    }

    /// A queued delivery whose time has come: attempt it, park it, or let it go.
    fn consider(&mut self, id: Id, now: u64) {
        if self.in_flight.contains_key(&id) {
            self.recheck.insert(id);
            return;
        }
        if self.parked_ids.contains(&id) {
            return; // already waiting for room behind its endpoint or origin
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
                self.take_payload(&id);
                return;
            }
        };
        // A handed-over payload stays held while the delivery waits (for its time or for room
        // at its endpoint), until its attempt starts.
        if let Some(at) = delivery.next_attempt_at_ms.filter(|at| *at > now) {
            self.queue.insert(id, at);
            return;
        }
        let target = match delivery.endpoint_id {
            Some(endpoint) => Park::Endpoint(endpoint),
            None => Park::Origin(origin_of(&delivery.url)),
        };
        if self.in_flight_to.get(&target).copied().unwrap_or(0) >= self.cfg.max_in_flight_per_endpoint {
            let due = delivery.next_attempt_at_ms.unwrap_or(now);
            if self.parked_len < self.parked_total_max() {
                self.parked
                    .entry(target)
                    .or_default()
                    .push_back(Due { next_attempt_at_ms: due, delivery_id: delivery.id });
                self.parked_len += 1;
                self.parked_ids.insert(id);
            } else {
                // Dropped: read back once the target has room (`unpark_next`, `free_slot`).
                let earliest = self.overflowed.entry(target).or_insert(due);
                *earliest = (*earliest).min(due);
            }
            return;
        }
        *self.in_flight_to.entry(target.clone()).or_default() += 1;
        let payload = self.take_payload(&id);
        self.start(delivery, now, payload, target);
    }

    /// Keeps a handed-over payload for `id`'s first attempt. When there is no room, the ones held
    /// are let go (their attempts read the store instead): that also clears any held for a
    /// delivery that is never looked at (one deleted while its entry was out of the queue).
    fn hold_payload(&mut self, id: Id, payload: Bytes) {
        if payload.len() > HANDED_PAYLOAD_BYTES_MAX {
            return;
        }
        if self.payload_bytes + payload.len() > HANDED_PAYLOAD_BYTES_MAX {
            self.payloads.clear();
            self.payload_bytes = 0;
        }
        self.payload_bytes += payload.len();
        if let Some(old) = self.payloads.insert(id, payload) {
            self.payload_bytes -= old.len();
        }
    }

    fn take_payload(&mut self, id: &Id) -> Option<Bytes> {
        let payload = self.payloads.remove(id)?;
        self.payload_bytes -= payload.len();
        Some(payload)
    }

    fn start(&mut self, delivery: Delivery, now: u64, payload: Option<Bytes>, target: Park) {
        self.ctx.shared.started.fetch_add(1, Ordering::Relaxed);
        let ctx = self.ctx.clone();
        let d = delivery.clone();
        let settled = Arc::new(AtomicBool::new(false));
        let settled_by_task = settled.clone();
        let abort = self.tasks.spawn(async move { attempt(ctx, d, payload, settled_by_task).await });
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
            Ok(None) => {}
            Err(_) => {
                self.ctx.shared.unrecorded.fetch_add(1, Ordering::Relaxed);
                self.queue.insert(f.id, self.ctx.clock.now_ms().saturating_add(RECORD_RETRY_MS));
            }
        }
        if self.recheck.remove(&f.id) {
            match CheckedTables::run(self.ctx.store.as_ref(), |t| {
                get_delivery(t, DeliveryId::from_bytes(f.id))
            }) {
                // Unknown whether it is due again: looked at again shortly (`consider` reads it).
                Err(_) => {
                    self.queue.insert(f.id, self.ctx.clock.now_ms().saturating_add(RECORD_RETRY_MS));
                }
                Ok(Ok(Some(d))) => {
                    if let (DeliveryStatus::Pending, Some(at)) = (d.status, d.next_attempt_at_ms) {
                        self.queue.insert(f.id, at);
                    }
                }
                Ok(_) => {}
            }
        }
        if let Some(target) = flight.target {
            self.free_slot(target);
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
        if let Some(n) = self.in_flight_to.get_mut(&target) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.in_flight_to.remove(&target);
            }
        }
        if self.parked.contains_key(&target) {
            self.unpark_next(&target);
        } else {
            self.read_back_overflow(&target);
        }
    }

    /// Moves the next delivery parked behind `park` back to the queue; when the list empties,
    /// what overflowed it is read back.
    fn unpark_next(&mut self, park: &Park) {
        let Some(list) = self.parked.get_mut(park) else { return };
        let next = list.pop_front();
        let drained = list.is_empty();
        if let Some(due) = next {
            let id = *due.delivery_id.as_bytes();
            self.parked_len -= 1;
            self.parked_ids.remove(&id);
            // An entry the queue evicts is never popped: bounded, at the cost of a chain link.
            if self.unparked.len() >= self.parked_total_max() {
                self.unparked.clear();
            }
            self.unparked.insert(id, park.clone());
            self.queue.insert(id, due.next_attempt_at_ms);
        }
        if drained {
            self.parked.remove(park);
            self.read_back_overflow(park);
        }
    }

    /// What was dropped behind `park` when the parked bound was reached: an endpoint's pending
    /// index is loaded; an origin has none, so the due index is reloaded from the earliest time.
    fn read_back_overflow(&mut self, park: &Park) {
        match (park, self.overflowed.remove(park)) {
            (_, None) => {}
            (Park::Endpoint(endpoint), Some(_)) => self.endpoint_refills.push(*endpoint),
            (Park::Origin(_), Some(from)) => self.queue.note_incomplete_from(from),
        }
    }

    fn publish_stats(&self) {
        let mut s = lock(&self.ctx.shared.stats);
        s.queued = self.queue.len() as u64;
        s.oldest_due_ms = self.queue.oldest_due_ms();
        s.in_flight = self.in_flight.len() as u64;
        s.parked = self.parked_len as u64;
        s.refills = self.refills;
        s.refill_pending = self.queue.needs_refill() || self.full_refill;
        s.refill_from_ms = self.queue.refill_from_ms();
        s.generation = self.generation;
    }

    /// The stop: no new attempts; wait for those in flight, then record the rest as interrupted,
    /// all within the shutdown timeout (the last [`record_reserve`] of it is kept for the
    /// records). An attempt its task has settled is left to it: it is recorded with its outcome,
    /// or, if its record is lost, attempted again after the restart.
    async fn drain(mut self) -> StopReport {
        let mut report = StopReport::default();
        let timeout = self.cfg.shutdown_timeout;
        let set_deadline = *lock(&self.ctx.shared.stop_deadline);
        let deadline = match set_deadline {
            Some(at) => tokio::time::Instant::from_std(at),
            None => tokio::time::Instant::now() + timeout,
        };
        let reserve = record_reserve(timeout);
        let wait_until = deadline - reserve;
        // The report must reach `Engine::shutdown` by the deadline: the records get the reserve
        // but its last quarter, which is left for the aborts and the report.
        let records_until = deadline - reserve / 4;
        let shared = self.ctx.shared.clone();
        loop {
            let notified = shared.inbox.wake.notified();
            self.take_finished(&mut report);
            if self.in_flight.is_empty() {
                break;
            }
            tokio::select! {
                _ = notified => {}
                _ = tokio::time::sleep_until(wait_until) => break,
            }
        }
        // Whatever finished in the meantime is recorded already; the rest is cut short.
        self.take_finished(&mut report);
        let now = self.ctx.clock.now_ms();
        self.answered = 0;
        let (recorded_tx, mut recorded) = tokio::sync::mpsc::unbounded_channel();
        let mut submitted = 0u64;
        for (_, flight) in self.in_flight.drain() {
            if flight.settled.swap(true, Ordering::SeqCst) {
                continue;
            }
            flight.abort.abort();
            let command = Command::RecordAttempt {
                delivery_id: flight.delivery.id,
                started_at_ms: flight.started_at_ms,
                finished_at_ms: now.max(flight.started_at_ms),
                outcome: herald_projector::AttemptOutcome::Interrupted { error: INTERRUPTED_ERROR.into() },
                response_excerpt: Vec::new(),
                retry_after_ms: None,
            };
            let recorded_tx = recorded_tx.clone();
            // All in the urgent queue at once: they share the writer's batches and flushes. Never
            // blocking: with both queues full the record is refused (the delivery stays pending).
            self.ctx.log.try_submit_urgent_with(
                Submitted { actor: Actor::admin(), at_ms: now, command },
                move |out| {
                    let _ = recorded_tx.send(matches!(out, Ok(Ok(_))));
                },
            );
            submitted += 1;
        }
        drop(recorded_tx);
        let _ = tokio::time::timeout_at(records_until, async {
            while let Some(ok) = recorded.recv().await {
                report.interrupted += u64::from(ok);
            }
        })
        .await;
        report.unrecorded = submitted - report.interrupted;
        self.tasks.abort_all();
        while self.tasks.join_next().await.is_some() {}
        report
    }

    /// Takes in the inbox during the stop: answered attempts free their slots, recorded ones end.
    fn take_finished(&mut self, report: &mut StopReport) {
        let inbox = self.ctx.shared.inbox.take();
        for id in inbox.released {
            self.release(id);
        }
        for f in inbox.finished {
            if self.in_flight.contains_key(&f.id) {
                report.finished += 1;
            }
            self.finish(f);
        }
    }
}

/// Where an inline delivery's requests go, for its in-flight bound: `scheme://host:port` (the
/// port explicit or the scheme's), or the url itself if it does not parse (its attempt fails).
fn origin_of(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(u) => format!(
            "{}://{}:{}",
            u.scheme(),
            u.host_str().unwrap_or_default().to_ascii_lowercase(),
            u.port_or_known_default().unwrap_or(0)
        ),
        Err(_) => url.to_owned(),
    }
}

/// The part of the shutdown timeout kept for recording the attempts cut short: a quarter of it,
/// at most 1 s.
fn record_reserve(timeout: Duration) -> Duration {
    (timeout / 4).min(Duration::from_secs(1))
}

/// One attempt: build the signed request, send it, record the outcome, tell the loop.
async fn attempt(ctx: Ctx, delivery: Delivery, payload: Option<Bytes>, settled: Arc<AtomicBool>) {
    let started_at_ms = ctx.clock.now_ms();
    let id = *delivery.id.as_bytes();
    let outcome = match request(&ctx, &delivery, started_at_ms, payload) {
        Ok(req) => ctx.sender.send(req).await,
        Err(RequestError::Invalid(error)) => {
            AttemptOutcome::Failed { kind: crate::sender::FailureKind::InvalidHeader, error }
        }
        Err(RequestError::StoreRead(error)) => {
            // Nothing is known to be wrong with the delivery, the endpoint or the receiver: not
            // sent, not recorded (it would count against the endpoint's health), and made again
            // shortly, like an attempt whose record failed.
            if !settled.swap(true, Ordering::SeqCst) {
                ctx.shared.inbox.released(id);
                ctx.shared.inbox.finished(Finished { id, result: Err(error) });
            }
            return;
        }
    };
    if settled.swap(true, Ordering::SeqCst) {
        return; // the stop cut it short and records it as interrupted
    }
    let finished_at_ms = ctx.clock.now_ms().max(started_at_ms);
    ctx.shared.inbox.released(id);
    let (outcome, excerpt, retry_after_ms) = match outcome {
        AttemptOutcome::Response { status, excerpt, retry_after_ms } if (200..300).contains(&status) => {
            ctx.shared.delivered.fetch_add(1, Ordering::Relaxed);
            (herald_projector::AttemptOutcome::Delivered { status }, excerpt, retry_after_ms)
        }
        AttemptOutcome::Response { status, excerpt, retry_after_ms } => {
            ctx.shared.failed.fetch_add(1, Ordering::Relaxed);
            let error = format!("HTTP {status}");
            (
                herald_projector::AttemptOutcome::Failed { status: Some(status), error },
                excerpt,
                retry_after_ms,
            )
        }
        AttemptOutcome::Failed { error, .. } => {
            ctx.shared.failed.fetch_add(1, Ordering::Relaxed);
            (herald_projector::AttemptOutcome::Failed { status: None, error }, Vec::new(), None)
        }
    };
    let command = Command::RecordAttempt {
        delivery_id: delivery.id,
        started_at_ms,
        finished_at_ms,
        outcome,
        response_excerpt: excerpt,
        retry_after_ms,
    };
    let inbox = ctx.shared.inbox.clone();
    let submitted = Submitted { actor: Actor::admin(), at_ms: finished_at_ms, command };
    let done = move |out: herald_log::Outcome<Commands>| {
        let result = match out {
            Ok(Ok(Reply::Attempted { retry_at_ms })) => Ok(retry_at_ms),
            Ok(Ok(other)) => Err(format!("unexpected reply {other:?}")),
            Ok(Err(e)) => Err(e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        inbox.finished(Finished { id, result });
    };
    if ctx.log.urgent_submit_would_block() {
        // Both writer queues are full: wait for room on a blocking thread, not a runtime worker.
        let log = ctx.log.clone();
        drop(tokio::task::spawn_blocking(move || log.submit_urgent_with(submitted, done)));
    } else {
        ctx.log.submit_urgent_with(submitted, done);
    }
}

/// Why an attempt's request could not be made.
enum RequestError {
    /// The delivery cannot be sent as it stands (a missing endpoint, a bad secret): recorded as
    /// a failed attempt.
    Invalid(String),
    /// The store failed a read: not the delivery's fault, so not recorded.
    StoreRead(String),
}

impl From<String> for RequestError {
    fn from(e: String) -> Self {
        RequestError::Invalid(e)
    }
}

/// `query` over the store: a read the store failed is a `StoreRead`, never taken for "missing".
fn read<T>(
    ctx: &Ctx,
    query: impl FnOnce(&CheckedTables<'_>) -> Result<T, Corrupt>,
) -> Result<T, RequestError> {
    match CheckedTables::run(ctx.store.as_ref(), query) {
        Ok(answer) => answer.map_err(|e| RequestError::Invalid(e.to_string())),
        Err(e) => Err(RequestError::StoreRead(e.to_string())),
    }
}

/// The signed request of one attempt: the payload as published (`payload`, when it was handed
/// over with the delivery, or read from the store), to the endpoint's current url, signed with
/// every secret valid now. The sender adds `user-agent`.
fn request(
    ctx: &Ctx,
    delivery: &Delivery,
    now_ms: u64,
    payload: Option<Bytes>,
) -> Result<AttemptRequest, RequestError> {
    let (url, secrets) = match delivery.endpoint_id {
        Some(id) => {
            let endpoint =
                read(ctx, |t| get_endpoint(t, id))?.ok_or_else(|| format!("endpoint {id} is missing"))?;
            let secrets = endpoint
                .secrets_valid_at(now_ms)
                .into_iter()
                .map(Secret::parse)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| format!("endpoint secret: {e}"))?;
            (endpoint.url, secrets)
        }
        None => {
            let secret = read(ctx, |t| org_secret(t, delivery.org_id))?
                .ok_or_else(|| format!("organisation {} has no default secret", delivery.org_id))?;
            (delivery.url.clone(), vec![Secret::parse(&secret).map_err(|e| format!("org secret: {e}"))?])
        }
    };
    let payload = match payload {
        Some(payload) => payload,
        None => {
            let event = read(ctx, |t| get_event(t, delivery.event_id))?
                .ok_or_else(|| format!("event {} is missing", delivery.event_id))?;
            match event_payload(ctx.store.as_ref(), &event) {
                Ok(payload) => Bytes::from(payload),
                Err(CompactError::Log(e)) => return Err(RequestError::StoreRead(e.to_string())),
                Err(e) => return Err(RequestError::Invalid(e.to_string())),
            }
        }
    };
    let msg_id = delivery.event_id.to_string();
    let timestamp_s = i64::try_from(now_ms / 1000).unwrap_or(i64::MAX);
    let secret_refs: Vec<&Secret> = secrets.iter().collect();
    let signature = sign(&secret_refs, &msg_id, timestamp_s, &payload);
    let headers = vec![
        ("content-type".to_owned(), "application/json".to_owned()),
        ("webhook-id".to_owned(), msg_id),
        ("webhook-timestamp".to_owned(), timestamp_s.to_string()),
        ("webhook-signature".to_owned(), signature),
        ("herald-delivery-id".to_owned(), delivery.id.to_string()),
        ("herald-event-type".to_owned(), delivery.event_type.clone()),
        ("herald-attempt".to_owned(), (delivery.attempt_count + 1).to_string()),
    ];
    Ok(AttemptRequest { url, headers, body: payload })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hint(n: u128, payload: Option<Bytes>) -> DueHint {
        DueHint {
            due: Due { next_attempt_at_ms: 0, delivery_id: DeliveryId(uuid::Uuid::from_u128(n)) },
            payload,
        }
    }

    /// The inbox holds at most `HANDED_PAYLOAD_BYTES_MAX` of payloads: hints past it come without
    /// theirs (their attempts read the store), and taking the hints frees the room.
    #[test]
    fn the_inbox_bounds_the_payloads_its_hints_hold() {
        let inbox = Inbox::default();
        let big = Bytes::from(vec![b'x'; HANDED_PAYLOAD_BYTES_MAX / 2]);
        inbox.hints(Some((0..3).map(|n| hint(n, Some(big.clone()))).collect()));
        inbox.hints(Some(vec![hint(3, None)]));
        let held: Vec<bool> = inbox.take().hints.iter().map(|h| h.payload.is_some()).collect();
        assert_eq!(held, [true, true, false, false]);
        inbox.hints(Some(vec![hint(4, Some(big))]));
        assert!(inbox.take().hints[0].payload.is_some(), "room again once taken");
    }
}
