//! The HTTP sender against real receivers on 127.0.0.1, each a small raw-HTTP server started by
//! the test and stopped at its end. Every test is bounded by `bounded`.

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use herald_engine::sender::{
    non_public_kind, AttemptRequest, FailureKind, HttpSender, SendOutcome, Sender, SenderConfig,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{JoinHandle, JoinSet};

/// No test may run longer than this.
const TEST_TIME_MAX: Duration = Duration::from_secs(20);
/// How much later than its timeout an attempt may end.
const TIMEOUT_MARGIN: Duration = Duration::from_millis(700);
/// The most request bytes a test receiver buffers.
const REQUEST_BYTES_MAX: usize = 1 << 20;

type Requests = Arc<Mutex<Vec<String>>>;

async fn bounded<F: Future<Output = ()>>(test: F) {
    tokio::time::timeout(TEST_TIME_MAX, test).await.expect("test overran its time bound");
}

/// A receiver: accepts connections on 127.0.0.1, counts them, and hands each to `handler`.
struct Receiver {
    port: u16,
    connections: Arc<AtomicUsize>,
    requests: Requests,
    accept_task: JoinHandle<()>,
}

impl Receiver {
    async fn start<H, F>(handler: H) -> Receiver
    where
        H: Fn(TcpStream, Requests) -> F + Send + Sync + 'static,
        F: Future<Output = ()> + Send + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let connections = Arc::new(AtomicUsize::new(0));
        let requests: Requests = Arc::default();
        let (counted, logged) = (connections.clone(), requests.clone());
        let accept_task = tokio::spawn(async move {
            // Dropping the set (when this task is aborted) aborts every connection task.
            let mut conns = JoinSet::new();
            while let Ok((stream, _)) = listener.accept().await {
                counted.fetch_add(1, Ordering::SeqCst);
                conns.spawn(handler(stream, logged.clone()));
            }
        });
        Receiver { port, connections, requests, accept_task }
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }

    async fn stop(self) {
        self.accept_task.abort();
        let _ = self.accept_task.await;
    }
}

/// Reads one request (head and `content-length` body) into text; `None` when the peer is gone.
async fn read_request(stream: &mut TcpStream) -> Option<String> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            let body_len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .map_or(0, |v| v.trim().parse().unwrap());
            if buf.len() >= end + 4 + body_len {
                return Some(String::from_utf8_lossy(&buf[..end + 4 + body_len]).into_owned());
            }
        }
        assert!(buf.len() < REQUEST_BYTES_MAX, "request too large for a test receiver");
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

/// A receiver that answers every request on a connection with `response`.
async fn answering(response: String) -> Receiver {
    Receiver::start(move |mut stream, requests| {
        let response = response.clone();
        async move {
            while let Some(request) = read_request(&mut stream).await {
                requests.lock().unwrap().push(request);
                if stream.write_all(response.as_bytes()).await.is_err() {
                    return;
                }
            }
        }
    })
    .await
}

fn sender(config: SenderConfig) -> HttpSender {
    HttpSender::new(config).unwrap()
}

fn loopback_config() -> SenderConfig {
    SenderConfig { allow_private_targets: true, timeout: Duration::from_secs(5), ..SenderConfig::default() }
}

fn request(url: String) -> AttemptRequest {
    AttemptRequest {
        url,
        headers: vec![
            ("content-type".to_owned(), "application/json".to_owned()),
            ("webhook-id".to_owned(), "evt_1".to_owned()),
        ],
        body: br#"{"n":1}"#.to_vec().into(),
    }
}

fn response(status: u16, excerpt: &[u8], retry_after_ms: Option<u64>) -> SendOutcome {
    SendOutcome::Response { status, excerpt: excerpt.to_vec(), retry_after_ms }
}

fn failure_kind(outcome: &SendOutcome) -> FailureKind {
    match outcome {
        SendOutcome::Failed { kind, .. } => *kind,
        other => panic!("expected a failure, got {other:?}"),
    }
}

#[tokio::test]
async fn success_reuses_one_keep_alive_connection() {
    bounded(async {
        let receiver = answering("HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok".to_owned()).await;
        let sender = sender(loopback_config());
        for _ in 0..2 {
            let outcome = sender.send(request(receiver.url("/hook"))).await;
            assert_eq!(outcome, response(200, b"ok", None));
            assert!(outcome.is_success());
        }
        assert_eq!(receiver.connections(), 1, "the second attempt should reuse the first connection");
        let requests = receiver.requests.lock().unwrap().clone();
        assert_eq!(requests.len(), 2);
        let first = requests[0].to_ascii_lowercase();
        assert!(first.starts_with("post /hook http/1.1\r\n"), "{first}");
        assert!(first.contains(&format!("user-agent: herald/{}\r\n", env!("CARGO_PKG_VERSION"))), "{first}");
        assert!(first.contains("webhook-id: evt_1\r\n"), "{first}");
        assert!(first.ends_with("\r\n\r\n{\"n\":1}"), "{first}");
        receiver.stop().await;
    })
    .await;
}

