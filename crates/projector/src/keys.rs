//! The keyspace byte map and the key builders. Every number in a key is big-endian, so byte
//! order is numeric order (and time order for `*_at_ms` and UUID v7 ids).
//!
//! | byte | key | value |
//! | --- | --- | --- |
//! | `0x10` | `META_APPLIED_SEQ` | applied seq, u64 BE |
//! | `0x10` | `META_POLICY` | [`Policy`](crate::Policy) |
//! | `0x10` | `META_RULES` | the fold's rules version, u32 BE |
//! | `0x10` | `META_COUNT` ++ status | deliveries in that status, u64 BE |
//! | `0x20` | api key id | [`ApiKey`](crate::ApiKey) |
//! | `0x21` | key hash (32) | api key id (16) |
//! | `0x22` | org id | the organisation's default secret (String) |
//! | `0x30` | endpoint id | [`Endpoint`](crate::Endpoint) |
//! | `0x31` | org id ++ endpoint id | empty (live endpoints only) |
//! | `0x32` | endpoint id | [`DeliverySettings`](crate::DeliverySettings) (only when not the default) |
//! | `0x40` | event id | [`EventRecord`](crate::EventRecord) |
//! | `0x41` | org id ++ idempotency key bytes | [`IdempotencyHit`](crate::IdempotencyHit) |
//! | `0x50` | delivery id | [`Delivery`](crate::Delivery) |
//! | `0x51` | (no longer written: see [`LEGACY_KEYSPACES`]) | |
//! | `0x52` | (logical only, see `index.rs`) org ++ status ++ created_at ++ delivery | |
//! | `0x53` | (no longer written: see [`LEGACY_KEYSPACES`]) | |
//! | `0x54` | (logical only) endpoint ++ status ++ created_at ++ delivery | (endpoint deliveries only) |
//! | `0x55` | (logical only) org ++ type length (u32 BE) ++ type ++ created_at ++ delivery | |
//! | `0x56` | (logical only) next_attempt_at ++ delivery | (pending deliveries only: the due queue) |
//! | `0x57` | org ++ status ++ window [++ boundary entry] | `0x52`'s entries, chunked (`index.rs`) |
//! | `0x58` | endpoint ++ status ++ window [++ boundary entry] | `0x54`'s entries, chunked |
//! | `0x59` | org ++ type length ++ type ++ window [++ boundary entry] | `0x55`'s entries, chunked |
//! | `0x5A` | window [++ boundary entry] | `0x56`'s entries, chunked |
//! | `0x5B` | event id | the ordering key its publish gave (String; only when one was given) |
//! | `0x5C` | endpoint ++ key length (u8) ++ ordering key ++ event seq (u64 BE) ++ delivery | empty (`order.rs`: pending deliveries of `per_key` endpoints that have a key) |
//! | `0x5D` | delivery id | its `0x5C` key (exactly while it has one) |
//! | `0x60` | delivery ++ attempt (u32 BE) | [`AttemptRecord`](crate::AttemptRecord) |
//! | `0x61` | (alone) | the seq from which the fold keeps record refs, u64 BE (rules 4 on) |
//! | `0x61` | subject id ++ seq (u64 BE) | a delivery's: its status byte after that record; else empty |
//! | `0x70` | recovery id | [`Recovery`](crate::Recovery) |
//! | `0x71` | recovery id ++ chunk (u32 BE) | its delivery ids, 16 bytes each, [`RECOVERY_CHUNK_IDS`](crate::RECOVERY_CHUNK_IDS) a chunk but the last |

use crate::ids::{ApiKeyId, DeliveryId, EndpointId, EventId, OrgId, RecoveryId};
use crate::model::DeliveryStatus;

