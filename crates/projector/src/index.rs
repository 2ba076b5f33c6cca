//! The delivery indexes, stored as chunks of entries rather than one key per entry.
//!
//! An entry is a logical key `Delivery::index_keys` gives: for the three list indexes
//! (organisation + status, endpoint + status, organisation + event type) `prefix ++
//! created_at_ms (8) ++ delivery id (16)`, for the due index `next_attempt_at_ms (8) ++
//! delivery id (16)`. One stored key per entry cost a delivery nine sled writes over its life
//! (four at creation, five when it leaves `pending`), over half of what the writer spent on it.
//! Here the entries of one prefix whose time falls in the same [`WINDOW_MS`] window share a
//! stored value, so a batch of a few hundred deliveries writes each window it touches once.
//!
//! Stored, for a prefix whose chunk prefix is `cp` (the logical prefix with its keyspace byte
//! mapped by [`keys::chunk_keyspace`]) and a window `w` (the entry's time / `WINDOW_MS`, u64 BE):
//!
//! | key | value |
//! | --- | --- |
//! | `cp ++ w` (the window's head) | boundaries count (u32 BE) ++ the window's boundary entries ++ its entries before the first boundary |
//! | `cp ++ w ++ b` (a chunk) | the entries from boundary entry `b` up to the next boundary |
//!
//! Entries are 24 bytes (`created_at_ms ++ id`), ascending. A *boundary* is an entry whose
//! blake3 starts with a zero byte (one in 256): it starts a chunk of its own, so a window that
//! holds many entries (a fan-out to many endpoints, a burst in one window) is cut into chunks
//! of 256 entries on average whatever their number. The head exists exactly when the window has
//! an entry and lists the window's boundaries, so an insert or a remove reads the head and at
//! most one chunk by key, and never seeks.
//!
//! The layout is a function of the set of entries alone, not of the order they came and went
//! in: a rebuild from the log, and a retention checkpoint folded forward, give byte-identical
//! tables.

use std::collections::BTreeMap;

use crate::keys;
use crate::query::CorruptValue;
use crate::tables::{ReadTables, Tables};

/// The width of a window of entry times whose entries share a head.
pub const WINDOW_MS: u64 = 8;
/// Bytes of an entry: `created_at_ms` (8) ++ delivery id (16).
pub const ENTRY_BYTES: usize = 24;
/// Chunks read per store scan while listing.
const SCAN_CHUNKS: usize = 32;

type Entry = [u8; ENTRY_BYTES];

/// Whether `key` is an entry of a chunked index (else it is a plain stored key).
pub(crate) fn is_chunked(key: &[u8]) -> bool {
    keys::chunk_keyspace(key[0]).is_some() && key.len() > ENTRY_BYTES
}

/// Whether stored keys of `keyspace` are chunks of a list index.
pub(crate) fn is_chunk_keyspace(keyspace: u8) -> bool {
    matches!(
        keyspace,
        keys::KS_CHUNKS_BY_ORG_STATUS
            | keys::KS_CHUNKS_BY_ENDPOINT_STATUS
            | keys::KS_CHUNKS_BY_ORG_TYPE
            | keys::KS_CHUNKS_DUE
    )
}

/// The chunk prefix and the entry of a logical key.
fn split(key: &[u8]) -> Result<(Vec<u8>, Entry), CorruptValue> {
    let corrupt = || CorruptValue { key: key.to_vec() };
    let keyspace = keys::chunk_keyspace(key[0]).ok_or_else(corrupt)?;
    let at = key.len().checked_sub(ENTRY_BYTES).filter(|at| *at > 0).ok_or_else(corrupt)?;
    let mut prefix = Vec::with_capacity(at + 8 + ENTRY_BYTES);
    prefix.push(keyspace);
    prefix.extend_from_slice(&key[1..at]);
    Ok((prefix, key[at..].try_into().map_err(|_| corrupt())?))
}

/// The chunk prefix of a logical prefix.
fn chunk_prefix(logical_prefix: &[u8]) -> Option<Vec<u8>> {
    let keyspace = keys::chunk_keyspace(*logical_prefix.first()?)?;
    Some([&[keyspace], &logical_prefix[1..]].concat())
}

