//! keel-init stage 2 for real as PID 1 of a new PID namespace (`unshare --pid --fork
//! --mount-proc`, as root): supervision with backoff, reaping of orphans, shutdown with grace
//! and SIGKILL, the control socket, boot success on a disk image, a missed boot deadline, and
//! keel-init's RSS with three services.
//!
//! This test binary has its own main (`harness = false`): run with `--helper listen ADDR` it is
//! a small TCP server standing in for keel-agent (the test host has no such server it could
//! rely on). Otherwise it runs the tests below one after another (each owns a PID namespace),
//! printing libtest-style lines; a name filter may be given as the first argument.

// test code with its own main: clippy cannot tell, and failing loudly is the point
#![allow(clippy::panic, clippy::unwrap_used, clippy::expect_used)]

use keelos::block::FileDevice;
use keelos::bootctl::{self, store, Slot};
use keelos::config::{BackoffConfig, NodeConfig, RestartPolicy, ServiceConfig};
use keelos::control::{Client, ServiceState, ServiceStatus};
use keelos::disk::{self, LayoutSpec, MIB};
use std::io::Write;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const KEEL_INIT: &str = env!("CARGO_BIN_EXE_keel-init");
/// Generous bounds on waiting for something that must happen; never asserted as timings.
const PATIENCE: Duration = Duration::from_secs(60);

fn helper(args: &[String]) -> ! {
    match args {
        [mode, addr] if mode == "listen" => {
            let l = std::net::TcpListener::bind(addr.as_str()).expect("helper: bind");
            println!("listening on {addr}");
            std::io::stdout().flush().ok();
            for c in l.incoming() {
                drop(c);
            }
            std::process::exit(0)
        }
        _ => {
            eprintln!("helper: unknown mode {args:?}");
            std::process::exit(2)
        }
    }
}

fn self_exe() -> String {
    std::env::current_exe()
        .expect("current_exe")
        .display()
        .to_string()
}

fn free_addr() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").to_string()
}

fn agent(addr: &str) -> ServiceConfig {
    ServiceConfig::new("keel-agent", &self_exe(), &["--helper", "listen", addr])
}

fn sh(name: &str, script: &str) -> ServiceConfig {
    ServiceConfig::new(name, "/bin/sh", &["-c", script])
}

fn base_config(agent_addr: &str, services: Vec<ServiceConfig>) -> NodeConfig {
    let mut cfg = NodeConfig {
        services,
        ..NodeConfig::default()
    };
    cfg.health.agent_addr = agent_addr.to_string();
    cfg.health.required = vec!["keel-agent".into()];
    // long enough that nothing reboots during a test unless the test wants it
    cfg.health.window_secs = 3000;
    cfg.health.boot_deadline_secs = 6000;
    cfg.watchdog.device = None;
    cfg.shutdown.grace_ms = 1000;
    cfg
}

/// A keel-init running as PID 1 of its own PID namespace.
struct Node {
    unshare: Child,
    dir: tempfile::TempDir,
    sock: PathBuf,
}

impl Node {
    fn start(cfg: &NodeConfig, extra: &[&str]) -> Node {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = dir.path().join("node.json");
        keelos::config::store(&config, cfg).expect("store config");
        let state = dir.path().join("state");
        std::fs::create_dir_all(&state).expect("state dir");
        let sock = dir.path().join("run/init.sock");
        let cmdline = dir.path().join("cmdline");
        std::fs::write(&cmdline, "").expect("cmdline");
        let stderr = std::fs::File::create(dir.path().join("keel-init.stderr")).expect("stderr");
        let unshare = Command::new("unshare")
            .args(["--pid", "--fork", "--mount-proc", "--kill-child", KEEL_INIT])
            .args(["--stage", "2", "--config"])
            .arg(&config)
            .arg("--state-dir")
            .arg(&state)
            .arg("--control")
            .arg(&sock)
            .arg("--cmdline")
            .arg(&cmdline)
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("unshare: util-linux is needed (ci/install-deps)");
        let mut node = Node { unshare, dir, sock };
        let start = Instant::now();
        while Client::connect(&node.sock, Duration::from_secs(5)).is_err() {
            if let Ok(Some(st)) = node.unshare.try_wait() {
                panic!(
                    "unshare/keel-init ended ({st}) before serving; these tests need root. \
                     keel-init said:\n{}",
                    node.init_log()
                );
            }
            if start.elapsed() > PATIENCE {
                panic!("no control socket; keel-init said:\n{}", node.init_log());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        node
    }

    fn client(&self) -> Client {
        Client::connect(&self.sock, Duration::from_secs(10)).expect("connect")
    }

    fn log_dir(&self) -> PathBuf {
        self.dir.path().join("state/log")
    }

    fn service_log(&self, name: &str) -> String {
        std::fs::read_to_string(self.log_dir().join(format!("{name}.log"))).unwrap_or_default()
    }

    fn init_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("keel-init.stderr")).unwrap_or_default()
    }

