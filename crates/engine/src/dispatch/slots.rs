//! The per-target bookkeeping of the dispatcher: for each endpoint (or, for inline deliveries,
//! each origin) the attempts in flight to it, the deliveries parked behind it while it is busy,
//! and what overflowed its parked list.
//!
//! [`Slots`] only keeps the books: it never reads the store or touches the due queue. What it
//! hands back ([`Freed`]) says what the loop must put back in the queue or read back from the
//! stored index, in that order.

use std::collections::{HashMap, HashSet, VecDeque};

use herald_projector::{Delivery, Due, EndpointId};

use super::Id;
use crate::config::DeliveryConfig;

/// What a parked delivery waits behind.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(super) enum Park {
    Endpoint(EndpointId),
    Origin(String),
}

impl Park {
    /// The endpoint whose slot `delivery`'s attempt takes, or for an inline delivery its origin.
    pub(super) fn of(delivery: &Delivery) -> Park {
        match delivery.endpoint_id {
            Some(endpoint) => Park::Endpoint(endpoint),
            None => Park::Origin(origin_of(&delivery.url)),
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

/// What [`Slots::admit`] did with a due delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Admission {
    /// It holds a slot of its target: its attempt starts.
    Start,
    /// Its target is busy: it waits in the target's parked list.
    Parked,
    /// Its target is busy and the parked lists are full: dropped, to be read back once the
    /// target has room.
    Dropped,
}

/// What overflowed behind a target, to be read back now that it has room.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum ReadBack {
    /// The endpoint's pending index.
    Endpoint(EndpointId),
    /// An origin has no index of its own: the due index from this time on.
    DueFrom(u64),
}

/// What a freed slot (or a moved-back entry that was not attempted) calls for, in this order:
/// the next parked delivery back into the queue, then what overflowed read back.
#[derive(Debug, Default, PartialEq, Eq)]
#[must_use]
pub(super) struct Freed {
    pub(super) unparked: Option<Due>,
    pub(super) read_back: Option<ReadBack>,
}

/// The attempts in flight to each target, the deliveries parked behind each busy one, and what
/// overflowed.
///
/// Invariants (checked by `debug_assert!`): a target holds at most its bound (an endpoint's
/// `max_in_flight`, else `per_target_max`) as it was when each of its slots was taken; the slots
/// held in total are the sum of the per-target counts; at most `parked_total_max` deliveries are
/// parked, each at most once, and a parked list is never empty.
pub(super) struct Slots {
    /// Slots a target without a bound of its own may hold: `max_in_flight_per_endpoint`.
    per_target_max: usize,
    /// Deliveries parked, at most, all targets together.
    parked_total_max: usize,
    /// Attempts in flight to each endpoint, and to each origin of inline deliveries (which have
    /// no endpoint), until their receiver answers: each bounded by the target's bound.
    held: HashMap<Park, Held>,
    /// The sum of `held`.
    held_total: usize,
    /// Deliveries parked behind a busy endpoint or origin, in the order they came due.
    parked: HashMap<Park, VecDeque<Due>>,
    /// Every parked id, so a refill or a hint that brings one back does not park it twice.
    parked_ids: HashSet<Id>,
    /// Parked entries moved back to the queue when a slot freed, with where they were parked:
    /// if one is then not attempted (already delivered, in flight, gone), the next one moves,
    /// so the freed slot is not left unused while others wait.
    unparked: HashMap<Id, Park>,
    /// Endpoints and origins whose parked list overflowed, with the earliest due time dropped.
    /// Once they have room again, what was dropped is read back: an endpoint's pending index,
    /// or for an origin (no index of its own) the due index from that time.
    overflowed: HashMap<Park, u64>,
}

/// The slots one target holds, and the largest bound any of them was taken under (a target's
/// bound may change while it holds slots: a lowered one lets none start until it is kept again).
#[derive(Debug, Clone, Copy)]
struct Held {
    n: usize,
    bound: usize,
}

impl Slots {
    pub(super) fn new(per_target_max: usize, parked_total_max: usize) -> Slots {
        Slots {
            per_target_max,
            parked_total_max,
            held: HashMap::new(),
            held_total: 0,
            parked: HashMap::new(),
            parked_ids: HashSet::new(),
            unparked: HashMap::new(),
            overflowed: HashMap::new(),
        }
    }

