//! Shared set-up for the crash-injection suites.

use keelos::block::{BlockDevice, CrashDevice, SplitMix};
use keelos::disk::{self, LayoutSpec, MIB};
use proptest::prelude::*;
use proptest::test_runner::{RngAlgorithm, TestError, TestRng, TestRunner};

/// The smallest KeelOS disk: 1 MiB partitions, so that cloning it for every crash state is cheap.
pub fn small_spec() -> LayoutSpec {
    LayoutSpec {
        esp_size: MIB,
        root_size: MIB,
        state_size: Some(MIB),
    }
}

pub fn disk_len() -> u64 {
    6 * MIB + 64 * 1024
}

/// A fresh KeelOS disk on a crash-model device, with every partition filled with a recognisable
/// pattern so that a stray write inside one is caught.
pub fn fresh_disk(sector_size: u64) -> CrashDevice {
    let mut dev = CrashDevice::new(disk_len(), sector_size);
    disk::create(&mut dev, small_spec()).expect("create");
    let layout = disk::open(&dev).expect("open");
    for (i, p) in [&layout.esp, &layout.root_a, &layout.root_b, &layout.state]
        .into_iter()
        .enumerate()
    {
        let fill: Vec<u8> = (0..p.len)
            .map(|x| (x as u8) ^ (0x11 * (i as u8 + 1)))
            .collect();
        dev.write_at(p.offset, &fill).expect("fill");
    }
    dev.flush().expect("flush");
    dev.clear_write_log();
    dev
}

/// Panic with `ctx` if anything was written inside a partition since the write log was
/// cleared.
pub fn assert_no_write_inside_partitions(dev: &CrashDevice, layout: &disk::Layout, ctx: &str) {
    for (s, e) in dev.written_ranges() {
        for p in [&layout.esp, &layout.root_a, &layout.root_b, &layout.state] {
            assert!(
                e <= p.offset || s >= p.offset + p.len,
                "write {s}..{e} lands inside {}; {ctx}",
                p.label
            );
        }
    }
}

/// The seed of a randomized test: `KEEL_PROPTEST_SEED` when set, else a fresh one.
fn proptest_seed() -> u64 {
    match std::env::var("KEEL_PROPTEST_SEED") {
        Ok(s) => s
            .trim()
            .parse()
            .unwrap_or_else(|e| panic!("KEEL_PROPTEST_SEED={s:?} is not a u64: {e}")),
        Err(_) => {
            let t = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64);
            SplitMix(t ^ u64::from(std::process::id()).rotate_left(32)).next_u64()
        }
    }
}

/// Run a property test of `cases` cases drawn from `strategy` with a seeded generator, printing
/// the seed first, so that `KEEL_PROPTEST_SEED=<seed> cargo test --test proptests <name>`
/// replays the run. A failure is shrunk and panics with the smallest failing input, which the
/// test's own function replays directly.
pub fn run_seeded<S>(name: &str, cases: u32, strategy: S, test: impl Fn(S::Value))
where
    S: Strategy,
    S::Value: std::fmt::Debug,
{
    let seed = proptest_seed();
    eprintln!("{name}: seed {seed}; replay with KEEL_PROPTEST_SEED={seed} cargo test --test proptests {name}");
    let mut key = [0u8; 32];
    let mut g = SplitMix(seed);
    for c in key.chunks_mut(8) {
        c.copy_from_slice(&g.next_u64().to_le_bytes());
    }
    let config = ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    };
    let mut runner =
        TestRunner::new_with_rng(config, TestRng::from_seed(RngAlgorithm::ChaCha, &key));
    match runner.run(&strategy, |v| {
        test(v);
        Ok(())
    }) {
        Ok(()) => {}
        Err(TestError::Fail(why, value)) => panic!(
            "{name} failed: {why}\nsmallest failing input: {value:?}\nseed {seed}: replay with \
             KEEL_PROPTEST_SEED={seed} cargo test --test proptests {name}"
        ),
        Err(e) => panic!("{name}: {e}; seed {seed}"),
    }
}
