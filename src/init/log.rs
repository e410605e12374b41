//! keel-init's own messages: one line each on standard error, which is the console when
//! keel-init is PID 1 (the kernel opens /dev/console for it). Never fails, never panics.

use std::io::Write;

/// Write one line prefixed with `keel-init:`.
pub fn log(msg: impl std::fmt::Display) {
    let line = format!("keel-init: {msg}\n");
    let _ = std::io::stderr().lock().write_all(line.as_bytes());
}
