//! Mafin training (arXiv 2402.12177): a frozen black-box embedding plus a trainable BERT augment,
//! trained with in-batch (and mined hard) negatives, validated every epoch, checkpointed to resume.

mod biencoder;
pub mod candidates;
pub mod data;
mod fit;
pub mod gain;
pub mod loss;
pub mod model;
pub mod optim;
pub mod params;
pub mod rerank;
pub mod retriever;
mod step;
mod validate;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use crate::bert::dropout::Dropout;
use crate::error::Result;
pub use biencoder::train;
use data::{Example, RetrievalSet};
pub use fit::fit;
use optim::Grads;
pub use retriever::{Retriever, normalized, retriever_rows};
pub use validate::black_box_alpha;

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
    /// w: the augment's weight in the Mafin concatenation (while training, when `weight_auto`).
    pub weight: f64,
    /// Pick w on the validation split at every validation (grid `weight_grid`), not `weight`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub weight_auto: bool,
    /// BERT's hidden and attention dropout while training (0: none).
    #[serde(default)]
    pub dropout: f64,
    pub seed: u64,
    /// Epochs without a better validation score before stopping.
    pub patience: usize,
    /// Save a resumable checkpoint every this many optimiser steps (and at every epoch's end).
    pub checkpoint_every: u64,
    /// Matrix products in bf16 (mixed precision, for GPUs); f32 otherwise. Left out of the
    /// fingerprint when off, so f32 checkpoints keep their folders.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub bf16: bool,
    /// The in-batch guard's margin (`data::likely_positives`); None: off (and left out of the
    /// fingerprint, so models trained without it keep their folders).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub in_batch_guard: Option<f64>,
    /// The reranker's own settings (None for the bi-encoders, so their fingerprints stay as they were).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rerank: Option<RerankConfig>,
}

/// What a reranker's training adds: negatives per query, the margin guard and the validated depth.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct RerankConfig {
    pub negatives: usize,
    pub relative_margin: f64,
    pub k: usize,
}

/// The w Mafin trains at when w is chosen afterwards: the augment's half of the cosine is as large
/// as the black box's, so its gradient is not scaled down (at w = 0.5 it gets a fifth of the loss's).
pub const AUTO_TRAINING_WEIGHT: f64 = 1.0;

/// The w tried when it is chosen on validation: 0.1 to 2.0 by 0.1.
pub fn weight_grid() -> impl Iterator<Item = f64> {
    (1..=20).map(|i| i as f64 / 10.0)
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
    /// What the best validation chose: w (Mafin) and the hybrid alpha over this retriever.
    #[serde(default)]
    pub best_weight: Option<f64>,
    #[serde(default)]
    pub best_alpha: Option<f64>,
    /// The hybrid alpha over the black box alone, on the same validation split.
    #[serde(default)]
    pub black_box_alpha: Option<f64>,
    /// Each validation query's nDCG@10 for the starting model and for the best, for `gain::Gain`.
    #[serde(default)]
    pub start_per_query: Vec<f64>,
    #[serde(default)]
    pub best_per_query: Vec<f64>,
}

impl TrainState {
    /// Whether training beat its starting model on validation (None: there was no validation).
    pub fn improved(&self) -> Option<bool> {
        self.best_epoch.map(|e| e > 0)
    }

