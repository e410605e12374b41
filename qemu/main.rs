//! Real KeelOS images under real QEMU (`-accel tcg`), and the image pipeline that builds them.
//!
//! Run with `cargo test --test qemu -- --nocapture` (as root: the build uses chroot-free
//! tools only, but mksquashfs -all-root and mkfs.ext4 -d are run on files the test makes).
//! Every boot prints `timing:` lines.

#![allow(clippy::unwrap_used, clippy::panic)] // test code: a failed step is a failed test

mod harness;
mod kubernetes;
mod node;
mod server;

use harness::{scratch, timing, Boot, Vm, VmSpec};
use keelos::image::release;
use keelos::image::stub::{self, Stub};
use keelos::image::tree::Content;
use keelos::image::{debian::Versions, modules};
use node::Node;
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
        boot: Boot::Direct {
            kernel: vmlinuz,
            initrd,
            append: String::new(),
        },
        disk,
        http_port: None,
        forwards: Vec::new(),
        memory_mib: None,
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
        "/usr/lib/cni/bridge",
        "/usr/lib/cni/host-local",
        "/usr/lib/cni/loopback",
        "/usr/lib/cni/portmap",
        "/usr/bin/mount",
        "/usr/bin/umount",
        "/lib/x86_64-linux-gnu/libmount.so.1",
        "/lib/x86_64-linux-gnu/libc.so.6",
        "/lib/x86_64-linux-gnu/libseccomp.so.2",
        "/lib64/ld-linux-x86-64.so.2",
        "/etc/os-release",
        "/etc/hosts",
        "squashfs-root/state",
    ] {
        assert!(list.contains(want), "{want} not in the root image:\n{list}");
    }
    // programs keep their execute bits wherever the package puts them (containerd runs the
    // CNI plugins from /usr/lib/cni; kubelet runs mount)
    for prog in [
        "/usr/lib/cni/bridge",
        "/usr/lib/cni/host-local",
        "/usr/lib/cni/loopback",
        "/usr/bin/mount",
        "/usr/bin/umount",
        "/usr/sbin/runc",
    ] {
        let line = list
            .lines()
            .find(|l| l.ends_with(prog))
            .unwrap_or_else(|| panic!("{prog} not in the root image"));
        assert!(line.starts_with("-rwxr-xr-x"), "{line}");
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
        serde_json::from_slice(&std::fs::read(a.join("build.json")).unwrap()).unwrap();
    assert_eq!(rel["version"], "1.0.0");
    // The root image ends with its dm-verity tree; the manifest's root hash checks it with
    // the stock veritysetup, and a flipped byte of the SquashFS fails the check.
    let m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(a.join("release.json")).unwrap()).unwrap();
    let (root_hash, hash_offset) = (
        m["verity"]["root_hash"].as_str().unwrap().to_string(),
        m["verity"]["hash_offset"].as_u64().unwrap(),
    );
    assert_eq!(m["verity"]["data_size"].as_u64(), Some(hash_offset), "{m}");
    let veritysetup = |image: &Path| {
        Command::new("/usr/sbin/veritysetup")
            .arg("verify")
            .arg(format!("--hash-offset={hash_offset}"))
            .arg(image)
            .arg(image)
            .arg(&root_hash)
            .output()
            .unwrap()
    };
    let o = veritysetup(&a.join("root.img"));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let flipped = d.join("flipped.img");
    let mut bytes = std::fs::read(a.join("root.img")).unwrap();
    bytes[(hash_offset / 2) as usize] ^= 1;
    std::fs::write(&flipped, bytes).unwrap();
    assert!(!veritysetup(&flipped).status.success());

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
/// A stand-in agent that exits at once takes keel-agent's place here, so the node is not
/// expected to become healthy (the node tests below boot the real agent).
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
        boot: Boot::Direct {
            kernel: rel.join("vmlinuz"),
            initrd: rel.join("initramfs.img"),
            append: String::new(),
        },
        disk: disk.clone(),
        http_port: None,
        forwards: Vec::new(),
        memory_mib: None,
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
    let mut n = node::Node::new("node-v1", "v1");
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

/// A node whose configuration has no `network` section gets its address by DHCP from QEMU's
/// built-in server (10.0.2.15), is reachable by the agent's forwarded port at that address, and
/// reaches health with the network judged up. With `restrict=on` (the only user network these
/// tests use) QEMU's server offers neither a router nor a DNS server, and the node says so: its
/// /run/keel/resolv.conf (which the image's /etc/resolv.conf links to) holds no resolver. The
/// resolver path itself is tested against dnsmasq in tests/net_dhcp.rs.
#[test]
fn node_without_network_config_gets_its_address_by_dhcp() {
    let mut n = node::Node::with_config("node-dhcp", "v1", |c| {
        c.as_object_mut().unwrap().remove("network");
    });
    n.boot();
    let at = n
        .vm()
        .wait_serial(
            "eth0 DHCP lease 10.0.2.15/24 router none dns none",
            0,
            BOOT_LIMIT,
        )
        .unwrap_or_else(|e| panic!("{e}"));
    timing("dhcp", "qemu start to DHCP lease", n.vm().started.elapsed());
    n.vm()
        .wait_serial(
            "wrote /run/keel/resolv.conf: no resolver in the lease",
            0,
            BOOT_LIMIT,
        )
        .unwrap_or_else(|e| panic!("{e}"));
    let (_, _) = n.wait_agent(Duration::from_secs(600));
    timing(
        "dhcp",
        "qemu start to agent ready (osctl status answers)",
        n.vm().started.elapsed(),
    );
    // slot A is successful from the factory; health is reached only with the network up
    n.vm()
        .wait_serial("boot healthy", at, Duration::from_secs(300))
        .unwrap_or_else(|e| panic!("{e}"));
    let (st, _) = n.wait_booted_successful("a", Duration::from_secs(300));
    timing(
        "dhcp",
        "qemu start to boot healthy",
        n.vm().started.elapsed(),
    );
    assert_eq!(st["os_version"], "KeelOS 1.0.0", "{st}");
    let serial = n.vm().serial();
    assert!(
        !serial.contains("network: 10.0.2.15/24") && !serial.contains("(static)"),
        "the static path ran: {serial}"
    );
    n.vm().kill();
}

/// How long the agent may take to answer after a (re)boot before a test gives up.
const AGENT_LIMIT: Duration = Duration::from_secs(300);

/// How long a node may take to give up on a broken slot and come back on the other: three
/// tries, each up to the boot deadline plus a boot, with room for a loaded machine.
fn rollback_limit() -> Duration {
    Duration::from_secs(3 * (node::BOOT_DEADLINE_SECS + 90) + 120)
}

/// Boot a fresh node and wait for its agent; prints the QEMU-start-to-agent-ready time.
fn boot_to_agent(n: &mut Node, test: &str) -> serde_json::Value {
    n.boot();
    let (st, _) = n.wait_agent(AGENT_LIMIT);
    timing(
        test,
        "qemu start to agent ready (osctl status answers)",
        n.vm().started.elapsed(),
    );
    st
}

