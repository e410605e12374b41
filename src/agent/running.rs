//! Which slot is running, as keel-agent establishes it at start, and what it may do with it.
//!
//! The running slot comes from the boot, never from the flags: after an install the flags
//! prefer the staged slot, so an agent that read them after a restart would take the staged
//! slot for the running one and aim the next install at the mounted root. The evidence, in
//! order of trust: the device the root file system is mounted from, the record stage 2 wrote
//! (see [`crate::control::boot`]), the `--booted-slot` argument. Pieces that disagree make the
//! slot unknown, and then installs and rollbacks are refused. Guessing from the flags is only
//! for a host-side agent on a disk image file, and then it takes the slot holding the last
//! successful image ([`driver::running_slot`]), never the preferred one.
//!
//! [`establish`] is a pure function of that evidence; this module reads nothing itself.

use crate::bootctl::{Slot, SlotFlags};
use crate::update::driver;

/// The running slot as far as the agent knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Running {
    /// Established from the boot; `how` says from what.
    Known { slot: Slot, how: String },
    /// A host-side agent on a disk image file: the slot holding the last successful image
    /// (`None` on an image where nothing is bootable yet: an install then writes slot A).
    Guessed(Option<Slot>),
    /// Not established; installs and rollbacks are refused with this reason.
    Unknown(String),
}

impl Running {
    /// The slot to show and to act on, if there is one.
    pub fn slot(&self) -> Option<Slot> {
        match self {
            Running::Known { slot, .. } => Some(*slot),
            Running::Guessed(s) => *s,
            Running::Unknown(_) => None,
        }
    }

    /// The slot an install or a rollback may take as running, or why it may not act.
    pub fn for_change(&self) -> Result<Option<Slot>, String> {
        match self {
            Running::Unknown(why) => Err(format!(
                "the running slot is not known ({why}); nothing was changed. Reboot the node so \
                 that keel-init records the booted slot, or start keel-agent with \
                 --booted-slot"
            )),
            r => Ok(r.slot()),
        }
    }

    /// One line for Status and the agent's log.
    pub fn describe(&self) -> String {
        match self {
            Running::Known { slot, how } => format!("slot {slot} ({how})"),
            Running::Guessed(Some(s)) => format!(
                "slot {s} (guessed: a disk image file, the slot holding the last successful \
                 image)"
            ),
            Running::Guessed(None) => "none (a disk image file with nothing bootable)".into(),
            Running::Unknown(why) => format!("unknown: {why}"),
        }
    }
}

/// What the agent found at start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Evidence {
    /// `--booted-slot`.
    pub given: Option<Slot>,
    /// The slot in stage 2's boot record (`Err`: a record that cannot be read).
    pub record: Result<Option<Slot>, String>,
    /// The slot whose partition (or loop device over it) the root file system is mounted from;
    /// `None` when the root is not on the boot disk.
    pub mounted: Option<Slot>,
    /// Whether the boot disk is a regular file (a disk image), not a block device.
    pub disk_is_file: bool,
    /// The flags on the disk now (only for the host-side guess).
    pub flags: SlotFlags,
}

