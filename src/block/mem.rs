use super::{BlockDevice, BlockError};

/// A device held in memory. Every write is durable at once; useful for building disks in tests
/// and for pure round trips. Use [`super::CrashDevice`] when durability matters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemDevice {
    bytes: Vec<u8>,
    sector_size: u64,
}

impl MemDevice {
    /// A zero-filled device of `len` bytes.
    pub fn new(len: u64, sector_size: u64) -> Self {
        MemDevice {
            bytes: vec![0; len as usize],
            sector_size,
        }
    }
    /// A device holding exactly `bytes`.
    pub fn from_bytes(bytes: Vec<u8>, sector_size: u64) -> Self {
        MemDevice { bytes, sector_size }
    }
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }
    pub fn into_bytes(self) -> Vec<u8> {
        self.bytes
    }
}

impl BlockDevice for MemDevice {
    fn sector_size(&self) -> u64 {
        self.sector_size
    }
    fn len(&self) -> u64 {
        self.bytes.len() as u64
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), BlockError> {
        BlockError::check_bounds("read", offset, buf.len(), self.len())?;
        let o = offset as usize;
        buf.copy_from_slice(&self.bytes[o..o + buf.len()]);
        Ok(())
    }
    fn write_at(&mut self, offset: u64, data: &[u8]) -> Result<(), BlockError> {
        BlockError::check_bounds("write", offset, data.len(), self.len())?;
        let o = offset as usize;
        self.bytes[o..o + data.len()].copy_from_slice(data);
        Ok(())
    }
    fn flush(&mut self) -> Result<(), BlockError> {
        Ok(())
    }
}
