//! The install engine: one install of a new image into the inactive slot, as a sans-IO state
//! machine. It never touches a device, a file, a socket or a clock: it asks for what it needs
//! with [`Action`]s and learns what happened from [`Event`]s. Drivers (the blocking one in
//! [`super::driver`], the agent's async one, the test harnesses) do the I/O.
//!
//! Call order: [`Install::poll`] returns the next action. Every action except
//! [`Action::Progress`] must be answered with exactly one [`Install::handle`] before the next
//! `poll`. [`Action::Done`] and [`Action::Failed`] end the install.
//!
//! Order of a full install: validate; invalidate the target's flags (committed and flushed by
//! the driver); zero the target's record and flush; stream the image into the slot, hashing
//! it, with a flush and a checkpoint every `checkpoint_every` bytes; flush; read the slot back
//! and compare its SHA-256; write the record; flush; activate; clear the checkpoint. A delta
//! install first checks the running slot against its record and downloads the patch, then
//! writes the patched output the same way. Any delta failure continues as a full install.
//! Nothing before activation changes the running slot's flags or bytes. At every instant an
//! intact record on the target describes the bytes the target holds: the old record is durably
//! gone before the first image byte is written, and the new one is written only after the
//! image is durable and read back.

use super::bspatch::{self, Patcher};
use super::checkpoint::Checkpoint;
use super::record::{self, SlotRecord};
use super::zframes::{self, FrameDecoder};
use crate::bootctl::{Slot, SlotFlags, SlotState, MAX_TRIES};
use serde::Serialize;
use sha2::{Digest, Sha256};
use std::collections::VecDeque;

/// The largest write or read the engine asks for.
pub const IO_CHUNK: usize = 1 << 20;

/// Where the bytes of the full image come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FullImage {
    /// Identifies the input across restarts (a URL or path, with its size): a checkpoint resumes
    /// only the same input.
    pub identity: String,
    /// How many bytes the input has (the compressed size for a compressed image), when known.
    pub fetch_size: Option<u64>,
    /// The uncompressed image length, when known before the download.
    pub image_len: Option<u64>,
}

/// A delta: a BSDIFF40 patch from the running slot's image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delta {
    pub identity: String,
    /// The running slot's record (`None` when it has none: the delta cannot be used).
    pub base: Option<SlotRecord>,
    /// The patch a signed release manifest names, when the install comes from one.
    pub expect: Option<PatchExpect>,
}

/// What a signed release manifest says the patch is: a patch of another size or digest is not
/// applied (the install falls back to the full image), so the patch applier only ever parses
/// bytes the release signer vouched for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PatchExpect {
    pub sha256: [u8; 32],
    pub size: u64,
}

/// Everything an install needs to know up front.
#[derive(Debug, Clone)]
pub struct InstallPlan {
    pub target: Slot,
    /// The slot the system runs from (`None` on an offline disk).
    pub running: Option<Slot>,
    /// The flags as they are now.
    pub flags: SlotFlags,
    /// Length of the target partition (the image may use it minus the record).
    pub target_len: u64,
    /// Length of the running slot's partition (bounds source reads of a delta).
    pub source_len: u64,
    /// Expected SHA-256 of the uncompressed image, as given (checked to be 64 hex characters).
    pub sha256: String,
    pub version: String,
    pub tries: u8,
    pub full: FullImage,
    pub delta: Option<Delta>,
    /// Flush and checkpoint after this many image bytes.
    pub checkpoint_every: u64,
}

/// A checkpoint's verdict, for the report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum Resume {
    None,
    /// Continued from this many durable image bytes.
    From(u64),
    /// A saved checkpoint did not match this install and was discarded.
    Discarded,
}

/// Which input a [`Action::Fetch`] means.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Input {
    Full,
    Patch,
}

/// A flag change the driver commits (crash-safely, flushed) before answering.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlagChange {
    Invalidate {
        target: Slot,
        running: Option<Slot>,
    },
    Activate {
        target: Slot,
        running: Option<Slot>,
        tries: u8,
    },
}

