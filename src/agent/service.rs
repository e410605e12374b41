//! The gRPC handlers: each checks the caller's role against the table in [`super::roles`],
//! translates the request into core calls (bootctl on the disk, the shared update board,
//! keel-init's control interface) and the answer back into protobuf.
//!
//! Handlers never implement boot-flag or install logic, never panic on input, and never touch a
//! disk outside the slots and flags that bootctl manages.

use super::board::Board;
use super::control::{ControlError, NodeControl};
use super::disk::{FileDisk, NodeDisk};
pub use super::install::InstallView;
use super::proto::{self, keel_server::Keel};
use super::roles::{authorize, Rpc};
use super::running::{self, Evidence, Running};
use super::tls::Peer;
use super::trust::{self, ImageTrust, ReleaseError, ReleasePlan};
use crate::bootctl::{self, store, Slot, SlotFlags};
use crate::control::journal;
use crate::fetch::{Connect, Fetcher, TcpConnect};
use crate::update::driver;
use crate::update::SlotRecord;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

/// How the agent was started.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// The boot disk (device or image file).
    pub disk: PathBuf,
    /// STATE's mount point (/state on a node).
    pub state_dir: PathBuf,
    /// The slot running now, when the caller knows it (`--booted-slot`, the simulation);
    /// [`Agent::new`] establishes it from the boot (see [`super::running`]).
    pub booted: Option<Slot>,
    /// Stage 2's record of the booted slot (beside keel-init's control socket on a node).
    pub boot_record: Option<PathBuf>,
    /// CA bundle (PEM) trusted for https downloads; the system bundle when absent.
    pub fetch_ca: Option<PathBuf>,
    /// The running image's root, where its trusted keys and security version are read once at
    /// start (`/` on a node; see [`super::trust`]). `None`: the image trusts no key (the
    /// simulation's nodes), so it takes unsigned images.
    pub image_root: Option<PathBuf>,
}

/// Log streams (followed or not) open at once: each followed one costs a thread here and one
/// in keel-init, so a reader opening a thousand must not get them.
pub const MAX_LOG_STREAMS: usize = 8;
/// HTTP/2 streams (calls) open at once on one connection.
pub const MAX_STREAMS_PER_CONNECTION: u32 = 32;
/// A connection whose peer does not answer an HTTP/2 ping within `KEEPALIVE_TIMEOUT`, sent
/// after `KEEPALIVE_INTERVAL` of quiet, is closed (a peer that vanished without a FIN).
pub const KEEPALIVE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(30);
pub const KEEPALIVE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// The system's CA bundle on Debian and in the KeelOS image.
pub const SYSTEM_CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

/// The service, over a boot disk reached through `D` and downloads through `C` (keel-agent: a
/// file or block device and the operating system's TCP; sim/: crash-model disks and turmoil).
#[derive(Debug)]
pub struct Agent<D: NodeDisk = FileDisk, C: Connect = TcpConnect> {
    cfg: Arc<AgentConfig>,
    disk: Arc<D>,
    running: Running,
    board: Board<InstallView>,
    control: Arc<dyn NodeControl>,
    started: Instant,
    fetcher: Fetcher<C>,
    /// Permits for [`MAX_LOG_STREAMS`].
    log_streams: Arc<tokio::sync::Semaphore>,
    /// The boot stage's version from stage 2's record, empty when unknown.
    boot_stage: Arc<str>,
    /// What installs the running image accepts, read once at start.
    trust: Arc<ImageTrust>,
}

impl<D: NodeDisk, C: Connect> Clone for Agent<D, C> {
    fn clone(&self) -> Self {
        Agent {
            cfg: self.cfg.clone(),
            disk: self.disk.clone(),
            running: self.running.clone(),
            board: self.board.clone(),
            control: self.control.clone(),
            started: self.started,
            fetcher: self.fetcher.clone(),
            log_streams: self.log_streams.clone(),
            boot_stage: self.boot_stage.clone(),
            trust: self.trust.clone(),
        }
    }
}

fn internal(what: &str, e: impl std::fmt::Display) -> Status {
    Status::internal(format!("{what}: {e}"))
}

fn disk_status(e: store::StoreError) -> Status {
    Status::failed_precondition(e.to_string())
}

fn control_status(e: ControlError) -> Status {
    match e {
        ControlError::Unavailable(m) => Status::unavailable(m),
        ControlError::NoSuchService(_) => Status::not_found(e.to_string()),
        ControlError::Refused(_) => Status::failed_precondition(e.to_string()),
    }
}

/// The role check every handler starts with.
fn check<T>(req: &Request<T>, rpc: Rpc) -> Result<(), Status> {
    let role = req.extensions().get::<Peer>().and_then(|p| p.role);
    authorize(rpc, role).map_err(|d| Status::permission_denied(d.to_string()))
}

