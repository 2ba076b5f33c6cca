//! The simulation: thousands of deliveries to simulated receivers that fail, time out and recover,
//! through crashes, graceful restarts and clock jumps of hours, all drawn from one seed that
//! replays exactly.
//!
//! The test owns everything the engine does not decide: the ids, the clock, and what every
//! receiver answers (a [`Sender`] whose answer depends only on the receiver's mode, set by the
//! test, and the request's headers). A model of API.md's delivery rules, written here and sharing
//! no code with the engine, follows every request the receivers saw; after every step the
//! projection must agree with it:
//!
//! 1. every acknowledged publish has its event, with exactly one delivery per endpoint of the
//!    organisation that was subscribed at publish time;
//! 2. every delivery's status, attempt count, place in its schedule, manual retry count and next
//!    attempt time agree with the model; its attempts are numbered 1..n and each one a receiver saw
//!    is recorded, except one cut off by a crash (which is made again, with the same number and
//!    `webhook-id`); an automatic retry waits at least its schedule's delay (and the receiver's
//!    `Retry-After`), and its jittered due time stays within the documented bound;
//! 3. no automatic attempt reaches an endpoint while it is inactive under the window rule, and
//!    endpoints turn inactive exactly when the rule says; none while a receiver's 429 or 503 with
//!    `Retry-After` pauses it (at most the schedule's longest step; a restart forgets the pause);
//! 4. at the end, with every receiver up and every failure retriggered, everything is delivered.
//!
//! `max_in_flight_total: 1` (with `max_awaiting_record: 0`) makes the order of attempts deterministic: the dispatcher takes due
//! deliveries one at a time in (due time, id) order, which the model checks as well.
//!
//! A failure names its seed and step. `HERALD_SIM_SEED=<seed>` runs one more seed (decimal or
//! `0x` hex), `HERALD_SIM_STEPS=<n>` changes the number of steps of each seed, and
//! `HERALD_SIM_DUE_QUEUE_CAPACITY=<n>` shrinks the dispatcher's in-memory due queue (default
//! 100,000, which these runs never fill) so that its refills from the stored due index are exercised.

use std::collections::{BTreeSet, HashMap};
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use herald_engine::clock::{Clock, ManualClock};
use herald_engine::sender::{AttemptRequest, FailureKind, SendFuture, SendOutcome, Sender};
use herald_engine::signing::Secret;
use herald_engine::INTERRUPTED_ERROR;
use herald_engine::{
    Actor, Command, CommandError, CommandLimits, DeliveryConfig, DeliverySettingsPatch, Engine, EngineConfig,
    EngineError, Parts, Reply,
};
use herald_log::{Durability, MemStore, Pair, Store, StoreError, Visit, WriteBatch};
use herald_projector::{
    due_deliveries, get_delivery, get_endpoint, get_event, list_deliveries, Delivery, DeliveryId,
    DeliveryIndex, DeliveryOrder, DeliveryQuery, DeliveryStatus, Due, EndpointId, EndpointStatus, EventId,
    OrgId, Policy, Trigger, PAGE_LEN_MAX,
};
use uuid::Uuid;

const SECOND_MS: u64 = 1_000;
const MINUTE_MS: u64 = 60 * SECOND_MS;
const HOUR_MS: u64 = 60 * MINUTE_MS;
/// 2027-01-15, plus up to an hour drawn from the seed.
const T0_MS: u64 = 1_800_000_000_000;

/// The automatic schedule after the first attempt: short, so deliveries run through it often.
const SCHEDULE_MS: [u64; 4] = [SECOND_MS, 5 * SECOND_MS, MINUTE_MS, HOUR_MS];
/// The jitter the engine documents: up to this many thousandths of the base delay are added.
const JITTER_PERMILLE: u64 = 100;
const FAILURES_MAX: usize = 5;
/// Shorter than the default day: a lone delivery's five failures span more than it (the schedule's
/// last step is an hour) while bursts of failures fall within it, and clock moves land on both sides.
const FAILURE_WINDOW_MS: u64 = 5 * MINUTE_MS;
/// The longest `Retry-After` a receiver sends.
const RETRY_AFTER_MAX_MS: u64 = 2 * HOUR_MS;

const ORGS: usize = 3;
const ENDPOINTS_START: usize = 6;
const ENDPOINTS_MAX: usize = 12;
const EVENT_TYPES: [&str; 3] = ["call.ended", "call.started", "sms.received"];
const PUBLISHES_PER_STEP_MAX: u64 = 8;
const BATCH_RETRIGGER_MAX: usize = 25;

/// Steps of each fixed seed, and of each run of the replay test.
const STEPS: usize = 450;
const REPLAY_STEPS: usize = 200;
/// Each must exercise every rule `fixed_seed` lists. Delivery ids (and so the jitter drawn from
/// them) changed when ids made in one millisecond took a sequence number, and 1 and 0x5eed_cafe
/// then missed a stop that interrupts an attempt and an exhausted delivery: 2 and 3 covered all.
/// The crash between a publish's apply and its flush changed every seed's steps: 2 then missed
/// a failure run on the window's edge and 3 an interrupted attempt; of 4-11, 5 and 9 cover all.
/// Ordered endpoints and Retry-After pauses changed them again: 0xdead_beef_f00d_0042 then missed
/// an attempt cut off by a crash; of 10-17, 11, 12, 16 and 17 cover all.
const SEEDS: [u64; 3] = [5, 9, 11];
/// The delivery lists are checked against the model every this many steps (and at the end).
const INDEX_CHECK_EVERY: usize = 25;

const SETTLE: Duration = Duration::from_secs(10);
/// How long one look for a hung attempt waits before looking again.
const HANG_POLL: Duration = Duration::from_millis(5);
/// How long a graceful stop waits for a hung attempt before recording it as interrupted.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_millis(1_000);

/// The call id and the ordering key of the `n`th event (drawn from nothing, so the seeds' draws
/// stay as they were): three ordering keys, two call ids as keys, and one in eight with none.
fn event_keys(n: usize) -> (Option<Uuid>, Option<String>) {
    match n % 8 {
        7 => (None, None),
        3 => (Some(Uuid::from_u128(1 + n as u128 % 2)), None),
        _ => (None, Some(format!("k{}", n % 3))),
    }
}

// ---------------------------------------------------------------------------------------------
// Seeded randomness, owned by the test.

/// SplitMix64: small, fast, and the same on every platform.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// In `[0, n)`; 0 when `n` is 0.
    fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next() % n
        }
    }

    /// In `[lo, hi]`.
    fn between(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi - lo + 1)
    }

    fn index(&mut self, len: usize) -> usize {
        self.below(len as u64) as usize
    }

    fn percent(&mut self, p: u64) -> bool {
        self.below(100) < p
    }

    fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.index(items.len())]
    }

    fn bytes<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0u8; N];
        for chunk in out.chunks_mut(8) {
            let word = self.next().to_le_bytes();
            chunk.copy_from_slice(&word[..chunk.len()]);
        }
        out
    }
}

/// A hash of the request, for flaky receivers: FNV-1a then the SplitMix64 finalizer.
fn request_hash(salt: u64, parts: &[&[u8]]) -> u64 {
    let mut hash = 0xcbf2_9ce4_8422_2325u64 ^ salt;
    for part in parts {
        for byte in part.iter().chain([0xffu8].iter()) {
            hash ^= u64::from(*byte);
            hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    Rng(hash).next()
}

// ---------------------------------------------------------------------------------------------
// The simulated receivers.

/// How a receiver behaves; set by the test, per receiver.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Mode {
    Up,
    /// Answers this non-2xx status (5xx, 4xx, or a redirect that is not followed).
    Status(u16),
    /// Answers `status` (429 or 503) with a `Retry-After`.
    RetryAfter {
        status: u16,
        after_ms: u64,
    },
    /// The connection is refused.
    Refused,
    /// No answer within the timeout (reported at once: nothing really waits).
    Timeout,
    /// Answers 500 to a share of the requests, chosen by a hash of the request, 200 to the rest.
    Flaky {
        salt: u64,
        fail_percent: u64,
    },
    /// The next request never gets an answer (the test then crashes or stops the engine); the
    /// receiver then behaves as `then`.
    Hang {
        then: Box<Mode>,
    },
}

/// What a receiver answered to one request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Answer {
    Status { status: u16, retry_after_ms: Option<u64> },
    Refused,
    Timeout,
    Hung,
}

/// One request a receiver saw.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Seen {
    at_ms: u64,
    url: String,
    webhook_id: String,
    delivery_id: String,
    attempt: u32,
    answer: Answer,
}

/// Every receiver: a [`Sender`] that answers from the receivers' modes and records each request.
struct Net {
    clock: ManualClock,
    state: Mutex<NetState>,
}

#[derive(Default)]
struct NetState {
    modes: HashMap<String, Mode>,
    seen: Vec<Seen>,
    hung: u64,
}

impl Net {
    fn lock(&self) -> MutexGuard<'_, NetState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn set_mode(&self, url: &str, mode: Mode) {
        self.lock().modes.insert(url.to_owned(), mode);
    }

    fn mode(&self, url: &str) -> Option<Mode> {
        self.lock().modes.get(url).cloned()
    }

    fn seen_since(&self, from: usize) -> Vec<Seen> {
        self.lock().seen[from..].to_vec()
    }

    fn seen_len(&self) -> usize {
        self.lock().seen.len()
    }

    fn hung(&self) -> u64 {
        self.lock().hung
    }
}

