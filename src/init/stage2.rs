//! Stage 2: PID 1 in the slot's root. Loads the node configuration, brings up the network,
//! supervises the services, reaps every process, judges the boot healthy (and marks the slot
//! successful), pets the watchdog, serves the control socket and, on request, signal or a missed
//! boot deadline, stops everything and reboots or powers off.
//!
//! The main loop is one thread: it waits in poll(2) on a signalfd (SIGCHLD, SIGTERM, SIGINT) and
//! on the control server's wake pipe, with a timeout set by the next thing that is due.

use super::bootdisk::open_disk;
use super::cmdline::{self, KernelParams};
use super::health::{BootHealth, HealthAction, HealthWindow, Observation, WatchdogAction};
use super::log;
use super::logfile::{log_path, LogFile};
use super::mounts;
use super::net;
use super::netup::{self, NetworkUp};
use super::server::{Command, Server, ShutdownKind};
use super::supervisor::{NodeFacts, Supervisor};
use super::watchdog::Watchdog;
use crate::bootctl::{self, store, Slot};
use crate::config::{self, NodeConfig};
use crate::control::journal::End;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Where stage 2 finds things; the defaults are the node's paths.
#[derive(Debug, Clone)]
pub struct Stage2Options {
    pub config: PathBuf,
    pub state_dir: PathBuf,
    pub control: PathBuf,
    pub boot_disk: Option<PathBuf>,
    pub slot: Option<Slot>,
    pub watchdog_fd: Option<i32>,
    pub cmdline: PathBuf,
    /// The boot stage's hand-over words when it could not pass them on a command line.
    pub handoff: Option<String>,
}

impl Stage2Options {
    pub fn from_args(a: &cmdline::InitArgs) -> Self {
        let state_dir = a.state_dir.clone().unwrap_or_else(|| "/state".into());
        Stage2Options {
            config: a
                .config
                .clone()
                .unwrap_or_else(|| state_dir.join("config/node.json")),
            control: a
                .control
                .clone()
                .unwrap_or_else(|| crate::control::SOCKET_PATH.into()),
            boot_disk: a.boot_disk.clone(),
            slot: a.slot,
            watchdog_fd: a.watchdog_fd,
            cmdline: a.cmdline.clone().unwrap_or_else(|| "/proc/cmdline".into()),
            handoff: a.handoff.clone(),
            state_dir,
        }
    }
}

extern "C" fn on_signal(_: libc::c_int) {}

/// Block the signals the main loop reads from its signalfd, with handlers installed so that
/// PID 1 (which the kernel spares from default-action signals) really receives them. Must run
/// before any thread starts, so every thread inherits the mask.
fn signals() -> nix::Result<SignalFd> {
    let mut mask = SigSet::empty();
    for s in [Signal::SIGCHLD, Signal::SIGTERM, Signal::SIGINT] {
        mask.add(s);
        let a = SigAction::new(
            SigHandler::Handler(on_signal),
            SaFlags::SA_RESTART,
            SigSet::empty(),
        );
        // SAFETY: the handler does nothing, so it is async-signal-safe
        unsafe { sigaction(s, &a) }?;
    }
    mask.thread_block()?;
    SignalFd::with_flags(&mask, SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC)
}

fn load_config(path: &Path) -> NodeConfig {
    match config::load(path) {
        Ok(Some(c)) => c,
        Ok(None) => {
            log(format!(
                "no node configuration at {}; using the defaults",
                path.display()
            ));
            NodeConfig::default()
        }
        Err(e) => {
            // a node with a broken configuration must stay manageable: run the defaults, which
            // include the agent, so the operator can store a good configuration
            log(format!("{e}; using the defaults"));
            NodeConfig::default()
        }
    }
}

