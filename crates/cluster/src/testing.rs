//! Test harness (feature `testing`): a real NATS cluster of `nats-server -js` processes on free
//! 127.0.0.1 ports, each with a temporary store directory, ready once JetStream has elected its
//! meta leader, and killed by PID when dropped (also when the test panics).

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::stream::MAX_PAYLOAD_NEEDED;

/// How long a cluster may take to elect its JetStream meta leader.
const READY_WITHIN: Duration = Duration::from_secs(30);

/// Where `nats-server` is looked for when it is not on `PATH` (Debian installs it in sbin).
const SBIN: &str = "/usr/sbin/nats-server";

/// One `nats-server` of the cluster.
struct Server {
    child: Option<Child>,
    client_port: u16,
    args: Vec<String>,
}

/// A running NATS cluster; dropping it kills every server by PID.
pub struct NatsCluster {
    servers: Vec<Server>,
    binary: PathBuf,
    dir: tempfile::TempDir,
}

/// The `nats-server` binary, or a panic that says how to install it: a test that needs NATS
/// fails without it, never skips.
pub fn nats_server_binary() -> PathBuf {
    require(locate(std::env::var_os("PATH"), Path::new(SBIN)))
}

/// `nats-server` on `path` (a `PATH` value), else at `sbin` if it is there.
fn locate(path: Option<std::ffi::OsString>, sbin: &Path) -> Option<PathBuf> {
    let on_path = path
        .and_then(|paths| std::env::split_paths(&paths).map(|p| p.join("nats-server")).find(|p| p.is_file()));
    on_path.or_else(|| sbin.is_file().then(|| sbin.to_path_buf()))
}

fn require(found: Option<PathBuf>) -> PathBuf {
    match found {
        Some(p) => p,
        None => panic!(
            "nats-server is not installed (not on PATH, nor at {SBIN}): the cluster tests run real \
             NATS servers; run scripts/test, which installs it with apt-get (package nats-server)"
        ),
    }
}

/// A port free on 127.0.0.1 now (the OS's pick, released at once for the server to take).
pub fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("binding a port on 127.0.0.1");
    listener.local_addr().expect("a bound address").port()
}

impl NatsCluster {
    /// Starts `n` servers in one cluster (JetStream on, file storage in a temporary directory,
    /// `max_payload` [`MAX_PAYLOAD_NEEDED`], as herald needs) and waits until JetStream answers
    /// (its meta leader is elected).
    pub async fn start(n: usize) -> NatsCluster {
        NatsCluster::start_with_max_payload(n, Some(MAX_PAYLOAD_NEEDED)).await
    }

    /// [`NatsCluster::start`] with the servers' `max_payload` set to `max_payload` bytes in
    /// their configuration file, or left at NATS's default (1 MiB) for `None`.
    pub async fn start_with_max_payload(n: usize, max_payload: Option<usize>) -> NatsCluster {
        let binary = nats_server_binary();
        let dir = tempfile::tempdir().expect("a temporary directory");
        let config = dir.path().join("nats.conf");
        let text = max_payload.map_or(String::new(), |bytes| format!("max_payload: {bytes}\n"));
        std::fs::write(&config, text).expect("writing the servers' configuration");
        let client_ports: Vec<u16> = (0..n).map(|_| free_port()).collect();
        let route_ports: Vec<u16> = (0..n).map(|_| free_port()).collect();
        let routes =
            route_ports.iter().map(|p| format!("nats://127.0.0.1:{p}")).collect::<Vec<_>>().join(",");
        let mut servers = Vec::with_capacity(n);
        for i in 0..n {
            let store = dir.path().join(format!("n{i}"));
            let mut args = vec![
                "-c".into(),
                config.display().to_string(),
                "-js".into(),
                "-sd".into(),
                store.display().to_string(),
                "-a".into(),
                "127.0.0.1".into(),
                "-p".into(),
                client_ports[i].to_string(),
                "--server_name".into(),
                format!("n{i}"),
                "-l".into(),
                dir.path().join(format!("n{i}.log")).display().to_string(),
            ];
            if n > 1 {
                args.extend([
                    "--cluster_name".into(),
                    "herald-test".into(),
                    "--cluster".into(),
                    format!("nats://127.0.0.1:{}", route_ports[i]),
                    "--routes".into(),
                    routes.clone(),
                ]);
            }
            servers.push(Server { child: None, client_port: client_ports[i], args });
        }
        let mut cluster = NatsCluster { servers, binary, dir };
        for i in 0..n {
            cluster.spawn(i);
        }
        cluster.wait_ready().await;
        cluster
    }

