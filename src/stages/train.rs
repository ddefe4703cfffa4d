//! The `train` stage: accepted pairs from the store and/or a BEIR labelled set train a Mafin augment
//! model beside the black box; the best checkpoint becomes a sentence-transformers folder in `models`.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use async_trait::async_trait;
use serde_json::json;

use super::{Kind, Outcome, Stage, StageCtx};
use crate::digest::{sha256_file, sha256_hex};
use crate::error::{Error, Result};
use crate::llm::embed::BlackBox;
use crate::store::{models as models_table, pairs};
use crate::train::data::{self, Example};
use crate::train::params::{InitFrom, Params};
use crate::train::{self, Event, Retriever, TrainConfig, model::Augment};
use crate::workflow::{CheckCtx, Checked, Diagnostic, StageSpec, Workflow, check_typed, checked};

pub const KIND: Kind = Kind {
    name: crate::train::params::KIND_NAME,
    about: "train a Mafin augment model beside the black-box embedding on accepted pairs and/or a BEIR set",
    check,
    preflight: super::no_preflight,
    build,
};

fn check(cx: &CheckCtx) -> Checked {
    let mut diags = Vec::new();
    let Some(p) = check_typed::<Params>(cx.node, cx.params.clone(), &mut diags) else { return Err(diags) };
    let at = |key: &str| cx.node.get(key).map(|n| n.span()).unwrap_or(cx.node.span());
    let mut bad = |key: &str, what: String, hint: &str| {
        diags.push(Diagnostic::new(at(key), format!("stage `{}`: {what}", cx.stage)).hint(hint.to_string()))
    };
    if p.epochs == 0 || p.batch_size < 2 || p.grad_accum == 0 {
        bad(
            "epochs",
            "epochs and grad_accum must be at least 1, batch_size at least 2".into(),
            "e.g. epochs: 1, batch_size: 32",
        );
    }
    if !(p.lr > 0.0 && p.lr < 1.0) {
        bad("lr", format!("lr {} is out of range", p.lr), "2.0e-5 is usual for BERT");
    }
    if !(0.0..1.0).contains(&p.dropout) {
        bad("dropout", format!("dropout {} is not a probability below 1", p.dropout), "dropout: 0.1 is BERT's");
    }
    if !(0.0..1.0).contains(&p.warmup) || !(0.0..1.0).contains(&p.val_fraction) {
        bad("warmup", "warmup and val_fraction are shares from 0 to below 1".into(), "warmup: 0.1, val_fraction: 0.1");
    }
    if p.weight.fixed().is_some_and(|w| w <= 0.0) || p.scale <= 0.0 {
        bad("weight", "weight and scale must be positive".into(), "weight: auto (or 0.5, the paper's) and scale: 20");
    }
    if !cx.models.contains_key(&p.augment) {
        bad(
            "augment",
            format!("uses `models.{}`, which is not defined", p.augment),
            "add `augment: { init: all-MiniLM-L6-v2 }` under `models:`",
        );
    }
    if p.retriever == Retriever::Reranker && (p.negatives == 0 || p.rerank_k == 0) {
        bad(
            "negatives",
            "a reranker needs at least 1 negative per query and a rerank_k of at least 1".into(),
            "negatives: 7, rerank_k: 30",
        );
    }
    if !(0.0..1.0).contains(&p.relative_margin) {
        bad(
            "relative_margin",
            format!("relative_margin {} is not a share below 1", p.relative_margin),
            "relative_margin: 0.05",
        );
    }
    let needs_bb = matches!(p.retriever, Retriever::Mafin | Retriever::Reranker) || p.hard_negatives > 0;
    if needs_bb && !cx.models.contains_key(&p.black_box) {
        bad(
            "black_box",
            format!("uses `models.{}`, which is not defined", p.black_box),
            "add `black_box: { provider: local, model: all-MiniLM-L6-v2 }`",
        );
    }
    checked(&p, diags)
}

