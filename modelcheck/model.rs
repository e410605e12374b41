//! One node as an explicit-state model: the disk (both slots' flags through the real `bootctl`
//! types, each slot's content in the abstract, unflushed writes), STATE's install checkpoint,
//! and the power state (off; up on a booted slot with its agent and an install in flight; or
//! bricked). Every flag change goes through the real pure core: `choose_boot`,
//! `FlagChange::apply` (`start_update`, `activate`), `mark_successful`, `mark_failed`,
//! `rollback`; the agent's running slot comes from `agent::running::establish`.

use crate::script::{self, ScriptKey, Shape, Start, Step, CHUNKS};
use keelos::agent::running::{establish, Evidence};
use keelos::bootctl::{self, policy, BootFlags, Slot, SlotFlags, SlotState, DEFAULT_TRIES};
use keelos::update::engine::FlagChange;
use stateright::{Model, Property};
use std::sync::Arc;

/// A released image: 1, 2, 3, ... (slot A runs version 1 at the start).
pub type Version = u8;

/// What a chunk of a slot holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Chunk {
    /// Zeros, a torn write, or bytes of no release (a bad server's).
    Garbage,
    Img(Version),
}

/// What a slot's record says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Rec {
    /// Zeroed or torn: no intact record.
    None,
    Img(Version),
}

/// A root slot's bytes, in the abstract.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SlotDisk {
    pub chunks: [Chunk; CHUNKS],
    pub record: Rec,
}

impl SlotDisk {
    pub const EMPTY: SlotDisk = SlotDisk {
        chunks: [Chunk::Garbage; CHUNKS],
        record: Rec::None,
    };
    pub fn image(v: Version) -> SlotDisk {
        SlotDisk {
            chunks: [Chunk::Img(v); CHUNKS],
            record: Rec::Img(v),
        }
    }
    /// The released version this slot holds whole, its bytes matching its record.
    pub fn holds(&self) -> Option<Version> {
        match self.record {
            Rec::Img(v) if self.chunks.iter().all(|c| *c == Chunk::Img(v)) => Some(v),
            _ => None,
        }
    }
}

/// A write the disk has accepted but not yet made durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Pending {
    pub slot: Slot,
    pub put: Put,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Put {
    Chunk(u8, Chunk),
    Record(Rec),
}

/// The install checkpoint on STATE (replaced atomically).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Saved {
    pub target: Slot,
    pub version: Version,
    pub chunks: u8,
}

/// The running slot as the agent holds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Belief {
    Slot(Slot),
    NoSlot,
    Unknown,
}

impl Belief {
    pub fn slot(self) -> Option<Slot> {
        match self {
            Belief::Slot(s) => Some(s),
            _ => None,
        }
    }
}

/// An install in flight: where it is in its steps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Run {
    pub version: Version,
    pub target: Slot,
    /// The running slot the agent gave the engine.
    pub running: Option<Slot>,
    pub server_good: bool,
    pub key: ScriptKey,
    pub pc: u8,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Agent {
    pub belief: Belief,
    pub install: Option<Run>,
}

/// Whether a booted image can become healthy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Health {
    /// A good release: keel-init marks it successful after its window.
    Good,
    /// A bad release whose agent serves but whose node never gets healthy: keel-init's
    /// deadline reboots it.
    Sick,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Up {
    /// The booted slot; the root is mounted from it.
    pub slot: Slot,
    pub version: Version,
    /// The boot spent a try (keel.boot=trial) and the slot is not yet marked successful.
    pub trial: bool,
    pub health: Health,
    pub agent: Agent,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Power {
    Off,
    Up(Up),
    /// The boot stage found no bootable slot.
    Bricked,
}

/// A safety violation seen on a transition (kept, so a property can name it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Broken {
    WroteMountedRoot,
    InvalidatedLastGood,
    BootedPartial,
    ReadBackDiverged,
}

