//! A node of the simulation: a crash-model disk (CrashDevice) seen through [`Watched`], which
//! checks the invariants on every write and flush, the checkpoint store (STATE's file, kept in
//! memory: its put is atomic and durable like the file's rename + fsync), the update board, and
//! the agent's install driver (`keelos::agent::install::run_on`) downloading with
//! `keelos::fetch` over turmoil TCP.

use keelos::agent::board::Board;
use keelos::agent::install::{self, Job};
use keelos::agent::service::InstallView;
use keelos::block::{BlockDevice, BlockError, CrashDevice};
use keelos::bootctl::{store, Slot};
use keelos::disk::{self, Partition};
use keelos::fetch::{Connect, ConnectFuture, Fetcher, Policy};
use keelos::update::checkpoint::{CheckpointStore, MemStore};
use keelos::update::{driver, record};
use sha2::{Digest, Sha256};
use std::cell::RefCell;
use std::collections::HashSet;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

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

pub fn fetcher() -> Fetcher<SimConnect> {
    // Plain http in the simulation: the TLS configuration is never used.
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("ring supports the default protocol versions")
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    Fetcher::new(SimConnect, Arc::new(tls), policy())
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
    pub disk: Rc<RefCell<CrashDevice>>,
    pub watch: Rc<RefCell<Watch>>,
}

impl BlockDevice for Watched {
    fn sector_size(&self) -> u64 {
        self.disk.borrow().sector_size()
    }
    fn len(&self) -> u64 {
        self.disk.borrow().len()
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), BlockError> {
        self.disk.borrow().read_at(offset, buf)
    }
    fn write_at(&mut self, offset: u64, data: &[u8]) -> Result<(), BlockError> {
        // Invariant: the running slot's bytes never change.
        if let Some((slot, p, _)) = &self.watch.borrow().running {
            let end = offset + data.len() as u64;
            if offset < p.offset + p.len && p.offset < end {
                self.watch.borrow_mut().violations.push(format!(
                    "a write at {offset}..{end} touches the running slot {slot:?}"
                ));
            }
        }
        self.disk.borrow_mut().write_at(offset, data)
    }
    fn flush(&mut self) -> Result<(), BlockError> {
        let r = self.disk.borrow_mut().flush();
        if r.is_ok() {
            self.watch.borrow_mut().flushes += 1;
            let v = check_disk(&self.disk.borrow(), &self.watch.borrow());
            self.watch.borrow_mut().violations.extend(v);
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

/// A node: its disk, its STATE checkpoint and its update board survive host crashes (the
/// board is rebuilt by the scenario when the agent restarts).
#[derive(Debug, Clone)]
pub struct Node {
    pub name: String,
    pub dev: Watched,
    pub store: Rc<RefCell<MemStore>>,
    pub board: Board<InstallView>,
}

/// The checkpoint store shared between the node's incarnations.
#[derive(Debug)]
pub struct SharedStore(pub Rc<RefCell<MemStore>>);

impl CheckpointStore for SharedStore {
    fn get(&self) -> Result<Option<Vec<u8>>, String> {
        self.0.borrow().get()
    }
    fn put(&mut self, bytes: &[u8]) -> Result<(), String> {
        self.0.borrow_mut().put(bytes)
    }
    fn clear(&mut self) -> Result<(), String> {
        self.0.borrow_mut().clear()
    }
}

/// Checkpoint size used by the simulation (the images are small).
pub const CHECKPOINT_EVERY: u64 = 32 * 1024;

impl Node {
    pub fn new(name: &str, disk: CrashDevice) -> Self {
        Node {
            name: name.into(),
            dev: Watched {
                disk: Rc::new(RefCell::new(disk)),
                watch: Rc::new(RefCell::new(Watch::default())),
            },
            store: Rc::new(RefCell::new(MemStore::default())),
            board: Board::new(),
        }
    }

    /// The node comes up: the boot stage's choice (as keel-init runs it), then the agent's view
    /// of the running slot (the known-good one, as on a host-side agent). Checks that the boot
    /// choice is a verified slot. Returns the running slot.
    pub fn boot(&mut self) -> Result<Option<Slot>, String> {
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
        let mut w = self.dev.watch.borrow_mut();
        w.running = running.map(|s| {
            let p = layout.root(s).clone();
            let h = sha(&self.dev.disk.borrow().durable_range(p.offset, p.len));
            (s, p, h)
        });
        Ok(running)
    }

    /// Run one install through the agent's driver, to its end, publishing on the board.
    pub async fn install(
        &self,
        running: Option<Slot>,
        spec: &Spec,
        id: &str,
    ) -> Result<(), String> {
        let ticket = self
            .board
            .try_begin(
                id.into(),
                InstallView {
                    version: spec.version.clone(),
                    sha256: spec.sha256.clone(),
                    ..Default::default()
                },
            )
            .map_err(|b| format!("busy: {}", b.running))?;
        self.dev
            .watch
            .borrow_mut()
            .allowed
            .insert(spec.sha256.clone());
        let job = Job {
            disk: "/sim/disk".into(),
            state_dir: "/sim/state".into(),
            running,
            full_url: spec.full_url.clone(),
            delta_url: spec.delta_url.clone(),
            sha256: spec.sha256.clone(),
            version: spec.version.clone(),
        };
        let mut dev = self.dev.clone();
        let mut store = SharedStore(self.store.clone());
        install::run_on(
            job,
            fetcher(),
            ticket,
            &mut dev,
            &mut store,
            CHECKPOINT_EVERY,
        )
        .await;
        Ok(())
    }
}

/// An install as the operator asks for it.
#[derive(Debug, Clone)]
pub struct Spec {
    pub full_url: String,
    pub delta_url: Option<String>,
    pub sha256: String,
    pub version: String,
}
