//! One KeelOS release: the kernel, the initramfs, and the root image, built from the pinned
//! Debian packages and this repository's binaries.
//!
//! Writes only inside the output directory it is given (and the package cache); an existing
//! output directory's files of the same names are replaced, nothing else there is touched.
//!
//! Beside the artifacts go `build.json` (the build record: what was built from what, with the
//! build host's paths; for tools and tests, never for nodes) and `release.json`, the release
//! manifest nodes check ([`crate::update::manifest`]), signed into `release.json.minisig` when a
//! signing key is given. The minisign public keys the release trusts go into its root image
//! under `/etc/keel/trusted-keys/<KEY ID>.pub`, so the keys travel with the slot and an update
//! can rotate them.

use super::audit::{self, LIB_DIRS};
use super::bootfiles::{BootFiles, SLOT_BOOT_RECORD, SLOT_INITRAMFS, SLOT_KERNEL};
use super::debian::{PackageCache, Versions};
use super::modules::{self, ModuleIndex, MANIFEST_PATH};
use super::stub::{self, Stub};
use super::tree::{Content, Node, Tree};
use super::ImageError;
use crate::update::manifest::{
    self, Artifact, KeyId, Manifest, ManifestError, Policy, TrustedKey, TrustedKeys,
    TRUSTED_KEYS_DIR,
};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::process::Command;

/// A deliberately broken release, for the rollback tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Broken {
    /// keel-agent is a program that exits with status 1 at once: the node never becomes healthy.
    AgentExits,
    /// The slot's keel-init exits at once; as PID 1 that is a kernel panic.
    InitPanics,
    /// The slot's keel-init sleeps forever: only the watchdog ends the boot.
    InitHangs,
    /// The root image's SquashFS superblock is destroyed: the slot does not mount.
    CorruptSquashfs,
    /// The slot's /boot/vmlinuz is 1 MiB of a fixed pattern, not a bzImage, and keel-boot.json
    /// describes those bytes truthfully (as a release built with a bad kernel would):
    /// kexec_file_load refuses it.
    KernelRefused,
    /// The slot's /boot/vmlinuz is the stock kernel with its Authenticode signature cut off
    /// (keel-boot.json describes it truthfully): a locked-down boot stage's kexec_file_load
    /// refuses it, one that is not locked down accepts it.
    KernelUnsigned,
    /// The slot's initramfs lacks the disk driver (virtio_blk, virtio_pci and the modules that
    /// need them): the slot's keel-init never finds its disk.
    InitramfsNoDisk,
    /// The slot's initramfs has /init = a program that hangs before anything can pet the
    /// watchdog.
    InitramfsHangs,
    /// The slot's initramfs carries the stock virtio_net module with its signature cut off (the
    /// other modules are stock): the slot kernel, locked down, refuses to load it, so the slot
    /// boots without its network.
    ModuleUnsigned,
    /// /usr/bin/kubelet is a program that exits with status 1 at once (whether or not
    /// `--kubelet` gave one): a node with a `kubernetes` section never becomes healthy.
    KubeletExits,
}

/// The module [`Broken::ModuleUnsigned`] carries without its signature.
pub const UNSIGNED_MODULE: &str = "virtio_net";

/// The modules [`Broken::InitramfsNoDisk`] leaves out, with every module that needs them.
pub const DISK_DRIVER_MODULES: [&str; 2] = ["virtio_blk", "virtio_pci"];

/// The slot kernel of [`Broken::KernelRefused`]: 1 MiB that no kernel loader accepts.
pub fn refused_kernel() -> Vec<u8> {
    b"KEELOS: NOT A KERNEL (--broken kernel-refused)\n"
        .iter()
        .copied()
        .cycle()
        .take(1 << 20)
        .collect()
}

/// A kernel package to build with instead of the one image/versions.env pins.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelPackage {
    /// e.g. linux-image-6.1.0-48-amd64
    pub package: String,
    /// The Debian package version, e.g. 6.1.172-1
    pub version: String,
}

impl std::str::FromStr for KernelPackage {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s.split_once('=') {
            Some((p, v)) if !p.trim().is_empty() && !v.trim().is_empty() => Ok(KernelPackage {
                package: p.trim().to_string(),
                version: v.trim().to_string(),
            }),
            _ => Err(format!(
                "{s:?} is not NAME=VERSION (e.g. linux-image-6.1.0-48-amd64=6.1.172-1; \
                 `apt-cache policy NAME` shows the versions)"
            )),
        }
    }
}

/// The kernel release (`uname -r`) of an extracted kernel package: the name of its single
/// directory under lib/modules.
pub fn kernel_release_of(root: &Path, package: &str) -> Result<String, ImageError> {
    let dir = root.join("lib/modules");
    let err = |why: String| ImageError::KernelRelease {
        package: package.to_string(),
        why,
    };
    let entries =
        std::fs::read_dir(&dir).map_err(|e| err(format!("cannot read {}: {e}", dir.display())))?;
    let mut found = Vec::new();
    for ent in entries {
        let ent = ent.map_err(|e| err(format!("cannot read {}: {e}", dir.display())))?;
        if ent.file_type().is_ok_and(|t| t.is_dir()) {
            found.push(ent.file_name().to_string_lossy().into_owned());
        }
    }
    found.sort();
    match found.as_slice() {
        [one] => Ok(one.clone()),
        [] => Err(err(format!("{} holds no kernel release", dir.display()))),
        many => Err(err(format!(
            "{} holds several kernel releases ({})",
            dir.display(),
            many.join(", ")
        ))),
    }
}

