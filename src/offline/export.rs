//! `export`: the log as NDJSON, one record a line with its raw body for `import`; a compacted
//! log's anchor and checkpoint come first.

use std::fmt;
use std::io::Write;
use std::path::PathBuf;

use herald_log::{Record, Store};
use herald_projector::compact::load_checkpoint;
use serde_json::{json, Value};

use super::{b64, each_record, hex, open_to_read, ts, OfflineError, Progress};

/// What [`export`] writes out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportOptions {
    /// The data directory of a stopped server.
    pub data_dir: PathBuf,
    /// Leave out what holds signing secrets: each record's raw body (its event is still written,
    /// secrets redacted, as `/v1/audit/log` shows it) and the checkpoint's values. Such an export
    /// is for reading and sharing; it cannot be imported.
    pub redact_secrets: bool,
}

/// The first line of an export made with [`ExportOptions::redact_secrets`].
pub const REDACTED_NOTE: &str =
    "record bodies and checkpoint values left out (herald export --redact-secrets): this export cannot be imported";

/// What [`export`] wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExportReport {
    /// The records written (the anchor and checkpoint lines not counted).
    pub records: u64,
}

impl fmt::Display for ExportReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "exported {} records", self.records)
    }
}

/// Writes the log as NDJSON on `out`.
pub fn export(
    options: &ExportOptions,
    out: &mut dyn Write,
    progress: &mut dyn Progress,
) -> Result<ExportReport, OfflineError> {
    let (store, head) = open_to_read(&options.data_dir, "exporting", progress)?;
    let redact = options.redact_secrets;
    if redact {
        write_redacted_note(out)?;
    }
    // A compacted log starts from its anchor and checkpoint: they come first.
    if head.anchor_seq > 0 {
        write_line(out, json!({"anchor": {"seq": head.anchor_seq, "hash": hex(&head.anchor_hash)}}))?;
        if !redact {
            write_checkpoint(store.as_ref(), head.anchor_seq, out)?;
        }
    }
    let mut records = 0u64;
    each_record(store.as_ref(), head.anchor_seq, progress, |r| {
        records += 1;
        write_record(out, r, redact)
    })?;
    out.flush().map_err(OfflineError::Write)?;
    progress.end();
    Ok(ExportReport { records })
}

/// One line a checkpoint pair and one a kept payload (after the anchor line).
fn write_checkpoint(store: &dyn Store, anchor_seq: u64, out: &mut dyn Write) -> Result<(), OfflineError> {
    let (tables, payloads) = load_checkpoint(store, anchor_seq).map_err(OfflineError::Compact)?;
    for (key, value) in tables.iter() {
        write_line(out, json!({"checkpoint": {"key": hex(key), "value": b64(value)}}))?;
    }
    for (id, payload) in &payloads {
        write_line(out, json!({"checkpoint_payload": {"event_id": hex(id), "payload": b64(payload)}}))?;
    }
    Ok(())
}

/// The first line of an export made with `redact_secrets`.
pub(super) fn write_redacted_note(out: &mut dyn Write) -> Result<(), OfflineError> {
    write_line(out, json!({ "redacted": REDACTED_NOTE }))
}

/// One record's line, without its raw body when `redact`.
pub(super) fn write_record(out: &mut dyn Write, r: &Record, redact: bool) -> Result<(), OfflineError> {
    let mut line = export_line(r);
    if redact {
        if let Some(fields) = line.as_object_mut() {
            fields.remove("body");
        }
    }
    write_line(out, line)
}

fn write_line(out: &mut dyn Write, line: Value) -> Result<(), OfflineError> {
    writeln!(out, "{line}").map_err(OfflineError::Write)
}

/// One record as an export line: the raw body (base64) for import, who acted and the event
/// for people.
fn export_line(r: &Record) -> Value {
    let (actor, event) = herald_server::audit_record(&r.body);
    json!({
        "seq": r.seq,
        "at": ts(r.at_ms),
        "at_ms": r.at_ms,
        "hash": hex(&r.hash),
        "prev_hash": hex(&r.prev_hash),
        "body": b64(&r.body),
        "actor": actor,
        "event": event,
    })
}
