//! HTTP and HTTPS downloads for updates: streamed, resumable with Range requests, bounded.
//!
//! This module owns getting bytes from a URL to a consumer in order: connecting (through a
//! [`Connect`] implementation, so a simulated network can plug its own streams in), TLS with a
//! configurable CA bundle, retries with backoff, timeouts on connect and on a stalled body, and
//! resuming a cut download from the byte it stopped at, a minimum rate (a server that drips a
//! byte now and then must not keep an install alive forever) and a length limit for inputs that
//! are held in memory. It never writes a file (no temporary copy of an image) and never
//! interprets the bytes: the update engine does.
//!
//! URLs in errors are redacted ([`redact_url`]): a presigned URL's query string and any user
//! information are credentials, and errors end up in Status, which every role may read.

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use rustls_pki_types::ServerName;
use std::future::Future;
use std::io;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};

/// A byte stream to a server.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> Io for T {}

pub type ConnectFuture<S> = Pin<Box<dyn Future<Output = io::Result<S>> + Send>>;

/// Opens byte streams to `host:port`. [`TcpConnect`] uses the operating system; a simulation
/// supplies its own (turmoil's TcpStream, say). TLS is layered on top by the fetcher.
pub trait Connect: Clone + Send + Sync + 'static {
    type Stream: Io;
    fn connect(&self, host: &str, port: u16) -> ConnectFuture<Self::Stream>;
}

/// Plain TCP through the operating system.
#[derive(Debug, Clone, Default)]
pub struct TcpConnect;

impl Connect for TcpConnect {
    type Stream = tokio::net::TcpStream;
    fn connect(&self, host: &str, port: u16) -> ConnectFuture<Self::Stream> {
        let addr = format!(
            "{}:{port}",
            host.trim_start_matches('[').trim_end_matches(']')
        );
        let addr = if host.contains(':') {
            format!(
                "[{}]:{port}",
                host.trim_start_matches('[').trim_end_matches(']')
            )
        } else {
            addr
        };
        Box::pin(async move {
            let s = tokio::net::TcpStream::connect(addr).await?;
            let _ = s.set_nodelay(true);
            Ok(s)
        })
    }
}

/// A download failed. Each variant says what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("{url:?} is not a valid URL: {reason}")]
    BadUrl { url: String, reason: String },
    #[error("{url:?} uses the unsupported scheme {scheme:?}; use http:// or https://")]
    UnsupportedScheme { url: String, scheme: String },
    #[error("{url} answered {status}{}", if *.status == 404 { " (not found: check the URL)" } else { "" })]
    Status { url: String, status: u16 },
    #[error("{url} answered {status} after {attempts} attempts; the server is failing, try later")]
    ServerError {
        url: String,
        status: u16,
        attempts: u32,
    },
    #[error(
        "{url} ignored the Range request for bytes {offset}- and sent the whole file; \
         {offset} bytes were already written, so the download cannot continue from there: \
         use a server that supports Range requests, or restart the install from the beginning"
    )]
    RangeIgnored { url: String, offset: u64 },
    #[error("{url} answered a Range request for bytes {offset}- with {got:?}")]
    BadContentRange {
        url: String,
        offset: u64,
        got: String,
    },
    #[error("{url}: the file changed size during the download ({before} then {after} bytes)")]
    SizeChanged {
        url: String,
        before: u64,
        after: u64,
    },
    #[error("{url}: gave up after {attempts} attempts; last error: {last}")]
    GaveUp {
        url: String,
        attempts: u32,
        last: String,
    },
    #[error("{url}: redirects are not followed ({status} to {location:?}); give the final URL")]
    Redirect {
        url: String,
        status: u16,
        location: String,
    },
    #[error("CA bundle {path}: {reason}")]
    CaBundle { path: String, reason: String },
    #[error(
        "{url}: only {got} bytes arrived in {secs} s, less than the minimum of {rate} bytes/s \
         (the server or the network is too slow, or stalls on purpose); fix the server or the \
         network, or lower keel-agent's --fetch-min-rate"
    )]
    TooSlow {
        url: String,
        got: u64,
        secs: u64,
        rate: u64,
    },
    #[error(
        "{url} is larger than the {limit}-byte limit on {what}; use a smaller file, or raise \
         the limit ({hint})"
    )]
    TooLong {
        url: String,
        limit: u64,
        what: &'static str,
        hint: &'static str,
    },
}

