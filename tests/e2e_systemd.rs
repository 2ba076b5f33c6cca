//! systemd readiness (`Type=notify`, dist/herald.service) against the real binary: a Unix datagram
//! socket in a temp dir plays the service manager through `NOTIFY_SOCKET`. herald must say READY=1
//! only once it can be connected to (store open, admin key made, listener bound), say nothing else
//! before, and say STOPPING=1 when SIGTERM begins the graceful stop.

mod common;

use std::net::{SocketAddr, TcpStream};
use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::time::{Duration, Instant};

use common::{Server, WAIT_MAX};

/// A fake service manager: the socket herald's `NOTIFY_SOCKET` names.
struct Manager {
    socket: UnixDatagram,
}

impl Manager {
    fn bind(path: &Path) -> Manager {
        let socket = UnixDatagram::bind(path).expect("cannot bind the notify socket");
        Manager { socket }
    }

    /// The next notification's lines (`READY=1`, `STATUS=...`); panics after `WAIT_MAX`.
    fn next(&self, waiting_for: &str) -> Vec<String> {
        self.socket.set_read_timeout(Some(WAIT_MAX)).expect("read timeout");
        let mut buf = [0u8; 4096];
        let n = self.socket.recv(&mut buf).unwrap_or_else(|e| panic!("no notification ({waiting_for}): {e}"));
        String::from_utf8_lossy(&buf[..n]).lines().map(str::to_owned).collect()
    }

    /// Notifications already queued, without waiting.
    fn queued(&self) -> Vec<Vec<String>> {
        self.socket.set_nonblocking(true).expect("nonblocking");
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        while let Ok(n) = self.socket.recv(&mut buf) {
            out.push(String::from_utf8_lossy(&buf[..n]).lines().map(str::to_owned).collect());
        }
        self.socket.set_nonblocking(false).expect("blocking");
        out
    }
}

#[test]
fn ready_only_once_listening_and_stopping_at_sigterm() {
    let dir = tempfile::tempdir().expect("no temp dir");
    let path = dir.path().join("notify.sock");
    let manager = Manager::bind(&path);
    let mut server = Server::launch_with(&[("NOTIFY_SOCKET", path.to_str().expect("a UTF-8 path"))]);

    // Until READY=1, herald may only report its status: no STOPPING, no other state.
    let deadline = Instant::now() + WAIT_MAX;
    loop {
        let lines = manager.next("READY=1");
        if lines.iter().any(|l| l == "READY=1") {
            assert!(
                lines.iter().all(|l| l == "READY=1" || l.starts_with("STATUS=")),
                "READY=1 came with {lines:?}"
            );
            break;
        }
        assert!(lines.iter().all(|l| l.starts_with("STATUS=")), "before READY=1 herald said {lines:?}");
        assert!(Instant::now() < deadline, "no READY=1 within {WAIT_MAX:?}");
    }

    // Right after READY=1, without any retry: the listener is bound, and it answers.
    let addr = SocketAddr::from(([127, 0, 0, 1], server.port));
    TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("READY=1 was sent but port {} refuses connections: {e}", server.port));
    let (status, body) = server.try_call("GET", "/healthz", None, None).expect("/healthz after READY=1");
    assert_eq!(status, 200, "{body}");

    // Serving says nothing more; the stop begins only at SIGTERM.
    let early = manager.queued();
    assert!(early.iter().flatten().all(|l| l.starts_with("STATUS=")), "before SIGTERM herald said {early:?}");

    assert!(server.terminate(), "herald did not stop cleanly at SIGTERM");
    let mut seen = Vec::new();
    loop {
        let lines = manager.next("STOPPING=1");
        assert!(!lines.iter().any(|l| l == "READY=1"), "READY=1 again during the stop: {lines:?}");
        seen.push(lines.clone());
        if lines.iter().any(|l| l == "STOPPING=1") {
            break;
        }
        assert!(seen.len() < 16, "no STOPPING=1 after SIGTERM, only {seen:?}");
    }
}

#[test]
fn an_unreachable_notify_socket_does_not_stop_herald() {
    // NOTIFY_SOCKET names nothing: herald warns and serves all the same, then stops cleanly.
    let dir = tempfile::tempdir().expect("no temp dir");
    let path = dir.path().join("nobody-listens.sock");
    let mut server = Server::start_with(&[("NOTIFY_SOCKET", path.to_str().expect("a UTF-8 path"))]);
    let (status, body) = server.try_call("GET", "/healthz", None, None).expect("/healthz");
    assert_eq!(status, 200, "{body}");
    assert!(server.terminate(), "herald did not stop cleanly at SIGTERM");
}
