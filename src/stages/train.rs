//! The `train` stage: accepted pairs from the store and/or a BEIR labelled set train a Mafin augment
//! model beside the black box; the best checkpoint becomes a sentence-transformers folder in `models`.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::{Kind, Outcome, Stage, StageCtx};
use crate::error::{Error, Result};
use crate::llm::embed::BlackBox;
use crate::store::{models as models_table, pairs, sha256_file, sha256_hex};
use crate::train::data::{self, Example};
use crate::train::{self, Event, Retriever, TrainConfig, model::Augment};
use crate::workflow::{CheckCtx, Diagnostic, StageSpec, Workflow, check_typed};

pub const KIND: Kind = Kind {
    name: "train",
    about: "train a Mafin augment model beside the black-box embedding on accepted pairs and/or a BEIR set",
    check,
    build,
};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Params {
    #[serde(default = "default_retriever")]
    pub retriever: Retriever,
    /// `models:` keys of the black box and of the trainable augment (`init:` its starting folder).
    #[serde(default = "default_black_box")]
    pub black_box: String,
    #[serde(default = "default_augment")]
    pub augment: String,
    /// A BEIR folder (corpus.jsonl, queries.jsonl, qrels/<split>.tsv) to learn from, relative to the workflow.
    #[serde(default)]
    pub beir: Option<String>,
    #[serde(default = "default_split")]
    pub split: String,
    /// Learn from the accepted pairs in the store (default: when the stage needs another stage).
    #[serde(default)]
    pub pairs: Option<bool>,
    #[serde(default = "default_epochs")]
    pub epochs: usize,
    #[serde(default = "default_batch")]
    pub batch_size: usize,
    #[serde(default = "default_lr")]
    pub lr: f64,
    #[serde(default = "default_warmup")]
    pub warmup: f64,
    #[serde(default = "default_weight_decay")]
    pub weight_decay: f64,
    #[serde(default = "default_clip")]
    pub max_grad_norm: f64,
    #[serde(default = "default_one")]
    pub grad_accum: usize,
    #[serde(default = "default_scale")]
    pub scale: f64,
    /// w in concat(n(bb), w * n(aug)).
    #[serde(default = "default_weight")]
    pub weight: f64,
    /// Hard negatives per pair mined with the black box (0 = in-batch negatives only).
    #[serde(default)]
    pub hard_negatives: usize,
    /// A mined negative must score at least this much below the positive (guards against false negatives).
    #[serde(default = "default_margin")]
    pub negative_margin: f64,
    #[serde(default = "default_val")]
    pub val_fraction: f64,
    #[serde(default = "default_patience")]
    pub patience: usize,
    #[serde(default = "default_seed")]
    pub seed: u64,
    #[serde(default = "default_checkpoint_every")]
    pub checkpoint_every: u64,
    /// auto | cpu | cuda | cuda:N
    #[serde(default = "default_device")]
    pub device: String,
    /// Start from the promoted model of this stage when there is one (a refresh continues training),
    /// or always from `models.<augment>.init` (`base`: retrain from scratch).
    #[serde(default)]
    pub init_from: InitFrom,
    /// auto (bf16 matrix products on a GPU, f32 on the CPU) | f32 | bf16
    #[serde(default)]
    pub precision: Precision,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Precision {
    #[default]
    Auto,
    F32,
    Bf16,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InitFrom {
    #[default]
    Promoted,
    Base,
}

fn default_retriever() -> Retriever {
    Retriever::Mafin
}
fn default_black_box() -> String {
    "black_box".into()
}
fn default_augment() -> String {
    "augment".into()
}
fn default_split() -> String {
    "train".into()
}
fn default_epochs() -> usize {
    1
}
fn default_batch() -> usize {
    32
}
fn default_lr() -> f64 {
    2e-5
}
fn default_warmup() -> f64 {
    0.1
}
fn default_weight_decay() -> f64 {
    0.01
}
fn default_clip() -> f64 {
    1.0
}
fn default_one() -> usize {
    1
}
fn default_scale() -> f64 {
    20.0
}
fn default_weight() -> f64 {
    0.5
}
fn default_margin() -> f64 {
    0.05
}
fn default_val() -> f64 {
    0.1
}
fn default_patience() -> usize {
    2
}
fn default_seed() -> u64 {
    42
}
fn default_checkpoint_every() -> u64 {
    50
}
fn default_device() -> String {
    "auto".into()
}

fn check(cx: &CheckCtx) -> Vec<Diagnostic> {
    let mut diags = Vec::new();
    let Some(p) = check_typed::<Params>(cx.node, cx.params.clone(), &mut diags) else { return diags };
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
    if !(0.0..1.0).contains(&p.warmup) || !(0.0..1.0).contains(&p.val_fraction) {
        bad("warmup", "warmup and val_fraction are shares from 0 to below 1".into(), "warmup: 0.1, val_fraction: 0.1");
    }
    if p.weight <= 0.0 || p.scale <= 0.0 {
        bad("weight", "weight and scale must be positive".into(), "weight: 0.5 and scale: 20 follow the paper");
    }
    if parse_device(&p.device).is_none() {
        bad("device", format!("unknown device {:?}", p.device), "auto, cpu, cuda or cuda:N");
    }
    if !cx.models.contains_key(&p.augment) {
        bad(
            "augment",
            format!("uses `models.{}`, which is not defined", p.augment),
            "add `augment: { init: all-MiniLM-L6-v2 }` under `models:`",
        );
    }
    if (p.retriever == Retriever::Mafin || p.hard_negatives > 0) && !cx.models.contains_key(&p.black_box) {
        bad(
            "black_box",
            format!("uses `models.{}`, which is not defined", p.black_box),
            "add `black_box: { provider: local, model: all-MiniLM-L6-v2 }`",
        );
    }
    diags
}

impl Default for Params {
    fn default() -> Self {
        serde_json::from_value(json!({})).expect("every train parameter has a default")
    }
}

pub enum DeviceChoice {
    Auto,
    Cpu,
    Cuda(usize),
}

pub fn parse_device(s: &str) -> Option<DeviceChoice> {
    match s {
        "auto" => Some(DeviceChoice::Auto),
        "cpu" => Some(DeviceChoice::Cpu),
        "cuda" => Some(DeviceChoice::Cuda(0)),
        _ => s.strip_prefix("cuda:").and_then(|n| n.parse().ok()).map(DeviceChoice::Cuda),
    }
}

fn device(choice: &str) -> Result<candle_core::Device> {
    let cuda = |n| {
        candle_core::Device::new_cuda(n).map_err(|e| {
            Error::bad_input(
                format!("device cuda:{n} cannot be used: {e}"),
                "build with `cargo build --release --features cuda` on a machine with an NVIDIA GPU, or set `device: cpu`",
            )
        })
    };
    match parse_device(choice) {
        Some(DeviceChoice::Cpu) => Ok(candle_core::Device::Cpu),
        Some(DeviceChoice::Cuda(n)) => cuda(n),
        Some(DeviceChoice::Auto) if candle_core::utils::cuda_is_available() => cuda(0),
        _ => Ok(candle_core::Device::Cpu),
    }
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
    let use_pairs = params.pairs.unwrap_or(!spec.needs.is_empty());
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
        params,
        init_dir,
        beir,
        use_pairs,
        init_hash: std::sync::OnceLock::new(),
    }))
}

