//! A node of the simulation: a crash-model disk (CrashDevice) seen through [`Watched`], which
//! checks the invariants on every write and flush, the checkpoint store (STATE's file, kept in
//! memory: its put is atomic and durable like the file's rename + fsync), and the real agent
//! (`keelos::agent::service::Agent`, the gRPC service over mutual TLS) on a turmoil host, its
//! disk reached through [`SimDisk`] and its downloads made by `keelos::fetch` over turmoil TCP.

use keelos::agent::board::Ticket;
use keelos::agent::control::Unavailable;
use keelos::agent::disk::NodeDisk;
use keelos::agent::install::{self, Job, MountedRoot};
use keelos::agent::service::{self, Agent, AgentConfig, InstallView};
use keelos::agent::tls::Listener;
use keelos::block::{BlockDevice, BlockError, CrashDevice};
use keelos::bootctl::{store, Slot};
use keelos::disk::{self, Partition};
use keelos::fetch::{Connect, ConnectFuture, Fetcher, Policy};
use keelos::update::checkpoint::{CheckpointStore, MemStore};
use keelos::update::{driver, record};
use sha2::{Digest, Sha256};
use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tonic::Status;

/// The agent's port.
pub const AGENT_PORT: u16 = 50051;

/// Lock, ignoring poisoning (a failing seed panics; the next seed starts afresh).
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// fetch's connector on turmoil's network.
#[derive(Debug, Clone, Copy)]
pub struct SimConnect;

impl Connect for SimConnect {
    type Stream = turmoil::net::TcpStream;
    fn connect(&self, host: &str, port: u16) -> ConnectFuture<Self::Stream> {
        let host = host.to_string();
        Box::pin(async move { turmoil::net::TcpStream::connect((host.as_str(), port)).await })
    }
}

/// Download limits for the simulation (simulated seconds: cheap to wait).
pub fn policy() -> Policy {
    Policy {
        connect_timeout: Duration::from_secs(3),
        stall_timeout: Duration::from_secs(2),
        max_attempts: 8,
        backoff: Duration::from_millis(100),
        max_backoff: Duration::from_secs(2),
    }
}

/// The agent's downloader: https trusts the simulation's CA bundle (as keel-agent --fetch-ca).
pub fn fetcher() -> Fetcher<SimConnect> {
    let tls = keelos::fetch::tls_with_ca_bundle(&crate::pki().ca).expect("the CA bundle loads");
    Fetcher::new(SimConnect, tls, policy())
}

/// The agent's listener on turmoil's network.
pub struct SimListener(pub turmoil::net::TcpListener);

impl std::fmt::Debug for SimListener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SimListener")
    }
}

impl Listener for SimListener {
    type Stream = turmoil::net::TcpStream;
    async fn accept(&self) -> std::io::Result<(turmoil::net::TcpStream, std::net::SocketAddr)> {
        self.0.accept().await
    }
}

pub fn sha(b: &[u8]) -> String {
    record::hex(&Sha256::digest(b))
}

/// What the invariant checks know and found.
#[derive(Debug, Default)]
pub struct Watch {
    /// The running slot's partition and the hash of its bytes when the node came up.
    pub running: Option<(Slot, Partition, String)>,
    /// Digests an activated slot may hold (the images the operator ever asked for, and the
    /// base image).
    pub allowed: HashSet<String>,
    pub violations: Vec<String>,
    pub flushes: u64,
}

/// The node's disk as the production code sees it.
#[derive(Debug, Clone)]
pub struct Watched {
    pub disk: Arc<Mutex<CrashDevice>>,
    pub watch: Arc<Mutex<Watch>>,
}