/// `osctl reboot`, then wait for the node to come back on `slot` and mark it successful.
/// Prints reboot-to-agent-ready and reboot-to-successful.
fn reboot_into(n: &mut Node, test: &str, slot: &'static str) -> serde_json::Value {
    let t0 = n.reboot();
    n.wait_status(AGENT_LIMIT, &format!("booted from slot {slot}"), |s| {
        s["booted_slot"] == slot
    });
    timing(test, "reboot to agent ready", t0.elapsed());
    let (st, _) = n.wait_booted_successful(slot, AGENT_LIMIT);
    timing(
        test,
        &format!("reboot to slot {slot} marked successful"),
        t0.elapsed(),
    );
    st
}

fn installed(n: &mut Node, p: &node::Published, delta: bool, test: &str) -> serde_json::Value {
    let t0 = std::time::Instant::now();
    let r = n
        .install(p, delta)
        .unwrap_or_else(|e| panic!("osctl install {}: {e}", p.version));
    timing(
        test,
        &format!(
            "install of {} ({})",
            p.version,
            if delta { "delta" } else { "full" }
        ),
        t0.elapsed(),
    );
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(r["sha256"], p.sha256.as_str(), "{r}");
    r
}

/// The status of a node whose slot `slot` holds `release`.
fn assert_slot_holds(st: &serde_json::Value, slot: &str, release: &str) {
    let r = node::releases();
    let s = Node::slot(st, slot);
    assert_eq!(s["image"]["version"], r.version(release), "{st}");
    assert_eq!(s["image"]["sha256"], r.sha256(release).as_str(), "{st}");
}

/// Issue 12, test 1, and the boot-time figures: the disk alone boots under OVMF (UEFI): the
/// firmware starts the boot-stage UKI from the ESP, the boot stage chooses slot A and kexecs A's
/// own kernel, and the agent answers; Status shows slot A, the kernel release and the boot
/// stage's version. The same disk is first booted the way every node booted before the boot
/// stage (QEMU loads the kernel and initramfs, which mount slot A themselves, no kexec), so
/// both times come from one run.
#[test]
fn the_disk_alone_boots_under_uefi_through_the_boot_stage() {
    let test = "uefi boot";
    let mut n = Node::new("uefi-boot", "v1");
    n.boot_direct("keel.slot=a keel.boot=good");
    n.wait_agent(AGENT_LIMIT);
    let direct = n.vm().started.elapsed();
    timing(
        test,
        "direct kernel boot into slot a, no boot stage (the old path) to agent ready",
        direct,
    );
    n.vm().kill();

    n.boot();
    let limit = BOOT_LIMIT;
    let mut marks = Vec::new();
    let mut at = 0;
    for (pattern, what) in [
        (
            "Linux version",
            "firmware (OVMF + UKI stub) to the boot stage's kernel",
        ),
        ("] boot stage ", "boot stage kernel to keel-init"),
        (
            "kexec_core: Starting new kernel",
            "boot stage: choice, checks, kexec load",
        ),
        ("Linux version", "kexec to the slot's kernel"),
        ("stage 2 running", "slot kernel + slot stage 1 to stage 2"),
    ] {
        at = n
            .vm()
            .wait_serial(pattern, at, limit)
            .unwrap_or_else(|e| panic!("{e}"));
        marks.push((what, n.vm().started.elapsed()));
    }
    let (st, _) = n.wait_agent(AGENT_LIMIT);
    let uefi = n.vm().started.elapsed();
    marks.push(("stage 2 to agent ready", uefi));
    let mut prev = Duration::ZERO;
    for (what, t) in &marks {
        timing(test, &format!("split: {what}"), t.saturating_sub(prev));
        prev = *t;
    }
    timing(
        test,
        "qemu start (OVMF) to agent ready, from the disk alone",
        uefi,
    );
    eprintln!(
        "timing: {test}: the boot stage costs {:+.1} s over the direct boot ({:.1} s vs {:.1} s)",
        uefi.as_secs_f64() - direct.as_secs_f64(),
        uefi.as_secs_f64(),
        direct.as_secs_f64()
    );
    assert_eq!(st["booted_slot"], "a", "{st}");
    assert_eq!(
        st["kernel_release"],
        versions().kernel_release.as_str(),
        "{st}"
    );
    assert_eq!(st["boot_stage"], "1.0.0", "{st}");
    // the boot stage puts lockdown=integrity on the slot kernel's command line: the slot's
    // kernel runs locked down (and still loads its modules: they carry Debian's signatures)
    assert_eq!(st["lockdown"], "integrity", "{st}");
    // the slot's root is read through dm-verity, with the root hash of slot a's record
    let root = keelos::update::record::hex(
        &node::slot_record(&n.disk, "a")
            .verity
            .expect("v1's record has dm-verity parameters")
            .root_hash,
    );
    assert!(
        st["verity"]
            .as_str()
            .unwrap_or_default()
            .starts_with("on (keel-root-a: every block read so far matched"),
        "{st}"
    );
    let serial = n.vm().serial();
    assert!(serial.contains("keel.slot=a keel.boot=good"), "{serial}");
    assert!(serial.contains(&format!("keel.verity={root}")), "{serial}");
    assert!(
        serial.contains(&format!(
            "slot a's root is read through dm-verity (root hash {root})"
        )),
        "{serial}"
    );
    assert_eq!(
        serial
            .matches("Kernel is locked down from command line")
            .count(),
        2,
        "the boot stage's kernel and the slot's: {serial}"
    );
    assert!(
        serial.contains("slot a handed over by the boot stage"),
        "{serial}"
    );
    let show = keel_image()
        .args(["boot-stage", "show", "--disk"])
        .arg(&n.disk)
        .output()
        .unwrap();
    assert!(
        show.status.success(),
        "{}",
        String::from_utf8_lossy(&show.stderr)
    );
    eprintln!(
        "sizes: v1 vmlinuz {} bytes, initramfs.img {} bytes; ESP boot stage: {}",
        node::releases().size("v1", "vmlinuz"),
        node::releases().size("v1", "initramfs.img"),
        String::from_utf8_lossy(&show.stdout).trim()
    );
    n.vm().kill();
}

/// Issue 12, test 2: a kernel update. v2-kernel differs from v1 only by its kernel package
/// (another stock Debian kernel, KERNEL2): installed into slot B and booted, the node runs the
/// new kernel from the slot, and marks the slot successful.
#[test]
fn a_release_with_a_new_kernel_boots_that_kernel_from_its_slot() {
    let test = "kernel update";
    let mut n = Node::new("kernel-update", "v1");
    let p = n.publish("v2-kernel", false);
    let st = boot_to_agent(&mut n, test);
    assert_eq!(
        st["kernel_release"],
        versions().kernel_release.as_str(),
        "{st}"
    );
    n.wait_booted_successful("a", AGENT_LIMIT);
    installed(&mut n, &p, false, test);
    let st = reboot_into(&mut n, test, "b");
    assert_eq!(st["os_version"], "KeelOS 2.0.0-kernel", "{st}");
    assert_eq!(st["kernel_release"], node::KERNEL2.2, "{st}");
    assert_eq!(
        st["boot_stage"], "1.0.0",
        "the boot stage did not change: {st}"
    );
    assert_slot_holds(&st, "b", "v2-kernel");
    assert_eq!(Node::slot(&st, "b")["successful"], true, "{st}");
    let serial = n.vm().serial();
    assert!(
        serial.contains(&format!(
            "handing over to slot b's kernel {}",
            node::KERNEL2.2
        )),
        "{serial}"
    );
}

