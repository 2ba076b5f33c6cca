//! The record format: how one log entry is laid out in the store, checksummed and chained.
//!
//! A record is stored as a head value under `[KS_RECORD][seq: u64 BE]` and, when its body is
//! larger than fits beside the header, continuation values under `[KS_RECORD][seq][index: u16 BE]`
//! (index from 1). No stored value exceeds [`CHUNK_BYTES`], so sled never moves one to a blob file.
//!
//! Head value: `[format = 1][at_ms: u64 BE][body_bytes: u32 BE][checksum: 32][prev_hash: 32][hash: 32][first body part]`
//! - `checksum = blake3(format ‖ seq ‖ at_ms ‖ body_bytes ‖ body)` covers the record itself;
//! - `hash = blake3(prev_hash ‖ seq ‖ checksum)` chains it to the record before (the first
//!   record's `prev_hash` is the log's anchor: all zeroes for a log that was never compacted).
//!
//! A *group* stores up to [`GROUP_RECORDS_MAX`] consecutive small records under the first one's
//! head key, in one value of at most [`CHUNK_BYTES`] (the writer groups the records a machine
//! appends with `Tx::append_grouped`: each stored key costs sled a tree insert, and one in
//! eight a node split). The records and their checksums and hashes are the same as stored
//! alone; a record inside a group has no key of its own.
//!
//! Group value: `[format = 2][count: u16 BE][prev_hash of the first: 32][hash of the last: 32]`,
//! then per record `[at_ms: u64 BE][body_bytes: u32 BE][checksum: 32][body]`. Each `prev_hash`
//! is the hash before it and each `hash` is computed (`chain_hash`), not stored, but for the
//! last, which every read checks: a group is checked on its own as a lone record is (a changed
//! `prev_hash` breaks the stored last hash), for 32 bytes a group rather than 64 a record.

use crate::keyspace;

/// The record format this binary writes and reads.
pub(crate) const RECORD_FORMAT_V1: u8 = 1;
/// The format of a group value (see the module documentation).
pub(crate) const RECORD_GROUP_V2: u8 = 2;
/// Records one group holds at most.
pub(crate) const GROUP_RECORDS_MAX: usize = 16;
const GROUP_HEADER_BYTES: usize = 1 + 2 + 32 + 32;
const GROUP_ENTRY_HEADER_BYTES: usize = 8 + 4 + 32;
/// The largest value stored under one key.
pub const CHUNK_BYTES: usize = 8 * 1024;
/// The largest body a record may carry (herald's events are at most 256 KiB plus framing).
pub const BODY_BYTES_MAX: usize = 1024 * 1024;
const HEAD_HEADER_BYTES: usize = 1 + 8 + 4 + 32 * 3;
const HEAD_BODY_BYTES: usize = CHUNK_BYTES - HEAD_HEADER_BYTES;

pub type Hash = [u8; 32];

/// One record of the log, as read back and checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub seq: u64,
    pub at_ms: u64,
    pub body: Vec<u8>,
    pub checksum: Hash,
    pub prev_hash: Hash,
    pub hash: Hash,
}

/// What is wrong with a stored record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CorruptKind {
    /// The format byte is one this binary does not know (written by a newer herald?).
    UnknownFormat(u8),
    /// The head or a continuation value is shorter than its header says, or a chunk is missing.
    Truncated,
    /// The stored checksum does not match the record's bytes.
    ChecksumMismatch,
    /// The record's `prev_hash` is not the previous record's hash, or its own hash is wrong.
    ChainBroken,
    /// A record is missing: the seq found is not the one expected.
    Gap { found: u64 },
    /// A key in the record keyspace that is not a head or a continuation of the record before.
    StrayKey,
    /// A record read by seq (an index named it) is not in the store.
    Missing,
}

/// A damaged record, named by its seq.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CorruptRecord {
    pub seq: u64,
    pub kind: CorruptKind,
}