#[tokio::test]
async fn server_error_is_a_response_with_its_excerpt() {
    bounded(async {
        let receiver =
            answering("HTTP/1.1 500 Internal Server Error\r\ncontent-length: 5\r\n\r\noops!".to_owned())
                .await;
        let outcome = sender(loopback_config()).send(request(receiver.url("/"))).await;
        assert_eq!(outcome, response(500, b"oops!", None));
        assert!(!outcome.is_success());
        receiver.stop().await;
    })
    .await;
}

#[tokio::test]
async fn redirect_is_not_followed() {
    bounded(async {
        let target = answering("HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n".to_owned()).await;
        let redirecting = answering(format!(
            "HTTP/1.1 302 Found\r\nlocation: {}\r\ncontent-length: 5\r\n\r\nmoved",
            target.url("/elsewhere")
        ))
        .await;
        let outcome = sender(loopback_config()).send(request(redirecting.url("/"))).await;
        assert_eq!(outcome, response(302, b"moved", None));
        assert_eq!(target.connections(), 0, "the redirect target must not be contacted");
        redirecting.stop().await;
        target.stop().await;
    })
    .await;
}

#[tokio::test]
async fn silent_receiver_times_out() {
    bounded(async {
        let receiver = Receiver::start(|mut stream, _| async move {
            let _request = read_request(&mut stream).await;
            tokio::time::sleep(Duration::from_secs(3600)).await;
        })
        .await;
        let timeout = Duration::from_millis(500);
        let sender = sender(SenderConfig { timeout, ..loopback_config() });
        let started = Instant::now();
        let outcome = sender.send(request(receiver.url("/"))).await;
        let elapsed = started.elapsed();
        assert_eq!(
            outcome,
            SendOutcome::Failed { kind: FailureKind::Timeout, error: "Connection timeout".into() }
        );
        assert!(elapsed >= timeout && elapsed < timeout + TIMEOUT_MARGIN, "{elapsed:?}");
        receiver.stop().await;
    })
    .await;
}

#[tokio::test]
async fn trickled_body_times_out() {
    bounded(async {
        let receiver = Receiver::start(|mut stream, _| async move {
            let _request = read_request(&mut stream).await;
            let head = b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n";
            if stream.write_all(head).await.is_err() {
                return;
            }
            for _ in 0..100 {
                tokio::time::sleep(Duration::from_millis(100)).await;
                if stream.write_all(b"x").await.is_err() {
                    return;
                }
            }
        })
        .await;
        let timeout = Duration::from_millis(800);
        let sender = sender(SenderConfig { timeout, ..loopback_config() });
        let started = Instant::now();
        let outcome = sender.send(request(receiver.url("/"))).await;
        let elapsed = started.elapsed();
        assert_eq!(failure_kind(&outcome), FailureKind::Timeout);
        assert!(elapsed >= timeout && elapsed < timeout + TIMEOUT_MARGIN, "{elapsed:?}");
        receiver.stop().await;
    })
    .await;
}

/// A receiver that announces `body_bytes`, writes `written_bytes` of them ('a'..='z' repeating)
/// and then holds the connection open without writing more.
async fn large_body(body_bytes: usize, written_bytes: usize) -> Receiver {
    Receiver::start(move |mut stream, _| async move {
        let _request = read_request(&mut stream).await;
        let head = format!("HTTP/1.1 200 OK\r\ncontent-length: {body_bytes}\r\n\r\n");
        if stream.write_all(head.as_bytes()).await.is_err() {
            return;
        }
        let body: Vec<u8> = (0..written_bytes).map(|i| b'a' + (i % 26) as u8).collect();
        for piece in body.chunks(64 * 1024) {
            if stream.write_all(piece).await.is_err() {
                return;
            }
        }
        tokio::time::sleep(Duration::from_secs(3600)).await;
    })
    .await
}

fn expected_excerpt() -> Vec<u8> {
    (0..4096).map(|i| b'a' + (i % 26) as u8).collect()
}

