//! Training on the CPU without a tensor graph: the packed encoder's forward pass keeps what its
//! backward pass needs, and the backward pass is written out by hand (fused kernels, no padding).

use std::collections::HashMap;

use candle_transformers::models::bert::HiddenAct;
use rayon::prelude::*;

use crate::bert::Products;
use crate::bert::amx::{self, Lhs, Out, PackedB};
use crate::bert::attention::attention_backward;
use crate::bert::dropout::{Dropout, Site};
use crate::bert::packed::{self as k, CpuBert, ROWS_PER_TASK, Which, activate, attention, layer_norm_rows, matmul};

/// What one layer's backward pass reads. What is cheap to recompute is not kept (a step's tape is
/// most of its memory): the attention probabilities (recomputed per head from `qkv`), the GELU's
/// output (from `pre`), and the inputs of the layer and of its feed-forward block (from the
/// LayerNorms' normalised rows, `ln_affine`), each bit for bit what the forward pass used.
struct LayerTape {
    qkv: Vec<f32>,
    ctx: Vec<f32>,
    xhat1: Vec<f32>,
    rstd1: Vec<f32>,
    pre: Vec<f32>,
    xhat2: Vec<f32>,
    rstd2: Vec<f32>,
}

pub struct Tape {
    ids: Vec<u32>,
    types: Option<Vec<u32>>,
    lens: Vec<usize>,
    /// The pass's dropout: the backward pass regenerates its masks rather than keeping them.
    drop: Option<Dropout>,
    xhat0: Vec<f32>,
    rstd0: Vec<f32>,
    layers: Vec<LayerTape>,
}

/// Gradients by Hugging Face parameter name, as flat row-major buffers.
pub type FlatGrads = HashMap<String, Vec<f32>>;

/// `v` times the mask of `site` (a copy), or `v` itself without dropout.
fn masked<'a>(
    drop: Option<&Dropout>,
    site: Site,
    v: &'a [f32],
    lens: &[usize],
    width: usize,
) -> std::borrow::Cow<'a, [f32]> {
    match drop {
        Some(d) => {
            let mut out = v.to_vec();
            d.apply_packed(site, &mut out, lens, width);
            std::borrow::Cow::Owned(out)
        }
        None => std::borrow::Cow::Borrowed(v),
    }
}

/// Forward pass over packed sequences keeping activations; returns the last hidden states [T, H].
/// With `drop`, BERT's training dropout applies (embeddings, attention probabilities, and the
/// attention and feed-forward outputs before their residual adds).
pub fn forward(
    m: &CpuBert,
    ids: &[u32],
    lens: &[usize],
    drop: Option<&Dropout>,
) -> candle_core::Result<(Vec<f32>, Tape)> {
    forward_typed(m, ids, None, lens, drop)
}

