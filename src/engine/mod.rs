//! Runs a workflow's DAG: stage runs with fingerprints, up-to-date skips, concurrency between
//! independent stages, failure isolation, resume of a failed or killed run, and the run lock.

mod job;
pub mod lock;
pub mod plan;
pub mod shutdown;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::task::JoinSet;

use crate::dag;
use crate::digest::sha256_hex;
use crate::error::{Error, Result};
use crate::llm::budget::{Budgets, Spent};
use crate::progress::Progress;
use crate::stages::Stage;
use crate::store::Store;
use crate::store::runs::{self, Counts, StageRunRow};
use crate::store::states::{RunStatus, StageStatus};
use crate::workflow::Workflow;
use job::Job;
use lock::RunLock;

/// The options of a run, stored with it so `flow resume` continues with the same ones.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RunOptions {
    /// Run these stages even if they are up to date.
    #[serde(default)]
    pub force: Vec<String>,
    /// Run only these stages; the others must have succeeded before.
    #[serde(default)]
    pub only: Vec<String>,
    /// Run this stage and everything downstream of it, even if up to date.
    #[serde(default)]
    pub from: Option<String>,
    /// The schedule firing (RFC 3339) that started this run, for runs started by `flow schedule`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheduled_for: Option<String>,
}

#[derive(Debug)]
pub struct RunReport {
    pub run_id: i64,
    pub status: RunStatus,
    /// A budget stopped the run (its status is `interrupted`).
    pub budget_stopped: bool,
    pub stages: Vec<StageRunRow>,
    pub notes: Vec<String>,
    /// A stage failed on bad input (a malformed eval set, a missing model): exit code 2, not 1.
    pub input_error: bool,
}

impl RunReport {
    pub fn exit_code(&self) -> u8 {
        match (self.status, self.budget_stopped, self.input_error) {
            (RunStatus::Succeeded, _, _) => 0,
            (_, true, _) => 3,
            (_, _, true) => 2,
            _ => 1,
        }
    }

    /// `stopped (budget)` for a run a budget stopped, else its status.
    pub fn shown_status(&self) -> &'static str {
        if self.budget_stopped { STOPPED_BUDGET } else { self.status.as_str() }
    }
}

/// The status of a run a budget stopped (stored as `interrupted` with its `stop_reason`).
pub const STOPPED_BUDGET: &str = "stopped (budget)";

/// A run's usage so far as a ledger's starting point.
fn spent_of(u: runs::UsageSnapshot) -> Spent {
    Spent {
        requests: u.calls,
        prompt_tokens: u.prompt_tokens,
        completion_tokens: u.completion_tokens,
        usd: u.cost.unwrap_or(0.0),
    }
}

/// How a stage's turn ended when it did not succeed.
enum Failed {
    Input,
    Other,
    /// A budget refused a request: the run stops.
    Budget(String),
}

/// Starts a new run of `wf`.
pub async fn run(wf: Workflow, opts: RunOptions, progress: Progress) -> Result<RunReport> {
    // SIGINT and SIGTERM interrupt the run cleanly from here on.
    shutdown::listen();
    check_names(&wf, &opts)?;
    let lock = RunLock::acquire(&wf.store)?;
    let store = Store::open(&wf.store).await?;
    let notes = take_over(&store, &lock).await?;
    let args = serde_json::to_string(&opts).expect("options serialise");
    let run_id = runs::create(&store, &wf.name, &wf.path.to_string_lossy(), &args).await?;
    execute(Arc::new(wf), store, run_id, opts, BTreeMap::new(), progress, notes).await
}