fn answer(mode: &Mode, webhook_id: &str, delivery_id: &str, attempt: u32) -> Answer {
    match mode {
        Mode::Up => Answer::Status { status: 200, retry_after_ms: None },
        Mode::Status(status) => Answer::Status { status: *status, retry_after_ms: None },
        Mode::RetryAfter { status, after_ms } => {
            Answer::Status { status: *status, retry_after_ms: Some(*after_ms) }
        }
        Mode::Refused => Answer::Refused,
        Mode::Timeout => Answer::Timeout,
        Mode::Flaky { salt, fail_percent } => {
            let roll =
                request_hash(*salt, &[webhook_id.as_bytes(), delivery_id.as_bytes(), &attempt.to_le_bytes()])
                    % 100;
            let status = if roll < *fail_percent { 500 } else { 200 };
            Answer::Status { status, retry_after_ms: None }
        }
        Mode::Hang { .. } => Answer::Hung,
    }
}

impl Sender for Net {
    fn send(&self, req: AttemptRequest) -> SendFuture<'_> {
        Box::pin(async move {
            let header = |name: &str| {
                req.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.clone()).unwrap_or_default()
            };
            let webhook_id = header("webhook-id");
            let delivery_id = header("herald-delivery-id");
            let attempt = header("herald-attempt").parse().unwrap_or(0);
            let got = {
                let mut st = self.lock();
                // An unknown url gets a 404; the model then reports the request as misrouted.
                let mode = st.modes.get(&req.url).cloned().unwrap_or(Mode::Status(404));
                let got = answer(&mode, &webhook_id, &delivery_id, attempt);
                if let Mode::Hang { then } = mode {
                    st.modes.insert(req.url.clone(), *then);
                    st.hung += 1;
                }
                let at_ms = self.clock.now_ms();
                st.seen.push(Seen {
                    at_ms,
                    url: req.url.clone(),
                    webhook_id,
                    delivery_id,
                    attempt,
                    answer: got,
                });
                got
            };
            match got {
                Answer::Status { status, retry_after_ms } => {
                    SendOutcome::Response { status, excerpt: b"sim".to_vec(), retry_after_ms }
                }
                Answer::Refused => {
                    SendOutcome::Failed { kind: FailureKind::Connect, error: "connection refused".into() }
                }
                Answer::Timeout => {
                    SendOutcome::Failed { kind: FailureKind::Timeout, error: "timed out".into() }
                }
                Answer::Hung => std::future::pending::<SendOutcome>().await,
            }
        })
    }
}

// ---------------------------------------------------------------------------------------------
// The model: API.md's rules, followed from what the receivers saw.

/// How a modelled attempt ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Outcome {
    Delivered(u16),
    Failed {
        status: Option<u16>,
        retry_after_ms: Option<u64>,
    },
    /// Cut short by a graceful stop: recorded, but not a failure (rules 3): no step of the
    /// schedule used, nothing counted against the endpoint, made again as soon as herald is back.
    Interrupted,
}

impl Outcome {
    fn of(answer: Answer) -> Outcome {
        match answer {
            Answer::Status { status, .. } if (200..300).contains(&status) => Outcome::Delivered(status),
            Answer::Status { status, retry_after_ms } => {
                Outcome::Failed { status: Some(status), retry_after_ms }
            }
            Answer::Refused | Answer::Timeout | Answer::Hung => {
                Outcome::Failed { status: None, retry_after_ms: None }
            }
        }
    }

    fn retry_after_ms(self) -> Option<u64> {
        match self {
            Outcome::Failed { retry_after_ms, .. } => retry_after_ms,
            _ => None,
        }
    }
}

#[derive(Clone, Debug)]
struct ModelAttempt {
    attempt: u32,
    trigger: Trigger,
    started_ms: u64,
    finished_ms: u64,
    outcome: Outcome,
    /// Attempts since the schedule last restarted, this one included.
    since_reset: u32,
}

struct ModelEndpoint {
    id: EndpointId,
    org: usize,
    url: String,
    events: Vec<String>,
    active: bool,
    /// The failures since the last success (or enable), at most `FAILURES_MAX`, oldest first.
    run_ms: Vec<u64>,
    /// Its pending deliveries.
    pending: BTreeSet<usize>,
    /// Until when its automatic attempts wait, paused by a `Retry-After` (0: not paused).
    paused_until_ms: u64,
    /// Its ordering is `per_key`: a delivery with a key waits while an earlier one with the same
    /// key is pending.
    per_key: bool,
}

impl ModelEndpoint {
    fn subscribes_to(&self, event_type: &str) -> bool {
        self.events.iter().any(|e| e == "*" || e == event_type)
    }
}

struct ModelDelivery {
    id: DeliveryId,
    event: usize,
    endpoint: usize,
    status: DeliveryStatus,
    /// When pending: the due time, once known.
    due_ms: Option<u64>,
    /// Pending after a failure whose jittered retry time is not read yet: the bounds it must lie in.
    due_range: Option<(u64, u64)>,
    trigger: Trigger,
    attempt_count: u32,
    since_reset: u32,
    manual: u32,
    delivered_once: bool,
    history: Vec<ModelAttempt>,
    /// Its event's ordering key (the `ordering_key` given, else the call id), if any.
    key: Option<String>,
}

struct ModelEvent {
    id: EventId,
    org: usize,
    payload: Vec<u8>,
    at_ms: u64,
    deliveries: Vec<DeliveryId>,
}

#[derive(Default, Debug)]
struct Stats {
    /// Times a due delivery was held back by an earlier pending one of its key (`per_key`).
    held_by_key: u64,
    events: u64,
    deliveries: u64,
    attempts: u64,
    failed_attempts: u64,
    crashes: u64,
    /// Crashes between a publish's apply and its flush.
    lost_batches: u64,
    graceful_stops: u64,
    cut_off: u64,
    interrupted: u64,
    hour_jumps: u64,
    /// Endpoints paused by a receiver's `Retry-After`.
    pauses: u64,
    endpoints_inactivated: u64,
    /// Failures that made a full run but spread over more than the window.
    spared_by_window: u64,
    /// Full runs spanning exactly the window (which counts as within it).
    runs_on_the_window_edge: u64,
    endpoints_enabled: u64,
    exhausted: u64,
    retriggers: u64,
    redelivers: u64,
    batches: u64,
    refused_commands: u64,
    jittered: u64,
}

/// Where a check failed: the seed replays it.
#[derive(Clone, Copy, Debug)]
struct At {
    seed: u64,
    step: usize,
}

#[track_caller]
fn fail(at: At, msg: String) -> ! {
    panic!(
        "simulation seed {} (0x{:x}) failed at step {}: {msg}\n  replay: HERALD_SIM_SEED={} cargo test \
         -p herald-engine --test simulation seed_from_environment",
        at.seed, at.seed, at.step, at.seed
    )
}

macro_rules! ensure {
    ($at:expr, $cond:expr, $($msg:tt)+) => {
        if !($cond) {
            fail($at, format!($($msg)+))
        }
    };
}

// ---------------------------------------------------------------------------------------------
// The disk: writes count only once flushed.

/// The simulated disk: a [`MemStore`] that keeps, for every write since the last flush, the value
/// it replaced, so a crash can take away what was applied but not flushed (as killing the process
/// between sled's apply and its flush does). Flushes can be held, to crash right there.
#[derive(Default)]
struct Disk {
    mem: MemStore,
    state: Mutex<DiskState>,
    wake: std::sync::Condvar,
}

#[derive(Default)]
struct DiskState {
    /// Each write since the last flush, with the value before it, in order.
    undo: Vec<(Vec<u8>, Option<Vec<u8>>)>,
    /// Flushes wait while set.
    hold: bool,
    /// A flush is waiting on `hold`.
    flush_waiting: bool,
    /// The process is dead: every write fails.
    dead: bool,
}

impl Disk {
    fn lock(&self) -> MutexGuard<'_, DiskState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn hold_flushes(&self) {
        self.lock().hold = true;
    }

    /// Waits until a flush is held; false after `within`.
    fn flush_held(&self, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        let mut state = self.lock();
        while !state.flush_waiting {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            state = self.wake.wait_timeout(state, left).unwrap_or_else(|e| e.into_inner()).0;
        }
        true
    }

    /// The crash: what was applied since the last flush is gone, writes fail from now on, and a
    /// held flush is let go (to fail).
    fn crash(&self) {
        let mut state = self.lock();
        let undo = std::mem::take(&mut state.undo);
        self.mem.with_map(|m| {
            for (key, before) in undo.into_iter().rev() {
                match before {
                    Some(v) => m.insert(key, v),
                    None => m.remove(&key),
                };
            }
        });
        state.dead = true;
        state.hold = false;
        self.wake.notify_all();
    }

    /// A new process on the same disk.
    fn revive(&self) {
        let mut state = self.lock();
        state.dead = false;
        state.undo.clear();
    }
}

fn crashed() -> StoreError {
    StoreError::Io("the process crashed".into())
}

