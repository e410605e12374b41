//! What KeelOS takes from Debian, stock and unmodified: the pinned versions
//! (`image/versions.env`, the one place they are written), and a cache of downloaded and
//! extracted packages (`apt-get download`, `dpkg-deb -x`), kept between builds.
//!
//! Writes only inside the cache directory; a package is extracted into a temporary directory
//! and renamed into place, so an interrupted build never leaves a half-extracted package that a
//! later build would trust.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

/// A download or extraction failed.
#[derive(Debug, thiserror::Error)]
pub enum DebianError {
    #[error("{file}: {why}")]
    Versions { file: String, why: String },
    #[error("cannot use the package cache {dir}: {source} (give another with --cache DIR or KEEL_CACHE)")]
    Cache {
        dir: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot run {tool}: {source} (is it installed? ci/install-deps installs what the build needs)")]
    Spawn {
        tool: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "apt-get download {spec} failed: {stderr}\n(is the version still in the archive? run \
         apt-get update; to move to another version, change image/versions.env)"
    )]
    Download { spec: String, stderr: String },
    #[error("dpkg-deb -x {deb} failed: {stderr}")]
    Extract { deb: String, stderr: String },
}

/// The pinned inputs of an image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Versions {
    /// e.g. linux-image-6.1.0-47-amd64
    pub kernel_package: String,
    /// The Debian package version, e.g. 6.1.170-3
    pub kernel_version: String,
    /// `uname -r` of that kernel: the directory under /lib/modules
    pub kernel_release: String,
    pub containerd_version: String,
    pub runc_version: String,
    /// containernetworking-plugins (the CNI plugins in /usr/lib/cni).
    pub cni_plugins_version: String,
    /// util-linux's `mount` (mount and umount: kubelet mounts pod volumes with them).
    pub mount_version: String,
}

impl Versions {
    /// Parse `KEY=VALUE` lines (`#` comments). Every key must be present.
    pub fn parse(text: &str, file: &str) -> Result<Self, DebianError> {
        let mut m = BTreeMap::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (k, v) = line.split_once('=').ok_or_else(|| DebianError::Versions {
                file: file.to_string(),
                why: format!("line {}: expected KEY=VALUE, got {line:?}", n + 1),
            })?;
            m.insert(k.trim().to_string(), v.trim().trim_matches('"').to_string());
        }
        let mut get = |k: &str| {
            m.remove(k)
                .filter(|v| !v.is_empty())
                .ok_or_else(|| DebianError::Versions {
                    file: file.to_string(),
                    why: format!("{k} is missing or empty"),
                })
        };
        Ok(Versions {
            kernel_package: get("KERNEL_PACKAGE")?,
            kernel_version: get("KERNEL_VERSION")?,
            kernel_release: get("KERNEL_RELEASE")?,
            containerd_version: get("CONTAINERD_VERSION")?,
            runc_version: get("RUNC_VERSION")?,
            cni_plugins_version: get("CNI_PLUGINS_VERSION")?,
            mount_version: get("MOUNT_VERSION")?,
        })
    }

    pub fn load(path: &Path) -> Result<Self, DebianError> {
        let text = std::fs::read_to_string(path).map_err(|e| DebianError::Versions {
            file: path.display().to_string(),
            why: format!("cannot read it: {e}"),
        })?;
        Self::parse(&text, &path.display().to_string())
    }
}

/// Downloaded `.deb` files and their extracted trees, under one directory.
#[derive(Debug, Clone)]
pub struct PackageCache {
    pub dir: PathBuf,
}

fn safe(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || ".-+_".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect()
}

