//! Who owns each partition, and which nodes are alive: two JetStream key-value buckets.
//!
//! - `herald-owners`: key `p.<n>` holds partition `n`'s [`Lease`], changed only by
//!   compare-and-set (on the bucket stream's last sequence: see `Leases::write`, which also
//!   checks the key's revision). The holder renews it every `lease / 3`; another
//!   node may claim it once it has passed, plus a margin for clock skew, with the next epoch.
//!   A lease alone does not fence: the new owner's `PartitionClaimed` record in the stream does.
//! - `herald-nodes`: key `<node_id>` holds a node's heartbeat; the bucket's age limit is the
//!   TTL, so a node that stops beating drops out of [`Nodes::live`].
//!
//! The buckets' streams are made here, as JetStream's key-value layout has them (`KV_<bucket>`,
//! subjects `$KV.<bucket>.>`, one message kept per key): the client's own bucket creation
//! first asks for the account's details, which nats-server 2.9 answers in a shape that client
//! no longer reads.

use std::time::Duration;

use async_nats::jetstream::context::PublishErrorKind;
use async_nats::jetstream::kv::Store as Bucket;
use async_nats::jetstream::message::PublishMessage;
use async_nats::jetstream::stream::{Config, DiscardPolicy, StorageType, Stream};
use async_nats::jetstream::Context;
use bytes::Bytes;
use futures_util::TryStreamExt;
use serde::{Deserialize, Serialize};

use crate::error::{nats, ClusterError};
use crate::partition::CONTROL_LEASE_KEY;

/// The bucket of partition leases.
pub const OWNERS_BUCKET: &str = "herald-owners";
/// The bucket of node heartbeats.
pub const NODES_BUCKET: &str = "herald-nodes";

/// Partition `n`'s key in [`OWNERS_BUCKET`].
pub fn lease_key(partition: u32) -> String {
    format!("p.{partition}")
}

/// A partition's lease, as stored (JSON).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    pub node_id: String,
    /// One more at each claim; the `PartitionClaimed` record carries it.
    pub epoch: u64,
    /// Unix ms, by the holder's clock; 0 once released.
    pub lease_until_ms: u64,
    /// Where the holder takes forwarded requests.
    pub advertise: String,
}

/// A lease this node holds, with the revision its next renewal must find.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Held {
    pub partition: u32,
    pub lease: Lease,
    pub revision: u64,
}

/// How leases are timed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseSettings {
    /// How long a lease lasts from its last renewal (renewed every third of it).
    pub lease: Duration,
    /// How long past a lease's end another node waits before claiming it (clock skew).
    pub skew_margin: Duration,
}

impl Default for LeaseSettings {
    fn default() -> Self {
        LeaseSettings { lease: Duration::from_secs(5), skew_margin: Duration::from_secs(1) }
    }
}

/// Why a lease was not taken or kept.
#[derive(Debug, Clone, PartialEq)]
pub enum LeaseError {
    /// Another node holds it, and its lease has not passed.
    HeldBy(Lease),
    /// It changed since this node last wrote it: another node claimed it (if known, whom).
    Lost(Option<Lease>),
    Cluster(ClusterError),
}

