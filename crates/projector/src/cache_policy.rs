//! Which of the projector's keys a read cache in front of the store keeps, so that a caller
//! builds a [`CachedStore`](herald_log::CachedStore) without naming keyspace bytes.

use herald_log::{Cacheable, CachedStore, Store};
use std::sync::Arc;

use crate::keys;

/// What a [`CachedStore`] in front of the projection's store needs to know.
#[derive(Debug, Clone, Copy)]
pub struct CachePolicy {
    /// The keys the cache keeps.
    pub cacheable: Cacheable,
    /// The keyspaces (first key bytes) whose new keys sort after the stored ones.
    pub ascending: &'static [u8],
}

impl CachePolicy {
    /// A cache of about `budget_bytes` in front of `store`, keeping what this policy names.
    pub fn cached_store(&self, store: Arc<dyn Store>, budget_bytes: usize) -> CachedStore {
        CachedStore::new(store, budget_bytes, self.cacheable).with_ascending(self.ascending)
    }
}

/// The keys the read cache keeps: what the dispatcher reads for each attempt (the delivery, and
/// its endpoint or organisation secret). Not the event and the record that holds its payload:
/// a first attempt is handed the payload by the batch that published it, so only retries read
/// them, and caching each publish would cost the writer a copy that is seldom read.
///
/// Event and delivery ids are UUID v7, so each new one sorts after those stored: the
/// writer's check that an id is new is answered by the cache, not by the store. So is the
/// check whether a delivery is in a key order (`KS_ORDER_BY_DELIVERY`), which the fold makes
/// when a delivery leaves `pending` and the dispatcher before each attempt, and whether an
/// event has an ordering key (`KS_ORDERING_KEY`): for deliveries newer than the last ordered
/// one, neither reads the store.
pub const fn cache_policy() -> CachePolicy {
    CachePolicy {
        cacheable: dispatcher_reads,
        ascending: &[keys::KS_EVENT, keys::KS_DELIVERY, keys::KS_ORDERING_KEY, keys::KS_ORDER_BY_DELIVERY],
    }
}

fn dispatcher_reads(key: &[u8]) -> bool {
    matches!(key.first(), Some(&(keys::KS_ORG_SECRET | keys::KS_ENDPOINT | keys::KS_DELIVERY)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_dispatchers_rows_are_cached_and_events_are_not() {
        let policy = cache_policy();
        for ks in [keys::KS_ORG_SECRET, keys::KS_ENDPOINT, keys::KS_DELIVERY] {
            assert!((policy.cacheable)(&[ks, 1]), "{ks:#x}");
        }
        assert!(!(policy.cacheable)(&[keys::KS_EVENT, 1]));
        assert!(!(policy.cacheable)(&[]));
    }
}
