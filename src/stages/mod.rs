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

/// The pairs a stage learns from or is scored on: those of the judge stages it reads from (directly
/// or further up its `needs`) on the questions of the generate stages they judge.
pub fn pair_source(spec: &StageSpec, wf: &Workflow) -> crate::store::pairs::PairSource {
    let mut src = crate::store::pairs::PairSource::default();
    for s in wf.upstream(&spec.name).into_iter().filter(|s| s.kind == judge::KIND.name) {
        src.judges.push(s.name.clone());
        let generators = s.needs.iter().filter(|n| wf.stages.get(*n).is_some_and(|g| g.kind == generate::KIND.name));
        src.generators.extend(generators.cloned());
    }
    src.judges.sort();
    src.generators.sort();
    src.generators.dedup();
    src
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
    /// The budgets its model calls count against: the run's and its own.
    pub ledgers: crate::llm::budget::Ledgers,
}

impl StageCtx {
    /// Who this stage's model calls are made for.
    pub fn account(&self) -> crate::llm::Account {
        crate::llm::Account { run_id: self.run_id, stage: self.spec.name.clone(), ledgers: self.ledgers.clone() }
    }
}

/// What `flow plan` hands a stage: the store as it stands, and what the upstream stages that would
/// run first are expected to produce (their output is not in the store yet).
pub struct PlanCtx<'a> {
    pub store: &'a Store,
    pub spec: &'a StageSpec,
    pub workflow: &'a Workflow,
    pub upstream: &'a std::collections::BTreeMap<String, Forecast>,
    /// Whether stages after this one are planned too and need its `Forecast` (not so when a run
    /// records its estimate at the stage's start: what came before is in the store by then).
    pub forecast: bool,
}

impl PlanCtx<'_> {
    /// The forecasts of the stages this one reads from (`needs`) that would run before it.
    pub fn forecasts(&self) -> impl Iterator<Item = &Forecast> {
        self.spec.needs.iter().filter_map(|n| self.upstream.get(n))
    }
}

/// What a stage that would run is expected to produce, for the plans of the stages after it.
#[derive(Debug, Clone)]
pub enum Forecast {
    /// Chunks, cut in memory as the run would cut them (ids are placeholders, below zero).
    Chunks(Vec<crate::store::queries::InputChunk>),
    /// A generate stage's questions: those it would write about these chunks, of about
    /// `query_tokens` tokens each (their texts are not known until the model writes them), beside
    /// those it already holds with `settings`, which its run makes the current ones.
    Questions {
        stage: String,
        settings: String,
        about: Vec<crate::store::judgments::JudgeInput>,
        query_tokens: u64,
        basis: String,
    },
}

/// What a run of a stage would do, as `flow plan` shows it.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct StagePlan {
    /// Items the stage has in all, and those with no result yet (the work a run does).
    pub items: u64,
    pub todo: u64,
    /// Its chat requests, where it calls a model.
    pub llm: Option<crate::llm::plan::Estimate>,
    /// What the figures rest on, where that is not plain (estimates, upper bounds).
    pub notes: Vec<String>,
    #[serde(skip)]
    pub forecast: Option<Forecast>,
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

    /// What `run` would do now, without calling a model or writing to the store: for `flow plan`.
    async fn plan(&self, _cx: &PlanCtx<'_>) -> Result<StagePlan> {
        Ok(StagePlan { notes: vec!["calls no chat model".into()], ..Default::default() })
    }
}
