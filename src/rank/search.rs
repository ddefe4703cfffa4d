//! Exact top-k search by dot product: the corpus arrives in blocks (candle matmuls) and only a
//! per-query top-k is kept, so memory stays bounded however large the corpus is.

use candle_core::{Device, Tensor};
use rayon::prelude::*;

/// Documents scored per block: 4,096 x 384 floats is 6 MB, and the score block for 1,000 queries 16 MB.
pub const BLOCK: usize = 4096;

/// The running top-k of a set of queries over a corpus fed block by block.
pub struct TopK {
    queries: Tensor,
    dim: usize,
    k: usize,
    seen: usize,
    best: Vec<Vec<(usize, f32)>>,
}

impl TopK {
    /// `queries` are rows `dim` wide.
    pub fn new(queries: &[f32], dim: usize, k: usize) -> candle_core::Result<TopK> {
        let nq = queries.len().checked_div(dim).unwrap_or(0);
        let queries = Tensor::from_slice(queries, (nq, dim), &Device::Cpu)?;
        Ok(TopK { queries, dim, k, seen: 0, best: vec![Vec::with_capacity(k + 1); nq] })
    }

    /// Scores the next documents (rows `dim` wide, numbered after those pushed before).
    pub fn push(&mut self, docs: &[f32]) -> candle_core::Result<()> {
        let n = docs.len() / self.dim.max(1);
        if n == 0 || self.best.is_empty() || self.k == 0 {
            self.seen += n;
            return Ok(());
        }
        let block = Tensor::from_slice(docs, (n, self.dim), &Device::Cpu)?;
        let scores = self.queries.matmul(&block.t()?)?.flatten_all()?.to_vec1::<f32>()?;
        let (start, k) = (self.seen, self.k);
        self.best.par_iter_mut().zip(scores.par_chunks(n)).for_each(|(kept, row)| {
            for (j, &s) in row.iter().enumerate() {
                // Strictly better only: among equal scores the earlier document stays ahead.
                if kept.len() < k || s > kept[kept.len() - 1].1 {
                    let at = kept.partition_point(|&(_, v)| v >= s);
                    kept.insert(at, (start + j, s));
                    kept.truncate(k);
                }
            }
        });
        self.seen += n;
        Ok(())
    }

    /// Scores the next passages (rows `dim` wide), `owners[j]` being the document row j belongs to:
    /// a document scores its best passage (MaxP) and appears once. Exact: a passage that would lower
    /// a document already kept is not taken, and one evicted could only have come back below the cut.
    pub fn push_grouped(&mut self, rows: &[f32], owners: &[usize]) -> candle_core::Result<()> {
        let n = rows.len() / self.dim.max(1);
        if n != owners.len() {
            candle_core::bail!("{n} passage rows for {} owners", owners.len())
        }
        if let Some(&last) = owners.iter().max() {
            self.seen = self.seen.max(last + 1);
        }
        if n == 0 || self.best.is_empty() || self.k == 0 {
            return Ok(());
        }
        let block = Tensor::from_slice(rows, (n, self.dim), &Device::Cpu)?;
        let scores = self.queries.matmul(&block.t()?)?.flatten_all()?.to_vec1::<f32>()?;
        let k = self.k;
        self.best.par_iter_mut().zip(scores.par_chunks(n)).for_each(|(kept, row)| {
            for (&s, &doc) in row.iter().zip(owners) {
                if let Some(at) = kept.iter().position(|&(d, _)| d == doc) {
                    if s <= kept[at].1 {
                        continue;
                    }
                    kept.remove(at);
                } else if kept.len() >= k && s <= kept[kept.len() - 1].1 {
                    continue;
                }
                // Equal scores: the lower document first, whatever order its passages came in.
                let at = kept.partition_point(|&(d, v)| v > s || (v == s && d < doc));
                kept.insert(at, (doc, s));
                kept.truncate(k);
            }
        });
        Ok(())
    }