    /// Poll `f` until it gives a value; fail with keel-init's log after [`PATIENCE`].
    fn wait<T>(&self, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
        let start = Instant::now();
        loop {
            if let Some(v) = f() {
                return v;
            }
            if start.elapsed() > PATIENCE {
                panic!(
                    "gave up waiting for {what}; keel-init said:\n{}",
                    self.init_log()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn wait_services(
        &self,
        what: &str,
        pred: impl Fn(&[ServiceStatus]) -> bool,
    ) -> Vec<ServiceStatus> {
        self.wait(what, || {
            let s = self.client().list_services().ok()?;
            pred(&s).then_some(s)
        })
    }

    /// keel-init's PID in the test's (parent) namespace.
    fn init_host_pid(&self) -> u32 {
        let parent = self.unshare.id();
        self.wait("keel-init's process", || {
            procs()
                .into_iter()
                .find(|p| p.ppid == parent)
                .map(|p| p.pid)
        })
    }

    /// Every process of the namespace, keel-init included.
    fn ns_procs(&self) -> Vec<Proc> {
        let init = self.init_host_pid();
        let ns = std::fs::read_link(format!("/proc/{init}/ns/pid")).ok();
        procs()
            .into_iter()
            .filter(|p| {
                ns.is_some() && std::fs::read_link(format!("/proc/{}/ns/pid", p.pid)).ok() == ns
            })
            .collect()
    }

    /// Wait for keel-init (and so the namespace) to end; the signal that ended it.
    fn wait_end(&mut self) -> Option<i32> {
        let start = Instant::now();
        loop {
            if let Some(st) = self.unshare.try_wait().expect("wait") {
                return st.signal();
            }
            if start.elapsed() > PATIENCE {
                panic!("keel-init did not end; it said:\n{}", self.init_log());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        // --kill-child takes the namespace down with unshare
        let _ = self.unshare.kill();
        let _ = self.unshare.wait();
    }
}

#[derive(Debug, Clone)]
struct Proc {
    pid: u32,
    ppid: u32,
    state: char,
    /// The PID inside the innermost namespace.
    nspid: u32,
    comm: String,
}

fn procs() -> Vec<Proc> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in rd.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // comm may contain spaces: fields after the last ')'
        let (Some(l), Some(r)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        let comm = stat[l + 1..r].to_string();
        let rest: Vec<&str> = stat[r + 2..].split_whitespace().collect();
        let state = rest.first().and_then(|s| s.chars().next()).unwrap_or('?');
        let ppid = rest.get(1).and_then(|s| s.parse().ok()).unwrap_or(0);
        let nspid = std::fs::read_to_string(format!("/proc/{pid}/status"))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("NSpid:"))
                    .and_then(|l| l.split_whitespace().last()?.parse().ok())
            })
            .unwrap_or(pid);
        out.push(Proc {
            pid,
            ppid,
            state,
            nspid,
            comm,
        });
    }
    out
}

fn status<'a>(s: &'a [ServiceStatus], name: &str) -> &'a ServiceStatus {
    s.iter()
        .find(|x| x.name == name)
        .unwrap_or_else(|| panic!("no service {name} in {s:?}"))
}

