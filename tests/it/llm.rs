//! generate and judge against a real HTTP server on 127.0.0.1 that injects faults: every item ends
//! done or failed with a reason, rates hold at the server, kill -9 and resume pay for nothing twice.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crate::harness::{Sandbox, prose};
use crate::openai_server::{self as server, Config};

/// A corpus of `n` one-paragraph records: one chunk each.
pub fn corpus(sb: &Sandbox, n: usize) {
    let lines: Vec<String> = (0..n)
        .map(|i| {
            serde_json::json!({"id": format!("r{i}"), "title": format!("Note {i}"), "text": prose(500 + i as u64, 1)})
                .to_string()
        })
        .collect();
    sb.write("docs/records.jsonl", lines.join("\n"));
}

pub fn workflow(base_url: &str, model_extra: &str, generate_extra: &str) -> String {
    format!(
        "name: t
store: t.db
models:
  black_box: {{ provider: local, model: all-MiniLM-L6-v2 }}
  llm:
    provider: openai
    model: test-model
    base_url: {base_url}
    timeout_s: 1
    retry: {{ attempts: 4, base_ms: 20, max_ms: 200, deadline_s: 30 }}
    price: {{ prompt_per_mtok: 0.15, completion_per_mtok: 0.6 }}
{model_extra}
stages:
  chunk: {{ kind: chunk, corpus: docs, max_tokens: 200, overlap: 0 }}
  generate: {{ kind: generate, needs: [chunk], prompt: {prompts}/generate_queries.j2, per_chunk: 2{generate_extra} }}
  judge: {{ kind: judge, needs: [generate], prompt: {prompts}/judge.j2, min_score: 3, max_failures: 0.2 }}
",
        prompts = concat!(env!("CARGO_MANIFEST_DIR"), "/prompts"),
    )
}

fn status(sb: &Sandbox) -> serde_json::Value {
    let r = sb.flow(&["status", "--json", "-w", "wf.yaml"]);
    assert_eq!(r.code, 0, "{}", r.all());
    serde_json::from_str(&r.stdout).unwrap()
}

fn stage<'a>(s: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    s["stages"].as_array().unwrap().iter().find(|x| x["stage"] == name).unwrap()
}

fn count_by_outcome(log: &[server::Entry]) -> HashMap<&'static str, usize> {
    let mut m = HashMap::new();
    for e in log {
        *m.entry(e.outcome).or_insert(0) += 1;
    }
    m
}

