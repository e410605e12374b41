//! `kubernetes.require_ready`: whether the API server has this node Ready, asked in a thread of
//! stage 2 (PID 1's loop never waits on the network) with kubelet's own client certificate,
//! which the Node authorizer lets read its own Node object.

use crate::config::kubernetes::KubernetesConfig;
use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// kubelet's client certificate and key after TLS bootstrapping (one PEM file).
pub const KUBELET_CLIENT_PEM: &str = "/var/lib/kubelet/pki/kubelet-client-current.pem";
/// How often the API server is asked.
const EVERY: Duration = Duration::from_secs(3);
/// The largest answer read (a Node object is a few KiB to a few tens of KiB).
const MAX_ANSWER: u64 = 1 << 20;

/// Start asking; the flag is true while the last answer said Ready.
pub fn spawn(k: &KubernetesConfig) -> Arc<AtomicBool> {
    let ready = Arc::new(AtomicBool::new(false));
    let flag = ready.clone();
    let api = k.api_server.clone();
    let name = k.node_name.clone();
    let spawned = std::thread::Builder::new()
        .name("kube-ready".into())
        .spawn(move || {
            let mut said = String::new();
            loop {
                let node = name.clone().unwrap_or_else(|| {
                    nix::unistd::gethostname()
                        .map(|h| h.to_string_lossy().into_owned())
                        .unwrap_or_default()
                });
                let r = ask(&api, &node);
                flag.store(r == Ok(true), Ordering::Relaxed);
                let now = match &r {
                    Ok(true) => format!("kubernetes: node {node} is Ready"),
                    Ok(false) => format!("kubernetes: node {node} is not Ready yet"),
                    Err(e) => format!("kubernetes: cannot ask whether node {node} is Ready: {e}"),
                };
                if now != said {
                    super::log::log(&now);
                    said = now;
                }
                std::thread::sleep(EVERY);
            }
        });
    if let Err(e) = spawned {
        super::log::log(format!(
            "kubernetes: cannot start the Ready check: {e}; the boot cannot be judged healthy"
        ));
    }
    ready
}

/// One question to the API server: GET /api/v1/nodes/NODE with kubelet's client certificate.
fn ask(api: &str, node: &str) -> Result<bool, String> {
    let uri: http::Uri = api.parse().map_err(|e| format!("{api:?}: {e}"))?;
    let host = uri
        .host()
        .ok_or("the API server URL has no host")?
        .to_string();
    let port = uri.port_u16().unwrap_or(443);
    let pem = Path::new(KUBELET_CLIENT_PEM);
    if !pem.exists() {
        return Err(format!(
            "{KUBELET_CLIENT_PEM} is not there yet (kubelet has not joined)"
        ));
    }
    let chain = crate::pki::load_certs(pem).map_err(|e| e.to_string())?;
    let key = crate::pki::load_key(pem).map_err(|e| e.to_string())?;
    let mut roots = rustls::RootCertStore::empty();
    for c in crate::pki::load_certs(Path::new(crate::kube::CA_CERT)).map_err(|e| e.to_string())? {
        roots.add(c).map_err(|e| format!("cluster CA: {e}"))?;
    }
    let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| e.to_string())?
    .with_root_certificates(roots)
    .with_client_auth_cert(chain, key)
    .map_err(|e| format!("kubelet's client certificate: {e}"))?;
    let server_name = rustls::pki_types::ServerName::try_from(
        host.trim_start_matches('[')
            .trim_end_matches(']')
            .to_string(),
    )
    .map_err(|e| format!("{host:?}: {e}"))?;
    let conn =
        rustls::ClientConnection::new(Arc::new(cfg), server_name).map_err(|e| e.to_string())?;
    let addr = (host.as_str(), port)
        .to_socket_addrs()
        .map_err(|e| format!("{host}:{port}: {e}"))?
        .next()
        .ok_or_else(|| format!("{host}:{port}: no address"))?;
    let tcp = TcpStream::connect_timeout(&addr, Duration::from_secs(2))
        .map_err(|e| format!("{addr}: {e}"))?;
    let _ = tcp.set_read_timeout(Some(Duration::from_secs(5)));
    let _ = tcp.set_write_timeout(Some(Duration::from_secs(5)));
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    // HTTP/1.0: the answer is not chunked and ends when the connection closes
    write!(
        tls,
        "GET /api/v1/nodes/{node} HTTP/1.0\r\nHost: {host}:{port}\r\nAccept: application/json\r\n\r\n"
    )
    .map_err(|e| format!("{addr}: {e}"))?;
    let mut answer = Vec::new();
    let read = (&mut tls).take(MAX_ANSWER).read_to_end(&mut answer);
    // a server that closes without close_notify still gave its whole answer to HTTP/1.0
    if let Err(e) = read {
        if answer.is_empty() {
            return Err(format!("{addr}: {e}"));
        }
    }
    crate::kube::node_ready(&answer)
}