/// `forward` with each token's segment (see `CpuBert::embed`).
pub fn forward_typed(
    m: &CpuBert,
    ids: &[u32],
    types: Option<&[u32]>,
    lens: &[usize],
    drop: Option<&Dropout>,
) -> candle_core::Result<(Vec<f32>, Tape)> {
    m.check_input(ids, types, lens)?;
    let (h, t, i) = (m.hidden, ids.len(), m.inter);
    let mut x = vec![0.0f32; t * h];
    m.embed(ids, types, lens, &mut x);
    let (mut xhat0, mut rstd0) = (vec![0.0; t * h], vec![0.0; t]);
    layer_norm_rows(&mut x, None, &m.emb_ln, m.eps, Some((&mut xhat0, &mut rstd0)));
    if let Some(d) = drop {
        d.apply_packed(Site::Embeddings, &mut x, lens, h);
    }
    let scale = 1.0 / ((h / m.heads) as f32).sqrt();
    let mut layers = Vec::with_capacity(m.layers.len());
    for (li, l) in m.layers.iter().enumerate() {
        let mut qkv = vec![0.0; t * 3 * h];
        l.linear(Which::Qkv, &x, &mut qkv);
        let mut ctx = vec![0.0; t * h];
        attention(&qkv, lens, h, m.heads, scale, &mut ctx, true, drop.map(|d| (d, li)), m.products, None);
        let mut tmp = vec![0.0; t * h];
        l.linear(Which::Out, &ctx, &mut tmp);
        if let Some(d) = drop {
            d.apply_packed(Site::AttentionOut(li), &mut tmp, lens, h);
        }
        let (mut xhat1, mut rstd1) = (vec![0.0; t * h], vec![0.0; t]);
        layer_norm_rows(&mut x, Some(&tmp), &l.ln1, m.eps, Some((&mut xhat1, &mut rstd1)));
        let mut pre = vec![0.0; t * i];
        l.linear(Which::Inter, &x, &mut pre);
        let mut act = pre.clone();
        activate(&mut act, m.act);
        l.linear(Which::Down, &act, &mut tmp);
        std::mem::drop(act);
        if let Some(d) = drop {
            d.apply_packed(Site::FeedForwardOut(li), &mut tmp, lens, h);
        }
        let (mut xhat2, mut rstd2) = (vec![0.0; t * h], vec![0.0; t]);
        layer_norm_rows(&mut x, Some(&tmp), &l.ln2, m.eps, Some((&mut xhat2, &mut rstd2)));
        layers.push(LayerTape { qkv, ctx, xhat1, rstd1, pre, xhat2, rstd2 });
    }
    Ok((
        x,
        Tape {
            ids: ids.to_vec(),
            types: types.map(<[u32]>::to_vec),
            lens: lens.to_vec(),
            drop: drop.copied(),
            xhat0,
            rstd0,
            layers,
        },
    ))
}

/// dX [t, k] = dY [t, n] W [n, k]; dW [n, k] = dY^T X; db [n] = column sums of dY. With bf16
/// products both run on AMX (bf16 inputs, f32 sums), as PyTorch's autocast runs them.
fn linear_backward(
    dy: &[f32],
    x: &[f32],
    w: &[f32],
    (n, k): (usize, usize),
    products: Products,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let t = dy.len() / n;
    let (mut dx, mut dw) = (vec![0.0f32; t * k], vec![0.0f32; n * k]);
    if products == Products::Bf16 {
        amx::matmul(&Lhs::rows(dy, t, n), &PackedB::from_rows(w, n, k, k), &mut dx, k, Out::Store);
        let dy_t = Lhs { a: dy, m: n, rs: 1, cs: n };
        amx::matmul(&dy_t, &PackedB::from_rows(x, t, k, k), &mut dw, k, Out::Store);
        return (dx, dw, column_sums(dy, n));
    }
    // SAFETY: dY [t, n], W [n, k] and X [t, k] are row-major (dY^T read through swapped strides);
    // dX [t, k] and dW [n, k] are fresh buffers of exactly those sizes.
    unsafe {
        matmul((t, k, n), dx.as_mut_ptr(), k, (dy.as_ptr(), 1, n), (w.as_ptr(), 1, k), 1.0, true);
        matmul((n, k, t), dw.as_mut_ptr(), k, (dy.as_ptr(), n, 1), (x.as_ptr(), 1, k), 1.0, true);
    }
    (dx, dw, column_sums(dy, n))
}

/// Column sums, added in a fixed order (partial sums per fixed block, then block by block) so the
/// result does not depend on how the thread pool split the work: training stays bit-reproducible.
fn column_sums(m: &[f32], n: usize) -> Vec<f32> {
    let partials: Vec<Vec<f32>> = m
        .par_chunks(n * ROWS_PER_TASK)
        .map(|rows| {
            let mut acc = vec![0.0f32; n];
            for r in rows.chunks_exact(n) {
                acc.iter_mut().zip(r).for_each(|(a, v)| *a += v);
            }
            acc
        })
        .collect();
    let mut out = vec![0.0f32; n];
    for p in partials {
        out.iter_mut().zip(&p).for_each(|(a, b)| *a += b);
    }
    out
}

