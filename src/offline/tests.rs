//! The offline tools called as functions on a temporary data directory: a small log written
//! through the import machine (no engine, no binary), then each tool on it.

use std::path::Path;
use std::sync::Arc;

use herald_log::{read_records, Durability, Log, LogConfig, SledStore, Store, WriteBatch};
use herald_projector::{
    encode, encode_v1, get_api_key_by_hash, ApiKeyId, AttemptOutcome, CheckedTables, DeliveryId, EndpointId,
    Event, EventId, NewDelivery, OrgId, RecordActor, Scope, Trigger, RULES_CURRENT,
};
use tempfile::TempDir;
use uuid::Uuid;

use super::import::Importer;
use super::*;

/// 2026-03-15T10:00:00.000Z.
const T0: u64 = 1_773_568_800_000;
const DAY_MS: u64 = 86_400_000;
const URL: &str = "https://crm.example.com/hooks";

const ORG: OrgId = OrgId(Uuid::from_u128(0x0190f1f4_0000_7000_8000_000000000001));
const ENDPOINT: EndpointId = EndpointId(Uuid::from_u128(0x0190f1f4_0000_7000_8000_0000000000e1));
/// Published at T0 and delivered at once.
const OLD_EVENT: EventId = EventId(Uuid::from_u128(0x0190f1f4_0000_7000_8000_0000000000f1));
const OLD_DELIVERY: DeliveryId = DeliveryId(Uuid::from_u128(0x0190f1f4_0000_7000_8000_0000000000d1));
/// Published two days later; its first attempt failed.
const NEW_EVENT: EventId = EventId(Uuid::from_u128(0x0190f1f4_0000_7000_8000_0000000000f2));
const NEW_DELIVERY: DeliveryId = DeliveryId(Uuid::from_u128(0x0190f1f4_0000_7000_8000_0000000000d2));
/// The key that published the new event.
const KEY: ApiKeyId = ApiKeyId(Uuid::from_u128(0x0190f1f4_0000_7000_8000_0000000000a1));

fn published(at_ms: u64, id: EventId, delivery: DeliveryId) -> (u64, Event) {
    let deliveries = vec![NewDelivery {
        id: delivery,
        endpoint_id: Some(ENDPOINT),
        url: URL.into(),
        next_attempt_at_ms: at_ms,
    }];
    let event = Event::EventPublishedWithDeliveries {
        id,
        org_id: ORG,
        event_type: "call.ended".into(),
        payload: br#"{"call":1}"#.to_vec(),
        call_id: None,
        idempotency_key: None,
        deliveries,
    };
    (at_ms, event)
}

fn attempt(
    at_ms: u64,
    delivery_id: DeliveryId,
    outcome: AttemptOutcome,
    retry_at_ms: Option<u64>,
) -> (u64, Event) {
    let event = Event::AttemptRecorded {
        delivery_id,
        attempt: 1,
        trigger: Trigger::Auto,
        started_at_ms: at_ms - 5,
        finished_at_ms: at_ms,
        outcome,
        response_excerpt: Vec::new(),
        retry_at_ms,
    };
    (at_ms, event)
}

/// A data directory holding six records: the rules, an endpoint, the old event delivered at
/// once (seq 3, 4), and the new one two days later whose attempt failed (seq 5, 6). The first
/// four are of event format 1, as herald wrote them before records named their actor; the new
/// event was published by [`KEY`] and its attempt recorded by the system, in format 2.
fn write_story() -> TempDir {
    let dir = tempfile::tempdir().unwrap();
    let later = T0 + 2 * DAY_MS;
    let failed = AttemptOutcome::Failed { status: Some(503), error: "HTTP 503".into() };
    let created = Event::EndpointCreated {
        id: ENDPOINT,
        org_id: ORG,
        url: URL.into(),
        name: "CRM".into(),
        enabled_events: vec!["*".into()],
        secret: "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw".into(),
    };
    let events = [
        (T0, Event::RulesAdopted { version: RULES_CURRENT }),
        (T0, created),
        published(T0, OLD_EVENT, OLD_DELIVERY),
        attempt(T0 + 5, OLD_DELIVERY, AttemptOutcome::Delivered { status: 200 }, None),
        published(later, NEW_EVENT, NEW_DELIVERY),
        attempt(later + 5, NEW_DELIVERY, failed, Some(later + 60_000)),
    ];
    let store = Arc::new(SledStore::open(dir.path(), 8 << 20).unwrap());
    let log = Log::open(store.clone(), Importer, LogConfig::default()).unwrap();
    let actors = [None, None, None, None, Some(RecordActor::Key(KEY)), Some(RecordActor::System)];
    let records = events
        .iter()
        .zip(actors)
        .map(|((at_ms, event), actor)| (*at_ms, actor.map_or_else(|| encode_v1(event), |a| encode(a, event))))
        .collect();
    assert_eq!(log.submit(records).unwrap().unwrap().len(), 6);
    log.close();
    drop(log);
    store.flush(Durability::Sync).unwrap();
    dir
}

