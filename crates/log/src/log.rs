//! The log handle: group commit through one writer thread, reads, tails and verification.

use std::ops::ControlFlow;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Sender, TrySendError};

use crate::keyspace;
use crate::record::{head_key, record_keys_end, Assembler, CorruptKind, CorruptRecord, Hash, Record};
use crate::store::{Durability, Store, StoreError, WriteBatch};
use crate::tx::Tx;
use crate::write_ahead::{WriteAhead, WriteAheadError};
use crate::writer::Writer;

/// The on-disk format of the store as a whole (keyspace layout, record and event formats). 2
/// (2026-11-24): the machine may store what format 1 held differently (herald: the delivery
/// indexes in chunks, a publish in one record), so a binary that knows only 1 refuses it. 3
/// (2026-11-24): records may be stored in groups (`record.rs`), which a binary that knows
/// only 2 could not read; a store of 1 or 2 needs no conversion for it. 4 (2026-11-24): the
/// machine may change how it reads later records behind a record of its own that a binary
/// that knows only 3 cannot read (herald: `RulesAdopted`); no conversion. 5 (2026-12-06): the
/// machine may write record bodies of a format a binary that knows only 4 cannot read (herald:
/// event format 2, which names the record's actor), so such a binary refuses the store when it
/// opens it rather than at its first such record; no conversion (older bodies still read).
pub const STORE_FORMAT: u8 = 5;
/// The oldest format this version opens. The machine converts an older store (herald:
/// `drop_legacy`), then [`upgrade_format`] records that it is this version's.
pub const STORE_FORMAT_OLDEST: u8 = 1;

/// Commands the urgent queue holds, at most (see [`Log::submit_urgent_with`]). A bounded channel
/// allocates its slots up front, so it is kept short.
pub const URGENT_QUEUE_COMMANDS: usize = 4_096;

/// How long a writer whose store refused a write waits before its first try to resume; each
/// failed try doubles the wait, up to [`RESUME_WAIT_MAX`].
pub const RESUME_WAIT_FIRST: Duration = Duration::from_millis(50);
/// The longest wait between two tries to resume writing.
pub const RESUME_WAIT_MAX: Duration = Duration::from_secs(2);

/// Limits and durability of a log. Every queue is bounded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogConfig {
    /// Commands committed together in one batch, at most. sled holds a lock that every read
    /// waits for while it applies a batch, and its cost per key grows with the batch past about a
    /// thousand keys: 256 commands (about 2,000 keys of publishes) keep both short.
    pub batch_commands_max: usize,
    /// Commands waiting for the writer, at most; `submit` blocks beyond it, `try_submit` refuses.
    pub queue_commands_max: usize,
    pub durability: Durability,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig { batch_commands_max: 256, queue_commands_max: 65_536, durability: Durability::Sync }
    }
}

/// Errors of the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogError {
    Store(StoreError),
    Corrupt(CorruptRecord),
    /// The data was written by a newer herald whose format this binary does not know.
    NewerFormat {
        found: u8,
        known: u8,
    },
    /// The writer queue is full (only from `try_submit`).
    Busy,
    /// The log was closed before the command was committed.
    Closed,
    /// A cut that cannot be made: only stored records after the anchor can be dropped.
    Cut {
        through_seq: u64,
        anchor_seq: u64,
        next_seq: u64,
    },
    /// The write-ahead did not store the batch: nothing of it was applied (see [`WriteAhead`]).
    WriteAhead(WriteAheadError),
}

impl std::fmt::Display for LogError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LogError::Store(e) => write!(f, "{e}"),
            LogError::Corrupt(c) => write!(f, "corrupt log: {c}"),
            LogError::NewerFormat { found, known } => write!(
                f,
                "the data directory has store format {found}, newer than the {known} this herald knows; \
                 refusing to open it (upgrade herald, nothing was changed)"
            ),
            LogError::Busy => write!(f, "the log's writer queue is full"),
            LogError::Closed => write!(f, "the log is closed"),
            LogError::Cut { through_seq, anchor_seq, next_seq } => write!(
                f,
                "cannot cut the log through seq {through_seq}: only stored records after the anchor \
                 ({anchor_seq}) and before {next_seq} can be dropped"
            ),
            LogError::WriteAhead(e) => write!(f, "{e}; nothing of the batch was applied here"),
        }
    }
}

