//! The cluster crate's error.

use herald_log::{CorruptRecord, LogError, StoreError};

/// Why a cluster operation failed.
#[derive(Debug, Clone, PartialEq)]
pub enum ClusterError {
    /// NATS did not answer, or refused (what it said).
    Nats(String),
    /// Stream message `stream_seq` does not hold whole, checked records.
    CorruptMessage {
        stream_seq: u64,
        record: CorruptRecord,
    },
    /// Stream message `stream_seq` does not continue the log where the local replica ends.
    Diverged {
        stream_seq: u64,
        why: String,
    },
    Log(LogError),
    /// The NATS server's `max_payload` (bytes, from its information at connect) is below what
    /// herald's largest batch needs.
    MaxPayload {
        server: usize,
        needed: usize,
    },
    /// The settings cannot work (what is wrong).
    Settings(String),
}

impl std::fmt::Display for ClusterError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ClusterError::Nats(why) => write!(f, "NATS: {why}"),
            ClusterError::CorruptMessage { stream_seq, record } => {
                write!(f, "stream message {stream_seq}: {record}")
            }
            ClusterError::Diverged { stream_seq, why } => {
                write!(f, "stream message {stream_seq} does not continue the local log: {why}")
            }
            ClusterError::Log(e) => write!(f, "{e}"),
            ClusterError::MaxPayload { server, needed } => write!(
                f,
                "the NATS server's max_payload is {server} bytes; herald needs at least {needed} \
                 (set max_payload: {needed} in every nats-server's configuration)"
            ),
            ClusterError::Settings(why) => write!(f, "cluster settings: {why}"),
        }
    }
}

impl std::error::Error for ClusterError {}

impl From<LogError> for ClusterError {
    fn from(e: LogError) -> Self {
        ClusterError::Log(e)
    }
}

impl From<StoreError> for ClusterError {
    fn from(e: StoreError) -> Self {
        ClusterError::Log(LogError::Store(e))
    }
}

/// A NATS error as [`ClusterError::Nats`], naming what was being done.
pub(crate) fn nats(doing: &str) -> impl FnOnce(&dyn std::fmt::Display) -> ClusterError + '_ {
    move |e| ClusterError::Nats(format!("{doing}: {e}"))
}