    /// The books for `cfg`'s bounds.
    pub(super) fn for_config(cfg: &DeliveryConfig) -> Slots {
        Slots::new(cfg.max_in_flight_per_endpoint, parked_total_max(cfg))
    }

    pub(super) fn is_parked(&self, id: &Id) -> bool {
        self.parked_ids.contains(id)
    }

    /// Deliveries parked, all targets together.
    pub(super) fn parked_len(&self) -> usize {
        self.parked_ids.len()
    }

    /// Slots held, all targets together.
    pub(super) fn held_total(&self) -> usize {
        self.held_total
    }

    /// The bound of a target without one of its own.
    pub(super) fn per_target_max(&self) -> usize {
        self.per_target_max
    }

    /// A due delivery for `target`, which may hold `bound` slots (at least 1): it takes a slot if
    /// the target has one free; else it is parked behind the target, or, when the parked bound is
    /// reached, dropped (and read back once the target has room: see [`Slots::free`]). The caller
    /// has checked that it is not parked already.
    pub(super) fn admit(&mut self, target: &Park, due: Due, bound: usize) -> Admission {
        let bound = bound.max(1);
        if self.held.get(target).map_or(0, |h| h.n) < bound {
            let held = self.held.entry(target.clone()).or_insert(Held { n: 0, bound });
            held.n += 1;
            held.bound = held.bound.max(bound);
            debug_assert!(held.n <= bound, "a target holds more slots than its bound");
            self.held_total += 1;
            return Admission::Start;
        }
        if self.parked_ids.len() >= self.parked_total_max {
            let earliest = self.overflowed.entry(target.clone()).or_insert(due.next_attempt_at_ms);
            *earliest = (*earliest).min(due.next_attempt_at_ms);
            return Admission::Dropped;
        }
        let id = *due.delivery_id.as_bytes();
        let fresh = self.parked_ids.insert(id);
        debug_assert!(fresh, "a delivery is parked at most once");
        debug_assert!(!self.unparked.contains_key(&id), "a parked delivery is not also moved back");
        self.parked.entry(target.clone()).or_default().push_back(due);
        Admission::Parked
    }

    /// An attempt to `target` no longer holds its slot: the next delivery parked behind it goes
    /// back to the queue, or what overflowed is read back.
    pub(super) fn free(&mut self, target: Park) -> Freed {
        let held = self.held.get_mut(&target);
        debug_assert!(held.is_some(), "a slot is freed only by the attempt that holds it");
        if let Some(held) = held {
            held.n = held.n.saturating_sub(1);
            self.held_total -= 1;
            if held.n == 0 {
                self.held.remove(&target);
            }
        }
        if self.parked.contains_key(&target) {
            self.unpark_next(&target)
        } else {
            Freed { unparked: None, read_back: self.read_back_overflow(&target) }
        }
    }

    /// Where `id` was parked, if it was moved back to the queue from a parked list (once: the
    /// entry is forgotten).
    pub(super) fn take_unparked(&mut self, id: &Id) -> Option<Park> {
        self.unparked.remove(id)
    }

    /// Moves the next delivery parked behind `park` back to the queue; when the list empties,
    /// what overflowed it is read back.
    pub(super) fn unpark_next(&mut self, park: &Park) -> Freed {
        let mut freed = Freed::default();
        let Some(list) = self.parked.get_mut(park) else { return freed };
        let next = list.pop_front();
        let drained = list.is_empty();
        if let Some(due) = next {
            let id = *due.delivery_id.as_bytes();
            let was_parked = self.parked_ids.remove(&id);
            debug_assert!(was_parked, "a parked list holds parked ids only");
            // An entry the queue evicts is never popped: bounded, at the cost of a chain link.
            if self.unparked.len() >= self.parked_total_max {
                self.unparked.clear();
            }
            self.unparked.insert(id, park.clone());
            freed.unparked = Some(due);
        }
        if drained {
            self.parked.remove(park);
            freed.read_back = self.read_back_overflow(park);
        }
        freed
    }