pub const KS_META: u8 = 0x10;
pub const KS_API_KEY: u8 = 0x20;
pub const KS_API_KEY_BY_HASH: u8 = 0x21;
pub const KS_ORG_SECRET: u8 = 0x22;
pub const KS_ENDPOINT: u8 = 0x30;
pub const KS_ENDPOINT_BY_ORG: u8 = 0x31;
pub const KS_ENDPOINT_SETTINGS: u8 = 0x32;
pub const KS_EVENT: u8 = 0x40;
pub const KS_IDEMPOTENCY: u8 = 0x41;
pub const KS_DELIVERY: u8 = 0x50;
/// Written by earlier versions (an organisation's whole delivery list); see [`LEGACY_KEYSPACES`].
pub const KS_DELIVERY_BY_ORG: u8 = 0x51;
pub const KS_DELIVERY_BY_ORG_STATUS: u8 = 0x52;
/// Written by earlier versions (an endpoint's whole delivery list); see [`LEGACY_KEYSPACES`].
pub const KS_DELIVERY_BY_ENDPOINT: u8 = 0x53;
pub const KS_DELIVERY_BY_ENDPOINT_STATUS: u8 = 0x54;
pub const KS_DELIVERY_BY_ORG_TYPE: u8 = 0x55;
pub const KS_DUE: u8 = 0x56;
pub const KS_CHUNKS_BY_ORG_STATUS: u8 = 0x57;
pub const KS_CHUNKS_BY_ENDPOINT_STATUS: u8 = 0x58;
pub const KS_CHUNKS_BY_ORG_TYPE: u8 = 0x59;
pub const KS_CHUNKS_DUE: u8 = 0x5A;
pub const KS_ORDERING_KEY: u8 = 0x5B;
pub const KS_ORDER: u8 = 0x5C;
pub const KS_ORDER_BY_DELIVERY: u8 = 0x5D;
pub const KS_ATTEMPT: u8 = 0x60;
/// Record refs: which records touched a delivery, an endpoint, or the store-wide settings
/// (`refs.rs`), so a replay reads those records alone.
pub const KS_RECORD_REFS: u8 = 0x61;
pub const KS_RECOVERY: u8 = 0x70;
pub const KS_RECOVERY_MEMBERS: u8 = 0x71;

/// Keyspaces that earlier versions wrote and this one neither writes nor reads: an organisation's
/// and an endpoint's whole delivery lists, which are now their status partitions merged (two
/// index keys fewer per delivery, each a sled insert and a share of a page). Reads skip them;
/// [`drop_legacy`](crate::compact::drop_legacy), run when the engine opens, deletes them.
pub const LEGACY_KEYSPACES: [u8; 2] = [KS_DELIVERY_BY_ORG, KS_DELIVERY_BY_ENDPOINT];

/// Keyspaces whose entries earlier versions stored one key each and this one stores chunked
/// (`index.rs`): the bytes name the logical keys (`Delivery::index_keys`), never a stored
/// key. Reads skip stored keys of them; [`drop_legacy`](crate::compact::drop_legacy) rebuilds the
/// chunks from the delivery rows, then deletes them.
pub const LEGACY_INDEX_KEYSPACES: [u8; 4] =
    [KS_DELIVERY_BY_ORG_STATUS, KS_DELIVERY_BY_ENDPOINT_STATUS, KS_DELIVERY_BY_ORG_TYPE, KS_DUE];

/// Whether stored keys of `keyspace` are an earlier version's, which reads skip.
pub fn is_legacy(keyspace: u8) -> bool {
    LEGACY_KEYSPACES.contains(&keyspace) || LEGACY_INDEX_KEYSPACES.contains(&keyspace)
}

/// The keyspace that stores the chunks of a chunked index's logical keyspace.
pub(crate) fn chunk_keyspace(logical: u8) -> Option<u8> {
    match logical {
        KS_DELIVERY_BY_ORG_STATUS => Some(KS_CHUNKS_BY_ORG_STATUS),
        KS_DELIVERY_BY_ENDPOINT_STATUS => Some(KS_CHUNKS_BY_ENDPOINT_STATUS),
        KS_DELIVERY_BY_ORG_TYPE => Some(KS_CHUNKS_BY_ORG_TYPE),
        KS_DUE => Some(KS_CHUNKS_DUE),
        _ => None,
    }
}