impl PackageCache {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        PackageCache { dir: dir.into() }
    }

    fn cache_err(&self, e: std::io::Error) -> DebianError {
        DebianError::Cache {
            dir: self.dir.display().to_string(),
            source: e,
        }
    }

    fn tmp(&self, what: &str) -> PathBuf {
        static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.dir
            .join(format!(".tmp-{what}-{}-{n}", std::process::id()))
    }

    /// The `.deb` of `package` at `version`, downloaded once.
    pub fn deb(&self, package: &str, version: &str) -> Result<PathBuf, DebianError> {
        let debs = self.dir.join("debs");
        std::fs::create_dir_all(&debs).map_err(|e| self.cache_err(e))?;
        let final_path = debs.join(format!("{}_{}.deb", safe(package), safe(version)));
        if final_path.exists() {
            return Ok(final_path);
        }
        let tmp = self.tmp("dl");
        std::fs::create_dir_all(&tmp).map_err(|e| self.cache_err(e))?;
        let spec = format!("{package}={version}");
        let out = Command::new("apt-get")
            .args(["-q", "-o", "APT::Sandbox::User=root", "download", &spec])
            .current_dir(&tmp)
            .output()
            .map_err(|e| DebianError::Spawn {
                tool: "apt-get",
                source: e,
            });
        let result = out.and_then(|out| {
            let deb = std::fs::read_dir(&tmp)
                .map_err(|e| self.cache_err(e))?
                .filter_map(Result::ok)
                .map(|e| e.path())
                .find(|p| p.extension().is_some_and(|x| x == "deb"));
            match deb {
                Some(deb) if out.status.success() => {
                    std::fs::rename(&deb, &final_path).map_err(|e| self.cache_err(e))?;
                    Ok(final_path.clone())
                }
                _ => Err(DebianError::Download {
                    spec: spec.clone(),
                    stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
                }),
            }
        });
        let _ = std::fs::remove_dir_all(&tmp);
        result
    }

    /// The extracted tree of `package` at `version` (downloaded and extracted once).
    pub fn extracted(&self, package: &str, version: &str) -> Result<PathBuf, DebianError> {
        let root = self
            .dir
            .join("trees")
            .join(format!("{}_{}", safe(package), safe(version)));
        if root.is_dir() {
            return Ok(root);
        }
        let deb = self.deb(package, version)?;
        std::fs::create_dir_all(self.dir.join("trees")).map_err(|e| self.cache_err(e))?;
        let tmp = self.tmp("x");
        let out = Command::new("dpkg-deb")
            .arg("-x")
            .arg(&deb)
            .arg(&tmp)
            .output()
            .map_err(|e| DebianError::Spawn {
                tool: "dpkg-deb",
                source: e,
            })?;
        if !out.status.success() {
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(DebianError::Extract {
                deb: deb.display().to_string(),
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            });
        }
        match std::fs::rename(&tmp, &root) {
            Ok(()) => Ok(root),
            // another build extracted the same package meanwhile: use theirs
            Err(_) if root.is_dir() => {
                let _ = std::fs::remove_dir_all(&tmp);
                Ok(root)
            }
            Err(e) => Err(self.cache_err(e)),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::panic)]
mod tests {
    use super::*;

    #[test]
    fn versions_parse_and_name_what_is_missing() {
        let v = Versions::parse(
            "# pins\nKERNEL_PACKAGE=linux-image-6.1.0-47-amd64\nKERNEL_VERSION=6.1.170-3\n\
             KERNEL_RELEASE=6.1.0-47-amd64\nCONTAINERD_VERSION=\"1.6.20~ds1-1+deb12u3\"\n\
             RUNC_VERSION=1.1.5+ds1-1+deb12u1\nCNI_PLUGINS_VERSION=1.1.1+ds1-3+b5\n\
             MOUNT_VERSION=2.38.1-5+deb12u3\n",
            "v.env",
        )
        .unwrap();
        assert_eq!(v.containerd_version, "1.6.20~ds1-1+deb12u3");
        assert_eq!(v.cni_plugins_version, "1.1.1+ds1-3+b5");
        let e = Versions::parse("KERNEL_PACKAGE=x\n", "v.env").unwrap_err();
        assert!(e.to_string().contains("KERNEL_VERSION is missing"), "{e}");
        let e = Versions::parse("nonsense\n", "v.env").unwrap_err();
        assert!(e.to_string().contains("line 1"), "{e}");
    }

    #[test]
    fn the_repository_pins_parse() {
        let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("image/versions.env");
        let v = Versions::load(&p).unwrap();
        assert!(v.kernel_package.ends_with(&v.kernel_release), "{v:?}");
        assert!(!v.cni_plugins_version.is_empty(), "{v:?}");
    }

    #[test]
    fn a_version_not_in_the_archive_is_a_clear_error() {
        let d = tempfile::tempdir().unwrap();
        let c = PackageCache::new(d.path());
        let e = c.deb("runc", "0.0.0-keelos-does-not-exist").unwrap_err();
        assert!(
            e.to_string().contains("runc=0.0.0-keelos-does-not-exist"),
            "{e}"
        );
        // nothing half-made is left in the cache
        let left: Vec<_> = std::fs::read_dir(d.path().join("debs")).unwrap().collect();
        assert!(left.is_empty());
    }
}
