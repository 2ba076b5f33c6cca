//! The cluster harness: a NATS cluster of real `nats-server -js` processes (herald_cluster's
//! `NatsCluster`) and herald nodes as real `herald serve` processes in cluster mode on 127.0.0.1,
//! each with its own data directory and port; what the tests read back beside the API (the
//! leases in `herald-owners`, every partition's stream with its hash chain); a steady publish
//! load through every node that keeps what was acknowledged; and a hard time bound per test.
//! Every process started here is stopped by PID: when its handle drops, or by the time bound.
//!
//! Used by `tests/e2e_cluster.rs` and `benches/cluster.rs`, which both name the plain harness
//! (`tests/common/mod.rs`) `harness`.

#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use herald_cluster::partition::CONTROL_LEASE_KEY;
use herald_cluster::testing::{free_port, NatsCluster};
use herald_cluster::{lease_key, Lease, PartitionStream, StreamSettings, OWNERS_BUCKET};
use herald_log::Record;
use herald_projector::{Event, OrgId};
use serde_json::{json, Value};

use crate::harness::{call_raw_within, Receiver, ADMIN_KEY, ORG_SCOPES, TEST_ENV};

/// The secret the nodes authenticate forwarded requests with.
pub const SECRET: &str = "e2e-cluster-secret-0123456789abcdef";
/// How long a request of the harness waits for its answer (a stopped node never answers).
pub const ANSWER_WITHIN: Duration = Duration::from_secs(5);

/// The PIDs a test started and has not stopped yet, for the time bound to kill.
#[derive(Clone, Default)]
pub struct Pids(Arc<Mutex<HashSet<u32>>>);

impl Pids {
    fn add(&self, pid: u32) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).insert(pid);
    }

    fn remove(&self, pid: u32) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).remove(&pid);
    }

    /// SIGKILL to every process still listed (a stopped one dies too).
    fn kill_all(&self) {
        for pid in self.0.lock().unwrap_or_else(|e| e.into_inner()).drain() {
            // SAFETY: kill(2) on a PID this test started and has not reaped; no memory is touched.
            unsafe {
                libc::kill(pid as i32, libc::SIGKILL);
            }
        }
    }
}

/// One cluster test at a time (each runs six or more processes on a small machine, and their
/// leases are timed).
static SERIAL: Mutex<()> = Mutex::new(());

/// Runs `test` under a hard time bound: past `limit` every process it started is killed by PID
/// and the test fails naming the bound. Cluster tests run one at a time.
pub fn bounded(name: &str, limit: Duration, test: impl FnOnce(Pids) + Send + 'static) {
    let _one_at_a_time = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let pids = Pids::default();
    let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
    let theirs = pids.clone();
    let handle = std::thread::Builder::new()
        .name(name.to_owned())
        .spawn(move || {
            // Dropped when the test returns or panics: either way the wait below ends.
            let _done = done_tx;
            test(theirs);
        })
        .expect("cannot start the test's thread");
    match done_rx.recv_timeout(limit) {
        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
            pids.kill_all();
            panic!("{name}: not done within {limit:?}; every process it started was killed by PID");
        }
        _ => {
            // A test that ended, even by a panic, has dropped its processes (killed and reaped
            // by PID): none is left to kill, and a reaped PID may be another process's by now.
            if let Err(panic) = handle.join() {
                std::panic::resume_unwind(panic);
            }
        }
    }
}

/// A request's status and body text, or why it got no answer.
pub type Answer = Result<(u16, String), String>;

/// A `herald serve` in cluster mode.
pub struct HeraldNode {
    pub id: String,
    pub port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
    env: Vec<(String, String)>,
    pids: Pids,
    stopped: bool,
}

