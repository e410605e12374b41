//! Building a tree from data fed in chunks, and checking data against one.

use super::{salted_digest, Layout, RootHash, Salt, VerityError, BLOCK_SIZE, DIGEST_SIZE};

/// Builds the tree of data fed in chunks of any size; see the module doc for its memory.
///
/// Call [`push`](Self::push) with the data in order, then [`finish`](Self::finish).
#[derive(Debug)]
pub struct TreeBuilder {
    salt: Salt,
    /// The data block being filled (shorter than a block).
    partial: Vec<u8>,
    /// Level 0 so far: the digest of each whole data block, back to back.
    level0: Vec<u8>,
    data_blocks: u64,
}

impl TreeBuilder {
    pub fn new(salt: Salt) -> Self {
        TreeBuilder {
            salt,
            partial: Vec::with_capacity(BLOCK_SIZE),
            level0: Vec::new(),
            data_blocks: 0,
        }
    }

    /// Feeds the next bytes of data.
    pub fn push(&mut self, mut data: &[u8]) {
        if !self.partial.is_empty() {
            let take = (BLOCK_SIZE - self.partial.len()).min(data.len());
            self.partial.extend_from_slice(&data[..take]);
            data = &data[take..];
            if self.partial.len() < BLOCK_SIZE {
                return;
            }
            let d = salted_digest(&self.salt, &self.partial);
            self.add(d);
            self.partial.clear();
        }
        let mut blocks = data.chunks_exact(BLOCK_SIZE);
        for block in &mut blocks {
            let d = salted_digest(&self.salt, block);
            self.add(d);
        }
        self.partial.extend_from_slice(blocks.remainder());
    }

    fn add(&mut self, digest: [u8; DIGEST_SIZE]) {
        self.level0.extend_from_slice(&digest);
        self.data_blocks += 1;
    }

    /// Data blocks fed so far (whole ones).
    pub fn data_blocks(&self) -> u64 {
        self.data_blocks
    }

    /// Computes the upper levels and the root hash. The data fed must be a non-zero multiple
    /// of 4096 bytes.
    pub fn finish(self) -> Result<Tree, VerityError> {
        if !self.partial.is_empty() {
            return Err(VerityError::UnalignedData {
                len: self.data_blocks * BLOCK_SIZE as u64 + self.partial.len() as u64,
            });
        }
        let layout = Layout::new(self.data_blocks)?;
        if layout.levels() == 0 {
            let mut root = [0; DIGEST_SIZE];
            root.copy_from_slice(&self.level0);
            return Ok(Tree {
                layout,
                bytes: Vec::new(),
                root_hash: RootHash(root),
            });
        }
        // Each level is the digests of the blocks of the one below, zero-padded to a block;
        // levels above 0 are built top-first in `upper`, then put in front of level 0.
        let mut level0 = self.level0;
        level0.resize(block_bytes(layout.level_blocks(0)), 0);
        let mut levels: Vec<Vec<u8>> = Vec::with_capacity(layout.levels() - 1);
        for level in 1..layout.levels() {
            let below = levels.last().unwrap_or(&level0);
            let mut this: Vec<u8> = Vec::with_capacity(block_bytes(layout.level_blocks(level)));
            for block in below.chunks_exact(BLOCK_SIZE) {
                this.extend_from_slice(&salted_digest(&self.salt, block));
            }
            this.resize(block_bytes(layout.level_blocks(level)), 0);
            levels.push(this);
        }
        let top = levels.last().unwrap_or(&level0);
        let root_hash = RootHash(salted_digest(&self.salt, top));
        let upper: Vec<u8> = levels.into_iter().rev().flatten().collect();
        let mut bytes = level0;
        bytes.splice(0..0, upper);
        Ok(Tree {
            layout,
            bytes,
            root_hash,
        })
    }
}

/// The bytes of `level` in a tree of `layout`'s size.
fn level_slice<'t>(layout: &Layout, tree: &'t [u8], level: usize) -> &'t [u8] {
    let start = block_bytes(layout.level_start(level));
    &tree[start..start + block_bytes(layout.level_blocks(level))]
}

fn block_bytes(blocks: u64) -> usize {
    blocks as usize * BLOCK_SIZE
}

/// A finished tree: its bytes as they go on disk after the superblock, and its root hash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tree {
    layout: Layout,
    bytes: Vec<u8>,
    root_hash: RootHash,
}

impl Tree {
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// The hash blocks, top level first; empty for a single data block.
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    pub fn root_hash(&self) -> RootHash {
        self.root_hash
    }
}

/// Checks data against a tree and a root hash.
///
/// [`new`](Self::new) checks every hash block of the tree against the root hash first (top
/// level down); then [`push`](Self::push) takes the data in order, in chunks of any size, and
/// fails at the first block that does not match; [`finish`](Self::finish) checks that all the
/// data came.
#[derive(Debug)]
pub struct Verifier<'t> {
    layout: Layout,
    salt: Salt,
    /// Level 0 of the tree: the expected digest of each data block.
    level0: &'t [u8],
    root_hash: RootHash,
    partial: Vec<u8>,
    next_block: u64,
    failed: Option<VerityError>,
}

