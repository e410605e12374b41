//! The service supervisor: starts services in dependency order, restarts them with backoff,
//! reaps every child (orphans included), stops them for restarts and shutdown, and reports
//! their state. Time comes in as `now` (time since stage 2 started); the only I/O is spawning,
//! signalling and waiting, plus the log files of the services.
//!
//! Each service runs in its own process group (so a stop reaches the processes it forked), with
//! stdin from /dev/null and stdout/stderr into a pipe that a thread copies into its rotated log
//! file. Services never inherit keel-init's environment or file descriptors.

use super::backoff;
use super::log;
use super::logfile::{log_path, LogFile};
use super::order::{start_order, OrderError};
use crate::bootctl::Slot;
use crate::config::{LogConfig, NodeConfig, ServiceConfig};
use crate::control::{ServiceState, ServiceStatus};
use nix::errno::Errno;
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// What keel-init knows of the node, for filling in service arguments.
#[derive(Debug, Clone, Default)]
pub struct NodeFacts {
    pub boot_disk: Option<PathBuf>,
    pub slot: Option<Slot>,
    pub state_dir: PathBuf,
    pub control: PathBuf,
}

/// Replace `{boot_disk}`, `{slot}`, `{state_dir}` and `{control}` in `args`. A placeholder
/// whose value is unknown is an error naming it, so the service is reported rather than started
/// with a meaningless argument.
pub fn expand_args(args: &[String], facts: &NodeFacts) -> Result<Vec<String>, String> {
    let disk = facts.boot_disk.as_ref().map(|p| p.display().to_string());
    let slot = facts.slot.map(|s| s.letter().to_string());
    let vars: [(&str, Option<String>); 4] = [
        ("{boot_disk}", disk),
        ("{slot}", slot),
        ("{state_dir}", Some(facts.state_dir.display().to_string())),
        ("{control}", Some(facts.control.display().to_string())),
    ];
    args.iter()
        .map(|a| {
            let mut out = a.clone();
            for (k, v) in &vars {
                if out.contains(k) {
                    match v {
                        Some(v) => out = out.replace(k, v),
                        None => {
                            return Err(format!(
                                "argument {a:?} needs {k}, which stage 1 did not pass to \
                                 keel-init"
                            ))
                        }
                    }
                }
            }
            Ok(out)
        })
        .collect()
}

