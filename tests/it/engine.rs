//! The engine through the CLI: up-to-date skips, --force/--only/--from, failure isolation,
//! resume after a failure and after kill -9, and the run lock.

use std::time::{Duration, Instant};

use crate::harness::{Sandbox, prose};

fn workflow(stages: &str) -> String {
    format!(
        "name: t\nstore: t.db\nmodels:\n  black_box: {{ provider: local, model: all-MiniLM-L6-v2 }}\nstages:\n{stages}"
    )
}

fn status_json(sb: &Sandbox) -> serde_json::Value {
    let r = sb.flow(&["status", "--json", "-w", "wf.yaml"]);
    assert_eq!(r.code, 0, "{}", r.all());
    serde_json::from_str(&r.stdout).unwrap()
}

fn stage<'a>(status: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    status["stages"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["stage"] == name)
        .unwrap_or_else(|| panic!("no stage {name}"))
}

fn small_corpus(sb: &Sandbox, n: usize) {
    for i in 0..n {
        sb.write(&format!("docs/d{i:03}.txt"), prose(i as u64, 12));
    }
}

#[test]
fn up_to_date_then_force_does_no_rework() {
    let sb = Sandbox::new();
    small_corpus(&sb, 5);
    sb.write("wf.yaml", workflow("  chunk: { kind: chunk, corpus: docs, max_tokens: 64, overlap: 8 }\n"));
    let first = sb.flow(&["run", "wf.yaml"]);
    assert_eq!(first.code, 0, "{}", first.all());
    let chunks = sb.db("t.db").scalar("SELECT COUNT(*) FROM chunks");
    assert!(chunks > 10);

    let second = sb.flow(&["run", "wf.yaml"]);
    assert_eq!(second.code, 0);
    assert_eq!(stage(&status_json(&sb), "chunk")["status"], "up_to_date", "{}", second.all());

    let forced = sb.flow(&["run", "wf.yaml", "--force", "chunk"]);
    assert_eq!(forced.code, 0);
    let s = status_json(&sb);
    let c = stage(&s, "chunk");
    assert_eq!(c["status"], "succeeded");
    assert_eq!((c["items_done"].as_i64(), c["items_cached"].as_i64()), (Some(0), Some(5)), "{c}");
    assert_eq!(sb.db("t.db").scalar("SELECT COUNT(*) FROM chunks"), chunks);
}

#[test]
fn changed_file_is_recut_and_deleted_file_is_gone() {
    let sb = Sandbox::new();
    small_corpus(&sb, 4);
    sb.write("wf.yaml", workflow("  chunk: { kind: chunk, corpus: docs, max_tokens: 64, overlap: 8 }\n"));
    assert_eq!(sb.flow(&["run", "wf.yaml"]).code, 0);
    let db = sb.db("t.db");
    let kept_id =
        db.scalar("SELECT MIN(c.id) FROM chunks c JOIN documents d ON d.id = c.document_id WHERE d.path = 'd001.txt'");

    // Append a paragraph to d001 (its early chunks keep their ids), delete d002.
    let mut text = prose(1, 12);
    text.push_str("\n\nA brand new closing paragraph about dividends and share repurchases in fiscal 2026.");
    sb.write("docs/d001.txt", text);
    std::fs::remove_file(sb.path("docs/d002.txt")).unwrap();
    let r = sb.flow(&["run", "wf.yaml"]);
    assert_eq!(r.code, 0, "{}", r.all());
    let c = stage(&status_json(&sb), "chunk").clone();
    assert_eq!((c["items_done"].as_i64(), c["items_cached"].as_i64()), (Some(1), Some(2)), "{c}");
    assert_eq!(c["summary"]["gone"], 1);
    assert_eq!(db.scalar("SELECT COUNT(*) FROM documents WHERE path = 'd002.txt' AND status = 'gone'"), 1);
    assert_eq!(
        db.scalar("SELECT COUNT(*) FROM chunks c JOIN documents d ON d.id = c.document_id WHERE d.path = 'd002.txt' AND c.retired_at IS NULL"),
        0
    );
    assert_eq!(db.scalar(&format!("SELECT COUNT(*) FROM chunks WHERE id = {kept_id} AND retired_at IS NULL")), 1);
    assert_eq!(
        db.scalar("SELECT COUNT(*) FROM chunks WHERE text LIKE '%brand new closing paragraph%' AND retired_at IS NULL"),
        1
    );
}

