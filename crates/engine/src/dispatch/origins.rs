//! The request each delivery came from, while the loop knows it: handed over with a publish's
//! hints and kept until the delivery's attempts end (or the map is full), so that the log lines
//! of its attempts, and of its endpoint going inactive, name the request that caused them.
//! Memory only, bounded: after a restart or a refill past the bound the lines name no request.

use std::collections::HashMap;

use super::Id;
use crate::request::RequestId;

/// Origins kept at most; past it the map is emptied (the lines then name no request).
pub(super) const ORIGINS_MAX: usize = 1 << 16;

/// The publishing request of deliveries, by delivery.
#[derive(Default)]
pub(super) struct Origins {
    by_delivery: HashMap<Id, RequestId>,
}

impl Origins {
    pub(super) fn hold(&mut self, id: Id, request: RequestId) {
        if self.by_delivery.len() >= ORIGINS_MAX {
            self.by_delivery.clear();
        }
        self.by_delivery.insert(id, request);
    }

    pub(super) fn get(&self, id: &Id) -> Option<RequestId> {
        self.by_delivery.get(id).copied()
    }

    /// The delivery's attempts are over (or it is gone).
    pub(super) fn forget(&mut self, id: &Id) {
        self.by_delivery.remove(id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origins_are_kept_until_forgotten_and_bounded() {
        let mut origins = Origins::default();
        let request = RequestId::made();
        origins.hold([1; 16], request);
        assert_eq!(origins.get(&[1; 16]), Some(request));
        origins.forget(&[1; 16]);
        assert_eq!(origins.get(&[1; 16]), None);
        for n in 0..=ORIGINS_MAX as u128 {
            origins.hold(n.to_be_bytes(), request);
        }
        assert!(origins.by_delivery.len() <= ORIGINS_MAX);
    }
}
