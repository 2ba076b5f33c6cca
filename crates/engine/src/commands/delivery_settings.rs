//! An endpoint's delivery settings as a create or a `PATCH` gives them: what changes, checked
//! against API.md's bounds before anything is written.

use herald_projector::{
    is_reserved_header, DeliveryOrder, DeliverySettings, HEADERS_MAX, HEADER_VALUE_BYTES_MAX,
    MAX_IN_FLIGHT_MAX, RATE_LIMIT_PER_S_MAX,
};

use super::{invalid, CommandError};

/// The delivery settings a request changes: `None` leaves a setting as it is; for the numbers,
/// `Some(None)` unsets it (JSON `null`). A create applies it to the defaults.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DeliverySettingsPatch {
    pub rate_limit_per_s: Option<Option<u32>>,
    pub max_in_flight: Option<Option<u32>>,
    pub ordering: Option<DeliveryOrder>,
    /// Name and value pairs; `Some(vec![])` removes every extra header.
    pub headers: Option<Vec<(String, String)>>,
}

impl DeliverySettingsPatch {
    /// Whether the patch changes nothing, whatever it is applied to.
    pub fn is_empty(&self) -> bool {
        *self == DeliverySettingsPatch::default()
    }

    /// `settings` with this patch applied, after checking every value it gives (the headers end
    /// up in name order).
    pub(super) fn applied_to(&self, settings: &DeliverySettings) -> Result<DeliverySettings, CommandError> {
        let mut out = settings.clone();
        if let Some(rate) = self.rate_limit_per_s {
            out.rate_limit_per_s = check_range("rate_limit_per_s", rate, RATE_LIMIT_PER_S_MAX)?;
        }
        if let Some(max) = self.max_in_flight {
            out.max_in_flight = check_range("max_in_flight", max, MAX_IN_FLIGHT_MAX)?;
        }
        if let Some(ordering) = self.ordering {
            out.ordering = ordering;
        }
        if let Some(headers) = &self.headers {
            out.headers = checked_headers(headers)?;
        }
        Ok(out)
    }
}

fn check_range(field: &'static str, value: Option<u32>, max: u32) -> Result<Option<u32>, CommandError> {
    match value {
        Some(v) if !(1..=max).contains(&v) => {
            Err(invalid(field, format!("must be 1 to {max} or null, not {v}")))
        }
        _ => Ok(value),
    }
}

/// An HTTP header name's characters (RFC 9110 `tchar`), all visible ASCII.
fn is_name_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// The headers sorted by name, or the first thing wrong with them.
fn checked_headers(headers: &[(String, String)]) -> Result<Vec<(String, String)>, CommandError> {
    if headers.len() > HEADERS_MAX {
        return Err(invalid("headers", format!("at most {HEADERS_MAX} headers, not {}", headers.len())));
    }
    let mut out = headers.to_vec();
    out.sort();
    for (name, value) in &out {
        if name.is_empty() || !name.bytes().all(is_name_byte) {
            return Err(invalid(
                "headers",
                format!("{name:?} is not a header name (visible ASCII, no separators)"),
            ));
        }
        if is_reserved_header(name) {
            return Err(invalid("headers", format!("{name:?} is a header herald sets itself")));
        }
        if value.len() > HEADER_VALUE_BYTES_MAX || !value.bytes().all(|b| b == b' ' || b.is_ascii_graphic()) {
            return Err(invalid(
                "headers",
                format!(
                    "the value of {name:?} must be visible ASCII of at most {HEADER_VALUE_BYTES_MAX} bytes"
                ),
            ));
        }
    }
    let lower: std::collections::BTreeSet<String> = out.iter().map(|(n, _)| n.to_ascii_lowercase()).collect();
    if lower.len() != out.len() {
        return Err(invalid("headers", "a header is named twice (names ignore case)"));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field_of(result: Result<DeliverySettings, CommandError>) -> &'static str {
        match result {
            Err(CommandError::Validation { field, .. }) => field,
            other => panic!("expected a validation error, got {other:?}"),
        }
    }

    fn headers(pairs: &[(&str, &str)]) -> DeliverySettingsPatch {
        DeliverySettingsPatch {
            headers: Some(pairs.iter().map(|(n, v)| (n.to_string(), v.to_string())).collect()),
            ..Default::default()
        }
    }

    #[test]
    fn numbers_are_bounded_and_null_unsets() {
        let base =
            DeliverySettings { rate_limit_per_s: Some(5), max_in_flight: Some(2), ..Default::default() };
        let unset = DeliverySettingsPatch { rate_limit_per_s: Some(None), ..Default::default() };
        let out = unset.applied_to(&base).unwrap();
        assert_eq!((out.rate_limit_per_s, out.max_in_flight), (None, Some(2)), "null unsets, absent keeps");
        for (rate, ok) in [(0, false), (1, true), (10_000, true), (10_001, false)] {
            let patch = DeliverySettingsPatch { rate_limit_per_s: Some(Some(rate)), ..Default::default() };
            assert_eq!(patch.applied_to(&base).is_ok(), ok, "rate {rate}");
        }
        for (max, ok) in [(0, false), (1, true), (1024, true), (1025, false)] {
            let patch = DeliverySettingsPatch { max_in_flight: Some(Some(max)), ..Default::default() };
            let result = patch.applied_to(&base);
            assert_eq!(result.is_ok(), ok, "max {max}");
            if !ok {
                assert_eq!(field_of(result), "max_in_flight");
            }
        }
    }

    #[test]
    fn headers_are_checked_and_sorted() {
        let out = headers(&[("x-b", "2"), ("X-A", "a b")]).applied_to(&DeliverySettings::default()).unwrap();
        assert_eq!(out.headers, vec![("X-A".into(), "a b".into()), ("x-b".into(), "2".into())]);
        let too_many: Vec<(String, String)> = (0..21).map(|i| (format!("x-{i}"), "v".into())).collect();
        let bad = [
            headers(&[("Content-Type", "x")]),
            headers(&[("webhook-id", "x")]),
            headers(&[("Herald-Attempt", "x")]),
            headers(&[("host", "x")]),
            headers(&[("", "x")]),
            headers(&[("x y", "x")]),
            headers(&[("x-a", "é")]),
            headers(&[("x-a", "line\nbreak")]),
            headers(&[("x-a", &"v".repeat(1025))]),
            headers(&[("x-a", "1"), ("X-A", "2")]),
            DeliverySettingsPatch { headers: Some(too_many), ..Default::default() },
        ];
        for patch in bad {
            assert_eq!(field_of(patch.applied_to(&DeliverySettings::default())), "headers", "{patch:?}");
        }
        assert!(headers(&[("x-a", &"v".repeat(1024))]).applied_to(&DeliverySettings::default()).is_ok());
    }
}
