//! `schedule:` and `timezone:` of a workflow: a cron expression in a time zone, and its firings.
//! Pure time arithmetic; `flow schedule` (the daemon) lives in `schedule`.

use std::str::FromStr;

use chrono::{DateTime, Timelike, Utc};
use chrono_tz::Tz;
use croner::Cron;
use croner::parser::{CronParser, Seconds};

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