/// Test 2: a full update to v2 (the resumable zstd image from the update server), then
/// `osctl reboot`: the node comes back on v2 in slot B and keel-init marks it successful after
/// its health window; slot A keeps v1 as the fallback.
#[test]
fn full_update_to_v2_then_reboot_comes_back_on_slot_b() {
    let test = "full update v2";
    let mut n = Node::new("full-v2", "v1");
    let p = n.publish("v2", false);
    boot_to_agent(&mut n, test);
    n.wait_booted_successful("a", AGENT_LIMIT);
    let r = installed(&mut n, &p, false, test);
    assert_eq!(r["staged_slot"], "b", "{r}");
    assert_eq!(r["fallback_used"], false, "{r}");
    assert_eq!(r["bytes_saved"], 0, "{r}");
    let zst = node::releases().size("v2", "root.img.zst");
    assert!(
        n.server.sent(&p.image_file) >= zst,
        "the whole image was downloaded"
    );
    let st = n.status().unwrap();
    assert_eq!(st["next_boot_slot"], "b", "{st}");
    assert_eq!(Node::slot(&st, "b")["state"], "trying", "{st}");
    assert_slot_holds(&st, "b", "v2");
    let st = reboot_into(&mut n, test, "b");
    assert_eq!(st["os_version"], "KeelOS 2.0.0", "{st}");
    assert_slot_holds(&st, "b", "v2");
    assert_slot_holds(&st, "a", "v1");
    assert_eq!(Node::slot(&st, "a")["successful"], true, "{st}");
    assert_eq!(st["rolled_back"], false, "{st}");
    assert!(n.serial_count("booting slot b") >= 1);
}

/// Test 3: a delta update from v2 (in slot A) to v3: only the BSDIFF40 delta is downloaded,
/// bytes_saved is the compressed full image's size minus the delta's, and the node boots v3.
#[test]
fn delta_update_v2_to_v3_saves_bytes_and_boots_v3() {
    let test = "delta v2->v3";
    let mut n = Node::new("delta-v3", "v2");
    let p = n.publish("v3", false);
    let st = boot_to_agent(&mut n, test);
    assert_slot_holds(&st, "a", "v2");
    let r = installed(&mut n, &p, true, test);
    let rel = node::releases();
    let zst = rel.size("v3", "root.img.zst");
    let delta = rel.size("v3", "delta-from-2.0.0.bsdiff");
    assert_eq!(r["fallback_used"], false, "{r}");
    assert_eq!(r["staged_slot"], "b", "{r}");
    assert_eq!(r["bytes_saved"], zst - delta, "{r}");
    assert!(zst > delta);
    assert_eq!(n.server.sent(p.delta_file.as_ref().unwrap()), delta);
    // Of the full image only the size probe (`Range: bytes=0-0`, for bytes_saved) was sent.
    assert_eq!(
        n.server.sent(&p.image_file),
        1,
        "the full image was not needed"
    );
    eprintln!(
        "sizes: v2 -> v3 delta {delta} bytes = {:.4}% of the compressed full image ({zst} bytes, zstd -3); root.img {} bytes",
        100.0 * delta as f64 / zst as f64,
        rel.size("v3", "root.img")
    );
    let st = reboot_into(&mut n, test, "b");
    assert_eq!(st["os_version"], "KeelOS 3.0.0", "{st}");
    assert_slot_holds(&st, "b", "v3");
}

/// Boot a v1 node, install `release` (broken) into slot B, reboot into it, and wait until the
/// node is back on slot A by itself. Returns the status and the serial log.
fn broken_update_rolls_back(
    name: &str,
    release: &str,
    boots_of_b: usize,
) -> (serde_json::Value, String) {
    let mut n = Node::new(name, "v1");
    let p = n.publish(release, false);
    boot_to_agent(&mut n, name);
    n.wait_booted_successful("a", AGENT_LIMIT);
    installed(&mut n, &p, false, name);
    let t0 = n.reboot();
    let (st, _) = n.wait_status(rollback_limit(), "back on slot a after a rollback", |s| {
        s["booted_slot"] == "a" && s["rolled_back"] == true
    });
    timing(
        name,
        "failed boot to rollback done (reboot into the broken slot to agent ready on slot a)",
        t0.elapsed(),
    );
    assert_eq!(st["os_version"], "KeelOS 1.0.0", "{st}");
    assert_eq!(st["rolled_back_from"], p.version.as_str(), "{st}");
    assert_eq!(st["next_boot_slot"], "a", "{st}");
    let b = Node::slot(&st, "b");
    assert_eq!(b["state"], "failed", "{st}");
    assert_eq!(b["tries"], 0, "{st}");
    assert_eq!(b["successful"], false, "{st}");
    assert_slot_holds(&st, "b", release);
    assert_slot_holds(&st, "a", "v1");
    let serial = n.vm().serial();
    assert_eq!(
        serial.matches("booting slot b").count(),
        boots_of_b,
        "{}",
        n.vm().tail(60)
    );
    (st, serial)
}

/// Test 4: an update whose agent exits at start never becomes healthy: each boot of slot B
/// misses its deadline and reboots, the tries run out, the node is back on v1, and status
/// reports the failed attempt (rolled back from that version; slot B failed).
#[test]
fn broken_agent_update_runs_out_of_tries_and_rolls_back() {
    let (_, serial) = broken_update_rolls_back("broken-agent", "bad-agent", 3);
    assert!(
        serial.matches("did not become healthy within").count() == 3,
        "keel-init did not log one missed deadline per try"
    );
}

/// Issue 13: a release that was marked successful and then stops reaching health (here its
/// agent exits at start, as bit rot in its binary would make it) is not booted forever: each of
/// its boots is counted until it reaches health, and after 3 boots in a row without health the
/// boot stage demotes it and boots the other slot, which stays successful; the demoted slot
/// stays bootable, as the fallback. Status says why, in words.
#[test]
fn a_successful_slot_that_stops_reaching_health_is_demoted_after_three_boots() {
    let test = "demotion";
    let mut n = Node::new("demotion", "v1");
    let p = n.publish("bad-agent", false);
    boot_to_agent(&mut n, test);
    n.wait_booted_successful("a", AGENT_LIMIT);
    installed(&mut n, &p, false, test);
    n.vm().kill();
    // the release had once been healthy: mark it successful offline, as its first boot would
    node::run_ok(
        std::process::Command::new(node::KEEL_IMAGE)
            .args(["slots", "mark-successful"])
            .arg(&n.disk)
            .arg("b"),
        "keel-image slots mark-successful",
    );
    n.boot();
    let t0 = n.vm().started;
    let (st, _) = n.wait_status(rollback_limit(), "slot b demoted, slot a booted", |s| {
        s["booted_slot"] == "a"
    });
    timing(
        test,
        "power-on to agent ready on slot a (3 unhealthy boots of slot b, then the demotion)",
        t0.elapsed(),
    );
    let serial = n.vm().serial();
    assert_eq!(serial.matches("booting slot b").count(), 3, "{serial}");
    assert_eq!(
        serial.matches("did not become healthy within").count(),
        3,
        "{serial}"
    );
    assert!(
        serial.contains("slot b is marked successful, but its last 3 boots did not reach health"),
        "{serial}"
    );
    assert_eq!(st["os_version"], "KeelOS 1.0.0", "{st}");
    assert_eq!(st["next_boot_slot"], "a", "{st}");
    let b = Node::slot(&st, "b");
    assert_eq!(
        b["successful"], true,
        "the demoted slot stays a fallback: {st}"
    );
    assert_eq!(b["state"], "successful", "{st}");
    let why = st["last_rollback"].as_str().unwrap_or_default();
    eprintln!("demotion: last rollback: {why}");
    assert!(
        why.starts_with(&format!(
            "slot b ({}): marked successful, but its last 3 boots did not reach health (3 \
             health deadline missed)",
            p.version
        )),
        "{st}"
    );
    assert_slot_holds(&st, "a", "v1");
    assert_slot_holds(&st, "b", "bad-agent");
}

