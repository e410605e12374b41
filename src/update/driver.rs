//! The blocking driver: runs an [`Install`] against a disk (any [`BlockDevice`]) with inputs
//! read through [`InputSource`]. Used by the offline tool, keel-init's tests and the crash
//! harnesses; keel-agent has an async driver of its own over the same engine.

use super::checkpoint::CheckpointStore;
use super::engine::{
    Action, Delta, Event, FullImage, Input, Install, InstallError, InstallPlan, PatchExpect,
};
use super::{record, Progress, Report};
use crate::block::{read_vec, BlockDevice, Window};
use crate::bootctl::{store, Slot, SlotFlags};
use crate::disk::{self, Layout, Partition};

/// Where the bytes of an install come from.
pub trait InputSource {
    /// Up to `buf.len()` bytes of `input` starting at `offset`; `Ok(0)` at its end.
    fn read_at(&mut self, input: Input, offset: u64, buf: &mut [u8]) -> Result<usize, String>;
}

/// Inputs held in memory (tests and simulations).
#[derive(Debug, Clone, Default)]
pub struct MemInputs {
    pub full: Vec<u8>,
    pub patch: Option<Vec<u8>>,
    /// Largest piece returned by one read.
    pub chunk: usize,
}

impl InputSource for MemInputs {
    fn read_at(&mut self, input: Input, offset: u64, buf: &mut [u8]) -> Result<usize, String> {
        let src = match input {
            Input::Full => &self.full,
            Input::Patch => self.patch.as_ref().ok_or("no patch was given")?,
        };
        let start = (offset as usize).min(src.len());
        let n = buf.len().min(src.len() - start).min(self.chunk.max(1));
        buf[..n].copy_from_slice(&src[start..start + n]);
        Ok(n)
    }
}

/// Inputs read from files (the offline tool).
#[derive(Debug)]
pub struct FileInputs {
    pub full: std::fs::File,
    pub patch: Option<std::fs::File>,
}

impl InputSource for FileInputs {
    fn read_at(&mut self, input: Input, offset: u64, buf: &mut [u8]) -> Result<usize, String> {
        use std::os::unix::fs::FileExt;
        let f = match input {
            Input::Full => &self.full,
            Input::Patch => self.patch.as_ref().ok_or("no patch was given")?,
        };
        f.read_at(buf, offset).map_err(|e| e.to_string())
    }
}

/// What an install is asked to do, before the disk is consulted.
#[derive(Debug, Clone)]
pub struct Request {
    pub sha256: String,
    pub version: String,
    pub tries: u8,
    pub full: FullImage,
    /// The patch's identity, for a delta install.
    pub delta: Option<String>,
    /// The patch's size and digest from a signed release manifest.
    pub delta_expect: Option<PatchExpect>,
    pub checkpoint_every: u64,
}

/// The slot an install treats as running on a disk that is not booted (the offline tool, a
/// host-side agent): the slot holding the last image that booted successfully. The boot stage
/// may prefer a staged slot that has not booted yet; that slot is the target of a re-issued
/// install, never its source, so the known-good slot is never invalidated while the staged
/// one is still unproven.
pub fn running_slot(flags: SlotFlags) -> Option<Slot> {
    match flags.preferred() {
        Some(p) if flags.get(p).successful() => Some(p),
        Some(p) if flags.get(p.other()).successful() => Some(p.other()),
        other => other,
    }
}

/// Turn a request into a plan for this disk: the target is the slot that is not running (A on
/// a disk where nothing boots yet), the delta's base is the running slot's record.
pub fn plan<D: BlockDevice + ?Sized>(
    dev: &D,
    running: Option<Slot>,
    req: Request,
) -> Result<(Layout, InstallPlan), InstallError> {
    let (layout, flags) = store::load(dev).map_err(|e| InstallError::Io(e.to_string()))?;
    let target = running.map_or(Slot::A, Slot::other);
    let source_len = running.map_or(0, |r| layout.root(r).len);
    let delta = match req.delta {
        Some(identity) => {
            let base = match running {
                Some(r) => read_record(dev, &layout, r)?,
                None => None,
            };
            Some(Delta {
                identity,
                base,
                expect: req.delta_expect,
            })
        }
        None => None,
    };
    let plan = InstallPlan {
        target,
        running,
        flags,
        target_len: layout.root(target).len,
        source_len,
        sha256: req.sha256,
        version: req.version,
        tries: req.tries,
        full: req.full,
        delta,
        checkpoint_every: req.checkpoint_every,
    };
    Ok((layout, plan))
}

/// The record of `slot`, if it has an intact one.
pub fn read_record<D: BlockDevice + ?Sized>(
    dev: &D,
    layout: &Layout,
    slot: Slot,
) -> Result<Option<record::SlotRecord>, InstallError> {
    let p = layout.root(slot);
    let w = Window::new(dev, p.offset, p.len).map_err(|e| InstallError::Io(e.to_string()))?;
    record::read(&w).map_err(|e| InstallError::Io(e.to_string()))
}

