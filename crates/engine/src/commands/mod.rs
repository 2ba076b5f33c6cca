//! Commands in, events out: every change a user asks for, validated against the projection inside
//! the log's writer thread (so two concurrent commands cannot both pass a check that only one of
//! them may), then turned into events that commit atomically with their projection changes.
//!
//! A rejected command is a typed [`CommandError`] and writes nothing: the log's savepoint undoes
//! whatever the command staged.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use herald_log::{Machine, Tx};
use herald_projector::compact::{apply_plan, Plan};
use herald_projector::{
    apply_unstaged, encode, get_api_key, get_delivery, get_endpoint, get_event, idempotency_lookup,
    list_endpoints, org_secret, policy, subscribes, ApiKeyId, ApplyError, AttemptOutcome, CompactError,
    CompactReport, DeliveryId, DeliveryStatus, Due, Endpoint, EndpointId, Event, EventId, NewDelivery, OrgId,
    Policy, Scope, TxRead, TxTables, NEW_DELIVERY_BYTES, PUBLISHED_DELIVERIES_BYTES_MAX,
    RESPONSE_EXCERPT_BYTES_MAX,
};
use uuid::Uuid;

use crate::schedule::{retry_at_ms, JITTER_PERMILLE_DEFAULT};
use crate::sender::check_url;
use crate::signing::Secret;

/// Who asks: an organisation's key, or an admin key (every organisation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Actor {
    /// `None`: admin.
    pub org_id: Option<OrgId>,
    pub key_id: Option<ApiKeyId>,
}

impl Actor {
    pub fn admin() -> Actor {
        Actor { org_id: None, key_id: None }
    }

    /// Whether this actor may see an object of `org_id`; another organisation's object is
    /// answered exactly like a missing one.
    fn sees(&self, org_id: OrgId) -> bool {
        self.org_id.is_none_or(|own| own == org_id)
    }
}

/// The limits commands are checked against, from the configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandLimits {
    pub allow_private_targets: bool,
    pub event_bytes_max: usize,
    /// Retrigger requests per endpoint per window (seed 002's RETRIGGER_RATE_LIMITED).
    pub retrigger_max_per_window: usize,
    pub retrigger_window_ms: u64,
}

impl Default for CommandLimits {
    fn default() -> Self {
        CommandLimits {
            allow_private_targets: false,
            event_bytes_max: 256 * 1024,
            retrigger_max_per_window: 10,
            retrigger_window_ms: 60_000,
        }
    }
}

pub const NAME_BYTES_MAX: usize = 256;
pub const EVENT_TYPE_BYTES_MAX: usize = 128;
pub const ENABLED_EVENTS_MAX: usize = 256;
pub const BATCH_RETRIGGER_MAX: usize = 25;
pub const IDEMPOTENCY_KEY_BYTES_MAX: usize = 256;
/// Endpoints read per page while fanning out an event.
const FAN_OUT_PAGE_LEN: usize = 256;
/// Endpoints a single event may fan out to, at most (a bound on one command's size).
pub const FAN_OUT_ENDPOINTS_MAX: usize = 10_000;
/// Bytes of endpoint lists [`Commands`] keeps for publishes (urls and event types, counted
/// with [`FanOut::bytes`]), at most: past it the lists are let go and read again, and a list
/// larger than it alone is used once and not kept.
const FAN_OUT_KEPT_BYTES_MAX: usize = 16 << 20;

/// The largest sub-millisecond sequence number of an id.
const ID_SEQ_MAX: u16 = 0x0FFF;
/// Milliseconds whose next sequence number [`Commands`] remembers.
const ID_SEQ_MILLIS: usize = 64;

/// What a publish needs of an endpoint to fan out to it.
struct FanOut {
    id: EndpointId,
    url: String,
    enabled_events: Vec<String>,
}

impl FanOut {
    /// What keeping it costs, about.
    fn bytes(&self) -> usize {
        64 + self.url.len() + self.enabled_events.iter().map(|e| e.len() + 24).sum::<usize>()
    }
}
/// Endpoints whose retrigger windows are remembered, at most.
const RATE_WINDOWS_MAX: usize = 100_000;

