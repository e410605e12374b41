//! Shared set-up for the agent tests: a PKI in a temporary directory, a real disk image file,
//! and an agent serving mutual TLS on a loopback port.
#![allow(dead_code, clippy::unwrap_used)]

use keelos::agent::control::Unavailable;
use keelos::agent::proto::keel_client::KeelClient;
use keelos::agent::service::{serve, Agent, AgentConfig};
use keelos::agent::tls;
use keelos::block::FileDevice;
use keelos::disk::{self, LayoutSpec, MIB};
use keelos::pki::{self, Ca, Role, Validity};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub struct Node {
    pub dir: tempfile::TempDir,
    pub pki: PathBuf,
    pub disk: PathBuf,
    pub addr: SocketAddr,
    pub agent: Agent,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

/// A disk image file with the KeelOS layout (both slots empty).
pub fn make_disk(path: &Path, root_size: u64) {
    let f = std::fs::File::create(path).unwrap();
    f.set_len(MIB * 4 + 2 * root_size + 4 * MIB).unwrap();
    drop(f);
    let mut dev = FileDevice::open(path, true).unwrap();
    disk::create(
        &mut dev,
        LayoutSpec {
            esp_size: MIB,
            root_size,
            state_size: Some(2 * MIB),
        },
    )
    .unwrap();
}

/// gen pki, a disk file, and an agent on 127.0.0.1:(free port).
pub async fn start_node() -> Node {
    start_node_with(|_| {}).await
}

/// Like [`start_node`], with `prepare` run on the new disk file before the agent starts.
pub async fn start_node_with(prepare: impl FnOnce(&Path)) -> Node {
    start_node_full(prepare, Arc::new(Unavailable)).await
}

/// Like [`start_node`], with the agent reaching keel-init through `control`.
pub async fn start_node_control(control: Arc<dyn keelos::agent::control::NodeControl>) -> Node {
    start_node_full(|_| {}, control).await
}

async fn start_node_full(
    prepare: impl FnOnce(&Path),
    control: Arc<dyn keelos::agent::control::NodeControl>,
) -> Node {
    let dir = tempfile::tempdir().unwrap();
    let pki_dir = dir.path().join("pki");
    pki::generate(&pki_dir, &["localhost".into(), "127.0.0.1".into()], None).unwrap();
    let disk = dir.path().join("disk.img");
    make_disk(&disk, 4 * MIB);
    prepare(&disk);
    let state = dir.path().join("state");
    std::fs::create_dir_all(&state).unwrap();
    let (agent, addr, stop) = serve_agent(node_config(&disk, &state), control, &pki_dir).await;
    Node {
        dir,
        pki: pki_dir,
        disk,
        addr,
        agent,
        stop: Some(stop),
    }
}

/// The configuration a test node's agent starts with: the host-side agent on a disk file.
pub fn node_config(disk: &Path, state: &Path) -> AgentConfig {
    AgentConfig {
        disk: disk.to_path_buf(),
        state_dir: state.to_path_buf(),
        booted: None,
        boot_record: None,
        fetch_ca: None,
        image_root: None,
    }
}

/// Start an agent with `cfg` serving mutual TLS on a free loopback port; it stops when the
/// returned sender is used or dropped.
async fn serve_agent(
    cfg: AgentConfig,
    control: Arc<dyn keelos::agent::control::NodeControl>,
    pki_dir: &Path,
) -> (Agent, SocketAddr, tokio::sync::oneshot::Sender<()>) {
    let agent = Agent::new(cfg, control).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let cfg = tls::server_config(pki_dir).unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let a = agent.clone();
    tokio::spawn(async move {
        serve(a, listener, cfg, async {
            let _ = rx.await;
        })
        .await
        .unwrap();
    });
    (agent, addr, tx)
}

impl Node {
    /// Stop this node's agent and start a new one on the same disk and STATE (as keel-init
    /// restarts a crashed agent), with its configuration changed by `change`.
    pub async fn restart_agent(&mut self, change: impl FnOnce(&mut AgentConfig)) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        let mut cfg = node_config(&self.disk, &self.dir.path().join("state"));
        change(&mut cfg);
        let (agent, addr, stop) = serve_agent(cfg, Arc::new(Unavailable), &self.pki).await;
        self.agent = agent;
        self.addr = addr;
        self.stop = Some(stop);
    }

    /// A client with `role`'s certificate from `gen pki`.
    pub fn client(&self, role: Role) -> KeelClient<tonic::transport::Channel> {
        let p = &self.pki;
        self.client_with(
            &p.join(format!("{}.crt", role.name())),
            &p.join(format!("{}.key", role.name())),
        )
    }

    pub fn client_with(&self, cert: &Path, key: &Path) -> KeelClient<tonic::transport::Channel> {
        let cfg = tls::client_config(&self.pki.join(pki::CA_CERT), cert, key).unwrap();
        KeelClient::new(tls::channel(&self.addr.to_string(), "localhost", cfg).unwrap())
    }

    /// Issue a client certificate from this node's CA with the given validity; returns the
    /// (cert, key) paths.
    pub fn issue(&self, name: &str, org: &str, v: Validity) -> (PathBuf, PathBuf) {
        let ca = Ca::load(&self.pki).unwrap();
        let i = ca.issue_client(name, org, v).unwrap();
        let (c, k) = (
            self.dir.path().join(format!("{name}.crt")),
            self.dir.path().join(format!("{name}.key")),
        );
        pki::write_file(&c, &i.cert_pem, false).unwrap();
        pki::write_file(&k, &i.key_pem, true).unwrap();
        (c, k)
    }

    /// Write an osctl config for `role` pointing at this agent.
    pub fn osctl_config(&self, cert: &Path, key: &Path) -> PathBuf {
        let cfg = pki::ClientConfig {
            endpoint: self.addr.to_string(),
            ca: self.pki.join(pki::CA_CERT),
            cert: cert.to_path_buf(),
            key: key.to_path_buf(),
            server_name: Some("localhost".into()),
        };
        let p = self.dir.path().join(format!(
            "osctl-{}.json",
            cert.file_stem().unwrap().to_string_lossy()
        ));
        std::fs::write(&p, serde_json::to_string(&cfg).unwrap()).unwrap();
        p
    }

    pub fn role_paths(&self, role: Role) -> (PathBuf, PathBuf) {
        (
            self.pki.join(format!("{}.crt", role.name())),
            self.pki.join(format!("{}.key", role.name())),
        )
    }

    pub fn disk_bytes(&self) -> Vec<u8> {
        std::fs::read(&self.disk).unwrap()
    }
}

