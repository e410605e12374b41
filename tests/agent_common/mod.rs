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
    let dir = tempfile::tempdir().unwrap();
    let pki_dir = dir.path().join("pki");
    pki::generate(&pki_dir, &["localhost".into(), "127.0.0.1".into()], None).unwrap();
    let disk = dir.path().join("disk.img");
    make_disk(&disk, 4 * MIB);
    let state = dir.path().join("state");
    std::fs::create_dir_all(&state).unwrap();
    let agent = Agent::new(
        AgentConfig {
            disk: disk.clone(),
            state_dir: state,
            booted: None,
        },
        Arc::new(Unavailable),
    )
    .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let cfg = tls::server_config(&pki_dir).unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let a = agent.clone();
    tokio::spawn(async move {
        serve(a, listener, cfg, async {
            let _ = rx.await;
        })
        .await
        .unwrap();
    });
    Node {
        dir,
        pki: pki_dir,
        disk,
        addr,
        agent,
        stop: Some(tx),
    }
}

impl Node {
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
