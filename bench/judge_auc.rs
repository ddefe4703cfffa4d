//! How well a local judge separates relevant from irrelevant passages (issue 27): for each query of a
//! BEIR split, its relevant document and the best BM25 document that is not relevant, each judged by
//! the model with the built-in local judge prompt. Prints the ROC AUC of the expected score (the
//! digits' probabilities), of the digit written, the seconds per judgment, and the threshold on the
//! expected score that best separates the two (balanced accuracy).
//!
//! `cargo run --release --example judge_auc -- BEIR_FOLDER [--split train] [--queries 150]
//!  [--model qwen2.5-coder-0.5b-instruct] [--reason] [--parallel 8] [--kind question|keywords|claim]`

use std::time::Instant;

use flow::llm::local::LocalChat;
use flow::llm::{ChatProvider, ChatRequest, GenParams, Message, ScoreAsk, score_probabilities};
use serde_json::json;

struct Args {
    beir: std::path::PathBuf,
    split: String,
    queries: usize,
    model: String,
    reason: bool,
    parallel: usize,
    /// What the queries are, as the judge prompt names them: question, keywords or claim.
    kind: String,
}

fn args() -> Args {
    let mut a = Args {
        beir: "../shared/data/scifact".into(),
        split: "train".into(),
        queries: 150,
        model: "qwen2.5-coder-0.5b-instruct".into(),
        reason: false,
        parallel: 8,
        kind: "question".into(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(x) = it.next() {
        let mut val = || it.next().expect("a value");
        match x.as_str() {
            "--split" => a.split = val(),
            "--queries" => a.queries = val().parse().expect("a number"),
            "--model" => a.model = val(),
            "--parallel" => a.parallel = val().parse().expect("a number"),
            "--reason" => a.reason = true,
            "--kind" => a.kind = val(),
            p => a.beir = p.into(),
        }
    }
    a
}

/// ROC AUC: the chance a random relevant pair scores above a random irrelevant one (ties count half).
fn auc(pos: &[f64], neg: &[f64]) -> f64 {
    let mut wins = 0.0;
    for p in pos {
        for n in neg {
            wins += if p > n {
                1.0
            } else if p == n {
                0.5
            } else {
                0.0
            };
        }
    }
    wins / (pos.len() * neg.len()).max(1) as f64
}

/// The threshold t (accept at score >= t) with the best balanced accuracy, and that accuracy.
fn best_threshold(pos: &[f64], neg: &[f64]) -> (f64, f64) {
    let mut cuts: Vec<f64> = pos.iter().chain(neg).copied().collect();
    cuts.sort_by(f64::total_cmp);
    cuts.dedup();
    let mut best = (3.0, 0.0);
    for t in cuts {
        let tpr = pos.iter().filter(|&&s| s >= t).count() as f64 / pos.len().max(1) as f64;
        let tnr = neg.iter().filter(|&&s| s < t).count() as f64 / neg.len().max(1) as f64;
        if (tpr + tnr) / 2.0 > best.1 {
            best = (t, (tpr + tnr) / 2.0);
        }
    }
    best
}

fn main() {
    let a = args();
    let set = flow::beir::load(&a.beir, &a.split).expect("a BEIR folder");
    let mut relevant: std::collections::BTreeMap<usize, Vec<usize>> = Default::default();
    for &(q, d, _) in &set.qrels {
        relevant.entry(q).or_default().push(d);
    }
    let queries: Vec<(usize, Vec<usize>)> = relevant.into_iter().take(a.queries).collect();
    let mut bm25 = flow::rank::bm25::Bm25::default();
    for d in &set.doc_texts {
        bm25.add(d);
    }
    let texts: Vec<String> = queries.iter().map(|(q, _)| set.query_texts[*q].clone()).collect();
    let hits = bm25.search(&texts, 20);
    // (query, document, relevant?)
    let mut pairs = Vec::new();
    for ((q, rel), h) in queries.iter().zip(&hits) {
        pairs.push((*q, rel[0], true));
        if let Some(&(d, _)) = h.iter().find(|(d, _)| !rel.contains(d)) {
            pairs.push((*q, d, false));
        }
    }
    let gguf = flow::models::resolve(&a.model, std::path::Path::new("."), "")
        .ok()
        .and_then(|dir| {
            std::fs::read_dir(dir)
                .ok()?
                .flatten()
                .map(|e| e.path())
                .find(|p| p.extension().is_some_and(|e| e == "gguf"))
        })
        .unwrap_or_else(|| a.model.clone().into());
    let chat = LocalChat::load(&gguf, &a.model, a.parallel, true, flow::workflow::Requantize::Auto).expect("the model");
    let template = flow::prompt::Template::builtin("judge_local.j2").expect("the built-in prompt");
    let bodies: Vec<serde_json::Value> = pairs
        .iter()
        .map(|&(q, d, _)| {
            // A long abstract is cut near the chunk stage's size (about 256 tokens).
            let chunk: String = set.doc_texts[d].chars().take(1200).collect();
            let vars = json!({ "query": set.query_texts[q], "chunk": chunk, "title": "", "path": "", "domain": "",
                               "min_score": 4, "reason": a.reason, "json": true, "kind": a.kind });
            let req = ChatRequest {
                messages: vec![Message::user(template.render(vars).expect("renders"))],
                params: GenParams {
                    temperature: Some(0.0),
                    max_tokens: Some(if a.reason { 96 } else { 8 }),
                    ..Default::default()
                },
                json_schema: None,
                accept: None,
                score: Some(ScoreAsk { reason: a.reason }),
            };
            chat.body(&req)
        })
        .collect();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    // Warm up: the weights load on the first request.
    rt.block_on(chat.send(&bodies[0])).expect("an answer");
    let t = Instant::now();
    let answers = rt.block_on(futures::future::join_all(bodies.iter().map(|b| chat.send(b))));
    let secs = t.elapsed().as_secs_f64();
    let (mut exp_pos, mut exp_neg, mut dig_pos, mut dig_neg, mut failed) = (vec![], vec![], vec![], vec![], 0);
    for (ans, &(_, _, rel)) in answers.iter().zip(&pairs) {
        let Ok(ans) = ans else {
            failed += 1;
            continue;
        };
        let Some((digit, _)) = flow::stages::judge::parse_judgment(&ans.text) else {
            failed += 1;
            continue;
        };
        let expected = score_probabilities(&ans.raw)
            .map(|p| p.iter().enumerate().map(|(i, p)| (i + 1) as f64 * p).sum::<f64>())
            .unwrap_or(digit as f64);
        let (e, d) = if rel { (&mut exp_pos, &mut dig_pos) } else { (&mut exp_neg, &mut dig_neg) };
        e.push(expected);
        d.push(digit as f64);
    }
    let (threshold, balanced) = best_threshold(&exp_pos, &exp_neg);
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
    println!(
        "{}",
        json!({
            "beir": a.beir, "split": a.split, "model": a.model, "reason": a.reason, "kind": a.kind, "parallel": a.parallel,
            "pairs": pairs.len(), "failed": failed,
            "auc_expected_score": auc(&exp_pos, &exp_neg), "auc_written_digit": auc(&dig_pos, &dig_neg),
            "mean_expected_relevant": mean(&exp_pos), "mean_expected_irrelevant": mean(&exp_neg),
            "accepted_at_4_relevant": exp_pos.iter().filter(|&&s| s >= 4.0).count() as f64 / exp_pos.len().max(1) as f64,
            "accepted_at_4_irrelevant": exp_neg.iter().filter(|&&s| s >= 4.0).count() as f64 / exp_neg.len().max(1) as f64,
            "best_threshold": threshold, "balanced_accuracy_at_best": balanced,
            "seconds_per_judgment": secs / pairs.len() as f64,
        })
    );
}
