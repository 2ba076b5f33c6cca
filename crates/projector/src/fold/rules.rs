//! The fold's rules versions: what each one changed, and which may follow which.

/// The fold's rules version this code writes with [`Event::RulesAdopted`](crate::Event::RulesAdopted)
/// (the engine adopts it when it opens a store that has an earlier one). What each version adds:
/// 1. Everything before version 2.
/// 2. An endpoint's `updated_at` moves when an attempt changes its health (`status`,
///    `inactive_reason`); a delivery to an endpoint takes the endpoint's url when an attempt of
///    it is recorded and when it is retriggered or redelivered, so after a `PATCH` of the
///    endpoint its `url` is the one its next attempt goes to, and the one its last attempt went
///    to unless the url changed while that attempt was in flight (the record does not carry the
///    url the dispatcher used).
/// 3. [`AttemptOutcome::Interrupted`](crate::AttemptOutcome::Interrupted) may be recorded: an
///    attempt cut short by a stop is in the delivery's history, its `attempt_count` and
///    `last_attempt_at`, but it is not a failure (API.md: a timeout, a connection error or a
///    non-2xx answer): the endpoint's health, the delivery's place in its schedule and its last
///    error and status stay as they were, and the delivery stays pending. Before, such an attempt
///    was recorded as a failure, so restarts could exhaust deliveries and make endpoints inactive.
pub const RULES_CURRENT: u32 = 3;

/// Whether rules `version` may follow the rules `in_force`: forward only, up to the ones this
/// code knows.
pub fn rules_may_follow(in_force: u32, version: u32) -> bool {
    in_force < version && version <= RULES_CURRENT
}
