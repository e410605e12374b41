//! The boot health window: when a boot counts as successful, when it has failed, and when the
//! watchdog may be petted. Pure: `now` (time since stage 2 started) and what was observed come
//! in as arguments; the driver performs what comes out.

use crate::config::AfterSuccess;
use std::time::Duration;

/// What the driver saw at one instant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Observation {
    /// A TCP connection to the agent's address succeeded.
    pub agent_serving: bool,
    /// The latest start time among the required services, or `None` when one of them is not
    /// running. A restart moves it forward, so the window starts again.
    pub required_up_since: Option<Duration>,
    /// The node's network is up: its static address applied, or a DHCP lease held (or no
    /// network was asked for and there is no interface).
    pub network_up: bool,
    /// For a node with a `kubernetes` section: whether kubelet's health endpoint answers `ok`
    /// (and, with `require_ready`, the API server has the node Ready). `None` for a node
    /// without one.
    pub kubernetes_ok: Option<bool>,
}

/// Where the boot stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BootHealth {
    /// Not yet healthy, deadline not reached.
    Booting,
    /// Healthy: the running slot is to be marked successful (once).
    Succeeded { at: Duration },
    /// The deadline passed without the node becoming healthy: reboot.
    DeadlineMissed { at: Duration },
}

/// What the driver is to do after an observation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HealthAction {
    /// Nothing changes.
    Wait,
    /// Mark the running slot successful now.
    MarkSuccessful,
    /// Reboot: health was not reached by the deadline.
    Reboot,
}

/// What the driver does with the watchdog.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WatchdogAction {
    Pet,
    /// Stop petting: the hardware resets the node unless something else reboots it first.
    Starve,
    /// Disarm it with the magic close.
    Close,
}

/// The health window state machine.
#[derive(Debug, Clone)]
pub struct HealthWindow {
    window: Duration,
    deadline: Duration,
    after_success: AfterSuccess,
    state: BootHealth,
    /// Since when every observation has had `kubernetes_ok` (a failed one starts it again).
    kubernetes_since: Option<Duration>,
}

impl HealthWindow {
    pub fn new(window: Duration, deadline: Duration, after_success: AfterSuccess) -> Self {
        HealthWindow {
            window,
            deadline,
            after_success,
            state: BootHealth::Booting,
            kubernetes_since: None,
        }
    }

    pub fn state(&self) -> BootHealth {
        self.state
    }

    /// Feed one observation taken at `now`. Returns [`HealthAction::MarkSuccessful`] or
    /// [`HealthAction::Reboot`] exactly once, on the transition.
    pub fn observe(&mut self, now: Duration, obs: Observation) -> HealthAction {
        if self.state != BootHealth::Booting {
            return HealthAction::Wait;
        }
        self.kubernetes_since = match obs.kubernetes_ok {
            Some(true) => Some(self.kubernetes_since.unwrap_or(now)),
            _ => None,
        };
        let full = |since: Duration| now.saturating_sub(since) >= self.window;
        let kubernetes = match obs.kubernetes_ok {
            None => true,
            Some(_) => self.kubernetes_since.is_some_and(full),
        };
        let stable = match obs.required_up_since {
            Some(up) => obs.agent_serving && obs.network_up && kubernetes && full(up),
            None => false,
        };
        if stable {
            self.state = BootHealth::Succeeded { at: now };
            HealthAction::MarkSuccessful
        } else if now >= self.deadline {
            self.state = BootHealth::DeadlineMissed { at: now };
            HealthAction::Reboot
        } else {
            HealthAction::Wait
        }
    }

