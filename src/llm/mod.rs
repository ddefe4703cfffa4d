//! LLM access for stages: chat and embeddings behind one client that checks the request cache,
//! waits on the shared rate limits, retries what is worth retrying, and records every call.

pub mod batch;
pub mod budget;
pub mod client;
pub mod embed;
pub mod gguf;
pub mod limiter;
pub mod local;
pub mod openai;
pub mod plan;
pub mod retry;

use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use serde_json::Value;

pub use client::{ChatDone, LlmClient, LlmFailure, Usage};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Message {
    pub role: String,
    pub content: String,
}

impl Message {
    pub fn user(content: impl Into<String>) -> Self {
        Message { role: "user".into(), content: content.into() }
    }
    pub fn system(content: impl Into<String>) -> Self {
        Message { role: "system".into(), content: content.into() }
    }
}

/// Sampling settings of a chat call; every one is part of the request hash.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct GenParams {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_p: Option<f32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    /// Penalise tokens among the last 64 generated (local models only; small models loop without it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repeat_penalty: Option<f32>,
}

#[derive(Debug, Clone)]
pub struct ChatRequest {
    pub messages: Vec<Message>,
    pub params: GenParams,
    /// Ask for JSON matching this schema (name, schema) where the server supports it.
    pub json_schema: Option<(String, Value)>,
    /// Whether an answer's text parsed into a result; only such answers are replayed from the cache.
    pub accept: Option<fn(&str) -> bool>,
    /// The answer starts with a 1-5 score whose probabilities the caller wants (`score_probs`).
    pub score: Option<ScoreAsk>,
}

/// A judge's request: its answer's `score` (1-5) is read as the model's probabilities over the five
/// digits, from the logits of a local model or the `logprobs` of a server that returns them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScoreAsk {
    /// Whether the answer goes on to give its reason (else a local model answers in one forward pass).
    pub reason: bool,
}

/// How a 1-5 score was read: its probabilities over the five digits, or only the digit the model
/// wrote (a server that returns no logprobs).
#[derive(Debug, Clone, PartialEq)]
pub enum ScoreReading {
    Probabilities([f64; 5]),
    Sampled(u8),
}

impl ScoreReading {
    /// The expected score: sum of d * p(d).
    pub fn expected(&self) -> f64 {
        match self {
            ScoreReading::Probabilities(p) => p.iter().enumerate().map(|(i, p)| (i + 1) as f64 * p).sum(),
            ScoreReading::Sampled(d) => f64::from(*d),
        }
    }

    /// The five digits' probabilities, where they were read.
    pub fn probabilities(&self) -> Option<&[f64; 5]> {
        match self {
            ScoreReading::Probabilities(p) => Some(p),
            ScoreReading::Sampled(_) => None,
        }
    }

    pub fn source(&self) -> &'static str {
        match self {
            ScoreReading::Probabilities(_) => "probabilities",
            ScoreReading::Sampled(_) => "sampled",
        }
    }
}

/// The score distribution in an answer's raw reply: the local engine's `score_probs`, or the
/// `top_logprobs` of the first digit token of an OpenAI-compatible reply (renormalised over the
/// digits 1-5). None when the reply holds neither.
pub fn score_probabilities(raw: &Value) -> Option<[f64; 5]> {
    if let Some(p) = raw["score_probs"].as_array().filter(|p| p.len() == 5) {
        let mut out = [0.0; 5];
        for (o, v) in out.iter_mut().zip(p) {
            *o = v.as_f64()?;
        }
        return Some(out);
    }
    let content = raw.pointer("/choices/0/logprobs/content")?.as_array()?;
    let digit = |s: &str| s.trim().parse::<u8>().ok().filter(|d| (1..=5).contains(d));
    let at = content.iter().find(|t| t["token"].as_str().and_then(digit).is_some())?;
    let mut mass = [0.0f64; 5];
    for alt in at["top_logprobs"].as_array().into_iter().flatten() {
        if let (Some(d), Some(lp)) = (alt["token"].as_str().and_then(digit), alt["logprob"].as_f64()) {
            mass[d as usize - 1] += lp.exp();
        }
    }
    let sum: f64 = mass.iter().sum();
    // Only the chosen digit came back: that is a sampled digit, not a distribution.
    if sum <= 0.0 || mass.iter().filter(|m| **m > 0.0).count() < 2 {
        return None;
    }
    Some(mass.map(|m| m / sum))
}

impl ChatRequest {
    /// Tokens before a call: the prompt at about four characters a token, and `max_tokens` of
    /// completion (reconciled with the usage after).
    pub fn estimated_tokens(&self) -> (u64, u64) {
        let prompt = self.messages.iter().map(|m| estimate_tokens(&m.content)).sum();
        (prompt, u64::from(self.params.max_tokens.unwrap_or(256)))
    }

    /// Whether the cached answer `text` is one this request accepts (it parsed into a result).
    pub fn accepts(&self, text: Option<&str>) -> bool {
        self.accept.is_none_or(|accept| accept(text.unwrap_or_default()))
    }
}

