//! The bi-encoder learner: the augment model trained alone or beside the black box (Mafin), with
//! in-batch and mined negatives, on the CPU fast path or through candle's autograd.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};

use candle_core::Tensor;

use super::data::{self, Example};
use super::fit::{adam_config, fit};
use super::model::Augment;
use super::optim::{AdamW, Grads};
use super::step::{batch_texts, fast_step, graph_step};
use super::validate::{black_box_alpha, validation, validation_bm25};
use super::{Event, Learner, Retriever, TrainConfig, TrainData, TrainOutcome, Validation};
use crate::bert::dropout::Dropout;
use crate::error::{Error, Result};

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
    if cfg.retriever == Retriever::Mafin && data.bb.is_none() {
        return Err(Error::internal("mafin training was started without black-box vectors"));
    }
    let learner = BiEncoder {
        cfg,
        aug,
        data: *data,
        bm25: validation_bm25(data.val),
        relevance: data::Relevance::new(data.train),
        // The hand-written backward pass covers the CPU with mean or CLS pooling, in f32 or with
        // bf16 products on AMX; bf16 on a CPU without AMX and max pooling go through autograd.
        fast: aug.device.is_cpu()
            && aug.folder.pooling != crate::bert::Pooling::Max
            && (!cfg.bf16 || crate::bert::amx::available()),
        opt_names: AdamW::new(aug.named_vars(), adam_config(cfg)),
        guard: Default::default(),
    };
    let outcome = fit(cfg, &learner, dir, fingerprint, on)?;
    let (left, seen) = (learner.guard.0.into_inner(), learner.guard.1.into_inner());
    if let Some(margin) = cfg.in_batch_guard.filter(|_| seen > 0) {
        on(Event::Log(format!(
            "in-batch guard: {left} of {seen} in-batch negatives ({:.2}%) were left out, the black box scoring them within {margin} of the positive",
            100.0 * left as f64 / seen as f64
        )))?;
    }
    Ok(outcome)
}

/// The bi-encoder learner: the augment model, alone or beside the black box (Mafin).
struct BiEncoder<'a> {
    cfg: &'a TrainConfig,
    aug: &'a Augment,
    data: TrainData<'a>,
    /// What the training labels say is relevant: never taught as a negative.
    relevance: data::Relevance,
    fast: bool,
    /// BM25's top 100 for each validation query, for the hybrid alpha.
    bm25: Vec<Vec<(usize, f32)>>,
    /// An optimiser over the same parameters, whose order the autograd step collects gradients in.
    opt_names: AdamW,
    /// This run's in-batch (query, passage) entries the guard left out, and all it looked at.
    guard: (AtomicUsize, AtomicUsize),
}

impl Learner for BiEncoder<'_> {
    fn named_vars(&self) -> Vec<(String, candle_core::Var)> {
        self.aug.named_vars()
    }
    fn device(&self) -> &candle_core::Device {
        &self.aug.device
    }
    fn examples(&self) -> &[Example] {
        self.data.train
    }
    fn load_weights(&self, path: &Path) -> Result<()> {
        self.aug.load_weights(path)
    }
    fn save(&self, dest: &Path, extra: &HashMap<String, Tensor>, state: Option<&serde_json::Value>) -> Result<()> {
        self.aug.save(dest, extra, state)
    }
    fn step(&self, batch: &[usize], drop: Option<Dropout>, accum: usize) -> candle_core::Result<(f64, Grads)> {
        let (cfg, aug, train, bb) = (self.cfg, self.aug, self.data.train, self.data.bb);
        let (queries, passages) = batch_texts(train, batch);
        let texts = (&queries[..], &passages[..]);
        let mut masked = self.relevance.masked(train, batch);
        if let (Some(margin), Some(vectors)) = (cfg.in_batch_guard, bb) {
            let guarded = data::likely_positives(&queries, &passages, vectors, margin);
            self.guard.0.fetch_add(guarded.len(), Ordering::Relaxed);
            self.guard.1.fetch_add(queries.len() * passages.len().saturating_sub(1), Ordering::Relaxed);
            // An entry masked twice is masked once (the loss sets it, it does not add).
            masked.extend(guarded);
        }
        if self.fast {
            fast_step(cfg, aug, texts, &masked, bb, accum, drop)
        } else {
            graph_step(cfg, aug, &self.opt_names, texts, &masked, bb, accum, drop)
        }
    }
    fn validation_queries(&self) -> usize {
        self.data.val.queries.len()
    }
    fn validate(&self) -> Result<Validation> {
        let val = self.data.val;
        let v = validation(self.cfg, self.aug, val, self.data.bb, &self.bm25)?;
        let chosen = [
            v.weight.filter(|_| self.cfg.weight_auto).map(|w| format!("w {w:.1}")),
            v.alpha.map(|a| match val.queries.len() < crate::rank::fuse::MIN_BLEND_QUERIES {
                true => format!(
                    "hybrid alpha {a:.2} ({} validation queries are too few to choose a blend: the better side alone)",
                    val.queries.len()
                ),
                false => format!("hybrid alpha {a:.2}"),
            }),
        ];
        Ok(Validation { chosen: chosen.into_iter().flatten().collect(), ..v })
    }
    fn black_box_alpha(&self) -> Result<Option<f64>> {
        black_box_alpha(self.data.val, self.data.bb.as_ref(), &self.bm25)
    }
}