impl<'t> Verifier<'t> {
    /// `tree` is the hash area after the superblock, exactly `layout.tree_size()` bytes.
    pub fn new(
        layout: Layout,
        salt: Salt,
        tree: &'t [u8],
        root_hash: RootHash,
    ) -> Result<Self, VerityError> {
        if tree.len() as u64 != layout.tree_size() {
            return Err(VerityError::TreeSize {
                len: tree.len() as u64,
                expected: layout.tree_size(),
                data_blocks: layout.data_blocks(),
            });
        }
        let level_bytes = |level: usize| level_slice(&layout, tree, level);
        for level in (0..layout.levels()).rev() {
            let parent: &[u8] = if level + 1 == layout.levels() {
                &root_hash.0
            } else {
                level_bytes(level + 1)
            };
            let blocks = level_bytes(level).chunks_exact(BLOCK_SIZE);
            for ((block, expected), i) in blocks.zip(parent.chunks_exact(DIGEST_SIZE)).zip(0..) {
                if salted_digest(&salt, block) != expected {
                    return Err(VerityError::TreeBlockMismatch { level, block: i });
                }
            }
        }
        let level0 = if layout.levels() == 0 {
            &[][..]
        } else {
            level_slice(&layout, tree, 0)
        };
        Ok(Verifier {
            layout,
            salt,
            level0,
            root_hash,
            partial: Vec::with_capacity(BLOCK_SIZE),
            next_block: 0,
            failed: None,
        })
    }