fn backoff(initial_ms: u64, max_ms: u64) -> BackoffConfig {
    BackoffConfig {
        initial_ms,
        max_ms,
        reset_after_ms: 60_000,
    }
}

// ---------------------------------------------------------------------------------------------

fn a_service_that_exits_is_restarted_with_backoff() {
    let addr = free_addr();
    let mut flaky = sh("flaky", "echo run; exit 3");
    flaky.backoff = backoff(100, 400);
    let mut once = sh("once", "echo done; exit 0");
    once.restart = RestartPolicy::OnFailure;
    let cfg = base_config(&addr, vec![agent(&addr), flaky, once]);
    let node = Node::start(&cfg, &[]);
    let s = node.wait_services("five restarts of flaky", |s| {
        status(s, "flaky").restarts >= 5
    });
    let f = status(&s, "flaky");
    assert_eq!(
        f.last_exit.as_deref(),
        Some("exited with status 3"),
        "{f:?}"
    );
    let log = node.service_log("flaky");
    // the delays keel-init chose, in order: doubling from 100 ms, capped at 400 ms
    let delays: Vec<&str> = log
        .lines()
        .filter_map(|l| l.split("restarting in ").nth(1))
        .take(5)
        .collect();
    assert_eq!(
        delays,
        ["100ms", "200ms", "400ms", "400ms", "400ms"],
        "{log}"
    );
    assert!(log.matches("run\n").count() >= 5, "{log}");
    // on-failure: a clean exit is not restarted
    let o = status(&s, "once");
    assert_eq!((o.state, o.restarts), (ServiceState::Stopped, 0), "{o:?}");
    assert!(node.service_log("once").contains("done\n"));
    println!(
        "    flaky restarted {} times; delays {delays:?}",
        f.restarts
    );
}

fn orphans_are_reaped_and_no_zombie_remains() {
    let addr = free_addr();
    let dir = tempfile::tempdir().expect("tempdir");
    let pids = dir.path().join("orphans");
    // each subshell starts a short sleep in the background and exits at once: the sleeps are
    // orphaned, re-parented to PID 1, and end as zombies unless PID 1 reaps them
    let script = format!(
        "for i in 1 2 3 4 5; do (sleep 0.3 & echo $! >> {p}); done; echo forked; exec sleep 1000",
        p = pids.display()
    );
    let cfg = base_config(&addr, vec![agent(&addr), sh("forker", &script)]);
    let node = Node::start(&cfg, &[]);
    let orphans: Vec<u32> = node.wait("five orphans", || {
        let t = std::fs::read_to_string(&pids).ok()?;
        let v: Vec<u32> = t.lines().filter_map(|l| l.trim().parse().ok()).collect();
        (v.len() == 5).then_some(v)
    });
    // all gone: a zombie disappears only when its parent, PID 1, reaps it
    node.wait("the orphans to be reaped", || {
        let left: Vec<Proc> = node
            .ns_procs()
            .into_iter()
            .filter(|p| orphans.contains(&p.nspid))
            .collect();
        left.is_empty().then_some(())
    });
    let zombies: Vec<Proc> = node
        .ns_procs()
        .into_iter()
        .filter(|p| p.state == 'Z')
        .collect();
    assert!(
        zombies.is_empty(),
        "zombies left in the namespace: {zombies:?}"
    );
    let all = node.ns_procs();
    let init = all
        .iter()
        .find(|p| p.nspid == 1)
        .expect("PID 1 in the namespace");
    assert!(init.comm.starts_with("keel-init"), "{init:?}");
    let s = node.client().list_services().expect("list");
    let f = status(&s, "forker");
    assert_eq!((f.state, f.restarts), (ServiceState::Running, 0), "{f:?}");
    println!(
        "    orphans {orphans:?} reaped; namespace now holds {:?}",
        all.iter()
            .map(|p| (p.nspid, p.comm.as_str()))
            .collect::<Vec<_>>()
    );
}

