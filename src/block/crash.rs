use super::{BlockDevice, BlockError};
use std::cell::Cell;
use std::collections::BTreeSet;
use std::fmt;
use std::sync::Arc;

/// Bytes kept in copy-on-write pages, so that cloning a device for every crash state of an
/// enumeration costs a page table, not the whole disk.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Pages {
    pages: Vec<Arc<Vec<u8>>>,
    len: usize,
}

const PAGE: usize = 64 * 1024;

impl Pages {
    fn new(bytes: Vec<u8>) -> Self {
        let len = bytes.len();
        let pages = bytes.chunks(PAGE).map(|c| Arc::new(c.to_vec())).collect();
        Pages { pages, len }
    }
    fn read(&self, mut offset: usize, buf: &mut [u8]) {
        let mut done = 0;
        while done < buf.len() {
            let (p, o) = (offset / PAGE, offset % PAGE);
            let n = (PAGE - o).min(buf.len() - done);
            buf[done..done + n].copy_from_slice(&self.pages[p][o..o + n]);
            done += n;
            offset += n;
        }
    }
    fn write(&mut self, mut offset: usize, data: &[u8]) {
        let mut done = 0;
        while done < data.len() {
            let (p, o) = (offset / PAGE, offset % PAGE);
            let n = (PAGE - o).min(data.len() - done);
            Arc::make_mut(&mut self.pages[p])[o..o + n].copy_from_slice(&data[done..done + n]);
            done += n;
            offset += n;
        }
    }
    fn range(&self, offset: usize, len: usize) -> Vec<u8> {
        let mut v = vec![0; len];
        self.read(offset, &mut v);
        v
    }
}

/// A write that reached the device but not yet a flush.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingWrite {
    pub offset: u64,
    pub data: Vec<u8>,
}

/// What a power cut does to one unflushed write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WriteFate {
    /// None of it reached the medium.
    Dropped,
    /// All of it reached the medium.
    Kept,
    /// Only the sector pieces marked `true` reached the medium (pieces split the write at the
    /// device's sector boundaries, in order).
    Torn(Vec<bool>),
}

/// The fate of every unflushed write at a power cut, in write order. Printing it gives what
/// replays the crash.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CrashChoice(pub Vec<WriteFate>);

impl fmt::Display for CrashChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "[")?;
        for (i, fate) in self.0.iter().enumerate() {
            if i > 0 {
                write!(f, " ")?;
            }
            match fate {
                WriteFate::Dropped => write!(f, "D")?,
                WriteFate::Kept => write!(f, "K")?,
                WriteFate::Torn(bits) => {
                    write!(f, "T")?;
                    for b in bits {
                        write!(f, "{}", u8::from(*b))?;
                    }
                }
            }
        }
        write!(f, "]")
    }
}

/// A device that models power loss, for tests.
///
/// It keeps the durable bytes and the list of writes since the last flush. A crash keeps any
/// subset of those writes, each possibly torn at sector granularity, and drops the rest; a flush
/// makes everything before it durable. Everything is deterministic: a crash is described by a
/// [`CrashChoice`], chosen explicitly, enumerated ([`CrashDevice::crash_outcomes`]) or derived
/// from a seed ([`CrashDevice::seeded_choice`]).
///
/// Faults: [`CrashDevice::cut_power_after`] makes the device lose power after a number of
/// writes and flushes (every later access fails until [`CrashDevice::crash`]), and
/// [`CrashDevice::fail_op`] makes one access fail with an I/O error and no effect.
#[derive(Debug, Clone)]
pub struct CrashDevice {
    durable: Pages,
    current: Pages,
    pending: Vec<PendingWrite>,
    written: Vec<(u64, u64)>,
    sector_size: u64,
    ops: Cell<u64>,
    mutations: u64,
    power_cut_at: Option<u64>,
    powered: Cell<bool>,
    fail_ops: BTreeSet<u64>,
}

impl CrashDevice {
    /// A zero-filled device.
    pub fn new(len: u64, sector_size: u64) -> Self {
        Self::from_bytes(vec![0; len as usize], sector_size)
    }

