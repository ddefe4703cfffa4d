//! SQL for `documents` and `chunks`: what a chunk stage has read and the passages it cut.
//! Chunks whose text is unchanged keep their id across re-chunking, so later work keyed on them survives.

use std::collections::HashMap;

use sqlx::FromRow;

use super::{AtStore, Store, now_ms};
use crate::digest::sha256_hex;
use crate::error::Result;

#[derive(Debug, Clone, FromRow)]
pub struct DocState {
    pub id: i64,
    pub path: String,
    pub content_hash: String,
    pub chunk_config: String,
    pub status: String,
}

#[derive(Debug, Clone)]
pub struct NewChunk {
    pub text: String,
    pub n_tokens: i64,
    pub page: Option<i64>,
    pub start: i64,
    pub end: i64,
}

/// The outcome of reading one document, written in one batch with others.
#[derive(Debug, Clone)]
pub struct DocWrite {
    pub path: String,
    pub title: Option<String>,
    pub content_hash: String,
    pub chunk_config: String,
    pub bytes: i64,
    /// `Err(reason)` records the document as skipped.
    pub chunks: std::result::Result<Vec<NewChunk>, String>,
}

pub async fn state(store: &Store, stage: &str) -> Result<HashMap<String, DocState>> {
    let rows: Vec<DocState> =
        sqlx::query_as("SELECT id, path, content_hash, chunk_config, status FROM documents WHERE stage = ?")
            .bind(stage)
            .fetch_all(&store.pool)
            .await
            .at(store)?;
    Ok(rows.into_iter().map(|r| (r.path.clone(), r)).collect())
}

/// Writes a batch of documents and their chunks in one transaction: a killed run keeps whole documents only.
pub async fn write_batch(store: &Store, stage: &str, docs: &[DocWrite]) -> Result<()> {
    let now = now_ms();
    let mut tx = store.pool.begin().await.at(store)?;
    for d in docs {
        let (status, reason) = match &d.chunks {
            Ok(_) => ("active", None),
            Err(r) => ("skipped", Some(r.as_str())),
        };
        let doc_id: i64 = sqlx::query_scalar(
            "INSERT INTO documents (stage, path, title, content_hash, chunk_config, status, skip_reason, bytes, updated_at)
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)
             ON CONFLICT (stage, path) DO UPDATE SET title = excluded.title, content_hash = excluded.content_hash,
                chunk_config = excluded.chunk_config, status = excluded.status, skip_reason = excluded.skip_reason,
                bytes = excluded.bytes, updated_at = excluded.updated_at
             RETURNING id",
        )
        .bind(stage)
        .bind(&d.path)
        .bind(&d.title)
        .bind(&d.content_hash)
        .bind(&d.chunk_config)
        .bind(status)
        .bind(reason)
        .bind(d.bytes)
        .bind(now)
        .fetch_one(&mut *tx)
        .await.at(store)?;

        let old: Vec<(i64, String)> =
            sqlx::query_as("SELECT id, content_hash FROM chunks WHERE document_id = ? AND retired_at IS NULL")
                .bind(doc_id)
                .fetch_all(&mut *tx)
                .await
                .at(store)?;
        let mut reusable: HashMap<String, Vec<i64>> = HashMap::new();
        for (id, hash) in old {
            reusable.entry(hash).or_default().push(id);
        }
        for (ordinal, c) in d.chunks.as_deref().unwrap_or(&[]).iter().enumerate() {
            let hash = sha256_hex(c.text.as_bytes());
            if let Some(id) = reusable.get_mut(&hash).and_then(Vec::pop) {
                sqlx::query("UPDATE chunks SET ordinal = ?, page = ?, start_byte = ?, end_byte = ? WHERE id = ?")
                    .bind(ordinal as i64)
                    .bind(c.page)
                    .bind(c.start)
                    .bind(c.end)
                    .bind(id)
                    .execute(&mut *tx)
                    .await
                    .at(store)?;
            } else {
                sqlx::query(
                    "INSERT INTO chunks (document_id, ordinal, text, n_tokens, content_hash, page, start_byte, end_byte)
                     VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                )
                .bind(doc_id)
                .bind(ordinal as i64)
                .bind(&c.text)
                .bind(c.n_tokens)
                .bind(&hash)
                .bind(c.page)
                .bind(c.start)
                .bind(c.end)
                .execute(&mut *tx)
                .await.at(store)?;
            }
        }
        for id in reusable.into_values().flatten() {
            sqlx::query("UPDATE chunks SET retired_at = ? WHERE id = ?")
                .bind(now)
                .bind(id)
                .execute(&mut *tx)
                .await
                .at(store)?;
        }
    }
    tx.commit().await.at(store)?;
    Ok(())
}

