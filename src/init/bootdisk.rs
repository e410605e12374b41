//! Stage 1's disk work: find the boot disk by its GPT labels, run the boot choice (the spent try
//! is flushed before anything is mounted), mount the chosen slot's SquashFS read-only, and mark
//! the slot failed when it does not mount so that the next boot chooses the other one.
//!
//! Partitions are reached as the kernel's partition devices (`/dev/vda2`, found by start
//! sector in sysfs) or, where the kernel has none (a disk image file), as a read-only loop
//! device over the partition's byte range. Disk and partition choice are pure functions.

use super::log;
use crate::block::{BlockDevice, BlockError, FileDevice};
use crate::bootctl::{self, store, store::StoreError, Slot};
use crate::disk::{Layout, Partition};
use crate::dm;
use crate::update::record::SlotVerity;
use nix::mount::MsFlags;
use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Whether a block device name can be the boot disk: whole disks of real hardware or virtio,
/// not loop, RAM, zram, optical or floppy devices.
pub fn is_candidate_disk(name: &str) -> bool {
    !["loop", "ram", "zram", "sr", "fd", "nbd"]
        .iter()
        .any(|p| name.starts_with(p))
}

/// A partition of a disk as sysfs lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SysPartition {
    pub name: String,
    /// Start in 512-byte units (sysfs always counts in those).
    pub start_512: u64,
    /// The partition number (1-based).
    pub number: u32,
}

/// The kernel's device for `part`: the one that starts where the GPT entry does; failing that
/// (sysfs without `start`), the one numbered entry index + 1.
pub fn choose_partition_device(
    parts: &[SysPartition],
    part: &Partition,
    sector_size: u64,
) -> Option<String> {
    let start = part.first_lba * sector_size / 512;
    parts
        .iter()
        .find(|p| p.start_512 == start)
        .or_else(|| parts.iter().find(|p| p.number == part.index + 1))
        .map(|p| p.name.clone())
}

/// The partitions of disk `name` under `sys_block` (`/sys/class/block`).
pub fn sys_partitions(sys_block: &Path, name: &str) -> Vec<SysPartition> {
    let Ok(rd) = std::fs::read_dir(sys_block.join(name)) else {
        return Vec::new();
    };
    let read_num =
        |p: PathBuf| -> Option<u64> { std::fs::read_to_string(p).ok()?.trim().parse().ok() };
    rd.flatten()
        .filter_map(|e| {
            let pname = e.file_name().to_string_lossy().into_owned();
            let number = read_num(e.path().join("partition"))? as u32;
            let start_512 = read_num(e.path().join("start")).unwrap_or(u64::MAX);
            Some(SysPartition {
                name: pname,
                start_512,
                number,
            })
        })
        .collect()
}

/// Open a disk (a block device or an image file), as keel-image does.
pub fn open_disk(path: &Path, writable: bool) -> Result<FileDevice, BlockError> {
    crate::disk::open_file(path, writable)
}

