//! [`CachedStore`]: a bounded cache of recently written and recently read values in front of a
//! store, so that readers do not wait for the writer.
//!
//! sled 0.34.7 applies an atomic batch under a process-wide lock, and once a process has applied
//! one batch, every read takes that lock too: while the writer applies a batch, every `get` in
//! every other thread waits. Under load the writer is applying most of the time, so a reader
//! waits most of the time. The dispatcher reads, for each attempt, rows the writer wrote shortly
//! before (the delivery, its event, the payload record) and a few it reads over and over (the
//! endpoint); served from here, they do not wait.
//!
//! Consistency: the cache never holds a value the store did not hold at some moment after the
//! key was last written.
//! - After each batch is applied to the store, every cached key it wrote is put here (a delete
//!   as an absent value) before `apply` returns, so a batch is visible here no later than it is
//!   answered.
//! - A value read from the store is put here only if no batch was applied between the read and
//!   the insert (a generation counter, moved under the lock by each apply). A read that raced a
//!   batch is returned but not kept, nor is a read that found nothing.
//! - A failed apply empties the cache: what the store holds then is unknown.
//!
//! Only keys that `cacheable` accepts are kept; scans and `last` go to the store. Eviction is
//! first in, first out, by a byte budget that counts every insert (a key rewritten often uses
//! the budget each time, so the bookkeeping is bounded too).

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock, RwLockWriteGuard};

use crate::store::{Batch, Durability, Pair, Store, StoreError, Visit};

/// Bytes counted per cached entry on top of its key and value (map and queue bookkeeping).
pub const CACHE_ENTRY_OVERHEAD_BYTES: usize = 64;

/// Which keys a [`CachedStore`] keeps.
pub type Cacheable = fn(&[u8]) -> bool;

/// A store with a bounded read cache in front of `inner`. See the module documentation.
pub struct CachedStore {
    inner: Arc<dyn Store>,
    budget_bytes: usize,
    cacheable: Cacheable,
    state: RwLock<State>,
    hits: AtomicU64,
    misses: AtomicU64,
}

#[derive(Default)]
struct State {
    /// Key → (value, or `None`: absent; the stamp of its insert).
    map: HashMap<Vec<u8>, (Option<Vec<u8>>, u64)>,
    /// Inserts in order: key, stamp, bytes charged.
    order: VecDeque<(Vec<u8>, u64, usize)>,
    bytes: usize,
    next_stamp: u64,
    /// Moved by every apply: a read from the store is kept only if it did not move meanwhile.
    generation: u64,
}

/// Counters of a [`CachedStore`].
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct CacheStats {
    /// Gets of cacheable keys answered from the cache.
    pub hits: u64,
    /// Gets of cacheable keys that went to the store.
    pub misses: u64,
    pub entries: u64,
    pub bytes: u64,
}

impl State {
    fn insert(&mut self, key: &[u8], value: Option<Vec<u8>>, budget: usize) {
        let charged = key.len() + value.as_ref().map_or(0, Vec::len) + CACHE_ENTRY_OVERHEAD_BYTES;
        if charged > budget {
            // Larger than the whole cache: not kept, and an older value must not stay either.
            self.map.remove(key);
            return;
        }
        let stamp = self.next_stamp;
        self.next_stamp += 1;
        self.map.insert(key.to_vec(), (value, stamp));
        self.order.push_back((key.to_vec(), stamp, charged));
        self.bytes += charged;
        while self.bytes > budget {
            let Some((old_key, old_stamp, old_charged)) = self.order.pop_front() else { break };
            self.bytes -= old_charged;
            if self.map.get(&old_key).is_some_and(|(_, s)| *s == old_stamp) {
                self.map.remove(&old_key);
            }
        }
    }

    fn clear(&mut self) {
        self.map.clear();
        self.order.clear();
        self.bytes = 0;
    }
}

impl CachedStore {
    /// A cache of at most about `budget_bytes` (keys, values and bookkeeping) of the keys that
    /// `cacheable` accepts, in front of `inner`. A budget of 0 caches nothing.
    pub fn new(inner: Arc<dyn Store>, budget_bytes: usize, cacheable: Cacheable) -> CachedStore {
        CachedStore {
            inner,
            budget_bytes,
            cacheable,
            state: RwLock::new(State::default()),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
        }
    }

    pub fn inner(&self) -> &Arc<dyn Store> {
        &self.inner
    }

    pub fn stats(&self) -> CacheStats {
        let st = self.state.read().unwrap_or_else(|e| e.into_inner());
        CacheStats {
            hits: self.hits.load(Ordering::Relaxed),
            misses: self.misses.load(Ordering::Relaxed),
            entries: st.map.len() as u64,
            bytes: st.bytes as u64,
        }
    }

