//! Real KeelOS images under real QEMU (`-accel tcg`), and the image pipeline that builds them.
//!
//! Run with `cargo test --test qemu -- --nocapture` (as root: the build uses chroot-free
//! tools only, but mksquashfs -all-root and mkfs.ext4 -d are run on files the test makes).
//! Every boot prints `timing:` lines.

#![allow(clippy::unwrap_used, clippy::panic)] // test code: a failed step is a failed test

mod harness;
mod node;
mod server;

use harness::{scratch, timing, Vm, VmSpec};
use keelos::image::release;
use keelos::image::stub::{self, Stub};
use keelos::image::tree::Content;
use keelos::image::{debian::Versions, modules};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

/// How long a boot may take before the test gives up (TCG on a loaded 2-core machine).
const BOOT_LIMIT: Duration = Duration::from_secs(180);

fn versions() -> Versions {
    Versions::load(&harness::repo().join("image/versions.env")).expect("image/versions.env")
}

fn write_exe(path: &Path, bytes: &[u8]) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, bytes).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

fn sha(p: &Path) -> String {
    release::sha256_file(p).unwrap().0
}

/// The pinned Debian kernel and an initramfs whose /init is a probe that prints a line and
/// powers off: proves the kernel, our newc writer, the zstd compression, the console node and
/// the QEMU command line, independently of keel-init.
#[test]
fn probe_initramfs_reaches_userspace() {
    let dir = scratch("probe");
    let v = versions();
    let (kroot, vmlinuz) = release::kernel(&harness::cache(), &v).expect("fetch the kernel");
    let roots = modules::parse_list(
        &std::fs::read_to_string(harness::repo().join("image/modules.list")).unwrap(),
    );
    let msg = "keel-probe: userspace reached\n";
    let (tree, mods) = release::initramfs_tree(
        Content::Bytes(stub::elf(&Stub::SayAndPowerOff(msg.into()))),
        &kroot,
        &v.kernel_release,
        &roots,
    )
    .expect("initramfs tree");
    for m in [
        "virtio_blk",
        "virtio_net",
        "squashfs",
        "ext4",
        "overlay",
        "i6300esb",
        "watchdog",
    ] {
        assert!(mods.iter().any(|x| x == m), "{m} missing from {mods:?}");
    }
    let initrd = dir.path().join("initramfs.img");
    let len = release::write_initramfs(&tree, &initrd).unwrap();
    eprintln!("probe initramfs: {len} bytes, {} modules", mods.len());
    let disk = dir.path().join("disk.img");
    let f = std::fs::File::create(&disk).unwrap();
    f.set_len(64 << 20).unwrap();
    drop(f);
    let mut vm = Vm::start(VmSpec {
        kernel: vmlinuz,
        initrd,
        disk,
        append: String::new(),
        http_port: None,
        serial_log: dir.path().join("serial.log"),
    });
    vm.wait_serial(msg.trim_end(), 0, BOOT_LIMIT)
        .unwrap_or_else(|e| panic!("{e}"));
    timing(
        "probe",
        "qemu start to userspace (/init running)",
        vm.started.elapsed(),
    );
    let st = vm
        .wait_exit(Duration::from_secs(60))
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(st.success(), "qemu exit status {st}");
    let log = vm.serial();
    assert!(
        log.contains("Linux version 6.1"),
        "not the pinned kernel?\n{log}"
    );
    assert!(log.contains("reboot: Power down"), "{}", vm.tail(20));
}

fn keel_image() -> Command {
    Command::new(env!("CARGO_BIN_EXE_keel-image"))
}

fn build_release(out: &Path, version: &str, init: &Path, agent: &Path, extra: &[&str]) -> String {
    let o = keel_image()
        .args(["build", "release", "--version", version, "--out"])
        .arg(out)
        .arg("--init")
        .arg(init)
        .arg("--agent")
        .arg(agent)
        .arg("--image-dir")
        .arg(harness::repo().join("image"))
        .arg("--cache")
        .arg(&harness::cache().dir)
        .args(["--zstd-level", "3"])
        .args(extra)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(
        o.status.success(),
        "keel-image build release failed: {}{}",
        text,
        String::from_utf8_lossy(&o.stderr)
    );
    text
}

