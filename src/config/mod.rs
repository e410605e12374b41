//! The node configuration: what keel-init supervises and how it judges a boot healthy.
//!
//! This module owns the schema of `/state/config/node.json` (serde structs with defaults that
//! make an absent file a working node), [`NodeConfig::validate`], which reports every problem at
//! once, and the atomic [`load`] and [`store`] of the file on STATE. It never starts anything,
//! never reads a clock and never writes anywhere but the path it is given (and a temporary file
//! beside it).

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};

pub mod kubernetes;
pub use kubernetes::KubernetesConfig;

/// The schema version this code reads and writes.
pub const CONFIG_VERSION: u32 = 1;
/// Where the node configuration lives on a node.
pub const NODE_CONFIG_PATH: &str = "/state/config/node.json";
/// The service that is always supervised: the node is unmanageable without it.
pub const AGENT: &str = "keel-agent";

/// The node configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    #[serde(default = "default_version")]
    pub version: u32,
    /// Set with sethostname(2) at stage 2 when given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    /// The network of one interface: a static address, or DHCP when the section is absent or
    /// has no `address`. The kernel command line (`keel.ip=`, `keel.gw=`, `keel.iface=`) takes
    /// precedence.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<NetworkConfig>,
    /// SNTP servers (host names or IPv4 addresses, optionally with `:port`) the clock is set
    /// from after the network is up; the DHCP lease's NTP servers (option 42) are used when
    /// this is empty.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ntp_servers: Vec<String>,
    /// The supervised services, started in dependency order.
    #[serde(default = "default_services")]
    pub services: Vec<ServiceConfig>,
    #[serde(default)]
    pub health: HealthConfig,
    #[serde(default)]
    pub watchdog: WatchdogConfig,
    #[serde(default)]
    pub shutdown: ShutdownConfig,
    #[serde(default)]
    pub logs: LogConfig,
    /// How the node joins a Kubernetes cluster; without it kubelet is not started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kubernetes: Option<KubernetesConfig>,
}

fn default_version() -> u32 {
    CONFIG_VERSION
}

impl Default for NodeConfig {
    fn default() -> Self {
        NodeConfig {
            version: CONFIG_VERSION,
            hostname: None,
            network: None,
            ntp_servers: Vec::new(),
            services: default_services(),
            health: HealthConfig::default(),
            watchdog: WatchdogConfig::default(),
            shutdown: ShutdownConfig::default(),
            logs: LogConfig::default(),
            kubernetes: None,
        }
    }
}

/// The network of one interface: a static IPv4 address, or DHCP without one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkConfig {
    /// Interface name; `None`: the first virtio NIC (else the first NIC).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interface: Option<String>,
    /// Address with prefix length, e.g. `10.0.2.15/24`; `None`: DHCP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
    /// Default gateway, e.g. `10.0.2.2`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<String>,
}

/// When a service is started again after it exits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RestartPolicy {
    Always,
    OnFailure,
    Never,
}

/// Exponential backoff between restarts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackoffConfig {
    /// The delay after the first failure, in milliseconds; it doubles with each further one.
    #[serde(default = "default_initial_ms")]
    pub initial_ms: u64,
    /// The longest delay, in milliseconds.
    #[serde(default = "default_max_ms")]
    pub max_ms: u64,
    /// A run at least this long (ms) counts as healthy and resets the doubling.
    #[serde(default = "default_reset_ms")]
    pub reset_after_ms: u64,
}

fn default_initial_ms() -> u64 {
    500
}
fn default_max_ms() -> u64 {
    30_000
}
fn default_reset_ms() -> u64 {
    60_000
}

impl Default for BackoffConfig {
    fn default() -> Self {
        BackoffConfig {
            initial_ms: default_initial_ms(),
            max_ms: default_max_ms(),
            reset_after_ms: default_reset_ms(),
        }
    }
}