/// Scan the whole disks under `sys_block` for one with the KeelOS labels. Returns its device
/// path under `dev_dir`.
pub fn find_boot_disk(sys_block: &Path, dev_dir: &Path) -> Option<PathBuf> {
    let mut names: Vec<String> = std::fs::read_dir(sys_block)
        .ok()?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| is_candidate_disk(n) && !sys_block.join(n).join("partition").exists())
        .collect();
    names.sort();
    let mut found = Vec::new();
    for n in names {
        let path = dev_dir.join(&n);
        if let Ok(dev) = open_disk(&path, false) {
            if crate::disk::open(&dev).is_ok() {
                found.push(path);
            }
        }
    }
    if found.len() > 1 {
        log(format!(
            "several disks carry KeelOS labels ({}); booting from the first",
            found
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    found.into_iter().next()
}

/// Wait up to `wait` for the boot disk to appear (drivers probe asynchronously).
pub fn wait_for_boot_disk(sys_block: &Path, dev_dir: &Path, wait: Duration) -> Option<PathBuf> {
    let start = Instant::now();
    loop {
        if let Some(d) = find_boot_disk(sys_block, dev_dir) {
            return Some(d);
        }
        if start.elapsed() >= wait {
            return None;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Wait up to `wait` for the named disk (`keel.disk=`) to appear with the KeelOS labels.
pub fn wait_for_disk(disk: &Path, wait: Duration) -> Option<PathBuf> {
    let start = Instant::now();
    loop {
        let ok = open_disk(disk, false)
            .ok()
            .is_some_and(|d| crate::disk::open(&d).is_ok());
        if ok {
            return Some(disk.to_path_buf());
        }
        if start.elapsed() >= wait {
            return None;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

const LOOP_CTL_GET_FREE: libc::c_ulong = 0x4C82;
const LOOP_SET_FD: libc::c_ulong = 0x4C00;
const LOOP_CLR_FD: libc::c_ulong = 0x4C01;
const LOOP_SET_STATUS64: libc::c_ulong = 0x4C04;
const LOOP_CONFIGURE: libc::c_ulong = 0x4C0A;
const LO_FLAGS_READ_ONLY: u32 = 1;
const LO_FLAGS_AUTOCLEAR: u32 = 4;

#[repr(C)]
#[derive(Clone, Copy)]
struct LoopInfo64 {
    lo_device: u64,
    lo_inode: u64,
    lo_rdevice: u64,
    lo_offset: u64,
    lo_sizelimit: u64,
    lo_number: u32,
    lo_encrypt_type: u32,
    lo_encrypt_key_size: u32,
    lo_flags: u32,
    lo_file_name: [u8; 64],
    lo_crypt_name: [u8; 64],
    lo_encrypt_key: [u8; 32],
    lo_init: [u64; 2],
}

#[repr(C)]
struct LoopConfig {
    fd: u32,
    block_size: u32,
    info: LoopInfo64,
    reserved: [u64; 8],
}

/// A loop device over a byte range of a file (read-only for root slots, writable for STATE). It
/// detaches itself when the last user (this handle, or a mount of it) goes away.
#[derive(Debug)]
pub struct LoopDevice {
    pub path: PathBuf,
    _dev: File,
}

impl LoopDevice {
    pub fn attach(
        backing: &Path,
        offset: u64,
        len: u64,
        writable: bool,
    ) -> std::io::Result<LoopDevice> {
        let file = OpenOptions::new()
            .read(true)
            .write(writable)
            .open(backing)?;
        let ctl = OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/loop-control")?;
        let mut last = std::io::Error::other("no free loop device");
        // another process may take the free device between asking and configuring
        for _ in 0..20 {
            // SAFETY: LOOP_CTL_GET_FREE takes no argument
            let n = unsafe { libc::ioctl(ctl.as_raw_fd(), LOOP_CTL_GET_FREE as _) };
            if n < 0 {
                return Err(std::io::Error::last_os_error());
            }
            let path = PathBuf::from(format!("/dev/loop{n}"));
            if !path.exists() {
                let dev = libc::makedev(7, n as u32);
                nix::sys::stat::mknod(
                    &path,
                    nix::sys::stat::SFlag::S_IFBLK,
                    nix::sys::stat::Mode::from_bits_truncate(0o600),
                    dev,
                )
                .map_err(std::io::Error::from)?;
            }
            let dev = OpenOptions::new().read(true).write(writable).open(&path)?;
            // SAFETY: LoopInfo64 is plain data; all zeroes is a valid value
            let mut info: LoopInfo64 = unsafe { std::mem::zeroed() };
            info.lo_offset = offset;
            info.lo_sizelimit = len;
            info.lo_flags = LO_FLAGS_AUTOCLEAR | if writable { 0 } else { LO_FLAGS_READ_ONLY };
            let cfg = LoopConfig {
                fd: file.as_raw_fd() as u32,
                block_size: 0,
                info,
                reserved: [0; 8],
            };
            // SAFETY: LOOP_CONFIGURE reads one loop_config through a valid pointer
            let r = unsafe { libc::ioctl(dev.as_raw_fd(), LOOP_CONFIGURE as _, &cfg) };
            if r == 0 {
                return Ok(LoopDevice { path, _dev: dev });
            }
            let e = std::io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EBUSY) => {
                    last = e;
                    continue;
                }
                Some(libc::EINVAL) | Some(libc::ENOTTY) => {
                    // kernels before 5.8: the two-step setup
                    // SAFETY: LOOP_SET_FD takes a file descriptor
                    let r =
                        unsafe { libc::ioctl(dev.as_raw_fd(), LOOP_SET_FD as _, file.as_raw_fd()) };
                    if r != 0 {
                        last = std::io::Error::last_os_error();
                        continue;
                    }
                    // SAFETY: LOOP_SET_STATUS64 reads one loop_info64 through a valid pointer
                    let r = unsafe { libc::ioctl(dev.as_raw_fd(), LOOP_SET_STATUS64 as _, &info) };
                    if r != 0 {
                        let e = std::io::Error::last_os_error();
                        // SAFETY: LOOP_CLR_FD takes no argument
                        unsafe { libc::ioctl(dev.as_raw_fd(), LOOP_CLR_FD as _, 0) };
                        return Err(e);
                    }
                    return Ok(LoopDevice { path, _dev: dev });
                }
                _ => return Err(e),
            }
        }
        Err(last)
    }
}

/// How a partition is reached for mount(2).
#[derive(Debug)]
pub struct PartitionSource {
    pub path: PathBuf,
    /// Held until the mount has taken its own reference.
    pub loop_dev: Option<LoopDevice>,
}

/// The device to mount `part` of `disk` from: the kernel's partition device when `disk` is a
/// block device with one, else a loop device over the partition's bytes (writable only when
/// `writable`).
pub fn partition_source(
    disk: &Path,
    part: &Partition,
    sector_size: u64,
    sys_block: &Path,
    writable: bool,
) -> std::io::Result<PartitionSource> {
    let is_block = std::fs::metadata(disk)
        .map(|m| m.file_type().is_block_device())
        .unwrap_or(false);
    if is_block {
        if let Some(name) = disk.file_name().map(|n| n.to_string_lossy().into_owned()) {
            let parts = sys_partitions(sys_block, &name);
            if let Some(p) = choose_partition_device(&parts, part, sector_size) {
                let dir = disk.parent().unwrap_or(Path::new("/dev"));
                return Ok(PartitionSource {
                    path: dir.join(p),
                    loop_dev: None,
                });
            }
        }
    }
    let l = LoopDevice::attach(disk, part.offset, part.len, writable)?;
    Ok(PartitionSource {
        path: l.path.clone(),
        loop_dev: Some(l),
    })
}

/// Stage 1 could not mount a root.
#[derive(Debug, thiserror::Error)]
pub enum BootRootError {
    #[error("cannot open the boot disk {disk}: {source}")]
    Open {
        disk: PathBuf,
        #[source]
        source: BlockError,
    },
    #[error("boot choice on {disk} failed: {source}")]
    Choice {
        disk: PathBuf,
        #[source]
        source: StoreError,
    },
}

/// The boot choice, committed on the boot disk (a spent try is flushed before this returns).
#[derive(Debug)]
pub struct Chosen {
    pub dev: FileDevice,
    pub layout: Layout,
    pub sector_size: u64,
    pub choice: bootctl::BootChoice,
}

/// Run the boot choice on `disk`: the highest-priority bootable slot; a try of a slot on trial
/// is spent and flushed before this returns, so nothing of that slot runs without it.
pub fn choose(disk: &Path) -> Result<Chosen, BootRootError> {
    let mut dev = open_disk(disk, true).map_err(|source| BootRootError::Open {
        disk: disk.to_path_buf(),
        source,
    })?;
    let ss = dev.sector_size();
    let (layout, choice) = store::boot(&mut dev).map_err(|source| BootRootError::Choice {
        disk: disk.to_path_buf(),
        source,
    })?;
    log(format!(
        "booting slot {} ({}){}",
        choice.slot,
        choice.flags.get(choice.slot),
        if choice.tried { ", one try spent" } else { "" }
    ));
    Ok(Chosen {
        dev,
        layout,
        sector_size: ss,
        choice,
    })
}

/// Read the boot flags of `disk` without changing them.
pub fn read_flags(disk: &Path) -> Result<(FileDevice, Layout, bootctl::SlotFlags), BootRootError> {
    let dev = open_disk(disk, true).map_err(|source| BootRootError::Open {
        disk: disk.to_path_buf(),
        source,
    })?;
    let (layout, flags) = store::load(&dev).map_err(|source| BootRootError::Choice {
        disk: disk.to_path_buf(),
        source,
    })?;
    Ok((dev, layout, flags))
}

/// The dm-verity parameters in `slot`'s record, if its record has them (an image built without
/// a tree, or a record that cannot be read, has none: the slot mounts without verity).
pub fn slot_verity(dev: &FileDevice, layout: &Layout, slot: Slot) -> Option<SlotVerity> {
    crate::update::driver::read_record(dev, layout, slot)
        .ok()
        .flatten()
        .and_then(|r| r.verity)
}

/// The device-mapper name of `slot`'s verity device.
pub fn dm_name(slot: Slot) -> String {
    format!("keel-root-{}", slot.letter())
}

/// Mount `slot`'s SquashFS read-only on `target`: through a dm-verity device made from the
/// slot's record when `verity` is given (the kernel then checks every block read against the
/// tree and its root hash), else straight from the partition. On success: the device mounted.
/// On failure: the device tried, and why; no mapping is left behind.
pub fn mount_slot(
    disk: &Path,
    layout: &Layout,
    sector_size: u64,
    slot: Slot,
    target: &Path,
    sys_block: &Path,
    verity: Option<(&SlotVerity, dm::OnCorruption)>,
) -> Result<PathBuf, (String, String)> {
    let part = layout.root(slot).clone();
    let _ = std::fs::create_dir_all(target);
    let src = partition_source(disk, &part, sector_size, sys_block, false).map_err(|e| {
        (
            "loop device".to_string(),
            format!("cannot set up a loop device: {e}"),
        )
    })?;
    let name = dm_name(slot);
    let dev = match verity {
        None => src.path.clone(),
        Some((v, mode)) => {
            // a mapping left by an earlier attempt in this power-on goes first
            let _ = dm::remove(&name);
            let dev = dm::create(&name, &dm::verity_target(&src.path, v, mode)).map_err(|e| {
                (
                    src.path.display().to_string(),
                    format!("cannot map it through dm-verity: {e}"),
                )
            })?;
            wait_for_node(&dev, Duration::from_secs(2));
            dev
        }
    };
    let shown = if verity.is_some() {
        format!("{} (verity over {})", dev.display(), src.path.display())
    } else {
        dev.display().to_string()
    };
    nix::mount::mount(
        Some(&dev),
        target,
        Some("squashfs"),
        MsFlags::MS_RDONLY | MsFlags::MS_NODEV,
        None::<&str>,
    )
    .map(|()| dev.clone())
    .map_err(|e| {
        if verity.is_some() {
            let _ = dm::remove(&name);
        }
        (shown, e.to_string())
    })
}

fn wait_for_node(dev: &Path, wait: Duration) {
    let deadline = std::time::Instant::now() + wait;
    while !dev.exists() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Unmount a slot mounted by [`mount_slot`] and remove its verity device, if any.
pub fn unmount_slot(slot: Slot, target: &Path) {
    let _ = nix::mount::umount(target);
    let _ = dm::remove(&dm_name(slot));
}

/// Read all `len` bytes of `dev` (a verity device), so that the kernel checks every block
/// against the tree. Err: where the first read failed, and why.
pub fn read_all(dev: &Path, len: u64) -> Result<(), String> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(dev).map_err(|e| format!("cannot open {}: {e}", dev.display()))?;
    let mut buf = vec![0u8; 1 << 20];
    let mut pos = 0u64;
    while pos < len {
        let n = ((len - pos) as usize).min(buf.len());
        match f.read_at(&mut buf[..n], pos) {
            Ok(0) => return Err(format!("{} ends at byte {pos} of {len}", dev.display())),
            Ok(k) => pos += k as u64,
            Err(e) => {
                return Err(format!(
                    "reading {} at byte {pos} of {len} failed: {e}",
                    dev.display()
                ))
            }
        }
    }
    Ok(())
}

/// Mark `slot` failed (no tries, not successful) so that the boot choice passes it over, unless
/// the other slot is not bootable: the last bootable slot is never demoted, so a node always
/// has something to boot. Returns whether it was marked, and what was done in words.
pub fn mark_failed_unless_last(dev: &mut FileDevice, slot: Slot) -> (bool, String) {
    let mut kept = false;
    let r = store::update(dev, |f| {
        if f.get(slot.other()).bootable() {
            Ok(bootctl::mark_failed(f, slot))
        } else {
            kept = true;
            Ok(f)
        }
    });
    match r {
        Ok(_) if kept => (
            false,
            format!(
                "slot {slot} left as it is: slot {} is not bootable and a node keeps its last \
                 bootable slot",
                slot.other()
            ),
        ),
        Ok((_, f)) => (true, format!("slot {slot} marked failed ({})", f.get(slot))),
        Err(e) => (
            false,
            format!("marking slot {slot} failed did not work either: {e}"),
        ),
    }
}

/// Mount the STATE partition (ext4) of the boot disk on `target`.
pub fn mount_state(
    disk: &Path,
    layout: &Layout,
    sector_size: u64,
    target: &Path,
    sys_block: &Path,
) -> Result<PathBuf, String> {
    let src = partition_source(disk, &layout.state, sector_size, sys_block, true)
        .map_err(|e| format!("cannot reach STATE on {}: {e}", disk.display()))?;
    let _ = std::fs::create_dir_all(target);
    nix::mount::mount(
        Some(&src.path),
        target,
        Some("ext4"),
        MsFlags::MS_NOSUID,
        None::<&str>,
    )
    .map_err(|e| {
        format!(
            "mounting STATE ({}) on {} failed: {e}; is it formatted ext4?",
            src.path.display(),
            target.display()
        )
    })?;
    Ok(src.path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn part(index: u32, first_lba: u64) -> Partition {
        Partition {
            label: "MATIC_ROOT_B",
            index,
            first_lba,
            last_lba: first_lba + 100,
            offset: 0,
            len: 0,
            type_guid: String::new(),
            attributes: 0,
        }
    }

    #[test]
    fn partition_found_by_start_sector_then_number() {
        let sys = [
            SysPartition {
                name: "vda1".into(),
                start_512: 2048,
                number: 1,
            },
            SysPartition {
                name: "vda3".into(),
                start_512: 34816,
                number: 3,
            },
            SysPartition {
                name: "vda2".into(),
                start_512: 4096,
                number: 2,
            },
        ];
        assert_eq!(
            choose_partition_device(&sys, &part(2, 34816), 512).as_deref(),
            Some("vda3")
        );
        // a 4Kn disk: sysfs still counts 512-byte units
        assert_eq!(
            choose_partition_device(&sys, &part(1, 512), 4096).as_deref(),
            Some("vda2")
        );
        // no start matches: the entry index decides
        assert_eq!(
            choose_partition_device(&sys, &part(0, 7), 512).as_deref(),
            Some("vda1")
        );
        assert_eq!(choose_partition_device(&sys, &part(9, 7), 512), None);
    }

    #[test]
    fn candidate_disks() {
        for n in ["vda", "sda", "nvme0n1", "xvda", "mmcblk0"] {
            assert!(is_candidate_disk(n), "{n}");
        }
        for n in ["loop0", "ram0", "zram0", "sr0", "fd0", "nbd0"] {
            assert!(!is_candidate_disk(n), "{n}");
        }
    }
}