impl std::fmt::Display for LeaseError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LeaseError::HeldBy(l) => {
                write!(f, "held by {} (epoch {}) until {}", l.node_id, l.epoch, l.lease_until_ms)
            }
            LeaseError::Lost(Some(l)) => write!(f, "lost to {} (epoch {})", l.node_id, l.epoch),
            LeaseError::Lost(None) => write!(f, "lost"),
            LeaseError::Cluster(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for LeaseError {}

impl From<ClusterError> for LeaseError {
    fn from(e: ClusterError) -> Self {
        LeaseError::Cluster(e)
    }
}

/// Opens bucket `name`, making its stream when missing: file storage, `replicas` copies, one
/// message kept per key, entries older than `max_age` dropped (zero: kept).
pub async fn open_bucket(
    js: &Context,
    name: &str,
    replicas: usize,
    max_age: Duration,
) -> Result<Bucket, ClusterError> {
    Ok(open_bucket_stream(js, name, replicas, max_age).await?.0)
}

/// [`open_bucket`], with the bucket's stream.
async fn open_bucket_stream(
    js: &Context,
    name: &str,
    replicas: usize,
    max_age: Duration,
) -> Result<(Bucket, Stream), ClusterError> {
    let config = Config {
        name: format!("KV_{name}"),
        subjects: vec![format!("$KV.{name}.>")],
        max_messages_per_subject: 1,
        max_age,
        storage: StorageType::File,
        num_replicas: replicas,
        allow_rollup: true,
        deny_delete: true,
        allow_direct: true,
        discard: DiscardPolicy::New,
        duplicate_window: if max_age.is_zero() {
            Duration::from_secs(120)
        } else {
            max_age.min(Duration::from_secs(120))
        },
        ..Default::default()
    };
    let stream = js.get_or_create_stream(config).await.map_err(|e| nats("making a key-value bucket")(&e))?;
    let bucket = js.get_key_value(name).await.map_err(|e| nats("opening a key-value bucket")(&e))?;
    Ok((bucket, stream))
}

/// This node's view of the partition leases.
pub struct Leases {
    js: Context,
    bucket: Bucket,
    stream: Stream,
    node_id: String,
    advertise: String,
    settings: LeaseSettings,
    /// The number the control partition takes in this node's numeric API (its key is
    /// [`CONTROL_LEASE_KEY`]), if set.
    control: Option<u32>,
}

impl Leases {
    pub async fn open(
        js: &Context,
        replicas: usize,
        node_id: &str,
        advertise: &str,
        settings: LeaseSettings,
    ) -> Result<Leases, ClusterError> {
        let (bucket, stream) = open_bucket_stream(js, OWNERS_BUCKET, replicas, Duration::ZERO).await?;
        Ok(Leases {
            js: js.clone(),
            bucket,
            stream,
            node_id: node_id.into(),
            advertise: advertise.into(),
            settings,
            control: None,
        })
    }

    /// These leases with partition number `number` read as the control partition: its key is
    /// [`CONTROL_LEASE_KEY`] (`p.control`), not `p.<number>`.
    pub fn with_control(mut self, number: u32) -> Leases {
        self.control = Some(number);
        self
    }

    /// Partition `partition`'s key in the bucket.
    pub fn key(&self, partition: u32) -> String {
        match self.control {
            Some(control) if control == partition => CONTROL_LEASE_KEY.into(),
            _ => lease_key(partition),
        }
    }

    pub fn settings(&self) -> LeaseSettings {
        self.settings
    }

    /// Partition `partition`'s lease and its revision, if it ever had one.
    pub async fn current(&self, partition: u32) -> Result<Option<(Lease, u64)>, ClusterError> {
        let entry = self.bucket.entry(self.key(partition)).await.map_err(|e| nats("reading a lease")(&e))?;
        let Some(entry) = entry.filter(|e| !e.value.is_empty()) else { return Ok(None) };
        let lease = serde_json::from_slice(&entry.value)
            .map_err(|e| ClusterError::Nats(format!("lease of partition {partition} unreadable: {e}")))?;
        Ok(Some((lease, entry.revision)))
    }

    /// Every partition's lease, by partition number (`None`: never held), of `partitions`.
    pub async fn all(&self, partitions: u32) -> Result<Vec<Option<Lease>>, ClusterError> {
        let mut out = Vec::with_capacity(partitions as usize);
        for partition in 0..partitions {
            out.push(self.current(partition).await?.map(|(lease, _)| lease));
        }
        Ok(out)
    }

    pub fn node_id(&self) -> &str {
        &self.node_id
    }

    /// Every lease written from now on, as (partition, lease): for a node to look at the
    /// cluster again at once when a lease changes hands or is released, rather than at its
    /// next turn. An entry that is not a lease of these partitions is left out.
    pub async fn watch(
        &self,
    ) -> Result<impl futures_util::Stream<Item = (u32, Lease)> + Unpin, ClusterError> {
        use futures_util::StreamExt;
        let watch = self.bucket.watch_all().await.map_err(|e| nats("watching the leases")(&e))?;
        let control = self.control;
        Ok(watch.filter_map(move |entry| {
            let read = entry.ok().and_then(|entry| {
                let partition = match entry.key.strip_prefix("p.")? {
                    "control" => control?,
                    n => n.parse().ok()?,
                };
                Some((partition, serde_json::from_slice(&entry.value).ok()?))
            });
            std::future::ready(read)
        }))
    }

    fn lease(&self, epoch: u64, now_ms: u64) -> Lease {
        Lease {
            node_id: self.node_id.clone(),
            epoch,
            lease_until_ms: now_ms + self.settings.lease.as_millis() as u64,
            advertise: self.advertise.clone(),
        }
    }

    /// Claims `partition` at `now_ms` (unix ms, this node's clock): when nobody ever held it,
    /// when its lease has passed by more than the skew margin, or when this node held it (a
    /// restart). Each claim takes the next epoch.
    pub async fn claim(&self, partition: u32, now_ms: u64) -> Result<Held, LeaseError> {
        let margin = self.settings.skew_margin.as_millis() as u64;
        self.write(partition, |current| match current {
            None => Ok(self.lease(1, now_ms)),
            Some((held, _))
                if held.node_id != self.node_id && now_ms <= held.lease_until_ms.saturating_add(margin) =>
            {
                Err(LeaseError::HeldBy(held))
            }
            Some((held, _)) => Ok(self.lease(held.epoch + 1, now_ms)),
        })
        .await
    }

    /// Renews a held lease at `now_ms`; [`LeaseError::Lost`] when another node wrote it since.
    pub async fn renew(&self, held: &Held, now_ms: u64) -> Result<Held, LeaseError> {
        self.write(held.partition, |current| {
            still_held(held, current).map(|_| self.lease(held.lease.epoch, now_ms))
        })
        .await
    }

    /// Hands a held lease back: another node may claim it at once.
    pub async fn release(&self, held: &Held) -> Result<(), LeaseError> {
        let released = Lease { lease_until_ms: 0, ..held.lease.clone() };
        self.write(held.partition, |current| still_held(held, current).map(|_| released.clone()))
            .await
            .map(drop)
    }

    /// Writes partition `partition`'s lease as `decide` makes it from the current one, by
    /// compare-and-set on the bucket's whole stream (its last sequence, read before the lease):
    /// nats-server 2.9 lets two concurrent writes that expect the same revision of one key both
    /// through in a replicated bucket, never two that expect the same last sequence of the
    /// stream. A write of another key in between only makes this one read and try again.
    async fn write(
        &self,
        partition: u32,
        decide: impl Fn(Option<(Lease, u64)>) -> Result<Lease, LeaseError>,
    ) -> Result<Held, LeaseError> {
        let subject = format!("$KV.{OWNERS_BUCKET}.{}", self.key(partition));
        for _ in 0..LEASE_WRITE_TRIES {
            let mut stream = self.stream.clone();
            let last =
                stream.info().await.map_err(|e| nats("reading the lease bucket")(&e))?.state.last_sequence;
            let lease = decide(self.current(partition).await?)?;
            let message = PublishMessage::build().payload(encode(&lease)).expected_last_sequence(last);
            let acked = async { self.js.send_publish(subject.clone(), message).await?.await }.await;
            match acked {
                Ok(ack) => return Ok(Held { partition, lease, revision: ack.sequence }),
                Err(e) if e.kind() == PublishErrorKind::WrongLastSequence => continue,
                Err(e) => return Err(nats("writing a lease")(&e).into()),
            }
        }
        Err(ClusterError::Nats(format!("the lease bucket changed under {LEASE_WRITE_TRIES} tries in a row"))
            .into())
    }
}

/// Tries of one lease write whose bucket another write changed meanwhile.
const LEASE_WRITE_TRIES: usize = 16;

/// The current lease, if it is still the one `held` wrote; else [`LeaseError::Lost`].
fn still_held(held: &Held, current: Option<(Lease, u64)>) -> Result<Lease, LeaseError> {
    match current {
        Some((lease, revision)) if revision == held.revision => Ok(lease),
        other => Err(LeaseError::Lost(other.map(|(lease, _)| lease))),
    }
}

fn encode<T: Serialize>(value: &T) -> Bytes {
    Bytes::from(serde_json::to_vec(value).expect("a lease serializes"))
}

/// A node's heartbeat, as stored (JSON).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Heartbeat {
    pub advertise: String,
    pub at_ms: u64,
    /// The last control stream message this node's replica of the control partition has
    /// applied (its keys), when it reports one: the owner waits for it after a key changes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub control_applied: Option<u64>,
}