impl Store for Disk {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        self.mem.get(key)
    }

    fn scan(&self, from: &[u8], to: &[u8], visit: Visit<'_>) -> Result<(), StoreError> {
        self.mem.scan(from, to, visit)
    }

    fn last(&self, from: &[u8], to: &[u8]) -> Result<Option<Pair>, StoreError> {
        self.mem.last(from, to)
    }

    fn apply(&self, batch: &WriteBatch) -> Result<(), StoreError> {
        let mut state = self.lock();
        if state.dead {
            return Err(crashed());
        }
        self.mem.with_map(|m| {
            for (k, v) in &batch.writes {
                let before = match v {
                    Some(v) => m.insert(k.clone(), v.clone()),
                    None => m.remove(k),
                };
                state.undo.push((k.clone(), before));
            }
        });
        Ok(())
    }

    fn flush(&self, _durability: Durability) -> Result<(), StoreError> {
        let mut state = self.lock();
        if state.hold {
            state.flush_waiting = true;
            self.wake.notify_all();
            while state.hold {
                state = self.wake.wait(state).unwrap_or_else(|e| e.into_inner());
            }
            state.flush_waiting = false;
        }
        if state.dead {
            return Err(crashed());
        }
        state.undo.clear();
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// The simulation.

struct Sim {
    at: At,
    rng: Rng,
    store: Arc<Disk>,
    clock: ManualClock,
    net: Arc<Net>,
    config: EngineConfig,
    engine: Option<Engine>,
    orgs: Vec<OrgId>,
    endpoints: Vec<ModelEndpoint>,
    endpoint_index: HashMap<EndpointId, usize>,
    events: Vec<ModelEvent>,
    deliveries: Vec<ModelDelivery>,
    delivery_index: HashMap<DeliveryId, usize>,
    /// Pending deliveries with a known due time, in the order the dispatcher takes them.
    queue: BTreeSet<(u64, DeliveryId)>,
    /// Failed deliveries whose retry time is to be read from the projection.
    unknown_due: Vec<usize>,
    /// Requests of the receivers' log already followed.
    followed: usize,
    /// A request that is hanging: the delivery and the request.
    hung: Option<(usize, Seen)>,
    /// Deliveries whose attempts changed since the last check.
    touched: BTreeSet<usize>,
    stats: Stats,
}

thread_local! {
    /// A due queue capacity for the seeds run on this thread (a test's own), over the default.
    static DUE_QUEUE_CAPACITY: std::cell::Cell<Option<usize>> = const { std::cell::Cell::new(None) };
}

fn config() -> EngineConfig {
    let capacity = DUE_QUEUE_CAPACITY.with(|c| c.get());
    EngineConfig {
        policy: Policy {
            retry_schedule_ms: SCHEDULE_MS.to_vec(),
            failures_max: FAILURES_MAX as u32,
            failure_window_ms: FAILURE_WINDOW_MS,
            ..Policy::default()
        },
        limits: CommandLimits { retrigger_max_per_window: 1_000_000, ..CommandLimits::default() },
        delivery: DeliveryConfig {
            max_in_flight_total: 1,
            // One attempt at a time, record included, so the order of attempts is the seed's.
            max_awaiting_record: 0,
            due_queue_capacity: capacity
                .or(env_u64("HERALD_SIM_DUE_QUEUE_CAPACITY").map(|n| n as usize))
                .unwrap_or(DeliveryConfig::default().due_queue_capacity),
            shutdown_timeout: SHUTDOWN_TIMEOUT,
            worker_threads: 1,
            ..DeliveryConfig::default()
        },
        ..EngineConfig::default()
    }
}

impl Sim {
    fn new(seed: u64) -> Sim {
        let mut rng = Rng(seed);
        let clock = ManualClock::new(T0_MS + rng.below(HOUR_MS));
        let net = Arc::new(Net { clock: clock.clone(), state: Mutex::new(NetState::default()) });
        let orgs = (0..ORGS).map(|_| OrgId(Uuid::from_u64_pair(rng.next(), rng.next()))).collect();
        let mut sim = Sim {
            at: At { seed, step: 0 },
            rng,
            store: Arc::new(Disk::default()),
            clock,
            net,
            config: config(),
            engine: None,
            orgs,
            endpoints: Vec::new(),
            endpoint_index: HashMap::new(),
            events: Vec::new(),
            deliveries: Vec::new(),
            delivery_index: HashMap::new(),
            queue: BTreeSet::new(),
            unknown_due: Vec::new(),
            followed: 0,
            hung: None,
            touched: BTreeSet::new(),
            stats: Stats::default(),
        };
        sim.open();
        for _ in 0..ENDPOINTS_START {
            sim.create_endpoint();
        }
        sim
    }

    fn engine(&self) -> &Engine {
        match &self.engine {
            Some(engine) => engine,
            None => fail(self.at, "no engine is open".into()),
        }
    }

    fn open(&mut self) {
        let parts = Parts {
            store: self.store.clone() as Arc<dyn Store>,
            clock: Arc::new(self.clock.clone()),
            sender: self.net.clone(),
        };
        match Engine::open_with(self.config.clone(), parts) {
            Ok(engine) => self.engine = Some(engine),
            Err(e) => fail(self.at, format!("the engine does not open: {e}")),
        }
    }

    fn now_ms(&self) -> u64 {
        self.clock.now_ms()
    }

    fn read_delivery(&self, id: DeliveryId) -> Delivery {
        match self.engine().delivery(id) {
            Ok(Some(d)) => d,
            other => fail(self.at, format!("delivery {id} cannot be read: {other:?}")),
        }
    }

    /// Waits until the dispatcher is idle, then follows what the receivers saw.
    fn settle(&mut self) {
        if !self.engine().settle(SETTLE) {
            fail(
                self.at,
                format!(
                    "the dispatcher did not settle within {SETTLE:?}: {:?}",
                    self.engine().dispatch_stats()
                ),
            );
        }
        self.follow();
    }

    /// Applies the requests the receivers saw since last time to the model, in order, then reads
    /// the retry times the engine drew and checks nothing due was left behind.
    fn follow(&mut self) {
        let new = self.net.seen_since(self.followed);
        self.followed += new.len();
        for seen in new {
            self.apply_seen(seen);
        }
        self.learn_dues();
        let now = self.now_ms();
        let held = self.queue.iter().take_while(|(due_ms, _)| *due_ms <= now);
        self.stats.held_by_key +=
            held.filter(|(_, id)| self.waits_behind(self.delivery_index[id]).is_some()).count() as u64;
        if self.hung.is_none() {
            if let Some((due_ms, id)) = self.first_ready(now) {
                let ready_ms = self.ready_ms(due_ms, id);
                ensure!(
                    self.at,
                    false,
                    "delivery {id} was due at {due_ms} (may go from {ready_ms}) and is still not attempted at \
                     {now} ({} ms late)",
                    now - ready_ms
                );
            }
        }
    }

    /// When a queued delivery may go: its due time, or for an automatic attempt the end of its
    /// endpoint's pause if that is later.
    fn ready_ms(&self, due_ms: u64, id: DeliveryId) -> u64 {
        let d = &self.deliveries[self.delivery_index[&id]];
        match d.trigger {
            Trigger::Auto => due_ms.max(self.endpoints[d.endpoint].paused_until_ms),
            Trigger::Manual => due_ms,
        }
    }

    /// The first queued delivery, in the order the dispatcher takes them, that may go at `now`:
    /// due, past its endpoint's pause, and held back by no earlier delivery of its key.
    fn first_ready(&self, now: u64) -> Option<(u64, DeliveryId)> {
        self.queue
            .iter()
            .take_while(|(due_ms, _)| *due_ms <= now)
            .find(|(due_ms, id)| {
                self.ready_ms(*due_ms, *id) <= now && self.waits_behind(self.delivery_index[id]).is_none()
            })
            .copied()
    }

    /// The earliest pending delivery created before delivery `i` with its key, to its endpoint,
    /// if that endpoint is `per_key` (the rule of API.md "Ordering key").
    fn waits_behind(&self, i: usize) -> Option<usize> {
        let d = &self.deliveries[i];
        let endpoint = &self.endpoints[d.endpoint];
        if !endpoint.per_key || d.key.is_none() {
            return None;
        }
        endpoint.pending.iter().copied().find(|&j| j < i && self.deliveries[j].key == d.key)
    }

    fn apply_seen(&mut self, seen: Seen) {
        let at = self.at;
        let Ok(uuid) = Uuid::parse_str(&seen.delivery_id) else {
            fail(at, format!("a request without a delivery id: {seen:?}"))
        };
        let id = DeliveryId(uuid);
        let Some(&i) = self.delivery_index.get(&id) else {
            fail(at, format!("a request for a delivery the model does not know: {seen:?}"))
        };
        let d = &self.deliveries[i];
        let endpoint = &self.endpoints[d.endpoint];
        ensure!(
            at,
            d.status == DeliveryStatus::Pending,
            "{id} was attempted while {}: {seen:?}",
            d.status.name()
        );
        if let Some((lo, hi)) = d.due_range {
            fail(at, format!("{id} was attempted at {} before its retry time [{lo}, {hi}]", seen.at_ms));
        }
        let Some(due_ms) = d.due_ms else {
            fail(at, format!("{id} is pending in the model without a due time"))
        };
        ensure!(
            at,
            seen.at_ms >= due_ms,
            "{id} was attempted at {} before it was due at {due_ms}",
            seen.at_ms
        );
        let ready_ms = self.ready_ms(due_ms, id);
        ensure!(
            at,
            seen.at_ms >= ready_ms,
            "{id} was attempted at {} while its endpoint was paused until {ready_ms}",
            seen.at_ms
        );
        if let Some(before) = self.waits_behind(i) {
            fail(
                at,
                format!(
                    "{id} was attempted at {} while {} of its key {:?}, created before it, was pending",
                    seen.at_ms, self.deliveries[before].id, d.key
                ),
            );
        }
        let first = self.first_ready(seen.at_ms);
        ensure!(
            at,
            first == Some((due_ms, id)),
            "{id} (due {due_ms}) was attempted out of (due time, id) order; first due is {first:?}"
        );
        ensure!(
            at,
            seen.attempt == d.attempt_count + 1,
            "{id}: the request carries herald-attempt {} after {} recorded attempts",
            seen.attempt,
            d.attempt_count
        );
        let event_id = self.events[d.event].id.to_string();
        ensure!(
            at,
            seen.webhook_id == event_id,
            "{id}: webhook-id {} is not its event {event_id}",
            seen.webhook_id
        );
        ensure!(at, seen.url == endpoint.url, "{id}: sent to {} instead of {}", seen.url, endpoint.url);
        if d.trigger == Trigger::Auto {
            ensure!(
                at,
                endpoint.active,
                "an automatic attempt of {id} (attempt {}) reached inactive endpoint {} at {}",
                seen.attempt,
                endpoint.id,
                seen.at_ms
            );
        }
        if seen.answer == Answer::Hung {
            ensure!(at, self.hung.is_none(), "two requests hang at once: {seen:?}");
            self.hung = Some((i, seen));
            return;
        }
        let outcome = Outcome::of(seen.answer);
        self.record(i, seen.at_ms, seen.at_ms, outcome);
    }

    /// One attempt of delivery `i` ended: the delivery rules of API.md.
    fn record(&mut self, i: usize, started_ms: u64, finished_ms: u64, outcome: Outcome) {
        self.stats.attempts += 1;
        self.touched.insert(i);
        let d = &mut self.deliveries[i];
        if let Some(due_ms) = d.due_ms.take() {
            self.queue.remove(&(due_ms, d.id));
        }
        d.attempt_count += 1;
        let interrupted = matches!(outcome, Outcome::Interrupted);
        // An interrupted attempt is made again as the one it was: same step, same trigger.
        let trigger = if interrupted {
            d.trigger
        } else {
            d.since_reset += 1;
            std::mem::replace(&mut d.trigger, Trigger::Auto)
        };
        d.history.push(ModelAttempt {
            attempt: d.attempt_count,
            trigger,
            started_ms,
            finished_ms,
            outcome,
            since_reset: d.since_reset,
        });
        let e = d.endpoint;
        if interrupted {
            // Still pending unless its endpoint went inactive while it was in flight.
            if d.status == DeliveryStatus::Pending {
                d.due_range = Some((finished_ms, finished_ms));
                self.unknown_due.push(i);
            }
            return;
        }
        if let Outcome::Delivered(_) = outcome {
            d.status = DeliveryStatus::Delivered;
            d.delivered_once = true;
            let endpoint = &mut self.endpoints[e];
            endpoint.pending.remove(&i);
            endpoint.active = true;
            endpoint.run_ms.clear();
            return;
        }
        self.stats.failed_attempts += 1;
        if let Outcome::Failed { status: Some(429 | 503), retry_after_ms: Some(after_ms) } = outcome {
            // The receiver asked for a pause, at most the schedule's longest step.
            let longest_ms = SCHEDULE_MS.iter().copied().max().unwrap_or(0);
            let until = &mut self.endpoints[e].paused_until_ms;
            *until = (*until).max(finished_ms + after_ms.min(longest_ms));
            if after_ms > 0 {
                self.stats.pauses += 1;
            }
        }
        // The window rule: FAILURES_MAX failures in a row, the last of them within the window.
        let endpoint = &mut self.endpoints[e];
        endpoint.run_ms.push(finished_ms);
        if endpoint.run_ms.len() > FAILURES_MAX {
            endpoint.run_ms.remove(0);
        }
        let run = &endpoint.run_ms;
        let full_run = endpoint.active && run.len() == FAILURES_MAX;
        let within_window = full_run && run[FAILURES_MAX - 1] - run[0] <= FAILURE_WINDOW_MS;
        if full_run && !within_window {
            self.stats.spared_by_window += 1;
        }
        if full_run && run[FAILURES_MAX - 1] - run[0] == FAILURE_WINDOW_MS {
            self.stats.runs_on_the_window_edge += 1;
        }
        if within_window {
            endpoint.active = false;
            self.stats.endpoints_inactivated += 1;
            for j in std::mem::take(&mut endpoint.pending) {
                let other = &mut self.deliveries[j];
                if let Some(due_ms) = other.due_ms.take() {
                    self.queue.remove(&(due_ms, other.id));
                }
                other.due_range = None;
                other.status = DeliveryStatus::Inactive;
                self.touched.insert(j);
            }
        }
        let endpoint = &mut self.endpoints[e];
        let d = &mut self.deliveries[i];
        if !endpoint.active {
            d.status = DeliveryStatus::Inactive;
            endpoint.pending.remove(&i);
        } else if let Some(&base_ms) = SCHEDULE_MS.get(d.since_reset as usize - 1) {
            let after_ms = outcome.retry_after_ms().unwrap_or(0);
            let lo = (finished_ms + base_ms).max(finished_ms + after_ms);
            let hi = (finished_ms + base_ms + base_ms * JITTER_PERMILLE / 1000).max(finished_ms + after_ms);
            d.status = DeliveryStatus::Pending;
            d.due_range = Some((lo, hi));
            endpoint.pending.insert(i);
            self.unknown_due.push(i);
        } else {
            d.status = DeliveryStatus::Exhausted;
            endpoint.pending.remove(&i);
            self.stats.exhausted += 1;
        }
    }

    /// Reads the retry times the engine drew for the deliveries that failed, checking the bounds.
    fn learn_dues(&mut self) {
        for i in std::mem::take(&mut self.unknown_due) {
            let d = &self.deliveries[i];
            let Some((lo, hi)) = d.due_range else { continue };
            let stored = self.read_delivery(d.id);
            let id = d.id;
            ensure!(
                self.at,
                stored.status == DeliveryStatus::Pending,
                "{id} should be pending with a retry in [{lo}, {hi}] but is {}",
                stored.status.name()
            );
            let Some(due_ms) = stored.next_attempt_at_ms else {
                fail(self.at, format!("{id} is pending without a next attempt time"))
            };
            ensure!(
                self.at,
                (lo..=hi).contains(&due_ms),
                "{id}: retry at {due_ms} is outside the schedule's bounds [{lo}, {hi}]"
            );
            if due_ms > lo {
                self.stats.jittered += 1;
            }
            let d = &mut self.deliveries[i];
            d.due_range = None;
            d.due_ms = Some(due_ms);
            self.queue.insert((due_ms, id));
        }
    }

    /// A retrigger or a redeliver was accepted: the schedule restarts, one attempt now.
    fn manual(&mut self, i: usize) {
        let now = self.now_ms();
        let d = &mut self.deliveries[i];
        d.status = DeliveryStatus::Pending;
        d.due_ms = Some(now);
        d.due_range = None;
        d.since_reset = 0;
        d.manual += 1;
        d.trigger = Trigger::Manual;
        self.queue.insert((now, d.id));
        self.endpoints[d.endpoint].pending.insert(i);
        self.touched.insert(i);
    }

    // -----------------------------------------------------------------------------------------
    // Steps.

    fn step(&mut self) {
        match self.rng.below(100) {
            0..=28 => {
                for _ in 0..self.rng.between(1, PUBLISHES_PER_STEP_MAX) {
                    self.publish();
                }
            }
            29..=41 => self.flip_modes(),
            42..=67 => {
                let ms = match self.rng.below(5) {
                    // Exactly the window, or just off it: a run of failures spanning it exactly.
                    4 => {
                        let off_ms = self.rng.below(3);
                        FAILURE_WINDOW_MS - 1 + off_ms
                    }
                    0 => self.rng.between(1, 999),
                    1 => self.rng.between(SECOND_MS, 6 * SECOND_MS),
                    2 => self.rng.between(6 * SECOND_MS, 2 * MINUTE_MS),
                    _ => self.rng.between(2 * MINUTE_MS, 70 * MINUTE_MS),
                };
                self.advance(ms);
            }
            68..=72 => {
                self.stats.hour_jumps += 1;
                let ms = self.rng.between(1, 30) * HOUR_MS + self.rng.below(HOUR_MS);
                self.advance(ms);
            }
            73..=75 => self.crash(),
            76 => self.crash_before_a_flush(),
            77..=78 => self.graceful_restart(),
            79..=83 => self.hang_then_stop(),
            84..=89 => self.retrigger_one(),
            90..=92 => self.redeliver_one(),
            93..=95 => self.batch_retrigger(),
            96..=97 => self.enable_endpoint(),
            98 => self.window_probe(),
            _ => {
                if self.endpoints.len() < ENDPOINTS_MAX {
                    self.create_endpoint();
                } else {
                    self.flip_modes();
                }
            }
        }
    }

    fn advance(&mut self, ms: u64) {
        self.clock.advance_ms(ms);
        self.settle();
    }

    fn random_mode(&mut self) -> Mode {
        match self.rng.below(100) {
            0..=39 => Mode::Up,
            40..=56 => Mode::Status(self.rng.pick(&[500, 502, 503, 504, 301, 400, 404, 410])),
            57..=64 => Mode::RetryAfter {
                status: self.rng.pick(&[429, 503]),
                after_ms: self.rng.pick(&[
                    0,
                    500,
                    2 * SECOND_MS,
                    30 * SECOND_MS,
                    10 * MINUTE_MS,
                    RETRY_AFTER_MAX_MS,
                ]),
            },
            65..=74 => Mode::Refused,
            75..=84 => Mode::Timeout,
            _ => Mode::Flaky { salt: self.rng.next(), fail_percent: self.rng.between(20, 80) },
        }
    }

    fn flip_modes(&mut self) {
        for _ in 0..self.rng.between(1, 3) {
            let e = self.rng.index(self.endpoints.len());
            let mode = self.random_mode();
            self.net.set_mode(&self.endpoints[e].url, mode);
        }
    }

    fn create_endpoint(&mut self) {
        let n = self.endpoints.len();
        let org = if n < ORGS { n } else { self.rng.index(ORGS) };
        let id = EndpointId(Uuid::from_u64_pair(self.rng.next(), self.rng.next()));
        let url = format!("https://receiver-{n}.sim.example/hooks");
        let events: Vec<String> = if self.rng.percent(50) {
            vec!["*".into()]
        } else {
            let mut events: Vec<String> =
                EVENT_TYPES.iter().filter(|_| self.rng.percent(50)).map(|t| t.to_string()).collect();
            if events.is_empty() {
                events.push(self.rng.pick(&EVENT_TYPES).to_string());
            }
            events
        };
        let secret = Secret::from_bytes(&self.rng.bytes::<32>()).expect("32 bytes make a secret").to_whsec();
        // Every third endpoint delivers in order per key (drawn from nothing: the seeds' draws
        // stay as they were).
        let per_key = n % 3 == 1;
        let settings = DeliverySettingsPatch {
            ordering: per_key.then_some(DeliveryOrder::PerKey),
            ..DeliverySettingsPatch::default()
        };
        let reply = self.engine().execute_blocking(
            Actor::admin(),
            Command::CreateEndpoint {
                id,
                org_id: self.orgs[org],
                url: url.clone(),
                name: format!("receiver {n}"),
                enabled_events: events.clone(),
                secret: Some(secret.clone()),
                settings,
            },
        );
        ensure!(
            self.at,
            matches!(&reply, Ok(Reply::Endpoint { id: got, secret: s }) if *got == id && *s == secret),
            "creating endpoint {n}: {reply:?}"
        );
        self.net.set_mode(&url, Mode::Up);
        self.endpoint_index.insert(id, n);
        self.endpoints.push(ModelEndpoint {
            id,
            org,
            url,
            events,
            active: true,
            run_ms: Vec::new(),
            pending: BTreeSet::new(),
            paused_until_ms: 0,
            per_key,
        });
    }

    /// Publishes one event; check 1 on its reply and its deliveries.
    fn publish(&mut self) {
        let org = self.rng.index(ORGS);
        let event_type = self.rng.pick(&EVENT_TYPES);
        self.publish_event(org, event_type);
    }

    fn publish_event(&mut self, org: usize, event_type: &'static str) {
        let now = self.now_ms();
        let id = EventId(uuid::Builder::from_unix_timestamp_millis(now, &self.rng.bytes::<10>()).into_uuid());
        let payload =
            format!(r#"{{"n":{},"type":"{event_type}","r":{}}}"#, self.events.len(), self.rng.next())
                .into_bytes();
        let (call_id, ordering_key) = event_keys(self.events.len());
        let key = ordering_key.clone().or(call_id.map(|c| c.hyphenated().to_string()));
        let reply = self.engine().execute_blocking(
            Actor::admin(),
            Command::Publish {
                id,
                org_id: self.orgs[org],
                event_type: event_type.to_owned(),
                payload: payload.clone(),
                call_id,
                webhook_url: None,
                idempotency_key: None,
                ordering_key,
            },
        );
        let delivery_ids = match reply {
            Ok(Reply::Published { id: got, created_at_ms, delivery_ids, replayed: false })
                if got == id && created_at_ms == now =>
            {
                delivery_ids
            }
            other => fail(self.at, format!("publishing {id}: {other:?}")),
        };
        // Its attempts may have started already: look once the dispatcher is idle.
        if !self.engine().settle(SETTLE) {
            fail(
                self.at,
                format!(
                    "the dispatcher did not settle after publishing {id}: {:?}",
                    self.engine().dispatch_stats()
                ),
            );
        }
        let expected: BTreeSet<usize> = (0..self.endpoints.len())
            .filter(|&e| self.endpoints[e].org == org && self.endpoints[e].subscribes_to(event_type))
            .collect();
        ensure!(
            self.at,
            delivery_ids.len() == expected.len(),
            "event {id} ({event_type}) got {} deliveries for {} subscribed endpoints",
            delivery_ids.len(),
            expected.len()
        );
        let event = self.events.len();
        let mut covered = BTreeSet::new();
        for &delivery_id in &delivery_ids {
            let stored = self.read_delivery(delivery_id);
            let e = stored.endpoint_id.and_then(|e| self.endpoint_index.get(&e).copied());
            let Some(e) = e.filter(|e| expected.contains(e)) else {
                fail(self.at, format!("{delivery_id} of {id} goes to an unsubscribed endpoint: {stored:?}"))
            };
            ensure!(self.at, covered.insert(e), "event {id} has two deliveries to endpoint {e}");
            ensure!(
                self.at,
                stored.event_id == id
                    && stored.org_id == self.orgs[org]
                    && stored.url == self.endpoints[e].url
                    && stored.created_at_ms == now,
                "{delivery_id} does not match its event {id}: {stored:?}"
            );
            let pending = self.endpoints[e].active;
            let i = self.deliveries.len();
            self.deliveries.push(ModelDelivery {
                id: delivery_id,
                event,
                endpoint: e,
                status: if pending { DeliveryStatus::Pending } else { DeliveryStatus::Inactive },
                due_ms: pending.then_some(now),
                due_range: None,
                trigger: Trigger::Auto,
                attempt_count: 0,
                since_reset: 0,
                manual: 0,
                delivered_once: false,
                history: Vec::new(),
                key: key.clone(),
            });
            ensure!(
                self.at,
                self.delivery_index.insert(delivery_id, i).is_none(),
                "delivery id {delivery_id} is given twice"
            );
            if pending {
                self.queue.insert((now, delivery_id));
                self.endpoints[e].pending.insert(i);
            }
            self.touched.insert(i);
        }
        // (An event without deliveries records no ordering key: it has nothing to order.)
        let stored_key = self.engine().ordering_key(id, call_id);
        ensure!(
            self.at,
            covered.is_empty() || stored_key.as_ref().is_ok_and(|k| *k == key),
            "event {id} has ordering key {stored_key:?}, not {key:?}"
        );
        self.events.push(ModelEvent { id, org, payload, at_ms: now, deliveries: delivery_ids });
        self.stats.events += 1;
        self.stats.deliveries += covered.len() as u64;
        self.follow();
    }

    fn failed_deliveries(&self) -> Vec<usize> {
        (0..self.deliveries.len()).filter(|&i| self.deliveries[i].status.is_failure()).collect()
    }

    fn retrigger_one(&mut self) {
        let failed = self.failed_deliveries();
        if failed.is_empty() || self.rng.percent(10) {
            // A delivery that is not a failure: refused, nothing changes.
            let others: Vec<usize> =
                (0..self.deliveries.len()).filter(|&i| !self.deliveries[i].status.is_failure()).collect();
            if others.is_empty() {
                return;
            }
            let i = others[self.rng.index(others.len())];
            let id = self.deliveries[i].id;
            let reply =
                self.engine().execute_blocking(Actor::admin(), Command::Retrigger { delivery_id: id });
            ensure!(
                self.at,
                matches!(reply, Err(EngineError::Command(CommandError::NotFound { .. }))),
                "retriggering {} delivery {id}: {reply:?}",
                self.deliveries[i].status.name()
            );
            self.stats.refused_commands += 1;
            self.settle();
            return;
        }
        let i = failed[self.rng.index(failed.len())];
        let id = self.deliveries[i].id;
        let reply = self.engine().execute_blocking(Actor::admin(), Command::Retrigger { delivery_id: id });
        ensure!(self.at, matches!(reply, Ok(Reply::Retriggered { .. })), "retriggering {id}: {reply:?}");
        self.stats.retriggers += 1;
        self.manual(i);
        self.settle();
    }

    fn redeliver_one(&mut self) {
        if self.deliveries.is_empty() {
            return;
        }
        let i = self.rng.index(self.deliveries.len());
        let id = self.deliveries[i].id;
        let reply = self.engine().execute_blocking(Actor::admin(), Command::Redeliver { delivery_id: id });
        if self.deliveries[i].status == DeliveryStatus::Pending {
            ensure!(
                self.at,
                matches!(reply, Err(EngineError::Command(CommandError::Conflict { .. }))),
                "redelivering pending {id}: {reply:?}"
            );
            self.stats.refused_commands += 1;
        } else {
            ensure!(self.at, matches!(reply, Ok(Reply::Done)), "redelivering {id}: {reply:?}");
            self.stats.redelivers += 1;
            self.manual(i);
        }
        self.settle();
    }

    fn batch_retrigger(&mut self) {
        let e = self.rng.index(self.endpoints.len());
        let mut mine: Vec<usize> =
            (0..self.deliveries.len()).filter(|&i| self.deliveries[i].endpoint == e).collect();
        if mine.is_empty() {
            return;
        }
        // Up to 25 distinct ones, failures first more often than not.
        if self.rng.percent(70) {
            mine.sort_by_key(|&i| !self.deliveries[i].status.is_failure());
            let failures = mine.iter().filter(|&&i| self.deliveries[i].status.is_failure()).count();
            mine.truncate(failures.max(1));
        }
        for k in 0..mine.len() {
            let j = k + self.rng.index(mine.len() - k);
            mine.swap(k, j);
        }
        mine.truncate(self.rng.between(1, BATCH_RETRIGGER_MAX as u64) as usize);
        let mut ids: Vec<DeliveryId> = mine.iter().map(|&i| self.deliveries[i].id).collect();
        // Sometimes another endpoint's delivery, which is answered per item.
        let foreign = (0..self.deliveries.len()).find(|&i| self.deliveries[i].endpoint != e);
        if let Some(f) = foreign.filter(|_| ids.len() < BATCH_RETRIGGER_MAX && self.rng.percent(20)) {
            ids.push(self.deliveries[f].id);
        }
        let reply = self.engine().execute_blocking(
            Actor::admin(),
            Command::BatchRetrigger { endpoint_id: self.endpoints[e].id, delivery_ids: ids.clone() },
        );
        let items = match reply {
            Ok(Reply::Batch(items)) => items,
            other => fail(self.at, format!("batch retrigger on endpoint {e}: {other:?}")),
        };
        ensure!(
            self.at,
            items.len() == ids.len(),
            "batch retrigger answered {} of {} items",
            items.len(),
            ids.len()
        );
        let mut accepted = Vec::new();
        for (item, id) in items.iter().zip(&ids) {
            ensure!(self.at, item.delivery_id == *id, "batch items out of order: {item:?} for {id}");
            let i = self.delivery_index[id];
            let d = &self.deliveries[i];
            let ok = d.endpoint == e && d.status != DeliveryStatus::Pending;
            ensure!(
                self.at,
                item.result.is_ok() == ok,
                "batch retrigger of {} {id} (endpoint {} in a batch for {e}): {item:?}",
                d.status.name(),
                d.endpoint
            );
            if ok {
                accepted.push(i);
            }
        }
        self.stats.batches += 1;
        for i in accepted {
            self.manual(i);
        }
        self.settle();
    }

    fn enable_endpoint(&mut self) {
        let inactive: Vec<usize> = (0..self.endpoints.len()).filter(|&e| !self.endpoints[e].active).collect();
        let e = if inactive.is_empty() {
            self.rng.index(self.endpoints.len())
        } else {
            inactive[self.rng.index(inactive.len())]
        };
        self.enable(e);
    }

    fn enable(&mut self, e: usize) {
        let reply = self
            .engine()
            .execute_blocking(Actor::admin(), Command::EnableEndpoint { id: self.endpoints[e].id });
        ensure!(self.at, matches!(reply, Ok(Reply::Done)), "enabling endpoint {e}: {reply:?}");
        let endpoint = &mut self.endpoints[e];
        endpoint.active = true;
        endpoint.run_ms.clear();
        self.stats.endpoints_enabled += 1;
        self.settle();
    }

    /// The window's edge: an endpoint's failure run, cleared by an enable, gets four failures now
    /// and the fifth exactly the window later, or a millisecond either side of it.
    fn window_probe(&mut self) {
        let e = self.rng.index(self.endpoints.len());
        // A paused endpoint would hold the four: its pause is let run out first.
        let paused_ms = self.endpoints[e].paused_until_ms.saturating_sub(self.now_ms());
        if paused_ms > 0 {
            self.advance(paused_ms);
        }
        self.enable(e);
        self.net.set_mode(&self.endpoints[e].url, Mode::Status(500));
        let org = self.endpoints[e].org;
        let event_type = match EVENT_TYPES.iter().find(|t| self.endpoints[e].subscribes_to(t)) {
            Some(t) => *t,
            None => fail(self.at, format!("endpoint {e} subscribes to no event type")),
        };
        for _ in 1..FAILURES_MAX {
            self.publish_event(org, event_type);
        }
        let off_ms = self.rng.below(3);
        self.advance(FAILURE_WINDOW_MS - 1 + off_ms);
    }

    /// Drops the engine without a stop, as a crash would, and opens a new one on the same store.
    /// The old process is gone only once nothing of it holds the disk (its threads stop in the
    /// background): a late write must not land on the new process's disk.
    fn wait_until_gone(&self) {
        let deadline = Instant::now() + SETTLE;
        while Arc::strong_count(&self.store) > 1 {
            ensure!(self.at, Instant::now() < deadline, "the stopped engine still holds the disk");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    fn crash(&mut self) {
        drop(self.engine.take());
        self.wait_until_gone();
        self.stats.crashes += 1;
        if self.hung.take().is_some() {
            // Cut off: never recorded; the model keeps it pending, due, so it must be made again.
            self.stats.cut_off += 1;
        }
        self.reopen();
    }

    /// A crash while a publish's batch is applied but not yet flushed: it is lost whole (its
    /// records and its projection rows, one batch), it was not acknowledged, and no attempt was
    /// made for it; everything acknowledged before is there after the restart.
    fn crash_before_a_flush(&mut self) {
        let org = self.rng.index(ORGS);
        let id = EventId(
            uuid::Builder::from_unix_timestamp_millis(self.now_ms(), &self.rng.bytes::<10>()).into_uuid(),
        );
        let answer = Arc::new(Mutex::new(None));
        let answered = answer.clone();
        self.store.hold_flushes();
        let command = Command::Publish {
            id,
            org_id: self.orgs[org],
            event_type: self.rng.pick(&EVENT_TYPES).to_owned(),
            payload: b"{}".to_vec(),
            call_id: None,
            webhook_url: None,
            idempotency_key: None,
            ordering_key: None,
        };
        self.engine().submit_with(Actor::admin(), command, move |reply| {
            *answered.lock().unwrap() = Some(format!("{reply:?}"));
        });
        if !self.store.flush_held(SETTLE) {
            fail(self.at, format!("the publish of {id} never reached its flush"));
        }
        ensure!(self.at, answer.lock().unwrap().is_none(), "{id} was answered before its flush");
        // The held flush is the publish's batch's: its event is applied, not yet durable.
        ensure!(
            self.at,
            matches!(get_event(&herald_projector::StoreTables(&self.store.mem), id), Ok(Some(_))),
            "the held flush is not the one of {id}'s batch"
        );
        let seen_before = self.net.seen_len();
        self.store.crash();
        drop(self.engine.take());
        self.wait_until_gone();
        let answer = answer.lock().unwrap().take();
        ensure!(
            self.at,
            answer.as_deref().is_none_or(|a| a.starts_with("Err")),
            "a publish lost in a crash was acknowledged: {answer:?}"
        );
        self.store.revive();
        self.stats.crashes += 1;
        self.stats.lost_batches += 1;
        if self.hung.take().is_some() {
            self.stats.cut_off += 1;
        }
        self.reopen();
        ensure!(
            self.at,
            matches!(self.engine().event(id), Ok(None)),
            "the unflushed publish of {id} survived the crash"
        );
        let webhook_id = id.to_string();
        ensure!(
            self.at,
            self.net.seen_since(seen_before).iter().all(|seen| seen.webhook_id != webhook_id),
            "an attempt was made for the unflushed event {id}"
        );
    }

    /// The graceful stop: a hung attempt is recorded as interrupted; then a new engine.
    fn graceful_restart(&mut self) {
        let report = self.engine().shutdown();
        let hung = self.hung.take();
        ensure!(
            self.at,
            report.interrupted == u64::from(hung.is_some()) && report.finished == 0 && report.unrecorded == 0,
            "the stop reported {report:?} with {} attempt hanging",
            u64::from(hung.is_some())
        );
        if let Some((i, seen)) = hung {
            self.stats.interrupted += 1;
            self.record(i, seen.at_ms, self.now_ms(), Outcome::Interrupted);
            self.learn_dues();
        }
        self.stats.graceful_stops += 1;
        drop(self.engine.take());
        self.reopen();
    }

    fn reopen(&mut self) {
        // The pauses live in the dispatcher's memory: a restart forgets them.
        for endpoint in &mut self.endpoints {
            endpoint.paused_until_ms = 0;
        }
        self.open();
        self.settle();
        // Every acknowledged event is there with its payload as published.
        for ev in &self.events {
            match self.engine().event(ev.id) {
                Ok(Some(stored)) => ensure!(
                    self.at,
                    stored.payload == ev.payload && stored.record.delivery_ids == ev.deliveries,
                    "event {} after a restart: {stored:?}",
                    ev.id
                ),
                other => {
                    fail(self.at, format!("acknowledged event {} is gone after a restart: {other:?}", ev.id))
                }
            }
        }
        self.check(true);
    }

    /// A receiver stops answering in the middle of an attempt; then the engine crashes or stops.
    fn hang_then_stop(&mut self) {
        // Mostly a receiver with a pending delivery, and a clock move that makes it due.
        let now = self.now_ms();
        let mut due_by_endpoint: Vec<(usize, u64)> = Vec::new();
        for &(due_ms, id) in &self.queue {
            let e = self.deliveries[self.delivery_index[&id]].endpoint;
            if !due_by_endpoint.iter().any(|&(seen, _)| seen == e) {
                due_by_endpoint.push((e, due_ms));
            }
        }
        let (e, ms) = if !due_by_endpoint.is_empty() && self.rng.percent(80) {
            let (e, due_ms) = due_by_endpoint[self.rng.index(due_by_endpoint.len())];
            (e, due_ms.saturating_sub(now) + self.rng.below(10 * SECOND_MS))
        } else {
            let ms = match self.rng.below(3) {
                0 => self.rng.between(1, 6 * SECOND_MS),
                1 => self.rng.between(MINUTE_MS, 70 * MINUTE_MS),
                _ => self.rng.between(1, 10) * HOUR_MS,
            };
            (self.rng.index(self.endpoints.len()), ms)
        };
        let url = self.endpoints[e].url.clone();
        let then = self.net.mode(&url).unwrap_or(Mode::Up);
        self.net.set_mode(&url, Mode::Hang { then: Box::new(then.clone()) });
        let hung_before = self.net.hung();
        self.clock.advance_ms(ms);
        let deadline = Instant::now() + SETTLE;
        loop {
            if self.net.hung() > hung_before {
                break;
            }
            if self.engine().settle(HANG_POLL) {
                // Nothing went to that receiver: it behaves as before.
                self.net.set_mode(&url, then);
                self.follow();
                return;
            }
            if Instant::now() >= deadline {
                fail(self.at, format!("neither a hang nor a settle: {:?}", self.engine().dispatch_stats()));
            }
        }
        self.follow();
        ensure!(self.at, self.hung.is_some(), "the receiver hung but the model saw no hanging request");
        if self.rng.percent(50) {
            self.crash();
        } else {
            self.graceful_restart();
        }
    }

    // -----------------------------------------------------------------------------------------
    // Checks.

    /// The projection against the model: endpoints, events, deliveries, the due index; attempts
    /// of the deliveries touched since the last check (of all of them when `deep`).
    fn check(&mut self, deep: bool) {
        let at = self.at;
        let now = self.now_ms();
        let engine = self.engine();
        let tables = engine.tables();
        for (e, ep) in self.endpoints.iter().enumerate() {
            let stored = match get_endpoint(&tables, ep.id) {
                Ok(Some(stored)) => stored,
                other => fail(at, format!("endpoint {e} cannot be read: {other:?}")),
            };
            let status = if ep.active { EndpointStatus::Active } else { EndpointStatus::Inactive };
            ensure!(
                at,
                stored.status == status,
                "endpoint {e} is {} where the window rule says {} (failures at {:?})",
                stored.status.name(),
                status.name(),
                ep.run_ms
            );
            ensure!(
                at,
                stored.inactive_reason.is_some() != ep.active,
                "endpoint {e}: inactive_reason {:?} while {}",
                stored.inactive_reason,
                status.name()
            );
            ensure!(
                at,
                stored.failure_run_at_ms == ep.run_ms,
                "endpoint {e}: failure run {:?}, the model has {:?}",
                stored.failure_run_at_ms,
                ep.run_ms
            );
        }
        for ev in &self.events {
            match get_event(&tables, ev.id) {
                Ok(Some(stored)) => ensure!(
                    at,
                    stored.delivery_ids == ev.deliveries
                        && stored.created_at_ms == ev.at_ms
                        && stored.org_id == self.orgs[ev.org],
                    "acknowledged event {} differs: {stored:?}",
                    ev.id
                ),
                other => fail(at, format!("acknowledged event {} is missing: {other:?}", ev.id)),
            }
        }
        for (i, d) in self.deliveries.iter().enumerate() {
            let id = d.id;
            let stored = match get_delivery(&tables, id) {
                Ok(Some(stored)) => stored,
                other => fail(at, format!("acknowledged delivery {id} is missing: {other:?}")),
            };
            let last = d.history.last();
            ensure!(
                at,
                stored.status == d.status
                    && stored.attempt_count == d.attempt_count
                    && stored.attempts_since_reset == d.since_reset
                    && stored.manual_retry_count == d.manual
                    && stored.next_attempt_at_ms == d.due_ms,
                "{id}: stored {} attempts={} since_reset={} manual={} next={:?}; the model says {} \
                 attempts={} since_reset={} manual={} next={:?}; attempts {:?}",
                stored.status.name(),
                stored.attempt_count,
                stored.attempts_since_reset,
                stored.manual_retry_count,
                stored.next_attempt_at_ms,
                d.status.name(),
                d.attempt_count,
                d.since_reset,
                d.manual,
                d.due_ms,
                d.history
            );
            if let Some(due_ms) = d.due_ms {
                let ready_ms = self.ready_ms(due_ms, id);
                ensure!(
                    at,
                    ready_ms > now || self.hung.is_some() || self.waits_behind(i).is_some(),
                    "{id} is pending, due at {due_ms} (may go from {ready_ms}) <= now {now}, and no earlier delivery of its key holds it back"
                );
            }
            ensure!(
                at,
                stored.endpoint_id == Some(self.endpoints[d.endpoint].id)
                    && stored.event_id == self.events[d.event].id,
                "{id} moved: {stored:?}"
            );
            ensure!(
                at,
                stored.inactive_reason.is_some() == (d.status == DeliveryStatus::Inactive),
                "{id}: inactive_reason {:?} while {}",
                stored.inactive_reason,
                d.status.name()
            );
            ensure!(
                at,
                stored.delivered_at_ms.is_some() == d.delivered_once,
                "{id}: delivered_at {:?}, delivered before: {}",
                stored.delivered_at_ms,
                d.delivered_once
            );
            ensure!(
                at,
                stored.last_attempt_at_ms == last.map(|a| a.started_ms)
                    && stored.last_error.is_some()
                        == d.history
                            .iter()
                            .rev()
                            .find(|a| !matches!(a.outcome, Outcome::Interrupted))
                            .is_some_and(|a| !matches!(a.outcome, Outcome::Delivered(_))),
                "{id}: last attempt at {:?} error {:?}; the model's last attempt {last:?}",
                stored.last_attempt_at_ms,
                stored.last_error
            );
            if deep || self.touched.contains(&i) {
                self.check_attempts(i);
            }
        }
        // The due index holds exactly the model's pending deliveries, at their due times.
        let mut due = Vec::new();
        let mut after = None;
        loop {
            let page = match due_deliveries(&tables, after, u64::MAX, PAGE_LEN_MAX) {
                Ok(page) => page,
                Err(e) => fail(at, format!("the due index cannot be read: {e}")),
            };
            let Some(last) = page.last().copied() else { break };
            due.extend(page.iter().map(|d: &Due| (d.next_attempt_at_ms, d.delivery_id)));
            after = Some(last);
        }
        let expected: Vec<(u64, DeliveryId)> = self.queue.iter().copied().collect();
        ensure!(at, due == expected, "the due index {due:?} is not the model's pending set {expected:?}");
        if deep || at.step % INDEX_CHECK_EVERY == 0 {
            self.check_lists();
        }
        self.touched.clear();
    }

    /// Check 2 on one delivery's recorded attempts, and the schedule as the receivers saw it.
    fn check_attempts(&self, i: usize) {
        let at = self.at;
        let d = &self.deliveries[i];
        let id = d.id;
        let stored = match self.engine().attempts(id, 0, PAGE_LEN_MAX) {
            Ok(stored) => stored,
            Err(e) => fail(at, format!("the attempts of {id} cannot be read: {e}")),
        };
        ensure!(
            at,
            stored.len() == d.history.len() && d.history.len() == d.attempt_count as usize,
            "{id}: {} attempts recorded, {} made (attempt_count {}): {stored:?} vs {:?}",
            stored.len(),
            d.history.len(),
            d.attempt_count,
            d.history
        );
        for (k, (record, made)) in stored.iter().zip(&d.history).enumerate() {
            let (status, error_ok) = match made.outcome {
                Outcome::Delivered(status) => (Some(status), record.error.is_none()),
                Outcome::Failed { status, .. } => (status, record.error.is_some()),
                Outcome::Interrupted => (None, record.error.as_deref() == Some(INTERRUPTED_ERROR)),
            };
            ensure!(
                at,
                record.attempt == k as u32 + 1
                    && made.attempt == record.attempt
                    && record.trigger == made.trigger
                    && record.started_at_ms == made.started_ms
                    && record.finished_at_ms == made.finished_ms
                    && record.response_status == status
                    && error_ok,
                "{id}: attempt {} recorded as {record:?}, made as {made:?}",
                k + 1
            );
        }
        // The schedule, from what the receivers saw: an automatic attempt follows a failure, after at
        // least the schedule's delay for its place (and the receiver's Retry-After).
        for pair in d.history.windows(2) {
            let (before, next) = (&pair[0], &pair[1]);
            // After an interrupted attempt the same one is made again at once.
            if next.trigger == Trigger::Manual || matches!(before.outcome, Outcome::Interrupted) {
                continue;
            }
            ensure!(
                at,
                !matches!(before.outcome, Outcome::Delivered(_)),
                "{id}: automatic attempt {} after a success",
                next.attempt
            );
            let Some(&base_ms) = SCHEDULE_MS.get(before.since_reset as usize - 1) else {
                fail(at, format!("{id}: automatic attempt {} after the schedule was used up", next.attempt))
            };
            let gap_ms = next.started_ms - before.finished_ms;
            let wait_ms = base_ms.max(before.outcome.retry_after_ms().unwrap_or(0));
            ensure!(
                at,
                gap_ms >= wait_ms,
                "{id}: automatic attempt {} came {gap_ms} ms after the previous one, before {wait_ms} ms",
                next.attempt
            );
        }
    }

    /// The delivery lists by endpoint and status hold exactly the model's deliveries.
    fn check_lists(&self) {
        let at = self.at;
        let tables = self.engine().tables();
        for (e, ep) in self.endpoints.iter().enumerate() {
            for status in DeliveryStatus::ALL {
                let query = DeliveryQuery::all(DeliveryIndex::EndpointStatus(ep.id, status));
                let mut listed = BTreeSet::new();
                let mut cursor = None;
                loop {
                    let page = match list_deliveries(&tables, &query, cursor, PAGE_LEN_MAX) {
                        Ok(page) => page,
                        Err(err) => {
                            fail(at, format!("listing endpoint {e}'s {} deliveries: {err}", status.name()))
                        }
                    };
                    for d in &page.items {
                        ensure!(
                            at,
                            d.status == status,
                            "{} listed as {} but is {}",
                            d.id,
                            status.name(),
                            d.status.name()
                        );
                        listed.insert(d.id);
                    }
                    match page.next {
                        Some(next) => cursor = Some(next),
                        None => break,
                    }
                }
                let expected: BTreeSet<DeliveryId> = self
                    .deliveries
                    .iter()
                    .filter(|d| d.endpoint == e && d.status == status)
                    .map(|d| d.id)
                    .collect();
                ensure!(
                    at,
                    listed == expected,
                    "endpoint {e}'s {} list differs from the model: listed {} expected {}",
                    status.name(),
                    listed.len(),
                    expected.len()
                );
            }
        }
    }

    /// Check 4: every receiver up, every pending retry run, every failure retriggered: all delivered.
    fn finish(&mut self) {
        for ep in &self.endpoints {
            self.net.set_mode(&ep.url, Mode::Up);
        }
        self.advance(SCHEDULE_MS[SCHEDULE_MS.len() - 1] * 2 + RETRY_AFTER_MAX_MS);
        self.check(true);
        ensure!(
            self.at,
            self.queue.is_empty(),
            "deliveries still pending with every receiver up: {:?}",
            self.queue
        );
        for e in 0..self.endpoints.len() {
            let failed: Vec<usize> =
                self.failed_deliveries().into_iter().filter(|&i| self.deliveries[i].endpoint == e).collect();
            for chunk in failed.chunks(BATCH_RETRIGGER_MAX) {
                let ids: Vec<DeliveryId> = chunk.iter().map(|&i| self.deliveries[i].id).collect();
                let reply = self.engine().execute_blocking(
                    Actor::admin(),
                    Command::BatchRetrigger { endpoint_id: self.endpoints[e].id, delivery_ids: ids },
                );
                ensure!(
                    self.at,
                    matches!(&reply, Ok(Reply::Batch(items)) if items.iter().all(|item| item.result.is_ok())),
                    "the final batch retrigger on endpoint {e}: {reply:?}"
                );
                for &i in chunk {
                    self.manual(i);
                }
                self.stats.batches += 1;
                self.settle();
            }
        }
        self.check(true);
        let undelivered: Vec<String> = self
            .deliveries
            .iter()
            .filter(|d| d.status != DeliveryStatus::Delivered)
            .map(|d| format!("{} {}", d.id, d.status.name()))
            .collect();
        ensure!(self.at, undelivered.is_empty(), "not delivered at the end: {undelivered:?}");
        ensure!(self.at, self.endpoints.iter().all(|e| e.active), "an endpoint is still inactive at the end");
        // The failure lists, as the API shows them, are empty; and a crash now redoes nothing.
        let seen = self.net.seen_len();
        self.crash();
        ensure!(self.at, self.net.seen_len() == seen, "a restart after everything was delivered sent again");
        // The projection the writer stored, batch by batch (index entries folded into their
        // chunks once per batch), is byte for byte what folding the log one event at a time gives.
        let rebuilt = herald_projector::rebuild(self.store.as_ref(), &mut |_| {});
        let stored = herald_projector::stored_projection(self.store.as_ref());
        match (rebuilt, stored) {
            (Ok(rebuilt), Ok(stored)) => {
                ensure!(self.at, stored == rebuilt.dump(), "the stored projection differs from a rebuild")
            }
            (rebuilt, stored) => {
                fail(self.at, format!("rebuild {:?} / stored {:?}", rebuilt.err(), stored.err()))
            }
        }
        let tables = self.engine().tables();
        for (o, &org) in self.orgs.iter().enumerate() {
            for status in [DeliveryStatus::Pending, DeliveryStatus::Exhausted, DeliveryStatus::Inactive] {
                let query = DeliveryQuery::all(DeliveryIndex::OrgStatus(org, status));
                match list_deliveries(&tables, &query, None, 1) {
                    Ok(page) => ensure!(
                        self.at,
                        page.items.is_empty(),
                        "organisation {o} still lists {} deliveries: {:?}",
                        status.name(),
                        page.items
                    ),
                    Err(e) => fail(self.at, format!("listing organisation {o}: {e}")),
                }
            }
        }
    }
}

/// What one seed did: every request the receivers saw, in order, and the counts.
struct Report {
    seen: Vec<Seen>,
    stats: Stats,
}

/// Runs one seed.
fn run(seed: u64, steps: usize) -> Report {
    let started = Instant::now();
    let mut sim = Sim::new(seed);
    for step in 0..steps {
        sim.at.step = step;
        sim.step();
        sim.check(false);
    }
    sim.at.step = steps;
    sim.finish();
    eprintln!(
        "simulation seed {seed}: {steps} steps in {:.1} s, {} simulated hours, {} endpoints; {:?}",
        started.elapsed().as_secs_f64(),
        (sim.now_ms() - T0_MS) / HOUR_MS,
        sim.endpoints.len(),
        sim.stats
    );
    let seen = sim.net.lock().seen.clone();
    if let Some(engine) = sim.engine.take() {
        engine.shutdown();
    }
    Report { seen, stats: sim.stats }
}

/// [`run`], naming the seed on any panic (an unexpected one included).
fn run_reported(seed: u64, steps: usize) -> Report {
    match catch_unwind(AssertUnwindSafe(|| run(seed, steps))) {
        Ok(report) => report,
        Err(panic) => {
            eprintln!(
                "simulation seed {seed} (0x{seed:x}) FAILED; replay: HERALD_SIM_SEED={seed} cargo test -p \
                 herald-engine --test simulation seed_from_environment"
            );
            resume_unwind(panic)
        }
    }
}

fn env_u64(name: &str) -> Option<u64> {
    let text = std::env::var(name).ok()?;
    let text = text.trim();
    let parsed = match text.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => text.parse(),
    };
    match parsed {
        Ok(n) => Some(n),
        Err(e) => panic!("{name}={text:?} is not a number: {e}"),
    }
}

fn steps() -> usize {
    env_u64("HERALD_SIM_STEPS").map_or(STEPS, |n| n as usize)
}

/// A fixed seed, which must also have exercised every rule it is there to check.
fn fixed_seed(seed: u64) {
    let report = run_reported(seed, steps());
    let s = &report.stats;
    let covered = [
        ("deliveries", s.deliveries >= 1_000),
        ("failed attempts", s.failed_attempts > 0),
        ("crashes", s.crashes > 0),
        ("crashes between a publish's apply and its flush", s.lost_batches > 0),
        ("graceful stops", s.graceful_stops > 0),
        ("attempts cut off by a crash", s.cut_off > 0),
        ("attempts interrupted by a stop", s.interrupted > 0),
        ("clock jumps of hours", s.hour_jumps > 0),
        ("endpoints made inactive", s.endpoints_inactivated > 0),
        ("endpoints paused by a Retry-After", s.pauses > 0),
        ("full failure runs spared by the window", s.spared_by_window > 0),
        ("full failure runs on the window's edge", s.runs_on_the_window_edge > 0),
        ("endpoints enabled", s.endpoints_enabled > 0),
        ("exhausted deliveries", s.exhausted > 0),
        ("retriggers", s.retriggers > 0),
        ("redelivers", s.redelivers > 0),
        ("batch retriggers", s.batches > 0),
        ("refused commands", s.refused_commands > 0),
        ("jittered retries", s.jittered > 0),
        ("deliveries held by their ordering key", s.held_by_key > 0),
    ];
    let missed: Vec<&str> = covered.iter().filter(|(_, hit)| !hit).map(|(what, _)| *what).collect();
    if env_u64("HERALD_SIM_STEPS").is_none() {
        assert!(missed.is_empty(), "seed {seed} never exercised: {missed:?} ({s:?})");
    }
}

#[test]
fn seed_1() {
    fixed_seed(SEEDS[0]);
}

#[test]
fn seed_2() {
    fixed_seed(SEEDS[1]);
}

#[test]
fn seed_3() {
    fixed_seed(SEEDS[2]);
}

/// `HERALD_SIM_SEED=<seed>` runs that seed too (a failing one, to replay it, or a new one to explore).
#[test]
fn seed_from_environment() {
    if let Some(seed) = env_u64("HERALD_SIM_SEED") {
        run_reported(seed, steps());
    }
}

#[test]
fn a_seed_replays_exactly() {
    let seed = 0x00c0_ffee;
    let first = run_reported(seed, REPLAY_STEPS).seen;
    let second = run_reported(seed, REPLAY_STEPS).seen;
    assert!(first.len() > 100, "seed {seed}: only {} requests", first.len());
    if let Some(k) = first.iter().zip(&second).position(|(a, b)| a != b) {
        panic!("seed {seed}: request {k} differs between two runs:\n  {:?}\n  {:?}", first[k], second[k]);
    }
    assert_eq!(first.len(), second.len(), "seed {seed}: the runs made different numbers of requests");
}

/// A due queue far smaller than the pending work: it overflows all the time, and every due
/// delivery must still be attempted on time (the stored index is reloaded when a dropped entry
/// may be due). This caught a queue that stayed full of later retries while a dropped delivery
/// was already due.
#[test]
fn a_tiny_due_queue_leaves_nothing_due_unattempted() {
    for (capacity, seed) in [(2, SEEDS[1]), (8, 0x00c0_ffee)] {
        DUE_QUEUE_CAPACITY.with(|c| c.set(Some(capacity)));
        let report = run_reported(seed, REPLAY_STEPS);
        assert!(report.stats.deliveries > 100, "capacity {capacity}, seed {seed}: {:?}", report.stats);
    }
}
