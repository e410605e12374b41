use super::{BlockDevice, BlockError};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::{Path, PathBuf};

/// A disk image file or a real block device, accessed with positioned reads and writes.
/// [`BlockDevice::flush`] is `fdatasync`.
#[derive(Debug)]
pub struct FileDevice {
    file: File,
    path: PathBuf,
    len: u64,
    sector_size: u64,
}

/// How long [`FileDevice::lock_flags`] waits for another holder of the boot-flags lock. A
/// flag change takes milliseconds; a holder this slow is stuck, and the caller is told so.
pub const FLAGS_LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

nix::ioctl_read_bad!(blksszget, 0x1268, libc::c_int);
nix::ioctl_read!(blkgetsize64, 0x12, 114, u64);

impl FileDevice {
    /// Open `path` for reading and, when `writable`, writing. A regular file gets 512-byte
    /// sectors (see [`FileDevice::with_sector_size`]); a block device reports its own.
    pub fn open(path: impl AsRef<Path>, writable: bool) -> Result<Self, BlockError> {
        let path = path.as_ref().to_path_buf();
        let io = |op, source| BlockError::Io {
            op,
            what: path.display().to_string(),
            source,
        };
        let file = OpenOptions::new()
            .read(true)
            .write(writable)
            .open(&path)
            .map_err(|e| io("open", e))?;
        let meta = file.metadata().map_err(|e| io("stat", e))?;
        let (len, sector_size) = if meta.file_type().is_block_device() {
            use std::os::fd::AsRawFd;
            let fd = file.as_raw_fd();
            let mut ss: libc::c_int = 0;
            let mut len: u64 = 0;
            // SAFETY: both ioctls write one integer of the declared type through a valid pointer.
            unsafe {
                blksszget(fd, &mut ss).map_err(|e| io("BLKSSZGET", e.into()))?;
                blkgetsize64(fd, &mut len).map_err(|e| io("BLKGETSIZE64", e.into()))?;
            }
            (len, ss as u64)
        } else {
            (meta.len(), 512)
        };
        Ok(FileDevice {
            file,
            path,
            len,
            sector_size,
        })
    }