fn window_of(at_ms: u64) -> [u8; 8] {
    (at_ms / WINDOW_MS).to_be_bytes()
}

fn entry_at_ms(entry: &[u8]) -> u64 {
    u64::from_be_bytes(entry[..8].try_into().unwrap_or_default())
}

fn is_boundary(entry: &Entry) -> bool {
    blake3::hash(entry).as_bytes()[0] == 0
}

fn head_key(prefix: &[u8], entry: &Entry) -> Vec<u8> {
    [prefix, &window_of(entry_at_ms(entry))].concat()
}

/// A window's head as stored: `boundaries count (u32 BE) ++ boundaries ++ entries`, worked on
/// in place (no decoding: a write moves a few bytes of a value it has read anyway).
struct Head {
    key: Vec<u8>,
    value: Vec<u8>,
}

/// Where an entry is (`Ok`) or would go (`Err`) among sorted entries, in entries.
fn search(entries: &[u8], entry: &Entry) -> Result<usize, usize> {
    let (mut lo, mut hi) = (0, entries.len() / ENTRY_BYTES);
    while lo < hi {
        let mid = (lo + hi) / 2;
        match entries[mid * ENTRY_BYTES..(mid + 1) * ENTRY_BYTES].cmp(&entry[..]) {
            std::cmp::Ordering::Less => lo = mid + 1,
            std::cmp::Ordering::Greater => hi = mid,
            std::cmp::Ordering::Equal => return Ok(mid),
        }
    }
    Err(lo)
}

fn entry_at(entries: &[u8], i: usize) -> Entry {
    entries[i * ENTRY_BYTES..(i + 1) * ENTRY_BYTES].try_into().expect("an entry's bytes")
}

fn entries_of(key: &[u8], body: &[u8]) -> Result<Vec<Entry>, CorruptValue> {
    if body.len() % ENTRY_BYTES != 0 {
        return Err(CorruptValue { key: key.to_vec() });
    }
    Ok(body.chunks_exact(ENTRY_BYTES).map(|e| e.try_into().expect("exact chunk")).collect())
}

impl Head {
    fn new(key: Vec<u8>) -> Head {
        Head { key, value: vec![0; 4] }
    }

    /// Checks the stored value's shape.
    fn checked(key: Vec<u8>, value: Vec<u8>) -> Result<Head, CorruptValue> {
        let count = value.first_chunk::<4>().map(|c| u32::from_be_bytes(*c) as usize);
        let ok = count
            .and_then(|n| n.checked_mul(ENTRY_BYTES))
            .is_some_and(|b| b + 4 <= value.len() && (value.len() - 4 - b) % ENTRY_BYTES == 0);
        if ok {
            Ok(Head { key, value })
        } else {
            Err(CorruptValue { key })
        }
    }

    fn read(t: &(impl ReadTables + ?Sized), key: Vec<u8>) -> Result<Option<Head>, CorruptValue> {
        match t.get(&key) {
            Some(value) => Head::checked(key, value).map(Some),
            None => Ok(None),
        }
    }

    fn boundaries_end(&self) -> usize {
        4 + u32::from_be_bytes(self.value[..4].try_into().expect("checked")) as usize * ENTRY_BYTES
    }

    fn boundaries(&self) -> &[u8] {
        &self.value[4..self.boundaries_end()]
    }

    /// The entries before the first boundary.
    fn entries(&self) -> &[u8] {
        &self.value[self.boundaries_end()..]
    }

    /// The boundary of the chunk that holds (or would hold) `entry`; `None`: the head does.
    fn holder_of(&self, entry: &Entry) -> Option<Entry> {
        let boundaries = self.boundaries();
        match search(boundaries, entry) {
            Ok(i) => Some(entry_at(boundaries, i)),
            Err(0) => None,
            Err(i) => Some(entry_at(boundaries, i - 1)),
        }
    }

    fn add_boundary(&mut self, entry: &Entry) {
        let at = 4 + search(self.boundaries(), entry).unwrap_or_else(|i| i) * ENTRY_BYTES;
        self.value.splice(at..at, entry.iter().copied());
        self.set_count(1);
    }