/// A command, with the ids it creates chosen by the caller (so a simulation can replay them).
#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    CreateEndpoint {
        id: EndpointId,
        org_id: OrgId,
        url: String,
        name: String,
        enabled_events: Vec<String>,
        secret: Option<String>,
    },
    UpdateEndpoint {
        id: EndpointId,
        url: Option<String>,
        name: Option<String>,
        enabled_events: Option<Vec<String>>,
    },
    DeleteEndpoint {
        id: EndpointId,
    },
    RotateSecret {
        id: EndpointId,
        secret: Option<String>,
    },
    EnableEndpoint {
        id: EndpointId,
    },
    CreateApiKey {
        id: ApiKeyId,
        org_id: Option<OrgId>,
        scopes: Vec<Scope>,
        name: String,
        key_hash: [u8; 32],
    },
    RevokeApiKey {
        id: ApiKeyId,
    },
    Publish {
        id: EventId,
        org_id: OrgId,
        event_type: String,
        payload: Vec<u8>,
        call_id: Option<Uuid>,
        webhook_url: Option<String>,
        idempotency_key: Option<String>,
    },
    /// Seed 000: a delivery in `inactive` or `exhausted` state back to `pending`.
    Retrigger {
        delivery_id: DeliveryId,
    },
    /// Seed 003: any delivery that is not pending back to `pending`.
    Redeliver {
        delivery_id: DeliveryId,
    },
    /// Seed 002: up to 25 deliveries of one endpoint, with a result per item.
    BatchRetrigger {
        endpoint_id: EndpointId,
        delivery_ids: Vec<DeliveryId>,
    },
    /// The dispatcher's report of one attempt; the engine decides `retry_at` from the policy in
    /// the log and the delivery's place in its schedule, with deterministic jitter. A receiver's
    /// `Retry-After` (already clamped by the sender) can only push the retry later, never add one
    /// beyond the schedule.
    RecordAttempt {
        delivery_id: DeliveryId,
        started_at_ms: u64,
        finished_at_ms: u64,
        outcome: AttemptOutcome,
        response_excerpt: Vec<u8>,
        retry_after_ms: Option<u64>,
    },
    /// The configuration's policy (retry schedule, failure window, rotation overlap), written to
    /// the log when it differs from the one in force. Admin only.
    SetPolicy(Policy),
    /// Folds what follows under rules `version` (see
    /// [`RULES_CURRENT`](herald_projector::RULES_CURRENT)): the engine sends it when it opens a
    /// store with earlier rules. Admin only; forward only.
    AdoptRules(u32),
    /// Retention: applies a compaction planned by
    /// [`compact::plan`](herald_projector::compact::plan). Admin only; see
    /// [`Engine::compact`](crate::Engine::compact).
    Compact(Box<Plan>),
}

/// What a command answers.
#[derive(Debug, Clone, PartialEq)]
pub enum Reply {
    Endpoint {
        id: EndpointId,
        secret: String,
    },
    Done,
    Published {
        id: EventId,
        created_at_ms: u64,
        delivery_ids: Vec<DeliveryId>,
        replayed: bool,
    },
    /// An attempt was recorded; `retry_at_ms` is when the next automatic one is due, if any.
    Attempted {
        retry_at_ms: Option<u64>,
    },
    /// The retrigger request id of a single retrigger.
    Retriggered {
        request_id: Uuid,
    },
    Batch(Vec<BatchItem>),
    Compacted(CompactReport),
}

/// One item of a batch retrigger: its request id, or why it was not retriggered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchItem {
    pub delivery_id: DeliveryId,
    pub result: Result<Uuid, String>,
}

/// Why a command was rejected; the server maps each to the seeds' codes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CommandError {
    /// Missing, or another organisation's (answered the same way).
    NotFound { what: &'static str, id: String },
    /// The object's state does not allow it (a pending delivery redelivered, a deleted endpoint).
    Conflict { reason: String },
    /// A field is invalid: its name and what is wrong.
    Validation { field: &'static str, message: String },
    /// Too many retrigger requests for this endpoint within the window.
    RateLimited { retry_after_ms: u64 },
    /// The projection refused the events: a bug or a damaged store, never the caller's fault.
    Internal { message: String },
}

impl std::fmt::Display for CommandError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CommandError::NotFound { what, id } => write!(f, "{what} {id} not found"),
            CommandError::Conflict { reason } => write!(f, "{reason}"),
            CommandError::Validation { field, message } => write!(f, "{field}: {message}"),
            CommandError::RateLimited { retry_after_ms } => {
                write!(f, "too many retrigger requests for this endpoint; retry in {retry_after_ms} ms")
            }
            CommandError::Internal { message } => write!(f, "internal error: {message}"),
        }
    }
}

impl std::error::Error for CommandError {}

impl From<ApplyError> for CommandError {
    fn from(e: ApplyError) -> Self {
        CommandError::Internal { message: e.to_string() }
    }
}

impl From<herald_projector::Corrupt> for CommandError {
    fn from(e: herald_projector::Corrupt) -> Self {
        CommandError::Internal { message: e.to_string() }
    }
}

