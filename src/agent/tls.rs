//! Mutual TLS for the API, both ends: the agent's listener (every connection must present a
//! client certificate signed by the node's CA, checked by rustls' WebPKI verifier, including
//! expiry) and the client connector osctl and the tests use.
//!
//! This module owns TLS configuration and the handshake. It never serves or sends plaintext and
//! never decides what a role may do; it only reads the role from a certificate rustls verified.

use crate::fetch::{Connect, Io, TcpConnect};
use crate::pki::{self, PkiError, Role};
use hyper_util::rt::TokioIo;
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::ServerName;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector};

/// How long a peer may take to complete the handshake before it is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections held at once, in the handshake or after it. Beyond this the listener stops
/// accepting (new peers wait in the kernel's backlog) until one closes, so a flood of
/// connections costs the agent no more than this many sockets and tasks.
pub const MAX_CONNECTIONS: usize = 64;

/// Building a TLS configuration failed.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error(transparent)]
    Pki(#[from] PkiError),
    #[error("TLS configuration with {what}: {source}")]
    Rustls {
        what: String,
        #[source]
        source: rustls::Error,
    },
    #[error("the client certificate verifier could not be built from the CA: {0}")]
    Verifier(String),
    #[error("{0:?} is not a valid TLS server name (a DNS name or an IP address)")]
    ServerName(String),
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn roots(ca: &Path) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for c in pki::load_certs(ca)? {
        roots.add(c).map_err(|e| TlsError::Rustls {
            what: format!("CA {}", ca.display()),
            source: e,
        })?;
    }
    Ok(roots)
}

/// The agent's TLS configuration from a PKI directory (ca.crt, agent.crt, agent.key): client
/// certificates are mandatory and must chain to ca.crt.
pub fn server_config(pki_dir: &Path) -> Result<Arc<ServerConfig>, TlsError> {
    let roots = roots(&pki_dir.join(pki::CA_CERT))?;
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
        .build()
        .map_err(|e| TlsError::Verifier(e.to_string()))?;
    let chain = pki::load_certs(&pki_dir.join(pki::AGENT_CERT))?;
    let key = pki::load_key(&pki_dir.join(pki::AGENT_KEY))?;
    let mut cfg = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsError::Rustls {
            what: "TLS 1.3".into(),
            source: e,
        })?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(|e| TlsError::Rustls {
            what: format!("agent certificate in {}", pki_dir.display()),
            source: e,
        })?;
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(cfg))
}

/// The client side: trust `ca`, present `cert`/`key`.
pub fn client_config(ca: &Path, cert: &Path, key: &Path) -> Result<Arc<ClientConfig>, TlsError> {
    let roots = roots(ca)?;
    let chain = pki::load_certs(cert)?;
    let key = pki::load_key(key)?;
    let mut cfg = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsError::Rustls {
            what: "TLS 1.3".into(),
            source: e,
        })?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .map_err(|e| TlsError::Rustls {
            what: format!("client certificate {}", cert.display()),
            source: e,
        })?;
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(cfg))
}

/// Who is on the other end of a connection, as its verified certificate says. Handlers find it
/// in the request's extensions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    pub addr: Option<SocketAddr>,
    pub role: Option<Role>,
    /// The certificate's subject, for logs.
    pub subject: String,
}

/// A server connection after a successful mutual-TLS handshake, over any byte stream (TCP from
/// the operating system, or a simulated network's).
#[derive(Debug)]
pub struct PeerStream<S = TcpStream> {
    inner: tokio_rustls::server::TlsStream<S>,
    peer: Peer,
    /// This connection's place among [`MAX_CONNECTIONS`], given back when it closes.
    _slot: tokio::sync::OwnedSemaphorePermit,
}

impl<S: Io> tonic::transport::server::Connected for PeerStream<S> {
    type ConnectInfo = Peer;
    fn connect_info(&self) -> Peer {
        self.peer.clone()
    }
}

