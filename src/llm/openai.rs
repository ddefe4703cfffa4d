//! OpenAI-compatible chat and embeddings through async-openai (OpenAI, vLLM, llama.cpp's server,
//! Ollama). One attempt per `send`; the client decides about retries. The key never leaves memory.

use std::time::Duration;

use async_openai::config::OpenAIConfig;
use async_openai::error::OpenAIError;
use async_openai::middleware::{HttpRequestFactory, ReqwestService};
use async_trait::async_trait;
use serde_json::{Value, json};

use super::{AttemptError, BatchApi, ChatAnswer, ChatProvider, ChatRequest, EmbeddingProvider, Identity};
use crate::error::{Error, Result};

pub const DEFAULT_BASE_URL: &str = "https://api.openai.com/v1";

/// Connection settings of one `models:` entry with `provider: openai`.
#[derive(Debug, Clone)]
pub struct Endpoint {
    pub base_url: String,
    pub model: String,
    pub api_key_env: String,
    pub timeout: Duration,
    /// Whether to ask for `response_format: json_schema` (OpenAI, vLLM, llama.cpp and Ollama take it).
    pub json_schema: bool,
}

impl Endpoint {
    /// The base URL from the workflow, else `OPENAI_BASE_URL`, else OpenAI's.
    pub fn base_url(configured: Option<&str>) -> String {
        configured
            .map(str::to_string)
            .or_else(|| std::env::var("OPENAI_BASE_URL").ok().filter(|v| !v.is_empty()))
            .unwrap_or_else(|| DEFAULT_BASE_URL.to_string())
            .trim_end_matches('/')
            .to_string()
    }
}

pub struct OpenAi {
    id: Identity,
    client: async_openai::Client<OpenAIConfig>,
    json_schema: bool,
    /// The encoding OpenAI counts this model's tokens with, where tiktoken knows the model name.
    encoding: Option<(&'static tiktoken_rs::CoreBPE, &'static str)>,
}

/// tiktoken's encoding of an OpenAI chat model by name (`gpt-4o-mini` is o200k_base); None for
/// names it does not know, such as a vLLM or Ollama model.
fn chat_encoding(model: &str) -> Option<(&'static tiktoken_rs::CoreBPE, &'static str)> {
    use tiktoken_rs::tokenizer::Tokenizer;
    let (t, name) = match tiktoken_rs::tokenizer::get_tokenizer(model)? {
        t @ Tokenizer::O200kBase => (t, "tiktoken o200k_base"),
        t @ Tokenizer::Cl100kBase => (t, "tiktoken cl100k_base"),
        _ => return None,
    };
    Some((tiktoken_rs::bpe_for_tokenizer(t).ok()?, name))
}

/// Prompt tokens of a chat request the way OpenAI bills them: each message's role and content,
/// 3 tokens of framing per message and 3 that prime the reply (OpenAI's cookbook,
/// "How to count tokens with tiktoken").
pub fn chat_tokens(bpe: &tiktoken_rs::CoreBPE, messages: &[super::Message]) -> u64 {
    let count = |s: &str| bpe.encode_ordinary(s).len() as u64;
    3 + messages.iter().map(|m| 3 + count(&m.role) + count(&m.content)).sum::<u64>()
}

