//! A/B boot flags: which root slot boots, how many tries a new slot has left, and whether it has
//! proven itself.
//!
//! The flags live in the GPT attribute bits of the two root entries, in the ChromeOS layout that
//! `cgpt`, Flatcar and Bottlerocket use: priority in bits 48-51, tries in 52-55, successful in 56.
//! Every transition here is a pure function from [`SlotFlags`] to [`SlotFlags`]: no I/O, no
//! clock. [`store`] reads and commits them on a disk through the crash-safe table writer.

pub mod policy;
pub mod store;

use serde::{Deserialize, Serialize};
use std::fmt;

/// One of the two root slots.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Slot {
    A,
    B,
}

impl Slot {
    pub const ALL: [Slot; 2] = [Slot::A, Slot::B];

    pub fn other(self) -> Slot {
        match self {
            Slot::A => Slot::B,
            Slot::B => Slot::A,
        }
    }

    /// The GPT partition label of the slot.
    pub fn label(self) -> &'static str {
        match self {
            Slot::A => crate::disk::ROOT_A,
            Slot::B => crate::disk::ROOT_B,
        }
    }

    pub fn letter(self) -> &'static str {
        match self {
            Slot::A => "a",
            Slot::B => "b",
        }
    }
}

impl fmt::Display for Slot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.letter())
    }
}

impl std::str::FromStr for Slot {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "a" | "A" => Ok(Slot::A),
            "b" | "B" => Ok(Slot::B),
            other => Err(format!("unknown slot {other:?}: expected a or b")),
        }
    }
}

const PRIORITY_SHIFT: u32 = 48;
const TRIES_SHIFT: u32 = 52;
const SUCCESSFUL_BIT: u64 = 1 << 56;
const NIBBLE: u64 = 0xF;

/// The highest value the 4-bit tries field holds.
pub const MAX_TRIES: u8 = 15;
/// The tries a newly activated slot gets unless told otherwise.
pub const DEFAULT_TRIES: u8 = 3;
/// How many boots in a row a slot already marked successful may fail to reach health before the
/// boot choice demotes it below the other slot (when that one is bootable).
pub const MAX_UNHEALTHY_BOOTS: u8 = 3;

/// The whole 64-bit GPT attribute word of a root entry. Only the boot bits are ever changed;
/// every other bit is carried through untouched.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct BootFlags(pub u64);

impl BootFlags {
    pub fn priority(self) -> u8 {
        ((self.0 >> PRIORITY_SHIFT) & NIBBLE) as u8
    }
    pub fn tries(self) -> u8 {
        ((self.0 >> TRIES_SHIFT) & NIBBLE) as u8
    }
    pub fn successful(self) -> bool {
        self.0 & SUCCESSFUL_BIT != 0
    }
    /// Whether the boot stage may choose this slot.
    pub fn bootable(self) -> bool {
        (self.priority() > 0 && self.tries() > 0) || self.successful()
    }
    /// What the flags mean for an operator.
    pub fn state(self) -> SlotState {
        if self.successful() {
            SlotState::Successful
        } else if self.priority() == 0 {
            SlotState::Invalid
        } else if self.tries() > 0 {
            SlotState::Trying
        } else {
            SlotState::Failed
        }
    }
    /// Values above 15 are clamped: the field has four bits.
    pub fn with_priority(self, p: u8) -> Self {
        let p = u64::from(p.min(15));
        BootFlags((self.0 & !(NIBBLE << PRIORITY_SHIFT)) | (p << PRIORITY_SHIFT))
    }
    /// Values above 15 are clamped: the field has four bits.
    pub fn with_tries(self, t: u8) -> Self {
        let t = u64::from(t.min(MAX_TRIES));
        BootFlags((self.0 & !(NIBBLE << TRIES_SHIFT)) | (t << TRIES_SHIFT))
    }
    pub fn with_successful(self, s: bool) -> Self {
        if s {
            BootFlags(self.0 | SUCCESSFUL_BIT)
        } else {
            BootFlags(self.0 & !SUCCESSFUL_BIT)
        }
    }
}

impl fmt::Debug for BootFlags {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "priority={} tries={} successful={}",
            self.priority(),
            self.tries(),
            u8::from(self.successful())
        )
    }
}

