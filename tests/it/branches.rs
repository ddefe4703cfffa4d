//! Two generate/judge branches in one workflow at the loopback server: each train stage learns from
//! exactly its own branch's accepted pairs; and the states a run leaves are the strings they always were.

use crate::harness::Sandbox;
use crate::openai_server::{self as server, Config};

fn workflow(base_url: &str) -> String {
    format!(
        "name: t
store: t.db
models:
  llm: {{ provider: openai, model: test-model, base_url: {base_url} }}
  augment: {{ init: tiny }}
stages:
  chunk: {{ kind: chunk, corpus: docs, max_tokens: 200, overlap: 0 }}
  gen_a: {{ kind: generate, needs: [chunk], prompt: {p}/generate_queries.j2, per_chunk: 2 }}
  judge_a: {{ kind: judge, needs: [gen_a], prompt: {p}/judge.j2, min_score: 2 }}
  gen_b: {{ kind: generate, needs: [chunk], prompt: {p}/generate_queries.j2, per_chunk: 1, sample: 12 }}
  judge_b: {{ kind: judge, needs: [gen_b], prompt: {p}/judge.j2, min_score: 4 }}
  train_a: {{ kind: train, needs: [judge_a], retriever: augment_only, epochs: 1, batch_size: 4, val_fraction: 0 }}
  train_b: {{ kind: train, needs: [judge_b], retriever: augment_only, epochs: 1, batch_size: 4, val_fraction: 0 }}
",
        p = concat!(env!("CARGO_MANIFEST_DIR"), "/prompts"),
    )
}

#[test]
fn each_train_stage_learns_from_its_own_branch_only_and_states_keep_their_strings() {
    let srv = server::start(Config::default());
    let sb = Sandbox::new();
    crate::train::toy_set(&sb);
    crate::llm::corpus(&sb, 40);
    sb.write("wf.yaml", workflow(&srv.base_url()));
    let r = sb.cmd(&["run", "wf.yaml", "--quiet"]).env("OPENAI_API_KEY", "sk-test").output().unwrap();
    let r: crate::harness::Ran = r.into();
    assert_eq!(r.code, 0, "{}", r.all());

    let db = sb.db("t.db");
    let accepted = |generator: &str, judge: &str| {
        db.scalar(&format!(
            "SELECT COUNT(*) FROM queries q JOIN judgments j ON j.query_id = q.id
             WHERE q.stage = '{generator}' AND j.stage = '{judge}' AND j.verdict = 'accepted' AND q.status = 'kept'"
        ))
    };
    let trained = |stage: &str| {
        db.scalar(&format!(
            "SELECT json_extract(summary, '$.train_pairs') FROM stage_runs WHERE stage = '{stage}' ORDER BY id DESC LIMIT 1"
        ))
    };
    let (a, b) = (accepted("gen_a", "judge_a"), accepted("gen_b", "judge_b"));
    assert!(a > b && b > 0, "the branches must differ for this test to mean anything: {a} vs {b}");
    assert_eq!(trained("train_a"), a, "train_a learns from judge_a's accepted pairs of gen_a only");
    assert_eq!(trained("train_b"), b, "train_b learns from judge_b's accepted pairs of gen_b only");

    // The store holds the same state strings as ever, and `--json` shows them.
    assert_eq!(db.text("SELECT status FROM runs"), "succeeded");
    assert_eq!(db.scalar("SELECT COUNT(*) FROM stage_runs WHERE status != 'succeeded'"), 0);
    assert_eq!(db.scalar("SELECT COUNT(*) FROM judgments WHERE verdict NOT IN ('accepted', 'rejected')"), 0);
    assert!(db.scalar("SELECT COUNT(*) FROM judgments WHERE verdict = 'rejected'") > 0);
    assert_eq!(db.scalar("SELECT COUNT(*) FROM generations WHERE status != 'done'"), 0);
    assert!(db.scalar("SELECT COUNT(*) FROM queries WHERE status = 'kept'") > 0);
    assert_eq!(db.text("SELECT DISTINCT provider FROM llm_calls"), "openai");
    assert_eq!(db.text("SELECT DISTINCT status FROM models"), "candidate");
    let s = sb.flow(&["status", "--json", "-w", "wf.yaml"]);
    assert_eq!(s.code, 0, "{}", s.all());
    let v: serde_json::Value = serde_json::from_str(&s.stdout).unwrap();
    assert_eq!(v["status"], "succeeded");
    assert!(v["stages"].as_array().unwrap().iter().all(|s| s["status"] == "succeeded"), "{v}");
    let runs = sb.flow(&["runs", "--json", "-w", "wf.yaml"]);
    let runs: serde_json::Value = serde_json::from_str(&runs.stdout).unwrap();
    assert_eq!(runs[0]["status"], "succeeded", "{runs}");

    // A rerun is up to date, and says so in the same words.
    let again = sb.cmd(&["run", "wf.yaml", "--quiet"]).env("OPENAI_API_KEY", "sk-test").output().unwrap();
    assert!(again.status.success());
    assert_eq!(db.scalar("SELECT COUNT(*) FROM stage_runs WHERE run_id = 2 AND status = 'up_to_date'"), 7);
}
