//! The write-ahead seam: where a log may store each batch's records somewhere else (herald's
//! cluster mode: a replicated stream) before the batch is applied to its own store.
//!
//! With a [`WriteAhead`] (see [`Log::open_write_ahead`](crate::Log::open_write_ahead)), the
//! writer hands every batch that has records to [`WriteAhead::append`] after building it and
//! before applying it. Only when that succeeds is the batch applied, with the position the
//! write-ahead returned stored under [`META_WRITE_AHEAD`](crate::keyspace::META_WRITE_AHEAD)
//! in the same atomic batch; when it fails, nothing of the batch is applied and its callers
//! get [`LogError::WriteAhead`](crate::LogError::WriteAhead). After a
//! [`WriteAheadError::Fenced`], the writer refuses every later command with that error: another
//! writer has taken the log over. Without a write-ahead nothing of this runs.
//!
//! Also the records' encoding for a write-ahead: [`encode_records`], [`decode_records`].

use crate::keyspace;
use crate::record::{CorruptKind, CorruptRecord, Hash, Record};
use crate::store::{Store, StoreError};

/// Where batches are written before they are applied. Called on the log's writer thread, one
/// batch at a time, in order: a batch is applied only after `append` returned.
pub trait WriteAhead: Send + Sync + 'static {
    /// Encoded bytes of records ([`encoded_len`]) at which the writer ends a batch: no more
    /// commands join it once its records reach this many. One command's records still all go
    /// in its batch, so a write-ahead whose limit is `L` sets this to `L` less the most one
    /// command may append.
    fn batch_bytes_max(&self) -> usize;

    /// Encoded bytes of records one command may append at most: the machine sees it as
    /// [`Tx::command_bytes_max`](crate::Tx::command_bytes_max) and refuses a command whose
    /// records take more, so that with [`WriteAhead::batch_bytes_max`] every batch fits one
    /// write-ahead message. Unbounded unless said.
    fn command_bytes_max(&self) -> usize {
        usize::MAX
    }

    /// Stores one batch's `records` (at least one, consecutive and chained). Returns the
    /// write-ahead's position after them, stored with the batch (read it back with
    /// [`write_ahead_position`]).
    fn append(&self, records: &[Record]) -> Result<u64, WriteAheadError>;
}

/// Why a write-ahead did not store a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WriteAheadError {
    /// Not known to be stored (unreachable, no quorum, timed out; the message says when an
    /// attempt went unanswered, so that the batch may be stored after all): the batch is
    /// refused; later batches are tried.
    Unavailable(String),
    /// Another writer has written: this one must not write again. The batch is refused and the
    /// log refuses every later command with this error.
    Fenced(String),
}

impl std::fmt::Display for WriteAheadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            WriteAheadError::Unavailable(why) => write!(f, "the write-ahead is unavailable: {why}"),
            WriteAheadError::Fenced(why) => write!(f, "this writer was fenced off: {why}"),
        }
    }
}

impl std::error::Error for WriteAheadError {}

/// The write-ahead position stored with the last batch applied (0 before any).
pub fn write_ahead_position(store: &dyn Store) -> Result<u64, StoreError> {
    match store.get(keyspace::META_WRITE_AHEAD)? {
        None => Ok(0),
        Some(v) => v
            .as_slice()
            .try_into()
            .map(u64::from_be_bytes)
            .map_err(|_| StoreError::Corrupt(format!("write-ahead position of {} bytes", v.len()))),
    }
}

/// The format byte of [`encode_records`].
const RECORDS_FORMAT_V1: u8 = 1;
/// `seq`, `at_ms`, body length, checksum, `prev_hash`, `hash`.
const ENTRY_HEADER_BYTES: usize = 8 + 8 + 4 + 32 * 3;

/// Bytes `record` takes in [`encode_records`].
pub fn encoded_len(record: &Record) -> usize {
    ENTRY_HEADER_BYTES + record.body.len()
}

/// Records as one value: `[format = 1][count: u32 BE]`, then per record `[seq: u64 BE]
/// [at_ms: u64 BE][body_bytes: u32 BE][checksum: 32][prev_hash: 32][hash: 32][body]`, the
/// fields of a stored record head (`record.rs`) with its seq.
pub fn encode_records(records: &[Record]) -> Vec<u8> {
    let mut out = Vec::with_capacity(5 + records.iter().map(encoded_len).sum::<usize>());
    out.push(RECORDS_FORMAT_V1);
    out.extend_from_slice(&(records.len() as u32).to_be_bytes());
    for r in records {
        out.extend_from_slice(&r.seq.to_be_bytes());
        out.extend_from_slice(&r.at_ms.to_be_bytes());
        out.extend_from_slice(&(r.body.len() as u32).to_be_bytes());
        out.extend_from_slice(&r.checksum);
        out.extend_from_slice(&r.prev_hash);
        out.extend_from_slice(&r.hash);
        out.extend_from_slice(&r.body);
    }
    out
}

