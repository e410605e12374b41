//! `keel-image verity` cross-checked against cryptsetup's `veritysetup` (2.6 on Debian 12):
//! both append the same superblock and tree to the same padded data, byte for byte; each
//! accepts the other's good images and rejects corrupt ones.
//!
//! Sizes that are not a multiple of 4096 are covered too: `keel-image verity format` pads the
//! data with zeros to the next 4096 (the padding is data, as in veritysetup), and the copy that
//! veritysetup formats is padded the same way by the test.
//!
//! The data is random; each test prints `KEEL_VERITY_SEED=…`, which replays it. veritysetup and
//! mksquashfs are required (ci/install-deps installs them): without them the tests fail.
#![allow(clippy::unwrap_used, clippy::panic)] // a test crate: failing loudly is its job

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const UUID: &str = "4b2f0c1e-7d3a-4e59-9a61-0c8d2e5f7a13";

fn seed() -> u64 {
    let seed = match std::env::var("KEEL_VERITY_SEED") {
        Ok(s) => s.parse().expect("KEEL_VERITY_SEED must be a u64"),
        Err(_) => std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1),
    };
    eprintln!("KEEL_VERITY_SEED={seed} replays this test");
    seed
}

/// splitmix64: a small, reproducible stream of random bytes.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        let mut v = Vec::with_capacity(n + 8);
        while v.len() < n {
            v.extend_from_slice(&self.next().to_le_bytes());
        }
        v.truncate(n);
        v
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|b| format!("{b:02x}")).collect()
}

/// A tool the tests need, from PATH or the sbin directories (not always on a user's PATH).
fn tool(name: &str, package: &str) -> PathBuf {
    let path = std::env::var("PATH").unwrap_or_default();
    let found = path
        .split(':')
        .chain(["/usr/sbin", "/sbin", "/usr/bin"])
        .map(|d| Path::new(d).join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!("{name} is not installed: these tests need it (apt-get install {package}, or run ci/install-deps)")
        });
    found
}

fn veritysetup() -> PathBuf {
    tool("veritysetup", "cryptsetup-bin")
}

fn run(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    out
}

fn ok(cmd: &mut Command) -> String {
    let out = run(cmd);
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn keel_image() -> Command {
    Command::new(env!("CARGO_BIN_EXE_keel-image"))
}

struct Formatted {
    root_hash: String,
    hash_offset: u64,
    data_blocks: u64,
}

/// `keel-image verity format --json` on `image`.
fn ours_format(image: &Path, salt: &str) -> Formatted {
    let out = ok(keel_image()
        .args(["verity", "format", "--json", "--salt", salt, "--uuid", UUID])
        .arg(image));
    let v: serde_json::Value = serde_json::from_str(&out).expect("format prints JSON");
    assert_eq!(v["salt"], salt);
    assert_eq!(v["uuid"], UUID);
    assert_eq!(v["data_size"], v["hash_offset"]);
    assert_eq!(
        v["image_size"].as_u64(),
        Some(std::fs::metadata(image).unwrap().len())
    );
    Formatted {
        root_hash: v["root_hash"].as_str().expect("root_hash").to_string(),
        hash_offset: v["hash_offset"].as_u64().expect("hash_offset"),
        data_blocks: v["data_blocks"].as_u64().expect("data_blocks"),
    }
}

/// `veritysetup format` with the data file as its own hash device; returns the root hash.
fn theirs_format(image: &Path, salt: &str, hash_offset: u64) -> String {
    let out = ok(Command::new(veritysetup())
        .arg("format")
        .arg(format!("--salt={salt}"))
        .arg(format!("--uuid={UUID}"))
        .arg(format!("--hash-offset={hash_offset}"))
        .arg(image)
        .arg(image));
    out.lines()
        .find_map(|l| l.strip_prefix("Root hash:"))
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|| panic!("no root hash in veritysetup's output:\n{out}"))
}

fn theirs_verify(image: &Path, hash_offset: u64, root: &str) -> Output {
    run(Command::new(veritysetup())
        .arg("verify")
        .arg(format!("--hash-offset={hash_offset}"))
        .arg(image)
        .arg(image)
        .arg(root))
}

fn ours_verify(image: &Path, root: &str, hash_offset: Option<u64>) -> Output {
    let mut c = keel_image();
    c.args(["verity", "verify", "--root-hash", root]).arg(image);
    if let Some(o) = hash_offset {
        c.arg("--hash-offset").arg(o.to_string());
    }
    run(&mut c)
}

