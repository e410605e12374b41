//! Applying a BSDIFF40 patch (the format of classic `bsdiff`/`bspatch` and of `qbsdiff`) or a
//! BSDF2 patch (Android's bsdiff format, the default we make: see [`super::bsdf2`]) as a
//! sans-IO machine: the patch is held in memory, the source is asked for in bounded ranges, and
//! the output comes out in bounded chunks. Nothing here reads a file or allocates in proportion
//! to what a patch header claims.
//!
//! Layout: "BSDIFF40", then three signed 64-bit lengths (control block, diff block, new size),
//! then the bzip2-compressed control, diff and extra blocks (BSDF2: the same, but its magic
//! names each block's compression; the format is detected from the magic). Each control tuple is (add, copy,
//! seek): `add` output bytes are diff bytes plus source bytes (a source position outside the
//! source adds nothing, as classic bspatch does), `copy` bytes come from the extra block, then
//! the source position moves by `seek`.

/// The largest piece of source asked for, or of output produced, at once.
pub const CHUNK: usize = 256 * 1024;
/// The most control tuples one [`Patcher::step`] reads without producing output. Tuples that
/// add and copy nothing cost no output, so without this bound a patch of them keeps one step
/// busy for as long as its control block lasts.
pub const IDLE_TUPLES_PER_STEP: u32 = 1024;
/// The largest patch an install accepts: a patch is held in memory whole, so this bounds what
/// a delta costs in memory. A larger patch is refused (the install falls back to the full image).
pub const MAX_PATCH_LEN: u64 = 128 << 20;
const HEADER: usize = 32;

use super::bsdf2::{self, Codec, Format, StreamDecoder};

/// Why a patch cannot be applied. The source and the output are unaffected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PatchError {
    #[error("not a BSDIFF40 or BSDF2 patch (bad magic or shorter than its 32-byte header)")]
    NotBsdiff,
    #[error("patch header is inconsistent: {0}")]
    BadHeader(String),
    #[error("patch output would be {claimed} bytes, more than the {limit} bytes it may write")]
    TooLarge { claimed: u64, limit: u64 },
    #[error(
        "the patch is {len} bytes, more than the {limit}-byte limit on patches (they are held \
         in memory); use the full image, or make a smaller delta"
    )]
    PatchTooLarge { len: u64, limit: u64 },
    #[error("patch {block} block is corrupt: {why}")]
    Corrupt { block: &'static str, why: String },
    #[error(
        "patch control tuple at output offset {at} is invalid (add {add}, copy {copy}): it \
         points outside the {size}-byte output"
    )]
    BadControl {
        at: u64,
        add: i64,
        copy: i64,
        size: u64,
    },
    #[error("the source answered {got} bytes for a request of {want}")]
    SourceShort { got: usize, want: usize },
}

/// Sign-magnitude 64-bit integer, as bsdiff stores it.
pub(crate) fn offtin(b: &[u8]) -> i64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[..8]);
    let neg = x[7] & 0x80 != 0;
    x[7] &= 0x7F;
    let m = u64::from_le_bytes(x) as i64;
    if neg {
        -m
    } else {
        m
    }
}

/// What the patcher needs or produced next.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    /// Give [`Patcher::source`] the source bytes `offset..offset+len` (always inside the source).
    NeedSource { offset: u64, len: usize },
    /// The next output bytes, in order. Empty when the step ended after
    /// [`IDLE_TUPLES_PER_STEP`] control tuples that produced nothing: call `step` again.
    Output(Vec<u8>),
    /// The whole output has been produced.
    Done,
}

enum State {
    /// Between control tuples.
    Control,
    /// Adding: `left` bytes still to produce, then `copy` bytes from the extra block, then the
    /// source position moves by `seek`.
    Add {
        left: u64,
        copy: u64,
        seek: i64,
    },
    /// Waiting for the source bytes of an add piece of `len` bytes.
    AddSource {
        len: usize,
        left: u64,
        copy: u64,
        seek: i64,
    },
    /// Copying `left` bytes from the extra block.
    Copy {
        left: u64,
        seek: i64,
    },
    Done,
}

