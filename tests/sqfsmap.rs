//! The SquashFS file map (`keelos::update::sqfsmap`) read from images made by the real
//! mksquashfs, with the flags KeelOS builds its roots with: every regular file's ranges hold
//! exactly its bytes, and the old and new versions of a file are paired across a versioned
//! directory. Needs mksquashfs (squashfs-tools; `ci/install-deps` installs it).
#![allow(clippy::unwrap_used)]

use keelos::update::bsdf2::{self, Bsdf2Params, CreateFormat};
use keelos::update::bspatch::apply_in_memory;
use keelos::update::matcher::{self, Matching};
use keelos::update::sqfsmap::{self, SqfsError};
use std::path::Path;
use std::process::Command;

fn noise(seed: u32, len: usize) -> Vec<u8> {
    (0..len as u32)
        .map(|i| ((i ^ seed).wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect()
}

/// A tree with files of every shape: empty, fragment-only, whole blocks, blocks and a tail,
/// a duplicate, a symlink, and a directory with enough entries to span metadata blocks.
fn tree(root: &Path, version: &str, seed: u32) -> Vec<(String, Vec<u8>)> {
    let mut files = vec![
        ("/empty".to_string(), vec![]),
        ("/small".to_string(), noise(seed, 300)),
        ("/blocks".to_string(), noise(seed + 1, 256 << 10)),
        (
            "/blocks-and-tail".to_string(),
            noise(seed + 2, (300 << 10) + 77),
        ),
        ("/copy-of-small".to_string(), noise(seed, 300)),
    ];
    for i in 0..400 {
        files.push((
            format!("/lib/modules/{version}/kernel/module-with-a-long-name-{i:04}.ko"),
            noise(seed + 10 + i, 1000 + 37 * i as usize),
        ));
    }
    for (p, b) in &files {
        let at = root.join(p.trim_start_matches('/'));
        std::fs::create_dir_all(at.parent().unwrap()).unwrap();
        std::fs::write(at, b).unwrap();
    }
    std::os::unix::fs::symlink("small", root.join("link")).unwrap();
    files
}

fn mksquashfs(tree: &Path, out: &Path, flags: &[&str]) {
    let st = Command::new("mksquashfs")
        .arg(tree)
        .arg(out)
        .args([
            "-noappend",
            "-all-root",
            "-quiet",
            "-no-progress",
            "-no-xattrs",
        ])
        .args(flags)
        .output()
        .expect("mksquashfs (squashfs-tools) is needed");
    assert!(
        st.status.success(),
        "{}",
        String::from_utf8_lossy(&st.stderr)
    );
}

const KEEL_FLAGS: &[&str] = &["-noI", "-noD", "-noF", "-noX"];

#[test]
fn every_file_range_holds_exactly_the_file_bytes() {
    let d = tempfile::tempdir().unwrap();
    let t = d.path().join("t");
    let want = tree(&t, "6.1.0-47-amd64", 1);
    // as KeelOS builds roots (tails of files over a block in the last block), and with tails
    // always in fragments
    for (k, tails) in [(0, false), (1, true)] {
        let img_path = d.path().join(format!("img{k}"));
        let mut flags = KEEL_FLAGS.to_vec();
        if tails {
            flags.push("-always-use-fragments");
        }
        mksquashfs(&t, &img_path, &flags);
        let img = std::fs::read(&img_path).unwrap();
        let got = sqfsmap::files(&img).unwrap();
        assert_eq!(got.len(), want.len(), "regular files found");
        for (path, bytes) in &want {
            let f = got.iter().find(|f| &f.path == path).unwrap();
            let mut read = Vec::new();
            for r in &f.ranges {
                read.extend_from_slice(&img[r.start as usize..r.end as usize]);
            }
            assert_eq!(&read, bytes, "{path}: {:?}", f.ranges);
        }
        let bt = got.iter().find(|f| f.path == "/blocks-and-tail").unwrap();
        assert_eq!(
            bt.ranges.len(),
            if tails { 2 } else { 1 },
            "{:?}",
            bt.ranges
        );
    }
}

#[test]
fn compressed_metadata_is_refused_with_a_reason() {
    let d = tempfile::tempdir().unwrap();
    let t = d.path().join("t");
    tree(&t, "1", 1);
    let img_path = d.path().join("img");
    mksquashfs(&t, &img_path, &[]);
    let img = std::fs::read(&img_path).unwrap();
    assert_eq!(sqfsmap::files(&img), Err(SqfsError::CompressedMetadata));
}

/// Damaged images: every truncation and a run of single-byte corruptions of the superblock
/// and tables give an error or a map, never a panic, and a map's ranges stay in the image.
#[test]
fn damaged_images_are_errors_not_panics() {
    let d = tempfile::tempdir().unwrap();
    let t = d.path().join("t");
    tree(&t, "1", 1);
    let img_path = d.path().join("img");
    mksquashfs(&t, &img_path, KEEL_FLAGS);
    let img = std::fs::read(&img_path).unwrap();
    let in_bounds = |b: &[u8]| {
        if let Ok(files) = sqfsmap::files(b) {
            for f in files {
                for r in f.ranges {
                    assert!(r.start <= r.end && r.end <= b.len() as u64, "{r:?}");
                }
            }
        }
    };
    for cut in (0..img.len()).step_by(997) {
        in_bounds(&img[..cut]);
    }
    let tables = u64::from_le_bytes(img[64..72].try_into().unwrap()) as usize;
    let mut seed = 7u32;
    for _ in 0..3000 {
        seed = seed.wrapping_mul(1_103_515_245).wrapping_add(12345);
        let at = if seed.is_multiple_of(4) {
            (seed as usize >> 8) % 96
        } else {
            tables + (seed as usize >> 8) % (img.len() - tables)
        };
        let mut bad = img.clone();
        bad[at] ^= 1 << (seed % 8);
        in_bounds(&bad);
    }
}

/// Two versions of the tree: modules under a versioned directory are paired with their old
/// versions, and a per-file patch between the images rebuilds the new image exactly.
#[test]
fn versions_pair_across_a_versioned_directory_and_patches_round_trip() {
    let d = tempfile::tempdir().unwrap();
    let (to, tn) = (d.path().join("old"), d.path().join("new"));
    tree(&to, "6.1.0-47-amd64", 1);
    let files = tree(&tn, "6.1.0-48-amd64", 1);
    // the new modules differ a little from the old ones
    for (p, b) in &files {
        if p.contains("module") {
            let mut b = b.clone();
            b.insert(b.len() / 2, 0xAA);
            std::fs::write(tn.join(p.trim_start_matches('/')), b).unwrap();
        }
    }
    let (io, inn) = (d.path().join("old.img"), d.path().join("new.img"));
    mksquashfs(&to, &io, KEEL_FLAGS);
    mksquashfs(&tn, &inn, KEEL_FLAGS);
    let (old, new) = (std::fs::read(&io).unwrap(), std::fs::read(&inn).unwrap());
    let pairs = sqfsmap::image_pairs(&old, &new).unwrap();
    let new_files = sqfsmap::files(&new).unwrap();
    let old_files = sqfsmap::files(&old).unwrap();
    let m = |path: &str, fs: &[sqfsmap::FileExtent]| {
        fs.iter().find(|f| f.path == path).unwrap().ranges.clone()
    };
    let module = "/lib/modules/6.1.0-48-amd64/kernel/module-with-a-long-name-0123.ko";
    let old_module = "/lib/modules/6.1.0-47-amd64/kernel/module-with-a-long-name-0123.ko";
    let p = pairs
        .iter()
        .find(|p| p.new == m(module, &new_files)[0])
        .unwrap();
    assert_eq!(p.old, m(old_module, &old_files));
    // every module is paired
    assert!(pairs.len() >= 400, "{} pairs", pairs.len());
    for per_file in [true, false] {
        let mut patch = Vec::new();
        let params = Bsdf2Params {
            matching: Matching::Near,
            quality: 5,
            per_file,
        };
        bsdf2::create(&old, &new, CreateFormat::Bsdf2Brotli(params), &mut patch).unwrap();
        assert_eq!(
            apply_in_memory(&old, patch, new.len() as u64).unwrap(),
            new,
            "per_file {per_file}"
        );
    }
    // bsdiff's rule with the file map too
    let s = matcher::diff_files(&old, &new, Matching::Bsdiff, &pairs);
    let patch = bsdf2::bsdf2_brotli(&s, new.len() as u64, 5).unwrap();
    assert_eq!(apply_in_memory(&old, patch, new.len() as u64).unwrap(), new);
}
