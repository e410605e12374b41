//! A path through the model in words: "boot a v1 ok; install v2 → b: invalidate, ...".
//! Consecutive steps of one install are one phrase.

use crate::model::{Act, Node, NodeModel, Outcome, Pending, Power, Put};
use crate::script::Start;

fn pending_word(p: &Pending) -> String {
    match p.put {
        Put::Chunk(i, _) => format!("{} chunk {}", p.slot, i + 1),
        Put::Record(_) => format!("{} record", p.slot),
    }
}

fn fate_words(n: &Node, mut fate: u32) -> String {
    if n.pending.is_empty() {
        return "nothing unflushed".into();
    }
    let mut w = Vec::new();
    for p in &n.pending {
        let what = match fate % 3 {
            0 => "lost",
            1 => "kept",
            _ => "torn",
        };
        w.push(format!("{} {what}", pending_word(p)));
        fate /= 3;
    }
    w.join(", ")
}

fn describe(before: &Node, act: &Act, after: &Node) -> String {
    let flags = |n: &Node| {
        let f = n.flags();
        format!("[a: {} | b: {}]", f.a, f.b)
    };
    match act {
        Act::Boot(o) => {
            if after.power == Power::Bricked {
                return format!("boot: no bootable slot {}", flags(before));
            }
            let (slot, v) = match after.up() {
                Some(u) => (u.slot.to_string(), format!("v{}", u.version)),
                None => {
                    // the boot failed: the slot whose flags changed
                    let s = if before.flags[0] != after.flags[0] {
                        "a"
                    } else {
                        "b"
                    };
                    (s.to_string(), String::new())
                }
            };
            let what = match o {
                Outcome::Healthy => "ok",
                Outcome::Hang => "hangs, watchdog reset",
                Outcome::NeverHealthy => "agent up, never healthy",
                Outcome::Panic => "kernel panic, watchdog reset",
                Outcome::NoMount => "root does not mount, marked failed",
            };
            let trial = if after.up().is_some_and(|u| u.trial) {
                " (trial)"
            } else {
                ""
            };
            format!("boot {slot} {v} {what}{trial}")
                .replace("  ", " ")
                .trim()
                .to_string()
        }
        Act::MarkSuccessful => format!(
            "{} marked successful",
            before.up().map_or("?".into(), |u| u.slot.to_string())
        ),
        Act::Deadline(f) => format!("health deadline: reboot ({})", fate_words(before, *f)),
        Act::Crash(f) => format!("power cut ({})", fate_words(before, *f)),
        Act::AgentRestart => {
            let b = after.up().map(|u| u.agent.belief);
            format!("agent restart (believes running {b:?})")
                .replace("Some(Slot(A))", "a")
                .replace("Some(Slot(B))", "b")
        }
        Act::Install {
            version,
            server_good,
        } => {
            let bad = if *server_good {
                ""
            } else {
                ", server serves bad bytes"
            };
            match after.up().and_then(|u| u.agent.install) {
                Some(r) => {
                    let how = match r.key.start {
                        Start::Fresh => String::new(),
                        Start::Resume(k) => format!(", resumes at chunk {}", k + 1),
                        Start::Discard => ", discards a checkpoint".into(),
                    };
                    format!(
                        "operator installs v{version}{bad}: targets {}{how}",
                        r.target
                    )
                }
                None => format!("operator installs v{version}{bad}: refused"),
            }
        }
        Act::Rollback => format!(
            "operator rollback: next boot {}",
            after
                .flags()
                .preferred()
                .map_or("none".into(), |s| s.to_string())
        ),
        Act::Reboot => "operator reboot".into(),
        Act::Step => String::new(),
    }
}

/// The path in words, one phrase per action (an install's steps grouped), then the final flags.
pub fn words(m: &NodeModel, path: &[(Node, Option<Act>)]) -> String {
    let mut out: Vec<String> = Vec::new();
    let mut steps: Vec<String> = Vec::new();
    let mut head = String::new();
    for w in path.windows(2) {
        let (before, act) = (&w[0].0, w[0].1.as_ref());
        let after = &w[1].0;
        let Some(act) = act else { continue };
        if *act == Act::Step {
            if let Some(r) = before.up().and_then(|u| u.agent.install) {
                if steps.is_empty() {
                    head = format!("install v{} → {}: ", r.version, r.target);
                }
                let s = m.steps(r.key)[r.pc as usize];
                steps.push(s.word());
            }
            continue;
        }
        if !steps.is_empty() {
            out.push(format!("{head}{}", steps.join(", ")));
            steps.clear();
        }
        out.push(describe(before, act, after));
    }
    if !steps.is_empty() {
        out.push(format!("{head}{}", steps.join(", ")));
    }
    if let Some((last, _)) = path.last() {
        let f = last.flags();
        out.push(format!(
            "end: flags a {{{}}} b {{{}}}, a holds {:?}, b holds {:?}{}",
            f.a,
            f.b,
            last.disk[0].holds(),
            last.disk[1].holds(),
            match last.broken {
                Some(b) => format!(", violation {b:?}"),
                None => String::new(),
            }
        ));
    }
    out.join("; ")
}