    /// An endpoint's pending deliveries were only partly loaded: the rest is read back once it
    /// has room again.
    pub(super) fn overflowed_endpoint(&mut self, endpoint: EndpointId) {
        self.overflowed.entry(Park::Endpoint(endpoint)).or_insert(0);
    }

    /// What was dropped behind `park` when the parked bound was reached: an endpoint's pending
    /// index is loaded; an origin has none, so the due index is reloaded from the earliest time.
    fn read_back_overflow(&mut self, park: &Park) -> Option<ReadBack> {
        match (park, self.overflowed.remove(park)) {
            (_, None) => None,
            (Park::Endpoint(endpoint), Some(_)) => Some(ReadBack::Endpoint(*endpoint)),
            (Park::Origin(_), Some(from)) => Some(ReadBack::DueFrom(from)),
        }
    }

    /// Checks every invariant, walking all targets (the methods check what they change; this is
    /// the whole picture, for the loop once a turn and for tests).
    pub(super) fn check(&self) {
        debug_assert_eq!(
            self.held.values().map(|h| h.n).sum::<usize>(),
            self.held_total,
            "slots held in total"
        );
        debug_assert!(self.held.values().all(|h| (1..=h.bound).contains(&h.n)), "slots per target");
        debug_assert!(self.parked.values().all(|list| !list.is_empty()), "an empty parked list is kept");
        debug_assert_eq!(
            self.parked.values().map(VecDeque::len).sum::<usize>(),
            self.parked_ids.len(),
            "parked entries and parked ids"
        );
        debug_assert!(self.parked_ids.len() <= self.parked_total_max, "parked beyond the bound");
        debug_assert!(self.unparked.len() <= self.parked_total_max, "moved back beyond the bound");
    }
}

/// Deliveries parked behind busy endpoints, at most, all endpoints together: as many as the
/// due queue holds, since a parked entry is a due entry taken out of the queue. A hot
/// endpoint's backlog then waits here instead of being dropped and read back from the store
/// over and over (each read is a sled get and a decode).
fn parked_total_max(cfg: &DeliveryConfig) -> usize {
    cfg.due_queue_capacity.max(cfg.max_in_flight_per_endpoint * 4).max(64)
}

#[cfg(test)]
mod tests {
    use std::panic::{catch_unwind, AssertUnwindSafe};

    use herald_projector::DeliveryId;

    use super::*;

    const PER_TARGET_MAX: usize = 2;
    const PARKED_TOTAL_MAX: usize = 3;

    fn due(n: u128, at_ms: u64) -> Due {
        Due { next_attempt_at_ms: at_ms, delivery_id: DeliveryId(uuid::Uuid::from_u128(n)) }
    }

    fn id(n: u128) -> Id {
        *DeliveryId(uuid::Uuid::from_u128(n)).as_bytes()
    }

    fn endpoint(n: u128) -> Park {
        Park::Endpoint(EndpointId(uuid::Uuid::from_u128(n)))
    }

    fn origin() -> Park {
        Park::Origin("https://example.com:443".into())
    }

    /// Books with small bounds; `admit` each of `dues` for `target`, checking the invariants
    /// after each, and returns what each admission did.
    fn admit_all(slots: &mut Slots, target: &Park, dues: &[Due]) -> Vec<Admission> {
        dues.iter()
            .map(|d| {
                let admission = slots.admit(target, *d, slots.per_target_max());
                slots.check();
                admission
            })
            .collect()
    }

    fn unparked(n: u128, at_ms: u64) -> Freed {
        Freed { unparked: Some(due(n, at_ms)), read_back: None }
    }

