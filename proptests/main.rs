//! Crash-injection property tests over the pure core.
mod flags;
