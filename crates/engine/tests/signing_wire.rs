//! The signatures herald puts on the wire, checked by an independent verifier (the
//! `standardwebhooks` crate) on the requests the dispatcher actually makes, not on `sign`'s output.
//!
//! `standardwebhooks` judges the timestamp against the wall clock (5 minutes either way), so the
//! manual clock starts at the wall clock's time and each test moves it less than that.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use herald_engine::clock::ManualClock;
use herald_engine::sender::{AttemptRequest, FailureKind, SendFuture, SendOutcome, Sender};
use herald_engine::signing::{verify, Secret};
use herald_engine::{Actor, Command, Engine, EngineConfig, EngineError, Parts, Reply};
use herald_log::{MemStore, Store};
use herald_projector::{DeliveryId, DeliveryStatus, EndpointId, EventId, OrgId, Policy};
use reqwest::header::{HeaderMap, HeaderName, HeaderValue};
use standardwebhooks::{Webhook, WebhookError};
use uuid::Uuid;

const SETTLE: Duration = Duration::from_secs(10);
const ORG: OrgId = OrgId(Uuid::from_u128(7));

/// A receiver that records every request, refuses the first `failures` connections, then answers 200.
#[derive(Default)]
struct Recorder {
    requests: Mutex<Vec<AttemptRequest>>,
    failures: AtomicUsize,
}

impl Sender for Recorder {
    fn send(&self, req: AttemptRequest) -> SendFuture<'_> {
        self.requests.lock().unwrap().push(req);
        let fail =
            self.failures.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1)).is_ok();
        Box::pin(async move {
            if fail {
                SendOutcome::Failed { kind: FailureKind::Connect, error: "connection refused".into() }
            } else {
                SendOutcome::Response { status: 200, excerpt: b"ok".to_vec(), retry_after_ms: None }
            }
        })
    }
}

struct World {
    clock: ManualClock,
    sender: Arc<Recorder>,
    engine: Engine,
}

impl World {
    fn new(retry_schedule_ms: Vec<u64>, rotation_overlap_ms: u64) -> World {
        let config = EngineConfig {
            policy: Policy { retry_schedule_ms, rotation_overlap_ms, ..Policy::default() },
            ..EngineConfig::default()
        };
        let wall_ms = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as u64;
        let clock = ManualClock::new(wall_ms);
        let sender = Arc::new(Recorder::default());
        let parts = Parts {
            store: Arc::new(MemStore::new()) as Arc<dyn Store>,
            clock: Arc::new(clock.clone()),
            sender: sender.clone(),
        };
        World { clock, sender, engine: Engine::open_with(config, parts).unwrap() }
    }

    /// An endpoint of `ORG` subscribed to everything, with a generated secret.
    fn endpoint(&self) -> (EndpointId, Secret) {
        let id = EndpointId(Uuid::now_v7());
        let reply = self.engine.execute_blocking(
            Actor::admin(),
            Command::CreateEndpoint {
                id,
                org_id: ORG,
                url: "https://receiver.example/hook".into(),
                name: "crm".into(),
                enabled_events: vec!["*".into()],
                secret: None,
                settings: Default::default(),
            },
        );
        (id, secret_of(reply))
    }

    fn publish(&self, payload: &[u8], webhook_url: Option<&str>) -> (EventId, Vec<DeliveryId>) {
        let reply = self.engine.execute_blocking(
            Actor { org_id: Some(ORG), key_id: None },
            Command::Publish {
                id: EventId(Uuid::now_v7()),
                org_id: ORG,
                event_type: "call.ended".into(),
                payload: payload.to_vec(),
                call_id: None,
                webhook_url: webhook_url.map(str::to_owned),
                idempotency_key: None,
                ordering_key: None,
            },
        );
        match reply {
            Ok(Reply::Published { id, delivery_ids, .. }) => (id, delivery_ids),
            other => panic!("{other:?}"),
        }
    }

    fn settle(&self) {
        assert!(self.engine.settle(SETTLE), "not settled: {:?}", self.engine.dispatch_stats());
    }

    fn advance(&self, ms: u64) {
        self.clock.advance_ms(ms);
        self.settle();
    }

    fn requests(&self) -> Vec<AttemptRequest> {
        self.sender.requests.lock().unwrap().clone()
    }
}

fn secret_of(reply: Result<Reply, EngineError>) -> Secret {
    match reply {
        Ok(Reply::Endpoint { secret, .. }) => Secret::parse(&secret).unwrap(),
        other => panic!("{other:?}"),
    }
}

fn header<'a>(req: &'a AttemptRequest, name: &str) -> &'a str {
    req.headers
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v.as_str())
        .unwrap_or_else(|| panic!("no {name}"))
}

fn ts(req: &AttemptRequest) -> i64 {
    header(req, "webhook-timestamp").parse().unwrap()
}

/// The request's headers as a receiver gets them, with `webhook-signature` replaced by `signature`
/// when one is given.
fn header_map(req: &AttemptRequest, signature: Option<&str>) -> HeaderMap {
    let mut map = HeaderMap::new();
    for (name, value) in &req.headers {
        map.append(HeaderName::from_bytes(name.as_bytes()).unwrap(), HeaderValue::from_str(value).unwrap());
    }
    if let Some(signature) = signature {
        map.insert("webhook-signature", HeaderValue::from_str(signature).unwrap());
    }
    map
}

/// What `standardwebhooks` makes of `body` under the request's headers (signature overridable).
fn reference(
    secret: &Secret,
    req: &AttemptRequest,
    body: &[u8],
    sig: Option<&str>,
) -> Result<(), WebhookError> {
    Webhook::new(&secret.to_whsec()).unwrap().verify(body, &header_map(req, sig))
}