    /// A device whose durable content is `bytes`.
    pub fn from_bytes(bytes: Vec<u8>, sector_size: u64) -> Self {
        let durable = Pages::new(bytes);
        CrashDevice {
            current: durable.clone(),
            durable,
            pending: Vec::new(),
            written: Vec::new(),
            sector_size,
            ops: Cell::new(0),
            mutations: 0,
            power_cut_at: None,
            powered: Cell::new(true),
            fail_ops: BTreeSet::new(),
        }
    }

    /// The bytes that survive any crash.
    pub fn durable(&self) -> Vec<u8> {
        self.durable.range(0, self.durable.len)
    }

    /// `len` durable bytes at `offset` (panics outside the device: test use only).
    pub fn durable_range(&self, offset: u64, len: u64) -> Vec<u8> {
        self.durable.range(offset as usize, len as usize)
    }

    /// What a read sees now (durable bytes plus unflushed writes).
    pub fn current(&self) -> Vec<u8> {
        self.current.range(0, self.current.len)
    }

    /// Forget the ranges written so far (a test's set-up writes are not what it checks).
    pub fn clear_write_log(&mut self) {
        self.written.clear();
    }

    /// Keep only the logged writes for which `keep(start, end)` holds.
    pub fn retain_writes(&mut self, mut keep: impl FnMut(u64, u64) -> bool) {
        self.written.retain(|(s, e)| keep(*s, *e));
    }

    /// Every byte range ever written, merged, as `(start, end)` with `end` exclusive: what a
    /// test checks to prove that nothing was written somewhere it must not be.
    pub fn written_ranges(&self) -> Vec<(u64, u64)> {
        let mut r = self.written.clone();
        r.sort_unstable();
        let mut out: Vec<(u64, u64)> = Vec::new();
        for (s, e) in r {
            match out.last_mut() {
                Some(last) if s <= last.1 => last.1 = last.1.max(e),
                _ => out.push((s, e)),
            }
        }
        out
    }

    /// Writes since the last flush, in order.
    pub fn pending(&self) -> &[PendingWrite] {
        &self.pending
    }

    /// Writes and flushes performed so far (the crash points of an operation).
    pub fn mutations(&self) -> u64 {
        self.mutations
    }

    /// Accesses attempted so far (reads, writes and flushes), the index [`Self::fail_op`] uses.
    pub fn ops(&self) -> u64 {
        self.ops.get()
    }

    /// Whether the power has been cut (see [`Self::cut_power_after`]).
    pub fn is_powered(&self) -> bool {
        self.powered.get()
    }

    /// Lose power once `n` more writes or flushes have been performed: the next one fails, and so
    /// does every access after it, until [`Self::crash`] restarts the device.
    pub fn cut_power_after(&mut self, n: u64) {
        self.power_cut_at = Some(self.mutations + n);
    }

    /// Make access number `index` (see [`Self::ops`]) fail with an I/O error, with no effect.
    pub fn fail_op(&mut self, index: u64) {
        self.fail_ops.insert(index);
    }

    /// Disarm a pending power cut and injected failures, without a crash.
    pub fn clear_faults(&mut self) {
        self.power_cut_at = None;
        self.fail_ops.clear();
    }

    /// Power loss and restart: keep what `choice` says of the unflushed writes (writes it does
    /// not mention are dropped) and clear any pending power cut and fault.
    pub fn crash(&mut self, choice: &CrashChoice) {
        for (w, fate) in self.pending.iter().zip(choice.0.iter()) {
            for (i, (start, end)) in pieces(w, self.sector_size).into_iter().enumerate() {
                let keep = match fate {
                    WriteFate::Dropped => false,
                    WriteFate::Kept => true,
                    WriteFate::Torn(bits) => bits.get(i).copied().unwrap_or(false),
                };
                if keep {
                    let rel = (start - w.offset) as usize..(end - w.offset) as usize;
                    self.durable.write(start as usize, &w.data[rel]);
                }
            }
        }
        self.pending.clear();
        self.current.clone_from(&self.durable);
        self.power_cut_at = None;
        self.powered.set(true);
        self.fail_ops.clear();
    }

