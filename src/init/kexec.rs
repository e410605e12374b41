//! The boot stage's hand-over to a slot's own kernel: kexec_file_load(2) and reboot(2) with
//! LINUX_REBOOT_CMD_KEXEC, called directly (no kexec-tools in the image). The kernel reads the
//! bzImage and the initramfs from the file descriptors itself, so it checks the image format
//! (and, where the kernel demands it, the signature) before anything is replaced: a kernel it
//! refuses leaves this boot stage running, free to choose the other slot.
//!
//! [`slot_cmdline`] is pure: the slot kernel's command line from the boot stage's own.

use crate::bootctl::Slot;
use std::ffi::CString;
use std::fs::File;
use std::os::fd::AsRawFd;

/// Load `kernel` and `initramfs` as the kernel to execute next, with `cmdline`.
pub fn load(kernel: &File, initramfs: &File, cmdline: &str) -> std::io::Result<()> {
    let c = CString::new(cmdline).map_err(|_| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "the command line holds a NUL byte",
        )
    })?;
    let len = c.as_bytes_with_nul().len();
    // SAFETY: both descriptors are open for the duration of the call; the command line pointer
    // and its length (with the NUL, as the syscall requires) describe a live CString; flags 0.
    let r = unsafe {
        libc::syscall(
            libc::SYS_kexec_file_load,
            kernel.as_raw_fd(),
            initramfs.as_raw_fd(),
            len as libc::c_ulong,
            c.as_ptr(),
            0 as libc::c_ulong,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Execute the loaded kernel. Returns only when the kernel refuses (nothing loaded, say).
pub fn execute() -> nix::Error {
    match nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_KEXEC) {
        Ok(never) => match never {},
        Err(e) => e,
    }
}

/// The `keel.*` words that the boot stage sets for the slot; the boot stage's own values of
/// these are dropped from the inherited command line.
pub const HANDOFF_KEYS: [&str; 7] = [
    "keel.slot",
    "keel.boot",
    "keel.bootstage",
    "keel.refused",
    "keel.fallback",
    "keel.demoted",
    "keel.verity",
];

/// What the boot stage tells the slot's keel-init.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Handoff {
    pub slot: Slot,
    /// Whether this boot spent one of the slot's tries.
    pub trial: bool,
    /// The boot stage's version.
    pub boot_stage: String,
    /// Slots refused in this power-on, `a:kernel-load-failed,...` (empty for none).
    pub refused: String,
    /// The slot the boot choice fell back from (its tries ran out).
    pub fallback_from: Option<Slot>,
    /// The successful slot the boot choice demoted (its last boots did not reach health).
    pub demoted: Option<Slot>,
    /// The root hash the slot was mapped with (hex), when its record has one.
    pub verity: Option<String>,
}

/// The slot kernel's command line: the boot stage's own words (without the loader's
/// `BOOT_IMAGE=`/`initrd=` and without earlier hand-over words), `panic=10` unless a `panic=`
/// is there (a panicking slot kernel must reboot and spend a try, not sit), and the hand-over
/// words. Values with spaces or quotes cannot occur: every value here is a fixed word or one
/// the boot stage made from fixed words and a version it read (which is sanitized).
pub fn slot_cmdline(boot_stage_cmdline: &str, h: &Handoff) -> String {
    let mut words: Vec<String> = super::cmdline::split(boot_stage_cmdline)
        .into_iter()
        .filter(|w| {
            let key = w.split('=').next().unwrap_or("");
            key != "BOOT_IMAGE" && key != "initrd" && !HANDOFF_KEYS.contains(&key)
        })
        .collect();
    if !words.iter().any(|w| w.starts_with("panic=")) {
        words.push("panic=10".into());
    }
    // the slot's kernel runs locked down: no unsigned modules, no /dev/mem, no kexec of
    // unsigned images, no hibernation (the boot stage's own line has it already when it was
    // built by keel-image; a boot stage started without it still locks the slot kernel down)
    if !words.iter().any(|w| w.starts_with("lockdown=")) {
        words.push("lockdown=integrity".into());
    }
    words.push(format!("keel.slot={}", h.slot.letter()));
    words.push(format!(
        "keel.boot={}",
        if h.trial { "trial" } else { "good" }
    ));
    let version: String = h
        .boot_stage
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || ".-+_~".contains(*c))
        .collect();
    if !version.is_empty() {
        words.push(format!("keel.bootstage={version}"));
    }
    if !h.refused.is_empty() {
        words.push(format!("keel.refused={}", h.refused));
    }
    if let Some(s) = h.fallback_from {
        words.push(format!("keel.fallback={}", s.letter()));
    }
    if let Some(s) = h.demoted {
        words.push(format!("keel.demoted={}", s.letter()));
    }
    if let Some(v) = h
        .verity
        .as_deref()
        .filter(|v| v.bytes().all(|b| b.is_ascii_hexdigit()))
    {
        words.push(format!("keel.verity={v}"));
    }
    words.join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn handoff() -> Handoff {
        Handoff {
            slot: Slot::B,
            trial: true,
            boot_stage: "1.0.0".into(),
            refused: String::new(),
            fallback_from: None,
            demoted: None,
            verity: None,
        }
    }

    #[test]
    fn the_slot_command_line_keeps_the_boot_stage_words_and_adds_the_handoff() {
        let c = slot_cmdline(
            "BOOT_IMAGE=/x initrd=\\y console=ttyS0 keel.watchdog=20 keel.slot=a keel.boot=good",
            &handoff(),
        );
        assert_eq!(
            c,
            "console=ttyS0 keel.watchdog=20 panic=10 lockdown=integrity keel.slot=b \
             keel.boot=trial keel.bootstage=1.0.0"
        );
    }

    #[test]
    fn explicit_panic_and_lockdown_values_are_kept_and_refusals_fallbacks_demotions_passed() {
        let mut h = handoff();
        h.slot = Slot::A;
        h.trial = false;
        h.refused = "b:kernel-load-failed".into();
        h.fallback_from = Some(Slot::B);
        h.demoted = Some(Slot::B);
        h.verity = Some("ab".repeat(32));
        h.boot_stage = "1.0 0\"x".into();
        let c = slot_cmdline("panic=30 console=ttyS0 lockdown=confidentiality", &h);
        assert_eq!(
            c,
            format!(
                "panic=30 console=ttyS0 lockdown=confidentiality keel.slot=a keel.boot=good \
                 keel.bootstage=1.00x keel.refused=b:kernel-load-failed keel.fallback=b \
                 keel.demoted=b keel.verity={}",
                "ab".repeat(32)
            )
        );
    }

    #[test]
    fn a_command_line_with_a_nul_is_refused_before_the_syscall() {
        let f = File::open("/dev/null").unwrap();
        let e = load(&f, &f, "a\0b").unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::InvalidInput);
    }
}
