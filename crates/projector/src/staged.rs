//! Index entries waiting to be folded into their chunks (`index.rs`), and the list reads that
//! see them before they are. A log batch stages them in its [`Tx`] (see
//! [`TxTables`](crate::TxTables)); a rebuild keeps a page's aside ([`Deferring`]). Either way,
//! [`StagedIndex`] is what lists them and merges them with what the chunks hold, so the
//! [`ReadTables`] trait knows nothing of staging.

use std::collections::{BTreeMap, BTreeSet};

use herald_log::{StoreError, Tx};

use crate::index::{self, is_chunked, IndexRange, Walk};
use crate::query::CorruptValue;
use crate::tables::{ReadTables, Tables};

/// The index entries (logical keys) added or removed and not yet folded into their chunks.
pub(crate) enum StagedIndex<'s> {
    /// Staged in a log batch under their logical keys: a put adds, a delete removes (keys that
    /// are never stored); [`fold_staged_entries`] folds them when the batch ends.
    Batch(&'s Tx<'s>),
    /// Kept aside by a [`Deferring`], which folds them on [`Deferring::fold`].
    Aside(&'s BTreeMap<Vec<u8>, bool>),
}

impl StagedIndex<'_> {
    /// The entries in `from..to`, added (`true`) or removed (`false`), ascending.
    fn entries(&self, from: &[u8], to: &[u8]) -> Vec<(Vec<u8>, bool)> {
        match self {
            StagedIndex::Batch(tx) => index::logical_ranges()
                .flat_map(|(lo, hi)| {
                    let (lo, hi) = (lo.as_slice().max(from).to_vec(), hi.as_slice().min(to).to_vec());
                    tx.staged(&lo, &hi)
                        .into_iter()
                        .map(|(k, v)| (k.to_vec(), v.is_some()))
                        .collect::<Vec<_>>()
                })
                .collect(),
            StagedIndex::Aside(pending) => {
                if from >= to {
                    return Vec::new();
                }
                pending.range(from.to_vec()..to.to_vec()).map(|(k, add)| (k.clone(), *add)).collect()
            }
        }
    }

    /// The entries of `range`: what the chunks (read through `chunks`) hold, with these added
    /// and removed.
    pub(crate) fn scan(
        &self,
        chunks: &(impl ReadTables + ?Sized),
        range: &IndexRange<'_>,
    ) -> Result<Vec<Vec<u8>>, CorruptValue> {
        let IndexRange { logical_prefix, from, to, limit, walk } = *range;
        let unfolded: Vec<(Vec<u8>, bool)> =
            self.entries(from, to).into_iter().filter(|(k, _)| k.starts_with(logical_prefix)).collect();
        if unfolded.is_empty() {
            return index::scan_chunks(chunks, range);
        }
        // Each removal hides at most one stored entry: this many stored ones fill the page.
        let removed = unfolded.iter().filter(|(_, add)| !add).count();
        let wider = IndexRange { limit: limit.saturating_add(removed), ..*range };
        let stored = index::scan_chunks(chunks, &wider)?;
        // The stored page ends at `last`: entries beyond it in the walk are not known to be all
        // there is, unless the page was short.
        let complete = stored.len() < limit.saturating_add(removed);
        let last = stored.last().cloned();
        let mut all: BTreeSet<Vec<u8>> = stored.into_iter().collect();
        for (key, add) in unfolded {
            let known = complete
                || last.as_ref().is_some_and(|last| match walk {
                    Walk::Forward => key <= *last,
                    Walk::Backward => key >= *last,
                });
            if !add {
                all.remove(&key);
            } else if known {
                all.insert(key);
            }
        }
        Ok(match walk {
            Walk::Forward => all.into_iter().take(limit).collect(),
            Walk::Backward => all.into_iter().rev().take(limit).collect(),
        })
    }

    /// Stages the entry of logical key `key` in the log batch, added (`add`) or removed.
    pub(crate) fn stage(tx: &mut Tx<'_>, key: &[u8], add: bool) -> Result<(), CorruptValue> {
        if !is_chunked(key) {
            return Err(CorruptValue { key: key.to_vec() });
        }
        if add {
            tx.put(key.to_vec(), Vec::new());
        } else {
            tx.delete(key);
        }
        Ok(())
    }
}

/// Folds the index entries the batch staged (see [`TxTables`](crate::TxTables)) into their
/// chunks, each chunk read and written once: a machine's
/// [`Machine::finish`](herald_log::Machine::finish). A damaged chunk fails the batch.
pub fn fold_staged_entries(tx: &mut Tx<'_>) -> Result<(), StoreError> {
    for (from, to) in index::logical_ranges() {
        let ops = tx.take_staged(&from, &to);
        if !ops.is_empty() {
            index::fold_entries(
                &mut crate::TxTables(tx),
                ops.iter().map(|(k, v)| (k.as_slice(), v.is_some())),
            )
            .map_err(|c| StoreError::Corrupt(c.to_string()))?;
        }
    }
    Ok(())
}

/// Tables that keep the index entries added and removed (logical keys) aside, for
/// [`Deferring::fold`] to fold into their chunks together: each window read and written once
/// per fold, not once per entry. A rebuild folds a page of records at a time through one.
pub(crate) struct Deferring<T: Tables> {
    pub(crate) base: T,
    pending: BTreeMap<Vec<u8>, bool>,
}

impl<T: Tables> Deferring<T> {
    pub(crate) fn new(base: T) -> Deferring<T> {
        Deferring { base, pending: BTreeMap::new() }
    }

    pub(crate) fn fold(&mut self) -> Result<(), CorruptValue> {
        let pending = std::mem::take(&mut self.pending);
        index::fold_entries(&mut self.base, pending.iter().map(|(k, add)| (k.as_slice(), *add)))
    }
}

impl<T: Tables> ReadTables for Deferring<T> {
    fn get(&self, key: &[u8]) -> Option<Vec<u8>> {
        self.base.get(key)
    }

    fn scan(&self, from: &[u8], to: &[u8], limit: usize) -> Vec<(Vec<u8>, Vec<u8>)> {
        self.base.scan(from, to, limit)
    }

    fn scan_rev(&self, from: &[u8], to: &[u8], limit: usize) -> Vec<(Vec<u8>, Vec<u8>)> {
        self.base.scan_rev(from, to, limit)
    }

    fn scan_index(
        &self,
        chunks: &dyn ReadTables,
        range: &IndexRange<'_>,
    ) -> Result<Vec<Vec<u8>>, CorruptValue> {
        StagedIndex::Aside(&self.pending).scan(chunks, range)
    }
}

impl<T: Tables> Tables for Deferring<T> {
    fn put(&mut self, key: Vec<u8>, value: Vec<u8>) {
        self.base.put(key, value)
    }

    fn delete(&mut self, key: &[u8]) {
        self.base.delete(key)
    }

    fn add_entry(&mut self, key: &[u8]) -> Result<(), CorruptValue> {
        if !is_chunked(key) {
            return Err(CorruptValue { key: key.to_vec() });
        }
        self.pending.insert(key.to_vec(), true);
        Ok(())
    }

    fn remove_entry(&mut self, key: &[u8]) -> Result<(), CorruptValue> {
        if !is_chunked(key) {
            return Err(CorruptValue { key: key.to_vec() });
        }
        self.pending.insert(key.to_vec(), false);
        Ok(())
    }
}
