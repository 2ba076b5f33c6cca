//! A partition's JetStream stream: created with the cluster's settings, read back by stream
//! sequence, and [`StreamWriteAhead`], the log's write-ahead onto it: one message per batch,
//! published with the expected last sequence, the batch applied locally only once acknowledged.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use async_nats::jetstream::context::PublishErrorKind;
use async_nats::jetstream::message::PublishMessage;
use async_nats::jetstream::stream::{Config, LastRawMessageErrorKind, StorageType};
use async_nats::jetstream::Context;
use bytes::Bytes;
use herald_log::{decode_records, encode_records, Record, WriteAhead, WriteAheadError};

use crate::error::{nats, ClusterError};
use crate::partition::{stream_name, subject, CONTROL_STREAM, CONTROL_SUBJECT};

/// The `max_payload` herald needs of every nats-server: 8 MiB (their configuration's
/// `max_payload: 8388608`; NATS's default is 1 MiB, and it advises against more than 8 MiB).
/// One stream message holds one whole batch, and one command may append up to
/// [`COMMAND_BYTES_MAX`]: a publish of a 256 KiB payload fanned out to 10,000 endpoints takes
/// about 3 MiB (each delivery a record of about 270 bytes with a 50-byte url), a recover of
/// 100,000 deliveries about 1.6 MiB, and one record's body may reach 1 MiB.
pub const MAX_PAYLOAD_NEEDED: usize = 8 * 1024 * 1024;

/// Room kept in a message for its headers (the expected last sequence and NATS's own).
pub const HEADERS_BYTES_MAX: usize = 4 * 1024;

/// The most one command may append, encoded, by default: 6 MiB, twice the largest publish
/// with 50-byte urls (10,000 deliveries with urls of about 350 bytes still fit). A command
/// past it is refused whole (`Tx::command_bytes_max`), and the batch cut leaves it room: a
/// batch of many commands ends once its records reach the 2 MiB left.
pub const COMMAND_BYTES_MAX: usize = 6 * 1024 * 1024;

/// How long catch-up keeps trying to create its consumer through a failover (a new meta leader
/// is elected within seconds; this leaves room on a loaded machine).
pub const CONSUMER_CREATE_WAIT: Duration = Duration::from_secs(30);

/// The pause between two tries of creating the catch-up consumer.
const CONSUMER_CREATE_RETRY: Duration = Duration::from_millis(250);

/// How a partition's stream is made and written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamSettings {
    /// Copies JetStream keeps of each message (3 survives the loss of any one server).
    pub replicas: usize,
    /// The stream's largest message (its `max_msg_size`): the servers' `max_payload` must be at
    /// least this plus [`HEADERS_BYTES_MAX`] ([`StreamSettings::max_payload_needed`]).
    pub max_message_bytes: usize,
    /// The most one command may append, encoded: a command whose records take more is refused,
    /// and a batch is cut before its records could pass `max_message_bytes`.
    pub command_bytes_max: usize,
    /// How long one publish waits for its acknowledgement before it asks the stream whether it
    /// was stored.
    pub ack_wait: Duration,
    /// How long a batch is tried (through a stream leader's failover) before its callers are
    /// told the write-ahead is unavailable.
    pub publish_timeout: Duration,
}

impl Default for StreamSettings {
    fn default() -> Self {
        StreamSettings {
            replicas: 3,
            max_message_bytes: MAX_PAYLOAD_NEEDED - HEADERS_BYTES_MAX,
            command_bytes_max: COMMAND_BYTES_MAX,
            ack_wait: Duration::from_secs(2),
            publish_timeout: Duration::from_secs(10),
        }
    }
}

impl StreamSettings {
    /// The `max_payload` the NATS servers need for these settings.
    pub fn max_payload_needed(&self) -> usize {
        self.max_message_bytes + HEADERS_BYTES_MAX
    }

    /// Encoded bytes of records at which the writer ends a batch: the largest message less
    /// the most one command may add after it, less the encoding's 5-byte head.
    fn batch_bytes_max(&self) -> usize {
        self.max_message_bytes.saturating_sub(self.command_bytes_max + 5).max(1)
    }
}

/// Partition `n`'s stream.
#[derive(Clone)]
pub struct PartitionStream {
    js: Context,
    stream: async_nats::jetstream::stream::Stream,
    partition: u32,
    /// The stream's and its subject's names.
    name: String,
    subject: String,
    settings: StreamSettings,
}

impl PartitionStream {
    /// Opens partition `partition`'s stream, creating it (file storage, `replicas` copies, one
    /// subject) when it does not exist yet.
    /// Refuses, naming both numbers, a server whose `max_payload` (in the information it sent
    /// at connect) is below [`StreamSettings::max_payload_needed`], and settings where one
    /// command could fill a message.
    pub async fn open(js: Context, partition: u32, settings: StreamSettings) -> Result<Self, ClusterError> {
        PartitionStream::open_named(js, partition, stream_name(partition), subject(partition), settings).await
    }

