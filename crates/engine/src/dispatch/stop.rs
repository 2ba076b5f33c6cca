//! The stop: no new attempts; those in flight get until the shutdown timeout to finish, the rest
//! are cut short and recorded as interrupted.

use std::sync::atomic::Ordering;
use std::time::Duration;

use super::{lock, Dispatcher};
use crate::commands::{Actor, Command, Submitted};

/// The error recorded for an attempt cut short by a stop.
pub const INTERRUPTED_ERROR: &str = "interrupted: herald stopped before the receiver answered";

/// How a stop went.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct StopReport {
    /// Attempts that finished (and were recorded) during the stop.
    pub finished: u64,
    /// Attempts cut short by the timeout and recorded as interrupted (durably, before the stop
    /// returned).
    pub interrupted: u64,
    /// Attempts cut short whose record was refused or not durable in time: they are still
    /// pending in the store and are made again after the restart.
    pub unrecorded: u64,
}

impl Dispatcher {
    /// The stop: no new attempts; wait for those in flight, then record the rest as interrupted,
    /// all within the shutdown timeout (the last [`record_reserve`] of it is kept for the
    /// records). An attempt its task has settled is left to it: it is recorded with its outcome,
    /// or, if its record is lost, attempted again after the restart.
    pub(super) async fn drain(mut self) -> StopReport {
        let mut report = StopReport::default();
        let timeout = self.cfg.shutdown_timeout;
        let set_deadline = *lock(&self.ctx.shared.stop_deadline);
        let deadline = match set_deadline {
            Some(at) => tokio::time::Instant::from_std(at),
            None => tokio::time::Instant::now() + timeout,
        };
        let reserve = record_reserve(timeout);
        let wait_until = deadline - reserve;
        // The report must reach `Engine::shutdown` by the deadline: the records get the reserve
        // but its last quarter, which is left for the aborts and the report.
        let records_until = deadline - reserve / 4;
        let shared = self.ctx.shared.clone();
        loop {
            let notified = shared.inbox.notified();
            self.take_finished(&mut report);
            if self.in_flight.is_empty() {
                break;
            }
            tokio::select! {
                _ = notified => {}
                _ = tokio::time::sleep_until(wait_until) => break,
            }
        }
        // Whatever finished in the meantime is recorded already; the rest is cut short.
        self.take_finished(&mut report);
        let (recorded_tx, mut recorded) = tokio::sync::mpsc::unbounded_channel();
        let submitted = self.interrupt_the_rest(&recorded_tx);
        drop(recorded_tx);
        let _ = tokio::time::timeout_at(records_until, async {
            while let Some(ok) = recorded.recv().await {
                report.interrupted += u64::from(ok);
            }
        })
        .await;
        report.unrecorded = submitted - report.interrupted;
        self.tasks.abort_all();
        while self.tasks.join_next().await.is_some() {}
        report
    }

    /// Cuts short every attempt in flight that its task has not settled, and submits its record
    /// as interrupted; whether each record was durable comes on `recorded_tx`. Returns how many
    /// were submitted.
    fn interrupt_the_rest(&mut self, recorded_tx: &tokio::sync::mpsc::UnboundedSender<bool>) -> u64 {
        let now = self.ctx.clock.now_ms();
        self.answered = 0;
        let mut submitted = 0u64;
        for (_, flight) in self.in_flight.drain() {
            if flight.settled.swap(true, Ordering::SeqCst) {
                continue;
            }
            flight.abort.abort();
            let command = Command::RecordAttempt {
                delivery_id: flight.delivery.id,
                started_at_ms: flight.started_at_ms,
                finished_at_ms: now.max(flight.started_at_ms),
                outcome: herald_projector::AttemptOutcome::Interrupted { error: INTERRUPTED_ERROR.into() },
                response_excerpt: Vec::new(),
                retry_after_ms: None,
            };
            let recorded_tx = recorded_tx.clone();
            // All in the urgent queue at once: they share the writer's batches and flushes. Never
            // blocking: with both queues full the record is refused (the delivery stays pending).
            self.ctx.log.try_submit_urgent_with(
                Submitted { actor: Actor::admin(), at_ms: now, command, request: None },
                move |out| {
                    let _ = recorded_tx.send(matches!(out, Ok(Ok(_))));
                },
            );
            submitted += 1;
        }
        submitted
    }

    /// Takes in the inbox during the stop: answered attempts free their slots, recorded ones end.
    fn take_finished(&mut self, report: &mut StopReport) {
        let inbox = self.ctx.shared.inbox.take();
        for id in inbox.released {
            self.release(id);
        }
        for f in inbox.finished {
            if self.in_flight.contains_key(&f.id) {
                report.finished += 1;
            }
            self.finish(f);
        }
    }
}

/// The part of the shutdown timeout kept for recording the attempts cut short: a quarter of it,
/// at most 1 s.
fn record_reserve(timeout: Duration) -> Duration {
    (timeout / 4).min(Duration::from_secs(1))
}
