//! `verify`: every record's checksum and the hash chain, then the projection rebuilt from the
//! log into memory and compared with the stored one, pair by pair.

use std::fmt;
use std::path::PathBuf;

use herald_log::LogError;
use herald_projector::{rebuild, stored_projection};

use super::{hex, last_seq, open_existing, Difference, OfflineError, Progress};

/// What [`verify`] checks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyOptions {
    /// The data directory of a stopped server.
    pub data_dir: PathBuf,
}

/// A log whose chain is intact and whose stored projection equals a rebuild.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyReport {
    /// The chain checked: its records, their seqs and the last hash.
    pub chain: herald_log::VerifyReport,
    /// The pairs of the projection.
    pub pairs: usize,
}

impl fmt::Display for VerifyReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "ok: {} records (seq {}..={}), chain intact (last hash {}), projection equal to a rebuild ({} pairs)",
            self.chain.records,
            self.chain.first_seq,
            self.chain.last_seq,
            hex(&self.chain.last_hash),
            self.pairs
        )?;
        match self.chain.first_seq {
            1 => Ok(()),
            first => write!(
                f,
                "; records through seq {} were compacted: the kept log chains to their last hash and starts from a checkpoint",
                first - 1
            ),
        }
    }
}

/// Checks the log's chain, then the stored projection against a rebuild of the log.
pub fn verify(options: &VerifyOptions, progress: &mut dyn Progress) -> Result<VerifyReport, OfflineError> {
    let store = open_existing(&options.data_dir)?;
    let last = last_seq(store.as_ref())?;
    progress.begin("checking the chain", last);
    let chain =
        herald_log::verify(store.as_ref(), &mut |seq| progress.advance(seq)).map_err(|e| match e {
            LogError::Corrupt(c) => OfflineError::Damaged(c),
            other => OfflineError::Unreadable(other),
        })?;
    progress.end();
    progress.begin("rebuilding the projection", last);
    let rebuilt = rebuild(store.as_ref(), &mut |seq| progress.advance(seq)).map_err(OfflineError::Rebuild)?;
    progress.end();
    let stored = stored_projection(store.as_ref()).map_err(OfflineError::Log)?;
    if let Some(difference) = first_difference(&stored, &rebuilt.dump()) {
        return Err(OfflineError::ProjectionDiffers(difference));
    }
    Ok(VerifyReport { chain, pairs: stored.len() })
}

fn first_difference(stored: &[(Vec<u8>, Vec<u8>)], rebuilt: &[(Vec<u8>, Vec<u8>)]) -> Option<Difference> {
    let mut a = stored.iter();
    let mut b = rebuilt.iter();
    loop {
        match (a.next(), b.next()) {
            (None, None) => return None,
            (Some((k, _)), None) => return Some(Difference::ExtraKey(k.clone())),
            (None, Some((k, _))) => return Some(Difference::MissingKey(k.clone())),
            (Some((ka, va)), Some((kb, vb))) => {
                if ka != kb {
                    return Some(Difference::OtherKey { stored: ka.clone(), rebuilt: kb.clone() });
                }
                if va != vb {
                    return Some(Difference::Value { key: ka.clone() });
                }
            }
        }
    }
}
