//! The training loop every learner shares: batches, gradient accumulation, AdamW with warm-up, one
//! validation per epoch keeping the best checkpoint, early stopping, and `last/` to resume after a kill.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::Tensor;

use super::optim::{self, AdamW, AdamWConfig, Grads};
use super::{Event, Learner, TrainConfig, TrainOutcome, TrainState, data, model};
use crate::bert::dropout::Dropout;
use crate::error::{Error, Result};

pub(super) fn adam_config(cfg: &TrainConfig) -> AdamWConfig {
    AdamWConfig { lr: cfg.lr, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: cfg.weight_decay }
}

/// The training loop over any `Learner`: batches, gradient accumulation, AdamW with warm-up, a
/// validation per epoch (the start included) keeping the best in `dir/best`, early stopping, and
/// `dir/last` to resume from after a kill.
pub fn fit(
    cfg: &TrainConfig,
    learner: &dyn Learner,
    dir: &Path,
    fingerprint: &str,
    on: &mut dyn FnMut(Event) -> Result<()>,
) -> Result<TrainOutcome> {
    std::fs::create_dir_all(dir).map_err(Error::io(dir))?;
    let opt = AdamW::new(learner.named_vars(), adam_config(cfg));
    let per_epoch: Vec<usize> =
        (0..cfg.epochs).map(|e| data::batches(learner.examples(), cfg.batch_size, cfg.seed, e).len()).collect();
    let accum = cfg.grad_accum.max(1);
    let total_steps: u64 = per_epoch.iter().map(|&b| b.div_ceil(accum) as u64).sum();
    let mut t = Trainer {
        cfg,
        learner,
        best_dir: dir.join("best"),
        last_dir: dir.join("last"),
        opt,
        state: TrainState { fingerprint: fingerprint.to_string(), ..Default::default() },
        step_seconds: 0.0,
        step_pairs: 0,
        total_steps,
        warmup: (total_steps as f64 * cfg.warmup).ceil() as u64,
    };
    let resumed = t.resume(on)?;
    if t.state.black_box_alpha.is_none() {
        t.state.black_box_alpha = learner.black_box_alpha()?;
    }
    if !t.state.validated_start {
        // The starting model is the first candidate: training must beat it to replace it.
        t.validate(0, on)?;
        t.state.validated_start = true;
    }
    while t.state.epoch < cfg.epochs && !t.state.done {
        t.epoch(on)?;
    }
    if learner.validation_queries() == 0 {
        // Nothing to choose by: the last weights are the result.
        learner.save(&t.best_dir, &HashMap::new(), None)?;
    }
    let Trainer { state, step_seconds, step_pairs, best_dir, total_steps, .. } = t;
    Ok(TrainOutcome { state, step_seconds, step_pairs, best_dir, total_steps, resumed })
}

fn tensor_err(e: candle_core::Error) -> Error {
    Error::Tensor { what: "training".into(), source: e }
}

/// One training run's moving parts: the learner, its optimiser and where it stands.
struct Trainer<'a> {
    cfg: &'a TrainConfig,
    learner: &'a dyn Learner,
    best_dir: PathBuf,
    last_dir: PathBuf,
    opt: AdamW,
    state: TrainState,
    step_seconds: f64,
    step_pairs: usize,
    total_steps: u64,
    warmup: u64,
}

