//! sim/: deterministic simulation of updates on turmoil's network. The code under test is the
//! production code: the agent's gRPC service over mutual TLS (`agent::service`, `agent::tls`),
//! its install driver, src/fetch (http and https), the update engine, the boot choice, and
//! osctl's client code (`agent::client`) in the operators. Only the network (turmoil), the
//! clock (turmoil's simulated time) and the disks (the crash model, `CrashDevice`) are
//! simulated.
//!
//! Hosts: `server` (hyper, http and https, with fault modes), `node`/`nodeN` (the agent over a
//! crash-model disk; crashed and restarted by the scenarios) and operator clients.
//!
//! Each scenario runs a fixed number of seeds; `KEEL_SIM_SEED=N` replays one seed,
//! `KEEL_SIM_SEEDS=N` runs N seeds per scenario from `KEEL_SIM_SEED_BASE` (default 0; ci/soak).
//! A failure prints its seed and the command that replays it.

#![allow(clippy::panic, clippy::unwrap_used)] // a test crate: a failing seed fails loudly

mod node;
mod operator;
mod server;

use keelos::agent::proto;
use keelos::block::{CrashDevice, SplitMix};
use keelos::bootctl::{self, store, Slot};
use keelos::disk::{self, LayoutSpec, MIB};
use keelos::image::release::ReleaseSigner;
use keelos::update::checkpoint::{Checkpoint, MemStore};
use keelos::update::driver::{self, MemInputs, Request};
use keelos::update::manifest::{self, Manifest};
use keelos::update::{zframes, FullImage};
use node::{check_disk, lock, sha, slot_image, Node, Spec};
use operator::Outcome;
use server::Server;
use std::collections::HashMap;
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

/// Seeds per scenario in the test command: a bug one seed in a hundred hits is missed by 300
/// seeds with probability 0.99^300 < 5%.
const DEFAULT_SEEDS: u64 = 300;

fn seeds(default: u64) -> Vec<u64> {
    if let Some(s) = std::env::var("KEEL_SIM_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        return vec![s];
    }
    let n = std::env::var("KEEL_SIM_SEEDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default);
    let base = std::env::var("KEEL_SIM_SEED_BASE")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0u64);
    (base..base + n).collect()
}

/// Run `scenario` for every seed; the first failure fails the test with its seed.
///
/// Scenarios run one at a time, even under the parallel test harness: hyper's HTTP/2 (h2) keeps
/// reset streams for one second of real time, not simulated time, so a thread starved of CPU by
/// a parallel scenario took another path than the same seed replayed alone. (On a loaded
/// machine a rare fleet seed can still differ from its replay: that clock is not simulated.)
fn each_seed(name: &str, default: u64, scenario: impl Fn(u64) -> Result<(), String>) {
    static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let seeds = seeds(default);
    for &seed in &seeds {
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| scenario(seed)));
        let msg = match r {
            Ok(Ok(())) => continue,
            Ok(Err(e)) => e,
            Err(p) => p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "panic".into()),
        };
        panic!(
            "scenario {name} failed on seed {seed}: {msg}\nreplay: KEEL_SIM_SEED={seed} cargo test --test sim {name}"
        );
    }
    eprintln!("{name}: {} seeds passed", seeds.len());
}

fn debug() -> bool {
    std::env::var("KEEL_SIM_DEBUG").is_ok()
}

/// The simulation's PKI, made once per test process by the production code (`pki::generate`):
/// the agents' certificate names every host, the update server's https uses the same one.
/// TLS configurations are built afresh for each agent, server and client: a shared one would
/// carry TLS session caches from seed to seed and from test thread to test thread, and a seed
/// would no longer replay alike.
#[derive(Debug)]
pub struct Pki {
    pub dir: PathBuf,
    pub ca: PathBuf,
}

impl Pki {
    /// The agent's (keel-agent's production configuration: mutual TLS).
    pub fn agent_tls(&self) -> Arc<rustls::ServerConfig> {
        keelos::agent::tls::server_config(&self.dir).expect("the agent's TLS config")
    }

    /// The update server's https: the agent's certificate, no client certificates.
    pub fn server_tls(&self) -> Arc<rustls::ServerConfig> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let cfg = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                keelos::pki::load_certs(&self.dir.join(keelos::pki::AGENT_CERT)).unwrap(),
                keelos::pki::load_key(&self.dir.join(keelos::pki::AGENT_KEY)).unwrap(),
            )
            .expect("the update server's TLS config");
        Arc::new(cfg)
    }

    /// The operators' (osctl's admin certificate).
    pub fn admin_tls(&self) -> Arc<rustls::ClientConfig> {
        keelos::agent::tls::client_config(
            &self.ca,
            &self.dir.join("admin.crt"),
            &self.dir.join("admin.key"),
        )
        .expect("the admin's TLS config")
    }
}

pub fn pki() -> &'static Pki {
    static P: OnceLock<Pki> = OnceLock::new();
    P.get_or_init(|| {
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("sim-pki-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let mut sans: Vec<String> = vec!["server".into(), "node".into()];
        sans.extend((0..8).map(|i| format!("node{i}")));
        keelos::pki::generate(&dir, &sans, None).expect("generating the simulation's PKI");
        let ca = dir.join(keelos::pki::CA_CERT);
        Pki { dir, ca }
    })
}

fn noise(seed: u8, len: usize) -> Vec<u8> {
    let mut r = SplitMix(u64::from(seed) << 32);
    (0..len).map(|_| r.next_u64() as u8).collect()
}

/// The images and files every scenario serves.
struct Images {
    v1: Vec<u8>,
    v2: Vec<u8>,
    v2_zst: Vec<u8>,
    delta: Vec<u8>,
    delta_other_base: Vec<u8>,
    wrong: Vec<u8>,
    /// A disk running v1 from slot A (successful).
    disk: Vec<u8>,
}

const IMAGE_LEN: usize = 192 * 1024;

fn bsdiff(old: &[u8], new: &[u8]) -> Vec<u8> {
    let mut p = Vec::new();
    qbsdiff::Bsdiff::new(old, new)
        .compare(std::io::Cursor::new(&mut p))
        .expect("bsdiff of in-memory images");
    p
}

