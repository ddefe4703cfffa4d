//! SQL for `queries` and `generations`: the generate stage's questions and its per-chunk ledger.

use std::collections::HashSet;

use sqlx::FromRow;

use super::states::GenerationStatus;
use super::{AtStore, Store, now_ms};
use crate::error::Result;
use crate::text::{QueryKind, QueryStatus};

/// A live chunk a generate stage works from.
#[derive(Debug, Clone, FromRow)]
pub struct InputChunk {
    pub id: i64,
    pub text: String,
    pub title: Option<String>,
    pub path: String,
}

pub async fn input_chunks(store: &Store, chunk_stages: &[String]) -> Result<Vec<InputChunk>> {
    let stages = serde_json::to_string(chunk_stages).expect("strings serialise");
    sqlx::query_as(
        "SELECT c.id, c.text, d.title, d.path FROM chunks c JOIN documents d ON d.id = c.document_id
         WHERE d.stage IN (SELECT value FROM json_each(?)) AND d.status = 'active' AND c.retired_at IS NULL
         ORDER BY c.id",
    )
    .bind(stages)
    .fetch_all(&store.pool)
    .await
    .at(store)
}

/// Makes the queries of `settings` this stage's current ones and supersedes the rest (kept in the
/// table, out of `pairs`). Returns how many were superseded now.
pub async fn activate(store: &Store, stage: &str, settings: &str) -> Result<u64> {
    let mut tx = store.pool.begin().await.at(store)?;
    let superseded =
        sqlx::query("UPDATE queries SET superseded_at = ? WHERE stage = ? AND settings != ? AND superseded_at IS NULL")
            .bind(now_ms())
            .bind(stage)
            .bind(settings)
            .execute(&mut *tx)
            .await
            .at(store)?
            .rows_affected();
    sqlx::query(
        "UPDATE queries SET superseded_at = NULL WHERE stage = ? AND settings = ? AND superseded_at IS NOT NULL",
    )
    .bind(stage)
    .bind(settings)
    .execute(&mut *tx)
    .await
    .at(store)?;
    tx.commit().await.at(store)?;
    Ok(superseded)
}

/// Chunks this stage has finished with these settings (failed ones are tried again).
pub async fn done_chunks(store: &Store, stage: &str, settings: &str) -> Result<HashSet<i64>> {
    let ids: Vec<i64> =
        sqlx::query_scalar("SELECT chunk_id FROM generations WHERE stage = ? AND settings = ? AND status = 'done'")
            .bind(stage)
            .bind(settings)
            .fetch_all(&store.pool)
            .await
            .at(store)?;
    Ok(ids.into_iter().collect())
}

/// Live chunks this stage finished with these settings that got no kept question.
pub async fn chunks_without_questions(store: &Store, stage: &str, settings: &str) -> Result<i64> {
    sqlx::query_scalar(
        "SELECT COUNT(*) FROM generations g JOIN chunks c ON c.id = g.chunk_id
         WHERE g.stage = ? AND g.settings = ? AND g.status = 'done' AND g.kept = 0 AND c.retired_at IS NULL",
    )
    .bind(stage)
    .bind(settings)
    .fetch_one(&store.pool)
    .await
    .at(store)
}

/// Texts of the current queries this stage kept, for de-duplication across the corpus.
pub async fn kept_texts(store: &Store, stage: &str) -> Result<Vec<String>> {
    sqlx::query_scalar(
        "SELECT text FROM queries WHERE stage = ? AND status = 'kept' AND superseded_at IS NULL ORDER BY id",
    )
    .bind(stage)
    .fetch_all(&store.pool)
    .await
    .at(store)
}

/// The mean length in characters of `stage`'s kept questions; None before its first.
pub async fn kept_mean_chars(store: &Store, stage: &str) -> Result<Option<f64>> {
    sqlx::query_scalar(
        "SELECT AVG(LENGTH(text)) FROM queries WHERE stage = ? AND status = 'kept' AND superseded_at IS NULL",
    )
    .bind(stage)
    .fetch_one(&store.pool)
    .await
    .at(store)
}

#[derive(Debug, Clone)]
pub struct NewQuery {
    pub text: String,
    pub kind: QueryKind,
    /// Kept, or why it was dropped.
    pub status: QueryStatus,
}

/// The outcome of one chunk, written in one transaction with its queries.
#[derive(Debug, Clone)]
pub struct Generation {
    pub chunk_id: i64,
    /// Key of the stage settings that made it.
    pub settings: String,
    pub call_id: Option<i64>,
    pub model: String,
    pub prompt_hash: String,
    pub params: String,
    pub queries: Vec<NewQuery>,
    pub error: Option<String>,
}

pub async fn write_generation(store: &Store, stage: &str, g: &Generation) -> Result<()> {
    let now = now_ms();
    let mut tx = store.pool.begin().await.at(store)?;
    for q in &g.queries {
        sqlx::query(
            "INSERT INTO queries (chunk_id, stage, text, kind, model, prompt_hash, params, status, call_id, settings,
                created_at)
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(g.chunk_id)
        .bind(stage)
        .bind(&q.text)
        .bind(q.kind)
        .bind(&g.model)
        .bind(&g.prompt_hash)
        .bind(&g.params)
        .bind(q.status)
        .bind(g.call_id)
        .bind(&g.settings)
        .bind(now)
        .execute(&mut *tx)
        .await
        .at(store)?;
    }
    let kept = g.queries.iter().filter(|q| q.status == QueryStatus::Kept).count() as i64;
    sqlx::query(
        "INSERT INTO generations (stage, chunk_id, settings, status, error, call_id, kept, dropped, updated_at)
         VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)
         ON CONFLICT (stage, chunk_id, settings) DO UPDATE SET status = excluded.status, error = excluded.error,
            call_id = excluded.call_id, kept = excluded.kept, dropped = excluded.dropped, updated_at = excluded.updated_at",
    )
    .bind(stage)
    .bind(g.chunk_id)
    .bind(&g.settings)
    .bind(if g.error.is_some() { GenerationStatus::Failed } else { GenerationStatus::Done })
    .bind(&g.error)
    .bind(g.call_id)
    .bind(kept)
    .bind(g.queries.len() as i64 - kept)
    .bind(now)
    .execute(&mut *tx)
    .await.at(store)?;
    tx.commit().await.at(store)?;
    Ok(())
}

/// Current query counts by status (kept, or why dropped) for this stage.
pub async fn drop_counts(store: &Store, stage: &str) -> Result<Vec<(String, i64)>> {
    sqlx::query_as(
        "SELECT status, COUNT(*) FROM queries WHERE stage = ? AND superseded_at IS NULL GROUP BY status ORDER BY status",
    )
        .bind(stage)
        .fetch_all(&store.pool)
        .await.at(store)
}
