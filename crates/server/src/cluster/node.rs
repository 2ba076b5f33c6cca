//! `herald serve` as a cluster node: [`Placement`] for `herald_cluster::Node`, and the start
//! and stop of a node (the node runtime started off the async threads, the admin key made by
//! whichever node comes to own the control partition, the cluster layer served, the node's
//! partitions handed back at the stop).

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use herald_cluster::{ClusterError, Node, NodeConfig};
use herald_engine::{ApiKey, OrgId};

use super::{cluster_router, Front, Place, Placement};
use crate::config::Config;

/// A started node, as the cluster layer asks it.
struct NodePlacement {
    node: Arc<Node>,
    retry_after_s: u64,
}

impl Placement for NodePlacement {
    fn node_id(&self) -> &str {
        self.node.node_id()
    }

    fn partitions(&self) -> u32 {
        self.node.partitions()
    }

    fn partition_of(&self, org: &OrgId) -> u32 {
        self.node.partition_of(org)
    }

    fn place(&self, partition: u32) -> Place {
        place_of(self.node.place(partition))
    }

    fn api_key_epoch(&self) -> u64 {
        self.node.api_key_epoch()
    }

    fn api_key_by_hash(&self, hash: &[u8; 32]) -> Result<Option<ApiKey>, String> {
        self.node.api_key_by_hash(hash)
    }

    fn refresh_control(&self) -> Result<(), String> {
        self.node.refresh_control()
    }

    fn readiness(&self) -> Result<(), String> {
        self.node.readiness()
    }

    fn keys_current(&self) -> Result<(), String> {
        self.node.keys_current()
    }

    fn settle_control(&self) -> Result<(), String> {
        self.node.settle_control()
    }

    fn place_fresh(&self, partition: u32) -> Place {
        place_of(self.node.place_fresh(partition))
    }

    fn changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.node.changes()
    }

    fn retry_after_s(&self) -> u64 {
        self.retry_after_s
    }

    fn control(&self) -> u32 {
        self.node.control()
    }
}

fn place_of(place: herald_cluster::Place) -> Place {
    match place {
        herald_cluster::Place::Local(engine) => Place::Local(engine),
        herald_cluster::Place::Remote { node_id, advertise } => Place::Remote { node_id, advertise },
        herald_cluster::Place::Unowned => Place::Unowned,
    }
}

/// The node's settings from `config`.
fn node_config(config: &Config) -> NodeConfig {
    let c = &config.cluster;
    NodeConfig {
        nats_url: c.nats_url.clone(),
        node_id: c.node_id.clone(),
        advertise: c.advertise.trim_end_matches('/').to_owned(),
        partitions: c.partitions,
        replicas: c.replicas as usize,
        lease: c.lease,
        data_dir: config.store.data_dir.clone(),
        engine: config.engine_config(),
    }
}

/// Whenever this node comes to own the control partition (at start or by a later take-over),
/// makes the admin key if the cluster has none (`given`, else a generated one, printed once
/// and written to `admin.key` here), as one node does at its first start.
async fn bootstrap_admin_when_owned(node: Arc<NodePlacement>, data_dir: PathBuf, given: Option<String>) {
    let mut changes = node.changes();
    loop {
        if let Place::Local(engine) = node.place(node.control()) {
            let (dir, given) = (data_dir.clone(), given.clone());
            match tokio::task::spawn_blocking(move || crate::bootstrap_admin(&engine, &dir, given)).await {
                Ok(Ok(Some(key))) => crate::print_admin_key(&data_dir, &key),
                Ok(Ok(None)) => {}
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "making the cluster's admin key failed; tried again at the next change")
                }
                Err(e) => tracing::warn!(error = %e, "making the cluster's admin key failed"),
            }
        }
        if changes.changed().await.is_err() {
            return;
        }
    }
}

/// How long a node's start is tried again while NATS does not answer (nodes of a new cluster
/// starting together race to create its buckets; a NATS server may be restarting).
const START_RETRY_FOR: Duration = Duration::from_secs(30);

/// Starts the node off the async threads; a NATS error is tried again (with a growing wait, up
/// to [`START_RETRY_FOR`]), settings that cannot work (another partition count) are not.
async fn start_node(settings: NodeConfig) -> Result<Node, String> {
    let started = std::time::Instant::now();
    let mut wait = Duration::from_millis(500);
    loop {
        let attempt = settings.clone();
        match tokio::task::spawn_blocking(move || Node::start(attempt)).await.map_err(|e| e.to_string())? {
            Ok(node) => return Ok(node),
            Err(ClusterError::Nats(e)) if started.elapsed() + wait < START_RETRY_FOR => {
                tracing::warn!(error = %e, wait_ms = wait.as_millis() as u64, "starting the cluster node: NATS did not answer; trying again");
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(5));
            }
            Err(e) => return Err(format!("starting the cluster node: {e}")),
        }
    }
}

/// `herald serve` with `[cluster] nats_url` set: starts the node, serves every request through
/// the cluster layer until `stop`, then hands the node's partitions back.
pub async fn serve_node(
    config: Config,
    admin_key: Option<String>,
    stop: impl Future<Output = ()> + Send + 'static,
) -> Result<(), String> {
    let engine_config = config.engine_config();
    let (connections_max, open_files_max) = crate::connections_max(&config, &engine_config)?;
    let data_dir = config.store.data_dir.clone();
    std::fs::create_dir_all(&data_dir).map_err(|e| format!("creating {}: {e}", data_dir.display()))?;
    let node = Arc::new(start_node(node_config(&config)).await?);
    let retry_after_s = config.cluster.lease.as_secs().max(1);
    let placement = Arc::new(NodePlacement { node: node.clone(), retry_after_s });
    let bootstrap = tokio::spawn(bootstrap_admin_when_owned(placement.clone(), data_dir.clone(), admin_key));
    let front = Arc::new(Front::new(placement.clone(), &config));
    let listener = crate::bind(&config, connections_max, front.connections_refused.clone()).await?;
    tracing::info!(
        listen = %listener.1,
        data_dir = %data_dir.display(),
        node_id = %config.cluster.node_id,
        advertise = %config.cluster.advertise,
        partitions = config.cluster.partitions,
        connections_max,
        open_files_max,
        "herald cluster node {} listening on http://{}", config.cluster.node_id, listener.1
    );
    let stopping = front.clone();
    let on_stop = move || stopping.ready.store(false, Ordering::SeqCst);
    let result = crate::serve_until(listener, cluster_router(front), &config, stop, on_stop).await;
    bootstrap.abort();
    let _ = bootstrap.await;
    drop(placement);
    stop_node(node, config.server.shutdown_timeout, &data_dir).await;
    result
}

/// Hands the node's partitions back once the layer let go of it (its connections ended).
async fn stop_node(node: Arc<Node>, within: Duration, data_dir: &Path) {
    let mut node = node;
    for _ in 0..40 {
        match Arc::try_unwrap(node) {
            Ok(alone) => {
                let _ = tokio::task::spawn_blocking(move || alone.shutdown(within)).await;
                tracing::info!(data_dir = %data_dir.display(), "herald cluster node stopped: its partitions handed back");
                return;
            }
            Err(shared) => node = shared,
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // A connection still holds the layer: the node stops when the last of it is dropped.
    tracing::warn!("the cluster node is still in use after the stop; it stops when released");
}
