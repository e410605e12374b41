//! Crash injection over boot-flag changes.
//!
//! Exhaustive: for every flag transition, from every starting state, on 512- and 4096-byte
//! sector disks, with the table clean or one copy damaged: cut the power after each write and
//! flush, and for each cut take every distinct outcome of the unflushed writes (each kept,
//! dropped or torn at sector granularity). The table must read back as entirely the old flags or
//! entirely the new ones, repair must leave both copies equal, and no byte inside a partition
//! may change.
//!
//! Randomized: sequences of updates, good and bad boots, rollbacks and crashes, against a
//! reference model of the slots.

use crate::common::{assert_no_write_inside_partitions, fresh_disk};
use keelos::block::{BlockDevice, CrashDevice};
use keelos::bootctl::{self, store, BootFlags, FlagError, Slot, SlotFlags};
use keelos::disk::{self, table};
use proptest::prelude::*;

fn f(p: u8, t: u8, s: bool) -> BootFlags {
    BootFlags(0)
        .with_priority(p)
        .with_tries(t)
        .with_successful(s)
}

/// Starting flag states worth crashing from.
fn starting_flags() -> Vec<SlotFlags> {
    vec![
        SlotFlags::default(),
        SlotFlags {
            a: f(1, 0, true),
            b: f(0, 0, false),
        },
        SlotFlags {
            a: f(1, 0, true),
            b: f(2, 3, false),
        },
        SlotFlags {
            a: f(1, 0, true),
            b: f(2, 1, false),
        },
        SlotFlags {
            a: f(1, 0, true),
            b: f(2, 0, false),
        },
        SlotFlags {
            a: f(2, 0, true),
            b: f(1, 0, true),
        },
    ]
}

