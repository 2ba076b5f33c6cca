//! The fold's rules versions, each change named after what it does: the fold asks
//! `rules.interrupted_is_not_a_failure()`, not `rules >= 3`.

use super::{ApplyError, Fold};
use crate::query;
use crate::tables::Tables;

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
/// 4. Endpoint delivery settings ([`Event::EndpointDeliverySettingsSet`](crate::Event)) fold;
///    before, no such event folds. And the fold keeps record refs (`KS_RECORD_REFS`, `refs.rs`):
///    for each delivery the seqs of the records that wrote its row after its creation (and its
///    creation's, when it was not in its event's publish record or did not start pending), with
///    its status after each; for each endpoint the seqs of its own records; the seqs of the policy
///    and rules records; and the seq the refs start from. A replay reads a delivery's story by seq.
///    And a bulk recover may be recorded ([`Event::RecoveryRequested`](crate::Event::RecoveryRequested)
///    and [`Event::RecoveryDeliveries`](crate::Event::RecoveryDeliveries)): each delivery it
///    names is re-queued as a retrigger (a delivered one as a redeliver) is, and the recovery is
///    stored with its members. Before, no such event folds.
///    An event's ordering key ([`Event::OrderingKeySet`](crate::Event)) folds, and the order
///    index of `per_key` endpoints is kept ([`Rules::ordered_delivery`]).
/// 5. A partition claim ([`Event::PartitionClaimed`](crate::Event::PartitionClaimed), cluster
///    mode's fence) folds, changing no table ([`Rules::partition_claims`]); before, none folds.
///
/// [`Rules`] names each of these changes.
pub const RULES_CURRENT: u32 = 5;

/// A version of the fold's rules: the number stored under `META_RULES` and carried by
/// `RulesAdopted` (1 before any), asked by what it changed rather than compared with numbers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Rules(pub u32);

impl Rules {
    /// The rules of a store that never adopted any.
    pub const FIRST: Rules = Rules(1);
    /// The rules this code writes ([`RULES_CURRENT`]).
    pub const CURRENT: Rules = Rules(RULES_CURRENT);

    /// Version 2 on: an attempt that changes an endpoint's health (`status`, `inactive_reason`)
    /// moves the endpoint's `updated_at`.
    pub fn attempt_moves_endpoint_updated_at(self) -> bool {
        self.0 >= 2
    }

    /// Version 2 on: a delivery to an endpoint takes the endpoint's current url when an attempt
    /// of it is recorded and when it is retriggered or redelivered.
    pub fn delivery_url_follows_endpoint(self) -> bool {
        self.0 >= 2
    }

    /// Version 3 on: an [`AttemptOutcome::Interrupted`](crate::AttemptOutcome::Interrupted) may
    /// be recorded, and it is not a failure (before, no such attempt folds).
    pub fn interrupted_is_not_a_failure(self) -> bool {
        self.0 >= 3
    }

    /// Version 4 on: an endpoint's delivery settings may be set.
    pub fn endpoint_delivery_settings(self) -> bool {
        self.0 >= 4
    }

    /// Version 4 on: the fold keeps record refs (`KS_RECORD_REFS`): which records touched each
    /// delivery and endpoint, and which set the policy or the rules.
    pub fn delivery_record_refs(self) -> bool {
        self.0 >= 4
    }

    /// Version 4 on: a bulk recover may be recorded, and it folds (before, no such event folds).
    pub fn recoveries(self) -> bool {
        self.0 >= 4
    }

    /// Version 4 on: an event's ordering key may be set, and deliveries to `per_key` endpoints
    /// keep an order index.
    pub fn ordered_delivery(self) -> bool {
        self.0 >= 4
    }

    /// Version 5 on: a node's claim of a partition (cluster mode) may be recorded; it folds
    /// without changing a table (before, none folds).
    pub fn partition_claims(self) -> bool {
        self.0 >= 5
    }

    /// Whether rules `next` may follow these: forward only, up to the ones this code knows.
    pub fn may_be_followed_by(self, next: Rules) -> bool {
        self < next && next <= Rules::CURRENT
    }
}

/// Whether rules `version` may follow the rules `in_force`: forward only, up to the ones this
/// code knows.
pub fn rules_may_follow(in_force: u32, version: u32) -> bool {
    Rules(in_force).may_be_followed_by(Rules(version))
}

impl<T: Tables> Fold<'_, T> {
    /// The rules in force, which the event being folded follows.
    pub(super) fn rules(&self) -> Result<Rules, ApplyError> {
        Ok(Rules(query::rules(self.t)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_change_holds_from_its_version_on_and_rules_only_move_forward() {
        let changes = |version| {
            let rules = Rules(version);
            (
                rules.attempt_moves_endpoint_updated_at(),
                rules.delivery_url_follows_endpoint(),
                rules.interrupted_is_not_a_failure(),
                rules.endpoint_delivery_settings(),
                rules.delivery_record_refs(),
                rules.recoveries(),
                rules.ordered_delivery(),
                rules.partition_claims(),
            )
        };
        assert_eq!(changes(Rules::FIRST.0), (false, false, false, false, false, false, false, false));
        assert_eq!(changes(2), (true, true, false, false, false, false, false, false));
        assert_eq!(changes(3), (true, true, true, false, false, false, false, false));
        assert_eq!(changes(4), (true, true, true, true, true, true, true, false));
        assert_eq!(changes(5), (true, true, true, true, true, true, true, true));
        assert!(Rules::FIRST.may_be_followed_by(Rules::CURRENT));
        assert!(!Rules(2).may_be_followed_by(Rules(2)));
        assert!(!Rules(3).may_be_followed_by(Rules(2)));
        assert!(!Rules::CURRENT.may_be_followed_by(Rules(RULES_CURRENT + 1)));
    }
}
