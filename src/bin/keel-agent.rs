//! keel-agent: serves the KeelOS management API over mutual TLS. Argument parsing and wiring
//! only; everything else lives in `keelos::agent`.

use clap::Parser;
use keelos::agent::control::{InitSocket, NodeControl, Unavailable};
use keelos::agent::service::{serve, Agent, AgentConfig};
use keelos::agent::tls;
use keelos::bootctl::Slot;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

/// The KeelOS node agent: gRPC over mutual TLS (no plaintext listener).
#[derive(Debug, Parser)]
#[command(name = "keel-agent", version)]
struct Args {
    /// The boot disk: a block device or a disk image file.
    #[arg(long)]
    disk: PathBuf,
    /// Address to listen on, e.g. 0.0.0.0:50051 (port 0: any free port, printed at start).
    #[arg(long, default_value = "0.0.0.0:50051")]
    listen: String,
    /// Directory with ca.crt, agent.crt and agent.key (osctl gen pki makes them).
    #[arg(long)]
    pki: PathBuf,
    /// Where STATE is mounted (/state on a node).
    #[arg(long)]
    state_dir: PathBuf,
    /// keel-init's control socket (/run/keel/init.sock on a node).
    #[arg(long)]
    control: Option<PathBuf>,
    /// The slot running now, when the disk's flags should not decide (a or b).
    #[arg(long)]
    booted_slot: Option<Slot>,
    /// Stage 2's record of the booted slot (default: `booted` beside the control socket,
    /// /run/keel/booted on a node).
    #[arg(long)]
    boot_record: Option<PathBuf>,
    /// CA bundle (PEM) trusted for https update downloads (default: the system bundle).
    #[arg(long)]
    fetch_ca: Option<PathBuf>,
    /// Slowest download accepted, in bytes per second averaged over --fetch-rate-window; a
    /// slower one fails the install (re-run it to resume). 0: no minimum.
    #[arg(long, default_value_t = 1024)]
    fetch_min_rate: u64,
    /// Seconds over which --fetch-min-rate is averaged.
    #[arg(long, default_value_t = 120, value_parser = clap::value_parser!(u64).range(1..))]
    fetch_rate_window: u64,
    /// Largest delta patch accepted, in bytes (it is held in memory; at most 128 MiB). A larger
    /// one is not downloaded: the install uses the full image.
    #[arg(long, default_value_t = keelos::update::bspatch::MAX_PATCH_LEN)]
    max_patch_size: u64,
    /// The running image's root: its trusted signing keys (etc/keel/trusted-keys/*.pub) and
    /// security version (etc/keel/security-version) are read from here once at start. With
    /// keys, only signed releases are installed; without, unsigned images are (development).
    #[arg(long, default_value = "/")]
    image_root: PathBuf,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("keel-agent: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("keel-agent: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> Result<(), String> {
    let tls = tls::server_config(&args.pki).map_err(|e| e.to_string())?;
    let control: Arc<dyn NodeControl> = match &args.control {
        None => Arc::new(Unavailable),
        Some(p) => Arc::new(InitSocket::new(p)),
    };
    let agent = Agent::new(
        AgentConfig {
            disk: args.disk.clone(),
            state_dir: args.state_dir.clone(),
            booted: args.booted_slot,
            boot_record: args.boot_record.clone().or_else(|| {
                args.control
                    .as_deref()
                    .map(keelos::control::boot::record_path)
            }),
            fetch_ca: args.fetch_ca.clone(),
            image_root: Some(args.image_root.clone()),
        },
        control,
    )
    .map_err(|e| format!("boot disk {}: {e}", args.disk.display()))?
    .with_download_limits(
        (args.fetch_min_rate > 0).then(|| keelos::fetch::MinRate {
            bytes_per_second: args.fetch_min_rate,
            window: std::time::Duration::from_secs(args.fetch_rate_window),
        }),
        args.max_patch_size,
    );
    let listener = tokio::net::TcpListener::bind(&args.listen)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", args.listen))?;
    let addr = listener
        .local_addr()
        .map_err(|e| format!("listening socket: {e}"))?;
    println!("keel-agent: listening on {addr} (mutual TLS)");
    eprintln!(
        "keel-agent: disk {}, running {}",
        args.disk.display(),
        agent.running().describe()
    );
    let shutdown = async {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(t) => t,
                Err(_) => return std::future::pending().await,
            };
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        eprintln!("keel-agent: shutting down");
    };
    serve(agent, listener, tls, shutdown)
        .await
        .map_err(|e| format!("server: {e}"))
}
