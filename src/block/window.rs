use super::{BlockDevice, BlockError};

/// A bounds-checked window onto part of another device: a partition.
///
/// Offsets are relative to the window's start. An access that would cross the window's end is
/// refused before it reaches the device underneath, so a bug or a bad length can never spill
/// into the neighbouring partition.
#[derive(Debug)]
pub struct Window<D> {
    dev: D,
    start: u64,
    len: u64,
}

/// Why a window could not be made.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error(
    "window of {len} bytes at offset {start} does not fit a device of {device_len} bytes \
     with {sector_size}-byte sectors (it must lie inside the device, start on a sector boundary \
     and cover whole sectors)"
)]
pub struct WindowError {
    pub start: u64,
    pub len: u64,
    pub device_len: u64,
    pub sector_size: u64,
}

impl<D: BlockDevice> Window<D> {
    /// A window of `len` bytes starting at byte `start` of `dev`.
    pub fn new(dev: D, start: u64, len: u64) -> Result<Self, WindowError> {
        let ss = dev.sector_size();
        let fits = start.checked_add(len).is_some_and(|end| end <= dev.len());
        if !fits || ss == 0 || !start.is_multiple_of(ss) || !len.is_multiple_of(ss) {
            return Err(WindowError {
                start,
                len,
                device_len: dev.len(),
                sector_size: ss,
            });
        }
        Ok(Window { dev, start, len })
    }
    /// The byte offset of the window on the device underneath.
    pub fn start(&self) -> u64 {
        self.start
    }
    pub fn inner(&self) -> &D {
        &self.dev
    }
    pub fn into_inner(self) -> D {
        self.dev
    }
}

impl<D: BlockDevice> BlockDevice for Window<D> {
    fn sector_size(&self) -> u64 {
        self.dev.sector_size()
    }
    fn len(&self) -> u64 {
        self.len
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), BlockError> {
        BlockError::check_bounds("read", offset, buf.len(), self.len)?;
        self.dev.read_at(self.start + offset, buf)
    }
    fn write_at(&mut self, offset: u64, data: &[u8]) -> Result<(), BlockError> {
        BlockError::check_bounds("write", offset, data.len(), self.len)?;
        self.dev.write_at(self.start + offset, data)
    }
    fn flush(&mut self) -> Result<(), BlockError> {
        self.dev.flush()
    }
    fn drop_cached(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        BlockError::check_bounds("drop the cache of", offset, len as usize, self.len)?;
        self.dev.drop_cached(self.start + offset, len)
    }
    fn lock_flags(&self) -> Result<super::FlagsLock, BlockError> {
        self.dev.lock_flags()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::block::MemDevice;

    #[test]
    fn write_past_end_is_refused_and_neighbour_untouched() {
        let mut dev = MemDevice::new(4096, 512);
        {
            let mut w = Window::new(&mut dev, 1024, 1024).unwrap();
            w.write_at(0, &[1; 1024]).unwrap();
            let err = w.write_at(512, &[2; 1024]).unwrap_err();
            assert!(matches!(err, BlockError::OutOfBounds { .. }), "{err}");
            assert!(w.write_at(u64::MAX, &[2]).is_err());
        }
        assert_eq!(&dev.bytes()[..1024], &[0; 1024][..]);
        assert_eq!(&dev.bytes()[1024..2048], &[1; 1024][..]);
        assert_eq!(&dev.bytes()[2048..], &[0; 2048][..]);
    }

    #[test]
    fn window_must_fit_and_be_aligned() {
        let dev = MemDevice::new(4096, 512);
        assert!(Window::new(dev_ref(&dev), 0, 4096).is_ok());
        assert!(Window::new(dev_ref(&dev), 512, 4096).is_err());
        assert!(Window::new(dev_ref(&dev), 100, 512).is_err());
        assert!(Window::new(dev_ref(&dev), u64::MAX, 2).is_err());
    }

    fn dev_ref(d: &MemDevice) -> MemDevice {
        d.clone()
    }
}
