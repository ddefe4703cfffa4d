//! The fused AMX operations of inference: one attention head whose probabilities never reach
//! memory, and a feed-forward block whose intermediate never does, on the products of `amx`.

use candle_transformers::models::bert::HiddenAct;
use rayon::prelude::*;

use super::{
    Aligned, BLOCK, GROUP, Lhs, Out, OutPtr, PackedB, TILE, available, bf16, configure, convert_panel, convert32,
    convert32_scaled, kernel, kernel_ld, panels_times, release, with_scratch,
};
use crate::bert::kernels::{apply, softmax_exp};
use crate::bert::mpnet::HeadBias;

/// One (sequence, head) of attention, ctx = softmax(scale Q K^T) V, 32 query rows at a time: the
/// rows' scores (32 x n) are made, exponentiated and converted into the second product's bf16
/// operand while they are in cache, softmax's division applied in that conversion, so the n x n
/// probabilities never reach memory. For inference; training takes the two products one by one. `kt` is K^T [dh, n], `v` is V [n, dh]; `bias` (MPNet's, by relative
/// position) is added to the scaled scores.
///
/// # Safety
/// `ctx` must address `q.m` rows of `v.n` floats at stride `ldc` that no other thread touches;
/// `available()` must be true; q.m == kt.n == v.k.
pub(crate) unsafe fn attention_head(
    q: &Lhs,
    kt: &PackedB,
    v: &PackedB,
    scale: f32,
    bias: Option<HeadBias>,
    ctx: *mut f32,
    ldc: usize,
) {
    thread_local! {
        static BUFS: std::cell::RefCell<[Aligned<u16>; 2]> =
            std::cell::RefCell::new([Aligned::zeroed(0), Aligned::zeroed(0)]);
        static ROWS: std::cell::RefCell<(Aligned<f32>, Aligned<f32>)> =
            std::cell::RefCell::new((Aligned::zeroed(0), Aligned::zeroed(BLOCK * BLOCK)));
    }
    BUFS.with_borrow_mut(|[p_in, p_mid]| {
        ROWS.with_borrow_mut(|(scores, block)| {
            let grow = |buf: &mut Aligned<u16>, steps: usize| {
                if buf.len() < steps.max(1) * 2 * TILE {
                    *buf = Aligned::zeroed(steps.max(1) * 2 * TILE);
                }
            };
            grow(p_in, kt.kb);
            grow(p_mid, v.kb);
            if scores.len() < BLOCK * v.kb * BLOCK {
                *scores = Aligned::zeroed(BLOCK * v.kb * BLOCK);
            }
            for p in 0..q.m.div_ceil(BLOCK) {
                // SAFETY: forwarded from the caller; the buffers were sized above.
                unsafe { attention_panel(q, kt, v, (scale, bias), ctx, ldc, p, [p_in, p_mid], scores, block) };
            }
        })
    });
}

/// Rows p*32.. of `attention_head`.
///
/// # Safety
/// As `attention_head`; `p_in` holds kt.kb steps, `p_mid` v.kb steps, `scores` 32 x v.kb*32 floats.
#[allow(clippy::too_many_arguments)]
#[cfg_attr(target_arch = "x86_64", target_feature(enable = "avx512f,avx512bf16,avx512bw,avx512vl,avx512dq"))]
unsafe fn attention_panel(
    q: &Lhs,
    kt: &PackedB,
    v: &PackedB,
    (scale, bias): (f32, Option<HeadBias>),
    ctx: *mut f32,
    ldc: usize,
    p: usize,
    [p_in, p_mid]: [&mut [u16]; 2],
    scores: &mut [f32],
    block: &mut [f32],
) {
    let (m0, n, width) = (p * BLOCK, kt.n, v.kb * BLOCK);
    convert_panel(q, m0, kt.k, p_in);
    configure();
    for nb in 0..n.div_ceil(BLOCK) {
        // SAFETY: AMX configured; p_in and the K^T block hold `kb` steps; scores holds 32 rows of
        // `width` floats, 64-byte aligned (width is a multiple of 32).
        unsafe { kernel_ld(p_in.as_ptr(), kt.block(nb), kt.kb, scores[nb * BLOCK..].as_mut_ptr(), width) };
    }
    for i in 0..BLOCK {
        let row = &mut scores[i * width..][..n];
        let inv = match bias {
            Some(b) if m0 + i < n => {
                b.add_scaled(row, m0 + i, scale);
                softmax_exp(row, 1.0)
            }
            _ => softmax_exp(row, scale),
        };
        for s in 0..v.kb {
            let dst = &mut p_mid[((s * 2 + i / 16) * 16 + i % 16) * BLOCK..][..BLOCK];
            let chunk = &row[s * BLOCK..(s * BLOCK + BLOCK).min(n)];
            if chunk.len() == BLOCK {
                // SAFETY: AVX512-BF16 is there (this only runs where a bf16 engine does).
                unsafe { convert32_scaled(chunk, inv, dst) };
            } else {
                // The last keys of a sequence whose length is not a multiple of 32; zero beyond.
                for (e, d) in dst.iter_mut().enumerate() {
                    *d = chunk.get(e).map_or(0, |x| bf16(x * inv));
                }
            }
        }
    }
    // SAFETY: the caller owns these rows of ctx; AMX is configured.
    unsafe { panels_times((p_mid, p_mid.len()), p, 1, q.m, v, OutPtr(ctx), ldc, Out::Store, block) };
    release();
}

