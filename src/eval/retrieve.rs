//! The retrievers an eval stage compares (bm25, black_box, augment_only, mafin, hybrid, rerank): each ranks an
//! eval set's corpus for its queries, embedding the corpus block by block through the vector cache.

use std::path::Path;

use super::set::EvalSet;
use crate::error::{Error, Result};
use crate::llm::embed::BlackBox;
use crate::progress::StageProgress;
use crate::rank::search::{BLOCK, TopK};
use crate::retriever::hybrid::{Chosen, Hybrid, LabelFree, validated_alpha};
use crate::retriever::params::RetrievalParams;
use crate::retriever::{self, ALL, Kind, PassageMode, Passages, Upstream, combine, trained_beside};
use crate::store::Store;
use crate::store::models::ModelRow;
use crate::train::Retriever;
use crate::workflow::Workflow;

/// What the retrievers of one eval stage share: the workflow, the store and where to account for
/// embedding calls.
pub struct Ctx<'a> {
    pub wf: &'a Workflow,
    pub store: &'a Store,
    /// Who the black box's calls are made for.
    pub account: &'a crate::llm::Account,
    pub progress: &'a StageProgress,
    /// `models:` key of the black box, and the black box itself once a retriever has needed it
    /// (loaded once per stage run: its weights are read and hashed on load).
    pub black_box: &'a str,
    pub black_box_model: &'a std::sync::OnceLock<BlackBox>,
    /// Count passages searched as the stage's items (eval_recall) or not (eval_rag counts answers).
    pub count_items: bool,
    /// Where trained retrievers embed.
    pub device: crate::workflow::Device,
    /// What `hybrid` fuses, and how.
    pub hybrid: &'a Hybrid,
    pub passages: Passages,
    /// The judged pairs upstream: where a hybrid with no train stage chooses its alpha.
    pub pairs: &'a crate::store::pairs::PairSource,
    /// The train stages upstream (where `rerank` finds its first stage's dense model).
    pub train_stages: &'a [String],
    /// How many first-stage documents `rerank` reranks (None: what its training validated).
    pub rerank_k: Option<usize>,
}

impl Ctx<'_> {
    fn black_box(&self) -> Result<&BlackBox> {
        if let Some(b) = self.black_box_model.get() {
            return Ok(b);
        }
        let loaded = BlackBox::load(self.wf, self.black_box)?;
        Ok(self.black_box_model.get_or_init(|| loaded))
    }
}

impl Ctx<'_> {
    /// Where the retrievers embedded (the black box, once loaded; the trained models' device), for
    /// the stage's log and summary: `device: auto` picks the GPU of a CUDA build where there is one.
    pub fn devices(&self) -> serde_json::Value {
        let black_box = self.black_box_model.get().map(|b| match b.encoder() {
            Some(e) => crate::models::device_name(e.device()),
            None => "api".to_string(),
        });
        let trained = crate::models::device(self.device).map(|d| crate::models::device_name(&d)).ok();
        serde_json::json!({ "black_box": black_box, "trained": trained, "chosen": self.device.to_string() })
    }
}

/// A retriever's ranking of the set: each query's best (document index, score), and for hybrid
/// the alpha it fused with.
pub struct Ranked {
    pub hits: Vec<Vec<(usize, f32)>>,
    pub hybrid: Option<Chosen>,
    /// For rerank: the cross-encoder's milliseconds per query (tokenizing and scoring its pairs).
    pub rerank_ms: Option<f64>,
}

