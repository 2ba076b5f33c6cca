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
//!
//! Ascending keyspaces ([`CachedStore::with_ascending`]): for a keyspace whose new keys mostly
//! sort after the keys it holds (ids that begin with their creation time, such as UUID v7),
//! the cache keeps a *floor* and the set of every key the keyspace holds above it. A `get` of a
//! key above the floor that the set does not hold is answered "absent" without reading the
//! store: the writer checks every id it is about to create, and such a check would otherwise
//! descend sled's tree to find nothing.
//! - The floor is learned from the store (`last`) on the first `get` in that keyspace, with an
//!   empty set, and kept only if no batch was applied meanwhile, like a read. If the store
//!   refuses that seek, nothing is learned and the `get` reads the store.
//! - Each batch adds to the set every key above the floor that it puts, before the store
//!   applies it (so a key the store holds is never answered absent), and removes every key it
//!   deletes once the store has applied it. A floor learned while a batch is being applied is
//!   not kept.
//! - When the set holds more than [`RECENT_KEYS_MAX`] keys, the smallest leaves it and becomes
//!   the floor: what is at or below the floor is read from the store, so the set stays exact
//!   above it. A failed apply forgets floor and set.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock, RwLockWriteGuard};

use crate::store::{Durability, Pair, Store, StoreError, Visit, WriteBatch};

/// Bytes counted per cached entry on top of its key and value (map and queue bookkeeping).
pub const CACHE_ENTRY_OVERHEAD_BYTES: usize = 64;

/// Keys an ascending keyspace's set holds at most (see the module documentation): enough to
/// cover the ids of the last second or so under load, whose creation order and commit order
/// differ by up to a few batches.
pub const RECENT_KEYS_MAX: usize = 16_384;

/// Which keys a [`CachedStore`] keeps.
pub type Cacheable = fn(&[u8]) -> bool;

/// A store with a bounded read cache in front of `inner`. See the module documentation.
pub struct CachedStore {
    inner: Arc<dyn Store>,
    budget_bytes: usize,
    cacheable: Cacheable,
    /// First key bytes of the ascending keyspaces (see the module documentation).
    ascending: Vec<u8>,
    /// [`RECENT_KEYS_MAX`], smaller in tests.
    recent_max: usize,
    state: RwLock<State>,
    hits: AtomicU64,
    misses: AtomicU64,
    known_absent: AtomicU64,
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
    /// Ascending keyspace byte → its floor and the keys it holds above it. A keyspace not
    /// here has not been learned yet. (A few keyspaces: a `BTreeMap` finds one without hashing.)
    recent: BTreeMap<u8, Recent>,
    /// A batch is being applied to the store: its puts are in the sets already, and a floor
    /// learned now may miss them, so it is not kept.
    applying: bool,
}

