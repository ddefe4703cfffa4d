//! What every LLM stage (generate, judge, eval_rag) shares: its common parameters, their checks,
//! the chat start-up per item, the usage written every 2 s, and the verdict on failed items.
//! A new LLM stage is then its prompt, its parsing and its table.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{PlanCtx, StageCtx};
use crate::error::Result;
use crate::llm::plan::{Estimate, Planned};
use crate::llm::{self, ChatDone, ChatProvider, ChatRequest, GenParams, LlmClient, LlmFailure, Message};
use crate::progress::StageProgress;
use crate::prompt::Template;
use crate::store::runs::{self, UsageSnapshot};
use crate::workflow::{CheckCtx, Diagnostic, Workflow};

/// Declares an LLM stage's parameters: its own fields, then the ones every LLM stage shares
/// (`model`, `system`, sampling, `max_failures`) with the stage's defaults. The YAML stays flat
/// and unknown keys stay errors, which `#[serde(flatten)]` would give up.
macro_rules! llm_params {
    (
        defaults { temperature: $temp:expr, max_tokens: $max_tokens:expr, max_failures: $max_failures:expr $(,)? }
        $(#[$meta:meta])*
        pub struct $name:ident { $($(#[$fmeta:meta])* pub $field:ident : $ty:ty,)* }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        pub struct $name {
            $($(#[$fmeta])* pub $field: $ty,)*
            /// The key in `models:` of the LLM to use.
            #[serde(default = "crate::stages::llm::default_model")]
            pub model: String,
            #[serde(default)]
            pub system: Option<String>,
            #[serde(default)]
            pub temperature: Option<f32>,
            #[serde(default)]
            pub top_p: Option<f32>,
            #[serde(default)]
            pub max_tokens: Option<u32>,
            #[serde(default)]
            pub seed: Option<u64>,
            /// Local models only: penalty for repeating recent tokens (1.0 = none).
            #[serde(default)]
            pub repeat_penalty: Option<f32>,
            /// The share of items that may fail while the stage still succeeds (with a warning).
            #[serde(default)]
            pub max_failures: Option<f64>,
        }

        impl $name {
            /// The shared parameters, the stage's defaults filled in.
            pub fn llm(&self) -> crate::stages::llm::LlmParams {
                crate::stages::llm::LlmParams {
                    model: self.model.clone(),
                    system: self.system.clone(),
                    temperature: self.temperature.unwrap_or($temp),
                    top_p: self.top_p,
                    max_tokens: self.max_tokens.unwrap_or($max_tokens),
                    seed: self.seed,
                    repeat_penalty: self.repeat_penalty,
                    max_failures: self.max_failures.unwrap_or($max_failures),
                }
            }

            /// Writes the defaults into the parameters, so the checked (fingerprinted) ones show them.
            pub fn fill_defaults(&mut self) {
                let l = self.llm();
                self.temperature = Some(l.temperature);
                self.max_tokens = Some(l.max_tokens);
                self.max_failures = Some(l.max_failures);
            }
        }
    };
}
pub(crate) use llm_params;

pub fn default_model() -> String {
    "llm".into()
}

/// The parameters every LLM stage has, with its defaults applied.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LlmParams {
    pub model: String,
    pub system: Option<String>,
    pub temperature: f32,
    pub top_p: Option<f32>,
    pub max_tokens: u32,
    pub seed: Option<u64>,
    pub repeat_penalty: Option<f32>,
    pub max_failures: f64,
}

impl LlmParams {
    /// Sampling settings of each request; `max_tokens` where a stage's second call has its own.
    pub fn gen_params(&self, max_tokens: Option<u32>) -> GenParams {
        GenParams {
            temperature: Some(self.temperature),
            top_p: self.top_p,
            max_tokens: Some(max_tokens.unwrap_or(self.max_tokens)),
            seed: self.seed,
            repeat_penalty: self.repeat_penalty,
        }
    }

    /// Checks shared by the LLM stages: the model key exists and max_failures is a share.
    pub fn check(&self, cx: &CheckCtx, diags: &mut Vec<Diagnostic>) {
        check_model(cx, &self.model, diags);
        if !(0.0..=1.0).contains(&self.max_failures) {
            diags.push(
                Diagnostic::new(
                    at(cx, "max_failures"),
                    format!("stage `{}`: max_failures is a share from 0 to 1", cx.stage),
                )
                .hint("0.02 lets 2% of items fail with a warning"),
            );
        }
    }
}

fn at(cx: &CheckCtx, key: &str) -> crate::diag::Span {
    cx.node.get(key).map(|n| n.span()).unwrap_or(cx.node.span())
}

/// A `models:` key an LLM stage names must be defined.
pub fn check_model(cx: &CheckCtx, model: &str, diags: &mut Vec<Diagnostic>) {
    if !cx.models.contains_key(model) {
        diags.push(
            Diagnostic::new(
                at(cx, "model"),
                format!("stage `{}` uses `models.{model}`, which is not defined", cx.stage),
            )
            .hint(format!("add `{model}: {{ provider: openai, model: gpt-4o-mini }}` under `models:`")),
        );
    }
}

/// What an LLM stage sends for one item: the rendered prompt as one chat request.
pub struct Prompted<'a> {
    pub template: &'a Template,
    pub system: Option<&'a str>,
    pub params: &'a GenParams,
    /// The JSON schema asked for (name, schema).
    pub schema: (&'a str, &'a Value),
    /// Whether an answer parsed into this stage's result: only such answers are cache hits.
    pub accept: fn(&str) -> bool,
    /// The answer is a 1-5 score read as probabilities (a judge).
    pub score: Option<crate::llm::ScoreAsk>,
}

/// The key of the settings an LLM stage's results belong to: its checked parameters (less those
/// that only decide what happens to results, such as thresholds), its prompt and its model. A
/// stage whose key changed makes new results; the old ones are superseded.
pub fn settings_key(params: &impl Serialize, leave_out: &[&str], template: &Template, model: &llm::Identity) -> String {
    let mut p = serde_json::to_value(params).unwrap_or(Value::Null);
    if let Value::Object(m) = &mut p {
        for k in leave_out.iter().chain(&["max_failures"]) {
            m.remove(*k);
        }
    }
    let doc = serde_json::json!({
        "params": p, "prompt": template.hash, "model": [model.provider, model.base_url, model.model],
    });
    crate::digest::sha256_hex(doc.to_string().as_bytes())
}

/// A stage's prompt: the file `given` names (relative to the workflow file), else the built-in
/// copy of prompts/`api` for an API model or prompts/`local` for a local one. It is rendered once
/// with `sample` (and `json` both true and false, the branches local prompts take), so a template
/// error shows before any call.
pub fn prompt(
    wf: &Workflow,
    model_key: &str,
    given: Option<&str>,
    (api, local): (&str, &str),
    mut sample: Value,
) -> Result<Template> {
    let t = match given {
        Some(file) => Template::load(&wf.dir.join(file))?,
        None if llm::is_local(wf, model_key)? => Template::builtin(local)?,
        None => Template::builtin(api)?,
    };
    for json in [true, false] {
        if let Value::Object(m) = &mut sample {
            m.insert("json".into(), Value::Bool(json));
        }
        t.render(&sample)?;
    }
    Ok(t)
}

/// What an LLM stage that asks one model per item is made of: its name, workflow, the stages it reads
/// from, its checked parameters, its prompt and its model. Each such kind implements `Stage` for its
/// own `LlmStage<Params>`.
pub struct LlmStage<P> {
    pub name: String,
    pub wf: Arc<Workflow>,
    pub inputs_from: Vec<String>,
    pub params: P,
    pub template: Arc<Template>,
    pub provider: Arc<dyn ChatProvider>,
}

impl<P: Send + Sync + 'static> LlmStage<P>
where
    LlmStage<P>: super::Stage,
{
    /// The stage for `spec`, asking `models.<model_key>` with `template`.
    pub fn build(
        spec: &super::StageSpec,
        wf: &Workflow,
        (params, template): (P, Template),
        model_key: &str,
    ) -> Result<Box<dyn super::Stage>> {
        let provider = llm::chat_provider(wf, model_key)?;
        Ok(Box::new(LlmStage {
            name: spec.name.clone(),
            wf: Arc::new(wf.clone()),
            inputs_from: spec.needs.clone(),
            params,
            template: Arc::new(template),
            provider,
        }))
    }
}

impl<P> LlmStage<P> {
    /// The stage's inputs beyond its parameters: the prompt's text and the model that answers.
    pub fn inputs_digest(&self) -> String {
        let id = self.provider.identity();
        format!("{}|{}|{}|{}", self.template.hash, id.provider, id.base_url, id.model)
    }
}

/// One chat result per item id: the answer (or why it failed), or a store error.
pub type ChatResult = (i64, Result<std::result::Result<ChatDone, LlmFailure>>);

/// One model's chat for one stage run: the provider, a client whose calls are accounted to this
/// stage run (cache, shared limits, retries).
pub struct Chat {
    pub provider: Arc<dyn ChatProvider>,
    pub client: Arc<LlmClient>,
    /// Given to every prompt as `json`: whether the model is asked for JSON.
    pub json: bool,
    /// The model's Batch API settings, when its requests go through batches.
    batch: Option<crate::workflow::BatchSpec>,
    progress: crate::progress::StageProgress,
}

impl Chat {
    pub fn start(wf: &Workflow, model_key: &str, provider: Arc<dyn ChatProvider>, ctx: &StageCtx) -> Result<Chat> {
        let client = llm::client(wf, model_key, provider.identity(), &ctx.store, &ctx.account())?;
        Ok(Chat {
            provider,
            client: Arc::new(client),
            json: llm::writes_json(wf, model_key)?,
            batch: llm::model_spec(wf, model_key)?.batched().cloned(),
            progress: ctx.progress.clone(),
        })
    }

    /// Starts the requests, at most `window` at a time; results arrive as they finish. With the
    /// model's `batch:` on, the Batch API answers them first (this waits for its batches), and what
    /// they left unanswered is sent live.
    pub async fn launch(
        &self,
        requests: Vec<(i64, ChatRequest)>,
        window: usize,
    ) -> Result<tokio::sync::mpsc::Receiver<ChatResult>> {
        if let Some(spec) = &self.batch {
            let reqs: Vec<&ChatRequest> = requests.iter().map(|(_, r)| r).collect();
            llm::batch::answer(&self.client, self.provider.as_ref(), spec, &reqs, &self.progress).await?;
        }
        let (client, provider) = (self.client.clone(), self.provider.clone());
        let work = move |req: ChatRequest| {
            let (client, provider) = (client.clone(), provider.clone());
            async move { client.chat(provider.as_ref(), &req).await }
        };
        // A panic while asking about one item fails that item (never counts as done).
        let panicked =
            |why: String| Ok(Err(LlmFailure { message: format!("flow failed on this item: {why}"), attempts: 0 }));
        Ok(spawn_items(requests, window, work, panicked))
    }

    pub fn usage(&self) -> UsageSnapshot {
        self.client.usage()
    }
}

/// Renders a request per item (id, template variables); `json` is given to the prompt (whether
/// the model is asked for JSON). A template error stops the stage before any call.
pub fn requests(items: Vec<(i64, Value)>, how: &Prompted, json: bool) -> Result<Vec<(i64, ChatRequest)>> {
    let mut requests = Vec::with_capacity(items.len());
    for (id, mut vars) in items {
        if let Value::Object(m) = &mut vars {
            m.insert("json".into(), Value::Bool(json));
        }
        let mut messages = Vec::new();
        if let Some(s) = how.system {
            messages.push(Message::system(s));
        }
        messages.push(Message::user(how.template.render(vars)?));
        let json_schema = Some((how.schema.0.to_string(), how.schema.1.clone()));
        let accept = Some(how.accept);
        let score = how.score;
        requests.push((id, ChatRequest { messages, params: how.params.clone(), json_schema, accept, score }));
    }
    Ok(requests)
}

/// The estimate of a stage's planned requests to `models.<model_key>`, at the price they are billed at.
pub async fn estimate(
    cx: &PlanCtx<'_>,
    model_key: &str,
    provider: &dyn ChatProvider,
    planned: &[Planned],
) -> Result<Estimate> {
    let price = llm::model_spec(cx.workflow, model_key)?.billed_price();
    llm::plan::estimate(provider, price, cx.store, &cx.spec.name, planned).await
}

/// Runs `work` on each item as its own task, at most `window` at a time, and returns each item's id
/// with its result in completion order. Separate tasks keep making progress (and release their store
/// connections) while the caller awaits its own writes. A task that panics still reports its item,
/// with `panicked`'s result, so no item can vanish from a stage's count.
pub fn spawn_items<T, R, F, Fut>(
    items: Vec<(i64, T)>,
    window: usize,
    work: F,
    panicked: fn(String) -> R,
) -> tokio::sync::mpsc::Receiver<(i64, R)>
where
    T: Send + 'static,
    R: Send + 'static,
    F: Fn(T) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = R> + Send + 'static,
{
    use futures::FutureExt;
    let (tx, rx) = tokio::sync::mpsc::channel(window.max(1));
    let work = Arc::new(work);
    let gate = Arc::new(tokio::sync::Semaphore::new(window.max(1)));
    tokio::spawn(async move {
        for (id, item) in items {
            let Ok(permit) = gate.clone().acquire_owned().await else { return };
            let (tx, work) = (tx.clone(), work.clone());
            tokio::spawn(async move {
                let r = match std::panic::AssertUnwindSafe(async { work(item).await }).catch_unwind().await {
                    Ok(r) => r,
                    Err(p) => panicked(panic_message(p.as_ref())),
                };
                let _ = tx.send((id, r)).await;
                drop(permit);
            });
        }
    });
    rx
}

/// What a panic said, for the item's error.
fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    match (p.downcast_ref::<&str>(), p.downcast_ref::<String>()) {
        (Some(s), _) => format!("it panicked: {s}"),
        (_, Some(s)) => format!("it panicked: {s}"),
        _ => "it panicked".to_string(),
    }
}

/// Writes a stage run's LLM usage so `flow status` can follow a live run: at most every 2 s while
/// items come in, and once at the end.
pub struct UsageWriter {
    last: Instant,
}

impl Default for UsageWriter {
    fn default() -> Self {
        UsageWriter { last: Instant::now() }
    }
}

impl UsageWriter {
    pub async fn tick(&mut self, ctx: &StageCtx, usage: impl FnOnce() -> UsageSnapshot) -> Result<()> {
        if self.last.elapsed() > Duration::from_secs(2) {
            runs::set_llm_usage(&ctx.store, ctx.stage_run_id, &usage()).await?;
            self.last = Instant::now();
        }
        Ok(())
    }

    pub async fn finish(self, ctx: &StageCtx, usage: UsageSnapshot) -> Result<UsageSnapshot> {
        runs::set_llm_usage(&ctx.store, ctx.stage_run_id, &usage).await?;
        Ok(usage)
    }
}

/// Failed items end the stage failed unless they are within `max_failures` of all items.
pub fn failure_verdict(
    failed: u64,
    total: u64,
    max_failures: f64,
    first_error: Option<String>,
    progress: &StageProgress,
) -> Option<String> {
    if failed == 0 {
        return None;
    }
    let msg = format!("{failed} of {total} items failed (first: {})", first_error.unwrap_or_default());
    if (failed as f64) <= max_failures * total as f64 {
        progress.log(&format!("warning: {msg}; within max_failures = {max_failures}"));
        None
    } else {
        Some(format!("{msg}; `flow resume` retries only the failed items"))
    }
}

#[cfg(test)]
mod tests {
    #[tokio::test]
    async fn a_panicking_item_comes_back_as_its_failure() {
        let items: Vec<(i64, u32)> = (0..20).map(|i| (i, i as u32)).collect();
        let work = |x: u32| async move {
            if x % 7 == 3 {
                panic!("item {x} is bad");
            }
            Ok::<u32, String>(x * 2)
        };
        let mut rx = super::spawn_items(items, 4, work, Err);
        let mut got = std::collections::BTreeMap::new();
        while let Some((id, r)) = rx.recv().await {
            got.insert(id, r);
        }
        assert_eq!(got.len(), 20, "every item reports, the panicking ones too");
        for (id, r) in got {
            match id % 7 {
                3 => assert!(matches!(&r, Err(e) if e.contains(&format!("item {id} is bad"))), "{id}: {r:?}"),
                _ => assert_eq!(r, Ok(id as u32 * 2)),
            }
        }
    }

    llm_params! {
        defaults { temperature: 0.7, max_tokens: 256, max_failures: 0.0 }
        pub struct Sample {
            #[serde(default)]
            pub per_chunk: u32,
        }
    }

    #[test]
    fn shared_parameters_take_the_stage_defaults_and_fill_them_in() {
        let mut p: Sample = serde_json::from_value(serde_json::json!({ "temperature": 0.2 })).unwrap();
        assert_eq!((p.llm().temperature, p.llm().max_tokens, p.llm().model.as_str()), (0.2, 256, "llm"));
        p.fill_defaults();
        let v = serde_json::to_value(&p).unwrap();
        assert_eq!(v["max_tokens"], 256);
        assert_eq!(v["max_failures"], 0.0);
        let err = serde_json::from_value::<Sample>(serde_json::json!({ "temprature": 0.2 })).unwrap_err();
        assert!(err.to_string().contains("unknown field `temprature`"), "{err}");
    }
}