impl std::fmt::Display for CorruptRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.kind {
            CorruptKind::UnknownFormat(v) => {
                write!(f, "record {}: unknown record format {v} (newer herald?)", self.seq)
            }
            CorruptKind::Truncated => write!(f, "record {}: truncated", self.seq),
            CorruptKind::ChecksumMismatch => write!(f, "record {}: checksum mismatch", self.seq),
            CorruptKind::ChainBroken => write!(f, "record {}: hash chain broken", self.seq),
            CorruptKind::Gap { found } => {
                write!(f, "record {}: missing (next record found is {found})", self.seq)
            }
            CorruptKind::StrayKey => write!(f, "record {}: unexpected key in the log", self.seq),
            CorruptKind::Missing => write!(f, "record {}: missing from the log", self.seq),
        }
    }
}

impl std::error::Error for CorruptRecord {}

pub fn head_key(seq: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(9);
    k.push(keyspace::RECORD);
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

pub(crate) fn chunk_key(seq: u64, index: u16) -> Vec<u8> {
    let mut k = head_key(seq);
    k.extend_from_slice(&index.to_be_bytes());
    k
}

/// The key just past every key of the record keyspace.
pub fn record_keys_end() -> Vec<u8> {
    vec![keyspace::RECORD + 1]
}

pub(crate) fn checksum(seq: u64, at_ms: u64, body: &[u8]) -> Hash {
    let mut h = blake3::Hasher::new();
    h.update(&[RECORD_FORMAT_V1]);
    h.update(&seq.to_be_bytes());
    h.update(&at_ms.to_be_bytes());
    h.update(&(body.len() as u32).to_be_bytes());
    h.update(body);
    *h.finalize().as_bytes()
}

pub(crate) fn chain_hash(prev_hash: &Hash, seq: u64, checksum: &Hash) -> Hash {
    let mut h = blake3::Hasher::new();
    h.update(prev_hash);
    h.update(&seq.to_be_bytes());
    h.update(checksum);
    *h.finalize().as_bytes()
}

impl Record {
    /// Seals a new record after `prev_hash` (public for `herald export --partitions`, which
    /// writes one log as several: each kept record sealed again in its partition's chain).
    pub fn seal(seq: u64, at_ms: u64, body: Vec<u8>, prev_hash: Hash) -> Record {
        let checksum = checksum(seq, at_ms, &body);
        let hash = chain_hash(&prev_hash, seq, &checksum);
        Record { seq, at_ms, body, checksum, prev_hash, hash }
    }

    /// The key-value pairs that store this record.
    pub(crate) fn to_kv(&self) -> Vec<(Vec<u8>, Vec<u8>)> {
        let first = self.body.len().min(HEAD_BODY_BYTES);
        let mut head = Vec::with_capacity(HEAD_HEADER_BYTES + first);
        head.push(RECORD_FORMAT_V1);
        head.extend_from_slice(&self.at_ms.to_be_bytes());
        head.extend_from_slice(&(self.body.len() as u32).to_be_bytes());
        head.extend_from_slice(&self.checksum);
        head.extend_from_slice(&self.prev_hash);
        head.extend_from_slice(&self.hash);
        head.extend_from_slice(&self.body[..first]);
        let mut out = vec![(head_key(self.seq), head)];
        for (i, part) in self.body[first..].chunks(CHUNK_BYTES).enumerate() {
            out.push((chunk_key(self.seq, (i + 1) as u16), part.to_vec()));
        }
        out
    }

    /// Bytes this record takes in a group value.
    pub(crate) fn group_bytes(&self) -> usize {
        GROUP_ENTRY_HEADER_BYTES + self.body.len()
    }

    /// Checks the record's own checksum and that its hash follows from `prev_hash`.
    pub fn check(&self) -> Result<(), CorruptRecord> {
        if checksum(self.seq, self.at_ms, &self.body) != self.checksum {
            return Err(CorruptRecord { seq: self.seq, kind: CorruptKind::ChecksumMismatch });
        }
        if chain_hash(&self.prev_hash, self.seq, &self.checksum) != self.hash {
            return Err(CorruptRecord { seq: self.seq, kind: CorruptKind::ChainBroken });
        }
        Ok(())
    }
}

/// How many of `records` (consecutive and chained), from the first, one group value holds:
/// at most [`GROUP_RECORDS_MAX`], and at most [`CHUNK_BYTES`] of value.
pub(crate) fn group_len(records: &[Record]) -> usize {
    let mut bytes = GROUP_HEADER_BYTES;
    let mut n = 0;
    for r in records.iter().take(GROUP_RECORDS_MAX) {
        bytes += r.group_bytes();
        if bytes > CHUNK_BYTES {
            break;
        }
        n += 1;
    }
    n
}

/// The pair that stores `records` (consecutive and chained, at least one, as many as
/// [`group_len`] allows) as one group.
pub(crate) fn group_kv(records: &[Record]) -> (Vec<u8>, Vec<u8>) {
    let first = &records[0];
    let bytes = GROUP_HEADER_BYTES + records.iter().map(Record::group_bytes).sum::<usize>();
    let mut v = Vec::with_capacity(bytes);
    v.push(RECORD_GROUP_V2);
    v.extend_from_slice(&(records.len() as u16).to_be_bytes());
    v.extend_from_slice(&first.prev_hash);
    v.extend_from_slice(&records[records.len() - 1].hash);
    for r in records {
        v.extend_from_slice(&r.at_ms.to_be_bytes());
        v.extend_from_slice(&(r.body.len() as u32).to_be_bytes());
        v.extend_from_slice(&r.checksum);
        v.extend_from_slice(&r.body);
    }
    (head_key(first.seq), v)
}

/// Whether a stored head value is a group's.
pub(crate) fn is_group(value: &[u8]) -> bool {
    value.first() == Some(&RECORD_GROUP_V2)
}

/// The first and last seq of the group stored under the head key of `first`.
pub(crate) fn group_span(first: u64, value: &[u8]) -> Option<(u64, u64)> {
    let count = u16::from_be_bytes([*value.get(1)?, *value.get(2)?]);
    let last = first.checked_add(u64::from(count))?.checked_sub(1)?;
    (is_group(value) && count > 0).then_some((first, last))
}

fn be_u64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_be_bytes(a)
}

