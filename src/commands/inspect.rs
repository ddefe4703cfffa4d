//! `flow status`, `flow runs`, `flow pairs`, `flow answers` and `flow report`: read the store and
//! show it.

use flow::llm::plan::Estimate;
use flow::store::states::RunStatus;
use flow::store::{Store, batches, pairs, rag_answers, runs};

use super::{fmt_duration, fmt_time, table};
use crate::cli::{AnswersArgs, PairsArgs, ReportArgs, RunsArgs, StatusArgs, Target};

async fn open(t: &Target) -> anyhow::Result<Store> {
    let wf = flow::stages::load_workflow(&t.workflow)?;
    Ok(Store::open_existing(&wf.store).await?)
}

/// A run left 'running' while no live process holds the store lock was killed.
/// A run's status as a person needs it: `interrupted` for one left running by a dead process,
/// `stopped (budget)` for one a budget stopped.
fn live_status(store: &Store, run: &runs::RunRow) -> String {
    if run.status == RunStatus::Running && !flow::engine::lock::holder_alive(&store.path) {
        "interrupted".into()
    } else {
        run.shown_status()
    }
}

pub async fn status(a: StatusArgs) -> anyhow::Result<u8> {
    let store = open(&a.target).await?;
    let run = match a.run {
        Some(id) => runs::get(&store, id).await?,
        None => runs::latest(&store).await?,
    };
    let Some(run) = run else {
        return Err(flow::Error::bad_input(
            match a.run {
                Some(id) => format!("run {id} is not in this store"),
                None => "this store has no runs yet".into(),
            },
            "list runs with `flow runs -w WORKFLOW`",
        )
        .into());
    };
    let status = live_status(&store, &run);
    let stages = runs::stages_of(&store, run.id).await?;
    let sent = batches::of_run(&store, run.id).await?;
    if a.json {
        status_json(&run, &status, &stages, &sent)?;
        return Ok(0);
    }
    outln!(
        "run {} of {}: {status}, started {}, {}",
        run.id,
        run.workflow,
        fmt_time(run.started_at),
        fmt_duration(Some(run.started_at), run.finished_at)
    )?;
    if let Some(why) = &run.stop_reason {
        outln!("stopped by {why}")?;
    }
    let rows: Vec<Vec<String>> = stages
        .iter()
        .map(|s| {
            vec![
                s.stage.clone(),
                s.kind.clone(),
                s.status.to_string(),
                s.items_total.to_string(),
                s.items_done.to_string(),
                s.items_cached.to_string(),
                s.items_skipped.to_string(),
                s.items_failed.to_string(),
                fmt_duration(s.started_at, s.finished_at),
            ]
        })
        .collect();
    outln!("{}", table(&["STAGE", "KIND", "STATUS", "TOTAL", "DONE", "STORED", "SKIPPED", "FAILED", "TIME"], &rows))?;
    usage_table(&stages)?;
    batch_table(&sent)?;
    stage_notes(&stages)?;
    let report = flow::report::default_path(&store.path, run.id);
    if report.exists() {
        outln!("\nreport: {}", report.display())?;
    } else {
        outln!("\nreport: {} (not written yet: `flow report -w {}`)", report.display(), a.target.workflow.display())?;
    }
    Ok(0)
}

/// `flow status --json`: the run row with its shown status, batches and stages (summaries as JSON).
fn status_json(
    run: &runs::RunRow,
    status: &str,
    stages: &[runs::StageRunRow],
    sent: &[batches::BatchRow],
) -> anyhow::Result<()> {
    let mut v = serde_json::to_value(run)?;
    v["status"] = status.into();
    v["batches"] = serde_json::to_value(sent)?;
    v["stages"] = serde_json::to_value(stages)?;
    for s in v["stages"].as_array_mut().into_iter().flatten() {
        if let Some(summary) = s["summary"].as_str().and_then(|x| serde_json::from_str::<serde_json::Value>(x).ok()) {
            s["summary"] = summary;
        }
    }
    outln!("{}", serde_json::to_string_pretty(&v)?)?;
    Ok(())
}

