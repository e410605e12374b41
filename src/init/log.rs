//! keel-init's own messages: one line each on standard error, which is the console when
//! keel-init is PID 1 (the kernel opens /dev/console for it), stamped with the monotonic clock
//! like the kernel's own messages. Never fails, never panics.

use std::io::Write;

/// Write one line: `keel-init: [seconds since boot] message`.
pub fn log(msg: impl std::fmt::Display) {
    let t = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| format!("[{:5}.{:03}] ", t.tv_sec(), t.tv_nsec() / 1_000_000))
        .unwrap_or_default();
    let line = format!("keel-init: {t}{msg}\n");
    let _ = std::io::stderr().lock().write_all(line.as_bytes());
}
