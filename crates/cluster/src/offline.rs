//! What herald's offline tools need of a cluster: a partition as an operator names it (`3` or
//! `control`, [`PartitionId`]), its directory in a node's data directory and its stream; a
//! stream read back whole, its records' seqs and hash chain checked across messages
//! ([`StreamReader`], for `herald export --from-nats`); and an empty stream opened to load a
//! log into ([`open_empty_stream`], for `herald import --to-nats`).

use std::pin::Pin;

use async_nats::jetstream::consumer::{pull, DeliverPolicy};
use async_nats::jetstream::context::GetStreamErrorKind;
use async_nats::jetstream::Context;
use async_nats::jetstream::ErrorCode;
use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use herald_log::{decode_records, CorruptKind, CorruptRecord, Hash, Record};

use crate::error::{nats, ClusterError};
pub use crate::partition::{PartitionId, CLUSTER_DIR};
use crate::stream::{PartitionStream, StreamSettings};

/// A JetStream context on the NATS servers `urls` names (comma-separated `nats://host:port`,
/// as `[cluster] nats_url` takes them), connected as a node connects.
pub async fn connect(urls: &str) -> Result<Context, ClusterError> {
    crate::node::connect(urls).await
}

/// The stream named `name`, or an error saying NATS has none by that name.
async fn existing_stream(
    js: &Context,
    name: &str,
) -> Result<async_nats::jetstream::stream::Stream, ClusterError> {
    match js.get_stream(name).await {
        Ok(stream) => Ok(stream),
        Err(e) if matches!(e.kind(), GetStreamErrorKind::JetStream(j) if j.error_code() == ErrorCode::STREAM_NOT_FOUND) => {
            Err(ClusterError::Nats(format!("NATS has no stream {name}")))
        }
        Err(e) => Err(nats(&format!("reading stream {name}"))(&e)),
    }
}

type Messages = Pin<Box<dyn Stream<Item = Result<(u64, Bytes), ClusterError>> + Send>>;

/// A partition's stream read from its first message to the last it held when opened, each
/// message's records checked (checksums and hashes, by `decode_records`) and chained to the
/// message before: seqs one line from 1, each `prev_hash` the hash before it, the first all
/// zeroes. A break is [`ClusterError::CorruptMessage`], naming the stream sequence and the
/// record's seq.
pub struct StreamReader {
    name: String,
    messages: Messages,
    last: u64,
    next_message: u64,
    next_seq: u64,
    prev_hash: Hash,
}

impl StreamReader {
    /// Opens `partition`'s stream for reading; an error if NATS has no such stream, or if it
    /// no longer begins at its first message (a purged stream is not a whole log).
    pub async fn open(js: &Context, partition: PartitionId) -> Result<StreamReader, ClusterError> {
        let name = partition.stream_name();
        let mut stream = existing_stream(js, &name).await?;
        let state = stream.info().await.map_err(|e| nats("reading the stream's state")(&e))?.state.clone();
        if state.last_sequence > 0 && state.first_sequence > 1 {
            return Err(ClusterError::Nats(format!(
                "stream {name} begins at message {}: its first messages were purged, it is no whole log",
                state.first_sequence
            )));
        }
        let config = pull::OrderedConfig {
            deliver_policy: DeliverPolicy::ByStartSequence { start_sequence: 1 },
            ..Default::default()
        };
        let consumer = stream.create_consumer(config).await.map_err(|e| nats("creating a consumer")(&e))?;
        let messages = consumer.messages().await.map_err(|e| nats("reading the stream")(&e))?;
        let messages = messages.map(|message| {
            let message = message.map_err(|e| nats("reading the stream")(&e))?;
            let seq = message.info().map_err(|e| nats("reading a message's sequence")(&e))?.stream_sequence;
            Ok((seq, message.message.payload))
        });
        Ok(StreamReader {
            name,
            messages: Box::pin(messages),
            last: state.last_sequence,
            next_message: 1,
            next_seq: 1,
            prev_hash: [0; 32],
        })
    }

    /// The stream's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The last message this reader reads (the stream's last when it was opened).
    pub fn last_message(&self) -> u64 {
        self.last
    }

    /// The next message's sequence and its records, checked; `None` after the last.
    pub async fn next(&mut self) -> Result<Option<(u64, Vec<Record>)>, ClusterError> {
        if self.next_message > self.last {
            return Ok(None);
        }
        let expected = self.next_message;
        let (got, payload) = self.messages.next().await.unwrap_or_else(|| {
            Err(ClusterError::Nats(format!(
                "stream {}: the messages ended before message {expected}",
                self.name
            )))
        })?;
        if got != expected {
            return Err(ClusterError::Nats(format!(
                "stream {}: message {got} came where message {expected} was expected",
                self.name
            )));
        }
        let records = decode_records(&payload, self.next_seq)
            .map_err(|record| ClusterError::CorruptMessage { stream_seq: got, record })?;
        if let Some(first) = records.first() {
            let broken = |kind| ClusterError::CorruptMessage {
                stream_seq: got,
                record: CorruptRecord { seq: first.seq, kind },
            };
            if first.seq != self.next_seq {
                return Err(ClusterError::CorruptMessage {
                    stream_seq: got,
                    record: CorruptRecord { seq: self.next_seq, kind: CorruptKind::Gap { found: first.seq } },
                });
            }
            if first.prev_hash != self.prev_hash {
                return Err(broken(CorruptKind::ChainBroken));
            }
        }
        if let Some(last) = records.last() {
            self.next_seq = last.seq + 1;
            self.prev_hash = last.hash;
        }
        self.next_message += 1;
        Ok(Some((got, records)))
    }
}

/// `partition`'s stream opened to load a log into, created (file storage, `replicas` copies)
/// when missing, and refused unless it holds no message: a log is loaded only into a partition
/// no node has written. The cluster's partition count (bucket `herald-meta`) must be
/// `partitions`, and is stored so when the cluster has none yet, as its first node does.
pub async fn open_empty_stream(
    js: &Context,
    partition: PartitionId,
    partitions: u32,
    replicas: usize,
) -> Result<PartitionStream, ClusterError> {
    if let PartitionId::Data(n) = partition {
        if n >= partitions {
            return Err(ClusterError::Settings(format!(
                "partition {n} is not one of the cluster's {partitions} (0 to {})",
                partitions.saturating_sub(1)
            )));
        }
    }
    crate::node::check_partitions(js, partitions, replicas).await?;
    let settings = StreamSettings { replicas, ..StreamSettings::default() };
    let stream = match partition {
        PartitionId::Data(n) => PartitionStream::open(js.clone(), n, settings).await?,
        // A node numbers the control partition after the data partitions.
        PartitionId::Control => PartitionStream::open_control(js.clone(), partitions, settings).await?,
    };
    let last = stream.last_sequence().await?;
    if last > 0 {
        return Err(ClusterError::Settings(format!(
            "stream {} already holds {last} messages: a log is loaded only into an empty partition",
            partition.stream_name()
        )));
    }
    Ok(stream)
}
