//! Replay by index against the scan: on random histories (some compacted), the story of every
//! delivery, event, endpoint and recovery read through the record refs is the scan's, line for
//! line.

use std::path::Path;
use std::sync::Arc;

use herald_log::{Durability, Log, LogConfig, SledStore, Store};
use herald_projector::{
    apply, encode, get_delivery, AttemptOutcome, DeliveryId, DeliveryStatus, EndpointId, Event, EventId,
    MemTables, NewDelivery, OrgId, Policy, RecordActor, RecoveryFilter, RecoveryId, Trigger, RULES_CURRENT,
};
use proptest::prelude::*;
use uuid::Uuid;

use super::import::Importer;
use super::*;

const T0: u64 = 1_773_568_800_000;
const HOUR_MS: u64 = 3_600_000;
const ORG: OrgId = OrgId(Uuid::from_u128(0x0190_0000_0000_7000_8000_0000_0000_00a1));

fn endpoint_id(n: u32) -> EndpointId {
    EndpointId(Uuid::from_u128(0x0190_0000_0000_7000_8000_0001_0000_0000 | u128::from(n)))
}
fn event_id(n: u32) -> EventId {
    EventId(Uuid::from_u128(0x0190_0000_0000_7000_8000_0002_0000_0000 | u128::from(n)))
}
fn delivery_id(n: u32) -> DeliveryId {
    DeliveryId(Uuid::from_u128(0x0190_0000_0000_7000_8000_0003_0000_0000 | u128::from(n)))
}
fn recovery_id(n: u32) -> RecoveryId {
    RecoveryId(Uuid::from_u128(0x0190_0000_0000_7000_8000_0004_0000_0000 | u128::from(n)))
}

#[derive(Clone, Debug)]
enum Op {
    Endpoint,
    /// An event to the endpoints whose bit is set, in one record or with a record per delivery.
    Publish {
        mask: u8,
        merged: bool,
    },
    /// 0 succeeds, 1 fails with a retry, 2 fails with none.
    Attempt {
        delivery: u16,
        outcome: u8,
    },
    Retrigger(u16),
    Delete(u8),
    Enable(u8),
    Update(u8),
    Policy(u32),
    Advance(u64),
    /// A bulk recover of up to 4 deliveries that are delivered, exhausted or inactive (from the
    /// `pick`th on), `per_record` ids a record; `interleave`: before each later record, the
    /// first delivery it names is retriggered and fails for good (two records that touch it
    /// after the recovery began, before it is re-queued).
    Recover {
        pick: u16,
        per_record: u8,
        interleave: bool,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        1 => Just(Op::Endpoint),
        3 => (any::<u8>(), any::<bool>()).prop_map(|(mask, merged)| Op::Publish { mask, merged }),
        8 => (any::<u16>(), 0u8..3).prop_map(|(delivery, outcome)| Op::Attempt { delivery, outcome }),
        2 => any::<u16>().prop_map(Op::Retrigger),
        1 => (0u8..12).prop_map(Op::Delete),
        1 => any::<u8>().prop_map(Op::Enable),
        1 => any::<u8>().prop_map(Op::Update),
        1 => (1u32..4).prop_map(Op::Policy),
        3 => (0u64..12 * HOUR_MS).prop_map(Op::Advance),
        2 => (any::<u16>(), 1u8..4, any::<bool>())
            .prop_map(|(pick, per_record, interleave)| Op::Recover { pick, per_record, interleave }),
    ]
}

/// Turns ops into the events the fold accepts, in order, each with its time.
struct History {
    tables: MemTables,
    events: Vec<(u64, Event)>,
    now_ms: u64,
    endpoints: u32,
    published: u32,
    deliveries: u32,
    recoveries: u32,
}

impl History {
    fn new(rules_first: bool) -> History {
        let mut h = History {
            tables: MemTables::new(),
            events: Vec::new(),
            now_ms: T0,
            endpoints: 0,
            published: 0,
            deliveries: 0,
            recoveries: 0,
        };
        if rules_first {
            h.offer(Event::RulesAdopted { version: RULES_CURRENT });
        }
        h
    }

