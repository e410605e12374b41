//! What the running image trusts for updates, and how a release URL becomes an install.
//!
//! The image says it in two places under its root, read once when the agent starts: the minisign
//! keys in [`TRUSTED_KEYS_DIR`] and its security version in [`SECURITY_VERSION_FILE`]. A node
//! whose image carries keys (a *signed-mode* node) installs only releases whose manifest is signed
//! by one of them; a node whose image carries none (a *development* node) also takes unsigned
//! manifests and plain `--sha256` installs.
//!
//! Only [`load`] touches files; everything else here is pure. Nothing here ever lets a signed-mode
//! node take an unsigned image: an entry of the key directory that cannot be read or is not a
//! key is logged and left out, and the node stays in signed mode with the keys that could be read
//! (with none left, every install is refused until the image is fixed). A security-version file
//! that cannot be read counts as the highest version, so every release then needs an explicit,
//! logged `--allow-downgrade`.

use crate::update::manifest::{
    self, ManifestError, Policy, TrustedKey, TrustedKeys, VerifiedManifest, TRUSTED_KEYS_DIR,
};
use std::io::Read;
use std::path::Path;

pub use crate::update::manifest::SECURITY_VERSION_FILE;

/// Entries of the key directory read at most (keel-image writes one per trusted key).
pub const MAX_KEY_FILES: usize = 16;
/// Largest key file read (a minisign public key file is about 110 bytes).
pub const MAX_KEY_FILE_BYTES: usize = 4 << 10;
/// Largest security-version file read.
const MAX_SECURITY_VERSION_BYTES: usize = 64;

/// The image's trust files as read from disk, before they are judged ([`ImageTrust::judge`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImageFiles {
    /// The entries of the key directory (name, and text or why it could not be read); `None`
    /// when the image has no key directory.
    pub key_files: Option<Vec<(String, Result<String, String>)>>,
    /// What went wrong listing the key directory itself (unreadable, too many entries).
    pub key_dir_problems: Vec<String>,
    /// The security-version file's text, or why it could not be read; `None` when absent.
    pub security_version: Option<Result<String, String>>,
}

/// What installs the running image accepts.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageTrust {
    keys: TrustedKeys,
    /// The image carries a key directory with entries, whether or not they could be read.
    signed: bool,
    /// `None`: the file was there but unreadable; every release counts as a downgrade.
    security_version: Option<u64>,
    /// What was wrong with the trust files; logged at start and shown in Status.
    problems: Vec<String>,
}

/// Why an install request was refused before anything was written.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReleaseError {
    /// The manifest or its signature was refused.
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    /// The image carries trusted keys but none of them could be read.
    #[error(
        "this node's image carries trusted keys under /{TRUSTED_KEYS_DIR}, but none could be \
         read ({problems}); no release can be verified, so none is installed: fix the image (or \
         boot the other slot) and restart keel-agent"
    )]
    NoUsableKeys { problems: String },
    /// A plain full_image_url/sha256 install on a node that takes signed releases only.
    #[error(
        "this node's image trusts signing keys ({keys}), so it installs signed releases only: \
         use `osctl install --release URL-OF-release.json`; --image/--sha256 is for development \
         images built without --trust"
    )]
    PlainInstallRefused { keys: String },
    /// The manifest or its signature could not be downloaded.
    #[error("cannot download the {what} {url}: {why}")]
    Fetch {
        what: &'static str,
        url: String,
        why: String,
    },
    /// The release URL cannot have files resolved beside it.
    #[error("release_url {url:?}: {why}")]
    BadReleaseUrl { url: String, why: String },
    /// An artifact's name in the signed manifest cannot be put into a URL as it is.
    #[error(
        "the manifest's {field} {name:?} holds characters other than letters, digits and . _ - + \
         ~; it cannot be fetched beside the manifest: rename the file and re-sign the release"
    )]
    UnsafeArtifactName { field: &'static str, name: String },
}

