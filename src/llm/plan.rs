//! What a stage's chat requests would cost, without sending them (`flow plan`): which are already
//! answered in the cache, their prompt tokens by the model's tokenizer, and completion tokens and cost.

use serde::{Deserialize, Serialize};

use super::{ChatProvider, ChatRequest, LlmClient};
use crate::error::Result;
use crate::store::Store;
use crate::store::llm_calls;
use crate::workflow::Price;

/// One request a stage would send.
pub struct Planned {
    pub req: ChatRequest,
    /// Tokens of text not known yet (a question another stage has still to write), on top of `req`'s.
    pub unknown_tokens: u64,
}

impl Planned {
    pub fn known(req: ChatRequest) -> Planned {
        Planned { req, unknown_tokens: 0 }
    }
}

/// A stage's chat requests, estimated.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Estimate {
    /// Requests to send: those with no usable answer in the cache.
    pub requests: u64,
    /// Requests the cache answers (no call, no cost).
    pub cached: u64,
    pub prompt_tokens: u64,
    /// `max_tokens` of every request to send: completion can not be longer.
    pub completion_tokens_max: u64,
    /// From the mean completion of this stage's earlier calls to this model, where there are any.
    pub completion_tokens_expected: Option<u64>,
    /// How many earlier calls that mean is of.
    pub observed_calls: u64,
    /// Cost at the model's `price:` with the expected completion, else with the maximum.
    pub usd: Option<f64>,
    pub usd_max: Option<f64>,
    /// What counted the prompt tokens: the model's tokenizer, or an estimate of four bytes a token.
    pub counted_by: String,
}

impl Estimate {
    /// The estimate a stage run recorded when it started, if any.
    pub fn of(row: &crate::store::runs::StageRunRow) -> Option<Estimate> {
        row.estimate.as_deref().and_then(|e| serde_json::from_str(e).ok())
    }

    /// The sum of a run's stage estimates; None when no stage recorded one.
    pub fn of_run(stages: &[crate::store::runs::StageRunRow]) -> Option<Estimate> {
        let mut all: Option<Estimate> = None;
        for e in stages.iter().filter_map(Estimate::of) {
            all.get_or_insert_with(Default::default).add(&e);
        }
        all
    }

    /// The cost to expect, as shown: `~$x` with an observed completion mean, `<=$x` at max_tokens.
    pub fn shown_usd(&self) -> Option<String> {
        match self.completion_tokens_expected {
            Some(_) => self.usd.map(|x| format!("~${x:.4}")),
            None => self.usd_max.map(|x| format!("<=${x:.4}")),
        }
    }

    /// Completion tokens to expect: the observed mean where known, else the upper bound.
    pub fn completion_tokens(&self) -> u64 {
        self.completion_tokens_expected.unwrap_or(self.completion_tokens_max)
    }

    pub fn add(&mut self, o: &Estimate) {
        self.requests += o.requests;
        self.cached += o.cached;
        self.prompt_tokens += o.prompt_tokens;
        self.completion_tokens_max += o.completion_tokens_max;
        self.completion_tokens_expected = match (self.completion_tokens_expected, o.completion_tokens_expected) {
            (None, None) => None,
            (a, b) => Some(a.unwrap_or(0) + b.unwrap_or(0)),
        };
        self.observed_calls += o.observed_calls;
        let sum = |a: Option<f64>, b: Option<f64>| {
            if a.is_none() && b.is_none() { None } else { Some(a.unwrap_or(0.0) + b.unwrap_or(0.0)) }
        };
        self.usd = sum(self.usd, o.usd);
        self.usd_max = sum(self.usd_max, o.usd_max);
        if self.counted_by.is_empty() {
            self.counted_by = o.counted_by.clone();
        } else if !o.counted_by.is_empty() && o.counted_by != self.counted_by {
            self.counted_by = "mixed".into();
        }
    }
}

/// Estimates `planned` as `stage` would send them through `provider`: a request whose exact body
/// has a usable, parsing answer in the store's cache costs nothing.
pub async fn estimate(
    provider: &dyn ChatProvider,
    price: Option<Price>,
    store: &Store,
    stage: &str,
    planned: &[Planned],
) -> Result<Estimate> {
    let id = provider.identity();
    let mut e = Estimate::default();
    for p in planned {
        if p.unknown_tokens == 0
            && LlmClient::has_answer(store, &LlmClient::request_hash(id, &provider.body(&p.req)), &p.req).await?
        {
            e.cached += 1;
            continue;
        }
        let (estimated, completion_max) = p.req.estimated_tokens();
        let prompt = match provider.count_prompt(&p.req) {
            Some((n, by)) => {
                e.counted_by = by.to_string();
                n
            }
            None => {
                e.counted_by = "estimate: 4 bytes a token".into();
                estimated
            }
        };
        e.requests += 1;
        e.prompt_tokens += prompt + p.unknown_tokens;
        e.completion_tokens_max += completion_max;
    }
    if let Some((mean, n)) = llm_calls::completion_mean(store, stage, id.provider, &id.model).await? {
        e.observed_calls = n;
        e.completion_tokens_expected = Some((mean * e.requests as f64).round() as u64);
    }
    if let Some(pr) = price {
        e.usd = Some(pr.usd(e.prompt_tokens, e.completion_tokens()));
        e.usd_max = Some(pr.usd(e.prompt_tokens, e.completion_tokens_max));
    }
    Ok(e)
}
