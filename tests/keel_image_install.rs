//! keel-image install/compress/delta on disk image files, with the classic bsdiff/bspatch tools
//! (Debian package bsdiff; the test command installs it) as the reference for the patch format.

#![allow(clippy::panic, clippy::unwrap_used)] // a test crate: failing loudly is its job

use sha2::{Digest, Sha256};
use std::path::Path;
use std::process::{Command, Output};

const BIN: &str = env!("CARGO_BIN_EXE_keel-image");

fn run(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .output()
        .expect("run keel-image")
}

fn ok(args: &[&str]) -> String {
    let out = run(args);
    assert!(
        out.status.success(),
        "keel-image {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn fails(args: &[&str]) -> String {
    let out = run(args);
    assert!(!out.status.success(), "keel-image {args:?} should fail");
    String::from_utf8(out.stderr).unwrap()
}

fn tool(cmd: &str, args: &[&str]) {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{cmd} is not installed ({e}); ci/install-deps installs it"));
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn sha(b: &[u8]) -> String {
    Sha256::digest(b)
        .iter()
        .map(|x| format!("{x:02x}"))
        .collect()
}

fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

struct Fixture {
    dir: tempfile::TempDir,
    disk: String,
    v1: Vec<u8>,
    v2: Vec<u8>,
}

impl Fixture {
    fn path(&self, name: &str) -> String {
        self.dir.path().join(name).display().to_string()
    }
    fn write(&self, name: &str, b: &[u8]) -> String {
        std::fs::write(self.dir.path().join(name), b).unwrap();
        self.path(name)
    }
    fn json(&self) -> serde_json::Value {
        serde_json::from_str(&ok(&["slots", "show", &self.disk, "--json"])).unwrap()
    }
    fn slot(&self, i: usize, len: usize) -> Vec<u8> {
        let v = self.json();
        let _ = v;
        let bytes = std::fs::read(&self.disk).unwrap();
        let off = [17 << 20, 33 << 20][i];
        bytes[off..off + len].to_vec()
    }
}

/// v1 installed in slot A and marked successful; v2 is v1 with a few changes.
fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.img").display().to_string();
    ok(&[
        "disk",
        "create",
        &disk,
        "--size",
        "64M",
        "--root-size",
        "16M",
        "--esp-size",
        "16M",
    ]);
    let v1 = noise(1, 1 << 20);
    let mut v2 = v1.clone();
    v2[100_000..100_100].copy_from_slice(&noise(2, 100));
    v2.extend_from_slice(&noise(3, 300_000));
    let f = Fixture { dir, disk, v1, v2 };
    let img = f.write("v1", &f.v1);
    let out = ok(&[
        "install",
        &f.disk,
        "--image",
        &img,
        "--sha256",
        &sha(&f.v1),
        "--version",
        "1",
    ]);
    assert!(out.contains("slot a"), "{out}");
    ok(&["slots", "mark-successful", &f.disk, "a"]);
    f
}

#[test]
fn full_install_of_a_compressed_image_shows_in_slots() {
    let f = fixture();
    let raw = f.write("v2", &f.v2);
    let z = f.path("v2.zst");
    ok(&["compress", &raw, &z, "--level", "3"]);
    // the standard zstd tool reads our frames
    tool("zstd", &["-d", "-q", "-f", &z, "-o", &f.path("v2.check")]);
    assert_eq!(std::fs::read(f.path("v2.check")).unwrap(), f.v2);
    let out = ok(&[
        "install",
        &f.disk,
        "--image",
        &z,
        "--sha256",
        &sha(&f.v2),
        "--version",
        "2",
    ]);
    assert!(out.contains("slot b"), "{out}");
    let v = f.json();
    let b = &v["slots"][1];
    assert_eq!(b["version"], "2", "{v}");
    assert_eq!(b["length"], f.v2.len(), "{v}");
    assert_eq!(b["sha256"], sha(&f.v2), "{v}");
    assert_eq!(b["priority"], 2);
    assert_eq!(b["tries"], 3);
    assert_eq!(v["slots"][0]["version"], "1");
    assert_eq!(v["boot"], "b");
    assert_eq!(f.slot(1, f.v2.len()), f.v2);
    assert_eq!(f.slot(0, f.v1.len()), f.v1);
}

/// An image with a dm-verity tree appended by the stock `veritysetup format` installs with the
/// root hash veritysetup printed in its slot record (the engine reads it from the verified
/// bytes); the same image without the tree gets none.
#[test]
fn an_image_formatted_by_veritysetup_gets_its_root_hash_in_the_slot_record() {
    let f = fixture();
    let data = noise(7, 3 << 20);
    let img = f.write("v2-verity", &data);
    let out = Command::new("veritysetup")
        .arg("format")
        .arg(format!("--hash-offset={}", data.len()))
        .arg("--salt=5a5a5a5a")
        .arg(&img)
        .arg(&img)
        .output()
        .expect("veritysetup (Debian cryptsetup-bin; ci/install-deps installs it)");
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    let root = text
        .lines()
        .find_map(|l| l.strip_prefix("Root hash:"))
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|| panic!("{text}"));
    let formatted = std::fs::read(&img).unwrap();
    assert!(formatted.len() > data.len());
    ok(&[
        "install",
        &f.disk,
        "--image",
        &img,
        "--sha256",
        &sha(&formatted),
        "--version",
        "2",
    ]);
    let v = f.json();
    assert_eq!(v["slots"][1]["verity_root_hash"], root, "{v}");
    assert_eq!(
        v["slots"][0]["verity_root_hash"],
        serde_json::Value::Null,
        "{v}"
    );
    assert!(
        ok(&["slots", "show", &f.disk]).contains(&format!("slot b: dm-verity root hash {root}"))
    );
}