    fn drop_boundary(&mut self, i: usize) {
        let at = 4 + i * ENTRY_BYTES;
        self.value.drain(at..at + ENTRY_BYTES);
        self.set_count(-1);
    }

    fn set_count(&mut self, delta: i64) {
        let n = u32::from_be_bytes(self.value[..4].try_into().expect("checked"));
        let n = u32::try_from(i64::from(n) + delta).unwrap_or(0);
        self.value[..4].copy_from_slice(&n.to_be_bytes());
    }

    /// Writes it back, or deletes it when its window is empty.
    fn store(self, t: &mut (impl Tables + ?Sized)) {
        if self.value.len() == 4 {
            t.delete(&self.key);
        } else {
            t.put(self.key, self.value);
        }
    }
}

/// Puts `entry` at byte `at` of `value`, or there starts a chunk with it and what follows it
/// when it is a boundary: returns that chunk's value.
fn place(value: &mut Vec<u8>, at: usize, entry: &Entry) -> Option<Vec<u8>> {
    if is_boundary(entry) {
        let mut chunk = Vec::with_capacity(ENTRY_BYTES + value.len() - at);
        chunk.extend_from_slice(entry);
        chunk.extend_from_slice(&value[at..]);
        value.truncate(at);
        Some(chunk)
    } else {
        value.splice(at..at, entry.iter().copied());
        None
    }
}

/// One window being changed: its head and the chunks read so far, changed in memory and
/// written back once by [`Window::store`], however many entries came and went.
struct Window {
    head: Head,
    head_changed: bool,
    /// Boundary → the chunk's entries (`None`: the chunk was dropped), and whether it changed.
    chunks: BTreeMap<Entry, (Option<Vec<u8>>, bool)>,
}

impl Window {
    fn read(t: &(impl ReadTables + ?Sized), head_key: Vec<u8>) -> Result<Window, CorruptValue> {
        let head = Head::read(t, head_key.clone())?.unwrap_or_else(|| Head::new(head_key));
        Ok(Window { head, head_changed: false, chunks: BTreeMap::new() })
    }

    fn chunk_key(&self, boundary: &Entry) -> Vec<u8> {
        [&self.head.key[..], boundary].concat()
    }

    /// The entries of the chunk the head lists at `boundary` (read on first use), and its
    /// changed mark, for the caller to set when it changes them.
    fn chunk(
        &mut self,
        t: &(impl ReadTables + ?Sized),
        boundary: &Entry,
    ) -> Result<(&mut Vec<u8>, &mut bool), CorruptValue> {
        if !self.chunks.contains_key(boundary) {
            let key = self.chunk_key(boundary);
            let Some(value) = t.get(&key) else {
                return Err(CorruptValue { key: self.head.key.clone() });
            };
            if value.len() % ENTRY_BYTES != 0 || !value.starts_with(boundary) {
                return Err(CorruptValue { key });
            }
            self.chunks.insert(*boundary, (Some(value), false));
        }
        let key = self.chunk_key(boundary);
        match self.chunks.get_mut(boundary) {
            Some((Some(value), changed)) => Ok((value, changed)),
            _ => Err(CorruptValue { key }),
        }
    }

    /// Adds `entry` (nothing if it is there already).
    fn insert(&mut self, t: &(impl ReadTables + ?Sized), entry: &Entry) -> Result<(), CorruptValue> {
        let split_off = match self.head.holder_of(entry) {
            None => {
                let body = self.head.boundaries_end();
                let Err(i) = search(self.head.entries(), entry) else {
                    return Ok(());
                };
                self.head_changed = true;
                place(&mut self.head.value, body + i * ENTRY_BYTES, entry)
            }
            Some(boundary) => {
                let (chunk, changed) = self.chunk(t, &boundary)?;
                let Err(i) = search(chunk, entry) else {
                    return Ok(());
                };
                *changed = true;
                place(chunk, i * ENTRY_BYTES, entry)
            }
        };
        // A boundary started a chunk with what its holder had after it.
        if let Some(value) = split_off {
            self.head.add_boundary(entry);
            self.head_changed = true;
            self.chunks.insert(*entry, (Some(value), true));
        }
        Ok(())
    }

