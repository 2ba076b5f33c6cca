//! `replay`: the story of a delivery, an event (with its deliveries) or an endpoint (with its
//! deliveries), in log order, folded as it goes so each state change is shown.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;

use herald_log::Record;
use herald_projector::compact::load_checkpoint;
use herald_projector::{
    apply, decode, get_delivery, get_endpoint, get_event, Delivery, DeliveryId, DeliveryStatus, EndpointId,
    Event, EventId, MemTables, NewDelivery,
};

use super::timeline::{write_kept_delivery, write_state, write_step};
use super::{each_record, open_to_read, OfflineError, Progress};

/// What `replay` follows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Subject {
    Delivery(DeliveryId),
    Event(EventId),
    Endpoint(EndpointId),
}

/// How [`replay`] writes the story.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReplayFormat {
    /// A readable timeline.
    Text,
    /// One JSON object a line, for tools.
    Ndjson,
}

/// What [`replay`] tells.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplayOptions {
    /// The data directory of a stopped server.
    pub data_dir: PathBuf,
    pub subject: Subject,
    pub format: ReplayFormat,
}

/// What [`replay`] wrote.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReplayReport {
    /// The records of the story (the policy and rule records, which every story shows, included).
    pub steps: u64,
    /// The state changes of the followed deliveries.
    pub state_changes: u64,
}

/// Writes the story of `options.subject` on `out`.
pub fn replay(
    options: &ReplayOptions,
    out: &mut dyn Write,
    progress: &mut dyn Progress,
) -> Result<ReplayReport, OfflineError> {
    let (store, head) = open_to_read(&options.data_dir, "replaying", progress)?;
    // A compacted log starts from its checkpoint: the story begins with the state kept there.
    let (tables, _) = load_checkpoint(store.as_ref(), head.anchor_seq).map_err(OfflineError::Compact)?;
    let mut story = Story::new(options, out, tables);
    if head.anchor_seq > 0 {
        story.found = story.kept_at_checkpoint(head.anchor_seq)?;
    }
    each_record(store.as_ref(), head.anchor_seq, progress, |r| story.record(r))?;
    progress.end();
    if !story.found {
        return Err(OfflineError::NothingFound(options.subject));
    }
    story.out.flush().map_err(OfflineError::Write)?;
    Ok(story.report)
}

/// A story being told: the projection folded so far and the deliveries followed, with the
/// status each had after the last record.
struct Story<'a> {
    out: &'a mut dyn Write,
    ndjson: bool,
    subject: Subject,
    tables: MemTables,
    followed: BTreeMap<DeliveryId, Option<DeliveryStatus>>,
    /// Whether anything of the subject itself was told.
    found: bool,
    report: ReplayReport,
}