impl OpenAi {
    pub fn new(ep: &Endpoint) -> Result<OpenAi> {
        // `flow validate` checks a base URL from the workflow; one from OPENAI_BASE_URL is checked here.
        if let Err((what, hint)) = crate::workflow::check_base_url(&ep.base_url) {
            return Err(Error::bad_input(
                format!("the API base URL {}: {what}", crate::workflow::shown_url(&ep.base_url)),
                hint,
            ));
        }
        // Local servers (llama.cpp, Ollama, vLLM) take any key; OpenAI itself needs one.
        let key = std::env::var(&ep.api_key_env).ok().filter(|k| !k.is_empty());
        let key = match key {
            Some(k) => k,
            None if ep.base_url == DEFAULT_BASE_URL => {
                return Err(Error::bad_input(
                    format!("environment variable {} is not set (the API key for {})", ep.api_key_env, ep.base_url),
                    format!("export {}=... ; keys are read from the environment only", ep.api_key_env),
                ));
            }
            None => "none".to_string(),
        };
        // A key that cannot be an HTTP header (a trailing \r from a Windows-edited env file, a newline)
        // would make every request fail in the HTTP library: refuse it here, naming the variable only.
        if reqwest::header::HeaderValue::from_str(&format!("Bearer {key}")).is_err() {
            let what = match key.chars().find(|c| c.is_control()) {
                Some('\r') => "a carriage return (\\r: a file edited on Windows?)".to_string(),
                Some('\n') => "a line break".to_string(),
                Some(c) => format!("the control character U+{:04X}", c as u32),
                None => "a character an HTTP header cannot carry".to_string(),
            };
            return Err(Error::bad_input(
                format!("the API key in ${} holds {what}, so it cannot be sent", ep.api_key_env),
                format!(
                    "set {} again without it (e.g. `export {}=\"$(printf %s \"${}\" | tr -d '\\r\\n')\"`)",
                    ep.api_key_env, ep.api_key_env, ep.api_key_env
                ),
            ));
        }
        let http = reqwest::Client::builder()
            .timeout(ep.timeout)
            .connect_timeout(Duration::from_secs(10))
            .pool_max_idle_per_host(256)
            .build()
            .map_err(|e| Error::internal(format!("cannot build the HTTP client: {e}")))?;
        let config = OpenAIConfig::new().with_api_base(&ep.base_url).with_api_key(key);
        let client = async_openai::Client::with_config(config)
            .with_http_client(http.clone())
            .with_http_service(StatusAware { inner: ReqwestService::new(http) });
        Ok(OpenAi {
            id: Identity {
                provider: crate::workflow::Provider::Openai,
                base_url: ep.base_url.clone(),
                model: ep.model.clone(),
            },
            client,
            json_schema: ep.json_schema,
            encoding: chat_encoding(&ep.model),
        })
    }
}

#[async_trait]
impl ChatProvider for OpenAi {
    fn identity(&self) -> &Identity {
        &self.id
    }

    fn body(&self, req: &ChatRequest) -> Value {
        let mut body = json!({ "model": self.id.model, "messages": req.messages, "stream": false });
        let p = &req.params;
        if let Some(t) = p.temperature {
            body["temperature"] = json!(t);
        }
        if let Some(t) = p.top_p {
            body["top_p"] = json!(t);
        }
        if let Some(t) = p.max_tokens {
            body["max_tokens"] = json!(t);
        }
        if let Some(s) = p.seed {
            body["seed"] = json!(s);
        }
        if let (true, Some((name, schema))) = (self.json_schema, &req.json_schema) {
            body["response_format"] =
                json!({ "type": "json_schema", "json_schema": { "name": name, "schema": schema, "strict": true } });
        }
        if req.score.is_some() {
            // The score digit's alternatives: its probabilities where the server returns them.
            body["logprobs"] = json!(true);
            body["top_logprobs"] = json!(5);
        }
        body
    }

    async fn send(&self, body: &Value) -> Result<ChatAnswer, AttemptError> {
        let raw: Value = self.client.chat().create_byot(body).await.map_err(classify)?;
        answer_of(raw)
    }

    fn count_prompt(&self, req: &ChatRequest) -> Option<(u64, &str)> {
        self.encoding.map(|(bpe, name)| (chat_tokens(bpe, &req.messages), name))
    }

    fn batch_api(&self) -> Option<&dyn BatchApi> {
        Some(self)
    }
}

