//! The embedded local LLM: any GGUF llama.cpp loads (qwen2, llama, qwen3, phi, gemma, ...), its chat
//! template from the GGUF, requests decoded together, JSON answers under a grammar of their schema.

pub mod engine;
pub mod weights;

use std::path::Path;
use std::sync::{OnceLock, mpsc};

use async_trait::async_trait;
use llama_cpp_2::llama_backend::LlamaBackend;
use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::model::params::LlamaModelParams;
use llama_cpp_2::token::LlamaToken;
use serde_json::{Value, json};

use super::{AttemptError, ChatAnswer, ChatProvider, ChatRequest, Identity, Message, ScoreAsk};
use crate::error::{Error, Result};
use crate::llm::gguf::{self, ChatTemplate};
use crate::workflow::Requantize;
use engine::{Job, Probe, Sampling, Settings};

/// The engine in every local model's identity: a new llama.cpp is a new engine, and its answers
/// are new results (the crate vendors llama.cpp; `llama_cpp_version_is_pinned` keeps this true).
pub const ENGINE: &str = "llama.cpp (llama-cpp-2 =0.1.160)";

/// Requests a local model decodes together unless `parallel:` says otherwise (BENCHMARKS.md: the
/// generate stage's chunks/s at 1, 4, 8 and 16 in flight).
pub const DEFAULT_PARALLEL: usize = 8;

/// Attempts per request whose answer parses but says nothing (an empty list): the first as asked,
/// then sampled ones.
const EMPTY_ATTEMPTS: u32 = 3;

/// What a judge's answer starts with: the score comes next, and its digit is what the probe reads.
pub const SCORE_PREFILL: &str = "{\"score\": ";

/// After the score digit, a judge that also gives its reason writes `, "reason": "..."}`.
const REASON_GRAMMAR: &str = r#"root ::= [1-5] ", \"reason\": \"" char{0,400} "\"}"
char ::= [^"\\\x7F\x00-\x1F] | "\\" (["\\/bfnrt] | "u" [0-9a-fA-F]{4})
"#;

/// llama.cpp's backend: process-wide in llama.cpp itself (one may be initialised at a time), so
/// flow holds it once for the life of the process. Its CPU kernels are the best variant the CPU
/// runs (AVX2, AVX-512, VNNI, AMX), picked and loaded at run time from the backend libraries.
pub fn backend() -> std::result::Result<&'static LlamaBackend, &'static String> {
    static BACKEND: OnceLock<std::result::Result<LlamaBackend, String>> = OnceLock::new();
    BACKEND
        .get_or_init(|| {
            llama_cpp_2::send_logs_to_tracing(llama_cpp_2::LogOptions::default().with_logs_enabled(false));
            // Next to the binary (a copied install) first, then where the build put them.
            if let Some(dir) = std::env::current_exe().ok().and_then(|e| e.parent().map(Path::to_path_buf))
                && has_cpu_backends(&dir)
            {
                llama_cpp_2::llama_backend::load_backends_from_path(&dir);
            }
            LlamaBackend::init().map_err(|e| format!("llama.cpp could not start: {e}"))
        })
        .as_ref()
}

fn has_cpu_backends(dir: &Path) -> bool {
    std::fs::read_dir(dir)
        .is_ok_and(|mut d| d.any(|e| e.is_ok_and(|e| e.file_name().to_string_lossy().starts_with("libggml-cpu-"))))
}

pub struct LocalChat {
    id: Identity,
    jobs: mpsc::Sender<Job>,
    /// Ask for the stage's JSON shape (decoded under its grammar), for models that can write JSON.
    json: bool,
    /// The GGUF's tokenizer (a vocabulary-only load: no weights): prompt counts and the digits.
    vocab: LlamaModel,
    template: ChatTemplate,
    digits: Vec<Vec<LlamaToken>>,
}

