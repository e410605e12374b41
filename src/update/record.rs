//! Slot image records: what each root slot holds (version, length, SHA-256).
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
const FORMAT: u32 = 1;
/// The longest version string a record holds.
pub const MAX_VERSION: usize = 255;

/// What a slot holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SlotRecord {
    pub version: String,
    pub length: u64,
    #[serde(serialize_with = "ser_hex")]
    pub sha256: [u8; 32],
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
        let crc = crc32fast::hash(&b);
        b.extend_from_slice(&crc.to_le_bytes());
        b.resize(RECORD_SIZE as usize, 0);
        b
    }

    /// `None` for anything that is not a whole, intact record (zeroes, a torn write, garbage).
    pub fn decode(b: &[u8]) -> Option<SlotRecord> {
        if b.len() < 62
            || &b[..8] != MAGIC
            || u32::from_le_bytes(b[8..12].try_into().ok()?) != FORMAT
        {
            return None;
        }
        let length = u64::from_le_bytes(b[12..20].try_into().ok()?);
        let sha256: [u8; 32] = b[20..52].try_into().ok()?;
        let vlen = u16::from_le_bytes(b[52..54].try_into().ok()?) as usize;
        if vlen > MAX_VERSION || 54 + vlen + 4 > b.len() {
            return None;
        }
        let end = 54 + vlen;
        let crc = u32::from_le_bytes(b[end..end + 4].try_into().ok()?);
        if crc != crc32fast::hash(&b[..end]) {
            return None;
        }
        let version = String::from_utf8(b[54..end].to_vec()).ok()?;
        Some(SlotRecord {
            version,
            length,
            sha256,
        })
    }
}

/// Read the record of a slot (a window onto its partition).
pub fn read<D: BlockDevice + ?Sized>(slot: &D) -> Result<Option<SlotRecord>, BlockError> {
    if slot.len() < RECORD_SIZE {
        return Ok(None);
    }
    let b = crate::block::read_vec(slot, offset(slot.len()), RECORD_SIZE as usize)?;
    Ok(SlotRecord::decode(&b).filter(|r| r.length <= capacity(slot.len())))
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
    fn digests() {
        let h = "ab".repeat(32);
        assert_eq!(parse_digest(&h), Some([0xAB; 32]));
        assert_eq!(hex(&[0xAB; 32]), h);
        assert_eq!(parse_digest("abc"), None);
        assert_eq!(parse_digest(&"zz".repeat(32)), None);
        assert_eq!(parse_digest(""), None);
    }
}
