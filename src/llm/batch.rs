//! The Batch API: a stage's uncached chat requests go up as JSONL files, one batch per
//! `max_requests`/`max_bytes`, are polled until done, and their answers land in the request cache
//! as live ones would. Each batch is on record before its file is uploaded, so a killed run
//! attaches to the batch it made instead of paying for it again.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::{AttemptError, BatchApi, ChatProvider, ChatRequest, Identity, LlmClient};
use crate::error::{Error, Result};
use crate::progress::StageProgress;
use crate::store::batches::{self, BatchRow, NewBatch, Seen};
use crate::store::llm_calls;
use crate::store::states::BatchState;
use crate::workflow::{BatchSpec, Fallback};

/// Rounds of batches at most when `fallback: batch` sends what a batch left unanswered again.
const ROUNDS: usize = 3;
/// How many times a batch endpoint is tried before the stage gives up on it.
const API_ATTEMPTS: u32 = 6;

/// One request to answer through a batch: its body and cache key.
struct Pending<'a> {
    body: Value,
    req: &'a ChatRequest,
}

/// Answers `requests` through the Batch API where the cache does not already: once this returns,
/// every request a batch answered is in the cache and the caller sends the rest live.
pub async fn answer(
    client: &LlmClient,
    provider: &dyn ChatProvider,
    spec: &BatchSpec,
    requests: &[&ChatRequest],
    progress: &StageProgress,
) -> Result<()> {
    let Some(api) = provider.batch_api() else { return Ok(()) };
    let id = provider.identity();
    let mut needed: BTreeMap<String, Pending> = BTreeMap::new();
    for req in requests {
        let body = provider.body(req);
        let hash = LlmClient::request_hash(id, &body);
        if !needed.contains_key(&hash) && !LlmClient::has_answer(client.store(), &hash, req).await? {
            needed.insert(hash, Pending { body, req });
        }
    }
    let run = Run { client, api, spec, progress, id };
    // Batches sent before (by a killed run) that hold any of these requests are awaited, not sent again.
    let open = batches::open(client.store(), client.stage(), &id.base_url, &id.model).await?;
    let mut attached = Vec::new();
    for row in open {
        let hashes = batches::hashes(client.store(), row.id).await?;
        if hashes.iter().any(|h| needed.contains_key(h)) {
            progress.log(&format!("attaching to batch {} sent before ({} requests)", row.label(), row.requests));
            attached.push((row, None));
        }
    }
    run.drive(attached, &needed).await?;
    needed = unanswered(client, needed).await?;
    for round in 0..ROUNDS {
        if needed.is_empty() {
            break;
        }
        let sent = run.send(&needed).await?;
        if sent.is_empty() {
            break;
        }
        run.drive(sent, &needed).await?;
        needed = unanswered(client, needed).await?;
        if !needed.is_empty() {
            let next = match spec.fallback {
                Fallback::Batch if round + 1 < ROUNDS => "sent in a new batch",
                _ => "sent live",
            };
            progress.log(&format!("{} requests the batches did not answer are {next}", needed.len()));
            if spec.fallback == Fallback::Live {
                break;
            }
        }
    }
    Ok(())
}

async fn unanswered<'a>(
    client: &LlmClient,
    needed: BTreeMap<String, Pending<'a>>,
) -> Result<BTreeMap<String, Pending<'a>>> {
    let mut left = BTreeMap::new();
    for (hash, p) in needed {
        if !LlmClient::has_answer(client.store(), &hash, p.req).await? {
            left.insert(hash, p);
        }
    }
    Ok(left)
}

impl BatchRow {
    /// The API's batch id, or our row where there is none yet.
    pub fn label(&self) -> String {
        self.batch_id.clone().unwrap_or_else(|| format!("#{} ({})", self.id, self.status))
    }
}

/// What one stage's batches share.
struct Run<'a> {
    client: &'a LlmClient,
    api: &'a dyn BatchApi,
    spec: &'a BatchSpec,
    progress: &'a StageProgress,
    id: &'a Identity,
}

/// Budget reservations of a batch this process sent, by request hash.
type Reserved = Option<HashMap<String, super::budget::Spent>>;

