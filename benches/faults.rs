//! Faults of the host, in a long loop on the real release binary (issue 25): what `cargo test`
//! tries a few times, tried here hundreds of times.
//!
//! 1. kill -9 under load: publishers run for a random short time, herald is killed by PID while
//!    they publish and restarted on the same data directory, again and again. At the end every
//!    acknowledged event must read back and reach the receiver; duplicates are allowed (at least
//!    once after a kill) and counted; `herald verify` must pass.
//! 2. disk full and free: the data directory on a small tmpfs with a ballast file; events are
//!    published until herald refuses them (503), the ballast is deleted and herald must resume by
//!    itself, without a restart. Nothing acknowledged may be lost; `herald verify` must pass on
//!    every data directory. Needs root (mount); skipped with a printed reason otherwise.
//!
//! Run: `cargo bench --bench faults` (`HERALD_FAULTS_KILL_ROUNDS=10 HERALD_FAULTS_DISK_CYCLES=3`
//! for a short look, `HERALD_FAULTS_SEED` to repeat the random kill times, `-- --json FILE`). Not part
//! of `just bench`. Exits non-zero when anything acknowledged is lost, unreadable or undelivered,
//! `verify` fails, herald does not resume, a publish is answered neither 202 nor 503, or `/readyz`
//! on the full disk does not say that the store refuses writes.

mod common;
#[path = "../tests/common/mod.rs"]
mod harness;

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::{report, Row};
use harness::{call_raw, Receiver, Server};
use serde_json::{json, Value};

const SCOPES: &[&str] = &["events.write", "endpoints.write", "endpoints.read", "deliveries.read"];
/// Publishing threads, in both parts.
const PUBLISHERS: usize = 4;
/// Retries that outlast a restart and a full disk, and an endpoint that does not turn inactive
/// under them: the bench asks about the store, not about the endpoint's health.
const ENV: &[(&str, &str)] = &[
    ("HERALD_DELIVERY_RETRY_SCHEDULE", "500ms,1s,2s,5s,10s,20s"),
    ("HERALD_ENDPOINT_HEALTH_FAILURES", "1000"),
];
/// How long the deliveries of the acknowledged events may take to arrive at the end.
const DELIVERY_WAIT: Duration = Duration::from_secs(120);
/// How long herald may take to resume once space is back.
const RESUME_WAIT: Duration = Duration::from_secs(60);
/// How long one round of publishing may last at the most (a disk that never fills).
const LOAD_MAX: Duration = Duration::from_secs(120);
/// How long `herald verify`, `mount` or `umount` may take.
const COMMAND_WAIT: Duration = Duration::from_secs(300);

/// The tmpfs of the disk part, its ballast, and the room left for herald to fill.
const TMPFS_BYTES: u64 = 32 << 20;
const BALLAST_BYTES: u64 = 8 << 20;
/// Herald resumes only with two sled segments free (4 MiB; `/readyz` says so meanwhile): a
/// ballast that gives less back once deleted leaves it refusing writes, by design. A cycle
/// deletes that and 1 MiB more.
const BALLAST_MIN_BYTES: u64 = 2 * herald_log::SEGMENT_BYTES as u64 + (1 << 20);
/// What a cycle on a directory that already filled once leaves herald to fill besides the
/// ballast: about 3 cycles a directory (8, 7 and 5 MiB of ballast), then a fresh one.
const FILL_ROOM_BYTES: u64 = 1 << 20;
/// A cycle's disk is full after this many 503s.
const REFUSALS_FULL: u64 = 5;

fn env_count(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// xorshift64*: the kill times, repeatable from the printed seed.
struct Rng(u64);

impl Rng {
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        lo + self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % (hi - lo + 1)
    }
}

/// A publish answered 202: the event and its deliveries.
struct Acked {
    event: String,
    deliveries: Vec<String>,
}

impl Acked {
    /// From the body of a 202.
    fn from_answer(text: &str) -> Acked {
        let v: Value = serde_json::from_str(text).unwrap_or(Value::Null);
        let ids = v["delivery_ids"].as_array().cloned().unwrap_or_default();
        Acked {
            event: v["id"].as_str().unwrap_or_default().to_owned(),
            deliveries: ids.iter().filter_map(|d| d.as_str().map(str::to_owned)).collect(),
        }
    }
}

/// What the publishers of one load saw, besides what was acknowledged.
#[derive(Default)]
struct Tally {
    acked: AtomicU64,
    refused: AtomicU64,
    /// Connections that failed while herald was meant to be up.
    transport_errors: AtomicU64,
    /// Answers that are neither 202 nor 503 (the first few, with their body).
    unexpected: Mutex<Vec<String>>,
    unexpected_count: AtomicU64,
}

