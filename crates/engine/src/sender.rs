//! The HTTP sender: one attempt to deliver one signed request to a receiver.
//!
//! [`Sender`] is a trait so the dispatcher can be driven by a simulated network in tests;
//! [`HttpSender`] is the real one. It keeps one client with a keep-alive pool, never follows a
//! redirect (a 3xx is an answer like any other non-2xx), bounds the whole attempt by one timeout,
//! keeps at most [`EXCERPT_BYTES_MAX`] bytes of the response body and stops reading there.
//!
//! Unless private targets are allowed, it refuses receivers on loopback, private, link-local and
//! other non-public addresses, judged on the addresses a name *resolves to* (a resolver that
//! refuses them is installed in the client) as well as on IP literals in the URL.

use std::error::Error as StdError;
use std::fmt;
use std::future::Future;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use reqwest::dns::{Addrs, Name, Resolve, Resolving};
use reqwest::header::{HeaderName, HeaderValue, RETRY_AFTER};
use reqwest::{StatusCode, Url};

/// The most response-body bytes an attempt keeps (and reads).
pub const EXCERPT_BYTES_MAX: usize = 4096;

/// One attempt's request: `POST url` with these headers and this body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttemptRequest {
    pub url: String,
    pub headers: Vec<(String, String)>,
    pub body: Bytes,
}

/// What became of one attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SendOutcome {
    /// The receiver answered. Any status but 2xx counts as a failure for the engine.
    Response {
        status: u16,
        /// The first bytes of the body, at most [`EXCERPT_BYTES_MAX`].
        excerpt: Vec<u8>,
        /// The receiver's `Retry-After`, only on 429 and 503, clamped to `[0, retry_after_max_ms]`.
        retry_after_ms: Option<u64>,
    },
    /// No complete answer came.
    Failed { kind: FailureKind, error: String },
}

impl SendOutcome {
    /// Whether the receiver accepted the delivery (a 2xx answer).
    pub fn is_success(&self) -> bool {
        matches!(self, SendOutcome::Response { status, .. } if (200..300).contains(status))
    }

    fn failed(kind: FailureKind, error: impl Into<String>) -> SendOutcome {
        SendOutcome::Failed { kind, error: error.into() }
    }
}

/// Why an attempt got no answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FailureKind {
    /// The whole attempt (connect, TLS, request, response head and kept body) overran the timeout.
    Timeout,
    /// The connection could not be made: name resolution failed, connection refused or unreachable.
    Connect,
    /// The TLS handshake failed (an invalid certificate, or a peer that does not speak TLS).
    Tls,
    /// The target is on a non-public address and private targets are not allowed.
    Refused,
    /// The URL does not parse, or is not http or https.
    InvalidUrl,
    /// A header name or value cannot be sent.
    InvalidHeader,
    /// The connection broke after it was made (reset, closed early, malformed answer).
    Io,
    /// A fault of this host, not of the receiver or the network to it: no file descriptor left
    /// (EMFILE, ENFILE), no memory or buffer (ENOMEM, ENOBUFS), no local port (EADDRNOTAVAIL),
    /// the local resolver not answering (EAI_AGAIN). Not a failed attempt: the engine records
    /// nothing, uses no step of the schedule, and tries again shortly.
    Local,
}

impl FailureKind {
    /// Whether the fault is this host's, so the attempt says nothing about the receiver.
    pub fn is_local(self) -> bool {
        self == FailureKind::Local
    }
}

/// The future a [`Sender`] returns.
pub type SendFuture<'a> = Pin<Box<dyn Future<Output = SendOutcome> + Send + 'a>>;

/// Makes one delivery attempt. The engine uses [`HttpSender`]; a simulation swaps in its own.
pub trait Sender: Send + Sync + 'static {
    fn send(&self, req: AttemptRequest) -> SendFuture<'_>;
}

