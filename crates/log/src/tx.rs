//! A batch being built by the writer thread: staged records and staged writes over the store.
//!
//! Reads see the store plus everything staged before them in the same batch, so one command's
//! validation sees the effects of the commands queued ahead of it. Each command runs inside a
//! savepoint: if it is rejected, everything it staged is undone and nothing of it is written.

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::ops::ControlFlow;

use crate::keyspace;
use crate::log::{parse_anchor, read_records, LogError};
use crate::record::{head_key, CorruptKind, CorruptRecord, Hash, Record};
use crate::store::{Pair, Store, StoreError, WriteBatch};

/// Merges pairs read from a store with staged writes over the same range (both ascending):
/// a staged put replaces or adds its key, a staged delete (`None`) hides it. Returns at most
/// `limit` pairs. Shared by [`Tx::scan`] and the projector's own staging overlay.
pub fn merge_staged<'s>(
    stored: Vec<Pair>,
    staged: impl IntoIterator<Item = (&'s Vec<u8>, &'s Option<Vec<u8>>)>,
    limit: usize,
) -> Vec<Pair> {
    let mut out = Vec::with_capacity(limit.min(stored.len()));
    let mut s = stored.into_iter().peekable();
    let mut o = staged.into_iter().peekable();
    while out.len() < limit {
        let take_staged = match (s.peek(), o.peek()) {
            (None, None) => break,
            (Some(_), None) => false,
            (None, Some(_)) => true,
            (Some((sk, _)), Some((ok, _))) => *ok <= sk,
        };
        if take_staged {
            let (k, v) = o.next().expect("peeked");
            if s.peek().is_some_and(|(sk, _)| sk == k) {
                s.next();
            }
            if let Some(v) = v {
                out.push((k.clone(), v.clone()));
            }
        } else if let Some(pair) = s.next() {
            out.push(pair);
        }
    }
    out
}

/// What the overlay held for a key: nothing (`None`), a put or a delete.
type Staged = Option<Option<Vec<u8>>>;

/// The staging area one batch of commands writes into. Created by the log's writer thread.
pub struct Tx<'a> {
    store: &'a dyn Store,
    overlay: BTreeMap<Vec<u8>, Option<Vec<u8>>>,
    /// Each key staged since the savepoint with what the overlay held for it before.
    undo: Vec<(Vec<u8>, Staged)>,
    records: Vec<Record>,
    /// For each record: whether it may be stored in a group (see [`Tx::append_grouped`]).
    grouped: Vec<bool>,
    next_seq: u64,
    last_hash: Hash,
    save: Option<(usize, u64, Hash)>,
    error: RefCell<Option<StoreError>>,
    /// Values read from the store during this batch. Nothing else writes the store while the
    /// batch is staged, and what the batch writes is in `overlay`, read first: so a stored value
    /// read once stays true for the batch. A batch of deliveries reads the same endpoint row
    /// for each of them.
    reads: RefCell<HashMap<Vec<u8>, Option<Vec<u8>>>>,
    /// Stored pairs of ranges scanned during this batch, for the same reason: range → the first
    /// pairs of it and whether they are all of it. A batch of publishes scans the same
    /// organisation's endpoints for each. Only scans of up to [`SCAN_CACHE_PAIRS_MAX`] are kept.
    scans: RefCell<ScanCache>,
    /// With a write-ahead whose messages are bounded: the most one command's records may take,
    /// encoded (see [`Tx::command_bytes_max`]).
    pub(crate) command_bytes_max: Option<usize>,
}

/// Range (from, to) → its first stored pairs, and whether they are all of it.
type ScanCache = HashMap<(Vec<u8>, Vec<u8>), (Vec<Pair>, bool)>;

/// The longest store scan a batch keeps (see `Tx::scans`): longer ones are read each time.
const SCAN_CACHE_PAIRS_MAX: usize = 1024;

