//! The KeelOS disk: its GPT layout, created with the `gpt` crate and found again by label.
//!
//! This module owns the partition table: creating the four KeelOS partitions, opening a disk
//! by their labels (never by number), and the crash-safe table reader and writer in [`table`].
//! It never reads or writes inside a partition.

pub mod gpt;
pub mod table;

use crate::block::{BlockDevice, BlockError, DeviceStream, Window, WindowError};
use serde::Serialize;

pub const ESP: &str = "ESP";
pub const ROOT_A: &str = "MATIC_ROOT_A";
pub const ROOT_B: &str = "MATIC_ROOT_B";
pub const STATE: &str = "MATIC_STATE";
/// The labels, in table order.
pub const LABELS: [&str; 4] = [ESP, ROOT_A, ROOT_B, STATE];

pub const MIB: u64 = 1 << 20;

/// Standard partition type GUIDs.
pub mod types {
    pub const EFI_SYSTEM: &str = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B";
    pub const LINUX_ROOT_X86_64: &str = "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709";
    pub const LINUX_FILESYSTEM: &str = "0FC63DAF-8483-4772-8E79-3D69D8477DE4";
}

/// Partition sizes for a new disk. Sizes are rounded up to whole MiB.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LayoutSpec {
    pub esp_size: u64,
    pub root_size: u64,
    /// `None`: STATE takes the rest of the disk.
    pub state_size: Option<u64>,
}

impl Default for LayoutSpec {
    fn default() -> Self {
        LayoutSpec {
            esp_size: 16 * MIB,
            root_size: 512 * MIB,
            state_size: None,
        }
    }
}

