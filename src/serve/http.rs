//! The HTTP face of `flow serve` (axum): OpenAI's embeddings and models shapes, `/v1/search`,
//! `/healthz` and `/metrics`, behind an optional bearer key, input limits and a drain on SIGTERM.

use std::sync::Arc;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{Value, json};

use super::Service;
use crate::error::{Error, Result};

/// Who may call and how much one request may carry.
#[derive(Debug, Clone)]
pub struct Limits {
    /// The bearer key requests must carry (None: no key asked).
    pub api_key: Option<String>,
    /// Inputs per embeddings request (OpenAI's own limit is 2048).
    pub max_inputs: usize,
    /// Characters per input or query.
    pub max_chars: usize,
    /// Hits per search.
    pub max_k: usize,
}

/// The header that names the model behind each answer (`mafin@7`).
pub const MODEL_HEADER: &str = "x-flow-model";

/// Request bodies larger than this are refused before parsing (413).
const BODY_LIMIT: usize = 64 << 20;

/// After a request with more text than this, freed memory is handed back to the OS (tokenizing a
/// few hundred long inputs leaves hundreds of MB free in the allocator's arenas otherwise).
const RELEASE_AFTER_BYTES: usize = 1 << 20;

#[derive(Clone)]
struct App {
    svc: Arc<Service>,
    limits: Arc<Limits>,
}

pub fn router(svc: Arc<Service>, limits: Limits) -> Router {
    let app = App { svc, limits: Arc::new(limits) };
    Router::new()
        .route("/v1/embeddings", post(embeddings))
        .route("/v1/models", get(models))
        .route("/v1/search", post(search))
        .route("/v1/rerank", post(rerank))
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(app.clone(), guard))
        .layer(axum::extract::DefaultBodyLimit::max(BODY_LIMIT))
        .with_state(app)
}

/// Serves until SIGINT/SIGTERM, then stops taking connections and lets in-flight requests finish.
pub async fn serve(listener: tokio::net::TcpListener, svc: Arc<Service>, limits: Limits) -> Result<()> {
    let app = router(svc, limits);
    axum::serve(listener, app)
        .with_graceful_shutdown(crate::engine::shutdown::requested())
        .await
        .map_err(|e| Error::Service { what: format!("the HTTP server stopped: {e}"), hint: "see the log above".into() })
}

fn route_of(path: &str) -> &'static str {
    match path {
        "/v1/embeddings" => "embeddings",
        "/v1/search" => "search",
        "/v1/rerank" => "rerank",
        "/v1/models" => "models",
        "/healthz" => "healthz",
        "/metrics" => "metrics",
        _ => "other",
    }
}

/// The key check (before any work: a refused request costs nothing) and the request metrics.
async fn guard(State(app): State<App>, req: Request, next: Next) -> Response {
    let start = Instant::now();
    let route = route_of(req.uri().path());
    let response = match &app.limits.api_key {
        Some(key) if route != "healthz" && !authorized(&req, key) => error(
            StatusCode::UNAUTHORIZED,
            "missing or wrong API key: send `Authorization: Bearer <key>` with the key in the server's --api-key-env variable",
            "invalid_api_key",
        ),
        _ => next.run(req).await,
    };
    // The body limit's refusal comes as plain text from axum: clients expect OpenAI's error shape.
    let response = match response.status() {
        StatusCode::PAYLOAD_TOO_LARGE if !is_json(&response) => error(
            StatusCode::PAYLOAD_TOO_LARGE,
            &format!("the request body is over {} MiB; send fewer or shorter inputs", BODY_LIMIT >> 20),
            "request_too_large",
        ),
        _ => response,
    };
    app.svc.metrics.answered(route, response.status().as_u16(), start.elapsed().as_secs_f64());
    response
}

fn is_json(r: &Response) -> bool {
    r.headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"))
}

/// A field that must be a string when present (`model`, `encoding_format`, `retriever`); the 400
/// to answer with when it is not.
fn string_field<'a>(req: &'a Value, key: &str) -> std::result::Result<Option<&'a str>, Box<Response>> {
    match &req[key] {
        Value::Null => Ok(None),
        Value::String(s) => Ok(Some(s)),
        other => Err(Box::new(error(
            StatusCode::BAD_REQUEST,
            &format!("`{key}` must be a string, not {}", type_name(other)),
            &format!("invalid_{key}"),
        ))),
    }
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

