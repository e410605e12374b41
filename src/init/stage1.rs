//! Stage 1: /init in the initramfs. Mounts the kernel file systems, loads the modules of the
//! manifest, arms the watchdog, finds the boot disk, runs the boot choice, mounts the chosen
//! slot and STATE, switches root and executes the slot's own keel-init as stage 2. Every
//! failure ends in a reboot; a root that does not mount is marked failed first.

use super::bootdisk::{self, BootRootError};
use super::cmdline::{self, KernelParams};
use super::log;
use super::modules;
use super::mounts;
use super::watchdog::Watchdog;
use std::ffi::CString;
use std::path::Path;
use std::time::Duration;

const NEWROOT: &str = "/newroot";
const SYS_BLOCK: &str = "/sys/class/block";
/// Stage 2 is the slot's own binary.
pub const STAGE2: &str = "/sbin/keel-init";

/// What went wrong in stage 1; the caller logs it and reboots.
#[derive(Debug, thiserror::Error)]
pub enum Stage1Error {
    #[error("no disk with the KeelOS labels appeared within {0:?}; check the disk and the virtio_blk module")]
    NoBootDisk(Duration),
    #[error(transparent)]
    Root(#[from] BootRootError),
    #[error("{0}")]
    State(String),
    #[error("switching to the new root failed: {0}")]
    Switch(#[from] mounts::MountError),
    #[error("executing {STAGE2} in the new root failed: {0}")]
    Exec(nix::Error),
}

fn kernel_params(cmdline: &Path) -> KernelParams {
    let text = std::fs::read_to_string(cmdline).unwrap_or_default();
    let (p, warnings) = cmdline::parse_kernel(&text);
    for w in warnings {
        log(w);
    }
    p
}

/// Run stage 1, with the kernel parameters read from `cmdline` (normally /proc/cmdline).
/// Returns only on failure: success ends in exec.
pub fn run(cmdline: &Path) -> Stage1Error {
    mounts::mount_early();
    let params = kernel_params(cmdline);
    let manifest = params
        .modules
        .clone()
        .unwrap_or_else(|| modules::MANIFEST.into());
    modules::load_all(&manifest, &mut |m| log(m));

    // arm the watchdog before anything that can hang; stage 2 inherits the descriptor
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
    let newroot = Path::new(NEWROOT);
    let root = match bootdisk::boot_root(&disk, newroot, sys_block) {
        Ok(r) => r,
        Err(e) => return e.into(),
    };
    log(format!(
        "slot {} mounted from {}",
        root.slot,
        root.source.display()
    ));
    if let Err(e) = bootdisk::mount_state(&disk, &root, &newroot.join("state"), sys_block) {
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
        root.slot.letter().into(),
    ];
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
