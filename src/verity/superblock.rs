//! The 512-byte superblock veritysetup writes at the hash offset (cryptsetup's `struct
//! verity_sb`, little-endian):
//!
//! | bytes | field |
//! |---|---|
//! | 0..8 | signature `verity\0\0` |
//! | 8..12 | version, 1 |
//! | 12..16 | hash type, 1 |
//! | 16..32 | UUID, raw bytes |
//! | 32..64 | algorithm, NUL-padded (`sha256`) |
//! | 64..68, 68..72 | data and hash block sizes |
//! | 72..80 | data blocks |
//! | 80..82 | salt size |
//! | 88..344 | salt, zero-padded |
//! | 82..88, 344..512 | zeros |

use super::{Layout, Salt, VerityError, BLOCK_SIZE, MAX_SALT_SIZE};
use uuid::Uuid;

/// Size of the superblock; on disk it is followed by zeros up to the next hash block.
pub const SUPERBLOCK_SIZE: usize = 512;

const SIGNATURE: [u8; 8] = *b"verity\0\0";
const ALGORITHM: &str = "sha256";

/// A superblock of format version 1, hash type 1, SHA-256, 4096-byte blocks: the only kind this
/// module builds or reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Superblock {
    pub uuid: Uuid,
    pub data_blocks: u64,
    pub salt: Salt,
}

impl Superblock {
    pub fn to_bytes(&self) -> [u8; SUPERBLOCK_SIZE] {
        let mut b = [0u8; SUPERBLOCK_SIZE];
        b[0..8].copy_from_slice(&SIGNATURE);
        b[8..12].copy_from_slice(&1u32.to_le_bytes());
        b[12..16].copy_from_slice(&1u32.to_le_bytes());
        b[16..32].copy_from_slice(self.uuid.as_bytes());
        b[32..32 + ALGORITHM.len()].copy_from_slice(ALGORITHM.as_bytes());
        b[64..68].copy_from_slice(&(BLOCK_SIZE as u32).to_le_bytes());
        b[68..72].copy_from_slice(&(BLOCK_SIZE as u32).to_le_bytes());
        b[72..80].copy_from_slice(&self.data_blocks.to_le_bytes());
        let salt = self.salt.as_bytes();
        b[80..82].copy_from_slice(&(salt.len() as u16).to_le_bytes());
        b[88..88 + salt.len()].copy_from_slice(salt);
        b
    }

    /// Reads a superblock from the first 512 bytes of `bytes`; anything this module cannot
    /// handle is an error that names the field.
    pub fn parse(bytes: &[u8]) -> Result<Self, VerityError> {
        let b: &[u8; SUPERBLOCK_SIZE] = bytes
            .get(..SUPERBLOCK_SIZE)
            .and_then(|b| b.try_into().ok())
            .ok_or(VerityError::SuperblockTruncated { len: bytes.len() })?;
        let u32_at = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let mut signature = [0u8; 8];
        signature.copy_from_slice(&b[0..8]);
        if signature != SIGNATURE {
            return Err(VerityError::BadSignature { found: signature });
        }
        match u32_at(8) {
            1 => {}
            v => return Err(VerityError::UnsupportedVersion(v)),
        }
        match u32_at(12) {
            1 => {}
            t => return Err(VerityError::UnsupportedHashType(t)),
        }
        let algorithm = &b[32..64];
        let name_len = algorithm.iter().position(|&c| c == 0).unwrap_or(32);
        let name = &algorithm[..name_len];
        if !name.eq_ignore_ascii_case(ALGORITHM.as_bytes()) {
            return Err(VerityError::UnsupportedAlgorithm(
                String::from_utf8_lossy(name).into_owned(),
            ));
        }
        for (which, at) in [("data", 64), ("hash", 68)] {
            let size = u32_at(at);
            if size as usize != BLOCK_SIZE {
                return Err(VerityError::UnsupportedBlockSize { which, size });
            }
        }
        let mut data_blocks = [0u8; 8];
        data_blocks.copy_from_slice(&b[72..80]);
        let data_blocks = u64::from_le_bytes(data_blocks);
        Layout::new(data_blocks)?;
        let salt_len = u16::from_le_bytes([b[80], b[81]]) as usize;
        if salt_len > MAX_SALT_SIZE {
            return Err(VerityError::BadSaltSize { len: salt_len });
        }
        let mut uuid = [0u8; 16];
        uuid.copy_from_slice(&b[16..32]);
        Ok(Superblock {
            uuid: Uuid::from_bytes(uuid),
            data_blocks,
            salt: Salt::new(&b[88..88 + salt_len])?,
        })
    }

