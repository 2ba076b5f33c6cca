//! The control partition as this node sees it: a local replica at `<data_dir>/cluster/control`
//! kept caught up (every [`CONTROL_FOLLOW_EVERY`], and at once on demand) while another node
//! owns it; the owner's engine when this node does. API keys are read from one or the other,
//! with an epoch that moves whenever they may have changed.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use herald_engine::{get_api_key_by_hash, ApiKey};
use herald_log::{write_ahead_position, Store};
use herald_projector::CheckedTables;

use super::{lock, Place, Shared, CONTROL_FOLLOW_EVERY};
use crate::replica::catch_up;

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
}

/// How long [`Node::refresh_control`](super::Node::refresh_control) waits for a catch-up
/// already running before it answers that the replica is busy.
pub const REFRESH_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

impl ControlReplica {
    pub(super) fn new(store: Arc<dyn Store>) -> ControlReplica {
        ControlReplica {
            store,
            following: Mutex::new(true),
            caught_up: AtomicBool::new(false),
            epoch: AtomicU64::new(1),
            rounds: AtomicU64::new(0),
        }
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
        let asked = std::time::Instant::now();
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
            std::thread::sleep(std::time::Duration::from_millis(5));
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
        let stream = shared.stream(shared.partitions)?;
        // Nothing new (the usual case, four times a second): one request, no log opened. A
        // replica checked against the stream once stays a prefix of it (messages never change).
        if self.caught_up.load(Ordering::SeqCst) {
            let last = shared.runtime.block_on(stream.last_sequence()).map_err(|e| e.to_string())?;
            let position = write_ahead_position(self.store.as_ref()).map_err(|e| e.to_string())?;
            if last == position {
                return Ok(());
            }
        }
        let caught = shared
            .runtime
            .block_on(catch_up(&self.store, &stream))
            .map_err(|e| format!("catching the control partition up: {e}"))?;
        if caught.messages > 0 || caught.discarded {
            self.epoch.fetch_add(1, Ordering::SeqCst);
        }
        self.caught_up.store(true, Ordering::SeqCst);
        Ok(())
    }
}

/// The control follower's thread: catches the replica up every [`CONTROL_FOLLOW_EVERY`] while
/// this node follows, until the node stops.
pub(super) fn follow(shared: Arc<Shared>) {
    while !shared.stopping() {
        let owner = matches!(shared.place(shared.partitions), Place::Local(_));
        if !owner && !shared.stalled.load(Ordering::SeqCst) {
            if let Err(e) = shared.control.catch_up(&shared) {
                tracing::debug!(node = %shared.node_id, error = %e, "control replica not caught up");
            }
        }
        std::thread::sleep(CONTROL_FOLLOW_EVERY);
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
        CheckedTables::run(self.control.store.as_ref(), |t| get_api_key_by_hash(t, hash))
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())
    }

    pub(super) fn refresh_control(&self) -> Result<(), String> {
        if matches!(self.place(self.partitions), Place::Local(_)) {
            return Ok(());
        }
        super::outside_runtime(|| self.control.refresh(self))
    }
}