/// Continues `run_id` (default: the newest unfinished run): stages that finished are kept, the
/// rest run again and do only the items that have no stored result.
pub async fn resume(store_path: &std::path::Path, run_id: Option<i64>, progress: Progress) -> Result<RunReport> {
    shutdown::listen();
    let lock = RunLock::acquire(store_path)?;
    let store = Store::open_existing(store_path).await?;
    let notes = take_over(&store, &lock).await?;
    let row = match run_id {
        Some(id) => runs::get(&store, id).await?.ok_or_else(|| {
            Error::bad_input(format!("run {id} is not in {}", store_path.display()), "list runs with `flow runs`")
        })?,
        None => runs::latest_unfinished(&store).await?.ok_or_else(|| {
            Error::bad_input(
                format!("{} has no failed or interrupted run to resume", store_path.display()),
                "start a new one with `flow run WORKFLOW`",
            )
        })?,
    };
    if row.status == RunStatus::Succeeded {
        return Err(Error::bad_input(
            format!("run {} already succeeded; there is nothing to resume", row.id),
            "start a new run with `flow run WORKFLOW`",
        ));
    }
    let wf = crate::stages::load_workflow(std::path::Path::new(&row.workflow_path))?;
    let opts: RunOptions = serde_json::from_str(&row.args).unwrap_or_default();
    let mut finished = BTreeMap::new();
    for s in runs::stages_of(&store, row.id).await? {
        if s.status.is_good() && wf.stages.contains_key(&s.stage) {
            finished.insert(s.stage.clone(), s.fingerprint.clone());
        }
    }
    runs::reopen(&store, row.id).await?;
    progress.log(&format!("resuming run {} ({} stage(s) already finished)", row.id, finished.len()));
    execute(Arc::new(wf), store, row.id, opts, finished, progress, notes).await
}

async fn take_over(store: &Store, lock: &RunLock) -> Result<Vec<String>> {
    let mut notes = Vec::new();
    if let Some(prev) = &lock.taken_over_from {
        notes.push(format!("took over the store lock left by a process that is gone ({prev})"));
    }
    let n = runs::mark_interrupted(store).await?;
    if n > 0 {
        notes.push(format!(
            "{n} run(s) left running by a killed process marked interrupted; `flow resume` continues them"
        ));
    }
    Ok(notes)
}

fn check_names(wf: &Workflow, opts: &RunOptions) -> Result<()> {
    for name in opts.force.iter().chain(&opts.only).chain(&opts.from) {
        if !wf.stages.contains_key(name) {
            return Err(Error::bad_input(
                format!("no stage named `{name}` in {}", wf.path.display()),
                format!("stages: {}", wf.order.join(", ")),
            ));
        }
    }
    Ok(())
}

enum State {
    Waiting,
    Running,
    /// Finished well (ran, or was up to date); carries the fingerprint downstream stages build on.
    Good(String),
    Bad,
}