    /// [`PartitionStream::open`] for the control partition, numbered `number` (its stream is
    /// [`CONTROL_STREAM`], its subject [`CONTROL_SUBJECT`]).
    pub async fn open_control(
        js: Context,
        number: u32,
        settings: StreamSettings,
    ) -> Result<Self, ClusterError> {
        PartitionStream::open_named(js, number, CONTROL_STREAM.into(), CONTROL_SUBJECT.into(), settings).await
    }

    async fn open_named(
        js: Context,
        partition: u32,
        name: String,
        subject: String,
        settings: StreamSettings,
    ) -> Result<Self, ClusterError> {
        let server = js.client().server_info().max_payload;
        let needed = settings.max_payload_needed();
        if server < needed {
            return Err(ClusterError::MaxPayload { server, needed });
        }
        if settings.command_bytes_max + 5 >= settings.max_message_bytes {
            return Err(ClusterError::Settings(format!(
                "command_bytes_max ({}) leaves no room for a batch in a message of max_message_bytes ({})",
                settings.command_bytes_max, settings.max_message_bytes
            )));
        }
        let config = Config {
            name: name.clone(),
            subjects: vec![subject.clone()],
            storage: StorageType::File,
            num_replicas: settings.replicas,
            max_message_size: i32::try_from(settings.max_message_bytes).unwrap_or(i32::MAX),
            ..Default::default()
        };
        let stream = js.get_or_create_stream(config).await.map_err(|e| nats("opening the stream")(&e))?;
        // A stream made earlier keeps its own limit: one below these settings' would refuse a
        // legal batch.
        let made = stream.cached_info().config.max_message_size;
        if made >= 0 && (made as u64) < settings.max_message_bytes as u64 {
            return Err(ClusterError::Settings(format!(
                "stream {name} takes messages of at most {made} bytes; herald needs {}",
                settings.max_message_bytes
            )));
        }
        Ok(PartitionStream { js, stream, partition, name, subject, settings })
    }

    pub fn partition(&self) -> u32 {
        self.partition
    }

    pub fn settings(&self) -> StreamSettings {
        self.settings
    }

    /// The stream's last sequence (0 when it holds no message). Gives up after the settings'
    /// `ack_wait` without an answer (a stream whose leader was lost answers nothing until the
    /// next is elected, and the client's own request time-out is 10 s): its callers (a
    /// catch-up, the control follower every 250 ms, which a take-over of the control partition
    /// waits for) try again rather than wait out the election and then some.
    pub async fn last_sequence(&self) -> Result<u64, ClusterError> {
        let mut stream = self.stream.clone();
        let wait = self.settings.ack_wait;
        let info = tokio::time::timeout(wait, stream.info())
            .await
            .map_err(|_| {
                ClusterError::Nats(format!("reading the stream's state: no answer within {wait:?}"))
            })?
            .map_err(|e| nats("reading the stream's state")(&e))?;
        Ok(info.state.last_sequence)
    }

    /// The payload of message `seq`, or `None` when the stream holds none at that sequence.
    pub async fn payload(&self, seq: u64) -> Result<Option<Bytes>, ClusterError> {
        match self.stream.get_raw_message(seq).await {
            Ok(message) => Ok(Some(message.payload)),
            Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => Ok(None),
            Err(e) => Err(nats("reading a message")(&e)),
        }
    }

    /// The messages from sequence `start` on, in order, as (sequence, payload), through an
    /// ordered consumer (ephemeral, one copy, no acknowledgements; it recreates itself where it
    /// sees a gap): the server pushes them in batches instead of one request per message. The
    /// stream never ends by itself: the caller stops reading at the sequence it wants.
    pub async fn messages_from(
        &self,
        start: u64,
    ) -> Result<impl futures_util::Stream<Item = Result<(u64, Bytes), ClusterError>> + Unpin, ClusterError>
    {
        use async_nats::jetstream::consumer::{pull, DeliverPolicy};
        use futures_util::StreamExt;
        let config = pull::OrderedConfig {
            deliver_policy: DeliverPolicy::ByStartSequence { start_sequence: start },
            ..Default::default()
        };
        let consumer = self.create_consumer_through_failover(config).await?;
        let messages = consumer.messages().await.map_err(|e| nats("reading the stream")(&e))?;
        Ok(messages.map(|message| {
            let message = message.map_err(|e| nats("reading the stream")(&e))?;
            let seq = message.info().map_err(|e| nats("reading a message's sequence")(&e))?.stream_sequence;
            Ok((seq, message.message.payload))
        }))
    }

