//! Ordered delivery per key (API.md `ordering: "per_key"` and "Ordering key"): a delivery's
//! ordering key, the keys of the order index, and the read the dispatcher's gate makes.
//!
//! The order index (`keys::KS_ORDER`) holds, for each endpoint whose ordering is `per_key`, one
//! entry per *pending* delivery that has a key: `endpoint ++ key length ++ key ++ event seq ++
//! delivery`. Within an (endpoint, key) group the entries sort by the seq of the record that
//! published the delivery's event, which is event order (an event has at most one delivery per
//! endpoint). The first entry of a group is the one delivery of it that may be attempted;
//! `keys::KS_ORDER_BY_DELIVERY` maps each delivery to its entry, so a delivery that leaves
//! `pending` finds it with one read, and one that never had one costs a read answered from
//! the cache (delivery ids ascend: see `cache_policy`).

use uuid::Uuid;

use crate::codec;
use crate::ids::{DeliveryId, EndpointId, EventId};
use crate::keys;
use crate::query::CorruptValue;
use crate::tables::ReadTables;

/// The longest ordering key, in bytes.
pub const ORDERING_KEY_BYTES_MAX: usize = 128;

/// Bytes after an entry's group: the event seq (8) and the delivery id (16).
const ENTRY_TAIL_BYTES: usize = 24;

/// Whether `key` may be an ordering key: 1 to [`ORDERING_KEY_BYTES_MAX`] visible ASCII characters.
pub fn valid_ordering_key(key: &str) -> bool {
    !key.is_empty() && key.len() <= ORDERING_KEY_BYTES_MAX && key.bytes().all(|b| b.is_ascii_graphic())
}

/// The ordering key of the deliveries of event `event_id` (whose `call_id` is given): the key
/// its publish gave, else the call id (hyphenated), else none.
pub fn ordering_key(
    t: &impl ReadTables,
    event_id: EventId,
    call_id: Option<Uuid>,
) -> Result<Option<String>, CorruptValue> {
    let key = keys::ordering_key(event_id);
    match t.get(&key) {
        Some(bytes) => codec::from_bytes::<String>(&bytes).map(Some).ok_or(CorruptValue { key }),
        None => Ok(call_id.map(|c| c.hyphenated().to_string())),
    }
}

/// The order index entry of `delivery`, published at `seq`, to `endpoint` with ordering `key`.
pub(crate) fn entry(endpoint: EndpointId, key: &str, seq: u64, delivery: DeliveryId) -> Vec<u8> {
    let len = u8::try_from(key.len()).unwrap_or(u8::MAX);
    let key = &key.as_bytes()[..usize::from(len)];
    keys::key(keys::KS_ORDER, &[endpoint.as_bytes(), &[len], key, &seq.to_be_bytes(), delivery.as_bytes()])
}

/// The (endpoint, key) group an entry belongs to: its key without the seq and the delivery.
pub(crate) fn group_of(entry: &[u8]) -> Option<&[u8]> {
    let at = entry.len().checked_sub(ENTRY_TAIL_BYTES).filter(|at| *at > 17)?;
    (entry[0] == keys::KS_ORDER && usize::from(entry[17]) + 18 == at).then(|| &entry[..at])
}

/// The endpoint part of an entry (the prefix of every group of that endpoint).
pub(crate) fn endpoint_prefix(endpoint: EndpointId) -> Vec<u8> {
    keys::key(keys::KS_ORDER, &[endpoint.as_bytes()])
}

/// The delivery an entry is of.
pub(crate) fn delivery_of(entry: &[u8]) -> Option<DeliveryId> {
    keys::trailing_id(entry).map(DeliveryId::from_bytes)
}

/// The first entries (at most `limit`) of `group`, in order.
pub(crate) fn group_head(t: &(impl ReadTables + ?Sized), group: &[u8], limit: usize) -> Vec<Vec<u8>> {
    let end = keys::prefix_end(group).unwrap_or_else(|| vec![0xff; group.len() + 1]);
    t.scan(group, &end, limit).into_iter().map(|(k, _)| k).collect()
}

/// The delivery that `id` waits behind: the first pending delivery of its endpoint and key,
/// when that is another one. `None`: `id` is not ordered (not pending, no key, or its endpoint
/// is not `per_key`), or it is first and may be attempted.
pub fn waits_behind(t: &impl ReadTables, id: DeliveryId) -> Result<Option<DeliveryId>, CorruptValue> {
    let back = keys::order_by_delivery(id);
    let Some(entry) = t.get(&back) else { return Ok(None) };
    let group = group_of(&entry).ok_or_else(|| CorruptValue { key: back.clone() })?;
    let Some(first) = group_head(t, group, 1).into_iter().next() else {
        return Err(CorruptValue { key: back });
    };
    if first == entry {
        return Ok(None);
    }
    delivery_of(&first).map(Some).ok_or(CorruptValue { key: first })
}

/// Looks up the ordering key of the newest possible event and the order entry of the newest
/// possible delivery: through a read cache that knows ascending keyspaces (`cache_policy`), this
/// teaches it where each keyspace ends, so that later lookups of newer ids are answered without
/// the store. Worth doing when a store opens: after a failed write (a full disk) the store may
/// refuse a read of a page it has not loaded, and without this the first lookup would be one.
pub fn learn_order_floors(t: &impl ReadTables) {
    let _ = t.get(&keys::ordering_key(EventId(Uuid::max())));
    let _ = t.get(&keys::order_by_delivery(DeliveryId(Uuid::max())));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ordering_keys_are_visible_ascii_of_1_to_128_bytes() {
        for ok in ["a", "call-1", "x".repeat(128).as_str(), "!~"] {
            assert!(valid_ordering_key(ok), "{ok:?}");
        }
        for bad in ["", " a", "a b", "é", "x".repeat(129).as_str(), "a\n"] {
            assert!(!valid_ordering_key(bad), "{bad:?}");
        }
    }

    #[test]
    fn entries_group_by_endpoint_and_key_and_sort_by_seq() {
        let e = EndpointId(Uuid::from_u128(1));
        let (a, b) = (DeliveryId(Uuid::from_u128(9)), DeliveryId(Uuid::from_u128(2)));
        let early = entry(e, "k", 5, a);
        let late = entry(e, "k", 6, b);
        assert!(early < late, "seq first, then the id");
        assert_eq!(group_of(&early), group_of(&late));
        assert_ne!(group_of(&entry(e, "k2", 5, a)), group_of(&early));
        assert!(
            !entry(e, "kk", 1, a).starts_with(group_of(&early).unwrap()),
            "keys do not run into each other"
        );
        assert_eq!(delivery_of(&early), Some(a));
        assert!(early.starts_with(&endpoint_prefix(e)));
        assert_eq!(group_of(&[keys::KS_ORDER, 1, 2]), None);
    }
}
