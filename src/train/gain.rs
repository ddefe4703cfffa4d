//! How much training gained on validation and whether that is beyond noise: the best model's mean
//! nDCG@10 over its start's, query by query, with a paired bootstrap interval around the gain.

use std::collections::BTreeMap;

use serde::Serialize;

/// Resamples of the validation queries behind the interval (seeded: the same figures every run).
const RESAMPLES: usize = 2000;

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Gain {
    pub start: f64,
    pub best: f64,
    pub gain: f64,
    /// The central 95% of the gain's bootstrap distribution.
    pub interval: [f64; 2],
    pub queries: usize,
    /// The interval lies above zero: the validation split tells the model from its start.
    pub beyond_noise: bool,
}

impl Gain {
    /// From each validation query's nDCG@10 for the start and for the best model (same queries, same
    /// order); None without them.
    pub fn paired(start: &[f64], best: &[f64]) -> Option<Gain> {
        let n = start.len();
        if n == 0 || best.len() != n {
            return None;
        }
        let diff: Vec<f64> = best.iter().zip(start).map(|(b, s)| b - s).collect();
        let mean = |xs: &[f64]| xs.iter().sum::<f64>() / xs.len() as f64;
        let mut rng = fastrand::Rng::with_seed(0x6a09_e667);
        let mut means: Vec<f64> =
            (0..RESAMPLES).map(|_| (0..n).map(|_| diff[rng.usize(..n)]).sum::<f64>() / n as f64).collect();
        means.sort_by(f64::total_cmp);
        let (lo, hi) = (means[RESAMPLES / 40], means[RESAMPLES - 1 - RESAMPLES / 40]);
        Some(Gain {
            start: mean(start),
            best: mean(best),
            gain: mean(&diff),
            interval: [lo, hi],
            queries: n,
            beyond_noise: lo > 0.0,
        })
    }
}

impl std::fmt::Display for Gain {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "validation nDCG@10 {:.4} -> {:.4} ({:+.4}; 95% bootstrap interval {:+.4} to {:+.4} over {} queries): {}",
            self.start,
            self.best,
            self.gain,
            self.interval[0],
            self.interval[1],
            self.queries,
            if self.beyond_noise {
                "beyond noise"
            } else {
                "within noise (validation cannot tell the model from its start; more validation queries would)"
            }
        )
    }
}

/// Each query's nDCG@10 from per-query metrics (queries without relevant documents have none and
/// are left out, as the means leave them out).
pub fn ndcg_per_query(per: &[BTreeMap<String, f64>]) -> Vec<f64> {
    per.iter().filter_map(|q| q.get("ndcg@10").copied()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_steady_gain_is_beyond_noise_and_a_mixed_one_is_not() {
        let start = vec![0.5; 40];
        // Every query gains 0.1: every resample's mean is 0.1.
        let g = Gain::paired(&start, &vec![0.6; 40]).unwrap();
        assert!((g.gain - 0.1).abs() < 1e-12 && (g.interval[0] - 0.1).abs() < 1e-12 && g.beyond_noise);
        assert!((g.start - 0.5).abs() < 1e-12 && (g.best - 0.6).abs() < 1e-12 && g.queries == 40);
        // Half gain 0.2, half lose 0.18: a mean gain of 0.01 the queries disagree on.
        let mixed: Vec<f64> = (0..40).map(|i| if i % 2 == 0 { 0.7 } else { 0.32 }).collect();
        let g = Gain::paired(&start, &mixed).unwrap();
        assert!((g.gain - 0.01).abs() < 1e-12);
        assert!(g.interval[0] < 0.0 && g.interval[1] > 0.01 && !g.beyond_noise, "{g:?}");
        assert!(g.to_string().contains("within noise"), "{g}");
        // No validation, or sets that do not match: nothing to say.
        assert!(Gain::paired(&[], &[]).is_none() && Gain::paired(&[0.1], &[0.1, 0.2]).is_none());
    }

    #[test]
    fn per_query_ndcg_skips_queries_without_metrics() {
        let q = |v: f64| BTreeMap::from([("ndcg@10".to_string(), v), ("recall@10".to_string(), 1.0)]);
        assert_eq!(ndcg_per_query(&[q(0.5), BTreeMap::new(), q(0.25)]), vec![0.5, 0.25]);
    }
}
