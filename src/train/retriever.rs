//! The retrievers training serves and what their vectors are: the augment alone, or Mafin's
//! concatenation of the normalised black box and the weighted, normalised augment.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Retriever {
    /// concat(n(black box), w * n(augment)): the black box stays, the augment learns what it misses.
    Mafin,
    /// The augment alone: plain fine-tuning, for comparison.
    AugmentOnly,
    /// A cross-encoder that reranks a first stage's top documents (`rerank`).
    Reranker,
}

impl Retriever {
    pub fn name(self) -> &'static str {
        match self {
            Retriever::Mafin => "mafin",
            Retriever::AugmentOnly => "augment_only",
            Retriever::Reranker => "reranker",
        }
    }
}

pub fn normalized(v: &[f32]) -> Vec<f32> {
    let n = v.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
    v.iter().map(|x| x / n).collect()
}

/// Rows of the retriever's embedding: n(aug) for augment_only, concat(n(bb), w n(aug)) / sqrt(1 + w^2)
/// for Mafin, so that dot products are the cosines of the concatenation.
pub fn retriever_rows(retriever: Retriever, aug: &[Vec<f32>], bb: Option<&[Vec<f32>]>, w: f64) -> Vec<f32> {
    let mut out = Vec::new();
    let w = w as f32;
    let norm = (1.0 + w * w).sqrt();
    for (i, a) in aug.iter().enumerate() {
        match (retriever, bb) {
            (Retriever::Mafin, Some(bb)) => {
                out.extend(normalized(&bb[i]).iter().map(|x| x / norm));
                out.extend(normalized(a).iter().map(|x| w * x / norm));
            }
            _ => out.extend(normalized(a)),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mafin_rows_give_the_cosine_of_the_concatenation() {
        // bb (3, 4) -> (0.6, 0.8); aug (1, 0); w = 0.5; each part over sqrt(1.25).
        let rows = retriever_rows(Retriever::Mafin, &[vec![1.0, 0.0]], Some(&[vec![3.0, 4.0]]), 0.5);
        let n = 1.25f32.sqrt();
        let want = [0.6 / n, 0.8 / n, 0.5 / n, 0.0];
        assert!(rows.iter().zip(want).all(|(a, b)| (a - b).abs() < 1e-6), "{rows:?}");
        // Two texts: dot = (cos_bb + w^2 cos_aug) / (1 + w^2).
        let two = retriever_rows(
            Retriever::Mafin,
            &[vec![1.0, 0.0], vec![0.0, 2.0]],
            Some(&[vec![1.0, 0.0], vec![1.0, 1.0]]),
            0.5,
        );
        let dot: f32 = two[..4].iter().zip(&two[4..]).map(|(a, b)| a * b).sum();
        assert!((dot - (0.5f32.sqrt() + 0.25 * 0.0) / 1.25).abs() < 1e-6, "{dot}");
        assert_eq!(retriever_rows(Retriever::AugmentOnly, &[vec![0.0, 2.0]], None, 0.5), [0.0, 1.0]);
    }
}