impl ImageTrust {
    /// A node whose image trusts no key: the simulation's nodes, and images built without
    /// `--trust`.
    pub fn development() -> ImageTrust {
        ImageTrust {
            keys: TrustedKeys::default(),
            signed: false,
            security_version: Some(0),
            problems: Vec::new(),
        }
    }

    /// Judge the files [`load`] read: every entry of the key directory must be a minisign
    /// public key named `<KEY ID>.pub`; one that is not is a problem and is left out.
    pub fn judge(files: ImageFiles) -> ImageTrust {
        let mut problems = files.key_dir_problems;
        let mut keys = TrustedKeys::default();
        let entries = files.key_files.unwrap_or_default();
        let signed = !entries.is_empty() || !problems.is_empty();
        for (name, content) in entries {
            let shown = format!("/{TRUSTED_KEYS_DIR}/{name}");
            let key = content
                .map_err(|why| format!("{shown}: {why}"))
                .and_then(|text| {
                    let k = TrustedKey::parse(&shown, &text).map_err(|e| e.to_string())?;
                    if k.file_name() != name {
                        return Err(format!(
                            "{shown} holds key {}, so it must be named {}",
                            k.id(),
                            k.file_name()
                        ));
                    }
                    Ok(k)
                });
            match key.and_then(|k| keys.insert(k).map_err(|e| format!("{shown}: {e}"))) {
                Ok(()) => {}
                Err(p) => problems.push(format!("{p}; this key is not trusted")),
            }
        }
        let security_version = match files.security_version {
            None => Some(0),
            Some(Ok(text)) => match manifest::parse_security_version(&text) {
                Ok(v) => Some(v),
                Err(why) => {
                    problems.push(format!(
                        "/{SECURITY_VERSION_FILE}: {why}; every release counts as a downgrade \
                         (it needs --allow-downgrade)"
                    ));
                    None
                }
            },
            Some(Err(why)) => {
                problems.push(format!(
                    "/{SECURITY_VERSION_FILE}: {why}; every release counts as a downgrade (it \
                     needs --allow-downgrade)"
                ));
                None
            }
        };
        ImageTrust {
            keys,
            signed,
            security_version,
            problems,
        }
    }

    /// Whether the node installs signed releases only.
    pub fn is_signed(&self) -> bool {
        self.signed
    }

    pub fn keys(&self) -> &TrustedKeys {
        &self.keys
    }

    /// The running image's security version; `None` when its file could not be read.
    pub fn security_version(&self) -> Option<u64> {
        self.security_version
    }

    /// What was wrong with the image's trust files (empty: nothing).
    pub fn problems(&self) -> &[String] {
        &self.problems
    }

    fn key_ids(&self) -> String {
        let ids: Vec<String> = self.keys.iter().map(|k| k.id().to_string()).collect();
        if ids.is_empty() {
            "none readable".into()
        } else {
            ids.join(", ")
        }
    }

    fn security_version_shown(&self) -> String {
        self.security_version
            .map_or_else(|| "unknown".to_string(), |v| v.to_string())
    }

    /// One line for Status: the mode, the keys and the security version, and any problem.
    pub fn describe(&self) -> String {
        let mut s = if self.signed {
            format!(
                "signed: {} trusted key{} ({}), security version {}",
                self.keys.len(),
                if self.keys.len() == 1 { "" } else { "s" },
                self.key_ids(),
                self.security_version_shown()
            )
        } else {
            format!(
                "development: unsigned images accepted (the image trusts no signing key), \
                 security version {}",
                self.security_version_shown()
            )
        };
        if !self.problems.is_empty() {
            s.push_str(&format!("; problems: {}", self.problems.join("; ")));
        }
        s
    }

    /// Refuse a plain full_image_url/sha256 install on a signed-mode node.
    pub fn admit_plain_install(&self) -> Result<(), ReleaseError> {
        if self.signed {
            return Err(ReleaseError::PlainInstallRefused {
                keys: self.key_ids(),
            });
        }
        Ok(())
    }