/// `url` as it may be shown in errors and logs: without user information (`user:password@`),
/// query string or fragment, which carry credentials in presigned URLs. A removed query shows
/// as `?<redacted>`.
pub fn redact_url(url: &str) -> String {
    let (before_query, had_query) = match url.find(['?', '#']) {
        Some(i) => (&url[..i], true),
        None => (url, false),
    };
    let (scheme, rest) = match before_query.split_once("://") {
        Some((s, r)) => (Some(s), r),
        None => (None, before_query),
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    };
    let host = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let mut out = String::new();
    if let Some(s) = scheme {
        out.push_str(s);
        out.push_str("://");
    }
    out.push_str(host);
    out.push_str(path);
    if had_query {
        out.push_str("?<redacted>");
    }
    out
}

/// The slowest a download may be: fewer than `bytes_per_second` x `window` bytes arriving
/// while the consumer waits for `window` is an error ([`FetchError::TooSlow`]). Only time spent
/// waiting for the server counts, so a slow consumer does not make the server look slow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MinRate {
    pub bytes_per_second: u64,
    pub window: Duration,
}

impl Default for MinRate {
    /// 1 KiB/s averaged over 2 minutes: far below any working update server, far above a
    /// server that drips a byte now and then.
    fn default() -> Self {
        MinRate {
            bytes_per_second: 1024,
            window: Duration::from_secs(120),
        }
    }
}

/// A parsed download URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub url: String,
    pub https: bool,
    pub host: String,
    pub port: u16,
    /// Path and query, as sent in the request line.
    pub path: String,
}

impl Target {
    /// The URL as errors show it (see [`redact_url`]).
    pub fn shown(&self) -> String {
        redact_url(&self.url)
    }
}

/// Parse and check a URL: http or https, with a host.
pub fn parse_url(url: &str) -> Result<Target, FetchError> {
    let bad = |reason: &str| FetchError::BadUrl {
        url: redact_url(url),
        reason: reason.to_string(),
    };
    if url.is_empty() {
        return Err(bad("it is empty"));
    }
    if let Some((scheme, _)) = url.split_once("://") {
        let s = scheme.to_ascii_lowercase();
        let valid = !s.is_empty()
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '+' || c == '-' || c == '.');
        if valid && s != "http" && s != "https" {
            return Err(FetchError::UnsupportedScheme {
                url: redact_url(url),
                scheme: scheme.to_string(),
            });
        }
    }
    let uri: http::Uri = url
        .parse()
        .map_err(|e: http::uri::InvalidUri| bad(&e.to_string()))?;
    let scheme = uri
        .scheme_str()
        .ok_or_else(|| bad("it has no scheme; write http://HOST/PATH or https://HOST/PATH"))?;
    let https = match scheme {
        "http" => false,
        "https" => true,
        other => {
            return Err(FetchError::UnsupportedScheme {
                url: redact_url(url),
                scheme: other.to_string(),
            })
        }
    };
    let host = uri
        .host()
        .filter(|h| !h.is_empty())
        .ok_or_else(|| bad("it has no host"))?;
    let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
    let path = uri
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .filter(|p| !p.is_empty())
        .unwrap_or_else(|| "/".into());
    Ok(Target {
        url: url.to_string(),
        https,
        host: host.to_string(),
        port,
        path,
    })
}

/// Limits of a download.
#[derive(Debug, Clone)]
pub struct Policy {
    /// Connect, TLS handshake and response headers must arrive within this.
    pub connect_timeout: Duration,
    /// A body that delivers nothing for this long is treated as a cut connection.
    pub stall_timeout: Duration,
    /// Attempts in all (first one included) before giving up.
    pub max_attempts: u32,
    /// First wait between attempts; doubled each time up to `max_backoff`.
    pub backoff: Duration,
    pub max_backoff: Duration,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            connect_timeout: Duration::from_secs(15),
            stall_timeout: Duration::from_secs(30),
            max_attempts: 8,
            backoff: Duration::from_millis(250),
            max_backoff: Duration::from_secs(10),
        }
    }
}

