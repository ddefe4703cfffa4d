//! `flow report`: one self-contained HTML file for a run, read from the store: stage counts, tokens
//! and cost, retrieval metrics and Recall@k curves, RAG accuracy, training curves, sample pairs.

pub mod svg;

use std::fmt::Write;
use std::path::{Path, PathBuf};

use svg::escape;

use crate::error::{Error, Result};
use crate::store::{Store, eval_results, models, pairs, rag_answers, runs};

/// Where the report of `run_id` goes by default: beside the store.
pub fn default_path(store: &Path, run_id: i64) -> PathBuf {
    let stem = store.file_stem().map(|s| s.to_string_lossy().to_string()).unwrap_or_else(|| "flow".into());
    store.with_file_name(format!("{stem}.report-run{run_id}.html"))
}

const STYLE: &str = "body{font:14px/1.45 system-ui,sans-serif;margin:2em auto;max-width:1000px;color:#222}\
h1{font-size:22px}h2{font-size:18px;margin-top:2em;border-bottom:1px solid #ddd}h3{font-size:15px}\
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ddd;padding:3px 8px;text-align:right}\
td:first-child,th:first-child{text-align:left}td.text{text-align:left;max-width:520px}\
.up{color:#2a7d2a}.down{color:#b22}.muted{color:#777}svg text{font:11px sans-serif;fill:#333}\
svg .title{font-weight:bold;font-size:12px}svg .grid{stroke:#eee}svg .axis{stroke:#999}\
svg .frame{fill:none;stroke:#999}svg .whisker{stroke:#111;stroke-width:2}";

fn fmt_ms(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms).map(|t| t.format("%F %T UTC").to_string()).unwrap_or_default()
}

fn duration(a: Option<i64>, b: Option<i64>) -> String {
    match (a, b) {
        (Some(a), Some(b)) => format!("{:.1} s", (b - a) as f64 / 1000.0),
        _ => "-".into(),
    }
}

fn html_table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut s = String::from("<table><tr>");
    for h in header {
        let _ = write!(s, "<th>{}</th>", escape(h));
    }
    s.push_str("</tr>");
    for r in rows {
        s.push_str("<tr>");
        for c in r {
            // Cells are escaped by their makers: some carry markup (changes, long text).
            let _ = write!(s, "<td>{c}</td>");
        }
        s.push_str("</tr>");
    }
    s.push_str("</table>");
    s
}

/// The HTML report of one run.
pub async fn build(store: &Store, run_id: i64) -> Result<String> {
    let run = runs::get(store, run_id).await?.ok_or_else(|| {
        Error::bad_input(format!("run {run_id} is not in this store"), "list runs with `flow runs -w WORKFLOW`")
    })?;
    let stages = runs::stages_of(store, run_id).await?;
    let mut b = String::new();
    let _ = write!(
        b,
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>flow report: {w} run {id}</title>\
         <style>{STYLE}</style></head><body><h1>{w}: run {id}</h1>\
         <p>{status}, started {start}, took {took}. Written by flow {v} from {store}.</p>",
        w = escape(&run.workflow),
        id = run.id,
        status = escape(run.status.as_str()),
        start = fmt_ms(run.started_at),
        took = duration(Some(run.started_at), run.finished_at),
        v = env!("CARGO_PKG_VERSION"),
        store = escape(&store.path.display().to_string()),
    );

    stages_section(&mut b, &stages);
    for s in stages.iter().filter(|s| s.kind == "eval_recall") {
        retrieval_section(&mut b, store, &s.stage, run_id).await?;
    }
    for s in stages.iter().filter(|s| s.kind == "eval_rag") {
        rag_section(&mut b, store, &s.stage, run_id).await?;
    }
    for s in stages.iter().filter(|s| s.kind == "train") {
        train_section(&mut b, store, &s.stage, run_id).await?;
    }

    models_section(&mut b, store).await?;
    pairs_section(&mut b, store).await?;
    b.push_str("</body></html>\n");
    Ok(b)
}

