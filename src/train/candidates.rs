//! The reranker's training candidates: the first stage over the training corpus (BM25 fused with
//! the frozen black box), and the negatives mined from its top ranks behind the margin guard.

use std::collections::{HashMap, HashSet};

use super::data::{Example, RetrievalSet};
use super::normalized;
use crate::error::{Error, Result};
use crate::rank::fuse::{self, Fusion};
use crate::rank::{Ranking, search};

/// The first stage a reranker reads from in training: BM25 fused with the frozen black box at the
/// alpha chosen on validation (`Fusion::Convex`; RRF where no alpha was chosen), each query's top
/// `fuse::DEPTH` documents of `set`'s corpus.
pub fn first_stage(
    set: &RetrievalSet,
    queries: &[String],
    bm25: &crate::rank::bm25::Bm25,
    bb: &HashMap<String, Vec<f32>>,
    alpha: Option<f64>,
) -> Result<Ranking> {
    if queries.is_empty() {
        return Ok(Vec::new());
    }
    let lexical = bm25.search(queries, fuse::DEPTH);
    let rows = |texts: &[String]| -> Vec<f32> {
        texts.iter().flat_map(|t| normalized(bb.get(t).map(Vec::as_slice).unwrap_or_default())).collect()
    };
    let (docs, owners) = set.searched();
    let (q, d) = (rows(queries), rows(docs));
    let dim = q.len() / queries.len();
    let dense =
        search::top_k_grouped(&q, &d, &owners, dim, fuse::DEPTH).map_err(Error::tensor("first-stage search"))?;
    Ok(match alpha {
        Some(a) => fuse::fuse_all(&lexical, &dense, Fusion::Convex, a, fuse::DEPTH),
        None => fuse::fuse_all(&lexical, &dense, Fusion::Rrf, 0.0, fuse::DEPTH),
    })
}

/// What a reranker's training reads besides its pairs, from the validation split's corpus (the
/// training positives and the distractors).
pub struct Candidates {
    /// Each example's negatives, from the first stage's top ranks.
    pub negatives: Vec<Vec<String>>,
    /// Each validation query's first-stage ranking.
    pub val_first: Ranking,
    /// The first stage's alpha, chosen on the validation split (None: RRF).
    pub alpha: Option<f64>,
    wanted: usize,
}

impl Candidates {
    /// One line for the stage's log: how many negatives were mined, and for how many queries fewer
    /// than asked.
    pub fn summary(&self) -> String {
        let mined: usize = self.negatives.iter().map(Vec::len).sum();
        let short = self.negatives.iter().filter(|n| n.len() < self.wanted).count();
        format!(
            "reranker: {mined} negatives mined for {} queries from the first stage's top {} (BM25 + black box, {}); {short} queries have fewer than {}",
            self.negatives.len(),
            fuse::DEPTH,
            self.alpha.map_or("rrf".to_string(), |a| format!("alpha {a:.2}")),
            self.wanted
        )
    }
}

/// The first stage's alpha (on the validation split), each training example's negatives from its
/// ranking over the validation corpus, and each validation query's ranking.
pub fn candidates(
    train: &[Example],
    val: &RetrievalSet,
    bb: &HashMap<String, Vec<f32>>,
    rc: super::RerankConfig,
) -> Result<Candidates> {
    let index = bm25_index(val);
    let bm25_val = if val.queries.is_empty() { Vec::new() } else { index.search(&val.queries, fuse::DEPTH) };
    let alpha = super::black_box_alpha(val, Some(bb), &bm25_val)?;
    let queries: Vec<String> = train.iter().map(|e| e.query.clone()).collect();
    let top = first_stage(val, &queries, &index, bb, alpha)?;
    let negatives = mine(train, val, &top, bb, rc.negatives, rc.relative_margin);
    let val_first = first_stage(val, &val.queries, &index, bb, alpha)?;
    Ok(Candidates { negatives, val_first, alpha, wanted: rc.negatives })
}

/// A BM25 index over `set`'s corpus.
pub fn bm25_index(set: &RetrievalSet) -> crate::rank::bm25::Bm25 {
    let mut index = crate::rank::bm25::Bm25::default();
    for d in &set.corpus {
        index.add(d);
    }
    index
}

/// Up to `n` negatives for each example from its query's first-stage top ranks (`top`), best first:
/// never a passage the labels relate to the query (its positives, other passages of its documents),
/// and, as the margin guard (NV-Retriever's "TopK-PercPos"), never one the black box scores above
/// `1 - relative_margin` times the positive's score: those are too often unlabelled positives.
pub fn mine(
    examples: &[Example],
    set: &RetrievalSet,
    top: &Ranking,
    bb: &HashMap<String, Vec<f32>>,
    n: usize,
    relative_margin: f64,
) -> Vec<Vec<String>> {
    let mut related: HashMap<&str, HashSet<&str>> = HashMap::new();
    let mut doc_passages: HashMap<&str, Vec<&str>> = HashMap::new();
    for e in examples {
        doc_passages.entry(e.doc.as_str()).or_default().push(e.positive.as_str());
    }
    for e in examples {
        let r = related.entry(e.query.as_str()).or_default();
        r.extend(doc_passages[e.doc.as_str()].iter().copied());
    }
    let cos = |a: &str, b: &str| -> f64 {
        match (bb.get(a), bb.get(b)) {
            (Some(x), Some(y)) => normalized(x).iter().zip(normalized(y)).map(|(p, q)| (p * q) as f64).sum(),
            _ => 0.0,
        }
    };
    examples
        .iter()
        .zip(top)
        .map(|(e, hits)| {
            let ceiling = (1.0 - relative_margin) * cos(&e.query, &e.positive);
            hits.iter()
                .map(|&(d, _)| set.corpus[d].as_str())
                .filter(|p| !related[e.query.as_str()].contains(p) && *p != e.positive)
                .filter(|p| cos(&e.query, p) <= ceiling)
                .take(n)
                .map(str::to_string)
                .collect()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Mining skips the query's own and related passages and anything above the margin guard.
    #[test]
    fn mining_skips_related_passages_and_near_duplicates() {
        let ex =
            |q: &str, p: &str, d: &str| Example { query: q.into(), positive: p.into(), doc: d.into(), negative: None };
        let examples = vec![ex("q", "pos", "A"), ex("q2", "sibling", "A"), ex("q3", "other", "B")];
        let set = RetrievalSet {
            corpus: vec!["pos".into(), "sibling".into(), "other".into(), "dup".into(), "far".into()],
            ..Default::default()
        };
        let bb: HashMap<String, Vec<f32>> = [
            ("q", vec![1.0, 0.0]),
            ("pos", vec![0.8, 0.6]),
            ("sibling", vec![0.8, 0.6]),
            ("dup", vec![0.81, 0.59]),
            ("other", vec![0.5, 0.866]),
            ("far", vec![0.0, 1.0]),
            ("q2", vec![1.0, 0.0]),
            ("q3", vec![1.0, 0.0]),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        let top = vec![vec![(3, 1.0), (1, 0.9), (0, 0.8), (2, 0.7), (4, 0.6)], vec![], vec![]];
        let got = mine(&examples, &set, &top, &bb, 7, 0.05);
        // dup (0.81 > 0.95 * 0.8) is guarded out; sibling shares q's document; pos is its own.
        assert_eq!(got[0], ["other", "far"]);
        assert_eq!(mine(&examples, &set, &top, &bb, 1, 0.05)[0], ["other"]);
    }
}