impl Trainer<'_> {
    /// Continues from `last/` when an earlier attempt with the same fingerprint left it.
    fn resume(&mut self, on: &mut dyn FnMut(Event) -> Result<()>) -> Result<bool> {
        let Some(last) = model::existing_checkpoint(&self.last_dir) else { return Ok(false) };
        let Some(saved) = std::fs::read_to_string(last.join("trainer_state.json"))
            .ok()
            .and_then(|text| serde_json::from_str::<TrainState>(&text).ok())
            .filter(|saved| saved.fingerprint == self.state.fingerprint)
        else {
            return Ok(false);
        };
        self.learner.load_weights(&last.join("model.safetensors"))?;
        let moments = last.join("optimizer.safetensors");
        if moments.exists() {
            let t = candle_core::safetensors::load(&moments, self.learner.device()).map_err(tensor_err)?;
            for name in self.opt.names().map(str::to_string).collect::<Vec<_>>() {
                if let (Some(m), Some(v)) = (t.get(&format!("m.{name}")), t.get(&format!("v.{name}"))) {
                    self.opt.m.insert(name.clone(), m.clone());
                    self.opt.v.insert(name, v.clone());
                }
            }
        }
        self.opt.t = saved.adam_t;
        on(Event::Log(format!(
            "resuming training at epoch {}, batch {} (step {})",
            saved.epoch + 1,
            saved.next_batch,
            saved.step
        )))?;
        self.state = saved;
        Ok(true)
    }

    /// `last/`: weights, optimiser moments and position, for a resume.
    fn save_last(&self) -> Result<()> {
        let mut extra: HashMap<String, Tensor> = HashMap::new();
        for (n, m) in &self.opt.m {
            extra.insert(format!("m.{n}"), m.clone());
        }
        for (n, v) in &self.opt.v {
            extra.insert(format!("v.{n}"), v.clone());
        }
        let mut st = self.state.clone();
        st.adam_t = self.opt.t;
        self.learner.save(&self.last_dir, &extra, Some(&serde_json::to_value(&st).expect("state json")))
    }

    /// Scores the model on the validation set; a better score replaces `best/`.
    fn validate(&mut self, epoch_done: usize, on: &mut dyn FnMut(Event) -> Result<()>) -> Result<bool> {
        if self.learner.validation_queries() == 0 {
            return Ok(false);
        }
        let v = self.learner.validate()?;
        let m = v.metrics;
        on(Event::Validation { step: self.state.step, epoch: epoch_done, metrics: &m })?;
        if !v.chosen.is_empty() {
            on(Event::Log(format!("validation after epoch {epoch_done} chose {}", v.chosen.join(", "))))?;
        }
        let score = (m.get("recall@10").copied().unwrap_or(0.0), m.get("ndcg@10").copied().unwrap_or(0.0));
        let state = &mut self.state;
        let better = state.best.is_none_or(|b| score > b);
        if epoch_done == 0 {
            state.start_per_query.clone_from(&v.per_query);
        }
        if better {
            state.best_per_query = v.per_query;
            state.best = Some(score);
            state.best_epoch = Some(epoch_done);
            state.best_metrics = m;
            state.best_weight = v.weight;
            state.best_alpha = v.alpha;
            state.bad_epochs = 0;
            self.learner.save(&self.best_dir, &HashMap::new(), None)?;
        } else {
            state.bad_epochs += 1;
        }
        Ok(better)
    }

    /// The rest of the current epoch (from `next_batch`), then its validation and early-stop check.
    fn epoch(&mut self, on: &mut dyn FnMut(Event) -> Result<()>) -> Result<()> {
        let cfg = self.cfg;
        let accum = cfg.grad_accum.max(1);
        let batches = data::batches(self.learner.examples(), cfg.batch_size, cfg.seed, self.state.epoch);
        let mut grads = Grads::new();
        let (mut pending, mut loss_sum) = (0usize, 0.0);
        for (bi, batch) in batches.iter().enumerate().skip(self.state.next_batch) {
            let started = std::time::Instant::now();
            // A mask per (epoch, batch), so a resumed run drops what the uninterrupted one would.
            let drop = (cfg.dropout > 0.0).then(|| Dropout {
                p: cfg.dropout as f32,
                seed: Dropout::step_seed(cfg.seed, self.state.epoch as u64, bi as u64),
                seq_offset: 0,
            });
            let (loss, g) = self.learner.step(batch, drop, accum).map_err(tensor_err)?;
            for (name, g) in g {
                optim::accumulate(&mut grads, name, g).map_err(tensor_err)?;
            }
            loss_sum += loss;
            pending += 1;
            self.step_pairs += batch.len();
            let stepping = pending == accum || bi + 1 == batches.len();
            let lr = optim::lr_at(self.state.step, self.total_steps, self.warmup, cfg.lr);
            if stepping {
                optim::clip_grad_norm(&mut grads, cfg.max_grad_norm).map_err(tensor_err)?;
                self.opt.step(&grads, lr).map_err(tensor_err)?;
                grads.clear();
            }
            self.step_seconds += started.elapsed().as_secs_f64();
            if !stepping {
                continue;
            }
            self.state.step += 1;
            self.state.next_batch = bi + 1;
            let pairs = batches[bi + 1 - pending..=bi].iter().map(Vec::len).sum();
            let epoch = self.state.epoch + 1;
            on(Event::Step { step: self.state.step, epoch, loss: loss_sum / pending as f64, lr, pairs })?;
            (pending, loss_sum) = (0, 0.0);
            if cfg.checkpoint_every > 0
                && self.state.step.is_multiple_of(cfg.checkpoint_every)
                && bi + 1 < batches.len()
            {
                self.save_last()?;
            }
        }
        self.state.epoch += 1;
        self.state.next_batch = 0;
        let epoch = self.state.epoch;
        let improved = self.validate(epoch, on)?;
        let state = &mut self.state;
        if !improved
            && self.learner.validation_queries() > 0
            && state.bad_epochs >= cfg.patience.max(1)
            && state.epoch < cfg.epochs
        {
            on(Event::Log(format!(
                "early stop after epoch {}: no better validation for {} epochs",
                state.epoch, state.bad_epochs
            )))?;
            state.stopped_early = true;
            state.done = true;
        }
        state.done |= state.epoch >= cfg.epochs;
        self.save_last()
    }
}
