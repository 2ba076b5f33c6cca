//! Random histories: whatever valid-ish sequence of events the engine could append, the fold
//! keeps its indexes consistent, rejects without writing, and gives byte-identical tables
//! whether applied event by event, in batches, across restarts, or twice.

use crate::testkit::{assert_consistent, dl, ep, ev, org};
use crate::{
    apply, decode_recorded, encode, encode_v1, get_delivery, ApiKeyId, AttemptOutcome, DeliveryOrder,
    DeliverySettings, Event, MemTables, Policy, RecordActor, TableBatch,
};
use proptest::prelude::*;
use uuid::Uuid;

#[derive(Clone, Debug)]
enum Op {
    CreateEndpoint,
    /// An event, delivered to the endpoints whose bit is set, and inline when `inline`.
    Publish {
        endpoints_mask: u8,
        inline: bool,
        /// One `EventPublishedWithDeliveries` record instead of an `EventPublished` and one
        /// `DeliveryCreated` per delivery.
        merged: bool,
    },
    /// An attempt of a delivery: 0 succeeds, 1 fails with a retry, 2 fails with none.
    Attempt {
        delivery: u16,
        outcome: u8,
    },
    Retrigger(u16),
    Redeliver(u16),
    Enable(u8),
    Delete(u8),
    Rotate(u8),
    /// A new url for an endpoint.
    Update(u8),
    /// New delivery settings for an endpoint (every fourth the default ones).
    Settings(u8),
    /// A `RulesAdopted` of this version (only the next ones up to `RULES_CURRENT` apply).
    Rules(u32),
    /// A partition claim by node `n` (cluster mode's fence; folds under rules 5 on).
    Claim(u8),
    Policy {
        failures_max: u32,
        window_ms: u64,
    },
    Advance {
        ms: u64,
    },
    /// A bulk recover of the failures (and the delivered ones when `delivered`), at most `max`,
    /// its deliveries split over a `RecoveryRequested` and `RecoveryDeliveries` records of
    /// `per_record` ids.
    Recover {
        max: u8,
        delivered: bool,
        per_record: u8,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        1 => Just(Op::CreateEndpoint),
        3 => (any::<u8>(), any::<bool>(), any::<bool>())
            .prop_map(|(endpoints_mask, inline, merged)| Op::Publish { endpoints_mask, inline, merged }),
        8 => (any::<u16>(), 0u8..4).prop_map(|(delivery, outcome)| Op::Attempt { delivery, outcome }),
        2 => any::<u16>().prop_map(Op::Retrigger),
        1 => any::<u16>().prop_map(Op::Redeliver),
        1 => any::<u8>().prop_map(Op::Enable),
        1 => (0u8..40).prop_map(Op::Delete), // mostly misses: deletes are rare
        1 => any::<u8>().prop_map(Op::Rotate),
        1 => any::<u8>().prop_map(Op::Update),
        1 => any::<u8>().prop_map(Op::Settings),
        1 => (0u32..6).prop_map(Op::Rules),
        1 => any::<u8>().prop_map(Op::Claim),
        1 => (1u32..6, 1u64..30 * 3_600_000)
            .prop_map(|(failures_max, window_ms)| Op::Policy { failures_max, window_ms }),
        3 => (0u64..8 * 3_600_000).prop_map(|ms| Op::Advance { ms }),
        1 => (any::<u8>(), any::<bool>(), 1u8..4)
            .prop_map(|(max, delivered, per_record)| Op::Recover { max, delivered, per_record }),
    ]
}

/// Turns ops into events against the current projection, applies each, and keeps the ones
/// accepted (with their `at_ms`). A rejected event must leave the tables untouched.
struct Driver {
    tables: MemTables,
    accepted: Vec<(u64, Event)>,
    now_ms: u64,
    endpoints: u32,
    events: u32,
    deliveries: u32,
}

impl Driver {
    fn new() -> Self {
        Driver {
            tables: MemTables::new(),
            accepted: Vec::new(),
            now_ms: 1_000,
            endpoints: 0,
            events: 0,
            deliveries: 0,
        }
    }

    fn offer(&mut self, event: Event) -> bool {
        let seq = self.accepted.len() as u64 + 1;
        let before = self.tables.clone();
        match apply(&mut self.tables, seq, self.now_ms, &event) {
            Ok(()) => {
                self.accepted.push((self.now_ms, event));
                true
            }
            Err(_) => {
                assert_eq!(self.tables, before, "a rejected {} wrote", event.kind());
                false
            }
        }
    }