    /// Every distinct outcome of a crash now, or `None` when there are more than `max`.
    ///
    /// A sector piece that rewrites the durable bytes unchanged, with no earlier unflushed write
    /// under it, cannot change the outcome, so it is always kept; every other piece is either
    /// kept or lost, independently.
    pub fn crash_outcomes(&self, max: usize) -> Option<Vec<CrashChoice>> {
        let effective = self.effective_pieces();
        if effective.len() >= usize::BITS as usize - 1 || (1usize << effective.len()) > max {
            return None;
        }
        let shapes: Vec<usize> = self
            .pending
            .iter()
            .map(|w| pieces(w, self.sector_size).len())
            .collect();
        let mut out = Vec::with_capacity(1 << effective.len());
        for mask in 0..(1usize << effective.len()) {
            let mut bits: Vec<Vec<bool>> = shapes.iter().map(|&n| vec![true; n]).collect();
            for (k, &(wi, pi)) in effective.iter().enumerate() {
                bits[wi][pi] = mask & (1 << k) != 0;
            }
            out.push(CrashChoice(bits.into_iter().map(fate_of).collect()));
        }
        Some(out)
    }

    /// How many sector pieces of the unflushed writes can change the outcome of a crash now:
    /// [`Self::crash_outcomes`] has `2^n` of them.
    pub fn crash_outcome_bits(&self) -> usize {
        self.effective_pieces().len()
    }

    /// The (write, piece) indices of the pieces that matter (see [`Self::crash_outcomes`]).
    fn effective_pieces(&self) -> Vec<(usize, usize)> {
        let mut effective = Vec::new();
        for (wi, w) in self.pending.iter().enumerate() {
            for (pi, (start, end)) in pieces(w, self.sector_size).into_iter().enumerate() {
                let rel = (start - w.offset) as usize..(end - w.offset) as usize;
                let same =
                    w.data[rel] == self.durable.range(start as usize, (end - start) as usize)[..];
                let overlapped = self.pending[..wi]
                    .iter()
                    .any(|p| p.offset < end && start < p.offset + p.data.len() as u64);
                if !same || overlapped {
                    effective.push((wi, pi));
                }
            }
        }
        effective
    }

    /// A crash outcome derived from `seed`: each unflushed write is dropped, kept or torn.
    pub fn seeded_choice(&self, seed: u64) -> CrashChoice {
        let mut rng = SplitMix(seed);
        CrashChoice(
            self.pending
                .iter()
                .map(|w| match rng.next_u64() % 3 {
                    0 => WriteFate::Dropped,
                    1 => WriteFate::Kept,
                    _ => fate_of(
                        pieces(w, self.sector_size)
                            .iter()
                            .map(|_| rng.next_u64() & 1 == 1)
                            .collect(),
                    ),
                })
                .collect(),
        )
    }

    fn begin(&self, mutation: bool) -> Result<(), BlockError> {
        let idx = self.ops.get();
        self.ops.set(idx + 1);
        if !self.powered.get() {
            return Err(BlockError::Injected("power lost"));
        }
        if mutation && self.power_cut_at.is_some_and(|at| self.mutations >= at) {
            self.powered.set(false);
            return Err(BlockError::Injected("power lost"));
        }
        if self.fail_ops.contains(&idx) {
            return Err(BlockError::Injected("I/O"));
        }
        Ok(())
    }
}

fn fate_of(bits: Vec<bool>) -> WriteFate {
    if bits.iter().all(|b| *b) {
        WriteFate::Kept
    } else if bits.iter().all(|b| !*b) {
        WriteFate::Dropped
    } else {
        WriteFate::Torn(bits)
    }
}

/// The write split at absolute sector boundaries, as byte ranges on the device.
fn pieces(w: &PendingWrite, sector_size: u64) -> Vec<(u64, u64)> {
    let end = w.offset + w.data.len() as u64;
    let mut out = Vec::new();
    let mut at = w.offset;
    while at < end {
        let next = ((at / sector_size) + 1) * sector_size;
        let stop = next.min(end);
        out.push((at, stop));
        at = stop;
    }
    out
}

/// SplitMix64: a small deterministic generator for seeded tests (crash choices here, scenario
/// choices in sim/).
#[derive(Debug, Clone)]
pub struct SplitMix(pub u64);

impl SplitMix {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A value below `n` (0 when `n` is 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }
}

