//! What `models:` of a workflow says: where each model comes from, its endpoint's limits, retries
//! and prices, and the device it runs on. Plain data; `llm` and `bert` turn it into running parts.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Provider {
    Local,
    Openai,
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
    /// Where a local model runs (default auto); ignored for API models.
    #[serde(default)]
    pub device: Device,
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

/// Dollars per million tokens, from the workflow's optional price table.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Price {
    pub prompt_per_mtok: f64,
    pub completion_per_mtok: f64,
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