fn invalid(field: &'static str, message: impl Into<String>) -> CommandError {
    CommandError::Validation { field, message: message.into() }
}

/// `[A-Za-z0-9._-]{1,128}`.
pub fn valid_event_type(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= EVENT_TYPE_BYTES_MAX
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-')
}

fn check_enabled_events(events: &[String]) -> Result<(), CommandError> {
    if events.is_empty() {
        return Err(invalid("enabled_events", "must hold at least one event type or \"*\""));
    }
    if events.len() > ENABLED_EVENTS_MAX {
        return Err(invalid("enabled_events", format!("at most {ENABLED_EVENTS_MAX} entries")));
    }
    match events.iter().find(|e| e.as_str() != "*" && !valid_event_type(e)) {
        Some(bad) => Err(invalid(
            "enabled_events",
            format!("{bad:?} is not \"*\" nor an event type [A-Za-z0-9._-]{{1,128}}"),
        )),
        None => Ok(()),
    }
}

fn check_name(name: &str) -> Result<(), CommandError> {
    if name.len() > NAME_BYTES_MAX {
        return Err(invalid("name", format!("at most {NAME_BYTES_MAX} bytes")));
    }
    Ok(())
}

/// Told, after each durable batch, which deliveries became due and when (the dispatcher's feed);
/// `None` after a failed batch: what it wrote may or may not be in the store (a failed flush
/// leaves an applied batch), so the listener should reload from the stored due index.
pub type DueHook = std::sync::Arc<dyn Fn(Option<Vec<DueHint>>) + Send + Sync>;

/// A delivery that a batch made due.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DueHint {
    pub due: Due,
    /// The event's payload, when the batch published the event: an event never changes, so the
    /// first attempt can send it without reading it back from the store. Shared by the
    /// deliveries of one event.
    pub payload: Option<Bytes>,
}

/// The command machine run by the log's writer thread.
pub struct Commands {
    limits: CommandLimits,
    /// Per endpoint, the times of recent batch retrigger requests (bounded).
    retrigger_windows: HashMap<EndpointId, VecDeque<u64>>,
    /// Deliveries made due by the commands of the batch being written, told to `due_hook` once
    /// the batch is durable. An attempt's own retry is not here: the dispatcher learns it from
    /// the reply.
    staged_due: Vec<DueHint>,
    due_hook: Option<DueHook>,
    /// Whether the batch being written creates or revokes an API key.
    staged_key_change: bool,
    /// Per organisation, its live endpoints as a publish sees them, so a publish does not list
    /// and decode every endpoint. Filled from the batch's view; emptied when an endpoint is
    /// created, changed or deleted, when a command is rejected and when a batch fails.
    fan_out: HashMap<OrgId, Arc<[FanOut]>>,
    /// What `fan_out` holds, in [`FanOut::bytes`].
    fan_out_bytes: usize,
    /// The milliseconds delivery ids were last made in, each with its next sequence number
    /// (commands come in about time order, but from several submitters).
    id_seqs: VecDeque<(u64, u16)>,
    /// Grows once a batch that creates or revokes an API key is applied to the store, before its
    /// flush (so before any caller of the batch is answered): see [`Commands::api_key_epoch`].
    api_key_epoch: Arc<AtomicU64>,
}

/// A command as submitted: who, when, what.
#[derive(Debug, Clone)]
pub struct Submitted {
    pub actor: Actor,
    pub at_ms: u64,
    pub command: Command,
}

impl Commands {
    pub fn new(limits: CommandLimits) -> Commands {
        Commands {
            limits,
            retrigger_windows: HashMap::new(),
            staged_due: Vec::new(),
            due_hook: None,
            staged_key_change: false,
            fan_out: HashMap::new(),
            fan_out_bytes: 0,
            id_seqs: VecDeque::new(),
            api_key_epoch: Arc::new(AtomicU64::new(0)),
        }
    }

    /// A counter that grows each time a batch creating or revoking an API key is applied to the
    /// store, whoever submitted it, before the batch's callers are answered. A cache of keys
    /// filled from the projection stays valid while it does not move: read it before reading a
    /// key, and drop what was cached under an older value.
    pub fn api_key_epoch(&self) -> Arc<AtomicU64> {
        self.api_key_epoch.clone()
    }

    /// The same machine, telling `hook` after each durable batch which deliveries became due.
    pub fn with_due_hook(mut self, hook: DueHook) -> Commands {
        self.due_hook = Some(hook);
        self
    }

