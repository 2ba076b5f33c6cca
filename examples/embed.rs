//! herald embedded in a Rust service: open an engine on a scratch data directory, subscribe a
//! receiver on 127.0.0.1, publish an event, and watch it arrive signed and become `delivered`
//! (told by `Engine::subscribe`, without polling).
//!
//! Run it with `cargo run --example embed`.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use herald::engine::signing::{verify, Secret};
use herald::projector::{DeliveryStatus, EndpointId, OrgId};
use herald::{Actor, Command, DeliveryConfig, Engine, EngineConfig, Reply};

/// The allocator the `herald` binary runs with: sled's writes cost about twice as much under
/// glibc's malloc. The choice is the service's, not the library's.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// A request as the receiver saw it.
struct Received {
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Received {
    fn header(&self, name: &str) -> &str {
        self.headers.iter().find(|(n, _)| n == name).map_or("", |(_, v)| v.as_str())
    }
}

/// A tiny HTTP/1.1 receiver: answers every POST with 204 and hands the request to `seen`.
fn receiver(seen: mpsc::Sender<Received>) -> std::io::Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let port = listener.local_addr()?.port();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let seen = seen.clone();
            std::thread::spawn(move || {
                let mut reader = BufReader::new(stream.try_clone()?);
                let mut stream = stream;
                loop {
                    let mut line = String::new();
                    if reader.read_line(&mut line)? == 0 {
                        return Ok::<(), std::io::Error>(());
                    }
                    let mut headers = Vec::new();
                    loop {
                        line.clear();
                        reader.read_line(&mut line)?;
                        let Some((name, value)) = line.trim_end().split_once(':') else { break };
                        headers.push((name.trim().to_ascii_lowercase(), value.trim().to_owned()));
                    }
                    let len = headers
                        .iter()
                        .find(|(n, _)| n == "content-length")
                        .and_then(|(_, v)| v.parse::<usize>().ok())
                        .unwrap_or(0);
                    let mut body = vec![0; len];
                    reader.read_exact(&mut body)?;
                    stream.write_all(b"HTTP/1.1 204 No Content\r\ncontent-length: 0\r\n\r\n")?;
                    let _ = seen.send(Received { headers, body });
                }
            });
        }
    });
    Ok(port)
}

pub fn main() -> Result<(), Box<dyn std::error::Error>> {
    let data_dir = tempfile::tempdir()?;
    let (seen, arrivals) = mpsc::channel();
    let port = receiver(seen)?;

    // The receiver is on loopback, which herald refuses by default (SSRF guard): allow it here.
    let config = EngineConfig {
        data_dir: data_dir.path().to_owned(),
        delivery: DeliveryConfig { allow_private_targets: true, ..DeliveryConfig::default() },
        ..EngineConfig::default()
    };
    let engine = Engine::open(config)?;

    let org = OrgId(uuid::Uuid::now_v7());
    let endpoint = EndpointId(uuid::Uuid::now_v7());
    let secret = match engine.execute_blocking(
        Actor::admin(),
        Command::CreateEndpoint {
            id: endpoint,
            org_id: org,
            url: format!("http://127.0.0.1:{port}/webhooks"),
            name: "example receiver".into(),
            enabled_events: vec!["call.ended".into()],
            secret: None,
            settings: Default::default(),
        },
    )? {
        Reply::Endpoint { secret, .. } => Secret::parse(&secret)?,
        other => return Err(format!("unexpected reply {other:?}").into()),
    };

    // Delivery changes as each batch becomes durable; subscribed before the publish, so none is
    // missed (a subscriber that falls far behind is told how many it missed instead).
    let mut changes = engine.subscribe();
    let payload = br#"{"call_id":"c-1","duration_s":42}"#;
    let Reply::Published { id, delivery_ids, .. } = engine.publish(org, "call.ended", payload)? else {
        return Err("publish did not answer Published".into());
    };
    println!("published event {id}: {} delivery, durable on disk", delivery_ids.len());

    let got = arrivals.recv_timeout(Duration::from_secs(10))?;
    let timestamp: i64 = got.header("webhook-timestamp").parse()?;
    let signed =
        verify(&secret, got.header("webhook-id"), timestamp, &got.body, got.header("webhook-signature"));
    println!(
        "receiver got webhook-id {} ({} bytes), signature valid: {signed}",
        got.header("webhook-id"),
        got.body.len()
    );

    // The attempt's outcome is recorded in the log right after the receiver answers; the
    // subscription tells it once durable.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let change = changes.recv_timeout(left)?;
        println!(
            "  delivery {} is now {} ({} attempt(s))",
            change.delivery_id,
            change.status.name(),
            change.attempt_count
        );
        if change.delivery_id == delivery_ids[0] && change.status == DeliveryStatus::Delivered {
            break;
        }
    }
    let delivery = engine.delivery(delivery_ids[0])?.ok_or("the delivery is missing")?;
    println!(
        "delivery {} is {} after {} attempt(s)",
        delivery.id,
        delivery.status.name(),
        delivery.attempt_count
    );
    for a in engine.attempts(delivery.id, 0, 10)? {
        println!("  attempt {}: status {:?}, {} ms", a.attempt, a.response_status, a.duration_ms());
    }
    let report = engine.shutdown();
    println!("stopped: {} attempt(s) interrupted", report.interrupted);
    if !signed || delivery.status != DeliveryStatus::Delivered {
        return Err("the example did not deliver as expected".into());
    }
    Ok(())
}
