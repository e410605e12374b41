//! The agent's install driver: runs the update engine (src/update) for an InstallUpdate call,
//! with its inputs downloaded by [`crate::fetch`] and its progress published on the board.
//!
//! The engine's disk actions are performed by the engine's own driver (`update::driver::run`)
//! on a blocking thread; its Fetch actions are answered from HTTP downloads running on the async
//! runtime, resumed with Range requests at the offset the engine asks for (after a cut, or from
//! the engine's checkpoint after a restart). This module never decides what is written where:
//! the engine does.

use super::board::Ticket;
use super::proto;
use crate::block::{BlockDevice, FileDevice};
use crate::bootctl::Slot;
use crate::disk::Layout;
use crate::fetch::{Connect, Download, Fetcher, Limit};
use crate::update::bspatch::MAX_PATCH_LEN;
use crate::update::checkpoint::{CheckpointStore, FileStore};
use crate::update::driver::{self, Request};
use crate::update::engine::{Action, Event, Install, IO_CHUNK};
use crate::update::{FullImage, Input, Phase, Progress, Report, DEFAULT_CHECKPOINT_EVERY};
use bytes::Bytes;
use std::path::PathBuf;
use tokio::time::Instant;

/// What the update board holds for the install in progress (or the last one).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct InstallView {
    pub version: String,
    pub sha256: String,
    pub progress: proto::Progress,
    pub result: Option<proto::InstallResult>,
    /// Who vouched for the image (see [`super::trust::ReleasePlan::trust`]); copied into the
    /// result.
    pub trust: String,
}

/// One install as the agent received it (already validated).
#[derive(Debug, Clone)]
pub struct Job {
    pub disk: PathBuf,
    pub state_dir: PathBuf,
    pub running: Option<Slot>,
    pub full_url: String,
    pub delta_url: Option<String>,
    /// The delta's size and digest, when a signed release manifest gives them.
    pub delta_expect: Option<crate::update::PatchExpect>,
    pub sha256: String,
    pub version: String,
}

/// Answers the engine's Fetch actions from downloads.
struct NetInputs<C: Connect> {
    fetcher: Fetcher<C>,
    full_url: String,
    delta_url: Option<String>,
    current: Option<(Input, Download<C>)>,
    /// Bytes received but not yet handed to the engine, and their offset.
    leftover: Bytes,
    leftover_at: u64,
}

impl<C: Connect> NetInputs<C> {
    fn url(&self, input: Input) -> Result<String, String> {
        match input {
            Input::Full => Ok(self.full_url.clone()),
            Input::Patch => self
                .delta_url
                .clone()
                .ok_or_else(|| "no delta URL was given".to_string()),
        }
    }
}