impl<'a> Tx<'a> {
    pub(crate) fn new(store: &'a dyn Store, next_seq: u64, last_hash: Hash) -> Tx<'a> {
        Tx {
            store,
            overlay: BTreeMap::new(),
            undo: Vec::new(),
            records: Vec::new(),
            grouped: Vec::new(),
            next_seq,
            last_hash,
            save: None,
            error: RefCell::new(None),
            reads: RefCell::new(HashMap::new()),
            scans: RefCell::new(HashMap::new()),
            command_bytes_max: None,
        }
    }

    /// With a write-ahead ([`WriteAhead::command_bytes_max`](crate::WriteAhead::command_bytes_max)):
    /// the most one command's records may take, [`encoded_len`](crate::encoded_len) summed. A
    /// machine refuses a command whose records take more (its savepoint is rolled back, nothing
    /// of it written): a write-ahead message holds one whole batch. `None` without a bound.
    pub fn command_bytes_max(&self) -> Option<usize> {
        self.command_bytes_max
    }

    /// Stages a record with the next seq, chained to the one before; returns it. It is stored
    /// under its own key, so [`read_record`](crate::read_record) reads it with a `get`, which a
    /// [`CachedStore`](crate::CachedStore) can answer.
    pub fn append(&mut self, at_ms: u64, body: Vec<u8>) -> &Record {
        self.push_record(at_ms, body, false)
    }

    /// Like [`Tx::append`], but the record may be stored in a group with the grouped records
    /// staged right before and after it (see `record.rs`): one stored key for up to
    /// [`GROUP_RECORDS_MAX`](crate::record::GROUP_RECORDS_MAX) of them. Reading one back then
    /// takes a seek: for records that are written far more often than read one by one.
    pub fn append_grouped(&mut self, at_ms: u64, body: Vec<u8>) -> &Record {
        self.push_record(at_ms, body, true)
    }

    fn push_record(&mut self, at_ms: u64, body: Vec<u8>, grouped: bool) -> &Record {
        let rec = Record::seal(self.next_seq, at_ms, body, self.last_hash);
        self.next_seq += 1;
        self.last_hash = rec.hash;
        self.records.push(rec);
        self.grouped.push(grouped);
        self.records.last().expect("just pushed")
    }

    /// The seq the next appended record will get.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Reads a key as the batch so far would leave it. A store error fails the whole batch
    /// (see [`Tx::error`]) and reads as absent meanwhile.
    pub fn get(&self, key: &[u8]) -> Option<Vec<u8>> {
        if let Some(v) = self.overlay.get(key) {
            return v.clone();
        }
        if let Some(v) = self.reads.borrow().get(key) {
            return v.clone();
        }
        match self.store.get(key) {
            Ok(v) => {
                self.reads.borrow_mut().insert(key.to_vec(), v.clone());
                v
            }
            Err(e) => {
                self.error.borrow_mut().get_or_insert(e);
                None
            }
        }
    }

    /// Up to `limit` pairs with `from <= key < to`, as the batch so far would leave them.
    pub fn scan(&self, from: &[u8], to: &[u8], limit: usize) -> Vec<(Vec<u8>, Vec<u8>)> {
        if from >= to || limit == 0 {
            return Vec::new();
        }
        let staged: Vec<(&Vec<u8>, &Option<Vec<u8>>)> =
            self.overlay.range(from.to_vec()..to.to_vec()).collect();
        // Each staged key can hide at most one stored pair, so this many stored pairs suffice.
        let want = limit.saturating_add(staged.len());
        let range = (from.to_vec(), to.to_vec());
        let cached = self.scans.borrow().get(&range).and_then(|(pairs, complete)| {
            (*complete || pairs.len() >= want).then(|| pairs[..want.min(pairs.len())].to_vec())
        });
        if let Some(stored) = cached {
            return merge_staged(stored, staged, limit);
        }
        let mut stored: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
        let res = self.store.scan(from, to, &mut |k, v| {
            stored.push((k.to_vec(), v.to_vec()));
            if stored.len() >= want {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        });
        match res {
            Err(e) => {
                self.error.borrow_mut().get_or_insert(e);
            }
            Ok(()) if stored.len() <= SCAN_CACHE_PAIRS_MAX => {
                let complete = stored.len() < want;
                self.scans.borrow_mut().insert(range, (stored.clone(), complete));
            }
            Ok(()) => {}
        }
        merge_staged(stored, staged, limit)
    }

    pub fn put(&mut self, key: Vec<u8>, value: Vec<u8>) {
        self.stage(key, Some(value));
    }

    pub fn delete(&mut self, key: &[u8]) {
        self.stage(key.to_vec(), None);
    }

    /// The writes staged in `from..to`, ascending: a put's value, or `None` for a delete.
    pub fn staged(&self, from: &[u8], to: &[u8]) -> Vec<(&[u8], Option<&[u8]>)> {
        if from >= to {
            return Vec::new();
        }
        self.overlay.range(from.to_vec()..to.to_vec()).map(|(k, v)| (k.as_slice(), v.as_deref())).collect()
    }

    /// Removes the writes staged in `from..to` and returns them, ascending: for a machine that
    /// stages work in keys it never stores and turns it into other writes (see
    /// [`Machine::finish`](crate::Machine::finish)). Undone by a rollback like any write.
    pub fn take_staged(&mut self, from: &[u8], to: &[u8]) -> Vec<(Vec<u8>, Option<Vec<u8>>)> {
        if from >= to {
            return Vec::new();
        }
        let keys: Vec<Vec<u8>> =
            self.overlay.range(from.to_vec()..to.to_vec()).map(|(k, _)| k.clone()).collect();
        let mut taken = Vec::with_capacity(keys.len());
        for key in keys {
            if let Some(value) = self.overlay.remove(&key) {
                if self.save.is_some() {
                    self.undo.push((key.clone(), Some(value.clone())));
                }
                taken.push((key, value));
            }
        }
        taken
    }

    fn stage(&mut self, key: Vec<u8>, value: Option<Vec<u8>>) {
        let prev = self.overlay.insert(key.clone(), value);
        if self.save.is_some() {
            self.undo.push((key, prev));
        }
    }

    /// Stages the write-ahead position to store with this batch (see
    /// [`WriteAhead`](crate::WriteAhead)): for a machine that applies batches another writer
    /// wrote ahead (a follower catching up), which the log's own writer did not hand to one.
    pub fn set_write_ahead_position(&mut self, position: u64) {
        self.put(keyspace::META_WRITE_AHEAD.to_vec(), position.to_be_bytes().to_vec());
    }

    /// The store under this batch (without what the batch staged).
    pub fn store(&self) -> &'a dyn Store {
        self.store
    }

    /// The anchor in force for this batch: the kept log starts after this seq and hash.
    pub fn anchor(&self) -> Result<(u64, Hash), LogError> {
        parse_anchor(self.get(keyspace::META_ANCHOR))
    }

    /// Drops the stored records after the anchor up to and including `through_seq`, and makes
    /// that record's hash the new anchor: the kept records still chain to it, so `verify` proves
    /// them. Staged like any write: it commits with the batch or not at all. Only records already
    /// in the store can be cut, never ones staged in this batch. Returns the new anchor.
    pub fn cut_through(&mut self, through_seq: u64) -> Result<(u64, Hash), LogError> {
        let (anchor_seq, _) = self.anchor()?;
        let first_staged = self.records.first().map_or(self.next_seq, |r| r.seq);
        if through_seq <= anchor_seq || through_seq >= first_staged {
            return Err(LogError::Cut { through_seq, anchor_seq, next_seq: first_staged });
        }
        let last = read_records(self.store, through_seq, 1)?
            .pop()
            .filter(|r| r.seq == through_seq)
            .ok_or(CorruptRecord { seq: through_seq, kind: CorruptKind::Truncated })?;
        let mut doomed = Vec::new();
        let mut straddling = None;
        self.store.scan(&head_key(anchor_seq + 1), &head_key(through_seq + 1), &mut |k, v| {
            doomed.push(k.to_vec());
            if k.len() == 9 && crate::record::is_group(v) {
                let first = u64::from_be_bytes(k[1..9].try_into().expect("9 bytes"));
                if crate::record::group_span(first, v).is_some_and(|(_, last)| last > through_seq) {
                    straddling = Some((k.to_vec(), v.to_vec()));
                }
            }
            ControlFlow::Continue(())
        })?;
        for key in doomed {
            self.stage(key, None);
        }
        // A group that goes on past the cut keeps its later records, stored anew from the first.
        if let Some((key, value)) = straddling {
            let mut records = Vec::new();
            crate::record::Assembler::new(None).push_all(&key, &value, &mut records)?;
            records.retain(|r| r.seq > through_seq);
            if records.len() >= 2 {
                let (k, v) = crate::record::group_kv(&records);
                self.stage(k, Some(v));
            } else {
                for r in &records {
                    for (k, v) in r.to_kv() {
                        self.stage(k, Some(v));
                    }
                }
            }
        }
        let mut anchor = Vec::with_capacity(40);
        anchor.extend_from_slice(&through_seq.to_be_bytes());
        anchor.extend_from_slice(&last.hash);
        self.put(keyspace::META_ANCHOR.to_vec(), anchor);
        Ok((through_seq, last.hash))
    }

    /// The first store error met while reading, if any: the batch cannot commit.
    pub fn error(&self) -> Option<StoreError> {
        self.error.borrow().clone()
    }

    /// Records staged so far in this batch.
    pub fn records(&self) -> &[Record] {
        &self.records
    }

    pub(crate) fn savepoint(&mut self) {
        self.undo.clear();
        self.save = Some((self.records.len(), self.next_seq, self.last_hash));
    }

    pub(crate) fn release(&mut self) {
        self.undo.clear();
        self.save = None;
    }

    pub(crate) fn rollback(&mut self) {
        let Some((records, next_seq, last_hash)) = self.save.take() else {
            return;
        };
        while let Some((key, prev)) = self.undo.pop() {
            match prev {
                Some(v) => self.overlay.insert(key, v),
                None => self.overlay.remove(&key),
            };
        }
        self.records.truncate(records);
        self.grouped.truncate(records);
        self.next_seq = next_seq;
        self.last_hash = last_hash;
    }

    pub(crate) fn chain_state(&self) -> (u64, Hash) {
        (self.next_seq, self.last_hash)
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.records.is_empty() && self.overlay.is_empty()
    }

    /// The store writes: every record's pairs (runs of grouped records in groups), then the
    /// staged projection writes.
    pub(crate) fn into_parts(self) -> (WriteBatch, Vec<Record>) {
        let mut batch = WriteBatch::default();
        let mut i = 0;
        while i < self.records.len() {
            let run = self.grouped[i..].iter().take_while(|g| **g).count();
            let n = crate::record::group_len(&self.records[i..i + run]);
            if n >= 2 {
                let (k, v) = crate::record::group_kv(&self.records[i..i + n]);
                batch.put(k, v);
                i += n;
            } else {
                for (k, v) in self.records[i].to_kv() {
                    batch.put(k, v);
                }
                i += 1;
            }
        }
        for (k, v) in self.overlay {
            batch.writes.push((k, v));
        }
        (batch, self.records)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::MemStore;

    #[test]
    fn scan_merges_staged_writes_and_deletes_over_the_store() {
        let store = MemStore::new();
        let mut b = WriteBatch::default();
        for i in [1u8, 3, 5, 7] {
            b.put(vec![0x20, i], vec![i]);
        }
        store.apply(&b).unwrap();
        let mut tx = Tx::new(&store, 1, [0; 32]);
        tx.put(vec![0x20, 2], vec![2]);
        tx.delete(&[0x20, 3]);
        tx.put(vec![0x20, 5], vec![55]);
        let keys: Vec<_> = tx.scan(&[0x20], &[0x21], 10).into_iter().map(|(k, v)| (k[1], v[0])).collect();
        assert_eq!(keys, vec![(1, 1), (2, 2), (5, 55), (7, 7)]);
        let first_two: Vec<_> = tx.scan(&[0x20], &[0x21], 2).into_iter().map(|(k, _)| k[1]).collect();
        assert_eq!(first_two, vec![1, 2]);
        assert_eq!(tx.get(&[0x20, 3]), None);
        assert_eq!(tx.get(&[0x20, 7]), Some(vec![7]));
    }

    #[test]
    fn a_stored_value_is_read_from_the_store_once_per_batch_and_staged_writes_still_win() {
        let store = MemStore::new();
        let mut b = WriteBatch::default();
        b.put(vec![0x30, 1], vec![1]);
        store.apply(&b).unwrap();
        let mut tx = Tx::new(&store, 1, [0; 32]);
        assert_eq!(tx.get(&[0x30, 1]), Some(vec![1]));
        assert_eq!(tx.get(&[0x30, 2]), None);
        // Only the writer writes the store, and not while a batch is staged; this write behind
        // the batch's back shows that the second read comes from the batch, not the store.
        let mut behind = WriteBatch::default();
        behind.put(vec![0x30, 1], vec![7]);
        behind.put(vec![0x30, 2], vec![7]);
        store.apply(&behind).unwrap();
        assert_eq!(tx.get(&[0x30, 1]), Some(vec![1]));
        assert_eq!(tx.get(&[0x30, 2]), None);
        tx.put(vec![0x30, 1], vec![2]);
        tx.delete(&[0x30, 2]);
        assert_eq!(tx.get(&[0x30, 1]), Some(vec![2]));
        assert_eq!(tx.get(&[0x30, 2]), None);
        // The next batch reads the store afresh.
        let tx = Tx::new(&store, 1, [0; 32]);
        assert_eq!(tx.get(&[0x30, 1]), Some(vec![7]));
    }

    #[test]
    fn a_scanned_range_is_read_from_the_store_once_per_batch_unless_more_is_wanted() {
        let store = MemStore::new();
        let mut b = WriteBatch::default();
        for i in 0..5u8 {
            b.put(vec![0x31, i], vec![i]);
        }
        store.apply(&b).unwrap();
        let mut tx = Tx::new(&store, 1, [0; 32]);
        assert_eq!(tx.scan(&[0x31], &[0x32], 2).len(), 2);
        assert_eq!(tx.scan(&[0x31], &[0x32], 10).len(), 5, "more than was read: read again, all of it");
        // A write behind the batch's back (only the writer writes, and not during a batch) shows
        // where the next scans come from.
        let mut behind = WriteBatch::default();
        behind.put(vec![0x31, 9], vec![9]);
        behind.delete(vec![0x31, 0]);
        store.apply(&behind).unwrap();
        let keys = |pairs: Vec<Pair>| pairs.into_iter().map(|(k, _)| k[1]).collect::<Vec<_>>();
        assert_eq!(
            keys(tx.scan(&[0x31], &[0x32], 100)),
            vec![0, 1, 2, 3, 4],
            "the whole range was read once"
        );
        assert_eq!(keys(tx.scan(&[0x31], &[0x32], 3)), vec![0, 1, 2]);
        // Staged writes still win over what was read.
        tx.put(vec![0x31, 5], vec![5]);
        tx.delete(&[0x31, 1]);
        assert_eq!(keys(tx.scan(&[0x31], &[0x32], 100)), vec![0, 2, 3, 4, 5]);
        assert_eq!(keys(tx.scan(&[0x31], &[0x32], 2)), vec![0, 2]);
        // Another range, and the next batch, read the store.
        assert_eq!(keys(tx.scan(&[0x31, 1], &[0x32], 100)), vec![2, 3, 4, 5, 9]);
        let tx = Tx::new(&store, 1, [0; 32]);
        assert_eq!(keys(tx.scan(&[0x31], &[0x32], 100)), vec![1, 2, 3, 4, 9]);
    }

    #[test]
    fn rollback_undoes_only_the_current_command() {
        let store = MemStore::new();
        let mut tx = Tx::new(&store, 1, [0; 32]);
        tx.savepoint();
        tx.put(vec![0x20, 1], vec![1]);
        tx.append(10, b"a".to_vec());
        tx.release();
        tx.savepoint();
        tx.put(vec![0x20, 1], vec![9]);
        tx.put(vec![0x20, 2], vec![2]);
        tx.append(11, b"b".to_vec());
        tx.rollback();
        assert_eq!(tx.get(&[0x20, 1]), Some(vec![1]));
        assert_eq!(tx.get(&[0x20, 2]), None);
        assert_eq!(tx.records().len(), 1);
        assert_eq!(tx.next_seq(), 2);
        let rec = tx.append(12, b"c".to_vec()).clone();
        assert_eq!(rec.seq, 2);
        assert_eq!(rec.prev_hash, tx.records()[0].hash);
    }
}
