//! dm-verity hash trees in the format `veritysetup format` writes by default: format version 1
//! (hash type 1, the salt hashed before each block), SHA-256, 4096-byte data and hash blocks.
//! A slot's SquashFS carries its tree so that the kernel's dm-verity target checks every block
//! the node reads, against a root hash that comes from the signed release manifest.
//!
//! This module owns the bytes: the tree's shape for a data size ([`Layout`]), building a tree
//! from data fed in chunks ([`TreeBuilder`] → [`Tree`]), the on-disk superblock
//! ([`Superblock`]) and checking data against a tree and a root hash ([`Verifier`]). It never
//! does I/O, reads no clock and draws no randomness: the caller reads the file, passes the bytes
//! in and chooses the salt and the UUID (`keel-image verity format` draws 32 random bytes and a
//! random UUID).
//!
//! Memory: a builder keeps the tree and at most one partial data block, never the data: 32 bytes
//! per 4096-byte data block plus the upper levels, about 0.79% of the data (2 MiB for a 256 MiB
//! image). A verifier borrows the tree and holds one partial block.
//!
//! # Appended layout
//! A slot holds `[data][zeros to 4096][superblock, zero-padded to 4096][tree]`, byte for byte
//! what `veritysetup format --hash-offset=OFF IMG IMG` writes when IMG is the padded data and OFF
//! its size. The zeros that pad the data to 4096 are part of the data (they are hashed and the
//! kernel reads them), so the data size is always a multiple of 4096 ([`padded_data_size`]);
//! mksquashfs pads its images to 4 KiB already. The tree is written top level first, right after
//! the superblock, as veritysetup does. We keep the superblock (no `--no-superblock`): the slot
//! then describes itself (salt, sizes, UUID), so `veritysetup verify`/`open` and our own
//! verifier need only the hash offset and the root hash; the root hash alone must come from a
//! trusted place, since the superblock is not covered by the tree.
//!
//! Levels are numbered as in the kernel and cryptsetup: level 0 holds the hashes of the data
//! blocks, the top level is a single block whose salted hash is the root hash. A data area of
//! one block has no tree at all: its root hash is the salted hash of that block.

mod layout;
mod superblock;
mod tree;

pub use layout::{padded_data_size, tree_offset, Layout};
pub use superblock::{Superblock, SUPERBLOCK_SIZE};
pub use tree::{Tree, TreeBuilder, Verifier};

use sha2::{Digest, Sha256};

/// Size of a data block and of a hash block, in bytes.
pub const BLOCK_SIZE: usize = 4096;
/// Size of a SHA-256 digest, in bytes.
pub const DIGEST_SIZE: usize = 32;
/// Digests in one hash block.
pub const HASHES_PER_BLOCK: u64 = (BLOCK_SIZE / DIGEST_SIZE) as u64;
/// The longest salt the superblock can hold.
pub const MAX_SALT_SIZE: usize = 256;

/// What can be wrong with verity input. Each message says what is wrong and what to do.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerityError {
    /// The data is not a whole number of blocks.
    #[error(
        "the data is {len} bytes, not a multiple of 4096: pad it with zeros to the next 4096-byte \
         boundary (the padding is part of the data dm-verity covers)"
    )]
    UnalignedData { len: u64 },
    /// No data at all.
    #[error("the data is empty: a dm-verity tree covers at least one 4096-byte block")]
    EmptyData,
    /// More blocks than a 64-bit byte offset can address.
    #[error(
        "{data_blocks} data blocks of 4096 bytes do not fit a 64-bit size: the size is corrupt"
    )]
    TooManyBlocks { data_blocks: u64 },
    /// A salt longer than the superblock holds.
    #[error("the salt is {len} bytes; dm-verity takes at most 256 (use 32 random bytes)")]
    SaltTooLong { len: usize },
    /// A hex argument that does not parse.
    #[error("the {what} is not hex: {why}")]
    BadHex { what: &'static str, why: String },
    /// A root hash of the wrong length.
    #[error("the root hash is {len} bytes; a SHA-256 root hash is 32 bytes (64 hex characters)")]
    RootHashLength { len: usize },
    /// Fewer than 512 bytes where the superblock should be.
    #[error(
        "only {len} bytes where the 512-byte superblock should be: the image is truncated or the \
         hash offset is past its end"
    )]
    SuperblockTruncated { len: usize },
    /// No "verity" signature at the hash offset.
    #[error(
        "no dm-verity superblock at the hash offset (found {found:02x?}): check the hash offset; \
         for an image made by `keel-image verity format` it is the data size rounded up to 4096"
    )]
    BadSignature { found: [u8; 8] },
    /// A superblock version other than 1.
    #[error("dm-verity superblock version {0} is not supported; only version 1 is")]
    UnsupportedVersion(u32),
    /// A hash type other than 1.
    #[error(
        "dm-verity hash type {0} is not supported; only type 1 (veritysetup's default) is: \
         re-create the tree with `keel-image verity format`"
    )]
    UnsupportedHashType(u32),
    /// A hash algorithm other than SHA-256.
    #[error(
        "hash algorithm {0:?} is not supported; only sha256 is: re-create the tree with \
         `keel-image verity format`"
    )]
    UnsupportedAlgorithm(String),
    /// A block size other than 4096.
    #[error("{which} block size {size} is not supported; only 4096 is")]
    UnsupportedBlockSize { which: &'static str, size: u32 },
    /// The superblock claims a salt longer than its salt field.
    #[error("the superblock claims a {len}-byte salt; at most 256 fit: the superblock is corrupt")]
    BadSaltSize { len: usize },
    /// The tree handed to a verifier is not the size the data needs.
    #[error(
        "the hash tree is {len} bytes but {data_blocks} data blocks need {expected}: the image \
         is truncated or the hash offset is wrong"
    )]
    TreeSize {
        len: u64,
        expected: u64,
        data_blocks: u64,
    },
    /// A hash block does not match the hash above it (or the root hash, at the top).
    #[error(
        "hash block {block} of tree level {level} (0 = hashes of the data blocks) does not match \
         the hash above it: the tree is corrupt, or the root hash is not this image's"
    )]
    TreeBlockMismatch { level: usize, block: u64 },
    /// A data block does not match its hash in the tree.
    #[error(
        "data block {block} (bytes {} to {}) does not match the hash tree: the data is corrupt, \
         or the root hash is not this image's",
        block * BLOCK_SIZE as u64,
        (block + 1) * BLOCK_SIZE as u64 - 1
    )]
    DataBlockMismatch { block: u64 },
    /// More data than the tree covers.
    #[error("more data than the {data_blocks} blocks the tree covers: feed only the data area")]
    TooMuchData { data_blocks: u64 },
    /// The data ended early.
    #[error("the data ended after {got} of {expected} bytes: feed the whole data area")]
    TooLittleData { got: u64, expected: u64 },
}

