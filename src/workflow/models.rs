//! What `models:` of a workflow says: where each model comes from, its endpoint's limits, retries
//! and prices, and the device it runs on. Plain data; `llm` and `bert` turn it into running parts.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::diag::{Diagnostic, Span};

/// Who runs a model: flow itself, or an OpenAI-compatible server. Stored (in `llm_calls`) and hashed
/// (in request keys) as the same lowercase text it is written with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, Serialize, sqlx::Type)]
#[serde(rename_all = "lowercase")]
#[sqlx(rename_all = "lowercase")]
pub enum Provider {
    Local,
    Openai,
}

impl Provider {
    pub fn as_str(self) -> &'static str {
        match self {
            Provider::Local => "local",
            Provider::Openai => "openai",
        }
    }
}

impl std::fmt::Display for Provider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One entry of `models:`: where an LLM or embedding comes from.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSpec {
    pub provider: Option<Provider>,
    /// A model name: a folder, `$FLOW_MODELS/<name>`, a Hugging Face id, or an API model id.
    pub model: Option<String>,
    /// For trainable models: the model to start from.
    pub init: Option<String>,
    pub base_url: Option<String>,
    pub api_key_env: Option<String>,
    pub max_seq_length: Option<usize>,
    /// Rate limits for this endpoint: requests/min, tokens/min, requests in flight.
    #[serde(default)]
    pub limits: Limits,
    #[serde(default)]
    pub retry: RetryPolicy,
    /// Per-request timeout in seconds (default 60).
    pub timeout_s: Option<f64>,
    /// Ask for JSON: `response_format: json_schema` from an API (default true; false for servers that
    /// reject it); from a local model, JSON prompts and answers checked against the schema (default:
    /// true for catalogue models that write JSON, such as Qwen2.5).
    pub json_schema: Option<bool>,
    /// Dollars per million prompt / completion tokens, for cost accounting.
    pub price: Option<Price>,
    /// Send stages' requests to this model through the Batch API: `true`, or its settings.
    #[serde(default, deserialize_with = "batch_from_yaml")]
    pub batch: Option<BatchSpec>,
    /// Dollars per million tokens of requests answered through the Batch API (default: `price`;
    /// OpenAI bills batches at half its list price, which the user states here).
    pub batch_price: Option<Price>,
    /// Where a local model runs (default auto); ignored for API models.
    #[serde(default)]
    pub device: Device,
    /// A local chat model: requests decoded together in one batch (default 8, see the README).
    pub parallel: Option<usize>,
    /// A local chat model's weights: `auto` loads a Q8_0 copy (made once) where the CPU has AMX and
    /// most of the GGUF's matrices are in types AMX has no kernels for; `never`; `q8_0` always.
    #[serde(default)]
    pub requantize: Requantize,
    /// A local embedding model's matrix products (default auto: bf16 on a CPU with AMX).
    #[serde(default)]
    pub precision: Precision,
}

/// The precision of a BERT's matrix products: `auto` (bf16 with f32 sums on a GPU, and on a CPU with
/// AMX; f32 elsewhere), `f32`, or `bf16`. LayerNorm, softmax, GELU, pooling and optimiser stay f32.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Precision {
    #[default]
    Auto,
    F32,
    Bf16,
}

/// Whether a local GGUF is loaded as it is or as a Q8_0 copy (see `ModelSpec::requantize`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Requantize {
    #[default]
    Auto,
    Never,
    #[serde(rename = "q8_0")]
    Q8_0,
}

/// Rate limits of one endpoint, as the workflow sets them.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    pub requests_per_minute: Option<u32>,
    pub tokens_per_minute: Option<u32>,
    /// Requests in flight at once (default 16).
    pub max_in_flight: Option<u32>,
}

/// How often and how long to try a call again, as the workflow sets it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RetryPolicy {
    /// Attempts in all, the first included.
    pub attempts: u32,
    /// First backoff ceiling in milliseconds; doubles each attempt.
    pub base_ms: u64,
    /// Largest backoff ceiling in milliseconds.
    pub max_ms: u64,
    /// Give up on an item after this many seconds of trying.
    pub deadline_s: f64,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy { attempts: 6, base_ms: 500, max_ms: 30_000, deadline_s: 300.0 }
    }
}