    /// A target holds at most `per_target_max` slots; the next ones park, up to the parked bound
    /// over all targets; past it they are dropped. Every target has its own slots.
    #[test]
    fn a_target_holds_its_bound_and_parks_the_rest() {
        let mut slots = Slots::new(PER_TARGET_MAX, PARKED_TOTAL_MAX);
        let dues: Vec<Due> = (0..4).map(|n| due(n, 10)).collect();
        let got = admit_all(&mut slots, &endpoint(1), &dues);
        assert_eq!(got, [Admission::Start, Admission::Start, Admission::Parked, Admission::Parked]);
        assert_eq!((slots.held_total(), slots.parked_len()), (2, 2));
        assert!(slots.is_parked(&id(2)) && slots.is_parked(&id(3)) && !slots.is_parked(&id(1)));
        let got = admit_all(&mut slots, &endpoint(2), &[due(10, 10), due(11, 10), due(12, 10), due(13, 10)]);
        assert_eq!(got, [Admission::Start, Admission::Start, Admission::Parked, Admission::Dropped]);
        assert_eq!((slots.held_total(), slots.parked_len()), (4, PARKED_TOTAL_MAX));
    }

    /// Each freed slot moves the earliest-parked entry back, in the order they were parked; once
    /// none is parked, a freed slot moves nothing and the count goes down.
    #[test]
    fn freed_slots_move_parked_entries_back_in_order() {
        let mut slots = Slots::new(PER_TARGET_MAX, PARKED_TOTAL_MAX);
        let target = endpoint(1);
        admit_all(&mut slots, &target, &[due(0, 10), due(1, 10), due(2, 30), due(3, 20)]);
        assert_eq!(slots.free(target.clone()), unparked(2, 30));
        assert!(!slots.is_parked(&id(2)));
        assert_eq!(slots.take_unparked(&id(2)), Some(target.clone()));
        assert_eq!(slots.take_unparked(&id(2)), None, "forgotten once taken");
        assert_eq!(admit_all(&mut slots, &target, &[due(2, 30)]), [Admission::Start]);
        assert_eq!(slots.free(target.clone()), unparked(3, 20));
        slots.check();
        assert_eq!(slots.free(target), Freed::default(), "nothing parked any more");
        assert_eq!((slots.held_total(), slots.parked_len()), (0, 0));
        slots.check();
    }

    /// A moved-back entry that is not attempted hands its turn to the next parked one.
    #[test]
    fn an_entry_moved_back_and_not_attempted_moves_the_next() {
        let mut slots = Slots::new(1, PARKED_TOTAL_MAX);
        let target = origin();
        admit_all(&mut slots, &target, &[due(0, 10), due(1, 10), due(2, 10)]);
        assert_eq!(slots.free(target.clone()), unparked(1, 10));
        let park = slots.take_unparked(&id(1)).expect("moved back from its park");
        assert_eq!(slots.unpark_next(&park), unparked(2, 10));
        slots.check();
        assert_eq!(slots.unpark_next(&park), Freed::default(), "none left behind it");
        assert_eq!((slots.held_total(), slots.parked_len()), (0, 0));
    }

    /// What overflowed is read back once the target's parked list has drained: an endpoint's
    /// pending index, or for an origin the due index from the earliest time dropped.
    #[test]
    fn overflow_is_read_back_once_the_target_has_room() {
        let mut slots = Slots::new(1, 1);
        let got =
            admit_all(&mut slots, &origin(), &[due(0, 50), due(1, 50), due(2, 40), due(3, 30), due(4, 60)]);
        assert_eq!(got[2..], [Admission::Dropped; 3]);
        let got = admit_all(&mut slots, &endpoint(7), &[due(10, 50), due(11, 50)]);
        assert_eq!(got, [Admission::Start, Admission::Dropped]);
        assert_eq!(
            slots.free(origin()),
            Freed { unparked: Some(due(1, 50)), read_back: Some(ReadBack::DueFrom(30)) },
            "the parked list drained: its overflow is read back from the earliest dropped"
        );
        let read_back = Some(ReadBack::Endpoint(EndpointId(uuid::Uuid::from_u128(7))));
        assert_eq!(slots.free(endpoint(7)), Freed { unparked: None, read_back });
        assert_eq!(admit_all(&mut slots, &endpoint(7), &[due(12, 50)]), [Admission::Start]);
        assert_eq!(slots.free(endpoint(7)), Freed::default(), "read back once");
        slots.check();
    }

