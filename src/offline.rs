//! The offline commands, run on a stopped server's data directory: `verify`, `export`, `import`
//! and `replay`. Each opens the store itself (sled's lock refuses a directory a server holds).

use std::collections::BTreeMap;
use std::io::{BufRead, IsTerminal, Write};
use std::path::Path;
use std::sync::Arc;

use base64::Engine as _;
use herald_log::{check_format, read_records, verify, Log, LogConfig, Machine, Record, SledStore, Store, Tx};
use herald_projector::compact::{load_checkpoint, plan, restore_checkpoint, Compactor};
use herald_projector::{
    apply, decode, get_delivery, get_endpoint, get_event, rebuild, stored_projection, AttemptOutcome,
    CompactReport, Delivery, DeliveryId, DeliveryStatus, EndpointId, Event, EventId, MemTables, Tables,
    Trigger, TxTables,
};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::{json, Value};

const CACHE_BYTES: u64 = 64 * 1024 * 1024;
/// Records read per page while streaming the log.
const PAGE: usize = 4096;

/// A failure of an offline command: its message, and the exit code.
pub struct Failure {
    pub message: String,
    pub code: u8,
}

impl Failure {
    fn new(code: u8, message: impl Into<String>) -> Failure {
        Failure { message: message.into(), code }
    }
}

/// Opens an existing data directory.
fn open_existing(dir: &Path) -> Result<Arc<SledStore>, Failure> {
    if !dir.join("db").exists() && !dir.join("conf").exists() {
        return Err(Failure::new(2, format!("{} holds no herald data", dir.display())));
    }
    let store = SledStore::open(dir, CACHE_BYTES).map_err(|e| Failure::new(2, e.to_string()))?;
    check_format(&store).map_err(|e| Failure::new(2, e.to_string()))?;
    Ok(Arc::new(store))
}

