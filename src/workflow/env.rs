//! `${VAR}` and `${VAR:-default}` in a workflow's YAML, expanded from the environment in every
//! scalar before the stages are checked (an unset variable without a default is a diagnostic).

use super::yaml::Node;
use crate::diag::Diagnostic;

/// Replaces `${VAR}` and `${VAR:-default}` in every scalar; `$${` is a literal `${`.
pub(super) fn expand_env(node: &mut Node, diags: &mut Vec<Diagnostic>) {
    match node {
        Node::Scalar { value, span, .. } => {
            if value.contains("${") {
                match expand_str(value) {
                    Ok(v) => *value = v,
                    Err(var) => diags.push(
                        Diagnostic::new(*span, format!("environment variable `{var}` is not set"))
                            .hint(format!("export {var}=... before running, or write `${{{var}:-default}}`")),
                    ),
                }
            }
        }
        Node::Seq { items, .. } => items.iter_mut().for_each(|n| expand_env(n, diags)),
        Node::Map { entries, .. } => entries.iter_mut().for_each(|(_, n)| expand_env(n, diags)),
    }
}

fn expand_str(s: &str) -> std::result::Result<String, String> {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find("${") {
        if rest[..i].ends_with('$') {
            out.push_str(&rest[..i - 1]);
            out.push_str("${");
            rest = &rest[i + 2..];
            continue;
        }
        out.push_str(&rest[..i]);
        let Some(end) = rest[i..].find('}') else {
            out.push_str(&rest[i..]);
            return Ok(out);
        };
        let inner = &rest[i + 2..i + end];
        let (var, default) = match inner.split_once(":-") {
            Some((v, d)) => (v, Some(d)),
            None => (inner, None),
        };
        let set = std::env::var(var).ok().filter(|v| !v.is_empty() || default.is_none());
        match (set, default) {
            (Some(v), _) => out.push_str(&v),
            (None, Some(d)) => out.push_str(d),
            (None, None) => return Err(var.to_string()),
        }
        rest = &rest[i + end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_expansion() {
        // SAFETY: tests in this module do not read these variables concurrently.
        unsafe { std::env::set_var("FLOW_TEST_X", "abc") };
        assert_eq!(expand_str("a${FLOW_TEST_X}b").unwrap(), "aabcb");
        assert_eq!(expand_str("${FLOW_TEST_UNSET_Y:-d}").unwrap(), "d");
        assert_eq!(expand_str("$${HOME}").unwrap(), "${HOME}");
        assert_eq!(expand_str("${FLOW_TEST_UNSET_Y}").unwrap_err(), "FLOW_TEST_UNSET_Y");
    }
}
