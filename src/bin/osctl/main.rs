//! osctl: the operator's CLI for KeelOS nodes. Argument parsing, the gRPC calls, and output;
//! the PKI and TLS live in `keelos::pki` and `keelos::agent::tls`.
//!
//! Exit codes: 0 success; 1 the agent refused or failed the request; 2 bad usage or local
//! configuration; 3 agent unreachable; 4 TLS failure; 5 permission denied (role); 6 an update is
//! already running.

use clap::{Parser, Subcommand, ValueEnum};
use keelos::agent::client::Client;
use keelos::agent::proto;
use keelos::agent::tls;
use keelos::pki;
use serde_json::json;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

const EXIT_FAIL: u8 = 1;
const EXIT_USAGE: u8 = 2;
const EXIT_UNREACHABLE: u8 = 3;
const EXIT_TLS: u8 = 4;
const EXIT_DENIED: u8 = 5;
const EXIT_BUSY: u8 = 6;

#[derive(Debug, Parser)]
#[command(
    name = "osctl",
    version,
    about = "Manage KeelOS nodes through keel-agent (mutual TLS)"
)]
struct Cli {
    /// osctl configuration (endpoint, CA, certificate, key); default $OSCTL_CONFIG, then
    /// ~/.osctl/osctl.json.
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    /// The agent's HOST:PORT, overriding the configuration's endpoint.
    #[arg(long, global = true)]
    endpoint: Option<String>,
    /// Output format of commands that read.
    #[arg(long, global = true, value_enum, default_value_t = Output::Text)]
    output: Output,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Output {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Versions, slots, rollback, uptime and the update in progress.
    Status,
    /// Install into the inactive slot: a signed release (--release), or on a development image
    /// an image and its digest (--image/--sha256; with --delta: a delta install, --image is the
    /// fallback).
    Install {
        /// URL of a release manifest (release.json); its signature (release.json.minisig), image
        /// and delta are fetched beside it and checked by the node.
        #[arg(long, required_unless_present = "image", conflicts_with_all = ["image", "delta", "sha256", "version"])]
        release: Option<String>,
        /// Install a release whose security version is lower than the running one (it must
        /// still be signed; the node logs it).
        #[arg(long, requires = "release")]
        allow_downgrade: bool,
        #[arg(long, requires = "sha256")]
        image: Option<String>,
        #[arg(long, requires = "image")]
        delta: Option<String>,
        /// SHA-256 of the uncompressed image (64 hex characters).
        #[arg(long, requires = "image")]
        sha256: Option<String>,
        #[arg(long, requires = "image")]
        version: Option<String>,
    },
    /// Reboot the node.
    Reboot {
        /// Only when an update is staged.
        #[arg(long)]
        if_staged: bool,
    },
    /// Boot the other slot next (when it is bootable).
    Rollback,
    /// Node configuration.
    Config {
        #[command(subcommand)]
        cmd: ConfigCmd,
    },
    /// The services keel-init supervises.
    Services,
    /// Restart a service.
    Restart { service: String },
    /// A service's log.
    Logs {
        service: String,
        /// Keep following new lines.
        #[arg(short, long)]
        follow: bool,
        /// Only the last N lines (0: all kept).
        #[arg(long, default_value_t = 0)]
        tail: u32,
    },
    /// Generate things locally.
    Gen {
        #[command(subcommand)]
        cmd: GenCmd,
    },
}

#[derive(Debug, Subcommand)]
enum ConfigCmd {
    Get,
    Apply {
        file: PathBuf,
        #[arg(long)]
        dry_run: bool,
    },
}

#[derive(Debug, Subcommand)]
enum GenCmd {
    /// CA, agent certificate (with the SANs given), one client certificate per role, osctl
    /// configs.
    Pki {
        #[arg(long)]
        out: PathBuf,
        /// A DNS name or IP address the agent is reached at (repeat for more).
        #[arg(long, required = true)]
        san: Vec<String>,
        /// Endpoint written in the configs (default: first SAN, port 50051).
        #[arg(long = "config-endpoint")]
        config_endpoint: Option<String>,
    },
}

/// A failure: exit code and one line.
struct Fail(u8, String);

fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("osctl: cannot start the async runtime: {e}");
            return ExitCode::from(EXIT_FAIL);
        }
    };
    match rt.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Fail(code, msg)) => {
            eprintln!("osctl: {msg}");
            ExitCode::from(code)
        }
    }
}