/// How a run ended, in words.
pub fn describe_exit(status: &WaitStatus) -> (String, bool) {
    match *status {
        WaitStatus::Exited(_, 0) => ("exited with status 0".to_string(), true),
        WaitStatus::Exited(_, c) => (format!("exited with status {c}"), false),
        WaitStatus::Signaled(_, s, core) => (
            format!(
                "killed by signal {}{}",
                s.as_str(),
                if core { " (core dumped)" } else { "" }
            ),
            false,
        ),
        ref other => (format!("ended: {other:?}"), false),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AfterStop {
    Restart,
    Stay,
}

#[derive(Debug, Clone, PartialEq)]
enum Run {
    Waiting,
    Running {
        pid: Pid,
        since: Duration,
    },
    Backoff {
        until: Duration,
    },
    Stopping {
        pid: Pid,
        since: Duration,
        deadline: Duration,
        killed: bool,
        then: AfterStop,
    },
    Stopped,
    Failed(String),
    Absent,
}

#[derive(Debug)]
struct Service {
    cfg: ServiceConfig,
    run: Run,
    starts: u32,
    failures: u32,
    last_exit: Option<String>,
    log: Arc<Mutex<Option<LogFile>>>,
}

/// Every supervised service and what is known of it.
#[derive(Debug)]
pub struct Supervisor {
    services: Vec<Service>,
    order: Vec<usize>,
    facts: NodeFacts,
    log_dir: PathBuf,
    grace: Duration,
    shutting_down: bool,
    orphans_reaped: u64,
}

fn signal_group(pid: Pid, sig: Signal) {
    // the process group first (the service and what it forked), then the process itself in
    // case it left its group
    let _ = kill(Pid::from_raw(-pid.as_raw()), sig);
    let _ = kill(pid, sig);
}

impl Supervisor {
    /// Set up the services of `cfg`. Log files go to `log_dir`, which is created.
    pub fn new(cfg: &NodeConfig, facts: NodeFacts, log_dir: PathBuf) -> Result<Self, OrderError> {
        let order = start_order(&cfg.services)?;
        if let Err(e) = std::fs::create_dir_all(&log_dir) {
            log(format!(
                "cannot create the log directory {}: {e}; service output is lost",
                log_dir.display()
            ));
        }
        let services = cfg
            .services
            .iter()
            .map(|s| Service {
                log: Arc::new(Mutex::new(open_log(&log_dir, &s.name, &cfg.logs))),
                cfg: s.clone(),
                run: Run::Waiting,
                starts: 0,
                failures: 0,
                last_exit: None,
            })
            .collect();
        Ok(Supervisor {
            services,
            order,
            facts,
            log_dir,
            grace: Duration::from_millis(cfg.shutdown.grace_ms),
            shutting_down: false,
            orphans_reaped: 0,
        })
    }

    pub fn log_dir(&self) -> &Path {
        &self.log_dir
    }

    pub fn names(&self) -> Vec<String> {
        self.services.iter().map(|s| s.cfg.name.clone()).collect()
    }

    /// Orphans (processes that were no service's main process) reaped so far.
    pub fn orphans_reaped(&self) -> u64 {
        self.orphans_reaped
    }

    fn deps_ready(&self, i: usize) -> bool {
        self.services[i].cfg.after.iter().all(|d| {
            self.services
                .iter()
                .find(|s| &s.cfg.name == d)
                .is_some_and(|s| matches!(s.run, Run::Running { .. } | Run::Absent))
        })
    }

    /// Start what is due, escalate stops whose grace has run out. Call after every event and
    /// at least at [`Supervisor::next_deadline`].
    pub fn tick(&mut self, now: Duration) {
        for s in &mut self.services {
            if let Run::Stopping {
                pid,
                deadline,
                killed: false,
                ..
            } = s.run
            {
                if now >= deadline {
                    note(
                        s,
                        &format!("did not stop within the grace period; sending SIGKILL to {pid}"),
                    );
                    signal_group(pid, Signal::SIGKILL);
                    if let Run::Stopping { killed, .. } = &mut s.run {
                        *killed = true;
                    }
                }
            }
        }
        if self.shutting_down {
            return;
        }
        for k in 0..self.order.len() {
            let i = self.order[k];
            let due = match self.services[i].run {
                Run::Waiting => true,
                Run::Backoff { until } => now >= until,
                _ => false,
            };
            if due && self.deps_ready(i) {
                self.start(i, now);
            }
        }
    }

    fn start(&mut self, i: usize, now: Duration) {
        let facts = self.facts.clone();
        let s = &mut self.services[i];
        let path = Path::new(&s.cfg.path);
        if !path.is_file() {
            if s.cfg.optional {
                log(format!(
                    "{}: {} is not in this image; the optional service is not started",
                    s.cfg.name, s.cfg.path
                ));
                s.run = Run::Absent;
            } else {
                let e = format!(
                    "the binary {} is missing from the image; the service cannot run",
                    s.cfg.path
                );
                note(s, &e);
                s.run = Run::Failed(e);
            }
            return;
        }
        let args = match expand_args(&s.cfg.args, &facts) {
            Ok(a) => a,
            Err(e) => {
                note(s, &e);
                s.run = Run::Failed(e);
                return;
            }
        };
        match spawn(&s.cfg, &args, s.log.clone()) {
            Ok(pid) => {
                if s.starts > 0 {
                    note(s, &format!("restarted as pid {pid} (restart {})", s.starts));
                } else {
                    note(s, &format!("started as pid {pid}"));
                }
                s.starts += 1;
                s.run = Run::Running { pid, since: now };
            }
            Err(e) => {
                s.failures = s.failures.saturating_add(1);
                let d = backoff::delay(s.failures, &s.cfg.backoff);
                let msg = format!("could not start {}: {e}; retrying in {d:?}", s.cfg.path);
                note(s, &msg);
                s.last_exit = Some(format!("could not start: {e}"));
                s.run = Run::Backoff { until: now + d };
            }
        }
    }

    /// Reap every child that has ended and act on each. Returns how many were reaped.
    pub fn reap(&mut self, now: Duration) -> usize {
        let mut n = 0;
        loop {
            match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) => break,
                Ok(status) => {
                    if let Some(pid) = status.pid() {
                        n += 1;
                        self.on_exit(pid, &status, now);
                    }
                }
                Err(Errno::EINTR) => continue,
                Err(_) => break, // ECHILD: no children left
            }
        }
        n
    }

    fn on_exit(&mut self, pid: Pid, status: &WaitStatus, now: Duration) {
        let shutting_down = self.shutting_down;
        let Some(s) = self.services.iter_mut().find(|s| match s.run {
            Run::Running { pid: p, .. } | Run::Stopping { pid: p, .. } => p == pid,
            _ => false,
        }) else {
            self.orphans_reaped += 1;
            return;
        };
        let (words, ok) = describe_exit(status);
        s.last_exit = Some(words.clone());
        // the rest of its group goes with it: a service's helpers do not outlive it. Only the
        // group: the pid itself is free for reuse now that it has been reaped.
        let _ = kill(Pid::from_raw(-pid.as_raw()), Signal::SIGKILL);
        match s.run.clone() {
            Run::Running { since, .. } => {
                let ran = now.saturating_sub(since);
                s.failures = backoff::next_failures(s.failures, ran, &s.cfg.backoff);
                if !shutting_down && backoff::should_restart(s.cfg.restart, ok) {
                    let d = backoff::delay(s.failures, &s.cfg.backoff);
                    note(
                        s,
                        &format!("pid {pid} {words} after {ran:?}; restarting in {d:?}"),
                    );
                    s.run = Run::Backoff { until: now + d };
                } else {
                    note(s, &format!("pid {pid} {words}; not restarting"));
                    s.run = Run::Stopped;
                }
            }
            Run::Stopping { then, .. } => {
                note(s, &format!("pid {pid} {words}"));
                s.run = if then == AfterStop::Restart && !shutting_down {
                    s.failures = 0;
                    Run::Waiting
                } else {
                    Run::Stopped
                };
            }
            _ => {}
        }
        if !shutting_down {
            self.tick(now);
        }
    }

    /// Stop `name` and start it again (immediately, not after a backoff delay).
    pub fn restart(&mut self, name: &str, now: Duration) -> Result<(), String> {
        if self.shutting_down {
            return Err("the node is shutting down".to_string());
        }
        let grace = self.grace;
        let s = self
            .services
            .iter_mut()
            .find(|s| s.cfg.name == name)
            .ok_or_else(|| format!("there is no service {name:?}"))?;
        if s.run == Run::Absent {
            return Err(format!("{name} is not in this image"));
        }
        s.failures = 0;
        stop_then(s, AfterStop::Restart, "restart requested", grace, now);
        self.tick(now);
        Ok(())
    }

    /// Take on `cfg`'s version of the services named in `names` while running (a configuration
    /// applied by the operator): one that is new is added and started in order, one whose
    /// configuration changed is stopped and started again with it, one no longer configured is
    /// stopped for good; `restart` names more to start again even though their configuration is
    /// the same (their files changed). Services not in `names` keep what they run with. Nothing
    /// changes when the result cannot be ordered. Returns what was done, in words.
    pub fn reconfigure(
        &mut self,
        cfg: &NodeConfig,
        names: &[String],
        restart: &[String],
        now: Duration,
    ) -> Result<Vec<String>, String> {
        if self.shutting_down {
            return Err("the node is shutting down".to_string());
        }
        let wanted = |n: &str| names.iter().any(|x| x == n);
        // the services after the change, in the new configuration's order, then the others
        let mut next: Vec<ServiceConfig> = Vec::new();
        for c in &cfg.services {
            match self.services.iter().find(|s| s.cfg.name == c.name) {
                Some(s) if !wanted(&c.name) => next.push(s.cfg.clone()),
                Some(_) => next.push(c.clone()),
                None if wanted(&c.name) => next.push(c.clone()),
                None => {}
            }
        }
        let removed: Vec<String> = self
            .services
            .iter()
            .map(|s| s.cfg.name.clone())
            .filter(|n| wanted(n) && !cfg.services.iter().any(|c| &c.name == n))
            .collect();
        // services not in the new configuration stay listed: kept as they are when not named,
        // stopped below when named
        for s in &self.services {
            if !next.iter().any(|c| c.name == s.cfg.name) {
                next.push(s.cfg.clone());
            }
        }
        let live: Vec<ServiceConfig> = next
            .iter()
            .filter(|c| !removed.contains(&c.name))
            .cloned()
            .collect();
        start_order(&live).map_err(|e| e.to_string())?;

        let mut done = Vec::new();
        let mut old = std::mem::take(&mut self.services);
        for c in &next {
            let s = match old.iter().position(|s| s.cfg.name == c.name) {
                Some(i) => {
                    let mut s = old.remove(i);
                    let changed = s.cfg != *c;
                    s.cfg = c.clone();
                    if changed || restart.contains(&c.name) {
                        done.push(format!(
                            "{}: restarted{}",
                            c.name,
                            if changed {
                                " with its new configuration"
                            } else {
                                ""
                            }
                        ));
                        s.failures = 0;
                        stop_then(
                            &mut s,
                            AfterStop::Restart,
                            "configuration changed",
                            self.grace,
                            now,
                        );
                    }
                    s
                }
                None => {
                    done.push(format!("{}: added and started", c.name));
                    Service {
                        log: Arc::new(Mutex::new(open_log(&self.log_dir, &c.name, &cfg.logs))),
                        cfg: c.clone(),
                        run: Run::Waiting,
                        starts: 0,
                        failures: 0,
                        last_exit: None,
                    }
                }
            };
            self.services.push(s);
        }
        for name in &removed {
            let grace = self.grace;
            if let Some(s) = self.services.iter_mut().find(|s| &s.cfg.name == name) {
                stop_then(s, AfterStop::Stay, "no longer configured", grace, now);
                done.push(format!("{name}: no longer configured, stopped"));
            }
        }
        let live: Vec<ServiceConfig> = self.services.iter().map(|s| s.cfg.clone()).collect();
        // removed services stay listed (stopping, then stopped) but out of the start order
        self.order = start_order(&live)
            .map_err(|e| e.to_string())?
            .into_iter()
            .filter(|&i| !removed.contains(&self.services[i].cfg.name))
            .collect();
        self.tick(now);
        Ok(done)
    }

    /// The state of every service, in configuration order.
    pub fn status(&self, now: Duration) -> Vec<ServiceStatus> {
        self.services
            .iter()
            .map(|s| {
                let (state, pid, since, error) = match &s.run {
                    Run::Waiting => (ServiceState::Waiting, None, None, None),
                    Run::Running { pid, since } => {
                        (ServiceState::Running, Some(*pid), Some(*since), None)
                    }
                    Run::Backoff { .. } => (ServiceState::Backoff, None, None, None),
                    Run::Stopping { pid, since, .. } => {
                        (ServiceState::Stopping, Some(*pid), Some(*since), None)
                    }
                    Run::Stopped => (ServiceState::Stopped, None, None, None),
                    Run::Failed(e) => (ServiceState::Failed, None, None, Some(e.clone())),
                    Run::Absent => (ServiceState::Absent, None, None, None),
                };
                ServiceStatus {
                    name: s.cfg.name.clone(),
                    state,
                    pid: pid.map(|p| p.as_raw()),
                    restarts: s.starts.saturating_sub(1),
                    uptime_secs: since.map(|t| now.saturating_sub(t).as_secs()),
                    last_exit: s.last_exit.clone(),
                    error,
                    rss_kib: None,
                }
            })
            .collect()
    }

    /// The latest start among `required` that are running; `None` if one of them is not. An
    /// optional service the image does not have counts as up.
    pub fn required_up_since(&self, required: &[String]) -> Option<Duration> {
        let mut latest = Duration::ZERO;
        for r in required {
            let s = self.services.iter().find(|s| &s.cfg.name == r)?;
            match s.run {
                Run::Running { since, .. } => latest = latest.max(since),
                Run::Absent => {}
                _ => return None,
            }
        }
        Some(latest)
    }

    /// The next instant at which [`Supervisor::tick`] has something to do.
    pub fn next_deadline(&self) -> Option<Duration> {
        self.services
            .iter()
            .filter_map(|s| match s.run {
                Run::Backoff { until } => Some(until),
                Run::Stopping {
                    deadline,
                    killed: false,
                    ..
                } => Some(deadline),
                _ => None,
            })
            .min()
    }

    fn live_pid(&self, i: usize) -> Option<Pid> {
        match self.services[i].run {
            Run::Running { pid, .. } | Run::Stopping { pid, .. } => Some(pid),
            _ => None,
        }
    }

    /// Stop every service in reverse start order (SIGTERM, the grace period, SIGKILL), then
    /// every other process left, and reap them all. Blocks; `clock` gives `now`, `idle` is
    /// called while waiting (the watchdog is petted there).
    pub fn shutdown(&mut self, clock: &dyn Fn() -> Duration, idle: &mut dyn FnMut()) {
        self.shutting_down = true;
        let step = Duration::from_millis(20);
        let grace = self.grace;
        for k in (0..self.order.len()).rev() {
            let i = self.order[k];
            let Some(pid) = self.live_pid(i) else {
                continue;
            };
            let now = clock();
            {
                let s = &mut self.services[i];
                note(s, &format!("stopping: SIGTERM to {pid}"));
                signal_group(pid, Signal::SIGTERM);
                let since = match s.run {
                    Run::Running { since, .. } | Run::Stopping { since, .. } => since,
                    _ => now,
                };
                s.run = Run::Stopping {
                    pid,
                    since,
                    deadline: now + grace,
                    killed: false,
                    then: AfterStop::Stay,
                };
            }
            // SIGKILL cannot be refused, but a process stuck in the kernel can delay its exit;
            // do not wait for it forever
            let give_up = now + grace + Duration::from_secs(10);
            while self.live_pid(i).is_some() {
                let now = clock();
                self.reap(now);
                self.tick(now);
                if now >= give_up {
                    note(
                        &mut self.services[i],
                        "still not gone after SIGKILL; giving up on it",
                    );
                    break;
                }
                idle();
                std::thread::sleep(step);
            }
        }
        // whatever is left (orphans, helpers that left their group)
        let left = |sig| kill(Pid::from_raw(-1), sig).is_ok();
        if left(Signal::SIGTERM) {
            log("sending SIGTERM to the processes that are left");
            let deadline = clock() + grace;
            while clock() < deadline {
                let now = clock();
                self.reap(now);
                if no_children() {
                    break;
                }
                idle();
                std::thread::sleep(step);
            }
            if left(Signal::SIGKILL) {
                log("sent SIGKILL to the processes that are left");
            }
        }
        let deadline = clock() + Duration::from_secs(10);
        while clock() < deadline {
            self.reap(clock());
            if no_children() {
                break;
            }
            idle();
            std::thread::sleep(step);
        }
        // close the log files now, not when the copying threads notice the end of their pipes:
        // STATE is unmounted next
        for s in &self.services {
            if let Ok(mut g) = s.log.lock() {
                *g = None;
            }
        }
    }
}

