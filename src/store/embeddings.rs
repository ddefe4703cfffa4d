//! SQL for `embeddings`: black-box vectors cached by model identity and text hash, so no text is
//! embedded (or paid for) twice.

use std::collections::HashMap;

use super::{AtStore, Store, now_ms};
use crate::error::Result;

/// The stored vectors for those of `hashes` that have one.
pub async fn lookup(store: &Store, model: &str, hashes: &[String]) -> Result<HashMap<String, Vec<f32>>> {
    let mut out = HashMap::new();
    // SQLite binds at most 32766 parameters; stay far below.
    for part in hashes.chunks(500) {
        let marks = vec!["?"; part.len()].join(",");
        let sql = format!("SELECT text_hash, vector FROM embeddings WHERE model = ? AND text_hash IN ({marks})");
        let mut q = sqlx::query_as::<_, (String, Vec<u8>)>(&sql).bind(model);
        for h in part {
            q = q.bind(h);
        }
        for (hash, blob) in q.fetch_all(&store.pool).await.at(store)? {
            out.insert(hash, from_blob(&blob));
        }
    }
    Ok(out)
}

/// Stores a batch of vectors in one transaction.
pub async fn insert(store: &Store, model: &str, rows: &[(String, Vec<f32>)]) -> Result<()> {
    let mut tx = store.pool.begin().await.at(store)?;
    let now = now_ms();
    for (hash, v) in rows {
        sqlx::query(
            "INSERT INTO embeddings (model, text_hash, dim, vector, created_at) VALUES (?, ?, ?, ?, ?)
             ON CONFLICT DO NOTHING",
        )
        .bind(model)
        .bind(hash)
        .bind(v.len() as i64)
        .bind(to_blob(v))
        .bind(now)
        .execute(&mut *tx)
        .await
        .at(store)?;
    }
    tx.commit().await.at(store)?;
    Ok(())
}

pub fn to_blob(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

pub fn from_blob(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
}
