//! The `eval_recall` stage: exact top-k search with each retriever over an eval set; Recall@k, nDCG,
//! MRR and MAP stored per run and printed against the previous run on the same set.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::{Kind, Outcome, Stage, StageCtx};
use crate::error::Result;
use crate::eval::hybrid::HybridParams;
use crate::eval::retrieve::{self, Choice, Kind as Retriever, PassageMode, Passages, Plan};
use crate::eval::set::SetParams;
use crate::llm::embed::BlackBox;
use crate::rank::metrics;
use crate::store::eval_results::{self, NewResult};
use crate::workflow::{CheckCtx, Checked, Diagnostic, StageSpec, Workflow, check_typed, checked};

pub const KIND: Kind = Kind {
    name: "eval_recall",
    about: "Recall@k, nDCG@10, MRR@10 and MAP@100 of bm25, the black box, augment_only and mafin on an eval set",
    check,
    preflight: super::no_preflight,
    build,
};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Params {
    #[serde(default)]
    pub eval_set: SetParams,
    /// Default: bm25, black_box and the retrievers the upstream train stages train.
    #[serde(default)]
    pub retrievers: Option<Vec<Retriever>>,
    #[serde(default = "default_black_box")]
    pub black_box: String,
    /// Run the promotion gate on the newest trained model (see `gate_retriever`, `gate_metric`).
    #[serde(default = "default_true")]
    pub promote: bool,
    /// Whose model the gate judges (default: mafin if evaluated, else augment_only).
    #[serde(default)]
    pub gate_retriever: Option<Retriever>,
    /// The metric the new model must reach against the promoted one, on this eval set.
    #[serde(default = "default_gate_metric")]
    pub gate_metric: String,
    /// What the `hybrid` retriever fuses (dense side, convex or rrf, alpha).
    #[serde(default)]
    pub hybrid: HybridParams,
    /// Documents longer than the encoder's window: `maxp` (best overlapping passage) or `first`.
    #[serde(default)]
    pub passages: PassageMode,
    /// Tokens neighbouring passages share (default a quarter of the window).
    #[serde(default)]
    pub stride: Option<usize>,
}

impl Params {
    fn choice(&self) -> Choice<'_> {
        Choice {
            listed: &self.retrievers,
            black_box: &self.black_box,
            hybrid: &self.hybrid,
            passages: Passages { mode: self.passages, stride: self.stride },
        }
    }
}

fn default_black_box() -> String {
    "black_box".into()
}
fn default_true() -> bool {
    true
}
fn default_gate_metric() -> String {
    "recall@10".into()
}

fn check(cx: &CheckCtx) -> Checked {
    let mut diags = Vec::new();
    let Some(p) = check_typed::<Params>(cx.node, cx.params.clone(), &mut diags) else { return Err(diags) };
    check_set(cx, &p.eval_set, p.retrievers.as_deref(), &p.black_box, &p.hybrid, &mut diags);
    if !metrics::is_known(&p.gate_metric) {
        let span = cx.node.get("gate_metric").map(|n| n.span()).unwrap_or(cx.node.span());
        diags.push(
            Diagnostic::new(span, format!("stage `{}`: unknown gate_metric {:?}", cx.stage, p.gate_metric)).hint(
                "one of recall@k, ndcg@k, mrr@k, map@k, precision@k, accuracy@k with k in 1, 3, 5, 10, 20, 50, 100",
            ),
        );
    }
    let untrained = |r: &Retriever| match r {
        Retriever::Hybrid => p.hybrid.dense.is_some_and(|d| d.trained().is_none()),
        r => r.trained().is_none(),
    };
    if let Some(r) = p.gate_retriever.filter(untrained) {
        let span = cx.node.get("gate_retriever").map(|n| n.span()).unwrap_or(cx.node.span());
        diags.push(
            Diagnostic::new(span, format!("stage `{}`: gate_retriever {} has no trained model", cx.stage, r.name()))
                .hint("mafin, augment_only, or hybrid over one of them"),
        );
    }
    checked(&p, diags)
}

