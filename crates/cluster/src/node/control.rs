//! The control partition as this node sees it: a local replica at `<data_dir>/cluster/control`
//! kept caught up (every [`CONTROL_FOLLOW_EVERY`], at once when a message is published on the
//! control subject, and on demand) while another node owns it; the owner's engine when this
//! node does. API keys are read from one or the other, with an epoch that moves whenever they
//! may have changed.
//!
//! A key change is effective at once on every node: each heartbeat reports the control
//! position this node's replica has applied, and the owner answers a key's creation or
//! revocation only once every live node reports it applied (or [`Timing::settle`] passed).
//! A follower answers from its replica only while it is *trusted* ([`Trust`]): (a) its
//! heartbeats have been stored without a break since a run began, and the last one cannot
//! have aged out yet (sent + TTL - margin): an owner that found it not live waited for nothing
//! of it, and it stopped trusting before its heartbeat could drop; (b) a catch-up begun after
//! that run's first heartbeat was stored has ended: a node back in the live set read every
//! change the owner did not wait for; (c) that catch-up began less than
//! `settle - margin` ago: a live node that reports no progress stops trusting by the time the
//! owner stops waiting for it. Untrusted, a request first beats (when out of the live set) and
//! catches up, else is answered 503.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use herald_engine::{get_api_key_by_hash, ApiKey};
use herald_log::{write_ahead_position, Store};
use herald_projector::CheckedTables;

use super::{lock, Place, Shared, Wakeup, CONTROL_FOLLOW_EVERY};
use crate::partition::CONTROL_SUBJECT;
use crate::replica::catch_up_within;
use crate::takeover::unix_ms;

/// The times the trust rule works with (see the module's header).
#[derive(Debug, Clone, Copy)]
pub(super) struct Timing {
    /// How long a heartbeat stays in the live set after it is stored.
    pub ttl: Duration,
    /// Taken off every bound this node keeps, for clocks that do not run at one rate.
    pub margin: Duration,
    /// How long the owner waits for the live nodes after a key changes.
    pub settle: Duration,
}

/// What the trust rule remembers.
#[derive(Debug, Default)]
struct Trust {
    /// The current run of unbroken heartbeats: when its first one was stored (acknowledged),
    /// and until when the last one keeps this node live for certain (sent + TTL - margin).
    run: Option<(Instant, Instant)>,
    /// When the last catch-up that ended had begun.
    fresh_from: Option<Instant>,
}

/// The control replica and whether this node follows it.
pub(super) struct ControlReplica {
    store: Arc<dyn Store>,
    /// `true` while this node follows the control partition (does not own it); held while a
    /// catch-up runs, so that a take-over waits for it before the engine opens the store.
    following: Mutex<bool>,
    /// Whether the replica has been caught up (or taken over) at least once since the start.
    caught_up: AtomicBool,
    /// Moves when the replica advanced or the partition changed hands here.
    epoch: AtomicU64,
    /// Catch-ups begun and ended, one each (odd while one runs): a refresh that finds one
    /// running takes the end of one begun after it asked.
    rounds: AtomicU64,
    timing: Timing,
    trust: Mutex<Trust>,
    /// Until when the replica may be answered from, in ms after `base` (0: not now).
    trusted_until_ms: AtomicU64,
    base: Instant,
    /// Wakes the follower before its next turn (a message on the control subject).
    wake: Wakeup,
}

/// How long [`Node::refresh_control`](super::Node::refresh_control) waits for a catch-up
/// already running before it answers that the replica is busy.
pub const REFRESH_WAIT: Duration = Duration::from_secs(2);

impl ControlReplica {
    pub(super) fn new(store: Arc<dyn Store>, timing: Timing) -> ControlReplica {
        ControlReplica {
            store,
            following: Mutex::new(true),
            caught_up: AtomicBool::new(false),
            epoch: AtomicU64::new(1),
            rounds: AtomicU64::new(0),
            timing,
            trust: Mutex::new(Trust::default()),
            trusted_until_ms: AtomicU64::new(0),
            base: Instant::now(),
            wake: Wakeup::default(),
        }
    }

