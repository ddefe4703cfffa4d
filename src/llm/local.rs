//! The embedded default LLM: a GGUF llama-architecture model (SmolLM2-135M-Instruct here) run with
//! candle's quantized llama on a worker thread, so generation never blocks the async runtime.

use std::path::Path;
use std::sync::mpsc;

use async_trait::async_trait;
use candle_core::{Device, Tensor};
use candle_transformers::generation::{LogitsProcessor, Sampling};
use candle_transformers::models::quantized_llama::ModelWeights;
use serde_json::{Value, json};
use tokenizers::Tokenizer;

use super::{AttemptError, ChatAnswer, ChatProvider, ChatRequest, Identity, Message};
use crate::error::{Error, Result};
use crate::llm::gguf::{self, ChatTemplate};

type Job = (Value, tokio::sync::oneshot::Sender<Result<ChatAnswer, AttemptError>>);

pub struct LocalChat {
    id: Identity,
    jobs: mpsc::Sender<Job>,
}

impl LocalChat {
    /// Loads the GGUF at `path` and starts its worker thread.
    pub fn load(path: &Path, name: &str, device: crate::workflow::Device) -> Result<LocalChat> {
        let engine = Engine::load(path, &crate::models::device(device)?)?;
        let (tx, rx) = mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("flow-local-llm".into())
            .spawn(move || {
                let mut engine = engine;
                while let Ok((body, reply)) = rx.recv() {
                    let _ = reply.send(engine.answer(&body).map_err(|message| AttemptError::Fatal { message }));
                }
            })
            .map_err(Error::io("the local LLM worker thread"))?;
        // The file's size and a hash of its metadata identify the weights in the request cache.
        let size = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
        Ok(LocalChat {
            id: Identity { provider: "local".into(), base_url: format!("gguf:{size}"), model: name.to_string() },
            jobs: tx,
        })
    }
}

#[async_trait]
impl ChatProvider for LocalChat {
    fn identity(&self) -> &Identity {
        &self.id
    }

    fn body(&self, req: &ChatRequest) -> Value {
        // The local model has no constrained decoding; the prompt asks for the format and the
        // parsers are tolerant, so the schema is not part of the request.
        json!({ "model": self.id.model, "messages": req.messages, "params": req.params })
    }

    async fn send(&self, body: &Value) -> Result<ChatAnswer, AttemptError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.jobs
            .send((body.clone(), tx))
            .map_err(|_| AttemptError::Fatal { message: "the local LLM thread has stopped".into() })?;
        rx.await.map_err(|_| AttemptError::Fatal { message: "the local LLM thread has stopped".into() })?
    }
}

/// The model, tokenizer and template, owned by the worker thread.
pub struct Engine {
    model: ModelWeights,
    pub tokenizer: Tokenizer,
    template: ChatTemplate,
    stop: Vec<u32>,
    context: usize,
    device: Device,
}

impl Engine {
    pub fn load(path: &Path, device: &Device) -> Result<Engine> {
        let (content, mut file) = gguf::read(path)?;
        let arch = content.metadata.get("general.architecture").and_then(|v| v.to_string().ok()).cloned();
        if arch.as_deref() != Some("llama") {
            return Err(Error::bad_input(
                format!("{}: architecture {:?} is not supported by the local LLM (llama is)", path.display(), arch),
                "use a llama-architecture GGUF such as SmolLM2-135M-Instruct",
            ));
        }
        let tokenizer = gguf::tokenizer(&content, path)?;
        let template = ChatTemplate::from_gguf(&content, path, &tokenizer)?;
        let mut stop: Vec<u32> = gguf::token_id(&content, "tokenizer.ggml.eos_token_id").into_iter().collect();
        for t in ["<|im_end|>", "<|endoftext|>", "<|eot_id|>"] {
            if let Some(id) = tokenizer.token_to_id(t) {
                stop.push(id);
            }
        }
        let context =
            content.metadata.get("llama.context_length").and_then(|v| v.to_u32().ok()).unwrap_or(2048) as usize;
        let device = device.clone();
        let model = ModelWeights::from_gguf(content, &mut file, &device).map_err(|e| {
            Error::bad_input(
                format!("{}: cannot load the model weights: {e}", path.display()),
                "the file is corrupt: run `flow models pull`",
            )
        })?;
        Ok(Engine { model, tokenizer, template, stop, context, device })
    }

    fn answer(&mut self, body: &Value) -> Result<ChatAnswer, String> {
        let messages: Vec<Message> = serde_json::from_value(body["messages"].clone()).map_err(|e| e.to_string())?;
        let p: super::GenParams = serde_json::from_value(body["params"].clone()).unwrap_or_default();
        let prompt = self.template.render(&messages).map_err(|e| e.to_string())?;
        let (text, prompt_tokens, completion, finish) = self
            .generate(
                &prompt,
                p.max_tokens.unwrap_or(256) as usize,
                p.temperature,
                p.top_p,
                p.seed.unwrap_or(0),
                p.repeat_penalty,
            )
            .map_err(|e| format!("local generation failed: {e}"))?;
        Ok(ChatAnswer {
            raw: json!({ "text": text, "finish_reason": finish }),
            text,
            finish_reason: Some(finish.to_string()),
            response_id: None,
            prompt_tokens,
            completion_tokens: completion,
        })
    }

    /// Greedy (temperature 0 or none) or sampled decoding with a KV cache, stopping at end-of-turn,
    /// with an optional repeat penalty over the last 64 generated tokens.
    pub fn generate(
        &mut self,
        prompt: &str,
        max_tokens: usize,
        temperature: Option<f32>,
        top_p: Option<f32>,
        seed: u64,
        repeat_penalty: Option<f32>,
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
