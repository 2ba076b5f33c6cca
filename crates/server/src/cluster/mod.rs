//! Cluster mode's serving: one layer in front of the routes decides each request's partition
//! and serves it with that partition's router when this node owns it, forwards it to the owner
//! otherwise, and answers 503 when nobody owns it (design: `shared/CLUSTER.md`, "Serving").
//!
//! - [`Placement`]: what the layer asks of the cluster (`herald_cluster::Node` in `herald
//!   serve`, a test double in the tests): where a partition is served, the API keys, readiness.
//! - `route.rs`: each route's class and the partition of one request (pure).
//! - `forward.rs`: forwarding to the owner, and the MAC that proves a request came from a node.
//! - `merge.rs`: an admin's list over every partition.
//! - `front.rs`: the layer itself (the router every request of a cluster node goes through).
//! - `node.rs`: [`Placement`] for `herald_cluster::Node`, and `serve`'s cluster start.

mod forward;
mod front;
mod merge;
mod node;
mod relabel;
mod route;

use herald_engine::{ApiKey, Engine, OrgId};

pub use front::{cluster_router, Front};
pub(crate) use node::serve_node;

/// The error code of a 503 for a partition nobody serves now (or whose owner did not answer).
pub const UNAVAILABLE: &str = "unavailable";

/// Where a partition is served.
pub enum Place {
    /// By this node, with this engine.
    Local(Engine),
    /// By another node, reached at `advertise` (`http://host:port`).
    Remote { node_id: String, advertise: String },
    /// By nobody now (its lease passed and no node has taken it over yet).
    Unowned,
}

/// What the cluster layer asks of the cluster. Partitions are numbered `0..partitions()`, and
/// the control partition (every API key) is `partitions()`.
pub trait Placement: Send + Sync + 'static {
    fn node_id(&self) -> &str;
    fn partitions(&self) -> u32;
    fn partition_of(&self, org: &OrgId) -> u32;
    fn place(&self, partition: u32) -> Place;
    /// Moves whenever the API keys may have changed.
    fn api_key_epoch(&self) -> u64;
    fn api_key_by_hash(&self, hash: &[u8; 32]) -> Result<Option<ApiKey>, String>;
    /// Catches this node's copy of the keys up now (blocking).
    fn refresh_control(&self) -> Result<(), String>;
    /// Ok once this node serves its share, caught up; else what is missing.
    fn readiness(&self) -> Result<(), String>;
    /// Bumped on every change of what this node serves.
    fn changes(&self) -> tokio::sync::watch::Receiver<u64>;
    /// Ok while this node may authenticate from the keys it has (memory only); else why not:
    /// then [`Placement::refresh_control`] first.
    fn keys_current(&self) -> Result<(), String> {
        Ok(())
    }
    /// On the control partition's owner, after a key was created or revoked through it:
    /// returns once every live node has the change (bounded; blocking). Err says who lagged.
    fn settle_control(&self) -> Result<(), String> {
        Ok(())
    }
    /// [`Placement::place`], with the lease read afresh where that says `Unowned` (blocking,
    /// bounded): for a request that would otherwise be answered 503.
    fn place_fresh(&self, partition: u32) -> Place {
        self.place(partition)
    }
    /// How long a client should wait before retrying an unowned partition, seconds.
    fn retry_after_s(&self) -> u64 {
        1
    }

    fn control(&self) -> u32 {
        self.partitions()
    }
}
