//! A workflow's retrievers in use: `flow serve`, `flow search` and `flow embed` load the promoted models
//! from the store, embed through the `embeddings` cache exactly as the eval stages do, and swap in newly promoted ones.

pub mod batch;
pub mod http;
pub mod index;
pub mod metrics;
pub mod output;
mod rerank;

use std::path::Path;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio::sync::OnceCell;

use self::batch::{Batcher, Shared, Window};
use self::index::{Corpus, Dense};
use self::metrics::{BlackBoxCounts, Metrics};
pub use self::rerank::Reranker;
use crate::error::{Error, Result};
use crate::llm::Account;
use crate::llm::embed::BlackBox;
use crate::rank::fuse::{self, Fusion};
use crate::retriever::hybrid::validated_alpha;
use crate::retriever::{self, Kind, TRAINED_DENSE, Upstream};
use crate::store::models::{self as models_table, ModelRow};
use crate::store::{Store, documents};
use crate::workflow::Precision;
use crate::workflow::{Device, Workflow};

/// Where a trained retriever's vectors come from: its model folder behind its own queue.
struct Augment {
    encoder: Arc<BlackBox>,
    batch: Batcher,
}

/// One retriever being served: its kind, its model (None for the black box) and, once searched,
/// its rows over the live chunks.
pub struct Served {
    pub kind: Kind,
    pub model: Option<ModelRow>,
    augment: Option<Arc<Augment>>,
    dense: OnceCell<Arc<Dense>>,
}

impl Served {
    /// `mafin@7`, or `black_box`: what the response header and `/v1/models` say.
    pub fn label(&self) -> String {
        match &self.model {
            Some(m) => format!("{}@{}", self.kind.name(), m.id),
            None => self.kind.name().to_string(),
        }
    }

    fn weight(&self) -> f64 {
        self.model.as_ref().map_or(0.5, |m| m.weight)
    }
}

/// What the server answers with until the next swap.
pub struct Live {
    pub retrievers: Vec<Arc<Served>>,
    /// The retriever embeddings are answered with (a dense one).
    pub default: Kind,
    /// The reranker (the promoted one, else the newest), if one was trained.
    pub reranker: Option<Arc<Reranker>>,
    /// What a search without `retriever` uses: rerank once a reranker is promoted, else `default`.
    pub search_default: Kind,
    models_stamp: String,
    corpus: OnceCell<Arc<Corpus>>,
}

impl Live {
    /// The retriever `name` names (`""` or `default`: the default one).
    pub fn find(&self, name: &str) -> Option<&Arc<Served>> {
        let kind = match name {
            "" | "default" => self.default,
            n => self.retrievers.iter().map(|s| s.kind).find(|k| k.name() == n)?,
        };
        self.retrievers.iter().find(|s| s.kind == kind)
    }

    pub fn names(&self) -> Vec<&'static str> {
        let mut names: Vec<&'static str> = self.retrievers.iter().map(|s| s.kind.name()).collect();
        if self.reranker.is_some() {
            names.push(Kind::Rerank.name());
        }
        names
    }

    pub fn default_served(&self) -> &Arc<Served> {
        self.find("").expect("the default retriever is served")
    }
}

pub struct Options {
    pub window: Window,
    /// How often the store is checked for a newly promoted model or changed chunks.
    pub poll: Duration,
}

pub struct Service {
    pub wf: Arc<Workflow>,
    pub store: Store,
    black_box_key: String,
    black_box: Arc<BlackBox>,
    bb_batch: Batcher,
    train_stages: Vec<String>,
    device: Device,
    window: Window,
    live: RwLock<Arc<Live>>,
    pub metrics: Arc<Metrics>,
    /// One reload at a time.
    reloading: tokio::sync::Mutex<()>,
}

/// Vectors of one request and the retriever that made them.
pub struct Embedded {
    pub vectors: Vec<Vec<f32>>,
    pub served: Arc<Served>,
    /// Tokens the black box (else the augment model) read, by its tokenizer where flow has it.
    pub tokens: u64,
}

/// One search hit: the chunk and its score under the retriever.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Hit {
    pub rank: usize,
    pub score: f32,
    pub chunk_id: i64,
    pub document: String,
    pub title: Option<String>,
    pub page: Option<i64>,
    pub text: String,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Found {
    /// The retriever asked for, and the model(s) behind it (`mafin@7`; hybrid: its dense side's).
    pub retriever: &'static str,
    pub model: String,
    /// How hybrid fused (None for the others).
    pub fusion: Option<String>,
    pub hits: Vec<Hit>,
}