    /// The tree's layout for the data this superblock describes.
    pub fn layout(&self) -> Result<Layout, VerityError> {
        Layout::new(self.data_blocks)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Superblock {
        Superblock {
            uuid: Uuid::parse_str("12345678-1234-1234-1234-123456789abc").unwrap(),
            data_blocks: 129,
            salt: Salt::new(&[0xaa; 32]).unwrap(),
        }
    }

    #[test]
    fn round_trip() {
        let sb = sample();
        let b = sb.to_bytes();
        assert_eq!(&b[..8], b"verity\0\0");
        assert_eq!(&b[16..20], &[0x12, 0x34, 0x56, 0x78]);
        assert_eq!(&b[32..39], b"sha256\0");
        assert_eq!(&b[80..82], &[32, 0]);
        assert!(b[120..].iter().all(|&c| c == 0));
        assert_eq!(Superblock::parse(&b), Ok(sb));
        // trailing bytes (the rest of the hash block) are ignored
        let mut block = b.to_vec();
        block.resize(4096, 0xee);
        assert_eq!(Superblock::parse(&block), Ok(sample()));
        for salt in [vec![], vec![7; 256]] {
            let sb = Superblock {
                salt: Salt::new(&salt).unwrap(),
                ..sample()
            };
            assert_eq!(Superblock::parse(&sb.to_bytes()), Ok(sb));
        }
    }

    #[test]
    fn bad_fields_are_named() {
        let good = sample().to_bytes();
        let with = |at: usize, bytes: &[u8]| {
            let mut b = good;
            b[at..at + bytes.len()].copy_from_slice(bytes);
            Superblock::parse(&b)
        };
        assert_eq!(
            Superblock::parse(&good[..511]),
            Err(VerityError::SuperblockTruncated { len: 511 })
        );
        assert_eq!(
            with(0, b"hsqs"),
            Err(VerityError::BadSignature {
                found: *b"hsqsty\0\0"
            })
        );
        assert_eq!(with(8, &[2]), Err(VerityError::UnsupportedVersion(2)));
        assert_eq!(with(12, &[0]), Err(VerityError::UnsupportedHashType(0)));
        assert_eq!(
            with(32, b"sha1\0\0"),
            Err(VerityError::UnsupportedAlgorithm("sha1".into()))
        );
        assert_eq!(
            with(64, &512u32.to_le_bytes()),
            Err(VerityError::UnsupportedBlockSize {
                which: "data",
                size: 512
            })
        );
        assert_eq!(
            with(68, &1024u32.to_le_bytes()),
            Err(VerityError::UnsupportedBlockSize {
                which: "hash",
                size: 1024
            })
        );
        assert_eq!(with(72, &[0; 8]), Err(VerityError::EmptyData));
        assert_eq!(
            with(72, &[0xff; 8]),
            Err(VerityError::TooManyBlocks {
                data_blocks: u64::MAX
            })
        );
        assert_eq!(
            with(80, &257u16.to_le_bytes()),
            Err(VerityError::BadSaltSize { len: 257 })
        );
        // a full-width algorithm name with no NUL
        assert!(matches!(
            with(32, &[b'x'; 32]),
            Err(VerityError::UnsupportedAlgorithm(_))
        ));
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        // a fixed xorshift stream over every field after the signature
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..20_000 {
            let mut b = sample().to_bytes();
            for _ in 0..4 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                b[8 + (x % 504) as usize] = (x >> 32) as u8;
            }
            let _ = Superblock::parse(&b);
        }
    }
}