/// Backward of y = xhat * g + b with xhat = (r - mean) * rstd: returns dr, dg, db.
fn layer_norm_backward(dy: &[f32], xhat: &[f32], rstd: &[f32], g: &[f32]) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let h = g.len();
    let mut dr = vec![0.0f32; dy.len()];
    dr.par_chunks_mut(h * ROWS_PER_TASK).enumerate().for_each(|(c, out)| {
        for (i, o) in out.chunks_exact_mut(h).enumerate() {
            let row = c * ROWS_PER_TASK + i;
            let (dyr, xr) = (&dy[row * h..(row + 1) * h], &xhat[row * h..(row + 1) * h]);
            let (mut s1, mut s2) = (0.0f32, 0.0f32);
            for j in 0..h {
                let d = dyr[j] * g[j];
                s1 += d;
                s2 += d * xr[j];
            }
            let (m1, m2) = (s1 / h as f32, s2 / h as f32);
            for j in 0..h {
                o[j] = rstd[row] * (dyr[j] * g[j] - m1 - xr[j] * m2);
            }
        }
    });
    let prod: Vec<f32> = dy.par_iter().zip(xhat.par_iter()).map(|(a, b)| a * b).collect();
    (dr, column_sums(&prod, h), column_sums(dy, h))
}

fn gelu_grad(x: f32, act: HiddenAct) -> f32 {
    match act {
        HiddenAct::Gelu => {
            let cdf = 0.5 * (1.0 + k::erf(x * std::f32::consts::FRAC_1_SQRT_2));
            cdf + x * k::exp(-0.5 * x * x) * 0.398_942_3
        }
        HiddenAct::GeluApproximate => {
            let u = 0.797_884_6 * (x + 0.044_715 * x * x * x);
            let th = 1.0 - 2.0 / (k::exp(2.0 * u) + 1.0);
            0.5 * (1.0 + th) + 0.5 * x * (1.0 - th * th) * 0.797_884_6 * (1.0 + 3.0 * 0.044_715 * x * x)
        }
        HiddenAct::Relu => (x > 0.0) as u8 as f32,
    }
}

fn add_into(a: &mut [f32], b: &[f32]) {
    a.par_chunks_mut(4096).zip(b.par_chunks(4096)).for_each(|(x, y)| x.iter_mut().zip(y).for_each(|(p, q)| *p += q));
}

/// y = xhat * g + b row by row: a LayerNorm's output from its normalised rows, bit for bit what
/// `layer_norm_rows` wrote (the same products in the same order).
fn ln_affine(xhat: &[f32], (g, b): &(Vec<f32>, Vec<f32>)) -> Vec<f32> {
    let h = g.len();
    let mut y = vec![0.0f32; xhat.len()];
    y.par_chunks_mut(h * ROWS_PER_TASK).zip(xhat.par_chunks(h * ROWS_PER_TASK)).for_each(|(ys, xs)| {
        for (yr, xr) in ys.chunks_exact_mut(h).zip(xs.chunks_exact(h)) {
            for (((y, x), g), b) in yr.iter_mut().zip(xr).zip(g).zip(b) {
                *y = x * g + b;
            }
        }
    });
    y
}

/// Layer `li`'s input as the forward pass had it: the embeddings' LayerNorm (and dropout) for the
/// first layer, the previous layer's output for the others.
fn layer_input(m: &CpuBert, tape: &Tape, li: usize) -> Vec<f32> {
    match li.checked_sub(1) {
        Some(prev) => ln_affine(&tape.layers[prev].xhat2, &m.layers[prev].ln2),
        None => {
            let mut x = ln_affine(&tape.xhat0, &m.emb_ln);
            if let Some(d) = &tape.drop {
                d.apply_packed(Site::Embeddings, &mut x, &tape.lens, m.hidden);
            }
            x
        }
    }
}