/// A [`Progress`] that remembers each phase begun and whether every one was ended.
#[derive(Default)]
struct Phases {
    begun: Vec<String>,
    open: bool,
}

impl Progress for Phases {
    fn begin(&mut self, what: &str, _len: u64) {
        assert!(!self.open, "{what} begun before {:?} ended", self.begun.last());
        self.begun.push(what.to_owned());
        self.open = true;
    }
    fn advance(&mut self, _position: u64) {
        assert!(self.open);
    }
    fn end(&mut self) {
        self.open = false;
    }
}

fn verify_dir(dir: &Path) -> Result<VerifyReport, OfflineError> {
    verify(&VerifyOptions::new(dir), &mut Silent)
}

fn replay_text(dir: &Path, subject: Subject, format: ReplayFormat) -> Result<String, OfflineError> {
    let mut out = Vec::new();
    replay(
        &ReplayOptions { data_dir: dir.to_owned(), subject, format, read: ReplayRead::Index },
        &mut out,
        &mut Silent,
    )?;
    Ok(String::from_utf8(out).unwrap())
}

/// Exports `dir`, imports the export into a fresh directory and returns it with the report.
fn round_trip(dir: &Path) -> (TempDir, ExportReport, ImportReport) {
    let mut exported = Vec::new();
    let export = export(
        &ExportOptions { data_dir: dir.to_owned(), redact_secrets: false },
        &mut exported,
        &mut Silent,
    )
    .unwrap();
    let copy = tempfile::tempdir().unwrap();
    let options = ImportOptions { data_dir: copy.path().join("data") };
    let import = import(&options, &mut exported.as_slice(), &mut Silent).unwrap();
    (copy, export, import)
}

/// Opens the store, lets `damage` change it, closes it.
fn damage(dir: &Path, damage: impl FnOnce(&SledStore, &mut WriteBatch)) {
    let store = SledStore::open(dir, 8 << 20).unwrap();
    let mut batch = WriteBatch::default();
    damage(&store, &mut batch);
    store.apply(&batch).unwrap();
    store.flush(Durability::Sync).unwrap();
}

#[test]
fn verify_passes_an_intact_store_and_tells_its_phases() {
    let dir = write_story();
    let mut phases = Phases::default();
    let report = verify(&VerifyOptions::new(dir.path()), &mut phases).unwrap();
    assert_eq!((report.chain.records, report.chain.first_seq, report.chain.last_seq), (6, 1, 6));
    assert!(report.pairs > 0);
    assert!(
        report.to_string().starts_with("ok: 6 records (seq 1..=6), chain intact (last hash "),
        "{report}"
    );
    assert_eq!(
        phases.begun,
        ["checking the chain and rebuilding the projection", "comparing with the stored projection"]
    );
    assert_eq!(scratch_dirs(dir.path()), 0, "the scratch store is deleted");
    assert!(!phases.open);
}

#[test]
fn verify_names_the_first_bad_seq_of_a_damaged_record() {
    let dir = write_story();
    let key = herald_log::record::head_key(4);
    damage(dir.path(), |store, batch| {
        let mut value = store.get(&key).unwrap().unwrap();
        let last = value.len() - 1;
        value[last] ^= 0x01;
        batch.put(key.clone(), value);
    });
    let error = verify_dir(dir.path()).unwrap_err();
    assert!(matches!(&error, OfflineError::Damaged(c) if c.seq == 4), "{error:?}");
    assert!(error.to_string().starts_with("the log is damaged; first bad seq 4: "), "{error}");
}