fn build(spec: &StageSpec, wf: &Workflow) -> Result<Box<dyn Stage>> {
    let params: Params = spec.params()?;
    let aug_spec = crate::llm::model_spec(wf, &params.augment)?;
    let init = aug_spec.init.clone().or_else(|| aug_spec.model.clone()).ok_or_else(|| {
        Error::bad_input(format!("`models.{}` names no `init:` model", params.augment), "add `init: all-MiniLM-L6-v2`")
    })?;
    let init_dir = crate::models::resolve(&init, &wf.dir, "model.safetensors")?;
    let beir = params.beir.as_ref().map(|b| wf.dir.join(b));
    if let Some(b) = &beir
        && !b.join("corpus.jsonl").exists()
    {
        return Err(Error::bad_input(
            format!("stage `{}`: {} has no corpus.jsonl", spec.name, b.display()),
            "`beir:` names a BEIR folder (corpus.jsonl, queries.jsonl, qrels/<split>.tsv) relative to the workflow",
        ));
    }
    let pairs = super::pair_source(spec, wf);
    let use_pairs = params.pairs.unwrap_or(!pairs.is_empty());
    if use_pairs && pairs.is_empty() {
        return Err(Error::bad_input(
            format!("stage `{}` learns from accepted pairs, but no judge stage is upstream of it", spec.name),
            "add the judge stage whose accepted pairs it should learn from to `needs:`, or set `pairs: false`",
        ));
    }
    if !use_pairs && beir.is_none() {
        return Err(Error::bad_input(
            format!("stage `{}` has nothing to learn from", spec.name),
            "add `needs: [judge]` for the accepted pairs, or `beir: PATH` for a labelled set",
        ));
    }
    Ok(Box::new(Train {
        name: spec.name.clone(),
        wf: Arc::new(wf.clone()),
        max_seq_length: aug_spec.max_seq_length,
        augment_device: aug_spec.device,
        params,
        init_dir,
        beir,
        use_pairs,
        pairs,
        init_hash: std::sync::OnceLock::new(),
    }))
}

struct Train {
    name: String,
    wf: Arc<Workflow>,
    params: Params,
    init_dir: PathBuf,
    max_seq_length: Option<usize>,
    /// `models.<augment>.device`, where training runs unless the stage says `device:`.
    augment_device: crate::workflow::Device,
    beir: Option<PathBuf>,
    use_pairs: bool,
    /// The judge and generate stages whose accepted pairs it learns from.
    pairs: pairs::PairSource,
    init_hash: std::sync::OnceLock<String>,
}

impl Train {
    fn needs_black_box(&self) -> bool {
        matches!(self.params.retriever, Retriever::Mafin | Retriever::Reranker) || self.params.hard_negatives > 0
    }

    /// The pairs to learn from, and the rest of the corpus they come from (validation's distractors:
    /// the live chunks for store pairs, every document of a BEIR set).
    async fn examples(&self, ctx: &StageCtx) -> Result<(Vec<Example>, Vec<String>)> {
        let (mut out, mut corpus) = (Vec::new(), Vec::new());
        if self.use_pairs {
            for a in pairs::accepted(&ctx.store, &self.pairs).await? {
                out.push(Example { query: a.query, positive: a.passage, doc: a.document, negative: None });
            }
            corpus.extend(crate::store::documents::live_chunks(&ctx.store).await?.into_iter().map(|c| c.1));
        }
        if let Some(dir) = &self.beir {
            let (dir, split) = (dir.clone(), self.params.split.clone());
            let set = tokio::task::spawn_blocking(move || crate::beir::load(&dir, &split))
                .await
                .map_err(Error::task("reading the BEIR set"))??;
            for &(q, d, _) in &set.qrels {
                out.push(Example {
                    query: set.query_texts[q].clone(),
                    positive: set.doc_texts[d].clone(),
                    doc: format!("beir:{}", set.doc_ids[d]),
                    negative: None,
                });
            }
            corpus.extend(set.doc_texts);
        }
        Ok((out, corpus))
    }
}

#[async_trait]
impl Stage for Train {
    async fn inputs(&self) -> Result<String> {
        let init = self.init_dir.join("model.safetensors");
        let beir = self.beir.clone();
        let split = self.params.split.clone();
        let parts = tokio::task::spawn_blocking(move || -> Result<Vec<String>> {
            let mut files = vec![init];
            if let Some(b) = beir {
                files.extend(["corpus.jsonl", "queries.jsonl", &format!("qrels/{split}.tsv")].map(|f| b.join(f)));
            }
            files.iter().map(|f| sha256_file(f).map_err(Error::io(f))).collect()
        })
        .await
        .map_err(Error::task("hashing the training inputs"))??;
        // The training data fingerprint needs the weights' hash again: keep it rather than re-read 90 MB.
        let _ = self.init_hash.set(parts[0].clone());
        let digest = sha256_hex(parts.join("|").as_bytes());
        let bb = match self.needs_black_box() {
            true => self
                .wf
                .models
                .get(&self.params.black_box)
                .map(|m| format!("{:?}|{:?}|{:?}", m.provider, m.model, m.base_url)),
            false => None,
        };
        Ok(format!("{digest}|{bb:?}|{:?}", self.max_seq_length))
    }

