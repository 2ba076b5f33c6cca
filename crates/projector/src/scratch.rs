//! A projection on disk for an audit, in bounded memory: [`ScratchTables`] write a rebuild into
//! a scratch store of its own, and [`ProjectionPages`] read a projection (the stored one, or a
//! rebuilt one) back in key order, a page at a time, for `herald verify` to compare.
//!
//! The scratch store holds two areas, each under a prefix byte of its own: the rebuilt
//! projection, and the chunks a store not yet converted keeps as one key per index entry
//! (read as this version would store them, as [`stored_projection`](crate::stored_projection) does).

use std::cell::RefCell;
use std::collections::{BTreeMap, VecDeque};
use std::ops::Bound;
use std::sync::{mpsc, Arc};

use herald_log::{merge_staged, scan_vec, Pair, Store, StoreError, WriteBatch};

use crate::index::is_chunk_keyspace;
use crate::keys::{is_legacy, prefix_end, successor, KS_FIRST, KS_LAST, LEGACY_INDEX_KEYSPACES};
use crate::tables::{ReadTables, Tables};

/// The scratch area of a rebuilt projection.
const AREA_REBUILT: u8 = 0x01;
/// The scratch area of the chunks of a store's unconverted index entries.
const AREA_CHUNKS: u8 = 0x02;
/// What a buffered write costs beyond its key and value (the map's node, the two vectors).
const PENDING_ENTRY_OVERHEAD_BYTES: usize = 96;
/// The filter of keys written to the store takes this many bytes per byte of buffered writes.
const FILTER_BYTES_PER_PENDING_BYTE: usize = 4;
/// The least filter, for tiny buffers.
const FILTER_BYTES_LEAST: usize = 64;
/// Bits a key sets in the filter.
const FILTER_HASHES: usize = 6;

/// Buffered writes, by key: a put or (`None`) a delete.
type Overlay = BTreeMap<Vec<u8>, Option<Vec<u8>>>;

/// [`Tables`] in one area of a scratch store (empty when they start): writes are kept in memory
/// until they take `pending_bytes_max`, then applied to the store in one batch; reads see both.
/// A filter of the keys applied to the store (four bytes for each byte of buffered writes)
/// answers most reads of a key never written without reading the store: a rebuild asks for
/// every new row before it writes it. A store error is kept (the read that met it reads as
/// absent) and returned by [`ScratchTables::finish`].
///
/// [`ScratchTables::writing_beside`] hands each batch to a thread of its own, so that the fold
/// goes on while the store applies it: reads see the batch in flight over the store until the
/// next batch is handed over, which waits for it first.
pub struct ScratchTables<'s> {
    store: &'s dyn Store,
    area: u8,
    written: KeyFilter,
    pending: Overlay,
    pending_bytes: usize,
    pending_bytes_max: usize,
    /// The batch the writer thread is applying (empty when none is).
    in_flight: Arc<Overlay>,
    writer: Option<Writer>,
    error: RefCell<Option<StoreError>>,
}

/// The ends of the channels to a writer thread: batches to apply, one at a time, and whether
/// each was.
struct Writer {
    batches: mpsc::SyncSender<Arc<Overlay>>,
    applied: mpsc::Receiver<Result<(), StoreError>>,
}

