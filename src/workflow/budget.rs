//! `budget:` caps on what a run (at the workflow's top level) or one stage may spend: dollars (priced
//! with the models' `price:`), requests sent and tokens. A budget changes no result, so no fingerprint holds it.

use serde::{Deserialize, Serialize};

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
