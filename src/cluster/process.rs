//! The component processes: started with their output in a log file, each in its own process
//! group (a terminal's Ctrl-C reaches `keel-cluster`, which stops them in order), stopped with
//! SIGTERM and, if that is not enough, SIGKILL.

use super::ClusterError;
use std::fs::File;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// One running component.
#[derive(Debug)]
pub struct Component {
    pub name: &'static str,
    pub log: PathBuf,
    child: Option<Child>,
}

impl Component {
    pub fn spawn(
        name: &'static str,
        binary: &Path,
        args: &[String],
        log: PathBuf,
    ) -> Result<Component, ClusterError> {
        let out = File::create(&log).map_err(|e| ClusterError::io("creating", &log, e))?;
        let err = out
            .try_clone()
            .map_err(|e| ClusterError::io("duplicating", &log, e))?;
        let child = Command::new(binary)
            .args(args)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .process_group(0)
            .spawn()
            .map_err(|e| ClusterError::io("starting", binary, e))?;
        Ok(Component {
            name,
            log,
            child: Some(child),
        })
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// Err when the process has exited: its status and the end of its log.
    pub fn check(&mut self) -> Result<(), ClusterError> {
        let Some(child) = self.child.as_mut() else {
            return Ok(());
        };
        match child.try_wait() {
            Ok(None) => Ok(()),
            Ok(Some(status)) => Err(ClusterError::Exited {
                name: self.name,
                status: status.to_string(),
                log: self.log.clone(),
                tail: log_tail(&self.log, 15),
            }),
            Err(e) => Err(ClusterError::io("waiting for", &self.log, e)),
        }
    }

    /// Resident set size in KiB, from /proc (None once it has exited).
    pub fn rss_kib(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()?)).ok()?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
    }

    /// SIGTERM, wait up to `grace`, then SIGKILL; always reaps the process.
    pub fn stop(&mut self, grace: Duration) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        if let Ok(pid) = i32::try_from(child.id()) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

impl Drop for Component {
    fn drop(&mut self) {
        self.stop(Duration::from_secs(10));
    }
}

/// The last `n` lines of a log file ("" when unreadable).
pub fn log_tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// A TCP port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> Result<u16, ClusterError> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")
        .map_err(|e| ClusterError::io("binding", Path::new("127.0.0.1:0"), e))?;
    l.local_addr()
        .map(|a| a.port())
        .map_err(|e| ClusterError::io("reading address of", Path::new("127.0.0.1:0"), e))
}
