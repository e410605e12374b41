//! KeelOS nodes for the QEMU tests: the releases they boot (built once per test run with
//! `keel-image build release`), a disk per node, the PKI from `osctl gen pki`, and osctl calls
//! to the agent over mutual TLS through QEMU's forwarded port.

#![allow(dead_code)]

use crate::harness::{self, Boot, Vm, VmSpec};
use crate::server::{self, UpdateServer};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, OnceLock};
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
    /// The node.json every test disk gets.
    pub config: PathBuf,
}

pub fn run_ok(cmd: &mut Command, what: &str) -> String {
    let o = cmd.output().unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(
        o.status.success(),
        "{what} failed: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// The releases the tests use: (name, version, broken variant, delta from). Every image is
/// compressed at zstd level 3 (level 19 takes a minute per image and changes no behaviour).
const RELEASES: &[(&str, &str, Option<&str>, Option<&str>)] = &[
    ("v1", "1.0.0", None, None),
    ("v2", "2.0.0", None, Some("v1")),
    ("v3", "3.0.0", None, Some("v2")),
    ("bad-agent", "2.0.1-agent-exits", Some("agent-exits"), None),
    ("bad-hang", "2.0.2-init-hangs", Some("init-hangs"), None),
    ("bad-panic", "2.0.3-init-panics", Some("init-panics"), None),
    (
        "bad-squashfs",
        "2.0.4-corrupt-squashfs",
        Some("corrupt-squashfs"),
        None,
    ),
    (
        "bad-kernel",
        "2.0.5-kernel-refused",
        Some("kernel-refused"),
        None,
    ),
    (
        "bad-initramfs",
        "2.0.6-initramfs-no-disk",
        Some("initramfs-no-disk"),
        None,
    ),
    (
        "bad-early-hang",
        "2.0.7-initramfs-hangs",
        Some("initramfs-hangs"),
        None,
    ),
    (
        "bad-unsigned",
        "2.0.8-kernel-unsigned",
        Some("kernel-unsigned"),
        None,
    ),
    (
        "bad-module",
        "2.0.9-module-unsigned",
        Some("module-unsigned"),
        None,
    ),
    // v1 with another stock Debian kernel (KERNEL2): a release that differs only by its kernel
    ("v2-kernel", "2.0.0-kernel", None, None),
    // signed releases (see SIGNED): their images trust two release keys
    ("s0", "1.0.9", None, None),
    ("s1", "1.1.0", None, None),
    ("s2", "1.2.0", None, None),
    // Kubernetes nodes (see KUBE): with the stock kubelet
    ("k1", "1.5.0", None, None),
    ("k2", "1.6.0", None, None),
    ("k-bad", "1.6.1-kubelet-exits", Some("kubelet-exits"), None),
];

/// The releases built with `--kubelet` (the stock kubelet `image/kube/build` makes).
const KUBE: &[&str] = &["k1", "k2", "k-bad"];

/// The stock binaries in `$KEEL_CACHE/kube/<version>`, built by `image/kube/build` when one is
/// missing (about 9 minutes cold for all four, 0 s cached). Returns their directory.
pub fn kube_binaries() -> PathBuf {
    static BUILT: Mutex<()> = Mutex::new(());
    let _g = BUILT.lock().unwrap_or_else(|e| e.into_inner());
    let dir = keelos::cluster::default_bin_dir();
    let all = [
        "kubelet",
        "etcd",
        "kube-apiserver",
        "kube-controller-manager",
    ];
    let missing: Vec<&str> = all.into_iter().filter(|c| !dir.join(c).is_file()).collect();
    if !missing.is_empty() {
        let t0 = Instant::now();
        run_ok(
            Command::new(harness::repo().join("image/kube/build")).args(&missing),
            "image/kube/build",
        );
        eprintln!(
            "timing: image/kube/build {missing:?}: {:.1} s",
            t0.elapsed().as_secs_f64()
        );
    }
    dir
}

/// The signed releases' security versions; each is signed with the first of [`release_keys`]
/// and trusts both.
const SIGNED: &[(&str, u64)] = &[("s0", 0), ("s1", 1), ("s2", 2)];

/// Two release key pairs made by the stock `minisign -G -W` in `dir/keys` (once per run):
/// (public key files, the first key's secret key file).
fn release_keys(dir: &Path) -> ([PathBuf; 2], PathBuf) {
    let keys = dir.join("keys");
    let name = |i: usize, ext: &str| keys.join(format!("release{i}.{ext}"));
    for i in 0..2 {
        if name(i, "pub").is_file() {
            continue;
        }
        std::fs::create_dir_all(&keys).unwrap();
        run_ok(
            Command::new("minisign")
                .args(["-G", "-W", "-p"])
                .arg(name(i, "pub"))
                .arg("-s")
                .arg(name(i, "key"))
                .stdin(std::process::Stdio::null()),
            "minisign -G -W (the stock tool: apt-get install minisign, or ci/install-deps)",
        );
    }
    ([name(0, "pub"), name(1, "pub")], name(0, "key"))
}

/// The second stock Debian kernel of the kernel-update test: package, version, `uname -r`.
pub const KERNEL2: (&str, &str, &str) =
    ("linux-image-6.1.0-48-amd64", "6.1.172-1", "6.1.0-48-amd64");

fn build(dir: &Path, name: &str) {
    let out = dir.join(name);
    if out.join("build.json").is_file() {
        return;
    }
    let &(_, version, broken, delta_from) = RELEASES
        .iter()
        .find(|r| r.0 == name)
        .unwrap_or_else(|| panic!("no release {name} in RELEASES"));
    if let Some(from) = delta_from {
        build(dir, from);
    }
    let t0 = Instant::now();
    let mut c = Command::new(KEEL_IMAGE);
    c.args(["build", "release", "--version", version, "--out"])
        .arg(&out)
        .args(["--init", KEEL_INIT, "--agent", KEEL_AGENT, "--image-dir"])
        .arg(harness::repo().join("image"))
        .arg("--cache")
        .arg(&harness::cache().dir)
        .args(["--zstd-level", "3"]);
    if KUBE.contains(&name) {
        c.arg("--kubelet").arg(kube_binaries().join("kubelet"));
    }
    if let Some(b) = broken {
        c.args(["--broken", b]);
    }
    if let Some(from) = delta_from {
        // quality 9: as valid a patch as 11's, made in a fraction of the time
        c.arg("--delta-from").arg(dir.join(from));
        c.args(["--delta-quality", "9"]);
    }
    if name == "v2-kernel" {
        c.arg("--kernel-package")
            .arg(format!("{}={}", KERNEL2.0, KERNEL2.1));
    }
    if let Some(&(_, sv)) = SIGNED.iter().find(|s| s.0 == name) {
        let (public, secret) = release_keys(dir);
        c.arg("--security-version").arg(sv.to_string());
        for p in public {
            c.arg("--trust").arg(p);
        }
        c.arg("--sign").arg(secret);
    }
    run_ok(&mut c, &format!("keel-image build release {name}"));
    harness::timing(
        "releases",
        &format!("build of release {name}"),
        t0.elapsed(),
    );
}

/// Build (once per process) v1 and the PKI; other releases are built on first use.
pub fn releases() -> &'static Releases {
    static R: OnceLock<Releases> = OnceLock::new();
    R.get_or_init(|| {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("qemu-releases");
        // A fresh set per run: the binaries may have changed since the last one.
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        build(&dir, "v1");
        let pki = dir.join("pki");
        run_ok(
            Command::new(OSCTL)
                .args(["gen", "pki", "--out"])
                .arg(&pki)
                .args(["--san", "127.0.0.1", "--san", "localhost"]),
            "osctl gen pki",
        );
        // Test nodes: QEMU's user network; a short health window so a boot is marked
        // successful soon after the agent and containerd are up, and a boot deadline short
        // enough for the rollback tests (a healthy boot takes about 15 s here).
        let config = dir.join("node.json");
        std::fs::write(
            &config,
            serde_json::to_vec_pretty(&serde_json::json!({
                "version": 1,
                "network": {"address": "10.0.2.15/24", "gateway": "10.0.2.2"},
                "health": {"window_secs": 5, "boot_deadline_secs": BOOT_DEADLINE_SECS},
                "watchdog": {"timeout_secs": 30},
            }))
            .unwrap(),
        )
        .unwrap();
        Releases { dir, pki, config }
    })
}

/// The test nodes' boot deadline (node.json health.boot_deadline_secs).
pub const BOOT_DEADLINE_SECS: u64 = 60;
/// Stage 1's watchdog timeout on the kernel command line (the hang and panic tests wait for it).
pub const STAGE1_WATCHDOG_SECS: u64 = 20;
/// The test disks' boot-stage command-line words (after keel-image's base line): the stage 1
/// watchdog timeout ([`STAGE1_WATCHDOG_SECS`]) and a short wait for the disk. The slot kernels
/// inherit them.
pub const BOOT_CMDLINE: &str = "keel.watchdog=20 keel.disk_wait=10";

impl Releases {
    /// A release's directory, built on first use (one build at a time).
    pub fn release(&self, name: &str) -> PathBuf {
        static BUILD: Mutex<()> = Mutex::new(());
        let _g = BUILD.lock().unwrap_or_else(|e| e.into_inner());
        build(&self.dir, name);
        self.dir.join(name)
    }
    pub fn sha256(&self, name: &str) -> String {
        let s = std::fs::read_to_string(self.release(name).join("root.img.sha256")).unwrap();
        s.split_whitespace().next().unwrap().to_string()
    }
    pub fn version(&self, name: &str) -> &'static str {
        RELEASES.iter().find(|r| r.0 == name).map(|r| r.1).unwrap()
    }
    /// The size of one of a release's files.
    pub fn size(&self, name: &str, file: &str) -> u64 {
        std::fs::metadata(self.release(name).join(file))
            .unwrap()
            .len()
    }
}

