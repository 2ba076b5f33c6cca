//! Per-endpoint throttling in the dispatcher: the endpoint's rate limit (a token bucket), the pause
//! a receiver asks for with `Retry-After`, the deliveries held back by either until they may go,
//! and the cache of endpoint delivery settings the loop applies (API.md "Endpoint delivery
//! settings").
//!
//! A held delivery waits here, still `pending` in the store: nothing is recorded and no step of
//! its schedule is used. Each endpoint with held deliveries has one wake time (its next token, or
//! the end of its pause); at that time as many deliveries as it has tokens go back to the due
//! queue, each at its stored due time (so the queue stays a cache of the stored due index). A
//! held delivery is thus read again about once per token, never once per turn. The held lists
//! are bounded in total: past the bound a delivery is dropped and the endpoint's pending index is
//! read back once its lists have drained, as `Slots` does for a busy endpoint.
//!
//! The pause lives in memory: a restart forgets it, and each paused delivery's own retry time,
//! recorded with its attempt, still holds.

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::Arc;

use herald_log::Store;
use herald_projector::{
    get_endpoint_settings, policy, CheckedTables, Delivery, DeliverySettings, Due, EndpointId,
};

use super::{Ctx, Dispatcher, Id, RECORD_RETRY_MS};
use crate::commands::EndpointChange;
use herald_projector::Trigger;

/// Thousandths of a token: a bucket's level is kept in these, so a rate of `r` a second gains
/// exactly `r` of them a millisecond.
const MILLI: u64 = 1_000;
/// Settings cached by the loop, at most, in bytes (an endpoint's headers may take 20 KiB); past it
/// the cache is emptied and filled again as attempts need it.
const SETTINGS_CACHE_BYTES_MAX: usize = 8 << 20;
/// The fixed cost counted for one cached entry besides its headers.
const SETTINGS_ENTRY_BYTES: usize = 96;
/// Endpoints paused at once, at most; past it a new pause is not kept (each delivery's own retry
/// time, recorded with its attempt, still holds).
const PAUSES_MAX: usize = 65_536;
/// How often buckets that are full again and pauses that are over are dropped.
const SWEEP_EVERY_MS: u64 = 1_000;

/// A token bucket: `rate_per_s` tokens a second, holding at most `rate_per_s` (the burst).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Bucket {
    rate_per_s: u32,
    level_milli: u64,
    at_ms: u64,
}

impl Bucket {
    /// A full bucket.
    pub(super) fn full(rate_per_s: u32, now_ms: u64) -> Bucket {
        let rate_per_s = rate_per_s.max(1);
        Bucket { rate_per_s, level_milli: u64::from(rate_per_s) * MILLI, at_ms: now_ms }
    }

    fn cap_milli(&self) -> u64 {
        u64::from(self.rate_per_s) * MILLI
    }

    /// Adds what the time since the last look brought. A clock that steps back brings nothing and
    /// counts from its new time.
    fn refill(&mut self, now_ms: u64) {
        let gained = now_ms.saturating_sub(self.at_ms).saturating_mul(u64::from(self.rate_per_s));
        self.level_milli = self.level_milli.saturating_add(gained).min(self.cap_milli());
        self.at_ms = now_ms;
    }

    /// A changed rate: the level is kept, within the new burst.
    fn set_rate(&mut self, rate_per_s: u32) {
        self.rate_per_s = rate_per_s.max(1);
        self.level_milli = self.level_milli.min(self.cap_milli());
    }

    /// Whole tokens held at `now_ms`.
    pub(super) fn tokens(&mut self, now_ms: u64) -> u64 {
        self.refill(now_ms);
        self.level_milli / MILLI
    }

    /// Takes one token (the caller saw one).
    pub(super) fn take(&mut self, now_ms: u64) {
        self.refill(now_ms);
        debug_assert!(self.level_milli >= MILLI, "a token taken from an empty bucket");
        self.level_milli = self.level_milli.saturating_sub(MILLI);
    }

