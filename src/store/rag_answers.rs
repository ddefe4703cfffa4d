//! SQL for `rag_answers`: every RAG answer an eval_rag stage made, with its grade, for accuracy
//! figures and for reading back from the CLI.

use sqlx::FromRow;

use super::{AtStore, Store, now_ms};
use crate::error::Result;

pub struct NewAnswer<'a> {
    pub run_id: i64,
    pub stage_run_id: i64,
    pub stage: &'a str,
    pub eval_set: &'a str,
    pub retriever: &'a str,
    pub model_id: Option<i64>,
    pub question_id: &'a str,
    pub question: &'a str,
    pub passages: &'a str,
    pub hit: bool,
    pub answer: Option<&'a str>,
    pub answer_call: Option<i64>,
    pub grade: &'a str,
    pub reason: Option<&'a str>,
    pub grade_call: Option<i64>,
}

pub async fn insert(store: &Store, a: &NewAnswer<'_>) -> Result<()> {
    sqlx::query(
        "INSERT OR REPLACE INTO rag_answers (run_id, stage_run_id, stage, eval_set, retriever, model_id, question_id,
            question, passages, hit, answer, answer_call, grade, reason, grade_call, created_at)
         VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
    )
    .bind(a.run_id)
    .bind(a.stage_run_id)
    .bind(a.stage)
    .bind(a.eval_set)
    .bind(a.retriever)
    .bind(a.model_id)
    .bind(a.question_id)
    .bind(a.question)
    .bind(a.passages)
    .bind(a.hit)
    .bind(a.answer)
    .bind(a.answer_call)
    .bind(a.grade)
    .bind(a.reason)
    .bind(a.grade_call)
    .bind(now_ms())
    .execute(&store.pool)
    .await
    .at(store)?;
    Ok(())
}

/// (retriever, question id) of the answers a stage run already has graded: a resumed run skips them
/// and tries the failed ones again.
pub async fn done(store: &Store, stage_run_id: i64) -> Result<Vec<(String, String)>> {
    sqlx::query_as("SELECT retriever, question_id FROM rag_answers WHERE stage_run_id = ? AND grade != 'failed'")
        .bind(stage_run_id)
        .fetch_all(&store.pool)
        .await
        .at(store)
}

#[derive(Debug, Clone, FromRow, serde::Serialize)]
pub struct Tally {
    pub stage: String,
    pub retriever: String,
    pub correct: i64,
    pub incorrect: i64,
    pub failed: i64,
    pub hits: i64,
}

impl Tally {
    /// Answers with a grade (correct or incorrect); failed ones are not counted.
    pub fn graded(&self) -> u64 {
        (self.correct + self.incorrect) as u64
    }

    pub fn accuracy(&self) -> f64 {
        if self.graded() == 0 { 0.0 } else { self.correct as f64 / self.graded() as f64 }
    }

    /// The 95% Wilson interval of the accuracy.
    pub fn interval(&self) -> (f64, f64) {
        crate::rank::metrics::wilson(self.correct as u64, self.graded())
    }
}

/// Grade counts per retriever of a stage run.
pub async fn tally(store: &Store, stage_run_id: i64) -> Result<Vec<Tally>> {
    sqlx::query_as(
        "SELECT stage, retriever, SUM(grade = 'correct') AS correct, SUM(grade = 'incorrect') AS incorrect,
                SUM(grade = 'failed') AS failed, SUM(hit) AS hits
         FROM rag_answers WHERE stage_run_id = ? GROUP BY stage, retriever ORDER BY MIN(id)",
    )
    .bind(stage_run_id)
    .fetch_all(&store.pool)
    .await
    .at(store)
}

#[derive(Debug, Clone, FromRow, serde::Serialize)]
pub struct AnswerRow {
    pub run_id: i64,
    pub stage: String,
    pub retriever: String,
    pub question_id: String,
    pub question: String,
    pub passages: String,
    pub hit: bool,
    pub answer: Option<String>,
    pub grade: String,
    pub reason: Option<String>,
}

/// Answers, newest first, of one run (default: any), retriever and grade.
pub async fn list(
    store: &Store,
    run: Option<i64>,
    retriever: Option<&str>,
    grade: Option<&str>,
    limit: i64,
) -> Result<Vec<AnswerRow>> {
    sqlx::query_as(
        "SELECT run_id, stage, retriever, question_id, question, passages, hit, answer, grade, reason
         FROM rag_answers
         WHERE (?1 IS NULL OR run_id = ?1) AND (?2 IS NULL OR retriever = ?2) AND (?3 IS NULL OR grade = ?3)
         ORDER BY id DESC LIMIT ?4",
    )
    .bind(run)
    .bind(retriever)
    .bind(grade)
    .bind(limit)
    .fetch_all(&store.pool)
    .await
    .at(store)
}

/// The stage run of `stage`, at or before `run_id`, that answered most recently.
pub async fn latest_stage_run(store: &Store, stage: &str, run_id: i64) -> Result<Option<i64>> {
    sqlx::query_scalar("SELECT MAX(stage_run_id) FROM rag_answers WHERE stage = ? AND run_id <= ?")
        .bind(stage)
        .bind(run_id)
        .fetch_one(&store.pool)
        .await
        .at(store)
}
