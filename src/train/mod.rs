//! Mafin training (arXiv 2402.12177): a frozen black-box embedding plus a trainable BERT augment,
//! trained with in-batch (and mined hard) negatives, validated every epoch, checkpointed to resume.

pub mod bert;
pub mod data;
pub mod fast;
pub mod loss;
pub mod model;
pub mod optim;
pub mod retriever;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::eval::{metrics, search};
use data::{Example, RetrievalSet};
use model::Augment;
use optim::{AdamW, AdamWConfig, Grads};
pub use retriever::{Retriever, normalized, retriever_rows};

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
    /// Matrix products in bf16 (mixed precision, for GPUs); f32 otherwise. Left out of the
    /// fingerprint when off, so f32 checkpoints keep their folders.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub bf16: bool,
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
    /// Time in forward, backward and optimiser steps (not validation or checkpoints), and the pairs
    /// those steps covered: the training throughput.
    pub step_seconds: f64,
    pub step_pairs: usize,
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
    let (mut step_seconds, mut step_pairs) = (0.0f64, 0usize);
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
    // The hand-written backward pass covers the CPU with mean or CLS pooling; the rest goes through autograd.
    // The hand-written CPU step is f32; bf16 (meant for GPUs) goes through autograd anywhere.
    let fast = aug.device.is_cpu() && aug.folder.pooling != crate::models::bert::Pooling::Max && !cfg.bf16;
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
        let mut st = state.clone();
        st.adam_t = opt.t;
        aug.save(&last_dir, &extra, Some(&serde_json::to_value(&st).expect("state json")))
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
            let started = std::time::Instant::now();
            let (queries, passages) = batch_texts(train, batch);
            let texts = (&queries[..], &passages[..]);
            let (loss, g) =
                if fast { fast_step(cfg, aug, texts, bb, accum) } else { graph_step(cfg, aug, &opt, texts, bb, accum) }
                    .map_err(tensor_err)?;
            for (name, g) in g {
                optim::accumulate(&mut grads, name, g).map_err(tensor_err)?;
            }
            loss_sum += loss;
            pending += 1;
            step_pairs += batch.len();
            let stepping = pending == accum || bi + 1 == batches.len();
            let lr = optim::lr_at(state.step, total_steps, warmup, cfg.lr);
            if stepping {
                optim::clip_grad_norm(&mut grads, cfg.max_grad_norm).map_err(tensor_err)?;
                opt.step(&grads, lr).map_err(tensor_err)?;
                grads.clear();
            }
            step_seconds += started.elapsed().as_secs_f64();
            if !stepping {
                continue;
            }
            state.step += 1;
            state.next_batch = bi + 1;
            let pairs = batches[bi + 1 - pending..=bi].iter().map(Vec::len).sum();
            on(Event::Step { step: state.step, epoch: state.epoch + 1, loss: loss_sum / pending as f64, lr, pairs })?;
            (pending, loss_sum) = (0, 0.0);
            if cfg.checkpoint_every > 0 && state.step.is_multiple_of(cfg.checkpoint_every) && bi + 1 < batches.len() {
                save_last(&state, &opt)?;
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
    Ok(TrainOutcome { state, step_seconds, step_pairs, best_dir, total_steps, resumed })
}

/// The texts of one batch: its queries, then its passages (positives, then any hard negatives).
fn batch_texts<'a>(train: &'a [Example], batch: &[usize]) -> (Vec<&'a str>, Vec<&'a str>) {
    let queries: Vec<&str> = batch.iter().map(|&i| train[i].query.as_str()).collect();
    let mut passages: Vec<&str> = batch.iter().map(|&i| train[i].positive.as_str()).collect();
    passages.extend(batch.iter().filter_map(|&i| train[i].negative.as_deref()));
    (queries, passages)
}

/// The loss from the augment's normalised query and passage embeddings (and, for Mafin, the black box's).
fn loss_from(
    cfg: &TrainConfig,
    q: &Tensor,
    p: &Tensor,
    queries: &[&str],
    passages: &[&str],
    bb: &BlackBoxVectors,
) -> candle_core::Result<Tensor> {
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
                Tensor::from_vec(flat, (texts.len(), dim), q.device())
            };
            Some(rows(queries)?.matmul(&rows(passages)?.t()?)?)
        }
        _ => None,
    };
    loss::ranking_loss(&loss::combined(&s_aug, s_bb.as_ref(), cfg.weight)?, cfg.scale)
}

/// One batch through candle's autograd (any device): the loss and the parameters' gradients / accum.
fn graph_step(
    cfg: &TrainConfig,
    aug: &Augment,
    opt: &AdamW,
    texts: (&[&str], &[&str]),
    bb: &BlackBoxVectors,
    accum: usize,
) -> candle_core::Result<(f64, Grads)> {
    let (queries, passages) = texts;
    let loss = loss_from(cfg, &aug.encode(queries)?, &aug.encode(passages)?, queries, passages, bb)?;
    let mut grads = Grads::new();
    opt.collect(&(&loss / accum as f64)?.backward()?, &mut grads)?;
    Ok((loss.to_scalar::<f32>()? as f64, grads))
}

