//! Policies: the configurable numbers that decide history. They are events in the log
//! ([`Event::PolicySet`](crate::Event::PolicySet)), so a replay under another configuration
//! gives the same history.

use serde::{Deserialize, Serialize};

const SECOND_MS: u64 = 1_000;
const MINUTE_MS: u64 = 60 * SECOND_MS;
const HOUR_MS: u64 = 60 * MINUTE_MS;

/// The longest automatic retry schedule a policy may hold.
pub const RETRY_SCHEDULE_LEN_MAX: usize = 64;
/// The largest `failures_max` a policy may hold: it bounds each endpoint's kept failure run.
pub const FAILURES_MAX_LIMIT: u32 = 1_000;

/// The rules in force from the log record that set them on.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Policy {
    /// Delays of the automatic retries after the first attempt, in order.
    pub retry_schedule_ms: Vec<u64>,
    /// Failures in a row (no success in between) that make an endpoint inactive...
    pub failures_max: u32,
    /// ...when the last `failures_max` of them fall within this window.
    pub failure_window_ms: u64,
    /// How long a rotated-out secret keeps signing (the engine stamps the expiry on the event).
    pub rotation_overlap_ms: u64,
}

impl Default for Policy {
    /// API.md's defaults: 5 s, 5 min, 30 min, 2 h, 5 h, 10 h, 10 h; 5 failures within 24 h;
    /// a 24 h rotation overlap.
    fn default() -> Self {
        Policy {
            retry_schedule_ms: vec![
                5 * SECOND_MS,
                5 * MINUTE_MS,
                30 * MINUTE_MS,
                2 * HOUR_MS,
                5 * HOUR_MS,
                10 * HOUR_MS,
                10 * HOUR_MS,
            ],
            failures_max: 5,
            failure_window_ms: 24 * HOUR_MS,
            rotation_overlap_ms: 24 * HOUR_MS,
        }
    }
}

impl Policy {
    /// The base delay (before jitter) of the retry that follows the `attempts_since_reset`-th
    /// attempt since the schedule (re)started, or `None` when the schedule is used up.
    /// `attempts_since_reset` counts the attempt just made, so it is at least 1.
    pub fn retry_delay_ms(&self, attempts_since_reset: u32) -> Option<u64> {
        let index = usize::try_from(attempts_since_reset.checked_sub(1)?).ok()?;
        self.retry_schedule_ms.get(index).copied()
    }

    /// Why this policy cannot be applied, if it cannot.
    pub fn problem(&self) -> Option<&'static str> {
        if self.failures_max == 0 {
            return Some("failures_max must be at least 1");
        }
        if self.failures_max > FAILURES_MAX_LIMIT {
            return Some("failures_max is above FAILURES_MAX_LIMIT");
        }
        if self.retry_schedule_ms.len() > RETRY_SCHEDULE_LEN_MAX {
            return Some("retry_schedule_ms is longer than RETRY_SCHEDULE_LEN_MAX");
        }
        None
    }
}

/// A duration for people: `24h`, `90m`, `30s` or `250ms`, whichever unit divides it exactly.
pub(crate) fn human_duration(duration_ms: u64) -> String {
    if duration_ms == 0 {
        return "0s".to_string();
    }
    for (unit_ms, suffix) in [(HOUR_MS, "h"), (MINUTE_MS, "m"), (SECOND_MS, "s")] {
        if duration_ms % unit_ms == 0 {
            return format!("{}{suffix}", duration_ms / unit_ms);
        }
    }
    format!("{duration_ms}ms")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_delay_follows_the_schedule() {
        let policy = Policy::default();
        let delays: Vec<Option<u64>> = (0..=8).map(|n| policy.retry_delay_ms(n)).collect();
        assert_eq!(
            delays,
            vec![
                None,
                Some(5_000),
                Some(300_000),
                Some(1_800_000),
                Some(7_200_000),
                Some(18_000_000),
                Some(36_000_000),
                Some(36_000_000),
                None
            ]
        );
    }

    #[test]
    fn problems() {
        type Change = fn(&mut Policy);
        let cases: [(Change, Option<&str>); 4] = [
            (|_| {}, None),
            (|p| p.failures_max = 0, Some("failures_max must be at least 1")),
            (|p| p.failures_max = FAILURES_MAX_LIMIT + 1, Some("failures_max is above FAILURES_MAX_LIMIT")),
            (
                |p| p.retry_schedule_ms = vec![1; RETRY_SCHEDULE_LEN_MAX + 1],
                Some("retry_schedule_ms is longer than RETRY_SCHEDULE_LEN_MAX"),
            ),
        ];
        for (change, expected) in cases {
            let mut policy = Policy::default();
            change(&mut policy);
            assert_eq!(policy.problem(), expected);
        }
    }

    #[test]
    fn human_durations() {
        let cases = [(0, "0s"), (86_400_000, "24h"), (5_400_000, "90m"), (30_000, "30s"), (250, "250ms")];
        for (duration_ms, expected) in cases {
            assert_eq!(human_duration(duration_ms), expected);
        }
    }
}
