//! What a batch tells once it is durable, beyond the due deliveries: the engine's counts (events
//! published, attempt durations) and the delivery changes its subscribers wait for. Noted while
//! the batch's commands are staged, told from the batch's after-flush hook, forgotten when the
//! batch is aborted, so each fact is counted exactly once and only once durable.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use herald_projector::{AttemptOutcome, Event};
use tokio::sync::broadcast;

use crate::stats::{AttemptKind, EngineStats};
use crate::subscribe::DeliveryChange;

/// The batch being written's notes, and where they go.
pub(super) struct Told {
    stats: Arc<EngineStats>,
    changes: Option<broadcast::Sender<DeliveryChange>>,
    /// Live subscriptions to `changes` (read without the broadcast's lock).
    subscribers: Arc<AtomicUsize>,
    staged: Staged,
}

/// [`Told::mark`]: the notes of the commands before the one being staged.
pub(super) struct Mark {
    published: u64,
    attempts: usize,
}

/// One batch's notes.
#[derive(Default)]
struct Staged {
    published: u64,
    /// (outcome, microseconds) of each attempt recorded.
    attempts: Vec<(AttemptKind, u64)>,
    changes: Vec<DeliveryChange>,
}

impl Staged {
    fn is_empty(&self) -> bool {
        self.published == 0 && self.attempts.is_empty() && self.changes.is_empty()
    }
}

impl Told {
    pub(super) fn new(stats: Arc<EngineStats>) -> Told {
        Told { stats, changes: None, subscribers: Arc::default(), staged: Staged::default() }
    }

    /// Delivery changes go to `changes` from now on, while `subscribers` is above 0.
    pub(super) fn with_changes(
        mut self,
        changes: broadcast::Sender<DeliveryChange>,
        subscribers: Arc<AtomicUsize>,
    ) -> Told {
        self.changes = Some(changes);
        self.subscribers = subscribers;
        self
    }

    /// Whether anyone subscribes to delivery changes: only then does the fold report them.
    pub(super) fn watching(&self) -> bool {
        self.subscribers.load(Ordering::Relaxed) > 0
    }

    /// Notes what `event`, staged, counts for.
    pub(super) fn event(&mut self, event: &Event) {
        match event {
            Event::EventPublishedWithDeliveries { .. } => self.staged.published += 1,
            Event::AttemptRecorded { started_at_ms, finished_at_ms, outcome, .. } => {
                let kind = match outcome {
                    AttemptOutcome::Delivered { .. } => AttemptKind::Delivered,
                    AttemptOutcome::Failed { .. } => AttemptKind::Failed,
                    AttemptOutcome::Interrupted { .. } => AttemptKind::Interrupted,
                };
                let us = finished_at_ms.saturating_sub(*started_at_ms).saturating_mul(1000);
                self.staged.attempts.push((kind, us));
            }
            _ => {}
        }
    }

    /// Where the notes stand, before a command is staged.
    pub(super) fn mark(&self) -> Mark {
        Mark { published: self.staged.published, attempts: self.staged.attempts.len() }
    }

    /// Forgets what was noted since `mark`: that command was rejected and rolled back.
    pub(super) fn rollback(&mut self, mark: Mark) {
        self.staged.published = mark.published;
        self.staged.attempts.truncate(mark.attempts);
    }

    /// Notes the delivery changes of a command that passed.
    pub(super) fn changes(&mut self, changes: &mut Vec<DeliveryChange>) {
        self.staged.changes.append(changes);
    }

    /// What to run once the batch's flush is done: count, and tell subscribers, if it succeeded.
    /// A failed flush leaves the batch applied but unacknowledged: neither counted nor told.
    pub(super) fn after_flush(&mut self) -> Option<impl FnOnce(bool) + Send + 'static> {
        if self.staged.is_empty() {
            return None;
        }
        let staged = std::mem::take(&mut self.staged);
        let (stats, changes) = (self.stats.clone(), self.changes.clone());
        Some(move |flushed: bool| {
            if !flushed {
                return;
            }
            stats.published(staged.published);
            for (kind, us) in staged.attempts {
                stats.attempt_took(kind, us);
            }
            if let Some(changes) = changes {
                for change in staged.changes {
                    // No subscriber left: nothing to tell (never an error to the batch).
                    let _ = changes.send(change);
                }
            }
        })
    }

    /// Nothing of the batch was written: forget its notes.
    pub(super) fn aborted(&mut self) {
        self.staged = Staged::default();
    }
}