/// A feed-forward block, C = act(A U + u) D + d, one 32-row panel at a time: the intermediate
/// panel (32 x U's width) goes from the first product's output, through bias and activation,
/// straight into the bf16 operand of the second, and never to memory; that matrix (four times the
/// hidden width) is the largest an encoder pass writes and reads. `available()` must be true.
pub fn mlp(a: &Lhs, up: (&PackedB, &[f32]), act: HiddenAct, down: (&PackedB, &[f32]), c: &mut [f32], ldc: usize) {
    assert!(available(), "bf16 products called where no bf16 engine is available");
    assert_eq!(up.0.n, down.0.k, "the intermediate width");
    assert!(a.m == 0 || c.len() >= (a.m - 1) * ldc + down.0.n, "output shape");
    let c = OutPtr(c.as_mut_ptr());
    let (in_len, mid_len) = (up.0.kb.max(1) * 2 * TILE, down.0.kb.max(1) * 2 * TILE);
    (0..a.m.div_ceil(BLOCK * GROUP)).into_par_iter().for_each(|g| {
        with_scratch(GROUP * (in_len + mid_len), |panels, block| {
            let (p_in, p_mid) = panels.split_at_mut(GROUP * in_len);
            // SAFETY: each group writes its own rows of C, which the assert above keeps inside `c`.
            unsafe { mlp_group(a, up, act, down, c, ldc, g, (p_in, in_len), (p_mid, mid_len), block) }
        })
    });
}

/// Rows g*GROUP*32.. of `mlp`'s output.
///
/// # Safety
/// As `group`, with `p_in` holding GROUP panels of `up.kb` steps and `p_mid` of `down.kb` steps.
#[allow(clippy::too_many_arguments)]
#[cfg_attr(target_arch = "x86_64", target_feature(enable = "avx512f,avx512bf16,avx512bw,avx512vl,avx512dq"))]
unsafe fn mlp_group(
    a: &Lhs,
    (up, up_bias): (&PackedB, &[f32]),
    act: HiddenAct,
    (down, down_bias): (&PackedB, &[f32]),
    c: OutPtr,
    ldc: usize,
    g: usize,
    (p_in, in_len): (&mut [u16], usize),
    (p_mid, mid_len): (&mut [u16], usize),
    block: &mut [f32],
) {
    let first = g * GROUP;
    let count = (a.m.div_ceil(BLOCK) - first).min(GROUP);
    for j in 0..count {
        convert_panel(a, (first + j) * BLOCK, up.k, &mut p_in[j * in_len..][..in_len]);
    }
    configure();
    for nb in 0..up.n.div_ceil(BLOCK) {
        let cols = (up.n - nb * BLOCK).min(BLOCK);
        for j in 0..count {
            // SAFETY: AMX configured; the panel and the B block hold `kb` steps; block is 32x32.
            unsafe { kernel(p_in[j * in_len..].as_ptr(), up.block(nb), up.kb, block.as_mut_ptr()) };
            // Block nb of the intermediate is step nb of the second product's panel: row i goes
            // to half i/16, row i%16, zero past the intermediate width (so it adds nothing).
            for i in 0..BLOCK {
                let row = &mut block[i * BLOCK..][..BLOCK];
                for (v, b) in row[..cols].iter_mut().zip(&up_bias[nb * BLOCK..]) {
                    *v += b;
                }
                apply(&mut row[..cols], act);
                row[cols..].fill(0.0);
                let dst = &mut p_mid[j * mid_len + ((nb * 2 + i / 16) * 16 + i % 16) * BLOCK..][..BLOCK];
                // SAFETY: AVX512-BF16 is there (this function is only called where a bf16 engine is).
                unsafe { convert32(row, dst) };
            }
        }
    }
    // SAFETY: as above; the caller owns these rows of C.
    unsafe { panels_times((p_mid, mid_len), first, count, a.m, down, c, ldc, Out::Bias(down_bias), block) };
    release();
}
