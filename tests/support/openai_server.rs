//! A real HTTP server on 127.0.0.1 speaking the OpenAI chat-completions and embeddings API, for
//! tests and benchmarks. It answers deterministically from a hash of the request, can inject the
//! faults real APIs throw (429 with Retry-After, 500/503, slow replies, malformed JSON, truncated
//! output, dropped connections, 400s) and logs every request it sees.

#![allow(dead_code)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Value, json};

#[derive(Clone, Debug)]
pub struct Config {
    /// Added to every reply.
    pub latency: Duration,
    /// First attempts of some requests fail in a retryable way (chosen by request hash).
    pub transient_faults: bool,
    /// Some requests always fail: a 400, or a reply cut off at max_tokens.
    pub persistent_faults: bool,
    /// How long a "slow" reply takes (longer than the client's timeout).
    pub slow: Duration,
    /// Answer with prose instead of JSON (a server without structured output).
    pub prose: bool,
    /// The first answer to some requests is cut off mid-JSON but reported complete (a 200 with
    /// `finish_reason: stop`); asked again, they are answered in full.
    pub truncate_first: bool,
    /// How long a batch is in progress after it is created.
    pub batch_delay: Duration,
    /// Requests of a batch whose body hash is a multiple of this fail (a 500 in the error file).
    pub batch_fail_every: u64,
    /// Output lines of requests whose body hash is a multiple of this come garbled (not JSON), as a
    /// provider's broken output file would.
    pub batch_garble_every: u64,
    /// The first batch expires when its delay is up: the first half of its requests are answered,
    /// the rest are `batch_expired` in its error file.
    pub batch_expire_first: bool,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            latency: Duration::ZERO,
            transient_faults: false,
            persistent_faults: false,
            slow: Duration::from_secs(3),
            prose: false,
            truncate_first: false,
            batch_delay: Duration::from_millis(300),
            batch_fail_every: 0,
            batch_garble_every: 0,
            batch_expire_first: false,
        }
    }
}

#[derive(Clone, Debug)]
pub struct Entry {
    pub received: Instant,
    pub hash: u64,
    pub path: String,
    /// What the server did: "ok", "429", "500", "503", "slow", "malformed", "drop", "400", "length",
    /// "truncated".
    pub outcome: &'static str,
}

#[derive(Default)]
pub struct Log {
    pub entries: Mutex<Vec<Entry>>,
    seen: Mutex<HashMap<u64, u32>>,
    files: Mutex<HashMap<String, Vec<u8>>>,
    batches: Mutex<Vec<Value>>,
}

impl Log {
    pub fn entries(&self) -> Vec<Entry> {
        self.entries.lock().unwrap().clone()
    }

    /// How many requests reached `path` ("chat", "files", "batches.create", ...).
    pub fn count(&self, path: &str) -> usize {
        self.entries.lock().unwrap().iter().filter(|e| e.path == path).count()
    }

    /// Every batch the server holds, as its API shows them.
    pub fn batches(&self) -> Vec<Value> {
        self.batches.lock().unwrap().clone()
    }
}

struct Shared {
    cfg: Config,
    log: Arc<Log>,
    started: Instant,
}

pub struct Server {
    pub addr: SocketAddr,
    pub log: Arc<Log>,
}

impl Server {
    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }
}

/// Starts the server on its own thread and runtime; it lives until the process ends.
pub fn start(cfg: Config) -> Server {
    start_on("127.0.0.1:0", cfg)
}

pub fn start_on(addr: &str, cfg: Config) -> Server {
    let log = Arc::new(Log::default());
    let shared = Arc::new(Shared { cfg, log: log.clone(), started: Instant::now() });
    let listener = std::net::TcpListener::bind(addr).expect("bind 127.0.0.1");
    listener.set_nonblocking(true).unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        rt.block_on(async move {
            let app = Router::new()
                .route("/v1/chat/completions", post(chat))
                .route("/v1/embeddings", post(embeddings))
                .route("/v1/files", post(upload))
                .route("/v1/files/{id}/content", get(file_content))
                .route("/v1/batches", post(create_batch).get(list_batches))
                .route("/v1/batches/{id}", get(get_batch))
                .route("/stats", get(stats))
                .with_state(shared);
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            axum::serve(listener, app).await.unwrap();
        });
    });
    Server { addr, log }
}

