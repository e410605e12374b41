//! A real Kubernetes control plane on loopback, for tests and for trying a node by hand: etcd,
//! kube-apiserver and kube-controller-manager (the stock binaries `image/kube/build` makes), a
//! cluster PKI, and what kubelet TLS bootstrapping needs (a bootstrap token and its RBAC).
//!
//! Host side only. It starts processes, listens on 127.0.0.1 alone and talks to the API with
//! kube-rs; the pure core (`bootctl`, `disk`, `update`, ...) never uses it. Every process is
//! stopped when the [`ControlPlane`] is dropped.

pub mod bootstrap;
pub mod pki;
pub mod process;
pub mod registry;

use bootstrap::{BootstrapToken, Credentials};
use pki::ClusterPki;
use process::Component;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The pinned versions (`KUBE_VERSION`, `ETCD_VERSION`), the one place they are written.
const VERSIONS_ENV: &str = include_str!("../../image/kube-versions.env");
/// The Service CIDR; its first address is [`pki::SERVICE_IP`].
pub const SERVICE_CIDR: &str = "10.96.0.0/12";
/// The Pod CIDR the controller-manager hands out per-node /24s from.
pub const POD_CIDR: &str = "10.244.0.0/16";
/// The components, in start order.
pub const COMPONENTS: [&str; 3] = ["etcd", "kube-apiserver", "kube-controller-manager"];

/// Starting or running the control plane failed.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// A binary is not where it was looked for.
    #[error(
        "{path} not found or not executable: build the control plane with \
         `image/kube/build etcd kube-apiserver kube-controller-manager` (from Go modules, \
         about 9 minutes cold) or point --bin-dir at a directory holding them"
    )]
    MissingBinary { path: PathBuf },
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cluster PKI: {0}")]
    Pki(String),
    #[error("the test registry: {0}")]
    Registry(String),
    #[error("writing the node configuration: {0}")]
    NodeConfig(String),
    #[error(
        "{0:?} is not a bootstrap token (<6 of [a-z0-9]>.<16 of [a-z0-9]>); delete the \
         bootstrap-token file in the cluster directory to get a new one"
    )]
    BadToken(String),
    #[error("Kubernetes client: {0}")]
    Client(String),
    #[error("{name} exited ({status}); its log is {log}, ending with:\n{tail}")]
    Exited {
        name: &'static str,
        status: String,
        log: PathBuf,
        tail: String,
    },
    #[error(
        "{what} not done after {secs} s (last: {last}); see the logs in {logs}",
        secs = .after.as_secs()
    )]
    Timeout {
        what: &'static str,
        after: Duration,
        last: String,
        logs: PathBuf,
    },
}

impl ClusterError {
    pub(crate) fn io(what: &'static str, path: &Path, source: std::io::Error) -> ClusterError {
        ClusterError::Io {
            what,
            path: path.to_path_buf(),
            source,
        }
    }
}

/// A value of `image/kube-versions.env` (`KEY=value`).
pub fn pinned(key: &str) -> Option<&'static str> {
    VERSIONS_ENV.lines().find_map(|l| {
        let (k, v) = l.trim().split_once('=')?;
        (k == key).then(|| v.trim())
    })
}

/// Where `image/kube/build` puts the binaries: `$KEEL_CACHE/kube/<KUBE_VERSION>`.
pub fn default_bin_dir() -> PathBuf {
    let cache = std::env::var_os("KEEL_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/cache/keelos"));
    cache
        .join("kube")
        .join(pinned("KUBE_VERSION").unwrap_or("unknown"))
}

/// How to start a control plane.
#[derive(Debug, Clone)]
pub struct Options {
    /// Holds pki/, etcd/, log/, the kubeconfigs and the bootstrap token; reused when it exists.
    pub dir: PathBuf,
    /// Holds etcd, kube-apiserver and kube-controller-manager.
    pub bin_dir: PathBuf,
    /// The address published for the `kubernetes` Service; QEMU guests reach the host there.
    pub advertise_address: String,
    /// How long start-up may take before it is an error.
    pub timeout: Duration,
}