    /// How long after `now_ms` (its last look) the bucket holds `n` whole tokens.
    pub(super) fn ms_until(&self, n: u64) -> u64 {
        let need = n.saturating_mul(MILLI);
        need.saturating_sub(self.level_milli).div_ceil(u64::from(self.rate_per_s))
    }

    fn is_full(&mut self, now_ms: u64) -> bool {
        self.refill(now_ms);
        self.level_milli >= self.cap_milli()
    }
}

/// What [`Throttle::admit`] did with a due delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Gate {
    /// Neither paused nor over the rate: it may start (it takes a token once it does).
    Go,
    /// Held until its endpoint's pause ends or a token is there.
    Held,
    /// Held lists full: dropped, and the endpoint's pending index is read back once its lists drain.
    Dropped,
}

/// Deliveries held for one endpoint, in the order they came.
#[derive(Debug, Default)]
struct Held {
    /// Automatic deliveries held while the endpoint is paused.
    paused: VecDeque<Due>,
    /// Deliveries held for a token.
    limited: VecDeque<Due>,
}

impl Held {
    fn is_empty(&self) -> bool {
        self.paused.is_empty() && self.limited.is_empty()
    }

    fn len(&self) -> usize {
        self.paused.len() + self.limited.len()
    }
}

/// The buckets, pauses and held deliveries of every endpoint.
///
/// Invariants (checked by `debug_assert!`): each held id is held once, behind one endpoint; at
/// most `held_max` are held; an endpoint with held deliveries, or whose lists overflowed, has
/// exactly one wake time; a held list is never kept empty.
pub(super) struct Throttle {
    buckets: HashMap<EndpointId, Bucket>,
    /// Until when each paused endpoint's automatic attempts wait.
    pauses: HashMap<EndpointId, u64>,
    held: HashMap<EndpointId, Held>,
    held_ids: HashSet<Id>,
    held_max: usize,
    /// Moved back to the queue with a token waiting for them: they go ahead of those still held.
    released: HashSet<Id>,
    /// When each endpoint with held deliveries (or an overflow) is looked at next.
    wakes: BTreeSet<(u64, EndpointId)>,
    wake_at: HashMap<EndpointId, u64>,
    /// Endpoints whose held lists overflowed: read back once they drain.
    overflowed: HashSet<EndpointId>,
    next_sweep_ms: u64,
}

/// What a release hands back to the loop: deliveries for the due queue, and endpoints whose
/// pending index must be read back (their held lists overflowed, and have drained).
#[derive(Debug, Default, PartialEq, Eq)]
#[must_use]
pub(super) struct Released {
    pub(super) dues: Vec<Due>,
    pub(super) read_back: Vec<EndpointId>,
}

impl Throttle {
    pub(super) fn new(held_max: usize) -> Throttle {
        Throttle {
            buckets: HashMap::new(),
            pauses: HashMap::new(),
            held: HashMap::new(),
            held_ids: HashSet::new(),
            held_max,
            released: HashSet::new(),
            wakes: BTreeSet::new(),
            wake_at: HashMap::new(),
            overflowed: HashSet::new(),
            next_sweep_ms: 0,
        }
    }

    pub(super) fn is_held(&self, id: &Id) -> bool {
        self.held_ids.contains(id)
    }

    /// Deliveries held, all endpoints together.
    pub(super) fn held_len(&self) -> usize {
        self.held_ids.len()
    }

    /// When the loop must next release something.
    pub(super) fn next_wake_ms(&self) -> Option<u64> {
        self.wakes.first().map(|(at, _)| *at)
    }

    fn paused_until(&self, endpoint: EndpointId, now_ms: u64) -> Option<u64> {
        self.pauses.get(&endpoint).copied().filter(|until| *until > now_ms)
    }