/// One batch on the CPU through the packed encoder and its hand-written backward pass: all texts in
/// one forward pass with no padding; autograd only for the small loss on the pooled embeddings.
fn fast_step(
    cfg: &TrainConfig,
    aug: &Augment,
    texts: (&[&str], &[&str]),
    bb: &BlackBoxVectors,
    accum: usize,
) -> candle_core::Result<(f64, Grads)> {
    let (queries, passages) = texts;
    let vb = candle_nn::VarBuilder::from_varmap(&aug.varmap, candle_core::DType::F32, &aug.device);
    let cpu = crate::models::bert_cpu::CpuBert::load(&vb, &aug.folder.config)?;
    let all: Vec<&str> = queries.iter().chain(passages).copied().collect();
    let enc = aug.folder.tokenizer.encode_batch(all.clone(), true).map_err(candle_core::Error::msg)?;
    let lens: Vec<usize> = enc.iter().map(|e| e.get_ids().len()).collect();
    let ids: Vec<u32> = enc.iter().flat_map(|e| e.get_ids().iter().copied()).collect();
    let (hidden, tape) = fast::forward(&cpu, &ids, &lens)?;
    let h = cpu.hidden;
    // The rows each sequence's embedding averages: all its tokens (mean pooling) or the first (CLS).
    let cls = aug.folder.pooling == crate::models::bert::Pooling::Cls;
    let mut pooled_rows = Vec::with_capacity(lens.len());
    let mut start = 0;
    for &n in &lens {
        pooled_rows.push(if cls { start..start + n.min(1) } else { start..start + n });
        start += n;
    }
    let mut pooled = vec![0.0f32; all.len() * h];
    for (s, rows) in pooled_rows.iter().enumerate() {
        let (out, count) = (&mut pooled[s * h..(s + 1) * h], rows.len().max(1) as f32);
        for r in rows.clone() {
            out.iter_mut().zip(&hidden[r * h..(r + 1) * h]).for_each(|(o, x)| *o += x / count);
        }
    }
    let leaf = candle_core::Var::from_vec(pooled, (all.len(), h), &aug.device)?;
    let emb = loss::normalize(leaf.as_tensor())?;
    let (q, p) = (emb.narrow(0, 0, queries.len())?, emb.narrow(0, queries.len(), passages.len())?);
    let loss = loss_from(cfg, &q, &p, queries, passages, bb)?;
    let dpool: Vec<f32> = (&loss / accum as f64)?
        .backward()?
        .get(leaf.as_tensor())
        .ok_or_else(|| candle_core::Error::msg("no gradient reached the pooled embeddings"))?
        .flatten_all()?
        .to_vec1()?;
    let mut dhidden = vec![0.0f32; hidden.len()];
    for (s, rows) in pooled_rows.iter().enumerate() {
        let (g, count) = (&dpool[s * h..(s + 1) * h], rows.len().max(1) as f32);
        for r in rows.clone() {
            dhidden[r * h..(r + 1) * h].iter_mut().zip(g).for_each(|(d, g)| *d = g / count);
        }
    }
    let mut flat = fast::backward(&cpu, &tape, dhidden);
    let mut grads = Grads::new();
    for (name, var) in aug.named_vars() {
        if let Some(g) = flat.remove(&name) {
            grads.insert(name, Tensor::from_vec(g, var.shape(), &aug.device)?);
        }
    }
    Ok((loss.to_scalar::<f32>()? as f64, grads))
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

    /// Settings for one hand-checked step: no warm-up, decay or clipping.
    fn step_cfg(retriever: Retriever, grad_accum: usize) -> TrainConfig {
        TrainConfig {
            retriever,
            epochs: 1,
            batch_size: 3,
            lr: 1e-3,
            warmup: 0.0,
            weight_decay: 0.0,
            max_grad_norm: 0.0,
            grad_accum,
            scale: 20.0,
            weight: 0.5,
            seed: 1,
            patience: 1,
            checkpoint_every: 0,
            bf16: false,
        }
    }

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

        // A parent's BERT pooler is not trained, but it is kept: transformers then loads the folder
        // without initialising missing weights.
        let mut parent =
            candle_core::safetensors::load(t.path().join("ckpt/model.safetensors"), &candle_core::Device::Cpu).unwrap();
        let pooler = Tensor::from_vec(vec![0.25f32, -1.5, 3.0, 0.5], (2, 2), &candle_core::Device::Cpu).unwrap();
        parent.insert("bert.pooler.dense.weight".into(), pooler.clone());
        std::fs::create_dir_all(t.path().join("parent")).unwrap();
        candle_core::safetensors::save(&parent, t.path().join("parent/model.safetensors")).unwrap();
        let child = Augment::new(
            aug.folder.clone(),
            Some(&t.path().join("parent/model.safetensors")),
            &candle_core::Device::Cpu,
        )
        .unwrap();
        child.save(&t.path().join("child"), &HashMap::new(), None).unwrap();
        let saved = candle_core::safetensors::load(t.path().join("child/model.safetensors"), &candle_core::Device::Cpu)
            .unwrap();
        let kept: Vec<f32> = saved["pooler.dense.weight"].flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(kept, [0.25, -1.5, 3.0, 0.5]);
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

    /// Mixed precision (bf16 products, f32 weights) follows the f32 step: nearly the same loss, and
    /// gradients that point the same way for every parameter.
    #[test]
    fn a_bf16_step_follows_the_f32_step() {
        let t = tempfile::tempdir().unwrap();
        let words = ["alpha", "beta", "gamma", "delta", "one", "two", "three", "four"];
        let mut aug =
            Augment::new(model::tiny_folder(t.path(), &words).unwrap(), None, &candle_core::Device::Cpu).unwrap();
        let cfg = step_cfg(Retriever::AugmentOnly, 1);
        let opt = AdamW::new(
            aug.named_vars(),
            AdamWConfig { lr: 1e-3, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0 },
        );
        let q = ["alpha beta", "gamma", "delta delta one"];
        let p = ["one two three", "three four alpha delta", "two"];
        let (l32, g32) = graph_step(&cfg, &aug, &opt, (&q[..], &p[..]), &None, 1).unwrap();
        aug.model.compute = candle_core::DType::BF16;
        let (l16, g16) = graph_step(&cfg, &aug, &opt, (&q[..], &p[..]), &None, 1).unwrap();
        assert!((l32 - l16).abs() < 0.02 * l32.abs().max(1.0), "loss {l32} vs {l16}");
        // bf16 rounding shows in the loss: the products really ran in bf16.
        assert_ne!(l32, l16);
        for (name, a) in &g32 {
            assert_eq!(g16[name].dtype(), candle_core::DType::F32, "{name}");
            let a: Vec<f32> = a.flatten_all().unwrap().to_vec1().unwrap();
            let b: Vec<f32> = g16[name].flatten_all().unwrap().to_vec1().unwrap();
            let dot: f32 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
            let (na, nb) = (a.iter().map(|x| x * x).sum::<f32>().sqrt(), b.iter().map(|x| x * x).sum::<f32>().sqrt());
            if na > 1e-6 {
                assert!(dot / (na * nb) > 0.95, "{name}: cosine {}", dot / (na * nb));
            }
        }
    }

    /// The CPU step (packed encoder, hand-written backward) and the autograd step agree on a Mafin
    /// batch with a hard negative: same loss, same gradient for every parameter.
    #[test]
    fn fast_and_graph_steps_agree() {
        let t = tempfile::tempdir().unwrap();
        let words = ["alpha", "beta", "gamma", "delta", "one", "two", "three", "four"];
        let aug = Augment::new(model::tiny_folder(t.path(), &words).unwrap(), None, &candle_core::Device::Cpu).unwrap();
        let train = vec![
            Example {
                query: "alpha beta".into(),
                positive: "one two three".into(),
                doc: "a".into(),
                negative: Some("four".into()),
            },
            Example {
                query: "gamma".into(),
                positive: "three four alpha delta".into(),
                doc: "b".into(),
                negative: None,
            },
            Example { query: "delta delta one".into(), positive: "two".into(), doc: "c".into(), negative: None },
        ];
        let mut bb = HashMap::new();
        let mut rng = fastrand::Rng::with_seed(5);
        for e in &train {
            for text in [Some(&e.query), Some(&e.positive), e.negative.as_ref()].into_iter().flatten() {
                bb.insert(text.clone(), (0..8).map(|_| rng.f32() - 0.5).collect::<Vec<f32>>());
            }
        }
        let bb = Some(bb);
        let cfg = step_cfg(Retriever::Mafin, 2);
        let opt = AdamW::new(
            aug.named_vars(),
            AdamWConfig { lr: 1e-3, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0 },
        );
        let (q, p) = batch_texts(&train, &[0, 1, 2]);
        let (l1, g1) = fast_step(&cfg, &aug, (&q, &p), &bb, 2).unwrap();
        let (l2, g2) = graph_step(&cfg, &aug, &opt, (&q, &p), &bb, 2).unwrap();
        assert!((l1 - l2).abs() < 1e-4, "loss {l1} vs {l2}");
        assert_eq!(g1.len(), g2.len());
        for (name, a) in &g1 {
            let a: Vec<f32> = a.flatten_all().unwrap().to_vec1().unwrap();
            let b: Vec<f32> = g2[name].flatten_all().unwrap().to_vec1().unwrap();
            let scale = b.iter().fold(1e-4f32, |m, x| m.max(x.abs()));
            for (x, y) in a.iter().zip(&b) {
                assert!((x - y).abs() <= 2e-3 * scale, "{name}: {x} vs {y} (scale {scale})");
            }
        }
    }
}
