//! The kernel in the slot and the boot stage on the ESP, through `keel-image build` and
//! `keel-image boot-stage` on real releases (the pinned Debian kernel and one other), read back
//! with the standard tools: `unsquashfs -cat` for the slot's /boot, `fsck.fat -n` for the ESP.
//! Booting these disks under OVMF is the QEMU suite's job.

#![allow(clippy::panic, clippy::unwrap_used)] // a test crate: failing loudly is its job

use keelos::block::FileDevice;
use keelos::image::bootfiles::{BootFiles, BootStageRecord};
use keelos::image::{esp, release};
use sha2::Digest;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

const BIN: &str = env!("CARGO_BIN_EXE_keel-image");
/// A second kernel package of Debian 12, for the release that differs only by its kernel.
const OTHER_KERNEL: &str = "linux-image-6.1.0-48-amd64=6.1.172-1";
const OTHER_RELEASE: &str = "6.1.0-48-amd64";

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn cache() -> PathBuf {
    std::env::var_os("KEEL_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/cache/keelos"))
}

fn keel_image(args: &[&str]) -> std::process::Output {
    Command::new(BIN).args(args).output().unwrap()
}

fn ok(args: &[&str]) -> String {
    let o = keel_image(args);
    assert!(
        o.status.success(),
        "keel-image {args:?} failed: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn build_release(out: &Path, version: &str, extra: &[&str]) -> serde_json::Value {
    let bin = Path::new(BIN).parent().unwrap();
    let out_s = out.display().to_string();
    let init = bin.join("keel-init").display().to_string();
    let agent = bin.join("keel-agent").display().to_string();
    let image_dir = repo().join("image").display().to_string();
    let cache = cache().display().to_string();
    let mut args = vec![
        "build",
        "release",
        "--version",
        version,
        "--out",
        &out_s,
        "--init",
        &init,
        "--agent",
        &agent,
        "--image-dir",
        &image_dir,
        "--cache",
        &cache,
        "--zstd-level",
        "1",
    ];
    args.extend_from_slice(extra);
    ok(&args);
    serde_json::from_slice(&std::fs::read(out.join(release::BUILD_RECORD_FILE)).unwrap()).unwrap()
}

/// The good release 1.0.0 with the pinned kernel, built once for every test here.
fn good() -> &'static (tempfile::TempDir, serde_json::Value) {
    static GOOD: OnceLock<(tempfile::TempDir, serde_json::Value)> = OnceLock::new();
    GOOD.get_or_init(|| {
        let d = tempfile::tempdir().unwrap();
        let m = build_release(d.path(), "1.0.0", &[]);
        (d, m)
    })
}

fn unsquash_cat(img: &Path, path: &str) -> Vec<u8> {
    let o = Command::new("unsquashfs")
        .arg("-cat")
        .arg(img)
        .arg(path)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "unsquashfs -cat {path}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    o.stdout
}

fn sha(b: &[u8]) -> String {
    keelos::update::record::hex(&sha2::Sha256::digest(b))
}

/// The slot's /boot of a release: kernel, initramfs and the record, checked against each other.
fn slot_boot(dir: &Path) -> (Vec<u8>, Vec<u8>, BootFiles) {
    let root = dir.join(release::ROOT_FILE);
    let kernel = unsquash_cat(&root, "boot/vmlinuz");
    let initramfs = unsquash_cat(&root, "boot/initramfs.img");
    let rec: BootFiles =
        serde_json::from_slice(&unsquash_cat(&root, "boot/keel-boot.json")).unwrap();
    assert_eq!(rec.kernel_sha256, sha(&kernel));
    assert_eq!(rec.kernel_len, kernel.len() as u64);
    assert_eq!(rec.initramfs_sha256, sha(&initramfs));
    assert_eq!(rec.initramfs_len, initramfs.len() as u64);
    (kernel, initramfs, rec)
}

/// The names in a zstd newc initramfs.
fn initramfs_files(zst: &[u8]) -> Vec<String> {
    let cpio = zstd::decode_all(zst).unwrap();
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("i.cpio");
    std::fs::write(&p, cpio).unwrap();
    let o = Command::new("cpio")
        .args(["-it", "--quiet", "-F"])
        .arg(&p)
        .output()
        .unwrap();
    assert!(o.status.success());
    String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(str::to_string)
        .collect()
}

fn initramfs_file(zst: &[u8], name: &str) -> Vec<u8> {
    let cpio = zstd::decode_all(zst).unwrap();
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("i.cpio");
    std::fs::write(&p, cpio).unwrap();
    let o = Command::new("cpio")
        .args(["-i", "--quiet", "--to-stdout", "-F"])
        .arg(&p)
        .arg(name)
        .output()
        .unwrap();
    assert!(o.status.success());
    o.stdout
}