/// Applies one patch. Call [`Patcher::step`] until it returns [`Step::Done`]; answer each
/// [`Step::NeedSource`] with [`Patcher::source`].
pub struct Patcher {
    patch: Vec<u8>,
    new_size: u64,
    source_len: u64,
    ctrl: StreamDecoder,
    diff: StreamDecoder,
    extra: StreamDecoder,
    new_pos: u64,
    old_pos: i64,
    state: State,
    source_buf: Option<Vec<u8>>,
}

impl std::fmt::Debug for Patcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Patcher")
            .field("new_size", &self.new_size)
            .field("new_pos", &self.new_pos)
            .finish()
    }
}

/// The output size a patch claims, after checking its header.
pub fn output_size(patch: &[u8]) -> Result<u64, PatchError> {
    if patch.len() < HEADER {
        return Err(PatchError::NotBsdiff);
    }
    bsdf2::detect(patch)?;
    let (c, d, n) = (
        offtin(&patch[8..]),
        offtin(&patch[16..]),
        offtin(&patch[24..]),
    );
    if c < 0 || d < 0 || n < 0 {
        return Err(PatchError::BadHeader(format!(
            "negative length (control {c}, diff {d}, new size {n})"
        )));
    }
    let body = (patch.len() - HEADER) as u64;
    if (c as u64).saturating_add(d as u64) > body {
        return Err(PatchError::BadHeader(format!(
            "control ({c}) and diff ({d}) blocks are longer than the {body}-byte body"
        )));
    }
    Ok(n as u64)
}

impl Patcher {
    /// Check the header and prepare. `max_output` bounds the output (the target slot's
    /// capacity); a patch that claims more is refused before anything is produced, and so is a
    /// patch longer than [`MAX_PATCH_LEN`].
    pub fn new(patch: Vec<u8>, source_len: u64, max_output: u64) -> Result<Self, PatchError> {
        if patch.len() as u64 > MAX_PATCH_LEN {
            return Err(PatchError::PatchTooLarge {
                len: patch.len() as u64,
                limit: MAX_PATCH_LEN,
            });
        }
        let new_size = output_size(&patch)?;
        if new_size > max_output {
            return Err(PatchError::TooLarge {
                claimed: new_size,
                limit: max_output,
            });
        }
        let c = offtin(&patch[8..]) as usize;
        let d = offtin(&patch[16..]) as usize;
        let (cs, ds, es) = (HEADER, HEADER + c, HEADER + c + d);
        let end = patch.len();
        let codecs = match bsdf2::detect(&patch)? {
            Format::Bsdiff40 => [Codec::Bz2; 3],
            Format::Bsdf2(codecs) => codecs,
        };
        Ok(Patcher {
            ctrl: StreamDecoder::new("control", codecs[0], cs, ds),
            diff: StreamDecoder::new("diff", codecs[1], ds, es),
            extra: StreamDecoder::new("extra", codecs[2], es, end),
            patch,
            new_size,
            source_len,
            new_pos: 0,
            old_pos: 0,
            state: if new_size == 0 {
                State::Done
            } else {
                State::Control
            },
            source_buf: None,
        })
    }

    /// The size of the output.
    pub fn new_size(&self) -> u64 {
        self.new_size
    }

    /// How much output has been produced.
    pub fn produced(&self) -> u64 {
        self.new_pos
    }

    /// The answer to [`Step::NeedSource`].
    pub fn source(&mut self, bytes: Vec<u8>) {
        self.source_buf = Some(bytes);
    }

    /// The source range `[old_pos, old_pos + len)` clipped to the source, relative to old_pos.
    fn source_window(&self, len: usize) -> Option<(u64, usize, usize)> {
        let start = self.old_pos.max(0) as u64;
        let end_i = self.old_pos.saturating_add(len as i64);
        if end_i <= 0 || start >= self.source_len {
            return None;
        }
        let end = (end_i as u64).min(self.source_len);
        let skip = (start as i64 - self.old_pos) as usize;
        Some((start, skip, (end - start) as usize))
    }

