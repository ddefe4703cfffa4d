//! The element-wise and row kernels of the packed CPU path: activations, LayerNorm with what its
//! backward pass keeps, softmax, and the exp/erf approximations they use (vectorisable, no libm).

use candle_transformers::models::bert::HiddenAct;
use rayon::prelude::*;

/// Rows handed to one task in the element-wise passes: big enough to amortise scheduling.
pub(crate) const ROWS_PER_TASK: usize = 64;

/// A raw pointer that tasks writing disjoint parts of one buffer may share.
#[derive(Clone, Copy)]
pub(crate) struct SharedMut(pub(crate) *mut f32);
// SAFETY: every task writes a disjoint (rows x columns) block; see `attention`.
unsafe impl Send for SharedMut {}
unsafe impl Sync for SharedMut {}

impl SharedMut {
    // A method, so closures capture the whole Sync wrapper rather than its raw-pointer field.
    pub(crate) fn at(self, offset: usize) -> *mut f32 {
        self.0.wrapping_add(offset)
    }
}

/// Whether this CPU runs 16-lane AVX-512 (F, BW, DQ, VL). The crate is built for AVX2 so the binary
/// runs everywhere; the row kernels below are compiled a second time for AVX-512 and picked here,
/// which on a Sapphire Rapids halves their time (they are a third of an encoder pass once the
/// products run on AMX).
#[inline]
pub(crate) fn avx512() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512dq")
            && std::arch::is_x86_feature_detected!("avx512vl")
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// Defines `$name` running the inlined `$body` as AVX-512 code where the CPU has it, else as the
/// crate's baseline (AVX2) code: the same source, compiled twice.
macro_rules! dispatched {
    ($(#[$doc:meta])* fn $name:ident($($arg:ident: $ty:ty),*) $body:block) => {
        $(#[$doc])*
        pub(crate) fn $name($($arg: $ty),*) {
            #[inline(always)]
            fn body($($arg: $ty),*) $body
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl")]
            unsafe fn wide($($arg: $ty),*) {
                body($($arg),*)
            }
            #[cfg(target_arch = "x86_64")]
            if avx512() {
                // SAFETY: the CPU was just found to have these features.
                return unsafe { wide($($arg),*) };
            }
            body($($arg),*)
        }
    };
}

/// An activation over a slice, in place (inlined into the dispatched or AVX-512 code that calls it).
#[inline(always)]
pub(crate) fn apply(c: &mut [f32], act: HiddenAct) {
    match act {
        HiddenAct::Gelu => c.iter_mut().for_each(|v| *v = gelu_erf(*v)),
        HiddenAct::GeluApproximate => c.iter_mut().for_each(|v| *v = gelu_tanh(*v)),
        HiddenAct::Relu => c.iter_mut().for_each(|v| *v = v.max(0.0)),
    }
}

dispatched! {
    /// One chunk of an activation, in place.
    fn activate_chunk(c: &mut [f32], act: HiddenAct) {
        apply(c, act)
    }
}

pub(crate) fn activate(x: &mut [f32], act: HiddenAct) {
    x.par_chunks_mut(4096).for_each(|c| activate_chunk(c, act));
}

/// x = LayerNorm(x + add) row by row, in place. With `keep`, the normalised rows (before the affine
/// part) and each row's 1/std are written there for a backward pass.
pub(crate) fn layer_norm_rows(
    x: &mut [f32],
    add: Option<&[f32]>,
    (g, b): &(Vec<f32>, Vec<f32>),
    eps: f32,
    keep: Option<(&mut [f32], &mut [f32])>,
) {
    let h = g.len();
    let kept = keep.map(|(xhat, rstd)| (SharedMut(xhat.as_mut_ptr()), SharedMut(rstd.as_mut_ptr())));
    let work = |(chunk, xs, adds): (usize, &mut [f32], Option<&[f32]>)| {
        let rows = xs.len() / h;
        // SAFETY: this task's rows of xhat and rstd start there, and belong to it alone.
        let kept = kept.map(|(xhat, rstd)| unsafe {
            (
                std::slice::from_raw_parts_mut(xhat.at(chunk * ROWS_PER_TASK * h), rows * h),
                std::slice::from_raw_parts_mut(rstd.at(chunk * ROWS_PER_TASK), rows),
            )
        });
        layer_norm_task(xs, adds, g, b, eps, kept)
    };
    match add {
        Some(a) => x
            .par_chunks_mut(h * ROWS_PER_TASK)
            .zip(a.par_chunks(h * ROWS_PER_TASK))
            .enumerate()
            .for_each(|(c, (xs, a))| work((c, xs, Some(a)))),
        None => x.par_chunks_mut(h * ROWS_PER_TASK).enumerate().for_each(|(c, xs)| work((c, xs, None))),
    }
}

dispatched! {
    /// LayerNorm of one task's rows (see `layer_norm_rows`); `kept`: its rows of xhat and 1/std.
    fn layer_norm_task(
        xs: &mut [f32],
        adds: Option<&[f32]>,
        g: &[f32],
        b: &[f32],
        eps: f32,
        kept: Option<(&mut [f32], &mut [f32])>
    ) {
        let h = g.len();
        let mut kept = kept;
        for (i, r) in xs.chunks_exact_mut(h).enumerate() {
            if let Some(a) = adds {
                for (v, a) in r.iter_mut().zip(&a[i * h..(i + 1) * h]) {
                    *v += a;
                }
            }
            let mean = sum(r) / h as f32;
            let mut var = [0.0f32; 16];
            let mut chunks = r.chunks_exact(16);
            for c in &mut chunks {
                for j in 0..16 {
                    let d = c[j] - mean;
                    var[j] += d * d;
                }
            }
            let tail: f32 = chunks.remainder().iter().map(|v| (v - mean) * (v - mean)).sum();
            let inv = 1.0 / ((var.iter().sum::<f32>() + tail) / h as f32 + eps).sqrt();
            if let Some((xhat, rstd)) = kept.as_mut() {
                rstd[i] = inv;
                for (d, v) in xhat[i * h..(i + 1) * h].iter_mut().zip(r.iter()) {
                    *d = (v - mean) * inv;
                }
            }
            for ((v, g), b) in r.iter_mut().zip(g).zip(b) {
                *v = (*v - mean) * inv * g + b;
            }
        }
    }
}

/// A sum in sixteen lanes, which the compiler turns into vector adds.
#[inline(always)]
pub(crate) fn sum(v: &[f32]) -> f32 {
    let mut acc = [0.0f32; 16];
    let mut chunks = v.chunks_exact(16);
    for c in &mut chunks {
        for j in 0..16 {
            acc[j] += c[j];
        }
    }
    acc.iter().sum::<f32>() + chunks.remainder().iter().sum::<f32>()
}

dispatched! {
    /// softmax(scale * r), in place, for a scale > 0.
    fn softmax_scaled(r: &mut [f32], scale: f32) {
        let inv = softmax_exp(r, scale);
        for v in r.iter_mut() {
            *v *= inv;
        }
    }
}

/// The first two of softmax's three passes, in place: e^(scale * (v - max)) for a scale > 0 (the
/// scale folded into the exponent), returning 1 / their sum, which the caller applies (the fused
/// attention does it while converting the row for the next product).
#[inline(always)]
pub(crate) fn softmax_exp(r: &mut [f32], scale: f32) -> f32 {
    let mut m = [f32::NEG_INFINITY; 16];
    let mut chunks = r.chunks_exact(16);
    for c in &mut chunks {
        for j in 0..16 {
            m[j] = m[j].max(c[j]);
        }
    }
    let max = chunks.remainder().iter().fold(m.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)), |a, &b| a.max(b));
    let shift = -scale * max;
    let mut acc = [0.0f32; 16];
    let mut chunks = r.chunks_exact_mut(16);
    for c in &mut chunks {
        for j in 0..16 {
            c[j] = exp(c[j].mul_add(scale, shift));
            acc[j] += c[j];
        }
    }
    let mut total = acc.iter().sum::<f32>();
    for v in chunks.into_remainder() {
        *v = exp(v.mul_add(scale, shift));
        total += *v;
    }
    1.0 / total
}

