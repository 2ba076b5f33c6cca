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
use herald_projector::compact::Plan;
use herald_projector::{
    apply_unstaged_waking, encode, get_endpoint, ApiKeyId, ApplyError, AttemptOutcome, CompactReport,
    DeliveryId, Due, EndpointId, EndpointStatus, Event, EventId, OrgId, Policy, RecordActor, RecoveryFilter,
    RecoveryId, Scope, TxRead, TxTables,
};
use uuid::Uuid;

use crate::request::RequestId;
use crate::signing::Secret;
use crate::stats::EngineStats;
use crate::subscribe::{DeliveryChange, Watched};
use tokio::sync::broadcast;

mod attempts;
mod cluster;
mod delivery_settings;
mod endpoints;
use endpoints::NewEndpoint;
mod ids;
mod keys;
mod publish;
mod recover;
mod retention;
mod retrigger;
mod settings;
mod told;
use told::Told;

pub use delivery_settings::DeliverySettingsPatch;
pub use ids::{derived_id, sequenced_id};
use publish::{FanOut, Publish};
pub use recover::{check_recovery_filter, valid_event_pattern, Recovered, RECOVER_MAX, RECOVER_SAMPLE_LEN};

/// Who asks: an organisation's key, or an admin key (every organisation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Actor {
    /// `None`: admin.
    pub org_id: Option<OrgId>,
    /// The key that asks; its records name it ([`Actor::recorded`]). `None`: the system.
    pub key_id: Option<ApiKeyId>,
}

impl Actor {
    pub fn admin() -> Actor {
        Actor { org_id: None, key_id: None }
    }

    /// Who the records of this actor's commands name: its key, or the system when it has none
    /// (herald's own decisions, the offline tools, an embedder's calls).
    pub fn recorded(&self) -> RecordActor {
        self.key_id.map_or(RecordActor::System, RecordActor::Key)
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
/// Endpoints a single event may fan out to, at most (a bound on one command's size).
pub const FAN_OUT_ENDPOINTS_MAX: usize = 10_000;
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
        /// Applied to the default settings.
        settings: DeliverySettingsPatch,
    },
    UpdateEndpoint {
        id: EndpointId,
        url: Option<String>,
        name: Option<String>,
        enabled_events: Option<Vec<String>>,
        settings: DeliverySettingsPatch,
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
        /// API.md "Ordering key": 1 to 128 visible ASCII characters; `None`: the call id is the key.
        ordering_key: Option<String>,
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
    /// A bulk recover: the organisation's deliveries matching `filter`, selected in the writer
    /// and re-queued as retriggers in one commit, recorded as recovery `id`.
    Recover {
        id: RecoveryId,
        org_id: OrgId,
        filter: RecoveryFilter,
    },
    /// Cluster mode: node `node_id` took the partition this log is over, under lease `epoch`;
    /// recorded as `PartitionClaimed`, the first write after the take-over's catch-up (the
    /// fence). Admin only (the cluster's own wiring sends it); needs rules 5.
    ClaimPartition {
        node_id: String,
        epoch: u64,
    },
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
    Recovered(Recovered),
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

impl From<herald_projector::CorruptValue> for CommandError {
    fn from(e: herald_projector::CorruptValue) -> Self {
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

fn check_name(name: &str) -> Result<(), CommandError> {
    if name.len() > NAME_BYTES_MAX {
        return Err(invalid("name", format!("at most {NAME_BYTES_MAX} bytes")));
    }
    Ok(())
}

fn new_secret() -> Result<String, CommandError> {
    Secret::generate().map(|s| s.to_whsec()).map_err(|e| CommandError::Internal { message: e.to_string() })
}

/// Told, after each durable batch, which deliveries became due and when (the dispatcher's feed);
/// `None` after a failed batch: what it wrote may or may not be in the store (a failed flush
/// leaves an applied batch), so the listener should reload from the stored due index.
pub type DueHook = Arc<dyn Fn(Option<Vec<DueHint>>) + Send + Sync>;

/// A delivery that a batch made due.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DueHint {
    pub due: Due,
    /// The event's payload, when the batch published the event: an event never changes, so the
    /// first attempt can send it without reading it back from the store. Shared by the
    /// deliveries of one event.
    pub payload: Option<Bytes>,
    /// The request that published the event (with `payload`): its attempts' log lines name it.
    pub request: Option<RequestId>,
}

/// An endpoint whose delivery settings a batch set, or that it deleted: the dispatcher reads its
/// settings again, or drops what it keeps for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EndpointChange {
    pub id: EndpointId,
    pub deleted: bool,
}

/// Told, once a batch is applied (visible to readers, before its flush), which endpoints' settings
/// it set or which endpoints it deleted.
pub type EndpointHook = Arc<dyn Fn(Vec<EndpointChange>) + Send + Sync>;

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
    /// Endpoints whose settings the batch being written sets or which it deletes, told to
    /// `endpoint_hook` once it is applied.
    staged_endpoints: Vec<EndpointChange>,
    endpoint_hook: Option<EndpointHook>,
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
    /// What the batch counts for and the delivery changes it tells, once durable.
    told: Told,
}

/// A command as submitted: who, when, what.
#[derive(Debug, Clone)]
pub struct Submitted {
    pub actor: Actor,
    pub at_ms: u64,
    pub command: Command,
    /// The request it came from (a publish's, for the attempts of its deliveries), named by the
    /// log lines it causes; `None` for an embedder's call or an offline tool.
    pub request: Option<RequestId>,
}

impl Commands {
    pub fn new(limits: CommandLimits) -> Commands {
        Commands {
            limits,
            retrigger_windows: HashMap::new(),
            staged_due: Vec::new(),
            due_hook: None,
            staged_endpoints: Vec::new(),
            endpoint_hook: None,
            staged_key_change: false,
            fan_out: HashMap::new(),
            fan_out_bytes: 0,
            id_seqs: VecDeque::new(),
            api_key_epoch: Arc::new(AtomicU64::new(0)),
            told: Told::new(Arc::new(EngineStats::default())),
        }
    }