/// Budgets spent so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Used {
    pub crashes: u8,
    pub restarts: u8,
    pub reboots: u8,
    pub ops: u8,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Node {
    /// The flags on disk (the boot flags of A and B; `SlotFlags` is not `Hash`).
    pub flags: [BootFlags; 2],
    /// Each slot's durable bytes.
    pub disk: [SlotDisk; 2],
    /// Writes not yet flushed, oldest first.
    pub pending: Vec<Pending>,
    pub checkpoint: Option<Saved>,
    pub power: Power,
    pub used: Used,
    pub broken: Option<Broken>,
    /// The liveness goal has held at some point on the way here.
    pub reached: bool,
}

fn idx(s: Slot) -> usize {
    match s {
        Slot::A => 0,
        Slot::B => 1,
    }
}

impl Node {
    pub fn flags(&self) -> SlotFlags {
        SlotFlags {
            a: self.flags[0],
            b: self.flags[1],
        }
    }
    fn set_flags(&mut self, f: SlotFlags) {
        self.flags = [f.a, f.b];
    }
    pub fn up(&self) -> Option<&Up> {
        match &self.power {
            Power::Up(u) => Some(u),
            _ => None,
        }
    }
    fn up_mut(&mut self) -> Option<&mut Up> {
        match &mut self.power {
            Power::Up(u) => Some(u),
            _ => None,
        }
    }
    /// A slot's bytes as a reader sees them now (durable, with the unflushed writes on top).
    pub fn view(&self, s: Slot) -> SlotDisk {
        let mut d = self.disk[idx(s)];
        for p in self.pending.iter().filter(|p| p.slot == s) {
            apply(&mut d, p.put);
        }
        d
    }
    /// Record a violation (the first one a transition makes).
    fn breaks(&mut self, b: Broken) {
        self.broken.get_or_insert(b);
    }
    fn flush(&mut self) {
        for p in std::mem::take(&mut self.pending) {
            apply(&mut self.disk[idx(p.slot)], p.put);
        }
    }
    /// The power is cut: each unflushed write is lost, kept, or torn (`fate`, base 3).
    fn cut(&mut self, mut fate: u32) {
        for p in std::mem::take(&mut self.pending) {
            let d = &mut self.disk[idx(p.slot)];
            match fate % 3 {
                0 => {}
                1 => apply(d, p.put),
                _ => apply(
                    d,
                    match p.put {
                        Put::Chunk(i, _) => Put::Chunk(i, Chunk::Garbage),
                        Put::Record(_) => Put::Record(Rec::None),
                    },
                ),
            }
            fate /= 3;
        }
        self.power = Power::Off;
    }
    /// Some slot is bootable and holds a whole released image matching its record, with no
    /// write to it outstanding.
    pub fn has_good_fallback(&self) -> bool {
        Slot::ALL.iter().any(|&s| {
            self.flags[idx(s)].bootable()
                && self.disk[idx(s)].holds().is_some()
                && !self.pending.iter().any(|p| p.slot == s)
        })
    }
}

/// A bound of this many means none: the counter is not kept, so the state space stays finite.
pub const UNBOUNDED: u8 = u8::MAX;

/// Whether one more of what `used` counts is within `bound`; counts it if so.
fn spend(used: &mut u8, bound: u8) -> bool {
    if bound == UNBOUNDED {
        return true;
    }
    if *used >= bound {
        return false;
    }
    *used += 1;
    true
}

fn apply(d: &mut SlotDisk, put: Put) {
    match put {
        Put::Chunk(i, c) => d.chunks[i as usize] = c,
        Put::Record(r) => d.record = r,
    }
}

/// Bugs that can be put back, to show the checker finds them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mutation {
    None,
    /// After a restart the agent takes the slot the flags prefer for the running one (the bug
    /// `agent::running` fixed), instead of establishing it from the boot.
    AgentBelievesPreferred,
    /// The agent admits installs while the running slot is on trial.
    InstallDuringTrial,
    /// Both: the agent before either fix.
    Both,
}