/// e^x with Cephes' expf polynomial (relative error about 1e-7); branch-free so loops over it vectorise.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    let x = x.clamp(-87.0, 88.0);
    let n = x.mul_add(std::f32::consts::LOG2_E, 0.5).floor();
    let r = n.mul_add(2.121_944_4e-4, n.mul_add(-0.693_359_4, x));
    let z = r * r;
    // Horner's rule in fused multiply-adds (the build's x86-64-v3 baseline has FMA): half the
    // instructions of separate products and sums, and one rounding per step.
    let p = 1.987_569_1e-4f32.mul_add(r, 1.398_2e-3).mul_add(r, 8.333_452e-3).mul_add(r, 4.166_579_6e-2);
    let p = p.mul_add(r, 1.666_666_5e-1).mul_add(r, 0.5);
    let y = p.mul_add(z, r + 1.0);
    // 2^n from n's bits once it sits in the low mantissa of 1.5 * 2^23: unlike `n as i32`, whose
    // saturating conversion is scalar code, this stays in vector registers.
    let n_bits = (n + 12_582_912.0).to_bits() as i32 - 0x4B40_0000;
    y * f32::from_bits(((n_bits + 127) << 23) as u32)
}

/// erf(x) by Abramowitz and Stegun 7.1.26: absolute error 1.5e-7, under 5e-7 after f32 rounding.
#[inline(always)]
pub fn erf(x: f32) -> f32 {
    let a = x.abs();
    let t = 1.0 / 0.327_591_1f32.mul_add(a, 1.0);
    let poly = 1.061_405_4f32.mul_add(t, -1.453_152_1).mul_add(t, 1.421_413_8).mul_add(t, -0.284_496_74);
    let poly = poly.mul_add(t, 0.254_829_6) * t;
    let y = (-poly).mul_add(exp(-a * a), 1.0);
    y.copysign(x)
}

