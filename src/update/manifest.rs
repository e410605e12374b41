//! Signed release manifests: what a release is (its version, security version and the digests
//! of its artifacts) and the decision whether a node may install it.
//!
//! Pure: this module reads no files, no clock, no environment and runs no async code. The
//! caller passes the bytes of `release.json`, of `release.json.minisig`, the text of the trusted
//! public keys its image carries (under [`TRUSTED_KEYS_DIR`]) and the running security version.
//!
//! A manifest is signed with Ed25519 in the minisign format (the stock `minisign` tool signs it
//! offline; `keel-image build release --sign` can too). [`verify`] checks, in this order and
//! before anything is parsed as JSON: the size caps, the signature file's shape, that its key id
//! is one of the trusted keys, and the signature itself. Only then is the JSON read and its
//! fields checked, then the security version is compared with the running one. Signatures do
//! not expire (a node may be offline for years and still take a release signed for it).
//!
//! Signature forms: the prehashed form (`ED`, BLAKE2b-512 of the file signed with Ed25519) that
//! `minisign -S` makes by default and the legacy form (`Ed`, the file itself signed, made by
//! `minisign -S -l`) are both accepted, because `minisign-verify` verifies both and a 64 KiB
//! manifest is small enough that prehashing adds no safety. [`VerifiedManifest::signature_form`]
//! says which one it was.
//!
//! Only the untrusted comment (the first line of the signature file, after
//! `untrusted comment: `) is outside the signature, by the minisign format's design; nothing here
//! reads it.

use base64::Engine as _;
use serde::{Deserialize, Serialize};
use std::fmt;

/// The manifest format this code reads and writes.
pub const FORMAT: u64 = 1;
/// Largest manifest accepted; a real one is about 1 KiB.
pub const MAX_MANIFEST_BYTES: usize = 64 << 10;
/// Largest signature file accepted; a real one is about 300 bytes.
pub const MAX_SIGNATURE_BYTES: usize = 4 << 10;
/// Where an image carries the minisign public keys it trusts, relative to its root: one file per
/// key, named `<KEY ID>.pub` (16 uppercase hex digits, as `minisign` prints key ids).
pub const TRUSTED_KEYS_DIR: &str = "etc/keel/trusted-keys";
/// Where an image records its own security version, relative to its root: one decimal number
/// and a newline. An image without the file has security version 0.
pub const SECURITY_VERSION_FILE: &str = "etc/keel/security-version";
/// The manifest's file name in a release directory.
pub const MANIFEST_FILE: &str = "release.json";
/// The signature's file name in a release directory (minisign's default for [`MANIFEST_FILE`]).
pub const SIGNATURE_FILE: &str = "release.json.minisig";

const UNTRUSTED_PREFIX: &str = "untrusted comment: ";
const TRUSTED_PREFIX: &str = "trusted comment: ";

/// A release manifest (`release.json`).
///
/// Unknown fields are refused: the manifest is signed, so an unknown field was put there by a
/// newer builder on purpose, and it may restrict where the release may go; ignoring it would
/// take a release its signer did not mean for this node. A new field therefore comes with a new
/// [`FORMAT`], which older nodes refuse by name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// Always [`FORMAT`].
    pub format: u64,
    /// The release's version (its /etc/os-release VERSION).
    pub version: String,
    /// Increases whenever a release fixes something that older ones must not be allowed to
    /// bring back; a node refuses a lower one than it runs unless told otherwise.
    pub security_version: u64,
    /// `uname -r` of the slot's kernel.
    pub kernel_release: String,
    /// SHA-256 of the slot's kernel (`/boot/vmlinuz` in the image).
    pub kernel_sha256: String,
    /// SHA-256 of the slot's initramfs (`/boot/initramfs.img` in the image).
    pub initramfs_sha256: String,
    /// The uncompressed root image, as written to a slot.
    pub image: Image,
    /// The resumable zstd form of the image, beside the manifest.
    pub compressed: Artifact,
    /// The delta from a previous release's image, beside the manifest, when there is one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delta: Option<DeltaArtifact>,
    /// The image's dm-verity parameters, once releases carry them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verity: Option<Verity>,
}

/// The uncompressed root image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Image {
    pub sha256: String,
    pub size: u64,
}

/// A file beside the manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Artifact {
    /// A plain file name, relative to the manifest's directory or URL.
    pub name: String,
    pub sha256: String,
    pub size: u64,
}

