//! BERT as a differentiable candle graph over a VarMap, with Hugging Face parameter names so a saved
//! VarMap is a BERT checkpoint. (candle-transformers' BERT uses LayerNorm and softmax kernels that
//! record no gradient, so it cannot be trained.)

use candle_core::{D, DType, Module, Result, Tensor};
use candle_nn::{Embedding, Init, Linear, VarBuilder};
use candle_transformers::models::bert::{Config, HiddenAct};

use super::dropout::{Dropout, Site};

struct Norm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl Norm {
    fn load(vb: VarBuilder, h: usize, eps: f64) -> Result<Norm> {
        Ok(Norm {
            weight: vb.get_with_hints(h, "weight", Init::Const(1.0))?,
            bias: vb.get_with_hints(h, "bias", Init::Const(0.0))?,
            eps,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mean = x.mean_keepdim(D::Minus1)?;
        let xc = x.broadcast_sub(&mean)?;
        let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
        xc.broadcast_div(&(var + self.eps)?.sqrt()?)?.broadcast_mul(&self.weight)?.broadcast_add(&self.bias)
    }
}

fn linear(vb: VarBuilder, inp: usize, out: usize) -> Result<Linear> {
    // BERT's initialisation: N(0, 0.02) weights, zero biases.
    let w = vb.get_with_hints((out, inp), "weight", Init::Randn { mean: 0.0, stdev: 0.02 })?;
    let b = vb.get_with_hints(out, "bias", Init::Const(0.0))?;
    Ok(Linear::new(w, Some(b)))
}

struct Layer {
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    ln1: Norm,
    inter: Linear,
    down: Linear,
    ln2: Norm,
}

pub struct TrainBert {
    /// The dtype of the matrix products (f32, or bf16 for mixed precision); weights, LayerNorm,
    /// softmax and the residual stream stay f32, and gradients reach the f32 weights.
    pub compute: DType,
    word: Embedding,
    pos: Embedding,
    type0: Tensor,
    emb_ln: Norm,
    layers: Vec<Layer>,
    heads: usize,
    act: HiddenAct,
}

impl TrainBert {
    pub fn load(vb: VarBuilder, c: &Config) -> Result<TrainBert> {
        let (h, i, eps) = (c.hidden_size, c.intermediate_size, c.layer_norm_eps);
        let emb = |vb: VarBuilder, n: usize, name: &str| -> Result<Tensor> {
            vb.get_with_hints((n, h), name, Init::Randn { mean: 0.0, stdev: 0.02 })
        };
        let e = vb.pp("embeddings");
        let types = emb(e.clone(), c.type_vocab_size, "token_type_embeddings.weight")?;
        let mut layers = Vec::new();
        for n in 0..c.num_hidden_layers {
            let l = vb.pp(format!("encoder.layer.{n}"));
            let a = l.pp("attention");
            layers.push(Layer {
                q: linear(a.pp("self.query"), h, h)?,
                k: linear(a.pp("self.key"), h, h)?,
                v: linear(a.pp("self.value"), h, h)?,
                o: linear(a.pp("output.dense"), h, h)?,
                ln1: Norm::load(a.pp("output.LayerNorm"), h, eps)?,
                inter: linear(l.pp("intermediate.dense"), h, i)?,
                down: linear(l.pp("output.dense"), i, h)?,
                ln2: Norm::load(l.pp("output.LayerNorm"), h, eps)?,
            });
        }
        Ok(TrainBert {
            compute: DType::F32,
            word: Embedding::new(emb(e.clone(), c.vocab_size, "word_embeddings.weight")?, h),
            pos: Embedding::new(emb(e.clone(), c.max_position_embeddings, "position_embeddings.weight")?, h),
            type0: types.narrow(0, 0, 1)?,
            emb_ln: Norm::load(e.pp("LayerNorm"), h, eps)?,
            layers,
            heads: c.num_attention_heads,
            act: c.hidden_act,
        })
    }

    /// Last hidden states [B, L, H] of token ids [B, L] with attention mask [B, L] (1 = token).
    pub fn forward(&self, ids: &Tensor, mask: &Tensor) -> Result<Tensor> {
        self.forward_with(ids, mask, None)
    }

    /// `forward` with BERT's training dropout, the same masks as the CPU path's (see `dropout`).
    pub fn forward_with(&self, ids: &Tensor, mask: &Tensor, drop: Option<&Dropout>) -> Result<Tensor> {
        let (b, l) = ids.dims2()?;
        let dev = ids.device();
        let hidden_mask = |site: Site, x: Tensor| -> Result<Tensor> {
            match drop {
                Some(d) => {
                    let h = x.dim(2)?;
                    x.broadcast_mul(&Tensor::from_vec(d.padded(site, b, l, h), (b, l, h), dev)?)
                }
                None => Ok(x),
            }
        };
        let positions = Tensor::arange(0u32, l as u32, ids.device())?;
        let x = self.word.forward(ids)?.broadcast_add(&self.pos.forward(&positions)?)?.broadcast_add(&self.type0)?;
        let mut x = hidden_mask(Site::Embeddings, self.emb_ln.forward(&x)?)?;
        let h = x.dim(2)?;
        let dh = h / self.heads;
        let bias = ((1.0 - mask.to_dtype(DType::F32)?)? * -1e9)?.reshape((b, 1, 1, l))?;
        let scale = 1.0 / (dh as f64).sqrt();
        let heads = |t: Tensor| t.reshape((b, l, self.heads, dh))?.transpose(1, 2)?.contiguous();
        let dt = self.compute;
        // A linear layer in the compute dtype (input and weights cast; the cast is recorded, so the
        // f32 weights get the gradient).
        let lin = |layer: &Linear, x: &Tensor| -> Result<Tensor> {
            if dt == DType::F32 {
                return layer.forward(x);
            }
            let w = layer.weight().to_dtype(dt)?;
            let y = x.to_dtype(dt)?.broadcast_matmul(&w.t()?)?;
            match layer.bias() {
                Some(bias) => y.broadcast_add(&bias.to_dtype(dt)?),
                None => Ok(y),
            }
        };
        for (li, layer) in self.layers.iter().enumerate() {
            let q = heads(lin(&layer.q, &x)?)?;
            let k = heads(lin(&layer.k, &x)?)?;
            let v = heads(lin(&layer.v, &x)?)?;
            let scores = (q.matmul(&k.t()?)?.to_dtype(DType::F32)? * scale)?.broadcast_add(&bias)?;
            let mut p = candle_nn::ops::softmax(&scores, D::Minus1)?;
            if let Some(d) = drop {
                let m = Tensor::from_vec(d.padded_probs(li, b, self.heads, l), (b, self.heads, l, l), dev)?;
                p = p.broadcast_mul(&m)?;
            }
            let ctx = p.to_dtype(dt)?.matmul(&v)?.transpose(1, 2)?.reshape((b, l, h))?;
            let attn = hidden_mask(Site::AttentionOut(li), lin(&layer.o, &ctx)?.to_dtype(DType::F32)?)?;
            x = layer.ln1.forward(&(x + attn)?)?;
            let inter = lin(&layer.inter, &x)?;
            let inter = match self.act {
                HiddenAct::Gelu => inter.gelu_erf()?,
                HiddenAct::GeluApproximate => inter.gelu()?,
                HiddenAct::Relu => inter.relu()?,
            };
            let down = hidden_mask(Site::FeedForwardOut(li), lin(&layer.down, &inter)?.to_dtype(DType::F32)?)?;
            x = layer.ln2.forward(&(x + down)?)?;
        }
        Ok(x)
    }
}