#[test]
fn verify_finds_a_projection_value_changed_behind_the_logs_back() {
    let dir = write_story();
    let mut key = vec![herald_projector::keys::KS_DELIVERY];
    key.extend_from_slice(OLD_DELIVERY.0.as_bytes());
    damage(dir.path(), |store, batch| {
        let mut value = store.get(&key).unwrap().unwrap();
        value[0] ^= 0x01;
        batch.put(key.clone(), value);
    });
    let error = verify_dir(dir.path()).unwrap_err();
    assert!(
        matches!(&error, OfflineError::ProjectionDiffers(Difference::Value { key: k }) if *k == key),
        "{error:?}"
    );
    assert_eq!(scratch_dirs(dir.path()), 0, "the scratch store is deleted after an error too");
    assert!(error.to_string().starts_with("the stored projection differs from a rebuild of the log: "));
}

/// The scratch directories `verify` left in `dir`.
fn scratch_dirs(dir: &Path) -> usize {
    std::fs::read_dir(dir)
        .unwrap()
        .filter(|e| e.as_ref().unwrap().file_name().to_string_lossy().starts_with("verify-scratch-"))
        .count()
}

#[test]
fn verify_names_the_key_a_rebuild_has_that_the_store_lost() {
    let dir = write_story();
    let mut key = vec![herald_projector::keys::KS_DELIVERY];
    key.extend_from_slice(NEW_DELIVERY.0.as_bytes());
    damage(dir.path(), |_, batch| batch.delete(key.clone()));
    let error = verify_dir(dir.path()).unwrap_err();
    assert!(
        matches!(&error, OfflineError::ProjectionDiffers(Difference::OtherKey { rebuilt, .. }) if *rebuilt == key),
        "{error:?}"
    );
    // A key past every other one that only the store holds.
    let dir = write_story();
    let extra = vec![herald_projector::keys::KS_LAST, 0xff];
    damage(dir.path(), |_, batch| batch.put(extra.clone(), b"x".to_vec()));
    let error = verify_dir(dir.path()).unwrap_err();
    assert!(
        matches!(&error, OfflineError::ProjectionDiffers(Difference::ExtraKey(k)) if *k == extra),
        "{error:?}"
    );
}

#[test]
fn verify_within_the_least_memory_bound_reports_as_within_the_default_and_clears_left_overs() {
    let dir = write_story();
    let left_over = dir.path().join("verify-scratch-4000000");
    std::fs::create_dir_all(&left_over).unwrap();
    std::fs::write(left_over.join("db"), b"left by a killed verify").unwrap();
    let least = VerifyOptions { data_dir: dir.path().to_owned(), memory_max_bytes: MEMORY_MAX_LEAST_BYTES };
    assert_eq!(verify(&least, &mut Silent).unwrap(), verify_dir(dir.path()).unwrap());
    assert_eq!(scratch_dirs(dir.path()), 0);
}

#[test]
fn memory_sizes_read_as_bytes_or_with_a_binary_unit() {
    assert_eq!(parse_memory("512MiB"), Ok(512 << 20));
    assert_eq!(parse_memory("1GiB"), Ok(1 << 30));
    assert_eq!(parse_memory(" 64 mib "), Ok(64 << 20));
    assert_eq!(parse_memory("2G"), Ok(2 << 30));
    assert_eq!(parse_memory("67108864"), Ok(64 << 20));
    for bad in ["", "MiB", "12 parsecs", "1.5GiB", "-1GiB", "99999999999999TiB"] {
        assert!(parse_memory(bad).is_err(), "{bad:?}");
    }
    assert!(parse_memory("16MiB").unwrap_err().contains("least"), "below the least bound");
    assert_eq!(VerifyOptions::new("d").memory_max_bytes, MEMORY_MAX_DEFAULT_BYTES);
}

