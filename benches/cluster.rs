//! Cluster mode's figures (CLUSTER.md "Figures"), with real processes on 127.0.0.1: single-node
//! herald, then 1, 2 and 3 herald nodes on one three-server NATS cluster, each run with one
//! receiver and the same publish load through every node, in the same run. Per run: publishes/s,
//! deliveries/s (first publish to the last event received), publish p99, CPU per delivered event
//! of each herald node and of the NATS servers (utime + stime from `/proc/<pid>/stat`); with two
//! nodes or more, the failover time: `kill -9` of a node to the first delivery, by its new owner,
//! of each partition it held (the slowest of them).
//!
//! On one machine the nodes share its cores, so the figure that shows scaling is CPU per
//! delivered event per node, and whether it stays flat as nodes are added.
//!
//! Run: `cargo bench --bench cluster` (`-- --json FILE`); size by `HERALD_BENCH_CLUSTER_EVENTS`
//! (default 5000), `HERALD_BENCH_CLUSTER_PUBLISHERS` (8), `HERALD_BENCH_CLUSTER_PARTITIONS` (12),
//! `HERALD_BENCH_CLUSTER_LEASE_MS` (2000).

#[path = "../tests/common/cluster.rs"]
mod cluster;
mod common;
#[path = "../tests/common/mod.rs"]
mod harness;

use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cluster::{first_deliveries_after, org_in_partition, Cluster, Load, Pids, Tenant};
use common::{report, Row};
use harness::{call_raw_within, Receiver, Server, ORG_SCOPES};
use serde_json::json;

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// The size of every run.
#[derive(Clone, Copy)]
struct Size {
    events: usize,
    publishers: usize,
    partitions: u32,
    lease: Duration,
}

/// One run's figures.
struct Figures {
    publishes_per_s: f64,
    deliveries_per_s: f64,
    p99_ms: f64,
    /// Each herald node's CPU per delivered event, µs, by node name.
    cpu_us: Vec<(String, f64)>,
    /// The NATS servers' CPU per delivered event, µs (0 for single node).
    nats_cpu_us: f64,
    /// Publishes answered 503 and tried again (a partition moving).
    refused: u64,
    /// kill -9 to the first delivery of each moved partition, the slowest, ms.
    failover_ms: Option<f64>,
}

/// Publishes `body` for `key` through `url` until it is acknowledged: a 503 (a partition moving
/// between nodes) is tried again after 20 ms, as a client does. Returns the time from the first
/// try to the 202, the event id and the tries answered 503.
fn publish_until_accepted(url: &str, key: &str, body: &str) -> (Duration, String, u64) {
    let started = Instant::now();
    let mut refused = 0;
    loop {
        let answer = call_raw_within(url, "POST", Some(key), Some(body), &[], Duration::from_secs(30));
        match answer {
            Ok((202, text)) => {
                let v: serde_json::Value = serde_json::from_str(&text).expect("a 202 answer is JSON");
                return (started.elapsed(), v["id"].as_str().expect("an event id").to_owned(), refused);
            }
            Ok((503, _)) if started.elapsed() < Duration::from_secs(30) => {
                refused += 1;
                std::thread::sleep(Duration::from_millis(20));
            }
            other => panic!("publish through {url}: {other:?}"),
        }
    }
}

/// What the publishers got: each publish's latency, the events, the tries answered 503.
type Published = (Vec<Duration>, Vec<String>, u64);

/// Publishes `size.events` events over `targets` (base URLs) for `tenants`, round robin, from
/// `size.publishers` threads.
fn publish_all(targets: &[String], tenants: &[Tenant], size: Size) -> Published {
    let next = Arc::new(AtomicUsize::new(0));
    let out = Arc::new(Mutex::new((Vec::new(), Vec::new(), 0)));
    std::thread::scope(|scope| {
        for _ in 0..size.publishers {
            let (next, out) = (next.clone(), out.clone());
            scope.spawn(move || loop {
                let n = next.fetch_add(1, Ordering::SeqCst);
                if n >= size.events {
                    return;
                }
                let tenant = &tenants[n % tenants.len()];
                let target = &targets[(n / tenants.len()) % targets.len()];
                let body = json!({"event_type": "bench.cluster", "payload": {"n": n}}).to_string();
                let (took, event, refused) =
                    publish_until_accepted(&format!("{target}/v1/events"), &tenant.key, &body);
                let mut out = out.lock().unwrap_or_else(|e| e.into_inner());
                out.0.push(took);
                out.1.push(event);
                out.2 += refused;
            });
        }
    });
    let out = std::mem::take(&mut *out.lock().unwrap_or_else(|e| e.into_inner()));
    out
}

