//! The node's membership loop: every third of the lease (or at once when woken) it steps down
//! from partitions it may no longer serve, reads the live nodes and every lease, and acts on
//! [`balance::plan`]: hands extra partitions back, takes free ones over. Also the heartbeat
//! and the readiness rule, which reads the same view.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use herald_engine::{Actor, Command, Engine};

use super::{lock, read, write, Renewal, Seen, Served, Shared};
use crate::balance::{self, View};
use crate::lease::Held;
use crate::replica::catch_up;
use crate::stream::StreamWriteAhead;
use crate::takeover::{keep_renewed_with, unix_ms};

/// Beats this node's heartbeat every third of the lease until aborted (a stalled node skips).
pub(super) async fn heartbeat(shared: Arc<Shared>, advertise: String) {
    loop {
        if !shared.stalled.load(Ordering::SeqCst) {
            let beat = shared.nodes.beat(&shared.node_id, &advertise, unix_ms());
            if let Ok(Err(e)) = tokio::time::timeout(shared.lease, beat).await {
                tracing::warn!(node = %shared.node_id, error = %e, "heartbeat not written");
            }
        }
        tokio::time::sleep(shared.lease / 3).await;
    }
}

/// The membership loop (its own thread: take-overs block on NATS and on the stores).
pub(super) fn run(shared: Arc<Shared>) {
    while !shared.stopping() {
        if !shared.stalled.load(Ordering::SeqCst) {
            step_down_refused(&shared);
            turn(&shared);
        }
        shared.sleep(shared.lease / 3);
    }
}

/// Stops serving, at once, every partition whose lease was lost or passed or whose engine
/// was fenced.
fn step_down_refused(shared: &Shared) {
    let now = unix_ms();
    let refused: Vec<(u32, String)> =
        read(&shared.served).iter().filter_map(|(&p, s)| s.refusal(now).map(|why| (p, why))).collect();
    for (partition, why) in refused {
        tracing::warn!(node = %shared.node_id, partition = %shared.label(partition), %why, "stepping down");
        stop_serving(shared, partition, false);
    }
}

/// One look at the cluster and what the plan says to do about it.
fn turn(shared: &Arc<Shared>) {
    let seen = match read_cluster(shared) {
        Ok(seen) => seen,
        Err(e) => {
            write(&shared.seen).error = Some(e);
            return;
        }
    };
    let view = plan_view(shared, &seen);
    *write(&shared.seen) = seen;
    let plan = balance::plan(&view);
    for partition in plan.release {
        if shared.stopping() {
            return;
        }
        tracing::info!(node = %shared.node_id, partition = %shared.label(partition), "handing back");
        stop_serving(shared, partition, true);
    }
    for partition in plan.claim {
        if shared.stopping() {
            return;
        }
        match take_over(shared, partition) {
            Ok(()) => {
                tracing::info!(node = %shared.node_id, partition = %shared.label(partition), "took over")
            }
            Err(e) => {
                tracing::info!(node = %shared.node_id, partition = %shared.label(partition), error = %e, "not taken over")
            }
        }
    }
}

/// Reads the live nodes and every lease (data partitions, then the control), within a lease.
fn read_cluster(shared: &Shared) -> Result<Seen, String> {
    let total = shared.partitions + 1;
    let read = async {
        let live = shared.nodes.live().await?;
        let leases = shared.leases.all(total).await?;
        Ok::<_, crate::ClusterError>((live, leases))
    };
    let (live, leases) = shared
        .runtime
        .block_on(async { tokio::time::timeout(shared.lease, read).await })
        .map_err(|_| format!("no answer from NATS within {:?}", shared.lease))?
        .map_err(|e| e.to_string())?;
    Ok(Seen { read: true, live, leases, at_ms: unix_ms(), error: None })
}

/// The view `balance::plan` decides on: a lease of this node's that it does not serve (a
/// restart, a failed take-over) reads as passed, so that the plan takes it (back) over.
fn plan_view(shared: &Shared, seen: &Seen) -> View {
    let served = read(&shared.served);
    let leases = seen
        .leases
        .iter()
        .enumerate()
        .map(|(p, lease)| match lease {
            Some(l) if l.node_id == shared.node_id && !served.contains_key(&(p as u32)) => {
                Some(crate::lease::Lease { lease_until_ms: 0, ..l.clone() })
            }
            other => other.clone(),
        })
        .collect();
    View {
        node_id: shared.node_id.clone(),
        live: seen.live.len().max(1),
        leases,
        now_ms: unix_ms(),
        skew_margin_ms: shared.skew_margin.as_millis() as u64,
    }
}

/// Takes `partition` over: the control partition's follower paused first (the engine opens
/// the same store), resumed if the take-over fails.
fn take_over(shared: &Arc<Shared>, partition: u32) -> Result<(), String> {
    let control = partition == shared.partitions;
    if control {
        shared.control.pause();
    }
    match open_partition(shared, partition) {
        Ok(served) => {
            write(&shared.served).insert(partition, served);
            if control {
                shared.control.changed_hands();
            }
            shared.bump_changes();
            Ok(())
        }
        Err(e) => {
            if control {
                shared.control.resume(shared);
            }
            Err(e)
        }
    }
}

