//! KeelOS nodes for the QEMU tests: the releases they boot (built once per test run with
//! `keel-image build release`), a disk per node, the PKI from `osctl gen pki`, and osctl calls
//! to the agent over mutual TLS through QEMU's forwarded port.

#![allow(dead_code)]

use crate::harness::{self, Vm, VmSpec};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

pub const KEEL_IMAGE: &str = env!("CARGO_BIN_EXE_keel-image");
pub const KEEL_INIT: &str = env!("CARGO_BIN_EXE_keel-init");
pub const KEEL_AGENT: &str = env!("CARGO_BIN_EXE_keel-agent");
pub const OSCTL: &str = env!("CARGO_BIN_EXE_osctl");

/// The releases every test shares, built once per run (the package cache makes the first
/// build download the pinned Debian packages; later runs reuse them).
#[derive(Debug)]
pub struct Releases {
    pub dir: PathBuf,
    pub pki: PathBuf,
    /// Served to guests by the tests' update server.
    pub serve: PathBuf,
    /// The node.json every test disk gets.
    pub config: PathBuf,
}

fn run_ok(cmd: &mut Command, what: &str) -> String {
    let o = cmd.output().unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(
        o.status.success(),
        "{what} failed: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn build(dir: &Path, name: &str, version: &str, broken: Option<&str>) {
    let out = dir.join(name);
    if out.join("release.json").is_file() {
        return;
    }
    let mut c = Command::new(KEEL_IMAGE);
    c.args(["build", "release", "--version", version, "--out"])
        .arg(&out)
        .args(["--init", KEEL_INIT, "--agent", KEEL_AGENT, "--image-dir"])
        .arg(harness::repo().join("image"))
        .arg("--cache")
        .arg(&harness::cache().dir);
    if let Some(b) = broken {
        c.args(["--broken", b]);
    }
    run_ok(&mut c, &format!("keel-image build release {name}"));
}

/// Build (once per process) v1 and the PKI; other releases are built on first use.
pub fn releases() -> &'static Releases {
    static R: OnceLock<Releases> = OnceLock::new();
    R.get_or_init(|| {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("qemu-releases");
        // A fresh set per run: the binaries may have changed since the last one.
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let t0 = Instant::now();
        build(&dir, "v1", "1.0.0", None);
        harness::timing("releases", "build of release v1", t0.elapsed());
        let pki = dir.join("pki");
        run_ok(
            Command::new(OSCTL)
                .args(["gen", "pki", "--out"])
                .arg(&pki)
                .args(["--san", "127.0.0.1", "--san", "localhost"]),
            "osctl gen pki",
        );
        // Test nodes: QEMU's user network, and a short health window so a boot is marked
        // successful soon after the agent and containerd are up.
        let config = dir.join("node.json");
        std::fs::write(
            &config,
            serde_json::to_vec_pretty(&serde_json::json!({
                "version": 1,
                "network": {"address": "10.0.2.15/24", "gateway": "10.0.2.2"},
                "health": {"window_secs": 5},
            }))
            .unwrap(),
        )
        .unwrap();
        let serve = dir.join("serve");
        std::fs::create_dir_all(&serve).unwrap();
        Releases {
            dir,
            pki,
            serve,
            config,
        }
    })
}