    fn offer(&mut self, event: Event) -> bool {
        let seq = self.events.len() as u64 + 1;
        let ok = apply(&mut self.tables, seq, self.now_ms, &event).is_ok();
        if ok {
            self.events.push((self.now_ms, event));
        }
        ok
    }

    fn endpoint(&self, n: u8) -> EndpointId {
        endpoint_id(u32::from(n) % self.endpoints.max(1) + 1)
    }

    fn delivery(&self, n: u16) -> DeliveryId {
        delivery_id(u32::from(n) % self.deliveries.max(1) + 1)
    }

    fn run(&mut self, op: &Op) {
        match *op {
            Op::Endpoint => {
                self.endpoints += 1;
                let n = self.endpoints;
                self.offer(Event::EndpointCreated {
                    id: endpoint_id(n),
                    org_id: ORG,
                    url: format!("https://e{n}.example"),
                    name: format!("e{n}"),
                    enabled_events: vec!["*".into()],
                    secret: format!("whsec_{n}"),
                });
            }
            Op::Publish { mask, merged } => self.publish(mask, merged),
            Op::Attempt { delivery, outcome } => self.attempt(self.delivery(delivery), outcome),
            Op::Retrigger(n) => {
                let delivery_id = self.delivery(n);
                self.offer(Event::RetriggerRequested { delivery_id, by_key: None, request_id: Uuid::nil() });
            }
            Op::Delete(n) if n == 0 => {
                self.offer(Event::EndpointDeleted { id: self.endpoint(n) });
            }
            Op::Delete(_) => {}
            Op::Enable(n) => {
                self.offer(Event::EndpointEnabled { id: self.endpoint(n) });
            }
            Op::Update(n) => {
                let url = Some(format!("https://u{}.example", self.events.len()));
                self.offer(Event::EndpointUpdated {
                    id: self.endpoint(n),
                    url,
                    name: None,
                    enabled_events: None,
                });
            }
            Op::Policy(failures_max) => {
                self.offer(Event::PolicySet(Policy { failures_max, ..Policy::default() }));
            }
            Op::Advance(ms) => self.now_ms += ms,
            Op::Recover { pick, per_record, interleave } => self.recover(pick, per_record, interleave),
        }
    }

    fn recover(&mut self, pick: u16, per_record: u8, interleave: bool) {
        let recoverable = [DeliveryStatus::Delivered, DeliveryStatus::Exhausted, DeliveryStatus::Inactive];
        let n = self.deliveries.max(1);
        let mut ids = Vec::new();
        for k in 0..self.deliveries {
            let id = delivery_id((u32::from(pick) + k) % n + 1);
            let status = get_delivery(&self.tables, id).ok().flatten().map(|d| d.status);
            if status.is_some_and(|s| recoverable.contains(&s)) && ids.len() < 4 {
                ids.push(id);
            }
        }
        let mut chunks = ids.chunks(usize::from(per_record.max(1)));
        let id = recovery_id(self.recoveries + 1);
        let filter = RecoveryFilter {
            statuses: recoverable.to_vec(),
            endpoint_id: None,
            event_type: None,
            created_after_ms: None,
            created_before_ms: None,
            max: 100,
        };
        let delivery_ids = chunks.next().map(<[DeliveryId]>::to_vec).unwrap_or_default();
        if !self.offer(Event::RecoveryRequested { id, org_id: ORG, filter, by_key: None, delivery_ids }) {
            return;
        }
        self.recoveries += 1;
        for chunk in chunks {
            if interleave {
                self.offer(Event::RetriggerRequested {
                    delivery_id: chunk[0],
                    by_key: None,
                    request_id: Uuid::nil(),
                });
                self.attempt(chunk[0], 2);
            }
            self.offer(Event::RecoveryDeliveries { recovery_id: id, delivery_ids: chunk.to_vec() });
        }
    }