#[test]
fn a_directory_without_data_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let error = verify_dir(dir.path()).unwrap_err();
    assert!(matches!(&error, OfflineError::NoData { .. }), "{error:?}");
    assert_eq!(error.to_string(), format!("{} holds no herald data", dir.path().display()));
}

#[test]
fn export_then_import_gives_the_same_chain_and_projection() {
    let dir = write_story();
    let (copy, export, import) = round_trip(dir.path());
    assert_eq!((export.records, import.records), (6, 6));
    assert_eq!(import.verified, verify_dir(dir.path()).unwrap());
    assert_eq!(verify_dir(&copy.path().join("data")).unwrap(), import.verified);
    // Every body, of either event format, byte for byte.
    let bodies = |dir: &Path| {
        let store = SledStore::open(dir, 8 << 20).unwrap();
        read_records(&store, 1, 100).unwrap().into_iter().map(|r| r.body).collect::<Vec<_>>()
    };
    let (original, imported) = (bodies(dir.path()), bodies(&copy.path().join("data")));
    assert_eq!(original, imported);
    assert_eq!(original.iter().map(|b| b[0]).collect::<Vec<_>>(), [1, 1, 1, 1, 2, 2]);
    // A second import into the same directory is refused: it holds a log.
    let mut exported = Vec::new();
    super::export(
        &ExportOptions { data_dir: dir.path().to_owned(), redact_secrets: false },
        &mut exported,
        &mut Silent,
    )
    .unwrap();
    let options = ImportOptions { data_dir: copy.path().join("data") };
    let error = super::import(&options, &mut exported.as_slice(), &mut Silent).unwrap_err();
    assert!(matches!(error, OfflineError::NotEmpty { .. }), "{error:?}");
}

#[test]
fn import_catches_an_altered_export_and_names_a_bad_line() {
    let dir = write_story();
    let mut exported = Vec::new();
    export(
        &ExportOptions { data_dir: dir.path().to_owned(), redact_secrets: false },
        &mut exported,
        &mut Silent,
    )
    .unwrap();
    let exported = String::from_utf8(exported).unwrap();
    let copy = tempfile::tempdir().unwrap();
    let into = |name: &str, input: &str| {
        let options = ImportOptions { data_dir: copy.path().join(name) };
        import(&options, &mut input.as_bytes(), &mut Silent).unwrap_err()
    };
    let altered = exported.replacen(&format!("\"at_ms\":{}", T0 + 5), &format!("\"at_ms\":{}", T0 + 6), 1);
    let error = into("altered", &altered);
    assert!(matches!(error, OfflineError::NotAsExported { seq: 4, got_seq: 4 }), "{error:?}");
    let error = into("bad", &format!("{}\nnot json\n", exported.lines().next().unwrap()));
    assert!(matches!(&error, OfflineError::Line { line: 2, problem: LineProblem::NotJson(_) }), "{error:?}");
    assert!(error.to_string().starts_with("line 2: not JSON: "), "{error}");
}

#[test]
fn replay_tells_the_story_of_one_delivery() {
    let dir = write_story();
    let story = replay_text(dir.path(), Subject::Delivery(OLD_DELIVERY), ReplayFormat::Text).unwrap();
    let d = OLD_DELIVERY;
    let expected = [
        format!("2026-03-15T10:00:00.000Z  seq      1  fold rules version {RULES_CURRENT} from here on"),
        format!("2026-03-15T10:00:00.000Z  seq      3  event {OLD_EVENT} published: call.ended, 10 bytes, organisation {ORG}; delivery {d} created for endpoint {ENDPOINT} ({URL})"),
        format!("2026-03-15T10:00:00.000Z  seq      3    delivery {d}: (new) -> pending"),
        format!("2026-03-15T10:00:00.005Z  seq      4  delivery {d}: attempt 1 (auto) started 2026-03-15T10:00:00.000Z, 5 ms: delivered, HTTP 200"),
        format!("2026-03-15T10:00:00.005Z  seq      4    delivery {d}: pending -> delivered"),
    ];
    assert_eq!(story.lines().collect::<Vec<_>>(), expected);
    // NDJSON: one object a line, the same steps.
    let ndjson = replay_text(dir.path(), Subject::Delivery(OLD_DELIVERY), ReplayFormat::Ndjson).unwrap();
    let lines: Vec<serde_json::Value> = ndjson.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let kinds: Vec<&str> = lines.iter().map(|l| l["type"].as_str().unwrap()).collect();
    assert_eq!(
        kinds,
        ["RulesAdopted", "EventPublishedWithDeliveries", "StateChanged", "AttemptRecorded", "StateChanged"]
    );
    // Its records were written before records named their actor: none is shown.
    for line in lines.iter().filter(|l| l["type"] != "StateChanged") {
        assert_eq!(line["actor"], serde_json::Value::Null, "{line}");
    }
    // An id that is in no record is an error.
    let nobody = Subject::Delivery(DeliveryId(Uuid::nil()));
    let error = replay_text(dir.path(), nobody, ReplayFormat::Text).unwrap_err();
    assert!(matches!(error, OfflineError::NothingFound(s) if s == nobody), "{error:?}");
}