/// Downloads URLs through a connector.
#[derive(Clone)]
pub struct Fetcher<C: Connect = TcpConnect> {
    connect: C,
    tls: Arc<rustls::ClientConfig>,
    policy: Policy,
    min_rate: Option<MinRate>,
    memory_limit: u64,
}

/// The default of [`Fetcher::memory_limit`].
pub const DEFAULT_MEMORY_LIMIT: u64 = 128 << 20;

impl<C: Connect> std::fmt::Debug for Fetcher<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fetcher")
            .field("policy", &self.policy)
            .field("min_rate", &self.min_rate)
            .field("memory_limit", &self.memory_limit)
            .finish_non_exhaustive()
    }
}

/// A rustls client configuration trusting the certificates in a PEM bundle.
pub fn tls_with_ca_bundle(path: &Path) -> Result<Arc<rustls::ClientConfig>, FetchError> {
    let err = |reason: String| FetchError::CaBundle {
        path: path.display().to_string(),
        reason,
    };
    let certs = crate::pki::load_certs(path).map_err(|e| err(e.to_string()))?;
    let mut roots = rustls::RootCertStore::empty();
    for c in certs {
        roots.add(c).map_err(|e| err(e.to_string()))?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| err(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(cfg))
}

/// One attempt's failure, and whether another attempt may help.
#[derive(Debug)]
enum Attempt {
    Retry(String),
    /// A 5xx answer: retry, but report the status if it never improves.
    Server(u16),
    Fatal(FetchError),
}

type Body = Incoming;

/// What one request brought.
#[derive(Debug)]
enum Answer {
    /// The body from the position asked for, and the file's length when the server said it.
    Body(Body, Option<u64>),
    /// The position asked for is the file's end (416 with `bytes */LEN`, LEN the position): a
    /// body without a length was cut right after its last byte.
    Complete(u64),
}

impl<C: Connect> Fetcher<C> {
    /// `tls` is used for https URLs (see [`tls_with_ca_bundle`]). No minimum rate until
    /// [`with_min_rate`](Self::with_min_rate).
    pub fn new(connect: C, tls: Arc<rustls::ClientConfig>, policy: Policy) -> Self {
        Fetcher {
            connect,
            tls,
            policy,
            min_rate: None,
            memory_limit: DEFAULT_MEMORY_LIMIT,
        }
    }

    /// The largest download a consumer should hold in memory whole (a delta's patch); the
    /// consumer passes it to [`get_limited`](Self::get_limited).
    pub fn memory_limit(&self) -> u64 {
        self.memory_limit
    }

    /// Set [`memory_limit`](Self::memory_limit).
    pub fn with_memory_limit(mut self, bytes: u64) -> Self {
        self.memory_limit = bytes;
        self
    }

    /// Downloads fail when slower than `min` (`None`: never).
    pub fn with_min_rate(mut self, min: Option<MinRate>) -> Self {
        self.min_rate = min;
        self
    }

    /// Start downloading `url` from byte `offset` (0: the whole file; more: resume, which needs
    /// a server that honours Range). Nothing is read until [`Download::next`] is called.
    pub fn get(&self, url: &str, offset: u64) -> Result<Download<C>, FetchError> {
        let target = parse_url(url)?;
        Ok(Download {
            fetcher: self.clone(),
            target,
            start: offset,
            pos: offset,
            total: None,
            body: None,
            attempts: 0,
            reconnects: 0,
            done: false,
            last_cut: None,
            limit: None,
            window_waited: Duration::ZERO,
            window_bytes: 0,
        })
    }

    /// Like [`get`](Self::get), for a file that must not be longer than `limit` bytes (it is
    /// held in memory): a longer one ends in [`FetchError::TooLong`], as soon as the server's
    /// length or the bytes received show it. `what` and `hint` complete the message.
    pub fn get_limited(
        &self,
        url: &str,
        offset: u64,
        limit: Limit,
    ) -> Result<Download<C>, FetchError> {
        let mut d = self.get(url, offset)?;
        d.limit = Some(limit);
        Ok(d)
    }

    /// The whole of a small file at `url` (a release manifest, a signature), held in memory. A
    /// file longer than `limit.bytes` ends in [`FetchError::TooLong`] as soon as the server's
    /// length or the bytes received show it: at most one received piece past the limit is ever
    /// held.
    pub async fn get_small(&self, url: &str, limit: Limit) -> Result<Vec<u8>, FetchError> {
        let mut d = self.get_limited(url, 0, limit)?;
        let mut out = Vec::new();
        while let Some(b) = d.next().await? {
            out.extend_from_slice(&b);
        }
        Ok(out)
    }

    /// The size of the file at `url`, asked with a one-byte Range request (a server that ignores
    /// Range answers the whole file's Content-Length). `None` when the server does not say.
    ///
    /// A cut connection, a timeout or a 5xx answer is retried under the policy (found by the
    /// simulation: one lost request made bytes_saved read 0 on a flaky network).
    pub async fn size(&self, url: &str) -> Result<Option<u64>, FetchError> {
        let t = parse_url(url)?;
        let attempts = self.policy.max_attempts.max(1);
        let mut wait = self.policy.backoff;
        for attempt in 1..=attempts {
            if let Some(answer) = self.size_once(&t).await {
                return Ok(answer);
            }
            if attempt < attempts {
                tokio::time::sleep(wait).await;
                wait = wait.saturating_mul(2).min(self.policy.max_backoff);
            }
        }
        // The size is advisory: the download itself reports real failures.
        Ok(None)
    }

    /// One size request: `None` when it should be retried.
    async fn size_once(&self, t: &Target) -> Option<Option<u64>> {
        let r = tokio::time::timeout(self.policy.connect_timeout, async {
            let io = self.open_stream(t).await.map_err(|e| e.to_string())?;
            let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
                .await
                .map_err(|e| e.to_string())?;
            tokio::spawn(async move {
                let _ = conn.await;
            });
            let req = http::Request::get(&t.path)
                .header(http::header::HOST, format!("{}:{}", t.host, t.port))
                .header(http::header::RANGE, "bytes=0-0")
                .body(Empty::<Bytes>::new())
                .map_err(|e| e.to_string())?;
            sender.send_request(req).await.map_err(|e| e.to_string())
        })
        .await;
        let resp = match r {
            Ok(Ok(resp)) => resp,
            _ => return None,
        };
        if resp.status().is_server_error() {
            return None;
        }
        let h = resp.headers();
        let get = |n: http::header::HeaderName| {
            h.get(n).and_then(|v| v.to_str().ok()).map(str::to_string)
        };
        Some(match resp.status().as_u16() {
            206 => get(http::header::CONTENT_RANGE)
                .and_then(|v| parse_content_range(&v))
                .and_then(|(_, total)| total),
            200 => get(http::header::CONTENT_LENGTH).and_then(|v| v.parse().ok()),
            _ => None,
        })
    }

    async fn open_stream(&self, t: &Target) -> Result<Box<dyn IoObj>, String> {
        let tcp = self
            .connect
            .connect(&t.host, t.port)
            .await
            .map_err(|e| format!("connecting to {}:{}: {e}", t.host, t.port))?;
        if !t.https {
            return Ok(Box::new(tcp));
        }
        let name = ServerName::try_from(t.host.clone())
            .map_err(|_| format!("{:?} is not a valid TLS server name", t.host))?;
        let tls = tokio_rustls::TlsConnector::from(self.tls.clone())
            .connect(name, tcp)
            .await
            .map_err(|e| format!("TLS handshake with {}: {e}", t.host))?;
        Ok(Box::new(tls))
    }

    /// One request: returns the response body positioned at `pos` and the file's total length.
    async fn request(&self, t: &Target, pos: u64) -> Result<Answer, Attempt> {
        let io = self.open_stream(t).await.map_err(Attempt::Retry)?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
            .await
            .map_err(|e| Attempt::Retry(format!("HTTP handshake: {e}")))?;
        tokio::spawn(async move {
            // Errors show up on the body; the connection task just ends.
            let _ = conn.await;
        });
        let host = if (t.https && t.port == 443) || (!t.https && t.port == 80) {
            t.host.clone()
        } else {
            format!("{}:{}", t.host, t.port)
        };
        let mut req = http::Request::get(&t.path)
            .header(http::header::HOST, host)
            .header(
                http::header::USER_AGENT,
                concat!("keel-agent/", env!("CARGO_PKG_VERSION")),
            );
        if pos > 0 {
            req = req.header(http::header::RANGE, format!("bytes={pos}-"));
        }
        let req = req.body(Empty::<Bytes>::new()).map_err(|e| {
            Attempt::Fatal(FetchError::BadUrl {
                url: t.shown(),
                reason: e.to_string(),
            })
        })?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| Attempt::Retry(format!("sending request: {e}")))?;
        let status = resp.status().as_u16();
        let len = resp
            .headers()
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        match status {
            200 if pos > 0 => Err(Attempt::Fatal(FetchError::RangeIgnored {
                url: t.shown(),
                offset: pos,
            })),
            200 => Ok(Answer::Body(resp.into_body(), len)),
            206 => {
                let cr = resp
                    .headers()
                    .get(http::header::CONTENT_RANGE)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("")
                    .to_string();
                match parse_content_range(&cr) {
                    Some((first, total)) if first == pos => {
                        Ok(Answer::Body(resp.into_body(), total))
                    }
                    _ => Err(Attempt::Fatal(FetchError::BadContentRange {
                        url: t.shown(),
                        offset: pos,
                        got: cr,
                    })),
                }
            }
            300..=399 => Err(Attempt::Fatal(FetchError::Redirect {
                url: t.shown(),
                status,
                location: resp
                    .headers()
                    .get(http::header::LOCATION)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("")
                    .to_string(),
            })),
            // A resume past the end: complete when the server's length is where we stopped.
            416 if pos > 0 => {
                let cr = resp
                    .headers()
                    .get(http::header::CONTENT_RANGE)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("");
                match unsatisfied_range_len(cr) {
                    Some(len) if len == pos => Ok(Answer::Complete(len)),
                    _ => Err(Attempt::Fatal(FetchError::Status {
                        url: t.shown(),
                        status,
                    })),
                }
            }
            500..=599 => Err(Attempt::Server(status)),
            _ => Err(Attempt::Fatal(FetchError::Status {
                url: t.shown(),
                status,
            })),
        }
    }
}

