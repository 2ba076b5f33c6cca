//! The offline commands on a real data directory: a scripted story (fail, fail, inactive,
//! retrigger, delivered) written through the library on a manual clock, then the `herald` binary's
//! `replay` checked line by line, `verify` catching damage, and `export` → `import` → `verify`.

use std::collections::VecDeque;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use herald::engine::clock::ManualClock;
use herald::engine::sender::{AttemptRequest, FailureKind, SendFuture, SendOutcome, Sender};
use herald::log::{Durability, SledStore, Store, WriteBatch};
use herald::projector::{ApiKeyId, DeliveryId, DeliveryStatus, EndpointId, EventId, OrgId, Policy, Scope};
use herald::{Actor, Command as Cmd, DeliveryConfig, Engine, EngineConfig, Parts, Reply};
use uuid::Uuid;

/// 2026-03-15T10:00:00.000Z.
const T0: u64 = 1_773_568_800_000;

/// Answers from a script: `None` is a connection error, `Some(status)` an answer.
struct Scripted(Mutex<VecDeque<Option<u16>>>);

impl Sender for Scripted {
    fn send(&self, _req: AttemptRequest) -> SendFuture<'_> {
        let next = self.0.lock().unwrap().pop_front().unwrap_or(Some(200));
        Box::pin(async move {
            match next {
                Some(status) => SendOutcome::Response { status, excerpt: Vec::new(), retry_after_ms: None },
                None => {
                    SendOutcome::Failed { kind: FailureKind::Timeout, error: "Connection timeout".into() }
                }
            }
        })
    }
}

/// The endpoint every story delivers to, subscribed to everything.
fn crm_endpoint(id: EndpointId, org_id: OrgId) -> Cmd {
    Cmd::CreateEndpoint {
        id,
        org_id,
        url: "https://crm.example.com/hooks".into(),
        name: "CRM".into(),
        enabled_events: vec!["*".into()],
        secret: None,
        settings: Default::default(),
    }
}

struct Story {
    delivery: DeliveryId,
    event: EventId,
    endpoint: EndpointId,
    key: ApiKeyId,
}

/// Writes the story into `dir`: an endpoint whose receiver times out, then answers 503 (two
/// failures make it inactive), a retrigger by an API key, and a 200.
fn write_story(dir: &Path) -> Story {
    let clock = ManualClock::new(T0);
    let sender = Arc::new(Scripted(Mutex::new(VecDeque::from([None, Some(503), Some(200)]))));
    let store = SledStore::open(dir, 8 << 20).unwrap();
    let config = EngineConfig {
        data_dir: dir.to_owned(),
        durability: Durability::Flush,
        policy: Policy { retry_schedule_ms: vec![60_000, 60_000], failures_max: 2, ..Policy::default() },
        delivery: DeliveryConfig { shutdown_timeout: Duration::from_secs(1), ..DeliveryConfig::default() },
        ..EngineConfig::default()
    };
    let parts = Parts { store: Arc::new(store), clock: Arc::new(clock.clone()), sender };
    let engine = Engine::open_with(config, parts).unwrap();
    let org = OrgId(Uuid::from_u128(0x0190f1f4_0000_7000_8000_000000000001));
    let endpoint = EndpointId(Uuid::from_u128(0x0190f1f4_0000_7000_8000_0000000000e1));
    let key = ApiKeyId(Uuid::from_u128(0x0190f1f4_0000_7000_8000_0000000000a1));
    let event = EventId(Uuid::from_u128(0x0190f1f4_0000_7000_8000_0000000000f1));
    let run = |actor, command| engine.execute_blocking(actor, command).unwrap();
    run(
        Actor::admin(),
        Cmd::CreateApiKey {
            id: key,
            org_id: Some(org),
            scopes: vec![Scope::DeliveriesWrite],
            name: "ops".into(),
            key_hash: [7; 32],
        },
    );
    run(Actor::admin(), crm_endpoint(endpoint, org));
    let delivery = match run(
        Actor::admin(),
        Cmd::Publish {
            id: event,
            org_id: org,
            event_type: "call.ended".into(),
            payload: br#"{"call":1}"#.to_vec(),
            call_id: None,
            webhook_url: None,
            idempotency_key: None,
            ordering_key: None,
        },
    ) {
        Reply::Published { delivery_ids, .. } => delivery_ids[0],
        other => panic!("{other:?}"),
    };
    assert!(engine.settle(Duration::from_secs(10)));
    // The first retry is due a minute later, give or take its jitter.
    clock.set_ms(engine.delivery(delivery).unwrap().unwrap().next_attempt_at_ms.unwrap());
    assert!(engine.settle(Duration::from_secs(10)));
    assert_eq!(engine.delivery(delivery).unwrap().unwrap().status, DeliveryStatus::Inactive);
    clock.set_ms(T0 + 3_600_000);
    run(Actor { org_id: Some(org), key_id: Some(key) }, Cmd::Retrigger { delivery_id: delivery });
    assert!(engine.settle(Duration::from_secs(10)));
    assert_eq!(engine.delivery(delivery).unwrap().unwrap().status, DeliveryStatus::Delivered);
    engine.shutdown();
    Story { delivery, event, endpoint, key }
}

