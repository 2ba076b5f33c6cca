//! A partition's local replica kept equal to its stream: [`catch_up`] applies every stream
//! message after the replica's applied position through [`Follower`], which appends each
//! record as it was (same seq, same hash) and folds it into the projection; a replica that is
//! ahead of the stream, or does not continue it, is discarded and rebuilt from the stream.
//!
//! Retention: the owner's compaction reaches the stream only as its `Compacted` record (its
//! drops, checkpoint and cut are projection writes, not records); the follower redoes it when
//! it applies that record, deterministically, so the replica's records and projection stay
//! the owner's byte for byte. The stream itself never shrinks yet: purging the messages a
//! compaction cut (tied to the checkpoints, so a replica rebuilt from the stream still starts
//! from one) is future work; until then a rebuild reads the whole history.

use std::ops::ControlFlow;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use herald_log::{
    decode_records, keyspace, read_head, write_ahead_position, Durability, Log, LogConfig, LogError, Machine,
    Outcome, Record, Store, StoreError, Tx, WriteBatch,
};
use herald_projector::{apply, compact, decode, Event, TxTables};

use crate::error::ClusterError;
use crate::stream::PartitionStream;

/// Appends records another writer made (they keep their seq and hash) and folds each, storing
/// the stream position they came from in the same batch. The command is one stream message:
/// its sequence and its records.
#[derive(Debug, Default)]
pub struct Follower;

impl Machine for Follower {
    type Command = (u64, Vec<Record>);
    type Reply = ();
    type Rejection = ClusterError;

    fn execute(&mut self, command: Self::Command, tx: &mut Tx<'_>) -> Result<(), ClusterError> {
        let (stream_seq, records) = command;
        let diverged = |why: String| ClusterError::Diverged { stream_seq, why };
        for Record { seq, at_ms, body, hash, .. } in records {
            if seq != tx.next_seq() {
                return Err(diverged(format!("record {seq} where record {} comes next", tx.next_seq())));
            }
            let event =
                decode(&body).map_err(|e| diverged(format!("record {seq} does not decode: {e:?}")))?;
            if let Event::Compacted { through_seq, cutoff_ms, .. } = event {
                redo_compaction(tx, through_seq, cutoff_ms, &event)
                    .map_err(|why| diverged(format!("record {seq}: {why}")))?;
            }
            if tx.append_grouped(at_ms, body).hash != hash {
                return Err(diverged(format!("record {seq} does not chain to the local record before it")));
            }
            apply(&mut TxTables(tx), seq, at_ms, &event)
                .map_err(|e| diverged(format!("record {seq} does not fold: {e:?}")))?;
        }
        tx.set_write_ahead_position(stream_seq);
        Ok(())
    }
}

/// Redoes, in the follower's batch, the compaction the owner wrote as `compacted`: plans it
/// again from the stored log (the records through `through_seq` and the checkpoint before,
/// which the replica holds as the owner did: every message before this one is applied and
/// stored first) and applies the plan to the same state the owner applied it to (the records
/// before `compacted` in its batch are staged here too). Planning and applying are functions
/// of that log and state, so the replica drops, checkpoints and cuts exactly what the owner
/// did; a redo that does not give the recorded figures has diverged.
fn redo_compaction(
    tx: &mut Tx<'_>,
    through_seq: u64,
    cutoff_ms: u64,
    compacted: &Event,
) -> Result<(), String> {
    let (anchor, _) = tx.anchor().map_err(|e| e.to_string())?;
    let records = usize::try_from(through_seq.saturating_sub(anchor)).unwrap_or(usize::MAX);
    let plan =
        compact::plan(tx.store(), cutoff_ms, records).map_err(|e| format!("the compaction's plan: {e}"))?;
    let plan = plan
        .filter(|p| p.through_seq() == through_seq)
        .ok_or_else(|| format!("the compaction through record {through_seq} plans otherwise here"))?;
    let (redone, _) = compact::apply_plan(tx, plan).map_err(|e| format!("the compaction: {e}"))?;
    if &redone != compacted {
        return Err(format!("the compaction redone here is {redone:?}, the owner's {compacted:?}"));
    }
    Ok(())
}

/// What [`catch_up`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CaughtUp {
    /// The stream position the replica is at now (its last message applied).
    pub position: u64,
    /// Stream messages applied.
    pub messages: u64,
    /// Whether the replica was discarded first (ahead of, or diverged from, the stream).
    pub discarded: bool,
}