fn signatures(req: &AttemptRequest) -> Vec<&str> {
    header(req, "webhook-signature").split(' ').collect()
}

#[test]
fn the_headers_herald_sends_verify_with_the_standardwebhooks_crate() {
    let w = World::new(vec![1_000], 60_000);
    let (_, secret) = w.endpoint();
    let payload = r#"{"call_id": 1, "text": "café ☃", "spaces":  "kept"}"#.as_bytes();
    let (event, _) = w.publish(payload, None);
    w.settle();
    let reqs = w.requests();
    assert_eq!(reqs.len(), 1);
    let req = &reqs[0];
    assert_eq!(&req.body[..], payload);
    assert!(verify(&secret, &event.to_string(), ts(req), payload, header(req, "webhook-signature")));
    assert_eq!(header(req, "webhook-id"), event.to_string());
    assert_eq!(ts(req), (w.engine.now_ms() / 1000) as i64);
    reference(&secret, req, &req.body, None).unwrap();
    // Any other body, or another secret, is refused.
    let mut changed = req.body.to_vec();
    changed[1] ^= 0x01;
    assert!(matches!(reference(&secret, req, &changed, None), Err(WebhookError::InvalidSignature)));
    assert!(matches!(
        reference(&Secret::generate().unwrap(), req, &req.body, None),
        Err(WebhookError::InvalidSignature)
    ));
}

#[test]
fn an_inline_webhook_url_is_signed_with_the_organisation_default_secret() {
    let w = World::new(vec![1_000], 60_000);
    let (_, endpoint_secret) = w.endpoint();
    assert_eq!(w.engine.organisation_secret(ORG).unwrap(), None, "no inline publish yet");
    let url = "https://inline.example/calls";
    let payload = br#"{"call_id": 2}"#;
    let (_, deliveries) = w.publish(payload, Some(url));
    w.settle();
    assert_eq!(deliveries.len(), 2, "the endpoint, then the inline url");
    let whsec = w.engine.organisation_secret(ORG).unwrap().expect("an organisation secret");
    let org_secret = Secret::parse(&whsec).unwrap();
    let inline = w.engine.delivery(deliveries[1]).unwrap().unwrap();
    assert_eq!(inline.endpoint_id, None);
    assert_eq!(inline.url, url);
    assert_eq!(inline.status, DeliveryStatus::Delivered);
    let reqs = w.requests();
    assert_eq!(reqs.len(), 2);
    let req = reqs.iter().find(|r| r.url == url).expect("an attempt to the inline url");
    assert_eq!(header(req, "herald-delivery-id"), deliveries[1].to_string());
    assert_eq!(signatures(req).len(), 1);
    reference(&org_secret, req, payload, None).unwrap();
    assert!(reference(&endpoint_secret, req, payload, None).is_err(), "not the endpoint's secret");
    // And the endpoint's attempt is not signed with the organisation's secret.
    let to_endpoint = reqs.iter().find(|r| r.url != url).unwrap();
    reference(&endpoint_secret, to_endpoint, payload, None).unwrap();
    assert!(reference(&org_secret, to_endpoint, payload, None).is_err());
}

#[test]
fn a_delivery_made_before_a_rotation_is_signed_by_the_secrets_valid_when_it_is_attempted() {
    // Retries 1 s and 120 s after a failure (plus up to 10 % jitter); the old secret signs 60 s.
    let w = World::new(vec![1_000, 120_000], 60_000);
    let (endpoint, old) = w.endpoint();
    w.sender.failures.store(2, Ordering::SeqCst);
    let payload = br#"{"call_id": 3}"#;
    let (_, deliveries) = w.publish(payload, None);
    w.settle();
    let reqs = w.requests();
    assert_eq!(reqs.len(), 1);
    assert_eq!(signatures(&reqs[0]).len(), 1);
    reference(&old, &reqs[0], payload, None).unwrap();

    let new = secret_of(
        w.engine.execute_blocking(Actor::admin(), Command::RotateSecret { id: endpoint, secret: None }),
    );
    assert!(reference(&new, &reqs[0], payload, None).is_err(), "the first attempt predates the new secret");

    // The retry, inside the overlap: one signature per secret, the new one first.
    w.advance(1_100);
    let reqs = w.requests();
    assert_eq!(reqs.len(), 2, "the first retry is due");
    let retry = &reqs[1];
    assert_eq!(header(retry, "herald-attempt"), "2");
    let sigs = signatures(retry);
    assert_eq!(sigs.len(), 2, "{sigs:?}");
    reference(&new, retry, payload, Some(sigs[0])).unwrap();
    reference(&old, retry, payload, Some(sigs[1])).unwrap();
    assert!(reference(&old, retry, payload, Some(sigs[0])).is_err());
    assert!(reference(&new, retry, payload, Some(sigs[1])).is_err());
    reference(&old, retry, payload, None).unwrap();
    reference(&new, retry, payload, None).unwrap();

    // The next retry, past the overlap's end: the new secret alone.
    w.advance(119_999);
    assert_eq!(w.requests().len(), 2, "the second retry is not due yet");
    w.advance(12_001);
    let reqs = w.requests();
    assert_eq!(reqs.len(), 3, "the second retry is due");
    let last = &reqs[2];
    assert!(ts(last) - ts(&reqs[0]) > 60, "past the overlap");
    assert_eq!(signatures(last).len(), 1, "{:?}", signatures(last));
    reference(&new, last, payload, None).unwrap();
    assert!(matches!(reference(&old, last, payload, None), Err(WebhookError::InvalidSignature)));
    assert_eq!(w.engine.delivery(deliveries[0]).unwrap().unwrap().status, DeliveryStatus::Delivered);
}