/// One node: its disk (slot A holds the release it was built from), its VM, osctl pointed at
/// it, and its own update server (a real HTTP server on loopback that the guest reaches through
/// QEMU's guestfwd at 10.0.2.100:8080).
#[derive(Debug)]
pub struct Node {
    pub dir: tempfile::TempDir,
    pub disk: PathBuf,
    pub vm: Option<Vm>,
    pub server: UpdateServer,
    /// More host services this node's guest reaches ([`VmSpec::forwards`]).
    pub forwards: Vec<(u16, u16)>,
    /// Guest memory ([`VmSpec::memory_mib`]).
    pub memory_mib: Option<u32>,
}

/// What a node is told to install: the URLs its update server serves and the digest.
#[derive(Debug, Clone)]
pub struct Published {
    pub image: String,
    pub image_file: String,
    pub delta: Option<String>,
    pub delta_file: Option<String>,
    pub sha256: String,
    pub version: String,
}

impl Published {
    /// `osctl install` arguments (full, or delta with the full image as the fallback).
    pub fn install_args(&self, delta: bool) -> Vec<String> {
        let mut a = vec![
            "install".to_string(),
            "--image".into(),
            self.image.clone(),
            "--sha256".into(),
            self.sha256.clone(),
            "--version".into(),
            self.version.clone(),
        ];
        if delta {
            a.push("--delta".into());
            a.push(self.delta.clone().expect("this release has no delta"));
        }
        a
    }
}

