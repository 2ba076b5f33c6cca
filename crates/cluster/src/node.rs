//! The cluster node runtime: one herald node's place in the cluster. It connects to NATS,
//! checks the cluster's partition count, beats its heartbeat, and runs the membership loop
//! (read the live nodes and every lease, [`balance::plan`], take partitions over, hand extra
//! ones back, step down from lost ones); it opens one [`Engine`] per partition it serves and
//! follows the control partition (every API key) when another node owns it. The server asks
//! it, per request, where a partition is served ([`Node::place`]): an in-memory answer.
//!
//! Its parts: this file (the API, start and stop), `membership.rs` (the loop, take-over,
//! hand-back, step-down), `control.rs` (the control partition's follower and the key reads).

mod control;
mod membership;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::time::Duration;

use async_nats::jetstream::Context;
use herald_engine::{ApiKey, Engine, EngineConfig};
use herald_log::{SledStore, Store};
use herald_projector::OrgId;

use crate::error::{nats, ClusterError};
use crate::lease::{open_bucket, Held, Lease, LeaseError, LeaseSettings, Leases, Nodes};
use crate::partition::PartitionId;
use crate::stream::{PartitionStream, StreamSettings, StreamWriteAhead};
use crate::takeover::unix_ms;

/// The bucket holding the cluster's fixed settings (key [`PARTITIONS_KEY`]).
pub const META_BUCKET: &str = "herald-meta";
/// The key of the partition count in [`META_BUCKET`] (decimal text).
pub const PARTITIONS_KEY: &str = "partitions";
/// How often a node that does not own the control partition catches its replica up.
pub const CONTROL_FOLLOW_EVERY: Duration = Duration::from_millis(250);

/// What a node is started with.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// `nats://host:port`, or several separated by commas.
    pub nats_url: String,
    pub node_id: String,
    /// Where other nodes forward requests for the partitions this one serves.
    pub advertise: String,
    /// Data partitions (the control partition is one more, numbered `partitions`).
    pub partitions: u32,
    /// Copies NATS keeps of each stream and bucket.
    pub replicas: usize,
    /// How long a lease lasts from its last renewal (renewed every third of it).
    pub lease: Duration,
    /// `<data_dir>/cluster/p<N>` and `<data_dir>/cluster/control` hold the partitions' stores.
    pub data_dir: PathBuf,
    /// The engine configuration each partition's engine is made from: its data directory,
    /// caches and dispatcher threads are split per partition by the node.
    pub engine: EngineConfig,
}

/// Where a partition is served, as this node knows it now.
#[derive(Clone)]
pub enum Place {
    /// Here: this node holds the lease and serves the partition with this engine.
    Local(Engine),
    /// By another node, at its `advertise` address (its lease, as last read).
    Remote { node_id: String, advertise: String },
    /// By nobody that this node knows of (a take-over is due or in progress).
    Unowned,
}

impl std::fmt::Debug for Place {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Place::Local(_) => write!(f, "Local"),
            Place::Remote { node_id, advertise } => write!(f, "Remote({node_id} at {advertise})"),
            Place::Unowned => write!(f, "Unowned"),
        }
    }
}

/// One partition this node serves: its engine, its write-ahead, and its lease's renewal.
struct Served {
    engine: Engine,
    write_ahead: Arc<StreamWriteAhead>,
    renewal: Renewal,
}

/// A held lease kept renewed: the task, the lease as last written, until when it lets this
/// node serve (unix ms, this host's clock), and whether it was lost.
struct Renewal {
    task: tokio::task::JoinHandle<()>,
    held: Arc<Mutex<Held>>,
    until_ms: Arc<AtomicU64>,
    lost: Arc<AtomicBool>,
}