#[test]
fn replay_and_export_name_who_acted_on_each_record() {
    let dir = write_story();
    let later = "2026-03-17T10:00:00";
    let story = replay_text(dir.path(), Subject::Delivery(NEW_DELIVERY), ReplayFormat::Text).unwrap();
    let steps: Vec<&str> =
        story.lines().filter(|l| !l.contains("  ->") && !l.contains(": (new) ->")).collect();
    assert_eq!(steps.len(), 3, "{story}");
    assert!(steps[0].ends_with("from here on"), "a record of format 1 names nobody: {}", steps[0]);
    assert!(
        steps[1].starts_with(&format!("{later}.000Z  seq      5  event {NEW_EVENT} published")),
        "{story}"
    );
    assert!(steps[1].ends_with(&format!(")  [by API key {KEY}]")), "{}", steps[1]);
    assert!(steps[2].starts_with(&format!("{later}.005Z  seq      6  delivery {NEW_DELIVERY}: attempt 1")));
    assert!(steps[2].ends_with("  [by herald]"), "{}", steps[2]);
    let key = serde_json::json!({"kind": "key", "key_id": KEY.to_string()});
    let system = serde_json::json!({"kind": "system"});
    let ndjson = replay_text(dir.path(), Subject::Delivery(NEW_DELIVERY), ReplayFormat::Ndjson).unwrap();
    let actors: Vec<(u64, serde_json::Value)> = ndjson
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|l| l["type"] != "StateChanged")
        .map(|l| (l["seq"].as_u64().unwrap(), l["actor"].clone()))
        .collect();
    assert_eq!(actors, [(1, serde_json::Value::Null), (5, key.clone()), (6, system.clone())]);
    // An export line names its actor too, beside the raw body.
    let mut exported = Vec::new();
    let options = ExportOptions { data_dir: dir.path().to_owned(), redact_secrets: true };
    export(&options, &mut exported, &mut Silent).unwrap();
    let actors: Vec<serde_json::Value> = String::from_utf8(exported)
        .unwrap()
        .lines()
        .skip(1)
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["actor"].clone())
        .collect();
    let none = serde_json::Value::Null;
    assert_eq!(actors, [none.clone(), none.clone(), none.clone(), none, key, system]);
}

