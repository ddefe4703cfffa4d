//! What a retriever is, for every stage and command that uses one: its kinds, the trained models
//! behind them and where those are found, how encoder vectors combine into its rows, and fusion.

pub mod hybrid;
pub mod params;

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::llm::embed::BlackBox;
use crate::store::Store;
use crate::store::models::{self as models_table, ModelRow};
use crate::store::states::ModelStatus;
use crate::train::{self, Retriever as Trained};
use crate::workflow::{Device, Workflow};

/// Every retriever flow can score or serve.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    Bm25,
    BlackBox,
    AugmentOnly,
    Mafin,
    /// BM25 fused with a dense retriever (see `hybrid`).
    Hybrid,
    /// A trained cross-encoder reranking the hybrid's top documents (`train::rerank`).
    Rerank,
}

pub const ALL: [Kind; 6] = [Kind::Bm25, Kind::BlackBox, Kind::AugmentOnly, Kind::Mafin, Kind::Hybrid, Kind::Rerank];

/// The dense retrievers a trained model can stand behind, best first (what `hybrid` fuses by default).
pub const TRAINED_DENSE: [Kind; 2] = [Kind::Mafin, Kind::AugmentOnly];

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Bm25 => "bm25",
            Kind::BlackBox => "black_box",
            Kind::AugmentOnly => "augment_only",
            Kind::Mafin => "mafin",
            Kind::Hybrid => "hybrid",
            Kind::Rerank => "rerank",
        }
    }

    /// The kind `name` names (as in YAML, the CLI and HTTP requests).
    pub fn parse(name: &str) -> Option<Kind> {
        ALL.into_iter().find(|k| k.name() == name)
    }

    /// The training retriever whose model this one needs, if any (hybrid: its dense side's, which
    /// `Hybrid::trained` decides).
    pub fn trained(self) -> Option<Trained> {
        match self {
            Kind::AugmentOnly => Some(Trained::AugmentOnly),
            Kind::Mafin => Some(Trained::Mafin),
            Kind::Rerank => Some(Trained::Reranker),
            _ => None,
        }
    }

    /// The retriever a training retriever's models stand behind.
    pub fn of_trained(t: Trained) -> Kind {
        match t {
            Trained::Mafin => Kind::Mafin,
            Trained::AugmentOnly => Kind::AugmentOnly,
            Trained::Reranker => Kind::Rerank,
        }
    }

    /// Whether its vectors include the black box's.
    pub fn uses_black_box(self) -> bool {
        matches!(self, Kind::BlackBox | Kind::Mafin)
    }

    /// Whether it ranks over a hybrid first stage (and so needs what the hybrid needs).
    pub fn over_hybrid(self) -> bool {
        matches!(self, Kind::Hybrid | Kind::Rerank)
    }

    /// Whether it ranks by one embedding (so it can be served as vectors and be hybrid's dense side).
    pub fn is_dense(self) -> bool {
        matches!(self, Kind::BlackBox | Kind::AugmentOnly | Kind::Mafin)
    }
}

/// A dense retriever's rows from its encoders' vectors: the black box's and the augment model's, each
/// normalised, then (for mafin) weighted and joined. What eval stages score and `flow serve` returns.
pub fn combine(kind: Kind, bb: Option<Vec<Vec<f32>>>, aug: Option<Vec<Vec<f32>>>, weight: f64) -> Result<Vec<f32>> {
    Ok(match (kind, bb, aug) {
        (Kind::Mafin, Some(bb), Some(aug)) => train::retriever_rows(Trained::Mafin, &aug, Some(&bb), weight),
        (_, _, Some(aug)) => train::retriever_rows(Trained::AugmentOnly, &aug, None, weight),
        (_, Some(bb), None) => bb.iter().flat_map(|v| train::normalized(v)).collect(),
        _ => return Err(Error::internal(format!("retriever {} was scored without its model", kind.name()))),
    })
}

/// A mafin model is only meaningful beside the black box it was trained with (`key` names it).
pub fn trained_beside(m: &ModelRow, bb: &BlackBox, key: &str) -> Result<()> {
    match m.black_box.as_deref() {
        Some(trained) if trained != bb.identity => Err(Error::bad_input(
            format!(
                "model {} was trained beside the black box {trained}, but `models.{key}` is now {}",
                m.id, bb.identity
            ),
            "point `black_box:` at the black box it was trained with, or retrain",
        )),
        _ => Ok(()),
    }
}

/// How many first-stage documents a reranker model reranks: `asked`, else what its train stage
/// validated it at.
pub fn rerank_k(model: &ModelRow, asked: Option<usize>) -> usize {
    asked
        .or_else(|| {
            serde_json::from_str::<serde_json::Value>(&model.metrics)
                .ok()
                .and_then(|m| m["rerank_k"].as_u64())
                .map(|k| k as usize)
        })
        .unwrap_or_else(crate::train::params::default_rerank_k)
        .max(1)
}