impl Served {
    /// Why this partition must not be served here any more, if so: its lease lost or passed
    /// unrenewed, or its engine fenced by another node's write.
    fn refusal(&self, now_ms: u64) -> Option<String> {
        if self.renewal.lost.load(Ordering::SeqCst) {
            return Some("its lease was lost".into());
        }
        let until = self.renewal.until_ms.load(Ordering::SeqCst);
        if now_ms >= until {
            return Some(format!("its lease passed unrenewed {} ms ago", now_ms - until));
        }
        self.engine.write_ahead_fenced().map(|e| e.to_string())
    }
}

/// What the membership loop last read of the cluster.
#[derive(Debug, Clone, Default)]
struct Seen {
    /// Whether it has read the cluster at all yet.
    read: bool,
    /// Live node ids, sorted.
    live: Vec<String>,
    /// Every partition's lease (data partitions, then the control partition).
    leases: Vec<Option<Lease>>,
    /// When the last successful read was (unix ms).
    at_ms: u64,
    /// Why the last read failed, if it did.
    error: Option<String>,
}

/// Everything the node's threads and tasks share.
struct Shared {
    node_id: String,
    /// Where other nodes forward to (this node's heartbeat carries it).
    advertise: String,
    partitions: u32,
    lease: Duration,
    skew_margin: Duration,
    data_dir: PathBuf,
    engine: EngineConfig,
    stream_settings: StreamSettings,
    runtime: tokio::runtime::Handle,
    js: Context,
    leases: Arc<Leases>,
    nodes: Nodes,
    streams: Mutex<BTreeMap<u32, PartitionStream>>,
    stores: Mutex<BTreeMap<u32, Arc<dyn Store>>>,
    served: RwLock<BTreeMap<u32, Served>>,
    seen: RwLock<Seen>,
    control: control::ControlReplica,
    changes: tokio::sync::watch::Sender<u64>,
    /// Wakes the membership loop before its next turn (a lease lost, a write fenced, a stop).
    wake: Wakeup,
    stopping: AtomicBool,
    /// Test hook: renewals, heartbeats and the membership loop suspended (a stalled process).
    stalled: AtomicBool,
    /// The partition being taken over now (lease claimed, catching up, opening), or `NONE`.
    taking: AtomicU64,
    /// Each partition's lease as `place_fresh` last read it, and when: reused for
    /// [`FRESH_REUSE`], so that a burst of requests for an unowned partition reads it once.
    fresh: Mutex<BTreeMap<u32, (std::time::Instant, Option<Lease>)>>,
}

/// [`Shared::taking`] when no take-over is in progress.
const NONE: u64 = u64::MAX;

/// A cluster node. Share it through an `Arc`; [`Node::shutdown`] (or the drop) stops it.
pub struct Node {
    shared: Arc<Shared>,
    running: Mutex<Option<Running>>,
}