    /// For each query, the `k` best (document index, score), best first.
    pub fn finish(self) -> Vec<Vec<(usize, f32)>> {
        self.best
    }
}

/// For each query row, the `k` best (document index, score) over `docs`, best first.
pub fn top_k(queries: &[f32], docs: &[f32], dim: usize, k: usize) -> candle_core::Result<Vec<Vec<(usize, f32)>>> {
    let mut top = TopK::new(queries, dim, k)?;
    for block in docs.chunks(BLOCK * dim.max(1)) {
        top.push(block)?;
    }
    Ok(top.finish())
}

/// `top_k` over passages: `owners[j]` is the document row j belongs to, and a document scores its
/// best passage (MaxP).
pub fn top_k_grouped(
    queries: &[f32],
    rows: &[f32],
    owners: &[usize],
    dim: usize,
    k: usize,
) -> candle_core::Result<Vec<Vec<(usize, f32)>>> {
    let mut top = TopK::new(queries, dim, k)?;
    for (block, who) in rows.chunks(BLOCK * dim.max(1)).zip(owners.chunks(BLOCK)) {
        top.push_grouped(block, who)?;
    }
    Ok(top.finish())
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

    #[test]
    fn grouped_passages_score_their_best_once() {
        // Documents 0..50 with 1 to 4 passages each, fed in blocks that split documents; against
        // the brute-force max over each document's passages.
        let mut rng = fastrand::Rng::with_seed(9);
        let dim = 6;
        let mut rows = Vec::new();
        let mut owners = Vec::new();
        for d in 0..50 {
            for _ in 0..rng.usize(1..5) {
                rows.extend((0..dim).map(|_| rng.f32() - 0.5));
                owners.push(d);
            }
        }
        let queries: Vec<f32> = (0..dim * 4).map(|_| rng.f32() - 0.5).collect();
        let mut top = super::TopK::new(&queries, dim, 7).unwrap();
        for (r, o) in rows.chunks(dim * 13).zip(owners.chunks(13)) {
            top.push_grouped(r, o).unwrap();
        }
        let got = top.finish();
        for (qi, q) in queries.chunks(dim).enumerate() {
            let mut best = vec![f32::MIN; 50];
            for (r, &o) in rows.chunks(dim).zip(&owners) {
                best[o] = best[o].max(r.iter().zip(q).map(|(a, b)| a * b).sum());
            }
            let mut all: Vec<(usize, f32)> = best.into_iter().enumerate().collect();
            all.sort_by(|a, b| b.1.total_cmp(&a.1));
            assert_eq!(
                got[qi].iter().map(|x| x.0).collect::<Vec<_>>(),
                all[..7].iter().map(|x| x.0).collect::<Vec<_>>()
            );
            for (g, w) in got[qi].iter().zip(&all) {
                assert!((g.1 - w.1).abs() < 1e-6);
            }
        }
    }

    #[test]
    fn blocks_of_any_size_give_the_brute_force_ranking() {
        let mut rng = fastrand::Rng::with_seed(3);
        let dim = 8;
        let docs: Vec<f32> = (0..dim * 777).map(|_| rng.f32() - 0.5).collect();
        let queries: Vec<f32> = (0..dim * 5).map(|_| rng.f32() - 0.5).collect();
        let mut top = super::TopK::new(&queries, dim, 20).unwrap();
        for part in docs.chunks(dim * 100) {
            top.push(part).unwrap();
        }
        let got = top.finish();
        for (qi, q) in queries.chunks(dim).enumerate() {
            let mut all: Vec<(usize, f32)> =
                docs.chunks(dim).map(|d| d.iter().zip(q).map(|(a, b)| a * b).sum()).enumerate().collect();
            all.sort_by(|a, b| b.1.total_cmp(&a.1));
            let want: Vec<usize> = all[..20].iter().map(|x| x.0).collect();
            assert_eq!(got[qi].iter().map(|x| x.0).collect::<Vec<_>>(), want);
        }
    }
}
