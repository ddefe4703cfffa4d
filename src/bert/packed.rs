//! BERT encoder inference on the CPU over packed sequences: no padding, fused bias/activation and
//! residual/LayerNorm passes, attention per (sequence, head) on every core, buffers reused across batches.

use candle_core::Tensor;
use candle_nn::VarBuilder;
use candle_transformers::models::bert::{Config, HiddenAct};
use gemm::{Parallelism, gemm};
use rayon::prelude::*;

use super::Products;
use super::amx::{self, Lhs, Out, PackedB};
pub(crate) use super::attention::{attention, matmul};
pub(crate) use super::kernels::{ROWS_PER_TASK, activate, erf, exp, layer_norm_rows};
use super::mpnet::{self, RelativeBias};

pub(crate) struct Layer {
    /// Query, key and value projections stacked: [3H, H].
    pub(crate) qkv_w: Vec<f32>,
    pub(crate) qkv_b: Vec<f32>,
    pub(crate) out_w: Vec<f32>,
    pub(crate) out_b: Vec<f32>,
    pub(crate) ln1: (Vec<f32>, Vec<f32>),
    pub(crate) inter_w: Vec<f32>,
    pub(crate) inter_b: Vec<f32>,
    pub(crate) down_w: Vec<f32>,
    pub(crate) down_b: Vec<f32>,
    pub(crate) ln2: (Vec<f32>, Vec<f32>),
    /// The four matrices again as bf16 AMX operands, when the products are bf16.
    pub(crate) packed: Option<PackedLayer>,
}

/// A layer's weights packed for `amx::matmul` (B = W^T, so y = x B).
pub(crate) struct PackedLayer {
    pub(crate) qkv: PackedB,
    pub(crate) out: PackedB,
    pub(crate) inter: PackedB,
    pub(crate) down: PackedB,
}

impl Layer {
    fn pack(&mut self, h: usize, i: usize) {
        self.packed = Some(PackedLayer {
            qkv: PackedB::from_weight(&self.qkv_w, 3 * h, h),
            out: PackedB::from_weight(&self.out_w, h, h),
            inter: PackedB::from_weight(&self.inter_w, i, h),
            down: PackedB::from_weight(&self.down_w, h, i),
        });
    }

    /// y = act(x W^T + b) for the intermediate matrix: on AMX the activation runs on each block of
    /// the product while it is in cache, else as a pass of its own.
    pub(crate) fn linear_act(&self, x: &[f32], y: &mut [f32], act: HiddenAct) {
        match &self.packed {
            Some(p) => {
                let n = self.inter_b.len();
                amx::matmul(
                    &Lhs::rows(x, x.len() / p.inter.k, p.inter.k),
                    &p.inter,
                    y,
                    n,
                    Out::BiasAct(&self.inter_b, act),
                )
            }
            None => {
                self.linear(Which::Inter, x, y);
                activate(y, act);
            }
        }
    }

    /// The feed-forward block, y = act(x I^T + i) D^T + d, with `inter` as the intermediate's room
    /// where the products are f32 (on AMX it never leaves the cache).
    pub(crate) fn mlp(&self, x: &[f32], inter: &mut [f32], y: &mut [f32], act: HiddenAct) {
        match &self.packed {
            Some(p) => amx::mlp(
                &Lhs::rows(x, x.len() / p.inter.k, p.inter.k),
                (&p.inter, &self.inter_b),
                act,
                (&p.down, &self.down_b),
                y,
                self.down_b.len(),
            ),
            None => {
                self.linear_act(x, inter, act);
                self.linear(Which::Down, inter, y);
            }
        }
    }

    /// y = x W^T + b for one of the layer's four matrices, in bf16 where it is packed.
    pub(crate) fn linear(&self, which: Which, x: &[f32], y: &mut [f32]) {
        let (w, b) = match which {
            Which::Qkv => (&self.qkv_w, &self.qkv_b),
            Which::Out => (&self.out_w, &self.out_b),
            Which::Inter => (&self.inter_w, &self.inter_b),
            Which::Down => (&self.down_w, &self.down_b),
        };
        match &self.packed {
            Some(p) => {
                let packed = match which {
                    Which::Qkv => &p.qkv,
                    Which::Out => &p.out,
                    Which::Inter => &p.inter,
                    Which::Down => &p.down,
                };
                let n = b.len();
                amx::matmul(&Lhs::rows(x, x.len() / packed.k, packed.k), packed, y, n, Out::Bias(b));
            }
            None => linear(x, w.len() / b.len().max(1), w, b, y),
        }
    }
}

