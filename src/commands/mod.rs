//! One function per subcommand: call the library, print for a person or as JSON, pick the exit code.
//! Output goes through `outln!` (a closed or full stdout is an error, never a panic) and `errln!`.

/// A line of a command's result on stdout; `?` it: a closed pipe or a full disk ends the command
/// with `OutputError` instead of a panic.
macro_rules! outln {
    ($($arg:tt)*) => { $crate::commands::write_out(format_args!("{}\n", format_args!($($arg)*))) };
}

/// A line for the person on stderr; one that cannot be written is dropped (it must never stop a run).
macro_rules! errln {
    ($($arg:tt)*) => { flow::progress::stderr_line(&format!($($arg)*)) };
}

mod inspect;
mod models;
mod plan;
mod run;
mod schedule;
mod serve;
mod validate;

use crate::cli::{Cli, Command};

pub async fn dispatch(cli: Cli) -> anyhow::Result<u8> {
    match cli.command {
        Command::Run(a) => run::run(a, cli.quiet).await,
        Command::Resume(a) => run::resume(a, cli.quiet).await,
        Command::Plan(a) => plan::plan(a).await,
        Command::Validate(a) => validate::validate(a),
        Command::Status(a) => inspect::status(a).await,
        Command::Runs(a) => inspect::runs(a).await,
        Command::Pairs(a) => inspect::pairs(a).await,
        Command::Answers(a) => inspect::answers(a).await,
        Command::Report(a) => inspect::report(a).await,
        Command::Models(c) => models::models(c, cli.quiet).await,
        Command::Schedule(a) => schedule::schedule(a, cli.quiet).await,
        Command::Serve(a) => serve::serve(a).await,
        Command::Search(a) => serve::search(a).await,
        Command::Embed(a) => serve::embed(a, cli.quiet).await,
    }
}

/// The result could not be written (stdout closed or full).
#[derive(Debug, thiserror::Error)]
#[error("cannot write the output: {0}")]
pub struct OutputError(pub std::io::Error);

impl OutputError {
    /// A reader that went away (`| head`, `| true`): nothing to tell it.
    pub fn is_closed_pipe(&self) -> bool {
        self.0.kind() == std::io::ErrorKind::BrokenPipe
    }
}

pub fn write_out(args: std::fmt::Arguments) -> anyhow::Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    out.write_fmt(args).and_then(|_| out.flush()).map_err(|e| OutputError(e).into())
}

pub fn exit_code(e: &anyhow::Error) -> u8 {
    e.downcast_ref::<flow::Error>().map(flow::Error::exit_code).unwrap_or(1)
}

pub fn render_error(e: &anyhow::Error) -> String {
    match e.downcast_ref::<flow::Error>() {
        // Workflow diagnostics carry their own `error:` lines.
        Some(flow::Error::Workflow(d)) => d.to_string(),
        _ => format!("error: {e:#}"),
    }
}

pub use flow::text::table;

pub fn fmt_time(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .map(|t| t.with_timezone(&chrono::Local).format("%F %T").to_string())
        .unwrap_or_default()
}

/// The run options of `--force`, `--only` and `--from`.
pub fn run_options(p: crate::cli::Pick) -> flow::engine::RunOptions {
    flow::engine::RunOptions { force: p.force, only: p.only, from: p.from, scheduled_for: None }
}

pub fn fmt_duration(start: Option<i64>, end: Option<i64>) -> String {
    match (start, end) {
        (Some(s), Some(e)) => format!("{:.1}s", (e - s) as f64 / 1000.0),
        (Some(s), None) => format!("{:.0}s+", (flow::store::now_ms() - s) as f64 / 1000.0),
        _ => "-".into(),
    }
}