impl<C: Connect> NetInputs<C> {
    /// Up to `buf.len()` bytes of `input` at `offset`; `Ok(0)` at its end.
    async fn read_at(
        &mut self,
        input: Input,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<usize, String> {
        let positioned =
            matches!(&self.current, Some((i, _)) if *i == input) && self.leftover_at == offset;
        if !positioned {
            // A new input, or the engine wants another offset (resume from its checkpoint):
            // open a download there (a Range request when offset > 0).
            let url = self.url(input)?;
            let d = match input {
                Input::Full => self.fetcher.get(&url, offset),
                // The engine holds the patch in memory whole.
                Input::Patch => self.fetcher.get_limited(
                    &url,
                    offset,
                    Limit {
                        bytes: self.fetcher.memory_limit().min(MAX_PATCH_LEN),
                        what: "a patch (held in memory whole)",
                        hint: "keel-agent --max-patch-size, at most 128 MiB",
                    },
                ),
            }
            .map_err(|e| e.to_string())?;
            self.current = Some((input, d));
            self.leftover = Bytes::new();
            self.leftover_at = offset;
        }
        if self.leftover.is_empty() {
            let Some((_, d)) = self.current.as_mut() else {
                return Err("no download open".into());
            };
            match d.next().await {
                Ok(Some(b)) => self.leftover = b,
                Ok(None) => return Ok(0),
                Err(e) => return Err(e.to_string()),
            }
        }
        let n = buf.len().min(self.leftover.len());
        buf[..n].copy_from_slice(&self.leftover[..n]);
        let _ = self.leftover.split_to(n);
        self.leftover_at += n as u64;
        Ok(n)
    }
}

fn phase(p: &Progress) -> proto::Phase {
    match p.phase {
        Phase::VerifyingSource => proto::Phase::Validating,
        Phase::FetchingPatch => proto::Phase::Downloading,
        Phase::Writing if p.delta => proto::Phase::Patching,
        Phase::Writing => proto::Phase::Downloading,
        Phase::Verifying => proto::Phase::Verifying,
        Phase::Activating => proto::Phase::Activating,
        Phase::Staged => proto::Phase::Done,
    }
}

fn result_of(r: &Report) -> proto::InstallResult {
    proto::InstallResult {
        ok: true,
        error: String::new(),
        bytes_saved: r.bytes_saved,
        fallback_used: r.fallback_used,
        fallback_reason: r.fallback_reason.clone().unwrap_or_default(),
        staged_slot: r.slot.letter().into(),
        sha256: r.sha256.clone(),
        version: r.version.clone(),
        trust: String::new(),
    }
}

/// Where the engine keeps its checkpoint on STATE.
pub fn checkpoint_path(state_dir: &std::path::Path) -> PathBuf {
    state_dir.join("update").join("checkpoint")
}

/// The engine driven to its end on `dev` (any block device) with its checkpoint in `store`,
/// its inputs downloaded by `fetcher`, on the current task: disk I/O runs inline, downloads are
/// awaited. keel-agent runs it on a blocking thread over the boot disk (see [`run`]); the
/// simulation (sim/) runs it on turmoil's network over crash-model disks.
pub async fn install_on<C: Connect, D: BlockDevice + ?Sized>(
    job: &Job,
    fetcher: Fetcher<C>,
    fetch_size: Option<u64>,
    disk: OnDisk<'_, D>,
    on_progress: &mut (dyn FnMut(&Progress) + Send),
) -> Result<Report, String> {
    let OnDisk {
        dev,
        store,
        checkpoint_every,
        mounted,
    } = disk;
    let req = Request {
        sha256: job.sha256.clone(),
        version: job.version.clone(),
        tries: crate::bootctl::DEFAULT_TRIES,
        full: FullImage {
            identity: job.full_url.clone(),
            fetch_size,
            image_len: None,
        },
        delta: job.delta_url.clone(),
        delta_expect: job.delta_expect,
        checkpoint_every,
    };
    let (layout, plan) = driver::plan(&*dev, job.running, req).map_err(|e| e.to_string())?;
    let mut inputs = NetInputs {
        fetcher,
        full_url: job.full_url.clone(),
        delta_url: job.delta_url.clone(),
        current: None,
        leftover: Bytes::new(),
        leftover_at: 0,
    };
    let saved = store.get().map_err(|e| e.to_string())?;
    let target = layout.root(plan.target).clone();
    let target_slot = plan.target;
    let source = plan.running.map(|r| layout.root(r).clone());
    let mut inst = Install::new(plan, saved.as_deref()).map_err(|e| e.to_string())?;
    let mut buf = vec![0u8; IO_CHUNK];
    let mut root_checked = false;
    loop {
        let ev = match inst.poll() {
            Action::Progress(p) => {
                on_progress(&p);
                continue;
            }
            Action::Done(mut r) => {
                // The size probe before the install got no answer (a flaky network; found by
                // the simulation's soak): ask once more now that the delta is in, so that
                // bytes_saved is known. It stays 0 (unknown) if this is not answered either.
                if r.delta_used && fetch_size.is_none() {
                    if let Ok(Some(full)) = inputs.fetcher.size(&job.full_url).await {
                        r.bytes_saved = full.saturating_sub(r.patch_bytes);
                    }
                }
                return Ok(r);
            }
            Action::Failed(e) => return Err(e.to_string()),
            Action::Fetch { input, offset } => {
                match inputs.read_at(input, offset, &mut buf).await {
                    Ok(0) => Event::EndOfInput,
                    Ok(n) => Event::Data(buf[..n].to_vec()),
                    Err(e) => Event::InputFailed(e),
                }
            }
            other => {
                let writes = matches!(other, Action::SetFlags(_) | Action::Write { .. });
                if writes && !root_checked {
                    mounted.refuse_target(&job.disk, &layout, target_slot)?;
                    root_checked = true;
                }
                driver::perform(&mut *dev, &target, source.as_ref(), store, other)
            }
        };
        inst.handle(ev);
    }
}

/// The disk side of an install: the device, where its checkpoint lives and how often it is
/// saved, and the guard against writing the mounted root.
pub struct OnDisk<'a, D: ?Sized> {
    pub dev: &'a mut D,
    pub store: &'a mut (dyn CheckpointStore + Send),
    pub checkpoint_every: u64,
    pub mounted: &'a MountedRoot,
}

impl<D: ?Sized> std::fmt::Debug for OnDisk<'_, D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OnDisk")
            .field("checkpoint_every", &self.checkpoint_every)
            .field("mounted", self.mounted)
            .finish_non_exhaustive()
    }
}

/// Where the running root file system is mounted from, asked right before an install's first
/// write (the flag change that invalidates the target): the last line of defence should the
/// agent's idea of the running slot be wrong, whatever the flags say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MountedRoot {
    /// Look in /proc/self/mountinfo and sysfs (keel-agent).
    System,
    /// A simulated node: the slot its simulated root is mounted from.
    Simulated(Option<Slot>),
}

