//! Event-type patterns: an `enabled_events` entry or a recover's `event_type` is an exact type,
//! `*` (every type), or a prefix pattern ending in `.*` (`call.*`: every type that starts with
//! `call.`). Which strings are valid patterns is the engine's check; this is the matching alone.

/// Whether `pattern` takes `event_type`. A pattern ending in `.*` takes every type that starts
/// with what comes before its `*` (`call.*` takes `call.ended` and `call.queue.left`, not `call`
/// nor `callback.x`).
pub fn event_type_matches(pattern: &str, event_type: &str) -> bool {
    if pattern == "*" || pattern == event_type {
        return true;
    }
    match pattern.strip_suffix('*') {
        Some(prefix) => prefix.ends_with('.') && event_type.starts_with(prefix),
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exact_star_and_prefix_patterns() {
        let cases: [(&str, &str, bool); 12] = [
            ("*", "anything", true),
            ("call.ended", "call.ended", true),
            ("call.ended", "call.ende", false),
            ("call.*", "call.ended", true),
            ("call.*", "call.queue.left", true),
            ("call.*", "call", false),
            ("call.*", "callback.x", false),
            ("call.*", "xcall.ended", false),
            ("call.queue.*", "call.queue.left", true),
            ("call.queue.*", "call.ended", false),
            // a `*` anywhere else is no pattern: only an equal string matches it
            ("call*", "callback", false),
            ("*.ended", "call.ended", false),
        ];
        for (pattern, event_type, expected) in cases {
            assert_eq!(event_type_matches(pattern, event_type), expected, "{pattern} / {event_type}");
        }
    }
}
