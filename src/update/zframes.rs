//! Compressed images: independent zstd frames, so that a download can resume at a frame
//! boundary, followed by a seek table in the zstd seekable format (a skippable frame that
//! ordinary decoders ignore). Writing here; reading frame by frame in [`FrameDecoder`].

use std::io::Write;

/// The zstd frame magic, little-endian on disk.
pub const ZSTD_MAGIC: [u8; 4] = [0x28, 0xB5, 0x2F, 0xFD];
const SEEKABLE_MAGIC: u32 = 0x8F92_EAB1;
const SKIPPABLE_SEEK_TABLE: u32 = 0x184D_2A5E;
/// Uncompressed bytes per frame.
pub const FRAME_SIZE: usize = 4 << 20;

/// Whether `head` starts like a zstd stream.
pub fn is_zstd(head: &[u8]) -> bool {
    head.len() >= 4 && head[..4] == ZSTD_MAGIC
}

/// Compress `input` into independent frames of `frame_size` uncompressed bytes plus a seek
/// table. Returns the number of bytes written.
pub fn compress<R: std::io::Read, W: Write>(
    mut input: R,
    mut out: W,
    level: i32,
    frame_size: usize,
) -> std::io::Result<u64> {
    let mut table: Vec<(u32, u32)> = Vec::new();
    let mut buf = vec![0u8; frame_size];
    let mut written = 0u64;
    loop {
        let mut n = 0;
        while n < buf.len() {
            let r = input.read(&mut buf[n..])?;
            if r == 0 {
                break;
            }
            n += r;
        }
        if n == 0 {
            break;
        }
        let frame = zstd::bulk::compress(&buf[..n], level)?;
        out.write_all(&frame)?;
        written += frame.len() as u64;
        table.push((frame.len() as u32, n as u32));
        if n < buf.len() {
            break;
        }
    }
    // seek table: skippable frame header, entries, footer
    let body = 8 * table.len() + 9;
    out.write_all(&SKIPPABLE_SEEK_TABLE.to_le_bytes())?;
    out.write_all(&(body as u32).to_le_bytes())?;
    for (c, d) in &table {
        out.write_all(&c.to_le_bytes())?;
        out.write_all(&d.to_le_bytes())?;
    }
    out.write_all(&(table.len() as u32).to_le_bytes())?;
    out.write_all(&[0u8])?; // descriptor: no checksums
    out.write_all(&SEEKABLE_MAGIC.to_le_bytes())?;
    written += 8 + body as u64;
    out.flush()?;
    Ok(written)
}

/// The uncompressed size recorded in a seek table at the end of `tail` (the last bytes of a
/// compressed image), if there is one.
pub fn seek_table_size(tail: &[u8]) -> Option<u64> {
    let n = tail.len();
    if n < 9 || u32::from_le_bytes(tail[n - 4..].try_into().ok()?) != SEEKABLE_MAGIC {
        return None;
    }
    let frames = u32::from_le_bytes(tail[n - 9..n - 5].try_into().ok()?) as usize;
    let entries = n.checked_sub(9 + 8 * frames)?;
    let mut total = 0u64;
    for i in 0..frames {
        let e = entries + 8 * i;
        total += u64::from(u32::from_le_bytes(tail[e + 4..e + 8].try_into().ok()?));
    }
    Some(total)
}

/// A streaming zstd decoder that reports frame boundaries, where a resume may start.
///
/// A zstd stream can expand about 32,000 times (a run-length block of 128 KiB costs 4 bytes),
/// so output is produced in bounded pieces: [`push`](Self::push) takes compressed input and
/// each [`decode`](Self::decode) returns at most the number of bytes asked for. A caller that
/// writes each piece out before asking for the next, and stops at its own limit (the slot's
/// capacity), holds at most one piece in memory however much the input expands.
pub struct FrameDecoder {
    dec: zstd::stream::raw::Decoder<'static>,
    /// Compressed bytes consumed so far, counted from where decoding started.
    consumed: u64,
    /// Whether the decoder is between frames.
    at_boundary: bool,
    /// Compressed input pushed and not yet consumed, from `input_pos`.
    input: Vec<u8>,
    input_pos: usize,
    /// The last decode filled its output: the decoder may hold more output for input it has
    /// already consumed.
    flushing: bool,
}

