//! Where each file's bytes lie in a SquashFS image, and which file of an old image is the same
//! file as one of a new image: the map that lets [`super::matcher`] look for a new file's bytes
//! in its own old version first.
//!
//! KeelOS roots are built with `mksquashfs -noI -noD -noF -noX` (`src/image/release.rs`), so
//! the inode and directory tables are stored uncompressed and can be read without a
//! decompressor. Images with compressed metadata get [`SqfsError::CompressedMetadata`], and the
//! patch maker then matches over the whole image as before. Data blocks may be compressed or
//! not: the map only says which image bytes belong to which file, and the matcher compares the
//! bytes as they are.
//!
//! Format (SquashFS 4.0, little-endian): a 96-byte superblock; metadata blocks of at most 8 KiB,
//! each behind a 16-bit header (bit 15: stored uncompressed); inode references are
//! `(block offset in the inode table << 16) | offset in the block`. A regular file's data is a
//! run of blocks from `blocks_start` (their sizes in the inode, bit 24 of each: uncompressed)
//! and, if it has one, a tail at `block_offset` inside a fragment block.
//!
//! Pure: it reads a byte slice. Every offset and length from the image is checked against the
//! slice; a bad image is an error, never a panic, and the work done is bounded by the image's
//! size (each directory is listed once).

use std::collections::{HashMap, HashSet};
use std::ops::Range;

const MAGIC: u32 = 0x7371_7368; // "hsqs"
const NO_FRAGMENT: u32 = 0xffff_ffff;
const META_UNCOMPRESSED: u16 = 0x8000;
const DATA_UNCOMPRESSED: u32 = 1 << 24;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SqfsError {
    #[error("not a SquashFS 4.0 image (bad magic or version)")]
    NotSquashfs,
    #[error(
        "the SquashFS metadata is compressed; per-file matching reads uncompressed metadata \
         only (mksquashfs -noI), as KeelOS builds its roots"
    )]
    CompressedMetadata,
    #[error("the SquashFS image is damaged: {0}")]
    Damaged(&'static str),
}

/// One regular file of an image: its path and the image ranges that hold its bytes, in file
/// order (its full blocks, then its fragment tail).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileExtent {
    pub path: String,
    pub ranges: Vec<Range<u64>>,
}

/// A range of the new image that holds one file's bytes, and the old image ranges of the same
/// file's old version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pair {
    pub new: Range<u64>,
    pub old: Vec<Range<u64>>,
}

struct Img<'a> {
    b: &'a [u8],
    block_size: u64,
    inode_table: u64,
    dir_table: u64,
    frag_table: u64,
    frag_count: u32,
}

