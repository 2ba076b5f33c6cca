//! Who acted, end to end: every record a request writes names the API key that made the
//! request in `/v1/audit/log`, herald's own records name the system, and a store written before
//! records named their actor still opens and shows `"actor": null` on its old records.

mod common;

use std::sync::Arc;

use common::{Receiver, Server, ADMIN_KEY, ORG_SCOPES};
use herald::log::{Durability, Log, LogConfig, Machine, SledStore, Store, Tx, WriteBatch};
use herald::projector::{
    apply, encode_v1, ApiKeyId, DeliveryId, EndpointId, Event, EventId, NewDelivery, OrgId, Scope, TxTables,
    RULES_CURRENT,
};
use serde_json::{json, Value};
use uuid::Uuid;

/// The audit log from the start, one JSON value a line, once durable through what the API shows.
fn audit(server: &Server) -> Vec<Value> {
    server.wait_durable();
    let (status, text) = server
        .try_call("GET", "/v1/audit/log?after=0&limit=10000", Some(ADMIN_KEY), None)
        .expect("the audit log");
    assert_eq!(status, 200, "{text}");
    text.lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}"))).collect()
}

fn key_actor(id: &str) -> Value {
    json!({"kind": "key", "key_id": id})
}

/// The actor of each record of event type `kind`, in log order.
fn actors_of(lines: &[Value], kind: &str) -> Vec<Value> {
    lines.iter().filter(|l| l["event"]["type"] == kind).map(|l| l["actor"].clone()).collect()
}

#[test]
fn every_change_names_the_key_that_made_it_and_herald_names_itself() {
    let server = Server::start();
    let receiver = Receiver::start();
    receiver.set_status(500);
    // The admin key (created at start by the host: the system) creates an organisation's key.
    let org = Uuid::now_v7().to_string();
    let (status, created) = server.call(
        "POST",
        "/v1/api_keys",
        Some(ADMIN_KEY),
        Some(json!({"org_id": org, "scopes": ORG_SCOPES, "name": "ops"})),
    );
    assert_eq!(status, 201, "{created}");
    let key = created["key"].as_str().unwrap().to_owned();
    let key_id = created["id"].as_str().unwrap().to_owned();
    let endpoint = server.endpoint(&key, &receiver.url("/hook"), &["*"]);
    let endpoint_id = endpoint["id"].as_str().unwrap().to_owned();
    let path = format!("/v1/endpoints/{endpoint_id}");
    let (status, body) = server.call("PATCH", &path, Some(&key), Some(json!({"name": "renamed"})));
    assert_eq!(status, 200, "{body}");
    let (status, body) = server.call("POST", &format!("{path}/secret/rotate"), Some(&key), None);
    assert_eq!(status, 200, "{body}");
    let (status, body) = server.call("POST", &format!("{path}/enable"), Some(&key), None);
    assert!(status < 300, "{status} {body}");
    // A publish whose every attempt fails (300 ms, 600 ms): exhausted, then retriggered and
    // delivered, then redelivered.
    let published = server.publish(&key, "call.ended", json!({"call": 1}));
    let delivery = published["delivery_ids"][0].as_str().unwrap().to_owned();
    server.wait_status(&key, &delivery, "exhausted");
    receiver.set_status(200);
    let retrigger = format!("/api/webhooks/v1/failures/{delivery}/retrigger");
    let (status, body) = server.call("POST", &retrigger, Some(&key), None);
    assert_eq!(status, 200, "{body}");
    server.wait_status(&key, &delivery, "delivered");
    let redeliver = format!("/v1/webhook_deliveries/{delivery}/redeliver");
    let (status, body) = server.call("POST", &redeliver, Some(&key), None);
    assert_eq!(status, 200, "{body}");
    receiver.wait_for(5);
    server.wait_status(&key, &delivery, "delivered");
    let (status, body) = server.call("DELETE", &path, Some(&key), None);
    assert!(status < 300, "{status} {body}");
    let (status, body) = server.call("DELETE", &format!("/v1/api_keys/{key_id}"), Some(ADMIN_KEY), None);
    assert!(status < 300, "{status} {body}");

    let lines = audit(&server);
    for line in &lines {
        assert!(line.get("actor").is_some(), "no actor: {line}");
    }
    // The admin key's record was written by herald at start; its id names its later requests.
    let admin_created: Vec<&Value> = lines
        .iter()
        .filter(|l| l["event"]["type"] == "ApiKeyCreated" && l["event"]["org_id"].is_null())
        .collect();
    assert_eq!(admin_created.len(), 1, "{admin_created:?}");
    assert_eq!(admin_created[0]["actor"], json!({"kind": "system"}));
    let admin = key_actor(admin_created[0]["event"]["id"].as_str().unwrap());
    let org_key_created: Vec<Value> = lines
        .iter()
        .filter(|l| l["event"]["type"] == "ApiKeyCreated" && l["event"]["id"] == key_id.as_str())
        .map(|l| l["actor"].clone())
        .collect();
    assert_eq!(org_key_created, std::slice::from_ref(&admin));
    assert_eq!(actors_of(&lines, "ApiKeyRevoked"), [admin]);
    let by_key = key_actor(&key_id);
    for kind in [
        "EndpointCreated",
        "EndpointUpdated",
        "EndpointSecretRotated",
        "EndpointEnabled",
        "EventPublishedWithDeliveries",
        "RetriggerRequested",
        "RedeliverRequested",
        "EndpointDeleted",
    ] {
        assert_eq!(actors_of(&lines, kind), std::slice::from_ref(&by_key), "{kind}");
    }
    // Attempt outcomes (three failures, then two deliveries) and the start's records: herald.
    let attempts = actors_of(&lines, "AttemptRecorded");
    assert_eq!(attempts.len(), 5, "{attempts:?}");
    for actor in
        attempts.iter().chain(&actors_of(&lines, "RulesAdopted")).chain(&actors_of(&lines, "PolicySet"))
    {
        assert_eq!(actor, &json!({"kind": "system"}));
    }
}

