//! The `eval_recall` stage: exact top-k search with each retriever over an eval set; Recall@k, nDCG,
//! MRR and MAP stored per run and printed against the previous run on the same set.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use async_trait::async_trait;
use serde_json::json;

use super::{Kind, Outcome, Stage, StageCtx};
use crate::error::Result;
use crate::eval::retrieve::{self, Plan};
use crate::eval::set::SetParams;
use crate::llm::embed::BlackBox;
use crate::rank::metrics;
use crate::retriever::Kind as Retriever;
use crate::retriever::params::{RetrievalParams, retrieval_params};
use crate::store::eval_results::{self, NewResult};
use crate::workflow::{CheckCtx, Checked, Diagnostic, StageSpec, Workflow, check_typed, checked};

pub const KIND: Kind = Kind {
    name: "eval_recall",
    about: "Recall@k, nDCG@10, MRR@10 and MAP@100 of bm25, the black box, augment_only, mafin, hybrid and rerank on an eval set",
    check,
    preflight: super::no_preflight,
    build,
};

retrieval_params! {
    pub struct Params {
        #[serde(default)]
        pub eval_set: SetParams,
        /// Run the promotion gate on the newest trained model (see `gate_retriever`, `gate_metric`).
        #[serde(default = "default_true")]
        pub promote: bool,
        /// Whose model the gate judges (default: mafin, else augment_only, and rerank: each evaluated
        /// one against the promoted model of its kind).
        #[serde(default)]
        pub gate_retriever: Option<Retriever>,
        /// The metric the new model must reach against the promoted one, on this eval set.
        #[serde(default = "default_gate_metric")]
        pub gate_metric: String,
    }
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
    check_set(cx, &p.eval_set, &p.retrieval(), &mut diags);
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
                .hint("rerank, mafin, augment_only, or hybrid over one of them"),
        );
    }
    checked(&p, diags)
}

/// Checks shared by the eval stages: the set's verdicts and the retrieval settings.
pub fn check_set(cx: &CheckCtx, set: &SetParams, retrieval: &RetrievalParams, diags: &mut Vec<Diagnostic>) {
    if let Some(v) = set.verdicts.iter().find(|v| !crate::eval::set::VERDICTS.contains(&v.as_str())) {
        let span = cx.node.get("eval_set").map(|n| n.span()).unwrap_or(cx.node.span());
        diags.push(
            Diagnostic::new(span, format!("stage `{}`: unknown verdict {v:?} in eval_set.verdicts", cx.stage))
                .hint("verdicts are accepted, rejected, failed and unjudged"),
        );
    }
    retrieval.check(cx, diags);
}

/// The plan of an eval stage: its set (synthetic pairs come from the judges it depends on) and retrievers.
pub fn eval_plan(spec: &StageSpec, wf: &Workflow, set: &SetParams, retrieval: RetrievalParams) -> Result<Plan> {
    Plan::new(spec, wf, set, super::pair_source(spec, wf), retrieval)
}

fn build(spec: &StageSpec, wf: &Workflow) -> Result<Box<dyn Stage>> {
    let params: Params = spec.params()?;
    let plan = eval_plan(spec, wf, &params.eval_set, params.retrieval())?;
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
    (account, black_box): (&'a crate::llm::Account, &'a std::sync::OnceLock<BlackBox>),
    count_items: bool,
) -> retrieve::Ctx<'a> {
    retrieve::Ctx {
        wf: &sc.workflow,
        store: &sc.store,
        account,
        progress: &sc.progress,
        black_box: &plan.black_box,
        black_box_model: black_box,
        count_items,
        device: plan.up.device,
        hybrid: &plan.hybrid,
        passages: plan.passages,
        pairs: &plan.pairs,
        train_stages: &plan.up.train_stages,
        rerank_k: plan.rerank_k,
    }
}