    /// A due delivery of `endpoint`, limited to `rate_per_s` (none: no limit); `manual` attempts
    /// (retrigger, redeliver) do not wait for a pause. The caller checked it is not held already.
    pub(super) fn admit(
        &mut self,
        endpoint: EndpointId,
        rate_per_s: Option<u32>,
        due: Due,
        manual: bool,
        now_ms: u64,
    ) -> Gate {
        let id = *due.delivery_id.as_bytes();
        // Kept until it starts: one let go and then parked behind the endpoint's in-flight bound
        // keeps its turn.
        let released = self.released.contains(&id);
        if !manual && self.paused_until(endpoint, now_ms).is_some() {
            return self.hold(endpoint, due, true, released, now_ms);
        }
        let Some(rate_per_s) = rate_per_s else {
            self.buckets.remove(&endpoint);
            return Gate::Go;
        };
        let bucket = self.buckets.entry(endpoint).or_insert_with(|| Bucket::full(rate_per_s, now_ms));
        bucket.set_rate(rate_per_s);
        let ahead = self.held.get(&endpoint).is_some_and(|h| !h.limited.is_empty());
        if (released || !ahead) && bucket.tokens(now_ms) >= 1 {
            return Gate::Go;
        }
        self.hold(endpoint, due, false, released, now_ms)
    }

    /// An attempt to `endpoint` that [`Throttle::admit`] let go has started: it takes a token.
    pub(super) fn started(&mut self, endpoint: EndpointId, id: &Id, now_ms: u64) {
        self.released.remove(id);
        if let Some(bucket) = self.buckets.get_mut(&endpoint) {
            bucket.take(now_ms);
        }
    }

    /// Holds `due` behind `endpoint`: in its paused list, or its rate-limited one (at the front if
    /// it had been released with a token another took).
    fn hold(&mut self, endpoint: EndpointId, due: Due, paused: bool, front: bool, now_ms: u64) -> Gate {
        if self.held_ids.len() >= self.held_max {
            self.overflowed.insert(endpoint);
            self.rewake(endpoint, now_ms, 0);
            return Gate::Dropped;
        }
        self.released.remove(due.delivery_id.as_bytes());
        let fresh = self.held_ids.insert(*due.delivery_id.as_bytes());
        debug_assert!(fresh, "a delivery is held at most once");
        let held = self.held.entry(endpoint).or_default();
        let list = if paused { &mut held.paused } else { &mut held.limited };
        if front {
            list.push_front(due);
        } else {
            list.push_back(due);
        }
        self.rewake(endpoint, now_ms, 0);
        Gate::Held
    }

    /// Sets when `endpoint` is looked at next, from what it holds: the end of its pause for its
    /// paused list, its next token beyond the `promised` ones (released, about to be taken) for
    /// its rate-limited one; none when it holds nothing.
    fn rewake(&mut self, endpoint: EndpointId, now_ms: u64, promised: u64) {
        if let Some(old) = self.wake_at.remove(&endpoint) {
            self.wakes.remove(&(old, endpoint));
        }
        let held = self.held.get(&endpoint);
        let pause_end = self.paused_until(endpoint, now_ms).unwrap_or(now_ms);
        let next_token = match self.buckets.get(&endpoint) {
            Some(bucket) => {
                let n = promised.saturating_add(1).min(u64::from(bucket.rate_per_s));
                now_ms.saturating_add(bucket.ms_until(n).max(1))
            }
            None => now_ms,
        };
        let mut at = None;
        if held.is_some_and(|h| !h.paused.is_empty()) {
            at = Some(pause_end);
        }
        if held.is_some_and(|h| !h.limited.is_empty()) {
            at = Some(at.map_or(next_token, |t: u64| t.min(next_token)));
        }
        if at.is_none() && self.overflowed.contains(&endpoint) {
            at = Some(pause_end.max(next_token));
        }
        if let Some(at) = at {
            self.wakes.insert((at, endpoint));
            self.wake_at.insert(endpoint, at);
        }
    }

