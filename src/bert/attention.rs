//! Attention over packed sequences, each (sequence, head) a task of its own: the fused AMX head for
//! inference, else scores, softmax (with dropout and MPNet's bias) and the second product one by one.

use gemm::{Parallelism, gemm};
use rayon::prelude::*;

use super::Products;
use super::amx::{self, Lhs, Out, PackedB};
use super::dropout::{Dropout, ROW_SPAN, Site};
use super::kernels::{SharedMut, softmax_scaled};
use super::mpnet::HeadBiases;

/// dst = beta * lhs x rhs for an [m, k] lhs and a [k, n] rhs, each read through (column, row) strides
/// in elements; dst is row-major with row stride `dst_rs`. `par` spreads one product over every core.
///
/// # Safety
/// Every pointer must address the elements its strides reach, and dst must not alias lhs or rhs.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn matmul(
    (m, n, k): (usize, usize, usize),
    dst: *mut f32,
    dst_rs: usize,
    lhs: (*const f32, usize, usize),
    rhs: (*const f32, usize, usize),
    beta: f32,
    par: bool,
) {
    let p = if par { Parallelism::Rayon(rayon::current_num_threads()) } else { Parallelism::None };
    let i = |x: usize| x as isize;
    // SAFETY: forwarded from the caller.
    unsafe {
        gemm(
            m,
            n,
            k,
            dst,
            1,
            i(dst_rs),
            false,
            lhs.0,
            i(lhs.1),
            i(lhs.2),
            rhs.0,
            i(rhs.1),
            i(rhs.2),
            0.0,
            beta,
            false,
            false,
            false,
            p,
        )
    }
}

/// Multi-head self-attention of each packed sequence over its own tokens only (so no mask is needed).
/// With `for_backward`, the probabilities are those `head_probs` gives (the backward pass recomputes
/// them rather than keeping them: they are the largest part of a training step's memory); with
/// `drop`, layer `.1`'s dropout applies to them; with `bias` (MPNet's), each score gets its head's
/// bias for the offset between key and query.
#[allow(clippy::too_many_arguments)]
pub(crate) fn attention(
    qkv: &[f32],
    lens: &[usize],
    h: usize,
    heads: usize,
    scale: f32,
    ctx: &mut [f32],
    for_backward: bool,
    drop: Option<(&Dropout, usize)>,
    products: Products,
    bias: Option<&HeadBiases>,
) {
    let dh = h / heads;
    let starts = seq_starts(lens);
    let out = SharedMut(ctx.as_mut_ptr());
    let tasks: Vec<(usize, usize)> = (0..lens.len()).flat_map(|s| (0..heads).map(move |hd| (s, hd))).collect();
    tasks.par_iter().for_each_init(Default::default, |(local, dropped): &mut (Vec<f32>, Vec<f32>), &(s, hd)| {
        let (r0, n) = (starts[s], lens[s]);
        if n == 0 {
            return;
        }
        let (q0, v0) = (r0 * 3 * h + hd * dh, r0 * 3 * h + 2 * h + hd * dh);
        let amx = products == Products::Bf16;
        let head_bias = bias.map(|b| b.head(hd));
        // Inference on AMX: the fused head (nothing to recompute for a backward pass, nothing dropped).
        if amx && !for_backward && drop.is_none() {
            let kt = PackedB::from_strided(&qkv[q0 + h..], dh, n, 1, 3 * h);
            let v = PackedB::from_rows(&qkv[v0..], n, dh, 3 * h);
            // SAFETY: the ctx block (rows r0..r0+n, columns hd*dh..+dh, row stride h) is this task's alone.
            unsafe {
                amx::attention_head(
                    &Lhs::rows(&qkv[q0..], n, 3 * h),
                    &kt,
                    &v,
                    scale,
                    head_bias,
                    out.at(r0 * h + hd * dh),
                    h,
                )
            };
            return;
        }
        local.resize(n * n, 0.0);
        head_probs(&qkv[q0..], n, (h, dh), scale, products, bias.map(|b| (b, hd)), local);
        let probs: &[f32] = match drop {
            Some((d, layer)) => {
                dropped_probs(d, layer, s, hd, n, local, dropped);
                &dropped[..]
            }
            None => local,
        };
        let dst = out.at(r0 * h + hd * dh);
        if amx {
            let v = PackedB::from_rows(&qkv[v0..], n, dh, 3 * h);
            // SAFETY: the ctx block (rows r0..r0+n, columns hd*dh..+dh, row stride h) is this task's alone.
            unsafe { amx::matmul_here(&Lhs::rows(probs, n, n), &v, dst, h, Out::Store) };
        } else {
            // SAFETY: v addresses n rows of dh columns (row stride 3h); the ctx block is this task's.
            unsafe { matmul((n, dh, n), dst, h, (probs.as_ptr(), 1, n), (qkv[v0..].as_ptr(), 1, 3 * h), 1.0, false) };
        }
    });
}