/// Each query's `k` best (document index, score) under `kind`. For hybrid, `model` is the dense
/// side's model (for the black box: the newest upstream model, which holds its alpha).
pub async fn rank(cx: &Ctx<'_>, set: &EvalSet, kind: Kind, model: Option<&ModelRow>, k: usize) -> Result<Ranked> {
    match kind {
        Kind::Bm25 => Ok(Ranked { hits: bm25(cx, set, k), hybrid: None, rerank_ms: None }),
        Kind::Hybrid => {
            let h = cx.hybrid;
            // The dense side counts the passages searched; BM25 is the same passages again.
            let lexical = bm25(&Ctx { count_items: false, ..*cx }, set, crate::rank::fuse::DEPTH);
            let dense_model = model.filter(|_| h.dense.trained().is_some());
            let dense = dense(cx, set, h.dense, dense_model, crate::rank::fuse::DEPTH).await?;
            let unvalidated = h.needs_training() && validated_alpha(h.dense, model).is_none();
            let label_free = if unvalidated { label_free_alpha(cx, h.dense, dense_model).await? } else { None };
            let (hits, chosen) =
                crate::retriever::hybrid::fuse(h, model, label_free, &lexical, &dense, &set.relevant, k)?;
            cx.progress.log(&chosen.label());
            Ok(Ranked { hits, hybrid: Some(chosen), rerank_ms: None })
        }
        Kind::Rerank => rerank(cx, set, model, k).await,
        _ => Ok(Ranked { hits: dense(cx, set, kind, model, k).await?, hybrid: None, rerank_ms: None }),
    }
}

/// `model`'s cross-encoder over the hybrid's top `rerank_k`, blended with the hybrid at the weight its
/// validation chose; past `rerank_k`, the hybrid's order. The hybrid's dense side is the newest
/// upstream model of its kind, or for the black box the reranker's own row (its training chose the
/// black box's alpha on its split).
async fn rerank(cx: &Ctx<'_>, set: &EvalSet, model: Option<&ModelRow>, k: usize) -> Result<Ranked> {
    let model = model.ok_or_else(|| Error::internal("rerank was scored without its model"))?;
    let first_model = match cx.hybrid.dense.trained() {
        Some(_) => retriever::newest(cx.store, cx.train_stages, cx.hybrid.dense).await?,
        None => Some(model.clone()),
    };
    let first = Box::pin(rank(cx, set, Kind::Hybrid, first_model.as_ref(), crate::rank::fuse::DEPTH)).await?;
    let depth = retriever::rerank_k(model, cx.rerank_k);
    let blend = model.alpha.unwrap_or(1.0);
    cx.progress.message(&format!("rerank: scoring the top {depth} of each query with model {}", model.id));
    let dir = Path::new(&model.path).to_path_buf();
    let enc = tokio::task::block_in_place(|| {
        crate::bert::cross::CrossEncoder::load(&dir, None, crate::bert::Products::auto())
    })?;
    let started = std::time::Instant::now();
    let scores = tokio::task::block_in_place(|| -> Result<Vec<Vec<f32>>> {
        set.queries
            .iter()
            .zip(&first.hits)
            .map(|(q, hits)| {
                let pairs: Vec<(&str, &str)> =
                    hits.iter().take(depth).map(|&(d, _)| (q.as_str(), set.docs[d].as_str())).collect();
                enc.score(&pairs)
            })
            .collect()
    })?;
    let ms = started.elapsed().as_secs_f64() * 1000.0 / set.queries.len().max(1) as f64;
    let mut hits = crate::train::rerank::reranked(&first.hits, &scores, depth, blend);
    hits.iter_mut().for_each(|h| h.truncate(k));
    cx.progress.log(&format!(
        "rerank: model {} over the top {depth} of {}, blended with it at {blend:.2}; {ms:.0} ms per query ({})",
        model.id,
        first.hybrid.as_ref().map_or("hybrid".to_string(), |c| c.label()),
        crate::bert::Products::auto().name()
    ));
    Ok(Ranked { hits, hybrid: first.hybrid, rerank_ms: Some(ms) })
}

