//! A file tree described in memory before it is written anywhere: what goes into the
//! initramfs and into the root image.
//!
//! Paths are kept sorted, so an archive or a staged directory made from the same tree is the
//! same every time. Modes are set explicitly (never from the umask or the source file), owners
//! are root, times are left to the writers (which fix them at 0). Writing happens only through
//! [`Tree::materialize`] (inside the directory given) and [`Tree::write_cpio`].

use super::cpio::{self, CpioWriter, Header};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

/// Where a file's bytes come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Content {
    /// A file on the build host, read when the tree is written.
    Host(PathBuf),
    /// Bytes made by the build.
    Bytes(Vec<u8>),
}

/// One entry of the tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Node {
    Dir,
    File { content: Content, mode: u32 },
    Symlink(String),
    CharDevice { major: u32, minor: u32, mode: u32 },
}

/// A tree could not be described or written.
#[derive(Debug, thiserror::Error)]
pub enum TreeError {
    #[error("image path {0:?} is not a clean absolute path (no empty, '.' or '..' components)")]
    BadPath(String),
    #[error("image path /{path} is already a {existing}; cannot add it as a {new}")]
    Conflict {
        path: String,
        existing: &'static str,
        new: &'static str,
    },
    #[error("cannot read {what} for /{path}: {source}")]
    Read {
        path: String,
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write {what}: {source}")]
    Write {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

fn kind(n: &Node) -> &'static str {
    match n {
        Node::Dir => "directory",
        Node::File { .. } => "file",
        Node::Symlink(_) => "symlink",
        Node::CharDevice { .. } => "device node",
    }
}

/// A sorted file tree; keys are paths relative to the root ("usr/bin/x").
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Tree {
    entries: BTreeMap<String, Node>,
}

/// Turn "/usr/bin/x" or "usr/bin/x" into "usr/bin/x", refusing anything that could escape.
pub fn clean(path: &str) -> Result<String, TreeError> {
    let bad = || TreeError::BadPath(path.to_string());
    let rel = path.strip_prefix('/').unwrap_or(path);
    if rel.is_empty() {
        return Err(bad());
    }
    for c in rel.split('/') {
        if c.is_empty() || c == "." || c == ".." || c.contains('\0') {
            return Err(bad());
        }
    }
    Ok(rel.to_string())
}

impl Tree {
    pub fn new() -> Self {
        Tree::default()
    }

    pub fn entries(&self) -> impl Iterator<Item = (&str, &Node)> {
        self.entries.iter().map(|(k, v)| (k.as_str(), v))
    }

    pub fn get(&self, path: &str) -> Option<&Node> {
        clean(path).ok().and_then(|p| self.entries.get(&p))
    }

    fn parents(&mut self, rel: &str) -> Result<(), TreeError> {
        let mut at = 0;
        while let Some(i) = rel[at..].find('/') {
            let dir = &rel[..at + i];
            match self.entries.get(dir) {
                None => {
                    self.entries.insert(dir.to_string(), Node::Dir);
                }
                Some(Node::Dir) => {}
                Some(other) => {
                    return Err(TreeError::Conflict {
                        path: dir.to_string(),
                        existing: kind(other),
                        new: "directory",
                    })
                }
            }
            at += i + 1;
        }
        Ok(())
    }

    /// Add `node` at `path`, creating parent directories. Adding the same node twice is fine;
    /// replacing a different one needs [`Tree::replace`].
    pub fn add(&mut self, path: &str, node: Node) -> Result<(), TreeError> {
        let rel = clean(path)?;
        self.parents(&rel)?;
        match self.entries.get(&rel) {
            Some(existing) if *existing != node => Err(TreeError::Conflict {
                path: rel,
                existing: kind(existing),
                new: kind(&node),
            }),
            _ => {
                self.entries.insert(rel, node);
                Ok(())
            }
        }
    }

    /// Put `node` at `path` whatever was there (a directory keeps its contents only if `node`
    /// is a directory too).
    pub fn replace(&mut self, path: &str, node: Node) -> Result<(), TreeError> {
        let rel = clean(path)?;
        self.parents(&rel)?;
        if !matches!(node, Node::Dir) {
            let prefix = format!("{rel}/");
            self.entries.retain(|k, _| !k.starts_with(&prefix));
        }
        self.entries.insert(rel, node);
        Ok(())
    }

    pub fn dir(&mut self, path: &str) -> Result<(), TreeError> {
        self.add(path, Node::Dir)
    }

    pub fn host_file(
        &mut self,
        path: &str,
        src: impl Into<PathBuf>,
        mode: u32,
    ) -> Result<(), TreeError> {
        self.add(
            path,
            Node::File {
                content: Content::Host(src.into()),
                mode,
            },
        )
    }

    pub fn bytes(
        &mut self,
        path: &str,
        data: impl Into<Vec<u8>>,
        mode: u32,
    ) -> Result<(), TreeError> {
        self.add(
            path,
            Node::File {
                content: Content::Bytes(data.into()),
                mode,
            },
        )
    }

    pub fn symlink(&mut self, path: &str, target: &str) -> Result<(), TreeError> {
        self.add(path, Node::Symlink(target.to_string()))
    }

    /// Read a file entry's bytes (from the host when it is a host file).
    pub fn read(&self, path: &str, content: &Content) -> Result<Vec<u8>, TreeError> {
        match content {
            Content::Bytes(b) => Ok(b.clone()),
            Content::Host(src) => std::fs::read(src).map_err(|e| TreeError::Read {
                path: path.to_string(),
                what: src.display().to_string(),
                source: e,
            }),
        }
    }

    /// Write the tree under `dir` (which must exist and be empty), with explicit modes.
    pub fn materialize(&self, dir: &Path) -> Result<(), TreeError> {
        use std::os::unix::fs::PermissionsExt;
        let werr = |what: &Path, e| TreeError::Write {
            what: what.display().to_string(),
            source: e,
        };
        for (rel, node) in &self.entries {
            let p = dir.join(rel);
            match node {
                Node::Dir => std::fs::create_dir(&p).map_err(|e| werr(&p, e))?,
                Node::File { content, mode } => {
                    match content {
                        Content::Host(src) => {
                            std::fs::copy(src, &p).map_err(|e| TreeError::Read {
                                path: rel.clone(),
                                what: src.display().to_string(),
                                source: e,
                            })?;
                        }
                        Content::Bytes(b) => std::fs::write(&p, b).map_err(|e| werr(&p, e))?,
                    }
                    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(*mode))
                        .map_err(|e| werr(&p, e))?;
                }
                Node::Symlink(t) => std::os::unix::fs::symlink(t, &p).map_err(|e| werr(&p, e))?,
                Node::CharDevice { major, minor, mode } => {
                    let dev = nix::sys::stat::makedev(u64::from(*major), u64::from(*minor));
                    nix::sys::stat::mknod(
                        &p,
                        nix::sys::stat::SFlag::S_IFCHR,
                        nix::sys::stat::Mode::from_bits_truncate(*mode),
                        dev,
                    )
                    .map_err(|e| werr(&p, e.into()))?;
                }
            }
            if matches!(node, Node::Dir) {
                std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755))
                    .map_err(|e| werr(&p, e))?;
            }
        }
        Ok(())
    }

    /// Write the tree as a newc cpio archive (parents before children, as the kernel needs).
    pub fn write_cpio<W: Write>(&self, w: W) -> Result<W, TreeError> {
        let werr = |e| TreeError::Write {
            what: "the cpio archive".to_string(),
            source: e,
        };
        let mut c = CpioWriter::new(w);
        for (rel, node) in &self.entries {
            let (h, data) = match node {
                Node::Dir => (hdr(cpio::S_IFDIR | 0o755, 2, 0, 0), Vec::new()),
                Node::File { content, mode } => (
                    hdr(cpio::S_IFREG | (mode & 0o7777), 1, 0, 0),
                    self.read(rel, content)?,
                ),
                Node::Symlink(t) => (hdr(cpio::S_IFLNK | 0o777, 1, 0, 0), t.as_bytes().to_vec()),
                Node::CharDevice { major, minor, mode } => (
                    hdr(cpio::S_IFCHR | (mode & 0o7777), 1, *major, *minor),
                    Vec::new(),
                ),
            };
            c.entry(rel, h, &data).map_err(werr)?;
        }
        c.finish().map_err(werr)
    }
}

