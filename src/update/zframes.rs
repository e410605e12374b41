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
pub struct FrameDecoder {
    dec: zstd::stream::raw::Decoder<'static>,
    /// Compressed bytes consumed so far, counted from where decoding started.
    consumed: u64,
    /// Whether the decoder is between frames.
    at_boundary: bool,
}

impl std::fmt::Debug for FrameDecoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FrameDecoder")
            .field("consumed", &self.consumed)
            .finish()
    }
}

/// Output of one [`FrameDecoder::feed`] call.
#[derive(Debug, Default)]
pub struct Decoded {
    /// Uncompressed bytes, in order, with the compressed offsets (relative to the decoder's
    /// start) after which a frame ended: `(compressed_end, uncompressed_end_in_this_output)`.
    pub data: Vec<u8>,
    pub boundaries: Vec<(u64, usize)>,
}

impl FrameDecoder {
    pub fn new() -> std::io::Result<Self> {
        Ok(FrameDecoder {
            dec: zstd::stream::raw::Decoder::new()?,
            consumed: 0,
            at_boundary: true,
        })
    }

    /// Whether the input so far ended exactly at a frame boundary.
    pub fn at_boundary(&self) -> bool {
        self.at_boundary
    }

    /// Decode `input` entirely.
    pub fn feed(&mut self, input: &[u8]) -> Result<Decoded, String> {
        use zstd::stream::raw::{InBuffer, Operation, OutBuffer};
        let mut out = Decoded::default();
        let mut pos = 0;
        let mut chunk = vec![0u8; 256 * 1024];
        loop {
            let mut inb = InBuffer::around(&input[pos..]);
            let mut outb = OutBuffer::around(&mut chunk[..]);
            let hint = self
                .dec
                .run(&mut inb, &mut outb)
                .map_err(|e| format!("corrupt zstd stream: {e}"))?;
            let (used, produced) = (inb.pos(), outb.pos());
            pos += used;
            self.consumed += used as u64;
            out.data.extend_from_slice(&chunk[..produced]);
            if used > 0 || produced > 0 {
                self.at_boundary = hint == 0;
                if hint == 0 {
                    out.boundaries.push((self.consumed, out.data.len()));
                }
            }
            let drained = produced < chunk.len();
            if pos == input.len() && drained {
                return Ok(out);
            }
            if used == 0 && produced == 0 {
                return Err("zstd decoder made no progress".into());
            }
        }
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