    /// Removes `entry` (nothing if it is not there).
    fn remove(&mut self, t: &(impl ReadTables + ?Sized), entry: &Entry) -> Result<(), CorruptValue> {
        let Some(boundary) = self.head.holder_of(entry) else {
            let Ok(i) = search(self.head.entries(), entry) else {
                return Ok(());
            };
            let at = self.head.boundaries_end() + i * ENTRY_BYTES;
            self.head.value.drain(at..at + ENTRY_BYTES);
            self.head_changed = true;
            return Ok(());
        };
        let (chunk, changed) = self.chunk(t, &boundary)?;
        let Ok(i) = search(chunk, entry) else {
            return Ok(());
        };
        *changed = true;
        chunk.drain(i * ENTRY_BYTES..(i + 1) * ENTRY_BYTES);
        if i > 0 {
            return Ok(());
        }
        // The entry was its chunk's boundary: the chunk joins the one before it.
        let key = self.chunk_key(&boundary);
        let rest = self.chunks.insert(boundary, (None, true)).and_then(|(v, _)| v).unwrap_or_default();
        let b = search(self.head.boundaries(), entry).map_err(|_| CorruptValue { key })?;
        let before = b.checked_sub(1).map(|before| entry_at(self.head.boundaries(), before));
        self.head.drop_boundary(b);
        self.head_changed = true;
        match before {
            Some(before) => {
                let (chunk, changed) = self.chunk(t, &before)?;
                *changed = true;
                chunk.extend_from_slice(&rest);
            }
            None => self.head.value.extend_from_slice(&rest),
        }
        Ok(())
    }

    /// Writes back what changed: each changed chunk once, then the head (deleted when the window
    /// is empty).
    fn store(self, t: &mut (impl Tables + ?Sized)) {
        for (boundary, (value, changed)) in self.chunks {
            if !changed {
                continue;
            }
            let key = [&self.head.key[..], &boundary].concat();
            match value {
                Some(value) => t.put(key, value),
                None => t.delete(&key),
            }
        }
        if self.head_changed {
            self.head.store(t);
        }
    }
}

/// Adds the entry of logical key `key` to its chunk now (nothing if it is there already).
/// Callers go through [`Tables::add_entry`], which may stage it for [`fold_entries`] instead.
pub(crate) fn insert_now(t: &mut (impl Tables + ?Sized), key: &[u8]) -> Result<(), CorruptValue> {
    fold_entries(t, [(key, true)])
}

/// Removes the entry of logical key `key` from its chunk now (nothing if it is not there).
pub(crate) fn remove_now(t: &mut (impl Tables + ?Sized), key: &[u8]) -> Result<(), CorruptValue> {
    fold_entries(t, [(key, false)])
}

/// Adds (`true`) or removes each entry of `ops` (logical keys) in its chunk, reading and
/// writing each window once for a run of entries in it: pass them ascending. The result is the
/// same as one op after the other (ops on different entries commute; the layout is a function
/// of the set).
pub(crate) fn fold_entries<'k>(
    t: &mut (impl Tables + ?Sized),
    ops: impl IntoIterator<Item = (&'k [u8], bool)>,
) -> Result<(), CorruptValue> {
    let mut open: Option<Window> = None;
    for (key, add) in ops {
        let (prefix, entry) = split(key)?;
        let head_key = head_key(&prefix, &entry);
        let window = match open.take() {
            Some(w) if w.head.key == head_key => w,
            other => {
                if let Some(w) = other {
                    w.store(t);
                }
                Window::read(&*t, head_key)?
            }
        };
        let window = open.insert(window);
        if add {
            window.insert(&*t, &entry)?;
        } else {
            window.remove(&*t, &entry)?;
        }
    }
    if let Some(w) = open {
        w.store(t);
    }
    Ok(())
}

/// The logical keyspaces whose entries are kept in chunks, as key ranges.
pub(crate) fn logical_ranges() -> impl Iterator<Item = (Vec<u8>, Vec<u8>)> {
    [
        keys::KS_DELIVERY_BY_ORG_STATUS,
        keys::KS_DELIVERY_BY_ENDPOINT_STATUS,
        keys::KS_DELIVERY_BY_ORG_TYPE,
        keys::KS_DUE,
    ]
    .into_iter()
    .map(|ks| (vec![ks], vec![ks + 1]))
}