/// Issue 13, dm-verity: bit rot (a byte flipped on the disk while the node is off) is caught in
/// both places it can be. First in a new slot on trial: the boot stage reads all of a trial
/// slot through its verity device, refuses it and boots slot a in the same power-on. Then in a
/// successful running slot: nothing reads the whole slot on a normal boot, so the node boots it,
/// the kernel's verity target restarts the machine when keel-agent's first block is read, and
/// the next boot (one that follows an unhealthy one) reads the whole slot, refuses it and falls
/// back to slot a. Status says why each time; the node never ends without a slot to boot.
#[test]
fn dm_verity_catches_a_flipped_byte_in_a_new_slot_and_in_a_running_one() {
    let test = "verity";
    let mut n = Node::new("verity", "v1");
    let p = n.publish("v2", false);
    boot_to_agent(&mut n, test);
    n.wait_booted_successful("a", AGENT_LIMIT);
    installed(&mut n, &p, false, test);
    n.vm().kill();
    let v = node::slot_record(&n.disk, "b")
        .verity
        .expect("the installed release's record has dm-verity parameters");
    node::flip_slot_byte(&n.disk, "b", v.data_size / 2 + 123);

    // 1. the trial slot is read whole by the boot stage and refused
    n.boot();
    let t0 = n.vm().started;
    let (st, _) = n.wait_status(rollback_limit(), "slot b refused, slot a booted", |s| {
        s["booted_slot"] == "a"
    });
    timing(
        test,
        "power-on to agent ready on slot a (slot b refused)",
        t0.elapsed(),
    );
    let serial = n.vm().serial();
    assert!(
        serial.contains("slot b refused: its image does not match its dm-verity tree"),
        "{serial}"
    );
    assert_eq!(
        power_ons(&serial),
        1,
        "refused in the same power-on: {serial}"
    );
    assert_eq!(Node::slot(&st, "b")["state"], "failed", "{st}");
    let why = st["last_rollback"].as_str().unwrap_or_default();
    eprintln!("verity: trial slot: last rollback: {why}");
    assert!(
        why.starts_with("slot b: the boot stage found blocks"),
        "{st}"
    );
    assert!(
        why.contains("(verity corruption) and marked it failed"),
        "{st}"
    );

    // 2. a good copy of v2 goes in again and becomes the successful running slot
    installed(&mut n, &p, false, test);
    let st = reboot_into(&mut n, test, "b");
    assert_slot_holds(&st, "b", "v2");
    n.wait_booted_successful("b", AGENT_LIMIT);
    // the boot stage read all of slot b on its trial boot: how long that took
    let serial = n.vm().serial();
    let line = serial
        .lines()
        .find(|l| l.contains("slot b: all ") && l.contains("match its dm-verity tree"))
        .unwrap_or_else(|| panic!("no whole-slot check of slot b: {serial}"));
    let ms: f64 = line
        .rsplit_once('(')
        .and_then(|(_, t)| t.strip_suffix(" ms)"))
        .and_then(|t| t.trim().parse().ok())
        .unwrap_or_else(|| panic!("{line}"));
    eprintln!(
        "timing: {test}: the boot stage reads all of trial slot b through dm-verity: {:.1} s \
         ({line})",
        ms / 1000.0
    );
    n.vm().kill();
    let agent = node::release_file("v2", "usr/bin/keel-agent");
    let at = node::find_once_in_slot(&n.disk, "b", &agent[..4096]);
    node::flip_slot_byte(&n.disk, "b", at + 64);

    n.boot();
    let t0 = n.vm().started;
    let (st, _) = n.wait_status(rollback_limit(), "slot b refused, slot a booted", |s| {
        s["booted_slot"] == "a"
    });
    timing(
        test,
        "power-on to agent ready on slot a (a verity restart in slot b, then its refusal)",
        t0.elapsed(),
    );
    let serial = n.vm().serial();
    assert!(serial.contains("dm-verity device corrupted"), "{serial}");
    assert_eq!(power_ons(&serial), 2, "{serial}");
    assert!(
        serial.contains("slot b refused: its image does not match its dm-verity tree"),
        "{serial}"
    );
    assert_eq!(Node::slot(&st, "b")["state"], "failed", "{st}");
    assert_eq!(Node::slot(&st, "a")["successful"], true, "{st}");
    let why = st["last_rollback"].as_str().unwrap_or_default();
    eprintln!("verity: running slot: last rollback: {why}");
    assert!(
        why.contains("(verity corruption) and marked it failed"),
        "{st}"
    );
    assert!(
        st["verity"]
            .as_str()
            .unwrap_or_default()
            .starts_with("on (keel-root-a"),
        "{st}"
    );
}

/// Issue 13: a node whose image trusts release keys (etc/keel/trusted-keys, security version 1)
/// installs signed releases only. Over its real update path (osctl → agent → HTTP server): a
/// plain --image/--sha256 install, a manifest altered after signing and a release with a lower
/// security version are refused with nothing downloaded or written; the lower one is admitted
/// with --allow-downgrade only up to the signature check (not installed here); a good signed
/// release installs, boots and reports its trust in Status.
#[test]
fn a_signed_node_installs_signed_releases_and_refuses_bad_ones_before_writing() {
    let test = "signed releases";
    let mut n = Node::new("signed", "s1");
    let good = n.publish_release("s2", "s2", None);
    let older = n.publish_release("s0", "s0", None);
    let altered = n.publish_release("s2", "s2-altered", Some(("\"1.2.0\"", "\"1.2.9\"")));
    let plain = n.publish("v2", false);
    boot_to_agent(&mut n, test);
    let (st, _) = n.wait_booted_successful("a", AGENT_LIMIT);
    let trust = st["update_trust"].as_str().unwrap_or_default().to_string();
    eprintln!("signed releases: update trust: {trust}");
    assert!(
        trust.starts_with("signed: 2 trusted keys") && trust.contains("security version 1"),
        "{st}"
    );
    let b_before = Node::slot(&st, "b").clone();
    let refused = |n: &mut Node, args: &[&str], want: &str| {
        let e = n.osctl(args).expect_err("refused");
        assert!(e.contains(want), "osctl {args:?}: {e}");
        eprintln!("signed releases: osctl {}: refused: {}", args[1], e.trim());
    };
    let plain_args = plain.install_args(false);
    let plain_args: Vec<&str> = plain_args.iter().map(String::as_str).collect();
    refused(&mut n, &plain_args, "installs signed releases only");
    refused(&mut n, &["install", "--release", &altered], "signature");
    refused(
        &mut n,
        &["install", "--release", &older],
        "security version",
    );
    for dir in ["s2-altered", "s0"] {
        assert_eq!(n.server.sent(&format!("{dir}/root.img.zst")), 0, "{dir}");
    }
    assert_eq!(n.server.sent(&plain.image_file), 0);
    let st = n.status().unwrap();
    assert_eq!(
        Node::slot(&st, "b"),
        &b_before,
        "slot b was not touched: {st}"
    );

    let t0 = std::time::Instant::now();
    let out = n
        .osctl(&["--output", "json", "install", "--release", &good])
        .unwrap_or_else(|e| panic!("osctl install --release: {e}"));
    timing(test, "install of signed release 1.2.0", t0.elapsed());
    let r = serde_json::Deserializer::from_str(&out)
        .into_iter::<serde_json::Value>()
        .filter_map(Result::ok)
        .last()
        .unwrap_or_default();
    assert_eq!(r["ok"], true, "{out}");
    assert_eq!(r["version"], "1.2.0", "{r}");
    assert_eq!(r["sha256"], node::releases().sha256("s2").as_str(), "{r}");
    let st = reboot_into(&mut n, test, "b");
    assert_eq!(st["os_version"], "KeelOS 1.2.0", "{st}");
    let trust = st["update_trust"].as_str().unwrap_or_default();
    assert!(trust.contains("security version 2"), "{st}");
    assert_slot_holds(&st, "b", "s2");
}

