//! The configuration of `herald serve`: embedded defaults, a TOML file (`--config`), the
//! environment (`HERALD_<SECTION>_<KEY>`) and the command line (`--data-dir`, `--listen`), in that
//! order of precedence, each later source overriding the earlier ones key by key.
//!
//! Every value is checked where it is read, and an error names where it came from (the file, the
//! environment variable or the flag), the key (`section.key`) and what is wrong with it.

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use herald_engine::{CommandLimits, DeliveryConfig, EngineConfig, Policy};

mod cluster;
mod declare;
mod error;
mod input;
mod keys;

pub use cluster::Secret;
pub use error::ConfigError;
pub use input::parse_duration;
use input::{describe, Input};
use keys::SECTIONS;
pub use keys::{
    ClusterSection, Config, DeliverySection, EndpointHealthSection, LogSection, RetriggerSection,
    SecretsSection, ServerSection, StoreSection, DEFAULT_TOML, LOG_LEVELS,
};

/// `[log] format`: how each log line of `herald serve` is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    /// One readable line per event (the default).
    #[default]
    Text,
    /// One JSON object a line, with the fields of the event and of its spans.
    Json,
}

/// The largest `[server] max_event_bytes` and `max_body_bytes`: half of a log record's largest
/// body, which leaves room for the framing and fan-out written beside the payload.
pub const BODY_BYTES_LIMIT: usize = herald_engine::RECORD_BODY_BYTES_MAX / 2;

/// The environment variable prefix of every setting: `HERALD_<SECTION>_<KEY>`.
pub const ENV_PREFIX: &str = "HERALD_";

/// The command-line flags that override the file and the environment.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Overrides {
    /// `--data-dir`.
    pub data_dir: Option<PathBuf>,
    /// `--listen`.
    pub listen: Option<SocketAddr>,
}

/// Where a value came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// The configuration file at this path.
    File(PathBuf),
    /// This environment variable.
    Env(String),
    /// This command-line flag (`--listen`).
    Flag(&'static str),
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::File(path) => write!(f, "config file {}", path.display()),
            Origin::Env(var) => write!(f, "environment variable {var}"),
            Origin::Flag(flag) => write!(f, "command-line flag {flag}"),
        }
    }
}

/// Which source last set each key (`section.key`), so a value out of range is blamed on it.
type Origins = HashMap<String, Origin>;

impl Config {
    /// Loads the configuration: the defaults, overridden by `file` (TOML) if given, overridden by
    /// the `HERALD_<SECTION>_<KEY>` variables of `env`, overridden by the command-line `overrides`.
    ///
    /// Variables of `env` not named `HERALD_...` are ignored, and so are `HERALD_...` variables
    /// that name no key (`HERALD_ADMIN_KEY` is read elsewhere). Pass [`herald_env`] for the
    /// process's environment.
    pub fn load(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
        overrides: &Overrides,
    ) -> Result<Config, ConfigError> {
        let (config, problems) = Config::gather(file, env, overrides);
        problems.first_or(config)
    }

    /// Every problem [`Config::load`] meets with the same arguments, not only the first it
    /// reports: an unreadable or malformed file, each unknown section and key, each value of the
    /// file and of the environment that does not parse, and each value out of range (blamed on
    /// the source that set it), with `load`'s messages, in the order `load` meets them, each
    /// once. Empty exactly when `load` succeeds. `herald config check` prints them.
    pub fn check_all(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
        overrides: &Overrides,
    ) -> Vec<ConfigError> {
        let (_, problems) = Config::gather(file, env, overrides);
        problems.0
    }

    /// The configuration as far as it loads, and every problem on the way: each source is
    /// applied key by key over the earlier ones (a value that does not parse leaves the earlier
    /// one), and the ranges are checked after each.
    fn gather(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
        overrides: &Overrides,
    ) -> (Config, Problems) {
        let mut config = Config::default();
        let mut origins = Origins::new();
        let mut problems = Problems::default();
        if let Some(path) = file {
            match std::fs::read_to_string(path) {
                Ok(text) => config.apply_toml(&text, path, &mut origins, &mut problems),
                Err(error) => problems.push(ConfigError::Read { path: path.to_path_buf(), error }),
            }
            config.check(&origins, &mut problems);
        }
        config.apply_env(env, &mut origins, &mut problems);
        config.check(&origins, &mut problems);
        config.apply_overrides(overrides, &mut origins);
        config.check(&origins, &mut problems);
        (config, problems)
    }

    /// Parses a configuration file's text over the defaults; `path` only names it in errors.
    pub fn from_toml(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let mut config = Config::default();
        let mut origins = Origins::new();
        let mut problems = Problems::default();
        config.apply_toml(text, path, &mut origins, &mut problems);
        config.check(&origins, &mut problems);
        problems.first_or(config)
    }