impl std::error::Error for LogError {}

impl From<StoreError> for LogError {
    fn from(e: StoreError) -> Self {
        LogError::Store(e)
    }
}

impl From<CorruptRecord> for LogError {
    fn from(e: CorruptRecord) -> Self {
        LogError::Corrupt(e)
    }
}

/// What runs inside the writer thread: turns a command into records and projection writes.
///
/// `execute` is called for one command at a time, in queue order, with a [`Tx`] that sees the
/// effects of the commands before it in the same batch. Returning `Err` rejects the command: all
/// it staged is undone and its caller gets the rejection; nothing of it reaches the store.
pub trait Machine: Send + 'static {
    type Command: Send + 'static;
    type Reply: Send + 'static;
    type Rejection: Send + 'static;

    fn execute(&mut self, command: Self::Command, tx: &mut Tx<'_>) -> Result<Self::Reply, Self::Rejection>;

    /// Called once after the batch's last command, before anything of it is written: a machine
    /// that leaves work staged for the whole batch (herald: index entries, folded into their
    /// chunks once per batch rather than once per entry) finishes it here. An error fails the
    /// whole batch: nothing of it is written, and every caller is told.
    fn finish(&mut self, _tx: &mut Tx<'_>) -> Result<(), StoreError> {
        Ok(())
    }

    /// Called once a batch is applied to the store, before its flush, with its records in order.
    /// What it returns runs after that flush, on the flushing thread, told whether the flush
    /// succeeded (when it did not, the batch's callers were told so, although its writes stay
    /// applied and become durable with a later flush).
    fn applied(&mut self, _records: &[Record]) -> AfterFlush {
        None
    }

    /// Called when a batch could not be applied (nothing of it was written): forget anything
    /// remembered from it.
    fn aborted(&mut self) {}
}

/// What a machine asks to run once a batch's flush is done: `true` when it succeeded.
pub type AfterFlush = Option<Box<dyn FnOnce(bool) + Send>>;

/// A machine that only appends record bodies: the log without a projection.
pub struct AppendOnly;

impl Machine for AppendOnly {
    /// `(at_ms, body)` pairs appended in order.
    type Command = Vec<(u64, Vec<u8>)>;
    /// The seqs they got.
    type Reply = Vec<u64>;
    type Rejection = std::convert::Infallible;

    fn execute(&mut self, command: Self::Command, tx: &mut Tx<'_>) -> Result<Vec<u64>, Self::Rejection> {
        Ok(command.into_iter().map(|(at_ms, body)| tx.append(at_ms, body).seq).collect())
    }
}

/// The answer a caller gets: the machine's reply or rejection, or a log error.
pub type Outcome<M> = Result<Result<<M as Machine>::Reply, <M as Machine>::Rejection>, LogError>;
pub(crate) type Callback<M> = Box<dyn FnOnce(Outcome<M>) + Send>;
pub(crate) type Answer<M> = (Callback<M>, Result<<M as Machine>::Reply, <M as Machine>::Rejection>);

pub(crate) enum Msg<M: Machine> {
    Command(M::Command, Callback<M>),
    Stop,
}

/// A command of the urgent queue (see [`Log::submit_urgent_with`]).
pub(crate) type Queued<M> = (<M as Machine>::Command, Callback<M>);

/// Upper bounds (microseconds) of the flush-duration histogram's buckets: from 100 µs (a
/// `flush` durability flush, or an fsync on a fast NVMe disk) through 1-10 ms (a good SSD's fsync)
/// to 1 s (a disk in trouble, which `herald_flush_seconds_max` also shows).
pub const FLUSH_BUCKETS_US: [u64; 12] =
    [100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 1_000_000];

