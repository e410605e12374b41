//! Stage 2's network: which way the node gets its address (a static one, or DHCP by default),
//! bringing it up, the DHCP lease kept by a background thread, resolv.conf, and the clock set by
//! SNTP. The choices ([`plan`], [`ntp_servers`], [`network_required`]) are pure; [`start`]
//! carries them out and never blocks PID 1: the first lease is waited for in the DHCP thread,
//! and the health judge reads [`NetworkUp`].
//!
//! An interface that already has an address when stage 2 starts (a host running keel-init in a
//! test, a container) was configured by someone else: it is left alone and counts as up.

use super::cmdline::KernelParams;
use super::log;
use super::net;
use crate::config::{Ipv4Cidr, NodeConfig};
use crate::net::dhcp::{choose_hostname, Lease};
use crate::net::io::{sync_clock, DhcpEvent, DhcpLink};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::net::RESOLV_CONF;
/// How long one wait for the first lease lasts before it is logged as an attempt; the client
/// keeps asking after it (its own retransmissions) until the boot deadline decides.
pub const LEASE_ATTEMPT: Duration = Duration::from_secs(20);
/// One SNTP query's timeout.
pub const SNTP_TIMEOUT: Duration = Duration::from_secs(5);
/// How often the clock is synced again after the first sync.
pub const SNTP_EVERY: Duration = Duration::from_secs(15 * 60);

/// How the node gets its address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    /// `keel.ip=` or the configuration's `network.address`.
    Static {
        iface: Option<String>,
        address: Ipv4Cidr,
        gateway: Option<Ipv4Addr>,
    },
    /// No address anywhere: ask a DHCP server.
    Dhcp { iface: Option<String> },
}

/// The plan: the kernel command line wins over the configuration, field by field (as before
/// DHCP); without an address from either, DHCP. `iface: None` means the first NIC
/// ([`net::choose_interface`]).
pub fn plan(cfg: &NodeConfig, params: &KernelParams) -> Plan {
    let n = cfg.network.as_ref();
    let iface = params
        .iface
        .clone()
        .or_else(|| n.and_then(|n| n.interface.clone()));
    match params.ip.or_else(|| cfg.static_address()) {
        Some(address) => Plan::Static {
            iface,
            address,
            gateway: params
                .gateway
                .or_else(|| n.and_then(|n| n.gateway.as_ref()?.parse().ok())),
        },
        None => Plan::Dhcp { iface },
    }
}

/// Whether the boot needs the network to be healthy when there is no interface at all: only
/// when something asked for one (a `network` section, or `keel.ip=`/`keel.iface=`). A node
/// without a NIC and without network configuration runs without a network.
pub fn network_required(cfg: &NodeConfig, params: &KernelParams) -> bool {
    cfg.network.is_some() || params.ip.is_some() || params.iface.is_some()
}

/// The SNTP servers: the configured ones, else the lease's (option 42).
pub fn ntp_servers(cfg: &NodeConfig, lease: Option<&Lease>) -> Vec<String> {
    if !cfg.ntp_servers.is_empty() {
        return cfg.ntp_servers.clone();
    }
    lease
        .map(|l| l.ntp_servers.iter().map(|a| a.to_string()).collect())
        .unwrap_or_default()
}

/// One line for the log about a lease.
pub fn describe(lease: &Lease) -> String {
    let list = |v: &[Ipv4Addr]| {
        if v.is_empty() {
            "none".to_string()
        } else {
            v.iter()
                .map(|a| a.to_string())
                .collect::<Vec<_>>()
                .join(",")
        }
    };
    format!(
        "{}/{} router {} dns {} ntp {} lease {} s from server {}",
        lease.address.addr,
        lease.address.prefix,
        lease
            .router
            .map(|r| r.to_string())
            .unwrap_or_else(|| "none".into()),
        list(&lease.dns_servers),
        list(&lease.ntp_servers),
        lease.lease_time.as_secs(),
        lease.server_id
    )
}

/// Whether the node's network is up, as the health judge sees it.
#[derive(Debug, Clone, Default)]
pub struct NetworkUp(Arc<AtomicBool>);

