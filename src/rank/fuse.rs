//! Hybrid ranking: BM25 fused with a dense retriever, by a convex combination of min-max normalised
//! scores or by reciprocal rank fusion, and the choice of the convex weight on labelled queries.

use std::collections::{HashMap, HashSet};

use serde::{Deserialize, Serialize};

/// How many of each side's best documents a fusion looks at.
pub const DEPTH: usize = 100;

/// RRF's constant (Cormack et al. 2009).
pub const RRF_K: f64 = 60.0;

/// One query's hits from one retriever: (document index, score), best first.
pub type Hits = [(usize, f32)];

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Fusion {
    /// alpha * dense + (1 - alpha) * bm25, each min-max normalised per query.
    Convex,
    /// sum of 1 / (60 + rank) over the two rankings.
    Rrf,
}

/// Min-max normalised scores of one side: the best document 1, the worst of the list 0; a list whose
/// scores are all equal scores 1 throughout (nothing tells its documents apart).
fn normalised(hits: &Hits) -> HashMap<usize, f64> {
    let hits = &hits[..hits.len().min(DEPTH)];
    let (lo, hi) = hits.iter().fold((f64::MAX, f64::MIN), |(lo, hi), h| (lo.min(h.1 as f64), hi.max(h.1 as f64)));
    hits.iter().map(|&(d, s)| (d, if hi > lo { (s as f64 - lo) / (hi - lo) } else { 1.0 })).collect()
}

/// The fused ranking of one query over the union of both sides' top `DEPTH`, best first, at most `k`.
/// A document missing from one side's list scores that side's minimum (0 after normalising; no rank
/// term in RRF). Equal fused scores keep the lower document index first. A convex fusion at alpha 0
/// or 1 is that side's own ranking, exactly: with the rule above, the last document of a short
/// list would tie with (and fall behind) every lower-numbered document of the other side.
pub fn fuse(bm25: &Hits, dense: &Hits, fusion: Fusion, alpha: f64, k: usize) -> Vec<(usize, f32)> {
    if fusion == Fusion::Convex && (alpha <= 0.0 || alpha >= 1.0) {
        let side = if alpha <= 0.0 { bm25 } else { dense };
        let norm = normalised(side);
        return side.iter().take(k.min(DEPTH)).map(|&(d, _)| (d, norm[&d] as f32)).collect();
    }
    let mut score: HashMap<usize, f64> = HashMap::new();
    match fusion {
        Fusion::Convex => {
            for (d, s) in normalised(bm25) {
                *score.entry(d).or_default() += (1.0 - alpha) * s;
            }
            for (d, s) in normalised(dense) {
                *score.entry(d).or_default() += alpha * s;
            }
        }
        Fusion::Rrf => {
            for side in [bm25, dense] {
                for (rank, &(d, _)) in side.iter().take(DEPTH).enumerate() {
                    *score.entry(d).or_default() += 1.0 / (RRF_K + rank as f64 + 1.0);
                }
            }
        }
    }
    // Sorted in f64: two scores f32 cannot tell apart must not trade places by document index.
    let mut out: Vec<(usize, f64)> = score.into_iter().collect();
    out.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    out.into_iter().take(k).map(|(d, s)| (d, s as f32)).collect()
}

/// Fuses every query's two lists.
pub fn fuse_all(
    bm25: &[Vec<(usize, f32)>],
    dense: &[Vec<(usize, f32)>],
    fusion: Fusion,
    alpha: f64,
    k: usize,
) -> Vec<Vec<(usize, f32)>> {
    bm25.iter().zip(dense).map(|(b, d)| fuse(b, d, fusion, alpha, k)).collect()
}

/// The convex weights tried when alpha is chosen: 0.0 to 1.0 by 0.05.
pub fn alpha_grid() -> impl Iterator<Item = f64> {
    (0..=20).map(|i| i as f64 / 20.0)
}

/// Mean nDCG@10 of `hits` against each query's relevant documents.
pub fn mean_ndcg10(hits: &[Vec<(usize, f32)>], relevant: &[HashSet<usize>]) -> f64 {
    let per: Vec<_> = hits
        .iter()
        .zip(relevant)
        .map(|(h, rel)| super::metrics::query_metrics(&h.iter().map(|x| x.0).collect::<Vec<_>>(), rel, &[10]))
        .collect();
    super::metrics::mean(&per).get("ndcg@10").copied().unwrap_or(0.0)
}

/// Fewer labelled queries than this cannot choose a blend (one query moves nDCG@10 by several
/// points): they choose only between the two sides.
pub const MIN_BLEND_QUERIES: usize = 30;