impl FlagChange {
    /// The new flags, from the flags on disk now.
    pub fn apply(self, flags: SlotFlags) -> Result<SlotFlags, crate::bootctl::FlagError> {
        match self {
            FlagChange::Invalidate { target, running } => {
                crate::bootctl::start_update(flags, target, running)
            }
            FlagChange::Activate {
                target,
                running,
                tries,
            } => crate::bootctl::activate(flags, target, running, tries),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    VerifyingSource,
    FetchingPatch,
    Writing,
    Verifying,
    Activating,
    Staged,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Progress {
    pub phase: Phase,
    pub done: u64,
    pub total: Option<u64>,
    pub delta: bool,
}

/// The outcome of a staged install.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Report {
    pub slot: Slot,
    pub version: String,
    pub sha256: String,
    pub image_len: u64,
    /// The image was made from the delta.
    pub delta_used: bool,
    pub fallback_used: bool,
    pub fallback_reason: Option<String>,
    /// Bytes fetched of the patch (0 without a delta).
    pub patch_bytes: u64,
    /// Bytes fetched of the full image.
    pub full_bytes: u64,
    /// The compressed full image's size minus the patch bytes, when the delta was used.
    pub bytes_saved: u64,
    pub resume: Resume,
}

#[derive(Debug)]
pub enum Action {
    SetFlags(FlagChange),
    /// Write to the target slot, at an offset inside it.
    Write {
        offset: u64,
        data: Vec<u8>,
    },
    /// Make everything written durable (the target slot's device).
    Flush,
    ReadTarget {
        offset: u64,
        len: usize,
    },
    /// Read the running slot (the delta's source).
    ReadSource {
        offset: u64,
        len: usize,
    },
    /// Give the next bytes of `input`, continuing at `offset` (reopen there if the input is not
    /// already positioned there).
    Fetch {
        input: Input,
        offset: u64,
    },
    SaveCheckpoint(Checkpoint),
    ClearCheckpoint,
    /// No answer expected.
    Progress(Progress),
    Done(Report),
    Failed(InstallError),
}

#[derive(Debug)]
pub enum Event {
    FlagsSet,
    WriteDone,
    FlushDone,
    CheckpointSaved,
    TargetBytes(Vec<u8>),
    SourceBytes(Vec<u8>),
    Data(Vec<u8>),
    EndOfInput,
    /// The input could not be fetched (the driver has given up retrying).
    InputFailed(String),
    /// A device, flag or checkpoint operation failed.
    IoFailed(String),
}

/// Why an install failed. Unless it says otherwise, the running slot is untouched and the target
/// slot is left unbootable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InstallError {
    #[error("the expected digest {0:?} is not a SHA-256 (64 hex characters)")]
    BadDigest(String),
    #[error("slot {0} is the running slot; an update may only write the inactive slot")]
    TargetIsRunning(Slot),
    #[error("tries must be between 1 and {MAX_TRIES}, got {0}")]
    BadTries(u8),
    #[error(
        "the image is larger than the slot: {image} bytes or more, but slot {slot} holds at most \
         {capacity}; the running slot was not touched (slot {slot} stays unbootable if it was \
         already invalidated). Use an image built for this disk's slot size"
    )]
    TooLarge {
        slot: Slot,
        image: u64,
        capacity: u64,
    },
    #[error("the image is empty")]
    EmptyImage,
    #[error("the image stream ended early: {got} bytes of {expected}")]
    Truncated { got: u64, expected: String },
    #[error(
        "the image does not match its digest: expected {expected}, got {got}; nothing was \
         activated (wrong image or corrupted download)"
    )]
    DigestMismatch { expected: String, got: String },
    #[error(
        "slot {slot} reads back with SHA-256 {got}, not {expected}: the disk did not keep what \
         was written; nothing was activated"
    )]
    ReadBackMismatch {
        slot: Slot,
        expected: String,
        got: String,
    },
    #[error("the compressed image is corrupt: {0}")]
    Corrupt(String),
    #[error("the image could not be fetched: {0}; re-run the install to resume")]
    Input(String),
    #[error("I/O failed: {0}; re-run the install to resume")]
    Io(String),
    #[error("the driver answered {got} where {want} was expected")]
    Protocol { want: &'static str, got: String },
}

