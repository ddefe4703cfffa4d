//! The `judge` stage: an LLM scores each kept question against its chunk with a rubric
//! (answerable from the chunk, specific to it, a real user's question) and accepts it at `min_score`.
//! Rejected pairs stay in the store with the judge's reason.

use async_trait::async_trait;
use serde_json::{Value, json};

use super::llm::{
    Chat, LlmStage, Prompted, UsageWriter, estimate, failure_verdict, llm_params, prompt, requests, settings_key,
};
use super::{Forecast, Kind, Outcome, PlanCtx, Stage, StageCtx, StagePlan};
use crate::error::Result;
use crate::llm::plan::Planned;
use crate::llm::{self, ChatDone, ChatRequest, LlmFailure, ScoreAsk, ScoreReading};
use crate::prompt::Template;
use crate::store::judgments::{self, Judgment};
use crate::store::states::Verdict;
use crate::text::first_json;
use crate::workflow::{CheckCtx, Checked, Diagnostic, StageSpec, Workflow, check_typed, checked};

pub const KIND: Kind = Kind {
    name: "judge",
    about: "score each question against its chunk with an LLM judge; accept at min_score",
    check,
    preflight: |spec, wf| templates(spec, wf).map(|_| ()),
    build,
};

llm_params! {
    defaults { temperature: 0.0, max_tokens: 200, max_failures: 0.0 }
    pub struct Params {
        /// A minijinja template, relative to the workflow file (default: the built-in judge.j2
        /// for an API model, judge_local.j2 for a local one).
        #[serde(default)]
        pub prompt: Option<String>,
        /// Accept at this score (1-5; the expected score where the model's probabilities are read).
        #[serde(default = "default_min_score")]
        pub min_score: f64,
        #[serde(default)]
        pub domain: Option<String>,
        /// Ask for the judge's reason beside its score (default: yes for an API model; a local model
        /// scores in one forward pass without one).
        #[serde(default)]
        pub reason: Option<bool>,
    }
}

fn default_min_score() -> f64 {
    4.0
}

fn check(cx: &CheckCtx) -> Checked {
    let mut diags = Vec::new();
    let Some(mut p) = check_typed::<Params>(cx.node, cx.params.clone(), &mut diags) else { return Err(diags) };
    p.fill_defaults();
    if !(1.0..=5.0).contains(&p.min_score) {
        let span = cx.node.get("min_score").map(|n| n.span()).unwrap_or(cx.node.span());
        diags.push(
            Diagnostic::new(span, format!("stage `{}`: min_score must be from 1 to 5", cx.stage))
                .hint("4 keeps good pairs; a fraction such as 3.5 compares with the expected score"),
        );
    }
    p.llm().check(cx, &mut diags);
    checked(&p, diags)
}

/// The prompt, rendered once against its documented variables.
fn templates(spec: &StageSpec, wf: &Workflow) -> Result<(Params, Template)> {
    let params: Params = spec.params()?;
    let sample = json!({ "query": "", "kind": "question", "chunk": "", "title": "", "path": "", "domain": "", "min_score": 4, "reason": true });
    let template = prompt(wf, &params.model, params.prompt.as_deref(), ("judge.j2", "judge_local.j2"), sample)?;
    Ok((params, template))
}

fn build(spec: &StageSpec, wf: &Workflow) -> Result<Box<dyn Stage>> {
    let (params, template) = templates(spec, wf)?;
    let model = params.model.clone();
    LlmStage::build(spec, wf, (params, template), &model)
}

type Judge = LlmStage<Params>;

const JUDGMENT_SCHEMA: &str = r#"{"type":"object","properties":{"score":{"type":"integer"},"reason":{"type":"string"}},"required":["score","reason"],"additionalProperties":false}"#;
const SCORE_SCHEMA: &str =
    r#"{"type":"object","properties":{"score":{"type":"integer"}},"required":["score"],"additionalProperties":false}"#;

/// The score (1-5) and reason in a judge's answer: JSON if there is any, else "score: N" in prose.
pub fn parse_judgment(text: &str) -> Option<(i64, String)> {
    if let Some(v) = first_json(text) {
        let score = match v.get("score") {
            Some(Value::Number(n)) => n.as_f64().map(|f| f.round() as i64),
            Some(Value::String(s)) => s.trim().parse::<f64>().ok().map(|f| f.round() as i64),
            _ => None,
        };
        if let Some(s) = score.filter(|s| (1..=5).contains(s)) {
            let reason = v.get("reason").and_then(Value::as_str).unwrap_or_default().to_string();
            return Some((s, reason));
        }
    }
    // Prose: the number after "score", else the first digit 1-5 (small models answer "4" or "I'd say 4").
    let lower = text.to_lowercase();
    let from = lower.find("score").unwrap_or(0);
    let Some(digit) = lower[from..].chars().find(|c| ('1'..='5').contains(c)) else {
        // A plain "it does not answer the question" is the bottom of the scale.
        const NO: &[&str] = &["does not answer", "doesn't answer", "not answered", "does not provide an answer"];
        return NO.iter().any(|p| lower.contains(p)).then(|| (1, text.trim().chars().take(300).collect()));
    };
    let s = digit.to_digit(10)? as i64;
    (1..=5).contains(&s).then(|| (s, text.trim().chars().take(300).collect()))
}