impl<S: Io> AsyncRead for PeerStream<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: Io> AsyncWrite for PeerStream<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

fn subject_of(der: &[u8]) -> String {
    x509_parser::parse_x509_certificate(der)
        .map(|(_, c)| c.subject().to_string())
        .unwrap_or_else(|_| "<unparsable>".into())
}

/// Where the agent accepts connections: a TCP listener of the operating system, or a simulated
/// network's (the simulation in sim/ implements it for turmoil's).
pub trait Listener: Send + 'static {
    type Stream: Io;
    fn accept(&self) -> impl Future<Output = io::Result<(Self::Stream, SocketAddr)>> + Send;
}

impl Listener for TcpListener {
    type Stream = TcpStream;
    async fn accept(&self) -> io::Result<(TcpStream, SocketAddr)> {
        let (tcp, addr) = TcpListener::accept(self).await?;
        let _ = tcp.set_nodelay(true);
        Ok((tcp, addr))
    }
}

/// Accept connections on `listener` and hand out the ones that complete the mutual-TLS
/// handshake. Failed handshakes (no certificate, another CA, expired, not TLS) are logged to
/// stderr and dropped; they never reach a handler.
pub fn incoming<L: Listener>(
    listener: L,
    cfg: Arc<ServerConfig>,
) -> tokio_stream::wrappers::ReceiverStream<Result<PeerStream<L::Stream>, io::Error>> {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    let acceptor = TlsAcceptor::from(cfg);
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    tokio::spawn(async move {
        loop {
            let Ok(slot) = slots.clone().acquire_owned().await else {
                return;
            };
            let (tcp, addr) = match listener.accept().await {
                Ok(x) => x,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    eprintln!("keel-agent: accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let acceptor = acceptor.clone();
            let tx = tx.clone();
            tokio::spawn(async move {
                let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await
                {
                    Ok(Ok(t)) => t,
                    Ok(Err(e)) => {
                        eprintln!("keel-agent: TLS handshake with {addr} refused: {e}");
                        return;
                    }
                    Err(_) => {
                        eprintln!("keel-agent: TLS handshake with {addr} timed out");
                        return;
                    }
                };
                let cert = tls
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|c| c.first().cloned());
                let (role, subject) = match &cert {
                    Some(c) => (pki::role_of(c), subject_of(c.as_ref())),
                    None => (None, String::new()),
                };
                let peer = Peer {
                    addr: Some(addr),
                    role,
                    subject,
                };
                let _ = tx
                    .send(Ok(PeerStream {
                        inner: tls,
                        peer,
                        _slot: slot,
                    }))
                    .await;
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

/// Connects osctl (or a test) to an agent over mutual TLS, for tonic's `connect_with_connector`.
/// The byte stream under TLS comes from a [`Connect`]: the operating system's TCP by default, a
/// simulated network's in sim/.
#[derive(Clone)]
pub struct Connector<C: Connect = TcpConnect> {
    connect: C,
    addr: String,
    name: ServerName<'static>,
    tls: TlsConnector,
}

impl<C: Connect> std::fmt::Debug for Connector<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connector")
            .field("addr", &self.addr)
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl Connector {
    /// `addr` is host:port; `server_name` is what the agent's certificate must name.
    pub fn new(
        addr: &str,
        server_name: &str,
        cfg: Arc<ClientConfig>,
    ) -> Result<Connector, TlsError> {
        Connector::with_connect(TcpConnect, addr, server_name, cfg)
    }
}

impl<C: Connect> Connector<C> {
    /// Like [`Connector::new`], with the byte streams opened by `connect`.
    pub fn with_connect(
        connect: C,
        addr: &str,
        server_name: &str,
        cfg: Arc<ClientConfig>,
    ) -> Result<Connector<C>, TlsError> {
        let name = ServerName::try_from(server_name.to_string())
            .map_err(|_| TlsError::ServerName(server_name.to_string()))?;
        Ok(Connector {
            connect,
            addr: addr.to_string(),
            name,
            tls: TlsConnector::from(cfg),
        })
    }

    /// The address this connector reaches.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    async fn open(&self) -> io::Result<C::Stream> {
        let (host, port) = split_host_port(&self.addr)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "invalid socket address"))?;
        self.connect.connect(&host, port).await
    }
}

/// `host:port` or `[v6]:port` -> (host, port).
fn split_host_port(addr: &str) -> Option<(String, u16)> {
    let (host, port) = match addr.strip_prefix('[') {
        Some(rest) => {
            let (h, p) = rest.split_once(']')?;
            (h, p.strip_prefix(':')?)
        }
        None => addr.rsplit_once(':')?,
    };
    Some((host.to_string(), port.parse().ok()?))
}

/// Why connecting failed, kept apart so osctl can tell an unreachable agent from a TLS refusal.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("cannot reach {addr}: {source}")]
    Unreachable {
        addr: String,
        #[source]
        source: io::Error,
    },
    #[error("TLS handshake with {addr} failed: {source}")]
    Tls {
        addr: String,
        #[source]
        source: io::Error,
    },
}

impl<C: Connect> tower::Service<http::Uri> for Connector<C> {
    type Response = TokioIo<tokio_rustls::client::TlsStream<C::Stream>>;
    type Error = ConnectError;
    type Future =
        Pin<Box<dyn std::future::Future<Output = Result<Self::Response, ConnectError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: http::Uri) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let tcp = this
                .open()
                .await
                .map_err(|source| ConnectError::Unreachable {
                    addr: this.addr.clone(),
                    source,
                })?;
            let tls = this
                .tls
                .connect(this.name.clone(), tcp)
                .await
                .map_err(|source| ConnectError::Tls {
                    addr: this.addr.clone(),
                    source,
                })?;
            Ok(TokioIo::new(tls))
        })
    }
}