/// Which way a scan walks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Walk {
    Forward,
    Backward,
}

/// A range of a chunked index to list: up to `limit` logical keys of the index `logical_prefix`
/// with `from <= key < to`, ascending (`Forward`) or descending.
#[derive(Clone, Copy, Debug)]
pub struct IndexRange<'k> {
    pub(crate) logical_prefix: &'k [u8],
    pub(crate) from: &'k [u8],
    pub(crate) to: &'k [u8],
    pub(crate) limit: usize,
    pub(crate) walk: Walk,
}

/// Up to `limit` logical keys of the index `logical_prefix` with `from <= key < to`, ascending
/// (`Forward`) or descending: what the chunks hold, with the entries the tables have not folded
/// into them yet added and removed ([`ReadTables::scan_index`], `staged.rs`).
pub(crate) fn scan(
    t: &impl ReadTables,
    logical_prefix: &[u8],
    from: &[u8],
    to: &[u8],
    limit: usize,
    walk: Walk,
) -> Result<Vec<Vec<u8>>, CorruptValue> {
    t.scan_index(t, &IndexRange { logical_prefix, from, to, limit, walk })
}

/// [`scan`] over what the chunks hold. Reads the windows the range touches, one store scan per
/// [`SCAN_CHUNKS`] heads and chunks, and stops once it has `limit`.
pub(crate) fn scan_chunks(
    t: &(impl ReadTables + ?Sized),
    range: &IndexRange<'_>,
) -> Result<Vec<Vec<u8>>, CorruptValue> {
    let IndexRange { logical_prefix, from, to, limit, walk } = *range;
    let Some(prefix) = chunk_prefix(logical_prefix) else {
        return Err(CorruptValue { key: logical_prefix.to_vec() });
    };
    let (mut lo, mut hi) = window_bounds(&prefix, range);
    let mut out = Vec::new();
    if from >= to || lo >= hi || limit == 0 {
        return Ok(out);
    }
    loop {
        let page = match walk {
            Walk::Forward => t.scan(&lo, &hi, SCAN_CHUNKS),
            Walk::Backward => t.scan_rev(&lo, &hi, SCAN_CHUNKS),
        };
        let done = page.len() < SCAN_CHUNKS;
        for (key, value) in page {
            match walk {
                Walk::Forward => lo = keys::successor(&key),
                Walk::Backward => hi = key.clone(),
            }
            let mut keys: Vec<Vec<u8>> = stored_entries(prefix.len(), key, value)?
                .iter()
                .map(|e| [logical_prefix, e].concat())
                .filter(|k| k.as_slice() >= from && k.as_slice() < to)
                .collect();
            if walk == Walk::Backward {
                keys.reverse();
            }
            for k in keys {
                out.push(k);
                if out.len() == limit {
                    return Ok(out);
                }
            }
        }
        if done {
            return Ok(out);
        }
    }
}

/// The stored keys (under chunk prefix `prefix`) that hold the entries of `range`: from the
/// window of `from` to the one after the window of `to`. Entries are then filtered.
fn window_bounds(prefix: &[u8], range: &IndexRange<'_>) -> (Vec<u8>, Vec<u8>) {
    let logical_prefix = range.logical_prefix;
    let prefix_end = keys::prefix_end(prefix).unwrap_or_else(|| vec![0xff; prefix.len() + 1]);
    let window_bound = |bound: &[u8], after: bool| -> Vec<u8> {
        if bound < logical_prefix {
            return prefix.to_vec();
        }
        if !bound.starts_with(logical_prefix) {
            return prefix_end.clone();
        }
        let tail = &bound[logical_prefix.len()..];
        let mut at = [0u8; 8];
        let n = tail.len().min(8);
        at[..n].copy_from_slice(&tail[..n]);
        let window = u64::from_be_bytes(at) / WINDOW_MS;
        match window.checked_add(u64::from(after)) {
            Some(w) => [prefix, &w.to_be_bytes()].concat(),
            None => prefix_end.clone(),
        }
    };
    (window_bound(range.from, false), window_bound(range.to, true))
}