/// The live nodes: those whose heartbeat is younger than the bucket's TTL.
pub struct Nodes {
    bucket: Bucket,
    stream: Stream,
}

impl Nodes {
    /// Opens [`NODES_BUCKET`], whose entries live `ttl` after their last beat.
    pub async fn open(js: &Context, replicas: usize, ttl: Duration) -> Result<Nodes, ClusterError> {
        let (bucket, stream) = open_bucket_stream(js, NODES_BUCKET, replicas, ttl).await?;
        Ok(Nodes { bucket, stream })
    }

    /// Announces `node_id` as alive (beat more often than the TTL).
    pub async fn beat(&self, node_id: &str, advertise: &str, now_ms: u64) -> Result<(), ClusterError> {
        self.beat_applied(node_id, advertise, now_ms, None).await
    }

    /// [`Nodes::beat`], reporting the control stream position this node's keys have applied.
    pub async fn beat_applied(
        &self,
        node_id: &str,
        advertise: &str,
        now_ms: u64,
        control_applied: Option<u64>,
    ) -> Result<(), ClusterError> {
        let beat = Heartbeat { advertise: advertise.into(), at_ms: now_ms, control_applied };
        self.bucket.put(node_id, encode(&beat)).await.map_err(|e| nats("writing a heartbeat")(&e))?;
        Ok(())
    }

