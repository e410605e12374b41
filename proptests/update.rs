//! Crash injection over installs.
//!
//! Every crash state (`every_crash_state_of_small_installs`): for a full install (raw and
//! zstd-compressed), a delta install (BSDIFF40; and BSDF2, as `keel-image delta create` makes
//! it, on the first shape only) and a delta that falls back to the full image, on small images
//! with 512- and 4096-byte sectors, cut the power before each write and flush the install makes
//! and once after its last (every crash point), and at each point take every distinct
//! outcome of the unflushed writes ([`CrashDevice::crash_outcomes`]: each sector piece kept or
//! lost, independently). The image sizes, fetch sizes and checkpoint intervals are chosen so that
//! no point has more than `2^EVERY_MAX_BITS` outcomes; a point with more fails the test rather
//! than being sampled.
//!
//! Sampled (`sampled_crash_states_of_larger_installs`): the same on larger images and longer
//! checkpoint intervals, where a point may have too many outcomes to try: such a point gets the
//! extremes, every in-order prefix and seeded samples. It prints how many points were sampled.
//!
//! After each crash: every intact slot record describes the bytes its slot holds; nothing was
//! written inside the running slot, the ESP or STATE; boot the disk with boots that fail until
//! the tries run out, and check that whatever boots holds exactly an image it may hold; then
//! re-issue the install and check that it resumes from its checkpoint when one was saved (at
//! the checkpoint's input offset) and completes. Every install checks that nothing is unflushed
//! when it reads the target back or changes the flags to activate it.
//!
//! Randomized (`random_installs_with_faults`): random images, patches and sector sizes, with
//! power cuts and I/O errors whose positions are drawn up to the number of device operations a
//! fault-free run of the same case makes (a later fault of a case may still come after the
//! resumed install ends: the test prints how many interrupted one), and resumes.

use crate::common::assert_no_write_inside_partitions;
use keelos::block::{read_vec, BlockDevice, CrashChoice, CrashDevice, WriteFate};
use keelos::bootctl::{self, store, Slot, SlotState};
use keelos::disk::{self, LayoutSpec, MIB};
use keelos::update::checkpoint::{Checkpoint, MemStore};
use keelos::update::driver::{self, MemInputs, Request};
use keelos::update::{bsdf2, record, zframes, Action, FlagChange, FullImage, Input, InstallError};
use keelos::update::{Report, Resume};
use proptest::prelude::*;
use sha2::{Digest, Sha256};

/// The most outcome bits (unflushed sector pieces that matter) a point of the every-state test
/// may have.
const EVERY_MAX_BITS: usize = 12;
/// Above this many bits the sampled test samples a point.
const SAMPLED_MAX_BITS: usize = 8;
const SAMPLES: u64 = 24;

fn sha(b: &[u8]) -> String {
    record::hex(&Sha256::digest(b))
}

fn image(seed: u64, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| {
            let mut x = (i as u64 / 8) ^ (seed << 40);
            x = x.wrapping_mul(0x9E37_79B9_7F4A_7C15);
            x ^= x >> 29;
            x = x.wrapping_mul(0xBF58_476D_1CE4_E5B9);
            (x >> (8 * (i % 8))) as u8
        })
        .collect()
}

/// v2: v1 with a few changed ranges and a different length.
fn next_version(v1: &[u8], seed: u64) -> Vec<u8> {
    let mut v2 = v1.to_vec();
    let n = v2.len();
    let patch = image(seed, n / 16 + 1);
    let at = (seed as usize * 7919) % (n / 2 + 1);
    let end = (at + patch.len()).min(n);
    v2[at..end].copy_from_slice(&patch[..end - at]);
    v2.extend_from_slice(&image(seed + 1, n / 8 + 1));
    v2
}

/// The shape of an install's I/O.
#[derive(Debug, Clone, Copy)]
struct Shape {
    sector: u64,
    /// Length of the running slot's image; the new one is about 1.13 times that.
    len: usize,
    /// The most bytes one fetch returns (one write of an uncompressed image).
    chunk: usize,
    checkpoint_every: u64,
    /// Uncompressed bytes per zstd frame of the compressed image (where a resume may start).
    frame: usize,
}