/// Where a BERT layer's attention tensors are: query, key, value, output, and the LayerNorm after it.
const BERT_ATTENTION_NAMES: [&str; 5] = [
    "attention.self.query",
    "attention.self.key",
    "attention.self.value",
    "attention.output.dense",
    "attention.output.LayerNorm",
];

/// Which of a layer's four matrices.
#[derive(Clone, Copy)]
pub(crate) enum Which {
    Qkv,
    Out,
    Inter,
    Down,
}

/// The weights of a BERT (or MPNet) encoder as plain row-major matrices (PyTorch's [out, in] layout).
pub struct CpuBert {
    pub(crate) word: Vec<f32>,
    pub(crate) pos: Vec<f32>,
    /// The position row of a sequence's first token: 0 for BERT, 2 for MPNet.
    pub(crate) pos_offset: usize,
    /// MPNet's attention bias by relative position; None for BERT.
    pub(crate) rel: Option<RelativeBias>,
    /// Token-type rows [type_vocab, hidden] (segment A, B); MPNet's single row is zeros.
    pub(crate) types: Vec<f32>,
    pub(crate) emb_ln: (Vec<f32>, Vec<f32>),
    pub(crate) layers: Vec<Layer>,
    pub(crate) hidden: usize,
    pub(crate) heads: usize,
    pub(crate) inter: usize,
    pub(crate) max_pos: usize,
    pub(crate) vocab: usize,
    pub(crate) type_vocab: usize,
    pub(crate) eps: f32,
    pub(crate) act: HiddenAct,
    pub(crate) products: Products,
}

/// Activations of one batch; kept between batches so large buffers are not mapped and faulted in again.
#[derive(Default)]
pub struct Scratch {
    x: Vec<f32>,
    qkv: Vec<f32>,
    ctx: Vec<f32>,
    tmp: Vec<f32>,
    inter: Vec<f32>,
}

fn get(vb: &VarBuilder, shape: &[usize], name: &str) -> candle_core::Result<Vec<f32>> {
    vb.get(shape, name)?.flatten_all()?.to_dtype(candle_core::DType::F32)?.to_vec1()
}

fn cat(parts: &[&Tensor]) -> candle_core::Result<Vec<f32>> {
    Tensor::cat(parts, 0)?.flatten_all()?.to_vec1()
}

impl CpuBert {
    /// Reads the weights through `vb`, whose tensors may be named with or without a `bert.` prefix;
    /// an MPNet checkpoint (sentence-transformers' all-mpnet-base-v2) is recognised by its tensors.
    pub fn load(vb: &VarBuilder, c: &Config) -> candle_core::Result<CpuBert> {
        let vb = if vb.contains_tensor("bert.embeddings.word_embeddings.weight") { vb.pp("bert") } else { vb.clone() };
        let (h, i) = (c.hidden_size, c.intermediate_size);
        if c.num_attention_heads == 0 || h % c.num_attention_heads != 0 {
            candle_core::bail!("hidden_size {h} is not a multiple of num_attention_heads {}", c.num_attention_heads)
        }
        let ln = |p: VarBuilder| -> candle_core::Result<(Vec<f32>, Vec<f32>)> {
            Ok((get(&p, &[h], "weight")?, get(&p, &[h], "bias")?))
        };
        let e = vb.pp("embeddings");
        let is_mpnet = mpnet::is_mpnet(&vb);
        // MPNet has no token types: its embedding is word + position.
        let types =
            if is_mpnet { vec![0.0; h] } else { get(&e, &[c.type_vocab_size, h], "token_type_embeddings.weight")? };
        let type_vocab = if is_mpnet { 1 } else { c.type_vocab_size };
        let names = if is_mpnet { &mpnet::ATTENTION_NAMES } else { &BERT_ATTENTION_NAMES };
        let mut layers = Vec::with_capacity(c.num_hidden_layers);
        for n in 0..c.num_hidden_layers {
            let l = vb.pp(format!("encoder.layer.{n}"));
            let w = |name: &str| l.get((h, h), &format!("{name}.weight"));
            let b = |name: &str| l.get(h, &format!("{name}.bias"));
            let [q, k, v, o, norm] = names;
            layers.push(Layer {
                qkv_w: cat(&[&w(q)?, &w(k)?, &w(v)?])?,
                qkv_b: cat(&[&b(q)?, &b(k)?, &b(v)?])?,
                out_w: get(&l, &[h, h], &format!("{o}.weight"))?,
                out_b: get(&l, &[h], &format!("{o}.bias"))?,
                ln1: ln(l.pp(norm))?,
                inter_w: get(&l, &[i, h], "intermediate.dense.weight")?,
                inter_b: get(&l, &[i], "intermediate.dense.bias")?,
                down_w: get(&l, &[h, i], "output.dense.weight")?,
                down_b: get(&l, &[h], "output.dense.bias")?,
                ln2: ln(l.pp("output.LayerNorm"))?,
                packed: None,
            });
        }
        let pos_offset = if is_mpnet { mpnet::POSITION_OFFSET } else { 0 };
        Ok(CpuBert {
            word: get(&e, &[c.vocab_size, h], "word_embeddings.weight")?,
            pos: get(&e, &[c.max_position_embeddings, h], "position_embeddings.weight")?,
            pos_offset,
            rel: if is_mpnet { Some(RelativeBias::load(&vb, c)?) } else { None },
            types,
            emb_ln: ln(e.pp("LayerNorm"))?,
            layers,
            hidden: h,
            heads: c.num_attention_heads,
            inter: i,
            max_pos: c.max_position_embeddings.saturating_sub(pos_offset),
            vocab: c.vocab_size,
            type_vocab,
            eps: c.layer_norm_eps as f32,
            act: c.hidden_act,
            products: Products::F32,
        })
    }

