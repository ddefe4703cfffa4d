//! `flow plan` / `flow run --dry-run`: which stages a run would run (the same fingerprints and
//! up-to-date checks as the run), and what each would send to a model, without calling one.

use std::collections::{BTreeMap, HashMap};

use serde::Serialize;

use super::{RunOptions, State, fingerprint, forced_stages, initial_states};
use crate::error::Result;
use crate::llm::plan::Estimate;
use crate::stages::{Forecast, PlanCtx, StagePlan};
use crate::store::{Store, runs};
use crate::workflow::Workflow;

/// One stage in a plan.
#[derive(Debug, Clone, Serialize)]
pub struct PlannedStage {
    pub stage: String,
    pub kind: String,
    /// `runs`, `up to date` (same inputs as an earlier run) or `kept` (outside `--only`).
    pub action: String,
    #[serde(flatten)]
    pub plan: StagePlan,
}

#[derive(Debug, Clone, Serialize)]
pub struct Plan {
    pub workflow: String,
    pub stages: Vec<PlannedStage>,
    /// The sum of every stage's chat requests.
    pub total: Estimate,
}

/// Plans a run of `wf` with `opts` against its store as it stands. A store that does not exist
/// yet is planned as an empty one, and nothing is created.
pub async fn plan(wf: &Workflow, opts: &RunOptions) -> Result<Plan> {
    super::check_names(wf, opts)?;
    let store = match wf.store.exists() {
        true => Store::open_existing(&wf.store).await?,
        false => Store::in_memory().await?,
    };
    let out = plan_with(wf, opts, &store).await;
    store.close().await;
    out
}

async fn plan_with(wf: &Workflow, opts: &RunOptions, store: &Store) -> Result<Plan> {
    let state = initial_states(wf, store, opts, &BTreeMap::new()).await?;
    let forced = forced_stages(wf, opts);
    let mut fps: HashMap<String, String> = HashMap::new();
    let mut forecasts: BTreeMap<String, Forecast> = BTreeMap::new();
    let mut stages = Vec::new();
    let mut total = Estimate::default();
    for name in &wf.order {
        let spec = &wf.stages[name];
        if let State::Good(fp) = &state[name] {
            fps.insert(name.clone(), fp.clone());
            stages.push(PlannedStage {
                stage: name.clone(),
                kind: spec.kind.clone(),
                action: "kept".into(),
                plan: StagePlan::default(),
            });
            continue;
        }
        let stage = crate::stages::build(spec, wf)?;
        let upstream: Vec<(String, String)> =
            spec.needs.iter().map(|n| (n.clone(), fps.get(n).cloned().unwrap_or_default())).collect();
        let fp = fingerprint(&spec.kind, &spec.params, &stage.inputs().await?, &upstream);
        fps.insert(name.clone(), fp.clone());
        let up_to_date = !forced.contains(name)
            && runs::find_succeeded(store, name, &fp).await?.is_some()
            && stage.outputs_intact(store).await?;
        if up_to_date {
            stages.push(PlannedStage {
                stage: name.clone(),
                kind: spec.kind.clone(),
                action: "up to date".into(),
                plan: StagePlan::default(),
            });
            continue;
        }
        let cx = PlanCtx { store, spec, workflow: wf, upstream: &forecasts, forecast: true };
        let mut p = stage.plan(&cx).await?;
        if let Some(e) = &p.llm {
            total.add(e);
        }
        if let Some(f) = p.forecast.take() {
            forecasts.insert(name.clone(), f);
        }
        stages.push(PlannedStage { stage: name.clone(), kind: spec.kind.clone(), action: "runs".into(), plan: p });
    }
    Ok(Plan { workflow: wf.path.display().to_string(), stages, total })
}