#[derive(Clone)]
struct Scenario {
    name: &'static str,
    shape: Shape,
    /// What the target slot held before (a bootable fallback image).
    v0: Vec<u8>,
    /// What the running slot holds.
    v1: Vec<u8>,
    v2: Vec<u8>,
    full: Vec<u8>,
    patch: Option<Vec<u8>>,
    expect_fallback: bool,
}

impl std::fmt::Debug for Scenario {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {:?}", self.name, self.shape)
    }
}

fn scenarios(shape: Shape, seed: u64) -> Vec<Scenario> {
    let len = shape.len;
    let v0 = image(seed + 50, len / 2 + 1);
    let v1 = image(seed, len);
    let v2 = next_version(&v1, seed + 100);
    let mut z = Vec::new();
    zframes::compress(&v2[..], &mut z, 1, shape.frame).expect("compress");
    let mut patch = Vec::new();
    qbsdiff::Bsdiff::new(&v1, &v2)
        .compare(&mut patch)
        .expect("bsdiff");
    let mut corrupt = patch.clone();
    let mid = corrupt.len() / 2;
    corrupt[mid] ^= 0x55;
    let mut bsdf2 = Vec::new();
    bsdf2::create(
        &v1,
        &v2,
        bsdf2::CreateFormat::Bsdf2Brotli(Default::default()),
        &mut bsdf2,
    )
    .expect("bsdf2");
    let s = |name, full: &Vec<u8>, patch: Option<Vec<u8>>, expect_fallback| Scenario {
        name,
        shape,
        v0: v0.clone(),
        v1: v1.clone(),
        v2: v2.clone(),
        full: full.clone(),
        patch,
        expect_fallback,
    };
    vec![
        s("full", &v2, None, false),
        s("full-zstd", &z, None, false),
        s("delta", &z, Some(patch), false),
        s("delta-fallback", &z, Some(corrupt), true),
        // the format `keel-image delta create` makes (the others are classic BSDIFF40)
        s("delta-bsdf2", &z, Some(bsdf2), false),
    ]
}

fn request(s: &Scenario, version: &str, img: &[u8], full_len: usize) -> Request {
    Request {
        sha256: sha(img),
        version: version.into(),
        tries: 2,
        full: FullImage {
            identity: "full".into(),
            fetch_size: Some(full_len as u64),
            image_len: None,
        },
        delta: s.patch.as_ref().map(|_| "patch".to_string()),
        delta_expect: None,
        checkpoint_every: s.shape.checkpoint_every,
    }
}

/// What one install did, besides its result.
#[derive(Debug, Default)]
struct Seen {
    /// Every fetch, in order.
    fetches: Vec<(Input, u64)>,
}

/// Install `s.v2` through the blocking driver, checking as it goes that the target is never
/// read back, and the slot never activated, while a write is unflushed.
fn install(
    dev: &mut CrashDevice,
    s: &Scenario,
    cp: &mut MemStore,
) -> (Result<Report, InstallError>, Seen) {
    let mut seen = Seen::default();
    let res = (|| {
        let (_, flags) = store::load(&*dev).map_err(|e| InstallError::Io(e.to_string()))?;
        let req = request(s, "2", &s.v2, s.full.len());
        let (layout, plan) = driver::plan(&*dev, driver::running_slot(flags), req)?;
        let mut inputs = MemInputs {
            full: s.full.clone(),
            patch: s.patch.clone(),
            chunk: s.shape.chunk,
        };
        driver::run_observed(
            dev,
            &layout,
            plan,
            &mut inputs,
            cp,
            &mut |_| {},
            &mut |d: &CrashDevice, a: &Action| match a {
                Action::SetFlags(FlagChange::Activate { .. }) if d.is_powered() => {
                    assert!(
                        d.pending().is_empty(),
                        "the activation was issued with {} writes unflushed (first at device \
                         offset {}): a crash could keep the new flags and lose them",
                        d.pending().len(),
                        d.pending()[0].offset
                    )
                }
                Action::ReadTarget { offset, len } if d.is_powered() => assert!(
                    d.pending().is_empty(),
                    "the target was read at {offset}+{len} with {} writes unflushed: what is \
                     read is not what the disk keeps",
                    d.pending().len()
                ),
                Action::Fetch { input, offset } => seen.fetches.push((*input, *offset)),
                _ => {}
            },
        )
    })();
    (res, seen)
}

