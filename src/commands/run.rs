//! `flow run` and `flow resume`: start or continue a run and print what each stage did.

use flow::engine::{self, RunReport};
use flow::progress::Progress;

use super::{fmt_duration, table};
use crate::cli::{ResumeArgs, RunArgs};
use flow::store::states::RunStatus;

pub async fn run(a: RunArgs, quiet: bool) -> anyhow::Result<u8> {
    let wf = flow::stages::load_workflow(&a.workflow)?;
    let opts = super::run_options(a.pick);
    if a.dry_run {
        return super::plan::show(&wf, &opts, a.json).await;
    }
    let report = engine::run(wf, opts, Progress::new(quiet)).await?;
    Ok(finish(&report, quiet))
}

pub async fn resume(a: ResumeArgs, quiet: bool) -> anyhow::Result<u8> {
    let wf = flow::stages::load_workflow(&a.target.workflow)?;
    let report = engine::resume(&wf.store, a.run, Progress::new(quiet)).await?;
    Ok(finish(&report, quiet))
}

/// The run's exit code. Its summary is printed, but a closed or full stdout does not change the
/// code: the run's result is in the store and `flow status` shows it again.
fn finish(r: &RunReport, quiet: bool) -> u8 {
    if !quiet {
        let _ = print(r);
    }
    r.exit_code()
}

fn print(r: &RunReport) -> anyhow::Result<()> {
    {
        let rows: Vec<Vec<String>> = r
            .stages
            .iter()
            .map(|s| {
                vec![
                    s.stage.clone(),
                    s.status.to_string(),
                    format!("{}/{}", s.items_done + s.items_cached + s.items_skipped + s.items_failed, s.items_total),
                    s.items_done.to_string(),
                    s.items_cached.to_string(),
                    s.items_skipped.to_string(),
                    s.items_failed.to_string(),
                    fmt_duration(s.started_at, s.finished_at),
                ]
            })
            .collect();
        outln!("run {} {}", r.run_id, r.shown_status())?;
        outln!("{}", table(&["STAGE", "STATUS", "ITEMS", "DONE", "STORED", "SKIPPED", "FAILED", "TIME"], &rows))?;
        for s in &r.stages {
            if let Some(e) = &s.error {
                outln!("{}: {e}", s.stage)?;
            }
        }
        if r.status != RunStatus::Succeeded {
            outln!("continue with: flow resume -w <workflow> {}", r.run_id)?;
        }
    }
    Ok(())
}
