//! Stage 1: /init in an initramfs. Mounts the kernel file systems, loads the modules of the
//! manifest (with their parameters from the command line), arms the watchdog and finds the boot
//! disk. Then it is one of two things:
//!
//! - **The boot stage** (no `keel.slot=` on the command line: the UKI on the ESP, or a direct
//!   kernel boot): runs the boot choice (the spent try is flushed first), opens the chosen
//!   slot's SquashFS read-only, checks the slot's kernel and initramfs against the slot's
//!   `/boot/keel-boot.json`, and hands over with kexec_file_load, telling the slot's kernel on
//!   its command line which slot was chosen and how (`keel.slot=b keel.boot=trial ...`). A slot
//!   whose root does not mount or whose kernel is missing, does not match or is refused is marked
//!   failed (never the last bootable slot) and the other slot is chosen in the same power-on.
//!   A slot without a kernel (an image from before kernels travelled with the slot) is booted as
//!   stage 1 always did: switch root into it.
//! - **The slot's own stage 1** (`keel.slot=` present: the slot's initramfs after the kexec):
//!   checks that the flags chose this slot, spends no try, mounts the slot and STATE, switches
//!   root and executes the slot's keel-init as stage 2.
//!
//! Every failure ends in a reboot.

use super::bootdisk::{self, BootRootError};
use super::cmdline::{self, KernelParams};
use super::kexec::{self, Handoff};
use super::log;
use super::modules;
use super::mounts;
use super::watchdog::Watchdog;
use crate::bootctl::{self, Slot};
use crate::disk::Layout;
use crate::dm;
use crate::update::record::hex;
use std::ffi::CString;
use std::fs::File;
use std::path::Path;
use std::time::Duration;

const NEWROOT: &str = "/newroot";
const SYS_BLOCK: &str = "/sys/class/block";
/// Stage 2 is the slot's own binary.
pub const STAGE2: &str = "/sbin/keel-init";
use crate::image::bootfiles::{BootFiles, SLOT_BOOT_RECORD, SLOT_INITRAMFS, SLOT_KERNEL};

/// What went wrong in stage 1; the caller logs it and reboots.
#[derive(Debug, thiserror::Error)]
pub enum Stage1Error {
    #[error("no disk with the KeelOS labels appeared within {0:?}; check the disk and the virtio_blk module")]
    NoBootDisk(Duration),
    #[error(transparent)]
    Root(#[from] BootRootError),
    #[error(
        "slot {slot}'s root file system ({source_dev}) did not mount: {error}; {marked}; \
         rebooting"
    )]
    RootDidNotMount {
        slot: Slot,
        source_dev: String,
        error: String,
        /// What was done to the slot's flags, in words.
        marked: String,
    },
    #[error("the boot stage handed over slot {slot}, but {why}; rebooting so that the boot stage chooses again")]
    Handoff { slot: Slot, why: String },
    #[error("no slot could be handed over in this power-on ({0}); rebooting")]
    NothingToHandOver(String),
    #[error("kexec into slot {slot}'s kernel failed after it was loaded: {error}; rebooting")]
    Kexec { slot: Slot, error: nix::Error },
    #[error("{0}")]
    State(String),
    #[error("switching to the new root failed: {0}")]
    Switch(#[from] mounts::MountError),
    #[error("executing {STAGE2} in the new root failed: {0}")]
    Exec(nix::Error),
}

/// Why the boot stage refused a slot (the words of `keel.refused=`, as the journal reads them).
pub use crate::control::journal::RefusalReason as Refusal;

/// What a mounted slot offers the boot stage.
#[derive(Debug)]
pub enum SlotKernel {
    /// No /boot at all: an image from before kernels travelled with the slot.
    Legacy,
    /// The kernel and initramfs, checked against the record, open for kexec.
    Ready {
        kernel: File,
        initramfs: File,
        record: BootFiles,
    },
}