fn no_children() -> bool {
    matches!(
        waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)),
        Err(Errno::ECHILD)
    )
}

/// Stop `s` (SIGTERM now, SIGKILL after the grace period) and then `then`; a service that
/// is not running goes straight to waiting (`Restart`) or stopped (`Stay`). `why` goes into
/// its log.
fn stop_then(s: &mut Service, then: AfterStop, why: &str, grace: Duration, now: Duration) {
    match &mut s.run {
        Run::Running { pid, since } => {
            let (pid, since) = (*pid, *since);
            note(s, &format!("{why}; sending SIGTERM to {pid}"));
            signal_group(pid, Signal::SIGTERM);
            s.run = Run::Stopping {
                pid,
                since,
                deadline: now + grace,
                killed: false,
                then,
            };
        }
        Run::Stopping { then: t, .. } => *t = then,
        _ => {
            s.run = match then {
                AfterStop::Restart => Run::Waiting,
                AfterStop::Stay => Run::Stopped,
            }
        }
    }
}

fn open_log(dir: &Path, name: &str, cfg: &LogConfig) -> Option<LogFile> {
    match LogFile::open(log_path(dir, name), cfg.max_bytes, cfg.keep) {
        Ok(f) => Some(f),
        Err(e) => {
            log(format!(
                "{name}: cannot open its log file in {}: {e}",
                dir.display()
            ));
            None
        }
    }
}