/// A delta beside the manifest: applied to the image whose SHA-256 is `base_sha256`, it gives
/// [`Manifest::image`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeltaArtifact {
    pub name: String,
    pub base_sha256: String,
    pub sha256: String,
    pub size: u64,
}

/// dm-verity parameters of the image (hex strings as `veritysetup` prints them).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Verity {
    pub root_hash: String,
    pub salt: String,
    /// Bytes of the image covered by the hash tree.
    pub data_size: u64,
    /// Where the hash tree starts in the image.
    pub hash_offset: u64,
}

/// A minisign key id: the 8 bytes after the algorithm in keys and signatures. Displayed as
/// `minisign` does (uppercase hex of the little-endian number), always with 16 digits, since it
/// names files; minisign 0.11 leaves out leading zeros in the `.pub` file's comment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct KeyId(pub [u8; 8]);

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016X}", u64::from_le_bytes(self.0))
    }
}

/// One trusted minisign public key.
#[derive(Debug, Clone)]
pub struct TrustedKey {
    id: KeyId,
    /// The base64 line of the key file.
    base64: String,
    key: minisign_verify::PublicKey,
}

impl TrustedKey {
    /// Parse the text of a minisign public key file (`untrusted comment: ...` then the base64
    /// line), as `minisign -G` writes it. `source` names the file in errors.
    pub fn parse(source: &str, text: &str) -> Result<TrustedKey, ManifestError> {
        let bad = |why: &str| ManifestError::BadPublicKey {
            source_name: source.to_string(),
            why: why.to_string(),
        };
        let mut lines = text.lines();
        let comment = lines.next().unwrap_or_default();
        if !comment.starts_with(UNTRUSTED_PREFIX) {
            return Err(bad(
                "its first line does not start with \"untrusted comment: \"",
            ));
        }
        let b64 = lines.next().unwrap_or_default().trim();
        if lines.any(|l| !l.trim().is_empty()) {
            return Err(bad("it has more than two lines"));
        }
        let bin = base64::engine::general_purpose::STANDARD
            .decode(b64)
            .map_err(|e| bad(&format!("its second line is not base64 ({e})")))?;
        if bin.len() != 42 || &bin[..2] != b"Ed" {
            return Err(bad("its second line is not an Ed25519 minisign public key"));
        }
        let key = minisign_verify::PublicKey::from_base64(b64)
            .map_err(|e| bad(&format!("minisign-verify refuses it: {e}")))?;
        let mut id = [0u8; 8];
        id.copy_from_slice(&bin[2..10]);
        Ok(TrustedKey {
            id: KeyId(id),
            base64: b64.to_string(),
            key,
        })
    }

    pub fn id(&self) -> KeyId {
        self.id
    }

    /// The file name an image carries this key under in [`TRUSTED_KEYS_DIR`].
    pub fn file_name(&self) -> String {
        format!("{}.pub", self.id)
    }

    /// The key as a minisign public key file (what `minisign -G` writes, and `minisign -V -p`
    /// reads).
    pub fn to_file_text(&self) -> String {
        format!(
            "{UNTRUSTED_PREFIX}minisign public key {}\n{}\n",
            self.id, self.base64
        )
    }
}

impl PartialEq for TrustedKey {
    fn eq(&self, other: &Self) -> bool {
        self.base64 == other.base64
    }
}

/// The keys an image trusts. Empty means a development image: it verifies nothing, and
/// [`verify`] refuses to pretend otherwise (see [`accept_unsigned`]).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TrustedKeys {
    keys: Vec<TrustedKey>,
}

impl TrustedKeys {
    /// Keys from minisign public key files: `(name, text)` pairs, the name used in errors. Two
    /// keys with the same key id are refused, whether or not they are the same key.
    pub fn parse<'a>(
        files: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> Result<TrustedKeys, ManifestError> {
        let mut keys = TrustedKeys::default();
        for (name, text) in files {
            keys.insert(TrustedKey::parse(name, text)?)?;
        }
        Ok(keys)
    }

    /// Add one key; a second key with the same id is refused.
    pub fn insert(&mut self, key: TrustedKey) -> Result<(), ManifestError> {
        if self.get(key.id).is_some() {
            return Err(ManifestError::DuplicateKeyId { key_id: key.id });
        }
        self.keys.push(key);
        self.keys.sort_by_key(|k| k.id);
        Ok(())
    }

    pub fn get(&self, id: KeyId) -> Option<&TrustedKey> {
        self.keys.iter().find(|k| k.id == id)
    }