    /// The best model's nDCG@10 gain over the start on validation, with its bootstrap interval.
    pub fn gain(&self) -> Option<gain::Gain> {
        gain::Gain::paired(&self.start_per_query, &self.best_per_query)
    }
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

/// One validation: the metrics at what it chose (w, a blend), and what it chose for the log.
pub struct Validation {
    pub metrics: std::collections::BTreeMap<String, f64>,
    /// Mafin's w (bi-encoders) or none.
    pub weight: Option<f64>,
    /// The hybrid alpha over this retriever (bi-encoders), or the reranker's blend with its first stage.
    pub alpha: Option<f64>,
    /// What was chosen, in words (`hybrid alpha 0.35`).
    pub chosen: Vec<String>,
    /// Each validation query's nDCG@10, in the validation set's order (for the gain's interval).
    pub per_query: Vec<f64>,
}

/// What the training loop drives: a model with its data, its batch step and its validation. The loop
/// (`fit`) owns the optimiser, checkpoints, resume, early stopping and "not improved".
pub trait Learner {
    fn named_vars(&self) -> Vec<(String, candle_core::Var)>;
    fn device(&self) -> &candle_core::Device;
    /// The training examples, batched by `data::batches`.
    fn examples(&self) -> &[Example];
    /// Overwrites every parameter from a checkpoint's model.safetensors.
    fn load_weights(&self, path: &Path) -> Result<()>;
    /// Writes a checkpoint folder (weights, and for `last/` the optimiser's moments and position).
    fn save(&self, dest: &Path, extra: &HashMap<String, Tensor>, state: Option<&serde_json::Value>) -> Result<()>;
    /// One batch's loss and gradients, divided by `accum`.
    fn step(&self, batch: &[usize], drop: Option<Dropout>, accum: usize) -> candle_core::Result<(f64, Grads)>;
    fn validation_queries(&self) -> usize;
    fn validate(&self) -> Result<Validation>;
    /// The hybrid alpha of BM25 with the frozen black box on the validation split, if it has one.
    fn black_box_alpha(&self) -> Result<Option<f64>>;
}

#[cfg(test)]
mod tests {
    use super::*;
    use model::Augment;
    use optim::{AdamW, AdamWConfig};
    use step::{batch_texts, fast_step, graph_step};

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
            weight_auto: false,
            dropout: 0.0,
            seed: 1,
            patience: 1,
            checkpoint_every: 0,
            bf16: false,
            in_batch_guard: None,
            rerank: None,
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
        let loss = loss::ranking_loss(&q.matmul(&p.t().unwrap()).unwrap(), 20.0, &[]).unwrap();
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
        let encoder = aug.encoder().unwrap();
        let before = encoder.embed(&texts, 2).unwrap();
        aug.save(&t.path().join("ckpt"), &HashMap::new(), None).unwrap();
        let reloaded = crate::bert::encoder::SentenceEncoder::load(
            &t.path().join("ckpt"),
            None,
            &candle_core::Device::Cpu,
            encoder.products(),
        )
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
        // The graph used in training agrees with the inference path (in f32, as the graph runs).
        let graph: Vec<Vec<f32>> =
            aug.encode(&["alpha beta", "gamma", "delta alpha gamma"]).unwrap().to_vec2().unwrap();
        let reloaded_f32 = crate::bert::encoder::SentenceEncoder::load(
            &t.path().join("ckpt"),
            None,
            &candle_core::Device::Cpu,
            crate::bert::Products::F32,
        )
        .unwrap()
        .embed(&texts, 2)
        .unwrap();
        for (g, r) in graph.iter().zip(&reloaded_f32) {
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
        let (l32, g32) = graph_step(&cfg, &aug, &opt, (&q[..], &p[..]), &[], &None, 1, None).unwrap();
        aug.model.compute = candle_core::DType::BF16;
        let (l16, g16) = graph_step(&cfg, &aug, &opt, (&q[..], &p[..]), &[], &None, 1, None).unwrap();
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
        let mut losses = Vec::new();
        // Without dropout, and with it: both paths must drop the same elements. Query 0's row leaves
        // out passage 2 (as if the labels said it were relevant): both paths mask the same entry.
        let masked = [(0, 2)];
        for drop in [None, Some(Dropout { p: 0.3, seed: 11, seq_offset: 0 })] {
            let (l1, g1) = fast_step(&cfg, &aug, (&q, &p), &masked, &bb, 2, drop).unwrap();
            let (l2, g2) = graph_step(&cfg, &aug, &opt, (&q, &p), &masked, &bb, 2, drop).unwrap();
            assert!((l1 - l2).abs() < 1e-4, "dropout {drop:?}: loss {l1} vs {l2}");
            assert_eq!(g1.len(), g2.len());
            for (name, a) in &g1 {
                let a: Vec<f32> = a.flatten_all().unwrap().to_vec1().unwrap();
                let b: Vec<f32> = g2[name].flatten_all().unwrap().to_vec1().unwrap();
                let scale = b.iter().fold(1e-4f32, |m, x| m.max(x.abs()));
                for (x, y) in a.iter().zip(&b) {
                    assert!((x - y).abs() <= 2e-3 * scale, "dropout {drop:?} {name}: {x} vs {y} (scale {scale})");
                }
            }
            // The same seed drops the same elements again.
            assert_eq!(fast_step(&cfg, &aug, (&q, &p), &masked, &bb, 2, drop).unwrap().0, l1);
            assert_ne!(fast_step(&cfg, &aug, (&q, &p), &[], &bb, 2, drop).unwrap().0, l1, "the mask changed nothing");
            losses.push(l1);
        }
        assert_ne!(losses[0], losses[1], "dropout did not change the training loss");
        // Inference (what validation and every eval stage embed with) never drops.
        let texts: Vec<String> = q.iter().map(|t| t.to_string()).collect();
        let a = aug.encoder().unwrap().embed(&texts, 8).unwrap();
        let b = aug.encoder().unwrap().embed(&texts, 8).unwrap();
        assert_eq!(a, b);
    }
}