impl Options {
    pub fn new(dir: impl Into<PathBuf>) -> Options {
        Options {
            dir: dir.into(),
            bin_dir: default_bin_dir(),
            advertise_address: pki::GUEST_HOST_IP.to_string(),
            timeout: Duration::from_secs(300),
        }
    }

    /// The three binaries, or which one is missing.
    pub fn binaries(&self) -> Result<[PathBuf; 3], ClusterError> {
        use std::os::unix::fs::PermissionsExt;
        let paths = COMPONENTS.map(|c| self.bin_dir.join(c));
        for p in &paths {
            let ok = std::fs::metadata(p)
                .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
                .unwrap_or(false);
            if !ok {
                return Err(ClusterError::MissingBinary { path: p.clone() });
            }
        }
        Ok(paths)
    }
}

/// Ports picked for one run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ports {
    pub etcd_client: u16,
    pub etcd_peer: u16,
    pub apiserver: u16,
    pub controller_manager: u16,
}

/// Where things live inside the cluster directory.
#[derive(Debug, Clone)]
pub struct Layout {
    pub dir: PathBuf,
    pub pki: ClusterPki,
}

impl Layout {
    pub fn new(dir: &Path) -> Layout {
        Layout {
            dir: dir.to_path_buf(),
            pki: ClusterPki {
                dir: dir.join("pki"),
            },
        }
    }
    pub fn admin_kubeconfig(&self) -> PathBuf {
        self.dir.join("admin.kubeconfig")
    }
    pub fn controller_manager_kubeconfig(&self) -> PathBuf {
        self.dir.join("controller-manager.kubeconfig")
    }
    pub fn token_file(&self) -> PathBuf {
        self.dir.join("bootstrap-token")
    }
    pub fn log_dir(&self) -> PathBuf {
        self.dir.join("log")
    }
    pub fn etcd_dir(&self) -> PathBuf {
        self.dir.join("etcd")
    }
}

fn s(p: &Path) -> String {
    p.display().to_string()
}

/// etcd: one member, plain HTTP on 127.0.0.1 only (nothing else can reach it).
pub fn etcd_args(l: &Layout, p: &Ports) -> Vec<String> {
    let client = format!("http://127.0.0.1:{}", p.etcd_client);
    let peer = format!("http://127.0.0.1:{}", p.etcd_peer);
    vec![
        "--name=keel".into(),
        format!("--data-dir={}", s(&l.etcd_dir())),
        format!("--listen-client-urls={client}"),
        format!("--advertise-client-urls={client}"),
        format!("--listen-peer-urls={peer}"),
        format!("--initial-advertise-peer-urls={peer}"),
        format!("--initial-cluster=keel={peer}"),
        "--log-level=warn".into(),
    ]
}

pub fn apiserver_args(l: &Layout, p: &Ports, advertise: &str) -> Vec<String> {
    let k = &l.pki;
    vec![
        format!("--etcd-servers=http://127.0.0.1:{}", p.etcd_client),
        "--bind-address=127.0.0.1".into(),
        format!("--secure-port={}", p.apiserver),
        format!("--advertise-address={advertise}"),
        format!("--tls-cert-file={}", s(&k.cert("apiserver"))),
        format!("--tls-private-key-file={}", s(&k.key("apiserver"))),
        format!("--client-ca-file={}", s(&k.ca_cert())),
        "--authorization-mode=Node,RBAC".into(),
        "--enable-bootstrap-token-auth=true".into(),
        "--enable-admission-plugins=NodeRestriction".into(),
        "--allow-privileged=true".into(),
        "--service-account-issuer=https://kubernetes.default.svc.cluster.local".into(),
        format!("--service-account-key-file={}", s(&k.sa_pub())),
        format!("--service-account-signing-key-file={}", s(&k.sa_key())),
        format!("--service-cluster-ip-range={SERVICE_CIDR}"),
        format!(
            "--kubelet-client-certificate={}",
            s(&k.cert("apiserver-kubelet-client"))
        ),
        format!(
            "--kubelet-client-key={}",
            s(&k.key("apiserver-kubelet-client"))
        ),
        "--kubelet-preferred-address-types=InternalIP,Hostname".into(),
        format!("--cert-dir={}", s(&l.dir.join("apiserver-certs"))),
    ]
}

