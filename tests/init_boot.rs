//! Stage 1's boot choice on a real disk image file: real SquashFS images (mksquashfs) in the
//! root slots, mounted for real through read-only loop devices over the partition's bytes (the
//! image file has no kernel partition devices; on a node the same code finds /dev/vdaN). A slot
//! whose SquashFS is corrupt does not mount: it is marked failed and the next boot chooses the
//! other slot. STATE (mkfs.ext4) is mounted and the writable places are set up on it.
//!
//! Needs root, /dev/loop-control, mksquashfs and mkfs.ext4 (ci/install-deps). Each test runs in
//! its own mount namespace so that a failure cannot leave mounts behind on the host.

// the helpers below are test code too; clippy only knows that of #[test] functions
#![allow(clippy::panic, clippy::unwrap_used, clippy::expect_used)]

use keelos::block::{BlockDevice, FileDevice};
use keelos::bootctl::{self, store, Slot};
use keelos::disk::{self, LayoutSpec, MIB};
use keelos::init::bootdisk::{self, BootRootError};
use keelos::init::mounts;
use std::path::{Path, PathBuf};
use std::process::Command;

const SYS_BLOCK: &str = "/sys/class/block";

/// Run `f` in a thread with its own mount namespace (private propagation), as root.
fn in_mount_namespace(f: impl FnOnce() + Send + 'static) {
    let t = std::thread::spawn(move || {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS)
            .expect("unshare(CLONE_NEWNS): run the tests as root");
        nix::mount::mount(
            None::<&str>,
            "/",
            None::<&str>,
            nix::mount::MsFlags::MS_REC | nix::mount::MsFlags::MS_PRIVATE,
            None::<&str>,
        )
        .expect("make / private");
        f();
    });
    if let Err(p) = t.join() {
        std::panic::resume_unwind(p);
    }
}

/// A SquashFS image holding `/slot` (the letter) and the directories a root needs.
fn squashfs(dir: &Path, letter: &str) -> PathBuf {
    let src = dir.join(format!("root-{letter}"));
    for d in ["etc", "var", "tmp", "state", "sbin"] {
        std::fs::create_dir_all(src.join(d)).unwrap();
    }
    std::fs::write(src.join("slot"), letter).unwrap();
    std::fs::write(src.join("etc/hostname"), "image-default\n").unwrap();
    let img = dir.join(format!("{letter}.sqfs"));
    let st = Command::new("mksquashfs")
        .arg(&src)
        .arg(&img)
        .args([
            "-noappend",
            "-quiet",
            "-no-progress",
            "-noI",
            "-noD",
            "-noF",
            "-noX",
        ])
        .status()
        .expect("mksquashfs: install squashfs-tools (ci/install-deps)");
    assert!(st.success());
    img
}

/// A KeelOS disk image: slot A holds `a` and is successful; slot B holds `b` and is activated
/// with 3 tries (a freshly installed update); STATE is ext4.
fn disk(dir: &Path, a: &[u8], b: &[u8]) -> PathBuf {
    let path = dir.join("disk.img");
    let f = std::fs::File::create(&path).unwrap();
    f.set_len(64 * MIB).unwrap();
    drop(f);
    let mut dev = FileDevice::open(&path, true).unwrap();
    disk::create(
        &mut dev,
        LayoutSpec {
            esp_size: MIB,
            root_size: 8 * MIB,
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
    let st = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-E"])
        .arg(format!("offset={}", layout.state.offset))
        .arg(&path)
        .arg(format!("{}k", layout.state.len / 1024))
        .status()
        .expect("mkfs.ext4: install e2fsprogs");
    assert!(st.success());
    path
}

fn flags(path: &Path) -> bootctl::SlotFlags {
    store::load(&FileDevice::open(path, false).unwrap())
        .unwrap()
        .1
}

/// Loop devices still backed by `img`.
fn loops_on(img: &Path) -> Vec<String> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(SYS_BLOCK).unwrap().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if let Ok(b) = std::fs::read_to_string(e.path().join("loop/backing_file")) {
            if Path::new(b.trim()) == img {
                out.push(name);
            }
        }
    }
    out
}

fn umount(p: &Path) {
    nix::mount::umount2(p, nix::mount::MntFlags::empty())
        .unwrap_or_else(|e| panic!("umount {}: {e}", p.display()));
}

#[test]
fn a_slot_that_does_not_mount_is_marked_failed_and_the_other_boots() {
    in_mount_namespace(|| {
        let dir = tempfile::tempdir().unwrap();
        let a = std::fs::read(squashfs(dir.path(), "A")).unwrap();
        // B: a real image with its superblock destroyed, as a torn or wrong write would leave it
        let mut b = std::fs::read(squashfs(dir.path(), "B")).unwrap();
        b[..512].fill(0xAA);
        let img = disk(dir.path(), &a, &b);
        let mnt = dir.path().join("newroot");

        let f = flags(&img);
        assert_eq!((f.b.priority(), f.b.tries()), (2, 3));
        let mut c = bootdisk::choose(&img).unwrap();
        assert_eq!((c.choice.slot, c.choice.tried), (Slot::B, true));
        let (dev, err) = bootdisk::mount_slot(
            &img,
            &c.layout,
            c.sector_size,
            Slot::B,
            &mnt,
            Path::new(SYS_BLOCK),
            None,
        )
        .unwrap_err();
        println!("slot b from {dev} did not mount: {err}");
        let (marked, words) = bootdisk::mark_failed_unless_last(&mut c.dev, Slot::B);
        assert!(marked, "{words}");
        assert!(words.contains("slot b marked failed"), "{words}");
        drop(c);
        let f = flags(&img);
        // the try was spent before the mount, then the slot was marked failed
        assert_eq!(
            (f.b.priority(), f.b.tries(), f.b.successful()),
            (2, 0, false)
        );
        assert!(f.a.successful());
        assert!(
            loops_on(&img).is_empty(),
            "loop devices left: {:?}",
            loops_on(&img)
        );

        // the next choice (in the same power-on, or after a reboot): A, and it mounts
        let c = bootdisk::choose(&img).unwrap();
        assert_eq!((c.choice.slot, c.choice.tried), (Slot::A, false));
        let source = bootdisk::mount_slot(
            &img,
            &c.layout,
            c.sector_size,
            Slot::A,
            &mnt,
            Path::new(SYS_BLOCK),
            None,
        )
        .unwrap();
        drop(c);
        assert_eq!(std::fs::read_to_string(mnt.join("slot")).unwrap(), "A");
        // read-only, as a root slot must be
        let e = std::fs::write(mnt.join("x"), "x").unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EROFS), "{e}");
        println!("then slot a from {}", source.display());
        umount(&mnt);
        assert!(
            loops_on(&img).is_empty(),
            "loop devices left: {:?}",
            loops_on(&img)
        );
    });
}