/// How [`HttpSender`] behaves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SenderConfig {
    /// The whole attempt: connecting, TLS, sending, the response head and the kept part of the body.
    pub timeout: Duration,
    /// Whether loopback, private, link-local and other non-public addresses may be targets.
    pub allow_private_targets: bool,
    /// PEM certificates trusted as roots beside the built-in web roots (for private receivers).
    pub extra_ca_pem: Option<Vec<u8>>,
    /// The longest `Retry-After` honoured; longer ones are clamped to it.
    pub retry_after_max_ms: u64,
    /// The `user-agent` header of every attempt.
    pub user_agent: String,
    /// How long an idle keep-alive connection is kept.
    pub pool_idle_timeout: Duration,
    /// How many idle keep-alive connections are kept per host.
    pub pool_idle_per_host_max: usize,
}

impl Default for SenderConfig {
    fn default() -> SenderConfig {
        SenderConfig {
            timeout: Duration::from_secs(15),
            allow_private_targets: false,
            extra_ca_pem: None,
            retry_after_max_ms: 60 * 60 * 1000,
            user_agent: concat!("herald/", env!("CARGO_PKG_VERSION")).to_owned(),
            pool_idle_timeout: Duration::from_secs(90),
            pool_idle_per_host_max: 16,
        }
    }
}

/// Why an [`HttpSender`] could not be built.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SenderBuildError {
    /// `extra_ca_pem` holds no certificate, or one that does not parse.
    ExtraCa { reason: String },
    /// The HTTP client refused the configuration.
    Client { reason: String },
}

impl fmt::Display for SenderBuildError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SenderBuildError::ExtraCa { reason } => write!(f, "extra CA certificates: {reason}"),
            SenderBuildError::Client { reason } => write!(f, "HTTP client: {reason}"),
        }
    }
}

impl StdError for SenderBuildError {}

/// The real sender: one shared `reqwest` client over HTTP/1.1 with rustls and the web roots.
#[derive(Debug, Clone)]
pub struct HttpSender {
    client: reqwest::Client,
    timeout: Duration,
    allow_private_targets: bool,
    retry_after_max_ms: u64,
}

impl HttpSender {
    pub fn new(config: SenderConfig) -> Result<HttpSender, SenderBuildError> {
        let mut builder = reqwest::Client::builder()
            .http1_only()
            .redirect(reqwest::redirect::Policy::none())
            // Proxies from the environment would bypass the address guard; herald connects itself.
            .no_proxy()
            .user_agent(config.user_agent.clone())
            .pool_idle_timeout(config.pool_idle_timeout)
            .pool_max_idle_per_host(config.pool_idle_per_host_max)
            .tcp_nodelay(true)
            .tls_built_in_root_certs(true);
        if let Some(pem) = &config.extra_ca_pem {
            let certs = reqwest::Certificate::from_pem_bundle(pem)
                .map_err(|e| SenderBuildError::ExtraCa { reason: describe_chain(&e) })?;
            if certs.is_empty() {
                return Err(SenderBuildError::ExtraCa { reason: "no PEM certificate found".to_owned() });
            }
            for cert in certs {
                builder = builder.add_root_certificate(cert);
            }
        }
        if !config.allow_private_targets {
            builder = builder.dns_resolver(Arc::new(PublicOnlyResolver));
        }
        let client = builder.build().map_err(|e| SenderBuildError::Client { reason: describe_chain(&e) })?;
        Ok(HttpSender {
            client,
            timeout: config.timeout,
            allow_private_targets: config.allow_private_targets,
            retry_after_max_ms: config.retry_after_max_ms,
        })
    }

