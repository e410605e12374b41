//! The shape of a hash tree: how many levels, how many blocks each, where each sits.

use super::{VerityError, BLOCK_SIZE, HASHES_PER_BLOCK, SUPERBLOCK_SIZE};

const BLOCK: u64 = BLOCK_SIZE as u64;

/// The tree for a number of data blocks, in veritysetup's order: the top level first, level 0
/// (the hashes of the data blocks) last.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    data_blocks: u64,
    /// Blocks of each level, level 0 first.
    level_blocks: Vec<u64>,
}

impl Layout {
    pub fn new(data_blocks: u64) -> Result<Self, VerityError> {
        if data_blocks == 0 {
            return Err(VerityError::EmptyData);
        }
        if data_blocks.checked_mul(BLOCK).is_none() {
            return Err(VerityError::TooManyBlocks { data_blocks });
        }
        // A level has one digest per block below it; the tree stops at a single block (a
        // single data block needs no tree: its hash is the root hash).
        let mut level_blocks = Vec::new();
        let mut below = data_blocks;
        while below > 1 {
            below = below.div_ceil(HASHES_PER_BLOCK);
            level_blocks.push(below);
        }
        Ok(Layout {
            data_blocks,
            level_blocks,
        })
    }

    /// The layout of data of `len` bytes, which must be a non-zero multiple of 4096.
    pub fn for_data_size(len: u64) -> Result<Self, VerityError> {
        if !len.is_multiple_of(BLOCK) {
            return Err(VerityError::UnalignedData { len });
        }
        Layout::new(len / BLOCK)
    }

    /// The layout of a file made by appending a superblock and a tree to its padded data
    /// (`[data][superblock block][tree]`), found from the file's size alone; `None` when no data
    /// size gives exactly that file size.
    pub fn from_appended_size(file_size: u64) -> Option<Self> {
        if !file_size.is_multiple_of(BLOCK) {
            return None;
        }
        let total = file_size / BLOCK;
        // data + superblock + tree grows strictly with the data: bisect.
        let (mut lo, mut hi) = (1u64, total.checked_sub(1)?);
        while lo <= hi {
            let mid = lo + (hi - lo) / 2;
            let layout = Layout::new(mid).ok()?;
            let size = mid + 1 + layout.tree_blocks();
            match size.cmp(&total) {
                std::cmp::Ordering::Equal => return Some(layout),
                std::cmp::Ordering::Less => lo = mid + 1,
                std::cmp::Ordering::Greater => hi = mid.checked_sub(1)?,
            }
        }
        None
    }

    pub fn data_blocks(&self) -> u64 {
        self.data_blocks
    }

    /// The data size in bytes.
    pub fn data_size(&self) -> u64 {
        self.data_blocks * BLOCK
    }

    /// Number of levels; 0 for a single data block.
    pub fn levels(&self) -> usize {
        self.level_blocks.len()
    }

    /// Blocks in `level` (0 = the hashes of the data blocks).
    pub fn level_blocks(&self, level: usize) -> u64 {
        self.level_blocks[level]
    }

    /// Where `level` starts, in blocks from the start of the tree (the top level is at 0).
    pub fn level_start(&self, level: usize) -> u64 {
        self.level_blocks[level + 1..].iter().sum()
    }

    /// Blocks in the whole tree.
    pub fn tree_blocks(&self) -> u64 {
        self.level_blocks.iter().sum()
    }

    /// Bytes in the whole tree.
    pub fn tree_size(&self) -> u64 {
        self.tree_blocks() * BLOCK
    }

    /// Size of the appended image: padded data, superblock block, tree.
    pub fn appended_size(&self) -> u64 {
        self.data_size() + BLOCK + self.tree_size()
    }
}

/// `len` rounded up to the next multiple of 4096: the data area that covers `len` bytes of image.
pub fn padded_data_size(len: u64) -> u64 {
    len.div_ceil(BLOCK) * BLOCK
}

/// Where the tree starts for a superblock at `hash_offset`: the first hash block after the
/// 512-byte superblock (as veritysetup computes it).
pub fn tree_offset(hash_offset: u64) -> u64 {
    (hash_offset + SUPERBLOCK_SIZE as u64).div_ceil(BLOCK) * BLOCK
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(data_blocks: u64) -> Vec<u64> {
        let l = Layout::new(data_blocks).unwrap();
        (0..l.levels()).map(|i| l.level_blocks(i)).collect()
    }

    #[test]
    fn levels_for_edge_sizes() {
        assert_eq!(shape(1), Vec::<u64>::new());
        assert_eq!(shape(2), vec![1]);
        assert_eq!(shape(128), vec![1]);
        assert_eq!(shape(129), vec![2, 1]);
        assert_eq!(shape(128 * 128), vec![128, 1]);
        assert_eq!(shape(128 * 128 + 1), vec![129, 2, 1]);
        assert_eq!(shape(128 * 128 * 128), vec![16384, 128, 1]);
        assert_eq!(shape(128 * 128 * 128 + 1), vec![16385, 129, 2, 1]);
        // 1 TiB of data
        assert_eq!(shape(1 << 28), vec![1 << 21, 1 << 14, 128, 1]);
        assert_eq!(Layout::new(0), Err(VerityError::EmptyData));
        assert_eq!(
            Layout::new(1 << 52),
            Err(VerityError::TooManyBlocks {
                data_blocks: 1 << 52
            })
        );
        assert_eq!(Layout::new((1 << 52) - 1).unwrap().levels(), 8);
    }

    #[test]
    fn top_level_first() {
        let l = Layout::new(128 * 128 + 1).unwrap();
        assert_eq!(l.level_start(2), 0);
        assert_eq!(l.level_start(1), 1);
        assert_eq!(l.level_start(0), 3);
        assert_eq!(l.tree_blocks(), 132);
        assert_eq!(l.tree_size(), 132 * 4096);
        assert_eq!(l.appended_size(), (16385 + 1 + 132) * 4096);
        let one = Layout::new(1).unwrap();
        assert_eq!((one.tree_size(), one.appended_size()), (0, 8192));
    }

    #[test]
    fn sizes_and_offsets() {
        assert_eq!(padded_data_size(0), 0);
        assert_eq!(padded_data_size(1), 4096);
        assert_eq!(padded_data_size(4096), 4096);
        assert_eq!(padded_data_size(4097), 8192);
        assert_eq!(tree_offset(4096), 8192);
        assert_eq!(tree_offset(0), 4096);
        assert_eq!(tree_offset(3584), 4096);
        assert_eq!(tree_offset(3585), 8192);
        assert_eq!(tree_offset(7681), 12288);
        assert_eq!(
            Layout::for_data_size(4097),
            Err(VerityError::UnalignedData { len: 4097 })
        );
        assert_eq!(Layout::for_data_size(8192).unwrap().data_blocks(), 2);
    }

    #[test]
    fn appended_size_finds_the_layout_back() {
        for n in (1..600).chain([16383, 16384, 16385, 16386, 2_097_152, 2_097_153]) {
            let l = Layout::new(n).unwrap();
            assert_eq!(Layout::from_appended_size(l.appended_size()), Some(l));
        }
        for size in [0, 4096, 4095, 8193] {
            assert_eq!(Layout::from_appended_size(size), None, "{size}");
        }
        // 129 data blocks need 3 tree blocks: 129 + 1 + 2 blocks is no appended image.
        assert_eq!(Layout::from_appended_size((129 + 1 + 2) * 4096), None);
    }
}