impl fmt::Display for BootFlags {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// A slot's condition, derived from its flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SlotState {
    /// Booted and marked healthy.
    Successful,
    /// Activated and still has tries left.
    Trying,
    /// Activated, ran out of tries without ever being marked successful.
    Failed,
    /// Invalidated (being written or never installed).
    Invalid,
}

/// The flags of both slots.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SlotFlags {
    pub a: BootFlags,
    pub b: BootFlags,
}

impl SlotFlags {
    pub fn get(&self, slot: Slot) -> BootFlags {
        match slot {
            Slot::A => self.a,
            Slot::B => self.b,
        }
    }
    pub fn with(mut self, slot: Slot, f: BootFlags) -> Self {
        match slot {
            Slot::A => self.a = f,
            Slot::B => self.b = f,
        }
        self
    }
    /// The slot the boot stage would choose now, without changing anything: the bootable slot
    /// with the highest priority (A on a tie).
    pub fn preferred(&self) -> Option<Slot> {
        let mut best: Option<Slot> = None;
        for s in Slot::ALL {
            let f = self.get(s);
            if f.bootable() && best.is_none_or(|b| f.priority() > self.get(b).priority()) {
                best = Some(s);
            }
        }
        best
    }
}

/// A boot flag change that was refused. Nothing was changed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FlagError {
    /// No slot is bootable: neither has tries left nor was ever marked successful.
    #[error(
        "no bootable slot: A has {a}, B has {b}; install an image and activate its slot \
         (keel-image install, or keel-image slots activate)"
    )]
    NoBootableSlot { a: BootFlags, b: BootFlags },
    /// The target of an update is the slot that is running.
    #[error("slot {slot} is the running slot; an update may only write the inactive slot")]
    TargetIsRunning { slot: Slot },
    /// Tries must fit the 4-bit field and be at least one.
    #[error("tries must be between 1 and {MAX_TRIES}, got {tries}")]
    TriesOutOfRange { tries: u8 },
    /// A rollback target that could not boot.
    #[error(
        "cannot roll back to slot {slot}: it is not bootable ({flags}); it has no verified \
         image or has used up its tries"
    )]
    RollbackTargetNotBootable { slot: Slot, flags: BootFlags },
    /// Only a slot that was activated can be marked successful.
    #[error(
        "cannot mark slot {slot} successful: it was invalidated ({flags}) and not activated \
         since"
    )]
    NotActivated { slot: Slot, flags: BootFlags },
}

/// What the boot stage decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BootChoice {
    pub slot: Slot,
    /// The flags to commit before the root is mounted (tries decremented when the slot has not
    /// yet been marked successful; the unhealthy-boot count raised when it has).
    pub flags: SlotFlags,
    /// Whether this boot spends one of the slot's tries.
    pub tried: bool,
    /// The successful slot this choice demoted: its last [`MAX_UNHEALTHY_BOOTS`] boots did not
    /// reach health, so the other slot boots instead.
    pub demoted: Option<Slot>,
}

/// The boot stage's choice: the highest-priority bootable slot.
///
/// If it has not yet been marked successful one of its tries is spent now, so a slot that keeps
/// failing stops being chosen and the other one boots again.
///
/// A slot already marked successful has no tries to spend; its tries field counts instead the
/// boots since it last reached health (stage 2 sets it back to 0 when the boot is healthy). A
/// successful slot that has started [`MAX_UNHEALTHY_BOOTS`] boots in a row without reaching
/// health (bit rot in its image, a corrupted block the verity target refused, anything that
/// keeps its services down) is demoted when the other slot is bootable: the other slot gets
/// priority 2, the demoted one priority 1 with its count cleared, so it stays the fallback. With
/// no other bootable slot it keeps being chosen: a node always has something to boot.
pub fn choose_boot(flags: SlotFlags) -> Result<BootChoice, FlagError> {
    let slot = flags.preferred().ok_or(FlagError::NoBootableSlot {
        a: flags.a,
        b: flags.b,
    })?;
    let f = flags.get(slot);
    if f.successful() {
        let other = flags.get(slot.other());
        // an other slot that is itself a successful slot at its limit is no way out: the two
        // would trade places on every boot
        let at_limit = |f: BootFlags| f.successful() && f.tries() >= MAX_UNHEALTHY_BOOTS;
        if at_limit(f) && other.bootable() && !at_limit(other) {
            let demoted = flags
                .with(slot, f.with_priority(1).with_tries(0))
                .with(slot.other(), other.with_priority(2));
            let next = choose_boot(demoted)?;
            return Ok(BootChoice {
                demoted: Some(slot),
                ..next
            });
        }
        return Ok(BootChoice {
            slot,
            flags: flags.with(slot, f.with_tries(f.tries().saturating_add(1))),
            tried: false,
            demoted: None,
        });
    }
    Ok(BootChoice {
        slot,
        flags: flags.with(slot, f.with_tries(f.tries() - 1)),
        tried: true,
        demoted: None,
    })
}

