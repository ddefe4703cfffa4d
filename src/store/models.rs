//! SQL for `models` (trained augment models, their lineage and status) and `train_curves` (loss per
//! step and validation metrics per epoch).

use super::{Store, now_ms};
use crate::error::Result;

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