/// Where each packed sequence's first row is.
pub(crate) fn seq_starts(lens: &[usize]) -> Vec<usize> {
    let mut at = 0;
    lens.iter()
        .map(|&n| {
            at += n;
            at - n
        })
        .collect()
}

/// One (sequence, head)'s attention probabilities, softmax(scale q k^T + bias), before dropout, into
/// the n x n `probs`. `qkv` starts at the head's query column of the sequence's first row (row
/// stride 3h, keys h columns on). The forward and the backward pass both call this, so the backward
/// reads the very probabilities the forward multiplied V by.
pub(crate) fn head_probs(
    qkv: &[f32],
    n: usize,
    (h, dh): (usize, usize),
    scale: f32,
    products: Products,
    bias: Option<(&HeadBiases, usize)>,
    probs: &mut [f32],
) {
    let amx = products == Products::Bf16;
    if amx {
        // K^T [dh, n] as a bf16 operand, read in place from the qkv rows.
        let kt = PackedB::from_strided(&qkv[h..], dh, n, 1, 3 * h);
        // SAFETY: probs is an n x n buffer.
        unsafe { amx::matmul_here(&Lhs::rows(qkv, n, 3 * h), &kt, probs.as_mut_ptr(), n, Out::Store) };
    } else {
        // SAFETY: q and k address n rows of dh columns with row stride 3h inside qkv; probs is n x n.
        unsafe {
            let (q, k) = (qkv.as_ptr(), qkv[h..].as_ptr());
            matmul((n, n, dh), probs.as_mut_ptr(), n, (q, 1, 3 * h), (k, 3 * h, 1), scale, false);
        }
    }
    // The f32 product applied the scale already; AMX's is applied with the softmax, in one pass,
    // or with the bias where there is one.
    let mut row_scale = if amx { scale } else { 1.0 };
    if let Some((b, hd)) = bias {
        let b = b.head(hd);
        for (i, r) in probs.chunks_exact_mut(n).enumerate() {
            b.add_scaled(r, i, row_scale);
        }
        row_scale = 1.0;
    }
    for r in probs.chunks_exact_mut(n) {
        softmax_scaled(r, row_scale);
    }
}

