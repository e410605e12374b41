//! The hardware watchdog (/dev/watchdog): arm with a timeout, pet, disarm with the magic close.
//! Stage 1 opens it without close-on-exec and passes the descriptor to stage 2, so the
//! watchdog stays armed and petted across the switch to the new root.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::path::Path;

nix::ioctl_readwrite!(wdioc_settimeout, b'W', 6, libc::c_int);
nix::ioctl_read!(wdioc_keepalive, b'W', 5, libc::c_int);

/// An open, armed watchdog.
#[derive(Debug)]
pub struct Watchdog {
    file: File,
}

impl Watchdog {
    /// Open (which arms it) the watchdog at `path`. With `inherit`, the descriptor survives
    /// exec.
    pub fn open(path: &Path, inherit: bool) -> std::io::Result<Watchdog> {
        let file = OpenOptions::new().write(true).open(path)?;
        if inherit {
            // std opens with O_CLOEXEC; clear it so that exec keeps the descriptor
            nix::fcntl::fcntl(
                &file,
                nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::empty()),
            )
            .map_err(std::io::Error::from)?;
        }
        Ok(Watchdog { file })
    }

    /// Take over a watchdog descriptor inherited from stage 1. The descriptor must be an open
    /// watchdog: it is checked with a keepalive.
    pub fn from_fd(fd: RawFd) -> std::io::Result<Watchdog> {
        // refuse the standard streams: they are never the watchdog
        if fd < 3 {
            return Err(std::io::Error::other(format!("fd {fd} is not a watchdog")));
        }
        nix::fcntl::fcntl(
            // SAFETY: only borrowed for one fcntl call; a closed fd number yields EBADF
            unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) },
            nix::fcntl::FcntlArg::F_GETFD,
        )
        .map_err(std::io::Error::from)?;
        // SAFETY: stage 1 handed this descriptor over for stage 2 to own; nothing else uses it
        let file = unsafe { File::from_raw_fd(fd) };
        let w = Watchdog { file };
        // only a real watchdog answers the keepalive ioctl; never write to anything else
        w.keepalive()?;
        // not inherited by services
        nix::fcntl::fcntl(
            &w.file,
            nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
        )
        .map_err(std::io::Error::from)?;
        Ok(w)
    }

    pub fn raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    /// Set the timeout; returns what the hardware accepted.
    pub fn set_timeout(&mut self, secs: u32) -> std::io::Result<u32> {
        let mut t = secs as libc::c_int;
        // SAFETY: the ioctl reads and writes one int through a valid pointer
        unsafe { wdioc_settimeout(self.file.as_raw_fd(), &mut t) }.map_err(std::io::Error::from)?;
        Ok(t as u32)
    }

    fn keepalive(&self) -> std::io::Result<()> {
        let mut dummy: libc::c_int = 0;
        // SAFETY: the ioctl writes at most one int through a valid pointer
        unsafe { wdioc_keepalive(self.file.as_raw_fd(), &mut dummy) }
            .map(|_| ())
            .map_err(std::io::Error::from)
    }

    pub fn pet(&mut self) -> std::io::Result<()> {
        match self.keepalive() {
            Ok(()) => Ok(()),
            // drivers without the ioctl are petted by any write
            Err(_) => self.file.write_all(b"\0"),
        }
    }

    /// Disarm: write the magic 'V' and close.
    pub fn magic_close(mut self) -> std::io::Result<()> {
        self.file.write_all(b"V")
    }
}