impl Node {
    /// A node whose factory disk holds `base` (a release name) in slot A, marked successful.
    pub fn new(test: &str, base: &str) -> Node {
        Node::with_health_window(test, base, None)
    }

    /// A node like [`Node::new`] whose health window is `window_secs` instead of the tests'
    /// usual 5 s (a test that must act while a boot is on trial needs the trial to last); the
    /// boot deadline grows by as much.
    pub fn with_health_window(test: &str, base: &str, window_secs: Option<u64>) -> Node {
        match window_secs {
            None => Node::build(test, base, None),
            Some(w) => Node::with_config(test, base, |c| {
                c["health"]["window_secs"] = w.into();
                c["health"]["boot_deadline_secs"] = (BOOT_DEADLINE_SECS + w).into();
            }),
        }
    }

    /// A node like [`Node::new`] whose node.json is the tests' shared one changed by `edit`
    /// (the shared file itself stays as it is).
    pub fn with_config(test: &str, base: &str, edit: impl FnOnce(&mut serde_json::Value)) -> Node {
        Node::build(test, base, Some(Box::new(edit)))
    }

    #[allow(clippy::type_complexity)]
    fn build(
        test: &str,
        base: &str,
        edit: Option<Box<dyn FnOnce(&mut serde_json::Value) + '_>>,
    ) -> Node {
        let r = releases();
        let dir = harness::scratch(test);
        let disk = dir.path().join("disk.img");
        let config = match edit {
            None => r.config.clone(),
            Some(edit) => {
                let mut c: serde_json::Value =
                    serde_json::from_slice(&std::fs::read(&r.config).unwrap()).unwrap();
                edit(&mut c);
                let p = dir.path().join("node.json");
                std::fs::write(&p, serde_json::to_vec_pretty(&c).unwrap()).unwrap();
                p
            }
        };
        run_ok(
            Command::new(KEEL_IMAGE)
                .args(["build", "disk", "--release"])
                .arg(r.release(base))
                // the boot stage: v1's kernel and initramfs, whatever the slot holds
                .arg("--boot-stage")
                .arg(r.release("v1"))
                .arg("--cmdline")
                .arg(BOOT_CMDLINE)
                .arg("--pki")
                .arg(&r.pki)
                .arg("--config")
                .arg(&config)
                .arg("--out")
                .arg(&disk),
            "keel-image build disk",
        );
        let serve = dir.path().join("serve");
        std::fs::create_dir_all(&serve).unwrap();
        let server = UpdateServer::start(&serve);
        Node {
            dir,
            disk,
            vm: None,
            server,
            forwards: Vec::new(),
            memory_mib: None,
        }
    }

