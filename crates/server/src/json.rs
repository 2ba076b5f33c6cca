//! The JSON shapes of the API. They live here only; the engine knows nothing of JSON.

use std::collections::BTreeMap;

use herald_engine::{
    ApiKey, AttemptRecord, Delivery, DeliveryOrder, DeliverySettings, DeliverySettingsPatch, DeliveryStatus,
    Endpoint, Trigger,
};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::util::{ts, ts_opt};

mod recover;
pub use recover::{RecoverIn, RecoverOut, RecoveryOut};

/// An endpoint (`secret` only when it was just created or rotated).
#[derive(Debug, Serialize, ToSchema)]
pub struct EndpointOut {
    pub id: String,
    pub org_id: String,
    pub name: String,
    pub url: String,
    pub enabled_events: Vec<String>,
    /// `active` or `inactive`.
    pub status: String,
    pub inactive_reason: Option<String>,
    /// The failures since the endpoint's last success; null when its last attempt succeeded or
    /// none failed yet.
    pub failure_run: Option<FailureRunOut>,
    pub created_at: String,
    pub updated_at: String,
    /// Attempts started per second at most; null: no limit.
    #[schema(minimum = 1, maximum = 10000)]
    pub rate_limit_per_s: Option<u32>,
    /// Attempts in flight at most; null: `[delivery] max_in_flight_per_endpoint`.
    #[schema(minimum = 1, maximum = 1024)]
    pub max_in_flight: Option<u32>,
    /// `none` or `per_key`.
    pub ordering: String,
    /// Extra request headers; null when there are none.
    pub headers: Option<BTreeMap<String, String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub secret: Option<String>,
}

impl EndpointOut {
    pub fn new(e: &Endpoint, settings: &DeliverySettings, secret: Option<String>) -> EndpointOut {
        EndpointOut {
            id: e.id.to_string(),
            org_id: e.org_id.to_string(),
            name: e.name.clone(),
            url: e.url.clone(),
            enabled_events: e.enabled_events.clone(),
            status: e.status.name().to_owned(),
            inactive_reason: e.inactive_reason.clone(),
            failure_run: FailureRunOut::new(&e.failure_run_at_ms),
            created_at: ts(e.created_at_ms),
            updated_at: ts(e.updated_at_ms),
            rate_limit_per_s: settings.rate_limit_per_s,
            max_in_flight: settings.max_in_flight,
            ordering: settings.ordering.name().to_owned(),
            headers: (!settings.headers.is_empty()).then(|| settings.headers.iter().cloned().collect()),
            secret,
        }
    }
}

/// An endpoint's run of failures since its last success: what makes it inactive once `failures`
/// reaches `[endpoint_health] failures` within `[endpoint_health] window`.
#[derive(Debug, Serialize, ToSchema)]
pub struct FailureRunOut {
    /// Failures in the run, counted up to `[endpoint_health] failures` (the most the rule needs).
    pub failures: usize,
    /// The oldest counted failure.
    pub first_at: String,
    /// The newest failure.
    pub last_at: String,
}

