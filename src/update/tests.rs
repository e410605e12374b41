//! Engine tests through the blocking driver, on in-memory and crash-model disks.

use super::checkpoint::MemStore;
use super::driver::{self, MemInputs, Request};
use super::*;
use crate::block::{BlockDevice, CrashDevice, MemDevice};
use crate::bootctl::{self, store, Slot, SlotState};
use crate::disk::{self, LayoutSpec, MIB};
use sha2::{Digest, Sha256};

pub(crate) fn sha(b: &[u8]) -> String {
    record::hex(&Sha256::digest(b))
}

pub(crate) fn image(seed: u8, len: usize) -> Vec<u8> {
    // incompressible, and without repeats a delta could borrow from
    (0..len)
        .map(|i| {
            let mut x = (i as u64 / 8) ^ (u64::from(seed) << 40);
            x = x.wrapping_mul(0x9E37_79B9_7F4A_7C15);
            x ^= x >> 29;
            x = x.wrapping_mul(0xBF58_476D_1CE4_E5B9);
            (x >> (8 * (i % 8))) as u8
        })
        .collect()
}

fn new_disk<D: BlockDevice>(dev: &mut D) {
    let spec = LayoutSpec {
        esp_size: MIB,
        root_size: MIB,
        state_size: Some(MIB),
    };
    disk::create(dev, spec).unwrap();
}

fn req(img: &[u8], full_len: usize) -> Request {
    Request {
        sha256: sha(img),
        version: "v".into(),
        tries: 3,
        full: FullImage {
            identity: "full".into(),
            fetch_size: Some(full_len as u64),
            image_len: None,
        },
        delta: None,
        delta_expect: None,
        checkpoint_every: 64 * 1024,
    }
}

fn install<D: BlockDevice>(
    dev: &mut D,
    req: Request,
    inputs: MemInputs,
    cp: &mut MemStore,
) -> Result<Report, InstallError> {
    let (_, flags) = store::load(&*dev).unwrap();
    let (layout, plan) = driver::plan(&*dev, driver::running_slot(flags), req)?;
    let mut inputs = inputs;
    driver::run(dev, &layout, plan, &mut inputs, cp, &mut |_| {})
}

fn inputs(full: Vec<u8>, patch: Option<Vec<u8>>) -> MemInputs {
    MemInputs {
        full,
        patch,
        chunk: 10_000,
    }
}

fn slot_bytes<D: BlockDevice>(dev: &D, slot: Slot, len: usize) -> Vec<u8> {
    let l = disk::open(dev).unwrap();
    crate::block::read_vec(dev, l.root(slot).offset, len).unwrap()
}

/// A disk running `v1` from slot A, successful.
pub(crate) fn running_v1<D: BlockDevice>(dev: &mut D, v1: &[u8]) {
    new_disk(dev);
    let r = install(
        dev,
        req(v1, v1.len()),
        inputs(v1.to_vec(), None),
        &mut MemStore::default(),
    )
    .unwrap();
    assert_eq!(r.slot, Slot::A);
    store::update(dev, |f| bootctl::mark_successful(f, Slot::A)).unwrap();
}

#[test]
fn an_image_with_a_verity_tree_gets_its_root_hash_in_the_record_and_one_without_gets_none() {
    use crate::verity::{Salt, Superblock, TreeBuilder};
    // 200 data blocks: two levels of tree (level 0 of 2 blocks, the top of 1)
    let data = image(5, 200 * 4096);
    let salt = Salt::new(&[0x5A; 32]).unwrap();
    let mut b = TreeBuilder::new(salt.clone());
    b.push(&data);
    let tree = b.finish().unwrap();
    assert_eq!(tree.layout().levels(), 2);
    let sb = Superblock {
        uuid: uuid::Uuid::from_bytes([1; 16]),
        data_blocks: 200,
        salt: salt.clone(),
    };
    let mut img = data.clone();
    let mut sb_block = sb.to_bytes().to_vec();
    sb_block.resize(4096, 0);
    img.extend_from_slice(&sb_block);
    img.extend_from_slice(tree.bytes());

    let mut dev = MemDevice::new(8 * MIB, 512);
    new_disk(&mut dev);
    let slot = install(
        &mut dev,
        req(&img, img.len()),
        inputs(img.clone(), None),
        &mut MemStore::default(),
    )
    .unwrap()
    .slot;
    let l = disk::open(&dev).unwrap();
    let w = disk::partition_window(&mut dev, l.root(slot)).unwrap();
    let rec = record::read(&w).unwrap().unwrap();
    assert_eq!(
        rec.verity,
        Some(record::SlotVerity {
            data_size: 200 * 4096,
            hash_offset: 200 * 4096,
            root_hash: tree.root_hash().0,
            salt: salt.as_bytes().to_vec(),
        })
    );

    // the same length without a superblock where one belongs: no verity
    let mut plain = img.clone();
    plain[200 * 4096] ^= 0xFF;
    let mut dev = MemDevice::new(8 * MIB, 512);
    new_disk(&mut dev);
    install(
        &mut dev,
        req(&plain, plain.len()),
        inputs(plain.clone(), None),
        &mut MemStore::default(),
    )
    .unwrap();
    let w = disk::partition_window(&mut dev, l.root(slot)).unwrap();
    assert_eq!(record::read(&w).unwrap().unwrap().verity, None);
}