/// Where no train stage chose the hybrid's alpha: the alpha the judge-accepted pairs upstream choose
/// (label-free), with how many queries chose it. Nothing was trained on those pairs, so all of them
/// validate: each query over its passage and up to `data::MAX_DISTRACTORS` other live chunks. With
/// fewer than `MIN_BLEND_QUERIES` queries the choice is one side (`best_alpha`). None without pairs.
async fn label_free_alpha(cx: &Ctx<'_>, dense_kind: Kind, model: Option<&ModelRow>) -> Result<Option<LabelFree>> {
    if cx.pairs.is_empty() {
        return Ok(None);
    }
    let accepted = crate::store::pairs::accepted(cx.store, cx.pairs).await?;
    if accepted.is_empty() {
        return Ok(None);
    }
    cx.progress.message("hybrid: choosing alpha on the accepted pairs");
    let examples: Vec<crate::train::data::Example> = accepted
        .into_iter()
        .map(|a| crate::train::data::Example { query: a.query, positive: a.passage, doc: a.document, negative: None })
        .collect();
    let chunks: Vec<String> =
        crate::store::documents::live_chunks(cx.store).await?.into_iter().map(|(_, text)| text).collect();
    let seed = crate::train::params::Params::default().seed;
    let rs = crate::train::data::retrieval_set(&examples, &[], &chunks, seed);
    let set = EvalSet { queries: rs.queries, docs: rs.corpus, relevant: rs.relevant, ..Default::default() };
    let quiet = Ctx { count_items: false, ..*cx };
    let lexical = bm25(&quiet, &set, crate::rank::fuse::DEPTH);
    let dense = dense(&quiet, &set, dense_kind, model, crate::rank::fuse::DEPTH).await?;
    let (alpha, ndcg) = crate::rank::fuse::best_alpha(&lexical, &dense, &set.relevant);
    Ok(Some(LabelFree { alpha, queries: set.queries.len(), ndcg }))
}

fn bm25(cx: &Ctx<'_>, set: &EvalSet, k: usize) -> Vec<Vec<(usize, f32)>> {
    cx.progress.message("bm25: indexing");
    // In place rather than on a blocking task: that would need its own copy of the corpus.
    let hits = tokio::task::block_in_place(|| {
        let mut index = crate::rank::bm25::Bm25::default();
        for d in &set.docs {
            index.add(d);
        }
        index.search(&set.queries, k)
    });
    if cx.count_items {
        cx.progress.done(set.docs.len() as u64);
    }
    hits
}

