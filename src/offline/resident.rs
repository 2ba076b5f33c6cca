//! Keeps an offline tool's resident memory near a bound by reopening its sled stores when it
//! grows past a share of it. sled 0.34 evicts from its page cache only once 64 reads have
//! landed in one of its 256 cache shards, so a single pass over a store keeps nearly every page
//! it read, whatever its `cache_capacity`; dropping the database frees them all (once its
//! epoch-deferred frees have run, and, under mimalloc, once freed pages go back at once: the
//! binary sets `purge_delay` to 0 for `verify`).
//!
//! A reopen costs what the store's open costs, and that grows with the store: sled reads a map
//! of every page (1.4 s and a transient 1.2 GB at 10,000,000 records). Past some size a reopen
//! cannot bring the process under the bound at all, and reopening on every page of growth spent
//! most of a large `verify` reopening (3 of its 8 minutes at 10,000,000 records). So reliefs take
//! at most a quarter of the time since the bound was set: beyond that, memory is let grow until
//! the work has caught up.

use std::time::{Duration, Instant};

use herald_log::{Durability, Store, StoreError};

/// Reliefs take at most one part in this many of the time since the bound was set.
const RELIEF_TIME_SHARE_DIVISOR: u32 = 4;

/// Watches this process's resident memory and relieves it between pages of work.
pub(crate) struct ResidentBound {
    /// Resident bytes above which the stores are reopened: what the process held when the
    /// bound was set (the executable, the first store opened), plus three eighths of the bound.
    reopen_above: u64,
    /// What must have grown since the last relief before another: what a relief leaves (pages
    /// in hand, buffered writes, the stores' fixed needs) it cannot free, and reopening for less
    /// would cost a reopen a page.
    least_growth: u64,
    /// Resident bytes just after the last relief.
    after_last: u64,
    /// When the bound was set.
    since: Instant,
    /// The time reliefs have taken so far.
    relieving: Duration,
    /// The reliefs so far.
    reliefs: u32,
}

impl ResidentBound {
    /// Keeps what grows past this moment's resident memory near `memory_max` bytes.
    pub(crate) fn from_now(memory_max: u64) -> ResidentBound {
        let now = resident_bytes().unwrap_or(0);
        ResidentBound {
            reopen_above: now + memory_max / 8 * 3,
            least_growth: memory_max / 8,
            after_last: now,
            since: Instant::now(),
            relieving: Duration::ZERO,
            reliefs: 0,
        }
    }

    /// The reliefs so far, and the time they took.
    pub(crate) fn spent(&self) -> (u32, Duration) {
        (self.reliefs, self.relieving)
    }

    /// Flushes and reopens `store` (a sled store: the only kind that needs it) when resident
    /// memory is above the bound (and has grown since the last relief), unless reliefs have
    /// taken their share of the time. Call it when no scan of it is open.
    pub(crate) fn relieve(&mut self, store: &dyn Store) -> Result<(), StoreError> {
        let Some(resident) = resident_bytes() else { return Ok(()) };
        if !self.due(resident, self.since.elapsed()) {
            return Ok(());
        }
        let started = Instant::now();
        store.flush(Durability::Flush)?;
        store.reopen()?;
        self.after_last = resident_bytes().unwrap_or(0);
        self.relieving += started.elapsed();
        self.reliefs += 1;
        Ok(())
    }

    /// Whether a relief is due with `resident` bytes held, `elapsed` after the bound was set:
    /// above the bound, grown since the last relief, and reliefs within their share of the time.
    fn due(&self, resident: u64, elapsed: Duration) -> bool {
        resident > self.reopen_above
            && resident >= self.after_last.saturating_add(self.least_growth)
            && self.relieving * RELIEF_TIME_SHARE_DIVISOR <= elapsed
    }
}

/// This process's resident memory in bytes (Linux: `VmRSS` in `/proc/self/status`), or `None`
/// where it cannot be read.
pub(crate) fn resident_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bound(relieving: Duration) -> ResidentBound {
        ResidentBound {
            reopen_above: 1_000,
            least_growth: 100,
            after_last: 950,
            since: Instant::now(),
            relieving,
            reliefs: 0,
        }
    }

    #[test]
    fn a_relief_is_due_above_the_bound_once_memory_has_grown_since_the_last() {
        let b = bound(Duration::ZERO);
        let s = Duration::from_secs(1);
        assert!(!b.due(1_000, s), "at the bound, not above it");
        assert!(!b.due(1_049, s), "above it, but grown less than least_growth since the last relief");
        assert!(b.due(1_050, s));
    }

    #[test]
    fn reliefs_take_at_most_a_quarter_of_the_time() {
        let b = bound(Duration::from_secs(10));
        assert!(!b.due(5_000, Duration::from_secs(39)), "10 s of reliefs in 39 s is over a quarter");
        assert!(b.due(5_000, Duration::from_secs(40)));
    }
}