/// How a model's requests go through the Batch API (`/v1/files`, `/v1/batches`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct BatchSpec {
    /// Whether batches are used (`batch: false` turns them off and keeps the settings).
    pub enabled: bool,
    /// Seconds between looks at a batch's state.
    pub poll_s: f64,
    /// Requests per batch at most (OpenAI's limit is 50,000).
    pub max_requests: usize,
    /// Bytes of a batch's input file at most (OpenAI's limit is 200 MB).
    pub max_bytes: usize,
    /// What becomes of requests a failed or expired batch did not answer: `live` calls, or a new `batch`.
    pub fallback: Fallback,
    /// The batch's `completion_window`.
    pub window: String,
}

impl Default for BatchSpec {
    fn default() -> Self {
        BatchSpec {
            enabled: true,
            poll_s: 60.0,
            max_requests: 50_000,
            max_bytes: 190 << 20,
            fallback: Fallback::Live,
            window: "24h".into(),
        }
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Fallback {
    Live,
    Batch,
}

/// `batch: true` / `batch: false` are the default settings, on or off.
pub(super) fn batch_from_yaml<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<BatchSpec>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Given {
        On(bool),
        With(BatchSpec),
    }
    Ok(match Option::<Given>::deserialize(d)? {
        None => None,
        Some(Given::On(enabled)) => Some(BatchSpec { enabled, ..BatchSpec::default() }),
        Some(Given::With(b)) => Some(b),
    })
}

impl ModelSpec {
    /// The Batch API settings when batches are on.
    pub fn batched(&self) -> Option<&BatchSpec> {
        self.batch.as_ref().filter(|b| b.enabled)
    }

    /// The price of answers that come through the Batch API: `batch_price`, else `price`.
    pub fn batch_price(&self) -> Option<Price> {
        self.batch_price.or(self.price)
    }

    /// The price this model's requests are billed at: the batch price where batches are on.
    pub fn billed_price(&self) -> Option<Price> {
        if self.batched().is_some() { self.batch_price() } else { self.price }
    }
}

/// Checks one `models:` entry: it names a model, its `batch:` and `base_url` make sense. `key` is
/// the entry's name span, `at` the span of one of its keys.
pub(super) fn check(
    name: &str,
    spec: &ModelSpec,
    (key, at): (Span, &dyn Fn(&str) -> Span),
    diags: &mut Vec<Diagnostic>,
) {
    if spec.model.is_none() && spec.init.is_none() {
        diags.push(
            Diagnostic::new(key, format!("model `{name}` names no model"))
                .hint("add `model: <name or folder>` (or `init:` for a trainable model)"),
        );
    }
    if let Some(b) = spec.batched() {
        if spec.provider == Some(Provider::Local) {
            diags.push(
                Diagnostic::new(at("batch"), format!("`models.{name}.batch`: a local model has no Batch API"))
                    .hint("batches are for OpenAI-compatible servers (`provider: openai`); remove `batch:`"),
            );
        }
        if b.poll_s.is_nan() || b.poll_s <= 0.0 || b.max_requests == 0 || b.max_bytes < 1024 {
            diags.push(
                Diagnostic::new(
                    at("batch"),
                    format!("`models.{name}.batch`: poll_s, max_requests and max_bytes must be positive (max_bytes at least 1024)"),
                )
                .hint("`batch: true` takes OpenAI's limits: 50000 requests, 190 MB, a look every 60 s"),
            );
        }
    }
    if let Some(url) = &spec.base_url
        && let Err((e, hint)) = check_base_url(url)
    {
        diags.push(
            Diagnostic::new(at("base_url"), format!("`models.{name}.base_url` {}: {e}", shown_url(url))).hint(hint),
        );
    }
}

/// An OpenAI-compatible endpoint's root must be an absolute http(s) URL with a host, and hold no
/// credentials: the base URL is stored with every call (`llm_calls`) and shown in logs, a key never is.
pub fn check_base_url(url: &str) -> std::result::Result<(), (String, &'static str)> {
    let hint = "a full http(s) URL of the API root, e.g. http://localhost:8000/v1";
    let u = reqwest::Url::parse(url).map_err(|e| (e.to_string(), hint))?;
    if !matches!(u.scheme(), "http" | "https") {
        return Err((format!("the scheme is `{}`, not http or https", u.scheme()), hint));
    }
    if u.host_str().is_none_or(str::is_empty) {
        return Err(("it has no host".into(), hint));
    }
    if !u.username().is_empty() || u.password().is_some() {
        return Err((
            "it holds credentials (user:password@), which would be stored with every call and shown in logs".into(),
            "keep the key out of the URL: flow sends the key from the environment variable `api_key_env` names (default OPENAI_API_KEY)",
        ));
    }
    Ok(())
}

/// A URL as messages may show it: without any credentials or query (where keys also hide).
pub fn shown_url(url: &str) -> String {
    match reqwest::Url::parse(url) {
        Ok(mut u) => {
            let _ = u.set_username("");
            let _ = u.set_password(None);
            u.set_query(None);
            format!("{:?}", u.as_str())
        }
        // Not a URL at all: show only its start, in case a key was pasted.
        Err(_) => {
            format!("{:?}", url.chars().take(24).collect::<String>() + if url.chars().count() > 24 { "…" } else { "" })
        }
    }
}

/// Dollars per million tokens, from the workflow's optional price table.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Price {
    pub prompt_per_mtok: f64,
    pub completion_per_mtok: f64,
}

