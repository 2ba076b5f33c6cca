//! The read models the fold maintains: deliveries, endpoints, events, API keys, attempts.

use crate::event::{Scope, Trigger};
use crate::ids::{ApiKeyId, DeliveryId, EndpointId, EventId, OrgId};
use crate::keys;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// The most bytes of a receiver's answer an attempt keeps.
pub const RESPONSE_EXCERPT_BYTES_MAX: usize = 4 * 1024;
/// The most rotated-out secrets an endpoint keeps (the ones expiring first go first).
pub const PREVIOUS_SECRETS_MAX: usize = 16;
/// How long an idempotency key answers with its first event (API.md: 24 h, not configurable).
pub const IDEMPOTENCY_WINDOW_MS: u64 = 24 * 60 * 60 * 1_000;

/// A delivery's state, exactly as API.md's table.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum DeliveryStatus {
    /// Waiting for its next attempt (`next_attempt_at_ms` set).
    Pending,
    /// An attempt got a 2xx answer (`delivered_at_ms` set).
    Delivered,
    /// The automatic schedule is used up while the endpoint stayed active.
    Exhausted,
    /// Its endpoint became inactive (or was deleted): no automatic attempts until retriggered.
    Inactive,
}

impl DeliveryStatus {
    pub const ALL: [DeliveryStatus; 4] = [
        DeliveryStatus::Pending,
        DeliveryStatus::Delivered,
        DeliveryStatus::Exhausted,
        DeliveryStatus::Inactive,
    ];

    /// The status's name in API.md (`pending`, ...).
    pub fn name(self) -> &'static str {
        match self {
            DeliveryStatus::Pending => "pending",
            DeliveryStatus::Delivered => "delivered",
            DeliveryStatus::Exhausted => "exhausted",
            DeliveryStatus::Inactive => "inactive",
        }
    }

    /// Whether this is a "webhook failure" of seeds 000 to 002 (inactive or exhausted).
    pub fn is_failure(self) -> bool {
        matches!(self, DeliveryStatus::Exhausted | DeliveryStatus::Inactive)
    }
}

/// Why a delivery's status changes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Cause {
    Created,
    AttemptSucceeded,
    AttemptFailed,
    /// Its endpoint became inactive through another delivery's failure.
    EndpointInactive,
    EndpointDeleted,
    Retrigger,
    Redeliver,
}

/// Whether a delivery may go from `from` (`None`: it does not exist yet) to `to` because of
/// `cause`. The one place the state machine is written down; the fold asserts it on every change.
pub fn transition_allowed(from: Option<DeliveryStatus>, to: DeliveryStatus, cause: Cause) -> bool {
    use Cause as C;
    use DeliveryStatus::{Delivered, Exhausted, Inactive, Pending};
    matches!(
        (from, to, cause),
        (None, Pending | Inactive, C::Created)
            | (Some(Pending), Delivered, C::AttemptSucceeded)
            // a retry scheduled; the schedule used up; the endpoint inactive (by this failure or
            // already before it, after a retrigger)
            | (Some(Pending), Pending | Exhausted | Inactive, C::AttemptFailed)
            | (Some(Pending), Inactive, C::EndpointInactive | C::EndpointDeleted)
            // an attempt in flight when the endpoint went inactive: record the truth
            | (Some(Inactive), Delivered, C::AttemptSucceeded)
            | (Some(Inactive), Inactive, C::AttemptFailed)
            | (Some(Delivered), Pending, C::Redeliver)
            | (Some(Exhausted | Inactive), Pending, C::Retrigger | C::Redeliver)
    )
}

/// One event going to one endpoint (or to an inline `webhook_url`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Delivery {
    pub id: DeliveryId,
    pub event_id: EventId,
    pub org_id: OrgId,
    /// `None`: an inline delivery.
    pub endpoint_id: Option<EndpointId>,
    pub call_id: Option<Uuid>,
    pub event_type: String,
    pub url: String,
    pub status: DeliveryStatus,
    /// Attempts made, over the delivery's whole life.
    pub attempt_count: u32,
    /// Retriggers and redelivers.
    pub manual_retry_count: u32,
    /// Attempts made since the schedule last (re)started, the manual one that restarts it
    /// included. After such an attempt the engine's next delay is
    /// [`Policy::retry_delay_ms`](crate::Policy::retry_delay_ms)`(attempts_since_reset)`.
    pub attempts_since_reset: u32,
    /// Set exactly when pending.
    pub next_attempt_at_ms: Option<u64>,
    /// What the next attempt counts as.
    pub next_trigger: Trigger,
    pub last_error: Option<String>,
    pub last_response_status: Option<u16>,
    pub last_attempt_at_ms: Option<u64>,
    /// The last success; kept through a redeliver.
    pub delivered_at_ms: Option<u64>,
    /// Why it is inactive (the endpoint's reason, or "endpoint deleted").
    pub inactive_reason: Option<String>,
    pub created_at_ms: u64,
    pub updated_at_ms: u64,
}