    async fn attempt(&self, req: AttemptRequest) -> SendOutcome {
        let url = match Url::parse(&req.url) {
            Ok(url) => url,
            Err(e) => return SendOutcome::failed(FailureKind::InvalidUrl, format!("invalid URL: {e}")),
        };
        if let Err(e) = check_parsed_url(&url, true) {
            return SendOutcome::failed(FailureKind::InvalidUrl, e.to_string());
        }
        // IP literals never reach the resolver, so they are judged here.
        if !self.allow_private_targets {
            if let Some(ip) = literal_ip(&url) {
                if let Some(kind) = non_public_kind(ip) {
                    let refused = PrivateTargetRefused { host: ip.to_string(), addr: ip, kind };
                    return SendOutcome::failed(FailureKind::Refused, refused.to_string());
                }
            }
        }
        let mut headers = reqwest::header::HeaderMap::with_capacity(req.headers.len());
        for (name, value) in &req.headers {
            let Ok(header_name) = HeaderName::from_bytes(name.as_bytes()) else {
                return SendOutcome::failed(
                    FailureKind::InvalidHeader,
                    format!("invalid header name {name:?}"),
                );
            };
            let Ok(header_value) = HeaderValue::from_str(value) else {
                return SendOutcome::failed(
                    FailureKind::InvalidHeader,
                    format!("invalid value for header {name:?}"),
                );
            };
            headers.append(header_name, header_value);
        }
        let is_https = url.scheme() == "https";
        let exchange = async {
            let mut response = self.client.post(url).headers(headers).body(req.body).send().await?;
            let status = response.status();
            let retry_after_ms =
                if status == StatusCode::TOO_MANY_REQUESTS || status == StatusCode::SERVICE_UNAVAILABLE {
                    response
                        .headers()
                        .get(RETRY_AFTER)
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| parse_retry_after(v, SystemTime::now(), self.retry_after_max_ms))
                } else {
                    None
                };
            let mut excerpt = Vec::new();
            while excerpt.len() < EXCERPT_BYTES_MAX {
                let Some(chunk) = response.chunk().await? else { break };
                let kept = chunk.len().min(EXCERPT_BYTES_MAX - excerpt.len());
                excerpt.extend_from_slice(&chunk[..kept]);
            }
            // Dropping the response here drops an unread rest of the body with its connection.
            Ok::<_, reqwest::Error>(SendOutcome::Response {
                status: status.as_u16(),
                excerpt,
                retry_after_ms,
            })
        };
        match tokio::time::timeout(self.timeout, exchange).await {
            Err(_elapsed) => SendOutcome::failed(FailureKind::Timeout, "Connection timeout"),
            Ok(Ok(outcome)) => outcome,
            Ok(Err(e)) => classify(&e, is_https),
        }
    }
}

impl Sender for HttpSender {
    fn send(&self, req: AttemptRequest) -> SendFuture<'_> {
        Box::pin(self.attempt(req))
    }
}

/// Parses a `Retry-After` value (delta-seconds or an HTTP-date, judged against `now`) into
/// milliseconds clamped to `[0, max_ms]`. `None` when the value is neither form.
pub fn parse_retry_after(value: &str, now: SystemTime, max_ms: u64) -> Option<u64> {
    let value = value.trim();
    let delay_ms = if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) {
        // All digits: only overflow can fail, and an overflowing delay is simply long.
        value.parse::<u64>().unwrap_or(u64::MAX).saturating_mul(1000)
    } else {
        let at = httpdate::parse_http_date(value).ok()?;
        at.duration_since(now).map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
    };
    Some(delay_ms.min(max_ms))
}

/// Why a URL cannot be an endpoint's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UrlError {
    /// Not a URL at all.
    Invalid { reason: String },
    /// A scheme other than http or https.
    UnsupportedScheme { scheme: String },
    /// No host to connect to.
    MissingHost,
    /// A non-public target while private targets are not allowed.
    PrivateTarget { host: String, kind: AddressKind },
}

impl fmt::Display for UrlError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            UrlError::Invalid { reason } => write!(f, "invalid URL: {reason}"),
            UrlError::UnsupportedScheme { scheme } => {
                write!(f, "the URL's scheme must be http or https, not {scheme:?}")
            }
            UrlError::MissingHost => write!(f, "the URL has no host"),
            UrlError::PrivateTarget { host, kind } => {
                write!(f, "the URL's host {host} is a {kind} address, and private targets are not allowed")
            }
        }
    }
}

impl StdError for UrlError {}

/// Validates an endpoint URL: http or https, with a host; with `allow_private` false, no IP
/// literal of a non-public address and no `localhost` name. Names are resolved only when sending.
pub fn check_url(url: &str, allow_private: bool) -> Result<(), UrlError> {
    let parsed = Url::parse(url).map_err(|e| UrlError::Invalid { reason: e.to_string() })?;
    check_parsed_url(&parsed, allow_private)
}

