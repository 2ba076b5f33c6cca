//! A real full disk: herald runs with a file-size limit (RLIMIT_FSIZE, SIGXFSZ ignored), so its
//! store's writes fail with EFBIG as on a full filesystem. Writes get a clean 503 and nothing
//! acknowledged is lost; reads still answer; `/readyz` says the store refuses writes, so a
//! supervisor restarts it; after a restart with space again everything acknowledged is there,
//! `herald verify` passes, and writes succeed.
//!
//! sled keeps refusing writes after an IO error for the life of the process, so space coming
//! back is picked up by that restart, not in place (docs/OPERATIONS.md says so).

mod common;

use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{call_raw, ADMIN_KEY, WAIT_MAX};

const ORG: &str = "0190f1f4-0000-7000-8000-0000000000d1";
const LIMIT_BYTES: u64 = 6_000_000;

/// A running herald, stopped by its PID when dropped: also when an assertion fails.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn(dir: &std::path::Path, port: u16, limit: Option<u64>) -> Running {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_herald"));
    cmd.args(["serve", "--listen", &format!("127.0.0.1:{port}")])
        .arg("--data-dir")
        .arg(dir)
        .env("HERALD_ADMIN_KEY", ADMIN_KEY)
        .env("HERALD_STORE_DURABILITY", "flush")
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    if let Some(bytes) = limit {
        // SAFETY: between fork and exec only async-signal-safe calls (setrlimit, signal).
        unsafe {
            cmd.pre_exec(move || {
                let rlim = libc::rlimit { rlim_cur: bytes, rlim_max: libc::RLIM_INFINITY };
                if libc::setrlimit(libc::RLIMIT_FSIZE, &rlim) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
                Ok(())
            });
        }
    }
    let child = Running(cmd.spawn().expect("cannot start herald"));
    let deadline = Instant::now() + WAIT_MAX;
    while !matches!(
        call_raw(&format!("http://127.0.0.1:{port}/healthz"), "GET", None, None, &[]),
        Ok((200, _))
    ) {
        assert!(Instant::now() < deadline, "herald did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    child
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn call(port: u16, method: &str, path: &str, body: Option<&str>) -> (u16, serde_json::Value) {
    let (status, text) =
        call_raw(&format!("http://127.0.0.1:{port}{path}"), method, Some(ADMIN_KEY), body, &[]).unwrap();
    (status, serde_json::from_str(&text).unwrap_or(serde_json::Value::Null))
}

#[test]
fn a_full_disk_refuses_writes_cleanly_and_loses_nothing_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let child = spawn(dir.path(), port, Some(LIMIT_BYTES));
    let pad = "x".repeat(20_000);
    let mut acked = Vec::new();
    let mut refused = 0;
    for i in 0..2_000 {
        let body =
            format!(r#"{{"org_id":"{ORG}","event_type":"disk.fill","payload":{{"n":{i},"pad":"{pad}"}}}}"#);
        let (status, answer) = call(port, "POST", "/v1/events", Some(&body));
        match status {
            202 => acked.push(answer["id"].as_str().unwrap().to_owned()),
            503 => {
                assert_eq!(answer["name"], "ServiceUnavailable", "{answer}");
                refused += 1;
                if refused >= 5 {
                    break;
                }
            }
            other => panic!("publish {i} answered {other}: {answer}"),
        }
    }
    assert!(refused >= 5, "the file-size limit was never reached ({} acknowledged)", acked.len());
    assert!(!acked.is_empty());
    // Still serving: reads answer, health is fine, readiness says why it is not ready.
    // - sled refuses some seeks after an IO error; the read cache used to learn from one and
    //   turn that into "not found" for every event.
    // - sled may also fail the reads of the rows of the last batches before the failure (seen:
    //   the last 16 of 92 events): those answer 503, never 404; the first one is read. They are
    //   on disk: the restart
    //   below reads every acknowledged event back. docs/OPERATIONS.md says so.
    for (i, id) in acked.iter().enumerate() {
        let (status, body) = call(port, "GET", &format!("/v1/events/{id}"), None);
        let refused_read = status == 503 && body["name"] == "ServiceUnavailable" && i > 0;
        assert!(
            status == 200 || refused_read,
            "event {i} of {} on the full disk: {status} {body}",
            acked.len()
        );
    }
    assert_eq!(call(port, "GET", "/healthz", None).0, 200);
    let (status, ready) = call(port, "GET", "/readyz", None);
    assert_eq!((status, ready["status"].as_str()), (503, Some("the store refuses writes")));
    drop(child);

    // Space again (no limit): a restart, and everything acknowledged is there.
    let port = free_port();
    let child = spawn(dir.path(), port, None);
    for id in &acked {
        let (status, body) = call(port, "GET", &format!("/v1/events/{id}"), None);
        assert_eq!(status, 200, "acknowledged event {id} lost: {body}");
    }
    let body = format!(r#"{{"org_id":"{ORG}","event_type":"disk.fill","payload":{{}}}}"#);
    assert_eq!(call(port, "POST", "/v1/events", Some(&body)).0, 202);
    assert_eq!(call(port, "GET", "/readyz", None).0, 200);
    drop(child);
    let verify = Command::new(env!("CARGO_BIN_EXE_herald"))
        .args(["verify", "--data-dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(verify.status.success(), "{}", String::from_utf8_lossy(&verify.stderr));
}
