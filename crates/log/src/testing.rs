//! Test doubles over any [`Store`]: a store that fails on purpose, one that loses what was not
//! flushed, one whose writes wait. Compiled for the crate's own tests and with the `testing`
//! feature, which the other crates enable in their dev-dependencies only.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::store::{Durability, MemStore, Pair, Store, StoreError, Visit, WriteBatch};

/// The reads of a test double: they go to `self.$field` as they are (the doubles change writes).
macro_rules! reads_from {
    ($field:ident) => {
        fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
            self.$field.get(key)
        }

        fn scan(&self, from: &[u8], to: &[u8], visit: Visit<'_>) -> Result<(), StoreError> {
            self.$field.scan(from, to, visit)
        }

        fn last(&self, from: &[u8], to: &[u8]) -> Result<Option<Pair>, StoreError> {
            self.$field.last(from, to)
        }
    };
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
    reads_from!(inner);

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
    reads_from!(memory);

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
    reads_from!(inner);

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
