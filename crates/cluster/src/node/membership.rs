//! The node's membership loop: every third of the lease (or at once when woken) it steps down
//! from partitions it may no longer serve, reads the live nodes and every lease, and acts on
//! [`balance::plan`]: hands extra partitions back, takes free ones over. Also the heartbeat
//! and the readiness rule, which reads the same view.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use herald_engine::{Actor, Command, Engine};

use super::{lock, read, write, Renewal, Seen, Served, Shared};
use crate::balance::{self, View};
use crate::lease::{fair_share, Held, Lease};
use crate::replica::catch_up_within;
use crate::stream::StreamWriteAhead;
use crate::takeover::{keep_renewed_with, unix_ms};

/// Beats this node's heartbeat every third of the lease until aborted (a stalled node skips).
pub(super) async fn heartbeat(shared: Arc<Shared>, _advertise: String) {
    loop {
        if !shared.stalled.load(Ordering::SeqCst) {
            let beat = super::control::beat(&shared);
            if let Ok(Err(e)) = tokio::time::timeout(shared.lease, beat).await {
                tracing::warn!(node = %shared.node_id, error = %e, "heartbeat not written");
            }
        }
        tokio::time::sleep(shared.lease / 3).await;
    }
}

/// Wakes the membership loop whenever a lease changes hands or is released (a renewal, the
/// same holder and epoch, does not), so that a hand-back is taken up at once and `place`
/// learns a new owner without waiting for the next turn. Runs until aborted.
pub(super) async fn watch_leases(shared: Arc<Shared>) {
    use futures_util::StreamExt;
    loop {
        if let Ok(mut changes) = shared.leases.watch().await {
            while let Some((partition, lease)) = changes.next().await {
                if moved(&shared, partition, &lease) {
                    shared.wake();
                }
            }
        }
        tokio::time::sleep(shared.lease / 3).await;
    }
}

/// Whether `lease` is news to the last look: released, or another holder or epoch.
fn moved(shared: &Shared, partition: u32, lease: &Lease) -> bool {
    if lease.lease_until_ms == 0 {
        return true;
    }
    match read(&shared.seen).leases.get(partition as usize) {
        Some(Some(known)) => known.node_id != lease.node_id || known.epoch != lease.epoch,
        _ => true,
    }
}

/// The membership loop (its own thread: take-overs block on NATS and on the stores).
pub(super) fn run(shared: Arc<Shared>) {
    let mut failed = Failed::default();
    while !shared.stopping() {
        if !shared.stalled.load(Ordering::SeqCst) {
            step_down_refused(&shared);
            turn(&shared, &mut failed);
        }
        shared.sleep(shared.lease / 3);
    }
}

/// The partitions whose last take-over failed, each with when it may be tried again: a
/// failed take-over releases its lease, which wakes this loop at once; without the pause a
/// stream that answers with an error at once would be claimed again and again.
#[derive(Default)]
struct Failed(BTreeMap<u32, std::time::Instant>);

impl Failed {
    fn due(&self, partition: u32) -> bool {
        self.0.get(&partition).is_none_or(|at| std::time::Instant::now() >= *at)
    }
}

/// Stops serving, at once, every partition whose lease was lost or passed or whose engine
/// was fenced.
fn step_down_refused(shared: &Shared) {
    let now = unix_ms();
    let refused: Vec<(u32, String)> =
        read(&shared.served).iter().filter_map(|(&p, s)| s.refusal(now).map(|why| (p, why))).collect();
    for (partition, why) in &refused {
        tracing::warn!(node = %shared.node_id, partition = %shared.label(*partition), %why, "stepping down");
    }
    let partitions: Vec<u32> = refused.into_iter().map(|(p, _)| p).collect();
    stop_serving(shared, &partitions, false, stop_within(shared));
}

