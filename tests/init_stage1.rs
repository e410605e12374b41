//! keel-init from stage 1 to stage 2 without a VM: a directory stands in for the initramfs
//! (keel-init as /init with the C libraries it links), and keel-init runs there as PID 1 of new
//! PID and mount namespaces (`unshare --pid --mount --fork chroot`). It mounts the kernel file
//! systems, chooses slot B of a real disk image (`keel.disk=`, since the image file is no block
//! device that the sysfs scan could find), spends its try, mounts B's SquashFS and STATE (ext4)
//! through loop devices, switches root and executes B's own /sbin/keel-init as stage 2, which
//! supervises the services of STATE's node configuration. The test talks to it through the
//! control socket (reached through /proc/<pid>/root) and powers it off; stage 2 then unmounts
//! STATE. A slot whose SquashFS is corrupt makes the boot stage mark it failed and boot the other
//! slot in the same power-on. These slot images carry no kernel (/boot), so the boot stage
//! switches root into them, as it does for images from before kernels travelled with the slot;
//! the kexec hand-over needs a kernel and is tested in QEMU (qemu/).
//!
//! What a VM would add and this cannot: a kernel command line, module loading, a watchdog
//! device and a virtio disk found by scanning. The image/QEMU tests cover those.

#![allow(clippy::panic, clippy::unwrap_used, clippy::expect_used)]

use keelos::block::{BlockDevice, FileDevice};
use keelos::bootctl::{self, store, Slot};
use keelos::config::{NodeConfig, ServiceConfig};
use keelos::control::{Client, ServiceState};
use keelos::disk::{self, LayoutSpec, MIB};
use keelos::init::bootdisk::LoopDevice;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const KEEL_INIT: &str = env!("CARGO_BIN_EXE_keel-init");
const PATIENCE: Duration = Duration::from_secs(90);

/// Copy `bin` to `root/<dest>` and the shared libraries it links to their own paths.
fn install(root: &Path, bin: &Path, dest: &str) {
    let to = root.join(dest.trim_start_matches('/'));
    std::fs::create_dir_all(to.parent().unwrap()).unwrap();
    std::fs::copy(bin, &to).unwrap();
    let out = Command::new("ldd").arg(bin).output().expect("ldd");
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)" or "/lib64/ld-linux... (0x...)"
        let path = line
            .split("=>")
            .last()
            .and_then(|r| r.split_whitespace().next())
            .filter(|p| p.starts_with('/'));
        if let Some(p) = path {
            let t = root.join(p.trim_start_matches('/'));
            std::fs::create_dir_all(t.parent().unwrap()).unwrap();
            std::fs::copy(p, &t).unwrap();
        }
    }
}

fn squashfs(src: &Path, out: &Path) {
    let st = Command::new("mksquashfs")
        .arg(src)
        .arg(out)
        .args(["-noappend", "-quiet", "-no-progress"])
        .status()
        .expect("mksquashfs: install squashfs-tools");
    assert!(st.success());
}

/// Run `f` in a thread with its own mount namespace.
fn in_mount_namespace<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    std::thread::spawn(move || {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS).expect("unshare: run as root");
        nix::mount::mount(
            None::<&str>,
            "/",
            None::<&str>,
            nix::mount::MsFlags::MS_REC | nix::mount::MsFlags::MS_PRIVATE,
            None::<&str>,
        )
        .unwrap();
        f()
    })
    .join()
    .unwrap_or_else(|p| std::panic::resume_unwind(p))
}

fn flags(img: &Path) -> bootctl::SlotFlags {
    store::load(&FileDevice::open(img, false).unwrap())
        .unwrap()
        .1
}

