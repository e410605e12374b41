//! The QEMU harness: boots a KeelOS kernel, initramfs and disk under `qemu-system-x86_64
//! -accel tcg` exactly as the issue describes (i6300esb watchdog that resets, virtio disk and
//! network, user networking with restrict=on, the agent's port forwarded to loopback, a
//! guestfwd to an update server on loopback), with the serial console in a log file.
//!
//! Timeouts here only bound how long a test waits for a boot that never comes; no test asserts
//! on how fast anything is. Timings are printed.

#![allow(dead_code)] // each test uses part of the harness

use keelos::image::debian::PackageCache;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The package cache the build shares with `keel-image build` (KEEL_CACHE or /var/cache/keelos).
pub fn cache() -> PackageCache {
    PackageCache::new(
        std::env::var_os("KEEL_CACHE")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("/var/cache/keelos")),
    )
}

/// A free TCP port on loopback (the OS picks it; another process could take it before QEMU
/// binds it, which would make QEMU fail loudly, not silently).
pub fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral loopback port");
    l.local_addr().expect("local address").port()
}

/// The UEFI firmware the disk boots under (Debian's ovmf, the 4 MiB flash layout): its code,
/// read-only, and a variable store per VM copied from [`ovmf_vars`].
pub const OVMF_CODE: &str = "/usr/share/OVMF/OVMF_CODE_4M.fd";

/// The test machines' UEFI variable store: the Debian Secure Boot CA in db (ci/ovmf-vars), as on
/// a machine that boots Debian's signed kernels; made once per test run.
pub fn ovmf_vars() -> &'static Path {
    static V: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    V.get_or_init(|| {
        let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join("ovmf-vars-debian-db.fd");
        let st = Command::new(repo().join("ci/ovmf-vars"))
            .arg(&out)
            .status()
            .expect("run ci/ovmf-vars");
        assert!(st.success(), "ci/ovmf-vars failed (run ci/install-deps)");
        out
    })
}

/// How the guest starts.
#[derive(Debug, Clone)]
pub enum Boot {
    /// Direct kernel boot: QEMU loads `kernel` and `initrd` itself, with `console=ttyS0` and
    /// `append` as the command line.
    Direct {
        kernel: PathBuf,
        initrd: PathBuf,
        append: String,
    },
    /// UEFI (OVMF) boots the disk: nothing but the disk, as on real hardware.
    Uefi,
}

/// What to boot.
#[derive(Debug, Clone)]
pub struct VmSpec {
    pub boot: Boot,
    pub disk: PathBuf,
    /// The loopback port the guest's 10.0.2.100:8080 reaches (the test's update server).
    pub http_port: Option<u16>,
    /// More host services the guest reaches: (port on 10.0.2.100, loopback port).
    pub forwards: Vec<(u16, u16)>,
    /// Guest memory; 1024 MiB when `None`.
    pub memory_mib: Option<u32>,
    pub serial_log: PathBuf,
}

/// A running guest. Dropping it kills QEMU.
#[derive(Debug)]
pub struct Vm {
    child: Child,
    pub spec: VmSpec,
    /// Loopback port forwarded to the guest's agent port 50051.
    pub agent_port: u16,
    pub started: Instant,
}

