//! The train stage on a tiny random-initialised BERT and a toy BEIR set: it learns, it is
//! reproducible, and a training killed with -9 resumes to the same weights.

use std::path::Path;
use std::time::{Duration, Instant};

use crate::harness::Sandbox;

const WORDS: usize = 48;

fn word(i: usize) -> String {
    format!("w{}", i % WORDS)
}

/// A toy retrieval task: each passage is a few words; its query repeats two of them in another order.
/// The random initial weights are made once and copied, so two sandboxes start from the same model.
pub fn toy_set(sb: &Sandbox) -> usize {
    toy_set_from(sb, None)
}

/// Returns how many distinct texts (queries and passages) the set has.
fn toy_set_from(sb: &Sandbox, init_from: Option<&Sandbox>) -> usize {
    let words: Vec<String> = (0..WORDS).map(word).collect();
    let refs: Vec<&str> = words.iter().map(String::as_str).collect();
    std::fs::create_dir_all(sb.path("tiny")).unwrap();
    let folder = flow::train::model::tiny_folder(&sb.path("tiny"), &refs).unwrap();
    match init_from {
        Some(other) => {
            std::fs::copy(other.path("tiny/model.safetensors"), sb.path("tiny/model.safetensors")).unwrap();
        }
        None => {
            let aug = flow::train::model::Augment::new(folder, None, &candle_core::Device::Cpu).unwrap();
            // candle's random initialisation is not seedable: draw the weights from a seeded generator
            // so every run of this test starts from the same model.
            let mut rng = fastrand::Rng::with_seed(11);
            for (name, var) in aug.named_vars() {
                let n = var.elem_count();
                let values: Vec<f32> = if name.contains("LayerNorm.weight") {
                    vec![1.0; n]
                } else if name.ends_with(".bias") {
                    vec![0.0; n]
                } else {
                    (0..n).map(|_| (rng.f32() - 0.5) * 0.1).collect()
                };
                var.set(&candle_core::Tensor::from_vec(values, var.shape(), &candle_core::Device::Cpu).unwrap())
                    .unwrap();
            }
            let tmp = sb.path("tiny-init");
            aug.save(&tmp, &Default::default(), None).unwrap();
            std::fs::copy(tmp.join("model.safetensors"), sb.path("tiny/model.safetensors")).unwrap();
        }
    }

    let (mut corpus, mut queries, mut qrels) =
        (String::new(), String::new(), String::from("query-id\tcorpus-id\tscore\n"));
    let mut distinct = std::collections::HashSet::new();
    for i in 0..60 {
        let (a, b, c, d) = (word(i), word(i * 7 + 3), word(i * 11 + 5), word(i * 13 + 1));
        corpus.push_str(&format!("{{\"_id\": \"d{i}\", \"title\": \"\", \"text\": \"{a} {b} {c} {d}\"}}\n"));
        queries.push_str(&format!("{{\"_id\": \"q{i}\", \"text\": \"{c} {a}\"}}\n"));
        qrels.push_str(&format!("q{i}\td{i}\t1\n"));
        distinct.insert(format!("{a} {b} {c} {d}"));
        distinct.insert(format!("{c} {a}"));
    }
    sb.write("toy/corpus.jsonl", corpus);
    sb.write("toy/queries.jsonl", queries);
    sb.write("toy/qrels/train.tsv", qrels);
    distinct.len()
}

/// The toy set's test split: queries q12..q47, whose passages have no duplicate elsewhere in the corpus.
pub fn toy_test_split(sb: &Sandbox) {
    let mut qrels = String::from("query-id\tcorpus-id\tscore\n");
    for i in 12..48 {
        qrels.push_str(&format!("q{i}\td{i}\t1\n"));
    }
    sb.write("toy/qrels/test.tsv", qrels);
}

fn workflow(extra: &str) -> String {
    workflow_epochs(6, extra)
}

fn workflow_epochs(epochs: usize, extra: &str) -> String {
    format!(
        "name: t\nstore: t.db\nmodels:\n  augment: {{ init: tiny }}\nstages:\n  train:\n    kind: train\n    beir: toy\n    retriever: augment_only\n    epochs: {epochs}\n    batch_size: 8\n    lr: 1.0e-3\n    val_fraction: 0.25\n    patience: 100\n{extra}"
    )
}

fn best_weights(sb: &Sandbox) -> Vec<u8> {
    let path: String = sb.db("t.db").text("SELECT path FROM models ORDER BY id DESC LIMIT 1");
    std::fs::read(Path::new(&path).join("model.safetensors")).unwrap()
}

fn last_weights(sb: &Sandbox) -> Vec<u8> {
    let path: String = sb.db("t.db").text("SELECT path FROM models ORDER BY id DESC LIMIT 1");
    std::fs::read(Path::new(&path).parent().unwrap().join("last/model.safetensors")).unwrap()
}

