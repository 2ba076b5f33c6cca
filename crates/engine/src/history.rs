//! A delivery's history: the records that touched it (its creation, its attempts, its
//! retriggers, a cascade that changed it), read by seq through the record refs the projection
//! keeps (rules 4 on), each checked against the record before it or the anchor.

use std::collections::BTreeSet;

use herald_log::{read_head, read_record_linked, Record};
use herald_projector::{decode, delivery_refs, get_event, refs_from, Delivery, Event};

use crate::engine::{Engine, EngineError};

/// The durable records of one delivery, oldest first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeliveryHistory {
    pub records: Vec<Record>,
    /// `Some(seq)`: the delivery is older than the record refs, which start at `seq` (where
    /// fold rules 4 were adopted): what touched it before is not in `records` (a scan of the log,
    /// `herald replay --scan`, tells it). `Some(0)`: the store keeps no refs at all.
    pub indexed_from: Option<u64>,
}

impl Engine {
    /// The history of `delivery` (as the caller read it: its organisation checked), from the
    /// records the refs name; records a compaction dropped are not in it, and the first kept
    /// one chains to the anchor. Only durable records: what `/v1/audit/log` shows.
    pub fn delivery_history(&self, delivery: &Delivery) -> Result<DeliveryHistory, EngineError> {
        let id = delivery.id;
        let (event_seq, refs, from) = self.read(|t| {
            let event_seq = get_event(t, delivery.event_id)?.map_or(0, |e| e.seq);
            Ok((event_seq, delivery_refs(t, id, 0)?, refs_from(t)?))
        })?;
        let store = self.store();
        let head = read_head(store.as_ref())?;
        let committed = self.committed_seq();
        let mut seqs: BTreeSet<u64> = refs.iter().map(|r| r.seq).collect();
        seqs.insert(event_seq);
        let mut records = Vec::with_capacity(seqs.len());
        for seq in seqs.into_iter().filter(|s| *s > head.anchor_seq && *s <= committed) {
            let record = read_record_linked(store.as_ref(), seq, (head.anchor_seq, head.anchor_hash))?;
            // The event's record is the delivery's creation only when it carries it.
            if seq == event_seq && !refs.iter().any(|r| r.seq == seq) && !creates(&record, delivery) {
                continue;
            }
            records.push(record);
        }
        let indexed_from = match from {
            None => Some(0),
            Some(from) if from > head.anchor_seq + 1 && event_seq < from => Some(from),
            Some(_) => None,
        };
        Ok(DeliveryHistory { records, indexed_from })
    }
}

fn creates(record: &Record, delivery: &Delivery) -> bool {
    match decode(&record.body) {
        Ok(Event::EventPublishedWithDeliveries { deliveries, .. }) => {
            deliveries.iter().any(|d| d.id == delivery.id)
        }
        _ => false,
    }
}