#[test]
fn full_install_raw_and_compressed() {
    let v1 = image(1, 300_000);
    let v2 = image(2, 400_000);
    for compressed in [false, true] {
        let mut dev = MemDevice::new(6 * MIB + 65536, 512);
        running_v1(&mut dev, &v1);
        let full = if compressed {
            let mut z = Vec::new();
            zframes::compress(&v2[..], &mut z, 3, 64 * 1024).unwrap();
            z
        } else {
            v2.clone()
        };
        let mut cp = MemStore::default();
        let r = install(
            &mut dev,
            req(&v2, full.len()),
            inputs(full.clone(), None),
            &mut cp,
        )
        .unwrap();
        assert_eq!(r.slot, Slot::B);
        assert_eq!(r.image_len, v2.len() as u64);
        assert_eq!(r.full_bytes, full.len() as u64);
        assert!(!r.fallback_used && !r.delta_used);
        assert_eq!(slot_bytes(&dev, Slot::B, v2.len()), v2);
        assert_eq!(slot_bytes(&dev, Slot::A, v1.len()), v1);
        let (l, f) = store::load(&dev).unwrap();
        assert_eq!(f.b.state(), SlotState::Trying);
        assert_eq!((f.b.priority(), f.b.tries()), (2, 3));
        assert_eq!(f.a.priority(), 1);
        let rec = driver::read_record(&dev, &l, Slot::B).unwrap().unwrap();
        assert_eq!(rec.length, v2.len() as u64);
        assert_eq!(record::hex(&rec.sha256), sha(&v2));
        assert_eq!(cp.value, None, "checkpoint cleared after success");
    }
}

/// A delta install of `v2` from `v1` (running in slot A) with `patch` served and `z` the full
/// image's compressed form; the disk is returned for checks.
fn delta_install(
    name: &str,
    (v1, v2, z): (&[u8], &[u8], &[u8]),
    patch: Vec<u8>,
    expect: Option<PatchExpect>,
) -> (Report, MemDevice) {
    let mut dev = MemDevice::new(6 * MIB + 65536, 512);
    running_v1(&mut dev, v1);
    let mut rq = req(v2, z.len());
    rq.delta = Some("patch".into());
    rq.delta_expect = expect;
    let r = install(
        &mut dev,
        rq,
        inputs(z.to_vec(), Some(patch)),
        &mut MemStore::default(),
    )
    .unwrap_or_else(|e| panic!("{name}: {e}"));
    (r, dev)
}

#[test]
fn delta_install_saves_bytes_and_bad_deltas_fall_back() {
    let v1 = image(1, 300_000);
    let mut v2 = v1.clone();
    v2[1000..5000].copy_from_slice(&image(9, 4000));
    v2.extend_from_slice(&image(3, 20_000));
    let mut patch = Vec::new();
    qbsdiff::Bsdiff::new(&v1, &v2).compare(&mut patch).unwrap();
    let mut z = Vec::new();
    zframes::compress(&v2[..], &mut z, 3, 64 * 1024).unwrap();
    let other_base = {
        let mut base = v1.clone();
        base[100_000..150_000].copy_from_slice(&image(8, 50_000));
        let mut p = Vec::new();
        qbsdiff::Bsdiff::new(&base, &v2).compare(&mut p).unwrap();
        p
    };
    let mut corrupt = patch.clone();
    let mid = corrupt.len() / 2;
    corrupt[mid] ^= 0xFF;
    let cases: Vec<(&str, Vec<u8>, bool)> = vec![
        ("good", patch.clone(), false),
        ("corrupt", corrupt, true),
        ("other base", other_base, true),
        ("random bytes", image(5, 5000), true),
        ("truncated", patch[..patch.len() / 2].to_vec(), true),
        ("empty", Vec::new(), true),
    ];
    for (name, p, want_fallback) in cases {
        let plen = p.len() as u64;
        let (r, dev) = delta_install(name, (&v1, &v2, &z), p, None);
        assert_eq!(r.fallback_used, want_fallback, "{name}: {r:?}");
        assert_eq!(r.delta_used, !want_fallback, "{name}");
        if want_fallback {
            assert_eq!(r.bytes_saved, 0, "{name}");
            assert!(r.fallback_reason.is_some(), "{name}");
        } else {
            assert_eq!(r.bytes_saved, z.len() as u64 - plen, "{name}");
            assert!(r.bytes_saved > 0);
            assert_eq!(r.full_bytes, 0, "{name}: the full image was not fetched");
        }
        assert_eq!(slot_bytes(&dev, Slot::B, v2.len()), v2, "{name}");
        assert_eq!(slot_bytes(&dev, Slot::A, v1.len()), v1, "{name}");
    }
}

