//! Install checkpoints: enough to resume an interrupted install of the same image.
//!
//! A checkpoint is saved only after the flush that made its `image_offset` durable, through a
//! store whose `put` is atomic. In production the store is a file on STATE (write a temporary
//! file, fsync it, rename it over the old one, fsync the directory); tests use [`MemStore`].

use crate::bootctl::Slot;
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::PathBuf;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    pub target: Slot,
    /// Expected SHA-256 of the image (hex).
    pub sha256: String,
    /// Identity of the input the bytes come from (URL or path, and its size).
    pub source: String,
    /// Image bytes durably written to the target, from its start.
    pub image_offset: u64,
    /// Where in the input to continue (a zstd frame boundary for a compressed image).
    pub input_offset: u64,
    pub compressed: bool,
}

impl Checkpoint {
    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }
    pub fn from_bytes(b: &[u8]) -> Option<Checkpoint> {
        serde_json::from_slice(b).ok()
    }
}

/// Atomic storage for one checkpoint.
pub trait CheckpointStore {
    fn get(&self) -> Result<Option<Vec<u8>>, String>;
    /// Replace the stored checkpoint, atomically: afterwards a reader sees the old one or this.
    fn put(&mut self, bytes: &[u8]) -> Result<(), String>;
    fn clear(&mut self) -> Result<(), String>;
}

/// A checkpoint file, replaced atomically.
#[derive(Debug, Clone)]
pub struct FileStore {
    path: PathBuf,
}

impl FileStore {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        FileStore { path: path.into() }
    }

    /// The directory holding the file ("." for a bare file name).
    fn dir(&self) -> &std::path::Path {
        match self.path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => std::path::Path::new("."),
        }
    }

    fn sync_dir(&self) -> Result<(), String> {
        let dir = self.dir();
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| format!("fsync {}: {e}", dir.display()))
    }
}

impl CheckpointStore for FileStore {
    fn get(&self) -> Result<Option<Vec<u8>>, String> {
        match std::fs::read(&self.path) {
            Ok(b) => Ok(Some(b)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(format!("read checkpoint {}: {e}", self.path.display())),
        }
    }
    fn put(&mut self, bytes: &[u8]) -> Result<(), String> {
        let tmp = self.path.with_extension("tmp");
        let err = |e: std::io::Error| format!("write checkpoint {}: {e}", tmp.display());
        std::fs::create_dir_all(self.dir()).map_err(err)?;
        let mut f = std::fs::File::create(&tmp).map_err(err)?;
        f.write_all(bytes).map_err(err)?;
        f.sync_all().map_err(err)?;
        std::fs::rename(&tmp, &self.path).map_err(err)?;
        self.sync_dir()
    }
    fn clear(&mut self) -> Result<(), String> {
        match std::fs::remove_file(&self.path) {
            Ok(()) => self.sync_dir(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(format!("remove checkpoint {}: {e}", self.path.display())),
        }
    }
}

/// An in-memory store for tests. Its operations are atomic, like the file's; `fail_puts` makes
/// them fail, to test that a store failure loses nothing.
#[derive(Debug, Clone, Default)]
pub struct MemStore {
    pub value: Option<Vec<u8>>,
    pub fail_puts: bool,
}

impl CheckpointStore for MemStore {
    fn get(&self) -> Result<Option<Vec<u8>>, String> {
        Ok(self.value.clone())
    }
    fn put(&mut self, bytes: &[u8]) -> Result<(), String> {
        if self.fail_puts {
            return Err("injected checkpoint store failure".into());
        }
        self.value = Some(bytes.to_vec());
        Ok(())
    }
    fn clear(&mut self) -> Result<(), String> {
        if self.fail_puts {
            return Err("injected checkpoint store failure".into());
        }
        self.value = None;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_store_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = FileStore::new(dir.path().join("update/checkpoint.json"));
        assert_eq!(s.get().unwrap(), None);
        let c = Checkpoint {
            target: Slot::B,
            sha256: "ab".repeat(32),
            source: "x".into(),
            image_offset: 4096,
            input_offset: 1000,
            compressed: true,
        };
        s.put(&c.to_bytes()).unwrap();
        let got = Checkpoint::from_bytes(&s.get().unwrap().unwrap()).unwrap();
        assert_eq!(got, c);
        s.clear().unwrap();
        assert_eq!(s.get().unwrap(), None);
        s.clear().unwrap();
    }
}
