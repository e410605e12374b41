//! Which slot is running, as the boot established it: stage 1 mounts a slot and hands its letter
//! to stage 2, which writes it to [`BOOTED_PATH`] (on /run, so it lasts exactly as long as this
//! boot) before any service starts; keel-agent reads it at every start, so a restarted agent
//! knows the running slot without looking at the flags (which after an install prefer the
//! staged slot, not the running one).
//!
//! The file is cross-checked against the device the root file system is mounted from
//! ([`mounted_root_slot`]): if the two disagree, nothing is trusted and the agent refuses
//! installs and rollbacks. This module reads /proc and /sys and the file; it never writes a
//! disk.

use crate::bootctl::Slot;
use crate::disk::Layout;
use serde::{Deserialize, Serialize};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

/// Where stage 2 records the booted slot on a node.
pub const BOOTED_PATH: &str = "/run/keel/booted";

/// Where the boot record is kept for keel-init listening on `control_socket`: beside it
/// (`/run/keel/booted` on a node; a test's own directory in tests).
pub fn record_path(control_socket: &Path) -> PathBuf {
    control_socket.with_file_name("booted")
}

/// What stage 2 writes: the slot stage 1 mounted, and how it booted it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Booted {
    /// "a" or "b".
    pub slot: String,
    /// The root's device as stage 2 saw it ("major:minor" from /proc/self/mountinfo), empty if
    /// it could not be read.
    #[serde(default)]
    pub root_device: String,
    /// The version of the boot stage that chose the slot (`keel.bootstage`, e.g. "1.0.0"),
    /// empty when unknown (an older stage 2, or no boot stage).
    #[serde(default)]
    pub boot_stage: String,
    /// Whether the boot stage booted the slot on trial (`keel.boot=trial`).
    #[serde(default)]
    pub trial: bool,
}

impl Booted {
    pub fn slot(&self) -> Result<Slot, String> {
        self.slot
            .parse()
            .map_err(|_| format!("slot {:?} is neither a nor b", self.slot))
    }
}

/// Write `booted` to `path` atomically (a temporary file renamed over it).
pub fn write(path: &Path, booted: &Booted) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension("tmp");
    let json = serde_json::to_vec(booted).map_err(std::io::Error::other)?;
    std::fs::write(&tmp, json)?;
    std::fs::rename(&tmp, path)
}

/// Read the record at `path`: `Ok(None)` when there is none (not a node booted by keel-init).
pub fn read(path: &Path) -> Result<Option<Booted>, String> {
    match std::fs::read(path) {
        Ok(b) if b.len() > 4096 => Err(format!("{} is larger than 4 KiB", path.display())),
        Ok(b) => serde_json::from_slice(&b)
            .map(Some)
            .map_err(|e| format!("{} is not a boot record: {e}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(format!("reading {}: {e}", path.display())),
    }
}

/// The device ("major:minor") of the file system mounted at `/` in `mountinfo` (the text of
/// /proc/self/mountinfo); the last one wins, as a later mount hides an earlier one.
pub fn root_device(mountinfo: &str) -> Option<(u32, u32)> {
    mountinfo
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            (f.len() > 4 && f[4] == "/").then(|| f[2])
        })
        .next_back()
        .and_then(|d| {
            let (a, b) = d.split_once(':')?;
            Some((a.parse().ok()?, b.parse().ok()?))
        })
}

/// The root's device of this process, from /proc/self/mountinfo.
pub fn this_root_device() -> Option<(u32, u32)> {
    root_device(&std::fs::read_to_string("/proc/self/mountinfo").ok()?)
}

/// Where a mounted block device lies on its disk, as sysfs describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RootPlace {
    /// A partition of the disk with device number `disk`, starting at `start_512` (sysfs
    /// counts in 512-byte units).
    Partition { disk: (u32, u32), start_512: u64 },
    /// A loop device over `backing` at byte `offset` (stage 1 on a disk image file).
    Loop { backing: PathBuf, offset: u64 },
    /// Something else (a whole disk, a RAM disk, a network file system).
    Other,
}

/// Where the block device `dev` lies, from `sys_dev_block` (/sys/dev/block). A slot's verity
/// device (device-mapper, named `keel-root-X` by stage 1, over one partition or loop device
/// from its first byte) lies where that device does.
pub fn place_of(sys_dev_block: &Path, dev: (u32, u32)) -> RootPlace {
    let d = sys_dev_block.join(format!("{}:{}", dev.0, dev.1));
    let read = |p: PathBuf| {
        std::fs::read_to_string(p)
            .ok()
            .map(|s| s.trim().to_string())
    };
    let parse_dev = |s: String| -> Option<(u32, u32)> {
        let (a, b) = s.split_once(':')?;
        Some((a.parse().ok()?, b.parse().ok()?))
    };
    if read(d.join("dm/name")).is_some_and(|n| n.starts_with("keel-root-")) {
        let slaves: Vec<PathBuf> = std::fs::read_dir(d.join("slaves"))
            .map(|rd| rd.flatten().map(|e| e.path()).collect())
            .unwrap_or_default();
        return match slaves.as_slice() {
            [one] => match read(one.join("dev")).and_then(parse_dev) {
                // one level only: a verity device is never stacked on another here
                Some(under) if under != dev => place_of(sys_dev_block, under),
                _ => RootPlace::Other,
            },
            _ => RootPlace::Other,
        };
    }
    if let Some(start) = read(d.join("start")).and_then(|s| s.parse().ok()) {
        if let Some(disk) = read(d.join("../dev")).and_then(parse_dev) {
            return RootPlace::Partition {
                disk,
                start_512: start,
            };
        }
    }
    if let Some(backing) = read(d.join("loop/backing_file")) {
        let offset = read(d.join("loop/offset"))
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        return RootPlace::Loop {
            backing: backing.into(),
            offset,
        };
    }
    RootPlace::Other
}