fn check_parsed_url(url: &Url, allow_private: bool) -> Result<(), UrlError> {
    if !matches!(url.scheme(), "http" | "https") {
        return Err(UrlError::UnsupportedScheme { scheme: url.scheme().to_owned() });
    }
    let host = match url.host() {
        None => return Err(UrlError::MissingHost),
        Some(url::Host::Domain("")) => return Err(UrlError::MissingHost),
        Some(host) => host,
    };
    if allow_private {
        return Ok(());
    }
    let kind = match host {
        url::Host::Ipv4(ip) => non_public_kind(IpAddr::V4(ip)),
        url::Host::Ipv6(ip) => non_public_kind(IpAddr::V6(ip)),
        url::Host::Domain(name) => is_localhost_name(name).then_some(AddressKind::Loopback),
    };
    match kind {
        Some(kind) => Err(UrlError::PrivateTarget { host: host.to_string(), kind }),
        None => Ok(()),
    }
}

/// `localhost` and its subdomains (RFC 6761), with or without the root dot.
fn is_localhost_name(name: &str) -> bool {
    let name = name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase();
    name == "localhost" || name.ends_with(".localhost")
}

fn literal_ip(url: &Url) -> Option<IpAddr> {
    match url.host()? {
        url::Host::Ipv4(ip) => Some(IpAddr::V4(ip)),
        url::Host::Ipv6(ip) => Some(IpAddr::V6(ip)),
        url::Host::Domain(_) => None,
    }
}

/// The kind of a non-public address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AddressKind {
    Unspecified,
    Loopback,
    /// 10/8, 172.16/12, 192.168/16 and IPv6 unique local fc00::/7.
    Private,
    /// CGNAT 100.64/10.
    SharedCgnat,
    /// 169.254/16 (with cloud metadata 169.254.169.254) and fe80::/10.
    LinkLocal,
    Broadcast,
    Multicast,
    /// TEST-NETs, 2001:db8::/32, 3fff::/20.
    Documentation,
    /// 198.18/15.
    Benchmarking,
    /// Special-purpose and reserved blocks: 0/8, 192.0.0/24, 240/4, deprecated IPv6 forms,
    /// tunnels, and everything outside IPv6 global unicast 2000::/3.
    Reserved,
}

impl fmt::Display for AddressKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            AddressKind::Unspecified => "unspecified",
            AddressKind::Loopback => "loopback",
            AddressKind::Private => "private",
            AddressKind::SharedCgnat => "shared (CGNAT)",
            AddressKind::LinkLocal => "link-local",
            AddressKind::Broadcast => "broadcast",
            AddressKind::Multicast => "multicast",
            AddressKind::Documentation => "documentation",
            AddressKind::Benchmarking => "benchmarking",
            AddressKind::Reserved => "reserved",
        })
    }
}

/// `None` for a public address; otherwise what kind of non-public address it is. IPv4 addresses
/// embedded in IPv6 (mapped, compatible, NAT64, 6to4) are judged by their IPv4 part.
pub fn non_public_kind(ip: IpAddr) -> Option<AddressKind> {
    match ip {
        IpAddr::V4(v4) => non_public_v4(v4),
        IpAddr::V6(v6) => non_public_v6(v6),
    }
}

fn non_public_v4(ip: Ipv4Addr) -> Option<AddressKind> {
    let [a, b, c, _] = ip.octets();
    let kind = match (a, b, c) {
        _ if ip.is_unspecified() => AddressKind::Unspecified,
        _ if ip.is_broadcast() => AddressKind::Broadcast,
        (0, _, _) => AddressKind::Reserved,
        (127, _, _) => AddressKind::Loopback,
        (10, _, _) | (192, 168, _) => AddressKind::Private,
        (172, b, _) if b & 0xf0 == 16 => AddressKind::Private,
        (100, b, _) if b & 0xc0 == 64 => AddressKind::SharedCgnat,
        (169, 254, _) => AddressKind::LinkLocal,
        (192, 0, 0) | (192, 88, 99) => AddressKind::Reserved,
        (192, 0, 2) | (198, 51, 100) | (203, 0, 113) => AddressKind::Documentation,
        (198, b, _) if b & 0xfe == 18 => AddressKind::Benchmarking,
        (224..=239, _, _) => AddressKind::Multicast,
        (240..=255, _, _) => AddressKind::Reserved,
        _ => return None,
    };
    Some(kind)
}

