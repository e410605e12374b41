//! Model check of the whole node protocol: boots, installs, power cuts, agent restarts and
//! operators, over the real pure core, with an explicit-state model checker.
//!
//! What is modelled ([`model`]): one node whose state is small and hashable. The two slots'
//! flags are the real `bootctl::BootFlags`, changed only by the real `choose_boot`,
//! `start_update`/`activate` (through the engine's `FlagChange::apply`), `mark_successful`,
//! `mark_failed` and `rollback`. Each slot holds, in the abstract, two chunks and a record
//! (a released version, garbage, or nothing); the disk keeps a list of unflushed writes, and a
//! power cut keeps each of them, loses it or tears it (the crash model of DESIGN.md). STATE
//! holds the install checkpoint (replaced atomically). The node is off, bricked, or up on a
//! booted slot (the root mounted from it, on trial or not, healthy or sick) with an agent whose
//! running slot comes from `agent::running::establish` over the boot's evidence, and maybe an
//! install in flight.
//!
//! Actions: boot (the real `choose_boot`; outcomes healthy, hang → watchdog, agent up but never
//! healthy → deadline reboot, kernel panic → watchdog, root does not mount → `mark_failed`),
//! keel-init marking the slot successful (a second flag writer, interleaved with every install
//! step), each step of an install, power cut with any fate of the unflushed writes, agent
//! restart (kills the install in flight), operator install of any version (re-issue, another
//! install, the server serving bad bytes), operator rollback and reboot, with the agent's
//! admission rules (running slot known, not on trial, one install at a time; reboot and
//! rollback refused while an install runs).
//!
//! Fidelity to the engine ([`script`]): an install is the engine's sequence of actions in the
//! abstract (invalidate, clear record, [flush], per chunk fetch/write/flush/checkpoint, the
//! end of input where the digest is checked, flush, read back, record, flush, activate, clear
//! checkpoint), fixed when it starts by how `Install::new` treats the saved checkpoint (fresh,
//! resume at chunk k, discard) and by whether the bytes it hashes match. The test
//! `install_steps_match_the_real_engine` drives the real sans-IO `Install` over an in-memory
//! disk for every such start and compares the action kinds one by one; whether the engine
//! flushes right after clearing the record is learned from the real engine when the model is
//! built, so the model follows the engine as it changes.
//!
//! Properties, over the whole reachable state space within the bounds: some slot is always
//! bootable and holds a whole released image matching its record; no write ever goes to the
//! slot the root is mounted from; the last known-good slot is never invalidated while the other
//! is unproven; a slot chosen to boot never holds a partial write; an install's read-back sees
//! what it wrote. Liveness under fairness ([`liveness`]): a good update ends up running and
//! marked successful; a bad one ends with the previous version running again.
//!
//! Why stateright: a Rust explicit-state checker that takes a `Model` (init states, actions,
//! a pure `next_state`) and checks `always` properties with BFS, giving the shortest path to a
//! violation — the model calls the crate's own functions directly, with no translation into a
//! modelling language (TLA+, Promela) that could drift from the code. Its `eventually` checks
//! only terminal states and does not see cycles, so liveness is checked by [`liveness`] over
//! the same `Model`.
//!
//! Bounds. The safety check runs over the whole reachable space with no bound at all on power
//! cuts, hangs, agent restarts, reboots or operator commands (counters are kept only for a
//! bounded budget, so the space stays finite); its size is set by the released versions.
//! Environment, all optional: `KEEL_MC_VERSIONS` (released versions, default 3; the newest is
//! the bad release), `KEEL_MC_CRASHES`, `KEEL_MC_RESTARTS`, `KEEL_MC_REBOOTS`, `KEEL_MC_OPS`
//! (budgets for the safety run: a number, or `inf`, the default), `KEEL_MC_DEPTH` (BFS depth
//! bound, default 0 = none). Liveness needs faults to stop, so its runs are bounded:
//! `KEEL_MC_LIVE_CRASHES` (default 2), `KEEL_MC_LIVE_RESTARTS` (1), `KEEL_MC_LIVE_OPS`
//! (adversarial operator commands: rollbacks, other versions, a bad server; default 2).
//! The soak (under half a minute at the test profile here; about 2.5 M unique states):
//! `KEEL_MC_VERSIONS=6 KEEL_MC_LIVE_CRASHES=5 KEEL_MC_LIVE_RESTARTS=3 KEEL_MC_LIVE_OPS=4 cargo
//! test --release --test modelcheck -- --nocapture`.
//!
//! The model's image is two chunks, one per checkpoint interval; a production interval is
//! several writes, but any mix of them kept, lost and torn is garbage for that chunk, which is
//! what a torn chunk write is here.
#![allow(clippy::unwrap_used, clippy::panic)]

mod liveness;
mod model;
mod script;
mod trace;

use model::{Config, Goal, Mutation, NodeModel, TrialRule};
use stateright::{Checker, Model};
use std::time::Instant;

/// A bound from the environment: a number, or `inf` for none.
fn env(name: &str, default: u8) -> u8 {
    match std::env::var(name) {
        Ok(v) if v == "inf" => model::UNBOUNDED,
        Ok(v) => v
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v:?}: expected a number below 255 or inf")),
        Err(_) => default,
    }
}