impl std::fmt::Debug for FrameDecoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FrameDecoder")
            .field("consumed", &self.consumed)
            .field("buffered", &(self.input.len() - self.input_pos))
            .finish()
    }
}

/// Output of one [`FrameDecoder::decode`] or [`FrameDecoder::feed`] call.
#[derive(Debug, Default)]
pub struct Decoded {
    /// Uncompressed bytes, in order, with the compressed offsets (relative to the decoder's
    /// start) after which a frame ended: `(compressed_end, uncompressed_end_in_this_output)`.
    pub data: Vec<u8>,
    pub boundaries: Vec<(u64, usize)>,
}

/// Bytes decoded per step of [`FrameDecoder::feed`].
const FEED_STEP: usize = 256 * 1024;

impl FrameDecoder {
    pub fn new() -> std::io::Result<Self> {
        Ok(FrameDecoder {
            dec: zstd::stream::raw::Decoder::new()?,
            consumed: 0,
            at_boundary: true,
            input: Vec::new(),
            input_pos: 0,
            flushing: false,
        })
    }

    /// Whether the input so far ended exactly at a frame boundary.
    pub fn at_boundary(&self) -> bool {
        self.at_boundary
    }

    /// Take more compressed input; [`decode`](Self::decode) turns it into output.
    pub fn push(&mut self, input: &[u8]) {
        self.input.drain(..self.input_pos);
        self.input_pos = 0;
        self.input.extend_from_slice(input);
    }

    /// Whether pushed input remains to be decoded (call [`decode`](Self::decode) until not).
    pub fn has_pending(&self) -> bool {
        self.input_pos < self.input.len() || self.flushing
    }

    /// Decode pushed input into at most `max` bytes of output (`max` > 0). Returns empty
    /// output only when all pushed input is decoded.
    pub fn decode(&mut self, max: usize) -> Result<Decoded, String> {
        use zstd::stream::raw::{InBuffer, Operation, OutBuffer};
        let mut out = Decoded {
            data: vec![0u8; max.min(FEED_STEP)],
            boundaries: Vec::new(),
        };
        let mut filled = 0;
        while filled < max && self.has_pending() {
            if filled == out.data.len() {
                // Grow in steps: a short input must not cost a buffer of `max` bytes.
                let n = (out.data.len() * 2).clamp(FEED_STEP, max);
                out.data.resize(n, 0);
            }
            let mut inb = InBuffer::around(&self.input[self.input_pos..]);
            let mut outb = OutBuffer::around(&mut out.data[filled..]);
            let room = outb.capacity();
            let hint = self
                .dec
                .run(&mut inb, &mut outb)
                .map_err(|e| format!("corrupt zstd stream: {e}"))?;
            let (used, produced) = (inb.pos(), outb.pos());
            self.input_pos += used;
            self.consumed += used as u64;
            filled += produced;
            self.flushing = produced == room;
            if used > 0 || produced > 0 {
                self.at_boundary = hint == 0;
                if hint == 0 {
                    out.boundaries.push((self.consumed, filled));
                }
            } else if self.input_pos < self.input.len() {
                return Err("zstd decoder made no progress".into());
            }
        }
        out.data.truncate(filled);
        if !self.has_pending() {
            self.input = Vec::new();
            self.input_pos = 0;
        }
        Ok(out)
    }

