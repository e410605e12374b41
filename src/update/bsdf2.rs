//! The BSDF2 patch format and the stream decoders [`super::bspatch::Patcher`] reads patches
//! with. BSDF2 is Android's bsdiff format (AOSP `external/bsdiff`, read by update_engine): the
//! control, diff and extra streams of BSDIFF40, each compressed by the codec its header names,
//! so a patch made here is readable by Android's `bspatch` and the other way round.
//!
//! Layout: "BSDF2", one codec byte for each of the control, diff and extra streams (0 none,
//! 1 bzip2, 2 brotli), then BSDIFF40's three signed-magnitude 64-bit lengths (control stream,
//! diff stream, new size): a 32-byte header, then the three streams.
//!
//! This module never allocates in proportion to a header value: a brotli stream is decoded
//! with the standard window limit (16 MiB; Android's large-window extension is refused), and
//! bzip2's own state is bounded by its format. Making patches ([`create`]) is offline work and
//! holds both images in memory, like every bsdiff.

use super::bspatch::PatchError;
use super::matcher::{self, Matching, Streams};
use std::io::{Read, Write};

/// The first five bytes of a BSDF2 patch.
pub const MAGIC: &[u8; 5] = b"BSDF2";
/// The first eight bytes of a classic BSDIFF40 patch.
pub const BSDIFF40_MAGIC: &[u8; 8] = b"BSDIFF40";
/// Brotli quality of the streams we write by default (0-11): the best. On the Debian kernel
/// pair of `ci/bench` it makes the patch 3.5 % smaller than quality 9 and the create step
/// take about 1.8 times as long; applying it took about as long as a quality-9 patch (1.19 s
/// and 1.11 s). Tests that only need a valid patch ask for less ([`Bsdf2Params::quality`]).
pub const BROTLI_QUALITY: u32 = 11;
/// Brotli window of the streams we write: 2^24 bytes, the largest standard brotli window
/// (decoders need that much memory at most, whatever the patch says).
pub const BROTLI_LGWIN: i32 = 24;

/// How one stream of a patch is compressed (the codec byte of a BSDF2 header).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Codec {
    /// Stored as is.
    None = 0,
    /// bzip2, as in BSDIFF40.
    Bz2 = 1,
    /// brotli, standard window.
    Brotli = 2,
}

impl Codec {
    /// The codec a BSDF2 header byte names, if any.
    pub fn from_byte(b: u8) -> Option<Codec> {
        match b {
            0 => Some(Codec::None),
            1 => Some(Codec::Bz2),
            2 => Some(Codec::Brotli),
            _ => None,
        }
    }
}

/// Which patch format a patch is in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// Classic bsdiff 4.x: every stream bzip2.
    Bsdiff40,
    /// Android's BSDF2 with the codecs of its header (control, diff, extra).
    Bsdf2([Codec; 3]),
}

/// The format of `patch`, from its magic and (for BSDF2) codec bytes.
pub fn detect(patch: &[u8]) -> Result<Format, PatchError> {
    if patch.starts_with(BSDIFF40_MAGIC) {
        return Ok(Format::Bsdiff40);
    }
    if patch.len() >= 8 && patch.starts_with(MAGIC) {
        let mut codecs = [Codec::None; 3];
        for (i, name) in ["control", "diff", "extra"].into_iter().enumerate() {
            codecs[i] = Codec::from_byte(patch[5 + i]).ok_or_else(|| {
                PatchError::BadHeader(format!(
                    "BSDF2 {name} stream codec {} is unknown (0 none, 1 bzip2, 2 brotli)",
                    patch[5 + i]
                ))
            })?;
        }
        return Ok(Format::Bsdf2(codecs));
    }
    Err(PatchError::NotBsdiff)
}

type BrotliState = brotli::BrotliState<
    brotli::enc::StandardAlloc,
    brotli::enc::StandardAlloc,
    brotli::enc::StandardAlloc,
>;

enum Decoder {
    None,
    Bz2(bzip2::Decompress),
    Brotli(Box<BrotliState>),
}

/// One compressed stream over a byte range of the patch, decoded on demand into the caller's
/// buffer (no buffer of its own beyond the codec's bounded state).
pub(crate) struct StreamDecoder {
    name: &'static str,
    /// Where the next unread input byte is.
    pos: usize,
    end: usize,
    dec: Decoder,
    total_out: u64,
    ended: bool,
}

