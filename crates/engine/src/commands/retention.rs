//! Retention: a compaction planned outside the writer, applied inside it (admin only).

use herald_projector::compact::{apply_plan, Plan};
use herald_projector::CompactError;

use super::{CommandError, Reply, Run};

impl Run<'_, '_> {
    pub(super) fn compact(&mut self, plan: Plan) -> Result<Reply, CommandError> {
        self.admin_only("compact")?;
        let (event, report) = apply_plan(self.tx, plan).map_err(|e| match e {
            e @ CompactError::Stale { .. } => CommandError::Conflict { reason: e.to_string() },
            e => CommandError::Internal { message: e.to_string() },
        })?;
        self.events.push(event);
        Ok(Reply::Compacted(report))
    }
}