fn images() -> &'static Images {
    static I: OnceLock<Images> = OnceLock::new();
    I.get_or_init(|| {
        // v1: half text-like (compressible), half noise; v2: v1 with a few edits.
        let mut v1 = noise(1, IMAGE_LEN);
        for (i, b) in v1.iter_mut().enumerate().take(IMAGE_LEN / 2) {
            *b = b"keelos image v1 "[i % 16];
        }
        let mut v2 = v1.clone();
        for k in 0..12 {
            let at = (k * 15_551) % (IMAGE_LEN - 300);
            v2[at..at + 200].copy_from_slice(&noise(40 + k as u8, 200));
        }
        // Another base: v1 edited elsewhere, so a patch from it borrows bytes v1 does not have.
        let mut v0 = v1.clone();
        for k in 0..24 {
            let at = (k * 7_919 + 3_000) % (IMAGE_LEN - 600);
            v0[at..at + 500].copy_from_slice(&noise(90 + k as u8, 500));
        }
        let mut v2_zst = Vec::new();
        zframes::compress(&v2[..], &mut v2_zst, 3, 16 * 1024).expect("compressing v2");
        let delta = bsdiff(&v1, &v2);
        let delta_other_base = bsdiff(&v0, &v2);
        let wrong = noise(77, IMAGE_LEN);
        let mut dev = CrashDevice::new(6 * MIB, 512);
        disk::create(
            &mut dev,
            LayoutSpec {
                esp_size: MIB,
                root_size: MIB,
                state_size: Some(MIB),
            },
        )
        .expect("creating the simulated disk");
        let (layout, plan) = driver::plan(
            &dev,
            None,
            Request {
                sha256: sha(&v1),
                version: "v1".into(),
                tries: 3,
                full: FullImage {
                    identity: "v1".into(),
                    fetch_size: None,
                    image_len: None,
                },
                delta: None,
                delta_expect: None,
                checkpoint_every: MIB,
            },
        )
        .expect("planning v1");
        let mut inputs = MemInputs {
            full: v1.clone(),
            patch: None,
            chunk: 64 * 1024,
        };
        driver::run(
            &mut dev,
            &layout,
            plan,
            &mut inputs,
            &mut MemStore::default(),
            &mut |_| {},
        )
        .expect("installing v1");
        store::update(&mut dev, |f| bootctl::mark_successful(f, Slot::A)).expect("v1 booted");
        Images {
            v1,
            v2,
            v2_zst,
            delta,
            delta_other_base,
            wrong,
            disk: dev.durable(),
        }
    })
}

/// What the server offers, by fault mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    None,
    CorruptDelta,
    OtherBase,
    TruncatedDelta,
    Every2nd500,
    WrongImage,
}

fn files(fault: Fault) -> HashMap<String, Vec<u8>> {
    let im = images();
    let mut delta = im.delta.clone();
    match fault {
        Fault::CorruptDelta => {
            let n = delta.len();
            for b in &mut delta[n / 3..n / 3 + 64] {
                *b ^= 0x5a;
            }
        }
        Fault::OtherBase => delta = im.delta_other_base.clone(),
        Fault::TruncatedDelta => delta.truncate(delta.len() * 2 / 3),
        _ => {}
    }
    let (raw, zst) = if fault == Fault::WrongImage {
        let mut z = Vec::new();
        zframes::compress(&im.wrong[..], &mut z, 3, 16 * 1024).expect("compressing");
        (im.wrong.clone(), z)
    } else {
        (im.v2.clone(), im.v2_zst.clone())
    };
    HashMap::from([
        ("/v2.img".to_string(), raw),
        ("/v2.img.zst".to_string(), zst),
        ("/v2.delta".to_string(), delta),
    ])
}

/// How the node fetches: the full image raw or zstd-framed, with or without a delta, over http
/// or https.
#[derive(Debug, Clone, Copy)]
struct Fetch {
    zst: bool,
    delta: bool,
    https: bool,
}

impl Fetch {
    fn base(self) -> &'static str {
        if self.https {
            "https://server"
        } else {
            "http://server"
        }
    }
    fn full_path(self) -> &'static str {
        if self.zst {
            "/v2.img.zst"
        } else {
            "/v2.img"
        }
    }
    fn spec(self) -> Spec {
        Spec {
            release_url: None,
            full_url: format!("{}{}", self.base(), self.full_path()),
            delta_url: self.delta.then(|| format!("{}/v2.delta", self.base())),
            sha256: sha(&images().v2),
            version: "v2".into(),
        }
    }
}

fn sim(seed: u64) -> turmoil::Sim<'static> {
    turmoil::Builder::new()
        .rng_seed(seed)
        .repair_rate(0.2)
        .simulation_duration(Duration::from_secs(3600))
        .tick_duration(Duration::from_millis(5))
        .min_message_latency(Duration::from_millis(1))
        .max_message_latency(Duration::from_millis(40))
        .enable_random_order()
        .build()
}

fn new_node(name: &str) -> Node {
    let im = images();
    let n = Node::new(name, CrashDevice::from_bytes(im.disk.clone(), 512));
    {
        let mut w = lock(&n.dev.watch);
        w.allowed.insert(sha(&im.v1));
        w.allowed.insert(sha(&im.v2));
    }
    n
}

/// The update server as a host.
fn server_host(sim: &mut turmoil::Sim<'static>, server: Server) -> Arc<Server> {
    let server = Arc::new(server);
    let s2 = server.clone();
    sim.host("server", move || server::serve(s2.clone()));
    server
}

/// A node as a host: each incarnation boots and serves the agent.
fn node_host(sim: &mut turmoil::Sim<'static>, node: &Node) {
    let n = node.clone();
    sim.host(node.name.as_str(), move || n.clone().serve());
}

/// A simulation with a healthy update server and one node, "node", and how that node fetches
/// (raw or zstd frames, http or https, by seed).
fn one_node(seed: u64) -> (turmoil::Sim<'static>, Node, Fetch) {
    let f = Fetch {
        zst: seed % 2 == 1,
        delta: false,
        https: seed.is_multiple_of(3),
    };
    let mut sim = sim(seed);
    server_host(&mut sim, Server::new(files(Fault::None), false));
    let node = new_node("node");
    node_host(&mut sim, &node);
    (sim, node, f)
}

