//! keel-init from stage 1 to stage 2 without a VM: a directory stands in for the initramfs
//! (keel-init as /init with the C libraries it links), and keel-init runs there as PID 1 of new
//! PID and mount namespaces (`unshare --pid --mount --fork chroot`). It mounts the kernel file
//! systems, chooses slot B of a real disk image (`keel.disk=`, since the image file is no block
//! device that the sysfs scan could find), spends its try, mounts B's SquashFS and STATE (ext4)
//! through loop devices, switches root and executes B's own /sbin/keel-init as stage 2, which
//! supervises the services of STATE's node configuration. The test talks to it through the
//! control socket (reached through /proc/<pid>/root) and powers it off; stage 2 then unmounts
//! STATE.
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

#[test]
fn stage_one_boots_slot_b_and_hands_over_to_its_stage_two() {
    let t = tempfile::tempdir().unwrap();
    let initramfs = t.path().join("initramfs");
    install(&initramfs, Path::new(KEEL_INIT), "/init");
    std::fs::write(
        initramfs.join("cmdline"),
        "console=ttyS0 keel.disk=/disk.img keel.watchdog=0 keel.disk_wait=10\n",
    )
    .unwrap();

    // slot B's root: its own keel-init, a service binary and the mount points
    let root = t.path().join("root-b");
    for d in ["proc", "sys", "dev", "run", "state", "var", "etc", "tmp"] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    std::fs::write(root.join("etc/slot"), "B\n").unwrap();
    install(&root, Path::new(KEEL_INIT), "/sbin/keel-init");
    install(&root, Path::new("/bin/sleep"), "/bin/sleep");
    let sq_b = t.path().join("b.sqfs");
    squashfs(&root, &sq_b);
    let b = std::fs::read(&sq_b).unwrap();

    // the disk: A successful (its bytes are not a file system: it is never mounted here),
    // B activated with 3 tries, STATE ext4 with a node configuration
    let img = initramfs.join("disk.img");
    let f = std::fs::File::create(&img).unwrap();
    f.set_len(192 * MIB).unwrap();
    drop(f);
    let mut dev = FileDevice::open(&img, true).unwrap();
    let root_size = (b.len() as u64).div_ceil(MIB) * MIB + MIB;
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
    dev.write_at(layout.root_b.offset, &b).unwrap();
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

    let log_path = t.path().join("console");
    let console = std::fs::File::create(&log_path).unwrap();
    let mut unshare = Command::new("unshare")
        .args([
            "--pid",
            "--mount",
            "--propagation",
            "private",
            "--fork",
            "--kill-child",
        ])
        .arg("chroot")
        .arg(&initramfs)
        .args(["/init", "--cmdline", "/cmdline"])
        .stdin(Stdio::null())
        .stdout(console.try_clone().unwrap())
        .stderr(console)
        .spawn()
        .expect("unshare");
    let console = || std::fs::read_to_string(&log_path).unwrap_or_default();
    let start = Instant::now();
    let wait = |what: &str, unshare: &mut std::process::Child| {
        if let Ok(Some(st)) = unshare.try_wait() {
            panic!(
                "keel-init ended ({st}) while waiting for {what}:\n{}",
                console()
            );
        }
        if start.elapsed() > PATIENCE {
            panic!("gave up waiting for {what}:\n{}", console());
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    // keel-init's PID outside the namespace: unshare's child (chroot, which became /init)
    let init = loop {
        let parent = unshare.id().to_string();
        let found = std::fs::read_dir("/proc").unwrap().flatten().find_map(|e| {
            let stat = std::fs::read_to_string(e.path().join("stat")).ok()?;
            let rest = &stat[stat.rfind(')')? + 2..];
            (rest.split_whitespace().nth(1)? == parent).then(|| e.file_name())
        });
        if let Some(p) = found {
            break p.to_string_lossy().into_owned();
        }
        wait("keel-init's process", &mut unshare);
    };
    let sock = PathBuf::from(format!("/proc/{init}/root/run/keel/init.sock"));
    let services = loop {
        let s = Client::connect(&sock, Duration::from_secs(5))
            .and_then(|mut c| c.list_services())
            .ok()
            .filter(|s| s.iter().all(|x| x.state == ServiceState::Running));
        if let Some(s) = s {
            break s;
        }
        wait("stage 2 to run the services", &mut unshare);
    };
    let names: Vec<_> = services.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["keel-agent", "containerd"]);

    // stage 1 spent B's try before mounting it, and stage 2 runs from B's root
    let f = flags(&img);
    assert_eq!((f.b.tries(), f.b.successful()), (2, false), "{f:?}");
    let slot = std::fs::read_to_string(format!("/proc/{init}/root/etc/slot")).unwrap();
    assert_eq!(slot, "B\n");
    let mut c = Client::connect(&sock, Duration::from_secs(5)).unwrap();
    let own = c.logs("keel-init", None).unwrap();
    assert!(own.contains("stage 2 running 2 service(s)"), "{own}");
    let out = console();
    for want in [
        "booting slot b (priority=2 tries=2 successful=0), one try spent",
        "slot b mounted from /dev/loop",
        "stage 2 running 2 service(s)",
    ] {
        assert!(out.contains(want), "missing {want:?} in:\n{out}");
    }
    println!("{out}");

    c.power_off().unwrap();
    let st = loop {
        if let Some(st) = unshare.try_wait().unwrap() {
            break st;
        }
        assert!(start.elapsed() < PATIENCE, "no power off:\n{}", console());
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(st.signal(), Some(libc::SIGINT), "{}", console());
    let out = console();
    assert!(out.contains("PowerOff now"), "{out}");
    assert!(!out.contains("cannot unmount"), "{out}");

    // what stage 2 kept on STATE survived its unmount
    let (img2, state) = (img.clone(), layout.state.clone());
    let (own, agent) = in_mount_namespace(move || {
        let l = LoopDevice::attach(&img2, state.offset, state.len, false).unwrap();
        let m = tempfile::tempdir().unwrap();
        nix::mount::mount(
            Some(&l.path),
            m.path(),
            Some("ext4"),
            nix::mount::MsFlags::MS_RDONLY,
            None::<&str>,
        )
        .unwrap();
        let read = |p: &str| std::fs::read_to_string(m.path().join(p)).unwrap_or_default();
        let r = (read("log/keel-init.log"), read("log/keel-agent.log"));
        nix::mount::umount2(m.path(), nix::mount::MntFlags::empty()).unwrap();
        r
    });
    assert!(own.contains("all services stopped"), "{own}");
    assert!(agent.contains("killed by signal SIGTERM"), "{agent}");
}