    /// The same model with its matrix products in `products`: for bf16, the four matrices of every
    /// layer are packed as AMX operands (and attention's products run on AMX too). With `inference_only`,
    /// the f32 copies of those matrices are dropped (only a backward pass reads them).
    pub fn with_products(mut self, products: Products, inference_only: bool) -> Self {
        assert!(
            products == Products::F32 || amx::available(),
            "bf16 products asked for where no bf16 engine is available"
        );
        self.products = products;
        if products == Products::Bf16 {
            let (h, i) = (self.hidden, self.inter);
            for l in &mut self.layers {
                l.pack(h, i);
                if inference_only {
                    for w in [&mut l.qkv_w, &mut l.out_w, &mut l.inter_w, &mut l.down_w] {
                        *w = Vec::new();
                    }
                }
            }
        }
        self
    }

    pub fn hidden_size(&self) -> usize {
        self.hidden
    }

    /// Word + position + token-type embeddings of packed sequences, before LayerNorm; `types` gives
    /// each token's segment (a cross-encoder's query 0, passage 1), None all 0.
    pub(crate) fn embed(&self, ids: &[u32], types: Option<&[u32]>, lens: &[usize], x: &mut [f32]) {
        let h = self.hidden;
        let mut row = 0;
        for &n in lens {
            for p in 0..n {
                let id = ids[row] as usize;
                let ty = types.map_or(0, |t| t[row] as usize);
                let dst = &mut x[row * h..(row + 1) * h];
                let p = p + self.pos_offset;
                let (w, ps) = (&self.word[id * h..(id + 1) * h], &self.pos[p * h..(p + 1) * h]);
                let tt = &self.types[ty * h..(ty + 1) * h];
                for j in 0..h {
                    dst[j] = w[j] + ps[j] + tt[j];
                }
                row += 1;
            }
        }
    }

    /// Checks packed input against the model before a forward pass.
    pub(crate) fn check_input(&self, ids: &[u32], types: Option<&[u32]>, lens: &[usize]) -> candle_core::Result<()> {
        if lens.iter().sum::<usize>() != ids.len() {
            candle_core::bail!("sequence lengths do not add up to the token count")
        }
        if let Some(t) = types {
            if t.len() != ids.len() {
                candle_core::bail!("{} token types for {} tokens", t.len(), ids.len())
            }
            if let Some(&ty) = t.iter().find(|&&ty| ty as usize >= self.type_vocab) {
                candle_core::bail!("token type {ty} is outside the model's {} types", self.type_vocab)
            }
        }
        if let Some(&n) = lens.iter().find(|&&n| n > self.max_pos) {
            candle_core::bail!("a sequence of {n} tokens is longer than the model's {} positions", self.max_pos)
        }
        if let Some(&id) = ids.iter().find(|&&id| id as usize >= self.vocab) {
            candle_core::bail!("token id {id} is outside the vocabulary of {}", self.vocab)
        }
        Ok(())
    }