/// Which rule the agent uses to refuse installs during a trial.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TrialRule {
    /// `bootctl::policy::admit_install`: refused while the running slot is not successful.
    Policy,
    /// The rule `agent/service.rs` (InstallUpdate) had before it used the policy: refused
    /// while the running slot's state is `Trying`.
    StateIsTrying,
}

/// What liveness goal a configuration is checked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Goal {
    /// A good update to this version ends up running and marked successful.
    GoodUpdate(Version),
    /// A bad update to `bad` ends with version 1 running again and the bad slot failed.
    BadRollsBack { bad: Version },
}

#[derive(Debug, Clone)]
pub struct Config {
    /// Released versions are 1..=versions.
    pub versions: u8,
    /// A release that boots but never gets healthy (or panics, or does not mount).
    pub bad: Option<Version>,
    /// Power cuts and hangs of good boots (watchdog resets).
    pub crashes: u8,
    pub restarts: u8,
    /// Operator reboots (unbounded in a liveness run: they are part of the fair operator).
    pub reboots: u8,
    /// Operator installs and rollbacks (in a liveness run: all but the goal's install).
    pub ops: u8,
    /// Whether the update server may serve bytes that do not match the digest.
    pub bad_server: bool,
    pub mutation: Mutation,
    pub trial_rule: TrialRule,
    /// The agent's last guard: refuse to write the slot the root is mounted from.
    pub mounted_guard: bool,
    pub goal: Option<Goal>,
}

impl Config {
    pub fn describe(&self) -> String {
        let b = |x: u8| {
            if x == UNBOUNDED {
                "inf".to_string()
            } else {
                x.to_string()
            }
        };
        format!(
            "versions={} bad={} crashes<={} restarts<={} reboots<={} ops<={} bad_server={} \
             mutation={:?} trial_rule={:?} mounted_guard={} goal={:?}",
            self.versions,
            self.bad.map_or("none".into(), |v| format!("v{v}")),
            b(self.crashes),
            b(self.restarts),
            if self.goal.is_some() {
                "inf".into()
            } else {
                b(self.reboots)
            },
            b(self.ops),
            self.bad_server,
            self.mutation,
            self.trial_rule,
            self.mounted_guard,
            self.goal
        )
    }
}

/// How a boot goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Outcome {
    Healthy,
    /// A good image hangs; the watchdog resets the node (a fault, within the crash budget).
    Hang,
    /// A bad image: the agent serves, the node never gets healthy.
    NeverHealthy,
    /// A bad image: kernel panic or hang; the watchdog resets.
    Panic,
    /// The root does not mount; keel-init marks the slot failed and reboots.
    NoMount,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Act {
    Boot(Outcome),
    /// keel-init's stage 2 marks the booted slot successful, or clears a successful slot's count
    /// of boots without health (a flag writer concurrent with the agent's: each is one locked
    /// load-modify-commit, as `bootctl::store::update` makes it).
    MarkSuccessful,
    /// A boot that never got healthy: keel-init's deadline reboots (unflushed writes as in a cut).
    Deadline(u32),
    /// The install in flight takes its next step.
    Step,
    /// Power cut; the fate of each unflushed write (base 3: lost, kept, torn).
    Crash(u32),
    AgentRestart,
    Install {
        version: Version,
        server_good: bool,
    },
    Rollback,
    Reboot,
}

/// The model: a configuration, and the engine's shape learned from the real engine.
#[derive(Debug, Clone)]
pub struct NodeModel {
    pub cfg: Config,
    pub shape: Shape,
    scripts: Arc<Vec<(ScriptKey, Vec<Step>)>>,
}

impl NodeModel {
    pub fn new(cfg: Config) -> NodeModel {
        let shape = Shape {
            flush_after_clear: script::engine_flushes_after_record_clear(),
        };
        let scripts = script::all_keys()
            .into_iter()
            .map(|k| (k, script::steps(k, shape)))
            .collect();
        NodeModel {
            cfg,
            shape,
            scripts: Arc::new(scripts),
        }
    }