impl<'s> ScratchTables<'s> {
    /// Tables for a rebuilt projection in `store` (empty, of this rebuild's own), buffering up
    /// to `pending_bytes_max` of writes in memory. Read it back with [`rebuilt_pages`].
    pub fn rebuilt(store: &'s dyn Store, pending_bytes_max: usize) -> ScratchTables<'s> {
        ScratchTables::in_area(store, AREA_REBUILT, pending_bytes_max)
    }

    fn in_area(store: &'s dyn Store, area: u8, pending_bytes_max: usize) -> ScratchTables<'s> {
        let filter_bytes = pending_bytes_max.saturating_mul(FILTER_BYTES_PER_PENDING_BYTE);
        ScratchTables {
            store,
            area,
            written: KeyFilter::new(filter_bytes.max(FILTER_BYTES_LEAST)),
            pending: BTreeMap::new(),
            pending_bytes: 0,
            pending_bytes_max,
            in_flight: Arc::default(),
            writer: None,
            error: RefCell::new(None),
        }
    }

    /// These tables with their batches applied by a thread of `scope` while the caller goes on
    /// (they cannot leave the scope, whose end waits for the thread). Memory then holds up to
    /// three copies of `pending_bytes_max` of writes (those buffered, those in flight, the batch
    /// the thread builds of them) and the store's own while it applies one.
    pub fn writing_beside<'scope>(
        mut self,
        scope: &'scope std::thread::Scope<'scope, '_>,
    ) -> ScratchTables<'scope>
    where
        's: 'scope,
    {
        let (batches, inbox) = mpsc::sync_channel::<Arc<Overlay>>(1);
        let (done, applied) = mpsc::sync_channel(1);
        let (store, area) = (self.store, self.area);
        scope.spawn(move || {
            for overlay in inbox {
                let pairs = overlay.iter().map(|(k, v)| (k.clone(), v.clone()));
                if done.send(store.apply(&batch_of(area, pairs))).is_err() {
                    break;
                }
            }
        });
        self.writer = Some(Writer { batches, applied });
        self
    }

    /// Applies the writes still in memory; the first store error any read or write met.
    pub fn finish(mut self) -> Result<(), StoreError> {
        self.flush();
        self.settle();
        self.error.into_inner().map_or(Ok(()), Err)
    }

    fn flush(&mut self) {
        if self.pending.is_empty() {
            return;
        }
        self.settle();
        let overlay = std::mem::take(&mut self.pending);
        self.pending_bytes = 0;
        for key in overlay.keys() {
            self.written.insert(key);
        }
        let Some(writer) = &self.writer else {
            let applied = self.store.apply(&batch_of(self.area, overlay.into_iter()));
            self.kept(applied);
            return;
        };
        let overlay = Arc::new(overlay);
        let sent = writer.batches.send(Arc::clone(&overlay));
        match sent {
            Ok(()) => self.in_flight = overlay,
            Err(_) => self.kept(Err::<(), _>(writer_gone())),
        }
    }

    /// Waits for the batch in flight, if one is, to be applied.
    fn settle(&mut self) {
        if self.in_flight.is_empty() {
            return;
        }
        self.in_flight = Arc::default();
        let applied = match &self.writer {
            Some(writer) => writer.applied.recv().unwrap_or_else(|_| Err(writer_gone())),
            None => Ok(()),
        };
        self.kept(applied);
    }

    fn stage(&mut self, key: Vec<u8>, value: Option<Vec<u8>>) {
        self.pending_bytes += key.len() + value.as_ref().map_or(0, Vec::len) + PENDING_ENTRY_OVERHEAD_BYTES;
        self.pending.insert(key, value);
        if self.pending_bytes >= self.pending_bytes_max {
            self.flush();
        }
    }

    fn stored_key(&self, key: &[u8]) -> Vec<u8> {
        [&[self.area], key].concat()
    }

    fn kept<T: Default>(&self, read: Result<T, StoreError>) -> T {
        read.unwrap_or_else(|e| {
            self.error.borrow_mut().get_or_insert(e);
            T::default()
        })
    }

    /// The buffered writes of `from..to` in key order: those in memory, and those in flight
    /// that a newer one of the same key does not hide.
    fn staged(&self, from: &[u8], to: &[u8]) -> Vec<(&Vec<u8>, &Option<Vec<u8>>)> {
        let range = (Bound::Included(from), Bound::Excluded(to));
        let mut newer = self.pending.range::<[u8], _>(range).peekable();
        let mut older = self.in_flight.range::<[u8], _>(range).peekable();
        let mut out = Vec::new();
        loop {
            let next = match (newer.peek(), older.peek()) {
                (None, None) => return out,
                (Some(_), None) => newer.next(),
                (None, Some(_)) => older.next(),
                (Some((n, _)), Some((o, _))) if n < o => newer.next(),
                (Some((n, _)), Some((o, _))) if o < n => older.next(),
                _ => {
                    older.next();
                    newer.next()
                }
            };
            out.extend(next);
        }
    }

    /// Up to `limit` stored pairs of `from..to`, descending, the area's byte stripped.
    fn stored_rev(&self, from: &[u8], to: &[u8], limit: usize) -> Vec<Pair> {
        let from = self.stored_key(from);
        let mut to = self.stored_key(to);
        let mut out = Vec::new();
        while out.len() < limit {
            match self.kept(self.store.last(&from, &to)) {
                Some((key, value)) => {
                    out.push((key[1..].to_vec(), value));
                    to = key;
                }
                None => break,
            }
        }
        out
    }
}

impl ReadTables for ScratchTables<'_> {
    fn get(&self, key: &[u8]) -> Option<Vec<u8>> {
        match self.pending.get(key).or_else(|| self.in_flight.get(key)) {
            Some(value) => value.clone(),
            None if !self.written.may_hold(key) => None,
            None => self.kept(self.store.get(&self.stored_key(key))),
        }
    }