pub fn controller_manager_args(l: &Layout, p: &Ports) -> Vec<String> {
    let k = &l.pki;
    let kc = s(&l.controller_manager_kubeconfig());
    vec![
        format!("--kubeconfig={kc}"),
        format!("--authentication-kubeconfig={kc}"),
        format!("--authorization-kubeconfig={kc}"),
        "--bind-address=127.0.0.1".into(),
        format!("--secure-port={}", p.controller_manager),
        format!("--cert-dir={}", s(&l.dir.join("controller-manager-certs"))),
        format!("--cluster-signing-cert-file={}", s(&k.ca_cert())),
        format!("--cluster-signing-key-file={}", s(&k.ca_key())),
        format!("--root-ca-file={}", s(&k.ca_cert())),
        format!("--service-account-private-key-file={}", s(&k.sa_key())),
        "--use-service-account-credentials=true".into(),
        "--controllers=*,bootstrapsigner,tokencleaner".into(),
        "--leader-elect=false".into(),
        "--allocate-node-cidrs=true".into(),
        format!("--cluster-cidr={POD_CIDR}"),
        format!("--service-cluster-ip-range={SERVICE_CIDR}"),
    ]
}

/// How long each stage of start-up took, from the first process start.
#[derive(Debug, Clone, Copy, Default)]
pub struct Timings {
    /// /readyz answered `ok`.
    pub api_ready: Duration,
    /// The token Secret and bindings exist.
    pub bootstrapped: Duration,
    /// The controller-manager runs its controllers (a `default` ServiceAccount appeared).
    pub controllers: Duration,
}

/// A running control plane; dropping it stops every process (controller-manager first).
#[derive(Debug)]
pub struct ControlPlane {
    pub layout: Layout,
    pub ports: Ports,
    pub token: BootstrapToken,
    pub timings: Timings,
    components: Vec<Component>,
}

fn random_token() -> Result<BootstrapToken, ClusterError> {
    use std::io::Read;
    let mut bytes = [0u8; 22];
    let path = Path::new("/dev/urandom");
    std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut bytes))
        .map_err(|e| ClusterError::io("reading", path, e))?;
    Ok(BootstrapToken::from_random(bytes))
}

fn read(path: &Path) -> Result<String, ClusterError> {
    std::fs::read_to_string(path).map_err(|e| ClusterError::io("reading", path, e))
}

fn write(path: &Path, text: &str, private: bool) -> Result<(), ClusterError> {
    crate::pki::write_file(path, text, private).map_err(|e| ClusterError::Pki(e.to_string()))
}