/// A chat answer as the provider returned it.
#[derive(Debug, Clone)]
pub struct ChatAnswer {
    pub text: String,
    pub finish_reason: Option<String>,
    pub response_id: Option<String>,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub raw: Value,
}

/// Why one attempt failed, and whether another attempt may succeed.
#[derive(Debug, Clone)]
pub enum AttemptError {
    /// 429, 5xx, timeouts, dropped connections, unreadable replies.
    Retryable { message: String, retry_after: Option<Duration> },
    /// Other 4xx and anything a retry cannot change.
    Fatal { message: String },
}

impl std::fmt::Display for AttemptError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AttemptError::Retryable { message, .. } | AttemptError::Fatal { message } => f.write_str(message),
        }
    }
}

/// Which endpoint answers: part of every request hash.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Identity {
    pub provider: crate::workflow::Provider,
    pub base_url: String,
    pub model: String,
}

/// A chat backend: builds the exact request body, and sends it once.
#[async_trait]
pub trait ChatProvider: Send + Sync {
    fn identity(&self) -> &Identity;
    fn body(&self, req: &ChatRequest) -> Value;
    async fn send(&self, body: &Value) -> Result<ChatAnswer, AttemptError>;
    /// The prompt tokens of `req` as this model counts them, and with what, where flow has the
    /// model's tokenizer (for `flow plan`); None leaves an estimate to the caller.
    fn count_prompt(&self, _req: &ChatRequest) -> Option<(u64, &str)> {
        None
    }
    /// Its Batch API (`/v1/files`, `/v1/batches`), where it has one.
    fn batch_api(&self) -> Option<&dyn BatchApi> {
        None
    }
}

/// The endpoints of a Batch API, as an OpenAI-compatible server has them.
#[async_trait]
pub trait BatchApi: Send + Sync {
    /// Uploads a JSONL input file (`purpose: batch`); its id.
    async fn upload(&self, jsonl: Vec<u8>) -> Result<String, AttemptError>;
    /// Creates a batch over an uploaded file; the batch object.
    async fn create(&self, input_file_id: &str, window: &str, note: &str) -> Result<Value, AttemptError>;
    async fn get(&self, batch_id: &str) -> Result<Value, AttemptError>;
    /// A page of batches (`data`, `has_more`, `last_id`), newest first, after the batch `after`.
    async fn list(&self, after: Option<&str>) -> Result<Value, AttemptError>;
    async fn content(&self, file_id: &str) -> Result<Vec<u8>, AttemptError>;
}

/// An embeddings backend: one request for a batch of texts.
#[async_trait]
pub trait EmbeddingProvider: Send + Sync {
    fn identity(&self) -> &Identity;
    fn body(&self, texts: &[String]) -> Value;
    async fn send(&self, body: &Value) -> Result<(Vec<Vec<f32>>, u64, Value), AttemptError>;
}

/// Rough token count before a call (about four characters a token), reconciled after with the usage.
pub fn estimate_tokens(text: &str) -> u64 {
    (text.len() as u64).div_ceil(4)
}

/// The chat backend named by `models.<key>` of a workflow.
pub fn chat_provider(wf: &crate::workflow::Workflow, key: &str) -> crate::Result<std::sync::Arc<dyn ChatProvider>> {
    let spec = model_spec(wf, key)?;
    match spec.provider.unwrap_or(crate::workflow::Provider::Openai) {
        crate::workflow::Provider::Openai => Ok(std::sync::Arc::new(openai::OpenAi::new(&endpoint(spec)?)?)),
        crate::workflow::Provider::Local => {
            let name = spec.model.clone().unwrap_or_default();
            let path = local_gguf(&name, &wf.dir)?;
            let parallel = spec.parallel.unwrap_or(local::DEFAULT_PARALLEL);
            shared_local(&path, &name, parallel, writes_json(wf, key)?, spec.requantize)
        }
    }
}

/// One loaded local model per file, parallelism and JSON setting, shared by every stage that names
/// it: the stages of a run would otherwise each load the weights and hold a context of their own.
/// (The map is process-wide because llama.cpp's backend is; the models in it go when the last
/// stage holding one drops it.)
fn shared_local(
    path: &std::path::Path,
    name: &str,
    parallel: usize,
    json: bool,
    requantize: crate::workflow::Requantize,
) -> crate::Result<std::sync::Arc<dyn ChatProvider>> {
    use std::sync::{Arc, Mutex, OnceLock, Weak};
    static LOADED: OnceLock<Mutex<std::collections::HashMap<String, Weak<local::LocalChat>>>> = OnceLock::new();
    let key = format!("{}|{name}|{parallel}|{json}|{requantize:?}", path.display());
    let mut loaded = LOADED.get_or_init(Default::default).lock().unwrap_or_else(|p| p.into_inner());
    if let Some(chat) = loaded.get(&key).and_then(Weak::upgrade) {
        return Ok(chat);
    }
    let chat = Arc::new(local::LocalChat::load(path, name, parallel, json, requantize)?);
    loaded.insert(key, Arc::downgrade(&chat));
    Ok(chat)
}