fn shutdown_stops_all_in_reverse_order_and_kills_what_ignores_sigterm() {
    let addr = free_addr();
    let stubborn = sh(
        "stubborn",
        "trap '' TERM; echo ready; while :; do sleep 1; done",
    );
    let mut polite = ServiceConfig::new("polite", "/bin/sleep", &["1000"]);
    polite.after = vec!["stubborn".into()];
    let cfg = base_config(&addr, vec![agent(&addr), stubborn, polite]);
    let mut node = Node::start(&cfg, &[]);
    node.wait_services("all running", |s| {
        s.iter().all(|x| x.state == ServiceState::Running)
    });
    node.wait("stubborn's trap", || {
        node.service_log("stubborn").contains("ready").then_some(())
    });
    let t = Instant::now();
    node.client().power_off().expect("power off");
    let sig = node.wait_end();
    let took = t.elapsed();
    // in a PID namespace, reboot(2) by its PID 1 ends it with SIGINT for a power off
    assert_eq!(sig, Some(libc::SIGINT), "{}", node.init_log());
    let log = node.init_log();
    let stops: Vec<&str> = log
        .lines()
        .filter(|l| l.contains(": stopping: SIGTERM"))
        .filter_map(|l| l.split("] ").nth(1)?.split(':').next())
        .collect();
    assert_eq!(stops, ["polite", "stubborn", "keel-agent"], "{log}");
    // polite ended by SIGTERM, within the grace period; stubborn needed SIGKILL after it
    assert!(
        node.service_log("polite")
            .contains("killed by signal SIGTERM"),
        "{}",
        node.service_log("polite")
    );
    let st = node.service_log("stubborn");
    assert!(
        st.contains("did not stop within the grace period; sending SIGKILL"),
        "{st}"
    );
    assert!(st.contains("killed by signal SIGKILL"), "{st}");
    assert!(log.contains("PowerOff now"), "{log}");
    println!("    power off with a 1 s grace period took {took:?}");
}

fn control_socket_rss_and_reboot_with_three_services() {
    let addr = free_addr();
    let chatty = sh(
        "chatty",
        "i=0; while :; do i=$((i+1)); echo line $i; sleep 0.05; done",
    );
    let idle = ServiceConfig::new("idle", "/bin/sleep", &["1000"]);
    let cfg = base_config(&addr, vec![agent(&addr), chatty, idle]);
    let mut node = Node::start(&cfg, &[]);
    let s = node.wait_services("three running", |s| {
        s.iter().all(|x| x.state == ServiceState::Running)
    });
    assert_eq!(s.len(), 3);
    // let the log threads and the control thread exist, then measure
    let _ = node.client().logs("chatty", Some(100)).expect("logs");
    let init = node.init_host_pid();
    let status_text = std::fs::read_to_string(format!("/proc/{init}/status")).expect("status");
    let field = |k: &str| {
        status_text
            .lines()
            .find(|l| l.starts_with(k))
            .map(|l| l.trim_start_matches(k).trim().to_string())
            .unwrap_or_default()
    };
    println!(
        "    keel-init as PID 1 with 3 services (debug build): VmRSS {}, VmHWM {}, threads {}",
        field("VmRSS:"),
        field("VmHWM:"),
        field("Threads:")
    );

    // restart one: a new pid, one restart counted
    let idle_pid = status(&s, "idle").pid.expect("pid");
    node.client().restart("idle").expect("restart");
    let s = node.wait_services("idle restarted", |s| {
        let i = status(s, "idle");
        i.state == ServiceState::Running && i.pid != Some(idle_pid)
    });
    assert_eq!(status(&s, "idle").restarts, 1);
    let err = node.client().restart("nope").unwrap_err();
    assert!(err.to_string().contains("no service \"nope\""), "{err}");

    // logs: the tail, then following new lines
    let tail = node.client().logs("chatty", Some(4096)).expect("logs");
    assert!(tail.contains("line "), "{tail}");
    let last: u64 = tail
        .lines()
        .filter_map(|l| l.strip_prefix("line ")?.parse().ok())
        .max()
        .expect("a numbered line");
    let mut follow = node
        .client()
        .follow_logs("chatty", Some(0))
        .expect("follow");
    let mut seen = String::new();
    let newer = loop {
        let chunk = follow.next().expect("the stream goes on").expect("chunk");
        seen.push_str(&chunk);
        let n = seen
            .lines()
            .filter_map(|l| l.strip_prefix("line ")?.parse::<u64>().ok())
            .max();
        if let Some(n) = n.filter(|n| *n > last + 3) {
            break n;
        }
    };
    drop(follow);
    println!("    followed chatty's log from line {last} to {newer}");

    // keel-init's own log is readable the same way
    let own = node
        .client()
        .logs("keel-init", None)
        .expect("keel-init's log");
    assert!(own.contains("idle: restart requested"), "{own}");

    // a client of another protocol version is told which one this is
    let mut raw = std::os::unix::net::UnixStream::connect(&node.sock).expect("connect raw");
    raw.write_all(b"{\"v\":9,\"op\":\"list_services\"}\n")
        .expect("write");
    let mut line = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(&raw), &mut line).expect("read");
    assert!(
        line.contains("protocol version 9 is not supported") && line.contains("version 1"),
        "{line}"
    );

    node.client().reboot().expect("reboot");
    // a reboot(2) by the namespace's PID 1 ends it with SIGHUP
    assert_eq!(node.wait_end(), Some(libc::SIGHUP), "{}", node.init_log());
}