    fn write(&self) -> RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(|e| e.into_inner())
    }

    fn caches(&self, key: &[u8]) -> bool {
        self.budget_bytes > 0 && (self.cacheable)(key)
    }
}

impl Store for CachedStore {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        if !self.caches(key) {
            return self.inner.get(key);
        }
        let generation = {
            let st = self.state.read().unwrap_or_else(|e| e.into_inner());
            if let Some((value, _)) = st.map.get(key) {
                self.hits.fetch_add(1, Ordering::Relaxed);
                return Ok(value.clone());
            }
            st.generation
        };
        let value = self.inner.get(key)?;
        self.misses.fetch_add(1, Ordering::Relaxed);
        // An absent key is not kept: the writer checks each new id it is about to write, and
        // keeping those answers would only push out what readers come back for.
        if value.is_some() {
            let mut st = self.write();
            if st.generation == generation && !st.map.contains_key(key) {
                st.insert(key, value.clone(), self.budget_bytes);
            }
        }
        Ok(value)
    }

    fn scan(&self, from: &[u8], to: &[u8], visit: Visit<'_>) -> Result<(), StoreError> {
        self.inner.scan(from, to, visit)
    }

    fn last(&self, from: &[u8], to: &[u8]) -> Result<Option<Pair>, StoreError> {
        self.inner.last(from, to)
    }

    fn apply(&self, batch: &Batch) -> Result<(), StoreError> {
        let applied = self.inner.apply(batch);
        if self.budget_bytes == 0 {
            return applied;
        }
        let mut st = self.write();
        st.generation += 1;
        match &applied {
            Ok(()) => {
                for (key, value) in batch.writes.iter().filter(|(key, _)| (self.cacheable)(key)) {
                    st.insert(key, value.clone(), self.budget_bytes);
                }
            }
            Err(_) => st.clear(),
        }
        applied
    }

    fn flush(&self, durability: Durability) -> Result<(), StoreError> {
        self.inner.flush(durability)
    }

    fn size_on_disk(&self) -> Result<u64, StoreError> {
        self.inner.size_on_disk()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicBool;
    use std::sync::OnceLock;

    use super::*;
    use crate::store::{scan_vec, FailingStore, MemStore};

    fn batch(writes: &[(&[u8], Option<&[u8]>)]) -> Batch {
        Batch { writes: writes.iter().map(|(k, v)| (k.to_vec(), v.map(<[u8]>::to_vec))).collect() }
    }

    fn all(_: &[u8]) -> bool {
        true
    }

    #[test]
    fn reads_see_every_applied_batch_and_repeat_reads_are_hits() {
        let mem = MemStore::new();
        let cached = CachedStore::new(Arc::new(mem.clone()), 1 << 20, all);
        cached.apply(&batch(&[(b"a", Some(b"1")), (b"b", Some(b"2"))])).unwrap();
        assert_eq!(cached.get(b"a").unwrap(), Some(b"1".to_vec()));
        cached.apply(&batch(&[(b"a", Some(b"3")), (b"b", None)])).unwrap();
        assert_eq!(cached.get(b"a").unwrap(), Some(b"3".to_vec()));
        assert_eq!(cached.get(b"b").unwrap(), None);
        assert_eq!(cached.stats().misses, 0, "written keys are served from the cache");
        // A key nobody wrote through the cache is read from the store once, then kept.
        mem.with_map(|m| m.insert(b"c".to_vec(), b"9".to_vec()));
        assert_eq!(cached.get(b"c").unwrap(), Some(b"9".to_vec()));
        assert_eq!(cached.get(b"c").unwrap(), Some(b"9".to_vec()));
        let stats = cached.stats();
        assert_eq!((stats.hits, stats.misses), (4, 1));
        // A key the store does not have is not kept.
        assert_eq!(cached.get(b"d").unwrap(), None);
        assert_eq!(cached.get(b"d").unwrap(), None);
        let stats = cached.stats();
        assert_eq!((stats.misses, stats.entries), (3, 3));
        // Scans go to the store, which holds what was applied.
        assert_eq!(scan_vec(&cached, b"a", b"z", 10).unwrap().len(), 2);
    }

    #[test]
    fn only_cacheable_keys_are_kept() {
        fn only_x(key: &[u8]) -> bool {
            key.first() == Some(&b'x')
        }
        let cached = CachedStore::new(Arc::new(MemStore::new()), 1 << 20, only_x);
        cached.apply(&batch(&[(b"x1", Some(b"1")), (b"y1", Some(b"2"))])).unwrap();
        assert_eq!(cached.stats().entries, 1);
        assert_eq!(cached.get(b"y1").unwrap(), Some(b"2".to_vec()), "read from the store");
        assert_eq!(cached.get(b"x1").unwrap(), Some(b"1".to_vec()));
        let stats = cached.stats();
        assert_eq!((stats.hits, stats.misses, stats.entries), (1, 0, 1));
    }

    #[test]
    fn the_budget_bounds_the_cache_and_evicted_keys_are_read_again() {
        let budget = 10 * (1 + 100 + CACHE_ENTRY_OVERHEAD_BYTES);
        let cached = CachedStore::new(Arc::new(MemStore::new()), budget, all);
        for round in 0..5u8 {
            for i in 0..100u8 {
                cached.apply(&batch(&[(&[i], Some(&[round; 100]))])).unwrap();
            }
        }
        let stats = cached.stats();
        assert!(stats.bytes as usize <= budget, "{stats:?}");
        assert_eq!(stats.entries, 10, "{stats:?}");
        for i in 0..100u8 {
            assert_eq!(cached.get(&[i]).unwrap(), Some(vec![4; 100]), "key {i}");
        }
        // A value larger than the whole budget is never kept, and does not leave an older one.
        let small = CachedStore::new(Arc::new(MemStore::new()), 200, all);
        small.apply(&batch(&[(b"k", Some(b"old"))])).unwrap();
        small.apply(&batch(&[(b"k", Some(&[7; 500]))])).unwrap();
        assert_eq!(small.get(b"k").unwrap(), Some(vec![7; 500]));
        assert_eq!(small.stats().entries, 0);
    }

    #[test]
    fn a_failed_apply_empties_the_cache() {
        let failing = FailingStore::new(MemStore::new(), 1);
        let cached = CachedStore::new(Arc::new(failing), 1 << 20, all);
        cached.apply(&batch(&[(b"a", Some(b"1"))])).unwrap();
        assert!(cached.apply(&batch(&[(b"a", Some(b"2"))])).is_err());
        assert_eq!(cached.stats().entries, 0);
        assert_eq!(cached.get(b"a").unwrap(), Some(b"1".to_vec()), "what the store holds");
    }

    /// A store whose next `get` runs a hook after reading: a batch applied in the middle of a read.
    struct Racing {
        inner: MemStore,
        hook: Box<dyn Fn() + Send + Sync>,
        armed: AtomicBool,
    }

    impl Store for Racing {
        fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
            let value = self.inner.get(key);
            if self.armed.swap(false, Ordering::SeqCst) {
                (self.hook)();
            }
            value
        }
        fn scan(&self, from: &[u8], to: &[u8], visit: Visit<'_>) -> Result<(), StoreError> {
            self.inner.scan(from, to, visit)
        }
        fn last(&self, from: &[u8], to: &[u8]) -> Result<Option<Pair>, StoreError> {
            self.inner.last(from, to)
        }
        fn apply(&self, batch: &Batch) -> Result<(), StoreError> {
            self.inner.apply(batch)
        }
        fn flush(&self, durability: Durability) -> Result<(), StoreError> {
            self.inner.flush(durability)
        }
    }

    #[test]
    fn a_read_that_a_batch_overtook_is_not_kept() {
        fn only_k(key: &[u8]) -> bool {
            key == b"k"
        }
        let mem = MemStore::new();
        mem.with_map(|m| m.insert(b"k".to_vec(), b"old".to_vec()));
        let cell: Arc<OnceLock<Arc<CachedStore>>> = Arc::new(OnceLock::new());
        let hook_cell = cell.clone();
        let racing = Racing {
            inner: mem,
            // The read has the old value in hand when a batch (of another key: the cache does
            // not learn the new value of `k` from it) is applied through the cache, and the
            // store's `k` changes behind it.
            hook: Box::new(move || {
                let cached = hook_cell.get().unwrap();
                cached.apply(&batch(&[(b"other", Some(b"x"))])).unwrap();
                cached.inner().apply(&batch(&[(b"k", Some(b"new"))])).unwrap();
            }),
            armed: AtomicBool::new(true),
        };
        let cached = Arc::new(CachedStore::new(Arc::new(racing), 1 << 20, only_k));
        let _ = cell.set(cached.clone());
        assert_eq!(cached.get(b"k").unwrap(), Some(b"old".to_vec()), "the read returns what it read");
        assert_eq!(cached.get(b"k").unwrap(), Some(b"new".to_vec()), "but did not keep it");
    }
}