    /// Decode `input` entirely, however large its output: only for inputs whose output is
    /// known to be small. Streams of unknown origin go through [`push`](Self::push) and
    /// bounded [`decode`](Self::decode) calls.
    pub fn feed(&mut self, input: &[u8]) -> Result<Decoded, String> {
        self.push(input);
        let mut out = Decoded::default();
        while self.has_pending() {
            let d = self.decode(FEED_STEP)?;
            let base = out.data.len();
            out.boundaries
                .extend(d.boundaries.iter().map(|&(c, u)| (c, base + u)));
            out.data.extend_from_slice(&d.data);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_report_boundaries() {
        let data: Vec<u8> = (0..1_000_000u32).map(|i| (i / 7 % 256) as u8).collect();
        let mut z = Vec::new();
        compress(&data[..], &mut z, 3, 300_000).unwrap();
        assert_eq!(
            seek_table_size(&z[z.len() - 100..]),
            Some(data.len() as u64)
        );
        // the plain zstd decoder reads it (the seek table is a skippable frame)
        assert_eq!(zstd::decode_all(&z[..]).unwrap(), data);
        // fed in odd pieces, the frame decoder gives the same bytes and 4 data-frame boundaries
        let mut d = FrameDecoder::new().unwrap();
        let mut out = Vec::new();
        let mut bounds = Vec::new();
        for piece in z.chunks(7777) {
            let r = d.feed(piece).unwrap();
            for (c, u) in r.boundaries {
                bounds.push((c, out.len() + u));
            }
            out.extend_from_slice(&r.data);
        }
        assert_eq!(out, data);
        let data_bounds: Vec<usize> = bounds.iter().map(|b| b.1).collect();
        for want in [300_000, 600_000, 900_000, 1_000_000] {
            assert!(data_bounds.contains(&want), "{data_bounds:?}");
        }
        // resuming at a boundary decodes the rest
        let (c, u) = bounds[1];
        let mut d = FrameDecoder::new().unwrap();
        let r = d.feed(&z[c as usize..]).unwrap();
        assert_eq!(r.data, data[u..]);
    }

    /// Guards bounded decoding (issue 11, item 5): a stream that expands thousands of times
    /// comes out in pieces no larger than asked for, with the frame boundaries intact.
    #[test]
    fn decode_is_bounded_however_much_the_input_expands() {
        use std::io::Read;
        let len = 64u64 << 20;
        let mut z = Vec::new();
        compress(std::io::repeat(0).take(len), &mut z, 1, FRAME_SIZE).unwrap();
        assert!(z.len() < 64 << 10, "{} compressed bytes", z.len());
        let mut d = FrameDecoder::new().unwrap();
        d.push(&z);
        let (mut total, mut largest, mut bounds) = (0u64, 0, Vec::new());
        while d.has_pending() {
            let out = d.decode(100_000).unwrap();
            assert!(out.data.iter().all(|&b| b == 0));
            largest = largest.max(out.data.len());
            bounds.extend(out.boundaries.iter().map(|&(_, u)| total + u as u64));
            total += out.data.len() as u64;
        }
        assert_eq!(total, len);
        assert!(largest <= 100_000, "{largest}");
        assert!(d.at_boundary());
        for i in 1..=16u64 {
            assert!(bounds.contains(&(i * FRAME_SIZE as u64)), "{bounds:?}");
        }
        // nothing pushed, nothing decoded
        assert!(d.decode(10).unwrap().data.is_empty());
    }

    #[test]
    fn corrupt_stream_is_an_error() {
        let data: Vec<u8> = (0..50_000u32).map(|i| (i * 31 % 253) as u8).collect();
        let mut z = Vec::new();
        compress(&data[..], &mut z, 3, 4096).unwrap();
        for at in [4, 5, 20, z.len() / 2] {
            let mut bad = z.clone();
            bad[at] ^= 0xFF;
            let mut d = FrameDecoder::new().unwrap();
            // an error, or bytes that are not the image (the digest check catches those)
            if let Ok(out) = d.feed(&bad) {
                assert!(
                    out.data != data || !d.at_boundary(),
                    "corruption at {at} went unseen"
                );
            }
        }
        let mut d = FrameDecoder::new().unwrap();
        let garbage: Vec<u8> = [&ZSTD_MAGIC[..], &[0xFF; 64][..]].concat();
        assert!(d.feed(&garbage).is_err());
    }
}