impl Service {
    /// Loads the workflow's black box and its newest promoted (else newest) trained models.
    pub async fn start(wf: Workflow, store: Store, opts: Options) -> Result<Arc<Service>> {
        let up = Upstream::of(&wf, None);
        let (train_stages, device) = (up.train_stages, up.device);
        let black_box_key = up.black_box.unwrap_or_else(crate::retriever::params::default_black_box);
        let black_box = Arc::new(BlackBox::load(&wf, &black_box_key)?);
        let wf = Arc::new(wf);
        let metrics = Arc::new(Metrics::default());
        let shared = Shared { wf: wf.clone(), store: store.clone(), metrics: metrics.clone() };
        let bb_batch = Batcher::spawn(black_box.clone(), "black_box", opts.window, shared);
        let placeholder = Live {
            retrievers: Vec::new(),
            default: Kind::BlackBox,
            reranker: None,
            search_default: Kind::BlackBox,
            models_stamp: String::new(),
            corpus: OnceCell::new(),
        };
        let svc = Arc::new(Service {
            wf,
            store,
            black_box_key,
            black_box,
            bb_batch,
            train_stages,
            device,
            window: opts.window,
            live: RwLock::new(Arc::new(placeholder)),
            metrics,
            reloading: tokio::sync::Mutex::new(()),
        });
        let first = svc.load(None).await?;
        *svc.live.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(first);
        let watcher = svc.clone();
        let poll = opts.poll;
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(poll).await;
                if let Err(e) = watcher.refresh().await {
                    log(&format!("could not check for a newly promoted model: {e}"));
                }
            }
        });
        Ok(svc)
    }

    /// What requests are answered with now; a request keeps its copy to the end, so a swap never
    /// changes a model under it.
    pub fn live(&self) -> Arc<Live> {
        self.live.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn black_box_counts(&self) -> BlackBoxCounts {
        use std::sync::atomic::Ordering::Relaxed;
        let s = &self.black_box.stats;
        BlackBoxCounts {
            cached: s.cached.load(Relaxed),
            computed: s.computed.load(Relaxed),
            calls: s.calls.load(Relaxed),
        }
    }

    /// The models stamp: every model of the workflow's train stages with its status.
    async fn models_stamp(&self) -> Result<(String, Vec<ModelRow>)> {
        let all: Vec<ModelRow> = models_table::list(&self.store)
            .await?
            .into_iter()
            .filter(|m| self.train_stages.is_empty() || self.train_stages.contains(&m.stage))
            .collect();
        let stamp = all.iter().map(|m| format!("{}:{}", m.id, m.status)).collect::<Vec<_>>().join(",");
        Ok((stamp, all))
    }

    /// Swaps in a newly promoted model, or chunks that changed, once they are loaded (and, where the
    /// old one had them, their search rows built): answers never wait on a load.
    pub async fn refresh(&self) -> Result<()> {
        let _one = self.reloading.lock().await;
        let old = self.live();
        let (stamp, _) = self.models_stamp().await?;
        let chunks_changed = match old.corpus.get() {
            Some(c) => documents::live_stamp(&self.store).await? != c.stamp,
            None => false,
        };
        if stamp == old.models_stamp && !chunks_changed {
            return Ok(());
        }
        let new = self.load(Some(&old)).await?;
        if old.corpus.get().is_some() {
            let corpus = self.corpus(&new).await?;
            for s in &new.retrievers {
                let was_built = old.retrievers.iter().any(|o| o.kind == s.kind && o.dense.get().is_some());
                if was_built && s.kind != Kind::Bm25 {
                    self.dense(s, &corpus).await?;
                }
            }
        }
        let (before, after) = (old.default_served().label(), new.default_served().label());
        *self.live.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(new);
        self.metrics.swaps.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        log(&match (before == after, chunks_changed) {
            (false, _) => format!("now serving {after} by default (was {before})"),
            (true, true) => "the chunks changed: search now ranks the new set".to_string(),
            (true, false) => format!("the models changed; still serving {after} by default"),
        });
        Ok(())
    }

    /// The retrievers to serve now: the black box, and for mafin and augment_only the promoted model
    /// (else the newest). A model that cannot be served is left out with a logged reason.
    async fn load(&self, old: Option<&Live>) -> Result<Live> {
        let (models_stamp, all) = self.models_stamp().await?;
        // Chunk rows carry over only while the chunks are the ones they were built over.
        let corpus = OnceCell::new();
        if let Some(c) = old.and_then(|o| o.corpus.get())
            && documents::live_stamp(&self.store).await? == c.stamp
        {
            let _ = corpus.set(c.clone());
        }
        let rows_from = old.filter(|_| corpus.initialized());
        let mut retrievers = vec![Arc::new(Served {
            kind: Kind::BlackBox,
            model: None,
            augment: None,
            dense: reuse_dense(rows_from, Kind::BlackBox, None),
        })];
        let mut default = (Kind::BlackBox, None::<i64>);
        for kind in TRAINED_DENSE {
            let Some((m, promoted)) = retriever::served_model(&all, kind) else { continue };
            if promoted && default.1.is_none_or(|d| m.id > d) {
                default = (kind, Some(m.id));
            }
            if !retriever::model_on_disk(m) {
                log(&format!("{} is not served: model {}'s folder {} is gone", kind.name(), m.id, m.path));
                continue;
            }
            if kind == Kind::Mafin
                && let Err(e) = retriever::trained_beside(m, &self.black_box, &self.black_box_key)
            {
                log(&format!("mafin is not served: {e}"));
                continue;
            }
            let same = old.and_then(|o| {
                o.retrievers.iter().find(|s| s.kind == kind && s.model.as_ref().map(|x| x.id) == Some(m.id))
            });
            let augment = match same.and_then(|s| s.augment.clone()) {
                Some(a) => a,
                None => Arc::new(self.load_augment(m).await?),
            };
            retrievers.push(Arc::new(Served {
                kind,
                model: Some(m.clone()),
                augment: Some(augment),
                dense: reuse_dense(rows_from, kind, Some(m.id)),
            }));
        }
        if !retrievers.iter().any(|s| s.kind == default.0) {
            default.0 = Kind::BlackBox;
        }
        let mut search_default = default.0;
        let reranker = match retriever::served_model(&all, Kind::Rerank) {
            Some((m, _)) if !retriever::model_on_disk(m) => {
                log(&format!("rerank is not served: model {}'s folder {} is gone", m.id, m.path));
                None
            }
            Some((m, promoted)) => {
                if promoted {
                    search_default = Kind::Rerank;
                }
                match old.and_then(|o| o.reranker.clone()).filter(|r| r.model.id == m.id) {
                    Some(r) => Some(r),
                    None => Some(Arc::new(self.load_reranker(m).await?)),
                }
            }
            None => None,
        };
        Ok(Live { retrievers, default: default.0, reranker, search_default, models_stamp, corpus })
    }

    async fn load_augment(&self, m: &ModelRow) -> Result<Augment> {
        let (path, name, device) = (m.path.clone(), format!("model {} at {}", m.id, m.path), self.device);
        let encoder = tokio::task::spawn_blocking(move || {
            BlackBox::local(Path::new(&path), &name, None, device, Precision::Auto)
        })
        .await
        .map_err(Error::task("loading a trained model"))??;
        let encoder = Arc::new(encoder);
        let shared = Shared { wf: self.wf.clone(), store: self.store.clone(), metrics: self.metrics.clone() };
        let batch = Batcher::spawn(encoder.clone(), "augment", self.window, shared);
        Ok(Augment { encoder, batch })
    }

    /// The retriever's rows for `texts` (row-major, one per text): through the request batchers
    /// when `batched`, else in one call per encoder (a whole file or index at once).
    pub async fn rows(&self, served: &Served, texts: &[String], batched: bool) -> Result<Vec<f32>> {
        let upstream = |what: &str, e: String| Error::Service {
            what: format!("the {what} failed: {e}"),
            hint: "check the black box (`models.<black box>`) and the store; stored vectors are kept".into(),
        };
        let uses_bb = served.kind.uses_black_box();
        let bb = async {
            match (uses_bb, batched) {
                (false, _) => Ok(None),
                (true, true) => {
                    self.bb_batch.embed(texts.to_vec()).await.map(Some).map_err(|e| upstream("black box", e))
                }
                (true, false) => {
                    self.black_box.embed(&self.wf, &self.store, &Account::outside("serve"), texts).await.map(Some)
                }
            }
        };
        let aug = async {
            match (&served.augment, batched) {
                (None, _) => Ok(None),
                (Some(a), true) => {
                    a.batch.embed(texts.to_vec()).await.map(Some).map_err(|e| upstream("trained model", e))
                }
                (Some(a), false) => {
                    a.encoder.embed(&self.wf, &self.store, &Account::outside("serve"), texts).await.map(Some)
                }
            }
        };
        let (bb, aug) = tokio::try_join!(bb, aug)?;
        retriever::combine(served.kind, bb, aug, served.weight())
    }

    /// Vectors of `texts` under the retriever `name` (default: the promoted one).
    pub async fn embed(&self, name: &str, texts: Vec<String>, batched: bool) -> Result<Embedded> {
        let live = self.live();
        let served = live.find(name).cloned().ok_or_else(|| unknown_retriever(name, &live))?;
        let rows = self.rows(&served, &texts, batched).await?;
        let dim = rows.len() / texts.len().max(1);
        let vectors = rows.chunks(dim.max(1)).map(<[f32]>::to_vec).collect();
        let tokens = self.tokens(&served, &texts);
        Ok(Embedded { vectors, served, tokens })
    }

    fn tokens(&self, served: &Served, texts: &[String]) -> u64 {
        let enc = match served.kind {
            Kind::AugmentOnly => served.augment.as_ref().and_then(|a| a.encoder.encoder()),
            _ => self.black_box.encoder(),
        };
        texts.iter().map(|t| enc.map_or_else(|| crate::llm::estimate_tokens(t), |e| e.count_tokens(t) as u64)).sum()
    }

    async fn corpus(&self, live: &Live) -> Result<Arc<Corpus>> {
        live.corpus
            .get_or_try_init(|| async {
                let stamp = documents::live_stamp(&self.store).await?;
                let chunks = documents::live_sourced(&self.store).await?;
                log(&format!("search: indexing {} live chunks", chunks.len()));
                tokio::task::spawn_blocking(move || Arc::new(Corpus::new(chunks, stamp)))
                    .await
                    .map_err(Error::task("indexing the chunks"))
            })
            .await
            .cloned()
    }

    /// The retriever's rows over the live chunks, built on first use (from the cache where the
    /// eval stages or an earlier server embedded them).
    async fn dense(&self, served: &Served, corpus: &Corpus) -> Result<Arc<Dense>> {
        served
            .dense
            .get_or_try_init(|| async {
                let texts: Vec<String> = corpus.chunks.iter().map(|c| c.text.clone()).collect();
                // MaxP with the smallest window among the encoders the rows are made of.
                let uses_bb = served.kind.uses_black_box();
                let splitter = [
                    self.black_box.encoder().filter(|_| uses_bb),
                    served.augment.as_ref().and_then(|a| a.encoder.encoder()),
                ]
                .into_iter()
                .flatten()
                .map(|e| e.splitter.clone())
                .min_by_key(|s| s.window);
                let (passages, owners) = match splitter {
                    Some(sp) => tokio::task::spawn_blocking(move || sp.split_all(&texts, None))
                        .await
                        .map_err(Error::task("splitting chunks into passages"))??,
                    None => {
                        let n = texts.len();
                        (texts, (0..n).collect())
                    }
                };
                let mut rows = Vec::new();
                for part in passages.chunks(4096) {
                    rows.extend(self.rows(served, part, false).await?);
                }
                let dim = rows.len() / passages.len().max(1);
                log(&format!("search: {} ready over {} passages", served.label(), passages.len()));
                Ok::<_, Error>(Arc::new(Dense { rows, owners, dim }))
            })
            .await
            .cloned()
    }

    /// The `k` best live chunks for `query` under `name` (a served retriever, `bm25` or `hybrid`).
    pub async fn search(&self, name: &str, query: &str, k: usize) -> Result<Found> {
        let live = self.live();
        let corpus = self.corpus(&live).await?;
        let k = k.max(1);
        let kind = match name {
            "" | "default" => live.search_default,
            n => Kind::parse(n).ok_or_else(|| unknown_retriever(n, &live))?,
        };
        let (model, fusion, hits) = match kind {
            Kind::Bm25 => ("bm25".to_string(), None, self.bm25(&corpus, query, k).await?),
            Kind::Hybrid => {
                let (label, fusion, hits) = self.hybrid_hits(&live, &corpus, query, k).await?;
                (label, Some(fusion), hits)
            }
            Kind::Rerank => {
                let r = live.reranker.clone().ok_or_else(|| unknown_retriever(name, &live))?;
                let (label, fusion, first) = self.hybrid_hits(&live, &corpus, query, fuse::DEPTH).await?;
                let depth = retriever::rerank_k(&r.model, None);
                let texts: Vec<String> =
                    first.iter().take(depth).map(|&(c, _)| corpus.chunks[c].text.clone()).collect();
                let (_, scores) = self.rerank(query, &texts).await?;
                let blend = r.model.alpha.unwrap_or(1.0);
                let mut hits =
                    crate::train::rerank::reranked(&[first], &[scores], depth, blend).pop().unwrap_or_default();
                hits.truncate(k);
                let how = format!("top {depth} of hybrid ({label}, {fusion}), blended with it at {blend:.2}");
                (r.label(), Some(how), hits)
            }
            dense => {
                let served = live.find(dense.name()).cloned().ok_or_else(|| unknown_retriever(name, &live))?;
                let hits = self.dense_hits(&served, &corpus, query, k).await?;
                (served.label(), None, hits)
            }
        };
        let retriever = kind.name();
        let hits = hits
            .into_iter()
            .enumerate()
            .map(|(i, (c, score))| {
                let ch = &corpus.chunks[c];
                Hit {
                    rank: i + 1,
                    score,
                    chunk_id: ch.id,
                    document: ch.document.clone(),
                    title: ch.title.clone().filter(|t| !t.is_empty()),
                    page: ch.page,
                    text: ch.text.clone(),
                }
            })
            .collect();
        Ok(Found { retriever, model, fusion, hits })
    }

    /// The hybrid's top `k`: BM25 fused with the best trained dense retriever served (else the black
    /// box); the dense side's label and how it fused.
    async fn hybrid_hits(
        &self,
        live: &Live,
        corpus: &Arc<Corpus>,
        query: &str,
        k: usize,
    ) -> Result<(String, String, Vec<(usize, f32)>)> {
        let dense = TRAINED_DENSE.into_iter().find_map(|k| live.find(k.name())).unwrap_or(live.default_served());
        let lexical = self.bm25(corpus, query, fuse::DEPTH).await?;
        let semantic = self.dense_hits(dense, corpus, query, fuse::DEPTH).await?;
        let (fusion, alpha, label) = hybrid_alpha(dense, live);
        Ok((dense.label(), label, fuse::fuse(&lexical, &semantic, fusion, alpha, k)))
    }

    async fn bm25(&self, corpus: &Arc<Corpus>, query: &str, k: usize) -> Result<Vec<(usize, f32)>> {
        let (c, q) = (corpus.clone(), vec![query.to_string()]);
        tokio::task::spawn_blocking(move || c.bm25.search(&q, k).pop().unwrap_or_default())
            .await
            .map_err(Error::task("the BM25 search"))
    }

    async fn dense_hits(&self, served: &Served, corpus: &Corpus, query: &str, k: usize) -> Result<Vec<(usize, f32)>> {
        let index = self.dense(served, corpus).await?;
        let q = self.rows(served, &[query.to_string()], true).await?;
        tokio::task::spawn_blocking(move || index.search(&q, k)).await.map_err(Error::task("the dense search"))?
    }
}

