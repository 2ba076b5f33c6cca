//! Descriptor pressure from outside: herald under an open-file limit of 1,024, and 1,500 clients
//! that open a connection, send half a request head and hold it. With the default connection cap
//! (sized from the limit) the connections over the cap get a 503 at once, a normal client's
//! publish is answered (503 or 202) within a bound while they are held and 202 once they are
//! gone, and the receiver is never blamed. (When descriptors do run out, the dispatcher's EMFILE
//! is this host's fault, not the receiver's: the engine's tests script that with a sender.)

mod common;

use std::io::Write;
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::{call_raw, Receiver, Server, ORG_SCOPES};
use serde_json::json;

const OPEN_FILES_MAX: u64 = 1_024;
const IDLE_CLIENTS: usize = 1_500;
/// How long any one answer may take while the idle clients hold their connections.
const ANSWER_MAX: Duration = Duration::from_secs(10);

/// Clients that connect, send the start of a request head, and hold the connection open.
fn idle_clients(server: &Server) -> Vec<TcpStream> {
    let addr: std::net::SocketAddr = format!("127.0.0.1:{}", server.port).parse().unwrap();
    (0..IDLE_CLIENTS)
        .filter_map(|_| {
            let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(1)).ok()?;
            let _ = stream.write_all(b"POST /v1/events HTTP/1.1\r\nhost: herald\r\n");
            Some(stream)
        })
        .collect()
}

fn publish(server: &Server, key: &str, n: usize) -> (u16, serde_json::Value, Duration) {
    let started = Instant::now();
    let body = json!({"event_type": "call.ended", "payload": {"n": n}}).to_string();
    let answer = call_raw(&server.url("/v1/events"), "POST", Some(key), Some(&body), &[]);
    let took = started.elapsed();
    match answer {
        Ok((status, text)) => (status, serde_json::from_str(&text).unwrap_or_default(), took),
        // Refused over the cap, the connection may also close before the request is written.
        Err(e) => (0, json!({ "error": e }), took),
    }
}

fn endpoint_status(server: &Server, key: &str, id: &str) -> String {
    let (status, body) = server.call("GET", &format!("/v1/endpoints/{id}"), Some(key), None);
    assert_eq!(status, 200, "{body}");
    body["status"].as_str().unwrap().to_owned()
}

#[test]
fn idle_connections_over_the_cap_are_refused_at_once_and_never_starve_a_normal_client() {
    common::raise_own_open_files_limit(IDLE_CLIENTS);
    let receiver = Receiver::start();
    let server = Server::start_limited(&[], Some(OPEN_FILES_MAX));
    let (_, key) = server.org_key(ORG_SCOPES);
    let endpoint = server.endpoint(&key, &receiver.url("/hook"), &["*"]);
    let endpoint_id = endpoint["id"].as_str().unwrap().to_owned();

    let held = idle_clients(&server);
    assert!(held.len() > OPEN_FILES_MAX as usize, "only {} idle clients connected", held.len());
    let mut acknowledged = 0;
    for n in 0..20 {
        let (status, body, took) = publish(&server, &key, n);
        assert!(took < ANSWER_MAX, "publish {n} took {took:?}");
        assert!(matches!(status, 202 | 503 | 0), "publish {n} answered {status}: {body}");
        if status == 202 {
            acknowledged += 1;
        }
    }
    drop(held);

    // Once they are gone, a publish is acknowledged (herald notices the closes at once).
    let deadline = Instant::now() + ANSWER_MAX;
    loop {
        let (status, _, _) = publish(&server, &key, 100);
        if status == 202 {
            acknowledged += 1;
            break;
        }
        assert!(Instant::now() < deadline, "publishes still refused after the idle clients left");
        std::thread::sleep(Duration::from_millis(50));
    }
    receiver.wait_for(acknowledged);
    assert_eq!(endpoint_status(&server, &key, &endpoint_id), "active");
    assert!(server.metric("herald_connections_refused_total ") > 0.0);
}