fn depth() -> usize {
    std::env::var("KEEL_MC_DEPTH")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// The safety configuration of the test command (bounds from the environment).
fn safety_config() -> Config {
    Config {
        versions: env("KEEL_MC_VERSIONS", 3),
        bad: Some(env("KEEL_MC_VERSIONS", 3)),
        crashes: env("KEEL_MC_CRASHES", model::UNBOUNDED),
        restarts: env("KEEL_MC_RESTARTS", model::UNBOUNDED),
        reboots: env("KEEL_MC_REBOOTS", model::UNBOUNDED),
        ops: env("KEEL_MC_OPS", model::UNBOUNDED),
        bad_server: true,
        mutation: Mutation::None,
        trial_rule: TrialRule::Policy,
        mounted_guard: true,
        goal: None,
    }
}

/// The outcome of one check.
struct Checked {
    unique: usize,
    /// Property name → the violating path in words.
    found: Vec<(&'static str, String)>,
}

fn check(cfg: Config) -> Checked {
    let model = NodeModel::new(cfg);
    let names: Vec<&'static str> = model.properties().iter().map(|p| p.name).collect();
    let words_model = model.clone();
    let start = Instant::now();
    let mut builder = model.clone().checker().threads(1);
    if depth() > 0 {
        builder = builder.target_max_depth(depth());
    }
    let checker = builder.spawn_bfs().join();
    println!(
        "modelcheck: states={} unique={} max_depth={} time={:.1}s flush_after_clear={} {}",
        checker.state_count(),
        checker.unique_state_count(),
        checker.max_depth(),
        start.elapsed().as_secs_f64(),
        model.shape.flush_after_clear,
        model.cfg.describe()
    );
    let mut found = Vec::new();
    for name in names {
        if checker.discovery(name).is_some() {
            // stateright's path need not be a shortest one (its job market reorders the
            // queue); a sequential breadth-first search gives the shortest
            let path = liveness::shortest_violation(&words_model, name)
                .expect("the violation stateright found is reachable");
            let w = trace::words(&words_model, &path);
            println!(
                "modelcheck: VIOLATED \"{name}\" in {} steps: {w}",
                path.len() - 1
            );
            found.push((name, w));
        }
    }
    Checked {
        unique: checker.unique_state_count(),
        found,
    }
}

#[test]
fn install_steps_match_the_real_engine() {
    let shape = script::Shape {
        flush_after_clear: script::engine_flushes_after_record_clear(),
    };
    for key in script::all_keys() {
        let model = script::steps(key, shape);
        let engine = script::engine_steps(key);
        assert_eq!(
            model, engine,
            "{key:?}: the model's install steps (left) differ from the engine's (right)"
        );
    }
}

#[test]
fn the_protocol_holds() {
    let cfg = safety_config();
    let c = check(cfg.clone());
    assert!(c.found.is_empty(), "violations: {:?}", c.found);
    if depth() == 0 {
        // a second, sequential search over the same model reaches the same states
        let (g, _) = liveness::explore(&NodeModel::new(cfg), &|_| false);
        assert_eq!(g.states.len(), c.unique, "states seen by the two searches");
    }
}

fn liveness_config(goal: Goal) -> Config {
    Config {
        versions: 2,
        bad: match goal {
            Goal::BadRollsBack { bad } => Some(bad),
            Goal::GoodUpdate(_) => None,
        },
        crashes: env("KEEL_MC_LIVE_CRASHES", 2),
        restarts: env("KEEL_MC_LIVE_RESTARTS", 1),
        reboots: 0,
        ops: env("KEEL_MC_LIVE_OPS", 2),
        bad_server: true,
        mutation: Mutation::None,
        trial_rule: TrialRule::Policy,
        mounted_guard: true,
        goal: Some(goal),
    }
}

#[test]
fn a_good_update_ends_up_running_and_successful() {
    let r = liveness::check(&NodeModel::new(liveness_config(Goal::GoodUpdate(2))));
    assert!(r.is_ok(), "{}", r.unwrap_err());
}

#[test]
fn a_bad_update_rolls_back_to_the_previous_version() {
    let r = liveness::check(&NodeModel::new(liveness_config(Goal::BadRollsBack {
        bad: 2,
    })));
    assert!(r.is_ok(), "{}", r.unwrap_err());
}

/// A configuration small enough that a mutation's counterexample is found in seconds.
fn mutant(mutation: Mutation, trial_rule: TrialRule, mounted_guard: bool) -> Config {
    Config {
        versions: 3,
        bad: Some(3),
        crashes: 1,
        restarts: 1,
        reboots: 2,
        ops: 2,
        bad_server: false,
        mutation,
        trial_rule,
        mounted_guard,
        goal: None,
    }
}

fn expect_found(c: &Checked, property: &str) {
    assert!(
        c.found.iter().any(|(n, _)| *n == property),
        "expected a counterexample to \"{property}\", found {:?}",
        c.found
    );
}

#[test]
fn mutation_agent_believes_preferred_is_caught() {
    // the mounted-root guard in install_on stops the write this bug aims at the running root
    let guarded = check(mutant(
        Mutation::AgentBelievesPreferred,
        TrialRule::Policy,
        true,
    ));
    assert!(guarded.found.is_empty(), "{:?}", guarded.found);
    // without that last guard the bug alone writes the mounted root
    let c = check(mutant(
        Mutation::AgentBelievesPreferred,
        TrialRule::Policy,
        false,
    ));
    expect_found(&c, model::NO_WRITE_TO_MOUNTED);
    // the agent before either fix: the restart alone sends the next install to the mounted root
    let both = check(mutant(Mutation::Both, TrialRule::Policy, false));
    expect_found(&both, model::NO_WRITE_TO_MOUNTED);
    // and with the agent establishing the running slot, the guard is not needed
    let fixed = check(mutant(Mutation::None, TrialRule::Policy, false));
    assert!(fixed.found.is_empty(), "{:?}", fixed.found);
}

#[test]
fn mutation_install_during_trial_is_caught() {
    let c = check(mutant(
        Mutation::InstallDuringTrial,
        TrialRule::Policy,
        true,
    ));
    expect_found(&c, model::LAST_GOOD_KEPT);
    expect_found(&c, model::FALLBACK);
}

/// The agent's former rule refused installs while the running slot's state was `Trying`; on
/// the last try the state is `Failed`, and the install was admitted (found by this check; the
/// agent now asks `bootctl::policy::admit_install`).
#[test]
fn the_former_trial_rule_misses_the_last_try() {
    let c = check(mutant(Mutation::None, TrialRule::StateIsTrying, true));
    expect_found(&c, model::LAST_GOOD_KEPT);
}

/// The model is not vacuous: the unbounded space holds the behaviours the properties are
/// about (a property that holds because nothing happens would prove nothing).
#[test]
fn the_model_reaches_what_it_should() {
    use model::{Chunk, Node, Power, Rec};
    use script::{Start, Step};
    let m = NodeModel::new(safety_config());
    let run_at = |n: &Node, want: &dyn Fn(script::ScriptKey, Step) -> bool| {
        n.up()
            .and_then(|u| u.agent.install)
            .is_some_and(|r| want(r.key, m.steps(r.key)[r.pc as usize]))
    };
    type Case<'a> = (&'a str, Box<dyn Fn(&Node) -> bool + 'a>);
    let cases: Vec<Case> = vec![
        (
            "an install resumes from chunk 2",
            Box::new(|n| run_at(n, &|k, _| k.start == Start::Resume(1))),
        ),
        (
            "an install resumes after its last chunk",
            Box::new(|n| run_at(n, &|k, _| k.start == Start::Resume(2))),
        ),
        (
            "an install discards another install's checkpoint",
            Box::new(|n| run_at(n, &|k, _| k.start == Start::Discard)),
        ),
        (
            "an install fails on its digest",
            Box::new(|n| run_at(n, &|k, s| !k.digest_ok && s == Step::Failed)),
        ),
        (
            "a power cut leaves a torn chunk and no record on disk",
            Box::new(|n| {
                n.power == Power::Off
                    && n.disk.iter().any(|d| {
                        d.record == Rec::None
                            && d.chunks.contains(&Chunk::Garbage)
                            && d.chunks.iter().any(|c| *c != Chunk::Garbage)
                    })
            }),
        ),
        (
            "an agent restart leaves an install's write unflushed",
            Box::new(|n| {
                !n.pending.is_empty() && n.up().is_some_and(|u| u.agent.install.is_none())
            }),
        ),
        (
            "v2 runs from b, successful",
            Box::new(|n| {
                n.up().is_some_and(|u| {
                    u.version == 2 && u.slot == keelos::bootctl::Slot::B && !u.trial
                }) && n.flags[1].successful()
            }),
        ),
        (
            "the bad release runs, never healthy",
            Box::new(|n| n.up().is_some_and(|u| u.health == model::Health::Sick)),
        ),
        (
            "after a rollback both slots are successful and the other one is preferred",
            Box::new(|n| {
                n.up().is_some_and(|u| {
                    n.flags[0].successful()
                        && n.flags[1].successful()
                        && n.flags().preferred() == Some(u.slot.other())
                })
            }),
        ),
    ];
    for (what, pred) in cases {
        let (g, hit) = liveness::explore(&m, &|n| pred(n));
        let i = hit.unwrap_or_else(|| panic!("never reached: {what}"));
        println!("modelcheck: reached \"{what}\" at depth {}", g.depth[i]);
    }
}

/// The liveness check can fail: with the agent's former trial rule, the operator's re-issued
/// install on the bad release's last try invalidates the only good slot, and nothing boots.
#[test]
fn liveness_catches_the_last_try_hole() {
    let mut cfg = liveness_config(Goal::BadRollsBack { bad: 2 });
    cfg.trial_rule = TrialRule::StateIsTrying;
    let r = liveness::check(&NodeModel::new(cfg));
    assert!(r.is_err(), "expected a liveness failure");
}