/// `bytes */LEN` (a 416's Content-Range) -> LEN.
fn unsatisfied_range_len(v: &str) -> Option<u64> {
    v.trim().strip_prefix("bytes */")?.trim().parse().ok()
}

/// `bytes FIRST-LAST/TOTAL` -> (FIRST, TOTAL if known).
fn parse_content_range(v: &str) -> Option<(u64, Option<u64>)> {
    let rest = v.trim().strip_prefix("bytes ")?;
    let (range, total) = rest.split_once('/')?;
    let (first, _last) = range.split_once('-')?;
    let total = if total == "*" {
        None
    } else {
        Some(total.parse().ok()?)
    };
    Some((first.parse().ok()?, total))
}

/// A length limit for [`Fetcher::get_limited`], with what the message calls the file and how
/// the limit is raised.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limit {
    pub bytes: u64,
    pub what: &'static str,
    pub hint: &'static str,
}

trait IoObj: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> IoObj for T {}

/// A download in progress: call [`Download::next`] for the bytes, in order. Cut connections
/// are resumed with a Range request from the next byte not yet handed out.
pub struct Download<C: Connect = TcpConnect> {
    fetcher: Fetcher<C>,
    target: Target,
    start: u64,
    pos: u64,
    total: Option<u64>,
    body: Option<Body>,
    attempts: u32,
    reconnects: u32,
    done: bool,
    last_cut: Option<String>,
    limit: Option<Limit>,
    /// The minimum-rate window: time spent waiting for the server, and the bytes it brought.
    window_waited: Duration,
    window_bytes: u64,
}