#[test]
fn a_tiny_bert_learns_the_toy_set_reproducibly() {
    let sb = Sandbox::new();
    toy_set(&sb);
    sb.write("wf.yaml", workflow(""));
    let r = sb.flow(&["run", "wf.yaml"]);
    assert_eq!(r.code, 0, "{}", r.all());
    let db = sb.db("t.db");
    let steps = db.scalar("SELECT COUNT(*) FROM train_curves WHERE kind = 'loss'");
    assert!(steps >= 20, "{steps} steps");
    let first: f64 =
        db.real("SELECT AVG(value) FROM (SELECT value FROM train_curves WHERE kind = 'loss' ORDER BY step LIMIT 5)");
    let last: f64 = db
        .real("SELECT AVG(value) FROM (SELECT value FROM train_curves WHERE kind = 'loss' ORDER BY step DESC LIMIT 5)");
    assert!(last < first * 0.8, "loss did not fall: {first} -> {last}");
    let ndcg = "json_extract(extra, '$.\"ndcg@10\"')";
    let start: f64 =
        db.real(&format!("SELECT {ndcg} FROM train_curves WHERE kind = 'validation' ORDER BY step LIMIT 1"));
    let end: f64 =
        db.real(&format!("SELECT {ndcg} FROM train_curves WHERE kind = 'validation' ORDER BY step DESC LIMIT 1"));
    assert!(end > start + 0.05, "validation nDCG@10 did not rise: {start} -> {end}");
    let best: f64 = db.real("SELECT MAX(value) FROM train_curves WHERE kind = 'validation'");
    let metrics: String = db.text("SELECT metrics FROM models");
    let m: serde_json::Value = serde_json::from_str(&metrics).unwrap();
    assert!((m["validation"]["recall@10"].as_f64().unwrap() - best).abs() < 1e-9, "{metrics}");
    assert_eq!(db.scalar("SELECT improved FROM models"), 1, "it beat its starting model");
    // The gain over the start is stated with its interval, which matches the stored one.
    let gain = &m["validation_gain"];
    assert!(gain["gain"].as_f64().unwrap() > 0.0, "{gain}");
    let interval = format!("95% bootstrap interval {:+.4} to", gain["interval"][0].as_f64().unwrap());
    assert!(r.all().contains(&interval), "{interval} not in:\n{}", r.all());

    // The checkpoint is a sentence-transformers folder.
    let path: String = db.text("SELECT path FROM models");
    for f in ["model.safetensors", "config.json", "tokenizer.json", "modules.json", "1_Pooling/config.json"] {
        assert!(Path::new(&path).join(f).exists(), "{f} missing in {path}");
    }

    // Same seed, same data: the same weights, byte for byte (dropout, on by default, is seeded too).
    let again = Sandbox::new();
    toy_set_from(&again, Some(&sb));
    again.write("wf.yaml", workflow(""));
    let r = again.flow(&["run", "wf.yaml", "--quiet"]);
    assert_eq!(r.code, 0, "{}", r.all());
    assert!(best_weights(&sb) == best_weights(&again), "same seed gave different weights");
}