    /// The same machine, counting into `stats` (once each batch is durable) and telling the
    /// changes of every delivery to `changes`, while `subscribers` (kept by the subscriptions)
    /// is above 0.
    pub fn with_stats(
        mut self,
        stats: Arc<EngineStats>,
        changes: broadcast::Sender<DeliveryChange>,
        subscribers: Arc<std::sync::atomic::AtomicUsize>,
    ) -> Commands {
        self.told = Told::new(stats).with_changes(changes, subscribers);
        self
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

    /// The same machine, telling `hook` once each batch is applied which endpoints' delivery
    /// settings it set and which endpoints it deleted.
    pub fn with_endpoint_hook(mut self, hook: EndpointHook) -> Commands {
        self.endpoint_hook = Some(hook);
        self
    }

    /// Runs one command: its function (one per command, in the module of its subject) checks it
    /// and stages its events, which [`Commands::stage`] then appends and folds.
    fn run(&mut self, s: Submitted, tx: &mut Tx<'_>) -> Result<Reply, CommandError> {
        let Submitted { actor, at_ms, command, request } = s;
        let mut run = Run { machine: self, tx, actor, at_ms, events: Vec::new(), active_before: None };
        let reply = match command {
            Command::CreateEndpoint { id, org_id, url, name, enabled_events, secret, settings } => {
                run.create_endpoint(NewEndpoint { id, org_id, url, name, enabled_events, secret, settings })
            }
            Command::UpdateEndpoint { id, url, name, enabled_events, settings } => {
                run.update_endpoint(id, url, name, enabled_events, &settings)
            }
            Command::DeleteEndpoint { id } => run.delete_endpoint(id),
            Command::RotateSecret { id, secret } => run.rotate_secret(id, secret.as_deref()),
            Command::EnableEndpoint { id } => run.enable_endpoint(id),
            Command::CreateApiKey { id, org_id, scopes, name, key_hash } => {
                run.create_api_key(id, org_id, scopes, name, key_hash)
            }
            Command::RevokeApiKey { id } => run.revoke_api_key(id),
            // The same fields, moved: one line each way.
            #[rustfmt::skip]
            Command::Publish {
                id, org_id, event_type, payload, call_id, webhook_url, idempotency_key, ordering_key,
            } => run.publish(Publish {
                id, org_id, event_type, payload, call_id, webhook_url, idempotency_key, ordering_key,
            }),
            Command::Retrigger { delivery_id } => run.retrigger(delivery_id),
            Command::Redeliver { delivery_id } => run.redeliver(delivery_id),
            Command::BatchRetrigger { endpoint_id, delivery_ids } => {
                run.batch_retrigger(endpoint_id, delivery_ids)
            }
            Command::RecordAttempt {
                delivery_id,
                started_at_ms,
                finished_at_ms,
                outcome,
                response_excerpt,
                retry_after_ms,
            } => run.record_attempt(
                delivery_id,
                (started_at_ms, finished_at_ms),
                outcome,
                response_excerpt,
                retry_after_ms,
            ),
            Command::Compact(plan) => run.compact(*plan),
            Command::SetPolicy(p) => run.set_policy(p),
            Command::AdoptRules(version) => run.adopt_rules(version),
            Command::Recover { id, org_id, filter } => run.recover(id, org_id, filter),
            Command::ClaimPartition { node_id, epoch } => run.claim_partition(node_id, epoch),
        }?;
        let (events, active_before) = (run.events, run.active_before);
        self.stage(tx, at_ms, actor.recorded(), events, request)?;
        if let Some((endpoint_id, delivery_id)) = active_before {
            log_if_inactive(tx, endpoint_id, delivery_id, request)?;
        }
        Ok(reply)
    }

    /// Appends the events of a command that passed its checks, each record naming `actor`, and
    /// folds each into the batch's projection; notes what a durable batch must tell (a key
    /// change, deliveries made due).
    fn stage(
        &mut self,
        tx: &mut Tx<'_>,
        at_ms: u64,
        actor: RecordActor,
        events: Vec<Event>,
        request: Option<RequestId>,
    ) -> Result<(), CommandError> {
        let mut due = Vec::new();
        // Only a subscriber makes the fold report the deliveries it writes.
        let mut changes = Vec::new();
        let watching = self.told.watching();
        // A command rejected part way (its savepoint rolled back) counts for nothing.
        let mark = self.told.mark();
        let records_before = tx.records().len();
        let staged = self
            .stage_events(tx, at_ms, (actor, request), events, (&mut due, &mut changes), watching)
            .and_then(|()| fits_one_message(tx, records_before));
        if staged.is_err() {
            self.told.rollback(mark);
        }
        staged?;
        if self.due_hook.is_some() {
            self.staged_due.extend(due);
        }
        self.told.changes(&mut changes);
        Ok(())
    }

    /// [`Commands::stage`]'s loop: appends and folds each event, noting the deliveries it makes
    /// due and, when `watching`, the deliveries it changes.
    fn stage_events(
        &mut self,
        tx: &mut Tx<'_>,
        at_ms: u64,
        (actor, request): (RecordActor, Option<RequestId>),
        events: Vec<Event>,
        (due, changes): (&mut Vec<DueHint>, &mut Vec<DeliveryChange>),
        watching: bool,
    ) -> Result<(), CommandError> {
        for event in events {
            if matches!(event, Event::ApiKeyCreated { .. } | Event::ApiKeyRevoked { .. }) {
                self.staged_key_change = true;
            }
            if matches!(
                event,
                Event::EndpointCreated { .. }
                    | Event::EndpointUpdated { .. }
                    | Event::EndpointDeliverySettingsSet { .. }
                    | Event::EndpointDeleted { .. }
                    | Event::Compacted { .. }
            ) {
                self.forget_fan_out();
            }
            match &event {
                Event::EndpointDeliverySettingsSet { id, .. } if self.endpoint_hook.is_some() => {
                    self.staged_endpoints.push(EndpointChange { id: *id, deleted: false })
                }
                Event::EndpointDeleted { id } if self.endpoint_hook.is_some() => {
                    self.staged_endpoints.push(EndpointChange { id: *id, deleted: true })
                }
                _ => {}
            }
            // Every record is stored in a group with the records around it (attempt outcomes
            // come together, first in each batch: the urgent queue; publishes after them).
            // Nothing reads one back by key on a hot path: a first attempt is handed its payload
            // (`DueHint`), only a retry reads it.
            let seq = tx.append_grouped(at_ms, encode(actor, &event)).seq;
            // The log's writer rolls the batch back to this command's savepoint on an error.
            let mut woken = Vec::new();
            if watching {
                let mut watched = Watched { tables: TxTables(tx), changes: &mut *changes };
                apply_unstaged_waking(&mut watched, seq, at_ms, &event, &mut woken)?;
            } else {
                apply_unstaged_waking(&mut TxTables(tx), seq, at_ms, &event, &mut woken)?;
            }
            self.told.event(&event);
            due_hints(due, at_ms, event, request);
            // First of their key order now (one before them left pending): due again for the
            // dispatcher, which set them aside while they waited.
            due.extend(woken.into_iter().map(|due| DueHint { due, payload: None, request: None }));
        }
        Ok(())
    }
}

/// Logs the endpoint of a failed attempt (of `delivery_id`, caused by `request`), active before
/// it, if the attempt's fold made it inactive (the fold decides; this only looks). Logged as the
/// batch is staged: should the batch fail to be written, the store's failure is logged too.
fn log_if_inactive(
    tx: &mut Tx<'_>,
    endpoint_id: EndpointId,
    delivery_id: DeliveryId,
    request: Option<RequestId>,
) -> Result<(), CommandError> {
    if let Some(e) = get_endpoint(&TxRead(tx), endpoint_id)? {
        if e.status == EndpointStatus::Inactive {
            tracing::warn!(
                endpoint_id = %endpoint_id,
                delivery_id = %delivery_id,
                request_id = request.map(tracing::field::display),
                reason = e.inactive_reason.as_deref().unwrap_or(""),
                "endpoint inactive: its deliveries wait until it is enabled again"
            );
        }
    }
    Ok(())
}

/// Adds to `due` the deliveries `event` (stamped `at_ms`) makes due.
fn due_hints(due: &mut Vec<DueHint>, at_ms: u64, event: Event, request: Option<RequestId>) {
    let hint = |next_attempt_at_ms, delivery_id, payload| DueHint {
        due: Due { next_attempt_at_ms, delivery_id },
        payload,
        request,
    };
    match event {
        Event::DeliveryCreated { id, next_attempt_at_ms, .. } => due.push(hint(next_attempt_at_ms, id, None)),
        Event::EventPublishedWithDeliveries { deliveries, payload, .. } => {
            let payload = Bytes::from(payload);
            due.extend(deliveries.iter().map(|d| hint(d.next_attempt_at_ms, d.id, Some(payload.clone()))))
        }
        Event::RetriggerRequested { delivery_id, .. } | Event::RedeliverRequested { delivery_id, .. } => {
            due.push(hint(at_ms, delivery_id, None))
        }
        Event::RecoveryRequested { delivery_ids, .. } | Event::RecoveryDeliveries { delivery_ids, .. } => {
            due.extend(delivery_ids.into_iter().map(|id| hint(at_ms, id, None)))
        }
        _ => {}
    }
}

/// One command being run: the machine, the batch it writes into, who asks and when, and the
/// events its function stages (appended and folded by [`Commands::stage`] once it passed).
struct Run<'a, 'tx> {
    machine: &'a mut Commands,
    tx: &'a mut Tx<'tx>,
    actor: Actor,
    at_ms: u64,
    events: Vec<Event>,
    /// A failed attempt's endpoint, active before it, and the delivery: looked at once the attempt
    /// is folded, to log it if it became inactive.
    active_before: Option<(EndpointId, DeliveryId)>,
}

impl<'tx> Run<'_, 'tx> {
    /// The batch's projection, as the command's checks read it.
    fn read(&self) -> TxRead<'_, 'tx> {
        TxRead(self.tx)
    }

