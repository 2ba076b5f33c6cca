//! The inbox: what the writer thread and the attempt tasks hand to the loop (due hints, answered
//! attempts, recorded outcomes), bounded, taken whole by the loop once a turn.

use std::sync::Mutex;

use tokio::sync::futures::Notified;
use tokio::sync::Notify;

use herald_projector::EndpointId;

use super::{lock, Id, HANDED_PAYLOAD_BYTES_MAX};
use crate::commands::{DueHint, EndpointChange};

/// Hints waiting for the loop, at most; beyond it they are dropped and the queue is refilled
/// from the stored index.
const INBOX_HINTS_MAX: usize = 65_536;

/// What the writer thread hands to the loop. Callbacks only push here: the loop does the work.
#[derive(Default)]
pub(crate) struct Inbox {
    state: Mutex<InboxState>,
    wake: Notify,
}

#[derive(Default)]
pub(super) struct InboxState {
    pub(super) hints: Vec<DueHint>,
    /// Payload bytes the hints hold; past [`HANDED_PAYLOAD_BYTES_MAX`] further hints come
    /// without theirs (their attempts read it from the store), so a stalled loop does not
    /// hold a burst's payloads.
    hint_payload_bytes: usize,
    /// Attempts whose receiver has answered (their outcome is being recorded): their endpoint's
    /// slot is free for the next attempt.
    pub(super) released: Vec<Id>,
    /// Hints were dropped: the loop must refill from the whole index.
    pub(super) overflowed: bool,
    pub(super) finished: Vec<Finished>,
    /// Endpoints a receiver asked to pause (`Retry-After`), with until when.
    pub(super) paused: Vec<(EndpointId, u64)>,
    /// Endpoints whose delivery settings changed, or that were deleted, since the last turn.
    pub(super) endpoints: Vec<EndpointChange>,
}

pub(super) struct Finished {
    pub(super) id: Id,
    /// `Ok(Some(t))`: pending again at `t`; `Ok(None)`: no automatic retry; `Err`: not recorded
    /// (made again shortly).
    pub(super) result: Result<Option<u64>, NotRecorded>,
}

/// Why an attempt left nothing in the log.
#[derive(Debug)]
pub(super) enum NotRecorded {
    /// Its record, or a read it needed, was refused by the store (or the writer answered
    /// something else than an attempt's reply).
    Store,
    /// It was not made: a fault of this host (no file descriptor, no memory, no local port).
    LocalFault,
}

impl Inbox {
    /// Called by the command machine after each durable batch (`None`: after a failed one).
    pub(crate) fn hints(&self, due: Option<Vec<DueHint>>) {
        let mut st = lock(&self.state);
        let Some(due) = due else {
            st.overflowed = true;
            drop(st);
            self.wake.notify_one();
            return;
        };
        if st.hints.len() + due.len() > INBOX_HINTS_MAX {
            st.overflowed = true;
        } else {
            for mut hint in due {
                if let Some(payload) = &hint.payload {
                    if st.hint_payload_bytes + payload.len() > HANDED_PAYLOAD_BYTES_MAX {
                        hint.payload = None;
                    } else {
                        st.hint_payload_bytes += payload.len();
                    }
                }
                st.hints.push(hint);
            }
        }
        drop(st);
        self.wake.notify_one();
    }

    pub(super) fn released(&self, id: Id) {
        lock(&self.state).released.push(id);
        self.wake.notify_one();
    }

    pub(super) fn finished(&self, f: Finished) {
        lock(&self.state).finished.push(f);
        self.wake.notify_one();
    }

    /// A receiver asked, with `Retry-After`, that `endpoint` be left alone until `until_ms`.
    pub(super) fn paused(&self, endpoint: EndpointId, until_ms: u64) {
        lock(&self.state).paused.push((endpoint, until_ms));
        self.wake.notify_one();
    }

    /// Called by the command machine once a batch that changed endpoints' settings, or deleted
    /// endpoints, is applied. Bounded by the batch's commands.
    pub(crate) fn endpoints_changed(&self, changes: Vec<EndpointChange>) {
        lock(&self.state).endpoints.extend(changes);
        self.wake.notify_one();
    }

    pub(super) fn take(&self) -> InboxState {
        std::mem::take(&mut *lock(&self.state))
    }

    /// Wakes the loop (or its next wait, if it is not waiting).
    pub(super) fn wake(&self) {
        self.wake.notify_one();
    }

    /// Completes at the next [`Inbox::wake`] (or push), including one since the last wait.
    pub(super) fn notified(&self) -> Notified<'_> {
        self.wake.notified()
    }

    pub(super) fn is_empty(&self) -> bool {
        let st = lock(&self.state);
        st.hints.is_empty()
            && st.finished.is_empty()
            && st.released.is_empty()
            && !st.overflowed
            && st.paused.is_empty()
            && st.endpoints.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use herald_projector::{DeliveryId, Due};

    use super::*;

    fn hint(n: u128, payload: Option<Bytes>) -> DueHint {
        DueHint {
            due: Due { next_attempt_at_ms: 0, delivery_id: DeliveryId(uuid::Uuid::from_u128(n)) },
            payload,
            request: None,
        }
    }

    /// The inbox holds at most `HANDED_PAYLOAD_BYTES_MAX` of payloads: hints past it come without
    /// theirs (their attempts read the store), and taking the hints frees the room.
    #[test]
    fn the_inbox_bounds_the_payloads_its_hints_hold() {
        let inbox = Inbox::default();
        let big = Bytes::from(vec![b'x'; HANDED_PAYLOAD_BYTES_MAX / 2]);
        inbox.hints(Some((0..3).map(|n| hint(n, Some(big.clone()))).collect()));
        inbox.hints(Some(vec![hint(3, None)]));
        let held: Vec<bool> = inbox.take().hints.iter().map(|h| h.payload.is_some()).collect();
        assert_eq!(held, [true, true, false, false]);
        inbox.hints(Some(vec![hint(4, Some(big))]));
        assert!(inbox.take().hints[0].payload.is_some(), "room again once taken");
    }
}