async fn execute(
    wf: Arc<Workflow>,
    store: Store,
    run_id: i64,
    opts: RunOptions,
    finished: BTreeMap<String, String>,
    progress: Progress,
    mut notes: Vec<String>,
) -> Result<RunReport> {
    for n in &notes {
        progress.log(n);
    }
    let state = initial_states(&wf, &store, &opts, &finished).await?;
    let earlier = runs::stages_of(&store, run_id).await?.into_iter().map(|s| spent_of(s.all_attempts()));
    let total = earlier.fold(Spent::default(), |mut acc, s| {
        acc.add(&s);
        acc
    });
    let budgets = Arc::new(Budgets::new(wf.budget.unwrap_or_default(), total));
    // Building resolves models and paths: a bad setting stops the run before anything starts.
    let mut built: HashMap<String, Arc<dyn Stage>> = HashMap::new();
    for name in wf.order.iter().filter(|n| matches!(state[*n], State::Waiting)) {
        built.insert(name.clone(), Arc::from(crate::stages::build(&wf.stages[name], &wf)?));
    }
    let forced = forced_stages(&wf, &opts);
    let mut dag = Runner {
        wf,
        store,
        run_id,
        progress,
        forced,
        state,
        built,
        tasks: JoinSet::new(),
        input_error: false,
        budget_stop: None,
        budgets: budgets.clone(),
    };
    let interrupted = loop {
        dag.start_ready().await?;
        if dag.tasks.is_empty() {
            break false;
        }
        if dag.wait().await? {
            break true;
        }
    };
    let Runner { wf, store, state, mut tasks, input_error, budget_stop, progress, .. } = dag;
    let mut stop_reason = None;
    let status = if let Some(why) = budget_stop.filter(|_| !interrupted) {
        // Requests already sent are paid for: their answers are stored before the run ends.
        for l in budgets.all() {
            let _ = tokio::time::timeout(Duration::from_secs(300), l.idle()).await;
        }
        notes.push(format!(
            "{STOPPED_BUDGET}: {why}; raise `budget:` in {} and `flow resume` continues without paying twice",
            wf.path.display()
        ));
        stop_reason = Some(format!("budget: {why}"));
        RunStatus::Interrupted
    } else if interrupted {
        // As a budget stop: nothing new is sent, and the requests already sent (paid for) are
        // awaited, each bounded by its timeout, so their answers are in the store before it ends.
        budgets.interrupt();
        progress.log("stopping: no new requests; waiting for those in flight (a second signal exits at once)");
        let bound = in_flight_bound(&wf);
        for l in budgets.all() {
            let _ = tokio::time::timeout(bound, l.idle()).await;
        }
        tasks.abort_all();
        while tasks.join_next().await.is_some() {}
        runs::mark_interrupted(&store).await?;
        notes.push("interrupted: `flow resume` continues where this stopped".into());
        RunStatus::Interrupted
    } else if state.values().all(|s| matches!(s, State::Good(_))) {
        RunStatus::Succeeded
    } else {
        RunStatus::Failed
    };
    runs::finish(&store, run_id, status, stop_reason.as_deref()).await?;
    let mut stages = runs::stages_of(&store, run_id).await?;
    stages.sort_by_key(|s| wf.order.iter().position(|n| *n == s.stage));
    store.close().await;
    Ok(RunReport { run_id, status, budget_stopped: stop_reason.is_some(), stages, notes, input_error })
}

/// How long a request already sent may take to come back: the longest timeout of the workflow's
/// models (a local model's answer takes well under a minute), and a little more.
fn in_flight_bound(wf: &Workflow) -> Duration {
    let longest = wf.models.values().filter_map(|m| m.timeout_s).fold(60.0, f64::max);
    Duration::from_secs_f64(longest + 5.0)
}

/// `--force`d stages, and with `--from` that stage and everything downstream of it.
fn forced_stages(wf: &Workflow, opts: &RunOptions) -> BTreeSet<String> {
    let needs: BTreeMap<String, Vec<String>> = wf.stages.iter().map(|(n, s)| (n.clone(), s.needs.clone())).collect();
    let mut forced: BTreeSet<String> = opts.force.iter().cloned().collect();
    if let Some(from) = &opts.from {
        forced.insert(from.clone());
        forced.extend(dag::downstream(&needs, from));
    }
    forced
}

/// Where each stage starts: finished by the attempt being resumed, standing as its last good
/// result (outside `--only`), or waiting to run.
async fn initial_states(
    wf: &Workflow,
    store: &Store,
    opts: &RunOptions,
    finished: &BTreeMap<String, String>,
) -> Result<HashMap<String, State>> {
    let needs: BTreeMap<String, Vec<String>> = wf.stages.iter().map(|(n, s)| (n.clone(), s.needs.clone())).collect();
    let mut state = HashMap::new();
    for name in &wf.order {
        let s = if let Some(fp) = finished.get(name) {
            State::Good(fp.clone())
        } else if !opts.only.is_empty() && !opts.only.contains(name) {
            // Outside --only: stands as its last good result, which must exist.
            match runs::latest_good_fingerprint(store, name).await? {
                Some(fp) => State::Good(fp),
                None if needed_by_only(name, &opts.only, &needs) => {
                    return Err(Error::bad_input(
                        format!("stage `{name}` has never succeeded, and the stages picked with --only need it"),
                        format!("run it first: `flow run {} --only {name}`", wf.path.display()),
                    ));
                }
                None => State::Good(String::new()),
            }
        } else {
            State::Waiting
        };
        state.insert(name.clone(), s);
    }
    Ok(state)
}