impl InstallError {
    /// Whether a saved checkpoint is still worth resuming after this error.
    fn keeps_checkpoint(&self) -> bool {
        matches!(self, InstallError::Input(_) | InstallError::Io(_))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Wait {
    Flags,
    Write,
    Flush,
    Target,
    Source,
    Data,
    Checkpoint,
}

enum Stage {
    /// Delta: hash the running slot's image and compare it with its record.
    VerifySource {
        pos: u64,
        hasher: Sha256,
        base: SlotRecord,
    },
    /// Delta: download the whole patch.
    FetchPatch {
        base: SlotRecord,
    },
    Invalidate,
    ClearRecord,
    /// The zeroed record is made durable before any image byte is written: otherwise a crash
    /// could keep the old record over partly new bytes, and the slot would describe an image it
    /// no longer holds.
    ClearRecordFlush,
    /// Resume: hash the durable prefix back in.
    Rehash {
        pos: u64,
    },
    /// Full: stream the image.
    Stream,
    /// Delta: produce the patched output.
    Patch,
    /// Flush, then save a checkpoint, then go back to `Stream`.
    CheckpointFlush,
    CheckpointSave,
    EndFlush,
    ReadBack {
        pos: u64,
        hasher: Sha256,
    },
    WriteRecord,
    RecordFlush,
    Activate,
    ClearCheckpoint,
    Done,
    /// Clear the checkpoint, then fail.
    ClearThenFail(InstallError),
    Failed,
}

/// Finds the dm-verity parameters of an image with an appended superblock and tree
/// (`[data][superblock][tree]`, see [`crate::verity`]) in the bytes of the read-back: the
/// superblock gives the salt, the tree's first block (its top level) gives the root hash. Both
/// come from bytes whose SHA-256 the read-back checks against the expected digest (signed, in a
/// release), so the root hash is exactly as trustworthy as the image's digest, and the record
/// gets it only when that digest matched (the probe's result is used only on the way to
/// [`Stage::WriteRecord`]). An image without a tree (a development image) gets no verity.
struct VerityProbe {
    layout: crate::verity::Layout,
    superblock: Option<Vec<u8>>,
    top: Option<Vec<u8>>,
}

impl VerityProbe {
    fn new(image_len: u64) -> Option<Self> {
        let layout = crate::verity::Layout::from_appended_size(image_len)?;
        // a single data block has no tree to hand to the kernel's target; images are larger
        (layout.levels() > 0).then_some(VerityProbe {
            layout,
            superblock: None,
            top: None,
        })
    }

    /// Take what it needs from `chunk`, which starts at image offset `pos`.
    fn see(&mut self, pos: u64, chunk: &[u8]) {
        let sb_at = self.layout.data_size();
        let top_at = sb_at + crate::verity::BLOCK_SIZE as u64;
        let block = crate::verity::BLOCK_SIZE;
        let grab = |at: u64, len: usize| -> Option<Vec<u8>> {
            let start = at.checked_sub(pos)? as usize;
            chunk
                .get(start..start.checked_add(len)?)
                .map(<[u8]>::to_vec)
        };
        if self.superblock.is_none() {
            self.superblock = grab(sb_at, crate::verity::SUPERBLOCK_SIZE);
        }
        if self.top.is_none() {
            self.top = grab(top_at, block);
        }
    }

    fn finish(self) -> Option<record::SlotVerity> {
        let sb = crate::verity::Superblock::parse(self.superblock.as_deref()?).ok()?;
        if sb.data_blocks != self.layout.data_blocks() {
            return None;
        }
        let root = crate::verity::root_hash_of_top_block(&sb.salt, self.top.as_deref()?);
        Some(record::SlotVerity {
            data_size: self.layout.data_size(),
            hash_offset: self.layout.data_size(),
            root_hash: root.0,
            salt: sb.salt.as_bytes().to_vec(),
        })
    }
}

/// One install. See the module documentation for the call order.
pub struct Install {
    plan: InstallPlan,
    expected: [u8; 32],
    stage: Stage,
    wait: Option<Wait>,
    /// Actions to hand out before anything else, with the answer each expects.
    queue: VecDeque<(Action, Option<Wait>)>,
    /// Target bytes of the image written so far (all durable up to `durable`).
    image_pos: u64,
    durable: u64,
    since_checkpoint: u64,
    hasher: Sha256,
    pending: VecDeque<(u64, Vec<u8>)>,
    // full-image input
    input_pos: u64,
    input_done: bool,
    compressed: Option<bool>,
    decoder: Option<FrameDecoder>,
    /// Input offset where the decoder started.
    decoder_base: u64,
    /// (input offset, image offset) where a resume may start, newest last.
    resume_points: Vec<(u64, u64)>,
    last_checkpoint: Option<Checkpoint>,
    /// Looks for a dm-verity superblock and tree in the bytes the read-back verifies.
    verity_probe: Option<VerityProbe>,
    // delta
    patch: Vec<u8>,
    patcher: Option<Patcher>,
    delta_active: bool,
    invalidated: bool,
    report: Report,
}

impl std::fmt::Debug for Install {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Install")
            .field("target", &self.plan.target)
            .field("image_pos", &self.image_pos)
            .field("durable", &self.durable)
            .field("wait", &self.wait)
            .finish()
    }
}

fn digest_hex(h: &Sha256) -> String {
    record::hex(&h.clone().finalize())
}

impl Install {
    /// Validate the plan and decide whether `saved` (a stored checkpoint) resumes it. Nothing is
    /// written when this fails.
    pub fn new(plan: InstallPlan, saved: Option<&[u8]>) -> Result<Install, InstallError> {
        let expected = record::parse_digest(&plan.sha256)
            .ok_or_else(|| InstallError::BadDigest(plan.sha256.clone()))?;
        if plan.running == Some(plan.target) {
            return Err(InstallError::TargetIsRunning(plan.target));
        }
        if plan.tries == 0 || plan.tries > MAX_TRIES {
            return Err(InstallError::BadTries(plan.tries));
        }
        let capacity = record::capacity(plan.target_len);
        if let Some(len) = plan.full.image_len {
            if len > capacity {
                return Err(InstallError::TooLarge {
                    slot: plan.target,
                    image: len,
                    capacity,
                });
            }
            if len == 0 {
                return Err(InstallError::EmptyImage);
            }
        }
        let sha_hex = record::hex(&expected);
        let report = Report {
            slot: plan.target,
            version: plan.version.clone(),
            sha256: sha_hex.clone(),
            image_len: 0,
            delta_used: false,
            fallback_used: false,
            fallback_reason: None,
            patch_bytes: 0,
            full_bytes: 0,
            bytes_saved: 0,
            resume: Resume::None,
        };
        let mut inst = Install {
            expected,
            stage: Stage::Invalidate,
            wait: None,
            queue: VecDeque::new(),
            image_pos: 0,
            durable: 0,
            since_checkpoint: 0,
            hasher: Sha256::new(),
            pending: VecDeque::new(),
            input_pos: 0,
            input_done: false,
            compressed: None,
            decoder: None,
            decoder_base: 0,
            resume_points: Vec::new(),
            verity_probe: None,
            last_checkpoint: None,
            patch: Vec::new(),
            patcher: None,
            delta_active: false,
            invalidated: false,
            report,
            plan,
        };
        let cp = saved.map(Checkpoint::from_bytes);
        let target_invalid = inst.plan.flags.get(inst.plan.target).state() == SlotState::Invalid;
        match cp {
            Some(Some(cp))
                if cp.target == inst.plan.target
                    && cp.sha256 == sha_hex
                    && cp.source == inst.plan.full.identity
                    && target_invalid
                    && cp.image_offset <= capacity =>
            {
                inst.image_pos = cp.image_offset;
                inst.durable = cp.image_offset;
                inst.input_pos = cp.input_offset;
                inst.compressed = Some(cp.compressed);
                inst.decoder_base = cp.input_offset;
                if cp.compressed {
                    inst.decoder = Some(
                        FrameDecoder::new().map_err(|e| InstallError::Corrupt(e.to_string()))?,
                    );
                }
                inst.resume_points.push((cp.input_offset, cp.image_offset));
                inst.report.resume = Resume::From(cp.image_offset);
                if inst.plan.delta.is_some() {
                    inst.report.fallback_used = true;
                    inst.report.fallback_reason = Some(
                        "an interrupted full install of this image was resumed from its checkpoint"
                            .into(),
                    );
                }
                inst.last_checkpoint = Some(cp);
                inst.stage = Stage::Invalidate;
            }
            Some(_) => {
                inst.report.resume = Resume::Discarded;
                inst.queue
                    .push_back((Action::ClearCheckpoint, Some(Wait::Checkpoint)));
                inst.start_fresh();
            }
            None => inst.start_fresh(),
        }
        Ok(inst)
    }