impl StreamDecoder {
    pub(crate) fn new(name: &'static str, codec: Codec, start: usize, end: usize) -> Self {
        let dec = match codec {
            Codec::None => Decoder::None,
            Codec::Bz2 => Decoder::Bz2(bzip2::Decompress::new(false)),
            Codec::Brotli => Decoder::Brotli(Box::new(BrotliState::new_strict(
                Default::default(),
                Default::default(),
                Default::default(),
            ))),
        };
        StreamDecoder {
            name,
            pos: start,
            end,
            dec,
            total_out: 0,
            ended: false,
        }
    }

    /// How many decoded bytes this stream has produced.
    #[cfg(test)]
    pub(crate) fn total_out(&self) -> u64 {
        self.total_out
    }

    /// Fill `out` with the next decoded bytes of the stream, or fail if the stream ends or is
    /// corrupt before that.
    pub(crate) fn read_exact(&mut self, patch: &[u8], out: &mut [u8]) -> Result<(), PatchError> {
        let mut filled = 0;
        while filled < out.len() {
            if self.ended {
                return Err(self.corrupt("ends early"));
            }
            let input = &patch[self.pos.min(self.end)..self.end];
            let (used, made) = match &mut self.dec {
                Decoder::None => {
                    let n = input.len().min(out.len() - filled);
                    out[filled..filled + n].copy_from_slice(&input[..n]);
                    if n == 0 {
                        self.ended = true;
                    }
                    (n, n)
                }
                Decoder::Bz2(d) => {
                    let (in0, out0) = (d.total_in(), d.total_out());
                    let status = d.decompress(input, &mut out[filled..]).map_err(|e| {
                        PatchError::Corrupt {
                            block: self.name,
                            why: e.to_string(),
                        }
                    })?;
                    if status == bzip2::Status::StreamEnd {
                        self.ended = true;
                    }
                    (
                        (d.total_in() - in0) as usize,
                        (d.total_out() - out0) as usize,
                    )
                }
                Decoder::Brotli(s) => {
                    let (mut avail_in, mut in_off) = (input.len(), 0usize);
                    let (mut avail_out, mut out_off, mut total) = (out.len() - filled, 0, 0);
                    let r = brotli::BrotliDecompressStream(
                        &mut avail_in,
                        &mut in_off,
                        input,
                        &mut avail_out,
                        &mut out_off,
                        &mut out[filled..],
                        &mut total,
                        s,
                    );
                    match r {
                        brotli::BrotliResult::ResultFailure => {
                            return Err(self.corrupt("invalid brotli data"))
                        }
                        brotli::BrotliResult::ResultSuccess => self.ended = true,
                        _ => {}
                    }
                    (in_off, out_off)
                }
            };
            self.pos += used;
            self.total_out += made as u64;
            filled += made;
            if used == 0 && made == 0 && filled < out.len() && !self.ended {
                return Err(self.corrupt("truncated"));
            }
        }
        Ok(())
    }

    fn corrupt(&self, why: &str) -> PatchError {
        PatchError::Corrupt {
            block: self.name,
            why: why.to_string(),
        }
    }
}

/// Signed-magnitude 64-bit integer, as bsdiff stores it.
pub(crate) fn offtout(x: i64) -> [u8; 8] {
    let mut b = x.unsigned_abs().to_le_bytes();
    if x < 0 {
        b[7] |= 0x80;
    }
    b
}

/// How [`create`] makes a BSDF2 patch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bsdf2Params {
    pub matching: Matching,
    /// Brotli quality of the three streams (0-11).
    pub quality: u32,
    /// Look for each file's bytes in its old version first, when both images are SquashFS
    /// with uncompressed metadata ([`super::sqfsmap`]); otherwise match over the whole image.
    pub per_file: bool,
}

impl Default for Bsdf2Params {
    /// What `keel-image delta create` and releases use: per-file and near matching, quality 11.
    fn default() -> Self {
        Bsdf2Params {
            matching: Matching::Near,
            quality: BROTLI_QUALITY,
            per_file: true,
        }
    }
}

/// Which format [`create`] writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CreateFormat {
    /// BSDF2 with brotli streams, matched by [`super::matcher`]: the default for
    /// `keel-image delta create` and releases.
    Bsdf2Brotli(Bsdf2Params),
    /// Classic BSDIFF40 (bzip2 level 9, as classic bsdiff writes it).
    Bsdiff40,
}

/// Compress `data` as one brotli stream of our window at `quality`.
fn brotli_stream(data: &[u8], quality: u32, out: &mut Vec<u8>) -> std::io::Result<()> {
    let params = brotli::enc::BrotliEncoderParams {
        quality: quality.min(11) as i32,
        lgwin: BROTLI_LGWIN,
        size_hint: data.len(),
        ..Default::default()
    };
    brotli::BrotliCompress(&mut &data[..], out, &params).map(|_| ())
}

