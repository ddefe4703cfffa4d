//! SQL for `batches` and `batch_requests`: the Batch API batches a stage sent, their state, and
//! which cached requests each one answers.

use sqlx::FromRow;

use super::states::BatchState;
use super::{AtStore, Store, now_ms};
use crate::error::Result;

#[derive(Debug, Clone, FromRow, serde::Serialize)]
pub struct BatchRow {
    pub id: i64,
    pub run_id: Option<i64>,
    pub stage: String,
    pub base_url: String,
    pub model: String,
    pub status: BatchState,
    pub input_file_id: Option<String>,
    pub batch_id: Option<String>,
    pub output_file_id: Option<String>,
    pub error_file_id: Option<String>,
    pub requests: i64,
    pub completed: i64,
    pub failed: i64,
    pub bytes: i64,
    pub error: Option<String>,
    pub created_at: i64,
    pub updated_at: i64,
    pub ingested_at: Option<i64>,
}

impl BatchRow {
    /// Whether the API will do no more with it (its answers may still wait to be read).
    pub fn finished(&self) -> bool {
        self.status.finished()
    }

    /// Whether flow is done with it: its answers read, or nothing was ever created from it.
    pub fn closed(&self) -> bool {
        self.ingested_at.is_some() || self.status == BatchState::Abandoned
    }
}

/// A batch about to be uploaded: its row and request hashes in one transaction.
pub struct NewBatch<'a> {
    pub run_id: Option<i64>,
    pub stage: &'a str,
    pub base_url: &'a str,
    pub model: &'a str,
    pub hashes: &'a [String],
    pub bytes: i64,
}

pub async fn insert(store: &Store, b: &NewBatch<'_>) -> Result<i64> {
    let mut tx = store.pool.begin().await.at(store)?;
    let now = now_ms();
    let id: i64 = sqlx::query_scalar(
        "INSERT INTO batches (run_id, stage, base_url, model, status, requests, bytes, created_at, updated_at)
         VALUES (?, ?, ?, ?, 'preparing', ?, ?, ?, ?) RETURNING id",
    )
    .bind(b.run_id)
    .bind(b.stage)
    .bind(b.base_url)
    .bind(b.model)
    .bind(b.hashes.len() as i64)
    .bind(b.bytes)
    .bind(now)
    .bind(now)
    .fetch_one(&mut *tx)
    .await
    .at(store)?;
    for h in b.hashes {
        sqlx::query("INSERT OR IGNORE INTO batch_requests (batch_row, request_hash) VALUES (?, ?)")
            .bind(id)
            .bind(h)
            .execute(&mut *tx)
            .await
            .at(store)?;
    }
    tx.commit().await.at(store)?;
    Ok(id)
}

/// Batches of this stage and endpoint whose answers are not all read yet, oldest first.
pub async fn open(store: &Store, stage: &str, base_url: &str, model: &str) -> Result<Vec<BatchRow>> {
    sqlx::query_as(
        "SELECT * FROM batches WHERE stage = ? AND base_url = ? AND model = ? AND ingested_at IS NULL
           AND status != 'abandoned' ORDER BY id",
    )
    .bind(stage)
    .bind(base_url)
    .bind(model)
    .fetch_all(&store.pool)
    .await
    .at(store)
}

pub async fn get(store: &Store, row: i64) -> Result<BatchRow> {
    sqlx::query_as("SELECT * FROM batches WHERE id = ?").bind(row).fetch_one(&store.pool).await.at(store)
}

pub async fn hashes(store: &Store, row: i64) -> Result<Vec<String>> {
    sqlx::query_scalar("SELECT request_hash FROM batch_requests WHERE batch_row = ? ORDER BY request_hash")
        .bind(row)
        .fetch_all(&store.pool)
        .await
        .at(store)
}

pub async fn set_uploaded(store: &Store, row: i64, input_file_id: &str) -> Result<()> {
    sqlx::query("UPDATE batches SET status = 'uploaded', input_file_id = ?, updated_at = ? WHERE id = ?")
        .bind(input_file_id)
        .bind(now_ms())
        .bind(row)
        .execute(&store.pool)
        .await
        .at(store)?;
    Ok(())
}

/// The API's view of a batch: its id, state, files and counts.
#[derive(Debug, Clone)]
pub struct Seen {
    pub batch_id: String,
    pub status: BatchState,
    pub output_file_id: Option<String>,
    pub error_file_id: Option<String>,
    pub completed: i64,
    pub failed: i64,
    pub error: Option<String>,
}

pub async fn set_seen(store: &Store, row: i64, s: &Seen) -> Result<()> {
    sqlx::query(
        "UPDATE batches SET batch_id = ?, status = ?, output_file_id = ?, error_file_id = ?, completed = ?,
            failed = ?, error = ?, updated_at = ? WHERE id = ?",
    )
    .bind(&s.batch_id)
    .bind(s.status)
    .bind(&s.output_file_id)
    .bind(&s.error_file_id)
    .bind(s.completed)
    .bind(s.failed)
    .bind(&s.error)
    .bind(now_ms())
    .bind(row)
    .execute(&store.pool)
    .await
    .at(store)?;
    Ok(())
}

/// A batch awaited by a later run (one that attaches to it) is shown with that run.
pub async fn adopt(store: &Store, row: i64, run_id: i64) -> Result<()> {
    sqlx::query("UPDATE batches SET run_id = ?, updated_at = ? WHERE id = ?")
        .bind(run_id)
        .bind(now_ms())
        .bind(row)
        .execute(&store.pool)
        .await
        .at(store)?;
    Ok(())
}

/// Every answer of the finished batch is read.
pub async fn set_ingested(store: &Store, row: i64) -> Result<i64> {
    let now = now_ms();
    sqlx::query("UPDATE batches SET ingested_at = ?, updated_at = ? WHERE id = ?")
        .bind(now)
        .bind(now)
        .bind(row)
        .execute(&store.pool)
        .await
        .at(store)?;
    Ok(now)
}

/// A row whose upload never got on record: nothing was created from it.
pub async fn abandon(store: &Store, row: i64) -> Result<()> {
    sqlx::query("UPDATE batches SET status = 'abandoned', updated_at = ? WHERE id = ?")
        .bind(now_ms())
        .bind(row)
        .execute(&store.pool)
        .await
        .at(store)?;
    Ok(())
}

/// The batches a run sent, for `flow status`.
pub async fn of_run(store: &Store, run_id: i64) -> Result<Vec<BatchRow>> {
    sqlx::query_as("SELECT * FROM batches WHERE run_id = ? ORDER BY id")
        .bind(run_id)
        .fetch_all(&store.pool)
        .await
        .at(store)
}