/// The error chain of a failed call, as text.
pub fn chain(st: &tonic::Status) -> String {
    let mut s = format!("{:?} {}", st.code(), st.message());
    let mut cur = std::error::Error::source(st);
    while let Some(c) = cur {
        s.push_str(" / ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

// ---------------------------------------------------------------------------------------------
// A real HTTP/1.1 server on 127.0.0.1 (hyper), with faults on demand.

use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt, Full, StreamBody};
use hyper::body::Frame;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Mutex;

#[derive(Default)]
pub struct ServerState {
    pub files: Mutex<HashMap<String, Vec<u8>>>,
    /// Cut this many responses after `cut_after` bytes of body.
    pub cuts: AtomicU32,
    pub cut_after: AtomicU32,
    /// Answer Range requests with the whole file (200).
    pub ignore_range: AtomicBool,
    /// Paths served in 16 KiB pieces with a pause between them (for concurrent-install tests).
    pub slow: Mutex<Vec<String>>,
    /// Every request's Range header ("" when none).
    pub ranges: Mutex<Vec<String>>,
}

pub struct HttpServer {
    pub addr: SocketAddr,
    pub state: Arc<ServerState>,
}

impl HttpServer {
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }
    pub fn put(&self, path: &str, data: Vec<u8>) {
        self.state.files.lock().unwrap().insert(path.into(), data);
    }
}

type Body = BoxBody<Bytes, std::io::Error>;

fn full(status: u16, b: &'static str) -> hyper::Response<Body> {
    hyper::Response::builder()
        .status(status)
        .body(Full::new(Bytes::from(b)).map_err(|e| match e {}).boxed())
        .unwrap()
}

async fn handle(
    st: Arc<ServerState>,
    req: hyper::Request<hyper::body::Incoming>,
) -> hyper::Response<Body> {
    let path = req.uri().path().to_string();
    let range = req
        .headers()
        .get("range")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    st.ranges.lock().unwrap().push(range.clone());
    if path == "/404" {
        return full(404, "not found");
    }
    if path == "/500" {
        return full(500, "broken");
    }
    let Some(data) = st.files.lock().unwrap().get(&path).cloned() else {
        return full(404, "not found");
    };
    let start: u64 = range
        .strip_prefix("bytes=")
        .and_then(|r| r.split('-').next())
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let end_incl: Option<u64> = range
        .strip_prefix("bytes=")
        .and_then(|r| r.split('-').nth(1))
        .and_then(|s| s.parse().ok());
    let partial = !range.is_empty() && !st.ignore_range.load(Ordering::SeqCst);
    let total = data.len() as u64;
    let (from, to) = if partial {
        (
            start.min(total),
            end_incl.map_or(total, |e| (e + 1).min(total)),
        )
    } else {
        (0, total)
    };
    let body_bytes = data[from as usize..to as usize].to_vec();
    let mut resp = hyper::Response::builder()
        .header("content-length", body_bytes.len().to_string())
        .header("accept-ranges", "bytes");
    if partial {
        resp = resp.status(206).header(
            "content-range",
            format!("bytes {from}-{}/{total}", to.saturating_sub(1)),
        );
    }
    // Cut this response mid-body?
    let cut = to - from > 1
        && st
            .cuts
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |c| c.checked_sub(1))
            .is_ok();
    let slow = st.slow.lock().unwrap().contains(&path);
    let cut_after = (st.cut_after.load(Ordering::SeqCst) as usize)
        .min(body_bytes.len() / 2)
        .max(1);
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, std::io::Error>>(4);
    tokio::spawn(async move {
        let piece = if slow { 16 * 1024 } else { 64 * 1024 };
        let limit = if cut { cut_after } else { body_bytes.len() };
        let mut sent = 0;
        while sent < limit {
            let n = piece.min(limit - sent);
            if tx
                .send(Ok(Frame::data(Bytes::copy_from_slice(
                    &body_bytes[sent..sent + n],
                ))))
                .await
                .is_err()
            {
                return;
            }
            sent += n;
            if slow {
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
        }
        if cut {
            // Let the bytes reach the client before the connection is cut.
            tokio::time::sleep(std::time::Duration::from_millis(30)).await;
            let _ = tx
                .send(Err(std::io::Error::new(
                    std::io::ErrorKind::ConnectionReset,
                    "cut by test",
                )))
                .await;
        }
    });
    let stream = tokio_stream::wrappers::ReceiverStream::new(rx);
    resp.body(BodyExt::boxed(StreamBody::new(stream))).unwrap()
}

/// Start the server on a free loopback port.
pub async fn http_server() -> HttpServer {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let state = Arc::new(ServerState::default());
    let st = state.clone();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let st = st.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req| {
                    let st = st.clone();
                    async move { Ok::<_, std::convert::Infallible>(handle(st, req).await) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(tcp), svc)
                    .await;
            });
        }
    });
    HttpServer { addr, state }
}

