//! `herald verify --memory-max` on a store whose projection alone is larger than the bound (the
//! in-memory way held it twice, stored and rebuilt): it verifies, tells its rate, deletes its
//! scratch store, and its peak resident memory (`VmHWM`, see `common/peak.rs`) stays under the bound
//! plus what the process holds whatever the store's size: the peak of the same verify on a store
//! of a few records (the executable, two sled stores open), measured in the same run. The same
//! store verified under a bound far above it peaks beyond that sum: without the bound held,
//! this store would break it.

#[path = "common/peak.rs"]
mod peak;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

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

/// Publishes until the stored projection holds at least `projection_bytes_least`; returns its
/// size.
fn write_store(dir: &Path, projection_bytes_least: u64) -> u64 {
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
    let publishes = projection_bytes_least as usize / (FAN_OUT * URL_BYTES) + 1;
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

/// Runs `herald verify --memory-max bound` on `data`: checks it verified, told its rate and
/// left no scratch store; returns its peak resident memory.
fn verify_peak(data: &Path, bound: &str, out_dir: &Path) -> u64 {
    let args = ["verify", "--memory-max", bound, "--data-dir", data.to_str().unwrap()];
    let peak::Measured { code, stdout, stderr, peak_bytes, .. } =
        peak::run_measured(Path::new(env!("CARGO_BIN_EXE_herald")), &args, out_dir, VERIFY_TIMEOUT);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.starts_with("ok: "), "{stdout}");
    assert!(stderr.contains("records/s"), "a rate on stderr: {stderr}");
    assert!(peak_bytes > 0, "the child's peak was read");
    let left: Vec<_> = std::fs::read_dir(data)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .filter(|n| n.to_string_lossy().starts_with("verify-scratch-"))
        .collect();
    assert!(left.is_empty(), "scratch left: {left:?}");
    peak_bytes
}

#[test]
fn verify_under_a_memory_bound_smaller_than_the_projection_holds_it_and_cleans_up() {
    let dir = tempfile::tempdir().unwrap();
    let (small, data) = (dir.path().join("small"), dir.path().join("data"));
    write_store(&small, 1);
    let projection_bytes = write_store(&data, PROJECTION_BYTES_LEAST);
    assert!(projection_bytes >= PROJECTION_BYTES_LEAST, "the projection holds {projection_bytes} bytes");
    let bound = format!("{}MiB", BOUND_BYTES >> 20);
    let fixed_bytes = verify_peak(&small, &bound, dir.path());
    let peak_bytes = verify_peak(&data, &bound, dir.path());
    let unbounded_bytes = verify_peak(&data, "1GiB", dir.path());
    let mib = |b: u64| b >> 20;
    eprintln!(
        "projection {} MiB; verify peak {} MiB under --memory-max {bound}, {} MiB on a store of a few records, {} MiB under 1GiB",
        mib(projection_bytes),
        mib(peak_bytes),
        mib(fixed_bytes),
        mib(unbounded_bytes)
    );
    assert!(
        peak_bytes <= fixed_bytes + BOUND_BYTES,
        "verify peaked at {} MiB: over the bound of {bound} plus the {} MiB a verify of a few records holds",
        mib(peak_bytes),
        mib(fixed_bytes)
    );
    assert!(
        unbounded_bytes > fixed_bytes + BOUND_BYTES,
        "under a bound far above it, verify peaked at {} MiB: the store is too small to show the bound held",
        mib(unbounded_bytes)
    );
}