impl FailureRunOut {
    fn new(run_at_ms: &[u64]) -> Option<FailureRunOut> {
        let first = run_at_ms.iter().copied().min()?;
        let last = run_at_ms.iter().copied().max()?;
        Some(FailureRunOut { failures: run_at_ms.len(), first_at: ts(first), last_at: ts(last) })
    }
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EndpointCreate {
    pub url: String,
    pub name: Option<String>,
    pub enabled_events: Option<Vec<String>>,
    /// `whsec_<base64>`; generated when absent.
    pub secret: Option<String>,
    /// Admin keys only.
    pub org_id: Option<String>,
    /// 1 to 10000 attempts started per second, or null for no limit.
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = Option<u32>, minimum = 1, maximum = 10000)]
    pub rate_limit_per_s: Option<Option<u32>>,
    /// 1 to 1024 attempts in flight, or null for `[delivery] max_in_flight_per_endpoint`.
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = Option<u32>, minimum = 1, maximum = 1024)]
    pub max_in_flight: Option<Option<u32>>,
    /// `none` (the default) or `per_key`.
    pub ordering: Option<String>,
    /// At most 20 extra request headers (names and values visible ASCII, values at most 1 KiB;
    /// not `content-type`, `user-agent`, `host`, `content-length`, `webhook-*`, `herald-*`);
    /// null or `{}` removes them.
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = Option<BTreeMap<String, String>>)]
    pub headers: Option<Option<BTreeMap<String, String>>>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EndpointPatch {
    pub url: Option<String>,
    pub name: Option<String>,
    pub enabled_events: Option<Vec<String>>,
    /// 1 to 10000 attempts started per second, or null for no limit.
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = Option<u32>, minimum = 1, maximum = 10000)]
    pub rate_limit_per_s: Option<Option<u32>>,
    /// 1 to 1024 attempts in flight, or null for `[delivery] max_in_flight_per_endpoint`.
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = Option<u32>, minimum = 1, maximum = 1024)]
    pub max_in_flight: Option<Option<u32>>,
    /// `none` (the default) or `per_key`.
    pub ordering: Option<String>,
    /// At most 20 extra request headers (names and values visible ASCII, values at most 1 KiB;
    /// not `content-type`, `user-agent`, `host`, `content-length`, `webhook-*`, `herald-*`);
    /// null or `{}` removes them.
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = Option<BTreeMap<String, String>>)]
    pub headers: Option<Option<BTreeMap<String, String>>>,
}

/// The delivery settings a create or a patch gives (absent: left as it is, the default on a
/// create; `null`: unset), or a 400 naming the field.
pub fn settings_patch(
    rate_limit_per_s: Option<Option<u32>>,
    max_in_flight: Option<Option<u32>>,
    ordering: Option<&str>,
    headers: Option<Option<BTreeMap<String, String>>>,
) -> Result<DeliverySettingsPatch, String> {
    let ordering = match ordering {
        None => None,
        Some(name) => Some(
            DeliveryOrder::from_name(name)
                .ok_or_else(|| format!("ordering: must be \"none\" or \"per_key\", not {name:?}"))?,
        ),
    };
    Ok(DeliverySettingsPatch {
        rate_limit_per_s,
        max_in_flight,
        ordering,
        headers: headers.map(|h| h.unwrap_or_default().into_iter().collect()),
    })
}

/// A field that is present, `null` included (`Some(None)`); with `#[serde(default)]`, an absent
/// one is `None`.
fn present<'de, D, T>(de: D) -> Result<Option<Option<T>>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::<T>::deserialize(de).map(Some)
}