type Transition = (&'static str, fn(SlotFlags) -> Result<SlotFlags, FlagError>);

fn running(fl: SlotFlags) -> Slot {
    fl.preferred().unwrap_or(Slot::A)
}

fn transitions() -> Vec<Transition> {
    vec![
        ("start_update", |fl| {
            let r = running(fl);
            bootctl::start_update(fl, r.other(), Some(r))
        }),
        ("activate", |fl| {
            let r = running(fl);
            bootctl::activate(fl, r.other(), Some(r), 3)
        }),
        ("boot", |fl| bootctl::choose_boot(fl).map(|c| c.flags)),
        ("mark_successful", |fl| {
            bootctl::mark_successful(fl, running(fl))
        }),
        ("mark_failed", |fl| {
            Ok(bootctl::mark_failed(fl, running(fl)))
        }),
        ("rollback", |fl| bootctl::rollback(fl, running(fl))),
    ]
}

#[derive(Clone, Copy, Debug)]
enum Damage {
    None,
    PrimaryHeader,
    BackupArray,
    BackupStale,
}

fn damage(dev: &mut CrashDevice, d: Damage) {
    let ss = dev.sector_size();
    let total = dev.len() / ss;
    let flip = |dev: &mut CrashDevice, at: u64| {
        let mut b = [0u8; 1];
        dev.read_at(at, &mut b).expect("read");
        dev.write_at(at, &[b[0] ^ 0x5A]).expect("write");
    };
    match d {
        Damage::None => {}
        Damage::PrimaryHeader => flip(dev, ss + 20),
        Damage::BackupArray => flip(dev, (total - 1) * ss - 100),
        Damage::BackupStale => {
            // a valid backup with different flags: what a cut between the two copies leaves
            let t = table::read(dev).expect("read");
            let l = disk::Layout::from_table(t.clone()).expect("layout");
            let mut array = t.copy.array.clone();
            let o = disk::gpt::attributes_offset(l.root_b.index, t.copy.header.entry_size);
            array[o + 6] ^= 0x0F; // priority nibble of B
            let mut h = t
                .copy
                .header
                .mirrored(t.copy.header.alternate_lba - 32 * 512 / ss);
            h.entries_crc = disk::gpt::array_crc(&array);
            dev.write_at(h.entries_lba * ss, &array).expect("write");
            dev.write_at(h.my_lba * ss, &h.to_sector(ss as usize))
                .expect("write");
        }
    }
    dev.flush().expect("flush");
}

/// Everything in the table except the root flags, which must never change.
fn table_except_flags(dev: &CrashDevice) -> Vec<u8> {
    let t = table::read(dev).expect("read");
    let l = disk::Layout::from_table(t.clone()).expect("layout");
    let mut array = t.copy.array;
    for p in [&l.root_a, &l.root_b] {
        let o = disk::gpt::attributes_offset(p.index, t.copy.header.entry_size);
        array[o..o + 8].fill(0);
    }
    array
}

#[test]
fn exhaustive_crash_enumeration_of_flag_changes() {
    let mut states = 0u64;
    let mut cases = 0u64;
    for ss in [512u64, 4096] {
        let base = fresh_disk(ss);
        for start in starting_flags() {
            let mut initial = base.clone();
            let l = disk::open(&initial).expect("open");
            store::commit(&mut initial, &l, start).expect("commit start");
            let layout = disk::open(&initial).expect("open");
            let rest = table_except_flags(&initial);
            for d in [
                Damage::None,
                Damage::PrimaryHeader,
                Damage::BackupArray,
                Damage::BackupStale,
            ] {
                let mut before = initial.clone();
                damage(&mut before, d);
                let (_, old) = store::load(&before).expect("load");
                for (name, t) in transitions() {
                    let Ok(new) = t(old) else { continue };
                    // a complete run, to count the crash points
                    let mut full = before.clone();
                    let start_ops = full.mutations();
                    store::update(&mut full, |_| Ok(new)).expect("update");
                    let points = full.mutations() - start_ops;
                    cases += 1;
                    for cut in 0..=points {
                        let mut dev = before.clone();
                        dev.cut_power_after(cut);
                        let _ = store::update(&mut dev, |_| Ok(new));
                        let outcomes = dev.crash_outcomes(1 << 16).unwrap_or_else(|| {
                            panic!("too many outcomes: ss={ss} {name} {d:?} cut={cut}")
                        });
                        for choice in outcomes {
                            states += 1;
                            let mut after = dev.clone();
                            after.crash(&choice);
                            let replay = format!(
                                "replay: ss={ss} start={start:?} damage={d:?} transition={name} \
                                 cut_after={cut} crash={choice}"
                            );
                            let (l, got) = store::load(&after).unwrap_or_else(|e| {
                                panic!("unreadable after crash: {e}; {replay}")
                            });
                            assert!(got == old || got == new, "mixed flags {got:?}; {replay}");
                            let t = table::read(&after).expect("read");
                            table::repair(&mut after, &t).expect("repair");
                            let t = table::read(&after).expect("read");
                            assert_eq!(t.repair, table::Repair::None, "{replay}");
                            assert_eq!(store::load(&after).expect("load").1, got, "{replay}");
                            assert_eq!(l.root_a.offset, layout.root_a.offset, "{replay}");
                            assert_eq!(table_except_flags(&after), rest, "{replay}");
                            assert_no_write_inside_partitions(&after, &layout, &replay);
                        }
                    }
                }
            }
        }
    }
    eprintln!(
        "crash-enumeration: flag changes: {cases} transitions, every crash point and every \
         distinct outcome at each: {states} crash states, 0 sampled"
    );
    assert!(states > 1000, "enumeration covered only {states} states");
}

/// What the model knows of a slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ModelSlot {
    /// Invalidated and not activated since (being written, or never installed).
    Invalid,
    /// Activated, `tries` boots left before it counts as failed.
    Trying {
        prio: u8,
        tries: u8,
    },
    Failed {
        prio: u8,
    },
    /// Marked successful; `unhealthy` boots since it last reached health.
    Good {
        prio: u8,
        unhealthy: u8,
    },
}