    /// An endpoint whose pending list was only partly loaded is read back when a slot frees.
    #[test]
    fn a_partly_loaded_endpoint_is_read_back_when_a_slot_frees() {
        let mut slots = Slots::new(PER_TARGET_MAX, PARKED_TOTAL_MAX);
        admit_all(&mut slots, &endpoint(3), &[due(0, 10)]);
        slots.overflowed_endpoint(EndpointId(uuid::Uuid::from_u128(3)));
        let freed = slots.free(endpoint(3));
        assert_eq!(freed.read_back, Some(ReadBack::Endpoint(EndpointId(uuid::Uuid::from_u128(3)))));
    }

    /// The moved-back entries are bounded like the parked ones: past the bound they are
    /// forgotten (a freed slot is then at worst left for the next turn's refill).
    #[test]
    fn moved_back_entries_are_bounded() {
        let mut slots = Slots::new(1, 2);
        for n in 0..6 {
            admit_all(&mut slots, &origin(), &[due(2 * n, 10), due(2 * n + 1, 10)]);
            assert_eq!(slots.free(origin()), unparked(2 * n + 1, 10));
            slots.check();
        }
        assert!(slots.unparked.len() <= 2);
    }

    /// An id parked twice, or a slot freed that no attempt holds, trips the books' assertions
    /// (in debug builds, where the tests run).
    #[test]
    #[cfg(debug_assertions)]
    fn the_books_refuse_a_second_park_and_a_stray_free() {
        let mut slots = Slots::new(1, PARKED_TOTAL_MAX);
        admit_all(&mut slots, &origin(), &[due(0, 10), due(1, 10)]);
        let twice = catch_unwind(AssertUnwindSafe(|| slots.admit(&origin(), due(1, 10), 1)));
        assert!(twice.is_err(), "a delivery is parked at most once");
        let mut slots = Slots::new(1, PARKED_TOTAL_MAX);
        let stray = catch_unwind(AssertUnwindSafe(|| slots.free(endpoint(9))));
        assert!(stray.is_err(), "a slot is freed only by the attempt that holds it");
    }

    /// An endpoint's own bound replaces the configured one, above or below it; a lowered bound
    /// lets nothing start until the target holds fewer than it, and the books stay true meanwhile.
    #[test]
    fn an_endpoint_holds_its_own_bound_which_may_change() {
        let mut slots = Slots::new(PER_TARGET_MAX, 16);
        let (wide, narrow) = (endpoint(1), endpoint(2));
        let got: Vec<Admission> = (0..5).map(|n| slots.admit(&wide, due(n, 10), 4)).collect();
        assert_eq!(
            got,
            [Admission::Start, Admission::Start, Admission::Start, Admission::Start, Admission::Parked]
        );
        let got: Vec<Admission> = (10..12).map(|n| slots.admit(&narrow, due(n, 10), 1)).collect();
        assert_eq!(got, [Admission::Start, Admission::Parked]);
        slots.check();
        assert_eq!(slots.admit(&wide, due(20, 10), 2), Admission::Parked, "lowered below what it holds");
        slots.check();
        for _ in 0..3 {
            let _ = slots.free(wide.clone());
            slots.check();
        }
        assert_eq!(slots.held_total(), 2, "one at wide, one at narrow");
        assert_eq!(slots.admit(&wide, due(21, 10), 2), Admission::Start, "room under the lowered bound");
        assert_eq!(slots.admit(&wide, due(22, 10), 2), Admission::Parked);
        slots.check();
    }

    #[test]
    fn an_inline_delivery_waits_behind_its_origin() {
        assert_eq!(origin_of("https://Example.com/hook?x=1"), "https://example.com:443");
        assert_eq!(origin_of("http://example.com:8080/a"), "http://example.com:8080");
        assert_eq!(origin_of("not a url"), "not a url");
    }
}
