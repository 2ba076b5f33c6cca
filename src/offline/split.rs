//! `export --partitions N --out DIR`: a single node's log written as the logs of a cluster of
//! `N` partitions, one `export` file each (`p<n>.ndjson`, `control.ndjson`), for moving that
//! node into a cluster. Each record goes to its organisation's partition (`partition_of`), API
//! keys to the control partition, and the records every partition folds by (rules adopted,
//! policy) to all of them; in each file the records keep their order, time and body, sealed
//! again in that partition's own chain (seqs from 1). Each file loads with `import` (and
//! `import --to-nats` into the partition's stream).

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use herald_cluster::partition::partition_of;
use herald_log::{Hash, LogError, Record, Store};
use herald_projector::{
    decode, get_delivery, get_endpoint, get_event, get_recovery, CheckedTables, DeliveryId, EndpointId,
    Event, EventId, OrgId, RecoveryId,
};
use uuid::Uuid;

use super::export::write_record;
use super::{each_record, open_to_read, OfflineError, PartitionId, Progress};

/// The most partitions a cluster has (`[cluster] partitions`).
pub const PARTITIONS_MAX: u32 = 1024;

/// What [`split`] splits, and where it writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SplitOptions {
    /// The data directory of a stopped single node.
    pub data_dir: PathBuf,
    /// The cluster's `[cluster] partitions` (1..=1024).
    pub partitions: u32,
    /// The directory the files go in (created if missing; no file of the split may be there).
    pub out_dir: PathBuf,
}

/// What [`split`] wrote: the records read, and each partition's file with its records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SplitReport {
    pub records: u64,
    pub files: Vec<(PartitionId, PathBuf, u64)>,
}

impl fmt::Display for SplitReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let written: u64 = self.files.iter().map(|(_, _, n)| n).sum();
        write!(
            f,
            "split {} records into {} files ({written} records written)",
            self.records,
            self.files.len()
        )
    }
}

/// Why a log cannot be split.
#[derive(Debug)]
pub enum SplitProblem {
    /// Partitions outside 1..=[`PARTITIONS_MAX`].
    Partitions(u32),
    /// The log was compacted: its checkpoint holds state of every organisation at once.
    Compacted { anchor_seq: u64 },
    /// A file of the split is already there.
    Exists(PathBuf),
    /// A file could not be made.
    Create { path: PathBuf, error: std::io::Error },
    /// Record `seq` belongs to no partition this split can tell.
    Record { seq: u64, why: String },
}

impl fmt::Display for SplitProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SplitProblem::Partitions(n) => write!(f, "--partitions {n}: give 1 to {PARTITIONS_MAX}"),
            SplitProblem::Compacted { anchor_seq } => write!(
                f,
                "this log was compacted (records through seq {anchor_seq} are in its checkpoint); a \
                 compacted log cannot be split into partitions yet"
            ),
            SplitProblem::Exists(path) => write!(f, "{} already exists; give an empty --out", path.display()),
            SplitProblem::Create { path, error } => write!(f, "{}: {error}", path.display()),
            SplitProblem::Record { seq, why } => write!(f, "record {seq}: {why}"),
        }
    }
}

impl SplitProblem {
    /// Whether the command line or the data directory cannot be used as given.
    pub fn is_usage(&self) -> bool {
        matches!(self, SplitProblem::Partitions(_) | SplitProblem::Compacted { .. } | SplitProblem::Exists(_))
    }
}

/// Writes the log of `options.data_dir` as one export file per partition (data partitions
/// `0..partitions`, then the control partition) in `options.out_dir`.
pub fn split(options: &SplitOptions, progress: &mut dyn Progress) -> Result<SplitReport, OfflineError> {
    let n = options.partitions;
    if !(1..=PARTITIONS_MAX).contains(&n) {
        return Err(SplitProblem::Partitions(n).into());
    }
    let (store, head) = open_to_read(&options.data_dir, "splitting", progress)?;
    if head.anchor_seq > 0 {
        return Err(SplitProblem::Compacted { anchor_seq: head.anchor_seq }.into());
    }
    let mut outputs = Outputs::create(&options.out_dir, n)?;
    let router = Router { partitions: n, store: store.as_ref() };
    let mut records = 0u64;
    each_record(store.as_ref(), 0, progress, |r| {
        records += 1;
        match router.route(r)? {
            Route::Every => outputs.every(r),
            Route::One(index) => outputs.one(index, r),
        }
    })?;
    progress.end();
    Ok(SplitReport { records, files: outputs.finish()? })
}

/// The partition a record of `event` belongs in among `partitions`, where the event says so:
/// its organisation's, or the control partition for an API key; `None` for the records every
/// partition has (rules, policy) and those that name their object by its id alone.
pub(super) fn home(event: &Event, partitions: u32) -> Option<PartitionId> {
    let org = match event {
        Event::ApiKeyCreated { .. } | Event::ApiKeyRevoked { .. } => return Some(PartitionId::Control),
        Event::OrgSecretSet { org_id, .. }
        | Event::EndpointCreated { org_id, .. }
        | Event::EventPublished { org_id, .. }
        | Event::EventPublishedWithDeliveries { org_id, .. }
        | Event::DeliveryCreated { org_id, .. }
        | Event::RecoveryRequested { org_id, .. } => org_id,
        _ => return None,
    };
    Some(PartitionId::Data(partition_of(org, partitions)))
}

/// Where a record goes: every partition, or the one at an index (data partitions by number,
/// the control partition last).
enum Route {
    Every,
    One(u32),
}

/// The kinds of object a later record names by id alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Endpoint,
    Event,
    Delivery,
    Recovery,
}

