//! SQL for `models` (trained augment models, their lineage and status) and `train_curves` (loss per
//! step and validation metrics per epoch).

use super::states::ModelStatus;
use super::{AtStore, Store, now_ms};
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
    /// The model this one continued from, if it started from a trained model.
    pub parent_id: Option<i64>,
    /// What training chose on validation: hybrid alphas (own retriever, black box) and whether it beat
    /// the starting model (None: no validation).
    pub alpha: Option<f64>,
    pub black_box_alpha: Option<f64>,
    pub improved: Option<bool>,
}

pub async fn insert(store: &Store, m: &NewModel<'_>) -> Result<i64> {
    sqlx::query_scalar(
        "INSERT INTO models (stage, run_id, stage_run_id, path, parent, retriever, black_box, weight,
            data_fingerprint, metrics, parent_id, alpha, black_box_alpha, improved, created_at)
         VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING id",
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
    .bind(m.parent_id)
    .bind(m.alpha)
    .bind(m.black_box_alpha)
    .bind(m.improved)
    .bind(now_ms())
    .fetch_one(&store.pool)
    .await
    .at(store)
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
    .await
    .at(store)?;
    Ok(())
}

#[derive(Debug, Clone, sqlx::FromRow, serde::Serialize)]
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
    pub status: ModelStatus,
    pub status_reason: Option<String>,
    pub created_at: i64,
    pub parent_id: Option<i64>,
    pub gate: Option<String>,
    pub alpha: Option<f64>,
    pub black_box_alpha: Option<f64>,
    pub improved: Option<bool>,
}

const MODEL_COLUMNS: &str = "id, stage, run_id, path, parent, retriever, black_box, weight, data_fingerprint, metrics, \
                             status, status_reason, created_at, parent_id, gate, alpha, black_box_alpha, improved";

/// The newest model trained for `retriever` by one of `stages` (any stage when empty).
pub async fn latest(store: &Store, stages: &[String], retriever: &str) -> Result<Option<ModelRow>> {
    newest(store, stages, retriever, None).await
}

/// The promoted model for `retriever` among `stages` (any stage when empty).
pub async fn promoted(store: &Store, stages: &[String], retriever: &str) -> Result<Option<ModelRow>> {
    newest(store, stages, retriever, Some(ModelStatus::Promoted)).await
}

async fn newest(
    store: &Store,
    stages: &[String],
    retriever: &str,
    status: Option<ModelStatus>,
) -> Result<Option<ModelRow>> {
    let stages = serde_json::to_string(stages).expect("strings serialise");
    sqlx::query_as(&format!(
        "SELECT {MODEL_COLUMNS} FROM models WHERE retriever = ?1 AND (?3 IS NULL OR status = ?3)
           AND (json_array_length(?2) = 0 OR stage IN (SELECT value FROM json_each(?2)))
         ORDER BY id DESC LIMIT 1"
    ))
    .bind(retriever)
    .bind(stages)
    .bind(status)
    .fetch_optional(&store.pool)
    .await
    .at(store)
}

/// The curve of `kind` ("loss" or "validation") from the newest run, at or before `run_id`, in
/// which `stage` stored one: (step, epoch, value, extra JSON), by step.
pub async fn curve(
    store: &Store,
    stage: &str,
    run_id: i64,
    kind: &str,
) -> Result<Vec<(i64, i64, f64, Option<String>)>> {
    sqlx::query_as(
        "SELECT c.step, c.epoch, c.value, c.extra FROM train_curves c
         WHERE c.kind = ?3 AND c.stage_run_id = (
            SELECT MAX(s.id) FROM stage_runs s JOIN train_curves t ON t.stage_run_id = s.id
            WHERE s.stage = ?1 AND s.run_id <= ?2 AND t.kind = ?3)
         ORDER BY c.step",
    )
    .bind(stage)
    .bind(run_id)
    .bind(kind)
    .fetch_all(&store.pool)
    .await
    .at(store)
}

pub async fn get(store: &Store, id: i64) -> Result<Option<ModelRow>> {
    sqlx::query_as(&format!("SELECT {MODEL_COLUMNS} FROM models WHERE id = ?"))
        .bind(id)
        .fetch_optional(&store.pool)
        .await
        .at(store)
}

/// Every model, oldest first.
pub async fn list(store: &Store) -> Result<Vec<ModelRow>> {
    sqlx::query_as(&format!("SELECT {MODEL_COLUMNS} FROM models ORDER BY id")).fetch_all(&store.pool).await.at(store)
}

/// Promotes model `id` and retires the model it replaces (the promoted one of the same stage and
/// retriever), in one transaction.
pub async fn promote(store: &Store, id: i64, reason: &str, gate: Option<&str>) -> Result<Option<i64>> {
    let mut tx = store.pool.begin().await.at(store)?;
    let replaced: Option<i64> = sqlx::query_scalar(
        "SELECT o.id FROM models o JOIN models m ON m.id = ?1
         WHERE o.stage = m.stage AND o.retriever = m.retriever AND o.status = 'promoted' AND o.id != m.id",
    )
    .bind(id)
    .fetch_optional(&mut *tx)
    .await
    .at(store)?;
    if let Some(old) = replaced {
        sqlx::query("UPDATE models SET status = 'retired', status_reason = ? WHERE id = ?")
            .bind(format!("replaced by model {id}"))
            .bind(old)
            .execute(&mut *tx)
            .await
            .at(store)?;
    }
    sqlx::query("UPDATE models SET status = 'promoted', status_reason = ?, gate = COALESCE(?, gate) WHERE id = ?")
        .bind(reason)
        .bind(gate)
        .bind(id)
        .execute(&mut *tx)
        .await
        .at(store)?;
    tx.commit().await.at(store)?;
    Ok(replaced)
}

/// Leaves model `id` a candidate, with the reason it was not promoted.
pub async fn keep_candidate(store: &Store, id: i64, reason: &str, gate: &str) -> Result<()> {
    sqlx::query("UPDATE models SET status = 'candidate', status_reason = ?, gate = ? WHERE id = ?")
        .bind(reason)
        .bind(gate)
        .bind(id)
        .execute(&store.pool)
        .await
        .at(store)?;
    Ok(())
}
