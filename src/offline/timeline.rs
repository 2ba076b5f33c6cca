//! How a replay reads: each record of the story, each state change and each delivery kept at a
//! checkpoint as a line of text or an NDJSON object.

use std::io::Write;

use herald_log::Record;
use herald_projector::{
    decode_actor, AttemptOutcome, Delivery, DeliveryId, DeliveryStatus, EndpointId, Event, ReadTables,
    RecordActor, Trigger,
};
use serde_json::{json, Value};

use super::{ts, OfflineError};

/// A delivery as a compaction kept it at the checkpoint (at `anchor_seq`), with its attempts.
pub(super) fn write_kept_delivery(
    out: &mut dyn Write,
    ndjson: bool,
    tables: &impl ReadTables,
    anchor_seq: u64,
    d: &Delivery,
) -> Result<(), OfflineError> {
    let attempts =
        herald_projector::attempts(tables, d.id, 0, 1000).map_err(OfflineError::CheckpointCorrupt)?;
    if ndjson {
        let line = json!({"seq": anchor_seq, "type": "Checkpoint", "delivery_id": d.id.to_string(),
            "event_id": d.event_id.to_string(), "status": d.status.name(), "attempt_count": d.attempt_count,
            "attempts": attempts.iter().map(|a| json!({"attempt": a.attempt, "started_at": ts(a.started_at_ms),
                "status": a.response_status, "error": a.error})).collect::<Vec<_>>()});
        return writeln!(out, "{line}").map_err(OfflineError::Write);
    }
    writeln!(
        out,
        "(records through seq {anchor_seq} were compacted) delivery {} of event {}: {} after {} attempts, as kept at the checkpoint",
        d.id, d.event_id, d.status.name(), d.attempt_count
    )
    .map_err(OfflineError::Write)?;
    for a in &attempts {
        let result = attempt_result(a.response_status, a.error.as_deref());
        writeln!(out, "    attempt {} started {}: {result}", a.attempt, ts(a.started_at_ms))
            .map_err(OfflineError::Write)?;
    }
    Ok(())
}

/// A followed delivery's status changed with record `r`.
pub(super) fn write_state(
    out: &mut dyn Write,
    ndjson: bool,
    r: &Record,
    id: DeliveryId,
    from: Option<DeliveryStatus>,
    to: DeliveryStatus,
) -> Result<(), OfflineError> {
    if ndjson {
        let line = json!({"seq": r.seq, "at": ts(r.at_ms), "type": "StateChanged", "delivery_id": id.to_string(),
            "from": from.map(|s| s.name()), "to": to.name()});
        writeln!(out, "{line}").map_err(OfflineError::Write)
    } else {
        let from = from.map_or("(new)", |s| s.name());
        writeln!(out, "{}  seq {:>6}    delivery {id}: {from} -> {}", ts(r.at_ms), r.seq, to.name())
            .map_err(OfflineError::Write)
    }
}

/// Record `r`, whose event is `event`, as a step of the story, with who acted: in NDJSON an
/// `actor` as `/v1/audit/log` shows it; in text `[by API key ...]` or `[by herald]` at the end,
/// nothing for a record written before records named their actor.
pub(super) fn write_step(
    out: &mut dyn Write,
    ndjson: bool,
    r: &Record,
    event: &Event,
) -> Result<(), OfflineError> {
    // The event decoded, so its envelope does.
    let actor = decode_actor(&r.body).map_err(|error| OfflineError::Decode { seq: r.seq, error })?;
    if ndjson {
        let mut line = herald_server::audit_event(event);
        if let Value::Object(map) = &mut line {
            map.insert("seq".into(), json!(r.seq));
            map.insert("at".into(), json!(ts(r.at_ms)));
            map.insert("actor".into(), herald_server::audit_actor(actor));
        }
        return writeln!(out, "{line}").map_err(OfflineError::Write);
    }
    let by = match actor {
        Some(RecordActor::Key(id)) => format!("  [by API key {id}]"),
        Some(RecordActor::System) => "  [by herald]".to_owned(),
        None => String::new(),
    };
    writeln!(out, "{}  seq {:>6}  {}{by}", ts(r.at_ms), r.seq, step_text(event)).map_err(OfflineError::Write)
}