/// Record that the running slot, already successful, reached health on this boot: its count of
/// boots without health goes back to 0. `None` when there is nothing to change.
pub fn healthy_again(flags: SlotFlags, running: Slot) -> Option<SlotFlags> {
    let f = flags.get(running);
    (f.successful() && f.tries() > 0).then(|| flags.with(running, f.with_tries(0)))
}

/// Whether `slot` is what the boot stage chose, judged from the flags after its choice was
/// committed (`flags`) and whether it spent a try (`trial`). The slot's own keel-init checks this
/// before it mounts the slot it was handed on the kernel command line, so a command line that
/// does not match the disk (edited, or left over from an older boot) cannot run a slot the boot
/// choice did not pick. For every flags value, `choose_boot`'s slot and `tried` pass, and the
/// other slot does not, with one exception the flags cannot tell apart: a slot whose last try
/// was just spent looks exactly like one that ran out of tries earlier, so a trial hand-over of
/// an outranking slot with no tries left passes.
pub fn confirm_handoff(flags: SlotFlags, slot: Slot, trial: bool) -> Result<(), String> {
    let f = flags.get(slot);
    let o = flags.get(slot.other());
    if !trial {
        return if f.successful() && flags.preferred() == Some(slot) {
            Ok(())
        } else {
            Err(format!(
                "slot {slot} was handed over as a good boot, but the flags ({slot}: {f}, {}: {o}) \
                 do not choose it as a successful slot",
                slot.other()
            ))
        };
    }
    // a trial spent one try: the slot may now have none left, so it is judged as it stood
    // before the try: activated, not successful, and preferred over the other slot
    let outranked = o.bootable()
        && (o.priority() > f.priority() || (o.priority() == f.priority() && slot == Slot::B));
    if f.successful() || f.priority() == 0 || outranked {
        return Err(format!(
            "slot {slot} was handed over as a trial boot, but the flags ({slot}: {f}, {}: {o}) \
             do not show a trial of it",
            slot.other()
        ));
    }
    Ok(())
}

/// The slot the boot choice fell back from, if it did: the other slot outranks the chosen one
/// but has run out of tries without being marked successful (its trial boots failed). `flags`
/// are the flags after the choice.
pub fn fell_back_from(flags: SlotFlags, chosen: Slot) -> Option<Slot> {
    let o = chosen.other();
    let (fo, fc) = (flags.get(o), flags.get(chosen));
    let outranks =
        fo.priority() > fc.priority() || (fo.priority() == fc.priority() && o == Slot::A);
    (fo.state() == SlotState::Failed && outranks).then_some(o)
}

/// Start an update of `target`: invalidate it (priority 0, tries 0, not successful) so that
/// nothing boots it while it is being written. `running` is the slot the system runs from, if
/// any (an offline disk has none).
pub fn start_update(
    flags: SlotFlags,
    target: Slot,
    running: Option<Slot>,
) -> Result<SlotFlags, FlagError> {
    if running == Some(target) {
        return Err(FlagError::TargetIsRunning { slot: target });
    }
    let f = flags.get(target);
    Ok(flags.with(
        target,
        f.with_priority(0).with_tries(0).with_successful(false),
    ))
}

/// Activate `target` for its first boots: priority 2 with `tries` tries, not yet successful;
/// the other slot gets priority 1 and stays the fallback. An other slot that holds nothing
/// (invalidated, never activated) keeps priority 0: it is no fallback, and the flags should not
/// pretend it is one that failed.
pub fn activate(
    flags: SlotFlags,
    target: Slot,
    running: Option<Slot>,
    tries: u8,
) -> Result<SlotFlags, FlagError> {
    if running == Some(target) {
        return Err(FlagError::TargetIsRunning { slot: target });
    }
    if tries == 0 || tries > MAX_TRIES {
        return Err(FlagError::TriesOutOfRange { tries });
    }
    let t = flags.get(target);
    let o = flags.get(target.other());
    let o = if o.state() == SlotState::Invalid {
        o
    } else {
        o.with_priority(1)
    };
    Ok(flags
        .with(
            target,
            t.with_priority(2).with_tries(tries).with_successful(false),
        )
        .with(target.other(), o))
}