/// Marks documents that are no longer in the corpus as gone and retires their chunks.
pub async fn mark_gone(store: &Store, ids: &[i64]) -> Result<()> {
    let now = now_ms();
    let mut tx = store.pool.begin().await.at(store)?;
    for id in ids {
        sqlx::query("UPDATE documents SET status = 'gone', updated_at = ? WHERE id = ?")
            .bind(now)
            .bind(id)
            .execute(&mut *tx)
            .await
            .at(store)?;
        sqlx::query("UPDATE chunks SET retired_at = ? WHERE document_id = ? AND retired_at IS NULL")
            .bind(now)
            .bind(id)
            .execute(&mut *tx)
            .await
            .at(store)?;
    }
    tx.commit().await.at(store)?;
    Ok(())
}

/// Live chunks of a chunk stage.
pub async fn count_chunks(store: &Store, stage: &str) -> Result<i64> {
    sqlx::query_scalar(
        "SELECT COUNT(*) FROM chunks c JOIN documents d ON d.id = c.document_id
         WHERE d.stage = ? AND c.retired_at IS NULL",
    )
    .bind(stage)
    .fetch_one(&store.pool)
    .await
    .at(store)
}

#[derive(Debug, Clone, FromRow, serde::Serialize)]
pub struct SkippedDoc {
    pub path: String,
    pub skip_reason: Option<String>,
}

pub async fn skipped(store: &Store, stage: &str) -> Result<Vec<SkippedDoc>> {
    sqlx::query_as("SELECT path, skip_reason FROM documents WHERE stage = ? AND status = 'skipped' ORDER BY path")
        .bind(stage)
        .fetch_all(&store.pool)
        .await
        .at(store)
}

/// Every live chunk of every active document as (id, text), oldest first: the synthetic eval corpus.
pub async fn live_chunks(store: &Store) -> Result<Vec<(i64, String)>> {
    sqlx::query_as(
        "SELECT c.id, c.text FROM chunks c JOIN documents d ON d.id = c.document_id
         WHERE d.status = 'active' AND c.retired_at IS NULL ORDER BY c.id",
    )
    .fetch_all(&store.pool)
    .await
    .at(store)
}

/// A live chunk with where it came from: what `flow serve` searches and returns.
#[derive(Debug, Clone, FromRow, serde::Serialize)]
pub struct SourcedChunk {
    pub id: i64,
    pub text: String,
    pub document: String,
    pub title: Option<String>,
    pub page: Option<i64>,
}

/// Every live chunk of every active document with its document's path, title and page, oldest first.
pub async fn live_sourced(store: &Store) -> Result<Vec<SourcedChunk>> {
    sqlx::query_as(
        "SELECT c.id, c.text, d.path AS document, d.title, c.page FROM chunks c JOIN documents d ON d.id = c.document_id
         WHERE d.status = 'active' AND c.retired_at IS NULL ORDER BY c.id",
    )
    .fetch_all(&store.pool)
    .await.at(store)
}

/// Changes whenever the set of live chunks does (a chunk added, retired, or its document gone).
pub async fn live_stamp(store: &Store) -> Result<String> {
    let (n, max_id, retired, updated): (i64, Option<i64>, Option<i64>, Option<i64>) = sqlx::query_as(
        "SELECT (SELECT COUNT(*) FROM chunks WHERE retired_at IS NULL), (SELECT MAX(id) FROM chunks),
                (SELECT MAX(retired_at) FROM chunks), (SELECT MAX(updated_at) FROM documents)",
    )
    .fetch_one(&store.pool)
    .await
    .at(store)?;
    Ok(format!("{n}|{max_id:?}|{retired:?}|{updated:?}"))
}