#[test]
fn failing_stage_blocks_downstream_not_independent_then_resume() {
    let sb = Sandbox::new();
    small_corpus(&sb, 3);
    sb.write(
        "wf.yaml",
        workflow(
            "  a: { kind: chunk, corpus: missing, max_tokens: 64, overlap: 8 }\n  b: { kind: chunk, corpus: docs, max_tokens: 64, overlap: 8 }\n  c: { kind: chunk, corpus: docs, needs: [a], max_tokens: 32, overlap: 4 }\n",
        ),
    );
    let r = sb.flow(&["run", "wf.yaml"]);
    // The run fails on bad input (a missing corpus): exit 2, and the independent stage still ran.
    assert_eq!(r.code, 2, "{}", r.all());
    let s = status_json(&sb);
    assert_eq!(s["status"], "failed");
    assert_eq!(stage(&s, "a")["status"], "failed");
    assert!(stage(&s, "a")["error"].as_str().unwrap().contains("corpus `missing` does not exist"));
    assert_eq!(stage(&s, "b")["status"], "succeeded");
    assert_eq!(stage(&s, "c")["status"], "blocked");
    let run_id = s["id"].as_i64().unwrap();

    std::fs::create_dir_all(sb.path("missing")).unwrap();
    sb.write("missing/m.md", "# Note\n\nThe board approved a dividend of 0.42 per share.");
    let r = sb.flow(&["resume", "-w", "wf.yaml"]);
    assert_eq!(r.code, 0, "{}", r.all());
    let s = status_json(&sb);
    assert_eq!(s["id"].as_i64().unwrap(), run_id, "resume continues the same run");
    assert_eq!(s["status"], "succeeded");
    for (name, want) in [("a", "succeeded"), ("b", "succeeded"), ("c", "succeeded")] {
        assert_eq!(stage(&s, name)["status"], want);
    }
    // b finished in the first attempt and was not run again.
    assert!(stage(&s, "b")["finished_at"].as_i64() < stage(&s, "a")["started_at"].as_i64());
    let r = sb.flow(&["resume", "-w", "wf.yaml"]);
    assert_eq!(r.code, 2, "nothing left to resume: {}", r.all());
}

#[test]
fn only_and_from_pick_stages() {
    let sb = Sandbox::new();
    small_corpus(&sb, 2);
    sb.write(
        "wf.yaml",
        workflow("  a: { kind: chunk, corpus: docs, max_tokens: 64, overlap: 8 }\n  b: { kind: chunk, corpus: docs, needs: [a], max_tokens: 32, overlap: 4 }\n"),
    );
    let r = sb.flow(&["run", "wf.yaml", "--only", "b"]);
    assert_eq!(r.code, 2, "b needs a, which never ran: {}", r.all());
    assert!(r.stderr.contains("has never succeeded"), "{}", r.stderr);

    assert_eq!(sb.flow(&["run", "wf.yaml", "--only", "a"]).code, 0);
    let s = status_json(&sb);
    assert_eq!(s["stages"].as_array().unwrap().len(), 1);
    assert_eq!(sb.flow(&["run", "wf.yaml", "--only", "b"]).code, 0);
    assert_eq!(stage(&status_json(&sb), "b")["status"], "succeeded");

    assert_eq!(sb.flow(&["run", "wf.yaml", "--from", "b"]).code, 0);
    let s = status_json(&sb);
    assert_eq!(stage(&s, "a")["status"], "up_to_date");
    assert_eq!(stage(&s, "b")["status"], "succeeded");

    let r = sb.flow(&["run", "wf.yaml", "--force", "nosuch"]);
    assert_eq!(r.code, 2);
    assert!(r.stderr.contains("no stage named `nosuch`"));
}

/// A corpus big enough that chunking takes a few seconds.
fn large_corpus(sb: &Sandbox) {
    for i in 0..600 {
        sb.write(&format!("big/f{i:04}.txt"), prose(1000 + i as u64, 40));
    }
}