/// What an event says, in words.
fn step_text(event: &Event) -> String {
    match event {
        Event::PolicySet(p) => format!(
            "policy: retry schedule {:?} ms, {} failures within {} ms make an endpoint inactive",
            p.retry_schedule_ms, p.failures_max, p.failure_window_ms
        ),
        Event::EventPublished { id, org_id, event_type, payload, .. } => {
            format!("event {id} published: {event_type}, {} bytes, organisation {org_id}", payload.len())
        }
        Event::DeliveryCreated { id, endpoint_id, url, .. } => delivery_created(*id, *endpoint_id, url),
        Event::EventPublishedWithDeliveries { id, org_id, event_type, payload, deliveries, .. } => {
            let mut text =
                format!("event {id} published: {event_type}, {} bytes, organisation {org_id}", payload.len());
            for d in deliveries {
                text.push_str("; ");
                text.push_str(&delivery_created(d.id, d.endpoint_id, &d.url));
            }
            text
        }
        Event::AttemptRecorded {
            delivery_id,
            attempt,
            trigger,
            started_at_ms,
            finished_at_ms,
            outcome,
            retry_at_ms,
            ..
        } => format!(
            "delivery {delivery_id}: attempt {attempt} ({}) started {}, {} ms: {}{}",
            match trigger {
                Trigger::Auto => "auto",
                Trigger::Manual => "manual",
            },
            ts(*started_at_ms),
            finished_at_ms.saturating_sub(*started_at_ms),
            outcome_text(outcome),
            retry_at_ms.map_or(String::new(), |t| format!("; next automatic attempt at {}", ts(t)))
        ),
        Event::RetriggerRequested { delivery_id, by_key, request_id } => format!(
            "delivery {delivery_id}: retrigger requested by {} (request {request_id})",
            by_key.map_or("the admin".to_owned(), |k| format!("API key {k}"))
        ),
        Event::RedeliverRequested { delivery_id, by_key } => format!(
            "delivery {delivery_id}: redeliver requested by {}",
            by_key.map_or("the admin".to_owned(), |k| format!("API key {k}"))
        ),
        Event::RulesAdopted { version } => format!("fold rules version {version} from here on"),
        other => endpoint_text(other).unwrap_or_else(|| format!("{other:?}")),
    }
}

/// How an attempt ended, in words.
fn outcome_text(outcome: &AttemptOutcome) -> String {
    match outcome {
        AttemptOutcome::Delivered { status } => attempt_result(Some(*status), None),
        AttemptOutcome::Failed { status, error } => attempt_result(*status, Some(error)),
        AttemptOutcome::Interrupted { error } => {
            format!("cut short, not a failure ({error}); attempted again at the same step")
        }
    }
}

/// A change of an endpoint in words; `None` for any other event.
fn endpoint_text(event: &Event) -> Option<String> {
    Some(match event {
        Event::EndpointCreated { id, url, name, .. } => format!("endpoint {id} created: {name:?} at {url}"),
        Event::EndpointUpdated { id, url, name, enabled_events } => format!(
            "endpoint {id} updated:{}{}{}",
            url.as_ref().map_or(String::new(), |u| format!(" url {u}")),
            name.as_ref().map_or(String::new(), |n| format!(" name {n:?}")),
            enabled_events.as_ref().map_or(String::new(), |e| format!(" events {e:?}"))
        ),
        Event::EndpointDeleted { id } => format!("endpoint {id} deleted"),
        Event::EndpointSecretRotated { id, previous_expires_at_ms, .. } => {
            format!(
                "endpoint {id}: secret rotated; the previous one signs until {}",
                ts(*previous_expires_at_ms)
            )
        }
        Event::EndpointEnabled { id } => format!("endpoint {id} enabled"),
        Event::EndpointDeliverySettingsSet { id, settings } => format!(
            "endpoint {id} delivery settings: rate limit {}, in flight at most {}, ordering {}, {} extra header(s)",
            settings.rate_limit_per_s.map_or("none".into(), |r| format!("{r}/s")),
            settings.max_in_flight.map_or("the configured default".into(), |m| m.to_string()),
            settings.ordering.name(),
            settings.headers.len()
        ),
        Event::OrderingKeySet { event_id, ordering_key } => match ordering_key {
            Some(key) => format!("event {event_id}: ordering key {key:?}"),
            None => format!("event {event_id}: ordered by its call id"),
        },
        _ => return None,
    })
}

fn delivery_created(id: DeliveryId, endpoint_id: Option<EndpointId>, url: &str) -> String {
    match endpoint_id {
        Some(e) => format!("delivery {id} created for endpoint {e} ({url})"),
        None => format!("delivery {id} created for the inline url {url}"),
    }
}

/// How an attempt ended, for the timeline: its answer's status and its error, if any.
fn attempt_result(status: Option<u16>, error: Option<&str>) -> String {
    match (error, status) {
        (None, Some(s)) => format!("delivered, HTTP {s}"),
        (Some(e), Some(s)) => format!("failed, HTTP {s} ({e})"),
        (Some(e), None) => format!("failed: {e}"),
        (None, None) => "no answer".into(),
    }
}