impl Releases {
    pub fn release(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
    pub fn sha256(&self, name: &str) -> String {
        let s = std::fs::read_to_string(self.release(name).join("root.img.sha256")).unwrap();
        s.split_whitespace().next().unwrap().to_string()
    }
}

/// One node: its disk (slot A holds v1), its VM, and osctl pointed at it.
#[derive(Debug)]
pub struct Node {
    pub dir: tempfile::TempDir,
    pub disk: PathBuf,
    pub vm: Option<Vm>,
    pub http_port: Option<u16>,
    /// Where the serial log has been read up to (a reboot's lines come after it).
    pub mark: usize,
}

impl Node {
    pub fn new(test: &str, http_port: Option<u16>) -> Node {
        let r = releases();
        let dir = harness::scratch(test);
        let disk = dir.path().join("disk.img");
        run_ok(
            Command::new(KEEL_IMAGE)
                .args(["build", "disk", "--release"])
                .arg(r.release("v1"))
                .arg("--pki")
                .arg(&r.pki)
                .arg("--config")
                .arg(&r.config)
                .arg("--out")
                .arg(&disk),
            "keel-image build disk",
        );
        Node {
            dir,
            disk,
            vm: None,
            http_port,
            mark: 0,
        }
    }

    /// Boot (or, after a power cut, boot again) with v1's kernel and initramfs (direct kernel
    /// boot: they are outside the disk and shared by both slots).
    pub fn boot(&mut self) {
        let r = releases();
        let v1 = r.release("v1");
        self.vm = Some(Vm::start(VmSpec {
            kernel: v1.join("vmlinuz"),
            initrd: v1.join("initramfs.img"),
            disk: self.disk.clone(),
            append: String::new(),
            http_port: self.http_port,
            serial_log: self.dir.path().join("serial.log"),
        }));
        self.mark = 0;
    }

    pub fn vm(&mut self) -> &mut Vm {
        self.vm.as_mut().expect("the node is not booted")
    }

    /// osctl against this node; Ok(stdout) or Err(stderr).
    pub fn osctl(&mut self, args: &[&str]) -> Result<String, String> {
        let port = self.vm().agent_port;
        let r = releases();
        let o = Command::new(OSCTL)
            .arg("--config")
            .arg(r.pki.join("osctl.json"))
            .arg("--endpoint")
            .arg(format!("127.0.0.1:{port}"))
            .args(args)
            .output()
            .map_err(|e| e.to_string())?;
        if o.status.success() {
            Ok(String::from_utf8_lossy(&o.stdout).into_owned())
        } else {
            Err(String::from_utf8_lossy(&o.stderr).into_owned())
        }
    }

    pub fn status(&mut self) -> Result<serde_json::Value, String> {
        let s = self.osctl(&["--output", "json", "status"])?;
        serde_json::from_str(&s).map_err(|e| format!("status is not JSON ({e}): {s}"))
    }

    /// Poll `osctl status` until the agent answers; returns its status and the time waited.
    pub fn wait_agent(&mut self, limit: Duration) -> (serde_json::Value, Duration) {
        let t0 = Instant::now();
        loop {
            let last = match self.status() {
                Ok(s) => return (s, t0.elapsed()),
                Err(e) => e,
            };
            if t0.elapsed() > limit {
                panic!(
                    "the agent did not answer within {limit:?}; last osctl error: {last}\nserial tail:\n{}",
                    self.vm().tail(40)
                );
            }
            std::thread::sleep(Duration::from_secs(1));
        }
    }

    /// Poll status until `pred` holds for it (e.g. booted on slot b and marked successful).
    pub fn wait_status(
        &mut self,
        limit: Duration,
        what: &str,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> (serde_json::Value, Duration) {
        let t0 = Instant::now();
        let mut last = serde_json::Value::Null;
        loop {
            if let Ok(s) = self.status() {
                if pred(&s) {
                    return (s, t0.elapsed());
                }
                last = s;
            }
            if t0.elapsed() > limit {
                panic!(
                    "{what}: not reached within {limit:?}; last status: {last}\nserial tail:\n{}",
                    self.vm().tail(40)
                );
            }
            std::thread::sleep(Duration::from_secs(1));
        }
    }

    pub fn slot<'a>(status: &'a serde_json::Value, slot: &str) -> &'a serde_json::Value {
        status["slots"]
            .as_array()
            .and_then(|a| a.iter().find(|s| s["slot"] == slot))
            .unwrap_or(&serde_json::Value::Null)
    }
}
