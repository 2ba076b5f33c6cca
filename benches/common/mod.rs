//! What the benchmarks share: the figure row, its table and JSON, and a history generator that
//! writes a realistic log through the projector (publish, delivery, attempts) without HTTP.

#![allow(dead_code)]

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use herald_log::{Durability, Log, LogConfig, SledStore, Store};
use herald_projector::{
    AttemptOutcome, DeliveryId, EndpointId, Event, EventId, NewDelivery, OrgId, Projector, Trigger,
};
use uuid::Uuid;

/// The allocator `herald serve` runs with, so in-process figures are the binary's.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// One figure beside its limit measured in the same run.
pub struct Row {
    pub name: String,
    pub value: f64,
    pub unit: &'static str,
    /// What the figure is compared with; empty when it is an absolute target only.
    pub limit_name: String,
    /// 0 when there is no measured limit.
    pub limit: f64,
    /// The target, as text (`≥ 80 % of the limit`, `≤ 300 MB`).
    pub target: String,
    /// Whether the target is met, when there is one.
    pub met: Option<bool>,
}

impl Row {
    pub fn ratio(&self) -> Option<f64> {
        (self.limit > 0.0).then(|| self.value / self.limit)
    }
}

/// `1,234,567`, or two decimals under 100.
pub fn fmt_value(v: f64) -> String {
    let whole = format!("{:.0}", v.abs());
    let mut out = String::new();
    for (i, c) in whole.chars().enumerate() {
        if i > 0 && (whole.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    if v < 0.0 {
        out.insert(0, '-');
    }
    if v.abs() < 100.0 && v.fract() != 0.0 {
        return format!("{v:.2}");
    }
    out
}

pub fn print_rows(rows: &[Row]) {
    println!("| figure | value | limit (same run) | ratio | target |");
    println!("| --- | ---: | --- | ---: | --- |");
    for r in rows {
        let limit =
            if r.limit > 0.0 { format!("{}: {}", r.limit_name, fmt_value(r.limit)) } else { String::new() };
        // Rates read as a share of their limit; times as a multiple of theirs.
        let ratio = match r.ratio() {
            Some(x) if r.unit == "ms" => format!("{x:.1}×"),
            Some(x) => format!("{:.0} %", 100.0 * x),
            None => String::new(),
        };
        let target = match r.met {
            Some(true) => format!("{} — met", r.target),
            Some(false) => format!("{} — missed", r.target),
            None => r.target.clone(),
        };
        println!("| {} | {} {} | {} | {} | {} |", r.name, fmt_value(r.value), r.unit, limit, ratio, target);
    }
}

fn json_str(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

pub fn to_json(rows: &[Row]) -> String {
    let items: Vec<String> = rows
        .iter()
        .map(|r| {
            format!(
                "{{\"figure\":{},\"value\":{:.3},\"unit\":{},\"limit_name\":{},\"limit\":{:.3},\"ratio\":{},\"target\":{},\"met\":{}}}",
                json_str(&r.name),
                r.value,
                json_str(r.unit),
                json_str(&r.limit_name),
                r.limit,
                r.ratio().map_or("null".to_owned(), |x| format!("{x:.4}")),
                json_str(&r.target),
                r.met.map_or("null".to_owned(), |m| m.to_string()),
            )
        })
        .collect();
    format!("[{}]\n", items.join(","))
}

/// Prints the rows and writes them as JSON when `--json FILE` was given.
pub fn report(rows: &[Row]) {
    print_rows(rows);
    let args: Vec<String> = std::env::args().collect();
    if let Some(path) = args.iter().position(|a| a == "--json").and_then(|i| args.get(i + 1)) {
        std::fs::write(path, to_json(rows)).expect("cannot write the JSON figures");
    }
}

pub const ORG: OrgId = OrgId(Uuid::from_u128(1));
pub const ENDPOINT: EndpointId = EndpointId(Uuid::from_u128(2));
pub const URL: &str = "https://receiver.example/hook";

/// The record of the one endpoint a history's deliveries go to.
pub fn endpoint_created() -> Event {
    Event::EndpointCreated {
        id: ENDPOINT,
        org_id: ORG,
        url: URL.into(),
        name: "bench".into(),
        enabled_events: vec!["*".into()],
        secret: "whsec_YmVuY2htYXJrc2VjcmV0YmVuY2htYXJr".into(),
    }
}

/// How one delivery of the history ends.
#[derive(Clone, Copy)]
pub enum Fate {
    /// `failures` failed attempts, then a 2xx.
    Delivered { failures: u32 },
    /// Not attempted yet, due at this time (pending).
    Pending { due_at_ms: u64 },
}

/// Writes a log through the projector: one endpoint, then per delivery an event of
/// `payload_bytes`, its delivery and its attempts. Returns the log's last seq.
pub fn write_history(
    store: Arc<dyn Store>,
    start_ms: u64,
    count: u64,
    first_n: u64,
    payload_bytes: usize,
    fate: Fate,
) -> u64 {
    let config =
        LogConfig { batch_commands_max: 64, queue_commands_max: 1024, durability: Durability::Flush };
    let log = Log::open(store, Projector, config).unwrap();
    if log.committed_seq() == 0 {
        log.submit(vec![(start_ms, endpoint_created())]).unwrap().unwrap();
    }
    // Small commands, two in flight: the writer folds one while the other is flushed, and its
    // batches stay at several hundred keys. sled's atomic batch holds one epoch guard from its
    // first key to its last, so its cost per key grows with its length (a raw batch of 256 keys:
    // 5.7 µs a key; of 20,000: 8.6 µs).
    let per_command = 30u64;
    let in_flight_max = 2;
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    let mut in_flight = 0;
    let mut i = first_n;
    let end = first_n + count;
    while i < end {
        let mut events = Vec::with_capacity(per_command as usize * 4);
        for n in i..(i + per_command).min(end) {
            let at_ms = start_ms + n;
            let event_id = EventId(Uuid::from_u128(1 << 64 | n as u128));
            let delivery_id = DeliveryId(Uuid::from_u128(2 << 64 | n as u128));
            let (failures, due_at_ms) = match fate {
                Fate::Delivered { failures } => (Some(failures), at_ms),
                Fate::Pending { due_at_ms } => (None, due_at_ms),
            };
            // A publish as the engine writes it: the event and its delivery in one record.
            events.push((
                at_ms,
                Event::EventPublishedWithDeliveries {
                    id: event_id,
                    org_id: ORG,
                    event_type: "call.queued".into(),
                    payload: vec![b'x'; payload_bytes],
                    call_id: None,
                    idempotency_key: None,
                    deliveries: vec![NewDelivery {
                        id: delivery_id,
                        endpoint_id: Some(ENDPOINT),
                        url: URL.into(),
                        next_attempt_at_ms: due_at_ms,
                    }],
                },
            ));
            let Some(failures) = failures else { continue };
            for a in 1..=failures {
                events.push((
                    at_ms,
                    Event::AttemptRecorded {
                        delivery_id,
                        attempt: a,
                        trigger: Trigger::Auto,
                        started_at_ms: at_ms,
                        finished_at_ms: at_ms,
                        outcome: AttemptOutcome::Failed { status: Some(503), error: "HTTP 503".into() },
                        response_excerpt: b"busy".to_vec(),
                        retry_at_ms: Some(at_ms + u64::from(a)),
                    },
                ));
            }
            events.push((
                at_ms,
                Event::AttemptRecorded {
                    delivery_id,
                    attempt: failures + 1,
                    trigger: Trigger::Auto,
                    started_at_ms: at_ms,
                    finished_at_ms: at_ms,
                    outcome: AttemptOutcome::Delivered { status: 200 },
                    response_excerpt: b"ok".to_vec(),
                    retry_at_ms: None,
                },
            ));
        }
        if in_flight == in_flight_max {
            let outcome: herald_log::Outcome<Projector> = done_rx.recv().unwrap();
            outcome.unwrap().unwrap();
            in_flight -= 1;
        }
        let done_tx = done_tx.clone();
        log.submit_with(events, move |outcome| {
            let _ = done_tx.send(outcome);
        });
        in_flight += 1;
        i += per_command;
    }
    for _ in 0..in_flight {
        done_rx.recv().unwrap().unwrap().unwrap();
    }
    let last = log.committed_seq();
    log.close();
    last
}

/// A sled store in `dir`, as herald opens it.
pub fn sled(dir: &std::path::Path) -> Arc<dyn Store> {
    Arc::new(SledStore::open(dir, 64 << 20).unwrap())
}

// ---------------------------------------------------------------------------------------------
// Timing counters: CPU seconds per thread group (from /proc), to tell what a figure is bound by

#[derive(Clone, Default)]
pub struct Cpu {
    /// CPU seconds by thread name (trailing digits dropped), this process.
    threads: HashMap<String, f64>,
    /// Busy CPU seconds of the whole machine (every process), from /proc/stat.
    machine_busy: f64,
    at: Option<Instant>,
}

pub fn cpu_now() -> Cpu {
    // SAFETY: sysconf takes no pointer and only reads a configuration value.
    let tick = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let mut threads = HashMap::new();
    for entry in std::fs::read_dir("/proc/self/task").into_iter().flatten().flatten() {
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else { continue };
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else { continue };
        let name = stat[open + 1..close].trim_end_matches(|c: char| c.is_ascii_digit() || c == '-');
        let fields: Vec<&str> = stat[close + 1..].split_whitespace().collect();
        // After the name: state, ppid, ... utime and stime are the 12th and 13th.
        let ticks: u64 = fields.get(11..13).into_iter().flatten().filter_map(|f| f.parse::<u64>().ok()).sum();
        *threads.entry(name.to_owned()).or_insert(0.0) += ticks as f64 / tick;
    }
    let machine_busy = std::fs::read_to_string("/proc/stat")
        .ok()
        .and_then(|s| {
            let line = s.lines().next()?.to_owned();
            let v: Vec<u64> = line.split_whitespace().skip(1).filter_map(|f| f.parse().ok()).collect();
            // user nice system idle iowait irq softirq steal: busy is all but idle and iowait.
            let busy: u64 =
                v.iter().take(8).enumerate().filter(|(i, _)| *i != 3 && *i != 4).map(|(_, x)| x).sum();
            Some(busy as f64 / tick)
        })
        .unwrap_or(0.0);
    Cpu { threads, machine_busy, at: Some(Instant::now()) }
}

impl Cpu {
    /// What was spent since `before`, as a one-line note; `per` names the unit of work.
    pub fn since(&self, before: &Cpu, work: u64, per: &str) -> String {
        let wall = match (self.at, before.at) {
            (Some(a), Some(b)) => a.duration_since(b).as_secs_f64(),
            _ => 0.0,
        };
        let mut groups: Vec<(String, f64)> = self
            .threads
            .iter()
            .map(|(k, v)| (k.clone(), v - before.threads.get(k).copied().unwrap_or(0.0)))
            .filter(|(_, v)| *v >= 0.05)
            .collect();
        groups.sort_by(|a, b| b.1.total_cmp(&a.1));
        let ours: f64 = groups.iter().map(|g| g.1).sum();
        let machine = self.machine_busy - before.machine_busy;
        let list: Vec<String> = groups
            .iter()
            .map(|(k, v)| format!("{k} {v:.2} s ({:.0} µs/{per})", v * 1e6 / work.max(1) as f64))
            .collect();
        format!(
            "CPU over {wall:.1} s wall: this process {ours:.2} s, the whole machine {machine:.2} s of {:.1} \
             available (others: {:.2} s); by thread: {}",
            wall * available_cores(),
            (machine - ours).max(0.0),
            list.join(", ")
        )
    }
}

pub fn available_cores() -> f64 {
    std::thread::available_parallelism().map_or(1.0, |n| n.get() as f64)
}

// ---------------------------------------------------------------------------------------------
// The table