/// Slot B runs `v1` (successful, priority 2); slot A holds `v0` (successful, priority 1): the
/// update targets A, which was a bootable fallback until the update invalidates it.
fn base_disk(s: &Scenario) -> CrashDevice {
    let mut dev = CrashDevice::new(6 * MIB + 64 * 1024, s.shape.sector);
    disk::create(
        &mut dev,
        LayoutSpec {
            esp_size: MIB,
            root_size: MIB,
            state_size: Some(MIB),
        },
    )
    .expect("create");
    for (version, v, slot) in [("0", &s.v0, Slot::A), ("1", &s.v1, Slot::B)] {
        let (_, flags) = store::load(&dev).expect("load");
        let mut req = request(s, version, v, v.len());
        req.delta = None;
        let (layout, plan) = driver::plan(&dev, driver::running_slot(flags), req).expect("plan");
        let mut inputs = MemInputs {
            full: v.clone(),
            patch: None,
            chunk: 1 << 20,
        };
        let r = driver::run(
            &mut dev,
            &layout,
            plan,
            &mut inputs,
            &mut MemStore::default(),
            &mut |_| {},
        )
        .expect("install");
        assert_eq!(r.slot, slot);
        store::update(&mut dev, |f| bootctl::mark_successful(f, slot)).expect("mark");
    }
    dev.flush().expect("flush");
    dev.clear_write_log();
    dev
}

fn slot_bytes(dev: &CrashDevice, slot: Slot, len: usize) -> Vec<u8> {
    let l = disk::open(dev).expect("open");
    read_vec(dev, l.root(slot).offset, len).expect("read")
}

/// Whether `slot` holds a whole image it may hold: the running slot (B) only `v1`; the target
/// (A) its old `v0` or the new `v2`.
fn holds_whole_image(dev: &CrashDevice, s: &Scenario, slot: Slot) -> bool {
    let allowed: Vec<&Vec<u8>> = match slot {
        Slot::B => vec![&s.v1],
        Slot::A => vec![&s.v0, &s.v2],
    };
    allowed
        .into_iter()
        .any(|img| &slot_bytes(dev, slot, img.len()) == img)
}

/// Every intact slot record describes the bytes its slot holds (Status and the delta's base
/// check trust it), and the running slot's record is still v1's.
fn assert_records_describe_their_slots(dev: &CrashDevice, s: &Scenario, ctx: &str) {
    let l = disk::open(dev).expect("open");
    for slot in [Slot::A, Slot::B] {
        let rec = driver::read_record(dev, &l, slot).expect("read record");
        if let Some(rec) = &rec {
            let got = sha(&slot_bytes(dev, slot, rec.length as usize));
            assert_eq!(
                got,
                record::hex(&rec.sha256),
                "slot {slot} shows the record of version {} ({} bytes) over bytes that do not \
                 match it; {ctx}",
                rec.version,
                rec.length
            );
        }
        if slot == Slot::B {
            assert_eq!(
                rec.map(|r| (r.version, r.length)),
                Some(("1".to_string(), s.v1.len() as u64)),
                "the running slot's record changed; {ctx}"
            );
        }
    }
}