impl NetworkUp {
    pub fn get(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
    fn set(&self, up: bool) {
        self.0.store(up, Ordering::Relaxed)
    }
}

/// Bring the network up as [`plan`] says: a static address now, DHCP in a thread that keeps the
/// lease; then SNTP in a thread when there are servers. Everything is logged; nothing fails.
pub fn start(cfg: &NodeConfig, params: &KernelParams) -> NetworkUp {
    let up = NetworkUp::default();
    let p = plan(cfg, params);
    let named = match &p {
        Plan::Static { iface, .. } | Plan::Dhcp { iface } => iface.clone(),
    };
    let iface =
        named.or_else(|| net::choose_interface(&net::list_interfaces(Path::new("/sys/class/net"))));
    let Some(iface) = iface else {
        if network_required(cfg, params) {
            log(
                "network: configured, but there is no network interface; the boot cannot \
                 become healthy without it",
            );
        } else {
            log("network: no network interface and none configured; running without a network");
            up.set(true);
        }
        return up;
    };
    match p {
        Plan::Static {
            address, gateway, ..
        } => match net::configure(&iface, address, gateway) {
            Ok(()) => {
                log(format!(
                    "network: {iface} {}/{}{} (static)",
                    address.addr,
                    address.prefix,
                    gateway.map(|g| format!(" via {g}")).unwrap_or_default()
                ));
                up.set(true);
                spawn_sntp(ntp_servers(cfg, None));
            }
            Err(e) => log(format!(
                "network: the static address {}/{} was not applied: {e}",
                address.addr, address.prefix
            )),
        },
        Plan::Dhcp { .. } => {
            if let Ok((a, m)) = net::address(&iface) {
                log(format!(
                    "network: {iface} already has {a} (netmask {m}), configured before \
                     keel-init; leaving it, no DHCP"
                ));
                up.set(true);
                spawn_sntp(ntp_servers(cfg, None));
                return up;
            }
            spawn_dhcp(iface, cfg.clone(), up.clone());
        }
    }
    up
}

fn spawn_dhcp(iface: String, cfg: NodeConfig, up: NetworkUp) {
    let r = std::thread::Builder::new()
        .name("dhcp".into())
        .spawn(move || dhcp_thread(&iface, &cfg, &up));
    if let Err(e) = r {
        log(format!("network: cannot start the DHCP thread: {e}"));
    }
}

fn dhcp_thread(iface: &str, cfg: &NodeConfig, up: &NetworkUp) {
    let resolv = PathBuf::from(RESOLV_CONF);
    if let Some(d) = resolv.parent() {
        if let Err(e) = std::fs::create_dir_all(d) {
            log(format!("network: cannot create {}: {e}", d.display()));
        }
    }
    let mut link = match DhcpLink::open(iface, cfg.hostname.clone(), Some(resolv.clone())) {
        Ok(l) => l,
        Err(e) => {
            log(format!("network: DHCP on {iface}: {e}"));
            return;
        }
    };
    log(format!("network: DHCP on {iface}: asking for a lease"));
    let started = Instant::now();
    let mut attempt = 1u32;
    let lease = loop {
        match link.next_event(Some(Instant::now() + LEASE_ATTEMPT)) {
            Ok(Some(DhcpEvent::Bound(l))) => break l,
            Ok(Some(ev)) => on_event(&ev, iface, &resolv, cfg, up),
            Ok(None) => {
                log(format!(
                    "network: DHCP on {iface}: no lease after {} s (attempt {attempt}); still \
                     asking",
                    started.elapsed().as_secs()
                ));
                attempt += 1;
            }
            Err(e) => {
                log(format!("network: DHCP on {iface}: {e}; retrying in 5 s"));
                std::thread::sleep(Duration::from_secs(5));
            }
        }
    };
    on_event(&DhcpEvent::Bound(lease.clone()), iface, &resolv, cfg, up);
    spawn_sntp(ntp_servers(cfg, Some(&lease)));
    let r = link.run(|ev| on_event(ev, iface, &resolv, cfg, up));
    if let Err(e) = r {
        log(format!(
            "network: DHCP on {iface} stopped: {e}; the lease is not renewed any more"
        ));
    }
}

fn on_event(ev: &DhcpEvent, iface: &str, resolv: &Path, cfg: &NodeConfig, up: &NetworkUp) {
    match ev {
        DhcpEvent::Bound(l) => {
            log(format!("network: {iface} DHCP lease {}", describe(l)));
            log_resolv_conf(resolv);
            // a configured host name was set at start; the lease's is used only without one
            if cfg.hostname.is_none() {
                if let Some(h) = choose_hostname(None, l) {
                    match nix::unistd::sethostname(&h) {
                        Ok(()) => log(format!("network: host name {h:?} from the lease")),
                        Err(e) => log(format!("network: cannot set the host name {h:?}: {e}")),
                    }
                }
            }
            up.set(true);
        }
        DhcpEvent::Renewed { lease, rebinding } => {
            log(format!(
                "network: {iface} DHCP lease {} ({})",
                describe(lease),
                if *rebinding { "rebound" } else { "renewed" }
            ));
            up.set(true);
        }
        DhcpEvent::Lost(l) => {
            log(format!(
                "network: {iface} lost its DHCP lease of {}/{}; asking anew",
                l.address.addr, l.address.prefix
            ));
            up.set(false);
        }
    }
}

/// Log the resolver lines as written, so the console shows what the node resolves with.
fn log_resolv_conf(path: &Path) {
    match std::fs::read_to_string(path) {
        Ok(t) => {
            let lines: Vec<&str> = t
                .lines()
                .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
                .collect();
            let said = if lines.is_empty() {
                "no resolver in the lease".to_string()
            } else {
                lines.join("; ")
            };
            log(format!("network: wrote {}: {said}", path.display()));
        }
        Err(e) => log(format!("network: cannot read back {}: {e}", path.display())),
    }
}

fn spawn_sntp(servers: Vec<String>) {
    if servers.is_empty() {
        return;
    }
    let r = std::thread::Builder::new()
        .name("sntp".into())
        .spawn(move || {
            let mut first = true;
            loop {
                match sync_clock(&servers, SNTP_TIMEOUT, first) {
                    Ok((server, sample, adj, failed)) => {
                        log(format!(
                            "clock: {adj:?} from {server} (offset {} ms, delay {} ms, stratum \
                             {})",
                            sample.offset_ns / 1_000_000,
                            sample.delay_ns / 1_000_000,
                            sample.stratum
                        ));
                        for f in failed {
                            log(format!("clock: {f}"));
                        }
                        first = false;
                    }
                    Err(e) => log(format!(
                        "clock: SNTP sync with {} failed: {e}",
                        servers.join(", ")
                    )),
                }
                std::thread::sleep(SNTP_EVERY);
            }
        });
    if let Err(e) = r {
        log(format!("clock: cannot start the SNTP thread: {e}"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(json: &str) -> NodeConfig {
        crate::config::parse(Path::new("n.json"), json.as_bytes()).unwrap()
    }

    fn lease() -> Lease {
        Lease {
            address: "10.0.2.15/24".parse().unwrap(),
            router: Some(Ipv4Addr::new(10, 0, 2, 2)),
            dns_servers: vec![Ipv4Addr::new(10, 0, 2, 3)],
            domain: None,
            search: Vec::new(),
            hostname: Some("from-lease".into()),
            ntp_servers: vec![Ipv4Addr::new(10, 0, 2, 4)],
            lease_time: Duration::from_secs(86400),
            t1: Duration::from_secs(43200),
            t2: Duration::from_secs(75600),
            server_id: Ipv4Addr::new(10, 0, 2, 2),
        }
    }

    #[test]
    fn dhcp_without_an_address_static_with_one() {
        let none = KernelParams::default();
        assert_eq!(plan(&cfg("{}"), &none), Plan::Dhcp { iface: None });
        assert_eq!(
            plan(&cfg(r#"{"network": {"interface": "eth1"}}"#), &none),
            Plan::Dhcp {
                iface: Some("eth1".into())
            }
        );
        let stat = cfg(r#"{"network": {"address": "10.0.2.15/24", "gateway": "10.0.2.2"}}"#);
        assert_eq!(
            plan(&stat, &none),
            Plan::Static {
                iface: None,
                address: "10.0.2.15/24".parse().unwrap(),
                gateway: Some(Ipv4Addr::new(10, 0, 2, 2)),
            }
        );
    }

    #[test]
    fn the_command_line_wins() {
        let (params, w) = super::super::cmdline::parse_kernel(
            "keel.ip=192.168.1.5/24 keel.gw=192.168.1.1 keel.iface=ens3",
        );
        assert!(w.is_empty(), "{w:?}");
        let want = Plan::Static {
            iface: Some("ens3".into()),
            address: "192.168.1.5/24".parse().unwrap(),
            gateway: Some(Ipv4Addr::new(192, 168, 1, 1)),
        };
        assert_eq!(plan(&cfg("{}"), &params), want);
        assert_eq!(
            plan(
                &cfg(r#"{"network": {"address": "10.0.2.15/24", "gateway": "10.0.2.2"}}"#),
                &params
            ),
            want
        );
        // keel.ip= alone keeps the configuration's gateway
        let (ip_only, _) = super::super::cmdline::parse_kernel("keel.ip=10.0.2.16/24");
        assert_eq!(
            plan(
                &cfg(r#"{"network": {"address": "10.0.2.15/24", "gateway": "10.0.2.2"}}"#),
                &ip_only
            ),
            Plan::Static {
                iface: None,
                address: "10.0.2.16/24".parse().unwrap(),
                gateway: Some(Ipv4Addr::new(10, 0, 2, 2)),
            }
        );
        assert!(network_required(&cfg("{}"), &ip_only));
        assert!(!network_required(&cfg("{}"), &KernelParams::default()));
        assert!(network_required(
            &cfg(r#"{"network": {}}"#),
            &KernelParams::default()
        ));
    }

    #[test]
    fn configured_ntp_servers_win_over_the_lease() {
        let l = lease();
        assert_eq!(ntp_servers(&cfg("{}"), Some(&l)), ["10.0.2.4"]);
        assert!(ntp_servers(&cfg("{}"), None).is_empty());
        assert_eq!(
            ntp_servers(&cfg(r#"{"ntp_servers": ["pool.ntp.org"]}"#), Some(&l)),
            ["pool.ntp.org"]
        );
    }

    #[test]
    fn a_lease_is_described_in_one_line() {
        assert_eq!(
            describe(&lease()),
            "10.0.2.15/24 router 10.0.2.2 dns 10.0.2.3 ntp 10.0.2.4 lease 86400 s from server \
             10.0.2.2"
        );
    }
}
