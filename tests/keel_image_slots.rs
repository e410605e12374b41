//! keel-image disk/slots on real disk image files, read back by the standard tools
//! (`sgdisk` from gdisk, `cgpt` from vboot-utils; the test command installs both).

#![allow(clippy::panic, clippy::unwrap_used)] // a test crate: failing loudly is its job

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
    String::from_utf8(out.stdout).expect("utf-8")
}

fn fails(args: &[&str]) -> String {
    let out = run(args);
    assert!(!out.status.success(), "keel-image {args:?} should fail");
    String::from_utf8(out.stderr).expect("utf-8")
}

fn tool(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{cmd} is not installed ({e}); ci/install-deps installs it"));
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn new_disk(dir: &Path) -> String {
    let disk = dir.join("disk.img").display().to_string();
    ok(&[
        "disk",
        "create",
        &disk,
        "--size",
        "64M",
        "--root-size",
        "16M",
        "--esp-size",
        "8M",
    ]);
    disk
}

fn json(disk: &str) -> serde_json::Value {
    serde_json::from_str(&ok(&["slots", "show", disk, "--json"])).expect("json")
}

#[test]
fn sgdisk_lists_the_four_labels_with_their_types() {
    let dir = tempfile::tempdir().expect("tempdir");
    let disk = new_disk(dir.path());
    let out = tool("sgdisk", &["-p", &disk]);
    let rows: Vec<(String, String)> = out
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() >= 7 && f[0].parse::<u32>().is_ok())
                .then(|| (f[5].to_string(), f[6].to_string()))
        })
        .collect();
    let want = [
        ("EF00", "ESP"),
        ("8304", "MATIC_ROOT_A"),
        ("8304", "MATIC_ROOT_B"),
        ("8300", "MATIC_STATE"),
    ];
    let want: Vec<(String, String)> = want
        .iter()
        .map(|(c, n)| (c.to_string(), n.to_string()))
        .collect();
    assert_eq!(rows, want, "sgdisk -p:\n{out}");
    let verify = tool("sgdisk", &["-v", &disk]);
    assert!(verify.contains("No problems found"), "{verify}");
}

#[test]
fn cgpt_reads_the_flags_we_write() {
    let dir = tempfile::tempdir().expect("tempdir");
    let disk = new_disk(dir.path());
    let v = json(&disk);
    assert_eq!(
        v["boot"],
        serde_json::Value::Null,
        "new disk boots nothing: {v}"
    );
    ok(&["slots", "activate", &disk, "b", "--tries", "3"]);
    let field = |f: &str| {
        tool("cgpt", &["show", "-i", "3", f, &disk])
            .trim()
            .to_string()
    };
    assert_eq!(field("-P"), "2");
    assert_eq!(field("-T"), "3");
    assert_eq!(field("-S"), "0");
    assert_eq!(
        tool("cgpt", &["show", "-i", "3", "-l", &disk]).trim(),
        "MATIC_ROOT_B"
    );
    // and we read what cgpt writes
    tool(
        "cgpt",
        &["add", "-i", "2", "-P", "5", "-T", "0", "-S", "1", &disk],
    );
    let v = json(&disk);
    assert_eq!(v["slots"][0]["priority"], 5, "{v}");
    assert_eq!(v["slots"][0]["successful"], true, "{v}");
    assert_eq!(v["boot"], "a", "{v}");
}

#[test]
fn show_json_has_the_documented_shape() {
    let dir = tempfile::tempdir().expect("tempdir");
    let disk = new_disk(dir.path());
    ok(&["slots", "activate", &disk, "a", "--tries", "2"]);
    let v = json(&disk);
    let a = &v["slots"][0];
    assert_eq!(a["slot"], "a");
    assert_eq!(a["label"], "MATIC_ROOT_A");
    assert_eq!(a["priority"], 2);
    assert_eq!(a["tries"], 2);
    assert_eq!(a["successful"], false);
    assert_eq!(a["bootable"], true);
    assert_eq!(v["slots"][1]["slot"], "b");
    assert_eq!(v["slots"][1]["bootable"], false);
    assert_eq!(v["boot"], "a");
}

