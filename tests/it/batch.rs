//! `batch:` against the loopback server's files and batches: answers come through the Batch API at
//! the batch price; a run killed mid-poll attaches to its batch; failed and expired requests fall
//! back to live calls or to a new batch.

use std::time::{Duration, Instant};

use crate::harness::Sandbox;
use crate::llm::{corpus, workflow};
use crate::openai_server::{self as server, Config};

/// The test workflow with batches on (`extra` goes into `batch:`; 12 requests a batch unless it
/// says), 30 one-chunk records.
fn setup(cfg: Config, extra: &str) -> (server::Server, Sandbox) {
    let extra = if extra.contains("max_requests") { extra.to_string() } else { format!(", max_requests: 12{extra}") };
    let srv = server::start(cfg);
    let sb = Sandbox::new();
    corpus(&sb, 30);
    let model = format!(
        "    batch: {{ poll_s: 0.1{extra} }}\n    batch_price: {{ prompt_per_mtok: 0.075, completion_per_mtok: 0.3 }}"
    );
    sb.write("wf.yaml", workflow(&srv.base_url(), &model, ""));
    (srv, sb)
}

fn created(srv: &server::Server) -> usize {
    srv.log.count("batches.create")
}

#[test]
fn a_batch_answers_every_request_at_the_batch_price_and_a_rerun_pays_nothing() {
    let (srv, sb) = setup(Config::default(), "");
    let r = sb.flow(&["run", "wf.yaml"]);
    assert_eq!(r.code, 0, "{}", r.all());
    assert_eq!(srv.log.count("chat"), 0, "nothing went live");
    let db = sb.db("t.db");
    assert_eq!(db.scalar("SELECT COUNT(*) FROM generations WHERE status = 'done'"), 30);
    let judged = db.scalar("SELECT COUNT(*) FROM judgments");
    assert!(judged > 40, "{judged}");
    // 30 generate requests in batches of at most 12, then the judge's.
    assert_eq!(db.scalar("SELECT COUNT(*) FROM batches WHERE stage = 'generate'"), 3);
    assert_eq!(db.scalar("SELECT MAX(requests) FROM batches"), 12);
    assert_eq!(created(&srv) as i64, db.scalar("SELECT COUNT(*) FROM batches"));
    assert_eq!(db.scalar("SELECT COUNT(*) FROM batches WHERE status != 'completed' OR ingested_at IS NULL"), 0);
    // Accounted as live calls would be, at the batch price.
    assert_eq!(db.scalar("SELECT llm_calls FROM stage_runs WHERE stage = 'generate'"), 30);
    assert_eq!(db.scalar("SELECT llm_cached FROM stage_runs WHERE stage = 'generate'"), 0);
    let (p, c) = (
        db.scalar("SELECT prompt_tokens FROM stage_runs WHERE stage = 'generate'") as f64,
        db.scalar("SELECT completion_tokens FROM stage_runs WHERE stage = 'generate'") as f64,
    );
    let cost = db.real("SELECT cost FROM stage_runs WHERE stage = 'generate'");
    assert!((cost - (p * 0.075 + c * 0.3) / 1e6).abs() < 1e-12, "{cost} is not the batch price of {p} + {c} tokens");
    let st = sb.flow(&["status", "-w", "wf.yaml"]).stdout;
    assert!(st.contains("batch_1") && st.contains("completed"), "{st}");

    let before = srv.log.entries().len();
    sb.write("wf.yaml", std::fs::read_to_string(sb.path("wf.yaml")).unwrap().replace("min_score: 3", "min_score: 4"));
    let again = sb.flow(&["run", "wf.yaml"]);
    assert_eq!(again.code, 0, "{}", again.all());
    assert_eq!(srv.log.entries().len(), before, "a threshold change re-decides stored scores: no request, no batch");
}

