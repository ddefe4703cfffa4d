//! The eval stages on the toy BEIR set: a baseline without training, a trained model scored, and RAG
//! answers graded through a loopback server, never paid for twice; then the report.

use crate::harness::Sandbox;
use crate::openai_server::{self, Config};
use crate::train::toy_set;

const MODELS: &str = "models:\n  black_box: { provider: local, model: tiny }\n  augment: { init: tiny }\n";

#[test]
fn a_baseline_runs_without_training_and_shows_the_change_against_the_last_run() {
    let sb = Sandbox::new();
    toy_set(&sb);
    crate::train::toy_test_split(&sb);
    let wf = format!(
        "name: t\nstore: t.db\n{MODELS}stages:\n  eval:\n    kind: eval_recall\n    eval_set: {{ beir: toy, split: test }}\n    retrievers: [bm25, black_box]\n"
    );
    sb.write("wf.yaml", &wf);
    let r = sb.flow(&["run", "wf.yaml"]);
    assert_eq!(r.code, 0, "{}", r.all());
    assert!(r.all().contains("R@10") && r.all().contains("nDCG@10"), "{}", r.all());
    let db = sb.db("t.db");
    assert_eq!(db.scalar("SELECT COUNT(*) FROM eval_results"), 2);
    assert_eq!(db.scalar("SELECT MIN(queries) FROM eval_results"), 36);
    assert_eq!(db.scalar("SELECT MIN(corpus) FROM eval_results"), 60);
    // 60 passages: every one is in each top 100, so Recall@100 is 1 (bm25 returns every passage
    // sharing a word with the query, and each relevant passage holds both query words).
    let r100 = "json_extract(metrics, '$.\"recall@100\"')";
    assert_eq!(db.real(&format!("SELECT MIN({r100}) FROM eval_results")), 1.0);
    assert!(!r.all().contains("(+0.0000)"), "nothing to compare with yet");

    let again = sb.flow(&["run", "wf.yaml", "--force", "eval"]);
    assert_eq!(again.code, 0, "{}", again.all());
    assert!(
        again.all().contains("change against the previous run") && again.all().contains("(+0.0000)"),
        "{}",
        again.all()
    );

    // A qrel naming an unknown document is an input error with its file and line.
    sb.write("toy/qrels/test.tsv", "query-id\tcorpus-id\tscore\nq12\td12\t1\nq13\tnope\t1\n");
    let bad = sb.flow(&["run", "wf.yaml"]);
    assert_eq!(bad.code, 2, "{}", bad.all());
    assert!(bad.all().contains("test.tsv:3") && bad.all().contains("nope"), "{}", bad.all());

    // Asking for a trained retriever with nothing trained says what to do.
    crate::train::toy_test_split(&sb);
    sb.write("wf.yaml", wf.replace("[bm25, black_box]", "[bm25, mafin]"));
    let none = sb.flow(&["run", "wf.yaml"]);
    assert_eq!(none.code, 2, "{}", none.all());
    assert!(none.all().contains("no trained model for retriever `mafin`"), "{}", none.all());
}