    /// The organisation's live endpoints, from [`Commands::fan_out`] or read (and kept).
    fn fan_out_of(&mut self, tx: &Tx<'_>, org_id: OrgId) -> Result<Arc<[FanOut]>, CommandError> {
        if let Some(list) = self.fan_out.get(&org_id) {
            return Ok(list.clone());
        }
        let mut list = Vec::new();
        let mut after = None;
        loop {
            let page = list_endpoints(&TxRead(tx), org_id, after, FAN_OUT_PAGE_LEN)?;
            list.extend(page.items.into_iter().map(|e| FanOut {
                id: e.id,
                url: e.url,
                enabled_events: e.enabled_events,
            }));
            match page.next {
                Some(next) => after = Some(next),
                None => break,
            }
        }
        let bytes = list.iter().map(FanOut::bytes).sum::<usize>();
        let list: Arc<[FanOut]> = list.into();
        if bytes > FAN_OUT_KEPT_BYTES_MAX {
            return Ok(list);
        }
        if self.fan_out_bytes + bytes > FAN_OUT_KEPT_BYTES_MAX {
            self.forget_fan_out();
        }
        self.fan_out_bytes += bytes;
        self.fan_out.insert(org_id, list.clone());
        Ok(list)
    }

    /// The next sub-millisecond sequence number for an id made at `at_ms` (see
    /// [`sequenced_id`]); past 4,095 in one millisecond it stays there, and the hash bits
    /// order those ids.
    fn next_id_seq(&mut self, at_ms: u64) -> u16 {
        if let Some((_, next)) = self.id_seqs.iter_mut().find(|(ms, _)| *ms == at_ms) {
            let seq = *next;
            *next = next.saturating_add(1).min(ID_SEQ_MAX);
            return seq;
        }
        if self.id_seqs.len() >= ID_SEQ_MILLIS {
            self.id_seqs.pop_front();
        }
        self.id_seqs.push_back((at_ms, 1));
        0
    }

    fn forget_fan_out(&mut self) {
        self.fan_out.clear();
        self.fan_out_bytes = 0;
    }

    /// Checks a url given in `field`.
    fn check_url(&self, field: &'static str, url: &str) -> Result<(), CommandError> {
        check_url(url, self.limits.allow_private_targets).map_err(|e| invalid(field, e.to_string()))
    }

    /// Counts a batch retrigger request for the endpoint, or refuses it when over the window's limit.
    fn rate_check(&mut self, endpoint: EndpointId, at_ms: u64) -> Result<(), CommandError> {
        let window_ms = self.limits.retrigger_window_ms;
        if self.retrigger_windows.len() >= RATE_WINDOWS_MAX && !self.retrigger_windows.contains_key(&endpoint)
        {
            self.retrigger_windows
                .retain(|_, times| times.back().is_some_and(|t| at_ms.saturating_sub(*t) < window_ms));
        }
        let times = self.retrigger_windows.entry(endpoint).or_default();
        while times.front().is_some_and(|t| at_ms.saturating_sub(*t) >= window_ms) {
            times.pop_front();
        }
        if times.len() >= self.limits.retrigger_max_per_window {
            let oldest = times.front().copied().unwrap_or(at_ms);
            return Err(CommandError::RateLimited {
                retry_after_ms: (oldest + window_ms).saturating_sub(at_ms),
            });
        }
        times.push_back(at_ms);
        Ok(())
    }

    fn endpoint(tx: &Tx<'_>, actor: Actor, id: EndpointId) -> Result<Endpoint, CommandError> {
        match get_endpoint(&TxRead(tx), id)? {
            Some(e) if actor.sees(e.org_id) && !e.is_deleted() => Ok(e),
            _ => Err(CommandError::NotFound { what: "endpoint", id: id.to_string() }),
        }
    }

