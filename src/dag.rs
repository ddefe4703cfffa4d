//! Stage graph checks and orders: a topological order, cycles printed as a path, downstream sets.
//! Works on plain names so the workflow loader and the engine share it.

use std::collections::{BTreeMap, BTreeSet};

/// Orders stages so each comes after everything it needs; ties break by name so runs are repeatable.
/// On a cycle, returns it as a path that starts and ends at the same stage.
pub fn order(needs: &BTreeMap<String, Vec<String>>) -> Result<Vec<String>, Vec<String>> {
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        New,
        Open,
        Done,
    }
    fn visit(
        n: &str,
        needs: &BTreeMap<String, Vec<String>>,
        marks: &mut BTreeMap<String, Mark>,
        stack: &mut Vec<String>,
        out: &mut Vec<String>,
    ) -> Result<(), Vec<String>> {
        match marks.get(n).copied().unwrap_or(Mark::New) {
            Mark::Done => return Ok(()),
            Mark::Open => {
                let start = stack.iter().position(|s| s == n).unwrap_or(0);
                let mut cycle = stack[start..].to_vec();
                cycle.push(n.to_string());
                return Err(cycle);
            }
            Mark::New => {}
        }
        marks.insert(n.to_string(), Mark::Open);
        stack.push(n.to_string());
        for dep in needs.get(n).into_iter().flatten() {
            if needs.contains_key(dep) {
                visit(dep, needs, marks, stack, out)?;
            }
        }
        stack.pop();
        marks.insert(n.to_string(), Mark::Done);
        out.push(n.to_string());
        Ok(())
    }
    let mut marks = BTreeMap::new();
    let mut out = Vec::new();
    for n in needs.keys() {
        visit(n, needs, &mut marks, &mut Vec::new(), &mut out)?;
    }
    Ok(out)
}

/// Every stage that depends, directly or not, on `from` (not including `from`).
pub fn downstream(needs: &BTreeMap<String, Vec<String>>, from: &str) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    let mut frontier = vec![from.to_string()];
    while let Some(cur) = frontier.pop() {
        for (name, deps) in needs {
            if deps.contains(&cur) && found.insert(name.clone()) {
                frontier.push(name.clone());
            }
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    fn graph(edges: &[(&str, &[&str])]) -> BTreeMap<String, Vec<String>> {
        edges.iter().map(|(n, d)| (n.to_string(), d.iter().map(|s| s.to_string()).collect())).collect()
    }

    #[test]
    fn orders_after_needs() {
        let g = graph(&[("judge", &["generate"]), ("generate", &["chunk"]), ("chunk", &[]), ("other", &[])]);
        assert_eq!(order(&g).unwrap(), ["chunk", "generate", "judge", "other"]);
        assert_eq!(downstream(&g, "chunk").into_iter().collect::<Vec<_>>(), ["generate", "judge"]);
    }

    #[test]
    fn prints_the_cycle() {
        let g = graph(&[("a", &["c"]), ("b", &["a"]), ("c", &["b"]), ("d", &[])]);
        assert_eq!(order(&g).unwrap_err(), ["a", "c", "b", "a"]);
    }
}
