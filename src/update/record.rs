//! Slot image records: what each root slot holds (version, length, SHA-256, and the dm-verity
//! parameters when the image carries a hash tree).
//!
//! A record lives in the last 4 KiB of its own root partition, outside the image (an image may
//! use at most the partition's length minus 4 KiB). Keeping it with the slot means keel-init,
//! keel-agent and the offline tool read it from the disk alone, before STATE is mounted, and a
//! record can never describe another slot's bytes. The update engine zeroes the target's record
//! and flushes that before it writes any image byte, and writes the new one only after the image
//! has been flushed, read back and verified, before the slot is activated: an intact record
//! always describes the bytes its slot holds, whatever a crash keeps.

use crate::block::{BlockDevice, BlockError};
use serde::Serialize;

pub const RECORD_SIZE: u64 = 4096;
const MAGIC: &[u8; 8] = b"KEELSLOT";
/// Format 1: version, length, SHA-256. Format 2 adds the dm-verity parameters; both are read.
const FORMAT_V1: u32 = 1;
const FORMAT: u32 = 2;
/// The longest version string a record holds.
pub const MAX_VERSION: usize = 255;

/// What a slot holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SlotRecord {
    pub version: String,
    pub length: u64,
    #[serde(serialize_with = "ser_hex")]
    pub sha256: [u8; 32],
    /// The image's dm-verity tree, when it carries one (found by the engine in the bytes it
    /// verified: see [`SlotVerity`]).
    pub verity: Option<SlotVerity>,
}

/// Where a slot's dm-verity tree is and what its root hash is: what the boot stage and the
/// slot's initramfs need to map the slot through the kernel's verity target. The image is
/// `[data][superblock][tree]` (veritysetup's format with a superblock, see [`crate::verity`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SlotVerity {
    /// Bytes of data the tree covers (a multiple of 4096).
    pub data_size: u64,
    /// Where the superblock starts; the tree follows at the next 4096-byte block.
    pub hash_offset: u64,
    #[serde(serialize_with = "ser_hex")]
    pub root_hash: [u8; 32],
    #[serde(serialize_with = "ser_hex_vec")]
    pub salt: Vec<u8>,
}

fn ser_hex_vec<S: serde::Serializer>(d: &[u8], s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&hex(d))
}

fn ser_hex<S: serde::Serializer>(d: &[u8; 32], s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&hex(d))
}

/// Lower-case hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

/// Parse a SHA-256 digest: exactly 64 hex characters.
pub fn parse_digest(s: &str) -> Option<[u8; 32]> {
    let s = s.trim();
    if s.len() != 64 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

/// The bytes of a slot an image may occupy.
pub fn capacity(slot_len: u64) -> u64 {
    slot_len.saturating_sub(RECORD_SIZE)
}

/// Where the record sits in a slot.
pub fn offset(slot_len: u64) -> u64 {
    capacity(slot_len)
}

impl SlotRecord {
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(RECORD_SIZE as usize);
        b.extend_from_slice(MAGIC);
        b.extend_from_slice(&FORMAT.to_le_bytes());
        b.extend_from_slice(&self.length.to_le_bytes());
        b.extend_from_slice(&self.sha256);
        let v = &self.version.as_bytes()[..self.version.len().min(MAX_VERSION)];
        b.extend_from_slice(&(v.len() as u16).to_le_bytes());
        b.extend_from_slice(v);
        match &self.verity {
            None => b.push(0),
            Some(v) => {
                b.push(1);
                b.extend_from_slice(&v.data_size.to_le_bytes());
                b.extend_from_slice(&v.hash_offset.to_le_bytes());
                b.extend_from_slice(&v.root_hash);
                let salt = &v.salt[..v.salt.len().min(crate::verity::MAX_SALT_SIZE)];
                b.extend_from_slice(&(salt.len() as u16).to_le_bytes());
                b.extend_from_slice(salt);
            }
        }
        let crc = crc32fast::hash(&b);
        b.extend_from_slice(&crc.to_le_bytes());
        b.resize(RECORD_SIZE as usize, 0);
        b
    }

    /// `None` for anything that is not a whole, intact record (zeroes, a torn write, garbage).
    pub fn decode(b: &[u8]) -> Option<SlotRecord> {
        if b.len() < 62 || &b[..8] != MAGIC {
            return None;
        }
        let format = u32::from_le_bytes(b[8..12].try_into().ok()?);
        if format != FORMAT && format != FORMAT_V1 {
            return None;
        }
        let length = u64::from_le_bytes(b[12..20].try_into().ok()?);
        let sha256: [u8; 32] = b[20..52].try_into().ok()?;
        let vlen = u16::from_le_bytes(b[52..54].try_into().ok()?) as usize;
        if vlen > MAX_VERSION || 54 + vlen + 4 > b.len() {
            return None;
        }
        let mut end = 54 + vlen;
        let version = String::from_utf8(b[54..end].to_vec()).ok()?;
        let mut verity = None;
        if format == FORMAT {
            match *b.get(end)? {
                0 => end += 1,
                1 => {
                    let at = |i: usize, n: usize| b.get(end + i..end + i + n);
                    let data_size = u64::from_le_bytes(at(1, 8)?.try_into().ok()?);
                    let hash_offset = u64::from_le_bytes(at(9, 8)?.try_into().ok()?);
                    let root_hash: [u8; 32] = at(17, 32)?.try_into().ok()?;
                    let slen = u16::from_le_bytes(at(49, 2)?.try_into().ok()?) as usize;
                    if slen > crate::verity::MAX_SALT_SIZE {
                        return None;
                    }
                    let salt = at(51, slen)?.to_vec();
                    end += 51 + slen;
                    verity = Some(SlotVerity {
                        data_size,
                        hash_offset,
                        root_hash,
                        salt,
                    });
                }
                _ => return None,
            }
        }
        let crc = u32::from_le_bytes(b.get(end..end + 4)?.try_into().ok()?);
        if crc != crc32fast::hash(&b[..end]) {
            return None;
        }
        Some(SlotRecord {
            version,
            length,
            sha256,
            verity,
        })
    }
}

