//! `flow validate`: one test per class of problem, each asserting the message names the place.

use crate::harness::Sandbox;

const HEAD: &str =
    "name: t\nstore: t.db\nmodels:\n  black_box: { provider: local, model: all-MiniLM-L6-v2 }\nstages:\n";

fn validate(yaml: &str) -> (i32, String) {
    let sb = Sandbox::new();
    sb.write("wf.yaml", yaml);
    let r = sb.flow(&["validate", "wf.yaml"]);
    (r.code, r.all())
}

fn assert_problem(yaml: &str, place: &str, words: &[&str]) {
    let (code, out) = validate(yaml);
    assert_eq!(code, 2, "exit code; output:\n{out}");
    assert!(out.contains(&format!("wf.yaml:{place}")), "expected place wf.yaml:{place} in:\n{out}");
    for w in words {
        assert!(out.contains(w), "expected `{w}` in:\n{out}");
    }
}

#[test]
fn valid_file_passes() {
    let (code, out) = validate(&format!("{HEAD}  chunk: {{ kind: chunk, corpus: docs }}\n"));
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("ok"));
}

#[test]
fn yaml_syntax_error() {
    assert_problem(&format!("{HEAD}  chunk: {{ kind: chunk, corpus: [docs }}\n"), "6:", &["YAML syntax"]);
}

#[test]
fn unknown_key_with_suggestion() {
    assert_problem(
        &format!("{HEAD}  chunk:\n    kind: chunk\n    corpus: docs\n    max_tokns: 100\n"),
        "9:5",
        &["unknown key `max_tokns`", "did you mean `max_tokens`?"],
    );
}

#[test]
fn unknown_top_level_key() {
    assert_problem(
        &format!("{HEAD}  chunk: {{ kind: chunk, corpus: docs }}\nshedule: \"0 2 * * *\"\n"),
        "7:1",
        &["unknown key `shedule`", "`schedule`"],
    );
}

#[test]
fn wrong_type() {
    assert_problem(
        &format!("{HEAD}  chunk:\n    kind: chunk\n    corpus: docs\n    max_tokens: lots\n"),
        "9:17",
        &["max_tokens", "expected usize", "whole number"],
    );
}

#[test]
fn unknown_stage_kind() {
    assert_problem(
        &format!("{HEAD}  chunk: {{ kind: chunck, corpus: docs }}\n"),
        "6:18",
        &["unknown kind `chunck`", "did you mean `chunk`"],
    );
}

#[test]
fn needs_a_missing_stage() {
    assert_problem(
        &format!(
            "{HEAD}  a: {{ kind: chunk, corpus: docs }}\n  b: {{ kind: chunk, corpus: docs, needs: [a, chunkk] }}\n"
        ),
        "7:46",
        &["needs `chunkk`, which is not a stage"],
    );
}

#[test]
fn cycle_is_printed() {
    assert_problem(
        &format!(
            "{HEAD}  a: {{ kind: chunk, corpus: docs, needs: [c] }}\n  b: {{ kind: chunk, corpus: docs, needs: [a] }}\n  c: {{ kind: chunk, corpus: docs, needs: [b] }}\n"
        ),
        "6:3",
        &["cycle: a -> c -> b -> a"],
    );
}

#[test]
fn unset_environment_variable() {
    assert_problem(
        &format!("{HEAD}  chunk: {{ kind: chunk, corpus: \"${{FLOW_TEST_SURELY_UNSET}}/docs\" }}\n"),
        "6:",
        &["environment variable `FLOW_TEST_SURELY_UNSET` is not set"],
    );
}

#[test]
fn bad_cron_schedule() {
    assert_problem(
        &format!("schedule: \"0 25 * * *\"\n{HEAD}  chunk: {{ kind: chunk, corpus: docs }}\n"),
        "1:11",
        &["schedule", "cron"],
    );
}

#[test]
fn every_problem_at_once() {
    let yaml = format!(
        "{HEAD}  a:\n    kind: chunk\n    corpus: docs\n    overlapp: 3\n    max_tokens: many\n  b: {{ kind: nope }}\n  c: {{ kind: chunk, corpus: docs, needs: [zz] }}\n"
    );
    let (code, out) = validate(&yaml);
    assert_eq!(code, 2);
    for needle in ["wf.yaml:9:5", "wf.yaml:10:17", "wf.yaml:11:"] {
        assert!(out.contains(needle), "missing {needle} in:\n{out}");
    }
    assert!(out.contains("needs `zz`"), "{out}");
    assert!(out.contains("4 problems"), "{out}");
}

#[test]
fn json_output_lists_problems() {
    let sb = Sandbox::new();
    sb.write("wf.yaml", format!("{HEAD}  chunk: {{ kind: chunk, corpus: docs, overlap: 300 }}\n"));
    let r = sb.flow(&["validate", "--json", "wf.yaml"]);
    assert_eq!(r.code, 2);
    let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(v[0]["ok"], false);
    assert_eq!(v[0]["problems"][0]["line"], 6);
    assert!(
        v[0]["problems"][0]["message"].as_str().unwrap().contains("overlap (300) must be less than max_tokens (256)")
    );
}

#[test]
fn shipped_workflows_validate() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/workflows");
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "yaml") {
            continue;
        }
        let r = Sandbox::new().flow(&["validate", path.to_str().unwrap()]);
        assert_eq!(r.code, 0, "{}: {}", path.display(), r.all());
    }
}