/// The entries a stored head or chunk holds (its key is `prefix_len` bytes of chunk prefix,
/// then the window, then for a chunk its boundary entry).
fn stored_entries(prefix_len: usize, key: Vec<u8>, value: Vec<u8>) -> Result<Vec<Entry>, CorruptValue> {
    match key.len().checked_sub(prefix_len) {
        Some(8) => {
            let head = Head::checked(key, value)?;
            entries_of(&head.key, head.entries())
        }
        Some(n) if n == 8 + ENTRY_BYTES => entries_of(&key, &value),
        _ => Err(CorruptValue { key }),
    }
}

/// Adds the index entries of the delivery rows in `t` from key `from` on, up to `limit` rows
/// (after an earlier version's one key per entry was dropped); returns where the next page
/// starts, `None` after the last row.
pub(crate) fn chunk_deliveries(
    t: &mut impl Tables,
    from: &[u8],
    limit: usize,
) -> Result<Option<Vec<u8>>, CorruptValue> {
    let page = t.scan(from, &[keys::KS_DELIVERY + 1], limit);
    for (key, value) in &page {
        let delivery: crate::model::Delivery =
            crate::codec::from_bytes(value).ok_or_else(|| CorruptValue { key: key.clone() })?;
        for index in delivery.index_keys().into_iter().filter(|k| is_chunked(k)) {
            t.add_entry(&index)?;
        }
    }
    Ok(page.last().filter(|_| page.len() == limit).map(|(last, _)| keys::successor(last)))
}