/// Figures of the writer, for metrics.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct WriterStats {
    pub batches: u64,
    pub commands: u64,
    pub records: u64,
    /// Keys put or deleted in the store by the batches counted in `batches` (records,
    /// projection rows, meta): what sled's cost grows with.
    pub store_writes: u64,
    pub failed_batches: u64,
    /// Sum of flush durations, microseconds.
    pub flush_us_total: u64,
    /// The longest single flush (+ fsync), microseconds: a stall of the disk shows here.
    pub flush_us_max: u64,
    /// Flushes by duration: `flush_us_buckets[i]` counts those that took at most
    /// [`FLUSH_BUCKETS_US`]`[i]` and more than the bound before; the last slot, the longer ones.
    pub flush_us_buckets: [u64; FLUSH_BUCKETS_US.len() + 1],
    pub last_batch_commands: u64,
    /// Whether the last batch that had something to write failed (a full disk, a broken store):
    /// until one succeeds, writes are being refused.
    pub last_batch_failed: bool,
}

pub(crate) struct Shared {
    /// The last durable seq (0 before any record).
    pub(crate) committed: Mutex<u64>,
    pub(crate) wake: Condvar,
    pub(crate) stats: Mutex<WriterStats>,
    /// Why the store refuses writes, while it does: set by a failed apply, flush or read of a
    /// batch, cleared once the writer has reopened the store and a probe write went through.
    pub(crate) refusal: Mutex<Option<StoreError>>,
    /// Set for good once the write-ahead fenced this writer off: every later command is
    /// refused with it.
    pub(crate) fenced: Mutex<Option<WriteAheadError>>,
}

