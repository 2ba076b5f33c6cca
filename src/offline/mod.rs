//! The offline tools, run on a stopped server's data directory: [`verify`], [`export`],
//! [`import`], [`replay`], [`compact`], [`vacuum`], and the API key tools [`create_key`],
//! [`list_keys`] and [`revoke_key`]. Each opens the store itself (sled's lock
//! refuses a directory a server holds), takes its options as a struct, tells a [`Progress`] how
//! far it got, and returns a typed report or an [`OfflineError`]. None of them prints: the
//! `herald` binary draws the progress bar and writes the messages.
//!
//! ```no_run
//! use herald::offline::{verify, Silent, VerifyOptions};
//!
//! match verify(&VerifyOptions::new("./herald-data"), &mut Silent) {
//!     Ok(report) => println!("{report}"),
//!     Err(e) => eprintln!("herald: {e}"),
//! }
//! ```

use std::path::Path;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use herald_log::{
    check_format, read_head, read_records, Head, LogError, Record, SledStore, Store, StoreError,
};

mod compact;
mod error;
mod export;
mod from_nats;
mod import;
mod keys;
mod partition;
mod replay;
mod replay_index;
mod resident;
mod scratch_store;
mod split;
mod timeline;
mod to_nats;
mod verify;

#[cfg(test)]
mod replay_props;
#[cfg(test)]
mod tests;

pub use compact::{compact, vacuum, CompactOptions, CompactSummary, VacuumOptions, VacuumSummary};
pub use error::{Difference, LineProblem, OfflineError};
pub use export::{export, ExportOptions, ExportReport, REDACTED_NOTE};
pub use from_nats::{export_from_nats, NatsExportOptions};
pub use import::{import, ImportOptions, ImportReport};
pub use keys::{
    create_key, key_hash, list_keys, parse_key_id, parse_org_id, parse_scopes, revoke_key, KeyCreateOptions,
    KeyCreated, KeyList, KeyOwner, KeyProblem, KeyRevokeOptions, KeyRevoked, KeysOptions, KEY_PREFIX,
};
pub use partition::{partition_dir, PartitionId};
pub use replay::{replay, ReplayFormat, ReplayOptions, ReplayRead, ReplayReport, ScanReason, Subject};
pub use split::{split, SplitOptions, SplitProblem, SplitReport, PARTITIONS_MAX};
pub use to_nats::{import_to_nats, NatsImportOptions};
pub use verify::{
    parse_memory, verify, VerifyOptions, VerifyReport, MEMORY_MAX_DEFAULT_BYTES, MEMORY_MAX_LEAST_BYTES,
};

/// Where a tool tells how far it got: one phase after another, each begun, advanced and ended.
pub trait Progress {
    /// A phase named `what` begins; `len` is where it ends (in records, or 0 when not known).
    fn begin(&mut self, what: &str, len: u64);
    /// The phase has reached `position`.
    fn advance(&mut self, position: u64);
    /// The phase is over.
    fn end(&mut self);
}

/// A [`Progress`] that shows nothing.
#[derive(Debug, Clone, Copy, Default)]
pub struct Silent;

impl Progress for Silent {
    fn begin(&mut self, _what: &str, _len: u64) {}
    fn advance(&mut self, _position: u64) {}
    fn end(&mut self) {}
}

const CACHE_BYTES: u64 = 64 * 1024 * 1024;
/// Records read per page while streaming the log.
const PAGE: usize = 4096;

/// Opens a data directory and checks that its store format is one this herald knows.
fn open_store(dir: &Path) -> Result<Arc<SledStore>, OfflineError> {
    open_store_cached(dir, CACHE_BYTES)
}

/// [`open_store`] with a page cache of `cache_bytes`.
fn open_store_cached(dir: &Path, cache_bytes: u64) -> Result<Arc<SledStore>, OfflineError> {
    let store = SledStore::open(dir, cache_bytes).map_err(|e| match e {
        StoreError::InUse(_) => OfflineError::InUse { dir: dir.to_owned() },
        e => OfflineError::Open(LogError::from(e)),
    })?;
    check_format(&store).map_err(OfflineError::Open)?;
    Ok(Arc::new(store))
}

/// Opens an existing data directory.
fn open_existing(dir: &Path) -> Result<Arc<SledStore>, OfflineError> {
    open_existing_cached(dir, CACHE_BYTES)
}

/// [`open_existing`] with a page cache of `cache_bytes`.
fn open_existing_cached(dir: &Path, cache_bytes: u64) -> Result<Arc<SledStore>, OfflineError> {
    if !dir.join("db").exists() && !dir.join("conf").exists() {
        return Err(OfflineError::NoData { dir: dir.to_owned() });
    }
    open_store_cached(dir, cache_bytes)
}

fn last_seq(store: &dyn Store) -> Result<u64, OfflineError> {
    read_head(store).map(|h| h.next_seq - 1).map_err(OfflineError::Log)
}

/// Opens an existing data directory to read its log, and begins the phase `what` over its
/// records. Returns the store and its head (the kept log starts after `head.anchor_seq`).
fn open_to_read(
    dir: &Path,
    what: &str,
    progress: &mut dyn Progress,
) -> Result<(Arc<SledStore>, Head), OfflineError> {
    let store = open_existing(dir)?;
    let last = last_seq(store.as_ref())?;
    progress.begin(what, last);
    let head = read_head(store.as_ref()).map_err(OfflineError::Log)?;
    Ok((store, head))
}

/// Calls `each` with every record after `anchor_seq` in log order, a page at a time, telling
/// `progress` the seq reached after each page.
fn each_record(
    store: &dyn Store,
    anchor_seq: u64,
    progress: &mut dyn Progress,
    mut each: impl FnMut(&Record) -> Result<(), OfflineError>,
) -> Result<(), OfflineError> {
    let mut next = anchor_seq + 1;
    loop {
        let page = read_records(store, next, PAGE).map_err(OfflineError::Log)?;
        let Some(tail) = page.last().map(|r| r.seq) else { return Ok(()) };
        for r in &page {
            each(r)?;
        }
        progress.advance(tail);
        next = tail + 1;
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

/// The system clock's now, in unix milliseconds.
fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn ts(ms: u64) -> String {
    herald_server::ts(ms)
}
