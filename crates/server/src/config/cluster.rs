//! The `[cluster]` section's own pieces: the secret that is never shown, the range checks of its
//! keys, and the keys required once cluster mode is on (`nats_url` set).

use std::fmt;
use std::time::Duration;

use super::input::Input;
use super::keys::ClusterSection;

/// The least `[cluster] lease`.
pub const LEASE_MIN: Duration = Duration::from_millis(300);
/// The least length of `[cluster] cluster_secret`, bytes.
pub const SECRET_BYTES_MIN: usize = 16;
/// The most `[cluster] partitions`.
pub const PARTITIONS_MAX: u32 = 1024;
/// The most `[cluster] replicas`.
pub const REPLICAS_MAX: u32 = 5;

/// A value that is never logged nor shown: its `Debug` says only whether it is set.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Secret {
        Secret(value.into())
    }

    /// The value itself, for the one place that uses it (the forwarding MAC).
    pub fn expose(&self) -> &str {
        &self.0
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0.is_empty() {
            true => f.write_str("Secret(unset)"),
            false => f.write_str("Secret([redacted])"),
        }
    }
}

impl Input<'_> {
    /// A string as given (surrounding blanks dropped).
    pub(super) fn text_value(self) -> Result<String, String> {
        Ok(self.text("a string")?.trim().to_owned())
    }

    /// A secret: a string whose value no error message repeats.
    pub(super) fn secret(self) -> Result<Secret, String> {
        match self {
            Input::Toml(toml::Value::String(s)) => Ok(Secret(s.clone())),
            Input::Toml(_) => Err("expected a string".into()),
            Input::Env(s) => Ok(Secret(s.to_owned())),
        }
    }
}

/// Empty, or a comma-separated list of `nats://host:port`.
pub(super) fn nats_urls(value: &str) -> Option<String> {
    if value.is_empty() {
        return None;
    }
    for url in value.split(',').map(str::trim) {
        let Some(rest) = url.strip_prefix("nats://") else {
            return Some(format!("{url:?} is not a nats://host:port address"));
        };
        if !host_port(rest) {
            return Some(format!("{url:?} is not a nats://host:port address"));
        }
    }
    None
}

/// `host:port` with a port number and a host of no blanks or slashes.
fn host_port(text: &str) -> bool {
    let Some((host, port)) = text.rsplit_once(':') else { return false };
    !host.is_empty()
        && host.bytes().all(|b| b.is_ascii_graphic() && b != b'/' && b != b'@')
        && port.parse::<u16>().is_ok_and(|p| p > 0)
}

/// Empty (checked by [`required`] when cluster mode is on), or `[A-Za-z0-9_-]{1,64}`.
pub(super) fn node_id_form(value: &str) -> Option<String> {
    let ok = value.len() <= 64 && value.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    (!ok).then(|| format!("must match [A-Za-z0-9_-]{{1,64}}, got {value:?}"))
}

/// Empty, or `http://host:port` (a trailing `/` allowed).
pub(super) fn advertise_form(value: &str) -> Option<String> {
    if value.is_empty() {
        return None;
    }
    let ok = value.strip_prefix("http://").map(|r| r.strip_suffix('/').unwrap_or(r)).is_some_and(host_port);
    (!ok).then(|| format!("must be http://host:port (where the other nodes reach this one), got {value:?}"))
}

pub(super) fn partitions_in_range(value: &u32) -> Option<String> {
    (!(1..=PARTITIONS_MAX).contains(value)).then(|| format!("must be 1 to {PARTITIONS_MAX}, got {value}"))
}

pub(super) fn replicas_in_range(value: &u32) -> Option<String> {
    (!(1..=REPLICAS_MAX).contains(value)).then(|| format!("must be 1 to {REPLICAS_MAX}, got {value}"))
}

pub(super) fn lease_long_enough(value: &Duration) -> Option<String> {
    (*value < LEASE_MIN).then(|| format!("must be at least {} ms", LEASE_MIN.as_millis()))
}

/// Empty (see [`required`]) or at least [`SECRET_BYTES_MIN`] bytes; the message never shows it.
pub(super) fn secret_long_enough(value: &Secret) -> Option<String> {
    let n = value.0.len();
    (n > 0 && n < SECRET_BYTES_MIN).then(|| format!("must be at least {SECRET_BYTES_MIN} bytes, got {n}"))
}

/// The keys cluster mode needs, each missing one with why: none while `nats_url` is empty.
pub(super) fn required(c: &ClusterSection) -> Vec<(&'static str, String)> {
    if c.nats_url.is_empty() {
        return Vec::new();
    }
    let needed = "required when cluster.nats_url is set";
    let mut problems = Vec::new();
    if c.node_id.is_empty() {
        problems.push(("cluster.node_id", format!("{needed} ([A-Za-z0-9_-]{{1,64}})")));
    }
    if c.advertise.is_empty() {
        problems.push(("cluster.advertise", format!("{needed} (http://host:port)")));
    }
    if c.cluster_secret.is_empty() {
        problems.push(("cluster.cluster_secret", format!("{needed} (at least {SECRET_BYTES_MIN} bytes)")));
    }
    problems
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forms_of_the_cluster_keys() {
        assert_eq!(nats_urls(""), None);
        assert_eq!(nats_urls("nats://127.0.0.1:4222, nats://h:4223"), None);
        for bad in ["127.0.0.1:4222", "nats://h", "nats://h:0", "nats://:1", "http://h:1", "nats://a/b:1"] {
            assert!(nats_urls(bad).is_some(), "{bad}");
        }
        assert_eq!(node_id_form("node-1_A"), None);
        assert!(node_id_form("a b").is_some());
        assert!(node_id_form(&"a".repeat(65)).is_some());
        assert_eq!(advertise_form("http://10.0.0.1:8080"), None);
        assert_eq!(advertise_form("http://h:1/"), None);
        for bad in ["https://h:1", "h:1", "http://h", "http://h:x"] {
            assert!(advertise_form(bad).is_some(), "{bad}");
        }
        assert!(partitions_in_range(&0).is_some() && partitions_in_range(&1025).is_some());
        assert!(replicas_in_range(&6).is_some() && replicas_in_range(&1).is_none());
        assert!(lease_long_enough(&Duration::from_millis(299)).is_some());
        assert!(secret_long_enough(&Secret::new("short")).is_some());
        assert_eq!(format!("{:?}", Secret::new("a very secret value")), "Secret([redacted])");
    }

    #[test]
    fn cluster_mode_needs_its_node_id_advertise_and_secret() {
        let mut c = ClusterSection::default();
        assert!(required(&c).is_empty(), "off by default");
        c.nats_url = "nats://127.0.0.1:4222".into();
        let keys: Vec<&str> = required(&c).into_iter().map(|(k, _)| k).collect();
        assert_eq!(keys, ["cluster.node_id", "cluster.advertise", "cluster.cluster_secret"]);
        c.node_id = "a".into();
        c.advertise = "http://127.0.0.1:1".into();
        c.cluster_secret = Secret::new("0123456789abcdef");
        assert!(required(&c).is_empty());
    }
}