/// Every problem with an install request, all listed (empty: valid). A request names either a
/// release manifest (`release_url`) or an image and its digest (`full_image_url` and `sha256`).
pub fn validate_install(r: &proto::InstallRequest) -> Vec<String> {
    if !r.release_url.trim().is_empty() {
        return validate_release_install(r);
    }
    let mut errs = Vec::new();
    if r.allow_downgrade {
        errs.push(
            "allow_downgrade is given without release_url: security versions are in release \
             manifests only"
                .to_string(),
        );
    }
    let d = r.sha256.trim();
    if d.is_empty() {
        errs.push("sha256 is empty: give the SHA-256 of the uncompressed image".to_string());
    } else if d.len() != 64 || !d.bytes().all(|b| b.is_ascii_hexdigit()) {
        errs.push(format!(
            "sha256 {d:?} is not 64 hexadecimal characters ({} characters given)",
            d.len()
        ));
    }
    if r.full_image_url.trim().is_empty() {
        errs.push(
            "full_image_url is empty: the full image is needed (it is also the fallback of a \
             delta install)"
                .to_string(),
        );
    } else if let Err(e) = crate::fetch::parse_url(r.full_image_url.trim()) {
        errs.push(format!("full_image_url: {e}"));
    }
    if r.is_delta {
        if r.delta_url.trim().is_empty() {
            errs.push("is_delta is set but delta_url is empty".to_string());
        } else if let Err(e) = crate::fetch::parse_url(r.delta_url.trim()) {
            errs.push(format!("delta_url: {e}"));
        }
    } else if !r.delta_url.is_empty() {
        errs.push("delta_url is given but is_delta is not set".to_string());
    }
    if r.version.len() > 128 || r.version.chars().any(|c| c.is_control()) {
        errs.push("version must be at most 128 printable characters".to_string());
    }
    errs
}

fn validate_release_install(r: &proto::InstallRequest) -> Vec<String> {
    let mut errs = Vec::new();
    let given = [
        ("full_image_url", !r.full_image_url.is_empty()),
        ("delta_url", !r.delta_url.is_empty()),
        ("is_delta", r.is_delta),
        ("sha256", !r.sha256.is_empty()),
        ("version", !r.version.is_empty()),
    ];
    for (name, _) in given.iter().filter(|(_, g)| *g) {
        errs.push(format!(
            "release_url and {name} cannot be given together: the release manifest names the \
             image, its digest, its delta and its version"
        ));
    }
    if let Err(e) = trust::release_dir(r.release_url.trim()) {
        errs.push(e.to_string());
    }
    errs
}

fn slot_info(
    flags: SlotFlags,
    s: Slot,
    booted: Option<Slot>,
    rec: Option<&SlotRecord>,
) -> proto::SlotInfo {
    let f = flags.get(s);
    let state = match f.state() {
        bootctl::SlotState::Successful => "successful",
        bootctl::SlotState::Trying => "trying",
        bootctl::SlotState::Failed => "failed",
        bootctl::SlotState::Invalid => "invalid",
    };
    proto::SlotInfo {
        slot: s.letter().into(),
        priority: f.priority().into(),
        tries: f.tries().into(),
        successful: f.successful(),
        bootable: f.bootable(),
        state: state.into(),
        image: rec.map(|r| proto::SlotImage {
            version: r.version.clone(),
            length: r.length,
            sha256: crate::update::record::hex(&r.sha256),
        }),
        booted: Some(s) == booted,
    }
}

fn uptime_seconds(started: Instant) -> u64 {
    std::fs::read_to_string("/proc/uptime")
        .ok()
        .and_then(|s| s.split_whitespace().next().map(str::to_string))
        .and_then(|s| s.parse::<f64>().ok())
        .map(|f| f as u64)
        .unwrap_or_else(|| started.elapsed().as_secs())
}

/// The kernel's lockdown mode: the bracketed word of /sys/kernel/security/lockdown
/// ("none [integrity] confidentiality"); empty when securityfs or the LSM is not there.
fn lockdown_mode() -> String {
    std::fs::read_to_string("/sys/kernel/security/lockdown")
        .map(|t| parse_lockdown(&t))
        .unwrap_or_default()
}

fn parse_lockdown(text: &str) -> String {
    text.split_whitespace()
        .find_map(|w| w.strip_prefix('[').and_then(|w| w.strip_suffix(']')))
        .unwrap_or_default()
        .to_string()
}

/// Whether the root file system is read through dm-verity, in words: "on (DEVICE, STATE)" or
/// "off (the root is DEVICE)"; empty when the root's mount cannot be found.
fn root_verity() -> String {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let Some(source) = root_source(&info) else {
        return String::new();
    };
    let dev = source.strip_prefix("/dev/").unwrap_or(&source);
    let name = crate::dm::name_of(std::path::Path::new("/sys/block"), dev);
    let status = name
        .as_deref()
        .map(|n| crate::dm::status(n).map_err(|e| e.to_string()));
    verity_words(&source, name.as_deref(), status)
}

/// The source device of the mount at `/` in a mountinfo text (the last such line: the one in
/// effect).
fn root_source(mountinfo: &str) -> Option<String> {
    mountinfo.lines().rev().find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        let sep = f.iter().position(|w| *w == "-")?;
        (f.get(4) == Some(&"/")).then(|| f.get(sep + 2).map(|s| s.to_string()))?
    })
}