#[tokio::test]
async fn large_body_keeps_4096_bytes_and_returns_promptly() {
    bounded(async {
        let five_mb = 5 * 1024 * 1024;
        let receiver = large_body(five_mb, five_mb).await;
        let sender = sender(SenderConfig { timeout: Duration::from_secs(10), ..loopback_config() });
        let started = Instant::now();
        let outcome = sender.send(request(receiver.url("/"))).await;
        assert!(started.elapsed() < Duration::from_secs(2), "{:?}", started.elapsed());
        assert_eq!(outcome, response(200, &expected_excerpt(), None));
        receiver.stop().await;
    })
    .await;
}

#[tokio::test]
async fn body_beyond_the_excerpt_is_never_awaited() {
    bounded(async {
        // 8 KiB of a promised 5 MB arrive, then nothing: waiting for the rest would time out.
        let receiver = large_body(5 * 1024 * 1024, 8192).await;
        let sender = sender(SenderConfig { timeout: Duration::from_secs(3), ..loopback_config() });
        let started = Instant::now();
        let outcome = sender.send(request(receiver.url("/"))).await;
        assert!(started.elapsed() < Duration::from_secs(1), "{:?}", started.elapsed());
        assert_eq!(outcome, response(200, &expected_excerpt(), None));
        receiver.stop().await;
    })
    .await;
}

#[tokio::test]
async fn connection_reset_fails() {
    bounded(async {
        let receiver = Receiver::start(|mut stream, _| async move {
            let _request = read_request(&mut stream).await;
            stream.set_zero_linger().unwrap();
            drop(stream);
        })
        .await;
        let outcome = sender(loopback_config()).send(request(receiver.url("/"))).await;
        let kind = failure_kind(&outcome);
        assert!(matches!(kind, FailureKind::Io | FailureKind::Connect), "{outcome:?}");
        receiver.stop().await;
    })
    .await;
}

#[tokio::test]
async fn closed_port_is_connection_refused() {
    bounded(async {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        drop(listener);
        let outcome = sender(loopback_config()).send(request(format!("http://127.0.0.1:{port}/"))).await;
        assert_eq!(
            outcome,
            SendOutcome::Failed { kind: FailureKind::Connect, error: "connection refused".into() }
        );
    })
    .await;
}

#[tokio::test]
async fn retry_after_on_429_and_503_is_kept_and_clamped() {
    bounded(async {
        let too_many =
            answering("HTTP/1.1 429 Too Many Requests\r\nretry-after: 2\r\ncontent-length: 0\r\n\r\n".into())
                .await;
        let unavailable = answering(
            "HTTP/1.1 503 Service Unavailable\r\nretry-after: 7\r\ncontent-length: 0\r\n\r\n".into(),
        )
        .await;
        let ok = answering("HTTP/1.1 200 OK\r\nretry-after: 2\r\ncontent-length: 0\r\n\r\n".into()).await;

        let roomy = sender(loopback_config());
        assert_eq!(roomy.send(request(too_many.url("/"))).await, response(429, b"", Some(2000)));
        assert_eq!(roomy.send(request(unavailable.url("/"))).await, response(503, b"", Some(7000)));
        assert_eq!(roomy.send(request(ok.url("/"))).await, response(200, b"", None));

        let tight = sender(SenderConfig { retry_after_max_ms: 1500, ..loopback_config() });
        assert_eq!(tight.send(request(too_many.url("/"))).await, response(429, b"", Some(1500)));

        too_many.stop().await;
        unavailable.stop().await;
        ok.stop().await;
    })
    .await;
}

