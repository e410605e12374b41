//! Liveness under fairness, over the same model: from every reachable state where the goal has
//! not yet held, some fault-free path reaches it (AG(¬goal → EF goal) over the fair steps).
//!
//! Faults (power cuts, hangs, agent restarts, rollbacks, installs of other versions or from a
//! bad server) are bounded, so every run ends with a suffix of fair steps only (boots, install
//! steps, marking successful, the operator re-issuing the goal's install and rebooting). On a
//! finite graph, when every fair step that is enabled infinitely often is eventually taken
//! (strong fairness), a goal that stays reachable is eventually reached: this check is that.
//! stateright's own `eventually` looks only at terminal states and cannot see a cycle that
//! avoids the goal, hence this explicit graph.

use crate::model::{Act, Node, NodeModel};
use crate::trace;
use stateright::Model;
use std::collections::{HashMap, VecDeque};
use std::time::Instant;

/// The reachable graph, explored breadth first (so the path to a state is a shortest one).
pub struct Graph {
    pub states: Vec<Node>,
    parent: Vec<Option<(u32, Act)>>,
    pub depth: Vec<u32>,
    /// Reverse edges of fair steps.
    back: Vec<Vec<u32>>,
    pub edges: usize,
}

impl Graph {
    /// The path from the initial state to state `i`.
    pub fn path_to(&self, i: usize) -> Vec<(Node, Option<Act>)> {
        let mut path: Vec<(Node, Option<Act>)> = vec![(self.states[i].clone(), None)];
        let mut at = i;
        while let Some((p, act)) = &self.parent[at] {
            path.push((self.states[*p as usize].clone(), Some(act.clone())));
            at = *p as usize;
        }
        path.reverse();
        path
    }
}

/// Explore breadth first; stop at the first state where `stop` holds (returned).
pub fn explore(m: &NodeModel, stop: &dyn Fn(&Node) -> bool) -> (Graph, Option<usize>) {
    let mut ids: HashMap<Node, u32> = HashMap::new();
    let mut g = Graph {
        states: Vec::new(),
        parent: Vec::new(),
        depth: Vec::new(),
        back: Vec::new(),
        edges: 0,
    };
    let mut queue = VecDeque::new();
    for s in m.init_states() {
        let i = g.states.len();
        if stop(&s) {
            g.states.push(s);
            g.parent.push(None);
            g.depth.push(0);
            return (g, Some(i));
        }
        ids.insert(s.clone(), i as u32);
        queue.push_back(i as u32);
        g.states.push(s);
        g.parent.push(None);
        g.depth.push(0);
        g.back.push(Vec::new());
    }
    while let Some(i) = queue.pop_front() {
        let s = g.states[i as usize].clone();
        for (act, next) in m.next_steps(&s) {
            g.edges += 1;
            let fair = m.fair(&act);
            let j = match ids.get(&next) {
                Some(&j) => j,
                None => {
                    let j = g.states.len() as u32;
                    let hit = stop(&next);
                    ids.insert(next.clone(), j);
                    g.states.push(next);
                    g.parent.push(Some((i, act)));
                    g.depth.push(g.depth[i as usize] + 1);
                    g.back.push(Vec::new());
                    if hit {
                        return (g, Some(j as usize));
                    }
                    queue.push_back(j);
                    j
                }
            };
            if fair {
                g.back[j as usize].push(i);
            }
        }
    }
    (g, None)
}

/// The shortest path to a state where `property` (an `always` property of the model) fails.
pub fn shortest_violation(m: &NodeModel, property: &str) -> Option<Vec<(Node, Option<Act>)>> {
    let p = m.properties().into_iter().find(|p| p.name == property)?;
    let (g, hit) = explore(m, &|n| !(p.condition)(m, n));
    hit.map(|i| g.path_to(i))
}

pub fn check(m: &NodeModel) -> Result<(), String> {
    let start = Instant::now();
    let (g, _) = explore(m, &|_| false);
    // states from which a fair path reaches the goal
    let mut good = vec![false; g.states.len()];
    let mut queue: VecDeque<u32> = VecDeque::new();
    for (i, s) in g.states.iter().enumerate() {
        if s.reached {
            good[i] = true;
            queue.push_back(i as u32);
        }
    }
    while let Some(j) = queue.pop_front() {
        for &i in &g.back[j as usize] {
            if !good[i as usize] {
                good[i as usize] = true;
                queue.push_back(i);
            }
        }
    }
    println!(
        "modelcheck: liveness {:?}: states={} unique={} max_depth={} time={:.1}s {}",
        m.cfg.goal,
        g.edges + 1,
        g.states.len(),
        g.depth.iter().max().copied().unwrap_or(0),
        start.elapsed().as_secs_f64(),
        m.cfg.describe()
    );
    // the shallowest state that can no longer reach the goal
    let stuck = (0..g.states.len())
        .filter(|&i| !good[i])
        .min_by_key(|&i| g.depth[i]);
    let Some(stuck) = stuck else { return Ok(()) };
    let path = g.path_to(stuck);
    let msg = format!(
        "liveness {:?} fails: after {} steps no fault-free path reaches the goal: {}",
        m.cfg.goal,
        path.len() - 1,
        trace::words(m, &path)
    );
    println!("modelcheck: {msg}");
    Err(msg)
}