fn hash_file(path: &Path) -> std::io::Result<(String, u64)> {
    use sha2::{Digest, Sha256};
    use std::io::Read;
    let mut f = File::open(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut n = 0u64;
    loop {
        let k = f.read(&mut buf)?;
        if k == 0 {
            break;
        }
        h.update(&buf[..k]);
        n += k as u64;
    }
    Ok((crate::update::record::hex(&h.finalize()), n))
}

/// Check the kernel and initramfs of the slot mounted at `root` against its
/// `/boot/keel-boot.json`. Err: the refusal and what was found.
pub fn check_slot_kernel(root: &Path) -> Result<SlotKernel, (Refusal, String)> {
    let (kpath, ipath, rpath) = (
        root.join(SLOT_KERNEL),
        root.join(SLOT_INITRAMFS),
        root.join(SLOT_BOOT_RECORD),
    );
    if !root.join("boot").exists() {
        return Ok(SlotKernel::Legacy);
    }
    if !kpath.is_file() {
        return Err((Refusal::KernelMissing, format!("/{SLOT_KERNEL} is missing")));
    }
    if !ipath.is_file() {
        return Err((
            Refusal::InitramfsMissing,
            format!("/{SLOT_INITRAMFS} is missing"),
        ));
    }
    let record: BootFiles = std::fs::read(&rpath)
        .map_err(|e| e.to_string())
        .and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string()))
        .map_err(|e| {
            (
                Refusal::KernelDigestMismatch,
                format!("/{SLOT_BOOT_RECORD} cannot be used: {e}"),
            )
        })?;
    for (path, want, want_len, what) in [
        (&kpath, &record.kernel_sha256, record.kernel_len, "kernel"),
        (
            &ipath,
            &record.initramfs_sha256,
            record.initramfs_len,
            "initramfs",
        ),
    ] {
        let (got, len) = hash_file(path).map_err(|e| {
            (
                Refusal::KernelDigestMismatch,
                format!("reading the {what}: {e}"),
            )
        })?;
        if &got != want || len != want_len {
            return Err((
                Refusal::KernelDigestMismatch,
                format!(
                    "the {what} ({len} bytes, sha256 {got}) does not match its record \
                     ({want_len} bytes, sha256 {want})"
                ),
            ));
        }
    }
    let open = |p: &Path, r: Refusal| File::open(p).map_err(|e| (r, e.to_string()));
    Ok(SlotKernel::Ready {
        kernel: open(&kpath, Refusal::KernelMissing)?,
        initramfs: open(&ipath, Refusal::InitramfsMissing)?,
        record,
    })
}

/// VERSION_ID of an os-release text.
pub fn os_release_version(text: &str) -> Option<String> {
    text.lines().find_map(|l| {
        l.strip_prefix("VERSION_ID=")
            .map(|v| v.trim().trim_matches('"').to_string())
    })
}

/// Run stage 1, with the kernel parameters read from `cmdline` (normally /proc/cmdline).
/// Returns only on failure: success ends in exec or kexec.
pub fn run(cmdline: &Path) -> Stage1Error {
    mounts::mount_early();
    let text = std::fs::read_to_string(cmdline).unwrap_or_default();
    let (params, warnings) = cmdline::parse_kernel(&text);
    for w in warnings {
        log(w);
    }
    let manifest = params
        .modules
        .clone()
        .unwrap_or_else(|| modules::MANIFEST.into());
    modules::load_all(&manifest, &text, &mut |m| log(m));

    // arm the watchdog before anything that can hang; stage 2 inherits the descriptor, and
    // the boot stage leaves it running across the kexec (i6300esb.nowayout=1 locks it on)
    let mut watchdog = None;
    let wd_secs = params.watchdog_secs.unwrap_or(60);
    if wd_secs > 0 {
        match Watchdog::open(Path::new("/dev/watchdog"), true) {
            Ok(mut w) => {
                match w.set_timeout(wd_secs) {
                    Ok(t) => log(format!("watchdog armed with a {t} s timeout")),
                    Err(e) => log(format!(
                        "watchdog timeout {wd_secs} s refused: {e}; keeping the driver's"
                    )),
                }
                let _ = w.pet();
                watchdog = Some(w);
            }
            Err(e) => log(format!(
                "no watchdog at /dev/watchdog ({e}); booting without one"
            )),
        }
    }

    let wait = Duration::from_secs(params.disk_wait_secs.unwrap_or(30));
    let sys_block = Path::new(SYS_BLOCK);
    let found = match &params.disk {
        Some(d) => bootdisk::wait_for_disk(d, wait),
        None => bootdisk::wait_for_boot_disk(sys_block, Path::new("/dev"), wait),
    };
    let Some(disk) = found else {
        return Stage1Error::NoBootDisk(wait);
    };
    log(format!("boot disk {}", disk.display()));
    if let Some(w) = watchdog.as_mut() {
        let _ = w.pet();
    }
    match params.slot {
        Some(slot) => slot_stage(&params, &disk, slot, watchdog),
        None => boot_stage(&text, &disk, watchdog),
    }
}

