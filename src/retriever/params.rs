//! The retrieval settings every stage that ranks passages shares (which retrievers, the black box,
//! hybrid fusion, long documents), declared once and kept flat in the stage's YAML.

use serde::Serialize;

use super::hybrid::HybridParams;
use super::{Kind, Passages};
use crate::workflow::{CheckCtx, Diagnostic};

/// What a stage's YAML says about its retrievers.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RetrievalParams {
    /// Default: bm25, black_box and the retrievers the upstream train stages train.
    pub retrievers: Option<Vec<Kind>>,
    /// `models:` key of the black box.
    pub black_box: String,
    /// What the `hybrid` retriever fuses (dense side, convex or rrf, alpha).
    pub hybrid: HybridParams,
    pub passages: Passages,
    /// How many of the first stage's documents `rerank` reranks (default: what training validated).
    pub rerank_k: Option<usize>,
}

pub fn default_black_box() -> String {
    "black_box".into()
}

/// Declares a stage's parameter struct with the retrieval settings added to its own fields (flat in
/// the YAML, so unknown keys stay errors) and a `retrieval()` that gathers them. `then [m] { .. }`
/// hands the struct on to another such macro (the LLM stages' `llm_params!`) to finish.
macro_rules! retrieval_params {
    (then [$($next:tt)*] { $($head:tt)* } $(#[$meta:meta])* pub struct $name:ident { $($body:tt)* }) => {
        $($next)*! { $($head)* $(#[$meta])* pub struct $name { $($body)*
            /// Default: bm25, black_box and the retrievers the upstream train stages train.
            #[serde(default)]
            pub retrievers: Option<Vec<$crate::retriever::Kind>>,
            #[serde(default = "crate::retriever::params::default_black_box")]
            pub black_box: String,
            /// What the `hybrid` retriever fuses (dense side, convex or rrf, alpha).
            #[serde(default)]
            pub hybrid: $crate::retriever::hybrid::HybridParams,
            /// Documents longer than the encoder's window: `maxp` (best overlapping passage) or `first`.
            #[serde(default)]
            pub passages: $crate::retriever::PassageMode,
            /// Tokens neighbouring passages share (default a quarter of the window).
            #[serde(default)]
            pub stride: Option<usize>,
            /// How many of the first stage's documents `rerank` reranks (default: what training validated).
            #[serde(default)]
            pub rerank_k: Option<usize>,
        } }
        impl $name {
            /// The retrieval settings among the stage's parameters.
            pub fn retrieval(&self) -> $crate::retriever::params::RetrievalParams {
                $crate::retriever::params::RetrievalParams {
                    retrievers: self.retrievers.clone(),
                    black_box: self.black_box.clone(),
                    hybrid: self.hybrid.clone(),
                    passages: $crate::retriever::Passages { mode: self.passages, stride: self.stride },
                    rerank_k: self.rerank_k,
                }
            }
        }
    };
    ($(#[$meta:meta])* pub struct $name:ident { $($body:tt)* }) => {
        $crate::retriever::params::retrieval_params! {
            then [$crate::retriever::params::serde_struct] {} $(#[$meta])* pub struct $name { $($body)* }
        }
    };
}
pub(crate) use retrieval_params;

/// A parameter struct that reads with serde and refuses unknown keys.
macro_rules! serde_struct {
    ($(#[$meta:meta])* pub struct $name:ident { $($body:tt)* }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        pub struct $name { $($body)* }
    };
}
pub(crate) use serde_struct;

impl RetrievalParams {
    /// Checks with no I/O: the retriever list, hybrid's settings, the black box's model entry.
    pub fn check(&self, cx: &CheckCtx, diags: &mut Vec<Diagnostic>) {
        let at = |key: &str| cx.node.get(key).map(|n| n.span()).unwrap_or(cx.node.span());
        let hybrid = &self.hybrid;
        if self.retrievers.as_ref().is_some_and(|r| r.is_empty()) {
            let all: Vec<&str> = super::ALL.iter().map(|k| k.name()).collect();
            diags.push(
                Diagnostic::new(at("retrievers"), format!("stage `{}`: `retrievers:` is empty", cx.stage))
                    .hint(format!("list some of {}, or leave it out for all", all.join(", "))),
            );
        }
        let hybrid_bb = hybrid.dense.is_none_or(Kind::uses_black_box);
        let needs_bb = self
            .retrievers
            .as_ref()
            .is_none_or(|r| r.iter().any(|k| k.uses_black_box() || (k.over_hybrid() && hybrid_bb)));
        if hybrid.dense.is_some_and(|d| !d.is_dense()) {
            diags.push(
                Diagnostic::new(
                    at("hybrid"),
                    format!("stage `{}`: hybrid's `dense:` must be a dense retriever", cx.stage),
                )
                .hint("dense: mafin, augment_only or black_box"),
            );
        }
        if self.rerank_k == Some(0) {
            diags.push(
                Diagnostic::new(at("rerank_k"), format!("stage `{}`: rerank_k must be at least 1", cx.stage))
                    .hint("rerank_k: 30 reranks the first stage's top 30; leave it out for what training validated"),
            );
        }
        if hybrid.alpha.fixed().is_some_and(|a| !(0.0..=1.0).contains(&a)) {
            diags.push(
                Diagnostic::new(at("hybrid"), format!("stage `{}`: hybrid alpha must be from 0 to 1", cx.stage))
                    .hint("alpha is the dense side's weight: 0 is BM25 alone, 1 the dense retriever alone; or `auto`"),
            );
        }
        if needs_bb && !cx.models.contains_key(&self.black_box) {
            diags.push(
                Diagnostic::new(
                    at("black_box"),
                    format!("stage `{}` uses `models.{}`, which is not defined", cx.stage, self.black_box),
                )
                .hint(
                    "add `black_box: { provider: local, model: all-MiniLM-L6-v2 }` under `models:`, or list only `bm25`",
                ),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    retrieval_params! {
        pub struct Sample {
            #[serde(default)]
            pub top_k: usize,
        }
    }

    #[test]
    fn the_retrieval_fields_sit_flat_beside_the_stages_own_and_unknown_keys_stay_errors() {
        let p: Sample =
            serde_json::from_value(serde_json::json!({ "top_k": 3, "retrievers": ["bm25"], "stride": 9 })).unwrap();
        let r = p.retrieval();
        assert_eq!(
            (p.top_k, r.retrievers, r.black_box.as_str(), r.passages.stride),
            (3, Some(vec![super::Kind::Bm25]), "black_box", Some(9))
        );
        let err = serde_json::from_value::<Sample>(serde_json::json!({ "retriever": ["bm25"] })).unwrap_err();
        assert!(err.to_string().contains("unknown field `retriever`"), "{err}");
    }
}