/// Whether `models.<key>` runs here (`provider: local`) rather than behind an API.
pub fn is_local(wf: &crate::workflow::Workflow, key: &str) -> crate::Result<bool> {
    Ok(model_spec(wf, key)?.provider == Some(crate::workflow::Provider::Local))
}

/// Whether the chat model `models.<key>` is asked for JSON: `json_schema:` where set; else API
/// models yes, and local ones where the catalogue says the model writes it (Qwen2.5 does;
/// SmolLM2-135M writes prose, so its prompts ask for plain text).
pub fn writes_json(wf: &crate::workflow::Workflow, key: &str) -> crate::Result<bool> {
    let spec = model_spec(wf, key)?;
    Ok(spec.json_schema.unwrap_or_else(|| match spec.provider.unwrap_or(crate::workflow::Provider::Openai) {
        crate::workflow::Provider::Openai => true,
        crate::workflow::Provider::Local => {
            spec.model.as_deref().and_then(crate::models::find).is_some_and(|k| k.writes_json)
        }
    }))
}

/// The embeddings backend named by `models.<key>` (the OpenAI-compatible one; local ones live in models/).
pub fn embedding_provider(
    wf: &crate::workflow::Workflow,
    key: &str,
) -> crate::Result<std::sync::Arc<dyn EmbeddingProvider>> {
    let spec = model_spec(wf, key)?;
    Ok(std::sync::Arc::new(openai::OpenAi::new(&endpoint(spec)?)?))
}

/// Who a call is made for: the run and stage it is recorded under, and the budgets it counts against.
#[derive(Clone, Default)]
pub struct Account {
    pub run_id: i64,
    pub stage: String,
    pub ledgers: budget::Ledgers,
}

impl Account {
    /// Calls made outside any run (`flow serve`, `flow embed`): recorded under `what`, no budget.
    pub fn outside(what: &str) -> Account {
        Account { run_id: client::OUTSIDE_RUN, stage: what.to_string(), ledgers: Default::default() }
    }
}

/// The client for one stage run, sharing its endpoint's limiter with every other user in the process.
pub fn client(
    wf: &crate::workflow::Workflow,
    key: &str,
    identity: &Identity,
    store: &crate::store::Store,
    account: &Account,
) -> crate::Result<LlmClient> {
    let spec = model_spec(wf, key)?;
    let limiter = limiter::Limiter::shared(
        &format!("{}|{}|{}", identity.provider, identity.base_url, identity.model),
        &spec.limits,
    );
    Ok(LlmClient::new(limiter, spec.retry.clone(), spec.price, store.clone(), account.run_id, &account.stage)
        .with_ledgers(account.ledgers.clone())
        .with_batch_price(spec.batch_price()))
}

pub fn model_spec<'a>(wf: &'a crate::workflow::Workflow, key: &str) -> crate::Result<&'a crate::workflow::ModelSpec> {
    wf.models.get(key).ok_or_else(|| {
        crate::Error::bad_input(
            format!("the workflow has no `models.{key}`"),
            format!("add `models: {{ {key}: {{ provider: openai, model: gpt-4o-mini }} }}`"),
        )
    })
}

fn endpoint(spec: &crate::workflow::ModelSpec) -> crate::Result<openai::Endpoint> {
    let model = spec
        .model
        .clone()
        .ok_or_else(|| crate::Error::bad_input("a model entry names no `model`", "add `model: ...`"))?;
    Ok(openai::Endpoint {
        base_url: openai::Endpoint::base_url(spec.base_url.as_deref()),
        model,
        api_key_env: spec.api_key_env.clone().unwrap_or_else(|| "OPENAI_API_KEY".into()),
        timeout: std::time::Duration::from_secs_f64(spec.timeout_s.unwrap_or(60.0).max(0.001)),
        json_schema: spec.json_schema.unwrap_or(true),
    })
}

/// The GGUF file of a local chat model: `model:` names a .gguf file, or a folder holding one.
fn local_gguf(name: &str, base: &std::path::Path) -> crate::Result<std::path::PathBuf> {
    if name.ends_with(".gguf") {
        let p = base.join(name);
        if p.is_file() {
            return Ok(p);
        }
    }
    let dir = match crate::models::resolve(name, base, "") {
        Ok(d) => d,
        Err(_) => {
            return Err(crate::Error::ModelNotFound {
                name: name.to_string(),
                looked: vec![base.join(name), crate::models::models_dir().join(name)],
                expect: "a .gguf file".into(),
            });
        }
    };
    let found = std::fs::read_dir(&dir)
        .ok()
        .and_then(|entries| entries.flatten().map(|e| e.path()).find(|p| p.extension().is_some_and(|e| e == "gguf")));
    found.ok_or_else(|| crate::Error::ModelNotFound {
        name: name.to_string(),
        looked: vec![dir],
        expect: "a .gguf file".into(),
    })
}