/// Boot the disk repeatedly, every boot failing, until it settles on a successful slot; then
/// let that slot fail to mount and boot once more. Every chosen slot must hold a whole image,
/// and the boots must settle on the running slot, B. A staged target (A activated, not yet
/// booted) must hold the new image and boot first. Returns the slots booted.
fn check_boots(after: &CrashDevice, s: &Scenario, ctx: &str) -> Vec<Slot> {
    let mut dev = after.clone();
    let (_, flags) = store::load(&dev).unwrap_or_else(|e| panic!("load failed: {e}; {ctx}"));
    let staged = flags.a.state() == SlotState::Trying;
    if staged {
        assert_eq!(
            slot_bytes(&dev, Slot::A, s.v2.len()),
            s.v2,
            "slot A was activated without the whole new image; {ctx}"
        );
    }
    let mut booted = Vec::new();
    for _ in 0..8 {
        let (_, choice) =
            store::boot(&mut dev).unwrap_or_else(|e| panic!("boot failed: {e}; {ctx}"));
        assert!(
            holds_whole_image(&dev, s, choice.slot),
            "booted slot {} holds a partial or unknown image; boots so far {booted:?}; {ctx}",
            choice.slot
        );
        booted.push(choice.slot);
        if !choice.tried {
            break;
        }
    }
    assert_eq!(
        booted.first() == Some(&Slot::A),
        staged,
        "boots {booted:?} with slot A staged={staged}; {ctx}"
    );
    assert_eq!(
        booted.last(),
        Some(&Slot::B),
        "boots {booted:?} did not settle on the running slot; {ctx}"
    );
    // the settled slot's root fails to mount: whatever boots next must still be whole
    store::update(&mut dev, |f| Ok(bootctl::mark_failed(f, Slot::B))).expect("mark failed");
    if let Ok((_, choice)) = store::boot(&mut dev) {
        assert!(
            holds_whole_image(&dev, s, choice.slot),
            "after slot B failed, slot {} booted with a partial image; {ctx}",
            choice.slot
        );
    }
    booted
}

/// Whether slot A holds an activated install (activated, with its record): a re-issued install
/// would start over, so it is not re-issued.
fn staged(dev: &CrashDevice) -> bool {
    let (l, flags) = store::load(dev).expect("load");
    flags.a.state() == SlotState::Trying
        && driver::read_record(dev, &l, Slot::A)
            .ok()
            .flatten()
            .is_some()
}

/// Re-issue the install after a crash: it must resume from the saved checkpoint, if any (its
/// download starting at the checkpoint's input offset), and complete. Returns the disk after it.
fn reissue(after: &CrashDevice, s: &Scenario, cp: &MemStore, ctx: &str) -> CrashDevice {
    let saved = cp.value.as_deref().map(|b| {
        Checkpoint::from_bytes(b).unwrap_or_else(|| panic!("unreadable checkpoint; {ctx}"))
    });
    let mut again = after.clone();
    let mut cp2 = cp.clone();
    let (res, seen) = install(&mut again, s, &mut cp2);
    let r = res.unwrap_or_else(|e| panic!("re-issued install failed: {e}; {ctx}"));
    assert_eq!(r.slot, Slot::A, "{ctx}");
    match &saved {
        Some(c) => {
            assert_eq!(
                r.resume,
                Resume::From(c.image_offset),
                "a durable checkpoint was not resumed; {ctx}"
            );
            assert_eq!(
                seen.fetches.first(),
                Some(&(Input::Full, c.input_offset)),
                "the resumed download did not start at the checkpoint's offset; {ctx}"
            );
            assert_eq!(
                r.full_bytes,
                s.full.len() as u64 - c.input_offset,
                "the resumed download fetched more than the rest of the image; {ctx}"
            );
        }
        None => assert_eq!(r.resume, Resume::None, "{ctx}"),
    }
    assert_eq!(
        cp2.value, None,
        "the checkpoint outlived the install; {ctx}"
    );
    assert_eq!(slot_bytes(&again, Slot::A, s.v2.len()), s.v2, "{ctx}");
    let l = disk::open(&again).expect("open");
    let rec = driver::read_record(&again, &l, Slot::A).expect("record");
    assert_eq!(
        rec.map(|r| (r.version, r.length, record::hex(&r.sha256))),
        Some(("2".to_string(), s.v2.len() as u64, sha(&s.v2))),
        "{ctx}"
    );
    again
}