    async fn outputs_intact(&self, store: &crate::store::Store) -> Result<bool> {
        let stages = [self.name.clone()];
        Ok(models_table::latest(store, &stages, self.params.retriever.name())
            .await?
            .is_some_and(|m| std::path::Path::new(&m.path).join("model.safetensors").exists()))
    }

    async fn run(&self, ctx: &StageCtx) -> Result<Outcome> {
        let p = &self.params;
        let (mut train_set, val_set) = self.data(ctx).await?;
        let (bb_model, bb_vectors) = self.black_box_vectors(ctx, &train_set, &val_set).await?;
        if p.hard_negatives > 0
            && let Some(bb) = &bb_vectors
        {
            let found = data::mine_negatives(&mut train_set, bb, p.negative_margin)?;
            ctx.progress.log(&format!("mined a hard negative for {found} of {} pairs", train_set.len()));
        }
        let choice = p.device.unwrap_or(self.augment_device);
        let mut device = crate::models::device(choice)?;
        if p.retriever == Retriever::Reranker && !device.is_cpu() {
            ctx.progress
                .log("the reranker trains on the CPU path (packed encoder with token types); the GPU is not used");
            device = candle_core::Device::Cpu;
        }
        ctx.progress.log(&format!("training on {} (device: {choice})", crate::models::device_name(&device)));
        let cfg = self.params.train_config(&device);
        let trained_weight = cfg.weight;
        let start = self.start_from(ctx).await?;
        let fingerprint = self.data_fingerprint(&train_set, &val_set, &cfg, &start.hash, bb_model.as_ref());
        let dir = self.model_dir(&fingerprint);
        let folder = crate::bert::Folder::read(&self.init_dir, self.max_seq_length)?;
        let job = match p.retriever {
            Retriever::Reranker => {
                let bb =
                    bb_vectors.ok_or_else(|| Error::internal("a reranker was trained without black-box vectors"))?;
                self.reranker_job(ctx, folder, &start.weights, &train_set, &val_set, &bb, &cfg)?
            }
            _ => {
                let mut aug = Augment::new(folder, Some(&start.weights), &device)?;
                if cfg.bf16 {
                    aug.model.compute = candle_core::DType::BF16;
                    let on = match (device.is_cpu(), crate::bert::amx::engine()) {
                        (false, _) => "on the GPU",
                        (true, Some(e)) => e.describe(),
                        (true, None) => "through candle's autograd (this CPU has no bf16 engine)",
                    };
                    ctx.progress.log(&format!("mixed precision: bf16 matrix products {on}, f32 weights and optimiser"));
                }
                let bb = if p.retriever == Retriever::Mafin { bb_vectors } else { None };
                Job::BiEncoder { aug, bb }
            }
        };
        let pairs_total = (train_set.len() * p.epochs) as u64;
        ctx.progress.set_total(pairs_total);
        let n_val = val_set.queries.len();
        let started = std::time::Instant::now();
        let cfg_rerank = cfg.rerank;
        let fit = Fit { cfg, job, train_set, val_set, dir, fingerprint: fingerprint.clone() };
        let (outcome, pairs_seen, n_train) = fit.run(ctx).await?;
        let secs = started.elapsed().as_secs_f64();
        let st = &outcome.state;
        // Epochs early stopping left out are skipped; the rest not done here were done by an
        // interrupted run this one resumed.
        let left_out = if st.stopped_early { (p.epochs.saturating_sub(st.epoch) * n_train) as u64 } else { 0 };
        ctx.progress.skipped(left_out);
        ctx.progress.cached(pairs_total.saturating_sub(ctx.progress.counts().done.max(0) as u64 + left_out));
        let improved = st.improved();
        let weight = st.best_weight.unwrap_or(trained_weight);
        if improved == Some(false) {
            ctx.progress.log(&format!(
                "training did not beat its starting model on validation (best: the start, ndcg@10 {:.4}); \
                 the model is stored as not improved and the gate will not promote it",
                st.best_metrics.get("ndcg@10").copied().unwrap_or(0.0)
            ));
        }
        let gain = st.gain();
        // A start kept as the best has no gain to qualify (the line above says so).
        if let Some(g) = gain.as_ref().filter(|_| improved == Some(true)) {
            ctx.progress.log(&g.to_string());
        }
        let metrics = json!({
            "best_epoch": st.best_epoch, "validation": st.best_metrics, "validation_gain": gain,
            "steps": st.step, "stopped_early": st.stopped_early, "improved": improved,
            "weight": weight, "alpha": st.best_alpha, "black_box_alpha": st.black_box_alpha,
            "rerank_k": cfg_rerank.map(|r| r.k),
        });
        let best = outcome.best_dir.to_string_lossy().to_string();
        let id = models_table::insert(
            &ctx.store,
            &models_table::NewModel {
                stage: &self.name,
                run_id: ctx.run_id,
                stage_run_id: ctx.stage_run_id,
                path: &best,
                parent: &start.weights.parent().unwrap_or(&self.init_dir).to_string_lossy(),
                retriever: p.retriever.name(),
                black_box: bb_model.as_ref().map(|b| b.identity.as_str()),
                weight,
                data_fingerprint: &fingerprint,
                metrics: &metrics.to_string(),
                parent_id: start.parent.as_ref().map(|m| m.id),
                alpha: st.best_alpha,
                black_box_alpha: st.black_box_alpha,
                improved,
            },
        )
        .await?;
        Ok(Outcome {
            summary: json!({
                "model_id": id, "path": best, "train_pairs": n_train, "validation_queries": n_val,
                "steps": outcome.state.step, "best_epoch": outcome.state.best_epoch,
                "validation": outcome.state.best_metrics, "validation_gain": gain, "resumed": outcome.resumed,
                "improved": improved, "weight": weight, "alpha": outcome.state.best_alpha,
                "black_box_alpha": outcome.state.black_box_alpha,
                "pairs_per_s": if outcome.step_seconds > 0.0 { outcome.step_pairs as f64 / outcome.step_seconds } else { 0.0 },
                "wall_seconds": secs, "pairs_trained": pairs_seen, "device": crate::models::device_name(&device),
            }),
            failure: None,
        })
    }
}