    /// Whether a release's signature is needed (and worth downloading).
    pub fn wants_signature(&self) -> bool {
        self.signed
    }

    /// Check a release manifest and its signature (`None`: none was published) against the
    /// image's keys and security version.
    pub fn check_release(
        &self,
        manifest_bytes: &[u8],
        signature: Option<&[u8]>,
        allow_downgrade: bool,
    ) -> Result<VerifiedManifest, ReleaseError> {
        let policy = Policy {
            running_security_version: self.security_version.unwrap_or(u64::MAX),
            allow_downgrade,
        };
        if !self.signed {
            return Ok(manifest::accept_unsigned(
                manifest_bytes,
                &self.keys,
                policy,
            )?);
        }
        if self.keys.is_empty() {
            return Err(ReleaseError::NoUsableKeys {
                problems: self.problems.join("; "),
            });
        }
        Ok(match signature {
            Some(sig) => manifest::verify(manifest_bytes, sig, &self.keys, policy)?,
            None => manifest::accept_unsigned(manifest_bytes, &self.keys, policy)?,
        })
    }
}

/// A verified release turned into what the install engine needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReleasePlan {
    pub full_url: String,
    /// Set when the manifest's delta applies to the running slot's image.
    pub delta_url: Option<String>,
    /// The delta's size and digest as the manifest gives them (the engine applies no other).
    pub delta_expect: Option<crate::update::PatchExpect>,
    pub sha256: String,
    pub version: String,
    /// Who vouched for it, with the security versions (and an allowed downgrade): logged, and
    /// reported in the install's result.
    pub trust: String,
}

/// The URL of a manifest's signature (minisign's default name: the file name + `.minisig`).
pub fn signature_url(release_url: &str) -> String {
    format!("{release_url}.minisig")
}

/// The directory of a release URL (up to and including the last `/` of its path), where the
/// manifest's artifacts are. A URL with a query or fragment is refused: the signature and the
/// artifacts could not be put beside it.
pub fn release_dir(url: &str) -> Result<&str, ReleaseError> {
    let bad = |why: &str| ReleaseError::BadReleaseUrl {
        url: crate::fetch::redact_url(url),
        why: why.to_string(),
    };
    crate::fetch::parse_url(url).map_err(|e| bad(&e.to_string()))?;
    if url.contains(['?', '#']) {
        return Err(bad(
            "it has a query or fragment; give the manifest's plain URL (its signature and \
             artifacts are fetched beside it)",
        ));
    }
    let after_scheme = url.find("://").map_or(0, |i| i + 3);
    let path_start = url[after_scheme..]
        .find('/')
        .map(|i| after_scheme + i)
        .ok_or_else(|| bad("it has no path; give the URL of release.json"))?;
    let last = url.rfind('/').unwrap_or(path_start);
    if last + 1 == url.len() {
        return Err(bad(
            "it ends with '/'; give the URL of the manifest file (release.json), not its directory",
        ));
    }
    Ok(&url[..=last])
}

fn artifact(field: &'static str, name: &str) -> Result<(), ReleaseError> {
    if name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"._-+~".contains(&b))
    {
        Ok(())
    } else {
        Err(ReleaseError::UnsafeArtifactName {
            field,
            name: name.to_string(),
        })
    }
}

