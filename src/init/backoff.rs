//! Restart decisions: whether a service that exited is started again, and after how long. Pure:
//! durations come in as arguments.

use crate::config::{BackoffConfig, RestartPolicy};
use std::time::Duration;

/// Whether a service that exited (successfully or not) is to be started again.
pub fn should_restart(policy: RestartPolicy, exited_ok: bool) -> bool {
    match policy {
        RestartPolicy::Always => true,
        RestartPolicy::OnFailure => !exited_ok,
        RestartPolicy::Never => false,
    }
}

/// The count of consecutive short runs after a run of `ran` that ended: a run of at least
/// `reset_after_ms` counts as healthy and starts the count again.
pub fn next_failures(previous: u32, ran: Duration, b: &BackoffConfig) -> u32 {
    if ran >= Duration::from_millis(b.reset_after_ms) {
        1
    } else {
        previous.saturating_add(1)
    }
}

/// The delay before restart number `failures` (1 = after the first exit): `initial * 2^(n-1)`,
/// capped at `max`. Never overflows.
pub fn delay(failures: u32, b: &BackoffConfig) -> Duration {
    let n = failures.max(1) - 1;
    let factor = 1u64.checked_shl(n.min(63)).unwrap_or(u64::MAX);
    let ms = b.initial_ms.saturating_mul(factor).min(b.max_ms);
    Duration::from_millis(ms)
}

#[cfg(test)]
mod tests {
    use super::*;

    const B: BackoffConfig = BackoffConfig {
        initial_ms: 100,
        max_ms: 5_000,
        reset_after_ms: 10_000,
    };

    #[test]
    fn doubles_up_to_the_cap() {
        let d: Vec<u64> = (1..=9).map(|n| delay(n, &B).as_millis() as u64).collect();
        assert_eq!(d, [100, 200, 400, 800, 1600, 3200, 5000, 5000, 5000]);
        assert_eq!(delay(0, &B), Duration::from_millis(100));
        assert_eq!(delay(u32::MAX, &B), Duration::from_millis(5000));
        let huge = BackoffConfig {
            initial_ms: u64::MAX / 2,
            max_ms: u64::MAX,
            reset_after_ms: 0,
        };
        assert_eq!(delay(40, &huge), Duration::from_millis(u64::MAX));
    }

    #[test]
    fn a_long_run_resets_the_count() {
        assert_eq!(next_failures(5, Duration::from_millis(9_999), &B), 6);
        assert_eq!(next_failures(5, Duration::from_millis(10_000), &B), 1);
        assert_eq!(next_failures(u32::MAX, Duration::ZERO, &B), u32::MAX);
    }

    #[test]
    fn policies() {
        use RestartPolicy::*;
        assert!(should_restart(Always, true) && should_restart(Always, false));
        assert!(!should_restart(OnFailure, true) && should_restart(OnFailure, false));
        assert!(!should_restart(Never, true) && !should_restart(Never, false));
    }
}