    /// Put `name`'s compressed image (and its delta, when it has one) on this node's update
    /// server. `corrupt_delta` flips bytes in the middle of the served delta.
    pub fn publish(&self, name: &str, corrupt_delta: bool) -> Published {
        let r = releases();
        let rel = r.release(name);
        let image_file = format!("{name}.img.zst");
        std::fs::copy(rel.join("root.img.zst"), self.server.root.join(&image_file)).unwrap();
        let delta_src = std::fs::read_dir(&rel)
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .find(|p| p.extension().is_some_and(|x| x == "bsdiff"));
        let delta_file = delta_src.map(|src| {
            let f = format!("{name}.bsdiff");
            let mut bytes = std::fs::read(&src).unwrap();
            if corrupt_delta {
                let (mid, len) = (bytes.len() / 2, bytes.len());
                for b in &mut bytes[mid..(mid + 16).min(len)] {
                    *b ^= 0x5a;
                }
            }
            std::fs::write(self.server.root.join(&f), bytes).unwrap();
            f
        });
        Published {
            image: server::guest_url(&image_file),
            image_file,
            delta: delta_file.as_deref().map(server::guest_url),
            delta_file,
            sha256: r.sha256(name),
            version: r.version(name).to_string(),
        }
    }

    /// Put signed release `name` on this node's update server under `as_dir/`: its manifest,
    /// the manifest's signature and the compressed image the manifest names. `tamper` changes
    /// the served manifest's bytes (after signing) with a text replacement. Returns the
    /// manifest's URL as the guest sees it.
    pub fn publish_release(
        &self,
        name: &str,
        as_dir: &str,
        tamper: Option<(&str, &str)>,
    ) -> String {
        let rel = releases().release(name);
        let dir = self.server.root.join(as_dir);
        std::fs::create_dir_all(&dir).unwrap();
        for f in ["release.json.minisig", "root.img.zst"] {
            std::fs::copy(rel.join(f), dir.join(f)).unwrap();
        }
        let mut manifest = std::fs::read_to_string(rel.join("release.json")).unwrap();
        if let Some((from, to)) = tamper {
            assert!(manifest.contains(from), "{from:?} is not in {manifest}");
            manifest = manifest.replacen(from, to, 1);
        }
        std::fs::write(dir.join("release.json"), manifest).unwrap();
        server::guest_url(&format!("{as_dir}/release.json"))
    }

    /// Boot (or, after a power cut, boot again) from the disk alone under UEFI: OVMF starts
    /// the boot stage's UKI on the ESP, which kexecs the chosen slot's own kernel.
    pub fn boot(&mut self) {
        self.start(Boot::Uefi);
    }

