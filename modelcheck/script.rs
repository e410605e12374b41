//! The install as the model runs it: the engine's action sequence in the abstract, one step per
//! disk-relevant action, and the test that holds it against the real sans-IO engine.
//!
//! The model's image has [`CHUNKS`] chunks; the engine is driven over a small in-memory disk
//! with an image of as many chunks of [`CHUNK`] bytes and `checkpoint_every = CHUNK`, so each
//! chunk is one `Fetch`, one `Write`, one `Flush` and one `SaveCheckpoint`, as each
//! `checkpoint_every` bytes are in production. Which steps an install takes is fixed when it
//! starts: by whether a saved checkpoint resumes it (and from where) or is discarded, and by
//! whether the bytes it will hash match the expected digest (the server's and, on a resume, the
//! durable prefix it re-hashes).

use keelos::block::MemDevice;
use keelos::bootctl::{self, store, Slot};
use keelos::disk::{self, LayoutSpec, MIB};
use keelos::update::checkpoint::{Checkpoint, MemStore};
use keelos::update::driver::{self, MemInputs, Request};
use keelos::update::engine::{Action, Event, FlagChange, Install};
use keelos::update::{record, FullImage, Input};
use sha2::{Digest, Sha256};

/// Chunks in the model's image (and checkpoints an install saves).
pub const CHUNKS: usize = 2;
/// Bytes of one chunk in the engine run that the model is checked against.
pub const CHUNK: usize = 64 * 1024;

/// One step of an install, as the model performs it. Each is one engine [`Action`] (Progress
/// left out; the reads of a re-hash or a read-back, one per `IO_CHUNK`, are one step).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Step {
    /// A saved checkpoint that does not match this install is cleared first.
    DiscardCheckpoint,
    /// SetFlags(Invalidate): the target's flags to priority 0, tries 0 (committed, flushed).
    Invalidate,
    /// Zero the target's record.
    ClearRecord,
    Flush,
    /// A resumed install re-hashes the durable prefix its checkpoint names.
    Rehash,
    /// Ask the server for the next bytes (the last one sees the end of the input).
    Fetch,
    /// Write chunk `i` of the image.
    Write(u8),
    /// Save a checkpoint: the first `n` chunks are durable.
    SaveCheckpoint(u8),
    /// Read the whole image back and compare its SHA-256.
    ReadBack,
    WriteRecord,
    /// SetFlags(Activate): target priority 2 with tries, the other slot priority 1.
    Activate,
    ClearCheckpoint,
    /// The install reports success (staged).
    Done,
    /// The install reports failure.
    Failed,
}

impl Step {
    pub fn word(self) -> String {
        match self {
            Step::DiscardCheckpoint => "discard checkpoint".into(),
            Step::Invalidate => "invalidate".into(),
            Step::ClearRecord => "clear record".into(),
            Step::Flush => "flush".into(),
            Step::Rehash => "re-hash prefix".into(),
            Step::Fetch => "fetch".into(),
            Step::Write(i) => format!("write chunk {}", i + 1),
            Step::SaveCheckpoint(n) => format!("checkpoint {n}"),
            Step::ReadBack => "read back".into(),
            Step::WriteRecord => "write record".into(),
            Step::Activate => "activate".into(),
            Step::ClearCheckpoint => "clear checkpoint".into(),
            Step::Done => "staged".into(),
            Step::Failed => "failed".into(),
        }
    }
}

/// How an install starts, given the checkpoint on STATE.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Start {
    Fresh,
    /// A matching checkpoint: the first `n` chunks are durable.
    Resume(u8),
    /// A checkpoint for another install: cleared, then a fresh start.
    Discard,
}

/// What fixes an install's steps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ScriptKey {
    pub start: Start,
    /// Whether the bytes hashed (re-hashed prefix and fetched rest) match the digest.
    pub digest_ok: bool,
}

/// The engine's shape that is not fixed by the key: whether it flushes right after clearing
/// the target's record (a change being made to the engine while this model was written).
/// Learned from the real engine once, by [`engine_flushes_after_record_clear`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shape {
    pub flush_after_clear: bool,
}