impl MountedRoot {
    /// An error when `target`, about to be written, is the slot the root is mounted from.
    pub fn refuse_target(
        &self,
        disk: &std::path::Path,
        layout: &Layout,
        target: Slot,
    ) -> Result<(), String> {
        let mounted = match self {
            MountedRoot::System => crate::control::boot::mounted_root_slot(disk, layout),
            MountedRoot::Simulated(s) => *s,
        };
        if mounted == Some(target) {
            return Err(format!(
                "refusing to write slot {target}: the running root file system is mounted from \
                 it; nothing was written. The agent took the wrong slot for the running one: \
                 restart keel-agent (it re-reads the boot record) and report this"
            ));
        }
        Ok(())
    }
}

/// Publishes the engine's progress on `ticket`.
fn progress_to(ticket: &Ticket<InstallView>, start: Instant) -> impl FnMut(&Progress) + Send + '_ {
    move |p: &Progress| {
        let secs = start.elapsed().as_secs_f64();
        let rate = if secs > 0.0 {
            (p.done as f64 / secs) as u64
        } else {
            0
        };
        let pr = proto::Progress {
            phase: phase(p) as i32,
            bytes_done: p.done,
            bytes_total: p.total.unwrap_or(0),
            rate_bytes_per_second: rate,
            detail: String::new(),
        };
        ticket.update(|v| v.progress = pr);
    }
}

/// [`run`] over any disk and checkpoint store, on the current task (the simulation's entry;
/// small images there need a smaller `checkpoint_every` to exercise resumes).
pub async fn run_on<C: Connect, D: BlockDevice + ?Sized>(
    job: Job,
    fetcher: Fetcher<C>,
    ticket: Ticket<InstallView>,
    dev: &mut D,
    store: &mut (dyn CheckpointStore + Send),
    checkpoint_every: u64,
    mounted: MountedRoot,
) {
    let fetch_size = fetcher.size(&job.full_url).await.ok().flatten();
    let outcome = {
        let mut on_progress = progress_to(&ticket, Instant::now());
        install_on(
            &job,
            fetcher,
            fetch_size,
            OnDisk {
                dev,
                store,
                checkpoint_every,
                mounted: &mounted,
            },
            &mut on_progress,
        )
        .await
    };
    finish(ticket, outcome);
}

/// Run `job` to its end, publishing on `ticket`. Returns when the install is staged or failed;
/// the ticket is finished either way.
pub async fn run<C: Connect>(job: Job, fetcher: Fetcher<C>, ticket: Ticket<InstallView>) {
    // The compressed full image's size, for bytes_saved (advisory: None if the server is mute).
    let fetch_size = fetcher.size(&job.full_url).await.ok().flatten();
    let rt = tokio::runtime::Handle::current();
    let ticket = std::sync::Arc::new(ticket);
    let t2 = ticket.clone();
    // The disk is a file or a block device: its I/O blocks, so the whole install runs on a
    // blocking thread, which polls the downloads through the runtime's handle.
    let outcome = tokio::task::spawn_blocking(move || -> Result<Report, String> {
        let cp_dir = job.state_dir.join("update");
        std::fs::create_dir_all(&cp_dir)
            .map_err(|e| format!("creating {}: {e}", cp_dir.display()))?;
        let mut store = FileStore::new(checkpoint_path(&job.state_dir));
        let mut dev = FileDevice::open(&job.disk, true)
            .map_err(|e| format!("opening the boot disk {}: {e}", job.disk.display()))?;
        let mut on_progress = progress_to(&t2, Instant::now());
        rt.block_on(install_on(
            &job,
            fetcher,
            fetch_size,
            OnDisk {
                dev: &mut dev,
                store: &mut store,
                checkpoint_every: DEFAULT_CHECKPOINT_EVERY,
                mounted: &MountedRoot::System,
            },
            &mut on_progress,
        ))
    })
    .await
    .unwrap_or_else(|e| Err(format!("the install task stopped: {e}")));
    let ticket = match std::sync::Arc::try_unwrap(ticket) {
        Ok(t) => t,
        // The blocking task has returned, so no other holder is left; if one were, dropping
        // the last reference still releases the board.
        Err(_) => return,
    };
    finish(ticket, outcome);
}

/// Publish the end of an install on its ticket.
fn finish(ticket: Ticket<InstallView>, outcome: Result<Report, String>) {
    match outcome {
        Ok(r) => ticket.finish(|v| {
            v.progress.phase = proto::Phase::Done as i32;
            v.result = Some(proto::InstallResult {
                trust: v.trust.clone(),
                ..result_of(&r)
            });
        }),
        Err(e) => ticket.finish(|v| {
            v.progress.phase = proto::Phase::Failed as i32;
            v.result = Some(proto::InstallResult {
                ok: false,
                error: e,
                sha256: v.sha256.clone(),
                version: v.version.clone(),
                trust: v.trust.clone(),
                ..Default::default()
            });
        }),
    }
}
