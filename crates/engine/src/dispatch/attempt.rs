//! One attempt, as its own task: build the signed request, send it, turn the outcome into a
//! `RecordAttempt`, and tell the loop (through the inbox) when the receiver answered and when
//! the record is durable.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use herald_projector::{
    event_payload, get_endpoint, get_event, org_secret, CheckedTables, CompactError, CorruptValue, Delivery,
    DeliverySettings,
};

use super::inbox::{Finished, NotRecorded};
use super::shared::Shared;
use super::throttle::pause_endpoint;
use super::{Ctx, Id};
use crate::commands::{Actor, Command, Commands, Reply, Submitted};
use crate::sender::{AttemptRequest, FailureKind, SendOutcome};
use crate::signing::{sign, Secret};

/// One attempt: build the signed request (with its endpoint's extra headers, from `settings`),
/// send it, record the outcome, tell the loop.
pub(super) async fn attempt(
    ctx: Ctx,
    delivery: Delivery,
    payload: Option<Bytes>,
    settings: Arc<DeliverySettings>,
    settled: Arc<AtomicBool>,
) {
    let started_at_ms = ctx.clock.now_ms();
    let id = *delivery.id.as_bytes();
    let outcome = match request(&ctx, &delivery, started_at_ms, payload, &settings.headers) {
        Ok(req) => ctx.sender.send(req).await,
        Err(RequestError::Invalid(error)) => SendOutcome::Failed { kind: FailureKind::InvalidHeader, error },
        Err(RequestError::StoreRead) => {
            // Nothing is known to be wrong with the delivery, the endpoint or the receiver: not
            // sent, not recorded (it would count against the endpoint's health), and made again
            // shortly, like an attempt whose record failed.
            not_made(&ctx, id, &settled, NotRecorded::Store);
            return;
        }
    };
    if let SendOutcome::Failed { kind: FailureKind::Local, error } = &outcome {
        // The receiver was never reached: nothing to record against it, no step of the
        // schedule used; made again shortly.
        if not_made(&ctx, id, &settled, NotRecorded::LocalFault) {
            ctx.shared.local_fault(&delivery, error);
        }
        return;
    }
    if settled.swap(true, Ordering::SeqCst) {
        return; // the stop cut it short and records it as interrupted
    }
    let finished_at_ms = ctx.clock.now_ms().max(started_at_ms);
    if let SendOutcome::Response { status: 429 | 503, retry_after_ms: Some(after_ms), .. } = &outcome {
        // Told before the slot is freed, so nothing parked behind it starts meanwhile.
        pause_endpoint(&ctx, &delivery, finished_at_ms, *after_ms);
    }
    ctx.shared.inbox.released(id);
    let (outcome, excerpt, retry_after_ms) = recorded_outcome(&ctx.shared, outcome);
    let command = Command::RecordAttempt {
        delivery_id: delivery.id,
        started_at_ms,
        finished_at_ms,
        outcome,
        response_excerpt: excerpt,
        retry_after_ms,
    };
    record(&ctx, id, Submitted { actor: Actor::admin(), at_ms: finished_at_ms, command });
}

/// An attempt that leaves nothing in the log: its slot is freed and the loop makes it again
/// shortly. False if the stop settled it first (it is then recorded as interrupted).
fn not_made(ctx: &Ctx, id: Id, settled: &AtomicBool, why: NotRecorded) -> bool {
    if settled.swap(true, Ordering::SeqCst) {
        return false;
    }
    ctx.shared.inbox.released(id);
    ctx.shared.inbox.finished(Finished { id, result: Err(why) });
    true
}

/// What the sender's outcome is recorded as (with the response excerpt and the receiver's
/// `Retry-After`), counted as delivered or failed.
fn recorded_outcome(
    shared: &Shared,
    outcome: SendOutcome,
) -> (herald_projector::AttemptOutcome, Vec<u8>, Option<u64>) {
    match outcome {
        SendOutcome::Response { status, excerpt, retry_after_ms } if (200..300).contains(&status) => {
            shared.delivered.fetch_add(1, Ordering::Relaxed);
            (herald_projector::AttemptOutcome::Delivered { status }, excerpt, retry_after_ms)
        }
        SendOutcome::Response { status, excerpt, retry_after_ms } => {
            shared.failed.fetch_add(1, Ordering::Relaxed);
            let error = format!("HTTP {status}");
            (
                herald_projector::AttemptOutcome::Failed { status: Some(status), error },
                excerpt,
                retry_after_ms,
            )
        }
        SendOutcome::Failed { error, .. } => {
            shared.failed.fetch_add(1, Ordering::Relaxed);
            (herald_projector::AttemptOutcome::Failed { status: None, error }, Vec::new(), None)
        }
    }
}