/// Log a line about a service both on the console and in the service's own log.
fn note(s: &mut Service, msg: &str) {
    log(format!("{}: {msg}", s.cfg.name));
    if let Ok(mut g) = s.log.lock() {
        if let Some(f) = g.as_mut() {
            let _ = f.write(format!("[keel-init] {msg}\n").as_bytes());
        }
    }
}

fn spawn(
    cfg: &ServiceConfig,
    args: &[String],
    log: Arc<Mutex<Option<LogFile>>>,
) -> std::io::Result<Pid> {
    let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
    let mut cmd = Command::new(&cfg.path);
    cmd.args(args)
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .envs(&cfg.env)
        .current_dir("/")
        .stdin(Stdio::null())
        .stdout(Stdio::from(w.try_clone()?))
        .stderr(Stdio::from(w))
        .process_group(0);
    // keel-init blocks the signals it reads through a signalfd, and exec keeps a blocked mask
    // and ignored dispositions: give the service a clean slate
    // SAFETY: the closure only calls async-signal-safe functions (sigemptyset, sigprocmask,
    // signal) between fork and exec
    unsafe {
        cmd.pre_exec(|| {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigprocmask(libc::SIG_SETMASK, &set, std::ptr::null_mut());
            for sig in 1..32 {
                if sig != libc::SIGKILL && sig != libc::SIGSTOP {
                    libc::signal(sig, libc::SIG_DFL);
                }
            }
            Ok(())
        });
    }
    let child = cmd.spawn()?;
    // dropping the handle neither waits nor kills: the supervisor reaps with waitpid(-1)
    let pid = Pid::from_raw(child.id() as i32);
    drop(child);
    drop(cmd); // closes keel-init's copy of the pipe's write end
    let name = cfg.name.clone();
    let spawned = std::thread::Builder::new()
        .name(format!("log-{name}"))
        .spawn(move || pump(std::fs::File::from(r), log));
    if let Err(e) = spawned {
        super::log(format!(
            "{name}: cannot start its log thread: {e}; its output is lost"
        ));
    }
    Ok(pid)
}

