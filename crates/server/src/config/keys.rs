//! Every configuration key, declared once: its type, doc, default, line of the default file,
//! reader and range check (see [`config_keys!`](super::declare::config_keys)).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use herald_engine::{Durability, Policy, FAILURES_MAX_LIMIT, RETRY_SCHEDULE_LEN_MAX};

use super::cluster::{
    advertise_form, lease_long_enough, nats_urls, node_id_form, partitions_in_range, replicas_in_range,
    secret_long_enough, Secret,
};
use super::declare::{config_keys, toml_line};
use super::input::Input;
use super::{LogFormat, BODY_BYTES_LIMIT};

config_keys! {
    header = r#"# herald's configuration. Durations are written "250ms", "5s", "5m", "24h" or "30d".
# Every key can also be set in the environment as HERALD_<SECTION>_<KEY>
# (HERALD_SERVER_LISTEN, HERALD_ENDPOINT_HEALTH_FAILURES, ...); the environment overrides this
# file, and --data-dir and --listen override both.
"#;

    /// `[server]`: the HTTP listener and its limits.
    [server] ServerSection {
        /// The address to listen on (`127.0.0.1:8080`).
        listen: SocketAddr = SocketAddr::from(([127, 0, 0, 1], 8080)),
            toml r#""127.0.0.1:8080""#, read socket_addr;
        /// The largest event payload accepted, bytes (256 KiB); larger: 413.
        max_event_bytes: usize = 256 * 1024,
            toml "262144        # largest event payload; over it: 413", read count, check bytes;
        /// The largest request body on every route other than publishing an event, bytes (64 KiB).
        max_body_bytes: usize = 64 * 1024,
            toml "65536          # largest request body on every other route; over it: 413", read count,
            check bytes;
        /// Requests per second of each API key's token bucket (10000); over it: 429.
        key_requests_per_s: u32 = 10_000,
            toml "10000      # per API key token bucket; over it: 429 with Retry-After", read count,
            check at_least_one;
        /// The size of each API key's token bucket (20000).
        key_burst: u32 = 20_000, toml "20000", read count, check at_least_one;
        /// How long a graceful stop waits for attempts in flight (10 s).
        shutdown_timeout: Duration = Duration::from_secs(10),
            toml r#""10s"        # SIGTERM/SIGINT: how long attempts in flight may take to finish"#,
            read duration;
        /// How long a client may take to send a request's headers (10 s); slower: its
        /// connection is closed.
        header_read_timeout: Duration = Duration::from_secs(10),
            toml r#""10s"     # a client slower to send a request's headers is disconnected"#,
            read duration, check above_zero;
        /// How long one request may take, its body's read included (30 s); longer: 408.
        request_timeout: Duration = Duration::from_secs(30),
            toml r#""30s"         # one request, body read included, at most; over it: 408"#,
            read duration, check above_zero;
        /// Open API connections at most; beyond it a connection is answered 503 at once and
        /// closed. 0 (the default): sized at start from the open-file limit, which herald raises
        /// to its hard limit, leaving room for the store and the dispatcher's attempts.
        max_connections: usize = 0,
            toml "0               # open API connections at most (over it: 503 at once); 0: sized from the open-file limit",
            read count;
    }

    /// `[store]`: where and how durably the log is kept.
    [store] StoreSection {
        /// The data directory (`./herald-data`).
        data_dir: PathBuf = PathBuf::from("./herald-data"),
            toml r#""./herald-data""#, read path, check not_empty;
        /// When a write is acknowledged: `sync` (the default) or `flush`.
        durability: Durability = Durability::Sync,
            toml r#""sync"             # "sync": acknowledged after sled's flush and an fsync of its files (survives power loss);
                                # "flush": after sled's flush only (survives a process crash, not a power cut)"#,
            read durability;
        /// How long the history of a delivered delivery is kept (`"forever"`, the default: `None`).
        retain: Option<Duration> = None,
            toml r#""forever"              # or a duration such as "30d": history of deliveries delivered longer ago is
                                # dropped (pending, exhausted and inactive ones never are); see docs/OPERATIONS.md"#,
            read retain;
    }

    /// `[delivery]`: how attempts are made.
    [delivery] DeliverySection {
        /// The whole attempt, at most (15 s).
        timeout: Duration = Duration::from_secs(15),
            toml r#""15s"                 # whole attempt"#, read duration, check above_zero;
        /// Delays of the automatic retries after the first attempt (5s, 5m, 30m, 2h, 5h, 10h, 10h).
        retry_schedule: Vec<Duration> =
            Policy::default().retry_schedule_ms.iter().map(|&ms| Duration::from_millis(ms)).collect(),
            toml r#"["5s", "5m", "30m", "2h", "5h", "10h", "10h"]"#, read durations, check schedule_len;
        /// Attempts in flight to one endpoint, at most (16).
        max_in_flight_per_endpoint: usize = 16, toml "16", read count, check at_least_one;
        /// Attempts in flight in total, at most (1024).
        max_in_flight_total: usize = 1024, toml "1024", read count, check at_least_one;
        /// Whether loopback, private and link-local targets are allowed (false).
        allow_private_targets: bool = false,
            toml "false   # loopback, private and link-local addresses refused unless true", read boolean;
        /// A PEM file of extra root certificates for private receivers (none).
        extra_ca_file: Option<PathBuf> = None,
            commented r#""/etc/herald/ca.pem"   # PEM file of extra root certificates for private receivers"#,
            read optional_path, check some_not_empty;
    }

    /// `[endpoint_health]`: when failing endpoints are made inactive.
    [endpoint_health] EndpointHealthSection {
        /// Failures in a row that make an endpoint inactive (5)...
        failures: u32 = 5,
            toml "5                    # failures in a row within the window make an endpoint inactive",
            read count, check failures_in_range;
        /// ...when they fall within this window (24 h).
        window: Duration = Duration::from_secs(24 * 3600), toml r#""24h""#, read duration, check above_zero;
    }

    /// `[retrigger]`: the rate limit of manual retriggers.
    [retrigger] RetriggerSection {
        /// Retrigger requests per endpoint per window, at most (10).
        max_per_window: usize = 10,
            toml "10             # retrigger requests per endpoint per window (seed 002's RETRIGGER_RATE_LIMITED)",
            read count, check at_least_one;
        /// The window (1 min).
        window: Duration = Duration::from_secs(60), toml r#""1m""#, read duration, check above_zero;
    }

    /// `[secrets]`: signing secret rotation.
    [secrets] SecretsSection {
        /// How long a rotated-out secret keeps signing (24 h).
        rotation_overlap: Duration = Duration::from_secs(24 * 3600),
            toml r#""24h"        # how long a rotated-out secret keeps signing"#, read duration;
    }

    /// `[log]`: what `herald serve` logs to stderr, and how.
    [log] LogSection {
        /// `text` (the default: one readable line per event) or `json` (one JSON object a line).
        format: LogFormat = LogFormat::Text,
            toml r#""text"                 # or "json": one JSON object a line, on stderr"#, read log_format;
        /// The least severe level logged: `error`, `warn`, `info` (the default), `debug`, `trace` or
        /// `off`. `RUST_LOG`, when set, overrides it (and takes per-module directives).
        level: String = "info".to_string(),
            toml r#""info"                  # error, warn, info, debug, trace or off; RUST_LOG overrides it"#,
            read log_level, check known_level;
    }

    /// `[cluster]`: cluster mode on NATS JetStream (off while `nats_url` is empty).
    [cluster] ClusterSection {
        /// The NATS servers, `nats://host:port`, comma-separated; empty (the default): cluster
        /// mode off, herald runs alone on its data directory.
        nats_url: String = String::new(),
            toml r#"""                   # "nats://127.0.0.1:4222,nats://127.0.0.1:4223": cluster mode on; "": off"#,
            read text_value, check nats_urls;
        /// This node's name in the cluster, `[A-Za-z0-9_-]{1,64}` (required in cluster mode).
        node_id: String = String::new(),
            toml r#"""                    # this node's name, [A-Za-z0-9_-]{1,64}"#, read text_value,
            check node_id_form;
        /// The `http://host:port` other nodes forward requests to (required in cluster mode).
        advertise: String = String::new(),
            toml r#"""                  # "http://10.0.0.1:8080": where the other nodes reach this one"#,
            read text_value, check advertise_form;
        /// The data partitions (16), fixed when the cluster is created.
        partitions: u32 = 16,
            toml "16                 # fixed when the cluster is created; a node with another number refuses to start",
            read count, check partitions_in_range;
        /// Copies of each partition's stream (3), 1 to 5.
        replicas: u32 = 3, toml "3", read count, check replicas_in_range;
        /// How long a partition's lease lasts unrenewed (5 s), at least 300 ms.
        lease: Duration = Duration::from_secs(5),
            toml r#""5s"                    # a dead node's partitions move after this (plus catching up)"#,
            read duration, check lease_long_enough;
        /// The secret the nodes authenticate forwarded requests with (required in cluster mode,
        /// at least 16 bytes); never logged nor shown.
        cluster_secret: Secret = Secret::default(),
            toml r#"""             # at least 16 bytes, the same on every node; never logged"#,
            read secret, check secret_long_enough;
    }
}