/// Checks shared by the eval stages: the set's verdicts, the retriever list, the black box.
pub fn check_set(
    cx: &CheckCtx,
    set: &SetParams,
    retrievers: Option<&[Retriever]>,
    black_box: &str,
    hybrid: &HybridParams,
    diags: &mut Vec<Diagnostic>,
) {
    let at = |key: &str| cx.node.get(key).map(|n| n.span()).unwrap_or(cx.node.span());
    if let Some(v) = set.verdicts.iter().find(|v| !crate::eval::set::VERDICTS.contains(&v.as_str())) {
        diags.push(
            Diagnostic::new(
                at("eval_set"),
                format!("stage `{}`: unknown verdict {v:?} in eval_set.verdicts", cx.stage),
            )
            .hint("verdicts are accepted, rejected, failed and unjudged"),
        );
    }
    if retrievers.is_some_and(|r| r.is_empty()) {
        diags.push(
            Diagnostic::new(at("retrievers"), format!("stage `{}`: `retrievers:` is empty", cx.stage))
                .hint("list some of bm25, black_box, augment_only, mafin, hybrid, or leave it out for all"),
        );
    }
    let hybrid_bb = hybrid.dense.is_none_or(|d| matches!(d, Retriever::BlackBox | Retriever::Mafin));
    let needs_bb = retrievers.is_none_or(|r| {
        r.iter().any(|k| matches!(k, Retriever::BlackBox | Retriever::Mafin) || (*k == Retriever::Hybrid && hybrid_bb))
    });
    if hybrid.dense.is_some_and(|d| matches!(d, Retriever::Bm25 | Retriever::Hybrid)) {
        diags.push(
            Diagnostic::new(at("hybrid"), format!("stage `{}`: hybrid's `dense:` must be a dense retriever", cx.stage))
                .hint("dense: mafin, augment_only or black_box"),
        );
    }
    if hybrid.alpha.fixed().is_some_and(|a| !(0.0..=1.0).contains(&a)) {
        diags.push(
            Diagnostic::new(at("hybrid"), format!("stage `{}`: hybrid alpha must be from 0 to 1", cx.stage))
                .hint("alpha is the dense side's weight: 0 is BM25 alone, 1 the dense retriever alone; or `auto`"),
        );
    }
    if needs_bb && !cx.models.contains_key(black_box) {
        diags.push(
            Diagnostic::new(
                at("black_box"),
                format!("stage `{}` uses `models.{black_box}`, which is not defined", cx.stage),
            )
            .hint("add `black_box: { provider: local, model: all-MiniLM-L6-v2 }` under `models:`, or list only `bm25`"),
        );
    }
}

fn build(spec: &StageSpec, wf: &Workflow) -> Result<Box<dyn Stage>> {
    let params: Params = spec.params()?;
    let plan = Plan::new(spec, wf, &params.eval_set, params.choice())?;
    Ok(Box::new(EvalRecall { name: spec.name.clone(), wf: Arc::new(wf.clone()), params, plan }))
}

struct EvalRecall {
    name: String,
    wf: Arc<Workflow>,
    params: Params,
    plan: Plan,
}

/// A retriever's metrics and, where there is one, the previous run's.
pub type Compared = (String, BTreeMap<String, f64>, Option<BTreeMap<String, f64>>);

/// One row per retriever: each metric, with its change against the previous run where there is one.
pub fn metric_table(rows: &[Compared]) -> String {
    let mut header = vec!["retriever"];
    header.extend(metrics::COLUMNS.iter().map(|c| c.1));
    let body: Vec<Vec<String>> = rows
        .iter()
        .map(|(name, m, prev)| {
            let mut r = vec![name.clone()];
            for (key, _) in metrics::COLUMNS {
                let v = m.get(*key).copied().unwrap_or(0.0);
                r.push(match prev.as_ref().and_then(|p| p.get(*key)) {
                    Some(p) => format!("{v:.4} ({:+.4})", v - p),
                    None => format!("{v:.4}"),
                });
            }
            r
        })
        .collect();
    crate::text::table(&header, &body)
}

/// The context the retrievers of one eval stage run share; `black_box` is filled on first use.
pub fn retrieve_ctx<'a>(
    plan: &'a Plan,
    sc: &'a StageCtx,
    black_box: &'a std::sync::OnceLock<BlackBox>,
    count_items: bool,
) -> retrieve::Ctx<'a> {
    retrieve::Ctx {
        wf: &sc.workflow,
        store: &sc.store,
        run_id: sc.run_id,
        stage: &sc.spec.name,
        progress: &sc.progress,
        black_box: &plan.black_box,
        black_box_model: black_box,
        count_items,
        device: plan.up.device,
        hybrid: &plan.hybrid,
        passages: plan.passages,
    }
}