    pub fn steps(&self, key: ScriptKey) -> &[Step] {
        self.scripts
            .iter()
            .find(|(k, _)| *k == key)
            .map(|(_, s)| s.as_slice())
            .unwrap_or(&[])
    }

    pub fn init(&self) -> Node {
        let flags = SlotFlags::default();
        let flags = bootctl::activate(flags, Slot::A, None, DEFAULT_TRIES)
            .and_then(|f| bootctl::mark_successful(f, Slot::A))
            .unwrap_or(flags);
        let mut n = Node {
            flags: [flags.a, flags.b],
            disk: [SlotDisk::image(1), SlotDisk::EMPTY],
            pending: Vec::new(),
            checkpoint: None,
            power: Power::Off,
            used: Used::default(),
            broken: None,
            reached: false,
        };
        n.power = Power::Up(Up {
            slot: Slot::A,
            version: 1,
            trial: false,
            health: Health::Good,
            agent: self.agent_start(&n, Slot::A),
        });
        n.reached = self.goal_holds(&n);
        n
    }

    /// The agent starting on a node booted from `booted`.
    fn agent_start(&self, n: &Node, booted: Slot) -> Agent {
        let belief = match self.cfg.mutation {
            Mutation::AgentBelievesPreferred | Mutation::Both => match n.flags().preferred() {
                Some(s) => Belief::Slot(s),
                None => Belief::NoSlot,
            },
            _ => {
                let running = establish(&Evidence {
                    given: None,
                    record: Ok(Some(booted)),
                    mounted: Some(booted),
                    disk_is_file: false,
                    flags: n.flags(),
                });
                match running.for_change() {
                    Ok(Some(s)) => Belief::Slot(s),
                    Ok(None) => Belief::NoSlot,
                    Err(_) => Belief::Unknown,
                }
            }
        };
        Agent {
            belief,
            install: None,
        }
    }

    pub fn is_bad(&self, v: Version) -> bool {
        self.cfg.bad == Some(v)
    }

    pub fn goal_holds(&self, n: &Node) -> bool {
        let Some(u) = n.up() else { return false };
        match self.cfg.goal {
            None => false,
            Some(Goal::GoodUpdate(v)) => {
                u.version == v && n.flags[idx(u.slot)].successful() && !u.trial
            }
            Some(Goal::BadRollsBack { bad }) => {
                let o = u.slot.other();
                u.version == 1
                    && n.flags[idx(u.slot)].successful()
                    && n.disk[idx(o)].holds() == Some(bad)
                    && n.flags[idx(o)].state() == SlotState::Failed
            }
        }
    }

    /// Whether `act` is part of the fair, fault-free run (liveness is checked over these).
    pub fn fair(&self, act: &Act) -> bool {
        match act {
            Act::Crash(_) | Act::AgentRestart | Act::Rollback => false,
            Act::Boot(Outcome::Hang) => false,
            Act::Install {
                version,
                server_good,
            } => *server_good && self.goal_version() == Some(*version),
            Act::Boot(_) | Act::MarkSuccessful | Act::Deadline(_) | Act::Step | Act::Reboot => true,
        }
    }

    fn goal_version(&self) -> Option<Version> {
        match self.cfg.goal {
            Some(Goal::GoodUpdate(v)) | Some(Goal::BadRollsBack { bad: v }) => Some(v),
            None => None,
        }
    }

    /// Whether an operator install or rollback spends the ops budget.
    fn budgeted_op(&self, act: &Act) -> bool {
        match act {
            Act::Install {
                version,
                server_good,
            } => !(*server_good && self.goal_version() == Some(*version)),
            _ => true,
        }
    }

    fn fates(n: &Node) -> u32 {
        3u32.pow(n.pending.len() as u32)
    }