impl LocalChat {
    /// Checks the GGUF at `path` (header, chat template, every tensor's bytes present), loads its
    /// tokenizer, and starts the engine's worker thread, which loads the weights on the first
    /// request: `flow plan` and a run whose items are all cached never pay for loading them.
    pub fn load(path: &Path, name: &str, parallel: usize, json: bool, requantize: Requantize) -> Result<LocalChat> {
        let backend = backend().map_err(|e| Error::bad_input(e.clone(), "see llama.cpp's message above"))?;
        let checked = gguf::check(path)?;
        let cache = crate::models::models_dir().join(".requantized");
        let (weights, why) = weights::choose(path, &checked, requantize, &cache)?;
        if let Some(why) = why {
            crate::progress::stderr_line(&format!("local LLM: loading {why}"));
        }
        let vocab = LlamaModel::load_from_file(backend, path, &LlamaModelParams::default().with_vocab_only(true))
            .map_err(|e| {
                Error::bad_input(
                    format!("llama.cpp cannot read {}: {e}", path.display()),
                    "use a GGUF file llama.cpp supports (any recent conversion), or run `flow models pull`",
                )
            })?;
        let digits = digit_tokens(&vocab);
        let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2) as i32;
        let ctx_per_seq = vocab.n_ctx_train().clamp(512, 4096);
        let settings = Settings { parallel: parallel.max(1), ctx_per_seq, threads, batch: 512 };
        let jobs = engine::spawn(weights.clone(), settings).map_err(Error::io("the local LLM worker thread"))?;
        let head = gguf::head_digest(&weights)?;
        let size = std::fs::metadata(&weights).map_err(Error::io(&weights))?.len();
        Ok(LocalChat {
            id: Identity {
                provider: crate::workflow::Provider::Local,
                base_url: format!("{ENGINE} gguf:{size}:{head}"),
                model: name.to_string(),
            },
            jobs,
            json,
            vocab,
            template: checked.template,
            digits,
        })
    }

    /// The prompt the engine is given for `messages`, with the start of the answer a score asks for.
    fn prompt(&self, messages: &[Message], score: Option<ScoreAsk>) -> Result<String> {
        let mut p = self.template.render(messages)?;
        if score.is_some() {
            p.push_str(SCORE_PREFILL);
        }
        Ok(p)
    }
}

/// The tokens of each digit 1 to 5, alone and after a space (how the answer may spell a score).
fn digit_tokens(vocab: &LlamaModel) -> Vec<Vec<LlamaToken>> {
    let v = vocab.vocab();
    (1..=5)
        .map(|d| {
            let mut group: Vec<LlamaToken> = Vec::new();
            for text in [d.to_string(), format!(" {d}")] {
                if let [t] = v.tokenize(text.as_bytes(), false, false)[..]
                    && !group.contains(&t)
                {
                    group.push(t);
                }
            }
            group
        })
        .collect()
}

/// Whether a JSON answer says nothing: a list in it is empty or holds only blank strings.
fn says_nothing(text: &str) -> bool {
    let Some(v) = crate::text::first_json(text) else { return text.trim().is_empty() };
    v.as_object().is_some_and(|o| {
        o.values()
            .any(|x| x.as_array().is_some_and(|a| a.iter().all(|i| i.as_str().is_some_and(|s| s.trim().is_empty()))))
    })
}

#[async_trait]
impl ChatProvider for LocalChat {
    fn identity(&self) -> &Identity {
        &self.id
    }

    fn body(&self, req: &ChatRequest) -> Value {
        let mut body = json!({ "model": self.id.model, "messages": req.messages, "params": req.params });
        // A model that writes JSON decodes under a grammar made from the schema; others write prose.
        if let (Some((_, schema)), true) = (&req.json_schema, self.json) {
            body["json_schema"] = schema.clone();
        }
        if let Some(s) = req.score.filter(|_| self.json) {
            body["score"] = json!({ "reason": s.reason });
        }
        body
    }

