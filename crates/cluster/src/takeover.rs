//! Taking a partition over, and keeping it: claim its lease, bring the local replica to the
//! stream's end, open its log writing ahead to the stream, and write the fence (a
//! `PartitionClaimed` record) first; then renew the lease every third of it, and step down the
//! moment it is lost.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use herald_log::{Log, LogError, Machine, Store, WriteAhead};
use herald_projector::Event;

use crate::error::ClusterError;
use crate::lease::{Held, LeaseError, Leases};
use crate::replica::{catch_up, CaughtUp};
use crate::stream::{PartitionStream, StreamWriteAhead};

/// Unix time in milliseconds, by this host's clock (leases are judged by it, with a margin).
pub fn unix_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// A partition this node took over: its log (writing ahead to the stream), its lease, and
/// what the catch-up before the claim applied.
pub struct Owned<M: Machine> {
    pub log: Log<M>,
    pub held: Held,
    pub caught: CaughtUp,
    /// The log's write-ahead, to stop its publishes when the log closes.
    pub write_ahead: Arc<StreamWriteAhead>,
}

impl<M: Machine> Owned<M> {
    /// Closes the log: stops its write-ahead's publishes (the batch in progress is refused),
    /// then waits up to `within` for its writer. Call it while the NATS runtime still runs.
    pub fn close(&self, within: Duration) -> bool {
        self.write_ahead.stop();
        self.log.close_within(within)
    }
}

/// Why a take-over did not happen.
#[derive(Debug, Clone, PartialEq)]
pub enum TakeOverError {
    /// The lease was not to be had (held by a live owner, or claimed by another node first).
    Lease(LeaseError),
    /// The stream could not be read, or the replica not caught up.
    Cluster(ClusterError),
    /// The log did not open, or the claim record was not written: fenced when another node
    /// wrote to the stream after this one caught up (nothing was applied; try again).
    Log(LogError),
}

impl std::fmt::Display for TakeOverError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TakeOverError::Lease(e) => write!(f, "lease: {e}"),
            TakeOverError::Cluster(e) => write!(f, "{e}"),
            TakeOverError::Log(e) => write!(f, "log: {e}"),
        }
    }
}

impl std::error::Error for TakeOverError {}

/// Takes partition `stream.partition()` over at `now_ms`: claims the lease (the next epoch),
/// catches the replica in `store` up, opens its log with `open` (handing it the write-ahead to
/// the stream), and writes `PartitionClaimed { node_id, epoch }` through `claim` as the first
/// record after the catch-up: the fence. Blocks on `runtime`; call it from outside the runtime.
pub fn take_over<M: Machine>(
    runtime: &tokio::runtime::Handle,
    leases: &Leases,
    stream: &PartitionStream,
    store: Arc<dyn Store>,
    now_ms: u64,
    open: impl FnOnce(Arc<dyn Store>, Arc<dyn WriteAhead>) -> Result<Log<M>, LogError>,
    claim: impl FnOnce(&Log<M>, Event) -> Result<(), LogError>,
) -> Result<Owned<M>, TakeOverError> {
    let held = runtime.block_on(leases.claim(stream.partition(), now_ms)).map_err(TakeOverError::Lease)?;
    let caught = runtime.block_on(catch_up(&store, stream)).map_err(TakeOverError::Cluster)?;
    let write_ahead = Arc::new(StreamWriteAhead::new(stream.clone(), runtime.clone(), caught.position));
    let log = open(store, write_ahead.clone()).map_err(TakeOverError::Log)?;
    let fence = Event::PartitionClaimed { node_id: held.lease.node_id.clone(), epoch: held.lease.epoch };
    if let Err(e) = claim(&log, fence) {
        log.close();
        return Err(TakeOverError::Log(e));
    }
    Ok(Owned { log, held, caught, write_ahead })
}

/// Renews `held` every third of the lease on `runtime` until it is lost, then calls
/// `on_lost` once (step down: stop serving the partition). A renewal that fails for another
/// reason (NATS unreachable) is tried again; once the lease's own end has passed unrenewed,
/// it counts as lost. Abort the returned task to stop renewing (a hand-back releases first).
pub fn keep_renewed(
    runtime: &tokio::runtime::Handle,
    leases: Arc<Leases>,
    held: Held,
    on_lost: impl FnOnce(LeaseError) + Send + 'static,
) -> tokio::task::JoinHandle<()> {
    keep_renewed_with(runtime, leases, held, |_| {}, on_lost)
}

/// [`keep_renewed`], calling `on_renewed` with the lease after each renewal (its new end and
/// revision: what a hand-back releases, and until when the holder may serve).
pub fn keep_renewed_with(
    runtime: &tokio::runtime::Handle,
    leases: Arc<Leases>,
    mut held: Held,
    on_renewed: impl Fn(&Held) + Send + 'static,
    on_lost: impl FnOnce(LeaseError) + Send + 'static,
) -> tokio::task::JoinHandle<()> {
    let every = leases.settings().lease / 3;
    runtime.spawn(async move {
        loop {
            tokio::time::sleep(every.max(Duration::from_millis(10))).await;
            match leases.renew(&held, unix_ms()).await {
                Ok(renewed) => {
                    held = renewed;
                    on_renewed(&held);
                }
                Err(e @ LeaseError::Lost(_)) | Err(e @ LeaseError::HeldBy(_)) => return on_lost(e),
                Err(e) if unix_ms() > held.lease.lease_until_ms => return on_lost(e),
                Err(_) => {}
            }
        }
    })
}