/// The install of a verified release from `release_url`, on a node whose running slot holds
/// the image `running_sha256` (when known): the full image beside the manifest, and its delta
/// only when the delta was made from the running image (another base cannot apply).
pub fn plan(
    verified: &VerifiedManifest,
    release_url: &str,
    running_sha256: Option<&str>,
) -> Result<ReleasePlan, ReleaseError> {
    let dir = release_dir(release_url)?;
    let m = verified.manifest();
    artifact("compressed.name", &m.compressed.name)?;
    let (delta_url, delta_expect) = match &m.delta {
        Some(d) if running_sha256 == Some(d.base_sha256.as_str()) => {
            artifact("delta.name", &d.name)?;
            // the manifest's digests were checked to be 64 hex digits when it was parsed; one
            // that is not gives no delta (the full image is installed)
            let expect = crate::update::record::parse_digest(&d.sha256).map(|sha256| {
                crate::update::PatchExpect {
                    sha256,
                    size: d.size,
                }
            });
            match expect {
                Some(e) => (Some(format!("{dir}{}", d.name)), Some(e)),
                None => (None, None),
            }
        }
        _ => (None, None),
    };
    let who = match verified.key_id() {
        Some(k) => format!("signed by trusted key {k}"),
        None => "unsigned (development image)".to_string(),
    };
    let trust = match verified.downgrade() {
        Some(d) => format!(
            "{who}; SECURITY DOWNGRADE allowed by the operator: security version {} replaces \
             the running {}",
            d.manifest, d.running
        ),
        None => format!("{who}; security version {}", m.security_version),
    };
    Ok(ReleasePlan {
        full_url: format!("{dir}{}", m.compressed.name),
        delta_url,
        delta_expect,
        sha256: m.image.sha256.clone(),
        version: m.version.clone(),
        trust,
    })
}

/// Read the image's trust files under `root` (bounded: at most [`MAX_KEY_FILES`] entries of at
/// most [`MAX_KEY_FILE_BYTES`] each), to be judged by [`ImageTrust::judge`].
pub fn read_files(root: &Path) -> ImageFiles {
    let mut files = ImageFiles::default();
    let dir = root.join(TRUSTED_KEYS_DIR);
    match std::fs::read_dir(&dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => files
            .key_dir_problems
            .push(format!("cannot list {}: {e}", dir.display())),
        Ok(rd) => {
            let mut names = Vec::new();
            // More than a few hundred entries is no image keel-image made; stop listing there.
            for entry in rd.take(4 * MAX_KEY_FILES) {
                match entry {
                    Ok(e) => names.push(e.file_name().to_string_lossy().into_owned()),
                    Err(e) => files
                        .key_dir_problems
                        .push(format!("cannot list {}: {e}", dir.display())),
                }
            }
            names.sort();
            if names.len() > MAX_KEY_FILES {
                files.key_dir_problems.push(format!(
                    "{} has more than {MAX_KEY_FILES} entries; only the first {MAX_KEY_FILES} by \
                     name were read",
                    dir.display()
                ));
                names.truncate(MAX_KEY_FILES);
            }
            let read = names
                .into_iter()
                .map(|n| {
                    let text = read_bounded(&dir.join(&n), MAX_KEY_FILE_BYTES);
                    (n, text)
                })
                .collect();
            files.key_files = Some(read);
        }
    }
    let sv = root.join(SECURITY_VERSION_FILE);
    files.security_version = match std::fs::symlink_metadata(&sv) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        _ => Some(read_bounded(&sv, MAX_SECURITY_VERSION_BYTES)),
    };
    files
}

/// A small text file, refused when longer than `max` bytes or not UTF-8.
fn read_bounded(path: &Path, max: usize) -> Result<String, String> {
    let f = std::fs::File::open(path).map_err(|e| format!("cannot read it: {e}"))?;
    let mut buf = Vec::new();
    f.take(max as u64 + 1)
        .read_to_end(&mut buf)
        .map_err(|e| format!("cannot read it: {e}"))?;
    if buf.len() > max {
        return Err(format!("it is larger than {max} bytes"));
    }
    String::from_utf8(buf).map_err(|_| "it is not UTF-8 text".to_string())
}

/// The running image's trust, read from `root` (`/` on a node) and judged.
pub fn load(root: &Path) -> ImageTrust {
    ImageTrust::judge(read_files(root))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::panic)]
mod tests {
    use super::*;

    // A real minisign public key (the one in minisign's own documentation).
    const KEY: &str = "untrusted comment: minisign public key 2A2C6D2B8C2B7F3C\n\
                       RWQf6LRCGA9i53mlYecO4IzT51TGPpvWucNSCh1CBM0QTaLn73Y7GFO3\n";

