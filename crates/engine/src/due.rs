//! The dispatcher's in-memory timer queue of due deliveries, bounded.
//!
//! [`DueQueue`] holds at most one entry per delivery id, ordered by `(due_at_ms, delivery_id)`, and
//! at most `capacity` entries. It is a cache of the persisted due index, not the source of truth:
//! when it is full, [`DueQueue::insert`] keeps the earliest-due entries, drops the latest one and
//! raises the refill flag, so the dispatcher knows to reload from the persisted due index once the
//! queue has drained ([`DueQueue::needs_refill`], [`DueQueue::refill_from_ms`],
//! [`DueQueue::clear_refill`]).
//!
//! Invariant: every entry that was inserted, not removed, not popped and not dropped is in the
//! queue; and since only the latest-due entry is ever dropped, the queue is complete for all due
//! times before [`DueQueue::refill_from_ms`].

use std::collections::{BTreeSet, HashMap};

/// A delivery id, as its 16 raw bytes.
pub type DeliveryId = [u8; 16];

/// What [`DueQueue::insert`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InsertOutcome {
    /// The id was not queued; now it is.
    Added,
    /// The id was queued; its due time was replaced (the queue's length is unchanged).
    Replaced {
        /// The due time it had before.
        previous_due_at_ms: u64,
    },
    /// The queue was full: the id is now queued, and the latest-due entry was dropped to make room.
    Evicted {
        /// The dropped entry's id.
        id: DeliveryId,
        /// The dropped entry's due time.
        due_at_ms: u64,
    },
    /// The queue was full and this entry would have been the latest-due: it was not queued.
    Rejected,
}

impl InsertOutcome {
    /// Whether an entry (this one or another) was dropped, so the queue needs a refill later.
    pub fn dropped(&self) -> bool {
        matches!(self, Self::Evicted { .. } | Self::Rejected)
    }
}

/// A bounded timer queue of deliveries keyed by `(due_at_ms, delivery_id)`, one entry per id.
#[derive(Debug, Clone)]
pub struct DueQueue {
    capacity: usize,
    by_due: BTreeSet<(u64, DeliveryId)>,
    due_at_ms_by_id: HashMap<DeliveryId, u64>,
    /// The earliest due time dropped since the refill flag was last cleared.
    refill_from_ms: Option<u64>,
    /// The least `(due_at_ms, id)` dropped since then (`id` all zero when only a time is known):
    /// every queued entry before it is complete, those at its time with a greater id too.
    dropped_min: Option<(u64, DeliveryId)>,
}