    /// Whether `key` (the same key, not only the same id) is trusted.
    pub fn contains(&self, key: &TrustedKey) -> bool {
        self.get(key.id) == Some(key)
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn iter(&self) -> impl Iterator<Item = &TrustedKey> {
        self.keys.iter()
    }

    fn ids(&self) -> String {
        let ids: Vec<String> = self.keys.iter().map(|k| k.id.to_string()).collect();
        ids.join(", ")
    }
}

/// What the node allows besides a valid signature.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    /// The security version of the running release (0 when it has none).
    pub running_security_version: u64,
    /// The operator asked, explicitly, to install a lower security version. The signature is
    /// still required; the caller must log the downgrade ([`VerifiedManifest::downgrade`]).
    pub allow_downgrade: bool,
}

/// Which minisign signature form a manifest was signed with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SignatureForm {
    /// `ED`: BLAKE2b-512 of the file, signed (the stock tool's default).
    Prehashed,
    /// `Ed`: the file itself, signed (`minisign -S -l`).
    Legacy,
}

/// Who vouches for a manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Authority {
    /// A valid signature by a trusted key.
    Signed {
        key_id: KeyId,
        form: SignatureForm,
        /// The signature's trusted comment (signed too; `minisign -V` prints it).
        trusted_comment: String,
    },
    /// No signature: the image trusts no key (a development image).
    UnsignedDevelopment,
}

/// A security-version downgrade that the operator allowed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Downgrade {
    pub running: u64,
    pub manifest: u64,
}

/// A manifest that passed [`verify`] (or [`accept_unsigned`]); only they make one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedManifest {
    manifest: Manifest,
    authority: Authority,
    downgrade: Option<Downgrade>,
}

impl VerifiedManifest {
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    pub fn into_manifest(self) -> Manifest {
        self.manifest
    }

    pub fn authority(&self) -> &Authority {
        &self.authority
    }

    /// The signing key's id, when the manifest was signed.
    pub fn key_id(&self) -> Option<KeyId> {
        match &self.authority {
            Authority::Signed { key_id, .. } => Some(*key_id),
            Authority::UnsignedDevelopment => None,
        }
    }

    pub fn signature_form(&self) -> Option<SignatureForm> {
        match &self.authority {
            Authority::Signed { form, .. } => Some(*form),
            Authority::UnsignedDevelopment => None,
        }
    }

    /// Set when the manifest's security version is lower than the running one and the policy
    /// allowed it: the caller must log it.
    pub fn downgrade(&self) -> Option<Downgrade> {
        self.downgrade
    }
}

/// Why a manifest, a signature or a trusted key was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ManifestError {
    /// The manifest is larger than any real one; it was not read.
    #[error(
        "the release manifest is {len} bytes, more than the {max} allowed; it was not read: \
         check that the URL points at a release.json made by keel-image"
    )]
    ManifestTooLarge { len: usize, max: usize },
    /// The signature file is larger than any real one; it was not read.
    #[error(
        "the manifest signature is {len} bytes, more than the {max} allowed; it was not read: \
         check that the URL points at the release.json.minisig made by minisign"
    )]
    SignatureTooLarge { len: usize, max: usize },
    /// [`verify`] was asked to check a signature with no trusted key.
    #[error(
        "this image trusts no signing key, so no signature can be checked; build the image with \
         `keel-image build release --trust KEY.pub` (development images take unsigned releases)"
    )]
    NoTrustedKeys,
    /// The image trusts keys but the release has no signature.
    #[error(
        "the release is not signed, and this image trusts signing keys ({trusted}): sign \
         release.json with `minisign -S -s KEY -m release.json` and publish release.json.minisig \
         beside it"
    )]
    Unsigned { trusted: String },
    /// The signature file is not a minisign signature (or was truncated or altered).
    #[error(
        "the manifest signature is not a well-formed minisign signature ({why}); it may be \
         truncated or altered: fetch release.json.minisig again or ask for the release to be \
         re-signed"
    )]
    MalformedSignature { why: String },
    /// The signature was made by a key the image does not trust.
    #[error(
        "the manifest is signed by key {key_id}, which this image does not trust (it trusts \
         {trusted}): install a release signed by a trusted key, or first a release whose image \
         trusts {key_id}"
    )]
    UnknownKeyId { key_id: KeyId, trusted: String },
    /// The signature does not match the manifest.
    #[error(
        "the manifest's signature by key {key_id} does not verify: release.json or its signature \
         was altered or truncated (or they belong to different releases); refusing it, fetch \
         both again from the release's origin"
    )]
    BadSignature { key_id: KeyId },
    /// The (signed) manifest is not JSON of the expected shape.
    #[error(
        "the release manifest is not a valid manifest: {why}; report it to whoever made the \
         release (a signed one was signed like that by a trusted key)"
    )]
    NotAManifest { why: String },
    /// The manifest's format is one this node cannot read.
    #[error(
        "the release manifest has format {format}, this node reads format {FORMAT}: install an \
         intermediate release that reads both first"
    )]
    UnsupportedFormat { format: u64 },
    /// A field has the wrong shape.
    #[error(
        "the release manifest's {field} is invalid: {why}; report it to whoever made the \
         release"
    )]
    BadField { field: String, why: String },
    /// The manifest would lower the security version.
    #[error(
        "the release has security version {manifest}, lower than the running {running}: it may \
         bring back a fixed vulnerability; install a newer release, or pass --allow-downgrade \
         if you mean it (it is logged)"
    )]
    Downgrade { running: u64, manifest: u64 },
    /// A trusted key file is not a minisign public key.
    #[error(
        "{source_name} is not a minisign public key ({why}): use the .pub file written by \
         `minisign -G`"
    )]
    BadPublicKey { source_name: String, why: String },
    /// Two trusted keys have the same key id.
    #[error(
        "two trusted keys have the key id {key_id}: give each key once (ids must be unique to \
         choose the key that checks a signature)"
    )]
    DuplicateKeyId { key_id: KeyId },
}