fn authorized(req: &Request, key: &str) -> bool {
    let given =
        req.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
    // Compared in time independent of where the first difference is.
    given
        .is_some_and(|g| g.len() == key.len() && g.bytes().zip(key.bytes()).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0)
}

/// OpenAI's error shape.
fn error(status: StatusCode, message: &str, code: &str) -> Response {
    let kind = if status.is_server_error() { "server_error" } else { "invalid_request_error" };
    (status, Json(json!({ "error": { "message": message, "type": kind, "code": code, "param": null } })))
        .into_response()
}

fn failed(e: &Error) -> Response {
    match e {
        Error::BadInput { .. } => error(StatusCode::BAD_REQUEST, &e.to_string(), "invalid_request"),
        Error::Service { .. } => error(StatusCode::BAD_GATEWAY, &e.to_string(), "upstream_error"),
        _ => error(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string(), "internal_error"),
    }
}

fn with_model(mut r: Response, label: &str) -> Response {
    if let Ok(v) = HeaderValue::from_str(label) {
        r.headers_mut().insert(MODEL_HEADER, v);
    }
    r
}

/// The body as a JSON object (None: the 400 to answer with is `not_json()`).
fn parse(body: &Bytes) -> Option<Value> {
    serde_json::from_slice::<Value>(body).ok().filter(Value::is_object)
}

fn not_json() -> Response {
    error(StatusCode::BAD_REQUEST, "the body must be a JSON object", "invalid_json")
}

/// `input` as texts: a string or a list of strings, each within the limits.
fn inputs(v: &Value, limits: &Limits) -> std::result::Result<Vec<String>, String> {
    let texts: Vec<String> = match v {
        Value::String(s) => vec![s.clone()],
        Value::Array(items) if items.iter().all(Value::is_string) => {
            items.iter().map(|i| i.as_str().unwrap_or_default().to_string()).collect()
        }
        Value::Array(_) => {
            return Err(
                "`input` holds token ids or mixed items; this server embeds text: send a string or a list of strings"
                    .into(),
            );
        }
        Value::Null => return Err("the request has no `input`".into()),
        _ => return Err("`input` must be a string or a list of strings".into()),
    };
    if texts.is_empty() {
        return Err("`input` is an empty list".into());
    }
    if texts.len() > limits.max_inputs {
        return Err(format!(
            "{} inputs in one request; this server takes at most {} (--max-inputs)",
            texts.len(),
            limits.max_inputs
        ));
    }
    for (i, t) in texts.iter().enumerate() {
        if t.is_empty() {
            return Err(format!("input {i} is an empty string"));
        }
        let n = t.chars().count();
        if n > limits.max_chars {
            return Err(format!(
                "input {i} has {n} characters; this server takes at most {} per input (--max-chars)",
                limits.max_chars
            ));
        }
    }
    Ok(texts)
}

async fn embeddings(State(app): State<App>, body: Bytes) -> Response {
    let Some(req) = parse(&body) else { return not_json() };
    let texts = match inputs(&req["input"], &app.limits) {
        Ok(t) => t,
        Err(m) => return error(StatusCode::BAD_REQUEST, &m, "invalid_input"),
    };
    let name = match string_field(&req, "model") {
        Ok(n) => n.unwrap_or_default(),
        Err(r) => return *r,
    };
    let dimensions = match &req["dimensions"] {
        Value::Null => None,
        v => match v.as_u64().filter(|&d| d >= 1) {
            Some(d) => Some(d as usize),
            None => {
                let msg = format!("`dimensions` must be a whole number of at least 1, not {v}");
                return error(StatusCode::BAD_REQUEST, &msg, "invalid_dimensions");
            }
        },
    };
    let live = app.svc.live();
    if live.find(name).is_none() {
        let msg = format!(
            "the model `{name}` does not exist here; this server has {} (default {})",
            live.names().join(", "),
            live.default.name()
        );
        return error(StatusCode::NOT_FOUND, &msg, "model_not_found");
    }
    let format = match string_field(&req, "encoding_format") {
        Ok(f) => f,
        Err(r) => return *r,
    };
    let base64 = match format {
        None | Some("float") => false,
        Some("base64") => true,
        Some(other) => {
            return error(
                StatusCode::BAD_REQUEST,
                &format!("`encoding_format` {other:?}: use float or base64"),
                "invalid_encoding",
            );
        }
    };
    let chars: usize = texts.iter().map(String::len).sum();
    let done = app.svc.embed(name, texts, true).await;
    if chars > RELEASE_AFTER_BYTES {
        super::release_free_memory();
    }
    let done = match done {
        Ok(d) => d,
        Err(e) => return failed(&e),
    };
    let dim = done.vectors.first().map_or(0, Vec::len);
    if let Some(d) = dimensions
        && d != dim
    {
        let msg = format!("`dimensions` {d}: this retriever's vectors are {dim} wide and are not shortened");
        return error(StatusCode::BAD_REQUEST, &msg, "invalid_dimensions");
    }
    let data: Vec<Value> = done
        .vectors
        .iter()
        .enumerate()
        .map(|(i, v)| {
            let embedding = if base64 { Value::String(to_base64(v)) } else { json!(v) };
            json!({ "object": "embedding", "index": i, "embedding": embedding })
        })
        .collect();
    let body = json!({
        "object": "list",
        "data": data,
        "model": done.served.kind.name(),
        "usage": { "prompt_tokens": done.tokens, "total_tokens": done.tokens },
    });
    with_model(Json(body).into_response(), &done.served.label())
}