fn hdr(mode: u32, nlink: u32, rdev_major: u32, rdev_minor: u32) -> Header {
    Header {
        mode,
        nlink,
        rdev_major,
        rdev_minor,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::panic)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_cleaned_and_escapes_refused() {
        assert_eq!(clean("/usr/bin/x").unwrap(), "usr/bin/x");
        assert_eq!(clean("etc").unwrap(), "etc");
        for bad in ["", "/", "/a/../b", "a//b", "./a", "a/", "/.."] {
            assert!(clean(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn parents_are_made_and_conflicts_refused() {
        let mut t = Tree::new();
        t.bytes("/usr/bin/a", b"x".to_vec(), 0o755).unwrap();
        assert_eq!(t.get("/usr"), Some(&Node::Dir));
        assert_eq!(t.get("usr/bin"), Some(&Node::Dir));
        t.bytes("/usr/bin/a", b"x".to_vec(), 0o755).unwrap();
        assert!(matches!(
            t.bytes("/usr/bin/a", b"y".to_vec(), 0o755),
            Err(TreeError::Conflict { .. })
        ));
        assert!(matches!(
            t.bytes("/usr/bin/a/b", b"y".to_vec(), 0o755),
            Err(TreeError::Conflict { .. })
        ));
        t.replace("/usr/bin", Node::Symlink("x".into())).unwrap();
        assert_eq!(t.get("/usr/bin/a"), None);
    }

    #[test]
    fn materialize_then_archive_round_trip() {
        let mut t = Tree::new();
        t.bytes("/etc/os-release", b"ID=keelos\n".to_vec(), 0o644)
            .unwrap();
        t.bytes("/sbin/x", b"\x7fELF".to_vec(), 0o755).unwrap();
        t.symlink("/bin", "sbin").unwrap();
        let d = tempfile::tempdir().unwrap();
        t.materialize(d.path()).unwrap();
        use std::os::unix::fs::PermissionsExt;
        let m = std::fs::metadata(d.path().join("sbin/x")).unwrap();
        assert_eq!(m.permissions().mode() & 0o7777, 0o755);
        assert_eq!(
            std::fs::read_link(d.path().join("bin")).unwrap(),
            PathBuf::from("sbin")
        );
        let a = t.write_cpio(Vec::new()).unwrap();
        assert_eq!(a, t.write_cpio(Vec::new()).unwrap());
    }
}