    fn publish(&mut self, mask: u8, merged: bool) {
        self.published += 1;
        let id = event_id(self.published);
        let deliveries: Vec<NewDelivery> = (1..=self.endpoints.min(8))
            .filter(|e| mask & (1 << (e - 1)) != 0)
            .enumerate()
            .map(|(i, e)| NewDelivery {
                id: delivery_id(self.deliveries + 1 + i as u32),
                endpoint_id: Some(endpoint_id(e)),
                url: "https://x.example".into(),
                next_attempt_at_ms: self.now_ms,
            })
            .collect();
        let published = Event::EventPublished {
            id,
            org_id: ORG,
            event_type: "a.b".into(),
            payload: b"{}".to_vec(),
            call_id: None,
            idempotency_key: None,
        };
        if merged {
            let count = deliveries.len() as u32;
            let Event::EventPublished { id, org_id, event_type, payload, call_id, idempotency_key } =
                published
            else {
                return;
            };
            let event = Event::EventPublishedWithDeliveries {
                id,
                org_id,
                event_type,
                payload,
                call_id,
                idempotency_key,
                deliveries,
            };
            if self.offer(event) {
                self.deliveries += count;
            }
            return;
        }
        let event = published;
        if !self.offer(event) {
            return;
        }
        for d in deliveries {
            let created = self.offer(Event::DeliveryCreated {
                id: d.id,
                event_id: id,
                org_id: ORG,
                endpoint_id: d.endpoint_id,
                url: d.url,
                next_attempt_at_ms: d.next_attempt_at_ms,
            });
            self.deliveries += u32::from(created);
        }
    }

    fn attempt(&mut self, id: DeliveryId, outcome: u8) {
        let Ok(Some(d)) = get_delivery(&self.tables, id) else { return };
        if d.status != DeliveryStatus::Pending {
            return;
        }
        let (outcome, retry_at_ms) = match outcome {
            0 => (AttemptOutcome::Delivered { status: 200 }, None),
            1 => (
                AttemptOutcome::Failed { status: Some(500), error: "HTTP 500".into() },
                Some(self.now_ms + 5_000),
            ),
            _ => (AttemptOutcome::Failed { status: None, error: "timeout".into() }, None),
        };
        self.offer(Event::AttemptRecorded {
            delivery_id: id,
            attempt: d.attempt_count + 1,
            trigger: Trigger::Auto,
            started_at_ms: self.now_ms,
            finished_at_ms: self.now_ms + 3,
            outcome,
            response_excerpt: Vec::new(),
            retry_at_ms,
        });
    }
}

/// Writes `events` as a log, through the import machine, into `dir`.
fn write_log(dir: &Path, events: &[(u64, Event)]) {
    let store = Arc::new(SledStore::open(dir, 8 << 20).unwrap());
    let log = Log::open(store.clone(), Importer, LogConfig::default()).unwrap();
    for chunk in events.chunks(40) {
        let records =
            chunk.iter().map(|(at_ms, event)| (*at_ms, encode(RecordActor::System, event))).collect();
        log.submit(records).unwrap().unwrap();
    }
    log.close();
    drop(log);
    store.flush(Durability::Sync).unwrap();
}

fn story(
    dir: &Path,
    subject: Subject,
    format: ReplayFormat,
    read: ReplayRead,
) -> Result<(String, ReplayReport), String> {
    let mut out = Vec::new();
    let options = ReplayOptions { data_dir: dir.to_owned(), subject, format, read };
    let report = replay(&options, &mut out, &mut Silent).map_err(|e| e.to_string())?;
    Ok((String::from_utf8(out).unwrap(), report))
}

