//! The end-to-end harness: the real `herald` binary on a free port of 127.0.0.1 with a scratch
//! data directory and a short retry schedule, receivers on 127.0.0.1, and a small blocking HTTP
//! client. Everything started here is stopped by PID when its handle drops.

#![allow(dead_code)]

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

/// Every scope an organisation's key can hold, but `admin`.
pub const ORG_SCOPES: &[&str] = &[
    "events.write",
    "endpoints.read",
    "endpoints.write",
    "deliveries.read",
    "deliveries.write",
    "tasks.webhooks.read",
];

/// The admin key every test server starts with.
pub const ADMIN_KEY: &str = "sk_e2e_admin_key_0123456789abcdef";
/// The settings every test server starts with: retries after 300 ms and 600 ms, private targets
/// allowed (the receivers are on loopback), short timeouts, the admin key above.
pub const TEST_ENV: &[(&str, &str)] = &[
    ("HERALD_ADMIN_KEY", ADMIN_KEY),
    ("HERALD_DELIVERY_RETRY_SCHEDULE", "300ms,600ms"),
    ("HERALD_DELIVERY_ALLOW_PRIVATE_TARGETS", "true"),
    ("HERALD_DELIVERY_TIMEOUT", "2s"),
    ("HERALD_SERVER_SHUTDOWN_TIMEOUT", "2s"),
    ("HERALD_STORE_DURABILITY", "flush"),
];
/// No wait in these tests is longer than this.
pub const WAIT_MAX: Duration = Duration::from_secs(20);

/// A running `herald serve`.
pub struct Server {
    pub port: u16,
    pub data_dir: PathBuf,
    _scratch: Option<tempfile::TempDir>,
    child: Option<Child>,
    env: Vec<(String, String)>,
    /// The open-file limit (soft and hard) the server is started under, if any.
    open_files_max: Option<u64>,
    /// Where herald's stderr goes when the test reads it (`start_logged`), in a scratch directory
    /// of its own; otherwise it is inherited.
    stderr_log: Option<(tempfile::TempDir, PathBuf)>,
}

fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("no free port");
    l.local_addr().expect("no local addr").port()
}

impl Server {
    /// A server with the test defaults: retries after 300 ms and 600 ms, 5 failures make an
    /// endpoint inactive, private targets allowed (the receivers are on loopback).
    pub fn start() -> Server {
        Server::start_with(&[])
    }

    /// Same, with more `HERALD_*` settings (they override the defaults here).
    pub fn start_with(extra_env: &[(&str, &str)]) -> Server {
        Server::start_limited(extra_env, None)
    }

    /// Same, on the data directory `dir` holds (a store the test wrote before), kept until the
    /// server drops.
    pub fn start_in(dir: tempfile::TempDir, extra_env: &[(&str, &str)]) -> Server {
        let mut server = Server::unstarted(extra_env, None);
        server.data_dir = dir.path().to_owned();
        server._scratch = Some(dir);
        server.spawn();
        server
    }

    /// Same, under an open-file limit (RLIMIT_NOFILE, soft and hard) of `open_files_max`.
    pub fn start_limited(extra_env: &[(&str, &str)], open_files_max: Option<u64>) -> Server {
        let mut server = Server::unstarted(extra_env, open_files_max);
        server.spawn();
        server
    }

    /// Like `start_with`, with herald's stderr (its log) written to a file that `log` reads.
    pub fn start_logged(extra_env: &[(&str, &str)]) -> Server {
        let mut server = Server::unstarted(extra_env, None);
        let dir = tempfile::tempdir().expect("no temp dir");
        let path = dir.path().join("herald.stderr");
        server.stderr_log = Some((dir, path));
        server.spawn();
        server
    }

    /// What herald wrote to stderr so far (every start of it); only for a `start_logged` server.
    pub fn log(&self) -> String {
        let (_, path) = self.stderr_log.as_ref().expect("log() needs a server from start_logged");
        std::fs::read_to_string(path).unwrap_or_default()
    }