    fn patch_expect(&self) -> Option<PatchExpect> {
        self.plan.delta.as_ref().and_then(|d| d.expect)
    }

    fn start_fresh(&mut self) {
        self.stage = match self.plan.delta.clone() {
            Some(Delta {
                base: Some(base), ..
            }) if base.length <= self.plan.source_len => {
                self.delta_active = true;
                Stage::VerifySource {
                    pos: 0,
                    hasher: Sha256::new(),
                    base,
                }
            }
            Some(_) => {
                self.fall_back(
                    "the running slot has no image record, so the delta has no known base".into(),
                );
                Stage::Invalidate
            }
            None => Stage::Invalidate,
        };
    }

    fn capacity(&self) -> u64 {
        record::capacity(self.plan.target_len)
    }

    fn progress(&mut self, phase: Phase, done: u64, total: Option<u64>) {
        let p = Progress {
            phase,
            done,
            total,
            delta: self.delta_active,
        };
        self.queue.push_back((Action::Progress(p), None));
    }

    /// Give up on the delta and continue as a full install from the start.
    fn fall_back(&mut self, reason: String) {
        self.delta_active = false;
        self.patcher = None;
        self.patch = Vec::new();
        self.report.fallback_used = true;
        self.report.fallback_reason = Some(reason);
        self.report.delta_used = false;
        self.image_pos = 0;
        self.durable = 0;
        self.hasher = Sha256::new();
        self.pending.clear();
        self.stage = if self.invalidated {
            Stage::ClearRecord
        } else {
            Stage::Invalidate
        };
    }

    fn fail(&mut self, e: InstallError) {
        if e.keeps_checkpoint() {
            self.queue.push_back((Action::Failed(e), None));
            self.stage = Stage::Failed;
        } else {
            self.stage = Stage::ClearThenFail(e);
        }
    }

    fn ask(&mut self, w: Wait, a: Action) -> Action {
        self.wait = Some(w);
        a
    }

