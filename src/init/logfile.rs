//! Service log files with size-based rotation: `<name>.log`, then `<name>.log.1` (newest) up to
//! `<name>.log.<keep>`. The rotation decision and plan are pure; [`LogFile`] performs them. It
//! writes only inside the log directory it is given.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

/// Whether writing `incoming` bytes to a file of `size` bytes must rotate it first. A file that
/// is empty is never rotated, so a single huge write still lands somewhere.
pub fn needs_rotation(size: u64, incoming: u64, max_bytes: u64) -> bool {
    size > 0
        && size
            .checked_add(incoming)
            .is_none_or(|total| total > max_bytes)
}

/// The renames that rotate `base` keeping `keep` old files, in the order they must happen:
/// the oldest is overwritten first, the live file moves last.
pub fn rotation_plan(base: &Path, keep: u32) -> Vec<(PathBuf, PathBuf)> {
    let numbered = |n: u32| {
        let mut s = base.as_os_str().to_owned();
        s.push(format!(".{n}"));
        PathBuf::from(s)
    };
    let mut plan = Vec::new();
    for n in (1..keep).rev() {
        plan.push((numbered(n), numbered(n + 1)));
    }
    if keep > 0 {
        plan.push((base.to_path_buf(), numbered(1)));
    }
    plan
}

/// The log file of a service.
pub fn log_path(dir: &Path, service: &str) -> PathBuf {
    dir.join(format!("{service}.log"))
}

/// An append-only log file that rotates itself by size.
#[derive(Debug)]
pub struct LogFile {
    path: PathBuf,
    file: Option<File>,
    size: u64,
    max_bytes: u64,
    keep: u32,
}

impl LogFile {
    pub fn open(path: PathBuf, max_bytes: u64, keep: u32) -> std::io::Result<LogFile> {
        let file = OpenOptions::new().create(true).append(true).open(&path)?;
        let size = file.metadata()?.len();
        Ok(LogFile {
            path,
            file: Some(file),
            size,
            max_bytes,
            keep,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn rotate(&mut self) -> std::io::Result<()> {
        self.file = None;
        for (from, to) in rotation_plan(&self.path, self.keep) {
            match std::fs::rename(&from, &to) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        if self.keep == 0 {
            std::fs::remove_file(&self.path).ok();
        }
        self.file = Some(
            OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.path)?,
        );
        self.size = 0;
        Ok(())
    }

    /// Append `data`, rotating first when it would grow past the limit.
    pub fn write(&mut self, data: &[u8]) -> std::io::Result<()> {
        if needs_rotation(self.size, data.len() as u64, self.max_bytes) || self.file.is_none() {
            self.rotate()?;
        }
        if let Some(f) = self.file.as_mut() {
            f.write_all(data)?;
            self.size += data.len() as u64;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotation_decision() {
        assert!(!needs_rotation(0, 10_000, 100));
        assert!(!needs_rotation(90, 10, 100));
        assert!(needs_rotation(91, 10, 100));
        assert!(!needs_rotation(u64::MAX - 1, 0, u64::MAX));
        assert!(needs_rotation(u64::MAX, 1, u64::MAX));
    }

    #[test]
    fn plan_moves_oldest_first() {
        let p = rotation_plan(Path::new("/s/log/agent.log"), 3);
        let s: Vec<_> = p
            .iter()
            .map(|(a, b)| format!("{} > {}", a.display(), b.display()))
            .collect();
        assert_eq!(
            s,
            [
                "/s/log/agent.log.2 > /s/log/agent.log.3",
                "/s/log/agent.log.1 > /s/log/agent.log.2",
                "/s/log/agent.log > /s/log/agent.log.1",
            ]
        );
        assert_eq!(rotation_plan(Path::new("x.log"), 0), []);
    }

    #[test]
    fn file_rotates_by_size_and_keeps_n() {
        let dir = tempfile::tempdir().unwrap();
        let path = log_path(dir.path(), "svc");
        let mut f = LogFile::open(path.clone(), 10, 2).unwrap();
        for chunk in [
            &b"aaaaaa"[..],
            b"bbbbbb",
            b"cccccc",
            b"dd",
            b"eeeeeeeeeeeeeee",
        ] {
            f.write(chunk).unwrap();
        }
        let read = |p: &Path| std::fs::read_to_string(p).unwrap();
        assert_eq!(read(&path), "eeeeeeeeeeeeeee");
        assert_eq!(read(&dir.path().join("svc.log.1")), "ccccccdd");
        assert_eq!(read(&dir.path().join("svc.log.2")), "bbbbbb");
        assert!(!dir.path().join("svc.log.3").exists());
        let n = std::fs::read_dir(dir.path()).unwrap().count();
        assert_eq!(n, 3);
    }
}