/// Reads back [`encode_records`], checking each record's checksum and hash, and that each
/// follows the one before it (next seq, `prev_hash` its hash). `first_seq` names the error of a
/// value too damaged to say which record it is.
pub fn decode_records(bytes: &[u8], first_seq: u64) -> Result<Vec<Record>, CorruptRecord> {
    let bad = |seq, kind| CorruptRecord { seq, kind };
    let Some((&format, mut rest)) = bytes.split_first() else {
        return Err(bad(first_seq, CorruptKind::Truncated));
    };
    if format != RECORDS_FORMAT_V1 {
        return Err(bad(first_seq, CorruptKind::UnknownFormat(format)));
    }
    let count = take(&mut rest, 4).ok_or(bad(first_seq, CorruptKind::Truncated))?;
    let count = u32::from_be_bytes(count.try_into().expect("4 bytes")) as usize;
    let mut out: Vec<Record> = Vec::with_capacity(count.min(rest.len() / ENTRY_HEADER_BYTES));
    for _ in 0..count {
        let expected = out.last().map_or(first_seq, |r| r.seq + 1);
        let head = take(&mut rest, ENTRY_HEADER_BYTES).ok_or(bad(expected, CorruptKind::Truncated))?;
        let u64_at = |at: usize| u64::from_be_bytes(head[at..at + 8].try_into().expect("8 bytes"));
        let hash_at = |at: usize| -> Hash { head[at..at + 32].try_into().expect("32 bytes") };
        let seq = u64_at(0);
        let body_bytes = u32::from_be_bytes(head[16..20].try_into().expect("4 bytes")) as usize;
        let body = take(&mut rest, body_bytes).ok_or(bad(seq, CorruptKind::Truncated))?.to_vec();
        let record = Record {
            seq,
            at_ms: u64_at(8),
            body,
            checksum: hash_at(20),
            prev_hash: hash_at(52),
            hash: hash_at(84),
        };
        record.check()?;
        if let Some(before) = out.last() {
            if seq != before.seq + 1 {
                return Err(bad(before.seq + 1, CorruptKind::Gap { found: seq }));
            }
            if record.prev_hash != before.hash {
                return Err(bad(seq, CorruptKind::ChainBroken));
            }
        }
        out.push(record);
    }
    if !rest.is_empty() {
        return Err(bad(out.last().map_or(first_seq, |r| r.seq), CorruptKind::StrayKey));
    }
    Ok(out)
}

fn take<'b>(rest: &mut &'b [u8], n: usize) -> Option<&'b [u8]> {
    if rest.len() < n {
        return None;
    }
    let (head, tail) = rest.split_at(n);
    *rest = tail;
    Some(head)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chain(n: u64) -> Vec<Record> {
        let mut prev = [0u8; 32];
        (1..=n)
            .map(|seq| {
                let r = Record::seal(seq, 1_000 + seq, vec![seq as u8; (seq * 37) as usize % 300], prev);
                prev = r.hash;
                r
            })
            .collect()
    }

    #[test]
    fn records_round_trip_and_every_damage_is_named() {
        let records = chain(5);
        let bytes = encode_records(&records);
        assert_eq!(bytes.len(), 5 + records.iter().map(encoded_len).sum::<usize>());
        assert_eq!(decode_records(&bytes, 1).unwrap(), records);
        assert_eq!(decode_records(&encode_records(&[]), 1).unwrap(), vec![]);
        // A flipped body byte: that record's checksum.
        let mut flipped = bytes.clone();
        let last = flipped.len() - 1;
        flipped[last] ^= 1;
        assert_eq!(decode_records(&flipped, 1).unwrap_err().kind, CorruptKind::ChecksumMismatch);
        // Cut short, or with bytes after the last record.
        assert_eq!(decode_records(&bytes[..bytes.len() - 1], 1).unwrap_err().kind, CorruptKind::Truncated);
        let mut longer = bytes.clone();
        longer.push(0);
        assert_eq!(decode_records(&longer, 1).unwrap_err().kind, CorruptKind::StrayKey);
        // A record missing in the middle: a gap.
        let gap = encode_records(&[records[0].clone(), records[2].clone()]);
        assert_eq!(decode_records(&gap, 1).unwrap_err().kind, CorruptKind::Gap { found: 3 });
        // A record of another chain with the right seq: the chain is broken.
        let other = Record::seal(2, 5, b"x".to_vec(), [9; 32]);
        let broken = encode_records(&[records[0].clone(), other]);
        assert_eq!(
            decode_records(&broken, 1).unwrap_err(),
            CorruptRecord { seq: 2, kind: CorruptKind::ChainBroken }
        );
        assert_eq!(decode_records(&[7], 1).unwrap_err().kind, CorruptKind::UnknownFormat(7));
    }
}