    /// A heartbeat sent at `sent` was stored (acknowledged at `acked`): it extends the run
    /// when the run's last beat could not have aged out before it was stored, else begins one.
    pub(super) fn beaten(&self, sent: Instant, acked: Instant) {
        let until = sent + self.timing.ttl.saturating_sub(self.timing.margin);
        let mut trust = lock(&self.trust);
        trust.run = match trust.run {
            Some((since, last)) if acked < last => Some((since, last.max(until))),
            _ => Some((acked, until)),
        };
        self.retrust(&trust);
    }

    /// A catch-up begun at `started` ended: the replica holds every message stored before.
    fn caught(&self, started: Instant) {
        let mut trust = lock(&self.trust);
        trust.fresh_from = Some(trust.fresh_from.map_or(started, |f| f.max(started)));
        self.retrust(&trust);
    }

    /// This node leaves the live nodes: the replica is no longer answered from.
    pub(super) fn left(&self) {
        let mut trust = lock(&self.trust);
        trust.run = None;
        self.retrust(&trust);
    }

    fn retrust(&self, trust: &Trust) {
        let until = match (trust.run, trust.fresh_from) {
            (Some((since, live_until)), Some(fresh)) if fresh >= since => {
                let recent = self.timing.settle.saturating_sub(self.timing.margin);
                live_until.min(fresh + recent)
            }
            _ => self.base,
        };
        let ms = until.saturating_duration_since(self.base).as_millis() as u64;
        self.trusted_until_ms.store(ms, Ordering::SeqCst);
    }

    /// Whether the run of heartbeats still keeps this node live for certain.
    fn live_now(&self) -> bool {
        lock(&self.trust).run.is_some_and(|(_, until)| Instant::now() < until)
    }

    /// Ok while the replica may be answered from (see the module's header); else why not.
    pub(super) fn trusted(&self) -> Result<(), String> {
        let now = Instant::now().saturating_duration_since(self.base).as_millis() as u64;
        if now < self.trusted_until_ms.load(Ordering::SeqCst) {
            return Ok(());
        }
        Err("this node's copy of the API keys is not known to be current (it is out of the live \
             nodes or has not caught up lately)"
            .into())
    }

    /// Wakes the follower now.
    fn wake(&self) {
        self.wake.wake();
    }

    /// Sleeps up to `every`, or until woken.
    fn sleep(&self, every: Duration) {
        self.wake.sleep(every);
    }

    /// Whether the replica has been caught up (or taken over) at least once since the start.
    pub(super) fn caught_up(&self) -> bool {
        self.caught_up.load(Ordering::SeqCst)
    }

    /// Stops following (a take-over of the control partition begins): waits for a catch-up in
    /// progress to end.
    pub(super) fn pause(&self) {
        *lock(&self.following) = false;
    }

    /// The control partition became this node's: its engine answers from now on.
    pub(super) fn changed_hands(&self) {
        self.caught_up.store(true, Ordering::SeqCst);
        self.epoch.fetch_add(1, Ordering::SeqCst);
    }

    /// Follows again (this node stopped serving the control partition, its engine is closed).
    pub(super) fn resume(&self) {
        *lock(&self.following) = true;
        self.epoch.fetch_add(1, Ordering::SeqCst);
    }

    /// Catches the replica up to the stream's end, if this node follows. Err when it does not
    /// follow (a take-over or a step-down of the control partition in progress here) or the
    /// catch-up failed.
    fn catch_up(&self, shared: &Shared) -> Result<(), String> {
        self.catch_up_locked(shared, lock(&self.following))
    }