/// The node's disk against what the operator saw: the invariants hold, the disk's flags and
/// images are what Status says, the node is on the old image or the new one (never partial),
/// and on the one the install's result says (when `expect_ok` is given, the result must be so).
fn check_outcome(n: &Node, out: &Outcome, expect_ok: Option<bool>) -> Result<(), String> {
    let name = &n.name;
    let v = lock(&n.dev.watch).violations.clone();
    if !v.is_empty() {
        return Err(format!("{name}: {}", v.join("; ")));
    }
    let durable = {
        let disk = lock(&n.dev.disk);
        let v = check_disk(&disk, &lock(&n.dev.watch));
        if !v.is_empty() {
            return Err(format!("{name}: {}", v.join("; ")));
        }
        CrashDevice::from_bytes(disk.durable(), 512)
    };
    let (layout, flags) = store::load(&durable).map_err(|e| e.to_string())?;
    let im = images();
    let preferred = flags.preferred().ok_or("no slot is preferred")?;
    let (digest, _) = slot_image(&durable, &layout, preferred)?;
    // Status matches the disk.
    let st = &out.status;
    if st.next_boot_slot != preferred.letter() {
        return Err(format!(
            "{name}: Status says the next boot is {:?}, the disk prefers {preferred:?}",
            st.next_boot_slot
        ));
    }
    for slot in [Slot::A, Slot::B] {
        let info = st
            .slots
            .iter()
            .find(|x| x.slot == slot.letter())
            .ok_or("Status lists no such slot")?;
        let f = flags.get(slot);
        if info.bootable != f.bootable() || info.successful != f.successful() {
            return Err(format!(
                "{name}: Status says slot {slot:?} bootable={} successful={}, the disk {f:?}",
                info.bootable, info.successful
            ));
        }
        if f.bootable() {
            let (d, _) = slot_image(&durable, &layout, slot)?;
            let shown = info.image.as_ref().map(|i| i.sha256.as_str());
            if shown != Some(d.as_str()) {
                return Err(format!(
                    "{name}: Status shows slot {slot:?} holding {shown:?}, the disk {d}"
                ));
            }
        }
    }
    // Old or new, never partial; and what the result says.
    let old = digest == sha(&im.v1) && preferred == Slot::A;
    let new = digest == sha(&im.v2) && preferred == Slot::B;
    if !old && !new {
        return Err(format!(
            "{name}: the disk prefers {preferred:?} holding {digest}: neither the old image in A nor the new one in B"
        ));
    }
    let ok = match &out.result {
        Some(r) if r.ok => {
            if !new || r.staged_slot != Slot::B.letter() || r.sha256 != digest {
                return Err(format!(
                    "{name}: the result says {} staged in {}, the disk prefers {preferred:?} holding {digest}",
                    r.sha256, r.staged_slot
                ));
            }
            true
        }
        Some(r) => {
            if !old {
                return Err(format!(
                    "{name}: the install failed ({}) but the disk prefers {preferred:?} holding {digest}",
                    r.error
                ));
            }
            false
        }
        None => {
            return Err(format!(
                "{name}: the operator got no result in {} issues",
                out.issues
            ))
        }
    };
    if let Some(e) = expect_ok {
        if ok != e {
            let r = out.result.clone().unwrap_or_default();
            return Err(format!(
                "{name}: install ok={ok} (expected {e}): {}",
                r.error
            ));
        }
    }
    Ok(())
}

/// bytes_saved: the full download's size minus the patch's for a delta install, 0 otherwise.
/// The agent learns the full size from a probe request; when every try of that probe was lost
/// (the server never answered it), the agent reports 0, as documented (advisory).
fn check_bytes_saved(
    res: &proto::InstallResult,
    f: Fetch,
    server: &Server,
    peer: &str,
) -> Result<(), String> {
    let full_path = f.full_path();
    let full_len = server.files[full_path].len() as u64;
    let patch_len = server.files["/v2.delta"].len() as u64;
    let want = if f.delta && !res.fallback_used {
        full_len.saturating_sub(patch_len)
    } else {
        0
    };
    let probed = server
        .seen()
        .iter()
        .any(|x| x.peer == peer && x.path == full_path && x.size_answered);
    if res.bytes_saved == want || (res.bytes_saved == 0 && !probed) {
        return Ok(());
    }
    let probes = server
        .seen()
        .iter()
        .filter(|x| x.peer == peer && x.path == full_path)
        .count();
    Err(format!(
        "bytes_saved is {} but the full download is {full_len} bytes and the patch {patch_len} (fallback {}, size probe answered {probed}, {probes} requests for the full image seen by the server)",
        res.bytes_saved, res.fallback_used
    ))
}

type Slot1<T> = Rc<std::cell::RefCell<Option<T>>>;

/// One node, one operator installing through the API (re-issuing on "re-run the install", up
/// to 3 times), with `server` and the node-server link failing at `fail_rate`.
fn one_install(
    seed: u64,
    server: Server,
    f: Fetch,
    fail_rate: f64,
) -> Result<(Outcome, Node, Arc<Server>), String> {
    let mut sim = sim(seed);
    let server = server_host(&mut sim, server);
    let node = new_node("node");
    node_host(&mut sim, &node);
    if fail_rate > 0.0 {
        sim.set_link_fail_rate("node", "server", fail_rate);
    }
    let out: Slot1<Result<Outcome, String>> = Rc::default();
    let o2 = out.clone();
    sim.client("operator", async move {
        *o2.borrow_mut() = Some(operator::install("node", &f.spec(), 3).await);
        Ok(())
    });
    let peer = sim.lookup("node").to_string();
    sim.run().map_err(|e| e.to_string())?;
    let outcome = out
        .borrow_mut()
        .take()
        .ok_or("the operator never finished")??;
    check_outcome(&node, &outcome, None)?;
    if let Some(r) = outcome.result.as_ref().filter(|r| r.ok) {
        check_bytes_saved(r, f, &server, &peer)?;
    }
    Ok((outcome, node, server))
}

/// Links break (per tick) and heal; latency and reordering come from the builder.
fn flaky_rate(seed: u64) -> f64 {
    [0.005, 0.01, 0.02][(SplitMix(seed).next_u64() % 3) as usize]
}