#[inline(always)]
pub(crate) fn gelu_erf(x: f32) -> f32 {
    0.5 * x * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2))
}

#[inline(always)]
pub(crate) fn gelu_tanh(x: f32) -> f32 {
    // tanh(u) = 1 - 2 / (e^{2u} + 1)
    let u = 0.797_884_6 * (x + 0.044_715 * x * x * x);
    0.5 * x * (2.0 - 2.0 / (exp(2.0 * u) + 1.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_and_erf_match_libm() {
        for i in -8000..8000 {
            let x = i as f32 / 100.0;
            let (e, want) = (exp(x), x.exp());
            assert!(((e - want) / want).abs() < 3e-7, "exp({x}) = {e}, want {want}");
            let x = i as f32 / 1000.0;
            assert!((erf(x) - libm::erff(x)).abs() < 5e-7, "erf({x}) = {}, want {}", erf(x), libm::erff(x));
        }
    }

    #[test]
    fn softmax_and_layer_norm_by_hand() {
        let mut r = vec![1.0, 2.0, 3.0];
        softmax_scaled(&mut r, 1.0);
        let z = 1f32.exp() + 2f32.exp() + 3f32.exp();
        for (v, x) in r.iter().zip([1f32, 2.0, 3.0]) {
            assert!((v - x.exp() / z).abs() < 1e-7);
        }
        // A scale folded in, over a row long enough for the vector loops and their remainder.
        let raw: Vec<f32> = (0..37).map(|i| (i as f32 * 0.37).sin() * 4.0).collect();
        let mut got = raw.clone();
        softmax_scaled(&mut got, 0.5);
        let z: f64 = raw.iter().map(|v| (0.5 * *v as f64).exp()).sum();
        for (g, v) in got.iter().zip(&raw) {
            assert!((*g as f64 - (0.5 * *v as f64).exp() / z).abs() < 1e-7);
        }
        // mean 2.5, variance 1.25 over [1, 2, 3, 4]
        let mut x = vec![0.0, 1.0, 2.0, 3.0];
        let add = vec![1.0; 4];
        layer_norm_rows(&mut x, Some(&add), &(vec![2.0; 4], vec![0.5; 4]), 0.0, None);
        for (v, raw) in x.iter().zip([1f32, 2.0, 3.0, 4.0]) {
            assert!((v - ((raw - 2.5) / 1.25f32.sqrt() * 2.0 + 0.5)).abs() < 1e-6);
        }
    }
}
