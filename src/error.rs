//! The library's one error type and its exit codes.
//! Every variant says what went wrong, where, and how to fix it; the CLI only prints it.

use std::path::PathBuf;

use crate::diag::Diagnostics;

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
        "model '{name}' not found; looked in:\n{}\n  hint: run `flow models pull {name}` if it is in the catalogue (`flow models list`), or set `model:` to a folder holding {expect}",
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

    /// A store file that SQLite cannot read as a sound database. flow never rewrites it.
    #[error(
        "store {path} {what}\n  hint: flow does not touch a damaged store. Keep {path} and its -wal file together and restore both from a backup, or save what can be read with `sqlite3 {path} .recover | sqlite3 recovered.db` and point `store:` at that; to start afresh, move both files aside",
        path = path.display()
    )]
    DamagedStore { path: PathBuf, what: String },

    #[error("store {path}: could not apply migrations: {source}")]
    Migrate { path: PathBuf, source: sqlx::migrate::MigrateError },

    /// A stage failed while running; the engine records it and goes on with independent stages.
    #[error("stage '{stage}': {message}")]
    Stage { stage: String, message: String },

    /// A tensor operation failed (out of memory, a device error); `what` names the step.
    #[error(
        "{what}: {source}\n  hint: if memory ran out, lower `batch_size` (or `max_seq_length`); on a GPU, try `device: cpu`"
    )]
    Tensor { what: String, source: candle_core::Error },

    /// A model's tokenizer could not do its job (a broken or mismatched tokenizer.json, or text it refuses).
    #[error(
        "{what}: {message}\n  hint: check that the model folder's tokenizer.json belongs to the model (`flow models pull` restores the catalogue's)"
    )]
    Tokenizer { what: String, message: String },

    /// One of flow's own background tasks panicked or was cancelled.
    #[error(
        "{what} stopped unexpectedly: {message}\n  hint: finished work is stored; `flow resume` continues, and a repeat is a bug in flow worth reporting"
    )]
    Task { what: String, message: String },

    /// A model server (an LLM or embedding API) failed or answered something unusable.
    #[error("{what}\n  hint: {hint}")]
    Service { what: String, hint: String },

    /// A request would have crossed a `budget:`; the run stops the way an interrupt stops it.
    #[error("{what}\n  hint: raise `budget:` in the workflow and `flow resume`: nothing paid for is asked again")]
    Budget { what: String },

    /// A signal (SIGINT, SIGTERM) stopped the run: nothing new is sent, what is in flight is stored.
    #[error("interrupted by a signal\n  hint: `flow resume` continues; answers already paid for are in the store")]
    Interrupted,

    /// Fetching a model from a package registry failed.
    #[error("{what}\n  hint: {hint}")]
    Fetch { what: String, hint: String },

    /// Something flow itself got wrong, not the input.
    #[error("internal error: {what}\n  hint: this is a bug in flow; please report it with the command that showed it")]
    Internal { what: String },
}

impl Error {
    /// 2 for anything the user can fix in their input or config, 1 for a failed run.
    pub fn exit_code(&self) -> u8 {
        match self {
            Error::Workflow(_)
            | Error::BadInput { .. }
            | Error::ModelNotFound { .. }
            | Error::Locked { .. }
            | Error::Tokenizer { .. }
            | Error::DamagedStore { .. } => 2,
            _ => 1,
        }
    }

    pub fn bad_input(what: impl Into<String>, hint: impl Into<String>) -> Self {
        Error::BadInput { what: what.into(), hint: hint.into() }
    }

    /// For `map_err` on a tensor step.
    pub fn tensor(what: impl Into<String>) -> impl FnOnce(candle_core::Error) -> Error {
        let what = what.into();
        move |source| Error::Tensor { what, source }
    }

    /// For `map_err` on a joined task.
    pub fn task(what: impl Into<String>) -> impl FnOnce(tokio::task::JoinError) -> Error {
        let what = what.into();
        move |e| Error::Task { what, message: e.to_string() }
    }

    /// For `map_err` on a tokenizer call.
    pub fn tokenizer<E: std::fmt::Display>(what: impl Into<String>) -> impl FnOnce(E) -> Error {
        let what = what.into();
        move |e| Error::Tokenizer { what, message: e.to_string() }
    }

    pub fn internal(what: impl Into<String>) -> Self {
        Error::Internal { what: what.into() }
    }

    pub fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Error {
        let path = path.into();
        move |source| Error::Io { path, source }
    }
}
