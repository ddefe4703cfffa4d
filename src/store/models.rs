//! SQL for `models` (trained augment models, their lineage and status) and `train_curves` (loss per
//! step and validation metrics per epoch).

use sqlx::FromRow;

use super::{Store, now_ms};
use crate::error::Result;

#[derive(Debug, Clone, FromRow, serde::Serialize)]
pub struct ModelRow {
    pub id: i64,
    pub stage: String,
    pub run_id: Option<i64>,
    pub path: String,
    pub parent: String,
    pub retriever: String,
    pub black_box: Option<String>,
    pub weight: f64,
    pub data_fingerprint: String,
    pub metrics: String,
    pub status: String,
    pub status_reason: Option<String>,
    pub created_at: i64,
}

pub struct NewModel<'a> {
    pub stage: &'a str,
    pub run_id: i64,
    pub stage_run_id: i64,
    pub path: &'a str,
    pub parent: &'a str,
    pub retriever: &'a str,
    pub black_box: Option<&'a str>,
    pub weight: f64,
    pub data_fingerprint: &'a str,
    pub metrics: &'a str,
}

pub async fn insert(store: &Store, m: &NewModel<'_>) -> Result<i64> {
    Ok(sqlx::query_scalar(
        "INSERT INTO models (stage, run_id, stage_run_id, path, parent, retriever, black_box, weight,
            data_fingerprint, metrics, created_at)
         VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING id",
    )
    .bind(m.stage)
    .bind(m.run_id)
    .bind(m.stage_run_id)
    .bind(m.path)
    .bind(m.parent)
    .bind(m.retriever)
    .bind(m.black_box)
    .bind(m.weight)
    .bind(m.data_fingerprint)
    .bind(m.metrics)
    .bind(now_ms())
    .fetch_one(&store.pool)
    .await?)
}

const COLUMNS: &str = "id, stage, run_id, path, parent, retriever, black_box, weight, data_fingerprint, metrics,
    status, status_reason, created_at";

/// All models, newest first.
pub async fn list(store: &Store) -> Result<Vec<ModelRow>> {
    Ok(sqlx::query_as(&format!("SELECT {COLUMNS} FROM models ORDER BY id DESC")).fetch_all(&store.pool).await?)
}

/// The newest model a stage produced (in any run).
pub async fn latest(store: &Store, stage: &str) -> Result<Option<ModelRow>> {
    Ok(sqlx::query_as(&format!("SELECT {COLUMNS} FROM models WHERE stage = ? ORDER BY id DESC LIMIT 1"))
        .bind(stage)
        .fetch_optional(&store.pool)
        .await?)
}

/// The model a stage run produced, if it got that far.
pub async fn of_stage_run(store: &Store, stage_run_id: i64) -> Result<Option<ModelRow>> {
    Ok(sqlx::query_as(&format!("SELECT {COLUMNS} FROM models WHERE stage_run_id = ? ORDER BY id DESC LIMIT 1"))
        .bind(stage_run_id)
        .fetch_optional(&store.pool)
        .await?)
}

/// One point of a training curve; a repeated step (after a resume) replaces the earlier value.
pub async fn add_curve_point(
    store: &Store,
    stage_run_id: i64,
    kind: &str,
    step: i64,
    epoch: i64,
    value: f64,
    extra: &serde_json::Value,
) -> Result<()> {
    sqlx::query(
        "INSERT OR REPLACE INTO train_curves (stage_run_id, kind, step, epoch, value, extra) VALUES (?, ?, ?, ?, ?, ?)",
    )
    .bind(stage_run_id)
    .bind(kind)
    .bind(step)
    .bind(epoch)
    .bind(value)
    .bind(extra.to_string())
    .execute(&store.pool)
    .await?;
    Ok(())
}

#[derive(Debug, Clone, FromRow, serde::Serialize)]
pub struct CurvePoint {
    pub kind: String,
    pub step: i64,
    pub epoch: i64,
    pub value: f64,
    pub extra: Option<String>,
}

pub async fn curve(store: &Store, stage_run_id: i64) -> Result<Vec<CurvePoint>> {
    Ok(sqlx::query_as(
        "SELECT kind, step, epoch, value, extra FROM train_curves WHERE stage_run_id = ? ORDER BY kind, step",
    )
    .bind(stage_run_id)
    .fetch_all(&store.pool)
    .await?)
}
