//! The storage seam: everything the log needs from a key-value store, and two stores for tests.
//!
//! Keys are whole byte strings; their first byte names a keyspace (see [`crate::keyspace`]).
//! A [`WriteBatch`] is applied atomically: after a crash either all of it is there or none of it.

use std::collections::BTreeMap;
use std::ops::ControlFlow;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// An error from the store underneath the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreError {
    /// The store's IO failed (disk full, permission, a sled error), with its message.
    Io(String),
    /// A [`FailingStore`] refused the operation on purpose.
    Injected { op: u64 },
    /// A stored value is damaged: the machine could not finish a batch over it (see
    /// [`Machine::finish`](crate::Machine::finish)). Names the value.
    Corrupt(String),
}

impl std::fmt::Display for StoreError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StoreError::Io(msg) => write!(f, "store IO error: {msg}"),
            StoreError::Injected { op } => write!(f, "injected store failure at operation {op}"),
            StoreError::Corrupt(what) => write!(f, "damaged stored value: {what}"),
        }
    }
}

impl std::error::Error for StoreError {}

/// Writes to apply in one atomic step, in order. `None` deletes the key.
#[derive(Debug, Default, Clone)]
pub struct WriteBatch {
    pub writes: Vec<(Vec<u8>, Option<Vec<u8>>)>,
}

impl WriteBatch {
    pub fn put(&mut self, key: Vec<u8>, value: Vec<u8>) {
        self.writes.push((key, Some(value)));
    }

    pub fn delete(&mut self, key: Vec<u8>) {
        self.writes.push((key, None));
    }

    pub fn len(&self) -> usize {
        self.writes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.writes.is_empty()
    }
}

/// How far an acknowledged write has gone towards the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Durability {
    /// The store's flush only: survives a crash of the process, not a power cut.
    Flush,
    /// The flush and an fsync of the store's files: survives a power cut.
    #[default]
    Sync,
}

/// A key and its value.
pub type Pair = (Vec<u8>, Vec<u8>);

/// A visitor over pairs in key order; return `ControlFlow::Break(())` to stop early.
pub type Visit<'a> = &'a mut dyn FnMut(&[u8], &[u8]) -> ControlFlow<()>;

/// What the log needs from a store. Implementations must make [`Store::apply`] atomic.
pub trait Store: Send + Sync + 'static {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError>;
    /// Visits pairs with `from <= key < to` in ascending order until the visitor breaks.
    fn scan(&self, from: &[u8], to: &[u8], visit: Visit<'_>) -> Result<(), StoreError>;
    /// The last pair with `from <= key < to`, if any.
    fn last(&self, from: &[u8], to: &[u8]) -> Result<Option<Pair>, StoreError>;
    /// Applies every write of the batch, all or nothing.
    fn apply(&self, batch: &WriteBatch) -> Result<(), StoreError>;
    /// Makes every applied batch durable to the given level.
    fn flush(&self, durability: Durability) -> Result<(), StoreError>;
    /// Bytes the store occupies on disk (0 for a store in memory).
    fn size_on_disk(&self) -> Result<u64, StoreError> {
        Ok(0)
    }
    /// Forgets what the store holds only in memory and reads its state back from what it wrote.
    /// After a failed write a store may hold part of a batch in memory, or refuse everything
    /// from then on (sled does both); after `reopen` it holds whole batches only, as after a
    /// restart, and takes writes again if its disk does. A store with nothing but memory does
    /// nothing.
    fn reopen(&self) -> Result<(), StoreError> {
        Ok(())
    }
}

/// Collects up to `limit` pairs of a range: a convenience over [`Store::scan`].
pub fn scan_vec(store: &dyn Store, from: &[u8], to: &[u8], limit: usize) -> Result<Vec<Pair>, StoreError> {
    let mut out = Vec::new();
    if limit == 0 {
        return Ok(out);
    }
    store.scan(from, to, &mut |k, v| {
        out.push((k.to_vec(), v.to_vec()));
        if out.len() >= limit {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        }
    })?;
    Ok(out)
}

/// A store in memory, for unit tests and for rebuilding a projection in scratch space.
#[derive(Debug, Default, Clone)]
pub struct MemStore {
    map: Arc<Mutex<BTreeMap<Vec<u8>, Vec<u8>>>>,
}

impl MemStore {
    pub fn new() -> Self {
        Self::default()
    }