#[test]
fn a_release_carries_its_kernel_and_initramfs_in_the_slot() {
    let (dir, m) = good();
    let (kernel, initramfs, rec) = slot_boot(dir.path());
    assert_eq!(kernel, std::fs::read(dir.path().join("vmlinuz")).unwrap());
    assert_eq!(
        initramfs,
        std::fs::read(dir.path().join("initramfs.img")).unwrap()
    );
    assert_eq!(&kernel[0x202..0x206], b"HdrS", "not a bzImage");
    assert_eq!(rec.kernel_release, m["kernel_release"].as_str().unwrap());
    assert_eq!(m["slot_boot"]["kernel_sha256"], rec.kernel_sha256.as_str());
    assert!(m["kernel_package"]
        .as_str()
        .unwrap()
        .starts_with("linux-image-"));
    assert!(!m["kernel_version"].as_str().unwrap().is_empty());
    // the initramfs knows its version
    let osrel = String::from_utf8(initramfs_file(&initramfs, "etc/os-release")).unwrap();
    assert!(osrel.contains("VERSION_ID=\"1.0.0\""), "{osrel}");
}

#[test]
fn two_releases_that_differ_only_by_their_kernel() {
    let (good_dir, good_m) = good();
    let d = tempfile::tempdir().unwrap();
    let m = build_release(d.path(), "1.0.0", &["--kernel-package", OTHER_KERNEL]);
    assert_eq!(m["kernel_release"], OTHER_RELEASE);
    assert_eq!(m["kernel_package"], OTHER_KERNEL.split_once('=').unwrap().0);
    assert_eq!(m["kernel_version"], OTHER_KERNEL.split_once('=').unwrap().1);
    assert_ne!(m["kernel_release"], good_m["kernel_release"]);
    let (k, i, rec) = slot_boot(d.path());
    let (gk, _, grec) = slot_boot(good_dir.path());
    assert_ne!(k, gk);
    assert_ne!(rec.kernel_sha256, grec.kernel_sha256);
    assert_eq!(rec.kernel_release, OTHER_RELEASE);
    let files = initramfs_files(&i);
    assert!(
        files
            .iter()
            .any(|f| f.starts_with(&format!("lib/modules/{OTHER_RELEASE}/"))),
        "{files:?}"
    );
    // same modules by name, from the other kernel
    assert_eq!(m["modules"], good_m["modules"]);
}

#[test]
fn a_kernel_package_that_is_not_name_equals_version_is_refused() {
    let d = tempfile::tempdir().unwrap();
    let o = keel_image(&[
        "build",
        "release",
        "--version",
        "1.0.0",
        "--out",
        &d.path().display().to_string(),
        "--kernel-package",
        "linux-image-6.1.0-48-amd64",
    ]);
    assert!(!o.status.success());
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(e.contains("NAME=VERSION"), "{e}");
}

#[test]
fn broken_variants_break_only_the_slot_boot_files() {
    let (good_dir, _) = good();
    let (gk, gi, _) = slot_boot(good_dir.path());
    for variant in ["kernel-refused", "initramfs-no-disk", "initramfs-hangs"] {
        let d = tempfile::tempdir().unwrap();
        let m = build_release(d.path(), "1.0.0", &["--broken", variant]);
        assert_eq!(m["broken"], variant);
        // the release's own kernel and initramfs (the boot stage's) stay good
        assert_eq!(std::fs::read(d.path().join("vmlinuz")).unwrap(), gk);
        assert_eq!(std::fs::read(d.path().join("initramfs.img")).unwrap(), gi);
        let (k, i, _) = slot_boot(d.path());
        match variant {
            "kernel-refused" => {
                assert_eq!(k, release::refused_kernel());
                assert_ne!(&k[0x202..0x206], b"HdrS");
                assert_eq!(i, gi);
            }
            "initramfs-no-disk" => {
                assert_eq!(k, gk);
                let files = initramfs_files(&i);
                let list =
                    String::from_utf8(initramfs_file(&i, "lib/modules/keel-modules.list")).unwrap();
                for m in ["virtio_blk", "virtio_pci"] {
                    assert!(!list.contains(&format!("/{m}.ko")), "{m} in {list}");
                    assert!(
                        !files.iter().any(|f| f.ends_with(&format!("/{m}.ko"))),
                        "{m} in the initramfs"
                    );
                }
                assert!(list.contains("/squashfs.ko"), "{list}");
            }
            "initramfs-hangs" => {
                assert_eq!(k, gk);
                let init = initramfs_file(&i, "init");
                assert_eq!(
                    init,
                    keelos::image::stub::elf(&keelos::image::stub::Stub::Hang)
                );
            }
            _ => unreachable!(),
        }
    }
}

fn esp_bytes(disk: &Path) -> (u64, Vec<u8>) {
    let dev = FileDevice::open(disk, false).unwrap();
    let l = keelos::disk::open(&dev).unwrap();
    (
        l.esp.offset,
        keelos::block::read_vec(&dev, l.esp.offset, l.esp.len as usize).unwrap(),
    )
}

