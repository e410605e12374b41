//! sim/: deterministic simulation of updates on turmoil's network. The code under test is the
//! production code (the agent's install driver, src/fetch, the update engine, the boot choice);
//! only the network (turmoil), the clock (turmoil's simulated time) and the disks (the crash
//! model, `CrashDevice`) are simulated.
//!
//! Not simulated here: the gRPC service and osctl over mTLS. Operators are modelled by calling
//! the agent's install layer (`agent::install::run_on` and the update board) on the node host.
//!
//! Each scenario runs a fixed number of seeds; `KEEL_SIM_SEED=N` replays one seed,
//! `KEEL_SIM_SEEDS=N` runs N seeds per scenario from `KEEL_SIM_SEED_BASE` (default 0; ci/soak).
//! A failure prints its seed and the command that replays it.

#![allow(clippy::panic)] // a test crate: a failing seed fails loudly, with its replay command

mod node;
mod server;

use keelos::agent::board::Board;
use keelos::agent::proto;
use keelos::agent::service::InstallView;
use keelos::block::CrashDevice;
use keelos::bootctl::{self, store, Slot};
use keelos::disk::{self, LayoutSpec, MIB};
use keelos::update::checkpoint::{Checkpoint, MemStore};
use keelos::update::driver::{self, MemInputs, Request};
use keelos::update::{zframes, FullImage};
use node::{check_disk, sha, slot_image, Node, Spec};
use server::Server;
use std::collections::HashMap;
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
fn each_seed(name: &str, default: u64, scenario: impl Fn(u64) -> Result<(), String>) {
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

/// A small deterministic generator for scenario choices (turmoil has its own, seeded too).
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

fn noise(seed: u8, len: usize) -> Vec<u8> {
    let mut r = Rng(u64::from(seed) << 32);
    (0..len).map(|_| r.next() as u8).collect()
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

fn spec(zst: bool, delta: bool) -> Spec {
    Spec {
        full_url: if zst {
            "http://server/v2.img.zst".into()
        } else {
            "http://server/v2.img".into()
        },
        delta_url: delta.then(|| "http://server/v2.delta".into()),
        sha256: sha(&images().v2),
        version: "v2".into(),
    }
}

fn sim(seed: u64, fail_rate: f64) -> turmoil::Sim<'static> {
    turmoil::Builder::new()
        .rng_seed(seed)
        .fail_rate(fail_rate)
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
    n.dev.watch.borrow_mut().allowed.insert(sha(&im.v1));
    n
}

/// Watches a node's board while an install runs: progress is monotonic within a phase, and the
/// install ends. Returns the final view.
async fn watch_progress(board: Board<InstallView>) -> Result<InstallView, String> {
    let mut seen = 0;
    let mut last: Option<(i32, u64)> = None;
    loop {
        let snap = board.changed(seen).await;
        seen = snap.seq;
        let p = &snap.state.progress;
        if let Some((phase, done)) = last {
            if phase == p.phase && p.bytes_done < done {
                return Err(format!(
                    "progress went back in phase {phase}: {done} then {}",
                    p.bytes_done
                ));
            }
        }
        last = Some((p.phase, p.bytes_done));
        if !snap.running {
            return Ok(snap.state);
        }
    }
}

/// Everything a node's disk says after the run, checked against what its board said.
fn check_outcome(n: &Node, view: &InstallView, expect_ok: Option<bool>) -> Result<(), String> {
    let res = view
        .result
        .clone()
        .ok_or("the install ended without a result")?;
    if let Some(e) = expect_ok {
        if res.ok != e {
            return Err(format!(
                "{}: install ok={} (expected {e}): {}",
                n.name, res.ok, res.error
            ));
        }
    }
    let disk = n.dev.disk.borrow();
    let v = check_disk(&disk, &n.dev.watch.borrow());
    if !v.is_empty() {
        return Err(v.join("; "));
    }
    let durable = CrashDevice::from_bytes(disk.durable(), 512);
    let (layout, flags) = store::load(&durable).map_err(|e| e.to_string())?;
    let im = images();
    let preferred = flags.preferred().ok_or("no slot is preferred")?;
    let (digest, _) = slot_image(&durable, &layout, preferred)?;
    if res.ok {
        let staged = if res.staged_slot == "A" {
            Slot::A
        } else {
            Slot::B
        };
        if preferred != staged || digest != sha(&im.v2) || res.sha256 != digest {
            return Err(format!(
                "{}: Status says {} staged in {staged:?}, the disk prefers {preferred:?} holding {digest}",
                n.name, res.sha256
            ));
        }
    } else if digest != sha(&im.v1) || preferred != Slot::A {
        return Err(format!(
            "{}: the install failed but the disk prefers {preferred:?} holding {digest}",
            n.name
        ));
    }
    Ok(())
}

/// bytes_saved: the full download's size minus the patch's for a delta install, 0 otherwise.
/// The agent learns the full size from a probe request; when every try of that probe was lost
/// (the server never answered it), the agent reports 0, as documented (advisory).
fn check_bytes_saved(
    res: &proto::InstallResult,
    s: &Spec,
    server: &Server,
    peer: &str,
) -> Result<(), String> {
    let full_path = s.full_url.trim_start_matches("http://server");
    let full_len = server.files[full_path].len() as u64;
    let patch_len = server.files["/v2.delta"].len() as u64;
    let want = if s.delta_url.is_some() && !res.fallback_used {
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
    Err(format!(
        "bytes_saved is {} but the full download is {full_len} bytes and the patch {patch_len} (fallback {}, size probe answered {probed})",
        res.bytes_saved, res.fallback_used
    ))
}

/// One node, one install, under `fault` and a network configured by `net`; returns the result.
fn one_install(
    seed: u64,
    fault: Fault,
    zst: bool,
    delta: bool,
    fail_rate: f64,
    net: impl Fn(&mut turmoil::Sim<'static>),
) -> Result<(proto::InstallResult, Node, Arc<Server>), String> {
    let mut sim = sim(seed, fail_rate);
    let server = Arc::new(Server::new(files(fault), fault == Fault::Every2nd500));
    let s2 = server.clone();
    sim.host("server", move || server::serve(s2.clone()));
    let node = new_node("node");
    let n2 = node.clone();
    let s = spec(zst, delta);
    let out: Rc<std::cell::RefCell<Option<Result<InstallView, String>>>> = Rc::default();
    let o2 = out.clone();
    sim.client("node", async move {
        let mut n = n2;
        // When the network beats fetch's retry budget the install fails asking to be re-run
        // ("re-run the install to resume"); the operator does so, up to 3 times.
        for attempt in 1..=3 {
            let running = n.boot()?;
            let w = tokio::task::spawn_local(watch_progress(n.board.clone()));
            n.install(running, &s, &format!("op-{attempt}")).await?;
            let r = w.await.map_err(|e| e.to_string())?;
            let again = r.as_ref().is_ok_and(|v| {
                v.result
                    .as_ref()
                    .is_some_and(|x| !x.ok && x.error.contains("re-run the install"))
            });
            *o2.borrow_mut() = Some(r);
            if !again {
                break;
            }
        }
        Ok(())
    });
    net(&mut sim);
    let peer = sim.lookup("node").to_string();
    sim.run().map_err(|e| e.to_string())?;
    let view = out.borrow_mut().take().ok_or("the node never finished")??;
    let v = node.dev.watch.borrow().violations.clone();
    if !v.is_empty() {
        return Err(v.join("; "));
    }
    check_outcome(&node, &view, None)?;
    let res = view.result.clone().ok_or("no result")?;
    if res.ok {
        check_bytes_saved(&res, &spec(zst, delta), &server, &peer)?;
    }
    Ok((res, node, server))
}

/// Links break (per tick) and heal; latency and reordering come from the builder.
fn flaky_rate(seed: u64) -> f64 {
    [0.005, 0.01, 0.02][(Rng(seed).next() % 3) as usize]
}

#[test]
fn flaky_links_resume() {
    let resumed = std::cell::Cell::new(0u64);
    each_seed("flaky_links_resume", DEFAULT_SEEDS, |seed| {
        let zst = seed % 3 == 1;
        let delta = seed % 3 == 2;
        let (res, _, server) =
            one_install(seed, Fault::None, zst, delta, flaky_rate(seed), |_| {})?;
        if std::env::var("KEEL_SIM_DEBUG").is_ok() {
            eprintln!("{seed}: {:?}", server.seen());
        }
        if !res.ok {
            return Err(format!("the install failed: {}", res.error));
        }
        // A sound delta falls back only when the network beat the retry budget on the patch's
        // download (turmoil heals a broken link per message sent, so a run of failed connects
        // can outlast 8 attempts); never because of its content.
        if res.fallback_used && !res.fallback_reason.contains("patch could not be fetched") {
            return Err(format!("a sound delta fell back: {}", res.fallback_reason));
        }
        if server.seen().iter().any(|s| s.from > 1) {
            resumed.set(resumed.get() + 1);
        }
        Ok(())
    });
    // The scenario must exercise resumes, not only clean downloads.
    assert!(
        resumed.get() > 0 || seeds(DEFAULT_SEEDS).len() < 10,
        "no seed resumed a download: the links never broke mid-body"
    );
    eprintln!(
        "flaky_links_resume: {} seeds resumed with Range",
        resumed.get()
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
        let zst = (seed / 4) % 2 == 1;
        let (res, _, _) = one_install(seed, fault, zst, true, 0.0, |_| {})?;
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
        let zst = seed % 2 == 1;
        let (res, node, _) = one_install(seed, Fault::WrongImage, zst, false, 0.0, |_| {})?;
        if res.ok {
            return Err("an image with the wrong digest was staged".into());
        }
        // check_outcome (in one_install) saw the disk preferring A with v1 and no other
        // bootable slot; the target's flags are not bootable either.
        let disk = node.dev.disk.borrow();
        let durable = CrashDevice::from_bytes(disk.durable(), 512);
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
        let mut rng = Rng(seed);
        let zst = seed % 2 == 1;
        let mut sim = sim(seed, 0.0);
        let server = Arc::new(Server::new(files(Fault::None), false));
        let s2 = server.clone();
        sim.host("server", move || server::serve(s2.clone()));
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
        let node = new_node("node");
        let n2 = node.clone();
        type Views = Vec<Result<InstallView, String>>;
        let out: Rc<std::cell::RefCell<Views>> = Rc::default();
        let o2 = out.clone();
        sim.client("node", async move {
            let mut n = n2;
            for attempt in ["op-1", "op-2"] {
                let running = n.boot()?;
                let w = tokio::task::spawn_local(watch_progress(n.board.clone()));
                n.install(running, &spec(zst, false), attempt).await?;
                let r = w.await.map_err(|e| e.to_string())?;
                o2.borrow_mut().push(r);
                // The operator comes back after the partition healed.
                tokio::time::sleep(Duration::from_secs(70)).await;
            }
            Ok(())
        });
        sim.run().map_err(|e| e.to_string())?;
        let v = node.dev.watch.borrow().violations.clone();
        if !v.is_empty() {
            return Err(v.join("; "));
        }
        let views = out.borrow_mut().drain(..).collect::<Result<Vec<_>, _>>()?;
        let [first, second] = &views[..] else {
            return Err(format!("{} installs ended, not 2", views.len()));
        };
        let r1 = first.result.clone().ok_or("no result")?;
        if r1.ok {
            return Err(format!(
                "the install survived a 60 s partition from {cut_at:?} on"
            ));
        }
        check_outcome(&node, second, Some(true))?;
        Ok(())
    });
}

/// One node of a fleet run: what it installs and when its host crashes.
#[derive(Debug, Clone)]
struct NodeCfg {
    zst: bool,
    delta: bool,
    crashes: Vec<Duration>,
    fail_rate: f64,
}

/// Nodes as turmoil hosts that crash (the disk's crash model applies) and come back: each
/// incarnation runs the boot choice (checked to pick a verified slot) and (re-)issues the
/// install, as the operator would after losing the node. Checks every node's end state;
/// returns how many re-issued installs resumed from a checkpoint.
fn fleet(seed: u64, fault: Fault, cfgs: &[NodeCfg]) -> Result<u64, String> {
    let mut sim = sim(seed, 0.0);
    let server = Arc::new(Server::new(files(fault), fault == Fault::Every2nd500));
    let s2 = server.clone();
    sim.host("server", move || server::serve(s2.clone()));
    type Out = Rc<std::cell::RefCell<Option<Result<InstallView, String>>>>;
    let mut nodes: Vec<(Node, Out, String)> = Vec::new();
    for (i, cfg) in cfgs.iter().enumerate() {
        let name = format!("node{i}");
        let node = new_node(&name);
        let out: Out = Rc::default();
        let (n2, o2, c2) = (node.clone(), out.clone(), cfg.clone());
        sim.host(name.as_str(), move || {
            let (mut n, o, c) = (n2.clone(), o2.clone(), c2.clone());
            async move {
                // A new agent: a new board (the old process's state is gone).
                n.board = Board::new();
                let running = match n.boot() {
                    Ok(r) => r,
                    Err(e) => {
                        *o.borrow_mut() = Some(Err(e));
                        return Ok(());
                    }
                };
                let w = tokio::task::spawn_local(watch_progress(n.board.clone()));
                n.install(running, &spec(c.zst, c.delta), "op").await?;
                let r = w.await.map_err(|e| e.to_string())?;
                *o.borrow_mut() = Some(r);
                Ok(())
            }
        });
        nodes.push((node, out, name));
    }
    for (i, cfg) in cfgs.iter().enumerate() {
        if cfg.fail_rate > 0.0 {
            sim.set_link_fail_rate(format!("node{i}").as_str(), "server", cfg.fail_rate);
        }
    }
    let mut pending: Vec<(Duration, usize)> = cfgs
        .iter()
        .enumerate()
        .flat_map(|(i, c)| c.crashes.iter().map(move |&t| (t, i)))
        .collect();
    pending.sort();
    let mut crash_no = 0u64;
    let mut resumes: Vec<(usize, String, u64, usize)> = Vec::new();
    loop {
        sim.step().map_err(|e| e.to_string())?;
        while let Some(&(t, i)) = pending.first() {
            if sim.elapsed() < t {
                break;
            }
            pending.remove(0);
            let (node, out, name) = &nodes[i];
            if out.borrow().is_some() {
                continue; // finished before its crash time
            }
            sim.crash(name.as_str());
            crash_no += 1;
            {
                let mut d = node.dev.disk.borrow_mut();
                let choice = d.seeded_choice(seed.wrapping_mul(31).wrapping_add(crash_no));
                d.crash(&choice);
                let v = check_disk(&d, &node.dev.watch.borrow());
                if !v.is_empty() {
                    return Err(format!("{name} after a crash: {}", v.join("; ")));
                }
            }
            // The checkpoint the re-issued install must resume from.
            let before = server.seen().len();
            if let Some(cp) = node
                .store
                .borrow()
                .value
                .as_deref()
                .and_then(Checkpoint::from_bytes)
            {
                if cp.image_offset > 0 {
                    let url = spec(cfgs[i].zst, cfgs[i].delta).full_url;
                    let path = url.trim_start_matches("http://server").to_string();
                    resumes.push((i, path, cp.input_offset, before));
                }
            }
            sim.bounce(name.as_str());
        }
        let done = nodes.iter().all(|(_, o, _)| o.borrow().is_some());
        if done && pending.is_empty() {
            break;
        }
        if sim.elapsed() > Duration::from_secs(1800) {
            return Err("the fleet did not finish within 30 simulated minutes".into());
        }
    }
    for (i, (node, out, name)) in nodes.iter().enumerate() {
        let v = node.dev.watch.borrow().violations.clone();
        if !v.is_empty() {
            return Err(format!("{name}: {}", v.join("; ")));
        }
        let view = out.borrow_mut().take().ok_or("no result")??;
        check_outcome(node, &view, None)?;
        let res = view.result.clone().ok_or("no result")?;
        if std::env::var("KEEL_SIM_DEBUG").is_ok() {
            eprintln!("{name}: {res:?}");
        }
        if res.ok {
            let peer = sim.lookup(name.as_str()).to_string();
            check_bytes_saved(&res, &spec(cfgs[i].zst, cfgs[i].delta), &server, &peer)
                .map_err(|e| format!("{name}: {e}"))?;
        }
    }
    if std::env::var("KEEL_SIM_DEBUG").is_ok() {
        eprintln!("{seed}: {:?}", server.seen());
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
    Ok(resumed)
}

#[test]
fn crash_and_resume() {
    let resumed = std::cell::Cell::new(0u64);
    each_seed("crash_and_resume", DEFAULT_SEEDS, |seed| {
        let mut rng = Rng(seed);
        let crashes = (0..1 + rng.below(2))
            .map(|_| Duration::from_millis(5 + rng.below(400)))
            .collect();
        let cfg = NodeCfg {
            zst: seed % 2 == 1,
            delta: false,
            crashes,
            fail_rate: 0.0,
        };
        resumed.set(resumed.get() + fleet(seed, Fault::None, &[cfg])?);
        Ok(())
    });
    let n = resumed.get();
    eprintln!("crash_and_resume: {n} re-issued installs resumed from a checkpoint");
    assert!(
        n > 0 || seeds(DEFAULT_SEEDS).len() < 10,
        "no crash landed after a checkpoint: the scenario never exercised a resume"
    );
}

#[test]
fn fleet_with_random_faults() {
    each_seed("fleet_with_random_faults", DEFAULT_SEEDS / 3, |seed| {
        let mut rng = Rng(seed);
        let fault = [Fault::None, Fault::CorruptDelta, Fault::Every2nd500][rng.below(3) as usize];
        let cfgs: Vec<NodeCfg> = (0..5)
            .map(|_| NodeCfg {
                zst: rng.below(2) == 1,
                delta: rng.below(2) == 1,
                crashes: if rng.below(3) == 0 {
                    vec![Duration::from_millis(5 + rng.below(400))]
                } else {
                    vec![]
                },
                fail_rate: [0.0, 0.005, 0.01][rng.below(3) as usize],
            })
            .collect();
        if std::env::var("KEEL_SIM_DEBUG").is_ok() {
            eprintln!("{seed}: {fault:?} {cfgs:?}");
        }
        fleet(seed, fault, &cfgs).map(|_| ())
    });
}

/// Operators, modelled on the agent's update board (the gRPC layer is not on turmoil): the
/// first operator's stream is dropped mid-install, a second operator asks for an install while
/// it runs and is told which one runs; the install finishes; a new operator sees it.
#[test]
fn operators_disconnect_and_race() {
    let raced = std::cell::Cell::new(0u64);
    each_seed("operators_disconnect_and_race", DEFAULT_SEEDS, |seed| {
        let mut rng = Rng(seed);
        let zst = seed % 2 == 1;
        let mut sim = sim(seed, flaky_rate(seed));
        let server = Arc::new(Server::new(files(Fault::None), false));
        let s2 = server.clone();
        sim.host("server", move || server::serve(s2.clone()));
        let node = new_node("node");
        let n2 = node.clone();
        let drop_after = Duration::from_millis(1 + rng.below(150));
        let second_after = Duration::from_millis(1 + rng.below(150));
        type Out = Rc<std::cell::RefCell<Option<Result<(String, InstallView), String>>>>;
        let out: Out = Rc::default();
        let o2 = out.clone();
        sim.client("node", async move {
            let mut n = n2;
            let running = n.boot()?;
            let n1 = n.clone();
            let install = tokio::task::spawn_local(async move {
                n1.install(running, &spec(zst, false), "op-1").await
            });
            // Operator 1 watches, then disconnects mid-stream.
            let watcher = tokio::task::spawn_local(watch_progress(n.board.clone()));
            let b2 = n.board.clone();
            let racer = tokio::task::spawn_local(async move {
                tokio::time::sleep(second_after).await;
                // Operator 2 while op-1 may still run.
                // (Once op-1 ended, a new install would be accepted: not asked then, so the
                // board keeps op-1's result for the check below.)
                let running_now = b2.is_running();
                let r = if running_now { n2_try(&b2) } else { Ok(()) };
                (running_now, r)
            });
            tokio::time::sleep(drop_after).await;
            watcher.abort();
            install.await.map_err(|e| e.to_string())??;
            let (was_running, r) = racer.await.map_err(|e| e.to_string())?;
            let told = match (was_running, r) {
                (true, Err(running)) => running,
                (true, Ok(())) => return Err("a second install started while one ran".into()),
                (false, _) => String::new(),
            };
            // A new operator: the finished install is there to see.
            let snap = n.board.current().ok_or("the board forgot the install")?;
            *o2.borrow_mut() = Some(Ok((told, snap.state)));
            Ok(())
        });
        sim.run().map_err(|e| e.to_string())?;
        let (told, view) = out.borrow_mut().take().ok_or("the node never finished")??;
        if !told.is_empty() && told != "op-1" {
            return Err(format!("the second operator was told {told:?}, not op-1"));
        }
        if !told.is_empty() {
            raced.set(raced.get() + 1);
        }
        check_outcome(&node, &view, None)?;
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

/// The second operator's request on the board: refused with the running install's id.
fn n2_try(board: &Board<InstallView>) -> Result<(), String> {
    board
        .try_begin("op-2".into(), InstallView::default())
        .map(drop)
        .map_err(|b| b.running)
}