impl ControlPlane {
    /// Start etcd, kube-apiserver and kube-controller-manager in `opts.dir` and wait until the
    /// API is ready, the bootstrap objects exist and the controllers run.
    pub async fn start(opts: &Options) -> Result<ControlPlane, ClusterError> {
        let [etcd, apiserver, kcm] = opts.binaries()?;
        let layout = Layout::new(&opts.dir);
        for d in [&layout.dir, &layout.log_dir()] {
            std::fs::create_dir_all(d).map_err(|e| ClusterError::io("creating", d, e))?;
        }
        ClusterPki::load_or_generate(&layout.pki.dir)?;
        let token_file = layout.token_file();
        let token = if token_file.exists() {
            BootstrapToken::parse(&read(&token_file)?)?
        } else {
            let t = random_token()?;
            write(&token_file, &format!("{t}\n"), true)?;
            t
        };
        let ports = Ports {
            etcd_client: process::free_port()?,
            etcd_peer: process::free_port()?,
            apiserver: process::free_port()?,
            controller_manager: process::free_port()?,
        };
        let ca_pem = read(&layout.pki.ca_cert())?;
        let server = format!("https://127.0.0.1:{}", ports.apiserver);
        let cert = |stem: &str| -> Result<(String, String), ClusterError> {
            Ok((read(&layout.pki.cert(stem))?, read(&layout.pki.key(stem))?))
        };
        for (path, stem, user) in [
            (layout.admin_kubeconfig(), "admin", "kubernetes-admin"),
            (
                layout.controller_manager_kubeconfig(),
                "controller-manager",
                "system:kube-controller-manager",
            ),
        ] {
            let (cert_pem, key_pem) = cert(stem)?;
            let text = bootstrap::kubeconfig(
                &server,
                &ca_pem,
                user,
                Credentials::Cert {
                    cert_pem: &cert_pem,
                    key_pem: &key_pem,
                },
            );
            write(&path, &text, true)?;
        }

        let start = Instant::now();
        let mut cp = ControlPlane {
            layout,
            ports,
            token,
            timings: Timings::default(),
            components: Vec::new(),
        };
        let l = cp.layout.clone();
        let log = |name: &str| l.log_dir().join(format!("{name}.log"));
        cp.components.push(Component::spawn(
            "etcd",
            &etcd,
            &etcd_args(&l, &ports),
            log("etcd"),
        )?);
        cp.components.push(Component::spawn(
            "kube-apiserver",
            &apiserver,
            &apiserver_args(&l, &ports, &opts.advertise_address),
            log("kube-apiserver"),
        )?);
        let client = cp.admin_client().await?;
        let deadline = start + opts.timeout;
        cp.wait(
            "the API server's /readyz",
            deadline,
            opts.timeout,
            || async {
                if bootstrap::api_ready(&client).await {
                    Ok(())
                } else {
                    Err("not ready".to_string())
                }
            },
        )
        .await?;
        cp.timings.api_ready = start.elapsed();
        // Only now: the controller-manager exits when the RBAC roles that let it read its
        // authentication configuration do not exist yet.
        cp.components.push(Component::spawn(
            "kube-controller-manager",
            &kcm,
            &controller_manager_args(&l, &ports),
            log("kube-controller-manager"),
        )?);
        let token = cp.token.clone();
        let cluster_info = bootstrap::cluster_info_object(
            &format!(
                "https://{}",
                crate::pki::host_port(&opts.advertise_address, ports.apiserver)
            ),
            &ca_pem,
        );
        cp.wait(
            "creating the bootstrap token and RBAC bindings",
            deadline,
            opts.timeout,
            || {
                let (client, token, info) = (client.clone(), token.clone(), cluster_info.clone());
                async move {
                    bootstrap::apply(&client, &token, &info)
                        .await
                        .map_err(|e| e.to_string())
                }
            },
        )
        .await?;
        cp.timings.bootstrapped = start.elapsed();
        cp.wait(
            "the controller-manager's controllers",
            deadline,
            opts.timeout,
            || async {
                if bootstrap::controllers_running(&client).await {
                    Ok(())
                } else {
                    Err("no default ServiceAccount yet".to_string())
                }
            },
        )
        .await?;
        cp.timings.controllers = start.elapsed();
        Ok(cp)
    }

