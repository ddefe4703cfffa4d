//! `flow plan` and `flow run --dry-run`: what a run would do and cost, as a table or JSON.

use flow::engine::{RunOptions, plan};
use flow::llm::plan::Estimate;
use flow::workflow::Workflow;

use super::table;
use crate::cli::PlanArgs;

pub async fn plan(a: PlanArgs) -> anyhow::Result<u8> {
    let wf = flow::stages::load_workflow(&a.workflow)?;
    let opts = super::run_options(a.pick);
    show(&wf, &opts, a.json).await
}

pub async fn show(wf: &Workflow, opts: &RunOptions, json: bool) -> anyhow::Result<u8> {
    let p = plan::plan(wf, opts).await?;
    if json {
        outln!("{}", serde_json::to_string_pretty(&p)?)?;
        return Ok(0);
    }
    let dash = || "-".to_string();
    let row = |stage: &str, action: &str, items: String, e: Option<&Estimate>| {
        let mut r = vec![stage.to_string(), action.to_string(), items];
        match e {
            Some(e) => r.extend([
                e.requests.to_string(),
                e.cached.to_string(),
                e.prompt_tokens.to_string(),
                completion(e),
                usd(e),
            ]),
            None => r.extend([dash(), dash(), dash(), dash(), dash()]),
        }
        r
    };
    let mut rows: Vec<Vec<String>> = p
        .stages
        .iter()
        .map(|s| {
            let counted = s.plan.items > 0 || s.plan.llm.is_some();
            let items = match s.action.as_str() {
                "runs" if counted => format!("{}/{}", s.plan.todo, s.plan.items),
                _ => dash(),
            };
            row(&s.stage, &s.action, items, s.plan.llm.as_ref())
        })
        .collect();
    rows.push(row("TOTAL", "", String::new(), Some(&p.total)));
    outln!("plan of {} (no model called)", p.workflow)?;
    let head = ["STAGE", "ACTION", "TO DO/ITEMS", "REQUESTS", "CACHED", "PROMPT TOK", "COMPLETION TOK", "COST"];
    outln!("{}", table(&head, &rows))?;
    for s in &p.stages {
        for n in &s.plan.notes {
            outln!("{}: {n}", s.stage)?;
        }
        if let Some(e) = &s.plan.llm
            && e.requests > 0
        {
            let basis = match e.completion_tokens_expected {
                Some(_) => format!("completion from the mean of {} earlier calls", e.observed_calls),
                None => "completion at max_tokens (no earlier calls to measure)".to_string(),
            };
            outln!("{}: prompt tokens by {}; {basis}", s.stage, e.counted_by)?;
        }
    }
    Ok(0)
}

/// Expected completion tokens, and the max_tokens bound where it differs.
fn completion(e: &Estimate) -> String {
    match e.completion_tokens_expected {
        Some(x) => format!("{x} (max {})", e.completion_tokens_max),
        None => format!("<= {}", e.completion_tokens_max),
    }
}

fn usd(e: &Estimate) -> String {
    match (e.usd, e.usd_max) {
        (Some(x), Some(m)) if e.completion_tokens_expected.is_some() => format!("${x:.4} (max ${m:.4})"),
        (_, Some(m)) => format!("<= ${m:.4}"),
        _ => "no price".into(),
    }
}
