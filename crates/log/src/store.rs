//! The storage seam: everything the log needs from a key-value store, and the store in memory
//! (the test doubles over it are in `testing`, behind the `testing` feature).
//!
//! Keys are whole byte strings; their first byte names a keyspace (see [`crate::keyspace`]).
//! A [`WriteBatch`] is applied atomically: after a crash either all of it is there or none of it.

use std::collections::BTreeMap;
use std::ops::ControlFlow;
use std::sync::{Arc, Mutex};

/// An error from the store underneath the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreError {
    /// The store's IO failed (disk full, permission, a sled error), with its message.
    Io(String),
    /// Another process has the store open (holds its lock): the directory, as shown.
    InUse(String),
    /// A `FailingStore` (feature `testing`) refused the operation on purpose.
    Injected { op: u64 },
    /// A stored value is damaged: the machine could not finish a batch over it (see
    /// [`Machine::finish`](crate::Machine::finish)). Names the value.
    Corrupt(String),
}

impl std::fmt::Display for StoreError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StoreError::Io(msg) => write!(f, "store IO error: {msg}"),
            StoreError::InUse(dir) => {
                write!(f, "{dir} is in use by another herald process (it holds the store's lock)")
            }
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
}