    /// A receiver asked, with `Retry-After`, that no automatic attempt reach `endpoint` before
    /// `until_ms`. A later pause already in force is kept.
    pub(super) fn pause(&mut self, endpoint: EndpointId, until_ms: u64, now_ms: u64) {
        if until_ms <= now_ms {
            return;
        }
        if self.pauses.len() >= PAUSES_MAX && !self.pauses.contains_key(&endpoint) {
            self.pauses.retain(|_, until| *until > now_ms);
            if self.pauses.len() >= PAUSES_MAX {
                return;
            }
        }
        let until = self.pauses.entry(endpoint).or_insert(until_ms);
        *until = (*until).max(until_ms);
    }

    /// Moves back what may go at `now_ms`: a paused list whose pause is over, and as many of a
    /// rate-limited list as its bucket holds tokens.
    pub(super) fn release(&mut self, now_ms: u64) -> Released {
        let mut out = Released::default();
        while let Some(&(at, endpoint)) = self.wakes.first() {
            if at > now_ms {
                break;
            }
            self.wakes.pop_first();
            self.wake_at.remove(&endpoint);
            self.release_endpoint(endpoint, now_ms, &mut out);
        }
        out
    }

    fn release_endpoint(&mut self, endpoint: EndpointId, now_ms: u64, out: &mut Released) {
        let paused = self.paused_until(endpoint, now_ms).is_some();
        let tokens = match self.buckets.get_mut(&endpoint) {
            Some(bucket) => usize::try_from(bucket.tokens(now_ms)).unwrap_or(usize::MAX),
            None => usize::MAX,
        };
        let mut promised = 0;
        if let Some(held) = self.held.get_mut(&endpoint) {
            let moved_from = out.dues.len();
            if !paused {
                out.dues.extend(held.paused.drain(..));
            }
            let n = tokens.min(held.limited.len());
            promised = n as u64;
            for due in held.limited.drain(..n) {
                self.released.insert(*due.delivery_id.as_bytes());
                out.dues.push(due);
            }
            for due in &out.dues[moved_from..] {
                let was_held = self.held_ids.remove(due.delivery_id.as_bytes());
                debug_assert!(was_held, "a held list holds held ids only");
            }
            if held.is_empty() {
                self.held.remove(&endpoint);
            }
        }
        // Bounded like the held ones: one forgotten only goes behind those still held.
        if self.released.len() > self.held_max {
            self.released.clear();
        }
        if !self.held.contains_key(&endpoint) && self.overflowed.remove(&endpoint) {
            out.read_back.push(endpoint);
        }
        self.rewake(endpoint, now_ms, promised);
    }

    /// `endpoint`'s settings changed, or it was deleted: what it holds goes back to the queue to be
    /// judged again (a deleted endpoint's deliveries are no longer pending), and what overflowed
    /// is read back. A deleted endpoint's bucket and pause are dropped.
    pub(super) fn changed(&mut self, change: EndpointChange) -> Released {
        let endpoint = change.id;
        let mut out = Released::default();
        if let Some(old) = self.wake_at.remove(&endpoint) {
            self.wakes.remove(&(old, endpoint));
        }
        if let Some(held) = self.held.remove(&endpoint) {
            out.dues.extend(held.paused.into_iter().chain(held.limited));
            for due in &out.dues {
                self.held_ids.remove(due.delivery_id.as_bytes());
            }
        }
        if self.overflowed.remove(&endpoint) {
            out.read_back.push(endpoint);
        }
        if change.deleted {
            self.buckets.remove(&endpoint);
            self.pauses.remove(&endpoint);
        }
        out
    }

    /// Drops, at most once a second, what no longer says anything: buckets full again (a new one
    /// starts full) and pauses that are over.
    pub(super) fn sweep(&mut self, now_ms: u64) {
        if now_ms < self.next_sweep_ms {
            return;
        }
        self.next_sweep_ms = now_ms.saturating_add(SWEEP_EVERY_MS);
        let held = &self.held;
        self.buckets.retain(|endpoint, bucket| held.contains_key(endpoint) || !bucket.is_full(now_ms));
        self.pauses.retain(|_, until| *until > now_ms);
    }