fn verity_words(
    source: &str,
    dm_name: Option<&str>,
    status: Option<Result<Vec<crate::dm::Target>, String>>,
) -> String {
    let (Some(name), Some(status)) = (dm_name, status) else {
        return format!("off (the root is {source}, not a device-mapper device)");
    };
    match status {
        Err(e) => format!("unknown ({source} is {name}: {e})"),
        Ok(t) => match t.as_slice() {
            [one] if one.kind == "verity" => match one.params.trim() {
                "V" => format!("on ({name}: every block read so far matched its tree)"),
                "C" => format!("on ({name}: CORRUPTED, a block did not match its tree)"),
                other => format!("on ({name}: {other})"),
            },
            _ => format!("off ({source} is {name}, which is not a verity device)"),
        },
    }
}

/// The running kernel's release (uname -r), empty if uname(2) fails.
fn kernel_release() -> String {
    nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_default()
}

fn os_version() -> String {
    std::fs::read_to_string("/etc/os-release")
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| {
                l.strip_prefix("PRETTY_NAME=")
                    .map(|v| v.trim_matches('"').to_string())
            })
        })
        .unwrap_or_else(|| "unknown".into())
}

fn empty_roots() -> Arc<rustls::ClientConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map(|b| {
            b.with_root_certificates(rustls::RootCertStore::empty())
                .with_no_client_auth()
        });
    match cfg {
        Ok(c) => Arc::new(c),
        // ring supports the default versions; this cannot fail, but never panic here.
        Err(_) => Arc::new(
            rustls::ClientConfig::builder()
                .with_root_certificates(rustls::RootCertStore::empty())
                .with_no_client_auth(),
        ),
    }
}

impl Agent {
    /// An agent over the disk file or device of `cfg`. The running slot is established from
    /// the boot (the mounted root, stage 2's record, `cfg.booted`; see [`super::running`]).
    pub fn new(cfg: AgentConfig, control: Arc<dyn NodeControl>) -> Result<Agent, String> {
        let dev = crate::block::FileDevice::open(&cfg.disk, false).map_err(|e| e.to_string())?;
        let (layout, flags) = store::load(&dev).map_err(|e| e.to_string())?;
        let booted = match &cfg.boot_record {
            Some(p) => crate::control::boot::read(p),
            None => Ok(None),
        };
        let boot_stage = match &booted {
            Ok(Some(b)) => b.boot_stage.clone(),
            _ => String::new(),
        };
        let record = booted
            .and_then(|r| r.map(|b| b.slot()).transpose())
            .map_err(|e| format!("the boot record: {e}"));
        let running = running::establish(&Evidence {
            given: cfg.booted,
            record,
            mounted: crate::control::boot::mounted_root_slot(&cfg.disk, &layout),
            disk_is_file: std::fs::metadata(&cfg.disk).is_ok_and(|m| m.is_file()),
            flags,
        });
        let tls = match &cfg.fetch_ca {
            Some(p) => crate::fetch::tls_with_ca_bundle(p).map_err(|e| e.to_string())?,
            None if std::path::Path::new(SYSTEM_CA_BUNDLE).exists() => {
                crate::fetch::tls_with_ca_bundle(std::path::Path::new(SYSTEM_CA_BUNDLE))
                    .map_err(|e| e.to_string())?
            }
            None => empty_roots(),
        };
        let fetcher = Fetcher::new(TcpConnect, tls, crate::fetch::Policy::default())
            .with_min_rate(Some(crate::fetch::MinRate::default()));
        let disk = FileDisk {
            disk: cfg.disk.clone(),
        };
        let mut agent = Agent::build(cfg, running, disk, fetcher, control);
        agent.boot_stage = boot_stage.into();
        Ok(agent)
    }
}

impl<D: NodeDisk, C: Connect> Agent<D, C> {
    /// An agent over `disk`, downloading with `fetcher`, running the slot `cfg.booted` (the
    /// simulation's nodes know the slot they booted). Without it, installs and rollbacks are
    /// refused.
    pub fn with_disk(
        cfg: AgentConfig,
        disk: D,
        fetcher: Fetcher<C>,
        control: Arc<dyn NodeControl>,
    ) -> Self {
        let running = match cfg.booted {
            Some(slot) => Running::Known {
                slot,
                how: "given when the agent started".into(),
            },
            None => Running::Unknown("no running slot was given".into()),
        };
        Agent::build(cfg, running, disk, fetcher, control)
    }

    fn build(
        cfg: AgentConfig,
        running: Running,
        disk: D,
        fetcher: Fetcher<C>,
        control: Arc<dyn NodeControl>,
    ) -> Self {
        let trust = match &cfg.image_root {
            Some(root) => {
                let t = trust::load(root);
                eprintln!(
                    "keel-agent: update trust (from {}): {}",
                    root.display(),
                    t.describe()
                );
                t
            }
            None => ImageTrust::development(),
        };
        Agent {
            running,
            trust: Arc::new(trust),
            cfg: Arc::new(cfg),
            disk: Arc::new(disk),
            board: Board::new(),
            control,
            started: Instant::now(),
            fetcher,
            log_streams: Arc::new(tokio::sync::Semaphore::new(MAX_LOG_STREAMS)),
            boot_stage: Arc::from(""),
        }
    }