impl Delivery {
    /// Every index key this delivery has, in keyspace order (the values are empty).
    pub(crate) fn index_keys(&self) -> Vec<Vec<u8>> {
        let status = keys::status_byte(self.status);
        let org = self.org_id.as_bytes();
        // An organisation's and an endpoint's whole lists are their status partitions, merged.
        let mut out = vec![keys::timed(
            &keys::key(keys::KS_DELIVERY_BY_ORG_STATUS, &[org, &[status]]),
            self.created_at_ms,
            self.id,
        )];
        if let Some(endpoint) = self.endpoint_id {
            out.push(keys::timed(
                &keys::key(keys::KS_DELIVERY_BY_ENDPOINT_STATUS, &[endpoint.as_bytes(), &[status]]),
                self.created_at_ms,
                self.id,
            ));
        }
        out.push(keys::timed(
            &keys::org_type_prefix(self.org_id, &self.event_type),
            self.created_at_ms,
            self.id,
        ));
        if let (DeliveryStatus::Pending, Some(at_ms)) = (self.status, self.next_attempt_at_ms) {
            out.push(keys::due(at_ms, self.id));
        }
        out
    }
}

/// Whether an endpoint receives automatic attempts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum EndpointStatus {
    Active,
    Inactive,
}

impl EndpointStatus {
    /// The status's name in API.md (`active`, `inactive`).
    pub fn name(self) -> &'static str {
        match self {
            EndpointStatus::Active => "active",
            EndpointStatus::Inactive => "inactive",
        }
    }
}

/// A rotated-out secret that still signs until it expires.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PreviousSecret {
    pub secret: String,
    pub expires_at_ms: u64,
}

/// One receiver URL of one organisation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Endpoint {
    pub id: EndpointId,
    pub org_id: OrgId,
    pub name: String,
    pub url: String,
    pub enabled_events: Vec<String>,
    pub status: EndpointStatus,
    pub inactive_reason: Option<String>,
    pub secret: String,
    /// Newest rotation first; at most [`PREVIOUS_SECRETS_MAX`], expired ones dropped at rotation.
    pub previous_secrets: Vec<PreviousSecret>,
    pub deleted_at_ms: Option<u64>,
    /// When each failure since the last success happened (oldest first; at most the policy's
    /// `failures_max` kept).
    pub failure_run_at_ms: Vec<u64>,
    pub created_at_ms: u64,
    pub updated_at_ms: u64,
}

/// Whether a list of enabled events takes `event_type` (by name, through `*` or through a
/// prefix pattern such as `call.*`: [`event_type_matches`](crate::event_type_matches)).
pub fn subscribes(enabled_events: &[String], event_type: &str) -> bool {
    enabled_events.iter().any(|e| crate::pattern::event_type_matches(e, event_type))
}

impl Endpoint {
    /// The secrets that sign an attempt made at `now_ms`: the current one first, then the
    /// rotated-out ones that have not expired, newest first.
    pub fn secrets_valid_at(&self, now_ms: u64) -> Vec<&str> {
        let previous =
            self.previous_secrets.iter().filter(|p| p.expires_at_ms > now_ms).map(|p| p.secret.as_str());
        std::iter::once(self.secret.as_str()).chain(previous).collect()
    }

    /// Whether the endpoint subscribes to `event_type` (see [`subscribes`]).
    pub fn subscribes_to(&self, event_type: &str) -> bool {
        subscribes(&self.enabled_events, event_type)
    }

    pub fn is_deleted(&self) -> bool {
        self.deleted_at_ms.is_some()
    }
}

/// A published event, without its payload (the payload stays in the log, at `seq`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventRecord {
    pub id: EventId,
    pub org_id: OrgId,
    pub event_type: String,
    pub call_id: Option<Uuid>,
    pub idempotency_key: Option<String>,
    pub created_at_ms: u64,
    /// The log record that holds the payload.
    pub seq: u64,
    /// In creation order.
    pub delivery_ids: Vec<DeliveryId>,
}

/// What an idempotency key answered first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdempotencyHit {
    pub event_id: EventId,
    pub at_ms: u64,
}

/// An API key's record (the key itself is never stored; its hash is).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiKey {
    pub id: ApiKeyId,
    /// `None`: an admin key, for every organisation.
    pub org_id: Option<OrgId>,
    pub scopes: Vec<Scope>,
    pub name: String,
    pub key_hash: [u8; 32],
    pub created_at_ms: u64,
    pub revoked_at_ms: Option<u64>,
}

