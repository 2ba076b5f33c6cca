//! Where the projection lives: ordered key-value tables behind a small trait, an in-memory
//! implementation, and [`TableBatch`], which stages changes over any tables.

use std::collections::BTreeMap;
use std::ops::Bound;

use crate::index::IndexRange;
use crate::query::CorruptValue;

/// Ordered key-value tables the projection lives in. Keys are full keys whose first byte is the
/// keyspace (the projector owns keyspace bytes 0x10..=0x7F; 0x00..=0x0F belong to the log).
///
/// Storage errors are the adapter's business: it captures them, so the trait is infallible.
pub trait Tables: ReadTables {
    fn put(&mut self, key: Vec<u8>, value: Vec<u8>);
    fn delete(&mut self, key: &[u8]);

    /// Adds the entry of a chunked index's logical key (see `index.rs`). By default it goes
    /// into its chunk at once; tables over a log batch stage it and fold the batch's entries
    /// into their chunks once, when the batch ends.
    fn add_entry(&mut self, key: &[u8]) -> Result<(), CorruptValue> {
        crate::index::insert_now(self, key)
    }

    /// Removes the entry of a chunked index's logical key (see [`Tables::add_entry`]).
    fn remove_entry(&mut self, key: &[u8]) -> Result<(), CorruptValue> {
        crate::index::remove_now(self, key)
    }

    /// Told of each delivery row the fold writes, once written, in order: every change of a
    /// delivery passes here (creation, attempt, retrigger, an endpoint's cascade). Tables
    /// ignore it; an observer over them (the engine's subscriptions) collects what it needs.
    fn delivery_written(&mut self, _delivery: &crate::model::Delivery) {}
}

/// The reading half of [`Tables`]: all the queries need.
pub trait ReadTables {
    fn get(&self, key: &[u8]) -> Option<Vec<u8>>;
    /// Up to `limit` pairs with from <= key < to, ascending.
    fn scan(&self, from: &[u8], to: &[u8], limit: usize) -> Vec<(Vec<u8>, Vec<u8>)>;
    /// Up to `limit` pairs with from <= key < to, descending (newest-first lists). The default
    /// reads the whole range forward; the stored and in-memory tables walk backwards instead.
    fn scan_rev(&self, from: &[u8], to: &[u8], limit: usize) -> Vec<(Vec<u8>, Vec<u8>)> {
        let mut all = self.scan(from, to, usize::MAX);
        all.reverse();
        all.truncate(limit);
        all
    }

    /// The entries (logical keys) of a chunked list index in `range` (see `index.rs`), its
    /// chunks read through `chunks`: these tables, or a batch over them. The default lists what
    /// the chunks hold; tables that keep entries back for a later fold into the chunks (a log
    /// batch's) merge those in (`staged.rs`). Tables over a store leave it as it is.
    #[doc(hidden)]
    fn scan_index(
        &self,
        chunks: &dyn ReadTables,
        range: &IndexRange<'_>,
    ) -> Result<Vec<Vec<u8>>, CorruptValue> {
        crate::index::scan_chunks(chunks, range)
    }
}

impl<T: ReadTables + ?Sized> ReadTables for &mut T {
    fn get(&self, key: &[u8]) -> Option<Vec<u8>> {
        (**self).get(key)
    }
    fn scan(&self, from: &[u8], to: &[u8], limit: usize) -> Vec<(Vec<u8>, Vec<u8>)> {
        (**self).scan(from, to, limit)
    }
    fn scan_rev(&self, from: &[u8], to: &[u8], limit: usize) -> Vec<(Vec<u8>, Vec<u8>)> {
        (**self).scan_rev(from, to, limit)
    }
    fn scan_index(
        &self,
        chunks: &dyn ReadTables,
        range: &IndexRange<'_>,
    ) -> Result<Vec<Vec<u8>>, CorruptValue> {
        (**self).scan_index(chunks, range)
    }
}