/// The text of an image's [`SECURITY_VERSION_FILE`] (as [`security_version_text`] writes it):
/// one decimal number, surrounding white space allowed. `Err` says what is wrong with it.
pub fn parse_security_version(text: &str) -> Result<u64, String> {
    let t = text.trim();
    if t.is_empty() || t.len() > 20 || !t.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!(
            "{:?} is not a decimal number",
            t.chars().take(40).collect::<String>()
        ));
    }
    t.parse::<u64>()
        .map_err(|e| format!("{t:?} is not a security version ({e})"))
}

/// The content of an image's [`SECURITY_VERSION_FILE`] for `security_version`.
pub fn security_version_text(security_version: u64) -> String {
    format!("{security_version}\n")
}

/// Check a signed manifest: sizes, signature (by a trusted key), then the JSON and its fields,
/// then the security version against `policy`. Nothing but the result may be used from the
/// bytes.
pub fn verify(
    manifest: &[u8],
    signature: &[u8],
    keys: &TrustedKeys,
    policy: Policy,
) -> Result<VerifiedManifest, ManifestError> {
    check_size(manifest)?;
    if signature.len() > MAX_SIGNATURE_BYTES {
        return Err(ManifestError::SignatureTooLarge {
            len: signature.len(),
            max: MAX_SIGNATURE_BYTES,
        });
    }
    if keys.is_empty() {
        return Err(ManifestError::NoTrustedKeys);
    }
    let sig = SignatureFile::parse(signature)?;
    let key = keys
        .get(sig.key_id)
        .ok_or_else(|| ManifestError::UnknownKeyId {
            key_id: sig.key_id,
            trusted: keys.ids(),
        })?;
    let decoded = minisign_verify::Signature::decode(sig.text)
        .map_err(|e| ManifestError::MalformedSignature { why: e.to_string() })?;
    key.key
        .verify(manifest, &decoded, true)
        .map_err(|_| ManifestError::BadSignature { key_id: key.id })?;
    let authority = Authority::Signed {
        key_id: key.id,
        form: sig.form,
        trusted_comment: decoded.trusted_comment().to_string(),
    };
    accept(Manifest::parse(manifest)?, authority, policy)
}

/// Accept an unsigned manifest, which only a development image (one that trusts no key) may
/// do: with trusted keys this is [`ManifestError::Unsigned`]. The fields and the security
/// version are checked as [`verify`] does.
pub fn accept_unsigned(
    manifest: &[u8],
    keys: &TrustedKeys,
    policy: Policy,
) -> Result<VerifiedManifest, ManifestError> {
    check_size(manifest)?;
    if !keys.is_empty() {
        return Err(ManifestError::Unsigned {
            trusted: keys.ids(),
        });
    }
    accept(
        Manifest::parse(manifest)?,
        Authority::UnsignedDevelopment,
        policy,
    )
}

