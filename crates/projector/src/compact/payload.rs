//! Payload lookup: an event's payload is in its log record, or in the checkpoint once a
//! compaction dropped that record.

use herald_log::{read_records, LogError, Store};

use super::checkpoint::payload_key;
use super::CompactError;
use crate::event::{decode, Event};
use crate::model::EventRecord;

/// The payload of a published event: in its log record, or in the checkpoint once that record
/// was dropped by a compaction.
pub fn event_payload(store: &dyn Store, event: &EventRecord) -> Result<Vec<u8>, CompactError> {
    // The record first: the common case, and no anchor to read. Read by key, so a cache in
    // front of the store answers it.
    let record = herald_log::read_record(store, event.seq)?;
    match record {
        Some(record) => published_payload(event, &record.body),
        None => stored_payload(store, event.seq, event),
    }
}

fn published_payload(event: &EventRecord, body: &[u8]) -> Result<Vec<u8>, CompactError> {
    match decode(body) {
        Ok(
            Event::EventPublished { id, payload, .. }
            | Event::EventPublishedWithDeliveries { id, payload, .. },
        ) if id == event.id => Ok(payload),
        _ => Err(CompactError::Checkpoint(format!(
            "the payload of event {} is not at seq {}",
            event.id, event.seq
        ))),
    }
}

pub(super) fn stored_payload(
    store: &dyn Store,
    anchor_seq: u64,
    event: &EventRecord,
) -> Result<Vec<u8>, CompactError> {
    if event.seq <= anchor_seq {
        return store.get(&payload_key(event.id)).map_err(LogError::from)?.ok_or_else(|| {
            CompactError::Checkpoint(format!("the payload of event {} is missing", event.id))
        });
    }
    match read_records(store, event.seq, 1)?.pop().filter(|r| r.seq == event.seq) {
        Some(record) => published_payload(event, &record.body),
        None => Err(CompactError::Checkpoint(format!(
            "the payload of event {} is not at seq {}",
            event.id, event.seq
        ))),
    }
}