/// Publishers running against one herald until stopped.
struct Load {
    stop: Arc<AtomicBool>,
    /// Set just before herald is killed: a failed connection after it ends a publisher.
    killing: Arc<AtomicBool>,
    tally: Arc<Tally>,
    threads: Vec<JoinHandle<Vec<Acked>>>,
}

impl Load {
    fn start(server: &Server, key: &str, tag: &str, pad_bytes: usize) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let killing = Arc::new(AtomicBool::new(false));
        let tally = Arc::new(Tally::default());
        let url = server.url("/v1/events");
        let pad = "x".repeat(pad_bytes);
        let threads = (0..PUBLISHERS)
            .map(|thread| {
                let (stop, killing, tally) = (stop.clone(), killing.clone(), tally.clone());
                let (url, key, tag, pad) = (url.clone(), key.to_owned(), tag.to_owned(), pad.clone());
                std::thread::spawn(move || {
                    let deadline = Instant::now() + LOAD_MAX;
                    let mut acked = Vec::new();
                    for n in 0u64.. {
                        if stop.load(Ordering::SeqCst) || Instant::now() > deadline {
                            break;
                        }
                        let body = json!({
                            "event_type": "faults.load",
                            "payload": {"tag": tag, "thread": thread, "n": n, "pad": pad},
                        })
                        .to_string();
                        match call_raw(&url, "POST", Some(&key), Some(&body), &[]) {
                            Ok((202, text)) => {
                                acked.push(Acked::from_answer(&text));
                                tally.acked.fetch_add(1, Ordering::SeqCst);
                            }
                            Ok((503, _)) => {
                                tally.refused.fetch_add(1, Ordering::SeqCst);
                            }
                            Ok((status, text)) => {
                                tally.unexpected_count.fetch_add(1, Ordering::SeqCst);
                                let mut list = tally.unexpected.lock().unwrap_or_else(|e| e.into_inner());
                                if list.len() < 5 {
                                    list.push(format!(
                                        "{status} {}",
                                        text.chars().take(300).collect::<String>()
                                    ));
                                }
                            }
                            // Killed: this publish was never acknowledged.
                            Err(_) if killing.load(Ordering::SeqCst) => break,
                            Err(_) => {
                                tally.transport_errors.fetch_add(1, Ordering::SeqCst);
                                std::thread::sleep(Duration::from_millis(10));
                            }
                        }
                    }
                    acked
                })
            })
            .collect();
        Load { stop, killing, tally, threads }
    }

    /// Stops the publishers and returns what was acknowledged.
    fn finish(self) -> (Vec<Acked>, Arc<Tally>) {
        self.stop.store(true, Ordering::SeqCst);
        let mut acked = Vec::new();
        for t in self.threads {
            acked.extend(t.join().expect("a publisher panicked"));
        }
        (acked, self.tally)
    }
}