#[test]
fn compact_drops_the_old_delivered_story_and_the_rest_still_verifies() {
    let dir = write_story();
    let options = CompactOptions {
        data_dir: dir.path().to_owned(),
        retain: std::time::Duration::from_millis(DAY_MS),
        now_ms: T0 + 2 * DAY_MS + 10,
    };
    let summary = compact(&options, &mut Silent).unwrap();
    assert_eq!(summary.cutoff_ms, T0 + DAY_MS + 10);
    let dropped = summary.dropped;
    assert_eq!((dropped.records_dropped, dropped.through_seq), (4, 4));
    assert_eq!((dropped.deliveries_dropped, dropped.events_dropped), (1, 1));
    assert!(summary.to_string().starts_with("dropped 4 records (through seq 4), 1 delivered deliveries and 1 events older than 2026-03-16T10:00:00.010Z"), "{summary}");
    let report = verify_dir(dir.path()).unwrap();
    assert_eq!(report.chain.first_seq, 5);
    assert!(report.to_string().contains("; records through seq 4 were compacted"), "{report}");
    // The dropped story is gone; the kept one is told from the log.
    let gone = replay_text(dir.path(), Subject::Delivery(OLD_DELIVERY), ReplayFormat::Text).unwrap_err();
    assert!(matches!(gone, OfflineError::NothingFound(_)), "{gone:?}");
    let kept = replay_text(dir.path(), Subject::Delivery(NEW_DELIVERY), ReplayFormat::Text).unwrap();
    assert!(
        kept.contains("failed, HTTP 503 (HTTP 503); next automatic attempt at 2026-03-17T10:01:00.000Z"),
        "{kept}"
    );
    // A second pass finds nothing more; the anchor and checkpoint travel with an export.
    assert_eq!(compact(&options, &mut Silent).unwrap().dropped.records_dropped, 0);
    let (_copy, _, import) = round_trip(dir.path());
    assert_eq!(import.verified, verify_dir(dir.path()).unwrap());
    // A vacuum rewrites the store into one holding the same.
    let vacuumed = vacuum(&VacuumOptions { data_dir: dir.path().to_owned() }, &mut Silent).unwrap();
    assert!(vacuumed.pairs > 0);
    assert_eq!(verify_dir(dir.path()).unwrap(), report);
}

#[test]
fn replay_after_a_compaction_opens_with_the_state_the_checkpoint_kept() {
    let dir = write_story();
    let retain = std::time::Duration::from_millis(DAY_MS);
    let options = CompactOptions { data_dir: dir.path().to_owned(), retain, now_ms: T0 + 4 * DAY_MS };
    assert_eq!(compact(&options, &mut Silent).unwrap().dropped.through_seq, 6);
    let story = replay_text(dir.path(), Subject::Event(NEW_EVENT), ReplayFormat::Text).unwrap();
    let d = NEW_DELIVERY;
    let expected = [
        format!("(records through seq 6 were compacted) delivery {d} of event {NEW_EVENT}: pending after 1 attempts, as kept at the checkpoint"),
        "    attempt 1 started 2026-03-17T10:00:00.000Z: failed, HTTP 503 (HTTP 503)".to_owned(),
    ];
    assert_eq!(story.lines().collect::<Vec<_>>(), expected);
}

fn key_options(dir: &Path) -> KeysOptions {
    KeysOptions { data_dir: dir.to_owned() }
}

fn revoke_id(dir: &Path, id: ApiKeyId) -> Result<KeyRevoked, OfflineError> {
    revoke_key(&KeyRevokeOptions { data_dir: dir.to_owned(), id })
}