    fn spawn(&mut self, i: usize) {
        let server = &mut self.servers[i];
        let child = Command::new(&self.binary)
            .args(&server.args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", self.binary.display()));
        server.child = Some(child);
    }

    /// The client URL of server `i`.
    pub fn url(&self, i: usize) -> String {
        format!("nats://127.0.0.1:{}", self.servers[i].client_port)
    }

    /// Every server's client address (what a client is given to fail over).
    pub fn addrs(&self) -> Vec<async_nats::ServerAddr> {
        (0..self.servers.len()).map(|i| self.url(i).parse().expect("a valid NATS URL")).collect()
    }

    /// The PID of server `i`, while it runs.
    pub fn pid(&self, i: usize) -> Option<u32> {
        self.servers[i].child.as_ref().map(Child::id)
    }

    /// `kill -9` of server `i` (by its PID), waited for.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut child) = self.servers[i].child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts server `i` again on its ports and store, after [`NatsCluster::kill`].
    pub fn restart(&mut self, i: usize) {
        if self.servers[i].child.is_none() {
            self.spawn(i);
        }
    }

    /// The server logs, for a failing test's message.
    pub fn logs(&self) -> String {
        (0..self.servers.len())
            .map(|i| {
                let log =
                    std::fs::read_to_string(self.dir.path().join(format!("n{i}.log"))).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(20).collect();
                format!("--- n{i}\n{}", tail.into_iter().rev().collect::<Vec<_>>().join("\n"))
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Servers running now.
    fn live(&self) -> usize {
        self.servers.iter().filter(|s| s.child.is_some()).count()
    }

    /// Waits until JetStream, through some running server, creates (then deletes) a stream with as many replicas as servers run: its meta leader is elected
    /// and every server has joined. Panics with the servers' logs after [`READY_WITHIN`].
    pub async fn wait_ready(&self) {
        let started = Instant::now();
        let mut last = String::new();
        while started.elapsed() < READY_WITHIN {
            for (i, server) in self.servers.iter().enumerate() {
                if server.child.is_none() {
                    continue;
                }
                match ready_through(&self.url(i), self.live()).await {
                    Ok(()) => return,
                    Err(e) => last = e,
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("JetStream not ready within {READY_WITHIN:?}: {last}\n{}", self.logs());
    }
}

async fn ready_through(url: &str, replicas: usize) -> Result<(), String> {
    let options = async_nats::ConnectOptions::new().connection_timeout(Duration::from_millis(500));
    let client = options.connect(url).await.map_err(|e| e.to_string())?;
    let js = async_nats::jetstream::new(client);
    let within = Duration::from_secs(2);
    let answer = |r: Result<Result<(), String>, tokio::time::error::Elapsed>| {
        r.unwrap_or_else(|_| Err(format!("no answer within {within:?}")))
    };
    let config = async_nats::jetstream::stream::Config {
        name: "HERALD_READY".into(),
        subjects: vec!["herald.ready".into()],
        num_replicas: replicas,
        ..Default::default()
    };
    answer(
        tokio::time::timeout(within, async {
            js.get_or_create_stream(config).await.map(drop).map_err(|e| e.to_string())
        })
        .await,
    )?;
    answer(
        tokio::time::timeout(within, async {
            js.delete_stream("HERALD_READY").await.map(drop).map_err(|e| e.to_string())
        })
        .await,
    )
}

/// Every message of `stream`, in order, each as its checked records (panics on an error).
pub async fn messages(stream: &crate::PartitionStream) -> Vec<Vec<herald_log::Record>> {
    let last = stream.last_sequence().await.expect("the stream's last sequence");
    let mut out = Vec::with_capacity(usize::try_from(last).unwrap_or(0));
    for seq in 1..=last {
        out.push(stream.records(seq).await.expect("a message of whole records"));
    }
    out
}

impl Drop for NatsCluster {
    fn drop(&mut self) {
        for i in 0..self.servers.len() {
            self.kill(i);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_nats_server_fails_the_test_naming_scripts_test() {
        let nowhere = Path::new("/nonexistent/nats-server");
        assert_eq!(locate(Some("/nonexistent".into()), nowhere), None);
        let panic = std::panic::catch_unwind(|| require(None)).unwrap_err();
        let message = panic.downcast_ref::<String>().unwrap();
        assert!(message.contains("scripts/test") && message.contains("nats-server"), "{message}");
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("nats-server"), "").unwrap();
        assert_eq!(locate(Some(dir.path().into()), nowhere), Some(dir.path().join("nats-server")));
    }
}
