//! `flow plan` against the loopback server: the plan of a fresh run agrees with the usage the run
//! then reports, a rerun plans nothing, and a changed setting plans again from the observed mean.

use crate::harness::Sandbox;
use crate::llm::{corpus, workflow};
use crate::openai_server::{self as server, Config};

fn plan(sb: &Sandbox) -> serde_json::Value {
    let r = sb.flow(&["plan", "wf.yaml", "--json"]);
    assert_eq!(r.code, 0, "{}", r.all());
    serde_json::from_str(&r.stdout).unwrap_or_else(|e| panic!("{e}: {}", r.stdout))
}

fn planned<'a>(p: &'a serde_json::Value, stage: &str) -> &'a serde_json::Value {
    p["stages"].as_array().unwrap().iter().find(|s| s["stage"] == stage).unwrap()
}

fn within(what: &str, planned: i64, actual: i64, share: f64) {
    let off = (planned - actual).abs() as f64 / actual.max(1) as f64;
    assert!(off <= share, "{what}: planned {planned}, the run reported {actual} ({:.1}% off)", off * 100.0);
}

#[test]
fn a_fresh_runs_plan_matches_its_usage_and_a_rerun_plans_nothing() {
    let srv = server::start(Config::default());
    let sb = Sandbox::new();
    corpus(&sb, 30);
    // gpt-4o-mini: flow counts with tiktoken's o200k_base, as the server (like OpenAI) does.
    let wf = workflow(&srv.base_url(), "", "").replace("model: test-model", "model: gpt-4o-mini");
    sb.write("wf.yaml", &wf);

    let p = plan(&sb);
    assert!(!sb.path("t.db").exists(), "planning a fresh workflow creates no store");
    assert!(srv.log.entries().is_empty(), "planning calls no model");
    assert_eq!(planned(&p, "chunk")["action"], "runs");
    let (generate, judge) = (planned(&p, "generate"), planned(&p, "judge"));
    assert_eq!(generate["todo"], 30);
    assert_eq!(generate["llm"]["counted_by"], "tiktoken o200k_base");
    assert!(generate["llm"]["completion_tokens_expected"].is_null(), "no earlier calls: only the max_tokens bound");
    assert_eq!(judge["todo"], 60, "at most per_chunk questions a chunk");

    let r = sb.flow(&["run", "wf.yaml"]);
    assert_eq!(r.code, 0, "{}", r.all());
    let db = sb.db("t.db");
    let used = |stage: &str, col: &str| db.scalar(&format!("SELECT {col} FROM stage_runs WHERE stage = '{stage}'"));
    let plan_of = |s: &serde_json::Value, k: &str| s["llm"][k].as_i64().unwrap();
    assert_eq!(plan_of(generate, "requests"), used("generate", "llm_calls"), "generate's requests exactly");
    within("generate prompt tokens", plan_of(generate, "prompt_tokens"), used("generate", "prompt_tokens"), 0.02);
    within("judge requests", plan_of(judge, "requests"), used("judge", "llm_calls"), 0.10);
    within("judge prompt tokens", plan_of(judge, "prompt_tokens"), used("judge", "prompt_tokens"), 0.10);
    let total_prompt = db.scalar("SELECT SUM(prompt_tokens) FROM stage_runs");
    within("all prompt tokens", p["total"]["prompt_tokens"].as_i64().unwrap(), total_prompt, 0.10);
    let completion = db.scalar("SELECT SUM(completion_tokens) FROM stage_runs");
    assert!(completion <= p["total"]["completion_tokens_max"].as_i64().unwrap(), "max_tokens bounds completion");
    let cost = db.real("SELECT SUM(cost) FROM stage_runs");
    assert!(cost <= p["total"]["usd_max"].as_f64().unwrap() + 1e-12, "the cost bound holds: {cost}");

    // The run kept its plan at each stage's start, beside what it spent.
    let st = sb.flow(&["status", "-w", "wf.yaml"]).stdout;
    assert!(st.contains("EST. COST") && st.contains("<=$"), "{st}");
    let runs = sb.flow(&["runs", "-w", "wf.yaml", "--json"]).stdout;
    let runs: serde_json::Value = serde_json::from_str(&runs).unwrap();
    assert_eq!(runs[0]["estimate"]["requests"], used("generate", "llm_calls") + used("judge", "llm_calls"));

    // Nothing left to do: every stage up to date, no request planned.
    let again = plan(&sb);
    assert_eq!(again["total"]["requests"], 0, "{again}");
    assert!(again["stages"].as_array().unwrap().iter().all(|s| s["action"] == "up to date"), "{again}");

    // A changed temperature redoes generate and what follows: completion is now expected from the
    // mean of the earlier calls, and the expectation holds for the run that follows.
    sb.write("wf.yaml", wf.replace("per_chunk: 2", "per_chunk: 2, temperature: 0.3"));
    let p2 = plan(&sb);
    let generate2 = planned(&p2, "generate");
    assert_eq!(planned(&p2, "chunk")["action"], "up to date");
    assert_eq!(generate2["todo"], 30);
    assert_eq!(generate2["llm"]["observed_calls"], 30);
    let expected = plan_of(generate2, "completion_tokens_expected");
    let text = sb.flow(&["run", "wf.yaml", "--dry-run"]);
    assert_eq!(text.code, 0, "{}", text.all());
    assert!(text.stdout.contains("completion from the mean of 30 earlier calls"), "{}", text.stdout);
    let before = srv.log.entries().len();
    assert!(sb.flow(&["run", "wf.yaml"]).code == 0);
    assert!(srv.log.entries().len() > before);
    let last = db.scalar(
        "SELECT completion_tokens FROM stage_runs WHERE stage = 'generate' AND run_id = (SELECT MAX(id) FROM runs)",
    );
    within("generate completion from the observed mean", expected, last, 0.10);
}
