//! What a train stage's YAML says: the training settings with their defaults filled in.
//! Read by the train stage, and by the eval stages that reproduce its split (so no default is copied).

use serde::{Deserialize, Serialize};

use super::{Retriever, TrainConfig};
use crate::workflow::{Device, Precision, Tunable};

/// The kind name of the stage these parameters belong to.
pub const KIND_NAME: &str = "train";

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
    /// w in concat(n(bb), w * n(aug)); `auto` trains at w = 1 and picks w on the validation split.
    #[serde(default)]
    pub weight: Tunable,
    /// BERT's hidden and attention dropout while training (0 turns it off).
    #[serde(default = "default_dropout")]
    pub dropout: f64,
    /// Hard negatives per pair mined with the black box (0 = in-batch negatives only).
    #[serde(default)]
    pub hard_negatives: usize,
    /// A mined negative must score at least this much below the positive (guards against false negatives).
    #[serde(default = "default_margin")]
    pub negative_margin: f64,
    /// Leave out of each query's in-batch negatives the passages the black box scores within
    /// `negative_margin` of its positive: too often a relevant passage the labels do not name.
    #[serde(default = "default_in_batch_guard")]
    pub in_batch_guard: bool,
    /// Reranker: negatives per query, mined from the first stage's top ranks.
    #[serde(default = "default_negatives")]
    pub negatives: usize,
    /// Reranker: a mined negative the black box scores above (1 - this) x the positive's score is
    /// left out (too often an unlabelled positive).
    #[serde(default = "default_margin")]
    pub relative_margin: f64,
    /// Reranker: how many of the first stage's documents it reranks (validation and eval).
    #[serde(default = "default_rerank_k")]
    pub rerank_k: usize,
    #[serde(default = "default_val")]
    pub val_fraction: f64,
    #[serde(default = "default_patience")]
    pub patience: usize,
    #[serde(default = "default_seed")]
    pub seed: u64,
    #[serde(default = "default_checkpoint_every")]
    pub checkpoint_every: u64,
    /// Where training runs; default `models.<augment>.device` (auto).
    #[serde(default)]
    pub device: Option<Device>,
    /// Start from the promoted model of this stage when there is one (a refresh continues training),
    /// or always from `models.<augment>.init` (`base`: retrain from scratch).
    #[serde(default)]
    pub init_from: InitFrom,
    /// auto (bf16 matrix products on a GPU, and on a CPU with AMX; f32 elsewhere) | f32 | bf16
    #[serde(default)]
    pub precision: Precision,
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
fn default_dropout() -> f64 {
    0.1
}
fn default_negatives() -> usize {
    7
}
/// Chosen by measurement on SciFact (BENCHMARKS.md, "The reranker").
pub fn default_rerank_k() -> usize {
    30
}
fn default_margin() -> f64 {
    0.05
}
fn default_in_batch_guard() -> bool {
    false
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

impl Params {
    /// The training settings these parameters make on `device` (`precision: auto` is bf16 on a GPU
    /// and where the CPU has a bf16 engine).
    pub fn train_config(&self, device: &candle_core::Device) -> TrainConfig {
        let p = self;
        let bf16 = match p.precision {
            Precision::Bf16 => true,
            Precision::F32 => false,
            Precision::Auto => device.is_cuda() || (device.is_cpu() && crate::bert::amx::available()),
        };
        TrainConfig {
            retriever: p.retriever,
            epochs: p.epochs,
            batch_size: p.batch_size,
            lr: p.lr,
            warmup: p.warmup,
            weight_decay: p.weight_decay,
            max_grad_norm: p.max_grad_norm,
            grad_accum: p.grad_accum,
            scale: p.scale,
            weight: p.weight.fixed().unwrap_or(super::AUTO_TRAINING_WEIGHT),
            weight_auto: p.weight.fixed().is_none() && p.retriever == Retriever::Mafin,
            dropout: p.dropout,
            seed: p.seed,
            patience: p.patience,
            checkpoint_every: p.checkpoint_every,
            bf16,
            in_batch_guard: (p.in_batch_guard && p.retriever != Retriever::Reranker).then_some(p.negative_margin),
            rerank: (p.retriever == Retriever::Reranker).then_some(super::RerankConfig {
                negatives: p.negatives,
                relative_margin: p.relative_margin,
                k: p.rerank_k,
            }),
        }
    }
}

impl Default for Params {
    fn default() -> Self {
        serde_json::from_value(serde_json::json!({})).expect("every train parameter has a default")
    }
}