#[async_trait]
impl Stage for Judge {
    async fn inputs(&self) -> Result<String> {
        Ok(self.inputs_digest())
    }

    async fn run(&self, ctx: &StageCtx) -> Result<Outcome> {
        // The threshold only decides what a score means: a change re-decides stored scores, no calls.
        let settings = settings_key(&self.params, &["min_score"], &self.template, self.provider.identity());
        let redecided = judgments::activate(&ctx.store, &self.name, &settings, self.params.min_score).await?;
        if redecided > 0 {
            ctx.progress.log(&format!(
                "{redecided} stored verdicts decided again at min_score = {} (from their scores, no calls)",
                self.params.min_score
            ));
        }
        let todo = judgments::pending(&ctx.store, &self.inputs_from, &self.name, &settings).await?;
        let decided = judgments::decided(&ctx.store, &self.inputs_from, &self.name, &settings).await?;
        let total = todo.len() as u64 + decided as u64;
        ctx.progress.set_total(total);
        ctx.progress.cached(decided as u64);

        let chat = Chat::start(&self.wf, &self.params.model, self.provider.clone(), ctx)?;
        let mut results = chat.launch(self.requests(todo, chat.json)?, 256).await?;
        let model = self.provider.identity().model.clone();
        let (mut failed, mut accepted, mut rejected, mut first_error) = (0u64, 0u64, 0u64, None::<String>);
        let mut usage = UsageWriter::default();
        while let Some((query_id, outcome)) = results.recv().await {
            let Decided { verdict, reading, reason, call } = self.verdict(outcome?);
            judgments::write(
                &ctx.store,
                &self.name,
                &Judgment {
                    query_id,
                    settings: &settings,
                    score: reading.as_ref().map(|r| r.expected().round() as i64),
                    expected: reading.as_ref().map(ScoreReading::expected),
                    probs: reading.as_ref().and_then(ScoreReading::probabilities).map(|p| json!(p).to_string()),
                    scored_by: reading.as_ref().map(ScoreReading::source),
                    verdict,
                    reason: Some(&reason),
                    model: &model,
                    call_id: call,
                },
            )
            .await?;
            match verdict {
                Verdict::Accepted => accepted += 1,
                Verdict::Rejected => rejected += 1,
                Verdict::Failed => {
                    failed += 1;
                    first_error.get_or_insert_with(|| reason.clone());
                }
            }
            if verdict == Verdict::Failed {
                ctx.progress.failed(1);
            } else {
                ctx.progress.done(1);
            }
            usage.tick(ctx, || chat.usage()).await?;
        }
        let usage = usage.finish(ctx, chat.usage()).await?;
        let verdicts: serde_json::Map<String, Value> =
            judgments::verdict_counts(&ctx.store, &self.name).await?.into_iter().map(|(k, v)| (k, v.into())).collect();
        ctx.progress.log(&format!(
            "{accepted} accepted, {rejected} rejected, {failed} failed this run; {} calls, {} from cache",
            usage.calls, usage.cached
        ));
        let summary = json!({ "accepted": accepted, "rejected": rejected, "failed": failed, "verdicts": verdicts });
        let max_failures = self.params.llm().max_failures;
        Ok(Outcome { summary, failure: failure_verdict(failed, total, max_failures, first_error, &ctx.progress) })
    }

    /// What a run would ask now: the stored questions with no verdict under these settings, and
    /// those a generate stage before it would write (at most `per_chunk` a chunk, of estimated length).
    async fn plan(&self, cx: &PlanCtx<'_>) -> Result<StagePlan> {
        let settings = settings_key(&self.params, &["min_score"], &self.template, self.provider.identity());
        let json = llm::writes_json(&self.wf, &self.params.model)?;
        let (mut stored, mut unwritten, mut notes) = (Vec::new(), Vec::new(), Vec::new());
        let mut from_store: Vec<String> = self.inputs_from.clone();
        for f in cx.forecasts() {
            let Forecast::Questions { stage, settings: gen_settings, about, query_tokens, basis } = f else { continue };
            from_store.retain(|s| s != stage);
            stored.extend(judgments::pending_after(cx.store, (stage, gen_settings), &self.name, &settings).await?);
            if !about.is_empty() {
                notes.push(format!(
                    "{} questions `{stage}` has still to write are counted at most per_chunk a chunk, at {basis}",
                    about.len()
                ));
            }
            unwritten.extend(about.iter().map(|q| (q.clone(), *query_tokens)));
        }
        stored.extend(judgments::pending(cx.store, &from_store, &self.name, &settings).await?);
        let decided = judgments::decided(cx.store, &from_store, &self.name, &settings).await?;
        let todo = (stored.len() + unwritten.len()) as u64;
        let mut planned: Vec<Planned> =
            self.requests(stored, json)?.into_iter().map(|(_, r)| Planned::known(r)).collect();
        let tokens: Vec<u64> = unwritten.iter().map(|(_, t)| *t).collect();
        let reqs = self.requests(unwritten.into_iter().map(|(q, _)| q).collect(), json)?;
        planned.extend(reqs.into_iter().zip(tokens).map(|((_, req), unknown_tokens)| Planned { req, unknown_tokens }));
        let est = estimate(cx, &self.params.model, self.provider.as_ref(), &planned).await?;
        Ok(StagePlan { items: todo + decided as u64, todo, llm: Some(est), notes, forecast: None })
    }
}