/// The boot stage: choose, check, kexec; another slot in the same power-on when one is refused.
fn boot_stage(cmdline_text: &str, disk: &Path, mut watchdog: Option<Watchdog>) -> Stage1Error {
    let version = std::fs::read_to_string("/etc/os-release")
        .ok()
        .and_then(|t| os_release_version(&t))
        .unwrap_or_default();
    log(format!(
        "boot stage {}",
        if version.is_empty() {
            "(version unknown)"
        } else {
            &version
        }
    ));
    let sys_block = Path::new(SYS_BLOCK);
    let newroot = Path::new(NEWROOT);
    let mut refused: Vec<String> = Vec::new();
    let mut fallback_from = None;
    let mut demoted = None;
    // each slot at most once per power-on
    for _ in 0..2 {
        if let Some(w) = watchdog.as_mut() {
            let _ = w.pet();
        }
        let mut c = match bootdisk::choose(disk) {
            Ok(c) => c,
            Err(e) => return e.into(),
        };
        let slot = c.choice.slot;
        fallback_from = fallback_from.or(bootctl::fell_back_from(c.choice.flags, slot));
        demoted = demoted.or(c.choice.demoted);
        if let Some(d) = c.choice.demoted {
            log(format!(
                "slot {d} is marked successful, but its last {} boots did not reach health: \
                 demoted; slot {slot} boots",
                bootctl::MAX_UNHEALTHY_BOOTS
            ));
        }
        let verity = bootdisk::slot_verity(&c.dev, &c.layout, slot);
        let source = match bootdisk::mount_slot(
            disk,
            &c.layout,
            c.sector_size,
            slot,
            newroot,
            sys_block,
            verity.as_ref().map(|v| (v, dm::OnCorruption::Error)),
        ) {
            Ok(s) => s,
            Err((dev, error)) => {
                let why = format!("its root file system ({dev}) did not mount: {error}");
                if !refuse(
                    &mut c,
                    slot,
                    Refusal::SquashfsMountFailed,
                    &why,
                    &mut refused,
                ) {
                    break;
                }
                continue;
            }
        };
        match &verity {
            Some(v) => log(format!(
                "slot {slot} opened read-only from {} through dm-verity (root hash {})",
                source.display(),
                hex(&v.root_hash)
            )),
            None => log(format!(
                "slot {slot} opened read-only from {} (its record has no dm-verity tree)",
                source.display()
            )),
        }
        if let Some(v) = &verity {
            if let Err(why) = check_whole_slot(&c, slot, &source, v) {
                bootdisk::unmount_slot(slot, newroot);
                let (marked, words) = bootdisk::mark_failed_unless_last(&mut c.dev, slot);
                if marked {
                    refused.push(format!("{}:{}", slot.letter(), Refusal::VerityCorruption));
                    log(format!("slot {slot} refused: {why}; {words}"));
                    continue;
                }
                // the last bootable slot boots anyway: a node always has something to boot,
                // and the kernel's verity target still refuses each bad block it reads
                log(format!("slot {slot}: {why}; {words}; booting it anyway"));
                if let Err((dev, error)) = bootdisk::mount_slot(
                    disk,
                    &c.layout,
                    c.sector_size,
                    slot,
                    newroot,
                    sys_block,
                    Some((v, dm::OnCorruption::Error)),
                ) {
                    return Stage1Error::NothingToHandOver(format!(
                        "slot {slot} ({dev}) did not mount again: {error}"
                    ));
                }
            }
        }
        let verity_hex = verity.as_ref().map(|v| hex(&v.root_hash));
        let (reason, why) = match check_slot_kernel(newroot) {
            Ok(SlotKernel::Legacy) => {
                log(format!(
                    "slot {slot} carries no kernel (/boot); switching root into it as stage 1 \
                     of this kernel"
                ));
                let handoff = Handoff {
                    slot,
                    trial: c.choice.tried,
                    boot_stage: version.clone(),
                    refused: refused.join(","),
                    fallback_from,
                    demoted,
                    verity: verity_hex.clone(),
                };
                let words = kexec::slot_cmdline("", &handoff);
                return hand_over(disk, &c.layout, c.sector_size, slot, watchdog, Some(words));
            }
            Ok(SlotKernel::Ready {
                kernel,
                initramfs,
                record,
            }) => {
                let handoff = Handoff {
                    slot,
                    trial: c.choice.tried,
                    boot_stage: version.clone(),
                    refused: refused.join(","),
                    fallback_from,
                    demoted,
                    verity: verity_hex.clone(),
                };
                let line = kexec::slot_cmdline(cmdline_text, &handoff);
                match kexec::load(&kernel, &initramfs, &line) {
                    Ok(()) => {
                        drop((kernel, initramfs));
                        bootdisk::unmount_slot(slot, newroot);
                        nix::unistd::sync();
                        if let Some(w) = watchdog.as_mut() {
                            let _ = w.pet();
                        }
                        log(format!(
                            "handing over to slot {slot}'s kernel {} with: {line}",
                            record.kernel_release
                        ));
                        // the watchdog stays armed: its descriptor is left open on purpose
                        std::mem::forget(watchdog);
                        return Stage1Error::Kexec {
                            slot,
                            error: kexec::execute(),
                        };
                    }
                    Err(e) => {
                        drop((kernel, initramfs));
                        (
                            Refusal::KernelLoadFailed,
                            format!(
                                "the kernel refused to load its kernel: {e}{}",
                                signature_hint(&e)
                            ),
                        )
                    }
                }
            }
            Err(refusal) => refusal,
        };
        if refuse(&mut c, slot, reason, &why, &mut refused) {
            bootdisk::unmount_slot(slot, newroot);
            continue;
        }
        return root_under_this_kernel(
            disk,
            c,
            slot,
            &version,
            &refused,
            fallback_from,
            demoted,
            verity_hex,
            watchdog,
        );
    }
    Stage1Error::NothingToHandOver(refused.join(", "))
}

