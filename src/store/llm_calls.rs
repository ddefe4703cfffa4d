//! SQL for `llm_calls`: the request cache. A request hash maps to the stored answer.

use sqlx::FromRow;

use super::{Store, now_ms};
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
}

pub struct NewCall<'a> {
    pub request_hash: &'a str,
    pub kind: &'a str,
    pub provider: &'a str,
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
}

pub async fn lookup(store: &Store, hash: &str) -> Result<Option<CallRow>> {
    Ok(sqlx::query_as(
        "SELECT id, response, text, finish_reason, response_id, prompt_tokens, completion_tokens, attempts
         FROM llm_calls WHERE request_hash = ?",
    )
    .bind(hash)
    .fetch_optional(&store.pool)
    .await?)
}

/// Stores a paid answer at once, in its own transaction, so a kill right after loses nothing.
pub async fn insert(store: &Store, c: &NewCall<'_>) -> Result<i64> {
    let id: Option<i64> = sqlx::query_scalar(
        "INSERT INTO llm_calls (request_hash, kind, provider, base_url, model, request, response, text, finish_reason,
            response_id, prompt_tokens, completion_tokens, latency_ms, attempts, run_id, stage, created_at)
         VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
         ON CONFLICT (request_hash) DO NOTHING RETURNING id",
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
    .bind(now_ms())
    .fetch_optional(&store.pool)
    .await?;
    match id {
        Some(id) => Ok(id),
        None => Ok(sqlx::query_scalar("SELECT id FROM llm_calls WHERE request_hash = ?")
            .bind(c.request_hash)
            .fetch_one(&store.pool)
            .await?),
    }
}