/// The running slot from the evidence.
pub fn establish(e: &Evidence) -> Running {
    let record = match &e.record {
        Ok(r) => *r,
        Err(why) => return Running::Unknown(why.clone()),
    };
    let named = [
        ("the root file system is mounted from", e.mounted),
        ("the boot record says", record),
        ("--booted-slot says", e.given),
    ];
    let present: Vec<(&str, Slot)> = named
        .iter()
        .filter_map(|(w, s)| s.map(|s| (*w, s)))
        .collect();
    if let Some(((w1, s1), (w2, s2))) = present
        .iter()
        .flat_map(|a| present.iter().map(move |b| (a, b)))
        .find(|((_, a), (_, b))| a != b)
    {
        return Running::Unknown(format!("{w1} slot {s1} but {w2} slot {s2}"));
    }
    if let Some(slot) = e.mounted {
        let how = match record {
            Some(_) => "the boot record, matching the mounted root",
            None => "the device the root is mounted from",
        };
        return Running::Known {
            slot,
            how: how.into(),
        };
    }
    match (record, e.given) {
        (Some(_), _) if !e.disk_is_file => Running::Unknown(format!(
            "the boot record names slot {}, but the root file system is not mounted from the \
             boot disk",
            record.map_or("?", |s| s.letter())
        )),
        (Some(slot), _) => Running::Known {
            slot,
            how: "the boot record (the root is not on this disk image)".into(),
        },
        (None, Some(slot)) => Running::Known {
            slot,
            how: "--booted-slot".into(),
        },
        (None, None) if e.disk_is_file => Running::Guessed(driver::running_slot(e.flags)),
        (None, None) => Running::Unknown(
            "no boot record from keel-init and the root file system is not mounted from the \
             boot disk"
                .into(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bootctl::BootFlags;

    fn flags(a: BootFlags, b: BootFlags) -> SlotFlags {
        SlotFlags { a, b }
    }

    /// A staged B (preferred, trying) over a successful A: the flags prefer B.
    fn staged_b() -> SlotFlags {
        flags(
            BootFlags(0).with_priority(1).with_successful(true),
            BootFlags(0).with_priority(2).with_tries(3),
        )
    }

    fn ev(
        given: Option<Slot>,
        record: Option<Slot>,
        mounted: Option<Slot>,
        file: bool,
    ) -> Evidence {
        Evidence {
            given,
            record: Ok(record),
            mounted,
            disk_is_file: file,
            flags: staged_b(),
        }
    }

    #[test]
    fn a_staged_slot_is_never_taken_for_the_running_one() {
        assert_eq!(staged_b().preferred(), Some(Slot::B));
        // a node: record and mounted root agree on A whatever the flags prefer
        let r = establish(&ev(None, Some(Slot::A), Some(Slot::A), false));
        assert_eq!(r.slot(), Some(Slot::A));
        // a host-side agent on an image: the successful slot, not the preferred one
        let r = establish(&ev(None, None, None, true));
        assert_eq!(r, Running::Guessed(Some(Slot::A)));
    }

    #[test]
    fn disagreement_makes_the_slot_unknown_and_changes_are_refused() {
        for e in [
            ev(None, Some(Slot::B), Some(Slot::A), false),
            ev(Some(Slot::B), None, Some(Slot::A), false),
            ev(Some(Slot::A), Some(Slot::B), None, true),
        ] {
            let r = establish(&e);
            assert!(matches!(r, Running::Unknown(_)), "{e:?}: {r:?}");
            let err = r.for_change().unwrap_err();
            assert!(err.contains("not known"), "{err}");
        }
    }

    #[test]
    fn a_block_device_without_evidence_is_never_guessed() {
        let r = establish(&ev(None, None, None, false));
        assert!(matches!(r, Running::Unknown(_)), "{r:?}");
        // a record that the mounted root cannot confirm on a real disk is not trusted either
        let r = establish(&ev(None, Some(Slot::A), None, false));
        assert!(matches!(r, Running::Unknown(_)), "{r:?}");
        // an unreadable record is not ignored
        let mut e = ev(None, None, Some(Slot::A), false);
        e.record = Err("/run/keel/booted is not a boot record".into());
        assert!(matches!(establish(&e), Running::Unknown(_)));
    }

    #[test]
    fn each_kind_of_evidence_alone() {
        let r = establish(&ev(None, None, Some(Slot::B), false));
        assert_eq!(r.slot(), Some(Slot::B));
        let r = establish(&ev(Some(Slot::B), None, None, false));
        assert_eq!(r.slot(), Some(Slot::B));
        let r = establish(&ev(None, Some(Slot::B), None, true));
        assert_eq!(r.slot(), Some(Slot::B));
        let mut e = ev(None, None, None, true);
        e.flags = SlotFlags::default();
        assert_eq!(establish(&e), Running::Guessed(None));
        assert_eq!(establish(&e).for_change(), Ok(None));
    }
}