#[test]
fn every_fault_ends_done_or_failed_with_a_reason() {
    let srv = server::start(Config { transient_faults: true, persistent_faults: true, ..Config::default() });
    let sb = Sandbox::new();
    corpus(&sb, 120);
    sb.write("wf.yaml", workflow(&srv.base_url(), "    limits: { max_in_flight: 16 }", ", max_failures: 0.1"));
    let r = sb.cmd(&["run", "wf.yaml"]).env("OPENAI_API_KEY", "sk-test-secret-0123456789").output().unwrap();
    let r: crate::harness::Ran = r.into();
    assert_eq!(r.code, 0, "failures are within max_failures: {}", r.all());
    assert!(r.stderr.contains("warning:"), "{}", r.stderr);

    let db = sb.db("t.db");
    let chunks = db.scalar("SELECT COUNT(*) FROM chunks");
    assert_eq!(chunks, 120);
    assert_eq!(
        db.scalar("SELECT COUNT(*) FROM generations WHERE stage = 'generate'"),
        chunks,
        "every chunk has an outcome"
    );
    assert_eq!(
        db.scalar("SELECT COUNT(*) FROM generations WHERE status = 'failed' AND (error IS NULL OR error = '')"),
        0
    );
    // Each kind of fault was injected, and transient ones were retried into success.
    let seen = count_by_outcome(&srv.log.entries());
    for f in ["429", "500", "503", "slow", "malformed", "drop"] {
        assert!(seen.get(f).copied().unwrap_or(0) > 0, "fault {f} never injected: {seen:?}");
    }
    let persistent = db.scalar("SELECT COUNT(*) FROM generations WHERE status = 'failed'");
    assert_eq!(
        persistent,
        db.scalar("SELECT COUNT(*) FROM generations WHERE error LIKE 'HTTP 400: Invalid prompt%' OR error LIKE '%cut off at max_tokens%'"),
        "only persistent faults fail an item"
    );
    // Judge: every kept question judged (accepted/rejected) or failed with a reason.
    let kept = db.scalar("SELECT COUNT(*) FROM queries WHERE status = 'kept'");
    assert!(kept > 150, "{kept}");
    assert_eq!(db.scalar("SELECT COUNT(*) FROM judgments WHERE stage = 'judge'"), kept);
    assert!(db.scalar("SELECT COUNT(*) FROM judgments WHERE verdict = 'rejected' AND reason != ''") > 0);
    // The cheap rules and the duplicate check dropped what they should.
    assert!(db.scalar("SELECT COUNT(*) FROM queries WHERE status = 'refers_to_context'") > 0);
    assert!(db.scalar("SELECT COUNT(*) FROM queries WHERE status = 'duplicate'") > 0);
    // Provenance.
    assert_eq!(
        db.scalar(
            "SELECT COUNT(*) FROM queries WHERE model != 'test-model' OR params NOT LIKE '%response_id%chatcmpl-%'"
        ),
        0
    );
    // Accounting in status.
    let s = status(&sb);
    let g = stage(&s, "generate");
    assert!(g["llm_calls"].as_i64().unwrap() > chunks, "retries are calls too: {g}");
    assert!(g["prompt_tokens"].as_i64().unwrap() > 0 && g["cost"].as_f64().unwrap() > 0.0, "{g}");
    // The key is nowhere in the store or the output.
    let bytes = std::fs::read(sb.path("t.db")).unwrap();
    let wal = std::fs::read(sb.path("t.db-wal")).unwrap_or_default();
    for hay in [&bytes, &wal] {
        assert!(!hay.windows(10).any(|w| w == b"sk-test-se"), "API key stored");
    }
    assert!(!r.all().contains("sk-test-secret"));

    // A rerun pays nothing: every request is answered from the cache.
    let before = srv.log.entries().len();
    let again = sb
        .cmd(&["run", "wf.yaml", "--force", "generate", "--force", "judge"])
        .env("OPENAI_API_KEY", "x")
        .output()
        .unwrap();
    assert_eq!(again.status.code(), Some(0), "{}", String::from_utf8_lossy(&again.stderr));
    let new_requests = srv.log.entries().len() - before;
    // Only failed items are asked again: those never answered (400s) and those whose answer did not
    // parse (cut off at max_tokens, no score), which are not replayed from the cache.
    let failed = db.scalar("SELECT COUNT(*) FROM generations WHERE status = 'failed'")
        + db.scalar("SELECT COUNT(*) FROM judgments WHERE verdict = 'failed'");
    assert_eq!(new_requests as i64, failed, "only failed items are sent again");
    let s = status(&sb);
    assert_eq!(stage(&s, "generate")["cost"].as_f64(), Some(0.0));
    let done = db.scalar("SELECT COUNT(*) FROM generations WHERE status = 'done'");
    assert_eq!(stage(&s, "generate")["items_cached"].as_i64(), Some(done), "finished chunks are not asked again");
    assert_eq!(stage(&s, "generate")["llm_cached"].as_i64(), Some(0), "answers that did not parse are not replayed");
}

