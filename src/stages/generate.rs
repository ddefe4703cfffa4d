//! The `generate` stage: asks an LLM for `per_chunk` grounded questions per chunk, drops
//! non-questions, questions that lean on "the passage" and duplicates across the corpus, and stores
//! each kept question with its provenance. One chunk is one item; a finished chunk is never asked again.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::{Kind, Outcome, Stage, StageCtx};
use crate::error::Result;
use crate::llm::{self, ChatProvider, GenParams};
use crate::prompt::Template;
use crate::store::queries::{self, Generation, NewQuery};
use crate::store::runs;
use crate::text::{DupIndex, extract_questions, rule_violation};
use crate::workflow::{CheckCtx, Diagnostic, StageSpec, Workflow, check_typed};

pub const KIND: Kind = Kind {
    name: "generate",
    about: "ask an LLM for grounded questions per chunk; drop non-questions and duplicates",
    check,
    build,
};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Params {
    /// A minijinja template, relative to the workflow file.
    pub prompt: String,
    /// The key in `models:` of the LLM to use.
    #[serde(default = "default_model")]
    pub model: String,
    #[serde(default = "default_per_chunk")]
    pub per_chunk: u32,
    /// A few words on the domain, given to the prompt.
    #[serde(default)]
    pub domain: Option<String>,
    /// Example questions, given to the prompt.
    #[serde(default)]
    pub examples: Vec<String>,
    #[serde(default)]
    pub system: Option<String>,
    #[serde(default = "default_temperature")]
    pub temperature: f32,
    #[serde(default)]
    pub top_p: Option<f32>,
    #[serde(default = "default_max_tokens")]
    pub max_tokens: u32,
    #[serde(default)]
    pub seed: Option<u64>,
    /// Local models only: penalty for repeating recent tokens (1.0 = none).
    #[serde(default)]
    pub repeat_penalty: Option<f32>,
    /// The share of chunks that may fail while the stage still succeeds (with a warning).
    #[serde(default)]
    pub max_failures: f64,
    /// Jaccard similarity of content words at which a question counts as a near duplicate.
    #[serde(default = "default_near_duplicate")]
    pub near_duplicate: f64,
}

fn default_model() -> String {
    "llm".into()
}
fn default_per_chunk() -> u32 {
    2
}
fn default_temperature() -> f32 {
    0.7
}
fn default_max_tokens() -> u32 {
    256
}
fn default_near_duplicate() -> f64 {
    0.85
}

fn check(cx: &CheckCtx) -> Vec<Diagnostic> {
    let mut diags = Vec::new();
    let Some(p) = check_typed::<Params>(cx.node, cx.params.clone(), &mut diags) else { return diags };
    let at = |key: &str| cx.node.get(key).map(|n| n.span()).unwrap_or(cx.node.span());
    if !(1..=20).contains(&p.per_chunk) {
        diags.push(
            Diagnostic::new(at("per_chunk"), format!("stage `{}`: per_chunk must be 1 to 20", cx.stage))
                .hint("2 to 5 is usual"),
        );
    }
    check_common(cx, &p.model, p.max_failures, &mut diags);
    if !(p.near_duplicate > 0.0 && p.near_duplicate <= 1.0) {
        diags.push(
            Diagnostic::new(at("near_duplicate"), format!("stage `{}`: near_duplicate must be in (0, 1]", cx.stage))
                .hint("0.85 drops rewordings; 1.0 drops only exact repeats"),
        );
    }
    diags
}

/// Checks shared by the LLM stages: the model key exists and max_failures is a share.
pub fn check_common(cx: &CheckCtx, model: &str, max_failures: f64, diags: &mut Vec<Diagnostic>) {
    let at = |key: &str| cx.node.get(key).map(|n| n.span()).unwrap_or(cx.node.span());
    if !cx.models.contains_key(model) {
        diags.push(
            Diagnostic::new(at("model"), format!("stage `{}` uses `models.{model}`, which is not defined", cx.stage))
                .hint(format!("add `{model}: {{ provider: openai, model: gpt-4o-mini }}` under `models:`")),
        );
    }
    if !(0.0..=1.0).contains(&max_failures) {
        diags.push(
            Diagnostic::new(at("max_failures"), format!("stage `{}`: max_failures is a share from 0 to 1", cx.stage))
                .hint("0.02 lets 2% of items fail with a warning"),
        );
    }
}

fn build(spec: &StageSpec, wf: &Workflow) -> Result<Box<dyn Stage>> {
    let params: Params = spec.params()?;
    let template = Template::load(&wf.dir.join(&params.prompt))?;
    let provider = llm::chat_provider(wf, &params.model)?;
    Ok(Box::new(Generate {
        name: spec.name.clone(),
        wf: Arc::new(wf.clone()),
        inputs_from: spec.needs.clone(),
        params,
        template: Arc::new(template),
        provider,
    }))
}

struct Generate {
    name: String,
    wf: Arc<Workflow>,
    inputs_from: Vec<String>,
    params: Params,
    template: Arc<Template>,
    provider: Arc<dyn ChatProvider>,
}

const QUERIES_SCHEMA: &str = r#"{"type":"object","properties":{"queries":{"type":"array","items":{"type":"string"}}},"required":["queries"],"additionalProperties":false}"#;

#[async_trait]
impl Stage for Generate {
    async fn inputs(&self) -> Result<String> {
        let id = self.provider.identity();
        Ok(format!("{}|{}|{}|{}", self.template.hash, id.provider, id.base_url, id.model))
    }