impl<T: Tables + ?Sized> Tables for &mut T {
    fn put(&mut self, key: Vec<u8>, value: Vec<u8>) {
        (**self).put(key, value)
    }
    fn delete(&mut self, key: &[u8]) {
        (**self).delete(key)
    }
    fn add_entry(&mut self, key: &[u8]) -> Result<(), CorruptValue> {
        (**self).add_entry(key)
    }
    fn remove_entry(&mut self, key: &[u8]) -> Result<(), CorruptValue> {
        (**self).remove_entry(key)
    }
    fn delivery_written(&mut self, delivery: &crate::model::Delivery) {
        (**self).delivery_written(delivery)
    }
}

/// Tables in memory: for tests, and for comparing two projections byte for byte.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MemTables {
    map: BTreeMap<Vec<u8>, Vec<u8>>,
}

impl MemTables {
    pub fn new() -> Self {
        Self::default()
    }

    /// Every pair, ascending by key.
    pub fn iter(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        self.map.iter().map(|(k, v)| (k.as_slice(), v.as_slice()))
    }

    /// Every pair, ascending by key, copied: two equal dumps are two byte-identical projections.
    pub fn dump(&self) -> Vec<(Vec<u8>, Vec<u8>)> {
        self.map.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
    }

    /// Tables holding exactly `pairs` (a [`dump`](Self::dump) read back).
    pub fn from_pairs(pairs: impl IntoIterator<Item = (Vec<u8>, Vec<u8>)>) -> Self {
        MemTables { map: pairs.into_iter().collect() }
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

impl ReadTables for MemTables {
    fn get(&self, key: &[u8]) -> Option<Vec<u8>> {
        self.map.get(key).cloned()
    }

    fn scan(&self, from: &[u8], to: &[u8], limit: usize) -> Vec<(Vec<u8>, Vec<u8>)> {
        if from >= to {
            return Vec::new();
        }
        self.map
            .range::<[u8], _>((Bound::Included(from), Bound::Excluded(to)))
            .take(limit)
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    fn scan_rev(&self, from: &[u8], to: &[u8], limit: usize) -> Vec<(Vec<u8>, Vec<u8>)> {
        if from >= to {
            return Vec::new();
        }
        self.map
            .range::<[u8], _>((Bound::Included(from), Bound::Excluded(to)))
            .rev()
            .take(limit)
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }
}

impl Tables for MemTables {
    fn put(&mut self, key: Vec<u8>, value: Vec<u8>) {
        self.map.insert(key, value);
    }

    fn delete(&mut self, key: &[u8]) {
        self.map.remove(key);
    }
}

/// Changes staged over some tables: reads see them, the tables do not until [`commit`](Self::commit).
///
/// [`apply`](crate::apply) stages each event's changes in one, so a rejected event leaves the
/// tables as they were. An adapter can also stage a whole batch of events in one and write it in
/// a single transaction.
#[derive(Debug)]
pub struct TableBatch<'a, T: Tables + ?Sized> {
    base: &'a mut T,
    /// `None`: deleted.
    changes: BTreeMap<Vec<u8>, Option<Vec<u8>>>,
}

impl<'a, T: Tables + ?Sized> TableBatch<'a, T> {
    pub fn new(base: &'a mut T) -> Self {
        TableBatch { base, changes: BTreeMap::new() }
    }

    /// How many keys the batch changes.
    pub fn len(&self) -> usize {
        self.changes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.changes.is_empty()
    }

    /// Writes the staged changes to the tables, in key order.
    pub fn commit(self) {
        for (key, change) in self.changes {
            match change {
                Some(value) => self.base.put(key, value),
                None => self.base.delete(&key),
            }
        }
    }
}

impl<T: Tables + ?Sized> ReadTables for TableBatch<'_, T> {
    fn get(&self, key: &[u8]) -> Option<Vec<u8>> {
        match self.changes.get(key) {
            Some(change) => change.clone(),
            None => self.base.get(key),
        }
    }

    fn scan(&self, from: &[u8], to: &[u8], limit: usize) -> Vec<(Vec<u8>, Vec<u8>)> {
        if from >= to || limit == 0 {
            return Vec::new();
        }
        let staged: Vec<(&Vec<u8>, &Option<Vec<u8>>)> =
            self.changes.range::<[u8], _>((Bound::Included(from), Bound::Excluded(to))).collect();
        // Each staged key hides at most one base pair, so this many base pairs are enough to
        // fill the page when the range holds that many.
        let base = self.base.scan(from, to, limit.saturating_add(staged.len()));
        herald_log::merge_staged(base, staged, limit)
    }

    /// The base's entries waiting to be folded, over the chunks as this batch has them.
    fn scan_index(
        &self,
        chunks: &dyn ReadTables,
        range: &IndexRange<'_>,
    ) -> Result<Vec<Vec<u8>>, CorruptValue> {
        self.base.scan_index(chunks, range)
    }
}

impl<T: Tables + ?Sized> Tables for TableBatch<'_, T> {
    fn put(&mut self, key: Vec<u8>, value: Vec<u8>) {
        self.changes.insert(key, Some(value));
    }