/// One look at the cluster and what the plan says to do about it.
fn turn(shared: &Arc<Shared>, failed: &mut Failed) {
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
    if !plan.release.is_empty() {
        let names: Vec<String> = plan.release.iter().map(|&p| shared.label(p)).collect();
        tracing::info!(node = %shared.node_id, partitions = ?names, "handing back");
        stop_serving(shared, &plan.release, true, stop_within(shared));
    }
    let due: Vec<u32> = plan.claim.into_iter().filter(|&p| failed.due(p)).collect();
    for (partition, ok) in take_over_all(shared, &due) {
        if ok {
            failed.0.remove(&partition);
        } else {
            failed.0.insert(partition, std::time::Instant::now() + shared.lease / 3);
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
                Some(Lease { lease_until_ms: 0, ..l.clone() })
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

/// Takes `partitions` over: claims their leases one after another (each claim is a
/// compare-and-set on the whole lease bucket: made together, they would only make each other
/// try again), and takes each claimed one over on a thread of its own at once: a take-over
/// whose stream cannot be read yet (its leader lost with a NATS server, an election under way)
/// holds only itself, and each partition is served as soon as its own take-over is done.
/// Claiming stops at the first claim NATS leaves unanswered for a lease (the others would wait
/// as long); the control partition is claimed last, its follower paused first (the engine
/// opens the same store; the pause waits for a catch-up in progress). Waits for every
/// take-over; returns whether each succeeded (a claim refused counts as failed).
fn take_over_all(shared: &Arc<Shared>, partitions: &[u32]) -> Vec<(u32, bool)> {
    let Some(&first) = partitions.first() else { return Vec::new() };
    let mut order = partitions.to_vec();
    order.sort_by_key(|&p| p == shared.partitions);
    shared.taking.store(u64::from(first), Ordering::SeqCst);
    let done = std::thread::scope(|scope| {
        let mut takes = Vec::new();
        let mut done = Vec::new();
        for partition in order {
            if shared.stopping() {
                break;
            }
            let control = partition == shared.partitions;
            if control {
                shared.control.pause();
            }
            match claim(shared, partition) {
                Ok(held) => takes.push((partition, scope.spawn(move || take_over(shared, partition, held)))),
                Err(answered) => {
                    if control {
                        shared.control.resume();
                    }
                    done.push((partition, false));
                    if !answered {
                        break;
                    }
                }
            }
        }
        done.extend(takes.into_iter().map(|(p, take)| (p, take.join().unwrap_or(false))));
        done
    });
    shared.taking.store(super::NONE, Ordering::SeqCst);
    done
}

/// Claims `partition`'s lease. Err(whether NATS answered) when not claimed (logged).
fn claim(shared: &Shared, partition: u32) -> Result<Held, bool> {
    let leases = shared.leases.clone();
    let claim = shared.runtime.block_on(async move {
        tokio::time::timeout(shared.lease, leases.claim(partition, unix_ms())).await
    });
    let label = shared.label(partition);
    match claim {
        Ok(Ok(held)) => Ok(held),
        Ok(Err(e)) => {
            tracing::info!(node = %shared.node_id, partition = %label, error = %e, "not taken over");
            Err(true)
        }
        Err(_) => {
            tracing::info!(node = %shared.node_id, partition = %label, "not taken over: no answer from NATS to the lease claim");
            Err(false)
        }
    }
}

/// Takes `partition`, whose lease this node has just claimed (`held`), over; for the control
/// partition, its follower (paused before the claim) is told the engine answers now, or
/// resumed if the take-over fails. Logs the outcome; returns whether it succeeded.
fn take_over(shared: &Arc<Shared>, partition: u32, held: Held) -> bool {
    let control = partition == shared.partitions;
    let started = std::time::Instant::now();
    let opened = open_partition(shared, partition, held);
    let (node, label, took) = (&shared.node_id, shared.label(partition), started.elapsed());
    match opened {
        Ok(served) => {
            write(&shared.served).insert(partition, served);
            if control {
                shared.control.changed_hands();
            }
            shared.bump_changes();
            tracing::info!(node = %node, partition = %label, took = ?took, "took over");
            true
        }
        Err(e) => {
            if control {
                shared.control.resume();
            }
            tracing::info!(node = %node, partition = %label, took = ?took, error = %e, "not taken over");
            false
        }
    }
}

/// With the lease `held` (renewed from then on), catches the replica up, opens the engine
/// writing ahead to the stream, and writes `ClaimPartition` (the fence) as its first command.
/// Bounded: the catch-up gives up once NATS leaves a request or a message unanswered for the
/// stream's `ack_wait` (a stream without a leader yet), the fence's publish after the
/// stream's `publish_timeout`; a take-over that gives up stops renewing and releases the
/// lease, so that it is not held unserved, and is tried again at a later turn.
fn open_partition(shared: &Arc<Shared>, partition: u32, held: Held) -> Result<Served, String> {
    let renewal = renew(shared, held.clone());
    let (label, started) = (shared.label(partition), std::time::Instant::now());
    let stall = shared.stream_settings.ack_wait;
    tracing::debug!(node = %shared.node_id, partition = %label, epoch = held.lease.epoch, "lease claimed; catching up");
    let opened = (|| {
        let store = shared.store(partition)?;
        let stream = shared.stream(partition)?;
        let caught = shared
            .runtime
            .block_on(catch_up_within(&store, &stream, stall))
            .map_err(|e| format!("catch-up: {e}"))?;
        tracing::debug!(node = %shared.node_id, partition = %label, messages = caught.messages, took = ?started.elapsed(), "caught up; writing the claim");
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

/// Stops serving `partitions`, together: none is `Local` from here on; their engines' stops
/// begin at once (each within its shutdown timeout) and are waited for up to `within`; then
/// each write-ahead is stopped. A hand-back keeps the leases renewed until the engines are
/// down, then releases them; a step-down (lease lost, fenced) stops renewing and writing
/// ahead first, since nothing it writes can go through.
pub(super) fn stop_serving(shared: &Shared, partitions: &[u32], hand_back: bool, within: Duration) {
    let stopping: Vec<(u32, Served)> = {
        let mut served = write(&shared.served);
        partitions.iter().filter_map(|p| served.remove(p).map(|s| (*p, s))).collect()
    };
    if stopping.is_empty() {
        return;
    }
    shared.bump_changes();
    for (_, served) in &stopping {
        if !hand_back {
            served.renewal.task.abort();
            served.write_ahead.stop();
        }
        served.engine.begin_shutdown();
    }
    let engines: Vec<Engine> = stopping.iter().map(|(_, s)| s.engine.clone()).collect();
    let (done, stopped) = crossbeam_channel::bounded(1);
    std::thread::spawn(move || {
        for engine in engines {
            engine.shutdown();
        }
        let _ = done.send(());
    });
    if stopped.recv_timeout(within).is_err() {
        tracing::warn!(node = %shared.node_id, "engines not stopped within {within:?}; their write-aheads are cut");
    }
    for (partition, served) in stopping {
        served.write_ahead.stop();
        served.renewal.task.abort();
        if hand_back {
            let held = lock(&served.renewal.held).clone();
            shared.release(&held);
        }
        if partition == shared.partitions {
            shared.control.resume();
        }
    }
}

/// How long the membership loop waits for the engines it stops: their shutdown timeout and a
/// second more for their logs.
fn stop_within(shared: &Shared) -> Duration {
    shared.engine.delivery.shutdown_timeout + Duration::from_secs(1)
}

/// The readiness rule, on the last view (`served` = the partitions this node serves, each
/// caught up at its take-over and not refused). With `share` = ceil((partitions + 1) / live
/// nodes), the node is ready when it holds its share, or when it holds less but nothing is
/// left for it to take: every partition has a live lease (none free or passed) and no other
/// node holds more than its share (no hand-back due that this node would then take). True in
/// any steady cluster, whatever the plan's spread (a fourth node may hold fewer than the
/// others); false while a take-over by this node is due.
pub(super) fn share_reached(shared: &Shared, seen: &Seen, now_ms: u64) -> Result<(), String> {
    let served: Vec<u32> = read(&shared.served).keys().copied().collect();
    let look = Look {
        me: &shared.node_id,
        live: seen.live.len(),
        leases: &seen.leases,
        now_ms,
        margin_ms: shared.skew_margin.as_millis() as u64,
    };
    readiness_rule(&look, &served)
}

/// One look at the cluster, as the readiness rule reads it.
struct Look<'a> {
    me: &'a str,
    live: usize,
    /// Every partition's lease; the last is the control partition's.
    leases: &'a [Option<Lease>],
    now_ms: u64,
    margin_ms: u64,
}

/// [`share_reached`]'s rule on `look`, for a node serving `served`.
fn readiness_rule(look: &Look<'_>, served: &[u32]) -> Result<(), String> {
    let total = u32::try_from(look.leases.len()).unwrap_or(u32::MAX);
    let share = fair_share(total, look.live.max(1));
    let held = u32::try_from(served.len()).unwrap_or(u32::MAX);
    if held >= share {
        return Ok(());
    }
    let mut per_node: BTreeMap<&str, u32> = BTreeMap::new();
    for (partition, lease) in (0..total).zip(look.leases) {
        match lease {
            Some(l) if served.contains(&partition) => *per_node.entry(l.node_id.as_str()).or_default() += 1,
            Some(l)
                if l.node_id != look.me && look.now_ms <= l.lease_until_ms.saturating_add(look.margin_ms) =>
            {
                *per_node.entry(l.node_id.as_str()).or_default() += 1
            }
            _ => {
                let name = crate::partition::PartitionId::of(partition, total - 1).arg();
                return Err(format!("owns {held} of its share {share}; partition {name} has no owner yet"));
            }
        }
    }
    if let Some((node, n)) = per_node.iter().find(|(node, &n)| **node != look.me && n > share) {
        return Err(format!(
            "owns {held} of its share {share}; node {node} holds {n}, over its share (a hand-back is due)"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::balance::plan;

    fn lease(node: &str, until: u64) -> Option<Lease> {
        Some(Lease { node_id: node.into(), epoch: 1, lease_until_ms: until, advertise: String::new() })
    }

    /// Runs `balance::plan` for every node in turn (claims granted, hand-backs released) until
    /// nothing changes: the steady state the nodes reach.
    fn settle(nodes: &[&str], leases: &mut [Option<Lease>]) {
        for _ in 0..100 {
            let mut changed = false;
            for node in nodes {
                let view = View {
                    node_id: node.to_string(),
                    live: nodes.len(),
                    leases: leases.to_vec(),
                    now_ms: 1_000,
                    skew_margin_ms: 100,
                };
                let plan = plan(&view);
                for p in plan.release {
                    leases[p as usize] = lease(node, 0);
                    changed = true;
                }
                for p in plan.claim {
                    leases[p as usize] = lease(node, 5_000);
                    changed = true;
                }
            }
            if !changed {
                return;
            }
        }
        panic!("no steady state: {leases:?}");
    }

    fn ready(node: &str, live: usize, leases: &[Option<Lease>]) -> Result<(), String> {
        let served: Vec<u32> = (0..leases.len() as u32)
            .filter(|&p| {
                leases[p as usize].as_ref().is_some_and(|l| l.node_id == node && l.lease_until_ms > 1_000)
            })
            .collect();
        let look = Look { me: node, live, leases, now_ms: 1_000, margin_ms: 100 };
        readiness_rule(&look, &served)
    }

    #[test]
    fn every_node_of_a_steady_cluster_of_one_to_four_nodes_is_ready_and_a_joining_one_is_not() {
        let names = ["a", "b", "c", "d"];
        let mut dues = 0;
        for total in [2usize, 5, 17] {
            let mut leases = vec![None; total];
            for n in 1..=names.len() {
                let nodes = &names[..n];
                let joined = nodes[n - 1];
                // Before the others hand back (or before it claims what is free), the new node
                // has a take-over due: not ready.
                let owns = |node: &str| {
                    leases
                        .iter()
                        .flatten()
                        .filter(|l: &&Lease| l.node_id == node && l.lease_until_ms > 1_000)
                        .count()
                };
                let share = fair_share(total as u32, n) as usize;
                let due = owns(joined) < share
                    && (leases.iter().any(|l| l.is_none()) || nodes.iter().any(|o| owns(o) > share));
                if due {
                    let why = ready(joined, n, &leases).expect_err("a take-over is due");
                    assert!(why.contains("of its share"), "{why}");
                    dues += 1;
                }
                settle(nodes, &mut leases);
                for node in nodes {
                    assert_eq!(
                        ready(node, n, &leases),
                        Ok(()),
                        "{node} of {n} nodes, {total} partitions: {leases:?}"
                    );
                }
            }
        }
        assert!(dues >= 6, "joins with a take-over due: {dues}");
    }

    #[test]
    fn a_partition_whose_lease_passed_is_due_and_named() {
        let leases = vec![lease("a", 5_000), lease("b", 500), lease("b", 5_000)];
        let look = Look { me: "a", live: 2, leases: &leases, now_ms: 1_000, margin_ms: 100 };
        assert_eq!(
            readiness_rule(&look, &[0]),
            Err("owns 1 of its share 2; partition 1 has no owner yet".into())
        );
        let leases = vec![lease("a", 5_000), lease("b", 5_000), None];
        let look = Look { leases: &leases, ..look };
        assert_eq!(
            readiness_rule(&look, &[0]),
            Err("owns 1 of its share 2; partition control has no owner yet".into())
        );
    }
}