impl<'a> Story<'a> {
    fn new(options: &ReplayOptions, out: &'a mut dyn Write, tables: MemTables) -> Story<'a> {
        let mut followed = BTreeMap::new();
        if let Subject::Delivery(id) = options.subject {
            followed.insert(id, None);
        }
        Story {
            out,
            ndjson: options.format == ReplayFormat::Ndjson,
            subject: options.subject,
            tables,
            followed,
            found: false,
            report: ReplayReport::default(),
        }
    }

    /// The part of the story a compaction kept as state: the subject's deliveries as they stood
    /// at the anchor, each with its attempts. Returns whether the subject is there.
    fn kept_at_checkpoint(&mut self, anchor_seq: u64) -> Result<bool, OfflineError> {
        let deliveries = kept_deliveries(&self.tables, self.subject)?;
        let endpoint_kept = match self.subject {
            Subject::Endpoint(id) => {
                get_endpoint(&self.tables, id).map_err(OfflineError::CheckpointCorrupt)?.is_some()
            }
            _ => false,
        };
        if endpoint_kept && !self.ndjson {
            writeln!(
                self.out,
                "(records through seq {anchor_seq} were compacted; endpoint state kept at the checkpoint)"
            )
            .map_err(OfflineError::Write)?;
        }
        for d in &deliveries {
            write_kept_delivery(self.out, self.ndjson, &self.tables, anchor_seq, d)?;
            self.followed.insert(d.id, Some(d.status));
        }
        Ok(endpoint_kept || !deliveries.is_empty())
    }

    /// Folds one record, and tells it if it is part of the story, then the state changes of the
    /// followed deliveries, whatever record caused them.
    fn record(&mut self, r: &Record) -> Result<(), OfflineError> {
        let event = decode(&r.body).map_err(|error| OfflineError::Decode { seq: r.seq, error })?;
        apply(&mut self.tables, r.seq, r.at_ms, &event)
            .map_err(|error| OfflineError::Fold { seq: r.seq, error })?;
        if self.relevant(&event) {
            self.found |= !matches!(event, Event::PolicySet(_) | Event::RulesAdopted { .. });
            write_step(self.out, self.ndjson, r, &event)?;
            self.report.steps += 1;
        }
        for (id, seen) in self.followed.iter_mut() {
            let now = get_delivery(&self.tables, *id).ok().flatten().map(|d| d.status);
            if now.is_some() && now != *seen {
                if let Some(status) = now {
                    write_state(self.out, self.ndjson, r, *id, *seen, status)?;
                    self.report.state_changes += 1;
                }
                *seen = now;
            }
        }
        Ok(())
    }

    /// Whether `event` is part of the story; the deliveries it creates for the subject are
    /// followed from here on.
    fn relevant(&mut self, event: &Event) -> bool {
        let subject = self.subject;
        match event {
            Event::DeliveryCreated { id, event_id, endpoint_id, .. } => {
                let take = match subject {
                    Subject::Delivery(d) => *id == d,
                    Subject::Event(e) => *event_id == e,
                    Subject::Endpoint(e) => *endpoint_id == Some(e),
                };
                if take {
                    self.followed.entry(*id).or_insert(None);
                }
                take
            }
            Event::EventPublished { id, .. } | Event::OrderingKeySet { event_id: id, .. } => {
                matches!(subject, Subject::Event(e) if *id == e)
            }
            Event::EventPublishedWithDeliveries { id, deliveries, .. } => self.published(*id, deliveries),
            Event::EndpointCreated { id, .. }
            | Event::EndpointUpdated { id, .. }
            | Event::EndpointDeleted { id }
            | Event::EndpointSecretRotated { id, .. }
            | Event::EndpointEnabled { id }
            | Event::EndpointDeliverySettingsSet { id, .. } => {
                matches!(subject, Subject::Endpoint(e) if *id == e)
            }
            Event::AttemptRecorded { delivery_id, .. }
            | Event::RetriggerRequested { delivery_id, .. }
            | Event::RedeliverRequested { delivery_id, .. } => self.followed.contains_key(delivery_id),
            Event::PolicySet(_) | Event::RulesAdopted { .. } => true,
            _ => false,
        }
    }

    /// Whether a publish with its deliveries is part of the story: the subject's event, or one
    /// that creates a delivery of the subject (which is followed from here on).
    fn published(&mut self, id: EventId, deliveries: &[NewDelivery]) -> bool {
        let mut take = matches!(self.subject, Subject::Event(e) if id == e);
        for d in deliveries {
            let its = match self.subject {
                Subject::Delivery(x) => d.id == x,
                Subject::Event(e) => id == e,
                Subject::Endpoint(e) => d.endpoint_id == Some(e),
            };
            if its {
                self.followed.entry(d.id).or_insert(None);
                take = true;
            }
        }
        take
    }
}

/// The subject's deliveries as the checkpoint kept them.
fn kept_deliveries(tables: &MemTables, subject: Subject) -> Result<Vec<Delivery>, OfflineError> {
    let corrupt = OfflineError::CheckpointCorrupt;
    let mut out = Vec::new();
    match subject {
        Subject::Delivery(id) => out.extend(get_delivery(tables, id).map_err(corrupt)?),
        Subject::Event(id) => {
            if let Some(event) = get_event(tables, id).map_err(corrupt)? {
                for d in event.delivery_ids {
                    out.extend(get_delivery(tables, d).map_err(corrupt)?);
                }
            }
        }
        Subject::Endpoint(id) => {
            let all = tables.iter().filter(|(k, _)| k.first() == Some(&herald_projector::keys::KS_DELIVERY));
            for (key, _) in all {
                let id_bytes = <[u8; 16]>::try_from(&key[1..]).map_err(|_| OfflineError::BadDeliveryKey)?;
                let delivery =
                    get_delivery(tables, DeliveryId(uuid::Uuid::from_bytes(id_bytes))).map_err(corrupt)?;
                out.extend(delivery.filter(|d| d.endpoint_id == Some(id)));
            }
        }
    }
    Ok(out)
}