    /// Per-endpoint state kept, for the tests' bound checks: buckets, pauses, held lists.
    #[cfg(test)]
    fn endpoints_kept(&self) -> (usize, usize, usize) {
        (self.buckets.len(), self.pauses.len(), self.held.len())
    }

    /// Checks every invariant, walking all endpoints.
    pub(super) fn check(&self) {
        debug_assert_eq!(self.held.values().map(Held::len).sum::<usize>(), self.held_ids.len(), "held ids");
        debug_assert!(self.held_ids.len() <= self.held_max, "held beyond the bound");
        debug_assert!(self.held.values().all(|h| !h.is_empty()), "an empty held list is kept");
        debug_assert_eq!(self.wakes.len(), self.wake_at.len(), "one wake per endpoint");
        debug_assert!(
            self.held.keys().chain(&self.overflowed).all(|e| self.wake_at.contains_key(e)),
            "an endpoint holding deliveries has a wake time"
        );
        debug_assert!(self.pauses.len() <= PAUSES_MAX, "pauses beyond the bound");
    }
}

/// The delivery settings of the endpoints the loop attempts, read once and kept until the
/// endpoint's settings change or it is deleted (the command machine says so: `EndpointChange`).
/// Bounded in bytes: past the bound it is emptied.
#[derive(Default)]
pub(super) struct SettingsCache {
    map: HashMap<EndpointId, Arc<DeliverySettings>>,
    bytes: usize,
    unset: Arc<DeliverySettings>,
}

impl SettingsCache {
    /// `endpoint`'s settings: from the cache, or read from the store (`Err`: the store failed).
    fn get(&mut self, store: &dyn Store, endpoint: EndpointId) -> Result<Arc<DeliverySettings>, ()> {
        if let Some(settings) = self.map.get(&endpoint) {
            return Ok(settings.clone());
        }
        let read = CheckedTables::run(store, |t| get_endpoint_settings(t, endpoint)).map_err(|_| ())?;
        // A damaged value: delivered as if no setting were there, rather than not at all.
        let settings = Arc::new(read.unwrap_or_default());
        let bytes =
            SETTINGS_ENTRY_BYTES + settings.headers.iter().map(|(n, v)| n.len() + v.len()).sum::<usize>();
        if self.bytes + bytes > SETTINGS_CACHE_BYTES_MAX {
            self.map.clear();
            self.bytes = 0;
        }
        self.bytes += bytes;
        self.map.insert(endpoint, settings.clone());
        Ok(settings)
    }

    fn forget(&mut self, endpoint: EndpointId) {
        if let Some(settings) = self.map.remove(&endpoint) {
            let bytes =
                SETTINGS_ENTRY_BYTES + settings.headers.iter().map(|(n, v)| n.len() + v.len()).sum::<usize>();
            self.bytes = self.bytes.saturating_sub(bytes);
        }
    }
}

/// What an attempt that may start is held to: its endpoint's in-flight bound and its extra headers.
pub(super) struct Limits {
    pub(super) max_in_flight: usize,
    pub(super) settings: Arc<DeliverySettings>,
}