impl BlockDevice for Watched {
    fn sector_size(&self) -> u64 {
        lock(&self.disk).sector_size()
    }
    fn len(&self) -> u64 {
        lock(&self.disk).len()
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), BlockError> {
        lock(&self.disk).read_at(offset, buf)
    }
    fn write_at(&mut self, offset: u64, data: &[u8]) -> Result<(), BlockError> {
        // Invariant: the running slot's bytes never change.
        let mut w = lock(&self.watch);
        if let Some((slot, p, _)) = &w.running {
            let end = offset + data.len() as u64;
            if offset < p.offset + p.len && p.offset < end {
                let v = format!("a write at {offset}..{end} touches the running slot {slot:?}");
                w.violations.push(v);
            }
        }
        drop(w);
        lock(&self.disk).write_at(offset, data)
    }
    fn flush(&mut self) -> Result<(), BlockError> {
        let d = &mut *lock(&self.disk);
        let r = d.flush();
        if r.is_ok() {
            let mut w = lock(&self.watch);
            w.flushes += 1;
            let v = check_disk(d, &w);
            w.violations.extend(v);
        }
        r
    }
}

/// The invariants on a disk's durable state: every slot the flags would boot holds an intact
/// record whose digest is an allowed one and whose content hashes to it; the running slot's
/// bytes are unchanged.
pub fn check_disk(dev: &CrashDevice, w: &Watch) -> Vec<String> {
    let durable = CrashDevice::from_bytes(dev.durable(), dev.sector_size());
    let mut out = Vec::new();
    let (layout, flags) = match store::load(&durable) {
        Ok(x) => x,
        Err(e) => return vec![format!("the durable partition table does not load: {e}")],
    };
    for slot in [Slot::A, Slot::B] {
        if !flags.get(slot).bootable() {
            continue;
        }
        match slot_image(&durable, &layout, slot) {
            Ok((digest, _)) if w.allowed.contains(&digest) => {}
            Ok((digest, _)) => out.push(format!(
                "slot {slot:?} is bootable with an image of digest {digest} nobody asked for"
            )),
            Err(e) => out.push(format!("slot {slot:?} is bootable but {e}")),
        }
    }
    if let Some((slot, p, h)) = &w.running {
        let bytes = durable.durable_range(p.offset, p.len);
        if &sha(&bytes) != h {
            out.push(format!("the running slot {slot:?}'s bytes changed"));
        }
    }
    out
}

/// The digest and version of the image in `slot`, checked against its content.
pub fn slot_image<D: BlockDevice>(
    dev: &D,
    layout: &disk::Layout,
    slot: Slot,
) -> Result<(String, String), String> {
    let rec = driver::read_record(dev, layout, slot)
        .map_err(|e| e.to_string())?
        .ok_or("it has no image record")?;
    let p = layout.root(slot);
    if rec.length > p.len {
        return Err(format!("its record claims {} bytes", rec.length));
    }
    let content =
        keelos::block::read_vec(dev, p.offset, rec.length as usize).map_err(|e| e.to_string())?;
    let digest = sha(&content);
    if digest != record::hex(&rec.sha256) {
        return Err(format!(
            "its content hashes to {digest}, not to its record's {}",
            record::hex(&rec.sha256)
        ));
    }
    Ok((digest, rec.version))
}

/// A node: its disk and its STATE checkpoint survive host crashes; the agent (and its update
/// board) is started afresh by each incarnation of the host.
#[derive(Debug, Clone)]
pub struct Node {
    pub name: String,
    pub dev: Watched,
    pub store: Arc<Mutex<MemStore>>,
    /// The running image's root as the agent reads its update trust from it (the trusted keys
    /// and the security version); `None`: a development image that trusts no key.
    pub image_root: Option<PathBuf>,
}

/// The checkpoint store shared between the node's incarnations.
#[derive(Debug)]
pub struct SharedStore(pub Arc<Mutex<MemStore>>);

impl CheckpointStore for SharedStore {
    fn get(&self) -> Result<Option<Vec<u8>>, String> {
        lock(&self.0).get()
    }
    fn put(&mut self, bytes: &[u8]) -> Result<(), String> {
        lock(&self.0).put(bytes)
    }
    fn clear(&mut self) -> Result<(), String> {
        lock(&self.0).clear()
    }
}

/// Checkpoint size used by the simulation (the images are small).
pub const CHECKPOINT_EVERY: u64 = 32 * 1024;

