//! BERT's training dropout (hidden and attention) with masks that do not depend on memory layout:
//! whether an element drops is a hash of (step seed, site, sequence, row, column), so the packed CPU
//! path and the padded autograd graph drop the same elements, and a backward pass regenerates its mask.

/// Where in the encoder a mask applies; each site draws its own mask.
#[derive(Debug, Clone, Copy)]
pub enum Site {
    /// The embeddings after their LayerNorm.
    Embeddings,
    /// Layer `n`'s attention probabilities (rows: head * ROW_SPAN + query position, columns: key position).
    Probs(usize),
    /// Layer `n`'s attention output projection, before the residual add.
    AttentionOut(usize),
    /// Layer `n`'s feed-forward output, before the residual add.
    FeedForwardOut(usize),
}

impl Site {
    fn code(self) -> u64 {
        match self {
            Site::Embeddings => 1,
            Site::Probs(n) => 2 + 3 * n as u64,
            Site::AttentionOut(n) => 3 + 3 * n as u64,
            Site::FeedForwardOut(n) => 4 + 3 * n as u64,
        }
    }
}

/// Attention rows of one head are numbered head * ROW_SPAN + position (no sequence is this long).
pub const ROW_SPAN: usize = 1 << 20;

/// One forward pass's dropout: drop probability `p`, the pass's seed, and the index its first
/// sequence has in the batch (the graph encodes queries and passages in two passes).
#[derive(Debug, Clone, Copy)]
pub struct Dropout {
    pub p: f32,
    pub seed: u64,
    pub seq_offset: usize,
}

/// splitmix64's finaliser: a bijection whose outputs look independent for neighbouring inputs.
pub fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

impl Dropout {
    /// The seed of one training step's micro-batch, from the run's seed.
    pub fn step_seed(seed: u64, step: u64, micro: u64) -> u64 {
        mix(mix(mix(seed) ^ step) ^ micro)
    }

    /// What kept elements are multiplied by, so the expected activation is unchanged.
    pub fn scale(&self) -> f32 {
        1.0 / (1.0 - self.p)
    }

    fn row_key(&self, site: Site, seq: usize, row: usize) -> u64 {
        mix(mix(mix(self.seed ^ site.code()) ^ (seq + self.seq_offset) as u64) ^ row as u64)
    }

    /// The mask of one row: `width` values, each 0 or `scale()`.
    pub fn row(&self, site: Site, seq: usize, row: usize, width: usize, out: &mut [f32]) {
        let key = self.row_key(site, seq, row);
        // Drop when a 24-bit uniform falls below p.
        let cut = (self.p as f64 * (1u64 << 24) as f64) as u64;
        let s = self.scale();
        #[inline(always)]
        fn fill(key: u64, cut: u64, s: f32, out: &mut [f32]) {
            for (j, o) in out.iter_mut().enumerate() {
                *o = if (mix(key ^ j as u64) >> 40) < cut { 0.0 } else { s };
            }
        }
        // The hash's 64-bit products are one vector instruction in AVX-512 (DQ), scalar code in
        // the AVX2 baseline: a training step draws a mask value for every attention probability.
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl")]
        unsafe fn wide(key: u64, cut: u64, s: f32, out: &mut [f32]) {
            fill(key, cut, s, out)
        }
        #[cfg(target_arch = "x86_64")]
        if crate::bert::kernels::avx512() {
            // SAFETY: the CPU was just found to have these features.
            return unsafe { wide(key, cut, s, &mut out[..width]) };
        }
        fill(key, cut, s, &mut out[..width])
    }

    /// Multiplies packed rows `x` ([sum(lens), width], sequence after sequence) by their masks.
    pub fn apply_packed(&self, site: Site, x: &mut [f32], lens: &[usize], width: usize) {
        use rayon::prelude::*;
        let mut owners = Vec::with_capacity(x.len() / width.max(1));
        for (s, &n) in lens.iter().enumerate() {
            owners.extend((0..n).map(|p| (s, p)));
        }
        x.par_chunks_mut(width).zip(owners.par_iter()).for_each_init(
            || vec![0.0f32; width],
            |m, (r, &(s, p))| {
                self.row(site, s, p, width, m);
                r.iter_mut().zip(m.iter()).for_each(|(v, m)| *v *= m);
            },
        );
    }

    /// The mask of a padded [batch, len, width] activation, flat (padding rows get masks too; they
    /// never reach a real token).
    pub fn padded(&self, site: Site, batch: usize, len: usize, width: usize) -> Vec<f32> {
        use rayon::prelude::*;
        let mut out = vec![0.0f32; batch * len * width];
        out.par_chunks_exact_mut(width).enumerate().for_each(|(i, row)| self.row(site, i / len, i % len, width, row));
        out
    }

    /// The mask of padded [batch, heads, len, len] attention probabilities, flat.
    pub fn padded_probs(&self, layer: usize, batch: usize, heads: usize, len: usize) -> Vec<f32> {
        use rayon::prelude::*;
        let mut out = vec![0.0f32; batch * heads * len * len];
        out.par_chunks_exact_mut(len).enumerate().for_each(|(i, row)| {
            let (b, hd, q) = (i / (heads * len), (i / len) % heads, i % len);
            self.row(Site::Probs(layer), b, hd * ROW_SPAN + q, len, row);
        });
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drops_about_p_and_keeps_the_mean() {
        let d = Dropout { p: 0.1, seed: 7, seq_offset: 0 };
        let mut row = vec![0.0; 100_000];
        d.row(Site::Embeddings, 0, 0, row.len(), &mut row);
        let dropped = row.iter().filter(|&&v| v == 0.0).count() as f64 / row.len() as f64;
        assert!((dropped - 0.1).abs() < 0.005, "dropped {dropped}");
        let mean = row.iter().map(|&v| v as f64).sum::<f64>() / row.len() as f64;
        assert!((mean - 1.0).abs() < 0.01, "mean {mean}");
        // Another site, sequence or seed draws another mask; the same arguments the same one.
        let mut other = vec![0.0; 1000];
        let mut same = vec![0.0; 1000];
        d.row(Site::AttentionOut(0), 0, 0, 1000, &mut other);
        d.row(Site::Embeddings, 0, 0, 1000, &mut same);
        assert_ne!(other, row[..1000]);
        assert_eq!(same, row[..1000]);
        // An offset batch sees sequence s as s + offset.
        let shifted = Dropout { seq_offset: 3, ..d };
        shifted.row(Site::Embeddings, 0, 5, 1000, &mut other);
        d.row(Site::Embeddings, 3, 5, 1000, &mut same);
        assert_eq!(other, same);
    }
}