/// A progress bar on stderr when stdout and stderr are terminals; nothing otherwise.
fn progress(len: u64, what: &str) -> ProgressBar {
    let bar = ProgressBar::with_draw_target(
        Some(len),
        if std::io::stdout().is_terminal() && std::io::stderr().is_terminal() {
            ProgressDrawTarget::stderr()
        } else {
            ProgressDrawTarget::hidden()
        },
    );
    bar.set_style(
        ProgressStyle::with_template("{msg} {wide_bar} {pos}/{len} records, {per_sec}, {eta} left")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.set_message(what.to_owned());
    bar
}

fn last_seq(store: &dyn Store) -> Result<u64, Failure> {
    herald_log::read_head(store).map(|h| h.next_seq - 1).map_err(|e| Failure::new(1, e.to_string()))
}

/// `herald verify`: every record's checksum and the hash chain, then the projection rebuilt from
/// the log into memory and compared with the stored one, pair by pair.
pub fn verify_dir(dir: &Path) -> Result<String, Failure> {
    let store = open_existing(dir)?;
    let last = last_seq(store.as_ref())?;
    let bar = progress(last, "checking the chain");
    let report = verify(store.as_ref(), &mut |seq| bar.set_position(seq)).map_err(|e| match e {
        herald_log::LogError::Corrupt(c) => {
            Failure::new(1, format!("the log is damaged; first bad seq {}: {c}", c.seq))
        }
        other => Failure::new(1, format!("the log could not be read: {other}")),
    })?;
    bar.finish_and_clear();
    let bar = progress(last, "rebuilding the projection");
    let rebuilt = rebuild(store.as_ref(), &mut |seq| bar.set_position(seq))
        .map_err(|e| Failure::new(1, format!("{e}")))?;
    bar.finish_and_clear();
    let stored = stored_projection(store.as_ref()).map_err(|e| Failure::new(1, e.to_string()))?;
    let rebuilt = rebuilt.dump();
    if let Some(diff) = first_difference(&stored, &rebuilt) {
        return Err(Failure::new(
            1,
            format!("the stored projection differs from a rebuild of the log: {diff}"),
        ));
    }
    let anchor = match report.first_seq {
        1 => String::new(),
        first => format!(
            "; records through seq {} were compacted: the kept log chains to their last hash and starts from a checkpoint",
            first - 1
        ),
    };
    Ok(format!(
        "ok: {} records (seq {}..={}), chain intact (last hash {}), projection equal to a rebuild ({} pairs){anchor}",
        report.records,
        report.first_seq,
        report.last_seq,
        hex(&report.last_hash),
        stored.len()
    ))
}

fn first_difference(stored: &[(Vec<u8>, Vec<u8>)], rebuilt: &[(Vec<u8>, Vec<u8>)]) -> Option<String> {
    let mut a = stored.iter();
    let mut b = rebuilt.iter();
    loop {
        match (a.next(), b.next()) {
            (None, None) => return None,
            (Some((k, _)), None) => return Some(format!("stored has an extra key {}", hex(k))),
            (None, Some((k, _))) => return Some(format!("stored lacks key {}", hex(k))),
            (Some((ka, va)), Some((kb, vb))) => {
                if ka != kb {
                    return Some(format!("stored key {} where the rebuild has {}", hex(ka), hex(kb)));
                }
                if va != vb {
                    return Some(format!("the value of key {} differs", hex(ka)));
                }
            }
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn from_hex(text: &str) -> Option<Vec<u8>> {
    if text.len() % 2 != 0 {
        return None;
    }
    (0..text.len()).step_by(2).map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok()).collect()
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

fn from_b64(text: Option<&str>) -> Option<Vec<u8>> {
    base64::engine::general_purpose::STANDARD.decode(text?).ok()
}

fn ts(ms: u64) -> String {
    herald_server::util::ts(ms)
}

/// One record as an export line: the raw body (base64) for import, the event for people.
fn export_line(r: &Record) -> Value {
    let event = match decode(&r.body) {
        Ok(e) => herald_server::routes::ops::audit_event(&e),
        Err(e) => json!({"type": "Undecodable", "error": e.to_string()}),
    };
    json!({
        "seq": r.seq,
        "at": ts(r.at_ms),
        "at_ms": r.at_ms,
        "hash": hex(&r.hash),
        "prev_hash": hex(&r.prev_hash),
        "body": base64::engine::general_purpose::STANDARD.encode(&r.body),
        "event": event,
    })
}

/// `herald export`: the log as NDJSON on `out`.
pub fn export_dir(dir: &Path, out: &mut dyn Write) -> Result<String, Failure> {
    let store = open_existing(dir)?;
    let last = last_seq(store.as_ref())?;
    let bar = progress(last, "exporting");
    let write = |out: &mut dyn Write, line: Value| {
        writeln!(out, "{line}").map_err(|e| Failure::new(1, format!("writing: {e}")))
    };
    // A compacted log starts from its anchor and checkpoint: they come first.
    let head = herald_log::read_head(store.as_ref()).map_err(|e| Failure::new(1, e.to_string()))?;
    if head.anchor_seq > 0 {
        let (tables, payloads) =
            load_checkpoint(store.as_ref(), head.anchor_seq).map_err(|e| Failure::new(1, e.to_string()))?;
        write(out, json!({"anchor": {"seq": head.anchor_seq, "hash": hex(&head.anchor_hash)}}))?;
        for (key, value) in tables.iter() {
            write(out, json!({"checkpoint": {"key": hex(key), "value": b64(value)}}))?;
        }
        for (id, payload) in &payloads {
            write(out, json!({"checkpoint_payload": {"event_id": hex(id), "payload": b64(payload)}}))?;
        }
    }
    let mut next = head.anchor_seq + 1;
    let mut count = 0u64;
    loop {
        let records = read_records(store.as_ref(), next, PAGE).map_err(|e| Failure::new(1, e.to_string()))?;
        let Some(tail) = records.last().map(|r| r.seq) else { break };
        for r in &records {
            writeln!(out, "{}", export_line(r)).map_err(|e| Failure::new(1, format!("writing: {e}")))?;
            count += 1;
        }
        bar.set_position(tail);
        next = tail + 1;
    }
    out.flush().map_err(|e| Failure::new(1, format!("writing: {e}")))?;
    bar.finish_and_clear();
    Ok(format!("exported {count} records"))
}

/// Appends raw bodies as they were and folds each into the projection: an import.
struct Importer;

impl Machine for Importer {
    type Command = Vec<(u64, Vec<u8>)>;
    type Reply = Vec<(u64, [u8; 32])>;
    type Rejection = String;

    fn execute(&mut self, command: Self::Command, tx: &mut Tx<'_>) -> Result<Self::Reply, String> {
        let mut out = Vec::with_capacity(command.len());
        for (at_ms, body) in command {
            let event = decode(&body).map_err(|e| format!("a body does not decode: {e}"))?;
            let record = tx.append(at_ms, body);
            let (seq, hash) = (record.seq, record.hash);
            apply(&mut TxTables(tx), seq, at_ms, &event).map_err(|e| format!("seq {seq}: {e}"))?;
            out.push((seq, hash));
        }
        Ok(out)
    }
}

/// `herald import`: rebuilds an empty data directory from an export, checking that every record
/// gets the seq and hash it had, then verifies the result.
pub fn import_dir(dir: &Path, input: &mut dyn BufRead) -> Result<String, Failure> {
    let store = Arc::new(SledStore::open(dir, CACHE_BYTES).map_err(|e| Failure::new(2, e.to_string()))?);
    check_format(store.as_ref()).map_err(|e| Failure::new(2, e.to_string()))?;
    if last_seq(store.as_ref())? != 0 {
        return Err(Failure::new(
            2,
            format!("{} already holds a log; import needs an empty one", dir.display()),
        ));
    }
    let bar = progress(0, "importing");
    // A compacted export opens with its anchor and checkpoint, written before the first record.
    let mut anchor: Option<(u64, [u8; 32])> = None;
    let mut checkpoint = MemTables::new();
    let mut payloads: Vec<(EventId, Vec<u8>)> = Vec::new();
    let mut log: Option<Log<Importer>> = None;
    let mut batch: Vec<(u64, Vec<u8>)> = Vec::new();
    let mut expected: Vec<(u64, Vec<u8>)> = Vec::new();
    let mut line_no = 0u64;
    let mut count = 0u64;
    let flush = |log: Option<&Log<Importer>>,
                 batch: &mut Vec<(u64, Vec<u8>)>,
                 expected: &mut Vec<(u64, Vec<u8>)>|
     -> Result<(), Failure> {
        if batch.is_empty() {
            return Ok(());
        }
        let Some(log) = log else { return Ok(()) };
        let got = match log.submit(std::mem::take(batch)) {
            Ok(Ok(got)) => got,
            Ok(Err(e)) => return Err(Failure::new(1, e)),
            Err(e) => return Err(Failure::new(1, e.to_string())),
        };
        for ((seq, hash), (want_seq, want_hash)) in got.iter().zip(expected.drain(..)) {
            if *seq != want_seq || hash[..] != want_hash[..] {
                return Err(Failure::new(
                    1,
                    format!(
                        "record {want_seq} does not chain as exported (got seq {seq}); the file was altered"
                    ),
                ));
            }
        }
        Ok(())
    };
    let mut line = String::new();
    loop {
        line.clear();
        let n = input.read_line(&mut line).map_err(|e| Failure::new(1, format!("reading: {e}")))?;
        if n == 0 {
            break;
        }
        line_no += 1;
        if line.trim().is_empty() {
            continue;
        }
        let bad = |what: &str| Failure::new(1, format!("line {line_no}: {what}"));
        let v: Value = serde_json::from_str(&line).map_err(|e| bad(&format!("not JSON: {e}")))?;
        if log.is_none() {
            if let Some(a) = v.get("anchor") {
                if anchor.is_some() {
                    return Err(bad("a second anchor"));
                }
                let seq =
                    a["seq"].as_u64().filter(|s| *s > 0).ok_or_else(|| bad("an anchor without its seq"))?;
                let hash = a["hash"].as_str().and_then(from_hex).and_then(|h| <[u8; 32]>::try_from(h).ok());
                anchor = Some((seq, hash.ok_or_else(|| bad("an anchor without its hash"))?));
                continue;
            }
            if let Some(c) = v.get("checkpoint") {
                let key = c["key"]
                    .as_str()
                    .and_then(from_hex)
                    .ok_or_else(|| bad("a checkpoint pair without its key"))?;
                let value = from_b64(c["value"].as_str())
                    .ok_or_else(|| bad("a checkpoint pair without its value"))?;
                checkpoint.put(key, value);
                continue;
            }
            if let Some(c) = v.get("checkpoint_payload") {
                let id = c["event_id"].as_str().and_then(from_hex).and_then(|h| <[u8; 16]>::try_from(h).ok());
                let id = id.ok_or_else(|| bad("a checkpoint payload without its event id"))?;
                let payload = from_b64(c["payload"].as_str())
                    .ok_or_else(|| bad("a checkpoint payload without its bytes"))?;
                payloads.push((EventId(uuid::Uuid::from_bytes(id)), payload));
                continue;
            }
            log = Some(start_import(&store, anchor, &checkpoint, &payloads)?);
        } else if v.get("anchor").is_some() || v.get("checkpoint").is_some() {
            return Err(bad("the anchor and checkpoint must come before the first record"));
        }
        let seq = v["seq"].as_u64().ok_or_else(|| bad("no seq"))?;
        let at_ms = v["at_ms"].as_u64().ok_or_else(|| bad("no at_ms"))?;
        let body = v["body"]
            .as_str()
            .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b).ok())
            .ok_or_else(|| bad("no base64 body"))?;
        let hash =
            v["hash"].as_str().and_then(from_hex).filter(|h| h.len() == 32).ok_or_else(|| bad("no hash"))?;
        batch.push((at_ms, body));
        expected.push((seq, hash));
        count += 1;
        if batch.len() >= 512 {
            flush(log.as_ref(), &mut batch, &mut expected)?;
            bar.set_position(count);
        }
    }
    flush(log.as_ref(), &mut batch, &mut expected)?;
    bar.finish_and_clear();
    let log = match log {
        Some(log) => log,
        None => start_import(&store, anchor, &checkpoint, &payloads)?,
    };
    log.close();
    drop(log);
    drop(store);
    let verified = verify_dir(dir)?;
    Ok(format!("imported {count} records; verify: {verified}"))
}

/// Writes the anchor and checkpoint (if the export had them) and opens the log to import into.
fn start_import(
    store: &Arc<SledStore>,
    anchor: Option<(u64, [u8; 32])>,
    checkpoint: &MemTables,
    payloads: &[(EventId, Vec<u8>)],
) -> Result<Log<Importer>, Failure> {
    match anchor {
        Some((seq, hash)) => {
            restore_checkpoint(store.as_ref(), seq, checkpoint, payloads)
                .map_err(|e| Failure::new(1, format!("the checkpoint cannot be restored: {e}")))?;
            herald_log::restore_anchor(store.as_ref(), seq, hash)
                .map_err(|e| Failure::new(1, e.to_string()))?;
        }
        None if !checkpoint.is_empty() || !payloads.is_empty() => {
            return Err(Failure::new(1, "a checkpoint without an anchor line"));
        }
        None => {}
    }
    Log::open(store.clone(), Importer, LogConfig::default()).map_err(|e| Failure::new(1, e.to_string()))
}

/// `herald compact`: drops the history of deliveries delivered more than `retain` ago.
pub fn compact_dir(dir: &Path, retain: std::time::Duration) -> Result<String, Failure> {
    let store = open_existing(dir)?;
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    let cutoff_ms = now_ms.saturating_sub(u64::try_from(retain.as_millis()).unwrap_or(u64::MAX));
    // It writes: a store an earlier version left is converted first, as `herald serve` would.
    herald_projector::compact::drop_legacy(store.clone()).map_err(|e| Failure::new(1, e.to_string()))?;
    herald_log::upgrade_format(store.as_ref()).map_err(|e| Failure::new(1, e.to_string()))?;
    let log = Log::open(store.clone(), Compactor, LogConfig::default())
        .map_err(|e| Failure::new(1, e.to_string()))?;
    let bar = progress(last_seq(store.as_ref())?, "compacting");
    let mut total = CompactReport::default();
    loop {
        let plan = plan(store.as_ref(), cutoff_ms, herald_engine::COMPACT_PASS_RECORDS)
            .map_err(|e| Failure::new(1, e.to_string()))?;
        let Some(plan) = plan else { break };
        let report = match log.submit((now_ms, Box::new(plan))) {
            Ok(Ok(report)) => report,
            Ok(Err(e)) => return Err(Failure::new(1, e.to_string())),
            Err(e) => return Err(Failure::new(1, e.to_string())),
        };
        total.records_dropped += report.records_dropped;
        total.deliveries_dropped += report.deliveries_dropped;
        total.events_dropped += report.events_dropped;
        total.through_seq = report.through_seq;
        bar.set_position(report.through_seq);
    }
    bar.finish_and_clear();
    log.close();
    Ok(match total.records_dropped {
        0 => format!("nothing to compact: no record is older than {}", ts(cutoff_ms)),
        n => format!(
            "dropped {n} records (through seq {}), {} delivered deliveries and {} events older than {}",
            total.through_seq,
            total.deliveries_dropped,
            total.events_dropped,
            ts(cutoff_ms)
        ),
    })
}

/// `herald compact --vacuum`: rewrites the store so the space of dropped data comes back.
pub fn vacuum_dir(dir: &Path) -> Result<String, Failure> {
    drop(open_existing(dir)?);
    let bar = progress(0, "vacuuming (pairs)");
    let report = herald_log::vacuum(dir, CACHE_BYTES, &mut |pairs| bar.set_position(pairs))
        .map_err(|e| Failure::new(1, e.to_string()))?;
    bar.finish_and_clear();
    let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
    Ok(format!(
        "vacuumed: {} pairs rewritten; {:.1} MiB on disk before, {:.1} MiB after",
        report.pairs,
        mib(report.bytes_before),
        mib(report.bytes_after)
    ))
}

/// What `replay` follows.
#[derive(Clone, Copy, Debug)]
pub enum Subject {
    Delivery(DeliveryId),
    Event(EventId),
    Endpoint(EndpointId),
}

/// `herald replay`: the story of a delivery, an event (with its deliveries) or an endpoint (with
/// its deliveries), in log order, folded as it goes so each state change is shown.
pub fn replay_dir(dir: &Path, subject: Subject, ndjson: bool, out: &mut dyn Write) -> Result<(), Failure> {
    let store = open_existing(dir)?;
    let last = last_seq(store.as_ref())?;
    let bar = progress(last, "replaying");
    // A compacted log starts from its checkpoint: the story begins with the state kept there.
    let head = herald_log::read_head(store.as_ref()).map_err(|e| Failure::new(1, e.to_string()))?;
    let (mut tables, _) =
        load_checkpoint(store.as_ref(), head.anchor_seq).map_err(|e| Failure::new(1, e.to_string()))?;
    // The deliveries followed, with the status each had after the last record.
    let mut followed: BTreeMap<DeliveryId, Option<DeliveryStatus>> = BTreeMap::new();
    if let Subject::Delivery(id) = subject {
        followed.insert(id, None);
    }
    let mut found = false;
    if head.anchor_seq > 0 {
        found = write_checkpoint(out, ndjson, &tables, head.anchor_seq, subject, &mut followed)?;
    }
    let mut next = head.anchor_seq + 1;
    loop {
        let records = read_records(store.as_ref(), next, PAGE).map_err(|e| Failure::new(1, e.to_string()))?;
        let Some(tail) = records.last().map(|r| r.seq) else { break };
        for r in &records {
            let event = decode(&r.body).map_err(|e| Failure::new(1, format!("seq {}: {e}", r.seq)))?;
            apply(&mut tables, r.seq, r.at_ms, &event)
                .map_err(|e| Failure::new(1, format!("seq {}: {e}", r.seq)))?;
            // Which records are part of the story.
            let relevant = match (&event, subject) {
                (Event::DeliveryCreated { id, event_id, endpoint_id, .. }, s) => {
                    let take = match s {
                        Subject::Delivery(d) => *id == d,
                        Subject::Event(e) => *event_id == e,
                        Subject::Endpoint(e) => *endpoint_id == Some(e),
                    };
                    if take {
                        followed.entry(*id).or_insert(None);
                    }
                    take
                }
                (Event::EventPublished { id, .. }, Subject::Event(e)) => *id == e,
                (Event::EventPublishedWithDeliveries { id, deliveries, .. }, s) => {
                    let mut take = matches!(s, Subject::Event(e) if *id == e);
                    for d in deliveries {
                        let its = match s {
                            Subject::Delivery(x) => d.id == x,
                            Subject::Event(e) => *id == e,
                            Subject::Endpoint(e) => d.endpoint_id == Some(e),
                        };
                        if its {
                            followed.entry(d.id).or_insert(None);
                            take = true;
                        }
                    }
                    take
                }
                (
                    Event::EndpointCreated { id, .. }
                    | Event::EndpointUpdated { id, .. }
                    | Event::EndpointDeleted { id }
                    | Event::EndpointSecretRotated { id, .. }
                    | Event::EndpointEnabled { id },
                    Subject::Endpoint(e),
                ) => *id == e,
                (
                    Event::AttemptRecorded { delivery_id, .. }
                    | Event::RetriggerRequested { delivery_id, .. }
                    | Event::RedeliverRequested { delivery_id, .. },
                    _,
                ) => followed.contains_key(delivery_id),
                (Event::PolicySet(_) | Event::RulesAdopted { .. }, _) => true,
                _ => false,
            };
            if relevant {
                found |= !matches!(event, Event::PolicySet(_) | Event::RulesAdopted { .. });
                write_step(out, ndjson, r, &event)?;
            }
            // State changes of followed deliveries, whatever record caused them.
            for (id, seen) in followed.iter_mut() {
                let now = get_delivery(&tables, *id).ok().flatten().map(|d| d.status);
                if now.is_some() && now != *seen {
                    if let Some(status) = now {
                        write_state(out, ndjson, r, *id, *seen, status)?;
                    }
                    *seen = now;
                }
            }
        }
        bar.set_position(tail);
        next = tail + 1;
    }
    bar.finish_and_clear();
    if !found {
        return Err(Failure::new(1, format!("nothing in the log for {subject:?}")));
    }
    out.flush().map_err(|e| Failure::new(1, format!("writing: {e}")))
}

/// The part of the story a compaction kept as state: the subject's deliveries as they stood at
/// the anchor, each with its attempts. Returns whether the subject is there.
fn write_checkpoint(
    out: &mut dyn Write,
    ndjson: bool,
    tables: &MemTables,
    anchor_seq: u64,
    subject: Subject,
    followed: &mut BTreeMap<DeliveryId, Option<DeliveryStatus>>,
) -> Result<bool, Failure> {
    let corrupt = |e: herald_projector::Corrupt| Failure::new(1, format!("checkpoint: {e}"));
    let deliveries: Vec<Delivery> = match subject {
        Subject::Delivery(id) => get_delivery(tables, id).map_err(corrupt)?.into_iter().collect(),
        Subject::Event(id) => match get_event(tables, id).map_err(corrupt)? {
            Some(event) => {
                let mut out = Vec::new();
                for d in event.delivery_ids {
                    out.extend(get_delivery(tables, d).map_err(corrupt)?);
                }
                out
            }
            None => Vec::new(),
        },
        Subject::Endpoint(id) => {
            let all = tables.iter().filter(|(k, _)| k.first() == Some(&herald_projector::keys::KS_DELIVERY));
            let mut out = Vec::new();
            for (key, _) in all {
                let id_bytes = <[u8; 16]>::try_from(&key[1..])
                    .map_err(|_| Failure::new(1, "checkpoint: a bad delivery key"))?;
                if let Some(d) =
                    get_delivery(tables, DeliveryId(uuid::Uuid::from_bytes(id_bytes))).map_err(corrupt)?
                {
                    if d.endpoint_id == Some(id) {
                        out.push(d);
                    }
                }
            }
            out
        }
    };
    let endpoint_kept = match subject {
        Subject::Endpoint(id) => get_endpoint(tables, id).map_err(corrupt)?.is_some(),
        _ => false,
    };
    if endpoint_kept && !ndjson {
        writeln!(
            out,
            "(records through seq {anchor_seq} were compacted; endpoint state kept at the checkpoint)"
        )
        .map_err(io)?;
    }
    for d in &deliveries {
        let attempts = herald_projector::attempts(tables, d.id, 0, 1000).map_err(corrupt)?;
        if ndjson {
            let line = json!({"seq": anchor_seq, "type": "Checkpoint", "delivery_id": d.id.to_string(),
                "event_id": d.event_id.to_string(), "status": d.status.name(), "attempt_count": d.attempt_count,
                "attempts": attempts.iter().map(|a| json!({"attempt": a.attempt, "started_at": ts(a.started_at_ms),
                    "status": a.response_status, "error": a.error})).collect::<Vec<_>>()});
            writeln!(out, "{line}").map_err(io)?;
        } else {
            writeln!(
                out,
                "(records through seq {anchor_seq} were compacted) delivery {} of event {}: {} after {} attempts, as kept at the checkpoint",
                d.id, d.event_id, d.status.name(), d.attempt_count
            )
            .map_err(io)?;
            for a in &attempts {
                let result = attempt_result(a.response_status, a.error.as_deref());
                writeln!(out, "    attempt {} started {}: {result}", a.attempt, ts(a.started_at_ms))
                    .map_err(io)?;
            }
        }
        followed.insert(d.id, Some(d.status));
    }
    Ok(endpoint_kept || !deliveries.is_empty())
}

/// How an attempt ended, for the timeline: its answer's status and its error, if any.
fn delivery_created(id: DeliveryId, endpoint_id: Option<EndpointId>, url: &str) -> String {
    match endpoint_id {
        Some(e) => format!("delivery {id} created for endpoint {e} ({url})"),
        None => format!("delivery {id} created for the inline url {url}"),
    }
}

fn attempt_result(status: Option<u16>, error: Option<&str>) -> String {
    match (error, status) {
        (None, Some(s)) => format!("delivered, HTTP {s}"),
        (Some(e), Some(s)) => format!("failed, HTTP {s} ({e})"),
        (Some(e), None) => format!("failed: {e}"),
        (None, None) => "no answer".into(),
    }
}

fn io(e: std::io::Error) -> Failure {
    Failure::new(1, format!("writing: {e}"))
}

fn write_state(
    out: &mut dyn Write,
    ndjson: bool,
    r: &Record,
    id: DeliveryId,
    from: Option<DeliveryStatus>,
    to: DeliveryStatus,
) -> Result<(), Failure> {
    if ndjson {
        let line = json!({"seq": r.seq, "at": ts(r.at_ms), "type": "StateChanged", "delivery_id": id.to_string(),
            "from": from.map(|s| s.name()), "to": to.name()});
        writeln!(out, "{line}").map_err(io)
    } else {
        let from = from.map_or("(new)", |s| s.name());
        writeln!(out, "{}  seq {:>6}    delivery {id}: {from} -> {}", ts(r.at_ms), r.seq, to.name())
            .map_err(io)
    }
}

fn write_step(out: &mut dyn Write, ndjson: bool, r: &Record, event: &Event) -> Result<(), Failure> {
    if ndjson {
        let mut line = herald_server::routes::ops::audit_event(event);
        if let Value::Object(map) = &mut line {
            map.insert("seq".into(), json!(r.seq));
            map.insert("at".into(), json!(ts(r.at_ms)));
        }
        return writeln!(out, "{line}").map_err(io);
    }
    let text = match event {
        Event::PolicySet(p) => format!(
            "policy: retry schedule {:?} ms, {} failures within {} ms make an endpoint inactive",
            p.retry_schedule_ms, p.failures_max, p.failure_window_ms
        ),
        Event::EventPublished { id, org_id, event_type, payload, .. } => {
            format!("event {id} published: {event_type}, {} bytes, organisation {org_id}", payload.len())
        }
        Event::DeliveryCreated { id, endpoint_id, url, .. } => delivery_created(*id, *endpoint_id, url),
        Event::EventPublishedWithDeliveries { id, org_id, event_type, payload, deliveries, .. } => {
            let mut text =
                format!("event {id} published: {event_type}, {} bytes, organisation {org_id}", payload.len());
            for d in deliveries {
                text.push_str("; ");
                text.push_str(&delivery_created(d.id, d.endpoint_id, &d.url));
            }
            text
        }
        Event::AttemptRecorded {
            delivery_id,
            attempt,
            trigger,
            started_at_ms,
            finished_at_ms,
            outcome,
            retry_at_ms,
            ..
        } => {
            let trigger = match trigger {
                Trigger::Auto => "auto",
                Trigger::Manual => "manual",
            };
            let result = match outcome {
                AttemptOutcome::Delivered { status } => attempt_result(Some(*status), None),
                AttemptOutcome::Failed { status, error } => attempt_result(*status, Some(error)),
                AttemptOutcome::Interrupted { error } => {
                    format!("cut short, not a failure ({error}); attempted again at the same step")
                }
            };
            let retry = match retry_at_ms {
                Some(t) => format!("; next automatic attempt at {}", ts(*t)),
                None => String::new(),
            };
            format!(
                "delivery {delivery_id}: attempt {attempt} ({trigger}) started {}, {} ms: {result}{retry}",
                ts(*started_at_ms),
                finished_at_ms.saturating_sub(*started_at_ms)
            )
        }
        Event::RetriggerRequested { delivery_id, by_key, request_id } => format!(
            "delivery {delivery_id}: retrigger requested by {} (request {request_id})",
            by_key.map_or("the admin".to_owned(), |k| format!("API key {k}"))
        ),
        Event::RedeliverRequested { delivery_id, by_key } => format!(
            "delivery {delivery_id}: redeliver requested by {}",
            by_key.map_or("the admin".to_owned(), |k| format!("API key {k}"))
        ),
        Event::EndpointCreated { id, url, name, .. } => format!("endpoint {id} created: {name:?} at {url}"),
        Event::EndpointUpdated { id, url, name, enabled_events } => format!(
            "endpoint {id} updated:{}{}{}",
            url.as_ref().map_or(String::new(), |u| format!(" url {u}")),
            name.as_ref().map_or(String::new(), |n| format!(" name {n:?}")),
            enabled_events.as_ref().map_or(String::new(), |e| format!(" events {e:?}"))
        ),
        Event::EndpointDeleted { id } => format!("endpoint {id} deleted"),
        Event::EndpointSecretRotated { id, previous_expires_at_ms, .. } => {
            format!(
                "endpoint {id}: secret rotated; the previous one signs until {}",
                ts(*previous_expires_at_ms)
            )
        }
        Event::EndpointEnabled { id } => format!("endpoint {id} enabled"),
        Event::RulesAdopted { version } => format!("fold rules version {version} from here on"),
        other => format!("{other:?}"),
    };
    writeln!(out, "{}  seq {:>6}  {text}", ts(r.at_ms), r.seq).map_err(io)
}