    /// Checks the next bytes of data; after a mismatch every call returns that same error.
    pub fn push(&mut self, mut data: &[u8]) -> Result<(), VerityError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        if !self.partial.is_empty() {
            let take = (BLOCK_SIZE - self.partial.len()).min(data.len());
            self.partial.extend_from_slice(&data[..take]);
            data = &data[take..];
            if self.partial.len() < BLOCK_SIZE {
                return Ok(());
            }
            let block = std::mem::take(&mut self.partial);
            let r = self.check(&block);
            self.partial = block;
            self.partial.clear();
            r?;
        }
        let mut blocks = data.chunks_exact(BLOCK_SIZE);
        for block in &mut blocks {
            self.check(block)?;
        }
        if !blocks.remainder().is_empty() && self.next_block >= self.layout.data_blocks() {
            return self.fail(VerityError::TooMuchData {
                data_blocks: self.layout.data_blocks(),
            });
        }
        self.partial.extend_from_slice(blocks.remainder());
        Ok(())
    }

    fn check(&mut self, block: &[u8]) -> Result<(), VerityError> {
        let i = self.next_block;
        if i >= self.layout.data_blocks() {
            return self.fail(VerityError::TooMuchData {
                data_blocks: self.layout.data_blocks(),
            });
        }
        let expected: &[u8] = if self.layout.levels() == 0 {
            &self.root_hash.0
        } else {
            let at = i as usize * DIGEST_SIZE;
            &self.level0[at..at + DIGEST_SIZE]
        };
        if salted_digest(&self.salt, block) != expected {
            return self.fail(VerityError::DataBlockMismatch { block: i });
        }
        self.next_block += 1;
        Ok(())
    }

    fn fail(&mut self, e: VerityError) -> Result<(), VerityError> {
        self.failed = Some(e.clone());
        Err(e)
    }

    /// Data blocks checked and found good so far.
    pub fn blocks_verified(&self) -> u64 {
        self.next_block
    }

    /// Ok when every data block came and matched.
    pub fn finish(self) -> Result<(), VerityError> {
        if let Some(e) = self.failed {
            return Err(e);
        }
        if self.next_block < self.layout.data_blocks() {
            return Err(VerityError::TooLittleData {
                got: self.next_block * BLOCK_SIZE as u64 + self.partial.len() as u64,
                expected: self.layout.data_size(),
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sha2::{Digest, Sha256};

    fn data(blocks: usize, seed: u64) -> Vec<u8> {
        let mut x = seed | 1;
        (0..blocks * BLOCK_SIZE)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    fn salt() -> Salt {
        Salt::new(&[0xaa; 32]).unwrap()
    }

    fn build(data: &[u8]) -> Tree {
        let mut b = TreeBuilder::new(salt());
        b.push(data);
        b.finish().unwrap()
    }

    fn verify(data: &[u8], tree: &Tree, chunk: usize) -> Result<(), VerityError> {
        let mut v = Verifier::new(
            tree.layout().clone(),
            salt(),
            tree.bytes(),
            tree.root_hash(),
        )?;
        for c in data.chunks(chunk) {
            v.push(c)?;
        }
        v.finish()
    }

    #[test]
    fn matches_veritysetup_on_zeros() {
        // Root hashes printed by `veritysetup format --salt=aa…aa` (cryptsetup 2.6.1) of zeros.
        let one = build(&[0; BLOCK_SIZE]);
        assert_eq!(
            one.root_hash().to_string(),
            "5424c52bf2f63d48e12f293c24d4c41685d823eb0f2cab82bf045ea7ee678841"
        );
        assert!(one.bytes().is_empty());
        let t = build(&vec![0; 129 * BLOCK_SIZE]);
        assert_eq!(
            t.root_hash().to_string(),
            "f596e6032b71eda405deea216c2d086cbf34f2f9fa3dfc7fd939ef4d92ae53bb"
        );
        assert_eq!(t.bytes().len(), 3 * BLOCK_SIZE);
    }

    #[test]
    fn one_block_root_is_its_salted_hash() {
        let d = data(1, 3);
        let mut h = Sha256::new();
        h.update([0xaa; 32]);
        h.update(&d);
        let want: [u8; 32] = h.finalize().into();
        assert_eq!(build(&d).root_hash(), RootHash(want));
    }

    #[test]
    fn chunking_does_not_change_the_tree() {
        let d = data(300, 7);
        let whole = build(&d);
        for chunk in [1, 100, 4095, 4096, 4097, 65536] {
            let mut b = TreeBuilder::new(salt());
            d.chunks(chunk).for_each(|c| b.push(c));
            assert_eq!(b.data_blocks(), 300);
            assert_eq!(b.finish().unwrap(), whole, "chunk {chunk}");
        }
    }

    #[test]
    fn unaligned_or_empty_data_is_refused() {
        let mut b = TreeBuilder::new(salt());
        b.push(&[1; 5000]);
        assert_eq!(b.finish(), Err(VerityError::UnalignedData { len: 5000 }));
        assert_eq!(
            TreeBuilder::new(salt()).finish(),
            Err(VerityError::EmptyData)
        );
    }

    #[test]
    fn good_data_verifies_in_any_chunks() {
        for blocks in [1, 2, 128, 129, 300] {
            let d = data(blocks, blocks as u64);
            let t = build(&d);
            for chunk in [1000, 4096, 1 << 20] {
                assert_eq!(
                    verify(&d, &t, chunk),
                    Ok(()),
                    "{blocks} blocks, chunk {chunk}"
                );
            }
        }
    }

    #[test]
    fn a_flipped_data_byte_names_its_block() {
        for (blocks, at) in [(1, 0), (128, 127 * 4096 + 4095), (300, 4096 * 200 + 17)] {
            let mut d = data(blocks, 11);
            let t = build(&d);
            d[at] ^= 0x40;
            let want = VerityError::DataBlockMismatch {
                block: (at / BLOCK_SIZE) as u64,
            };
            assert_eq!(verify(&d, &t, 3000), Err(want));
        }
    }

    #[test]
    fn a_flipped_tree_byte_is_caught() {
        // 129 blocks: level 1 (1 block) at tree block 0, level 0 (2 blocks) at 1 and 2.
        let d = data(129, 5);
        let t = build(&d);
        for (at, level, block) in [
            (10, 1, 0),
            (4096 + 31, 0, 0),
            (2 * 4096 + 32, 0, 1), // past the last digest: padding is covered too
            (3 * 4096 - 1, 0, 1),
        ] {
            let mut bytes = t.bytes().to_vec();
            bytes[at] ^= 1;
            let r = Verifier::new(t.layout().clone(), salt(), &bytes, t.root_hash());
            assert_eq!(
                r.err(),
                Some(VerityError::TreeBlockMismatch { level, block }),
                "byte {at}"
            );
        }
        let wrong_root = RootHash([0; 32]);
        let r = Verifier::new(t.layout().clone(), salt(), t.bytes(), wrong_root);
        assert_eq!(
            r.err(),
            Some(VerityError::TreeBlockMismatch { level: 1, block: 0 })
        );
        let r = Verifier::new(
            t.layout().clone(),
            salt(),
            &t.bytes()[4096..],
            t.root_hash(),
        );
        assert!(matches!(r, Err(VerityError::TreeSize { .. })));
    }

    #[test]
    fn wrong_amount_of_data_is_refused() {
        let d = data(3, 1);
        let t = build(&d);
        assert_eq!(
            verify(&d[..8192 + 100], &t, 4096),
            Err(VerityError::TooLittleData {
                got: 8292,
                expected: 3 * 4096
            })
        );
        let mut more = d.clone();
        more.push(0);
        assert_eq!(
            verify(&more, &t, 4096),
            Err(VerityError::TooMuchData { data_blocks: 3 })
        );
        assert_eq!(
            verify(&more, &t, 1 << 20),
            Err(VerityError::TooMuchData { data_blocks: 3 })
        );
    }
}