    /// [`ControlReplica::catch_up`] on demand: a catch-up already running (the follower's, or
    /// another request's) is waited for up to [`REFRESH_WAIT`], and the end of one begun after
    /// the ask serves instead of a second one: it read the stream after this request's key
    /// missed.
    fn refresh(&self, shared: &Shared) -> Result<(), String> {
        let asked = Instant::now();
        let at_ask = self.rounds.load(Ordering::SeqCst);
        // The end of the first catch-up begun after the ask: the first even count past it
        // (odd while one runs).
        let ended_after = if at_ask % 2 == 0 { at_ask + 2 } else { at_ask + 3 };
        loop {
            match self.following.try_lock() {
                Ok(following) => return self.catch_up_locked(shared, following),
                Err(std::sync::TryLockError::Poisoned(e)) => {
                    return self.catch_up_locked(shared, e.into_inner())
                }
                Err(std::sync::TryLockError::WouldBlock) => {}
            }
            if self.rounds.load(Ordering::SeqCst) >= ended_after {
                return Ok(());
            }
            if asked.elapsed() >= REFRESH_WAIT {
                return Err(format!("the control replica is busy catching up (waited {REFRESH_WAIT:?})"));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// A catch-up while this node follows, counted in `rounds` (begun, ended).
    fn catch_up_locked(
        &self,
        shared: &Shared,
        following: std::sync::MutexGuard<'_, bool>,
    ) -> Result<(), String> {
        if !*following {
            return Err("the control partition is changing hands on this node".into());
        }
        self.rounds.fetch_add(1, Ordering::SeqCst);
        let out = self.catch_up_following(shared);
        self.rounds.fetch_add(1, Ordering::SeqCst);
        drop(following);
        out
    }

    fn catch_up_following(&self, shared: &Shared) -> Result<(), String> {
        let started = Instant::now();
        let stream = shared.stream(shared.partitions)?;
        // Nothing new (the usual case, four times a second): one request, no log opened. A
        // replica checked against the stream once stays a prefix of it (messages never change).
        if self.caught_up.load(Ordering::SeqCst) {
            let last = shared.runtime.block_on(stream.last_sequence()).map_err(|e| e.to_string())?;
            let position = write_ahead_position(self.store.as_ref()).map_err(|e| e.to_string())?;
            if last == position {
                self.caught(started);
                return Ok(());
            }
        }
        let caught = shared
            .runtime
            // Bounded like a take-over's: a stream without a leader (an election after a
            // nats-server died) must not hold `pause()` for the client's 10 s or a consumer's 30 s.
            .block_on(catch_up_within(&self.store, &stream, stream.settings().ack_wait))
            .map_err(|e| format!("catching the control partition up: {e}"))?;
        if caught.messages > 0 || caught.discarded {
            self.epoch.fetch_add(1, Ordering::SeqCst);
        }
        self.caught_up.store(true, Ordering::SeqCst);
        self.caught(started);
        Ok(())
    }

    /// The control position the replica (or the owner's engine, on the same store) applied.
    fn applied(&self) -> Option<u64> {
        write_ahead_position(self.store.as_ref()).ok()
    }
}

/// Writes this node's heartbeat, reporting its applied control position, and notes it in the
/// trust rule once stored.
pub(super) async fn beat(shared: &Shared) -> Result<(), crate::ClusterError> {
    let applied = shared.control.applied();
    let sent = Instant::now();
    shared.nodes.beat_applied(&shared.node_id, &shared.advertise, unix_ms(), applied).await?;
    shared.control.beaten(sent, Instant::now());
    Ok(())
}

/// [`beat`] from a thread, within a lease.
fn beat_blocking(shared: &Shared) -> Result<(), String> {
    let written = shared.runtime.block_on(async { tokio::time::timeout(shared.lease, beat(shared)).await });
    match written {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(format!("heartbeat not written: {e}")),
        Err(_) => Err(format!("heartbeat not written within {:?}", shared.lease)),
    }
}

/// The control follower's thread: catches the replica up every [`CONTROL_FOLLOW_EVERY`] (or at
/// once when woken by a control message) while this node follows, and beats at once when that
/// moved its position, so that the owner waiting for it hears of it. Until the node stops.
pub(super) fn follow(shared: Arc<Shared>) {
    while !shared.stopping() {
        let owner = matches!(shared.place(shared.partitions), Place::Local(_));
        if !owner && !shared.stalled.load(Ordering::SeqCst) {
            let before = shared.control.applied();
            if let Err(e) = shared.control.catch_up(&shared) {
                tracing::debug!(node = %shared.node_id, error = %e, "control replica not caught up");
            }
            if shared.control.applied() != before {
                if let Err(e) = beat_blocking(&shared) {
                    tracing::debug!(node = %shared.node_id, error = %e, "control position not reported");
                }
            }
        }
        shared.control.sleep(CONTROL_FOLLOW_EVERY);
    }
}

/// Wakes the follower whenever a message is published on the control subject (a core NATS
/// subscription; the follower's turns every [`CONTROL_FOLLOW_EVERY`] remain the fallback).
/// Runs until aborted.
pub(super) async fn watch_control(shared: Arc<Shared>) {
    use futures_util::StreamExt;
    loop {
        if let Ok(mut messages) = shared.js.client().subscribe(CONTROL_SUBJECT).await {
            while messages.next().await.is_some() {
                shared.control.wake();
            }
        }
        tokio::time::sleep(shared.lease / 3).await;
    }
}

impl Shared {
    pub(super) fn api_key_epoch(&self) -> u64 {
        let base = self.control.epoch.load(Ordering::SeqCst) << 32;
        match self.place(self.partitions) {
            Place::Local(engine) => base.wrapping_add(engine.api_key_epoch()),
            _ => base,
        }
    }

    pub(super) fn api_key_by_hash(&self, hash: &[u8; 32]) -> Result<Option<ApiKey>, String> {
        if let Place::Local(engine) = self.place(self.partitions) {
            return engine.read(|t| get_api_key_by_hash(t, hash)).map_err(|e| e.to_string());
        }
        if !self.control.caught_up.load(Ordering::SeqCst) {
            return Err("this node's replica of the control partition has not caught up yet".into());
        }
        self.control.trusted()?;
        CheckedTables::run(self.control.store.as_ref(), |t| get_api_key_by_hash(t, hash))
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())
    }

    pub(super) fn refresh_control(&self) -> Result<(), String> {
        if matches!(self.place(self.partitions), Place::Local(_)) {
            return Ok(());
        }
        super::outside_runtime(|| {
            // Out of the live set: back in it first, so that a catch-up begun after counts.
            if !self.control.live_now() && !self.stalled.load(Ordering::SeqCst) {
                beat_blocking(self)?;
            }
            self.control.refresh(self)
        })
    }

    /// Ok when this node may answer from the keys it has: it owns the control partition, or
    /// its replica is trusted (see the module's header).
    pub(super) fn keys_current(&self) -> Result<(), String> {
        if self.control_here() {
            return Ok(());
        }
        self.control.trusted()
    }

    /// Whether this node serves the control partition now (as [`Shared::place`] says `Local`,
    /// without its allocations: asked on every request).
    fn control_here(&self) -> bool {
        let served = super::read(&self.served);
        served.get(&self.partitions).is_some_and(|s| s.refusal(unix_ms()).is_none())
    }

    /// After a key changed through this node's engine: waits until every other live node
    /// reports a control position at least this node's, up to [`Timing::settle`] (by then a
    /// node that has not is trusted no more). It waits even if the control partition moved
    /// meanwhile: the change is in this node's store either way. Err names the nodes not heard
    /// from.
    pub(super) fn settle_control(&self) -> Result<(), String> {
        let Some(target) = self.control.applied() else {
            return Err("the control partition's position could not be read".into());
        };
        let deadline = Instant::now() + self.control.timing.settle;
        super::outside_runtime(|| loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let read =
                self.runtime.block_on(async { tokio::time::timeout(left, self.nodes.applied()).await });
            let behind: Vec<String> = match read {
                Ok(Ok(nodes)) => nodes
                    .into_iter()
                    .filter(|(id, at)| *id != self.node_id && at.is_none_or(|at| at < target))
                    .map(|(id, at)| format!("{id} at {}", at.map_or("?".into(), |a| a.to_string())))
                    .collect(),
                Ok(Err(e)) => vec![format!("(the live nodes: {e})")],
                Err(_) => vec!["(the live nodes: no answer)".into()],
            };
            if behind.is_empty() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "nodes {behind:?} did not report control position {target} within {:?}; they no \
                     longer answer from their keys",
                    self.control.timing.settle
                ));
            }
            std::thread::sleep(SETTLE_POLL);
        })
    }
}

/// How often the owner reads the live nodes' positions while it waits after a key change.
const SETTLE_POLL: Duration = Duration::from_millis(10);
