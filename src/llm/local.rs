//! The embedded local LLM: a GGUF llama or qwen2 model (SmolLM2, Qwen2.5) run with candle's
//! quantized models on a worker thread, so generation never blocks the async runtime.

use std::path::Path;
use std::sync::mpsc;

use async_trait::async_trait;
use candle_core::{Device, Tensor};
use candle_transformers::generation::{LogitsProcessor, Sampling};
use candle_transformers::models::quantized_llama;
use serde_json::{Value, json};
use tokenizers::Tokenizer;

use super::{AttemptError, ChatAnswer, ChatProvider, ChatRequest, Identity, Message};
use crate::error::{Error, Result};
use crate::llm::gguf::{self, ChatTemplate};

type Job = (Value, tokio::sync::oneshot::Sender<Result<ChatAnswer, AttemptError>>);

pub struct LocalChat {
    id: Identity,
    jobs: mpsc::Sender<Job>,
    /// Ask for the stage's JSON shape and check answers against it (models that can write JSON).
    json: bool,
    counter: Counter,
}

/// Attempts per request when the answer must be JSON: the first as asked, then sampled ones.
const JSON_ATTEMPTS: u32 = 3;

impl LocalChat {
    /// Checks the GGUF at `path` (header, tokenizer, chat template, weights all present) and starts
    /// its worker thread, which loads the weights on the first request: `flow plan` and a run whose
    /// items are all cached never pay for loading them.
    pub fn load(path: &Path, name: &str, device: crate::workflow::Device, json: bool) -> Result<LocalChat> {
        let counter = Counter::read(path)?;
        let device = crate::models::device(device)?;
        let (tx, rx) = mpsc::channel::<Job>();
        let file = path.to_path_buf();
        std::thread::Builder::new()
            .name("flow-local-llm".into())
            .spawn(move || {
                let mut engine: Option<std::result::Result<Engine, String>> = None;
                while let Ok((body, reply)) = rx.recv() {
                    let loaded = engine.get_or_insert_with(|| Engine::load(&file, &device).map_err(|e| e.to_string()));
                    let answer = match loaded {
                        Ok(engine) => engine.answer(&body),
                        Err(e) => Err(e.clone()),
                    };
                    let _ = reply.send(answer.map_err(|message| AttemptError::Fatal { message }));
                }
            })
            .map_err(Error::io("the local LLM worker thread"))?;
        // The file's size and a hash of its metadata identify the weights in the request cache.
        let size = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
        Ok(LocalChat {
            id: Identity {
                provider: crate::workflow::Provider::Local,
                base_url: format!("gguf:{size}"),
                model: name.to_string(),
            },
            jobs: tx,
            json,
            counter,
        })
    }
}

/// A GGUF's tokenizer and chat template: what counts a prompt's tokens without the weights.
struct Counter {
    tokenizer: Tokenizer,
    template: ChatTemplate,
}

impl Counter {
    fn read(path: &Path) -> Result<Counter> {
        let h = Header::read(path)?;
        // A file cut short (an interrupted copy) is named now, not at the first request.
        let end = h.content.tensor_infos.values().map(|t| {
            let blocks = t.shape.elem_count() / t.ggml_dtype.block_size();
            t.offset + (blocks * t.ggml_dtype.type_size()) as u64
        });
        let need = h.content.tensor_data_offset + end.max().unwrap_or(0);
        let have = h.file.metadata().map_err(Error::io(path))?.len();
        if have < need {
            return Err(Error::bad_input(
                format!("{}: the file is cut short ({have} of the {need} bytes its header names)", path.display()),
                "the download or copy was interrupted: run `flow models pull` again",
            ));
        }
        Ok(Counter { tokenizer: h.tokenizer, template: h.template })
    }

    fn count(&self, messages: &[Message]) -> Option<u64> {
        let prompt = self.template.render(messages).ok()?;
        Some(self.tokenizer.encode(prompt, false).ok()?.len() as u64)
    }
}

/// A GGUF's header: its metadata, tokenizer and chat template, checked, with the file to read weights from.
struct Header {
    content: candle_core::quantized::gguf_file::Content,
    file: std::fs::File,
    arch: String,
    tokenizer: Tokenizer,
    template: ChatTemplate,
}