/// Rewrite a BSDIFF40 patch as BSDF2 with brotli streams: the same control tuples, diff and
/// extra bytes, so it applies to the same source with the same result.
pub fn bsdiff40_to_bsdf2(patch: &[u8]) -> Result<Vec<u8>, PatchError> {
    if detect(patch)? != Format::Bsdiff40 {
        return Err(PatchError::NotBsdiff);
    }
    let new_size = super::bspatch::output_size(patch)?;
    let len = |at: usize| {
        let mut x = [0u8; 8];
        x.copy_from_slice(&patch[at..at + 8]);
        x[7] &= 0x7F;
        u64::from_le_bytes(x) as usize
    };
    let (c, d) = (len(8), len(16));
    let ranges = [
        (32, 32 + c),
        (32 + c, 32 + c + d),
        (32 + c + d, patch.len()),
    ];
    let mut raw: [Vec<u8>; 3] = Default::default();
    for (i, (name, (s, e))) in ["control", "diff", "extra"].iter().zip(ranges).enumerate() {
        bzip2::read::BzDecoder::new(&patch[s..e])
            .read_to_end(&mut raw[i])
            .map_err(|e| PatchError::Corrupt {
                block: name,
                why: e.to_string(),
            })?;
    }
    let [ctrl, diff, extra] = raw;
    bsdf2_brotli(&Streams { ctrl, diff, extra }, new_size, BROTLI_QUALITY).map_err(|e| {
        PatchError::Corrupt {
            block: "patch",
            why: e.to_string(),
        }
    })
}

/// A BSDF2 patch with brotli streams from raw streams, for an output of `new_size` bytes. The
/// three streams are compressed on threads of their own (the diff stream takes longest).
pub fn bsdf2_brotli(raw: &Streams, new_size: u64, quality: u32) -> std::io::Result<Vec<u8>> {
    let streams = std::thread::scope(|t| {
        let jobs: Vec<_> = [&raw.ctrl, &raw.diff, &raw.extra]
            .into_iter()
            .map(|data| {
                t.spawn(move || {
                    let mut out = Vec::new();
                    brotli_stream(data, quality, &mut out).map(|()| out)
                })
            })
            .collect();
        jobs.into_iter()
            .map(|j| {
                j.join()
                    .unwrap_or_else(|_| Err(std::io::Error::other("brotli encoder panicked")))
            })
            .collect::<std::io::Result<Vec<Vec<u8>>>>()
    })?;
    let mut out = Vec::with_capacity(32 + streams.iter().map(Vec::len).sum::<usize>());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&[Codec::Brotli as u8; 3]);
    out.extend_from_slice(&offtout(streams[0].len() as i64));
    out.extend_from_slice(&offtout(streams[1].len() as i64));
    out.extend_from_slice(&offtout(new_size as i64));
    for s in &streams {
        out.extend_from_slice(s);
    }
    Ok(out)
}

/// Make a patch from `old` to `new` in `format` and write it to `out`; returns its length.
pub fn create(
    old: &[u8],
    new: &[u8],
    format: CreateFormat,
    mut out: impl Write,
) -> std::io::Result<u64> {
    let patch = match format {
        CreateFormat::Bsdiff40 => {
            let mut classic = Vec::new();
            qbsdiff::Bsdiff::new(old, new)
                .compression_level(9)
                .compare(&mut classic)?;
            classic
        }
        CreateFormat::Bsdf2Brotli(p) => {
            let files = if p.per_file {
                super::sqfsmap::image_pairs(old, new).unwrap_or_default()
            } else {
                Vec::new()
            };
            bsdf2_brotli(
                &matcher::diff_files(old, new, p.matching, &files),
                new.len() as u64,
                p.quality,
            )?
        }
    };
    out.write_all(&patch)?;
    out.flush()?;
    Ok(patch.len() as u64)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::panic)]
mod tests {
    use super::*;
    use crate::update::bspatch::{apply_in_memory, Patcher, Step};