impl DueQueue {
    /// An empty queue holding at most `capacity` entries. A capacity of 0 is allowed: every insert
    /// is then rejected and asks for a refill.
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity,
            by_due: BTreeSet::new(),
            due_at_ms_by_id: HashMap::new(),
            refill_from_ms: None,
            dropped_min: None,
        }
    }

    /// Queues `id` at `due_at_ms`, replacing its previous due time if it was queued.
    ///
    /// When the queue is full and `id` is new, the entry with the greatest `(due_at_ms, id)` among
    /// the queued ones and this one is dropped (which may be this one), and the refill flag is set.
    pub fn insert(&mut self, id: DeliveryId, due_at_ms: u64) -> InsertOutcome {
        if let Some(previous_due_at_ms) = self.due_at_ms_by_id.insert(id, due_at_ms) {
            self.by_due.remove(&(previous_due_at_ms, id));
            self.by_due.insert((due_at_ms, id));
            return InsertOutcome::Replaced { previous_due_at_ms };
        }
        if self.by_due.len() < self.capacity {
            self.by_due.insert((due_at_ms, id));
            return InsertOutcome::Added;
        }
        // Full: drop the latest of the queued entries and the new one.
        match self.by_due.last().copied() {
            Some(latest) if (due_at_ms, id) < latest => {
                self.by_due.remove(&latest);
                self.due_at_ms_by_id.remove(&latest.1);
                self.by_due.insert((due_at_ms, id));
                self.note_dropped(latest);
                InsertOutcome::Evicted { id: latest.1, due_at_ms: latest.0 }
            }
            _ => {
                self.due_at_ms_by_id.remove(&id);
                self.note_dropped((due_at_ms, id));
                InsertOutcome::Rejected
            }
        }
    }

    /// Removes `id`, returning the due time it had, or `None` if it was not queued.
    #[cfg(test)]
    pub fn remove(&mut self, id: &DeliveryId) -> Option<u64> {
        let due_at_ms = self.due_at_ms_by_id.remove(id)?;
        self.by_due.remove(&(due_at_ms, *id));
        Some(due_at_ms)
    }

    /// Removes and returns up to `limit` ids due at or before `now_ms`, earliest first (ties by id).
    pub fn pop_due(&mut self, now_ms: u64, limit: usize) -> Vec<DeliveryId> {
        let mut due = Vec::new();
        while due.len() < limit {
            match self.by_due.first() {
                Some(&(due_at_ms, id)) if due_at_ms <= now_ms => {
                    self.by_due.pop_first();
                    self.due_at_ms_by_id.remove(&id);
                    due.push(id);
                }
                _ => break,
            }
        }
        due
    }

    /// When the earliest queued entry is due: the time the dispatcher should wake up at.
    pub fn next_due_ms(&self) -> Option<u64> {
        self.by_due.first().map(|&(due_at_ms, _)| due_at_ms)
    }

    /// The earliest queued due time, for the delivery-lag metric (`now - oldest` when positive).
    /// The same value as [`DueQueue::next_due_ms`], named for its other use.
    pub fn oldest_due_ms(&self) -> Option<u64> {
        self.next_due_ms()
    }

    /// The due time of `id`, if it is queued.
    #[cfg(test)]
    pub fn due_at_ms(&self, id: &DeliveryId) -> Option<u64> {
        self.due_at_ms_by_id.get(id).copied()
    }

    /// The number of queued entries, at most [`DueQueue::capacity`].
    pub fn len(&self) -> usize {
        self.by_due.len()
    }

    /// Whether nothing is queued.
    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.by_due.is_empty()
    }

    /// The most entries the queue holds.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Whether an entry was dropped since the last [`DueQueue::clear_refill`]: the queue no longer
    /// holds every due delivery, and must be refilled from the persisted due index.
    pub fn needs_refill(&self) -> bool {
        self.refill_from_ms.is_some()
    }

    /// The earliest due time dropped since the last [`DueQueue::clear_refill`]. Every delivery due
    /// before it that was inserted (and not removed or popped) is still queued, so the dispatcher
    /// may keep popping until this time before it must refill.
    pub fn refill_from_ms(&self) -> Option<u64> {
        self.refill_from_ms
    }

    /// Resets the refill flag, after the caller has reloaded the due index.
    pub fn clear_refill(&mut self) {
        self.refill_from_ms = None;
        self.dropped_min = None;
    }

    /// Records that deliveries due from `due_at_ms` on may be missing from the queue (a reload
    /// that stopped part way), raising the refill flag.
    pub fn note_incomplete_from(&mut self, due_at_ms: u64) {
        self.note_dropped((due_at_ms, [0; 16]));
    }

    /// Records that the deliveries after `(due_at_ms, id)` (which is queued) may be missing: a
    /// reload that stopped there.
    pub fn note_incomplete_after(&mut self, due_at_ms: u64, id: DeliveryId) {
        let next = u128::from_be_bytes(id).checked_add(1);
        match next {
            Some(next) => self.note_dropped((due_at_ms, next.to_be_bytes())),
            None => self.note_dropped((due_at_ms.saturating_add(1), [0; 16])),
        }
    }

    /// Whether the earliest queued entry is certainly the earliest due: nothing dropped comes
    /// before it in `(due_at_ms, id)` order. When it is not (one dropped at the same time with a
    /// smaller id), the dispatcher refills before it pops.
    pub fn first_is_complete(&self) -> bool {
        match (self.by_due.first(), self.dropped_min) {
            (Some(first), Some(dropped)) => *first < dropped,
            _ => true,
        }
    }

    fn note_dropped(&mut self, key: (u64, DeliveryId)) {
        self.dropped_min = Some(self.dropped_min.map_or(key, |min| min.min(key)));
        let due_at_ms = key.0;
        self.refill_from_ms = Some(match self.refill_from_ms {
            Some(earliest_ms) => earliest_ms.min(due_at_ms),
            None => due_at_ms,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u8) -> DeliveryId {
        let mut id = [0u8; 16];
        id[15] = n;
        id
    }

    fn check_consistent(queue: &DueQueue) {
        assert_eq!(queue.by_due.len(), queue.due_at_ms_by_id.len());
        for &(due_at_ms, id) in &queue.by_due {
            assert_eq!(queue.due_at_ms_by_id.get(&id), Some(&due_at_ms));
        }
        assert!(queue.len() <= queue.capacity());
        assert_eq!(queue.is_empty(), queue.next_due_ms().is_none());
        assert_eq!(queue.oldest_due_ms(), queue.by_due.iter().map(|e| e.0).min());
        assert_eq!(queue.oldest_due_ms(), queue.next_due_ms());
    }

    #[test]
    fn pops_in_due_order_then_id_order() {
        let mut queue = DueQueue::new(10);
        assert_eq!(queue.insert(id(3), 300), InsertOutcome::Added);
        assert_eq!(queue.insert(id(1), 100), InsertOutcome::Added);
        assert_eq!(queue.insert(id(9), 200), InsertOutcome::Added);
        assert_eq!(queue.insert(id(2), 200), InsertOutcome::Added);
        check_consistent(&queue);
        assert_eq!(queue.next_due_ms(), Some(100));
        assert_eq!(queue.pop_due(99, 10), Vec::<DeliveryId>::new());
        assert_eq!(queue.pop_due(250, 10), vec![id(1), id(2), id(9)]);
        assert_eq!(queue.next_due_ms(), Some(300));
        assert_eq!(queue.pop_due(300, 10), vec![id(3)]);
        assert!(queue.is_empty());
        assert_eq!(queue.next_due_ms(), None);
        assert_eq!(queue.oldest_due_ms(), None);
    }

    #[test]
    fn reinsert_replaces_the_due_time() {
        let mut queue = DueQueue::new(10);
        queue.insert(id(1), 100);
        queue.insert(id(2), 200);
        assert_eq!(queue.insert(id(1), 500), InsertOutcome::Replaced { previous_due_at_ms: 100 });
        assert_eq!(queue.len(), 2);
        assert_eq!(queue.due_at_ms(&id(1)), Some(500));
        check_consistent(&queue);
        assert_eq!(queue.pop_due(499, 10), vec![id(2)]);
        assert_eq!(queue.pop_due(500, 10), vec![id(1)]);
        assert!(queue.is_empty());
        // Moving earlier works too.
        queue.insert(id(4), 900);
        queue.insert(id(4), 10);
        assert_eq!(queue.pop_due(10, 10), vec![id(4)]);
    }

    #[test]
    fn remove_takes_the_entry_out() {
        let mut queue = DueQueue::new(10);
        queue.insert(id(1), 100);
        queue.insert(id(2), 200);
        assert_eq!(queue.remove(&id(1)), Some(100));
        assert_eq!(queue.remove(&id(1)), None);
        assert_eq!(queue.remove(&id(7)), None);
        check_consistent(&queue);
        assert_eq!(queue.len(), 1);
        assert_eq!(queue.oldest_due_ms(), Some(200));
        assert_eq!(queue.pop_due(u64::MAX, 10), vec![id(2)]);
    }

    #[test]
    fn pop_respects_the_limit() {
        let mut queue = DueQueue::new(10);
        for n in 0..5 {
            queue.insert(id(n), u64::from(n));
        }
        assert_eq!(queue.pop_due(100, 2), vec![id(0), id(1)]);
        assert_eq!(queue.pop_due(100, 0), Vec::<DeliveryId>::new());
        assert_eq!(queue.len(), 3);
        assert_eq!(queue.pop_due(100, 10), vec![id(2), id(3), id(4)]);
        check_consistent(&queue);
    }

    #[test]
    fn full_queue_keeps_the_earliest_and_asks_for_a_refill() {
        let mut queue = DueQueue::new(3);
        queue.insert(id(1), 100);
        queue.insert(id(2), 300);
        queue.insert(id(3), 200);
        assert!(!queue.needs_refill());
        // Later than everything: rejected.
        assert_eq!(queue.insert(id(4), 400), InsertOutcome::Rejected);
        assert!(InsertOutcome::Rejected.dropped());
        assert_eq!(queue.due_at_ms(&id(4)), None);
        assert!(queue.needs_refill());
        assert_eq!(queue.refill_from_ms(), Some(400));
        // Earlier: the latest (id 2 at 300) goes.
        let outcome = queue.insert(id(5), 50);
        assert_eq!(outcome, InsertOutcome::Evicted { id: id(2), due_at_ms: 300 });
        assert!(outcome.dropped());
        assert_eq!(queue.refill_from_ms(), Some(300));
        assert_eq!(queue.len(), 3);
        check_consistent(&queue);
        // Replacing an id already queued never drops anything.
        assert_eq!(queue.insert(id(3), 10_000), InsertOutcome::Replaced { previous_due_at_ms: 200 });
        assert!(!queue.insert(id(3), 200).dropped());
        // A tie on due time is broken by id: id(0) < id(3), so id(3) is the one dropped.
        assert_eq!(queue.insert(id(0), 200), InsertOutcome::Evicted { id: id(3), due_at_ms: 200 });
        assert_eq!(queue.pop_due(u64::MAX, 10), vec![id(5), id(1), id(0)]);
        queue.clear_refill();
        assert!(!queue.needs_refill());
        assert_eq!(queue.refill_from_ms(), None);
    }

    #[test]
    fn zero_capacity_rejects_everything() {
        let mut queue = DueQueue::new(0);
        assert_eq!(queue.insert(id(1), 1), InsertOutcome::Rejected);
        assert!(queue.is_empty());
        assert!(queue.needs_refill());
        check_consistent(&queue);
    }

    /// A drop remembers its id: an entry queued after it at the same time but with a greater id
    /// is not known to be the earliest; one with a smaller id is. A reload that stopped after an
    /// entry leaves that entry complete.
    #[test]
    fn the_first_entry_is_complete_only_before_the_least_dropped_one() {
        let mut queue = DueQueue::new(1);
        assert!(queue.first_is_complete());
        queue.insert(id(5), 10);
        assert_eq!(queue.insert(id(6), 10), InsertOutcome::Rejected);
        assert!(queue.first_is_complete(), "(10, 5) comes before the dropped (10, 6)");
        queue.pop_due(10, 1);
        queue.insert(id(7), 10);
        assert!(!queue.first_is_complete(), "(10, 6) may come before (10, 7)");
        queue.clear_refill();
        assert!(queue.first_is_complete());
        queue.note_incomplete_after(10, id(7));
        assert!(queue.first_is_complete(), "the reload read (10, 7) itself");
        queue.note_incomplete_from(10);
        assert!(!queue.first_is_complete(), "only a time: anything at it may be missing");
    }

    /// xorshift64: a tiny deterministic generator for the model test.
    struct XorShift(u64);

    impl XorShift {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }

        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    /// The obvious reference: a list of (due, id), sorted when looked at.
    #[derive(Default)]
    struct Model {
        entries: Vec<(u64, DeliveryId)>,
        refill_from_ms: Option<u64>,
    }

    impl Model {
        fn sorted(&self) -> Vec<(u64, DeliveryId)> {
            let mut entries = self.entries.clone();
            entries.sort();
            entries
        }

        fn insert(&mut self, capacity: usize, id: DeliveryId, due_at_ms: u64) -> InsertOutcome {
            if let Some(entry) = self.entries.iter_mut().find(|e| e.1 == id) {
                let previous_due_at_ms = entry.0;
                entry.0 = due_at_ms;
                return InsertOutcome::Replaced { previous_due_at_ms };
            }
            self.entries.push((due_at_ms, id));
            if self.entries.len() <= capacity {
                return InsertOutcome::Added;
            }
            let latest = self.sorted().pop().expect("not empty");
            self.entries.retain(|e| *e != latest);
            self.refill_from_ms = Some(self.refill_from_ms.unwrap_or(u64::MAX).min(latest.0));
            if latest.1 == id {
                InsertOutcome::Rejected
            } else {
                InsertOutcome::Evicted { id: latest.1, due_at_ms: latest.0 }
            }
        }

        fn due_at_ms(&self, id: DeliveryId) -> Option<u64> {
            self.entries.iter().find(|e| e.1 == id).map(|e| e.0)
        }

        fn remove(&mut self, id: DeliveryId) -> Option<u64> {
            let position = self.entries.iter().position(|e| e.1 == id)?;
            Some(self.entries.swap_remove(position).0)
        }

        fn pop_due(&mut self, now_ms: u64, limit: usize) -> Vec<DeliveryId> {
            let popped: Vec<(u64, DeliveryId)> =
                self.sorted().into_iter().filter(|e| e.0 <= now_ms).take(limit).collect();
            self.entries.retain(|e| !popped.contains(e));
            popped.into_iter().map(|e| e.1).collect()
        }
    }

    #[test]
    fn matches_a_reference_model_over_random_operations() {
        for seed in [0x9e37_79b9_7f4a_7c15_u64, 1, 0xdead_beef] {
            let mut rng = XorShift(seed);
            let capacity = 16;
            let mut queue = DueQueue::new(capacity);
            let mut model = Model::default();
            let mut now_ms = 0u64;
            let mut dropped = 0;
            for step in 0..10_000 {
                // 48 ids for 16 slots and a narrow time range: replacements, ties and overflow.
                let id = id(rng.below(48) as u8);
                match rng.below(100) {
                    0..=54 => {
                        let due_at_ms = now_ms + rng.below(40);
                        let outcome = queue.insert(id, due_at_ms);
                        assert_eq!(outcome, model.insert(capacity, id, due_at_ms), "step {step}");
                        dropped += usize::from(outcome.dropped());
                    }
                    55..=69 => assert_eq!(queue.remove(&id), model.remove(id), "step {step}"),
                    70..=89 => {
                        now_ms += rng.below(10);
                        let limit = rng.below(6) as usize;
                        assert_eq!(queue.pop_due(now_ms, limit), model.pop_due(now_ms, limit), "step {step}");
                    }
                    90..=97 => assert_eq!(queue.due_at_ms(&id), model.due_at_ms(id)),
                    _ => {
                        queue.clear_refill();
                        model.refill_from_ms = None;
                    }
                }
                check_consistent(&queue);
                let sorted = model.sorted();
                assert_eq!(queue.len(), sorted.len(), "step {step}");
                assert_eq!(queue.oldest_due_ms(), sorted.first().map(|e| e.0));
                assert_eq!(queue.refill_from_ms(), model.refill_from_ms, "step {step}");
                assert_eq!(queue.needs_refill(), model.refill_from_ms.is_some());
                assert_eq!(queue.by_due.iter().copied().collect::<Vec<_>>(), sorted, "step {step}");
            }
            // The run really exercised the bound.
            assert!(dropped > 100, "seed {seed}: only {dropped} drops");
        }
    }
}