    async fn send(&self, body: &Value) -> std::result::Result<ChatAnswer, AttemptError> {
        let bad = |message: String| AttemptError::Fatal { message };
        let messages: Vec<Message> =
            serde_json::from_value(body["messages"].clone()).map_err(|e| bad(e.to_string()))?;
        let p: super::GenParams = serde_json::from_value(body["params"].clone()).unwrap_or_default();
        let score: Option<ScoreAsk> = body.get("score").map(|s| ScoreAsk { reason: s["reason"] != false });
        let schema = body.get("json_schema").filter(|s| !s.is_null());
        let prompt = self.prompt(&messages, score).map_err(|e| bad(e.to_string()))?;
        let (grammar, constrained) = match (score, schema) {
            (Some(s), _) => (s.reason.then(|| REASON_GRAMMAR.to_string()), "probabilities"),
            (None, Some(schema)) => {
                let g = llama_cpp_2::json_schema_to_grammar(&schema.to_string())
                    .map_err(|e| bad(format!("the answer's JSON schema has no grammar: {e}")))?;
                (Some(g), "grammar")
            }
            (None, None) => (None, "none"),
        };
        let probe = score.map(|s| Probe { groups: self.digits.clone(), stop: !s.reason });
        let max_tokens = p.max_tokens.unwrap_or(256) as usize;
        let (mut prompt_tokens, mut completion_tokens) = (0, 0);
        let mut attempt = 0;
        loop {
            attempt += 1;
            // A retry samples (a greedy one would repeat the answer), from a seed of its own.
            let (temperature, seed) = match attempt {
                1 => (p.temperature.unwrap_or(0.0), p.seed.unwrap_or(0)),
                n => (p.temperature.unwrap_or(0.0).max(0.7), p.seed.unwrap_or(0).wrapping_add(u64::from(n))),
            };
            let sampling =
                Sampling { temperature, top_p: p.top_p, seed: seed as u32, repeat_penalty: p.repeat_penalty };
            let (tx, rx) = tokio::sync::oneshot::channel();
            let job = Job {
                prompt: prompt.clone(),
                max_tokens,
                sampling,
                grammar: grammar.clone(),
                probe: probe.clone(),
                reply: tx,
            };
            self.jobs.send(job).map_err(|_| bad("the local LLM thread has stopped".into()))?;
            let out = rx
                .await
                .map_err(|_| bad("the local LLM thread has stopped".into()))?
                .map_err(|e| bad(format!("local generation failed: {e}")))?;
            prompt_tokens += out.prompt_tokens;
            completion_tokens += out.completion_tokens;
            let text = match (score, out.probe.is_some() && probe.as_ref().is_some_and(|p| p.stop)) {
                (Some(_), true) => format!("{SCORE_PREFILL}{}}}", out.text.trim()),
                (Some(_), false) => format!("{SCORE_PREFILL}{}", out.text),
                (None, _) => out.text.trim().to_string(),
            };
            let empty = schema.is_some() && says_nothing(&text);
            if !empty || attempt == EMPTY_ATTEMPTS {
                let probs = out.probe.as_ref().map(|(p, _)| p.clone());
                return Ok(ChatAnswer {
                    raw: json!({
                        "text": text, "finish_reason": out.finish, "attempts": attempt, "engine": ENGINE,
                        "constrained": constrained, "score_probs": probs,
                        "score_mass": out.probe.as_ref().map(|(_, m)| *m),
                        "prompt_tokens_reused": out.reused_tokens, "prompt_cut": out.cut_prompt,
                    }),
                    text,
                    finish_reason: Some(out.finish.to_string()),
                    response_id: None,
                    prompt_tokens,
                    completion_tokens,
                });
            }
        }
    }

    /// The prompt as the engine tokenizes it (a retry for an empty answer sends it again).
    fn count_prompt(&self, req: &ChatRequest) -> Option<(u64, &str)> {
        let prompt = self.prompt(&req.messages, req.score.filter(|_| self.json)).ok()?;
        let n = self.vocab.vocab().tokenize(prompt.as_bytes(), false, true).len();
        Some((n as u64, "the model's own tokenizer (llama.cpp)"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_empty_list_says_nothing_and_the_engine_is_pinned() {
        assert!(says_nothing(r#"{"queries": []}"#));
        assert!(says_nothing(r#"{"queries": ["  "]}"#));
        assert!(!says_nothing(r#"{"queries": ["What was revenue?"]}"#));
        assert!(!says_nothing(r#"{"score": 4}"#));
        let manifest = include_str!("../../../Cargo.toml");
        assert!(manifest.contains("llama-cpp-2 = { version = \"=0.1.160\""), "ENGINE names the pinned version");
    }
}