/// Submits the attempt's record; the loop hears of it once it is durable (or failed to be).
fn record(ctx: &Ctx, id: Id, submitted: Submitted) {
    let inbox = ctx.shared.inbox.clone();
    let done = move |out: herald_log::Outcome<Commands>| {
        let result = match out {
            Ok(Ok(Reply::Attempted { retry_at_ms })) => Ok(retry_at_ms),
            Ok(Ok(_)) | Ok(Err(_)) | Err(_) => Err(NotRecorded::Store),
        };
        inbox.finished(Finished { id, result });
    };
    if ctx.log.urgent_submit_would_block() {
        // Both writer queues are full: wait for room on a blocking thread, not a runtime worker.
        let log = ctx.log.clone();
        drop(tokio::task::spawn_blocking(move || log.submit_urgent_with(submitted, done)));
    } else {
        ctx.log.submit_urgent_with(submitted, done);
    }
}

/// Why an attempt's request could not be made.
enum RequestError {
    /// The delivery cannot be sent as it stands (a missing endpoint, a bad secret): recorded as
    /// a failed attempt.
    Invalid(String),
    /// The store failed a read: not the delivery's fault, so not recorded.
    StoreRead,
}

impl From<String> for RequestError {
    fn from(e: String) -> Self {
        RequestError::Invalid(e)
    }
}

/// `query` over the store: a read the store failed is a `StoreRead`, never taken for "missing".
fn read<T>(
    ctx: &Ctx,
    query: impl FnOnce(&CheckedTables<'_>) -> Result<T, CorruptValue>,
) -> Result<T, RequestError> {
    match CheckedTables::run(ctx.store.as_ref(), query) {
        Ok(answer) => answer.map_err(|e| RequestError::Invalid(e.to_string())),
        Err(_) => Err(RequestError::StoreRead),
    }
}

/// The signed request of one attempt: the payload as published (`payload`, when it was handed
/// over with the delivery, or read from the store), to the endpoint's current url, signed with
/// every secret valid now. The endpoint's `extra` headers come first, herald's own after them (an
/// extra header never names one of herald's: validation refuses it). The sender adds `user-agent`.
fn request(
    ctx: &Ctx,
    delivery: &Delivery,
    now_ms: u64,
    payload: Option<Bytes>,
    extra: &[(String, String)],
) -> Result<AttemptRequest, RequestError> {
    let (url, secrets) = match delivery.endpoint_id {
        Some(id) => {
            let endpoint =
                read(ctx, |t| get_endpoint(t, id))?.ok_or_else(|| format!("endpoint {id} is missing"))?;
            let secrets = endpoint
                .secrets_valid_at(now_ms)
                .into_iter()
                .map(Secret::parse)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| format!("endpoint secret: {e}"))?;
            (endpoint.url, secrets)
        }
        None => {
            let secret = read(ctx, |t| org_secret(t, delivery.org_id))?
                .ok_or_else(|| format!("organisation {} has no default secret", delivery.org_id))?;
            (delivery.url.clone(), vec![Secret::parse(&secret).map_err(|e| format!("org secret: {e}"))?])
        }
    };
    let payload = match payload {
        Some(payload) => payload,
        None => {
            let event = read(ctx, |t| get_event(t, delivery.event_id))?
                .ok_or_else(|| format!("event {} is missing", delivery.event_id))?;
            match event_payload(ctx.store.as_ref(), &event) {
                Ok(payload) => Bytes::from(payload),
                Err(CompactError::Log(_)) => return Err(RequestError::StoreRead),
                Err(e) => return Err(RequestError::Invalid(e.to_string())),
            }
        }
    };
    let msg_id = delivery.event_id.to_string();
    let timestamp_s = i64::try_from(now_ms / 1000).unwrap_or(i64::MAX);
    let secret_refs: Vec<&Secret> = secrets.iter().collect();
    let signature = sign(&secret_refs, &msg_id, timestamp_s, &payload);
    let mut headers = Vec::with_capacity(extra.len() + 7);
    headers.extend_from_slice(extra);
    headers.extend([
        ("content-type".to_owned(), "application/json".to_owned()),
        ("webhook-id".to_owned(), msg_id),
        ("webhook-timestamp".to_owned(), timestamp_s.to_string()),
        ("webhook-signature".to_owned(), signature),
        ("herald-delivery-id".to_owned(), delivery.id.to_string()),
        ("herald-event-type".to_owned(), delivery.event_type.clone()),
        ("herald-attempt".to_owned(), (delivery.attempt_count + 1).to_string()),
    ]);
    Ok(AttemptRequest { url, headers, body: payload })
}
