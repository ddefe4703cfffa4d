//! `schedule:` and `timezone:` of a workflow, and `flow schedule`: a foreground loop that starts each
//! workflow at its cron times, catches up once on a missed firing, and never overlaps a live run.

use std::path::PathBuf;
use std::str::FromStr;

use chrono::{DateTime, Timelike, Utc};
use chrono_tz::Tz;
use croner::Cron;
use croner::parser::{CronParser, Seconds};

use crate::engine::progress::Progress;
use crate::engine::{self, RunOptions, shutdown};
use crate::error::{Error, Result};
use crate::store::{Store, runs};

/// A cron expression in a time zone.
#[derive(Debug, Clone)]
pub struct Schedule {
    pub expr: String,
    pub tz: Tz,
    cron: Cron,
}

/// Parses five cron fields (`minute hour day-of-month month day-of-week`), or six with seconds
/// first, in `tz` (an IANA name; UTC when absent).
pub fn parse(expr: &str, tz: Option<&str>) -> std::result::Result<Schedule, String> {
    let fields = expr.split_whitespace().count();
    if !(5..=6).contains(&fields) {
        return Err(format!("`{expr}` has {fields} fields, a schedule needs 5 (or 6 with seconds first)"));
    }
    let cron = CronParser::builder()
        .seconds(Seconds::Optional)
        .build()
        .parse(expr)
        .map_err(|e| format!("`{expr}` is not a valid cron expression: {e}"))?;
    let tz = match tz {
        Some(name) => Tz::from_str(name).map_err(|_| format!("unknown time zone {name:?}"))?,
        None => Tz::UTC,
    };
    Ok(Schedule { expr: expr.to_string(), tz, cron })
}

impl Schedule {
    /// The first firing strictly after `t`.
    pub fn next_after(&self, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
        let next = self.cron.find_next_occurrence(&t.with_timezone(&self.tz), false).ok()?;
        // Firings are whole seconds, whatever fraction `t` had.
        next.with_timezone(&Utc).with_nanosecond(0)
    }

    /// The last firing at or before `t`.
    pub fn last_at_or_before(&self, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
        self.cron.find_previous_occurrence(&t.with_timezone(&self.tz), true).ok().map(|d| d.with_timezone(&Utc))
    }

    /// The next `n` firings after `t`, in the schedule's time zone.
    pub fn upcoming(&self, t: DateTime<Utc>, n: usize) -> Vec<DateTime<Tz>> {
        let mut out = Vec::with_capacity(n);
        let mut at = t;
        while out.len() < n {
            let Some(next) = self.next_after(at) else { break };
            out.push(next.with_timezone(&self.tz));
            at = next;
        }
        out
    }

    /// The firing missed while nothing ran: the last one at or before `now` if the workflow's last
    /// run started before it (or it never ran).
    pub fn missed(&self, last_run: Option<DateTime<Utc>>, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
        let due = self.last_at_or_before(now)?;
        match last_run {
            Some(started) if started >= due => None,
            _ => Some(due),
        }
    }
}

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
        eprintln!("{} [schedule] {line}", chrono::Local::now().format("%H:%M:%S"));
    }
}

/// Loads a workflow that must have a schedule.
pub fn load(path: &std::path::Path) -> Result<(crate::workflow::Workflow, Schedule)> {
    let wf = crate::workflow::load(path)?;
    let Some(expr) = wf.schedule.clone() else {
        return Err(Error::bad_input(
            format!("{} has no `schedule:`", path.display()),
            "add e.g. `schedule: \"0 2 * * *\"` (and `timezone: Europe/Berlin`) at the top level",
        ));
    };
    let s = parse(&expr, wf.timezone.as_deref()).map_err(|e| Error::bad_input(e, "fix `schedule:` / `timezone:`"))?;
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
    let wf = match crate::workflow::load(&e.path) {
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
                log(opts.quiet, &format!("{}: run {} {}", e.name, r.run_id, r.status));
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

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    #[test]
    fn accepts_standard_and_rejects_bad() {
        assert!(parse("0 2 * * *", None).is_ok());
        assert!(parse("*/5 * * * 1-5", None).is_ok());
        assert!(parse("*/2 * * * * *", None).is_ok());
        assert!(parse("0 25 * * *", None).is_err());
        assert!(parse("0 2 * *", None).is_err());
        assert!(parse("0 2 * * *", Some("Mars/Olympus")).is_err());
    }

    #[test]
    fn next_firings_follow_the_time_zone() {
        // 02:00 in Berlin is 01:00 UTC in winter and 00:00 UTC in summer; on 29 March 2026 02:00 does
        // not exist (clocks jump to 03:00), and the firing comes at 03:00 CEST = 01:00 UTC.
        let s = parse("0 2 * * *", Some("Europe/Berlin")).unwrap();
        let next = s.upcoming(at("2026-03-27T12:00:00Z"), 3);
        let utc: Vec<String> = next.iter().map(|d| d.with_timezone(&Utc).to_rfc3339()).collect();
        assert_eq!(utc, ["2026-03-28T01:00:00+00:00", "2026-03-29T01:00:00+00:00", "2026-03-30T00:00:00+00:00"]);
        assert_eq!(
            parse("0 2 * * *", None).unwrap().next_after(at("2026-11-24T02:00:00Z")),
            Some(at("2026-11-25T02:00:00Z"))
        );
        let every2 = parse("*/2 * * * * *", None).unwrap();
        assert_eq!(every2.next_after(at("2026-11-24T02:00:00.250Z")), Some(at("2026-11-24T02:00:02Z")));
    }

    #[test]
    fn a_missed_firing_is_found_once() {
        let s = parse("0 2 * * *", None).unwrap();
        let now = at("2026-11-24T09:00:00Z");
        // Last run the day before yesterday: today's 02:00 was missed.
        assert_eq!(s.missed(Some(at("2026-11-22T02:00:05Z")), now), Some(at("2026-11-24T02:00:00Z")));
        // Ran at (or after) today's firing: nothing missed.
        assert_eq!(s.missed(Some(at("2026-11-24T02:00:00Z")), now), None);
        assert_eq!(s.missed(Some(at("2026-11-24T08:00:00Z")), now), None);
        // Never ran: the last firing counts as missed.
        assert_eq!(s.missed(None, now), Some(at("2026-11-24T02:00:00Z")));
    }
}
