//! `replay`: the story of a delivery, an event (with its deliveries) or an endpoint (with its
//! deliveries), in log order, folded as it goes so each state change is shown.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;

use herald_log::Record;
use herald_projector::compact::load_checkpoint;
use herald_projector::{
    apply, decode, get_delivery, get_endpoint, get_event, Delivery, DeliveryId, DeliveryStatus, EndpointId,
    Event, EventId, MemTables, NewDelivery, ReadTables,
};

use super::replay_index::replay_by_index;
use super::timeline::{write_kept_delivery, write_state, write_step};
use super::{each_record, open_to_read, OfflineError, Progress};

/// What `replay` follows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Subject {
    Delivery(DeliveryId),
    Event(EventId),
    Endpoint(EndpointId),
    /// A bulk recover: its records, then the story of each delivery it re-queued from there on.
    Recovery(herald_projector::RecoveryId),
}

/// How [`replay`] writes the story.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReplayFormat {
    /// A readable timeline.
    Text,
    /// One JSON object a line, for tools.
    Ndjson,
}

/// How [`replay`] finds the records of the story.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ReplayRead {
    /// By the record refs the projection keeps (rules 4 on): only the subject's records are
    /// read, by seq, each checked against the one before it. Where the refs do not reach back
    /// to the kept log's start, the whole log is scanned instead ([`ReplayReport::scanned`]).
    #[default]
    Index,
    /// The whole log, folded as it goes: the cross-check of the index.
    Scan,
}

/// What [`replay`] tells.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplayOptions {
    /// The data directory of a stopped server.
    pub data_dir: PathBuf,
    pub subject: Subject,
    pub format: ReplayFormat,
    pub read: ReplayRead,
}

/// Why a replay by index scanned the log instead.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScanReason {
    /// The store never adopted rules 4: it keeps no record refs.
    NoRefs,
    /// The refs start at this seq (rules 4 were adopted there), after the kept log's first record.
    RefsFrom(u64),
}

impl std::fmt::Display for ScanReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ScanReason::NoRefs => write!(f, "this store keeps no record index (its fold rules are older than 4)"),
            ScanReason::RefsFrom(seq) => write!(
                f,
                "the record index starts at seq {seq}, where fold rules 4 were adopted, and the log holds older records"
            ),
        }
    }
}

/// What [`replay`] wrote.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReplayReport {
    /// The records of the story (the policy and rule records, which every story shows, included).
    pub steps: u64,
    /// The state changes of the followed deliveries.
    pub state_changes: u64,
    /// The records read from the log.
    pub records_read: u64,
    /// Set when a replay by index scanned the whole log instead, and why.
    pub scanned: Option<ScanReason>,
}

/// Writes the story of `options.subject` on `out`.
pub fn replay(
    options: &ReplayOptions,
    out: &mut dyn Write,
    progress: &mut dyn Progress,
) -> Result<ReplayReport, OfflineError> {
    let mut scanned = None;
    if options.read == ReplayRead::Index {
        let store = super::open_existing(&options.data_dir)?;
        let head = herald_log::read_head(store.as_ref()).map_err(OfflineError::Log)?;
        let mut story = Story::new(options, &mut *out, MemTables::new());
        match replay_by_index(store.as_ref(), &head, &mut story, progress)? {
            None => return story.end(),
            Some(reason) => scanned = Some(reason),
        }
    }
    let (store, head) = open_to_read(&options.data_dir, "replaying", progress)?;
    // A compacted log starts from its checkpoint: the story begins with the state kept there.
    let (tables, _) = load_checkpoint(store.as_ref(), head.anchor_seq).map_err(OfflineError::Compact)?;
    let mut story = Story::new(options, out, tables);
    story.report.scanned = scanned;
    if head.anchor_seq > 0 {
        let deliveries = kept_deliveries(&story.tables, story.subject)?;
        let endpoint_kept = match story.subject {
            Subject::Endpoint(id) => {
                get_endpoint(&story.tables, id).map_err(OfflineError::CheckpointCorrupt)?.is_some()
            }
            _ => false,
        };
        let tables = std::mem::take(&mut story.tables);
        story.found = story.kept_at_checkpoint(&tables, &deliveries, endpoint_kept, head.anchor_seq)?;
        story.tables = tables;
    }
    each_record(store.as_ref(), head.anchor_seq, progress, |r| story.record(r))?;
    progress.end();
    story.end()
}

