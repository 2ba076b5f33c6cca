//! The JSON shapes of bulk recover: its request, its answer, and a recovery as GET shows it.

use herald_engine::{Recovered, Recovery, RecoveryCounts, RecoveryFilter};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::util::{ts, ts_opt};

/// `POST /v1/webhook_deliveries/recover`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RecoverIn {
    /// A non-empty subset of `exhausted`, `inactive`, `delivered`; default the first two.
    pub status: Option<Vec<String>>,
    pub endpoint_id: Option<String>,
    /// An exact event type, `*`, or a prefix pattern such as `call.*`.
    pub event_type: Option<String>,
    /// RFC 3339: deliveries created strictly after.
    pub created_after: Option<String>,
    /// RFC 3339: deliveries created strictly before.
    pub created_before: Option<String>,
    /// Select and count only; write nothing. Default false.
    pub dry_run: Option<bool>,
    /// 1 to 100000, default 10000: deliveries selected at most, oldest first.
    #[schema(minimum = 1, maximum = 100000)]
    pub max: Option<u64>,
    /// Required with an admin key; a key of an organisation may give only its own.
    pub org_id: Option<String>,
}

/// The answer of a recover (of a dry run too).
#[derive(Debug, Serialize, ToSchema)]
pub struct RecoverOut {
    /// `null` on a dry run.
    pub recovery_id: Option<String>,
    pub dry_run: bool,
    /// Deliveries selected (at most `max`).
    pub matched: u64,
    /// Deliveries re-queued: 0 on a dry run.
    pub queued: u64,
    /// More deliveries matched than `max`.
    pub truncated: bool,
    /// The first 25 selected delivery ids, oldest first.
    pub sample: Vec<String>,
}

impl RecoverOut {
    pub fn new(r: &Recovered, dry_run: bool) -> RecoverOut {
        RecoverOut {
            recovery_id: r.recovery_id.map(|id| id.to_string()),
            dry_run,
            matched: r.matched,
            queued: r.queued,
            truncated: r.truncated,
            sample: r.sample.iter().map(|id| id.to_string()).collect(),
        }
    }
}

/// A recovery's filter, as it was given (defaults filled in).
#[derive(Debug, Serialize, ToSchema)]
pub struct RecoveryFilterOut {
    pub status: Vec<String>,
    pub endpoint_id: Option<String>,
    pub event_type: Option<String>,
    pub created_after: Option<String>,
    pub created_before: Option<String>,
    pub max: u32,
}

/// Who asked: `{"kind": "key", "key_id": uuid}` or `{"kind": "system"}`.
#[derive(Debug, Serialize, ToSchema)]
pub struct ActorOut {
    /// `key` or `system`.
    pub kind: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key_id: Option<String>,
}

/// `GET /v1/recoveries/{id}`: the recovery, with the counts of its deliveries now.
#[derive(Debug, Serialize, ToSchema)]
pub struct RecoveryOut {
    pub id: String,
    pub org_id: String,
    pub filter: RecoveryFilterOut,
    pub queued: u64,
    /// Delivered now (those retention dropped since included: it drops only delivered ones).
    pub delivered: u64,
    pub pending: u64,
    /// Exhausted or inactive again.
    pub failed: u64,
    pub created_at: String,
    pub actor: ActorOut,
}

impl RecoveryFilterOut {
    pub fn new(f: &RecoveryFilter) -> RecoveryFilterOut {
        RecoveryFilterOut {
            status: f.statuses.iter().map(|s| s.name().to_owned()).collect(),
            endpoint_id: f.endpoint_id.map(|id| id.to_string()),
            event_type: f.event_type.clone(),
            created_after: ts_opt(f.created_after_ms),
            created_before: ts_opt(f.created_before_ms),
            max: f.max,
        }
    }
}

impl RecoveryOut {
    pub fn new(r: &Recovery, counts: &RecoveryCounts) -> RecoveryOut {
        let actor = match r.by_key {
            Some(key) => ActorOut { kind: "key".into(), key_id: Some(key.to_string()) },
            None => ActorOut { kind: "system".into(), key_id: None },
        };
        RecoveryOut {
            id: r.id.to_string(),
            org_id: r.org_id.to_string(),
            filter: RecoveryFilterOut::new(&r.filter),
            queued: counts.queued,
            delivered: counts.delivered,
            pending: counts.pending,
            failed: counts.failed,
            created_at: ts(r.created_at_ms),
            actor,
        }
    }
}