/// The levels `[log] level` takes (`RUST_LOG` takes any `tracing-subscriber` directive).
pub const LOG_LEVELS: &[&str] = &["error", "warn", "info", "debug", "trace", "off"];

/// One of [`LOG_LEVELS`].
fn known_level(value: &str) -> Option<String> {
    (!LOG_LEVELS.contains(&value)).then(|| format!("must be one of {}, got {value:?}", LOG_LEVELS.join(", ")))
}

/// A count that must not be 0.
fn at_least_one<T: Default + PartialEq>(value: &T) -> Option<String> {
    (*value == T::default()).then(|| "must be at least 1".to_string())
}

/// A body limit: at least 1 byte, at most [`BODY_BYTES_LIMIT`].
fn bytes(value: &usize) -> Option<String> {
    if *value == 0 {
        Some("must be at least 1".to_string())
    } else if *value > BODY_BYTES_LIMIT {
        Some(format!("must be at most {BODY_BYTES_LIMIT} bytes, got {value}"))
    } else {
        None
    }
}

/// A duration that must not be 0.
fn above_zero(value: &Duration) -> Option<String> {
    value.is_zero().then(|| "must be longer than 0s".to_string())
}

fn not_empty(value: &Path) -> Option<String> {
    value.as_os_str().is_empty().then(|| "must not be empty".to_string())
}

/// An optional path, empty when given.
fn some_not_empty(value: &Option<PathBuf>) -> Option<String> {
    value.as_deref().and_then(not_empty)
}

/// At most [`RETRY_SCHEDULE_LEN_MAX`] retries.
fn schedule_len(value: &[Duration]) -> Option<String> {
    let n = value.len();
    (n > RETRY_SCHEDULE_LEN_MAX).then(|| format!("has {n} entries, at most {RETRY_SCHEDULE_LEN_MAX} allowed"))
}

/// From 1 to [`FAILURES_MAX_LIMIT`].
fn failures_in_range(value: &u32) -> Option<String> {
    at_least_one(value).or_else(|| {
        (*value > FAILURES_MAX_LIMIT).then(|| format!("must be at most {FAILURES_MAX_LIMIT}, got {value}"))
    })
}