/// A trained model's own settings for tables: mafin's w, a reranker's depth and blend, else `-`.
pub fn settings_label(m: &ModelRow) -> String {
    match m.retriever.as_str() {
        "mafin" => format!("w {:.1}", m.weight),
        "reranker" => format!("top {}, blend {}", rerank_k(m, None), m.alpha.map_or("-".into(), |a| format!("{a:.2}"))),
        _ => "-".into(),
    }
}

/// Whether a trained model's folder is still on disk.
pub fn model_on_disk(m: &ModelRow) -> bool {
    Path::new(&m.path).join("model.safetensors").exists()
}

/// The newest model the train stages `stages` trained for `kind` (any stage when empty).
pub async fn newest(store: &Store, stages: &[String], kind: Kind) -> Result<Option<ModelRow>> {
    match kind.trained() {
        Some(t) => models_table::latest(store, stages, t.name()).await,
        None => Ok(None),
    }
}

/// The newest model of the train stages `up` names, whatever its retriever: it holds the alpha the
/// black box fuses with (every training chooses one on its split).
pub async fn alpha_holder(store: &Store, up: &Upstream) -> Result<Option<ModelRow>> {
    let mut newest_model: Option<ModelRow> = None;
    for &k in &up.trained {
        if let Some(m) = newest(store, &up.train_stages, k).await?
            && newest_model.as_ref().is_none_or(|n| m.id > n.id)
        {
            newest_model = Some(m);
        }
    }
    Ok(newest_model)
}

/// The model to serve for `kind` among `all` (one workflow's models, oldest first): the newest
/// promoted one, else the newest; and whether it is promoted.
pub fn served_model(all: &[ModelRow], kind: Kind) -> Option<(&ModelRow, bool)> {
    let t = kind.trained()?;
    let of_kind: Vec<&ModelRow> = all.iter().filter(|m| m.retriever == t.name()).collect();
    match of_kind.iter().rev().find(|m| m.status == ModelStatus::Promoted) {
        Some(p) => Some((p, true)),
        None => of_kind.last().map(|m| (*m, false)),
    }
}

/// How documents longer than the encoder's window are scored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PassageMode {
    /// By their best overlapping passage.
    #[default]
    Maxp,
    /// By their first window only (the rest is cut off).
    First,
}

/// The long-document settings of an eval stage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct Passages {
    pub mode: PassageMode,
    /// Tokens neighbouring passages share (default a quarter of the window).
    pub stride: Option<usize>,
}

/// The train stages a stage reads from (or, for a whole workflow, all of them), what they train,
/// and what the first of them says about its split, black box and device.
#[derive(Debug, Clone, Default)]
pub struct Upstream {
    pub train_stages: Vec<String>,
    pub trained: Vec<Kind>,
    /// The first train stage's validation split (seed, val_fraction).
    pub split: Option<(u64, f64)>,
    /// `models:` key of the first train stage's black box.
    pub black_box: Option<String>,
    /// Where the trained models embed: the first train stage's device.
    pub device: Device,
}

impl Upstream {
    /// The train stages `stage` needs, nearest first; with None, every train stage of `wf` in order.
    pub fn of(wf: &Workflow, stage: Option<&str>) -> Upstream {
        use crate::train::params::{KIND_NAME, Params};
        let specs: Vec<&crate::workflow::StageSpec> = match stage {
            Some(s) => wf.upstream(s),
            None => wf.order.iter().map(|n| &wf.stages[n]).collect(),
        };
        let mut up = Upstream::default();
        for s in specs {
            // Read with the train stage's own parameter type, so its defaults are the ones used here.
            let Some(p) = (s.kind == KIND_NAME).then(|| s.params::<Params>().ok()).flatten() else { continue };
            up.trained.push(Kind::of_trained(p.retriever));
            up.train_stages.push(s.name.clone());
            if up.split.is_none() {
                up.split = Some((p.seed, p.val_fraction));
                up.black_box = Some(p.black_box.clone());
                up.device = p.device.or_else(|| wf.models.get(&p.augment).map(|m| m.device)).unwrap_or_default();
            }
        }
        up.trained.sort();
        up.trained.dedup();
        up
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_read_back_from_their_names() {
        for k in ALL {
            assert_eq!(Kind::parse(k.name()), Some(k));
            assert_eq!(serde_json::to_value(k).unwrap(), k.name());
        }
        assert_eq!(Kind::parse("rerank_typo"), None);
        assert_eq!(Kind::of_trained(Trained::Mafin).trained(), Some(Trained::Mafin));
    }
}
