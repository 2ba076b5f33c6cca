//! herald-cluster: herald's cluster mode on NATS JetStream. Its one job: make each partition's
//! log survive the loss of any one machine, by writing every batch ahead to the partition's
//! replicated JetStream stream before the local log applies it, and by letting exactly one node
//! at a time write a partition. The only crate that names NATS (the log crate has the seam,
//! `herald_log::WriteAhead`, and names no NATS). Design: `shared/CLUSTER.md`.
//!
//! - [`partition`]: which partition an organisation lives in, and its stream's names.
//! - `stream.rs`: [`PartitionStream`] (stream `HERALD_P<n>`, subject `herald.p.<n>`) and
//!   [`StreamWriteAhead`], the log's write-ahead onto it.
//! - `replica.rs`: [`catch_up`], which brings a local replica to the stream's end through the
//!   [`Follower`] machine, discarding ([`discard`]) one that is ahead or diverged.
//! - `lease.rs`: [`Leases`] (bucket `herald-owners`), [`Nodes`] heartbeats (bucket
//!   `herald-nodes`, TTL), [`fair_share`].
//! - [`balance`]: which partitions a node claims or hands back ([`balance::plan`]): an even
//!   spread (floor or one more each), in its own rendezvous order; a live lease is never claimed.
//! - `takeover.rs`: [`take_over`] (claim the lease, catch up, open the log, write the
//!   `PartitionClaimed` fence) and [`keep_renewed`] (renew every lease / 3, step down on loss).
//! - `partitions.rs`: [`Partitions`], the partitions a node serves and the NATS runtime their
//!   logs write ahead on, closed in order when dropped: the logs, then the runtime.
//! - `node.rs` (+ `node/membership.rs`, `node/control.rs`): [`Node`], the cluster node
//!   runtime: connects, checks the partition count in bucket `herald-meta` ([`META_BUCKET`]),
//!   beats its heartbeat, and every third of the lease reads the live nodes and every lease
//!   (the control partition counted as one more), then takes over (lease, catch-up, an engine
//!   per partition on `<data_dir>/cluster/p<N>` or `cluster/control`, `ClaimPartition` first),
//!   hands back and steps down as [`balance::plan`] and the leases say; [`Node::place`] answers
//!   from memory; it follows the control partition (`HERALD_CONTROL`, lease key `p.control`,
//!   numbered `partitions`) for API keys when another node owns it.
//! - [`offline`]: what the offline tools need: a partition named `N` or `control`, its
//!   directory and stream, the stream read back with its chain checked, an empty stream to load.
//! - `testing` (feature `testing`): a real three-server NATS cluster for the tests.
//!
//! Invariants:
//! - An organisation's partition is `u64::from_be_bytes(blake3(uuid bytes)[..8]) % partitions`:
//!   over the org id's 16 bytes, never its text.
//! - One stream message is one whole batch (`herald_log::encode_records`), published with the
//!   expected last sequence = the last message the local replica applied; the batch is applied
//!   locally (its message's sequence stored with it) only once JetStream acknowledged it.
//!   A message holds at most `max_message_bytes` (8 MiB less 4 KiB): a batch ends before its
//!   records could pass it, one command writes at most `command_bytes_max` (6 MiB; more is
//!   refused whole by the engine), and a server whose `max_payload` is below
//!   [`MAX_PAYLOAD_NEEDED`] (8 MiB) is refused at [`PartitionStream::open`], naming both.
//! - A message written by another node where this one expected to write fences this node's log
//!   for good: two writers never both append, whatever the clocks say.
//! - A publish of unknown fate is settled by reading the stream, never guessed.
//! - A lease is written only by compare-and-set on its bucket stream's last sequence, and it
//!   never fences by itself: a new owner's first write is `PartitionClaimed { node_id, epoch }`,
//!   published with the expected last sequence it caught up to.
//! - A replica is trusted only as a prefix of its stream: its position's message ends with its
//!   last record; else it is discarded and rebuilt. Every record applied from the stream keeps
//!   its seq and hash (checked) and is folded as the owner folded it; a `Compacted` record's
//!   compaction is redone (planned again from the stored log): the replica drops, checkpoints
//!   and cuts what the owner did. The stream never shrinks yet (purging what a compaction cut,
//!   tied to the checkpoints, is future work).
//! - A partition's log closes before the runtime its write-ahead blocks on ([`Partitions`]'
//!   drop; [`StreamWriteAhead::stop`] cuts the publish in progress short).
//! - A node serves a partition (`Place::Local`) only while its lease is renewed (by its own
//!   clock), not lost, and its engine not fenced; it stops saying so before it closes the
//!   engine, and a hand-back releases the lease only after the engine is down. A node never
//!   opens a partition's store twice: the engine and the control follower take turns on it.
//! - A node counts as live for one lease after its last heartbeat ([`heartbeat_ttl`]): a dead
//!   node's partitions are all within the survivors' share once its leases pass.
//! - The tests run real `nats-server` processes; without the binary they fail naming
//!   `scripts/test`, never skip; every server they start is killed by PID when they end.

pub mod balance;
mod error;
mod lease;
mod node;
pub mod offline;
pub mod partition;
mod partitions;
mod replica;
mod stream;
mod takeover;
#[cfg(feature = "testing")]
pub mod testing;

pub use crate::error::ClusterError;
pub use crate::lease::{
    fair_share, lease_key, open_bucket, Heartbeat, Held, Lease, LeaseError, LeaseSettings, Leases, Nodes,
    NODES_BUCKET, OWNERS_BUCKET,
};
pub use crate::node::{
    heartbeat_ttl, Node, NodeConfig, Place, CONTROL_FOLLOW_EVERY, META_BUCKET, PARTITIONS_KEY,
};
pub use crate::partitions::Partitions;
pub use crate::replica::{catch_up, catch_up_within, discard, CaughtUp, Follower};
pub use crate::stream::{
    PartitionStream, StreamSettings, StreamWriteAhead, COMMAND_BYTES_MAX, HEADERS_BYTES_MAX,
    MAX_PAYLOAD_NEEDED,
};
pub use crate::takeover::{keep_renewed, keep_renewed_with, take_over, unix_ms, Owned, TakeOverError};
