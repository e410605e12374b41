//! Device-mapper without dmsetup or libdevmapper: the five ioctls on `/dev/mapper/control` that
//! map a slot through the kernel's dm-verity target, query it and take it down again.
//!
//! The interface is `linux/dm-ioctl.h` (version 4): every call passes one buffer that starts with
//! a 312-byte `struct dm_ioctl` header (name, flags, the size of the whole buffer and where its
//! payload starts), followed by the payload. A table load's payload is one `struct dm_target_spec`
//! (start and length in 512-byte sectors, the target type) and the target's parameter string;
//! a status query's answer has the same shape. [`encode`] and [`decode_specs`] are pure and
//! tested on their own; the calls are thin.
//!
//! Creating a mapped device is three calls: DEV_CREATE (a name, no table; the kernel answers
//! with the device number), TABLE_LOAD (the inactive table), DEV_SUSPEND without the suspend
//! flag (which resumes the device: the loaded table goes live). The kernel's devtmpfs creates
//! `/dev/dm-N` for minor N; no udev is involved.

use crate::update::record::{hex, SlotVerity};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

const CONTROL: &str = "/dev/mapper/control";
const HEADER: usize = 312;
const SPEC: usize = 40;
const NAME_LEN: usize = 128;
const UUID_LEN: usize = 129;
const _: () = assert!(48 + NAME_LEN + UUID_LEN + 7 == HEADER);
/// The interface version this code speaks (the kernel accepts any 4.x with x >= this minor).
const VERSION: [u32; 3] = [4, 0, 0];

const READONLY_FLAG: u32 = 1 << 0;
const BUFFER_FULL_FLAG: u32 = 1 << 8;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum Cmd {
    DevCreate = 3,
    DevRemove = 4,
    DevSuspend = 6,
    TableLoad = 9,
    TableStatus = 12,
}

impl Cmd {
    fn request(self) -> libc::c_ulong {
        // _IOWR(0xfd, nr, struct dm_ioctl)
        nix::request_code_readwrite!(0xfd, self as u8, HEADER) as libc::c_ulong
    }
}

/// A device-mapper call failed.
#[derive(Debug, thiserror::Error)]
pub enum DmError {
    #[error(
        "cannot open {CONTROL}: {0}; the kernel needs the dm_mod module (and dm_verity for \
         verity roots) loaded"
    )]
    Control(std::io::Error),
    #[error("device-mapper {op} of {name:?} failed: {source}{hint}")]
    Ioctl {
        op: &'static str,
        name: String,
        source: std::io::Error,
        hint: &'static str,
    },
    #[error("the device-mapper name {0:?} is empty or too long (at most 127 bytes, no NUL)")]
    BadName(String),
    #[error("the kernel's answer to {op} could not be read: {why}")]
    Answer { op: &'static str, why: String },
}

/// One target of a table: `length` 512-byte sectors from `start`, handled by `kind` with
/// `params`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub start: u64,
    pub length: u64,
    pub kind: String,
    pub params: String,
}

/// What to do when the verity target finds a block that does not match its tree.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnCorruption {
    /// The read fails with EIO (the boot stage: it refuses the slot and chooses again).
    Error,
    /// The kernel restarts the machine (a running slot: its boot then counts as not healthy).
    Restart,
}

/// The verity target that maps `dev` (a slot partition holding `[data][superblock][tree]`)
/// with the parameters of its record: data and hash device are the same partition, the tree
/// starts at the block after the superblock.
pub fn verity_target(dev: &Path, v: &SlotVerity, on_corruption: OnCorruption) -> Target {
    let block = crate::verity::BLOCK_SIZE as u64;
    let data_blocks = v.data_size / block;
    let hash_start = crate::verity::tree_offset(v.hash_offset) / block;
    let d = dev.display();
    let mut params = format!(
        "1 {d} {d} {block} {block} {data_blocks} {hash_start} sha256 {} {}",
        hex(&v.root_hash),
        if v.salt.is_empty() {
            "-".to_string()
        } else {
            hex(&v.salt)
        }
    );
    if on_corruption == OnCorruption::Restart {
        params.push_str(" 1 restart_on_corruption");
    }
    Target {
        start: 0,
        length: v.data_size / 512,
        kind: "verity".into(),
        params,
    }
}