    fn pair() -> (Vec<u8>, Vec<u8>) {
        let old: Vec<u8> = (0..300_000u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        let mut new = old.clone();
        new[1000..1100].fill(7);
        for i in (20_000..200_000).step_by(4096) {
            new[i] = new[i].wrapping_add(3); // a relocation every page
        }
        new.extend_from_slice(b"appended tail");
        new.drain(50_000..60_000);
        (old, new)
    }

    fn make(old: &[u8], new: &[u8], format: CreateFormat) -> Vec<u8> {
        let mut p = Vec::new();
        let n = create(old, new, format, &mut p).unwrap();
        assert_eq!(n, p.len() as u64);
        p
    }

    /// A BSDF2 patch with the given codecs, built by hand from raw streams.
    fn handmade(codecs: [u8; 3], streams: [&[u8]; 3], new_size: i64) -> Vec<u8> {
        let enc: Vec<Vec<u8>> = streams
            .iter()
            .zip(codecs)
            .map(|(s, c)| match c {
                1 => {
                    let mut out = Vec::new();
                    std::io::copy(
                        &mut bzip2::read::BzEncoder::new(*s, bzip2::Compression::best()),
                        &mut out,
                    )
                    .unwrap();
                    out
                }
                2 => {
                    let mut out = Vec::new();
                    brotli_stream(s, BROTLI_QUALITY, &mut out).unwrap();
                    out
                }
                _ => s.to_vec(),
            })
            .collect();
        let mut p = MAGIC.to_vec();
        p.extend_from_slice(&codecs);
        p.extend_from_slice(&offtout(enc[0].len() as i64));
        p.extend_from_slice(&offtout(enc[1].len() as i64));
        p.extend_from_slice(&offtout(new_size));
        for e in enc {
            p.extend(e);
        }
        p
    }

    fn ctrl(tuples: &[(i64, i64, i64)]) -> Vec<u8> {
        tuples
            .iter()
            .flat_map(|(a, c, s)| [offtout(*a), offtout(*c), offtout(*s)].concat())
            .collect()
    }

    #[test]
    fn bsdf2_round_trip_and_detection() {
        let (old, new) = pair();
        let ours = make(
            &old,
            &new,
            CreateFormat::Bsdf2Brotli(Bsdf2Params::default()),
        );
        assert_eq!(detect(&ours).unwrap(), Format::Bsdf2([Codec::Brotli; 3]));
        assert_eq!(&ours[..8], b"BSDF2\x02\x02\x02");
        assert_eq!(apply_in_memory(&old, ours.clone(), 1 << 30).unwrap(), new);
        let classic = make(&old, &new, CreateFormat::Bsdiff40);
        assert_eq!(detect(&classic).unwrap(), Format::Bsdiff40);
        assert_eq!(
            apply_in_memory(&old, classic.clone(), 1 << 30).unwrap(),
            new
        );
        // the same matching, a stronger entropy stage
        assert!(
            ours.len() < classic.len(),
            "{} vs {}",
            ours.len(),
            classic.len()
        );
        // empty images both ways
        let p = make(&old, &[], CreateFormat::Bsdf2Brotli(Bsdf2Params::default()));
        assert_eq!(apply_in_memory(&old, p, 10).unwrap(), Vec::<u8>::new());
        let p = make(&[], &new, CreateFormat::Bsdf2Brotli(Bsdf2Params::default()));
        assert_eq!(apply_in_memory(&[], p, 1 << 30).unwrap(), new);
    }

    /// Every codec of the header is honoured, each stream on its own (as Android writes them).
    #[test]
    fn each_stream_may_have_its_own_codec() {
        let old = vec![10u8; 100];
        let c = ctrl(&[(6, 4, -3), (5, 0, 0)]);
        let diff = [1u8, 2, 3, 4, 5, 6, 0, 0, 0, 0, 1];
        let extra = b"XYZW";
        let want: Vec<u8> = [
            vec![11, 12, 13, 14, 15, 16],
            b"XYZW".to_vec(),
            vec![10, 10, 10, 10, 11],
        ]
        .concat();
        for codecs in [[0, 0, 0], [1, 2, 0], [2, 0, 1], [2, 2, 2], [1, 1, 1]] {
            let p = handmade(codecs, [&c, &diff, extra], 15);
            assert_eq!(
                apply_in_memory(&old, p, 1000).unwrap(),
                want,
                "codecs {codecs:?}"
            );
        }
    }

    #[test]
    fn hostile_and_broken_headers_are_clear_errors() {
        let (old, new) = pair();
        let good = make(
            &old,
            &new,
            CreateFormat::Bsdf2Brotli(Bsdf2Params::default()),
        );
        // unknown codec, named with the stream it is for
        for (at, name) in [(5, "control"), (6, "diff"), (7, "extra")] {
            let mut bad = good.clone();
            bad[at] = 3;
            let e = apply_in_memory(&old, bad, 1 << 30).unwrap_err();
            assert!(
                matches!(&e, PatchError::BadHeader(m) if m.contains(name) && m.contains("codec 3")),
                "{e}"
            );
        }
        // shorter than the header, or another magic
        for p in [&good[..7], &good[..31], b"BSDF1\x02\x02\x02", b""] {
            assert_eq!(
                apply_in_memory(&old, p.to_vec(), 1 << 30),
                Err(PatchError::NotBsdiff)
            );
        }
        // a claimed output larger than the slot is refused before any work
        let mut huge = good.clone();
        huge[24..32].copy_from_slice(&offtout(1 << 62));
        assert!(matches!(
            Patcher::new(huge, old.len() as u64, 1 << 30),
            Err(PatchError::TooLarge { .. })
        ));
        // negative or oversized stream lengths
        let mut neg = good.clone();
        neg[8..16].copy_from_slice(&offtout(-5));
        assert!(matches!(
            apply_in_memory(&old, neg, 1 << 30),
            Err(PatchError::BadHeader(_))
        ));
        let mut long = good.clone();
        long[16..24].copy_from_slice(&offtout(1 << 40));
        assert!(matches!(
            apply_in_memory(&old, long, 1 << 30),
            Err(PatchError::BadHeader(_))
        ));
        // truncated bodies fail (or, if only the end of the last stream is lost, still give
        // the right output); flipped bytes never panic
        for cut in [good.len() / 2, good.len() - 1, 40] {
            match apply_in_memory(&old, good[..cut].to_vec(), 1 << 30) {
                Ok(out) => assert_eq!(out, new, "cut at {cut}"),
                Err(e) => assert!(
                    matches!(e, PatchError::Corrupt { .. } | PatchError::BadHeader(_)),
                    "{e}"
                ),
            }
        }
        assert!(apply_in_memory(&old, good[..good.len() / 2].to_vec(), 1 << 30).is_err());
        for at in (32..good.len()).step_by(97) {
            let mut bad = good.clone();
            bad[at] ^= 0x55;
            let _ = apply_in_memory(&old, bad, 1 << 30);
        }
    }

    /// Guards the bounded decoder memory: a brotli stream in the large-window extension
    /// (windows up to 1 GiB) is refused, not decoded with a window the header chose.
    #[test]
    fn large_window_brotli_is_refused() {
        let data = vec![0u8; 1000];
        let params = brotli::enc::BrotliEncoderParams {
            quality: 5,
            lgwin: 30,
            large_window: true,
            ..Default::default()
        };
        let mut big = Vec::new();
        brotli::BrotliCompress(&mut &data[..], &mut big, &params).unwrap();
        let c = ctrl(&[(1000, 0, 0)]);
        let mut p = handmade([0, 0, 0], [&c, &[], &[]], 1000);
        // splice the large-window diff stream in
        p.truncate(32 + c.len());
        p[16..24].copy_from_slice(&offtout(big.len() as i64));
        p[6] = 2;
        p.extend_from_slice(&big);
        let e = apply_in_memory(&data, p, 1 << 20).unwrap_err();
        assert!(
            matches!(&e, PatchError::Corrupt { block: "diff", .. }),
            "{e}"
        );
    }

    /// Stepping a BSDF2 patch keeps the machine's bounds: no output piece over CHUNK, and the
    /// source is asked for in bounded ranges inside the source.
    #[test]
    fn steps_stay_bounded() {
        let old: Vec<u8> = (0..2_000_000u32).map(|i| (i % 253) as u8).collect();
        let mut new = old.clone();
        new[700_000..700_010].fill(1);
        let p = make(
            &old,
            &new,
            CreateFormat::Bsdf2Brotli(Bsdf2Params::default()),
        );
        let mut pt = Patcher::new(p, old.len() as u64, 1 << 30).unwrap();
        let mut out = Vec::new();
        loop {
            match pt.step().unwrap() {
                Step::NeedSource { offset, len } => {
                    assert!(len <= crate::update::bspatch::CHUNK);
                    let o = offset as usize;
                    pt.source(old[o..o + len].to_vec());
                }
                Step::Output(b) => {
                    assert!(b.len() <= crate::update::bspatch::CHUNK);
                    out.extend(b);
                }
                Step::Done => break,
            }
        }
        assert_eq!(out, new);
    }

    #[test]
    fn classic_patches_transcode_to_the_same_result() {
        let (old, new) = pair();
        let mut classic = Vec::new();
        qbsdiff::Bsdiff::new(&old, &new)
            .compare(&mut classic)
            .unwrap();
        let ours = bsdiff40_to_bsdf2(&classic).unwrap();
        assert_eq!(apply_in_memory(&old, ours.clone(), 1 << 30).unwrap(), new);
        assert_eq!(bsdiff40_to_bsdf2(&ours), Err(PatchError::NotBsdiff));
        let mut bad = classic.clone();
        let mid = bad.len() / 2;
        bad[mid..].fill(0);
        assert!(bsdiff40_to_bsdf2(&bad).is_err());
    }
}