/// With a signed release manifest's size and digest for the patch, a patch that is not exactly
/// that one never reaches the applier: the install falls back to the full image and says why.
#[test]
fn a_signed_manifests_patch_digest_and_size_gate_the_applier() {
    let v1 = image(1, 300_000);
    let mut v2 = v1.clone();
    v2[1000..5000].copy_from_slice(&image(9, 4000));
    let mut patch = Vec::new();
    qbsdiff::Bsdiff::new(&v1, &v2).compare(&mut patch).unwrap();
    let mut z = Vec::new();
    zframes::compress(&v2[..], &mut z, 3, 64 * 1024).unwrap();
    let signed = PatchExpect {
        sha256: Sha256::digest(&patch).into(),
        size: patch.len() as u64,
    };
    let mut flipped = patch.clone();
    let mid = flipped.len() / 2;
    flipped[mid] ^= 1;
    let mut longer = patch.clone();
    longer.extend_from_slice(&image(4, 200_000));
    let cases: Vec<(&str, Vec<u8>, PatchExpect, Option<&str>)> = vec![
        ("the signed patch", patch.clone(), signed, None),
        (
            "one flipped bit",
            flipped,
            signed,
            Some("is not the one the signed manifest gives"),
        ),
        (
            "another digest signed",
            patch.clone(),
            PatchExpect {
                sha256: [7; 32],
                ..signed
            },
            Some("is not the one the signed manifest gives"),
        ),
        (
            "longer than signed",
            longer,
            signed,
            Some("larger than the"),
        ),
    ];
    for (name, p, expect, want) in cases {
        let (r, dev) = delta_install(name, (&v1, &v2, &z), p, Some(expect));
        match want {
            None => assert!(r.delta_used && !r.fallback_used, "{name}: {r:?}"),
            Some(why) => {
                assert!(r.fallback_used && !r.delta_used, "{name}: {r:?}");
                let reason = r.fallback_reason.clone().unwrap_or_default();
                assert!(reason.contains(why), "{name}: {reason}");
            }
        }
        assert_eq!(slot_bytes(&dev, Slot::B, v2.len()), v2, "{name}");
        assert_eq!(slot_bytes(&dev, Slot::A, v1.len()), v1, "{name}");
    }
}

/// The engine applies the BSDF2 deltas `keel-image delta create` makes (detected from their
/// magic, as BSDIFF40 is), and a broken one falls back to the full image.
#[test]
fn bsdf2_delta_install_applies_and_broken_ones_fall_back() {
    use super::bsdf2::{create, CreateFormat};
    let v1 = image(1, 300_000);
    let mut v2 = v1.clone();
    v2[1000..5000].copy_from_slice(&image(9, 4000));
    v2.extend_from_slice(&image(3, 20_000));
    let mut patch = Vec::new();
    create(
        &v1,
        &v2,
        CreateFormat::Bsdf2Brotli(Default::default()),
        &mut patch,
    )
    .unwrap();
    assert!(patch.starts_with(b"BSDF2"));
    let mut z = Vec::new();
    zframes::compress(&v2[..], &mut z, 3, 64 * 1024).unwrap();
    let mut corrupt = patch.clone();
    let mid = corrupt.len() / 2;
    corrupt[mid..mid + 8].fill(0xA5);
    let mut unknown_codec = patch.clone();
    unknown_codec[6] = 9;
    let cases: Vec<(&str, Vec<u8>, bool)> = vec![
        ("good", patch.clone(), false),
        ("corrupt", corrupt, true),
        ("unknown codec", unknown_codec, true),
        ("truncated", patch[..patch.len() / 2].to_vec(), true),
    ];
    for (name, p, want_fallback) in cases {
        let plen = p.len() as u64;
        let (r, dev) = delta_install(name, (&v1, &v2, &z), p, None);
        assert_eq!(r.fallback_used, want_fallback, "{name}: {r:?}");
        if !want_fallback {
            assert_eq!(r.bytes_saved, z.len() as u64 - plen, "{name}");
            assert_eq!(r.full_bytes, 0, "{name}: the full image was not fetched");
        }
        assert_eq!(slot_bytes(&dev, Slot::B, v2.len()), v2, "{name}");
        assert_eq!(slot_bytes(&dev, Slot::A, v1.len()), v1, "{name}");
    }
}

