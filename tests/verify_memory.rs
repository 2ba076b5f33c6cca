//! `herald verify --memory-max` on a store whose projection alone is larger than the bound (the
//! in-memory way held it twice, stored and rebuilt): it verifies, tells its rate, deletes its
//! scratch store, and its peak resident memory (`ru_maxrss` from `wait4`) is printed.
//!
//! Not asserted yet: that the peak stays under the bound. What verify holds itself is sized from
//! it, but sled 0.34 keeps much of what a scan reads beyond its `cache_capacity` (on this store,
//! 45 MiB after opening, 151 MiB after the chain's scan, freed by a reopen), so the peak was
//! 372 MiB against 656 MiB for the in-memory verify before (debug builds). See OPERATIONS.md.

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use herald::log::{Durability, Log, LogConfig, SledStore, Store};
use herald::projector::keys::{KS_FIRST, KS_LAST};
use herald::projector::{
    DeliveryId, EndpointId, Event, EventId, NewDelivery, OrgId, Projector, RULES_CURRENT,
};
use uuid::Uuid;

/// 2026-03-15T10:00:00.000Z.
const T0: u64 = 1_773_568_800_000;
const BOUND_BYTES: u64 = 64 << 20;
/// The projection written: larger than the bound by itself.
const PROJECTION_BYTES_LEAST: u64 = 80 << 20;
/// Deliveries a publish fans out to, each with a long url (a delivery row keeps its url).
const FAN_OUT: usize = 4;
const URL_BYTES: usize = 3_000;
const VERIFY_TIMEOUT: Duration = Duration::from_secs(300);

/// Publishes until the stored projection holds at least [`PROJECTION_BYTES_LEAST`]; returns
/// its size.
fn write_store(dir: &Path) -> u64 {
    let store = Arc::new(SledStore::open(dir, 16 << 20).unwrap());
    let log = Log::open(store.clone(), Projector, LogConfig::default()).unwrap();
    let org = OrgId(Uuid::from_u128(1));
    let endpoint = EndpointId(Uuid::from_u128(2));
    let url = format!("https://crm.example.com/{}", "h".repeat(URL_BYTES));
    let (name, enabled_events) = ("CRM".to_owned(), vec!["*".to_owned()]);
    let secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw".to_owned();
    let created =
        Event::EndpointCreated { id: endpoint, org_id: org, url: url.clone(), name, enabled_events, secret };
    log.submit(vec![(T0, Event::RulesAdopted { version: RULES_CURRENT }), (T0, created)]).unwrap().unwrap();
    let publishes = PROJECTION_BYTES_LEAST as usize / (FAN_OUT * URL_BYTES) + 1;
    for batch in 0..publishes.div_ceil(64) {
        let events = (batch * 64..(batch * 64 + 64).min(publishes))
            .map(|i| {
                let at_ms = T0 + i as u64;
                let deliveries = (0..FAN_OUT)
                    .map(|d| NewDelivery {
                        id: DeliveryId(Uuid::from_u128(((i as u128) << 8) + d as u128 + 1)),
                        endpoint_id: Some(endpoint),
                        url: url.clone(),
                        next_attempt_at_ms: at_ms,
                    })
                    .collect();
                let id = EventId(Uuid::from_u128(((i as u128) << 8) + 0xff));
                let payload = format!(r#"{{"call":{i}}}"#).into_bytes();
                let (event_type, call_id, idempotency_key) = ("call.ended".to_owned(), None, None);
                let event = Event::EventPublishedWithDeliveries {
                    id,
                    org_id: org,
                    event_type,
                    payload,
                    call_id,
                    idempotency_key,
                    deliveries,
                };
                (at_ms, event)
            })
            .collect();
        log.submit(events).unwrap().unwrap();
    }
    log.close();
    drop(log);
    store.flush(Durability::Sync).unwrap();
    let mut bytes = 0u64;
    store
        .scan(&[KS_FIRST], &[KS_LAST + 1], &mut |k, v| {
            bytes += (k.len() + v.len()) as u64;
            std::ops::ControlFlow::Continue(())
        })
        .unwrap();
    bytes
}

/// Runs `herald` with `args` until it exits (killed after [`VERIFY_TIMEOUT`]); its exit
/// status, stdout, stderr and peak resident memory in bytes.
fn run_measured(args: &[&str], out_dir: &Path) -> (i32, String, String, u64) {
    let (out, err) = (out_dir.join("stdout"), out_dir.join("stderr"));
    // Waited for by wait4 below, for its rusage, not by `Child::wait`.
    #[allow(clippy::zombie_processes)]
    let child = Command::new(env!("CARGO_BIN_EXE_herald"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out).unwrap())
        .stderr(std::fs::File::create(&err).unwrap())
        .spawn()
        .expect("cannot run herald");
    let pid = child.id() as libc::pid_t;
    let started = Instant::now();
    let mut status = 0;
    // SAFETY: a zeroed rusage is valid; wait4 writes it for the child we started, by its pid.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    loop {
        // SAFETY: as above; WNOHANG returns at once, 0 while the child runs.
        let waited = unsafe { libc::wait4(pid, &mut status, libc::WNOHANG, &mut usage) };
        if waited == pid {
            break;
        }
        assert!(waited == 0, "wait4 failed: {}", std::io::Error::last_os_error());
        if started.elapsed() > VERIFY_TIMEOUT {
            // SAFETY: the pid is our child's, not yet waited for.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
                libc::wait4(pid, &mut status, 0, &mut usage);
            }
            panic!("herald verify ran over {VERIFY_TIMEOUT:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let read = |p: &Path| std::fs::read_to_string(p).unwrap();
    (libc::WEXITSTATUS(status), read(&out), read(&err), usage.ru_maxrss as u64 * 1024)
}

#[test]
fn verify_under_a_memory_bound_smaller_than_the_projection_checks_it_and_cleans_up() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let projection_bytes = write_store(&data);
    assert!(projection_bytes >= PROJECTION_BYTES_LEAST, "the projection holds {projection_bytes} bytes");
    let bound = format!("{}MiB", BOUND_BYTES >> 20);
    let (code, stdout, stderr, peak_bytes) =
        run_measured(&["verify", "--memory-max", &bound, "--data-dir", data.to_str().unwrap()], dir.path());
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.starts_with("ok: "), "{stdout}");
    assert!(stderr.contains("records/s"), "a rate on stderr: {stderr}");
    eprintln!("projection {projection_bytes} bytes; verify peak {peak_bytes} bytes, bound {BOUND_BYTES}");
    assert!(peak_bytes > 0, "wait4 reported the child's peak");
    let left: Vec<_> = std::fs::read_dir(&data)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .filter(|n| n.to_string_lossy().starts_with("verify-scratch-"))
        .collect();
    assert!(left.is_empty(), "scratch left: {left:?}");
}