fn a_reload_takes_on_changed_added_and_removed_services() {
    let addr = free_addr();
    let idle = ServiceConfig::new("idle", "/bin/sleep", &["1000"]);
    let other = ServiceConfig::new("other", "/bin/sleep", &["1001"]);
    let cfg = base_config(&addr, vec![agent(&addr), idle, other]);
    let node = Node::start(&cfg, &[]);
    let s = node.wait_services("three running", |s| {
        s.iter().all(|x| x.state == ServiceState::Running)
    });
    let other_pid = status(&s, "other").pid;

    // the stored configuration changes: idle's arguments, other's too (not reloaded), and a
    // new service
    let mut next = cfg.clone();
    next.services[1].args = vec!["2000".into()];
    next.services[2].args = vec!["2001".into()];
    next.services
        .push(ServiceConfig::new("added", "/bin/sleep", &["3000"]));
    keelos::config::store(&node.dir.path().join("node.json"), &next).expect("store");
    let changes = node
        .client()
        .reload(&["idle".to_string(), "added".to_string()])
        .expect("reload");
    assert_eq!(
        changes,
        [
            "idle: restarted with its new configuration",
            "added: added and started"
        ]
    );
    let s = node.wait_services("idle restarted and added running", |s| {
        s.len() == 4
            && status(s, "idle").restarts == 1
            && s.iter().all(|x| x.state == ServiceState::Running)
    });
    // the added service's log can be asked for
    node.client()
        .logs("added", None)
        .expect("the added service's log");
    // other was not named: same process, old arguments
    assert_eq!(status(&s, "other").pid, other_pid);
    let cmdline = |pid: i32| {
        let host = node
            .ns_procs()
            .into_iter()
            .find(|p| p.nspid == pid as u32)
            .expect("the process");
        std::fs::read_to_string(format!("/proc/{}/cmdline", host.pid)).unwrap_or_default()
    };
    assert!(cmdline(status(&s, "idle").pid.unwrap()).contains("2000"));
    assert!(cmdline(status(&s, "other").pid.unwrap()).contains("1001"));

    // the same reload again changes nothing
    let again = node.client().reload(&["idle".to_string()]).expect("reload");
    assert!(again.is_empty(), "{again:?}");

    // removed from the configuration: stopped for good
    next.services.retain(|x| x.name != "added");
    keelos::config::store(&node.dir.path().join("node.json"), &next).expect("store");
    let changes = node
        .client()
        .reload(&["added".to_string()])
        .expect("reload");
    assert_eq!(changes, ["added: no longer configured, stopped"]);
    node.wait_services("added stopped", |s| {
        status(s, "added").state == ServiceState::Stopped
    });

    // a stored configuration keel-init cannot read changes nothing
    std::fs::write(
        node.dir.path().join("node.json"),
        "{\"version\": 1, \"services\": 7}",
    )
    .expect("write");
    let err = node
        .client()
        .reload(&["idle".to_string(), "other".to_string()])
        .unwrap_err();
    assert!(
        err.to_string().contains("the stored configuration"),
        "{err}"
    );
    let s = node.client().list_services().expect("list");
    assert_eq!(status(&s, "other").pid, other_pid);
}

