//! Block devices: the one abstraction every disk-touching part of KeelOS goes through.
//!
//! This module owns the [`BlockDevice`] trait and its implementations: memory ([`MemDevice`]),
//! files and real block devices ([`FileDevice`]), a bounds-checked window onto part of another
//! device ([`Window`], a partition), and the crash-model device used by tests ([`CrashDevice`]).
//! It never interprets what the bytes mean: partition tables and images live elsewhere.

mod crash;
mod file;
mod mem;
mod window;

pub use crash::{CrashChoice, CrashDevice, PendingWrite, SplitMix, WriteFate};
pub use file::{FileDevice, FLAGS_LOCK_WAIT};
pub use mem::MemDevice;
pub use window::{Window, WindowError};

/// An error from a block device.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    /// An access outside the device: nothing was read or written.
    #[error(
        "{op} of {len} bytes at offset {offset} is outside the device ({device_len} bytes); \
         nothing was {done}"
    )]
    OutOfBounds {
        op: &'static str,
        done: &'static str,
        offset: u64,
        len: u64,
        device_len: u64,
    },
    /// The operating system refused an operation on the device.
    #[error("{op} on {what} failed: {source}")]
    Io {
        op: &'static str,
        what: String,
        #[source]
        source: std::io::Error,
    },
    /// A fault injected by a test device (see [`CrashDevice::fail_next`]).
    #[error("injected {0} failure")]
    Injected(&'static str),
}

impl BlockError {
    pub(crate) fn check_bounds(
        op: &'static str,
        offset: u64,
        len: usize,
        device_len: u64,
    ) -> Result<(), BlockError> {
        let len = len as u64;
        match offset.checked_add(len) {
            Some(end) if end <= device_len => Ok(()),
            _ => Err(BlockError::OutOfBounds {
                op,
                done: if op == "write" { "written" } else { "read" },
                offset,
                len,
                device_len,
            }),
        }
    }
}

/// A device of fixed length made of sectors: a disk, a partition, a file, a test double.
///
/// Writes become durable only after [`BlockDevice::flush`] returns: that is the barrier every
/// crash-safety argument in KeelOS rests on. Accesses need not be sector aligned, but a device may
/// tear an unflushed write at sector boundaries when power is lost.
pub trait BlockDevice {
    /// The logical sector size in bytes (512 or 4096).
    fn sector_size(&self) -> u64;
    /// The length of the device in bytes.
    fn len(&self) -> u64;
    /// Whether the device has no bytes at all.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Fill `buf` with the bytes at `offset`. Reading past the end is an error.
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), BlockError>;
    /// Write `data` at `offset`. Writing past the end is an error and writes nothing.
    fn write_at(&mut self, offset: u64, data: &[u8]) -> Result<(), BlockError>;
    /// Make every write that returned before this call durable.
    fn flush(&mut self) -> Result<(), BlockError>;
    /// Forget any cached copy of `len` bytes at `offset`, so that the next read of them comes
    /// from the medium, not from memory (the read-back after an install checks what the disk
    /// kept). Only flushed bytes may be dropped; devices without a cache do nothing.
    fn drop_cached(&self, _offset: u64, _len: u64) -> Result<(), BlockError> {
        Ok(())
    }
    /// Take the lock that serializes boot-flag changes between processes, held until the
    /// returned guard is dropped (across a whole load-modify-commit). Devices that only one
    /// process can reach (memory, test devices) need none.
    fn lock_flags(&self) -> Result<FlagsLock, BlockError> {
        Ok(FlagsLock::none())
    }
}