fn check_size(manifest: &[u8]) -> Result<(), ManifestError> {
    if manifest.len() > MAX_MANIFEST_BYTES {
        return Err(ManifestError::ManifestTooLarge {
            len: manifest.len(),
            max: MAX_MANIFEST_BYTES,
        });
    }
    Ok(())
}

fn accept(
    manifest: Manifest,
    authority: Authority,
    policy: Policy,
) -> Result<VerifiedManifest, ManifestError> {
    let (running, m) = (policy.running_security_version, manifest.security_version);
    let downgrade = if m >= running {
        None
    } else if policy.allow_downgrade {
        Some(Downgrade {
            running,
            manifest: m,
        })
    } else {
        return Err(ManifestError::Downgrade {
            running,
            manifest: m,
        });
    };
    Ok(VerifiedManifest {
        manifest,
        authority,
        downgrade,
    })
}

/// The four lines of a minisign signature file, checked strictly: exactly four lines, each
/// ended by a newline, no carriage returns (so a byte changed anywhere
/// but in the untrusted comment's text is refused).
struct SignatureFile<'a> {
    text: &'a str,
    key_id: KeyId,
    form: SignatureForm,
}

impl<'a> SignatureFile<'a> {
    fn parse(bytes: &'a [u8]) -> Result<SignatureFile<'a>, ManifestError> {
        let bad = |why: &str| ManifestError::MalformedSignature {
            why: why.to_string(),
        };
        let text = std::str::from_utf8(bytes).map_err(|_| bad("it is not UTF-8 text"))?;
        if text.contains('\r') {
            return Err(bad("it holds a carriage return"));
        }
        // Both minisign and keel-image end the file with a newline: a file without it was
        // truncated.
        let body = text
            .strip_suffix('\n')
            .ok_or_else(|| bad("it does not end with a newline (truncated?)"))?;
        let lines: Vec<&str> = body.split('\n').collect();
        let [untrusted, sig, trusted, global] = lines.as_slice() else {
            return Err(bad(&format!("it has {} lines, not 4", lines.len())));
        };
        if !untrusted.starts_with(UNTRUSTED_PREFIX) {
            return Err(bad(
                "its first line does not start with \"untrusted comment: \"",
            ));
        }
        if !trusted.starts_with(TRUSTED_PREFIX) {
            return Err(bad(
                "its third line does not start with \"trusted comment: \"",
            ));
        }
        let b64 = base64::engine::general_purpose::STANDARD;
        let bin = b64
            .decode(sig)
            .map_err(|_| bad("its signature line is not base64"))?;
        if bin.len() != 74 {
            return Err(bad("its signature line is not 74 bytes"));
        }
        if b64.decode(global).map(|g| g.len()) != Ok(64) {
            return Err(bad("its global signature line is not 64 bytes of base64"));
        }
        let form = match &bin[..2] {
            b"ED" => SignatureForm::Prehashed,
            b"Ed" => SignatureForm::Legacy,
            _ => {
                return Err(bad(
                    "its algorithm is neither ED (prehashed) nor Ed (legacy)",
                ))
            }
        };
        let mut id = [0u8; 8];
        id.copy_from_slice(&bin[2..10]);
        Ok(SignatureFile {
            text,
            key_id: KeyId(id),
            form,
        })
    }
}

#[derive(Deserialize)]
struct FormatOnly {
    format: u64,
}

impl Manifest {
    /// Parse and check a manifest's bytes (only after its signature verified: [`verify`]).
    /// The format is read first, so a newer manifest is refused for its format, not for the
    /// fields it added.
    pub fn parse(bytes: &[u8]) -> Result<Manifest, ManifestError> {
        check_size(bytes)?;
        let not = |e: serde_json::Error| ManifestError::NotAManifest { why: e.to_string() };
        let FormatOnly { format } = serde_json::from_slice(bytes).map_err(not)?;
        if format != FORMAT {
            return Err(ManifestError::UnsupportedFormat { format });
        }
        let m: Manifest = serde_json::from_slice(bytes).map_err(not)?;
        m.check()?;
        Ok(m)
    }

    /// The manifest as written to `release.json` (pretty JSON and a final newline); these are
    /// the bytes that are signed.
    pub fn to_bytes(&self) -> Vec<u8> {
        // A struct of strings and integers always serializes.
        let mut v = serde_json::to_vec_pretty(self).unwrap_or_default();
        v.push(b'\n');
        v
    }