#[tokio::test]
async fn https_to_a_plain_http_port_is_a_tls_failure() {
    bounded(async {
        let receiver = Receiver::start(|mut stream, _| async move {
            let mut hello = [0u8; 1024];
            let _ = stream.read(&mut hello).await;
            let _ = stream.write_all(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n").await;
        })
        .await;
        let url = format!("https://127.0.0.1:{}/", receiver.port);
        let outcome = sender(loopback_config()).send(request(url)).await;
        assert_eq!(failure_kind(&outcome), FailureKind::Tls, "{outcome:?}");
        receiver.stop().await;
    })
    .await;
}

mod self_signed {
    use super::*;
    use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
    use tokio_rustls::rustls::{crypto::ring, ServerConfig};
    use tokio_rustls::TlsAcceptor;

    /// An HTTPS receiver with a fresh self-signed certificate for 127.0.0.1; returns its PEM.
    async fn https_receiver() -> (Receiver, String) {
        let certified = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned()]).unwrap();
        let pem = certified.cert.pem();
        let cert = CertificateDer::from(certified.cert.der().to_vec());
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(certified.signing_key.serialize_der()));
        let config = ServerConfig::builder_with_provider(Arc::new(ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![cert], key)
            .unwrap();
        let acceptor = TlsAcceptor::from(Arc::new(config));
        let receiver = Receiver::start(move |stream, _| {
            let acceptor = acceptor.clone();
            async move {
                let Ok(mut tls) = acceptor.accept(stream).await else { return };
                let mut buf = [0u8; 8192];
                let _ = tls.read(&mut buf).await;
                let _ = tls.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 6\r\n\r\nsecure").await;
                let _ = tls.shutdown().await;
            }
        })
        .await;
        (receiver, pem)
    }

    #[tokio::test]
    async fn unknown_issuer_is_a_tls_failure() {
        bounded(async {
            let (receiver, _pem) = https_receiver().await;
            let url = format!("https://127.0.0.1:{}/", receiver.port);
            let outcome = sender(loopback_config()).send(request(url)).await;
            match &outcome {
                SendOutcome::Failed { kind: FailureKind::Tls, error } => {
                    assert!(error.starts_with("TLS: invalid peer certificate"), "{error}")
                }
                other => panic!("expected a TLS failure, got {other:?}"),
            }
            receiver.stop().await;
        })
        .await;
    }

    #[tokio::test]
    async fn extra_ca_makes_the_private_receiver_trusted() {
        bounded(async {
            let (receiver, pem) = https_receiver().await;
            let url = format!("https://127.0.0.1:{}/", receiver.port);
            let config = SenderConfig { extra_ca_pem: Some(pem.into_bytes()), ..loopback_config() };
            let outcome = sender(config).send(request(url)).await;
            assert_eq!(outcome, response(200, b"secure", None));
            receiver.stop().await;
        })
        .await;
    }
}

#[tokio::test]
async fn private_targets_are_refused_without_connecting() {
    bounded(async {
        let receiver = answering("HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n".to_owned()).await;
        let port = receiver.port;
        let guarded = sender(SenderConfig { allow_private_targets: false, ..loopback_config() });
        let literals = [
            format!("http://127.0.0.1:{port}/"),
            format!("http://[::1]:{port}/"),
            "http://169.254.169.254/latest/meta-data/".to_owned(),
            "http://[::ffff:10.0.0.1]/".to_owned(),
            "http://10.1.2.3/".to_owned(),
            format!("http://2130706433:{port}/"),
        ];
        for url in &literals {
            // Belt and braces: never let a broken classifier send a packet to a private range.
            let host = literal_host(url);
            assert!(non_public_kind(host.parse().unwrap()).is_some(), "{url} must classify as non-public");
            let outcome = guarded.send(request(url.clone())).await;
            assert_eq!(failure_kind(&outcome), FailureKind::Refused, "{url}: {outcome:?}");
        }
        // A name goes through the resolver, which refuses what it resolves to.
        let outcome = guarded.send(request(format!("http://localhost:{port}/"))).await;
        match &outcome {
            SendOutcome::Failed { kind: FailureKind::Refused, error } => {
                assert!(error.contains("localhost resolves to"), "{error}")
            }
            other => panic!("expected a refusal, got {other:?}"),
        }
        assert_eq!(receiver.connections(), 0);

        // The same receiver is reachable when private targets are allowed.
        let open = sender(loopback_config());
        assert!(open.send(request(format!("http://localhost:{port}/"))).await.is_success());
        assert_eq!(receiver.connections(), 1);
        receiver.stop().await;
    })
    .await;
}

/// The host of the URLs above as an IP text, without bracket or port.
fn literal_host(url: &str) -> String {
    let rest = url.strip_prefix("http://").unwrap();
    let authority = rest.split('/').next().unwrap();
    if let Some(v6) = authority.strip_prefix('[') {
        return v6.split(']').next().unwrap().to_owned();
    }
    let host = authority.split(':').next().unwrap();
    match host.parse::<u32>() {
        Ok(n) => std::net::Ipv4Addr::from(n).to_string(),
        Err(_) => host.to_owned(),
    }
}

#[tokio::test]
async fn invalid_requests_fail_before_sending() {
    bounded(async {
        let sender = sender(loopback_config());
        for url in ["ftp://example.com/", "not a url", "http://"] {
            let outcome = sender.send(request(url.to_owned())).await;
            assert_eq!(failure_kind(&outcome), FailureKind::InvalidUrl, "{url}");
        }
        let receiver = answering("HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n".to_owned()).await;
        let mut bad_header = request(receiver.url("/"));
        bad_header.headers.push(("webhook-signature".to_owned(), "v1,a\r\ninjected: yes".to_owned()));
        assert_eq!(failure_kind(&sender.send(bad_header).await), FailureKind::InvalidHeader);
        assert_eq!(receiver.connections(), 0);
        receiver.stop().await;
    })
    .await;
}