impl ApiKey {
    /// Whether the key grants `scope` (`Admin` grants every scope). A revoked key grants none.
    pub fn allows(&self, scope: Scope) -> bool {
        self.revoked_at_ms.is_none() && self.scopes.iter().any(|&s| s == scope || s == Scope::Admin)
    }
}

/// One attempt, as `GET /v1/webhook_deliveries/{id}/attempts` shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttemptRecord {
    pub attempt: u32,
    pub trigger: Trigger,
    pub started_at_ms: u64,
    pub finished_at_ms: u64,
    pub response_status: Option<u16>,
    /// `None` for a success.
    pub error: Option<String>,
    pub response_excerpt: Vec<u8>,
}

impl AttemptRecord {
    pub fn duration_ms(&self) -> u64 {
        self.finished_at_ms.saturating_sub(self.started_at_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use DeliveryStatus::*;

    /// The whole table: every (from, to, cause) not listed here is forbidden.
    #[test]
    fn transition_table() {
        let allowed: &[(Option<DeliveryStatus>, DeliveryStatus, Cause)] = &[
            (None, Pending, Cause::Created),
            (None, Inactive, Cause::Created),
            (Some(Pending), Delivered, Cause::AttemptSucceeded),
            (Some(Pending), Pending, Cause::AttemptFailed),
            (Some(Pending), Exhausted, Cause::AttemptFailed),
            (Some(Pending), Inactive, Cause::AttemptFailed),
            (Some(Pending), Inactive, Cause::EndpointInactive),
            (Some(Pending), Inactive, Cause::EndpointDeleted),
            (Some(Inactive), Delivered, Cause::AttemptSucceeded),
            (Some(Inactive), Inactive, Cause::AttemptFailed),
            (Some(Delivered), Pending, Cause::Redeliver),
            (Some(Exhausted), Pending, Cause::Retrigger),
            (Some(Exhausted), Pending, Cause::Redeliver),
            (Some(Inactive), Pending, Cause::Retrigger),
            (Some(Inactive), Pending, Cause::Redeliver),
        ];
        let causes = [
            Cause::Created,
            Cause::AttemptSucceeded,
            Cause::AttemptFailed,
            Cause::EndpointInactive,
            Cause::EndpointDeleted,
            Cause::Retrigger,
            Cause::Redeliver,
        ];
        let froms = std::iter::once(None).chain(DeliveryStatus::ALL.map(Some));
        for from in froms {
            for to in DeliveryStatus::ALL {
                for cause in causes {
                    assert_eq!(
                        transition_allowed(from, to, cause),
                        allowed.contains(&(from, to, cause)),
                        "{from:?} -> {to:?} by {cause:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn secrets_valid_at_lists_current_first_then_unexpired() {
        let endpoint = Endpoint {
            id: EndpointId(Uuid::from_u128(1)),
            org_id: OrgId(Uuid::from_u128(2)),
            name: String::new(),
            url: String::new(),
            enabled_events: vec!["a.b".into()],
            status: EndpointStatus::Active,
            inactive_reason: None,
            secret: "s3".into(),
            previous_secrets: vec![
                PreviousSecret { secret: "s2".into(), expires_at_ms: 200 },
                PreviousSecret { secret: "s1".into(), expires_at_ms: 100 },
            ],
            deleted_at_ms: None,
            failure_run_at_ms: vec![],
            created_at_ms: 0,
            updated_at_ms: 0,
        };
        let cases: [(u64, &[&str]); 4] =
            [(0, &["s3", "s2", "s1"]), (99, &["s3", "s2", "s1"]), (100, &["s3", "s2"]), (200, &["s3"])];
        for (now_ms, expected) in cases {
            assert_eq!(endpoint.secrets_valid_at(now_ms), expected, "at {now_ms}");
        }
        assert!(endpoint.subscribes_to("a.b"));
        assert!(!endpoint.subscribes_to("a.c"));
    }

    #[test]
    fn admin_scope_implies_every_scope_and_revocation_removes_all() {
        let mut key = ApiKey {
            id: ApiKeyId(Uuid::from_u128(1)),
            org_id: None,
            scopes: vec![Scope::Admin],
            name: String::new(),
            key_hash: [0; 32],
            created_at_ms: 0,
            revoked_at_ms: None,
        };
        assert!(Scope::ALL.iter().all(|&s| key.allows(s)));
        key.scopes = vec![Scope::DeliveriesRead];
        assert!(key.allows(Scope::DeliveriesRead));
        assert!(!key.allows(Scope::DeliveriesWrite));
        key.revoked_at_ms = Some(1);
        assert!(!key.allows(Scope::DeliveriesRead));
    }
}