    /// The next thing to do.
    pub fn poll(&mut self) -> Action {
        if let Some((a, w)) = self.queue.pop_front() {
            self.wait = w;
            return a;
        }
        if let Some(w) = self.wait {
            self.stage = Stage::Failed;
            return Action::Failed(InstallError::Protocol {
                want: "an answer to the previous action",
                got: format!("another poll while waiting for {w:?}"),
            });
        }
        let stage = std::mem::replace(&mut self.stage, Stage::Failed);
        match stage {
            Stage::VerifySource { pos, hasher, base } => {
                if pos < base.length {
                    let len = ((base.length - pos) as usize).min(IO_CHUNK);
                    self.stage = Stage::VerifySource { pos, hasher, base };
                    return self.ask(Wait::Source, Action::ReadSource { offset: pos, len });
                }
                if hasher.finalize()[..] != base.sha256[..] {
                    self.fall_back(format!(
                        "the running slot does not match its record (version {}), so the delta \
                         has no verified base",
                        base.version
                    ));
                } else {
                    self.stage = Stage::FetchPatch { base };
                }
                self.poll()
            }
            Stage::FetchPatch { base } => {
                let offset = self.patch.len() as u64;
                self.stage = Stage::FetchPatch { base };
                self.progress(Phase::FetchingPatch, offset, None);
                self.queue.push_back((
                    Action::Fetch {
                        input: Input::Patch,
                        offset,
                    },
                    Some(Wait::Data),
                ));
                self.poll()
            }
            Stage::Invalidate => {
                self.stage = Stage::Invalidate;
                self.ask(
                    Wait::Flags,
                    Action::SetFlags(FlagChange::Invalidate {
                        target: self.plan.target,
                        running: self.plan.running,
                    }),
                )
            }
            Stage::ClearRecord => {
                self.stage = Stage::ClearRecord;
                let offset = record::offset(self.plan.target_len);
                self.ask(
                    Wait::Write,
                    Action::Write {
                        offset,
                        data: vec![0; record::RECORD_SIZE as usize],
                    },
                )
            }
            Stage::Rehash { pos } => {
                self.stage = Stage::Rehash { pos };
                if pos < self.durable {
                    let len = ((self.durable - pos) as usize).min(IO_CHUNK);
                    return self.ask(Wait::Target, Action::ReadTarget { offset: pos, len });
                }
                self.stage = Stage::Stream;
                self.poll()
            }
            Stage::Stream => {
                self.stage = Stage::Stream;
                if let Some((offset, data)) = self.pending.pop_front() {
                    return self.ask(Wait::Write, Action::Write { offset, data });
                }
                if self.decoder.as_ref().is_some_and(|d| d.has_pending()) {
                    self.decode_piece();
                    return self.poll();
                }
                if self.input_done {
                    self.stage = Stage::EndFlush;
                } else if self.since_checkpoint >= self.plan.checkpoint_every {
                    self.stage = Stage::CheckpointFlush;
                } else {
                    let offset = self.input_pos;
                    return self.ask(
                        Wait::Data,
                        Action::Fetch {
                            input: Input::Full,
                            offset,
                        },
                    );
                }
                self.poll()
            }
            Stage::Patch => {
                self.stage = Stage::Patch;
                let step = match self.patcher.as_mut() {
                    Some(p) => p.step(),
                    None => Err(bspatch::PatchError::NotBsdiff),
                };
                match step {
                    Ok(bspatch::Step::NeedSource { offset, len }) => {
                        self.ask(Wait::Source, Action::ReadSource { offset, len })
                    }
                    Ok(bspatch::Step::Output(data)) => {
                        self.hasher.update(&data);
                        let offset = self.image_pos;
                        self.image_pos += data.len() as u64;
                        self.ask(Wait::Write, Action::Write { offset, data })
                    }
                    Ok(bspatch::Step::Done) => {
                        let got = digest_hex(&self.hasher);
                        if got != record::hex(&self.expected) {
                            self.fall_back(format!(
                                "the patched image does not match the expected digest (got \
                                 {got}): the patch is corrupt or made for another base"
                            ));
                        } else {
                            self.report.delta_used = true;
                            self.stage = Stage::EndFlush;
                        }
                        self.poll()
                    }
                    Err(e) => {
                        self.fall_back(format!("the patch could not be applied: {e}"));
                        self.poll()
                    }
                }
            }
            s @ (Stage::ClearRecordFlush
            | Stage::CheckpointFlush
            | Stage::EndFlush
            | Stage::RecordFlush) => {
                self.stage = s;
                self.ask(Wait::Flush, Action::Flush)
            }
            Stage::CheckpointSave => {
                let point = self
                    .resume_points
                    .iter()
                    .rev()
                    .find(|(_, img)| *img <= self.durable)
                    .copied();
                let newer = |img: u64, last: &Option<Checkpoint>| {
                    last.as_ref().is_none_or(|c| c.image_offset < img)
                };
                match point {
                    Some((input_offset, image_offset))
                        if newer(image_offset, &self.last_checkpoint) =>
                    {
                        let cp = Checkpoint {
                            target: self.plan.target,
                            sha256: record::hex(&self.expected),
                            source: self.plan.full.identity.clone(),
                            image_offset,
                            input_offset,
                            compressed: self.compressed == Some(true),
                        };
                        self.last_checkpoint = Some(cp.clone());
                        self.resume_points.retain(|(_, img)| *img >= image_offset);
                        self.stage = Stage::CheckpointSave;
                        self.ask(Wait::Checkpoint, Action::SaveCheckpoint(cp))
                    }
                    _ => {
                        self.stage = Stage::Stream;
                        self.poll()
                    }
                }
            }
            Stage::ReadBack { pos, hasher } => {
                if pos < self.image_pos {
                    let len = ((self.image_pos - pos) as usize).min(IO_CHUNK);
                    self.stage = Stage::ReadBack { pos, hasher };
                    return self.ask(Wait::Target, Action::ReadTarget { offset: pos, len });
                }
                let got = record::hex(&hasher.finalize());
                if got != record::hex(&self.expected) {
                    self.fail(InstallError::ReadBackMismatch {
                        slot: self.plan.target,
                        expected: record::hex(&self.expected),
                        got,
                    });
                } else {
                    self.stage = Stage::WriteRecord;
                }
                self.poll()
            }
            Stage::WriteRecord => {
                self.stage = Stage::WriteRecord;
                let rec = SlotRecord {
                    version: self.plan.version.clone(),
                    length: self.image_pos,
                    sha256: self.expected,
                    verity: self.verity_probe.take().and_then(VerityProbe::finish),
                };
                let offset = record::offset(self.plan.target_len);
                self.ask(
                    Wait::Write,
                    Action::Write {
                        offset,
                        data: rec.encode(),
                    },
                )
            }
            Stage::Activate => {
                self.stage = Stage::Activate;
                self.progress(Phase::Activating, self.image_pos, Some(self.image_pos));
                self.queue.push_back((
                    Action::SetFlags(FlagChange::Activate {
                        target: self.plan.target,
                        running: self.plan.running,
                        tries: self.plan.tries,
                    }),
                    Some(Wait::Flags),
                ));
                self.poll()
            }
            Stage::ClearCheckpoint => {
                self.stage = Stage::ClearCheckpoint;
                self.ask(Wait::Checkpoint, Action::ClearCheckpoint)
            }
            Stage::Done => {
                self.report.image_len = self.image_pos;
                if self.report.delta_used {
                    self.report.bytes_saved = self
                        .plan
                        .full
                        .fetch_size
                        .map_or(0, |s| s.saturating_sub(self.report.patch_bytes));
                }
                self.progress(Phase::Staged, self.image_pos, Some(self.image_pos));
                self.queue
                    .push_back((Action::Done(self.report.clone()), None));
                self.stage = Stage::Failed;
                self.poll()
            }
            Stage::ClearThenFail(e) => {
                self.stage = Stage::ClearThenFail(e);
                self.ask(Wait::Checkpoint, Action::ClearCheckpoint)
            }
            Stage::Failed => Action::Failed(InstallError::Protocol {
                want: "no more polls",
                got: "a poll after the install ended".into(),
            }),
        }
    }