#[test]
fn failures_leave_the_running_slot_alone_and_the_target_unbootable() {
    let v1 = image(1, 200_000);
    let v2 = image(2, 200_000);
    let mut z = Vec::new();
    zframes::compress(&v2[..], &mut z, 3, 64 * 1024).unwrap();
    type Case = (&'static str, Request, Vec<u8>);
    let mut wrong = req(&v2, v2.len());
    wrong.sha256 = sha(&v1);
    let mut huge = req(&v2, v2.len());
    huge.full.image_len = Some(10 * MIB);
    let mut bad_digest = req(&v2, v2.len());
    bad_digest.sha256 = "xyz".into();
    let mut short = req(&v2, v2.len());
    short.full.image_len = Some(v2.len() as u64);
    let mut bad_tries = req(&v2, v2.len());
    bad_tries.tries = 0;
    type Check = fn(&InstallError) -> bool;
    let cases: Vec<(Case, Check, bool)> = vec![
        (
            ("wrong digest", wrong, v2.clone()),
            |e| matches!(e, InstallError::DigestMismatch { .. }),
            true,
        ),
        (
            ("too large (known)", huge, v2.clone()),
            |e| matches!(e, InstallError::TooLarge { .. }),
            false,
        ),
        (
            (
                "too large (streamed)",
                req(&v2, 0),
                image(4, 2 * MIB as usize),
            ),
            |e| matches!(e, InstallError::TooLarge { .. }),
            true,
        ),
        (
            ("empty", req(&[], 0), Vec::new()),
            |e| matches!(e, InstallError::EmptyImage),
            true,
        ),
        (
            ("truncated zstd", req(&v2, 0), z[..z.len() / 2].to_vec()),
            |e| {
                matches!(
                    e,
                    InstallError::Truncated { .. } | InstallError::DigestMismatch { .. }
                )
            },
            true,
        ),
        (
            ("digest not hex", bad_digest, v2.clone()),
            |e| matches!(e, InstallError::BadDigest(_)),
            false,
        ),
        (
            ("tries 0", bad_tries, v2.clone()),
            |e| matches!(e, InstallError::BadTries(0)),
            false,
        ),
    ];
    for ((name, rq, full), is_expected, may_write) in cases {
        let mut dev = CrashDevice::new(6 * MIB + 65536, 512);
        running_v1(&mut dev, &v1);
        dev.flush().unwrap();
        dev.clear_write_log();
        let (_, before) = store::load(&dev).unwrap();
        let mut cp = MemStore::default();
        let err = install(&mut dev, rq, inputs(full, None), &mut cp).unwrap_err();
        assert!(is_expected(&err), "{name}: {err}");
        assert_eq!(cp.value, None, "{name}: the failure kept a checkpoint");
        let (l, after) = store::load(&dev).unwrap();
        assert_eq!(after.a, before.a, "{name}: running slot's flags changed");
        assert_eq!(
            after.b.state(),
            if may_write {
                SlotState::Invalid
            } else {
                before.b.state()
            },
            "{name}"
        );
        assert_eq!(slot_bytes(&dev, Slot::A, v1.len()), v1, "{name}");
        if !may_write {
            assert!(
                dev.written_ranges().is_empty(),
                "{name}: refused after writing"
            );
        }
        for (s, e) in dev.written_ranges() {
            let a = l.root(Slot::A);
            assert!(
                e <= a.offset || s >= a.offset + a.len,
                "{name}: wrote into the running slot"
            );
        }
    }
}

#[test]
fn interrupted_install_resumes_from_its_checkpoint() {
    let v1 = image(1, 100_000);
    let v2 = image(2, 700_000);
    for compressed in [false, true] {
        let full = if compressed {
            let mut z = Vec::new();
            zframes::compress(&v2[..], &mut z, 3, 64 * 1024).unwrap();
            z
        } else {
            v2.clone()
        };
        let mut dev = CrashDevice::new(6 * MIB + 65536, 512);
        running_v1(&mut dev, &v1);
        dev.flush().unwrap();
        let mut cp = MemStore::default();
        // count the writes and flushes of a whole install, then cut the power half way
        let mut dry = dev.clone();
        let m0 = dry.mutations();
        install(
            &mut dry,
            req(&v2, full.len()),
            inputs(full.clone(), None),
            &mut MemStore::default(),
        )
        .unwrap();
        dev.cut_power_after((dry.mutations() - m0) / 2);
        let err = install(
            &mut dev,
            req(&v2, full.len()),
            inputs(full.clone(), None),
            &mut cp,
        )
        .unwrap_err();
        assert!(matches!(err, InstallError::Io(_)), "{err}");
        let choice = dev.seeded_choice(7);
        dev.crash(&choice);
        let saved =
            checkpoint::Checkpoint::from_bytes(cp.value.as_ref().expect("a checkpoint was saved"))
                .unwrap();
        assert!(saved.image_offset > 0);
        let r = install(
            &mut dev,
            req(&v2, full.len()),
            inputs(full.clone(), None),
            &mut cp,
        )
        .unwrap();
        assert_eq!(
            r.resume,
            Resume::From(saved.image_offset),
            "compressed={compressed}"
        );
        assert_eq!(
            r.full_bytes,
            full.len() as u64 - saved.input_offset,
            "resumed at the checkpoint's input offset, not restarted"
        );
        assert_eq!(slot_bytes(&dev, Slot::B, v2.len()), v2);
        // a checkpoint for another image is discarded
        let mut other = MemStore {
            value: cp.value.clone(),
            fail_puts: false,
        };
        other.value = Some(saved.to_bytes());
        let v3 = image(3, 100_000);
        store::update(&mut dev, |f| bootctl::mark_successful(f, Slot::A)).unwrap();
        let r = install(
            &mut dev,
            req(&v3, v3.len()),
            inputs(v3.clone(), None),
            &mut other,
        )
        .unwrap();
        assert_eq!(r.resume, Resume::Discarded);
    }
}

/// The target's old record is durably zeroed before the first image byte is written, so no
/// crash can leave it describing partly new bytes.
#[test]
fn the_old_record_is_durably_gone_before_the_first_image_byte() {
    let v1 = image(1, 100_000);
    let v2 = image(2, 100_000);
    let v3 = image(3, 120_000);
    let mut dev = CrashDevice::new(6 * MIB + 65536, 512);
    running_v1(&mut dev, &v1);
    install(
        &mut dev,
        req(&v2, v2.len()),
        inputs(v2.clone(), None),
        &mut MemStore::default(),
    )
    .unwrap();
    store::update(&mut dev, |f| bootctl::mark_successful(f, Slot::B)).unwrap();
    // B runs v2; A, the target, holds v1 and its record
    let (_, flags) = store::load(&dev).unwrap();
    let (layout, plan) =
        driver::plan(&dev, driver::running_slot(flags), req(&v3, v3.len())).unwrap();
    assert_eq!(plan.target, Slot::A);
    let a = layout.root(Slot::A).clone();
    let rec_at = a.offset + record::offset(a.len);
    let durable_record =
        |d: &CrashDevice| SlotRecord::decode(&d.durable_range(rec_at, record::RECORD_SIZE));
    assert_eq!(
        durable_record(&dev).map(|r| r.length),
        Some(v1.len() as u64)
    );
    let mut image_writes = 0;
    driver::run_observed(
        &mut dev,
        &layout,
        plan,
        &mut inputs(v3.clone(), None),
        &mut MemStore::default(),
        &mut |_| {},
        &mut |d: &CrashDevice, act: &Action| {
            if let Action::Write { offset, .. } = act {
                if *offset < record::offset(a.len) {
                    image_writes += 1;
                    assert_eq!(
                        durable_record(d),
                        None,
                        "an image byte was written at {offset} while the old record was durable"
                    );
                }
            }
        },
    )
    .unwrap();
    assert!(image_writes > 0);
    assert_eq!(
        durable_record(&dev).map(|r| r.length),
        Some(v3.len() as u64)
    );
}

#[test]
fn engine_refuses_protocol_misuse() {
    let v2 = image(2, 1000);
    let plan = InstallPlan {
        target: Slot::B,
        running: Some(Slot::A),
        flags: Default::default(),
        target_len: MIB,
        source_len: MIB,
        sha256: sha(&v2),
        version: "v".into(),
        tries: 3,
        full: FullImage {
            identity: "x".into(),
            fetch_size: None,
            image_len: None,
        },
        delta: None,
        checkpoint_every: 1 << 20,
    };
    assert!(matches!(
        Install::new(
            InstallPlan {
                target: Slot::A,
                ..plan.clone()
            },
            None
        ),
        Err(InstallError::TargetIsRunning(Slot::A))
    ));
    let mut i = Install::new(plan.clone(), None).unwrap();
    assert!(matches!(i.poll(), Action::SetFlags(_)));
    assert!(matches!(
        i.poll(),
        Action::Failed(InstallError::Protocol { .. })
    ));
    let mut i = Install::new(plan, None).unwrap();
    let _ = i.poll();
    i.handle(Event::WriteDone);
    assert!(matches!(i.poll(), Action::ClearCheckpoint));
    i.handle(Event::CheckpointSaved);
    assert!(matches!(
        i.poll(),
        Action::Failed(InstallError::Protocol { .. })
    ));
}

/// A disk whose medium does not keep one byte of a write (it flips it) while its page cache
/// still returns what was written, until the cached copy is dropped: the read-back must see the
/// medium, so the install fails and activates nothing. Guards the driver's `drop_cached` before
/// every read of the target (without it the read-back hashes the cache and the install passes).
#[test]
fn the_read_back_sees_the_medium_not_the_page_cache() {
    use crate::block::BlockError;
    use std::cell::RefCell;

    struct LyingDisk {
        medium: MemDevice,
        cache: RefCell<Vec<Option<u8>>>,
        /// The device offset whose byte the medium flips when it is written.
        flip_at: Option<u64>,
    }
    impl BlockDevice for LyingDisk {
        fn sector_size(&self) -> u64 {
            self.medium.sector_size()
        }
        fn len(&self) -> u64 {
            self.medium.len()
        }
        fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), BlockError> {
            self.medium.read_at(offset, buf)?;
            let cache = self.cache.borrow();
            for (i, b) in buf.iter_mut().enumerate() {
                if let Some(c) = cache[offset as usize + i] {
                    *b = c;
                }
            }
            Ok(())
        }
        fn write_at(&mut self, offset: u64, data: &[u8]) -> Result<(), BlockError> {
            self.medium.write_at(offset, data)?;
            let mut cache = self.cache.borrow_mut();
            cache[offset as usize..offset as usize + data.len()]
                .iter_mut()
                .zip(data)
                .for_each(|(c, b)| *c = Some(*b));
            if let Some(at) = self
                .flip_at
                .filter(|at| (offset..offset + data.len() as u64).contains(at))
            {
                let mut b = [0u8];
                self.medium.read_at(at, &mut b)?;
                self.medium.write_at(at, &[!b[0]])?;
            }
            Ok(())
        }
        fn flush(&mut self) -> Result<(), BlockError> {
            self.medium.flush()
        }
        fn drop_cached(&self, offset: u64, len: u64) -> Result<(), BlockError> {
            let mut cache = self.cache.borrow_mut();
            cache[offset as usize..(offset + len) as usize].fill(None);
            Ok(())
        }
    }

    let v1 = image(1, 300_000);
    let v2 = image(2, 300_000);
    let len = 6 * MIB + 65536;
    let mut dev = LyingDisk {
        medium: MemDevice::new(len, 512),
        cache: RefCell::new(vec![None; len as usize]),
        flip_at: None,
    };
    running_v1(&mut dev, &v1);
    let target = disk::open(&dev).unwrap().root(Slot::B).offset;
    dev.flip_at = Some(target + 1000);
    let err = install(
        &mut dev,
        req(&v2, v2.len()),
        inputs(v2.clone(), None),
        &mut MemStore::default(),
    )
    .expect_err("the medium lost a byte of the image: the read-back must catch it");
    assert!(
        matches!(err, InstallError::ReadBackMismatch { .. }),
        "{err}"
    );
    let (_, flags) = store::load(&dev).unwrap();
    assert_eq!(flags.get(Slot::B).state(), SlotState::Invalid, "{flags:?}");
    assert_eq!(flags.preferred(), Some(Slot::A));
}