fn hash_at(b: &[u8], at: usize) -> Hash {
    let mut h = [0u8; 32];
    h.copy_from_slice(&b[at..at + 32]);
    h
}

/// Assembles records from the pairs of a key-ordered scan of the record keyspace, checking
/// each record's checksum and that seqs follow each other without a gap.
pub(crate) struct Assembler {
    expect_seq: Option<u64>,
    expect_prev: Option<Hash>,
    partial: Option<(Record, usize, u16)>,
}

impl Assembler {
    /// `expect_seq`: the seq the first record must have, if known.
    pub(crate) fn new(expect_seq: Option<u64>) -> Assembler {
        Assembler { expect_seq, expect_prev: None, partial: None }
    }

    /// Also checks that the first record's `prev_hash` is `prev` (the anchor or the hash of
    /// the record before the scan); later records are always checked against their predecessor.
    pub(crate) fn with_prev_hash(mut self, prev: Hash) -> Assembler {
        self.expect_prev = Some(prev);
        self
    }

    /// Feeds one pair; adds to `out` the records it completes (a group's, all of them).
    pub(crate) fn push_all(
        &mut self,
        key: &[u8],
        value: &[u8],
        out: &mut Vec<Record>,
    ) -> Result<(), CorruptRecord> {
        if key.len() == 9 && key[0] == keyspace::RECORD && is_group(value) {
            let seq = self.next_head(key)?;
            return self.push_group(seq, value, out);
        }
        if let Some(rec) = self.push(key, value)? {
            out.push(rec);
        }
        Ok(())
    }