fn u16_at(b: &[u8], at: usize) -> Result<u16, SqfsError> {
    b.get(at..at + 2)
        .map(|s| u16::from_le_bytes([s[0], s[1]]))
        .ok_or(SqfsError::Damaged("a field lies past the end"))
}
fn u32_at(b: &[u8], at: usize) -> Result<u32, SqfsError> {
    b.get(at..at + 4)
        .map(|s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
        .ok_or(SqfsError::Damaged("a field lies past the end"))
}
fn u64_at(b: &[u8], at: usize) -> Result<u64, SqfsError> {
    let lo = u32_at(b, at)? as u64;
    let hi = u32_at(b, at + 4)? as u64;
    Ok(lo | hi << 32)
}

impl<'a> Img<'a> {
    fn open(b: &'a [u8]) -> Result<Self, SqfsError> {
        if b.len() < 96 || u32_at(b, 0)? != MAGIC || u16_at(b, 28)? != 4 {
            return Err(SqfsError::NotSquashfs);
        }
        let block_size = u32_at(b, 12)? as u64;
        if !(4096..=(1 << 20)).contains(&block_size) || !block_size.is_power_of_two() {
            return Err(SqfsError::Damaged("block size out of range"));
        }
        Ok(Img {
            b,
            block_size,
            frag_count: u32_at(b, 16)?,
            inode_table: u64_at(b, 64)?,
            dir_table: u64_at(b, 72)?,
            frag_table: u64_at(b, 80)?,
        })
    }

    /// `len` bytes of the metadata stream that starts at image offset `start`, from `offset`
    /// bytes into it. Decodes only the blocks it needs.
    fn meta(&self, start: u64, offset: usize, len: usize) -> Result<Vec<u8>, SqfsError> {
        let mut pos = usize::try_from(start).map_err(|_| SqfsError::Damaged("table offset"))?;
        let mut buf = Vec::new();
        while buf.len() < offset + len {
            let h = u16_at(self.b, pos)?;
            if h & META_UNCOMPRESSED == 0 {
                return Err(SqfsError::CompressedMetadata);
            }
            let n = (h & !META_UNCOMPRESSED) as usize;
            if n == 0 || n > 8192 {
                return Err(SqfsError::Damaged("metadata block length"));
            }
            let data = self
                .b
                .get(pos + 2..pos + 2 + n)
                .ok_or(SqfsError::Damaged("metadata block past the end"))?;
            buf.extend_from_slice(data);
            pos += 2 + n;
        }
        Ok(buf[offset..offset + len].to_vec())
    }

    fn inode(&self, r: u64, len: usize) -> Result<Vec<u8>, SqfsError> {
        self.meta(
            self.inode_table.saturating_add(r >> 16),
            (r & 0xffff) as usize,
            len,
        )
    }

    /// The image range of fragment block `i`, if it is stored uncompressed.
    fn fragment(&self, i: u32) -> Result<Option<u64>, SqfsError> {
        if i >= self.frag_count {
            return Err(SqfsError::Damaged("fragment index out of range"));
        }
        let at = usize::try_from(self.frag_table.saturating_add(8 * (i as u64 / 512)))
            .map_err(|_| SqfsError::Damaged("fragment table offset"))?;
        let block = u64_at(self.b, at)?;
        let e = self.meta(block, (i as usize % 512) * 16, 16)?;
        let (start, size) = (u64_at(&e, 0)?, u32_at(&e, 8)?);
        Ok((size & DATA_UNCOMPRESSED != 0).then_some(start))
    }

    /// The ranges of the regular file whose inode is at `r`.
    fn file(&self, r: u64) -> Result<Vec<Range<u64>>, SqfsError> {
        let head = self.inode(r, 16)?;
        let (kind, fixed) = match u16_at(&head, 0)? {
            2 => (2, 16),
            9 => (9, 40),
            _ => return Ok(Vec::new()),
        };
        let f = self.inode(r, 16 + fixed)?;
        let (start, size, frag, tail_at) = if kind == 2 {
            let size = u32_at(&f, 28)? as u64;
            (
                u32_at(&f, 16)? as u64,
                size,
                u32_at(&f, 20)?,
                u32_at(&f, 24)?,
            )
        } else {
            (
                u64_at(&f, 16)?,
                u64_at(&f, 24)?,
                u32_at(&f, 44)?,
                u32_at(&f, 48)?,
            )
        };
        if size > self.b.len() as u64 * 2 + (1 << 32) {
            return Err(SqfsError::Damaged("file size"));
        }
        let blocks = if frag == NO_FRAGMENT {
            size.div_ceil(self.block_size)
        } else {
            size / self.block_size
        };
        // each block needs a 4-byte size entry inside the image: bounded by the image's size
        if blocks * 4 > self.b.len() as u64 {
            return Err(SqfsError::Damaged("block count"));
        }
        let list = self.inode(r, 16 + fixed + blocks as usize * 4)?;
        let mut len = 0u64;
        for k in 0..blocks as usize {
            len += (u32_at(&list, 16 + fixed + 4 * k)? & (DATA_UNCOMPRESSED - 1)) as u64;
        }
        let mut out = Vec::new();
        let end = self.b.len() as u64;
        if len > 0 {
            if start.checked_add(len).is_none_or(|e| e > end) {
                return Err(SqfsError::Damaged("file blocks past the end"));
            }
            out.push(start..start + len);
        }
        if frag != NO_FRAGMENT {
            let tail = size % self.block_size;
            if let Some(f0) = self.fragment(frag)? {
                let at = f0.saturating_add(tail_at as u64);
                if at.checked_add(tail).is_none_or(|e| e > end) {
                    return Err(SqfsError::Damaged("fragment tail past the end"));
                }
                if tail > 0 {
                    out.push(at..at + tail);
                }
            }
        }
        Ok(out)
    }

    /// The entries of the directory whose inode is at `r`: (name, inode reference, type).
    fn dir(&self, r: u64) -> Result<Vec<(String, u64, u16)>, SqfsError> {
        let h = self.inode(r, 16)?;
        let (block, size, offset) = match u16_at(&h, 0)? {
            1 => {
                let d = self.inode(r, 32)?;
                (u32_at(&d, 16)?, u16_at(&d, 24)? as u32, u16_at(&d, 26)?)
            }
            8 => {
                let d = self.inode(r, 40)?;
                (u32_at(&d, 24)?, u32_at(&d, 20)?, u16_at(&d, 34)?)
            }
            _ => return Err(SqfsError::Damaged("a directory entry is not a directory")),
        };
        // the listing's size counts 3 bytes more than it holds
        let len = size.saturating_sub(3) as usize;
        if len > self.b.len() {
            return Err(SqfsError::Damaged("directory size"));
        }
        let l = self.meta(
            self.dir_table.saturating_add(block as u64),
            offset as usize,
            len,
        )?;
        let mut out = Vec::new();
        let mut p = 0;
        while p < l.len() {
            let count = u32_at(&l, p)? as usize + 1;
            let start = u32_at(&l, p + 4)? as u64;
            p += 12;
            for _ in 0..count {
                let off = u16_at(&l, p)? as u64;
                let kind = u16_at(&l, p + 4)?;
                let n = u16_at(&l, p + 6)? as usize + 1;
                let name = l
                    .get(p + 8..p + 8 + n)
                    .ok_or(SqfsError::Damaged("directory entry past the end"))?;
                out.push((
                    String::from_utf8_lossy(name).into_owned(),
                    start << 16 | off,
                    kind,
                ));
                p += 8 + n;
            }
        }
        Ok(out)
    }
}

/// Every regular file of the image, with the ranges that hold its bytes, in path order.
pub fn files(img: &[u8]) -> Result<Vec<FileExtent>, SqfsError> {
    let im = Img::open(img)?;
    let root = u64_at(img, 32)?;
    let mut out = Vec::new();
    let mut seen = HashSet::new();
    let mut todo = vec![(String::new(), root)];
    while let Some((path, r)) = todo.pop() {
        if !seen.insert(r) {
            return Err(SqfsError::Damaged("a directory is listed twice"));
        }
        for (name, child, kind) in im.dir(r)? {
            let p = format!("{path}/{name}");
            match kind {
                1 => todo.push((p, child)),
                2 => {
                    let ranges = im.file(child)?;
                    out.push(FileExtent { path: p, ranges });
                }
                _ => {}
            }
        }
    }
    out.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(out)
}

/// `p` with every run of digits replaced by `#`: `6.1.0-47-amd64` and `6.1.0-48-amd64` are the
/// same once versions are ignored.
fn versionless(p: &str) -> String {
    let mut out = String::with_capacity(p.len());
    let mut digits = false;
    for c in p.chars() {
        if c.is_ascii_digit() {
            if !digits {
                out.push('#');
            }
            digits = true;
        } else {
            out.push(c);
            digits = false;
        }
    }
    out
}

/// Which files of one side hold a key.
#[derive(Default)]
enum Holders {
    #[default]
    None,
    One(usize),
    Many,
}

/// How a file is recognised across versions, from the strictest key to the loosest.
const KEYS: [fn(&str) -> String; 3] = [
    |p| p.to_string(),
    // a versioned directory: lib/modules/6.1.0-47-amd64/kernel/crypto/cast5_generic.ko
    |p| match p.rsplit_once('/') {
        Some((dir, name)) => format!("{}/{name}", versionless(dir)),
        None => p.to_string(),
    },
    // a versioned name: boot/vmlinuz-6.1.0-47-amd64
    versionless,
];

/// The new image's file ranges, each with the old image ranges of the same file. Files are
/// paired in rounds, with ever looser keys (the path; the path with the directories' digits
/// ignored; the path with all digits ignored): in each round, among the files not yet paired,
/// a key held by exactly one old and one new file pairs them. Sorted by new offset; a range
/// shared by several new files (mksquashfs stores duplicates once) appears once.
pub fn pairs(old: &[FileExtent], new: &[FileExtent]) -> Vec<Pair> {
    let mut partner: Vec<Option<usize>> = vec![None; new.len()];
    let mut old_taken = vec![false; old.len()];
    for key in KEYS {
        // key -> who holds it among the old files, and among the new ones
        let mut m: HashMap<String, (Holders, Holders)> = HashMap::new();
        let note = |slot: &mut Holders, i: usize| {
            *slot = match slot {
                Holders::None => Holders::One(i),
                _ => Holders::Many,
            }
        };
        for (i, f) in old.iter().enumerate().filter(|(i, _)| !old_taken[*i]) {
            note(&mut m.entry(key(&f.path)).or_default().0, i);
        }
        for (i, f) in new
            .iter()
            .enumerate()
            .filter(|(i, _)| partner[*i].is_none())
        {
            note(&mut m.entry(key(&f.path)).or_default().1, i);
        }
        for v in m.into_values() {
            if let (Holders::One(o), Holders::One(n)) = v {
                partner[n] = Some(o);
                old_taken[o] = true;
            }
        }
    }
    let mut out = Vec::new();
    for (f, o) in new.iter().zip(partner) {
        let Some(o) = o.map(|o| &old[o]) else {
            continue;
        };
        if o.ranges.is_empty() {
            continue;
        }
        for r in &f.ranges {
            out.push(Pair {
                new: r.clone(),
                old: o.ranges.clone(),
            });
        }
    }
    disjoint(out)
}

/// `pairs` sorted by new offset, without empty ones and without any that overlaps one before
/// it (the first of those kept): what [`super::matcher::diff_files`] expects.
pub fn disjoint(mut pairs: Vec<Pair>) -> Vec<Pair> {
    pairs.sort_by_key(|p| (p.new.start, std::cmp::Reverse(p.new.end)));
    let mut end = 0;
    pairs.retain(|p| {
        let keep = p.new.start >= end && !p.new.is_empty();
        if keep {
            end = p.new.end;
        }
        keep
    });
    pairs
}

/// The pairs for a patch from `old` to `new`, both SquashFS images with uncompressed metadata.
pub fn image_pairs(old: &[u8], new: &[u8]) -> Result<Vec<Pair>, SqfsError> {
    Ok(pairs(&files(old)?, &files(new)?))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::single_range_in_vec_init)]
