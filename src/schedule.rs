//! Cron expressions for `schedule:`; the nightly-refresh loop that uses them comes with `flow schedule`.
//! Parsing lives here so `flow validate` and the scheduler agree on what a valid schedule is.

use std::str::FromStr;

pub use croner::Cron;

/// Parses a five-field cron expression (`minute hour day-of-month month day-of-week`).
pub fn parse_cron(expr: &str) -> Result<Cron, String> {
    let fields = expr.split_whitespace().count();
    if fields != 5 {
        return Err(format!("`{expr}` has {fields} fields, a schedule needs 5"));
    }
    Cron::from_str(expr).map_err(|e| format!("`{expr}` is not a valid cron expression: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_standard_and_rejects_bad() {
        assert!(parse_cron("0 2 * * *").is_ok());
        assert!(parse_cron("*/5 * * * 1-5").is_ok());
        assert!(parse_cron("0 25 * * *").is_err());
        assert!(parse_cron("0 2 * *").is_err());
    }
}