impl Run<'_> {
    /// Sends `needed` in batches under the limits; each is reserved against the budgets request by
    /// request (those a budget refuses stay out, for the live path to stop on) and on record before
    /// its upload.
    async fn send(&self, needed: &BTreeMap<String, Pending<'_>>) -> Result<Vec<(BatchRow, Reserved)>> {
        let mut groups: Vec<(Vec<u8>, HashMap<String, super::budget::Spent>)> = Vec::new();
        let mut current: (Vec<u8>, HashMap<String, super::budget::Spent>) = Default::default();
        for (hash, p) in needed {
            let line = json!({ "custom_id": hash, "method": "POST", "url": "/v1/chat/completions", "body": p.body });
            let mut line = line.to_string().into_bytes();
            line.push(b'\n');
            if line.len() > self.spec.max_bytes {
                continue; // sent live: no batch could hold it
            }
            if !current.1.is_empty()
                && (current.1.len() >= self.spec.max_requests || current.0.len() + line.len() > self.spec.max_bytes)
            {
                groups.push(std::mem::take(&mut current));
            }
            match self.client.reserve_batched(p.req) {
                Ok(r) => {
                    current.0.extend_from_slice(&line);
                    current.1.insert(hash.clone(), r);
                }
                Err(super::budget::Stop::Budget(why)) => {
                    self.progress.log(&format!("the budget leaves the remaining requests out of the batch: {why}"));
                    break;
                }
                Err(super::budget::Stop::Interrupted) => return Err(Error::Interrupted),
            }
        }
        if !current.1.is_empty() {
            groups.push(current);
        }
        let mut sent = Vec::new();
        for (jsonl, reserved) in groups {
            let hashes: Vec<String> = reserved.keys().cloned().collect();
            let c = self.client;
            let row = batches::insert(
                c.store(),
                &NewBatch {
                    run_id: (c.run_id() != super::client::OUTSIDE_RUN).then_some(c.run_id()),
                    stage: c.stage(),
                    base_url: &self.id.base_url,
                    model: &self.id.model,
                    hashes: &hashes,
                    bytes: jsonl.len() as i64,
                },
            )
            .await?;
            let file = self.call("upload the batch file", || self.api.upload(jsonl.clone())).await?;
            batches::set_uploaded(c.store(), row, &file).await?;
            let row = batches::get(c.store(), row).await?;
            self.progress.log(&format!(
                "batch #{} of {} requests ({} bytes) uploaded as {file}",
                row.id,
                hashes.len(),
                row.bytes
            ));
            sent.push((row, Some(reserved)));
        }
        Ok(sent)
    }

    /// Takes each batch to its end: creates it where it was only uploaded (after checking that a
    /// killed run did not create it already), polls, and reads its answers into the cache.
    async fn drive(&self, mut rows: Vec<(BatchRow, Reserved)>, needed: &BTreeMap<String, Pending<'_>>) -> Result<()> {
        let c = self.client;
        if c.run_id() != super::client::OUTSIDE_RUN {
            for (row, _) in &rows {
                batches::adopt(c.store(), row.id, c.run_id()).await?;
            }
        }
        let started = Instant::now();
        loop {
            let mut waiting = 0;
            for (row, reserved) in rows.iter_mut() {
                if row.closed() {
                    continue;
                }
                match row.status {
                    BatchState::Preparing => {
                        // Killed before its upload was on record: nothing was created from it.
                        self.progress.log(&format!(
                            "batch #{} was never created (its upload is not on record): its requests go again",
                            row.id
                        ));
                        batches::abandon(c.store(), row.id).await?;
                        row.status = BatchState::Abandoned;
                        continue;
                    }
                    BatchState::Uploaded => self.create(row).await?,
                    _ if !row.finished() => self.poll(row).await?,
                    _ => {}
                }
                if row.finished() {
                    self.ingest(row, reserved.as_ref(), needed, started).await?;
                    row.ingested_at = Some(batches::set_ingested(c.store(), row.id).await?);
                } else {
                    waiting += 1;
                }
            }
            if waiting == 0 {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_secs_f64(self.spec.poll_s)).await;
        }
    }

    /// Creates the batch of an uploaded file, unless the API already has one for that file (a run
    /// killed between creating it and writing down its id).
    async fn create(&self, row: &mut BatchRow) -> Result<()> {
        let file = row.input_file_id.clone().unwrap_or_default();
        let b = match self.find(&file).await? {
            Some(b) => {
                self.progress.log(&format!("batch #{} was already created as {}: attaching", row.id, b["id"]));
                b
            }
            None => {
                let note = format!("{} #{}", self.client.stage(), row.id);
                self.call("create the batch", || self.api.create(&file, &self.spec.window, &note)).await?
            }
        };
        self.seen(row, &b).await
    }

    /// The API's batch over `input_file_id`, if there is one (newest first, a page at a time).
    async fn find(&self, input_file_id: &str) -> Result<Option<Value>> {
        let mut after: Option<String> = None;
        loop {
            let page = self.call("list batches", || self.api.list(after.as_deref())).await?;
            let data = page["data"].as_array().cloned().unwrap_or_default();
            if let Some(b) = data.iter().find(|b| b["input_file_id"] == input_file_id) {
                return Ok(Some(b.clone()));
            }
            if page["has_more"] != true || data.is_empty() {
                return Ok(None);
            }
            after = data.last().and_then(|b| b["id"].as_str()).map(str::to_string);
        }
    }

    async fn poll(&self, row: &mut BatchRow) -> Result<()> {
        let id = row.batch_id.clone().unwrap_or_default();
        let b = self.call("look at the batch", || self.api.get(&id)).await?;
        let before = (row.status, row.completed);
        self.seen(row, &b).await?;
        if (row.status, row.completed) != before {
            self.progress.log(&format!(
                "batch {}: {}, {} of {} done, {} failed",
                row.label(),
                row.status,
                row.completed,
                row.requests,
                row.failed
            ));
        }
        Ok(())
    }

    /// Writes the API's view of a batch to its row.
    async fn seen(&self, row: &mut BatchRow, b: &Value) -> Result<()> {
        let text = |k: &str| b[k].as_str().map(str::to_string);
        let errors = b
            .pointer("/errors/data")
            .and_then(Value::as_array)
            .map(|e| e.iter().filter_map(|x| x["message"].as_str()).collect::<Vec<_>>().join("; "));
        let s = Seen {
            batch_id: text("id").unwrap_or_default(),
            status: text("status").map_or(BatchState::InProgress, |s| BatchState::from_api(&s)),
            output_file_id: text("output_file_id"),
            error_file_id: text("error_file_id"),
            completed: b.pointer("/request_counts/completed").and_then(Value::as_i64).unwrap_or(0),
            failed: b.pointer("/request_counts/failed").and_then(Value::as_i64).unwrap_or(0),
            error: errors.filter(|e| !e.is_empty()),
        };
        batches::set_seen(self.client.store(), row.id, &s).await?;
        row.batch_id = Some(s.batch_id);
        row.status = s.status;
        row.output_file_id = s.output_file_id;
        row.error_file_id = s.error_file_id;
        row.completed = s.completed;
        row.failed = s.failed;
        row.error = s.error;
        Ok(())
    }

    /// Reads a finished batch's output and error files: each answer goes to the cache (one that
    /// does not parse is stored unusable, to be asked again live), each failure is counted.
    async fn ingest(
        &self,
        row: &BatchRow,
        reserved: Option<&HashMap<String, super::budget::Spent>>,
        needed: &BTreeMap<String, Pending<'_>>,
        started: Instant,
    ) -> Result<()> {
        let (c, id) = (self.client, self.id);
        let mut lines: HashMap<String, Value> = HashMap::new();
        for file in [&row.error_file_id, &row.output_file_id].into_iter().flatten() {
            let bytes = self.call("download the batch's results", || self.api.content(file)).await?;
            let kept = keep_raw(c.store(), row.id, file, &bytes);
            let mut unreadable = Vec::new();
            for (n, line) in String::from_utf8_lossy(&bytes).lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
                // A line the provider garbled answers nothing: its request counts as unanswered (the
                // fallback asks it again), and the good lines around it are stored.
                match serde_json::from_str::<Value>(line).ok().filter(|v| v["custom_id"].is_string()) {
                    Some(v) => {
                        lines.insert(v["custom_id"].as_str().unwrap_or_default().to_string(), v);
                    }
                    None => unreadable.push(n + 1),
                }
            }
            if !unreadable.is_empty() {
                let first: Vec<String> = unreadable.iter().take(5).map(usize::to_string).collect();
                self.progress.log(&format!(
                    "batch {}: {} line(s) of {} from {} are not result JSON (line {}{}); their requests count as unanswered; the file is kept{}",
                    row.label(),
                    unreadable.len(),
                    file,
                    id.provider,
                    first.join(", "),
                    if unreadable.len() > 5 { ", ..." } else { "" },
                    kept.map(|p| format!(" at {}", p.display())).unwrap_or_default(),
                ));
            }
        }
        let (mut ok, mut failed) = (0, 0);
        let latency = started.elapsed().as_millis() as i64;
        for hash in batches::hashes(c.store(), row.id).await? {
            let reservation = reserved.and_then(|r| r.get(&hash));
            if llm_calls::lookup(c.store(), &hash).await?.is_some_and(|r| r.usable) {
                // Read by an earlier attempt: its reservation is let go, nothing is counted twice.
                if let Some(r) = reservation {
                    c.release_batched(r);
                }
                continue;
            }
            let line = lines.get(&hash);
            let body = line.and_then(|l| l.pointer("/response/body")).cloned();
            let status = line.and_then(|l| l.pointer("/response/status_code")).and_then(Value::as_u64);
            let answer = match (status, body) {
                (Some(200), Some(b)) => super::openai::answer_of(b).ok(),
                _ => None,
            };
            let request = needed.get(&hash).map(|p| p.body.to_string()).unwrap_or_default();
            match &answer {
                Some(a) => {
                    let usable = needed.get(&hash).is_none_or(|p| p.req.accepts(Some(&a.text)));
                    c.ingest(id, (&hash, &request), Some((a, usable)), reservation, latency).await?;
                    ok += 1;
                }
                None => {
                    c.ingest(id, (&hash, &request), None, reservation, latency).await?;
                    failed += 1;
                }
            }
        }
        let why = row.error.as_deref().map(|e| format!(" ({e})")).unwrap_or_default();
        self.progress.log(&format!(
            "batch {} {}{why}: {ok} answers read, {failed} not answered",
            row.label(),
            row.status
        ));
        Ok(())
    }

    /// Calls a batch endpoint, trying again on what is worth it.
    async fn call<T, F, Fut>(&self, what: &str, f: F) -> Result<T>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Result<T, AttemptError>>,
    {
        let policy = crate::workflow::RetryPolicy::default();
        let mut attempt = 0;
        loop {
            attempt += 1;
            match f().await {
                Ok(v) => return Ok(v),
                Err(AttemptError::Retryable { message, retry_after }) if attempt < API_ATTEMPTS => {
                    self.progress.log(&format!("could not {what} ({message}); trying again"));
                    tokio::time::sleep(policy.backoff(attempt - 1, retry_after)).await;
                }
                Err(AttemptError::Retryable { message, .. } | AttemptError::Fatal { message }) => {
                    return Err(Error::Service {
                        what: format!(
                            "stage `{}`: the Batch API at {} would not {what}: {message}",
                            self.client.stage(),
                            self.id.base_url
                        ),
                        hint: "`flow resume` attaches to the batches already sent and pays for nothing twice".into(),
                    });
                }
            }
        }
    }
}

/// Keeps a batch result file beside the store (`<store>.batches/`), so what the provider sent can be
/// read after flow has taken its answers; None where it could not be written (that costs nothing else).
fn keep_raw(store: &crate::store::Store, row: i64, file: &str, bytes: &[u8]) -> Option<std::path::PathBuf> {
    let mut dir = store.path.clone().into_os_string();
    dir.push(".batches");
    let dir = std::path::PathBuf::from(dir);
    let safe: String =
        file.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c } else { '_' }).collect();
    let path = dir.join(format!("batch-{row}-{safe}.jsonl"));
    std::fs::create_dir_all(&dir).ok()?;
    std::fs::write(&path, bytes).ok()?;
    Some(path)
}