#[test]
fn eval_after_training_scores_the_trained_model() {
    let sb = Sandbox::new();
    toy_set(&sb);
    crate::train::toy_test_split(&sb);
    sb.write(
        "wf.yaml",
        format!(
            "name: t\nstore: t.db\n{MODELS}stages:\n  train:\n    kind: train\n    beir: toy\n    retriever: augment_only\n    epochs: 6\n    batch_size: 8\n    lr: 1.0e-3\n    val_fraction: 0.25\n  eval:\n    kind: eval_recall\n    needs: [train]\n    eval_set: {{ beir: toy, split: test }}\n"
        ),
    );
    let r = sb.flow(&["run", "wf.yaml"]);
    assert_eq!(r.code, 0, "{}", r.all());
    let db = sb.db("t.db");
    // By default: bm25, the black box, what the upstream train stage trains, and hybrid over it
    // (its alpha chosen on the train stage's validation split).
    assert_eq!(
        db.text("SELECT group_concat(retriever, ',') FROM (SELECT retriever FROM eval_results ORDER BY id)"),
        "bm25,black_box,augment_only,hybrid"
    );
    let alpha = db.real("SELECT alpha FROM models");
    assert!((0.0..=1.0).contains(&alpha), "alpha {alpha}");
    assert!(r.all().contains(&format!("convex alpha {alpha:.2} from validation")), "{}", r.all());
    assert_eq!(
        db.scalar("SELECT model_id FROM eval_results WHERE retriever = 'augment_only'"),
        db.scalar("SELECT id FROM models")
    );
    // The black box is the untrained starting point; the trained augment must rank better.
    let ndcg = |r: &str| {
        db.real(&format!("SELECT json_extract(metrics, '$.\"ndcg@10\"') FROM eval_results WHERE retriever = '{r}'"))
    };
    assert!(ndcg("augment_only") > ndcg("black_box") + 0.05, "{} vs {}", ndcg("augment_only"), ndcg("black_box"));
}

#[test]
fn rag_answers_are_graded_stored_reported_and_never_paid_twice() {
    let server = openai_server::start(Config::default());
    let sb = Sandbox::new();
    toy_set(&sb);
    crate::train::toy_test_split(&sb);
    sb.write("prompts/rag_answer.j2", include_str!("../../prompts/rag_answer.j2"));
    sb.write("prompts/rag_grade.j2", include_str!("../../prompts/rag_grade.j2"));
    let wf = format!(
        "name: t\nstore: t.db\n{MODELS}  llm: {{ provider: openai, model: test-model, base_url: \"{}\" }}\nstages:\n  recall:\n    kind: eval_recall\n    eval_set: {{ beir: toy, split: test }}\n    retrievers: [bm25, black_box, hybrid]\n    hybrid: {{ dense: black_box, fusion: rrf }}\n  rag:\n    kind: eval_rag\n    eval_set: {{ beir: toy, split: test }}\n    retrievers: [bm25, black_box, hybrid]\n    hybrid: {{ dense: black_box, fusion: rrf }}\n    answer_prompt: prompts/rag_answer.j2\n    grade_prompt: prompts/rag_grade.j2\n    top_k: 3\n",
        server.base_url()
    );
    sb.write("wf.yaml", &wf);
    let r = sb.flow(&["run", "wf.yaml"]);
    assert_eq!(r.code, 0, "{}", r.all());
    assert!(r.all().contains("95% CI"), "{}", r.all());
    let db = sb.db("t.db");
    assert_eq!(db.scalar("SELECT COUNT(*) FROM rag_answers"), 108);
    assert_eq!(db.scalar("SELECT COUNT(*) FROM rag_answers WHERE grade = 'failed'"), 0);
    // The test server answers with the first passage and grades it correct when the reference (the
    // relevant passage) contains it: each retriever's accuracy is its Recall@1.
    for retriever in ["bm25", "black_box", "hybrid"] {
        let correct = db
            .scalar(&format!("SELECT COUNT(*) FROM rag_answers WHERE retriever = '{retriever}' AND grade = 'correct'"));
        let top1 = db.scalar(&format!(
            "SELECT COUNT(*) FROM rag_answers WHERE retriever = '{retriever}'
               AND json_extract(passages, '$[0]') = 'd' || substr(question_id, 2)"
        ));
        assert_eq!(correct, top1, "{retriever}");
        let r1 = db.real(&format!(
            "SELECT json_extract(metrics, '$.\"recall@1\"') FROM eval_results WHERE retriever = '{retriever}'"
        ));
        assert!((correct as f64 / 36.0 - r1).abs() < 1e-9, "{retriever}: {correct}/36 vs recall@1 {r1}");
    }
    // One answer and one grade per question and retriever; two retrievers that return the same
    // passages in the same order make the same request, which is sent once.
    let calls = server.log.entries().len();
    assert!((100..=216).contains(&calls), "{calls} calls");

    // Forced again: every answer and grade comes from the request cache.
    let again = sb.flow(&["run", "wf.yaml", "--force", "rag"]);
    assert_eq!(again.code, 0, "{}", again.all());
    assert_eq!(server.log.entries().len(), calls, "a rerun paid again");
    assert_eq!(db.scalar("SELECT COUNT(*) FROM rag_answers"), 216);

    let answers = sb.flow(&["answers", "-w", "wf.yaml", "--grade", "correct", "--limit", "3"]);
    assert_eq!(answers.code, 0, "{}", answers.all());
    assert_eq!(answers.stdout.matches("[correct]").count(), 3, "{}", answers.stdout);

    let report = sb.flow(&["report", "-w", "wf.yaml"]);
    assert_eq!(report.code, 0, "{}", report.all());
    let html = std::fs::read_to_string(report.stdout.trim()).unwrap();
    for want in ["<svg", "Recall@k", "Answer accuracy", "95% Wilson interval", "black_box", "hybrid (rrf)", "LLM calls"]
    {
        assert!(html.contains(want), "report lacks {want}");
    }
    let status = sb.flow(&["status", "-w", "wf.yaml"]);
    assert!(status.stdout.contains(report.stdout.trim()), "{}", status.stdout);
}