/// What [`Node::shutdown`] stops: the threads, the tasks (heartbeat, lease watch), and the
/// NATS runtime last.
struct Running {
    threads: Vec<std::thread::JoinHandle<()>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    runtime: tokio::runtime::Runtime,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn read<T>(m: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    m.read().unwrap_or_else(|e| e.into_inner())
}

fn write<T>(m: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    m.write().unwrap_or_else(|e| e.into_inner())
}

impl NodeConfig {
    /// Why these settings cannot work, if they cannot.
    fn problem(&self) -> Option<String> {
        if self.node_id.is_empty() {
            return Some("node_id is empty".into());
        }
        if self.partitions == 0 {
            return Some("partitions must be at least 1".into());
        }
        if !(1..=5).contains(&self.replicas) {
            return Some(format!("replicas must be 1 to 5, not {}", self.replicas));
        }
        if self.lease < Duration::from_millis(300) {
            return Some(format!("lease must be at least 300ms, not {:?}", self.lease));
        }
        None
    }
}

/// Connects to `nats_url` (one or several URLs separated by commas).
pub(crate) async fn connect(nats_url: &str) -> Result<Context, ClusterError> {
    let mut addrs = Vec::new();
    for url in nats_url.split(',').map(str::trim).filter(|u| !u.is_empty()) {
        let addr: async_nats::ServerAddr =
            url.parse().map_err(|e| ClusterError::Settings(format!("nats_url {url:?}: {e}")))?;
        addrs.push(addr);
    }
    if addrs.is_empty() {
        return Err(ClusterError::Settings("nats_url is empty".into()));
    }
    let client = async_nats::ConnectOptions::new()
        .connection_timeout(Duration::from_secs(5))
        .connect(addrs)
        .await
        .map_err(|e| nats("connecting")(&e))?;
    Ok(async_nats::jetstream::new(client))
}

/// How many times a partition count another node stored is read again, 100 ms apart.
const META_READ_TRIES: usize = 50;

/// Checks the cluster's partition count in [`META_BUCKET`], storing `partitions` when the
/// cluster has none yet; another count is refused, naming both.
pub(crate) async fn check_partitions(
    js: &Context,
    partitions: u32,
    replicas: usize,
) -> Result<(), ClusterError> {
    let bucket = open_bucket(js, META_BUCKET, replicas, Duration::ZERO).await?;
    let read = || async {
        let value = bucket.get(PARTITIONS_KEY).await.map_err(|e| nats("reading the partition count")(&e))?;
        value
            .map(|v| {
                std::str::from_utf8(&v).ok().and_then(|t| t.trim().parse::<u32>().ok()).ok_or_else(|| {
                    ClusterError::Settings(format!("{META_BUCKET} holds an unreadable partition count"))
                })
            })
            .transpose()
    };
    let same = |stored: u32| match stored == partitions {
        true => Ok(()),
        false => Err(ClusterError::Settings(format!(
            "the cluster has {stored} partitions (bucket {META_BUCKET}); this node is configured with \
             {partitions}: set partitions = {stored}"
        ))),
    };
    if let Some(stored) = read().await? {
        return same(stored);
    }
    match bucket.create(PARTITIONS_KEY, partitions.to_string().into()).await {
        Ok(_) => return Ok(()),
        Err(e) if e.kind() == async_nats::jetstream::kv::CreateErrorKind::AlreadyExists => {}
        Err(e) => return Err(nats("storing the partition count")(&e)),
    }
    // Another node stored it first. A read is a direct get, which a replica still catching up
    // may answer with nothing for a moment (nodes of a new cluster starting together saw it).
    for _ in 0..META_READ_TRIES {
        if let Some(stored) = read().await? {
            return same(stored);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err(ClusterError::Nats(format!("{META_BUCKET}: the partition count another node stored is not readable")))
}

impl Node {
    /// Connects, checks (or stores) the cluster's partition count in `herald-meta` (another
    /// count is refused, naming both), opens the lease and node buckets, and starts the
    /// heartbeat, the membership loop and the control partition's follower. Returns once
    /// connected, not necessarily owning anything yet. Blocking: call it from outside any
    /// tokio runtime (or through `spawn_blocking`); the node runs its own NATS runtime.
    pub fn start(config: NodeConfig) -> Result<Node, ClusterError> {
        outside_runtime(|| Node::start_here(config))
    }

    fn start_here(config: NodeConfig) -> Result<Node, ClusterError> {
        if let Some(problem) = config.problem() {
            return Err(ClusterError::Settings(problem));
        }
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("herald-nats")
            .enable_all()
            .build()
            .map_err(|e| ClusterError::Settings(format!("starting the NATS runtime: {e}")))?;
        let skew_margin = (config.lease / 5).max(Duration::from_millis(100));
        let settings = LeaseSettings { lease: config.lease, skew_margin };
        let (js, leases, nodes) = runtime.block_on(async {
            let js = connect(&config.nats_url).await?;
            check_partitions(&js, config.partitions, config.replicas).await?;
            let leases = Leases::open(&js, config.replicas, &config.node_id, &config.advertise, settings)
                .await?
                .with_control(config.partitions);
            let nodes = Nodes::open(&js, config.replicas, heartbeat_ttl(config.lease)).await?;
            Ok::<_, ClusterError>((js, leases, nodes))
        })?;
        // The first beat before the first look at the cluster, which counts this node live.
        runtime
            .block_on(nodes.beat(&config.node_id, &config.advertise, unix_ms()))
            .map_err(|e| ClusterError::Nats(format!("the first heartbeat: {e}")))?;
        let control_store =
            open_store(&config.data_dir, config.engine.cache_bytes, config.partitions, config.partitions)
                .map_err(|e| ClusterError::Log(herald_log::LogError::Store(herald_log::StoreError::Io(e))))?;
        let timing = control::Timing {
            ttl: heartbeat_ttl(config.lease),
            margin: skew_margin,
            settle: settle_within(config.lease),
        };
        let shared = Arc::new(Shared {
            node_id: config.node_id.clone(),
            advertise: config.advertise.clone(),
            partitions: config.partitions,
            lease: config.lease,
            skew_margin,
            data_dir: config.data_dir.clone(),
            engine: config.engine.clone(),
            stream_settings: StreamSettings { replicas: config.replicas, ..StreamSettings::default() },
            runtime: runtime.handle().clone(),
            js,
            leases: Arc::new(leases),
            nodes,
            streams: Mutex::new(BTreeMap::new()),
            stores: Mutex::new(BTreeMap::from([(config.partitions, control_store.clone())])),
            served: RwLock::new(BTreeMap::new()),
            seen: RwLock::new(Seen::default()),
            control: control::ControlReplica::new(control_store, timing),
            changes: tokio::sync::watch::channel(0).0,
            wake: Wakeup::default(),
            stopping: AtomicBool::new(false),
            stalled: AtomicBool::new(false),
            taking: AtomicU64::new(NONE),
            fresh: Mutex::new(BTreeMap::new()),
        });
        let tasks = vec![
            runtime.spawn(membership::heartbeat(shared.clone(), config.advertise.clone())),
            runtime.spawn(membership::watch_leases(shared.clone())),
            runtime.spawn(control::watch_control(shared.clone())),
        ];
        let threads = vec![
            spawn_thread("herald-membership", shared.clone(), membership::run),
            spawn_thread("herald-control", shared.clone(), control::follow),
        ];
        Ok(Node { shared, running: Mutex::new(Some(Running { threads, tasks, runtime })) })
    }

    pub fn node_id(&self) -> &str {
        &self.shared.node_id
    }

    pub fn partitions(&self) -> u32 {
        self.shared.partitions
    }

    /// The control partition's number in this API: [`Node::partitions`].
    pub fn control(&self) -> u32 {
        self.shared.partitions
    }

    pub fn partition_of(&self, org: &OrgId) -> u32 {
        crate::partition::partition_of(org, self.shared.partitions)
    }

    /// Where `partition` is served: `Local` only while this node holds its lease (renewed,
    /// not lost) and its engine is not fenced; else the holder of the lease as last read
    /// (at most a third of the lease old), or `Unowned`. No NATS round trip.
    pub fn place(&self, partition: u32) -> Place {
        self.shared.place(partition)
    }

    /// The epoch of the API keys: it changes whenever the keys may have changed (the owner's
    /// engine wrote a key, this node's control replica advanced, or the control partition
    /// changed hands here). A key cache drops what it holds when it moves.
    pub fn api_key_epoch(&self) -> u64 {
        self.shared.api_key_epoch()
    }

    /// An API key by the blake3 hash of its secret, from the control partition: the owner's
    /// engine here, else this node's replica of it (an error until that has caught up once).
    pub fn api_key_by_hash(&self, hash: &[u8; 32]) -> Result<Option<ApiKey>, String> {
        self.shared.api_key_by_hash(hash)
    }

    /// Catches the control replica up now (used on a key miss before answering 401). Nothing
    /// to do when this node owns the control partition.
    pub fn refresh_control(&self) -> Result<(), String> {
        self.shared.refresh_control()
    }

    /// Ok when this node may authenticate from the API keys it has: it owns the control
    /// partition, or its replica is trusted: in the live set without a break and caught up
    /// since (the rule is in `node/control.rs`). Memory only; Err says why not (then
    /// [`Node::refresh_control`] brings it back, NATS permitting).
    pub fn keys_current(&self) -> Result<(), String> {
        self.shared.keys_current()
    }

    /// On the control partition's owner, after a key was created or revoked here: returns once
    /// every other live node reports (in its heartbeat) that its replica applied the control
    /// partition up to this node's position, or after [`settle_within`] (a node that has not
    /// by then answers from its replica no more). On a follower it waits for the others to
    /// reach its own replica's position. Blocking.
    pub fn settle_control(&self) -> Result<(), String> {
        self.shared.settle_control()
    }

    /// [`Node::place`], but where that finds no live owner, the partition's lease read again
    /// from NATS now (within [`FRESH_READ_WITHIN`]): a partition that just moved is routed to
    /// its new owner without waiting for the membership loop's next look. Blocking; for the
    /// rare request that would otherwise be answered 503.
    pub fn place_fresh(&self, partition: u32) -> Place {
        self.shared.place_fresh(partition)
    }

    /// Ok when this node serves its part: it has read the cluster (within the last lease), no
    /// take-over of its is in progress, every partition it holds is served (lease renewed, not
    /// fenced), its control replica has caught up once (unless it owns the control partition),
    /// and it holds its share `ceil((partitions + 1) / live nodes)`, or less with nothing left
    /// for it to take (every lease live, no node over its share): true in any steady cluster,
    /// false while a take-over by this node is due. Err names what is missing ("owns 1 of its
    /// share 3; partition 2 has no owner yet", "taking partition 4 over (catching up)", ...).
    pub fn readiness(&self) -> Result<(), String> {
        self.shared.readiness()
    }

    /// Bumped on every change of what this node serves (take-over, hand-back, step-down).
    pub fn changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.shared.changes.subscribe()
    }

    /// Hands every partition back (each engine shut down, its write-ahead stopped, then its
    /// lease released), leaves the live nodes, and stops the NATS runtime last. Waits up to
    /// `within` for the engines' stops; past it their write-aheads are cut short.
    pub fn shutdown(self, within: Duration) {
        self.stop(within);
    }

    /// Test hook: makes this node behave as a stalled process (SIGSTOP) would for the cluster:
    /// no lease renewals, no heartbeats, no membership turns. Its engines stay open, so a
    /// write through one after another node took the partition over is fenced.
    #[doc(hidden)]
    pub fn stall_for_tests(&self) {
        self.shared.stalled.store(true, Ordering::SeqCst);
        for served in read(&self.shared.served).values() {
            served.renewal.task.abort();
        }
    }

    /// Test hook: ends [`Node::stall_for_tests`], as a stalled process resumed (SIGCONT): the
    /// node steps down from what it no longer holds, beats again, and claims its share anew.
    #[doc(hidden)]
    pub fn resume_for_tests(&self) {
        self.shared.stalled.store(false, Ordering::SeqCst);
        self.shared.wake();
    }

    /// Test hook: stops as a crashed process would leave the cluster: engines closed (their
    /// stores let go) but no lease released and no leave: its leases and heartbeat age out.
    #[doc(hidden)]
    pub fn crash_for_tests(self) {
        let Some(running) = lock(&self.running).take() else { return };
        outside_runtime(|| self.stop_running(running, Duration::from_secs(5), false));
    }

    fn stop(&self, within: Duration) {
        let Some(running) = lock(&self.running).take() else { return };
        outside_runtime(|| self.stop_running(running, within, true));
    }

    fn stop_running(&self, running: Running, within: Duration, hand_back: bool) {
        self.shared.stopping.store(true, Ordering::SeqCst);
        self.shared.wake();
        for thread in running.threads {
            let _ = thread.join();
        }
        for task in &running.tasks {
            task.abort();
        }
        // Out of the live nodes first: the others' share then covers what it hands back, and
        // each release wakes them (their lease watch) to take it over at once.
        self.shared.control.left();
        let shared = self.shared.clone();
        let left = running.runtime.block_on(async move {
            if !hand_back {
                return Ok(Ok(()));
            }
            tokio::time::timeout(Duration::from_secs(2), shared.nodes.leave(&shared.node_id)).await
        });
        if !matches!(left, Ok(Ok(()))) {
            tracing::warn!(node = %self.shared.node_id, "could not leave the live nodes; its heartbeat ages out");
        }
        let all: Vec<u32> = read(&self.shared.served).keys().copied().collect();
        membership::stop_serving(&self.shared, &all, hand_back, within);
        running.runtime.shutdown_timeout(Duration::from_secs(1));
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.stop(Duration::from_secs(5));
    }
}

/// Runs `f` here, or on a thread of its own when called from inside a tokio runtime: the node
/// blocks on its own runtime, which a runtime's thread must not do.
fn outside_runtime<T: Send>(f: impl FnOnce() -> T + Send) -> T {
    if tokio::runtime::Handle::try_current().is_err() {
        return f();
    }
    std::thread::scope(|scope| match scope.spawn(f).join() {
        Ok(out) => out,
        Err(panic) => std::panic::resume_unwind(panic),
    })
}

/// The node is shared by the server's handlers.
const _: fn() = || {
    fn shareable<T: Send + Sync>() {}
    shareable::<Node>();
};

fn spawn_thread(name: &str, shared: Arc<Shared>, run: fn(Arc<Shared>)) -> std::thread::JoinHandle<()> {
    std::thread::Builder::new().name(name.into()).spawn(move || run(shared)).expect("spawning a node thread")
}

/// Opens partition `partition`'s sled store (`<data_dir>/cluster/p<N>` or `cluster/control`)
/// with its share of the page cache.
fn open_store(
    data_dir: &Path,
    cache_bytes: u64,
    partitions: u32,
    partition: u32,
) -> Result<Arc<dyn Store>, String> {
    let dir = PartitionId::of(partition, partitions).dir(data_dir);
    let cache = share_of(cache_bytes, partitions, 1 << 20);
    let store = SledStore::open(&dir, cache).map_err(|e| format!("{}: {e}", dir.display()))?;
    Ok(Arc::new(store))
}

/// A sleep another thread can cut short (the membership loop, the control follower).
#[derive(Default)]
pub(crate) struct Wakeup {
    woken: Mutex<bool>,
    condvar: Condvar,
}

impl Wakeup {
    /// Ends the sleep in progress at once, or the next one.
    pub(crate) fn wake(&self) {
        *lock(&self.woken) = true;
        self.condvar.notify_all();
    }

    /// Sleeps up to `every`, or until woken.
    pub(crate) fn sleep(&self, every: Duration) {
        let guard = lock(&self.woken);
        let (mut woken, _) =
            self.condvar.wait_timeout_while(guard, every, |w| !*w).unwrap_or_else(|e| e.into_inner());
        *woken = false;
    }
}

/// `total` split over every partition (data and control), at least `floor`.
fn share_of(total: u64, partitions: u32, floor: u64) -> u64 {
    (total / (u64::from(partitions) + 1)).max(floor)
}

/// How long a node counts as live after its last heartbeat (it beats every third of the lease):
/// one lease. A node that died must stop counting by the time its leases pass (plus the skew
/// margin), so that the survivors' fair share covers every partition then; with a longer TTL
/// (3 leases) its partitions beyond the survivors' share waited for the TTL, not the lease.
/// A node that misses beats for a while only makes the others' share larger meanwhile: they
/// claim what is free, never a live lease.
pub fn heartbeat_ttl(lease: Duration) -> Duration {
    lease
}

/// How long the control partition's owner waits for the live nodes after a key change: two
/// leases (a node that stops reporting drops out of the live set within one).
pub fn settle_within(lease: Duration) -> Duration {
    lease * 2
}

/// How long [`Node::place_fresh`] waits for NATS.
pub const FRESH_READ_WITHIN: Duration = Duration::from_millis(500);
/// How long a lease [`Node::place_fresh`] read serves its next callers for the same partition.
pub const FRESH_REUSE: Duration = Duration::from_millis(50);

impl Shared {
    fn wake(&self) {
        self.wake.wake();
    }

    /// Sleeps up to `every`, or until woken.
    fn sleep(&self, every: Duration) {
        self.wake.sleep(every);
    }

    fn stopping(&self) -> bool {
        self.stopping.load(Ordering::SeqCst)
    }

    fn bump_changes(&self) {
        self.changes.send_modify(|n| *n += 1);
    }

    /// A partition's name in messages: its number, or `control`.
    fn label(&self, partition: u32) -> String {
        PartitionId::of(partition, self.partitions).arg()
    }

    fn place(&self, partition: u32) -> Place {
        if partition > self.partitions {
            return Place::Unowned;
        }
        let now = unix_ms();
        if let Some(served) = read(&self.served).get(&partition) {
            if served.refusal(now).is_none() {
                return Place::Local(served.engine.clone());
            }
            // Not served from here on; the membership loop closes it now. The new owner, if
            // the last look at the leases knows it, is where it is served.
            self.wake();
        }
        let seen = read(&self.seen);
        match seen.leases.get(partition as usize) {
            Some(Some(lease))
                if lease.node_id != self.node_id
                    && now <= lease.lease_until_ms.saturating_add(self.skew_margin.as_millis() as u64) =>
            {
                Place::Remote { node_id: lease.node_id.clone(), advertise: lease.advertise.clone() }
            }
            _ => Place::Unowned,
        }
    }

    fn place_fresh(&self, partition: u32) -> Place {
        let known = self.place(partition);
        if !matches!(known, Place::Unowned) || partition > self.partitions {
            return known;
        }
        let margin = self.skew_margin.as_millis() as u64;
        match self.lease_fresh(partition) {
            Some(lease) if lease.node_id == self.node_id => self.place(partition),
            Some(lease) if unix_ms() <= lease.lease_until_ms.saturating_add(margin) => {
                Place::Remote { node_id: lease.node_id, advertise: lease.advertise }
            }
            _ => Place::Unowned,
        }
    }

    /// `partition`'s lease read from NATS (or by a caller less than [`FRESH_REUSE`] ago);
    /// `None` when it has none or NATS did not answer within [`FRESH_READ_WITHIN`].
    fn lease_fresh(&self, partition: u32) -> Option<Lease> {
        if let Some((at, lease)) = lock(&self.fresh).get(&partition) {
            if at.elapsed() < FRESH_REUSE {
                return lease.clone();
            }
        }
        let leases = self.leases.clone();
        let read = outside_runtime(|| {
            self.runtime.block_on(async move {
                tokio::time::timeout(FRESH_READ_WITHIN, leases.current(partition)).await
            })
        });
        let lease = match read {
            Ok(Ok(current)) => current.map(|(lease, _)| lease),
            _ => None,
        };
        lock(&self.fresh).insert(partition, (std::time::Instant::now(), lease.clone()));
        lease
    }

    /// The engine configuration of `partition`: the template with its own data directory and
    /// its share of the caches and dispatcher threads.
    fn engine_config(&self, partition: u32) -> EngineConfig {
        let mut config = self.engine.clone();
        config.data_dir = PartitionId::of(partition, self.partitions).dir(&self.data_dir);
        config.cache_bytes = share_of(self.engine.cache_bytes, self.partitions, 1 << 20);
        let read_cache = share_of(self.engine.read_cache_bytes as u64, self.partitions, 256 << 10);
        config.read_cache_bytes = usize::try_from(read_cache).unwrap_or(usize::MAX);
        let threads = share_of(self.engine.delivery.worker_threads as u64, self.partitions, 1);
        config.delivery.worker_threads = usize::try_from(threads).unwrap_or(1);
        config
    }

    /// Partition `partition`'s store, opened once and kept for the node's life (an engine and
    /// the follower take turns on it; it is never opened twice).
    fn store(&self, partition: u32) -> Result<Arc<dyn Store>, String> {
        let mut stores = lock(&self.stores);
        if let Some(store) = stores.get(&partition) {
            return Ok(store.clone());
        }
        let store = open_store(&self.data_dir, self.engine.cache_bytes, self.partitions, partition)?;
        stores.insert(partition, store.clone());
        Ok(store)
    }

    /// Partition `partition`'s stream, opened (made when missing) once. Gives up after the
    /// stream's `ack_wait` without an answer (a stream whose leader was lost answers
    /// nothing until the next is elected; the take-over waiting for it is tried again).
    fn stream(&self, partition: u32) -> Result<PartitionStream, String> {
        if let Some(stream) = lock(&self.streams).get(&partition) {
            return Ok(stream.clone());
        }
        let js = self.js.clone();
        let settings = self.stream_settings;
        let control = partition == self.partitions;
        let within = settings.ack_wait;
        let open = async move {
            if control {
                PartitionStream::open_control(js, partition, settings).await
            } else {
                PartitionStream::open(js, partition, settings).await
            }
        };
        let stream = self
            .runtime
            .block_on(async move { tokio::time::timeout(within, open).await })
            .map_err(|_| format!("no answer from NATS opening the stream within {within:?}"))?
            .map_err(|e| e.to_string())?;
        lock(&self.streams).insert(partition, stream.clone());
        Ok(stream)
    }

    /// Whether this node serves its part (see `readiness.rs`'s rule in [`Shared::readiness`]).
    fn readiness(&self) -> Result<(), String> {
        let seen = read(&self.seen).clone();
        if !seen.read {
            return Err(match seen.error {
                Some(e) => format!("has not read the cluster's leases yet: {e}"),
                None => "has not read the cluster's leases yet".into(),
            });
        }
        let now = unix_ms();
        if let Some(e) = seen.error.as_ref().filter(|_| now > seen.at_ms + self.lease.as_millis() as u64) {
            return Err(format!("cannot read the cluster's leases: {e}"));
        }
        let taking = self.taking.load(Ordering::SeqCst);
        if taking != NONE {
            let partition = u32::try_from(taking).unwrap_or(u32::MAX);
            return Err(format!("taking partition {} over (catching up)", self.label(partition)));
        }
        let served = read(&self.served);
        for (&partition, s) in served.iter() {
            if let Some(why) = s.refusal(now) {
                return Err(format!("stepping down from partition {}: {why}", self.label(partition)));
            }
        }
        let control_here = served.contains_key(&self.partitions);
        drop(served);
        if !control_here && !self.control.caught_up() {
            return Err("its replica of the control partition (the API keys) has not caught up yet".into());
        }
        membership::share_reached(self, &seen, now)
    }

    /// Releases `held` (a hand-back), waiting up to a lease for NATS; a lease not released
    /// passes by itself. A renewal that was in flight when it was stopped changed the lease's
    /// revision: the lease, still this node's at the same epoch, is released at the new one.
    fn release(&self, held: &Held) {
        let leases = self.leases.clone();
        let held = held.clone();
        let released = self.runtime.block_on(async move {
            tokio::time::timeout(self.lease, async {
                match leases.release(&held).await {
                    Err(LeaseError::Lost(Some(now)))
                        if now.node_id == held.lease.node_id && now.epoch == held.lease.epoch =>
                    {
                        let current = leases.current(held.partition).await?;
                        let Some((lease, revision)) = current else { return Ok(()) };
                        leases.release(&Held { partition: held.partition, lease, revision }).await
                    }
                    other => other,
                }
            })
            .await
        });
        if !matches!(released, Ok(Ok(()))) {
            tracing::warn!(node = %self.node_id, "a lease was not released; it passes by itself");
        }
    }
}