    /// The same agent with other download limits: the slowest a download may be (`None`: no
    /// minimum; [`Agent::new`] uses [`crate::fetch::MinRate::default`]) and the largest patch
    /// it holds in memory (at most [`crate::update::bspatch::MAX_PATCH_LEN`]).
    pub fn with_download_limits(
        mut self,
        min_rate: Option<crate::fetch::MinRate>,
        max_patch: u64,
    ) -> Self {
        self.fetcher = self
            .fetcher
            .with_min_rate(min_rate)
            .with_memory_limit(max_patch.min(crate::update::bspatch::MAX_PATCH_LEN));
        self
    }

    /// The node configuration on STATE.
    fn config_path(&self) -> PathBuf {
        self.cfg.state_dir.join("config/node.json")
    }

    pub fn board(&self) -> &Board<InstallView> {
        &self.board
    }

    pub fn booted(&self) -> Option<Slot> {
        self.running.slot()
    }

    /// How the agent knows the running slot (or why it does not).
    pub fn running(&self) -> &Running {
        &self.running
    }

    /// The refusal of an install while `slot`, the running one, is on trial: an install would
    /// invalidate the other slot, the only one known to boot.
    async fn on_trial(&self, slot: Slot) -> Status {
        let path = self.config_path();
        let health = tokio::task::spawn_blocking(move || crate::config::load(&path))
            .await
            .ok()
            .and_then(|r| r.ok().flatten())
            .unwrap_or_default()
            .health;
        // keel-init's healthy window starts about when the agent serves.
        let left = health
            .window_secs
            .saturating_sub(self.started.elapsed().as_secs())
            .max(1);
        Status::failed_precondition(format!(
            "slot {slot} is on trial until keel-init marks it successful, about {left} s (it \
             must stay healthy for {} s; if it is not healthy within {} s of boot the node \
             reboots and falls back to slot {}). An install now would invalidate slot {}, the \
             only slot known to boot: retry after Status shows slot {slot} successful",
            health.window_secs,
            health.boot_deadline_secs,
            slot.other(),
            slot.other()
        ))
    }

    async fn flags(&self) -> Result<SlotFlags, Status> {
        self.disk_view().await.map(|(f, _)| f)
    }

    /// The flags and each slot's image record (from the engine's records on the disk).
    async fn disk_view(&self) -> Result<(SlotFlags, [Option<SlotRecord>; 2]), Status> {
        self.disk
            .with_dev(false, |dev| {
                let (layout, flags) = store::load(&*dev).map_err(disk_status)?;
                // A slot whose record cannot be read shows as "image unknown".
                let rec = |s| driver::read_record(&*dev, &layout, s).ok().flatten();
                Ok((flags, [rec(Slot::A), rec(Slot::B)]))
            })
            .await
    }

    fn update_state(&self) -> Option<proto::UpdateState> {
        self.board.current().map(|s| proto::UpdateState {
            id: s.id,
            version: s.state.version,
            sha256: s.state.sha256,
            running: s.running,
            progress: Some(s.state.progress),
            result: s.state.result,
        })
    }

    /// What the running image trusts for updates.
    pub fn trust(&self) -> &ImageTrust {
        &self.trust
    }

    /// Download and check the release manifest of `r` (and its signature, on a signed-mode
    /// node), then plan its install on top of `running`. Nothing is written; a refusal is
    /// logged and returned.
    async fn release_plan(
        &self,
        r: &proto::InstallRequest,
        running: Option<Slot>,
    ) -> Result<ReleasePlan, Status> {
        let url = r.release_url.trim();
        let shown = crate::fetch::redact_url(url);
        let refused = |e: ReleaseError| {
            eprintln!("keel-agent: release {shown} refused, nothing was written: {e}");
            Status::failed_precondition(format!(
                "release {shown} refused, nothing was written: {e}"
            ))
        };
        let manifest = self
            .fetcher
            .get_small(
                url,
                crate::fetch::Limit {
                    bytes: crate::update::manifest::MAX_MANIFEST_BYTES as u64,
                    what: "a release manifest",
                    hint: "it is fixed; a real release.json is about 1 KiB: check the URL",
                },
            )
            .await
            .map_err(|e| {
                refused(ReleaseError::Fetch {
                    what: "release manifest",
                    url: shown.clone(),
                    why: e.to_string(),
                })
            })?;
        let signature = if self.trust.wants_signature() {
            let sig_url = trust::signature_url(url);
            match self
                .fetcher
                .get_small(
                    &sig_url,
                    crate::fetch::Limit {
                        bytes: crate::update::manifest::MAX_SIGNATURE_BYTES as u64,
                        what: "a manifest signature",
                        hint: "it is fixed; a real release.json.minisig is about 300 bytes",
                    },
                )
                .await
            {
                Ok(b) => Some(b),
                // Not published: the release is unsigned, which check_release refuses by name.
                Err(crate::fetch::FetchError::Status { status: 404, .. }) => None,
                Err(e) => {
                    return Err(refused(ReleaseError::Fetch {
                        what: "manifest signature",
                        url: crate::fetch::redact_url(&sig_url),
                        why: e.to_string(),
                    }))
                }
            }
        } else {
            None
        };
        let verified = self
            .trust
            .check_release(&manifest, signature.as_deref(), r.allow_downgrade)
            .map_err(refused)?;
        let running_sha = match running {
            Some(s) => {
                let (_, records) = self.disk_view().await?;
                records[usize::from(s == Slot::B)]
                    .as_ref()
                    .map(|rec| crate::update::record::hex(&rec.sha256))
            }
            None => None,
        };
        let plan = trust::plan(&verified, url, running_sha.as_deref()).map_err(refused)?;
        eprintln!(
            "keel-agent: release {shown} accepted: version {}, {}; {} (running security \
             version {})",
            plan.version,
            plan.trust,
            match &plan.delta_url {
                Some(_) => "its delta applies to the running image".to_string(),
                None => "the full image is installed (no delta for the running image)".to_string(),
            },
            self.trust
                .security_version()
                .map_or_else(|| "unknown".to_string(), |v| v.to_string())
        );
        Ok(plan)
    }