/// Where training started from: the promoted model of this stage (a refresh), or `init`.
struct Start {
    parent: Option<models_table::ModelRow>,
    weights: PathBuf,
    hash: String,
}

impl Train {
    /// The pairs, split by document into training and validation.
    async fn data(&self, ctx: &StageCtx) -> Result<(Vec<Example>, data::RetrievalSet)> {
        let (all, corpus) = self.examples(ctx).await?;
        if all.len() < 2 {
            return Err(Error::bad_input(
                format!("stage `{}`: {} training pairs; at least 2 are needed", self.name, all.len()),
                "check that the judge accepted pairs (`flow pairs --verdict accepted`) or that `beir:` has qrels",
            ));
        }
        let (train_set, val) = data::split(all, self.params.seed, self.params.val_fraction);
        let mut val_set = data::retrieval_set(&val, &train_set, &corpus, self.params.seed);
        // Validation scores long documents by their best passage, as the eval stages do.
        let folder = crate::bert::Folder::read(&self.init_dir, self.max_seq_length)?;
        let splitter = crate::bert::passages::Splitter::new(&folder.tokenizer, folder.max_seq_length)?;
        (val_set.passages, val_set.owners) = tokio::task::block_in_place(|| splitter.split_all(&val_set.corpus, None))?;
        ctx.progress.log(&format!(
            "{} training pairs; validation: {} queries over {} documents ({} passages; held out by document, the rest of the corpus as distractors)",
            train_set.len(),
            val_set.queries.len(),
            val_set.corpus.len(),
            val_set.passages.len()
        ));
        Ok((train_set, val_set))
    }