/// Appends format-1 bodies and folds each, as herald did before records named their actor.
struct OldHerald;

impl Machine for OldHerald {
    type Command = Vec<(u64, Event)>;
    type Reply = ();
    type Rejection = String;

    fn execute(&mut self, events: Self::Command, tx: &mut Tx<'_>) -> Result<(), String> {
        for (at_ms, event) in events {
            let seq = tx.append(at_ms, encode_v1(&event)).seq;
            apply(&mut TxTables(tx), seq, at_ms, &event).map_err(|e| format!("{e:?}"))?;
        }
        Ok(())
    }
}

#[test]
fn a_store_written_before_actors_opens_and_shows_no_actor_on_its_old_records() {
    let receiver = Receiver::start();
    let dir = tempfile::tempdir().unwrap();
    let org = OrgId(Uuid::now_v7());
    let (key, key_id) = ("sk_e2e_old_key_0123456789abcdef", ApiKeyId(Uuid::now_v7()));
    let endpoint = EndpointId(Uuid::now_v7());
    let (event, delivery) = (EventId(Uuid::now_v7()), DeliveryId(Uuid::now_v7()));
    let now_ms =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64;
    let old = vec![
        (now_ms, Event::RulesAdopted { version: RULES_CURRENT }),
        (
            now_ms,
            Event::ApiKeyCreated {
                id: ApiKeyId(Uuid::now_v7()),
                org_id: None,
                scopes: vec![Scope::Admin],
                name: "admin (bootstrap)".into(),
                key_hash: herald_server::key_hash(ADMIN_KEY),
            },
        ),
        (
            now_ms,
            Event::ApiKeyCreated {
                id: key_id,
                org_id: Some(org),
                scopes: Scope::ALL.into_iter().filter(|s| *s != Scope::Admin).collect(),
                name: "old".into(),
                key_hash: herald_server::key_hash(key),
            },
        ),
        (
            now_ms,
            Event::EndpointCreated {
                id: endpoint,
                org_id: org,
                url: receiver.url("/old"),
                name: "old".into(),
                enabled_events: vec!["*".into()],
                secret: "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw".into(),
            },
        ),
        // A delivery still pending: the new binary attempts it.
        (
            now_ms,
            Event::EventPublishedWithDeliveries {
                id: event,
                org_id: org,
                event_type: "call.ended".into(),
                payload: br#"{"call":1}"#.to_vec(),
                call_id: None,
                idempotency_key: None,
                deliveries: vec![NewDelivery {
                    id: delivery,
                    endpoint_id: Some(endpoint),
                    url: receiver.url("/old"),
                    next_attempt_at_ms: now_ms,
                }],
            },
        ),
    ];
    {
        let store = Arc::new(SledStore::open(dir.path(), 8 << 20).unwrap());
        let log = Log::open(store.clone(), OldHerald, LogConfig::default()).unwrap();
        log.submit(old).unwrap().unwrap();
        log.close();
        drop(log);
        // The format the binary before this one wrote.
        let mut b = WriteBatch::default();
        b.put(herald::log::keyspace::META_FORMAT.to_vec(), vec![4]);
        store.apply(&b).unwrap();
        store.flush(Durability::Sync).unwrap();
    }
    let mut server = Server::start_in(dir, &[]);
    server.wait_status(key, &delivery.to_string(), "delivered");
    // The old key still acts, and its new records name it.
    let path = format!("/v1/endpoints/{endpoint}");
    let (status, body) = server.call("PATCH", &path, Some(key), Some(json!({"name": "renamed"})));
    assert_eq!(status, 200, "{body}");
    let lines = audit(&server);
    let old: Vec<(u64, Value)> =
        lines.iter().take(5).map(|l| (l["seq"].as_u64().unwrap(), l["actor"].clone())).collect();
    assert_eq!(old, (1..=5).map(|seq| (seq, Value::Null)).collect::<Vec<_>>(), "{lines:?}");
    assert_eq!(lines[4]["event"]["type"], "EventPublishedWithDeliveries");
    assert_eq!(actors_of(&lines, "AttemptRecorded"), [json!({"kind": "system"})]);
    assert_eq!(actors_of(&lines, "EndpointUpdated"), [key_actor(&key_id.to_string())]);
    // The store now says it may hold records a binary that knows only format 4 cannot read.
    assert!(server.terminate());
    let store = SledStore::open(&server.data_dir, 8 << 20).unwrap();
    let format = store.get(herald::log::keyspace::META_FORMAT).unwrap();
    assert_eq!(format, Some(vec![herald::log::STORE_FORMAT]));
}
