//! `flow schedule`: list the next firings, or run the scheduler in the foreground.

use flow::schedule::{self, DaemonOptions, WhenBusy};

use crate::cli::{self, ScheduleArgs};

pub async fn schedule(a: ScheduleArgs, quiet: bool) -> anyhow::Result<u8> {
    if a.next {
        let now = chrono::Utc::now();
        for p in &a.workflows {
            let (wf, s) = schedule::load(p)?;
            outln!("{} (`{}`, {}):", wf.name, s.expr, s.tz)?;
            for t in s.upcoming(now, 5) {
                outln!("  {}", t.format("%a %F %T %Z"))?;
            }
        }
        return Ok(0);
    }
    let when_busy = match a.when_busy {
        cli::WhenBusy::Wait => WhenBusy::Wait,
        cli::WhenBusy::Skip => WhenBusy::Skip,
    };
    schedule::daemon(&a.workflows, DaemonOptions { catch_up: !a.no_catch_up, when_busy, quiet }).await?;
    Ok(0)
}
