//! SQL for `eval_results`: each retriever's metrics on an eval set, per eval stage run, and the
//! previous run's figures for the change column.

use sqlx::FromRow;

use super::{AtStore, Store, now_ms};
use crate::error::Result;

#[derive(Debug, Clone, FromRow, serde::Serialize)]
pub struct EvalRow {
    pub run_id: i64,
    pub stage: String,
    pub eval_set: String,
    pub retriever: String,
    pub model_id: Option<i64>,
    pub queries: i64,
    pub corpus: i64,
    pub metrics: String,
}

impl EvalRow {
    pub fn metrics(&self) -> std::collections::BTreeMap<String, f64> {
        serde_json::from_str(&self.metrics).unwrap_or_default()
    }
}

pub struct NewResult<'a> {
    pub run_id: i64,
    pub stage_run_id: i64,
    pub stage: &'a str,
    pub eval_set: &'a str,
    pub retriever: &'a str,
    pub model_id: Option<i64>,
    pub queries: usize,
    pub corpus: usize,
    pub metrics: &'a str,
}

/// Stores (or, on a resumed stage run, replaces) one retriever's result.
pub async fn upsert(store: &Store, r: &NewResult<'_>) -> Result<()> {
    sqlx::query(
        "INSERT OR REPLACE INTO eval_results
            (run_id, stage_run_id, stage, eval_set, retriever, model_id, queries, corpus, metrics, created_at)
         VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
    )
    .bind(r.run_id)
    .bind(r.stage_run_id)
    .bind(r.stage)
    .bind(r.eval_set)
    .bind(r.retriever)
    .bind(r.model_id)
    .bind(r.queries as i64)
    .bind(r.corpus as i64)
    .bind(r.metrics)
    .bind(now_ms())
    .execute(&store.pool)
    .await
    .at(store)?;
    Ok(())
}

const COLUMNS: &str = "run_id, stage, eval_set, retriever, model_id, queries, corpus, metrics";

/// The latest result for this stage, eval set and retriever from a run before `run_id`.
pub async fn previous(
    store: &Store,
    stage: &str,
    eval_set: &str,
    retriever: &str,
    run_id: i64,
) -> Result<Option<EvalRow>> {
    sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM eval_results WHERE stage = ? AND eval_set = ? AND retriever = ? AND run_id < ?
         ORDER BY run_id DESC LIMIT 1"
    ))
    .bind(stage)
    .bind(eval_set)
    .bind(retriever)
    .bind(run_id)
    .fetch_optional(&store.pool)
    .await
    .at(store)
}

/// The latest result of a stage's retriever on an eval set at or before `run_id` (for the report
/// and the promotion gate, when the eval stage was up to date in that run).
pub async fn latest(store: &Store, stage: &str, run_id: i64) -> Result<Vec<EvalRow>> {
    sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM eval_results WHERE stage = ?1
           AND stage_run_id = (SELECT MAX(stage_run_id) FROM eval_results WHERE stage = ?1 AND run_id <= ?2)
         ORDER BY id"
    ))
    .bind(stage)
    .bind(run_id)
    .fetch_all(&store.pool)
    .await
    .at(store)
}