    fn key_name() -> String {
        TrustedKey::parse("k", KEY).unwrap().file_name()
    }

    fn files(keys: Vec<(&str, Result<&str, &str>)>, sv: Option<&str>) -> ImageFiles {
        ImageFiles {
            key_files: Some(
                keys.into_iter()
                    .map(|(n, c)| (n.to_string(), c.map(str::to_string).map_err(str::to_string)))
                    .collect(),
            ),
            key_dir_problems: vec![],
            security_version: sv.map(|s| Ok(s.to_string())),
        }
    }

    #[test]
    fn no_key_directory_is_development_and_no_version_file_is_zero() {
        let t = ImageTrust::judge(ImageFiles::default());
        assert_eq!(t, ImageTrust::development());
        assert!(t
            .describe()
            .starts_with("development: unsigned images accepted"));
        assert!(t.admit_plain_install().is_ok());
        // an empty key directory is no key either
        assert!(!ImageTrust::judge(files(vec![], Some("4\n"))).is_signed());
    }

    #[test]
    fn a_good_key_and_a_malformed_one_is_signed_mode_with_one_key_and_a_problem() {
        let name = key_name();
        let t = ImageTrust::judge(files(
            vec![(&name, Ok(KEY)), ("broken.pub", Ok("not a key"))],
            Some("3\n"),
        ));
        assert!(t.is_signed());
        assert_eq!(t.keys().len(), 1);
        assert_eq!(t.security_version(), Some(3));
        assert_eq!(t.problems().len(), 1, "{:?}", t.problems());
        assert!(t.problems()[0].contains("broken.pub"), "{:?}", t.problems());
        let d = t.describe();
        assert!(d.starts_with("signed: 1 trusted key ("), "{d}");
        assert!(d.contains("security version 3"), "{d}");
        assert!(d.contains("broken.pub"), "{d}");
        let e = t.admit_plain_install().unwrap_err();
        assert!(e.to_string().contains("--release"), "{e}");
    }

    #[test]
    fn only_unreadable_keys_refuse_every_release_even_unsigned() {
        for bad in [
            files(vec![("x.pub", Err("permission denied"))], None),
            files(vec![("x.pub", Ok("garbage"))], None),
            // a real key under another key's name is not trusted either
            files(vec![("0000000000000000.pub", Ok(KEY))], None),
            ImageFiles {
                key_files: None,
                key_dir_problems: vec!["cannot list it".into()],
                security_version: None,
            },
        ] {
            let t = ImageTrust::judge(bad.clone());
            assert!(t.is_signed(), "{bad:?}");
            assert!(t.keys().is_empty());
            let e = t.check_release(b"{}", None, false).unwrap_err();
            assert!(matches!(e, ReleaseError::NoUsableKeys { .. }), "{e:?}");
            assert!(t.admit_plain_install().is_err());
        }
    }

    #[test]
    fn an_unreadable_security_version_makes_every_release_a_downgrade() {
        let t = ImageTrust::judge(files(vec![], Some("three")));
        assert_eq!(t.security_version(), None);
        assert!(
            t.describe().contains("security version unknown"),
            "{}",
            t.describe()
        );
        assert!(t.problems()[0].contains("--allow-downgrade"));
    }

    #[test]
    fn release_urls_resolve_to_their_directory() {
        assert_eq!(
            release_dir("http://h:8/r/1.2/release.json").unwrap(),
            "http://h:8/r/1.2/"
        );
        assert_eq!(release_dir("https://h/release.json").unwrap(), "https://h/");
        for bad in [
            "http://h",
            "http://h/",
            "http://h/r/",
            "http://h/r/release.json?sig=x",
            "http://h/r/release.json#x",
            "ftp://h/release.json",
        ] {
            assert!(release_dir(bad).is_err(), "{bad}");
        }
        assert_eq!(
            signature_url("http://h/r/release.json"),
            "http://h/r/release.json.minisig"
        );
    }

