//! The request a command came from: its id (`x-request-id`, made here or given by the client)
//! and when it arrived, held in a task-local for the time the request is handled, so that
//! [`Engine::submit_with`](crate::Engine::submit_with) can read both without an argument. The id
//! goes with the command into the engine (the log lines of the attempts it causes name it); the
//! arrival time starts the publish latency.
//!
//! Cheap by design, as every request makes or checks one: no random draw per id (a prefix drawn
//! once per process, then a counter), nothing allocated, nothing formatted until a line is written.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::Instant;

/// The longest request id accepted from a client.
pub const REQUEST_ID_BYTES_MAX: usize = 64;

/// A request's id: either made by this process (its prefix and a counter) or given by the client
/// (1 to [`REQUEST_ID_BYTES_MAX`] characters of `A-Z a-z 0-9 . _ : -`). `Copy`, held inline.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct RequestId(Repr);

#[derive(Clone, Copy, PartialEq, Eq)]
enum Repr {
    Made(u64),
    Given { len: u8, bytes: [u8; REQUEST_ID_BYTES_MAX] },
}

/// The ids made so far by this process.
static MADE: AtomicU64 = AtomicU64::new(0);

/// This process's prefix of the ids it makes: 8 hex digits drawn once, so ids of two runs (or two
/// herald processes behind one proxy) do not meet.
fn prefix() -> &'static str {
    static PREFIX: OnceLock<String> = OnceLock::new();
    PREFIX.get_or_init(|| {
        // The low bits of a version 7 UUID are random (the same draw every id of the engine uses).
        let random = uuid::Uuid::now_v7().as_u128() as u32;
        format!("{:08x}", random ^ std::process::id())
    })
}

impl RequestId {
    /// A new id: this process's prefix and the next number (no random draw).
    pub fn made() -> RequestId {
        RequestId(Repr::Made(MADE.fetch_add(1, Ordering::Relaxed) + 1))
    }

    /// The client's id if it is a valid one, else `None` (the caller then makes one).
    pub fn given(value: &[u8]) -> Option<RequestId> {
        let valid = |b: &u8| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-');
        if value.is_empty() || value.len() > REQUEST_ID_BYTES_MAX || !value.iter().all(valid) {
            return None;
        }
        let mut bytes = [0u8; REQUEST_ID_BYTES_MAX];
        bytes[..value.len()].copy_from_slice(value);
        Some(RequestId(Repr::Given { len: value.len() as u8, bytes }))
    }

    /// Whether the client gave this id.
    pub fn is_given(&self) -> bool {
        matches!(self.0, Repr::Given { .. })
    }

    /// Writes the id's text into `out` (at least 26 bytes for a made one, its length for a given
    /// one) and returns how long it is.
    pub fn write_to(&self, out: &mut [u8; REQUEST_ID_BYTES_MAX]) -> usize {
        match self.0 {
            Repr::Given { len, bytes } => {
                out[..usize::from(len)].copy_from_slice(&bytes[..usize::from(len)]);
                usize::from(len)
            }
            Repr::Made(n) => {
                let prefix = prefix().as_bytes();
                out[..prefix.len()].copy_from_slice(prefix);
                out[prefix.len()] = b'-';
                let mut at = prefix.len() + 1;
                let mut digits = [0u8; 20];
                let mut i = digits.len();
                let mut rest = n;
                loop {
                    i -= 1;
                    digits[i] = b'0' + (rest % 10) as u8;
                    rest /= 10;
                    if rest == 0 {
                        break;
                    }
                }
                out[at..at + digits.len() - i].copy_from_slice(&digits[i..]);
                at += digits.len() - i;
                at
            }
        }
    }
}

impl fmt::Display for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut buf = [0u8; REQUEST_ID_BYTES_MAX];
        let len = self.write_to(&mut buf);
        // Only ASCII is ever written (checked when given, digits and hex when made).
        f.write_str(std::str::from_utf8(&buf[..len]).map_err(|_| fmt::Error)?)
    }
}

impl fmt::Debug for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RequestId({self})")
    }
}

/// The request being handled: its id and when it arrived (its headers were read).
#[derive(Debug, Clone, Copy)]
pub struct RequestScope {
    pub id: RequestId,
    pub arrived: Instant,
}

tokio::task_local! {
    static REQUEST: RequestScope;
}

impl RequestScope {
    /// Runs `future` (a request's handling) with this scope readable through [`RequestScope::current`].
    pub fn scope<F: std::future::Future>(
        self,
        future: F,
    ) -> tokio::task::futures::TaskLocalFuture<RequestScope, F> {
        REQUEST.scope(self, future)
    }

    /// The request being handled by this task, if any.
    pub fn current() -> Option<RequestScope> {
        REQUEST.try_with(|scope| *scope).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn made_ids_differ_and_read_as_prefix_dash_number() {
        let (a, b) = (RequestId::made(), RequestId::made());
        assert_ne!(a, b);
        let (a, b) = (a.to_string(), b.to_string());
        let (pa, na) = a.split_once('-').unwrap();
        let (pb, nb) = b.split_once('-').unwrap();
        assert_eq!(pa, pb);
        assert_eq!(pa.len(), 8);
        assert!(nb.parse::<u64>().unwrap() > na.parse::<u64>().unwrap());
        assert!(RequestId::given(a.as_bytes()).is_some(), "a made id is a valid given one");
    }

    #[test]
    fn a_given_id_is_kept_only_when_valid() {
        let id = RequestId::given(b"0190d7a0-0000-7000-8000-00000000abcd").unwrap();
        assert!(id.is_given());
        assert_eq!(id.to_string(), "0190d7a0-0000-7000-8000-00000000abcd");
        assert_eq!(RequestId::given(&[b'a'; 64]).unwrap().to_string().len(), 64);
        for bad in [&b""[..], &[b'a'; 65], b"has space", b"quote\"", b"new\nline", "é".as_bytes()] {
            assert!(RequestId::given(bad).is_none(), "{bad:?}");
        }
    }

    #[tokio::test]
    async fn the_scope_is_read_inside_and_not_outside() {
        assert!(RequestScope::current().is_none());
        let scope = RequestScope { id: RequestId::made(), arrived: Instant::now() };
        let seen = scope.scope(async { RequestScope::current().map(|s| s.id) }).await;
        assert_eq!(seen, Some(scope.id));
    }
}
