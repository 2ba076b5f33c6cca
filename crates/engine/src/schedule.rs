//! The automatic retry schedule, with bounded deterministic jitter.
//!
//! After a failed attempt, the next one is due `schedule_ms[n - 1]` milliseconds (the *base* delay)
//! after the attempt finished, where `n` counts the attempts made since the schedule was last
//! (re)started, plus a jitter so that deliveries that failed together do not all retry together.
//! When `n` is beyond the schedule, the schedule is used up and the delivery becomes `exhausted`.
//!
//! The jitter is drawn from the delivery id and the attempt number only, so replaying the log (or a
//! simulation seed) gives exactly the same `retry_at`. Its hash, [`jitter_seed`], is part of that
//! promise: it must never change between versions, and tests pin exact values.

/// The default jitter bound: up to 10 % (100 ‰) of the base delay is added.
pub const JITTER_PERMILLE_DEFAULT: u32 = 100;

/// The default automatic schedule after the first attempt: 5 s, 5 min, 30 min, 2 h, 5 h, 10 h, 10 h.
#[cfg(test)]
pub const SCHEDULE_MS_DEFAULT: [u64; 7] =
    [5_000, 5 * 60_000, 30 * 60_000, 2 * 3_600_000, 5 * 3_600_000, 10 * 3_600_000, 10 * 3_600_000];

/// When the next automatic attempt is due, in unix milliseconds, or `None` when the schedule is
/// used up.
///
/// - `schedule_ms`: the base delays; `schedule_ms[n - 1]` follows the `n`-th attempt.
/// - `attempts_since_reset`: `n`, the number of attempts made since the schedule was (re)started,
///   counting the one that just finished (so 1 after the first attempt). `0` means no attempt has
///   finished since the restart: the delivery is due at `finished_at_ms`, without jitter.
/// - `finished_at_ms`: when the last attempt finished.
/// - `delivery_id`, `attempt`: the jitter's seed. `attempt` is the delivery's overall attempt
///   number (the `herald-attempt` header), which keeps growing across restarts of the schedule.
/// - `jitter_permille`: the jitter bound in thousandths of the base delay.
///
/// The result is `finished_at_ms + base + jitter` where
/// `0 <= jitter <= base * jitter_permille / 1000` (integer division, computed without overflow).
/// The jitter is `jitter_seed(delivery_id, attempt) % (bound + 1)`; the modulo bias is below
/// `(bound + 1) / 2^64`, negligible. The additions saturate at `u64::MAX`, so huge delays or
/// timestamps never wrap around into the past.
pub fn retry_at_ms(
    schedule_ms: &[u64],
    attempts_since_reset: u32,
    finished_at_ms: u64,
    delivery_id: [u8; 16],
    attempt: u32,
    jitter_permille: u32,
) -> Option<u64> {
    let Some(index) = (attempts_since_reset as usize).checked_sub(1) else {
        return Some(finished_at_ms);
    };
    let base_ms = *schedule_ms.get(index)?;
    let jitter_ms = jitter_ms(base_ms, delivery_id, attempt, jitter_permille);
    Some(finished_at_ms.saturating_add(base_ms).saturating_add(jitter_ms))
}

/// The jitter added to `base_ms`: in `[0, base_ms * jitter_permille / 1000]`, deterministic in
/// `(delivery_id, attempt)`.
pub fn jitter_ms(base_ms: u64, delivery_id: [u8; 16], attempt: u32, jitter_permille: u32) -> u64 {
    let bound_ms = u128::from(base_ms) * u128::from(jitter_permille) / 1000;
    let jitter_ms = u128::from(jitter_seed(delivery_id, attempt)) % (bound_ms + 1);
    // jitter_ms < 2^64 because jitter_seed is a u64; the fallback is unreachable.
    u64::try_from(jitter_ms).unwrap_or(u64::MAX)
}

