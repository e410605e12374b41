//! Kernel modules from the manifest the image build writes: one module file per line, in
//! dependency order (each after the modules it depends on), `#` starts a comment, relative paths
//! are relative to the manifest's directory. Parsing is pure; [`load_all`] calls finit_module(2).

use std::path::{Path, PathBuf};

/// The default manifest location in the initramfs.
pub const MANIFEST: &str = "/lib/modules/keel-modules.list";

/// A manifest line that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ManifestError {
    #[error("module manifest line {line}: {path:?} is listed twice (first on line {first})")]
    Duplicate {
        line: usize,
        first: usize,
        path: String,
    },
    #[error("module manifest line {line}: {path:?} is not a kernel module (.ko, .ko.xz, .ko.zst, .ko.gz)")]
    NotAModule { line: usize, path: String },
}

/// Parse a manifest into the module files to load, in order, and every line that cannot be
/// used (those are left out; the rest still load).
pub fn parse_manifest(text: &str, dir: &Path) -> (Vec<PathBuf>, Vec<ManifestError>) {
    let mut out: Vec<(PathBuf, usize)> = Vec::new();
    let mut errs = Vec::new();
    for (n, raw) in text.lines().enumerate() {
        let line = n + 1;
        let entry = raw.split('#').next().unwrap_or("").trim();
        if entry.is_empty() {
            continue;
        }
        let is_module = [".ko", ".ko.xz", ".ko.zst", ".ko.gz"]
            .iter()
            .any(|ext| entry.ends_with(ext));
        if !is_module {
            errs.push(ManifestError::NotAModule {
                line,
                path: entry.to_string(),
            });
            continue;
        }
        let path = if entry.starts_with('/') {
            PathBuf::from(entry)
        } else {
            dir.join(entry)
        };
        if let Some((_, first)) = out.iter().find(|(p, _)| *p == path) {
            errs.push(ManifestError::Duplicate {
                line,
                first: *first,
                path: entry.to_string(),
            });
            continue;
        }
        out.push((path, line));
    }
    (out.into_iter().map(|(p, _)| p).collect(), errs)
}

/// What happened to one module.
#[derive(Debug, PartialEq, Eq)]
pub enum ModuleOutcome {
    Loaded,
    /// Already loaded or built into the kernel.
    AlreadyThere,
    Failed(String),
}

/// The finit_module(2) flag for a compressed module file (Linux 5.17+).
const MODULE_INIT_COMPRESSED_FILE: libc::c_int = 4;

/// A module's name from its file name (`i6300esb.ko.xz` -> `i6300esb`).
pub fn module_name(path: &Path) -> String {
    let f = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    f.split(".ko").next().unwrap_or("").to_string()
}

/// Load one module file with the given parameters (`name=value` words, space separated).
pub fn load_one(path: &Path, params: &str) -> ModuleOutcome {
    use std::os::fd::AsRawFd;
    let f = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) => return ModuleOutcome::Failed(format!("cannot open {}: {e}", path.display())),
    };
    let compressed = path
        .extension()
        .is_some_and(|e| e == "xz" || e == "zst" || e == "gz");
    let flags = if compressed {
        MODULE_INIT_COMPRESSED_FILE
    } else {
        0
    };
    let Ok(params) = std::ffi::CString::new(params) else {
        return ModuleOutcome::Failed(format!(
            "the parameters for {} hold a NUL byte",
            path.display()
        ));
    };
    // SAFETY: the fd is open for the duration of the call and the parameter string is a valid
    // NUL-terminated string that outlives it.
    let r = unsafe {
        libc::syscall(
            libc::SYS_finit_module,
            f.as_raw_fd(),
            params.as_ptr(),
            flags,
        )
    };
    if r == 0 {
        return ModuleOutcome::Loaded;
    }
    let e = std::io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EEXIST) {
        ModuleOutcome::AlreadyThere
    } else {
        ModuleOutcome::Failed(format!("finit_module {}: {e}", path.display()))
    }
}