/// What an ascending keyspace holds above a floor: exactly the keys in `keys`.
struct Recent {
    floor: Vec<u8>,
    keys: BTreeSet<Vec<u8>>,
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
    /// Gets answered "absent" by an ascending keyspace's set of recent keys, without a read.
    pub known_absent: u64,
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
        self.recent.clear();
    }

    /// Keeps the set of `key`'s keyspace, if it is learned, exact after a put or a delete.
    fn note_write(&mut self, key: &[u8], put: bool, recent_max: usize) {
        let Some(recent) = key.first().and_then(|ks| self.recent.get_mut(ks)) else { return };
        if !put {
            recent.keys.remove(key);
        } else if key > recent.floor.as_slice()
            // A new id above every key held (most puts: the ids are ascending) needs one search,
            // not two; one known already (a row written again) is not copied.
            && (recent.keys.last().is_none_or(|last| key > last.as_slice()) || !recent.keys.contains(key))
            && recent.keys.insert(key.to_vec())
            && recent.keys.len() > recent_max
        {
            if let Some(lowest) = recent.keys.pop_first() {
                recent.floor = lowest;
            }
        }
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
            ascending: Vec::new(),
            recent_max: RECENT_KEYS_MAX,
            state: RwLock::new(State::default()),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            known_absent: AtomicU64::new(0),
        }
    }

    /// The same store, knowing the recent keys of each keyspace in `keyspaces` (first key
    /// bytes) whose new keys mostly sort after the ones it holds. Independent of the byte budget.
    /// Keyspace `0xFF`, which has no upper bound to ask the store's `last` for, is ignored.
    pub fn with_ascending(mut self, keyspaces: &[u8]) -> CachedStore {
        self.ascending = keyspaces.iter().copied().filter(|&ks| ks != u8::MAX).collect();
        self
    }

    pub fn inner(&self) -> &Arc<dyn Store> {
        &self.inner
    }

    /// A number that moves with every batch applied through this cache; `None` while one is
    /// being applied. The same `Some` before and after a set of reads means they all saw one
    /// state of the store (every write goes through the cache: the log's writer owns it).
    pub fn read_epoch(&self) -> Option<u64> {
        let st = self.state.read().unwrap_or_else(|e| e.into_inner());
        (!st.applying).then_some(st.generation)
    }

    pub fn stats(&self) -> CacheStats {
        let st = self.state.read().unwrap_or_else(|e| e.into_inner());
        CacheStats {
            hits: self.hits.load(Ordering::Relaxed),
            misses: self.misses.load(Ordering::Relaxed),
            entries: st.map.len() as u64,
            bytes: st.bytes as u64,
            known_absent: self.known_absent.load(Ordering::Relaxed),
        }
    }

    fn write(&self) -> RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(|e| e.into_inner())
    }

    fn caches(&self, key: &[u8]) -> bool {
        self.budget_bytes > 0 && (self.cacheable)(key)
    }

    /// Whether the store certainly does not hold `key`: it is above its ascending keyspace's
    /// floor and not among the keys held above it. Learns the floor the first time it is needed.
    fn known_absent(&self, key: &[u8]) -> Result<bool, StoreError> {
        let Some(&ks) = key.first().filter(|ks| self.ascending.contains(ks)) else { return Ok(false) };
        let generation = {
            let st = self.state.read().unwrap_or_else(|e| e.into_inner());
            if let Some(recent) = st.recent.get(&ks) {
                return Ok(key > recent.floor.as_slice() && !recent.keys.contains(key));
            }
            st.generation
        };
        // A store that refuses the seek (sled does, after an IO error, while its gets still
        // answer) teaches no floor: the get reads the store. Failing the get instead would turn
        // a readable row into an error, and a reader that takes errors for absent into a 404.
        let Ok(last) = self.inner.last(&[ks], &[ks + 1]) else { return Ok(false) };
        let floor = last.map_or_else(|| vec![ks], |(k, _)| k);
        let absent = key > floor.as_slice();
        let mut st = self.write();
        if st.generation == generation && !st.applying {
            st.recent.insert(ks, Recent { floor, keys: BTreeSet::new() });
        }
        Ok(absent)
    }
}

impl Store for CachedStore {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        if self.known_absent(key)? {
            self.known_absent.fetch_add(1, Ordering::Relaxed);
            return Ok(None);
        }
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

