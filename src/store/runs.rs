//! SQL for `runs` and `stage_runs`: the history of every `flow run` and what each stage did in it.

use sqlx::FromRow;

use super::states::{RunStatus, StageStatus};
use super::{AtStore, Store, now_ms};
use crate::error::Result;

#[derive(Debug, Clone, FromRow, serde::Serialize)]
pub struct RunRow {
    pub id: i64,
    pub workflow: String,
    pub workflow_path: String,
    pub status: RunStatus,
    pub args: String,
    pub pid: Option<i64>,
    pub started_at: i64,
    pub finished_at: Option<i64>,
    /// `budget: ...` when a budget stopped it.
    pub stop_reason: Option<String>,
}

impl RunRow {
    /// `stopped (budget)` for a run a budget stopped, else the stored status.
    pub fn shown_status(&self) -> String {
        match (self.status, &self.stop_reason) {
            (RunStatus::Interrupted, Some(r)) if r.starts_with("budget") => "stopped (budget)".into(),
            (s, _) => s.to_string(),
        }
    }
}

#[derive(Debug, Clone, FromRow, serde::Serialize)]
pub struct StageRunRow {
    pub id: i64,
    pub run_id: i64,
    pub stage: String,
    pub kind: String,
    pub fingerprint: String,
    pub status: StageStatus,
    pub items_total: i64,
    pub items_done: i64,
    pub items_cached: i64,
    pub items_skipped: i64,
    pub items_failed: i64,
    pub summary: Option<String>,
    pub error: Option<String>,
    pub started_at: Option<i64>,
    pub finished_at: Option<i64>,
    pub llm_calls: i64,
    pub llm_cached: i64,
    pub llm_failures: i64,
    pub prompt_tokens: i64,
    pub completion_tokens: i64,
    pub cost: Option<f64>,
    /// Attempts of this stage in this run (a resume is another), and what the earlier ones spent.
    pub attempts: i64,
    pub earlier_calls: i64,
    pub earlier_cached: i64,
    pub earlier_failures: i64,
    pub earlier_prompt_tokens: i64,
    pub earlier_completion_tokens: i64,
    pub earlier_cost: Option<f64>,
    /// The plan's estimate of the stage's LLM use when it first started in this run (JSON).
    pub estimate: Option<String>,
}

impl StageRunRow {
    /// LLM usage of the last attempt.
    pub fn last_attempt(&self) -> UsageSnapshot {
        UsageSnapshot {
            calls: self.llm_calls as u64,
            cached: self.llm_cached as u64,
            failures: self.llm_failures as u64,
            prompt_tokens: self.prompt_tokens as u64,
            completion_tokens: self.completion_tokens as u64,
            cost: self.cost,
        }
    }

    /// LLM usage of every attempt of this stage in this run.
    pub fn all_attempts(&self) -> UsageSnapshot {
        let earlier = UsageSnapshot {
            calls: self.earlier_calls as u64,
            cached: self.earlier_cached as u64,
            failures: self.earlier_failures as u64,
            prompt_tokens: self.earlier_prompt_tokens as u64,
            completion_tokens: self.earlier_completion_tokens as u64,
            cost: self.earlier_cost,
        };
        earlier + self.last_attempt()
    }
}

/// Item counts a stage reports as it works.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    pub total: i64,
    pub done: i64,
    pub cached: i64,
    pub skipped: i64,
    pub failed: i64,
}

pub async fn create(store: &Store, workflow: &str, path: &str, args: &str) -> Result<i64> {
    let id = sqlx::query(
        "INSERT INTO runs (workflow, workflow_path, status, args, pid, started_at) VALUES (?, ?, ?, ?, ?, ?)",
    )
    .bind(workflow)
    .bind(path)
    .bind(RunStatus::Running)
    .bind(args)
    .bind(std::process::id() as i64)
    .bind(now_ms())
    .execute(&store.pool)
    .await
    .at(store)?
    .last_insert_rowid();
    Ok(id)
}

pub async fn reopen(store: &Store, id: i64) -> Result<()> {
    sqlx::query("UPDATE runs SET status = 'running', pid = ?, finished_at = NULL, stop_reason = NULL WHERE id = ?")
        .bind(std::process::id() as i64)
        .bind(id)
        .execute(&store.pool)
        .await
        .at(store)?;
    Ok(())
}

pub async fn finish(store: &Store, id: i64, status: RunStatus, stop_reason: Option<&str>) -> Result<()> {
    sqlx::query("UPDATE runs SET status = ?, finished_at = ?, stop_reason = ? WHERE id = ?")
        .bind(status)
        .bind(now_ms())
        .bind(stop_reason)
        .bind(id)
        .execute(&store.pool)
        .await
        .at(store)?;
    Ok(())
}