impl Dispatcher {
    /// Whether `delivery` (due now) may start as far as its endpoint's pause and rate limit go, and
    /// what it is held to if so. `None`: held, dropped, or its settings could not be read (then
    /// looked at again shortly).
    pub(super) fn throttle_admit(&mut self, delivery: &Delivery, due: Due, now: u64) -> Option<Limits> {
        let configured = self.slots.per_target_max();
        let Some(endpoint) = delivery.endpoint_id else {
            return Some(Limits { max_in_flight: configured, settings: self.settings.unset.clone() });
        };
        let Ok(settings) = self.settings.get(self.ctx.store.as_ref(), endpoint) else {
            self.queue.insert(*delivery.id.as_bytes(), now.saturating_add(RECORD_RETRY_MS));
            return None;
        };
        let manual = delivery.next_trigger == Trigger::Manual;
        match self.throttle.admit(endpoint, settings.rate_limit_per_s, due, manual, now) {
            Gate::Go => {}
            Gate::Held | Gate::Dropped => return None,
        }
        let max_in_flight =
            settings.max_in_flight.map_or(configured, |n| usize::try_from(n).unwrap_or(configured));
        Some(Limits { max_in_flight: max_in_flight.max(1), settings })
    }

    /// Takes in what the attempt tasks and the command machine told: pauses asked by receivers,
    /// endpoints whose settings changed or that were deleted.
    pub(super) fn throttle_inbox(&mut self, pauses: Vec<(EndpointId, u64)>, changes: Vec<EndpointChange>) {
        let now = self.ctx.clock.now_ms();
        for (endpoint, until_ms) in pauses {
            self.throttle.pause(endpoint, until_ms, now);
        }
        for change in changes {
            self.settings.forget(change.id);
            let released = self.throttle.changed(change);
            self.requeue_released(released);
        }
    }

    /// Moves back to the queue what may go now, and drops what no longer says anything.
    pub(super) fn throttle_release(&mut self, now: u64) {
        self.throttle.sweep(now);
        let released = self.throttle.release(now);
        self.requeue_released(released);
    }

    fn requeue_released(&mut self, released: Released) {
        for due in released.dues {
            // At its stored due time: the queue stays a cache of the stored due index.
            let _ = self.queue.insert(*due.delivery_id.as_bytes(), due.next_attempt_at_ms);
        }
        self.endpoint_refills.extend(released.read_back);
    }
}

/// A receiver answered `delivery`'s attempt with 429 or 503 and `Retry-After` (`retry_after_ms`,
/// already clamped by the sender): its endpoint's automatic attempts wait until then, at most the
/// longest step of the schedule in force. If the store fails the policy's read, no pause (the
/// delivery's own retry time still honours the `Retry-After`).
pub(super) fn pause_endpoint(ctx: &Ctx, delivery: &Delivery, finished_at_ms: u64, retry_after_ms: u64) {
    let Some(endpoint) = delivery.endpoint_id else { return };
    let Ok(Ok(policy)) = CheckedTables::run(ctx.store.as_ref(), |t| policy(t)) else { return };
    let longest_ms = policy.retry_schedule_ms.iter().copied().max().unwrap_or(0);
    let pause_ms = retry_after_ms.min(longest_ms);
    if pause_ms > 0 {
        ctx.shared.inbox.paused(endpoint, finished_at_ms.saturating_add(pause_ms));
    }
}

#[cfg(test)]
mod tests {
    use herald_projector::DeliveryId;

    use super::*;

    const T0: u64 = 1_000_000;

    fn due(n: u128, at_ms: u64) -> Due {
        Due { next_attempt_at_ms: at_ms, delivery_id: DeliveryId(uuid::Uuid::from_u128(n)) }
    }

    fn endpoint(n: u128) -> EndpointId {
        EndpointId(uuid::Uuid::from_u128(n))
    }

    /// Admits `dues` for `e` at `now`, starting each that may go (it takes a token), checking the
    /// invariants after each; returns how many started.
    fn run(
        t: &mut Throttle,
        e: EndpointId,
        rate: Option<u32>,
        dues: &[Due],
        manual: bool,
        now: u64,
    ) -> usize {
        let mut started = 0;
        for d in dues {
            if t.admit(e, rate, *d, manual, now) == Gate::Go {
                t.started(e, d.delivery_id.as_bytes(), now);
                started += 1;
            }
            t.check();
        }
        started
    }