/// Waits (at most `limit`) until `/readyz` answers 200: how long that took, or its last answer.
fn wait_ready(server: &Server, limit: Duration) -> Result<Duration, String> {
    let from = Instant::now();
    loop {
        let answer = server.try_call("GET", "/readyz", None, None);
        if let Ok((200, _)) = answer {
            return Ok(from.elapsed());
        }
        if from.elapsed() > limit {
            return Err(match answer {
                Ok((status, text)) => format!("{status} {text}"),
                Err(e) => e,
            });
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The acknowledged events that do not read back: `lost`, not found or found without the
/// deliveries acknowledged with them; `unreadable`, any other answer (a refused read).
#[derive(Default)]
struct Check {
    lost: Vec<String>,
    unreadable: Vec<String>,
}

fn check_events(server: &Server, key: &str, acked: &[Acked]) -> Check {
    let mut out = Check::default();
    for a in acked {
        let path = format!("/v1/events/{}", a.event);
        match server.try_call("GET", &path, Some(key), None) {
            Ok((200, text)) => {
                let v: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
                if v["delivery_ids"] != json!(a.deliveries) {
                    let found = &v["delivery_ids"];
                    out.lost.push(format!(
                        "{}: deliveries {found} where {:?} were acknowledged",
                        a.event, a.deliveries
                    ));
                }
            }
            Ok((404, text)) => out.lost.push(format!("{}: 404 {text}", a.event)),
            Ok((status, text)) => out.unreadable.push(format!(
                "{}: {status} {}",
                a.event,
                text.chars().take(300).collect::<String>()
            )),
            Err(e) => out.unreadable.push(format!("{}: {e}", a.event)),
        }
    }
    out
}

/// What reached the receiver of the acknowledged events.
#[derive(Default)]
struct Deliveries {
    /// Acknowledged events the receiver never got by the deadline.
    undelivered: Vec<String>,
    /// Acknowledged events the receiver got more than once, and the extra requests.
    duplicated: usize,
    extra_requests: u64,
    /// Events delivered whose publish was never acknowledged (cut off by a kill).
    unacknowledged_delivered: usize,
}

/// Waits (at most `limit`) until every acknowledged event reached the receiver, by `webhook-id`.
fn wait_delivered(receiver: &Receiver, acked: &[Acked], limit: Duration) -> Deliveries {
    let deadline = Instant::now() + limit;
    loop {
        let mut seen: HashMap<String, u64> = HashMap::new();
        for r in receiver.received() {
            *seen.entry(r.header("webhook-id").to_owned()).or_default() += 1;
        }
        let undelivered: Vec<String> =
            acked.iter().filter(|a| !seen.contains_key(&a.event)).map(|a| a.event.clone()).collect();
        if undelivered.is_empty() || Instant::now() > deadline {
            let ours: HashSet<&str> = acked.iter().map(|a| a.event.as_str()).collect();
            let extra: Vec<u64> =
                acked.iter().filter_map(|a| seen.get(&a.event)).filter(|n| **n > 1).map(|n| n - 1).collect();
            return Deliveries {
                undelivered,
                duplicated: extra.len(),
                extra_requests: extra.iter().sum(),
                unacknowledged_delivered: seen.keys().filter(|id| !ours.contains(id.as_str())).count(),
            };
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// Runs a command to its end, at most `limit`; the child is killed by its PID if it takes longer
/// or if this thread unwinds meanwhile.
fn run_bounded(cmd: &mut Command, limit: Duration) -> Result<Output, String> {
    struct KillOnDrop(Option<u32>);
    impl Drop for KillOnDrop {
        fn drop(&mut self) {
            if let Some(pid) = self.0 {
                // SAFETY: kill(2) on our own child, not yet reaped (the waiter holds it).
                unsafe {
                    libc::kill(pid as i32, libc::SIGKILL);
                }
            }
        }
    }
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot start {cmd:?}: {e}"))?;
    let mut guard = KillOnDrop(Some(child.id()));
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(limit) {
        Ok(out) => {
            guard.0 = None;
            out.map_err(|e| e.to_string())
        }
        Err(_) => {
            drop(guard);
            let _ = rx.recv_timeout(Duration::from_secs(5));
            Err(format!("{cmd:?} did not finish within {limit:?}"))
        }
    }
}

/// `herald verify` on a stopped data directory: whether it passed, and its last line.
fn verify(dir: &Path) -> (bool, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_herald"));
    cmd.args(["verify", "--data-dir"]).arg(dir);
    match run_bounded(&mut cmd, COMMAND_WAIT) {
        Ok(out) => {
            let text =
                format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
            let last = text.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("").trim().to_owned();
            (out.status.success(), last)
        }
        Err(e) => (false, e),
    }
}

fn ms(d: Duration) -> u64 {
    d.as_millis() as u64
}

/// A count that must be zero, as a figure.
fn zero_row(name: String, value: usize) -> Row {
    Row {
        name,
        value: value as f64,
        unit: "",
        limit_name: String::new(),
        limit: 0.0,
        target: "0".into(),
        met: Some(value == 0),
    }
}

fn info_row(name: String, value: f64, unit: &'static str) -> Row {
    Row { name, value, unit, limit_name: String::new(), limit: 0.0, target: String::new(), met: None }
}

fn print_some(what: &str, list: &[String]) {
    for line in list.iter().take(10) {
        println!("  {what}: {line}");
    }
    if list.len() > 10 {
        println!("  … and {} more", list.len() - 10);
    }
}

// ---------------------------------------------------------------------------------------------
// Part 1: kill -9 rounds under load

fn kill_rounds(rounds: u64, seed: u64, rows: &mut Vec<Row>) -> bool {
    let started = Instant::now();
    let mut rng = Rng(seed | 1);
    // It answers 200, not 204: the harness's receiver sends a body, which a 204 must not have.
    let receiver = Receiver::start();
    let mut server = Server::start_with(ENV);
    let (_, key) = server.org_key(SCOPES);
    server.endpoint(&key, &receiver.url("/faults"), &["*"]);
    let mut acked: Vec<Acked> = Vec::new();
    let (mut restarts_ms, mut load_ms) = (Vec::new(), Vec::new());
    let (mut transport_errors, mut refused, mut unexpected_count, mut unexpected) = (0, 0, 0, Vec::new());
    let mut zero_ack_rounds = 0;
    for round in 0..rounds {
        let load = Load::start(&server, &key, &format!("round {round}"), 200);
        let publish_for = Duration::from_millis(rng.range(20, 300));
        std::thread::sleep(publish_for);
        load_ms.push(ms(publish_for));
        load.killing.store(true, Ordering::SeqCst);
        server.kill9();
        let (this_round, tally) = load.finish();
        zero_ack_rounds += usize::from(this_round.is_empty());
        acked.extend(this_round);
        transport_errors += tally.transport_errors.load(Ordering::SeqCst);
        refused += tally.refused.load(Ordering::SeqCst);
        unexpected_count += tally.unexpected_count.load(Ordering::SeqCst);
        unexpected.extend(tally.unexpected.lock().unwrap_or_else(|e| e.into_inner()).drain(..));
        let restart = Instant::now();
        server.restart();
        restarts_ms.push(ms(restart.elapsed()));
        if (round + 1) % 25 == 0 {
            eprintln!("kill -9: round {} of {rounds}, {} acknowledged so far", round + 1, acked.len());
        }
    }
    // Herald runs again after the last kill: everything acknowledged is there and arrives.
    let ready = wait_ready(&server, RESUME_WAIT).is_ok();
    let check = check_events(&server, &key, &acked);
    let delivered = wait_delivered(&receiver, &acked, DELIVERY_WAIT);
    let delivery_wait = started.elapsed();
    server.kill9();
    let (verified, verify_line) = verify(&server.data_dir);
    let took = started.elapsed();

    restarts_ms.sort_unstable();
    let pct =
        |v: &[u64], p: usize| v.get((v.len() * p / 100).min(v.len().saturating_sub(1))).copied().unwrap_or(0);
    println!();
    println!("## kill -9 under load ({rounds} rounds, seed {seed}, {PUBLISHERS} publishers)");
    println!();
    println!("| rounds | acknowledged | lost | unreadable | undelivered | duplicated (extra requests) | delivered, not acknowledged | verify | time |");
    println!("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: |");
    println!(
        "| {rounds} | {} | {} | {} | {} | {} ({}) | {} | {} | {:.1} s |",
        acked.len(),
        check.lost.len(),
        check.unreadable.len(),
        delivered.undelivered.len(),
        delivered.duplicated,
        delivered.extra_requests,
        delivered.unacknowledged_delivered,
        if verified { "passed" } else { "FAILED" },
        took.as_secs_f64()
    );
    println!();
    println!(
        "publishing per round {}–{} ms (mean {:.0}); restart to /healthz p50 {} ms, p90 {} ms, max {} ms; \
         rounds with nothing acknowledged {zero_ack_rounds}; connection errors while up {transport_errors}; \
         503s {refused}; answers neither 202 nor 503: {unexpected_count}; end check and delivery wait done at {:.1} s",
        load_ms.iter().min().unwrap_or(&0),
        load_ms.iter().max().unwrap_or(&0),
        load_ms.iter().sum::<u64>() as f64 / load_ms.len().max(1) as f64,
        pct(&restarts_ms, 50),
        pct(&restarts_ms, 90),
        restarts_ms.last().unwrap_or(&0),
        delivery_wait.as_secs_f64()
    );
    println!("verify: {verify_line}");
    if !ready {
        println!("  /readyz did not answer 200 within {RESUME_WAIT:?} of the last restart");
    }
    print_some("lost", &check.lost);
    print_some("unreadable", &check.unreadable);
    print_some("undelivered", &delivered.undelivered);
    print_some("unexpected answer", &unexpected);

    rows.push(info_row(format!("kill -9 × {rounds}: acknowledged"), acked.len() as f64, "events"));
    rows.push(zero_row(format!("kill -9 × {rounds}: lost"), check.lost.len()));
    rows.push(zero_row(format!("kill -9 × {rounds}: unreadable"), check.unreadable.len()));
    rows.push(zero_row(
        format!("kill -9 × {rounds}: undelivered after {} s", DELIVERY_WAIT.as_secs()),
        delivered.undelivered.len(),
    ));
    rows.push(info_row(
        format!("kill -9 × {rounds}: duplicated (at least once)"),
        delivered.duplicated as f64,
        "events",
    ));
    rows.push(zero_row(
        format!("kill -9 × {rounds}: answers neither 202 nor 503"),
        unexpected_count as usize,
    ));
    rows.push(zero_row(format!("kill -9 × {rounds}: verify failed"), usize::from(!verified)));
    rows.push(info_row(format!("kill -9 × {rounds}: restart p50"), pct(&restarts_ms, 50) as f64, "ms"));
    ready
        && check.lost.is_empty()
        && check.unreadable.is_empty()
        && delivered.undelivered.is_empty()
        && unexpected_count == 0
        && verified
}

// ---------------------------------------------------------------------------------------------
// Part 2: disk full and free cycles on a tmpfs

/// A tmpfs mounted on a temporary directory, unmounted when dropped (also on a panic).
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    /// Mounts one, or says why it cannot (not root, no mount permission in this sandbox).
    fn mount() -> Result<Tmpfs, String> {
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let mut cmd = Command::new("mount");
        cmd.args(["-t", "tmpfs", "-o", &format!("size={TMPFS_BYTES}"), "tmpfs"]).arg(dir.path());
        let out = run_bounded(&mut cmd, COMMAND_WAIT)?;
        if !out.status.success() {
            let why = String::from_utf8_lossy(&out.stderr).split_whitespace().collect::<Vec<_>>().join(" ");
            return Err(format!("mount -t tmpfs failed: {why}"));
        }
        Ok(Tmpfs { dir })
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Bytes free on it.
    fn available(&self) -> u64 {
        let path = std::ffi::CString::new(self.path().as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: statvfs with a valid C string and a zeroed struct it fills.
        unsafe {
            let mut st: libc::statvfs = std::mem::zeroed();
            if libc::statvfs(path.as_ptr(), &mut st) != 0 {
                return 0;
            }
            st.f_bavail * st.f_frsize
        }
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let mut cmd = Command::new("umount");
        cmd.arg(self.path());
        if !matches!(run_bounded(&mut cmd, COMMAND_WAIT), Ok(out) if out.status.success()) {
            let _ = run_bounded(Command::new("umount").arg("-l").arg(self.path()), COMMAND_WAIT);
        }
    }
}

/// Writes the ballast, `bytes` long; false when the disk has no room for it.
fn write_ballast(path: &Path, bytes: u64) -> bool {
    use std::io::Write;
    let chunk = vec![0u8; 1 << 20];
    let written = std::fs::File::create(path).and_then(|mut f| {
        let mut left = bytes;
        while left > 0 {
            let n = left.min(chunk.len() as u64) as usize;
            f.write_all(&chunk[..n])?;
            left -= n as u64;
        }
        f.sync_all()
    });
    if written.is_err() {
        let _ = std::fs::remove_file(path);
    }
    written.is_ok()
}

/// One data directory on the tmpfs, with herald running on it and the receiver of its endpoint.
struct DataDir {
    n: usize,
    path: PathBuf,
    receiver: Receiver,
    key: String,
    acked: Vec<Acked>,
    cycles: usize,
}

impl DataDir {
    /// Starts herald (on a new port) on a fresh directory `n` of the tmpfs.
    fn open(server: &mut Server, fs: &Tmpfs, n: usize) -> DataDir {
        let path = fs.path().join(format!("data-{n}"));
        server.kill9();
        server.data_dir = path.clone();
        server.restart();
        let receiver = Receiver::start();
        let (_, key) = server.org_key(SCOPES);
        server.endpoint(&key, &receiver.url("/disk"), &["*"]);
        DataDir { n, path, receiver, key, acked: Vec::new(), cycles: 0 }
    }
}

/// What became of one data directory, checked before it is deleted.
struct DirSummary {
    n: usize,
    cycles: usize,
    acknowledged: usize,
    ready_after_restart: bool,
    after_restart: Check,
    deliveries: Deliveries,
    verified: bool,
    verify_line: String,
}

/// Every acknowledged event delivered, still there after a restart, and `verify` passes; then the
/// directory is deleted.
fn close_dir(server: &mut Server, dir: DataDir) -> DirSummary {
    let deliveries = wait_delivered(&dir.receiver, &dir.acked, DELIVERY_WAIT);
    server.terminate();
    server.restart();
    let ready_after_restart = wait_ready(server, RESUME_WAIT).is_ok();
    let after_restart = check_events(server, &dir.key, &dir.acked);
    server.kill9();
    let (verified, verify_line) = verify(&dir.path);
    let _ = std::fs::remove_dir_all(&dir.path);
    DirSummary {
        n: dir.n,
        cycles: dir.cycles,
        acknowledged: dir.acked.len(),
        ready_after_restart,
        after_restart,
        deliveries,
        verified,
        verify_line,
    }
}

/// One full-and-free cycle.
struct Cycle {
    dir: usize,
    ballast_mib: f64,
    acknowledged: usize,
    refused: u64,
    unexpected: Vec<String>,
    unexpected_count: u64,
    ready_while_full: String,
    ready_ok: bool,
    ready_seqs: String,
    /// Reads of this cycle's acknowledged events on the full disk: 200, 503, 404 and other.
    reads: [usize; 4],
    resume_ms: Option<u64>,
    /// Why not, when it did not resume.
    not_resumed: Option<String>,
    publish_after: u16,
    /// Every event acknowledged on this directory so far, read after resuming.
    after_resume: Check,
}

/// The committed and applied seqs, as `/metrics` has them.
fn seqs(server: &Server) -> String {
    let text = server.try_call("GET", "/metrics", None, None).map(|(_, t)| t).unwrap_or_else(|e| e);
    let lines: Vec<&str> = text
        .lines()
        .filter(|l| {
            l.starts_with("herald_log_committed_seq ") || l.starts_with("herald_projection_applied_seq ")
        })
        .collect();
    lines.join(", ")
}

fn disk_cycle(server: &Server, fs: &Tmpfs, dir: &mut DataDir, ballast_bytes: u64) -> Cycle {
    let ballast = fs.path().join("ballast");
    let load = Load::start(server, &dir.key, &format!("dir {} cycle {}", dir.n, dir.cycles), 8_000);
    let deadline = Instant::now() + LOAD_MAX;
    while load.tally.refused.load(Ordering::SeqCst) < REFUSALS_FULL && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    let (acked, tally) = load.finish();
    dir.cycles += 1;
    // Full: readiness says why, and reads of what was just acknowledged answer.
    let (status, ready) = server.try_call("GET", "/readyz", None, None).unwrap_or((0, String::new()));
    let ready: Value = serde_json::from_str(&ready).unwrap_or(Value::Null);
    let ready_text = ready["status"].as_str().unwrap_or("").to_owned();
    let ready_ok = status == 503 && ready_text.starts_with("the store refuses writes: ");
    // When it says something else: the two seqs it compares, as /metrics has them (NaN: the
    // applied seq could not be read).
    let ready_seqs = if ready_ok { String::new() } else { seqs(server) };
    let mut reads = [0; 4];
    for a in &acked {
        let path = format!("/v1/events/{}", a.event);
        let i = match server.try_call("GET", &path, Some(&dir.key), None) {
            Ok((200, _)) => 0,
            Ok((503, _)) => 1,
            Ok((404, _)) => 2,
            _ => 3,
        };
        reads[i] += 1;
    }
    // Space again: herald resumes by itself.
    let _ = std::fs::remove_file(&ballast);
    let free_after = fs.available();
    let resumed = wait_ready(server, RESUME_WAIT);
    let resume_ms = resumed.as_ref().ok().map(|d| ms(*d));
    let not_resumed = resumed.err().map(|last| {
        format!(
            "{} bytes free after the ballast went, {} now; last /readyz: {last}",
            free_after,
            fs.available()
        )
    });
    let mut publish_after = 0;
    let mut acknowledged = acked.len();
    dir.acked.extend(acked);
    if resume_ms.is_some() {
        let body = json!({"event_type": "faults.resumed", "payload": {"dir": dir.n}}).to_string();
        let answer = call_raw(&server.url("/v1/events"), "POST", Some(&dir.key), Some(&body), &[]);
        publish_after = answer.as_ref().map_or(0, |(s, _)| *s);
        if let Ok((202, text)) = answer {
            acknowledged += 1;
            dir.acked.push(Acked::from_answer(&text));
        }
    }
    let after_resume = check_events(server, &dir.key, &dir.acked);
    let unexpected = tally.unexpected.lock().unwrap_or_else(|e| e.into_inner()).clone();
    Cycle {
        dir: dir.n,
        ballast_mib: ballast_bytes as f64 / (1 << 20) as f64,
        acknowledged,
        refused: tally.refused.load(Ordering::SeqCst),
        unexpected,
        unexpected_count: tally.unexpected_count.load(Ordering::SeqCst),
        ready_while_full: format!("{status} {ready_text}"),
        ready_ok,
        ready_seqs,
        reads,
        resume_ms,
        not_resumed,
        publish_after,
        after_resume,
    }
}

fn disk_cycles(cycles: u64, rows: &mut Vec<Row>) -> bool {
    let started = Instant::now();
    println!();
    println!(
        "## disk full and free ({cycles} cycles, tmpfs {} MiB, ballast up to {} MiB)",
        TMPFS_BYTES >> 20,
        BALLAST_BYTES >> 20
    );
    println!();
    let fs = match Tmpfs::mount() {
        Ok(fs) => fs,
        Err(why) => {
            println!("SKIPPED: disk full and free cycles: no small filesystem to fill here: {why}");
            return true;
        }
    };
    // Dropped before the tmpfs (declared after it): herald is stopped before the unmount.
    let mut server = Server::start_with(ENV);
    let mut dirs = 1;
    let mut dir = DataDir::open(&mut server, &fs, dirs);
    let (mut done, mut summaries) = (Vec::<Cycle>::new(), Vec::new());
    for _ in 0..cycles {
        // Room for the ballast and for herald to fill; a directory that leaves too little is
        // checked and deleted, and the next cycle starts on a fresh one.
        let mut ballast_bytes = BALLAST_BYTES.min(fs.available().saturating_sub(FILL_ROOM_BYTES));
        let fits =
            ballast_bytes >= BALLAST_MIN_BYTES && write_ballast(&fs.path().join("ballast"), ballast_bytes);
        if !fits {
            summaries.push(close_dir(&mut server, dir));
            dirs += 1;
            dir = DataDir::open(&mut server, &fs, dirs);
            ballast_bytes = BALLAST_BYTES.min(fs.available().saturating_sub(FILL_ROOM_BYTES));
            assert!(
                write_ballast(&fs.path().join("ballast"), ballast_bytes),
                "no room for the ballast on a fresh tmpfs"
            );
        }
        let cycle = disk_cycle(&server, &fs, &mut dir, ballast_bytes);
        eprintln!(
            "disk: cycle {} on dir {}: {} acknowledged, resumed in {:?} ms",
            done.len() + 1,
            cycle.dir,
            cycle.acknowledged,
            cycle.resume_ms
        );
        let stuck = cycle.resume_ms.is_none();
        done.push(cycle);
        if stuck {
            // Herald did not resume: the next cycles would say nothing more.
            break;
        }
    }
    summaries.push(close_dir(&mut server, dir));
    drop(server);
    drop(fs);

    println!("| cycle | dir | ballast MiB | acknowledged | 503s | other answers | /readyz while full | reads while full 200/503/404/other | resume ms | publish after | lost | unreadable |");
    println!("| ---: | ---: | ---: | ---: | ---: | ---: | --- | --- | ---: | ---: | ---: | ---: |");
    for (i, c) in done.iter().enumerate() {
        println!(
            "| {} | {} | {:.1} | {} | {} | {} | {}{} | {}/{}/{}/{} | {} | {} | {} | {} |",
            i + 1,
            c.dir,
            c.ballast_mib,
            c.acknowledged,
            c.refused,
            c.unexpected_count,
            if c.ready_ok { "" } else { "WRONG: " },
            c.ready_while_full.chars().take(90).collect::<String>(),
            c.reads[0],
            c.reads[1],
            c.reads[2],
            c.reads[3],
            c.resume_ms.map_or("NO RESUME".to_owned(), |m| m.to_string()),
            c.publish_after,
            c.after_resume.lost.len(),
            c.after_resume.unreadable.len()
        );
    }
    println!();
    println!("| dir | cycles | acknowledged | lost after a restart | unreadable after a restart | undelivered | duplicated | verify |");
    println!("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |");
    for s in &summaries {
        println!(
            "| {} | {} | {} | {} | {} | {} | {} | {} |",
            s.n,
            s.cycles,
            s.acknowledged,
            s.after_restart.lost.len(),
            s.after_restart.unreadable.len(),
            s.deliveries.undelivered.len(),
            s.deliveries.duplicated,
            if s.verified { "passed" } else { "FAILED" }
        );
    }
    let resumes: Vec<u64> = done.iter().filter_map(|c| c.resume_ms).collect();
    let acknowledged: usize = done.iter().map(|c| c.acknowledged).sum();
    // Events, each counted once however often it was checked.
    let events = |f: &dyn Fn(&Check) -> &Vec<String>| -> HashSet<String> {
        done.iter()
            .map(|c| f(&c.after_resume))
            .chain(summaries.iter().map(|s| f(&s.after_restart)))
            .flatten()
            .map(|l| l.split(':').next().unwrap_or("").to_owned())
            .collect()
    };
    let lost = events(&|c| &c.lost);
    let unreadable = events(&|c| &c.unreadable);
    let undelivered: usize = summaries.iter().map(|s| s.deliveries.undelivered.len()).sum();
    let not_resumed = done.iter().filter(|c| c.resume_ms.is_none() || c.publish_after != 202).count()
        + summaries.iter().filter(|s| !s.ready_after_restart).count();
    let wrong_ready = done.iter().filter(|c| !c.ready_ok).count();
    let not_full = done.iter().filter(|c| c.refused < REFUSALS_FULL).count();
    let unexpected: u64 = done.iter().map(|c| c.unexpected_count).sum();
    let not_found_while_full: usize = done.iter().map(|c| c.reads[2]).sum();
    let verify_failed = summaries.iter().filter(|s| !s.verified).count();
    println!();
    println!(
        "totals: {} cycles on {} directories, {acknowledged} acknowledged, {} lost, {} unreadable, {undelivered} undelivered, \
         resume ms min {} / mean {:.0} / max {}, cycles not resumed {not_resumed}, /readyz wrong while full \
         {wrong_ready}, never full {not_full}, answers neither 202 nor 503 {unexpected}, acknowledged events \
         not found while full {not_found_while_full}, verify failed {verify_failed}; {:.1} s",
        done.len(),
        summaries.len(),
        lost.len(),
        unreadable.len(),
        resumes.iter().min().unwrap_or(&0),
        resumes.iter().sum::<u64>() as f64 / resumes.len().max(1) as f64,
        resumes.iter().max().unwrap_or(&0),
        started.elapsed().as_secs_f64()
    );
    for s in &summaries {
        println!("verify dir {}: {}", s.n, s.verify_line);
        if !s.ready_after_restart {
            println!("  dir {}: /readyz did not answer 200 within {RESUME_WAIT:?} of a restart", s.n);
        }
        print_some("lost after a restart", &s.after_restart.lost);
        print_some("unreadable after a restart", &s.after_restart.unreadable);
        print_some("undelivered", &s.deliveries.undelivered);
    }
    for (i, c) in done.iter().enumerate() {
        if !c.ready_ok {
            println!(
                "  cycle {}: /readyz while full: {}; /metrics then: {}",
                i + 1,
                c.ready_while_full,
                c.ready_seqs
            );
        }
        if let Some(why) = &c.not_resumed {
            println!("  cycle {}: NOT RESUMED within {RESUME_WAIT:?}: {why}", i + 1);
        }
        print_some("lost after resuming", &c.after_resume.lost);
        print_some("unreadable after resuming", &c.after_resume.unreadable);
        print_some("unexpected answer", &c.unexpected);
    }

    let n = done.len();
    rows.push(info_row(format!("disk full × {n}: acknowledged"), acknowledged as f64, "events"));
    rows.push(zero_row(format!("disk full × {n}: lost"), lost.len()));
    rows.push(zero_row(format!("disk full × {n}: unreadable after resuming"), unreadable.len()));
    rows.push(zero_row(format!("disk full × {n}: undelivered"), undelivered));
    rows.push(zero_row(format!("disk full × {n}: not resumed without a restart"), not_resumed));
    rows.push(zero_row(format!("disk full × {n}: /readyz not saying why while full"), wrong_ready));
    rows.push(zero_row(format!("disk full × {n}: answers neither 202 nor 503"), unexpected as usize));
    rows.push(zero_row(format!("disk full × {n}: verify failed"), verify_failed));
    rows.push(info_row(
        format!("disk full × {n}: time to resume, mean"),
        resumes.iter().sum::<u64>() as f64 / resumes.len().max(1) as f64,
        "ms",
    ));
    lost.is_empty()
        && unreadable.is_empty()
        && undelivered == 0
        && not_resumed == 0
        && wrong_ready == 0
        && not_full == 0
        && unexpected == 0
        && verify_failed == 0
}

/// Both parts; true when nothing failed. Every server, receiver and mount is dropped inside.
fn run() -> bool {
    let rounds = env_count("HERALD_FAULTS_KILL_ROUNDS", 200);
    let cycles = env_count("HERALD_FAULTS_DISK_CYCLES", 20);
    let seed = env_count(
        "HERALD_FAULTS_SEED",
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(1, |d| d.as_nanos() as u64),
    );
    let mut rows = Vec::new();
    let killed_ok = rounds == 0 || kill_rounds(rounds, seed, &mut rows);
    let disk_ok = cycles == 0 || disk_cycles(cycles, &mut rows);
    println!();
    report(&rows);
    killed_ok && disk_ok
}

fn main() {
    if !run() {
        eprintln!("faults: FAILED (see the tables above)");
        std::process::exit(1);
    }
}