impl Price {
    pub fn usd(&self, prompt_tokens: u64, completion_tokens: u64) -> f64 {
        (prompt_tokens as f64 * self.prompt_per_mtok + completion_tokens as f64 * self.completion_per_mtok) / 1e6
    }
}

/// Where a model runs: `auto` (a CUDA GPU when the build has CUDA and one is present, else the
/// CPU), `cpu`, or `cuda` / `cuda:N`. Parsed once, here; `models::device` opens it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum Device {
    #[default]
    Auto,
    Cpu,
    Cuda(usize),
}

impl std::str::FromStr for Device {
    type Err = String;

    fn from_str(s: &str) -> Result<Device, String> {
        match s {
            "auto" => Ok(Device::Auto),
            "cpu" => Ok(Device::Cpu),
            "cuda" => Ok(Device::Cuda(0)),
            _ => s
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(Device::Cuda)
                .ok_or_else(|| format!("unknown device {s:?}: expected auto, cpu, cuda or cuda:N")),
        }
    }
}

impl std::fmt::Display for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Device::Auto => f.write_str("auto"),
            Device::Cpu => f.write_str("cpu"),
            Device::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

impl Serialize for Device {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Device {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Device, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// The embedder a workflow gets when it names none: the black box, the augment's start and the
/// chunk stage's tokenizer (`flow models pull` fetches it).
pub const DEFAULT_EMBEDDER: &str = "all-MiniLM-L6-v2";

/// A workflow that leaves out `models.black_box` or `models.augment` gets the default embedder
/// for them, so `name`, `store`, `models.llm` and the stage lines are a whole workflow.
pub(super) fn add_defaults(models: &mut BTreeMap<String, ModelSpec>) {
    models.entry("black_box".into()).or_insert_with(|| ModelSpec {
        provider: Some(Provider::Local),
        model: Some(DEFAULT_EMBEDDER.into()),
        max_seq_length: Some(256),
        ..ModelSpec::default()
    });
    let start = match &models["black_box"] {
        ModelSpec { provider: Some(Provider::Local), model: Some(m), .. } => m.clone(),
        _ => DEFAULT_EMBEDDER.into(),
    };
    models.entry("augment".into()).or_insert_with(|| ModelSpec {
        init: Some(start),
        max_seq_length: Some(256),
        ..ModelSpec::default()
    });
}

#[cfg(test)]
mod tests {
    use super::Device;

    #[test]
    fn device_choices_parse_and_print_back() {
        for (s, d) in [("auto", Device::Auto), ("cpu", Device::Cpu), ("cuda:1", Device::Cuda(1))] {
            assert_eq!(s.parse::<Device>().unwrap(), d);
            assert_eq!(d.to_string(), s);
        }
        assert_eq!("cuda".parse::<Device>().unwrap(), Device::Cuda(0));
        assert!("gpu".parse::<Device>().unwrap_err().contains("auto, cpu, cuda"));
        assert!("cuda:x".parse::<Device>().is_err());
    }
}
