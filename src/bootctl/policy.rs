//! What keel-agent may change on the disk while the node runs, as pure functions of the flags
//! and the running slot: whether an install or a manual rollback is admitted now. No I/O; the
//! agent reads the flags and its running slot and asks here.
//!
//! The rule that matters: an install rewrites the slot that is not running, so it must not start
//! while the running slot is unproven (booted but not yet marked successful). The other slot is
//! then the only one known to boot; invalidating it leaves nothing to fall back to if this boot
//! fails. "Unproven" is "not successful", not "in the Trying state": on its last try the
//! running slot has priority > 0 and tries 0, which [`BootFlags::state`] calls
//! [`SlotState::Failed`] although it is the very boot being tried (found by the model check in
//! `modelcheck/`).

use super::{BootFlags, Slot, SlotFlags, SlotState};

/// Why an install is refused now. Nothing was changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum InstallRefusal {
    /// The running slot is on trial: it has not been marked successful yet.
    #[error(
        "slot {slot} is on trial ({flags}) until it is marked successful; an install now would \
         invalidate slot {other}, the only slot known to boot. Retry after slot {slot} is \
         successful",
        other = slot.other()
    )]
    OnTrial { slot: Slot, flags: BootFlags },
}

/// Whether an install may start now, with `running` the slot the node runs from (`None` on a
/// disk where nothing runs: there is nothing to protect).
pub fn admit_install(flags: SlotFlags, running: Option<Slot>) -> Result<(), InstallRefusal> {
    match running {
        Some(slot) if unproven(flags.get(slot)) => Err(InstallRefusal::OnTrial {
            slot,
            flags: flags.get(slot),
        }),
        _ => Ok(()),
    }
}

/// A slot that was activated and booted but not yet marked successful: still trying, or on its
/// last try (tries spent by this very boot).
pub fn unproven(f: BootFlags) -> bool {
    !f.successful() && f.state() != SlotState::Invalid
}

#[cfg(test)]
mod tests {
    use super::super::tests::f;
    use super::*;

    #[test]
    fn installs_wait_for_the_running_slot_to_be_proven() {
        let ok = f(1, 0, true);
        // trying, and on the last try (tries spent by this boot): refused
        for running in [f(2, 2, false), f(2, 0, false)] {
            let flags = SlotFlags { a: ok, b: running };
            assert!(matches!(
                admit_install(flags, Some(Slot::B)),
                Err(InstallRefusal::OnTrial { slot: Slot::B, .. })
            ));
        }
        // successful: admitted
        let flags = SlotFlags {
            a: ok,
            b: f(2, 0, true),
        };
        assert_eq!(admit_install(flags, Some(Slot::B)), Ok(()));
        // nothing running: admitted
        assert_eq!(admit_install(SlotFlags::default(), None), Ok(()));
    }
}