impl Header {
    fn read(path: &Path) -> Result<Header> {
        let (content, file) = gguf::read(path)?;
        let arch = content.metadata.get("general.architecture").and_then(|v| v.to_string().ok()).cloned();
        let arch = match arch.as_deref() {
            Some(a @ ("llama" | "qwen2")) => a.to_string(),
            other => {
                return Err(Error::bad_input(
                    format!(
                        "{}: architecture {other:?} is not supported by the local LLM (llama and qwen2 are)",
                        path.display()
                    ),
                    "use a llama or qwen2 GGUF such as smollm2-135m-instruct or qwen2.5-coder-0.5b-instruct (`flow models pull NAME`)",
                ));
            }
        };
        let tokenizer = gguf::tokenizer(&content, path)?;
        let template = ChatTemplate::from_gguf(&content, path, &tokenizer)?;
        Ok(Header { content, file, arch, tokenizer, template })
    }
}

#[async_trait]
impl ChatProvider for LocalChat {
    fn identity(&self) -> &Identity {
        &self.id
    }

    fn body(&self, req: &ChatRequest) -> Value {
        // A model that writes JSON gets the schema: its answer is checked against it and asked
        // again (sampled) when it does not conform. Others write prose for tolerant parsers.
        match (&req.json_schema, self.json) {
            (Some((_, schema)), true) => {
                json!({ "model": self.id.model, "messages": req.messages, "params": req.params, "json_schema": schema })
            }
            _ => json!({ "model": self.id.model, "messages": req.messages, "params": req.params }),
        }
    }

    async fn send(&self, body: &Value) -> Result<ChatAnswer, AttemptError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.jobs
            .send((body.clone(), tx))
            .map_err(|_| AttemptError::Fatal { message: "the local LLM thread has stopped".into() })?;
        rx.await.map_err(|_| AttemptError::Fatal { message: "the local LLM thread has stopped".into() })?
    }

    /// The first attempt's prompt as the engine tokenizes it (retries for JSON add more).
    fn count_prompt(&self, req: &ChatRequest) -> Option<(u64, &str)> {
        self.counter.count(&req.messages).map(|n| (n, "the model's own tokenizer"))
    }
}

/// The weights of one of the architectures flow runs, picked from `general.architecture`.
enum Weights {
    Llama(quantized_llama::ModelWeights),
    Qwen2(super::qwen2::Qwen2),
}

impl Weights {
    /// Logits of the last position; `pos` 0 starts a new sequence (both models reset their KV cache).
    fn forward(&mut self, x: &Tensor, pos: usize) -> candle_core::Result<Tensor> {
        match self {
            Weights::Llama(m) => m.forward(x, pos),
            Weights::Qwen2(m) => m.forward(x, pos),
        }
    }
}

/// The model, tokenizer and template, owned by the worker thread.
pub struct Engine {
    model: Weights,
    pub tokenizer: Tokenizer,
    template: ChatTemplate,
    stop: Vec<u32>,
    context: usize,
    device: Device,
}

impl Engine {
    pub fn load(path: &Path, device: &Device) -> Result<Engine> {
        let Header { content, mut file, arch, tokenizer, template } = Header::read(path)?;
        let mut stop: Vec<u32> = gguf::token_id(&content, "tokenizer.ggml.eos_token_id").into_iter().collect();
        for t in ["<|im_end|>", "<|endoftext|>", "<|eot_id|>"] {
            if let Some(id) = tokenizer.token_to_id(t) {
                stop.push(id);
            }
        }
        let context =
            content.metadata.get(&format!("{arch}.context_length")).and_then(|v| v.to_u32().ok()).unwrap_or(2048)
                as usize;
        let device = device.clone();
        let bad = |e: candle_core::Error| {
            Error::bad_input(
                format!("{}: cannot load the model weights: {e}", path.display()),
                "the file is corrupt: run `flow models pull`",
            )
        };
        let model = if arch == "qwen2" {
            Weights::Qwen2(super::qwen2::Qwen2::from_gguf(content, &mut file, &device).map_err(bad)?)
        } else {
            Weights::Llama(quantized_llama::ModelWeights::from_gguf(content, &mut file, &device).map_err(bad)?)
        };
        Ok(Engine { model, tokenizer, template, stop, context, device })
    }