/// The settings every node of a test cluster gets (before the test's own): the test servers'
/// and cluster mode's.
fn node_env(id: &str, port: u16, nats_url: &str, partitions: u32, lease: Duration) -> Vec<(String, String)> {
    let lease_ms = format!("{}ms", lease.as_millis());
    let cluster = [
        ("HERALD_CLUSTER_NATS_URL", nats_url),
        ("HERALD_CLUSTER_NODE_ID", id),
        ("HERALD_CLUSTER_ADVERTISE", &format!("http://127.0.0.1:{port}")),
        ("HERALD_CLUSTER_PARTITIONS", &partitions.to_string()),
        ("HERALD_CLUSTER_REPLICAS", "3"),
        ("HERALD_CLUSTER_LEASE", &lease_ms),
        ("HERALD_CLUSTER_CLUSTER_SECRET", SECRET),
    ];
    TEST_ENV.iter().chain(cluster.iter()).map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

impl HeraldNode {
    fn launch(id: &str, env: Vec<(String, String)>, port: u16, pids: &Pids) -> HeraldNode {
        let dir = tempfile::tempdir().expect("no temp dir");
        let mut node =
            HeraldNode { id: id.to_owned(), port, dir, child: None, env, pids: pids.clone(), stopped: false };
        node.spawn();
        node
    }

    fn stderr_path(&self) -> PathBuf {
        self.dir.path().join("herald.stderr")
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.stderr_path())
            .expect("cannot open the node's stderr file");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_herald"));
        cmd.args(["serve", "--listen", &format!("127.0.0.1:{}", self.port)])
            .arg("--data-dir")
            .arg(self.data_dir())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().expect("cannot start herald");
        self.pids.add(child.id());
        self.child = Some(child);
        self.stopped = false;
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Running and not stopped.
    pub fn serving(&self) -> bool {
        self.child.is_some() && !self.stopped
    }

    /// SIGKILL, waited for.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            self.pids.remove(c.id());
            let _ = c.kill();
            let _ = c.wait();
        }
        self.stopped = false;
    }

    fn signal(&self, signal: i32) {
        let pid = self.pid().expect("the node is not running");
        // SAFETY: kill(2) with a PID this harness started and has not reaped.
        let rc = unsafe { libc::kill(pid as i32, signal) };
        assert_eq!(rc, 0, "kill({pid}, {signal}) failed");
    }

    /// SIGSTOP: the process stays, frozen (its connections open, its timers stopped).
    pub fn sigstop(&mut self) {
        self.signal(libc::SIGSTOP);
        self.stopped = true;
    }

    /// SIGCONT after [`HeraldNode::sigstop`].
    pub fn sigcont(&mut self) {
        self.signal(libc::SIGCONT);
        self.stopped = false;
    }

    /// Starts the node again on its port and data directory (after [`HeraldNode::kill9`]).
    pub fn restart(&mut self) {
        self.kill9();
        self.spawn();
        self.wait_answering();
    }

    /// Waits until `/healthz` answers 200; panics if herald exits or takes longer than 30 s.
    pub fn wait_answering(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok((200, _)) = self.text("GET", "/healthz", None, None) {
                return;
            }
            if let Some(Ok(Some(status))) = self.child.as_mut().map(|c| c.try_wait()) {
                panic!("node {} exited during start: {status}\n{}", self.id, self.log_tail(40));
            }
            assert!(
                Instant::now() < deadline,
                "node {} did not answer /healthz\n{}",
                self.id,
                self.log_tail(40)
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// A request; the answer's status and text, or the transport error.
    pub fn text(&self, method: &str, path: &str, key: Option<&str>, body: Option<&str>) -> Answer {
        call_raw_within(&self.url(path), method, key, body, &[], ANSWER_WITHIN)
    }

    /// A request whose transport must work; the status and the JSON body (`Null` when none).
    pub fn call(&self, method: &str, path: &str, key: Option<&str>, body: Option<Value>) -> (u16, Value) {
        let body = body.map(|b| b.to_string());
        match self.text(method, path, key, body.as_deref()) {
            Ok((status, text)) => (status, serde_json::from_str(&text).unwrap_or(Value::Null)),
            Err(e) => panic!("{method} {path} through {}: {e}", self.id),
        }
    }

    /// `/readyz`: Ok when 200, else the status and body.
    pub fn ready(&self) -> Result<(), String> {
        match self.text("GET", "/readyz", None, None) {
            Ok((200, _)) => Ok(()),
            Ok((status, body)) => Err(format!("{status} {body}")),
            Err(e) => Err(e),
        }
    }

    /// The partitions the node serves now, by its `/metrics` (each served partition's series
    /// carry `partition="<N or control>"`); `None` when it does not answer.
    pub fn served(&self) -> Option<BTreeSet<String>> {
        let (status, text) = self.text("GET", "/metrics", None, None).ok()?;
        if status != 200 {
            return None;
        }
        let labels = text.lines().filter(|l| !l.starts_with('#')).filter_map(|l| {
            let rest = &l[l.find("partition=\"")? + "partition=\"".len()..];
            Some(rest[..rest.find('"')?].to_owned())
        });
        Some(labels.collect())
    }

    /// The last `lines` lines herald wrote to stderr (every start of it).
    /// The lines of each request answered with an error (herald's request-id layer logs them)
    /// are left out: under a load they would hide the rest.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(self.stderr_path()).unwrap_or_default();
        let tail: Vec<&str> =
            text.lines().rev().filter(|l| !l.contains("herald_server::request_id")).take(lines).collect();
        format!(
            "--- {} (stderr, last {lines} lines)\n{}",
            self.id,
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        )
    }

    /// CPU seconds (user + system) the process has used, from `/proc/<pid>/stat`.
    pub fn cpu_seconds(&self) -> f64 {
        self.pid().map_or(0.0, cpu_seconds_of)
    }
}

