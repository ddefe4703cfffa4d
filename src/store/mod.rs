//! The SQLite store: one file per workflow, opened with WAL, a busy timeout and foreign keys,
//! migrated on open. Each table's SQL lives in one submodule.

pub mod batches;
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
pub mod states;

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous};

use crate::error::{Error, Result};

/// Names the store in an SQL error, so `?` keeps the file the error is about.
pub(crate) trait AtStore<T> {
    fn at(self, store: &Store) -> Result<T>;
}

impl<T> AtStore<T> for std::result::Result<T, sqlx::Error> {
    fn at(self, store: &Store) -> Result<T> {
        self.map_err(|source| Error::Store { path: store.path.clone(), source })
    }
}

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

#[derive(Clone, Debug)]
pub struct Store {
    pub pool: SqlitePool,
    pub path: PathBuf,
}

impl Store {
    /// Folds the write-ahead log into the database file and closes every connection, so a finished
    /// run leaves one whole file: readable from a read-only mount, copyable on its own. Without it,
    /// the commits of a process that exits with connections still open can stay in the `-wal` file.
    pub async fn close(&self) {
        let _ = sqlx::query("PRAGMA wal_checkpoint(TRUNCATE)").execute(&self.pool).await;
        self.pool.close().await;
    }

    /// Opens (creating if needed) and migrates the store at `path`. An existing file is checked
    /// first (SQLite's header, then `PRAGMA quick_check`): a damaged store is named, never rewritten.
    pub async fn open(path: &Path) -> Result<Store> {
        check_location(path)?;
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| unusable_location(path, &e.to_string()))?;
        }
        let existed = check_header(path)?;
        let opts = options(path)?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            // NORMAL in WAL mode loses at most the last commits on power loss, never consistency;
            // a killed process loses nothing that was committed.
            .synchronous(SqliteSynchronous::Normal)
            .foreign_keys(true);
        let pool = SqlitePoolOptions::new().max_connections(4).connect_with(opts).await.map_err(|e| {
            // SQLITE_CANTOPEN: a folder that cannot hold a database (read-only, /proc, ...).
            match e.as_database_error().and_then(|d| d.code()).and_then(|c| c.parse::<i32>().ok()) {
                Some(c) if c & 0xff == 14 => unusable_location(path, &e.to_string()),
                _ => damaged_or(path, e),
            }
        })?;
        if existed {
            quick_check(&pool, path).await?;
        }
        MIGRATOR.run(&pool).await.map_err(|e| match e {
            sqlx::migrate::MigrateError::Execute(source) => damaged_or(path, source),
            source => Error::Migrate { path: path.into(), source },
        })?;
        Ok(Store { pool, path: path.into() })
    }

    /// Opens a store that must already exist (for the read-only commands). In a folder that cannot
    /// be written (a read-only mount), it opens read-only: `status`, `runs` and `pairs` still work.
    pub async fn open_existing(path: &Path) -> Result<Store> {
        check_location(path)?;
        if !path.exists() {
            return Err(Error::bad_input(
                format!("store {} does not exist yet", path.display()),
                "run the workflow first: `flow run WORKFLOW`",
            ));
        }
        if folder_writable(path) {
            return Store::open(path).await;
        }
        check_header(path)?;
        // Nothing can change the file while its folder cannot be written: SQLite may skip the
        // WAL index (-shm), which it could not create there.
        let opts = options(path)?.read_only(true).immutable(true);
        let pool =
            SqlitePoolOptions::new().max_connections(2).connect_with(opts).await.map_err(|e| damaged_or(path, e))?;
        quick_check(&pool, path).await?;
        Ok(Store { pool, path: path.into() })
    }

    /// An empty, migrated store in memory: what `flow plan` reads for a workflow never run.
    pub async fn in_memory() -> Result<Store> {
        let path = Path::new(":memory:");
        let opts = SqliteConnectOptions::from_str("sqlite::memory:")
            .map_err(|e| Error::Store { path: path.into(), source: e })?;
        // One connection: each connection to `:memory:` would be a database of its own.
        let pool = SqlitePoolOptions::new()
            .max_connections(1)
            .idle_timeout(None)
            .max_lifetime(None)
            .connect_with(opts)
            .await
            .map_err(|e| damaged_or(path, e))?;
        MIGRATOR.run(&pool).await.map_err(|source| Error::Migrate { path: path.into(), source })?;
        Ok(Store { pool, path: path.into() })
    }
}

/// A store path that can never be a database file: empty, or an existing folder.
pub fn check_location(path: &Path) -> Result<()> {
    if path.as_os_str().is_empty() || path.is_dir() {
        let what = if path.is_dir() { "is a folder" } else { "is empty" };
        return Err(Error::bad_input(
            format!("store {} {what}, not a database file", path.display()),
            "set `store:` to a file name such as `finance.db` (relative to the workflow file)",
        ));
    }
    Ok(())
}

/// A store that cannot be created where `store:` points.
pub fn unusable_location(path: &Path, why: &str) -> Error {
    Error::bad_input(
        format!("cannot create the store {}: {why}", path.display()),
        "point `store:` at a file in a folder you can write (relative to the workflow file)",
    )
}

fn options(path: &Path) -> Result<SqliteConnectOptions> {
    Ok(SqliteConnectOptions::from_str("sqlite://")
        .map_err(|e| Error::Store { path: path.into(), source: e })?
        .filename(path)
        .busy_timeout(Duration::from_secs(30)))
}

/// Whether `path` is an existing store; an existing file must start with SQLite's header.
fn check_header(path: &Path) -> Result<bool> {
    use std::io::Read;
    let mut f = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(Error::Io { path: path.into(), source: e }),
    };
    let mut head = [0u8; 16];
    let n = f.read(&mut head).map_err(Error::io(path))?;
    if n == 0 {
        return Ok(false);
    }
    if n < 16 || &head != b"SQLite format 3\0" {
        return Err(damaged(path, "is not an SQLite database (its first bytes are not SQLite's header)"));
    }
    Ok(true)
}

/// SQLite's `quick_check`: every page and index is read (about a second per GB, see BENCHMARKS.md).
async fn quick_check(pool: &SqlitePool, path: &Path) -> Result<()> {
    let rows: Vec<String> =
        sqlx::query_scalar("PRAGMA quick_check(5)").fetch_all(pool).await.map_err(|e| damaged_or(path, e))?;
    if rows.len() == 1 && rows[0] == "ok" {
        return Ok(());
    }
    Err(damaged(path, &format!("fails SQLite's integrity check: {}", rows.join("; "))))
}

fn folder_writable(path: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let Ok(c) = std::ffi::CString::new(dir.as_os_str().as_bytes()) else { return false };
    // SAFETY: a valid NUL-terminated path; access(2) only reads it.
    unsafe { libc::access(c.as_ptr(), libc::W_OK) == 0 }
}

fn damaged(path: &Path, what: &str) -> Error {
    Error::DamagedStore { path: path.into(), what: what.to_string() }
}

/// SQLite's "not a database" (26) and "malformed" (11) name a damaged store; other errors pass.
fn damaged_or(path: &Path, e: sqlx::Error) -> Error {
    let code = e.as_database_error().and_then(|d| d.code()).and_then(|c| c.parse::<i32>().ok());
    match code.map(|c| c & 0xff) {
        Some(11) | Some(26) => damaged(path, &format!("is damaged: {e}")),
        _ => Error::Store { path: path.into(), source: e },
    }
}

/// Milliseconds since the Unix epoch: how every timestamp is stored.
pub fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}