    fn answer(&mut self, body: &Value) -> Result<ChatAnswer, String> {
        let messages: Vec<Message> = serde_json::from_value(body["messages"].clone()).map_err(|e| e.to_string())?;
        let p: super::GenParams = serde_json::from_value(body["params"].clone()).unwrap_or_default();
        let prompt = self.template.render(&messages).map_err(|e| e.to_string())?;
        let schema = body.get("json_schema").filter(|s| !s.is_null());
        // A list capped by `maxItems` ends once that many items are written: a small model asked for
        // one question would otherwise write several and run into max_tokens before closing the JSON.
        let cut = schema.and_then(|s| s["properties"].as_object()).and_then(|props| {
            props.values().find_map(|p| (p["type"] == "array").then(|| p["maxItems"].as_u64()).flatten())
        });
        let (mut prompt_tokens, mut completion_tokens) = (0, 0);
        let mut attempt = 0;
        loop {
            attempt += 1;
            // A retry samples (a greedy one would repeat the answer), from a seed of its own.
            let (temperature, seed) = match attempt {
                1 => (p.temperature, p.seed.unwrap_or(0)),
                n => (Some(p.temperature.unwrap_or(0.0).max(0.7)), p.seed.unwrap_or(0).wrapping_add(u64::from(n))),
            };
            let (text, pt, ct, finish) = self
                .generate(
                    &prompt,
                    p.max_tokens.unwrap_or(256) as usize,
                    temperature,
                    p.top_p,
                    seed,
                    p.repeat_penalty,
                    cut,
                )
                .map_err(|e| format!("local generation failed: {e}"))?;
            prompt_tokens += pt;
            completion_tokens += ct;
            let conforms = schema.map(|s| conforms(&text, s));
            if conforms != Some(false) || attempt == JSON_ATTEMPTS {
                return Ok(ChatAnswer {
                    raw: json!({ "text": text, "finish_reason": finish, "attempts": attempt, "json_ok": conforms }),
                    text,
                    finish_reason: Some(finish.to_string()),
                    response_id: None,
                    prompt_tokens,
                    completion_tokens,
                });
            }
        }
    }

    /// Greedy (temperature 0 or none) or sampled decoding with a KV cache, stopping at end-of-turn
    /// (or, with `cut`, once a JSON list holds that many items: see `text::json_cut`), with an
    /// optional repeat penalty over the last 64 generated tokens.
    #[allow(clippy::too_many_arguments)]
    pub fn generate(
        &mut self,
        prompt: &str,
        max_tokens: usize,
        temperature: Option<f32>,
        top_p: Option<f32>,
        seed: u64,
        repeat_penalty: Option<f32>,
        cut: Option<u64>,
    ) -> candle_core::Result<(String, u64, u64, &'static str)> {
        let enc = self.tokenizer.encode(prompt, false).map_err(candle_core::Error::msg)?;
        let mut tokens: Vec<u32> = enc.get_ids().to_vec();
        // Keep the end of an over-long prompt (it holds the instruction and the generation prompt).
        let room = self.context.saturating_sub(max_tokens).max(16);
        if tokens.len() > room {
            tokens.drain(..tokens.len() - room);
        }
        let prompt_len = tokens.len();
        let sampling = match temperature.filter(|t| *t > 0.0) {
            None => Sampling::ArgMax,
            Some(t) => match top_p {
                Some(p) if p < 1.0 => Sampling::TopP { p: p as f64, temperature: t as f64 },
                _ => Sampling::All { temperature: t as f64 },
            },
        };
        let mut logits_proc = LogitsProcessor::from_sampling(seed, sampling);
        let mut out: Vec<u32> = Vec::new();
        let input = Tensor::new(tokens.as_slice(), &self.device)?.unsqueeze(0)?;
        let mut logits = self.model.forward(&input, 0)?.squeeze(0)?;
        let mut finish = "length";
        for i in 0..max_tokens {
            if let Some(penalty) = repeat_penalty.filter(|p| *p != 1.0) {
                // Only the answer so far: penalising the prompt would steer away from the passage's words.
                let recent: Vec<u32> = out.iter().rev().take(64).copied().collect();
                logits = candle_transformers::utils::apply_repeat_penalty(&logits, penalty, &recent)?;
            }
            let next = logits_proc.sample(&logits)?;
            if self.stop.contains(&next) {
                finish = "stop";
                break;
            }
            out.push(next);
            if let Some(m) = cut {
                let so_far = self.tokenizer.decode(&out, true).map_err(candle_core::Error::msg)?;
                if let Some(closed) = crate::text::json_cut(&so_far, m as usize) {
                    return Ok((closed.trim().to_string(), prompt_len as u64, out.len() as u64, "stop"));
                }
            }
            if i + 1 == max_tokens {
                break;
            }
            let input = Tensor::new(&[next], &self.device)?.unsqueeze(0)?;
            logits = self.model.forward(&input, prompt_len + i)?.squeeze(0)?;
        }
        let text = self.tokenizer.decode(&out, true).map_err(candle_core::Error::msg)?;
        Ok((text.trim().to_string(), prompt_len as u64, out.len() as u64, finish))
    }
}

