//! Runs a program to its end and measures its peak resident memory, for the tests and benches
//! that hold `herald` to a memory figure.
//!
//! The peak is `VmHWM` of `/proc/<pid>/status`, sampled every few milliseconds while the child
//! runs (the mark only grows; a sample misses at most the growth of its last interval). Not
//! `ru_maxrss` from `wait4`: Linux carries the high-water mark of the memory a process had
//! before its `exec` into it, and a child spawned by a large test process (posix_spawn shares
//! the parent's memory until the exec) reports the parent's peak.

#![allow(dead_code)]

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// How often the child's high-water mark is read.
const SAMPLE_EVERY: Duration = Duration::from_millis(5);

/// What a measured run gave.
pub struct Measured {
    /// The exit code (128 + the signal for a killed child).
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
    /// The peak resident memory seen, in bytes.
    pub peak_bytes: u64,
    pub elapsed: Duration,
}

/// Runs `program` with `args` until it exits (killed, by its pid, after `timeout`), its output
/// in files under `out_dir`.
pub fn run_measured(program: &Path, args: &[&str], out_dir: &Path, timeout: Duration) -> Measured {
    let (out, err) = (out_dir.join("stdout"), out_dir.join("stderr"));
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out).unwrap())
        .stderr(std::fs::File::create(&err).unwrap())
        .spawn()
        .expect("cannot run the program");
    let started = Instant::now();
    let mut peak_kib = 0;
    let status = loop {
        // Read before the exit is seen: once reaped, its status file is gone.
        peak_kib = peak_kib.max(hwm_kib(child.id()));
        if let Some(status) = child.try_wait().expect("waiting for the child") {
            break status;
        }
        if started.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{} {args:?} ran over {timeout:?}", program.display());
        }
        std::thread::sleep(SAMPLE_EVERY);
    };
    let elapsed = started.elapsed();
    use std::os::unix::process::ExitStatusExt;
    let code = status.code().unwrap_or_else(|| 128 + status.signal().unwrap_or(0));
    let read = |p: &Path| std::fs::read_to_string(p).unwrap();
    Measured { code, stdout: read(&out), stderr: read(&err), peak_bytes: peak_kib * 1024, elapsed }
}

/// The peak resident memory (`VmHWM`) of a running process in KiB (0 once it has exited).
pub fn hwm_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}
