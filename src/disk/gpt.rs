//! The on-disk GPT format: parsing and serialising one copy of the table (a header and its
//! partition entry array). Pure: bytes in, bytes out.

use std::fmt;

pub const SIGNATURE: &[u8; 8] = b"EFI PART";
pub const HEADER_SIZE: usize = 92;
const MIN_ENTRY_SIZE: u32 = 128;
/// Tables larger than this are refused rather than allocated (the standard table is 16 KiB).
pub const MAX_ARRAY_BYTES: u64 = 1 << 20;

/// A GPT header, as parsed. `raw` keeps every byte of it so that fields we do not interpret are
/// written back unchanged.
#[derive(Clone, PartialEq, Eq)]
pub struct Header {
    pub raw: Vec<u8>,
    pub header_size: u32,
    pub my_lba: u64,
    pub alternate_lba: u64,
    pub first_usable: u64,
    pub last_usable: u64,
    pub disk_guid: [u8; 16],
    pub entries_lba: u64,
    pub num_entries: u32,
    pub entry_size: u32,
    pub entries_crc: u32,
}

impl fmt::Debug for Header {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Header")
            .field("my_lba", &self.my_lba)
            .field("alternate_lba", &self.alternate_lba)
            .field("first_usable", &self.first_usable)
            .field("last_usable", &self.last_usable)
            .field("entries_lba", &self.entries_lba)
            .field("num_entries", &self.num_entries)
            .field("entry_size", &self.entry_size)
            .finish()
    }
}

/// Why one copy of the table is not valid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CopyError {
    #[error("no GPT signature")]
    NoSignature,
    #[error("header size {0} is outside 92..={1}")]
    BadHeaderSize(u32, u64),
    #[error("header CRC mismatch (stored {stored:#010x}, computed {computed:#010x})")]
    HeaderCrc { stored: u32, computed: u32 },
    #[error("header says it is at LBA {claims} but was read from LBA {actual}")]
    WrongLocation { claims: u64, actual: u64 },
    #[error("entry array of {num} entries of {size} bytes is not a supported shape")]
    BadArrayShape { num: u32, size: u32 },
    #[error(
        "table describes a disk of at least {needed} sectors but the device has {have} \
         (truncated image?)"
    )]
    BeyondDevice { needed: u64, have: u64 },
    #[error("usable area {first}..={last} is empty or overlaps the table itself")]
    BadUsableArea { first: u64, last: u64 },
    #[error("entry array CRC mismatch (stored {stored:#010x}, computed {computed:#010x})")]
    ArrayCrc { stored: u32, computed: u32 },
    #[error("could not read it: {0}")]
    Unreadable(String),
}

fn u32_at(b: &[u8], o: usize) -> u32 {
    let mut x = [0u8; 4];
    x.copy_from_slice(&b[o..o + 4]);
    u32::from_le_bytes(x)
}

fn u64_at(b: &[u8], o: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[o..o + 8]);
    u64::from_le_bytes(x)
}

/// CRC32 of the header's `header_size` bytes with the CRC field zeroed.
pub fn header_crc(raw: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&raw[..16]);
    h.update(&[0; 4]);
    h.update(&raw[20..]);
    h.finalize()
}

impl Header {
    /// Parse and check a header read from `lba` of a device of `total_sectors` sectors.
    /// `sector` is the whole sector it was read from.
    pub fn parse(sector: &[u8], lba: u64, total_sectors: u64) -> Result<Header, CopyError> {
        if sector.len() < HEADER_SIZE || &sector[..8] != SIGNATURE {
            return Err(CopyError::NoSignature);
        }
        let header_size = u32_at(sector, 12);
        if (header_size as usize) < HEADER_SIZE || header_size as usize > sector.len() {
            return Err(CopyError::BadHeaderSize(header_size, sector.len() as u64));
        }
        let raw = sector[..header_size as usize].to_vec();
        let stored = u32_at(&raw, 16);
        let computed = header_crc(&raw);
        if stored != computed {
            return Err(CopyError::HeaderCrc { stored, computed });
        }
        let mut disk_guid = [0u8; 16];
        disk_guid.copy_from_slice(&raw[56..72]);
        let h = Header {
            header_size,
            my_lba: u64_at(&raw, 24),
            alternate_lba: u64_at(&raw, 32),
            first_usable: u64_at(&raw, 40),
            last_usable: u64_at(&raw, 48),
            disk_guid,
            entries_lba: u64_at(&raw, 72),
            num_entries: u32_at(&raw, 80),
            entry_size: u32_at(&raw, 84),
            entries_crc: u32_at(&raw, 88),
            raw,
        };
        if h.my_lba != lba {
            return Err(CopyError::WrongLocation {
                claims: h.my_lba,
                actual: lba,
            });
        }
        let shape_ok = h.entry_size >= MIN_ENTRY_SIZE
            && h.entry_size.is_multiple_of(8)
            && h.num_entries > 0
            && h.array_bytes() <= MAX_ARRAY_BYTES;
        if !shape_ok {
            return Err(CopyError::BadArrayShape {
                num: h.num_entries,
                size: h.entry_size,
            });
        }
        h.check_geometry(sector.len() as u64, total_sectors)?;
        Ok(h)
    }