    /// The reply to Status.
    pub async fn status_reply(&self) -> Result<proto::StatusReply, Status> {
        let (flags, records) = self.disk_view().await?;
        let booted = self.running.slot();
        // A rollback: the other slot was preferred over the booted one but failed its tries.
        let rolled_back = booted.is_some_and(|b| {
            let o = flags.get(b.other());
            o.state() == bootctl::SlotState::Failed && o.priority() > flags.get(b).priority()
        });
        Ok(proto::StatusReply {
            os_version: os_version(),
            agent_version: env!("CARGO_PKG_VERSION").into(),
            booted_slot: booted.map(|s| s.letter().to_string()).unwrap_or_default(),
            slots: Slot::ALL
                .iter()
                .zip(records.iter())
                .map(|(&s, r)| slot_info(flags, s, booted, r.as_ref()))
                .collect(),
            rolled_back,
            rolled_back_from: match (rolled_back, booted) {
                (true, Some(b)) => records[usize::from(b.other() == Slot::B)]
                    .as_ref()
                    .map(|r| r.version.clone())
                    .unwrap_or_default(),
                _ => String::new(),
            },
            uptime_seconds: uptime_seconds(self.started),
            update: self.update_state(),
            next_boot_slot: flags
                .preferred()
                .map(|s| s.letter().to_string())
                .unwrap_or_default(),
            booted_from: self.running.describe(),
            kernel_release: kernel_release(),
            boot_stage: self.boot_stage.to_string(),
            last_rollback: self.last_rollback().await,
            update_trust: self.trust.describe(),
            lockdown: lockdown_mode(),
            verity: root_verity(),
        })
    }

    /// The most recent rollback's reason from the boot journal on STATE, empty when there is
    /// none. A journal that cannot be read never fails Status: it is logged and shows as none.
    async fn last_rollback(&self) -> String {
        let path = journal::journal_path(&self.cfg.state_dir);
        let read = tokio::task::spawn_blocking(move || {
            let (j, warning) = journal::Journal::load(&path);
            (journal::last_rollback(&j.entries), warning)
        })
        .await;
        match read {
            Ok((reason, warning)) => {
                if let Some(w) = warning {
                    eprintln!("keel-agent: {w}; Status shows no last rollback");
                }
                reason.unwrap_or_default()
            }
            Err(e) => {
                eprintln!(
                    "keel-agent: reading the boot journal failed ({e}); Status shows no last \
                     rollback"
                );
                String::new()
            }
        }
    }
}