/// The buffer of one call: the header with `name` and `flags`, and the `targets` as payload.
pub fn encode(name: &str, flags: u32, targets: &[Target], size: usize) -> Vec<u8> {
    let mut payload = Vec::new();
    for (i, t) in targets.iter().enumerate() {
        let mut spec = vec![0u8; SPEC];
        spec[0..8].copy_from_slice(&t.start.to_le_bytes());
        spec[8..16].copy_from_slice(&t.length.to_le_bytes());
        let kind = t.kind.as_bytes();
        let k = kind.len().min(15);
        spec[24..24 + k].copy_from_slice(&kind[..k]);
        spec.extend_from_slice(t.params.as_bytes());
        spec.push(0);
        spec.resize(spec.len().div_ceil(8) * 8, 0);
        let next = if i + 1 < targets.len() { spec.len() } else { 0 };
        spec[20..24].copy_from_slice(&(next as u32).to_le_bytes());
        payload.extend_from_slice(&spec);
    }
    let total = (HEADER + payload.len()).max(size);
    let mut b = vec![0u8; total];
    for (i, v) in VERSION.iter().enumerate() {
        b[4 * i..4 * i + 4].copy_from_slice(&v.to_le_bytes());
    }
    b[12..16].copy_from_slice(&(total as u32).to_le_bytes());
    b[16..20].copy_from_slice(&(HEADER as u32).to_le_bytes());
    b[20..24].copy_from_slice(&(targets.len() as u32).to_le_bytes());
    b[28..32].copy_from_slice(&flags.to_le_bytes());
    let n = name.as_bytes();
    b[48..48 + n.len().min(NAME_LEN - 1)].copy_from_slice(&n[..n.len().min(NAME_LEN - 1)]);
    b[HEADER..HEADER + payload.len()].copy_from_slice(&payload);
    b
}

fn u32_at(b: &[u8], i: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(i..i + 4)?.try_into().ok()?))
}

fn u64_at(b: &[u8], i: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(i..i + 8)?.try_into().ok()?))
}

/// The targets in an answer (a status query's: each spec's string is the target's status).
pub fn decode_specs(b: &[u8]) -> Result<Vec<Target>, String> {
    let count = u32_at(b, 20).ok_or("the header is truncated")? as usize;
    let start = u32_at(b, 16).ok_or("the header is truncated")? as usize;
    let used = (u32_at(b, 12).ok_or("the header is truncated")? as usize).min(b.len());
    let mut at = start;
    let mut out = Vec::new();
    for _ in 0..count.min(1024) {
        let spec = b
            .get(at..at + SPEC)
            .filter(|_| at + SPEC <= used)
            .ok_or_else(|| format!("target spec at {at} lies outside the answer"))?;
        let text_end = b[at + SPEC..used]
            .iter()
            .position(|&c| c == 0)
            .map_or(used, |p| at + SPEC + p);
        let kind_raw = &spec[24..40];
        let kind_len = kind_raw.iter().position(|&c| c == 0).unwrap_or(16);
        out.push(Target {
            start: u64_at(spec, 0).unwrap_or(0),
            length: u64_at(spec, 8).unwrap_or(0),
            kind: String::from_utf8_lossy(&kind_raw[..kind_len]).into_owned(),
            params: String::from_utf8_lossy(&b[at + SPEC..text_end]).into_owned(),
        });
        // in answers, `next` is the offset of the next spec from the start of the payload
        let next = u32_at(spec, 20).unwrap_or(0) as usize;
        if next == 0 {
            break;
        }
        at = start + next;
    }
    Ok(out)
}

/// The device number in an answer's header, as (major, minor).
pub fn decode_dev(b: &[u8]) -> Option<(u32, u32)> {
    // the kernel's huge_encode_dev: minor's low 8 bits, major, minor's high bits
    let dev = u64_at(b, 40)?;
    let major = ((dev >> 8) & 0xfff) as u32;
    let minor = ((dev & 0xff) | ((dev >> 12) & 0xfff00)) as u32;
    Some((major, minor))
}

fn check_name(name: &str) -> Result<(), DmError> {
    if name.is_empty() || name.len() >= NAME_LEN || name.contains('\0') || name.contains('/') {
        return Err(DmError::BadName(name.into()));
    }
    Ok(())
}

fn call(
    cmd: Cmd,
    op: &'static str,
    name: &str,
    flags: u32,
    targets: &[Target],
) -> Result<Vec<u8>, DmError> {
    check_name(name)?;
    let control = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(CONTROL)
        .map_err(DmError::Control)?;
    let mut size = 16 * 1024;
    loop {
        let mut b = encode(name, flags, targets, size);
        // SAFETY: `b` is a live, writable buffer whose header says its own length (data_size);
        // the kernel reads and writes at most that many bytes of it.
        let r = unsafe { libc::ioctl(control.as_raw_fd(), cmd.request() as _, b.as_mut_ptr()) };
        if r != 0 {
            let source = std::io::Error::last_os_error();
            let hint = match source.raw_os_error() {
                Some(libc::EINVAL) if cmd == Cmd::TableLoad => {
                    " (the kernel log says which table parameter it refused)"
                }
                Some(libc::ENXIO) => " (no such mapped device)",
                Some(libc::EBUSY) => " (the device is in use: unmount it first)",
                _ => "",
            };
            return Err(DmError::Ioctl {
                op,
                name: name.into(),
                source,
                hint,
            });
        }
        let flags_out = u32_at(&b, 28).unwrap_or(0);
        if flags_out & BUFFER_FULL_FLAG != 0 && size < 1 << 20 {
            size *= 4;
            continue;
        }
        return Ok(b);
    }
}

