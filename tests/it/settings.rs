//! Results belong to the settings that made them: a changed model, prompt, `per_chunk` or
//! temperature makes new questions (the old ones superseded), a changed `min_score` decides stored
//! scores again with no call, and a reply that did not parse is asked again on resume.

use crate::harness::{Sandbox, prose};
use crate::openai_server::{self as server, Config};

fn corpus(sb: &Sandbox, n: usize) {
    let lines: Vec<String> = (0..n)
        .map(|i| serde_json::json!({"id": format!("r{i}"), "text": prose(900 + i as u64, 1)}).to_string())
        .collect();
    sb.write("docs/records.jsonl", lines.join("\n"));
}

struct Settings<'a> {
    model: &'a str,
    prompt: &'a str,
    judge_prompt: &'a str,
    per_chunk: u32,
    temperature: f32,
    min_score: i64,
}

const BASE: Settings = Settings {
    model: "test-model",
    prompt: "generate.j2",
    judge_prompt: "judge.j2",
    per_chunk: 2,
    temperature: 0.7,
    min_score: 3,
};

fn write(sb: &Sandbox, base_url: &str, s: &Settings) {
    sb.write(
        "wf.yaml",
        format!(
            "name: t
store: t.db
models:
  black_box: {{ provider: local, model: all-MiniLM-L6-v2 }}
  llm: {{ provider: openai, model: {model}, base_url: {base_url}, timeout_s: 5 }}
stages:
  chunk: {{ kind: chunk, corpus: docs, max_tokens: 200, overlap: 0 }}
  generate: {{ kind: generate, needs: [chunk], prompt: {prompt}, per_chunk: {n}, temperature: {t} }}
  judge: {{ kind: judge, needs: [generate], prompt: {judge}, min_score: {min} }}
",
            model = s.model,
            prompt = s.prompt,
            judge = s.judge_prompt,
            n = s.per_chunk,
            t = s.temperature,
            min = s.min_score,
        ),
    );
}

fn prompts(sb: &Sandbox) {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/prompts");
    let generate = std::fs::read_to_string(format!("{dir}/generate_queries.j2")).unwrap();
    let judge = std::fs::read_to_string(format!("{dir}/judge.j2")).unwrap();
    sb.write("generate.j2", &generate);
    sb.write("generate2.j2", format!("{generate}\nPrefer questions about figures."));
    sb.write("judge.j2", &judge);
    sb.write("judge2.j2", format!("{judge}\nBe strict about specificity."));
}

fn chat_requests(srv: &server::Server) -> usize {
    srv.log.entries().iter().filter(|e| e.path == "chat").count()
}

fn run(sb: &Sandbox) {
    let r = sb.flow(&["run", "wf.yaml"]);
    assert_eq!(r.code, 0, "{}", r.all());
}

#[test]
fn each_generate_setting_makes_new_questions_and_supersedes_the_old() {
    let srv = server::start(Config::default());
    let sb = Sandbox::new();
    corpus(&sb, 6);
    prompts(&sb);
    write(&sb, &srv.base_url(), &BASE);
    run(&sb);
    let db = sb.db("t.db");
    let chunks = db.scalar("SELECT COUNT(*) FROM chunks");
    assert_eq!(chunks, 6);
    let changes = [
        ("models.llm", Settings { model: "test-model-2", ..BASE }),
        ("prompt", Settings { prompt: "generate2.j2", ..BASE }),
        ("per_chunk", Settings { per_chunk: 3, ..BASE }),
        ("temperature", Settings { temperature: 0.2, ..BASE }),
    ];
    for (what, s) in changes {
        let current_before = db.scalar("SELECT COUNT(*) FROM queries WHERE superseded_at IS NULL");
        let before = chat_requests(&srv);
        write(&sb, &srv.base_url(), &s);
        run(&sb);
        let generate_calls = db.scalar("SELECT COUNT(*) FROM generations WHERE status = 'done'") as usize;
        assert!(chat_requests(&srv) - before >= chunks as usize, "{what}: every chunk is asked again");
        // The questions of the earlier settings are kept but out of use; the pairs are the new ones'.
        let superseded = db.scalar("SELECT COUNT(*) FROM queries WHERE superseded_at IS NOT NULL");
        assert!(superseded >= current_before, "{what}: {superseded} superseded of {current_before}");
        let current = db.scalar("SELECT COUNT(*) FROM queries WHERE superseded_at IS NULL AND status = 'kept'");
        assert_eq!(db.scalar("SELECT COUNT(*) FROM pairs"), current, "{what}");
        assert_eq!(
            db.scalar("SELECT COUNT(*) FROM pairs WHERE verdict = 'unjudged'"),
            0,
            "{what}: the judge judged the new questions"
        );
        assert!(generate_calls >= 2 * chunks as usize, "{what}");
        // Back to the first settings: their results are current again, from the store, for free.
        let before = chat_requests(&srv);
        write(&sb, &srv.base_url(), &BASE);
        run(&sb);
        assert_eq!(chat_requests(&srv), before, "{what}: going back costs no request");
        let first = db.scalar("SELECT COUNT(*) FROM queries WHERE superseded_at IS NULL AND status = 'kept'");
        assert_eq!(db.scalar("SELECT COUNT(*) FROM pairs"), first);
    }
}