/// A dense retriever's top `k`: queries embedded, then the corpus block by block.
async fn dense(
    cx: &Ctx<'_>,
    set: &EvalSet,
    kind: Kind,
    model: Option<&ModelRow>,
    k: usize,
) -> Result<Vec<Vec<(usize, f32)>>> {
    let black_box = match kind {
        Kind::BlackBox | Kind::Mafin => Some(cx.black_box()?),
        _ => None,
    };
    let augment = match model {
        Some(m) if kind.trained().is_some() => {
            let name = format!("model {} at {}", m.id, m.path);
            Some(BlackBox::local(Path::new(&m.path), &name, None, cx.device, crate::workflow::Precision::Auto)?)
        }
        _ => None,
    };
    if kind == Kind::Mafin
        && let (Some(m), Some(bb)) = (model, &black_box)
    {
        trained_beside(m, bb, cx.black_box)?;
    }
    let weight = model.map_or(0.5, |m| m.weight);
    let rows = async |texts: &[String]| -> Result<Vec<f32>> {
        let bb = match &black_box {
            Some(b) => Some(b.embed(cx.wf, cx.store, cx.account, texts).await?),
            None => None,
        };
        let aug = match &augment {
            Some(a) => Some(a.embed(cx.wf, cx.store, cx.account, texts).await?),
            None => None,
        };
        combine(kind, bb, aug, weight)
    };
    cx.progress.message(&format!("{}: queries", kind.name()));
    let q = rows(&set.queries).await?;
    let dim = q.len() / set.queries.len().max(1);
    let mut top = TopK::new(&q, dim, k).map_err(search_error)?;
    // MaxP cuts with the smallest window among the encoders the rows are made of.
    let splitter = [black_box.and_then(BlackBox::encoder), augment.as_ref().and_then(BlackBox::encoder)]
        .into_iter()
        .flatten()
        .map(|e| &e.splitter)
        .min_by_key(|s| s.window)
        .filter(|_| cx.passages.mode == PassageMode::Maxp);
    let mut passages_total = 0usize;
    for (i, block) in set.docs.chunks(BLOCK).enumerate() {
        cx.progress.message(&format!("{}: corpus block {}", kind.name(), i + 1));
        let first_doc = i * BLOCK;
        let (texts, owners): (Vec<String>, Vec<usize>) = match splitter {
            Some(sp) => {
                let (texts, owners) = tokio::task::block_in_place(|| sp.split_all(block, cx.passages.stride))?;
                (texts, owners.into_iter().map(|o| first_doc + o).collect())
            }
            None => (block.to_vec(), (first_doc..first_doc + block.len()).collect()),
        };
        passages_total += texts.len();
        let d = rows(&texts).await?;
        if d.len() != texts.len() * dim {
            return Err(Error::bad_input(
                format!("{}: passage vectors are not {dim} wide like the queries'", kind.name()),
                "the `embeddings` cache holds vectors of another width under this model's name; delete those rows (or the store) and run again",
            ));
        }
        top = tokio::task::spawn_blocking(move || top.push_grouped(&d, &owners).map(|_| top))
            .await
            .map_err(Error::task("the search task"))?
            .map_err(search_error)?;
        if cx.count_items {
            cx.progress.done(block.len() as u64);
        }
    }
    if passages_total > set.docs.len() {
        cx.progress.log(&format!(
            "{}: {} documents longer than the window were scored by their best passage ({passages_total} passages embedded for {} documents)",
            kind.name(),
            passages_total - set.docs.len(),
            set.docs.len()
        ));
    }
    Ok(top.finish())
}

fn search_error(e: candle_core::Error) -> Error {
    Error::Tensor { what: "search".into(), source: e }
}

/// What an eval stage resolves when it is built: where its set comes from, the retrievers it
/// compares, and the train stages upstream of it.
pub struct Plan {
    pub up: Upstream,
    pub source: super::set::Source,
    pub retrievers: Vec<Kind>,
    pub black_box: String,
    pub hybrid: Hybrid,
    pub passages: Passages,
    /// The judged pairs upstream (the synthetic set's, and a hybrid's label-free alpha's).
    pub pairs: crate::store::pairs::PairSource,
    pub rerank_k: Option<usize>,
}

impl Plan {
    /// `listed` retrievers, else bm25, black_box, what upstream trains, and hybrid when there is a
    /// train stage upstream (its alpha is chosen on that stage's validation split) or a judge (on
    /// the pairs it accepted).
    pub fn new(
        spec: &crate::workflow::StageSpec,
        wf: &Workflow,
        set: &super::set::SetParams,
        pairs: crate::store::pairs::PairSource,
        c: RetrievalParams,
    ) -> Result<Plan> {
        let up = Upstream::of(wf, Some(&spec.name));
        let source = super::set::Source::new(set, &wf.dir, up.split, pairs.clone())?;
        let hybrid = Hybrid::new(&c.hybrid, &up.trained);
        let retrievers = match &c.retrievers {
            Some(l) => l.clone(),
            None => ALL
                .into_iter()
                .filter(|k| match k {
                    // Its alpha comes from a train stage's validation, else the accepted pairs upstream.
                    Kind::Hybrid => !up.trained.is_empty() || !hybrid.needs_training() || !pairs.is_empty(),
                    k => k.trained().is_none() || up.trained.contains(k),
                })
                .collect(),
        };
        Ok(Plan {
            up,
            source,
            retrievers,
            black_box: c.black_box,
            hybrid,
            passages: c.passages,
            pairs,
            rerank_k: c.rerank_k,
        })
    }

