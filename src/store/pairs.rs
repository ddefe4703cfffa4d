//! SQL for reading the `pairs` view: each generated query with its passage, document and verdict.

use sqlx::FromRow;

use super::Store;
use crate::error::Result;

#[derive(Debug, Clone, FromRow, serde::Serialize)]
pub struct PairRow {
    pub query_id: i64,
    pub query: String,
    pub passage: String,
    pub document: String,
    pub page: Option<i64>,
    pub score: Option<i64>,
    pub verdict: String,
    pub reason: Option<String>,
    pub generator: String,
}

/// Pairs, newest first; `run` limits them to queries made during that run, `verdict` to one verdict.
pub async fn list(store: &Store, run: Option<i64>, verdict: Option<&str>, limit: i64) -> Result<Vec<PairRow>> {
    Ok(sqlx::query_as(
        "SELECT p.query_id, p.query, p.passage, p.document, p.page, p.score, p.verdict, p.reason, p.generator
         FROM pairs p
         WHERE (?1 IS NULL OR p.verdict = ?1)
           AND (?2 IS NULL OR p.created_at BETWEEN (SELECT started_at FROM runs WHERE id = ?2)
                AND COALESCE((SELECT finished_at FROM runs WHERE id = ?2), 1 << 62))
         ORDER BY p.query_id DESC LIMIT ?3",
    )
    .bind(verdict)
    .bind(run)
    .bind(limit)
    .fetch_all(&store.pool)
    .await?)
}

/// Every accepted pair as (query, passage, document path), oldest first: what training learns from.
pub async fn accepted(store: &Store) -> Result<Vec<(String, String, String)>> {
    Ok(sqlx::query_as("SELECT query, passage, document FROM pairs WHERE verdict = 'accepted' ORDER BY query_id")
        .fetch_all(&store.pool)
        .await?)
}

#[derive(Debug, Clone, FromRow)]
pub struct EvalPair {
    pub query_id: i64,
    pub query: String,
    pub passage: String,
    pub chunk_id: i64,
    pub document: String,
    pub verdict: String,
}

/// Every live pair with its chunk and verdict, oldest first: what the synthetic eval set is drawn from.
pub async fn all(store: &Store) -> Result<Vec<EvalPair>> {
    Ok(sqlx::query_as("SELECT query_id, query, passage, chunk_id, document, verdict FROM pairs ORDER BY query_id")
        .fetch_all(&store.pool)
        .await?)
}