    fn push_group(&mut self, first: u64, value: &[u8], out: &mut Vec<Record>) -> Result<(), CorruptRecord> {
        let truncated = |seq| CorruptRecord { seq, kind: CorruptKind::Truncated };
        let Some((_, last)) = group_span(first, value).filter(|_| value.len() >= GROUP_HEADER_BYTES) else {
            return Err(truncated(first));
        };
        let mut prev_hash = hash_at(value, 3);
        let last_hash = hash_at(value, 35);
        let mut at = GROUP_HEADER_BYTES;
        let mut records = Vec::with_capacity((last - first + 1) as usize);
        for seq in first..=last {
            let body_at = at + GROUP_ENTRY_HEADER_BYTES;
            if value.len() < body_at {
                return Err(truncated(seq));
            }
            let body_bytes =
                u32::from_be_bytes([value[at + 8], value[at + 9], value[at + 10], value[at + 11]]) as usize;
            let Some(body) = value.get(body_at..body_at + body_bytes) else { return Err(truncated(seq)) };
            let checksum = hash_at(value, at + 12);
            let rec = Record {
                seq,
                at_ms: be_u64(&value[at..]),
                body: body.to_vec(),
                checksum,
                prev_hash,
                hash: chain_hash(&prev_hash, seq, &checksum),
            };
            prev_hash = rec.hash;
            at = body_at + body_bytes;
            records.push(rec);
        }
        if at != value.len() {
            return Err(truncated(last));
        }
        // The stored last hash: a changed prev_hash (or anything else the checksums do not
        // cover) shows here, whether or not the reader knows the record before the group.
        if prev_hash != last_hash {
            return Err(CorruptRecord { seq: first, kind: CorruptKind::ChainBroken });
        }
        for rec in records {
            out.push(self.complete(rec)?);
        }
        Ok(())
    }

    /// Feeds one pair that is not a group's; returns a record when its last part has arrived.
    pub(crate) fn push(&mut self, key: &[u8], value: &[u8]) -> Result<Option<Record>, CorruptRecord> {
        let stray = |seq| CorruptRecord { seq, kind: CorruptKind::StrayKey };
        if key.len() == 11 && key[0] == keyspace::RECORD {
            let seq = be_u64(&key[1..9]);
            let index = u16::from_be_bytes([key[9], key[10]]);
            let Some((rec, got, next_index)) = self.partial.as_mut() else {
                return Err(stray(seq));
            };
            if rec.seq != seq {
                return Err(CorruptRecord { seq: rec.seq, kind: CorruptKind::Truncated });
            }
            if index != *next_index || *got + value.len() > rec.body.len() {
                return Err(CorruptRecord { seq, kind: CorruptKind::Truncated });
            }
            rec.body[*got..*got + value.len()].copy_from_slice(value);
            *got += value.len();
            *next_index += 1;
            return self.finish_if_complete();
        }
        if key.len() != 9 || key[0] != keyspace::RECORD {
            return Err(stray(self.expect_seq.unwrap_or(0)));
        }
        let seq = self.next_head(key)?;
        if value.is_empty() {
            return Err(CorruptRecord { seq, kind: CorruptKind::Truncated });
        }
        if value[0] != RECORD_FORMAT_V1 {
            return Err(CorruptRecord { seq, kind: CorruptKind::UnknownFormat(value[0]) });
        }
        if value.len() < HEAD_HEADER_BYTES {
            return Err(CorruptRecord { seq, kind: CorruptKind::Truncated });
        }
        let at_ms = be_u64(&value[1..9]);
        let body_bytes = u32::from_be_bytes([value[9], value[10], value[11], value[12]]) as usize;
        if body_bytes > BODY_BYTES_MAX {
            return Err(CorruptRecord { seq, kind: CorruptKind::ChecksumMismatch });
        }
        let first = &value[HEAD_HEADER_BYTES..];
        if first.len() != body_bytes.min(HEAD_BODY_BYTES) {
            return Err(CorruptRecord { seq, kind: CorruptKind::Truncated });
        }
        let mut body = vec![0u8; body_bytes];
        body[..first.len()].copy_from_slice(first);
        let rec = Record {
            seq,
            at_ms,
            body,
            checksum: hash_at(value, 13),
            prev_hash: hash_at(value, 45),
            hash: hash_at(value, 77),
        };
        self.partial = Some((rec, first.len(), 1));
        self.finish_if_complete()
    }

