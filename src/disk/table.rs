//! Reading the GPT with both copies checked, repairing a bad copy, and the ordered,
//! crash-safe writer for changes to the partition entries (boot flags).
//!
//! The `gpt` crate writes primary and backup interleaved with no barrier between them, which is
//! fine for a new disk but not for flags on a live one. Here a change is written backup first:
//! backup array, backup header, flush; then primary array, primary header, flush. A power cut
//! leaves at least one valid copy holding either the old or the new table, and the reader
//! prefers the primary when both are valid, so a reader never sees a mix.

use super::gpt::{self, CopyError, Entry, Header};
use crate::block::{read_vec, BlockDevice, BlockError};

/// One valid copy of the table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Copy {
    pub header: Header,
    pub array: Vec<u8>,
}

impl Copy {
    pub fn entries(&self) -> Vec<Entry> {
        gpt::entries(&self.array, self.header.entry_size)
    }
}

/// Which copy of the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Which {
    Primary,
    Backup,
}

impl std::fmt::Display for Which {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Which::Primary => "primary",
            Which::Backup => "backup",
        })
    }
}

/// What must be written to make both copies agree again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Repair {
    /// Both copies valid and equal.
    None,
    /// This copy is corrupt or missing (the reason) and will be rebuilt from the other.
    Rebuild(Which, CopyError),
    /// Both copies are valid but the backup differs from the primary (a change was cut short);
    /// the backup is brought back in line with the primary.
    Resync,
}

/// The table as read: the copy in force, and what a repair would write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Table {
    pub sector_size: u64,
    pub total_sectors: u64,
    /// The copy in force.
    pub copy: Copy,
    /// Where the copy in force came from.
    pub source: Which,
    pub repair: Repair,
}

/// The table could not be read.
#[derive(Debug, thiserror::Error)]
pub enum TableError {
    #[error("no valid GPT on the device: primary copy: {primary}; backup copy: {backup}")]
    NoValidTable {
        primary: CopyError,
        backup: CopyError,
    },
    #[error("device too small for a GPT ({len} bytes with {sector_size}-byte sectors)")]
    TooSmall { len: u64, sector_size: u64 },
    #[error(
        "cannot repair the {which} copy: its standard location {lba} would overlap the \
         partitions ({first_usable}..={last_usable}); repair the disk with sgdisk"
    )]
    UnsafeRepair {
        which: Which,
        lba: u64,
        first_usable: u64,
        last_usable: u64,
    },
    #[error("the new entry array has {got} bytes but the table holds {want}")]
    ArraySize { got: usize, want: u64 },
    #[error(transparent)]
    Block(#[from] BlockError),
}

fn read_copy<D: BlockDevice + ?Sized>(
    dev: &D,
    lba: u64,
    total_sectors: u64,
) -> Result<Copy, CopyError> {
    let ss = dev.sector_size();
    let sector =
        read_vec(dev, lba * ss, ss as usize).map_err(|e| CopyError::Unreadable(e.to_string()))?;
    let header = Header::parse(&sector, lba, total_sectors)?;
    let array = read_vec(dev, header.entries_lba * ss, header.array_bytes() as usize)
        .map_err(|e| CopyError::Unreadable(e.to_string()))?;
    let computed = gpt::array_crc(&array);
    if computed != header.entries_crc {
        return Err(CopyError::ArrayCrc {
            stored: header.entries_crc,
            computed,
        });
    }
    Ok(Copy { header, array })
}

/// Whether two valid copies describe the same table (they differ only in where they sit).
fn same_table(p: &Copy, b: &Copy) -> bool {
    p.array == b.array
        && p.header.alternate_lba == b.header.my_lba
        && b.header.alternate_lba == p.header.my_lba
        && p.header.first_usable == b.header.first_usable
        && p.header.last_usable == b.header.last_usable
        && p.header.disk_guid == b.header.disk_guid
        && p.header.num_entries == b.header.num_entries
        && p.header.entry_size == b.header.entry_size
}