    /// The answer to the last action.
    pub fn handle(&mut self, ev: Event) {
        let Some(w) = self.wait.take() else {
            self.fail(InstallError::Protocol {
                want: "no event (nothing was asked)",
                got: format!("{ev:?}").chars().take(80).collect(),
            });
            return;
        };
        let stage = std::mem::replace(&mut self.stage, Stage::Failed);
        match (w, ev, stage) {
            (_, Event::IoFailed(e), _) => self.fail(InstallError::Io(e)),
            (Wait::Data, Event::InputFailed(e), Stage::FetchPatch { .. }) => {
                self.fall_back(format!("the patch could not be fetched: {e}"))
            }
            (Wait::Data, Event::InputFailed(e), _) => self.fail(InstallError::Input(e)),
            (Wait::Flags, Event::FlagsSet, Stage::Invalidate) => {
                self.invalidated = true;
                self.stage = Stage::ClearRecord;
            }
            (Wait::Flags, Event::FlagsSet, Stage::Activate) => self.stage = Stage::ClearCheckpoint,
            (Wait::Write, Event::WriteDone, Stage::ClearRecord) => {
                self.stage = Stage::ClearRecordFlush
            }
            (Wait::Flush, Event::FlushDone, Stage::ClearRecordFlush) => {
                self.stage = if self.durable > 0 {
                    Stage::Rehash { pos: 0 }
                } else if self.delta_active && self.patcher.is_some() {
                    Stage::Patch
                } else {
                    Stage::Stream
                };
            }
            (Wait::Write, Event::WriteDone, s @ (Stage::Stream | Stage::Patch)) => {
                let total = match &s {
                    Stage::Patch => self.patcher.as_ref().map(|p| p.new_size()),
                    _ => self.plan.full.image_len,
                };
                let done =
                    self.image_pos - self.pending.iter().map(|p| p.1.len() as u64).sum::<u64>();
                self.since_checkpoint = done.saturating_sub(self.durable);
                self.progress(Phase::Writing, done, total);
                self.stage = s;
            }
            (Wait::Write, Event::WriteDone, Stage::WriteRecord) => self.stage = Stage::RecordFlush,
            (Wait::Flush, Event::FlushDone, Stage::CheckpointFlush) => {
                self.durable = self.image_pos;
                self.since_checkpoint = 0;
                self.stage = Stage::CheckpointSave;
            }
            (Wait::Flush, Event::FlushDone, Stage::EndFlush) => {
                self.durable = self.image_pos;
                self.verity_probe = VerityProbe::new(self.image_pos);
                self.progress(Phase::Verifying, 0, Some(self.image_pos));
                self.stage = Stage::ReadBack {
                    pos: 0,
                    hasher: Sha256::new(),
                };
            }
            (Wait::Flush, Event::FlushDone, Stage::RecordFlush) => self.stage = Stage::Activate,
            (Wait::Target, Event::TargetBytes(b), Stage::Rehash { pos }) => {
                let want = ((self.durable - pos) as usize).min(IO_CHUNK);
                if b.len() != want {
                    return self.fail(InstallError::Io(format!(
                        "short read: {} of {want} bytes",
                        b.len()
                    )));
                }
                self.hasher.update(&b);
                self.stage = Stage::Rehash {
                    pos: pos + b.len() as u64,
                };
            }
            (Wait::Target, Event::TargetBytes(b), Stage::ReadBack { pos, mut hasher }) => {
                let want = ((self.image_pos - pos) as usize).min(IO_CHUNK);
                if b.len() != want {
                    return self.fail(InstallError::Io(format!(
                        "short read: {} of {want} bytes",
                        b.len()
                    )));
                }
                hasher.update(&b);
                if let Some(p) = self.verity_probe.as_mut() {
                    p.see(pos, &b);
                }
                let pos = pos + b.len() as u64;
                if pos.is_multiple_of(64 << 20) || pos == self.image_pos {
                    self.progress(Phase::Verifying, pos, Some(self.image_pos));
                }
                self.stage = Stage::ReadBack { pos, hasher };
            }
            (
                Wait::Source,
                Event::SourceBytes(b),
                Stage::VerifySource {
                    pos,
                    mut hasher,
                    base,
                },
            ) => {
                let want = ((base.length - pos) as usize).min(IO_CHUNK);
                if b.len() != want {
                    return self.fail(InstallError::Io(format!(
                        "short read: {} of {want} bytes",
                        b.len()
                    )));
                }
                hasher.update(&b);
                self.stage = Stage::VerifySource {
                    pos: pos + b.len() as u64,
                    hasher,
                    base,
                };
            }
            (Wait::Source, Event::SourceBytes(b), Stage::Patch) => {
                if let Some(p) = self.patcher.as_mut() {
                    p.source(b);
                }
                self.stage = Stage::Patch;
            }
            (Wait::Data, Event::Data(b), Stage::FetchPatch { base }) => {
                self.patch.extend_from_slice(&b);
                self.report.patch_bytes = self.patch.len() as u64;
                let signed = self.patch_expect().map(|e| e.size);
                if self.patch.len() as u64 > self.capacity() {
                    self.fall_back("the patch is larger than the slot it would fill".into());
                } else if let Some(size) = signed.filter(|s| self.patch.len() as u64 > *s) {
                    self.fall_back(format!(
                        "the patch is larger than the {size} bytes the signed manifest gives"
                    ));
                } else {
                    self.stage = Stage::FetchPatch { base };
                }
            }
            (Wait::Data, Event::EndOfInput, Stage::FetchPatch { base }) => {
                let patch = std::mem::take(&mut self.patch);
                if let Some(e) = self.patch_expect() {
                    let got: [u8; 32] = Sha256::digest(&patch).into();
                    if patch.len() as u64 != e.size || got != e.sha256 {
                        self.fall_back(format!(
                            "the patch ({} bytes, SHA-256 {}) is not the one the signed \
                             manifest gives ({} bytes, SHA-256 {}): it is corrupt or another \
                             release's",
                            patch.len(),
                            record::hex(&got),
                            e.size,
                            record::hex(&e.sha256)
                        ));
                        return;
                    }
                }
                match Patcher::new(patch, base.length, self.capacity()) {
                    Ok(p) if self.plan.full.image_len.is_some_and(|l| l != p.new_size()) => self
                        .fall_back(format!(
                            "the patch makes a {}-byte image, not the {}-byte image expected",
                            p.new_size(),
                            self.plan.full.image_len.unwrap_or(0)
                        )),
                    Ok(p) if p.new_size() == 0 => {
                        self.fall_back("the patch makes an empty image".into())
                    }
                    Ok(p) => {
                        self.patcher = Some(p);
                        self.stage = Stage::Invalidate;
                    }
                    Err(e) => self.fall_back(format!("the patch is unusable: {e}")),
                }
            }
            (Wait::Data, Event::Data(b), Stage::Stream) => {
                self.stage = Stage::Stream;
                self.take_data(b);
            }
            (Wait::Data, Event::EndOfInput, Stage::Stream) => {
                self.stage = Stage::Stream;
                self.end_of_image();
            }
            (Wait::Checkpoint, Event::CheckpointSaved, Stage::CheckpointSave) => {
                self.stage = Stage::Stream
            }
            (Wait::Checkpoint, Event::CheckpointSaved, Stage::ClearCheckpoint) => {
                self.stage = Stage::Done
            }
            (Wait::Checkpoint, Event::CheckpointSaved, Stage::ClearThenFail(e)) => {
                self.queue.push_back((Action::Failed(e), None));
                self.stage = Stage::Failed;
            }
            // the clearing of a discarded checkpoint, queued at the start
            (Wait::Checkpoint, Event::CheckpointSaved, s) => self.stage = s,
            (w, ev, _) => {
                let got: String = format!("{ev:?}").chars().take(80).collect();
                self.fail(InstallError::Protocol {
                    want: match w {
                        Wait::Flags => "FlagsSet",
                        Wait::Write => "WriteDone",
                        Wait::Flush => "FlushDone",
                        Wait::Target => "TargetBytes",
                        Wait::Source => "SourceBytes",
                        Wait::Data => "Data or EndOfInput",
                        Wait::Checkpoint => "CheckpointSaved",
                    },
                    got,
                });
            }
        }
    }

