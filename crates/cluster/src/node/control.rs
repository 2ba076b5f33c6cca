//! The control partition as this node sees it: a local replica at `<data_dir>/cluster/control`
//! kept caught up (every [`CONTROL_FOLLOW_EVERY`], and at once on demand) while another node
//! owns it; the owner's engine when this node does. API keys are read from one or the other,
//! with an epoch that moves whenever they may have changed.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use herald_engine::{get_api_key_by_hash, ApiKey};
use herald_log::Store;
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
}

impl ControlReplica {
    pub(super) fn new(store: Arc<dyn Store>) -> ControlReplica {
        ControlReplica {
            store,
            following: Mutex::new(true),
            caught_up: AtomicBool::new(false),
            epoch: AtomicU64::new(1),
        }
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
        let following = lock(&self.following);
        if !*following {
            return Err("the control partition is changing hands on this node".into());
        }
        let stream = shared.stream(shared.partitions)?;
        let caught = shared
            .runtime
            .block_on(catch_up(&self.store, &stream))
            .map_err(|e| format!("catching the control partition up: {e}"))?;
        if caught.messages > 0 || caught.discarded {
            self.epoch.fetch_add(1, Ordering::SeqCst);
        }
        self.caught_up.store(true, Ordering::SeqCst);
        drop(following);
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
        super::outside_runtime(|| self.control.catch_up(self))
    }
}