#[test]
fn failed_items_fail_the_stage_and_resume_retries_only_them() {
    let srv = server::start(Config { persistent_faults: true, ..Config::default() });
    let sb = Sandbox::new();
    corpus(&sb, 150);
    sb.write("wf.yaml", workflow(&srv.base_url(), "", ""));
    let r = sb.flow(&["run", "wf.yaml"]);
    assert_eq!(r.code, 1, "{}", r.all());
    let s = status(&sb);
    assert_eq!(stage(&s, "generate")["status"], "failed");
    assert!(stage(&s, "generate")["error"].as_str().unwrap().contains("items failed"));
    assert_eq!(stage(&s, "judge")["status"], "blocked");
    let db = sb.db("t.db");
    let failed = db.scalar("SELECT COUNT(*) FROM generations WHERE status = 'failed'");
    let failed_400 = db.scalar("SELECT COUNT(*) FROM generations WHERE error LIKE 'HTTP 400%'");
    assert!(failed > 0 && failed_400 > 0);

    let before = srv.log.entries().len();
    let r = sb.flow(&["resume", "-w", "wf.yaml"]);
    assert_eq!(r.code, 1, "persistent faults fail again: {}", r.all());
    // Every failed item is asked again: 400s were never answered, and answers cut off at max_tokens
    // did not parse into questions, so they are not replayed from the cache.
    assert_eq!((srv.log.entries().len() - before) as i64, failed);
    assert_eq!(db.scalar("SELECT COUNT(*) FROM generations WHERE status = 'done'"), 150 - failed);
}

#[test]
fn configured_rate_is_never_exceeded_at_the_server() {
    let srv = server::start(Config::default());
    let sb = Sandbox::new();
    corpus(&sb, 40);
    sb.write("wf.yaml", workflow(&srv.base_url(), "    limits: { requests_per_minute: 600, max_in_flight: 8 }", ""));
    let r = sb.flow(&["run", "wf.yaml", "--only", "chunk"]);
    assert_eq!(r.code, 0, "{}", r.all());
    let r = sb.flow(&["run", "wf.yaml", "--only", "generate"]);
    assert_eq!(r.code, 0, "{}", r.all());
    let times: Vec<Instant> = srv.log.entries().iter().map(|e| e.received).collect();
    assert_eq!(times.len(), 40);
    // 600/min is 10/s: no one-second window holds more than 10 (+1 for where the window starts).
    for (i, t) in times.iter().enumerate() {
        let in_window = times[i..].iter().take_while(|x| x.duration_since(*t) < Duration::from_secs(1)).count();
        assert!(in_window <= 11, "{in_window} requests within 1s of request {i}");
    }
}

#[test]
fn retry_after_pauses_every_task() {
    let srv = server::start(Config { transient_faults: true, ..Config::default() });
    let sb = Sandbox::new();
    corpus(&sb, 30);
    sb.write("wf.yaml", workflow(&srv.base_url(), "    limits: { max_in_flight: 8 }", ", max_failures: 1.0"));
    assert_eq!(sb.flow(&["run", "wf.yaml", "--only", "chunk"]).code, 0);
    let r = sb.flow(&["run", "wf.yaml", "--only", "generate"]);
    assert_eq!(r.code, 0, "{}", r.all());
    let log = srv.log.entries();
    let throttles: Vec<Instant> = log.iter().filter(|e| e.outcome == "429").map(|e| e.received).collect();
    assert!(!throttles.is_empty());
    // After a 429 with Retry-After: 1, nobody sends for a second (requests already on the wire aside).
    for t in &throttles {
        let during = log
            .iter()
            .filter(|e| e.received > *t + Duration::from_millis(150) && e.received < *t + Duration::from_millis(900))
            .count();
        assert_eq!(during, 0, "requests arrived during a Retry-After pause");
    }
}

#[test]
fn prose_answers_without_json_mode_still_parse() {
    let srv = server::start(Config { prose: true, ..Config::default() });
    let sb = Sandbox::new();
    corpus(&sb, 10);
    sb.write("wf.yaml", workflow(&srv.base_url(), "    json_schema: false", ""));
    let r = sb.flow(&["run", "wf.yaml"]);
    assert_eq!(r.code, 0, "{}", r.all());
    let db = sb.db("t.db");
    assert!(db.scalar("SELECT COUNT(*) FROM queries WHERE status = 'kept'") >= 15);
    assert_eq!(db.scalar("SELECT COUNT(*) FROM judgments WHERE verdict = 'failed'"), 0);
    assert_eq!(db.scalar("SELECT COUNT(*) FROM llm_calls WHERE request LIKE '%response_format%'"), 0);
}