    fn endpoint(&self, n: u8) -> u32 {
        u32::from(n) % self.endpoints.max(1) + 1
    }

    fn delivery(&self, n: u16) -> u32 {
        // one in eight misses on purpose
        u32::from(n) % (self.deliveries + self.deliveries / 8 + 1) + 1
    }

    fn run(&mut self, op: &Op) {
        match *op {
            Op::CreateEndpoint => self.create_endpoint(),
            Op::Publish { endpoints_mask, inline, merged } => self.publish(endpoints_mask, inline, merged),
            Op::Attempt { delivery, outcome } => self.attempt(delivery, outcome),
            Op::Retrigger(n) => {
                self.offer(Event::RetriggerRequested {
                    delivery_id: dl(self.delivery(n)),
                    by_key: None,
                    request_id: Uuid::from_u128(u128::from(n)),
                });
            }
            Op::Redeliver(n) => {
                self.offer(Event::RedeliverRequested { delivery_id: dl(self.delivery(n)), by_key: None });
            }
            Op::Enable(n) => {
                self.offer(Event::EndpointEnabled { id: ep(self.endpoint(n)) });
            }
            Op::Delete(n) => {
                if n == 0 {
                    self.offer(Event::EndpointDeleted { id: ep(self.endpoint(n)) });
                }
            }
            Op::Rotate(n) => {
                self.offer(Event::EndpointSecretRotated {
                    id: ep(self.endpoint(n)),
                    secret: format!("whsec_r{}", self.accepted.len()),
                    previous_expires_at_ms: self.now_ms + 3_600_000,
                });
            }
            Op::Update(n) => {
                self.offer(Event::EndpointUpdated {
                    id: ep(self.endpoint(n)),
                    url: Some(format!("https://u{}.example", self.accepted.len())),
                    name: None,
                    enabled_events: None,
                });
            }
            Op::Settings(n) => {
                let settings = if n % 4 == 0 {
                    DeliverySettings::default()
                } else {
                    DeliverySettings {
                        rate_limit_per_s: Some(u32::from(n) + 1),
                        max_in_flight: (n % 2 == 0).then_some(u32::from(n % 8) + 1),
                        ordering: if n % 3 == 0 { DeliveryOrder::PerKey } else { DeliveryOrder::Unordered },
                        headers: vec![("x-n".into(), n.to_string())],
                    }
                };
                self.offer(Event::EndpointDeliverySettingsSet { id: ep(self.endpoint(n)), settings });
            }
            Op::Rules(version) => {
                self.offer(Event::RulesAdopted { version });
            }
            Op::Claim(n) => {
                self.offer(Event::PartitionClaimed { node_id: format!("n{}", n % 4), epoch: u64::from(n) });
            }
            Op::Policy { failures_max, window_ms } => {
                self.offer(Event::PolicySet(Policy {
                    failures_max,
                    failure_window_ms: window_ms,
                    ..Policy::default()
                }));
            }
            Op::Advance { ms } => self.now_ms += ms,
            Op::Recover { max, delivered, per_record } => self.recover(max, delivered, per_record),
        }
    }

    /// Selects as the engine does, then records the recovery in records of `per_record` ids.
    fn recover(&mut self, max: u8, delivered: bool, per_record: u8) {
        use crate::DeliveryStatus::{Delivered, Exhausted, Inactive};
        let mut statuses = vec![Exhausted, Inactive];
        if delivered {
            statuses.push(Delivered);
        }
        let filter = crate::RecoveryFilter {
            statuses,
            endpoint_id: None,
            event_type: (max % 3 == 0).then(|| "a.*".to_owned()),
            created_after_ms: None,
            created_before_ms: None,
            max: u32::from(max),
        };
        let selection = crate::select_recovery(&self.tables, org(1), &filter).expect("select");
        let id = crate::RecoveryId(Uuid::from_u128(1_000_000 + self.accepted.len() as u128));
        let mut chunks = selection.delivery_ids.chunks(usize::from(per_record));
        let first = chunks.next().unwrap_or_default().to_vec();
        let requested =
            Event::RecoveryRequested { id, org_id: org(1), filter, by_key: None, delivery_ids: first };
        if self.offer(requested) {
            for chunk in chunks {
                let more = Event::RecoveryDeliveries { recovery_id: id, delivery_ids: chunk.to_vec() };
                assert!(self.offer(more), "the rest of a recovery folds");
            }
        }
    }

