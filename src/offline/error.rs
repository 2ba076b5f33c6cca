//! What can go wrong in an offline tool: one variant a failure, with its facts, and the message
//! the `herald` binary prints for it.

use std::fmt;
use std::path::{Path, PathBuf};

use herald_log::{CorruptRecord, LogError, StoreError};
use herald_projector::{ApplyError, CompactError, DecodeError, RebuildError};

use herald_cluster::ClusterError;

use super::partition::{PartitionId, CLUSTER_DIR};
use super::{hex, KeyProblem, SplitProblem, Subject};

/// Why an offline tool stopped. [`OfflineError::is_usage`] tells those that say the command line
/// or the data directory cannot be used as given (the binary exits 2 for them) from a failure on
/// the way (exit 1).
#[derive(Debug)]
pub enum OfflineError {
    /// The directory holds no herald data.
    NoData { dir: PathBuf },
    /// The store cannot be opened, or its format is not one this herald knows.
    Open(LogError),
    /// A running herald holds the store: the offline tools read a stopped server's data.
    InUse { dir: PathBuf },
    /// `import` needs an empty store, and this one holds a log.
    NotEmpty { dir: PathBuf },
    /// The log or the store under it failed.
    Log(LogError),
    /// `verify`: a record fails its checksum or the hash chain ([`CorruptRecord::seq`] is the first bad one).
    Damaged(CorruptRecord),
    /// `verify`: the log could not be read through.
    Unreadable(LogError),
    /// `verify`: the log does not fold into a projection.
    Rebuild(RebuildError),
    /// `verify`: the stored projection is not what a rebuild of the log gives.
    ProjectionDiffers(Difference),
    /// `verify`: the scratch store the rebuild goes into failed (in `dir`, deleted afterwards).
    Scratch { dir: PathBuf, error: StoreError },
    /// A compaction's checkpoint, plan or pass failed.
    Compact(CompactError),
    /// `vacuum` could not rewrite the store.
    Vacuum(StoreError),
    /// Writing the output failed.
    Write(std::io::Error),
    /// Reading the input failed.
    Read(std::io::Error),
    /// `import`: a line of the input is not one `export` writes.
    Line { line: u64, problem: LineProblem },
    /// `import`: a record's body does not decode into an event.
    Undecodable(DecodeError),
    /// A record's event does not fold.
    Fold { seq: u64, error: ApplyError },
    /// `replay`: a record's body does not decode into an event.
    Decode { seq: u64, error: DecodeError },
    /// `import`: a record got another seq or hash than the export says: the file was altered.
    NotAsExported { seq: u64, got_seq: u64 },
    /// `import`: the export's checkpoint is refused.
    CheckpointRestore(CompactError),
    /// `import`: checkpoint lines came without the anchor line they stand at.
    CheckpointWithoutAnchor,
    /// `replay`: no record tells of the subject.
    NothingFound(Subject),
    /// `replay`: the checkpoint a compaction kept does not read back.
    CheckpointCorrupt(herald_projector::CorruptValue),
    /// `replay` by index: a record of the story fails its checksum, its chain link to the
    /// record before it, or is missing.
    StoryDamaged(CorruptRecord),
    /// `replay` by index: a row or a record ref of the stored projection does not read back.
    ProjectionCorrupt(herald_projector::CorruptValue),
    /// `replay`: the checkpoint holds a delivery key of the wrong length.
    BadDeliveryKey,
    /// `keys`: the arguments or the key they name cannot be used.
    Key(KeyProblem),
    /// `keys`: the store is folded under rules newer than this binary's.
    NewerRules { rules: u32 },
    /// `keys`: the stored projection does not stand at the log's last record.
    ProjectionBehind { applied: u64, last: u64 },
    /// `keys`: the engine's command failed on what the store holds (a damaged store).
    Command(String),
    /// `keys create`: no randomness for a new key.
    Random(String),
    /// `--partition`: this node's data directory holds no store of the partition.
    NoPartition { partition: PartitionId, dir: PathBuf },
    /// A cluster node's data directory, and no `--partition` given: it holds one store per
    /// partition (those found listed), none of its own.
    ClusterNode { dir: PathBuf, partitions: Vec<PartitionId> },
    /// A partition's stream could not be read or written, or is damaged (what NATS said, or the
    /// stream message and record where its chain breaks).
    Stream { stream: String, error: ClusterError },
    /// `import --to-nats`: the export is of a compacted log, which a stream cannot hold.
    CompactedToStream,
    /// `export --partitions`: the log cannot be split as asked.
    Split(SplitProblem),
}