fn non_public_v6(ip: Ipv6Addr) -> Option<AddressKind> {
    if let Some(v4) = ip.to_ipv4_mapped() {
        return non_public_v4(v4);
    }
    let s = ip.segments();
    let embedded_low = Ipv4Addr::new((s[6] >> 8) as u8, s[6] as u8, (s[7] >> 8) as u8, s[7] as u8);
    let kind = match s {
        _ if ip.is_unspecified() => AddressKind::Unspecified,
        _ if ip.is_loopback() => AddressKind::Loopback,
        // ::/96, the deprecated IPv4-compatible form.
        [0, 0, 0, 0, 0, 0, _, _] => return non_public_v4(embedded_low).or(Some(AddressKind::Reserved)),
        // 64:ff9b::/96, well-known NAT64: the IPv4 part decides.
        [0x64, 0xff9b, 0, 0, 0, 0, _, _] => return non_public_v4(embedded_low),
        // 64:ff9b:1::/48, local-use NAT64.
        [0x64, 0xff9b, 1, ..] => AddressKind::Reserved,
        // 2002::/16, 6to4: the IPv4 part decides.
        [0x2002, hi, lo, ..] => {
            let v4 = Ipv4Addr::new((hi >> 8) as u8, hi as u8, (lo >> 8) as u8, lo as u8);
            return non_public_v4(v4);
        }
        [0x2001, 0x0db8, ..] => AddressKind::Documentation,
        [0x3fff, b, ..] if b & 0xf000 == 0 => AddressKind::Documentation,
        // 2001::/32, Teredo tunnels.
        [0x2001, 0, ..] => AddressKind::Reserved,
        [a, ..] if a & 0xfe00 == 0xfc00 => AddressKind::Private,
        [a, ..] if a & 0xffc0 == 0xfe80 => AddressKind::LinkLocal,
        [a, ..] if a & 0xff00 == 0xff00 => AddressKind::Multicast,
        // Only 2000::/3 is global unicast.
        [a, ..] if a & 0xe000 != 0x2000 => AddressKind::Reserved,
        _ => return None,
    };
    Some(kind)
}

/// The error an attempt to a non-public address fails with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrivateTargetRefused {
    pub host: String,
    pub addr: IpAddr,
    pub kind: AddressKind,
}

impl fmt::Display for PrivateTargetRefused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host == self.addr.to_string() {
            write!(f, "refused: {} is a {} address (private targets are not allowed)", self.addr, self.kind)
        } else {
            write!(
                f,
                "refused: {} resolves to {}, a {} address (private targets are not allowed)",
                self.host, self.addr, self.kind
            )
        }
    }
}

impl StdError for PrivateTargetRefused {}

/// Resolves with the system resolver (through tokio) and refuses a name if any of its addresses
/// is non-public, so a name cannot smuggle a private address past the guard.
struct PublicOnlyResolver;

impl Resolve for PublicOnlyResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let host = name.as_str().to_owned();
        Box::pin(async move {
            let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            if let Some(bad) = addrs.iter().find_map(|a| non_public_kind(a.ip()).map(|kind| (a.ip(), kind))) {
                let (addr, kind) = bad;
                return Err(
                    Box::new(PrivateTargetRefused { host, addr, kind }) as Box<dyn StdError + Send + Sync>
                );
            }
            if addrs.is_empty() {
                let e = io::Error::new(io::ErrorKind::NotFound, format!("{host} has no address"));
                return Err(Box::new(e) as Box<dyn StdError + Send + Sync>);
            }
            Ok(Box::new(addrs.into_iter()) as Addrs)
        })
    }
}