/// The first keyspace byte the projector owns; the log owns every byte below.
pub const KS_FIRST: u8 = 0x10;
/// The last keyspace byte the projector owns.
pub const KS_LAST: u8 = 0x7F;

pub const META_APPLIED_SEQ: &[u8] = &[KS_META, b's'];
pub const META_POLICY: &[u8] = &[KS_META, b'p'];
/// The fold's rules version in force, u32 BE (absent: 1; see `Event::RulesAdopted`).
pub const META_RULES: &[u8] = &[KS_META, b'r'];
/// Followed by a status byte: how many deliveries are in that status (for metrics).
pub const META_COUNT: &[u8] = &[KS_META, b'c'];

pub(crate) fn count(status: DeliveryStatus) -> Vec<u8> {
    [META_COUNT, &[status_byte(status)]].concat()
}

/// A key of `keyspace` made of `parts`, one after another.
pub(crate) fn key(keyspace: u8, parts: &[&[u8]]) -> Vec<u8> {
    let len = 1 + parts.iter().map(|p| p.len()).sum::<usize>();
    let mut key = Vec::with_capacity(len);
    key.push(keyspace);
    for part in parts {
        key.extend_from_slice(part);
    }
    key
}

/// The first key after every key that starts with `prefix` (`None`: there is none, the prefix
/// is all `0xff`).
pub(crate) fn prefix_end(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return Some(end);
        }
    }
    None
}

/// The first key after `key` in byte order.
pub(crate) fn successor(key: &[u8]) -> Vec<u8> {
    let mut next = Vec::with_capacity(key.len() + 1);
    next.extend_from_slice(key);
    next.push(0);
    next
}

pub(crate) fn api_key(id: ApiKeyId) -> Vec<u8> {
    key(KS_API_KEY, &[id.as_bytes()])
}

pub(crate) fn api_key_by_hash(hash: &[u8; 32]) -> Vec<u8> {
    key(KS_API_KEY_BY_HASH, &[hash])
}

pub(crate) fn org_secret(org: OrgId) -> Vec<u8> {
    key(KS_ORG_SECRET, &[org.as_bytes()])
}

pub(crate) fn endpoint(id: EndpointId) -> Vec<u8> {
    key(KS_ENDPOINT, &[id.as_bytes()])
}

pub(crate) fn endpoint_settings(id: EndpointId) -> Vec<u8> {
    key(KS_ENDPOINT_SETTINGS, &[id.as_bytes()])
}

pub(crate) fn endpoint_by_org(org: OrgId, id: EndpointId) -> Vec<u8> {
    key(KS_ENDPOINT_BY_ORG, &[org.as_bytes(), id.as_bytes()])
}

pub(crate) fn event(id: EventId) -> Vec<u8> {
    key(KS_EVENT, &[id.as_bytes()])
}

pub(crate) fn idempotency(org: OrgId, idempotency_key: &str) -> Vec<u8> {
    key(KS_IDEMPOTENCY, &[org.as_bytes(), idempotency_key.as_bytes()])
}

pub(crate) fn delivery(id: DeliveryId) -> Vec<u8> {
    key(KS_DELIVERY, &[id.as_bytes()])
}

pub(crate) fn due(next_attempt_at_ms: u64, id: DeliveryId) -> Vec<u8> {
    key(KS_DUE, &[&next_attempt_at_ms.to_be_bytes(), id.as_bytes()])
}

pub(crate) fn ordering_key(event: EventId) -> Vec<u8> {
    key(KS_ORDERING_KEY, &[event.as_bytes()])
}

pub(crate) fn order_by_delivery(delivery: DeliveryId) -> Vec<u8> {
    key(KS_ORDER_BY_DELIVERY, &[delivery.as_bytes()])
}

pub(crate) fn attempt(delivery: DeliveryId, attempt: u32) -> Vec<u8> {
    key(KS_ATTEMPT, &[delivery.as_bytes(), &attempt.to_be_bytes()])
}