    /// Bytes of the full image's input.
    fn take_data(&mut self, b: Vec<u8>) {
        if b.is_empty() {
            return;
        }
        if self.compressed.is_none() {
            let z = zframes::is_zstd(&b);
            self.compressed = Some(z);
            if z {
                match FrameDecoder::new() {
                    Ok(d) => self.decoder = Some(d),
                    Err(e) => return self.fail(InstallError::Corrupt(e.to_string())),
                }
                self.decoder_base = self.input_pos;
            }
        }
        let n = b.len() as u64;
        if let Some(d) = self.decoder.as_mut() {
            // Decoded a piece at a time in the Stream stage: a stream may expand 32,000 times.
            d.push(&b);
            self.input_pos += n;
            self.report.full_bytes += n;
            return self.decode_piece();
        }
        let before = self.image_pos;
        let (out, points) = (b, vec![(self.input_pos + n, before + n)]);
        self.input_pos += n;
        self.report.full_bytes += n;
        self.accept_output(before, out, points);
    }

    /// The next piece (at most IO_CHUNK bytes) of the compressed input pushed so far.
    fn decode_piece(&mut self) {
        let before = self.image_pos;
        let Some(d) = self.decoder.as_mut() else {
            return;
        };
        let dec = match d.decode(IO_CHUNK) {
            Ok(dec) => dec,
            Err(e) => return self.fail(InstallError::Corrupt(e)),
        };
        let base = self.decoder_base;
        let points = dec
            .boundaries
            .iter()
            .map(|(c, u)| (base + c, before + *u as u64))
            .collect();
        self.accept_output(before, dec.data, points);
    }

