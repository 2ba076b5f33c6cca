//! A real full disk: herald runs with a file-size limit (RLIMIT_FSIZE, SIGXFSZ ignored), so its
//! store's writes fail with EFBIG as on a full filesystem. Writes get a clean 503 and nothing
//! acknowledged is lost; reads still answer; `/readyz` says why the store refuses writes. Once
//! the limit is lifted (space again), herald resumes by itself, without a restart: writes
//! succeed and every acknowledged event reads back; after a stop `herald verify` passes.
//!
//! sled refuses every write after an IO error for the life of its database, so herald's writer
//! reopens the store and probes it (docs/OPERATIONS.md says so).

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
    assert_eq!(status, 503, "{ready}");
    assert!(ready["status"].as_str().unwrap().starts_with("the store refuses writes: "), "{ready}");

    // Space again: the limit is lifted on the running process, which resumes by itself.
    let unlimited = libc::rlimit { rlim_cur: libc::RLIM_INFINITY, rlim_max: libc::RLIM_INFINITY };
    // SAFETY: prlimit on our own child, with a valid rlimit and no old-value pointer.
    let lifted = unsafe {
        libc::prlimit(child.0.id() as libc::pid_t, libc::RLIMIT_FSIZE, &unlimited, std::ptr::null_mut())
    };
    assert_eq!(lifted, 0, "prlimit: {}", std::io::Error::last_os_error());
    resumes_and_keeps_everything(port, &mut acked);
    drop(child);

    // And after a restart everything acknowledged is still there.
    let port = free_port();
    let child = spawn(dir.path(), port, None);
    for id in &acked {
        let (status, body) = call(port, "GET", &format!("/v1/events/{id}"), None);
        assert_eq!(status, 200, "acknowledged event {id} lost: {body}");
    }
    assert_eq!(call(port, "GET", "/readyz", None).0, 200);
    drop(child);
    let verify = Command::new(env!("CARGO_BIN_EXE_herald"))
        .args(["verify", "--data-dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(verify.status.success(), "{}", String::from_utf8_lossy(&verify.stderr));
}

/// A tmpfs of this size is mounted for the data directory: a real filesystem that fills.
const TMPFS_BYTES: u64 = 24 << 20;
/// A file on it that the test deletes to give space back.
const BALLAST_BYTES: usize = 8 << 20;

/// A tmpfs mounted on a temporary directory, unmounted when dropped.
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    /// Mounts one, or says why it cannot (not root, no mount permission in this sandbox).
    fn mount() -> Result<Tmpfs, String> {
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={TMPFS_BYTES}"), "tmpfs"])
            .arg(dir.path())
            .output()
            .map_err(|e| format!("running mount: {e}"))?;
        if !out.status.success() {
            return Err(format!("mount -t tmpfs failed: {}", String::from_utf8_lossy(&out.stderr).trim()));
        }
        Ok(Tmpfs { dir })
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(self.dir.path()).status();
    }
}

/// After space came back: `/readyz` turns ready by itself (no restart), a publish is
/// acknowledged, and every acknowledged event reads back.
fn resumes_and_keeps_everything(port: u16, acked: &mut Vec<String>) {
    let deadline = Instant::now() + WAIT_MAX;
    loop {
        let (status, ready) = call(port, "GET", "/readyz", None);
        if status == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "herald did not resume: {ready}");
        std::thread::sleep(Duration::from_millis(50));
    }
    let (status, answer) = publish_padded(port, 0, "");
    assert_eq!(status, 202, "{answer}");
    acked.push(answer["id"].as_str().unwrap().to_owned());
    for id in acked.iter() {
        let (status, body) = call(port, "GET", &format!("/v1/events/{id}"), None);
        assert_eq!(status, 200, "acknowledged event {id} after resuming: {body}");
    }
}

fn publish_padded(port: u16, i: usize, pad: &str) -> (u16, serde_json::Value) {
    let body =
        format!(r#"{{"org_id":"{ORG}","event_type":"disk.fill","payload":{{"n":{i},"pad":"{pad}"}}}}"#);
    call(port, "POST", "/v1/events", Some(&body))
}

#[test]
fn a_real_filesystem_that_fills_and_frees_again_is_resumed_without_a_restart() {
    let fs = match Tmpfs::mount() {
        Ok(fs) => fs,
        Err(why) => {
            // Only root can mount a filesystem of a chosen size; the RLIMIT_FSIZE test above runs
            // everywhere.
            println!("SKIPPED: no small filesystem to fill here: {why}");
            return;
        }
    };
    let ballast = fs.dir.path().join("ballast");
    std::fs::write(&ballast, vec![0u8; BALLAST_BYTES]).unwrap();
    let data = fs.dir.path().join("data");
    let port = free_port();
    let child = spawn(&data, port, None);
    let pad = "x".repeat(8_000);
    let (mut acked, mut refused) = (Vec::new(), 0);
    for i in 0..10_000 {
        match publish_padded(port, i, &pad) {
            (202, answer) => acked.push(answer["id"].as_str().unwrap().to_owned()),
            (503, answer) => {
                assert_eq!(answer["name"], "ServiceUnavailable", "{answer}");
                refused += 1;
                if refused >= 5 {
                    break;
                }
            }
            (other, answer) => panic!("publish {i} answered {other}: {answer}"),
        }
    }
    assert!(refused >= 5, "the filesystem never filled ({} acknowledged)", acked.len());
    let (status, body) = call(port, "GET", &format!("/v1/events/{}", acked[0]), None);
    assert_eq!(status, 200, "{body}");
    for id in &acked {
        let (status, body) = call(port, "GET", &format!("/v1/events/{id}"), None);
        assert_ne!(status, 404, "acknowledged event {id} on the full disk: {body}");
    }
    let (status, ready) = call(port, "GET", "/readyz", None);
    assert_eq!(status, 503, "{ready}");
    assert!(ready["status"].as_str().unwrap().starts_with("the store refuses writes: "), "{ready}");

    // Space comes back: herald resumes by itself.
    std::fs::remove_file(&ballast).unwrap();
    resumes_and_keeps_everything(port, &mut acked);
    drop(child);
    let verify = Command::new(env!("CARGO_BIN_EXE_herald"))
        .args(["verify", "--data-dir"])
        .arg(&data)
        .output()
        .unwrap();
    assert!(verify.status.success(), "{}", String::from_utf8_lossy(&verify.stderr));
}