    /// Creates an ordered consumer, trying again for up to [`CONSUMER_CREATE_WAIT`] while the
    /// answer is a time-out, a failed request or a JetStream error: right after a server is
    /// lost, the cluster may still be electing the leader that creates consumers (a publish
    /// rides out the same failover through its own retries).
    async fn create_consumer_through_failover(
        &self,
        config: async_nats::jetstream::consumer::pull::OrderedConfig,
    ) -> Result<
        async_nats::jetstream::consumer::Consumer<async_nats::jetstream::consumer::pull::OrderedConfig>,
        ClusterError,
    > {
        use async_nats::jetstream::stream::ConsumerErrorKind;
        let deadline = tokio::time::Instant::now() + CONSUMER_CREATE_WAIT;
        loop {
            match self.stream.create_consumer(config.clone()).await {
                Ok(consumer) => return Ok(consumer),
                Err(e)
                    if matches!(
                        e.kind(),
                        ConsumerErrorKind::TimedOut
                            | ConsumerErrorKind::Request
                            | ConsumerErrorKind::JetStream(_)
                    ) && tokio::time::Instant::now() < deadline =>
                {
                    tokio::time::sleep(CONSUMER_CREATE_RETRY).await;
                }
                Err(e) => return Err(nats("creating a catch-up consumer")(&e)),
            }
        }
    }

    /// The records of message `seq`, each checked (checksum, hash, chained to the one before
    /// in the message). A missing message is an error: the stream never drops one.
    pub async fn records(&self, seq: u64) -> Result<Vec<Record>, ClusterError> {
        let payload = self.payload(seq).await?.ok_or_else(|| ClusterError::Diverged {
            stream_seq: seq,
            why: "the stream holds no such message".into(),
        })?;
        decode_records(&payload, 0).map_err(|record| ClusterError::CorruptMessage { stream_seq: seq, record })
    }