/// A staged install of the new image: the next boot takes it, and once it is marked good it
/// stays; the running slot still holds v1.
fn check_new_image_boots(mut dev: CrashDevice, s: &Scenario, ctx: &str) {
    assert_eq!(slot_bytes(&dev, Slot::B, s.v1.len()), s.v1, "{ctx}");
    let (_, c) = store::boot(&mut dev).expect("boot");
    assert_eq!(c.slot, Slot::A, "{ctx}");
    store::update(&mut dev, |f| bootctl::mark_successful(f, Slot::A)).expect("mark");
    let (_, c) = store::boot(&mut dev).expect("boot");
    assert_eq!(c.slot, Slot::A, "{ctx}");
    assert_eq!(slot_bytes(&dev, Slot::A, s.v2.len()), s.v2, "{ctx}");
}

/// Everything checked after a crash. Returns whether the install was re-issued, and whether
/// that resumed from a checkpoint.
fn check_crash_state(after: &CrashDevice, s: &Scenario, cp: &MemStore, ctx: &str) -> (bool, bool) {
    let layout = disk::open(after).expect("open");
    assert_no_write_inside_partitions(&only_outside(after, &layout, Slot::A), &layout, ctx);
    assert_records_describe_their_slots(after, s, ctx);
    check_boots(after, s, ctx);
    if staged(after) {
        return (false, false);
    }
    check_new_image_boots(reissue(after, s, cp, ctx), s, ctx);
    (true, cp.value.is_some())
}

/// The outcomes a sampled point tries: none kept, all kept, every in-order prefix and seeded
/// samples.
fn sampled_outcomes(dev: &CrashDevice) -> Vec<CrashChoice> {
    let n = dev.pending().len();
    let mut v = vec![
        CrashChoice(vec![WriteFate::Dropped; n]),
        CrashChoice(vec![WriteFate::Kept; n]),
    ];
    for i in 1..n {
        v.push(CrashChoice(
            (0..n)
                .map(|j| {
                    if j < i {
                        WriteFate::Kept
                    } else {
                        WriteFate::Dropped
                    }
                })
                .collect(),
        ));
    }
    v.extend((0..SAMPLES).map(|seed| dev.seeded_choice(seed)));
    v
}

/// What an enumeration covered.
#[derive(Debug, Default, Clone, Copy)]
struct Figures {
    points: u64,
    /// Crash states checked.
    states: u64,
    /// Points whose every distinct outcome was checked.
    enumerated_points: u64,
    /// Points where only [`sampled_outcomes`] were checked.
    sampled_points: u64,
    /// The distinct outcomes the sampled points had, of which `sampled_states` were checked.
    sampled_distinct: u128,
    sampled_states: u64,
    max_bits: usize,
    /// States after which the install was re-issued, and how many of those resumed from a
    /// checkpoint.
    reissued: u64,
    resumed: u64,
}

impl Figures {
    fn add(&mut self, o: Figures) {
        self.points += o.points;
        self.states += o.states;
        self.enumerated_points += o.enumerated_points;
        self.sampled_points += o.sampled_points;
        self.sampled_distinct += o.sampled_distinct;
        self.sampled_states += o.sampled_states;
        self.max_bits = self.max_bits.max(o.max_bits);
        self.reissued += o.reissued;
        self.resumed += o.resumed;
    }
}

impl std::fmt::Display for Figures {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} crash points, {} crash states checked; {} points enumerated (every distinct \
             outcome), {} points sampled ({} states tried of {} distinct); at most 2^{} \
             outcomes at a point; {} re-issued installs, {} resumed from a checkpoint",
            self.points,
            self.states,
            self.enumerated_points,
            self.sampled_points,
            self.sampled_states,
            self.sampled_distinct,
            self.max_bits,
            self.reissued,
            self.resumed
        )
    }
}

