//! keel-cluster: a real Kubernetes control plane on loopback (etcd, kube-apiserver,
//! kube-controller-manager from `image/kube/build`), for trying KeelOS nodes and for tests.

use clap::{Parser, Subcommand};
use keelos::cluster::{self, ControlPlane, Options};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

#[derive(Parser, Debug)]
#[command(
    name = "keel-cluster",
    about = "A local Kubernetes control plane on 127.0.0.1"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Start the control plane in the foreground until Ctrl-C (or SIGTERM).
    Up {
        /// Cluster directory (PKI, etcd data, logs, kubeconfigs); reused when it exists.
        #[arg(long)]
        dir: PathBuf,
        /// Where etcd, kube-apiserver and kube-controller-manager are
        /// [default: $KEEL_CACHE/kube/<KUBE_VERSION>]
        #[arg(long)]
        bin_dir: Option<PathBuf>,
        /// Address published for the `kubernetes` Service (QEMU guests reach the host there).
        #[arg(long, default_value = cluster::pki::GUEST_HOST_IP)]
        advertise_address: String,
        /// Seconds start-up may take.
        #[arg(long, default_value_t = 300)]
        timeout: u64,
        /// Also run an OCI registry on loopback (Debian's docker-registry, in DIR/registry)
        /// holding the pause image `keel-image build pause-image` makes, pushed with skopeo.
        #[arg(long)]
        registry: bool,
        /// Write a node configuration (DHCP, and a `kubernetes` section joining this cluster
        /// from a QEMU guest through guestfwds) to this file.
        #[arg(long)]
        node_config: Option<PathBuf>,
        /// The node name in that configuration.
        #[arg(long, default_value = "keel-node-1")]
        node_name: String,
    },
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("keel-cluster: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> Result<(), cluster::ClusterError> {
    let Cmd::Up {
        dir,
        bin_dir,
        advertise_address,
        timeout,
        registry,
        node_config,
        node_name,
    } = cli.cmd;
    let dir = if dir.is_absolute() {
        dir
    } else {
        std::env::current_dir()
            .map_err(|e| cluster::ClusterError::Io {
                what: "reading",
                path: PathBuf::from("."),
                source: e,
            })?
            .join(dir)
    };
    let mut opts = Options::new(&dir);
    if let Some(b) = bin_dir {
        opts.bin_dir = b;
    }
    opts.advertise_address = advertise_address;
    opts.timeout = Duration::from_secs(timeout);
    eprintln!(
        "keel-cluster: starting etcd, kube-apiserver, kube-controller-manager from {} in {}",
        opts.bin_dir.display(),
        dir.display()
    );
    let start = tokio::select! {
        r = ControlPlane::start(&opts) => r,
        _ = shutdown() => {
            eprintln!("keel-cluster: interrupted during start-up, stopping");
            return Ok(());
        }
    };
    let mut cp = start?;
    let registry = if registry {
        let r = cluster::registry::Registry::start(&dir.join("registry"))
            .and_then(|r| cluster::registry::push_pause_image(&r, &dir).map(|d| (r, d)));
        match r {
            Ok(r) => Some(r),
            Err(e) => {
                cp.stop();
                return Err(cluster::ClusterError::Registry(e));
            }
        }
    } else {
        None
    };
    if let Some(path) = &node_config {
        let k = cp.guest_kubernetes_section(&node_name, registry.as_ref().map(|r| r.0.port))?;
        let cfg = serde_json::json!({"version": 1, "kubernetes": k});
        let text = serde_json::to_string_pretty(&cfg).unwrap_or_default() + "\n";
        keelos::pki::write_file(path, &text, true)
            .map_err(|e| cluster::ClusterError::NodeConfig(e.to_string()))?;
    }
    let l = &cp.layout;
    let kc = l.admin_kubeconfig();
    let pki = &l.pki;
    println!(
        "control plane ready in {:.1} s",
        cp.timings.controllers.as_secs_f64()
    );
    println!("API server:        {}", cp.api_url());
    println!("admin kubeconfig:  {}", kc.display());
    println!("cluster CA:        {}", pki.ca_cert().display());
    println!("bootstrap token:   {}", cp.token);
    println!("logs:              {}", l.log_dir().display());
    if let Some((r, digest)) = &registry {
        println!(
            "registry:          {} (pause:{} {digest})",
            r.host(),
            keelos::image::oci::PAUSE_TAG
        );
    }
    if let Some(p) = &node_config {
        println!("node config:       {} (node {node_name})", p.display());
    }
    println!();
    println!("  kubectl --kubeconfig {} get nodes", kc.display());
    println!(
        "  curl --cacert {} --cert {} --key {} {}/api/v1/nodes",
        pki.ca_cert().display(),
        pki.cert("admin").display(),
        pki.key("admin").display(),
        cp.api_url()
    );
    println!(
        "  QEMU guests (-netdev user,...): guestfwd=tcp:{}:{}-cmd:socat - TCP:127.0.0.1:{}",
        cluster::pki::GUEST_HOST_IP,
        cp.ports.apiserver,
        cp.ports.apiserver
    );
    if let Some((r, _)) = &registry {
        println!(
            "                                   guestfwd=tcp:{}:{}-cmd:socat - TCP:127.0.0.1:{}",
            cluster::pki::GUEST_HOST_IP,
            r.port,
            r.port
        );
    }
    println!();
    println!("Ctrl-C stops it.");
    loop {
        tokio::select! {
            _ = shutdown() => break,
            _ = tokio::time::sleep(Duration::from_secs(1)) => {
                if let Err(e) = cp.check() {
                    cp.stop();
                    return Err(e);
                }
            }
        }
    }
    eprintln!("keel-cluster: stopping");
    cp.stop();
    Ok(())
}

/// Ctrl-C or SIGTERM.
async fn shutdown() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