/// FNV-1a: a stable hash of the request body, so faults and answers repeat across runs.
pub fn hash(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf29ce484222325;
    for b in bytes {
        h ^= *b as u64;
        h = h.wrapping_mul(0x100000001b3);
    }
    h
}

/// How many times this request (by hash) has arrived, this one included.
fn record(s: &Shared, h: u64) -> u32 {
    let mut seen = s.log.seen.lock().unwrap();
    let n = seen.entry(h).or_insert(0);
    *n += 1;
    *n
}

fn log(s: &Shared, h: u64, path: &str, outcome: &'static str, received: Instant) {
    s.log.entries.lock().unwrap().push(Entry { received, hash: h, path: path.to_string(), outcome });
}

/// The fault for this request, if any: transient ones on the first attempt only.
fn fault(cfg: &Config, h: u64, attempt: u32) -> Option<&'static str> {
    if cfg.persistent_faults {
        if h.is_multiple_of(97) {
            return Some("400");
        }
        if h.is_multiple_of(89) {
            return Some("length");
        }
    }
    if cfg.truncate_first && attempt == 1 && h.is_multiple_of(5) {
        return Some("truncated");
    }
    if cfg.transient_faults && attempt == 1 {
        return match h % 10 {
            1 => Some("429"),
            2 => Some("500"),
            3 => Some("503"),
            4 => Some("slow"),
            5 => Some("malformed"),
            6 => Some("drop"),
            _ => None,
        };
    }
    None
}

async fn fail(s: &Shared, what: &'static str) -> Option<Response> {
    let err = |code: StatusCode, msg: &str| {
        (code, axum::Json(json!({"error": {"message": msg, "type": "test"}}))).into_response()
    };
    Some(match what {
        "429" => {
            let mut r = err(StatusCode::TOO_MANY_REQUESTS, "Rate limit reached, retry after 1s");
            r.headers_mut().insert("retry-after", "1".parse().unwrap());
            r
        }
        "500" => err(StatusCode::INTERNAL_SERVER_ERROR, "internal error"),
        "503" => err(StatusCode::SERVICE_UNAVAILABLE, "overloaded"),
        "400" => err(StatusCode::BAD_REQUEST, "Invalid prompt: flagged by the test server's content policy"),
        "slow" => {
            tokio::time::sleep(s.cfg.slow).await;
            return None;
        }
        "malformed" => {
            (StatusCode::OK, [("content-type", "application/json")], "{\"id\": \"x\", \"choices\": [{\"mess")
                .into_response()
        }
        "drop" => {
            let stream = futures::stream::iter(vec![
                Ok::<Bytes, std::io::Error>(Bytes::from_static(b"{\"id\": \"partial\", ")),
                Err(std::io::Error::other("connection dropped by the test server")),
            ]);
            Response::builder()
                .status(200)
                .header("content-type", "application/json")
                .body(Body::from_stream(stream))
                .unwrap()
        }
        _ => return None,
    })
}

async fn chat(State(s): State<Arc<Shared>>, _headers: HeaderMap, body: Bytes) -> Response {
    let received = Instant::now();
    let h = hash(&body);
    let attempt = record(&s, h);
    let req: Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => return (StatusCode::BAD_REQUEST, format!("bad json: {e}")).into_response(),
    };
    let what = fault(&s.cfg, h, attempt);
    log(&s, h, "chat", what.unwrap_or("ok"), received);
    if let Some(w) = what
        && w != "length"
        && w != "truncated"
        && let Some(r) = fail(&s, w).await
    {
        return r;
    }
    tokio::time::sleep(s.cfg.latency).await;
    let content = answer_to(&req, h, s.cfg.prose);
    let half = |c: &str| c.chars().take(c.chars().count() / 2).collect::<String>();
    let (content, finish) = match what {
        Some("length") => (half(&content), "length"),
        Some("truncated") => (half(&content), "stop"),
        _ => (content, "stop"),
    };
    axum::Json(json!({
        "id": format!("chatcmpl-{h:016x}-{attempt}"),
        "object": "chat.completion",
        "model": req["model"],
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": finish}],
        "usage": usage(&req, body.len(), &content),
    }))
    .into_response()
}