/// Whether `text` holds a JSON value of `schema`'s shape (the subset flow's stages use: object,
/// array, string, integer, number, boolean; `required` and `items`), after any prose or fences.
pub fn conforms(text: &str, schema: &Value) -> bool {
    crate::text::first_json(text).is_some_and(|v| shape_ok(&v, schema))
}

fn shape_ok(v: &Value, schema: &Value) -> bool {
    match schema["type"].as_str() {
        Some("object") => {
            let Some(o) = v.as_object() else { return false };
            let required = schema["required"].as_array().map(Vec::as_slice).unwrap_or_default();
            let props = schema["properties"].as_object();
            required.iter().filter_map(Value::as_str).all(|k| o.contains_key(k))
                && o.iter().all(|(k, x)| props.and_then(|p| p.get(k)).is_none_or(|s| shape_ok(x, s)))
        }
        Some("array") => v.as_array().is_some_and(|a| a.iter().all(|x| shape_ok(x, &schema["items"]))),
        Some("string") => v.is_string(),
        Some("integer") => v.is_i64() || v.is_u64(),
        Some("number") => v.is_number(),
        Some("boolean") => v.is_boolean(),
        _ => true,
    }
}

#[cfg(test)]
mod tests {
    use super::conforms;

    #[test]
    fn an_answer_conforms_only_in_the_schemas_shape() {
        let queries: serde_json::Value = serde_json::from_str(
            r#"{"type":"object","properties":{"queries":{"type":"array","items":{"type":"string"}}},"required":["queries"]}"#,
        )
        .unwrap();
        let judgment: serde_json::Value = serde_json::from_str(
            r#"{"type":"object","properties":{"score":{"type":"integer"},"reason":{"type":"string"}},"required":["score","reason"]}"#,
        )
        .unwrap();
        assert!(conforms(r#"{"queries": ["What was revenue?", "Who audits it?"]}"#, &queries));
        assert!(conforms("```json\n{\"queries\": []}\n```", &queries), "fences around JSON are fine");
        assert!(!conforms(r#"{"queries": "What was revenue?"}"#, &queries), "a string is not a list");
        assert!(!conforms(r#"{"queries": [1, 2]}"#, &queries), "items must be strings");
        assert!(!conforms(r#"{"questions": ["What?"]}"#, &queries), "the required key is missing");
        assert!(!conforms(r#"{"queries": ["What was"#, &queries), "cut off");
        assert!(!conforms("1. What was revenue?", &queries), "prose");
        assert!(conforms(r#"{"reason": "it answers it", "score": 5}"#, &judgment), "key order is free");
        assert!(!conforms(r#"{"score": "5", "reason": "x"}"#, &judgment), "a score must be an integer");
        assert!(!conforms(r#"{"score": 4.5, "reason": "x"}"#, &judgment));
        assert!(!conforms(r#"{"score": 5}"#, &judgment), "the reason is required");
    }
}