    /// Last hidden states of the sequences in `ids`, packed one after another (`lens` says where
    /// each ends): a [sum(lens), hidden] row-major matrix in `scratch`'s output.
    pub fn forward<'s>(&self, ids: &[u32], lens: &[usize], s: &'s mut Scratch) -> candle_core::Result<&'s [f32]> {
        self.forward_typed(ids, None, lens, s)
    }

    /// `forward` with each token's segment (`embed`).
    pub fn forward_typed<'s>(
        &self,
        ids: &[u32],
        types: Option<&[u32]>,
        lens: &[usize],
        s: &'s mut Scratch,
    ) -> candle_core::Result<&'s [f32]> {
        let (h, t) = (self.hidden, ids.len());
        self.check_input(ids, types, lens)?;
        // On AMX the feed-forward intermediate stays in cache (`Layer::mlp`): no room for it here.
        let inter = if self.products == Products::Bf16 { 0 } else { self.inter };
        for (buf, width) in
            [(&mut s.x, h), (&mut s.qkv, 3 * h), (&mut s.ctx, h), (&mut s.tmp, h), (&mut s.inter, inter)]
        {
            if buf.len() < t * width {
                buf.resize(t * width, 0.0);
            }
        }
        let x = &mut s.x[..t * h];
        self.embed(ids, types, lens, x);
        layer_norm_rows(x, None, &self.emb_ln, self.eps, None);

        let scale = 1.0 / ((h / self.heads) as f32).sqrt();
        let biases = self.rel.as_ref().map(|r| r.by_offset(lens.iter().copied().max().unwrap_or(0)));
        for l in &self.layers {
            let qkv = &mut s.qkv[..t * 3 * h];
            l.linear(Which::Qkv, x, qkv);
            let ctx = &mut s.ctx[..t * h];
            attention(qkv, lens, h, self.heads, scale, ctx, false, None, self.products, biases.as_ref());
            let tmp = &mut s.tmp[..t * h];
            l.linear(Which::Out, ctx, tmp);
            layer_norm_rows(x, Some(tmp), &l.ln1, self.eps, None);
            l.mlp(x, &mut s.inter[..t * inter], tmp, self.act);
            layer_norm_rows(x, Some(tmp), &l.ln2, self.eps, None);
        }
        Ok(&s.x[..t * h])
    }
}

/// y = x W^T + b for x [t, k] and W [n, k]; y is [t, n].
pub(crate) fn linear(x: &[f32], k: usize, w: &[f32], b: &[f32], y: &mut [f32]) {
    let n = b.len();
    let t = x.len() / k;
    y.par_chunks_mut(n * ROWS_PER_TASK).for_each(|rows| {
        for r in rows.chunks_exact_mut(n) {
            r.copy_from_slice(b);
        }
    });
    // SAFETY: the strides describe x as [t, k] row-major, W^T as [k, n] read from W's [n, k] storage
    // and y as [t, n] row-major; all three slices are exactly that long.
    unsafe {
        gemm(
            t,
            n,
            k,
            y.as_mut_ptr(),
            1,
            n as isize,
            true,
            x.as_ptr(),
            1,
            k as isize,
            w.as_ptr(),
            k as isize,
            1,
            1.0,
            1.0,
            false,
            false,
            false,
            Parallelism::Rayon(rayon::current_num_threads()),
        )
    }
}

/// Small random BERTs for tests of the encoder and of training.
#[cfg(test)]
pub(crate) mod test_support {
    use candle_core::{DType, Device, Tensor};
    use candle_nn::{VarBuilder, VarMap};
    use candle_transformers::models::bert::Config;

    /// Every parameter of a BERT with `config`, with N(0, spread) noise added so that biases and
    /// LayerNorm parameters are not zero and one, and a mistake in any of them shows.
    pub fn random_bert(config: &Config, spread: f32) -> (VarMap, VarBuilder<'static>) {
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
        crate::bert::graph::TrainBert::load(vb.clone(), config).unwrap();
        for var in varmap.all_vars() {
            let t = var.as_tensor();
            var.set(&(t + Tensor::randn(0f32, spread, t.shape(), &Device::Cpu).unwrap()).unwrap()).unwrap();
        }
        (varmap, vb)
    }