fn config_path(cli: &Cli) -> PathBuf {
    if let Some(p) = &cli.config {
        return p.clone();
    }
    if let Some(p) = std::env::var_os("OSCTL_CONFIG") {
        return PathBuf::from(p);
    }
    let home = std::env::var_os("HOME").unwrap_or_else(|| "/root".into());
    PathBuf::from(home).join(".osctl").join(pki::OSCTL_CONFIG)
}

fn connect(cli: &Cli) -> Result<Client, Fail> {
    let path = config_path(cli);
    let cfg = pki::ClientConfig::load(&path).map_err(|e| {
        Fail(
            EXIT_USAGE,
            format!("{e} (give --config FILE; `osctl gen pki` writes one)"),
        )
    })?;
    Client::from_config(&cfg, cli.endpoint.as_deref()).map_err(|e| Fail(EXIT_USAGE, e.to_string()))
}

/// The whole error chain as text, for classifying TLS failures.
fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// Like [`classify`], but when the call failed below gRPC (the connection closed or was
/// cancelled), probe the handshake once to learn why: the server's TLS alert or an unreachable
/// address.
async fn diagnose(st: tonic::Status, client: &Client) -> Fail {
    let endpoint = client.endpoint();
    use tonic::Code;
    let transport = matches!(
        st.code(),
        Code::Unavailable | Code::Unknown | Code::Cancelled | Code::Internal
    ) && std::error::Error::source(&st).is_some();
    if transport {
        if let Err(e) = client.probe().await {
            let st2 = tonic::Status::from_error(Box::new(e));
            return classify(st2, endpoint);
        }
    }
    classify(st, endpoint)
}

/// Turn a failed call into an exit code and a one-line reason.
fn classify(st: tonic::Status, endpoint: &str) -> Fail {
    use tonic::Code;
    let mut detail = st.message().to_string();
    if let Some(src) = std::error::Error::source(&st) {
        detail = chain(src);
    }
    let mut connect = None;
    let mut cur: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(&st);
    while let Some(c) = cur {
        if let Some(ce) = c.downcast_ref::<tls::ConnectError>() {
            connect = Some(ce);
            break;
        }
        cur = c.source();
    }
    if let Some(tls::ConnectError::Unreachable { addr, source }) = connect {
        return Fail(
            EXIT_UNREACHABLE,
            format!("cannot reach the agent at {addr}: {source} (is keel-agent running there? right --endpoint?)"),
        );
    }
    let low = detail.to_lowercase();
    let tlsish = matches!(connect, Some(tls::ConnectError::Tls { .. }))
        || low.contains("alert")
        || low.contains("certificate")
        || low.contains("tls");
    if st.code() == Code::Unavailable || st.code() == Code::Unknown || st.code() == Code::Internal {
        if tlsish {
            let hint = if low.contains("unknownissuer") {
                "the agent's certificate is not signed by the CA in your config: wrong CA?"
            } else if low.contains("notvalidforname") {
                "the agent's certificate does not name this host: use an address given to \
                 `gen pki --san`, or set server_name in the config"
            } else if low.contains("certificateexpired") || low.contains("expired") {
                "a certificate has expired: issue a new client certificate (or check the clocks)"
            } else if low.contains("unknownca")
                || low.contains("badcertificate")
                || low.contains("decrypterror")
            {
                "the agent refused your client certificate: is it from another CA?"
            } else if low.contains("certificaterequired") {
                "the agent requires a client certificate"
            } else {
                "wrong CA? expired certificate? certificate from another node's PKI?"
            };
            return Fail(
                EXIT_TLS,
                format!("TLS failure with the agent at {endpoint}: {detail} (hint: {hint})"),
            );
        }
        if st.code() == Code::Unavailable && std::error::Error::source(&st).is_some() {
            return Fail(
                EXIT_UNREACHABLE,
                format!("cannot reach the agent at {endpoint}: {detail}"),
            );
        }
    }
    match st.code() {
        Code::PermissionDenied => Fail(EXIT_DENIED, format!("permission denied: {}", st.message())),
        Code::FailedPrecondition if st.message().contains("already running") => {
            Fail(EXIT_BUSY, st.message().to_string())
        }
        _ => Fail(EXIT_FAIL, format!("{:?}: {}", st.code(), st.message())),
    }
}

fn print_json(v: &serde_json::Value) {
    println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
}