/// Brings the replica in `store` up to the stream's last message: checks that it is a prefix
/// of the stream (else discards it), then applies every message after its position. Nothing
/// else may write `store` meanwhile (no log open on it).
pub async fn catch_up(store: &Arc<dyn Store>, stream: &PartitionStream) -> Result<CaughtUp, ClusterError> {
    catch_up_with(store, stream, None).await
}

/// [`catch_up`], giving up once NATS leaves one of its requests, or the next message, without
/// an answer for `stall`: a stream without a leader (its server lost, an election under way) or
/// a cluster without a meta leader (the catch-up consumer cannot be made) fails it within about
/// `stall` instead of holding its caller. What was applied stays applied; the next catch-up
/// goes on from there. A take-over uses it, so that it fails, lets its lease go and is tried
/// again, rather than holding a lease it cannot serve.
pub async fn catch_up_within(
    store: &Arc<dyn Store>,
    stream: &PartitionStream,
    stall: Duration,
) -> Result<CaughtUp, ClusterError> {
    catch_up_with(store, stream, Some(stall)).await
}

async fn catch_up_with(
    store: &Arc<dyn Store>,
    stream: &PartitionStream,
    stall: Option<Duration>,
) -> Result<CaughtUp, ClusterError> {
    let last = answered(stall, "to the stream's state", stream.last_sequence()).await?;
    let discarded = !answered(stall, "to a message read", agrees(store.as_ref(), stream, last)).await?;
    if discarded {
        discard(store.as_ref())?;
    }
    let position = write_ahead_position(store.as_ref())?;
    let config = LogConfig { durability: Durability::Sync, ..LogConfig::default() };
    let log = Log::open(store.clone(), Follower, config)?;
    let applied = apply_messages(&log, stream, position, last, stall).await;
    log.close();
    let (position, messages) = applied?;
    Ok(CaughtUp { position, messages, discarded })
}

/// `work`'s answer, or an error once `stall` (if any) passes without one.
async fn answered<T>(
    stall: Option<Duration>,
    what: &str,
    work: impl std::future::Future<Output = Result<T, ClusterError>>,
) -> Result<T, ClusterError> {
    let Some(stall) = stall else { return work.await };
    tokio::time::timeout(stall, work)
        .await
        .unwrap_or_else(|_| Err(ClusterError::Nats(format!("no answer {what} within {stall:?}"))))
}

/// Stream messages handed to the follower's writer and not yet answered, at most: it batches
/// what it finds queued, so the replica applies many messages per store batch and flush.
const CATCH_UP_IN_FLIGHT: usize = 256;

/// Applies stream messages `position + 1 ..= last` through `log`, read by one ordered
/// consumer and kept [`CATCH_UP_IN_FLIGHT`] ahead of the writer. A message that compacts
/// waits until every message before it is applied (its redo plans from the stored log).
/// Returns the position reached and the messages applied; stops at the first refusal.
async fn apply_messages(
    log: &Log<Follower>,
    stream: &PartitionStream,
    position: u64,
    last: u64,
    stall: Option<Duration>,
) -> Result<(u64, u64), ClusterError> {
    if position >= last {
        return Ok((position, 0));
    }
    let (tx, answers) = tokio::sync::mpsc::unbounded_channel();
    let mut applied = Applied { position, messages: 0, in_flight: 0, answers };
    let mut messages = if last - position <= DIRECT_READ_MAX {
        direct_reads(stream, position + 1, last)
    } else {
        answered(stall, "to the catch-up consumer", stream.messages_from(position + 1)).await?.boxed()
    };
    for seq in position + 1..=last {
        let next = async {
            messages.next().await.unwrap_or_else(|| {
                Err(ClusterError::Nats(format!("the stream's messages ended before message {seq}")))
            })
        };
        let (got, payload) = answered(stall, "with the next message", next).await?;
        if got != seq {
            return Err(ClusterError::Diverged {
                stream_seq: seq,
                why: format!("message {got} came instead"),
            });
        }
        let records = decode_records(&payload, 0)
            .map_err(|record| ClusterError::CorruptMessage { stream_seq: seq, record })?;
        let wait_for = if compacts(&records) { 0 } else { CATCH_UP_IN_FLIGHT - 1 };
        applied.wait_until(wait_for).await?;
        let tx = tx.clone();
        log.submit_with((seq, records), move |out| {
            let _ = tx.send((seq, out));
        });
        applied.in_flight += 1;
    }
    applied.wait_until(0).await?;
    Ok((applied.position, applied.messages))
}