fn unsquashfs_list(img: &Path) -> String {
    let o = Command::new("unsquashfs")
        .args(["-lls", "-no-progress"])
        .arg(img)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// The whole release pipeline with stand-in binaries for keel-init and keel-agent: two builds
/// of the same inputs are byte-identical, the root holds what it must and nothing it must not,
/// the broken variants are what they claim, and a disk is made from it.
#[test]
fn release_pipeline_is_reproducible_and_audited() {
    let dir = scratch("release");
    let d = dir.path();
    let (init, agent) = (d.join("init-standin"), d.join("agent-standin"));
    write_exe(&init, &stub::elf(&Stub::Hang));
    write_exe(&agent, &stub::elf(&Stub::Exit(0)));
    let (a, b) = (d.join("a"), d.join("b"));
    let t0 = std::time::Instant::now();
    let out = build_release(&a, "1.0.0", &init, &agent, &[]);
    eprintln!("{out}");
    timing(
        "release",
        "build of one release (package cache warm after the first)",
        t0.elapsed(),
    );
    build_release(&b, "1.0.0", &init, &agent, &[]);
    for f in [
        release::ROOT_FILE,
        release::INITRAMFS_FILE,
        release::KERNEL_FILE,
    ] {
        assert_eq!(
            sha(&a.join(f)),
            sha(&b.join(f)),
            "{f} differs between two builds"
        );
    }
    let sum = std::fs::read_to_string(a.join("root.img.sha256")).unwrap();
    assert_eq!(sum, format!("{}  root.img\n", sha(&a.join("root.img"))));
    let list = unsquashfs_list(&a.join(release::ROOT_FILE));
    for want in [
        "/sbin/keel-init",
        "/usr/bin/keel-agent",
        "/usr/bin/containerd",
        "/usr/bin/containerd-shim-runc-v2",
        "/usr/sbin/runc",
        "/lib/x86_64-linux-gnu/libc.so.6",
        "/lib/x86_64-linux-gnu/libseccomp.so.2",
        "/lib64/ld-linux-x86-64.so.2",
        "/etc/os-release",
        "squashfs-root/state",
    ] {
        assert!(list.contains(want), "{want} not in the root image:\n{list}");
    }
    for line in list.lines() {
        let name = line.rsplit('/').next().unwrap_or("");
        assert!(
            !["sh", "bash", "dash", "busybox", "passwd"].contains(&name)
                && !name.starts_with("python"),
            "forbidden file in the image: {line}"
        );
        // -all-root and -all-time 0
        assert!(line.contains("root/root"), "{line}");
        assert!(line.contains("1970-01-01 00:00"), "{line}");
    }
    let rel: serde_json::Value =
        serde_json::from_slice(&std::fs::read(a.join("release.json")).unwrap()).unwrap();
    assert_eq!(rel["version"], "1.0.0");

    // A different version changes os-release and the digest, and little else.
    // It also carries a delta from 1.0.0 that turns a's image into c's exactly, and its
    // compressed form decompresses (with the stock zstd tool) to the image.
    let c = d.join("c");
    let out = build_release(
        &c,
        "1.0.1",
        &init,
        &agent,
        &["--delta-from", a.to_str().unwrap()],
    );
    eprintln!("{out}");
    assert_ne!(sha(&a.join("root.img")), sha(&c.join("root.img")));
    let patched = d.join("patched.img");
    let o = keel_image()
        .args(["delta", "apply"])
        .arg(a.join("root.img"))
        .arg(c.join("delta-from-1.0.0.bsdiff"))
        .arg(&patched)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(sha(&patched), sha(&c.join("root.img")));
    let unz = d.join("unz.img");
    let o = Command::new("zstd")
        .args(["-q", "-d", "-f", "-o"])
        .arg(&unz)
        .arg(c.join("root.img.zst"))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(sha(&unz), sha(&c.join("root.img")));
    let delta_len = std::fs::metadata(c.join("delta-from-1.0.0.bsdiff"))
        .unwrap()
        .len();
    let z_len = std::fs::metadata(c.join("root.img.zst")).unwrap().len();
    eprintln!(
        "sizes: 1.0.0 -> 1.0.1 delta {delta_len} bytes = {:.2}% of the compressed image ({z_len} bytes, zstd -3)",
        100.0 * delta_len as f64 / z_len as f64
    );

    // Broken variants.
    let bad = d.join("bad-agent");
    build_release(&bad, "9.0.0", &init, &agent, &["--broken", "agent-exits"]);
    let st = Command::new("unsquashfs")
        .args(["-cat"])
        .arg(bad.join("root.img"))
        .arg("usr/bin/keel-agent")
        .output()
        .unwrap();
    assert_eq!(st.stdout, stub::elf(&Stub::Exit(1)));
    let corrupt = d.join("bad-sqfs");
    build_release(
        &corrupt,
        "9.0.1",
        &init,
        &agent,
        &["--broken", "corrupt-squashfs"],
    );
    let head = std::fs::read(corrupt.join("root.img")).unwrap();
    assert_ne!(&head[..4], b"hsqs");
    assert!(!Command::new("unsquashfs")
        .arg("-l")
        .arg(corrupt.join("root.img"))
        .output()
        .unwrap()
        .status
        .success());

    // A disk from the release: refused over an existing file, made otherwise.
    let disk = d.join("disk.img");
    let mk = |extra: &[&str]| {
        keel_image()
            .args(["build", "disk", "--release"])
            .arg(&a)
            .arg("--out")
            .arg(&disk)
            .args(extra)
            .output()
            .unwrap()
    };
    let o = mk(&[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = mk(&[]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("already exists"));
    let show = keel_image()
        .args(["slots", "show", "--json"])
        .arg(&disk)
        .output()
        .unwrap();
    let j: serde_json::Value = serde_json::from_slice(&show.stdout).unwrap();
    assert_eq!(j["boot"], "a");
    assert_eq!(j["slots"][0]["successful"], true);
    let root_len = std::fs::metadata(a.join("root.img")).unwrap().len();
    eprintln!(
        "sizes: root.img {root_len} bytes, initramfs.img {} bytes, vmlinuz {} bytes",
        std::fs::metadata(a.join("initramfs.img")).unwrap().len(),
        std::fs::metadata(a.join("vmlinuz")).unwrap().len()
    );
}

/// Reads one file from an ext4 partition of a disk image (with debugfs, read-only).
fn ext4_cat(disk: &Path, label: &str, path: &str) -> String {
    let dev = keelos::block::FileDevice::open(disk, false).unwrap();
    let layout = keelos::disk::open(&dev).unwrap();
    let p = layout.partition(label).unwrap();
    let bytes = keelos::block::read_vec(&dev, p.offset, p.len as usize).unwrap();
    let tmp = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(tmp.path(), bytes).unwrap();
    let o = Command::new("debugfs")
        .args(["-R", &format!("cat {path}")])
        .arg(tmp.path())
        .output()
        .unwrap();
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// A v1 disk built by `keel-image build` boots with the real keel-init: stage 1 loads the
/// modules of the manifest, arms the watchdog, finds the disk by its labels, mounts slot A's
/// SquashFS and STATE, and hands over to stage 2 from the slot, which starts containerd
/// (Debian's, with the libraries the build copied), and containerd serves its socket.
///
/// keel-agent is not on this branch yet: a stand-in that exits at once takes its place, so the
/// node is not expected to become healthy here (that is the full v1 test's job).
#[test]
fn v1_boots_keel_init_mounts_the_slot_and_starts_containerd() {
    let dir = scratch("keel-init-boot");
    let d = dir.path();
    let agent = d.join("agent-standin");
    write_exe(&agent, &stub::elf(&Stub::Exit(0)));
    let rel = d.join("v1");
    build_release(
        &rel,
        "1.0.0",
        Path::new(env!("CARGO_BIN_EXE_keel-init")),
        &agent,
        &[],
    );
    let disk = d.join("disk.img");
    let o = keel_image()
        .args(["build", "disk", "--release"])
        .arg(&rel)
        .arg("--out")
        .arg(&disk)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let mut vm = Vm::start(VmSpec {
        kernel: rel.join("vmlinuz"),
        initrd: rel.join("initramfs.img"),
        disk: disk.clone(),
        append: String::new(),
        http_port: None,
        serial_log: d.join("serial.log"),
    });
    let at = vm
        .wait_serial("Run /init as init process", 0, BOOT_LIMIT)
        .unwrap_or_else(|e| panic!("{e}"));
    timing(
        "keel-init boot",
        "qemu start to userspace (stage 1 /init)",
        vm.started.elapsed(),
    );
    let at = vm
        .wait_serial("i6300esb.ko loaded", at, BOOT_LIMIT)
        .unwrap_or_else(|e| panic!("{e}"));
    let at = vm
        .wait_serial("booting slot a", at, BOOT_LIMIT)
        .unwrap_or_else(|e| panic!("{e}"));
    let at = vm
        .wait_serial("stage 2 running", at, BOOT_LIMIT)
        .unwrap_or_else(|e| panic!("{e}"));
    timing(
        "keel-init boot",
        "qemu start to stage 2 (slot a mounted, STATE mounted)",
        vm.started.elapsed(),
    );
    vm.wait_serial("containerd: started as pid", at, BOOT_LIMIT)
        .unwrap_or_else(|e| panic!("{e}"));
    // containerd writes its log to STATE; wait until it says it serves its socket, then cut
    // the power (the log is read from the disk image afterwards).
    let t0 = std::time::Instant::now();
    let mut log = String::new();
    while t0.elapsed() < BOOT_LIMIT {
        std::thread::sleep(Duration::from_secs(3));
        log = ext4_cat(&disk, keelos::disk::STATE, "/log/containerd.log");
        if log.contains("msg=serving... address=/run/containerd/containerd.sock") {
            break;
        }
    }
    timing(
        "keel-init boot",
        "qemu start to containerd's serving line found on STATE (after guest writeback)",
        vm.started.elapsed(),
    );
    vm.kill();
    assert!(
        log.contains("msg=serving... address=/run/containerd/containerd.sock"),
        "containerd never served its socket; its log:\n{log}\nserial:\n{}",
        vm.tail(30)
    );
    let serial = vm.serial();
    assert!(!serial.contains("Kernel panic"), "{serial}");
    // The successful slot A is still the one that boots; the boot spent no tries.
    let show = keel_image()
        .args(["slots", "show", "--json"])
        .arg(&disk)
        .output()
        .unwrap();
    let j: serde_json::Value = serde_json::from_slice(&show.stdout).unwrap();
    assert_eq!(j["boot"], "a", "{j}");
}

/// Test 1: a v1 node built with the PKI from `osctl gen pki` boots; `osctl status` over mutual
/// TLS (through QEMU's forwarded port) shows v1 (its image record: version and SHA-256) booted
/// from slot A, slot A successful (the factory disk starts it successful; keel-init marking a
/// *new* slot after its health window is the update tests' job); containerd is
/// running and serves its socket.
#[test]
fn node_v1_boots_and_osctl_status_shows_slot_a_successful() {
    let mut n = node::Node::new("node-v1", None);
    n.boot();
    let (_, waited) = n.wait_agent(Duration::from_secs(600));
    timing(
        "v1",
        "qemu start to agent ready (osctl status answers)",
        n.vm().started.elapsed(),
    );
    let _ = waited;
    let (st, _) = n.wait_status(
        Duration::from_secs(300),
        "slot a booted and marked successful",
        |s| s["booted_slot"] == "a" && node::Node::slot(s, "a")["successful"] == true,
    );
    timing(
        "v1",
        "qemu start to status showing slot a booted and successful",
        n.vm().started.elapsed(),
    );
    assert_eq!(st["os_version"], "KeelOS 1.0.0", "{st}");
    let a = node::Node::slot(&st, "a");
    assert_eq!(a["booted"], true, "{st}");
    assert_eq!(a["image"]["version"], "1.0.0", "{st}");
    assert_eq!(
        a["image"]["sha256"],
        node::releases().sha256("v1").as_str(),
        "{st}"
    );
    // containerd: started by keel-init, and its socket answers (its serving line is logged
    // only once the socket is listening; the log is read from STATE after the guest's
    // writeback).
    n.vm()
        .wait_serial("containerd: started as pid", 0, BOOT_LIMIT)
        .unwrap_or_else(|e| panic!("{e}"));
    let disk = n.disk.clone();
    let t0 = std::time::Instant::now();
    let mut log = String::new();
    while t0.elapsed() < Duration::from_secs(300) {
        log = ext4_cat(&disk, keelos::disk::STATE, "/log/containerd.log");
        if log.contains("msg=serving... address=/run/containerd/containerd.sock") {
            break;
        }
        std::thread::sleep(Duration::from_secs(3));
    }
    assert!(
        log.contains("msg=serving... address=/run/containerd/containerd.sock"),
        "containerd never served its socket; its log:\n{log}\nserial:\n{}",
        n.vm().tail(30)
    );
    let sizes = |f: &str| {
        std::fs::metadata(node::releases().release("v1").join(f))
            .unwrap()
            .len()
    };
    eprintln!(
        "sizes: v1 root.img {} bytes, initramfs.img {} bytes",
        sizes("root.img"),
        sizes("initramfs.img")
    );
    n.vm().kill();
}