/// Called with the run lock held: anything still marked running was left by a process that died.
pub async fn mark_interrupted(store: &Store) -> Result<u64> {
    let mut tx = store.pool.begin().await.at(store)?;
    let n = sqlx::query("UPDATE runs SET status = 'interrupted' WHERE status = 'running'")
        .execute(&mut *tx)
        .await
        .at(store)?
        .rows_affected();
    sqlx::query("UPDATE stage_runs SET status = 'interrupted' WHERE status IN ('running', 'pending')")
        .execute(&mut *tx)
        .await
        .at(store)?;
    tx.commit().await.at(store)?;
    Ok(n)
}

pub async fn get(store: &Store, id: i64) -> Result<Option<RunRow>> {
    sqlx::query_as("SELECT * FROM runs WHERE id = ?").bind(id).fetch_optional(&store.pool).await.at(store)
}

pub async fn latest(store: &Store) -> Result<Option<RunRow>> {
    sqlx::query_as("SELECT * FROM runs ORDER BY id DESC LIMIT 1").fetch_optional(&store.pool).await.at(store)
}

pub async fn latest_unfinished(store: &Store) -> Result<Option<RunRow>> {
    sqlx::query_as("SELECT * FROM runs WHERE status IN ('failed', 'interrupted', 'running') ORDER BY id DESC LIMIT 1")
        .fetch_optional(&store.pool)
        .await
        .at(store)
}

pub async fn list(store: &Store, limit: i64) -> Result<Vec<RunRow>> {
    sqlx::query_as("SELECT * FROM runs ORDER BY id DESC LIMIT ?").bind(limit).fetch_all(&store.pool).await.at(store)
}

/// Records a stage's state in a run. A later attempt of the same run (a resume) starts its counts
/// afresh and adds the earlier attempt's LLM usage to the `earlier_*` totals.
pub async fn set_stage(
    store: &Store,
    run_id: i64,
    stage: &str,
    kind: &str,
    fp: &str,
    status: StageStatus,
) -> Result<i64> {
    let now = now_ms();
    let running = status == StageStatus::Running;
    let id = sqlx::query_scalar(
        "INSERT INTO stage_runs (run_id, stage, kind, fingerprint, status, started_at, finished_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
         ON CONFLICT (run_id, stage) DO UPDATE SET
            kind = excluded.kind, fingerprint = excluded.fingerprint, status = excluded.status,
            started_at = excluded.started_at, finished_at = excluded.finished_at, error = NULL, summary = NULL,
            items_total = 0, items_done = 0, items_cached = 0, items_skipped = 0, items_failed = 0,
            attempts = stage_runs.attempts + 1,
            earlier_calls = stage_runs.earlier_calls + stage_runs.llm_calls,
            earlier_cached = stage_runs.earlier_cached + stage_runs.llm_cached,
            earlier_failures = stage_runs.earlier_failures + stage_runs.llm_failures,
            earlier_prompt_tokens = stage_runs.earlier_prompt_tokens + stage_runs.prompt_tokens,
            earlier_completion_tokens = stage_runs.earlier_completion_tokens + stage_runs.completion_tokens,
            earlier_cost = CASE WHEN stage_runs.earlier_cost IS NULL AND stage_runs.cost IS NULL THEN NULL
                                ELSE COALESCE(stage_runs.earlier_cost, 0) + COALESCE(stage_runs.cost, 0) END,
            llm_calls = 0, llm_cached = 0, llm_failures = 0, prompt_tokens = 0, completion_tokens = 0, cost = NULL
         RETURNING id",
    )
    .bind(run_id)
    .bind(stage)
    .bind(kind)
    .bind(fp)
    .bind(status)
    .bind(now)
    .bind(if running { None } else { Some(now) })
    .fetch_one(&store.pool)
    .await
    .at(store)?;
    Ok(id)
}

/// Live counts of a running stage. A finished stage is left alone: a late tick (its statement already
/// on the connection when the ticker stopped) must not overwrite the final counts.
pub async fn update_counts(store: &Store, id: i64, c: Counts) -> Result<()> {
    sqlx::query(
        "UPDATE stage_runs SET items_total = ?, items_done = ?, items_cached = ?, items_skipped = ?, items_failed = ?
         WHERE id = ? AND status = 'running'",
    )
    .bind(c.total)
    .bind(c.done)
    .bind(c.cached)
    .bind(c.skipped)
    .bind(c.failed)
    .bind(id)
    .execute(&store.pool)
    .await
    .at(store)?;
    Ok(())
}

pub async fn finish_stage(
    store: &Store,
    id: i64,
    status: StageStatus,
    c: Counts,
    summary: Option<&str>,
    error: Option<&str>,
) -> Result<()> {
    sqlx::query(
        "UPDATE stage_runs SET items_total = ?, items_done = ?, items_cached = ?, items_skipped = ?, items_failed = ?,
            status = ?, summary = ?, error = ?, finished_at = ? WHERE id = ?",
    )
    .bind(c.total)
    .bind(c.done)
    .bind(c.cached)
    .bind(c.skipped)
    .bind(c.failed)
    .bind(status)
    .bind(summary)
    .bind(error)
    .bind(now_ms())
    .bind(id)
    .execute(&store.pool)
    .await
    .at(store)?;
    Ok(())
}