#[derive(Debug, Serialize, ToSchema)]
pub struct EndpointList {
    pub data: Vec<EndpointOut>,
    pub next_cursor: Option<String>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PublishIn {
    pub event_type: String,
    /// Any JSON value; delivered byte for byte as sent.
    #[schema(value_type = Object)]
    pub payload: Box<serde_json::value::RawValue>,
    pub call_id: Option<String>,
    pub webhook_url: Option<String>,
    /// Admin keys only: the organisation to publish for.
    pub org_id: Option<String>,
    /// 1 to 128 visible ASCII characters: deliveries to an endpoint whose `ordering` is
    /// `per_key` go one at a time per key, in event order. Absent: the `call_id` is the key.
    #[schema(min_length = 1, max_length = 128, pattern = "^[!-~]+$")]
    pub ordering_key: Option<String>,
}

/// [`PublishIn`] borrowing from the request body, so a publish parses its body once and copies
/// only the payload's bytes. Same fields, same rules: a body it refuses is parsed again as
/// [`PublishIn`], whose error names the field.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PublishInRef<'a> {
    #[serde(borrow)]
    pub event_type: std::borrow::Cow<'a, str>,
    #[serde(borrow)]
    pub payload: &'a serde_json::value::RawValue,
    pub call_id: Option<std::borrow::Cow<'a, str>>,
    pub webhook_url: Option<String>,
    pub org_id: Option<std::borrow::Cow<'a, str>>,
    pub ordering_key: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct PublishOut {
    pub id: String,
    pub event_type: String,
    pub created_at: String,
    pub delivery_ids: Vec<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct EventOut {
    pub id: String,
    pub org_id: String,
    pub event_type: String,
    pub call_id: Option<String>,
    #[schema(value_type = Object)]
    pub payload: Box<serde_json::value::RawValue>,
    pub created_at: String,
    pub delivery_ids: Vec<String>,
}

/// The delivery object: seed 003's fields plus `event_id`.
#[derive(Debug, Serialize, ToSchema)]
pub struct DeliveryOut {
    pub id: String,
    pub event_id: String,
    pub org_id: String,
    pub endpoint_id: Option<String>,
    pub call_id: Option<String>,
    /// The event's `ordering_key`, else its `call_id`, else null.
    pub ordering_key: Option<String>,
    pub event_type: String,
    pub url: String,
    /// `pending`, `delivered`, `exhausted` or `inactive`.
    pub status: String,
    pub attempt_count: u32,
    pub manual_retry_count: u32,
    pub next_attempt_at: Option<String>,
    pub last_error: Option<String>,
    pub last_response_status: Option<u16>,
    pub delivered_at: Option<String>,
    pub created_at: String,
    pub updated_at: String,
}

impl DeliveryOut {
    /// The delivery object of `d`, whose event's ordering key is `ordering_key`.
    pub fn new(d: &Delivery, ordering_key: Option<String>) -> Self {
        DeliveryOut {
            id: d.id.to_string(),
            event_id: d.event_id.to_string(),
            org_id: d.org_id.to_string(),
            endpoint_id: d.endpoint_id.map(|e| e.to_string()),
            call_id: d.call_id.map(|c| c.hyphenated().to_string()),
            ordering_key,
            event_type: d.event_type.clone(),
            url: d.url.clone(),
            status: d.status.name().to_owned(),
            attempt_count: d.attempt_count,
            manual_retry_count: d.manual_retry_count,
            next_attempt_at: ts_opt(d.next_attempt_at_ms),
            last_error: d.last_error.clone(),
            last_response_status: d.last_response_status,
            delivered_at: ts_opt(d.delivered_at_ms),
            created_at: ts(d.created_at_ms),
            updated_at: ts(d.updated_at_ms),
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct DeliveryList {
    pub data: Vec<DeliveryOut>,
    pub next_cursor: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct AttemptOut {
    pub attempt: u32,
    /// `auto` or `manual`.
    pub trigger: String,
    pub started_at: String,
    pub finished_at: String,
    pub duration_ms: u64,
    pub response_status: Option<u16>,
    pub error: Option<String>,
    /// The first 4 KiB of the answer, as text (invalid UTF-8 replaced).
    pub response_excerpt: Option<String>,
}

impl From<&AttemptRecord> for AttemptOut {
    fn from(a: &AttemptRecord) -> Self {
        AttemptOut {
            attempt: a.attempt,
            trigger: match a.trigger {
                Trigger::Auto => "auto",
                Trigger::Manual => "manual",
            }
            .to_owned(),
            started_at: ts(a.started_at_ms),
            finished_at: ts(a.finished_at_ms),
            duration_ms: a.duration_ms(),
            response_status: a.response_status,
            error: a.error.clone(),
            response_excerpt: if a.response_excerpt.is_empty() {
                None
            } else {
                Some(String::from_utf8_lossy(&a.response_excerpt).into_owned())
            },
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct AttemptList {
    pub data: Vec<AttemptOut>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ApiKeyCreate {
    /// Absent for an admin key (which must then hold the `admin` scope).
    pub org_id: Option<String>,
    pub scopes: Vec<String>,
    pub name: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ApiKeyOut {
    pub id: String,
    /// Only in the answer to its creation.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    pub org_id: Option<String>,
    pub scopes: Vec<String>,
    pub name: String,
    pub created_at: String,
    pub revoked_at: Option<String>,
}

impl ApiKeyOut {
    pub fn new(k: &ApiKey, key: Option<String>) -> ApiKeyOut {
        ApiKeyOut {
            id: k.id.to_string(),
            key,
            org_id: k.org_id.map(|o| o.to_string()),
            scopes: k.scopes.iter().map(|s| s.name().to_owned()).collect(),
            name: k.name.clone(),
            created_at: ts(k.created_at_ms),
            revoked_at: ts_opt(k.revoked_at_ms),
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ApiKeyList {
    pub data: Vec<ApiKeyOut>,
    pub next_cursor: Option<String>,
}

/// Seed 000's answer.
#[derive(Debug, Serialize, ToSchema)]
pub struct RetriggerOut {
    pub status: String,
    pub failure_id: String,
}

/// Seed 001's webhook of a failure.
#[derive(Debug, Serialize, ToSchema)]
pub struct FailureWebhook {
    pub id: Option<String>,
    pub name: Option<String>,
}

/// Seed 001's failure: a delivery in `inactive` or `exhausted` state.
#[derive(Debug, Serialize, ToSchema)]
pub struct WebhookFailure {
    pub id: String,
    /// The event type.
    pub event: String,
    /// `inactive` or `exhausted`.
    pub status: String,
    /// The last error, e.g. "Connection timeout" or "HTTP 503".
    pub reason: Option<String>,
    pub webhook: FailureWebhook,
    pub last_attempt_at: Option<String>,
    pub created_at: String,
    pub updated_at: String,
}

impl WebhookFailure {
    pub fn new(d: &Delivery, endpoint_name: Option<String>) -> WebhookFailure {
        WebhookFailure {
            id: d.id.to_string(),
            event: d.event_type.clone(),
            status: d.status.name().to_owned(),
            reason: d.last_error.clone().or_else(|| d.inactive_reason.clone()),
            webhook: FailureWebhook { id: d.endpoint_id.map(|e| e.to_string()), name: endpoint_name },
            last_attempt_at: ts_opt(d.last_attempt_at_ms),
            created_at: ts(d.created_at_ms),
            updated_at: ts(d.updated_at_ms),
        }
    }
}

pub fn is_failure(status: DeliveryStatus) -> bool {
    matches!(status, DeliveryStatus::Inactive | DeliveryStatus::Exhausted)
}

#[derive(Debug, Serialize, ToSchema)]
pub struct FailureOut {
    pub webhook_failure: WebhookFailure,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct FailureList {
    pub webhook_failures: Vec<WebhookFailure>,
    pub next_cursor: Option<String>,
}

/// Seed 002's request.
#[derive(Debug, Deserialize, ToSchema)]
pub struct BatchRetriggerIn {
    #[serde(rename = "webhookNotificationIds")]
    pub webhook_notification_ids: Vec<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct BatchItemOut {
    #[serde(rename = "webhookNotificationId")]
    pub webhook_notification_id: String,
    #[serde(rename = "retriggeredNotificationRequestId")]
    pub retriggered_notification_request_id: Option<String>,
    pub error: Option<String>,
}

/// Seed 002's answer.
#[derive(Debug, Serialize, ToSchema)]
pub struct BatchRetriggerOut {
    #[serde(rename = "totalRequested")]
    pub total_requested: u32,
    #[serde(rename = "totalSuccess")]
    pub total_success: u32,
    #[serde(rename = "totalFailed")]
    pub total_failed: u32,
    #[serde(rename = "successfulNotifications")]
    pub successful_notifications: Vec<BatchItemOut>,
    #[serde(rename = "failedNotifications")]
    pub failed_notifications: Vec<BatchItemOut>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Health {
    pub status: String,
}