    /// The black box (when the retriever or mining needs it) and its vector of every text, computed
    /// once and kept in the `embeddings` table.
    async fn black_box_vectors(
        &self,
        ctx: &StageCtx,
        train_set: &[Example],
        val_set: &data::RetrievalSet,
    ) -> Result<(Option<BlackBox>, Option<HashMap<String, Vec<f32>>>)> {
        if !self.needs_black_box() {
            return Ok((None, None));
        }
        let bb = BlackBox::load(&self.wf, &self.params.black_box)?;
        let mut texts: Vec<String> = Vec::new();
        for e in train_set {
            texts.push(e.query.clone());
            texts.push(e.positive.clone());
        }
        texts.extend(val_set.queries.iter().cloned());
        texts.extend(val_set.searched().0.iter().cloned());
        texts.sort();
        texts.dedup();
        ctx.progress.log(&format!(
            "black box {}: {} texts (cached ones are read, not recomputed)",
            bb.identity,
            texts.len()
        ));
        let vectors = bb.embed(&self.wf, &ctx.store, &ctx.account(), &texts).await?;
        if let Some(usage) = bb.usage() {
            crate::store::runs::set_llm_usage(&ctx.store, ctx.stage_run_id, &usage).await?;
        }
        let by_text = texts.into_iter().zip(vectors).collect();
        Ok((Some(bb), Some(by_text)))
    }

    /// A refresh continues from the promoted model (same architecture, saved by an earlier run).
    async fn start_from(&self, ctx: &StageCtx) -> Result<Start> {
        let parent = match self.params.init_from {
            InitFrom::Promoted => {
                models_table::promoted(&ctx.store, std::slice::from_ref(&self.name), self.params.retriever.name())
                    .await?
                    .filter(|m| std::path::Path::new(&m.path).join("model.safetensors").exists())
            }
            InitFrom::Base => None,
        };
        Ok(match parent {
            Some(m) => {
                ctx.progress.log(&format!("continuing from the promoted model {} ({})", m.id, m.path));
                let weights = PathBuf::from(&m.path).join("model.safetensors");
                let hash = sha256_file(&weights).map_err(Error::io(&weights))?;
                Start { parent: Some(m), weights, hash }
            }
            None => {
                let weights = self.init_dir.join("model.safetensors");
                let hash = match self.init_hash.get() {
                    Some(h) => h.clone(),
                    None => sha256_file(&weights).map_err(Error::io(&weights))?,
                };
                Start { parent: None, weights, hash }
            }
        })
    }

    /// What the trained model is a function of: the pairs, the validation set, the settings, the
    /// starting weights and the black box. Names the model's folder and keys its checkpoints.
    fn data_fingerprint(
        &self,
        train_set: &[Example],
        val_set: &data::RetrievalSet,
        cfg: &TrainConfig,
        init_hash: &str,
        bb: Option<&BlackBox>,
    ) -> String {
        let mut items: Vec<(&str, &str, &str, Option<&str>)> = train_set
            .iter()
            .map(|e| (e.query.as_str(), e.positive.as_str(), e.doc.as_str(), e.negative.as_deref()))
            .collect();
        items.sort();
        // What validation searches decides which checkpoint is best and the w and alpha chosen.
        let searched = sha256_hex(val_set.searched().0.join("\u{1f}").as_bytes());
        let doc = json!({
            "pairs": items, "val": val_set.queries, "searched": searched, "cfg": cfg, "init": init_hash,
            "bb": bb.map(|b| b.identity.clone()), "max_seq": self.max_seq_length,
        });
        sha256_hex(serde_json::to_string(&doc).expect("json").as_bytes())
    }

    /// A reranker's training: its model from `weights`, each example's negatives from the first
    /// stage's top ranks (BM25 with the black box over the training corpus), and the validation
    /// queries' first-stage ranking, fused at the alpha the validation split chooses.
    #[allow(clippy::too_many_arguments)]
    fn reranker_job(
        &self,
        ctx: &StageCtx,
        folder: crate::bert::Folder,
        weights: &std::path::Path,
        train_set: &[Example],
        val_set: &data::RetrievalSet,
        bb: &HashMap<String, Vec<f32>>,
        cfg: &TrainConfig,
    ) -> Result<Job> {
        let rc = cfg.rerank.ok_or_else(|| Error::internal("reranker settings missing"))?;
        let (model, fresh_head) = train::rerank::CrossModel::new(folder, weights, cfg.seed)?;
        if fresh_head {
            ctx.progress.log(
                "the reranker's head starts from BERT's initialisation where the start folder has none (a new classifier)",
            );
        }
        let c = tokio::task::block_in_place(|| train::candidates::candidates(train_set, val_set, bb, rc))?;
        ctx.progress.log(&c.summary());
        Ok(Job::Reranker { model, negatives: c.negatives, val_first: c.val_first, first_alpha: c.alpha })
    }

