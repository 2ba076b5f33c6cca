//! The engine's own counts of facts, kept where they happen (the commands machine, once a batch
//! is durable; the submission of a publish) so no cancelled caller can miss one: events
//! published, and histograms of publish latency and attempt duration. Atomics only: counting
//! takes no lock and allocates nothing.

use std::sync::atomic::{AtomicU64, Ordering};

/// Upper bounds (microseconds) of the publish-latency buckets: from the request's arrival (its
/// headers read; the submission for a command outside a request) to the durable answer, which is
/// the body read and checked, a queue wait, a group-commit batch and its flush (+ fsync): 0.5-5 ms on a
/// good SSD at rest, tens of ms under load or on a slow disk, seconds only when the disk stalls.
pub const PUBLISH_BUCKETS_US: [u64; 12] =
    [500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000, 1_000_000, 2_500_000];

/// Upper bounds (microseconds) of the attempt-duration buckets: a receiver on the same network
/// answers in a few ms, one across the internet in 50-500 ms; the attempt timeout
/// (`[delivery] timeout`, 15 s by default) caps the rest. Attempt times are stamped in
/// milliseconds, so nothing finer than 5 ms.
pub const ATTEMPT_BUCKETS_US: [u64; 12] = [
    5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000, 1_000_000, 2_500_000, 5_000_000, 10_000_000,
    30_000_000,
];

/// A fixed-bucket histogram of durations: one atomic counter per bucket and one for the sum.
#[derive(Debug)]
pub struct Histogram {
    bounds_us: &'static [u64],
    /// Per bucket (not cumulative), and one more for the durations above the last bound.
    counts: Box<[AtomicU64]>,
    sum_us: AtomicU64,
}

/// A histogram as read at one moment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistogramSnapshot {
    /// Upper bounds of the buckets, microseconds, ascending.
    pub bounds_us: &'static [u64],
    /// Per bucket, not cumulative; one more than `bounds_us`: the durations above the last.
    pub counts: Vec<u64>,
    pub sum_us: u64,
}

impl HistogramSnapshot {
    /// Durations counted.
    pub fn count(&self) -> u64 {
        self.counts.iter().sum()
    }
}

impl Histogram {
    pub fn new(bounds_us: &'static [u64]) -> Histogram {
        debug_assert!(bounds_us.windows(2).all(|w| w[0] < w[1]), "bounds ascend");
        Histogram {
            bounds_us,
            counts: (0..=bounds_us.len()).map(|_| AtomicU64::new(0)).collect(),
            sum_us: AtomicU64::new(0),
        }
    }

    /// Counts one duration of `us` microseconds (in the first bucket whose bound is at least it).
    pub fn observe_us(&self, us: u64) {
        let bucket = self.bounds_us.partition_point(|&bound| bound < us);
        self.counts[bucket].fetch_add(1, Ordering::Relaxed);
        self.sum_us.fetch_add(us, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> HistogramSnapshot {
        HistogramSnapshot {
            bounds_us: self.bounds_us,
            counts: self.counts.iter().map(|c| c.load(Ordering::Relaxed)).collect(),
            sum_us: self.sum_us.load(Ordering::Relaxed),
        }
    }
}

/// An attempt's outcome, as the attempt-duration histogram splits them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttemptKind {
    Delivered = 0,
    Failed = 1,
    /// Cut short by a stop of herald.
    Interrupted = 2,
}

impl AttemptKind {
    pub const ALL: [AttemptKind; 3] = [AttemptKind::Delivered, AttemptKind::Failed, AttemptKind::Interrupted];

    /// Its label value.
    pub fn name(self) -> &'static str {
        match self {
            AttemptKind::Delivered => "delivered",
            AttemptKind::Failed => "failed",
            AttemptKind::Interrupted => "interrupted",
        }
    }
}

/// What the engine counts itself (see the module's header).
#[derive(Debug)]
pub struct EngineStats {
    /// New events whose publish is durable (a replay of an idempotency key is not one).
    published: AtomicU64,
    publish_durations: Histogram,
    /// By [`AttemptKind`].
    attempt_durations: [Histogram; 3],
}

impl Default for EngineStats {
    fn default() -> Self {
        EngineStats {
            published: AtomicU64::new(0),
            publish_durations: Histogram::new(&PUBLISH_BUCKETS_US),
            attempt_durations: AttemptKind::ALL.map(|_| Histogram::new(&ATTEMPT_BUCKETS_US)),
        }
    }
}

/// [`EngineStats`] as read at one moment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EngineStatsSnapshot {
    pub events_published: u64,
    /// From the arrival of a publish's HTTP request (its submission, outside a request) to its
    /// durable answer.
    pub publish_durations: HistogramSnapshot,
    /// Recorded attempts, from the request's start to the receiver's answer (or the error), by
    /// outcome, in the order of [`AttemptKind::ALL`].
    pub attempt_durations: Vec<(AttemptKind, HistogramSnapshot)>,
}

impl EngineStats {
    pub(crate) fn published(&self, events: u64) {
        if events > 0 {
            self.published.fetch_add(events, Ordering::Relaxed);
        }
    }

    pub(crate) fn publish_took(&self, us: u64) {
        self.publish_durations.observe_us(us);
    }

    pub(crate) fn attempt_took(&self, kind: AttemptKind, us: u64) {
        self.attempt_durations[kind as usize].observe_us(us);
    }

    pub fn snapshot(&self) -> EngineStatsSnapshot {
        EngineStatsSnapshot {
            events_published: self.published.load(Ordering::Relaxed),
            publish_durations: self.publish_durations.snapshot(),
            attempt_durations: AttemptKind::ALL
                .iter()
                .map(|&k| (k, self.attempt_durations[k as usize].snapshot()))
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_duration_goes_in_the_first_bucket_whose_bound_holds_it() {
        static BOUNDS: [u64; 3] = [10, 100, 1000];
        let h = Histogram::new(&BOUNDS);
        for us in [0, 10, 11, 100, 999, 1000, 1001, u64::MAX / 4] {
            h.observe_us(us);
        }
        let s = h.snapshot();
        assert_eq!(s.counts, vec![2, 2, 2, 2]);
        assert_eq!(s.count(), 8);
        assert_eq!(s.sum_us, 10 + 11 + 100 + 999 + 1000 + 1001 + u64::MAX / 4);
    }

    #[test]
    fn concurrent_observations_are_all_counted() {
        let h = std::sync::Arc::new(Histogram::new(&ATTEMPT_BUCKETS_US));
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let h = h.clone();
                std::thread::spawn(move || {
                    (0..10_000u64).for_each(|i| h.observe_us((i * 7919 + t) % 40_000_000))
                })
            })
            .collect();
        threads.into_iter().for_each(|t| t.join().unwrap());
        assert_eq!(h.snapshot().count(), 40_000);
    }
}
