//! Ranking metrics as sentence-transformers' InformationRetrievalEvaluator defines them (binary
//! relevance): Accuracy@k, Precision@k, Recall@k, MRR@k, nDCG@k and MAP@k, averaged over queries.

use std::collections::{BTreeMap, HashSet};

/// The metric columns people read, in order.
pub const COLUMNS: &[(&str, &str)] = &[
    ("recall@1", "R@1"),
    ("recall@5", "R@5"),
    ("recall@10", "R@10"),
    ("recall@100", "R@100"),
    ("ndcg@10", "nDCG@10"),
    ("mrr@10", "MRR@10"),
    ("map@100", "MAP@100"),
];

/// The cut-offs eval_recall stores for every retriever (the report draws Recall@k over them).
pub const KS: &[usize] = &[1, 3, 5, 10, 20, 50, 100];

/// Whether `name` is a metric eval_recall stores (e.g. `recall@10`).
pub fn is_known(name: &str) -> bool {
    let Some((m, k)) = name.split_once('@') else { return false };
    ["accuracy", "precision", "recall", "mrr", "ndcg", "map"].contains(&m)
        && k.parse().is_ok_and(|k: usize| KS.contains(&k))
}

/// One query's metrics from its ranking (document indices, best first) and its relevant documents.
pub fn query_metrics(ranking: &[usize], relevant: &HashSet<usize>, ks: &[usize]) -> BTreeMap<String, f64> {
    let mut m = BTreeMap::new();
    if relevant.is_empty() {
        return m;
    }
    let hit: Vec<bool> = ranking.iter().map(|d| relevant.contains(d)).collect();
    for &k in ks {
        let top = &hit[..k.min(hit.len())];
        let found = top.iter().filter(|&&h| h).count() as f64;
        m.insert(format!("accuracy@{k}"), if found > 0.0 { 1.0 } else { 0.0 });
        m.insert(format!("precision@{k}"), found / k as f64);
        m.insert(format!("recall@{k}"), found / relevant.len() as f64);
        m.insert(format!("mrr@{k}"), top.iter().position(|&h| h).map_or(0.0, |r| 1.0 / (r + 1) as f64));
        let dcg: f64 = top.iter().enumerate().filter(|(_, h)| **h).map(|(i, _)| 1.0 / ((i + 2) as f64).log2()).sum();
        let idcg: f64 = (0..relevant.len().min(k)).map(|i| 1.0 / ((i + 2) as f64).log2()).sum();
        m.insert(format!("ndcg@{k}"), dcg / idcg);
        let (mut correct, mut ap) = (0usize, 0.0);
        for (i, _) in top.iter().enumerate().filter(|(_, h)| **h) {
            correct += 1;
            ap += correct as f64 / (i + 1) as f64;
        }
        m.insert(format!("map@{k}"), ap / relevant.len().min(k) as f64);
    }
    m
}

/// The mean of each metric over the queries that have relevant documents.
pub fn mean(per_query: &[BTreeMap<String, f64>]) -> BTreeMap<String, f64> {
    let mut sum: BTreeMap<String, f64> = BTreeMap::new();
    let mut n = 0usize;
    for q in per_query.iter().filter(|q| !q.is_empty()) {
        n += 1;
        for (k, v) in q {
            *sum.entry(k.clone()).or_default() += v;
        }
    }
    sum.values_mut().for_each(|v| *v /= n.max(1) as f64);
    sum
}

/// The 95% Wilson score interval of a proportion `k / n`.
pub fn wilson(k: u64, n: u64) -> (f64, f64) {
    if n == 0 {
        return (0.0, 0.0);
    }
    let (z, n, p) = (1.959_963_984_540_054f64, n as f64, k as f64 / n as f64);
    let centre = (p + z * z / (2.0 * n)) / (1.0 + z * z / n);
    let half = z / (1.0 + z * z / n) * (p * (1.0 - p) / n + z * z / (4.0 * n * n)).sqrt();
    ((centre - half).max(0.0), (centre + half).min(1.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hand_computed_query() {
        // Relevant: documents 7 and 9; ranking puts 9 second and 7 fourth.
        let rel: HashSet<usize> = [7, 9].into();
        let m = query_metrics(&[1, 9, 3, 7, 5], &rel, &[1, 3, 5]);
        assert_eq!(m["accuracy@1"], 0.0);
        assert_eq!(m["recall@3"], 0.5);
        assert_eq!(m["recall@5"], 1.0);
        assert_eq!(m["mrr@5"], 0.5);
        assert_eq!(m["mrr@1"], 0.0);
        // DCG@5 = 1/log2(3) + 1/log2(5); IDCG = 1 + 1/log2(3)
        let want = (1.0 / 3f64.log2() + 1.0 / 5f64.log2()) / (1.0 + 1.0 / 3f64.log2());
        assert!((m["ndcg@5"] - want).abs() < 1e-12);
        // AP@5 = (1/2 + 2/4) / 2
        assert!((m["map@5"] - 0.5).abs() < 1e-12);
        // AP@3 = (1/2) / min(2, 3)
        assert!((m["map@3"] - 0.25).abs() < 1e-12);
        let avg = mean(&[m, query_metrics(&[7], &[7].into(), &[1, 3, 5])]);
        assert!((avg["recall@3"] - 0.75).abs() < 1e-12);
    }

    #[test]
    fn wilson_matches_hand_computed_interval() {
        // 8 of 10, z = 1.96: centre (0.8 + 0.19208) / 1.38415 = 0.71675,
        // half 1.96 / 1.38415 * sqrt(0.016 + 0.0096) = 0.22657 -> [0.4902, 0.9433]
        let (lo, hi) = wilson(8, 10);
        assert!((lo - 0.4902).abs() < 1e-4 && (hi - 0.9433).abs() < 1e-4, "{lo} {hi}");
        assert_eq!(wilson(0, 0), (0.0, 0.0));
        let (lo, hi) = wilson(0, 20);
        assert_eq!(lo, 0.0);
        assert!((hi - 0.1611).abs() < 1e-3, "{hi}");
    }

    /// The same rankings scored by sentence-transformers' InformationRetrievalEvaluator
    /// (tests/fixtures/make_ir_fixture.py wrote the fixture).
    #[test]
    fn equals_sentence_transformers_on_the_fixture() {
        let fixture: serde_json::Value =
            serde_json::from_str(include_str!("../../tests/fixtures/ir_evaluator.json")).unwrap();
        let mut ids = std::collections::HashMap::new();
        let mut id = |s: &str| {
            let n = ids.len();
            *ids.entry(s.to_string()).or_insert(n)
        };
        let per_query: Vec<_> = fixture["queries"]
            .as_array()
            .unwrap()
            .iter()
            .map(|q| {
                let ranking: Vec<usize> =
                    q["ranking"].as_array().unwrap().iter().map(|d| id(d.as_str().unwrap())).collect();
                let relevant = q["relevant"].as_array().unwrap().iter().map(|d| id(d.as_str().unwrap())).collect();
                query_metrics(&ranking, &relevant, &[1, 3, 5, 10, 100])
            })
            .collect();
        let ours = mean(&per_query);
        let theirs = fixture["metrics"].as_object().unwrap();
        assert_eq!(theirs.len(), 21);
        for (name, want) in theirs {
            let got = ours.get(name).unwrap_or_else(|| panic!("no {name}"));
            assert!((got - want.as_f64().unwrap()).abs() < 1e-12, "{name}: flow {got} vs sentence-transformers {want}");
        }
    }
}