/// Gradients of every parameter given the gradient of the last hidden states. The tape is used up
/// layer by layer, so its memory goes as the pass goes down.
pub fn backward(m: &CpuBert, mut tape: Tape, mut dy: Vec<f32>) -> FlatGrads {
    let (h, heads) = (m.hidden, m.heads);
    let dh = h / heads;
    let scale = 1.0 / (dh as f32).sqrt();
    let mut grads = FlatGrads::new();
    let lens = tape.lens.clone();
    let lens = &lens[..];
    let drop = tape.drop;
    let drop = drop.as_ref();
    while let Some(tp) = tape.layers.pop() {
        let li = tape.layers.len();
        let l = &m.layers[li];
        let name = |p: &str| format!("encoder.layer.{li}.{p}");
        // x_out = LN2(x_mid + down(act(pre)))
        let (dr2, dg2, db2) = layer_norm_backward(&dy, &tp.xhat2, &tp.rstd2, &l.ln2.0);
        grads.insert(name("output.LayerNorm.weight"), dg2);
        grads.insert(name("output.LayerNorm.bias"), db2);
        let mut act = tp.pre.clone();
        activate(&mut act, m.act);
        let (mut dact, dwd, dbd) = linear_backward(
            &masked(drop, Site::FeedForwardOut(li), &dr2, lens, h),
            &act,
            &l.down_w,
            (h, m.inter),
            m.products,
        );
        std::mem::drop(act);
        grads.insert(name("output.dense.weight"), dwd);
        grads.insert(name("output.dense.bias"), dbd);
        let hidden_act = m.act;
        dact.par_chunks_mut(4096).zip(tp.pre.par_chunks(4096)).for_each(|(d, x)| {
            d.iter_mut().zip(x).for_each(|(d, x)| *d *= gelu_grad(*x, hidden_act));
        });
        let x_mid = ln_affine(&tp.xhat1, &l.ln1);
        let (mut dx_mid, dwi, dbi) = linear_backward(&dact, &x_mid, &l.inter_w, (m.inter, h), m.products);
        std::mem::drop((x_mid, dact));
        grads.insert(name("intermediate.dense.weight"), dwi);
        grads.insert(name("intermediate.dense.bias"), dbi);
        add_into(&mut dx_mid, &dr2);
        // x_mid = LN1(x_in + o(ctx))
        let (dr1, dg1, db1) = layer_norm_backward(&dx_mid, &tp.xhat1, &tp.rstd1, &l.ln1.0);
        grads.insert(name("attention.output.LayerNorm.weight"), dg1);
        grads.insert(name("attention.output.LayerNorm.bias"), db1);
        let (dctx, dwo, dbo) = linear_backward(
            &masked(drop, Site::AttentionOut(li), &dr1, lens, h),
            &tp.ctx,
            &l.out_w,
            (h, h),
            m.products,
        );
        grads.insert(name("attention.output.dense.weight"), dwo);
        grads.insert(name("attention.output.dense.bias"), dbo);

        let dqkv = attention_backward(&tp.qkv, &dctx, lens, (h, heads), scale, drop.map(|d| (d, li)), m.products);
        std::mem::drop(tp);
        let x_in = layer_input(m, &tape, li);
        let (mut dx_in, dwqkv, dbqkv) = linear_backward(&dqkv, &x_in, &l.qkv_w, (3 * h, h), m.products);
        for (j, part) in ["query", "key", "value"].iter().enumerate() {
            grads.insert(name(&format!("attention.self.{part}.weight")), dwqkv[j * h * h..(j + 1) * h * h].to_vec());
            grads.insert(name(&format!("attention.self.{part}.bias")), dbqkv[j * h..(j + 1) * h].to_vec());
        }
        add_into(&mut dx_in, &dr1);
        dy = dx_in;
    }
    let dy = masked(drop, Site::Embeddings, &dy, lens, h);
    let (demb, dg0, db0) = layer_norm_backward(&dy, &tape.xhat0, &tape.rstd0, &m.emb_ln.0);
    grads.insert("embeddings.LayerNorm.weight".into(), dg0);
    grads.insert("embeddings.LayerNorm.bias".into(), db0);
    let (mut dword, mut dpos) = (vec![0.0f32; m.vocab * h], vec![0.0f32; m.max_pos * h]);
    let mut row = 0;
    for &n in lens {
        for p in 0..n {
            let id = tape.ids[row] as usize;
            let g = &demb[row * h..(row + 1) * h];
            dword[id * h..(id + 1) * h].iter_mut().zip(g).for_each(|(a, b)| *a += b);
            dpos[p * h..(p + 1) * h].iter_mut().zip(g).for_each(|(a, b)| *a += b);
            row += 1;
        }
    }
    let mut dtype = vec![0.0f32; m.type_vocab * h];
    match &tape.types {
        Some(types) => {
            for (row, &ty) in types.iter().enumerate() {
                let g = &demb[row * h..(row + 1) * h];
                dtype[ty as usize * h..(ty as usize + 1) * h].iter_mut().zip(g).for_each(|(a, b)| *a += b);
            }
        }
        None => dtype[..h].copy_from_slice(&column_sums(&demb, h)),
    }
    grads.insert("embeddings.word_embeddings.weight".into(), dword);
    grads.insert("embeddings.position_embeddings.weight".into(), dpos);
    grads.insert("embeddings.token_type_embeddings.weight".into(), dtype);
    grads
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bert::graph::TrainBert;
    use crate::bert::packed::test_support::{padded, random_bert};
    use candle_core::{Device, Tensor};
    use candle_transformers::models::bert::Config;

    /// Each parameter's gradient as (ours, autograd's) for a random BERT of `config` (weights spread
    /// `spread`) with `products`, and a loss that weighs each hidden state differently.
    fn ours_and_autograd(
        config: &Config,
        spread: f32,
        lens: &[usize],
        drop: Option<Dropout>,
        products: crate::bert::Products,
    ) -> Vec<(String, Vec<f32>, Vec<f32>)> {
        let (h, vocab) = (config.hidden_size, config.vocab_size as u32);
        let (varmap, vb) = random_bert(config, spread);
        let graph = TrainBert::load(vb.clone(), config).unwrap();
        let cpu = CpuBert::load(&vb, config).unwrap().with_products(products, false);
        let max = *lens.iter().max().unwrap();
        let mut rng = fastrand::Rng::with_seed(3);
        let seqs: Vec<Vec<u32>> = lens.iter().map(|&n| (0..n).map(|_| rng.u32(0..vocab)).collect()).collect();
        // A fixed random weight per (token, dimension): loss = sum(w * hidden).
        let weights: Vec<Vec<f32>> = seqs.iter().map(|s| (0..s.len() * h).map(|_| rng.f32() - 0.5).collect()).collect();

        let (ids_t, mask_t) = padded(&seqs, max);
        let mut wpad = Vec::new();
        for (s, w) in seqs.iter().zip(&weights) {
            wpad.extend(w.iter().copied().chain(std::iter::repeat_n(0.0, (max - s.len()) * h)));
        }
        let w_t = Tensor::from_vec(wpad, (lens.len(), max, h), &Device::Cpu).unwrap();
        let loss = (graph.forward_with(&ids_t, &mask_t, drop.as_ref()).unwrap() * w_t).unwrap().sum_all().unwrap();
        let want = loss.backward().unwrap();

        let (_, tape) = forward(&cpu, &seqs.concat(), lens, drop.as_ref()).unwrap();
        let mut got = backward(&cpu, tape, weights.concat());
        let vars = varmap.data().lock().unwrap();
        assert_eq!(got.len(), vars.len(), "a parameter has no gradient");
        vars.iter()
            .map(|(name, var)| {
                let w: Vec<f32> = want.get(var.as_tensor()).unwrap().flatten_all().unwrap().to_vec1().unwrap();
                (name.clone(), got.remove(name).unwrap(), w)
            })
            .collect()
    }

    /// A two-layer BERT small enough for autograd and exact comparisons.
    fn tiny_config() -> Config {
        Config {
            vocab_size: 30,
            hidden_size: 16,
            num_hidden_layers: 2,
            num_attention_heads: 4,
            intermediate_size: 24,
            max_position_embeddings: 12,
            ..Config::default()
        }
    }

    /// Every parameter's gradient from the hand-written backward pass against candle's autograd
    /// through the training graph.
    #[test]
    fn gradients_match_autograd() {
        let dropouts = [None, Some(Dropout { p: 0.25, seed: 5, seq_offset: 0 })];
        for (act, drop) in
            [HiddenAct::Gelu, HiddenAct::GeluApproximate].into_iter().flat_map(|a| dropouts.map(|d| (a, d)))
        {
            let config = Config { hidden_act: act, ..tiny_config() };
            for (name, g, w) in ours_and_autograd(&config, 0.2, &[5, 9, 3], drop, crate::bert::Products::F32) {
                let scale = w.iter().fold(1e-3f32, |a, b| a.max(b.abs()));
                for (j, (a, b)) in g.iter().zip(&w).enumerate() {
                    assert!((a - b).abs() <= 2e-3 * scale, "{act:?} {drop:?} {name}[{j}]: {a} vs {b} (scale {scale})");
                }
            }
        }
    }

    /// What the tape no longer keeps is recomputed bit for bit: each layer's input from the
    /// LayerNorm before it (the first layer's with the embeddings' dropout), and the last hidden
    /// states from the last LayerNorm.
    #[test]
    fn recomputed_inputs_are_the_forward_pass_own() {
        let config = tiny_config();
        let (_, vb) = random_bert(&config, 0.3);
        let cpu = CpuBert::load(&vb, &config).unwrap();
        let (ids, lens) = ((0..17).map(|i| i % 30).collect::<Vec<u32>>(), [5, 9, 3]);
        let drop = Dropout { p: 0.25, seed: 5, seq_offset: 0 };
        let (out, tape) = forward(&cpu, &ids, &lens, Some(&drop)).unwrap();
        assert_eq!(ln_affine(&tape.layers[1].xhat2, &cpu.layers[1].ln2), out);
        // The first layer's input, through a one-layer model on the same weights.
        let one = CpuBert::load(&vb, &Config { num_hidden_layers: 1, ..config.clone() }).unwrap();
        let (first, _) = forward(&one, &ids, &lens, Some(&drop)).unwrap();
        assert_eq!(layer_input(&cpu, &tape, 1), first);
        let x0 = layer_input(&cpu, &tape, 0);
        assert!(x0.iter().filter(|v| **v == 0.0).count() > 17, "the embeddings' dropout was not applied");
    }

    /// The same backward pass with bf16 products on AMX, against autograd in f32: bf16 keeps 8 bits
    /// of mantissa, so each gradient is checked by direction (cosine) and by its largest error
    /// relative to its largest value, at bounds loose enough for bf16 and tight enough that a wrong
    /// transpose or a missing term fails.
    #[test]
    fn bf16_gradients_follow_autograd() {
        if !crate::bert::amx::available() {
            eprintln!("skipped: this CPU (or kernel) has no AMX bf16; the f32 path serves it");
            return;
        }
        let config = Config {
            vocab_size: 40,
            hidden_size: 64,
            num_hidden_layers: 2,
            num_attention_heads: 2,
            intermediate_size: 96,
            max_position_embeddings: 40,
            ..Config::default()
        };
        let all = ours_and_autograd(&config, 0.1, &[17, 33, 6], None, crate::bert::Products::Bf16);
        let largest = |v: &[f32]| v.iter().fold(0f32, |a, b| a.max(b.abs()));
        for (name, g, w) in &all {
            // The key bias's gradient is zero in exact arithmetic (softmax ignores a constant added
            // to a row of scores): both sides are rounding noise, bf16's larger than f32's. It is
            // held to the scale of the query bias's gradient, made of the same sums.
            if let Some(layer) = name.strip_suffix("key.bias") {
                let (_, _, wq) = all.iter().find(|(n, _, _)| *n == format!("{layer}query.bias")).unwrap();
                let noise = largest(g) / largest(wq);
                assert!(noise <= 0.05, "{name}: {noise:.4} of the query bias gradient's scale");
                continue;
            }
            let (g, w) = (&g[..], &w[..]);
            let scale = w.iter().fold(1e-3f32, |a, b| a.max(b.abs()));
            let worst = g.iter().zip(w).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max) / scale;
            let dot: f64 = g.iter().zip(w).map(|(a, b)| (*a as f64) * (*b as f64)).sum();
            let norm = |v: &[f32]| v.iter().map(|a| (*a as f64).powi(2)).sum::<f64>().sqrt();
            let cos = dot / (norm(g) * norm(w)).max(1e-30);
            assert!(cos >= 0.995 && worst <= 0.05, "{name}: cosine {cos:.5}, worst error {worst:.4} of its scale");
        }
    }
}