/// Copy a service's output into its log until every writer has closed the pipe.
fn pump(mut r: std::fs::File, log: Arc<Mutex<Option<LogFile>>>) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        match r.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => {
                if let Ok(mut g) = log.lock() {
                    if let Some(f) = g.as_mut() {
                        let _ = f.write(&buf[..n]);
                    }
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arguments_are_filled_in_or_refused() {
        let facts = NodeFacts {
            boot_disk: Some("/dev/vda".into()),
            slot: Some(Slot::B),
            state_dir: "/state".into(),
            control: "/run/keel/init.sock".into(),
        };
        let args: Vec<String> = [
            "--disk",
            "{boot_disk}",
            "--x={slot}:{state_dir}",
            "{control}",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        assert_eq!(
            expand_args(&args, &facts).unwrap(),
            ["--disk", "/dev/vda", "--x=b:/state", "/run/keel/init.sock"]
        );
        let none = NodeFacts {
            boot_disk: None,
            ..facts
        };
        let e = expand_args(&args, &none).unwrap_err();
        assert!(e.contains("{boot_disk}") && e.contains("stage 1"), "{e}");
    }

    #[test]
    fn exits_in_words() {
        let p = Pid::from_raw(5);
        assert_eq!(
            describe_exit(&WaitStatus::Exited(p, 0)),
            ("exited with status 0".into(), true)
        );
        assert_eq!(
            describe_exit(&WaitStatus::Exited(p, 3)),
            ("exited with status 3".into(), false)
        );
        assert_eq!(
            describe_exit(&WaitStatus::Signaled(p, Signal::SIGKILL, false)),
            ("killed by signal SIGKILL".into(), false)
        );
    }
}
