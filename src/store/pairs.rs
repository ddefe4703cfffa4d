//! SQL for reading the `pairs` view: each generated query with its passage, document and verdict.

use sqlx::FromRow;

use super::{AtStore, Store};
use crate::error::Result;

#[derive(Debug, Clone, FromRow, serde::Serialize)]
pub struct PairRow {
    pub query_id: i64,
    pub query: String,
    /// question, keywords or claim.
    pub kind: String,
    pub passage: String,
    pub document: String,
    pub page: Option<i64>,
    pub score: Option<i64>,
    /// The expected score where the judge's probabilities were read.
    pub expected: Option<f64>,
    pub verdict: String,
    pub reason: Option<String>,
    pub generator: String,
}

/// Pairs, newest first; `run` limits them to queries made during that run, `verdict` to one verdict.
pub async fn list(store: &Store, run: Option<i64>, verdict: Option<&str>, limit: i64) -> Result<Vec<PairRow>> {
    sqlx::query_as(
        "SELECT p.query_id, p.query, p.kind, p.passage, p.document, p.page, p.score, p.expected, p.verdict, p.reason,
                p.generator
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
    .await
    .at(store)
}

/// Where a stage's pairs come from: the judge stages it depends on and the generate stages they
/// judge. A pair belongs to a stage only through these, so two branches in one workflow never mix.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, serde::Serialize)]
pub struct PairSource {
    pub judges: Vec<String>,
    pub generators: Vec<String>,
}

impl PairSource {
    pub fn is_empty(&self) -> bool {
        self.judges.is_empty()
    }

    fn bind(&self) -> (String, String) {
        let json = |v: &[String]| serde_json::to_string(v).expect("strings serialise");
        (json(&self.judges), json(&self.generators))
    }
}

/// An accepted pair: what training learns from.
#[derive(Debug, Clone, FromRow)]
pub struct Accepted {
    pub query: String,
    pub passage: String,
    pub chunk_id: i64,
    pub document: String,
}

/// Every current query of `from`'s generators that one of its judges accepted, with its live chunk,
/// oldest first.
pub async fn accepted(store: &Store, from: &PairSource) -> Result<Vec<Accepted>> {
    let (judges, generators) = from.bind();
    sqlx::query_as(
        "SELECT q.text AS query, c.text AS passage, c.id AS chunk_id, d.path AS document
         FROM queries q JOIN chunks c ON c.id = q.chunk_id JOIN documents d ON d.id = c.document_id
         WHERE q.status = 'kept' AND q.superseded_at IS NULL AND c.retired_at IS NULL
           AND q.stage IN (SELECT value FROM json_each(?2))
           AND EXISTS (SELECT 1 FROM judgments j WHERE j.query_id = q.id AND j.superseded_at IS NULL
                       AND j.verdict = 'accepted' AND j.stage IN (SELECT value FROM json_each(?1)))
         ORDER BY q.id",
    )
    .bind(judges)
    .bind(generators)
    .fetch_all(&store.pool)
    .await
    .at(store)
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

/// Every current query of `from`'s generators on a live chunk with its verdict from `from`'s judges
/// (`accepted` where any of them accepted it, `unjudged` where none judged it), oldest first: what
/// the synthetic eval set is drawn from.
pub async fn all(store: &Store, from: &PairSource) -> Result<Vec<EvalPair>> {
    let (judges, generators) = from.bind();
    sqlx::query_as(
        "SELECT q.id AS query_id, q.text AS query, c.text AS passage, c.id AS chunk_id, d.path AS document,
                COALESCE((SELECT j.verdict FROM judgments j WHERE j.query_id = q.id AND j.superseded_at IS NULL
                            AND j.stage IN (SELECT value FROM json_each(?1))
                          ORDER BY j.verdict = 'accepted' DESC, j.id LIMIT 1), 'unjudged') AS verdict
         FROM queries q JOIN chunks c ON c.id = q.chunk_id JOIN documents d ON d.id = c.document_id
         WHERE q.status = 'kept' AND q.superseded_at IS NULL AND c.retired_at IS NULL
           AND q.stage IN (SELECT value FROM json_each(?2))
         ORDER BY q.id",
    )
    .bind(judges)
    .bind(generators)
    .fetch_all(&store.pool)
    .await
    .at(store)
}