/// Read the record of a slot (a window onto its partition).
pub fn read<D: BlockDevice + ?Sized>(slot: &D) -> Result<Option<SlotRecord>, BlockError> {
    if slot.len() < RECORD_SIZE {
        return Ok(None);
    }
    let b = crate::block::read_vec(slot, offset(slot.len()), RECORD_SIZE as usize)?;
    Ok(SlotRecord::decode(&b).filter(|r| {
        r.length <= capacity(slot.len())
            && r.verity.as_ref().is_none_or(|v| {
                // the data and the superblock lie inside the image
                v.data_size.is_multiple_of(4096)
                    && v.data_size > 0
                    && v.data_size <= v.hash_offset
                    && v.hash_offset
                        .checked_add(4096)
                        .is_some_and(|e| e <= r.length)
            })
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_rejects() {
        let r = SlotRecord {
            version: "1.2.3".into(),
            length: 12345,
            sha256: [7; 32],
            verity: None,
        };
        let b = r.encode();
        assert_eq!(b.len(), 4096);
        assert_eq!(SlotRecord::decode(&b), Some(r));
        let mut torn = b.clone();
        torn[60] ^= 1;
        assert_eq!(SlotRecord::decode(&torn), None);
        assert_eq!(SlotRecord::decode(&[0; 4096]), None);
        assert_eq!(SlotRecord::decode(b"KEELSLOT"), None);
    }

    #[test]
    fn verity_parameters_round_trip_and_every_flipped_byte_is_refused() {
        let r = SlotRecord {
            version: "2.0.0".into(),
            length: 3 * 4096 + 8192,
            sha256: [9; 32],
            verity: Some(SlotVerity {
                data_size: 3 * 4096,
                hash_offset: 3 * 4096,
                root_hash: [0xA5; 32],
                salt: vec![1, 2, 3, 4, 5],
            }),
        };
        let b = r.encode();
        assert_eq!(SlotRecord::decode(&b), Some(r.clone()));
        let used = 8 + 4 + 8 + 32 + 2 + 5 + 1 + 8 + 8 + 32 + 2 + 5 + 4;
        assert!(b[used..].iter().all(|&x| x == 0));
        for i in 0..used {
            let mut bad = b.clone();
            bad[i] ^= 0x10;
            assert_eq!(SlotRecord::decode(&bad), None, "byte {i} flipped");
        }
    }

    #[test]
    fn a_format_1_record_still_reads_without_verity() {
        // format 1 as earlier releases wrote it: no verity byte before the CRC
        let mut b = Vec::new();
        b.extend_from_slice(MAGIC);
        b.extend_from_slice(&FORMAT_V1.to_le_bytes());
        b.extend_from_slice(&777u64.to_le_bytes());
        b.extend_from_slice(&[3; 32]);
        b.extend_from_slice(&5u16.to_le_bytes());
        b.extend_from_slice(b"1.0.0");
        let crc = crc32fast::hash(&b);
        b.extend_from_slice(&crc.to_le_bytes());
        b.resize(4096, 0);
        assert_eq!(
            SlotRecord::decode(&b),
            Some(SlotRecord {
                version: "1.0.0".into(),
                length: 777,
                sha256: [3; 32],
                verity: None,
            })
        );
    }

    #[test]
    fn digests() {
        let h = "ab".repeat(32);
        assert_eq!(parse_digest(&h), Some([0xAB; 32]));
        assert_eq!(hex(&[0xAB; 32]), h);
        assert_eq!(parse_digest("abc"), None);
        assert_eq!(parse_digest(&"zz".repeat(32)), None);
        assert_eq!(parse_digest(""), None);
    }
}
