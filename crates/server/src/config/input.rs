//! Reading one value: a file's TOML value or an environment variable's text, parsed to a key's
//! type, with an error that says what is wrong; and durations (`"5s"`, `"24h"`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use herald_engine::Durability;

use super::LogFormat;

/// Parses a duration: a whole number followed by a unit, `ms`, `s`, `m`, `h` or `d`
/// (`"250ms"`, `"5s"`, `"5m"`, `"24h"`, `"30d"`, `"0s"`). The error names the input.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let fail = |why: &str| Err(format!("invalid duration {text:?}: {why}"));
    if text.is_empty() {
        return fail("empty (write e.g. \"5s\")");
    }
    if text.starts_with('-') {
        return fail("durations cannot be negative");
    }
    let digits_end = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    let (digits, unit) = text.split_at(digits_end);
    if digits.is_empty() {
        return fail("expected a whole number followed by a unit (ms, s, m, h or d)");
    }
    let unit_ms: u64 = match unit {
        "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        "" => return fail("missing unit (ms, s, m, h or d)"),
        _ if unit.starts_with('.') => {
            return fail("only whole numbers are allowed (write \"1500ms\", not \"1.5s\")")
        }
        _ => return fail(&format!("unknown unit {unit:?} (expected ms, s, m, h or d)")),
    };
    match digits.parse::<u64>().ok().and_then(|n| n.checked_mul(unit_ms)) {
        Some(ms) => Ok(Duration::from_millis(ms)),
        None => fail("too large"),
    }
}