/// A held boot-flags lock (see [`BlockDevice::lock_flags`]); released when dropped.
#[derive(Debug)]
pub struct FlagsLock(#[allow(dead_code)] Option<std::fs::File>);

impl FlagsLock {
    /// A device that needs no lock.
    pub fn none() -> Self {
        FlagsLock(None)
    }
    /// The lock held through `file` (an `flock` that closing the file releases).
    pub fn held_by(file: std::fs::File) -> Self {
        FlagsLock(Some(file))
    }
}

impl<D: BlockDevice + ?Sized> BlockDevice for &mut D {
    fn sector_size(&self) -> u64 {
        (**self).sector_size()
    }
    fn len(&self) -> u64 {
        (**self).len()
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), BlockError> {
        (**self).read_at(offset, buf)
    }
    fn write_at(&mut self, offset: u64, data: &[u8]) -> Result<(), BlockError> {
        (**self).write_at(offset, data)
    }
    fn flush(&mut self) -> Result<(), BlockError> {
        (**self).flush()
    }
    fn drop_cached(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        (**self).drop_cached(offset, len)
    }
    fn lock_flags(&self) -> Result<FlagsLock, BlockError> {
        (**self).lock_flags()
    }
}

impl<D: BlockDevice + ?Sized> BlockDevice for Box<D> {
    fn sector_size(&self) -> u64 {
        (**self).sector_size()
    }
    fn len(&self) -> u64 {
        (**self).len()
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), BlockError> {
        (**self).read_at(offset, buf)
    }
    fn write_at(&mut self, offset: u64, data: &[u8]) -> Result<(), BlockError> {
        (**self).write_at(offset, data)
    }
    fn flush(&mut self) -> Result<(), BlockError> {
        (**self).flush()
    }
    fn drop_cached(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        (**self).drop_cached(offset, len)
    }
    fn lock_flags(&self) -> Result<FlagsLock, BlockError> {
        (**self).lock_flags()
    }
}

/// A shared reference is a read-only view: reads go through, writes are refused, flush has
/// nothing to do. It lets a [`Window`] be made for reading while the device is shared.
impl<D: BlockDevice + ?Sized> BlockDevice for &D {
    fn sector_size(&self) -> u64 {
        (**self).sector_size()
    }
    fn len(&self) -> u64 {
        (**self).len()
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), BlockError> {
        (**self).read_at(offset, buf)
    }
    fn write_at(&mut self, offset: u64, data: &[u8]) -> Result<(), BlockError> {
        Err(BlockError::OutOfBounds {
            op: "write",
            done: "written (the device is shared read-only here)",
            offset,
            len: data.len() as u64,
            device_len: 0,
        })
    }
    fn flush(&mut self) -> Result<(), BlockError> {
        Ok(())
    }
    fn drop_cached(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        (**self).drop_cached(offset, len)
    }
    fn lock_flags(&self) -> Result<FlagsLock, BlockError> {
        (**self).lock_flags()
    }
}

/// Read `len` bytes at `offset` into a new buffer.
pub fn read_vec<D: BlockDevice + ?Sized>(
    dev: &D,
    offset: u64,
    len: usize,
) -> Result<Vec<u8>, BlockError> {
    BlockError::check_bounds("read", offset, len, dev.len())?;
    let mut buf = vec![0u8; len];
    dev.read_at(offset, &mut buf)?;
    Ok(buf)
}

/// Adapts a [`BlockDevice`] to `Read + Write + Seek` for code that wants streams (the `gpt`
/// crate's table creation). Flushing the stream flushes the device.
pub struct DeviceStream<D> {
    dev: D,
    pos: u64,
}

impl<D> std::fmt::Debug for DeviceStream<D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceStream")
            .field("pos", &self.pos)
            .finish()
    }
}

impl<D: BlockDevice> DeviceStream<D> {
    pub fn new(dev: D) -> Self {
        DeviceStream { dev, pos: 0 }
    }
    pub fn into_inner(self) -> D {
        self.dev
    }
}

fn to_io(e: BlockError) -> std::io::Error {
    match e {
        BlockError::Io { source, .. } => source,
        other => std::io::Error::other(other.to_string()),
    }
}

impl<D: BlockDevice> std::io::Read for DeviceStream<D> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let left = self.dev.len().saturating_sub(self.pos);
        let n = (buf.len() as u64).min(left) as usize;
        self.dev.read_at(self.pos, &mut buf[..n]).map_err(to_io)?;
        self.pos += n as u64;
        Ok(n)
    }
}

impl<D: BlockDevice> std::io::Write for DeviceStream<D> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.dev.write_at(self.pos, buf).map_err(to_io)?;
        self.pos += buf.len() as u64;
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.dev.flush().map_err(to_io)
    }
}

impl<D: BlockDevice> std::io::Seek for DeviceStream<D> {
    fn seek(&mut self, pos: std::io::SeekFrom) -> std::io::Result<u64> {
        let new = match pos {
            std::io::SeekFrom::Start(p) => Some(p),
            std::io::SeekFrom::End(d) => self.dev.len().checked_add_signed(d),
            std::io::SeekFrom::Current(d) => self.pos.checked_add_signed(d),
        };
        match new {
            Some(p) => {
                self.pos = p;
                Ok(p)
            }
            None => Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "seek before the start of the device",
            )),
        }
    }
}