/// Waits until `receiver` got every event of `events`; returns when the last one arrived.
fn last_arrival(receiver: &Receiver, events: &[String]) -> Instant {
    let wanted: HashSet<&str> = events.iter().map(String::as_str).collect();
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let got = receiver.received();
        let seen: HashSet<&str> = got.iter().map(|r| r.header("webhook-id")).collect();
        if wanted.iter().all(|e| seen.contains(e)) {
            return got
                .iter()
                .filter(|r| wanted.contains(r.header("webhook-id")))
                .map(|r| r.at)
                .max()
                .expect("one");
        }
        assert!(Instant::now() < deadline, "deliveries never completed: {} of {}", seen.len(), wanted.len());
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn p99_ms(latencies: &mut [Duration]) -> f64 {
    latencies.sort();
    let i = (latencies.len() * 99 / 100).min(latencies.len().saturating_sub(1));
    latencies.get(i).map_or(0.0, |d| d.as_secs_f64() * 1e3)
}

/// Runs the load and returns the figures, CPU measured over `pids` (herald nodes) and
/// `nats_pids`, from the first publish to the last delivery.
fn measure(
    targets: &[String],
    tenants: &[Tenant],
    receiver: &Receiver,
    nodes: &[(String, u32)],
    nats_pids: &[u32],
    size: Size,
) -> Figures {
    let cpu = |pids: &[u32]| pids.iter().map(|p| cluster::cpu_seconds_of(*p)).collect::<Vec<f64>>();
    let node_pids: Vec<u32> = nodes.iter().map(|n| n.1).collect();
    let (nodes_before, nats_before) = (cpu(&node_pids), cpu(nats_pids));
    let started = Instant::now();
    let (mut latencies, events, refused) = publish_all(targets, tenants, size);
    let published = started.elapsed();
    let last = last_arrival(receiver, &events);
    let (nodes_after, nats_after) = (cpu(&node_pids), cpu(nats_pids));
    let per_event = |s: f64| s * 1e6 / events.len() as f64;
    let cpu_us = nodes
        .iter()
        .enumerate()
        .map(|(i, (name, _))| (name.clone(), per_event(nodes_after[i] - nodes_before[i])))
        .collect();
    let nats: f64 = nats_after.iter().sum::<f64>() - nats_before.iter().sum::<f64>();
    Figures {
        publishes_per_s: events.len() as f64 / published.as_secs_f64(),
        deliveries_per_s: events.len() as f64 / last.duration_since(started).as_secs_f64(),
        p99_ms: p99_ms(&mut latencies),
        cpu_us,
        nats_cpu_us: per_event(nats),
        refused,
        failover_ms: None,
    }
}

/// Single-node herald, one tenant per partition number (for the same load's shape).
fn single(size: Size) -> Figures {
    let server = Server::start();
    let receiver = Receiver::start();
    let tenants: Vec<Tenant> = (0..size.partitions)
        .map(|p| {
            let org = org_in_partition(p, size.partitions);
            let key = server.key_for(&org, ORG_SCOPES);
            let endpoint = server.endpoint(&key, &receiver.url(&format!("/t{p}")), &["*"]);
            Tenant { org, key, partition: p, endpoint: endpoint["id"].as_str().expect("id").to_owned() }
        })
        .collect();
    let pid = server.pid().expect("herald runs");
    measure(&[server.url("")], &tenants, &receiver, &[("single".into(), pid)], &[], size)
}

/// `nodes` herald nodes on a fresh three-server NATS cluster; with two or more, a failover after.
fn clustered(nodes: usize, size: Size) -> Figures {
    let pids = Pids::default();
    let mut c = Cluster::start(&pids, nodes, size.partitions, size.lease, &[]);
    c.wait_ready(Duration::from_secs(120));
    let receiver = Receiver::start();
    let tenants = c.tenants(0, &receiver);
    let targets: Vec<String> = c.nodes.iter().map(|n| n.url("")).collect();
    let named: Vec<(String, u32)> = c.nodes.iter().map(|n| (n.id.clone(), n.pid().expect("runs"))).collect();
    let nats_pids: Vec<u32> = (0..3).filter_map(|i| c.nats.pid(i)).collect();
    let mut figures = measure(&targets, &tenants, &receiver, &named, &nats_pids, size);
    if nodes >= 2 {
        figures.failover_ms = Some(failover(&mut c, Arc::new(tenants), &receiver));
    }
    figures
}

/// Under a steady load through every node, `kill -9` of the last node: the time to the first
/// delivery of an event published after the kill, for each partition it held; the slowest, ms.
fn failover(c: &mut Cluster, tenants: Arc<Vec<Tenant>>, receiver: &Receiver) -> f64 {
    let targets = c.nodes.iter().map(|n| n.url("")).collect();
    let load = Load::start(targets, tenants.clone(), 2, Duration::from_millis(5));
    load.wait_more(50, &[], &tenants, Duration::from_secs(60));
    let victim = c.nodes.len() - 1;
    let id = c.nodes[victim].id.clone();
    let moved: Vec<u32> = c.held_by(&id).into_iter().filter(|p| *p < c.partitions).collect();
    c.nodes[victim].kill9();
    let killed = Instant::now();
    let deadline = killed + Duration::from_secs(120);
    let firsts = loop {
        let firsts = first_deliveries_after(receiver, &load.acked(), &tenants, &moved, killed);
        if firsts.len() == moved.len() || Instant::now() > deadline {
            break firsts;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    drop(load.stop());
    assert_eq!(firsts.len(), moved.len(), "partitions {moved:?} of {id} delivering again: {firsts:?}");
    println!("failover of {id} (partitions {moved:?}): first delivery per partition {firsts:?}");
    firsts.values().max().map_or(0.0, |d| d.as_secs_f64() * 1e3)
}

fn row(name: String, value: f64, unit: &'static str, limit_name: &str, limit: f64) -> Row {
    Row { name, value, unit, limit_name: limit_name.to_owned(), limit, target: String::new(), met: None }
}

/// The rows of one run, beside single node's figures as their limit.
fn rows_of(label: &str, f: &Figures, base: &Figures, lease: Duration) -> Vec<Row> {
    let single_cpu: f64 = base.cpu_us.iter().map(|c| c.1).sum();
    let mut rows = vec![
        row(format!("{label}: publishes/s"), f.publishes_per_s, "/s", "single node", base.publishes_per_s),
        row(format!("{label}: deliveries/s"), f.deliveries_per_s, "/s", "single node", base.deliveries_per_s),
        row(format!("{label}: publish p99"), f.p99_ms, "ms", "single node", base.p99_ms),
    ];
    let total: f64 = f.cpu_us.iter().map(|c| c.1).sum();
    rows.push(row(
        format!("{label}: herald CPU per delivered event, all nodes"),
        total,
        "µs",
        "single node",
        single_cpu,
    ));
    for (node, us) in &f.cpu_us {
        let share = single_cpu / f.cpu_us.len() as f64;
        rows.push(row(
            format!("{label}: CPU per delivered event, node {node}"),
            *us,
            "µs",
            "single node / nodes",
            share,
        ));
    }
    rows.push(row(format!("{label}: publishes answered 503 and tried again"), f.refused as f64, "", "", 0.0));
    if f.nats_cpu_us > 0.0 {
        rows.push(row(
            format!("{label}: nats-servers' CPU per delivered event"),
            f.nats_cpu_us,
            "µs",
            "",
            0.0,
        ));
    }
    if let Some(ms) = f.failover_ms {
        let name = format!("{label}: failover, kill -9 to delivering again (lease {lease:?})");
        rows.push(row(name, ms, "ms", "lease", lease.as_secs_f64() * 1e3));
    }
    rows
}

fn main() {
    let size = Size {
        events: env_or("HERALD_BENCH_CLUSTER_EVENTS", 5000) as usize,
        publishers: env_or("HERALD_BENCH_CLUSTER_PUBLISHERS", 8) as usize,
        partitions: env_or("HERALD_BENCH_CLUSTER_PARTITIONS", 12) as u32,
        lease: Duration::from_millis(env_or("HERALD_BENCH_CLUSTER_LEASE_MS", 2000)),
    };
    println!(
        "cluster bench: {} events, {} publishers, {} partitions, lease {:?}, {} cores",
        size.events,
        size.publishers,
        size.partitions,
        size.lease,
        common::available_cores()
    );
    let base = single(size);
    let mut rows = rows_of("single node", &base, &base, size.lease);
    for nodes in 1..=3 {
        let figures = clustered(nodes, size);
        rows.extend(rows_of(&format!("cluster, {nodes} node(s)"), &figures, &base, size.lease));
    }
    report(&rows);
}