impl OfflineError {
    /// Whether the command line or the data directory cannot be used as given (exit 2), rather
    /// than a failure on the way (exit 1).
    pub fn is_usage(&self) -> bool {
        matches!(
            self,
            OfflineError::NoData { .. }
                | OfflineError::Open(_)
                | OfflineError::InUse { .. }
                | OfflineError::NotEmpty { .. }
                | OfflineError::Key(_)
                | OfflineError::NewerRules { .. }
                | OfflineError::ProjectionBehind { .. }
                | OfflineError::NoPartition { .. }
                | OfflineError::ClusterNode { .. }
                | OfflineError::CompactedToStream
        ) || matches!(self, OfflineError::Split(p) if p.is_usage())
    }
}

impl From<KeyProblem> for OfflineError {
    fn from(problem: KeyProblem) -> Self {
        OfflineError::Key(problem)
    }
}

/// What [`OfflineError::InUse`] adds to the store's own message.
const IN_USE: &str = ", and the offline tools read a stopped server's data: stop it first, or ask the \
    running server over its API (a delivery's records: GET /v1/webhook_deliveries/{id}/history; the \
    log: GET /v1/audit/log)";

impl fmt::Display for OfflineError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use OfflineError as E;
        match self {
            E::NoData { dir } => write!(f, "{} holds no herald data", dir.display()),
            E::NotEmpty { dir } => {
                write!(f, "{} already holds a log; import needs an empty one", dir.display())
            }
            E::Open(e) | E::Log(e) => write!(f, "{e}"),
            E::InUse { dir } => write!(f, "{}{IN_USE}", StoreError::InUse(dir.display().to_string())),
            E::Damaged(c) => write!(f, "the log is damaged; first bad seq {}: {c}", c.seq),
            E::Unreadable(e) => write!(f, "the log could not be read: {e}"),
            E::Rebuild(e) => write!(f, "{e}"),
            E::ProjectionDiffers(d) => {
                write!(f, "the stored projection differs from a rebuild of the log: {d}")
            }
            E::Scratch { dir, error } => write!(f, "the scratch store in {} failed: {error}", dir.display()),
            E::Compact(e) => write!(f, "{e}"),
            E::Vacuum(e) => write!(f, "{e}"),
            E::Write(e) => write!(f, "writing: {e}"),
            E::Read(e) => write!(f, "reading: {e}"),
            E::Line { line, problem } => write!(f, "line {line}: {problem}"),
            E::Undecodable(e) => write!(f, "a body does not decode: {e}"),
            E::Fold { seq, error } => write!(f, "seq {seq}: {error}"),
            E::Decode { seq, error } => write!(f, "seq {seq}: {error}"),
            E::NotAsExported { seq, got_seq } => {
                write!(f, "record {seq} does not chain as exported (got seq {got_seq}); the file was altered")
            }
            E::CheckpointRestore(e) => write!(f, "the checkpoint cannot be restored: {e}"),
            E::CheckpointWithoutAnchor => write!(f, "a checkpoint without an anchor line"),
            E::NothingFound(subject) => write!(f, "nothing in the log for {subject:?}"),
            E::CheckpointCorrupt(e) => write!(f, "checkpoint: {e}"),
            E::BadDeliveryKey => write!(f, "checkpoint: a bad delivery key"),
            E::StoryDamaged(c) => write!(
                f,
                "the log is damaged at seq {}, a record of this story: {c} (`herald verify` checks the whole log)",
                c.seq
            ),
            E::ProjectionCorrupt(e) => write!(f, "the stored projection: {e}"),
            E::Key(problem) => write!(f, "{problem}"),
            E::NewerRules { rules } => write!(
                f,
                "this store is folded under rules version {rules}, newer than this binary's {}; run the newer binary",
                herald_projector::RULES_CURRENT
            ),
            E::ProjectionBehind { applied, last } => write!(
                f,
                "the projection stands at seq {applied} but the log ends at seq {last}; run `herald verify` on this data directory"
            ),
            E::Command(message) => write!(f, "the command failed: {message}"),
            E::Random(message) => write!(f, "{message}"),
            E::NoPartition { partition, dir } => write!(
                f,
                "{partition} has no store in this node's data directory: {} does not exist",
                dir.display()
            ),
            E::ClusterNode { dir, partitions } => cluster_node(f, dir, partitions),
            E::Stream { stream, error } => write!(f, "{stream}: {error}"),
            E::Split(problem) => write!(f, "{problem}"),
            E::CompactedToStream => f.write_str(
                "this export is of a compacted log (it opens with an anchor and a checkpoint); a partition's \
                 stream holds a whole log from record 1",
            ),
        }
    }
}

