//! The newc ("070701") cpio format the kernel unpacks as an initramfs.
//!
//! Deterministic by construction: the caller gives entries in order, and every field that could
//! vary between builds (inode numbers, times, owners) is fixed: inodes count up from 1, times
//! are 0, owners are root. Writes to the writer it is given and nowhere else.

use std::io::{self, Write};

pub const S_IFDIR: u32 = 0o040_000;
pub const S_IFREG: u32 = 0o100_000;
pub const S_IFLNK: u32 = 0o120_000;
pub const S_IFCHR: u32 = 0o020_000;

const TRAILER: &str = "TRAILER!!!";

/// Writes a newc archive entry by entry; [`CpioWriter::finish`] writes the trailer.
#[derive(Debug)]
pub struct CpioWriter<W: Write> {
    w: W,
    next_ino: u32,
    written: u64,
}

/// One entry's header fields that vary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// File type and permission bits (`S_IF*` | 0o7777).
    pub mode: u32,
    pub nlink: u32,
    /// Device numbers of a device node (0 otherwise).
    pub rdev_major: u32,
    pub rdev_minor: u32,
}

impl<W: Write> CpioWriter<W> {
    pub fn new(w: W) -> Self {
        CpioWriter {
            w,
            next_ino: 1,
            written: 0,
        }
    }

    fn put(&mut self, b: &[u8]) -> io::Result<()> {
        self.w.write_all(b)?;
        self.written += b.len() as u64;
        Ok(())
    }

    fn pad(&mut self) -> io::Result<()> {
        let n = (4 - (self.written % 4) as usize) % 4;
        self.put(&[0u8; 3][..n])
    }

    fn raw(&mut self, ino: u32, name: &str, h: Header, data: &[u8]) -> io::Result<()> {
        if name.is_empty() || name.contains('\0') {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("cpio entry name {name:?} is empty or holds a NUL byte"),
            ));
        }
        let size = u32::try_from(data.len()).map_err(|_| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "{name}: {} bytes do not fit a newc entry (4 GiB at most)",
                    data.len()
                ),
            )
        })?;
        let fields = [
            ino,
            h.mode,
            0, // uid
            0, // gid
            h.nlink,
            0, // mtime
            size,
            0, // devmajor
            0, // devminor
            h.rdev_major,
            h.rdev_minor,
            name.len() as u32 + 1,
            0, // check
        ];
        let mut head = String::with_capacity(110);
        head.push_str("070701");
        for f in fields {
            head.push_str(&format!("{f:08X}"));
        }
        self.put(head.as_bytes())?;
        self.put(name.as_bytes())?;
        self.put(&[0])?;
        self.pad()?;
        self.put(data)?;
        self.pad()
    }

    /// Add one entry. `name` is relative ("init", "lib/modules/x.ko"); a directory must be added
    /// before anything inside it.
    pub fn entry(&mut self, name: &str, h: Header, data: &[u8]) -> io::Result<()> {
        let ino = self.next_ino;
        self.next_ino += 1;
        self.raw(ino, name, h, data)
    }

    /// Write the trailer and return the writer.
    pub fn finish(mut self) -> io::Result<W> {
        self.raw(
            0,
            TRAILER,
            Header {
                mode: 0,
                nlink: 1,
                rdev_major: 0,
                rdev_minor: 0,
            },
            &[],
        )?;
        Ok(self.w)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::panic)]
mod tests {
    use super::*;

    fn file(mode: u32) -> Header {
        Header {
            mode: S_IFREG | mode,
            nlink: 1,
            rdev_major: 0,
            rdev_minor: 0,
        }
    }

    fn sample() -> Vec<u8> {
        let mut w = CpioWriter::new(Vec::new());
        let dir = Header {
            mode: S_IFDIR | 0o755,
            nlink: 2,
            rdev_major: 0,
            rdev_minor: 0,
        };
        w.entry("dev", dir, &[]).unwrap();
        let console = Header {
            mode: S_IFCHR | 0o600,
            nlink: 1,
            rdev_major: 5,
            rdev_minor: 1,
        };
        w.entry("dev/console", console, &[]).unwrap();
        w.entry("init", file(0o755), b"\x7fELF fake").unwrap();
        let link = Header {
            mode: S_IFLNK | 0o777,
            nlink: 1,
            rdev_major: 0,
            rdev_minor: 0,
        };
        w.entry("sbin", link, b"/").unwrap();
        w.finish().unwrap()
    }

    #[test]
    fn layout_is_aligned_and_deterministic() {
        let a = sample();
        assert_eq!(a, sample());
        assert_eq!(a.len() % 4, 0);
        assert!(a.starts_with(b"070701"));
        let text = String::from_utf8_lossy(&a);
        assert!(text.contains("TRAILER!!!"));
    }

    /// The host's GNU cpio (ci/install-deps installs it) lists our archive exactly.
    #[test]
    fn gnu_cpio_reads_it() {
        let dir = tempfile::tempdir().unwrap();
        let arc = dir.path().join("a.cpio");
        std::fs::write(&arc, sample()).unwrap();
        let out = std::process::Command::new("cpio")
            .args(["-i", "-t", "-v", "-F"])
            .arg(&arc)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let list = String::from_utf8_lossy(&out.stdout);
        assert!(list.contains("init"), "{list}");
        assert!(list.contains("sbin -> /"), "{list}");
    }

    #[test]
    fn bad_names_are_refused() {
        let mut w = CpioWriter::new(Vec::new());
        assert!(w.entry("", file(0o644), b"").is_err());
        assert!(w.entry("a\0b", file(0o644), b"").is_err());
    }
}