    /// The watchdog while booting is petted only until the deadline; after success as
    /// configured; after a missed deadline never again, so that a reboot that hangs is still
    /// reset by the hardware.
    pub fn watchdog(&self, now: Duration) -> WatchdogAction {
        match self.state {
            BootHealth::Booting if now < self.deadline => WatchdogAction::Pet,
            BootHealth::Booting | BootHealth::DeadlineMissed { .. } => WatchdogAction::Starve,
            BootHealth::Succeeded { .. } => match self.after_success {
                AfterSuccess::KeepPetting => WatchdogAction::Pet,
                AfterSuccess::MagicClose => WatchdogAction::Close,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(x: u64) -> Duration {
        Duration::from_secs(x)
    }
    fn obs(agent: bool, since: Option<u64>) -> Observation {
        Observation {
            agent_serving: agent,
            required_up_since: since.map(s),
            network_up: true,
            kubernetes_ok: None,
        }
    }

    #[test]
    fn success_needs_the_agent_and_a_full_window() {
        let mut h = HealthWindow::new(s(30), s(300), AfterSuccess::KeepPetting);
        assert_eq!(h.observe(s(5), obs(false, Some(2))), HealthAction::Wait);
        // window full but agent not serving
        assert_eq!(h.observe(s(40), obs(false, Some(2))), HealthAction::Wait);
        // agent serving but a required service restarted at 35
        assert_eq!(h.observe(s(50), obs(true, Some(35))), HealthAction::Wait);
        // a required service down
        assert_eq!(h.observe(s(64), obs(true, None)), HealthAction::Wait);
        assert_eq!(h.watchdog(s(64)), WatchdogAction::Pet);
        assert_eq!(
            h.observe(s(65), obs(true, Some(35))),
            HealthAction::MarkSuccessful
        );
        assert_eq!(h.state(), BootHealth::Succeeded { at: s(65) });
        // only once
        assert_eq!(h.observe(s(66), obs(true, Some(35))), HealthAction::Wait);
        assert_eq!(h.watchdog(s(10_000)), WatchdogAction::Pet);
    }

    #[test]
    fn deadline_reboots_and_starves_the_watchdog() {
        let mut h = HealthWindow::new(s(30), s(300), AfterSuccess::KeepPetting);
        assert_eq!(h.observe(s(299), obs(true, Some(280))), HealthAction::Wait);
        assert_eq!(h.watchdog(s(299)), WatchdogAction::Pet);
        // the driver has not observed yet, but the deadline has passed: no more petting
        assert_eq!(h.watchdog(s(300)), WatchdogAction::Starve);
        assert_eq!(
            h.observe(s(300), obs(true, Some(280))),
            HealthAction::Reboot
        );
        assert_eq!(h.observe(s(400), obs(true, Some(0))), HealthAction::Wait);
        assert_eq!(h.watchdog(s(301)), WatchdogAction::Starve);
    }

    #[test]
    fn healthy_exactly_at_the_deadline_counts_as_success() {
        let mut h = HealthWindow::new(s(30), s(300), AfterSuccess::MagicClose);
        assert_eq!(
            h.observe(s(300), obs(true, Some(270))),
            HealthAction::MarkSuccessful
        );
        assert_eq!(h.watchdog(s(301)), WatchdogAction::Close);
    }

    #[test]
    fn a_network_that_never_comes_up_is_not_healthy() {
        let mut h = HealthWindow::new(s(30), s(300), AfterSuccess::KeepPetting);
        let down = Observation {
            network_up: false,
            ..obs(true, Some(0))
        };
        // agent serving and services up the whole window, but no lease / no address
        assert_eq!(h.observe(s(100), down), HealthAction::Wait);
        assert_eq!(h.observe(s(299), down), HealthAction::Wait);
        assert_eq!(h.observe(s(300), down), HealthAction::Reboot);

        // a lease that comes late still makes the boot healthy before the deadline
        let mut h = HealthWindow::new(s(30), s(300), AfterSuccess::KeepPetting);
        assert_eq!(h.observe(s(100), down), HealthAction::Wait);
        assert_eq!(
            h.observe(s(101), obs(true, Some(0))),
            HealthAction::MarkSuccessful
        );
    }

    #[test]
    fn kubelet_must_answer_for_a_whole_window() {
        let mut h = HealthWindow::new(s(30), s(300), AfterSuccess::KeepPetting);
        let k = |ok: bool| Observation {
            kubernetes_ok: Some(ok),
            ..obs(true, Some(0))
        };
        // services up since 0, but kubelet's health endpoint first answers at 20
        assert_eq!(h.observe(s(10), k(false)), HealthAction::Wait);
        assert_eq!(h.observe(s(20), k(true)), HealthAction::Wait);
        assert_eq!(h.observe(s(49), k(true)), HealthAction::Wait);
        // one failed answer starts the window again
        assert_eq!(h.observe(s(50), k(false)), HealthAction::Wait);
        assert_eq!(h.observe(s(51), k(true)), HealthAction::Wait);
        assert_eq!(h.observe(s(80), k(true)), HealthAction::Wait);
        assert_eq!(h.observe(s(81), k(true)), HealthAction::MarkSuccessful);

        // a kubelet that never answers fails the boot at the deadline
        let mut h = HealthWindow::new(s(30), s(300), AfterSuccess::KeepPetting);
        assert_eq!(h.observe(s(299), k(false)), HealthAction::Wait);
        assert_eq!(h.observe(s(300), k(false)), HealthAction::Reboot);
    }
}
