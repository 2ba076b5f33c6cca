//! The ids commands make: derived from what the command holds, so that a replay of the same
//! commands makes the same ids, and stamped with the time so that they sort by it.

use uuid::Uuid;

use super::Commands;

/// The largest sub-millisecond sequence number of an id.
const ID_SEQ_MAX: u16 = 0x0FFF;
/// Milliseconds whose next sequence number [`Commands`] remembers.
const ID_SEQ_MILLIS: usize = 64;

/// A UUID v7 stamped with `at_ms` whose random bits are drawn from `parts`: ids that a replay of
/// the same commands gives again (a simulation replays a seed exactly), and that still sort by time.
pub fn derived_id(at_ms: u64, parts: &[&[u8]]) -> Uuid {
    uuid::Builder::from_unix_timestamp_millis(at_ms, &id_bits(parts)).into_uuid()
}

/// Like [`derived_id`], with `seq` in the 12 bits after the timestamp (RFC 9562's sub-millisecond
/// counter): ids made in the same millisecond sort in the order they were made, so the index
/// entries of a batch's deliveries go to the end of their windows instead of all through them.
pub fn sequenced_id(at_ms: u64, seq: u16, parts: &[&[u8]]) -> Uuid {
    let mut bits = id_bits(parts);
    bits[0] = (seq >> 8) as u8 & 0x0F;
    bits[1] = seq as u8;
    uuid::Builder::from_unix_timestamp_millis(at_ms, &bits).into_uuid()
}

fn id_bits(parts: &[&[u8]]) -> [u8; 10] {
    let mut hasher = blake3::Hasher::new();
    for part in parts {
        hasher.update(&(part.len() as u64).to_le_bytes());
        hasher.update(part);
    }
    hasher.finalize().as_bytes()[..10].try_into().unwrap_or([0; 10])
}

impl Commands {
    /// The next sub-millisecond sequence number for an id made at `at_ms` (see
    /// [`sequenced_id`]); past 4,095 in one millisecond it stays there, and the hash bits
    /// order those ids.
    pub(super) fn next_id_seq(&mut self, at_ms: u64) -> u16 {
        if let Some((_, next)) = self.id_seqs.iter_mut().find(|(ms, _)| *ms == at_ms) {
            let seq = *next;
            *next = next.saturating_add(1).min(ID_SEQ_MAX);
            return seq;
        }
        if self.id_seqs.len() >= ID_SEQ_MILLIS {
            self.id_seqs.pop_front();
        }
        self.id_seqs.push_back((at_ms, 1));
        0
    }
}
