//! Folds the store-wide settings: the policy in force and the adoption of newer fold rules.

use super::{rules_may_follow, ApplyError, Fold};
use crate::codec;
use crate::keys;
use crate::policy::Policy;
use crate::query;
use crate::tables::Tables;

impl<T: Tables> Fold<'_, T> {
    pub(super) fn policy_set(&mut self, policy: &Policy) -> Result<(), ApplyError> {
        if let Some(reason) = policy.problem() {
            return Err(ApplyError::InvalidPolicy { reason });
        }
        self.t.put(keys::META_POLICY.to_vec(), codec::to_bytes(policy));
        Ok(())
    }

    pub(super) fn rules_adopted(&mut self, version: u32) -> Result<(), ApplyError> {
        let in_force = query::rules(self.t)?;
        if !rules_may_follow(in_force, version) {
            return Err(ApplyError::UnknownRules { in_force, got: version });
        }
        self.t.put(keys::META_RULES.to_vec(), version.to_be_bytes().to_vec());
        Ok(())
    }
}
