//! The listening socket with a cap on open connections, and the open-file limit it is sized
//! from: a client that opens thousands of idle connections must not take the file descriptors
//! the store and the dispatcher need, nor leave a normal client hanging in the backlog.
//!
//! Up to the cap, connections are served as usual. Beyond it each one is accepted and answered
//! at once with a canned `503` (`Retry-After: 1`) and closed: a refused connection costs a
//! descriptor for a few milliseconds, never a hang. An accept that fails for want of a
//! descriptor (EMFILE, ENFILE) is tried again shortly instead of taking the loop down.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Descriptors kept for everything but the API's connections (the store's files, the log, the
/// listener, stdio), on top of the dispatcher's attempts in flight.
pub const RESERVED_DESCRIPTORS: u64 = 128;
/// Connections refused at the same time, at most; beyond it a refused connection is closed
/// without its 503, so refusing can never take more descriptors than this.
pub const REFUSING_MAX: usize = 64;
/// How long a refused connection is given to take its 503 before it is closed.
const REFUSE_LINGER: Duration = Duration::from_millis(200);
/// The wait before accepting again after an accept failed for want of a descriptor or memory.
const ACCEPT_RETRY: Duration = Duration::from_millis(20);

const REFUSAL: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\n\
content-type: application/json\r\n\
retry-after: 1\r\n\
connection: close\r\n\
content-length: 97\r\n\r\n\
{\"name\":\"ServiceUnavailable\",\"error\":\"too many open connections; try again shortly\",\"status\":503}";

/// Raises this process's soft limit of open files to its hard limit, and returns the limit in
/// force (the soft one, raised or not).
pub fn raise_open_files_limit() -> io::Result<u64> {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit and setrlimit read or write the struct we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(io::Error::last_os_error());
    }
    if limit.rlim_cur < limit.rlim_max {
        let raised = libc::rlimit { rlim_cur: limit.rlim_max, rlim_max: limit.rlim_max };
        // SAFETY: setrlimit reads the struct we own.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            limit = raised;
        }
    }
    Ok(limit.rlim_cur)
}

/// The default cap on open API connections under an open-file limit of `open_files_max`: what
/// is left after the dispatcher's `attempts_max` connections and [`RESERVED_DESCRIPTORS`], but
/// never less than a quarter of the limit (the dispatcher then meets the limit first, and its
/// attempts are put off, not failed: a fault of this host).
pub fn default_connections_max(open_files_max: u64, attempts_max: u64) -> usize {
    let reserve = attempts_max.saturating_add(RESERVED_DESCRIPTORS);
    let cap = open_files_max.saturating_sub(reserve).max(open_files_max / 4).max(1);
    usize::try_from(cap).unwrap_or(usize::MAX)
}

/// A [`TcpListener`] that holds at most `connections_max` connections open.
pub struct CappedListener {
    inner: TcpListener,
    open: Arc<Semaphore>,
    refusing: Arc<Semaphore>,
    refused: Arc<AtomicU64>,
}

impl CappedListener {
    pub fn new(inner: TcpListener, connections_max: usize) -> CappedListener {
        CappedListener {
            inner,
            open: Arc::new(Semaphore::new(connections_max.max(1))),
            refusing: Arc::new(Semaphore::new(REFUSING_MAX)),
            refused: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Counts the connections refused because the cap was reached into `refused` (the metrics').
    pub fn counting_into(mut self, refused: Arc<AtomicU64>) -> CappedListener {
        self.refused = refused;
        self
    }

    /// Answers a connection over the cap with the canned 503 and closes it, off the accept loop.
    fn refuse(&self, mut stream: TcpStream) {
        self.refused.fetch_add(1, Ordering::Relaxed);
        let Ok(permit) = self.refusing.clone().try_acquire_owned() else { return };
        tokio::spawn(async move {
            let _permit = permit;
            let _ = tokio::time::timeout(REFUSE_LINGER, async {
                stream.write_all(REFUSAL).await?;
                stream.shutdown().await?;
                // Read what the client sent, so closing does not reset the connection before
                // it has read the answer.
                let mut sink = [0u8; 4096];
                while stream.read(&mut sink).await? > 0 {}
                Ok::<_, io::Error>(())
            })
            .await;
        });
    }
}

impl axum::serve::Listener for CappedListener {
    type Io = Held;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Held, SocketAddr) {
        loop {
            match self.inner.accept().await {
                Ok((stream, addr)) => match self.open.clone().try_acquire_owned() {
                    Ok(permit) => return (Held { stream, _permit: permit }, addr),
                    Err(_) => self.refuse(stream),
                },
                // The peer gave up before the accept: nothing to do.
                Err(e) if is_connection_error(&e) => {}
                // No descriptor or memory left for now: connections close, so try again shortly.
                Err(_) => tokio::time::sleep(ACCEPT_RETRY).await,
            }
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }
}

fn is_connection_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused | io::ErrorKind::ConnectionAborted | io::ErrorKind::ConnectionReset
    )
}

/// An accepted connection, holding its place under the cap until it is dropped.
pub struct Held {
    stream: TcpStream,
    _permit: OwnedSemaphorePermit,
}

impl AsyncRead for Held {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Held {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_cap_leaves_room_for_the_dispatcher_and_the_store() {
        assert_eq!(default_connections_max(1_048_576, 1_024), 1_048_576 - 1_024 - 128);
        assert_eq!(default_connections_max(4_096, 1_024), 4_096 - 1_024 - 128);
        // A small limit: a quarter of it for the API; the dispatcher's attempts are put off.
        assert_eq!(default_connections_max(1_024, 1_024), 256);
        assert_eq!(default_connections_max(0, 1_024), 1);
        assert_eq!(REFUSAL.len() - REFUSAL.windows(4).position(|w| w == b"\r\n\r\n").unwrap() - 4, 97);
    }

    #[tokio::test]
    async fn over_the_cap_a_connection_gets_a_503_at_once_and_a_freed_place_is_taken_again() {
        use axum::serve::Listener;
        let refused = Arc::new(AtomicU64::new(0));
        let mut listener = CappedListener::new(TcpListener::bind("127.0.0.1:0").await.unwrap(), 1)
            .counting_into(refused.clone());
        let addr = listener.local_addr().unwrap();
        let first = TcpStream::connect(addr).await.unwrap();
        let (held, _) = listener.accept().await;
        // The second is over the cap: refused from inside accept, which keeps waiting.
        let mut second = TcpStream::connect(addr).await.unwrap();
        second.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n").await.unwrap();
        let mut third = None;
        let accepting = async {
            let (io, _) = listener.accept().await;
            io
        };
        tokio::pin!(accepting);
        let mut answer = Vec::new();
        tokio::select! {
            io = &mut accepting => third = Some(io),
            read = tokio::time::timeout(Duration::from_secs(5), second.read_to_end(&mut answer)) => {
                read.expect("the refusal came in time").unwrap();
            }
        }
        assert!(third.is_none(), "over the cap nothing is accepted");
        assert!(answer.starts_with(b"HTTP/1.1 503 "), "{}", String::from_utf8_lossy(&answer));
        assert_eq!(refused.load(Ordering::Relaxed), 1);
        // The held connection closes: the next one is served.
        drop((held, first));
        let _fourth = TcpStream::connect(addr).await.unwrap();
        tokio::time::timeout(Duration::from_secs(5), accepting).await.expect("accepted once a place is free");
    }
}