mod tests {
    use super::*;

    fn fx(path: &str, r: Range<u64>) -> FileExtent {
        FileExtent {
            path: path.into(),
            ranges: vec![r],
        }
    }

    #[test]
    fn versioned_paths_pair_only_when_unique() {
        let old = vec![
            fx("/lib/modules/6.1.0-47/a.ko", 0..10),
            fx("/lib/modules/6.1.0-47/b.ko", 10..20),
            fx("/lib/modules/6.1.0-47/cast5.ko", 50..60),
            fx("/lib/modules/6.1.0-47/cast6.ko", 60..70),
            fx("/etc/x1", 20..30),
            fx("/etc/x2", 30..40),
            fx("/same", 40..50),
            fx("/boot/vmlinuz-6.1.0-47", 70..80),
        ];
        let new = vec![
            fx("/lib/modules/6.1.0-48/a.ko", 100..110),
            fx("/lib/modules/6.1.0-48/b.ko", 110..125),
            fx("/lib/modules/6.1.0-48/cast5.ko", 150..160),
            fx("/lib/modules/6.1.0-48/cast6.ko", 160..170),
            fx("/etc/x3", 200..210),
            fx("/same", 300..305),
            fx("/boot/vmlinuz-6.1.0-48", 400..410),
        ];
        let p = pairs(&old, &new);
        let got: Vec<_> = p.iter().map(|p| (p.new.clone(), p.old.clone())).collect();
        assert_eq!(
            got,
            vec![
                (100..110, vec![0..10]),
                (110..125, vec![10..20]),
                (150..160, vec![50..60]),
                (160..170, vec![60..70]),
                // /etc/x3 matches two old paths once digits are ignored: not paired
                (300..305, vec![40..50]),
                (400..410, vec![70..80]),
            ]
        );
    }

    #[test]
    fn not_squashfs_and_truncated_images_are_errors() {
        assert_eq!(files(&[0u8; 200]), Err(SqfsError::NotSquashfs));
        assert_eq!(files(b"hsqs"), Err(SqfsError::NotSquashfs));
    }
}