    /// The seq of head key `key`, checked: no record is waiting for parts, and it is the seq
    /// expected next.
    fn next_head(&self, key: &[u8]) -> Result<u64, CorruptRecord> {
        let seq = be_u64(&key[1..9]);
        if let Some((rec, _, _)) = &self.partial {
            return Err(CorruptRecord { seq: rec.seq, kind: CorruptKind::Truncated });
        }
        match self.expect_seq {
            Some(expect) if seq != expect => {
                Err(CorruptRecord { seq: expect, kind: CorruptKind::Gap { found: seq } })
            }
            _ => Ok(seq),
        }
    }

    fn finish_if_complete(&mut self) -> Result<Option<Record>, CorruptRecord> {
        let complete = matches!(&self.partial, Some((rec, got, _)) if *got == rec.body.len());
        if !complete {
            return Ok(None);
        }
        let (rec, _, _) = self.partial.take().expect("checked above");
        self.complete(rec).map(Some)
    }

    /// Checks a whole record against itself and the one before it.
    fn complete(&mut self, rec: Record) -> Result<Record, CorruptRecord> {
        rec.check()?;
        if self.expect_prev.is_some_and(|prev| prev != rec.prev_hash) {
            return Err(CorruptRecord { seq: rec.seq, kind: CorruptKind::ChainBroken });
        }
        self.expect_seq = Some(rec.seq + 1);
        self.expect_prev = Some(rec.hash);
        Ok(rec)
    }

