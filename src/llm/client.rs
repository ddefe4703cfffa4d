//! The one way stages call an LLM: request cache first, then the shared limiter, then attempts with
//! backoff; every paid answer is stored before it is used, and usage is counted for accounting.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::limiter::Limiter;
use super::retry::RetryPolicy;
use super::{AttemptError, ChatAnswer, ChatProvider, ChatRequest, EmbeddingProvider, Identity, estimate_tokens};
use crate::digest::sha256_hex;
use crate::error::Result;
use crate::store::Store;
use crate::store::llm_calls::{self, NewCall};
use crate::store::runs::UsageSnapshot;
use crate::workflow::Price;

/// Counters of one client (one stage run).
#[derive(Debug, Default)]
pub struct Usage {
    pub calls: AtomicU64,
    pub cached: AtomicU64,
    pub failures: AtomicU64,
    pub prompt_tokens: AtomicU64,
    pub completion_tokens: AtomicU64,
    /// Tokens of answers that came through the Batch API (priced at `batch_price`).
    pub batch_prompt_tokens: AtomicU64,
    pub batch_completion_tokens: AtomicU64,
}

/// A chat call that produced an answer (maybe from the cache).
#[derive(Debug, Clone)]
pub struct ChatDone {
    pub answer: ChatAnswer,
    pub call_id: i64,
    pub cached: bool,
    pub attempts: u32,
}

/// A call that gave up: the server's message (or ours) and how often it tried.
#[derive(Debug, Clone)]
pub struct LlmFailure {
    pub message: String,
    pub attempts: u32,
}

/// A request refused because it would cross a `budget:` or because a signal stopped the run: not an
/// item's failure but the run's stop.
fn refused(why: super::budget::Stop) -> crate::Error {
    match why {
        super::budget::Stop::Budget(what) => crate::Error::Budget { what },
        super::budget::Stop::Interrupted => crate::Error::Interrupted,
    }
}

/// A chat answer on its way to the cache.
struct StoredAnswer<'a> {
    hash: &'a str,
    request: &'a str,
    answer: &'a ChatAnswer,
    latency_ms: i64,
    attempts: u32,
    usable: bool,
    /// How the answer was held to its shape.
    constrained: &'a str,
}

/// How an answer was held to its shape: what the local engine says it did, else `json_schema` for a
/// request that asked a server for structured output, else `none`.
fn constrained_of<'a>(answer: &'a ChatAnswer, request: &Value) -> &'a str {
    match answer.raw["constrained"].as_str() {
        Some(c) => c,
        None if request.get("response_format").is_some() => "json_schema",
        None => "none",
    }
}

/// One request's cost at `price` (0 without one).
fn spent_at(price: Option<Price>, prompt: u64, completion: u64) -> super::budget::Spent {
    let usd = price.map_or(0.0, |p| p.usd(prompt, completion));
    super::budget::Spent { requests: 1, prompt_tokens: prompt, completion_tokens: completion, usd }
}

/// The run id of calls made outside any run (`flow serve`, `flow embed`): stored with no run.
pub const OUTSIDE_RUN: i64 = 0;

pub struct LlmClient {
    limiter: Arc<Limiter>,
    retry: RetryPolicy,
    store: Store,
    price: Option<Price>,
    batch_price: Option<Price>,
    usage: Usage,
    run_id: i64,
    stage: String,
    ledgers: super::budget::Ledgers,
    /// Requests this client read from a batch: counted as calls when read, so their replay from
    /// the cache is not counted again.
    batched: std::sync::Mutex<std::collections::HashSet<String>>,
}

/// Why `attempts` gave no answer: the calls failed, or a budget (or a signal) refused to send one.
enum NoAnswer {
    Failed(LlmFailure),
    Refused(super::budget::Stop),
}

/// A reply that came back: what it holds, the attempts it took, its latency, and its reservation on
/// the budgets, settled once the reply is stored (so a run waiting for its requests in flight
/// finds every paid answer in the store).
struct Reply<T> {
    value: T,
    attempts: u32,
    latency: Duration,
    reserved: super::budget::Spent,
}

impl LlmClient {
    pub fn new(
        limiter: Arc<Limiter>,
        retry: RetryPolicy,
        price: Option<Price>,
        store: Store,
        run_id: i64,
        stage: &str,
    ) -> LlmClient {
        LlmClient {
            limiter,
            retry,
            store,
            price,
            batch_price: price,
            usage: Usage::default(),
            run_id,
            stage: stage.to_string(),
            ledgers: Default::default(),
            batched: Default::default(),
        }
    }