#[test]
fn kill_9_mid_generate_then_resume_sends_nothing_twice() {
    let srv = server::start(Config { latency: Duration::from_millis(100), ..Config::default() });
    let sb = Sandbox::new();
    corpus(&sb, 200);
    sb.write("wf.yaml", workflow(&srv.base_url(), "    limits: { max_in_flight: 4 }", ""));
    assert_eq!(sb.flow(&["run", "wf.yaml", "--only", "chunk"]).code, 0);
    let db = sb.db("t.db");
    let mut child = sb.cmd(&["run", "wf.yaml", "--quiet"]).spawn().unwrap();
    let t = Instant::now();
    while db.try_scalar("SELECT COUNT(*) FROM generations").unwrap_or(0) < 40 {
        assert!(t.elapsed() < Duration::from_secs(60), "generate never got going");
        std::thread::sleep(Duration::from_millis(10));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let killed_at = Instant::now();
    let done_before = db.scalar("SELECT COUNT(*) FROM generations");
    assert!(done_before < 200);

    let r = sb.flow(&["resume", "-w", "wf.yaml"]);
    assert_eq!(r.code, 0, "{}", r.all());
    assert_eq!(db.scalar("SELECT COUNT(*) FROM generations WHERE status = 'done'"), 200);
    assert_eq!(db.scalar("SELECT COUNT(DISTINCT chunk_id) FROM queries"), 200, "every chunk has its queries");
    // A request may reach the server twice only if it was on the wire when the process died.
    let log = srv.log.entries();
    let mut first: HashMap<u64, Instant> = HashMap::new();
    let mut repeats = 0;
    for e in log.iter().filter(|e| e.path == "chat") {
        if let Some(t0) = first.get(&e.hash) {
            repeats += 1;
            assert!(*t0 + Duration::from_secs(2) > killed_at, "a request answered long before the kill was sent again");
        } else {
            first.insert(e.hash, e.received);
        }
    }
    assert!(repeats <= 4, "{repeats} repeated requests; at most the 4 in flight at the kill");
}

#[test]
fn embeddings_through_the_client_with_retries_and_cache() {
    let srv = server::start(Config { transient_faults: true, ..Config::default() });
    let sb = Sandbox::new();
    sb.write("wf.yaml", workflow(&srv.base_url(), "", ""));
    let wf = flow::stages::load_workflow(&sb.path("wf.yaml")).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let store = flow::store::Store::open(&sb.path("t.db")).await.unwrap();
        let provider = flow::llm::embedding_provider(&wf, "llm").unwrap();
        let client =
            flow::llm::client(&wf, "llm", provider.identity(), &store, &flow::llm::Account::outside("test")).unwrap();
        let mut all = Vec::new();
        for batch in 0..20 {
            let texts: Vec<String> = (0..5).map(|i| format!("text {batch} {i}")).collect();
            let v = client.embed(provider.as_ref(), &texts).await.unwrap().expect("retried into success");
            assert_eq!(v.len(), 5);
            assert!(v.iter().all(|e| e.len() == 8));
            all.push((texts, v));
        }
        let sent = srv.log.entries().len();
        for (texts, v) in &all {
            assert_eq!(&client.embed(provider.as_ref(), texts).await.unwrap().unwrap(), v);
        }
        assert_eq!(srv.log.entries().len(), sent, "second pass comes from the cache");
        assert_eq!(client.usage().cached, 20);
    });
}