    /// Like `start_with`, but returns as soon as the process runs, before it answers: for a test
    /// of what herald does before it is up (its readiness notification). `wait_answering` waits.
    pub fn launch_with(extra_env: &[(&str, &str)]) -> Server {
        let mut server = Server::unstarted(extra_env, None);
        server.launch();
        server
    }

    fn unstarted(extra_env: &[(&str, &str)], open_files_max: Option<u64>) -> Server {
        let scratch = tempfile::tempdir().expect("no temp dir");
        let mut env: Vec<(String, String)> =
            TEST_ENV.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        for (k, v) in extra_env {
            env.retain(|(name, _)| name != k);
            env.push((k.to_string(), v.to_string()));
        }
        Server {
            port: 0,
            data_dir: scratch.path().to_owned(),
            _scratch: Some(scratch),
            child: None,
            env,
            open_files_max,
            stderr_log: None,
        }
    }

    fn spawn(&mut self) {
        self.launch();
        self.wait_answering();
    }

    /// Starts the process on a new free port, without waiting for it.
    fn launch(&mut self) {
        self.port = free_port();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_herald"));
        cmd.args(["serve", "--listen", &format!("127.0.0.1:{}", self.port)])
            .arg("--data-dir")
            .arg(&self.data_dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        match &self.stderr_log {
            Some((_, path)) => {
                let file = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .expect("cannot open the stderr file");
                cmd.stderr(file)
            }
            None => cmd.stderr(Stdio::inherit()),
        };
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        if let Some(n) = self.open_files_max {
            use std::os::unix::process::CommandExt;
            // SAFETY: between fork and exec only setrlimit, which is async-signal-safe.
            unsafe {
                cmd.pre_exec(move || {
                    let limit = libc::rlimit { rlim_cur: n, rlim_max: n };
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        self.child = Some(cmd.spawn().expect("cannot start herald"));
    }

    /// Waits until `/healthz` answers 200; panics if herald exits or takes longer than `WAIT_MAX`.
    pub fn wait_answering(&mut self) {
        let deadline = Instant::now() + WAIT_MAX;
        loop {
            if let Ok((200, _)) = self.try_call("GET", "/healthz", None, None) {
                return;
            }
            if let Some(Ok(Some(status))) = self.child.as_mut().map(|c| c.try_wait()) {
                panic!("herald exited during start: {status}");
            }
            assert!(Instant::now() < deadline, "herald did not answer /healthz in time");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// SIGKILL, no chance to clean up.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait for the graceful stop; returns whether it exited successfully.
    pub fn terminate(&mut self) -> bool {
        let Some(mut c) = self.child.take() else { return false };
        // SAFETY: kill(2) with a pid we own; no memory is touched.
        unsafe {
            libc::kill(c.id() as i32, libc::SIGTERM);
        }
        let deadline = Instant::now() + WAIT_MAX;
        loop {
            match c.try_wait() {
                Ok(Some(status)) => return status.success(),
                Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
                _ => {
                    let _ = c.kill();
                    let _ = c.wait();
                    return false;
                }
            }
        }
    }

    /// Starts herald again on the same data directory (on a new port).
    pub fn restart(&mut self) {
        self.kill9();
        self.spawn();
    }

    pub fn try_call(
        &self,
        method: &str,
        path: &str,
        key: Option<&str>,
        body: Option<&str>,
    ) -> Result<(u16, String), String> {
        call_raw(&self.url(path), method, key, body, &[])
    }

    /// A request; panics only on transport errors. Returns the status and the parsed JSON body
    /// (`Value::Null` for an empty or non-JSON body).
    pub fn call(&self, method: &str, path: &str, key: Option<&str>, body: Option<Value>) -> (u16, Value) {
        self.call_with(method, path, key, body.map(|b| b.to_string()).as_deref(), &[])
    }

    pub fn call_with(
        &self,
        method: &str,
        path: &str,
        key: Option<&str>,
        body: Option<&str>,
        headers: &[(&str, &str)],
    ) -> (u16, Value) {
        let (status, text) = call_raw(&self.url(path), method, key, body, headers)
            .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
        (status, serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    /// A key of a new organisation with the given scopes; returns (org id, key).
    pub fn org_key(&self, scopes: &[&str]) -> (String, String) {
        let org = uuid::Uuid::now_v7().to_string();
        let key = self.key_for(&org, scopes);
        (org, key)
    }

    pub fn key_for(&self, org: &str, scopes: &[&str]) -> String {
        let (status, body) = self.call(
            "POST",
            "/v1/api_keys",
            Some(ADMIN_KEY),
            Some(serde_json::json!({"org_id": org, "scopes": scopes, "name": "e2e"})),
        );
        assert_eq!(status, 201, "{body}");
        body["key"].as_str().expect("no key").to_owned()
    }

    /// An endpoint of the key's organisation at `url`; returns its JSON (with `secret`).
    pub fn endpoint(&self, key: &str, url: &str, events: &[&str]) -> Value {
        let (status, body) = self.call(
            "POST",
            "/v1/endpoints",
            Some(key),
            Some(serde_json::json!({"url": url, "name": "e2e receiver", "enabled_events": events})),
        );
        assert_eq!(status, 201, "{body}");
        body
    }

    pub fn publish(&self, key: &str, event_type: &str, payload: Value) -> Value {
        let (status, body) = self.call(
            "POST",
            "/v1/events",
            Some(key),
            Some(serde_json::json!({"event_type": event_type, "payload": payload})),
        );
        assert_eq!(status, 202, "{body}");
        body
    }

    /// The last seq folded into the projection (`herald_projection_applied_seq`).
    pub fn applied_seq(&self) -> u64 {
        self.metric("herald_projection_applied_seq ") as u64
    }

    /// The value of the metrics line that starts with `series` (its name and labels, then a space).
    pub fn metric(&self, series: &str) -> f64 {
        let (status, text) = self.get_text("/metrics");
        assert_eq!(status, 200, "{text}");
        let line =
            text.lines().find(|l| l.starts_with(series)).unwrap_or_else(|| panic!("no {series} in {text}"));
        line.split_whitespace().last().and_then(|v| v.parse().ok()).expect("a number")
    }

    /// Waits until the log is durable as far as the projection has folded it, so the audit log
    /// (durable records only) holds every record behind what the API shows now.
    pub fn wait_durable(&self) {
        let applied = self.applied_seq();
        let deadline = Instant::now() + WAIT_MAX;
        loop {
            let (status, text) = self.get_text("/metrics");
            assert_eq!(status, 200, "{text}");
            let committed = text
                .lines()
                .find(|l| l.starts_with("herald_log_committed_seq "))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<u64>().ok())
                .expect("the committed seq metric");
            if committed >= applied {
                return;
            }
            assert!(Instant::now() < deadline, "the log never became durable through seq {applied}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn get_text(&self, path: &str) -> (u16, String) {
        self.try_call("GET", path, None, None).unwrap_or_else(|e| panic!("GET {path}: {e}"))
    }

    /// Polls `GET /v1/webhook_deliveries/{id}` until its status is `status`.
    pub fn wait_status(&self, key: &str, delivery: &str, status: &str) -> Value {
        let deadline = Instant::now() + WAIT_MAX;
        loop {
            let (code, body) =
                self.call("GET", &format!("/v1/webhook_deliveries/{delivery}"), Some(key), None);
            assert_eq!(code, 200, "{body}");
            if body["status"] == status {
                return body;
            }
            assert!(Instant::now() < deadline, "delivery {delivery} never became {status}: {body}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// One HTTP/1.1 request over a fresh connection (no client crate: the harness tests the server,
/// and a hand-rolled request also lets a test send what a client library would refuse).
pub fn call_raw(
    url: &str,
    method: &str,
    key: Option<&str>,
    body: Option<&str>,
    headers: &[(&str, &str)],
) -> Result<(u16, String), String> {
    let request = RawRequest { url, method, key, body, headers };
    call_raw_headers(&request, WAIT_MAX).map(|(status, _, body)| (status, body))
}

/// [`call_raw`], waiting at most `read_timeout` for each read of the answer.
pub fn call_raw_within(
    url: &str,
    method: &str,
    key: Option<&str>,
    body: Option<&str>,
    headers: &[(&str, &str)],
    read_timeout: Duration,
) -> Result<(u16, String), String> {
    let request = RawRequest { url, method, key, body, headers };
    call_raw_headers(&request, read_timeout).map(|(status, _, body)| (status, body))
}

/// A response's headers: (name lower-cased, value), in order.
pub type Headers = Vec<(String, String)>;

/// The request of `call_raw_headers`: the arguments of `call_raw`.
pub struct RawRequest<'a> {
    pub url: &'a str,
    pub method: &'a str,
    /// The bearer key, if any.
    pub key: Option<&'a str>,
    pub body: Option<&'a str>,
    /// More headers, as given.
    pub headers: &'a [(&'a str, &'a str)],
}

/// Like `call_raw_within`, with the response's headers too (names lower-cased, in order).
pub fn call_raw_headers(
    request: &RawRequest<'_>,
    read_timeout: Duration,
) -> Result<(u16, Headers, String), String> {
    let RawRequest { url, method, key, body, headers } = *request;
    let rest = url.strip_prefix("http://").ok_or("only http")?;
    let (host, path) = rest.split_once('/').map(|(h, p)| (h, format!("/{p}"))).unwrap_or((rest, "/".into()));
    let mut stream = TcpStream::connect(host).map_err(|e| e.to_string())?;
    stream.set_read_timeout(Some(read_timeout)).map_err(|e| e.to_string())?;
    let body = body.unwrap_or("");
    let mut req = format!("{method} {path} HTTP/1.1\r\nhost: {host}\r\nconnection: close\r\n");
    if let Some(k) = key {
        req.push_str(&format!("authorization: Bearer {k}\r\n"));
    }
    if !body.is_empty() || method == "POST" || method == "PATCH" {
        req.push_str(&format!("content-type: application/json\r\ncontent-length: {}\r\n", body.len()));
    }
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    stream.write_all(req.as_bytes()).map_err(|e| e.to_string())?;
    stream.write_all(body.as_bytes()).map_err(|e| e.to_string())?;
    let mut reader = BufReader::new(stream);
    let mut status_line = String::new();
    reader.read_line(&mut status_line).map_err(|e| e.to_string())?;
    let status: u16 = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or(format!("bad status {status_line:?}"))?;
    let mut len = None;
    let mut chunked = false;
    let mut response_headers = Vec::new();
    loop {
        let mut line = String::new();
        reader.read_line(&mut line).map_err(|e| e.to_string())?;
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        if let Some((k, v)) = line.split_once(':') {
            let k = k.trim().to_ascii_lowercase();
            if k == "content-length" {
                len = v.trim().parse::<usize>().ok();
            }
            if k == "transfer-encoding" && v.trim().eq_ignore_ascii_case("chunked") {
                chunked = true;
            }
            response_headers.push((k, v.trim().to_owned()));
        }
    }
    let mut out = Vec::new();
    if chunked {
        loop {
            let mut size = String::new();
            reader.read_line(&mut size).map_err(|e| e.to_string())?;
            let n = usize::from_str_radix(size.trim(), 16).map_err(|e| e.to_string())?;
            if n == 0 {
                break;
            }
            let mut chunk = vec![0; n + 2];
            reader.read_exact(&mut chunk).map_err(|e| e.to_string())?;
            out.extend_from_slice(&chunk[..n]);
        }
    } else if let Some(n) = len {
        out.resize(n, 0);
        reader.read_exact(&mut out).map_err(|e| e.to_string())?;
    } else {
        reader.read_to_end(&mut out).map_err(|e| e.to_string())?;
    }
    Ok((status, response_headers, String::from_utf8_lossy(&out).into_owned()))
}

/// A request a receiver got.
#[derive(Debug, Clone)]
pub struct Received {
    pub path: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// When the whole request had arrived.
    pub at: Instant,
    /// The status it was answered.
    pub status: u16,
}

impl Received {
    pub fn header(&self, name: &str) -> &str {
        self.headers.iter().find(|(n, _)| n == name).map_or("", |(_, v)| v.as_str())
    }
}

/// How a receiver answers a request, given it and how many came before it (`set_rule`).
pub type Rule = Arc<dyn Fn(&Received, usize) -> u16 + Send + Sync>;

/// A receiver on 127.0.0.1 that answers every request with its current status (200 unless
/// set), by its rule when one is set, or as scripted ahead, and records what it got. Stopped
/// when dropped.
pub struct Receiver {
    pub port: u16,
    answers: Answers,
    stop: Arc<AtomicBool>,
}

/// What a receiver does besides answering its status: answers scripted ahead of it, a delay
/// before each answer, and how many requests it is answering at once.
#[derive(Default)]
struct Behaviour {
    /// Answers for the next requests, in order (status and an optional `Retry-After` value).
    script: Mutex<VecDeque<(u16, Option<String>)>>,
    delay_ms: AtomicU64,
    active: AtomicUsize,
    active_max: AtomicUsize,
}

impl Receiver {
    pub fn start() -> Receiver {
        let listener = TcpListener::bind("127.0.0.1:0").expect("no port for a receiver");
        listener.set_nonblocking(true).expect("nonblocking");
        let port = listener.local_addr().expect("addr").port();
        let answers = Answers {
            status: Arc::new(AtomicU16::new(200)),
            rule: Arc::new(Mutex::new(None)),
            got: Arc::new(Mutex::new(Vec::new())),
            more: Arc::new(Behaviour::default()),
        };
        let stop = Arc::new(AtomicBool::new(false));
        let (a, st) = (answers.clone(), stop.clone());
        std::thread::spawn(move || {
            while !st.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((stream, _)) => {
                        let (a, st) = (a.clone(), st.clone());
                        std::thread::spawn(move || serve_conn(stream, a, st));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(2)),
                }
            }
        });
        Receiver { port, answers, stop }
    }

    /// Answers each later request with what `rule` says (over the status set; a scripted answer
    /// comes first).
    pub fn set_rule(&self, rule: impl Fn(&Received, usize) -> u16 + Send + Sync + 'static) {
        *self.answers.rule.lock().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(rule));
    }

    /// The next request (after those already scripted) gets `status`, with `Retry-After:
    /// retry_after` if given; later ones the current status again.
    pub fn answer_next(&self, status: u16, retry_after: Option<&str>) {
        let mut script = self.answers.more.script.lock().unwrap_or_else(|e| e.into_inner());
        script.push_back((status, retry_after.map(str::to_owned)));
    }

    /// Every later answer waits this long after its request arrived.
    pub fn set_delay(&self, delay: Duration) {
        self.answers.more.delay_ms.store(delay.as_millis() as u64, Ordering::SeqCst);
    }

    /// The most requests answered at once so far (from arrival to the answer written).
    pub fn concurrency_max(&self) -> usize {
        self.answers.more.active_max.load(Ordering::SeqCst)
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// The status every later request gets.
    pub fn set_status(&self, status: u16) {
        self.answers.status.store(status, Ordering::SeqCst);
    }

    pub fn received(&self) -> Vec<Received> {
        self.answers.got.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Waits until at least `n` requests arrived.
    pub fn wait_for(&self, n: usize) -> Vec<Received> {
        let deadline = Instant::now() + WAIT_MAX;
        loop {
            let got = self.received();
            if got.len() >= n {
                return got;
            }
            assert!(Instant::now() < deadline, "receiver got {} of {n} requests", got.len());
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// What a receiver's connections share: how to answer, and what came.
#[derive(Clone)]
struct Answers {
    status: Arc<AtomicU16>,
    rule: Arc<Mutex<Option<Rule>>>,
    got: Arc<Mutex<Vec<Received>>>,
    more: Arc<Behaviour>,
}

impl Answers {
    /// Records the request with the status it gets, in one step, so the record's order is the
    /// order of the answers; returns the status and a `Retry-After` value, if scripted.
    fn answer(&self, mut received: Received) -> (u16, Option<String>) {
        let scripted = self.more.script.lock().unwrap_or_else(|e| e.into_inner()).pop_front();
        let rule = self.rule.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let mut got = self.got.lock().unwrap_or_else(|e| e.into_inner());
        let (code, retry_after) = match (scripted, rule) {
            (Some(scripted), _) => scripted,
            (None, Some(rule)) => (rule(&received, got.len()), None),
            (None, None) => (self.status.load(Ordering::SeqCst), None),
        };
        received.status = code;
        got.push(received);
        (code, retry_after)
    }
}

fn serve_conn(stream: TcpStream, answers: Answers, stop: Arc<AtomicBool>) {
    let _ = stream.set_read_timeout(Some(Duration::from_millis(500)));
    let Ok(clone) = stream.try_clone() else { return };
    let mut reader = BufReader::new(clone);
    let mut stream = stream;
    while !stop.load(Ordering::SeqCst) {
        let mut line = String::new();
        match reader.read_line(&mut line) {
            Ok(0) => return,
            Ok(_) => {}
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock || e.kind() == std::io::ErrorKind::TimedOut =>
            {
                continue
            }
            Err(_) => return,
        }
        let path = line.split_whitespace().nth(1).unwrap_or("/").to_owned();
        let mut headers = Vec::new();
        loop {
            let mut h = String::new();
            if reader.read_line(&mut h).is_err() {
                return;
            }
            let Some((k, v)) = h.trim_end().split_once(':') else { break };
            headers.push((k.trim().to_ascii_lowercase(), v.trim().to_owned()));
        }
        let len = headers
            .iter()
            .find(|(k, _)| k == "content-length")
            .and_then(|(_, v)| v.parse::<usize>().ok())
            .unwrap_or(0);
        let mut body = vec![0; len];
        if reader.read_exact(&mut body).is_err() {
            return;
        }
        let at = Instant::now();
        let more = &answers.more;
        let active = more.active.fetch_add(1, Ordering::SeqCst) + 1;
        more.active_max.fetch_max(active, Ordering::SeqCst);
        let (code, retry_after) = answers.answer(Received { path, headers, body, at, status: 0 });
        let delay_ms = more.delay_ms.load(Ordering::SeqCst);
        if delay_ms > 0 {
            std::thread::sleep(Duration::from_millis(delay_ms));
        }
        let retry_after = retry_after.map_or(String::new(), |v| format!("retry-after: {v}\r\n"));
        let answer = format!("HTTP/1.1 {code} X\r\n{retry_after}content-length: 2\r\n\r\nok");
        // Counted as answered before the answer is written: herald may start the next request
        // as soon as it has read this one.
        more.active.fetch_sub(1, Ordering::SeqCst);
        if stream.write_all(answer.as_bytes()).is_err() {
            return;
        }
    }
}

/// Raises this test process's open-file limit to its hard limit, so it can hold `needed`
/// connections (its soft limit may be 1,024).
pub fn raise_own_open_files_limit(needed: usize) {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit and setrlimit read or write the struct we own.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit), 0);
        limit.rlim_cur = limit.rlim_max;
        assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &limit), 0);
    }
    assert!(limit.rlim_cur >= needed as u64 + 512, "this test needs {} open files", needed + 512);
}