/// Power-ons seen on a serial log: each starts the boot stage once (a kexec does not).
fn power_ons(serial: &str) -> usize {
    serial.matches("] boot stage ").count()
}

/// Watchdog resets seen on a serial log: power-ons that no reboot asked for (a reboot(2) prints
/// "reboot: Restarting system", a panic with panic=N "Rebooting in N seconds").
fn watchdog_resets(serial: &str) -> usize {
    let asked = serial.matches("reboot: Restarting system").count()
        + serial.matches("Rebooting in ").count();
    power_ons(serial).saturating_sub(1 + asked)
}

/// Test 5a: the new slot's init hangs without petting the watchdog: the i6300esb resets the
/// guest, once per try, and the node rolls back to v1.
#[test]
fn hang_in_new_slot_is_reset_by_the_watchdog_and_rolls_back() {
    let (_, serial) = broken_update_rolls_back("init-hangs", "bad-hang", 3);
    assert_eq!(watchdog_resets(&serial), 3, "{serial}");
}

/// Test 5b: the new slot's init exits, so its kernel panics and, with panic=10 on the command
/// line the boot stage passed, reboots by itself, once per try; the node rolls back to v1.
#[test]
fn kernel_panic_in_new_slot_reboots_and_rolls_back() {
    let (st, serial) = broken_update_rolls_back("init-panics", "bad-panic", 3);
    // with panic=N the kernel reboots from inside panic(): its closing "---[ end Kernel panic"
    // line is printed only when it does not (panic=0)
    assert_eq!(
        serial
            .matches("Kernel panic - not syncing: Attempted to kill init!")
            .count(),
        3,
        "one panic per try"
    );
    assert_eq!(serial.matches("Rebooting in 10 seconds").count(), 3);
    assert_eq!(watchdog_resets(&serial), 0, "{serial}");
    let why = st["last_rollback"].as_str().unwrap_or_default();
    assert!(why.starts_with("slot b"), "{st}");
}

/// Issue 12, test 4: a new slot whose own initramfs cannot find the disk (no disk driver): its
/// stage 1 gives up and reboots, once per try; the tries run out and the node is back on v1,
/// and Status says that no trial boot reached the slot's services.
#[test]
fn a_slot_initramfs_without_its_disk_driver_runs_out_of_tries_and_rolls_back() {
    let (st, serial) = broken_update_rolls_back("initramfs-no-disk", "bad-initramfs", 3);
    assert_eq!(
        serial
            .matches("no disk with the KeelOS labels appeared")
            .count(),
        3,
        "{serial}"
    );
    let why = st["last_rollback"].as_str().unwrap_or_default();
    assert!(
        why.contains("slot b") && why.contains("none of its trial boots reached"),
        "{st}"
    );
}

/// Issue 12, test 4: a new slot whose initramfs hangs before anything can pet the watchdog: the
/// watchdog the boot stage locked on (i6300esb.nowayout=1) runs across the kexec and resets
/// the guest, once per try; the node is back on v1.
#[test]
fn a_slot_kernel_that_hangs_before_userspace_is_reset_by_the_watchdog_and_rolls_back() {
    let (st, serial) = broken_update_rolls_back("early-hang", "bad-early-hang", 3);
    assert_eq!(watchdog_resets(&serial), 3, "{serial}");
    assert!(
        serial.contains("nowayout already set"),
        "the lock survived the kexec"
    );
    let why = st["last_rollback"].as_str().unwrap_or_default();
    assert!(why.starts_with("slot b"), "{st}");
}

/// Issue 12, test 3: a slot whose kernel kexec_file_load refuses: the boot stage marks it
/// failed and boots slot A in the same power-on; Status reports the reason.
#[test]
fn a_slot_kernel_the_kernel_refuses_is_marked_failed_and_the_other_boots_at_once() {
    let (st, serial) = broken_update_rolls_back("kernel-refused", "bad-kernel", 1);
    assert_eq!(watchdog_resets(&serial), 0, "{serial}");
    assert!(
        serial.contains("slot b refused: the kernel refused to load its kernel"),
        "{serial}"
    );
    let why = st["last_rollback"].as_str().unwrap_or_default();
    assert!(
        why.contains("slot b") && why.contains("kexec_file_load failed"),
        "{st}"
    );
    eprintln!("kernel refused: last rollback: {why}");
}

/// Issue 13, kernel lockdown: the boot stage runs locked down (lockdown=integrity), so
/// kexec_file_load takes only a slot kernel whose signature the kernel's keyrings verify. The
/// test machines' firmware has the Debian Secure Boot CA in db (ci/ovmf-vars), which the kernel
/// loads into its platform keyring: Debian's signed kernels hand over (every other test), and the
/// same kernel with its signature cut off is refused. As a new slot: marked failed, slot a boots
/// in the same power-on. As the last bootable slot: its root boots under the boot stage's own
/// kernel rather than the node rebooting into the same refusal for ever.
#[test]
fn a_slot_kernel_without_a_trusted_signature_is_refused_by_the_locked_down_boot_stage() {
    let (st, serial) = broken_update_rolls_back("kernel-unsigned", "bad-unsigned", 1);
    assert_eq!(watchdog_resets(&serial), 0, "{serial}");
    assert!(
        serial.contains("integrity: Loaded X.509 cert 'Debian Secure Boot CA"),
        "the platform keyring holds the Debian CA from db: {serial}"
    );
    assert!(
        serial.contains("kexec of unsigned images is restricted"),
        "{serial}"
    );
    assert!(
        serial.contains("slot b refused: the kernel refused to load its kernel")
            && serial.contains("the boot stage runs locked down"),
        "{serial}"
    );
    let why = st["last_rollback"].as_str().unwrap_or_default();
    assert!(
        why.contains("slot b") && why.contains("kexec_file_load failed"),
        "{st}"
    );
    eprintln!("kernel unsigned: last rollback: {why}");

    // the same release as the only bootable slot
    let mut n = Node::new("kernel-unsigned-last", "bad-unsigned");
    n.boot();
    let (st, _) = n.wait_agent(AGENT_LIMIT);
    assert_eq!(st["booted_slot"], "a", "{st}");
    assert_eq!(st["os_version"], "KeelOS 2.0.8-kernel-unsigned", "{st}");
    n.wait_booted_successful("a", AGENT_LIMIT);
    let serial = n.vm().serial();
    assert!(
        serial.contains(
            "slot a is the last bootable slot: booting its root under the boot stage's kernel"
        ),
        "{serial}"
    );
    assert_eq!(
        serial.matches("Linux version").count(),
        1,
        "no kexec: {serial}"
    );
    assert_eq!(power_ons(&serial), 1, "{serial}");
}