/// Run an install to its end. `progress` sees every progress report.
pub fn run<D: BlockDevice + ?Sized>(
    dev: &mut D,
    layout: &Layout,
    plan: InstallPlan,
    inputs: &mut dyn InputSource,
    store_cp: &mut dyn CheckpointStore,
    progress: &mut dyn FnMut(&Progress),
) -> Result<Report, InstallError> {
    run_observed(
        dev,
        layout,
        plan,
        inputs,
        store_cp,
        progress,
        &mut |_, _| {},
    )
}

/// [`run`], showing `observe` the device and each action the engine asks for (but Progress)
/// before the action is carried out: where a crash harness checks what is still unflushed when
/// the flags change, or where a download starts.
pub fn run_observed<D: BlockDevice + ?Sized>(
    dev: &mut D,
    layout: &Layout,
    plan: InstallPlan,
    inputs: &mut dyn InputSource,
    store_cp: &mut dyn CheckpointStore,
    progress: &mut dyn FnMut(&Progress),
    observe: &mut dyn FnMut(&D, &Action),
) -> Result<Report, InstallError> {
    let saved = store_cp.get().map_err(InstallError::Io)?;
    let target = layout.root(plan.target).clone();
    let source = plan.running.map(|r| layout.root(r).clone());
    let mut inst = Install::new(plan, saved.as_deref())?;
    let mut buf = vec![0u8; super::engine::IO_CHUNK];
    loop {
        let action = inst.poll();
        if let Action::Progress(p) = &action {
            progress(p);
            continue;
        }
        observe(&*dev, &action);
        let ev = match action {
            Action::Done(r) => return Ok(r),
            Action::Failed(e) => return Err(e),
            Action::Fetch { input, offset } => match inputs.read_at(input, offset, &mut buf) {
                Ok(0) => Event::EndOfInput,
                Ok(n) => Event::Data(buf[..n].to_vec()),
                Err(e) => Event::InputFailed(e),
            },
            other => perform(&mut *dev, &target, source.as_ref(), store_cp, other),
        };
        inst.handle(ev);
    }
}

/// Answer one disk or checkpoint action of an install (everything but Progress, Fetch, Done
/// and Failed). Shared by [`run`] and the agent's async driver, so both do the same I/O.
pub fn perform<D: BlockDevice + ?Sized>(
    dev: &mut D,
    target: &Partition,
    source: Option<&Partition>,
    store_cp: &mut dyn CheckpointStore,
    action: Action,
) -> Event {
    match action {
        Action::SetFlags(change) => match store::update(&mut *dev, |f| change.apply(f)) {
            Ok(_) => Event::FlagsSet,
            Err(e) => Event::IoFailed(e.to_string()),
        },
        Action::Write { offset, data } => {
            match disk::partition_window(&mut *dev, target)
                .map_err(|e| e.to_string())
                .and_then(|mut w| w.write_at(offset, &data).map_err(|e| e.to_string()))
            {
                Ok(()) => Event::WriteDone,
                Err(e) => Event::IoFailed(e),
            }
        }
        Action::Flush => match dev.flush() {
            Ok(()) => Event::FlushDone,
            Err(e) => Event::IoFailed(e.to_string()),
        },
        // The target is read only after a flush (the read-back, or re-hashing what a resumed
        // install wrote before its checkpoint): its cached pages are dropped first, so what is
        // hashed is what the disk kept, not what the page cache still holds.
        Action::ReadTarget { offset, len } => {
            match Window::new(&*dev, target.offset, target.len)
                .map_err(|e| e.to_string())
                .and_then(|w| {
                    w.drop_cached(offset, len as u64)
                        .map_err(|e| e.to_string())?;
                    read_vec(&w, offset, len).map_err(|e| e.to_string())
                }) {
                Ok(b) => Event::TargetBytes(b),
                Err(e) => Event::IoFailed(e),
            }
        }
        Action::ReadSource { offset, len } => match source {
            Some(s) => match Window::new(&*dev, s.offset, s.len)
                .map_err(|e| e.to_string())
                .and_then(|w| read_vec(&w, offset, len).map_err(|e| e.to_string()))
            {
                Ok(b) => Event::SourceBytes(b),
                Err(e) => Event::IoFailed(e),
            },
            None => Event::IoFailed("no running slot to read a delta's source from".into()),
        },
        Action::SaveCheckpoint(cp) => match store_cp.put(&cp.to_bytes()) {
            Ok(()) => Event::CheckpointSaved,
            Err(e) => Event::IoFailed(e),
        },
        Action::ClearCheckpoint => match store_cp.clear() {
            Ok(()) => Event::CheckpointSaved,
            Err(e) => Event::IoFailed(e),
        },
        Action::Progress(_) | Action::Done(_) | Action::Failed(_) | Action::Fetch { .. } => {
            Event::IoFailed("internal: the driver handles this action itself".into())
        }
    }
}