fn phase_name(p: i32) -> &'static str {
    proto::Phase::try_from(p)
        .map(|p| match p {
            proto::Phase::Unspecified => "starting",
            proto::Phase::Validating => "validating",
            proto::Phase::Invalidating => "invalidating target",
            proto::Phase::Downloading => "downloading",
            proto::Phase::Patching => "patching",
            proto::Phase::Flushing => "flushing",
            proto::Phase::Verifying => "verifying",
            proto::Phase::Activating => "activating",
            proto::Phase::Done => "done",
            proto::Phase::Failed => "failed",
        })
        .unwrap_or("unknown")
}

fn progress_json(p: &proto::Progress) -> serde_json::Value {
    json!({
        "phase": phase_name(p.phase),
        "bytes_done": p.bytes_done,
        "bytes_total": p.bytes_total,
        "rate_bytes_per_second": p.rate_bytes_per_second,
        "detail": p.detail,
    })
}

fn result_json(r: &proto::InstallResult) -> serde_json::Value {
    json!({
        "ok": r.ok,
        "error": r.error,
        "bytes_saved": r.bytes_saved,
        "fallback_used": r.fallback_used,
        "fallback_reason": r.fallback_reason,
        "staged_slot": r.staged_slot,
        "sha256": r.sha256,
        "version": r.version,
        "trust": r.trust,
    })
}

fn status_json(s: &proto::StatusReply) -> serde_json::Value {
    json!({
        "os_version": s.os_version,
        "agent_version": s.agent_version,
        "booted_slot": s.booted_slot,
        "booted_from": s.booted_from,
        "next_boot_slot": s.next_boot_slot,
        "rolled_back": s.rolled_back,
        "rolled_back_from": s.rolled_back_from,
        "uptime_seconds": s.uptime_seconds,
        "kernel_release": s.kernel_release,
        "boot_stage": s.boot_stage,
        "last_rollback": s.last_rollback,
        "update_trust": s.update_trust,
        "lockdown": s.lockdown,
        "verity": s.verity,
        "slots": s.slots.iter().map(|x| json!({
            "slot": x.slot,
            "priority": x.priority,
            "tries": x.tries,
            "successful": x.successful,
            "bootable": x.bootable,
            "state": x.state,
            "booted": x.booted,
            "image": x.image.as_ref().map(|i| json!({
                "version": i.version, "length": i.length, "sha256": i.sha256
            })),
        })).collect::<Vec<_>>(),
        "update": s.update.as_ref().map(|u| json!({
            "id": u.id,
            "version": u.version,
            "sha256": u.sha256,
            "running": u.running,
            "progress": u.progress.as_ref().map(progress_json),
            "result": u.result.as_ref().map(result_json),
        })),
    })
}

fn human(n: u64) -> String {
    const U: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut f = n as f64;
    let mut i = 0;
    while f >= 1024.0 && i < U.len() - 1 {
        f /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{n} B")
    } else {
        format!("{f:.1} {}", U[i])
    }
}

fn or_unknown(s: &str) -> &str {
    if s.is_empty() {
        "unknown"
    } else {
        s
    }
}

fn print_status(s: &proto::StatusReply) {
    println!("OS:          {}", s.os_version);
    println!("agent:       {}", s.agent_version);
    println!(
        "booted slot: {}",
        if s.booted_slot.is_empty() {
            "none"
        } else {
            &s.booted_slot
        }
    );
    println!("known from:  {}", s.booted_from);
    println!(
        "next boot:   {}",
        if s.next_boot_slot.is_empty() {
            "none"
        } else {
            &s.next_boot_slot
        }
    );
    println!("uptime:      {}s", s.uptime_seconds);
    println!("kernel: {}", or_unknown(&s.kernel_release));
    println!("boot stage: {}", or_unknown(&s.boot_stage));
    println!("update trust: {}", or_unknown(&s.update_trust));
    println!("kernel lockdown: {}", or_unknown(&s.lockdown));
    println!("root dm-verity: {}", or_unknown(&s.verity));
    if s.rolled_back {
        println!(
            "rolled back: yes{}",
            if s.rolled_back_from.is_empty() {
                String::new()
            } else {
                format!(" (from {})", s.rolled_back_from)
            }
        );
    }
    if !s.last_rollback.is_empty() {
        println!("last rollback: {}", s.last_rollback);
    }
    for x in &s.slots {
        let img = x
            .image
            .as_ref()
            .map(|i| format!("{} {} bytes sha256 {}", i.version, i.length, i.sha256))
            .unwrap_or_else(|| "image unknown".into());
        println!(
            "slot {}{}: {} (priority {}, tries {}, {}) {}",
            x.slot,
            if x.booted { " (booted)" } else { "" },
            x.state,
            x.priority,
            x.tries,
            if x.bootable {
                "bootable"
            } else {
                "not bootable"
            },
            img
        );
    }
    if let Some(u) = &s.update {
        let p = u.progress.clone().unwrap_or_default();
        println!(
            "update {}: {} {} / {}",
            u.id,
            if u.running {
                phase_name(p.phase)
            } else {
                "finished"
            },
            human(p.bytes_done),
            human(p.bytes_total)
        );
        if let Some(r) = &u.result {
            print_result(r);
        }
    }
}