/// A slot root: its own keel-init, a service binary, the mount points and `/etc/slot`.
fn slot_image(t: &Path, letter: &str) -> Vec<u8> {
    let root = t.join(format!("root-{letter}"));
    for d in ["proc", "sys", "dev", "run", "state", "var", "etc", "tmp"] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    std::fs::write(root.join("etc/slot"), format!("{letter}\n")).unwrap();
    install(&root, Path::new(KEEL_INIT), "/sbin/keel-init");
    install(&root, Path::new("/bin/sleep"), "/bin/sleep");
    let sq = t.join(format!("{letter}.sqfs"));
    squashfs(&root, &sq);
    std::fs::read(&sq).unwrap()
}

/// The initramfs directory and, in it, a disk image: A successful holding `a`, B activated
/// with 3 tries holding `b`, STATE ext4 with a node configuration of two services.
fn machine(t: &Path, a: &[u8], b: &[u8]) -> (PathBuf, PathBuf, disk::Partition) {
    let initramfs = t.join("initramfs");
    install(&initramfs, Path::new(KEEL_INIT), "/init");
    std::fs::write(
        initramfs.join("cmdline"),
        "console=ttyS0 keel.disk=/disk.img keel.watchdog=0 keel.disk_wait=10\n",
    )
    .unwrap();
    let img = initramfs.join("disk.img");
    let f = std::fs::File::create(&img).unwrap();
    f.set_len(192 * MIB).unwrap();
    drop(f);
    let mut dev = FileDevice::open(&img, true).unwrap();
    let root_size = (a.len().max(b.len()) as u64).div_ceil(MIB) * MIB + MIB;
    disk::create(
        &mut dev,
        LayoutSpec {
            esp_size: MIB,
            root_size,
            state_size: None,
        },
    )
    .unwrap();
    let layout = disk::open(&dev).unwrap();
    dev.write_at(layout.root_a.offset, a).unwrap();
    dev.write_at(layout.root_b.offset, b).unwrap();
    dev.flush().unwrap();
    store::update(&mut dev, |f| bootctl::activate(f, Slot::A, None, 3)).unwrap();
    store::update(&mut dev, |f| bootctl::mark_successful(f, Slot::A)).unwrap();
    store::update(&mut dev, |f| {
        bootctl::activate(f, Slot::B, Some(Slot::A), 3)
    })
    .unwrap();
    drop(dev);
    let st = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-E"])
        .arg(format!("offset={}", layout.state.offset))
        .arg(&img)
        .arg(format!("{}k", layout.state.len / 1024))
        .status()
        .expect("mkfs.ext4");
    assert!(st.success());
    let mut cfg = NodeConfig {
        services: vec![
            ServiceConfig::new("keel-agent", "/bin/sleep", &["1000"]),
            ServiceConfig::new("containerd", "/bin/sleep", &["1001"]),
        ],
        ..NodeConfig::default()
    };
    cfg.watchdog.device = None;
    cfg.shutdown.grace_ms = 1000;
    let (img2, state) = (img.clone(), layout.state.clone());
    in_mount_namespace(move || {
        let l = LoopDevice::attach(&img2, state.offset, state.len, true).unwrap();
        let m = tempfile::tempdir().unwrap();
        nix::mount::mount(
            Some(&l.path),
            m.path(),
            Some("ext4"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        )
        .unwrap();
        std::fs::create_dir_all(m.path().join("config")).unwrap();
        keelos::config::store(&m.path().join("config/node.json"), &cfg).unwrap();
        nix::mount::umount2(m.path(), nix::mount::MntFlags::empty()).unwrap();
    });
    (initramfs, img, layout.state)
}

/// One boot of the machine: keel-init as /init, PID 1 of new PID and mount namespaces.
struct Boot {
    unshare: std::process::Child,
    console: PathBuf,
    start: Instant,
}

impl Boot {
    fn start(initramfs: &Path, console: PathBuf) -> Boot {
        let out = std::fs::File::create(&console).unwrap();
        let unshare = Command::new("unshare")
            .args([
                "--pid",
                "--mount",
                "--propagation",
                "private",
                "--fork",
                "--kill-child",
            ])
            .arg("chroot")
            .arg(initramfs)
            .args(["/init", "--cmdline", "/cmdline"])
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .expect("unshare");
        Boot {
            unshare,
            console,
            start: Instant::now(),
        }
    }

    fn console(&self) -> String {
        std::fs::read_to_string(&self.console).unwrap_or_default()
    }

    fn wait(&mut self, what: &str) {
        if let Ok(Some(st)) = self.unshare.try_wait() {
            panic!(
                "keel-init ended ({st}) while waiting for {what}:\n{}",
                self.console()
            );
        }
        if self.start.elapsed() > PATIENCE {
            panic!("gave up waiting for {what}:\n{}", self.console());
        }
        std::thread::sleep(Duration::from_millis(100));
    }

    /// keel-init's PID outside the namespace: unshare's child (chroot, which became /init).
    fn init_pid(&mut self) -> String {
        loop {
            let parent = self.unshare.id().to_string();
            let found = std::fs::read_dir("/proc").unwrap().flatten().find_map(|e| {
                let stat = std::fs::read_to_string(e.path().join("stat")).ok()?;
                let rest = &stat[stat.rfind(')')? + 2..];
                (rest.split_whitespace().nth(1)? == parent).then(|| e.file_name())
            });
            if let Some(p) = found {
                return p.to_string_lossy().into_owned();
            }
            self.wait("keel-init's process");
        }
    }

    /// The signal that ended the namespace.
    fn end(&mut self) -> Option<i32> {
        loop {
            if let Some(st) = self.unshare.try_wait().unwrap() {
                return st.signal();
            }
            assert!(
                self.start.elapsed() < PATIENCE,
                "keel-init did not end:\n{}",
                self.console()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Wait for stage 2 to run both services; returns the control socket path.
    fn running(&mut self) -> (String, PathBuf) {
        let init = self.init_pid();
        let sock = PathBuf::from(format!("/proc/{init}/root/run/keel/init.sock"));
        loop {
            let s = Client::connect(&sock, Duration::from_secs(5))
                .and_then(|mut c| c.list_services())
                .ok()
                .filter(|s| s.iter().all(|x| x.state == ServiceState::Running));
            if let Some(s) = s {
                let names: Vec<_> = s.iter().map(|s| s.name.as_str()).collect();
                assert_eq!(names, ["keel-agent", "containerd"]);
                return (init, sock);
            }
            self.wait("stage 2 to run the services");
        }
    }
}

impl Drop for Boot {
    fn drop(&mut self) {
        let _ = self.unshare.kill();
        let _ = self.unshare.wait();
    }
}

/// Read files of STATE (mounted read-only in a private mount namespace).
fn read_state(img: &Path, state: &disk::Partition, files: &[&str]) -> Vec<String> {
    let (img, state) = (img.to_path_buf(), state.clone());
    let files: Vec<String> = files.iter().map(|s| s.to_string()).collect();
    in_mount_namespace(move || {
        let l = LoopDevice::attach(&img, state.offset, state.len, false).unwrap();
        let m = tempfile::tempdir().unwrap();
        nix::mount::mount(
            Some(&l.path),
            m.path(),
            Some("ext4"),
            nix::mount::MsFlags::MS_RDONLY,
            None::<&str>,
        )
        .unwrap();
        let r = files
            .iter()
            .map(|p| std::fs::read_to_string(m.path().join(p)).unwrap_or_default())
            .collect();
        nix::mount::umount2(m.path(), nix::mount::MntFlags::empty()).unwrap();
        r
    })
}

#[test]
fn stage_one_boots_slot_b_and_hands_over_to_its_stage_two() {
    let t = tempfile::tempdir().unwrap();
    let b = slot_image(t.path(), "B");
    // A's bytes are no file system: this boot never mounts A
    let (initramfs, img, state) = machine(t.path(), &[0u8; 4096], &b);
    let mut boot = Boot::start(&initramfs, t.path().join("console"));
    let (init, sock) = boot.running();

    // stage 1 spent B's try before mounting it, and stage 2 runs from B's root
    let f = flags(&img);
    assert_eq!((f.b.tries(), f.b.successful()), (2, false), "{f:?}");
    let slot = std::fs::read_to_string(format!("/proc/{init}/root/etc/slot")).unwrap();
    assert_eq!(slot, "B\n");
    let mut c = Client::connect(&sock, Duration::from_secs(5)).unwrap();
    let own = c.logs("keel-init", None).unwrap();
    assert!(own.contains("stage 2 running 2 service(s)"), "{own}");
    let out = boot.console();
    for want in [
        "booting slot b (priority=2 tries=2 successful=0), one try spent",
        "slot b opened read-only from /dev/loop",
        "slot b carries no kernel (/boot)",
        "stage 2 running 2 service(s)",
    ] {
        assert!(out.contains(want), "missing {want:?} in:\n{out}");
    }
    println!("{out}");

    c.power_off().unwrap();
    assert_eq!(boot.end(), Some(libc::SIGINT), "{}", boot.console());
    let out = boot.console();
    assert!(out.contains("PowerOff now"), "{out}");
    assert!(!out.contains("cannot unmount"), "{out}");

    // what stage 2 kept on STATE survived its unmount
    let r = read_state(&img, &state, &["log/keel-init.log", "log/keel-agent.log"]);
    assert!(r[0].contains("all services stopped"), "{}", r[0]);
    assert!(r[1].contains("killed by signal SIGTERM"), "{}", r[1]);
}

#[test]
fn a_slot_that_does_not_mount_is_marked_failed_and_the_other_boots_in_the_same_power_on() {
    let t = tempfile::tempdir().unwrap();
    let a = slot_image(t.path(), "A");
    let mut b = slot_image(t.path(), "B");
    b[..512].fill(0xAA); // superblock destroyed
    let (initramfs, img, state) = machine(t.path(), &a, &b);

    let mut boot = Boot::start(&initramfs, t.path().join("console"));
    let (init, sock) = boot.running();
    let out = boot.console();
    for want in [
        "booting slot b (priority=2 tries=2 successful=0), one try spent",
        "slot b refused: its root file system",
        "slot b marked failed (priority=2 tries=0",
        // a successful slot's tries count its boots until health
        "booting slot a (priority=1 tries=1 successful=1)",
    ] {
        assert!(out.contains(want), "missing {want:?} in:\n{out}");
    }
    let f = flags(&img);
    assert_eq!((f.b.tries(), f.b.successful()), (0, false), "{f:?}");
    let slot = std::fs::read_to_string(format!("/proc/{init}/root/etc/slot")).unwrap();
    assert_eq!(slot, "A\n");
    // stage 2 was told what the boot stage refused (no kexec here: through its arguments)
    let cmd = std::fs::read(format!("/proc/{init}/cmdline")).unwrap();
    let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
    assert!(
        cmd.contains("keel.refused=b:squashfs-mount-failed keel.fallback=b"),
        "{cmd}"
    );
    Client::connect(&sock, Duration::from_secs(5))
        .unwrap()
        .power_off()
        .unwrap();
    assert_eq!(boot.end(), Some(libc::SIGINT), "{}", boot.console());
    // the boot journal on STATE: this boot, what was refused, and how it ended
    let j = &read_state(&img, &state, &["boot/journal.json"])[0];
    let j: serde_json::Value = serde_json::from_str(j).unwrap();
    let e = &j["entries"][0];
    assert_eq!(e["slot"], "a", "{j}");
    assert_eq!(e["fallback_from"], "b", "{j}");
    assert_eq!(e["refused"][0]["slot"], "b", "{j}");
    assert_eq!(e["refused"][0]["reason"], "squashfs-mount-failed", "{j}");
    assert_eq!(e["end"], "shutdown", "{j}");
    let why = keelos::control::journal::last_rollback(
        &serde_json::from_value::<keelos::control::journal::Journal>(j.clone())
            .unwrap()
            .entries,
    )
    .unwrap();
    println!("last rollback: {why}");
    assert!(why.starts_with("slot b"), "{why}");
}