/// What a release is built from.
#[derive(Debug, Clone)]
pub struct ReleaseInputs {
    /// The repository's image/ directory (versions.env, modules.list, rootfs.list).
    pub image_dir: PathBuf,
    pub cache: PackageCache,
    pub version: String,
    /// keel-init: /init of the initramfs and /sbin/keel-init of the root.
    pub init: PathBuf,
    /// keel-agent: /usr/bin/keel-agent of the root.
    pub agent: PathBuf,
    /// A kubelet binary to carry, when the operator has one (none is in Debian's archive).
    pub kubelet: Option<PathBuf>,
    pub broken: Option<Broken>,
    /// Build with this kernel package instead of the one versions.env pins.
    pub kernel_package: Option<KernelPackage>,
    /// zstd level of the compressed root image (19 for releases; tests may go faster).
    pub zstd_level: i32,
    /// A previous release directory: write a delta (BSDF2) from its root image to this one.
    pub delta_from: Option<PathBuf>,
    /// Brotli quality of the delta's streams (11 for releases; tests may go faster).
    pub delta_quality: u32,
    /// The manifest's security version.
    pub security_version: u64,
    /// The minisign public keys the root image trusts (none: a development image, which
    /// takes unsigned releases).
    pub trust: TrustedKeys,
    /// Sign the manifest with this key (it must be one of `trust`: [`check_signing`]).
    pub signer: Option<ReleaseSigner>,
}

/// The files of a built release, under its output directory.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Release {
    pub version: String,
    pub kernel_release: String,
    /// The Debian kernel package and its version.
    pub kernel_package: String,
    pub kernel_version: String,
    pub kernel: PathBuf,
    pub initramfs: PathBuf,
    pub root: PathBuf,
    /// SHA-256 of the uncompressed root image, lowercase hex.
    pub root_sha256: String,
    pub root_len: u64,
    pub initramfs_len: u64,
    /// The resumable zstd form of the root image (what nodes download).
    pub compressed: PathBuf,
    pub compressed_len: u64,
    /// SHA-256 of the compressed form, lowercase hex.
    pub compressed_sha256: String,
    /// The manifest's security version.
    pub security_version: u64,
    /// The ids of the minisign keys the root image trusts.
    pub trusted_keys: Vec<String>,
    /// The id of the key that signed release.json, when keel-image signed it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub signed_by: Option<String>,
    /// The delta from a previous release, when one was asked for.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub delta: Option<DeltaArtifact>,
    /// The dm-verity hash tree appended to the root image (its root hash is signed in the
    /// manifest); `None` for an image built without one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub verity: Option<manifest::Verity>,
    /// Modules in the initramfs, in load order.
    pub modules: Vec<String>,
    /// What the root image's /boot/keel-boot.json says about the slot's kernel and initramfs.
    pub slot_boot: BootFiles,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub broken: Option<Broken>,
}

/// A BSDIFF40 patch from a previous release's root image to this one's.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DeltaArtifact {
    pub from_version: String,
    pub from_sha256: String,
    pub path: PathBuf,
    pub len: u64,
    /// SHA-256 of the patch, lowercase hex.
    pub sha256: String,
}

pub const KERNEL_FILE: &str = "vmlinuz";
pub const COMPRESSED_FILE: &str = "root.img.zst";
pub const INITRAMFS_FILE: &str = "initramfs.img";
pub const ROOT_FILE: &str = "root.img";
/// The build record ([`Release`] as JSON).
pub const BUILD_RECORD_FILE: &str = "build.json";
/// The release manifest ([`Manifest`]).
pub const MANIFEST_FILE: &str = manifest::MANIFEST_FILE;
/// Its minisign signature.
pub const SIGNATURE_FILE: &str = manifest::SIGNATURE_FILE;

/// A minisign secret key that signs release manifests: an unencrypted one, as `minisign -G -W`
/// makes (keel-image runs unattended and asks for no password).
#[derive(Clone)]
pub struct ReleaseSigner {
    secret: minisign::SecretKey,
    public: TrustedKey,
    source: String,
}

impl std::fmt::Debug for ReleaseSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReleaseSigner")
            .field("key_id", &self.public.id())
            .field("source", &self.source)
            .finish_non_exhaustive()
    }
}

/// Why a release could not be signed, or its keys are refused.
#[derive(Debug, thiserror::Error)]
pub enum SigningError {
    /// The secret key file is not an unencrypted minisign secret key.
    #[error(
        "{source_name} is not an unencrypted minisign secret key ({why}): make one with \
         `minisign -G -W -p KEY.pub -s KEY.key`, or remove the password of an existing one with \
         `minisign -C -W -s KEY.key`"
    )]
    SecretKey { source_name: String, why: String },
    /// A key file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    /// A trusted key is refused.
    #[error(transparent)]
    Trust(#[from] ManifestError),
    /// --sign without --trust.
    #[error(
        "the release is to be signed by key {key_id}, but its image would trust no key (and so \
         take unsigned updates): give that key's .pub file (and a second, spare key) with --trust"
    )]
    SignedButTrustsNothing { key_id: KeyId },
    /// The signing key is not among the trusted keys.
    #[error(
        "the release is to be signed by key {key_id}, which its own image would not trust (it \
         trusts {trusted}): add the key's .pub file with --trust, or sign with a trusted key"
    )]
    SignerNotTrusted { key_id: KeyId, trusted: String },
    /// minisign could not sign.
    #[error("minisign could not sign release.json with key {key_id}: {why}")]
    Sign { key_id: KeyId, why: String },
    /// The signature just made does not verify (a bug, or a broken key file).
    #[error(
        "the signature just made for release.json does not verify with the trusted keys \
         ({source}): check that the secret key file matches its public key"
    )]
    SelfCheck { source: ManifestError },
    /// Writing the manifest or the signature failed.
    #[error("cannot write {path}: {source}")]
    Write {
        path: String,
        source: std::io::Error,
    },
}