    /// The install admission of the agent's InstallUpdate handler.
    fn admit(&self, n: &Node, a: &Agent) -> Option<Run> {
        let running = match a.belief {
            Belief::Unknown => return None,
            b => b.slot(),
        };
        let flags = n.flags();
        let admitted = match (self.cfg.mutation, self.cfg.trial_rule) {
            (Mutation::InstallDuringTrial | Mutation::Both, _) => true,
            (_, TrialRule::Policy) => policy::admit_install(flags, running).is_ok(),
            (_, TrialRule::StateIsTrying) => {
                running.is_none_or(|r| flags.get(r).state() != SlotState::Trying)
            }
        };
        if !admitted || a.install.is_some() {
            return None;
        }
        Some(Run {
            version: 0,
            target: running.map_or(Slot::A, Slot::other),
            running,
            server_good: true,
            key: ScriptKey {
                start: Start::Fresh,
                digest_ok: true,
            },
            pc: 0,
        })
    }

    /// The steps of an install starting now, as `Install::new` decides from the checkpoint.
    fn start(&self, n: &Node, mut run: Run) -> Run {
        let target_invalid = n.flags[idx(run.target)].state() == SlotState::Invalid;
        let start = match n.checkpoint {
            Some(c) if c.target == run.target && c.version == run.version && target_invalid => {
                Start::Resume(c.chunks)
            }
            Some(_) => Start::Discard,
            None => Start::Fresh,
        };
        let prefix_ok = match start {
            Start::Resume(k) => n.view(run.target).chunks[..k as usize]
                .iter()
                .all(|c| *c == Chunk::Img(run.version)),
            _ => true,
        };
        run.key = ScriptKey {
            start,
            digest_ok: run.server_good && prefix_ok,
        };
        run
    }

    /// One install step on `n`. `None` when the model has no such step (a bug in the model).
    fn step(&self, n: &mut Node) -> Option<()> {
        let u = *n.up()?;
        let mut run = u.agent.install?;
        let step = *self.steps(run.key).get(run.pc as usize)?;
        run.pc += 1;
        let writes_target = matches!(
            step,
            Step::Invalidate | Step::ClearRecord | Step::Write(_) | Step::WriteRecord
        );
        if writes_target && run.target == u.slot {
            if self.cfg.mounted_guard {
                // install_on's guard before the first write: the install fails, nothing written
                n.up_mut()?.agent.install = None;
                return Some(());
            }
            n.breaks(Broken::WroteMountedRoot);
        }
        let mut end = false;
        match step {
            Step::DiscardCheckpoint | Step::ClearCheckpoint => n.checkpoint = None,
            Step::Invalidate => {
                let f = n.flags();
                let (t, o) = (f.get(run.target), f.get(run.target.other()));
                if t.successful() && !o.successful() {
                    n.breaks(Broken::InvalidatedLastGood);
                }
                let change = FlagChange::Invalidate {
                    target: run.target,
                    running: run.running,
                };
                match change.apply(f) {
                    Ok(new) => {
                        n.flush(); // store::update flushes the device
                        n.set_flags(new);
                    }
                    Err(_) => end = true, // IoFailed: the install fails
                }
            }
            Step::Activate => {
                let change = FlagChange::Activate {
                    target: run.target,
                    running: run.running,
                    tries: DEFAULT_TRIES,
                };
                match change.apply(n.flags()) {
                    Ok(new) => {
                        n.flush();
                        n.set_flags(new);
                    }
                    Err(_) => end = true,
                }
            }
            Step::ClearRecord => n.pending.push(Pending {
                slot: run.target,
                put: Put::Record(Rec::None),
            }),
            Step::WriteRecord => n.pending.push(Pending {
                slot: run.target,
                put: Put::Record(Rec::Img(run.version)),
            }),
            Step::Write(i) => n.pending.push(Pending {
                slot: run.target,
                put: Put::Chunk(
                    i,
                    if run.server_good {
                        Chunk::Img(run.version)
                    } else {
                        Chunk::Garbage
                    },
                ),
            }),
            Step::Flush => n.flush(),
            Step::SaveCheckpoint(k) => {
                n.checkpoint = Some(Saved {
                    target: run.target,
                    version: run.version,
                    chunks: k,
                })
            }
            Step::ReadBack => {
                if n.view(run.target).chunks != [Chunk::Img(run.version); CHUNKS] {
                    n.breaks(Broken::ReadBackDiverged);
                }
            }
            Step::Rehash | Step::Fetch => {}
            Step::Done | Step::Failed => end = true,
        }
        n.up_mut()?.agent.install = if end { None } else { Some(run) };
        Some(())
    }