    fn scan(&self, from: &[u8], to: &[u8], limit: usize) -> Vec<Pair> {
        if from >= to || limit == 0 {
            return Vec::new();
        }
        let staged = self.staged(from, to);
        // Each staged key hides at most one stored pair: this many stored pairs fill the page.
        let want = limit.saturating_add(staged.len());
        let stored = self.kept(scan_vec(self.store, &self.stored_key(from), &self.stored_key(to), want));
        let stored = stored.into_iter().map(|(k, v)| (k[1..].to_vec(), v)).collect();
        merge_staged(stored, staged, limit)
    }

    fn scan_rev(&self, from: &[u8], to: &[u8], limit: usize) -> Vec<Pair> {
        if from >= to || limit == 0 {
            return Vec::new();
        }
        let mut staged = self.staged(from, to);
        let want = limit.saturating_add(staged.len());
        let mut stored = self.stored_rev(from, to, want);
        // Read through: at least `limit` of these `want` stay visible, so a staged key below
        // the lowest of them cannot be among the last `limit`.
        if stored.len() == want {
            if let Some((floor, _)) = stored.last() {
                staged.retain(|(k, _)| k.as_slice() >= floor.as_slice());
            }
        }
        stored.reverse();
        let mut merged = merge_staged(stored, staged, usize::MAX);
        merged.reverse();
        merged.truncate(limit);
        merged
    }
}

impl Tables for ScratchTables<'_> {
    fn put(&mut self, key: Vec<u8>, value: Vec<u8>) {
        self.stage(key, Some(value));
    }

    fn delete(&mut self, key: &[u8]) {
        self.stage(key.to_vec(), None);
    }
}

/// A batch of `pairs` under the prefix byte of `area`.
fn batch_of(area: u8, pairs: impl Iterator<Item = (Vec<u8>, Option<Vec<u8>>)>) -> WriteBatch {
    let mut batch = WriteBatch::default();
    for (key, value) in pairs {
        let key = [&[area], key.as_slice()].concat();
        match value {
            Some(value) => batch.put(key, value),
            None => batch.delete(key),
        }
    }
    batch
}

fn writer_gone() -> StoreError {
    StoreError::Io("the scratch store's writer thread stopped before applying a batch".to_string())
}

/// A Bloom filter of keys: `may_hold` is true of every key inserted, and of few others.
struct KeyFilter {
    words: Vec<u64>,
}

impl KeyFilter {
    fn new(bytes: usize) -> KeyFilter {
        KeyFilter { words: vec![0; bytes.div_ceil(8)] }
    }

    /// The bits of `key`: double hashing of one 64-bit hash.
    fn bits(&self, key: &[u8]) -> [usize; FILTER_HASHES] {
        use std::hash::{Hash, Hasher};
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        key.hash(&mut hasher);
        let hash = hasher.finish();
        let (h1, h2) = (hash & 0xFFFF_FFFF, (hash >> 32) | 1);
        let bits = self.words.len() as u64 * 64;
        std::array::from_fn(|i| (h1.wrapping_add((i as u64).wrapping_mul(h2)) % bits) as usize)
    }

    fn insert(&mut self, key: &[u8]) {
        for bit in self.bits(key) {
            self.words[bit / 64] |= 1 << (bit % 64);
        }
    }

    fn may_hold(&self, key: &[u8]) -> bool {
        self.bits(key).iter().all(|bit| self.words[bit / 64] & (1 << (bit % 64)) != 0)
    }
}

