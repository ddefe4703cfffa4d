//! Stage kinds: one file per kind behind the `Stage` trait, all listed in `KINDS`.
//! The engine only ever goes through this table; it never names a kind.

pub mod chunk;
pub mod eval_rag;
pub mod eval_recall;
pub mod generate;
pub mod judge;
pub mod llm;
pub mod train;

use std::sync::Arc;

use async_trait::async_trait;

use crate::error::{Error, Result};
use crate::progress::StageProgress;
use crate::store::Store;
use crate::workflow::{CheckCtx, Checked, Kinds, StageSpec, Workflow};

/// A stage kind: how to check its parameters without I/O, and how to build a runnable stage.
pub struct Kind {
    pub name: &'static str,
    pub about: &'static str,
    /// Checks the stage's parameters (all of them, reporting every problem); no I/O. On success,
    /// the parameters with every default filled in (`workflow::checked`).
    pub check: fn(&CheckCtx) -> Checked,
    /// Checks that read files but load no model and call nothing (prompt templates rendered against
    /// their documented variables): run by `flow validate`, and by `build`.
    pub preflight: fn(&StageSpec, &Workflow) -> Result<()>,
    /// Resolves models and paths; errors here are input errors (exit 2) reported before the run starts.
    pub build: fn(&StageSpec, &Workflow) -> Result<Box<dyn Stage>>,
}

impl std::fmt::Debug for Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name)
    }
}

pub const KINDS: &[Kind] = &[chunk::KIND, generate::KIND, judge::KIND, train::KIND, eval_recall::KIND, eval_rag::KIND];

pub fn kind(name: &str) -> Option<&'static Kind> {
    KINDS.iter().find(|k| k.name == name)
}

/// The kind table as the workflow loader sees it.
pub struct Registry;

impl Kinds for Registry {
    fn names(&self) -> Vec<&'static str> {
        KINDS.iter().map(|k| k.name).collect()
    }

    fn check(&self, kind_name: &str, cx: &CheckCtx) -> Option<Checked> {
        kind(kind_name).map(|k| (k.check)(cx))
    }
}

/// Reads and checks a workflow file with every stage kind flow has.
pub fn load_workflow(path: &std::path::Path) -> Result<Workflow> {
    crate::workflow::load(path, &Registry)
}

/// Every stage's preflight: what `flow validate` can check without loading a model or spending.
pub fn preflight(wf: &Workflow) -> Result<()> {
    for name in &wf.order {
        let spec = &wf.stages[name];
        if let Some(k) = kind(&spec.kind) {
            (k.preflight)(spec, wf)?;
        }
    }
    Ok(())
}

/// For kinds with nothing to check before building.
pub fn no_preflight(_: &StageSpec, _: &Workflow) -> Result<()> {
    Ok(())
}

/// The runnable stage for a checked spec.
pub fn build(spec: &StageSpec, wf: &Workflow) -> Result<Box<dyn Stage>> {
    let k = kind(&spec.kind).ok_or_else(|| Error::Internal {
        what: format!("stage `{}` has kind `{}`, which flow lacks", spec.name, spec.kind),
    })?;
    (k.build)(spec, wf)
}

/// What a running stage is handed: its identity, its spec and workflow, the store and a progress handle.
pub struct StageCtx {
    pub run_id: i64,
    pub stage_run_id: i64,
    pub spec: StageSpec,
    pub workflow: Arc<Workflow>,
    pub store: Store,
    pub progress: StageProgress,
}

/// What a stage hands back when it ends without error.
#[derive(Debug, Default)]
pub struct Outcome {
    /// Kind-specific figures shown by `flow status` (stored as JSON).
    pub summary: serde_json::Value,
    /// Set when some items failed beyond what the stage tolerates: the stage ends failed.
    pub failure: Option<String>,
}

#[async_trait]
pub trait Stage: Send + Sync {
    /// A digest of everything besides the YAML parameters that decides the output: files read,
    /// prompt text, corpus contents. Part of the stage fingerprint.
    async fn inputs(&self) -> Result<String>;

    /// Whether what an up-to-date run of this stage left outside the store (model folders) is still
    /// there; if not, the stage runs again instead of counting as up to date.
    async fn outputs_intact(&self, _store: &Store) -> Result<bool> {
        Ok(true)
    }

    /// Does the work, storing each item as it finishes and skipping items already stored.
    async fn run(&self, ctx: &StageCtx) -> Result<Outcome>;
}
