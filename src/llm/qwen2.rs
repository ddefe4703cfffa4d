//! Qwen2 from a GGUF with two copies of each layer weight: f32 for the prompt (a matrix product,
//! 10x faster than quantized on CPU) and quantized for token-by-token decoding (half the bytes read).
//!
//! Ported from candle-transformers' `quantized_qwen2` (MIT/Apache-2.0), whose weights are one or the
//! other for the whole model (`CANDLE_DEQUANTIZE_ALL`) and whose fields are private; the arithmetic is
//! the same. `CANDLE_DEQUANTIZE_ALL=0` keeps only the quantized copy (less memory, slow prompts).

use std::collections::HashMap;

use candle_core::quantized::{QMatMul, QTensor, gguf_file};
use candle_core::{DType, Device, IndexOp, Module, Result, Tensor};
use candle_nn::Embedding;
use candle_transformers::quantized_nn::RmsNorm;
use candle_transformers::utils::{build_causal_mask, repeat_kv};

/// A weight with its quantized form and, for products of more than one row, its f32 form.
struct Linear {
    quantized: QMatMul,
    dense: Option<QMatMul>,
}

impl Linear {
    /// `dense` asks for the f32 copy; K-quants never get one: candle's K-quant kernels multiply a
    /// prompt faster than f32 does on this CPU (1.5B Q4_K_M: 61 against 42 tok/s), while its
    /// Q5_0/Q8_0 ones are ten times slower (0.5B: 20 against 192 tok/s; BENCHMARKS.md).
    fn new(q: QTensor, dense: bool) -> Result<Linear> {
        use candle_core::quantized::GgmlDType as T;
        let k_quant = matches!(q.dtype(), T::Q2K | T::Q3K | T::Q4K | T::Q5K | T::Q6K | T::Q8K);
        let dense = if dense && !k_quant { Some(QMatMul::Tensor(q.dequantize(&q.device())?)) } else { None };
        Ok(Linear { quantized: QMatMul::QTensor(std::sync::Arc::new(q)), dense })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let rows = x.elem_count() / x.dim(candle_core::D::Minus1)?;
        match &self.dense {
            Some(d) if rows > 1 => d.forward(x),
            _ => self.quantized.forward(x),
        }
    }
}

struct Layer {
    wq: Linear,
    wk: Linear,
    wv: Linear,
    bq: Tensor,
    bk: Tensor,
    bv: Tensor,
    wo: Linear,
    attn_norm: RmsNorm,
    gate: Linear,
    down: Linear,
    up: Linear,
    ffn_norm: RmsNorm,
    kv_cache: Option<(Tensor, Tensor)>,
}

/// The attention's shape and its rotary tables, shared by every layer.
struct Heads {
    n_head: usize,
    n_kv_head: usize,
    head_dim: usize,
    cos: Tensor,
    sin: Tensor,
}

pub struct Qwen2 {
    embed: Embedding,
    layers: Vec<Layer>,
    norm: RmsNorm,
    /// Applied to the last position only, so it stays quantized.
    output: QMatMul,
    heads: Heads,
    masks: HashMap<(usize, usize), Tensor>,
}

fn rope_tables(head_dim: usize, base: f32, context: usize, device: &Device) -> Result<(Tensor, Tensor)> {
    let theta: Vec<f32> = (0..head_dim).step_by(2).map(|i| 1f32 / base.powf(i as f32 / head_dim as f32)).collect();
    let theta = Tensor::new(theta.as_slice(), device)?;
    let idx = Tensor::arange(0, context as u32, device)?.to_dtype(DType::F32)?.reshape((context, 1))?;
    let freqs = idx.matmul(&theta.reshape((1, theta.elem_count()))?)?;
    Ok((freqs.cos()?, freqs.sin()?))
}

