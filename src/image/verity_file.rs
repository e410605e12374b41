//! dm-verity hash trees on image files: append one (`keel-image verity format`, and every
//! release's root image) and check one (`keel-image verity verify`). The tree itself is built
//! and checked by the pure [`crate::verity`] module; this one reads and writes the file, in
//! bounded chunks.

use crate::verity::{
    self, Layout, RootHash, Salt, Superblock, TreeBuilder, Verifier, BLOCK_SIZE, SUPERBLOCK_SIZE,
};
use std::os::unix::fs::FileExt;
use std::path::Path;

/// Reads of the data go in chunks of this size: memory stays bounded by the tree.
const CHUNK: usize = 1 << 20;

/// What [`format`] appended.
#[derive(Debug, Clone)]
pub struct Formatted {
    pub root_hash: RootHash,
    pub salt: Salt,
    pub uuid: uuid::Uuid,
    /// The bytes the tree covers: the image padded to the next 4096-byte boundary.
    pub data_size: u64,
    /// Where the superblock starts (the tree follows 4096 bytes later); equals `data_size`.
    pub hash_offset: u64,
    pub data_blocks: u64,
    pub hash_blocks: u64,
    /// The file's size now.
    pub image_size: u64,
}

/// Feeds the first `len` bytes of `file` to `each` in chunks of [`CHUNK`]; returns how many
/// bytes there were (fewer than `len` when the file is shorter).
pub fn read_chunks(
    file: &std::fs::File,
    len: u64,
    name: &Path,
    mut each: impl FnMut(&[u8]) -> Result<(), String>,
) -> Result<u64, String> {
    use std::io::Read;
    let mut buf = vec![0u8; CHUNK];
    let mut r = file.take(len);
    let mut read = 0u64;
    loop {
        let n = r
            .read(&mut buf)
            .map_err(|e| format!("cannot read {}: {e}", name.display()))?;
        if n == 0 {
            return Ok(read);
        }
        each(&buf[..n])?;
        read += n as u64;
    }
}

/// Append a superblock and hash tree to `image` at the next 4096-byte boundary (the zero
/// padding in between is part of the data), as `veritysetup format --hash-offset=OFF IMAGE
/// IMAGE` would. Refuses a file that already ends with one.
pub fn format(image: &Path, salt: Salt, uuid: uuid::Uuid) -> Result<Formatted, String> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(image)
        .map_err(|e| format!("cannot open {}: {e}", image.display()))?;
    let len = file.metadata().map_err(|e| e.to_string())?.len();
    if let Some(l) = Layout::from_appended_size(len) {
        let mut sb = [0u8; SUPERBLOCK_SIZE];
        if file.read_exact_at(&mut sb, l.data_size()).is_ok()
            && Superblock::parse(&sb).is_ok_and(|s| s.data_blocks == l.data_blocks())
        {
            return Err(format!(
                "{} already ends with a dm-verity superblock and tree (hash offset {}); \
                 formatting again would hash them as data",
                image.display(),
                l.data_size()
            ));
        }
    }
    let hash_offset = verity::padded_data_size(len);
    let mut builder = TreeBuilder::new(salt.clone());
    let read = read_chunks(&file, len, image, |c| {
        builder.push(c);
        Ok(())
    })?;
    if read != len {
        return Err(format!(
            "{} changed size while it was read ({read} of {len} bytes)",
            image.display()
        ));
    }
    let pad = vec![0u8; (hash_offset - len) as usize];
    builder.push(&pad);
    let tree = builder.finish().map_err(|e| e.to_string())?;
    let sb = Superblock {
        uuid,
        data_blocks: tree.layout().data_blocks(),
        salt: salt.clone(),
    };
    let mut tail = pad;
    tail.extend_from_slice(&sb.to_bytes());
    tail.resize(tail.len() + BLOCK_SIZE - SUPERBLOCK_SIZE, 0);
    tail.extend_from_slice(tree.bytes());
    file.write_all_at(&tail, len)
        .and_then(|()| file.sync_all())
        .map_err(|e| format!("cannot write the hash tree to {}: {e}", image.display()))?;
    let l = tree.layout();
    Ok(Formatted {
        root_hash: tree.root_hash(),
        salt,
        uuid,
        data_size: l.data_size(),
        hash_offset,
        data_blocks: l.data_blocks(),
        hash_blocks: l.tree_blocks(),
        image_size: l.appended_size(),
    })
}

/// Check every data block of `image` and every block of its tree against `root`; the
/// superblock is at `hash_offset` (`None`: found from the size of a file made by [`format`]).
/// Returns the number of data blocks checked.
pub fn verify(image: &Path, root: &RootHash, hash_offset: Option<u64>) -> Result<u64, String> {
    let file =
        std::fs::File::open(image).map_err(|e| format!("cannot open {}: {e}", image.display()))?;
    let len = file.metadata().map_err(|e| e.to_string())?.len();
    let hash_offset = match hash_offset {
        Some(o) => o,
        None => Layout::from_appended_size(len)
            .ok_or_else(|| {
                format!(
                    "{} ({len} bytes) is not padded data + superblock + tree of any data size: \
                     pass --hash-offset",
                    image.display()
                )
            })?
            .data_size(),
    };
    // short when the offset is near or past the end: parse then says so
    let sb_len = len.saturating_sub(hash_offset).min(SUPERBLOCK_SIZE as u64);
    let mut sb = vec![0u8; sb_len as usize];
    file.read_exact_at(&mut sb, hash_offset)
        .map_err(|e| format!("cannot read {}: {e}", image.display()))?;
    let sb = Superblock::parse(&sb)
        .map_err(|e| format!("{} at byte {hash_offset}: {e}", image.display()))?;
    let layout = sb.layout().map_err(|e| e.to_string())?;
    if layout.data_size() > hash_offset {
        return Err(format!(
            "the superblock at byte {hash_offset} describes {} bytes of data, which overlap it",
            layout.data_size()
        ));
    }
    let tree_at = verity::tree_offset(hash_offset);
    if tree_at + layout.tree_size() > len {
        return Err(format!(
            "{} is {len} bytes; its hash tree needs bytes {tree_at} to {}: it is truncated",
            image.display(),
            tree_at + layout.tree_size()
        ));
    }
    let mut tree = vec![0u8; layout.tree_size() as usize];
    file.read_exact_at(&mut tree, tree_at)
        .map_err(|e| format!("cannot read {}: {e}", image.display()))?;
    let data_blocks = layout.data_blocks();
    let mut v = Verifier::new(layout.clone(), sb.salt, &tree, *root).map_err(|e| e.to_string())?;
    read_chunks(&file, layout.data_size(), image, |c| {
        v.push(c).map_err(|e| e.to_string())
    })?;
    v.finish().map_err(|e| e.to_string())?;
    Ok(data_blocks)
}