/// Whether `line` is `pattern`, where each `*` stands for any run of characters.
fn matches(line: &str, pattern: &str) -> bool {
    let mut parts = pattern.split('*');
    let first = parts.next().unwrap_or("");
    let Some(mut rest) = line.strip_prefix(first) else { return false };
    let parts: Vec<&str> = parts.collect();
    for (i, part) in parts.iter().enumerate() {
        if i + 1 == parts.len() {
            return part.is_empty() || rest.ends_with(part);
        }
        match rest.find(part) {
            Some(at) => rest = &rest[at + part.len()..],
            None => return false,
        }
    }
    rest.is_empty()
}

fn herald(args: &[&str], stdin: Option<&[u8]>) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_herald"));
    cmd.args(args).stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("cannot run herald");
    if let Some(input) = stdin {
        use std::io::Write;
        child.stdin.take().unwrap().write_all(input).unwrap();
    }
    drop(child.stdin.take());
    child.wait_with_output().unwrap()
}

fn text(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn replay_tells_the_story_line_by_line() {
    let dir = tempfile::tempdir().unwrap();
    let s = write_story(dir.path());
    let out = herald(
        &["replay", "--data-dir", dir.path().to_str().unwrap(), "--delivery", &s.delivery.to_string()],
        None,
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let d = s.delivery;
    let expected = [
        format!("2026-03-15T10:00:00.000Z  seq      1  fold rules version {} from here on  [by herald]", herald_projector::RULES_CURRENT),
        "2026-03-15T10:00:00.000Z  seq      2  policy: retry schedule [60000, 60000] ms, 2 failures within 86400000 ms make an endpoint inactive  [by herald]".to_owned(),
        format!("2026-03-15T10:00:00.000Z  seq      5  event {} published: call.ended, 10 bytes, organisation {}; delivery {d} created for endpoint {} (https://crm.example.com/hooks)  [by herald]", s.event, "*", s.endpoint),
        format!("2026-03-15T10:00:00.000Z  seq      5    delivery {d}: (new) -> pending"),
        format!("2026-03-15T10:00:00.000Z  seq      6  delivery {d}: attempt 1 (auto) started 2026-03-15T10:00:00.000Z, 0 ms: failed: Connection timeout; next automatic attempt at {}  [by herald]", "*"),
        format!("2026-03-15T10:0*Z  seq      7  delivery {d}: attempt 2 (auto) started 2026-03-15T10:0*Z, 0 ms: failed, HTTP 503 (HTTP 503); next automatic attempt at *  [by herald]"),
        format!("2026-03-15T10:0*Z  seq      7    delivery {d}: pending -> inactive"),
        format!("2026-03-15T11:00:00.000Z  seq      8  delivery {d}: retrigger requested by API key {} (request *)  [by API key {}]", s.key, s.key),
        format!("2026-03-15T11:00:00.000Z  seq      8    delivery {d}: inactive -> pending"),
        format!("2026-03-15T11:00:00.000Z  seq      9  delivery {d}: attempt 3 (manual) started 2026-03-15T11:00:00.000Z, 0 ms: delivered, HTTP 200  [by herald]"),
        format!("2026-03-15T11:00:00.000Z  seq      9    delivery {d}: pending -> delivered"),
    ];
    let got: Vec<String> = text(&out).lines().map(str::to_owned).collect();
    assert_eq!(got.len(), expected.len(), "{}", text(&out));
    for (line, want) in got.iter().zip(&expected) {
        // Retry times carry jitter and request ids are derived: `*` stands for them.
        assert!(matches(line, want), "\n got: {line}\nwant: {want}");
    }
    // The event's story holds the publish too, and NDJSON is one object a line.
    let out = herald(
        &[
            "replay",
            "--data-dir",
            dir.path().to_str().unwrap(),
            "--event",
            &s.event.to_string(),
            "--format",
            "ndjson",
        ],
        None,
    );
    assert!(out.status.success());
    let lines: Vec<serde_json::Value> =
        text(&out).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert!(lines.iter().any(|l| l["type"] == "EventPublishedWithDeliveries"
        && l["payload"]["call"] == 1
        && l["deliveries"][0]["id"] == s.delivery.to_string()));
    assert_eq!(lines.iter().filter(|l| l["type"] == "AttemptRecorded").count(), 3);
    // An id that is in no record is an error.
    let out = herald(
        &["replay", "--data-dir", dir.path().to_str().unwrap(), "--delivery", &Uuid::nil().to_string()],
        None,
    );
    assert!(!out.status.success());
}

#[test]
fn export_import_verify_round_trips_a_real_log() {
    let dir = tempfile::tempdir().unwrap();
    write_story(dir.path());
    let src = dir.path().to_str().unwrap();
    let verified = herald(&["verify", "--data-dir", src], None);
    assert!(verified.status.success(), "{}", String::from_utf8_lossy(&verified.stderr));
    assert!(text(&verified).starts_with("ok: 9 records"), "{}", text(&verified));
    let export = herald(&["export", "--data-dir", src], None);
    assert!(export.status.success());
    assert_eq!(text(&export).lines().count(), 9);
    let copy = tempfile::tempdir().unwrap();
    let target = copy.path().join("data");
    let import = herald(&["import", "--data-dir", target.to_str().unwrap()], Some(&export.stdout));
    assert!(import.status.success(), "{}", String::from_utf8_lossy(&import.stderr));
    let again = herald(&["verify", "--data-dir", target.to_str().unwrap()], None);
    assert_eq!(text(&again), text(&verified), "the copy has the same chain and the same projection");
    // Importing into a directory that has a log is refused, and an altered export is caught.
    let twice = herald(&["import", "--data-dir", target.to_str().unwrap()], Some(&export.stdout));
    assert!(!twice.status.success());
    let altered = String::from_utf8_lossy(&export.stdout).replacen(
        "\"at_ms\":1773568800000",
        "\"at_ms\":1773568800001",
        1,
    );
    let other = copy.path().join("altered");
    let bad = herald(&["import", "--data-dir", other.to_str().unwrap()], Some(altered.as_bytes()));
    assert!(!bad.status.success());
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("does not chain"),
        "{}",
        String::from_utf8_lossy(&bad.stderr)
    );
}

/// Opens the store, lets `damage` change it, closes it.
fn damage(dir: &Path, damage: impl FnOnce(&SledStore)) {
    let store = SledStore::open(dir, 8 << 20).unwrap();
    damage(&store);
    store.flush(Durability::Sync).unwrap();
}

#[test]
fn verify_names_the_first_bad_seq_of_a_damaged_log() {
    let dir = tempfile::tempdir().unwrap();
    write_story(dir.path());
    let path = dir.path().to_str().unwrap();
    // A flipped byte in record 4.
    let key = herald::log::record::head_key(4);
    damage(dir.path(), |s| {
        let mut value = s.get(&key).unwrap().unwrap();
        let last = value.len() - 1;
        value[last] ^= 0x01;
        let mut b = WriteBatch::default();
        b.put(key.clone(), value);
        s.apply(&b).unwrap();
    });
    let out = herald(&["verify", "--data-dir", path], None);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("seq 4"), "{err}");

    // A removed record (on a fresh copy of the story).
    let dir = tempfile::tempdir().unwrap();
    write_story(dir.path());
    damage(dir.path(), |s| {
        let mut b = WriteBatch::default();
        b.delete(herald::log::record::head_key(6));
        s.apply(&b).unwrap();
    });
    let out = herald(&["verify", "--data-dir", dir.path().to_str().unwrap()], None);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("seq 6") || err.contains("seq 7"), "{err}");

    // Two records swapped.
    let dir = tempfile::tempdir().unwrap();
    write_story(dir.path());
    damage(dir.path(), |s| {
        let (k5, k6) = (herald::log::record::head_key(5), herald::log::record::head_key(6));
        let (v5, v6) = (s.get(&k5).unwrap().unwrap(), s.get(&k6).unwrap().unwrap());
        let mut b = WriteBatch::default();
        b.put(k5, v6);
        b.put(k6, v5);
        s.apply(&b).unwrap();
    });
    let out = herald(&["verify", "--data-dir", dir.path().to_str().unwrap()], None);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("first bad seq 5"), "{err}");

    // A projection value changed behind the log's back.
    let dir = tempfile::tempdir().unwrap();
    let s = write_story(dir.path());
    damage(dir.path(), |store| {
        let mut key = vec![0x50];
        key.extend_from_slice(s.delivery.as_bytes());
        let mut value = store.get(&key).unwrap().unwrap();
        value[0] ^= 0x01;
        let mut b = WriteBatch::default();
        b.put(key, value);
        store.apply(&b).unwrap();
    });
    let out = herald(&["verify", "--data-dir", dir.path().to_str().unwrap()], None);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("differs"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Retention on a real data directory: the background compaction drops a delivered story older
/// than the retention and keeps an exhausted one (its payload and attempts too); the commands
/// still work on what is kept; `verify`, `replay`, `export` → `import` and `herald compact`
/// work on the compacted log.
#[test]
fn retention_drops_old_delivered_history_keeps_the_rest_and_the_log_still_verifies() {
    const DAY_MS: u64 = 86_400_000;
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0);
    // d1: 200. d2: 503, 503 (exhausted), then 200 after a retrigger. d3: 200.
    let answers = [Some(200), Some(503), Some(503), Some(200), Some(200)];
    let sender = Arc::new(Scripted(Mutex::new(VecDeque::from(answers))));
    let config = EngineConfig {
        data_dir: dir.path().to_owned(),
        durability: Durability::Flush,
        policy: Policy { retry_schedule_ms: vec![60_000], failures_max: 10, ..Policy::default() },
        delivery: DeliveryConfig { shutdown_timeout: Duration::from_secs(1), ..DeliveryConfig::default() },
        retain: Some(Duration::from_millis(DAY_MS)),
        compact_every: Duration::from_millis(100),
        ..EngineConfig::default()
    };
    let store = SledStore::open(dir.path(), 8 << 20).unwrap();
    let parts = Parts { store: Arc::new(store), clock: Arc::new(clock.clone()), sender };
    let engine = Engine::open_with(config, parts).unwrap();
    let org = OrgId(Uuid::from_u128(0x0190f1f4_0000_7000_8000_000000000001));
    let endpoint = EndpointId(Uuid::from_u128(0x0190f1f4_0000_7000_8000_0000000000e1));
    let run = |command| engine.execute_blocking(Actor::admin(), command).unwrap();
    run(crm_endpoint(endpoint, org));
    let publish = |n: u128| {
        let id = EventId(Uuid::from_u128(0x0190f1f4_0000_7000_8000_0000000000f0 + n));
        let payload = format!(r#"{{"call":{n}}}"#).into_bytes();
        let command = Cmd::Publish {
            id,
            org_id: org,
            event_type: "call.ended".into(),
            payload,
            call_id: None,
            webhook_url: None,
            idempotency_key: None,
            ordering_key: None,
        };
        match run(command) {
            Reply::Published { delivery_ids, .. } => (id, delivery_ids[0]),
            other => panic!("{other:?}"),
        }
    };
    let status = |d| engine.delivery(d).unwrap().map(|d| d.status);
    let (e1, d1) = publish(1);
    assert!(engine.settle(Duration::from_secs(10)));
    let (e2, d2) = publish(2);
    assert!(engine.settle(Duration::from_secs(10)));
    clock.set_ms(engine.delivery(d2).unwrap().unwrap().next_attempt_at_ms.unwrap());
    assert!(engine.settle(Duration::from_secs(10)));
    assert_eq!((status(d1), status(d2)), (Some(DeliveryStatus::Delivered), Some(DeliveryStatus::Exhausted)));

    // Two days on, the retention thread (every 100 ms here) compacts.
    clock.set_ms(T0 + 2 * DAY_MS);
    let (e3, d3) = publish(3);
    assert!(engine.settle(Duration::from_secs(10)));
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while engine.retention_stats().deliveries_dropped == 0 {
        assert!(std::time::Instant::now() < deadline, "no compaction: {:?}", engine.retention_stats());
        std::thread::sleep(Duration::from_millis(50));
    }
    let stats = engine.retention_stats();
    assert_eq!((stats.deliveries_dropped, stats.events_dropped, stats.failures), (1, 1, 0), "{stats:?}");
    assert_eq!(status(d1), None, "delivered more than a day ago: dropped");
    assert!(engine.event(e1).unwrap().is_none());
    assert_eq!(status(d2), Some(DeliveryStatus::Exhausted), "never dropped");
    assert_eq!(engine.event(e2).unwrap().unwrap().payload, br#"{"call":2}"#.to_vec());
    assert_eq!(engine.attempts(d2, 0, 10).unwrap().len(), 2);
    assert_eq!(status(d3), Some(DeliveryStatus::Delivered), "delivered within the retention");
    // The kept delivery is served and retriggered as before (its payload comes from the checkpoint).
    run(Cmd::Retrigger { delivery_id: d2 });
    assert!(engine.settle(Duration::from_secs(10)));
    assert_eq!(status(d2), Some(DeliveryStatus::Delivered));
    engine.shutdown();
    drop(engine);

    let path = dir.path().to_str().unwrap();
    let verified = herald(&["verify", "--data-dir", path], None);
    assert!(verified.status.success(), "{}", String::from_utf8_lossy(&verified.stderr));
    assert!(text(&verified).contains("were compacted"), "{}", text(&verified));
    // The story of the kept delivery opens with the state the compaction kept, attempts included.
    let out = herald(&["replay", "--data-dir", path, "--delivery", &d2.to_string()], None);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let story: Vec<String> = text(&out).lines().map(str::to_owned).collect();
    assert!(matches(&story[0], &format!("(records through seq * were compacted) delivery {d2} of event {e2}: exhausted after 2 attempts, as kept at the checkpoint")), "{story:?}");
    assert!(
        matches(&story[1], "    attempt 1 started 2026-03-15T10:00:00.000Z: failed, HTTP 503 (HTTP 503)"),
        "{story:?}"
    );
    assert!(
        story.iter().any(|l| matches(l, &format!("*delivery {d2}: retrigger requested by the admin*"))),
        "{story:?}"
    );
    assert!(story.iter().any(|l| matches(l, &format!("*delivery {d2}: pending -> delivered"))), "{story:?}");
    let gone = herald(&["replay", "--data-dir", path, "--delivery", &d1.to_string()], None);
    assert!(!gone.status.success());
    let _ = e3;

    // export → import → verify: the anchor and checkpoint travel with the records.
    let export = herald(&["export", "--data-dir", path], None);
    assert!(export.status.success());
    assert!(text(&export).lines().next().unwrap().starts_with("{\"anchor\""));
    let copy = tempfile::tempdir().unwrap();
    let target = copy.path().join("data");
    let import = herald(&["import", "--data-dir", target.to_str().unwrap()], Some(&export.stdout));
    assert!(import.status.success(), "{}", String::from_utf8_lossy(&import.stderr));
    let again = herald(&["verify", "--data-dir", target.to_str().unwrap()], None);
    assert_eq!(text(&again), text(&verified));

    // `herald compact` on the stopped data: with a retention of 1 s, every delivered story goes.
    let compacted = herald(&["compact", "--data-dir", path, "--retain", "1s"], None);
    assert!(compacted.status.success(), "{}", String::from_utf8_lossy(&compacted.stderr));
    assert!(text(&compacted).contains("2 delivered deliveries and 2 events"), "{}", text(&compacted));
    let verified = herald(&["verify", "--data-dir", path], None);
    assert!(verified.status.success(), "{}", String::from_utf8_lossy(&verified.stderr));
    let none = herald(&["compact", "--data-dir", path], None);
    assert_eq!(none.status.code(), Some(2), "no retention given nor configured");
    // --vacuum rewrites the store: the same data, verified, on a smaller file.
    let vacuumed = herald(&["compact", "--data-dir", path, "--vacuum"], None);
    assert!(vacuumed.status.success(), "{}", String::from_utf8_lossy(&vacuumed.stderr));
    assert!(text(&vacuumed).starts_with("vacuumed: "), "{}", text(&vacuumed));
    let after = herald(&["verify", "--data-dir", path], None);
    assert_eq!(text(&after), text(&verified), "the same chain and projection after a vacuum");
}

#[test]
fn the_offline_tools_refuse_a_store_a_running_herald_holds_and_name_the_routes_that_answer_instead() {
    let dir = tempfile::tempdir().unwrap();
    let s = write_story(dir.path());
    // This process holds the store open, as a running server does.
    let held = SledStore::open(dir.path(), 1 << 20).unwrap();
    let data = dir.path().to_str().unwrap();
    for args in [
        vec!["replay", "--data-dir", data, "--delivery", &s.delivery.to_string()],
        vec!["verify", "--data-dir", data],
    ] {
        let out = herald(&args, None);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(&format!("{data} is in use by another herald process")), "{args:?}: {err}");
        assert!(err.contains("GET /v1/webhook_deliveries/{id}/history"), "{args:?}: {err}");
        assert!(text(&out).is_empty(), "{args:?} wrote to stdout");
    }
    drop(held);
    let out = herald(&["replay", "--data-dir", data, "--delivery", &s.delivery.to_string()], None);
    assert!(out.status.success(), "once the store is free: {}", String::from_utf8_lossy(&out.stderr));
}