    /// Checks every value's range, for a configuration built in code ([`Config::load`] already
    /// does).
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut problems = Problems::default();
        self.check(&Origins::new(), &mut problems);
        problems.first_or(())
    }

    /// The engine's configuration: every setting of this one mapped onto [`EngineConfig`], the
    /// engine's own settings (cache, group commit, queues, worker threads) at their defaults.
    pub fn engine_config(&self) -> EngineConfig {
        let defaults = EngineConfig::default();
        let rotation_overlap_ms = millis(self.secrets.rotation_overlap);
        let allow_private_targets = self.delivery.allow_private_targets;
        EngineConfig {
            data_dir: self.store.data_dir.clone(),
            durability: self.store.durability,
            retain: self.store.retain,
            policy: Policy {
                retry_schedule_ms: self.delivery.retry_schedule.iter().map(|&d| millis(d)).collect(),
                failures_max: self.endpoint_health.failures,
                failure_window_ms: millis(self.endpoint_health.window),
                rotation_overlap_ms,
            },
            limits: CommandLimits {
                allow_private_targets,
                event_bytes_max: self.server.max_event_bytes,
                retrigger_max_per_window: self.retrigger.max_per_window,
                retrigger_window_ms: millis(self.retrigger.window),
            },
            delivery: DeliveryConfig {
                timeout: self.delivery.timeout,
                max_in_flight_per_endpoint: self.delivery.max_in_flight_per_endpoint,
                max_in_flight_total: self.delivery.max_in_flight_total,
                allow_private_targets,
                extra_ca_file: self.delivery.extra_ca_file.clone(),
                shutdown_timeout: self.server.shutdown_timeout,
                ..defaults.delivery
            },
            ..defaults
        }
    }

    /// Sets each key of a file's text; a key that is unknown or does not parse is a problem and
    /// leaves the earlier value, and the others are still set.
    fn apply_toml(&mut self, text: &str, path: &Path, origins: &mut Origins, problems: &mut Problems) {
        let table = match text.parse::<toml::Table>() {
            Ok(table) => table,
            Err(e) => {
                let message = e.to_string().trim_end().to_string();
                return problems.push(ConfigError::Syntax { path: path.to_path_buf(), message });
            }
        };
        let origin = Origin::File(path.to_path_buf());
        for (section, value) in &table {
            let Some(keys) = section_keys(section) else {
                problems
                    .push(ConfigError::UnknownSection { path: path.to_path_buf(), section: section.clone() });
                continue;
            };
            let toml::Value::Table(entries) = value else {
                problems.push(ConfigError::Invalid {
                    origin: Some(origin.clone()),
                    key: section.clone(),
                    problem: format!("expected a section [{section}], found {}", describe(value)),
                });
                continue;
            };
            for (key, value) in entries {
                if !keys.contains(&key.as_str()) {
                    problems.push(ConfigError::UnknownKey {
                        path: path.to_path_buf(),
                        section: section.clone(),
                        key: key.clone(),
                    });
                    continue;
                }
                let name = format!("{section}.{key}");
                match self.set(section, key, Input::Toml(value)) {
                    Ok(()) => {
                        origins.insert(name, origin.clone());
                    }
                    Err(problem) => problems.push(ConfigError::Invalid {
                        origin: Some(origin.clone()),
                        key: name,
                        problem,
                    }),
                }
            }
        }
    }

    /// Sets each key the `HERALD_...` variables name, like [`Config::apply_toml`].
    fn apply_env(
        &mut self,
        env: impl IntoIterator<Item = (String, String)>,
        origins: &mut Origins,
        problems: &mut Problems,
    ) {
        // Sorted, so that several bad variables are reported in the same order every time.
        let mut vars: Vec<(String, String)> =
            env.into_iter().filter(|(name, _)| name.starts_with(ENV_PREFIX)).collect();
        vars.sort();
        for (var, value) in vars {
            let Some((section, key)) = env_key(&var) else { continue };
            let name = format!("{section}.{key}");
            let origin = Origin::Env(var);
            match self.set(section, key, Input::Env(&value)) {
                Ok(()) => {
                    origins.insert(name, origin);
                }
                Err(problem) => {
                    problems.push(ConfigError::Invalid { origin: Some(origin), key: name, problem })
                }
            }
        }
    }

    fn apply_overrides(&mut self, overrides: &Overrides, origins: &mut Origins) {
        if let Some(data_dir) = &overrides.data_dir {
            self.store.data_dir = data_dir.clone();
            origins.insert("store.data_dir".into(), Origin::Flag("--data-dir"));
        }
        if let Some(listen) = overrides.listen {
            self.server.listen = listen;
            origins.insert("server.listen".into(), Origin::Flag("--listen"));
        }
    }

    /// Every value out of range, blamed on the source that set it.
    fn check(&self, origins: &Origins, problems: &mut Problems) {
        for (key, problem) in self.problems().into_iter().chain(cluster::required(&self.cluster)) {
            problems.push(ConfigError::Invalid {
                origin: origins.get(key).cloned(),
                key: key.to_string(),
                problem,
            });
        }
    }
}

/// The problems met while loading, in the order met, each once: the ranges are checked after
/// each source, and a value out of range that no later source changes is the same problem again.
#[derive(Debug, Default)]
struct Problems(Vec<ConfigError>);

impl Problems {
    fn push(&mut self, problem: ConfigError) {
        let text = problem.to_string();
        if !self.0.iter().any(|p| p.to_string() == text) {
            self.0.push(problem);
        }
    }

    /// `value` if there is no problem, else the first.
    fn first_or<T>(self, value: T) -> Result<T, ConfigError> {
        match self.0.into_iter().next() {
            None => Ok(value),
            Some(first) => Err(first),
        }
    }
}

/// The process's `HERALD_...` environment variables, for [`Config::load`]. Unlike
/// `std::env::vars` it does not panic on variables that are not Unicode: those not named
/// `HERALD_...` are skipped, and a `HERALD_...` value that is not Unicode is passed on with its
/// invalid bytes replaced (so a number or duration is then refused, naming the variable).
pub fn herald_env() -> Vec<(String, String)> {
    std::env::vars_os()
        .filter_map(|(name, value)| {
            let name = name.into_string().ok()?;
            name.starts_with(ENV_PREFIX).then(|| (name, value.to_string_lossy().into_owned()))
        })
        .collect()
}

/// The keys of a known section.
fn section_keys(section: &str) -> Option<&'static [&'static str]> {
    SECTIONS.iter().find(|(name, _)| *name == section).map(|(_, keys)| *keys)
}