impl Shared {
    pub(crate) fn refusal(&self) -> Option<StoreError> {
        self.refusal.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub(crate) fn fenced(&self) -> Option<WriteAheadError> {
        self.fenced.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub(crate) fn set_refusal(&self, e: Option<StoreError>) {
        *self.refusal.lock().unwrap_or_else(|e| e.into_inner()) = e;
    }

    /// Records that every seq through `seq` is durable and wakes the tails. The durable seq only
    /// grows: a later batch's flush covers the batches before it.
    pub(crate) fn committed_through(&self, seq: u64) {
        let mut committed = self.committed.lock().unwrap_or_else(|e| e.into_inner());
        *committed = (*committed).max(seq);
        self.wake.notify_all();
    }
}

/// The durable append-only log. Cloning gives another handle to the same log.
pub struct Log<M: Machine> {
    inner: Arc<Inner<M>>,
}

impl<M: Machine> Clone for Log<M> {
    fn clone(&self) -> Self {
        Log { inner: self.inner.clone() }
    }
}

struct Inner<M: Machine> {
    send: Sender<Msg<M>>,
    /// The urgent queue: each batch takes from it before the ordinary queue.
    urgent: Sender<Queued<M>>,
    store: Arc<dyn Store>,
    shared: Arc<Shared>,
    writer: Mutex<Option<JoinHandle<()>>>,
    /// Set by [`Log::close`] and [`Log::close_within`]: every later command is refused, even
    /// when the stop could not be queued (a full queue behind a stalled writer).
    closed: std::sync::atomic::AtomicBool,
}

impl<M: Machine> Inner<M> {
    fn is_closed(&self) -> bool {
        self.closed.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl<M: Machine> Drop for Inner<M> {
    fn drop(&mut self) {
        // A writer left behind by `close_within` is not waited for: dropping the senders ends it
        // once it has drained what it holds.
        if let Some(h) = self.writer.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = self.send.send(Msg::Stop);
            let _ = h.join();
        }
    }
}

/// Where the log stands after open: the next seq and the hash to chain it to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Head {
    pub next_seq: u64,
    pub last_hash: Hash,
    /// The anchor: the kept log starts after this seq and hash.
    pub anchor_seq: u64,
    pub anchor_hash: Hash,
}

/// Reads the anchor and the last record, checking the last record in full.
pub fn read_head(store: &dyn Store) -> Result<Head, LogError> {
    let (anchor_seq, anchor_hash) = read_anchor(store)?;
    let last = store.last(&head_key(0), &record_keys_end())?;
    let Some((key, _)) = last else {
        return Ok(Head { next_seq: anchor_seq + 1, last_hash: anchor_hash, anchor_seq, anchor_hash });
    };
    if key.len() < 9 {
        return Err(CorruptRecord { seq: anchor_seq + 1, kind: CorruptKind::StrayKey }.into());
    }
    let seq = u64::from_be_bytes(key[1..9].try_into().expect("9 bytes"));
    // The last key holds the last record, or the last group of them.
    let mut recs = read_records(store, seq, crate::record::GROUP_RECORDS_MAX)?;
    match recs.pop() {
        Some(r) => Ok(Head { next_seq: r.seq + 1, last_hash: r.hash, anchor_seq, anchor_hash }),
        None => Err(CorruptRecord { seq, kind: CorruptKind::Truncated }.into()),
    }
}

pub(crate) fn read_anchor(store: &dyn Store) -> Result<(u64, Hash), LogError> {
    parse_anchor(store.get(keyspace::META_ANCHOR)?)
}

/// The anchor's stored value: seq (8 bytes, BE) ++ hash (32 bytes); absent means never compacted.
pub(crate) fn parse_anchor(value: Option<Vec<u8>>) -> Result<(u64, Hash), LogError> {
    match value {
        None => Ok((0, [0; 32])),
        Some(v) if v.len() == 40 => {
            let seq = u64::from_be_bytes(v[..8].try_into().expect("8 bytes"));
            let hash: Hash = v[8..].try_into().expect("32 bytes");
            Ok((seq, hash))
        }
        Some(_) => Err(CorruptRecord { seq: 0, kind: CorruptKind::Truncated }.into()),
    }
}

/// Sets the anchor of an empty log (an import of a compacted log): its first record will be
/// `seq + 1`, chained to `hash`. Refused once the log holds a record or an anchor.
pub fn restore_anchor(store: &dyn Store, seq: u64, hash: Hash) -> Result<(), LogError> {
    let head = read_head(store)?;
    if head.next_seq != 1 || head.anchor_seq != 0 {
        return Err(LogError::Cut { through_seq: seq, anchor_seq: head.anchor_seq, next_seq: head.next_seq });
    }
    let mut b = WriteBatch::default();
    b.put(keyspace::META_ANCHOR.to_vec(), [&seq.to_be_bytes()[..], &hash].concat());
    store.apply(&b)?;
    Ok(())
}

/// Checks the store's format byte, writing it into a new store. A newer format is refused
/// without writing anything; an older one this version opens ([`STORE_FORMAT_OLDEST`]) is
/// accepted as it is.
pub fn check_format(store: &dyn Store) -> Result<(), LogError> {
    match store.get(keyspace::META_FORMAT)? {
        Some(v) if v.len() == 1 && (STORE_FORMAT_OLDEST..=STORE_FORMAT).contains(&v[0]) => Ok(()),
        Some(v) if v.len() == 1 && v[0] > STORE_FORMAT => {
            Err(LogError::NewerFormat { found: v[0], known: STORE_FORMAT })
        }
        Some(v) => Err(LogError::NewerFormat { found: v.first().copied().unwrap_or(0), known: STORE_FORMAT }),
        None => {
            let mut b = WriteBatch::default();
            b.put(keyspace::META_FORMAT.to_vec(), vec![STORE_FORMAT]);
            store.apply(&b)?;
            store.flush(Durability::Sync)?;
            Ok(())
        }
    }
}

/// Records that the store is in this version's format, once whatever converts an older one
/// has written its conversion; returns whether the byte moved. A newer format is refused.
pub fn upgrade_format(store: &dyn Store) -> Result<bool, LogError> {
    check_format(store)?;
    if store.get(keyspace::META_FORMAT)?.as_deref() == Some(&[STORE_FORMAT][..]) {
        return Ok(false);
    }
    let mut b = WriteBatch::default();
    b.put(keyspace::META_FORMAT.to_vec(), vec![STORE_FORMAT]);
    store.apply(&b)?;
    store.flush(Durability::Sync)?;
    Ok(true)
}

/// Reads up to `limit` records from `from_seq` on, each checked (checksum, chain within the range).
pub fn read_records(store: &dyn Store, from_seq: u64, limit: usize) -> Result<Vec<Record>, LogError> {
    let mut out = Vec::new();
    if limit == 0 {
        return Ok(out);
    }
    // `from_seq` may be inside a group stored under an earlier record's key.
    let start = match store.last(&head_key(0), &head_key(from_seq.saturating_add(1)))? {
        Some((key, value)) if key.len() == 9 && crate::record::is_group(&value) => key,
        _ => head_key(from_seq),
    };
    let mut asm = Assembler::new(None);
    let mut bad = None;
    let mut got = Vec::new();
    store.scan(&start, &record_keys_end(), &mut |k, v| {
        if let Err(c) = asm.push_all(k, v, &mut got) {
            bad = Some(c);
            return ControlFlow::Break(());
        }
        out.extend(got.drain(..).filter(|r| r.seq >= from_seq));
        if out.len() >= limit {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        }
    })?;
    if let Some(c) = bad {
        return Err(c.into());
    }
    if out.len() < limit {
        asm.finish()?;
    }
    out.truncate(limit);
    Ok(out)
}

/// The record at `seq`, read by key (its head, then its continuation chunks): unlike
/// [`read_records`], a read of single keys, which a [`CachedStore`](crate::CachedStore) can
/// answer. `None`: no record has that seq.
pub fn read_record(store: &dyn Store, seq: u64) -> Result<Option<Record>, LogError> {
    let own_key = head_key(seq);
    let mut head = store.get(&own_key)?;
    if head.is_none() {
        // Inside a group stored under an earlier record's key, or no record. The seek takes in
        // `seq`'s own key too: a cut through the group may have stored the rest of it there
        // since the `get` (`Tx::cut_through`), and either state answers.
        let through_own = [own_key.as_slice(), &[0]].concat();
        match store.last(&head_key(0), &through_own)? {
            Some((key, value)) if key == own_key => head = Some(value),
            Some((key, value)) if key.len() == 9 && crate::record::is_group(&value) => {
                return Ok(in_group(&key, &value, seq)?);
            }
            _ => return Ok(None),
        }
    }
    let head = match head {
        Some(head) if !crate::record::is_group(&head) => head,
        Some(group) => return Ok(in_group(&own_key, &group, seq)?),
        None => return Ok(None),
    };
    let mut asm = Assembler::new(Some(seq));
    let mut next = asm.push(&head_key(seq), &head)?;
    let mut index: u16 = 1;
    while next.is_none() {
        let key = crate::record::chunk_key(seq, index);
        let Some(part) = store.get(&key)? else {
            return Err(CorruptRecord { seq, kind: CorruptKind::Truncated }.into());
        };
        next = asm.push(&key, &part)?;
        index = index.checked_add(1).ok_or(CorruptRecord { seq, kind: CorruptKind::Truncated })?;
    }
    Ok(next)
}

/// The record at `seq`, read by key as [`read_record`] reads it (its checksum and its own hash
/// checked), and chained: its `prev_hash` is the hash of the record at `seq - 1`, read too, or
/// the anchor's when `seq - 1` is the anchor. For a record an index names: a missing one, or one
/// at or before the anchor, is [`CorruptKind::Missing`].
pub fn read_record_linked(store: &dyn Store, seq: u64, anchor: (u64, Hash)) -> Result<Record, LogError> {
    let missing = |seq| LogError::Corrupt(CorruptRecord { seq, kind: CorruptKind::Missing });
    let (anchor_seq, anchor_hash) = anchor;
    if seq <= anchor_seq {
        return Err(missing(seq));
    }
    let record = read_record(store, seq)?.ok_or_else(|| missing(seq))?;
    let prev_hash = if seq - 1 == anchor_seq {
        anchor_hash
    } else {
        read_record(store, seq - 1)?.ok_or_else(|| missing(seq - 1))?.hash
    };
    if record.prev_hash != prev_hash {
        return Err(CorruptRecord { seq, kind: CorruptKind::ChainBroken }.into());
    }
    Ok(record)
}

/// Record `seq` of the group stored at `key`, if it holds it.
fn in_group(key: &[u8], value: &[u8], seq: u64) -> Result<Option<Record>, CorruptRecord> {
    let mut records = Vec::new();
    Assembler::new(None).push_all(key, value, &mut records)?;
    Ok(records.into_iter().find(|r| r.seq == seq))
}

/// The result of a clean [`verify`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyReport {
    pub records: u64,
    pub first_seq: u64,
    pub last_seq: u64,
    pub last_hash: Hash,
}

/// Checks every record: format, checksum, no gap, and the hash chain from the anchor on.
/// `progress` is called now and then with the seq reached.
pub fn verify(store: &dyn Store, progress: &mut dyn FnMut(u64)) -> Result<VerifyReport, LogError> {
    verify_paged(store, usize::MAX, &mut || Ok(()), progress)
}

/// [`verify`] reading at most `page_keys` stored keys per scan of the store, and calling
/// `between` after each page, when no scan is open: a caller may then flush or reopen the store
/// (its error ends the check).
pub fn verify_paged(
    store: &dyn Store,
    page_keys: usize,
    between: &mut dyn FnMut() -> Result<(), StoreError>,
    progress: &mut dyn FnMut(u64),
) -> Result<VerifyReport, LogError> {
    verify_paged_each(store, page_keys, between, progress, &mut |_| ControlFlow::Continue(()))
}

/// [`verify_paged`] handing each record (its own, to keep) to `each` once it is checked (its checksum, and its
/// link to the record before it or to the anchor), in log order: one pass for a reader that
/// needs every record and the chain checked, as `herald verify` does. When `each` breaks, the
/// check stops there and returns what it checked up to then (the caller knows why it broke).
pub fn verify_paged_each(
    store: &dyn Store,
    page_keys: usize,
    between: &mut dyn FnMut() -> Result<(), StoreError>,
    progress: &mut dyn FnMut(u64),
    each: &mut dyn FnMut(Record) -> ControlFlow<()>,
) -> Result<VerifyReport, LogError> {
    let (anchor_seq, anchor_hash) = read_anchor(store)?;
    let mut asm = Assembler::new(Some(anchor_seq + 1)).with_prev_hash(anchor_hash);
    let mut report =
        VerifyReport { records: 0, first_seq: anchor_seq + 1, last_seq: anchor_seq, last_hash: anchor_hash };
    let (mut bad, mut stopped) = (None, false);
    let mut got = Vec::new();
    let (mut from, end) = (head_key(0), record_keys_end());
    loop {
        let mut keys = 0usize;
        let mut page_end = None;
        store.scan(&from, &end, &mut |k, v| {
            if let Err(c) = asm.push_all(k, v, &mut got) {
                bad = Some(c);
                return ControlFlow::Break(());
            }
            for r in got.drain(..) {
                report.records += 1;
                report.last_seq = r.seq;
                report.last_hash = r.hash;
                if r.seq % 65_536 == 0 {
                    progress(r.seq);
                }
                if each(r).is_break() {
                    stopped = true;
                    return ControlFlow::Break(());
                }
            }
            keys += 1;
            if keys >= page_keys {
                page_end = Some(k.to_vec());
                return ControlFlow::Break(());
            }
            ControlFlow::Continue(())
        })?;
        if let Some(c) = bad {
            return Err(c.into());
        }
        if stopped {
            return Ok(report);
        }
        // The next page starts just past the last key read: that key with a zero byte after it.
        let Some(mut next) = page_end else { break };
        next.push(0);
        from = next;
        between()?;
    }
    asm.finish()?;
    progress(report.last_seq);
    Ok(report)
}

impl<M: Machine> Log<M> {
    /// Opens the log on `store`: checks the format and the last record, then starts the writer.
    pub fn open(store: Arc<dyn Store>, machine: M, config: LogConfig) -> Result<Log<M>, LogError> {
        Log::start(store, machine, config, None)
    }