#[test]
fn an_api_black_box_is_paid_once_and_its_calls_are_accounted() {
    let server = openai_server::start(Config::default());
    let sb = Sandbox::new();
    toy_set(&sb);
    crate::train::toy_test_split(&sb);
    sb.write(
        "wf.yaml",
        format!(
            "name: t\nstore: t.db\nmodels:\n  black_box: {{ provider: openai, model: test-embed, base_url: \"{}\" }}\nstages:\n  eval:\n    kind: eval_recall\n    eval_set: {{ beir: toy, split: test }}\n    retrievers: [black_box]\n",
            server.base_url()
        ),
    );
    let r = sb.flow(&["run", "wf.yaml"]);
    assert_eq!(r.code, 0, "{}", r.all());
    let requests = server.log.entries().len() as i64;
    assert!(requests > 0);
    let db = sb.db("t.db");
    // Every embedding request shows in the stage's accounting, as generate's and judge's calls do.
    assert_eq!(db.scalar("SELECT llm_calls FROM stage_runs WHERE stage = 'eval'"), requests);
    assert!(db.scalar("SELECT prompt_tokens FROM stage_runs WHERE stage = 'eval'") > 0);
    // Where it embedded is logged and stored: the API black box, and the trained models on this CPU.
    let summary = db.text("SELECT summary FROM stage_runs WHERE stage = 'eval'");
    assert!(summary.contains(r#""devices":{"black_box":"api","chosen":"auto","trained":"cpu"}"#), "{summary}");
    assert!(r.stderr.contains("embedded on: black box \"api\", trained models \"cpu\""), "{}", r.stderr);

    // Forced again: every vector comes from the store.
    let again = sb.flow(&["run", "wf.yaml", "--force", "eval"]);
    assert_eq!(again.code, 0, "{}", again.all());
    assert_eq!(server.log.entries().len() as i64, requests, "the black box was paid twice");
}

/// A document longer than the encoder's window whose answer sits after token 600: MaxP (the
/// default) scores it by its best passage and finds it first; `passages: first` judges it by its
/// first 254 tokens of filler and ranks the on-topic distractors above it.
#[test]
fn a_long_documents_late_answer_is_found_by_maxp_and_missed_by_its_first_window() {
    let models = crate::harness::models_dir();
    let sb = Sandbox::new();
    let filler = crate::harness::prose(7, 9);
    // The late section, as a real report would have it: a few sentences on one incident.
    let answer = "Incident report: the Zephyr-9 wind turbine. In 2019 the main bearing of the Zephyr-9 turbine \
                  failed. Inspectors found that salt spray from the sea had corroded the bearing seals, so the \
                  lubricant washed out and the bearing overheated. The Zephyr-9 was stopped for four months while \
                  the bearing and its seals were replaced with corrosion-resistant parts.";
    let long = format!("{filler} {answer}");
    let tok = flow::stages::chunk::load_tokenizer(&models.join("all-MiniLM-L6-v2/tokenizer.json")).unwrap();
    let before = tok.encode(filler.as_str(), false).unwrap().len();
    assert!(before > 600 && before < 1500, "the answer must start after token 600, at {before}");
    let distractors = [
        "Wind turbines convert the kinetic energy of moving air into electricity through a rotor and a generator.",
        "Offshore wind farms are built far from the coast, where winds are stronger and steadier.",
        "Bearings in rotating machinery are lubricated with grease to reduce friction and wear.",
        "Salt water is more corrosive than fresh water because dissolved ions conduct electric current.",
        "The football season ended with a penalty shoot-out in the final match.",
        "Bake the bread at two hundred degrees until the crust turns golden brown.",
    ];
    let mut corpus = format!("{}\n", serde_json::json!({ "_id": "long", "title": "", "text": long }));
    for (i, d) in distractors.iter().enumerate() {
        corpus.push_str(&format!("{}\n", serde_json::json!({ "_id": format!("d{i}"), "title": "", "text": d })));
    }
    sb.write("set/corpus.jsonl", corpus);
    sb.write(
        "set/queries.jsonl",
        format!("{}\n", serde_json::json!({ "_id": "q", "text": "Why did the Zephyr-9 turbine's main bearing fail?" })),
    );
    sb.write("set/qrels/test.tsv", "query-id\tcorpus-id\tscore\nq\tlong\t1\n");
    let wf = |passages: &str| {
        format!(
            "name: t\nstore: t.db\nmodels:\n  black_box: {{ provider: local, model: all-MiniLM-L6-v2, max_seq_length: 256 }}\nstages:\n  eval:\n    kind: eval_recall\n    eval_set: {{ beir: set, split: test }}\n    retrievers: [black_box]\n    passages: {passages}\n"
        )
    };
    let recall1 = |passages: &str| {
        sb.write("wf.yaml", wf(passages));
        let r = sb.flow(&["run", "wf.yaml"]);
        assert_eq!(r.code, 0, "{}", r.all());
        sb.db("t.db").real("SELECT json_extract(metrics, '$.\"recall@1\"') FROM eval_results ORDER BY id DESC LIMIT 1")
    };
    assert_eq!(recall1("maxp"), 1.0, "MaxP must put the long document first");
    assert_eq!(recall1("first"), 0.0, "its first window holds no answer");
    // MaxP's passages went through the vector cache: more vectors than documents and queries.
    let vectors = sb.db("t.db").scalar("SELECT COUNT(*) FROM embeddings");
    assert!(vectors > 1 + 7 + 1, "{vectors} cached vectors");
}

/// A training that never beats its starting model on validation says so, and the gate does not
/// promote its (starting) weights as a trained model.
#[test]
fn a_training_that_does_not_beat_its_start_is_not_promoted() {
    let sb = Sandbox::new();
    toy_set(&sb);
    crate::train::toy_test_split(&sb);
    sb.write(
        "wf.yaml",
        format!(
            "name: t\nstore: t.db\n{MODELS}stages:\n  train:\n    kind: train\n    beir: toy\n    retriever: augment_only\n    epochs: 1\n    batch_size: 8\n    lr: 1.0e-12\n    dropout: 0\n    val_fraction: 0.25\n  eval:\n    kind: eval_recall\n    needs: [train]\n    eval_set: {{ beir: toy, split: test }}\n    retrievers: [augment_only]\n"
        ),
    );
    let r = sb.flow(&["run", "wf.yaml"]);
    assert_eq!(r.code, 0, "{}", r.all());
    assert!(r.all().contains("did not beat its starting model on validation"), "{}", r.all());
    let db = sb.db("t.db");
    assert_eq!(db.scalar("SELECT improved FROM models"), 0);
    assert_eq!(db.text("SELECT status FROM models"), "candidate");
    assert!(db.text("SELECT status_reason FROM models").contains("did not beat its starting model"));
    let listed = sb.flow(&["models", "list", "-w", "wf.yaml"]);
    assert!(listed.all().contains("no (start kept)"), "{}", listed.all());
}

/// With no validation split there is no alpha to take: hybrid fuses by RRF and says so.
#[test]
fn hybrid_without_a_validation_alpha_fuses_by_rrf_and_says_so() {
    let sb = Sandbox::new();
    toy_set(&sb);
    crate::train::toy_test_split(&sb);
    sb.write(
        "wf.yaml",
        format!(
            "name: t\nstore: t.db\n{MODELS}stages:\n  train:\n    kind: train\n    beir: toy\n    retriever: augment_only\n    epochs: 1\n    batch_size: 8\n    val_fraction: 0\n  eval:\n    kind: eval_recall\n    needs: [train]\n    eval_set: {{ beir: toy, split: test }}\n    retrievers: [hybrid]\n"
        ),
    );
    let r = sb.flow(&["run", "wf.yaml"]);
    assert_eq!(r.code, 0, "{}", r.all());
    assert!(r.all().contains("rrf, as no alpha was chosen on a validation split (model 1 has none)"), "{}", r.all());
    let db = sb.db("t.db");
    assert_eq!(db.real("SELECT json_extract(metrics, '$.alpha') FROM eval_results"), -1.0);
}

/// With no train stage but judge-accepted pairs upstream, hybrid chooses its alpha on those pairs
/// (label-free, each over its passage and the other chunks); too few of them to blend choose one
/// side, and the label says which.
#[test]
fn hybrid_without_a_train_stage_chooses_alpha_on_the_accepted_pairs() {
    let srv = openai_server::start(Config::default());
    let sb = Sandbox::new();
    toy_set(&sb);
    crate::train::toy_test_split(&sb);
    crate::llm::corpus(&sb, 12);
    let p = concat!(env!("CARGO_MANIFEST_DIR"), "/prompts");
    sb.write(
        "wf.yaml",
        format!(
            "name: t\nstore: t.db\n{MODELS}  llm: {{ provider: openai, model: test-model, base_url: \"{}\" }}\nstages:\n  chunk: {{ kind: chunk, corpus: docs, max_tokens: 200, overlap: 0 }}\n  gen: {{ kind: generate, needs: [chunk], prompt: {p}/generate_queries.j2, per_chunk: 1 }}\n  judge: {{ kind: judge, needs: [gen], prompt: {p}/judge.j2, min_score: 2 }}\n  eval:\n    kind: eval_recall\n    needs: [judge]\n    eval_set: {{ beir: toy, split: test }}\n    retrievers: [bm25, black_box, hybrid]\n",
            srv.base_url()
        ),
    );
    let r: crate::harness::Ran = sb.cmd(&["run", "wf.yaml"]).env("OPENAI_API_KEY", "sk-test").output().unwrap().into();
    assert_eq!(r.code, 0, "{}", r.all());
    let db = sb.db("t.db");
    let accepted = db.scalar("SELECT COUNT(*) FROM judgments WHERE verdict = 'accepted'");
    assert!(accepted > 0 && accepted < 30, "the case of too few pairs to blend: {accepted}");
    let alpha = db.real("SELECT json_extract(metrics, '$.alpha') FROM eval_results WHERE retriever = 'hybrid'");
    assert!(alpha == 0.0 || alpha == 1.0, "one side, not a blend and not RRF (-1): {alpha}");
    let side = if alpha == 1.0 { "dense" } else { "bm25" };
    let want = format!("{accepted} accepted synthetic pairs (too few to blend, so the better side ({side}))");
    assert!(r.all().contains(&want), "{want} in:\n{}", r.all());
}