/// Flaky node-server links: installs complete by resuming, verified. Every fourth seed
/// downloads over https (the CA bundle of the agent's fetcher); every fifth from a server that
/// sends no lengths and cuts each answer right after its last byte (the client's resume at the
/// end gets 416 `bytes */LEN`: complete).
#[test]
fn flaky_links_resume() {
    let resumed = std::cell::Cell::new(0u64);
    let ended_by_416 = std::cell::Cell::new(0u64);
    each_seed("flaky_links_resume", DEFAULT_SEEDS, |seed| {
        let f = Fetch {
            zst: seed % 3 == 1,
            delta: seed % 3 == 2,
            https: seed % 4 == 0,
        };
        let mut server = Server::new(files(Fault::None), false);
        server.lengthless = seed % 5 == 3;
        let (out, _, server) = one_install(seed, server, f, flaky_rate(seed))?;
        if debug() {
            eprintln!("{seed}: {:?}", server.seen());
        }
        let res = out.result.ok_or("no result")?;
        if !res.ok {
            return Err(format!("the install failed: {}", res.error));
        }
        // A sound delta falls back only when the network beat the retry budget on the patch's
        // download (turmoil heals a broken link per message sent, so a run of failed connects
        // can outlast 8 attempts); never because of its content.
        if res.fallback_used && !res.fallback_reason.contains("patch could not be fetched") {
            return Err(format!("a sound delta fell back: {}", res.fallback_reason));
        }
        let seen = server.seen();
        if seen.iter().any(|s| s.from > 1) {
            resumed.set(resumed.get() + 1);
        }
        if seen.iter().any(|s| {
            server
                .files
                .get(&s.path)
                .is_some_and(|d| s.from == d.len() as u64)
        }) {
            ended_by_416.set(ended_by_416.get() + 1);
        }
        Ok(())
    });
    // The scenario must exercise resumes, not only clean downloads.
    let enough = seeds(DEFAULT_SEEDS).len() >= 10;
    assert!(
        resumed.get() > 0 || !enough,
        "no seed resumed a download: the links never broke mid-body"
    );
    assert!(
        ended_by_416.get() > 0 || !enough,
        "no download was completed by a 416 at its end"
    );
    eprintln!(
        "flaky_links_resume: {} seeds resumed with Range, {} completed a download by a 416 at its end",
        resumed.get(),
        ended_by_416.get()
    );
}

#[test]
fn server_faults_fall_back() {
    each_seed("server_faults_fall_back", DEFAULT_SEEDS, |seed| {
        let fault = [
            Fault::CorruptDelta,
            Fault::OtherBase,
            Fault::TruncatedDelta,
            Fault::Every2nd500,
        ][(seed % 4) as usize];
        let f = Fetch {
            zst: (seed / 4) % 2 == 1,
            delta: true,
            https: (seed / 8) % 3 == 0,
        };
        let server = Server::new(files(fault), fault == Fault::Every2nd500);
        let (out, _, _) = one_install(seed, server, f, 0.0)?;
        let res = out.result.ok_or("no result")?;
        if !res.ok {
            return Err(format!("{fault:?}: the install failed: {}", res.error));
        }
        // A 500 every other request is retried by fetch, so the delta itself may succeed;
        // the other faults must end in the full image.
        if fault != Fault::Every2nd500 && !res.fallback_used {
            return Err(format!(
                "{fault:?}: the install did not report fallback_used"
            ));
        }
        Ok(())
    });
}

#[test]
fn wrong_image_activates_nothing() {
    each_seed("wrong_image_activates_nothing", DEFAULT_SEEDS, |seed| {
        let f = Fetch {
            zst: seed % 2 == 1,
            delta: false,
            https: seed % 3 == 0,
        };
        let server = Server::new(files(Fault::WrongImage), false);
        let (out, node, _) = one_install(seed, server, f, 0.0)?;
        let res = out.result.ok_or("no result")?;
        if res.ok {
            return Err("an image with the wrong digest was staged".into());
        }
        // check_outcome saw the disk preferring A with v1; the target is not bootable either.
        let durable = CrashDevice::from_bytes(lock(&node.dev.disk).durable(), 512);
        let (_, flags) = store::load(&durable).map_err(|e| e.to_string())?;
        if flags.get(Slot::B).bootable() {
            return Err("slot B is bootable after a failed install".into());
        }
        Ok(())
    });
}

#[test]
fn partition_longer_than_retries() {
    each_seed("partition_longer_than_retries", DEFAULT_SEEDS, |seed| {
        let mut rng = SplitMix(seed);
        let (mut sim, node, f) = one_node(seed);
        // Cut the node off a few ticks into the download, for far longer than the fetch
        // policy's retries and timeouts add up to (under 20 s), then heal.
        let cut_at = Duration::from_millis(10 + rng.below(80));
        sim.client("chaos", async move {
            tokio::time::sleep(cut_at).await;
            turmoil::partition("node", "server");
            tokio::time::sleep(Duration::from_secs(60)).await;
            turmoil::repair("node", "server");
            Ok(())
        });
        type Outs = Vec<Result<Outcome, String>>;
        let out: Rc<std::cell::RefCell<Outs>> = Rc::default();
        let o2 = out.clone();
        sim.client("operator", async move {
            let first = operator::install("node", &f.spec(), 1).await;
            o2.borrow_mut().push(first);
            // The operator comes back after the partition healed.
            tokio::time::sleep(Duration::from_secs(70)).await;
            let second = operator::install("node", &f.spec(), 1).await;
            o2.borrow_mut().push(second);
            Ok(())
        });
        sim.run().map_err(|e| e.to_string())?;
        let outs = out.borrow_mut().drain(..).collect::<Result<Vec<_>, _>>()?;
        let [first, second] = &outs[..] else {
            return Err(format!("{} installs ended, not 2", outs.len()));
        };
        let r1 = first.result.clone().ok_or("no result")?;
        if r1.ok {
            return Err(format!(
                "the install survived a 60 s partition from {cut_at:?} on"
            ));
        }
        if !r1.error.contains("re-run the install") {
            return Err(format!("the failure does not say what to do: {}", r1.error));
        }
        // The node stayed on its slot: the first Status (taken after the failure) shows A
        // preferred with v1.
        if first.status.next_boot_slot != Slot::A.letter() {
            return Err(format!(
                "after the failed install the next boot is {:?}",
                first.status.next_boot_slot
            ));
        }
        check_outcome(&node, second, Some(true))?;
        Ok(())
    });
}

/// What a fleet run exercised.
#[derive(Debug, Default, Clone, Copy)]
struct FleetStats {
    /// Re-issued installs that resumed from a checkpoint.
    resumed: u64,
    /// Hosts that lost power at a disk operation.
    power_cuts: u64,
    /// Install streams the operator lost (host crashes, broken operator links).
    streams_lost: u64,
}

/// One node of a fleet run: what it installs and what befalls its host.
#[derive(Debug, Clone)]
struct NodeCfg {
    fetch: Fetch,
    /// Host crashes at these instants (the disk keeps a seeded choice of its unflushed writes).
    crashes: Vec<Duration>,
    /// At this instant, the power is cut after this many more disk writes and flushes.
    power_cut: Option<(Duration, u64)>,
    /// The node-server link breaks at this rate.
    fail_rate: f64,
    /// The operator-node link (the gRPC connection) breaks at this rate.
    operator_fail_rate: f64,
}