/// Issue 13, kernel lockdown: the slot kernel runs with lockdown=integrity, so only signed
/// modules load. A slot whose initramfs carries the stock virtio_net module with its signature
/// cut off: the slot kernel refuses that one module (the kernel's lockdown message and
/// keel-init's failed load say so) while every stock module before and after it loads.
#[test]
fn the_locked_down_slot_kernel_refuses_a_module_without_its_signature() {
    let mut n = Node::new("module-unsigned", "bad-module");
    n.boot();
    let vm = n.vm();
    let at = vm
        .wait_serial("handed over by the boot stage", 0, BOOT_LIMIT)
        .unwrap_or_else(|e| panic!("{e}"));
    vm.wait_serial("stage 2 running", at, BOOT_LIMIT)
        .unwrap_or_else(|e| panic!("{e}"));
    let serial = vm.serial();
    // the slot kernel's part of the console: from the second kernel's banner (after kexec)
    let at = serial
        .match_indices("Linux version")
        .nth(1)
        .map(|(i, _)| i)
        .unwrap_or_else(|| panic!("no kexec into the slot kernel: {serial}"));
    let slot_part = &serial[at..];
    // the slot's keel-init loaded its module list: the unsigned one failed, the rest loaded
    let line = slot_part
        .lines()
        .find(|l| l.contains("finit_module") && l.contains("/virtio_net.ko"))
        .unwrap_or_else(|| panic!("no failed load of virtio_net.ko in the slot: {serial}"));
    eprintln!("module-unsigned: {line}");
    // the slot's initramfs runs keel-init as /init: the kernel names the process "init"
    assert!(
        slot_part.contains("Lockdown: init: unsigned module loading is restricted"),
        "{serial}"
    );
    for m in [
        "failover.ko loaded",
        "ext4.ko loaded",
        "dm-verity.ko loaded",
    ] {
        assert!(slot_part.contains(m), "{m}: {slot_part}");
    }
    assert!(
        !slot_part.contains("virtio_net.ko loaded"),
        "the unsigned module loaded: {slot_part}"
    );
    // the boot stage, whose initramfs has the stock signed module, loaded it
    assert!(
        serial[..at].contains("virtio_net.ko loaded"),
        "{}",
        &serial[..at]
    );
    n.vm().kill();
}

/// A new slot whose SquashFS is corrupt (its digest is the published one, so the install
/// verifies it): the boot stage cannot mount it, marks it failed at once (no tries left) and
/// boots slot A in the same power-on.
#[test]
fn corrupt_squashfs_in_new_slot_is_marked_failed_and_rolls_back() {
    let (st, serial) = broken_update_rolls_back("corrupt-squashfs", "bad-squashfs", 1);
    assert!(serial.contains("slot b marked failed"), "{serial}");
    assert_eq!(watchdog_resets(&serial), 0, "{serial}");
    let why = st["last_rollback"].as_str().unwrap_or_default();
    assert!(why.contains("squashfs did not mount"), "{st}");
}

/// Test 6: the update server serves a corrupted delta: the install falls back to the full
/// image, says so, and the new version boots.
#[test]
fn corrupted_delta_falls_back_to_the_full_image_and_boots() {
    let test = "corrupted delta";
    let mut n = Node::new("corrupt-delta", "v1");
    let p = n.publish("v2", true);
    boot_to_agent(&mut n, test);
    let r = installed(&mut n, &p, true, test);
    assert_eq!(r["fallback_used"], true, "{r}");
    assert_ne!(r["fallback_reason"], "", "{r}");
    assert_eq!(r["bytes_saved"], 0, "{r}");
    eprintln!("corrupted delta: fallback reason: {}", r["fallback_reason"]);
    let zst = node::releases().size("v2", "root.img.zst");
    assert!(n.server.sent(&p.image_file) >= zst);
    let st = reboot_into(&mut n, test, "b");
    assert_eq!(st["os_version"], "KeelOS 2.0.0", "{st}");
    assert_slot_holds(&st, "b", "v2");
}

/// Test 8: a manual rollback with osctl. Refused while slot B holds nothing; after an update
/// to v2 has booted, `osctl rollback` makes slot A the next boot and the reboot runs v1 again
/// (slot B keeps v2, successful).
#[test]
fn manual_rollback_with_osctl_returns_to_v1() {
    let test = "manual rollback";
    let mut n = Node::new("manual-rollback", "v1");
    let p = n.publish("v2", false);
    boot_to_agent(&mut n, test);
    n.wait_booted_successful("a", AGENT_LIMIT);
    let e = n.osctl(&["rollback"]).unwrap_err();
    assert!(e.contains("cannot roll back"), "{e}");
    installed(&mut n, &p, false, test);
    reboot_into(&mut n, test, "b");
    let out = n.osctl(&["rollback"]).unwrap();
    assert!(out.contains("slot a"), "{out}");
    let st = n.status().unwrap();
    assert_eq!(st["next_boot_slot"], "a", "{st}");
    assert_eq!(st["booted_slot"], "b", "{st}");
    let st = reboot_into(&mut n, test, "a");
    assert_eq!(st["os_version"], "KeelOS 1.0.0", "{st}");
    assert_slot_holds(&st, "a", "v1");
    assert_slot_holds(&st, "b", "v2");
    assert_eq!(Node::slot(&st, "b")["successful"], true, "{st}");
}

/// After a power cut: what the boot stage will choose must be a verified slot (its bytes hash
/// to its record) holding one of `allowed`. Returns the slot's letter.
fn verified_choice(n: &Node, allowed: &[&str], why: &str, seed: u64) -> &'static str {
    let (slot, sha) = node::verified_boot_choice(&n.disk)
        .unwrap_or_else(|e| panic!("{why} (seed {seed}): the next boot is not verified: {e}"));
    let r = node::releases();
    assert!(
        allowed.iter().any(|a| r.sha256(a) == sha),
        "{why} (seed {seed}): slot {slot} holds {sha}, none of {allowed:?}"
    );
    eprintln!("power cuts: {why}: the next boot runs slot {slot} (verified, {sha})");
    slot
}

/// The slot the last boot on the serial console chose ("booting slot X"), if it got that far.
fn last_booted(serial: &str) -> Option<String> {
    let i = serial.rfind("booting slot ")?;
    serial[i + 13..].get(..1).map(str::to_string)
}