/// The LLM calls of each stage over every attempt, beside the plan's estimate, and the run's total.
fn usage_table(stages: &[runs::StageRunRow]) -> anyhow::Result<()> {
    let usage_row = |name: String, u: &flow::store::runs::UsageSnapshot, est: Option<&Estimate>, last: String| {
        vec![
            name,
            u.calls.to_string(),
            u.cached.to_string(),
            u.failures.to_string(),
            u.prompt_tokens.to_string(),
            u.completion_tokens.to_string(),
            u.cost.map(|c| format!("${c:.4}")).unwrap_or_else(|| "-".into()),
            est.map_or_else(
                || "-".into(),
                |e| format!("{} calls, {} tok", e.requests, e.prompt_tokens + e.completion_tokens()),
            ),
            est.and_then(Estimate::shown_usd).unwrap_or_else(|| "-".into()),
            last,
        ]
    };
    let used: Vec<_> = stages
        .iter()
        .filter(|s| s.all_attempts().calls + s.all_attempts().cached > 0 || s.estimate.is_some())
        .collect();
    if used.is_empty() {
        return Ok(());
    }
    let mut rows: Vec<Vec<String>> = used
        .iter()
        .map(|s| {
            let last = match s.attempts {
                1 => "-".to_string(),
                n => {
                    let l = s.last_attempt();
                    format!("{} calls, {} tok (attempt {n})", l.calls, l.prompt_tokens + l.completion_tokens)
                }
            };
            usage_row(s.stage.clone(), &s.all_attempts(), Estimate::of(s).as_ref(), last)
        })
        .collect();
    let run_total = stages.iter().map(|s| s.all_attempts()).fold(Default::default(), |a, b| a + b);
    let run_estimate = Estimate::of_run(stages);
    rows.push(usage_row("(run)".into(), &run_total, run_estimate.as_ref(), String::new()));
    outln!(
        "\nLLM calls over every attempt (calls include retries; cached answers cost nothing), beside the plan's estimate at each stage's start"
    )?;
    let header = [
        "STAGE",
        "CALLS",
        "CACHED",
        "FAILED",
        "PROMPT TOK",
        "COMPLETION TOK",
        "COST",
        "ESTIMATE",
        "EST. COST",
        "LAST ATTEMPT",
    ];
    outln!("{}", table(&header, &rows))?;
    Ok(())
}

/// The run's Batch API batches, if it sent any.
fn batch_table(sent: &[batches::BatchRow]) -> anyhow::Result<()> {
    if sent.is_empty() {
        return Ok(());
    }
    let rows: Vec<Vec<String>> = sent
        .iter()
        .map(|b| {
            vec![
                b.stage.clone(),
                b.batch_id.clone().unwrap_or_else(|| "-".into()),
                b.status.to_string(),
                format!("{}/{}", b.completed, b.requests),
                b.failed.to_string(),
                if b.ingested_at.is_some() { "yes" } else { "no" }.into(),
                b.error.clone().unwrap_or_default(),
            ]
        })
        .collect();
    outln!("\nBatches (the Batch API)")?;
    outln!("{}", table(&["STAGE", "BATCH", "STATE", "DONE", "FAILED", "READ", "ERROR"], &rows))?;
    Ok(())
}

/// Each stage's error, the figures of its summary and the files it skipped.
fn stage_notes(stages: &[runs::StageRunRow]) -> anyhow::Result<()> {
    for s in stages {
        if let Some(e) = &s.error {
            // `failed`, `blocked`, or `interrupted` (a budget's stop names the budget).
            outln!("\n{} {}: {e}", s.stage, s.status)?;
        }
        let Some(summary) = s.summary.as_deref().and_then(|x| serde_json::from_str::<serde_json::Value>(x).ok()) else {
            continue;
        };
        let Some(obj) = summary.as_object() else {
            continue;
        };
        let figures: Vec<String> = obj.iter().filter(|(_, v)| v.is_number()).map(|(k, v)| format!("{k} {v}")).collect();
        if !figures.is_empty() {
            outln!("\n{}: {}", s.stage, figures.join(", "))?;
        }
        for skip in obj.get("skipped").and_then(|v| v.as_array()).into_iter().flatten().take(20) {
            outln!("  skipped {}: {}", skip["path"].as_str().unwrap_or("?"), skip["reason"].as_str().unwrap_or("?"))?;
        }
    }
    Ok(())
}