struct Train {
    name: String,
    wf: Arc<Workflow>,
    params: Params,
    init_dir: PathBuf,
    max_seq_length: Option<usize>,
    beir: Option<PathBuf>,
    use_pairs: bool,
    init_hash: std::sync::OnceLock<String>,
}

impl Train {
    fn needs_black_box(&self) -> bool {
        self.params.retriever == Retriever::Mafin || self.params.hard_negatives > 0
    }

    async fn examples(&self, ctx: &StageCtx) -> Result<Vec<Example>> {
        let mut out = Vec::new();
        if self.use_pairs {
            for (query, positive, doc) in pairs::accepted(&ctx.store).await? {
                out.push(Example { query, positive, doc, negative: None });
            }
        }
        if let Some(dir) = &self.beir {
            let (dir, split) = (dir.clone(), self.params.split.clone());
            let set = tokio::task::spawn_blocking(move || crate::beir::load(&dir, &split))
                .await
                .map_err(|e| Error::Other(e.to_string()))??;
            for &(q, d, _) in &set.qrels {
                out.push(Example {
                    query: set.query_texts[q].clone(),
                    positive: set.doc_texts[d].clone(),
                    doc: format!("beir:{}", set.doc_ids[d]),
                    negative: None,
                });
            }
        }
        Ok(out)
    }
}