/// Load every module of the manifest at `manifest`, in order, with the parameters the kernel
/// command line `cmdline` gives each (`i6300esb.nowayout=1`), logging each outcome through
/// `log`. A failure does not stop the others: a missing driver shows up later as a missing disk,
/// with this log to explain it.
pub fn load_all(manifest: &Path, cmdline: &str, log: &mut dyn FnMut(String)) {
    let text = match std::fs::read_to_string(manifest) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            log(format!(
                "no module manifest at {}; loading no modules",
                manifest.display()
            ));
            return;
        }
        Err(e) => {
            log(format!(
                "cannot read module manifest {}: {e}",
                manifest.display()
            ));
            return;
        }
    };
    let dir = manifest.parent().unwrap_or(Path::new("/"));
    let (paths, errs) = parse_manifest(&text, dir);
    for e in errs {
        log(e.to_string());
    }
    for p in paths {
        let params = super::cmdline::module_params(cmdline, &module_name(&p));
        match load_one(&p, &params) {
            ModuleOutcome::Loaded if params.is_empty() => {
                log(format!("module {} loaded", p.display()))
            }
            ModuleOutcome::Loaded => log(format!("module {} loaded ({params})", p.display())),
            ModuleOutcome::AlreadyThere => {
                log(format!("module {} already loaded or built in", p.display()))
            }
            ModuleOutcome::Failed(e) => log(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn module_names_from_file_names() {
        for (f, n) in [
            ("/x/i6300esb.ko", "i6300esb"),
            ("virtio_blk.ko.xz", "virtio_blk"),
            ("a/b/crc32c-generic.ko.zst", "crc32c-generic"),
        ] {
            assert_eq!(module_name(Path::new(f)), n);
        }
    }

    #[test]
    fn manifest_order_is_kept_and_paths_resolved() {
        let text = "# dependency order\n\
                    kernel/drivers/virtio/virtio.ko\n\
                    kernel/drivers/virtio/virtio_ring.ko   # needed by virtio_blk\n\
                    \n\
                    /lib/modules/x/kernel/drivers/block/virtio_blk.ko.xz\n\
                    kernel/drivers/watchdog/watchdog.ko\n\
                    kernel/drivers/watchdog/i6300esb.ko\n";
        let (got, errs) = parse_manifest(text, Path::new("/lib/modules/6.1.0"));
        assert_eq!(errs, []);
        let got: Vec<_> = got
            .iter()
            .map(|p| p.to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            got,
            [
                "/lib/modules/6.1.0/kernel/drivers/virtio/virtio.ko",
                "/lib/modules/6.1.0/kernel/drivers/virtio/virtio_ring.ko",
                "/lib/modules/x/kernel/drivers/block/virtio_blk.ko.xz",
                "/lib/modules/6.1.0/kernel/drivers/watchdog/watchdog.ko",
                "/lib/modules/6.1.0/kernel/drivers/watchdog/i6300esb.ko",
            ]
        );
    }

    #[test]
    fn bad_lines_are_all_reported() {
        let text = "a.ko\nb.txt\na.ko\nc.ko.zst\n";
        let (paths, errs) = parse_manifest(text, Path::new("/m"));
        assert_eq!(
            paths,
            [PathBuf::from("/m/a.ko"), PathBuf::from("/m/c.ko.zst")]
        );
        assert_eq!(
            errs,
            [
                ManifestError::NotAModule {
                    line: 2,
                    path: "b.txt".into()
                },
                ManifestError::Duplicate {
                    line: 3,
                    first: 1,
                    path: "a.ko".into()
                }
            ]
        );
    }

    #[test]
    fn a_missing_module_file_is_a_reported_failure() {
        match load_one(Path::new("/nonexistent/virtio.ko"), "") {
            ModuleOutcome::Failed(e) => assert!(e.contains("/nonexistent/virtio.ko"), "{e}"),
            other => panic!("expected a failure, got {other:?}"),
        }
    }
}