impl<C: Connect> Connector<C> {
    /// Connect, complete the handshake and read the server's first bytes. A TLS 1.3 client
    /// finishes its side before the server has judged its certificate, so a refusal (expired,
    /// unknown CA, none given) only shows on the first read: this surfaces it as
    /// [`ConnectError::Tls`] with the server's alert, for a clear diagnosis after a failed call.
    pub async fn probe(&self) -> Result<(), ConnectError> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tower::Service::call(&mut self.clone(), http::Uri::from_static("/"))
            .await?
            .into_inner();
        let tls_err = |source: io::Error| ConnectError::Tls {
            addr: self.addr.clone(),
            source,
        };
        // The HTTP/2 preface and an empty SETTINGS frame: the server answers with its SETTINGS.
        s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0")
            .await
            .map_err(tls_err)?;
        let mut buf = [0u8; 9];
        match tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await {
            Ok(Ok(0)) => Err(tls_err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "the agent closed the connection right after the handshake",
            ))),
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(tls_err(e)),
            Err(_) => Err(tls_err(io::Error::new(
                io::ErrorKind::TimedOut,
                "no answer within 5s after the handshake",
            ))),
        }
    }
}

/// A gRPC channel to the agent at `addr` over mutual TLS. Connects lazily: errors surface on the
/// first call, with the [`ConnectError`] in the error chain.
pub fn channel(
    addr: &str,
    server_name: &str,
    cfg: Arc<ClientConfig>,
) -> Result<tonic::transport::Channel, TlsError> {
    Ok(channel_with(Connector::new(addr, server_name, cfg)?))
}

/// A gRPC channel through `connector` (any [`Connect`]); lazy like [`channel`].
pub fn channel_with<C: Connect>(connector: Connector<C>) -> tonic::transport::Channel {
    // The URI is only a label for tonic: the connector decides where to connect.
    let ep = tonic::transport::Endpoint::from_static("http://keel-agent")
        .connect_timeout(Duration::from_secs(10));
    ep.connect_with_connector_lazy(connector)
}