    fn boot(&self, n: &mut Node, o: Outcome) -> Option<()> {
        let choice = match bootctl::choose_boot(n.flags()) {
            Ok(c) => c,
            Err(_) => {
                // nothing bootable: the only outcome
                if o != Outcome::NoMount {
                    return None;
                }
                n.power = Power::Bricked;
                return Some(());
            }
        };
        n.set_flags(choice.flags);
        let held = n.disk[idx(choice.slot)].holds();
        let allowed: &[Outcome] = match held {
            None => &[Outcome::NoMount],
            Some(v) if self.is_bad(v) => &[Outcome::NeverHealthy, Outcome::Panic, Outcome::NoMount],
            Some(_) => &[Outcome::Healthy, Outcome::Hang],
        };
        if !allowed.contains(&o) {
            return None;
        }
        if held.is_none() {
            n.breaks(Broken::BootedPartial);
        }
        match o {
            Outcome::Hang => {
                if !spend(&mut n.used.crashes, self.cfg.crashes) {
                    return None;
                }
            }
            Outcome::Panic => {}
            Outcome::NoMount => {
                n.set_flags(bootctl::mark_failed(n.flags(), choice.slot));
            }
            Outcome::Healthy | Outcome::NeverHealthy => {
                let agent = self.agent_start(n, choice.slot);
                n.power = Power::Up(Up {
                    slot: choice.slot,
                    version: held?,
                    trial: choice.tried,
                    health: if o == Outcome::Healthy {
                        Health::Good
                    } else {
                        Health::Sick
                    },
                    agent,
                });
            }
        }
        Some(())
    }
}

impl Model for NodeModel {
    type State = Node;
    type Action = Act;

    fn init_states(&self) -> Vec<Node> {
        vec![self.init()]
    }

    fn actions(&self, n: &Node, acts: &mut Vec<Act>) {
        if n.broken.is_some() {
            return; // a violation: nothing after it matters
        }
        match &n.power {
            Power::Bricked => {}
            Power::Off => {
                for o in [
                    Outcome::Healthy,
                    Outcome::Hang,
                    Outcome::NeverHealthy,
                    Outcome::Panic,
                    Outcome::NoMount,
                ] {
                    acts.push(Act::Boot(o));
                }
            }
            Power::Up(u) => {
                if u.agent.install.is_some() {
                    acts.push(Act::Step);
                }
                acts.push(Act::Reboot);
                // a trial is marked successful; a good boot of a successful slot clears its
                // count of boots without health
                if u.health == Health::Good
                    && (u.trial || bootctl::healthy_again(n.flags(), u.slot).is_some())
                {
                    acts.push(Act::MarkSuccessful);
                }
                if u.health == Health::Sick {
                    for f in 0..Self::fates(n) {
                        acts.push(Act::Deadline(f));
                    }
                }
                // newest first, so a shortest trace prefers an update to a re-install
                for version in (1..=self.cfg.versions).rev() {
                    for server_good in [true, false] {
                        if !server_good && !self.cfg.bad_server {
                            continue;
                        }
                        acts.push(Act::Install {
                            version,
                            server_good,
                        });
                    }
                }
                acts.push(Act::Rollback);
                // faults last, so that a shortest trace prefers what an operator does
                if self.cfg.crashes == UNBOUNDED || n.used.crashes < self.cfg.crashes {
                    for f in 0..Self::fates(n) {
                        acts.push(Act::Crash(f));
                    }
                }
                if self.cfg.restarts == UNBOUNDED || n.used.restarts < self.cfg.restarts {
                    acts.push(Act::AgentRestart);
                }
            }
        }
    }