/// One supervised service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceConfig {
    /// Unique name; also the log file name (`/state/log/<name>.log`).
    pub name: String,
    /// Absolute path of the executable. Never run through a shell.
    pub path: String,
    /// Arguments. `{boot_disk}`, `{slot}`, `{state_dir}` and `{control}` are replaced with what
    /// keel-init knows of the running node.
    #[serde(default)]
    pub args: Vec<String>,
    /// Environment on top of `PATH=/usr/sbin:/usr/bin:/sbin:/bin`; nothing else is inherited.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Services that must be running before this one starts (and that stop after it).
    #[serde(default)]
    pub after: Vec<String>,
    #[serde(default = "default_restart")]
    pub restart: RestartPolicy,
    #[serde(default)]
    pub backoff: BackoffConfig,
    /// Start only when the image has the binary (kubelet); a missing binary is then no error.
    #[serde(default)]
    pub optional: bool,
}

fn default_restart() -> RestartPolicy {
    RestartPolicy::Always
}

impl ServiceConfig {
    /// A service with defaults for everything but its name, path and arguments.
    pub fn new(name: &str, path: &str, args: &[&str]) -> Self {
        ServiceConfig {
            name: name.to_string(),
            path: path.to_string(),
            args: args.iter().map(|s| s.to_string()).collect(),
            env: BTreeMap::new(),
            after: Vec::new(),
            restart: RestartPolicy::Always,
            backoff: BackoffConfig::default(),
            optional: false,
        }
    }
}

/// The services of a node without a configuration file: the agent, containerd, and kubelet when
/// the image carries it.
pub fn default_services() -> Vec<ServiceConfig> {
    let agent = ServiceConfig::new(
        AGENT,
        "/usr/bin/keel-agent",
        &[
            "--disk",
            "{boot_disk}",
            "--listen",
            "0.0.0.0:50051",
            "--pki",
            "/state/pki",
            "--state-dir",
            "{state_dir}",
            "--control",
            "{control}",
        ],
    );
    let containerd = ServiceConfig::new("containerd", "/usr/bin/containerd", &[]);
    // its flags come from the kubernetes section (crate::kube::node_services); without one it
    // is not started
    let mut kubelet = ServiceConfig::new("kubelet", "/usr/bin/kubelet", &[]);
    kubelet.after = vec!["containerd".to_string()];
    kubelet.optional = true;
    vec![agent, containerd, kubelet]
}

/// How a boot is judged healthy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthConfig {
    /// The agent is serving when a TCP connection to this address succeeds.
    #[serde(default = "default_agent_addr")]
    pub agent_addr: String,
    /// Services that must stay up for the whole window (the agent always must).
    #[serde(default = "default_required")]
    pub required: Vec<String>,
    /// How long (seconds) the required services must stay up.
    #[serde(default = "default_window")]
    pub window_secs: u64,
    /// If the node is not healthy this many seconds after stage 2 starts, it reboots.
    #[serde(default = "default_deadline")]
    pub boot_deadline_secs: u64,
}

fn default_agent_addr() -> String {
    "127.0.0.1:50051".to_string()
}
fn default_required() -> Vec<String> {
    vec![AGENT.to_string(), "containerd".to_string()]
}
fn default_window() -> u64 {
    30
}
fn default_deadline() -> u64 {
    300
}

impl Default for HealthConfig {
    fn default() -> Self {
        HealthConfig {
            agent_addr: default_agent_addr(),
            required: default_required(),
            window_secs: default_window(),
            boot_deadline_secs: default_deadline(),
        }
    }
}

/// What happens to the watchdog once the boot is marked successful.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AfterSuccess {
    /// Keep petting it: a hung keel-init then resets the node.
    KeepPetting,
    /// Disarm it with the magic close ('V').
    MagicClose,
}

/// The hardware watchdog.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WatchdogConfig {
    /// The device; `None`: no watchdog.
    #[serde(default = "default_wd_device")]
    pub device: Option<String>,
    /// Seconds without a pet before the hardware resets the node.
    #[serde(default = "default_wd_timeout")]
    pub timeout_secs: u32,
    #[serde(default = "default_after_success")]
    pub after_success: AfterSuccess,
}

fn default_wd_device() -> Option<String> {
    Some("/dev/watchdog".to_string())
}
fn default_wd_timeout() -> u32 {
    60
}
fn default_after_success() -> AfterSuccess {
    AfterSuccess::KeepPetting
}