impl std::error::Error for OfflineError {}

/// [`OfflineError::ClusterNode`]'s message.
fn cluster_node(f: &mut fmt::Formatter<'_>, dir: &Path, partitions: &[PartitionId]) -> fmt::Result {
    let found: Vec<String> = partitions.iter().map(PartitionId::arg).collect();
    write!(
        f,
        "{} is a cluster node's data directory: each partition has its own store under {} (here: {}); \
         verify, replay and export work on one of them: give --partition N or --partition control",
        dir.display(),
        dir.join(CLUSTER_DIR).display(),
        if found.is_empty() { "none yet".to_owned() } else { found.join(", ") }
    )
}

/// The first place where the stored projection and a rebuild of the log part, in key order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Difference {
    /// The stored projection has a key after the rebuild's last.
    ExtraKey(Vec<u8>),
    /// The rebuild has a key after the stored projection's last.
    MissingKey(Vec<u8>),
    /// At the same place, the two have other keys.
    OtherKey { stored: Vec<u8>, rebuilt: Vec<u8> },
    /// The same key with another value.
    Value { key: Vec<u8> },
}

impl fmt::Display for Difference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Difference::ExtraKey(k) => write!(f, "stored has an extra key {}", hex(k)),
            Difference::MissingKey(k) => write!(f, "stored lacks key {}", hex(k)),
            Difference::OtherKey { stored, rebuilt } => {
                write!(f, "stored key {} where the rebuild has {}", hex(stored), hex(rebuilt))
            }
            Difference::Value { key } => write!(f, "the value of key {} differs", hex(key)),
        }
    }
}

/// What is wrong with a line of an `import`'s input.
#[derive(Debug)]
pub enum LineProblem {
    NotJson(serde_json::Error),
    SecondAnchor,
    AnchorWithoutSeq,
    AnchorWithoutHash,
    CheckpointWithoutKey,
    CheckpointWithoutValue,
    PayloadWithoutEventId,
    PayloadWithoutBytes,
    /// An anchor or checkpoint line after the first record.
    CheckpointAfterRecords,
    NoSeq,
    NoAtMs,
    NoBody,
    NoHash,
    /// The export was made with `--redact-secrets`.
    Redacted,
    /// `import --to-nats`: the record belongs in another partition (`home`).
    OtherPartition {
        home: PartitionId,
    },
}

impl fmt::Display for LineProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use LineProblem as P;
        let text = match self {
            P::NotJson(e) => return write!(f, "not JSON: {e}"),
            P::OtherPartition { home } => {
                return write!(f, "this record belongs in {home}: is this the file of another partition?")
            }
            P::SecondAnchor => "a second anchor",
            P::AnchorWithoutSeq => "an anchor without its seq",
            P::AnchorWithoutHash => "an anchor without its hash",
            P::CheckpointWithoutKey => "a checkpoint pair without its key",
            P::CheckpointWithoutValue => "a checkpoint pair without its value",
            P::PayloadWithoutEventId => "a checkpoint payload without its event id",
            P::PayloadWithoutBytes => "a checkpoint payload without its bytes",
            P::CheckpointAfterRecords => "the anchor and checkpoint must come before the first record",
            P::Redacted => {
                "an export made with --redact-secrets holds no record bodies: it cannot be imported"
            }
            P::NoSeq => "no seq",
            P::NoAtMs => "no at_ms",
            P::NoBody => "no base64 body",
            P::NoHash => "no hash",
        };
        f.write_str(text)
    }
}