/// A story being told: the projection folded so far (by a scan; a replay by index folds
/// nothing) and the deliveries followed, with the status each had after the last record.
pub(super) struct Story<'a> {
    out: &'a mut dyn Write,
    ndjson: bool,
    pub(super) subject: Subject,
    tables: MemTables,
    pub(super) followed: BTreeMap<DeliveryId, Option<DeliveryStatus>>,
    /// Whether anything of the subject itself was told.
    pub(super) found: bool,
    pub(super) report: ReplayReport,
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

    /// The story told, or that nothing of the subject was found.
    fn end(self) -> Result<ReplayReport, OfflineError> {
        if !self.found {
            return Err(OfflineError::NothingFound(self.subject));
        }
        self.out.flush().map_err(OfflineError::Write)?;
        Ok(self.report)
    }

    /// The part of the story a compaction kept as state (`checkpoint`): the subject's
    /// `deliveries` as they stood at the anchor, each with its attempts, and whether the
    /// endpoint subject is kept. Returns whether the subject is there.
    pub(super) fn kept_at_checkpoint(
        &mut self,
        checkpoint: &impl ReadTables,
        deliveries: &[Delivery],
        endpoint_kept: bool,
        anchor_seq: u64,
    ) -> Result<bool, OfflineError> {
        if endpoint_kept && !self.ndjson {
            writeln!(
                self.out,
                "(records through seq {anchor_seq} were compacted; endpoint state kept at the checkpoint)"
            )
            .map_err(OfflineError::Write)?;
        }
        for d in deliveries {
            write_kept_delivery(self.out, self.ndjson, checkpoint, anchor_seq, d)?;
            self.followed.insert(d.id, Some(d.status));
        }
        Ok(endpoint_kept || !deliveries.is_empty())
    }

    /// Folds one record, and tells it (see [`Story::tell`]).
    fn record(&mut self, r: &Record) -> Result<(), OfflineError> {
        let event = decode(&r.body).map_err(|error| OfflineError::Decode { seq: r.seq, error })?;
        apply(&mut self.tables, r.seq, r.at_ms, &event)
            .map_err(|error| OfflineError::Fold { seq: r.seq, error })?;
        self.report.records_read += 1;
        self.tell(r, &event, &|tables, id| get_delivery(tables, id).ok().flatten().map(|d| d.status))
    }

    /// Tells record `r` (whose event is `event`) if it is part of the story, then the state
    /// changes of the followed deliveries, whatever record caused them: `status` is a followed
    /// delivery's status after `r` (read from the folded tables, or from the record refs).
    pub(super) fn tell(
        &mut self,
        r: &Record,
        event: &Event,
        status: &dyn Fn(&MemTables, DeliveryId) -> Option<DeliveryStatus>,
    ) -> Result<(), OfflineError> {
        if self.relevant(event) {
            self.found |= !matches!(event, Event::PolicySet(_) | Event::RulesAdopted { .. });
            write_step(self.out, self.ndjson, r, event)?;
            self.report.steps += 1;
        }
        for (id, seen) in self.followed.iter_mut() {
            let now = status(&self.tables, *id);
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
                    Subject::Recovery(_) => false,
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
            Event::RecoveryRequested { id, delivery_ids, .. }
            | Event::RecoveryDeliveries { recovery_id: id, delivery_ids } => {
                self.recovered(*id, delivery_ids)
            }
            _ => false,
        }
    }

    /// Whether a recovery record is part of the story: the subject's recovery (whose deliveries
    /// are followed from here on), or one that re-queues a delivery already followed.
    fn recovered(&mut self, id: herald_projector::RecoveryId, delivery_ids: &[DeliveryId]) -> bool {
        if self.subject == Subject::Recovery(id) {
            for d in delivery_ids {
                self.followed.entry(*d).or_insert(None);
            }
            return true;
        }
        delivery_ids.iter().any(|d| self.followed.contains_key(d))
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
                Subject::Recovery(_) => false,
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
        Subject::Recovery(id) => {
            for chunk in 0u32.. {
                let members = herald_projector::recovery_members(tables, id, chunk).map_err(corrupt)?;
                if members.is_empty() {
                    break;
                }
                for d in members {
                    out.extend(get_delivery(tables, d).map_err(corrupt)?);
                }
            }
        }
    }
    Ok(out)
}