/// The services as they run ([`crate::kube::node_services`]) and, for a node with a
/// `kubernetes` section, the files kubelet, containerd and CNI read, written before any service
/// starts. Files that cannot be written are logged: kubelet then fails visibly in its own log
/// and the boot is judged as usual.
fn kubernetes(cfg: &NodeConfig) -> NodeConfig {
    let services = crate::kube::node_services(cfg);
    let Some(k) = &cfg.kubernetes else {
        log("no kubernetes section in the node configuration: kubelet is not started");
        return services;
    };
    let root = Path::new("/");
    if let Err(e) = super::kubefiles::ensure_resolv_conf(root) {
        log(e);
    }
    match super::kubefiles::write(root, &crate::kube::files(k)) {
        Ok(written) => log(format!(
            "kubernetes: wrote {} file(s) for kubelet, containerd and CNI (API server {}, {} \
             static pod(s))",
            written.len(),
            k.api_server,
            k.static_pods.len()
        )),
        Err(e) => log(e),
    }
    services
}

/// [`Command::Reload`]: read the configuration again, write the Kubernetes files (restarting
/// containerd when its configuration file changed, kubelet when any of its files did) and take
/// on the configuration's version of `names`.
fn reload(
    sup: &mut Supervisor,
    config: &Path,
    names: &[String],
    now: Duration,
) -> Result<Vec<String>, String> {
    let cfg = match crate::config::load(config) {
        Ok(Some(c)) => c,
        Ok(None) => NodeConfig::default(),
        Err(e) => return Err(format!("the stored configuration: {e}")),
    };
    let files = cfg
        .kubernetes
        .as_ref()
        .map(crate::kube::files)
        .unwrap_or_default();
    let before: Vec<Option<Vec<u8>>> = files.iter().map(|f| std::fs::read(&f.path).ok()).collect();
    let services = kubernetes(&cfg);
    let mut restart = Vec::new();
    for (f, old) in files.iter().zip(before) {
        let new = std::fs::read(&f.path).ok();
        // kubelet watches its static pod directory itself
        if new != old && !f.path.starts_with(crate::kube::STATIC_POD_DIR) {
            let who = if f.path == Path::new(crate::kube::CONTAINERD_CONFIG) {
                "containerd"
            } else {
                "kubelet"
            };
            if !restart.iter().any(|r| r == who) {
                restart.push(who.to_string());
            }
        }
    }
    restart.retain(|r| names.contains(r));
    let changes = sup.reconfigure(&services, names, &restart, now)?;
    log(format!(
        "configuration reloaded for {}: {}",
        names.join(", "),
        if changes.is_empty() {
            "nothing changed".to_string()
        } else {
            changes.join("; ")
        }
    ));
    Ok(changes)
}

/// Loopback, then the node's network ([`netup::start`]: static now, DHCP in its own thread).
fn network(cfg: &NodeConfig, params: &KernelParams) -> NetworkUp {
    match net::is_up("lo") {
        Ok(false) => {
            if let Err(e) = net::loopback_up() {
                log(e);
            }
        }
        Ok(true) => {}
        Err(e) => log(e),
    }
    netup::start(cfg, params)
}

fn open_watchdog(opts: &Stage2Options, cfg: &NodeConfig) -> Option<Watchdog> {
    let mut w = if let Some(fd) = opts.watchdog_fd {
        match Watchdog::from_fd(fd) {
            Ok(w) => w,
            Err(e) => {
                log(format!(
                    "the watchdog stage 1 passed (fd {fd}) is unusable: {e}"
                ));
                return None;
            }
        }
    } else {
        let dev = cfg.watchdog.device.as_ref()?;
        match Watchdog::open(Path::new(dev), false) {
            Ok(w) => w,
            Err(e) => {
                log(format!("no watchdog at {dev} ({e}); running without one"));
                return None;
            }
        }
    };
    match w.set_timeout(cfg.watchdog.timeout_secs) {
        Ok(t) => log(format!("watchdog timeout {t} s")),
        Err(e) => log(format!(
            "watchdog timeout {} s refused: {e}",
            cfg.watchdog.timeout_secs
        )),
    }
    Some(w)
}

/// Whether a watchdog under `class` (/sys/class/watchdog) says it cannot be stopped.
fn watchdog_nowayout(class: &Path) -> bool {
    std::fs::read_dir(class)
        .map(|rd| {
            rd.flatten().any(|e| {
                std::fs::read_to_string(e.path().join("nowayout")).is_ok_and(|v| v.trim() == "1")
            })
        })
        .unwrap_or(false)
}