/// The alpha of the grid with the best mean nDCG@10 on these labelled queries, and that score; among
/// equal scores the one nearest 0.5 (the even blend), so a set that cannot tell them apart gets it.
/// The grid holds 0 and 1, each side's own ranking, so the choice never scores below the better
/// side on these queries; with fewer than `MIN_BLEND_QUERIES` it is one of the two sides.
pub fn best_alpha(bm25: &[Vec<(usize, f32)>], dense: &[Vec<(usize, f32)>], relevant: &[HashSet<usize>]) -> (f64, f64) {
    let mut best: (f64, f64) = (0.5, f64::MIN);
    let sides_only = relevant.len() < MIN_BLEND_QUERIES;
    for a in alpha_grid().filter(|a| !sides_only || *a == 0.0 || *a == 1.0) {
        let s = mean_ndcg10(&fuse_all(bm25, dense, Fusion::Convex, a, 10), relevant);
        let closer = (a - 0.5).abs() < (best.0 - 0.5).abs();
        if s > best.1 + 1e-12 || ((s - best.1).abs() <= 1e-12 && closer) {
            best = (a, s);
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Three queries, worked by hand.
    /// q0: bm25 [0: 10, 1: 6, 2: 2] -> normalised 1, 0.5, 0; dense [2: 1.0, 3: 0.5, 0: 0.0] -> 1, 0.5, 0
    /// (scores f32 holds exactly, so the hand-worked ties are ties in f64 too).
    /// q1: bm25 [5: 3] alone (all equal -> 1); dense [6: 0.8, 5: 0.4] -> 1, 0.
    /// q2: bm25 empty (no shared term); dense [7: 0.3, 8: 0.2] -> 1, 0.
    fn case() -> (super::super::Ranking, super::super::Ranking) {
        let bm25 = vec![vec![(0, 10.0), (1, 6.0), (2, 2.0)], vec![(5, 3.0)], vec![]];
        let dense = vec![vec![(2, 1.0), (3, 0.5), (0, 0.0)], vec![(6, 0.8), (5, 0.4)], vec![(7, 0.3), (8, 0.2)]];
        (bm25, dense)
    }

    fn close(got: &[(usize, f32)], want: &[(usize, f64)]) {
        assert_eq!(got.len(), want.len(), "{got:?} vs {want:?}");
        for (g, w) in got.iter().zip(want) {
            assert_eq!(g.0, w.0, "{got:?} vs {want:?}");
            assert!((g.1 as f64 - w.1).abs() < 1e-6, "{got:?} vs {want:?}");
        }
    }

    #[test]
    fn convex_at_three_alphas_by_hand() {
        let (b, d) = case();
        // alpha 0: bm25's own ranking, exactly; alpha 1: the dense side's.
        close(&fuse(&b[0], &d[0], Fusion::Convex, 0.0, 10), &[(0, 1.0), (1, 0.5), (2, 0.0)]);
        close(&fuse(&b[0], &d[0], Fusion::Convex, 1.0, 10), &[(2, 1.0), (3, 0.5), (0, 0.0)]);
        // alpha 0.5: 0 -> 0.5*1 + 0.5*0 = 0.5; 1 -> 0.25; 2 -> 0 + 0.5 = 0.5; 3 -> 0.25.
        close(&fuse(&b[0], &d[0], Fusion::Convex, 0.5, 10), &[(0, 0.5), (2, 0.5), (1, 0.25), (3, 0.25)]);
        // alpha 0.8: 0 -> 0.2; 1 -> 0.1; 2 -> 0.8; 3 -> 0.4.
        close(&fuse(&b[0], &d[0], Fusion::Convex, 0.8, 10), &[(2, 0.8), (3, 0.4), (0, 0.2), (1, 0.1)]);
        // q1 at 0.5: 5 -> 0.5*1 + 0.5*0 = 0.5; 6 -> 0.5*1 = 0.5 (tie: lower index first).
        close(&fuse(&b[1], &d[1], Fusion::Convex, 0.5, 10), &[(5, 0.5), (6, 0.5)]);
        // q2 at 0.8: dense alone, scaled by alpha.
        close(&fuse(&b[2], &d[2], Fusion::Convex, 0.8, 10), &[(7, 0.8), (8, 0.0)]);
        // k cuts the list.
        assert_eq!(fuse(&b[0], &d[0], Fusion::Convex, 0.8, 2).len(), 2);
    }

    #[test]
    fn rrf_by_hand() {
        let (b, d) = case();
        let r = |rank: f64| 1.0 / (60.0 + rank);
        // q0: 0 -> bm25 1st + dense 3rd; 2 -> bm25 3rd + dense 1st (same sum, lower index first);
        // 1 -> bm25 2nd; 3 -> dense 2nd.
        close(
            &fuse(&b[0], &d[0], Fusion::Rrf, 0.3, 10),
            &[(0, r(1.0) + r(3.0)), (2, r(1.0) + r(3.0)), (1, r(2.0)), (3, r(2.0))],
        );
        // q1: 5 -> bm25 1st + dense 2nd; 6 -> dense 1st.
        close(&fuse(&b[1], &d[1], Fusion::Rrf, 0.3, 10), &[(5, r(1.0) + r(2.0)), (6, r(1.0))]);
        close(&fuse(&b[2], &d[2], Fusion::Rrf, 0.3, 10), &[(7, r(1.0)), (8, r(2.0))]);
    }

    /// At alpha 0 and 1 the fusion is each side's ranking, document for document, on lists where
    /// the old rule (a missing document scores the side's minimum, ties by index) reordered them:
    /// short lists whose last document ties with the other side's lower-numbered documents.
    #[test]
    fn alpha_0_and_1_reproduce_each_side_exactly() {
        let mut rng = fastrand::Rng::with_seed(5);
        for _ in 0..200 {
            let side = |rng: &mut fastrand::Rng| {
                let n = rng.usize(0..15);
                let mut docs: Vec<usize> = (0..40).collect();
                rng.shuffle(&mut docs);
                let mut hits: Vec<(usize, f32)> = docs[..n].iter().map(|&d| (d, rng.f32() * 10.0)).collect();
                hits.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
                hits
            };
            let (b, d) = (side(&mut rng), side(&mut rng));
            let ids = |h: &[(usize, f32)]| h.iter().map(|x| x.0).take(10).collect::<Vec<_>>();
            assert_eq!(ids(&fuse(&b, &d, Fusion::Convex, 0.0, 10)), ids(&b));
            assert_eq!(ids(&fuse(&b, &d, Fusion::Convex, 1.0, 10)), ids(&d));
        }
    }

    /// A one-sided fixture: BM25 finds each query's relevant document first, the dense side never
    /// finds it. Whatever the number of queries, the chosen alpha scores as BM25 does, and under
    /// `MIN_BLEND_QUERIES` it is BM25 alone.
    #[test]
    fn a_useless_side_never_pulls_the_choice_below_the_better_one() {
        for queries in [5, 40] {
            let bm25: Vec<Vec<(usize, f32)>> = (0..queries).map(|q| vec![(q, 9.0), (1000 + q, 4.0)]).collect();
            let dense: Vec<Vec<(usize, f32)>> =
                (0..queries).map(|q| (0..10).map(|j| (2000 + q * 10 + j, 1.0 - j as f32 / 10.0)).collect()).collect();
            let rel: Vec<HashSet<usize>> = (0..queries).map(|q| [q].into()).collect();
            let (a, s) = best_alpha(&bm25, &dense, &rel);
            assert!((s - 1.0).abs() < 1e-9, "{queries} queries: alpha {a} scores {s}");
            if queries < MIN_BLEND_QUERIES {
                assert_eq!(a, 0.0);
            }
            // Every alpha up to the even blend ranks BM25's documents first here; none beyond it.
            assert!(a <= 0.5, "{queries} queries: alpha {a} leans on the useless side");
        }
    }

    #[test]
    fn alpha_is_chosen_where_the_labels_say() {
        // The three hand-worked queries, ten times over: enough queries to choose a blend.
        let ten = |r: super::super::Ranking| r.iter().cycle().take(30).cloned().collect::<Vec<_>>();
        let (b, d) = case();
        let (b, d) = (ten(b), ten(d));
        let ten_sets = |r: Vec<HashSet<usize>>| r.iter().cycle().take(30).cloned().collect::<Vec<_>>();
        let rel = ten_sets(vec![[2].into(), [6].into(), [7].into()]);
        let (a, s) = best_alpha(&b, &d, &rel);
        // 2 first for q0 needs alpha > 0.5; 6 first for q1 needs alpha > 0.5: every alpha from 0.55
        // to 1.0 gives nDCG 1, and 0.55 is the nearest to 0.5.
        assert!((a - 0.55).abs() < 1e-9, "alpha {a}");
        assert!((s - 1.0).abs() < 1e-9);
        // Labels on the lexical side: 0 first for q0 and 5 first for q1 need alpha <= 0.5 (at 0.5
        // the tie goes to the lower index), so 0.0 to 0.5 all score 1 and 0.5 is the nearest.
        let rel = ten_sets(vec![[0].into(), [5].into(), [7].into()]);
        let (a, s) = best_alpha(&b, &d, &rel);
        assert!((a - 0.5).abs() < 1e-9 && (s - 1.0).abs() < 1e-9, "alpha {a}, ndcg {s}");
        // q0's relevant 1 (0.5 (1 - alpha)) is second only while it beats 2 (alpha), below 1/3:
        // the best grid point nearest 0.5 is 0.30.
        let rel = ten_sets(vec![[1].into(), [5].into(), [8].into()]);
        let (a, _) = best_alpha(&b, &d, &rel);
        assert!((a - 0.3).abs() < 1e-9, "alpha {a}");
    }
}