    fn a_manifest(security_version: u64, delta_base: char, name: &str) -> Vec<u8> {
        let h = |c: char| std::iter::repeat_n(c, 64).collect::<String>();
        manifest::Manifest {
            format: manifest::FORMAT,
            version: "2.0".into(),
            security_version,
            kernel_release: "6.1.0".into(),
            kernel_sha256: h('e'),
            initramfs_sha256: h('f'),
            image: manifest::Image {
                sha256: h('a'),
                size: 10,
            },
            compressed: manifest::Artifact {
                name: name.into(),
                sha256: h('b'),
                size: 5,
            },
            delta: Some(manifest::DeltaArtifact {
                name: "d.bsdiff".into(),
                base_sha256: h(delta_base),
                sha256: h('d'),
                size: 3,
            }),
            verity: None,
        }
        .to_bytes()
    }

    #[test]
    fn a_release_is_planned_beside_its_manifest_with_the_delta_only_for_its_base() {
        let dev = ImageTrust::development();
        let v = dev
            .check_release(&a_manifest(1, 'c', "root.img.zst"), None, false)
            .unwrap();
        let url = "http://h:1/r/2.0/release.json";
        let running = "c".repeat(64);
        let p = plan(&v, url, Some(&running)).unwrap();
        assert_eq!(p.full_url, "http://h:1/r/2.0/root.img.zst");
        assert_eq!(p.delta_url.as_deref(), Some("http://h:1/r/2.0/d.bsdiff"));
        assert_eq!(p.sha256, "a".repeat(64));
        assert_eq!(p.version, "2.0");
        assert!(p.trust.contains("unsigned"), "{}", p.trust);
        // another running image, or none known: no delta
        assert_eq!(
            plan(&v, url, Some(&"9".repeat(64))).unwrap().delta_url,
            None
        );
        assert_eq!(plan(&v, url, None).unwrap().delta_url, None);
        // a name that would change the URL's meaning is refused
        let v = dev
            .check_release(&a_manifest(1, 'c', "root.img?x=1"), None, false)
            .unwrap();
        assert!(matches!(
            plan(&v, url, None),
            Err(ReleaseError::UnsafeArtifactName { .. })
        ));
    }

    #[test]
    fn a_downgrade_is_refused_or_planned_with_both_versions_named() {
        let t = ImageTrust::judge(files(vec![], Some("4")));
        let m = a_manifest(3, 'c', "root.img.zst");
        let e = t.check_release(&m, None, false).unwrap_err();
        assert!(e.to_string().contains("lower than the running 4"), "{e}");
        let v = t.check_release(&m, None, true).unwrap();
        let p = plan(&v, "http://h/release.json", None).unwrap();
        assert!(
            p.trust
                .contains("security version 3 replaces the running 4"),
            "{}",
            p.trust
        );
    }

    #[test]
    fn the_key_directory_is_read_bounded() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join(TRUSTED_KEYS_DIR);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(key_name()), KEY).unwrap();
        std::fs::write(dir.join("big.pub"), vec![b'a'; MAX_KEY_FILE_BYTES + 1]).unwrap();
        for i in 0..MAX_KEY_FILES {
            std::fs::write(dir.join(format!("z{i:02}.pub")), "x").unwrap();
        }
        std::fs::write(d.path().join(SECURITY_VERSION_FILE), "5\n").unwrap();
        let f = read_files(d.path());
        assert_eq!(f.key_files.as_ref().unwrap().len(), MAX_KEY_FILES);
        assert_eq!(f.key_dir_problems.len(), 1, "{:?}", f.key_dir_problems);
        let t = ImageTrust::judge(f);
        assert!(t.is_signed());
        assert_eq!(t.keys().len(), 1);
        assert_eq!(t.security_version(), Some(5));
        assert!(t.problems().iter().any(|p| p.contains("larger than 4096")));
        // nothing at all: development, security version 0
        let empty = tempfile::tempdir().unwrap();
        assert_eq!(load(empty.path()), ImageTrust::development());
    }
}