/// Attention's backward pass: dqkv [t, 3h] from dctx [t, h], each (sequence, head) a task that
/// recomputes its probabilities (`head_probs`, as the forward pass made them) rather than reading
/// them kept: dP = dctx V^T, dV = P'^T dctx, dS = scale P (dP - rowsum(dP P)), dQ = dS K,
/// dK = dS^T Q, where P' = P times layer `drop.1`'s dropout mask multiplied V in the forward pass.
pub(crate) fn attention_backward(
    qkv: &[f32],
    dctx: &[f32],
    lens: &[usize],
    (h, heads): (usize, usize),
    scale: f32,
    drop: Option<(&Dropout, usize)>,
    products: Products,
) -> Vec<f32> {
    let dh = h / heads;
    let starts = seq_starts(lens);
    let mut dqkv = vec![0.0f32; lens.iter().sum::<usize>() * 3 * h];
    let out = SharedMut(dqkv.as_mut_ptr());
    let tasks: Vec<(usize, usize)> = (0..lens.len()).flat_map(|s| (0..heads).map(move |hd| (s, hd))).collect();
    type Bufs = (Vec<f32>, Vec<f32>, Vec<f32>);
    tasks.par_iter().for_each_init(Default::default, |(dp, p, pd): &mut Bufs, &(s, hd)| {
        let (r0, n) = (starts[s], lens[s]);
        if n == 0 {
            return;
        }
        dp.resize(n * n, 0.0);
        p.resize(n * n, 0.0);
        let base = r0 * 3 * h + hd * dh;
        head_probs(&qkv[base..], n, (h, dh), scale, products, None, p);
        let p = &p[..];
        let pv: &[f32] = match drop {
            Some((d, layer)) => {
                dropped_probs(d, layer, s, hd, n, p, pd);
                &pd[..]
            }
            None => p,
        };
        let (qkv, dctx, h3) = (&qkv[base..], &dctx[r0 * h + hd * dh..], 3 * h);
        // SAFETY (both paths): reads n x dh blocks of qkv and dctx through their row strides and
        // this task's n x n buffers; writes only this (sequence, head)'s q, k, v columns of dqkv.
        if products == Products::Bf16 {
            let (q, k, v) = (qkv, &qkv[h..], &qkv[2 * h..]);
            let dc = Lhs::rows(dctx, n, h);
            unsafe {
                amx::matmul_here(&dc, &PackedB::from_strided(v, dh, n, 1, h3), dp.as_mut_ptr(), n, Out::Store);
                let pv_t = Lhs { a: pv, m: n, rs: 1, cs: n };
                amx::matmul_here(&pv_t, &PackedB::from_rows(dctx, n, dh, h), out.at(base + 2 * h), h3, Out::Store);
            }
            softmax_backward(dp, (p, pv), drop.is_some(), n, scale);
            unsafe {
                amx::matmul_here(&Lhs::rows(dp, n, n), &PackedB::from_rows(k, n, dh, h3), out.at(base), h3, Out::Store);
                let ds_t = Lhs { a: dp, m: n, rs: 1, cs: n };
                amx::matmul_here(&ds_t, &PackedB::from_rows(q, n, dh, h3), out.at(base + h), h3, Out::Store);
            }
            return;
        }
        let (q, k, v, dc) = (qkv.as_ptr(), qkv[h..].as_ptr(), qkv[2 * h..].as_ptr(), dctx.as_ptr());
        unsafe {
            matmul((n, n, dh), dp.as_mut_ptr(), n, (dc, 1, h), (v, h3, 1), 1.0, false);
            matmul((n, dh, n), out.at(base + 2 * h), h3, (pv.as_ptr(), n, 1), (dc, 1, h), 1.0, false);
        }
        // The f32 products apply the scale to dQ and dK instead.
        softmax_backward(dp, (p, pv), drop.is_some(), n, 1.0);
        unsafe {
            matmul((n, dh, n), out.at(base), h3, (dp.as_ptr(), 1, n), (k, 1, h3), scale, false);
            matmul((n, dh, n), out.at(base + h), h3, (dp.as_ptr(), n, 1), (q, 1, h3), scale, false);
        }
    });
    dqkv
}

/// dP (n x n, in place) to dS = scale P (dP - rowsum(dP P)); with dropout, dP is first taken
/// through the mask, M = P' / P where P > 0 (a zero probability has a zero gradient anyway).
fn softmax_backward(dp: &mut [f32], (p, pv): (&[f32], &[f32]), dropped: bool, n: usize, scale: f32) {
    if dropped {
        for ((d, a), b) in dp.iter_mut().zip(pv).zip(p) {
            *d = if *b > 0.0 { *d * (a / b) } else { 0.0 };
        }
    }
    for (dr, pr) in dp.chunks_exact_mut(n).zip(p.chunks_exact(n)) {
        let dot: f32 = dr.iter().zip(pr).map(|(a, b)| a * b).sum();
        dr.iter_mut().zip(pr).for_each(|(d, p)| *d = scale * p * (*d - dot));
    }
}

/// `probs` (one sequence's n x n block for head `hd`) times its dropout mask, into `out`.
pub(crate) fn dropped_probs(
    d: &Dropout,
    layer: usize,
    seq: usize,
    hd: usize,
    n: usize,
    probs: &[f32],
    out: &mut Vec<f32>,
) {
    out.resize(n * n, 0.0);
    for (i, (o, p)) in out.chunks_exact_mut(n).zip(probs.chunks_exact(n)).enumerate() {
        d.row(Site::Probs(layer), seq, hd * ROW_SPAN + i, n, o);
        o.iter_mut().zip(p).for_each(|(o, p)| *o *= p);
    }
}
