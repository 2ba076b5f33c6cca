//! Cluster mode's command: a partition claim, the fence a node writes first once it has taken
//! a partition over (see `herald-cluster`).

use herald_projector::{Event, Rules};

use super::{CommandError, Reply, Run};

impl Run<'_, '_> {
    pub(super) fn claim_partition(&mut self, node_id: String, epoch: u64) -> Result<Reply, CommandError> {
        self.admin_only("partition claims")?;
        let in_force = herald_projector::rules(&self.read())?;
        if !Rules(in_force).partition_claims() {
            return Err(CommandError::Conflict {
                reason: format!("a partition claim needs rules version 5; version {in_force} is in force"),
            });
        }
        self.events.push(Event::PartitionClaimed { node_id, epoch });
        Ok(Reply::Done)
    }
}
