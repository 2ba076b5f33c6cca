//! Payloads handed over with new deliveries' hints, held by the loop until their first attempt
//! starts (an event never changes, so these save reading it back), within a byte bound.

use std::collections::HashMap;

use bytes::Bytes;

use super::{Id, HANDED_PAYLOAD_BYTES_MAX};

/// Held payloads by delivery, bounded by [`HANDED_PAYLOAD_BYTES_MAX`].
#[derive(Default)]
pub(super) struct Payloads {
    held: HashMap<Id, Bytes>,
    /// The bytes `held` holds.
    bytes: usize,
}

impl Payloads {
    /// Keeps a handed-over payload for `id`'s first attempt. When there is no room, the ones held
    /// are let go (their attempts read the store instead): that also clears any held for a
    /// delivery that is never looked at (one deleted while its entry was out of the queue).
    pub(super) fn hold(&mut self, id: Id, payload: Bytes) {
        if payload.len() > HANDED_PAYLOAD_BYTES_MAX {
            return;
        }
        if self.bytes + payload.len() > HANDED_PAYLOAD_BYTES_MAX {
            self.held.clear();
            self.bytes = 0;
        }
        self.bytes += payload.len();
        if let Some(old) = self.held.insert(id, payload) {
            self.bytes -= old.len();
        }
    }

    pub(super) fn take(&mut self, id: &Id) -> Option<Bytes> {
        let payload = self.held.remove(id)?;
        self.bytes -= payload.len();
        Some(payload)
    }
}
