//! `budget:` caps on what a run (at the workflow's top level) or one stage may spend: dollars (priced
//! with the models' `price:`), requests sent and tokens. A budget changes no result, so no fingerprint holds it.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::diag::{Diagnostic, Span};

#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Budget {
    /// Dollars, from the tokens of each call and its model's `price:` (a model with no price costs 0).
    #[serde(default)]
    pub max_usd: Option<f64>,
    /// Requests sent to a model (retries included), local or remote.
    #[serde(default)]
    pub max_requests: Option<u64>,
    /// Prompt and completion tokens together.
    #[serde(default)]
    pub max_tokens: Option<u64>,
}

impl Budget {
    /// What is wrong with it, if anything (a negative or non-finite dollar cap).
    pub fn problem(&self) -> Option<String> {
        self.max_usd
            .filter(|u| !(u.is_finite() && *u >= 0.0))
            .map(|u| format!("`max_usd` must be a number of dollars of at least 0, not {u}"))
    }
}

/// A stage's `budget:` value, checked; a problem becomes a diagnostic at `span`.
pub fn of_stage(v: Value, stage: &str, span: Span, diags: &mut Vec<Diagnostic>) -> Option<Budget> {
    if v.is_null() {
        return None;
    }
    match serde_json::from_value::<Budget>(v) {
        Ok(b) => match b.problem() {
            None => Some(b),
            Some(p) => {
                diags.push(Diagnostic::new(span, format!("stage `{stage}`: {p}")));
                None
            }
        },
        Err(e) => {
            diags.push(
                Diagnostic::new(span, format!("stage `{stage}`: `budget`: {e}"))
                    .hint("e.g. `budget: { max_usd: 2.5, max_requests: 1000, max_tokens: 2000000 }`"),
            );
            None
        }
    }
}
