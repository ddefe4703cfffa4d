//! One function per subcommand: call the library, print for a person or as JSON, pick the exit code.

mod inspect;
mod models;
mod run;
mod schedule;
mod validate;

use crate::cli::{Cli, Command};

pub async fn dispatch(cli: Cli) -> anyhow::Result<u8> {
    match cli.command {
        Command::Run(a) => run::run(a, cli.quiet).await,
        Command::Resume(a) => run::resume(a, cli.quiet).await,
        Command::Validate(a) => validate::validate(a),
        Command::Status(a) => inspect::status(a).await,
        Command::Runs(a) => inspect::runs(a).await,
        Command::Pairs(a) => inspect::pairs(a).await,
        Command::Answers(a) => inspect::answers(a).await,
        Command::Report(a) => inspect::report(a).await,
        Command::Models(c) => models::models(c, cli.quiet).await,
        Command::Schedule(a) => schedule::schedule(a, cli.quiet).await,
    }
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

pub fn fmt_duration(start: Option<i64>, end: Option<i64>) -> String {
    match (start, end) {
        (Some(s), Some(e)) => format!("{:.1}s", (e - s) as f64 / 1000.0),
        (Some(s), None) => format!("{:.0}s+", (flow::store::now_ms() - s) as f64 / 1000.0),
        _ => "-".into(),
    }
}