/// Formats `data` with both tools, checks they agree byte for byte, that each verifies the
/// result, and that both reject a flipped byte in the data and in the tree.
fn cross_check(data: &[u8], rng: &mut Rng, what: &str) {
    let dir = tempfile::tempdir().unwrap();
    let ours = dir.path().join("ours.img");
    let theirs = dir.path().join("theirs.img");
    std::fs::write(&ours, data).unwrap();
    let padded = data.len().div_ceil(4096) * 4096;
    let mut copy = data.to_vec();
    copy.resize(padded, 0);
    std::fs::write(&theirs, &copy).unwrap();
    let salt = hex(&rng.bytes(32));

    let f = ours_format(&ours, &salt);
    assert_eq!(f.hash_offset, padded as u64, "{what}");
    assert_eq!(f.data_blocks, padded as u64 / 4096, "{what}");
    let their_root = theirs_format(&theirs, &salt, f.hash_offset);
    assert_eq!(f.root_hash, their_root, "{what}: root hashes differ");
    let a = std::fs::read(&ours).unwrap();
    let b = std::fs::read(&theirs).unwrap();
    if a != b {
        let first = a.iter().zip(&b).position(|(x, y)| x != y);
        panic!(
            "{what}: images differ: ours {} bytes, veritysetup's {} bytes, first difference at {first:?}",
            a.len(),
            b.len()
        );
    }

    // each accepts the image, ours also finding the hash offset from the size
    let v = theirs_verify(&ours, f.hash_offset, &f.root_hash);
    assert!(v.status.success(), "{what}: veritysetup verify: {v:?}");
    for offset in [None, Some(f.hash_offset)] {
        let v = ours_verify(&ours, &f.root_hash, offset);
        assert!(v.status.success(), "{what}: verity verify: {v:?}");
    }

    // a flipped data byte: ours names its block, veritysetup fails too
    let at = rng.below(padded as u64) as usize;
    let mut bad = a.clone();
    bad[at] ^= 1 << rng.below(8);
    std::fs::write(&ours, &bad).unwrap();
    let v = ours_verify(&ours, &f.root_hash, None);
    let err = String::from_utf8_lossy(&v.stderr);
    assert!(
        !v.status.success(),
        "{what}: byte {at} flipped, verify passed"
    );
    assert!(
        err.contains(&format!("data block {} ", at / 4096)),
        "{what}: byte {at} flipped, but: {err}"
    );
    let v = theirs_verify(&ours, f.hash_offset, &f.root_hash);
    assert!(
        !v.status.success(),
        "{what}: byte {at} flipped, veritysetup verify passed"
    );

    // a flipped tree byte (when there is a tree)
    let tree_at = padded + 4096;
    if a.len() > tree_at {
        let at = tree_at + rng.below((a.len() - tree_at) as u64) as usize;
        let mut bad = a.clone();
        bad[at] ^= 0x80;
        std::fs::write(&ours, &bad).unwrap();
        let v = ours_verify(&ours, &f.root_hash, None);
        let err = String::from_utf8_lossy(&v.stderr);
        assert!(
            !v.status.success() && err.contains("hash block"),
            "{what}: tree byte {at} flipped, but: {v:?}"
        );
        let v = theirs_verify(&ours, f.hash_offset, &f.root_hash);
        assert!(
            !v.status.success(),
            "{what}: tree byte {at} flipped, veritysetup verify passed"
        );
    }
}

#[test]
fn same_bytes_as_veritysetup_for_edge_sizes() {
    let mut rng = Rng(seed());
    for (what, len) in [
        ("1 block (no tree)", 4096),
        ("128 blocks (1 level)", 128 * 4096),
        ("129 blocks (2 levels)", 129 * 4096),
        ("129 blocks less 100 bytes (padded)", 129 * 4096 - 100),
        ("1 byte (padded to a block)", 1),
        ("random size", 1 + rng.below(600 * 4096) as usize),
    ] {
        let data = rng.bytes(len);
        cross_check(&data, &mut rng, &format!("{what}, {len} bytes"));
    }
}

#[test]
fn same_bytes_as_veritysetup_with_three_levels() {
    // 128 * 128 + 1 blocks (64 MiB + 4 KiB) is the smallest data with 3 levels.
    let mut rng = Rng(seed());
    let data = rng.bytes((128 * 128 + 1) * 4096);
    cross_check(&data, &mut rng, "16385 blocks (3 levels)");
}

#[test]
fn a_real_squashfs_image() {
    let mut rng = Rng(seed());
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    std::fs::create_dir_all(root.join("etc")).unwrap();
    std::fs::create_dir_all(root.join("usr/lib")).unwrap();
    std::fs::write(root.join("etc/os-release"), "NAME=KeelOS\nID=keelos\n").unwrap();
    std::fs::write(root.join("usr/lib/blob"), rng.bytes(300_000)).unwrap();
    std::fs::write(root.join("usr/lib/zeros"), vec![0; 70_000]).unwrap();
    let img = dir.path().join("root.sqfs");
    ok(Command::new(tool("mksquashfs", "squashfs-tools"))
        .arg(&root)
        .arg(&img)
        .args([
            "-noappend",
            "-all-root",
            "-quiet",
            "-noI",
            "-noD",
            "-noF",
            "-noX",
        ]));
    let data = std::fs::read(&img).unwrap();
    assert_eq!(data.len() % 4096, 0, "mksquashfs pads to 4 KiB");
    cross_check(&data, &mut rng, "SquashFS image");
}

#[test]
fn format_refuses_an_image_that_already_has_a_tree() {
    let mut rng = Rng(seed());
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("img");
    std::fs::write(&img, rng.bytes(200 * 4096)).unwrap();
    ours_format(&img, "-");
    let before = std::fs::read(&img).unwrap();
    let out = run(keel_image().args(["verity", "format"]).arg(&img));
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("already ends with"));
    assert_eq!(std::fs::read(&img).unwrap(), before);
}

#[test]
fn verify_explains_a_wrong_root_hash_or_offset() {
    let mut rng = Rng(seed());
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("img");
    std::fs::write(&img, rng.bytes(10 * 4096)).unwrap();
    let f = ours_format(&img, &hex(&rng.bytes(32)));
    let out = ours_verify(&img, &"00".repeat(32), None);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("root hash is not this image's"),
        "{err}"
    );
    let out = ours_verify(&img, &f.root_hash, Some(4096));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("no dm-verity superblock"),
        "{err}"
    );
    let out = ours_verify(&img, "xyz", None);
    assert!(!out.status.success());
}
