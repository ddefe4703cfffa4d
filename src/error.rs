//! The library's one error type and its exit codes.
//! Every variant says what went wrong, where, and how to fix it; the CLI only prints it.

use std::path::PathBuf;

use crate::workflow::Diagnostics;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The workflow file has problems; each carries its own file:line:col.
    #[error("{0}")]
    Workflow(Diagnostics),

    /// Input the user gave us (a flag, a corpus setting, a model folder) that cannot be used.
    #[error("{what}\n  hint: {hint}")]
    BadInput { what: String, hint: String },

    #[error(
        "model '{name}' not found; looked in:\n{}\n  hint: run `flow models pull` to fetch the default models, or set `model:` to a folder holding {expect}",
        looked.iter().map(|p| format!("    {}", p.display())).collect::<Vec<_>>().join("\n")
    )]
    ModelNotFound { name: String, looked: Vec<PathBuf>, expect: String },

    #[error(
        "store {store} is in use by {holder}\n  hint: wait for that run to finish, or stop it; a lock left by a dead process is taken over automatically"
    )]
    Locked { store: PathBuf, holder: String },

    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },

    #[error("store {path}: {source}")]
    Store { path: PathBuf, source: sqlx::Error },

    #[error("store: {0}")]
    Sql(#[from] sqlx::Error),

    #[error("store {path}: could not apply migrations: {source}")]
    Migrate { path: PathBuf, source: sqlx::migrate::MigrateError },

    /// A stage failed while running; the engine records it and goes on with independent stages.
    #[error("stage '{stage}': {message}")]
    Stage { stage: String, message: String },

    #[error("{0}")]
    Other(String),
}

impl Error {
    /// 2 for anything the user can fix in their input or config, 1 for a failed run.
    pub fn exit_code(&self) -> u8 {
        match self {
            Error::Workflow(_) | Error::BadInput { .. } | Error::ModelNotFound { .. } | Error::Locked { .. } => 2,
            _ => 1,
        }
    }

    pub fn bad_input(what: impl Into<String>, hint: impl Into<String>) -> Self {
        Error::BadInput { what: what.into(), hint: hint.into() }
    }

    pub fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Error {
        let path = path.into();
        move |source| Error::Io { path, source }
    }
}