    /// Boot the boot stage directly (QEMU loads v1's kernel and initramfs, with the disk's
    /// boot-stage command line and `extra`): the quick way, and today's path when `extra` hands
    /// over a slot itself.
    pub fn boot_direct(&mut self, extra: &str) {
        let v1 = releases().release("v1");
        self.start(Boot::Direct {
            kernel: v1.join("vmlinuz"),
            initrd: v1.join("initramfs.img"),
            append: format!("panic=10 i6300esb.nowayout=1 {BOOT_CMDLINE} {extra}"),
        });
    }

    fn start(&mut self, boot: Boot) {
        self.vm = Some(Vm::start(VmSpec {
            boot,
            disk: self.disk.clone(),
            http_port: Some(self.server.port),
            forwards: self.forwards.clone(),
            memory_mib: self.memory_mib,
            serial_log: self.dir.path().join("serial.log"),
        }));
    }

    pub fn vm(&mut self) -> &mut Vm {
        self.vm.as_mut().expect("the node is not booted")
    }

    /// An osctl command pointed at this node's forwarded agent port, with the admin config.
    pub fn osctl_cmd(&mut self, args: &[&str]) -> Command {
        let port = self.vm().agent_port;
        let r = releases();
        let mut c = Command::new(OSCTL);
        c.arg("--config")
            .arg(r.pki.join("osctl.json"))
            .arg("--endpoint")
            .arg(format!("127.0.0.1:{port}"))
            .args(args);
        c
    }