impl Default for WatchdogConfig {
    fn default() -> Self {
        WatchdogConfig {
            device: default_wd_device(),
            timeout_secs: default_wd_timeout(),
            after_success: default_after_success(),
        }
    }
}

/// Stopping services.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShutdownConfig {
    /// How long (ms) a service gets between SIGTERM and SIGKILL.
    #[serde(default = "default_grace")]
    pub grace_ms: u64,
}

fn default_grace() -> u64 {
    10_000
}

impl Default for ShutdownConfig {
    fn default() -> Self {
        ShutdownConfig {
            grace_ms: default_grace(),
        }
    }
}

/// Service log files.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    /// A log file is rotated before it would grow past this size.
    #[serde(default = "default_log_max")]
    pub max_bytes: u64,
    /// Rotated files kept (`<name>.log.1` .. `<name>.log.<keep>`).
    #[serde(default = "default_log_keep")]
    pub keep: u32,
}

fn default_log_max() -> u64 {
    4 << 20
}
fn default_log_keep() -> u32 {
    3
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            max_bytes: default_log_max(),
            keep: default_log_keep(),
        }
    }
}

/// A parsed `a.b.c.d/len`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ipv4Cidr {
    pub addr: Ipv4Addr,
    pub prefix: u8,
}

impl Ipv4Cidr {
    pub fn netmask(self) -> Ipv4Addr {
        let bits = if self.prefix == 0 {
            0
        } else {
            u32::MAX << (32 - u32::from(self.prefix))
        };
        Ipv4Addr::from(bits)
    }
}

impl std::str::FromStr for Ipv4Cidr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (a, p) = s
            .split_once('/')
            .ok_or_else(|| format!("{s:?} has no prefix length; write it like 10.0.2.15/24"))?;
        let addr: Ipv4Addr = a
            .parse()
            .map_err(|_| format!("{a:?} is not an IPv4 address"))?;
        let prefix: u8 = p
            .parse()
            .ok()
            .filter(|p| *p <= 32)
            .ok_or_else(|| format!("prefix length {p:?} must be a number from 0 to 32"))?;
        Ok(Ipv4Cidr { addr, prefix })
    }
}

/// Whether `s` can name an SNTP server: an IP address, a host name, either with `:port`
/// (an IPv6 address with a port in brackets). Says why not otherwise.
pub fn valid_ntp_server(s: &str) -> Result<(), &'static str> {
    if s.parse::<std::net::IpAddr>().is_ok() || s.parse::<SocketAddr>().is_ok() {
        return Ok(());
    }
    let (host, port) = match s.rsplit_once(':') {
        Some((h, p)) => (h, Some(p)),
        None => (s, None),
    };
    if let Some(p) = port {
        if !p.parse::<u16>().is_ok_and(|p| p > 0) {
            return Err("has a port that is not a number from 1 to 65535");
        }
    }
    if host.parse::<Ipv4Addr>().is_ok() || crate::net::dhcp::valid_dns_name(host) {
        Ok(())
    } else {
        Err("is not a host name or IP address (optionally with :port), like pool.ntp.org or 10.0.2.2")
    }
}

/// Whether `name` may name a service: it becomes a file name under /state/log.
pub fn valid_service_name(name: &str) -> bool {
    let b = name.as_bytes();
    !b.is_empty()
        && b.len() <= 64
        && b[0].is_ascii_alphanumeric()
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
}