    /// Refuses an organisation's key: only an admin may run the commands of `route`, and to
    /// any other key the route does not exist.
    fn admin_only(&self, route: &str) -> Result<(), CommandError> {
        if self.actor.org_id.is_some() {
            return Err(CommandError::NotFound { what: "route", id: route.into() });
        }
        Ok(())
    }
}

/// With a write-ahead whose messages are bounded (cluster mode: a stream message holds one
/// whole batch), a command whose records take more than [`Tx::command_bytes_max`] is refused
/// whole: rolled back like any rejection, nothing of it written, the writer going on. Without
/// one (a single node) this is one branch.
fn fits_one_message(tx: &Tx<'_>, records_before: usize) -> Result<(), CommandError> {
    let Some(max) = tx.command_bytes_max() else {
        return Ok(());
    };
    let bytes: usize = tx.records()[records_before..].iter().map(herald_log::encoded_len).sum();
    if bytes <= max {
        return Ok(());
    }
    Err(CommandError::Conflict {
        reason: format!(
            "the command's records take {bytes} bytes, over the {max} bytes one command may write \
             in cluster mode (one stream message holds one whole batch)"
        ),
    })
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
        // Visible now: the dispatcher reads the new settings from its next turn on. (A rejected
        // command's change only costs a needless re-read.)
        if !self.staged_endpoints.is_empty() {
            let changed = std::mem::take(&mut self.staged_endpoints);
            if let Some(hook) = self.endpoint_hook.as_ref() {
                hook(changed);
            }
        }
        let told = self.told.after_flush();
        let due = match (&self.due_hook, self.staged_due.is_empty()) {
            (Some(hook), false) => Some((hook.clone(), std::mem::take(&mut self.staged_due))),
            _ => None,
        };
        if told.is_none() && due.is_none() {
            return None;
        }
        Some(Box::new(move |flushed| {
            // Durable: the dispatcher learns what became due. A failed flush leaves the batch
            // applied but unacknowledged: the dispatcher reloads from the stored index instead.
            if let Some((hook, due)) = due {
                hook(flushed.then_some(due));
            }
            if let Some(told) = told {
                told(flushed);
            }
        }))
    }

    fn aborted(&mut self) {
        // Nothing of the batch was written: no key changed, and the endpoint lists may hold
        // what the batch staged.
        self.staged_key_change = false;
        self.staged_endpoints.clear();
        self.forget_fan_out();
        self.told.aborted();
        if !self.staged_due.is_empty() {
            self.staged_due.clear();
            if let Some(hook) = self.due_hook.as_ref() {
                hook(None);
            }
        }
    }
}
