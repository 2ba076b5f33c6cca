//! A partition's local replica kept equal to its stream: [`catch_up`] applies every stream
//! message after the replica's applied position through [`Follower`], which appends each
//! record as it was (same seq, same hash) and folds it into the projection; a replica that is
//! ahead of the stream, or does not continue it, is discarded and rebuilt from the stream.

use std::ops::ControlFlow;
use std::sync::Arc;

use herald_log::{
    keyspace, read_head, write_ahead_position, Durability, Log, LogConfig, LogError, Machine, Record, Store,
    StoreError, Tx, WriteBatch,
};
use herald_projector::{apply, decode, TxTables};

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
    let last = stream.last_sequence().await?;
    let discarded = !agrees(store.as_ref(), stream, last).await?;
    if discarded {
        discard(store.as_ref())?;
    }
    let mut position = write_ahead_position(store.as_ref())?;
    let config = LogConfig { durability: Durability::Sync, ..LogConfig::default() };
    let log = Log::open(store.clone(), Follower, config)?;
    let mut messages = 0;
    let applied = async {
        while position < last {
            let seq = position + 1;
            let records = stream.records(seq).await?;
            let (tx, rx) = tokio::sync::oneshot::channel();
            log.submit_with((seq, records), move |out| {
                let _ = tx.send(out);
            });
            rx.await.unwrap_or(Err(LogError::Closed))??;
            position = seq;
            messages += 1;
        }
        Ok::<_, ClusterError>(())
    }
    .await;
    log.close();
    applied?;
    Ok(CaughtUp { position, messages, discarded })
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