/// The DAG as it runs: each stage's state and the tasks of those running.
struct Runner {
    wf: Arc<Workflow>,
    store: Store,
    run_id: i64,
    progress: Progress,
    forced: BTreeSet<String>,
    state: HashMap<String, State>,
    built: HashMap<String, Arc<dyn Stage>>,
    tasks: JoinSet<(String, Result<String, Failed>)>,
    input_error: bool,
    /// Why a budget stopped the run: no further stage starts.
    budget_stop: Option<String>,
    /// What the run and each of its stages has spent against its `budget:`.
    budgets: Arc<Budgets>,
}

impl Runner {
    /// Starts every waiting stage whose needs all succeeded; blocks those with a need that failed.
    async fn start_ready(&mut self) -> Result<()> {
        if self.budget_stop.is_some() {
            return Ok(());
        }
        let wf = self.wf.clone();
        for name in &wf.order {
            if !matches!(self.state[name], State::Waiting) {
                continue;
            }
            let spec = &wf.stages[name];
            let failed: Vec<&str> =
                spec.needs.iter().filter(|n| matches!(self.state[*n], State::Bad)).map(String::as_str).collect();
            if !failed.is_empty() {
                self.block(name, &spec.kind, &failed).await?;
                continue;
            }
            let upstream: Option<Vec<(String, String)>> = spec
                .needs
                .iter()
                .map(|n| match &self.state[n] {
                    State::Good(fp) => Some((n.clone(), fp.clone())),
                    _ => None,
                })
                .collect();
            let Some(upstream) = upstream else { continue };
            self.state.insert(name.clone(), State::Running);
            let job = Job {
                stage: self.built[name].clone(),
                wf: wf.clone(),
                store: self.store.clone(),
                run_id: self.run_id,
                name: name.clone(),
                upstream,
                force: self.forced.contains(name),
                progress: self.progress.clone(),
                budgets: self.budgets.clone(),
            };
            self.tasks.spawn(async move {
                let name = job.name.clone();
                (name, job.run().await)
            });
        }
        Ok(())
    }

    /// Records a stage that cannot start because a stage it needs did not succeed.
    async fn block(&mut self, name: &str, kind: &str, failed: &[&str]) -> Result<()> {
        let id = runs::set_stage(&self.store, self.run_id, name, kind, "", StageStatus::Blocked).await?;
        let why = format!("not started: {} failed", failed.join(", "));
        runs::finish_stage(&self.store, id, StageStatus::Blocked, Counts::default(), None, Some(&why)).await?;
        self.progress.log(&format!("[{name}] not started: it needs {}, which did not succeed", failed.join(", ")));
        self.state.insert(name.to_string(), State::Bad);
        Ok(())
    }

    /// Waits for the next stage to end (true: a signal asked the run to stop first).
    async fn wait(&mut self) -> Result<bool> {
        tokio::select! {
            joined = self.tasks.join_next() => {
                let (name, res) = joined.expect("tasks not empty").map_err(Error::task("a stage task"))?;
                match res {
                    Ok(fp) => self.state.insert(name, State::Good(fp)),
                    Err(failed) => {
                        match failed {
                            Failed::Input => self.input_error = true,
                            Failed::Budget(why) => {
                                self.budget_stop.get_or_insert(why);
                            }
                            Failed::Other => {}
                        }
                        self.state.insert(name, State::Bad)
                    }
                };
                Ok(false)
            }
            _ = shutdown::requested() => Ok(true),
        }
    }
}

fn needed_by_only(name: &str, only: &[String], needs: &BTreeMap<String, Vec<String>>) -> bool {
    only.iter().any(|o| needs.get(o).is_some_and(|n| n.iter().any(|x| x == name)))
}

/// sha256 over the kind, the parameters (keys sorted), the stage's own inputs and its upstream fingerprints.
pub fn fingerprint(kind: &str, params: &serde_json::Value, inputs: &str, upstream: &[(String, String)]) -> String {
    let mut up = upstream.to_vec();
    up.sort();
    let doc = serde_json::json!({ "kind": kind, "params": params, "inputs": inputs, "upstream": up });
    sha256_hex(doc.to_string().as_bytes())
}