    async fn run(&self, ctx: &StageCtx) -> Result<Outcome> {
        let chunks = queries::input_chunks(&ctx.store, &self.inputs_from).await?;
        let done = queries::done_chunks(&ctx.store, &self.name).await?;
        let todo: Vec<_> = chunks.iter().filter(|c| !done.contains(&c.id)).cloned().collect();
        ctx.progress.set_total(chunks.len() as u64);
        ctx.progress.cached((chunks.len() - todo.len()) as u64);

        let client = Arc::new(llm::client(
            &self.wf,
            &self.params.model,
            self.provider.identity(),
            &ctx.store,
            ctx.run_id,
            &self.name,
        )?);
        let mut dups = DupIndex::new(self.params.near_duplicate);
        for q in queries::kept_texts(&ctx.store, &self.name).await? {
            dups.check_and_add(&q);
        }
        let p = &self.params;
        let gen_params = GenParams {
            temperature: Some(p.temperature),
            top_p: p.top_p,
            max_tokens: Some(p.max_tokens),
            seed: p.seed,
            repeat_penalty: p.repeat_penalty,
        };
        let schema: serde_json::Value = serde_json::from_str(QUERIES_SCHEMA).expect("static schema");
        let window = 256;

        let items = todo
            .into_iter()
            .map(|c| {
                let vars = json!({
                    "chunk": c.text, "title": c.title.unwrap_or_default(), "path": c.path,
                    "n": p.per_chunk, "domain": p.domain.clone().unwrap_or_default(), "examples": p.examples,
                });
                (c.id, vars)
            })
            .collect();
        let how = super::Prompted {
            template: &self.template,
            system: p.system.as_deref(),
            params: &gen_params,
            schema: ("queries", &schema),
        };
        let mut results = super::start_chats(items, &how, client.clone(), self.provider.clone(), window)?;

        let (mut failed, mut first_error, mut kept, mut dropped) = (0u64, None::<String>, 0u64, 0u64);
        let mut last_usage = Instant::now();
        while let Some((chunk_id, outcome)) = results.recv().await {
            let outcome = outcome?;
            let id = self.provider.identity();
            let mut g = Generation {
                chunk_id,
                call_id: None,
                model: id.model.clone(),
                prompt_hash: self.template.hash.clone(),
                params: String::new(),
                queries: Vec::new(),
                error: None,
            };
            match outcome {
                Ok(done) => {
                    g.call_id = Some(done.call_id);
                    g.params = json!({
                        "provider": id.provider, "base_url": id.base_url, "temperature": p.temperature, "top_p": p.top_p,
                        "max_tokens": p.max_tokens, "seed": p.seed, "response_id": done.answer.response_id,
                    })
                    .to_string();
                    match done.answer.finish_reason.as_deref() {
                        Some("length") => {
                            g.error = Some(format!(
                                "the answer was cut off at max_tokens = {} (finish_reason: length); raise max_tokens",
                                p.max_tokens
                            ))
                        }
                        Some("content_filter") => {
                            g.error = Some("the server's content filter stopped the answer".into())
                        }
                        _ => {
                            let mut n_kept = 0;
                            for q in extract_questions(&done.answer.text) {
                                let status = if n_kept >= p.per_chunk {
                                    Some("over_quota")
                                } else {
                                    rule_violation(&q).or_else(|| dups.check_and_add(&q))
                                };
                                if status.is_none() {
                                    n_kept += 1;
                                }
                                g.queries.push(NewQuery { text: q, status: status.unwrap_or("kept").to_string() });
                            }
                        }
                    }
                }
                Err(f) => g.error = Some(f.message),
            }
            queries::write_generation(&ctx.store, &self.name, &g).await?;
            match &g.error {
                Some(e) => {
                    failed += 1;
                    ctx.progress.failed(1);
                    first_error.get_or_insert_with(|| e.clone());
                }
                None => {
                    ctx.progress.done(1);
                    let k = g.queries.iter().filter(|q| q.status == "kept").count() as u64;
                    kept += k;
                    dropped += g.queries.len() as u64 - k;
                }
            }
            if last_usage.elapsed() > Duration::from_secs(2) {
                runs::set_llm_usage(&ctx.store, ctx.stage_run_id, &client.usage()).await?;
                last_usage = Instant::now();
            }
        }
        let usage = client.usage();
        runs::set_llm_usage(&ctx.store, ctx.stage_run_id, &usage).await?;
        let by_status: serde_json::Map<String, serde_json::Value> =
            queries::drop_counts(&ctx.store, &self.name).await?.into_iter().map(|(k, v)| (k, v.into())).collect();
        ctx.progress.log(&format!(
            "{} chunks: {kept} questions kept, {dropped} dropped this run; {failed} chunks failed; {} calls, {} from cache",
            chunks.len(),
            usage.calls,
            usage.cached
        ));
        let summary = json!({
            "chunks": chunks.len(), "kept": kept, "dropped": dropped, "failed": failed,
            "queries_by_status": by_status,
        });
        Ok(Outcome {
            summary,
            failure: failure_verdict(failed, chunks.len() as u64, p.max_failures, first_error, &ctx.progress),
        })
    }
}

/// Failed items end the stage failed unless they are within `max_failures` of all items.
pub fn failure_verdict(
    failed: u64,
    total: u64,
    max_failures: f64,
    first_error: Option<String>,
    progress: &crate::engine::progress::StageProgress,
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
