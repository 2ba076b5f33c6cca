//! `herald_server::serve` as two cluster nodes in this process over real `nats-server -js`
//! (three, on 127.0.0.1): the node that owns the control partition registers the given admin
//! key (once, in its data directory); a key made through one node works at once through the
//! other; a publish through one is read through the other; both stop cleanly, handing their
//! partitions back. (The real-process tests of CLUSTER.md are tests/e2e_cluster.rs.)

use std::future::Future;
use std::path::Path;
use std::time::{Duration, Instant};

use axum::http::StatusCode;
use herald_cluster::testing::{free_port, NatsCluster};
use herald_server::config::{Config, Secret};
use serde_json::json;

mod common;

use common::{call, publish};

const ADMIN: &str = "sk_cluster_node_admin_0123456789";

fn config(nats: &NatsCluster, id: &str, port: u16, dir: &Path) -> Config {
    let mut c = Config::default();
    c.server.listen = ([127, 0, 0, 1], port).into();
    c.server.shutdown_timeout = Duration::from_secs(2);
    c.store.data_dir = dir.join(id);
    c.cluster.nats_url = format!("{},{},{}", nats.url(0), nats.url(1), nats.url(2));
    c.cluster.node_id = id.into();
    c.cluster.advertise = format!("http://127.0.0.1:{port}");
    c.cluster.partitions = 4;
    c.cluster.lease = Duration::from_millis(900);
    c.cluster.cluster_secret = Secret::new("cluster-node-test-secret");
    c
}

/// Starts a node; the returned sender stops it, the handle gives `serve`'s result.
fn start(config: Config) -> (tokio::sync::oneshot::Sender<()>, tokio::task::JoinHandle<Result<(), String>>) {
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let stop = async move {
        let _ = rx.await;
    };
    let handle = tokio::spawn(herald_server::serve(config, Some(ADMIN.into()), stop));
    (tx, handle)
}

async fn eventually<F: Future<Output = bool>>(within: Duration, what: &str, mut check: impl FnMut() -> F) {
    let started = Instant::now();
    while !check().await {
        assert!(started.elapsed() < within, "{what} not within {within:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn ready(addr: &str) -> bool {
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<axum::body::Body>();
    let uri = format!("{addr}/readyz").parse().unwrap();
    matches!(
        tokio::time::timeout(Duration::from_secs(2), client.get(uri)).await,
        Ok(Ok(answer)) if answer.status() == StatusCode::OK
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_serve_nodes_share_keys_and_data_and_stop_cleanly() {
    let nats = tokio::time::timeout(Duration::from_secs(40), NatsCluster::start(3)).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let ports = [free_port(), free_port()];
    let addrs: Vec<String> = ports.iter().map(|p| format!("http://127.0.0.1:{p}")).collect();
    let (stop_a, node_a) = start(config(&nats, "a", ports[0], dir.path()));
    let a = addrs[0].clone();
    eventually(Duration::from_secs(30), "node a ready", || ready(&a)).await;
    let (stop_b, node_b) = start(config(&nats, "b", ports[1], dir.path()));
    let b = addrs[1].clone();
    eventually(Duration::from_secs(30), "node b ready", || ready(&b)).await;

    // The given admin key, registered once by the control partition's owner.
    let files = ["a", "b"].iter().filter(|id| dir.path().join(id).join("admin.key").exists()).count();
    assert_eq!(files, 1, "exactly the control owner wrote admin.key");
    let org = uuid::Uuid::now_v7().to_string();
    let scopes = json!(["endpoints.write", "events.write", "deliveries.read"]);
    let made =
        call(&addrs[1], "POST", "/v1/api_keys", ADMIN, Some(json!({"org_id": org, "scopes": scopes})), &[])
            .await;
    assert_eq!(made.status, StatusCode::CREATED, "{}", made.text());
    let key = made.json()["key"].as_str().unwrap().to_owned();
    // Used at once through the other node; the partition may be either node's.
    let endpoint = json!({"url": "https://example.com/hook"});
    let created = call(&addrs[0], "POST", "/v1/endpoints", &key, Some(endpoint), &[]).await;
    assert_eq!(created.status, StatusCode::CREATED, "{}", created.text());
    let event = publish(&addrs[0], &key, "t.x").await;
    for addr in &addrs {
        let got = call(addr, "GET", &format!("/v1/events/{event}"), &key, None, &[]).await;
        assert_eq!(got.status, StatusCode::OK, "{}", got.text());
        assert_eq!(got.json()["org_id"], org);
        assert!(got.headers.contains_key("x-request-id"));
    }
    let metrics = call(&addrs[0], "GET", "/metrics", "", None, &[]).await;
    assert!(metrics.text().contains("herald_cluster_partitions_served{node=\"a\"}"), "{}", metrics.text());

    // Both stop within their shutdown timeout (plus the node's hand-back).
    let _ = stop_b.send(());
    let _ = stop_a.send(());
    for node in [node_b, node_a] {
        let result = tokio::time::timeout(Duration::from_secs(20), node).await.expect("stopped in time");
        assert_eq!(result.unwrap(), Ok(()));
    }
    drop(nats);
}
