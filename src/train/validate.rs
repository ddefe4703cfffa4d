//! Validation during training: the retriever's metrics on the held-out split (long documents by their
//! best passage), and the w and hybrid alpha that split chooses.

use super::data::RetrievalSet;
use super::model::Augment;
use super::{BlackBoxVectors, Retriever, TrainConfig, Validation, normalized, retriever_rows, weight_grid};
use crate::error::{Error, Result};
use crate::rank::{fuse, metrics, search};

/// BM25's top 100 over the validation corpus for each validation query.
pub(crate) fn validation_bm25(val: &RetrievalSet) -> Vec<Vec<(usize, f32)>> {
    if val.queries.is_empty() {
        return Vec::new();
    }
    let mut index = crate::rank::bm25::Bm25::default();
    for d in &val.corpus {
        index.add(d);
    }
    index.search(&val.queries, fuse::DEPTH)
}

/// The hybrid alpha of BM25 with the frozen black box on the validation split, when both are there.
pub fn black_box_alpha(
    val: &RetrievalSet,
    bb: Option<&std::collections::HashMap<String, Vec<f32>>>,
    bm25: &[Vec<(usize, f32)>],
) -> Result<Option<f64>> {
    let Some(bb) = bb.filter(|_| !bm25.is_empty()) else { return Ok(None) };
    let rows = |texts: &[String]| -> Vec<f32> {
        texts.iter().flat_map(|t| normalized(bb.get(t).map(Vec::as_slice).unwrap_or_default())).collect()
    };
    let (docs, owners) = val.searched();
    let (q, d) = (rows(&val.queries), rows(docs));
    let dim = q.len() / val.queries.len();
    let dense = search::top_k_grouped(&q, &d, &owners, dim, fuse::DEPTH).map_err(Error::tensor("validation search"))?;
    Ok(Some(fuse::best_alpha(bm25, &dense, &val.relevant).0))
}

/// Recall@k, nDCG@k, MRR@10 and MAP@100 of the retriever on the validation set with the augment's
/// current weights; with `weight_auto`, at the w of the grid with the best nDCG@10 (ties: the one
/// nearest the training w).
pub(super) fn validation(
    cfg: &TrainConfig,
    aug: &Augment,
    val: &RetrievalSet,
    bb: &BlackBoxVectors,
    bm25: &[Vec<(usize, f32)>],
) -> Result<Validation> {
    let enc = aug.encoder()?;
    let (docs, owners) = val.searched();
    let qa = enc.embed(&val.queries, 32)?;
    let da = enc.embed(docs, 32)?;
    let lookup = |texts: &[String]| -> Option<Vec<Vec<f32>>> {
        bb.as_ref().map(|bb| texts.iter().map(|t| bb.get(t).cloned().unwrap_or_default()).collect())
    };
    let (qb, db) = (lookup(&val.queries), lookup(docs));
    let search_at = |w: f64| -> Result<Vec<Vec<(usize, f32)>>> {
        let q = retriever_rows(cfg.retriever, &qa, qb.as_deref(), w);
        let d = retriever_rows(cfg.retriever, &da, db.as_deref(), w);
        let dim = q.len() / val.queries.len();
        search::top_k_grouped(&q, &d, &owners, dim, 100).map_err(Error::tensor("validation search"))
    };
    let mafin = cfg.retriever == Retriever::Mafin;
    let (weight, top) = if mafin && cfg.weight_auto {
        let mut best: Option<(f64, f64, crate::rank::Ranking)> = None;
        for w in weight_grid() {
            let hits = search_at(w)?;
            let s = fuse::mean_ndcg10(&hits, &val.relevant);
            let wins = best.as_ref().is_none_or(|b| {
                s > b.1 + 1e-12 || ((s - b.1).abs() <= 1e-12 && (w - cfg.weight).abs() < (b.0 - cfg.weight).abs())
            });
            if wins {
                best = Some((w, s, hits));
            }
        }
        let (w, _, hits) = best.expect("the grid is not empty");
        (w, hits)
    } else {
        (cfg.weight, search_at(cfg.weight)?)
    };
    let per: Vec<_> = top
        .iter()
        .zip(&val.relevant)
        .map(|(t, rel)| {
            let ranking: Vec<usize> = t.iter().map(|x| x.0).collect();
            metrics::query_metrics(&ranking, rel, &[1, 5, 10, 100])
        })
        .collect();
    let alpha = (!bm25.is_empty()).then(|| fuse::best_alpha(bm25, &top, &val.relevant).0);
    Ok(Validation {
        metrics: metrics::mean(&per),
        weight: mafin.then_some(weight),
        alpha,
        chosen: Vec::new(),
        per_query: super::gain::ndcg_per_query(&per),
    })
}
