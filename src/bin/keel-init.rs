//! keel-init: PID 1 of a KeelOS node. Stage 1 in the initramfs, stage 2 in the slot's root
//! (see `keelos::init`). This file only chooses the stage and makes sure that whatever happens,
//! PID 1 ends in a reboot rather than a panic.

use keelos::init::{self, cmdline, log, mounts, stage1, stage2};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (a, unknown) = cmdline::parse_args(&args);
    let pid1 = nix::unistd::getpid().as_raw() == 1;
    if !pid1 {
        eprintln!(
            "keel-init must run as PID 1: it reaps every process and stops them all at \
             shutdown. To try it, run it as PID 1 of a new PID namespace: \
             unshare --pid --fork --mount-proc keel-init --stage 2 --state-dir DIR \
             --config FILE --control SOCKET"
        );
        std::process::exit(2);
    }
    // the kernel hands PID 1 every command-line word it does not know: not an error
    if !unknown.is_empty() {
        log(format!("ignoring arguments {unknown:?}"));
    }
    // stage 2 runs where STATE is mounted; the initramfs has no /state
    let stage = a
        .stage
        .unwrap_or(if mounts::is_mount_point(Path::new("/state")) {
            2
        } else {
            1
        });
    let opts = stage2::Stage2Options::from_args(&a);
    let outcome = catch_unwind(AssertUnwindSafe(|| match stage {
        1 => {
            let cmdline = a.cmdline.clone().unwrap_or_else(|| "/proc/cmdline".into());
            let e = stage1::run(&cmdline);
            log(format!("stage 1 failed: {e}"));
            if !matches!(e, stage1::Stage1Error::Root(_)) {
                // leave the message on the console for a moment before the reset
                std::thread::sleep(std::time::Duration::from_secs(5));
            }
        }
        _ => {
            let kind = stage2::run(&opts);
            stage2::finish(kind, &opts.state_dir);
        }
    }));
    if outcome.is_err() {
        init::log("keel-init panicked; rebooting");
    }
    stage2::emergency_reboot(&opts.state_dir)
}