    /// The table must sit inside the device, its usable area must not overlap either copy of
    /// the table, and this copy's array must lie outside the usable area.
    fn check_geometry(&self, sector_size: u64, total_sectors: u64) -> Result<(), CopyError> {
        let array_sectors = self.array_bytes().div_ceil(sector_size);
        let array_end = self.entries_lba.saturating_add(array_sectors); // exclusive
        let needed = self
            .alternate_lba
            .max(self.last_usable)
            .max(array_end.saturating_sub(1))
            .max(self.my_lba)
            .saturating_add(1);
        if needed > total_sectors {
            return Err(CopyError::BeyondDevice {
                needed,
                have: total_sectors,
            });
        }
        let (first, last) = (self.first_usable, self.last_usable);
        let array_outside = array_end <= first || self.entries_lba > last;
        let headers_outside = [self.my_lba, self.alternate_lba]
            .iter()
            .all(|l| (*l < first || *l > last) && !(self.entries_lba <= *l && *l < array_end));
        if first > last || first < 2 || !array_outside || !headers_outside || self.entries_lba < 2 {
            return Err(CopyError::BadUsableArea { first, last });
        }
        Ok(())
    }

    pub fn array_bytes(&self) -> u64 {
        u64::from(self.num_entries) * u64::from(self.entry_size)
    }

    /// Serialise into a full sector, recomputing the header CRC.
    pub fn to_sector(&self, sector_size: usize) -> Vec<u8> {
        let mut raw = self.raw.clone();
        raw[24..32].copy_from_slice(&self.my_lba.to_le_bytes());
        raw[32..40].copy_from_slice(&self.alternate_lba.to_le_bytes());
        raw[72..80].copy_from_slice(&self.entries_lba.to_le_bytes());
        raw[88..92].copy_from_slice(&self.entries_crc.to_le_bytes());
        let crc = header_crc(&raw);
        raw[16..20].copy_from_slice(&crc.to_le_bytes());
        let mut sector = vec![0u8; sector_size];
        sector[..raw.len()].copy_from_slice(&raw);
        sector
    }

    /// The same table as the other copy: locations swapped, array at `entries_lba`.
    pub fn mirrored(&self, entries_lba: u64) -> Header {
        let mut h = self.clone();
        h.my_lba = self.alternate_lba;
        h.alternate_lba = self.my_lba;
        h.entries_lba = entries_lba;
        h
    }
}

/// One partition entry, decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub index: u32,
    pub type_guid: uuid::Uuid,
    pub unique_guid: uuid::Uuid,
    pub first_lba: u64,
    pub last_lba: u64,
    pub attributes: u64,
    pub name: String,
}

/// GPT stores GUIDs with the first three fields little-endian.
pub fn guid_from_disk(b: &[u8]) -> uuid::Uuid {
    let mut x = [0u8; 16];
    x.copy_from_slice(&b[..16]);
    uuid::Uuid::from_bytes_le(x)
}

/// Decode the used entries of an array (a zero type GUID means unused).
pub fn entries(array: &[u8], entry_size: u32) -> Vec<Entry> {
    array
        .chunks_exact(entry_size as usize)
        .enumerate()
        .filter(|(_, e)| e[..16].iter().any(|b| *b != 0))
        .map(|(i, e)| {
            let name_units: Vec<u16> = e[56..128]
                .chunks_exact(2)
                .map(|c| u16::from_le_bytes([c[0], c[1]]))
                .take_while(|u| *u != 0)
                .collect();
            Entry {
                index: i as u32,
                type_guid: guid_from_disk(&e[0..16]),
                unique_guid: guid_from_disk(&e[16..32]),
                first_lba: u64_at(e, 32),
                last_lba: u64_at(e, 40),
                attributes: u64_at(e, 48),
                name: String::from_utf16_lossy(&name_units),
            }
        })
        .collect()
}

/// Byte offset of entry `index`'s attribute word inside the array.
pub fn attributes_offset(index: u32, entry_size: u32) -> usize {
    index as usize * entry_size as usize + 48
}

pub fn array_crc(array: &[u8]) -> u32 {
    crc32fast::hash(array)
}