    /// `<store>.models/<stage>/<fingerprint>`, beside the store.
    fn model_dir(&self, fingerprint: &str) -> PathBuf {
        let store_dir = self.wf.store.parent().map(PathBuf::from).unwrap_or_default();
        let stem = self.wf.store.file_stem().map(|s| s.to_string_lossy().to_string()).unwrap_or_else(|| "flow".into());
        store_dir.join(format!("{stem}.models")).join(&self.name).join(&fingerprint[..12])
    }
}

/// What a training run trains: the bi-encoder augment (beside the black box's vectors for Mafin), or
/// a reranker with its mined negatives and its validation's first stage.
enum Job {
    BiEncoder {
        aug: Augment,
        bb: Option<HashMap<String, Vec<f32>>>,
    },
    Reranker {
        model: train::rerank::CrossModel,
        negatives: Vec<Vec<String>>,
        val_first: crate::rank::Ranking,
        first_alpha: Option<f64>,
    },
}

/// One training run on a blocking thread, its events written to the store as they come.
struct Fit {
    cfg: TrainConfig,
    job: Job,
    train_set: Vec<Example>,
    val_set: data::RetrievalSet,
    dir: PathBuf,
    fingerprint: String,
}

impl Fit {
    async fn run(self, ctx: &StageCtx) -> Result<(train::TrainOutcome, u64, usize)> {
        let (store, progress, stage_run_id) = (ctx.store.clone(), ctx.progress.clone(), ctx.stage_run_id);
        let handle = tokio::runtime::Handle::current();
        let (out, pairs_seen, n_train) = tokio::task::spawn_blocking(move || {
            let mut pairs_seen = 0u64;
            let mut on = |ev: Event| -> Result<()> {
                match ev {
                    Event::Step { step, epoch, loss, lr, pairs } => {
                        pairs_seen += pairs as u64;
                        progress.done(pairs as u64);
                        progress.message(&format!("epoch {epoch} step {step} loss {loss:.4}"));
                        let extra = json!({ "lr": lr });
                        let point = models_table::add_curve_point(
                            &store,
                            stage_run_id,
                            "loss",
                            step as i64,
                            epoch as i64,
                            loss,
                            &extra,
                        );
                        handle.block_on(point)
                    }
                    Event::Validation { step, epoch, metrics } => {
                        let (r10, n10) = (
                            metrics.get("recall@10").copied().unwrap_or(0.0),
                            metrics.get("ndcg@10").copied().unwrap_or(0.0),
                        );
                        progress.log(&format!("validation after epoch {epoch}: recall@10 {r10:.4}, ndcg@10 {n10:.4}"));
                        let extra = json!(metrics);
                        let point = models_table::add_curve_point(
                            &store,
                            stage_run_id,
                            "validation",
                            step as i64,
                            epoch as i64,
                            r10,
                            &extra,
                        );
                        handle.block_on(point)
                    }
                    Event::Log(line) => {
                        progress.log(&line);
                        Ok(())
                    }
                }
            };
            let (cfg, dir, fp) = (&self.cfg, &self.dir, &self.fingerprint);
            let out = match &self.job {
                Job::BiEncoder { aug, bb } => {
                    let data = train::TrainData { train: &self.train_set, val: &self.val_set, bb };
                    train::train(cfg, aug, &data, dir, fp, &mut on)
                }
                Job::Reranker { model, negatives, val_first, first_alpha } => {
                    let learner = train::rerank::Reranking {
                        cfg,
                        model,
                        train: &self.train_set,
                        negatives,
                        val: &self.val_set,
                        val_first,
                        first_alpha: *first_alpha,
                        k: cfg.rerank.map_or(train::params::default_rerank_k(), |r| r.k),
                    };
                    train::fit(cfg, &learner, dir, fp, &mut on)
                }
            };
            (out, pairs_seen, self.train_set.len())
        })
        .await
        .map_err(Error::task("the training task"))?;
        Ok((out?, pairs_seen, n_train))
    }
}