/// What to add to a kexec_file_load error that a signature check causes.
fn signature_hint(e: &std::io::Error) -> &'static str {
    let locked = std::fs::read_to_string("/sys/kernel/security/lockdown")
        .is_ok_and(|t| !t.contains("[none]"));
    match e.raw_os_error() {
        Some(libc::EKEYREJECTED | libc::ENOKEY | libc::ENODATA | libc::EBADMSG | libc::EPERM)
            if locked =>
        {
            " (the boot stage runs locked down: the slot kernel's signature must verify against \
             the kernel's keyrings; Debian's kernels need the Debian Secure Boot CA in the \
             firmware's db)"
        }
        _ => "",
    }
}

/// The slot's kernel cannot be handed over, and the slot is the last bootable one (it was not
/// marked failed): boot its root (still mounted at /newroot) under the boot stage's own kernel,
/// as for a slot without a kernel. The node keeps a running system, without the slot's kernel,
/// rather than rebooting into the same refusal for ever.
#[allow(clippy::too_many_arguments)]
fn root_under_this_kernel(
    disk: &Path,
    c: bootdisk::Chosen,
    slot: Slot,
    version: &str,
    refused: &[String],
    fallback_from: Option<Slot>,
    demoted: Option<Slot>,
    verity: Option<String>,
    watchdog: Option<Watchdog>,
) -> Stage1Error {
    log(format!(
        "slot {slot} is the last bootable slot: booting its root under the boot stage's kernel \
         instead of its own"
    ));
    let handoff = Handoff {
        slot,
        trial: c.choice.tried,
        boot_stage: version.to_string(),
        refused: refused.join(","),
        fallback_from,
        demoted,
        verity,
    };
    let words = kexec::slot_cmdline("", &handoff);
    let (layout, ss) = (c.layout.clone(), c.sector_size);
    drop(c);
    hand_over(disk, &layout, ss, slot, watchdog, Some(words))
}