/// A succeeded run of `stage` with this fingerprint, if any: the stage is then up to date.
/// The run whose result `stage` still stands on, if that result was made with fingerprint `fp`:
/// the stage's newest good result must have this fingerprint. An older result with the same
/// fingerprint does not count, since a run with other settings may have changed the store since
/// (settings A, then B, then A again runs A again; its stored items make that cheap).
pub async fn find_succeeded(store: &Store, stage: &str, fp: &str) -> Result<Option<i64>> {
    let newest: Option<(String, i64)> = sqlx::query_as(
        "SELECT fingerprint, run_id FROM stage_runs WHERE stage = ? AND status IN ('succeeded', 'up_to_date')
         ORDER BY id DESC LIMIT 1",
    )
    .bind(stage)
    .fetch_optional(&store.pool)
    .await
    .at(store)?;
    let Some((newest_fp, newest_run)) = newest.filter(|(f, _)| f == fp) else { return Ok(None) };
    let made_in: Option<i64> = sqlx::query_scalar(
        "SELECT run_id FROM stage_runs WHERE stage = ? AND fingerprint = ? AND status = 'succeeded'
         ORDER BY id DESC LIMIT 1",
    )
    .bind(stage)
    .bind(&newest_fp)
    .fetch_optional(&store.pool)
    .await
    .at(store)?;
    Ok(Some(made_in.unwrap_or(newest_run)))
}

/// The fingerprint of the newest successful (or up-to-date) result of `stage`.
pub async fn latest_good_fingerprint(store: &Store, stage: &str) -> Result<Option<String>> {
    sqlx::query_scalar(
        "SELECT fingerprint FROM stage_runs WHERE stage = ? AND status IN ('succeeded', 'up_to_date')
         ORDER BY id DESC LIMIT 1",
    )
    .bind(stage)
    .fetch_optional(&store.pool)
    .await
    .at(store)
}

pub async fn stages_of(store: &Store, run_id: i64) -> Result<Vec<StageRunRow>> {
    sqlx::query_as("SELECT * FROM stage_runs WHERE run_id = ? ORDER BY id")
        .bind(run_id)
        .fetch_all(&store.pool)
        .await
        .at(store)
}

/// A stage run's LLM accounting: calls made, answers from the cache, failures, tokens, cost.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct UsageSnapshot {
    pub calls: u64,
    pub cached: u64,
    pub failures: u64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub cost: Option<f64>,
}

impl std::ops::Add for UsageSnapshot {
    type Output = UsageSnapshot;

    /// Two clients' usage as one stage's (the cost is known if either side's is).
    fn add(self, o: UsageSnapshot) -> UsageSnapshot {
        UsageSnapshot {
            calls: self.calls + o.calls,
            cached: self.cached + o.cached,
            failures: self.failures + o.failures,
            prompt_tokens: self.prompt_tokens + o.prompt_tokens,
            completion_tokens: self.completion_tokens + o.completion_tokens,
            cost: match (self.cost, o.cost) {
                (None, None) => None,
                (a, b) => Some(a.unwrap_or(0.0) + b.unwrap_or(0.0)),
            },
        }
    }
}

/// LLM accounting of a stage run: calls made, answers from the cache, failures, tokens, cost.
pub async fn set_llm_usage(store: &Store, id: i64, u: &UsageSnapshot) -> Result<()> {
    sqlx::query(
        "UPDATE stage_runs SET llm_calls = ?, llm_cached = ?, llm_failures = ?, prompt_tokens = ?,
            completion_tokens = ?, cost = ? WHERE id = ?",
    )
    .bind(u.calls as i64)
    .bind(u.cached as i64)
    .bind(u.failures as i64)
    .bind(u.prompt_tokens as i64)
    .bind(u.completion_tokens as i64)
    .bind(u.cost)
    .bind(id)
    .execute(&store.pool)
    .await
    .at(store)?;
    Ok(())
}

/// Records the plan's estimate of a stage run; a resumed attempt keeps the first one.
pub async fn set_estimate(store: &Store, id: i64, estimate: &str) -> Result<()> {
    sqlx::query("UPDATE stage_runs SET estimate = COALESCE(estimate, ?) WHERE id = ?")
        .bind(estimate)
        .bind(id)
        .execute(&store.pool)
        .await
        .at(store)?;
    Ok(())
}

/// Each run's LLM cost over every attempt of its stages; None where no call had a `price:`.
pub async fn costs(store: &Store) -> Result<std::collections::HashMap<i64, Option<f64>>> {
    let rows: Vec<(i64, f64, i64)> = sqlx::query_as(
        "SELECT run_id, TOTAL(COALESCE(cost, 0) + COALESCE(earlier_cost, 0)), COUNT(cost) + COUNT(earlier_cost)
         FROM stage_runs GROUP BY run_id",
    )
    .fetch_all(&store.pool)
    .await
    .at(store)?;
    Ok(rows.into_iter().map(|(id, cost, priced)| (id, (priced > 0).then_some(cost))).collect())
}