/// Keys `next..to` of a store, read with the first `strip` bytes of each key taken off.
struct Run<'s> {
    store: &'s dyn Store,
    strip: usize,
    next: Vec<u8>,
    to: Vec<u8>,
}

/// A projection read in key order a page at a time, from one or more runs of keys (ascending,
/// disjoint) of one or two stores: memory holds one page, whatever the projection's size.
pub struct ProjectionPages<'s> {
    runs: VecDeque<Run<'s>>,
    page: std::vec::IntoIter<Pair>,
    page_pairs: usize,
    pairs: u64,
}

impl<'s> ProjectionPages<'s> {
    fn new(runs: VecDeque<Run<'s>>, page_pairs: usize) -> ProjectionPages<'s> {
        ProjectionPages { runs, page: Vec::new().into_iter(), page_pairs: page_pairs.max(1), pairs: 0 }
    }

    /// The next pair in key order, or `None` after the last.
    pub fn next_pair(&mut self) -> Result<Option<Pair>, StoreError> {
        loop {
            if let Some(pair) = self.page.next() {
                self.pairs += 1;
                return Ok(Some(pair));
            }
            let Some(run) = self.runs.front_mut() else { return Ok(None) };
            let page = scan_vec(run.store, &run.next, &run.to, self.page_pairs)?;
            let strip = run.strip;
            match page.last() {
                Some((last, _)) if page.len() == self.page_pairs => run.next = successor(last),
                _ => drop(self.runs.pop_front()),
            }
            let page: Vec<Pair> = match strip {
                0 => page,
                n => page.into_iter().map(|(k, v)| (k[n..].to_vec(), v)).collect(),
            };
            self.page = page.into_iter();
        }
    }

    /// The pairs handed out so far.
    pub fn pairs(&self) -> u64 {
        self.pairs
    }
}

/// A rebuilt projection that [`ScratchTables::rebuilt`] wrote into `scratch`, in key order.
pub fn rebuilt_pages(scratch: &dyn Store, page_pairs: usize) -> ProjectionPages<'_> {
    let run = Run { store: scratch, strip: 1, next: vec![AREA_REBUILT], to: vec![AREA_REBUILT + 1] };
    ProjectionPages::new(VecDeque::from([run]), page_pairs)
}

/// The projection stored in `live`, in key order, as [`stored_projection`](crate::stored_projection)
/// gives it: legacy keyspaces left out, and, in a store not yet converted, the chunks of its
/// one-key-per-entry indexes built into `scratch` (writes buffered up to `pending_bytes_max`)
/// and read in place of the chunk keyspaces.
pub fn stored_pages<'s>(
    live: &'s dyn Store,
    scratch: &'s dyn Store,
    pending_bytes_max: usize,
    page_pairs: usize,
) -> Result<ProjectionPages<'s>, StoreError> {
    let unchunked = chunk_unconverted_entries(live, scratch, pending_bytes_max)?;
    let mut runs = VecDeque::new();
    for ks in KS_FIRST..=KS_LAST {
        let (store, area): (&dyn Store, &[u8]) = match ks {
            ks if is_legacy(ks) => continue,
            ks if unchunked && is_chunk_keyspace(ks) => (scratch, &[AREA_CHUNKS]),
            _ => (live, &[]),
        };
        let next = [area, &[ks]].concat();
        // Keyspace bytes stop at KS_LAST (0x7F): a prefix of it always has an end.
        let to = prefix_end(&next).unwrap_or_default();
        runs.push_back(Run { store, strip: area.len(), next, to });
    }
    Ok(ProjectionPages::new(runs, page_pairs))
}

/// Folds the one-key-per-entry index entries `live` holds (a store an earlier version wrote)
/// into chunks in `scratch`'s chunk area. Whether there were any.
fn chunk_unconverted_entries(
    live: &dyn Store,
    scratch: &dyn Store,
    pending_bytes_max: usize,
) -> Result<bool, StoreError> {
    let mut chunks = ScratchTables::in_area(scratch, AREA_CHUNKS, pending_bytes_max);
    let mut any = false;
    for ks in LEGACY_INDEX_KEYSPACES {
        live.scan(&[ks], &[ks + 1], &mut |key, _| {
            any = true;
            // A key that is not an entry is kept as it is, to show up in the comparison.
            if chunks.add_entry(key).is_err() {
                chunks.put(key.to_vec(), Vec::new());
            }
            std::ops::ControlFlow::Continue(())
        })?;
    }
    chunks.finish()?;
    Ok(any)
}