impl Qwen2 {
    pub fn from_gguf<R: std::io::Seek + std::io::Read>(
        ct: gguf_file::Content,
        reader: &mut R,
        device: &Device,
    ) -> Result<Qwen2> {
        let md = |k: &str| match ct.metadata.get(k) {
            Some(v) => Ok(v),
            None => candle_core::bail!("cannot find {k} in metadata"),
        };
        let n_head = md("qwen2.attention.head_count")?.to_u32()? as usize;
        let n_kv_head = md("qwen2.attention.head_count_kv")?.to_u32()? as usize;
        let width = md("qwen2.embedding_length")?.to_u32()? as usize;
        let context = md("qwen2.context_length")?.to_u32()? as usize;
        let blocks = md("qwen2.block_count")?.to_u32()? as usize;
        let eps = md("qwen2.attention.layer_norm_rms_epsilon")?.to_f32()? as f64;
        let rope_base = md("qwen2.rope.freq_base").and_then(|m| m.to_f32()).unwrap_or(10000f32);
        let head_dim = width / n_head;
        let dense = std::env::var("CANDLE_DEQUANTIZE_ALL").map_or(true, |v| v != "0");

        let mut tensor = |name: &str| ct.tensor(reader, name, device);
        let embed = tensor("token_embd.weight")?.dequantize(device)?;
        let norm = RmsNorm::from_qtensor(tensor("output_norm.weight")?, eps)?;
        let output = match tensor("output.weight") {
            Ok(w) => QMatMul::QTensor(std::sync::Arc::new(w)),
            Err(_) => QMatMul::QTensor(std::sync::Arc::new(tensor("token_embd.weight")?)),
        };
        let mut layers = Vec::with_capacity(blocks);
        for i in 0..blocks {
            let mut w = |n: &str| tensor(&format!("blk.{i}.{n}"));
            layers.push(Layer {
                wq: Linear::new(w("attn_q.weight")?, dense)?,
                wk: Linear::new(w("attn_k.weight")?, dense)?,
                wv: Linear::new(w("attn_v.weight")?, dense)?,
                bq: w("attn_q.bias")?.dequantize(device)?,
                bk: w("attn_k.bias")?.dequantize(device)?,
                bv: w("attn_v.bias")?.dequantize(device)?,
                wo: Linear::new(w("attn_output.weight")?, dense)?,
                attn_norm: RmsNorm::from_qtensor(w("attn_norm.weight")?, eps)?,
                gate: Linear::new(w("ffn_gate.weight")?, dense)?,
                down: Linear::new(w("ffn_down.weight")?, dense)?,
                up: Linear::new(w("ffn_up.weight")?, dense)?,
                ffn_norm: RmsNorm::from_qtensor(w("ffn_norm.weight")?, eps)?,
                kv_cache: None,
            });
        }
        let (cos, sin) = rope_tables(head_dim, rope_base, context, device)?;
        Ok(Qwen2 {
            embed: Embedding::new(embed, width),
            layers,
            norm,
            output,
            heads: Heads { n_head, n_kv_head, head_dim, cos, sin },
            masks: HashMap::new(),
        })
    }

    /// Logits of the last position of `x` (batch, seq) placed at `pos`; `pos` 0 starts a new sequence.
    pub fn forward(&mut self, x: &Tensor, pos: usize) -> Result<Tensor> {
        let (_, seq) = x.dims2()?;
        let mask = if seq == 1 {
            None
        } else {
            let mask = match self.masks.entry((seq, pos + seq)) {
                std::collections::hash_map::Entry::Occupied(e) => e.get().clone(),
                std::collections::hash_map::Entry::Vacant(e) => {
                    e.insert(build_causal_mask(seq, pos, x.device())?).clone()
                }
            };
            Some(mask)
        };
        let mut h = self.embed.forward(x)?;
        for layer in self.layers.iter_mut() {
            let a = attention(&self.heads, layer, &layer.attn_norm.forward(&h)?, mask.as_ref(), pos)?;
            h = (a + &h)?;
            let n = layer.ffn_norm.forward(&h)?;
            let gated = (candle_nn::ops::silu(&layer.gate.forward(&n)?)? * layer.up.forward(&n)?)?;
            h = (layer.down.forward(&gated)? + &h)?;
        }
        let h = self.norm.forward(&h)?;
        self.output.forward(&h.i((.., seq - 1, ..))?)
    }
}

fn rope(heads: &Heads, x: &Tensor, pos: usize) -> Result<Tensor> {
    let seq = x.dim(2)?;
    let cos = heads.cos.narrow(0, pos, seq)?;
    let sin = heads.sin.narrow(0, pos, seq)?;
    candle_nn::rotary_emb::rope(&x.contiguous()?, &cos, &sin)
}

/// Grouped-query attention of one layer, appending this step's keys and values to its cache.
fn attention(hs: &Heads, layer: &mut Layer, x: &Tensor, mask: Option<&Tensor>, pos: usize) -> Result<Tensor> {
    let (b, seq, width) = x.dims3()?;
    let split = |t: Tensor, n: usize| t.reshape((b, seq, n, hs.head_dim))?.transpose(1, 2)?.contiguous();
    let q = split(layer.wq.forward(x)?.broadcast_add(&layer.bq)?, hs.n_head)?;
    let k = split(layer.wk.forward(x)?.broadcast_add(&layer.bk)?, hs.n_kv_head)?;
    let v = split(layer.wv.forward(x)?.broadcast_add(&layer.bv)?, hs.n_kv_head)?;
    let q = rope(hs, &q, pos)?;
    let k = rope(hs, &k, pos)?;
    let (k, v) = match &layer.kv_cache {
        Some((kc, vc)) if pos > 0 => (Tensor::cat(&[kc, &k], 2)?, Tensor::cat(&[vc, &v], 2)?),
        _ => (k, v),
    };
    layer.kv_cache = Some((k.clone(), v.clone()));
    let k = repeat_kv(k, hs.n_head / hs.n_kv_head)?;
    let v = repeat_kv(v, hs.n_head / hs.n_kv_head)?;
    let att = (q.matmul(&k.t()?)? / (hs.head_dim as f64).sqrt())?;
    let att = match mask {
        None => att,
        Some(m) => {
            let m = m.broadcast_as(att.shape())?;
            m.where_cond(&Tensor::new(f32::NEG_INFINITY, x.device())?.broadcast_as(att.shape())?, &att)?
        }
    };
    let att = candle_nn::ops::softmax_last_dim(&att)?;
    let y = att.matmul(&v.contiguous()?)?.transpose(1, 2)?.reshape((b, seq, width))?;
    layer.wo.forward(&y)
}
