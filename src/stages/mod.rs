//! Stage kinds: one file per kind behind the `Stage` trait, all listed in `KINDS`.
//! The engine only ever goes through this table; it never names a kind.

pub mod chunk;
pub mod eval_rag;
pub mod eval_recall;
pub mod generate;
pub mod judge;
pub mod train;

use std::sync::Arc;

use async_trait::async_trait;

use crate::engine::progress::StageProgress;
use crate::error::Result;
use crate::store::Store;
use crate::workflow::{CheckCtx, Diagnostic, StageSpec, Workflow};

/// A stage kind: how to check its parameters without I/O, and how to build a runnable stage.
pub struct Kind {
    pub name: &'static str,
    pub about: &'static str,
    /// Checks the stage's parameters (all of them, reporting every problem); no I/O.
    pub check: fn(&CheckCtx) -> Vec<Diagnostic>,
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

/// What a running stage is handed: its identity, the store and a progress handle. Nothing else.
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

/// Runs `work` on each item as its own task, at most `window` at a time, and returns the results
/// in completion order. Separate tasks keep making progress (and release their store connections)
/// while the caller awaits its own writes.
pub fn spawn_items<I, R, F, Fut>(items: Vec<I>, window: usize, work: F) -> tokio::sync::mpsc::Receiver<R>
where
    I: Send + 'static,
    R: Send + 'static,
    F: Fn(I) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = R> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(window.max(1));
    let work = Arc::new(work);
    let gate = Arc::new(tokio::sync::Semaphore::new(window.max(1)));
    tokio::spawn(async move {
        for item in items {
            let Ok(permit) = gate.clone().acquire_owned().await else { return };
            let (tx, work) = (tx.clone(), work.clone());
            tokio::spawn(async move {
                let r = work(item).await;
                let _ = tx.send(r).await;
                drop(permit);
            });
        }
    });
    rx
}

/// What an LLM stage sends for one item: the rendered prompt as one chat request.
pub struct Prompted<'a> {
    pub template: &'a crate::prompt::Template,
    pub system: Option<&'a str>,
    pub params: &'a crate::llm::GenParams,
    /// The JSON schema asked for (name, schema).
    pub schema: (&'a str, &'a serde_json::Value),
}

/// One chat result per item id: the answer (or why it failed), or a store error.
pub type ChatResult = (i64, Result<Result<crate::llm::ChatDone, crate::llm::LlmFailure>>);

/// Renders a request per item (id, template variables) and starts them on the client, at most
/// `window` at a time; results arrive as they finish. A template error stops the stage before any call.
pub fn start_chats(
    items: Vec<(i64, serde_json::Value)>,
    how: &Prompted,
    client: Arc<crate::llm::LlmClient>,
    provider: Arc<dyn crate::llm::ChatProvider>,
    window: usize,
) -> Result<tokio::sync::mpsc::Receiver<ChatResult>> {
    use crate::llm::{ChatRequest, Message};
    let mut requests = Vec::with_capacity(items.len());
    for (id, vars) in items {
        let mut messages = Vec::new();
        if let Some(s) = how.system {
            messages.push(Message::system(s));
        }
        messages.push(Message::user(how.template.render(vars)?));
        let json_schema = Some((how.schema.0.to_string(), how.schema.1.clone()));
        requests.push((id, ChatRequest { messages, params: how.params.clone(), json_schema }));
    }
    Ok(spawn_items(requests, window, move |(id, req): (i64, ChatRequest)| {
        let (client, provider) = (client.clone(), provider.clone());
        async move { (id, client.chat(provider.as_ref(), &req).await) }
    }))
}