impl NodeConfig {
    /// Every problem with the configuration, each naming the field and what to do; empty when
    /// the configuration is usable.
    pub fn validate(&self) -> Vec<String> {
        let mut errs = Vec::new();
        if self.version != CONFIG_VERSION {
            errs.push(format!(
                "version: {} is not supported; this keel-init reads version {CONFIG_VERSION}",
                self.version
            ));
        }
        if let Some(h) = &self.hostname {
            let ok = !h.is_empty()
                && h.len() <= 64
                && h.split('.').all(|l| {
                    !l.is_empty()
                        && !l.starts_with('-')
                        && l.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'-')
                });
            if !ok {
                errs.push(format!(
                    "hostname: {h:?} is not a valid host name (letters, digits, '-' and '.', \
                     at most 64 characters)"
                ));
            }
        }
        if let Some(n) = &self.network {
            if let Some(Err(e)) = n.address.as_ref().map(|a| a.parse::<Ipv4Cidr>()) {
                errs.push(format!("network.address: {e}"));
            }
            if n.address.is_none() && n.gateway.is_some() {
                errs.push(
                    "network.gateway: a gateway needs a static network.address; with DHCP the \
                     lease names the router (remove the gateway or add the address)"
                        .to_string(),
                );
            }
            if let Some(g) = &n.gateway {
                if g.parse::<Ipv4Addr>().is_err() {
                    errs.push(format!("network.gateway: {g:?} is not an IPv4 address"));
                }
            }
            if let Some(i) = &n.interface {
                if i.is_empty() || i.len() > 15 || i.contains('/') || i.contains('\0') {
                    errs.push(format!(
                        "network.interface: {i:?} is not an interface name (1 to 15 \
                         characters, no '/')"
                    ));
                }
            }
        }
        for (i, server) in self.ntp_servers.iter().enumerate() {
            if let Err(why) = valid_ntp_server(server) {
                errs.push(format!("ntp_servers[{i}]: {server:?} {why}"));
            }
        }
        let mut names = BTreeMap::new();
        for (i, s) in self.services.iter().enumerate() {
            let at = format!("services[{i}] ({})", s.name);
            if !valid_service_name(&s.name) {
                errs.push(format!(
                    "{at}: name must be 1 to 64 letters, digits, '-', '_' or '.', starting with \
                     a letter or digit"
                ));
            }
            if s.name == crate::init::log::SELF {
                errs.push(format!(
                    "{at}: the name {} is keel-init's own (its log file); choose another",
                    s.name
                ));
            }
            if names.insert(s.name.as_str(), i).is_some() {
                errs.push(format!(
                    "{at}: another service has the same name; names must be unique"
                ));
            }
            if !s.path.starts_with('/') {
                errs.push(format!(
                    "{at}: path {:?} must be absolute (keel-init runs no shell and searches no \
                     PATH)",
                    s.path
                ));
            }
            for a in &s.args {
                if a.contains('\0') {
                    errs.push(format!("{at}: argument {a:?} contains a NUL byte"));
                }
            }
            for (k, v) in &s.env {
                if k.is_empty() || k.contains('=') || k.contains('\0') || v.contains('\0') {
                    errs.push(format!(
                        "{at}: environment variable {k:?} needs a name without '=' or NUL and a \
                         value without NUL"
                    ));
                }
            }
            let b = s.backoff;
            if b.initial_ms == 0 {
                errs.push(format!("{at}: backoff.initial_ms must be at least 1"));
            }
            if b.max_ms < b.initial_ms {
                errs.push(format!(
                    "{at}: backoff.max_ms ({}) is below backoff.initial_ms ({})",
                    b.max_ms, b.initial_ms
                ));
            }
        }
        for (i, s) in self.services.iter().enumerate() {
            for d in &s.after {
                if d == &s.name {
                    errs.push(format!(
                        "services[{i}] ({}): cannot start after itself",
                        s.name
                    ));
                } else if !names.contains_key(d.as_str()) {
                    errs.push(format!(
                        "services[{i}] ({}): after names {d:?}, which is not a service",
                        s.name
                    ));
                }
            }
        }
        if let Some(c) = crate::init::order::find_cycle(&self.services) {
            errs.push(format!(
                "services: {}",
                crate::init::order::OrderError::Cycle(c)
            ));
        }
        match self.services.iter().find(|s| s.name == AGENT) {
            None => errs.push(format!(
                "services: there is no {AGENT} service; the node cannot be managed without it"
            )),
            Some(a) if a.optional => errs.push(format!(
                "services: {AGENT} cannot be optional; the node cannot be managed without it"
            )),
            Some(_) => {}
        }
        let h = &self.health;
        if h.agent_addr.parse::<SocketAddr>().is_err() {
            errs.push(format!(
                "health.agent_addr: {:?} is not an address with a port, like 127.0.0.1:50051",
                h.agent_addr
            ));
        }
        for r in &h.required {
            if !names.contains_key(r.as_str()) {
                errs.push(format!("health.required: {r:?} is not a service"));
            }
        }
        if h.boot_deadline_secs <= h.window_secs {
            errs.push(format!(
                "health.boot_deadline_secs ({}) must be longer than health.window_secs ({}), or \
                 no boot can succeed",
                h.boot_deadline_secs, h.window_secs
            ));
        }
        let w = &self.watchdog;
        if !(1..=3600).contains(&w.timeout_secs) {
            errs.push(format!(
                "watchdog.timeout_secs: {} is outside 1..=3600",
                w.timeout_secs
            ));
        }
        if let Some(d) = &w.device {
            if !d.starts_with('/') {
                errs.push(format!("watchdog.device: {d:?} must be an absolute path"));
            }
        }
        if self.logs.max_bytes < 4096 {
            errs.push(format!(
                "logs.max_bytes: {} is below the minimum of 4096",
                self.logs.max_bytes
            ));
        }
        if !(1..=20).contains(&self.logs.keep) {
            errs.push(format!("logs.keep: {} is outside 1..=20", self.logs.keep));
        }
        if let Some(k) = &self.kubernetes {
            errs.extend(k.validate());
        }
        errs
    }

    /// The static address the configuration asks for, if any (`None`: DHCP, or no network
    /// section). Only meaningful on a validated configuration: an unparsable address is `None`.
    pub fn static_address(&self) -> Option<Ipv4Cidr> {
        self.network.as_ref()?.address.as_ref()?.parse().ok()
    }

    /// The service named `name`, if any.
    pub fn service(&self, name: &str) -> Option<&ServiceConfig> {
        self.services.iter().find(|s| s.name == name)
    }
}