    fn run(&mut self, s: Submitted, tx: &mut Tx<'_>) -> Result<Reply, CommandError> {
        let Submitted { actor, at_ms, command } = s;
        let mut events: Vec<Event> = Vec::new();
        let reply = match command {
            Command::CreateEndpoint { id, org_id, url, name, enabled_events, secret } => {
                if !actor.sees(org_id) {
                    return Err(invalid(
                        "org_id",
                        "only an admin key may create endpoints for another organisation",
                    ));
                }
                self.check_url("url", &url)?;
                check_name(&name)?;
                check_enabled_events(&enabled_events)?;
                let secret = match secret {
                    Some(s) => Secret::parse(&s).map_err(|e| invalid("secret", e.to_string()))?.to_whsec(),
                    None => new_secret()?,
                };
                events.push(Event::EndpointCreated {
                    id,
                    org_id,
                    url,
                    name,
                    enabled_events,
                    secret: secret.clone(),
                });
                Reply::Endpoint { id, secret }
            }
            Command::UpdateEndpoint { id, url, name, enabled_events } => {
                Self::endpoint(tx, actor, id)?;
                if let Some(url) = &url {
                    self.check_url("url", url)?;
                }
                if let Some(name) = &name {
                    check_name(name)?;
                }
                if let Some(e) = &enabled_events {
                    check_enabled_events(e)?;
                }
                events.push(Event::EndpointUpdated { id, url, name, enabled_events });
                Reply::Done
            }
            Command::DeleteEndpoint { id } => {
                Self::endpoint(tx, actor, id)?;
                events.push(Event::EndpointDeleted { id });
                Reply::Done
            }
            Command::RotateSecret { id, secret } => {
                Self::endpoint(tx, actor, id)?;
                let secret = match secret {
                    Some(s) => Secret::parse(&s).map_err(|e| invalid("secret", e.to_string()))?.to_whsec(),
                    None => new_secret()?,
                };
                // The overlap of the policy in force, which a `SetPolicy` may have changed.
                let overlap_ms = policy(&TxRead(tx))?.rotation_overlap_ms;
                let previous_expires_at_ms = at_ms.saturating_add(overlap_ms);
                events.push(Event::EndpointSecretRotated {
                    id,
                    secret: secret.clone(),
                    previous_expires_at_ms,
                });
                Reply::Endpoint { id, secret }
            }
            Command::EnableEndpoint { id } => {
                Self::endpoint(tx, actor, id)?;
                events.push(Event::EndpointEnabled { id });
                Reply::Done
            }
            Command::CreateApiKey { id, org_id, scopes, name, key_hash } => {
                if actor.org_id.is_some() {
                    return Err(CommandError::NotFound { what: "route", id: "api_keys".into() });
                }
                if scopes.is_empty() {
                    return Err(invalid("scopes", "at least one scope"));
                }
                check_name(&name)?;
                events.push(Event::ApiKeyCreated { id, org_id, scopes, name, key_hash });
                Reply::Done
            }
            Command::RevokeApiKey { id } => {
                if actor.org_id.is_some() {
                    return Err(CommandError::NotFound { what: "route", id: "api_keys".into() });
                }
                match get_api_key(&TxRead(tx), id)? {
                    Some(k) if k.revoked_at_ms.is_none() => {}
                    _ => return Err(CommandError::NotFound { what: "api key", id: id.to_string() }),
                }
                events.push(Event::ApiKeyRevoked { id });
                Reply::Done
            }
            Command::Publish { id, org_id, event_type, payload, call_id, webhook_url, idempotency_key } => {
                if !actor.sees(org_id) {
                    return Err(invalid("org_id", "a key may publish only for its own organisation"));
                }
                if let Some(key) = &idempotency_key {
                    if key.is_empty() || key.len() > IDEMPOTENCY_KEY_BYTES_MAX {
                        return Err(invalid(
                            "Idempotency-Key",
                            format!("1 to {IDEMPOTENCY_KEY_BYTES_MAX} bytes"),
                        ));
                    }
                    if let Some(hit) = idempotency_lookup(&TxRead(tx), org_id, key, at_ms)? {
                        let first =
                            get_event(&TxRead(tx), hit.event_id)?.ok_or_else(|| CommandError::Internal {
                                message: format!("idempotency hit {} has no event", hit.event_id),
                            })?;
                        return Ok(Reply::Published {
                            id: first.id,
                            created_at_ms: first.created_at_ms,
                            delivery_ids: first.delivery_ids,
                            replayed: true,
                        });
                    }
                }
                if !valid_event_type(&event_type) {
                    return Err(invalid("event_type", "must match [A-Za-z0-9._-]{1,128}"));
                }
                if payload.len() > self.limits.event_bytes_max {
                    return Err(invalid("payload", format!("over {} bytes", self.limits.event_bytes_max)));
                }
                if let Some(url) = &webhook_url {
                    self.check_url("webhook_url", url)?;
                }
                // Where the event goes: each subscribed endpoint (at its current url), then the
                // inline url if any.
                let mut targets: Vec<(Option<EndpointId>, String)> = Vec::new();
                let fan_out = self.fan_out_of(tx, org_id)?;
                for endpoint in fan_out.iter().filter(|e| subscribes(&e.enabled_events, &event_type)) {
                    if targets.len() >= FAN_OUT_ENDPOINTS_MAX {
                        return Err(CommandError::Conflict {
                            reason: format!(
                                "the organisation has over {FAN_OUT_ENDPOINTS_MAX} subscribed endpoints"
                            ),
                        });
                    }
                    targets.push((Some(endpoint.id), endpoint.url.clone()));
                }
                if let Some(url) = webhook_url {
                    if org_secret(&TxRead(tx), org_id)?.is_none() {
                        events.push(Event::OrgSecretSet { org_id, secret: new_secret()? });
                    }
                    targets.push((None, url));
                }
                // The event and its deliveries in one record, as many as fit its budget; any
                // beyond follow in records of their own.
                let mut delivery_ids = Vec::with_capacity(targets.len());
                let mut deliveries = Vec::with_capacity(targets.len());
                let mut rest = Vec::new();
                let mut budget = PUBLISHED_DELIVERIES_BYTES_MAX;
                for (n, (endpoint_id, url)) in targets.into_iter().enumerate() {
                    let seq = self.next_id_seq(at_ms);
                    let delivery =
                        DeliveryId(sequenced_id(at_ms, seq, &[id.as_bytes(), &(n as u64).to_be_bytes()]));
                    delivery_ids.push(delivery);
                    let cost = url.len() + NEW_DELIVERY_BYTES;
                    if rest.is_empty() && cost <= budget {
                        budget -= cost;
                        deliveries.push(NewDelivery {
                            id: delivery,
                            endpoint_id,
                            url,
                            next_attempt_at_ms: at_ms,
                        });
                    } else {
                        rest.push(Event::DeliveryCreated {
                            id: delivery,
                            event_id: id,
                            org_id,
                            endpoint_id,
                            url,
                            next_attempt_at_ms: at_ms,
                        });
                    }
                }
                events.push(Event::EventPublishedWithDeliveries {
                    id,
                    org_id,
                    event_type,
                    payload,
                    call_id,
                    idempotency_key,
                    deliveries,
                });
                events.extend(rest);
                Reply::Published { id, created_at_ms: at_ms, delivery_ids, replayed: false }
            }
            Command::Retrigger { delivery_id } => {
                let d = get_delivery(&TxRead(tx), delivery_id)?
                    .filter(|d| actor.sees(d.org_id))
                    .filter(|d| matches!(d.status, DeliveryStatus::Inactive | DeliveryStatus::Exhausted));
                if d.is_none() {
                    return Err(CommandError::NotFound {
                        what: "failed webhook",
                        id: delivery_id.to_string(),
                    });
                }
                let request_id = request_id(at_ms, delivery_id, d.map_or(0, |d| d.manual_retry_count));
                events.push(Event::RetriggerRequested { delivery_id, by_key: actor.key_id, request_id });
                Reply::Retriggered { request_id }
            }
            Command::Redeliver { delivery_id } => {
                let d = get_delivery(&TxRead(tx), delivery_id)?.filter(|d| actor.sees(d.org_id));
                match d {
                    None => {
                        return Err(CommandError::NotFound { what: "delivery", id: delivery_id.to_string() })
                    }
                    Some(d) if d.status == DeliveryStatus::Pending => {
                        return Err(CommandError::Conflict {
                            reason: format!("delivery {delivery_id} is already pending"),
                        })
                    }
                    Some(_) => {}
                }
                events.push(Event::RedeliverRequested { delivery_id, by_key: actor.key_id });
                Reply::Done
            }
            Command::BatchRetrigger { endpoint_id, delivery_ids } => {
                if delivery_ids.is_empty() || delivery_ids.len() > BATCH_RETRIGGER_MAX {
                    return Err(invalid(
                        "webhookNotificationIds",
                        format!("1 to {BATCH_RETRIGGER_MAX} ids, got {}", delivery_ids.len()),
                    ));
                }
                let mut seen = std::collections::HashSet::new();
                if let Some(dup) = delivery_ids.iter().find(|id| !seen.insert(**id)) {
                    return Err(invalid("webhookNotificationIds", format!("{dup} is listed twice")));
                }
                // Admin only, but the endpoint must exist (deleted ones keep their history).
                match get_endpoint(&TxRead(tx), endpoint_id)? {
                    Some(e) if actor.sees(e.org_id) => {}
                    _ => return Err(CommandError::NotFound { what: "webhook", id: endpoint_id.to_string() }),
                }
                self.rate_check(endpoint_id, at_ms)?;
                let mut items = Vec::with_capacity(delivery_ids.len());
                for delivery_id in delivery_ids {
                    let d = get_delivery(&TxRead(tx), delivery_id)?;
                    let result = match d {
                        Some(d) if d.endpoint_id == Some(endpoint_id) => match d.status {
                            DeliveryStatus::Pending => Err("notification is already pending".to_string()),
                            DeliveryStatus::Delivered => {
                                events.push(Event::RedeliverRequested { delivery_id, by_key: actor.key_id });
                                Ok(request_id(at_ms, delivery_id, d.manual_retry_count))
                            }
                            DeliveryStatus::Inactive | DeliveryStatus::Exhausted => {
                                let request_id = request_id(at_ms, delivery_id, d.manual_retry_count);
                                events.push(Event::RetriggerRequested {
                                    delivery_id,
                                    by_key: actor.key_id,
                                    request_id,
                                });
                                Ok(request_id)
                            }
                        },
                        _ => Err(format!("notification {delivery_id} not found for webhook {endpoint_id}")),
                    };
                    items.push(BatchItem { delivery_id, result });
                }
                Reply::Batch(items)
            }
            Command::RecordAttempt {
                delivery_id,
                started_at_ms,
                finished_at_ms,
                outcome,
                mut response_excerpt,
                retry_after_ms,
            } => {
                // Only the dispatcher reports attempts; an organisation's key cannot make one up.
                if actor.org_id.is_some() {
                    return Err(CommandError::NotFound { what: "route", id: "attempts".into() });
                }
                let t = TxRead(tx);
                let d = get_delivery(&t, delivery_id)?.ok_or_else(|| CommandError::NotFound {
                    what: "delivery",
                    id: delivery_id.to_string(),
                })?;
                let attempt = d.attempt_count + 1;
                let retry_at_ms = match outcome {
                    AttemptOutcome::Delivered { .. } => None,
                    // Made again as soon as herald is back, at the same step of the schedule.
                    AttemptOutcome::Interrupted { .. } => Some(finished_at_ms.max(started_at_ms)),
                    AttemptOutcome::Failed { .. } => retry_at_ms(
                        &policy(&t)?.retry_schedule_ms,
                        d.attempts_since_reset + 1,
                        finished_at_ms,
                        *delivery_id.0.as_bytes(),
                        attempt,
                        JITTER_PERMILLE_DEFAULT,
                    )
                    .map(|at| match retry_after_ms {
                        Some(after) => at.max(finished_at_ms.saturating_add(after)),
                        None => at,
                    }),
                };
                response_excerpt.truncate(RESPONSE_EXCERPT_BYTES_MAX);
                events.push(Event::AttemptRecorded {
                    delivery_id,
                    attempt,
                    trigger: d.next_trigger,
                    started_at_ms,
                    finished_at_ms: finished_at_ms.max(started_at_ms),
                    outcome,
                    response_excerpt,
                    retry_at_ms,
                });
                Reply::Attempted { retry_at_ms }
            }
            Command::Compact(plan) => {
                if actor.org_id.is_some() {
                    return Err(CommandError::NotFound { what: "route", id: "compact".into() });
                }
                let (event, report) = apply_plan(tx, *plan).map_err(|e| match e {
                    e @ CompactError::Stale { .. } => CommandError::Conflict { reason: e.to_string() },
                    e => CommandError::Internal { message: e.to_string() },
                })?;
                events.push(event);
                Reply::Compacted(report)
            }
            Command::SetPolicy(p) => {
                if actor.org_id.is_some() {
                    return Err(CommandError::NotFound { what: "route", id: "policy".into() });
                }
                if let Some(problem) = p.problem() {
                    return Err(invalid("policy", problem));
                }
                events.push(Event::PolicySet(p));
                Reply::Done
            }
            Command::AdoptRules(version) => {
                if actor.org_id.is_some() {
                    return Err(CommandError::NotFound { what: "route", id: "rules".into() });
                }
                let in_force = herald_projector::rules(&TxRead(tx))?;
                if !herald_projector::rules_may_follow(in_force, version) {
                    return Err(CommandError::Conflict {
                        reason: format!(
                            "rules version {version} cannot follow version {in_force} (known up to {})",
                            herald_projector::RULES_CURRENT
                        ),
                    });
                }
                events.push(Event::RulesAdopted { version });
                Reply::Done
            }
        };
        let mut due = Vec::new();
        for event in events {
            if matches!(event, Event::ApiKeyCreated { .. } | Event::ApiKeyRevoked { .. }) {
                self.staged_key_change = true;
            }
            if matches!(
                event,
                Event::EndpointCreated { .. }
                    | Event::EndpointUpdated { .. }
                    | Event::EndpointDeleted { .. }
                    | Event::Compacted { .. }
            ) {
                self.forget_fan_out();
            }
            // Every record is stored in a group with the records around it (attempt outcomes
            // come together, first in each batch: the urgent queue; publishes after them).
            // Nothing reads one back by key on a hot path: a first attempt is handed its payload
            // (`DueHint`), only a retry reads it.
            let seq = tx.append_grouped(at_ms, encode(&event)).seq;
            // The log's writer rolls the batch back to this command's savepoint on an error.
            apply_unstaged(&mut TxTables(tx), seq, at_ms, &event)?;
            let hint = |next_attempt_at_ms, delivery_id, payload| DueHint {
                due: Due { next_attempt_at_ms, delivery_id },
                payload,
            };
            match event {
                Event::DeliveryCreated { id, next_attempt_at_ms, .. } => {
                    due.push(hint(next_attempt_at_ms, id, None))
                }
                Event::EventPublishedWithDeliveries { deliveries, payload, .. } => {
                    let payload = Bytes::from(payload);
                    due.extend(
                        deliveries.iter().map(|d| hint(d.next_attempt_at_ms, d.id, Some(payload.clone()))),
                    )
                }
                Event::RetriggerRequested { delivery_id, .. }
                | Event::RedeliverRequested { delivery_id, .. } => due.push(hint(at_ms, delivery_id, None)),
                _ => {}
            }
        }
        if self.due_hook.is_some() {
            self.staged_due.extend(due);
        }
        Ok(reply)
    }
}