impl<C: Connect> std::fmt::Debug for Download<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Download")
            .field("url", &self.target.shown())
            .field("pos", &self.pos)
            .field("total", &self.total)
            .finish_non_exhaustive()
    }
}

impl<C: Connect> Download<C> {
    /// The file's length, once the server said it.
    pub fn total(&self) -> Option<u64> {
        self.total
    }
    /// The offset of the next byte [`next`](Self::next) returns.
    pub fn position(&self) -> u64 {
        self.pos
    }
    /// How many times a cut connection was resumed.
    pub fn reconnects(&self) -> u32 {
        self.reconnects
    }

    fn backoff(&self) -> Duration {
        let p = &self.fetcher.policy;
        let exp = self.attempts.saturating_sub(1).min(16);
        p.backoff.saturating_mul(1 << exp).min(p.max_backoff)
    }

    async fn connect(&mut self) -> Result<(), FetchError> {
        let mut last = self.last_cut.take().unwrap_or_default();
        let mut last_status = None;
        loop {
            if self.attempts >= self.fetcher.policy.max_attempts {
                return Err(match last_status {
                    Some(status) => FetchError::ServerError {
                        url: self.target.shown(),
                        status,
                        attempts: self.attempts,
                    },
                    None => FetchError::GaveUp {
                        url: self.target.shown(),
                        attempts: self.attempts,
                        last,
                    },
                });
            }
            if self.attempts > 0 {
                tokio::time::sleep(self.backoff()).await;
            }
            self.attempts += 1;
            let r = tokio::time::timeout(
                self.fetcher.policy.connect_timeout,
                self.fetcher.request(&self.target, self.pos),
            )
            .await;
            match r {
                Ok(Ok(Answer::Complete(len))) => {
                    if let Some(before) = self.total.filter(|&t| t != len) {
                        return Err(FetchError::SizeChanged {
                            url: self.target.shown(),
                            before,
                            after: len,
                        });
                    }
                    self.total = Some(len);
                    self.done = true;
                    self.body = None;
                    return Ok(());
                }
                Ok(Ok(Answer::Body(body, total))) => {
                    let total = match (total, self.pos) {
                        // A 200's Content-Length is the whole file.
                        (Some(t), 0) => Some(t),
                        (t, _) => t,
                    };
                    if let (Some(before), Some(after)) = (self.total, total) {
                        if before != after {
                            return Err(FetchError::SizeChanged {
                                url: self.target.shown(),
                                before,
                                after,
                            });
                        }
                    }
                    self.total = total.or(self.total);
                    self.body = Some(body);
                    return Ok(());
                }
                Ok(Err(Attempt::Fatal(e))) => return Err(e),
                Ok(Err(Attempt::Server(s))) => {
                    last_status = Some(s);
                    last = format!("HTTP {s}");
                }
                Ok(Err(Attempt::Retry(e))) => {
                    last_status = None;
                    last = e;
                }
                Err(_) => {
                    last_status = None;
                    last = format!(
                        "no answer within {:?} (connect timeout)",
                        self.fetcher.policy.connect_timeout
                    );
                }
            }
        }
    }