    /// [`Log::open`] with a write-ahead: each batch that has records is handed to `write_ahead`
    /// before it is applied, and applied only if that succeeded (see [`WriteAhead`]).
    pub fn open_write_ahead(
        store: Arc<dyn Store>,
        machine: M,
        config: LogConfig,
        write_ahead: Arc<dyn WriteAhead>,
    ) -> Result<Log<M>, LogError> {
        Log::start(store, machine, config, Some(write_ahead))
    }

    fn start(
        store: Arc<dyn Store>,
        machine: M,
        config: LogConfig,
        write_ahead: Option<Arc<dyn WriteAhead>>,
    ) -> Result<Log<M>, LogError> {
        check_format(store.as_ref())?;
        let head = read_head(store.as_ref())?;
        let shared = Arc::new(Shared {
            committed: Mutex::new(head.next_seq - 1),
            wake: Condvar::new(),
            stats: Mutex::new(WriterStats::default()),
            refusal: Mutex::new(None),
            fenced: Mutex::new(None),
        });
        let (send, recv) = crossbeam_channel::bounded(config.queue_commands_max.max(1));
        let (urgent, urgent_recv) =
            crossbeam_channel::bounded(URGENT_QUEUE_COMMANDS.min(config.queue_commands_max).max(1));
        let writer = Writer::new(store.clone(), machine, config, shared.clone(), head, write_ahead);
        let handle = std::thread::Builder::new()
            .name("herald-log-writer".into())
            .spawn(move || writer.run(urgent_recv, recv))
            .map_err(|e| LogError::Store(StoreError::Io(format!("spawning the writer: {e}"))))?;
        Ok(Log {
            inner: Arc::new(Inner {
                send,
                urgent,
                store,
                shared,
                writer: Mutex::new(Some(handle)),
                closed: Default::default(),
            }),
        })
    }