/// The section and key an environment variable sets, if it names one. Section names contain
/// underscores (`endpoint_health`), so the name is matched against every known key.
fn env_key(var: &str) -> Option<(&'static str, &'static str)> {
    let rest = var.strip_prefix(ENV_PREFIX)?;
    SECTIONS.iter().find_map(|(section, keys)| {
        let after = rest.strip_prefix(section.to_ascii_uppercase().as_str())?.strip_prefix('_')?;
        let key = keys.iter().find(|key| key.to_ascii_uppercase() == after)?;
        Some((*section, *key))
    })
}

/// The environment variable of a key: `HERALD_ENDPOINT_HEALTH_FAILURES`.
pub fn env_var_name(section: &str, key: &str) -> String {
    format!("{ENV_PREFIX}{}_{}", section.to_ascii_uppercase(), key.to_ascii_uppercase())
}

/// Whole milliseconds, saturating (parsed durations always fit).
fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use std::io;

    use herald_engine::{Durability, RETRY_SCHEDULE_LEN_MAX};

    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::from_toml(text, Path::new("herald.toml"))
    }

    fn file_error(text: &str) -> String {
        match parse(text) {
            Ok(config) => panic!("{text:?} was accepted: {config:?}"),
            Err(e) => e.to_string(),
        }
    }

    fn env_error(pairs: &[(&str, &str)]) -> String {
        match Config::load(None, env(pairs), &Overrides::default()) {
            Ok(config) => panic!("{pairs:?} was accepted: {config:?}"),
            Err(e) => e.to_string(),
        }
    }

    fn write_file(text: &str) -> tempfile::NamedTempFile {
        let mut file = tempfile::NamedTempFile::new().expect("temp file");
        io::Write::write_all(&mut file, text.as_bytes()).expect("write");
        file
    }

    #[test]
    fn defaults_are_api_md() {
        let c = Config::default();
        assert_eq!(c.server.listen, "127.0.0.1:8080".parse().expect("addr"));
        assert_eq!(c.server.max_event_bytes, 262_144);
        assert_eq!(c.server.max_body_bytes, 65_536);
        assert_eq!(c.server.key_requests_per_s, 10_000);
        assert_eq!(c.server.key_burst, 20_000);
        assert_eq!(c.server.shutdown_timeout, Duration::from_secs(10));
        assert_eq!(c.store.data_dir, PathBuf::from("./herald-data"));
        assert_eq!(c.store.durability, Durability::Sync);
        assert_eq!(c.delivery.timeout, Duration::from_secs(15));
        let schedule: Vec<u64> = c.delivery.retry_schedule.iter().map(|d| d.as_secs()).collect();
        assert_eq!(schedule, [5, 300, 1800, 7200, 18_000, 36_000, 36_000]);
        assert_eq!(c.delivery.max_in_flight_per_endpoint, 16);
        assert_eq!(c.delivery.max_in_flight_total, 1024);
        assert!(!c.delivery.allow_private_targets);
        assert_eq!(c.delivery.extra_ca_file, None);
        assert_eq!(c.endpoint_health.failures, 5);
        assert_eq!(c.endpoint_health.window, Duration::from_secs(86_400));
        assert_eq!(c.retrigger.max_per_window, 10);
        assert_eq!(c.retrigger.window, Duration::from_secs(60));
        assert_eq!(c.secrets.rotation_overlap, Duration::from_secs(86_400));
        assert_eq!(c.log.format, LogFormat::Text);
        assert_eq!(c.log.level, "info");
        assert!(c.validate().is_ok());
    }

    #[test]
    fn default_toml_parses_to_the_defaults() {
        assert_eq!(parse(DEFAULT_TOML).expect("DEFAULT_TOML"), Config::default());
        // And it sets every key but the optional extra_ca_file.
        let table: toml::Table = DEFAULT_TOML.parse().expect("toml");
        for (section, keys) in SECTIONS {
            for key in keys.iter().filter(|k| **k != "extra_ca_file") {
                assert!(table[*section].get(*key).is_some(), "DEFAULT_TOML lacks {section}.{key}");
            }
        }
    }

    #[test]
    fn load_with_nothing_gives_the_defaults() {
        let config = Config::load(None, env(&[("PATH", "/bin"), ("HOME", "/root")]), &Overrides::default());
        assert_eq!(config.expect("load"), Config::default());
        assert_eq!(parse("").expect("empty file"), Config::default());
    }

    #[test]
    fn durations() {
        let ok = [
            ("250ms", 250),
            ("5s", 5_000),
            ("5m", 300_000),
            ("24h", 86_400_000),
            ("30d", 2_592_000_000),
            ("0s", 0),
            ("0ms", 0),
            ("007s", 7_000),
        ];
        for (text, ms) in ok {
            assert_eq!(parse_duration(text), Ok(Duration::from_millis(ms)), "{text}");
        }
        let bad = [
            ("", "empty"),
            ("-5s", "negative"),
            ("5", "missing unit"),
            ("5x", "unknown unit"),
            ("5 s", "unknown unit"),
            ("s", "whole number"),
            ("+5s", "whole number"),
            ("1.5s", "whole numbers"),
            ("5sec", "unknown unit"),
            ("99999999999999999999s", "too large"),
            ("213503982334601d", "too large"),
            ("1h30m", "unknown unit"),
        ];
        for (text, why) in bad {
            let err = parse_duration(text).expect_err(text);
            assert!(err.contains(&format!("{text:?}")), "{err} should name {text:?}");
            assert!(err.contains(why), "{err} should say {why}");
        }
        // The largest that fits in u64 milliseconds.
        assert_eq!(parse_duration("18446744073709551615ms"), Ok(Duration::from_millis(u64::MAX)));
    }

    #[test]
    fn file_overrides_some_keys() {
        let file = write_file(
            r#"
            [server]
            listen = "0.0.0.0:9000"
            max_body_bytes = 1_000

            [store]
            durability = "flush"

            [delivery]
            retry_schedule = ["1s", "250ms"]
            allow_private_targets = true
            extra_ca_file = "/etc/ca.pem"

            [endpoint_health]
            failures = 3
            window = "30d"
            "#,
        );
        let config = Config::load(Some(file.path()), env(&[]), &Overrides::default()).expect("load");
        let mut expected = Config::default();
        expected.server.listen = "0.0.0.0:9000".parse().expect("addr");
        expected.server.max_body_bytes = 1_000;
        expected.store.durability = Durability::Flush;
        expected.delivery.retry_schedule = vec![Duration::from_secs(1), Duration::from_millis(250)];
        expected.delivery.allow_private_targets = true;
        expected.delivery.extra_ca_file = Some(PathBuf::from("/etc/ca.pem"));
        expected.endpoint_health.failures = 3;
        expected.endpoint_health.window = Duration::from_secs(30 * 86_400);
        assert_eq!(config, expected);
    }

    #[test]
    fn dotted_keys_work_like_sections() {
        let config = parse("server.listen = \"[::1]:80\"\nsecrets.rotation_overlap = \"0s\"").expect("parse");
        assert_eq!(config.server.listen, "[::1]:80".parse().expect("addr"));
        assert_eq!(config.secrets.rotation_overlap, Duration::ZERO);
    }

    #[test]
    fn precedence_defaults_file_env_command_line() {
        let file = write_file(
            "[server]\nlisten = \"10.0.0.1:1\"\nkey_burst = 5\n[store]\ndata_dir = \"/file\"\n\
             [retrigger]\nwindow = \"2m\"\n",
        );
        let vars = env(&[
            ("HERALD_SERVER_LISTEN", "10.0.0.2:2"),
            ("HERALD_STORE_DATA_DIR", "/env"),
            ("HERALD_RETRIGGER_MAX_PER_WINDOW", "7"),
            ("HERALD_ADMIN_KEY", "not-a-setting"),
            ("HERALD_NO_SUCH_THING", "ignored"),
            ("OTHER_SERVER_LISTEN", "nonsense"),
        ]);
        // File < environment.
        let config = Config::load(Some(file.path()), vars.clone(), &Overrides::default()).expect("load");
        assert_eq!(config.server.listen, "10.0.0.2:2".parse().expect("addr"));
        assert_eq!(config.store.data_dir, PathBuf::from("/env"));
        assert_eq!(config.server.key_burst, 5, "the file's, the environment does not set it");
        assert_eq!(config.retrigger.window, Duration::from_secs(120));
        assert_eq!(config.retrigger.max_per_window, 7);
        assert_eq!(config.server.key_requests_per_s, 10_000, "the default");

        // Environment < command line.
        let overrides = Overrides {
            data_dir: Some(PathBuf::from("/flag")),
            listen: Some("10.0.0.3:3".parse().expect("addr")),
        };
        let config = Config::load(Some(file.path()), vars, &overrides).expect("load");
        assert_eq!(config.server.listen, "10.0.0.3:3".parse().expect("addr"));
        assert_eq!(config.store.data_dir, PathBuf::from("/flag"));
        assert_eq!(config.server.key_burst, 5);
    }

    #[test]
    fn every_key_has_an_environment_variable() {
        let samples = [
            ("HERALD_SERVER_LISTEN", "0.0.0.0:1"),
            ("HERALD_SERVER_MAX_EVENT_BYTES", "1"),
            ("HERALD_SERVER_MAX_BODY_BYTES", "2"),
            ("HERALD_SERVER_KEY_REQUESTS_PER_S", "3"),
            ("HERALD_SERVER_KEY_BURST", "4"),
            ("HERALD_SERVER_SHUTDOWN_TIMEOUT", "5s"),
            ("HERALD_SERVER_HEADER_READ_TIMEOUT", "15s"),
            ("HERALD_SERVER_REQUEST_TIMEOUT", "16s"),
            ("HERALD_SERVER_MAX_CONNECTIONS", "14"),
            ("HERALD_STORE_DATA_DIR", "/d"),
            ("HERALD_STORE_DURABILITY", "flush"),
            ("HERALD_STORE_RETAIN", "30d"),
            ("HERALD_DELIVERY_TIMEOUT", "6s"),
            ("HERALD_DELIVERY_RETRY_SCHEDULE", "1s, 2m,3h"),
            ("HERALD_DELIVERY_MAX_IN_FLIGHT_PER_ENDPOINT", "7"),
            ("HERALD_DELIVERY_MAX_IN_FLIGHT_TOTAL", "8"),
            ("HERALD_DELIVERY_ALLOW_PRIVATE_TARGETS", "true"),
            ("HERALD_DELIVERY_EXTRA_CA_FILE", "/ca.pem"),
            ("HERALD_ENDPOINT_HEALTH_FAILURES", "9"),
            ("HERALD_ENDPOINT_HEALTH_WINDOW", "10m"),
            ("HERALD_RETRIGGER_MAX_PER_WINDOW", "11"),
            ("HERALD_RETRIGGER_WINDOW", "12s"),
            ("HERALD_SECRETS_ROTATION_OVERLAP", "13d"),
            ("HERALD_LOG_FORMAT", "json"),
            ("HERALD_LOG_LEVEL", "Debug"),
            ("HERALD_CLUSTER_NATS_URL", "nats://127.0.0.1:4222,nats://127.0.0.1:4223"),
            ("HERALD_CLUSTER_NODE_ID", "n1"),
            ("HERALD_CLUSTER_ADVERTISE", "http://127.0.0.1:8081"),
            ("HERALD_CLUSTER_PARTITIONS", "8"),
            ("HERALD_CLUSTER_REPLICAS", "1"),
            ("HERALD_CLUSTER_LEASE", "2s"),
            ("HERALD_CLUSTER_CLUSTER_SECRET", "0123456789abcdef"),
        ];
        let names: Vec<String> = SECTIONS
            .iter()
            .flat_map(|(section, keys)| keys.iter().map(move |key| env_var_name(section, key)))
            .collect();
        assert_eq!(names, samples.iter().map(|(name, _)| name.to_string()).collect::<Vec<_>>());

        let c = Config::load(None, env(&samples), &Overrides::default()).expect("load");
        let expected = Config {
            server: ServerSection {
                listen: "0.0.0.0:1".parse().expect("addr"),
                max_event_bytes: 1,
                max_body_bytes: 2,
                key_requests_per_s: 3,
                key_burst: 4,
                shutdown_timeout: Duration::from_secs(5),
                header_read_timeout: Duration::from_secs(15),
                request_timeout: Duration::from_secs(16),
                max_connections: 14,
            },
            store: StoreSection {
                data_dir: "/d".into(),
                durability: Durability::Flush,
                retain: Some(Duration::from_secs(30 * 86_400)),
            },
            delivery: DeliverySection {
                timeout: Duration::from_secs(6),
                retry_schedule: vec![
                    Duration::from_secs(1),
                    Duration::from_secs(120),
                    Duration::from_secs(3 * 3600),
                ],
                max_in_flight_per_endpoint: 7,
                max_in_flight_total: 8,
                allow_private_targets: true,
                extra_ca_file: Some("/ca.pem".into()),
            },
            endpoint_health: EndpointHealthSection { failures: 9, window: Duration::from_secs(600) },
            retrigger: RetriggerSection { max_per_window: 11, window: Duration::from_secs(12) },
            secrets: SecretsSection { rotation_overlap: Duration::from_secs(13 * 86_400) },
            log: LogSection { format: LogFormat::Json, level: "debug".into() },
            cluster: ClusterSection {
                nats_url: "nats://127.0.0.1:4222,nats://127.0.0.1:4223".into(),
                node_id: "n1".into(),
                advertise: "http://127.0.0.1:8081".into(),
                partitions: 8,
                replicas: 1,
                lease: Duration::from_secs(2),
                cluster_secret: Secret::new("0123456789abcdef"),
            },
        };
        assert_eq!(c, expected);
    }

    #[test]
    fn env_retry_schedule_forms() {
        let load = |value: &str| {
            Config::load(None, env(&[("HERALD_DELIVERY_RETRY_SCHEDULE", value)]), &Overrides::default())
                .map(|c| c.delivery.retry_schedule)
        };
        let secs = |s: &[u64]| s.iter().map(|&n| Duration::from_secs(n)).collect::<Vec<_>>();
        assert_eq!(load("5s,1m").expect("list"), secs(&[5, 60]));
        assert_eq!(load(" [\"5s\", \"1m\"] ").expect("toml array"), secs(&[5, 60]));
        assert_eq!(load("[]").expect("empty array"), secs(&[]));
        assert_eq!(load("7s").expect("one"), secs(&[7]));
        for bad in ["", "5s,,1m", "5s,", "[5]", "[\"5s\"", "5s;1m"] {
            let err = load(bad).expect_err(bad).to_string();
            assert!(err.contains("HERALD_DELIVERY_RETRY_SCHEDULE"), "{err}");
        }
        let too_many = vec!["1s"; RETRY_SCHEDULE_LEN_MAX + 1].join(",");
        let err = load(&too_many).expect_err("65 entries").to_string();
        assert!(err.contains("HERALD_DELIVERY_RETRY_SCHEDULE") && err.contains("at most 64"), "{err}");
        assert_eq!(load(&vec!["1s"; RETRY_SCHEDULE_LEN_MAX].join(",")).expect("64").len(), 64);
    }

    #[test]
    fn env_extra_ca_file_empty_unsets_it() {
        let file = write_file("[delivery]\nextra_ca_file = \"/file.pem\"\n");
        let config = Config::load(
            Some(file.path()),
            env(&[("HERALD_DELIVERY_EXTRA_CA_FILE", "")]),
            &Overrides::default(),
        );
        assert_eq!(config.expect("load").delivery.extra_ca_file, None);
    }

    #[test]
    fn bad_env_values_name_the_variable() {
        let cases = [
            ("HERALD_SERVER_LISTEN", "localhost:80", "invalid address"),
            ("HERALD_SERVER_LISTEN", "127.0.0.1", "invalid address"),
            ("HERALD_SERVER_MAX_EVENT_BYTES", "lots", "whole number"),
            ("HERALD_SERVER_MAX_EVENT_BYTES", "0", "at least 1"),
            ("HERALD_SERVER_MAX_EVENT_BYTES", "1048576", "at most"),
            ("HERALD_SERVER_KEY_BURST", "-1", "negative"),
            ("HERALD_SERVER_KEY_BURST", "4294967296", "too large"),
            ("HERALD_SERVER_KEY_REQUESTS_PER_S", "", "whole number"),
            ("HERALD_SERVER_SHUTDOWN_TIMEOUT", "10", "missing unit"),
            ("HERALD_STORE_DATA_DIR", "", "must not be empty"),
            ("HERALD_STORE_DURABILITY", "fast", "\"sync\" or \"flush\""),
            ("HERALD_DELIVERY_TIMEOUT", "0s", "longer than 0s"),
            ("HERALD_DELIVERY_RETRY_SCHEDULE", "5s,5y", "entry 2"),
            ("HERALD_DELIVERY_MAX_IN_FLIGHT_PER_ENDPOINT", "0", "at least 1"),
            ("HERALD_DELIVERY_MAX_IN_FLIGHT_TOTAL", "0", "at least 1"),
            ("HERALD_DELIVERY_ALLOW_PRIVATE_TARGETS", "yes", "true or false"),
            ("HERALD_ENDPOINT_HEALTH_FAILURES", "0", "at least 1"),
            ("HERALD_ENDPOINT_HEALTH_FAILURES", "1001", "at most 1000"),
            ("HERALD_ENDPOINT_HEALTH_WINDOW", "-1h", "negative"),
            ("HERALD_RETRIGGER_MAX_PER_WINDOW", "0", "at least 1"),
            ("HERALD_RETRIGGER_WINDOW", "0ms", "longer than 0s"),
            ("HERALD_SECRETS_ROTATION_OVERLAP", "1.5h", "whole numbers"),
            ("HERALD_LOG_FORMAT", "xml", "\"text\" or \"json\""),
            ("HERALD_LOG_LEVEL", "loud", "must be one of error, warn"),
        ];
        for (var, value, why) in cases {
            let err = env_error(&[(var, value)]);
            assert!(err.contains(&format!("environment variable {var} (")), "{err} should name {var}");
            assert!(err.contains(why), "{var}={value:?}: {err} should say {why}");
        }
    }

    #[test]
    fn cluster_keys_are_checked_and_named_and_the_secret_never_shown() {
        let secret = "a-secret-of-32-bytes-0123456789ab";
        let on = |extra: &[(&str, &str)]| {
            let mut pairs = vec![
                ("HERALD_CLUSTER_NATS_URL", "nats://127.0.0.1:4222"),
                ("HERALD_CLUSTER_NODE_ID", "n1"),
                ("HERALD_CLUSTER_ADVERTISE", "http://127.0.0.1:8081"),
                ("HERALD_CLUSTER_CLUSTER_SECRET", secret),
            ];
            pairs.retain(|(k, _)| !extra.iter().any(|(e, _)| e == k));
            pairs.extend_from_slice(extra);
            Config::load(None, env(&pairs), &Overrides::default())
        };
        let c = on(&[]).expect("a whole cluster section");
        assert_eq!((c.cluster.partitions, c.cluster.replicas), (16, 3));
        assert_eq!(c.cluster.lease, Duration::from_secs(5));
        assert!(!format!("{c:?}").contains(secret), "Debug shows the secret");
        let cases = [
            ("HERALD_CLUSTER_NODE_ID", "", "cluster.node_id", "required"),
            ("HERALD_CLUSTER_NODE_ID", "a b", "cluster.node_id", "[A-Za-z0-9_-]"),
            ("HERALD_CLUSTER_ADVERTISE", "", "cluster.advertise", "required"),
            ("HERALD_CLUSTER_ADVERTISE", "10.0.0.1:80", "cluster.advertise", "http://host:port"),
            ("HERALD_CLUSTER_CLUSTER_SECRET", "", "cluster.cluster_secret", "required"),
            ("HERALD_CLUSTER_CLUSTER_SECRET", "short", "cluster.cluster_secret", "at least 16 bytes"),
            ("HERALD_CLUSTER_NATS_URL", "localhost:4222", "cluster.nats_url", "nats://host:port"),
            ("HERALD_CLUSTER_PARTITIONS", "0", "cluster.partitions", "1 to 1024"),
            ("HERALD_CLUSTER_REPLICAS", "6", "cluster.replicas", "1 to 5"),
            ("HERALD_CLUSTER_LEASE", "100ms", "cluster.lease", "at least 300 ms"),
        ];
        for (var, value, key, why) in cases {
            let err = on(&[(var, value)]).expect_err(var).to_string();
            assert!(err.contains(key) && err.contains(why), "{var}={value:?}: {err}");
            assert!(!err.contains(secret) && !err.contains("\"short\""), "{err} shows the secret");
        }
        // Off by default: no other cluster key is needed.
        assert_eq!(Config::load(None, env(&[]), &Overrides::default()).unwrap().cluster, Default::default());
    }

    #[test]
    fn a_bad_env_value_is_an_error_even_over_a_good_file() {
        let file = write_file("[endpoint_health]\nfailures = 3\n");
        let err = Config::load(
            Some(file.path()),
            env(&[("HERALD_ENDPOINT_HEALTH_FAILURES", "0")]),
            &Overrides::default(),
        )
        .expect_err("failures 0");
        assert!(matches!(
            &err,
            ConfigError::Invalid { origin: Some(Origin::Env(var)), key, .. }
                if var == "HERALD_ENDPOINT_HEALTH_FAILURES" && key == "endpoint_health.failures"
        ));
    }

    #[test]
    fn bad_file_values_name_the_key() {
        let cases = [
            ("[server]\nlisten = 8080", "server.listen", "expected an address"),
            ("[server]\nlisten = \"nowhere\"", "server.listen", "invalid address"),
            ("[server]\nmax_event_bytes = \"big\"", "server.max_event_bytes", "whole number"),
            ("[server]\nmax_event_bytes = -5", "server.max_event_bytes", "negative"),
            ("[server]\nmax_body_bytes = 0", "server.max_body_bytes", "at least 1"),
            ("[server]\nkey_requests_per_s = 0", "server.key_requests_per_s", "at least 1"),
            ("[server]\nkey_burst = 1.5", "server.key_burst", "whole number"),
            ("[server]\nshutdown_timeout = 10", "server.shutdown_timeout", "expected a duration"),
            ("[store]\ndata_dir = \"\"", "store.data_dir", "must not be empty"),
            ("[store]\ndurability = \"none\"", "store.durability", "\"sync\" or \"flush\""),
            ("[store]\ndurability = true", "store.durability", "\"sync\" or \"flush\""),
            ("[store]\nretain = \"500ms\"", "store.retain", "under 1s"),
            ("[store]\nretain = \"never\"", "store.retain", "\"forever\""),
            ("[delivery]\ntimeout = \"15\"", "delivery.timeout", "missing unit"),
            ("[delivery]\nretry_schedule = \"5s\"", "delivery.retry_schedule", "expected an array"),
            ("[delivery]\nretry_schedule = [\"5s\", 5]", "delivery.retry_schedule", "entry 2"),
            (
                "[delivery]\nmax_in_flight_per_endpoint = 0",
                "delivery.max_in_flight_per_endpoint",
                "at least 1",
            ),
            ("[delivery]\nmax_in_flight_total = 0", "delivery.max_in_flight_total", "at least 1"),
            (
                "[delivery]\nallow_private_targets = \"yes\"",
                "delivery.allow_private_targets",
                "true or false",
            ),
            ("[delivery]\nextra_ca_file = 1", "delivery.extra_ca_file", "expected a path"),
            ("[endpoint_health]\nfailures = 0", "endpoint_health.failures", "at least 1"),
            ("[endpoint_health]\nwindow = \"1w\"", "endpoint_health.window", "unknown unit"),
            ("[retrigger]\nmax_per_window = 0", "retrigger.max_per_window", "at least 1"),
            ("[retrigger]\nwindow = \"-1m\"", "retrigger.window", "negative"),
            ("[secrets]\nrotation_overlap = \"\"", "secrets.rotation_overlap", "empty"),
            ("server = 5", "server", "expected a section [server]"),
        ];
        for (text, key, why) in cases {
            let err = file_error(text);
            assert!(err.starts_with(&format!("config file herald.toml: {key}: ")), "{text:?}: {err}");
            assert!(err.contains(why), "{text:?}: {err} should say {why}");
        }
        let too_many = format!("[delivery]\nretry_schedule = [{}]", vec!["\"1s\""; 65].join(", "));
        let err = file_error(&too_many);
        assert!(err.contains("delivery.retry_schedule: has 65 entries, at most 64"), "{err}");
    }

    #[test]
    fn unknown_sections_and_keys_are_errors() {
        let err = file_error("[sever]\nlisten = \"127.0.0.1:1\"");
        assert!(err.contains("unknown section [sever]") && err.contains("known sections: server,"), "{err}");
        let err = file_error("[server]\nlisten_addr = \"127.0.0.1:1\"");
        assert!(
            err.contains("unknown key server.listen_addr") && err.contains("listen, max_event_bytes"),
            "{err}"
        );
        let err = file_error("[server.tls]\ncert = \"x\"");
        assert!(err.contains("unknown key server.tls"), "{err}");
        let err = file_error("listen = \"127.0.0.1:1\"");
        assert!(err.contains("unknown section [listen]"), "{err}");
        let err = parse("[endpoint_health]\nfailure = 1").expect_err("typo");
        assert_eq!(err.key().as_deref(), Some("endpoint_health.failure"));
    }

    #[test]
    fn unreadable_and_malformed_files() {
        let missing = Path::new("/nonexistent/herald.toml");
        let err = Config::load(Some(missing), env(&[]), &Overrides::default()).expect_err("missing");
        assert!(err.to_string().starts_with("cannot read config file /nonexistent/herald.toml: "), "{err}");
        assert!(std::error::Error::source(&err).is_some());

        let file = write_file("[server\nlisten = 1");
        let err = Config::load(Some(file.path()), env(&[]), &Overrides::default()).expect_err("syntax");
        let text = err.to_string();
        assert!(
            text.contains(&file.path().display().to_string()) && text.contains("not valid TOML"),
            "{text}"
        );
        assert!(text.contains("line 1"), "{text}");

        let err = file_error("[server]\nlisten = \"127.0.0.1:1\"\nlisten = \"127.0.0.1:2\"");
        assert!(err.contains("not valid TOML"), "duplicate key: {err}");
    }

    #[test]
    fn env_names_match_whole_section_names() {
        assert_eq!(env_key("HERALD_ENDPOINT_HEALTH_FAILURES"), Some(("endpoint_health", "failures")));
        assert_eq!(env_key("HERALD_ENDPOINT_HEALTH_WINDOW"), Some(("endpoint_health", "window")));
        assert_eq!(env_key("HERALD_RETRIGGER_WINDOW"), Some(("retrigger", "window")));
        assert_eq!(env_key("HERALD_SERVER_KEY_REQUESTS_PER_S"), Some(("server", "key_requests_per_s")));
        assert_eq!(env_key("HERALD_ENDPOINT_FAILURES"), None);
        assert_eq!(env_key("HERALD_ADMIN_KEY"), None);
        assert_eq!(env_key("HERALD_SERVER_LISTEN_"), None);
        assert_eq!(env_key("HERALD_server_listen"), None);
        assert_eq!(env_key("HERALD_SERVER"), None);
        assert_eq!(env_key("XHERALD_SERVER_LISTEN"), None);
    }

    #[test]
    fn command_line_errors_name_the_flag() {
        let overrides = Overrides { data_dir: Some(PathBuf::new()), listen: None };
        let err = Config::load(None, env(&[]), &overrides).expect_err("empty data dir");
        assert_eq!(err.to_string(), "command-line flag --data-dir (store.data_dir): must not be empty");
    }

    #[test]
    fn validate_checks_a_config_built_in_code() {
        let mut config = Config::default();
        config.delivery.max_in_flight_total = 0;
        let err = config.validate().expect_err("0 in flight");
        assert_eq!(err.to_string(), "delivery.max_in_flight_total: must be at least 1");
    }

    #[test]
    fn engine_config_maps_every_setting() {
        let file = write_file(
            r#"
            [server]
            max_event_bytes = 1000
            shutdown_timeout = "3s"
            [store]
            data_dir = "/var/lib/herald"
            durability = "flush"
            [delivery]
            timeout = "2s"
            retry_schedule = ["250ms", "1m"]
            max_in_flight_per_endpoint = 4
            max_in_flight_total = 40
            allow_private_targets = true
            extra_ca_file = "/ca.pem"
            [endpoint_health]
            failures = 7
            window = "1h"
            [retrigger]
            max_per_window = 3
            window = "30s"
            [secrets]
            rotation_overlap = "2d"
            "#,
        );
        let config = Config::load(Some(file.path()), env(&[]), &Overrides::default()).expect("load");
        let engine = config.engine_config();
        let defaults = EngineConfig::default();
        assert_eq!(engine.data_dir, PathBuf::from("/var/lib/herald"));
        assert_eq!(engine.durability, Durability::Flush);
        assert_eq!(
            engine.policy,
            Policy {
                retry_schedule_ms: vec![250, 60_000],
                failures_max: 7,
                failure_window_ms: 3_600_000,
                rotation_overlap_ms: 2 * 86_400_000,
            }
        );
        assert_eq!(
            engine.limits,
            CommandLimits {
                allow_private_targets: true,
                event_bytes_max: 1000,
                retrigger_max_per_window: 3,
                retrigger_window_ms: 30_000,
            }
        );
        assert_eq!(
            engine.delivery,
            DeliveryConfig {
                timeout: Duration::from_secs(2),
                max_in_flight_per_endpoint: 4,
                max_in_flight_total: 40,
                allow_private_targets: true,
                extra_ca_file: Some(PathBuf::from("/ca.pem")),
                shutdown_timeout: Duration::from_secs(3),
                ..defaults.delivery.clone()
            }
        );
        assert_eq!(engine.cache_bytes, defaults.cache_bytes);
        assert_eq!(engine.log, defaults.log);
        assert_eq!(engine.problem(), None);
    }

    fn messages(problems: &[ConfigError]) -> Vec<String> {
        problems.iter().map(ToString::to_string).collect()
    }

    #[test]
    fn check_all_reports_every_problem_with_the_messages_of_load() {
        // Each problem alone, as `load` reports it, in the order `check_all` meets them: the
        // file's keys in section and key order (parse errors, unknown keys and sections), then
        // its values out of range in declaration order.
        let alone = [
            "[delivery]\ntimeout = \"15\"",
            "[server]\nlisten_addr = \"127.0.0.1:1\"",
            "[sever]\nlisten = \"127.0.0.1:1\"",
            "[server]\nmax_body_bytes = 0",
            "[endpoint_health]\nfailures = 0",
        ];
        let mut expected: Vec<String> = alone.iter().map(|text| file_error(text)).collect();
        // Then the environment's, in the variables' order, and its values out of range.
        expected.push(
            "environment variable HERALD_SERVER_KEY_BURST (server.key_burst): expected a whole number, got \"many\""
                .into(),
        );
        expected.push(
            "environment variable HERALD_RETRIGGER_WINDOW (retrigger.window): must be longer than 0s".into(),
        );
        let file = write_file(
            "[sever]\nlisten = \"127.0.0.1:1\"\n[server]\nlisten_addr = \"127.0.0.1:1\"\nmax_body_bytes = 0\n\
             [delivery]\ntimeout = \"15\"\n[endpoint_health]\nfailures = 0\n",
        );
        let vars = env(&[
            ("HERALD_RETRIGGER_WINDOW", "0ms"),
            ("HERALD_SERVER_KEY_BURST", "many"),
            ("HERALD_SERVER_LISTEN", "127.0.0.1:9"),
        ]);
        let problems = Config::check_all(Some(file.path()), vars.clone(), &Overrides::default());
        let path = file.path().display().to_string();
        let got: Vec<String> = messages(&problems).iter().map(|m| m.replace(&path, "herald.toml")).collect();
        assert_eq!(got, expected);
        // `load` reports the first of them.
        let first = Config::load(Some(file.path()), vars, &Overrides::default()).expect_err("bad");
        assert_eq!(first.to_string(), problems[0].to_string());
    }

    #[test]
    fn check_all_is_empty_exactly_when_load_succeeds() {
        assert!(Config::check_all(None, env(&[]), &Overrides::default()).is_empty());
        let file = write_file(DEFAULT_TOML);
        assert!(Config::check_all(Some(file.path()), env(&[]), &Overrides::default()).is_empty());
        // A value out of range is checked after each source but reported once.
        let file = write_file("[delivery]\nmax_in_flight_total = 0\n");
        let problems = Config::check_all(Some(file.path()), env(&[]), &Overrides::default());
        assert_eq!(problems.len(), 1, "{:?}", messages(&problems));
        assert_eq!(problems[0].key().as_deref(), Some("delivery.max_in_flight_total"));
        // The command line's problems too.
        let overrides = Overrides { data_dir: Some(PathBuf::new()), listen: None };
        assert_eq!(
            messages(&Config::check_all(None, env(&[]), &overrides)),
            ["command-line flag --data-dir (store.data_dir): must not be empty"]
        );
    }

    #[test]
    fn check_all_goes_on_to_the_environment_after_a_file_that_does_not_load() {
        let vars = env(&[("HERALD_DELIVERY_TIMEOUT", "0s")]);
        let missing = Path::new("/nonexistent/herald.toml");
        let problems = Config::check_all(Some(missing), vars.clone(), &Overrides::default());
        assert!(matches!(problems.as_slice(), [ConfigError::Read { .. }, ConfigError::Invalid { .. }]));
        let file = write_file("[server\nlisten = 1");
        let problems = Config::check_all(Some(file.path()), vars, &Overrides::default());
        let got = messages(&problems);
        assert_eq!(got.len(), 2, "{got:?}");
        assert!(got[0].contains("not valid TOML"), "{got:?}");
        assert_eq!(
            got[1],
            "environment variable HERALD_DELIVERY_TIMEOUT (delivery.timeout): must be longer than 0s"
        );
    }

    #[test]
    fn default_config_maps_to_the_default_engine_config() {
        assert_eq!(Config::default().engine_config(), EngineConfig::default());
    }
}
