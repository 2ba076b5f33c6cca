//! An endpoint's delivery settings (API.md "Endpoint delivery settings"): how fast, how many at
//! once and in what order its deliveries go, and the extra headers they carry. Stored beside the
//! endpoint (`keys::KS_ENDPOINT_SETTINGS`), so endpoints written before them keep their layout:
//! an endpoint without a stored value has [`DeliverySettings::default`].

use serde::{Deserialize, Serialize};

/// The largest `rate_limit_per_s`.
pub const RATE_LIMIT_PER_S_MAX: u32 = 10_000;
/// The largest `max_in_flight`.
pub const MAX_IN_FLIGHT_MAX: u32 = 1024;
/// The most extra headers an endpoint may carry.
pub const HEADERS_MAX: usize = 20;
/// The longest value of an extra header, in bytes.
pub const HEADER_VALUE_BYTES_MAX: usize = 1024;

/// Whether deliveries to an endpoint wait for earlier ones with the same ordering key.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum DeliveryOrder {
    /// Every delivery goes when it is due (`"none"`).
    #[default]
    Unordered,
    /// A delivery waits while an earlier delivery to the same endpoint with the same ordering key
    /// is pending (`"per_key"`).
    PerKey,
}

impl DeliveryOrder {
    /// The name in API.md (`none`, `per_key`).
    pub fn name(self) -> &'static str {
        match self {
            DeliveryOrder::Unordered => "none",
            DeliveryOrder::PerKey => "per_key",
        }
    }

    /// The order named `name`, if there is one.
    pub fn from_name(name: &str) -> Option<DeliveryOrder> {
        [DeliveryOrder::Unordered, DeliveryOrder::PerKey].into_iter().find(|o| o.name() == name)
    }
}

/// An endpoint's delivery settings; `None` is "unset" (no limit, the configured default).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeliverySettings {
    /// At most this many attempts start per second (a token bucket, burst of the same size).
    pub rate_limit_per_s: Option<u32>,
    /// At most this many attempts in flight at once; `None`: the configured per-endpoint bound.
    pub max_in_flight: Option<u32>,
    pub ordering: DeliveryOrder,
    /// Extra request headers, name and value as given, in name order (names are unique,
    /// ignoring case).
    pub headers: Vec<(String, String)>,
}

/// Header names herald sets itself, which an endpoint's extra headers may not name (compared
/// ignoring case; `webhook-` and `herald-` are prefixes).
pub fn is_reserved_header(name: &str) -> bool {
    let name = name.to_ascii_lowercase();
    ["content-type", "user-agent", "host", "content-length"].contains(&name.as_str())
        || name.starts_with("webhook-")
        || name.starts_with("herald-")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn order_names_round_trip() {
        for order in [DeliveryOrder::Unordered, DeliveryOrder::PerKey] {
            assert_eq!(DeliveryOrder::from_name(order.name()), Some(order));
        }
        assert_eq!(DeliveryOrder::from_name("fifo"), None);
    }

    #[test]
    fn reserved_headers_ignore_case() {
        for name in ["Content-Type", "user-agent", "HOST", "content-length", "Webhook-Id", "herald-attempt"] {
            assert!(is_reserved_header(name), "{name}");
        }
        for name in ["x-tenant", "authorization", "webhooks", "heraldx"] {
            assert!(!is_reserved_header(name), "{name}");
        }
    }
}
