//! Crash-injection property tests over the pure core (see each module's first comment).
#![allow(clippy::panic, clippy::unwrap_used)] // a test crate: failing loudly is its job
mod common;
mod flags;
mod update;