/// Mark the running slot successful: it has booted and is healthy, and no longer spends tries.
pub fn mark_successful(flags: SlotFlags, running: Slot) -> Result<SlotFlags, FlagError> {
    let f = flags.get(running);
    if f.priority() == 0 && !f.successful() {
        return Err(FlagError::NotActivated {
            slot: running,
            flags: f,
        });
    }
    Ok(flags.with(running, f.with_successful(true).with_tries(0)))
}

/// Record that `slot` cannot boot (its root did not mount, say): no tries left and not
/// successful. Its priority stays, so the flags still show it was activated and failed.
pub fn mark_failed(flags: SlotFlags, slot: Slot) -> SlotFlags {
    let f = flags.get(slot);
    flags.with(slot, f.with_tries(0).with_successful(false))
}

/// Manual rollback from `running` to the other slot, only when that one is bootable. The other
/// slot gets priority 2, the running one priority 1 and stays a fallback.
pub fn rollback(flags: SlotFlags, running: Slot) -> Result<SlotFlags, FlagError> {
    let target = running.other();
    let t = flags.get(target);
    if !t.bootable() {
        return Err(FlagError::RollbackTargetNotBootable {
            slot: target,
            flags: t,
        });
    }
    let r = flags.get(running);
    Ok(flags
        .with(target, t.with_priority(2))
        .with(running, r.with_priority(1)))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Flags with priority `p`, tries `t`, successful `s` (also used by the policy's tests).
    pub(super) fn f(p: u8, t: u8, s: bool) -> BootFlags {
        BootFlags(0)
            .with_priority(p)
            .with_tries(t)
            .with_successful(s)
    }
    fn pair(a: BootFlags, b: BootFlags) -> SlotFlags {
        SlotFlags { a, b }
    }

    /// The hand-over check is exactly "some boot choice could have left these flags with this
    /// slot and this trial word": over every pair of flags with priority 0..=3, tries 0..=4 and
    /// either successful bit (6,400 pairs) the choices are collected, and for every resulting
    /// flags value with tries up to 3 (so that its try-before value is in the domain), each
    /// slot and trial word is confirmed if and only if it is among them. Flags alone cannot tell
    /// "the last try was just spent" from "the tries ran out earlier", so both readings pass.
    /// A boot stage from before the unhealthy-boot count left good boots unchanged; its
    /// hand-overs count as reached too, so a slot updated before the boot stage still boots.
    #[test]
    fn the_handoff_check_confirms_exactly_what_a_boot_choice_leaves() {
        use std::collections::HashSet;
        let mut all = Vec::new();
        for p in 0..=3 {
            for t in 0..=4 {
                for s in [false, true] {
                    all.push(f(p, t, s));
                }
            }
        }
        let mut reached = HashSet::new();
        for &a in &all {
            for &b in &all {
                if let Ok(c) = choose_boot(pair(a, b)) {
                    reached.insert((c.flags.a.0, c.flags.b.0, c.slot, c.tried));
                }
                // a boot stage from before the unhealthy-boot count left the flags of
                // a good boot unchanged; slots must still accept its hand-overs
                let old = pair(a, b);
                if let Some(slot) = old.preferred().filter(|s| old.get(*s).successful()) {
                    reached.insert((a.0, b.0, slot, false));
                }
            }
        }
        let mut checked = 0;
        for &(a, b, _, _) in &reached {
            let after = pair(BootFlags(a), BootFlags(b));
            if after.a.tries() > 3 || after.b.tries() > 3 {
                continue;
            }
            for slot in Slot::ALL {
                for trial in [false, true] {
                    checked += 1;
                    assert_eq!(
                        confirm_handoff(after, slot, trial).is_ok(),
                        reached.contains(&(a, b, slot, trial)),
                        "{after:?}: slot {slot}, trial {trial}"
                    );
                }
            }
        }
        assert!(checked > 1000, "only {checked} cases");
    }

    #[test]
    fn a_fallback_is_seen_when_the_outranking_slot_ran_out_of_tries() {
        // B activated, tries spent, never successful: A boots, falling back from B
        let after = pair(f(1, 0, true), f(2, 0, false));
        assert_eq!(choose_boot(after).unwrap().slot, Slot::A);
        assert_eq!(fell_back_from(after, Slot::A), Some(Slot::B));
        // B on trial: no fallback
        assert_eq!(
            fell_back_from(pair(f(1, 0, true), f(2, 2, false)), Slot::B),
            None
        );
        // B never installed: no fallback
        assert_eq!(
            fell_back_from(pair(f(1, 0, true), f(0, 0, false)), Slot::A),
            None
        );
        // B successful but A was rolled back to by hand: no fallback
        assert_eq!(
            fell_back_from(pair(f(2, 0, true), f(1, 0, true)), Slot::A),
            None
        );
    }

    #[test]
    fn bit_layout_matches_chromeos() {
        let x = f(2, 3, true);
        assert_eq!(x.0, (2 << 48) | (3 << 52) | (1 << 56));
        // other attribute bits survive every change
        let other = BootFlags((1 << 0) | (1 << 60) | (1 << 47));
        let y = other.with_priority(15).with_tries(15).with_successful(true);
        assert_eq!(y.0 & !(0x1FF << 48), other.0);
        assert_eq!(
            y.with_priority(0).with_tries(0).with_successful(false),
            other
        );
    }

    #[test]
    fn boot_choice_table() {
        // (a, b) -> expected slot (None: nothing bootable), expected flags after
        let cases: Vec<(SlotFlags, Option<Slot>, SlotFlags)> = vec![
            // never activated: nothing boots
            (
                pair(f(0, 0, false), f(0, 0, false)),
                None,
                SlotFlags::default(),
            ),
            // A successful, B invalid: the boot is counted until it reaches health
            (
                pair(f(1, 0, true), f(0, 0, false)),
                Some(Slot::A),
                pair(f(1, 1, true), f(0, 0, false)),
            ),
            // B freshly activated: it is tried, and a try is spent
            (
                pair(f(1, 0, true), f(2, 3, false)),
                Some(Slot::B),
                pair(f(1, 0, true), f(2, 2, false)),
            ),
            // B on its last try
            (
                pair(f(1, 0, true), f(2, 1, false)),
                Some(Slot::B),
                pair(f(1, 0, true), f(2, 0, false)),
            ),
            // B out of tries: back to A
            (
                pair(f(1, 0, true), f(2, 0, false)),
                Some(Slot::A),
                pair(f(1, 1, true), f(2, 0, false)),
            ),
            // successful with priority 0 is still bootable
            (
                pair(f(0, 0, true), f(0, 0, false)),
                Some(Slot::A),
                pair(f(0, 1, true), f(0, 0, false)),
            ),
            // tie: A wins
            (
                pair(f(1, 0, true), f(1, 0, true)),
                Some(Slot::A),
                pair(f(1, 1, true), f(1, 0, true)),
            ),
            // A successful but its last 3 boots missed health, B successful: B, A demoted
            (
                pair(f(2, 3, true), f(1, 0, true)),
                Some(Slot::B),
                pair(f(1, 0, true), f(2, 1, true)),
            ),
            // the same with B on trial: B spends a try
            (
                pair(f(2, 3, true), f(1, 2, false)),
                Some(Slot::B),
                pair(f(1, 0, true), f(2, 1, false)),
            ),
            // the same with B failed: A is the last bootable slot and keeps booting
            (
                pair(f(2, 3, true), f(1, 0, false)),
                Some(Slot::A),
                pair(f(2, 4, true), f(1, 0, false)),
            ),
            // both successful and both at the limit: no trading places, A boots
            (
                pair(f(2, 3, true), f(1, 5, true)),
                Some(Slot::A),
                pair(f(2, 4, true), f(1, 5, true)),
            ),
            // the count stops at the field's 15
            (
                pair(f(2, 15, true), f(0, 0, false)),
                Some(Slot::A),
                pair(f(2, 15, true), f(0, 0, false)),
            ),
            // priority with no tries and not successful is not bootable
            (
                pair(f(15, 0, false), f(0, 0, false)),
                None,
                SlotFlags::default(),
            ),
        ];
        for (i, (flags, want, after)) in cases.into_iter().enumerate() {
            match (choose_boot(flags), want) {
                (Ok(c), Some(w)) => {
                    assert_eq!(c.slot, w, "case {i}");
                    assert_eq!(c.flags, after, "case {i}");
                    assert_eq!(c.tried, !flags.get(w).successful(), "case {i}");
                }
                (Err(FlagError::NoBootableSlot { .. }), None) => {}
                (got, want) => panic!("case {i}: got {got:?}, want {want:?}"),
            }
        }
    }

    #[test]
    fn tries_run_out_and_the_old_slot_boots_again() {
        let mut flags = pair(f(1, 0, true), f(0, 0, false));
        flags = start_update(flags, Slot::B, Some(Slot::A)).unwrap();
        flags = activate(flags, Slot::B, Some(Slot::A), 3).unwrap();
        for _ in 0..3 {
            let c = choose_boot(flags).unwrap();
            assert_eq!(c.slot, Slot::B);
            flags = c.flags; // the boot fails: nobody marks it successful
        }
        let c = choose_boot(flags).unwrap();
        assert_eq!(c.slot, Slot::A);
        assert_eq!(c.flags.get(Slot::B).state(), SlotState::Failed);
        assert_eq!(c.flags.get(Slot::A).state(), SlotState::Successful);
    }

    /// Over every pair of flags with priority 0..=3, any tries and either successful bit
    /// (16,384 pairs): the boot choice fails only when no slot is bootable, a demotion happens
    /// exactly when the chosen slot would have been a successful slot at its limit and the other
    /// slot is a way out, and a demotion leaves both slots bootable (the demoted one stays the
    /// fallback).
    #[test]
    fn demotion_is_exact_and_never_takes_the_last_bootable_slot() {
        let mut all = Vec::new();
        for p in 0..=3 {
            for t in 0..=MAX_TRIES {
                for s in [false, true] {
                    all.push(f(p, t, s));
                }
            }
        }
        let mut demotions = 0;
        for &a in &all {
            for &b in &all {
                let flags = pair(a, b);
                let Ok(c) = choose_boot(flags) else {
                    assert!(!a.bootable() && !b.bootable(), "{flags:?}");
                    continue;
                };
                assert!(flags.get(c.slot).bootable(), "{flags:?}: chose {}", c.slot);
                let first = flags.preferred().unwrap();
                let (fp, fo) = (flags.get(first), flags.get(first.other()));
                let way_out = fo.bootable() && !(fo.successful() && fo.tries() >= 3);
                let should = fp.successful() && fp.tries() >= MAX_UNHEALTHY_BOOTS && way_out;
                assert_eq!(c.demoted.is_some(), should, "{flags:?}");
                if let Some(d) = c.demoted {
                    demotions += 1;
                    assert_eq!((d, c.slot), (first, first.other()), "{flags:?}");
                    let after = c.flags.get(d);
                    assert!(after.successful() && after.tries() == 0, "{flags:?}");
                    assert!(after.bootable(), "{flags:?}");
                    assert!(
                        after.priority() < c.flags.get(c.slot).priority(),
                        "{flags:?}"
                    );
                } else if fp.successful() {
                    assert_eq!(c.slot, first);
                    assert_eq!(c.flags.get(first).tries(), (fp.tries() + 1).min(MAX_TRIES));
                }
            }
        }
        assert!(demotions > 1000, "only {demotions} demotions");
    }

    /// A release marked successful that then stops reaching health: after 3 unhealthy boots the
    /// other slot boots; one healthy boot in between starts the count again; with nothing else
    /// bootable it keeps booting.
    #[test]
    fn a_successful_slot_that_stops_reaching_health_is_demoted() {
        let boot = |flags: SlotFlags, healthy: bool| {
            let c = choose_boot(flags).unwrap();
            let after = if healthy {
                healthy_again(c.flags, c.slot).unwrap_or(c.flags)
            } else {
                c.flags
            };
            (c.slot, c.demoted, after)
        };
        // b successful and preferred, a the older successful release
        let mut flags = pair(f(1, 0, true), f(2, 0, true));
        for healthy in [false, false, true, false, false] {
            let (slot, demoted, next) = boot(flags, healthy);
            assert_eq!((slot, demoted), (Slot::B, None));
            flags = next;
        }
        let (slot, _, next) = boot(flags, false);
        assert_eq!(slot, Slot::B);
        let (slot, demoted, next) = boot(next, true);
        assert_eq!((slot, demoted), (Slot::A, Some(Slot::B)));
        assert_eq!(next, pair(f(2, 0, true), f(1, 0, true)));
        // alone: b never stops being chosen
        let mut flags = pair(f(1, 0, false), f(2, 0, true));
        for _ in 0..40 {
            let (slot, demoted, next) = boot(flags, false);
            assert_eq!((slot, demoted), (Slot::B, None));
            flags = next;
        }
    }

    #[test]
    fn update_then_success() {
        let mut flags = pair(f(1, 0, true), f(0, 0, false));
        flags = start_update(flags, Slot::B, Some(Slot::A)).unwrap();
        assert_eq!(flags.b, f(0, 0, false));
        flags = activate(flags, Slot::B, Some(Slot::A), DEFAULT_TRIES).unwrap();
        assert_eq!(flags, pair(f(1, 0, true), f(2, 3, false)));
        let c = choose_boot(flags).unwrap();
        flags = mark_successful(c.flags, c.slot).unwrap();
        assert_eq!(flags, pair(f(1, 0, true), f(2, 0, true)));
        assert_eq!(choose_boot(flags).unwrap().slot, Slot::B);
    }

    #[test]
    fn refused_transitions_are_named() {
        let flags = pair(f(1, 0, true), f(0, 0, false));
        assert_eq!(
            start_update(flags, Slot::A, Some(Slot::A)),
            Err(FlagError::TargetIsRunning { slot: Slot::A })
        );
        assert_eq!(
            activate(flags, Slot::A, Some(Slot::A), 3),
            Err(FlagError::TargetIsRunning { slot: Slot::A })
        );
        assert_eq!(
            activate(flags, Slot::B, None, 0),
            Err(FlagError::TriesOutOfRange { tries: 0 })
        );
        assert_eq!(
            activate(flags, Slot::B, None, 16),
            Err(FlagError::TriesOutOfRange { tries: 16 })
        );
        assert_eq!(
            rollback(flags, Slot::A),
            Err(FlagError::RollbackTargetNotBootable {
                slot: Slot::B,
                flags: f(0, 0, false)
            })
        );
        assert_eq!(
            mark_successful(flags, Slot::B),
            Err(FlagError::NotActivated {
                slot: Slot::B,
                flags: f(0, 0, false)
            })
        );
        let msg = choose_boot(SlotFlags::default()).unwrap_err().to_string();
        assert!(msg.contains("no bootable slot"), "{msg}");
    }

    #[test]
    fn rollback_to_a_bootable_slot() {
        let flags = pair(f(1, 0, true), f(2, 0, true));
        let r = rollback(flags, Slot::B).unwrap();
        assert_eq!(r, pair(f(2, 0, true), f(1, 0, true)));
        assert_eq!(choose_boot(r).unwrap().slot, Slot::A);
        // a slot still on trial may be rolled back to, while it has tries
        let flags = pair(f(1, 2, false), f(2, 0, true));
        assert_eq!(
            choose_boot(rollback(flags, Slot::B).unwrap()).unwrap().slot,
            Slot::A
        );
        // but not once they are spent
        let flags = pair(f(1, 0, false), f(2, 0, true));
        assert!(rollback(flags, Slot::B).is_err());
    }

    #[test]
    fn activating_on_an_empty_disk_leaves_the_other_slot_invalid() {
        let flags = activate(SlotFlags::default(), Slot::B, None, 3).unwrap();
        assert_eq!(flags, pair(f(0, 0, false), f(2, 3, false)));
        assert_eq!(flags.a.state(), SlotState::Invalid);
    }

    #[test]
    fn mark_failed_makes_slot_unbootable_and_keeps_priority() {
        let flags = pair(f(1, 0, true), f(2, 2, false));
        let after = mark_failed(flags, Slot::B);
        assert_eq!(after.b, f(2, 0, false));
        assert_eq!(after.preferred(), Some(Slot::A));
    }

    #[test]
    fn slot_parse_and_labels() {
        assert_eq!("a".parse::<Slot>().unwrap(), Slot::A);
        assert_eq!("B".parse::<Slot>().unwrap(), Slot::B);
        assert!("c".parse::<Slot>().is_err());
        assert_eq!(Slot::B.label(), "MATIC_ROOT_B");
    }
}
