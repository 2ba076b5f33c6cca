//! Folds cluster mode's record: a partition claim, the fence a new owner writes. It changes no
//! table (who owns a partition lives in the lease bucket); it folds only under the rules that
//! know it.

use super::{ApplyError, Fold};
use crate::tables::Tables;

impl<T: Tables> Fold<'_, T> {
    pub(super) fn partition_claimed(&mut self) -> Result<(), ApplyError> {
        let rules = self.rules()?;
        if rules.partition_claims() {
            Ok(())
        } else {
            Err(ApplyError::NotUnderRules { event: "PartitionClaimed", in_force: rules.0 })
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::testkit::publish;
    use crate::{apply, Event, MemTables, RULES_CURRENT};

    #[test]
    fn a_claim_folds_only_under_rules_5_and_changes_nothing_but_the_applied_seq() {
        let claim = Event::PartitionClaimed { node_id: "node-a".into(), epoch: 3 };
        let mut tables = MemTables::new();
        apply(&mut tables, 1, 10, &Event::RulesAdopted { version: 4 }).unwrap();
        let err = apply(&mut tables, 2, 20, &claim).unwrap_err();
        assert_eq!(err, crate::ApplyError::NotUnderRules { event: "PartitionClaimed", in_force: 4 });
        apply(&mut tables, 2, 20, &Event::RulesAdopted { version: RULES_CURRENT }).unwrap();
        let before = tables.dump();
        apply(&mut tables, 3, 30, &claim).unwrap();
        let changed: Vec<_> = tables.dump().into_iter().filter(|pair| !before.contains(pair)).collect();
        assert_eq!(changed.len(), 1, "the applied seq alone: {changed:?}");
        apply(&mut tables, 4, 40, &publish(1)).unwrap();
    }
}