/// Test 7: power cuts. QEMU is killed at random instants (seeded; KEEL_QEMU_SEED=N replays the
/// same choices) during an install (two points of the download, one right after it) and during
/// the first boot of the new slot (one in its first 6 s, one in the 4 s after stage 1 chose
/// the slot). After every cut the boot choice on the disk must be a slot whose bytes hash to
/// its record (v1 or v2), the boot that follows must run that slot, re-issuing the install
/// must complete (resuming from its checkpoint), and the node ends on v2, marked successful.
#[test]
fn power_cuts_during_install_and_first_boot_always_boot_a_verified_slot() {
    use proptest::prelude::Rng;
    use proptest::test_runner::{RngAlgorithm, TestRng};
    let test = "power cuts";
    let seed: u64 = std::env::var("KEEL_QEMU_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(7)
        });
    eprintln!("power cuts: seed {seed} (KEEL_QEMU_SEED={seed} replays the same cut points)");
    let mut key = [0u8; 32];
    key[..8].copy_from_slice(&seed.to_le_bytes());
    let mut rng = TestRng::from_seed(RngAlgorithm::ChaCha, &key);
    let mut n = Node::new("power-cuts", "v1");
    let p = n.publish("v2", false);
    let zst = node::releases().size("v2", "root.img.zst");
    let both = ["v1", "v2"];
    boot_to_agent(&mut n, test);
    n.wait_booted_successful("a", AGENT_LIMIT);
    let mut cuts = 0;
    let cut = |n: &mut Node, cuts: &mut usize, what: &str| {
        n.vm().kill();
        *cuts += 1;
        eprintln!("power cuts: cut {cuts} {what}");
    };
    // After a cut: check the choice, boot, and see that the boot ran it and the agent answers.
    let restart = |n: &mut Node, why: &str| {
        let slot = verified_choice(n, &both, why, seed);
        n.boot();
        let (st, _) = n.wait_status(AGENT_LIMIT, "agent ready after a power cut", |s| {
            !s["booted_slot"].as_str().unwrap_or("").is_empty()
        });
        timing(test, "power cut to agent ready", n.vm().started.elapsed());
        assert_eq!(st["booted_slot"], slot, "seed {seed}: {st}");
        slot
    };
    let install_args: Vec<String> = ["--output", "json"]
        .iter()
        .map(|s| s.to_string())
        .chain(p.install_args(false))
        .collect();
    let args: Vec<&str> = install_args.iter().map(String::as_str).collect();

    // osctl's progress stream for one install: the last phase and bytes written it reported,
    // and the first bytes count (where the engine started: 0, or its checkpoint on a resume).
    #[derive(Default)]
    struct Seen {
        phase: String,
        done: u64,
        first: Option<u64>,
    }
    let start_install = |n: &mut Node| {
        let mut child = n
            .osctl_cmd(&args)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let seen = std::sync::Arc::new(std::sync::Mutex::new(Seen::default()));
        let out = child.stdout.take().unwrap();
        let s2 = seen.clone();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
                let v: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
                let mut s = s2.lock().unwrap();
                if let Some(ph) = v["phase"].as_str() {
                    s.phase = ph.to_string();
                }
                if v["phase"] == "downloading" {
                    let d = v["bytes_done"].as_u64().unwrap_or(0);
                    s.done = d;
                    s.first.get_or_insert(d);
                }
            }
        });
        (child, seen)
    };

    // 1 and 2: at random points of the download, taken from what the agent reports it has
    // written (not from what the server has sent: several MiB sit in socket buffers between
    // them). The engine checkpoints every 8 MiB written, and each cut comes at least 12 MiB
    // after the last one, so each attempt leaves a newer checkpoint behind.
    let image_len = node::releases().size("v2", "root.img");
    // a uniform choice in lo..hi
    let mut pick = |lo: u64, hi: u64| lo + rng.next_u64() % (hi - lo);
    let first_at = (12 << 20) + pick(0, 200) * image_len / 1000;
    let second_at = first_at + (12 << 20) + pick(0, 200) * image_len / 1000;
    let mut booted;
    let mut resumed_at = 0;
    for (k, at) in [first_at, second_at].into_iter().enumerate() {
        let (mut child, seen) = start_install(&mut n);
        loop {
            if seen.lock().unwrap().done >= at {
                break;
            }
            assert!(
                child.try_wait().unwrap().is_none(),
                "seed {seed}: the install ended before {at} bytes were written"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        let (first, done) = {
            let s = seen.lock().unwrap();
            (s.first.unwrap_or(0), s.done)
        };
        cut(
            &mut n,
            &mut cuts,
            &format!("during the download, {done} of {image_len} image bytes written"),
        );
        if k == 1 {
            resumed_at = first;
            assert!(
                first >= 8 << 20,
                "seed {seed}: the second attempt started writing at {first}: it did not resume \
                 from the first attempt's checkpoint"
            );
        }
        let _ = child.wait();
        booted = restart(&mut n, "after a cut during the download");
        assert_eq!(booted, "a", "slot b is not activated mid-download");
    }
    eprintln!("power cuts: the second attempt resumed at image byte {resumed_at}");

    // 3: a random instant within 3 s of the end of the download (flushing, verifying,
    // activating, or just done), found from osctl's own progress stream.
    let before = n.server.sent(&p.image_file);
    let (mut child, seen) = start_install(&mut n);
    loop {
        let ph = seen.lock().unwrap().phase.clone();
        if ["flushing", "verifying", "activating", "done"].contains(&ph.as_str()) {
            eprintln!("power cuts: the install is {ph}");
            break;
        }
        if child.try_wait().unwrap().is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let third = n.server.sent(&p.image_file) - before;
    assert!(
        third < zst,
        "seed {seed}: the third attempt downloaded {third} bytes, the whole image is {zst}: it \
         did not resume from its checkpoint"
    );
    std::thread::sleep(Duration::from_millis(pick(0, 3000)));
    cut(
        &mut n,
        &mut cuts,
        &format!("after the download ({third} bytes in this attempt, resumed)"),
    );
    let _ = child.wait();
    // The restart either runs v1 (install unfinished: re-issue it) or is the first boot of
    // slot b (install finished and activated before the cut).
    let next = verified_choice(&n, &both, "after the cut after the download", seed);
    booted = "none";
    if next == "a" {
        booted = restart(&mut n, "after the cut after the download");
        let before = n.server.sent(&p.image_file);
        let r = installed(&mut n, &p, false, test);
        assert_eq!(r["staged_slot"], "b", "{r}");
        let sent = n.server.sent(&p.image_file) - before;
        eprintln!("power cuts: the re-issued install downloaded {sent} of {zst} bytes");
        assert!(
            sent < zst,
            "seed {seed}: the re-issued install did not resume"
        );
    }

    // 4, 5 and 6: during the first boot of slot b.
    let mut first_boot_cuts = 0;
    while first_boot_cuts < 3 {
        let expect = verified_choice(&n, &both, "before a first boot of slot b", seed);
        let t0 = if booted == "a" {
            n.reboot()
        } else {
            n.boot();
            n.vm().started
        };
        // One cut at a random instant of the first 12 s (firmware, the boot stage's kernel, the
        // boot choice, which may or may not have spent its try), one in the 4 s after the boot
        // stage began the kexec hand-off (the hand-over, the slot kernel starting), one in the
        // 4 s after the slot's own stage 1 took it over (mounting, stage 2, the health window).
        let already = usize::from(booted == "a");
        let wait_for = |n: &mut Node, marker: &str, after_ms: u64| {
            let w = std::time::Instant::now();
            while n.vm().serial().matches(marker).count() <= already {
                assert!(w.elapsed() < AGENT_LIMIT, "{marker:?} never appeared");
                std::thread::sleep(Duration::from_millis(20));
            }
            std::thread::sleep(Duration::from_millis(after_ms));
        };
        match first_boot_cuts {
            0 => {
                let delay = Duration::from_millis(pick(500, 12000));
                std::thread::sleep(delay.saturating_sub(t0.elapsed()));
            }
            1 => wait_for(&mut n, "handing over to slot", pick(0, 4000)),
            _ => wait_for(&mut n, "handed over by the boot stage", pick(0, 4000)),
        }
        cut(
            &mut n,
            &mut cuts,
            &format!(
                "{:.1} s into a first boot of slot b",
                t0.elapsed().as_secs_f64()
            ),
        );
        first_boot_cuts += 1;
        // After an `osctl reboot` the log also holds the boot before it; the last
        // "booting slot" line is this boot's when stage 1 got that far.
        let serial = n.vm().serial();
        if serial.matches("booting slot").count() > already {
            let ran = last_booted(&serial).unwrap_or_default();
            assert_eq!(
                ran, expect,
                "seed {seed}: the boot ran another slot than chosen"
            );
            eprintln!("power cuts: the cut boot had chosen slot {ran} (stage 1)");
        } else {
            eprintln!("power cuts: the cut came before stage 1's boot choice");
        }
        booted = "none";
        if verified_choice(&n, &both, "after a cut during a first boot", seed) == "a" {
            // the cuts spent all of slot b's tries: a rollback, as designed
            break;
        }
    }

    // The end: the node settles on a verified slot; if the cuts used up slot b's tries it is
    // back on v1 with slot b failed, and one more install and reboot gets it to v2.
    let slot = restart(&mut n, "after the last cut");
    let (st, _) = n.wait_booted_successful(slot, AGENT_LIMIT);
    if slot == "a" {
        assert_eq!(Node::slot(&st, "b")["state"], "failed", "{st}");
        eprintln!("power cuts: the cuts spent slot b's tries; re-installing");
        installed(&mut n, &p, false, test);
        reboot_into(&mut n, test, "b");
    }
    let st = n.status().unwrap();
    assert_eq!(st["os_version"], "KeelOS 2.0.0", "{st}");
    assert_slot_holds(&st, "b", "v2");
    assert!(cuts >= 5, "{cuts} cuts");
    eprintln!("power cuts: {cuts} cuts, seed {seed}, the node ends on v2 in slot b");
}

/// The bytes of `slot` on the node's disk hash to `release`'s published digest (read from the
/// host's disk image file, not from the node's Status).
fn assert_slot_bytes(n: &Node, slot: &str, release: &str) {
    let (bytes, record) = node::slot_hash(&n.disk, slot).unwrap();
    let want = node::releases().sha256(release);
    assert_eq!(record, want, "slot {slot}'s record is not {release}'s");
    assert_eq!(bytes, want, "slot {slot}'s bytes are not {release}'s");
}

/// keel-agent's pid as the node's supervisor reports it (`osctl services`).
fn agent_pid(n: &mut Node) -> Option<u64> {
    let out = n.osctl(&["--output", "json", "services"]).ok()?;
    let v: serde_json::Value = serde_json::from_str(&out).ok()?;
    v.as_array()?
        .iter()
        .find(|s| s["name"] == "keel-agent" && s["state"] == "running")?["pid"]
        .as_u64()
}

/// `osctl restart keel-agent`, then wait until an agent with another pid answers.
fn restart_agent(n: &mut Node, test: &str) {
    let before = agent_pid(n).expect("keel-agent is running");
    let t0 = std::time::Instant::now();
    let out = n
        .osctl(&["restart", "keel-agent"])
        .unwrap_or_else(|e| panic!("osctl restart keel-agent: {e}"));
    eprintln!("osctl restart keel-agent: {}", out.trim());
    while agent_pid(n).is_none_or(|p| p == before) {
        assert!(
            t0.elapsed() < AGENT_LIMIT,
            "keel-agent (pid {before}) was not restarted within {AGENT_LIMIT:?}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    let (st, _) = n.wait_agent(AGENT_LIMIT);
    eprintln!(
        "restarted agent knows the booted slot from: {}",
        st["booted_from"]
    );
    timing(test, "agent restart to agent ready", t0.elapsed());
}

/// The agent knows the running slot from the boot, not from the flags (issue: an agent that
/// restarted after an install took the staged slot for the running one and aimed the next
/// install at the mounted root), and no install is accepted while a boot is on trial.
/// v1 boots on A; v2 is staged in B; the agent restarts; an install of v3 targets B again and
/// A still holds v1's bytes. The reboot into B (v3) is on trial: an install is refused while
/// Status says trying, and accepted once B is marked successful. Before that, `osctl rollback`
/// makes A the next boot and the agent restarts again: the install then targets A, never the
/// mounted B, and B keeps v3's bytes.
#[test]
fn agent_restart_keeps_the_running_slot_and_trial_boots_refuse_installs() {
    let test = "agent restart + trial";
    let mut n = Node::with_health_window("agent-restart", "v1", Some(45));
    let v2 = n.publish("v2", false);
    let v3 = n.publish("v3", false);
    boot_to_agent(&mut n, test);
    n.wait_booted_successful("a", AGENT_LIMIT);
    let r = installed(&mut n, &v2, false, test);
    assert_eq!(r["staged_slot"], "b", "{r}");

    restart_agent(&mut n, test);
    let st = n.status().unwrap();
    assert_eq!(st["booted_slot"], "a", "{st}");
    assert_eq!(st["next_boot_slot"], "b", "{st}");
    let r = installed(&mut n, &v3, false, test);
    assert_eq!(
        r["staged_slot"], "b",
        "the install after a restart targets B again: {r}"
    );
    assert_slot_bytes(&n, "a", "v1");

    // Reboot into B: the trial.
    let t0 = n.reboot();
    let (st, _) = n.wait_status(AGENT_LIMIT, "booted from slot b", |s| {
        s["booted_slot"] == "b"
    });
    timing(test, "reboot to agent ready", t0.elapsed());
    assert_eq!(
        Node::slot(&st, "b")["state"],
        "trying",
        "the agent answered after the health window ended (window 45 s): {st}"
    );
    let e = n.install(&v2, false).unwrap_err();
    eprintln!("install during the trial: {e}");
    assert!(e.contains("on trial"), "{e}");
    assert!(
        e.contains("FailedPrecondition") || e.contains("precondition"),
        "{e}"
    );
    assert_slot_bytes(&n, "a", "v1");
    let (st, waited) = n.wait_booted_successful("b", AGENT_LIMIT);
    timing(test, "refused install to slot b marked successful", waited);
    assert_slot_holds(&st, "b", "v3");

    // Rollback makes A the next boot; an agent restarted now must still know B is running.
    let out = n.osctl(&["rollback"]).unwrap();
    assert!(out.contains("slot a"), "{out}");
    restart_agent(&mut n, test);
    let st = n.status().unwrap();
    assert_eq!(st["booted_slot"], "b", "{st}");
    assert_eq!(st["next_boot_slot"], "a", "{st}");
    let r = installed(&mut n, &v2, false, test);
    assert_eq!(
        r["staged_slot"], "a",
        "the install targets A, not the mounted B: {r}"
    );
    assert_slot_bytes(&n, "b", "v3");
    assert_slot_bytes(&n, "a", "v2");
}
