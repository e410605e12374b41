//! The order services start in: every service after the ones it names in `after`. Pure.

use crate::config::ServiceConfig;

/// The services cannot be ordered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OrderError {
    #[error("the start order has a cycle: {}; remove one of these `after` entries", .0.join(" -> "))]
    Cycle(Vec<String>),
    #[error("service {service} is to start after {missing:?}, which is not a service")]
    Unknown { service: String, missing: String },
}

/// Indices of `services` in start order: each after all it depends on, otherwise in the order
/// given. Shutdown uses the reverse. A cycle is refused with its members named.
pub fn start_order(services: &[ServiceConfig]) -> Result<Vec<usize>, OrderError> {
    order(services, true)
}

/// A dependency cycle among `services`, if there is one; dependencies on names that are not
/// services are ignored here (validation reports them separately).
pub fn find_cycle(services: &[ServiceConfig]) -> Option<Vec<String>> {
    match order(services, false) {
        Err(OrderError::Cycle(c)) => Some(c),
        _ => None,
    }
}

fn order(services: &[ServiceConfig], strict: bool) -> Result<Vec<usize>, OrderError> {
    let index = |name: &str| services.iter().position(|s| s.name == name);
    let mut deps: Vec<Vec<usize>> = Vec::with_capacity(services.len());
    for s in services {
        let mut d = Vec::new();
        for a in &s.after {
            match index(a) {
                Some(i) => d.push(i),
                None if !strict => {}
                None => {
                    return Err(OrderError::Unknown {
                        service: s.name.clone(),
                        missing: a.clone(),
                    })
                }
            }
        }
        // dependencies in configuration order, so that the result is "as given" where free
        d.sort_unstable();
        deps.push(d);
    }
    // depth-first with colours so that a cycle can be reported as a path
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        New,
        Active,
        Done,
    }
    fn visit(
        i: usize,
        deps: &[Vec<usize>],
        marks: &mut [Mark],
        stack: &mut Vec<usize>,
        out: &mut Vec<usize>,
        services: &[ServiceConfig],
    ) -> Result<(), OrderError> {
        match marks[i] {
            Mark::Done => return Ok(()),
            Mark::Active => {
                let from = stack.iter().position(|&s| s == i).unwrap_or(0);
                let mut cycle: Vec<String> = stack[from..]
                    .iter()
                    .map(|&s| services[s].name.clone())
                    .collect();
                cycle.push(services[i].name.clone());
                return Err(OrderError::Cycle(cycle));
            }
            Mark::New => {}
        }
        marks[i] = Mark::Active;
        stack.push(i);
        for &d in &deps[i] {
            visit(d, deps, marks, stack, out, services)?;
        }
        stack.pop();
        marks[i] = Mark::Done;
        out.push(i);
        Ok(())
    }
    let mut marks = vec![Mark::New; services.len()];
    let mut out = Vec::with_capacity(services.len());
    let mut stack = Vec::new();
    for i in 0..services.len() {
        visit(i, &deps, &mut marks, &mut stack, &mut out, services)?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svc(name: &str, after: &[&str]) -> ServiceConfig {
        let mut s = ServiceConfig::new(name, "/bin/true", &[]);
        s.after = after.iter().map(|a| a.to_string()).collect();
        s
    }

    fn names(s: &[ServiceConfig], order: &[usize]) -> Vec<String> {
        order.iter().map(|&i| s[i].name.clone()).collect()
    }

    #[test]
    fn dependencies_come_first_otherwise_given_order() {
        let s = vec![
            svc("kubelet", &["containerd", "agent"]),
            svc("agent", &[]),
            svc("containerd", &[]),
            svc("extra", &[]),
        ];
        let o = start_order(&s).unwrap();
        assert_eq!(names(&s, &o), ["agent", "containerd", "kubelet", "extra"]);
        // a chain given backwards
        let s = vec![svc("c", &["b"]), svc("b", &["a"]), svc("a", &[])];
        assert_eq!(names(&s, &start_order(&s).unwrap()), ["a", "b", "c"]);
    }

    #[test]
    fn cycles_are_refused_and_named() {
        let s = vec![svc("a", &["b"]), svc("b", &["c"]), svc("c", &["a"])];
        assert_eq!(
            start_order(&s).unwrap_err(),
            OrderError::Cycle(vec!["a".into(), "b".into(), "c".into(), "a".into()])
        );
        let s = vec![svc("x", &[]), svc("self", &["self"])];
        assert_eq!(
            start_order(&s).unwrap_err().to_string(),
            "the start order has a cycle: self -> self; remove one of these `after` entries"
        );
    }

    #[test]
    fn cycle_is_found_despite_unknown_names() {
        let s = vec![svc("a", &["ghost", "b"]), svc("b", &["a"])];
        assert_eq!(
            find_cycle(&s),
            Some(vec!["a".into(), "b".into(), "a".into()])
        );
        assert_eq!(find_cycle(&[svc("a", &["ghost"])]), None);
    }

    #[test]
    fn unknown_dependency_is_named() {
        let s = vec![svc("a", &["nope"])];
        assert_eq!(
            start_order(&s).unwrap_err(),
            OrderError::Unknown {
                service: "a".into(),
                missing: "nope".into()
            }
        );
    }
}