/// Read both copies and decide which is in force. Never writes.
pub fn read<D: BlockDevice + ?Sized>(dev: &D) -> Result<Table, TableError> {
    let ss = dev.sector_size();
    let total_sectors = dev.len() / ss;
    if total_sectors < 3 {
        return Err(TableError::TooSmall {
            len: dev.len(),
            sector_size: ss,
        });
    }
    let primary = read_copy(dev, 1, total_sectors);
    let backup_lba = match &primary {
        Ok(p) => p.header.alternate_lba,
        Err(_) => total_sectors - 1,
    };
    let backup = read_copy(dev, backup_lba, total_sectors);
    let (copy, source, repair) = match (primary, backup) {
        (Ok(p), Ok(b)) => {
            let repair = if same_table(&p, &b) {
                Repair::None
            } else {
                Repair::Resync
            };
            (p, Which::Primary, repair)
        }
        (Ok(p), Err(e)) => (p, Which::Primary, Repair::Rebuild(Which::Backup, e)),
        (Err(e), Ok(b)) => (b, Which::Backup, Repair::Rebuild(Which::Primary, e)),
        (Err(primary), Err(backup)) => return Err(TableError::NoValidTable { primary, backup }),
    };
    Ok(Table {
        sector_size: ss,
        total_sectors,
        copy,
        source,
        repair,
    })
}

impl Table {
    /// The primary and backup headers of this table, wherever the copy in force came from.
    fn headers(&self) -> Result<(Header, Header), TableError> {
        let h = &self.copy.header;
        let array_sectors = h.array_bytes().div_ceil(self.sector_size);
        match self.source {
            Which::Primary => {
                // the backup array sits just before the backup header, as sgdisk puts it
                let b = h.mirrored(h.alternate_lba.saturating_sub(array_sectors));
                self.check_safe(Which::Backup, &b, array_sectors)?;
                Ok((h.clone(), b))
            }
            Which::Backup => {
                let p = h.mirrored(2);
                self.check_safe(Which::Primary, &p, array_sectors)?;
                Ok((p, h.clone()))
            }
        }
    }

    /// A rebuilt copy must not land on the partitions.
    fn check_safe(&self, which: Which, h: &Header, array_sectors: u64) -> Result<(), TableError> {
        let end = h.entries_lba + array_sectors; // exclusive
        let overlaps_partitions = h.entries_lba <= h.last_usable && end > h.first_usable;
        let overlaps_header = h.entries_lba <= h.my_lba && h.my_lba < end;
        if overlaps_partitions || overlaps_header || end > self.total_sectors || h.entries_lba < 2 {
            return Err(TableError::UnsafeRepair {
                which,
                lba: h.entries_lba,
                first_usable: h.first_usable,
                last_usable: h.last_usable,
            });
        }
        Ok(())
    }
}

fn write_copy<D: BlockDevice + ?Sized>(
    dev: &mut D,
    header: &Header,
    array: &[u8],
) -> Result<(), BlockError> {
    let ss = dev.sector_size();
    dev.write_at(header.entries_lba * ss, array)?;
    dev.write_at(header.my_lba * ss, &header.to_sector(ss as usize))
}

/// Make both copies agree with the copy in force, if they do not already. Writes only the
/// damaged copy's header and array, then flushes.
pub fn repair<D: BlockDevice + ?Sized>(dev: &mut D, table: &Table) -> Result<(), TableError> {
    let target = match &table.repair {
        Repair::None => return Ok(()),
        Repair::Rebuild(which, _) => *which,
        Repair::Resync => Which::Backup,
    };
    let (p, b) = table.headers()?;
    let h = match target {
        Which::Primary => p,
        Which::Backup => b,
    };
    write_copy(dev, &h, &table.copy.array)?;
    dev.flush()?;
    Ok(())
}

/// Replace the entry array with `array` (same size), crash-safely: backup array and header,
/// flush, primary array and header, flush. The table must have been repaired first (both
/// copies in agreement), which this function does itself when needed.
pub fn write_array<D: BlockDevice + ?Sized>(
    dev: &mut D,
    table: &Table,
    array: &[u8],
) -> Result<Table, TableError> {
    let want = table.copy.header.array_bytes();
    if array.len() as u64 != want {
        return Err(TableError::ArraySize {
            got: array.len(),
            want,
        });
    }
    repair(dev, table)?;
    let (mut p, mut b) = table.headers()?;
    let crc = gpt::array_crc(array);
    p.entries_crc = crc;
    b.entries_crc = crc;
    write_copy(dev, &b, array)?;
    dev.flush()?;
    write_copy(dev, &p, array)?;
    dev.flush()?;
    Ok(Table {
        sector_size: table.sector_size,
        total_sectors: table.total_sectors,
        copy: Copy {
            header: Header {
                raw: p.to_sector(table.sector_size as usize)[..p.header_size as usize].to_vec(),
                ..p
            },
            array: array.to_vec(),
        },
        source: Which::Primary,
        repair: Repair::None,
    })
}