/// Every error in `err`'s chain, looking inside `io::Error`s (whose `source` skips their payload).
fn chain<'a>(err: &'a (dyn StdError + 'static)) -> impl Iterator<Item = &'a (dyn StdError + 'static)> {
    std::iter::successors(Some(err), |&e: &&'a (dyn StdError + 'static)| {
        match e.downcast_ref::<io::Error>().and_then(|io| io.get_ref()) {
            Some(inner) => Some(inner as &'a (dyn StdError + 'static)),
            None => e.source(),
        }
    })
}

fn find<'a, T: StdError + 'static>(err: &'a (dyn StdError + 'static)) -> Option<&'a T> {
    chain(err).find_map(|e| e.downcast_ref::<T>())
}

/// The chain's messages without the outermost one (which repeats the URL) and without the
/// client's generic "client error (Connect)" layer, deduplicated.
fn describe_chain(err: &(dyn StdError + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    for e in chain(err).skip(1) {
        let text = e.to_string();
        if text.starts_with("client error (") {
            continue;
        }
        if parts.last() != Some(&text) {
            parts.push(text);
        }
    }
    if parts.is_empty() {
        err.to_string()
    } else {
        parts.join(": ")
    }
}

/// OS errors that are faults of this host, not of the receiver: out of file descriptors (per
/// process, system-wide), of memory, of socket buffers, of local ports.
const LOCAL_OS_ERRORS: [i32; 5] =
    [libc::EMFILE, libc::ENFILE, libc::ENOMEM, libc::ENOBUFS, libc::EADDRNOTAVAIL];

/// What `getaddrinfo` says when the resolver it asks does not answer (EAI_AGAIN); the standard
/// library reports it only as text.
const RESOLVER_UNREACHABLE: &str = "Temporary failure in name resolution";

/// The fault of this host in `err`'s chain, described, if there is one.
pub fn local_fault(err: &(dyn StdError + 'static)) -> Option<String> {
    chain(err).find_map(|e| {
        if let Some(os) = e.downcast_ref::<io::Error>().and_then(io::Error::raw_os_error) {
            if LOCAL_OS_ERRORS.contains(&os) {
                return Some(format!(
                    "a fault of this host, not the receiver's: {}",
                    io::Error::from_raw_os_error(os)
                ));
            }
        }
        let text = e.to_string();
        text.contains(RESOLVER_UNREACHABLE).then(|| {
            format!("a fault of this host, not the receiver's: the resolver did not answer ({text})")
        })
    })
}

fn classify(err: &reqwest::Error, is_https: bool) -> SendOutcome {
    let err_dyn: &(dyn StdError + 'static) = err;
    if let Some(refused) = find::<PrivateTargetRefused>(err_dyn) {
        return SendOutcome::failed(FailureKind::Refused, refused.to_string());
    }
    if let Some(fault) = local_fault(err_dyn) {
        return SendOutcome::failed(FailureKind::Local, fault);
    }
    if let Some(tls) = find::<rustls::Error>(err_dyn) {
        return SendOutcome::failed(FailureKind::Tls, format!("TLS: {tls}"));
    }
    if err.is_timeout() {
        return SendOutcome::failed(FailureKind::Timeout, "Connection timeout");
    }
    let io_kind = find::<io::Error>(err_dyn).map(io::Error::kind);
    if err.is_connect() {
        // The handshake is part of connecting: a peer that hangs up during it is no TLS server.
        if is_https && io_kind == Some(io::ErrorKind::UnexpectedEof) {
            return SendOutcome::failed(
                FailureKind::Tls,
                "TLS: the peer closed the connection during the handshake",
            );
        }
        let error = match io_kind {
            Some(io::ErrorKind::ConnectionRefused) => "connection refused".to_owned(),
            Some(io::ErrorKind::ConnectionReset) => "connection reset".to_owned(),
            _ => format!("connection failed: {}", describe_chain(err_dyn)),
        };
        return SendOutcome::failed(FailureKind::Connect, error);
    }
    if err.is_builder() {
        return SendOutcome::failed(FailureKind::InvalidUrl, describe_chain(err_dyn));
    }
    let error = match io_kind {
        Some(io::ErrorKind::ConnectionReset) => "connection reset by the receiver".to_owned(),
        _ => format!("connection error: {}", describe_chain(err_dyn)),
    };
    SendOutcome::failed(FailureKind::Io, error)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An error wrapping `inner` as reqwest and hyper do: the OS error sits deep in the chain.
    #[derive(Debug)]
    struct Wrapped(Box<dyn StdError + Send + Sync>);

    impl fmt::Display for Wrapped {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            write!(f, "client error (Connect)")
        }
    }

    impl StdError for Wrapped {
        fn source(&self) -> Option<&(dyn StdError + 'static)> {
            Some(self.0.as_ref())
        }
    }

    #[test]
    fn faults_of_this_host_are_told_from_the_receivers() {
        for os in LOCAL_OS_ERRORS {
            let err = Wrapped(Box::new(io::Error::from_raw_os_error(os)));
            let fault = local_fault(&err).unwrap_or_else(|| panic!("os error {os} is local"));
            assert!(fault.starts_with("a fault of this host"), "{fault}");
        }
        let resolver =
            io::Error::other("failed to lookup address information: Temporary failure in name resolution");
        assert!(local_fault(&Wrapped(Box::new(resolver))).unwrap().contains("the resolver did not answer"));
        for os in
            [libc::ECONNREFUSED, libc::ECONNRESET, libc::ETIMEDOUT, libc::EHOSTUNREACH, libc::ENETUNREACH]
        {
            assert_eq!(
                local_fault(&Wrapped(Box::new(io::Error::from_raw_os_error(os)))),
                None,
                "os error {os}"
            );
        }
        let unknown = io::Error::other("failed to lookup address information: Name or service not known");
        assert_eq!(local_fault(&Wrapped(Box::new(unknown))), None, "an unknown name is the receiver's");
    }

    fn kind(ip: &str) -> Option<AddressKind> {
        non_public_kind(ip.parse().unwrap())
    }

    #[test]
    fn address_classes() {
        let cases: &[(&str, Option<AddressKind>)] = &[
            ("8.8.8.8", None),
            ("1.1.1.1", None),
            ("172.15.255.255", None),
            ("172.32.0.1", None),
            ("100.63.255.255", None),
            ("100.128.0.0", None),
            ("0.0.0.0", Some(AddressKind::Unspecified)),
            ("0.1.2.3", Some(AddressKind::Reserved)),
            ("127.0.0.1", Some(AddressKind::Loopback)),
            ("127.255.255.254", Some(AddressKind::Loopback)),
            ("10.1.2.3", Some(AddressKind::Private)),
            ("172.16.0.1", Some(AddressKind::Private)),
            ("172.31.255.255", Some(AddressKind::Private)),
            ("192.168.1.1", Some(AddressKind::Private)),
            ("100.64.0.1", Some(AddressKind::SharedCgnat)),
            ("100.127.255.255", Some(AddressKind::SharedCgnat)),
            ("169.254.169.254", Some(AddressKind::LinkLocal)),
            ("255.255.255.255", Some(AddressKind::Broadcast)),
            ("224.0.0.1", Some(AddressKind::Multicast)),
            ("240.0.0.1", Some(AddressKind::Reserved)),
            ("192.0.2.1", Some(AddressKind::Documentation)),
            ("198.18.0.1", Some(AddressKind::Benchmarking)),
            ("2606:4700::1111", None),
            ("2001:4860:4860::8888", None),
            ("::", Some(AddressKind::Unspecified)),
            ("::1", Some(AddressKind::Loopback)),
            ("::ffff:127.0.0.1", Some(AddressKind::Loopback)),
            ("::ffff:10.0.0.1", Some(AddressKind::Private)),
            ("::ffff:169.254.169.254", Some(AddressKind::LinkLocal)),
            ("::ffff:8.8.8.8", None),
            ("::127.0.0.1", Some(AddressKind::Loopback)),
            ("::8.8.8.8", Some(AddressKind::Reserved)),
            ("64:ff9b::10.0.0.1", Some(AddressKind::Private)),
            ("64:ff9b::8.8.8.8", None),
            ("2002:7f00:1::", Some(AddressKind::Loopback)),
            ("2002:0808:0808::", None),
            ("fc00::1", Some(AddressKind::Private)),
            ("fd12:3456::1", Some(AddressKind::Private)),
            ("fe80::1", Some(AddressKind::LinkLocal)),
            ("ff02::1", Some(AddressKind::Multicast)),
            ("2001:db8::1", Some(AddressKind::Documentation)),
            ("2001:0::1", Some(AddressKind::Reserved)),
            ("100::1", Some(AddressKind::Reserved)),
        ];
        for (ip, expected) in cases {
            assert_eq!(kind(ip), *expected, "{ip}");
        }
    }

    #[test]
    fn check_url_rules() {
        let ok = ["http://example.com/hook", "https://example.com:8443/a?b=c", "http://8.8.8.8/"];
        for url in ok {
            assert_eq!(check_url(url, false), Ok(()), "{url}");
        }
        assert_eq!(
            check_url("ftp://example.com/", true),
            Err(UrlError::UnsupportedScheme { scheme: "ftp".into() })
        );
        assert!(matches!(check_url("example.com/hook", true), Err(UrlError::Invalid { .. })));
        assert!(matches!(
            check_url("http://", true),
            Err(UrlError::Invalid { .. }) | Err(UrlError::MissingHost)
        ));
        assert_eq!(
            check_url("unix:/run/herald.sock", true),
            Err(UrlError::UnsupportedScheme { scheme: "unix".into() })
        );
        let private = [
            ("http://127.0.0.1:8080/", AddressKind::Loopback),
            ("http://[::1]/", AddressKind::Loopback),
            ("http://169.254.169.254/latest/meta-data", AddressKind::LinkLocal),
            ("http://[::ffff:10.0.0.1]/", AddressKind::Private),
            ("http://10.1.2.3/", AddressKind::Private),
            ("http://localhost:3000/", AddressKind::Loopback),
            ("http://LOCALHOST./", AddressKind::Loopback),
            ("http://api.localhost/", AddressKind::Loopback),
            // The URL standard reads these as 127.0.0.1.
            ("http://2130706433/", AddressKind::Loopback),
            ("http://0x7f.1/", AddressKind::Loopback),
        ];
        for (url, expected) in private {
            match check_url(url, false) {
                Err(UrlError::PrivateTarget { kind, .. }) => assert_eq!(kind, expected, "{url}"),
                other => panic!("{url}: {other:?}"),
            }
            assert_eq!(check_url(url, true), Ok(()), "{url}");
        }
        let message = check_url("http://10.1.2.3/", false).unwrap_err().to_string();
        assert!(message.contains("10.1.2.3") && message.contains("private"), "{message}");
    }

    #[test]
    fn retry_after_forms() {
        let now = httpdate::parse_http_date("Sun, 06 Nov 1994 08:49:37 GMT").unwrap();
        let max_ms = 60_000;
        assert_eq!(parse_retry_after("2", now, max_ms), Some(2000));
        assert_eq!(parse_retry_after(" 0 ", now, max_ms), Some(0));
        assert_eq!(parse_retry_after("3600", now, max_ms), Some(max_ms));
        assert_eq!(parse_retry_after("99999999999999999999999", now, max_ms), Some(max_ms));
        assert_eq!(parse_retry_after("Sun, 06 Nov 1994 08:49:47 GMT", now, max_ms), Some(10_000));
        assert_eq!(parse_retry_after("Sun, 06 Nov 1994 08:00:00 GMT", now, max_ms), Some(0));
        assert_eq!(parse_retry_after("Mon, 07 Nov 1994 08:49:37 GMT", now, max_ms), Some(max_ms));
        for bad in ["", "-1", "1.5", "soon", "2 s"] {
            assert_eq!(parse_retry_after(bad, now, max_ms), None, "{bad:?}");
        }
    }

    #[test]
    fn outcome_success_is_2xx_only() {
        let response = |status| SendOutcome::Response { status, excerpt: Vec::new(), retry_after_ms: None };
        assert!(response(200).is_success());
        assert!(response(204).is_success());
        assert!(!response(301).is_success());
        assert!(!response(500).is_success());
        assert!(!SendOutcome::failed(FailureKind::Timeout, "Connection timeout").is_success());
    }
}