impl ReleaseSigner {
    /// A signer from the text of a minisign secret key file; `source` names it in errors.
    ///
    /// The key bytes are read here rather than by `SecretKeyBox::into_unencrypted_secret_key`:
    /// the stock minisign 0.11 (Debian 12) writes `-W` keys with an all-zero checksum, which the
    /// crate refuses as corrupted. A damaged key is still caught: `minisign::sign` checks the
    /// signature against the key's own public half, and [`write_manifest`] verifies it with the
    /// trusted keys before anything is written.
    pub fn parse(source: &str, text: &str) -> Result<ReleaseSigner, SigningError> {
        use base64::Engine as _;
        let bad = |why: &str| SigningError::SecretKey {
            source_name: source.to_string(),
            why: why.to_string(),
        };
        let mut lines = text.lines();
        if !lines
            .next()
            .is_some_and(|l| l.starts_with("untrusted comment: "))
        {
            return Err(bad("its first line is not \"untrusted comment: ...\""));
        }
        let bin = base64::engine::general_purpose::STANDARD
            .decode(lines.next().unwrap_or_default().trim())
            .map_err(|_| bad("its second line is not base64"))?;
        // sig alg (2) kdf alg (2) checksum alg (2) kdf salt (32) opslimit (8) memlimit (8)
        // key id (8) secret key (64) checksum (32)
        if bin.len() != 158 || &bin[..2] != b"Ed" || &bin[4..6] != b"B2" {
            return Err(bad("it is not an Ed25519 minisign secret key"));
        }
        if bin[2..4] != [0, 0] {
            return Err(bad("it is encrypted with a password"));
        }
        let secret = minisign::SecretKey::from_bytes(&bin).map_err(|e| bad(&e.to_string()))?;
        let public =
            minisign::PublicKey::from_secret_key(&secret).map_err(|e| bad(&e.to_string()))?;
        let public = TrustedKey::parse(
            source,
            &format!("untrusted comment: public half\n{}\n", public.to_base64()),
        )
        .map_err(|e| bad(&e.to_string()))?;
        Ok(ReleaseSigner {
            secret,
            public,
            source: source.to_string(),
        })
    }

    pub fn from_file(path: &Path) -> Result<ReleaseSigner, SigningError> {
        let text = std::fs::read_to_string(path).map_err(|e| SigningError::Read {
            path: path.display().to_string(),
            source: e,
        })?;
        ReleaseSigner::parse(&path.display().to_string(), &text)
    }

    /// The public half of the key.
    pub fn public(&self) -> &TrustedKey {
        &self.public
    }

    /// The text of a minisign signature file (prehashed, as `minisign -S` makes) of `data`.
    pub fn sign(&self, data: &[u8], trusted_comment: &str) -> Result<String, SigningError> {
        let key_id = self.public.id();
        let pk =
            minisign::PublicKey::from_secret_key(&self.secret).map_err(|e| SigningError::Sign {
                key_id,
                why: e.to_string(),
            })?;
        let sig = minisign::sign(
            Some(&pk),
            &self.secret,
            std::io::Cursor::new(data),
            Some(trusted_comment),
            Some(&format!("signature from keel-image, key {key_id}")),
        )
        .map_err(|e| SigningError::Sign {
            key_id,
            why: e.to_string(),
        })?;
        Ok(sig.into_string())
    }
}

/// Read minisign public key files (the --trust arguments).
pub fn trusted_keys_from_files(paths: &[PathBuf]) -> Result<TrustedKeys, SigningError> {
    let mut keys = TrustedKeys::default();
    for p in paths {
        let text = std::fs::read_to_string(p).map_err(|e| SigningError::Read {
            path: p.display().to_string(),
            source: e,
        })?;
        keys.insert(TrustedKey::parse(&p.display().to_string(), &text)?)?;
    }
    Ok(keys)
}

/// A signed release must be trusted by its own image: the signer's public key must be among
/// `trust` (so `trust` is not empty). A release that its own image would not trust cannot be
/// followed by another release signed the same way, and an image that trusts nothing takes
/// unsigned updates; both are mistakes when signing. `trust` without a signer is fine: the
/// usual way is to sign release.json offline afterwards with the stock `minisign -S`.
pub fn check_signing(
    trust: &TrustedKeys,
    signer: Option<&ReleaseSigner>,
) -> Result<(), SigningError> {
    let Some(s) = signer else { return Ok(()) };
    let key_id = s.public().id();
    if trust.is_empty() {
        return Err(SigningError::SignedButTrustsNothing { key_id });
    }
    if !trust.contains(s.public()) {
        let ids: Vec<String> = trust.iter().map(|k| k.id().to_string()).collect();
        return Err(SigningError::SignerNotTrusted {
            key_id,
            trusted: ids.join(", "),
        });
    }
    Ok(())
}

/// The manifest of a built release. Pure: every digest is in `rel` already.
pub fn manifest(rel: &Release) -> Manifest {
    let name = |p: &Path| {
        p.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    };
    Manifest {
        format: manifest::FORMAT,
        version: rel.version.clone(),
        security_version: rel.security_version,
        kernel_release: rel.slot_boot.kernel_release.clone(),
        kernel_sha256: rel.slot_boot.kernel_sha256.clone(),
        initramfs_sha256: rel.slot_boot.initramfs_sha256.clone(),
        image: manifest::Image {
            sha256: rel.root_sha256.clone(),
            size: rel.root_len,
        },
        compressed: Artifact {
            name: name(&rel.compressed),
            sha256: rel.compressed_sha256.clone(),
            size: rel.compressed_len,
        },
        delta: rel.delta.as_ref().map(|d| manifest::DeltaArtifact {
            name: name(&d.path),
            base_sha256: d.from_sha256.clone(),
            sha256: d.sha256.clone(),
            size: d.len,
        }),
        verity: rel.verity.clone(),
    }
}

/// The salt of every release's dm-verity tree: fixed (SHA-256 of this text), so that two
/// releases' trees differ only where their data does and deltas stay small. A salt guards
/// against precomputed collisions on one tree; SHA-256's second-preimage resistance does not
/// need it per release.
pub const VERITY_SALT_TEXT: &str = "keelos release dm-verity salt v1";

/// Append the dm-verity hash tree to the root image `root` (veritysetup's format, the fixed
/// [`VERITY_SALT_TEXT`] salt, a UUID derived from the image's bytes so builds stay
/// reproducible) and return the manifest's verity fields.
fn append_verity(root: &Path) -> Result<manifest::Verity, ImageError> {
    use sha2::Digest;
    let salt = crate::verity::Salt::new(&sha2::Sha256::digest(VERITY_SALT_TEXT.as_bytes()))
        .map_err(|e| ImageError::Io {
            what: "the verity salt".into(),
            source: std::io::Error::other(e.to_string()),
        })?;
    let (sha, _) = sha256_file(root)?;
    let mut seed = [0u8; 16];
    for (i, b) in seed.iter_mut().enumerate() {
        *b = u8::from_str_radix(sha.get(2 * i..2 * i + 2).unwrap_or("00"), 16).unwrap_or(0);
    }
    let uuid = uuid::Builder::from_random_bytes(seed).into_uuid();
    let f = super::verity_file::format(root, salt, uuid).map_err(|e| ImageError::Io {
        what: format!("the dm-verity tree of {}", root.display()),
        source: std::io::Error::other(e),
    })?;
    Ok(manifest::Verity {
        root_hash: f.root_hash.to_string(),
        salt: f.salt.to_string(),
        data_size: f.data_size,
        hash_offset: f.hash_offset,
    })
}

