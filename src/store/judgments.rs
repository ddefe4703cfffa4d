//! SQL for `judgments`: a judge stage's verdict on each kept query, with the score and reason.

use sqlx::FromRow;

use super::states::Verdict;
use super::{AtStore, Store, now_ms};
use crate::error::Result;

#[derive(Debug, Clone, FromRow)]
pub struct JudgeInput {
    pub query_id: i64,
    pub query: String,
    pub kind: crate::text::QueryKind,
    pub chunk: String,
    pub title: Option<String>,
    pub path: String,
}

/// Makes this judge's verdicts of `settings` the current ones, superseding the rest, and decides
/// them again from their stored scores at `min_score` (a threshold change costs no call). Returns
/// how many verdicts changed.
pub async fn activate(store: &Store, stage: &str, settings: &str, min_score: f64) -> Result<u64> {
    let mut tx = store.pool.begin().await.at(store)?;
    sqlx::query("UPDATE judgments SET superseded_at = ? WHERE stage = ? AND settings != ? AND superseded_at IS NULL")
        .bind(now_ms())
        .bind(stage)
        .bind(settings)
        .execute(&mut *tx)
        .await
        .at(store)?;
    sqlx::query(
        "UPDATE judgments SET superseded_at = NULL WHERE stage = ? AND settings = ? AND superseded_at IS NOT NULL",
    )
    .bind(stage)
    .bind(settings)
    .execute(&mut *tx)
    .await
    .at(store)?;
    let changed = sqlx::query(
        "UPDATE judgments SET verdict = CASE WHEN COALESCE(expected, score) >= ?3 THEN 'accepted' ELSE 'rejected' END
         WHERE stage = ?1 AND settings = ?2 AND score IS NOT NULL
           AND verdict != CASE WHEN COALESCE(expected, score) >= ?3 THEN 'accepted' ELSE 'rejected' END",
    )
    .bind(stage)
    .bind(settings)
    .bind(min_score)
    .execute(&mut *tx)
    .await
    .at(store)?
    .rows_affected();
    tx.commit().await.at(store)?;
    Ok(changed)
}

/// Current kept queries of the given generate stages on live chunks, that this judge has not yet
/// decided with these settings.
pub async fn pending(
    store: &Store,
    generate_stages: &[String],
    judge_stage: &str,
    settings: &str,
) -> Result<Vec<JudgeInput>> {
    pending_of(store, generate_stages, None, judge_stage, settings).await
}

/// What `pending` will return once the generate stage has run with `generate_settings`, which
/// makes its questions of those settings the current ones: for `flow plan`.
pub async fn pending_after(
    store: &Store,
    (generate_stage, generate_settings): (&str, &str),
    judge_stage: &str,
    settings: &str,
) -> Result<Vec<JudgeInput>> {
    pending_of(store, &[generate_stage.to_string()], Some(generate_settings), judge_stage, settings).await
}

async fn pending_of(
    store: &Store,
    generate_stages: &[String],
    generate_settings: Option<&str>,
    judge_stage: &str,
    settings: &str,
) -> Result<Vec<JudgeInput>> {
    let stages = serde_json::to_string(generate_stages).expect("strings serialise");
    sqlx::query_as(
        "SELECT q.id AS query_id, q.text AS query, q.kind, c.text AS chunk, d.title, d.path
         FROM queries q JOIN chunks c ON c.id = q.chunk_id JOIN documents d ON d.id = c.document_id
         WHERE q.stage IN (SELECT value FROM json_each(?1)) AND q.status = 'kept'
           AND (CASE WHEN ?4 IS NULL THEN q.superseded_at IS NULL ELSE q.settings = ?4 END)
           AND c.retired_at IS NULL
           AND NOT EXISTS (SELECT 1 FROM judgments j WHERE j.query_id = q.id AND j.stage = ?2 AND j.settings = ?3
                           AND j.verdict IN ('accepted', 'rejected'))
         ORDER BY q.id",
    )
    .bind(stages)
    .bind(judge_stage)
    .bind(settings)
    .bind(generate_settings)
    .fetch_all(&store.pool)
    .await
    .at(store)
}

/// Current kept queries of the given generate stages that this judge decided with these settings.
pub async fn decided(store: &Store, generate_stages: &[String], judge_stage: &str, settings: &str) -> Result<i64> {
    let stages = serde_json::to_string(generate_stages).expect("strings serialise");
    sqlx::query_scalar(
        "SELECT COUNT(*) FROM queries q JOIN chunks c ON c.id = q.chunk_id JOIN judgments j ON j.query_id = q.id
         WHERE q.stage IN (SELECT value FROM json_each(?1)) AND q.status = 'kept' AND q.superseded_at IS NULL
           AND c.retired_at IS NULL AND j.stage = ?2 AND j.settings = ?3 AND j.verdict IN ('accepted', 'rejected')",
    )
    .bind(stages)
    .bind(judge_stage)
    .bind(settings)
    .fetch_one(&store.pool)
    .await
    .at(store)
}

pub struct Judgment<'a> {
    pub query_id: i64,
    /// Key of the judge settings that made it (its threshold left out).
    pub settings: &'a str,
    /// The score (None for a failed judgment): the digit, the expected score, the five digits'
    /// probabilities as JSON where they were read, and how (`probabilities` or `sampled`).
    pub score: Option<i64>,
    pub expected: Option<f64>,
    pub probs: Option<String>,
    pub scored_by: Option<&'a str>,
    pub verdict: Verdict,
    pub reason: Option<&'a str>,
    pub model: &'a str,
    pub call_id: Option<i64>,
}

pub async fn write(store: &Store, stage: &str, j: &Judgment<'_>) -> Result<()> {
    sqlx::query(
        "INSERT INTO judgments (query_id, stage, settings, score, expected, probs, scored_by, verdict, reason, model,
            call_id, created_at)
         VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
         ON CONFLICT (query_id, stage, settings) DO UPDATE SET score = excluded.score, expected = excluded.expected,
            probs = excluded.probs, scored_by = excluded.scored_by, verdict = excluded.verdict,
            reason = excluded.reason, model = excluded.model, call_id = excluded.call_id, created_at = excluded.created_at",
    )
    .bind(j.query_id)
    .bind(stage)
    .bind(j.settings)
    .bind(j.score)
    .bind(j.expected)
    .bind(&j.probs)
    .bind(j.scored_by)
    .bind(j.verdict)
    .bind(j.reason)
    .bind(j.model)
    .bind(j.call_id)
    .bind(now_ms())
    .execute(&store.pool)
    .await.at(store)?;
    Ok(())
}

/// Current verdicts of this judge on current queries, by verdict.
pub async fn verdict_counts(store: &Store, stage: &str) -> Result<Vec<(String, i64)>> {
    sqlx::query_as(
        "SELECT j.verdict, COUNT(*) FROM judgments j JOIN queries q ON q.id = j.query_id
         WHERE j.stage = ? AND j.superseded_at IS NULL AND q.superseded_at IS NULL GROUP BY j.verdict ORDER BY j.verdict",
    )
        .bind(stage)
        .fetch_all(&store.pool)
        .await.at(store)
}