    fn accept_output(&mut self, before: u64, out: Vec<u8>, points: Vec<(u64, u64)>) {
        let end = before + out.len() as u64;
        let capacity = self.capacity();
        if end > capacity || self.plan.full.image_len.is_some_and(|l| end > l) {
            return self.fail(InstallError::TooLarge {
                slot: self.plan.target,
                image: end,
                capacity: self.plan.full.image_len.unwrap_or(capacity).min(capacity),
            });
        }
        self.hasher.update(&out);
        for (i, piece) in out.chunks(IO_CHUNK).enumerate() {
            self.pending
                .push_back((before + (i * IO_CHUNK) as u64, piece.to_vec()));
        }
        self.image_pos = end;
        self.resume_points.extend(points);
    }

    /// The full image's input has ended.
    fn end_of_image(&mut self) {
        if self.decoder.as_ref().is_some_and(|d| !d.at_boundary()) {
            return self.fail(InstallError::Truncated {
                got: self.image_pos,
                expected: "a whole number of zstd frames".into(),
            });
        }
        if let Some(len) = self.plan.full.image_len {
            if self.image_pos < len {
                return self.fail(InstallError::Truncated {
                    got: self.image_pos,
                    expected: len.to_string(),
                });
            }
        }
        if self.image_pos == 0 {
            return self.fail(InstallError::EmptyImage);
        }
        let got = digest_hex(&self.hasher);
        if got != record::hex(&self.expected) {
            return self.fail(InstallError::DigestMismatch {
                expected: record::hex(&self.expected),
                got,
            });
        }
        self.input_done = true;
    }
}