/// Claims the lease (renewed from then on), catches the replica up, opens the engine writing
/// ahead to the stream, and writes `ClaimPartition` (the fence) as its first command.
fn open_partition(shared: &Arc<Shared>, partition: u32) -> Result<Served, String> {
    let store = shared.store(partition)?;
    let stream = shared.stream(partition)?;
    let leases = shared.leases.clone();
    let held = shared
        .runtime
        .block_on(async move { tokio::time::timeout(shared.lease, leases.claim(partition, unix_ms())).await })
        .map_err(|_| "no answer from NATS to the lease claim".to_string())?
        .map_err(|e| format!("lease: {e}"))?;
    let renewal = renew(shared, held.clone());
    let opened = (|| {
        let caught =
            shared.runtime.block_on(catch_up(&store, &stream)).map_err(|e| format!("catch-up: {e}"))?;
        let write_ahead = Arc::new(StreamWriteAhead::new(stream, shared.runtime.clone(), caught.position));
        let engine =
            Engine::open_store_with_write_ahead(shared.engine_config(partition), store, write_ahead.clone())
                .map_err(|e| e.to_string())?;
        let claim = Command::ClaimPartition { node_id: held.lease.node_id.clone(), epoch: held.lease.epoch };
        if let Err(e) = engine.execute_blocking(Actor::admin(), claim) {
            write_ahead.stop();
            engine.shutdown();
            return Err(format!("the claim record: {e}"));
        }
        Ok((engine, write_ahead))
    })();
    match opened {
        Ok((engine, write_ahead)) => Ok(Served { engine, write_ahead, renewal }),
        Err(e) => {
            renewal.task.abort();
            let held = lock(&renewal.held).clone();
            shared.release(&held);
            Err(e)
        }
    }
}

/// Keeps `held` renewed: each renewal moves the end the node may serve until; a loss marks
/// it lost and wakes the membership loop to step down.
fn renew(shared: &Arc<Shared>, held: Held) -> Renewal {
    let until_ms = Arc::new(AtomicU64::new(held.lease.lease_until_ms));
    let lost = Arc::new(AtomicBool::new(false));
    let latest = Arc::new(Mutex::new(held.clone()));
    let (until, latest_in) = (until_ms.clone(), latest.clone());
    let on_renewed = move |h: &Held| {
        until.store(h.lease.lease_until_ms, Ordering::SeqCst);
        *lock(&latest_in) = h.clone();
    };
    let lost_in = lost.clone();
    let shared_in = Arc::downgrade(shared);
    let on_lost = move |_| {
        lost_in.store(true, Ordering::SeqCst);
        if let Some(shared) = shared_in.upgrade() {
            shared.wake();
        }
    };
    let task = keep_renewed_with(&shared.runtime, shared.leases.clone(), held, on_renewed, on_lost);
    Renewal { task, held: latest, until_ms, lost }
}

/// Stops serving `partition`: not `Local` from here on; then its engine is shut down (within
/// its shutdown timeout) and its write-ahead stopped. A hand-back keeps the lease renewed
/// until the engine is down, then releases it; a step-down (lease lost, fenced) stops the
/// write-ahead first, since nothing it writes can go through.
pub(super) fn stop_serving(shared: &Shared, partition: u32, hand_back: bool) {
    let Some(served) = write(&shared.served).remove(&partition) else { return };
    shared.bump_changes();
    if !hand_back {
        served.renewal.task.abort();
        served.write_ahead.stop();
    }
    served.engine.shutdown();
    served.write_ahead.stop();
    if hand_back {
        served.renewal.task.abort();
        let held = lock(&served.renewal.held).clone();
        shared.release(&held);
    }
    if partition == shared.partitions {
        shared.control.resume(shared);
    }
}

/// The readiness rule, on the last view (`held` = the partitions this node serves, each
/// caught up at its take-over and not refused). With `share` = ceil((partitions + 1) / live
/// nodes), the node is ready when it holds its share, or when it holds less but nothing is
/// left for it to take: every partition has a live lease (none free or passed) and no other
/// node holds more than its share (no hand-back due that this node would then take). True in
/// any steady cluster, whatever the plan's spread (a fourth node may hold fewer than the
/// others); false while a take-over by this node is due.
pub(super) fn share_reached(shared: &Shared, seen: &Seen, held: u32, now: u64) -> Result<(), String> {
    let share = shared.share(seen.live.len().max(1));
    if held >= share {
        return Ok(());
    }
    let margin = shared.skew_margin.as_millis() as u64;
    let mut per_node: BTreeMap<&str, u32> = BTreeMap::new();
    for (partition, lease) in seen.leases.iter().enumerate() {
        let partition = partition as u32;
        let mine = read(&shared.served).contains_key(&partition);
        match lease {
            Some(l)
                if mine
                    || (l.node_id != shared.node_id && now <= l.lease_until_ms.saturating_add(margin)) =>
            {
                *per_node.entry(l.node_id.as_str()).or_default() += 1;
            }
            _ => {
                return Err(format!(
                    "owns {held} of its share {share}; partition {} has no owner yet",
                    shared.label(partition)
                ))
            }
        }
    }
    if let Some((node, n)) = per_node.iter().find(|(node, &n)| **node != shared.node_id && n > share) {
        return Err(format!(
            "owns {held} of its share {share}; node {node} holds {n}, over its share (a hand-back is due)"
        ));
    }
    Ok(())
}