/// The jitter's 64-bit seed. Fixed forever: FNV-1a (64-bit) over the 16 id bytes followed by the
/// attempt number as 4 little-endian bytes, then the SplitMix64 finalizer to spread the bits.
pub fn jitter_seed(delivery_id: [u8; 16], attempt: u32) -> u64 {
    const FNV_OFFSET_BASIS: u64 = 0xcbf2_9ce4_8422_2325;
    const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;
    let mut hash = FNV_OFFSET_BASIS;
    for byte in delivery_id.iter().chain(attempt.to_le_bytes().iter()) {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(FNV_PRIME);
    }
    hash = (hash ^ (hash >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    hash = (hash ^ (hash >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    hash ^ (hash >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(first: u8) -> [u8; 16] {
        let mut id = [0u8; 16];
        id[0] = first;
        id
    }

    fn counting_id() -> [u8; 16] {
        std::array::from_fn(|i| i as u8)
    }

    #[test]
    fn jitter_seed_exact_values_never_change() {
        // Pinned values, cross-checked against an independent implementation of the documented
        // algorithm. If this test fails, retry times of existing deliveries would move.
        assert_eq!(jitter_seed([0; 16], 0), 0xa345_b054_1daa_b1c1);
        assert_eq!(jitter_seed([0; 16], 1), 0x142a_0f4d_2d6c_6895);
        assert_eq!(jitter_seed(counting_id(), 7), 0x4cbc_840b_1819_3acb);
        assert_eq!(jitter_seed([0xff; 16], u32::MAX), 0x0f08_7f3b_12a8_4e64);
    }

    #[test]
    fn retry_at_exact_values_never_change() {
        // Base 5 s, bound 500 ms.
        assert_eq!(retry_at_ms(&SCHEDULE_MS_DEFAULT, 1, 1_000_000, [0; 16], 1, 100), Some(1_005_251));
        // Base 10 h, bound 1 h.
        assert_eq!(
            retry_at_ms(&SCHEDULE_MS_DEFAULT, 7, 1_700_000_000_000, counting_id(), 7, 100),
            Some(1_700_038_914_862)
        );
        assert_eq!(jitter_ms(5_000, [0; 16], 1, 100), 251);
    }

    #[test]
    fn base_delay_follows_the_schedule_without_jitter() {
        let schedule_ms = [10, 20, 30];
        for n in 1..=3u32 {
            assert_eq!(
                retry_at_ms(&schedule_ms, n, 1_000, id(1), n + 5, 0),
                Some(1_000 + schedule_ms[n as usize - 1])
            );
        }
    }

    #[test]
    fn jitter_stays_within_bound_for_many_ids() {
        let mut min_seen_ms = u64::MAX;
        let mut max_seen_ms = 0;
        for i in 0u32..10_000 {
            let mut delivery_id = [0u8; 16];
            delivery_id[..4].copy_from_slice(&i.to_le_bytes());
            delivery_id[12..].copy_from_slice(&i.wrapping_mul(0x9e37_79b9).to_be_bytes());
            for (n, base_ms) in SCHEDULE_MS_DEFAULT.iter().enumerate() {
                let n = n as u32 + 1;
                let at_ms = retry_at_ms(
                    &SCHEDULE_MS_DEFAULT,
                    n,
                    1_000,
                    delivery_id,
                    n + i % 3,
                    JITTER_PERMILLE_DEFAULT,
                )
                .expect("within the schedule");
                let jitter_ms = at_ms - 1_000 - base_ms;
                assert!(jitter_ms <= base_ms / 10, "id {i} attempt {n}: {jitter_ms}");
                if n == 1 {
                    min_seen_ms = min_seen_ms.min(jitter_ms);
                    max_seen_ms = max_seen_ms.max(jitter_ms);
                }
            }
        }
        // The jitter really spreads: over 10,000 ids the 5 s step uses nearly its whole 500 ms.
        assert!(min_seen_ms <= 5, "{min_seen_ms}");
        assert!(max_seen_ms >= 495, "{max_seen_ms}");
    }

    #[test]
    fn jitter_bound_is_inclusive_and_odd_permille_works() {
        // Bound 0: no jitter at all.
        assert_eq!(jitter_ms(9, id(3), 1, 100), 0);
        // Bound 1 (base 10, 100 ‰): both 0 and 1 occur over enough ids.
        let seen: std::collections::BTreeSet<u64> = (0..64).map(|i| jitter_ms(10, id(i), 1, 100)).collect();
        assert_eq!(seen.into_iter().collect::<Vec<_>>(), vec![0, 1]);
        // More than 100 % is allowed and still bounded.
        for i in 0..=255 {
            assert!(jitter_ms(1_000, id(i), 2, 2_500) <= 2_500);
        }
    }

    #[test]
    fn same_inputs_same_output_and_inputs_matter() {
        let a = retry_at_ms(&SCHEDULE_MS_DEFAULT, 4, 50, counting_id(), 9, 100);
        let b = retry_at_ms(&SCHEDULE_MS_DEFAULT, 4, 50, counting_id(), 9, 100);
        assert_eq!(a, b);
        assert_ne!(jitter_seed(counting_id(), 9), jitter_seed(counting_id(), 10));
        assert_ne!(jitter_seed(id(1), 9), jitter_seed(id(2), 9));
    }

    #[test]
    fn schedule_used_up_is_none() {
        let schedule_ms = [10, 20];
        assert!(retry_at_ms(&schedule_ms, 2, 0, id(0), 2, 100).is_some());
        assert_eq!(retry_at_ms(&schedule_ms, 3, 0, id(0), 3, 100), None);
        assert_eq!(retry_at_ms(&schedule_ms, u32::MAX, 0, id(0), 3, 100), None);
        assert_eq!(retry_at_ms(&SCHEDULE_MS_DEFAULT, 8, 0, id(0), 8, 100), None);
    }

    #[test]
    fn zero_length_schedule_is_none() {
        for n in 1..5 {
            assert_eq!(retry_at_ms(&[], n, 123, id(0), n, 100), None);
        }
    }

    #[test]
    fn no_attempt_since_reset_is_due_at_once() {
        assert_eq!(retry_at_ms(&SCHEDULE_MS_DEFAULT, 0, 77, id(0), 4, 100), Some(77));
        assert_eq!(retry_at_ms(&[], 0, 77, id(0), 4, 100), Some(77));
    }

    #[test]
    fn huge_delays_saturate() {
        let schedule_ms = [u64::MAX, u64::MAX / 2];
        for i in 0..=255 {
            assert_eq!(retry_at_ms(&schedule_ms, 1, 1, id(i), 1, u32::MAX), Some(u64::MAX));
            assert_eq!(retry_at_ms(&schedule_ms, 2, u64::MAX - 5, id(i), 2, 100), Some(u64::MAX));
            // Bound u64::MAX: the jitter is the whole seed (the bound + 1 is 2^64, no overflow).
            assert_eq!(jitter_ms(u64::MAX, id(i), 1, 1_000), jitter_seed(id(i), 1));
        }
    }
}