fn print_result(r: &proto::InstallResult) {
    if r.ok {
        println!(
            "staged {} in slot {} (sha256 {}); bytes saved {}; fallback {}",
            r.version,
            r.staged_slot,
            r.sha256,
            human(r.bytes_saved),
            if r.fallback_used {
                format!("used: {}", r.fallback_reason)
            } else {
                "not used".into()
            }
        );
    } else {
        println!("install failed: {}", r.error);
    }
    if !r.trust.is_empty() {
        println!("trust: {}", r.trust);
    }
}

/// A failure inside a command: already explained, or a failed call still to be diagnosed.
enum E {
    Fail(Fail),
    Rpc(tonic::Status),
}

impl From<Fail> for E {
    fn from(f: Fail) -> E {
        E::Fail(f)
    }
}

async fn run(cli: Cli) -> Result<(), Fail> {
    if let Cmd::Gen {
        cmd: GenCmd::Pki {
            out,
            san,
            config_endpoint,
        },
    } = &cli.cmd
    {
        return gen_pki(out, san, config_endpoint.as_deref());
    }
    let mut client = connect(&cli)?;
    match command(&cli, &mut client).await {
        Ok(()) => Ok(()),
        Err(E::Fail(f)) => Err(f),
        Err(E::Rpc(st)) => Err(diagnose(st, &client).await),
    }
}

fn gen_pki(out: &std::path::Path, san: &[String], endpoint: Option<&str>) -> Result<(), Fail> {
    let g = pki::generate(out, san, endpoint).map_err(|e| Fail(EXIT_USAGE, e.to_string()))?;
    println!("PKI written to {}", g.dir.display());
    for (role, cfg) in &g.configs {
        println!(
            "  {}: osctl --config {}",
            role.organization(),
            cfg.display()
        );
    }
    println!(
        "  agent: keel-agent --pki {} (needs ca.crt, agent.crt, agent.key)",
        g.dir.display()
    );
    Ok(())
}