/// The steps of an install, in order. Mirrors the module doc of `keelos::update::engine`.
pub fn steps(key: ScriptKey, shape: Shape) -> Vec<Step> {
    let mut s = Vec::new();
    let from = match key.start {
        Start::Fresh => 0,
        Start::Resume(n) => n,
        Start::Discard => {
            s.push(Step::DiscardCheckpoint);
            0
        }
    };
    s.push(Step::Invalidate);
    s.push(Step::ClearRecord);
    if shape.flush_after_clear {
        s.push(Step::Flush);
    }
    if from > 0 {
        s.push(Step::Rehash);
    }
    for i in from..CHUNKS as u8 {
        s.extend([
            Step::Fetch,
            Step::Write(i),
            Step::Flush,
            Step::SaveCheckpoint(i + 1),
        ]);
    }
    s.push(Step::Fetch); // the end of the input; the digest is checked here
    if key.digest_ok {
        s.extend([
            Step::Flush,
            Step::ReadBack,
            Step::WriteRecord,
            Step::Flush,
            Step::Activate,
            Step::ClearCheckpoint,
            Step::Done,
        ]);
    } else {
        s.extend([Step::ClearCheckpoint, Step::Failed]);
    }
    s
}

/// Every key an install can start with.
pub fn all_keys() -> Vec<ScriptKey> {
    let mut starts = vec![Start::Fresh, Start::Discard];
    starts.extend((1..=CHUNKS as u8).map(Start::Resume));
    starts
        .into_iter()
        .flat_map(|start| [true, false].map(|digest_ok| ScriptKey { start, digest_ok }))
        .collect()
}

