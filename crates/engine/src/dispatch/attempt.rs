//! One attempt, as its own task: build the signed request, send it, turn the outcome into a
//! `RecordAttempt`, and tell the loop (through the inbox) when the receiver answered and when
//! the record is durable.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use herald_projector::{
    event_payload, get_endpoint, get_event, org_secret, AttemptOutcome, CheckedTables, CompactError,
    CorruptValue, Delivery, DeliveryId, DeliverySettings, EndpointId, EndpointStatus, EventId,
};

use super::inbox::{Finished, NotRecorded};
use super::shared::Shared;
use super::throttle::pause_endpoint;
use super::{Ctx, Id};
use crate::commands::{Actor, Command, Commands, Reply, Submitted};
use crate::request::RequestId;
use crate::sender::{AttemptRequest, FailureKind, SendOutcome};
use crate::signing::{sign, Secret};

/// One attempt: build the signed request (with its endpoint's extra headers, from `settings`),
/// send it, record the outcome, tell the loop.
pub(super) async fn attempt(
    ctx: Ctx,
    delivery: Delivery,
    (payload, origin): (Option<Bytes>, Option<RequestId>),
    settings: Arc<DeliverySettings>,
    settled: Arc<AtomicBool>,
) {
    let started_at_ms = ctx.clock.now_ms();
    let id = *delivery.id.as_bytes();
    // The endpoint's status when the request was made (read for its url and secrets anyway).
    let mut was_inactive = false;
    let outcome = match request(&ctx, &delivery, started_at_ms, payload, &settings.headers) {
        Ok((req, status)) => {
            was_inactive = status == Some(EndpointStatus::Inactive);
            ctx.sender.send(req).await
        }
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
    let report = Logged::of(&outcome, &delivery, was_inactive, origin);
    let command = Command::RecordAttempt {
        delivery_id: delivery.id,
        started_at_ms,
        finished_at_ms,
        outcome,
        response_excerpt: excerpt,
        retry_after_ms,
    };
    let submitted = Submitted { actor: Actor::admin(), at_ms: finished_at_ms, command, request: origin };
    record(&ctx, id, submitted, report);
}

/// What an attempt's record tells the log once it is durable; each line names the request that
/// published the delivery (`request`), when the loop knows it.
enum Logged {
    Failed {
        delivery_id: DeliveryId,
        event_id: EventId,
        endpoint_id: Option<EndpointId>,
        attempt: u32,
        status: Option<u16>,
        error: String,
        request: Option<RequestId>,
    },
    Reactivated {
        delivery_id: DeliveryId,
        endpoint_id: EndpointId,
        request: Option<RequestId>,
    },
}

impl Logged {
    /// A failure (one line each), or a success to an endpoint that was inactive (the fold makes it
    /// active again). Nothing for other successes.
    fn of(
        outcome: &AttemptOutcome,
        delivery: &Delivery,
        was_inactive: bool,
        request: Option<RequestId>,
    ) -> Option<Logged> {
        match outcome {
            AttemptOutcome::Failed { status, error } => Some(Logged::Failed {
                delivery_id: delivery.id,
                event_id: delivery.event_id,
                endpoint_id: delivery.endpoint_id,
                attempt: delivery.attempt_count + 1,
                status: *status,
                error: error.clone(),
                request,
            }),
            AttemptOutcome::Delivered { .. } => match delivery.endpoint_id {
                Some(endpoint_id) if was_inactive => {
                    Some(Logged::Reactivated { delivery_id: delivery.id, endpoint_id, request })
                }
                _ => None,
            },
            AttemptOutcome::Interrupted { .. } => None,
        }
    }

    /// One line: the failed attempt (with when the next one is made, if it is), or the endpoint
    /// active again.
    fn emit(&self, retry_at_ms: Option<u64>) {
        match self {
            Logged::Failed { delivery_id, event_id, endpoint_id, attempt, status, error, request } => {
                let endpoint_id = endpoint_id.map(|e| e.to_string());
                let next_attempt = retry_at_ms.map_or_else(|| "none".to_owned(), |ms| ms.to_string());
                tracing::warn!(
                    delivery_id = %delivery_id,
                    event_id = %event_id,
                    request_id = request.map(tracing::field::display),
                    endpoint_id = endpoint_id.as_deref().unwrap_or("none"),
                    attempt,
                    status = status.map(u64::from),
                    error = error.as_str(),
                    next_attempt_at_ms = next_attempt.as_str(),
                    "attempt failed"
                );
            }
            Logged::Reactivated { delivery_id, endpoint_id, request } => tracing::info!(
                endpoint_id = %endpoint_id,
                delivery_id = %delivery_id,
                request_id = request.map(tracing::field::display),
                "endpoint active again: an attempt to it succeeded"
            ),
        }
    }
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
fn recorded_outcome(shared: &Shared, outcome: SendOutcome) -> (AttemptOutcome, Vec<u8>, Option<u64>) {
    match outcome {
        SendOutcome::Response { status, excerpt, retry_after_ms } if (200..300).contains(&status) => {
            shared.delivered.fetch_add(1, Ordering::Relaxed);
            (AttemptOutcome::Delivered { status }, excerpt, retry_after_ms)
        }
        SendOutcome::Response { status, excerpt, retry_after_ms } => {
            shared.failed.fetch_add(1, Ordering::Relaxed);
            let error = format!("HTTP {status}");
            (AttemptOutcome::Failed { status: Some(status), error }, excerpt, retry_after_ms)
        }
        SendOutcome::Failed { error, .. } => {
            shared.failed.fetch_add(1, Ordering::Relaxed);
            (AttemptOutcome::Failed { status: None, error }, Vec::new(), None)
        }
    }
}

/// Submits the attempt's record; the loop hears of it once it is durable (or failed to be).
fn record(ctx: &Ctx, id: Id, submitted: Submitted, report: Option<Logged>) {
    let inbox = ctx.shared.inbox.clone();
    let done = move |out: herald_log::Outcome<Commands>| {
        let result = match out {
            Ok(Ok(Reply::Attempted { retry_at_ms })) => Ok(retry_at_ms),
            Ok(Ok(_)) | Ok(Err(_)) | Err(_) => Err(NotRecorded::Store),
        };
        if let (Some(report), Ok(retry_at_ms)) = (&report, &result) {
            report.emit(*retry_at_ms);
        }
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
/// With it, the endpoint's status (none for a delivery to an organisation's webhook url).
fn request(
    ctx: &Ctx,
    delivery: &Delivery,
    now_ms: u64,
    payload: Option<Bytes>,
    extra: &[(String, String)],
) -> Result<(AttemptRequest, Option<EndpointStatus>), RequestError> {
    let (url, secrets, status) = match delivery.endpoint_id {
        Some(id) => {
            let endpoint =
                read(ctx, |t| get_endpoint(t, id))?.ok_or_else(|| format!("endpoint {id} is missing"))?;
            let secrets = endpoint
                .secrets_valid_at(now_ms)
                .into_iter()
                .map(Secret::parse)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| format!("endpoint secret: {e}"))?;
            (endpoint.url, secrets, Some(endpoint.status))
        }
        None => {
            let secret = read(ctx, |t| org_secret(t, delivery.org_id))?
                .ok_or_else(|| format!("organisation {} has no default secret", delivery.org_id))?;
            let secret = Secret::parse(&secret).map_err(|e| format!("org secret: {e}"))?;
            (delivery.url.clone(), vec![secret], None)
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
    Ok((AttemptRequest { url, headers, body: payload }, status))
}