/// Relative paths, as an operator types them: the checkpoint lands beside the disk.
#[test]
fn install_with_relative_paths() {
    let f = fixture();
    f.write("v2", &f.v2);
    std::fs::copy(&f.disk, f.path("rel.img")).unwrap();
    let out = Command::new(BIN)
        .current_dir(f.dir.path())
        .args([
            "install",
            "rel.img",
            "--image",
            "v2",
            "--sha256",
            &sha(&f.v2),
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn delta_made_by_classic_bsdiff_installs_and_a_corrupt_one_falls_back() {
    let f = fixture();
    let v1 = f.write("v1", &f.v1);
    let v2 = f.write("v2", &f.v2);
    let z = f.path("v2.zst");
    ok(&["compress", &v2, &z, "--level", "3"]);
    let classic = f.path("classic.patch");
    tool("bsdiff", &[&v1, &v2, &classic]);
    // ours applies the classic patch, and classic bspatch applies ours made with
    // `--format bsdiff40`
    ok(&["delta", "apply", &v1, &classic, &f.path("ours.out")]);
    assert_eq!(std::fs::read(f.path("ours.out")).unwrap(), f.v2);
    let ours = f.path("ours.patch");
    ok(&["delta", "create", &v1, &v2, &ours, "--format", "bsdiff40"]);
    tool("bspatch", &[&v1, &f.path("classic.out"), &ours]);
    assert_eq!(std::fs::read(f.path("classic.out")).unwrap(), f.v2);
    // the default is BSDF2 (brotli streams), detected from its magic by `delta apply`
    let bsdf2 = f.path("ours.bsdf2");
    ok(&["delta", "create", &v1, &v2, &bsdf2]);
    assert!(std::fs::read(&bsdf2)
        .unwrap()
        .starts_with(b"BSDF2\x02\x02\x02"));
    ok(&["delta", "apply", &v1, &bsdf2, &f.path("bsdf2.out")]);
    assert_eq!(std::fs::read(f.path("bsdf2.out")).unwrap(), f.v2);

    let out = ok(&[
        "install",
        &f.disk,
        "--delta",
        &classic,
        "--image",
        &z,
        "--sha256",
        &sha(&f.v2),
        "--version",
        "2",
    ]);
    assert!(
        out.contains("delta used") && out.contains("bytes saved"),
        "{out}"
    );
    assert_eq!(f.slot(1, f.v2.len()), f.v2);

    // again, with a corrupt patch: falls back to the full image
    ok(&["slots", "mark-successful", &f.disk, "b"]);
    let v3: Vec<u8> = [&f.v2[..], b"three"].concat();
    let v3p = f.write("v3", &v3);
    let mut bad = std::fs::read(&classic).unwrap();
    let mid = bad.len() / 2;
    bad[mid] ^= 0xFF;
    let bad = f.write("bad.patch", &bad);
    let out = ok(&[
        "install",
        &f.disk,
        "--delta",
        &bad,
        "--image",
        &v3p,
        "--sha256",
        &sha(&v3),
    ]);
    assert!(out.contains("fell back to the full image"), "{out}");
    assert_eq!(f.slot(0, v3.len()), v3);
    assert_eq!(f.slot(1, f.v2.len()), f.v2, "the running slot was touched");
}

#[test]
fn bad_installs_change_nothing_that_boots() {
    let f = fixture();
    let v2 = f.write("v2", &f.v2);
    let before = f.json();
    // wrong digest
    let err = fails(&["install", &f.disk, "--image", &v2, "--sha256", &sha(&f.v1)]);
    assert!(err.contains("does not match its digest"), "{err}");
    let after = f.json();
    assert_eq!(after["slots"][0], before["slots"][0]);
    assert_eq!(after["slots"][1]["bootable"], false);
    assert_eq!(after["boot"], "a");
    // a digest that is not one
    let err = fails(&["install", &f.disk, "--image", &v2, "--sha256", "1234"]);
    assert!(err.contains("64 hex"), "{err}");
    // larger than the slot: refused before writing
    let big = f.write("big", &vec![7u8; 17 << 20]);
    let disk_before = std::fs::read(&f.disk).unwrap();
    let err = fails(&["install", &f.disk, "--image", &big, "--sha256", &sha(b"x")]);
    assert!(err.contains("holds at most"), "{err}");
    assert!(
        std::fs::read(&f.disk).unwrap() == disk_before,
        "a refused install wrote"
    );
    // empty image and missing file
    let empty = f.write("empty", b"");
    assert!(
        fails(&["install", &f.disk, "--image", &empty, "--sha256", &sha(b"")]).contains("empty")
    );
    let err = fails(&[
        "install",
        &f.disk,
        "--image",
        "/nonexistent/img",
        "--sha256",
        &sha(b""),
    ]);
    assert!(err.contains("/nonexistent/img"), "{err}");
    // random bytes as a patch, and a patch for another base: fall back, still staged right
    let junk = f.write("junk.patch", &noise(5, 4096));
    let out = ok(&[
        "install",
        &f.disk,
        "--delta",
        &junk,
        "--image",
        &v2,
        "--sha256",
        &sha(&f.v2),
    ]);
    assert!(out.contains("fell back"), "{out}");
    // another base: v1 with a region changed, so the patch borrows bytes that differ
    let mut other = f.v1.clone();
    other[200_000..600_000].copy_from_slice(&noise(11, 400_000));
    let other = f.write("other", &other);
    let other_patch = f.path("other.patch");
    tool("bsdiff", &[&other, &v2, &other_patch]);
    let out = ok(&[
        "install",
        &f.disk,
        "--delta",
        &other_patch,
        "--image",
        &v2,
        "--sha256",
        &sha(&f.v2),
    ]);
    assert!(out.contains("fell back"), "{out}");
    assert_eq!(f.slot(1, f.v2.len()), f.v2);
    assert!(Path::new(&f.disk).exists());
}
