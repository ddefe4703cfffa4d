//! An embedder whose every vector is cached in the `embeddings` table, so none is made twice: a
//! workflow's black box (a local folder or an OpenAI-compatible API), or a trained model's folder.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use super::{EmbeddingProvider, LlmClient};
use crate::bert::encoder::SentenceEncoder;
use crate::digest::sha256_hex;
use crate::error::{Error, Result};
use crate::store::{Store, embeddings};
use crate::workflow::{Provider, Workflow};

enum Backend {
    Local(Arc<SentenceEncoder>),
    Api(Arc<dyn EmbeddingProvider>),
}

pub struct BlackBox {
    backend: Backend,
    /// Names the vectors in the `embeddings` table: endpoint and model, or folder, length and weights hash.
    pub identity: String,
    key: String,
    /// The API client, made on the first request: its usage is the stage's embedding usage.
    client: std::sync::OnceLock<LlmClient>,
    pub stats: Stats,
}

/// What `embed` has done since load: texts found in the cache, texts computed (or paid for), and
/// the encoder calls (API requests) that computed them.
#[derive(Debug, Default)]
pub struct Stats {
    pub cached: AtomicU64,
    pub computed: AtomicU64,
    pub calls: AtomicU64,
}

/// Texts per request to an API, and per batch written to the store.
const BATCH: usize = 64;

impl BlackBox {
    /// The embedder named by `models.<key>`.
    pub fn load(wf: &Workflow, key: &str) -> Result<BlackBox> {
        let spec = super::model_spec(wf, key)?;
        match spec.provider.unwrap_or(Provider::Openai) {
            Provider::Local => {
                let name = spec.model.clone().ok_or_else(|| {
                    Error::bad_input(format!("`models.{key}` names no `model`"), "add `model: all-MiniLM-L6-v2`")
                })?;
                let dir = crate::models::resolve(&name, &wf.dir, "model.safetensors")?;
                BlackBox::local(&dir, &name, spec.max_seq_length, spec.device, spec.precision)
            }
            Provider::Openai => {
                let provider = super::embedding_provider(wf, key)?;
                let id = provider.identity();
                let identity = format!("{}|{}|{}", id.provider, id.base_url, id.model);
                Ok(BlackBox {
                    backend: Backend::Api(provider),
                    identity,
                    key: key.into(),
                    client: Default::default(),
                    stats: Stats::default(),
                })
            }
        }
    }

    /// A local sentence-transformers folder (a black box, or a trained augment model being evaluated).
    pub fn local(
        dir: &std::path::Path,
        name: &str,
        max_seq_length: Option<usize>,
        device: crate::workflow::Device,
        precision: crate::workflow::Precision,
    ) -> Result<BlackBox> {
        let products = crate::bert::Products::of(precision)?;
        let enc = SentenceEncoder::load(dir, max_seq_length, &crate::models::device(device)?, products)?;
        let weights_path = dir.join("model.safetensors");
        // Streamed: all-mpnet-base-v2's 440 MB are not read into memory a second time to be hashed.
        let weights = crate::digest::sha256_file(&weights_path).map_err(Error::io(&weights_path))?;
        let products = enc.products().cache_tag();
        let identity = format!("local|{name}|{}|{}{products}", enc.max_seq_length, &weights[..16]);
        Ok(BlackBox {
            backend: Backend::Local(Arc::new(enc)),
            identity,
            key: name.into(),
            client: Default::default(),
            stats: Stats::default(),
        })
    }

    /// The local encoder (None for an API, whose window flow does not know): what cuts long
    /// documents into passages.
    pub fn encoder(&self) -> Option<&SentenceEncoder> {
        match &self.backend {
            Backend::Local(e) => Some(e),
            Backend::Api(_) => None,
        }
    }

    /// What this black box's API calls cost so far (None for a local model, or before any call).
    pub fn usage(&self) -> Option<crate::store::runs::UsageSnapshot> {
        self.client.get().map(LlmClient::usage)
    }

    /// Vectors for `texts` in order: from the store where there, else computed (or requested) in
    /// batches, each batch stored as soon as it is made.
    pub async fn embed(
        &self,
        wf: &Workflow,
        store: &Store,
        account: &super::Account,
        texts: &[String],
    ) -> Result<Vec<Vec<f32>>> {
        let hashes: Vec<String> = texts.iter().map(|t| sha256_hex(t.as_bytes())).collect();
        let mut unique: Vec<String> = hashes.clone();
        unique.sort();
        unique.dedup();
        let mut have = embeddings::lookup(store, &self.identity, &unique).await?;
        let mut missing: Vec<(String, String)> = Vec::new();
        let mut queued = std::collections::HashSet::new();
        for (t, h) in texts.iter().zip(&hashes) {
            if !have.contains_key(h) && queued.insert(h.as_str()) {
                missing.push((h.clone(), t.clone()));
            }
        }
        if let Backend::Api(p) = &self.backend
            && self.client.get().is_none()
            && !missing.is_empty()
        {
            let _ = self.client.set(super::client(wf, &self.key, p.identity(), store, account)?);
        }
        let client = self.client.get();
        let found = texts.len() - missing.len();
        self.stats.cached.fetch_add(found as u64, Ordering::Relaxed);
        for part in missing.chunks(BATCH) {
            self.stats.calls.fetch_add(1, Ordering::Relaxed);
            self.stats.computed.fetch_add(part.len() as u64, Ordering::Relaxed);
            let batch: Vec<String> = part.iter().map(|(_, t)| t.clone()).collect();
            let vectors = match &self.backend {
                Backend::Local(enc) => {
                    let enc = enc.clone();
                    tokio::task::spawn_blocking(move || enc.embed(&batch, 32))
                        .await
                        .map_err(Error::task("the embedding task"))??
                }
                Backend::Api(p) => {
                    let client: &LlmClient = client.expect("api client");
                    client.embed(p.as_ref(), &batch).await?.map_err(|f| {
                        Error::Service {
                            what: format!("black-box embeddings failed after {} attempts: {}", f.attempts, f.message),
                            hint: "check the embedding server and `models.<black box>`; `flow resume` retries, and stored vectors are kept".into(),
                        }
                    })?
                }
            };
            if vectors.len() != part.len() {
                return Err(Error::Service {
                    what: format!("the black box returned {} vectors for {} texts", vectors.len(), part.len()),
                    hint:
                        "the embedding server's reply is malformed; check its version against the OpenAI embeddings API"
                            .into(),
                });
            }
            let rows: Vec<(String, Vec<f32>)> = part.iter().map(|(h, _)| h.clone()).zip(vectors).collect();
            embeddings::insert(store, &self.identity, &rows).await?;
            have.extend(rows);
        }
        Ok(hashes.iter().map(|h| have[h].clone()).collect())
    }
}
