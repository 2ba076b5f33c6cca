//! The store-wide settings the log holds (admin only): the policy and the fold's rules in force.

use herald_projector::{Event, Policy};

use super::{invalid, CommandError, Reply, Run};

impl Run<'_, '_> {
    pub(super) fn set_policy(&mut self, p: Policy) -> Result<Reply, CommandError> {
        self.admin_only("policy")?;
        if let Some(problem) = p.problem() {
            return Err(invalid("policy", problem));
        }
        self.events.push(Event::PolicySet(p));
        Ok(Reply::Done)
    }

    pub(super) fn adopt_rules(&mut self, version: u32) -> Result<Reply, CommandError> {
        self.admin_only("rules")?;
        let in_force = herald_projector::rules(&self.read())?;
        if !herald_projector::rules_may_follow(in_force, version) {
            return Err(CommandError::Conflict {
                reason: format!(
                    "rules version {version} cannot follow version {in_force} (known up to {})",
                    herald_projector::RULES_CURRENT
                ),
            });
        }
        self.events.push(Event::RulesAdopted { version });
        Ok(Reply::Done)
    }
}