    /// Prices answers read from the Batch API at `price`.
    pub fn with_batch_price(mut self, price: Option<Price>) -> LlmClient {
        self.batch_price = price;
        self
    }

    /// Whether the cache holds an answer to `req` (by its `hash`) that would be replayed: usable,
    /// and one the request accepts.
    pub async fn has_answer(store: &Store, hash: &str, req: &ChatRequest) -> Result<bool> {
        Ok(llm_calls::lookup(store, hash).await?.is_some_and(|row| row.usable && req.accepts(row.text.as_deref())))
    }

    pub fn run_id(&self) -> i64 {
        self.run_id
    }

    pub fn stage(&self) -> &str {
        &self.stage
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Counts every request against these budgets (the run's and the stage's).
    pub fn with_ledgers(mut self, ledgers: super::budget::Ledgers) -> LlmClient {
        self.ledgers = ledgers;
        self
    }

    fn spent(&self, prompt: u64, completion: u64) -> super::budget::Spent {
        spent_at(self.price, prompt, completion)
    }

    /// Reserves one request sent in a batch against the budgets, at the batch price.
    pub fn reserve_batched(&self, req: &ChatRequest) -> std::result::Result<super::budget::Spent, super::budget::Stop> {
        let (prompt, completion) = req.estimated_tokens();
        let est = spent_at(self.batch_price, prompt, completion);
        self.ledgers.reserve(&est)?;
        Ok(est)
    }

    /// Lets go of a batch request's reservation that needs no settling (already answered).
    pub fn release_batched(&self, reserved: &super::budget::Spent) {
        self.ledgers.settle(reserved, &super::budget::Spent::default());
    }

    /// Stores an answer read from a batch the way a live one is stored (the cache, the usage at the
    /// batch price, the budgets: settling `reserved`, or counting it outright for a batch a killed
    /// process sent). None for a request the batch did not answer.
    pub async fn ingest(
        &self,
        id: &Identity,
        (hash, request): (&str, &str),
        answer: Option<(&ChatAnswer, bool)>,
        reserved: Option<&super::budget::Spent>,
        latency_ms: i64,
    ) -> Result<()> {
        let used = match answer {
            Some((a, _)) => spent_at(self.batch_price, a.prompt_tokens, a.completion_tokens),
            None => spent_at(self.batch_price, 0, 0),
        };
        // Stored before its reservation is settled: a run waiting for its requests in flight then
        // finds every paid answer in the store.
        let stored = match answer {
            Some((a, usable)) => {
                let constrained = a.raw["constrained"].as_str().unwrap_or("json_schema");
                let stored = StoredAnswer { hash, request, answer: a, latency_ms, attempts: 1, usable, constrained };
                Some(self.store_answer(id, &stored).await)
            }
            None => None,
        };
        match reserved {
            Some(r) => self.ledgers.settle(r, &used),
            None => self.ledgers.record(&used),
        }
        self.usage.calls.fetch_add(1, Ordering::Relaxed);
        let Some((answer, _)) = answer else {
            self.usage.failures.fetch_add(1, Ordering::Relaxed);
            return Ok(());
        };
        stored.expect("stored above")?;
        self.usage.batch_prompt_tokens.fetch_add(answer.prompt_tokens, Ordering::Relaxed);
        self.usage.batch_completion_tokens.fetch_add(answer.completion_tokens, Ordering::Relaxed);
        self.batched.lock().unwrap_or_else(|p| p.into_inner()).insert(hash.to_string());
        Ok(())
    }

    pub fn usage(&self) -> UsageSnapshot {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let (p, c) = (g(&self.usage.prompt_tokens), g(&self.usage.completion_tokens));
        let (bp, bc) = (g(&self.usage.batch_prompt_tokens), g(&self.usage.batch_completion_tokens));
        let cost = match (self.price, self.batch_price) {
            (None, None) => None,
            (live, batch) => Some(spent_at(live, p, c).usd + spent_at(batch, bp, bc).usd),
        };
        UsageSnapshot {
            calls: g(&self.usage.calls),
            cached: g(&self.usage.cached),
            failures: g(&self.usage.failures),
            prompt_tokens: p + bp,
            completion_tokens: c + bc,
            cost,
        }
    }

    /// The hash that keys the cache: endpoint and the exact body (model, messages, every parameter).
    pub fn request_hash(id: &Identity, body: &Value) -> String {
        sha256_hex(serde_json::json!([id.provider, id.base_url, id.model, body]).to_string().as_bytes())
    }

    pub async fn chat(&self, provider: &dyn ChatProvider, req: &ChatRequest) -> Result<Result<ChatDone, LlmFailure>> {
        let id = provider.identity();
        let body = provider.body(req);
        let hash = Self::request_hash(id, &body);
        // Only an answer that parsed into a result is replayed; one that did not is asked again
        // (a row stored before flow checked this is marked now, so the new answer replaces it).
        let cached = llm_calls::lookup(&self.store, &hash).await?;
        let parses = |row: &llm_calls::CallRow| req.accepts(row.text.as_deref());
        if let Some(row) = &cached
            && row.usable
            && !parses(row)
        {
            llm_calls::mark_unusable(&self.store, row.id).await?;
        }
        if let Some(row) = cached
            && row.usable
            && parses(&row)
        {
            // An answer this client read from a batch was counted then.
            if !self.batched.lock().unwrap_or_else(|p| p.into_inner()).remove(&hash) {
                self.usage.cached.fetch_add(1, Ordering::Relaxed);
            }
            let answer = ChatAnswer {
                text: row.text.unwrap_or_default(),
                finish_reason: row.finish_reason,
                response_id: row.response_id,
                prompt_tokens: row.prompt_tokens as u64,
                completion_tokens: row.completion_tokens as u64,
                raw: serde_json::from_str(&row.response).unwrap_or(Value::Null),
            };
            return Ok(Ok(ChatDone { answer, call_id: row.id, cached: true, attempts: 0 }));
        }
        let request = body.to_string();
        let started = Instant::now();
        let mut tries = 0u32;
        // An answer that does not parse is stored (unusable, never replayed) and asked again under the
        // model's retry policy: each attempt is sent, counted and paid like any other.
        loop {
            let reply = self.attempts(
                req.estimated_tokens(),
                |a: &ChatAnswer| (a.prompt_tokens, a.completion_tokens),
                || provider.send(&body),
            );
            let Reply { value: answer, attempts, latency, reserved } = match reply.await {
                Ok(r) => r,
                Err(NoAnswer::Refused(why)) => return Err(refused(why)),
                Err(NoAnswer::Failed(f)) => return Ok(Err(LlmFailure { attempts: f.attempts + tries, ..f })),
            };
            tries += attempts;
            let usable = req.accept.is_none_or(|accept| accept(&answer.text));
            let latency_ms = latency.as_millis() as i64;
            let constrained = constrained_of(&answer, &body);
            let stored = StoredAnswer {
                hash: &hash,
                request: &request,
                answer: &answer,
                latency_ms,
                attempts,
                usable,
                constrained,
            };
            let call_id = self.store_answer(id, &stored).await;
            self.ledgers.settle(&reserved, &self.spent(answer.prompt_tokens, answer.completion_tokens));
            let call_id = call_id?;
            self.usage.prompt_tokens.fetch_add(answer.prompt_tokens, Ordering::Relaxed);
            self.usage.completion_tokens.fetch_add(answer.completion_tokens, Ordering::Relaxed);
            let wait = self.retry.backoff(tries.saturating_sub(1), None);
            let out_of_tries = tries >= self.retry.attempts || started.elapsed() + wait > self.retry.deadline();
            if usable || out_of_tries || answer.finish_reason.as_deref() == Some("length") {
                return Ok(Ok(ChatDone { answer, call_id, cached: false, attempts: tries }));
            }
            tokio::time::sleep(wait).await;
        }
    }

    /// Writes a chat answer to the cache: its row id.
    async fn store_answer(&self, id: &Identity, a: &StoredAnswer<'_>) -> Result<i64> {
        llm_calls::insert(
            &self.store,
            &NewCall {
                request_hash: a.hash,
                kind: "chat",
                provider: id.provider,
                base_url: &id.base_url,
                model: &id.model,
                request: a.request,
                response: &a.answer.raw.to_string(),
                text: Some(&a.answer.text),
                finish_reason: a.answer.finish_reason.as_deref(),
                response_id: a.answer.response_id.as_deref(),
                prompt_tokens: a.answer.prompt_tokens as i64,
                completion_tokens: a.answer.completion_tokens as i64,
                latency_ms: a.latency_ms,
                attempts: i64::from(a.attempts),
                run_id: (self.run_id != OUTSIDE_RUN).then_some(self.run_id),
                stage: Some(&self.stage),
                usable: a.usable,
                constrained: Some(a.constrained),
            },
        )
        .await
    }

    /// Embeds a batch of texts in one request (cached like chat calls).
    pub async fn embed(
        &self,
        provider: &dyn EmbeddingProvider,
        texts: &[String],
    ) -> Result<Result<Vec<Vec<f32>>, LlmFailure>> {
        let id = provider.identity();
        let body = provider.body(texts);
        let hash = Self::request_hash(id, &body);
        if let Some(row) = llm_calls::lookup(&self.store, &hash).await?
            && row.usable
            && let Ok(v) = serde_json::from_str::<Vec<Vec<f32>>>(&row.response)
        {
            self.usage.cached.fetch_add(1, Ordering::Relaxed);
            return Ok(Ok(v));
        }
        let est = (texts.iter().map(|t| estimate_tokens(t)).sum(), 0);
        let outcome = self.attempts(est, |r: &(Vec<Vec<f32>>, u64, Value)| (r.1, 0), || provider.send(&body)).await;
        let Reply { value: (vectors, tokens, _raw), attempts, latency, reserved } = match outcome {
            Ok(x) => x,
            Err(NoAnswer::Failed(f)) => return Ok(Err(f)),
            Err(NoAnswer::Refused(why)) => return Err(refused(why)),
        };
        let stored = llm_calls::insert(
            &self.store,
            &NewCall {
                request_hash: &hash,
                kind: "embeddings",
                provider: id.provider,
                base_url: &id.base_url,
                model: &id.model,
                request: &body.to_string(),
                response: &serde_json::to_string(&vectors).expect("floats serialise"),
                text: None,
                finish_reason: None,
                response_id: None,
                prompt_tokens: tokens as i64,
                completion_tokens: 0,
                latency_ms: latency.as_millis() as i64,
                attempts: attempts as i64,
                run_id: (self.run_id != OUTSIDE_RUN).then_some(self.run_id),
                stage: Some(&self.stage),
                usable: true,
                constrained: None,
            },
        )
        .await;
        self.ledgers.settle(&reserved, &self.spent(tokens, 0));
        stored?;
        self.usage.prompt_tokens.fetch_add(tokens, Ordering::Relaxed);
        Ok(Ok(vectors))
    }

    /// Attempts until success, a fatal error, the attempt cap or the deadline.
    /// Each attempt is reserved against the budgets when it is sent; a failed one is settled when it
    /// returns, a reply by the caller once it is stored.
    async fn attempts<T, F, Fut>(
        &self,
        est: (u64, u64),
        used: impl Fn(&T) -> (u64, u64),
        send: F,
    ) -> Result<Reply<T>, NoAnswer>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Result<T, AttemptError>>,
    {
        let started = Instant::now();
        let mut attempt = 0u32;
        let reserved = self.spent(est.0, est.1);
        loop {
            let permit = self.limiter.acquire(est.0 + est.1).await;
            self.ledgers.reserve(&reserved).map_err(NoAnswer::Refused)?;
            let t0 = Instant::now();
            self.usage.calls.fetch_add(1, Ordering::Relaxed);
            let res = send().await;
            drop(permit);
            attempt += 1;
            let err = match res {
                Ok(v) => {
                    let (p, c) = used(&v);
                    self.limiter.reconcile(est.0 + est.1, p + c).await;
                    return Ok(Reply { value: v, attempts: attempt, latency: t0.elapsed(), reserved });
                }
                Err(e) => e,
            };
            // A failed request was sent and counts as one; it used no tokens.
            self.ledgers.settle(&reserved, &self.spent(0, 0));
            let give_up = |message: String| {
                self.usage.failures.fetch_add(1, Ordering::Relaxed);
                NoAnswer::Failed(LlmFailure { message, attempts: attempt })
            };
            match err {
                AttemptError::Fatal { message } => return Err(give_up(message)),
                AttemptError::Retryable { message, retry_after } => {
                    if let Some(ra) = retry_after {
                        self.limiter.pause_for(ra);
                    }
                    let wait = self.retry.backoff(attempt - 1, retry_after);
                    if attempt >= self.retry.attempts {
                        return Err(give_up(format!("{message} (gave up after {attempt} attempts)")));
                    }
                    if started.elapsed() + wait > self.retry.deadline() {
                        return Err(give_up(format!(
                            "{message} (gave up after {attempt} attempts: the {}s deadline would pass)",
                            self.retry.deadline_s
                        )));
                    }
                    tokio::time::sleep(wait).await;
                }
            }
        }
    }
}