/// Token counts as OpenAI reports them: for a model tiktoken knows (`gpt-4o-mini`), each
/// message's role and content with 3 tokens of framing a message and 3 priming the reply (the
/// cookbook's count); for other names, four bytes of the body a token.
fn usage(req: &Value, body_len: usize, content: &str) -> Value {
    let model = req["model"].as_str().unwrap_or_default();
    let (prompt, completion) = match tiktoken_rs::bpe_for_model(model) {
        Ok(bpe) => {
            let n = |s: &str| bpe.encode_ordinary(s).len();
            let messages = req["messages"].as_array().cloned().unwrap_or_default();
            let text = |m: &Value, k: &str| m[k].as_str().unwrap_or_default().to_string();
            let prompt = 3 + messages.iter().map(|m| 3 + n(&text(m, "role")) + n(&text(m, "content"))).sum::<usize>();
            (prompt, n(content))
        }
        Err(_) => (body_len / 4, content.len() / 4),
    };
    json!({"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion})
}

/// The answer to a chat request body.
fn answer_to(req: &Value, h: u64, prose: bool) -> String {
    let schema = req.pointer("/response_format/json_schema/name").and_then(Value::as_str).unwrap_or("");
    let prompt = req["messages"].as_array().and_then(|m| m.last()).and_then(|m| m["content"].as_str()).unwrap_or("");
    answer(schema, prompt, h, prose)
}

/// Deterministic answers: questions for the generate schema, a score for the judge schema; for RAG,
/// the first passage as the answer, graded correct when the reference contains it.
fn answer(schema: &str, prompt: &str, h: u64, prose: bool) -> String {
    if schema == "rag_answer" {
        let first = prompt.lines().find_map(|l| l.strip_prefix("[1] ")).unwrap_or("I don't know");
        return json!({ "answer": first }).to_string();
    }
    if schema == "rag_grade" {
        // The prompt quotes the reference, then the answer, each between lines of three quotes.
        let blocks: Vec<&str> = prompt.split("\"\"\"").collect();
        let (reference, answer) = (blocks.get(1).unwrap_or(&"").trim(), blocks.get(3).unwrap_or(&"").trim());
        let correct = !answer.is_empty() && reference.contains(answer);
        return json!({ "correct": correct, "reason": "test grader: reference contains the answer" }).to_string();
    }
    let is_judge = schema == "judgment" || prompt.contains("Score the query");
    if is_judge {
        let score = 1 + h % 5;
        return if prose {
            format!("Score: {score}. The query is reasonable.")
        } else {
            json!({"score": score, "reason": format!("test judge gives {score}")}).to_string()
        };
    }
    // The built-in prompts' other kinds of query: keyword searches and claims.
    if prompt.contains("keyword quer") {
        let qs = [
            format!("metric {} section {}", h % 100_000, (h >> 20) % 1000),
            format!("item {} fiscal change", (h >> 8) % 100_000),
        ];
        return json!({"queries": qs}).to_string();
    }
    if prompt.contains("different claim") {
        let qs = [
            format!("Metric {} rose in section {} of the report.", h % 100_000, (h >> 20) % 1000),
            format!("Item {} changed during fiscal year {}.", (h >> 8) % 100_000, 2000 + (h >> 40) % 26),
        ];
        return json!({"queries": qs}).to_string();
    }
    let mut qs = vec![
        format!("What was the value of metric {} reported in section {}?", h % 100_000, (h >> 20) % 1000),
        format!("How did item {} change during fiscal year {}?", (h >> 8) % 100_000, 2000 + (h >> 40) % 26),
    ];
    if h.is_multiple_of(13) {
        qs[0] = "What was total revenue in fiscal 2025?".into();
    }
    if h.is_multiple_of(17) {
        qs[1] = "What does the passage say about revenue?".into();
    }
    if prose {
        format!("Here are two questions:\n1. {}\n2. {}\n", qs[0], qs[1])
    } else {
        json!({"queries": qs}).to_string()
    }
}

async fn embeddings(State(s): State<Arc<Shared>>, body: Bytes) -> Response {
    let received = Instant::now();
    let h = hash(&body);
    let attempt = record(&s, h);
    let what = fault(&s.cfg, h, attempt).filter(|w| *w != "length");
    log(&s, h, "embeddings", what.unwrap_or("ok"), received);
    if let Some(w) = what
        && let Some(r) = fail(&s, w).await
    {
        return r;
    }
    tokio::time::sleep(s.cfg.latency).await;
    let req: Value = serde_json::from_slice(&body).unwrap_or_default();
    let inputs: Vec<String> = match &req["input"] {
        Value::String(s) => vec![s.clone()],
        Value::Array(a) => a.iter().filter_map(|x| x.as_str().map(str::to_string)).collect(),
        _ => vec![],
    };
    let data: Vec<Value> = inputs
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let th = hash(t.as_bytes());
            let v: Vec<f32> = (0..8).map(|k| (((th >> (k * 8)) & 0xff) as f32 / 255.0) - 0.5).collect();
            json!({"object": "embedding", "index": i, "embedding": v})
        })
        .collect();
    let tokens: usize = inputs.iter().map(|t| t.len() / 4).sum();
    axum::Json(json!({"object": "list", "data": data, "model": req["model"], "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}))
        .into_response()
}

/// Arrival times of every request so far, in milliseconds since the server started (for benchmarks).
async fn stats(State(s): State<Arc<Shared>>) -> Response {
    let ms: Vec<f64> =
        s.log.entries().iter().map(|e| e.received.duration_since(s.started).as_secs_f64() * 1000.0).collect();
    axum::Json(json!({ "count": ms.len(), "received_ms": ms })).into_response()
}

/// `POST /v1/files`: a multipart upload; the part named `file` is kept.
async fn upload(State(s): State<Arc<Shared>>, headers: HeaderMap, body: Bytes) -> Response {
    log(&s, hash(&body), "files", "ok", Instant::now());
    let ct = headers.get("content-type").and_then(|v| v.to_str().ok()).unwrap_or_default();
    let Some(boundary) = ct.split("boundary=").nth(1).map(|b| format!("--{}", b.trim_matches('"'))) else {
        return (StatusCode::BAD_REQUEST, "not multipart").into_response();
    };
    let file = split(&body, boundary.as_bytes()).into_iter().find_map(|part| {
        let head_end = find(part, b"\r\n\r\n")?;
        let head = String::from_utf8_lossy(&part[..head_end]);
        head.contains("name=\"file\"").then(|| part[head_end + 4..part.len().saturating_sub(2)].to_vec())
    });
    let Some(file) = file else { return (StatusCode::BAD_REQUEST, "no file part").into_response() };
    let mut files = s.log.files.lock().unwrap();
    let id = format!("file-{}", files.len() + 1);
    let bytes = file.len();
    files.insert(id.clone(), file);
    axum::Json(json!({"id": id, "object": "file", "bytes": bytes, "filename": "batch.jsonl", "purpose": "batch", "created_at": 0}))
        .into_response()
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn split<'a>(body: &'a [u8], boundary: &[u8]) -> Vec<&'a [u8]> {
    let mut parts = Vec::new();
    let mut rest = body;
    while let Some(i) = find(rest, boundary) {
        parts.push(&rest[..i]);
        rest = &rest[i + boundary.len()..];
    }
    parts
}

async fn file_content(State(s): State<Arc<Shared>>, axum::extract::Path(id): axum::extract::Path<String>) -> Response {
    log(&s, hash(id.as_bytes()), "files.content", "ok", Instant::now());
    match s.log.files.lock().unwrap().get(&id) {
        Some(b) => (StatusCode::OK, b.clone()).into_response(),
        None => (StatusCode::NOT_FOUND, axum::Json(json!({"error": {"message": "no such file"}}))).into_response(),
    }
}

async fn create_batch(State(s): State<Arc<Shared>>, body: Bytes) -> Response {
    log(&s, hash(&body), "batches.create", "ok", Instant::now());
    let req: Value = serde_json::from_slice(&body).unwrap_or_default();
    let file = req["input_file_id"].as_str().unwrap_or_default().to_string();
    let Some(input) = s.log.files.lock().unwrap().get(&file).cloned() else {
        return (StatusCode::BAD_REQUEST, axum::Json(json!({"error": {"message": "no such input file"}})))
            .into_response();
    };
    let total = String::from_utf8_lossy(&input).lines().filter(|l| !l.trim().is_empty()).count();
    let mut batches = s.log.batches.lock().unwrap();
    let b = json!({
        "id": format!("batch_{}", batches.len() + 1), "object": "batch", "endpoint": req["endpoint"],
        "input_file_id": file, "completion_window": req["completion_window"], "status": "validating",
        "output_file_id": null, "error_file_id": null, "metadata": req["metadata"],
        "created_ms": s.started.elapsed().as_millis() as u64, "expire": s.cfg.batch_expire_first && batches.is_empty(),
        "request_counts": {"total": total, "completed": 0, "failed": 0},
    });
    batches.push(b.clone());
    axum::Json(b).into_response()
}

async fn list_batches(State(s): State<Arc<Shared>>) -> Response {
    log(&s, 0, "batches.list", "ok", Instant::now());
    let ids: Vec<String> =
        s.log.batches.lock().unwrap().iter().rev().map(|b| b["id"].as_str().unwrap().to_string()).collect();
    let data: Vec<Value> = ids.iter().filter_map(|id| advance(&s, id)).collect();
    axum::Json(json!({"object": "list", "data": data, "has_more": false})).into_response()
}

async fn get_batch(State(s): State<Arc<Shared>>, axum::extract::Path(id): axum::extract::Path<String>) -> Response {
    log(&s, hash(id.as_bytes()), "batches.get", "ok", Instant::now());
    match advance(&s, &id) {
        Some(b) => axum::Json(b).into_response(),
        None => (StatusCode::NOT_FOUND, axum::Json(json!({"error": {"message": "no such batch"}}))).into_response(),
    }
}

/// The batch as it stands now: in progress until its delay is up, then completed (or expired),
/// with its output and error files written once.
fn advance(s: &Shared, id: &str) -> Option<Value> {
    let mut batches = s.log.batches.lock().unwrap();
    let b = batches.iter_mut().find(|b| b["id"] == id)?;
    if b["output_file_id"].is_string() || b["status"] == "expired" {
        return Some(b.clone());
    }
    let age = s.started.elapsed().as_millis() as u64 - b["created_ms"].as_u64().unwrap_or(0);
    if age < s.cfg.batch_delay.as_millis() as u64 {
        b["status"] = "in_progress".into();
        return Some(b.clone());
    }
    let input =
        s.log.files.lock().unwrap().get(b["input_file_id"].as_str().unwrap_or_default()).cloned().unwrap_or_default();
    let lines: Vec<Value> =
        String::from_utf8_lossy(&input).lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
    let expire = b["expire"] == true;
    let (mut out, mut err) = (String::new(), String::new());
    let (mut done, mut failed) = (0, 0);
    for (i, line) in lines.iter().enumerate() {
        let body = &line["body"];
        let bytes = serde_json::to_vec(body).unwrap();
        let h = hash(&bytes);
        let custom_id = &line["custom_id"];
        if expire && i >= lines.len() / 2 {
            let e = json!({"id": format!("batch_req_{i}"), "custom_id": custom_id, "response": null,
                "error": {"code": "batch_expired", "message": "This request could not be executed before the completion window expired."}});
            err.push_str(&format!("{e}\n"));
            failed += 1;
            continue;
        }
        if s.cfg.batch_fail_every > 0 && h.is_multiple_of(s.cfg.batch_fail_every) {
            let e = json!({"id": format!("batch_req_{i}"), "custom_id": custom_id,
                "response": {"status_code": 500, "request_id": "r", "body": {"error": {"message": "internal error", "type": "server_error"}}}, "error": null});
            err.push_str(&format!("{e}\n"));
            failed += 1;
            continue;
        }
        let content = answer_to(body, h, s.cfg.prose);
        let completion = json!({
            "id": format!("chatcmpl-batch-{h:016x}"), "object": "chat.completion", "model": body["model"],
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
            "usage": usage(body, bytes.len(), &content),
        });
        let o = json!({"id": format!("batch_req_{i}"), "custom_id": custom_id,
            "response": {"status_code": 200, "request_id": "r", "body": completion}, "error": null});
        if s.cfg.batch_garble_every > 0 && h.is_multiple_of(s.cfg.batch_garble_every) {
            let cut = o.to_string();
            out.push_str(&format!("\u{1}garbled{}\n", &cut[..cut.len() / 2]));
        } else {
            out.push_str(&format!("{o}\n"));
        }
        done += 1;
    }
    let mut files = s.log.files.lock().unwrap();
    let n = files.len();
    let (out_id, err_id) = (format!("file-{}", n + 1), format!("file-{}", n + 2));
    files.insert(out_id.clone(), out.into_bytes());
    b["output_file_id"] = out_id.into();
    if failed > 0 {
        files.insert(err_id.clone(), err.into_bytes());
        b["error_file_id"] = err_id.into();
    }
    b["status"] = if expire { "expired" } else { "completed" }.into();
    b["request_counts"] = json!({"total": lines.len(), "completed": done, "failed": failed});
    Some(b.clone())
}