#[test]
fn min_score_decides_stored_scores_again_and_a_new_rubric_asks_the_judge_again() {
    let srv = server::start(Config::default());
    let sb = Sandbox::new();
    corpus(&sb, 8);
    prompts(&sb);
    write(&sb, &srv.base_url(), &BASE);
    run(&sb);
    let db = sb.db("t.db");
    let judged = db.scalar("SELECT COUNT(*) FROM pairs WHERE verdict IN ('accepted', 'rejected')");
    assert!(judged > 8, "{judged}");
    let at_least = |m: i64| db.scalar(&format!("SELECT COUNT(*) FROM pairs WHERE score >= {m}"));
    assert_eq!(db.scalar("SELECT COUNT(*) FROM pairs WHERE verdict = 'accepted'"), at_least(3));

    for min in [5, 1, 3] {
        let before = chat_requests(&srv);
        write(&sb, &srv.base_url(), &Settings { min_score: min, ..BASE });
        run(&sb);
        assert_eq!(chat_requests(&srv), before, "min_score {min}: no call");
        assert_eq!(
            db.scalar("SELECT COUNT(*) FROM pairs WHERE verdict = 'accepted'"),
            at_least(min),
            "min_score {min}"
        );
        assert_eq!(db.scalar("SELECT COUNT(*) FROM pairs WHERE verdict = 'rejected'"), judged - at_least(min));
    }

    // A new rubric: every current question is judged again, no question is generated again.
    let before = chat_requests(&srv);
    write(&sb, &srv.base_url(), &Settings { judge_prompt: "judge2.j2", ..BASE });
    run(&sb);
    assert_eq!(chat_requests(&srv) - before, judged as usize);
    assert_eq!(db.scalar("SELECT COUNT(*) FROM judgments WHERE superseded_at IS NOT NULL"), judged);
    assert_eq!(db.scalar("SELECT COUNT(*) FROM queries WHERE superseded_at IS NOT NULL"), 0);
}

#[test]
fn a_reply_cut_off_mid_json_is_not_cached_and_is_asked_again_in_the_same_run() {
    let srv = server::start(Config { truncate_first: true, ..Config::default() });
    let sb = Sandbox::new();
    corpus(&sb, 40);
    prompts(&sb);
    write(&sb, &srv.base_url(), &BASE);
    let r = sb.flow(&["run", "wf.yaml"]);
    let db = sb.db("t.db");
    let truncated = srv.log.entries().iter().filter(|e| e.outcome == "truncated").count();
    assert!(truncated > 0, "the seeded hashes give some truncated replies");
    // Each unusable answer was asked again within the run (the retry policy's attempts), so
    // nothing is left failed and no resume is needed.
    assert_eq!(r.code, 0, "{}", r.all());
    assert_eq!(db.scalar("SELECT COUNT(*) FROM generations WHERE status = 'failed'"), 0, "{}", r.all());
    assert_eq!(db.scalar("SELECT COUNT(*) FROM judgments WHERE verdict = 'failed'"), 0);
    assert_eq!(db.scalar("SELECT COUNT(*) FROM llm_calls WHERE usable = 0"), 0, "the full answers replaced them");
    // Every attempt was sent, counted and paid: the stages' calls add up to what the server saw,
    // the truncated ones included.
    let s: serde_json::Value = serde_json::from_str(&sb.flow(&["status", "--json", "-w", "wf.yaml"]).stdout).unwrap();
    let stages = s["stages"].as_array().unwrap();
    let all_calls: i64 = stages.iter().map(|x| x["llm_calls"].as_i64().unwrap()).sum();
    let chat = srv.log.entries().iter().filter(|e| e.path == "chat").count() as i64;
    assert_eq!(all_calls, chat);
    assert_eq!(chat, db.scalar("SELECT COUNT(*) FROM llm_calls") + truncated as i64);
}