/// Which partition each record goes to: its organisation's, read from the record itself or,
/// for a record that names its object by id alone, from the object's row in the stored
/// projection (an uncompacted log's projection holds every object it ever made), so memory
/// does not grow with the log.
struct Router<'s> {
    partitions: u32,
    store: &'s dyn Store,
}

impl Router<'_> {
    fn route(&self, r: &Record) -> Result<Route, OfflineError> {
        let event = decode(&r.body).map_err(|error| OfflineError::Decode { seq: r.seq, error })?;
        let refuse = |why: &str| SplitProblem::Record { seq: r.seq, why: why.into() };
        if let Some(home) = home(&event, self.partitions) {
            return Ok(Route::One(self.index(home)));
        }
        let (kind, id) = match event {
            Event::PolicySet(_) | Event::RulesAdopted { .. } => return Ok(Route::Every),
            Event::EndpointUpdated { id, .. }
            | Event::EndpointDeleted { id }
            | Event::EndpointSecretRotated { id, .. }
            | Event::EndpointEnabled { id }
            | Event::EndpointDeliverySettingsSet { id, .. } => (Kind::Endpoint, id.0),
            Event::AttemptRecorded { delivery_id, .. }
            | Event::RetriggerRequested { delivery_id, .. }
            | Event::RedeliverRequested { delivery_id, .. } => (Kind::Delivery, delivery_id.0),
            Event::RecoveryDeliveries { recovery_id, .. } => (Kind::Recovery, recovery_id.0),
            Event::OrderingKeySet { event_id, .. } => (Kind::Event, event_id.0),
            Event::Compacted { .. } => {
                return Err(refuse("a compaction: a compacted log cannot be split").into())
            }
            Event::PartitionClaimed { .. } => {
                return Err(refuse("a partition's claim: this is already a cluster partition's log").into())
            }
            // Those that name their organisation or are keys: `home` placed them.
            _ => return Err(refuse("a record this split does not know where to put").into()),
        };
        let org = self
            .org_of(kind, id)?
            .ok_or_else(|| refuse(&format!("it names {kind:?} {id}, which the log never made")))?;
        Ok(Route::One(partition_of(&org, self.partitions)))
    }

    /// The index of `partition`'s file: data partitions by number, the control partition last.
    fn index(&self, partition: PartitionId) -> u32 {
        match partition {
            PartitionId::Data(n) => n,
            PartitionId::Control => self.partitions,
        }
    }

    /// The organisation of object `id` of `kind`, from its stored row.
    fn org_of(&self, kind: Kind, id: Uuid) -> Result<Option<OrgId>, OfflineError> {
        let read = CheckedTables::run(self.store, |t| match kind {
            Kind::Endpoint => get_endpoint(t, EndpointId(id)).map(|o| o.map(|o| o.org_id)),
            Kind::Event => get_event(t, EventId(id)).map(|o| o.map(|o| o.org_id)),
            Kind::Delivery => get_delivery(t, DeliveryId(id)).map(|o| o.map(|o| o.org_id)),
            Kind::Recovery => get_recovery(t, RecoveryId(id)).map(|o| o.map(|o| o.org_id)),
        });
        read.map_err(|e| OfflineError::Log(LogError::Store(e)))?.map_err(OfflineError::ProjectionCorrupt)
    }
}

/// One partition's file: where it is, its writer, and its chain so far.
struct Output {
    partition: PartitionId,
    path: PathBuf,
    out: BufWriter<File>,
    records: u64,
    prev_hash: Hash,
}

/// The files of a split, data partitions by number, then the control partition.
struct Outputs(Vec<Output>);

impl Outputs {
    /// Creates every file (none may exist yet) in `dir`.
    fn create(dir: &Path, partitions: u32) -> Result<Outputs, OfflineError> {
        std::fs::create_dir_all(dir).map_err(|error| SplitProblem::Create { path: dir.to_owned(), error })?;
        let names = (0..partitions).map(PartitionId::Data).chain([PartitionId::Control]);
        let mut files = Vec::with_capacity(partitions as usize + 1);
        for partition in names {
            let path = dir.join(format!("{}.ndjson", partition.dir_name()));
            let file = OpenOptions::new().write(true).create_new(true).open(&path).map_err(|error| {
                if error.kind() == std::io::ErrorKind::AlreadyExists {
                    SplitProblem::Exists(path.clone())
                } else {
                    SplitProblem::Create { path: path.clone(), error }
                }
            })?;
            files.push(Output { partition, path, out: BufWriter::new(file), records: 0, prev_hash: [0; 32] });
        }
        Ok(Outputs(files))
    }

    fn every(&mut self, r: &Record) -> Result<(), OfflineError> {
        (0..self.0.len() as u32).try_for_each(|index| self.one(index, r))
    }

    /// Appends `r` to the file at `index`, sealed as that partition's next record.
    fn one(&mut self, index: u32, r: &Record) -> Result<(), OfflineError> {
        let output = &mut self.0[index as usize];
        let sealed = Record::seal(output.records + 1, r.at_ms, r.body.clone(), output.prev_hash);
        write_record(&mut output.out, &sealed, false)?;
        output.records += 1;
        output.prev_hash = sealed.hash;
        Ok(())
    }

    fn finish(self) -> Result<Vec<(PartitionId, PathBuf, u64)>, OfflineError> {
        self.0
            .into_iter()
            .map(|mut o| {
                o.out.flush().map_err(OfflineError::Write)?;
                o.out
                    .into_inner()
                    .map_err(|e| OfflineError::Write(e.into_error()))?
                    .sync_all()
                    .map_err(OfflineError::Write)?;
                Ok((o.partition, o.path, o.records))
            })
            .collect()
    }
}

impl From<SplitProblem> for OfflineError {
    fn from(problem: SplitProblem) -> Self {
        OfflineError::Split(problem)
    }
}