impl NodeCfg {
    fn random(rng: &mut SplitMix, crash_one_in: u64) -> NodeCfg {
        NodeCfg {
            fetch: Fetch {
                zst: rng.below(2) == 1,
                delta: rng.below(2) == 1,
                https: rng.below(3) == 0,
            },
            crashes: if rng.below(crash_one_in) == 0 {
                vec![Duration::from_millis(5 + rng.below(400))]
            } else {
                vec![]
            },
            power_cut: (rng.below(crash_one_in) == 0)
                .then(|| (Duration::from_millis(rng.below(300)), rng.below(60))),
            fail_rate: [0.0, 0.005, 0.01][rng.below(3) as usize],
            operator_fail_rate: [0.0, 0.002, 0.005][rng.below(3) as usize],
        }
    }
}

/// Nodes as turmoil hosts serving the agent, one operator installing on all of them at once
/// through the API. Hosts crash at their instants, or when their disk loses power (the crash
/// model then keeps a seeded choice of the unflushed writes) and come back: each incarnation
/// runs the boot choice (checked to pick a verified slot) and serves a new agent; the operator,
/// having lost the node, issues the install again. Checks every node's end state against what
/// the operator sees in Status.
fn fleet(seed: u64, fault: Fault, cfgs: &[NodeCfg]) -> Result<FleetStats, String> {
    let mut sim = sim(seed);
    let server = server_host(
        &mut sim,
        Server::new(files(fault), fault == Fault::Every2nd500),
    );
    let nodes: Vec<Node> = (0..cfgs.len())
        .map(|i| new_node(&format!("node{i}")))
        .collect();
    for (n, cfg) in nodes.iter().zip(cfgs) {
        node_host(&mut sim, n);
        if cfg.fail_rate > 0.0 {
            sim.set_link_fail_rate(n.name.as_str(), "server", cfg.fail_rate);
        }
    }
    type Outs = Rc<std::cell::RefCell<Vec<Option<Result<Outcome, String>>>>>;
    let outs: Outs = Rc::new(std::cell::RefCell::new(vec![None; cfgs.len()]));
    let o2 = outs.clone();
    let specs: Vec<Spec> = cfgs.iter().map(|c| c.fetch.spec()).collect();
    sim.client("operator", async move {
        let tasks: Vec<_> = specs
            .into_iter()
            .enumerate()
            .map(|(i, spec)| {
                let o = o2.clone();
                tokio::task::spawn_local(async move {
                    let r = operator::install(&format!("node{i}"), &spec, 8).await;
                    o.borrow_mut()[i] = Some(r);
                })
            })
            .collect();
        for t in tasks {
            t.await?;
        }
        Ok(())
    });
    for (n, cfg) in nodes.iter().zip(cfgs) {
        if cfg.operator_fail_rate > 0.0 {
            sim.set_link_fail_rate(n.name.as_str(), "operator", cfg.operator_fail_rate);
        }
    }
    let mut pending: Vec<(Duration, usize, Option<u64>)> = cfgs
        .iter()
        .enumerate()
        .flat_map(|(i, c)| {
            c.crashes
                .iter()
                .map(move |&t| (t, i, None))
                .chain(c.power_cut.map(|(t, n)| (t, i, Some(n))))
        })
        .collect();
    pending.sort();
    let mut crash_no = 0u64;
    let mut resumes: Vec<(usize, String, u64, usize)> = Vec::new();
    let mut power_cuts = 0u64;
    loop {
        let finished = sim.step().map_err(|e| e.to_string())?;
        // Arm power cuts and crash hosts whose time came.
        let mut crash_now: Vec<usize> = Vec::new();
        while let Some(&(t, i, cut)) = pending.first() {
            if sim.elapsed() < t {
                break;
            }
            pending.remove(0);
            if outs.borrow()[i].is_some() {
                continue; // the operator is done with this node
            }
            match cut {
                Some(n) => lock(&nodes[i].dev.disk).cut_power_after(n),
                None => crash_now.push(i),
            }
        }
        for (i, n) in nodes.iter().enumerate() {
            if !lock(&n.dev.disk).is_powered() {
                power_cuts += 1;
                crash_now.push(i);
            }
        }
        for i in crash_now {
            let node = &nodes[i];
            let name = node.name.as_str();
            sim.crash(name);
            crash_no += 1;
            {
                let mut d = lock(&node.dev.disk);
                let choice = d.seeded_choice(seed.wrapping_mul(31).wrapping_add(crash_no));
                d.crash(&choice);
                let v = check_disk(&d, &lock(&node.dev.watch));
                if !v.is_empty() {
                    return Err(format!("{name} after a crash: {}", v.join("; ")));
                }
            }
            // The checkpoint the re-issued install must resume from: one into a target that is
            // still invalidated (a crash after activation leaves a staged slot, not a resume).
            let before = server.seen().len();
            let cp = lock(&node.store)
                .value
                .as_deref()
                .and_then(Checkpoint::from_bytes);
            if let Some(cp) = cp {
                let durable = CrashDevice::from_bytes(lock(&node.dev.disk).durable(), 512);
                let (_, flags) = store::load(&durable).map_err(|e| e.to_string())?;
                let invalid = flags.get(cp.target).state() == bootctl::SlotState::Invalid;
                if debug() {
                    eprintln!(
                        "{name} crashed at {:?} with {cp:?}; {flags:?}",
                        sim.elapsed()
                    );
                }
                if cp.image_offset > 0 && invalid {
                    let path = cfgs[i].fetch.full_path().to_string();
                    resumes.push((i, path, cp.input_offset, before));
                }
            }
            sim.bounce(name);
        }
        if finished {
            break;
        }
        if sim.elapsed() > Duration::from_secs(1800) {
            return Err("the fleet did not finish within 30 simulated minutes".into());
        }
    }
    let outs = outs.borrow_mut().drain(..).collect::<Vec<_>>();
    let mut streams_lost = 0;
    for (i, (node, out)) in nodes.iter().zip(outs).enumerate() {
        let name = &node.name;
        let out = out.ok_or("the operator never finished")??;
        streams_lost += u64::from(out.streams_lost);
        if debug() {
            eprintln!("{name}: {:?} after {} issues", out.result, out.issues);
        }
        check_outcome(node, &out, None)?;
        if let Some(r) = out.result.as_ref().filter(|r| r.ok) {
            let peer = sim.lookup(name.as_str()).to_string();
            check_bytes_saved(r, cfgs[i].fetch, &server, &peer)
                .map_err(|e| format!("{name}: {e}"))?;
        }
    }
    if debug() {
        eprintln!("{seed}: {power_cuts} power cuts; {:?}", server.seen());
    }
    // A re-issued install resumed from its checkpoint: the server saw a Range request at the
    // checkpoint's input offset.
    let seen = server.seen();
    let resumed = resumes.len() as u64;
    for (i, path, from, before) in resumes {
        if !seen[before..]
            .iter()
            .any(|s| s.path == path && s.from == from)
        {
            return Err(format!(
                "node{i} had a checkpoint at input byte {from} of {path} but never asked for it"
            ));
        }
    }
    Ok(FleetStats {
        resumed,
        power_cuts,
        streams_lost,
    })
}