    /// Token ids and attention mask of `seqs` padded to `max` tokens.
    pub fn padded(seqs: &[Vec<u32>], max: usize) -> (Tensor, Tensor) {
        let (mut ids, mut mask) = (Vec::new(), Vec::new());
        for s in seqs {
            ids.extend(s.iter().copied().chain(std::iter::repeat_n(0, max - s.len())));
            mask.extend(std::iter::repeat_n(1u32, s.len()).chain(std::iter::repeat_n(0, max - s.len())));
        }
        let shape = (seqs.len(), max);
        (Tensor::from_vec(ids, shape, &Device::Cpu).unwrap(), Tensor::from_vec(mask, shape, &Device::Cpu).unwrap())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_transformers::models::bert::BertModel;

    /// The packed CPU path against candle's padded BertModel on a small random BERT, with sequences
    /// of different lengths in one batch.
    #[test]
    fn packed_forward_matches_candle_bert() {
        for act in [HiddenAct::Gelu, HiddenAct::GeluApproximate] {
            let config = Config {
                vocab_size: 50,
                hidden_size: 24,
                num_hidden_layers: 2,
                num_attention_heads: 4,
                intermediate_size: 40,
                hidden_act: act,
                max_position_embeddings: 16,
                ..Config::default()
            };
            let (_varmap, vb) = super::test_support::random_bert(&config, 0.3);
            let reference = BertModel::load(vb.clone(), &config).unwrap();
            let cpu = CpuBert::load(&vb, &config).unwrap();

            let lens = [7usize, 3, 12];
            let max = 12;
            let mut rng = fastrand::Rng::with_seed(7);
            let seqs: Vec<Vec<u32>> = lens.iter().map(|&n| (0..n).map(|_| rng.u32(1..50)).collect()).collect();
            let (ids_t, mask_t) = super::test_support::padded(&seqs, max);
            let want = reference.forward(&ids_t, &ids_t.zeros_like().unwrap(), Some(&mask_t)).unwrap();
            let want: Vec<Vec<Vec<f32>>> = want.to_vec3().unwrap();
            // The training graph reads the same parameters and must agree too.
            let graph = crate::bert::graph::TrainBert::load(vb.clone(), &config).unwrap();
            let trained: Vec<Vec<Vec<f32>>> = graph.forward(&ids_t, &mask_t).unwrap().to_vec3().unwrap();
            for (s, &n) in lens.iter().enumerate() {
                for p in 0..n {
                    for (g, w) in trained[s][p].iter().zip(&want[s][p]) {
                        assert!((g - w).abs() < 2e-5, "training graph {act:?} seq {s} pos {p}: {g} vs {w}");
                    }
                }
            }

            let packed: Vec<u32> = seqs.concat();
            let mut scratch = Scratch::default();
            let got = cpu.forward(&packed, &lens, &mut scratch).unwrap().to_vec();
            let mut row = 0;
            for (s, &n) in lens.iter().enumerate() {
                for (p, want_row) in want[s].iter().take(n).enumerate() {
                    for (j, (g, w)) in got[row * 24..(row + 1) * 24].iter().zip(want_row).enumerate() {
                        assert!((g - w).abs() < 2e-5, "{act:?} seq {s} pos {p} dim {j}: {g} vs {w}");
                    }
                    row += 1;
                }
            }
        }
    }
    /// bf16 products on AMX against the f32 path on a BERT wide enough that every product spans
    /// several tiles: each token's hidden state within cosine 0.999 (the bar for vectors).
    #[test]
    fn bf16_products_stay_within_cosine_of_f32() {
        if !amx::available() {
            eprintln!("skipped: this CPU (or kernel) has no AMX bf16; the f32 path serves it");
            return;
        }
        let config = Config {
            vocab_size: 80,
            hidden_size: 96,
            num_hidden_layers: 2,
            num_attention_heads: 3,
            intermediate_size: 200,
            max_position_embeddings: 80,
            ..Config::default()
        };
        // Weights of a trained BERT's spread (about 0.05): wider random weights saturate attention,
        // where any rounding, f32's included, moves the output far more than in a real model.
        let (_varmap, vb) = super::test_support::random_bert(&config, 0.05);
        let f32_model = CpuBert::load(&vb, &config).unwrap();
        let bf16_model = CpuBert::load(&vb, &config).unwrap().with_products(Products::Bf16, true);
        let lens = [70usize, 5, 33];
        let mut rng = fastrand::Rng::with_seed(11);
        let ids: Vec<u32> = (0..lens.iter().sum::<usize>()).map(|_| rng.u32(1..80)).collect();
        let want = f32_model.forward(&ids, &lens, &mut Scratch::default()).unwrap().to_vec();
        let got = bf16_model.forward(&ids, &lens, &mut Scratch::default()).unwrap().to_vec();
        assert_ne!(want, got, "the bf16 model did not run bf16 products");
        for (r, (g, w)) in got.chunks(96).zip(want.chunks(96)).enumerate() {
            let dot: f32 = g.iter().zip(w).map(|(a, b)| a * b).sum();
            let norm = |v: &[f32]| v.iter().map(|a| a * a).sum::<f32>().sqrt();
            let cos = dot / (norm(g) * norm(w));
            assert!(cos >= 0.999, "token {r}: cosine {cos}");
        }
    }
}
