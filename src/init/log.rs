//! keel-init's own messages: one line each on standard error, which is the console when
//! keel-init is PID 1 (the kernel opens /dev/console for it), stamped with the monotonic clock
//! like the kernel's own messages. Stage 2 also keeps them in `/state/log/keel-init.log` (see
//! [`log_to_file`]), where the agent can read them over the control socket: a fleet has no
//! console. Never fails, never panics.

use super::logfile::LogFile;
use std::io::Write;
use std::sync::Mutex;

/// The name keel-init's own log goes by (`<log dir>/keel-init.log`, and in log requests).
pub const SELF: &str = "keel-init";

static FILE: Mutex<Option<LogFile>> = Mutex::new(None);

/// From now on, also append every message to `file`.
pub fn log_to_file(file: LogFile) {
    if let Ok(mut g) = FILE.lock() {
        *g = Some(file);
    }
}

/// Stop writing to the file (before STATE is unmounted); the console keeps the messages.
pub fn close_file() {
    if let Ok(mut g) = FILE.lock() {
        *g = None;
    }
}

/// Write one line: `keel-init: [seconds since boot] message`.
pub fn log(msg: impl std::fmt::Display) {
    let t = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| format!("[{:5}.{:03}] ", t.tv_sec(), t.tv_nsec() / 1_000_000))
        .unwrap_or_default();
    let line = format!("keel-init: {t}{msg}\n");
    let _ = std::io::stderr().lock().write_all(line.as_bytes());
    if let Ok(mut g) = FILE.lock() {
        if let Some(f) = g.as_mut() {
            let _ = f.write(line.as_bytes());
        }
    }
}