    /// Publishes `payload` as the message after `expected_last`; returns its sequence. A
    /// publish whose fate is unknown (no acknowledgement, a leader failing over) is resolved by
    /// reading the message after `expected_last`: ours, it was stored; another's, this writer is
    /// fenced; none, it is published again, until `publish_timeout`. `refused` is this writer's
    /// batch refused last as unavailable: found there, it was stored after all, and this replica
    /// is behind the stream.
    async fn publish(
        &self,
        expected_last: u64,
        payload: Bytes,
        refused: Option<Bytes>,
    ) -> Result<u64, WriteAheadError> {
        let deadline = Instant::now() + self.settings.publish_timeout;
        let subject = self.subject.clone();
        let mut unanswered = false;
        loop {
            let message =
                PublishMessage::build().payload(payload.clone()).expected_last_sequence(expected_last);
            let sent = tokio::time::timeout(self.settings.ack_wait, async {
                self.js.send_publish(subject.clone(), message).await?.await
            })
            .await;
            let why = match sent {
                Ok(Ok(ack)) if ack.sequence == expected_last + 1 => return Ok(ack.sequence),
                Ok(Ok(ack)) => format!("acknowledged as message {}, not {}", ack.sequence, expected_last + 1),
                Ok(Err(e)) if e.kind() == PublishErrorKind::WrongLastSequence => {
                    format!("the stream has moved past message {expected_last}")
                }
                Ok(Err(e)) => e.to_string(),
                Err(_) => {
                    unanswered = true;
                    format!("no acknowledgement within {:?}", self.settings.ack_wait)
                }
            };
            let stored = tokio::time::timeout(self.settings.ack_wait, self.payload(expected_last + 1)).await;
            match stored.unwrap_or_else(|_| Err(ClusterError::Nats("no answer".into()))) {
                Ok(Some(stored)) if stored == payload => return Ok(expected_last + 1),
                Ok(Some(stored)) if refused.as_ref() == Some(&stored) => {
                    return Err(WriteAheadError::Fenced(format!(
                        "stream {} message {} is this writer's own earlier batch, refused to its callers \
                         as unavailable when its publish went unanswered: this replica is behind the \
                         stream and must catch up",
                        self.name,
                        expected_last + 1
                    )))
                }
                Ok(Some(_)) => {
                    return Err(WriteAheadError::Fenced(format!(
                        "stream {} message {} was written by another node ({why})",
                        self.name,
                        expected_last + 1
                    )))
                }
                Ok(None) | Err(_) if Instant::now() < deadline => {}
                Ok(None) | Err(_) => {
                    let fate = match unanswered {
                        true => "; an attempt went unanswered, so the batch may be in the stream after all",
                        false => "",
                    };
                    return Err(WriteAheadError::Unavailable(format!(
                        "stream {}: {why} (tried for {:?}{fate})",
                        self.name, self.settings.publish_timeout
                    )));
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// The log's write-ahead onto a partition's stream. Each batch is one message, published with
/// the expected last sequence = the last message this replica applied; the log applies the
/// batch (storing the new sequence with it) only once JetStream has acknowledged it, stored on
/// a quorum. A message written by another node in between fences this writer for good.
pub struct StreamWriteAhead {
    stream: PartitionStream,
    runtime: tokio::runtime::Handle,
    last: AtomicU64,
    /// The payload of the last batch refused as unavailable, which may be in the stream after
    /// all (cleared by a batch stored): the next publish tells it from another node's.
    refused: std::sync::Mutex<Option<Bytes>>,
    /// Set by [`StreamWriteAhead::stop`]: a publish waiting on the runtime gives up at once.
    stop: tokio::sync::watch::Sender<bool>,
}

impl StreamWriteAhead {
    /// A write-ahead whose first batch follows stream message `position` (the replica's
    /// `write_ahead_position` after catching up). `runtime` runs the publishes: the log's
    /// writer thread blocks on them, so it must not be one of the runtime's own threads.
    pub fn new(stream: PartitionStream, runtime: tokio::runtime::Handle, position: u64) -> StreamWriteAhead {
        let (stop, _) = tokio::sync::watch::channel(false);
        StreamWriteAhead {
            stream,
            runtime,
            last: AtomicU64::new(position),
            refused: Default::default(),
            stop,
        }
    }

    /// Makes the publish in progress, and every later one, give up at once with
    /// [`WriteAheadError::Unavailable`]: for closing the partition's log before its runtime
    /// goes. A publish cut off may still have been stored; this log is closing and applies
    /// nothing more, and whoever opens the replica next catches up from the stream.
    pub fn stop(&self) {
        self.stop.send_replace(true);
    }
}

impl WriteAhead for StreamWriteAhead {
    fn batch_bytes_max(&self) -> usize {
        self.stream.settings.batch_bytes_max()
    }

    fn command_bytes_max(&self) -> usize {
        self.stream.settings.command_bytes_max
    }

    fn append(&self, records: &[Record]) -> Result<u64, WriteAheadError> {
        let payload = Bytes::from(encode_records(records));
        let max = self.stream.settings.max_message_bytes;
        if payload.len() > max {
            return Err(WriteAheadError::Unavailable(format!(
                "a batch of {} bytes is larger than the stream's largest message ({max} bytes)",
                payload.len()
            )));
        }
        let expected = self.last.load(Ordering::SeqCst);
        let mut stop = self.stop.subscribe();
        let refused = self.refused.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let publish = self.stream.publish(expected, payload.clone(), refused);
        let published = self.runtime.block_on(async move {
            tokio::select! {
                published = publish => published,
                _ = stop.wait_for(|stopped| *stopped) => Err(WriteAheadError::Unavailable(
                    "the partition's log is closing; the batch may or may not be in the stream".into(),
                )),
            }
        });
        let mut refused = self.refused.lock().unwrap_or_else(|e| e.into_inner());
        *refused = match &published {
            Err(WriteAheadError::Unavailable(_)) => Some(payload),
            _ => None,
        };
        let seq = published?;
        self.last.store(seq, Ordering::SeqCst);
        Ok(seq)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::NatsCluster;

    /// A stream of one NATS server and one replica.
    async fn stream_alone(nats: &NatsCluster) -> PartitionStream {
        let client = async_nats::connect(nats.addrs()).await.expect("connect");
        let settings = StreamSettings {
            replicas: 1,
            max_message_bytes: 64 * 1024,
            command_bytes_max: 8 * 1024,
            ack_wait: Duration::from_secs(1),
            publish_timeout: Duration::from_secs(5),
        };
        PartitionStream::open(async_nats::jetstream::new(client), 3, settings).await.expect("open")
    }

    #[test]
    fn a_refused_batch_found_stored_fences_its_writer_as_behind_and_another_nodes_as_fenced() {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        rt.block_on(async {
            let nats = tokio::time::timeout(Duration::from_secs(40), NatsCluster::start(1)).await.unwrap();
            let stream = stream_alone(&nats).await;
            let refused = Bytes::from_static(b"a batch refused as unavailable, stored after all");
            assert_eq!(stream.publish(0, refused.clone(), None).await, Ok(1));
            // The writer, still at message 0, tries its next batch.
            let next = Bytes::from_static(b"the next batch");
            let own = stream.publish(0, next.clone(), Some(refused)).await;
            assert!(
                matches!(&own, Err(WriteAheadError::Fenced(why)) if why.contains("this writer's own earlier batch")),
                "{own:?}"
            );
            let other = stream.publish(0, next, Some(Bytes::from_static(b"another"))).await;
            assert!(
                matches!(&other, Err(WriteAheadError::Fenced(why)) if why.contains("written by another node")),
                "{other:?}"
            );
        });
    }
}