#[test]
fn a_workflow_of_name_store_llm_and_four_stage_lines_runs_on_built_in_prompts() {
    let srv = server::start(Config::default());
    let sb = Sandbox::new();
    corpus(&sb, 40);
    let short = |generate: &str| {
        format!(
            "name: short\nstore: s.db\nmodels:\n  llm: {{ provider: openai, model: test-model, base_url: \"{}\" }}\nstages:\n  chunk: {{ kind: chunk, corpus: docs }}\n  generate: {{ kind: generate, needs: chunk{generate} }}\n  judge: {{ kind: judge, needs: generate }}\n  train: {{ kind: train, needs: judge }}\n",
            srv.base_url()
        )
    };
    sb.write("wf.yaml", short(""));
    let run = |sb: &Sandbox| -> crate::harness::Ran {
        sb.cmd(&["run", "wf.yaml"]).env("OPENAI_API_KEY", "sk-test").output().unwrap().into()
    };
    let r = run(&sb);
    assert_eq!(r.code, 0, "{}", r.all());
    let db = sb.db("s.db");
    // The built-in API prompts went out, the default embedder trained beside the default black box.
    let builtin = db.scalar(
        "SELECT COUNT(*) FROM llm_calls WHERE request LIKE '%You write search queries for a retrieval system%'",
    );
    assert_eq!(builtin, 40, "one generate call per chunk with the built-in generate_queries.j2");
    assert!(db.scalar("SELECT COUNT(*) FROM llm_calls WHERE request LIKE '%You judge search queries%'") > 0);
    assert_eq!(db.scalar("SELECT COUNT(*) FROM models"), 1, "{}", r.all());
    assert_eq!(run(&sb).code, 0);
    let calls = db.scalar("SELECT COUNT(*) FROM llm_calls");

    // A prompt file of the user's wins, and is part of the settings: generate runs again with it.
    let mine = include_str!("../../prompts/generate_queries.j2")
        .replace("You write search queries", "You write short search queries");
    sb.write("mine.j2", mine);
    sb.write("wf.yaml", short(", prompt: mine.j2"));
    let r = run(&sb);
    assert_eq!(r.code, 0, "{}", r.all());
    assert_eq!(db.scalar("SELECT COUNT(*) FROM llm_calls WHERE request LIKE '%You write short search queries%'"), 40);
    assert!(db.scalar("SELECT COUNT(*) FROM llm_calls") > calls + 40 - 1);
}

#[test]
fn a_budget_of_n_requests_pays_exactly_n_and_a_resume_with_a_larger_one_finishes_the_rest() {
    let srv = server::start(Config { latency: Duration::from_millis(30), ..Config::default() });
    let sb = Sandbox::new();
    corpus(&sb, 30);
    sb.write("wf.yaml", workflow(&srv.base_url(), "", ", budget: { max_requests: 7 }"));
    let r = sb.flow(&["run", "wf.yaml"]);
    assert_eq!(r.code, 3, "a budget stop exits 3: {}", r.all());
    assert!(r.all().contains("stopped (budget)"), "{}", r.all());
    // Requests in flight counted when sent: exactly seven reached the server, none after.
    assert_eq!(srv.log.entries().len(), 7);
    let db = sb.db("t.db");
    let why = db.text("SELECT stop_reason FROM runs");
    assert!(why.starts_with("budget: the budget of stage `generate` (max_requests 7)"), "{why}");
    assert_eq!(db.scalar("SELECT llm_calls FROM stage_runs WHERE stage = 'generate'"), 7);
    let s = status(&sb);
    assert_eq!(s["status"], "stopped (budget)");
    assert_eq!(stage(&s, "generate")["status"], "interrupted");
    assert!(s["stages"].as_array().unwrap().iter().all(|x| x["stage"] != "judge"), "judge never started");
    let runs = sb.flow(&["runs", "-w", "wf.yaml", "--json"]);
    let runs: serde_json::Value = serde_json::from_str(&runs.stdout).unwrap();
    assert_eq!(runs[0]["status"], "stopped (budget)");
    assert!(runs[0]["cost"].as_f64().unwrap() > 0.0, "the run's cost is shown: {runs}");
    let text = sb.flow(&["status", "-w", "wf.yaml"]).stdout;
    assert!(text.contains("generate interrupted: the budget of stage `generate`"), "{text}");

    // Seven is still the cap: a resume spends nothing more and stops again at once.
    let again = sb.flow(&["resume", "-w", "wf.yaml"]);
    assert_eq!(again.code, 3, "{}", again.all());
    assert_eq!(srv.log.entries().len(), 7, "the earlier attempt's requests count against the budget");

    sb.write("wf.yaml", workflow(&srv.base_url(), "", ", budget: { max_requests: 1000 }"));
    let done = sb.flow(&["resume", "-w", "wf.yaml"]);
    assert_eq!(done.code, 0, "{}", done.all());
    assert_eq!(db.scalar("SELECT COUNT(*) FROM generations WHERE status = 'done'"), 30);
    let log = srv.log.entries();
    let distinct: std::collections::HashSet<u64> = log.iter().map(|e| e.hash).collect();
    assert_eq!(distinct.len(), log.len(), "a request was paid for twice");
    // Every generate request of the run in the totals, across its three attempts.
    assert_eq!(db.scalar("SELECT llm_calls + earlier_calls FROM stage_runs WHERE stage = 'generate'"), 30);
}

