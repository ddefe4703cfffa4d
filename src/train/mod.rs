//! Mafin training (arXiv 2402.12177): a frozen black-box embedding plus a trainable BERT augment,
//! trained with in-batch (and mined hard) negatives, validated every epoch, checkpointed to resume.

pub mod bert;
pub mod data;
pub mod loss;
pub mod model;
pub mod optim;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::eval::{metrics, search};
use data::{Example, RetrievalSet};
use model::Augment;
use optim::{AdamW, AdamWConfig, Grads};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Retriever {
    /// concat(n(black box), w * n(augment)): the black box stays, the augment learns what it misses.
    Mafin,
    /// The augment alone: plain fine-tuning, for comparison.
    AugmentOnly,
}

impl Retriever {
    pub fn name(self) -> &'static str {
        match self {
            Retriever::Mafin => "mafin",
            Retriever::AugmentOnly => "augment_only",
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainConfig {
    pub retriever: Retriever,
    pub epochs: usize,
    pub batch_size: usize,
    pub lr: f64,
    /// Share of all optimiser steps spent warming up.
    pub warmup: f64,
    pub weight_decay: f64,
    pub max_grad_norm: f64,
    pub grad_accum: usize,
    pub scale: f64,
    /// w: the augment's weight in the Mafin concatenation.
    pub weight: f64,
    pub seed: u64,
    /// Epochs without a better validation score before stopping.
    pub patience: usize,
    /// Save a resumable checkpoint every this many optimiser steps (and at every epoch's end).
    pub checkpoint_every: u64,
}

/// Black-box vectors by exact text (for Mafin); None for augment_only.
pub type BlackBoxVectors = Option<HashMap<String, Vec<f32>>>;

pub enum Event<'a> {
    Step { step: u64, epoch: usize, loss: f64, lr: f64, pairs: usize },
    Validation { step: u64, epoch: usize, metrics: &'a std::collections::BTreeMap<String, f64> },
    Log(String),
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct TrainState {
    pub fingerprint: String,
    /// The epoch under way and the next batch in it.
    pub epoch: usize,
    pub next_batch: usize,
    pub step: u64,
    pub adam_t: u64,
    pub best: Option<(f64, f64)>,
    pub best_epoch: Option<usize>,
    pub best_metrics: std::collections::BTreeMap<String, f64>,
    pub bad_epochs: usize,
    pub validated_start: bool,
    pub stopped_early: bool,
    pub done: bool,
}

#[derive(Debug, Clone)]
pub struct TrainOutcome {
    pub state: TrainState,
    pub best_dir: PathBuf,
    pub total_steps: u64,
    pub resumed: bool,
}

/// What training learns from and is validated on.
#[derive(Clone, Copy)]
pub struct TrainData<'a> {
    pub train: &'a [Example],
    pub val: &'a RetrievalSet,
    pub bb: &'a BlackBoxVectors,
}

/// Trains `aug` on `train`, validating on `val`, writing `dir/best` (the best validation score so
/// far) and `dir/last` (resumable: weights, optimiser moments and position). A `dir/last` left by an
/// earlier attempt with the same fingerprint is continued rather than restarted.
pub fn train(
    cfg: &TrainConfig,
    aug: &Augment,
    data: &TrainData,
    dir: &Path,
    fingerprint: &str,
    on: &mut dyn FnMut(Event) -> Result<()>,
) -> Result<TrainOutcome> {
    let TrainData { train, val, bb } = *data;
    let tensor_err = |e: candle_core::Error| Error::Other(format!("training: {e}"));
    if cfg.retriever == Retriever::Mafin && bb.is_none() {
        return Err(Error::Other("mafin training needs black-box vectors".into()));
    }
    let (best_dir, last_dir) = (dir.join("best"), dir.join("last"));
    std::fs::create_dir_all(dir).map_err(Error::io(dir))?;
    let mut opt = AdamW::new(
        aug.named_vars(),
        AdamWConfig { lr: cfg.lr, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: cfg.weight_decay },
    );
    let mut state = TrainState { fingerprint: fingerprint.to_string(), ..Default::default() };
    let mut resumed = false;
    if let Some(last) = model::existing_checkpoint(&last_dir)
        && let Ok(text) = std::fs::read_to_string(last.join("trainer_state.json"))
        && let Ok(saved) = serde_json::from_str::<TrainState>(&text)
        && saved.fingerprint == fingerprint
    {
        aug.load_weights(&last.join("model.safetensors"))?;
        let moments = last.join("optimizer.safetensors");
        if moments.exists() {
            let t = candle_core::safetensors::load(&moments, &aug.device).map_err(tensor_err)?;
            for name in opt.names().map(str::to_string).collect::<Vec<_>>() {
                if let (Some(m), Some(v)) = (t.get(&format!("m.{name}")), t.get(&format!("v.{name}"))) {
                    opt.m.insert(name.clone(), m.clone());
                    opt.v.insert(name, v.clone());
                }
            }
        }
        opt.t = saved.adam_t;
        on(Event::Log(format!(
            "resuming training at epoch {}, batch {} (step {})",
            saved.epoch + 1,
            saved.next_batch,
            saved.step
        )))?;
        state = saved;
        resumed = true;
    }

    let per_epoch: Vec<usize> =
        (0..cfg.epochs).map(|e| data::batches(train, cfg.batch_size, cfg.seed, e).len()).collect();
    let accum = cfg.grad_accum.max(1);
    let total_steps: u64 = per_epoch.iter().map(|&b| b.div_ceil(accum) as u64).sum();
    let warmup = (total_steps as f64 * cfg.warmup).ceil() as u64;

    let save_last = |state: &TrainState, opt: &AdamW| -> Result<()> {
        let mut extra: HashMap<String, Tensor> = HashMap::new();
        for (n, m) in &opt.m {
            extra.insert(format!("m.{n}"), m.clone());
        }
        for (n, v) in &opt.v {
            extra.insert(format!("v.{n}"), v.clone());
        }
        let refs: HashMap<&str, Tensor> = extra.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
        let mut st = state.clone();
        st.adam_t = opt.t;
        aug.save(&last_dir, &refs, Some(&serde_json::to_value(&st).expect("state json")))
    };
    let validate =
        |state: &mut TrainState, epoch_done: usize, on: &mut dyn FnMut(Event) -> Result<()>| -> Result<bool> {
            if val.queries.is_empty() {
                return Ok(false);
            }
            let m = validation_metrics(cfg, aug, val, bb)?;
            on(Event::Validation { step: state.step, epoch: epoch_done, metrics: &m })?;
            let score = (m.get("recall@10").copied().unwrap_or(0.0), m.get("ndcg@10").copied().unwrap_or(0.0));
            let better = state.best.is_none_or(|b| score > b);
            if better {
                state.best = Some(score);
                state.best_epoch = Some(epoch_done);
                state.best_metrics = m;
                state.bad_epochs = 0;
                aug.save(&best_dir, &HashMap::new(), None)?;
            } else {
                state.bad_epochs += 1;
            }
            Ok(better)
        };

    if !state.validated_start {
        // The starting model is the first candidate: training must beat it to replace it.
        validate(&mut state, 0, on)?;
        state.validated_start = true;
    }
    while state.epoch < cfg.epochs && !state.done {
        let batches = data::batches(train, cfg.batch_size, cfg.seed, state.epoch);
        let mut grads = Grads::new();
        let mut pending = 0usize;
        let mut loss_sum = 0.0;
        for (bi, batch) in batches.iter().enumerate().skip(state.next_batch) {
            let loss = batch_loss(cfg, aug, train, batch, bb).map_err(tensor_err)?;
            let scaled = (&loss / accum as f64).map_err(tensor_err)?;
            opt.collect(&scaled.backward().map_err(tensor_err)?, &mut grads).map_err(tensor_err)?;
            loss_sum += loss.to_scalar::<f32>().map_err(tensor_err)? as f64;
            pending += 1;
            if pending == accum || bi + 1 == batches.len() {
                optim::clip_grad_norm(&mut grads, cfg.max_grad_norm).map_err(tensor_err)?;
                let lr = optim::lr_at(state.step, total_steps, warmup, cfg.lr);
                opt.step(&grads, lr).map_err(tensor_err)?;
                grads.clear();
                state.step += 1;
                state.next_batch = bi + 1;
                let pairs = batches[bi + 1 - pending..=bi].iter().map(Vec::len).sum();
                on(Event::Step {
                    step: state.step,
                    epoch: state.epoch + 1,
                    loss: loss_sum / pending as f64,
                    lr,
                    pairs,
                })?;
                (pending, loss_sum) = (0, 0.0);
                if cfg.checkpoint_every > 0 && state.step.is_multiple_of(cfg.checkpoint_every) && bi + 1 < batches.len()
                {
                    save_last(&state, &opt)?;
                }
            }
        }
        state.epoch += 1;
        state.next_batch = 0;
        let epoch = state.epoch;
        let improved = validate(&mut state, epoch, on)?;
        if !improved && !val.queries.is_empty() && state.bad_epochs >= cfg.patience.max(1) && state.epoch < cfg.epochs {
            on(Event::Log(format!(
                "early stop after epoch {}: no better validation for {} epochs",
                state.epoch, state.bad_epochs
            )))?;
            state.stopped_early = true;
            state.done = true;
        }
        state.done |= state.epoch >= cfg.epochs;
        save_last(&state, &opt)?;
    }
    if val.queries.is_empty() {
        // Nothing to choose by: the last weights are the result.
        aug.save(&best_dir, &HashMap::new(), None)?;
    }
    Ok(TrainOutcome { state, best_dir, total_steps, resumed })
}

/// The loss of one batch: each query against every passage in the batch (positives, then any hard negatives).
fn batch_loss(
    cfg: &TrainConfig,
    aug: &Augment,
    train: &[Example],
    batch: &[usize],
    bb: &BlackBoxVectors,
) -> candle_core::Result<Tensor> {
    let queries: Vec<&str> = batch.iter().map(|&i| train[i].query.as_str()).collect();
    let mut passages: Vec<&str> = batch.iter().map(|&i| train[i].positive.as_str()).collect();
    passages.extend(batch.iter().filter_map(|&i| train[i].negative.as_deref()));
    let q = aug.encode(&queries)?;
    let p = aug.encode(&passages)?;
    let s_aug = q.matmul(&p.t()?)?;
    let s_bb = match (cfg.retriever, bb) {
        (Retriever::Mafin, Some(bb)) => {
            let rows = |texts: &[&str]| -> candle_core::Result<Tensor> {
                let dim = bb.get(texts[0]).map_or(0, Vec::len);
                let mut flat = Vec::with_capacity(texts.len() * dim);
                for t in texts {
                    let v = bb.get(*t).ok_or_else(|| candle_core::Error::msg("a text has no black-box vector"))?;
                    flat.extend(normalized(v));
                }
                Tensor::from_vec(flat, (texts.len(), dim), &aug.device)
            };
            Some(rows(&queries)?.matmul(&rows(&passages)?.t()?)?)
        }
        _ => None,
    };
    loss::ranking_loss(&loss::combined(&s_aug, s_bb.as_ref(), cfg.weight)?, cfg.scale)
}

pub fn normalized(v: &[f32]) -> Vec<f32> {
    let n = v.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
    v.iter().map(|x| x / n).collect()
}

/// Rows of the retriever's embedding: n(aug) for augment_only, concat(n(bb), w n(aug)) / sqrt(1 + w^2)
/// for Mafin, so that dot products are the cosines of the concatenation.
pub fn retriever_rows(retriever: Retriever, aug: &[Vec<f32>], bb: Option<&[Vec<f32>]>, w: f64) -> Vec<f32> {
    let mut out = Vec::new();
    let w = w as f32;
    let norm = (1.0 + w * w).sqrt();
    for (i, a) in aug.iter().enumerate() {
        match (retriever, bb) {
            (Retriever::Mafin, Some(bb)) => {
                out.extend(normalized(&bb[i]).iter().map(|x| x / norm));
                out.extend(normalized(a).iter().map(|x| w * x / norm));
            }
            _ => out.extend(normalized(a)),
        }
    }
    out
}

/// Recall@k, nDCG@k, MRR@10 and MAP@100 of the retriever on the validation set, with the augment's
/// current weights.
fn validation_metrics(
    cfg: &TrainConfig,
    aug: &Augment,
    val: &RetrievalSet,
    bb: &BlackBoxVectors,
) -> Result<std::collections::BTreeMap<String, f64>> {
    let enc = aug.encoder()?;
    let qa = enc.embed(&val.queries, 32)?;
    let da = enc.embed(&val.corpus, 32)?;
    let lookup = |texts: &[String]| -> Option<Vec<Vec<f32>>> {
        bb.as_ref().map(|bb| texts.iter().map(|t| bb.get(t).cloned().unwrap_or_default()).collect())
    };
    let (qb, db) = (lookup(&val.queries), lookup(&val.corpus));
    let q = retriever_rows(cfg.retriever, &qa, qb.as_deref(), cfg.weight);
    let d = retriever_rows(cfg.retriever, &da, db.as_deref(), cfg.weight);
    let dim = q.len() / val.queries.len();
    let top = search::top_k(&q, &d, dim, 100).map_err(|e| Error::Other(format!("search: {e}")))?;
    let per: Vec<_> = top
        .iter()
        .zip(&val.relevant)
        .map(|(t, rel)| {
            let ranking: Vec<usize> = t.iter().map(|x| x.0).collect();
            metrics::query_metrics(&ranking, rel, &[1, 5, 10, 100])
        })
        .collect();
    Ok(metrics::mean(&per))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_step_changes_the_weights() {
        let t = tempfile::tempdir().unwrap();
        let words = ["alpha", "beta", "gamma", "delta", "one", "two", "three", "four"];
        let aug = Augment::new(model::tiny_folder(t.path(), &words).unwrap(), None, &candle_core::Device::Cpu).unwrap();
        let before: Vec<f32> = aug.named_vars()[0].1.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
        let mut opt = AdamW::new(
            aug.named_vars(),
            AdamWConfig { lr: 1e-2, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0 },
        );
        let q = aug.encode(&["alpha beta", "gamma delta"]).unwrap();
        let p = aug.encode(&["one two", "three four"]).unwrap();
        let loss = loss::ranking_loss(&q.matmul(&p.t().unwrap()).unwrap(), 20.0).unwrap();
        let store = loss.backward().unwrap();
        let mut grads = Grads::new();
        opt.collect(&store, &mut grads).unwrap();
        assert!(!grads.is_empty(), "no parameter received a gradient");
        opt.step(&grads, 1e-2).unwrap();
        let after: Vec<f32> = aug.named_vars()[0].1.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
        assert_ne!(before, after);
    }

    #[test]
    fn a_saved_checkpoint_reproduces_the_embeddings_exactly() {
        let t = tempfile::tempdir().unwrap();
        let words = ["alpha", "beta", "gamma", "delta"];
        let aug = Augment::new(model::tiny_folder(t.path(), &words).unwrap(), None, &candle_core::Device::Cpu).unwrap();
        let texts: Vec<String> = vec!["alpha beta".into(), "gamma".into(), "delta alpha gamma".into()];
        let before = aug.encoder().unwrap().embed(&texts, 2).unwrap();
        aug.save(&t.path().join("ckpt"), &HashMap::new(), None).unwrap();
        let reloaded =
            crate::models::bert::SentenceEncoder::load(&t.path().join("ckpt"), None, &candle_core::Device::Cpu)
                .unwrap()
                .embed(&texts, 2)
                .unwrap();
        assert_eq!(before, reloaded);
        // The graph used in training agrees with the inference path.
        let graph: Vec<Vec<f32>> =
            aug.encode(&["alpha beta", "gamma", "delta alpha gamma"]).unwrap().to_vec2().unwrap();
        for (g, r) in graph.iter().zip(&reloaded) {
            let n = r.iter().map(|x| x * x).sum::<f32>().sqrt();
            for (a, b) in g.iter().zip(r) {
                assert!((a - b / n).abs() < 1e-5);
            }
        }
    }
}
