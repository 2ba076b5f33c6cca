//! `import`: an empty data directory rebuilt from an `export`, every record checked to get the
//! seq and hash it had, then verified.

use std::fmt;
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use herald_log::{Log, LogConfig, Machine, SledStore, Tx, WriteAhead};
use herald_projector::compact::restore_checkpoint;
use herald_projector::{apply, decode, EventId, MemTables, Tables, TxTables};
use serde_json::Value;

use super::split::home;
use super::{
    from_b64, from_hex, last_seq, open_store, verify, LineProblem, OfflineError, PartitionId, Progress,
};
use super::{VerifyOptions, VerifyReport};

/// Records submitted to the log at once.
const BATCH_RECORDS: usize = 512;
/// Body bytes submitted at once, at most (past one record): a batch written ahead to a
/// partition's stream stays far below a message's limit.
const BATCH_BYTES_MAX: usize = 1 << 20;

/// Where [`import`] writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImportOptions {
    /// A data directory that holds no log yet (it is created if missing).
    pub data_dir: PathBuf,
}

/// What [`import`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImportReport {
    /// The records imported (the anchor and checkpoint lines not counted).
    pub records: u64,
    /// The verification of the result.
    pub verified: VerifyReport,
}

impl fmt::Display for ImportReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "imported {} records; verify: {}", self.records, self.verified)
    }
}

/// Appends raw bodies as they were and folds each into the projection: an import.
pub(super) struct Importer;

impl Machine for Importer {
    type Command = Vec<(u64, Vec<u8>)>;
    type Reply = Vec<(u64, [u8; 32])>;
    type Rejection = OfflineError;

    fn execute(&mut self, command: Self::Command, tx: &mut Tx<'_>) -> Result<Self::Reply, OfflineError> {
        let mut out = Vec::with_capacity(command.len());
        for (at_ms, body) in command {
            let event = decode(&body).map_err(OfflineError::Undecodable)?;
            let record = tx.append(at_ms, body);
            let (seq, hash) = (record.seq, record.hash);
            apply(&mut TxTables(tx), seq, at_ms, &event)
                .map_err(|error| OfflineError::Fold { seq, error })?;
            out.push((seq, hash));
        }
        Ok(out)
    }
}

/// Rebuilds an empty data directory from an export read from `input`, checking that every
/// record gets the seq and hash it had, then verifies the result.
pub fn import(
    options: &ImportOptions,
    input: &mut dyn BufRead,
    progress: &mut dyn Progress,
) -> Result<ImportReport, OfflineError> {
    let dir = &options.data_dir;
    let store = open_empty(dir)?;
    let records = import_into(Import::new(store, None), input, progress)?;
    let verified = verify(&VerifyOptions::new(dir.clone()), progress)?;
    Ok(ImportReport { records, verified })
}

/// Opens (creating it if missing) a data directory that holds no log yet.
pub(super) fn open_empty(dir: &Path) -> Result<Arc<SledStore>, OfflineError> {
    let store = open_store(dir)?;
    if last_seq(store.as_ref())? != 0 {
        return Err(OfflineError::NotEmpty { dir: dir.to_owned() });
    }
    Ok(store)
}

/// Reads an export from `input` into `import`; returns the records imported.
pub(super) fn import_into(
    mut import: Import,
    input: &mut dyn BufRead,
    progress: &mut dyn Progress,
) -> Result<u64, OfflineError> {
    progress.begin("importing", 0);
    let mut line = String::new();
    let mut line_no = 0u64;
    loop {
        line.clear();
        if input.read_line(&mut line).map_err(OfflineError::Read)? == 0 {
            break;
        }
        line_no += 1;
        if !line.trim().is_empty() {
            import.line(line_no, &line, progress)?;
        }
    }
    let records = import.finish()?;
    progress.end();
    Ok(records)
}

/// A compacted export opens with its anchor and checkpoint, written before the first record.
#[derive(Default)]
struct Preamble {
    anchor: Option<(u64, [u8; 32])>,
    checkpoint: MemTables,
    payloads: Vec<(EventId, Vec<u8>)>,
}

impl Preamble {
    /// Takes an anchor or checkpoint line; `false` for any other line (a record).
    fn take(&mut self, v: &Value) -> Result<bool, LineProblem> {
        if v.get("redacted").is_some() {
            return Err(LineProblem::Redacted);
        }
        if let Some(a) = v.get("anchor") {
            if self.anchor.is_some() {
                return Err(LineProblem::SecondAnchor);
            }
            let seq = a["seq"].as_u64().filter(|s| *s > 0).ok_or(LineProblem::AnchorWithoutSeq)?;
            let hash = a["hash"].as_str().and_then(from_hex).and_then(|h| <[u8; 32]>::try_from(h).ok());
            self.anchor = Some((seq, hash.ok_or(LineProblem::AnchorWithoutHash)?));
        } else if let Some(c) = v.get("checkpoint") {
            let key = c["key"].as_str().and_then(from_hex).ok_or(LineProblem::CheckpointWithoutKey)?;
            let value = from_b64(c["value"].as_str()).ok_or(LineProblem::CheckpointWithoutValue)?;
            self.checkpoint.put(key, value);
        } else if let Some(c) = v.get("checkpoint_payload") {
            let id = c["event_id"].as_str().and_then(from_hex).and_then(|h| <[u8; 16]>::try_from(h).ok());
            let id = id.ok_or(LineProblem::PayloadWithoutEventId)?;
            let payload = from_b64(c["payload"].as_str()).ok_or(LineProblem::PayloadWithoutBytes)?;
            self.payloads.push((EventId(uuid::Uuid::from_bytes(id)), payload));
        } else {
            return Ok(false);
        }
        Ok(true)
    }

