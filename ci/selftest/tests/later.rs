//! Runs after the failing binary: with --no-fail-fast it must still run.
#[test]
fn later_binary_still_runs() {}