pub async fn runs(a: RunsArgs) -> anyhow::Result<u8> {
    let store = open(&a.target).await?;
    let rows = runs::list(&store, a.limit).await?;
    let costs = runs::costs(&store).await?;
    let cost_of = |id: i64| costs.get(&id).copied().flatten();
    let mut estimates = std::collections::HashMap::new();
    for r in &rows {
        estimates.insert(r.id, Estimate::of_run(&runs::stages_of(&store, r.id).await?));
    }
    if a.json {
        let v: Vec<serde_json::Value> = rows
            .iter()
            .map(|r| {
                let mut v = serde_json::to_value(r).unwrap_or_default();
                v["status"] = live_status(&store, r).into();
                v["cost"] = cost_of(r.id).into();
                v["estimate"] = serde_json::to_value(&estimates[&r.id]).unwrap_or_default();
                v
            })
            .collect();
        outln!("{}", serde_json::to_string_pretty(&v)?)?;
        return Ok(0);
    }
    let table_rows: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            vec![
                r.id.to_string(),
                live_status(&store, r),
                fmt_time(r.started_at),
                fmt_duration(Some(r.started_at), r.finished_at),
                cost_of(r.id).map_or_else(|| "-".into(), |c| format!("${c:.4}")),
                estimates[&r.id].as_ref().and_then(Estimate::shown_usd).unwrap_or_else(|| "-".into()),
                r.args.clone(),
            ]
        })
        .collect();
    outln!("{}", table(&["RUN", "STATUS", "STARTED", "TIME", "COST", "EST. COST", "OPTIONS"], &table_rows))?;
    Ok(0)
}

pub async fn pairs(a: PairsArgs) -> anyhow::Result<u8> {
    let store = open(&a.target).await?;
    let rows = pairs::list(&store, a.run, a.verdict.as_deref(), a.limit).await?;
    if a.json {
        outln!("{}", serde_json::to_string_pretty(&rows)?)?;
        return Ok(0);
    }
    if rows.is_empty() {
        outln!("no pairs yet (they come from the generate and judge stages)")?;
    }
    for p in &rows {
        let passage: String = p.passage.chars().take(240).collect::<String>().replace('\n', " ");
        let page = p.page.map(|n| format!(" p.{n}")).unwrap_or_default();
        let score = match (p.expected, p.score) {
            (Some(e), _) => format!(" score {e:.2}"),
            (None, Some(s)) => format!(" score {s}"),
            _ => String::new(),
        };
        outln!("#{} [{}{score}] ({}) {}", p.query_id, p.verdict, p.kind, p.query)?;
        outln!("   {}{page} ({})", p.document, p.generator)?;
        outln!("   {passage}{}", if p.passage.chars().count() > 240 { "..." } else { "" })?;
        if let Some(r) = &p.reason {
            outln!("   judge: {r}")?;
        }
    }
    Ok(0)
}

pub async fn answers(a: AnswersArgs) -> anyhow::Result<u8> {
    let store = open(&a.target).await?;
    let rows = rag_answers::list(&store, a.run, a.retriever.as_deref(), a.grade.as_deref(), a.limit).await?;
    if a.json {
        outln!("{}", serde_json::to_string_pretty(&rows)?)?;
        return Ok(0);
    }
    if rows.is_empty() {
        outln!("no answers yet (they come from eval_rag stages)")?;
    }
    for r in &rows {
        let hit = if r.hit { "relevant passage retrieved" } else { "no relevant passage retrieved" };
        outln!("[{}] {} / run {} / {}: {}", r.grade, r.retriever, r.run_id, r.question_id, r.question)?;
        outln!("   answer: {}", r.answer.as_deref().unwrap_or("(none)").replace('\n', " "))?;
        outln!("   passages {} ({hit})", r.passages)?;
        if let Some(why) = &r.reason {
            outln!("   grade: {}", why.replace('\n', " "))?;
        }
    }
    Ok(0)
}

pub async fn report(a: ReportArgs) -> anyhow::Result<u8> {
    let store = open(&a.target).await?;
    let run = match a.run {
        Some(id) => id,
        None => runs::latest(&store).await?.map(|r| r.id).ok_or_else(|| {
            flow::Error::bad_input("this store has no runs yet", "run the workflow first: `flow run WORKFLOW`")
        })?,
    };
    let html = flow::report::build(&store, run).await?;
    let path = a.output.unwrap_or_else(|| flow::report::default_path(&store.path, run));
    let tmp = path.with_extension("html.partial");
    std::fs::write(&tmp, html).map_err(|e| anyhow::anyhow!("cannot write {}: {e}", tmp.display()))?;
    std::fs::rename(&tmp, &path).map_err(|e| anyhow::anyhow!("cannot write {}: {e}", path.display()))?;
    outln!("{}", path.display())?;
    Ok(0)
}