/// Each stage of the run: status, items, LLM use over every attempt, cost, time, and its error.
fn stages_section(b: &mut String, stages: &[runs::StageRunRow]) {
    b.push_str("<h2>Stages</h2>");
    let rows: Vec<Vec<String>> = stages
        .iter()
        .map(|s| {
            // Usage over every attempt of the stage in this run; the last one beside it after a resume.
            let (all, last) = (s.all_attempts(), s.last_attempt());
            let mut calls = format!("{} ({} cached)", all.calls, all.cached);
            if s.attempts > 1 {
                calls.push_str(&format!("; last of {} attempts: {}", s.attempts, last.calls));
            }
            vec![
                escape(&s.stage),
                escape(&s.kind),
                escape(s.status.as_str()),
                s.items_total.to_string(),
                s.items_done.to_string(),
                s.items_cached.to_string(),
                s.items_failed.to_string(),
                calls,
                all.prompt_tokens.to_string(),
                all.completion_tokens.to_string(),
                all.cost.map(|c| format!("${c:.4}")).unwrap_or_else(|| "-".into()),
                crate::llm::plan::Estimate::of(s).and_then(|e| e.shown_usd()).unwrap_or_else(|| "-".into()),
                duration(s.started_at, s.finished_at),
            ]
        })
        .collect();
    b.push_str(&html_table(
        &[
            "stage",
            "kind",
            "status",
            "items",
            "done",
            "stored before",
            "failed",
            "LLM calls",
            "prompt tokens",
            "completion tokens",
            "cost",
            "estimated cost",
            "time",
        ],
        &rows,
    ));
    for s in stages.iter().filter(|s| s.error.is_some()) {
        let _ = write!(
            b,
            "<p class=\"down\">{} failed: {}</p>",
            escape(&s.stage),
            escape(s.error.as_deref().unwrap_or(""))
        );
    }
}

/// The newest trained models of the store with their lineage, validation and status.
async fn models_section(b: &mut String, store: &Store) -> Result<()> {
    let trained = models::list(store).await?;
    if !trained.is_empty() {
        b.push_str("<h2>Trained models</h2>");
        let rows: Vec<Vec<String>> = trained
            .iter()
            .rev()
            .take(20)
            .map(|m| {
                vec![
                    m.id.to_string(),
                    escape(&m.stage),
                    escape(&m.retriever),
                    escape(m.status.as_str()),
                    m.parent_id.map(|p| format!("model {p}")).unwrap_or_else(|| "base".into()),
                    m.run_id.map(|r| r.to_string()).unwrap_or_default(),
                    match m.improved {
                        Some(true) => "yes".into(),
                        Some(false) => "<b>no</b>: did not beat its starting model on validation".into(),
                        None => "no validation".into(),
                    },
                    crate::retriever::settings_label(m),
                    m.alpha.map(|a| format!("{a:.2}")).unwrap_or_else(|| "-".into()),
                    escape(m.status_reason.as_deref().unwrap_or("")),
                ]
            })
            .collect();
        b.push_str(&html_table(
            &["id", "stage", "retriever", "status", "from", "run", "improved", "settings", "alpha", "why"],
            &rows,
        ));
    }

    Ok(())
}

/// Ten accepted and ten rejected pairs, to read what the judge let through.
async fn pairs_section(b: &mut String, store: &Store) -> Result<()> {
    b.push_str("<h2>Sample pairs</h2>");
    for verdict in ["accepted", "rejected"] {
        let sample = pairs::list(store, None, Some(verdict), 10).await?;
        let _ = write!(b, "<h3>{verdict} ({} shown)</h3>", sample.len());
        if sample.is_empty() {
            b.push_str("<p class=\"muted\">none</p>");
            continue;
        }
        let rows: Vec<Vec<String>> = sample
            .iter()
            .map(|p| {
                let passage: String = p.passage.chars().take(300).collect();
                vec![
                    format!("<span class=\"text\">{}</span>", escape(&p.query)),
                    escape(&p.kind),
                    format!("{}{}", escape(&passage), if p.passage.chars().count() > 300 { "…" } else { "" }),
                    escape(&p.document),
                    match (p.expected, p.score) {
                        (Some(e), _) => format!("{e:.2}"),
                        (None, Some(s)) => s.to_string(),
                        _ => String::new(),
                    },
                    escape(p.reason.as_deref().unwrap_or("")),
                ]
            })
            .collect();
        b.push_str(
            &html_table(&["query", "kind", "passage", "document", "score", "judge's reason"], &rows)
                .replace("<td>", "<td class=\"text\">"),
        );
    }
    Ok(())
}