/// The dense rows of `kind` from the old set, when they were built for the same model.
fn reuse_dense(old: Option<&Live>, kind: Kind, model: Option<i64>) -> OnceCell<Arc<Dense>> {
    let cell = OnceCell::new();
    if let Some(d) = old
        .and_then(|o| o.retrievers.iter().find(|s| s.kind == kind && s.model.as_ref().map(|m| m.id) == model))
        .and_then(|s| s.dense.get())
    {
        let _ = cell.set(d.clone());
    }
    cell
}

/// Hybrid's fusion: convex with the alpha training chose on validation for this dense side (for the
/// black box, the newest model's black-box alpha), else RRF.
fn hybrid_alpha(dense: &Served, live: &Live) -> (Fusion, f64, String) {
    // For the black box, the newest model holds the alpha its training chose for it.
    let holder = match &dense.model {
        Some(m) => Some(m),
        None => live
            .retrievers
            .iter()
            .filter_map(|s| s.model.as_ref())
            .chain(live.reranker.as_ref().map(|r| &r.model))
            .max_by_key(|m| m.id),
    };
    match validated_alpha(dense.kind, holder) {
        Some((a, id)) => (Fusion::Convex, a, format!("convex alpha {a:.2} from validation (model {id})")),
        None => (Fusion::Rrf, 0.0, format!("rrf k {}: no alpha was chosen on a validation split", fuse::RRF_K)),
    }
}

fn unknown_retriever(name: &str, live: &Live) -> Error {
    Error::bad_input(
        format!("no retriever `{name}` is served"),
        format!("use one of {} (or leave it out for the default, {})", live.names().join(", "), live.default.name()),
    )
}

/// Hands memory the allocator holds free back to the OS (glibc keeps freed heap memory in its arenas,
/// so one large request would otherwise leave the server's resident size high for good).
pub fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free pages; it is safe to call at any time.
    unsafe {
        libc::malloc_trim(0);
    }
}

pub fn log(line: &str) {
    crate::progress::stderr_line(&format!("{} [serve] {line}", chrono::Local::now().format("%H:%M:%S")));
}