    /// Queues a command; `done` is called from the writer thread once it is durable (or failed).
    /// Blocks while the queue is full.
    pub fn submit_with(&self, command: M::Command, done: impl FnOnce(Outcome<M>) + Send + 'static) {
        if self.inner.is_closed() {
            return done(Err(LogError::Closed));
        }
        if let Err(e) = self.inner.send.send(Msg::Command(command, Box::new(done))) {
            if let Msg::Command(_, cb) = e.into_inner() {
                cb(Err(LogError::Closed));
            }
        }
    }

    /// Like [`Log::submit_with`], but the command goes to the urgent queue, which every batch
    /// empties (up to `batch_commands_max`) before it takes from the ordinary one: a command that
    /// must not wait behind a backlog of ordinary ones (an attempt's outcome behind a burst of
    /// publishes) is in the next batch. The urgent queue holds [`URGENT_QUEUE_COMMANDS`]; when it
    /// is full the command joins the ordinary queue (blocking while that one is full).
    pub fn submit_urgent_with(&self, command: M::Command, done: impl FnOnce(Outcome<M>) + Send + 'static) {
        if self.inner.is_closed() {
            return done(Err(LogError::Closed));
        }
        match self.inner.urgent.try_send((command, Box::new(done))) {
            Ok(()) => {}
            Err(TrySendError::Full((command, cb))) => self.submit_with(command, cb),
            Err(TrySendError::Disconnected((_, cb))) => cb(Err(LogError::Closed)),
        }
    }