/// Crash `s` at every point; at each, check every distinct outcome when it has at most
/// `2^max_bits`, else (when `sample`) the sampled outcomes, else fail.
fn crash_scenario(s: &Scenario, max_bits: usize, sample: bool) -> Figures {
    let base = base_disk(s);
    // a clean run: the crash points, and the expected report
    let mut full = base.clone();
    let (r, _) = install(&mut full, s, &mut MemStore::default());
    let r = r.unwrap_or_else(|e| panic!("{s:?}: clean install failed: {e}"));
    assert_eq!(r.fallback_used, s.expect_fallback, "{s:?}: {r:?}");
    assert_eq!(
        r.delta_used,
        s.patch.is_some() && !s.expect_fallback,
        "{s:?}"
    );
    let points = full.mutations() - base.mutations();
    let mut fig = Figures {
        points: points + 1,
        ..Figures::default()
    };
    // cut = n: the n-th write or flush (from 0) loses the power; cut = points: none does
    for cut in 0..=points {
        let mut dev = base.clone();
        let mut cp = MemStore::default();
        dev.cut_power_after(cut);
        let (res, _) = install(&mut dev, s, &mut cp);
        assert_eq!(
            res.is_ok(),
            cut == points,
            "{s:?}: power cut after {cut} of {points} writes and flushes: {res:?}"
        );
        let bits = dev.crash_outcome_bits();
        fig.max_bits = fig.max_bits.max(bits);
        let choices = if bits <= max_bits {
            fig.enumerated_points += 1;
            dev.crash_outcomes(1 << bits).expect("outcomes")
        } else {
            assert!(
                sample,
                "{s:?}: crash point {cut} has 2^{bits} outcomes, more than the 2^{max_bits} \
                 this test enumerates; make the configuration smaller"
            );
            fig.sampled_points += 1;
            fig.sampled_distinct += 1u128 << bits.min(127);
            let v = sampled_outcomes(&dev);
            fig.sampled_states += v.len() as u64;
            v
        };
        for choice in choices {
            fig.states += 1;
            let ctx = format!(
                "replay: scenario={s:?} cut_after={cut} crash={choice} checkpoint={:?}",
                cp.value
                    .as_ref()
                    .map(|v| String::from_utf8_lossy(v).into_owned())
            );
            let mut after = dev.clone();
            after.crash(&choice);
            let (reissued, resumed) = check_crash_state(&after, s, &cp, &ctx);
            fig.reissued += u64::from(reissued);
            fig.resumed += u64::from(resumed);
        }
    }
    fig
}

/// The device with writes to `allowed`'s partition taken out of its write log (the target slot
/// may be written; nothing else inside a partition may).
fn only_outside(dev: &CrashDevice, layout: &disk::Layout, allowed: Slot) -> CrashDevice {
    let p = layout.root(allowed);
    let mut d = dev.clone();
    d.retain_writes(|s, e| e <= p.offset || s >= p.offset + p.len);
    d
}

fn enumerate(test: &str, shapes: &[Shape], max_bits: usize, sample: bool) {
    let started = std::time::Instant::now();
    let mut total = Figures::default();
    for (i, &shape) in shapes.iter().enumerate() {
        for s in scenarios(shape, 7) {
            // A BSDF2 delta writes what a BSDIFF40 one writes: the first shape's every state
            // covers its patcher under crashes and re-issues; the other shapes need not again.
            if s.name == "delta-bsdf2" && (sample || i > 0) {
                continue;
            }
            let fig = crash_scenario(&s, max_bits, sample);
            eprintln!(
                "crash-enumeration: {test}: {:<14} {:>5}-byte image, {}-byte sectors, fetch {} B, \
                 checkpoint every {} B: {fig}",
                s.name, shape.len, shape.sector, shape.chunk, shape.checkpoint_every
            );
            total.add(fig);
        }
    }
    eprintln!(
        "crash-enumeration: {test}: total: {total}; {:.1} s",
        started.elapsed().as_secs_f64()
    );
}

/// Every crash point of every install scenario, and every distinct crash outcome at each. The
/// images are small and the checkpoints close, so that at no point do more than 12 unflushed
/// sector pieces matter; the delta's patched image, written in one piece and flushed only at its
/// end, is what sets the sizes.
#[test]
fn every_crash_state_of_small_installs() {
    enumerate(
        "every_crash_state_of_small_installs",
        &[
            Shape {
                sector: 512,
                len: 4 * 1024,
                chunk: 1024,
                checkpoint_every: 2048,
                frame: 1024,
            },
            Shape {
                sector: 4096,
                len: 40 * 1024,
                chunk: 4096,
                checkpoint_every: 16 * 1024,
                frame: 8192,
            },
        ],
        EVERY_MAX_BITS,
        false,
    );
}

