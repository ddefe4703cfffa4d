//! The `hybrid` retriever's settings (which dense retriever, convex or RRF, alpha) and where its
//! alpha comes from: the train stage's validation split (stored with the model), a fixed number, or
//! the eval set itself when the user asks (tuning on the test set, and reported as such).

use serde::{Deserialize, Serialize};

use super::Kind;
use crate::error::Result;
use crate::rank::fuse::{self, Fusion};
use crate::store::models::ModelRow;
use crate::workflow::Tunable;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HybridParams {
    /// The dense side: mafin, augment_only or black_box (default: mafin when a train stage upstream
    /// trains it, else augment_only when one does, else black_box).
    #[serde(default)]
    pub dense: Option<Kind>,
    #[serde(default = "default_fusion")]
    pub fusion: Fusion,
    /// The dense side's weight in the convex fusion; `auto` takes the one training chose.
    #[serde(default)]
    pub alpha: Tunable,
    #[serde(default)]
    pub alpha_from: AlphaFrom,
}

fn default_fusion() -> Fusion {
    Fusion::Convex
}

impl Default for HybridParams {
    fn default() -> Self {
        HybridParams { dense: None, fusion: Fusion::Convex, alpha: Tunable::Auto, alpha_from: AlphaFrom::Validation }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AlphaFrom {
    /// The train stage's validation split (the alpha stored with the model).
    #[default]
    Validation,
    /// The eval set's own labels: tuning on the test set, marked so wherever it is reported.
    EvalSet,
}

/// The hybrid settings with the dense side decided.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Hybrid {
    pub dense: Kind,
    pub fusion: Fusion,
    pub alpha: Tunable,
    pub alpha_from: AlphaFrom,
}

impl Hybrid {
    /// `p` with the dense side decided from what the train stages upstream train.
    pub fn new(p: &HybridParams, trained: &[Kind]) -> Hybrid {
        let dense = p.dense.unwrap_or_else(|| {
            super::TRAINED_DENSE.into_iter().find(|k| trained.contains(k)).unwrap_or(Kind::BlackBox)
        });
        Hybrid { dense, fusion: p.fusion, alpha: p.alpha, alpha_from: p.alpha_from }
    }

    /// The training retriever whose models `kind` uses, with hybrid's dense side decided.
    pub fn trained_of(&self, kind: Kind) -> Option<crate::train::Retriever> {
        match kind {
            Kind::Hybrid => self.dense.trained(),
            k => k.trained(),
        }
    }

    /// Whether this fusion can run without a train stage (its alpha needs no validation split).
    pub fn needs_training(&self) -> bool {
        self.fusion == Fusion::Convex && self.alpha == Tunable::Auto && self.alpha_from == AlphaFrom::Validation
    }
}

/// The alpha a hybrid ranking used and where it came from.
#[derive(Debug, Clone, Serialize)]
pub struct Chosen {
    pub dense: &'static str,
    pub fusion: Fusion,
    /// None for RRF.
    pub alpha: Option<f64>,
    /// `validation (model N)`, `fixed`, or `eval set (tuned on the test set)`.
    pub from: String,
    /// Alpha was tuned on the very set it is scored on (an optimistic figure).
    pub on_eval_set: bool,
}

impl Chosen {
    /// A short label for tables: `hybrid (mafin, convex alpha 0.35 from validation (model 3))`.
    pub fn label(&self) -> String {
        match self.alpha {
            Some(a) => format!("hybrid ({}, convex alpha {a:.2} from {})", self.dense, self.from),
            // RRF as asked, or in place of a convex fusion with no alpha (`from` says why).
            None if self.from == "rrf" => format!("hybrid ({}, rrf k 60)", self.dense),
            None => format!("hybrid ({}, {})", self.dense, self.from),
        }
    }
}

/// The alpha validation chose for fusing BM25 with `dense`, and the model it is stored with: `model`
/// is the dense side's model, or for the black box the newest model of the train stages (each
/// training also chooses the black box's alpha on its split).
pub fn validated_alpha(dense: Kind, model: Option<&ModelRow>) -> Option<(f64, i64)> {
    let m = model?;
    let a = if dense == Kind::BlackBox { m.black_box_alpha } else { m.alpha };
    a.map(|a| (a, m.id))
}

impl Chosen {
    /// RRF in place of a convex fusion whose alpha no validation chose.
    pub fn rrf_instead(dense: Kind, model: Option<&ModelRow>) -> Chosen {
        let why = model.map_or("no train stage upstream".to_string(), |m| format!("model {} has none", m.id));
        let from = format!("rrf, as no alpha was chosen on a validation split ({why})");
        Chosen { dense: dense.name(), fusion: Fusion::Rrf, alpha: None, from, on_eval_set: false }
    }
}

/// The alpha the judge-accepted pairs chose where no train stage did (label-free), how many queries
/// chose it, and the nDCG@10 it reached on them.
#[derive(Debug, Clone, Copy)]
pub struct LabelFree {
    pub alpha: f64,
    pub queries: usize,
    pub ndcg: f64,
}

impl LabelFree {
    fn from(&self) -> String {
        let how = if self.queries < fuse::MIN_BLEND_QUERIES {
            format!("too few to blend, so the better side ({})", if self.alpha >= 0.5 { "dense" } else { "bm25" })
        } else {
            "no train stage".to_string()
        };
        format!("{} accepted synthetic pairs ({how})", self.queries)
    }
}

/// Fuses each query's BM25 and dense hits (each side's top `fuse::DEPTH`) into its top `k`, with the
/// alpha `h` says; `model` is the dense side's model (or, for the black box, the train stage's newest
/// model, which holds the black box's alpha). Where no validation split chose one, `label_free` (the
/// accepted pairs' choice) is used, and without it RRF.
pub fn fuse(
    h: &Hybrid,
    model: Option<&ModelRow>,
    label_free: Option<LabelFree>,
    bm25: &[Vec<(usize, f32)>],
    dense: &[Vec<(usize, f32)>],
    relevant: &[std::collections::HashSet<usize>],
    k: usize,
) -> Result<(crate::rank::Ranking, Chosen)> {
    let (alpha, from) = match (h.fusion, h.alpha, h.alpha_from) {
        (Fusion::Rrf, _, _) => (None, "rrf".to_string()),
        (Fusion::Convex, Tunable::Fixed(a), _) => (Some(a), "fixed".to_string()),
        (Fusion::Convex, Tunable::Auto, AlphaFrom::EvalSet) => {
            (Some(fuse::best_alpha(bm25, dense, relevant).0), "the eval set (tuned on the test set)".to_string())
        }
        (Fusion::Convex, Tunable::Auto, AlphaFrom::Validation) => match validated_alpha(h.dense, model) {
            Some((a, id)) => (Some(a), format!("validation (model {id})")),
            None => match label_free {
                Some(lf) => (Some(lf.alpha), lf.from()),
                // No validation split chose one and there are no accepted pairs to choose it on:
                // RRF needs no alpha, and the label says it was used instead.
                None => {
                    let hits = fuse::fuse_all(bm25, dense, Fusion::Rrf, 0.0, k);
                    return Ok((hits, Chosen::rrf_instead(h.dense, model)));
                }
            },
        },
    };
    let hits = fuse::fuse_all(bm25, dense, h.fusion, alpha.unwrap_or(0.0), k);
    let on_eval_set = alpha.is_some() && h.alpha == Tunable::Auto && h.alpha_from == AlphaFrom::EvalSet;
    Ok((hits, Chosen { dense: h.dense.name(), fusion: h.fusion, alpha, from, on_eval_set }))
}