    /// Releases at each millisecond from `from` to `to`, admitting again what comes back (as the
    /// loop does), and returns the times at which attempts started.
    fn drive(t: &mut Throttle, e: EndpointId, rate: Option<u32>, from: u64, to: u64) -> Vec<u64> {
        let mut starts = Vec::new();
        for now in from..=to {
            let released = t.release(now);
            for d in released.dues {
                if t.admit(e, rate, d, false, now) == Gate::Go {
                    t.started(e, d.delivery_id.as_bytes(), now);
                    starts.push(now);
                }
            }
            t.check();
        }
        starts
    }

    #[test]
    fn a_bucket_holds_its_burst_and_refills_at_its_rate() {
        let mut b = Bucket::full(4, T0);
        assert_eq!(b.tokens(T0), 4);
        for _ in 0..4 {
            b.take(T0);
        }
        assert_eq!(b.tokens(T0), 0);
        assert_eq!(b.ms_until(1), 250, "one token every 250 ms at 4/s");
        assert_eq!(b.tokens(T0 + 249), 0);
        assert_eq!(b.tokens(T0 + 250), 1);
        assert_eq!(b.tokens(T0 + 10_000), 4, "never above the burst");
        b.set_rate(2);
        assert_eq!(b.tokens(T0 + 10_000), 2, "a lower rate clamps the level to its burst");
        assert_eq!(b.tokens(T0 + 5_000), 2, "a clock stepping back brings nothing");
        let mut fast = Bucket::full(10_000, T0);
        for _ in 0..10_000 {
            fast.take(T0);
        }
        assert_eq!(fast.ms_until(1), 1);
        assert_eq!(fast.tokens(T0 + 1), 10, "ten a millisecond at 10,000/s");
    }

    /// Over a simulated second and a half, a limit of 20/s lets the burst of 20 go at once, then
    /// one every 50 ms; held deliveries keep their order and each is looked at about once.
    #[test]
    fn a_rate_limit_lets_the_burst_go_then_one_per_token() {
        let mut t = Throttle::new(1_000);
        let e = endpoint(1);
        let dues: Vec<Due> = (0..100).map(|n| due(n, T0)).collect();
        assert_eq!(run(&mut t, e, Some(20), &dues, false, T0), 20, "the burst");
        assert_eq!(t.held_len(), 80);
        assert_eq!(t.next_wake_ms(), Some(T0 + 50));
        let starts = drive(&mut t, e, Some(20), T0 + 1, T0 + 1_000);
        assert_eq!(starts.len(), 20, "20 more in the next second");
        assert!(starts.iter().enumerate().all(|(n, at)| *at == T0 + 50 * (n as u64 + 1)), "{starts:?}");
        assert_eq!(t.held_len(), 60);
        // A delivery that comes due now waits behind those held, not ahead of them.
        assert_eq!(t.admit(e, Some(20), due(500, T0 + 1_000), false, T0 + 1_000), Gate::Held);
        let order: Vec<_> = t.held[&e].limited.iter().map(|d| d.delivery_id.0.as_u128()).collect();
        assert_eq!(order.first(), Some(&40));
        assert_eq!(order.last(), Some(&500));
    }

    /// A pause holds automatic attempts (not manual ones) until it ends, then all go back at once.
    #[test]
    fn a_pause_holds_automatic_attempts_until_it_ends() {
        let mut t = Throttle::new(1_000);
        let (e, other) = (endpoint(1), endpoint(2));
        t.pause(e, T0 + 2_000, T0);
        t.pause(e, T0 + 1_000, T0);
        assert_eq!(run(&mut t, e, None, &[due(1, T0), due(2, T0)], false, T0), 0, "held");
        assert_eq!(run(&mut t, e, None, &[due(3, T0)], true, T0), 1, "a manual attempt goes");
        assert_eq!(run(&mut t, other, None, &[due(4, T0)], false, T0), 1, "another endpoint goes");
        assert_eq!(t.next_wake_ms(), Some(T0 + 2_000), "the later pause is kept");
        assert_eq!(t.release(T0 + 1_999), Released::default());
        let back = t.release(T0 + 2_000);
        assert_eq!(back.dues, [due(1, T0), due(2, T0)]);
        assert_eq!(run(&mut t, e, None, &back.dues, false, T0 + 2_000), 2);
        t.sweep(T0 + 2_000);
        assert_eq!(t.endpoints_kept(), (0, 0, 0), "nothing kept once the pause is over");
    }