#[test]
fn a_good_new_slot_boots_with_its_try_spent_and_state_is_set_up() {
    in_mount_namespace(|| {
        let dir = tempfile::tempdir().unwrap();
        let a = std::fs::read(squashfs(dir.path(), "A")).unwrap();
        let b = std::fs::read(squashfs(dir.path(), "B")).unwrap();
        let img = disk(dir.path(), &a, &b);
        let root_dir = dir.path().join("newroot");

        let c = bootdisk::choose(&img).unwrap();
        assert_eq!((c.choice.slot, c.choice.tried), (Slot::B, true));
        let source = bootdisk::mount_slot(
            &img,
            &c.layout,
            c.sector_size,
            Slot::B,
            &root_dir,
            Path::new(SYS_BLOCK),
            None,
        )
        .unwrap();
        assert_eq!(std::fs::read_to_string(root_dir.join("slot")).unwrap(), "B");
        let f = flags(&img);
        assert_eq!((f.b.tries(), f.b.successful()), (2, false));

        let state = root_dir.join("state");
        let src =
            bootdisk::mount_state(&img, &c.layout, c.sector_size, &state, Path::new(SYS_BLOCK))
                .unwrap();
        drop(c);
        println!(
            "root from {}, STATE from {}",
            source.display(),
            src.display()
        );
        assert!(mounts::is_mount_point(&state));
        mounts::prepare_state(&root_dir);
        for d in ["config", "pki", "update", "log", "var"] {
            assert!(state.join(d).is_dir(), "{d}");
        }
        // /var is STATE's var; /etc is writable over the image's defaults and persists on STATE
        std::fs::write(root_dir.join("var/marker"), "v").unwrap();
        assert_eq!(
            std::fs::read_to_string(state.join("var/marker")).unwrap(),
            "v"
        );
        assert_eq!(
            std::fs::read_to_string(root_dir.join("etc/hostname")).unwrap(),
            "image-default\n"
        );
        std::fs::write(root_dir.join("etc/hostname"), "node-1\n").unwrap();
        assert_eq!(
            std::fs::read_to_string(state.join("overlay/etc/upper/hostname")).unwrap(),
            "node-1\n"
        );
        assert!(mounts::is_mount_point(&root_dir.join("tmp")));

        for p in ["tmp", "etc", "var", "state", ""] {
            umount(&root_dir.join(p));
        }
        assert!(
            loops_on(&img).is_empty(),
            "loop devices left: {:?}",
            loops_on(&img)
        );
    });
}

#[test]
fn a_disk_without_a_bootable_slot_is_refused_without_writing() {
    in_mount_namespace(|| {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("blank.img");
        let f = std::fs::File::create(&path).unwrap();
        f.set_len(32 * MIB).unwrap();
        drop(f);
        let mut dev = FileDevice::open(&path, true).unwrap();
        disk::create(
            &mut dev,
            LayoutSpec {
                esp_size: MIB,
                root_size: 4 * MIB,
                state_size: None,
            },
        )
        .unwrap();
        drop(dev);
        let before = std::fs::read(&path).unwrap();
        let err = bootdisk::choose(&path).unwrap_err();
        assert!(matches!(err, BootRootError::Choice { .. }), "{err}");
        assert!(err.to_string().contains("no bootable slot"), "{err}");
        assert_eq!(
            std::fs::read(&path).unwrap(),
            before,
            "nothing may be written"
        );
    });
}

#[test]
fn the_last_bootable_slot_is_never_marked_failed() {
    in_mount_namespace(|| {
        let dir = tempfile::tempdir().unwrap();
        let a = std::fs::read(squashfs(dir.path(), "A")).unwrap();
        let mut b = std::fs::read(squashfs(dir.path(), "B")).unwrap();
        b[..512].fill(0xAA);
        let img = disk(dir.path(), &a, &b);
        // A invalidated (an install into it began and never finished): B is all there is
        let mut dev = FileDevice::open(&img, true).unwrap();
        store::update(&mut dev, |f| bootctl::start_update(f, Slot::A, None)).unwrap();
        drop(dev);
        let mut c = bootdisk::choose(&img).unwrap();
        assert_eq!(c.choice.slot, Slot::B);
        let (marked, words) = bootdisk::mark_failed_unless_last(&mut c.dev, Slot::B);
        drop(c);
        assert!(!marked, "{words}");
        assert!(words.contains("keeps its last bootable slot"), "{words}");
        let f = flags(&img);
        assert!(f.b.bootable(), "{f:?}");
        assert_eq!(
            f.b.tries(),
            2,
            "only the boot choice's try was spent: {f:?}"
        );
    });
}