    /// Check every field's shape.
    pub fn check(&self) -> Result<(), ManifestError> {
        if self.format != FORMAT {
            return Err(ManifestError::UnsupportedFormat {
                format: self.format,
            });
        }
        text("version", &self.version)?;
        text("kernel_release", &self.kernel_release)?;
        sha256("kernel_sha256", &self.kernel_sha256)?;
        sha256("initramfs_sha256", &self.initramfs_sha256)?;
        sha256("image.sha256", &self.image.sha256)?;
        nonzero("image.size", self.image.size)?;
        file_name("compressed.name", &self.compressed.name)?;
        sha256("compressed.sha256", &self.compressed.sha256)?;
        nonzero("compressed.size", self.compressed.size)?;
        if let Some(d) = &self.delta {
            file_name("delta.name", &d.name)?;
            if d.name == self.compressed.name {
                return Err(field("delta.name", "it is the compressed image's name"));
            }
            sha256("delta.base_sha256", &d.base_sha256)?;
            sha256("delta.sha256", &d.sha256)?;
            nonzero("delta.size", d.size)?;
        }
        if let Some(v) = &self.verity {
            sha256("verity.root_hash", &v.root_hash)?;
            if v.salt.len() > 512 || v.salt.len() % 2 != 0 || !is_lower_hex(&v.salt) {
                return Err(field(
                    "verity.salt",
                    "it is not lowercase hex of at most 256 bytes",
                ));
            }
            nonzero("verity.data_size", v.data_size)?;
            if v.hash_offset < v.data_size {
                return Err(field(
                    "verity.hash_offset",
                    "it is inside the data the hash tree covers",
                ));
            }
        }
        Ok(())
    }
}

fn field(name: &str, why: &str) -> ManifestError {
    ManifestError::BadField {
        field: name.to_string(),
        why: why.to_string(),
    }
}

fn is_lower_hex(s: &str) -> bool {
    s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

fn sha256(name: &str, v: &str) -> Result<(), ManifestError> {
    if v.len() == 64 && is_lower_hex(v) {
        Ok(())
    } else {
        Err(field(
            name,
            "it is not a SHA-256 digest (64 lowercase hex digits)",
        ))
    }
}

fn nonzero(name: &str, v: u64) -> Result<(), ManifestError> {
    if v == 0 {
        Err(field(name, "it is 0"))
    } else {
        Ok(())
    }
}

fn text(name: &str, v: &str) -> Result<(), ManifestError> {
    if v.is_empty() || v.len() > 128 || v.chars().any(|c| c.is_control() || c.is_whitespace()) {
        Err(field(
            name,
            "it is empty, longer than 128 bytes, or holds spaces or control characters",
        ))
    } else {
        Ok(())
    }
}

/// A plain file name relative to the manifest: not empty, no '/', not `.` or `..`.
fn file_name(name: &str, v: &str) -> Result<(), ManifestError> {
    if v.is_empty()
        || v.len() > 255
        || v.contains('/')
        || v.contains('\\')
        || v == "."
        || v == ".."
        || v.contains("..")
        || v.chars().any(char::is_control)
    {
        Err(field(
            name,
            "it is not a plain file name beside the manifest (empty, a path, or holds ..)",
        ))
    } else {
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::panic)]
mod tests {
    use super::*;

    // Made once with the stock tool: `minisign -G -W -p k.pub -s k.key`, then
    // `minisign -S -s k.key -m release.json` over `example()` written with `to_bytes()` is
    // in tests/release_manifest.rs; here the keys are only parsed.
    const PUB: &str = "untrusted comment: minisign public key 1F3CB6B653C8D383\n\
                       RWSD08hTtrY8H/xD+33gVdRC+P3jz2WCd4ReY/jJD4pOpgEj8swcF6+M\n";

    fn d(c: char) -> String {
        std::iter::repeat_n(c, 64).collect()
    }

    fn example() -> Manifest {
        Manifest {
            format: FORMAT,
            version: "1.2.0".into(),
            security_version: 3,
            kernel_release: "6.1.0-48-amd64".into(),
            kernel_sha256: d('1'),
            initramfs_sha256: d('2'),
            image: Image {
                sha256: d('3'),
                size: 1 << 20,
            },
            compressed: Artifact {
                name: "root.img.zst".into(),
                sha256: d('4'),
                size: 1000,
            },
            delta: Some(DeltaArtifact {
                name: "delta-from-1.1.0.bsdiff".into(),
                base_sha256: d('5'),
                sha256: d('6'),
                size: 10,
            }),
            verity: None,
        }
    }

    #[test]
    fn key_ids_read_as_minisign_prints_them() {
        let k = TrustedKey::parse("k.pub", PUB).unwrap();
        assert_eq!(k.id().to_string(), "1F3CB6B653C8D383");
        assert_eq!(k.file_name(), "1F3CB6B653C8D383.pub");
        assert_eq!(
            k.to_file_text(),
            PUB.replace("\n                       ", "\n")
        );
        let again = TrustedKey::parse("again", &k.to_file_text()).unwrap();
        assert_eq!(again, k);
    }

    #[test]
    fn malformed_keys_and_duplicates_are_refused() {
        for text in [
            "",
            "RWSD08hTtrY8H/xD+33gVdRC+P3jz2WCd4ReY/jJD4pOpgEj8swcF6+M\n",
            "untrusted comment: x\nnot base64!\n",
            "untrusted comment: x\nRWSD08hTtrY8H/xD\n",
            "untrusted comment: x\nRWSD08hTtrY8H/xD+33gVdRC+P3jz2WCd4ReY/jJD4pOpgEj8swcF6+M\nmore\n",
        ] {
            let e = TrustedKey::parse("k.pub", text).unwrap_err();
            assert!(matches!(e, ManifestError::BadPublicKey { .. }), "{text:?}: {e}");
            assert!(e.to_string().contains("k.pub"), "{e}");
        }
        let e = TrustedKeys::parse([("a.pub", PUB), ("b.pub", PUB)]).unwrap_err();
        assert!(e.to_string().contains("1F3CB6B653C8D383"), "{e}");
    }

    #[test]
    fn a_manifest_round_trips_and_its_fields_are_checked() {
        let m = example();
        assert_eq!(Manifest::parse(&m.to_bytes()).unwrap(), m);
        type Change = fn(&mut Manifest);
        let bad: Vec<(&str, Change)> = vec![
            ("kernel_sha256", |m| m.kernel_sha256 = "abc".into()),
            ("image.sha256", |m| m.image.sha256 = d('A')),
            ("image.size", |m| m.image.size = 0),
            ("compressed.name", |m| m.compressed.name = "../x".into()),
            ("compressed.name", |m| m.compressed.name = "a/b".into()),
            ("compressed.name", |m| m.compressed.name = String::new()),
            ("delta.name", |m| {
                m.delta.as_mut().unwrap().name = "..".into()
            }),
            ("version", |m| m.version = "1 2".into()),
            ("verity.hash_offset", |m| {
                m.verity = Some(Verity {
                    root_hash: d('7'),
                    salt: "00ff".into(),
                    data_size: 8192,
                    hash_offset: 4096,
                })
            }),
        ];
        for (name, change) in bad {
            let mut m = example();
            change(&mut m);
            match Manifest::parse(&m.to_bytes()) {
                Err(ManifestError::BadField { field, .. }) => assert_eq!(field, name),
                other => panic!("{name}: {other:?}"),
            }
        }
    }

    #[test]
    fn unknown_fields_and_other_formats_are_refused() {
        let mut v: serde_json::Value = serde_json::from_slice(&example().to_bytes()).unwrap();
        v["extra"] = 1.into();
        let e = Manifest::parse(&serde_json::to_vec(&v).unwrap()).unwrap_err();
        assert!(matches!(e, ManifestError::NotAManifest { .. }), "{e}");
        v["format"] = 2.into();
        let e = Manifest::parse(&serde_json::to_vec(&v).unwrap()).unwrap_err();
        assert_eq!(e, ManifestError::UnsupportedFormat { format: 2 });
        assert!(matches!(
            Manifest::parse(b"{\"format\":1}"),
            Err(ManifestError::NotAManifest { .. })
        ));
    }

    #[test]
    fn unsigned_is_only_for_development_images() {
        let bytes = example().to_bytes();
        let policy = Policy {
            running_security_version: 3,
            allow_downgrade: false,
        };
        let v = accept_unsigned(&bytes, &TrustedKeys::default(), policy).unwrap();
        assert_eq!(v.authority(), &Authority::UnsignedDevelopment);
        let keys = TrustedKeys::parse([("k.pub", PUB)]).unwrap();
        let e = accept_unsigned(&bytes, &keys, policy).unwrap_err();
        assert!(matches!(e, ManifestError::Unsigned { .. }), "{e}");
        let e = verify(&bytes, b"", &TrustedKeys::default(), policy).unwrap_err();
        assert_eq!(e, ManifestError::NoTrustedKeys);
        let low = Policy {
            running_security_version: 4,
            allow_downgrade: false,
        };
        let e = accept_unsigned(&bytes, &TrustedKeys::default(), low).unwrap_err();
        assert_eq!(
            e,
            ManifestError::Downgrade {
                running: 4,
                manifest: 3
            }
        );
    }

    /// A fresh key pair (made by the minisign crate) and `example()` signed with it.
    fn signed(sv: u64) -> (TrustedKeys, Vec<u8>, Vec<u8>, KeyId) {
        let kp = minisign::KeyPair::generate_unencrypted_keypair().unwrap();
        let text = format!("untrusted comment: k\n{}\n", kp.pk.to_base64());
        let keys = TrustedKeys::parse([("k.pub", text.as_str())]).unwrap();
        let mut m = example();
        m.security_version = sv;
        let bytes = m.to_bytes();
        let sig = minisign::sign(Some(&kp.pk), &kp.sk, &bytes[..], Some("t"), None)
            .unwrap()
            .into_string();
        let id = keys.iter().next().unwrap().id();
        (keys, bytes, sig.into_bytes(), id)
    }

    #[test]
    fn a_signed_manifest_verifies_and_a_changed_one_does_not() {
        let (keys, bytes, sig, id) = signed(3);
        let v = verify(
            &bytes,
            &sig,
            &keys,
            Policy {
                running_security_version: 3,
                allow_downgrade: false,
            },
        )
        .unwrap();
        assert_eq!(v.manifest(), &example());
        assert_eq!(v.key_id(), Some(id));
        assert_eq!(v.signature_form(), Some(SignatureForm::Prehashed));
        let policy = Policy {
            running_security_version: 0,
            allow_downgrade: false,
        };
        let mut changed = bytes.clone();
        changed[10] ^= 0x20;
        assert_eq!(
            verify(&changed, &sig, &keys, policy).unwrap_err(),
            ManifestError::BadSignature { key_id: id }
        );
        // Another key: refused by its id, which is named.
        let (other, ..) = signed(3);
        let e = verify(&bytes, &sig, &other, policy).unwrap_err();
        assert!(
            matches!(e, ManifestError::UnknownKeyId { key_id, .. } if key_id == id),
            "{e}"
        );
        assert!(e.to_string().contains(&id.to_string()), "{e}");
    }

    #[test]
    fn a_lower_security_version_needs_allow_downgrade_and_is_flagged() {
        let (keys, bytes, sig, _) = signed(2);
        let strict = Policy {
            running_security_version: 3,
            allow_downgrade: false,
        };
        assert_eq!(
            verify(&bytes, &sig, &keys, strict).unwrap_err(),
            ManifestError::Downgrade {
                running: 3,
                manifest: 2
            }
        );
        let allowed = Policy {
            allow_downgrade: true,
            ..strict
        };
        let v = verify(&bytes, &sig, &keys, allowed).unwrap();
        assert_eq!(
            v.downgrade(),
            Some(Downgrade {
                running: 3,
                manifest: 2
            })
        );
    }

    #[test]
    fn sizes_are_capped_before_anything_is_read() {
        let keys = TrustedKeys::parse([("k.pub", PUB)]).unwrap();
        let policy = Policy {
            running_security_version: 0,
            allow_downgrade: false,
        };
        let big = vec![b'{'; MAX_MANIFEST_BYTES + 1];
        assert!(matches!(
            verify(&big, b"", &keys, policy),
            Err(ManifestError::ManifestTooLarge { .. })
        ));
        let big_sig = vec![b'x'; MAX_SIGNATURE_BYTES + 1];
        assert!(matches!(
            verify(b"{}", &big_sig, &keys, policy),
            Err(ManifestError::SignatureTooLarge { .. })
        ));
    }

    #[test]
    fn signature_files_are_read_strictly() {
        let keys = TrustedKeys::parse([("k.pub", PUB)]).unwrap();
        let policy = Policy {
            running_security_version: 0,
            allow_downgrade: false,
        };
        for sig in [
            &b""[..],
            b"untrusted comment: x\n",
            b"\xff\xfe",
            b"untrusted comment: x\r\nRUSD\ntrusted comment: t\nAAAA\n",
        ] {
            let e = verify(&example().to_bytes(), sig, &keys, policy).unwrap_err();
            assert!(matches!(e, ManifestError::MalformedSignature { .. }), "{e}");
        }
    }
}