#[test]
fn a_run_level_token_budget_stops_before_crossing_it() {
    let srv = server::start(Config::default());
    let sb = Sandbox::new();
    corpus(&sb, 30);
    let wf = workflow(&srv.base_url(), "", "").replace("stages:\n", "budget: { max_tokens: 4000 }\nstages:\n");
    sb.write("wf.yaml", wf);
    let r = sb.flow(&["run", "wf.yaml"]);
    assert_eq!(r.code, 3, "{}", r.all());
    let db = sb.db("t.db");
    assert!(db.text("SELECT stop_reason FROM runs").contains("the run (max_tokens 4000)"));
    let used = db.scalar("SELECT SUM(prompt_tokens + completion_tokens) FROM stage_runs");
    assert!(used > 0 && used <= 4000, "{used} tokens against a cap of 4000");
}

#[test]
fn kinds_of_query_are_asked_stored_shown_and_part_of_the_settings() {
    let srv = server::start(Config::default());
    let sb = Sandbox::new();
    corpus(&sb, 10);
    let kinds = |k: &str| workflow(&srv.base_url(), "", &format!(", kinds: {k}"));
    sb.write("wf.yaml", kinds("{ question: 2, keywords: 1, claim: 1 }"));
    let run = |sb: &Sandbox| -> crate::harness::Ran {
        sb.cmd(&["run", "wf.yaml"]).env("OPENAI_API_KEY", "sk-test").output().unwrap().into()
    };
    let r = run(&sb);
    assert_eq!(r.code, 0, "{}", r.all());
    let db = sb.db("t.db");
    assert_eq!(db.scalar("SELECT COUNT(*) FROM llm_calls WHERE request LIKE '%keyword quer%'"), 10);
    assert_eq!(db.scalar("SELECT COUNT(*) FROM llm_calls WHERE request LIKE '%different claim%'"), 10);
    let by_kind = |k: &str| {
        db.scalar(&format!(
            "SELECT COUNT(*) FROM queries WHERE kind = '{k}' AND status = 'kept' AND superseded_at IS NULL"
        ))
    };
    // One keyword query and one claim per chunk (the server offers two of each), up to two questions.
    assert_eq!((by_kind("keywords"), by_kind("claim")), (10, 10));
    assert!((15..=20).contains(&by_kind("question")), "{}", by_kind("question"));
    // The judge is told which kind it judges.
    assert!(db.scalar("SELECT COUNT(*) FROM llm_calls WHERE request LIKE '%Query (keywords)%'") >= 10);
    let pairs = sb.cmd(&["pairs", "-w", "wf.yaml", "--limit", "100"]).output().unwrap();
    let shown = String::from_utf8_lossy(&pairs.stdout);
    assert!(shown.contains("keywords") && shown.contains("claim"), "{shown}");

    // Questions only: a new setting, so generate runs again, and its question requests are the
    // same bodies as before (answered from the cache).
    let calls = db.scalar("SELECT COUNT(*) FROM llm_calls");
    sb.write("wf.yaml", kinds("[question]"));
    let r = run(&sb);
    assert_eq!(r.code, 0, "{}", r.all());
    assert_eq!(by_kind("keywords") + by_kind("claim"), 0, "the other kinds are superseded");
    assert!(by_kind("question") >= 15);
    let generate_calls = db.scalar("SELECT COUNT(*) FROM llm_calls WHERE request LIKE '%You write search queries%'");
    assert_eq!(generate_calls, 30, "no generate request was sent again");
    assert!(db.scalar("SELECT COUNT(*) FROM llm_calls") >= calls);
}