type Streamed<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl<D: NodeDisk, C: Connect> Keel for Agent<D, C> {
    async fn status(
        &self,
        req: Request<proto::StatusRequest>,
    ) -> Result<Response<proto::StatusReply>, Status> {
        check(&req, Rpc::Status)?;
        self.status_reply().await.map(Response::new)
    }

    async fn version(
        &self,
        req: Request<proto::VersionRequest>,
    ) -> Result<Response<proto::VersionReply>, Status> {
        check(&req, Rpc::Version)?;
        Ok(Response::new(proto::VersionReply {
            agent_version: env!("CARGO_PKG_VERSION").into(),
            os_version: os_version(),
        }))
    }

    type InstallUpdateStream = Streamed<proto::InstallEvent>;

    async fn install_update(
        &self,
        req: Request<proto::InstallRequest>,
    ) -> Result<Response<Self::InstallUpdateStream>, Status> {
        check(&req, Rpc::InstallUpdate)?;
        let r = req.into_inner();
        let errs = validate_install(&r);
        if !errs.is_empty() {
            return Err(Status::invalid_argument(errs.join("; ")));
        }
        let running = self
            .running
            .for_change()
            .map_err(Status::failed_precondition)?;
        // Refused while the running slot is unproven: trying, or on its last try (which the
        // flags call failed although this very boot is that try).
        if let Err(bootctl::policy::InstallRefusal::OnTrial { slot, .. }) =
            bootctl::policy::admit_install(self.flags().await?, running)
        {
            return Err(self.on_trial(slot).await);
        }
        // Everything about what to install is settled here, before any write.
        let plan = if r.release_url.trim().is_empty() {
            self.trust
                .admit_plain_install()
                .map_err(|e| Status::failed_precondition(e.to_string()))?;
            ReleasePlan {
                full_url: r.full_image_url.trim().to_string(),
                delta_url: r.is_delta.then(|| r.delta_url.trim().to_string()),
                delta_expect: None,
                sha256: r.sha256.trim().to_ascii_lowercase(),
                version: r.version.clone(),
                trust: "unsigned image (development image: it trusts no signing key)".into(),
            }
        } else {
            self.release_plan(&r, running).await?
        };
        let sha = plan.sha256.clone();
        let id = format!(
            "{} (sha256 {sha})",
            if plan.version.is_empty() {
                "unversioned image"
            } else {
                plan.version.as_str()
            }
        );
        let view = InstallView {
            version: plan.version.clone(),
            sha256: sha.clone(),
            progress: proto::Progress {
                phase: proto::Phase::Validating as i32,
                detail: plan.trust.clone(),
                ..Default::default()
            },
            result: None,
            trust: plan.trust.clone(),
        };
        // Admission is atomic: of two concurrent calls exactly one gets the ticket.
        let ticket = self
            .board
            .try_begin(id.clone(), view)
            .map_err(|b| Status::failed_precondition(b.to_string()))?;
        let seen = self.board.current().map_or(0, |s| s.seq.saturating_sub(1));
        let job = super::install::Job {
            disk: self.cfg.disk.clone(),
            state_dir: self.cfg.state_dir.clone(),
            running,
            full_url: plan.full_url,
            delta_url: plan.delta_url,
            delta_expect: plan.delta_expect,
            sha256: sha,
            version: plan.version,
        };
        // The install runs on its own task: it goes on when the client disconnects.
        self.disk.spawn_install(job, self.fetcher.clone(), ticket);
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        let board = self.board.clone();
        tokio::spawn(async move {
            let mut seen = seen;
            loop {
                let snap = board.changed(seen).await;
                seen = snap.seq;
                if snap.id != id {
                    return;
                }
                let ev = proto::InstallEvent {
                    event: Some(proto::install_event::Event::Progress(snap.state.progress)),
                };
                if tx.send(Ok(ev)).await.is_err() {
                    return; // the client went away; the install goes on
                }
                if !snap.running {
                    if let Some(r) = snap.state.result {
                        let ev = proto::InstallEvent {
                            event: Some(proto::install_event::Event::Result(r)),
                        };
                        let _ = tx.send(Ok(ev)).await;
                    }
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn reboot(
        &self,
        req: Request<proto::RebootRequest>,
    ) -> Result<Response<proto::RebootReply>, Status> {
        check(&req, Rpc::Reboot)?;
        if let Some(s) = self.board.current().filter(|s| s.running) {
            return Err(Status::failed_precondition(format!(
                "an update is running ({}); reboot after it finishes",
                s.id
            )));
        }
        if req.get_ref().only_if_staged {
            let flags = self.flags().await?;
            let staged = self.running.slot().is_some_and(|b| {
                let o = b.other();
                flags.preferred() == Some(o) && flags.get(o).state() == bootctl::SlotState::Trying
            });
            if !staged {
                return Err(Status::failed_precondition(
                    "no update is staged (the next boot would run the same slot); nothing to \
                     reboot into",
                ));
            }
        }
        self.control.reboot().await.map_err(control_status)?;
        Ok(Response::new(proto::RebootReply {
            rebooting: true,
            message: "rebooting".into(),
        }))
    }

    async fn rollback(
        &self,
        req: Request<proto::RollbackRequest>,
    ) -> Result<Response<proto::RollbackReply>, Status> {
        check(&req, Rpc::Rollback)?;
        if let Some(s) = self.board.current().filter(|s| s.running) {
            return Err(Status::failed_precondition(format!(
                "an update is running ({}); a rollback now would race it",
                s.id
            )));
        }
        let Some(booted) = self
            .running
            .for_change()
            .map_err(Status::failed_precondition)?
        else {
            return Err(Status::failed_precondition(
                "no slot is running (nothing on the disk is bootable); nothing to roll back \
                 from",
            ));
        };
        let flags = self
            .disk
            .with_dev(true, move |dev| {
                store::update(dev, |f| bootctl::rollback(f, booted))
                    .map(|(_, f)| f)
                    .map_err(disk_status)
            })
            .await?;
        let next = flags.preferred().map(|s| s.letter()).unwrap_or("");
        Ok(Response::new(proto::RollbackReply {
            next_boot_slot: next.into(),
            message: format!("the next boot runs slot {next}; slot {booted} stays the fallback"),
        }))
    }

    async fn get_config(
        &self,
        req: Request<proto::GetConfigRequest>,
    ) -> Result<Response<proto::ConfigReply>, Status> {
        check(&req, Rpc::GetConfig)?;
        let path = self.config_path();
        let cfg = tokio::task::spawn_blocking(move || crate::config::load(&path))
            .await
            .map_err(|e| internal("config", e))?
            .map_err(|e| Status::failed_precondition(e.to_string()))?
            .unwrap_or_default();
        let json = serde_json::to_string_pretty(&cfg).map_err(|e| internal("config", e))?;
        Ok(Response::new(proto::ConfigReply { json }))
    }

    async fn apply_config(
        &self,
        req: Request<proto::ApplyConfigRequest>,
    ) -> Result<Response<proto::ApplyConfigReply>, Status> {
        check(&req, Rpc::ApplyConfig)?;
        let r = req.into_inner();
        let path = self.config_path();
        let new = match crate::config::parse(&path, r.json.as_bytes()) {
            Ok(c) => c,
            Err(crate::config::ConfigError::Invalid { errors, .. }) => {
                return Err(Status::invalid_argument(format!(
                    "the configuration has {} problem(s), nothing was written: {}",
                    errors.len(),
                    errors.join("; ")
                )))
            }
            Err(e) => {
                return Err(Status::invalid_argument(format!(
                    "{e}; nothing was written"
                )))
            }
        };
        let p = path.clone();
        let old = tokio::task::spawn_blocking(move || crate::config::load(&p))
            .await
            .map_err(|e| internal("config", e))?
            .map_err(|e| Status::failed_precondition(e.to_string()))?
            .unwrap_or_default();
        let changes = config_changes(&old, &new);
        if r.dry_run || changes.is_empty() {
            return Ok(Response::new(proto::ApplyConfigReply {
                applied: false,
                changes,
            }));
        }
        let kubernetes_changed = old.kubernetes != new.kubernetes;
        tokio::task::spawn_blocking(move || {
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir).map_err(|source| {
                    crate::config::ConfigError::Write {
                        op: "create the directory of",
                        path: path.clone(),
                        source,
                    }
                })?;
            }
            crate::config::store(&path, &new)
        })
        .await
        .map_err(|e| internal("config", e))?
        .map_err(|e| Status::internal(e.to_string()))?;
        let mut changes = changes;
        // a changed kubernetes section is applied now: keel-init writes kubelet's, containerd's
        // and CNI's files and starts, restarts or stops kubelet and containerd; everything
        // else applies at the next boot
        if kubernetes_changed {
            let names = vec!["containerd".to_string(), "kubelet".to_string()];
            match self.control.reload(names).await {
                Ok(done) if done.is_empty() => {
                    changes.push("applied now: kubelet and containerd unchanged".into())
                }
                Ok(done) => changes.extend(done.into_iter().map(|d| format!("applied now: {d}"))),
                Err(e) => changes.push(format!(
                    "kubernetes: stored, but not applied now ({e}); it applies at the next boot"
                )),
            }
        }
        Ok(Response::new(proto::ApplyConfigReply {
            applied: true,
            changes,
        }))
    }

    async fn service_list(
        &self,
        req: Request<proto::ServiceListRequest>,
    ) -> Result<Response<proto::ServiceListReply>, Status> {
        check(&req, Rpc::ServiceList)?;
        let list = self.control.services().await.map_err(control_status)?;
        Ok(Response::new(proto::ServiceListReply {
            services: list
                .into_iter()
                .map(|s| proto::ServiceInfo {
                    name: s.name,
                    state: s.state,
                    pid: s.pid,
                    restarts: s.restarts,
                    detail: s.detail,
                    rss_bytes: s.rss_bytes,
                })
                .collect(),
        }))
    }

    async fn service_restart(
        &self,
        req: Request<proto::ServiceRestartRequest>,
    ) -> Result<Response<proto::ServiceRestartReply>, Status> {
        check(&req, Rpc::ServiceRestart)?;
        let name = req.into_inner().name;
        if name.trim().is_empty() {
            return Err(Status::invalid_argument("service name is empty"));
        }
        let m = self.control.restart(name).await.map_err(control_status)?;
        Ok(Response::new(proto::ServiceRestartReply { message: m }))
    }

    type LogsStream = Streamed<proto::LogLine>;

    async fn logs(
        &self,
        req: Request<proto::LogsRequest>,
    ) -> Result<Response<Self::LogsStream>, Status> {
        check(&req, Rpc::Logs)?;
        let r = req.into_inner();
        if r.service.trim().is_empty() {
            return Err(Status::invalid_argument("service name is empty"));
        }
        // Held by the stream: released when the reader goes away or the log ends.
        let permit = self.log_streams.clone().try_acquire_owned().map_err(|_| {
            Status::resource_exhausted(format!(
                "{MAX_LOG_STREAMS} log streams are open on this node already (the limit): \
                     close one, or retry when one ends"
            ))
        })?;
        let rx = self
            .control
            .logs(r.service, r.follow, r.tail_lines)
            .await
            .map_err(control_status)?;
        let s = tokio_stream::wrappers::ReceiverStream::new(rx);
        let s = tokio_stream::StreamExt::map(s, move |line| {
            let _held = &permit;
            Ok(proto::LogLine { line })
        });
        Ok(Response::new(Box::pin(s)))
    }
}

/// What differs between two configurations, one line per changed leaf (`path: old -> new`).
fn config_changes(old: &crate::config::NodeConfig, new: &crate::config::NodeConfig) -> Vec<String> {
    fn walk(path: &str, a: &serde_json::Value, b: &serde_json::Value, out: &mut Vec<String>) {
        use serde_json::Value;
        match (a, b) {
            (Value::Object(x), Value::Object(y)) => {
                let keys: std::collections::BTreeSet<&String> = x.keys().chain(y.keys()).collect();
                for k in keys {
                    let p = if path.is_empty() {
                        k.clone()
                    } else {
                        format!("{path}.{k}")
                    };
                    walk(
                        &p,
                        x.get(k).unwrap_or(&Value::Null),
                        y.get(k).unwrap_or(&Value::Null),
                        out,
                    );
                }
            }
            (x, y) if x != y => out.push(format!("{path}: {x} -> {y}")),
            _ => {}
        }
    }
    let mut out = Vec::new();
    match (serde_json::to_value(old), serde_json::to_value(new)) {
        (Ok(a), Ok(b)) => walk("", &a, &b, &mut out),
        _ => out.push("the whole configuration".into()),
    }
    out
}

/// Serve the API on `listener` (the operating system's TCP, or a simulated network's) over
/// mutual TLS until `shutdown` resolves.
pub async fn serve<D: NodeDisk, C: Connect, L: super::tls::Listener>(
    agent: Agent<D, C>,
    listener: L,
    tls: Arc<rustls::ServerConfig>,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), tonic::transport::Error> {
    let incoming = super::tls::incoming(listener, tls);
    tonic::transport::Server::builder()
        .max_concurrent_streams(MAX_STREAMS_PER_CONNECTION)
        .http2_keepalive_interval(Some(KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT))
        .add_service(proto::keel_server::KeelServer::new(agent))
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(url: &str, sha: &str) -> proto::InstallRequest {
        proto::InstallRequest {
            full_image_url: url.into(),
            sha256: sha.into(),
            ..Default::default()
        }
    }

    #[test]
    fn the_root_verity_state_is_read_from_the_root_mount_and_the_target_status() {
        let info = "22 1 0:20 / / ro,relatime - squashfs /dev/vda3 ro\n\
                    23 22 0:21 / /proc rw - proc proc rw\n\
                    30 1 254:0 / / ro,relatime - squashfs /dev/dm-0 ro\n";
        assert_eq!(root_source(info).as_deref(), Some("/dev/dm-0"));
        assert_eq!(root_source("23 22 0:21 / /proc rw - proc proc rw\n"), None);
        let t = |kind: &str, params: &str| crate::dm::Target {
            start: 0,
            length: 8,
            kind: kind.into(),
            params: params.into(),
        };
        assert_eq!(
            verity_words(
                "/dev/dm-0",
                Some("keel-root-a"),
                Some(Ok(vec![t("verity", "V")]))
            ),
            "on (keel-root-a: every block read so far matched its tree)"
        );
        assert!(verity_words(
            "/dev/dm-0",
            Some("keel-root-a"),
            Some(Ok(vec![t("verity", "C")]))
        )
        .contains("CORRUPTED"));
        assert!(verity_words("/dev/vda3", None, None).starts_with("off (the root is /dev/vda3"));
        assert!(
            verity_words("/dev/dm-1", Some("x"), Some(Ok(vec![t("linear", "")])))
                .starts_with("off")
        );
    }

    #[test]
    fn the_lockdown_mode_is_the_bracketed_word() {
        assert_eq!(
            parse_lockdown("none [integrity] confidentiality\n"),
            "integrity"
        );
        assert_eq!(parse_lockdown("[none] integrity confidentiality\n"), "none");
        assert_eq!(parse_lockdown(""), "");
        assert_eq!(parse_lockdown("none integrity"), "");
    }

    #[test]
    fn install_requests_are_validated_with_every_error_listed() {
        let good = "ab".repeat(32);
        assert!(validate_install(&req("http://127.0.0.1:1/img", &good)).is_empty());
        let e = validate_install(&req("", ""));
        assert_eq!(e.len(), 2, "{e:?}");
        let e = validate_install(&req("ftp://x/y", "abc"));
        assert_eq!(e.len(), 2, "{e:?}");
        assert!(e[0].contains("64 hexadecimal"), "{e:?}");
        assert!(e[1].contains("unsupported scheme"), "{e:?}");
        let e = validate_install(&req("http://h/x", &"zz".repeat(32)));
        assert_eq!(e.len(), 1, "{e:?}");
        let mut d = req("http://h/x", &good);
        d.is_delta = true;
        assert_eq!(validate_install(&d).len(), 1);
        d.delta_url = "not a url".into();
        assert!(validate_install(&d)[0].contains("delta_url"));
    }

    #[test]
    fn a_release_request_names_nothing_else_and_every_conflict_is_listed() {
        let rel = |url: &str| proto::InstallRequest {
            release_url: url.into(),
            ..Default::default()
        };
        assert!(validate_install(&rel("http://h/r/release.json")).is_empty());
        let mut both = rel("http://h/r/release.json");
        both.full_image_url = "http://h/i".into();
        both.sha256 = "ab".repeat(32);
        let e = validate_install(&both);
        assert_eq!(e.len(), 2, "{e:?}");
        assert!(e[0].contains("release_url and full_image_url"), "{e:?}");
        assert!(e[1].contains("release_url and sha256"), "{e:?}");
        let e = validate_install(&rel("http://h/r/"));
        assert_eq!(e.len(), 1, "{e:?}");
        assert!(e[0].contains("not its directory"), "{e:?}");
        let mut plain = req("http://h/x", &"ab".repeat(32));
        plain.allow_downgrade = true;
        let e = validate_install(&plain);
        assert_eq!(e.len(), 1, "{e:?}");
        assert!(e[0].contains("allow_downgrade"), "{e:?}");
    }
}