#[test]
fn keys_are_created_listed_and_revoked_as_records_of_the_log() {
    let dir = write_story();
    assert_eq!(list_keys(&key_options(dir.path())).unwrap().to_string(), "no API keys\n");
    let admin = create_key(&KeyCreateOptions::admin(dir.path().to_owned())).unwrap();
    assert!(admin.key.starts_with(KEY_PREFIX) && admin.key.len() == 35, "{}", admin.key);
    assert!(!format!("{admin:?}").contains(&admin.key), "Debug shows the secret: {admin:?}");
    assert!(!admin.to_string().contains(&admin.key), "Display shows the secret: {admin}");
    assert_eq!((admin.stored.org_id, admin.stored.scopes.clone()), (None, vec![Scope::Admin]));
    assert_eq!(admin.stored.key_hash, key_hash(&admin.key));
    let scopes = parse_scopes("events.write, deliveries.read,events.write").unwrap();
    assert_eq!(scopes, [Scope::EventsWrite, Scope::DeliveriesRead]);
    let mut options = KeyCreateOptions::org(dir.path().to_owned(), ORG, scopes);
    options.name = "ops".into();
    let org = create_key(&options).unwrap();
    assert_ne!(org.key, admin.key);

    // The store keeps the key's hash, which the server looks a bearer key up by.
    let store = open_existing(dir.path()).unwrap();
    let found = CheckedTables::run(store.as_ref(), |t| get_api_key_by_hash(t, &key_hash(&admin.key)))
        .unwrap()
        .unwrap();
    assert_eq!(found.map(|k| k.id), Some(admin.stored.id));
    drop(store);

    let list = list_keys(&key_options(dir.path())).unwrap();
    assert_eq!(list.keys, [admin.stored.clone(), org.stored.clone()]);
    let text = list.to_string();
    let lines: Vec<&str> = text.lines().collect();
    assert!(
        lines[0].starts_with(&format!(
            "{} org=admin scopes=admin name=\"admin (herald keys create)\" created=",
            admin.stored.id
        )),
        "{text}"
    );
    assert!(
        lines[1].starts_with(&format!(
            "{} org={ORG} scopes=events.write,deliveries.read name=\"ops\" created=",
            org.stored.id
        )),
        "{text}"
    );
    assert!(lines.iter().all(|l| l.ends_with(" revoked=-")), "{text}");
    assert!(!text.contains(&admin.key) && !text.contains(&hex(&key_hash(&admin.key))), "{text}");

    let revoked = revoke_id(dir.path(), admin.stored.id).unwrap();
    let at_ms = revoked.stored.revoked_at_ms.expect("revoked");
    assert!(
        revoked.to_string().starts_with(&format!("revoked API key {} org=admin", admin.stored.id)),
        "{revoked}"
    );
    let again = revoke_id(dir.path(), admin.stored.id).unwrap_err();
    assert!(
        matches!(&again, OfflineError::Key(KeyProblem::AlreadyRevoked { at_ms: a, .. }) if *a == at_ms),
        "{again:?}"
    );
    assert!(again.is_usage());
    let nobody = ApiKeyId(Uuid::nil());
    let error = revoke_id(dir.path(), nobody).unwrap_err();
    assert_eq!(error.to_string(), format!("no API key {nobody} in this data directory"));
    assert!(error.is_usage());
    let list = list_keys(&key_options(dir.path())).unwrap();
    assert_eq!(list.keys[0].revoked_at_ms, Some(at_ms));
    assert_eq!(list.keys[1].revoked_at_ms, None);

    // Three records after the story's six, folded like any other: the log still verifies.
    let report = verify_dir(dir.path()).unwrap();
    assert_eq!((report.chain.first_seq, report.chain.last_seq), (1, 9));
    let (_copy, _, import) = round_trip(dir.path());
    assert_eq!(import.verified, report);
}

#[test]
fn key_arguments_that_cannot_be_used_are_usage_errors() {
    let error = parse_scopes("events.write,root").unwrap_err();
    assert!(matches!(&error, OfflineError::Key(KeyProblem::UnknownScope(s)) if s == "root"), "{error:?}");
    assert!(
        error.to_string().starts_with("\"root\" is not a scope; the scopes are events.write, "),
        "{error}"
    );
    assert!(matches!(parse_scopes(" , ").unwrap_err(), OfflineError::Key(KeyProblem::NoScopes)));
    let error = parse_org_id("acme").unwrap_err();
    assert_eq!(error.to_string(), "\"acme\" is not an organisation id (a UUID)");
    assert!(error.is_usage());
    assert_eq!(parse_org_id(&ORG.to_string()).unwrap(), ORG);
    assert!(matches!(parse_key_id("1").unwrap_err(), OfflineError::Key(KeyProblem::BadId { .. })));

    // Refused by the checks the API makes: nothing is written.
    let dir = write_story();
    let no_scopes = KeyCreateOptions::org(dir.path().to_owned(), ORG, Vec::new());
    let error = create_key(&no_scopes).unwrap_err();
    assert_eq!(error.to_string(), "refused: scopes: at least one scope");
    let mut long = KeyCreateOptions::admin(dir.path().to_owned());
    long.name = "n".repeat(300);
    let error = create_key(&long).unwrap_err();
    assert!(matches!(&error, OfflineError::Key(KeyProblem::Refused(_))) && error.is_usage(), "{error:?}");
    assert_eq!(verify_dir(dir.path()).unwrap().chain.last_seq, 6);

    // A directory without data, and a store under rules newer than this binary's.
    let empty = tempfile::tempdir().unwrap();
    let error = list_keys(&key_options(empty.path())).unwrap_err();
    assert!(matches!(error, OfflineError::NoData { .. }), "{error:?}");
    let error = create_key(&KeyCreateOptions::admin(empty.path().to_owned())).unwrap_err();
    assert!(matches!(error, OfflineError::NoData { .. }), "{error:?}");
    damage(dir.path(), |_, batch| {
        batch.put(herald_projector::keys::META_RULES.to_vec(), (RULES_CURRENT + 1).to_be_bytes().to_vec());
    });
    let error = create_key(&KeyCreateOptions::admin(dir.path().to_owned())).unwrap_err();
    assert!(matches!(error, OfflineError::NewerRules { rules } if rules == RULES_CURRENT + 1), "{error:?}");
    assert!(error.is_usage());
}

