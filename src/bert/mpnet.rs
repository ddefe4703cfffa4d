//! What MPNet (all-mpnet-base-v2) changes in the packed encoder: its attention's tensor names, positions
//! that start after the padding id, no token types, and a learned attention bias by relative position.

use candle_nn::VarBuilder;
use candle_transformers::models::bert::Config;

/// MPNet counts positions from `padding_idx + 1` (RoBERTa's convention; its padding id is 1).
pub(crate) const POSITION_OFFSET: usize = 2;

/// Where an MPNet layer's attention tensors are (the rest of a layer is named as BERT's).
pub(crate) const ATTENTION_NAMES: [&str; 5] =
    ["attention.attn.q", "attention.attn.k", "attention.attn.v", "attention.attn.o", "attention.LayerNorm"];

/// The tensor only an MPNet checkpoint has.
const BIAS_TENSOR: &str = "encoder.relative_attention_bias.weight";

/// True when `vb` holds an MPNet encoder rather than a BERT.
pub(crate) fn is_mpnet(vb: &VarBuilder) -> bool {
    vb.contains_tensor(BIAS_TENSOR)
}

/// The attention bias of one offset (key position minus query position) for every head, shared
/// by all layers (MPNetEncoder.relative_attention_bias).
pub(crate) struct RelativeBias {
    /// [buckets, heads], as the checkpoint stores it.
    table: Vec<f32>,
    buckets: usize,
    heads: usize,
}

/// MPNet's bucket of a relative position (T5's scheme, bidirectional, max_distance 128): offsets
/// below 8 each get their own bucket, longer ones share buckets on a log scale, each direction
/// half of them. Computed in f32 as PyTorch does, so the truncation lands where its does (checked
/// against PyTorch's buckets of every offset from -600 to 600 in tests/fixtures/mpnet_vectors.json).
pub(crate) fn bucket(relative: i64, buckets: usize) -> usize {
    const MAX_DISTANCE: f32 = 128.0;
    let half = (buckets / 2) as i64;
    let n = -relative;
    let base = if n < 0 { half } else { 0 };
    let n = n.abs();
    let exact = half / 2;
    if n < exact {
        return (base + n) as usize;
    }
    let log_ratio = (n as f32 / exact as f32).ln() / (MAX_DISTANCE / exact as f32).ln();
    let large = exact + (log_ratio * (half - exact) as f32) as i64;
    (base + large.min(half - 1)) as usize
}

impl RelativeBias {
    pub(crate) fn load(vb: &VarBuilder, c: &Config) -> candle_core::Result<RelativeBias> {
        let t = vb.get_unchecked(BIAS_TENSOR)?;
        let (buckets, heads) = t.dims2()?;
        if heads != c.num_attention_heads {
            candle_core::bail!("{BIAS_TENSOR} has {heads} heads, config.json {}", c.num_attention_heads)
        }
        let table = t.flatten_all()?.to_dtype(candle_core::DType::F32)?.to_vec1()?;
        Ok(RelativeBias { table, buckets, heads })
    }

    /// For sequences of at most `longest` tokens: each head's bias by offset, head after head, each
    /// `2 * longest - 1` long from offset `1 - longest`. Query row `i` of any sequence of n tokens
    /// reads its n keys' biases contiguously at `longest - 1 - i` (see `HeadBias::row`).
    pub(crate) fn by_offset(&self, longest: usize) -> HeadBiases {
        let span = (2 * longest).saturating_sub(1);
        let mut rows = vec![0.0f32; self.heads * span];
        for k in 0..span {
            let b = bucket(k as i64 - (longest as i64 - 1), self.buckets);
            for hd in 0..self.heads {
                rows[hd * span + k] = self.table[b * self.heads + hd];
            }
        }
        HeadBiases { rows, span, longest }
    }
}

/// Every head's bias by offset for one forward pass (`RelativeBias::by_offset`).
pub(crate) struct HeadBiases {
    rows: Vec<f32>,
    span: usize,
    longest: usize,
}

impl HeadBiases {
    pub(crate) fn head(&self, hd: usize) -> HeadBias<'_> {
        HeadBias { by_offset: &self.rows[hd * self.span..(hd + 1) * self.span], longest: self.longest }
    }
}

/// One head's bias by offset.
#[derive(Clone, Copy)]
pub(crate) struct HeadBias<'a> {
    by_offset: &'a [f32],
    longest: usize,
}

impl HeadBias<'_> {
    /// The biases of query `i` over keys 0..n of its sequence.
    pub(crate) fn row(&self, i: usize, n: usize) -> &[f32] {
        &self.by_offset[self.longest - 1 - i..][..n]
    }

    /// row = scale * row + bias for query `i`'s scores over the n = row.len() keys of its sequence.
    pub(crate) fn add_scaled(&self, row: &mut [f32], i: usize, scale: f32) {
        let n = row.len();
        for (s, b) in row.iter_mut().zip(self.row(i, n)) {
            *s = s.mul_add(scale, *b);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_follow_t5s_scheme_at_hand_computed_offsets() {
        // Keys before the query (negative offsets) use buckets 0..16, after it 16..32.
        assert_eq!(bucket(0, 32), 0);
        assert_eq!(bucket(-1, 32), 1);
        assert_eq!(bucket(-7, 32), 7);
        assert_eq!(bucket(1, 32), 17);
        assert_eq!(bucket(7, 32), 23);
        // From 8 on, 8 + floor(ln(n/8) / ln(16) * 8): n = 11 gives 8 + 0.919 -> 8; n = 127 -> 15.
        assert_eq!(bucket(-11, 32), 8);
        assert_eq!(bucket(-127, 32), 15);
        assert_eq!(bucket(-10_000, 32), 15);
        assert_eq!(bucket(10_000, 32), 31);
    }

    #[test]
    fn buckets_equal_pytorchs_for_every_offset_to_600() {
        let fixture: serde_json::Value =
            serde_json::from_str(include_str!("../../tests/fixtures/mpnet_vectors.json")).unwrap();
        let from = fixture["bucket_offsets_from"].as_i64().unwrap();
        let buckets = fixture["buckets"].as_array().unwrap();
        assert_eq!(buckets.len(), 1201);
        for (k, b) in buckets.iter().enumerate() {
            let offset = from + k as i64;
            assert_eq!(bucket(offset, 32) as u64, b.as_u64().unwrap(), "offset {offset}");
        }
    }

    #[test]
    fn a_rows_biases_are_its_keys_offsets() {
        let heads = 2;
        let table: Vec<f32> = (0..32 * heads).map(|x| x as f32).collect();
        let rel = RelativeBias { table, buckets: 32, heads };
        let all = rel.by_offset(5);
        let h1 = all.head(1);
        for n in 1..=5 {
            for i in 0..n {
                let want: Vec<f32> = (0..n).map(|j| (bucket(j as i64 - i as i64, 32) * heads + 1) as f32).collect();
                assert_eq!(h1.row(i, n), &want[..], "row {i} of {n}");
            }
        }
    }
}