    /// Whether [`Log::submit_urgent_with`] would block now (both queues full): async callers
    /// then submit from a blocking thread, not from a runtime worker.
    pub fn urgent_submit_would_block(&self) -> bool {
        self.inner.urgent.is_full() && self.inner.send.is_full()
    }

    /// Like [`Log::submit_urgent_with`], but never blocks: when both queues are full the command
    /// is refused with [`LogError::Busy`].
    pub fn try_submit_urgent_with(
        &self,
        command: M::Command,
        done: impl FnOnce(Outcome<M>) + Send + 'static,
    ) {
        if self.inner.is_closed() {
            return done(Err(LogError::Closed));
        }
        match self.inner.urgent.try_send((command, Box::new(done))) {
            Ok(()) => {}
            Err(TrySendError::Full((command, cb))) => self.try_submit_with(command, cb),
            Err(TrySendError::Disconnected((_, cb))) => cb(Err(LogError::Closed)),
        }
    }

    /// Like [`Log::submit_with`] but refuses with [`LogError::Busy`] when the queue is full.
    pub fn try_submit_with(&self, command: M::Command, done: impl FnOnce(Outcome<M>) + Send + 'static) {
        if self.inner.is_closed() {
            return done(Err(LogError::Closed));
        }
        match self.inner.send.try_send(Msg::Command(command, Box::new(done))) {
            Ok(()) => {}
            Err(TrySendError::Full(Msg::Command(_, cb))) => cb(Err(LogError::Busy)),
            Err(TrySendError::Disconnected(Msg::Command(_, cb))) => cb(Err(LogError::Closed)),
            Err(_) => {}
        }
    }

    /// Submits a command and waits until it is durable.
    pub fn submit(&self, command: M::Command) -> Outcome<M> {
        let (tx, rx) = crossbeam_channel::bounded(1);
        self.submit_with(command, move |out| {
            let _ = tx.send(out);
        });
        rx.recv().unwrap_or(Err(LogError::Closed))
    }