/// A UUID v7 stamped with `at_ms` whose random bits are drawn from `parts`: ids that a replay of
/// the same commands gives again (a simulation replays a seed exactly), and that still sort by time.
pub fn derived_id(at_ms: u64, parts: &[&[u8]]) -> Uuid {
    uuid::Builder::from_unix_timestamp_millis(at_ms, &id_bits(parts)).into_uuid()
}

/// Like [`derived_id`], with `seq` in the 12 bits after the timestamp (RFC 9562's sub-millisecond
/// counter): ids made in the same millisecond sort in the order they were made, so the index
/// entries of a batch's deliveries go to the end of their windows instead of all through them.
pub fn sequenced_id(at_ms: u64, seq: u16, parts: &[&[u8]]) -> Uuid {
    let mut bits = id_bits(parts);
    bits[0] = (seq >> 8) as u8 & 0x0F;
    bits[1] = seq as u8;
    uuid::Builder::from_unix_timestamp_millis(at_ms, &bits).into_uuid()
}

fn id_bits(parts: &[&[u8]]) -> [u8; 10] {
    let mut hasher = blake3::Hasher::new();
    for part in parts {
        hasher.update(&(part.len() as u64).to_le_bytes());
        hasher.update(part);
    }
    hasher.finalize().as_bytes()[..10].try_into().unwrap_or([0; 10])
}