    /// The next step. Each call does a bounded amount of work: it produces at most [`CHUNK`]
    /// bytes and reads at most [`IDLE_TUPLES_PER_STEP`] control tuples that produce nothing.
    pub fn step(&mut self) -> Result<Step, PatchError> {
        let mut idle_tuples = 0u32;
        loop {
            match self.state {
                State::Done => return Ok(Step::Done),
                State::Control => {
                    if self.new_pos >= self.new_size {
                        self.state = State::Done;
                        continue;
                    }
                    if idle_tuples >= IDLE_TUPLES_PER_STEP {
                        return Ok(Step::Output(Vec::new()));
                    }
                    idle_tuples += 1;
                    let mut t = [0u8; 24];
                    self.ctrl.read_exact(&self.patch, &mut t)?;
                    let (add, copy, seek) = (offtin(&t), offtin(&t[8..]), offtin(&t[16..]));
                    let left = self.new_size - self.new_pos;
                    let fits = add >= 0
                        && copy >= 0
                        && (add as u64)
                            .checked_add(copy as u64)
                            .is_some_and(|s| s <= left);
                    if !fits {
                        return Err(PatchError::BadControl {
                            at: self.new_pos,
                            add,
                            copy,
                            size: self.new_size,
                        });
                    }
                    self.state = State::Add {
                        left: add as u64,
                        copy: copy as u64,
                        seek,
                    };
                }
                State::Add { left, copy, seek } => {
                    if left == 0 {
                        self.state = State::Copy { left: copy, seek };
                        continue;
                    }
                    let len = (left as usize).min(CHUNK);
                    self.state = State::AddSource {
                        len,
                        left,
                        copy,
                        seek,
                    };
                    if let Some((offset, _, n)) = self.source_window(len) {
                        if self.source_buf.is_none() {
                            return Ok(Step::NeedSource { offset, len: n });
                        }
                    }
                }
                State::AddSource {
                    len,
                    left,
                    copy,
                    seek,
                } => {
                    let window = self.source_window(len);
                    if let (Some((offset, _, n)), None) = (window, &self.source_buf) {
                        return Ok(Step::NeedSource { offset, len: n });
                    }
                    let mut out = vec![0u8; len];
                    self.diff.read_exact(&self.patch, &mut out)?;
                    if let Some((_, skip, n)) = window {
                        let src = self.source_buf.take().unwrap_or_default();
                        if src.len() != n {
                            return Err(PatchError::SourceShort {
                                got: src.len(),
                                want: n,
                            });
                        }
                        for (o, s) in out[skip..skip + n].iter_mut().zip(src.iter()) {
                            *o = o.wrapping_add(*s);
                        }
                    }
                    self.new_pos += len as u64;
                    self.old_pos = self.old_pos.saturating_add(len as i64);
                    self.state = State::Add {
                        left: left - len as u64,
                        copy,
                        seek,
                    };
                    return Ok(Step::Output(out));
                }
                State::Copy { left, seek } => {
                    if left == 0 {
                        self.old_pos = self.old_pos.saturating_add(seek);
                        self.state = State::Control;
                        continue;
                    }
                    let len = (left as usize).min(CHUNK);
                    let mut out = vec![0u8; len];
                    self.extra.read_exact(&self.patch, &mut out)?;
                    self.new_pos += len as u64;
                    self.state = State::Copy {
                        left: left - len as u64,
                        seek,
                    };
                    return Ok(Step::Output(out));
                }
            }
        }
    }
}