/// Every crash point of larger installs, with up to 2^8 outcomes tried at each and the points
/// with more sampled; the figures printed say how many points were sampled.
#[test]
fn sampled_crash_states_of_larger_installs() {
    enumerate(
        "sampled_crash_states_of_larger_installs",
        &[
            Shape {
                sector: 512,
                len: 6 * 1024,
                chunk: 4096,
                checkpoint_every: 8192,
                frame: 8192,
            },
            Shape {
                sector: 4096,
                len: 64 * 1024,
                chunk: 4096,
                checkpoint_every: 8192,
                frame: 8192,
            },
        ],
        SAMPLED_MAX_BITS,
        true,
    );
}

#[derive(Debug, Clone)]
enum Fault {
    /// Lose power before the `after`-th write or flush from now; keep what `seed` chooses of the
    /// unflushed writes.
    Crash { after: u64, seed: u64 },
    /// Fail the `op`-th device access from now.
    IoError { op: u64 },
}

/// One randomized case; the test prints the smallest failing one, and `random_case(&it)`
/// replays it.
#[derive(Debug, Clone)]
struct Case {
    len: usize,
    seed: u64,
    kind: usize,
    sector: u64,
    faults: Vec<Fault>,
}

fn random_shape(len: usize, sector: u64) -> Shape {
    Shape {
        sector,
        len,
        chunk: 4096,
        checkpoint_every: 8192,
        frame: 8192,
    }
}

/// The writes and flushes, and the device accesses, of a fault-free install of this case.
fn dry_run(len: usize, seed: u64, kind: usize, sector: u64) -> (u64, u64) {
    let s = scenarios(random_shape(len, sector), seed).swap_remove(kind);
    let base = base_disk(&s);
    let mut dev = base.clone();
    let (r, _) = install(&mut dev, &s, &mut MemStore::default());
    r.unwrap_or_else(|e| panic!("dry run of {s:?} seed {seed} failed: {e}"));
    (dev.mutations() - base.mutations(), dev.ops() - base.ops())
}

fn case() -> impl Strategy<Value = Case> {
    (
        1usize..64 * 1024,
        0u64..1_000_000,
        0usize..5,
        prop_oneof![Just(512u64), Just(4096u64)],
    )
        .prop_flat_map(|(len, seed, kind, sector)| {
            let (mutations, ops) = dry_run(len, seed, kind, sector);
            let fault = prop_oneof![
                (0..=mutations, any::<u64>())
                    .prop_map(|(after, seed)| Fault::Crash { after, seed }),
                (0..ops).prop_map(|op| Fault::IoError { op }),
            ];
            proptest::collection::vec(fault, 0..4).prop_map(move |faults| Case {
                len,
                seed,
                kind,
                sector,
                faults,
            })
        })
}

/// Returns how many of its faults were applied (those after an install that completed are not),
/// and how many of them interrupted an install (the others came after it ended).
fn random_case(c: &Case) -> (usize, usize) {
    let s = scenarios(random_shape(c.len, c.sector), c.seed).swap_remove(c.kind);
    let base = base_disk(&s);
    let layout = disk::open(&base).expect("open");
    let mut cp = MemStore::default();
    let (dev, applied, interrupted) = apply_faults(c, &s, base, &mut cp);
    let ctx = format!("{c:?}, at the end");
    let dev = if staged(&dev) {
        dev
    } else {
        reissue(&dev, &s, &cp, &ctx)
    };
    assert_no_write_inside_partitions(&only_outside(&dev, &layout, Slot::A), &layout, &ctx);
    assert_records_describe_their_slots(&dev, &s, &ctx);
    check_new_image_boots(dev, &s, &ctx);
    (applied, interrupted)
}

