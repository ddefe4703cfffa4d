//! SQL for `judgments`: a judge stage's verdict on each kept query, with the score and reason.

use sqlx::FromRow;

use super::{Store, now_ms};
use crate::error::Result;

#[derive(Debug, Clone, FromRow)]
pub struct JudgeInput {
    pub query_id: i64,
    pub query: String,
    pub chunk: String,
    pub title: Option<String>,
    pub path: String,
}

/// Kept queries of the given generate stages on live chunks, that this judge has not yet decided.
pub async fn pending(store: &Store, generate_stages: &[String], judge_stage: &str) -> Result<Vec<JudgeInput>> {
    let stages = serde_json::to_string(generate_stages).expect("strings serialise");
    Ok(sqlx::query_as(
        "SELECT q.id AS query_id, q.text AS query, c.text AS chunk, d.title, d.path
         FROM queries q JOIN chunks c ON c.id = q.chunk_id JOIN documents d ON d.id = c.document_id
         WHERE q.stage IN (SELECT value FROM json_each(?1)) AND q.status = 'kept' AND c.retired_at IS NULL
           AND NOT EXISTS (SELECT 1 FROM judgments j WHERE j.query_id = q.id AND j.stage = ?2
                           AND j.verdict IN ('accepted', 'rejected'))
         ORDER BY q.id",
    )
    .bind(stages)
    .bind(judge_stage)
    .fetch_all(&store.pool)
    .await?)
}

/// Kept queries of the given generate stages that this judge has decided before.
pub async fn decided(store: &Store, generate_stages: &[String], judge_stage: &str) -> Result<i64> {
    let stages = serde_json::to_string(generate_stages).expect("strings serialise");
    Ok(sqlx::query_scalar(
        "SELECT COUNT(*) FROM queries q JOIN chunks c ON c.id = q.chunk_id JOIN judgments j ON j.query_id = q.id
         WHERE q.stage IN (SELECT value FROM json_each(?1)) AND q.status = 'kept' AND c.retired_at IS NULL
           AND j.stage = ?2 AND j.verdict IN ('accepted', 'rejected')",
    )
    .bind(stages)
    .bind(judge_stage)
    .fetch_one(&store.pool)
    .await?)
}

pub struct Judgment<'a> {
    pub query_id: i64,
    pub score: Option<i64>,
    pub verdict: &'a str,
    pub reason: Option<&'a str>,
    pub model: &'a str,
    pub call_id: Option<i64>,
}

pub async fn write(store: &Store, stage: &str, j: &Judgment<'_>) -> Result<()> {
    sqlx::query(
        "INSERT INTO judgments (query_id, stage, score, verdict, reason, model, call_id, created_at)
         VALUES (?, ?, ?, ?, ?, ?, ?, ?)
         ON CONFLICT (query_id, stage) DO UPDATE SET score = excluded.score, verdict = excluded.verdict,
            reason = excluded.reason, model = excluded.model, call_id = excluded.call_id, created_at = excluded.created_at",
    )
    .bind(j.query_id)
    .bind(stage)
    .bind(j.score)
    .bind(j.verdict)
    .bind(j.reason)
    .bind(j.model)
    .bind(j.call_id)
    .bind(now_ms())
    .execute(&store.pool)
    .await?;
    Ok(())
}

pub async fn verdict_counts(store: &Store, stage: &str) -> Result<Vec<(String, i64)>> {
    Ok(sqlx::query_as("SELECT verdict, COUNT(*) FROM judgments WHERE stage = ? GROUP BY verdict ORDER BY verdict")
        .bind(stage)
        .fetch_all(&store.pool)
        .await?)
}