fn wait_until(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(t.elapsed() < limit, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn kill_9_mid_chunk_then_resume_matches_a_clean_run() {
    let clean = Sandbox::new();
    large_corpus(&clean);
    clean.write("wf.yaml", workflow("  chunk: { kind: chunk, corpus: big, max_tokens: 128, overlap: 16 }\n"));
    let r = clean.flow(&["run", "wf.yaml", "--quiet"]);
    assert_eq!(r.code, 0, "{}", r.all());
    let clean_db = clean.db("t.db");
    let want_chunks = clean_db.scalar("SELECT COUNT(*) FROM chunks");
    let want_docs = clean_db.scalar("SELECT COUNT(*) FROM documents");

    let sb = Sandbox::new();
    large_corpus(&sb);
    sb.write("wf.yaml", workflow("  chunk: { kind: chunk, corpus: big, max_tokens: 128, overlap: 16 }\n"));
    let mut child = sb.cmd(&["run", "wf.yaml", "--quiet"]).spawn().unwrap();
    let db = sb.db("t.db");
    // The store may not exist or be migrated yet when polling starts.
    let docs = |db: &crate::harness::Db| db.try_scalar("SELECT COUNT(*) FROM documents").unwrap_or(0);
    wait_until("some documents to be stored", Duration::from_secs(120), || docs(&db) > 0);
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let stored = docs(&db);
    assert!(stored > 0 && stored < want_docs, "killed mid-way: {stored} of {want_docs} documents stored");
    let before: i64 = db.scalar("SELECT COALESCE(SUM(updated_at), 0) FROM documents");

    let r = sb.flow(&["resume", "-w", "wf.yaml"]);
    assert_eq!(r.code, 0, "{}", r.all());
    assert!(r.all().contains("marked interrupted") || r.all().contains("took over"), "{}", r.all());
    assert_eq!(db.scalar("SELECT COUNT(*) FROM chunks"), want_chunks);
    assert_eq!(db.scalar("SELECT COUNT(*) FROM documents"), want_docs);
    assert_eq!(
        db.scalar("SELECT COUNT(*) FROM (SELECT document_id, ordinal FROM chunks GROUP BY 1, 2 HAVING COUNT(*) > 1)"),
        0
    );
    // Documents stored before the kill were not written again.
    let after_first: i64 = db.scalar(&format!(
        "SELECT COALESCE(SUM(updated_at), 0) FROM (SELECT updated_at FROM documents ORDER BY id LIMIT {stored})"
    ));
    assert_eq!(after_first, before);
    let s = status_json(&sb);
    assert_eq!(stage(&s, "chunk")["items_cached"].as_i64(), Some(stored), "{}", s);
}

#[test]
fn second_live_run_is_refused_and_a_dead_lock_is_taken_over() {
    let sb = Sandbox::new();
    large_corpus(&sb);
    sb.write("wf.yaml", workflow("  chunk: { kind: chunk, corpus: big, max_tokens: 128, overlap: 16 }\n"));
    let mut child = sb.cmd(&["run", "wf.yaml", "--quiet"]).spawn().unwrap();
    let lock = sb.path("t.db.lock");
    wait_until("the lock", Duration::from_secs(60), || std::fs::read_to_string(&lock).is_ok_and(|s| !s.is_empty()));
    // The lock is taken before the run is recorded; kill only once there is a run to mark interrupted.
    let db = sb.db("t.db");
    wait_until("the run to be recorded", Duration::from_secs(60), || {
        db.try_scalar("SELECT COUNT(*) FROM runs").unwrap_or(0) > 0
    });
    let second = sb.flow(&["run", "wf.yaml"]);
    assert_eq!(second.code, 2, "{}", second.all());
    assert!(second.stderr.contains("is in use by flow run (pid"), "{}", second.stderr);
    child.kill().unwrap();
    child.wait().unwrap();

    let third = sb.flow(&["run", "wf.yaml"]);
    assert_eq!(third.code, 0, "{}", third.all());
    assert!(third.stderr.contains("took over the store lock"), "{}", third.stderr);
    let runs = sb.flow(&["runs", "--json", "-w", "wf.yaml"]);
    let v: serde_json::Value = serde_json::from_str(&runs.stdout).unwrap();
    assert_eq!(v[0]["status"], "succeeded");
    assert_eq!(v[1]["status"], "interrupted");
}

#[test]
fn missing_model_says_where_it_looked_and_how_to_fetch() {
    let sb = Sandbox::new();
    small_corpus(&sb, 1);
    sb.write(
        "wf.yaml",
        "name: t\nstore: t.db\nmodels:\n  black_box: { provider: local, model: no-such-model }\nstages:\n  chunk: { kind: chunk, corpus: docs }\n",
    );
    let r = sb.flow(&["run", "wf.yaml"]);
    assert_eq!(r.code, 2, "{}", r.all());
    assert!(r.stderr.contains("model 'no-such-model' not found"), "{}", r.stderr);
    assert!(
        r.stderr.contains(&format!("{}", crate::harness::models_dir().join("no-such-model").display())),
        "{}",
        r.stderr
    );
    assert!(r.stderr.contains("flow models pull"), "{}", r.stderr);

    sb.write("tok/tokenizer.json", "{ not json");
    sb.write(
        "wf.yaml",
        "name: t\nstore: t.db\nstages:\n  chunk: { kind: chunk, corpus: docs, tokenizer: tok/tokenizer.json }\n",
    );
    let r = sb.flow(&["run", "wf.yaml"]);
    assert_eq!(r.code, 2, "{}", r.all());
    assert!(r.stderr.contains("cannot load tokenizer") && r.stderr.contains("tok/tokenizer.json"), "{}", r.stderr);
}

#[test]
fn plain_progress_without_escape_codes_and_quiet() {
    let sb = Sandbox::new();
    small_corpus(&sb, 2);
    sb.write("wf.yaml", workflow("  chunk: { kind: chunk, corpus: docs }\n"));
    let r = sb.flow(&["run", "wf.yaml"]);
    assert_eq!(r.code, 0);
    assert!(r.stderr.contains("[chunk] succeeded"), "{}", r.stderr);
    assert!(!r.stderr.contains('\x1b'), "no terminal escapes when stderr is not a terminal");
    let q = sb.flow(&["run", "wf.yaml", "--force", "chunk", "--quiet"]);
    assert_eq!((q.code, q.stderr.as_str(), q.stdout.as_str()), (0, "", ""));
}

#[test]
fn pairs_view_filters_by_verdict() {
    let sb = Sandbox::new();
    small_corpus(&sb, 1);
    sb.write("wf.yaml", workflow("  chunk: { kind: chunk, corpus: docs }\n"));
    assert_eq!(sb.flow(&["run", "wf.yaml"]).code, 0);
    let db = sb.db("t.db");
    db.execute(
        "INSERT INTO queries (chunk_id, stage, text, model, prompt_hash, created_at)
             SELECT id, 'generate', 'What drove cloud revenue?', 'm', 'h', 1 FROM chunks ORDER BY id LIMIT 1;
         INSERT INTO queries (chunk_id, stage, text, model, prompt_hash, created_at)
             SELECT id, 'generate', 'What does the passage say?', 'm', 'h', 2 FROM chunks ORDER BY id LIMIT 1;
         INSERT INTO judgments (query_id, stage, score, verdict, reason, model, created_at)
             VALUES (1, 'judge', 5, 'accepted', 'specific', 'm', 3), (2, 'judge', 1, 'rejected', 'leans on the passage', 'm', 3);",
    );
    let r = sb.flow(&["pairs", "-w", "wf.yaml", "--verdict", "rejected", "--json"]);
    assert_eq!(r.code, 0, "{}", r.all());
    let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(v.as_array().unwrap().len(), 1);
    assert_eq!(v[0]["query"], "What does the passage say?");
    assert_eq!(v[0]["reason"], "leans on the passage");
    assert_eq!(v[0]["document"], "d000.txt");
    let all = sb.flow(&["pairs", "-w", "wf.yaml"]);
    assert!(all.stdout.contains("[accepted score 5] (question) What drove cloud revenue?"), "{}", all.stdout);
}

#[test]
fn model_names_resolve_through_the_hugging_face_cache() {
    let sb = Sandbox::new();
    small_corpus(&sb, 1);
    let snap = sb.path("hf/hub/models--sentence-transformers--all-MiniLM-L6-v2/snapshots/abc123");
    std::fs::create_dir_all(&snap).unwrap();
    std::fs::copy(crate::harness::models_dir().join("all-MiniLM-L6-v2/tokenizer.json"), snap.join("tokenizer.json"))
        .unwrap();
    sb.write("hf/hub/models--sentence-transformers--all-MiniLM-L6-v2/refs/main", "abc123");
    sb.write(
        "wf.yaml",
        "name: t\nstore: t.db\nmodels:\n  black_box: { provider: local, model: sentence-transformers/all-MiniLM-L6-v2 }\nstages:\n  chunk: { kind: chunk, corpus: docs }\n",
    );
    let r = sb
        .cmd(&["run", "wf.yaml"])
        .env("HF_HOME", sb.path("hf"))
        .env("FLOW_MODELS", sb.path("empty"))
        .output()
        .unwrap();
    let r: crate::harness::Ran = r.into();
    assert_eq!(r.code, 0, "{}", r.all());
    assert!(sb.db("t.db").scalar("SELECT COUNT(*) FROM chunks") > 0);
}

#[test]
fn the_fingerprint_covers_defaults_so_a_changed_default_reruns() {
    let sb = Sandbox::new();
    small_corpus(&sb, 3);
    // `overlap` left out: the stage runs with its default (32) and the fingerprint hashes that value.
    sb.write("wf.yaml", workflow("  chunk: { kind: chunk, corpus: docs, max_tokens: 64 }\n"));
    assert_eq!(sb.flow(&["run", "wf.yaml"]).code, 0);
    // Writing the default out is the same setting: up to date.
    sb.write("wf.yaml", workflow("  chunk: { kind: chunk, corpus: docs, max_tokens: 64, overlap: 32 }\n"));
    let same = sb.flow(&["run", "wf.yaml"]);
    assert_eq!(same.code, 0, "{}", same.all());
    assert_eq!(stage(&status_json(&sb), "chunk")["status"], "up_to_date", "{}", same.all());
    // A different value, as a new default would be, runs the stage again.
    sb.write("wf.yaml", workflow("  chunk: { kind: chunk, corpus: docs, max_tokens: 64, overlap: 16 }\n"));
    let changed = sb.flow(&["run", "wf.yaml"]);
    assert_eq!(changed.code, 0, "{}", changed.all());
    assert_eq!(stage(&status_json(&sb), "chunk")["status"], "succeeded", "{}", changed.all());
}
