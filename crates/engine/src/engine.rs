//! [`Engine`]: the handle an embedding service (and herald's own server) holds. It opens the store,
//! writes the configured policy to the log when it changed, starts the command machine and the
//! dispatcher, and answers commands and queries.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use herald_log::{CacheStats, CachedStore, Log, LogError, SledStore, Store, WriterStats};
use herald_projector::compact;
use herald_projector::{
    attempts, event_payload, get_delivery, get_endpoint, get_event, list_deliveries, list_endpoints,
    projection_lag, AttemptRecord, CheckedTables, CompactError, CompactReport, Delivery, DeliveryCursor,
    DeliveryId, DeliveryQuery, Endpoint, EndpointId, EventId, EventRecord, OrgId, Page, Policy, StoreTables,
};
use uuid::Uuid;

use crate::clock::{Clock, SystemClock};
use crate::commands::{Actor, Command, CommandError, Commands, Reply, Submitted};
use crate::config::EngineConfig;
use crate::dispatch::{DispatchStats, Dispatcher, Inbox, Shared, StopReport};
use crate::request::RequestScope;
use crate::sender::{HttpSender, Sender, SenderConfig};
use crate::stats::{EngineStats, EngineStatsSnapshot};
use crate::subscribe::{DeliveryChange, Subscription, SUBSCRIPTION_BUFFER};

/// Why the engine could not open, or a command could not be committed.
#[derive(Debug)]
pub enum EngineError {
    /// The command was refused; nothing was written.
    Command(CommandError),
    /// The log could not commit (the store failed, or the engine is stopping); nothing was written.
    Log(LogError),
    /// The engine could not start: a bad configuration, a store that cannot be opened.
    Open(String),
}

impl std::fmt::Display for EngineError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            EngineError::Command(e) => e.fmt(f),
            EngineError::Log(e) => e.fmt(f),
            EngineError::Open(e) => write!(f, "cannot open herald: {e}"),
        }
    }
}

impl std::error::Error for EngineError {}

impl From<CommandError> for EngineError {
    fn from(e: CommandError) -> Self {
        EngineError::Command(e)
    }
}

impl From<LogError> for EngineError {
    fn from(e: LogError) -> Self {
        EngineError::Log(e)
    }
}

/// Checks the store before the engine opens it, and converts what an earlier version left:
/// its format, the fold rules it is under (returned), the projection standing at the log's last
/// seq, the legacy index keys. Nothing else writes the store meanwhile.
fn prepare_store(store: &Arc<dyn Store>) -> Result<u32, EngineError> {
    herald_log::check_format(store.as_ref()).map_err(|e| EngineError::Open(e.to_string()))?;
    // Records folded under rules this code does not know would be folded under its own.
    let rules = CheckedTables::run(store.as_ref(), |t| herald_projector::rules(t))
        .map_err(|e| EngineError::Open(e.to_string()))??;
    if rules > herald_projector::RULES_CURRENT {
        return Err(EngineError::Open(format!(
            "this store is folded under rules version {rules}, newer than this binary's {}; \
             run the newer binary",
            herald_projector::RULES_CURRENT
        )));
    }
    // The projection is written in the same atomic batch as the records it folds, so it stands
    // at the log's last seq; anything else is damage, and herald does not guess.
    match projection_lag(store.as_ref()) {
        Ok((applied, last)) if applied != last => {
            return Err(EngineError::Open(format!(
                "the projection stands at seq {applied} but the log ends at seq {last}; \
                 run `herald verify` on this data directory"
            )))
        }
        Ok(_) => {}
        Err(e) => return Err(EngineError::Open(e.to_string())),
    }
    // Index keys an earlier version wrote and this one does not keep, or keeps in chunks:
    // converted once.
    match compact::drop_legacy(store.clone()) {
        Ok(0) => {}
        Ok(n) => tracing::info!(
            entries = n,
            "converted index entries an earlier version stored one key each (now in chunks, or not kept)"
        ),
        Err(e) => {
            return Err(EngineError::Open(format!("converting index entries of an earlier version: {e}")))
        }
    }
    herald_log::upgrade_format(store.as_ref()).map_err(|e| EngineError::Open(e.to_string()))?;
    Ok(rules)
}