/// What the root image says about updates, for keel-agent to read at start: the keys it trusts
/// (one file each under [`TRUSTED_KEYS_DIR`]) and its own security version
/// ([`manifest::SECURITY_VERSION_FILE`], always written, 0 included).
pub fn add_update_trust(
    tree: &mut Tree,
    trust: &TrustedKeys,
    security_version: u64,
) -> Result<(), ImageError> {
    for k in trust.iter() {
        tree.bytes(
            &format!("{TRUSTED_KEYS_DIR}/{}", k.file_name()),
            k.to_file_text(),
            0o644,
        )?;
    }
    tree.bytes(
        manifest::SECURITY_VERSION_FILE,
        manifest::security_version_text(security_version),
        0o644,
    )?;
    Ok(())
}

/// Write `m` to `out/release.json` and, with a signer, its signature to
/// `out/release.json.minisig` (checked with [`manifest::verify`] against `trust` first); without
/// one, a signature left there by an earlier build is removed. Returns the signing key's id.
pub fn write_manifest(
    out: &Path,
    m: &Manifest,
    trust: &TrustedKeys,
    signer: Option<&ReleaseSigner>,
) -> Result<Option<KeyId>, SigningError> {
    check_signing(trust, signer)?;
    let bytes = m.to_bytes();
    // The manifest must be one that nodes accept (its own shapes), signed or not.
    Manifest::parse(&bytes).map_err(|e| SigningError::SelfCheck { source: e })?;
    let write = |p: PathBuf, b: &[u8]| {
        std::fs::write(&p, b).map_err(|e| SigningError::Write {
            path: p.display().to_string(),
            source: e,
        })
    };
    let sig_path = out.join(SIGNATURE_FILE);
    let signed = match signer {
        None => {
            match std::fs::remove_file(&sig_path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    return Err(SigningError::Write {
                        path: sig_path.display().to_string(),
                        source: e,
                    })
                }
                _ => {}
            }
            None
        }
        Some(s) => {
            let comment = format!(
                "keelos release {} security_version {} file:{MANIFEST_FILE}",
                m.version, m.security_version
            );
            let sig = s.sign(&bytes, &comment)?;
            let policy = Policy {
                running_security_version: 0,
                allow_downgrade: false,
            };
            manifest::verify(&bytes, sig.as_bytes(), trust, policy)
                .map_err(|e| SigningError::SelfCheck { source: e })?;
            write(sig_path, sig.as_bytes())?;
            Some(s.public().id())
        }
    };
    write(out.join(MANIFEST_FILE), &bytes)?;
    Ok(signed)
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> ImageError {
    let what = what.into();
    move |e| ImageError::Io { what, source: e }
}

