//! A real `herald serve` for a benchmark: started on a free port of 127.0.0.1 over a data
//! directory, ready once `/readyz` answers 200, stopped by its pid (SIGKILL on drop, SIGTERM and
//! a wait by `stop`). Included with `#[path]` by the benches that run one.

#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The admin key a benchmark's herald takes on its first start in an empty directory.
pub const ADMIN_KEY: &str = "sk_bench_admin_key_0123456789";

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// One `GET` on a new connection: the status and the body (`None` when nothing answered).
pub fn get(port: u16, path: &str, key: Option<&str>) -> Option<(u16, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    let auth = key.map(|k| format!("authorization: Bearer {k}\r\n")).unwrap_or_default();
    write!(s, "GET {path} HTTP/1.1\r\nhost: x\r\n{auth}connection: close\r\n\r\n").ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    let status = text.split_whitespace().nth(1)?.parse().ok()?;
    let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b).to_owned();
    Some((status, body))
}

/// A running `herald serve`, stopped (SIGKILL) on drop.
pub struct Herald {
    child: Child,
    pub port: u16,
}

impl Herald {
    /// Starts herald on `dir` and returns it with the time until `/readyz` answered 200.
    pub fn start(dir: &Path) -> (Herald, Duration) {
        let port = free_port();
        let started = Instant::now();
        let child = Command::new(env!("CARGO_BIN_EXE_herald"))
            .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
            .arg("--data-dir")
            .arg(dir)
            .env("HERALD_ADMIN_KEY", ADMIN_KEY)
            .env("HERALD_STORE_DURABILITY", "flush")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("cannot start herald");
        let herald = Herald { child, port };
        let deadline = started + Duration::from_secs(120);
        while get(port, "/readyz", None).map(|(status, _)| status) != Some(200) {
            assert!(Instant::now() < deadline, "herald was not ready in 120 s");
            std::thread::sleep(Duration::from_millis(2));
        }
        (herald, started.elapsed())
    }

    /// Resident memory now, MiB.
    pub fn rss_mib(&self) -> f64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
            .map_or(0.0, |kib| kib / 1024.0)
    }

    /// SIGTERM, and wait for the graceful stop.
    pub fn stop(mut self) {
        // SAFETY: kill(2) on the pid of a child this process started and has not reaped.
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
        let _ = self.child.wait();
    }
}

impl Drop for Herald {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
