//! Building KeelOS: release artifacts (kernel, initramfs, root image) and bootable disk images,
//! driven by `keel-image build`.
//!
//! This module owns the image pipeline: pinned Debian inputs ([`debian`]), kernel module
//! resolution ([`modules`]), the newc writer ([`cpio`]), reproducible file trees ([`tree`]), the
//! audit that keeps shells and interpreters out ([`audit`]), the release ([`release`]), the boot
//! stage (a UKI, [`uki`], on the ESP, [`esp`]), the disk ([`diskimg`]) and OCI images of a
//! single program, such as the pod sandbox image ([`oci`]). It never writes outside the output paths and the package cache it is
//! given, and it never modifies what it takes from Debian.

pub mod audit;
pub mod bootfiles;
pub mod cpio;
pub mod debian;
pub mod diskimg;
pub mod elf;
pub mod esp;
pub mod modules;
pub mod oci;
pub mod release;
pub mod stub;
pub mod tree;
pub mod uki;
pub mod verity_file;

/// Building an image failed.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error(transparent)]
    Debian(#[from] debian::DebianError),
    #[error(transparent)]
    Modules(#[from] modules::ModuleError),
    #[error(transparent)]
    Tree(#[from] tree::TreeError),
    #[error(transparent)]
    Audit(#[from] audit::AuditError),
    #[error("{path}: {source}")]
    Elf {
        path: String,
        #[source]
        source: elf::ElfError,
    },
    #[error("{path}: {source}")]
    Pe {
        path: String,
        #[source]
        source: uki::PeError,
    },
    #[error("{program} needs {lib}, which is in none of the build host's library directories; install the package that has it")]
    MissingLibrary { lib: String, program: String },
    #[error("{what} is missing: no file at {path}")]
    MissingInput { what: String, path: String },
    #[error(
        "{what} is {len} bytes but its partition holds {room}; build a larger disk (--root-size)"
    )]
    TooLarge { what: String, len: u64, room: u64 },
    #[error("installing {what} failed: {why}")]
    Install { what: String, why: String },
    #[error(
        "cannot tell the kernel release (uname -r) of {package}: {why}; give a kernel image \
         package (linux-image-<release>), not a meta-package"
    )]
    KernelRelease { package: String, why: String },
    #[error("{0} already exists; remove it or choose another output path")]
    Exists(String),
    #[error("{file} line {line}: {why}")]
    List {
        file: String,
        line: usize,
        why: String,
    },
    #[error("cannot run {tool}: {source} (ci/install-deps installs the build's tools)")]
    Spawn {
        tool: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("{tool} failed ({status}): {stderr}")]
    Tool {
        tool: &'static str,
        status: String,
        stderr: String,
    },
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Disk(#[from] crate::disk::DiskError),
    #[error(transparent)]
    Block(#[from] crate::block::BlockError),
    #[error(transparent)]
    Flags(#[from] crate::bootctl::store::StoreError),
}