/// A value to set a key from: a file's TOML value or an environment variable's text.
#[derive(Clone, Copy)]
pub(super) enum Input<'a> {
    Toml(&'a toml::Value),
    Env(&'a str),
}

impl<'a> Input<'a> {
    /// A string (TOML) or the variable's text.
    pub(super) fn text(self, what: &str) -> Result<&'a str, String> {
        match self {
            Input::Toml(toml::Value::String(s)) => Ok(s),
            Input::Toml(other) => Err(format!("expected {what}, found {}", describe(other))),
            Input::Env(s) => Ok(s),
        }
    }

    /// A whole number that fits `T`.
    pub(super) fn count<T: TryFrom<u64>>(self) -> Result<T, String> {
        let n: u64 = match self {
            Input::Toml(toml::Value::Integer(i)) => {
                u64::try_from(*i).map_err(|_| format!("must not be negative, got {i}"))?
            }
            Input::Toml(other) => return Err(format!("expected a whole number, found {}", describe(other))),
            Input::Env(s) => {
                let t = s.trim();
                if t.starts_with('-') {
                    return Err(format!("must not be negative, got {s:?}"));
                }
                if t.is_empty() || !t.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(format!("expected a whole number, got {s:?}"));
                }
                t.parse().map_err(|_| format!("too large: {s:?}"))?
            }
        };
        T::try_from(n).map_err(|_| format!("too large: {n}"))
    }

    pub(super) fn boolean(self) -> Result<bool, String> {
        match self {
            Input::Toml(toml::Value::Boolean(b)) => Ok(*b),
            Input::Toml(other) => Err(format!("expected true or false, found {}", describe(other))),
            Input::Env(s) => match s.trim() {
                "true" => Ok(true),
                "false" => Ok(false),
                _ => Err(format!("expected true or false, got {s:?}")),
            },
        }
    }

    pub(super) fn socket_addr(self) -> Result<SocketAddr, String> {
        let text = self.text("an address such as \"127.0.0.1:8080\"")?;
        text.trim().parse().map_err(|_| {
            format!("invalid address {text:?}: expected IP:PORT such as \"127.0.0.1:8080\" or \"[::1]:8080\"")
        })
    }

    /// `"forever"`, or a duration of at least 1s.
    pub(super) fn retain(self) -> Result<Option<Duration>, String> {
        let text = self.text("\"forever\" or a duration such as \"30d\"")?;
        match text.trim() {
            "forever" => Ok(None),
            other => match parse_duration(other) {
                Ok(d) if d >= Duration::from_secs(1) => Ok(Some(d)),
                Ok(_) => Err(format!("{other:?} is under 1s; give \"forever\" or a duration of at least 1s")),
                Err(e) => Err(format!("{e}; or \"forever\"")),
            },
        }
    }

    pub(super) fn duration(self) -> Result<Duration, String> {
        let text = self.text("a duration such as \"5s\"")?;
        match self {
            Input::Env(_) => parse_duration(text.trim()),
            Input::Toml(_) => parse_duration(text),
        }
    }

    /// A TOML array of durations; in the environment, a comma-separated list (`5s,5m,30m`) or a
    /// TOML array literal (`["5s", "5m"]`, `[]` for none).
    pub(super) fn durations(self) -> Result<Vec<Duration>, String> {
        match self {
            Input::Toml(toml::Value::Array(items)) => items
                .iter()
                .enumerate()
                .map(|(i, item)| match item {
                    toml::Value::String(s) => parse_duration(s).map_err(|e| format!("entry {}: {e}", i + 1)),
                    other => Err(format!(
                        "entry {}: expected a duration such as \"5s\", found {}",
                        i + 1,
                        describe(other)
                    )),
                })
                .collect(),
            Input::Toml(other) => Err(format!(
                "expected an array of durations such as [\"5s\", \"5m\"], found {}",
                describe(other)
            )),
            Input::Env(s) => {
                let t = s.trim();
                if t.starts_with('[') {
                    let value: toml::Value = t
                        .parse()
                        .map_err(|e: toml::de::Error| format!("invalid array {s:?}: {}", e.message()))?;
                    return Input::Toml(&value).durations();
                }
                if t.is_empty() {
                    return Err(
                        "empty: expected a comma-separated list such as \"5s,5m\", or [] for none".into()
                    );
                }
                t.split(',')
                    .enumerate()
                    .map(|(i, item)| parse_duration(item.trim()).map_err(|e| format!("entry {}: {e}", i + 1)))
                    .collect()
            }
        }
    }

    pub(super) fn durability(self) -> Result<Durability, String> {
        self.one_of(&[("sync", Durability::Sync), ("flush", Durability::Flush)])
    }

    pub(super) fn log_format(self) -> Result<LogFormat, String> {
        self.one_of(&[("text", LogFormat::Text), ("json", LogFormat::Json)])
    }

    /// One of the `choices`' names (surrounding blanks ignored): its value.
    fn one_of<T: Copy>(self, choices: &[(&str, T)]) -> Result<T, String> {
        let names: Vec<String> = choices.iter().map(|(name, _)| format!("{name:?}")).collect();
        let expected = names.join(" or ");
        let text = self.text(&expected)?;
        match choices.iter().find(|(name, _)| *name == text.trim()) {
            Some((_, value)) => Ok(*value),
            None => Err(format!("expected {expected}, got {text:?}")),
        }
    }

    /// A level name, lower-cased (checked against the known ones by the key's check).
    pub(super) fn log_level(self) -> Result<String, String> {
        Ok(self.text("a level name")?.trim().to_ascii_lowercase())
    }

    pub(super) fn path(self) -> Result<PathBuf, String> {
        let text = self.text("a path")?;
        if text.is_empty() {
            return Err("must not be empty".into());
        }
        Ok(PathBuf::from(text))
    }

    /// A path, or none for an empty value (so an environment variable can unset the file's).
    pub(super) fn optional_path(self) -> Result<Option<PathBuf>, String> {
        let text = self.text("a path")?;
        Ok((!text.is_empty()).then(|| PathBuf::from(text)))
    }
}

/// A TOML value's type, with the value where it is short, for error messages.
pub(super) fn describe(value: &toml::Value) -> String {
    match value {
        toml::Value::String(s) => format!("the string {s:?}"),
        toml::Value::Integer(i) => format!("the integer {i}"),
        toml::Value::Float(x) => format!("the number {x}"),
        toml::Value::Boolean(b) => format!("the boolean {b}"),
        toml::Value::Datetime(d) => format!("the date-time {d}"),
        toml::Value::Array(_) => "an array".into(),
        toml::Value::Table(_) => "a table".into(),
    }
}