    fn create_endpoint(&mut self) {
        self.endpoints += 1;
        let n = self.endpoints;
        self.offer(Event::EndpointCreated {
            id: ep(n),
            org_id: org(1),
            url: format!("https://e{n}.example"),
            name: format!("e{n}"),
            enabled_events: vec!["*".into()],
            secret: format!("whsec_{n}"),
        });
    }

    fn publish(&mut self, endpoints_mask: u8, inline: bool, merged: bool) {
        self.events += 1;
        let v = self.events;
        let event = Event::EventPublished {
            id: ev(v),
            org_id: org(1),
            event_type: ["a.b", "c.d"][v as usize % 2].into(),
            payload: v.to_be_bytes().to_vec(),
            // Call ids repeat, so several events share a key.
            call_id: (v % 3 == 0).then(|| Uuid::from_u128(u128::from(v % 9))),
            idempotency_key: (v % 4 == 0).then(|| format!("key{}", v % 8)),
        };
        let targets: Vec<Option<u32>> = (1..=self.endpoints.min(8))
            .filter(|e| endpoints_mask & (1 << (e - 1)) != 0)
            .map(Some)
            .chain(inline.then_some(None))
            .collect();
        let call_id = matches!(&event, Event::EventPublished { call_id: Some(_), .. });
        if merged {
            self.publish_merged(event, &targets);
        } else {
            self.publish_separately(v, event, targets.clone());
        }
        self.order(v, call_id, &targets);
    }

    /// What the engine writes after a publish that created deliveries: its `OrderingKeySet`
    /// when it gave a key, or has a call id and goes to a `per_key` endpoint.
    fn order(&mut self, v: u32, call_id: bool, targets: &[Option<u32>]) {
        let event = crate::get_event(&self.tables, ev(v)).expect("decodes");
        if event.is_none_or(|e| e.delivery_ids.is_empty()) {
            return;
        }
        let ordering_key = (v % 5 < 2).then(|| format!("k{}", v % 3));
        let per_key = targets.iter().flatten().any(|e| {
            crate::get_endpoint_settings(&self.tables, ep(*e)).expect("decodes").ordering
                == DeliveryOrder::PerKey
        });
        if ordering_key.is_some() || (call_id && per_key) {
            self.offer(Event::OrderingKeySet { event_id: ev(v), ordering_key });
        }
    }

    /// One `EventPublishedWithDeliveries` record.
    fn publish_merged(&mut self, event: Event, targets: &[Option<u32>]) {
        let Event::EventPublished { id, org_id, event_type, payload, call_id, idempotency_key } = event
        else {
            unreachable!("built above")
        };
        let deliveries: Vec<crate::NewDelivery> = targets
            .iter()
            .enumerate()
            .map(|(i, endpoint)| crate::NewDelivery {
                id: dl(self.deliveries + 1 + i as u32),
                endpoint_id: endpoint.map(ep),
                url: "https://x.example".into(),
                next_attempt_at_ms: self.now_ms,
            })
            .collect();
        let count = deliveries.len() as u32;
        let merged = Event::EventPublishedWithDeliveries {
            id,
            org_id,
            event_type,
            payload,
            call_id,
            idempotency_key,
            deliveries,
        };
        if self.offer(merged) {
            self.deliveries += count;
        }
    }

    /// An `EventPublished` record (event `v`), then one `DeliveryCreated` per delivery.
    fn publish_separately(&mut self, v: u32, event: Event, targets: Vec<Option<u32>>) {
        if !self.offer(event) {
            return;
        }
        for endpoint in targets {
            let d = self.deliveries + 1;
            let created = self.offer(Event::DeliveryCreated {
                id: dl(d),
                event_id: ev(v),
                org_id: org(1),
                endpoint_id: endpoint.map(ep),
                url: "https://x.example".into(),
                next_attempt_at_ms: self.now_ms,
            });
            if created {
                self.deliveries = d;
            }
        }
    }