#[test]
fn a_redacted_export_holds_no_secret_and_is_refused_by_import() {
    let dir = write_story();
    let export_with = |redact_secrets: bool| {
        let mut out = Vec::new();
        let options = ExportOptions { data_dir: dir.path().to_owned(), redact_secrets };
        export(&options, &mut out, &mut Silent).unwrap();
        String::from_utf8(out).unwrap()
    };
    let plain = export_with(false);
    let plain_bodies = plain.lines().filter(|l| l.contains("\"body\"")).count();
    assert_eq!(plain_bodies, 6, "a plain export holds every record's body (and so the secrets)");
    let redacted = export_with(true);
    assert_eq!(redacted.lines().count(), 7, "the note, then the six records");
    assert!(redacted.lines().next().unwrap().contains(REDACTED_NOTE));
    assert!(!redacted.contains("\"body\"") && !redacted.contains("whsec_"), "{redacted}");
    assert!(redacted.contains("\"EndpointCreated\""), "the events are still there: {redacted}");
    let options = ImportOptions { data_dir: dir.path().join("copy") };
    let error = import(&options, &mut redacted.as_bytes(), &mut Silent).unwrap_err();
    assert!(matches!(error, OfflineError::Line { line: 1, problem: LineProblem::Redacted }), "{error:?}");
}

/// Appends bodies as they are, folding nothing: a record the projection cannot read.
struct RawAppender;

impl herald_log::Machine for RawAppender {
    type Command = Vec<Vec<u8>>;
    type Reply = ();
    type Rejection = ();

    fn execute(&mut self, bodies: Vec<Vec<u8>>, tx: &mut herald_log::Tx<'_>) -> Result<(), ()> {
        for body in bodies {
            tx.append(T0 + DAY_MS, body);
        }
        Ok(())
    }
}

/// The story, then records 7 on as `bodies` (sealed and chained, not folded).
fn story_then(bodies: Vec<Vec<u8>>) -> TempDir {
    let dir = write_story();
    let store = Arc::new(SledStore::open(dir.path(), 8 << 20).unwrap());
    let log = Log::open(store.clone(), RawAppender, LogConfig::default()).unwrap();
    log.submit(bodies).unwrap().unwrap();
    log.close();
    drop(log);
    store.flush(Durability::Sync).unwrap();
    dir
}

#[test]
fn verify_names_a_record_the_rebuild_cannot_fold_before_damage_the_reader_found_later() {
    let undecodable = b"not an event".to_vec();
    let dir = story_then(vec![undecodable.clone(), undecodable.clone(), undecodable]);
    let error = verify_dir(dir.path()).unwrap_err();
    assert!(matches!(&error, OfflineError::Rebuild(e) if e.to_string().contains("7")), "{error:?}");
    // Record 8 damaged too (not the last, which opening the log checks): the fold's failure at 7
    // comes first, as the log's order has it, though the reader may be past 8 by then.
    damage(dir.path(), |store, batch| {
        let key = herald_log::record::head_key(8);
        let mut value = store.get(&key).unwrap().unwrap();
        let last = value.len() - 1;
        value[last] ^= 0x01;
        batch.put(key, value);
    });
    let error = verify_dir(dir.path()).unwrap_err();
    assert!(matches!(&error, OfflineError::Rebuild(e) if e.to_string().contains("7")), "{error:?}");
    assert_eq!(scratch_dirs(dir.path()), 0, "the scratch store is deleted after a failed rebuild");
}