    /// Treat the device as having `sector_size`-byte sectors (a 4Kn disk image, say).
    pub fn with_sector_size(mut self, sector_size: u64) -> Self {
        self.sector_size = sector_size;
        self
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn io_err(&self, op: &'static str, source: std::io::Error) -> BlockError {
        BlockError::Io {
            op,
            what: self.path.display().to_string(),
            source,
        }
    }
}

impl BlockDevice for FileDevice {
    fn sector_size(&self) -> u64 {
        self.sector_size
    }
    fn len(&self) -> u64 {
        self.len
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), BlockError> {
        BlockError::check_bounds("read", offset, buf.len(), self.len)?;
        self.file
            .read_exact_at(buf, offset)
            .map_err(|e| self.io_err("read", e))
    }
    fn write_at(&mut self, offset: u64, data: &[u8]) -> Result<(), BlockError> {
        BlockError::check_bounds("write", offset, data.len(), self.len)?;
        self.file
            .write_all_at(data, offset)
            .map_err(|e| self.io_err("write", e))
    }
    fn flush(&mut self) -> Result<(), BlockError> {
        self.file
            .sync_data()
            .map_err(|e| self.io_err("fdatasync", e))
    }
    /// `posix_fadvise(POSIX_FADV_DONTNEED)`: the kernel drops the clean cached pages of the
    /// range (of the file, or of the block device's own page cache), so the next read goes to
    /// the medium. Chosen over O_DIRECT because it needs no aligned buffers and works the same
    /// for image files and devices. Pages still dirty are not dropped: call it after a flush.
    fn drop_cached(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        use std::os::fd::AsRawFd;
        let (Ok(off), Ok(n)) = (i64::try_from(offset), i64::try_from(len)) else {
            return BlockError::check_bounds("drop the cache of", offset, usize::MAX, self.len);
        };
        // SAFETY: fadvise only reads its integer arguments; the descriptor is ours and open.
        let rc = unsafe {
            libc::posix_fadvise(self.file.as_raw_fd(), off, n, libc::POSIX_FADV_DONTNEED)
        };
        if rc != 0 {
            return Err(self.io_err(
                "posix_fadvise(DONTNEED)",
                std::io::Error::from_raw_os_error(rc),
            ));
        }
        Ok(())
    }
    /// An exclusive `flock` on a descriptor of its own for the disk (image file or device
    /// node), so every process that changes the flags of this disk (keel-init's stage 1 and 2,
    /// keel-agent, keel-image) takes turns. Waits up to [`FLAGS_LOCK_WAIT`] for a holder.
    fn lock_flags(&self) -> Result<super::FlagsLock, BlockError> {
        use std::os::fd::AsRawFd;
        let file =
            File::open(&self.path).map_err(|e| self.io_err("open (for the flags lock)", e))?;
        let start = std::time::Instant::now();
        loop {
            // SAFETY: flock takes a descriptor we own and an integer operation.
            if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
                return Ok(super::FlagsLock::held_by(file));
            }
            let e = std::io::Error::last_os_error();
            let busy = e.raw_os_error() == Some(libc::EWOULDBLOCK);
            if busy && start.elapsed() < FLAGS_LOCK_WAIT {
                std::thread::sleep(std::time::Duration::from_millis(5));
                continue;
            }
            let what = if busy {
                format!(
                    "{} (another process has held the boot-flags lock for {:?}; `fuser {}` \
                     names it)",
                    self.path.display(),
                    start.elapsed(),
                    self.path.display()
                )
            } else {
                self.path.display().to_string()
            };
            return Err(BlockError::Io {
                op: "flock (the boot-flags lock)",
                what,
                source: e,
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_round_trip_and_bounds() {
        let f = tempfile::NamedTempFile::new().unwrap();
        f.as_file().set_len(8192).unwrap();
        let mut d = FileDevice::open(f.path(), true).unwrap();
        assert_eq!(d.len(), 8192);
        assert_eq!(d.sector_size(), 512);
        d.write_at(4096, b"keel").unwrap();
        d.flush().unwrap();
        let mut b = [0u8; 4];
        d.read_at(4096, &mut b).unwrap();
        assert_eq!(&b, b"keel");
        assert!(d.write_at(8190, b"keel").is_err());
        assert_eq!(std::fs::metadata(f.path()).unwrap().len(), 8192);
    }

    /// How many of the pages of `len` bytes of `file` are in the page cache (mincore).
    fn resident_pages(file: &File, len: usize) -> usize {
        use std::os::fd::AsRawFd;
        let page = 4096;
        let pages = len.div_ceil(page);
        let mut vec = vec![0u8; pages];
        // SAFETY: a private read-only mapping of `len` bytes of a file we hold open; mincore
        // writes one byte per page into `vec`, which has that many; the mapping is unmapped
        // before return and never dereferenced.
        unsafe {
            let p = libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            );
            assert_ne!(p, libc::MAP_FAILED, "mmap");
            let rc = libc::mincore(p, len, vec.as_mut_ptr());
            libc::munmap(p, len);
            assert_eq!(rc, 0, "mincore");
        }
        vec.iter().filter(|b| *b & 1 == 1).count()
    }

    /// The read-back after an install goes to the medium: after a flush, `drop_cached` leaves
    /// none of the range's pages in the page cache, so the next read comes from the disk.
    #[test]
    fn drop_cached_empties_the_page_cache_of_the_range() {
        // /tmp may be tmpfs, whose pages are the storage: use the build tree's file system.
        let f = tempfile::NamedTempFile::new_in(env!("CARGO_MANIFEST_DIR")).unwrap();
        let len = 1 << 20;
        f.as_file().set_len(len as u64).unwrap();
        let mut d = FileDevice::open(f.path(), true).unwrap();
        d.write_at(0, &vec![0x5a; len]).unwrap();
        d.flush().unwrap();
        let mut buf = vec![0u8; len];
        d.read_at(0, &mut buf).unwrap();
        let before = resident_pages(f.as_file(), len);
        assert!(
            before > 0,
            "the written range is not cached at all: the check means nothing"
        );
        d.drop_cached(0, len as u64).unwrap();
        assert_eq!(
            resident_pages(f.as_file(), len),
            0,
            "{before} pages were cached before"
        );
        d.read_at(0, &mut buf).unwrap();
        assert!(buf.iter().all(|b| *b == 0x5a));
    }

    #[test]
    fn missing_file_names_the_path() {
        let err = FileDevice::open("/nonexistent/keel.img", false).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/keel.img"), "{err}");
    }
}