/// A disk layout could not be created or found.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    #[error("partition {label} would be empty; give it a size of at least 1 MiB")]
    EmptyPartition { label: &'static str },
    #[error(
        "the layout needs {needed} bytes (ESP {esp}, two roots of {root}, STATE {state}, plus \
         the table) but the disk has {have}; make the disk larger or the partitions smaller"
    )]
    DoesNotFit {
        needed: u64,
        have: u64,
        esp: u64,
        root: u64,
        state: u64,
    },
    #[error("sector size {0} is not supported (512 or 4096)")]
    SectorSize(u64),
    #[error("the gpt crate refused the table: {0}")]
    Gpt(String),
    #[error(
        "no partition labelled {0}; is this a KeelOS disk? (keel-image disk create makes one)"
    )]
    MissingLabel(&'static str),
    #[error("{count} partitions are labelled {label}; labels must be unique")]
    DuplicateLabel { label: &'static str, count: usize },
    #[error("partition {label} (LBA {first}..={last}) lies outside the usable area {first_usable}..={last_usable}")]
    Outside {
        label: &'static str,
        first: u64,
        last: u64,
        first_usable: u64,
        last_usable: u64,
    },
    #[error("partitions {a} and {b} overlap")]
    Overlap { a: &'static str, b: &'static str },
    #[error(transparent)]
    Table(#[from] table::TableError),
    #[error(transparent)]
    Block(#[from] BlockError),
    #[error(transparent)]
    Window(#[from] WindowError),
}

/// One KeelOS partition, found by label.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Partition {
    pub label: &'static str,
    /// Index in the entry array (0-based).
    pub index: u32,
    pub first_lba: u64,
    pub last_lba: u64,
    /// Byte offset and length on the disk.
    pub offset: u64,
    pub len: u64,
    pub type_guid: String,
    pub attributes: u64,
}

/// The four KeelOS partitions of a disk, as the table in force describes them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    pub table: table::Table,
    pub esp: Partition,
    pub root_a: Partition,
    pub root_b: Partition,
    pub state: Partition,
}

impl Layout {
    /// Find the four partitions by label in `table` and check that they fit and do not overlap.
    pub fn from_table(table: table::Table) -> Result<Layout, DiskError> {
        let entries = table.copy.entries();
        let h = &table.copy.header;
        let ss = table.sector_size;
        let mut found = Vec::new();
        for label in LABELS {
            let matching: Vec<_> = entries.iter().filter(|e| e.name == label).collect();
            let e = match matching.as_slice() {
                [] => return Err(DiskError::MissingLabel(label)),
                [e] => *e,
                many => {
                    return Err(DiskError::DuplicateLabel {
                        label,
                        count: many.len(),
                    })
                }
            };
            if e.first_lba < h.first_usable
                || e.last_lba > h.last_usable
                || e.first_lba > e.last_lba
            {
                return Err(DiskError::Outside {
                    label,
                    first: e.first_lba,
                    last: e.last_lba,
                    first_usable: h.first_usable,
                    last_usable: h.last_usable,
                });
            }
            found.push(Partition {
                label,
                index: e.index,
                first_lba: e.first_lba,
                last_lba: e.last_lba,
                offset: e.first_lba * ss,
                len: (e.last_lba - e.first_lba + 1) * ss,
                type_guid: e.type_guid.to_string().to_uppercase(),
                attributes: e.attributes,
            });
        }
        for (i, a) in found.iter().enumerate() {
            for b in &found[i + 1..] {
                if a.first_lba <= b.last_lba && b.first_lba <= a.last_lba {
                    return Err(DiskError::Overlap {
                        a: a.label,
                        b: b.label,
                    });
                }
            }
        }
        let mut it = found.into_iter();
        let mut next = || it.next().ok_or(DiskError::MissingLabel(ESP));
        Ok(Layout {
            esp: next()?,
            root_a: next()?,
            root_b: next()?,
            state: next()?,
            table,
        })
    }

    pub fn partition(&self, label: &str) -> Option<&Partition> {
        [&self.esp, &self.root_a, &self.root_b, &self.state]
            .into_iter()
            .find(|p| p.label == label)
    }

    pub fn root(&self, slot: crate::bootctl::Slot) -> &Partition {
        match slot {
            crate::bootctl::Slot::A => &self.root_a,
            crate::bootctl::Slot::B => &self.root_b,
        }
    }
}

/// Read the table (either valid copy) and find the KeelOS partitions. Never writes.
pub fn open<D: BlockDevice + ?Sized>(dev: &D) -> Result<Layout, DiskError> {
    Layout::from_table(table::read(dev)?)
}

/// A window onto one partition of `dev`.
pub fn partition_window<D: BlockDevice>(dev: D, p: &Partition) -> Result<Window<D>, DiskError> {
    Ok(Window::new(dev, p.offset, p.len)?)
}

/// Write a new KeelOS table to `dev` (protective MBR, both GPT copies) and flush. Both root
/// slots start unbootable. Everything previously in the table is lost; partition contents are
/// not touched.
pub fn create<D: BlockDevice>(dev: &mut D, spec: LayoutSpec) -> Result<(), DiskError> {
    let ss = dev.sector_size();
    let lb = match ss {
        512 => ::gpt::disk::LogicalBlockSize::Lb512,
        4096 => ::gpt::disk::LogicalBlockSize::Lb4096,
        other => return Err(DiskError::SectorSize(other)),
    };
    let round = |b: u64| b.div_ceil(MIB) * MIB;
    let (esp, root) = (round(spec.esp_size), round(spec.root_size));
    for (label, size) in [(ESP, esp), (ROOT_A, root)] {
        if size == 0 {
            return Err(DiskError::EmptyPartition { label });
        }
    }
    let total_sectors = dev.len() / ss;
    // 128 entries of 128 bytes, plus the header, at each end
    let table_sectors = 1 + (128 * 128) / ss;
    let last_usable = total_sectors.saturating_sub(1 + table_sectors + 1);
    let start = MIB; // first partition 1 MiB in
    let fixed_end = start + esp + 2 * root;
    let usable_end = (last_usable + 1) * ss; // exclusive, in bytes
    let state = match spec.state_size {
        Some(s) => round(s),
        None => (usable_end.saturating_sub(fixed_end) / MIB) * MIB,
    };
    let needed = fixed_end + state + table_sectors * ss;
    if state == 0 || fixed_end + state > usable_end || total_sectors < 2 * table_sectors + 2 {
        if state == 0 && spec.state_size == Some(0) {
            return Err(DiskError::EmptyPartition { label: STATE });
        }
        return Err(DiskError::DoesNotFit {
            needed: needed.max(fixed_end + MIB + table_sectors * ss),
            have: dev.len(),
            esp,
            root,
            state,
        });
    }
    let gpt_err = |e: ::gpt::GptError| DiskError::Gpt(e.to_string());
    let mut stream = DeviceStream::new(&mut *dev);
    let mbr = ::gpt::mbr::ProtectiveMBR::with_lb_size(
        u32::try_from(total_sectors - 1).unwrap_or(u32::MAX),
    );
    mbr.overwrite_lba0(&mut stream)
        .map_err(|e| DiskError::Gpt(e.to_string()))?;
    let mut disk = ::gpt::GptConfig::new()
        .writable(true)
        .logical_block_size(lb)
        .create_from_device(stream, None)
        .map_err(gpt_err)?;
    let parts = [
        (ESP, esp, ::gpt::partition_types::EFI),
        (ROOT_A, root, ::gpt::partition_types::LINUX_ROOT_X64),
        (ROOT_B, root, ::gpt::partition_types::LINUX_ROOT_X64),
        (STATE, state, ::gpt::partition_types::LINUX_FS),
    ];
    let mut at = start;
    for (id, (label, size, ty)) in parts.into_iter().enumerate() {
        disk.add_partition_at(label, id as u32 + 1, at / ss, size / ss, ty, 0)
            .map_err(gpt_err)?;
        at += size;
    }
    let mut stream = disk.write().map_err(gpt_err)?;
    use std::io::Write;
    stream
        .flush()
        .map_err(|e| DiskError::Gpt(format!("flush: {e}")))?;
    Ok(())
}

#[cfg(test)]
mod tests;