    /// Poll `step` until it succeeds, a component exits, or `deadline` passes.
    async fn wait<F, Fut>(
        &mut self,
        what: &'static str,
        deadline: Instant,
        after: Duration,
        mut step: F,
    ) -> Result<(), ClusterError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<(), String>>,
    {
        loop {
            self.check()?;
            let last = match step().await {
                Ok(()) => return Ok(()),
                Err(e) => e,
            };
            if Instant::now() >= deadline {
                return Err(ClusterError::Timeout {
                    what,
                    after,
                    last,
                    logs: self.layout.log_dir(),
                });
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// Err when any component has exited.
    pub fn check(&mut self) -> Result<(), ClusterError> {
        self.components.iter_mut().try_for_each(Component::check)
    }

    /// https://127.0.0.1:PORT
    pub fn api_url(&self) -> String {
        format!("https://127.0.0.1:{}", self.ports.apiserver)
    }

    /// The `kubernetes` section of a node configuration that joins this control plane from a
    /// QEMU guest, which reaches the host at [`pki::GUEST_HOST_IP`] through guestfwds on the
    /// same ports: the API server, the cluster CA, the bootstrap token, `node_name`, and, with a
    /// registry port, the sandbox image from that registry (`pause:`[`crate::image::oci::PAUSE_TAG`],
    /// as [`registry::push_pause_image`] pushes it) reached over plain HTTP.
    pub fn guest_kubernetes_section(
        &self,
        node_name: &str,
        registry_port: Option<u16>,
    ) -> Result<serde_json::Value, ClusterError> {
        let ca = read(&self.layout.pki.ca_cert())?;
        let mut k = serde_json::json!({
            "api_server": format!("https://{}:{}", pki::GUEST_HOST_IP, self.ports.apiserver),
            "ca_cert": ca,
            "bootstrap_token": self.token.to_string(),
            "node_name": node_name,
        });
        if let Some(port) = registry_port {
            let host = format!("{}:{port}", pki::GUEST_HOST_IP);
            k["sandbox_image"] = format!("{host}/pause:{}", crate::image::oci::PAUSE_TAG).into();
            k["registry_mirrors"] = serde_json::json!({ host.clone(): [format!("http://{host}")] });
        }
        Ok(k)
    }

    /// A kube-rs client with the admin certificate (system:masters).
    pub async fn admin_client(&self) -> Result<kube::Client, ClusterError> {
        bootstrap::client_from_kubeconfig(&read(&self.layout.admin_kubeconfig())?).await
    }

    /// A kube-rs client that authenticates with `token` (e.g. the bootstrap token).
    pub async fn token_client(&self, token: &str) -> Result<kube::Client, ClusterError> {
        let ca = read(&self.layout.pki.ca_cert())?;
        let text = bootstrap::kubeconfig(&self.api_url(), &ca, "token", Credentials::Token(token));
        bootstrap::client_from_kubeconfig(&text).await
    }

    /// (component, RSS in KiB) of each running component.
    pub fn rss_kib(&self) -> Vec<(&'static str, u64)> {
        self.components
            .iter()
            .filter_map(|c| Some((c.name, c.rss_kib()?)))
            .collect()
    }

    /// Stop everything now, controller-manager first, etcd last.
    pub fn stop(&mut self) {
        while let Some(mut c) = self.components.pop() {
            c.stop(Duration::from_secs(10));
        }
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_are_read_from_the_pin_file() {
        assert_eq!(pinned("KUBE_VERSION"), Some("v1.35.4"));
        assert!(default_bin_dir().ends_with("kube/v1.35.4"));
        assert_eq!(pinned("NOPE"), None);
    }

    #[test]
    fn a_missing_binary_names_the_build_command() {
        let d = tempfile::tempdir().expect("tempdir");
        let mut o = Options::new(d.path());
        o.bin_dir = d.path().join("nothing-here");
        let e = o.binaries().expect_err("missing").to_string();
        assert!(e.contains("nothing-here/etcd"), "{e}");
        assert!(e.contains("image/kube/build"), "{e}");
    }

    #[test]
    fn flags_wire_the_components_together() {
        let l = Layout::new(Path::new("/c"));
        let p = Ports {
            etcd_client: 1,
            etcd_peer: 2,
            apiserver: 3,
            controller_manager: 4,
        };
        let api = apiserver_args(&l, &p, "10.0.2.100");
        for want in [
            "--etcd-servers=http://127.0.0.1:1",
            "--secure-port=3",
            "--bind-address=127.0.0.1",
            "--authorization-mode=Node,RBAC",
            "--enable-bootstrap-token-auth=true",
            "--client-ca-file=/c/pki/ca.crt",
            "--service-account-signing-key-file=/c/pki/sa.key",
        ] {
            assert!(api.iter().any(|a| a == want), "{want} missing: {api:?}");
        }
        let kcm = controller_manager_args(&l, &p);
        for want in [
            "--cluster-signing-cert-file=/c/pki/ca.crt",
            "--cluster-signing-key-file=/c/pki/ca.key",
            "--controllers=*,bootstrapsigner,tokencleaner",
            "--bind-address=127.0.0.1",
        ] {
            assert!(kcm.iter().any(|a| a == want), "{want} missing: {kcm:?}");
        }
        let etcd = etcd_args(&l, &p);
        assert!(etcd.iter().all(|a| !a.contains("0.0.0.0")), "{etcd:?}");
    }
}