/// Apply `patch` to a source held in memory (tests, and the offline tool's `delta apply`).
pub fn apply_in_memory(
    source: &[u8],
    patch: Vec<u8>,
    max_output: u64,
) -> Result<Vec<u8>, PatchError> {
    let mut p = Patcher::new(patch, source.len() as u64, max_output)?;
    let mut out = Vec::new();
    loop {
        match p.step()? {
            Step::NeedSource { offset, len } => {
                let o = offset as usize;
                p.source(source[o..o + len].to_vec());
            }
            Step::Output(b) => out.extend_from_slice(&b),
            Step::Done => return Ok(out),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn make(old: &[u8], new: &[u8]) -> Vec<u8> {
        let mut patch = Vec::new();
        qbsdiff::Bsdiff::new(old, new).compare(&mut patch).unwrap();
        patch
    }

    #[test]
    fn round_trip_against_qbsdiff() {
        let old: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let mut new = old.clone();
        new[1000..1100].fill(7);
        new.extend_from_slice(b"appended tail");
        new.drain(50_000..60_000);
        let patch = make(&old, &new);
        assert_eq!(apply_in_memory(&old, patch.clone(), 1 << 30).unwrap(), new);
        // and qbsdiff's own bspatch agrees
        let mut theirs = Vec::new();
        qbsdiff::Bspatch::new(&patch)
            .unwrap()
            .apply(&old, std::io::Cursor::new(&mut theirs))
            .unwrap();
        assert_eq!(theirs, new);
    }

    #[test]
    fn empty_output() {
        let patch = make(b"something", b"");
        assert_eq!(
            apply_in_memory(b"something", patch, 10).unwrap(),
            Vec::<u8>::new()
        );
    }

    #[test]
    fn bad_patches_are_errors_not_panics() {
        let old = vec![1u8; 5000];
        let new = vec![2u8; 6000];
        let good = make(&old, &new);
        assert_eq!(
            apply_in_memory(&old, b"garbage".to_vec(), 1 << 20),
            Err(PatchError::NotBsdiff)
        );
        // a header that claims a huge output is refused before anything is produced
        let mut huge = good.clone();
        huge[24..32].copy_from_slice(&(1u64 << 62).to_le_bytes());
        assert!(matches!(
            apply_in_memory(&old, huge, 1 << 30),
            Err(PatchError::TooLarge { .. })
        ));
        // negative lengths
        let mut neg = good.clone();
        neg[15] |= 0x80;
        assert!(matches!(
            apply_in_memory(&old, neg, 1 << 30),
            Err(PatchError::BadHeader(_))
        ));
        // truncated: an error, or (when only the stream trailer is lost) the right output
        let short = good[..good.len() / 2].to_vec();
        assert!(apply_in_memory(&old, short, 1 << 30).is_err());
        let short = good[..good.len() - 10].to_vec();
        if let Ok(out) = apply_in_memory(&old, short, 1 << 30) {
            assert_eq!(out, new);
        }
        // flipped bytes in the body
        for at in [40, good.len() / 2, good.len() - 3] {
            let mut bad = good.clone();
            bad[at] ^= 0xFF;
            let _ = apply_in_memory(&old, bad, 1 << 30); // any result but a panic
        }
    }

    /// Hand-made patches whose control tuples point outside the output or the source.
    #[test]
    fn hand_made_control_values() {
        fn bz(data: &[u8]) -> Vec<u8> {
            let mut c = bzip2::Compress::new(bzip2::Compression::best(), 30);
            let mut out = Vec::with_capacity(data.len() + 1024);
            c.compress_vec(data, &mut out, bzip2::Action::Finish)
                .unwrap();
            out
        }
        fn off(x: i64) -> [u8; 8] {
            let mut b = x.unsigned_abs().to_le_bytes();
            if x < 0 {
                b[7] |= 0x80;
            }
            b
        }
        fn patch(ctrl: &[(i64, i64, i64)], diff: &[u8], extra: &[u8], size: i64) -> Vec<u8> {
            let c: Vec<u8> = ctrl
                .iter()
                .flat_map(|(a, b, s)| [off(*a), off(*b), off(*s)].concat())
                .collect();
            let (c, d, e) = (bz(&c), bz(diff), bz(extra));
            let mut p = b"BSDIFF40".to_vec();
            p.extend_from_slice(&off(c.len() as i64));
            p.extend_from_slice(&off(d.len() as i64));
            p.extend_from_slice(&off(size));
            p.extend(c);
            p.extend(d);
            p.extend(e);
            p
        }
        let old = vec![10u8; 100];
        // add past the end of the output
        let p = patch(&[(50, 0, 0)], &[0; 50], &[], 10);
        assert!(matches!(
            apply_in_memory(&old, p, 1000),
            Err(PatchError::BadControl { .. })
        ));
        // negative copy
        let p = patch(&[(0, -5, 0)], &[], &[], 10);
        assert!(matches!(
            apply_in_memory(&old, p, 1000),
            Err(PatchError::BadControl { .. })
        ));
        // seek far outside the source: the add reads nothing from it (classic semantics)
        let p = patch(&[(0, 0, -1_000_000), (10, 0, 0)], &[1; 10], &[], 10);
        assert_eq!(apply_in_memory(&old, p, 1000).unwrap(), vec![1u8; 10]);
        // seek to the source's end, partly overlapping
        let p = patch(&[(0, 0, 95), (10, 0, 0)], &[1; 10], &[], 10);
        let out = apply_in_memory(&old, p, 1000).unwrap();
        assert_eq!(out, [vec![11u8; 5], vec![1u8; 5]].concat());
        // a control block that runs out before the output is complete
        let p = patch(&[(5, 0, 0)], &[0; 5], &[], 10);
        assert!(matches!(
            apply_in_memory(&old, p, 1000),
            Err(PatchError::Corrupt { .. })
        ));
        // an extra block shorter than its copy
        let p = patch(&[(0, 10, 0)], &[], &[1; 3], 10);
        assert!(matches!(
            apply_in_memory(&old, p, 1000),
            Err(PatchError::Corrupt { .. })
        ));
        // huge seek values do not overflow
        let p = patch(
            &[(0, 0, i64::MAX), (0, 0, i64::MAX), (3, 0, 0)],
            &[1; 3],
            &[],
            3,
        );
        assert_eq!(apply_in_memory(&old, p, 1000).unwrap(), vec![1u8; 3]);

        // Guards the bound on work per step (issue 11, item 5): control tuples that add and
        // copy nothing end a step after IDLE_TUPLES_PER_STEP of them, with an empty output.
        let mut ctrl = vec![(0, 0, 0); 100_000];
        ctrl.push((10, 0, 0));
        let p = patch(&ctrl, &[1; 10], &[], 10);
        let mut pt = Patcher::new(p.clone(), old.len() as u64, 1000).unwrap();
        assert_eq!(pt.step().unwrap(), Step::Output(Vec::new()));
        assert!(
            pt.ctrl.total_out() <= 24 * u64::from(IDLE_TUPLES_PER_STEP),
            "one step read {} control bytes",
            pt.ctrl.total_out()
        );
        let mut empty_steps = 1;
        loop {
            match pt.step().unwrap() {
                Step::Output(b) if b.is_empty() => empty_steps += 1,
                Step::NeedSource { .. } | Step::Output(_) => break,
                Step::Done => panic!("done before the output"),
            }
        }
        assert!(
            empty_steps >= 100_000 / IDLE_TUPLES_PER_STEP,
            "{empty_steps}"
        );
        assert_eq!(apply_in_memory(&old, p, 1000).unwrap(), vec![11u8; 10]);
    }

    /// Guards the patch size limit (issue 11, item 5): a patch over MAX_PATCH_LEN is refused
    /// with the limit in the message.
    #[test]
    fn patches_over_the_limit_are_refused() {
        let mut big = make(b"old", b"new");
        big.resize(MAX_PATCH_LEN as usize + 1, 0);
        let e = Patcher::new(big, 3, 1 << 40).unwrap_err();
        assert_eq!(
            e,
            PatchError::PatchTooLarge {
                len: MAX_PATCH_LEN + 1,
                limit: MAX_PATCH_LEN
            }
        );
        assert!(e.to_string().contains(&MAX_PATCH_LEN.to_string()), "{e}");
    }
}