impl BlockDevice for CrashDevice {
    fn sector_size(&self) -> u64 {
        self.sector_size
    }
    fn len(&self) -> u64 {
        self.durable.len as u64
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), BlockError> {
        self.begin(false)?;
        BlockError::check_bounds("read", offset, buf.len(), self.len())?;
        self.current.read(offset as usize, buf);
        Ok(())
    }
    fn write_at(&mut self, offset: u64, data: &[u8]) -> Result<(), BlockError> {
        self.begin(true)?;
        BlockError::check_bounds("write", offset, data.len(), self.len())?;
        self.mutations += 1;
        self.current.write(offset as usize, data);
        self.written.push((offset, offset + data.len() as u64));
        self.pending.push(PendingWrite {
            offset,
            data: data.to_vec(),
        });
        Ok(())
    }
    fn flush(&mut self) -> Result<(), BlockError> {
        self.begin(true)?;
        self.mutations += 1;
        // everything pending is already in `current`, in order
        self.pending.clear();
        self.durable = self.current.clone();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flush_makes_durable_and_crash_drops_the_rest() {
        let mut d = CrashDevice::new(2048, 512);
        d.write_at(0, &[1; 512]).unwrap();
        d.flush().unwrap();
        d.write_at(512, &[2; 1024]).unwrap();
        assert_eq!(d.current()[600], 2);
        d.crash(&CrashChoice::default());
        assert_eq!(d.current()[0], 1);
        assert_eq!(d.current()[600], 0);
    }

    #[test]
    fn torn_write_keeps_only_chosen_sectors() {
        let mut d = CrashDevice::new(2048, 512);
        d.write_at(256, &[7; 1024]).unwrap(); // pieces: 256..512, 512..1024, 1024..1280
        let outcomes = d.crash_outcomes(1 << 10).unwrap();
        assert_eq!(outcomes.len(), 8);
        assert_eq!(d.crash_outcome_bits(), 3);
        assert!(d.crash_outcomes(7).is_none());
        d.crash(&CrashChoice(vec![WriteFate::Torn(vec![
            false, true, false,
        ])]));
        assert_eq!(d.durable()[300], 0);
        assert_eq!(d.durable()[700], 7);
        assert_eq!(d.durable()[1100], 0);
    }

    #[test]
    fn unchanged_pieces_are_not_enumerated() {
        let mut d = CrashDevice::new(4096, 512);
        let mut data = vec![0u8; 2048];
        data[600] = 9; // only the second sector changes
        d.write_at(0, &data).unwrap();
        assert_eq!(d.crash_outcomes(16).unwrap().len(), 2);
        // an earlier write under an unchanged piece makes it matter again
        let mut d = CrashDevice::new(4096, 512);
        d.write_at(0, &[5; 512]).unwrap();
        d.write_at(0, &[0; 512]).unwrap();
        assert_eq!(d.crash_outcomes(16).unwrap().len(), 4);
    }

    #[test]
    fn power_cut_stops_every_access_until_restart() {
        let mut d = CrashDevice::new(1024, 512);
        d.cut_power_after(1);
        d.write_at(0, &[1; 512]).unwrap();
        assert!(d.flush().is_err());
        assert!(!d.is_powered());
        let mut b = [0u8; 1];
        assert!(d.read_at(0, &mut b).is_err());
        d.crash(&CrashChoice(vec![WriteFate::Kept]));
        assert!(d.is_powered());
        d.read_at(0, &mut b).unwrap();
        assert_eq!(b[0], 1);
    }

    #[test]
    fn injected_failure_has_no_effect() {
        let mut d = CrashDevice::new(1024, 512);
        d.fail_op(0);
        assert!(d.write_at(0, &[1; 4]).is_err());
        assert_eq!(d.current()[0], 0);
        d.write_at(0, &[1; 4]).unwrap();
        assert_eq!(d.current()[0], 1);
    }

    #[test]
    fn seeded_choice_replays() {
        let mut d = CrashDevice::new(8192, 512);
        for i in 0..6 {
            d.write_at(i * 1000, &[i as u8 + 1; 1500]).unwrap();
        }
        assert_eq!(d.seeded_choice(42), d.seeded_choice(42));
        let c = d.seeded_choice(42);
        let mut a = d.clone();
        let mut b = d.clone();
        a.crash(&c);
        b.crash(&c);
        assert_eq!(a.durable(), b.durable());
    }
}
