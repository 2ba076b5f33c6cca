//! herald-cluster: herald's cluster mode on NATS JetStream. Its one job: make each partition's
//! log survive the loss of any one machine, by writing every batch ahead to the partition's
//! replicated JetStream stream before the local log applies it, and by letting exactly one node
//! at a time write a partition. The only crate that names NATS (the log crate has the seam,
//! `herald_log::WriteAhead`, and names no NATS). Design: `shared/CLUSTER.md`.
//!
//! - [`partition`]: which partition an organisation lives in, and its stream's names.
//! - `testing` (feature `testing`): a real three-server NATS cluster for the tests.
//!
//! Invariants:
//! - An organisation's partition is `u64::from_be_bytes(blake3(uuid bytes)[..8]) % partitions`:
//!   over the org id's 16 bytes, never its text.
//! - The tests run real `nats-server` processes; without the binary they fail naming
//!   `scripts/test`, never skip; every server they start is killed by PID when they end.

pub mod partition;
#[cfg(feature = "testing")]
pub mod testing;