/// Trains `wf` to the end in one sandbox; in another from the same start, kills the training with -9
/// once a mid-training checkpoint is on disk and training has gone past it, resumes, and checks the
/// resumed run ends with the same weights. Returns the uninterrupted sandbox.
fn killed_with_9_resumes_to_the_same_weights(wf: &str) -> Sandbox {
    let clean = Sandbox::new();
    toy_set(&clean);
    clean.write("wf.yaml", wf);
    let r = clean.flow(&["run", "wf.yaml", "--quiet"]);
    assert_eq!(r.code, 0, "{}", r.all());

    let sb = Sandbox::new();
    toy_set_from(&sb, Some(&clean));
    sb.write("wf.yaml", wf);
    let mut child = sb.cmd(&["run", "wf.yaml", "--quiet"]).spawn().unwrap();
    let db = sb.db("t.db");
    let t = Instant::now();
    while db.try_scalar("SELECT COUNT(*) FROM train_curves WHERE kind = 'loss'").unwrap_or(0) < 7 {
        assert!(t.elapsed() < Duration::from_secs(120), "training did not start");
        std::thread::sleep(Duration::from_millis(10));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert_eq!(db.scalar("SELECT COUNT(*) FROM models"), 0, "killed before the end");

    let r = sb.flow(&["resume", "-w", "wf.yaml"]);
    assert_eq!(r.code, 0, "{}", r.all());
    assert!(r.all().contains("resuming training at epoch"), "{}", r.all());
    assert!(last_weights(&sb) == last_weights(&clean), "resumed training ended with other weights");
    assert!(best_weights(&sb) == best_weights(&clean));
    clean
}

#[test]
fn a_training_killed_with_9_resumes_to_the_same_weights() {
    killed_with_9_resumes_to_the_same_weights(&workflow_epochs(60, "    checkpoint_every: 2\n"));
}

#[test]
fn mafin_embeds_each_text_with_the_black_box_once() {
    let sb = Sandbox::new();
    let texts = toy_set(&sb) as i64;
    let wf = workflow("").replace("retriever: augment_only", "retriever: mafin\n    hard_negatives: 1").replace(
        "  augment: { init: tiny }",
        "  augment: { init: tiny }\n  black_box: { provider: local, model: tiny }",
    );
    sb.write("wf.yaml", &wf);
    let r = sb.flow(&["run", "wf.yaml"]);
    assert_eq!(r.code, 0, "{}", r.all());
    assert!(r.all().contains("mined a hard negative for"), "{}", r.all());
    let db = sb.db("t.db");
    assert_eq!(db.scalar("SELECT COUNT(*) FROM embeddings"), texts);
    let stamp = db.scalar("SELECT MAX(created_at) FROM embeddings");
    assert_eq!(db.text("SELECT retriever FROM models"), "mafin");

    let r = sb.flow(&["run", "wf.yaml", "--force", "train"]);
    assert_eq!(r.code, 0, "{}", r.all());
    assert_eq!(db.scalar("SELECT COUNT(*) FROM embeddings"), texts);
    assert_eq!(db.scalar("SELECT MAX(created_at) FROM embeddings"), stamp, "the black box ran again");
}

#[test]
fn training_stops_early_when_validation_stops_improving() {
    let sb = Sandbox::new();
    toy_set(&sb);
    // A learning rate too small to move the rankings: epoch 1 is no better than epoch 0.
    sb.write(
        "wf.yaml",
        workflow_epochs(5, "").replace("lr: 1.0e-3", "lr: 1.0e-12").replace("patience: 100", "patience: 1"),
    );
    let r = sb.flow(&["run", "wf.yaml"]);
    assert_eq!(r.code, 0, "{}", r.all());
    assert!(r.all().contains("early stop after epoch 1"), "{}", r.all());
    let db = sb.db("t.db");
    let m: serde_json::Value = serde_json::from_str(&db.text("SELECT metrics FROM models")).unwrap();
    assert_eq!(m["stopped_early"], true, "{m}");
    assert_eq!(m["best_epoch"], 0, "{m}");
    assert_eq!(db.scalar("SELECT COUNT(*) FROM train_curves WHERE kind = 'validation'"), 2);
    assert_eq!(db.scalar("SELECT MAX(epoch) FROM train_curves WHERE kind = 'loss'"), 1);
    // The four epochs early stopping left out are counted as skipped, not as already stored.
    let out = r.all();
    let line = out.lines().find(|l| l.contains("succeeded in") && l.contains("skipped")).expect("a totals line");
    let count = |what: &str| -> u64 {
        let before = line.split(what).next().unwrap_or_default();
        before.trim_end().rsplit([' ', ':']).next().unwrap_or_default().parse().unwrap_or(u64::MAX)
    };
    let (done, skipped) = (count(" done"), count(" skipped"));
    assert!(done > 0 && skipped == 4 * done && count(" already stored") == 0, "{line}");
    // The best is the start: no gain, and the log says it is within noise.
    assert_eq!(m["validation_gain"]["gain"], 0.0, "{m}");
    assert_eq!(m["validation_gain"]["beyond_noise"], false, "{m}");
}

#[test]
fn bf16_mixed_precision_trains_through_the_stage() {
    let sb = Sandbox::new();
    toy_set(&sb);
    sb.write("wf.yaml", workflow_epochs(3, "    precision: bf16\n"));
    let r = sb.flow(&["run", "wf.yaml"]);
    assert_eq!(r.code, 0, "{}", r.all());
    assert!(r.all().contains("mixed precision: bf16"), "{}", r.all());
    let db = sb.db("t.db");
    let first: f64 = db.real("SELECT value FROM train_curves WHERE kind = 'loss' ORDER BY step LIMIT 1");
    let last: f64 = db.real("SELECT value FROM train_curves WHERE kind = 'loss' ORDER BY step DESC LIMIT 1");
    assert!(last < first, "loss did not fall in bf16: {first} -> {last}");
}

/// A reranker's workflow on the toy set: the same seed trains the same weights, and a training
/// killed with -9 resumes to them.
fn reranker_workflow(epochs: usize) -> String {
    workflow_epochs(epochs, "    checkpoint_every: 2\n    negatives: 3\n    rerank_k: 10\n")
        .replace("retriever: augment_only", "retriever: reranker")
        .replace(
            "  augment: { init: tiny }",
            "  augment: { init: tiny }\n  black_box: { provider: local, model: tiny }",
        )
}

#[test]
fn a_reranker_killed_with_9_resumes_to_the_same_weights() {
    let clean = killed_with_9_resumes_to_the_same_weights(&reranker_workflow(12));
    assert_eq!(clean.db("t.db").text("SELECT retriever FROM models"), "reranker");
}