    pub fn store(&self) -> &Arc<dyn Store> {
        &self.inner.store
    }

    /// The last durable seq.
    pub fn committed_seq(&self) -> u64 {
        *self.inner.shared.committed.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn stats(&self) -> WriterStats {
        *self.inner.shared.stats.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Why the store refuses writes, while it does (a full disk): every command is refused with
    /// this error, without running, until the writer has reopened the store and a probe write
    /// went through. The writer tries by itself, at growing intervals up to [`RESUME_WAIT_MAX`].
    pub fn refusal(&self) -> Option<StoreError> {
        self.inner.shared.refusal()
    }

    /// Why the write-ahead fenced this log off, once it has: every command is refused with it
    /// from then on (another writer has taken the log over).
    pub fn fenced(&self) -> Option<WriteAheadError> {
        self.inner.shared.fenced()
    }

    /// Up to `limit` durable records from `from_seq` on.
    pub fn read(&self, from_seq: u64, limit: usize) -> Result<Vec<Record>, LogError> {
        let committed = self.committed_seq();
        if from_seq > committed {
            return Ok(Vec::new());
        }
        let limit = limit.min((committed - from_seq + 1).try_into().unwrap_or(usize::MAX));
        read_records(self.inner.store.as_ref(), from_seq, limit)
    }

    /// A reader that follows the log from `from_seq` on, waking when new records are durable.
    pub fn tail(&self, from_seq: u64) -> Tail<M> {
        Tail { log: self.clone(), cursor: from_seq }
    }

    /// Stops the writer after the commands already queued ahead of the stop; later ones fail with
    /// [`LogError::Closed`]. Other handles see a closed log.
    pub fn close(&self) {
        self.inner.closed.store(true, std::sync::atomic::Ordering::SeqCst);
        let _ = self.inner.send.send(Msg::Stop);
        if let Some(h) = self.inner.writer.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = h.join();
        }
    }

    /// [`Log::close`] within `within`: true if the writer stopped in time. If not (a stalled
    /// disk, a long queue), the writer is left to finish in the background and nothing waits for
    /// it, not even this log's drop; commands are refused from here on either way. What it has
    /// not made durable when the process ends is lost as in a crash, and none of it was
    /// acknowledged. The store stays open until the writer ends: sled's directory lock refuses a
    /// second open of the same directory meanwhile.
    pub fn close_within(&self, within: Duration) -> bool {
        self.inner.closed.store(true, std::sync::atomic::Ordering::SeqCst);
        let deadline = Instant::now() + within;
        let _ = self.inner.send.send_timeout(Msg::Stop, within);
        let mut writer = self.inner.writer.lock().unwrap_or_else(|e| e.into_inner());
        let Some(h) = writer.take() else { return true };
        while !h.is_finished() {
            if Instant::now() >= deadline {
                return false; // the handle is dropped: detached
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        let _ = h.join();
        true
    }
}

/// Follows the log: each call returns the durable records after the cursor, waiting for some.
/// The wake-up is only a hint; what is returned always comes from a range read of the store.
pub struct Tail<M: Machine> {
    log: Log<M>,
    cursor: u64,
}

impl<M: Machine> Tail<M> {
    /// Waits up to `timeout` for records at or after the cursor; returns up to `limit` of them.
    pub fn next(&mut self, limit: usize, timeout: Duration) -> Result<Vec<Record>, LogError> {
        let deadline = Instant::now() + timeout;
        let shared = &self.log.inner.shared;
        let mut committed = shared.committed.lock().unwrap_or_else(|e| e.into_inner());
        while *committed < self.cursor {
            let now = Instant::now();
            if now >= deadline {
                return Ok(Vec::new());
            }
            committed =
                shared.wake.wait_timeout(committed, deadline - now).unwrap_or_else(|e| e.into_inner()).0;
        }
        drop(committed);
        let recs = self.log.read(self.cursor, limit)?;
        if let Some(r) = recs.last() {
            self.cursor = r.seq + 1;
        }
        Ok(recs)
    }

    pub fn cursor(&self) -> u64 {
        self.cursor
    }
}