/// The salt hashed before every block; up to 256 bytes, possibly empty.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Salt(Vec<u8>);

impl Salt {
    pub fn new(bytes: &[u8]) -> Result<Self, VerityError> {
        if bytes.len() > MAX_SALT_SIZE {
            return Err(VerityError::SaltTooLong { len: bytes.len() });
        }
        Ok(Salt(bytes.to_vec()))
    }

    /// Parses hex as `veritysetup --salt` takes it; `-` or an empty string is no salt.
    pub fn from_hex(s: &str) -> Result<Self, VerityError> {
        if s == "-" {
            return Ok(Salt::default());
        }
        Salt::new(&parse_hex(s, "salt")?)
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

impl std::fmt::Display for Salt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.0.is_empty() {
            return f.write_str("-");
        }
        write_hex(f, &self.0)
    }
}

/// The root hash: the salted SHA-256 of the top hash block (of the only data block when there
/// is no tree).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RootHash(pub [u8; DIGEST_SIZE]);

impl RootHash {
    pub fn from_hex(s: &str) -> Result<Self, VerityError> {
        let b = parse_hex(s, "root hash")?;
        let len = b.len();
        b.try_into()
            .map(RootHash)
            .map_err(|_| VerityError::RootHashLength { len })
    }
}

impl std::fmt::Display for RootHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write_hex(f, &self.0)
    }
}

/// SHA-256 of `salt` followed by `block`: format version 1's hash of every data and hash block.
/// The root hash of a tree whose top-level hash block is `top` (the first block after the
/// superblock in the appended layout): its salted digest. Only as trustworthy as `top`: use it
/// on bytes whose digest was checked against a trusted one.
pub fn root_hash_of_top_block(salt: &Salt, top: &[u8]) -> RootHash {
    RootHash(salted_digest(salt, top))
}

fn salted_digest(salt: &Salt, block: &[u8]) -> [u8; DIGEST_SIZE] {
    let mut h = Sha256::new();
    h.update(&salt.0);
    h.update(block);
    h.finalize().into()
}

fn write_hex(f: &mut std::fmt::Formatter<'_>, bytes: &[u8]) -> std::fmt::Result {
    bytes.iter().try_for_each(|b| write!(f, "{b:02x}"))
}

fn parse_hex(s: &str, what: &'static str) -> Result<Vec<u8>, VerityError> {
    let bad = |why: String| VerityError::BadHex { what, why };
    if !s.len().is_multiple_of(2) {
        return Err(bad(format!("{} characters, an odd number", s.len())));
    }
    s.as_bytes()
        .chunks(2)
        .enumerate()
        .map(|(i, pair)| {
            std::str::from_utf8(pair)
                .ok()
                .and_then(|p| u8::from_str_radix(p, 16).ok())
                .ok_or_else(|| {
                    bad(format!(
                        "characters {} and {} are not hex digits",
                        2 * i,
                        2 * i + 1
                    ))
                })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trips_and_rejects_garbage() {
        let s = Salt::from_hex("00ff10Ab").unwrap();
        assert_eq!(s.as_bytes(), &[0x00, 0xff, 0x10, 0xab]);
        assert_eq!(s.to_string(), "00ff10ab");
        assert_eq!(Salt::from_hex("-").unwrap().as_bytes(), b"");
        assert_eq!(Salt::from_hex("").unwrap().to_string(), "-");
        assert!(matches!(
            Salt::from_hex("abc"),
            Err(VerityError::BadHex { .. })
        ));
        assert!(matches!(
            Salt::from_hex("zz"),
            Err(VerityError::BadHex { .. })
        ));
        assert!(matches!(
            Salt::from_hex("é1"),
            Err(VerityError::BadHex { .. })
        ));
        assert_eq!(
            Salt::new(&[0; 257]),
            Err(VerityError::SaltTooLong { len: 257 })
        );
        assert_eq!(
            RootHash::from_hex("00ff"),
            Err(VerityError::RootHashLength { len: 2 })
        );
        let r = RootHash::from_hex(&"5a".repeat(32)).unwrap();
        assert_eq!(r.to_string(), "5a".repeat(32));
    }
}
