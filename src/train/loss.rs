//! The ranking loss: softmax cross-entropy over scaled cosine similarities, each query's own
//! passage the target and every other passage in the batch (and any mined hard negatives) a negative.

use candle_core::{Result, Tensor};

/// Mean cross-entropy of `scale * scores`, where `scores` is [B, P] (P >= B) and column i holds
/// query i's positive; the `masked` (row, column) entries (passages the labels say are relevant to
/// that row's query, see `data::Relevance`) take no part in their row's softmax.
pub fn ranking_loss(scores: &Tensor, scale: f64, masked: &[(usize, usize)]) -> Result<Tensor> {
    let (b, p) = scores.dims2()?;
    let targets = Tensor::arange(0u32, b as u32, scores.device())?;
    let logits = (scores * scale)?;
    if masked.is_empty() {
        return candle_nn::loss::cross_entropy(&logits, &targets);
    }
    // e^-1e4 is 0 in f32: the entry adds nothing to the row's sum and gets no gradient.
    let mut mask = vec![0f32; b * p];
    for &(r, c) in masked {
        mask[r * p + c] = -1e4;
    }
    let mask = Tensor::from_vec(mask, (b, p), scores.device())?.to_dtype(logits.dtype())?;
    candle_nn::loss::cross_entropy(&(logits + mask)?, &targets)
}

pub use crate::bert::encoder::normalize_rows as normalize;

/// Cosine similarities of the Mafin embedding concat(n(bb), w * n(aug)), from the parts' own cosine
/// matrices: (S_bb + w^2 S_aug) / (1 + w^2). With no black box it is plain S_aug.
pub fn combined(s_aug: &Tensor, s_bb: Option<&Tensor>, w: f64) -> Result<Tensor> {
    match s_bb {
        Some(s_bb) => ((s_bb + (s_aug * (w * w))?)? / (1.0 + w * w))?.contiguous(),
        None => Ok(s_aug.clone()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// Loss and gradient on a 3x3 case worked by hand: L = mean_i(-s*S_ii + log sum_j exp(s*S_ij))
    /// and dL/dS_ij = s/B * (softmax(s*S_i)_j - [i == j]).
    #[test]
    fn three_by_three_by_hand() {
        let s = [[0.9f64, 0.1, -0.2], [0.3, 0.5, 0.4], [0.0, 0.7, 0.6]];
        let scale = 20.0;
        let var = Var::from_vec(s.iter().flatten().map(|&x| x as f32).collect(), (3, 3), &Device::Cpu).unwrap();
        let loss = ranking_loss(var.as_tensor(), scale, &[]).unwrap();
        let grads = loss.backward().unwrap();
        let g: Vec<Vec<f32>> = grads.get(var.as_tensor()).unwrap().to_vec2().unwrap();

        let mut want_loss = 0.0;
        for (i, row) in s.iter().enumerate() {
            let z: f64 = row.iter().map(|x| (scale * x).exp()).sum();
            want_loss += -scale * row[i] + z.ln();
            for (j, x) in row.iter().enumerate() {
                let p = (scale * x).exp() / z;
                let want = scale / 3.0 * (p - if i == j { 1.0 } else { 0.0 });
                assert!((g[i][j] as f64 - want).abs() < 1e-5, "grad[{i}][{j}] = {} want {want}", g[i][j]);
            }
        }
        want_loss /= 3.0;
        let got = loss.to_scalar::<f32>().unwrap() as f64;
        assert!((got - want_loss).abs() < 1e-4, "loss {got} want {want_loss}");
        // Row 2: the positive 0.6 loses to 0.7, so that row alone costs more than log(2).
        assert!(want_loss > 0.0);
    }

    /// A masked entry is as if its column were not in its row: the 3x3 case's row 0 without column 1,
    /// by hand, and no gradient reaches the masked score.
    #[test]
    fn a_masked_passage_is_left_out_of_its_row() {
        let s = [[0.9f64, 0.8, -0.2], [0.3, 0.5, 0.4], [0.0, 0.7, 0.6]];
        let scale = 20.0;
        let var = Var::from_vec(s.iter().flatten().map(|&x| x as f32).collect(), (3, 3), &Device::Cpu).unwrap();
        let loss = ranking_loss(var.as_tensor(), scale, &[(0, 1)]).unwrap();
        let g: Vec<Vec<f32>> = loss.backward().unwrap().get(var.as_tensor()).unwrap().to_vec2().unwrap();
        let row = |i: usize, skip: Option<usize>| {
            let z: f64 = (0..3).filter(|&j| Some(j) != skip).map(|j| (scale * s[i][j]).exp()).sum();
            -scale * s[i][i] + z.ln()
        };
        let want = (row(0, Some(1)) + row(1, None) + row(2, None)) / 3.0;
        let got = loss.to_scalar::<f32>().unwrap() as f64;
        assert!((got - want).abs() < 1e-4, "loss {got} want {want}");
        assert_eq!(g[0][1], 0.0);
        // Unmasked, row 0's 0.8 was a near rival of its 0.9 and cost much more.
        let unmasked = ranking_loss(var.as_tensor(), scale, &[]).unwrap().to_scalar::<f32>().unwrap() as f64;
        assert!(unmasked > got + 0.03, "{unmasked} vs {got}");
    }

    #[test]
    fn combined_is_the_cosine_of_the_concatenation() {
        let (bq, bd) = ([0.6f32, 0.8], [1.0f32, 0.0]);
        let (aq, ad) = ([0.0f32, 1.0], [0.6f32, 0.8]);
        let w = 0.5f32;
        let cat = |b: [f32; 2], a: [f32; 2]| [b[0], b[1], w * a[0], w * a[1]];
        let (q, d) = (cat(bq, aq), cat(bd, ad));
        let dot: f32 = q.iter().zip(&d).map(|(x, y)| x * y).sum();
        let norm = |v: &[f32; 4]| v.iter().map(|x| x * x).sum::<f32>().sqrt();
        let want = dot / (norm(&q) * norm(&d));
        let t = |v: f32| Tensor::new(&[[v]], &Device::Cpu).unwrap();
        let got = combined(&t(0.8), Some(&t(0.6)), 0.5).unwrap().to_vec2::<f32>().unwrap()[0][0];
        assert!((got - want).abs() < 1e-6, "{got} vs {want}");
    }
}