/// `result` of a write at open, where a store that refuses writes must not stop the start.
fn started_anyway(result: Result<Reply, EngineError>, what: &str) -> Result<(), EngineError> {
    match result {
        Ok(_) => Ok(()),
        Err(EngineError::Log(e)) => {
            tracing::warn!(error = %e, "{what} failed, going on without it until the next start");
            Ok(())
        }
        Err(e) => Err(e),
    }
}

impl From<herald_projector::CorruptValue> for EngineError {
    fn from(e: herald_projector::CorruptValue) -> Self {
        EngineError::Log(LogError::Store(herald_log::StoreError::Io(e.to_string())))
    }
}

/// What the engine is built from; [`Engine::open`] uses sled, the system clock and HTTP. Tests and
/// simulations pass their own.
pub struct Parts {
    pub store: Arc<dyn Store>,
    pub clock: Arc<dyn Clock>,
    pub sender: Arc<dyn Sender>,
}

/// Reads [`Engine::consistent_read`] makes, at most, before it answers what the last one saw.
pub const CONSISTENT_READ_TRIES: usize = 8;
/// How long [`Engine::shutdown`] waits for the log's writer to stop when the shutdown timeout is
/// (nearly) spent: the commands queued ahead of the stop are usually written in a batch or two.
pub const CLOSE_GRACE: Duration = Duration::from_millis(100);

/// Records one compaction pass drops, at most: it bounds the memory a pass needs (the state
/// those records leave) and the size of its batch, so the time other commands wait for it
/// (up to about 160 ms here; the retention benchmark prints it).
pub const COMPACT_PASS_RECORDS: usize = 20_000;

/// What retention has done since the engine opened.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RetentionStats {
    pub runs: u64,
    pub failures: u64,
    pub records_dropped: u64,
    pub deliveries_dropped: u64,
    pub events_dropped: u64,
    /// Why the last run failed, if it did.
    pub last_error: Option<String>,
}

/// A published event with its payload, as `GET /v1/events/{id}` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublishedEvent {
    pub record: EventRecord,
    pub payload: Vec<u8>,
}

/// The engine. Cloning gives another handle to the same engine.
#[derive(Clone)]
pub struct Engine {
    inner: Arc<Inner>,
}

struct Inner {
    log: Log<Commands>,
    /// The command machine's [`Commands::api_key_epoch`].
    api_key_epoch: Arc<std::sync::atomic::AtomicU64>,
    /// What the engine counts where it happens (see [`Engine::stats`]).
    stats: Arc<EngineStats>,
    /// The delivery changes the command machine tells ([`Engine::subscribe`]): weak, so the
    /// channel closes, and its subscribers learn it, once the log's writer has stopped.
    changes: tokio::sync::broadcast::WeakSender<DeliveryChange>,
    /// Live subscriptions, which the command machine reads to decide whether to report changes.
    subscribers: Arc<std::sync::atomic::AtomicUsize>,
    /// One compaction at a time, and what retention has done so far.
    retention: std::sync::Mutex<RetentionStats>,
    /// Dropped to stop the retention thread.
    retention_stop: std::sync::Mutex<Option<crossbeam_channel::Sender<()>>>,
    store: Arc<dyn Store>,
    cache: Arc<CachedStore>,
    clock: Arc<dyn Clock>,
    shared: Arc<Shared>,
    runtime: std::sync::Mutex<Option<tokio::runtime::Runtime>>,
    stopped: crossbeam_channel::Receiver<StopReport>,
    shutdown_timeout: Duration,
    /// When the stop began ([`Engine::begin_shutdown`]); its timeout counts from there.
    stop_began: std::sync::Mutex<Option<Instant>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.shared.stop();
        if let Some(rt) = self.runtime.lock().unwrap_or_else(|e| e.into_inner()).take() {
            rt.shutdown_background();
        }
    }
}

/// The engine's log, writing ahead to `write_ahead` when there is one (cluster mode).
fn open_log(
    store: Arc<dyn Store>,
    machine: Commands,
    config: herald_log::LogConfig,
    write_ahead: Option<Arc<dyn herald_log::WriteAhead>>,
) -> Result<Log<Commands>, EngineError> {
    let log = match write_ahead {
        None => Log::open(store, machine, config),
        Some(write_ahead) => Log::open_write_ahead(store, machine, config, write_ahead),
    };
    log.map_err(|e| EngineError::Open(e.to_string()))
}