    fn apply(&self, batch: &WriteBatch) -> Result<(), StoreError> {
        let tracking = !self.ascending.is_empty();
        {
            let mut st = self.write();
            st.generation += 1;
            st.applying = true;
            if tracking {
                // The batch's new keys join the sets before the store holds them: a key the
                // store holds is never answered absent, not even between this apply and the
                // lines below. (Until then a reader told "maybe" reads the store, finds nothing.)
                for (key, value) in &batch.writes {
                    if value.is_some() {
                        st.note_write(key, true, self.recent_max);
                    }
                }
            }
        }
        let applied = self.inner.apply(batch);
        let mut st = self.write();
        st.generation += 1;
        st.applying = false;
        match &applied {
            Ok(()) => {
                // Puts joined the sets before the apply (no set can have been learned since: a
                // floor learned while applying is not kept); deletes leave them now. Only a batch
                // that deletes a key of a set needs its puts noted again, in order, since it may
                // put that key again after deleting it.
                let deletes = batch
                    .writes
                    .iter()
                    .any(|(k, v)| v.is_none() && k.first().is_some_and(|ks| st.recent.contains_key(ks)));
                for (key, value) in &batch.writes {
                    if deletes {
                        st.note_write(key, value.is_some(), self.recent_max);
                    }
                    if self.caches(key) {
                        st.insert(key, value.clone(), self.budget_bytes);
                    }
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

    /// Empties the cache around the inner store's reopen: the reopened store may hold less
    /// than the cache saw applied (a batch that was never made durable is gone).
    fn reopen(&self) -> Result<(), StoreError> {
        {
            let mut st = self.write();
            st.generation += 1;
            st.applying = true;
            st.clear();
        }
        let reopened = self.inner.reopen();
        let mut st = self.write();
        st.generation += 1;
        st.applying = false;
        st.clear();
        reopened
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicBool;
    use std::sync::OnceLock;

    use super::*;
    use crate::store::{scan_vec, MemStore};
    use crate::testing::FailingStore;

    fn batch(writes: &[(&[u8], Option<&[u8]>)]) -> WriteBatch {
        WriteBatch { writes: writes.iter().map(|(k, v)| (k.to_vec(), v.map(<[u8]>::to_vec))).collect() }
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

    /// Where a [`Hooked`] store runs its hooks.
    #[derive(PartialEq, Eq)]
    enum At {
        Get,
        Last,
        Apply,
    }

    /// A store that runs `before` and `after` around its first `get`, `last` or `apply` (`at`),
    /// once: another thread's reads and writes in the middle of that operation.
    struct Hooked {
        inner: MemStore,
        at: At,
        before: Box<dyn Fn() + Send + Sync>,
        after: Box<dyn Fn() + Send + Sync>,
        armed: AtomicBool,
    }

    impl Hooked {
        fn new(inner: MemStore, at: At) -> Hooked {
            Hooked {
                inner,
                at,
                before: Box::new(|| {}),
                after: Box::new(|| {}),
                armed: AtomicBool::new(true),
            }
        }

        fn around<T>(&self, at: At, op: impl FnOnce() -> T) -> T {
            let armed = self.at == at && self.armed.swap(false, Ordering::SeqCst);
            if armed {
                (self.before)();
            }
            let out = op();
            if armed {
                (self.after)();
            }
            out
        }
    }

    impl Store for Hooked {
        fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
            self.around(At::Get, || self.inner.get(key))
        }
        fn scan(&self, from: &[u8], to: &[u8], visit: Visit<'_>) -> Result<(), StoreError> {
            self.inner.scan(from, to, visit)
        }
        fn last(&self, from: &[u8], to: &[u8]) -> Result<Option<Pair>, StoreError> {
            self.around(At::Last, || self.inner.last(from, to))
        }
        fn apply(&self, batch: &WriteBatch) -> Result<(), StoreError> {
            self.around(At::Apply, || self.inner.apply(batch))
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
        let mut racing = Hooked::new(mem, At::Get);
        // The read has the old value in hand when a batch (of another key: the cache does not
        // learn the new value of `k` from it) is applied through the cache, and the store's `k`
        // changes behind it.
        racing.after = Box::new(move || {
            let cached = hook_cell.get().unwrap();
            cached.apply(&batch(&[(b"other", Some(b"x"))])).unwrap();
            cached.inner().apply(&batch(&[(b"k", Some(b"new"))])).unwrap();
        });
        let cached = Arc::new(CachedStore::new(Arc::new(racing), 1 << 20, only_k));
        let _ = cell.set(cached.clone());
        assert_eq!(cached.get(b"k").unwrap(), Some(b"old".to_vec()), "the read returns what it read");
        assert_eq!(cached.get(b"k").unwrap(), Some(b"new".to_vec()), "but did not keep it");
    }

    /// A store that counts the reads that reach it.
    #[derive(Default)]
    struct Counting {
        inner: MemStore,
        gets: AtomicU64,
        lasts: AtomicU64,
    }

    impl Store for Counting {
        fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
            self.gets.fetch_add(1, Ordering::SeqCst);
            self.inner.get(key)
        }
        fn scan(&self, from: &[u8], to: &[u8], visit: Visit<'_>) -> Result<(), StoreError> {
            self.inner.scan(from, to, visit)
        }
        fn last(&self, from: &[u8], to: &[u8]) -> Result<Option<Pair>, StoreError> {
            self.lasts.fetch_add(1, Ordering::SeqCst);
            self.inner.last(from, to)
        }
        fn apply(&self, batch: &WriteBatch) -> Result<(), StoreError> {
            self.inner.apply(batch)
        }
        fn flush(&self, durability: Durability) -> Result<(), StoreError> {
            self.inner.flush(durability)
        }
    }

    fn none(_: &[u8]) -> bool {
        false
    }

    #[test]
    fn a_new_key_of_an_ascending_keyspace_is_absent_without_a_read() {
        let counting = Arc::new(Counting::default());
        counting.inner.with_map(|m| m.insert(vec![5, 10], b"held".to_vec()));
        // No value is cached (budget 0): only the recent keys save reads.
        let cached = CachedStore::new(counting.clone(), 0, none).with_ascending(&[5, 6]);
        assert_eq!(cached.get(&[5, 11]).unwrap(), None);
        assert_eq!(counting.lasts.load(Ordering::SeqCst), 1, "the floor is learned once");
        assert_eq!(counting.gets.load(Ordering::SeqCst), 0, "above the floor: no read");
        assert_eq!(cached.get(&[5, 10]).unwrap(), Some(b"held".to_vec()));
        assert_eq!(cached.get(&[5, 9]).unwrap(), None, "below the floor: read");
        assert_eq!(counting.gets.load(Ordering::SeqCst), 2);
        // Keys a batch puts above the floor are known, in any order.
        cached.apply(&batch(&[(&[5, 20], Some(b"new")), (&[5, 15], Some(b"mid"))])).unwrap();
        assert_eq!(cached.get(&[5, 20]).unwrap(), Some(b"new".to_vec()));
        assert_eq!(cached.get(&[5, 15]).unwrap(), Some(b"mid".to_vec()));
        assert_eq!(counting.gets.load(Ordering::SeqCst), 4, "held keys are read");
        assert_eq!(cached.get(&[5, 21]).unwrap(), None);
        assert_eq!(cached.get(&[5, 16]).unwrap(), None);
        assert_eq!(counting.gets.load(Ordering::SeqCst), 4, "keys between them are not");
        // An empty ascending keyspace: every key is above it, until a batch puts one.
        assert_eq!(cached.get(&[6, 1]).unwrap(), None);
        cached.apply(&batch(&[(&[6, 1], Some(b"x")), (&[5, 20], None)])).unwrap();
        assert_eq!(cached.get(&[6, 1]).unwrap(), Some(b"x".to_vec()));
        assert_eq!(cached.get(&[5, 20]).unwrap(), None, "a delete is seen");
        // Other keyspaces are read as before.
        assert_eq!(cached.get(&[7, 1]).unwrap(), None);
        assert_eq!(counting.lasts.load(Ordering::SeqCst), 2);
        assert_eq!(cached.stats().known_absent, 5);
        // A failed apply forgets what was learned: it is learned again.
        let failing =
            CachedStore::new(Arc::new(FailingStore::new(MemStore::new(), 1)), 0, none).with_ascending(&[5]);
        failing.apply(&batch(&[(&[5, 1], Some(b"1"))])).unwrap();
        assert_eq!(failing.get(&[5, 2]).unwrap(), None);
        assert!(failing.apply(&batch(&[(&[5, 3], Some(b"3"))])).is_err());
        assert!(failing.state.read().unwrap().recent.is_empty());
    }

    #[test]
    fn past_its_bound_the_set_gives_its_smallest_keys_back_to_the_store() {
        let counting = Arc::new(Counting::default());
        let mut cached = CachedStore::new(counting.clone(), 0, none).with_ascending(&[5]);
        cached.recent_max = 2;
        assert_eq!(cached.get(&[5, 0]).unwrap(), None, "learns an empty keyspace");
        cached.apply(&batch(&[(&[5, 3], Some(b"3")), (&[5, 1], Some(b"1")), (&[5, 2], Some(b"2"))])).unwrap();
        {
            let st = cached.state.read().unwrap();
            let recent = &st.recent[&5];
            assert_eq!(recent.floor, vec![5, 1]);
            assert_eq!(recent.keys.iter().cloned().collect::<Vec<_>>(), vec![vec![5, 2], vec![5, 3]]);
        }
        let gets = counting.gets.load(Ordering::SeqCst);
        assert_eq!(cached.get(&[5, 1]).unwrap(), Some(b"1".to_vec()), "at the floor: read");
        assert_eq!(cached.get(&[5, 0]).unwrap(), None, "below the floor: read");
        assert_eq!(counting.gets.load(Ordering::SeqCst), gets + 2);
        assert_eq!(cached.get(&[5, 4]).unwrap(), None, "above it and not held: no read");
        assert_eq!(counting.gets.load(Ordering::SeqCst), gets + 2);
    }

    #[test]
    fn the_read_epoch_is_none_during_an_apply_and_moves_with_each() {
        let cell: Arc<OnceLock<Arc<CachedStore>>> = Arc::new(OnceLock::new());
        let hook_cell = cell.clone();
        let during = Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen = during.clone();
        let mut store = Hooked::new(MemStore::new(), At::Apply);
        store.after = Box::new(move || seen.lock().unwrap().push(hook_cell.get().unwrap().read_epoch()));
        // No value cache and no ascending keyspace: the epoch moves all the same.
        let cached = Arc::new(CachedStore::new(Arc::new(store), 0, none));
        let _ = cell.set(cached.clone());
        let before = cached.read_epoch().expect("no apply running");
        cached.apply(&batch(&[(b"k", Some(b"v"))])).unwrap();
        assert_eq!(*during.lock().unwrap(), vec![None], "during the apply");
        let after = cached.read_epoch().expect("no apply running");
        assert_ne!(before, after);
        cached.get(b"k").unwrap();
        assert_eq!(cached.read_epoch(), Some(after), "reads do not move it");
    }

    #[test]
    fn a_floor_learned_while_a_batch_was_applied_is_not_kept() {
        let mem = MemStore::new();
        mem.with_map(|m| m.insert(vec![5, 1], b"a".to_vec()));
        let cell: Arc<OnceLock<Arc<CachedStore>>> = Arc::new(OnceLock::new());
        let hook_cell = cell.clone();
        // The store's `last` has answered [5, 1] when a batch putting [5, 9] is applied through
        // the cache: a floor of [5, 1] kept now, with no key above it, would hide [5, 9].
        let mut racing = Hooked::new(mem, At::Last);
        racing.after = Box::new(move || {
            let cached = hook_cell.get().unwrap();
            cached.apply(&batch(&[(&[5, 9], Some(b"b"))])).unwrap();
        });
        let cached = Arc::new(CachedStore::new(Arc::new(racing), 0, none).with_ascending(&[5]));
        let _ = cell.set(cached.clone());
        assert_eq!(cached.get(&[5, 5]).unwrap(), None, "the answer of its own moment");
        assert_eq!(cached.get(&[5, 9]).unwrap(), Some(b"b".to_vec()));
        assert_eq!(cached.stats().known_absent, 1, "only the first read");
    }

    #[test]
    fn a_key_the_store_holds_is_never_answered_absent_while_its_batch_is_applied() {
        for learned_before in [true, false] {
            let cell: Arc<OnceLock<Arc<CachedStore>>> = Arc::new(OnceLock::new());
            let hook_cell = cell.clone();
            let before_cell = cell.clone();
            let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
            let hook_seen = seen.clone();
            let mut store = Hooked::new(MemStore::new(), At::Apply);
            // A read just before the store applies may learn a floor below [5, 9]: it must not
            // be kept, or [5, 9] would read absent once the store holds it.
            store.before = Box::new(move || {
                assert_eq!(before_cell.get().unwrap().get(&[5, 2]).unwrap(), None);
            });
            // The store holds [5, 9] now; the cache has not been told.
            store.after = Box::new(move || {
                let cached = hook_cell.get().unwrap();
                // A read of another key may learn the floor now: it must not be kept.
                let other = cached.get(&[5, 3]).unwrap();
                let new = cached.get(&[5, 9]).unwrap();
                hook_seen.lock().unwrap().push((other, new));
            });
            let cached = Arc::new(CachedStore::new(Arc::new(store), 0, none).with_ascending(&[5]));
            let _ = cell.set(cached.clone());
            if learned_before {
                assert_eq!(cached.get(&[5, 1]).unwrap(), None);
            }
            cached.apply(&batch(&[(&[5, 9], Some(b"new"))])).unwrap();
            assert_eq!(
                *seen.lock().unwrap(),
                vec![(None, Some(b"new".to_vec()))],
                "learned before: {learned_before}"
            );
            assert_eq!(cached.get(&[5, 9]).unwrap(), Some(b"new".to_vec()));
            assert_eq!(cached.get(&[5, 10]).unwrap(), None);
        }
    }

    /// A store whose seeks fail and whose gets answer: sled after an IO error (a full disk).
    struct SeekFails(MemStore);

    impl Store for SeekFails {
        fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
            self.0.get(key)
        }
        fn scan(&self, from: &[u8], to: &[u8], visit: Visit<'_>) -> Result<(), StoreError> {
            self.0.scan(from, to, visit)
        }
        fn last(&self, _: &[u8], _: &[u8]) -> Result<Option<Pair>, StoreError> {
            Err(StoreError::Io("refused".into()))
        }
        fn apply(&self, batch: &WriteBatch) -> Result<(), StoreError> {
            self.0.apply(batch)
        }
        fn flush(&self, durability: Durability) -> Result<(), StoreError> {
            self.0.flush(durability)
        }
        fn size_on_disk(&self) -> Result<u64, StoreError> {
            self.0.size_on_disk()
        }
    }

    #[test]
    fn a_floor_the_store_cannot_seek_is_not_learned_and_gets_read_the_store() {
        let mem = MemStore::new();
        mem.apply(&batch(&[(&[5, 1], Some(b"one"))])).unwrap();
        for budget in [0, 1 << 20] {
            let cached = CachedStore::new(Arc::new(SeekFails(mem.clone())), budget, all).with_ascending(&[5]);
            assert_eq!(cached.get(&[5, 1]).unwrap(), Some(b"one".to_vec()), "budget {budget}");
            assert_eq!(cached.get(&[5, 2]).unwrap(), None);
            assert!(cached.state.read().unwrap().recent.is_empty());
            assert_eq!(cached.stats().known_absent, 0);
        }
    }

    proptest::proptest! {
        /// Through any sequence of batches and reads, the cache with ascending keyspaces answers
        /// every `get` as the store does.
        #[test]
        fn gets_agree_with_the_store(
            ops in proptest::collection::vec(
                (0u8..3, proptest::collection::vec((4u8..7, 0u8..16, proptest::bool::ANY), 1..4)),
                1..60,
            ),
            budget in proptest::sample::select(vec![0usize, 200, 1 << 20]),
            recent_max in 1usize..6,
        ) {
            let mem = MemStore::new();
            let mut cached = CachedStore::new(Arc::new(mem.clone()), budget, all).with_ascending(&[4, 5]);
            cached.recent_max = recent_max;
            for (op, keys) in ops {
                if op == 0 {
                    let writes: Vec<(Vec<u8>, Option<Vec<u8>>)> = keys
                        .iter()
                        .map(|&(ks, k, put)| (vec![ks, k], put.then(|| vec![k; 3])))
                        .collect();
                    cached.apply(&WriteBatch { writes }).unwrap();
                } else {
                    for (ks, k, _) in keys {
                        let key = [ks, k];
                        proptest::prop_assert_eq!(cached.get(&key).unwrap(), mem.get(&key).unwrap());
                    }
                }
            }
        }
    }
}