/// The stored projection of `store` and a rebuild of its log, both through scratch storage
/// (a store in memory, writes flushed every few hundred bytes, read back a few pairs a page):
/// for tests to hold equal to [`stored_projection`](crate::stored_projection) and
/// [`rebuild`](crate::rebuild).
#[cfg(test)]
pub(crate) fn through_scratch(store: &dyn Store) -> (Vec<Pair>, Vec<Pair>) {
    let scratch = herald_log::MemStore::new();
    let mut tables = ScratchTables::rebuilt(&scratch, 512);
    crate::rebuild_into(store, &mut tables, 5, &mut |_| {}).expect("rebuild into scratch");
    tables.finish().expect("scratch writes");
    let drain = |mut pages: ProjectionPages<'_>| {
        let mut out = Vec::new();
        while let Some(pair) = pages.next_pair().expect("read a page") {
            out.push(pair);
        }
        assert_eq!(pages.pairs(), out.len() as u64);
        out
    };
    let stored = drain(stored_pages(store, &scratch, 512, 3).expect("stored pages"));
    (stored, drain(rebuilt_pages(&scratch, 3)))
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::tables::MemTables;

    #[test]
    fn a_large_key_filter_rejects_nearly_every_key_not_inserted() {
        let mut filter = KeyFilter::new(64 << 10);
        for n in 0u32..20_000 {
            filter.insert(&n.to_be_bytes());
        }
        let false_positives = (20_000u32..120_000).filter(|n| filter.may_hold(&n.to_be_bytes())).count();
        // 26 bits a key and 6 hashes: about 0.03 % in theory; 0.5 % would mean a broken hash.
        assert!(false_positives < 500, "{false_positives} of 100,000 keys never inserted");
    }

    proptest! {
        /// A filter holds every key put in it, whatever its size; a large one few others.
        #[test]
        fn the_key_filter_holds_every_key_inserted(
            keys in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..12), 0..200),
            bytes in 1usize..4096,
        ) {
            let mut filter = KeyFilter::new(bytes);
            for key in &keys {
                filter.insert(key);
            }
            prop_assert!(keys.iter().all(|k| filter.may_hold(k)));
        }

        /// Scratch tables, flushed to their store every few writes (applied at once, or by a
        /// writer thread while the writes go on), read exactly as tables in memory given the
        /// same writes: get, scan and scan_rev, at any point.
        #[test]
        fn scratch_tables_read_as_tables_in_memory(
            ops in proptest::collection::vec((0u8..40, proptest::option::of(any::<u8>())), 0..80),
            pending_bytes_max in 0usize..600,
            reads in proptest::collection::vec((0u8..41, 0u8..41, 0usize..12), 1..8),
            beside in any::<bool>(),
        ) {
            let store = herald_log::MemStore::new();
            // Another area of the same store, which reads must never see.
            let mut other = ScratchTables::in_area(&store, AREA_CHUNKS, 0);
            other.put(vec![5], vec![55]);
            std::thread::scope(|scope| {
                let scratch = ScratchTables::rebuilt(&store, pending_bytes_max);
                let scratch = if beside { scratch.writing_beside(scope) } else { scratch };
                reads_as_in_memory(scratch, &ops, &reads)
            })?;
            let mut pages = rebuilt_pages(&store, 4);
            let mut read = Vec::new();
            while let Some(pair) = pages.next_pair().expect("page") {
                read.push(pair);
            }
            let mut mem = MemTables::new();
            for (k, v) in &ops {
                match v {
                    Some(v) => mem.put(vec![*k], vec![*v]),
                    None => mem.delete(&[*k]),
                }
            }
            prop_assert_eq!(read, mem.dump());
        }
    }

    /// A store whose `apply` waits for a token from the test before it applies a batch.
    struct Gated {
        inner: herald_log::MemStore,
        tokens: std::sync::Mutex<mpsc::Receiver<()>>,
    }

    impl Store for Gated {
        fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
            self.inner.get(key)
        }
        fn scan(&self, from: &[u8], to: &[u8], visit: herald_log::Visit<'_>) -> Result<(), StoreError> {
            self.inner.scan(from, to, visit)
        }
        fn last(&self, from: &[u8], to: &[u8]) -> Result<Option<Pair>, StoreError> {
            self.inner.last(from, to)
        }
        fn apply(&self, batch: &WriteBatch) -> Result<(), StoreError> {
            self.tokens.lock().unwrap().recv().expect("a token");
            self.inner.apply(batch)
        }
        fn flush(&self, durability: herald_log::Durability) -> Result<(), StoreError> {
            self.inner.flush(durability)
        }
    }

    #[test]
    fn reads_see_a_batch_the_writer_has_not_applied_yet_and_newer_writes_over_it() {
        let (token, tokens) = mpsc::channel();
        let store = Gated { inner: herald_log::MemStore::new(), tokens: std::sync::Mutex::new(tokens) };
        let stored = |key: u8| store.inner.get(&[AREA_REBUILT, key]).unwrap();
        let both = vec![(vec![1], vec![10]), (vec![3], vec![30])];
        let newer = vec![(vec![3], vec![31])];
        std::thread::scope(|scope| {
            // Owned here: a failed assertion drops it, and the gate then fails instead of hanging.
            let token = token;
            let mut scratch = ScratchTables::rebuilt(&store, 1 << 20).writing_beside(scope);
            scratch.put(vec![1], vec![10]);
            scratch.put(vec![3], vec![30]);
            scratch.flush();
            // The batch is in flight, held at the gate: only the tables have it.
            assert_eq!((stored(1), stored(3)), (None, None));
            assert_eq!((scratch.get(&[1]), scratch.get(&[3])), (Some(vec![10]), Some(vec![30])));
            let descending: Vec<Pair> = both.iter().rev().cloned().collect();
            assert_eq!((scratch.scan(&[0], &[9], 9), scratch.scan_rev(&[0], &[9], 9)), (both, descending));
            // Newer writes, buffered, over the batch in flight.
            scratch.delete(&[1]);
            scratch.put(vec![3], vec![31]);
            assert_eq!((scratch.get(&[1]), scratch.get(&[3])), (None, Some(vec![31])));
            assert_eq!(
                (scratch.scan(&[0], &[9], 9), scratch.scan_rev(&[0], &[9], 9)),
                (newer.clone(), newer.clone())
            );
            token.send(()).unwrap();
            scratch.flush();
            // The first batch applied, the second (a delete and a put) in flight over it.
            assert_eq!((stored(1), stored(3)), (Some(vec![10]), Some(vec![30])));
            assert_eq!((scratch.get(&[1]), scratch.get(&[3])), (None, Some(vec![31])));
            assert_eq!(
                (scratch.scan(&[0], &[9], 9), scratch.scan_rev(&[0], &[9], 1)),
                (newer.clone(), newer)
            );
            token.send(()).unwrap();
            scratch.finish().expect("applied");
        });
        assert_eq!((stored(1), stored(3)), (None, Some(vec![31])));
    }

    /// Writes `ops` to `scratch` and to tables in memory, reading both back after each write.
    fn reads_as_in_memory(
        mut scratch: ScratchTables<'_>,
        ops: &[(u8, Option<u8>)],
        reads: &[(u8, u8, usize)],
    ) -> Result<(), TestCaseError> {
        let mut mem = MemTables::new();
        for (i, (k, v)) in ops.iter().enumerate() {
            match v {
                Some(v) => {
                    scratch.put(vec![*k], vec![*v]);
                    mem.put(vec![*k], vec![*v]);
                }
                None => {
                    scratch.delete(&[*k]);
                    mem.delete(&[*k]);
                }
            }
            let (from, to, limit) = reads[i % reads.len()];
            prop_assert_eq!(scratch.scan(&[from], &[to], limit), mem.scan(&[from], &[to], limit));
            prop_assert_eq!(scratch.scan_rev(&[from], &[to], limit), mem.scan_rev(&[from], &[to], limit));
            prop_assert_eq!(scratch.get(&[*k]), mem.get(&[*k]));
        }
        scratch.finish().expect("flushed");
        Ok(())
    }
}