/// The command machine of an engine: its hooks tell the dispatcher what became due and which
/// endpoints' settings changed; it counts into `stats` and tells `changes` to subscribers.
fn commands_machine(
    config: &EngineConfig,
    inbox: &Arc<Inbox>,
    stats: &Arc<EngineStats>,
    changes: &tokio::sync::broadcast::Sender<DeliveryChange>,
    subscribers: &Arc<std::sync::atomic::AtomicUsize>,
) -> Commands {
    let (hook_inbox, endpoint_inbox) = (inbox.clone(), inbox.clone());
    Commands::new(config.limits.clone())
        .with_due_hook(Arc::new(move |due| hook_inbox.hints(due)))
        .with_endpoint_hook(Arc::new(move |changes| endpoint_inbox.endpoints_changed(changes)))
        .with_stats(stats.clone(), changes.clone(), subscribers.clone())
}

impl Engine {
    /// Opens (or creates) the data directory of `config` and starts delivering.
    pub fn open(config: EngineConfig) -> Result<Engine, EngineError> {
        if let Some(problem) = config.problem() {
            return Err(EngineError::Open(problem));
        }
        let store = SledStore::open(&config.data_dir, config.cache_bytes)
            .map_err(|e| EngineError::Open(format!("{}: {e}", config.data_dir.display())))?;
        let sender = Engine::http_sender(&config)?;
        Engine::open_with(
            config,
            Parts { store: Arc::new(store), clock: Arc::new(SystemClock), sender: Arc::new(sender) },
        )
    }

    /// The HTTP sender [`Engine::open`] delivers with, built from `config`'s delivery section
    /// (timeout, private targets, extra CA file, `Retry-After` cap, idle connections per host).
    pub fn http_sender(config: &EngineConfig) -> Result<HttpSender, EngineError> {
        let extra_ca_pem = match &config.delivery.extra_ca_file {
            Some(path) => Some(read_file(path)?),
            None => None,
        };
        HttpSender::new(SenderConfig {
            timeout: config.delivery.timeout,
            allow_private_targets: config.delivery.allow_private_targets,
            extra_ca_pem,
            retry_after_max_ms: u64::try_from(config.delivery.retry_after_max.as_millis())
                .unwrap_or(u64::MAX),
            pool_idle_per_host_max: config.delivery.max_in_flight_per_endpoint.max(1),
            ..SenderConfig::default()
        })
        .map_err(|e| EngineError::Open(e.to_string()))
    }

    /// [`Engine::open`] on a store already open (a cluster partition's), writing ahead to
    /// `write_ahead`: the system clock and the HTTP sender `open` builds. `config.data_dir` and
    /// `cache_bytes` are not used (the store is open).
    pub fn open_store_with_write_ahead(
        config: EngineConfig,
        store: Arc<dyn Store>,
        write_ahead: Arc<dyn herald_log::WriteAhead>,
    ) -> Result<Engine, EngineError> {
        if let Some(problem) = config.problem() {
            return Err(EngineError::Open(problem));
        }
        let sender = Engine::http_sender(&config)?;
        let parts = Parts { store, clock: Arc::new(SystemClock), sender: Arc::new(sender) };
        Engine::open_with_write_ahead(config, parts, write_ahead)
    }

    /// Opens the engine on the given store, clock and sender.
    pub fn open_with(config: EngineConfig, parts: Parts) -> Result<Engine, EngineError> {
        Engine::open_parts(config, parts, None)
    }

    /// [`Engine::open_with`] whose log writes each batch ahead to `write_ahead` before applying
    /// it (cluster mode: the partition's stream; see `herald_log::WriteAhead`). What the open
    /// itself records (the rules, the policy) goes through it too.
    pub fn open_with_write_ahead(
        config: EngineConfig,
        parts: Parts,
        write_ahead: Arc<dyn herald_log::WriteAhead>,
    ) -> Result<Engine, EngineError> {
        Engine::open_parts(config, parts, Some(write_ahead))
    }