#[test]
fn a_run_killed_mid_poll_attaches_to_its_batch_instead_of_sending_it_again() {
    let cfg = Config { batch_delay: Duration::from_secs(4), ..Config::default() };
    let (srv, sb) = setup(cfg, ", max_requests: 100");
    let mut child = sb.cmd(&["run", "wf.yaml", "--quiet"]).spawn().unwrap();
    let t0 = Instant::now();
    while srv.log.count("batches.get") < 2 {
        assert!(t0.elapsed() < Duration::from_secs(60), "no batch was polled");
        std::thread::sleep(Duration::from_millis(50));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert_eq!(created(&srv), 1);
    // As if the kill came between creating the batch and writing its id down: the row knows only
    // its uploaded file, and the batch is found by listing the API's batches.
    let db = sb.db("t.db");
    db.execute("UPDATE batches SET status = 'uploaded', batch_id = NULL");
    let r = sb.flow(&["resume", "-w", "wf.yaml"]);
    assert_eq!(r.code, 0, "{}", r.all());
    assert!(r.stderr.contains("attaching to batch #1"), "{}", r.stderr);
    assert!(r.stderr.contains("was already created as \"batch_1\""), "{}", r.stderr);
    assert!(srv.log.count("batches.list") >= 1);
    let db = sb.db("t.db");
    assert_eq!(db.scalar("SELECT COUNT(*) FROM batches WHERE stage = 'generate'"), 1, "generate's batch was made once");
    let generate_creates = srv.log.entries().iter().filter(|e| e.path == "batches.create").count();
    assert_eq!(generate_creates as i64, db.scalar("SELECT COUNT(*) FROM batches"), "no batch created twice");
    assert_eq!(srv.log.count("files"), created(&srv), "one upload per batch");
    assert_eq!(srv.log.count("chat"), 0);
    assert_eq!(db.scalar("SELECT COUNT(*) FROM generations WHERE status = 'done'"), 30);
    assert_eq!(
        db.scalar("SELECT COUNT(DISTINCT request_hash) FROM llm_calls"),
        db.scalar("SELECT COUNT(*) FROM llm_calls")
    );
    // The resumed stage counted the 30 answers its batch brought, and no earlier attempt did.
    assert_eq!(db.scalar("SELECT llm_calls + earlier_calls FROM stage_runs WHERE stage = 'generate'"), 30);
}

#[test]
fn requests_a_batch_failed_are_sent_live() {
    let (srv, sb) = setup(Config { batch_fail_every: 4, ..Config::default() }, "");
    let r = sb.flow(&["run", "wf.yaml"]);
    assert_eq!(r.code, 0, "{}", r.all());
    let db = sb.db("t.db");
    let failed = db.scalar("SELECT SUM(failed) FROM batches WHERE stage = 'generate'");
    assert!(failed > 0, "the server failed some requests");
    assert_eq!(db.scalar("SELECT COUNT(*) FROM generations WHERE status = 'done'"), 30);
    let live = srv.log.entries().iter().filter(|e| e.path == "chat").count() as i64;
    let all_failed = db.scalar("SELECT SUM(failed) FROM batches");
    assert_eq!(live, all_failed, "each failed request went live once");
    assert!(r.stderr.contains("not answered"), "{}", r.stderr);
}

#[test]
fn an_expired_batchs_rest_goes_in_a_new_batch() {
    let (srv, sb) =
        setup(Config { batch_expire_first: true, ..Config::default() }, ", max_requests: 100, fallback: batch");
    let r = sb.flow(&["run", "wf.yaml"]);
    assert_eq!(r.code, 0, "{}", r.all());
    let db = sb.db("t.db");
    assert_eq!(db.text("SELECT status FROM batches ORDER BY id LIMIT 1"), "expired");
    assert!(db.scalar("SELECT ingested_at FROM batches ORDER BY id LIMIT 1") > 0);
    assert_eq!(db.scalar("SELECT completed FROM batches ORDER BY id LIMIT 1"), 15, "half of the 30 before it expired");
    assert_eq!(db.scalar("SELECT requests FROM batches WHERE stage = 'generate' ORDER BY id LIMIT 1 OFFSET 1"), 15);
    assert_eq!(srv.log.count("chat"), 0, "fallback: batch sends nothing live");
    assert_eq!(db.scalar("SELECT COUNT(*) FROM generations WHERE status = 'done'"), 30);
    let st = sb.flow(&["status", "-w", "wf.yaml", "--json"]).stdout;
    let st: serde_json::Value = serde_json::from_str(&st).unwrap();
    assert_eq!(st["batches"][0]["status"], "expired", "{st}");
}

#[test]
fn batch_settings_are_checked_before_anything_runs() {
    let sb = Sandbox::new();
    corpus(&sb, 2);
    let wf = workflow("http://127.0.0.1:9/v1", "    batch: { poll_s: 0, max_requests: 10 }", "").replace(
        "  black_box: { provider: local, model: all-MiniLM-L6-v2 }",
        "  black_box: { provider: local, model: all-MiniLM-L6-v2, batch: true }",
    );
    sb.write("wf.yaml", wf);
    let r = sb.flow(&["validate", "wf.yaml"]);
    assert_eq!(r.code, 2, "{}", r.all());
    let out = r.all();
    assert!(out.contains("`models.black_box.batch`: a local model has no Batch API"), "{out}");
    assert!(out.contains("`models.llm.batch`: poll_s, max_requests and max_bytes must be positive"), "{out}");
    assert!(out.contains("wf.yaml:"), "with the place: {out}");
}