impl Judge {
    /// One request per question; `json`: whether the model is asked for JSON.
    fn requests(&self, todo: Vec<judgments::JudgeInput>, json: bool) -> Result<Vec<(i64, ChatRequest)>> {
        let p = &self.params;
        let llm = p.llm();
        let gen_params = llm.gen_params(None);
        let reason = self.with_reason();
        let schema: Value =
            serde_json::from_str(if reason { JUDGMENT_SCHEMA } else { SCORE_SCHEMA }).expect("static schema");
        let items = todo
            .into_iter()
            .map(|q| {
                let vars = json!({
                    "query": q.query, "kind": q.kind.name(), "chunk": q.chunk, "title": q.title.unwrap_or_default(),
                    "path": q.path, "domain": p.domain.clone().unwrap_or_default(), "min_score": p.min_score, "reason": reason,
                });
                (q.query_id, vars)
            })
            .collect();
        let how = Prompted {
            template: &self.template,
            system: llm.system.as_deref(),
            params: &gen_params,
            schema: ("judgment", &schema),
            accept: |text| parse_judgment(text).is_some(),
            score: Some(ScoreAsk { reason }),
        };
        requests(items, &how, json)
    }

    /// Whether this judge asks for its reason.
    fn with_reason(&self) -> bool {
        self.params.reason.unwrap_or(self.provider.identity().provider != crate::workflow::Provider::Local)
    }

    /// One answer judged: its verdict, how the score was read, the reason and the call. The score is
    /// the expected score where the answer carries the digits' probabilities, else the digit written.
    /// An answer cut off after its score still carries the verdict; only one cut off before it fails.
    fn verdict(&self, outcome: std::result::Result<ChatDone, LlmFailure>) -> Decided {
        let done = match outcome {
            Ok(done) => done,
            Err(f) => return Decided { verdict: Verdict::Failed, reading: None, reason: f.message, call: None },
        };
        let call = Some(done.call_id);
        let fail = |reason: String| Decided { verdict: Verdict::Failed, reading: None, reason, call };
        match (parse_judgment(&done.answer.text), done.answer.finish_reason.as_deref()) {
            (Some((s, r)), _) => {
                let reading = match crate::llm::score_probabilities(&done.answer.raw) {
                    Some(p) => ScoreReading::Probabilities(p),
                    None => ScoreReading::Sampled(s as u8),
                };
                let verdict =
                    if reading.expected() >= self.params.min_score { Verdict::Accepted } else { Verdict::Rejected };
                Decided { verdict, reading: Some(reading), reason: r, call }
            }
            (None, Some("length")) => fail(format!(
                "the answer was cut off at max_tokens = {}; raise max_tokens",
                self.params.llm().max_tokens
            )),
            (None, _) => fail(format!(
                "no score from 1 to 5 in the judge's answer: {}",
                done.answer.text.chars().take(200).collect::<String>()
            )),
        }
    }
}

/// A judge's decision on one question.
struct Decided {
    verdict: Verdict,
    reading: Option<ScoreReading>,
    reason: String,
    call: Option<i64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn judgments_from_json_and_prose() {
        assert_eq!(parse_judgment("{\"score\": 4, \"reason\": \"ok\"}"), Some((4, "ok".into())));
        assert_eq!(parse_judgment("```json\n{\"score\": \"5\", \"reason\": \"x\"}\n```").map(|x| x.0), Some(5));
        assert_eq!(parse_judgment("Score: 2 - too vague").map(|x| x.0), Some(2));
        assert_eq!(parse_judgment("{\"score\": 9}"), None);
        assert_eq!(parse_judgment("I cannot judge this."), None);
        assert_eq!(parse_judgment("4").map(|x| x.0), Some(4));
        assert_eq!(parse_judgment("The text does not answer the question.").map(|x| x.0), Some(1));
        assert_eq!(parse_judgment("I would rate it 5 out of 5.").map(|x| x.0), Some(5));
    }
}