/// Adds the index entries of every delivery row in `t` (see [`chunk_deliveries`]).
pub(crate) fn rebuild_from_deliveries(t: &mut impl Tables) -> Result<(), CorruptValue> {
    let mut from = vec![keys::KS_DELIVERY];
    while let Some(next) = chunk_deliveries(t, &from, 1024)? {
        from = next;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::staged::Deferring;
    use crate::tables::MemTables;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    /// A logical key of the organisation + status index with org byte `org`.
    fn logical(org: u8, at_ms: u64, id: u128) -> Vec<u8> {
        let mut k = vec![keys::KS_DELIVERY_BY_ORG_STATUS];
        k.extend_from_slice(&[org; 16]);
        k.push(0);
        k.extend_from_slice(&at_ms.to_be_bytes());
        k.extend_from_slice(&id.to_be_bytes());
        k
    }

    fn prefix(org: u8) -> Vec<u8> {
        let mut k = vec![keys::KS_DELIVERY_BY_ORG_STATUS];
        k.extend_from_slice(&[org; 16]);
        k.push(0);
        k
    }

    fn all(t: &MemTables, org: u8, walk: Walk) -> Vec<Vec<u8>> {
        let p = prefix(org);
        scan(t, &p, &p, &keys::prefix_end(&p).unwrap(), usize::MAX, walk).unwrap()
    }

    /// An id whose entry at `at_ms` is (or is not) a boundary.
    fn id_with(at_ms: u64, boundary: bool, from: u128) -> u128 {
        (from..)
            .find(|id| {
                let e: Entry = logical(1, at_ms, *id)[18..].try_into().unwrap();
                is_boundary(&e) == boundary
            })
            .unwrap()
    }

    /// Inserts a plain entry, a boundary after it and a plain one after that, all in one
    /// window of org 1; returns their ids.
    fn plain_boundary_plain(t: &mut impl Tables) -> [u128; 3] {
        let plain = id_with(16, false, 0);
        let boundary = id_with(16, true, plain + 1);
        let after = id_with(16, false, boundary + 1);
        for id in [plain, boundary, after] {
            insert_now(t, &logical(1, 16, id)).unwrap();
        }
        [plain, boundary, after]
    }

    #[test]
    fn a_window_without_boundaries_is_one_head() {
        let mut t = MemTables::new();
        let ids: Vec<u128> = (0..5)
            .scan(0, |next, _| {
                let id = id_with(16, false, *next);
                *next = id + 1;
                Some(id)
            })
            .collect();
        for id in ids.iter().rev() {
            insert_now(&mut t, &logical(1, 16, *id)).unwrap();
        }
        assert_eq!(t.len(), 1, "one head for the window");
        let (_, value) = t.iter().next().unwrap();
        assert_eq!(value.len(), 4 + 5 * ENTRY_BYTES);
        assert_eq!(value[..4], [0; 4], "no boundaries, no chunks after it");
    }

    #[test]
    fn a_boundary_starts_a_chunk_and_leaves_with_it() {
        let mut t = MemTables::new();
        let [plain, boundary, after] = plain_boundary_plain(&mut t);
        let stored: Vec<(Vec<u8>, Vec<u8>)> = t.dump();
        assert_eq!(stored.len(), 2, "head and one chunk: {stored:02x?}");
        let boundary_entry = &logical(1, 16, boundary)[18..];
        assert_eq!(
            stored[0].1,
            [&1u32.to_be_bytes()[..], boundary_entry, &logical(1, 16, plain)[18..]].concat(),
            "the head lists the boundary and keeps what is before it"
        );
        assert_eq!(stored[1].0[stored[1].0.len() - ENTRY_BYTES..], *boundary_entry);
        assert_eq!(stored[1].1.len(), 2 * ENTRY_BYTES, "the chunk: the boundary and what follows");
        remove_now(&mut t, &logical(1, 16, boundary)).unwrap();
        let stored = t.dump();
        assert_eq!(stored.len(), 1, "the chunk joined the head");
        assert_eq!(
            stored[0].1,
            [&[0u8; 4][..], &logical(1, 16, plain)[18..], &logical(1, 16, after)[18..]].concat()
        );
        remove_now(&mut t, &logical(1, 16, plain)).unwrap();
        remove_now(&mut t, &logical(1, 16, after)).unwrap();
        assert!(t.is_empty(), "an empty window stores nothing");
    }

    /// Tables that count their writes.
    #[derive(Default)]
    struct CountingWrites {
        t: MemTables,
        writes: usize,
    }

    impl ReadTables for CountingWrites {
        fn get(&self, key: &[u8]) -> Option<Vec<u8>> {
            self.t.get(key)
        }
        fn scan(&self, from: &[u8], to: &[u8], limit: usize) -> Vec<(Vec<u8>, Vec<u8>)> {
            self.t.scan(from, to, limit)
        }
    }

    impl Tables for CountingWrites {
        fn put(&mut self, key: Vec<u8>, value: Vec<u8>) {
            self.writes += 1;
            self.t.put(key, value)
        }
        fn delete(&mut self, key: &[u8]) {
            self.writes += 1;
            self.t.delete(key)
        }
    }

    #[test]
    fn an_op_that_changes_nothing_writes_nothing() {
        let mut t = CountingWrites::default();
        let [plain, _, after] = plain_boundary_plain(&mut t);
        t.writes = 0;
        // Already there (in the head, in the chunk), or not there at all (head, chunk, window).
        insert_now(&mut t, &logical(1, 16, plain)).unwrap();
        insert_now(&mut t, &logical(1, 16, after)).unwrap();
        remove_now(&mut t, &logical(1, 16, id_with(16, false, after + 1))).unwrap();
        remove_now(&mut t, &logical(1, 800, plain)).unwrap();
        assert_eq!(t.writes, 0);
        // One change in the chunk writes the chunk alone.
        remove_now(&mut t, &logical(1, 16, after)).unwrap();
        assert_eq!(t.writes, 1);
    }

    #[test]
    fn a_crowded_window_is_cut_into_chunks() {
        let mut t = MemTables::new();
        for id in 0..5_000u128 {
            insert_now(&mut t, &logical(1, 40, id)).unwrap();
        }
        let largest = t.iter().map(|(_, v)| v.len()).max().unwrap();
        assert!(t.len() > 5, "{} stored keys", t.len());
        assert!(largest < 5_000 * ENTRY_BYTES / 4, "largest value {largest} bytes");
        assert_eq!(all(&t, 1, Walk::Forward).len(), 5_000);
    }

    #[test]
    fn a_corrupt_value_is_named() {
        let mut t = MemTables::new();
        insert_now(&mut t, &logical(1, 16, 7)).unwrap();
        let (key, _) = t.dump().remove(0);
        t.put(key.clone(), vec![0, 0, 0, 0, 1, 2]);
        assert_eq!(insert_now(&mut t, &logical(1, 16, 8)), Err(CorruptValue { key: key.clone() }));
        let p = prefix(1);
        assert_eq!(
            scan(&t, &p, &p, &keys::prefix_end(&p).unwrap(), 10, Walk::Forward),
            Err(CorruptValue { key })
        );
    }

    fn op() -> impl Strategy<Value = (bool, u8, u64, u128)> {
        // Few orgs and times, many ids: crowded windows with boundaries in them.
        (any::<bool>(), 0u8..2, 0u64..40, 0u128..600)
    }

    /// Every scan of `t` (both walks, the whole prefix and `bounds`) gives what `model` holds.
    fn scans_agree(
        t: &impl ReadTables,
        model: &BTreeSet<Vec<u8>>,
        bounds: (u64, u64, usize),
    ) -> Result<(), TestCaseError> {
        for org in 0..2u8 {
            let p = prefix(org);
            let expected: Vec<Vec<u8>> = model.iter().filter(|k| k[1] == org).cloned().collect();
            let end = keys::prefix_end(&p).unwrap();
            prop_assert_eq!(scan(t, &p, &p, &end, usize::MAX, Walk::Forward).unwrap(), expected.clone());
            let mut rev = expected.clone();
            rev.reverse();
            prop_assert_eq!(scan(t, &p, &p, &end, usize::MAX, Walk::Backward).unwrap(), rev);
            let (a, b, limit) = bounds;
            let from = [&p[..], &a.to_be_bytes()].concat();
            let to = logical(org, b, 300);
            let inside: Vec<Vec<u8>> = expected.iter().filter(|k| **k >= from && **k < to).cloned().collect();
            let fwd = scan(t, &p, &from, &to, limit, Walk::Forward).unwrap();
            prop_assert_eq!(fwd, inside.iter().take(limit).cloned().collect::<Vec<_>>());
            let bwd = scan(t, &p, &from, &to, limit, Walk::Backward).unwrap();
            prop_assert_eq!(bwd, inside.iter().rev().take(limit).cloned().collect::<Vec<_>>());
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// Any sequence of inserts and removes leaves the set a model set holds, scans it back
        /// in order with any bounds and limit, and stores it exactly as inserting the final set
        /// into empty tables would (the layout does not depend on history). The later ops are
        /// deferred, as in a log batch: scans see them before they are folded, and folding
        /// them all at once stores what one at a time would.
        #[test]
        fn chunks_hold_the_set_and_their_layout_is_its_function(
            ops in proptest::collection::vec(op(), 1..600),
            deferred in proptest::collection::vec((op(), any::<proptest::sample::Index>()), 0..300),
            bounds in (0u64..48, 0u64..48, 1usize..50),
        ) {
            let mut t = Deferring::new(MemTables::new());
            let mut model: BTreeSet<Vec<u8>> = BTreeSet::new();
            for (add, org, at, id) in ops {
                let k = logical(org, at, id);
                if add {
                    insert_now(&mut t, &k).unwrap();
                    model.insert(k);
                } else {
                    remove_now(&mut t, &k).unwrap();
                    model.remove(&k);
                }
            }
            scans_agree(&t, &model, bounds)?;
            for ((add, org, at, id), pick) in deferred {
                if add || model.is_empty() {
                    let k = logical(org, at, id);
                    t.add_entry(&k).unwrap();
                    model.insert(k);
                } else {
                    // Removes hit entries the chunks hold (or that wait to be folded).
                    let k = model.iter().nth(pick.index(model.len())).cloned().unwrap();
                    t.remove_entry(&k).unwrap();
                    model.remove(&k);
                }
            }
            scans_agree(&t, &model, bounds)?;
            t.fold().unwrap();
            let mut fresh = MemTables::new();
            for k in &model {
                insert_now(&mut fresh, k).unwrap();
            }
            prop_assert_eq!(t.base.dump(), fresh.dump());
            scans_agree(&t, &model, bounds)?;
        }
    }
}