    /// A paused, rate-limited endpoint: held for the pause, then released at the rate.
    #[test]
    fn after_a_pause_a_rate_limited_endpoint_goes_at_its_rate() {
        let mut t = Throttle::new(1_000);
        let e = endpoint(1);
        t.pause(e, T0 + 100, T0);
        let dues: Vec<Due> = (0..30).map(|n| due(n, T0)).collect();
        assert_eq!(run(&mut t, e, Some(10), &dues, false, T0), 0);
        let starts = drive(&mut t, e, Some(10), T0 + 1, T0 + 1_100);
        assert_eq!(starts.iter().filter(|at| **at == T0 + 100).count(), 10, "the burst when the pause ends");
        assert_eq!(starts.len(), 20, "then 10 a second");
        assert!(starts.iter().all(|at| *at >= T0 + 100));
    }

    /// Past the bound deliveries are dropped; once the endpoint's lists drain its pending index is
    /// read back. A settings change sends what is held back to the queue; a deletion drops all.
    #[test]
    fn overflow_is_read_back_and_changes_release_what_is_held() {
        let mut t = Throttle::new(3);
        let e = endpoint(1);
        let dues: Vec<Due> = (0..6).map(|n| due(n, T0)).collect();
        assert_eq!(run(&mut t, e, Some(1), &dues, false, T0), 1);
        assert_eq!(t.held_len(), 3);
        let mut read_back = Vec::new();
        for now in [T0 + 1_000, T0 + 2_000, T0 + 3_000] {
            let released = t.release(now);
            assert_eq!(released.dues.len(), 1);
            assert_eq!(run(&mut t, e, Some(1), &released.dues, false, now), 1);
            read_back.extend(released.read_back);
        }
        assert_eq!(read_back, [e], "read back once drained");
        t.pause(e, T0 + 10_000, T0 + 3_000);
        run(&mut t, e, Some(1), &[due(7, T0), due(8, T0)], false, T0 + 3_000);
        assert_eq!(t.held_len(), 2);
        let back = t.changed(EndpointChange { id: e, deleted: false });
        assert_eq!(back.dues.len(), 2);
        assert_eq!((t.held_len(), t.next_wake_ms()), (0, None));
        assert_eq!(t.endpoints_kept(), (1, 1, 0), "a change keeps the bucket and the pause");
        let _ = t.changed(EndpointChange { id: e, deleted: true });
        assert_eq!(t.endpoints_kept(), (0, 0, 0), "a deleted endpoint's state is dropped");
        t.check();
    }

    /// The per-endpoint maps do not grow with the endpoints ever seen: full buckets and ended
    /// pauses are swept; pauses are bounded.
    #[test]
    fn per_endpoint_state_is_swept() {
        let mut t = Throttle::new(16);
        for n in 0..1_000 {
            assert_eq!(run(&mut t, endpoint(n), Some(5), &[due(n, T0)], false, T0), 1);
            t.pause(endpoint(n), T0 + 500, T0);
        }
        assert_eq!(t.endpoints_kept(), (1_000, 1_000, 0));
        t.sweep(T0 + 1_000);
        assert_eq!(t.endpoints_kept(), (0, 0, 0));
        for n in 0..(PAUSES_MAX as u128 + 10) {
            t.pause(endpoint(n), T0 + 5_000, T0 + 1_000);
        }
        assert_eq!(t.pauses.len(), PAUSES_MAX);
        t.check();
    }
}