#[async_trait]
impl Stage for EvalRecall {
    async fn inputs(&self) -> Result<String> {
        self.plan.inputs(&self.wf).await
    }

    async fn run(&self, ctx: &StageCtx) -> Result<Outcome> {
        let set = self.plan.source.load(&ctx.store, self.params.eval_set.max_queries).await?;
        let models = self.plan.models(&ctx.store, &self.name).await?;
        ctx.progress.log(&format!(
            "eval set {}: {} queries over {} passages",
            set.key,
            set.queries.len(),
            set.docs.len()
        ));
        ctx.progress.set_total((set.docs.len() * self.plan.retrievers.len()) as u64);
        let black_box = std::sync::OnceLock::new();
        let cx = retrieve_ctx(&self.plan, ctx, &black_box, true);
        let mut rows = Vec::new();
        let mut summary = serde_json::Map::new();
        let mut scored = Vec::new();
        for (&kind, model) in self.plan.retrievers.iter().zip(&models) {
            let (mut m, chosen) = retrieve::metrics_of(&cx, &set, kind, model.as_ref()).await?;
            // Kept beside the metrics, so the report can say what the hybrid fused with.
            if let Some(c) = &chosen {
                m.insert("alpha".into(), c.alpha.unwrap_or(-1.0));
                m.insert("alpha_on_eval_set".into(), if c.on_eval_set { 1.0 } else { 0.0 });
            }
            let model_id = model.as_ref().map(|m| m.id);
            eval_results::upsert(
                &ctx.store,
                &NewResult {
                    run_id: ctx.run_id,
                    stage_run_id: ctx.stage_run_id,
                    stage: &self.name,
                    eval_set: &set.key,
                    retriever: kind.name(),
                    model_id,
                    queries: set.queries.len(),
                    corpus: set.docs.len(),
                    metrics: &serde_json::to_string(&m).expect("json"),
                },
            )
            .await?;
            let prev = eval_results::previous(&ctx.store, &self.name, &set.key, kind.name(), ctx.run_id).await?;
            summary.insert(kind.name().into(), json!({ "model_id": model_id, "metrics": m, "hybrid": chosen }));
            if let Some(model) = model.as_ref().filter(|_| self.plan.trained_of(kind).is_some()) {
                scored.push((kind, model.clone(), m.get(&self.params.gate_metric).copied().unwrap_or(0.0)));
            }
            let label = chosen.map_or_else(|| kind.name().to_string(), |c| c.label());
            rows.push((label, m, prev.map(|p| p.metrics())));
        }
        let table = metric_table(&rows);
        let compared = rows.iter().any(|r| r.2.is_some());
        ctx.progress.log(&format!(
            "{}\n{table}",
            if compared { "metrics (change against the previous run on this eval set):" } else { "metrics:" }
        ));
        let gate_kind = self.params.gate_retriever.or_else(|| {
            [Retriever::Mafin, Retriever::AugmentOnly].into_iter().find(|k| scored.iter().any(|s| s.0 == *k))
        });
        let mut gate = serde_json::Value::Null;
        if self.params.promote
            && let Some((kind, candidate, value)) = scored.iter().find(|s| Some(s.0) == gate_kind)
        {
            let g = crate::eval::gate::Gate {
                metric: &self.params.gate_metric,
                kind: *kind,
                trained: self.plan.trained_of(*kind).expect("scored retrievers are trained"),
                stages: &self.plan.up.train_stages,
            };
            gate = g.decide(&cx, &set, candidate, *value).await?;
        }
        // The black box's API calls (the gate's included) are this stage's LLM usage.
        if let Some(usage) = black_box.get().and_then(|b| b.usage()) {
            crate::store::runs::set_llm_usage(&ctx.store, ctx.stage_run_id, &usage).await?;
        }
        let relevant: usize = set.relevant.iter().map(HashSet::len).sum();
        let devices = cx.devices();
        ctx.progress
            .log(&format!("embedded on: black box {}, trained models {}", devices["black_box"], devices["trained"]));
        Ok(Outcome {
            summary: json!({
                "eval_set": set.key, "queries": set.queries.len(), "corpus": set.docs.len(),
                "relevant": relevant, "retrievers": summary, "gate": gate, "devices": devices,
            }),
            failure: None,
        })
    }
}