fn to_base64(v: &[f32]) -> String {
    use base64::Engine;
    let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

async fn models(State(app): State<App>) -> Response {
    let live = app.svc.live();
    let data: Vec<Value> = live
        .retrievers
        .iter()
        .map(|s| {
            json!({
                "id": s.kind.name(),
                "object": "model",
                "created": s.model.as_ref().map_or(0, |m| m.created_at / 1000),
                "owned_by": "flow",
                "flow_model": s.label(),
                "status": s.model.as_ref().map_or("black box", |m| m.status.as_str()),
                "default": s.kind == live.default,
            })
        })
        .collect();
    let mut data = data;
    if let Some(r) = &live.reranker {
        data.push(json!({
            "id": "rerank",
            "object": "model",
            "created": r.model.created_at / 1000,
            "owned_by": "flow",
            "flow_model": r.label(),
            "status": r.model.status.as_str(),
            "default": false,
            "default_for_search": live.search_default == crate::retriever::Kind::Rerank,
        }));
    }
    let body = json!({ "object": "list", "data": data, "search_also": ["bm25", "hybrid"] });
    with_model(Json(body).into_response(), &live.default_served().label())
}

async fn search(State(app): State<App>, body: Bytes) -> Response {
    let Some(req) = parse(&body) else { return not_json() };
    let Some(query) = req["query"].as_str().filter(|q| !q.trim().is_empty()) else {
        return error(StatusCode::BAD_REQUEST, "the request has no `query` (a non-empty string)", "invalid_query");
    };
    let n = query.chars().count();
    if n > app.limits.max_chars {
        let msg =
            format!("the query has {n} characters; this server takes at most {} (--max-chars)", app.limits.max_chars);
        return error(StatusCode::BAD_REQUEST, &msg, "invalid_query");
    }
    let k = match &req["k"] {
        Value::Null => 10,
        v => match v.as_u64().filter(|&k| k >= 1 && k as usize <= app.limits.max_k) {
            Some(k) => k as usize,
            None => {
                let msg = format!("`k` must be a whole number from 1 to {}", app.limits.max_k);
                return error(StatusCode::BAD_REQUEST, &msg, "invalid_k");
            }
        },
    };
    let name = match string_field(&req, "retriever") {
        Ok(n) => n.unwrap_or_default(),
        Err(r) => return *r,
    };
    let live = app.svc.live();
    let lexical = crate::retriever::Kind::parse(name).is_some_and(|k| !k.is_dense());
    if !lexical && live.find(name).is_none() {
        let msg = format!(
            "no retriever `{name}` here; search takes {}, bm25 or hybrid (default {})",
            live.names().join(", "),
            live.default.name()
        );
        return error(StatusCode::NOT_FOUND, &msg, "retriever_not_found");
    }
    match app.svc.search(name, query, k).await {
        Ok(found) => {
            let label = found.model.clone();
            let body = json!({
                "object": "list",
                "retriever": found.retriever,
                "model": found.model,
                "fusion": found.fusion,
                "data": found.hits,
            });
            with_model(Json(body).into_response(), &label)
        }
        Err(e) => failed(&e),
    }
}

/// Cohere's rerank shape (which LangChain's and LlamaIndex's Cohere rerankers call): `query`,
/// `documents` (strings or `{"text": ...}`), optional `top_n` and `return_documents`; each result's
/// `index` into `documents` and `relevance_score`, sigmoid(logit) as sentence-transformers'
/// `CrossEncoder.predict` reports it, best first.
async fn rerank(State(app): State<App>, body: Bytes) -> Response {
    let Some(req) = parse(&body) else { return not_json() };
    let Some(query) = req["query"].as_str().filter(|q| !q.trim().is_empty()) else {
        return error(StatusCode::BAD_REQUEST, "the request has no `query` (a non-empty string)", "invalid_query");
    };
    let docs: Vec<String> = match &req["documents"] {
        Value::Array(items) if !items.is_empty() => {
            let texts: Option<Vec<String>> = items
                .iter()
                .map(|d| match d {
                    Value::String(s) => Some(s.clone()),
                    Value::Object(o) => o.get("text").and_then(Value::as_str).map(str::to_string),
                    _ => None,
                })
                .collect();
            match texts {
                Some(t) => t,
                None => {
                    return error(
                        StatusCode::BAD_REQUEST,
                        "each of `documents` must be a string or an object with a `text` string",
                        "invalid_documents",
                    );
                }
            }
        }
        _ => {
            return error(
                StatusCode::BAD_REQUEST,
                "the request has no `documents` (a non-empty list of strings)",
                "invalid_documents",
            );
        }
    };
    let limits = &app.limits;
    if docs.len() > limits.max_inputs {
        let msg = format!(
            "{} documents in one request; this server takes at most {} (--max-inputs)",
            docs.len(),
            limits.max_inputs
        );
        return error(StatusCode::BAD_REQUEST, &msg, "invalid_documents");
    }
    let longest = std::iter::once(query).chain(docs.iter().map(String::as_str)).map(|t| t.chars().count()).max();
    if let Some(n) = longest.filter(|&n| n > limits.max_chars) {
        let msg = format!("a text has {n} characters; this server takes at most {} (--max-chars)", limits.max_chars);
        return error(StatusCode::BAD_REQUEST, &msg, "invalid_documents");
    }
    let top_n = match &req["top_n"] {
        Value::Null => docs.len(),
        v => match v.as_u64().filter(|&n| n >= 1) {
            Some(n) => (n as usize).min(docs.len()),
            None => {
                return error(StatusCode::BAD_REQUEST, "`top_n` must be a whole number of at least 1", "invalid_top_n");
            }
        },
    };
    let return_documents = match &req["return_documents"] {
        Value::Null => false,
        Value::Bool(b) => *b,
        other => {
            let msg = format!("`return_documents` must be true or false, not {}", type_name(other));
            return error(StatusCode::BAD_REQUEST, &msg, "invalid_return_documents");
        }
    };
    match app.svc.rerank(query, &docs).await {
        Ok((r, logits)) => {
            let mut order: Vec<usize> = (0..docs.len()).collect();
            order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
            let results: Vec<Value> = order
                .into_iter()
                .take(top_n)
                .map(|i| {
                    let mut hit = json!({ "index": i, "relevance_score": crate::bert::cross::relevance(logits[i]) });
                    if return_documents {
                        hit["document"] = json!({ "text": docs[i] });
                    }
                    hit
                })
                .collect();
            let tokens: usize = docs.iter().map(|d| r.encoder.count_tokens(query, d)).sum();
            let label = r.label();
            let body = json!({
                "id": format!("rerank-{}", chrono::Utc::now().timestamp_micros()),
                "results": results,
                "model": label,
                "meta": { "api_version": { "version": "1" }, "billed_units": { "search_units": 1 }, "tokens": { "input_tokens": tokens } },
            });
            if docs.iter().map(String::len).sum::<usize>() > RELEASE_AFTER_BYTES {
                super::release_free_memory();
            }
            with_model(Json(body).into_response(), &label)
        }
        Err(Error::BadInput { .. }) => error(
            StatusCode::NOT_FOUND,
            "no reranker is served: train one (`retriever: reranker` in a train stage) and run the workflow",
            "model_not_found",
        ),
        Err(e) => failed(&e),
    }
}

async fn healthz(State(app): State<App>) -> Response {
    let label = app.svc.live().default_served().label();
    with_model(Json(json!({ "status": "ok", "model": label })).into_response(), &label)
}

async fn metrics(State(app): State<App>) -> Response {
    let text = app.svc.metrics.render(&app.svc.black_box_counts(), &app.svc.live().default_served().label());
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
}

async fn not_found() -> Response {
    error(
        StatusCode::NOT_FOUND,
        "no such endpoint: flow serve has /v1/embeddings, /v1/models, /v1/search, /v1/rerank, /healthz and /metrics",
        "not_found",
    )
}