    fn open_parts(
        mut config: EngineConfig,
        parts: Parts,
        write_ahead: Option<Arc<dyn herald_log::WriteAhead>>,
    ) -> Result<Engine, EngineError> {
        if let Some(problem) = config.problem() {
            return Err(EngineError::Open(problem));
        }
        // `[store] durability` is the log's.
        config.log.durability = config.durability;
        config.limits.allow_private_targets = config.delivery.allow_private_targets;
        let Parts { store, clock, sender } = parts;
        let rules = prepare_store(&store)?;
        // From here on every read and write goes through the cache, so it sees every batch.
        // Which keys it keeps is the projector's to say.
        let cached = Arc::new(herald_projector::cache_policy().cached_store(store, config.read_cache_bytes));
        let store: Arc<dyn Store> = cached.clone();
        // Before anything else reads them: the ordering lookups of new ids need no store read.
        let _ = CheckedTables::run(store.as_ref(), |t| {
            herald_projector::learn_order_floors(t);
            Ok::<_, ()>(())
        });
        let inbox = Arc::new(Inbox::default());
        let stats = Arc::new(EngineStats::default());
        let (changes, _) = tokio::sync::broadcast::channel(SUBSCRIPTION_BUFFER);
        let subscribers = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let machine = commands_machine(&config, &inbox, &stats, &changes, &subscribers);
        let changes = changes.downgrade();
        let api_key_epoch = machine.api_key_epoch();
        let log = open_log(store.clone(), machine, config.log, write_ahead)?;
        let shared = Arc::new(Shared::new(inbox));
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(config.delivery.worker_threads)
            .thread_name("herald-dispatch")
            .enable_all()
            .build()
            .map_err(|e| EngineError::Open(format!("starting the dispatcher's runtime: {e}")))?;
        let (stopped_tx, stopped) = crossbeam_channel::bounded(1);
        let engine = Engine {
            inner: Arc::new(Inner {
                log: log.clone(),
                api_key_epoch,
                stats,
                changes,
                subscribers,
                retention: std::sync::Mutex::new(RetentionStats::default()),
                retention_stop: std::sync::Mutex::new(None),
                store,
                cache: cached,
                clock: clock.clone(),
                shared: shared.clone(),
                runtime: std::sync::Mutex::new(None),
                stopped,
                shutdown_timeout: config.delivery.shutdown_timeout,
                stop_began: std::sync::Mutex::new(None),
            }),
        };
        engine.adopt_rules_and_policy(rules, &config.policy)?;
        let dispatcher = Dispatcher::new(log, clock, sender, shared, config.delivery.clone());
        runtime.spawn(async move {
            let report = dispatcher.run().await;
            let _ = stopped_tx.send(report);
        });
        *engine.inner.runtime.lock().unwrap_or_else(|e| e.into_inner()) = Some(runtime);
        if let Some(retain) = config.retain {
            engine.start_retention(retain, config.compact_every)?;
        }
        Ok(engine)
    }

    /// A store folded under earlier rules takes this code's from here on (the records before
    /// keep the rules they were written under, so a rebuild still matches). The policy in force
    /// is the configuration's; a change is itself a logged fact. A store that refuses writes (a
    /// full disk) still starts: it goes on under the rules and the policy it has, which is what
    /// its records say, and the next start writes them.
    fn adopt_rules_and_policy(&self, rules: u32, policy: &Policy) -> Result<(), EngineError> {
        if rules < herald_projector::RULES_CURRENT {
            let adopt = Command::AdoptRules(herald_projector::RULES_CURRENT);
            started_anyway(self.execute_blocking(Actor::admin(), adopt), "adopting the current fold rules")?;
        }
        if self.read(|t| herald_projector::policy(t))? != *policy {
            let set = Command::SetPolicy(policy.clone());
            started_anyway(self.execute_blocking(Actor::admin(), set), "recording the configured policy")?;
        }
        Ok(())
    }

    /// Compacts every quarter of `retain` (but not more often than every second), and at least
    /// every `every_max`, until the engine stops. The thread holds only a weak handle, so it never keeps a dropped
    /// engine alive.
    fn start_retention(&self, retain: Duration, every_max: Duration) -> Result<(), EngineError> {
        let every = (retain / 4).max(Duration::from_secs(1)).min(every_max);
        let (stop_tx, stop) = crossbeam_channel::bounded::<()>(0);
        *self.inner.retention_stop.lock().unwrap_or_else(|e| e.into_inner()) = Some(stop_tx);
        let weak = Arc::downgrade(&self.inner);
        std::thread::Builder::new()
            .name("herald-retention".into())
            .spawn(move || {
                while let Err(crossbeam_channel::RecvTimeoutError::Timeout) = stop.recv_timeout(every) {
                    let Some(inner) = weak.upgrade() else { return };
                    // The outcome is kept in the retention stats, for metrics, and logged: a failure
                    // has no caller to go to.
                    match (Engine { inner }).compact(retain) {
                        Ok(report) => tracing::info!(
                            records_dropped = report.records_dropped,
                            deliveries_dropped = report.deliveries_dropped,
                            events_dropped = report.events_dropped,
                            "retention pass done"
                        ),
                        // Stopping: the pass was cut off, nothing was written.
                        Err(EngineError::Log(LogError::Closed)) => {}
                        Err(e) => tracing::error!(error = %e, "retention pass failed: compaction"),
                    }
                }
            })
            .map_err(|e| EngineError::Open(format!("starting the retention thread: {e}")))?;
        Ok(())
    }

