//! The thin driver between the pure flag logic and a disk: read the flags from the root
//! entries, and commit new ones through the crash-safe table writer.

use super::{choose_boot, BootChoice, BootFlags, FlagError, SlotFlags};
use crate::block::BlockDevice;
use crate::disk::{self, gpt, table, DiskError, Layout};

/// Reading or changing the flags on a disk failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(transparent)]
    Disk(#[from] DiskError),
    #[error(transparent)]
    Flags(#[from] FlagError),
}

impl From<table::TableError> for StoreError {
    fn from(e: table::TableError) -> Self {
        StoreError::Disk(e.into())
    }
}

/// The flags of both root slots as the table in force holds them.
pub fn flags_of(layout: &Layout) -> SlotFlags {
    SlotFlags {
        a: BootFlags(layout.root_a.attributes),
        b: BootFlags(layout.root_b.attributes),
    }
}

/// Open the disk and read the flags. Never writes.
pub fn load<D: BlockDevice + ?Sized>(dev: &D) -> Result<(Layout, SlotFlags), StoreError> {
    let layout = disk::open(dev)?;
    let flags = flags_of(&layout);
    Ok((layout, flags))
}

/// Commit `flags` to the disk, crash-safely (repairing a damaged copy first). Returns the
/// layout as it now stands.
pub fn commit<D: BlockDevice + ?Sized>(
    dev: &mut D,
    layout: &Layout,
    flags: SlotFlags,
) -> Result<Layout, StoreError> {
    let t = &layout.table;
    let mut array = t.copy.array.clone();
    let size = t.copy.header.entry_size;
    for (p, f) in [(&layout.root_a, flags.a), (&layout.root_b, flags.b)] {
        let o = gpt::attributes_offset(p.index, size);
        array[o..o + 8].copy_from_slice(&f.0.to_le_bytes());
    }
    let table = table::write_array(dev, t, &array)?;
    Ok(Layout::from_table(table)?)
}

/// Load, apply a transition, commit. Nothing is written when the transition is refused. The
/// device's flags lock is held from the load to the end of the commit, so two writers on one
/// node (keel-init, keel-agent, keel-image) never lose each other's change.
pub fn update<D: BlockDevice + ?Sized>(
    dev: &mut D,
    change: impl FnOnce(SlotFlags) -> Result<SlotFlags, FlagError>,
) -> Result<(Layout, SlotFlags), StoreError> {
    let _lock = dev.lock_flags().map_err(DiskError::from)?;
    let (layout, flags) = load(dev)?;
    let new = change(flags)?;
    let layout = commit(dev, &layout, new)?;
    Ok((layout, new))
}

/// The boot stage, as keel-init runs it: repair the table if a copy is damaged, choose the slot,
/// and commit the spent try before anything mounts the root.
pub fn boot<D: BlockDevice + ?Sized>(dev: &mut D) -> Result<(Layout, BootChoice), StoreError> {
    let _lock = dev.lock_flags().map_err(DiskError::from)?;
    let (layout, flags) = load(dev)?;
    let choice = choose_boot(flags)?;
    let layout = if choice.flags != flags {
        commit(dev, &layout, choice.flags)?
    } else {
        table::repair(dev, &layout.table)?;
        disk::open(dev)?
    };
    Ok((layout, choice))
}