/// A slot on trial, or a successful slot whose last boot did not reach health (its count of
/// boots since health is above the one this boot added), has every block of its image read
/// through its verity device before it is handed over: corruption anywhere is caught now, in the
/// boot stage, and not only when (and if) the slot reads the bad block. Other boots read only
/// what they use, each block checked by the kernel as it is read.
fn check_whole_slot(
    c: &bootdisk::Chosen,
    slot: Slot,
    dev: &Path,
    v: &crate::update::record::SlotVerity,
) -> Result<(), String> {
    let f = c.choice.flags.get(slot);
    if !(c.choice.tried || (f.successful() && f.tries() > 1)) {
        return Ok(());
    }
    let t0 = std::time::Instant::now();
    bootdisk::read_all(dev, v.data_size)
        .map_err(|e| format!("its image does not match its dm-verity tree ({e})"))?;
    log(format!(
        "slot {slot}: all {} bytes of its image match its dm-verity tree ({} ms)",
        v.data_size,
        t0.elapsed().as_millis()
    ));
    Ok(())
}

/// Record that `slot` was refused and mark it failed (unless it is the last bootable slot).
/// Returns whether another slot may be tried now.
fn refuse(
    c: &mut bootdisk::Chosen,
    slot: Slot,
    r: Refusal,
    why: &str,
    refused: &mut Vec<String>,
) -> bool {
    refused.push(format!("{}:{}", slot.letter(), r.as_str()));
    let (marked, words) = bootdisk::mark_failed_unless_last(&mut c.dev, slot);
    log(format!("slot {slot} refused: {why}; {words}"));
    marked
}

/// The slot's own stage 1, after the boot stage's kexec: no choice, no try.
fn slot_stage(
    params: &KernelParams,
    disk: &Path,
    slot: Slot,
    watchdog: Option<Watchdog>,
) -> Stage1Error {
    let trial = params.trial.unwrap_or(false);
    let (mut dev, layout, flags) = match bootdisk::read_flags(disk) {
        Ok(x) => x,
        Err(e) => return e.into(),
    };
    if let Err(why) = bootctl::confirm_handoff(flags, slot, trial) {
        return Stage1Error::Handoff { slot, why };
    }
    log(format!(
        "slot {slot} handed over by the boot stage ({}, {})",
        if trial { "trial" } else { "good" },
        flags.get(slot)
    ));
    let ss = crate::block::BlockDevice::sector_size(&dev);
    let verity = bootdisk::slot_verity(&dev, &layout, slot);
    let recorded = verity.as_ref().map(|v| hex(&v.root_hash));
    if params.verity.is_some() && params.verity != recorded {
        return Stage1Error::Handoff {
            slot,
            why: format!(
                "the boot stage mapped it with root hash {}, but its record now says {}",
                params.verity.as_deref().unwrap_or_default(),
                recorded
                    .as_deref()
                    .unwrap_or("nothing (no dm-verity parameters)")
            ),
        };
    }
    if let Err((source_dev, error)) = bootdisk::mount_slot(
        disk,
        &layout,
        ss,
        slot,
        Path::new(NEWROOT),
        Path::new(SYS_BLOCK),
        verity.as_ref().map(|v| (v, dm::OnCorruption::Restart)),
    ) {
        let (_, marked) = bootdisk::mark_failed_unless_last(&mut dev, slot);
        return Stage1Error::RootDidNotMount {
            slot,
            source_dev,
            error,
            marked,
        };
    }
    drop(dev);
    if let Some(h) = &recorded {
        log(format!(
            "slot {slot}'s root is read through dm-verity (root hash {h}); a block that does \
             not match restarts the machine"
        ));
    }
    hand_over(disk, &layout, ss, slot, watchdog, None)
}