/// Run the installs of `c` with its faults, checking the disk after each; returns the disk
/// after the last, how many faults were applied and how many interrupted an install.
fn apply_faults(
    c: &Case,
    s: &Scenario,
    mut dev: CrashDevice,
    cp: &mut MemStore,
) -> (CrashDevice, usize, usize) {
    let s = s.clone();
    let mut interrupted = 0;
    let mut applied = 0;
    for (i, f) in c.faults.iter().enumerate() {
        applied += 1;
        let ctx = format!("{c:?}, after fault {i}");
        match f {
            Fault::Crash { after, seed } => {
                dev.cut_power_after(*after);
                if install(&mut dev, &s, cp).0.is_ok() {
                    dev.clear_faults();
                    break;
                }
                let choice = dev.seeded_choice(*seed);
                dev.crash(&choice);
                if std::env::var_os("KEEL_TRACE").is_some() {
                    let (_, f) = store::load(&dev).expect("load");
                    eprintln!(
                        "after crash {choice}: {f:?} checkpoint={:?}",
                        cp.value
                            .as_ref()
                            .map(|v| String::from_utf8_lossy(v).into_owned())
                    );
                }
            }
            Fault::IoError { op } => {
                dev.fail_op(dev.ops() + op);
                if install(&mut dev, &s, cp).0.is_ok() {
                    dev.clear_faults();
                    break;
                }
                dev.crash(&CrashChoice::default());
            }
        }
        interrupted += 1;
        assert_records_describe_their_slots(&dev, &s, &ctx);
        check_boots(&dev, &s, &ctx);
    }
    (dev, applied, interrupted)
}

/// Random cases with up to three faults each, drawn within the span of a fault-free install;
/// prints its seed, and how many faults interrupted an install.
#[test]
fn random_installs_with_faults() {
    let faults = std::cell::Cell::new((0, 0));
    crate::common::run_seeded("random_installs_with_faults", 256, case(), |c| {
        let n = random_case(&c);
        let (applied, inside) = faults.get();
        faults.set((applied + n.0, inside + n.1));
    });
    let (applied, inside) = faults.get();
    eprintln!(
        "random_installs_with_faults: {applied} faults applied over 256 cases, {inside} of them \
         interrupted an install (the others came after it had ended)"
    );
}

/// A power cut armed for after the install's last write must not leak into the checks.
#[test]
fn replay_power_cut_at_the_end_of_an_install() {
    let (mutations, _) = dry_run(1, 0, 0, 512);
    let (applied, interrupted) = random_case(&Case {
        len: 1,
        seed: 0,
        kind: 0,
        sector: 512,
        faults: vec![Fault::Crash {
            after: mutations,
            seed: 0,
        }],
    });
    assert_eq!((applied, interrupted), (1, 0));
}

/// The write or flush of that case's install that loses the power: one inside the activation's
/// flag change, after which the new flags are already what the disk reads.
const STAGED_CRASH_AFTER: u64 = 20;

/// Found by this suite: a crash after the activation was durable but before the install
/// reported success; the re-issued install took the staged, never-booted slot for the running
/// one and invalidated the known-good slot. Fixed in `driver::running_slot`.
#[test]
fn replay_reissue_after_a_staged_crash_keeps_the_good_slot() {
    let first = Fault::Crash {
        after: STAGED_CRASH_AFTER,
        seed: 1739259562096632417,
    };
    let mut c = Case {
        len: 3632,
        seed: 0,
        kind: 3,
        sector: 512,
        faults: vec![first],
    };
    // the premise: the first crash leaves slot A staged
    let s = scenarios(random_shape(c.len, c.sector), c.seed).swap_remove(c.kind);
    let (dev, _, interrupted) = apply_faults(&c, &s, base_disk(&s), &mut MemStore::default());
    assert_eq!(interrupted, 1, "the first crash came after the install");
    assert!(staged(&dev), "the first crash no longer stages slot A");
    c.faults.push(Fault::Crash {
        after: 7,
        seed: 1302390474302916709,
    });
    assert_eq!(random_case(&c), (2, 2));
}