impl ModelSlot {
    fn of(fl: BootFlags) -> Self {
        match (fl.successful(), fl.priority(), fl.tries()) {
            (true, p, t) => ModelSlot::Good {
                prio: p,
                unhealthy: t,
            },
            (false, 0, _) => ModelSlot::Invalid,
            (false, p, 0) => ModelSlot::Failed { prio: p },
            (false, p, t) => ModelSlot::Trying { prio: p, tries: t },
        }
    }
    fn rank(self) -> Option<u8> {
        match self {
            ModelSlot::Trying { prio, .. } | ModelSlot::Good { prio, .. } => Some(prio),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum Op {
    Update {
        tries: u8,
    },
    BootOk,
    BootFails,
    Rollback,
    /// The root of the chosen slot does not mount.
    MountFails,
    /// Cut the power during the next flag change after `after` writes/flushes, then crash.
    CrashDuringNext {
        after: u8,
        seed: u64,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (1u8..=4).prop_map(|tries| Op::Update { tries }),
        Just(Op::BootOk),
        Just(Op::BootFails),
        Just(Op::Rollback),
        Just(Op::MountFails),
        (0u8..6, any::<u64>()).prop_map(|(after, seed)| Op::CrashDuringNext { after, seed }),
    ]
}

struct Model {
    slots: [ModelSlot; 2],
    /// Set on invalidation, cleared on activation.
    invalid_since: [bool; 2],
    running: Option<Slot>,
}

impl Model {
    fn idx(s: Slot) -> usize {
        match s {
            Slot::A => 0,
            Slot::B => 1,
        }
    }
    fn choose(&self) -> Option<Slot> {
        match (self.slots[0].rank(), self.slots[1].rank()) {
            (Some(a), Some(b)) => Some(if b > a { Slot::B } else { Slot::A }),
            (Some(_), None) => Some(Slot::A),
            (None, Some(_)) => Some(Slot::B),
            (None, None) => None,
        }
    }
    /// The slot a boot runs: the preferred one, unless it is a successful slot whose last 3
    /// boots missed health and the other slot is bootable and not in the same state.
    fn boot_choice(&self) -> Option<Slot> {
        let p = self.choose()?;
        let stuck = |s: ModelSlot| matches!(s, ModelSlot::Good { unhealthy, .. } if unhealthy >= 3);
        let other = self.slots[Model::idx(p.other())];
        if stuck(self.slots[Model::idx(p)]) && other.rank().is_some() && !stuck(other) {
            Some(p.other())
        } else {
            Some(p)
        }
    }
}

/// Apply one flag change on the disk, possibly with a power cut; returns whether it took effect.
fn apply(
    dev: &mut CrashDevice,
    crash: &mut Option<(u8, u64)>,
    change: impl FnOnce(SlotFlags) -> Result<SlotFlags, FlagError>,
) -> (SlotFlags, SlotFlags) {
    let (_, old) = store::load(dev).expect("load");
    let new = change(old).expect("transition");
    if let Some((after, seed)) = crash.take() {
        dev.cut_power_after(u64::from(after));
        let _ = store::update(dev, |_| Ok(new));
        let choice = dev.seeded_choice(seed);
        dev.crash(&choice);
    } else {
        store::update(dev, |_| Ok(new)).expect("update");
    }
    let (_, got) = store::load(dev).expect("load after");
    assert!(
        got == old || got == new,
        "mixed flags {got:?} (old {old:?}, new {new:?})"
    );
    (old, got)
}

fn run_sequence(ops: &[Op]) {
    let mut dev = fresh_disk(512);
    let mut model = Model {
        slots: [ModelSlot::Invalid, ModelSlot::Invalid],
        invalid_since: [false; 2],
        running: None,
    };
    // the image tool's first install: slot A activated and booted successfully
    store::update(&mut dev, |f| bootctl::activate(f, Slot::A, None, 1)).expect("activate");
    store::update(&mut dev, |f| bootctl::mark_successful(f, Slot::A)).expect("mark");
    model.slots[0] = ModelSlot::Good {
        prio: 2,
        unhealthy: 0,
    };
    model.running = Some(Slot::A);
    let mut crash: Option<(u8, u64)> = None;
    for (step, op) in ops.iter().enumerate() {
        let ctx = format!("step {step} {op:?}");
        match *op {
            Op::CrashDuringNext { after, seed } => crash = Some((after, seed)),
            Op::Update { tries } => {
                let Some(r) = model.running else { continue };
                let t = r.other();
                let (_, got) = apply(&mut dev, &mut crash, |f| {
                    bootctl::start_update(f, t, Some(r))
                });
                model.slots[Model::idx(t)] = ModelSlot::of(got.get(t));
                if got.get(t).state() == bootctl::SlotState::Invalid {
                    model.invalid_since[Model::idx(t)] = true;
                } else {
                    continue; // the invalidation was lost in a crash: the update starts over
                }
                let (_, got) = apply(&mut dev, &mut crash, |f| {
                    bootctl::activate(f, t, Some(r), tries)
                });
                if got.get(t).state() == bootctl::SlotState::Trying {
                    model.invalid_since[Model::idx(t)] = false;
                }
                model.slots = [ModelSlot::of(got.a), ModelSlot::of(got.b)];
            }
            Op::BootOk | Op::BootFails | Op::MountFails => {
                let (_, flags) = store::load(&dev).expect("load");
                let want = model.boot_choice();
                let got = bootctl::choose_boot(flags).ok().map(|c| c.slot);
                assert_eq!(got, want, "boot choice disagrees with the model at {ctx}");
                let Some(s) = got else {
                    model.running = None;
                    continue;
                };
                assert!(
                    !model.invalid_since[Model::idx(s)],
                    "booted slot {s}, invalidated and not activated since, at {ctx}"
                );
                let (_, after) = apply(&mut dev, &mut crash, |f| {
                    bootctl::choose_boot(f).map(|c| c.flags)
                });
                model.slots = [ModelSlot::of(after.a), ModelSlot::of(after.b)];
                model.running = Some(s);
                match *op {
                    Op::BootOk => {
                        let (_, after) =
                            apply(&mut dev, &mut crash, |f| bootctl::mark_successful(f, s));
                        model.slots = [ModelSlot::of(after.a), ModelSlot::of(after.b)];
                    }
                    Op::MountFails => {
                        let (_, after) =
                            apply(&mut dev, &mut crash, |f| Ok(bootctl::mark_failed(f, s)));
                        model.slots = [ModelSlot::of(after.a), ModelSlot::of(after.b)];
                        model.running = None;
                    }
                    _ => {}
                }
            }
            Op::Rollback => {
                let Some(r) = model.running else { continue };
                let (_, flags) = store::load(&dev).expect("load");
                let other_ok = model.slots[Model::idx(r.other())].rank().is_some();
                let res = bootctl::rollback(flags, r);
                assert_eq!(res.is_ok(), other_ok, "rollback allowed? at {ctx}");
                if other_ok {
                    let (_, after) = apply(&mut dev, &mut crash, |f| bootctl::rollback(f, r));
                    model.slots = [ModelSlot::of(after.a), ModelSlot::of(after.b)];
                }
            }
        }
        // after every step the disk and the model agree on what would boot
        let (_, flags) = store::load(&dev).expect("load");
        assert_eq!(flags.preferred(), model.choose(), "after {ctx}");
    }
}

/// Prints its seed; a failure prints the shrunk operation list, and `run_sequence(&that list)`
/// replays it.
#[test]
fn random_flag_sequences_agree_with_the_model() {
    crate::common::run_seeded(
        "random_flag_sequences_agree_with_the_model",
        256,
        proptest::collection::vec(op(), 1..40),
        |ops| run_sequence(&ops),
    );
}
