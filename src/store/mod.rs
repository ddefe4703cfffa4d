//! The SQLite store: one file per workflow, opened with WAL, a busy timeout and foreign keys,
//! migrated on open. Each table's SQL lives in one submodule.

pub mod documents;
pub mod embeddings;
pub mod eval_results;
pub mod judgments;
pub mod llm_calls;
pub mod models;
pub mod pairs;
pub mod queries;
pub mod rag_answers;
pub mod runs;

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous};

use crate::error::{Error, Result};

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

#[derive(Clone, Debug)]
pub struct Store {
    pub pool: SqlitePool,
    pub path: PathBuf,
}

impl Store {
    /// Opens (creating if needed) and migrates the store at `path`.
    pub async fn open(path: &Path) -> Result<Store> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(Error::io(dir))?;
        }
        let opts = SqliteConnectOptions::from_str("sqlite://")
            .map_err(|e| Error::Store { path: path.into(), source: e })?
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            // NORMAL in WAL mode loses at most the last commits on power loss, never consistency;
            // a killed process loses nothing that was committed.
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(Duration::from_secs(30))
            .foreign_keys(true);
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(opts)
            .await
            .map_err(|e| Error::Store { path: path.into(), source: e })?;
        MIGRATOR.run(&pool).await.map_err(|e| Error::Migrate { path: path.into(), source: e })?;
        Ok(Store { pool, path: path.into() })
    }

    /// Opens a store that must already exist (for the read-only commands).
    pub async fn open_existing(path: &Path) -> Result<Store> {
        if !path.exists() {
            return Err(Error::bad_input(
                format!("store {} does not exist yet", path.display()),
                "run the workflow first: `flow run WORKFLOW`",
            ));
        }
        Store::open(path).await
    }
}

/// Milliseconds since the Unix epoch: how every timestamp is stored.
pub fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}