/// A chat completion's answer: its text, finish reason and usage (a live reply, or a batch's line).
pub fn answer_of(raw: Value) -> Result<ChatAnswer, AttemptError> {
    let choice = raw.get("choices").and_then(|c| c.get(0)).ok_or_else(|| AttemptError::Retryable {
        message: format!("reply has no choices: {}", excerpt(&raw.to_string())),
        retry_after: None,
    })?;
    let text = choice.pointer("/message/content").and_then(Value::as_str).unwrap_or_default().to_string();
    let usage = |k: &str| raw.pointer(&format!("/usage/{k}")).and_then(Value::as_u64).unwrap_or(0);
    Ok(ChatAnswer {
        text,
        finish_reason: choice.get("finish_reason").and_then(Value::as_str).map(str::to_string),
        response_id: raw.get("id").and_then(Value::as_str).map(str::to_string),
        prompt_tokens: usage("prompt_tokens"),
        completion_tokens: usage("completion_tokens"),
        raw,
    })
}

#[async_trait]
impl BatchApi for OpenAi {
    async fn upload(&self, jsonl: Vec<u8>) -> Result<String, AttemptError> {
        use async_openai::types::InputSource;
        use async_openai::types::files::{CreateFileRequest, FileInput, FilePurpose};
        let source = InputSource::VecU8 { filename: "flow-batch.jsonl".into(), vec: jsonl };
        let req = CreateFileRequest { file: FileInput { source }, purpose: FilePurpose::Batch, expires_after: None };
        let file: Value = self.client.files().create_byot(req).await.map_err(classify)?;
        file["id"].as_str().map(str::to_string).ok_or_else(|| AttemptError::Fatal {
            message: format!("the file upload's reply has no id: {}", excerpt(&file.to_string())),
        })
    }

    async fn create(&self, input_file_id: &str, window: &str, note: &str) -> Result<Value, AttemptError> {
        let body = json!({
            "input_file_id": input_file_id, "endpoint": "/v1/chat/completions",
            "completion_window": window, "metadata": { "flow": note },
        });
        self.client.batches().create_byot(body).await.map_err(classify)
    }

    async fn get(&self, batch_id: &str) -> Result<Value, AttemptError> {
        self.client.batches().retrieve_byot(batch_id).await.map_err(classify)
    }

    async fn list(&self, after: Option<&str>) -> Result<Value, AttemptError> {
        use async_openai::traits::RequestOptionsBuilder;
        let mut q = vec![("limit", "100".to_string())];
        if let Some(a) = after {
            q.push(("after", a.to_string()));
        }
        self.client.batches().query(&q).map_err(classify)?.list_byot().await.map_err(classify)
    }

    async fn content(&self, file_id: &str) -> Result<Vec<u8>, AttemptError> {
        Ok(self.client.files().content(file_id).await.map_err(classify)?.to_vec())
    }
}

#[async_trait]
impl EmbeddingProvider for OpenAi {
    fn identity(&self) -> &Identity {
        &self.id
    }

    fn body(&self, texts: &[String]) -> Value {
        json!({ "model": self.id.model, "input": texts, "encoding_format": "float" })
    }

    async fn send(&self, body: &Value) -> Result<(Vec<Vec<f32>>, u64, Value), AttemptError> {
        let raw: Value = self.client.embeddings().create_byot(body).await.map_err(classify)?;
        let bad =
            |what: &str| AttemptError::Retryable { message: format!("embeddings reply {what}"), retry_after: None };
        let data = raw.get("data").and_then(Value::as_array).ok_or_else(|| bad("has no data"))?;
        let mut out = vec![Vec::new(); data.len()];
        for (i, item) in data.iter().enumerate() {
            let idx = item.get("index").and_then(Value::as_u64).map(|x| x as usize).unwrap_or(i);
            let v = item.get("embedding").and_then(Value::as_array).ok_or_else(|| bad("item has no embedding"))?;
            let slot = out.get_mut(idx).ok_or_else(|| bad("index out of range"))?;
            *slot = v.iter().map(|x| x.as_f64().unwrap_or(0.0) as f32).collect();
        }
        let tokens = raw.pointer("/usage/prompt_tokens").and_then(Value::as_u64).unwrap_or(0);
        Ok((out, tokens, raw))
    }
}

/// A non-2xx reply with what retry decisions need: status, Retry-After and the server's message.
#[derive(Debug)]
struct HttpStatus {
    status: u16,
    retry_after: Option<Duration>,
    body: String,
}

