//! An event row grown by one delivery without decoding its delivery list: a fan-out to
//! thousands of endpoints writes one `DeliveryCreated` record per delivery past its publish
//! record, and decoding and re-encoding the whole `EventRecord` for each made that fold
//! quadratic (10,000 endpoints: tens of seconds on the writer thread). The row's bytes are
//! the same as `codec::to_bytes` of the grown record; the tests hold them to it.

use serde::Deserialize;
use uuid::Uuid;

use crate::codec;
use crate::ids::{DeliveryId, EventId, OrgId};

/// The fields of an [`EventRecord`](crate::model::EventRecord) before its `delivery_ids`, in
/// the same order: decoded alone, they are the front of its row.
#[derive(Debug, Deserialize)]
pub(crate) struct EventHead {
    pub id: EventId,
    pub org_id: OrgId,
    pub event_type: String,
    pub call_id: Option<Uuid>,
    #[allow(dead_code)] // decoded only to reach the fields after it
    idempotency_key: Option<String>,
    #[allow(dead_code)]
    created_at_ms: u64,
    #[allow(dead_code)]
    seq: u64,
}

/// `row` (an encoded `EventRecord`) with `id` appended to its `delivery_ids`, and its head;
/// `None` when `row` is not an event row.
pub(crate) fn append_delivery(row: &[u8], id: DeliveryId) -> Option<(EventHead, Vec<u8>)> {
    let (head, head_len) = codec::prefix::<EventHead>(row)?;
    let (count, count_len) = codec::prefix::<u64>(&row[head_len..])?;
    let ids = &row[head_len + count_len..];
    let mut out = Vec::with_capacity(row.len() + 24);
    out.extend_from_slice(&row[..head_len]);
    codec::write_bytes(&count.checked_add(1)?, &mut out);
    out.extend_from_slice(ids);
    codec::write_bytes(&id, &mut out);
    Some((head, out))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::EventRecord;

    fn record(ids: usize, key: Option<&str>) -> EventRecord {
        EventRecord {
            id: EventId(Uuid::from_u128(7)),
            org_id: OrgId(Uuid::from_u128(8)),
            event_type: "call.ended".into(),
            call_id: key.map(|_| Uuid::from_u128(9)),
            idempotency_key: key.map(str::to_string),
            created_at_ms: 1_700_000_000_000,
            seq: 300,
            delivery_ids: (0..ids as u128).map(|i| DeliveryId(Uuid::from_u128(i << 64 | i))).collect(),
        }
    }

    #[test]
    fn an_appended_row_is_the_encoding_of_the_grown_record_across_every_length_width() {
        // The list's length is a varint: 1 byte below 251, 3 bytes to 65,535, then 5.
        for n in [0, 1, 249, 250, 251, 252, 65_534, 65_535, 65_536] {
            for key in [None, Some("idem-1")] {
                let before = record(n, key);
                let id = DeliveryId(Uuid::from_u128(0xFEED_0000 + n as u128));
                let (head, row) = append_delivery(&codec::to_bytes(&before), id).unwrap();
                let mut after = before.clone();
                after.delivery_ids.push(id);
                assert_eq!(row, codec::to_bytes(&after), "{n} ids, key {key:?}");
                assert_eq!((head.id, head.org_id, head.call_id), (before.id, before.org_id, before.call_id));
                assert_eq!(head.event_type, before.event_type);
            }
        }
    }

    #[test]
    fn what_is_not_an_event_row_is_none() {
        assert!(append_delivery(&[], DeliveryId(Uuid::nil())).is_none());
        assert!(append_delivery(&[1, 2, 3], DeliveryId(Uuid::nil())).is_none());
    }
}