/// One node whose host crashes at random instants and loses power at a random disk operation
/// during an install; the operator re-issues the install each time it loses the node.
#[test]
fn crash_and_resume() {
    let resumed = std::cell::Cell::new(0u64);
    let power_cuts = std::cell::Cell::new(0u64);
    each_seed("crash_and_resume", DEFAULT_SEEDS, |seed| {
        let mut rng = SplitMix(seed);
        let crashes = (0..rng.below(3))
            .map(|_| Duration::from_millis(5 + rng.below(400)))
            .collect::<Vec<_>>();
        // Every seed without a timed crash loses power at a disk operation; some seeds both.
        let power_cut = (crashes.is_empty() || rng.below(2) == 0)
            .then(|| (Duration::from_millis(rng.below(200)), rng.below(80)));
        let cfg = NodeCfg {
            fetch: Fetch {
                zst: seed % 2 == 1,
                delta: false,
                https: seed % 5 == 0,
            },
            crashes,
            power_cut,
            fail_rate: 0.0,
            operator_fail_rate: 0.0,
        };
        let st = fleet(seed, Fault::None, &[cfg])?;
        resumed.set(resumed.get() + st.resumed);
        power_cuts.set(power_cuts.get() + st.power_cuts);
        Ok(())
    });
    let (n, p) = (resumed.get(), power_cuts.get());
    eprintln!("crash_and_resume: {n} re-issued installs resumed from a checkpoint; {p} power cuts");
    let enough = seeds(DEFAULT_SEEDS).len() >= 10;
    assert!(
        n > 0 || !enough,
        "no crash landed after a checkpoint: the scenario never exercised a resume"
    );
    assert!(
        p > 0 || !enough,
        "no power cut happened: the scenario never cut power at a disk operation"
    );
}

#[test]
fn fleet_with_random_faults() {
    let lost = std::cell::Cell::new(0u64);
    each_seed("fleet_with_random_faults", DEFAULT_SEEDS / 3, |seed| {
        let mut rng = SplitMix(seed);
        let fault = [Fault::None, Fault::CorruptDelta, Fault::Every2nd500][rng.below(3) as usize];
        let cfgs: Vec<NodeCfg> = (0..5).map(|_| NodeCfg::random(&mut rng, 3)).collect();
        if debug() {
            eprintln!("{seed}: {fault:?} {cfgs:?}");
        }
        let st = fleet(seed, fault, &cfgs)?;
        lost.set(lost.get() + st.streams_lost);
        Ok(())
    });
    eprintln!(
        "fleet_with_random_faults: the operator lost {} install streams",
        lost.get()
    );
    assert!(
        lost.get() > 0 || seeds(DEFAULT_SEEDS).len() < 10,
        "the operator never lost a stream: crashes and operator-link faults never landed"
    );
}

/// Two operators through the API: the first starts an install and disconnects mid-stream; the
/// second asks for an install at a random instant (at the same instant for some seeds) and,
/// while one runs, is refused with FAILED_PRECONDITION naming it. Exactly one install runs at a
/// time; the update finishes; a new client sees it in Status, matching the disk.
#[test]
fn operators_disconnect_and_race() {
    let raced = std::cell::Cell::new(0u64);
    each_seed("operators_disconnect_and_race", DEFAULT_SEEDS, |seed| {
        let mut rng = SplitMix(seed);
        let (mut sim, node, f) = one_node(seed);
        sim.set_link_fail_rate("node", "server", flaky_rate(seed));
        let drop_after = rng.below(6) as usize;
        let second_after = if rng.below(4) == 0 {
            Duration::ZERO
        } else {
            Duration::from_millis(1 + rng.below(300))
        };
        // Both ask for the same image under their own version label, so the ids differ.
        let spec = |label: &str| Spec {
            version: label.into(),
            ..f.spec()
        };
        type Started = Rc<std::cell::RefCell<Vec<(String, Result<(), tonic::Status>)>>>;
        let started: Started = Rc::default();
        for (op, label, delay) in [
            ("op1", "v2-op1", Duration::ZERO),
            ("op2", "v2-op2", second_after),
        ] {
            let (st, s) = (started.clone(), spec(label));
            sim.client(op, async move {
                // Both operators' connections are up before either asks.
                let mut c = operator::client("node");
                c.status().await?;
                tokio::time::sleep(delay).await;
                match c.install(operator::request(&s)).await {
                    Ok(mut stream) => {
                        st.borrow_mut().push((s.version.clone(), Ok(())));
                        // Read a few events, then disconnect mid-stream.
                        operator::follow(&mut stream, Some(drop_after)).await?;
                    }
                    Err(e) => st.borrow_mut().push((s.version.clone(), Err(e))),
                }
                Ok(())
            });
        }
        let out: Slot1<Result<proto::StatusReply, String>> = Rc::default();
        let o2 = out.clone();
        sim.client("op3", async move {
            // A new operator, later: the update has finished and Status shows it.
            tokio::time::sleep(Duration::from_millis(400)).await;
            let mut c = operator::Conn::new("node");
            *o2.borrow_mut() = Some(c.settled().await);
            Ok(())
        });
        sim.run().map_err(|e| e.to_string())?;
        let status = out.borrow_mut().take().ok_or("op3 never finished")??;
        let started = started.borrow().clone();
        let u = status.update.clone().ok_or("Status shows no update")?;
        if u.running {
            return Err("Status shows the update still running".into());
        }
        let accepted: Vec<&String> = started
            .iter()
            .filter(|(_, r)| r.is_ok())
            .map(|(v, _)| v)
            .collect();
        let refused: Vec<(&String, &tonic::Status)> = started
            .iter()
            .filter_map(|(v, r)| r.as_ref().err().map(|e| (v, e)))
            .collect();
        match (&accepted[..], &refused[..]) {
            ([winner], [(_, e)]) => {
                if e.code() != tonic::Code::FailedPrecondition
                    || !e.message().contains(&format!("{winner} (sha256"))
                {
                    return Err(format!("the loser was told {e:?}, not that {winner} runs"));
                }
                if u.version != **winner {
                    return Err(format!("Status shows {}, the winner was {winner}", u.id));
                }
                raced.set(raced.get() + 1);
            }
            // The second came after the first finished: both ran, one after the other.
            ([_, _], []) => {}
            _ => return Err(format!("unexpected admissions: {started:?}")),
        }
        let outcome = Outcome {
            result: u.result.clone(),
            status,
            issues: 1,
            streams_lost: 0,
            refused: None,
        };
        // The install succeeds unless the flaky link beat fetch's retry budget, in which case
        // it says to re-run it (and check_outcome sees the node still on its slot).
        let rerun = u
            .result
            .as_ref()
            .is_some_and(|r| !r.ok && r.error.contains("re-run the install"));
        check_outcome(&node, &outcome, (!rerun).then_some(true))?;
        Ok(())
    });
    eprintln!(
        "operators_disconnect_and_race: the second operator was refused in {} seeds",
        raced.get()
    );
    assert!(
        raced.get() > 0 || seeds(DEFAULT_SEEDS).len() < 10,
        "the second operator never came while an install ran"
    );
}