fn request_id(at_ms: u64, delivery_id: DeliveryId, manual_retry_count: u32) -> Uuid {
    derived_id(at_ms, &[b"retrigger", delivery_id.as_bytes(), &manual_retry_count.to_be_bytes()])
}

fn new_secret() -> Result<String, CommandError> {
    Secret::generate().map(|s| s.to_whsec()).map_err(|e| CommandError::Internal { message: e.to_string() })
}

impl Machine for Commands {
    type Command = Submitted;
    type Reply = Reply;
    type Rejection = CommandError;

    fn execute(&mut self, command: Submitted, tx: &mut Tx<'_>) -> Result<Reply, CommandError> {
        let reply = self.run(command, tx);
        if reply.is_err() {
            // Rolled back. Its endpoint changes already emptied the lists as they were staged;
            // emptying them again keeps them right even for a command that would read lists
            // after staging such a change (none does today).
            self.forget_fan_out();
        }
        reply
    }

    fn finish(&mut self, tx: &mut Tx<'_>) -> Result<(), herald_log::StoreError> {
        herald_projector::fold_staged_entries(tx)
    }

    fn applied(&mut self, _records: &[herald_log::Record]) -> herald_log::AfterFlush {
        // The batch is visible to readers now and its callers are answered after its flush: a
        // key cache that sees the new epoch re-reads, so a revoked key is refused from then on.
        // (A command of the batch that was rejected after staging its key event only costs a
        // needless re-read.)
        if std::mem::take(&mut self.staged_key_change) {
            self.api_key_epoch.fetch_add(1, Ordering::SeqCst);
        }
        let hook = self.due_hook.clone()?;
        if self.staged_due.is_empty() {
            return None;
        }
        let due = std::mem::take(&mut self.staged_due);
        // Durable: the dispatcher learns what became due. A failed flush leaves the batch applied
        // but unacknowledged: the dispatcher reloads from the stored index instead.
        Some(Box::new(move |flushed| hook(flushed.then_some(due))))
    }

    fn aborted(&mut self) {
        // Nothing of the batch was written: no key changed, and the endpoint lists may hold
        // what the batch staged.
        self.staged_key_change = false;
        self.forget_fan_out();
        if !self.staged_due.is_empty() {
            self.staged_due.clear();
            if let Some(hook) = self.due_hook.as_ref() {
                hook(None);
            }
        }
    }
}