    fn delete(&mut self, key: &[u8]) {
        self.changes.insert(key.to_vec(), None);
    }

    // A batch puts entries into its chunks at once. Over tables that defer entries, an entry
    // the base still holds unfolded would be folded after this, out of order: not done (no
    // machine both stages entries and applies events through a batch).
    fn add_entry(&mut self, key: &[u8]) -> Result<(), CorruptValue> {
        crate::index::insert_now(self, key)
    }

    fn remove_entry(&mut self, key: &[u8]) -> Result<(), CorruptValue> {
        crate::index::remove_now(self, key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn pairs(t: &impl Tables) -> Vec<(Vec<u8>, Vec<u8>)> {
        t.scan(&[], &[0xff; 4], usize::MAX)
    }

    #[test]
    fn batch_reads_its_own_changes_and_commits_them() {
        let mut base = MemTables::from_pairs([(vec![1], vec![10]), (vec![2], vec![20]), (vec![3], vec![30])]);
        let mut batch = TableBatch::new(&mut base);
        batch.delete(&[2]);
        batch.put(vec![4], vec![40]);
        batch.put(vec![1], vec![11]);
        assert_eq!(batch.get(&[2]), None);
        assert_eq!(batch.get(&[1]), Some(vec![11]));
        assert_eq!(batch.scan(&[1], &[5], 2), vec![(vec![1], vec![11]), (vec![3], vec![30])]);
        batch.commit();
        assert_eq!(pairs(&base), vec![(vec![1], vec![11]), (vec![3], vec![30]), (vec![4], vec![40])]);
    }

    proptest! {
        /// A batch reads exactly as the tables it would commit to.
        #[test]
        fn batch_scan_matches_committed_tables(
            base in proptest::collection::btree_map(0u8..32, any::<u8>(), 0..24),
            ops in proptest::collection::vec((0u8..32, proptest::option::of(any::<u8>())), 0..24),
            from in 0u8..33,
            to in 0u8..33,
            limit in 0usize..40,
        ) {
            let base = MemTables::from_pairs(base.into_iter().map(|(k, v)| (vec![k], vec![v])));
            let mut expected = base.clone();
            for (k, v) in &ops {
                match v {
                    Some(v) => expected.put(vec![*k], vec![*v]),
                    None => expected.delete(&[*k]),
                }
            }
            let mut committed = base.clone();
            let mut batch = TableBatch::new(&mut committed);
            for (k, v) in &ops {
                match v {
                    Some(v) => batch.put(vec![*k], vec![*v]),
                    None => batch.delete(&[*k]),
                }
            }
            prop_assert_eq!(batch.scan(&[from], &[to], limit), expected.scan(&[from], &[to], limit));
            for k in 0..32u8 {
                prop_assert_eq!(batch.get(&[k]), expected.get(&[k]));
            }
            batch.commit();
            prop_assert_eq!(committed, expected);
        }
    }
}