/// A process's resident memory in KiB (VmRSS in /proc/PID/status).
fn rss_kib(pid: i32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    crate::control::vm_rss_kib(&status)
}

fn agent_serving(addr: Option<SocketAddr>) -> bool {
    addr.is_some_and(|a| TcpStream::connect_timeout(&a, Duration::from_millis(300)).is_ok())
}

/// kubelet's health endpoint (plain HTTP on loopback, [`crate::kube::HEALTHZ_PORT`]) answers
/// `200 ok`.
fn kubelet_healthy() -> bool {
    use std::io::{Read, Write};
    let addr = SocketAddr::from(([127, 0, 0, 1], crate::kube::HEALTHZ_PORT));
    let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_millis(300)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
    let _ = s.set_write_timeout(Some(Duration::from_millis(500)));
    if s.write_all(b"GET /healthz HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut buf = Vec::with_capacity(512);
    // the answer is a few hundred bytes; anything longer is not kubelet's healthy answer
    let _ = s.take(4096).read_to_end(&mut buf);
    crate::kube::healthz_ok(&buf)
}

/// Mark the running slot successful on the boot disk; for a slot that already is, clear its count
/// of boots without health (`bootctl::mark_successful` does both). Nothing is written when there
/// is nothing to change.
fn mark_successful(disk: &Path, slot: Slot) -> Result<String, String> {
    let mut dev = open_disk(disk, true).map_err(|e| e.to_string())?;
    let (_, flags) = store::load(&dev).map_err(|e| e.to_string())?;
    let was = flags.get(slot);
    if was.successful() && bootctl::healthy_again(flags, slot).is_none() {
        return Ok(format!("slot {slot} was already marked successful"));
    }
    let (_, f) = store::update(&mut dev, |f| bootctl::mark_successful(f, slot))
        .map_err(|e| e.to_string())?;
    Ok(if was.successful() {
        format!(
            "slot {slot} was already marked successful; its count of boots without health is \
             back to 0 ({})",
            f.get(slot)
        )
    } else {
        format!("slot {slot} marked successful ({})", f.get(slot))
    })
}

/// Record the slot stage 1 mounted for keel-agent (see [`crate::control::boot`]), before any
/// service starts. Without a slot (stage 2 run by hand) a stale record is removed.
fn record_booted(opts: &Stage2Options, params: &KernelParams) {
    let path = crate::control::boot::record_path(&opts.control);
    let Some(slot) = opts.slot else {
        let _ = std::fs::remove_file(&path);
        return;
    };
    let root_device = crate::control::boot::this_root_device()
        .map(|(a, b)| format!("{a}:{b}"))
        .unwrap_or_default();
    let rec = crate::control::boot::Booted {
        slot: slot.letter().into(),
        root_device,
        boot_stage: params.boot_stage.clone().unwrap_or_default(),
        trial: params.trial.unwrap_or(false),
    };
    match crate::control::boot::write(&path, &rec) {
        Ok(()) => log(format!("booted slot {slot} recorded in {}", path.display())),
        Err(e) => log(format!(
            "cannot record the booted slot in {}: {e}; keel-agent will refuse installs",
            path.display()
        )),
    }
}

/// The kernel parameters, with the boot stage's hand-over words from `--handoff` (a boot that
/// switched root without a kexec) taking the place of the command line's.
fn kernel_params(opts: &Stage2Options) -> KernelParams {
    let text = std::fs::read_to_string(&opts.cmdline).unwrap_or_default();
    let (mut params, mut warnings) = cmdline::parse_kernel(&text);
    if let Some(h) = &opts.handoff {
        let (hp, w) = cmdline::parse_kernel(h);
        warnings.extend(w);
        params.slot = hp.slot;
        params.trial = hp.trial;
        params.boot_stage = hp.boot_stage;
        params.refused = hp.refused;
        params.fallback_from = hp.fallback_from;
        params.demoted = hp.demoted;
    }
    for w in warnings {
        log(w);
    }
    params
}

/// Start this boot's entry in the boot journal on STATE: the slot, whether it is a trial, what
/// the boot stage refused or fell back from, the kernel and the slot's version. Returns whether
/// the entry was written (only then may this boot's end be recorded).
fn journal_begin(opts: &Stage2Options, params: &KernelParams) -> bool {
    use crate::control::journal;
    let Some(slot) = opts.slot else {
        return false;
    };
    let (refused, warnings) = journal::parse_refusals(params.refused.as_deref().unwrap_or(""));
    for w in warnings {
        log(format!("keel.refused: {w}"));
    }
    let facts = journal::BootFacts {
        slot: slot.letter().into(),
        trial: params.trial.unwrap_or(false),
        boot_stage: params.boot_stage.clone().unwrap_or_default(),
        kernel_release: nix::sys::utsname::uname()
            .map(|u| u.release().to_string_lossy().into_owned())
            .unwrap_or_default(),
        version: std::fs::read_to_string("/etc/os-release")
            .ok()
            .and_then(|t| super::stage1::os_release_version(&t))
            .unwrap_or_default(),
        refused,
        fallback_from: params.fallback_from.map(|s| s.letter().to_string()),
        demoted: params.demoted.map(|s| s.letter().to_string()),
    };
    match journal::begin_at(&opts.state_dir, facts) {
        Ok((seq, warning)) => {
            if let Some(w) = warning {
                log(w);
            }
            log(format!("boot {seq} recorded in the boot journal"));
            true
        }
        Err(e) => {
            log(e);
            false
        }
    }
}

fn journal_end(opts: &Stage2Options, began: bool, end: crate::control::journal::End) {
    if !began {
        return;
    }
    if let Err(e) = crate::control::journal::record_end(&opts.state_dir, end) {
        log(e);
    }
}

/// Run stage 2 until the node is to go down; services are stopped when it returns.
pub fn run(opts: &Stage2Options) -> ShutdownKind {
    let start = Instant::now();
    let clock = move || start.elapsed();
    let sfd = match signals() {
        Ok(s) => Some(s),
        Err(e) => {
            log(format!(
                "cannot set up signal handling: {e}; orphans are reaped by polling"
            ));
            None
        }
    };
    // ctrl-alt-del becomes SIGINT (a clean reboot) instead of an immediate reset
    let _ = nix::sys::reboot::set_cad_enabled(false);

    let params = kernel_params(opts);
    record_booted(opts, &params);
    let journal = journal_begin(opts, &params);
    let cfg = load_config(&opts.config);
    if let Some(h) = &cfg.hostname {
        if let Err(e) = nix::unistd::sethostname(h) {
            log(format!("cannot set the host name {h:?}: {e}"));
        }
    }
    let network_up = network(&cfg, &params);
    let cfg = kubernetes(&cfg);
    let mut watchdog = open_watchdog(opts, &cfg);
    let pet_every = Duration::from_secs(u64::from(cfg.watchdog.timeout_secs / 4).max(1));
    // a watchdog locked on (nowayout, as the boot stage loads it) ignores the magic close:
    // closing it would only starve it, so it is petted instead
    let nowayout = watchdog_nowayout(Path::new("/sys/class/watchdog"));

    let facts = NodeFacts {
        boot_disk: opts.boot_disk.clone(),
        slot: opts.slot,
        state_dir: opts.state_dir.clone(),
        control: opts.control.clone(),
    };
    let mut sup = match Supervisor::new(&cfg, facts.clone(), opts.state_dir.join("log")) {
        Ok(s) => s,
        Err(e) => {
            // validation refuses cycles, so only the defaults could get here; they have none
            log(format!("{e}; supervising the default services"));
            let d = NodeConfig::default();
            match Supervisor::new(&d, facts, opts.state_dir.join("log")) {
                Ok(s) => s,
                Err(e) => {
                    log(format!(
                        "the default services cannot be ordered either: {e}"
                    ));
                    return ShutdownKind::Reboot;
                }
            }
        }
    };
    match LogFile::open(
        log_path(sup.log_dir(), super::log::SELF),
        cfg.logs.max_bytes,
        cfg.logs.keep,
    ) {
        Ok(f) => super::log::log_to_file(f),
        Err(e) => log(format!("cannot keep keel-init's own log on STATE: {e}")),
    }
    let mut names = sup.names();
    names.push(super::log::SELF.to_string());
    let server = match Server::start(&opts.control, names, sup.log_dir().to_path_buf()) {
        Ok(s) => Some(s),
        Err(e) => {
            log(format!(
                "cannot listen on {}: {e}; the agent cannot control keel-init",
                opts.control.display()
            ));
            None
        }
    };
    let agent_addr: Option<SocketAddr> = cfg.health.agent_addr.parse().ok();
    let node_ready = cfg
        .kubernetes
        .as_ref()
        .filter(|k| k.require_ready)
        .map(super::kubeready::spawn);
    let mut health = HealthWindow::new(
        Duration::from_secs(cfg.health.window_secs),
        Duration::from_secs(cfg.health.boot_deadline_secs),
        cfg.watchdog.after_success,
    );
    let check_every = Duration::from_secs(1);
    let mut next_check = Duration::ZERO;
    let mut next_pet = Duration::ZERO;
    log(format!(
        "stage 2 running {} service(s); boot deadline {} s, health window {} s",
        cfg.services.len(),
        cfg.health.boot_deadline_secs,
        cfg.health.window_secs
    ));

    let kind = 'main: loop {
        let now = clock();
        sup.tick(now);
        let mut due = [Some(next_pet), sup.next_deadline()]
            .into_iter()
            .flatten()
            .min()
            .unwrap_or(now + check_every);
        if health.state() == BootHealth::Booting {
            due = due.min(next_check);
        }
        let wait = due.saturating_sub(now).min(Duration::from_secs(1));
        let mut fds = Vec::with_capacity(2);
        if let Some(s) = &sfd {
            fds.push(PollFd::new(s.as_fd(), PollFlags::POLLIN));
        }
        if let Some(s) = &server {
            fds.push(PollFd::new(s.wake.as_fd(), PollFlags::POLLIN));
        }
        let ms = u16::try_from(wait.as_millis()).unwrap_or(1000);
        let _ = poll(&mut fds, PollTimeout::from(ms));
        drop(fds);

        let mut stop = None;
        if let Some(s) = &sfd {
            while let Ok(Some(info)) = s.read_signal() {
                match Signal::try_from(info.ssi_signo as i32) {
                    Ok(Signal::SIGTERM) => {
                        log("SIGTERM: powering off");
                        stop = Some(ShutdownKind::PowerOff);
                    }
                    Ok(Signal::SIGINT) => {
                        log("SIGINT: rebooting");
                        stop = Some(ShutdownKind::Reboot);
                    }
                    _ => {}
                }
            }
        }
        let now = clock();
        sup.reap(now);
        if let Some(s) = &server {
            s.drain_wake();
            while let Ok(c) = s.commands.try_recv() {
                match c {
                    Command::List(reply) => {
                        let mut list = sup.status(now);
                        for s in &mut list {
                            s.rss_kib = s.pid.and_then(rss_kib);
                        }
                        let _ = reply.send(list);
                    }
                    Command::Restart(name, reply) => {
                        let _ = reply.send(sup.restart(&name, now));
                    }
                    Command::Reload(names, reply) => {
                        let r = reload(&mut sup, &opts.config, &names, now).map(|done| {
                            let mut names = sup.names();
                            names.push(super::log::SELF.to_string());
                            (done, names)
                        });
                        let _ = reply.send(r);
                    }
                    Command::Shutdown(k) => {
                        log(format!("{k:?} requested over the control socket"));
                        stop = Some(k);
                    }
                }
            }
        }
        if let Some(k) = stop {
            break 'main k;
        }
        sup.tick(now);

        if health.state() == BootHealth::Booting && now >= next_check {
            next_check = now + check_every;
            let obs = Observation {
                agent_serving: agent_serving(agent_addr),
                required_up_since: sup.required_up_since(&cfg.health.required),
                network_up: network_up.get(),
                kubernetes_ok: cfg.kubernetes.as_ref().map(|_| {
                    kubelet_healthy()
                        && node_ready
                            .as_ref()
                            .is_none_or(|r| r.load(std::sync::atomic::Ordering::Relaxed))
                }),
            };
            match health.observe(now, obs) {
                HealthAction::Wait => {}
                HealthAction::MarkSuccessful => match (&opts.boot_disk, opts.slot) {
                    (Some(d), Some(s)) => match mark_successful(d, s) {
                        Ok(m) => {
                            log(format!("boot healthy: {m}"));
                            journal_end(opts, journal, End::Healthy);
                        }
                        Err(e) => log(format!(
                            "boot healthy, but marking slot {s} successful failed: {e}"
                        )),
                    },
                    _ => log("boot healthy; no boot disk was passed, so no slot is marked"),
                },
                HealthAction::Reboot => {
                    log(format!(
                        "the node did not become healthy within {} s; rebooting",
                        cfg.health.boot_deadline_secs
                    ));
                    journal_end(opts, journal, End::DeadlineMissed);
                    break 'main ShutdownKind::Reboot;
                }
            }
        }
        if now >= next_pet {
            next_pet = now + pet_every;
            match health.watchdog(now) {
                WatchdogAction::Pet => {
                    if let Some(w) = watchdog.as_mut() {
                        if let Err(e) = w.pet() {
                            log(format!("petting the watchdog failed: {e}"));
                        }
                    }
                }
                WatchdogAction::Starve => {}
                WatchdogAction::Close if nowayout => {
                    if let Some(w) = watchdog.as_mut() {
                        let _ = w.pet();
                    }
                }
                WatchdogAction::Close => {
                    if let Some(w) = watchdog.take() {
                        match w.magic_close() {
                            Ok(()) => log("watchdog disarmed (magic close)"),
                            Err(e) => log(format!("watchdog magic close failed: {e}")),
                        }
                    }
                }
            }
        }
    };

    log(format!("shutting down for {kind:?}"));
    journal_end(
        opts,
        journal,
        match kind {
            ShutdownKind::Reboot => End::Reboot,
            ShutdownKind::PowerOff => End::Shutdown,
        },
    );
    if let Some(s) = &server {
        s.close();
    }
    let mut last_pet = clock();
    sup.shutdown(&clock, &mut || {
        let now = clock();
        if now.saturating_sub(last_pet) >= pet_every {
            last_pet = now;
            if let Some(w) = watchdog.as_mut() {
                let _ = w.pet();
            }
        }
    });
    log(format!(
        "all services stopped; {} orphan(s) were reaped while running",
        sup.orphans_reaped()
    ));
    kind
}