impl Drop for HeraldNode {
    fn drop(&mut self) {
        self.kill9();
        // A failing test shows what each node logged last.
        if std::thread::panicking() {
            eprintln!("{}", self.log_tail(60));
        }
    }
}

/// CPU seconds (utime + stime) of process `pid` so far, 0 when it is gone.
pub fn cpu_seconds_of(pid: u32) -> f64 {
    // SAFETY: sysconf takes no pointer and only reads a configuration value.
    let tick = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { return 0.0 };
    let Some(close) = stat.rfind(')') else { return 0.0 };
    let fields: Vec<&str> = stat[close + 1..].split_whitespace().collect();
    // After the name: state is the 1st field, utime and stime the 12th and 13th.
    let ticks: u64 = fields.get(11..13).into_iter().flatten().filter_map(|f| f.parse::<u64>().ok()).sum();
    ticks as f64 / tick
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // A failing test shows what the NATS servers logged last (each node shows its own).
        if std::thread::panicking() {
            eprintln!("{}", self.nats.logs());
        }
    }
}

/// A NATS cluster and the herald nodes on it.
pub struct Cluster {
    pub nodes: Vec<HeraldNode>,
    pub nats: NatsCluster,
    pub partitions: u32,
    pub lease: Duration,
    pids: Pids,
    extra_env: Vec<(String, String)>,
    js: async_nats::jetstream::Context,
    rt: tokio::runtime::Runtime,
}

impl Cluster {
    /// Three `nats-server -js` in one cluster and `herald_nodes` nodes (`n1`, `n2`, ...), each
    /// answering `/healthz`; `extra_env` goes to every node after the defaults.
    pub fn start(
        pids: &Pids,
        herald_nodes: usize,
        partitions: u32,
        lease: Duration,
        extra_env: &[(&str, &str)],
    ) -> Cluster {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("a tokio runtime for the NATS client");
        let nats = rt.block_on(NatsCluster::start(3));
        for i in 0..3 {
            pids.add(nats.pid(i).expect("a NATS server runs"));
        }
        let js = rt.block_on(async {
            let client = async_nats::ConnectOptions::new()
                .connection_timeout(Duration::from_secs(2))
                .connect(nats.addrs())
                .await
                .expect("the harness connects to NATS");
            async_nats::jetstream::new(client)
        });
        let extra_env = extra_env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let mut cluster =
            Cluster { nodes: Vec::new(), nats, partitions, lease, pids: pids.clone(), extra_env, js, rt };
        for _ in 0..herald_nodes {
            cluster.add_node();
        }
        cluster
    }

    /// Every NATS server's client URL, comma-separated (what a node is given).
    pub fn nats_url(&self) -> String {
        (0..3).map(|i| self.nats.url(i)).collect::<Vec<_>>().join(",")
    }

    /// Starts one more node (`n<k>`), waits until it answers `/healthz`; returns its index.
    pub fn add_node(&mut self) -> usize {
        let id = format!("n{}", self.nodes.len() + 1);
        let port = free_port();
        let mut env = node_env(&id, port, &self.nats_url(), self.partitions, self.lease);
        for (k, v) in &self.extra_env {
            env.retain(|(name, _)| name != k);
            env.push((k.clone(), v.clone()));
        }
        let mut node = HeraldNode::launch(&id, env, port, &self.pids);
        node.wait_answering();
        self.nodes.push(node);
        self.nodes.len() - 1
    }