    /// The next bytes of the file, or `None` at its end. Bounded by the retry policy (a
    /// connection that keeps failing ends in an error, never a hang), the fetcher's minimum
    /// rate and the download's length limit.
    pub async fn next(&mut self) -> Result<Option<Bytes>, FetchError> {
        let r = match self.fetcher.min_rate {
            None => self.next_unpaced().await,
            Some(min) => self.next_paced(min).await,
        };
        if let (Some(l), Ok(_)) = (self.limit, &r) {
            if self.pos > l.bytes || self.total.is_some_and(|t| t > l.bytes) {
                self.body = None;
                self.done = true;
                return Err(FetchError::TooLong {
                    url: self.target.shown(),
                    limit: l.bytes,
                    what: l.what,
                    hint: l.hint,
                });
            }
        }
        r
    }

    /// [`next_unpaced`](Self::next_unpaced) under the minimum rate: the time waited counts
    /// toward a window of `min.window`; at its end, the bytes of the window must make the rate.
    async fn next_paced(&mut self, min: MinRate) -> Result<Option<Bytes>, FetchError> {
        loop {
            let left = min.window.saturating_sub(self.window_waited);
            let t0 = tokio::time::Instant::now();
            let r = tokio::time::timeout(left, self.next_unpaced()).await;
            self.window_waited += t0.elapsed();
            match &r {
                Ok(Ok(Some(b))) => self.window_bytes += b.len() as u64,
                // the end, or an error of its own
                Ok(_) => return r.unwrap_or(Ok(None)),
                Err(_) => {}
            }
            if self.window_waited >= min.window {
                let need = min
                    .bytes_per_second
                    .saturating_mul(min.window.as_secs().max(1));
                if self.window_bytes < need {
                    self.body = None;
                    return Err(FetchError::TooSlow {
                        url: self.target.shown(),
                        got: self.window_bytes,
                        secs: self.window_waited.as_secs(),
                        rate: min.bytes_per_second,
                    });
                }
                self.window_waited = Duration::ZERO;
                self.window_bytes = 0;
            }
            if let Ok(r) = r {
                return r;
            }
        }
    }