/// Loading or storing the configuration failed.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read the node configuration {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the node configuration {path} is not valid JSON for this schema: {source}")]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error(
        "the node configuration {path} has {} problem(s): {}; fix them and store it again",
        .errors.len(), .errors.join("; ")
    )]
    Invalid { path: PathBuf, errors: Vec<String> },
    #[error("cannot {op} {path} while storing the node configuration: {source}; the old file is unchanged")]
    Write {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Parse and validate a configuration.
pub fn parse(path: &Path, text: &[u8]) -> Result<NodeConfig, ConfigError> {
    let cfg: NodeConfig = serde_json::from_slice(text).map_err(|source| ConfigError::Parse {
        path: path.to_path_buf(),
        source,
    })?;
    let errors = cfg.validate();
    if !errors.is_empty() {
        return Err(ConfigError::Invalid {
            path: path.to_path_buf(),
            errors,
        });
    }
    Ok(cfg)
}

/// Read, parse and validate the configuration at `path`. A missing file is `Ok(None)`.
pub fn load(path: &Path) -> Result<Option<NodeConfig>, ConfigError> {
    match fs::read(path) {
        Ok(text) => parse(path, &text).map(Some),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(ConfigError::Read {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// Validate `cfg` and replace the file at `path` atomically: a temporary file beside it is
/// written and fsynced, renamed over it, and the directory fsynced. A crash leaves either the
/// old or the new file, never a mixture. An invalid configuration is refused before anything is
/// written.
pub fn store(path: &Path, cfg: &NodeConfig) -> Result<(), ConfigError> {
    let errors = cfg.validate();
    if !errors.is_empty() {
        return Err(ConfigError::Invalid {
            path: path.to_path_buf(),
            errors,
        });
    }
    let werr = |op, p: &Path| {
        let p = p.to_path_buf();
        move |source| ConfigError::Write {
            op,
            path: p,
            source,
        }
    };
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let file_name = path.file_name().map(|n| n.to_string_lossy().into_owned());
    let tmp = dir.join(format!(".{}.tmp", file_name.unwrap_or_default()));
    let mut text = serde_json::to_vec_pretty(cfg).map_err(|e| ConfigError::Write {
        op: "serialize",
        path: path.to_path_buf(),
        source: std::io::Error::other(e),
    })?;
    text.push(b'\n');
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&tmp)
        .map_err(werr("create", &tmp))?;
    f.write_all(&text).map_err(werr("write", &tmp))?;
    f.sync_all().map_err(werr("fsync", &tmp))?;
    drop(f);
    if let Err(e) = fs::rename(&tmp, path) {
        let _ = fs::remove_file(&tmp);
        return Err(werr("rename", path)(e));
    }
    File::open(&dir)
        .and_then(|d| d.sync_all())
        .map_err(werr("fsync directory", &dir))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn absent_fields_give_the_default_node() {
        let cfg = parse(Path::new("x"), b"{}").unwrap();
        assert_eq!(cfg, NodeConfig::default());
        let names: Vec<_> = cfg.services.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["keel-agent", "containerd", "kubelet"]);
        assert!(cfg.service("kubelet").unwrap().optional);
        assert!(cfg.validate().is_empty());
    }

    #[test]
    fn a_bad_configuration_gets_every_error_at_once() {
        let text = br#"{
            "version": 2,
            "hostname": "-bad host",
            "network": {"address": "10.0.2.15", "gateway": "10.0.2.x"},
            "services": [
                {"name": "a", "path": "bin/a", "after": ["b", "ghost"]},
                {"name": "b", "path": "/bin/b", "after": ["a"],
                 "backoff": {"initial_ms": 0, "max_ms": 0}},
                {"name": "b", "path": "/bin/b2"},
                {"name": "../etc", "path": "/x", "env": {"A=B": "c"}},
                {"name": "keel-init", "path": "/sbin/keel-init"}
            ],
            "health": {"agent_addr": "nowhere", "required": ["kubelet"],
                       "window_secs": 60, "boot_deadline_secs": 30},
            "watchdog": {"timeout_secs": 0, "device": "watchdog"},
            "logs": {"max_bytes": 10, "keep": 0}
        }"#;
        let cfg: NodeConfig = serde_json::from_slice(text).unwrap();
        let errs = cfg.validate();
        let want = [
            "version: 2 is not supported",
            "hostname: \"-bad host\"",
            "network.address: \"10.0.2.15\" has no prefix length",
            "network.gateway: \"10.0.2.x\"",
            "services[0] (a): path \"bin/a\" must be absolute",
            "services[0] (a): after names \"ghost\"",
            "services[1] (b): backoff.initial_ms must be at least 1",
            "services[2] (b): another service has the same name",
            "services[3] (../etc): name must be",
            "services[3] (../etc): environment variable \"A=B\"",
            "services[4] (keel-init): the name keel-init is keel-init's own",
            "services: the start order has a cycle: a -> b -> a",
            "services: there is no keel-agent service",
            "health.agent_addr: \"nowhere\"",
            "health.required: \"kubelet\" is not a service",
            "health.boot_deadline_secs (30) must be longer",
            "watchdog.timeout_secs: 0",
            "watchdog.device: \"watchdog\" must be an absolute path",
            "logs.max_bytes: 10",
            "logs.keep: 0",
        ];
        for w in want {
            assert!(
                errs.iter().any(|e| e.starts_with(w)),
                "missing error {w:?} in {errs:#?}"
            );
        }
        assert_eq!(errs.len(), want.len(), "{errs:#?}");
        let err = parse(Path::new("/state/config/node.json"), text).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("/state/config/node.json has 20 problem(s)"),
            "{msg}"
        );
    }

    #[test]
    fn network_is_static_with_an_address_and_dhcp_without() {
        let stat = parse(
            Path::new("n.json"),
            br#"{"network": {"address": "10.0.2.15/24", "gateway": "10.0.2.2"}}"#,
        )
        .unwrap();
        assert_eq!(stat.static_address(), Some("10.0.2.15/24".parse().unwrap()));
        assert_eq!(
            stat.network.as_ref().unwrap().gateway.as_deref(),
            Some("10.0.2.2")
        );
        // no section, or one without an address: DHCP
        let none = parse(Path::new("n.json"), b"{}").unwrap();
        assert_eq!(none.static_address(), None);
        let dhcp = parse(
            Path::new("n.json"),
            br#"{"network": {"interface": "eth1"}}"#,
        )
        .unwrap();
        assert_eq!(dhcp.static_address(), None);
        assert_eq!(
            dhcp.network.as_ref().unwrap().interface.as_deref(),
            Some("eth1")
        );
        // a static configuration is written back as it was read
        let text = serde_json::to_value(&stat).unwrap();
        assert_eq!(
            text["network"],
            serde_json::json!({"address": "10.0.2.15/24", "gateway": "10.0.2.2"})
        );
        assert!(serde_json::to_value(&none)
            .unwrap()
            .get("ntp_servers")
            .is_none());
    }

    #[test]
    fn ntp_servers_and_dhcp_network_are_validated() {
        let ok = parse(
            Path::new("n.json"),
            br#"{"hostname": "node-1.example.org", "ntp_servers":
                 ["pool.ntp.org", "10.0.2.2", "10.0.2.2:4123", "::1", "[::1]:123", "time-a:123"]}"#,
        )
        .unwrap();
        assert_eq!(ok.ntp_servers.len(), 6);
        let text = br#"{
            "network": {"gateway": "10.0.2.2"},
            "ntp_servers": ["", "bad host", "pool.ntp.org:0", "-x.org", "a..b"]
        }"#;
        let cfg: NodeConfig = serde_json::from_slice(text).unwrap();
        let errs = cfg.validate();
        let want = [
            "network.gateway: a gateway needs a static network.address",
            "ntp_servers[0]: \"\" is not a host name",
            "ntp_servers[1]: \"bad host\" is not a host name",
            "ntp_servers[2]: \"pool.ntp.org:0\" has a port",
            "ntp_servers[3]: \"-x.org\" is not a host name",
            "ntp_servers[4]: \"a..b\" is not a host name",
        ];
        for w in want {
            assert!(
                errs.iter().any(|e| e.starts_with(w)),
                "missing error {w:?} in {errs:#?}"
            );
        }
        assert_eq!(errs.len(), want.len(), "{errs:#?}");
    }

    #[test]
    fn the_kubernetes_section_is_validated_with_the_rest() {
        let text = br#"{
            "logs": {"keep": 0},
            "kubernetes": {"api_server": "https://10.0.2.2:6443", "ca_cert": "none",
                           "kubeconfig": "apiVersion: v1"}
        }"#;
        let err = parse(Path::new("n.json"), text).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("has 2 problem(s)"), "{msg}");
        assert!(msg.contains("logs.keep: 0"), "{msg}");
        assert!(
            msg.contains("kubernetes.ca_cert: holds no PEM certificate"),
            "{msg}"
        );
        // absent, it is not written back
        let none = serde_json::to_value(NodeConfig::default()).unwrap();
        assert!(none.get("kubernetes").is_none());
    }

    #[test]
    fn unknown_fields_are_refused_with_their_name() {
        let err = parse(Path::new("n.json"), br#"{"servcies": []}"#).unwrap_err();
        assert!(err.to_string().contains("servcies"), "{err}");
    }

    #[test]
    fn cidr_parsing() {
        let c: Ipv4Cidr = "10.0.2.15/24".parse().unwrap();
        assert_eq!(c.addr, Ipv4Addr::new(10, 0, 2, 15));
        assert_eq!(c.netmask(), Ipv4Addr::new(255, 255, 255, 0));
        assert_eq!(
            "1.2.3.4/0".parse::<Ipv4Cidr>().unwrap().netmask(),
            Ipv4Addr::UNSPECIFIED
        );
        assert!("1.2.3.4/33".parse::<Ipv4Cidr>().is_err());
        assert!("1.2.3/8".parse::<Ipv4Cidr>().is_err());
    }

    #[test]
    fn store_then_load_round_trips_and_refuses_invalid() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.json");
        assert!(load(&path).unwrap().is_none());
        let cfg = NodeConfig {
            hostname: Some("node-1".into()),
            ..NodeConfig::default()
        };
        store(&path, &cfg).unwrap();
        assert_eq!(load(&path).unwrap(), Some(cfg.clone()));
        // an invalid configuration never replaces a good one
        let mut bad = cfg.clone();
        bad.services.clear();
        let err = store(&path, &bad).unwrap_err();
        assert!(matches!(err, ConfigError::Invalid { .. }), "{err}");
        assert_eq!(load(&path).unwrap(), Some(cfg));
        // no temporary file is left behind
        let files: Vec<_> = fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(files.len(), 1);
    }
}
