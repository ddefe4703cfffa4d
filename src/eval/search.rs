//! Exact top-k search by dot product: the corpus is scored in blocks (candle matmuls) and only a
//! per-query top-k is kept, so memory stays bounded however large the corpus is.

use candle_core::{Device, Tensor};

/// Documents scored per block: 4,096 x 384 floats is 6 MB.
const BLOCK: usize = 4096;

/// For each query row, the `k` best (document index, score), best first. Rows are `dim` wide.
pub fn top_k(queries: &[f32], docs: &[f32], dim: usize, k: usize) -> candle_core::Result<Vec<Vec<(usize, f32)>>> {
    let nq = queries.len() / dim;
    let nd = docs.len() / dim;
    let mut best: Vec<Vec<(usize, f32)>> = vec![Vec::with_capacity(k + 1); nq];
    if nq == 0 || nd == 0 || k == 0 {
        return Ok(best);
    }
    let q = Tensor::from_slice(queries, (nq, dim), &Device::Cpu)?;
    for start in (0..nd).step_by(BLOCK) {
        let n = BLOCK.min(nd - start);
        let block = Tensor::from_slice(&docs[start * dim..(start + n) * dim], (n, dim), &Device::Cpu)?;
        let scores: Vec<Vec<f32>> = q.matmul(&block.t()?)?.to_vec2()?;
        for (row, kept) in scores.iter().zip(best.iter_mut()) {
            for (j, &s) in row.iter().enumerate() {
                if kept.len() < k || s > kept[kept.len() - 1].1 {
                    let at = kept.partition_point(|&(_, v)| v >= s);
                    kept.insert(at, (start + j, s));
                    kept.truncate(k);
                }
            }
        }
    }
    Ok(best)
}

#[cfg(test)]
mod tests {
    #[test]
    fn finds_the_best_across_blocks() {
        let dim = 2;
        let mut docs = Vec::new();
        for i in 0..10_000 {
            docs.extend([i as f32 / 10_000.0, 0.0]);
        }
        let got = super::top_k(&[1.0, 0.0, -1.0, 0.0], &docs, dim, 3).unwrap();
        assert_eq!(got[0].iter().map(|x| x.0).collect::<Vec<_>>(), [9999, 9998, 9997]);
        assert_eq!(got[1].iter().map(|x| x.0).collect::<Vec<_>>(), [0, 1, 2]);
    }
}