/// Messages behind at most which a catch-up reads them one by one from the stream's leader
/// rather than through a consumer: a take-over is usually a few hundred messages behind, and
/// a consumer is made by the cluster's meta leader, which may still be being elected after a
/// server's loss when the stream itself already answers.
const DIRECT_READ_MAX: u64 = 512;

/// Messages `first ..= last`, each read by its sequence, in order.
fn direct_reads(
    stream: &PartitionStream,
    first: u64,
    last: u64,
) -> futures_util::stream::BoxStream<'static, Result<(u64, bytes::Bytes), ClusterError>> {
    let stream = stream.clone();
    futures_util::stream::iter(first..=last)
        .then(move |seq| {
            let stream = stream.clone();
            async move {
                let payload = stream.payload(seq).await?.ok_or_else(|| ClusterError::Diverged {
                    stream_seq: seq,
                    why: "the stream holds no such message".into(),
                })?;
                Ok((seq, payload))
            }
        })
        .boxed()
}

/// Where [`apply_messages`] stands: the messages answered, and those not yet.
struct Applied {
    position: u64,
    messages: u64,
    in_flight: usize,
    answers: tokio::sync::mpsc::UnboundedReceiver<(u64, Outcome<Follower>)>,
}

impl Applied {
    /// Takes answers until at most `in_flight` messages wait; the first refusal is the error.
    async fn wait_until(&mut self, in_flight: usize) -> Result<(), ClusterError> {
        while self.in_flight > in_flight {
            let (seq, out) = self.answers.recv().await.unwrap_or((0, Err(LogError::Closed)));
            out??;
            self.in_flight -= 1;
            self.position = seq;
            self.messages += 1;
        }
        Ok(())
    }
}

/// Whether a message holds a compaction (a `Compacted` record), which a replica redoes.
fn compacts(records: &[Record]) -> bool {
    records.iter().any(|r| matches!(decode(&r.body), Ok(Event::Compacted { .. })))
}

/// Whether the replica is a prefix of the stream: its position is not past the stream's end,
/// and the message at its position ends with the replica's last record. A replica at
/// position 0 agrees only when it holds nothing.
async fn agrees(store: &dyn Store, stream: &PartitionStream, last: u64) -> Result<bool, ClusterError> {
    let position = write_ahead_position(store)?;
    let head = read_head(store)?;
    if position > last {
        return Ok(false);
    }
    if position == 0 {
        return Ok(head.next_seq == 1 && holds_nothing(store)?);
    }
    let records = match stream.records(position).await {
        Ok(records) => records,
        Err(ClusterError::CorruptMessage { .. } | ClusterError::Diverged { .. }) => return Ok(false),
        Err(e) => return Err(e),
    };
    Ok(records.last().is_some_and(|r| r.seq + 1 == head.next_seq && r.hash == head.last_hash))
}

/// Whether the store holds no key of its users (only the log's own metadata, if anything).
fn holds_nothing(store: &dyn Store) -> Result<bool, StoreError> {
    let mut empty = true;
    store.scan(&[keyspace::USER_FIRST], &[0xFF; 8], &mut |_, _| {
        empty = false;
        ControlFlow::Break(())
    })?;
    Ok(empty)
}

/// Keys deleted per store batch by [`discard`].
const DISCARD_BATCH_KEYS: usize = 4096;

/// Deletes everything the store holds. The position goes first, in a batch of its own: a
/// discard cut short leaves a store at position 0 that holds something, which the next
/// catch-up discards again.
pub fn discard(store: &dyn Store) -> Result<(), StoreError> {
    let mut first = WriteBatch::default();
    first.delete(keyspace::META_WRITE_AHEAD.to_vec());
    store.apply(&first)?;
    store.flush(Durability::Sync)?;
    loop {
        let mut keys = Vec::new();
        store.scan(&[], &[0xFF; 8], &mut |k, _| {
            keys.push(k.to_vec());
            if keys.len() >= DISCARD_BATCH_KEYS {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        })?;
        if keys.is_empty() {
            return store.flush(Durability::Sync);
        }
        let mut batch = WriteBatch::default();
        for key in keys {
            batch.delete(key);
        }
        store.apply(&batch)?;
    }
}