    /// Waits until the cluster is settled: every serving node's `/readyz` is 200, and the leases
    /// show every partition (the control one too) held by a serving node, none over its fair
    /// share (a node over it is still to hand some back, and a partition handed back is unserved
    /// for a moment), the same holders for a whole lease (each node routes by its own look at
    /// the leases, taken every third of one); panics after `within` with each node's answer.
    pub fn wait_ready(&self, within: Duration) {
        let deadline = Instant::now() + within;
        let mut steady: Option<(Vec<(String, u64)>, Instant)> = None;
        loop {
            let answers: Vec<(String, Result<(), String>)> =
                self.nodes.iter().filter(|n| n.serving()).map(|n| (n.id.clone(), n.ready())).collect();
            let holders = self.balanced(answers.len()).filter(|_| answers.iter().all(|(_, r)| r.is_ok()));
            steady = match (holders, steady) {
                (Some(now), Some((was, since))) if now == was => {
                    if since.elapsed() >= self.lease {
                        return;
                    }
                    Some((was, since))
                }
                (Some(now), _) => Some((now, Instant::now())),
                (None, _) => None,
            };
            if Instant::now() > deadline {
                panic!(
                    "the cluster was not ready within {within:?}: {answers:?}\nleases: {:?}\n{}",
                    self.leases(),
                    self.logs()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Each partition's (data and control) holder and epoch, when every one has a live lease
    /// held by a serving node and none of `serving` nodes holds more than
    /// `ceil((partitions + 1) / serving)`.
    fn balanced(&self, serving: usize) -> Option<Vec<(String, u64)>> {
        let now = unix_ms();
        let ids: HashSet<&str> = self.nodes.iter().filter(|n| n.serving()).map(|n| n.id.as_str()).collect();
        let leases = self.leases();
        let mut held: HashMap<&str, u32> = HashMap::new();
        let mut holders = Vec::new();
        for p in 0..=self.partitions {
            let l = leases.get(&p).filter(|l| l.lease_until_ms >= now && ids.contains(l.node_id.as_str()))?;
            *held.entry(l.node_id.as_str()).or_default() += 1;
            holders.push((l.node_id.clone(), l.epoch));
        }
        let share = (self.partitions + 1).div_ceil(serving.max(1) as u32);
        held.values().all(|n| *n <= share).then_some(holders)
    }

    /// Every node's log tail and the NATS servers', for a failing test's message.
    pub fn logs(&self) -> String {
        let nodes: Vec<String> = self.nodes.iter().map(|n| n.log_tail(30)).collect();
        format!("{}\n{}", nodes.join("\n"), self.nats.logs())
    }

    /// A serving node other than `except`, the first one.
    pub fn other(&self, except: usize) -> &HeraldNode {
        self.nodes
            .iter()
            .enumerate()
            .find(|(i, n)| *i != except && n.serving())
            .map(|(_, n)| n)
            .expect("no other serving node")
    }

    /// The leases in `herald-owners`: partition number (the control partition as
    /// `partitions`) to its lease, for those that ever had one.
    pub fn leases(&self) -> BTreeMap<u32, Lease> {
        self.rt.block_on(async {
            let mut out = BTreeMap::new();
            let Ok(bucket) = self.js.get_key_value(OWNERS_BUCKET).await else { return out };
            for p in 0..=self.partitions {
                let key = if p == self.partitions { CONTROL_LEASE_KEY.to_owned() } else { lease_key(p) };
                if let Ok(Some(entry)) = bucket.entry(key).await {
                    if let Ok(lease) = serde_json::from_slice::<Lease>(&entry.value) {
                        out.insert(p, lease);
                    }
                }
            }
            out
        })
    }

    /// The partitions whose lease `node_id` holds now (not passed, not released).
    pub fn held_by(&self, node_id: &str) -> Vec<u32> {
        let now = unix_ms();
        self.leases()
            .into_iter()
            .filter(|(_, l)| l.node_id == node_id && l.lease_until_ms >= now)
            .map(|(p, _)| p)
            .collect()
    }

    /// Data partition `partition`'s stream, message by message, each as its records.
    pub fn stream_messages(&self, partition: u32) -> Vec<Vec<Record>> {
        self.rt.block_on(async {
            let stream = PartitionStream::open(self.js.clone(), partition, StreamSettings::default())
                .await
                .unwrap_or_else(|e| panic!("opening partition {partition}'s stream: {e}"));
            herald_cluster::testing::messages(&stream).await
        })
    }

    /// Checks data partition `partition`'s stream is one line: its records' seqs run from 1
    /// without a gap or a repeat, each `prev_hash` is the record before's `hash`, every record
    /// decodes, and its `PartitionClaimed` epochs only grow. Returns its claims, in order.
    pub fn check_stream(&self, partition: u32) -> StreamCheck {
        let messages = self.stream_messages(partition);
        let mut claims = Vec::new();
        let mut previous: Option<&Record> = None;
        let mut records = 0u64;
        for (m, message) in messages.iter().enumerate() {
            assert!(!message.is_empty(), "partition {partition}: stream message {} holds no record", m + 1);
            for record in message {
                records += 1;
                match previous {
                    None => assert_eq!(
                        record.seq, 1,
                        "partition {partition}: the stream starts at seq {}",
                        record.seq
                    ),
                    Some(p) => {
                        assert_eq!(
                            record.seq,
                            p.seq + 1,
                            "partition {partition}: stream message {} holds seq {} after seq {}: two writers?",
                            m + 1,
                            record.seq,
                            p.seq
                        );
                        assert_eq!(
                            record.prev_hash,
                            p.hash,
                            "partition {partition}: seq {} does not chain to seq {} (message {})",
                            record.seq,
                            p.seq,
                            m + 1
                        );
                    }
                }
                let (_, event) = herald_projector::decode_recorded(&record.body).unwrap_or_else(|e| {
                    panic!("partition {partition}: seq {} does not decode: {e}", record.seq)
                });
                if let Event::PartitionClaimed { node_id, epoch } = event {
                    if let Some((_, last, _)) = claims.last() {
                        assert!(
                            epoch > *last,
                            "partition {partition}: PartitionClaimed by {node_id} at seq {} has epoch {epoch}, \
                             not above the claim before's {last}",
                            record.seq
                        );
                    }
                    claims.push((node_id, epoch, record.seq));
                }
                previous = Some(record);
            }
        }
        StreamCheck { messages: messages.len() as u64, records, claims }
    }

    /// Each of herald's streams as JetStream tells it now (leader, peers, last sequence), or why
    /// it could not; with whether every one has a leader and every replica current.
    pub fn stream_states(&self) -> (bool, String) {
        let mut names: Vec<String> =
            (0..self.partitions).map(herald_cluster::partition::stream_name).collect();
        names.extend(["HERALD_CONTROL", "KV_herald-owners", "KV_herald-nodes"].map(String::from));
        self.rt.block_on(async {
            let mut out = Vec::new();
            let mut all_current = true;
            for name in names {
                let asked = async {
                    let info =
                        self.js.get_stream(&name).await.map_err(|e| e.to_string())?.cached_info().clone();
                    let cluster = info.cluster.unwrap_or_default();
                    let current = cluster.leader.is_some() && cluster.replicas.iter().all(|p| p.current);
                    let peers: Vec<String> = cluster
                        .replicas
                        .iter()
                        .map(|p| format!("{}{}", p.name, if p.current { "" } else { " (not current)" }))
                        .collect();
                    let text = format!(
                        "leader {:?}, replicas {peers:?}, last seq {}",
                        cluster.leader, info.state.last_sequence
                    );
                    Ok::<_, String>((current, text))
                };
                let (current, state) = match tokio::time::timeout(Duration::from_secs(2), asked).await {
                    Ok(Ok(answer)) => answer,
                    Ok(Err(e)) => (false, e),
                    Err(_) => (false, "no answer within 2 s".into()),
                };
                all_current &= current;
                out.push(format!("{name}: {state}"));
            }
            (all_current, out.join("\n"))
        })
    }

    /// Waits until every herald stream has a leader and all its replicas current (a NATS
    /// server started again has caught up); panics after `within` with their states.
    pub fn wait_streams_current(&self, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            let (current, states) = self.stream_states();
            if current {
                return;
            }
            assert!(Instant::now() < deadline, "streams not current within {within:?}:\n{states}");
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// `kill -9` of NATS server `i`.
    pub fn kill_nats(&mut self, i: usize) {
        if let Some(pid) = self.nats.pid(i) {
            self.pids.remove(pid);
        }
        self.nats.kill(i);
    }

    /// Starts NATS server `i` again and waits until JetStream answers with every server in.
    pub fn restart_nats(&mut self, i: usize) {
        self.nats.restart(i);
        self.pids.add(self.nats.pid(i).expect("the NATS server runs"));
        self.rt.block_on(self.nats.wait_ready());
    }

    /// One organisation per data partition, each with a key of every org scope and one
    /// endpoint (every event type) at `receiver`'s `/t<partition>`, set up through `through`.
    pub fn tenants(&self, through: usize, receiver: &Receiver) -> Vec<Tenant> {
        let node = &self.nodes[through];
        (0..self.partitions)
            .map(|partition| {
                let org = org_in_partition(partition, self.partitions);
                let key = make_key(node, &org);
                let (status, endpoint) = node.call(
                    "POST",
                    "/v1/endpoints",
                    Some(&key),
                    Some(json!({"url": receiver.url(&format!("/t{partition}")), "enabled_events": ["*"]})),
                );
                assert_eq!(status, 201, "endpoint of partition {partition} through {}: {endpoint}", node.id);
                let endpoint = endpoint["id"].as_str().expect("an endpoint id").to_owned();
                Tenant { org, key, partition, endpoint }
            })
            .collect()
    }
}

/// A key of every org scope for `org`, made through `node`.
pub fn make_key(node: &HeraldNode, org: &str) -> String {
    let (status, body) = node.call(
        "POST",
        "/v1/api_keys",
        Some(ADMIN_KEY),
        Some(json!({"org_id": org, "scopes": ORG_SCOPES, "name": "e2e cluster"})),
    );
    assert_eq!(status, 201, "a key for {org} through {}: {body}", node.id);
    body["key"].as_str().expect("no key").to_owned()
}

/// What [`Cluster::check_stream`] found: messages, records and each claim (node, epoch, seq).
#[derive(Debug)]
pub struct StreamCheck {
    pub messages: u64,
    pub records: u64,
    pub claims: Vec<(String, u64, u64)>,
}

/// Unix milliseconds now.
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// A new organisation id (UUID v7) that lives in `partition` of `partitions`.
pub fn org_in_partition(partition: u32, partitions: u32) -> String {
    loop {
        let id = uuid::Uuid::now_v7();
        if herald_cluster::partition::partition_of(&OrgId(id), partitions) == partition {
            return id.to_string();
        }
    }
}

/// An organisation of one partition, with its key and its one endpoint.
#[derive(Debug, Clone)]
pub struct Tenant {
    pub org: String,
    pub key: String,
    pub partition: u32,
    pub endpoint: String,
}

/// An acknowledged (202) publish.
#[derive(Debug, Clone)]
pub struct Acked {
    pub event: String,
    pub delivery: String,
    /// Index into the tenants.
    pub tenant: usize,
    /// When the 202 came.
    pub at: Instant,
    /// How long the publish took.
    pub took: Duration,
}

/// A publish that got no answer (refused connection, time out): [`Refusals`]' key for it.
pub const TRANSPORT: &str = "transport";

/// What a load's publishes got besides 202, by answer ("503", "transport", "400 ...").
pub type Refusals = BTreeMap<String, u64>;

/// Publishers posting to every tenant through every target node, round robin, until stopped.
pub struct Load {
    stop: Arc<AtomicBool>,
    acked: Arc<Mutex<Vec<Acked>>>,
    refused: Arc<Mutex<Refusals>>,
    /// Targets passed over, by index.
    skip: Arc<Mutex<HashSet<usize>>>,
    threads: Vec<JoinHandle<()>>,
}

impl Load {
    /// `threads` publishers over `targets` (node base URLs), each waiting `pause` between two
    /// publishes; a publish that fails is simply not acknowledged.
    pub fn start(targets: Vec<String>, tenants: Arc<Vec<Tenant>>, threads: usize, pause: Duration) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let acked = Arc::new(Mutex::new(Vec::new()));
        let refused = Arc::new(Mutex::new(BTreeMap::new()));
        let targets = Arc::new(targets);
        let skip = Arc::new(Mutex::new(HashSet::new()));
        let threads = (0..threads)
            .map(|t| {
                let (stop, acked, refused, skip) =
                    (stop.clone(), acked.clone(), refused.clone(), skip.clone());
                let (targets, tenants) = (targets.clone(), tenants.clone());
                std::thread::spawn(move || {
                    // Each publisher starts elsewhere along the tenants and the targets; a target
                    // that gave no answer (killed, stopped) is passed over for a second.
                    let mut n = t * 7919;
                    let mut down_until = vec![Instant::now(); targets.len()];
                    while !stop.load(Ordering::SeqCst) {
                        n += 1;
                        let tenant = n % tenants.len();
                        let first = (n / tenants.len() + t) % targets.len();
                        let skipped = skip.lock().unwrap_or_else(|e| e.into_inner()).clone();
                        let target = (0..targets.len())
                            .map(|k| (first + k) % targets.len())
                            .find(|&k| down_until[k] <= Instant::now() && !skipped.contains(&k))
                            .unwrap_or(first);
                        match publish_once(&targets[target], &tenants[tenant], tenant, n) {
                            Ok(a) => acked.lock().unwrap_or_else(|e| e.into_inner()).push(a),
                            Err(why) => {
                                if why == TRANSPORT {
                                    down_until[target] = Instant::now() + Duration::from_secs(1);
                                }
                                *refused.lock().unwrap_or_else(|e| e.into_inner()).entry(why).or_default() +=
                                    1;
                                std::thread::sleep(Duration::from_millis(10));
                            }
                        }
                        std::thread::sleep(pause);
                    }
                })
            })
            .collect();
        Load { stop, acked, refused, skip, threads }
    }

    /// Publishes through target `i` no more (a node the test stopped) until [`Load::resume`].
    pub fn pass_over(&self, i: usize) {
        self.skip.lock().unwrap_or_else(|e| e.into_inner()).insert(i);
    }

    /// Publishes through target `i` again.
    pub fn resume(&self, i: usize) {
        self.skip.lock().unwrap_or_else(|e| e.into_inner()).remove(&i);
    }

    pub fn acked_count(&self) -> usize {
        self.acked.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// The acknowledged publishes so far.
    pub fn acked(&self) -> Vec<Acked> {
        self.acked.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Waits until `n` more publishes than now are acknowledged, each for a tenant of
    /// `partitions` (any when empty), answered after now; panics after `within`.
    pub fn wait_more(&self, n: usize, partitions: &[u32], tenants: &[Tenant], within: Duration) -> Duration {
        let since = Instant::now();
        loop {
            let got = self
                .acked()
                .iter()
                .filter(|a| a.at > since)
                .filter(|a| partitions.is_empty() || partitions.contains(&tenants[a.tenant].partition))
                .count();
            if got >= n {
                return since.elapsed();
            }
            assert!(
                since.elapsed() < within,
                "only {got} of {n} publishes acknowledged within {within:?}; refused so far: {:?}",
                self.refused()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn refused(&self) -> Refusals {
        self.refused.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Stops the publishers; returns what was acknowledged and what was refused.
    pub fn stop(self) -> (Vec<Acked>, Refusals) {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads {
            t.join().expect("a publisher panicked");
        }
        let acked = std::mem::take(&mut *self.acked.lock().unwrap_or_else(|e| e.into_inner()));
        let refused = std::mem::take(&mut *self.refused.lock().unwrap_or_else(|e| e.into_inner()));
        (acked, refused)
    }
}

/// One publish for `tenant` through `target`: acknowledged, or why not.
fn publish_once(target: &str, tenant: &Tenant, index: usize, n: usize) -> Result<Acked, String> {
    let body =
        json!({"event_type": "cluster.load", "payload": {"n": n, "partition": tenant.partition}}).to_string();
    let started = Instant::now();
    let url = format!("{target}/v1/events");
    match call_raw_within(&url, "POST", Some(&tenant.key), Some(&body), &[], ANSWER_WITHIN) {
        Ok((202, text)) => {
            let v: Value = serde_json::from_str(&text).map_err(|e| format!("202 not JSON: {e}"))?;
            let deliveries = v["delivery_ids"].as_array().cloned().unwrap_or_default();
            let (Some(event), [delivery]) = (v["id"].as_str(), deliveries.as_slice()) else {
                return Err(format!("202 without one delivery: {v}"));
            };
            Ok(Acked {
                event: event.to_owned(),
                delivery: delivery.as_str().unwrap_or_default().to_owned(),
                tenant: index,
                at: Instant::now(),
                took: started.elapsed(),
            })
        }
        Ok((status, text)) if status >= 500 => {
            let why: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
            Err(format!("{status} {}", why["error"].as_str().unwrap_or_default()))
        }
        Ok((status, text)) => Err(format!("{status} {text}")),
        Err(_) => Err(TRANSPORT.to_owned()),
    }
}

/// What became of the acknowledged publishes.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Counts {
    pub acknowledged: usize,
    /// Acknowledged, yet the API answers 404 for the event (or another delivery).
    pub lost: usize,
    /// Acknowledged, yet never reached the receiver.
    pub undelivered: usize,
    /// Reached the receiver more than once (allowed: at least once).
    pub duplicated: usize,
}

/// Reckons `acked` against the API (each event read back through the serving nodes in turn)
/// and the receiver (each event's `webhook-id`), waiting up to `within` for the deliveries;
/// returns the counts and the first problems found, named.
pub fn reckon(
    cluster: &Cluster,
    tenants: &[Tenant],
    acked: &[Acked],
    receiver: &Receiver,
    within: Duration,
) -> (Counts, Vec<String>) {
    let deadline = Instant::now() + within;
    let wanted: HashSet<&str> = acked.iter().map(|a| a.event.as_str()).collect();
    let mut seen: HashMap<String, usize> = HashMap::new();
    loop {
        seen.clear();
        for r in receiver.received() {
            *seen.entry(r.header("webhook-id").to_owned()).or_default() += 1;
        }
        if wanted.iter().all(|e| seen.contains_key(*e)) || Instant::now() > deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let serving: Vec<&HeraldNode> = cluster.nodes.iter().filter(|n| n.serving()).collect();
    let mut counts = Counts { acknowledged: acked.len(), ..Counts::default() };
    let mut problems = Vec::new();
    for (i, a) in acked.iter().enumerate() {
        let node = serving[i % serving.len()];
        let tenant = &tenants[a.tenant];
        match read_event(node, &tenant.key, &a.event, deadline) {
            Ok(body) if body["delivery_ids"] == json!([a.delivery]) => {}
            Ok(body) => {
                counts.lost += 1;
                problems.push(format!("event {} through {}: deliveries {body}", a.event, node.id));
            }
            Err(why) => {
                counts.lost += 1;
                problems.push(format!(
                    "event {} (partition {}) through {}: {why}",
                    a.event, tenant.partition, node.id
                ));
            }
        }
        match seen.get(&a.event) {
            None => {
                counts.undelivered += 1;
                let (_, d) = node.call(
                    "GET",
                    &format!("/v1/webhook_deliveries/{}", a.delivery),
                    Some(&tenant.key),
                    None,
                );
                problems.push(format!("event {} never reached the receiver; its delivery now: {d}", a.event));
            }
            Some(n) if *n > 1 => counts.duplicated += 1,
            Some(_) => {}
        }
    }
    problems.truncate(20);
    (counts, problems)
}

/// `GET /v1/events/{id}`: the event, retried past 503s (a partition moving) until `deadline`.
fn read_event(node: &HeraldNode, key: &str, event: &str, deadline: Instant) -> Result<Value, String> {
    loop {
        let answer = node.text("GET", &format!("/v1/events/{event}"), Some(key), None);
        match answer {
            Ok((200, text)) => return serde_json::from_str(&text).map_err(|e| e.to_string()),
            Ok((status, text)) if status < 500 => return Err(format!("{status} {text}")),
            other if Instant::now() > deadline => return Err(format!("{other:?}")),
            _ => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

/// How long after a kill an acknowledgement surely came from a live node: the dead one's last
/// answers may still be read from the socket just after it.
const ACK_AFTER_KILL: Duration = Duration::from_millis(100);

/// The first arrival at `receiver` after `since` (a kill) of an event of each of `partitions`
/// acknowledged more than [`ACK_AFTER_KILL`] after it (so written by the partition's new owner),
/// as a time after `since`.
pub fn first_deliveries_after(
    receiver: &Receiver,
    acked: &[Acked],
    tenants: &[Tenant],
    partitions: &[u32],
    since: Instant,
) -> BTreeMap<u32, Duration> {
    let after: HashMap<&str, u32> = acked
        .iter()
        .filter(|a| a.at > since + ACK_AFTER_KILL)
        .map(|a| (a.event.as_str(), tenants[a.tenant].partition))
        .filter(|(_, p)| partitions.contains(p))
        .collect();
    let mut out = BTreeMap::new();
    for r in receiver.received().iter().filter(|r| r.at >= since) {
        if let Some(&p) = after.get(r.header("webhook-id")) {
            let took = r.at.duration_since(since);
            out.entry(p).and_modify(|d: &mut Duration| *d = (*d).min(took)).or_insert(took);
        }
    }
    out
}

/// How many rounds a long loop runs: `var` from the environment, else `default`.
pub fn rounds(var: &str, default: u64) -> u64 {
    std::env::var(var).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}