async fn command(cli: &Cli, client: &mut Client) -> Result<(), E> {
    let json_out = cli.output == Output::Json;
    match &cli.cmd {
        Cmd::Gen { .. } => Ok(()),
        Cmd::Status => {
            let s = client.status().await.map_err(E::Rpc)?;
            if json_out {
                print_json(&status_json(&s));
            } else {
                print_status(&s);
            }
            Ok(())
        }
        Cmd::Install {
            release,
            allow_downgrade,
            image,
            delta,
            sha256,
            version,
        } => {
            let req = proto::InstallRequest {
                full_image_url: image.clone().unwrap_or_default(),
                delta_url: delta.clone().unwrap_or_default(),
                is_delta: delta.is_some(),
                sha256: sha256.clone().unwrap_or_default(),
                version: version.clone().unwrap_or_default(),
                release_url: release.clone().unwrap_or_default(),
                allow_downgrade: *allow_downgrade,
            };
            let stream = client.install(req).await.map_err(E::Rpc)?;
            let bar = if std::io::stderr().is_terminal() && !json_out {
                let b = indicatif::ProgressBar::new(0);
                b.set_style(
                    indicatif::ProgressStyle::with_template(
                        "{msg:>20} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
                    )
                    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
                    .progress_chars("=> "),
                );
                Some(b)
            } else {
                None
            };
            let mut last_phase = -1;
            let result = stream
                .finish(|p| {
                    if let Some(b) = &bar {
                        b.set_length(p.bytes_total);
                        b.set_position(p.bytes_done);
                        b.set_message(phase_name(p.phase));
                    } else if json_out {
                        println!("{}", progress_json(p));
                    } else if p.phase != last_phase {
                        println!(
                            "{}: {} / {} ({}/s)",
                            phase_name(p.phase),
                            human(p.bytes_done),
                            human(p.bytes_total),
                            human(p.rate_bytes_per_second)
                        );
                    }
                    last_phase = p.phase;
                })
                .await
                .map_err(E::Rpc)?;
            if let Some(b) = &bar {
                b.finish_and_clear();
            }
            let r = result.ok_or_else(|| {
                Fail(
                    EXIT_FAIL,
                    "the agent closed the stream without a result; `osctl status` shows the \
                     update's state"
                        .into(),
                )
            })?;
            if json_out {
                print_json(&result_json(&r));
            } else {
                print_result(&r);
            }
            if r.ok {
                Ok(())
            } else {
                Err(Fail(EXIT_FAIL, format!("install failed: {}", r.error)).into())
            }
        }
        Cmd::Reboot { if_staged } => {
            let c = client.keel();
            let r = c
                .reboot(proto::RebootRequest {
                    only_if_staged: *if_staged,
                })
                .await
                .map_err(E::Rpc)?
                .into_inner();
            println!("{}", r.message);
            Ok(())
        }
        Cmd::Rollback => {
            let c = client.keel();
            let r = c
                .rollback(proto::RollbackRequest {})
                .await
                .map_err(E::Rpc)?
                .into_inner();
            println!("{}", r.message);
            Ok(())
        }
        Cmd::Config {
            cmd: ConfigCmd::Get,
        } => {
            let c = client.keel();
            let r = c
                .get_config(proto::GetConfigRequest {})
                .await
                .map_err(E::Rpc)?
                .into_inner();
            println!("{}", r.json);
            Ok(())
        }
        Cmd::Config {
            cmd: ConfigCmd::Apply { file, dry_run },
        } => {
            let c = client.keel();
            let text = std::fs::read_to_string(file)
                .map_err(|e| Fail(EXIT_USAGE, format!("reading {}: {e}", file.display())))?;
            let r = c
                .apply_config(proto::ApplyConfigRequest {
                    json: text,
                    dry_run: *dry_run,
                })
                .await
                .map_err(E::Rpc)?
                .into_inner();
            if json_out {
                print_json(&json!({"applied": r.applied, "changes": r.changes}));
            } else {
                for ch in &r.changes {
                    println!("{ch}");
                }
                println!(
                    "{}",
                    if r.applied {
                        "applied"
                    } else {
                        "dry run: nothing written"
                    }
                );
            }
            Ok(())
        }
        Cmd::Services => {
            let c = client.keel();
            let r = c
                .service_list(proto::ServiceListRequest {})
                .await
                .map_err(E::Rpc)?
                .into_inner();
            if json_out {
                print_json(&json!(r
                    .services
                    .iter()
                    .map(|s| json!({
                        "name": s.name, "state": s.state, "pid": s.pid,
                        "restarts": s.restarts, "detail": s.detail,
                        "rss_bytes": s.rss_bytes,
                    }))
                    .collect::<Vec<_>>()));
            } else {
                for s in &r.services {
                    let rss = match s.rss_bytes {
                        0 => String::new(),
                        b => format!("rss {:.1} MiB; ", b as f64 / 1048576.0),
                    };
                    println!(
                        "{:<20} {:<10} pid {:<8} restarts {} {rss}{}",
                        s.name, s.state, s.pid, s.restarts, s.detail
                    );
                }
            }
            Ok(())
        }
        Cmd::Restart { service } => {
            let c = client.keel();
            let r = c
                .service_restart(proto::ServiceRestartRequest {
                    name: service.clone(),
                })
                .await
                .map_err(E::Rpc)?
                .into_inner();
            println!("{}", r.message);
            Ok(())
        }
        Cmd::Logs {
            service,
            follow,
            tail,
        } => {
            let mut s = client
                .keel()
                .logs(proto::LogsRequest {
                    service: service.clone(),
                    follow: *follow,
                    tail_lines: *tail,
                })
                .await
                .map_err(E::Rpc)?
                .into_inner();
            while let Some(l) = s.message().await.map_err(E::Rpc)? {
                if json_out {
                    println!("{}", json!({"line": l.line}));
                } else {
                    println!("{}", l.line);
                }
            }
            Ok(())
        }
    }
}
