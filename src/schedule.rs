//! `flow schedule`: a foreground loop that starts each workflow at its cron times (`workflow::cron`),
//! catches up once on a missed firing, and never overlaps a live run.

use std::path::PathBuf;

use chrono::{DateTime, Utc};

use crate::engine::{self, RunOptions, shutdown};
use crate::error::{Error, Result};
use crate::progress::Progress;
use crate::store::{Store, runs};
use crate::workflow::cron::{self, Schedule};

/// What a firing does when a run of the same workflow is live.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WhenBusy {
    /// Wait for the live run to end, then run.
    Wait,
    /// Skip this firing.
    Skip,
}

pub struct DaemonOptions {
    /// Run once at start for a firing missed while the scheduler was down.
    pub catch_up: bool,
    pub when_busy: WhenBusy,
    pub quiet: bool,
}

struct Entry {
    path: PathBuf,
    name: String,
    schedule: Schedule,
    next: DateTime<Utc>,
}

fn log(quiet: bool, line: &str) {
    if !quiet {
        crate::progress::stderr_line(&format!("{} [schedule] {line}", chrono::Local::now().format("%H:%M:%S")));
    }
}

/// Loads a workflow that must have a schedule.
pub fn load(path: &std::path::Path) -> Result<(crate::workflow::Workflow, Schedule)> {
    let wf = crate::stages::load_workflow(path)?;
    let Some(expr) = wf.schedule.clone() else {
        return Err(Error::bad_input(
            format!("{} has no `schedule:`", path.display()),
            "add e.g. `schedule: \"0 2 * * *\"` (and `timezone: Europe/Berlin`) at the top level",
        ));
    };
    let s =
        cron::parse(&expr, wf.timezone.as_deref()).map_err(|e| Error::bad_input(e, "fix `schedule:` / `timezone:`"))?;
    Ok((wf, s))
}

/// Runs until SIGINT/SIGTERM: each workflow at its firings, one run at a time.
pub async fn daemon(paths: &[PathBuf], opts: DaemonOptions) -> Result<()> {
    shutdown::listen();
    let now = Utc::now();
    let mut entries = Vec::new();
    for p in paths {
        let (wf, schedule) = load(p)?;
        let mut next = schedule.next_after(now).ok_or_else(|| {
            Error::bad_input(format!("`{}` never fires after now", schedule.expr), "check the cron fields")
        })?;
        if opts.catch_up {
            let last = match wf.store.exists() {
                true => runs::latest(&Store::open(&wf.store).await?).await?,
                false => None,
            };
            let last_start = last.and_then(|r| DateTime::from_timestamp_millis(r.started_at));
            if let Some(missed) = schedule.missed(last_start, now) {
                log(
                    opts.quiet,
                    &format!(
                        "{}: the firing at {} was missed; running once now",
                        wf.name,
                        missed.with_timezone(&schedule.tz)
                    ),
                );
                next = now;
            }
        }
        log(
            opts.quiet,
            &format!(
                "{}: `{}` ({}), next at {}",
                wf.name,
                schedule.expr,
                schedule.tz,
                next.with_timezone(&schedule.tz)
            ),
        );
        entries.push(Entry { path: p.clone(), name: wf.name.clone(), schedule, next });
    }
    loop {
        let Some(i) = (0..entries.len()).min_by_key(|&i| entries[i].next) else { return Ok(()) };
        let wait = (entries[i].next - Utc::now()).to_std().unwrap_or_default();
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = shutdown::requested() => {
                log(opts.quiet, "stopped (signal); no run was in progress");
                return Ok(());
            }
        }
        let firing = entries[i].next;
        fire(&entries[i], firing, &opts).await;
        if shutdown::is_requested() {
            log(opts.quiet, "stopped (signal) after the run was interrupted; `flow resume` continues it");
            return Ok(());
        }
        let e = &mut entries[i];
        // A run longer than the interval skips the firings it overlapped, rather than piling them up.
        let now = Utc::now();
        e.next = e.schedule.next_after(now.max(firing)).unwrap_or(firing + chrono::Duration::days(36500));
        log(opts.quiet, &format!("{}: next at {}", e.name, e.next.with_timezone(&e.schedule.tz)));
    }
}

/// One firing: reload the workflow (edits take effect), run it, report. Errors are logged, not fatal.
async fn fire(e: &Entry, firing: DateTime<Utc>, opts: &DaemonOptions) {
    let wf = match crate::stages::load_workflow(&e.path) {
        Ok(wf) => wf,
        Err(err) => {
            log(opts.quiet, &format!("{}: not run, the workflow no longer loads: {err}", e.name));
            return;
        }
    };
    let run_opts = RunOptions { scheduled_for: Some(firing.to_rfc3339()), ..Default::default() };
    loop {
        log(opts.quiet, &format!("{}: starting the run for {}", e.name, firing.with_timezone(&e.schedule.tz)));
        match engine::run(wf.clone(), run_opts.clone(), Progress::new(opts.quiet)).await {
            Ok(r) => {
                log(opts.quiet, &format!("{}: run {} {}", e.name, r.run_id, r.shown_status()));
                return;
            }
            Err(Error::Locked { holder, .. }) if opts.when_busy == WhenBusy::Wait => {
                log(opts.quiet, &format!("{}: a run is live ({}); waiting for it to end", e.name, holder.trim()));
                tokio::select! {
                    _ = tokio::time::sleep(std::time::Duration::from_secs(2)) => {}
                    _ = shutdown::requested() => return,
                }
            }
            Err(Error::Locked { holder, .. }) => {
                log(opts.quiet, &format!("{}: a run is live ({}); skipping this firing", e.name, holder.trim()));
                return;
            }
            Err(err) => {
                log(opts.quiet, &format!("{}: the run could not start: {err}", e.name));
                return;
            }
        }
    }
}
