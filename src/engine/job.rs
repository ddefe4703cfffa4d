//! One stage's turn in a run: its fingerprint and up-to-date check, the stage itself, and what is
//! recorded of it (its stage run, its counts, what a budget stop spent).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use crate::error::{Error, Result};
use crate::llm::budget::{self, Budgets, Spent};
use crate::progress::Progress;
use crate::stages::{Stage, StageCtx};
use crate::store::Store;
use crate::store::runs::{self, Counts};
use crate::store::states::StageStatus;
use crate::workflow::Workflow;

use super::{Failed, STOPPED_BUDGET, fingerprint, spent_of};

/// One stage's turn: fingerprint, up-to-date check, run, record.
pub(super) struct Job {
    pub(super) stage: Arc<dyn Stage>,
    pub(super) wf: Arc<Workflow>,
    pub(super) store: Store,
    pub(super) run_id: i64,
    pub(super) name: String,
    pub(super) upstream: Vec<(String, String)>,
    pub(super) force: bool,
    pub(super) progress: Progress,
    pub(super) budgets: Arc<Budgets>,
}

impl Job {
    /// Ok(fingerprint) when the stage succeeded or was up to date; Err(whether the input was bad)
    /// when it failed.
    pub(super) async fn run(self) -> Result<String, Failed> {
        let mut recorded = false;
        match self.attempt(&mut recorded).await {
            Ok(fp) => Ok(fp),
            Err(Error::Budget { what }) => {
                self.progress.log(&format!("[{}] stopped: {what}", self.name));
                Err(Failed::Budget(what))
            }
            Err(Error::Interrupted) => {
                self.progress.log(&format!("[{}] stopped by a signal", self.name));
                Err(Failed::Other)
            }
            Err(e) => {
                self.progress.log(&format!("[{}] failed: {e}", self.name));
                if !recorded {
                    // Failed before it started (reading its inputs): still on record, with the reason.
                    let kind = &self.wf.stages[&self.name].kind;
                    if let Ok(id) =
                        runs::set_stage(&self.store, self.run_id, &self.name, kind, "", StageStatus::Failed).await
                    {
                        let msg = e.to_string();
                        let _ = runs::finish_stage(
                            &self.store,
                            id,
                            StageStatus::Failed,
                            Counts::default(),
                            None,
                            Some(&msg),
                        )
                        .await;
                    }
                }
                Err(if e.exit_code() == 2 { Failed::Input } else { Failed::Other })
            }
        }
    }