/// Deterministic incompressible bytes.
pub fn image(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| {
            let mut x = (i as u64 / 8) ^ (u64::from(seed) << 40);
            x = x.wrapping_mul(0x9E37_79B9_7F4A_7C15);
            x ^= x >> 29;
            x = x.wrapping_mul(0xBF58_476D_1CE4_E5B9);
            (x >> (8 * (i % 8))) as u8
        })
        .collect()
}

pub fn sha(b: &[u8]) -> String {
    use sha2::Digest;
    keelos::update::record::hex(&sha2::Sha256::digest(b))
}

/// Install `img` offline into slot A of the disk file and mark it successful: a node running
/// version 1 from slot A, with its slot record.
pub fn run_v1(disk: &Path, img: &[u8]) {
    use keelos::update::checkpoint::MemStore;
    use keelos::update::driver::{self, MemInputs, Request};
    let mut dev = FileDevice::open(disk, true).unwrap();
    let req = Request {
        sha256: sha(img),
        version: "1.0".into(),
        tries: 3,
        full: keelos::update::FullImage {
            identity: "v1".into(),
            fetch_size: Some(img.len() as u64),
            image_len: None,
        },
        delta: None,
        delta_expect: None,
        checkpoint_every: 1 << 20,
    };
    let (layout, plan) = driver::plan(&dev, None, req).unwrap();
    let mut inputs = MemInputs {
        full: img.to_vec(),
        patch: None,
        chunk: 1 << 16,
    };
    let r = driver::run(
        &mut dev,
        &layout,
        plan,
        &mut inputs,
        &mut MemStore::default(),
        &mut |_| {},
    )
    .unwrap();
    assert_eq!(r.slot, keelos::bootctl::Slot::A);
    keelos::bootctl::store::update(&mut dev, |f| {
        keelos::bootctl::mark_successful(f, keelos::bootctl::Slot::A)
    })
    .unwrap();
}