/// Create the read-only device `name` with the single `target` and make it live. Returns
/// `/dev/dm-N`. On failure nothing is left behind.
pub fn create(name: &str, target: &Target) -> Result<PathBuf, DmError> {
    let answer = call(Cmd::DevCreate, "create", name, 0, &[])?;
    let made = (|| {
        let (_, minor) = decode_dev(&answer).ok_or(DmError::Answer {
            op: "create",
            why: "no device number".into(),
        })?;
        call(
            Cmd::TableLoad,
            "table load",
            name,
            READONLY_FLAG,
            std::slice::from_ref(target),
        )?;
        call(Cmd::DevSuspend, "resume", name, 0, &[])?;
        Ok(PathBuf::from(format!("/dev/dm-{minor}")))
    })();
    if made.is_err() {
        let _ = remove(name);
    }
    made
}

/// Remove the device `name` (it must not be open or mounted).
pub fn remove(name: &str) -> Result<(), DmError> {
    call(Cmd::DevRemove, "remove", name, 0, &[]).map(|_| ())
}

/// The live table's status: for a verity target `V` (verified so far) or `C` (a block did not
/// match its tree).
pub fn status(name: &str) -> Result<Vec<Target>, DmError> {
    let b = call(Cmd::TableStatus, "status", name, 0, &[])?;
    decode_specs(&b).map_err(|why| DmError::Answer { op: "status", why })
}

/// The device-mapper name of block device `dm-N` (from sysfs), if it is one.
pub fn name_of(sys_block: &Path, dev: &str) -> Option<String> {
    std::fs::read_to_string(sys_block.join(dev).join("dm/name"))
        .ok()
        .map(|s| s.trim().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn verity() -> SlotVerity {
        SlotVerity {
            data_size: 10 * 4096,
            hash_offset: 10 * 4096,
            root_hash: [0xAB; 32],
            salt: vec![0x01, 0x02],
        }
    }

    #[test]
    fn the_verity_table_is_what_veritysetup_would_load() {
        let t = verity_target(Path::new("/dev/vda3"), &verity(), OnCorruption::Restart);
        assert_eq!(t.start, 0);
        assert_eq!(t.length, 80);
        assert_eq!(t.kind, "verity");
        assert_eq!(
            t.params,
            format!(
                "1 /dev/vda3 /dev/vda3 4096 4096 10 11 sha256 {} 0102 1 restart_on_corruption",
                "ab".repeat(32)
            )
        );
        let mut v = verity();
        v.salt.clear();
        let t = verity_target(Path::new("/dev/vdb"), &v, OnCorruption::Error);
        assert!(t.params.ends_with(" -"), "{}", t.params);
        assert!(!t.params.contains("restart"));
    }

    #[test]
    fn a_table_load_buffer_has_the_header_the_spec_and_the_params() {
        let t = verity_target(Path::new("/dev/vda3"), &verity(), OnCorruption::Error);
        let b = encode("keel-root-b", READONLY_FLAG, std::slice::from_ref(&t), 0);
        assert_eq!(&b[0..12], &[4, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(u32_at(&b, 12), Some(b.len() as u32));
        assert_eq!(u32_at(&b, 16), Some(312));
        assert_eq!(u32_at(&b, 20), Some(1));
        assert_eq!(u32_at(&b, 28), Some(READONLY_FLAG));
        assert_eq!(&b[48..59], b"keel-root-b");
        assert_eq!(b[59], 0);
        assert_eq!(b.len() % 8, 0);
        assert_eq!(u64_at(&b, 312 + 8), Some(80));
        assert_eq!(&b[312 + 24..312 + 30], b"verity");
        // the decoder reads back what the encoder wrote
        assert_eq!(decode_specs(&b).unwrap(), vec![t]);
        // an empty call is the header alone, padded to the size asked for
        let e = encode("x", 0, &[], 16 * 1024);
        assert_eq!(e.len(), 16 * 1024);
        assert_eq!(u32_at(&e, 12), Some(16 * 1024));
        assert_eq!(u32_at(&e, 20), Some(0));
    }

    #[test]
    fn device_numbers_and_hostile_answers_decode_without_panics() {
        let mut b = encode("x", 0, &[], 0);
        // major 254, minor 0x123: minor low 8 bits, major << 8, minor high bits << 12
        let dev: u64 = 0x23 | (254 << 8) | (0x100 << 12);
        b[40..48].copy_from_slice(&dev.to_le_bytes());
        assert_eq!(decode_dev(&b), Some((254, 0x123)));
        // a spec count and offsets that point past the end are errors, not panics
        let mut h = encode("x", 0, &[], 0);
        h[20..24].copy_from_slice(&5u32.to_le_bytes());
        h[16..20].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(decode_specs(&h).is_err());
        assert!(decode_specs(&[0; 10]).is_err());
        assert!(check_name("").is_err() && check_name(&"n".repeat(128)).is_err());
        assert!(check_name("a/b").is_err() && check_name("keel-root-a").is_ok());
    }
}