    /// Runs `f` on the map itself: tests use it to damage records on purpose.
    pub fn with_map<R>(&self, f: impl FnOnce(&mut BTreeMap<Vec<u8>, Vec<u8>>) -> R) -> R {
        f(&mut self.map.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

impl Store for MemStore {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.with_map(|m| m.get(key).cloned()))
    }

    fn scan(&self, from: &[u8], to: &[u8], visit: Visit<'_>) -> Result<(), StoreError> {
        if from >= to {
            return Ok(());
        }
        let map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        for (k, v) in map.range(from.to_vec()..to.to_vec()) {
            if visit(k, v).is_break() {
                break;
            }
        }
        Ok(())
    }

    fn last(&self, from: &[u8], to: &[u8]) -> Result<Option<Pair>, StoreError> {
        if from >= to {
            return Ok(None);
        }
        Ok(self.with_map(|m| {
            m.range(from.to_vec()..to.to_vec()).next_back().map(|(k, v)| (k.clone(), v.clone()))
        }))
    }

    fn apply(&self, batch: &WriteBatch) -> Result<(), StoreError> {
        self.with_map(|m| {
            for (k, v) in &batch.writes {
                match v {
                    Some(v) => m.insert(k.clone(), v.clone()),
                    None => m.remove(k),
                };
            }
        });
        Ok(())
    }

    fn flush(&self, _durability: Durability) -> Result<(), StoreError> {
        Ok(())
    }
}

/// A store that works for `ok_ops` operations and then fails every one until
/// [`FailingStore::heal`] is called: a disk that fills up and later has space again.
/// Counted operations are `apply` and `flush` (the writes), so a test can fail a batch
/// at its apply or between its apply and its flush.
#[derive(Clone)]
pub struct FailingStore<S> {
    inner: S,
    ops: Arc<AtomicU64>,
    ok_ops: Arc<AtomicU64>,
    torn: bool,
}

impl<S: Store> FailingStore<S> {
    pub fn new(inner: S, ok_ops: u64) -> Self {
        FailingStore {
            inner,
            ops: Arc::new(AtomicU64::new(0)),
            ok_ops: Arc::new(AtomicU64::new(ok_ops)),
            torn: false,
        }
    }

    /// A failed `apply` first applies the first half of the batch to the inner store, as sled
    /// may leave a batch in memory when its disk fills: only a [`Store::reopen`] of a store
    /// with a disk under it ([`VolatileStore`]) takes it back.
    pub fn with_torn_writes(mut self) -> Self {
        self.torn = true;
        self
    }

    /// Lets every operation from now on succeed.
    pub fn heal(&self) {
        self.ok_ops.store(u64::MAX, Ordering::SeqCst);
    }

    /// Fails again after `more` further operations.
    pub fn fail_after(&self, more: u64) {
        let done = self.ops.load(Ordering::SeqCst);
        self.ok_ops.store(done.saturating_add(more), Ordering::SeqCst);
    }

    pub fn inner(&self) -> &S {
        &self.inner
    }

    fn tick(&self) -> Result<(), StoreError> {
        let op = self.ops.fetch_add(1, Ordering::SeqCst);
        if op >= self.ok_ops.load(Ordering::SeqCst) {
            Err(StoreError::Injected { op })
        } else {
            Ok(())
        }
    }
}

impl<S: Store> Store for FailingStore<S> {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        self.inner.get(key)
    }

    fn scan(&self, from: &[u8], to: &[u8], visit: Visit<'_>) -> Result<(), StoreError> {
        self.inner.scan(from, to, visit)
    }

    fn last(&self, from: &[u8], to: &[u8]) -> Result<Option<Pair>, StoreError> {
        self.inner.last(from, to)
    }

    fn apply(&self, batch: &WriteBatch) -> Result<(), StoreError> {
        if let Err(e) = self.tick() {
            if self.torn {
                let half = WriteBatch { writes: batch.writes[..batch.writes.len() / 2].to_vec() };
                self.inner.apply(&half)?;
            }
            return Err(e);
        }
        self.inner.apply(batch)
    }

    fn flush(&self, durability: Durability) -> Result<(), StoreError> {
        self.tick()?;
        self.inner.flush(durability)
    }

    fn reopen(&self) -> Result<(), StoreError> {
        self.inner.reopen()
    }
}

/// A store in memory over a disk in memory: `apply` changes what it holds, `flush` writes that
/// to its disk, and [`Store::reopen`] (or [`VolatileStore::crash`]) forgets whatever was not
/// flushed, as sled does when its process dies. For tests of what a failed write leaves.
#[derive(Debug, Default, Clone)]
pub struct VolatileStore {
    memory: MemStore,
    disk: MemStore,
}