fn fsck_fat(img: &[u8]) -> String {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("esp.img");
    std::fs::write(&p, img).unwrap();
    let o = Command::new("fsck.fat")
        .arg("-n")
        .arg(&p)
        .output()
        .unwrap_or_else(|e| panic!("fsck.fat: {e} (ci/install-deps installs dosfstools)"));
    let text = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(o.status.success(), "fsck.fat -n: {text}");
    text
}

fn sha_outside(disk: &Path, esp_at: u64, esp_len: u64) -> String {
    let b = std::fs::read(disk).unwrap();
    let mut h = sha2::Sha256::new();
    h.update(&b[..esp_at as usize]);
    h.update(&b[(esp_at + esp_len) as usize..]);
    keelos::update::record::hex(&h.finalize())
}

#[test]
fn a_disk_carries_the_boot_stage_and_install_replaces_only_it() {
    let (good_dir, good_m) = good();
    let d = tempfile::tempdir().unwrap();
    let disk = d.path().join("disk.img");
    let disk_s = disk.display().to_string();
    let out = ok(&[
        "build",
        "disk",
        "--release",
        &good_dir.path().display().to_string(),
        "--out",
        &disk_s,
        "--size",
        "1G",
        "--cmdline",
        "keel.test=1",
    ]);
    assert!(out.contains("boot stage 1.0.0"), "{out}");
    let (esp_at, esp) = esp_bytes(&disk);
    assert_eq!(esp.len() as u64, 64 << 20, "the ESP is 64 MiB by default");
    let text = fsck_fat(&esp);
    assert!(text.contains("BOOTX64") || !text.is_empty());
    let rec: BootStageRecord =
        serde_json::from_str(&ok(&["boot-stage", "show", "--disk", &disk_s])).unwrap();
    assert_eq!(rec.version, "1.0.0");
    assert_eq!(
        rec.kernel_release,
        good_m["kernel_release"].as_str().unwrap()
    );
    assert_eq!(rec.cmdline, format!("{} keel.test=1", esp::BASE_CMDLINE));

    // a new boot stage from another release
    let r2 = tempfile::tempdir().unwrap();
    build_release(r2.path(), "1.1.0", &[]);
    let before = sha_outside(&disk, esp_at, esp.len() as u64);
    ok(&[
        "boot-stage",
        "install",
        "--disk",
        &disk_s,
        "--boot-stage",
        &r2.path().display().to_string(),
    ]);
    assert_eq!(sha_outside(&disk, esp_at, esp.len() as u64), before);
    let (_, esp2) = esp_bytes(&disk);
    fsck_fat(&esp2);
    let rec2: BootStageRecord =
        serde_json::from_str(&ok(&["boot-stage", "show", "--disk", &disk_s])).unwrap();
    assert_eq!(rec2.version, "1.1.0");
    assert_eq!(rec2.cmdline, esp::BASE_CMDLINE);
    assert_ne!(rec2.uki_sha256, rec.uki_sha256);

    // guards: not a KeelOS disk; a boot stage that is not a release
    let plain = d.path().join("plain.img");
    std::fs::write(&plain, vec![0u8; 8 << 20]).unwrap();
    let o = keel_image(&[
        "boot-stage",
        "install",
        "--disk",
        &plain.display().to_string(),
        "--boot-stage",
        &r2.path().display().to_string(),
    ]);
    assert!(!o.status.success());
    let o = keel_image(&[
        "boot-stage",
        "install",
        "--disk",
        &disk_s,
        "--boot-stage",
        &d.path().display().to_string(),
    ]);
    assert!(!o.status.success());
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(e.contains("keel-image build release"), "{e}");
    assert_eq!(sha_outside(&disk, esp_at, esp.len() as u64), before);
    assert_eq!(esp_bytes(&disk).1, esp2, "a refused install wrote nothing");
}

#[test]
fn install_formats_the_empty_esp_of_a_disk_made_before_boot_stages() {
    let (good_dir, _) = good();
    let d = tempfile::tempdir().unwrap();
    let disk = d.path().join("old.img").display().to_string();
    ok(&[
        "disk",
        "create",
        &disk,
        "--size",
        "256M",
        "--root-size",
        "64M",
        "--esp-size",
        "48M",
    ]);
    let o = keel_image(&["boot-stage", "show", "--disk", &disk]);
    assert!(!o.status.success(), "an empty ESP has no boot stage");
    ok(&[
        "boot-stage",
        "install",
        "--disk",
        &disk,
        "--boot-stage",
        &good_dir.path().display().to_string(),
        "--cmdline",
        "keel.a=1 keel.b=2",
    ]);
    let (_, esp) = esp_bytes(Path::new(&disk));
    assert_eq!(&esp[82..87], b"FAT32");
    fsck_fat(&esp);
    let rec: BootStageRecord =
        serde_json::from_str(&ok(&["boot-stage", "show", "--disk", &disk])).unwrap();
    assert_eq!(rec.version, "1.0.0");
    assert_eq!(
        rec.cmdline,
        format!("{} keel.a=1 keel.b=2", esp::BASE_CMDLINE)
    );
}