impl EvalRecall {
    /// One retriever's metrics on the set, stored for this run (with the alpha a hybrid fused with).
    async fn score(
        &self,
        ctx: &StageCtx,
        cx: &retrieve::Ctx<'_>,
        set: &crate::eval::set::EvalSet,
        kind: Retriever,
        model: Option<&crate::store::models::ModelRow>,
    ) -> Result<(BTreeMap<String, f64>, Option<crate::retriever::hybrid::Chosen>)> {
        let (mut m, chosen) = retrieve::metrics_of(cx, set, kind, model).await?;
        // Kept beside the metrics, so the report can say what the hybrid fused with.
        if let Some(c) = &chosen {
            m.insert("alpha".into(), c.alpha.unwrap_or(-1.0));
            m.insert("alpha_on_eval_set".into(), if c.on_eval_set { 1.0 } else { 0.0 });
        }
        eval_results::upsert(
            &ctx.store,
            &NewResult {
                run_id: ctx.run_id,
                stage_run_id: ctx.stage_run_id,
                stage: &self.name,
                eval_set: &set.key,
                retriever: kind.name(),
                model_id: model.map(|m| m.id),
                queries: set.queries.len(),
                corpus: set.docs.len(),
                metrics: &serde_json::to_string(&m).expect("json"),
            },
        )
        .await?;
        Ok((m, chosen))
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
        let account = ctx.account();
        let cx = retrieve_ctx(&self.plan, ctx, (&account, &black_box), true);
        let mut rows = Vec::new();
        let mut summary = serde_json::Map::new();
        let mut scored = Vec::new();
        for (&kind, model) in self.plan.retrievers.iter().zip(&models) {
            let (m, chosen) = self.score(ctx, &cx, &set, kind, model.as_ref()).await?;
            let prev = eval_results::previous(&ctx.store, &self.name, &set.key, kind.name(), ctx.run_id).await?;
            let model_id = model.as_ref().map(|m| m.id);
            summary.insert(kind.name().into(), json!({ "model_id": model_id, "metrics": m, "hybrid": chosen }));
            if let Some(model) = model.as_ref().filter(|_| self.plan.trained_of(kind).is_some()) {
                scored.push((kind, model.clone(), m.get(&self.params.gate_metric).copied().unwrap_or(0.0)));
            }
            let label = match (kind, chosen) {
                (Retriever::Rerank, Some(c)) => format!("rerank over {}", c.label()),
                (_, Some(c)) => c.label(),
                (_, None) => kind.name().to_string(),
            };
            rows.push((label, m, prev.map(|p| p.metrics())));
        }
        let table = metric_table(&rows);
        let compared = rows.iter().any(|r| r.2.is_some());
        ctx.progress.log(&format!(
            "{}\n{table}",
            if compared { "metrics (change against the previous run on this eval set):" } else { "metrics:" }
        ));
        // By default the gate judges the reranker and the best bi-encoder evaluated, each against the
        // promoted model of its own kind.
        let gate_kinds: Vec<Retriever> = match self.params.gate_retriever {
            Some(k) => vec![k],
            None => {
                let scored_kind = |k: &Retriever| scored.iter().any(|s| s.0 == *k);
                let bi = [Retriever::Mafin, Retriever::AugmentOnly].into_iter().find(scored_kind);
                bi.into_iter().chain(Some(Retriever::Rerank).filter(scored_kind)).collect()
            }
        };
        let mut gates = Vec::new();
        for gate_kind in gate_kinds.into_iter().filter(|_| self.params.promote) {
            let Some((kind, candidate, value)) = scored.iter().find(|s| s.0 == gate_kind) else { continue };
            let g = crate::eval::gate::Gate {
                metric: &self.params.gate_metric,
                kind: *kind,
                trained: self.plan.trained_of(*kind).expect("scored retrievers are trained"),
                stages: &self.plan.up.train_stages,
            };
            gates.push(g.decide(&cx, &set, candidate, *value).await?);
        }
        let gate = gates.first().cloned().unwrap_or(serde_json::Value::Null);
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
                "relevant": relevant, "retrievers": summary, "gate": gate, "gates": gates, "devices": devices,
            }),
            failure: None,
        })
    }
}