    fn attempt(&mut self, delivery: u16, outcome: u8) {
        let id = dl(self.delivery(delivery));
        let found = get_delivery(&self.tables, id).expect("decodes");
        let (attempt, trigger) =
            found.map(|d| (d.attempt_count + 1, d.next_trigger)).unwrap_or((1, crate::Trigger::Auto));
        let (outcome, retry_at_ms) = match outcome {
            0 => (AttemptOutcome::Delivered { status: 200 }, None),
            1 => (
                AttemptOutcome::Failed { status: Some(500), error: "HTTP 500".into() },
                Some(self.now_ms + 5_000),
            ),
            2 => (AttemptOutcome::Failed { status: None, error: "Connection refused".into() }, None),
            // Folds only under rules 3 on (the ops adopt versions 0-4).
            _ => (AttemptOutcome::Interrupted { error: "interrupted".into() }, Some(self.now_ms)),
        };
        self.offer(Event::AttemptRecorded {
            delivery_id: id,
            attempt,
            trigger,
            started_at_ms: self.now_ms,
            finished_at_ms: self.now_ms,
            outcome,
            response_excerpt: vec![b'r'; (attempt % 3) as usize],
            retry_at_ms,
        });
    }
}

/// Applies `events` in batches of the given sizes (cycled), "restarting" between batches:
/// the tables are dumped and read back, as a store would persist them.
fn apply_in_batches(events: &[(u64, Event)], sizes: &[usize]) -> MemTables {
    let mut tables = MemTables::new();
    let mut seq = 0u64;
    let mut rest = events;
    for size in sizes.iter().cycle() {
        if rest.is_empty() {
            break;
        }
        let (chunk, tail) = rest.split_at((*size).clamp(1, rest.len()));
        rest = tail;
        let mut batch = TableBatch::new(&mut tables);
        for (at_ms, event) in chunk {
            seq += 1;
            apply(&mut batch, seq, *at_ms, event).expect("accepted once, accepted again");
        }
        batch.commit();
        tables = MemTables::from_pairs(tables.dump());
    }
    tables
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]

    #[test]
    fn random_histories_fold_the_same_way_every_way(
        ops in proptest::collection::vec(op(), 1..160),
        sizes in proptest::collection::vec(1usize..12, 1..6),
    ) {
        let mut driver = Driver::new();
        driver.run(&Op::CreateEndpoint);
        driver.run(&Op::CreateEndpoint);
        for op in &ops {
            driver.run(op);
        }
        check_every_way(driver, &sizes)?;
    }

    /// Under rules 4, with two of three endpoints `per_key` from the start (and the settings ops
    /// switching them later), the order index is exactly the pending keyed deliveries of
    /// `per_key` endpoints after any history, and rebuilds byte for byte.
    #[test]
    fn ordered_histories_keep_the_order_index_exact(
        ops in proptest::collection::vec(op(), 1..160),
        sizes in proptest::collection::vec(1usize..12, 1..6),
    ) {
        let mut driver = Driver::new();
        driver.run(&Op::Rules(4));
        for e in 1..=3 {
            driver.run(&Op::CreateEndpoint);
            if e < 3 {
                let settings = DeliverySettings { ordering: DeliveryOrder::PerKey, ..DeliverySettings::default() };
                assert!(driver.offer(Event::EndpointDeliverySettingsSet { id: ep(e), settings }));
            }
        }
        for op in &ops {
            driver.run(op);
        }
        check_every_way(driver, &sizes)?;
    }
}

/// The driver's tables are consistent, and folding its accepted events in batches across
/// restarts, or one by one again, gives them byte for byte.
fn check_every_way(driver: Driver, sizes: &[usize]) -> Result<(), TestCaseError> {
    let a = driver.tables;
    assert_consistent(&a);

    let b = apply_in_batches(&driver.accepted, sizes);
    prop_assert_eq!(&b, &a);

    let mut c = MemTables::new();
    for (i, (at_ms, event)) in driver.accepted.iter().enumerate() {
        apply(&mut c, i as u64 + 1, *at_ms, event).expect("deterministic");
    }
    prop_assert_eq!(c.dump(), a.dump());
    prop_assert_eq!(crate::applied_seq(&a).unwrap(), driver.accepted.len() as u64);

    for (_, event) in &driver.accepted {
        let actor = RecordActor::Key(ApiKeyId(Uuid::from_u128(1)));
        prop_assert_eq!(
            decode_recorded(&encode(actor, event)).expect("round trip"),
            (Some(actor), event.clone())
        );
    }
    for (k, _) in a.iter() {
        prop_assert!((crate::keys::KS_FIRST..=crate::keys::KS_LAST).contains(&k[0]));
    }
    Ok(())
}