#[async_trait]
impl Stage for Train {
    async fn inputs(&self) -> Result<String> {
        let init = self.init_dir.join("model.safetensors");
        let beir = self.beir.clone();
        let split = self.params.split.clone();
        let parts = tokio::task::spawn_blocking(move || {
            let mut parts = vec![sha256_file(&init)];
            if let Some(b) = beir {
                for f in ["corpus.jsonl", "queries.jsonl", &format!("qrels/{split}.tsv")] {
                    parts.push(sha256_file(&b.join(f)));
                }
            }
            parts
        })
        .await
        .map_err(|e| Error::Other(e.to_string()))?;
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
        let all = self.examples(ctx).await?;
        if all.len() < 2 {
            return Err(Error::bad_input(
                format!("stage `{}`: {} training pairs; at least 2 are needed", self.name, all.len()),
                "check that the judge accepted pairs (`flow pairs --verdict accepted`) or that `beir:` has qrels",
            ));
        }
        let (mut train_set, val) = data::split(all, p.seed, p.val_fraction);
        let val_set = data::retrieval_set(&val, &train_set);
        ctx.progress.log(&format!(
            "{} training pairs; validation: {} queries over {} passages (held out by document)",
            train_set.len(),
            val_set.queries.len(),
            val_set.corpus.len()
        ));

        let bb_model = if self.needs_black_box() { Some(BlackBox::load(&self.wf, &p.black_box)?) } else { None };
        let mut bb_vectors = None;
        if let Some(bb) = &bb_model {
            let mut texts: Vec<String> = Vec::new();
            for e in &train_set {
                texts.push(e.query.clone());
                texts.push(e.positive.clone());
            }
            texts.extend(val_set.queries.iter().cloned());
            texts.extend(val_set.corpus.iter().cloned());
            texts.sort();
            texts.dedup();
            ctx.progress.log(&format!(
                "black box {}: {} texts (cached ones are read, not recomputed)",
                bb.identity,
                texts.len()
            ));
            let vectors = bb.embed(&self.wf, &ctx.store, ctx.run_id, &self.name, &texts).await?;
            if let Some(usage) = bb.usage() {
                crate::store::runs::set_llm_usage(&ctx.store, ctx.stage_run_id, &usage).await?;
            }
            bb_vectors = Some(texts.into_iter().zip(vectors).collect::<HashMap<_, _>>());
        }
        if p.hard_negatives > 0
            && let Some(bb) = &bb_vectors
        {
            let found = data::mine_negatives(&mut train_set, bb, p.negative_margin)?;
            ctx.progress.log(&format!("mined a hard negative for {found} of {} pairs", train_set.len()));
        }
        let vectors_for_training = if p.retriever == Retriever::Mafin { bb_vectors } else { None };

        let device = device(&p.device)?;
        let bf16 = match p.precision {
            Precision::Bf16 => true,
            Precision::F32 => false,
            Precision::Auto => device.is_cuda(),
        };
        let cfg = TrainConfig {
            retriever: p.retriever,
            epochs: p.epochs,
            batch_size: p.batch_size,
            lr: p.lr,
            warmup: p.warmup,
            weight_decay: p.weight_decay,
            max_grad_norm: p.max_grad_norm,
            grad_accum: p.grad_accum,
            scale: p.scale,
            weight: p.weight,
            seed: p.seed,
            patience: p.patience,
            checkpoint_every: p.checkpoint_every,
            bf16,
        };
        // A refresh continues from the promoted model (same architecture, saved by an earlier run).
        let parent = match p.init_from {
            InitFrom::Promoted => {
                models_table::promoted(&ctx.store, std::slice::from_ref(&self.name), p.retriever.name())
                    .await?
                    .filter(|m| std::path::Path::new(&m.path).join("model.safetensors").exists())
            }
            InitFrom::Base => None,
        };
        let (init_weights, init_hash) = match &parent {
            Some(m) => {
                ctx.progress.log(&format!("continuing from the promoted model {} ({})", m.id, m.path));
                let w = PathBuf::from(&m.path).join("model.safetensors");
                let h = sha256_file(&w);
                (w, h)
            }
            None => {
                let w = self.init_dir.join("model.safetensors");
                let h = self.init_hash.get().cloned().unwrap_or_else(|| sha256_file(&w));
                (w, h)
            }
        };
        let mut fp_items: Vec<(&str, &str, &str, Option<&str>)> = train_set
            .iter()
            .map(|e| (e.query.as_str(), e.positive.as_str(), e.doc.as_str(), e.negative.as_deref()))
            .collect();
        fp_items.sort();
        let fingerprint = sha256_hex(
            serde_json::to_string(&json!({
                "pairs": fp_items, "val": val_set.queries, "cfg": cfg, "init": init_hash,
                "bb": bb_model.as_ref().map(|b| b.identity.clone()), "max_seq": self.max_seq_length,
            }))
            .expect("json")
            .as_bytes(),
        );
        let store_dir = self.wf.store.parent().map(PathBuf::from).unwrap_or_default();
        let stem = self.wf.store.file_stem().map(|s| s.to_string_lossy().to_string()).unwrap_or_else(|| "flow".into());
        let dir = store_dir.join(format!("{stem}.models")).join(&self.name).join(&fingerprint[..12]);

        let folder = crate::models::bert::Folder::read(&self.init_dir, self.max_seq_length)?;
        let mut aug = Augment::new(folder, Some(&init_weights), &device)?;
        if bf16 {
            aug.model.compute = candle_core::DType::BF16;
            ctx.progress.log("mixed precision: bf16 matrix products, f32 weights and optimiser");
        }
        let pairs_total = (train_set.len() * p.epochs) as u64;
        ctx.progress.set_total(pairs_total);

        let (store, progress, stage_run_id) = (ctx.store.clone(), ctx.progress.clone(), ctx.stage_run_id);
        let handle = tokio::runtime::Handle::current();
        let dir2 = dir.clone();
        let n_val = val_set.queries.len();
        let fp2 = fingerprint.clone();
        let started = std::time::Instant::now();
        let outcome = tokio::task::spawn_blocking(move || {
            let mut pairs_seen = 0u64;
            let mut on = |ev: Event| -> Result<()> {
                match ev {
                    Event::Step { step, epoch, loss, lr, pairs } => {
                        pairs_seen += pairs as u64;
                        progress.done(pairs as u64);
                        progress.message(&format!("epoch {epoch} step {step} loss {loss:.4}"));
                        handle.block_on(models_table::add_curve_point(
                            &store,
                            stage_run_id,
                            "loss",
                            step as i64,
                            epoch as i64,
                            loss,
                            &json!({ "lr": lr }),
                        ))
                    }
                    Event::Validation { step, epoch, metrics } => {
                        progress.log(&format!(
                            "validation after epoch {epoch}: recall@10 {:.4}, ndcg@10 {:.4}",
                            metrics.get("recall@10").unwrap_or(&0.0),
                            metrics.get("ndcg@10").unwrap_or(&0.0)
                        ));
                        handle.block_on(models_table::add_curve_point(
                            &store,
                            stage_run_id,
                            "validation",
                            step as i64,
                            epoch as i64,
                            metrics.get("recall@10").copied().unwrap_or(0.0),
                            &json!(metrics),
                        ))
                    }
                    Event::Log(line) => {
                        progress.log(&line);
                        Ok(())
                    }
                }
            };
            let data = train::TrainData { train: &train_set, val: &val_set, bb: &vectors_for_training };
            let out = train::train(&cfg, &aug, &data, &dir2, &fp2, &mut on);
            (out, pairs_seen, train_set.len())
        })
        .await
        .map_err(|e| Error::Other(format!("training task: {e}")))?;
        let (outcome, pairs_seen, n_train) = outcome;
        let outcome = outcome?;
        let secs = started.elapsed().as_secs_f64();
        ctx.progress.cached(pairs_total.saturating_sub(ctx.progress.counts().done.max(0) as u64));

        let metrics = json!({
            "best_epoch": outcome.state.best_epoch, "validation": outcome.state.best_metrics,
            "steps": outcome.state.step, "stopped_early": outcome.state.stopped_early,
        });
        let best = outcome.best_dir.to_string_lossy().to_string();
        let id = models_table::insert(
            &ctx.store,
            &models_table::NewModel {
                stage: &self.name,
                run_id: ctx.run_id,
                stage_run_id: ctx.stage_run_id,
                path: &best,
                parent: &init_weights.parent().unwrap_or(&self.init_dir).to_string_lossy(),
                retriever: p.retriever.name(),
                black_box: bb_model.as_ref().map(|b| b.identity.as_str()),
                weight: p.weight,
                data_fingerprint: &fingerprint,
                metrics: &metrics.to_string(),
                parent_id: parent.as_ref().map(|m| m.id),
            },
        )
        .await?;
        Ok(Outcome {
            summary: json!({
                "model_id": id, "path": best, "train_pairs": n_train, "validation_queries": n_val,
                "steps": outcome.state.step, "best_epoch": outcome.state.best_epoch,
                "validation": outcome.state.best_metrics, "resumed": outcome.resumed,
                "pairs_per_s": if outcome.step_seconds > 0.0 { outcome.step_pairs as f64 / outcome.step_seconds } else { 0.0 },
                "wall_seconds": secs, "pairs_trained": pairs_seen,
            }),
            failure: None,
        })
    }
}