/// Mount STATE under the slot mounted at /newroot, switch root and execute stage 2.
/// `handoff` carries the hand-over words when there was no kexec (and so no command line).
fn hand_over(
    disk: &Path,
    layout: &Layout,
    sector_size: u64,
    slot: Slot,
    mut watchdog: Option<Watchdog>,
    handoff: Option<String>,
) -> Stage1Error {
    let newroot = Path::new(NEWROOT);
    log(format!("slot {slot} mounted"));
    if let Err(e) = bootdisk::mount_state(
        disk,
        layout,
        sector_size,
        &newroot.join("state"),
        Path::new(SYS_BLOCK),
    ) {
        return Stage1Error::State(e);
    }
    mounts::prepare_state(newroot);
    if let Err(e) = mounts::switch_root(newroot) {
        return e.into();
    }
    let mut argv = vec![
        STAGE2.to_string(),
        "--stage".into(),
        "2".into(),
        "--boot-disk".into(),
        disk.display().to_string(),
        "--slot".into(),
        slot.letter().into(),
    ];
    if let Some(h) = handoff {
        argv.push("--handoff".into());
        argv.push(h);
    }
    if let Some(w) = watchdog.take() {
        argv.push("--watchdog-fd".into());
        argv.push(w.raw_fd().to_string());
        // the descriptor stays open through exec (it is not close-on-exec): stage 2 owns it
        std::mem::forget(w);
    }
    let cargs: Vec<CString> = argv
        .iter()
        .filter_map(|a| CString::new(a.as_str()).ok())
        .collect();
    let path = c"/sbin/keel-init";
    match nix::unistd::execv(path, &cargs) {
        Ok(never) => match never {},
        Err(e) => Stage1Error::Exec(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sha2::{Digest, Sha256};

    fn slot_root(kernel: &[u8], initramfs: &[u8], record: Option<String>) -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir(d.path().join("boot")).unwrap();
        std::fs::write(d.path().join(SLOT_KERNEL), kernel).unwrap();
        std::fs::write(d.path().join(SLOT_INITRAMFS), initramfs).unwrap();
        let hex = |b: &[u8]| crate::update::record::hex(&Sha256::digest(b));
        let rec = record.unwrap_or_else(|| {
            serde_json::json!({
                "kernel_release": "6.1.0-47-amd64",
                "kernel_sha256": hex(kernel), "kernel_len": kernel.len(),
                "initramfs_sha256": hex(initramfs), "initramfs_len": initramfs.len(),
            })
            .to_string()
        });
        std::fs::write(d.path().join(SLOT_BOOT_RECORD), rec).unwrap();
        d
    }

    #[test]
    fn a_slot_whose_boot_files_match_their_record_is_ready() {
        let d = slot_root(b"kernel bytes", b"initramfs bytes", None);
        match check_slot_kernel(d.path()) {
            Ok(SlotKernel::Ready { record, .. }) => {
                assert_eq!(record.kernel_release, "6.1.0-47-amd64")
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_slot_without_boot_is_legacy_and_missing_or_altered_files_are_refused() {
        let empty = tempfile::tempdir().unwrap();
        assert!(matches!(
            check_slot_kernel(empty.path()),
            Ok(SlotKernel::Legacy)
        ));

        let d = slot_root(b"kernel", b"initramfs", None);
        std::fs::write(d.path().join(SLOT_KERNEL), b"kernEl").unwrap();
        let (r, why) = check_slot_kernel(d.path()).unwrap_err();
        assert_eq!(r, Refusal::KernelDigestMismatch);
        assert!(why.contains("the kernel (6 bytes"), "{why}");

        let d = slot_root(b"kernel", b"initramfs", None);
        std::fs::write(d.path().join(SLOT_INITRAMFS), b"initramfs+").unwrap();
        let (r, why) = check_slot_kernel(d.path()).unwrap_err();
        assert_eq!(r, Refusal::KernelDigestMismatch);
        assert!(why.contains("the initramfs (10 bytes"), "{why}");

        let d = slot_root(b"kernel", b"initramfs", None);
        std::fs::remove_file(d.path().join(SLOT_KERNEL)).unwrap();
        assert_eq!(
            check_slot_kernel(d.path()).unwrap_err().0,
            Refusal::KernelMissing
        );

        let d = slot_root(b"kernel", b"initramfs", None);
        std::fs::remove_file(d.path().join(SLOT_INITRAMFS)).unwrap();
        assert_eq!(
            check_slot_kernel(d.path()).unwrap_err().0,
            Refusal::InitramfsMissing
        );

        let d = slot_root(b"kernel", b"initramfs", Some("{not json".into()));
        let (r, why) = check_slot_kernel(d.path()).unwrap_err();
        assert_eq!(r, Refusal::KernelDigestMismatch);
        assert!(why.contains("keel-boot.json cannot be used"), "{why}");
    }

    #[test]
    fn the_version_comes_from_os_release() {
        assert_eq!(
            os_release_version("NAME=\"KeelOS\"\nVERSION_ID=\"2.0.0\"\n").as_deref(),
            Some("2.0.0")
        );
        assert_eq!(os_release_version("NAME=x\n"), None);
    }
}