impl Vm {
    pub fn start(spec: VmSpec) -> Vm {
        let agent_port = free_port();
        let mut net = format!("user,id=n0,restrict=on,hostfwd=tcp:127.0.0.1:{agent_port}-:50051");
        if let Some(p) = spec.http_port {
            // one socat per guest connection, so each is its own connection to the server: a
            // chardev target ("-tcp:HOST:PORT") is one stream shared by every guest connection
            // in turn, and bytes a closed guest connection left unread reach the next one
            net.push_str(&format!(
                ",guestfwd=tcp:10.0.2.100:8080-cmd:socat - TCP:127.0.0.1:{p}"
            ));
        }
        for (guest, host) in &spec.forwards {
            net.push_str(&format!(
                ",guestfwd=tcp:10.0.2.100:{guest}-cmd:socat - TCP:127.0.0.1:{host}"
            ));
        }
        let memory = spec.memory_mib.unwrap_or(1024).to_string();
        // The log is appended to across reboots of the same guest; a new guest starts clean.
        let _ = std::fs::remove_file(&spec.serial_log);
        let mut cmd = Command::new("qemu-system-x86_64");
        cmd.args([
            "-accel",
            "tcg",
            "-m",
            &memory,
            "-nodefaults",
            "-no-user-config",
        ])
        .arg("-drive")
        .arg(format!(
            "file={},if=none,id=d0,format=raw",
            spec.disk.display()
        ))
        .args(["-device", "virtio-blk-pci,drive=d0,bootindex=1"])
        .args(["-device", "i6300esb", "-action", "watchdog=reset"])
        .arg("-netdev")
        .arg(net)
        // romfile= : no PXE option ROM (neither boot needs one; ipxe-qemu not required)
        .args(["-device", "virtio-net-pci,netdev=n0,romfile="])
        .arg("-serial")
        .arg(format!("file:{}", spec.serial_log.display()))
        .args(["-display", "none"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
        match &spec.boot {
            Boot::Direct {
                kernel,
                initrd,
                append,
            } => {
                cmd.arg("-kernel")
                    .arg(kernel)
                    .arg("-initrd")
                    .arg(initrd)
                    .arg("-append")
                    .arg(format!("console=ttyS0 {append}"));
            }
            Boot::Uefi => {
                // each VM its own copy of the variable store: the firmware writes to it
                let vars = spec.serial_log.with_extension("vars.fd");
                if !vars.exists() {
                    std::fs::copy(ovmf_vars(), &vars).expect("copy the OVMF variable store");
                }
                cmd.arg("-drive")
                    .arg(format!("if=pflash,format=raw,readonly=on,file={OVMF_CODE}"))
                    .arg("-drive")
                    .arg(format!("if=pflash,format=raw,file={}", vars.display()));
            }
        }
        let started = Instant::now();
        let child = cmd
            .spawn()
            .expect("start qemu-system-x86_64 (ci/install-deps installs qemu-system-x86)");
        eprintln!(
            "qemu: started pid {} (agent port {agent_port}, serial log {})",
            child.id(),
            spec.serial_log.display()
        );
        Vm {
            child,
            spec,
            agent_port,
            started,
        }
    }

    pub fn serial(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(&self.spec.serial_log).unwrap_or_default())
            .into_owned()
    }

    /// The last lines of the serial log, for failure messages.
    pub fn tail(&self, n: usize) -> String {
        let s = self.serial();
        let lines: Vec<&str> = s.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// Wait until `pattern` appears in the serial log after byte `from`; returns where it ends.
    /// Fails (with the log's tail) if QEMU exits first or `limit` passes.
    pub fn wait_serial(
        &mut self,
        pattern: &str,
        from: usize,
        limit: Duration,
    ) -> Result<usize, String> {
        let t0 = Instant::now();
        loop {
            let s = self.serial();
            if let Some(i) = s.get(from..).and_then(|rest| rest.find(pattern)) {
                return Ok(from + i + pattern.len());
            }
            if let Ok(Some(st)) = self.child.try_wait() {
                return Err(format!(
                    "qemu exited ({st}) before {pattern:?} appeared; stderr: {}\nserial tail:\n{}",
                    self.stderr(),
                    self.tail(40)
                ));
            }
            if t0.elapsed() > limit {
                return Err(format!(
                    "{pattern:?} did not appear on the serial console within {limit:?}; serial tail:\n{}",
                    self.tail(40)
                ));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Wait for QEMU to exit by itself (the guest powered off).
    pub fn wait_exit(&mut self, limit: Duration) -> Result<std::process::ExitStatus, String> {
        let t0 = Instant::now();
        loop {
            if let Some(st) = self.child.try_wait().map_err(|e| e.to_string())? {
                return Ok(st);
            }
            if t0.elapsed() > limit {
                return Err(format!(
                    "qemu still running after {limit:?}; serial tail:\n{}",
                    self.tail(40)
                ));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn stderr(&mut self) -> String {
        use std::io::Read;
        let mut s = String::new();
        if let Some(e) = self.child.stderr.as_mut() {
            let _ = e.read_to_string(&mut s);
        }
        s
    }

    /// Pull the plug: SIGKILL QEMU (a power cut for the guest).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Print a timing line in the one format every QEMU test uses.
pub fn timing(test: &str, what: &str, d: Duration) {
    eprintln!("timing: {test}: {what}: {:.1} s", d.as_secs_f64());
}

/// A scratch directory for one test, kept under the target dir so a failure can be inspected
/// (removed again when the test passes).
pub fn scratch(name: &str) -> tempfile::TempDir {
    let base = Path::new(env!("CARGO_TARGET_TMPDIR")).join("qemu");
    std::fs::create_dir_all(&base).expect("create the qemu scratch directory");
    tempfile::Builder::new()
        .prefix(&format!("{name}-"))
        .tempdir_in(base)
        .expect("create a scratch directory")
}