impl std::fmt::Display for HttpStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "HTTP {}: {}", self.status, server_message(&self.body))
    }
}

impl std::error::Error for HttpStatus {}

/// Transport for async-openai that keeps the response headers of failed calls: async-openai's own
/// error type drops Retry-After, which the shared limiter needs.
#[derive(Clone)]
struct StatusAware {
    inner: ReqwestService,
}

impl tower::Service<HttpRequestFactory> for StatusAware {
    type Response = reqwest::Response;
    type Error = OpenAIError;
    type Future = std::pin::Pin<Box<dyn Future<Output = Result<reqwest::Response, OpenAIError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), OpenAIError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: HttpRequestFactory) -> Self::Future {
        let fut = self.inner.call(req);
        Box::pin(async move {
            let resp = fut.await?;
            if resp.status().is_success() {
                return Ok(resp);
            }
            let status = resp.status().as_u16();
            let retry_after = resp
                .headers()
                .get(reqwest::header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<f64>().ok())
                .filter(|s| s.is_finite() && *s >= 0.0)
                .map(Duration::from_secs_f64);
            let body = resp.text().await.unwrap_or_default();
            Err(OpenAIError::Boxed(Box::new(HttpStatus { status, retry_after, body })))
        })
    }
}

fn classify(e: OpenAIError) -> AttemptError {
    match e {
        OpenAIError::Boxed(b) => match b.downcast::<HttpStatus>() {
            Ok(h) => {
                let message = h.to_string();
                if h.status == 429 || h.status == 408 || h.status >= 500 {
                    AttemptError::Retryable { message, retry_after: h.retry_after }
                } else {
                    AttemptError::Fatal { message }
                }
            }
            Err(other) => AttemptError::Retryable { message: other.to_string(), retry_after: None },
        },
        OpenAIError::Reqwest(e) => {
            let what = if e.is_timeout() {
                "timed out"
            } else if e.is_connect() {
                "could not connect"
            } else {
                "connection failed"
            };
            AttemptError::Retryable { message: format!("{what}: {e}"), retry_after: None }
        }
        OpenAIError::JSONDeserialize(err, body) => AttemptError::Retryable {
            message: format!("reply is not valid JSON ({err}): {}", excerpt(&body)),
            retry_after: None,
        },
        OpenAIError::ApiError(a) => {
            let code = a.status_code.as_u16();
            let message = format!("HTTP {code}: {}", a.api_error.message);
            if code == 429 || code >= 500 {
                AttemptError::Retryable { message, retry_after: None }
            } else {
                AttemptError::Fatal { message }
            }
        }
        other => AttemptError::Fatal { message: other.to_string() },
    }
}

/// The `error.message` of an OpenAI-style error body, else the start of the body.
fn server_message(body: &str) -> String {
    serde_json::from_str::<Value>(body)
        .ok()
        .and_then(|v| v.pointer("/error/message").and_then(Value::as_str).map(str::to_string))
        .unwrap_or_else(|| excerpt(body))
}

fn excerpt(s: &str) -> String {
    let s: String = s.chars().take(300).collect();
    s.replace('\n', " ")
}

#[cfg(test)]
mod tests {
    use super::{chat_encoding, chat_tokens};
    use crate::llm::Message;

    #[test]
    fn chat_tokens_count_as_openai_bills_them() {
        let (bpe, name) = chat_encoding("gpt-4o-mini").unwrap();
        assert_eq!(name, "tiktoken o200k_base");
        // "hello world" is 2 tokens and "user" 1: 3 framing + 1 + 2, and 3 priming the reply.
        assert_eq!(chat_tokens(bpe, &[Message::user("hello world")]), 9);
        let two = [Message::system("hello world"), Message::user("hello world")];
        assert_eq!(chat_tokens(bpe, &two), 3 + 2 * 3 + 1 + 1 + 2 * 2);
        assert!(chat_encoding("Qwen/Qwen2.5-7B-Instruct").is_none(), "a name tiktoken does not know");
    }
}