fn image(seed: u8) -> Vec<u8> {
    // incompressible, so the engine streams it raw, one chunk per fetch
    let mut out = Vec::with_capacity(CHUNKS * CHUNK);
    let mut x = 0x9E37_79B9_7F4A_7C15u64 ^ u64::from(seed);
    while out.len() < CHUNKS * CHUNK {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(CHUNKS * CHUNK);
    out
}

fn sha(b: &[u8]) -> String {
    record::hex(&Sha256::digest(b))
}

/// The real engine run to its end for `key` over a small in-memory disk that runs image 1 from
/// slot A (successful), installing image 2 into slot B: the steps it took, in the model's
/// terms. Panics on an action the model has no step for.
pub fn engine_steps(key: ScriptKey) -> Vec<Step> {
    let v1 = image(1);
    let v2 = image(2);
    let mut dev = MemDevice::new(6 * MIB + 65536, 512);
    disk::create(
        &mut dev,
        LayoutSpec {
            esp_size: MIB,
            root_size: MIB,
            state_size: Some(MIB),
        },
    )
    .expect("create the disk");
    let layout = disk::open(&dev).expect("open the disk");
    // slot A: image 1 with its record, successful
    {
        let a = layout.root(Slot::A).clone();
        let mut w = disk::partition_window(&mut dev, &a).expect("window");
        use keelos::block::BlockDevice;
        w.write_at(0, &v1).expect("write a");
        let rec = keelos::update::SlotRecord {
            version: "1".into(),
            length: v1.len() as u64,
            sha256: Sha256::digest(&v1).into(),
            verity: None,
        };
        w.write_at(record::offset(a.len), &rec.encode())
            .expect("record a");
    }
    store::update(&mut dev, |f| {
        let f = bootctl::activate(f, Slot::A, None, 3)?;
        bootctl::mark_successful(f, Slot::A)
    })
    .expect("flags");
    let identity = "http://server/v2.img".to_string();
    let mut cp = MemStore::default();
    // what the prefix and the server hold
    let (prefix_ok, server_ok) = match key.start {
        Start::Resume(_) => (key.digest_ok, true),
        _ => (true, key.digest_ok),
    };
    match key.start {
        Start::Fresh => {}
        Start::Discard => {
            let other = Checkpoint {
                target: Slot::B,
                sha256: sha(&image(3)),
                source: "http://server/v3.img".into(),
                image_offset: CHUNK as u64,
                input_offset: CHUNK as u64,
                compressed: false,
            };
            cp.value = Some(other.to_bytes());
        }
        Start::Resume(n) => {
            let n = n as usize * CHUNK;
            store::update(&mut dev, |f| {
                bootctl::start_update(f, Slot::B, Some(Slot::A))
            })
            .expect("invalidate b");
            let b = layout.root(Slot::B).clone();
            let mut w = disk::partition_window(&mut dev, &b).expect("window");
            use keelos::block::BlockDevice;
            let prefix = if prefix_ok {
                v2[..n].to_vec()
            } else {
                vec![0xA5; n]
            };
            w.write_at(0, &prefix).expect("prefix");
            let saved = Checkpoint {
                target: Slot::B,
                sha256: sha(&v2),
                source: identity.clone(),
                image_offset: n as u64,
                input_offset: n as u64,
                compressed: false,
            };
            cp.value = Some(saved.to_bytes());
        }
    }
    let served = if server_ok {
        v2.clone()
    } else {
        let mut b = v2.clone();
        b[CHUNK + 7] ^= 0xFF; // a bad server: the right length, one flipped byte
        b
    };
    let req = Request {
        sha256: sha(&v2),
        version: "2".into(),
        tries: bootctl::DEFAULT_TRIES,
        full: FullImage {
            identity,
            fetch_size: Some(served.len() as u64),
            image_len: None,
        },
        delta: None,
        delta_expect: None,
        checkpoint_every: CHUNK as u64,
    };
    let (layout, plan) = driver::plan(&dev, Some(Slot::A), req).expect("plan");
    let target = layout.root(plan.target).clone();
    let source = layout.root(Slot::A).clone();
    let rec_off = record::offset(target.len);
    let mut inputs = MemInputs {
        full: served,
        patch: None,
        chunk: CHUNK,
    };
    let saved = cp.value.clone();
    let mut inst = Install::new(plan, saved.as_deref()).expect("install starts");
    let mut out: Vec<Step> = Vec::new();
    let mut fetched = false;
    let mut buf = vec![0u8; CHUNK];
    loop {
        let action = inst.poll();
        let step = match &action {
            Action::Progress(_) => continue,
            Action::Done(_) => {
                out.push(Step::Done);
                return out;
            }
            Action::Failed(_) => {
                out.push(Step::Failed);
                return out;
            }
            Action::SetFlags(FlagChange::Invalidate { .. }) => Some(Step::Invalidate),
            Action::SetFlags(FlagChange::Activate { .. }) => Some(Step::Activate),
            Action::Write { offset, data } if *offset == rec_off => {
                Some(if data.iter().all(|b| *b == 0) {
                    Step::ClearRecord
                } else {
                    Step::WriteRecord
                })
            }
            Action::Write { offset, data } => {
                assert_eq!(data.len(), CHUNK, "one write per chunk");
                assert_eq!(*offset % CHUNK as u64, 0, "chunk-aligned writes");
                Some(Step::Write((*offset / CHUNK as u64) as u8))
            }
            Action::Flush => Some(Step::Flush),
            // a re-hash reads before the first fetch; the read-back after the last
            Action::ReadTarget { .. } if fetched => Some(Step::ReadBack),
            Action::ReadTarget { .. } => Some(Step::Rehash),
            Action::SaveCheckpoint(c) => {
                Some(Step::SaveCheckpoint((c.image_offset / CHUNK as u64) as u8))
            }
            Action::ClearCheckpoint if out.is_empty() => Some(Step::DiscardCheckpoint),
            Action::ClearCheckpoint => Some(Step::ClearCheckpoint),
            Action::Fetch { .. } => {
                fetched = true;
                Some(Step::Fetch)
            }
            Action::ReadSource { .. } => panic!("a full install read the source slot"),
        };
        // one step per read-back or re-hash, however many reads it takes
        if let Some(s) = step {
            if !(matches!(s, Step::ReadBack | Step::Rehash) && out.last() == Some(&s)) {
                out.push(s);
            }
        }
        let ev = match action {
            Action::Fetch { input, offset } => {
                use driver::InputSource;
                assert_eq!(input, Input::Full);
                match inputs.read_at(input, offset, &mut buf) {
                    Ok(0) => Event::EndOfInput,
                    Ok(n) => Event::Data(buf[..n].to_vec()),
                    Err(e) => Event::InputFailed(e),
                }
            }
            other => driver::perform(&mut dev, &target, Some(&source), &mut cp, other),
        };
        inst.handle(ev);
    }
}

/// Whether the engine flushes right after it clears the target's record.
pub fn engine_flushes_after_record_clear() -> bool {
    let s = engine_steps(ScriptKey {
        start: Start::Fresh,
        digest_ok: true,
    });
    let i = s
        .iter()
        .position(|x| *x == Step::ClearRecord)
        .expect("the engine clears the record");
    s.get(i + 1) == Some(&Step::Flush)
}