/// The running image's security version on the signed-mode nodes.
const RUNNING_SECURITY_VERSION: u64 = 5;

/// The release signing keys of the simulation and a running image's root that trusts one of
/// them. Made once per test process by the `minisign` crate's key generation (random, like the
/// simulation's PKI); a seed replays alike whatever the keys are: keys, key ids and signatures
/// have fixed lengths, so every message the network carries has the same size and timing.
struct ReleaseKeys {
    /// The key the nodes' image trusts.
    trusted: ReleaseSigner,
    /// A well-formed key the image does not trust.
    untrusted: ReleaseSigner,
    /// etc/keel/trusted-keys/<KEY ID>.pub (the trusted key) and etc/keel/security-version
    /// ([`RUNNING_SECURITY_VERSION`]) as keel-image lays them out.
    image_root: PathBuf,
}

fn new_signer(name: &str) -> ReleaseSigner {
    let kp = minisign::KeyPair::generate_unencrypted_keypair().expect("minisign key generation");
    let text = kp
        .sk
        .to_box(None)
        .expect("an unencrypted secret key box")
        .into_string();
    ReleaseSigner::parse(name, &text).expect("the generated secret key is a signer")
}

fn release_keys() -> &'static ReleaseKeys {
    static K: OnceLock<ReleaseKeys> = OnceLock::new();
    K.get_or_init(|| {
        let trusted = new_signer("sim trusted key");
        let untrusted = new_signer("sim untrusted key");
        let image_root = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("sim-image-root-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&image_root);
        let kd = image_root.join(manifest::TRUSTED_KEYS_DIR);
        std::fs::create_dir_all(&kd).unwrap();
        let public = trusted.public();
        std::fs::write(kd.join(public.file_name()), public.to_file_text()).unwrap();
        std::fs::write(
            image_root.join(manifest::SECURITY_VERSION_FILE),
            manifest::security_version_text(RUNNING_SECURITY_VERSION),
        )
        .unwrap();
        ReleaseKeys {
            trusted,
            untrusted,
            image_root,
        }
    })
}

/// release.json for v2 (its zstd frames beside it, and the delta from v1 when `delta`), as
/// keel-image writes it.
fn release_manifest(security_version: u64, delta: bool) -> Vec<u8> {
    let im = images();
    let hex = |c: char| std::iter::repeat_n(c, 64).collect::<String>();
    Manifest {
        format: manifest::FORMAT,
        version: "v2".into(),
        security_version,
        kernel_release: "6.1.0-48-amd64".into(),
        kernel_sha256: hex('e'),
        initramfs_sha256: hex('f'),
        image: manifest::Image {
            sha256: sha(&im.v2),
            size: im.v2.len() as u64,
        },
        compressed: manifest::Artifact {
            name: "v2.img.zst".into(),
            sha256: sha(&im.v2_zst),
            size: im.v2_zst.len() as u64,
        },
        delta: delta.then(|| manifest::DeltaArtifact {
            name: "v2.delta".into(),
            base_sha256: sha(&im.v1),
            sha256: sha(&im.delta),
            size: im.delta.len() as u64,
        }),
        verity: None,
    }
    .to_bytes()
}

/// Its signature by `key`, as keel-image signs it.
fn release_signature(key: &ReleaseSigner, manifest_bytes: &[u8]) -> Vec<u8> {
    let m = Manifest::parse(manifest_bytes).unwrap();
    let comment = format!(
        "keelos release {} security_version {} file:{}",
        m.version,
        m.security_version,
        manifest::MANIFEST_FILE
    );
    key.sign(manifest_bytes, &comment).unwrap().into_bytes()
}

/// What the update server publishes as the release.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Published {
    /// Signed by the trusted key, security version at or above the running one.
    Good,
    /// The right manifest, signed by a key the image does not trust.
    UntrustedKey,
    /// The trusted key's signature of another manifest (an older release's) beside this one.
    OtherSignature,
    /// Signed by the trusted key, but an older security version than the running one.
    Older,
    /// No signature (404 for release.json.minisig).
    Unsigned,
}

impl Published {
    const ALL: [Published; 5] = [
        Published::Good,
        Published::UntrustedKey,
        Published::OtherSignature,
        Published::Older,
        Published::Unsigned,
    ];

    /// What the agent's refusal must say.
    fn refusal(self) -> Option<&'static str> {
        match self {
            Published::Good => None,
            Published::UntrustedKey => Some("which this image does not trust"),
            Published::OtherSignature => Some("does not verify"),
            Published::Older => Some("lower than the running"),
            Published::Unsigned => Some("the release is not signed"),
        }
    }
}