    /// The training retriever whose models `kind` uses (hybrid: its dense side's).
    pub fn trained_of(&self, kind: Kind) -> Option<Retriever> {
        self.hybrid.trained_of(kind)
    }

    /// The part of the stage's fingerprint the plan decides: the set's files, the retrievers and the
    /// black box's settings.
    pub async fn inputs(&self, wf: &Workflow) -> Result<String> {
        let src = self.source.clone();
        let digest = tokio::task::spawn_blocking(move || src.files_digest())
            .await
            .map_err(Error::task("hashing the eval set"))??;
        let bb = wf
            .models
            .get(&self.black_box)
            .map(|m| format!("{:?}|{:?}|{:?}|{:?}", m.provider, m.model, m.base_url, m.max_seq_length));
        // A hybrid may choose its alpha on the accepted pairs upstream: which judges' is a setting.
        let hybrid = self.retrievers.iter().any(|k| k.over_hybrid()).then_some((&self.hybrid, &self.pairs));
        let rerank_k = self.retrievers.contains(&Kind::Rerank).then_some(self.rerank_k);
        Ok(format!(
            "{digest}|{:?}|{:?}|{bb:?}|{hybrid:?}|{:?}|{rerank_k:?}",
            self.source, self.retrievers, self.passages
        ))
    }

    /// The model of each retriever (None for bm25 and black_box); a trained retriever with no model,
    /// or whose folder is gone, is an input error.
    pub async fn models(&self, store: &Store, stage: &str) -> Result<Vec<Option<ModelRow>>> {
        let mut out = Vec::new();
        for &k in &self.retrievers {
            let m = match (k, self.trained_of(k)) {
                (_, Some(r)) => retriever::newest(store, &self.up.train_stages, Kind::of_trained(r)).await?,
                // Hybrid over the black box: the newest upstream model holds the black box's alpha.
                (Kind::Hybrid, None) => retriever::alpha_holder(store, &self.up).await?,
                _ => None,
            };
            if self.trained_of(k).is_some() && m.is_none() {
                return Err(Error::bad_input(
                    format!("stage `{stage}`: no trained model for retriever `{}`", k.name()),
                    format!(
                        "add a train stage with `retriever: {}` to this stage's `needs:`, or drop `{}` from `retrievers:`",
                        self.trained_of(k).map_or(k.name(), |r| r.name()),
                        k.name()
                    ),
                ));
            }
            if let Some(m) = m.as_ref().filter(|_| self.trained_of(k).is_some())
                && !retriever::model_on_disk(m)
            {
                return Err(Error::bad_input(
                    format!("stage `{stage}`: model {} ({}) is missing from {}", m.id, k.name(), m.path),
                    "rerun its train stage with `flow run WORKFLOW --force STAGE`, or drop the retriever",
                ));
            }
            out.push(m);
        }
        Ok(out)
    }
}

/// A retriever's mean metrics over the set, at every cut-off in `metrics::KS` (and for hybrid, the
/// alpha it used).
pub async fn metrics_of(
    cx: &Ctx<'_>,
    set: &EvalSet,
    kind: Kind,
    model: Option<&ModelRow>,
) -> Result<(std::collections::BTreeMap<String, f64>, Option<Chosen>)> {
    let ks = crate::rank::metrics::KS;
    let ranked = rank(cx, set, kind, model, *ks.last().expect("cut-offs")).await?;
    let per_query: Vec<_> = ranked
        .hits
        .iter()
        .zip(&set.relevant)
        .map(|(h, rel)| crate::rank::metrics::query_metrics(&h.iter().map(|x| x.0).collect::<Vec<_>>(), rel, ks))
        .collect();
    let mut m = crate::rank::metrics::mean(&per_query);
    if let (Some(ms), Some(model)) = (ranked.rerank_ms, model) {
        m.insert("rerank_ms_per_query".into(), ms);
        m.insert("rerank_k".into(), retriever::rerank_k(model, cx.rerank_k) as f64);
    }
    Ok((m, ranked.hybrid))
}