    async fn next_unpaced(&mut self) -> Result<Option<Bytes>, FetchError> {
        loop {
            if self.done {
                return Ok(None);
            }
            if self.body.is_none() {
                self.connect().await?;
                if self.done {
                    return Ok(None);
                }
            }
            let Some(body) = self.body.as_mut() else {
                continue;
            };
            let stall = self.fetcher.policy.stall_timeout;
            let cut = match tokio::time::timeout(stall, body.frame()).await {
                Ok(Some(Ok(frame))) => match frame.into_data() {
                    Ok(data) if data.is_empty() => continue,
                    Ok(data) => {
                        self.pos += data.len() as u64;
                        // Progress resets the retry budget: only consecutive failures count.
                        self.attempts = 0;
                        return Ok(Some(data));
                    }
                    Err(_) => continue, // trailers
                },
                Ok(None) => {
                    // The body ended: complete only if the whole file arrived.
                    match self.total {
                        Some(t) if self.pos < t => {
                            format!("body ended at byte {} of {t}", self.pos)
                        }
                        Some(t) if self.pos > t => {
                            return Err(FetchError::SizeChanged {
                                url: self.target.shown(),
                                before: t,
                                after: self.pos,
                            })
                        }
                        _ => {
                            self.done = true;
                            self.body = None;
                            return Ok(None);
                        }
                    }
                }
                Ok(Some(Err(e))) => format!("connection cut at byte {}: {e}", self.pos),
                Err(_) => format!("no data for {stall:?} at byte {} (stalled)", self.pos),
            };
            // Resume from `pos` on the next turn; connect() counts the attempt and backs off,
            // so a server that keeps cutting before sending anything ends in GaveUp.
            self.body = None;
            self.reconnects += 1;
            self.last_cut = Some(cut);
        }
    }

    /// Where the download started.
    pub fn start(&self) -> u64 {
        self.start
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let t = parse_url("http://127.0.0.1:8080/img.zst?x=1").expect("ok");
        assert_eq!(
            (t.host.as_str(), t.port, t.path.as_str()),
            ("127.0.0.1", 8080, "/img.zst?x=1")
        );
        assert!(!t.https);
        let t = parse_url("https://updates.example/a").expect("ok");
        assert_eq!((t.port, t.https), (443, true));
        assert_eq!(parse_url("http://h").expect("ok").path, "/");
        for bad in ["", "not a url", "/just/a/path", "http://", "http:///x"] {
            assert!(
                matches!(parse_url(bad), Err(FetchError::BadUrl { .. })),
                "{bad:?}"
            );
        }
        for (u, s) in [("ftp://h/x", "ftp"), ("file:///etc/passwd", "file")] {
            match parse_url(u) {
                Err(FetchError::UnsupportedScheme { scheme, .. }) => assert_eq!(scheme, s),
                other => panic!("{u}: {other:?}"),
            }
        }
    }

    /// Guards URL redaction (issue 11, item 5).
    #[test]
    fn redacted_urls_keep_no_credentials() {
        for (url, shown) in [
            (
                "https://u:pw@bucket.s3.example:8443/img.zst?X-Amz-Signature=abc#f",
                "https://bucket.s3.example:8443/img.zst?<redacted>",
            ),
            ("http://h/a/b", "http://h/a/b"),
            ("http://tok@h?x=1", "http://h?<redacted>"),
            ("not a url?secret", "not a url?<redacted>"),
        ] {
            assert_eq!(redact_url(url), shown, "{url}");
        }
        match parse_url("gopher://u:pw@h/x?sig=abc") {
            Err(e) => assert!(!e.to_string().contains("pw") && !e.to_string().contains("sig")),
            Ok(t) => panic!("{t:?}"),
        }
    }

    #[test]
    fn content_range() {
        assert_eq!(
            parse_content_range("bytes 100-199/200"),
            Some((100, Some(200)))
        );
        assert_eq!(parse_content_range("bytes 5-9/*"), Some((5, None)));
        assert_eq!(parse_content_range("items 1-2/3"), None);
        assert_eq!(parse_content_range(""), None);
        assert_eq!(unsatisfied_range_len("bytes */4096"), Some(4096));
        assert_eq!(unsatisfied_range_len("bytes 0-1/2"), None);
    }
}