#[test]
fn boot_spends_tries_then_falls_back_and_rollback_works() {
    let dir = tempfile::tempdir().expect("tempdir");
    let disk = new_disk(dir.path());
    assert!(fails(&["slots", "boot", &disk]).contains("no bootable slot"));
    ok(&["slots", "activate", &disk, "a", "--tries", "1"]);
    assert_eq!(ok(&["slots", "boot", &disk]).trim(), "a");
    ok(&["slots", "mark-successful", &disk, "a"]);
    ok(&["slots", "activate", &disk, "b", "--tries", "2"]);
    assert_eq!(ok(&["slots", "boot", &disk]).trim(), "b");
    assert_eq!(ok(&["slots", "boot", &disk]).trim(), "b");
    // two failed boots: B is out of tries and A boots again
    assert_eq!(ok(&["slots", "boot", &disk]).trim(), "a");
    let v = json(&disk);
    assert_eq!(v["slots"][1]["state"], "failed", "{v}");
    // B cannot be rolled back to now
    let err = fails(&["slots", "rollback", &disk]);
    assert!(err.contains("cannot roll back to slot b"), "{err}");
    // a good B can
    ok(&["slots", "activate", &disk, "b", "--tries", "1"]);
    assert_eq!(ok(&["slots", "boot", &disk]).trim(), "b");
    ok(&["slots", "mark-successful", &disk, "b"]);
    ok(&["slots", "rollback", &disk]);
    assert_eq!(json(&disk)["boot"], "a");
}

fn partitions(disk: &str) -> Vec<(u64, u64)> {
    let out = tool("sgdisk", &["-p", disk]);
    out.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() >= 7 && f[0].parse::<u32>().is_ok()).then(|| {
                (
                    f[1].parse().unwrap_or(0) * 512,
                    (f[2].parse().unwrap_or(0) + 1) * 512,
                )
            })
        })
        .collect()
}

#[test]
fn bad_disks_get_clear_errors_and_damaged_copies_are_repaired() {
    let dir = tempfile::tempdir().expect("tempdir");
    // not a disk
    let junk = dir.path().join("junk.img");
    std::fs::write(&junk, vec![0x5Au8; 4 << 20]).expect("write");
    let err = fails(&["slots", "show", &junk.display().to_string()]);
    assert!(err.contains("no valid GPT"), "{err}");
    // missing file
    let err = fails(&["slots", "show", "/nonexistent/disk.img"]);
    assert!(err.contains("/nonexistent/disk.img"), "{err}");

    let disk = new_disk(dir.path());
    ok(&["slots", "activate", &disk, "a", "--tries", "3"]);
    let parts = partitions(&disk);
    let pristine = std::fs::read(&disk).expect("read");
    let inside = |bytes: &[u8]| -> Vec<u8> {
        parts
            .iter()
            .flat_map(|(s, e)| bytes[*s as usize..*e as usize].to_vec())
            .collect()
    };
    let len = pristine.len();
    // a flipped CRC byte in the primary header, then in the backup header
    for at in [512 + 16, len - 512 + 16] {
        let mut bytes = pristine.clone();
        bytes[at] ^= 0xFF;
        std::fs::write(&disk, &bytes).expect("write");
        let shown = ok(&["slots", "show", &disk]);
        assert!(shown.contains("damaged"), "{shown}");
        assert_eq!(json(&disk)["slots"][0]["tries"], 3);
        ok(&["slots", "mark-successful", &disk, "a"]);
        let after = std::fs::read(&disk).expect("read");
        assert!(inside(&after) == inside(&pristine), "a partition changed");
        assert!(!ok(&["slots", "show", &disk]).contains("damaged"));
        assert!(tool("sgdisk", &["-v", &disk]).contains("No problems found"));
        std::fs::write(&disk, &pristine).expect("restore");
    }
    // truncated image
    let mut bytes = pristine.clone();
    bytes.truncate(len / 2);
    std::fs::write(&disk, &bytes).expect("write");
    let err = fails(&["slots", "show", &disk]);
    assert!(err.contains("truncated"), "{err}");
    let err = fails(&["slots", "activate", &disk, "b"]);
    assert!(err.contains("truncated"), "{err}");
    assert_eq!(
        std::fs::read(&disk).expect("read"),
        bytes,
        "a refused change wrote something"
    );
}

#[test]
fn disk_create_refuses_what_does_not_fit() {
    let dir = tempfile::tempdir().expect("tempdir");
    let disk = dir.path().join("small.img").display().to_string();
    let err = fails(&[
        "disk",
        "create",
        &disk,
        "--size",
        "8M",
        "--root-size",
        "16M",
    ]);
    assert!(err.contains("needs") && err.contains("larger"), "{err}");
    let err = fails(&["disk", "create", &disk, "--size", "12Q"]);
    assert!(err.contains("suffix"), "{err}");
}

#[test]
fn four_k_sector_image_is_detected() {
    let dir = tempfile::tempdir().expect("tempdir");
    let disk = dir.path().join("4k.img").display().to_string();
    ok(&[
        "disk",
        "create",
        &disk,
        "--size",
        "64M",
        "--root-size",
        "16M",
        "--sector-size",
        "4096",
    ]);
    ok(&["slots", "activate", &disk, "b", "--tries", "4"]);
    let v = json(&disk);
    assert_eq!(v["slots"][1]["tries"], 4, "{v}");
    assert_eq!(v["boot"], "b");
}