/// The slot of `layout` (the disk at `disk`) that `place` is, if it is one of them.
pub fn slot_at(disk: &Path, layout: &Layout, place: &RootPlace) -> Option<Slot> {
    let meta = std::fs::metadata(disk).ok()?;
    let slot_where = |byte_offset: u64| {
        Slot::ALL
            .into_iter()
            .find(|&s| layout.root(s).offset == byte_offset)
    };
    match place {
        RootPlace::Partition { disk: d, start_512 } if meta.file_type().is_block_device() => {
            let rdev = meta.rdev();
            let (maj, min) = (libc::major(rdev), libc::minor(rdev));
            ((maj, min) == *d).then_some(())?;
            slot_where(start_512 * 512)
        }
        RootPlace::Loop { backing, offset } if meta.file_type().is_file() => {
            let same = std::fs::canonicalize(backing).ok()? == std::fs::canonicalize(disk).ok()?;
            same.then_some(())?;
            slot_where(*offset)
        }
        _ => None,
    }
}

/// The slot of `layout` (the disk at `disk`) that this process's root file system is mounted
/// from; `None` when the root is not on that disk (a host-side agent, a test).
pub fn mounted_root_slot(disk: &Path, layout: &Layout) -> Option<Slot> {
    let dev = this_root_device()?;
    slot_at(disk, layout, &place_of(Path::new("/sys/dev/block"), dev))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_device_is_the_last_mount_at_slash() {
        let mi = "22 1 254:3 / / ro,relatime shared:1 - squashfs /dev/vda3 ro\n\
                  23 22 0:21 / /run rw - tmpfs tmpfs rw\n\
                  30 22 7:0 / / ro - squashfs /dev/loop0 ro\n";
        assert_eq!(root_device(mi), Some((7, 0)));
        assert_eq!(root_device("23 22 0:21 / /run rw - tmpfs tmpfs rw\n"), None);
        assert_eq!(root_device("garbage\n"), None);
    }

    #[test]
    fn places_from_a_sysfs_tree() {
        let t = tempfile::tempdir().unwrap();
        let sys = t.path();
        // a partition: /sys/dev/block/254:3 -> .../vda/vda3, whose parent has dev 254:0
        let disk = sys.join("devices/vda");
        std::fs::create_dir_all(disk.join("vda3")).unwrap();
        std::fs::write(disk.join("dev"), "254:0\n").unwrap();
        std::fs::write(disk.join("vda3/start"), "4096\n").unwrap();
        std::os::unix::fs::symlink(disk.join("vda3"), sys.join("254:3")).unwrap();
        assert_eq!(
            place_of(sys, (254, 3)),
            RootPlace::Partition {
                disk: (254, 0),
                start_512: 4096
            }
        );
        let lp = sys.join("7:0/loop");
        std::fs::create_dir_all(&lp).unwrap();
        std::fs::write(lp.join("backing_file"), "/var/disk.img\n").unwrap();
        std::fs::write(lp.join("offset"), "1048576\n").unwrap();
        assert_eq!(
            place_of(sys, (7, 0)),
            RootPlace::Loop {
                backing: "/var/disk.img".into(),
                offset: 1048576
            }
        );
        assert_eq!(place_of(sys, (1, 1)), RootPlace::Other);
        // stage 1's verity device over vda3: where vda3 is
        let dm = sys.join("devices/dm-0");
        std::fs::create_dir_all(dm.join("dm")).unwrap();
        std::fs::create_dir_all(dm.join("slaves")).unwrap();
        std::fs::write(dm.join("dm/name"), "keel-root-b\n").unwrap();
        std::fs::write(disk.join("vda3/dev"), "254:3\n").unwrap();
        std::os::unix::fs::symlink(disk.join("vda3"), dm.join("slaves/vda3")).unwrap();
        std::os::unix::fs::symlink(&dm, sys.join("253:0")).unwrap();
        assert_eq!(
            place_of(sys, (253, 0)),
            RootPlace::Partition {
                disk: (254, 0),
                start_512: 4096
            }
        );
        // another device-mapper device is not a slot
        std::fs::write(dm.join("dm/name"), "vg-root\n").unwrap();
        assert_eq!(place_of(sys, (253, 0)), RootPlace::Other);
    }

    #[test]
    fn booted_record_round_trips_and_bad_ones_are_errors() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("keel/booted");
        assert_eq!(read(&p).unwrap(), None);
        let b = Booted {
            slot: "b".into(),
            root_device: "254:5".into(),
            boot_stage: "1.0.0".into(),
            trial: true,
        };
        write(&p, &b).unwrap();
        let back = read(&p).unwrap().unwrap();
        assert_eq!(back, b);
        assert_eq!(back.slot().unwrap(), Slot::B);
        // a record from before boot_stage and trial
        std::fs::write(&p, "{\"slot\":\"a\",\"root_device\":\"254:3\"}").unwrap();
        let old = read(&p).unwrap().unwrap();
        assert_eq!((old.boot_stage.as_str(), old.trial), ("", false));
        std::fs::write(&p, "{\"slot\":\"c\"}").unwrap();
        assert!(read(&p).unwrap().unwrap().slot().is_err());
        std::fs::write(&p, "not json").unwrap();
        assert!(read(&p).unwrap_err().contains("not a boot record"));
    }
}