/// Appends `events` through the log's group commit with the [`crate::Projector`] machine, in
/// commands of the given sizes, all queued at once so the writer batches several together.
fn append_through_log(
    store: std::sync::Arc<dyn herald_log::Store>,
    events: &[(u64, Event)],
    sizes: &[usize],
) {
    use herald_log::{Durability, Log, LogConfig};
    let config = LogConfig { batch_commands_max: 8, queue_commands_max: 4096, durability: Durability::Flush };
    let log = Log::open(store, crate::Projector, config).expect("open log");
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    let mut rest = events;
    let mut commands = 0;
    for size in sizes.iter().cycle() {
        if rest.is_empty() {
            break;
        }
        let (chunk, tail) = rest.split_at((*size).clamp(1, rest.len()));
        rest = tail;
        let done_tx = done_tx.clone();
        log.submit_with(chunk.to_vec(), move |out| {
            let _ = done_tx.send(out.map(|r| r.is_ok()));
        });
        commands += 1;
    }
    for _ in 0..commands {
        assert_eq!(done_rx.recv_timeout(std::time::Duration::from_secs(30)).expect("answered"), Ok(true));
    }
    log.close();
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    /// The live projection, written batch by batch beside the log in sled, equals byte for byte
    /// the projection rebuilt from the log alone, after a restart.
    #[test]
    fn the_live_projection_in_sled_equals_a_rebuild_from_the_log(
        ops in proptest::collection::vec(op(), 1..120),
        sizes in proptest::collection::vec(1usize..6, 1..6),
    ) {
        let mut driver = Driver::new();
        driver.run(&Op::CreateEndpoint);
        for op in &ops {
            driver.run(op);
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let open = || -> std::sync::Arc<dyn herald_log::Store> {
            std::sync::Arc::new(herald_log::SledStore::open(dir.path(), 8 << 20).expect("open sled"))
        };
        append_through_log(open(), &driver.accepted, &sizes);
        let store = open(); // a restart: the projection is read back, not replayed
        let live = crate::stored_projection(store.as_ref()).expect("read projection");
        let rebuilt = crate::rebuild(store.as_ref(), &mut |_| {}).expect("rebuild");
        prop_assert!(live == rebuilt.dump(), "live projection differs from the rebuild");
        prop_assert!(crate::scratch::through_scratch(store.as_ref()) == (live.clone(), live), "through scratch storage");
        prop_assert_eq!(&rebuilt, &driver.tables);
        prop_assert_eq!(herald_log::verify(store.as_ref(), &mut |_| {}).expect("verify").records, driver.accepted.len() as u64);
    }
}

/// Appends events one command at a time, or applies a compaction plan (as the engine does).
/// Its records are written in turn in each format a store may hold (`mixed_formats`).
#[derive(Default)]
struct WithCompaction {
    written: u64,
}

enum Step {
    Events(Vec<(u64, Event)>),
    Compact(u64, Box<crate::compact::Plan>),
}

impl herald_log::Machine for WithCompaction {
    type Command = Step;
    type Reply = ();
    type Rejection = String;

    fn execute(&mut self, step: Step, tx: &mut herald_log::Tx<'_>) -> Result<(), String> {
        let events = match step {
            Step::Events(events) => events,
            Step::Compact(at_ms, plan) => {
                let (event, _) = crate::compact::apply_plan(tx, *plan).map_err(|e| e.to_string())?;
                vec![(at_ms, event)]
            }
        };
        for (at_ms, event) in events {
            self.written += 1;
            let seq = tx.append(at_ms, mixed_formats(self.written, &event)).seq;
            apply(&mut crate::TxTables(tx), seq, at_ms, &event).map_err(|e| e.to_string())?;
        }
        Ok(())
    }
}

/// The `n`th event's bytes in one of the formats a store may hold, in turn: a log written by
/// versions before and after records named their actor, which must fold as one.
fn mixed_formats(n: u64, event: &Event) -> Vec<u8> {
    match n % 3 {
        0 => encode_v1(event),
        1 => encode(RecordActor::System, event),
        _ => encode(RecordActor::Key(ApiKeyId(Uuid::from_u128(n.into()))), event),
    }
}

/// Every delivery row in the store, by id.
fn delivery_rows(store: &dyn herald_log::Store) -> std::collections::BTreeMap<Vec<u8>, crate::Delivery> {
    let t = crate::StoreTables(store);
    crate::ReadTables::scan(&t, &[crate::keys::KS_DELIVERY], &[crate::keys::KS_DELIVERY + 1], usize::MAX)
        .into_iter()
        .map(|(k, v)| (k, crate::codec::from_bytes(&v).expect("a delivery row")))
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    /// Random histories with compactions at random points and cutoffs: each compaction drops
    /// only deliveries delivered before its cutoff and leaves every other row as it was; the
    /// live projection always equals the checkpoint folded forward with the kept log; the kept
    /// log verifies; the counters match the rows; a kept event's payload is still readable.
    #[test]
    fn compactions_anywhere_keep_the_projection_exact_and_drop_only_old_delivered_history(
        ops in proptest::collection::vec(op(), 1..120),
        cuts in proptest::collection::vec((0usize..160, 0u64..3_600_000, 1usize..40), 1..6),
    ) {
        use herald_log::{Durability, Log, LogConfig, MemStore, Store};
        let mut driver = Driver::new();
        driver.run(&Op::CreateEndpoint);
        for op in &ops {
            driver.run(op);
        }
        let store = MemStore::new();
        let config = LogConfig { batch_commands_max: 4, queue_commands_max: 64, durability: Durability::Flush };
        let log = Log::open(std::sync::Arc::new(store.clone()), WithCompaction::default(), config).expect("open");
        let mut cuts = cuts;
        cuts.sort();
        let mut next_cut = cuts.iter().peekable();
        for (i, (at_ms, event)) in driver.accepted.iter().enumerate() {
            // A later event may refer to history a compaction dropped (a redeliver of an old
            // delivered delivery): the engine would refuse it, and so does the fold here.
            let _ = log.submit(Step::Events(vec![(*at_ms, event.clone())])).expect("log");
            while let Some((_, back_ms, pass_records)) = next_cut.next_if(|(at, _, _)| *at <= i) {
                let cutoff = at_ms.saturating_sub(*back_ms);
                let before = delivery_rows(&store);
                let mut plans = 0;
                while let Some(plan) = crate::compact::plan(&store, cutoff, *pass_records).expect("plan") {
                    log.submit(Step::Compact(*at_ms, Box::new(plan))).expect("log").expect("applied");
                    plans += 1;
                    prop_assert!(plans < 1_000, "compaction does not converge");
                }
                let after = delivery_rows(&store);
                for (key, d) in &before {
                    match after.get(key) {
                        Some(kept) => prop_assert_eq!(kept, d, "a kept delivery changed"),
                        None => prop_assert!(
                            d.status == crate::DeliveryStatus::Delivered && d.updated_at_ms < cutoff,
                            "dropped a delivery that is {:?}, updated at {} (cutoff {})", d.status, d.updated_at_ms, cutoff
                        ),
                    }
                }
                prop_assert!(after.len() <= before.len());
            }
        }
        log.close();
        let live = crate::stored_projection(&store).expect("read projection");
        let rebuilt = crate::rebuild(&store, &mut |_| {}).expect("rebuild");
        prop_assert!(live == rebuilt.dump(), "live projection differs from checkpoint + kept log");
        prop_assert!(crate::scratch::through_scratch(&store) == (live.clone(), live), "through scratch storage");
        herald_log::verify(&store, &mut |_| {}).expect("the kept log verifies");
        let rows = delivery_rows(&store);
        for (status, count) in crate::delivery_counts(&crate::StoreTables(&store)).expect("counts") {
            prop_assert_eq!(count, rows.values().filter(|d| d.status == status).count() as u64);
        }
        let t = crate::StoreTables(&store);
        for (_, v) in crate::ReadTables::scan(&t, &[crate::keys::KS_EVENT], &[crate::keys::KS_EVENT + 1], usize::MAX) {
            let event: crate::EventRecord = crate::codec::from_bytes(&v).expect("an event row");
            prop_assert!(crate::event_payload(&store as &dyn Store, &event).is_ok(), "payload of {} lost", event.id);
        }
    }
}