/// The agent's view of the node's disk: the crash-model disk, reached inline (turmoil's hosts
/// are single-threaded; nothing here blocks), installs run by the agent's own driver
/// (`install::run_on`) on a task of the host.
#[derive(Debug, Clone)]
pub struct SimDisk {
    pub dev: Watched,
    pub store: Arc<Mutex<MemStore>>,
    /// The slot this incarnation's simulated root is mounted from (its boot's choice).
    pub mounted: Option<Slot>,
}

impl NodeDisk for SimDisk {
    type Dev = Watched;

    async fn with_dev<T, F>(&self, _write: bool, f: F) -> Result<T, Status>
    where
        T: Send + 'static,
        F: FnOnce(&mut Watched) -> Result<T, Status> + Send + 'static,
    {
        f(&mut self.dev.clone())
    }

    fn spawn_install<C: Connect>(
        &self,
        job: Job,
        fetcher: Fetcher<C>,
        ticket: Ticket<InstallView>,
    ) {
        let (mut dev, mut store) = (self.dev.clone(), SharedStore(self.store.clone()));
        let mounted = self.mounted;
        tokio::spawn(async move {
            install::run_on(
                job,
                fetcher,
                ticket,
                &mut dev,
                &mut store,
                CHECKPOINT_EVERY,
                MountedRoot::Simulated(mounted),
            )
            .await;
        });
    }
}

impl Node {
    pub fn new(name: &str, disk: CrashDevice) -> Self {
        Node {
            name: name.into(),
            dev: Watched {
                disk: Arc::new(Mutex::new(disk)),
                watch: Arc::new(Mutex::new(Watch::default())),
            },
            store: Arc::new(Mutex::new(MemStore::default())),
            image_root: None,
        }
    }

    /// The node comes up: the boot stage's choice (as keel-init runs it), then the agent's view
    /// of the running slot (the known-good one, as on a host-side agent). Checks that the boot
    /// choice is a verified slot. Returns the running slot.
    pub fn boot(&self) -> Result<Option<Slot>, String> {
        let mut dev = self.dev.clone();
        let (layout, choice) =
            store::boot(&mut dev).map_err(|e| format!("{}: boot choice failed: {e}", self.name))?;
        slot_image(&dev, &layout, choice.slot).map_err(|e| {
            format!(
                "{}: the boot choice picked slot {:?}, but {e}",
                self.name, choice.slot
            )
        })?;
        let (layout, flags) = store::load(&dev).map_err(|e| e.to_string())?;
        let running = driver::running_slot(flags);
        let hash = running.map(|s| {
            let p = layout.root(s).clone();
            let h = sha(&lock(&self.dev.disk).durable_range(p.offset, p.len));
            (s, p, h)
        });
        lock(&self.dev.watch).running = hash;
        Ok(running)
    }

    /// One incarnation of the node's host: boot, then serve the real agent over mutual TLS on
    /// turmoil until the host crashes. A failed boot choice is recorded as a violation.
    pub async fn serve(self) -> turmoil::Result {
        let running = match self.boot() {
            Ok(r) => r,
            Err(e) => {
                lock(&self.dev.watch).violations.push(e);
                return Ok(());
            }
        };
        let agent = Agent::with_disk(
            AgentConfig {
                disk: "/sim/disk".into(),
                state_dir: "/sim/state".into(),
                booted: running,
                boot_record: None,
                fetch_ca: Some(crate::pki().ca.clone()),
                image_root: self.image_root.clone(),
            },
            SimDisk {
                dev: self.dev.clone(),
                store: self.store.clone(),
                mounted: running,
            },
            fetcher(),
            Arc::new(Unavailable),
        );
        let listener = turmoil::net::TcpListener::bind(("0.0.0.0", AGENT_PORT)).await?;
        service::serve(
            agent,
            SimListener(listener),
            crate::pki().agent_tls(),
            std::future::pending(),
        )
        .await?;
        Ok(())
    }
}

/// An install as the operator asks for it: an image and its digest, or a release manifest's URL
/// (`release_url`; then the digest and version are the ones the manifest names, which the
/// operator expects to see in Status).
#[derive(Debug, Clone)]
pub struct Spec {
    pub release_url: Option<String>,
    pub full_url: String,
    pub delta_url: Option<String>,
    pub sha256: String,
    pub version: String,
}
