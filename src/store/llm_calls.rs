//! SQL for `llm_calls`: the request cache. A request hash maps to the stored answer.

use sqlx::FromRow;

use super::{AtStore, Store, now_ms};
use crate::error::Result;

#[derive(Debug, Clone, FromRow)]
pub struct CallRow {
    pub id: i64,
    pub response: String,
    pub text: Option<String>,
    pub finish_reason: Option<String>,
    pub response_id: Option<String>,
    pub prompt_tokens: i64,
    pub completion_tokens: i64,
    pub attempts: i64,
    /// Whether the answer parsed into a result: only those are replayed from the cache.
    pub usable: bool,
}

pub struct NewCall<'a> {
    pub request_hash: &'a str,
    pub kind: &'a str,
    pub provider: crate::workflow::Provider,
    pub base_url: &'a str,
    pub model: &'a str,
    pub request: &'a str,
    pub response: &'a str,
    pub text: Option<&'a str>,
    pub finish_reason: Option<&'a str>,
    pub response_id: Option<&'a str>,
    pub prompt_tokens: i64,
    pub completion_tokens: i64,
    pub latency_ms: i64,
    pub attempts: i64,
    pub run_id: Option<i64>,
    pub stage: Option<&'a str>,
    pub usable: bool,
    /// How the answer was held to its shape (`grammar`, `probabilities`, `json_schema`, `none`).
    pub constrained: Option<&'a str>,
}

pub async fn lookup(store: &Store, hash: &str) -> Result<Option<CallRow>> {
    sqlx::query_as(
        "SELECT id, response, text, finish_reason, response_id, prompt_tokens, completion_tokens, attempts, usable
         FROM llm_calls WHERE request_hash = ?",
    )
    .bind(hash)
    .fetch_optional(&store.pool)
    .await
    .at(store)
}

/// Marks a stored answer as one that did not parse: it is no longer replayed.
pub async fn mark_unusable(store: &Store, id: i64) -> Result<()> {
    sqlx::query("UPDATE llm_calls SET usable = 0 WHERE id = ?").bind(id).execute(&store.pool).await.at(store)?;
    Ok(())
}

/// Stores a paid answer at once, in its own transaction, so a kill right after loses nothing. A new
/// answer replaces a stored one that did not parse (it is kept only until a better one comes).
pub async fn insert(store: &Store, c: &NewCall<'_>) -> Result<i64> {
    let id: Option<i64> = sqlx::query_scalar(
        "INSERT INTO llm_calls (request_hash, kind, provider, base_url, model, request, response, text, finish_reason,
            response_id, prompt_tokens, completion_tokens, latency_ms, attempts, run_id, stage, usable, constrained,
            created_at)
         VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
         ON CONFLICT (request_hash) DO UPDATE SET response = excluded.response, text = excluded.text,
            finish_reason = excluded.finish_reason, response_id = excluded.response_id,
            prompt_tokens = excluded.prompt_tokens, completion_tokens = excluded.completion_tokens,
            latency_ms = excluded.latency_ms, attempts = excluded.attempts, run_id = excluded.run_id,
            stage = excluded.stage, usable = excluded.usable, constrained = excluded.constrained,
            created_at = excluded.created_at
         WHERE llm_calls.usable = 0
         RETURNING id",
    )
    .bind(c.request_hash)
    .bind(c.kind)
    .bind(c.provider)
    .bind(c.base_url)
    .bind(c.model)
    .bind(c.request)
    .bind(c.response)
    .bind(c.text)
    .bind(c.finish_reason)
    .bind(c.response_id)
    .bind(c.prompt_tokens)
    .bind(c.completion_tokens)
    .bind(c.latency_ms)
    .bind(c.attempts)
    .bind(c.run_id)
    .bind(c.stage)
    .bind(c.usable)
    .bind(c.constrained)
    .bind(now_ms())
    .fetch_optional(&store.pool)
    .await
    .at(store)?;
    match id {
        Some(id) => Ok(id),
        None => Ok(sqlx::query_scalar("SELECT id FROM llm_calls WHERE request_hash = ?")
            .bind(c.request_hash)
            .fetch_one(&store.pool)
            .await
            .at(store)?),
    }
}

/// The mean completion tokens of `stage`'s usable chat answers from this model, and how many
/// answers that is; None before its first.
pub async fn completion_mean(
    store: &Store,
    stage: &str,
    provider: crate::workflow::Provider,
    model: &str,
) -> Result<Option<(f64, u64)>> {
    let (mean, n): (Option<f64>, i64) = sqlx::query_as(
        "SELECT AVG(completion_tokens), COUNT(*) FROM llm_calls
         WHERE kind = 'chat' AND usable = 1 AND stage = ? AND provider = ? AND model = ?",
    )
    .bind(stage)
    .bind(provider)
    .bind(model)
    .fetch_one(&store.pool)
    .await
    .at(store)?;
    Ok(mean.map(|m| (m, n as u64)))
}