impl VolatileStore {
    pub fn new() -> Self {
        Self::default()
    }

    /// Runs `f` on what the store holds now, flushed or not.
    pub fn with_memory<R>(&self, f: impl FnOnce(&mut BTreeMap<Vec<u8>, Vec<u8>>) -> R) -> R {
        self.memory.with_map(f)
    }

    /// What the disk holds: the store after a crash.
    pub fn crash(&self) {
        let disk = self.disk.with_map(|m| m.clone());
        self.memory.with_map(|m| *m = disk);
    }
}

impl Store for VolatileStore {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        self.memory.get(key)
    }

    fn scan(&self, from: &[u8], to: &[u8], visit: Visit<'_>) -> Result<(), StoreError> {
        self.memory.scan(from, to, visit)
    }

    fn last(&self, from: &[u8], to: &[u8]) -> Result<Option<Pair>, StoreError> {
        self.memory.last(from, to)
    }

    fn apply(&self, batch: &WriteBatch) -> Result<(), StoreError> {
        self.memory.apply(batch)
    }

    fn flush(&self, _durability: Durability) -> Result<(), StoreError> {
        let memory = self.memory.with_map(|m| m.clone());
        self.disk.with_map(|m| *m = memory);
        Ok(())
    }

    fn reopen(&self) -> Result<(), StoreError> {
        self.crash();
        Ok(())
    }
}

/// A store whose writes wait while it is held: a stalled disk, for tests. Reads and flushes go
/// through; an `apply` waits until [`HeldStore::hold`] lets go.
pub struct HeldStore<S> {
    inner: S,
    held: Mutex<bool>,
    released: std::sync::Condvar,
}

impl<S: Store> HeldStore<S> {
    pub fn new(inner: S) -> Self {
        HeldStore { inner, held: Mutex::new(false), released: std::sync::Condvar::new() }
    }

    /// Holds every write from now on (`true`), or lets the waiting ones go (`false`).
    pub fn hold(&self, held: bool) {
        *self.held.lock().unwrap_or_else(|e| e.into_inner()) = held;
        self.released.notify_all();
    }

    pub fn inner(&self) -> &S {
        &self.inner
    }
}

impl<S: Store> Store for HeldStore<S> {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        self.inner.get(key)
    }

    fn scan(&self, from: &[u8], to: &[u8], visit: Visit<'_>) -> Result<(), StoreError> {
        self.inner.scan(from, to, visit)
    }

    fn last(&self, from: &[u8], to: &[u8]) -> Result<Option<Pair>, StoreError> {
        self.inner.last(from, to)
    }

    fn apply(&self, batch: &WriteBatch) -> Result<(), StoreError> {
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        while *held {
            held = self.released.wait(held).unwrap_or_else(|e| e.into_inner());
        }
        drop(held);
        self.inner.apply(batch)
    }

    fn flush(&self, durability: Durability) -> Result<(), StoreError> {
        self.inner.flush(durability)
    }

    fn reopen(&self) -> Result<(), StoreError> {
        self.inner.reopen()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mem_store_scans_in_order_and_stops() {
        let s = MemStore::new();
        let mut b = WriteBatch::default();
        for i in 0u8..10 {
            b.put(vec![1, i], vec![i]);
        }
        b.put(vec![2, 0], vec![99]);
        s.apply(&b).unwrap();
        let got = scan_vec(&s, &[1], &[2], 3).unwrap();
        assert_eq!(got, vec![(vec![1, 0], vec![0]), (vec![1, 1], vec![1]), (vec![1, 2], vec![2])]);
        assert_eq!(s.last(&[1], &[2]).unwrap(), Some((vec![1, 9], vec![9])));
        assert_eq!(s.last(&[3], &[4]).unwrap(), None);
        assert!(scan_vec(&s, &[2], &[1], 10).unwrap().is_empty());
    }

    #[test]
    fn failing_store_fails_after_n_writes_and_heals() {
        let s = FailingStore::new(MemStore::new(), 1);
        let mut b = WriteBatch::default();
        b.put(vec![1], vec![1]);
        s.apply(&b).unwrap();
        assert_eq!(s.flush(Durability::Sync), Err(StoreError::Injected { op: 1 }));
        assert!(s.apply(&b).is_err());
        s.heal();
        s.apply(&b).unwrap();
        s.flush(Durability::Flush).unwrap();
        s.fail_after(0);
        assert!(s.apply(&b).is_err());
    }
}