fn missing_binaries_are_reported_not_fatal() {
    let addr = free_addr();
    let missing = ServiceConfig::new("containerd", "/nonexistent/containerd", &[]);
    // (not kubelet: keel-init drops kubelet from a node without a kubernetes section)
    let mut optional = ServiceConfig::new("optional-tool", "/nonexistent/optional-tool", &[]);
    optional.optional = true;
    let mut needs_disk = ServiceConfig::new("diskuser", "/bin/sleep", &["{boot_disk}"]);
    needs_disk.restart = RestartPolicy::Always;
    let cfg = base_config(&addr, vec![agent(&addr), missing, optional, needs_disk]);
    let node = Node::start(&cfg, &[]);
    let s = node.wait_services("the agent running", |s| {
        status(s, "keel-agent").state == ServiceState::Running
            && status(s, "containerd").state == ServiceState::Failed
    });
    let c = status(&s, "containerd");
    assert!(
        c.error
            .as_deref()
            .unwrap_or("")
            .contains("/nonexistent/containerd is missing"),
        "{c:?}"
    );
    assert_eq!(status(&s, "optional-tool").state, ServiceState::Absent);
    let d = status(&s, "diskuser");
    assert_eq!(d.state, ServiceState::Failed, "{d:?}");
    assert!(
        d.error.as_deref().unwrap_or("").contains("{boot_disk}"),
        "{d:?}"
    );
    // keel-init is still there and serving
    assert!(node.client().list_services().is_ok());
}

/// A disk image whose slot B is activated for its first boots (A successful).
fn disk_with_b_trying(path: &Path) {
    let f = std::fs::File::create(path).expect("create image");
    f.set_len(48 * MIB).expect("size");
    drop(f);
    let mut dev = FileDevice::open(path, true).expect("open image");
    disk::create(
        &mut dev,
        LayoutSpec {
            esp_size: MIB,
            root_size: 8 * MIB,
            state_size: None,
        },
    )
    .expect("create layout");
    store::update(&mut dev, |f| bootctl::activate(f, Slot::A, None, 3)).expect("activate A");
    store::update(&mut dev, |f| bootctl::mark_successful(f, Slot::A)).expect("A ok");
    store::update(&mut dev, |f| {
        bootctl::activate(f, Slot::B, Some(Slot::A), 3)
    })
    .expect("activate B");
}

fn flags(path: &Path) -> bootctl::SlotFlags {
    let dev = FileDevice::open(path, false).expect("open image");
    store::load(&dev).expect("load").1
}

fn a_healthy_boot_marks_the_running_slot_successful() {
    let addr = free_addr();
    let dir = tempfile::tempdir().expect("tempdir");
    let img = dir.path().join("disk.img");
    disk_with_b_trying(&img);
    assert!(!flags(&img).b.successful());
    let mut other = ServiceConfig::new("other", "/bin/sleep", &["1000"]);
    other.after = vec!["keel-agent".into()];
    let mut cfg = base_config(&addr, vec![agent(&addr), other]);
    cfg.health.required = vec!["keel-agent".into(), "other".into()];
    cfg.health.window_secs = 2;
    cfg.health.boot_deadline_secs = 600;
    let img_arg = img.display().to_string();
    let node = Node::start(&cfg, &["--boot-disk", &img_arg, "--slot", "b"]);
    node.wait("slot b marked successful", || {
        (flags(&img).b.successful()
            && node
                .init_log()
                .contains("boot healthy: slot b marked successful"))
        .then_some(())
    });
    let f = flags(&img);
    assert_eq!((f.b.successful(), f.b.tries()), (true, 0), "{f:?}");
    assert!(f.a.successful(), "A is untouched: {f:?}");
}