    /// Every live node with the control position its last heartbeat reports (`None`: none
    /// reported, or its heartbeat not readable). A reading may lag (a direct get): it never
    /// reports more than the node had applied.
    pub async fn applied(&self) -> Result<Vec<(String, Option<u64>)>, ClusterError> {
        let mut out = Vec::new();
        for id in self.live().await? {
            let entry = self.bucket.get(&id).await.map_err(|e| nats("reading a heartbeat")(&e))?;
            let beat = entry.and_then(|v| serde_json::from_slice::<Heartbeat>(&v).ok());
            out.push((id, beat.and_then(|b| b.control_applied)));
        }
        Ok(out)
    }

    /// Takes `node_id` out of the live nodes at once (a node that stops), instead of after
    /// the TTL: its key's messages are purged from the bucket's stream.
    pub async fn leave(&self, node_id: &str) -> Result<(), ClusterError> {
        let subject = format!("$KV.{NODES_BUCKET}.{node_id}");
        self.stream.purge().filter(subject).await.map_err(|e| nats("removing a heartbeat")(&e))?;
        Ok(())
    }

    /// The ids of the nodes alive now, sorted: the keys that hold a message, read from the
    /// bucket stream's state in one request. (The key-value client's key listing, a consumer
    /// over the bucket, can wait seconds for its end when a heartbeat ages out meanwhile.)
    pub async fn live(&self) -> Result<Vec<String>, ClusterError> {
        let prefix = format!("$KV.{NODES_BUCKET}.");
        let subjects = self
            .stream
            .info_with_subjects(format!("{prefix}>"))
            .await
            .map_err(|e| nats("listing nodes")(&e))?;
        let subjects: Vec<(String, usize)> =
            subjects.try_collect().await.map_err(|e| nats("listing nodes")(&e))?;
        let mut ids: Vec<String> = subjects
            .into_iter()
            .filter(|(_, messages)| *messages > 0)
            .filter_map(|(subject, _)| subject.strip_prefix(&prefix).map(str::to_string))
            .collect();
        ids.sort();
        Ok(ids)
    }
}

/// The most partitions one node claims: `ceil(partitions / live nodes)` (all of them alone).
pub fn fair_share(partitions: u32, live_nodes: usize) -> u32 {
    let nodes = u32::try_from(live_nodes.max(1)).unwrap_or(u32::MAX);
    partitions.div_ceil(nodes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fair_share_is_partitions_over_live_nodes_rounded_up() {
        assert_eq!(fair_share(16, 3), 6);
        assert_eq!(fair_share(16, 4), 4);
        assert_eq!(fair_share(16, 1), 16);
        assert_eq!(fair_share(16, 0), 16, "alone, a node takes everything");
        assert_eq!(fair_share(3, 5), 1);
    }

    #[test]
    fn a_lease_is_stored_as_json_with_the_designs_fields() {
        let lease = Lease { node_id: "a".into(), epoch: 2, lease_until_ms: 9, advertise: "http://a".into() };
        let json = String::from_utf8(encode(&lease).to_vec()).unwrap();
        assert_eq!(json, r#"{"node_id":"a","epoch":2,"lease_until_ms":9,"advertise":"http://a"}"#);
        assert_eq!(serde_json::from_str::<Lease>(&json).unwrap(), lease);
        assert_eq!(lease_key(7), "p.7");
    }
}
