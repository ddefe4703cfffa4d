//! One batch's loss and gradients, by the two training paths: candle autograd on any device, and the
//! CPU fast path (packed encoder, hand-written backward, autograd only for the loss on pooled rows).

use candle_core::Tensor;

use super::data::Example;
use super::model::Augment;
use super::optim::{AdamW, Grads};
use super::{BlackBoxVectors, Retriever, TrainConfig, loss, normalized};
use crate::bert::dropout::Dropout;

/// The texts of one batch: its queries, then its passages (positives, then any hard negatives).
pub(super) fn batch_texts<'a>(train: &'a [Example], batch: &[usize]) -> (Vec<&'a str>, Vec<&'a str>) {
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
    masked: &[(usize, usize)],
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
    loss::ranking_loss(&loss::combined(&s_aug, s_bb.as_ref(), cfg.weight)?, cfg.scale, masked)
}

/// One batch through candle's autograd (any device): the loss and the parameters' gradients / accum.
/// `masked`: the (query, passage) entries that are not negatives (`data::Relevance::masked`).
#[allow(clippy::too_many_arguments)]
pub(super) fn graph_step(
    cfg: &TrainConfig,
    aug: &Augment,
    opt: &AdamW,
    texts: (&[&str], &[&str]),
    masked: &[(usize, usize)],
    bb: &BlackBoxVectors,
    accum: usize,
    drop: Option<Dropout>,
) -> candle_core::Result<(f64, Grads)> {
    let (queries, passages) = texts;
    // Passages are sequences queries.len().. of the batch, as in the CPU path's single pass.
    let pdrop = drop.map(|d| Dropout { seq_offset: queries.len(), ..d });
    let (q, p) = (aug.encode_with(queries, drop.as_ref())?, aug.encode_with(passages, pdrop.as_ref())?);
    let loss = loss_from(cfg, &q, &p, queries, passages, bb, masked)?;
    let mut grads = Grads::new();
    opt.collect(&(&loss / accum as f64)?.backward()?, &mut grads)?;
    Ok((loss.to_scalar::<f32>()? as f64, grads))
}

/// One batch on the CPU through the packed encoder and its hand-written backward pass: all texts in
/// one forward pass with no padding; autograd only for the small loss on the pooled embeddings.
pub(super) fn fast_step(
    cfg: &TrainConfig,
    aug: &Augment,
    texts: (&[&str], &[&str]),
    masked: &[(usize, usize)],
    bb: &BlackBoxVectors,
    accum: usize,
    drop: Option<Dropout>,
) -> candle_core::Result<(f64, Grads)> {
    let (queries, passages) = texts;
    let vb = candle_nn::VarBuilder::from_varmap(&aug.varmap, candle_core::DType::F32, &aug.device);
    let products = if cfg.bf16 { crate::bert::Products::Bf16 } else { crate::bert::Products::F32 };
    let cpu = crate::bert::packed::CpuBert::load(&vb, &aug.folder.config)?.with_products(products, false);
    let all: Vec<&str> = queries.iter().chain(passages).copied().collect();
    let enc = aug.folder.tokenizer.encode_batch(all.clone(), true).map_err(candle_core::Error::msg)?;
    let lens: Vec<usize> = enc.iter().map(|e| e.get_ids().len()).collect();
    let ids: Vec<u32> = enc.iter().flat_map(|e| e.get_ids().iter().copied()).collect();
    let (hidden, tape) = crate::bert::backward::forward(&cpu, &ids, &lens, drop.as_ref())?;
    let h = cpu.hidden;
    // The rows each sequence's embedding averages: all its tokens (mean pooling) or the first (CLS).
    let cls = aug.folder.pooling == crate::bert::Pooling::Cls;
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
    let loss = loss_from(cfg, &q, &p, queries, passages, bb, masked)?;
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
    let mut flat = crate::bert::backward::backward(&cpu, tape, dhidden);
    let mut grads = Grads::new();
    for (name, var) in aug.named_vars() {
        if let Some(g) = flat.remove(&name) {
            grads.insert(name, Tensor::from_vec(g, var.shape(), &aug.device)?);
        }
    }
    Ok((loss.to_scalar::<f32>()? as f64, grads))
}