/// The ref of record `seq` to the subject whose 16-byte id is `id` (`refs.rs`).
pub(crate) fn record_ref(id: &[u8; 16], seq: u64) -> Vec<u8> {
    key(KS_RECORD_REFS, &[id, &seq.to_be_bytes()])
}

pub(crate) fn recovery(id: RecoveryId) -> Vec<u8> {
    key(KS_RECOVERY, &[id.as_bytes()])
}

pub(crate) fn recovery_members(id: RecoveryId, chunk: u32) -> Vec<u8> {
    key(KS_RECOVERY_MEMBERS, &[id.as_bytes(), &chunk.to_be_bytes()])
}

pub(crate) fn status_byte(status: DeliveryStatus) -> u8 {
    match status {
        DeliveryStatus::Pending => 0,
        DeliveryStatus::Delivered => 1,
        DeliveryStatus::Exhausted => 2,
        DeliveryStatus::Inactive => 3,
    }
}

/// The org ++ event type part of a `KS_DELIVERY_BY_ORG_TYPE` key: the type's length comes first,
/// so no type's keys run into another's.
pub(crate) fn org_type_prefix(org: OrgId, event_type: &str) -> Vec<u8> {
    let len = u32::try_from(event_type.len()).unwrap_or(u32::MAX);
    key(KS_DELIVERY_BY_ORG_TYPE, &[org.as_bytes(), &len.to_be_bytes(), event_type.as_bytes()])
}

/// `prefix ++ created_at_ms ++ id`: an entry of a time-ordered delivery index.
pub(crate) fn timed(prefix: &[u8], created_at_ms: u64, id: DeliveryId) -> Vec<u8> {
    let mut key = Vec::with_capacity(prefix.len() + 24);
    key.extend_from_slice(prefix);
    key.extend_from_slice(&created_at_ms.to_be_bytes());
    key.extend_from_slice(id.as_bytes());
    key
}

/// The `(created_at_ms, id)` that ends a time-ordered index key.
pub(crate) fn parse_timed(key: &[u8]) -> Option<(u64, DeliveryId)> {
    let tail = key.len().checked_sub(24).map(|start| &key[start..])?;
    let (at, id) = tail.split_at(8);
    Some((u64::from_be_bytes(at.try_into().ok()?), DeliveryId::from_bytes(id.try_into().ok()?)))
}

/// The 16-byte id that ends a key.
pub(crate) fn trailing_id(key: &[u8]) -> Option<[u8; 16]> {
    let start = key.len().checked_sub(16)?;
    key[start..].try_into().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use uuid::Uuid;

    #[test]
    fn prefix_end_and_successor() {
        let cases: [(&[u8], Option<&[u8]>); 4] =
            [(&[1, 2], Some(&[1, 3])), (&[1, 0xff], Some(&[2])), (&[0xff, 0xff], None), (&[], None)];
        for (prefix, expected) in cases {
            assert_eq!(prefix_end(prefix).as_deref(), expected, "{prefix:?}");
        }
        assert_eq!(successor(&[1, 2]), vec![1, 2, 0]);
    }

    #[test]
    fn timed_keys_sort_by_time_then_id_and_parse_back() {
        let a = DeliveryId(Uuid::from_u128(2));
        let b = DeliveryId(Uuid::from_u128(1));
        let early = timed(&[KS_DELIVERY_BY_ORG_STATUS], 255, a);
        let late = timed(&[KS_DELIVERY_BY_ORG_STATUS], 256, b);
        assert!(early < late);
        assert_eq!(parse_timed(&early), Some((255, a)));
        assert_eq!(parse_timed(&[1, 2]), None);
    }

    #[test]
    fn event_type_prefixes_do_not_overlap() {
        let org = OrgId(Uuid::from_u128(7));
        let short = org_type_prefix(org, "a");
        let long = org_type_prefix(org, "ab");
        assert!(!long.starts_with(&short));
        assert!(!short.starts_with(&long));
    }
}