fn run(cmd: &mut Command, tool: &'static str) -> Result<(), ImageError> {
    let out = cmd
        .output()
        .map_err(|e| ImageError::Spawn { tool, source: e })?;
    if !out.status.success() {
        return Err(ImageError::Tool {
            tool,
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(())
}

/// Copy `bin` into `dir` without its debug information, if it has any (our own binaries only; Debian's are
/// taken as they are). `strip` gives the same output for the same input.
fn stripped(bin: &Path, dir: &Path, name: &str) -> Result<PathBuf, ImageError> {
    if !bin.is_file() {
        return Err(ImageError::MissingInput {
            what: name.to_string(),
            path: bin.display().to_string(),
        });
    }
    let out = dir.join(name);
    let data = std::fs::read(bin).map_err(io(bin.display().to_string()))?;
    let has_debug = super::elf::section(&data, ".debug_info")
        .map_err(|e| ImageError::Elf {
            path: bin.display().to_string(),
            source: e,
        })?
        .is_some();
    if !has_debug {
        std::fs::write(&out, &data).map_err(io(out.display().to_string()))?;
        return Ok(out);
    }
    run(
        Command::new("strip")
            .arg("--strip-debug")
            .arg("-o")
            .arg(&out)
            .arg(bin),
        "strip",
    )?;
    Ok(out)
}

/// Add every shared library (and loader) the programs in `tree` need, copied from the build
/// host's library directories, until nothing is missing.
pub fn add_libraries(tree: &mut Tree, host_root: &Path) -> Result<(), ImageError> {
    loop {
        let mut wanted: Vec<(String, PathBuf)> = Vec::new();
        for (path, node) in tree.entries() {
            let Node::File { content, .. } = node else {
                continue;
            };
            let data = tree.read(path, content)?;
            if !super::elf::is_elf(&data) {
                continue;
            }
            let d = super::elf::dynamic(&data).map_err(|e| ImageError::Elf {
                path: format!("/{path}"),
                source: e,
            })?;
            if let Some(i) = d.interpreter {
                if !audit::resolves(tree, &i) {
                    let host = host_root.join(i.trim_start_matches('/'));
                    if !host.exists() {
                        return Err(ImageError::MissingLibrary {
                            lib: i,
                            program: format!("/{path}"),
                        });
                    }
                    wanted.push((i, host));
                }
            }
            for lib in d.needed {
                if LIB_DIRS
                    .iter()
                    .any(|dir| audit::resolves(tree, &format!("{dir}/{lib}")))
                {
                    continue;
                }
                let found = LIB_DIRS.iter().find_map(|dir| {
                    let h = host_root.join(dir.trim_start_matches('/')).join(&lib);
                    h.is_file().then(|| (format!("{dir}/{lib}"), h))
                });
                match found {
                    Some(f) => wanted.push(f),
                    None => {
                        return Err(ImageError::MissingLibrary {
                            lib,
                            program: format!("/{path}"),
                        })
                    }
                }
            }
        }
        if wanted.is_empty() {
            return Ok(());
        }
        for (at, host) in wanted {
            // the real file, not the host's symlink to it
            let real = std::fs::canonicalize(&host).map_err(io(host.display().to_string()))?;
            tree.add(
                &at,
                Node::File {
                    content: Content::Host(real),
                    mode: 0o755,
                },
            )?;
        }
    }
}

/// The kernel package's tree (downloaded and extracted once) and its bzImage.
pub fn kernel(cache: &PackageCache, v: &Versions) -> Result<(PathBuf, PathBuf), ImageError> {
    let root = cache.extracted(&v.kernel_package, &v.kernel_version)?;
    let vmlinuz = root.join(format!("boot/vmlinuz-{}", v.kernel_release));
    if !vmlinuz.is_file() {
        return Err(ImageError::MissingInput {
            what: format!("the kernel image of {}", v.kernel_package),
            path: vmlinuz.display().to_string(),
        });
    }
    Ok((root, vmlinuz))
}

/// The initramfs tree: `init` as /init, the modules with their manifest, the console node.
pub fn initramfs_tree(
    init: Content,
    kernel_root: &Path,
    release: &str,
    module_roots: &[String],
) -> Result<(Tree, Vec<String>), ImageError> {
    initramfs_tree_without(init, kernel_root, release, module_roots, &[])
}

/// [`initramfs_tree`] without the modules `leave_out` and the modules that need them (a root
/// of the list that depends on one of them is dropped with it).
pub fn initramfs_tree_without(
    init: Content,
    kernel_root: &Path,
    release: &str,
    module_roots: &[String],
    leave_out: &[&str],
) -> Result<(Tree, Vec<String>), ImageError> {
    let idx = ModuleIndex::open(kernel_root, release)?;
    let mut roots = Vec::new();
    for r in module_roots {
        let needs = idx.resolve(std::slice::from_ref(r))?;
        if !needs.iter().any(|m| leave_out.contains(&m.name.as_str())) {
            roots.push(r.clone());
        }
    }
    let mods = idx.resolve(&roots)?;
    let mut t = Tree::new();
    for d in ["dev", "proc", "sys", "run", "tmp", "newroot"] {
        t.dir(d)?;
    }
    // The kernel opens /dev/console for init before devtmpfs is mounted.
    t.add(
        "dev/console",
        Node::CharDevice {
            major: 5,
            minor: 1,
            mode: 0o600,
        },
    )?;
    t.add(
        "init",
        Node::File {
            content: init,
            mode: 0o755,
        },
    )?;
    for m in &mods {
        let rel = m.rel.to_string_lossy();
        t.host_file(
            &format!("lib/modules/{release}/{rel}"),
            idx.dir.join(&m.rel),
            0o644,
        )?;
    }
    t.bytes(MANIFEST_PATH, modules::manifest(release, &mods), 0o644)?;
    add_libraries(&mut t, Path::new("/"))?;
    audit::audit(&t)?;
    Ok((t, mods.into_iter().map(|m| m.name).collect()))
}

/// Replace module `name` of initramfs tree `t` with the same module without its signature.
fn strip_one_module_signature(t: &mut Tree, release: &str, name: &str) -> Result<(), ImageError> {
    let file = format!("{name}.ko");
    let path = t
        .entries()
        .map(|(p, _)| p.to_string())
        .find(|p| {
            p.starts_with(&format!("lib/modules/{release}/")) && p.ends_with(&format!("/{file}"))
        })
        .ok_or_else(|| ImageError::Io {
            what: format!("module {file} in the slot initramfs"),
            source: std::io::Error::other("not in the initramfs; check image/modules.list"),
        })?;
    let bad = |e: String| ImageError::Io {
        what: format!("the signature of {path}"),
        source: std::io::Error::other(e),
    };
    let signed = match t.get(&path) {
        Some(Node::File { content, .. }) => {
            t.read(&path, content).map_err(|e| bad(e.to_string()))?
        }
        _ => return Err(bad("not a file".into())),
    };
    let unsigned = super::modules::strip_module_signature(&signed).map_err(bad)?;
    t.replace(
        &path,
        Node::File {
            content: Content::Bytes(unsigned),
            mode: 0o644,
        },
    )
    .map_err(|e| bad(e.to_string()))
}

/// zstd-compressed newc archive of `t`.
pub fn write_initramfs(t: &Tree, out: &Path) -> Result<u64, ImageError> {
    let cpio = t.write_cpio(Vec::new())?;
    // Level 19 on one thread: the same archive always compresses to the same bytes.
    let z = zstd::bulk::compress(&cpio, 19).map_err(io("zstd compression of the initramfs"))?;
    std::fs::write(out, &z).map_err(io(out.display().to_string()))?;
    Ok(z.len() as u64)
}

/// /etc/os-release of a version.
pub fn os_release(version: &str) -> String {
    format!(
        "NAME=\"KeelOS\"\nID=keelos\nVERSION=\"{version}\"\nVERSION_ID=\"{version}\"\n\
         PRETTY_NAME=\"KeelOS {version}\"\nHOME_URL=\"https://keelos.invalid/\"\n"
    )
}

/// The root tree: our binaries, the Debian files of image/rootfs.list with their libraries,
/// os-release, and the empty mount points keel-init uses.
pub fn root_tree(
    init: Content,
    agent: Content,
    kubelet: Option<Content>,
    version: &str,
    image_dir: &Path,
    cache: &PackageCache,
    v: &Versions,
) -> Result<Tree, ImageError> {
    let mut t = Tree::new();
    for d in ["dev", "proc", "sys", "run", "state", "var", "tmp", "etc"] {
        t.dir(d)?;
    }
    t.add(
        "sbin/keel-init",
        Node::File {
            content: init,
            mode: 0o755,
        },
    )?;
    t.add(
        "usr/bin/keel-agent",
        Node::File {
            content: agent,
            mode: 0o755,
        },
    )?;
    if let Some(k) = kubelet {
        t.add(
            "usr/bin/kubelet",
            Node::File {
                content: k,
                mode: 0o755,
            },
        )?;
    }
    let list_path = image_dir.join("rootfs.list");
    let list = std::fs::read_to_string(&list_path).map_err(io(list_path.display().to_string()))?;
    for (n, line) in list.lines().enumerate() {
        let line = line.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let f: Vec<&str> = line.split_whitespace().collect();
        let (pkg, src, dst) = match f.as_slice() {
            [p, s] => (*p, *s, *s),
            [p, s, d] => (*p, *s, *d),
            _ => {
                return Err(ImageError::List {
                    file: list_path.display().to_string(),
                    line: n + 1,
                    why: "expected PACKAGE PATH [IMAGE-PATH]".into(),
                })
            }
        };
        let version = match pkg {
            "containerd" => &v.containerd_version,
            "runc" => &v.runc_version,
            "containernetworking-plugins" => &v.cni_plugins_version,
            "mount" => &v.mount_version,
            other => {
                return Err(ImageError::List {
                    file: list_path.display().to_string(),
                    line: n + 1,
                    why: format!("package {other} has no pinned version in versions.env"),
                })
            }
        };
        let root = cache.extracted(pkg, version)?;
        let host = root.join(src.trim_start_matches('/'));
        if !host.is_file() {
            return Err(ImageError::MissingInput {
                what: format!("{src} of package {pkg} {version}"),
                path: host.display().to_string(),
            });
        }
        // the package's own permission bits (programs outside bin/: the CNI plugins in
        // /usr/lib/cni), without setuid/setgid (the image runs everything as root)
        let mode = {
            use std::os::unix::fs::PermissionsExt;
            let m = std::fs::metadata(&host)
                .map_err(io(host.display().to_string()))?
                .permissions()
                .mode();
            if m & 0o111 != 0 {
                0o755
            } else {
                0o644
            }
        };
        t.host_file(dst, host, mode)?;
    }
    t.bytes("etc/os-release", os_release(version), 0o644)?;
    // containerd copies the host's /etc/hosts into every pod sandbox (and refuses a pod without
    // it); the node's own names: loopback only
    t.bytes("etc/hosts", ETC_HOSTS, 0o644)?;
    // the root is read-only: keel-init writes the DHCP lease's resolver on /run (a tmpfs)
    t.symlink("etc/resolv.conf", crate::net::RESOLV_CONF)?;
    add_libraries(&mut t, Path::new("/"))?;
    audit::audit(&t)?;
    Ok(t)
}

/// The root's /etc/hosts.
pub const ETC_HOSTS: &str = "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n";

/// Build an uncompressed, reproducible SquashFS of `t` at `out`.
pub fn squashfs(t: &Tree, out: &Path, work: &Path) -> Result<(), ImageError> {
    let stage = work.join("root");
    std::fs::create_dir(&stage).map_err(io(stage.display().to_string()))?;
    t.materialize(&stage)?;
    let _ = std::fs::remove_file(out);
    run(
        Command::new("mksquashfs").arg(&stage).arg(out).args([
            "-noappend",
            "-noI",
            "-noD",
            "-noF",
            "-noX",
            "-all-root",
            "-mkfs-time",
            "0",
            "-all-time",
            "0",
            "-no-xattrs",
            "-reproducible",
            "-quiet",
            "-no-progress",
        ]),
        "mksquashfs",
    )
}

pub fn sha256_file(p: &Path) -> Result<(String, u64), ImageError> {
    use std::io::Read;
    let mut f = std::fs::File::open(p).map_err(io(p.display().to_string()))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut n = 0u64;
    loop {
        let k = f.read(&mut buf).map_err(io(p.display().to_string()))?;
        if k == 0 {
            break;
        }
        h.update(&buf[..k]);
        n += k as u64;
    }
    let hex: String = h.finalize().iter().map(|b| format!("{b:02x}")).collect();
    Ok((hex, n))
}

/// Build a release into `out` (created if needed).
pub fn build(inputs: &ReleaseInputs, out: &Path) -> Result<Release, ImageError> {
    // Refused before minutes of building, not after.
    check_signing(&inputs.trust, inputs.signer.as_ref()).map_err(signing)?;
    let mut versions = Versions::load(&inputs.image_dir.join("versions.env"))?;
    if let Some(k) = &inputs.kernel_package {
        let root = inputs.cache.extracted(&k.package, &k.version)?;
        versions.kernel_release = kernel_release_of(&root, &k.package)?;
        versions.kernel_package = k.package.clone();
        versions.kernel_version = k.version.clone();
    }
    let mods_path = inputs.image_dir.join("modules.list");
    let module_roots = modules::parse_list(
        &std::fs::read_to_string(&mods_path).map_err(io(mods_path.display().to_string()))?,
    );
    std::fs::create_dir_all(out).map_err(io(out.display().to_string()))?;
    let work = tempfile::Builder::new()
        .prefix(".keel-build-")
        .tempdir_in(out)
        .map_err(io(format!("a work directory in {}", out.display())))?;
    let init = Content::Host(stripped(&inputs.init, work.path(), "keel-init")?);
    let agent = Content::Host(stripped(&inputs.agent, work.path(), "keel-agent")?);
    let kubelet = match inputs.broken {
        Some(Broken::KubeletExits) => Some(Content::Bytes(stub::elf(&Stub::Exit(1)))),
        _ => inputs.kubelet.as_ref().map(|k| Content::Host(k.clone())),
    };

    let (kroot, vmlinuz) = kernel(&inputs.cache, &versions)?;
    let kernel_out = out.join(KERNEL_FILE);
    std::fs::copy(&vmlinuz, &kernel_out).map_err(io(kernel_out.display().to_string()))?;

    // The release's initramfs (the boot stage's, and the slot's unless it is broken) always
    // comes from the real keel-init; it knows its own version from /etc/os-release.
    let (mut itree, mods) = initramfs_tree(
        init.clone(),
        &kroot,
        &versions.kernel_release,
        &module_roots,
    )?;
    itree.bytes("etc/os-release", os_release(&inputs.version), 0o644)?;
    let initramfs = out.join(INITRAMFS_FILE);
    let initramfs_len = write_initramfs(&itree, &initramfs)?;

    // The slot's own kernel and initramfs, which the boot stage kexecs.
    let slot_kernel = work.path().join("slot-vmlinuz");
    let slot_initramfs = work.path().join("slot-initramfs.img");
    let write_work = |p: &Path, b: &[u8]| std::fs::write(p, b).map_err(io(p.display().to_string()));
    match inputs.broken {
        Some(Broken::KernelRefused) => write_work(&slot_kernel, &refused_kernel())?,
        Some(Broken::KernelUnsigned) => {
            let signed = std::fs::read(&vmlinuz).map_err(io(vmlinuz.display().to_string()))?;
            let unsigned = super::uki::strip_signature(&signed).map_err(|e| ImageError::Io {
                what: format!("the signature of {}", vmlinuz.display()),
                source: std::io::Error::other(e.to_string()),
            })?;
            write_work(&slot_kernel, &unsigned)?
        }
        _ => {
            std::fs::copy(&vmlinuz, &slot_kernel).map_err(io(slot_kernel.display().to_string()))?;
        }
    }
    let slot_init = match inputs.broken {
        Some(Broken::InitramfsHangs) => Some((Content::Bytes(stub::elf(&Stub::Hang)), &[][..])),
        Some(Broken::InitramfsNoDisk) => Some((init.clone(), &DISK_DRIVER_MODULES[..])),
        Some(Broken::ModuleUnsigned) => Some((init.clone(), &[][..])),
        _ => None,
    };
    match slot_init {
        None => {
            std::fs::copy(&initramfs, &slot_initramfs)
                .map_err(io(slot_initramfs.display().to_string()))?;
        }
        Some((content, leave_out)) => {
            let (mut t, _) = initramfs_tree_without(
                content,
                &kroot,
                &versions.kernel_release,
                &module_roots,
                leave_out,
            )?;
            t.bytes("etc/os-release", os_release(&inputs.version), 0o644)?;
            if inputs.broken == Some(Broken::ModuleUnsigned) {
                strip_one_module_signature(&mut t, &versions.kernel_release, UNSIGNED_MODULE)?;
            }
            write_initramfs(&t, &slot_initramfs)?;
        }
    }
    let (kernel_sha256, kernel_len) = sha256_file(&slot_kernel)?;
    let (initramfs_sha256, slot_initramfs_len) = sha256_file(&slot_initramfs)?;
    let slot_boot = BootFiles {
        kernel_release: versions.kernel_release.clone(),
        kernel_sha256,
        kernel_len,
        initramfs_sha256,
        initramfs_len: slot_initramfs_len,
    };

    let (slot_init, slot_agent) = match inputs.broken {
        Some(Broken::AgentExits) => (init, Content::Bytes(stub::elf(&Stub::Exit(1)))),
        Some(Broken::InitPanics) => (Content::Bytes(stub::elf(&Stub::Exit(1))), agent),
        Some(Broken::InitHangs) => (Content::Bytes(stub::elf(&Stub::Hang)), agent),
        Some(
            Broken::CorruptSquashfs
            | Broken::KernelRefused
            | Broken::KernelUnsigned
            | Broken::InitramfsNoDisk
            | Broken::InitramfsHangs
            | Broken::ModuleUnsigned
            | Broken::KubeletExits,
        )
        | None => (init, agent),
    };
    let mut rtree = root_tree(
        slot_init,
        slot_agent,
        kubelet,
        &inputs.version,
        &inputs.image_dir,
        &inputs.cache,
        &versions,
    )?;
    rtree.host_file(SLOT_KERNEL, &slot_kernel, 0o644)?;
    rtree.host_file(SLOT_INITRAMFS, &slot_initramfs, 0o644)?;
    let record = serde_json::to_string_pretty(&slot_boot).map_err(|e| ImageError::Io {
        what: SLOT_BOOT_RECORD.into(),
        source: std::io::Error::other(e),
    })?;
    rtree.bytes(SLOT_BOOT_RECORD, record + "\n", 0o644)?;
    add_update_trust(&mut rtree, &inputs.trust, inputs.security_version)?;
    let root = out.join(ROOT_FILE);
    squashfs(&rtree, &root, work.path())?;
    if inputs.broken == Some(Broken::CorruptSquashfs) {
        corrupt_superblock(&root)?;
    }
    let verity = append_verity(&root)?;
    let (root_sha256, root_len) = sha256_file(&root)?;
    let sha_file = out.join(format!("{ROOT_FILE}.sha256"));
    std::fs::write(&sha_file, format!("{root_sha256}  {ROOT_FILE}\n"))
        .map_err(io(sha_file.display().to_string()))?;
    let compressed = out.join(COMPRESSED_FILE);
    let compressed_len = compress(&root, &compressed, inputs.zstd_level)?;
    let (compressed_sha256, _) = sha256_file(&compressed)?;
    let delta = match &inputs.delta_from {
        None => None,
        Some(prev) => Some(delta(
            prev,
            &root,
            out,
            crate::update::bsdf2::Bsdf2Params {
                quality: inputs.delta_quality,
                ..Default::default()
            },
        )?),
    };
    let rel = Release {
        version: inputs.version.clone(),
        kernel_release: versions.kernel_release.clone(),
        kernel_package: versions.kernel_package.clone(),
        kernel_version: versions.kernel_version.clone(),
        kernel: kernel_out,
        initramfs,
        root,
        root_sha256,
        root_len,
        initramfs_len,
        compressed,
        compressed_len,
        compressed_sha256,
        security_version: inputs.security_version,
        trusted_keys: inputs.trust.iter().map(|k| k.id().to_string()).collect(),
        signed_by: inputs.signer.as_ref().map(|s| s.public().id().to_string()),
        delta,
        verity: Some(verity),
        modules: mods,
        slot_boot,
        broken: inputs.broken,
    };
    let mf = out.join(BUILD_RECORD_FILE);
    let json = serde_json::to_string_pretty(&rel).map_err(|e| ImageError::Io {
        what: BUILD_RECORD_FILE.into(),
        source: std::io::Error::other(e),
    })?;
    std::fs::write(&mf, json + "\n").map_err(io(mf.display().to_string()))?;
    write_manifest(out, &manifest(&rel), &inputs.trust, inputs.signer.as_ref()).map_err(signing)?;
    Ok(rel)
}

fn signing(e: SigningError) -> ImageError {
    ImageError::Io {
        what: "the release manifest".into(),
        source: std::io::Error::other(e),
    }
}

/// Write the resumable zstd form of `image` (the update engine's independent frames and seek
/// table) to `out`; returns its length.
pub fn compress(image: &Path, out: &Path, level: i32) -> Result<u64, ImageError> {
    use std::io::Write;
    let input = std::fs::File::open(image).map_err(io(image.display().to_string()))?;
    let output = std::fs::File::create(out).map_err(io(out.display().to_string()))?;
    let mut w = std::io::BufWriter::new(output);
    crate::update::zframes::compress(
        std::io::BufReader::new(input),
        &mut w,
        level,
        crate::update::zframes::FRAME_SIZE,
    )
    .map_err(io(format!("compressing {}", image.display())))?;
    w.flush().map_err(io(out.display().to_string()))?;
    Ok(std::fs::metadata(out)
        .map_err(io(out.display().to_string()))?
        .len())
}

/// Write the delta (BSDF2 with brotli streams, Android's bsdiff format) from the root image of
/// the release in `prev` to `new`, into `out/delta-from-<version>.bsdiff`.
pub fn delta(
    prev: &Path,
    new: &Path,
    out: &Path,
    params: crate::update::bsdf2::Bsdf2Params,
) -> Result<DeltaArtifact, ImageError> {
    let mf = prev.join(BUILD_RECORD_FILE);
    let from: serde_json::Value = std::fs::read(&mf)
        .map_err(io(mf.display().to_string()))
        .and_then(|b| {
            serde_json::from_slice(&b).map_err(|e| ImageError::Io {
                what: mf.display().to_string(),
                source: std::io::Error::other(e),
            })
        })?;
    let from_version = from["version"].as_str().unwrap_or_default().to_string();
    let old_path = prev.join(ROOT_FILE);
    let old = std::fs::read(&old_path).map_err(io(old_path.display().to_string()))?;
    let new_bytes = std::fs::read(new).map_err(io(new.display().to_string()))?;
    let path = out.join(format!("delta-from-{}.bsdiff", safe_name(&from_version)));
    let f = std::fs::File::create(&path).map_err(io(path.display().to_string()))?;
    let len = crate::update::bsdf2::create(
        &old,
        &new_bytes,
        crate::update::bsdf2::CreateFormat::Bsdf2Brotli(params),
        std::io::BufWriter::new(f),
    )
    .map_err(io(format!(
        "delta {} -> {} into {}",
        old_path.display(),
        new.display(),
        path.display()
    )))?;
    let sha256 = sha256_file(&path)?.0;
    Ok(DeltaArtifact {
        from_version,
        from_sha256: sha256_file(&old_path)?.0,
        path,
        len,
        sha256,
    })
}

fn safe_name(s: &str) -> String {
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

/// Destroy the SquashFS magic so that the kernel refuses to mount the image.
pub fn corrupt_superblock(root: &Path) -> Result<(), ImageError> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(root)
        .map_err(io(root.display().to_string()))?;
    f.write_all_at(b"XXXX", 0)
        .map_err(io(root.display().to_string()))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::panic)]
mod tests {
    use super::*;

    #[test]
    fn libraries_of_a_host_program_are_added_and_it_runs_chrooted() {
        // The host's `true` needs libc and the loader; the closure must make it runnable in a
        // root that holds nothing else (as root, with chroot, like the image's programs).
        let mut t = Tree::new();
        t.host_file("/usr/bin/true", "/usr/bin/true", 0o755)
            .unwrap();
        add_libraries(&mut t, Path::new("/")).unwrap();
        audit::audit(&t).unwrap();
        assert!(t.get("/lib/x86_64-linux-gnu/libc.so.6").is_some());
        assert!(t.get("/lib64/ld-linux-x86-64.so.2").is_some());
        let d = tempfile::tempdir().unwrap();
        t.materialize(d.path()).unwrap();
        let st = Command::new("chroot")
            .arg(d.path())
            .arg("/usr/bin/true")
            .status()
            .unwrap();
        assert!(st.success(), "chrooted true failed: {st}");
    }

    #[test]
    fn a_missing_library_is_named() {
        let mut t = Tree::new();
        t.host_file("/usr/bin/true", "/usr/bin/true", 0o755)
            .unwrap();
        let empty = tempfile::tempdir().unwrap();
        let e = add_libraries(&mut t, empty.path()).unwrap_err();
        assert!(e.to_string().contains("/usr/bin/true"), "{e}");
    }

    #[test]
    fn squashfs_is_reproducible_and_corruptible() {
        let mut t = Tree::new();
        t.bytes("/etc/os-release", os_release("1.2.3"), 0o644)
            .unwrap();
        t.bytes("/sbin/keel-init", stub::elf(&Stub::Exit(0)), 0o755)
            .unwrap();
        for d in ["proc", "sys", "state"] {
            t.dir(d).unwrap();
        }
        let w1 = tempfile::tempdir().unwrap();
        let w2 = tempfile::tempdir().unwrap();
        let (a, b) = (w1.path().join("a.img"), w2.path().join("b.img"));
        squashfs(&t, &a, w1.path()).unwrap();
        squashfs(&t, &b, w2.path()).unwrap();
        let (ha, la) = sha256_file(&a).unwrap();
        assert_eq!(
            (ha.clone(), la),
            sha256_file(&b).unwrap(),
            "same tree, same image"
        );
        assert_eq!(&std::fs::read(&a).unwrap()[..4], b"hsqs");
        // uncompressed: the file's bytes are in the image as they are
        assert!(std::fs::read(&a)
            .unwrap()
            .windows(15)
            .any(|w| w == b"VERSION=\"1.2.3\""));
        corrupt_superblock(&a).unwrap();
        assert_ne!(sha256_file(&a).unwrap().0, ha);
        assert_ne!(&std::fs::read(&a).unwrap()[..4], b"hsqs");
    }

    #[test]
    fn the_root_tree_records_its_security_version_even_without_keys() {
        let mut t = Tree::new();
        add_update_trust(&mut t, &TrustedKeys::default(), 7).unwrap();
        let d = tempfile::tempdir().unwrap();
        t.materialize(d.path()).unwrap();
        let text = std::fs::read_to_string(d.path().join(manifest::SECURITY_VERSION_FILE)).unwrap();
        assert_eq!(text, "7\n");
        assert_eq!(manifest::parse_security_version(&text), Ok(7));
        assert!(!d.path().join(TRUSTED_KEYS_DIR).exists());
    }

    #[test]
    fn os_release_names_the_version() {
        assert!(os_release("2.0.1").contains("VERSION_ID=\"2.0.1\"\n"));
    }
}