/// Every subject's story, by index and by scan: the same lines (or the same error).
fn same_stories(dir: &Path, h: &History) {
    let subjects = (1..=h.deliveries)
        .map(|n| Subject::Delivery(delivery_id(n)))
        .chain((1..=h.published).map(|n| Subject::Event(event_id(n))))
        .chain((1..=h.endpoints).map(|n| Subject::Endpoint(endpoint_id(n))))
        .chain((1..=h.recoveries + 1).map(|n| Subject::Recovery(recovery_id(n))));
    for subject in subjects {
        for format in [ReplayFormat::Text, ReplayFormat::Ndjson] {
            let by_index = story(dir, subject, format, ReplayRead::Index);
            let by_scan = story(dir, subject, format, ReplayRead::Scan);
            match (by_index, by_scan) {
                (Ok((index, report)), Ok((scan, _))) => {
                    assert_eq!(index, scan, "{subject:?} {format:?}");
                    assert_eq!(report.scanned, None, "{subject:?}: the refs reach back to the start");
                }
                (index, scan) => assert_eq!(index.err(), scan.err(), "{subject:?}"),
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn replay_by_index_tells_what_the_scan_tells(
        ops in proptest::collection::vec(op(), 1..60),
        compact_after_hours in proptest::option::of(1u64..200),
    ) {
        let mut h = History::new(true);
        for _ in 0..2 {
            h.run(&Op::Endpoint);
        }
        for op in &ops {
            h.run(op);
        }
        let dir = tempfile::tempdir().unwrap();
        write_log(dir.path(), &h.events);
        if let Some(hours) = compact_after_hours {
            let retain = std::time::Duration::from_millis(HOUR_MS);
            let options = CompactOptions { data_dir: dir.path().to_owned(), retain, now_ms: T0 + hours * HOUR_MS };
            compact(&options, &mut Silent).unwrap();
            verify(&VerifyOptions::new(dir.path()), &mut Silent).unwrap();
        }
        same_stories(dir.path(), &h);
    }
}

#[test]
fn a_store_whose_refs_start_late_is_read_by_a_scan_and_says_so() {
    let mut h = History::new(false);
    h.run(&Op::Endpoint);
    h.run(&Op::Publish { mask: 1, merged: true });
    h.offer(Event::RulesAdopted { version: RULES_CURRENT });
    h.run(&Op::Attempt { delivery: 0, outcome: 0 });
    let dir = tempfile::tempdir().unwrap();
    write_log(dir.path(), &h.events);
    let subject = Subject::Delivery(delivery_id(1));
    let (index, report) = story(dir.path(), subject, ReplayFormat::Text, ReplayRead::Index).unwrap();
    let (scan, _) = story(dir.path(), subject, ReplayFormat::Text, ReplayRead::Scan).unwrap();
    assert_eq!(index, scan);
    assert_eq!(report.scanned, Some(ScanReason::RefsFrom(3)));
    assert!(ScanReason::RefsFrom(3).to_string().contains("starts at seq 3"));
}

#[test]
fn a_damaged_record_of_the_story_is_named_by_its_seq() {
    let mut h = History::new(true);
    h.run(&Op::Endpoint);
    h.run(&Op::Publish { mask: 1, merged: true });
    h.run(&Op::Attempt { delivery: 0, outcome: 1 });
    h.run(&Op::Attempt { delivery: 0, outcome: 0 });
    let dir = tempfile::tempdir().unwrap();
    // Each record alone under its own key (no groups), so a byte of its body can be changed.
    write_log(dir.path(), &h.events);
    let store = SledStore::open(dir.path(), 8 << 20).unwrap();
    let key = herald_log::record::head_key(4);
    let mut value = store.get(&key).unwrap().expect("record 4 under its own key");
    let last = value.len() - 1;
    value[last] ^= 0x40;
    let mut batch = herald_log::WriteBatch::default();
    batch.put(key, value);
    store.apply(&batch).unwrap();
    store.flush(Durability::Sync).unwrap();
    drop(store);
    let subject = Subject::Delivery(delivery_id(1));
    let mut out = Vec::new();
    let options = ReplayOptions {
        data_dir: dir.path().to_owned(),
        subject,
        format: ReplayFormat::Text,
        read: ReplayRead::Index,
    };
    let error = replay(&options, &mut out, &mut Silent).unwrap_err();
    assert!(
        matches!(&error, OfflineError::StoryDamaged(c) if c.seq == 4 && c.kind == herald_log::CorruptKind::ChecksumMismatch),
        "{error:?}"
    );
    assert!(
        error.to_string().contains("damaged at seq 4, a record of this story: record 4: checksum mismatch"),
        "{error}"
    );
}