/// A node whose image trusts one signing key (security version [`RUNNING_SECURITY_VERSION`])
/// is asked, through the API, to install the release at http(s)://server/release.json. The
/// server publishes, by seed, a good release (signed by the trusted key, security version at or
/// above the running one, with or without a delta from the running image), the right manifest
/// signed by an untrusted key, the trusted key's signature of another manifest, an older
/// release properly signed, or no signature at all. Every third seed's node-server link is
/// flaky. A good release installs (or, on a flaky link, may fail to download, leaving the node
/// on its slot); every other one is refused before anything is written (the disk byte for byte
/// as it was, no checkpoint, no install in Status), whatever the network did.
#[test]
fn signed_releases_refuse_bad_signatures_and_older_releases() {
    let counts = std::cell::RefCell::new(HashMap::<&str, u64>::new());
    let count = |k: &'static str| *counts.borrow_mut().entry(k).or_default() += 1;
    let name = "signed_releases_refuse_bad_signatures_and_older_releases";
    each_seed(name, DEFAULT_SEEDS, |seed| {
        let mut rng = SplitMix(seed);
        let published = Published::ALL[(seed % 5) as usize];
        let flaky = (seed / 5) % 3 == 0;
        let https = rng.below(3) == 0;
        let delta = rng.below(2) == 1;
        let keys = release_keys();
        let n = RUNNING_SECURITY_VERSION;
        let good = release_manifest(n + rng.below(2), delta);
        let older = release_manifest(rng.below(n), delta);
        let (manifest_bytes, signature) = match published {
            Published::Good => (good.clone(), Some(release_signature(&keys.trusted, &good))),
            Published::UntrustedKey => (
                good.clone(),
                Some(release_signature(&keys.untrusted, &good)),
            ),
            Published::OtherSignature => (good, Some(release_signature(&keys.trusted, &older))),
            Published::Older => (
                older.clone(),
                Some(release_signature(&keys.trusted, &older)),
            ),
            Published::Unsigned => (good, None),
        };
        let mut files = files(Fault::None);
        files.insert(format!("/{}", manifest::MANIFEST_FILE), manifest_bytes);
        if let Some(s) = signature {
            files.insert(format!("/{}", manifest::SIGNATURE_FILE), s);
        }
        let mut sim = sim(seed);
        server_host(&mut sim, Server::new(files, false));
        let mut node = new_node("node");
        node.image_root = Some(keys.image_root.clone());
        node_host(&mut sim, &node);
        if flaky {
            sim.set_link_fail_rate("node", "server", flaky_rate(seed));
        }
        let base = if https {
            "https://server"
        } else {
            "http://server"
        };
        let spec = Spec {
            release_url: Some(format!("{base}/{}", manifest::MANIFEST_FILE)),
            full_url: String::new(),
            delta_url: None,
            sha256: sha(&images().v2),
            version: "v2".into(),
        };
        let out: Slot1<Result<Outcome, String>> = Rc::default();
        let o2 = out.clone();
        sim.client("operator", async move {
            *o2.borrow_mut() = Some(operator::install("node", &spec, 3).await);
            Ok(())
        });
        sim.run().map_err(|e| e.to_string())?;
        let out = out
            .borrow_mut()
            .take()
            .ok_or("the operator never finished")??;
        if debug() {
            eprintln!(
                "{seed}: {published:?} flaky={flaky}: {:?} {:?}",
                out.refused, out.result
            );
        }
        let not_downloaded = out
            .refused
            .as_deref()
            .is_some_and(|r| r.contains(operator::RELEASE_NOT_DOWNLOADED));
        match (published.refusal(), &out.refused) {
            (None, None) => {
                // Installed, or (flaky link only) its download failed: check_outcome checks
                // the disk holds v2 in B preferred, or v1 in A untouched.
                check_outcome(&node, &out, (!flaky).then_some(true))?;
                let ok = out.result.as_ref().is_some_and(|r| r.ok);
                count(if ok {
                    "a installs"
                } else {
                    "a downloads failed"
                });
                return Ok(());
            }
            (None, Some(_)) if flaky && not_downloaded => count("a manifests not downloaded"),
            (None, Some(r)) => return Err(format!("a good release was refused: {r}")),
            (Some(_), None) => {
                return Err(format!(
                    "{published:?}: not refused; the install ended {:?}",
                    out.result
                ))
            }
            (Some(why), Some(r)) => {
                let excused = flaky && not_downloaded;
                if !(r.contains(why) || excused) {
                    return Err(format!("{published:?}: refused, but not for {why:?}: {r}"));
                }
                count(match (published, not_downloaded) {
                    (_, true) => "refused as not downloaded",
                    (Published::UntrustedKey, _) => "b untrusted key refused",
                    (Published::OtherSignature, _) => "b other manifest's signature refused",
                    (Published::Older, _) => "c older refused",
                    _ => "d unsigned refused",
                });
            }
        }
        // Refused: nothing was written, no install ran.
        if out.result.is_some() || out.status.update.is_some() {
            return Err(format!(
                "{published:?}: refused, yet an install ran: {:?}",
                out.status.update
            ));
        }
        let v = lock(&node.dev.watch).violations.clone();
        if !v.is_empty() {
            return Err(v.join("; "));
        }
        let disk = lock(&node.dev.disk);
        let now =
            keelos::block::read_vec(&*disk, 0, images().disk.len()).map_err(|e| e.to_string())?;
        // the node's one boot changed its flags (the successful slot's count of boots until
        // health); nothing else may differ from the factory disk
        let mut booted = keelos::block::MemDevice::from_bytes(
            images().disk.clone(),
            keelos::block::BlockDevice::sector_size(&*disk),
        );
        keelos::bootctl::store::boot(&mut booted).map_err(|e| e.to_string())?;
        let booted = booted.into_bytes();
        if disk.durable() != booted || now != booted {
            return Err(format!("{published:?}: refused, but the disk changed"));
        }
        if lock(&node.store).value.is_some() {
            return Err(format!(
                "{published:?}: refused, but a checkpoint was stored"
            ));
        }
        Ok(())
    });
    let counts = counts.into_inner();
    let mut kinds: Vec<_> = counts.iter().collect();
    kinds.sort();
    let summary: Vec<String> = kinds.iter().map(|(k, n)| format!("{n} {k}")).collect();
    eprintln!(
        "signed_releases: {} seeds passed; {}",
        seeds(DEFAULT_SEEDS).len(),
        summary.join(", ")
    );
    if seeds(DEFAULT_SEEDS).len() >= 10 {
        for k in [
            "a installs",
            "b untrusted key refused",
            "b other manifest's signature refused",
            "c older refused",
            "d unsigned refused",
        ] {
            assert!(
                counts.contains_key(k),
                "no seed ended in \"{k}\": {counts:?}"
            );
        }
    }
}