fn a_missed_boot_deadline_reboots_without_marking() {
    let addr = free_addr();
    let dir = tempfile::tempdir().expect("tempdir");
    let img = dir.path().join("disk.img");
    disk_with_b_trying(&img);
    // an "agent" that never serves
    let not_serving = ServiceConfig::new("keel-agent", "/bin/sleep", &["1000"]);
    let mut cfg = base_config(&addr, vec![not_serving]);
    cfg.health.window_secs = 1;
    cfg.health.boot_deadline_secs = 3;
    let img_arg = img.display().to_string();
    let mut node = Node::start(&cfg, &["--boot-disk", &img_arg, "--slot", "b"]);
    assert_eq!(node.wait_end(), Some(libc::SIGHUP), "{}", node.init_log());
    let log = node.init_log();
    assert!(
        log.contains("did not become healthy within 3 s; rebooting"),
        "{log}"
    );
    let f = flags(&img);
    assert!(!f.b.successful(), "{f:?}");
}

fn outside_a_pid_namespace_keel_init_refuses_to_run() {
    let out = Command::new(KEEL_INIT)
        .args(["--stage", "2"])
        .output()
        .expect("run keel-init");
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("must run as PID 1") && err.contains("unshare --pid"),
        "{err}"
    );
}

// ---------------------------------------------------------------------------------------------

type Test = (&'static str, fn());

const TESTS: &[Test] = &[
    (
        "a_reload_takes_on_changed_added_and_removed_services",
        a_reload_takes_on_changed_added_and_removed_services,
    ),
    (
        "outside_a_pid_namespace_keel_init_refuses_to_run",
        outside_a_pid_namespace_keel_init_refuses_to_run,
    ),
    (
        "a_service_that_exits_is_restarted_with_backoff",
        a_service_that_exits_is_restarted_with_backoff,
    ),
    (
        "orphans_are_reaped_and_no_zombie_remains",
        orphans_are_reaped_and_no_zombie_remains,
    ),
    (
        "shutdown_stops_all_in_reverse_order_and_kills_what_ignores_sigterm",
        shutdown_stops_all_in_reverse_order_and_kills_what_ignores_sigterm,
    ),
    (
        "control_socket_rss_and_reboot_with_three_services",
        control_socket_rss_and_reboot_with_three_services,
    ),
    (
        "missing_binaries_are_reported_not_fatal",
        missing_binaries_are_reported_not_fatal,
    ),
    (
        "a_healthy_boot_marks_the_running_slot_successful",
        a_healthy_boot_marks_the_running_slot_successful,
    ),
    (
        "a_missed_boot_deadline_reboots_without_marking",
        a_missed_boot_deadline_reboots_without_marking,
    ),
];

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("--helper") {
        helper(&args[1..]);
    }
    // libtest options cargo may pass (--nocapture, --test-threads ...) are accepted and unused
    let filter = args.iter().find(|a| !a.starts_with('-'));
    if args.iter().any(|a| a == "--list") {
        for (name, _) in TESTS {
            println!("{name}: test");
        }
        return;
    }
    let chosen: Vec<&Test> = TESTS
        .iter()
        .filter(|(n, _)| filter.is_none_or(|f| n.contains(f.as_str())))
        .collect();
    println!("\nrunning {} tests", chosen.len());
    let mut failed = Vec::new();
    for (name, f) in &chosen {
        print!("test {name} ... ");
        std::io::stdout().flush().ok();
        match std::panic::catch_unwind(f) {
            Ok(()) => println!("ok"),
            Err(_) => {
                println!("\ntest {name} ... FAILED");
                failed.push(*name);
            }
        }
    }
    let ok = chosen.len() - failed.len();
    if failed.is_empty() {
        println!("\ntest result: ok. {ok} passed; 0 failed");
    } else {
        println!(
            "\nfailures: {failed:?}\ntest result: FAILED. {ok} passed; {} failed",
            failed.len()
        );
        std::process::exit(101);
    }
}