    /// osctl against this node; Ok(stdout) or Err(stderr).
    pub fn osctl(&mut self, args: &[&str]) -> Result<String, String> {
        let o = self.osctl_cmd(args).output().map_err(|e| e.to_string())?;
        if o.status.success() {
            Ok(String::from_utf8_lossy(&o.stdout).into_owned())
        } else {
            Err(format!(
                "exit {:?}: {}{}",
                o.status.code(),
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            ))
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

    /// `osctl --output json install ...` to its end: the result object (the last one printed).
    pub fn install(&mut self, p: &Published, delta: bool) -> Result<serde_json::Value, String> {
        let mut args = vec!["--output".to_string(), "json".into()];
        args.extend(p.install_args(delta));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = self.osctl(&args)?;
        // progress objects, then the result object
        let last = serde_json::Deserializer::from_str(&out)
            .into_iter::<serde_json::Value>()
            .last()
            .ok_or_else(|| format!("no output from osctl install: {out}"))?
            .map_err(|e| format!("not JSON ({e}): {out}"))?;
        if last.get("ok").is_none() {
            return Err(format!("no result in osctl's output: {out}"));
        }
        Ok(last)
    }

    /// `osctl reboot`; returns when the agent has accepted it.
    pub fn reboot(&mut self) -> Instant {
        let out = self
            .osctl(&["reboot"])
            .unwrap_or_else(|e| panic!("osctl reboot: {e}"));
        eprintln!("osctl reboot: {}", out.trim());
        Instant::now()
    }

    /// Wait until status shows `slot` booted and marked successful.
    pub fn wait_booted_successful(
        &mut self,
        slot: &'static str,
        limit: Duration,
    ) -> (serde_json::Value, Duration) {
        self.wait_status(limit, &format!("slot {slot} booted and successful"), |s| {
            s["booted_slot"] == slot && Node::slot(s, slot)["successful"] == true
        })
    }

    /// How many times `pattern` appears on the serial console since QEMU started.
    pub fn serial_count(&mut self, pattern: &str) -> usize {
        self.vm().serial().matches(pattern).count()
    }
}

/// What the boot stage will choose on `disk` right now (read without changing the disk), and
/// proof that it is a verified slot: the slot's record is intact and the slot's bytes hash to
/// the record's SHA-256. Returns the slot's letter and the record's digest.
pub fn verified_boot_choice(disk: &Path) -> Result<(&'static str, String), String> {
    let dev = keelos::block::FileDevice::open(disk, false).map_err(|e| e.to_string())?;
    let (layout, flags) = keelos::bootctl::store::load(&dev).map_err(|e| e.to_string())?;
    let choice = keelos::bootctl::choose_boot(flags).map_err(|e| e.to_string())?;
    let (got, want) = slot_digest(&dev, &layout, choice.slot)?;
    if got != want {
        return Err(format!(
            "slot {} would boot but its bytes hash to {got}, not its record's {want}",
            choice.slot
        ));
    }
    Ok((choice.slot.letter(), want))
}

/// The SHA-256 of `slot`'s bytes on `disk` (as many as its record says) and the record's
/// digest: (bytes, record). Read from the host's disk image file.
pub fn slot_hash(disk: &Path, slot: &str) -> Result<(String, String), String> {
    let dev = keelos::block::FileDevice::open(disk, false).map_err(|e| e.to_string())?;
    let (layout, _) = keelos::bootctl::store::load(&dev).map_err(|e| e.to_string())?;
    slot_digest(&dev, &layout, slot.parse()?)
}

fn slot_digest(
    dev: &keelos::block::FileDevice,
    layout: &keelos::disk::Layout,
    slot: keelos::bootctl::Slot,
) -> Result<(String, String), String> {
    use keelos::block::read_vec;
    use sha2::{Digest, Sha256};
    let rec = keelos::update::driver::read_record(dev, layout, slot)
        .map_err(|e| e.to_string())?
        .ok_or_else(|| format!("slot {slot} has no intact record"))?;
    let part = layout.root(slot);
    let mut h = Sha256::new();
    let mut at = 0u64;
    while at < rec.length {
        let n = (rec.length - at).min(4 << 20) as usize;
        h.update(read_vec(dev, part.offset + at, n).map_err(|e| e.to_string())?);
        at += n as u64;
    }
    Ok((
        keelos::update::record::hex(&h.finalize()),
        keelos::update::record::hex(&rec.sha256),
    ))
}

/// Flip the bits of one byte of `slot` on `disk` (the host's disk image file; QEMU must be
/// stopped), `offset` bytes into the slot: bit rot, or an edit behind the node's back.
pub fn flip_slot_byte(disk: &Path, slot: &str, offset: u64) {
    use keelos::block::BlockDevice;
    let mut dev = keelos::block::FileDevice::open(disk, true).unwrap();
    let (layout, _) = keelos::bootctl::store::load(&dev).unwrap();
    let slot: keelos::bootctl::Slot = slot.parse().unwrap();
    let at = layout.root(slot).offset + offset;
    let mut b = keelos::block::read_vec(&dev, at, 1).unwrap();
    b[0] ^= 0xFF;
    dev.write_at(at, &b).unwrap();
    dev.flush().unwrap();
}

/// `slot`'s record on `disk`.
pub fn slot_record(disk: &Path, slot: &str) -> keelos::update::SlotRecord {
    let dev = keelos::block::FileDevice::open(disk, false).unwrap();
    let (layout, _) = keelos::bootctl::store::load(&dev).unwrap();
    keelos::update::driver::read_record(&dev, &layout, slot.parse().unwrap())
        .unwrap()
        .unwrap_or_else(|| panic!("slot {slot} has no record"))
}

/// Where the only occurrence of `needle` is in `slot`'s image on `disk` (panics when it occurs
/// not exactly once).
pub fn find_once_in_slot(disk: &Path, slot: &str, needle: &[u8]) -> u64 {
    let rec = slot_record(disk, slot);
    let dev = keelos::block::FileDevice::open(disk, false).unwrap();
    let (layout, _) = keelos::bootctl::store::load(&dev).unwrap();
    let part = layout.root(slot.parse().unwrap());
    let img = keelos::block::read_vec(&dev, part.offset, rec.length as usize).unwrap();
    let hits: Vec<usize> = img
        .windows(needle.len())
        .enumerate()
        .filter(|(_, w)| w[0] == needle[0] && *w == needle)
        .map(|(i, _)| i)
        .take(2)
        .collect();
    assert_eq!(
        hits.len(),
        1,
        "{} bytes found at {hits:?} in slot {slot}",
        needle.len()
    );
    hits[0] as u64
}

/// The bytes of `path` in release `name`'s root image (unsquashfs -cat).
pub fn release_file(name: &str, path: &str) -> Vec<u8> {
    let out = Command::new("unsquashfs")
        .arg("-cat")
        .arg(releases().release(name).join("root.img"))
        .arg(path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "unsquashfs -cat {path}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}