/// The end: sync, unmount STATE (only where it is mounted), and reboot or power off through the
/// kernel. Never returns; if the kernel refuses, PID 1 exits, which the kernel answers with a
/// panic and, with `panic=N` on the command line, a reset.
pub fn finish(kind: ShutdownKind, state_dir: &Path) -> ! {
    super::log::close_file();
    nix::unistd::sync();
    mounts::unmount_state(state_dir);
    nix::unistd::sync();
    let mode = match kind {
        ShutdownKind::Reboot => nix::sys::reboot::RebootMode::RB_AUTOBOOT,
        ShutdownKind::PowerOff => nix::sys::reboot::RebootMode::RB_POWER_OFF,
    };
    log(format!("{kind:?} now"));
    let err = match nix::sys::reboot::reboot(mode) {
        Ok(never) => match never {},
        Err(e) => e,
    };
    log(format!("reboot(2) failed: {err}; exiting"));
    std::process::exit(1)
}

/// After an error or panic nothing supervises any more: stop every process, then
/// [`finish`] with a reboot.
pub fn emergency_reboot(state_dir: &Path) -> ! {
    use nix::sys::signal::kill;
    use nix::unistd::Pid;
    if nix::unistd::getpid().as_raw() == 1 {
        let _ = kill(Pid::from_raw(-1), Signal::SIGTERM);
        let until = Instant::now() + Duration::from_secs(5);
        while Instant::now() < until {
            match nix::sys::wait::waitpid(
                Pid::from_raw(-1),
                Some(nix::sys::wait::WaitPidFlag::WNOHANG),
            ) {
                Err(nix::errno::Errno::ECHILD) => break,
                Ok(nix::sys::wait::WaitStatus::StillAlive) => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                _ => {}
            }
        }
        let _ = kill(Pid::from_raw(-1), Signal::SIGKILL);
    }
    finish(ShutdownKind::Reboot, state_dir)
}