    /// Drops the history of deliveries delivered more than `retain` ago: the log's records
    /// older than that go, and so do those deliveries and their events once every delivery of
    /// the event is delivered; pending, exhausted and inactive deliveries always stay. The kept
    /// log chains to an anchor (and starts from a checkpoint), so `herald verify` still proves
    /// it. Runs in passes of at most [`COMPACT_PASS_RECORDS`] records, each planned off the
    /// writer and committed as one batch. Blocking.
    pub fn compact(&self, retain: Duration) -> Result<CompactReport, EngineError> {
        let mut stats = self.inner.retention.lock().unwrap_or_else(|e| e.into_inner());
        let retain_ms = u64::try_from(retain.as_millis()).unwrap_or(u64::MAX);
        let cutoff_ms = self.now_ms().saturating_sub(retain_ms);
        let result = self.compact_passes(cutoff_ms);
        stats.runs += 1;
        match &result {
            Ok(report) => {
                stats.records_dropped += report.records_dropped;
                stats.deliveries_dropped += report.deliveries_dropped;
                stats.events_dropped += report.events_dropped;
                stats.last_error = None;
            }
            Err(e) => {
                stats.failures += 1;
                stats.last_error = Some(e.to_string());
            }
        }
        result
    }

    fn compact_passes(&self, cutoff_ms: u64) -> Result<CompactReport, EngineError> {
        let mut total = CompactReport::default();
        let store = self.inner.store.clone();
        loop {
            let plan =
                compact::plan(store.as_ref(), cutoff_ms, COMPACT_PASS_RECORDS).map_err(|e| match e {
                    CompactError::Log(e) => EngineError::Log(e),
                    e => EngineError::Log(LogError::Store(herald_log::StoreError::Io(e.to_string()))),
                })?;
            let Some(plan) = plan else { return Ok(total) };
            let reply = self.execute_blocking(Actor::admin(), Command::Compact(Box::new(plan)))?;
            if let Reply::Compacted(report) = reply {
                total.records_dropped += report.records_dropped;
                total.deliveries_dropped += report.deliveries_dropped;
                total.events_dropped += report.events_dropped;
                total.through_seq = report.through_seq;
            }
        }
    }

    /// What retention has done since the engine opened.
    pub fn retention_stats(&self) -> RetentionStats {
        self.inner.retention.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The time commands are stamped with.
    pub fn now_ms(&self) -> u64 {
        self.inner.clock.now_ms()
    }

    /// Runs a command and calls `done` (from the log's writer thread) once it is durable or
    /// refused. The call blocks only while the writer's queue is full.
    pub fn submit_with(
        &self,
        actor: Actor,
        command: Command,
        done: impl FnOnce(Result<Reply, EngineError>) + Send + 'static,
    ) {
        let at_ms = self.inner.clock.now_ms();
        // Inside a request (the server's edge set its scope): its id goes with the command, and a
        // publish's latency is timed from its arrival, not from here.
        let request = RequestScope::current();
        // A publish's latency is taken where it is answered: a caller that went away still has
        // its publish measured (and counted, by the machine).
        let publish = matches!(command, Command::Publish { .. }).then(|| {
            let arrived = request.map_or_else(Instant::now, |r| r.arrived);
            (arrived, self.inner.stats.clone())
        });
        let submitted = Submitted { actor, at_ms, command, request: request.map(|r| r.id) };
        self.inner.log.submit_with(submitted, move |out| {
            done(match out {
                Ok(Ok(reply)) => {
                    if let Some((started, stats)) = publish {
                        stats.publish_took(u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX));
                    }
                    Ok(reply)
                }
                Ok(Err(e)) => Err(EngineError::Command(e)),
                Err(e) => Err(EngineError::Log(e)),
            })
        });
    }