    /// Call when the scan ended: a record still waiting for parts is truncated.
    pub(crate) fn finish(&mut self) -> Result<(), CorruptRecord> {
        match self.partial.take() {
            Some((rec, _, _)) => Err(CorruptRecord { seq: rec.seq, kind: CorruptKind::Truncated }),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assemble(pairs: &[(Vec<u8>, Vec<u8>)], first: u64) -> Result<Vec<Record>, CorruptRecord> {
        let mut a = Assembler::new(Some(first)).with_prev_hash([0; 32]);
        let mut out = Vec::new();
        for (k, v) in pairs {
            a.push_all(k, v, &mut out)?;
        }
        a.finish()?;
        Ok(out)
    }

    /// The records of `chain(bodies)` stored with the ones in `grouped` (index ranges, start
    /// and end) in groups.
    fn grouped_kv(recs: &[Record], grouped: &[(usize, usize)]) -> Vec<crate::store::Pair> {
        let mut kv = Vec::new();
        let mut i = 0;
        while i < recs.len() {
            match grouped.iter().find(|(start, _)| *start == i) {
                Some(&(start, end)) => {
                    assert_eq!(group_len(&recs[start..end]), end - start, "the test's group fits");
                    kv.push(group_kv(&recs[start..end]));
                    i = end;
                }
                None => {
                    kv.extend(recs[i].to_kv());
                    i += 1;
                }
            }
        }
        kv
    }

    #[test]
    fn grouped_records_round_trip_between_records_stored_alone() {
        let (recs, _) = chain(&[10, 0, 200, 30, 20_000, 5, 6, 7]);
        let kv = grouped_kv(&recs, &[(0, 2), (2, 4), (5, 8)]);
        assert_eq!(kv.iter().filter(|(_, v)| is_group(v)).count(), 3);
        assert!(kv.iter().all(|(_, v)| v.len() <= CHUNK_BYTES));
        assert_eq!(assemble(&kv, 1).unwrap(), recs);
        // A group's records are exactly what they are alone: same checksums and hashes.
        let (k, v) = &kv[0];
        assert_eq!(group_span(1, v), Some((1, 2)));
        assert_eq!(k, &head_key(1));
    }

    #[test]
    fn a_group_whose_first_prev_hash_changed_is_caught_without_the_record_before_it() {
        let (recs, _) = chain(&[10, 20, 30, 40]);
        let kv = grouped_kv(&recs, &[(1, 4)]);
        let (key, mut value) = kv[1].clone();
        value[3] ^= 1;
        let mut out = Vec::new();
        let err = Assembler::new(None).push_all(&key, &value, &mut out).unwrap_err();
        assert_eq!(err, CorruptRecord { seq: 2, kind: CorruptKind::ChainBroken });
        assert!(out.is_empty(), "no record of a damaged group is given out");
    }

    #[test]
    fn a_group_holds_what_fits_one_value() {
        let (recs, _) = chain(&[100; 40]);
        assert_eq!(group_len(&recs), GROUP_RECORDS_MAX);
        let (big, _) = chain(&[3_000, 3_000, 3_000, 3_000]);
        assert_eq!(group_len(&big), 2, "two 3 KB bodies fit 8 KiB, three do not");
        let (huge, _) = chain(&[9_000, 10]);
        assert_eq!(group_len(&huge), 0);
    }

    #[test]
    fn a_flipped_byte_in_a_group_is_reported_with_a_seq_of_the_group() {
        let (recs, _) = chain(&[10, 20, 30, 40]);
        let kv = grouped_kv(&recs, &[(1, 4)]);
        let group = 1;
        for pos in 0..kv[group].1.len() {
            let mut bad = kv.clone();
            bad[group].1[pos] ^= 0x40;
            // Named by a seq of the group, or past it when its count was changed.
            match assemble(&bad, 1) {
                Err(err) => assert!(err.seq >= 2, "byte {pos}: {err}"),
                Ok(_) => panic!("byte {pos} flipped unnoticed"),
            }
        }
        for cut in [1, 3, 40, kv[group].1.len() - 1] {
            let mut short = kv.clone();
            short[group].1.truncate(cut);
            let err = assemble(&short, 1).unwrap_err();
            assert!((2..=4).contains(&err.seq), "cut at {cut}: {err}");
        }
    }

    fn chain(bodies: &[usize]) -> (Vec<Record>, Vec<crate::store::Pair>) {
        let mut prev = [0u8; 32];
        let mut recs = Vec::new();
        let mut kv = Vec::new();
        for (i, &n) in bodies.iter().enumerate() {
            let body: Vec<u8> = (0..n).map(|j| (j * 7 + i) as u8).collect();
            let r = Record::seal(i as u64 + 1, 1000 + i as u64, body, prev);
            prev = r.hash;
            kv.extend(r.to_kv());
            recs.push(r);
        }
        (recs, kv)
    }

    #[test]
    fn small_and_chunked_records_round_trip() {
        let sizes = [0, 1, HEAD_BODY_BYTES, HEAD_BODY_BYTES + 1, 3 * CHUNK_BYTES + 5, 300 * 1024];
        let (recs, kv) = chain(&sizes);
        assert!(kv.iter().all(|(_, v)| v.len() <= CHUNK_BYTES));
        assert_eq!(assemble(&kv, 1).unwrap(), recs);
    }

    #[test]
    fn flipped_byte_anywhere_is_reported_with_its_seq() {
        let (_, kv) = chain(&[10, 20_000, 30]);
        for i in 0..kv.len() {
            for pos in [0usize, 5, 20, 50, 90, kv[i].1.len() - 1] {
                if pos >= kv[i].1.len() {
                    continue;
                }
                let mut bad = kv.clone();
                bad[i].1[pos] ^= 0x40;
                let err = assemble(&bad, 1).unwrap_err();
                let seq = u64::from_be_bytes(kv[i].0[1..9].try_into().unwrap());
                assert_eq!(err.seq, seq, "pair {i} byte {pos}: {err}");
            }
        }
    }

    #[test]
    fn truncation_and_missing_chunks_are_truncated() {
        let (_, kv) = chain(&[10, 20_000]);
        let mut short = kv.clone();
        short.last_mut().unwrap().1.pop();
        assert_eq!(assemble(&short, 1).unwrap_err(), CorruptRecord { seq: 2, kind: CorruptKind::Truncated });
        let cut = &kv[..kv.len() - 1];
        assert_eq!(assemble(cut, 1).unwrap_err(), CorruptRecord { seq: 2, kind: CorruptKind::Truncated });
        let mut head_short = kv.clone();
        head_short[0].1.truncate(40);
        assert_eq!(assemble(&head_short, 1).unwrap_err().seq, 1);
    }

    #[test]
    fn gap_and_unknown_format_are_named() {
        let (_, kv) = chain(&[1, 2, 3]);
        let gap: Vec<_> = kv.iter().filter(|(k, _)| k != &head_key(2)).cloned().collect();
        assert_eq!(
            assemble(&gap, 1).unwrap_err(),
            CorruptRecord { seq: 2, kind: CorruptKind::Gap { found: 3 } }
        );
        let mut newer = kv.clone();
        newer[1].1[0] = 3;
        assert_eq!(assemble(&newer, 1).unwrap_err().kind, CorruptKind::UnknownFormat(3));
    }

    #[test]
    fn a_resealed_record_breaks_the_chain_at_its_seq() {
        let (recs, mut kv) = chain(&[1, 2, 3]);
        // A forger rewrites record 2 with a valid checksum and hash of its own, but it cannot
        // know record 1's hash chain without rewriting everything after it too.
        let forged = Record::seal(2, recs[1].at_ms, b"forged".to_vec(), [7; 32]);
        kv[1] = forged.to_kv().remove(0);
        assert_eq!(assemble(&kv, 1).unwrap_err(), CorruptRecord { seq: 2, kind: CorruptKind::ChainBroken });
        let (_, mut swapped) = chain(&[4, 4, 4]);
        let v1 = swapped[1].1.clone();
        swapped[1].1 = swapped[2].1.clone();
        swapped[2].1 = v1;
        assert_eq!(assemble(&swapped, 1).unwrap_err().seq, 2);
    }

    mod fuzz {
        use proptest::prelude::*;

        use super::*;

        /// A short chain of records with bodies of the given sizes, as stored pairs.
        fn chain(sizes: &[usize]) -> Vec<(Vec<u8>, Vec<u8>)> {
            let mut prev = [0u8; 32];
            let mut out = Vec::new();
            for (i, size) in sizes.iter().enumerate() {
                let body: Vec<u8> = (0..*size).map(|b| (b * 31 + i) as u8).collect();
                let r = Record::seal(i as u64 + 1, 1_000 + i as u64, body, prev);
                prev = r.hash;
                out.extend(r.to_kv());
            }
            out
        }

        proptest! {
            /// The decoder never panics, whatever pairs a damaged store hands it.
            #[test]
            fn arbitrary_pairs_never_panic(
                pairs in proptest::collection::vec(
                    (proptest::collection::vec(any::<u8>(), 0..16), proptest::collection::vec(any::<u8>(), 0..200)),
                    0..8,
                ),
            ) {
                let mut a = Assembler::new(None);
                let mut out = Vec::new();
                for (k, v) in &pairs {
                    if a.push_all(k, v, &mut out).is_err() {
                        break;
                    }
                }
                let _ = a.finish();
            }

            /// Nor do arbitrary group values, at any seq.
            #[test]
            fn arbitrary_groups_never_panic(
                seq in any::<u64>(),
                count in any::<u16>(),
                rest in proptest::collection::vec(any::<u8>(), 0..400),
            ) {
                let value = [&[RECORD_GROUP_V2][..], &count.to_be_bytes(), &rest].concat();
                let mut out = Vec::new();
                let _ = Assembler::new(None).push_all(&head_key(seq), &value, &mut out);
            }

            /// Any change to a stored record's bytes is caught: every byte is under the checksum
            /// or the chain.
            #[test]
            fn a_changed_byte_is_always_caught(
                sizes in proptest::collection::vec(0usize..20_000, 1..4),
                which in any::<usize>(),
                at in any::<usize>(),
                xor in 1u8..=255,
            ) {
                let good = chain(&sizes);
                let mut bad = good.clone();
                let pair = which % bad.len();
                prop_assume!(!bad[pair].1.is_empty());
                let byte = at % bad[pair].1.len();
                bad[pair].1[byte] ^= xor;
                prop_assert!(assemble(&good, 1).is_ok());
                let decoded = assemble(&bad, 1);
                prop_assert!(decoded.is_err(), "pair {} byte {} changed, yet it decoded: {:?}", pair, byte, decoded);
            }
        }
    }
}