    /// Writes the anchor and checkpoint (if the export had them) and opens the log to import
    /// into, writing ahead to `write_ahead` if given (which takes no checkpoint: a stream holds
    /// a whole log).
    fn start(
        &self,
        store: &Arc<SledStore>,
        write_ahead: Option<Arc<dyn WriteAhead>>,
    ) -> Result<Log<Importer>, OfflineError> {
        match self.anchor {
            Some(_) if write_ahead.is_some() => return Err(OfflineError::CompactedToStream),
            Some((seq, hash)) => {
                restore_checkpoint(store.as_ref(), seq, &self.checkpoint, &self.payloads)
                    .map_err(OfflineError::CheckpointRestore)?;
                herald_log::restore_anchor(store.as_ref(), seq, hash).map_err(OfflineError::Log)?;
            }
            None if !self.checkpoint.is_empty() || !self.payloads.is_empty() => {
                return Err(OfflineError::CheckpointWithoutAnchor);
            }
            None => {}
        }
        match write_ahead {
            Some(write_ahead) => {
                Log::open_write_ahead(store.clone(), Importer, LogConfig::default(), write_ahead)
            }
            None => Log::open(store.clone(), Importer, LogConfig::default()),
        }
        .map_err(OfflineError::Log)
    }
}

/// An import under way: the preamble until the first record, then the log and the records not
/// yet submitted, each with the seq and hash the export says it had.
pub(super) struct Import {
    store: Arc<SledStore>,
    write_ahead: Option<Arc<dyn WriteAhead>>,
    preamble: Preamble,
    log: Option<Log<Importer>>,
    batch: Vec<(u64, Vec<u8>)>,
    expected: Vec<(u64, Vec<u8>)>,
    /// The body bytes of `batch`.
    bytes: usize,
    /// The partition the export must be of, among how many (`import --to-nats`): a record
    /// of another organisation's partition is refused.
    placement: Option<(PartitionId, u32)>,
    records: u64,
}

impl Import {
    /// An import into `store`, its batches written ahead to `write_ahead` if given.
    pub(super) fn new(store: Arc<SledStore>, write_ahead: Option<Arc<dyn WriteAhead>>) -> Import {
        Import {
            store,
            write_ahead,
            bytes: 0,
            placement: None,
            preamble: Preamble::default(),
            log: None,
            batch: Vec::new(),
            expected: Vec::new(),
            records: 0,
        }
    }

    /// Refuses a record that belongs in another partition than `partition` of `partitions`.
    pub(super) fn of_partition(mut self, partition: PartitionId, partitions: u32) -> Import {
        self.placement = Some((partition, partitions));
        self
    }

    /// Takes line `line_no` of the export (not blank).
    fn line(&mut self, line_no: u64, text: &str, progress: &mut dyn Progress) -> Result<(), OfflineError> {
        let bad = |problem| OfflineError::Line { line: line_no, problem };
        let v: Value = serde_json::from_str(text).map_err(|e| bad(LineProblem::NotJson(e)))?;
        if self.log.is_none() {
            if self.preamble.take(&v).map_err(bad)? {
                return Ok(());
            }
            self.log = Some(self.preamble.start(&self.store, self.write_ahead.clone())?);
        } else if v.get("anchor").is_some() || v.get("checkpoint").is_some() {
            return Err(bad(LineProblem::CheckpointAfterRecords));
        }
        let (record, expected) = parse_record(&v).map_err(bad)?;
        if let Some((partition, partitions)) = self.placement {
            let event = decode(&record.1).map_err(OfflineError::Undecodable)?;
            match home(&event, partitions) {
                Some(home) if home != partition => return Err(bad(LineProblem::OtherPartition { home })),
                _ => {}
            }
        }
        self.bytes += record.1.len();
        self.batch.push(record);
        self.expected.push(expected);
        self.records += 1;
        if self.batch.len() >= BATCH_RECORDS || self.bytes >= BATCH_BYTES_MAX {
            self.flush()?;
            progress.advance(self.records);
        }
        Ok(())
    }

    /// Submits the records taken so far and checks each got the seq and hash of the export.
    fn flush(&mut self) -> Result<(), OfflineError> {
        if self.batch.is_empty() {
            return Ok(());
        }
        let Some(log) = &self.log else { return Ok(()) };
        self.bytes = 0;
        let got = log.submit(std::mem::take(&mut self.batch)).map_err(OfflineError::Log)??;
        for ((seq, hash), (want_seq, want_hash)) in got.iter().zip(self.expected.drain(..)) {
            if *seq != want_seq || hash[..] != want_hash[..] {
                return Err(OfflineError::NotAsExported { seq: want_seq, got_seq: *seq });
            }
        }
        Ok(())
    }

    /// Submits the last records and closes the log (opened here if the export held no record).
    /// Returns the records imported.
    fn finish(mut self) -> Result<u64, OfflineError> {
        self.flush()?;
        let log = match self.log.take() {
            Some(log) => log,
            None => self.preamble.start(&self.store, self.write_ahead.clone())?,
        };
        log.close();
        Ok(self.records)
    }
}

/// A record line: its timestamp and body, then the seq and hash it had.
type Parsed = ((u64, Vec<u8>), (u64, Vec<u8>));

fn parse_record(v: &Value) -> Result<Parsed, LineProblem> {
    let seq = v["seq"].as_u64().ok_or(LineProblem::NoSeq)?;
    let at_ms = v["at_ms"].as_u64().ok_or(LineProblem::NoAtMs)?;
    let body = from_b64(v["body"].as_str()).ok_or(LineProblem::NoBody)?;
    let hash = v["hash"].as_str().and_then(from_hex).filter(|h| h.len() == 32).ok_or(LineProblem::NoHash)?;
    Ok(((at_ms, body), (seq, hash)))
}