async fn retrieval_section(b: &mut String, store: &Store, stage: &str, run_id: i64) -> Result<()> {
    let results = eval_results::latest(store, stage, run_id).await?;
    let _ = write!(b, "<h2>Retrieval: {}</h2>", escape(stage));
    let Some(first) = results.first() else {
        b.push_str("<p class=\"muted\">no results stored yet</p>");
        return Ok(());
    };
    let _ = write!(
        b,
        "<p>Eval set <code>{}</code>: {} queries over {} passages{}.</p>",
        escape(&first.eval_set),
        first.queries,
        first.corpus,
        if first.run_id == run_id {
            String::new()
        } else {
            format!(" (measured in run {}, up to date since)", first.run_id)
        }
    );
    let cols = crate::rank::metrics::COLUMNS;
    let mut header = vec!["retriever", "model"];
    header.extend(cols.iter().map(|c| c.1));
    let mut rows = Vec::new();
    let mut curves = Vec::new();
    for r in &results {
        let m = r.metrics();
        let prev =
            eval_results::previous(store, stage, &r.eval_set, &r.retriever, r.run_id).await?.map(|p| p.metrics());
        let name = match (m.get("alpha"), m.get("alpha_on_eval_set")) {
            (Some(&a), Some(&on_set)) if a >= 0.0 => format!(
                "{} (alpha {a:.2}{})",
                r.retriever,
                if on_set > 0.0 { ", tuned on this eval set: optimistic" } else { " from validation or fixed" }
            ),
            (Some(_), _) => format!("{} (rrf)", r.retriever),
            _ => r.retriever.clone(),
        };
        let mut row = vec![escape(&name), r.model_id.map(|i| i.to_string()).unwrap_or_else(|| "-".into())];
        for (key, _) in cols {
            let v = m.get(*key).copied().unwrap_or(0.0);
            row.push(match prev.as_ref().and_then(|p| p.get(*key)) {
                Some(p) => {
                    let class = if v > *p {
                        "up"
                    } else if v < *p {
                        "down"
                    } else {
                        "muted"
                    };
                    format!("{v:.4} <span class=\"{class}\">({:+.4})</span>", v - p)
                }
                None => format!("{v:.4}"),
            });
        }
        rows.push(row);
        let ks = crate::rank::metrics::KS;
        let pts: Vec<(f64, f64)> =
            ks.iter().enumerate().filter_map(|(i, k)| m.get(&format!("recall@{k}")).map(|v| (i as f64, *v))).collect();
        curves.push((r.retriever.clone(), pts));
    }
    b.push_str(&html_table(&header, &rows));
    b.push_str("<p class=\"muted\">In brackets: the change against the previous run on the same eval set.</p>");
    let ticks: Vec<(f64, String)> =
        crate::rank::metrics::KS.iter().enumerate().map(|(i, k)| (i as f64, k.to_string())).collect();
    b.push_str(&svg::line_chart("Recall@k", "k", "recall", &curves, Some(&ticks), Some((0.0, 1.0))));
    Ok(())
}

async fn rag_section(b: &mut String, store: &Store, stage: &str, run_id: i64) -> Result<()> {
    let _ = write!(b, "<h2>RAG answers: {}</h2>", escape(stage));
    let Some(sr) = rag_answers::latest_stage_run(store, stage, run_id).await? else {
        b.push_str("<p class=\"muted\">no answers stored yet</p>");
        return Ok(());
    };
    let tallies = rag_answers::tally(store, sr).await?;
    let mut rows = Vec::new();
    let mut bars = Vec::new();
    for t in &tallies {
        let (acc, (lo, hi)) = (t.accuracy(), t.interval());
        rows.push(vec![
            escape(&t.retriever),
            t.graded().to_string(),
            t.correct.to_string(),
            format!("{acc:.3}"),
            format!("[{lo:.3}, {hi:.3}]"),
            t.failed.to_string(),
        ]);
        bars.push((t.retriever.clone(), acc, lo, hi));
    }
    b.push_str(&html_table(&["retriever", "graded", "correct", "accuracy", "95% Wilson interval", "failed"], &rows));
    b.push_str(&svg::interval_bars("Answer accuracy (95% Wilson interval)", &bars));
    Ok(())
}

async fn train_section(b: &mut String, store: &Store, stage: &str, run_id: i64) -> Result<()> {
    let _ = write!(b, "<h2>Training: {}</h2>", escape(stage));
    let loss = models::curve(store, stage, run_id, "loss").await?;
    let val = models::curve(store, stage, run_id, "validation").await?;
    if loss.is_empty() && val.is_empty() {
        b.push_str("<p class=\"muted\">no training curves stored yet</p>");
        return Ok(());
    }
    let pts: Vec<(f64, f64)> = loss.iter().map(|(step, _, v, _)| (*step as f64, *v)).collect();
    b.push_str(&svg::line_chart("Training loss", "step", "loss", &[("loss".into(), pts)], None, None));
    let mut series: Vec<(String, Vec<(f64, f64)>)> = Vec::new();
    for key in ["recall@10", "ndcg@10", "mrr@10"] {
        let pts: Vec<(f64, f64)> = val
            .iter()
            .filter_map(|(_, epoch, _, extra)| {
                let m: serde_json::Value = serde_json::from_str(extra.as_deref()?).ok()?;
                Some((*epoch as f64, m.get(key)?.as_f64()?))
            })
            .collect();
        if !pts.is_empty() {
            series.push((key.to_string(), pts));
        }
    }
    b.push_str(&svg::line_chart("Validation after each epoch (0 = before training)", "epoch", "", &series, None, None));
    Ok(())
}
