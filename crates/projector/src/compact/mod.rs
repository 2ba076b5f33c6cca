//! Retention: the log's oldest records are dropped together with the deliveries that were
//! delivered before a cutoff, and the state the kept records start from is kept as a checkpoint.
//!
//! A compaction is planned away from the writer and applied inside it:
//!
//! 1. [`plan`] folds the records after the anchor that are older than the cutoff (at most a
//!    bounded number per pass) into scratch tables that start from the current checkpoint. That
//!    is the state at `through_seq`, the last record to drop. In it, an event whose every delivery
//!    was delivered before the cutoff (or that had none) is a candidate *unit*: the event row,
//!    its idempotency row, its deliveries' rows, index entries and attempts. The new checkpoint is
//!    the scratch state without the candidates, plus the payloads of the events it keeps (their
//!    records are about to go).
//! 2. [`apply_plan`], in the writer's batch, drops each candidate from the live projection only if
//!    its delivery rows are byte for byte what they were at `through_seq` (no later record touched
//!    them); otherwise the unit goes back into the checkpoint. It writes the checkpoint, cuts the
//!    log through `through_seq` (the anchor keeps that record's hash) and returns the
//!    [`Event::Compacted`](crate::Event::Compacted) to append, all in the same atomic batch.
//!
//! Why it is exact: a dropped unit's rows are the same at `through_seq` and at the head, so the
//! live projection minus the unit equals the checkpoint folded forward with the kept records,
//! which is what [`rebuild`](crate::rebuild) and `herald verify` compute. Pending, exhausted and
//! inactive deliveries are never candidates.
//!
//! The parts, one job each: `retention` plans and applies a pass, `checkpoint` reads,
//! writes and hashes the state the kept log starts from, `legacy` converts what an earlier
//! version stored, and `payload` finds an event's payload in the log or the checkpoint.

use herald_log::LogError;

use crate::codec;
use crate::persist::RebuildError;

mod checkpoint;
mod legacy;
mod payload;
mod retention;
#[cfg(test)]
mod tests;

pub use checkpoint::{
    load_checkpoint, load_checkpoint_into, restore_checkpoint, CheckpointView, Payloads, KS_CHECKPOINT,
    KS_CHECKPOINT_META, KS_CHECKPOINT_PAYLOAD,
};
pub use legacy::drop_legacy;
pub use payload::event_payload;
pub use retention::{apply_plan, plan, CompactReport, Compactor, Plan};

/// Why a compaction could not be planned or applied. Nothing was written.
#[derive(Debug, Clone, PartialEq)]
pub enum CompactError {
    Log(LogError),
    /// The records to drop do not fold (a damaged log).
    Rebuild(RebuildError),
    /// The stored checkpoint does not match its hash, or is missing what the anchor needs.
    Checkpoint(String),
    /// Another compaction moved the anchor since this plan was made: plan again.
    Stale {
        planned_at: u64,
        anchor: u64,
    },
}

impl std::fmt::Display for CompactError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CompactError::Log(e) => write!(f, "{e}"),
            CompactError::Rebuild(e) => write!(f, "{e}"),
            CompactError::Checkpoint(e) => write!(f, "checkpoint: {e}"),
            CompactError::Stale { planned_at, anchor } => {
                write!(f, "the plan starts at anchor {planned_at} but the anchor is now {anchor}")
            }
        }
    }
}

impl std::error::Error for CompactError {}

impl From<LogError> for CompactError {
    fn from(e: LogError) -> Self {
        CompactError::Log(e)
    }
}

fn decode_value<T: serde::de::DeserializeOwned>(key: &[u8], value: &[u8]) -> Result<T, CompactError> {
    codec::from_bytes(value).ok_or_else(|| {
        CompactError::Rebuild(RebuildError::Projection(crate::CorruptValue { key: key.to_vec() }))
    })
}

fn corrupt(e: crate::query::CorruptValue) -> CompactError {
    CompactError::Checkpoint(e.to_string())
}
