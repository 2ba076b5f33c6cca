//! Time as the engine sees it: unix milliseconds from a [`Clock`].
//!
//! The engine never reads the system time directly; it asks a `Clock`. Production uses
//! [`SystemClock`]; tests and the simulation use [`ManualClock`], whose clones share one time so a
//! test can jump it forward (or back) while the engine runs.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

/// A source of the current time, in milliseconds since the unix epoch.
pub trait Clock: Send + Sync + 'static {
    /// Milliseconds since 1970-01-01T00:00:00Z.
    fn now_ms(&self) -> u64;
}

/// The operating system's wall clock.
///
/// A system time before the epoch reads as 0; one beyond `u64::MAX` milliseconds saturates.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> u64 {
        match SystemTime::now().duration_since(UNIX_EPOCH) {
            Ok(since_epoch) => u64::try_from(since_epoch.as_millis()).unwrap_or(u64::MAX),
            Err(_) => 0,
        }
    }
}

/// A clock that only moves when told to. Clones share the same time.
///
/// ```
/// use herald_engine::clock::{Clock, ManualClock};
///
/// let clock = ManualClock::new(1_000);
/// let engine_view = clock.clone();
/// clock.advance_ms(500);
/// assert_eq!(engine_view.now_ms(), 1_500);
/// ```
#[derive(Debug, Clone, Default)]
pub struct ManualClock {
    now_ms: Arc<AtomicU64>,
}

impl ManualClock {
    /// A clock reading `start_ms`.
    pub fn new(start_ms: u64) -> Self {
        Self { now_ms: Arc::new(AtomicU64::new(start_ms)) }
    }

    /// Sets the time for this clock and all its clones. Going backwards is allowed, so tests can
    /// simulate a wall clock that steps back.
    pub fn set_ms(&self, now_ms: u64) {
        self.now_ms.store(now_ms, Ordering::SeqCst);
    }

    /// Moves the time forward by `delta_ms` (saturating at `u64::MAX`) and returns the new time.
    pub fn advance_ms(&self, delta_ms: u64) -> u64 {
        let previous_ms = self
            .now_ms
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |now_ms| Some(now_ms.saturating_add(delta_ms)))
            .unwrap_or_else(|now_ms| now_ms);
        previous_ms.saturating_add(delta_ms)
    }
}

impl Clock for ManualClock {
    fn now_ms(&self) -> u64 {
        self.now_ms.load(Ordering::SeqCst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn system_clock_is_after_2023_and_monotone_enough() {
        let clock = SystemClock;
        let first_ms = clock.now_ms();
        // 2023-11-14T22:13:20Z; any machine running these tests is later.
        assert!(first_ms > 1_700_000_000_000, "{first_ms}");
        let second_ms = clock.now_ms();
        // The wall clock may step, but not by an hour between two reads.
        assert!(second_ms.abs_diff(first_ms) < 3_600_000);
    }

    #[test]
    fn manual_clock_set_and_advance_are_shared_by_clones() {
        let clock = ManualClock::new(10);
        let other = clock.clone();
        assert_eq!(other.now_ms(), 10);
        assert_eq!(clock.advance_ms(5), 15);
        assert_eq!(other.now_ms(), 15);
        other.set_ms(3);
        assert_eq!(clock.now_ms(), 3);
        assert_eq!(ManualClock::default().now_ms(), 0);
    }

    #[test]
    fn manual_clock_advance_saturates() {
        let clock = ManualClock::new(u64::MAX - 1);
        assert_eq!(clock.advance_ms(10), u64::MAX);
        assert_eq!(clock.now_ms(), u64::MAX);
    }

    #[test]
    fn manual_clock_works_behind_the_trait_across_threads() {
        let clock = ManualClock::new(0);
        let shared: Arc<dyn Clock> = Arc::new(clock.clone());
        let handles: Vec<_> = (0..4)
            .map(|_| {
                let clock = clock.clone();
                std::thread::spawn(move || {
                    for _ in 0..1_000 {
                        clock.advance_ms(1);
                    }
                })
            })
            .collect();
        for handle in handles {
            handle.join().expect("advancing thread panicked");
        }
        assert_eq!(shared.now_ms(), 4_000);
    }
}