    /// Runs a command; resolves once its events are durable (or it was refused).
    pub async fn execute(&self, actor: Actor, command: Command) -> Result<Reply, EngineError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.submit_with(actor, command, move |out| {
            let _ = tx.send(out);
        });
        rx.await.unwrap_or(Err(EngineError::Log(LogError::Closed)))
    }

    /// Runs a command and blocks until its events are durable (or it was refused).
    pub fn execute_blocking(&self, actor: Actor, command: Command) -> Result<Reply, EngineError> {
        let (tx, rx) = crossbeam_channel::bounded(1);
        self.submit_with(actor, command, move |out| {
            let _ = tx.send(out);
        });
        rx.recv().unwrap_or(Err(EngineError::Log(LogError::Closed)))
    }

    /// Publishes `payload` (JSON bytes) as an event of `event_type` for the organisation: the
    /// simplest command, for embedders. No key asks, so its records name the system as actor.
    pub fn publish(&self, org_id: OrgId, event_type: &str, payload: &[u8]) -> Result<Reply, EngineError> {
        self.execute_blocking(
            Actor { org_id: Some(org_id), key_id: None },
            Command::Publish {
                id: EventId(Uuid::now_v7()),
                org_id,
                event_type: event_type.to_owned(),
                payload: payload.to_vec(),
                call_id: None,
                webhook_url: None,
                idempotency_key: None,
                ordering_key: None,
            },
        )
    }

    /// A counter that grows each time a batch creating or revoking an API key is applied, by
    /// whichever handle submitted it, before that batch's callers are answered. A cache of keys
    /// read from the projection reads it before each lookup and drops what it holds when it
    /// moved (the server's key cache does), so a revoked key is refused once its revoke returns.
    pub fn api_key_epoch(&self) -> u64 {
        self.inner.api_key_epoch.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Read access to the projection, for queries this handle does not wrap. A store error
    /// reads as absent here; [`Engine::read`] tells them apart.
    pub fn tables(&self) -> StoreTables<'_> {
        StoreTables(self.inner.store.as_ref())
    }

    /// Runs `query` over the projection. If the store failed any of its reads (sled may, after
    /// an IO error), the answer is that error, not what the query made of the reads that
    /// failed ("not found", a short page).
    pub fn read<T>(
        &self,
        query: impl FnOnce(&CheckedTables<'_>) -> Result<T, herald_projector::CorruptValue>,
    ) -> Result<T, EngineError> {
        Ok(CheckedTables::run(self.inner.store.as_ref(), query)
            .map_err(|e| EngineError::Log(LogError::Store(e)))??)
    }

    /// Runs `read` over the projection until it has seen one state of it: no batch applied while
    /// it ran. A read of several parts one after another (a list merged from its status
    /// partitions) can otherwise miss a delivery that moved, meanwhile, from a part not yet read
    /// into one already read. After [`CONSISTENT_READ_TRIES`] tries the last answer stands. A
    /// store error in the read that stands is the answer, as in [`Engine::read`].
    pub fn consistent_read<T>(
        &self,
        read: impl Fn(&CheckedTables<'_>) -> Result<T, herald_projector::CorruptValue>,
    ) -> Result<T, EngineError> {
        let mut tries = 0;
        loop {
            tries += 1;
            let before = self.inner.cache.read_epoch();
            let out = CheckedTables::run(self.inner.store.as_ref(), &read);
            let settled = before.is_some() && before == self.inner.cache.read_epoch();
            if settled || tries >= CONSISTENT_READ_TRIES {
                return Ok(out.map_err(|e| EngineError::Log(LogError::Store(e)))??);
            }
            if before.is_none() {
                // A batch was being applied: let the writer finish it.
                std::thread::yield_now();
            }
        }
    }

    /// The store under the engine (behind its read cache, not through it): for tools that read
    /// the log itself, such as `verify` and `export`.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.inner.store
    }

    /// A delivery by id, in any organisation (`None`: no such delivery). Callers acting for an
    /// organisation check `org_id` themselves, as the server does.
    pub fn delivery(&self, id: DeliveryId) -> Result<Option<Delivery>, EngineError> {
        self.read(|t| get_delivery(t, id))
    }

    /// The ordering key of the deliveries of event `event_id` (whose call id is `call_id`): the
    /// one its publish gave, else the call id, else none.
    pub fn ordering_key(
        &self,
        event_id: EventId,
        call_id: Option<Uuid>,
    ) -> Result<Option<String>, EngineError> {
        self.read(|t| herald_projector::ordering_key(t, event_id, call_id))
    }

    /// An endpoint by id, in any organisation, deleted ones included (`deleted_at_ms` set).
    pub fn endpoint(&self, id: EndpointId) -> Result<Option<Endpoint>, EngineError> {
        self.read(|t| get_endpoint(t, id))
    }

    /// A page of an organisation's live endpoints in id order, after `after`, up to `limit`.
    pub fn endpoints(
        &self,
        org_id: OrgId,
        after: Option<EndpointId>,
        limit: usize,
    ) -> Result<Page<Endpoint, EndpointId>, EngineError> {
        self.read(|t| list_endpoints(t, org_id, after, limit))
    }

    /// An event with the payload read back from its log record.
    pub fn event(&self, id: EventId) -> Result<Option<PublishedEvent>, EngineError> {
        let Some(record) = self.read(|t| get_event(t, id))? else { return Ok(None) };
        match event_payload(self.inner.store.as_ref(), &record) {
            Ok(payload) => Ok(Some(PublishedEvent { record, payload })),
            Err(CompactError::Log(e)) => Err(EngineError::Log(e)),
            Err(e) => Err(EngineError::Log(LogError::Store(herald_log::StoreError::Io(e.to_string())))),
        }
    }

    /// A page of deliveries of one list (by organisation, endpoint, status or event type; see
    /// [`DeliveryQuery`]), newest first, after the cursor `after`, up to `limit`.
    pub fn deliveries(
        &self,
        query: &DeliveryQuery,
        after: Option<DeliveryCursor>,
        limit: usize,
    ) -> Result<Page<Delivery, DeliveryCursor>, EngineError> {
        self.read(|t| list_deliveries(t, query, after, limit))
    }

    /// Up to `limit` attempts of a delivery, oldest first, after attempt number `after`.
    pub fn attempts(
        &self,
        id: DeliveryId,
        after: u32,
        limit: usize,
    ) -> Result<Vec<AttemptRecord>, EngineError> {
        self.read(|t| attempts(t, id, after, limit))
    }

    /// The organisation's default secret (`whsec_…`), which signs its deliveries to an inline
    /// `webhook_url`; `None` until its first such publish makes one. Receivers of inline
    /// deliveries verify with it; the HTTP API does not show it.
    pub fn organisation_secret(&self, org_id: OrgId) -> Result<Option<String>, EngineError> {
        self.read(|t| herald_projector::org_secret(t, org_id))
    }

    /// The policy in force.
    pub fn policy(&self) -> Result<Policy, EngineError> {
        self.read(|t| herald_projector::policy(t))
    }

    /// The log's durable records from `from_seq` on (the audit log).
    pub fn records(&self, from_seq: u64, limit: usize) -> Result<Vec<herald_log::Record>, EngineError> {
        Ok(self.inner.log.read(from_seq, limit)?)
    }

    pub fn committed_seq(&self) -> u64 {
        self.inner.log.committed_seq()
    }

    pub fn writer_stats(&self) -> WriterStats {
        self.inner.log.stats()
    }

    /// Why the store refuses writes, while it does (a full disk): every write is answered with
    /// this error until the log's writer has reopened the store and a probe write went through,
    /// which it tries by itself (see [`herald_log::RESUME_WAIT_MAX`]). Reads go on meanwhile.
    pub fn store_refusal(&self) -> Option<herald_log::StoreError> {
        self.inner.log.refusal()
    }

    /// Why the log's write-ahead fenced this engine off, once it has (cluster mode: another node
    /// wrote the partition's stream where this one expected to): every write is refused with it
    /// from then on, for good.
    pub fn write_ahead_fenced(&self) -> Option<herald_log::WriteAheadError> {
        self.inner.log.fenced()
    }

    /// Hits and misses of the read cache in front of the store.
    pub fn read_cache_stats(&self) -> CacheStats {
        self.inner.cache.stats()
    }

    /// What the engine has counted since it opened: events published (once durable, whoever
    /// asked and whether or not they waited for the answer), publish latency and attempt
    /// durations. The log's flush durations are in [`Engine::writer_stats`].
    pub fn stats(&self) -> EngineStatsSnapshot {
        self.inner.stats.snapshot()
    }

    /// A stream of delivery state changes: for each batch made durable from now on, each
    /// delivery it created or changed (published, attempted, retriggered, recovered, turned
    /// inactive with its endpoint), in the log's order, as [`DeliveryChange`]s (id, status,
    /// attempts, endpoint). Bounded: the engine never waits for a subscriber; one that falls
    /// more than [`SUBSCRIPTION_BUFFER`] changes behind loses the oldest and is told how many
    /// ([`SubscriptionError::Missed`](crate::SubscriptionError::Missed)). A batch whose flush
    /// failed is not told (it may yet be found durable: read the delivery again). After the
    /// engine stops, [`Subscription::recv`] answers `Closed`. With no subscriber the fold
    /// reports nothing: it costs nothing.
    pub fn subscribe(&self) -> Subscription {
        match self.inner.changes.upgrade() {
            Some(changes) => Subscription::new(changes.subscribe(), self.inner.subscribers.clone()),
            // Stopped: a channel already closed.
            None => Subscription::new(tokio::sync::broadcast::channel(1).1, self.inner.subscribers.clone()),
        }
    }

    pub fn dispatch_stats(&self) -> DispatchStats {
        self.inner.shared.stats()
    }

    /// Tells the dispatcher to look at the clock now (after a [`ManualClock`](crate::clock::ManualClock) moved).
    pub fn wake(&self) {
        self.inner.shared.wake();
    }

    /// Waits until the dispatcher has nothing in flight and nothing due at the clock's current
    /// time, or `timeout` passes. Returns whether it settled. For tests and simulations.
    pub fn settle(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            let asked = self.inner.shared.stats().generation;
            self.wake();
            // Two full turns after the ask: the inbox taken, what was due started or parked.
            loop {
                let s = self.inner.shared.stats();
                if s.generation >= asked + 2 {
                    let now = self.now_ms();
                    let due_now = s.oldest_due_ms.is_some_and(|t| t <= now)
                        || s.throttle_wake_ms.is_some_and(|t| t <= now)
                        || (s.refill_pending && s.refill_from_ms.is_none_or(|t| t <= now));
                    if s.in_flight == 0 && s.parked == 0 && !due_now && self.inner.shared.inbox_is_empty() {
                        return true;
                    }
                    break;
                }
                if Instant::now() >= deadline {
                    return false;
                }
                std::thread::sleep(Duration::from_micros(200));
                self.wake();
            }
            if Instant::now() >= deadline {
                return false;
            }
        }
    }

    /// Begins the graceful stop without waiting for it: the dispatcher starts no new attempt
    /// from now on and waits for those in flight, within the shutdown timeout counted from here;
    /// retention stops. Commands are still taken until [`shutdown`](Engine::shutdown), so a
    /// server can let its requests in progress finish meanwhile (their deliveries are attempted
    /// after the restart). Calling it again changes nothing.
    pub fn begin_shutdown(&self) {
        let mut began = self.inner.stop_began.lock().unwrap_or_else(|e| e.into_inner());
        if began.is_none() {
            let now = Instant::now();
            *began = Some(now);
            self.inner.retention_stop.lock().unwrap_or_else(|e| e.into_inner()).take();
            self.inner.shared.stop_by(now + self.inner.shutdown_timeout);
        }
    }

    /// The graceful stop (begun here unless [`begin_shutdown`](Engine::begin_shutdown) began it):
    /// the dispatcher takes no new attempt, waits for those in flight and records the rest as
    /// interrupted; then the log is closed once the commands queued ahead of the stop are written
    /// (every batch is durable when acknowledged, so nothing else is left to flush). All of it
    /// within the shutdown timeout, plus [`CLOSE_GRACE`] for the writer to stop: past that (a
    /// stalled disk) the stop returns and leaves the writer to finish in the background. What is
    /// not durable by then was not acknowledged: attempts not recorded stay pending and are made
    /// again after the restart. Blocking; from async code call it through `spawn_blocking`.
    pub fn shutdown(&self) -> StopReport {
        self.begin_shutdown();
        let began =
            self.inner.stop_began.lock().unwrap_or_else(|e| e.into_inner()).unwrap_or_else(Instant::now);
        let deadline = began + self.inner.shutdown_timeout;
        let report = self
            .inner
            .stopped
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .unwrap_or_default();
        let close_within = deadline.saturating_duration_since(Instant::now()).max(CLOSE_GRACE);
        if !self.inner.log.close_within(close_within) {
            tracing::warn!("the log writer did not stop within the shutdown timeout; left to finish");
        }
        report
    }
}

fn read_file(path: &Path) -> Result<Vec<u8>, EngineError> {
    std::fs::read(path).map_err(|e| EngineError::Open(format!("reading {}: {e}", path.display())))
}