    async fn attempt(&self, recorded: &mut bool) -> Result<String> {
        let spec = &self.wf.stages[&self.name];
        let fp = fingerprint(&spec.kind, &spec.params, &self.stage.inputs().await?, &self.upstream);
        *recorded = true;
        let mut previous = match self.force {
            true => None,
            false => runs::find_succeeded(&self.store, &self.name, &fp).await?,
        };
        if previous.is_some() && !self.stage.outputs_intact(&self.store).await? {
            self.progress.log(&format!("[{}] its stored output is gone from disk: running it again", self.name));
            previous = None;
        }
        if let Some(prev) = previous {
            let id =
                runs::set_stage(&self.store, self.run_id, &self.name, &spec.kind, &fp, StageStatus::UpToDate).await?;
            runs::finish_stage(
                &self.store,
                id,
                StageStatus::UpToDate,
                Counts::default(),
                Some(&format!("{{\"same_as_run\":{prev}}}")),
                None,
            )
            .await?;
            self.progress.log(&format!("[{}] up to date (same inputs as run {prev})", self.name));
            return Ok(fp);
        }
        let id = runs::set_stage(&self.store, self.run_id, &self.name, &spec.kind, &fp, StageStatus::Running).await?;
        self.record_estimate(id).await;
        // What earlier attempts of this stage in this run spent counts against its budget.
        let earlier = runs::stages_of(&self.store, self.run_id)
            .await?
            .into_iter()
            .find(|s| s.id == id)
            .map(|s| spent_of(s.all_attempts()))
            .unwrap_or_default();
        let (ledger, ledgers) = self.budgets.open_stage(&self.name, spec.budget.unwrap_or_default(), earlier);
        let ctx = StageCtx {
            run_id: self.run_id,
            stage_run_id: id,
            spec: spec.clone(),
            workflow: self.wf.clone(),
            store: self.store.clone(),
            progress: self.progress.stage(&self.name),
            ledgers,
        };
        // Counts reach the store every two seconds so `flow status` can watch a live run.
        let ticker = {
            let (store, p) = (self.store.clone(), ctx.progress.clone());
            tokio::spawn(async move {
                let mut every = tokio::time::interval(Duration::from_secs(2));
                loop {
                    every.tick().await;
                    let _ = runs::update_counts(&store, id, p.counts()).await;
                }
            })
        };
        let result = self.stage.run(&ctx).await;
        ticker.abort();
        let _ = ticker.await;
        let counts = ctx.progress.counts();
        match result {
            Ok(out) => {
                let summary = (!out.summary.is_null()).then(|| out.summary.to_string());
                let status = if out.failure.is_some() { StageStatus::Failed } else { StageStatus::Succeeded };
                runs::finish_stage(&self.store, id, status, counts, summary.as_deref(), out.failure.as_deref()).await?;
                ctx.progress.finish(status.as_str());
                match out.failure {
                    None => Ok(fp),
                    Some(f) => Err(Error::Stage { stage: self.name.clone(), message: f }),
                }
            }
            Err(e @ Error::Budget { .. }) => {
                stopped_by_budget(&self.store, id, counts, &ledger, earlier, &e).await?;
                ctx.progress.finish(STOPPED_BUDGET);
                Err(e)
            }
            Err(Error::Interrupted) => {
                runs::finish_stage(&self.store, id, StageStatus::Interrupted, counts, None, None).await?;
                ctx.progress.finish(StageStatus::Interrupted.as_str());
                Err(Error::Interrupted)
            }
            Err(e) => {
                runs::finish_stage(&self.store, id, StageStatus::Failed, counts, None, Some(&e.to_string())).await?;
                ctx.progress.finish(StageStatus::Failed.as_str());
                Err(e)
            }
        }
    }
}

impl Job {
    /// Records what the plan expects this stage to send, to show beside what it spent. A plan that
    /// cannot be made costs the run nothing but the figure.
    async fn record_estimate(&self, id: i64) {
        let spec = &self.wf.stages[&self.name];
        let none = BTreeMap::new();
        let cx =
            crate::stages::PlanCtx { store: &self.store, spec, workflow: &self.wf, upstream: &none, forecast: false };
        match self.stage.plan(&cx).await {
            Ok(p) => {
                if let Some(e) = p.llm {
                    let _ = runs::set_estimate(&self.store, id, &serde_json::to_string(&e).unwrap_or_default()).await;
                }
            }
            Err(e) => self.progress.log(&format!("[{}] no cost estimate: {e}", self.name)),
        }
    }
}

/// A stage a budget stopped: it returned at the refusal, so its requests in flight are awaited (their
/// answers land in the cache) and what this attempt spent is put on record for the budget of a resume.
async fn stopped_by_budget(
    store: &Store,
    id: i64,
    counts: Counts,
    ledger: &budget::Ledger,
    earlier: Spent,
    e: &Error,
) -> Result<()> {
    let _ = tokio::time::timeout(Duration::from_secs(300), ledger.idle()).await;
    let s = ledger.spent();
    let usage = runs::UsageSnapshot {
        calls: s.requests.saturating_sub(earlier.requests),
        cached: 0,
        failures: 0,
        prompt_tokens: s.prompt_tokens.saturating_sub(earlier.prompt_tokens),
        completion_tokens: s.completion_tokens.saturating_sub(earlier.completion_tokens),
        cost: Some((s.usd - earlier.usd).max(0.0)),
    };
    runs::set_llm_usage(store, id, &usage).await?;
    runs::finish_stage(store, id, StageStatus::Interrupted, counts, None, Some(&e.to_string())).await
}