    fn next_state(&self, last: &Node, act: Act) -> Option<Node> {
        let mut n = last.clone();
        match act {
            Act::Boot(o) => {
                if n.power != Power::Off {
                    return None;
                }
                self.boot(&mut n, o)?;
            }
            Act::MarkSuccessful => {
                let u = n.up_mut()?;
                let trial = std::mem::replace(&mut u.trial, false);
                let slot = u.slot;
                let f = if trial {
                    bootctl::mark_successful(n.flags(), slot).ok()
                } else {
                    bootctl::healthy_again(n.flags(), slot)
                };
                if let Some(f) = f {
                    n.flush();
                    n.set_flags(f);
                }
            }
            Act::Deadline(f) => n.cut(f),
            Act::Step => self.step(&mut n)?,
            Act::Crash(f) => {
                if !spend(&mut n.used.crashes, self.cfg.crashes) {
                    return None;
                }
                n.cut(f);
            }
            Act::AgentRestart => {
                if !spend(&mut n.used.restarts, self.cfg.restarts) {
                    return None;
                }
                let slot = n.up()?.slot;
                let agent = self.agent_start(&n, slot);
                n.up_mut()?.agent = agent; // the install in flight dies with it
            }
            Act::Install {
                version,
                server_good,
            } => {
                let budgeted = self.budgeted_op(&act);
                let u = *n.up()?;
                let mut run = self.admit(&n, &u.agent)?;
                run.version = version;
                run.server_good = server_good;
                let run = self.start(&n, run);
                if budgeted && !spend(&mut n.used.ops, self.cfg.ops) {
                    return None;
                }
                n.up_mut()?.agent.install = Some(run);
            }
            Act::Rollback => {
                let u = *n.up()?;
                if u.agent.install.is_some() {
                    return None;
                }
                let booted = u.agent.belief.slot()?;
                let f = bootctl::rollback(n.flags(), booted).ok()?;
                if !spend(&mut n.used.ops, self.cfg.ops) {
                    return None;
                }
                n.flush();
                n.set_flags(f);
            }
            Act::Reboot => {
                let u = *n.up()?;
                if u.agent.install.is_some() {
                    return None; // the agent refuses while an update runs
                }
                if self.cfg.goal.is_none() && !spend(&mut n.used.reboots, self.cfg.reboots) {
                    return None;
                }
                n.flush();
                n.power = Power::Off;
            }
        }
        if self.goal_holds(&n) {
            n.reached = true;
        }
        Some(n)
    }

    fn properties(&self) -> Vec<Property<Self>> {
        vec![
            Property::always(FALLBACK, |_, n: &Node| n.has_good_fallback()),
            Property::always(NO_WRITE_TO_MOUNTED, |_, n: &Node| {
                n.broken != Some(Broken::WroteMountedRoot)
            }),
            Property::always(LAST_GOOD_KEPT, |_, n: &Node| {
                n.broken != Some(Broken::InvalidatedLastGood)
            }),
            Property::always(BOOTS_WHOLE_IMAGES, |_, n: &Node| {
                n.broken != Some(Broken::BootedPartial)
            }),
            Property::always(READ_BACK_FAITHFUL, |_, n: &Node| {
                n.broken != Some(Broken::ReadBackDiverged)
            }),
        ]
    }
}

pub const FALLBACK: &str =
    "some slot is bootable and holds a whole released image matching its record";
pub const NO_WRITE_TO_MOUNTED: &str = "no write to the slot the root is mounted from";
pub const LAST_GOOD_KEPT: &str =
    "the last known-good slot is never invalidated while the other is unproven";
pub const BOOTS_WHOLE_IMAGES: &str = "a slot chosen to boot is never a partial write";
pub const READ_BACK_FAITHFUL: &str = "an install's read-back sees what it wrote";
