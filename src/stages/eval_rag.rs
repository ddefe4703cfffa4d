//! The `eval_rag` stage: for each eval question, retrieve with each retriever, answer from those
//! passages only, and have an LLM judge grade the answer; accuracy with a 95% Wilson interval.

use std::collections::HashSet;
use std::sync::Arc;

use async_trait::async_trait;
use serde_json::{Value, json};

use super::eval_recall::{check_set, eval_plan, retrieve_ctx};
use super::llm::{Chat, Prompted, UsageWriter, check_model, failure_verdict, llm_params, prompt};
use super::{Kind, Outcome, PlanCtx, Stage, StageCtx, StagePlan};
use crate::error::Result;
use crate::eval::retrieve::{self, Plan};
use crate::eval::set::{EvalSet, SetParams};
use crate::llm::{self, ChatProvider};
use crate::prompt::Template;
use crate::retriever::Kind as Retriever;
use crate::retriever::params::retrieval_params;
use crate::store::rag_answers::{self, NewAnswer};
use crate::store::runs::UsageSnapshot;
use crate::text::first_json;
use crate::workflow::{CheckCtx, Checked, Diagnostic, StageSpec, Workflow, check_typed, checked};

pub const KIND: Kind = Kind {
    name: "eval_rag",
    about: "answer eval questions from each retriever's passages and grade the answers with an LLM judge",
    check,
    preflight: |spec, wf| templates(spec, wf).map(|_| ()),
    build,
};

retrieval_params! {
    then [llm_params] { defaults { temperature: 0.0, max_tokens: 256, max_failures: 0.1 } }
    pub struct Params {
        #[serde(default)]
        pub eval_set: SetParams,
        /// `models:` key of the grader (default: the answering `model`).
        #[serde(default)]
        pub grader: Option<String>,
        /// Templates relative to the workflow file (default: the built-in rag_answer.j2 and
        /// rag_grade.j2, for API and local models alike).
        #[serde(default)]
        pub answer_prompt: Option<String>,
        #[serde(default)]
        pub grade_prompt: Option<String>,
        #[serde(default = "default_top_k")]
        pub top_k: usize,
        /// Questions answered per retriever (the first N of the eval set).
        #[serde(default = "default_max_questions")]
        pub max_questions: usize,
        #[serde(default)]
        pub domain: Option<String>,
        #[serde(default = "default_grade_tokens")]
        pub grade_max_tokens: u32,
    }
}

fn default_top_k() -> usize {
    3
}
fn default_max_questions() -> usize {
    100
}
fn default_grade_tokens() -> u32 {
    128
}

fn check(cx: &CheckCtx) -> Checked {
    let mut diags = Vec::new();
    let Some(mut p) = check_typed::<Params>(cx.node, cx.params.clone(), &mut diags) else { return Err(diags) };
    p.fill_defaults();
    check_set(cx, &p.eval_set, &p.retrieval(), &mut diags);
    p.llm().check(cx, &mut diags);
    if let Some(g) = &p.grader {
        check_model(cx, g, &mut diags);
    }
    if p.top_k == 0 || p.max_questions == 0 {
        let span = cx.node.get("top_k").map(|n| n.span()).unwrap_or(cx.node.span());
        diags.push(
            Diagnostic::new(span, format!("stage `{}`: top_k and max_questions must be at least 1", cx.stage))
                .hint("top_k: 3 passages per answer is usual"),
        );
    }
    checked(&p, diags)
}

/// The answer and grade prompts, each rendered once against its documented variables.
fn templates(spec: &StageSpec, wf: &Workflow) -> Result<(Params, Template, Template)> {
    let params: Params = spec.params()?;
    let answer = json!({ "question": "", "passages": [""], "domain": "" });
    let files = ("rag_answer.j2", "rag_answer.j2");
    let answer = prompt(wf, &params.model, params.answer_prompt.as_deref(), files, answer)?;
    let grade = json!({ "question": "", "answer": "", "reference": "", "reference_is_answer": true, "domain": "" });
    let grader = params.grader.as_deref().unwrap_or(&params.model);
    let files = ("rag_grade.j2", "rag_grade.j2");
    let grade = prompt(wf, grader, params.grade_prompt.as_deref(), files, grade)?;
    Ok((params, answer, grade))
}

fn build(spec: &StageSpec, wf: &Workflow) -> Result<Box<dyn Stage>> {
    let (params, answer, grade) = templates(spec, wf)?;
    let plan = eval_plan(spec, wf, &params.eval_set, params.retrieval())?;
    let answerer = llm::chat_provider(wf, &params.model)?;
    let grader_key = params.grader.clone().unwrap_or_else(|| params.model.clone());
    let grader = if grader_key == params.model { answerer.clone() } else { llm::chat_provider(wf, &grader_key)? };
    Ok(Box::new(EvalRag {
        name: spec.name.clone(),
        wf: Arc::new(wf.clone()),
        params,
        plan,
        answer: Arc::new(answer),
        grade: Arc::new(grade),
        answerer,
        grader,
        grader_key,
    }))
}

struct EvalRag {
    name: String,
    wf: Arc<Workflow>,
    params: Params,
    plan: Plan,
    answer: Arc<Template>,
    grade: Arc<Template>,
    answerer: Arc<dyn ChatProvider>,
    grader: Arc<dyn ChatProvider>,
    grader_key: String,
}

const ANSWER_SCHEMA: &str =
    r#"{"type":"object","properties":{"answer":{"type":"string"}},"required":["answer"],"additionalProperties":false}"#;
const GRADE_SCHEMA: &str = r#"{"type":"object","properties":{"correct":{"type":"boolean"},"reason":{"type":"string"}},"required":["correct","reason"],"additionalProperties":false}"#;

/// The answer in a reply: the JSON `answer` field if there is one, else the whole text.
pub fn parse_answer(text: &str) -> Option<String> {
    let a = match first_json(text) {
        Some(v) => v.get("answer").and_then(Value::as_str).map(str::to_string),
        None => None,
    }
    .unwrap_or_else(|| text.to_string());
    let a = a.trim();
    (!a.is_empty()).then(|| a.to_string())
}

/// The grade in a reply: JSON `correct` (true/false or "yes"/"no"), else a verdict word in prose.
pub fn parse_grade(text: &str) -> Option<(bool, String)> {
    if let Some(v) = first_json(text) {
        let correct = match v.get("correct") {
            Some(Value::Bool(b)) => Some(*b),
            Some(Value::String(s)) => yes_no(s),
            _ => None,
        };
        if let Some(c) = correct {
            return Some((c, v.get("reason").and_then(Value::as_str).unwrap_or_default().to_string()));
        }
    }
    yes_no(text).map(|c| (c, text.trim().chars().take(300).collect()))
}

/// "I don't know" (and its variants): the answer the prompt asks for when the passages lack one.
pub fn abstains(answer: &str) -> bool {
    let a: String = answer.to_lowercase().chars().filter(|c| c.is_alphanumeric() || *c == ' ').collect();
    let a = a.trim();
    ["i dont know", "i do not know", "unknown"].iter().any(|p| a == *p || (a.starts_with(p) && a.len() < p.len() + 40))
}

fn yes_no(s: &str) -> Option<bool> {
    let l = s.to_lowercase();
    let words: Vec<&str> = l.split(|c: char| !c.is_alphanumeric()).filter(|w| !w.is_empty()).collect();
    let has = |w: &str| words.contains(&w);
    if has("incorrect")
        || has("wrong")
        || (has("not") && has("correct"))
        || words.first() == Some(&"no")
        || has("false")
    {
        Some(false)
    } else if has("correct") || words.first() == Some(&"yes") || has("true") {
        Some(true)
    } else {
        None
    }
}

/// One question to answer with one retriever's passages.
struct Item {
    retriever: Retriever,
    model_id: Option<i64>,
    q: usize,
    passages: Vec<usize>,
    hit: bool,
}

#[async_trait]
impl Stage for EvalRag {
    async fn inputs(&self) -> Result<String> {
        let common = self.plan.inputs(&self.wf).await?;
        let (a, g) = (self.answerer.identity(), self.grader.identity());
        Ok(format!(
            "{common}|{}|{}|{}|{}|{}|{}",
            self.answer.hash, self.grade.hash, a.base_url, a.model, g.base_url, g.model
        ))
    }

    async fn run(&self, ctx: &StageCtx) -> Result<Outcome> {
        let p = &self.params;
        let max = p.eval_set.max_queries.map_or(p.max_questions, |m| m.min(p.max_questions));
        let set = self.plan.source.load(&ctx.store, Some(max)).await?;
        let black_box = std::sync::OnceLock::new();
        let account = ctx.account();
        let (items, already) = self.items(ctx, &set, (&account, &black_box)).await?;
        let total = items.len() as u64 + already;
        ctx.progress.set_total(total);
        ctx.progress.cached(already);

        let answerer = Chat::start(&self.wf, &p.model, self.answerer.clone(), ctx)?;
        let grader = match self.grader_key == p.model {
            true => None,
            false => Some(Chat::start(&self.wf, &self.grader_key, self.grader.clone(), ctx)?),
        };
        // Answers first, then grades: a run killed in between finds its answers in the request cache.
        let answers = self.answer(ctx, &answerer, &set, &items).await?;
        let mut out = Writer {
            ctx,
            stage: &self.name,
            set: &set,
            items: &items,
            answers: &answers,
            failed: 0,
            first_error: None,
        };
        self.grade(grader.as_ref().unwrap_or(&answerer), &mut out).await?;
        let (failed, first_error) = (out.failed, out.first_error);

        let mut usage = answerer.usage();
        if let Some(g) = &grader {
            usage = usage + g.usage();
        }
        if let Some(embeddings) = black_box.get().and_then(|b| b.usage()) {
            usage = usage + embeddings;
        }
        let usage = UsageWriter::default().finish(ctx, usage).await?;
        let summary = self.report(ctx, &usage).await?;
        Ok(Outcome {
            summary: json!({
                "eval_set": set.key, "questions": set.queries.len(), "top_k": p.top_k, "retrievers": summary,
                "devices": retrieve_ctx(&self.plan, ctx, (&account, &black_box), false).devices(),
            }),
            failure: failure_verdict(failed, total, p.llm().max_failures, first_error, &ctx.progress),
        })
    }

    /// Not estimated: each prompt holds the passages a retriever (maybe one this run trains first)
    /// picks. The count is bounded, and the plan says so.
    async fn plan(&self, _cx: &PlanCtx<'_>) -> Result<StagePlan> {
        let p = &self.params;
        let max = p.eval_set.max_queries.map_or(p.max_questions, |m| m.min(p.max_questions));
        let n = self.plan.retrievers.len();
        Ok(StagePlan {
            notes: vec![format!(
                "not planned: up to {} requests (an answer and a grade for each of up to {max} questions and {n} retrievers), whose prompts hold passages the retrievers pick at run time",
                2 * max * n
            )],
            ..Default::default()
        })
    }
}

/// One item's answer: the text and its call, or why there is none.
type Answer = Option<std::result::Result<(String, i64), String>>;

impl EvalRag {
    /// Each retriever's top passages for each question not answered yet, and how many were.
    async fn items(
        &self,
        ctx: &StageCtx,
        set: &EvalSet,
        black_box: (&crate::llm::Account, &std::sync::OnceLock<crate::llm::embed::BlackBox>),
    ) -> Result<(Vec<Item>, u64)> {
        let models = self.plan.models(&ctx.store, &self.name).await?;
        let done: HashSet<(String, String)> =
            rag_answers::done(&ctx.store, ctx.stage_run_id).await?.into_iter().collect();
        ctx.progress.log(&format!(
            "eval set {}: {} questions, {} retrievers, top {} passages each",
            set.key,
            set.queries.len(),
            self.plan.retrievers.len(),
            self.params.top_k
        ));
        let cx = retrieve_ctx(&self.plan, ctx, black_box, false);
        let mut items = Vec::new();
        let mut already = 0u64;
        for (&kind, model) in self.plan.retrievers.iter().zip(&models) {
            let hits = retrieve::rank(&cx, set, kind, model.as_ref(), self.params.top_k).await?.hits;
            for (q, h) in hits.into_iter().enumerate() {
                if done.contains(&(kind.name().to_string(), set.query_ids[q].clone())) {
                    already += 1;
                    continue;
                }
                let passages: Vec<usize> = h.iter().map(|x| x.0).collect();
                let hit = passages.iter().any(|d| set.relevant[q].contains(d));
                let model_id = model.as_ref().filter(|_| self.plan.trained_of(kind).is_some()).map(|m| m.id);
                items.push(Item { retriever: kind, model_id, q, passages, hit });
            }
        }
        Ok((items, already))
    }

    /// Answers every item from its passages.
    async fn answer(&self, ctx: &StageCtx, chat: &Chat, set: &EvalSet, items: &[Item]) -> Result<Vec<Answer>> {
        let llm = self.params.llm();
        let params = llm.gen_params(None);
        let schema: Value = serde_json::from_str(ANSWER_SCHEMA).expect("static schema");
        let domain = self.params.domain.clone().unwrap_or_default();
        let requests = items
            .iter()
            .enumerate()
            .map(|(i, it)| {
                let passages: Vec<&str> = it.passages.iter().map(|&d| set.docs[d].as_str()).collect();
                (i as i64, json!({ "question": set.queries[it.q], "passages": passages, "domain": domain }))
            })
            .collect();
        let how = Prompted {
            template: &self.answer,
            system: llm.system.as_deref(),
            params: &params,
            schema: ("rag_answer", &schema),
            accept: |text| parse_answer(text).is_some(),
            score: None,
        };
        let mut answers: Vec<Answer> = vec![None; items.len()];
        let mut rx = chat.launch(super::llm::requests(requests, &how, chat.json)?, 64).await?;
        let mut usage = UsageWriter::default();
        while let Some((i, r)) = rx.recv().await {
            answers[i as usize] = Some(match r? {
                Ok(done) => match parse_answer(&done.answer.text) {
                    Some(a) => Ok((a, done.call_id)),
                    None => Err("the answer was empty".to_string()),
                },
                Err(f) => Err(f.message),
            });
            ctx.progress.message(&format!("answered {}", answers.iter().flatten().count()));
            usage.tick(ctx, || chat.usage()).await?;
        }
        Ok(answers)
    }

    /// Grades every answer and writes each item as its grade arrives; abstentions and failed
    /// answers are written without a grader call.
    async fn grade(&self, chat: &Chat, out: &mut Writer<'_>) -> Result<()> {
        let llm = self.params.llm();
        let params = llm.gen_params(Some(self.params.grade_max_tokens));
        let schema: Value = serde_json::from_str(GRADE_SCHEMA).expect("static schema");
        let domain = self.params.domain.clone().unwrap_or_default();
        let (set, items, answers) = (out.set, out.items, out.answers);
        let requests = items
            .iter()
            .enumerate()
            .filter_map(|(i, it)| match &answers[i] {
                Some(Ok((a, _))) if !abstains(a) => Some((
                    i as i64,
                    json!({
                        "question": set.queries[it.q], "answer": a, "reference": set.references[it.q],
                        "reference_is_answer": set.reference_is_answer(it.q), "domain": domain,
                    }),
                )),
                _ => None,
            })
            .collect();
        let how = Prompted {
            template: &self.grade,
            system: llm.system.as_deref(),
            params: &params,
            schema: ("rag_grade", &schema),
            accept: |text| parse_grade(text).is_some(),
            score: None,
        };
        let mut graded = vec![false; items.len()];
        let mut rx = chat.launch(super::llm::requests(requests, &how, chat.json)?, 64).await?;
        while let Some((i, r)) = rx.recv().await {
            let i = i as usize;
            graded[i] = true;
            match r? {
                Ok(done) => match parse_grade(&done.answer.text) {
                    Some((c, reason)) => {
                        out.write(i, if c { "correct" } else { "incorrect" }, reason, Some(done.call_id)).await?
                    }
                    None => {
                        let why = format!(
                            "no correct/incorrect verdict in the grader's answer: {}",
                            done.answer.text.chars().take(200).collect::<String>()
                        );
                        out.write(i, "failed", why, Some(done.call_id)).await?
                    }
                },
                Err(f) => out.write(i, "failed", format!("grading failed: {}", f.message), None).await?,
            }
        }
        for i in (0..items.len()).filter(|&i| !graded[i]) {
            match &answers[i] {
                // An abstention is wrong by the rubric: no grader call is spent on it.
                Some(Ok((a, _))) if abstains(a) => {
                    out.write(i, "incorrect", "the model did not answer (\"I don't know\")".into(), None).await?
                }
                Some(Err(e)) => out.write(i, "failed", format!("answering failed: {e}"), None).await?,
                _ => out.write(i, "failed", "no answer".into(), None).await?,
            }
        }
        Ok(())
    }

    /// Accuracy per retriever over this stage run's answers: logged as a table, returned for the summary.
    async fn report(&self, ctx: &StageCtx, usage: &UsageSnapshot) -> Result<serde_json::Map<String, Value>> {
        let tallies = rag_answers::tally(&ctx.store, ctx.stage_run_id).await?;
        let mut rows = Vec::new();
        let mut summary = serde_json::Map::new();
        for t in &tallies {
            let (graded, acc, (lo, hi)) = (t.graded(), t.accuracy(), t.interval());
            let hit_rate = t.hits as f64 / (graded + t.failed as u64).max(1) as f64;
            rows.push(vec![
                t.retriever.clone(),
                graded.to_string(),
                t.correct.to_string(),
                format!("{acc:.3}"),
                format!("[{lo:.3}, {hi:.3}]"),
                t.failed.to_string(),
                format!("{hit_rate:.3}"),
            ]);
            summary.insert(
                t.retriever.clone(),
                json!({ "graded": graded, "correct": t.correct, "failed": t.failed, "accuracy": acc,
                        "wilson95": [lo, hi], "hit_rate": hit_rate }),
            );
        }
        ctx.progress.log(&format!(
            "answer accuracy (95% Wilson interval; hit = a relevant passage was retrieved):\n{}",
            crate::text::table(&["retriever", "graded", "correct", "accuracy", "95% CI", "failed", "hit@k"], &rows)
        ));
        ctx.progress.log(&format!(
            "{} calls, {} from cache; read the answers with `flow answers -w {}`",
            usage.calls,
            usage.cached,
            self.wf.path.display()
        ));
        Ok(summary)
    }
}

/// Writes each graded item to `rag_answers` and counts the failures.
struct Writer<'a> {
    ctx: &'a StageCtx,
    stage: &'a str,
    set: &'a EvalSet,
    items: &'a [Item],
    answers: &'a [Answer],
    failed: u64,
    first_error: Option<String>,
}

impl Writer<'_> {
    async fn write(&mut self, i: usize, grade: &str, reason: String, grade_call: Option<i64>) -> Result<()> {
        let (it, set, ctx) = (&self.items[i], self.set, self.ctx);
        let (answer, answer_call) = match &self.answers[i] {
            Some(Ok((a, c))) => (Some(a.as_str()), Some(*c)),
            _ => (None, None),
        };
        let ids: Vec<&str> = it.passages.iter().map(|&d| set.doc_ids[d].as_str()).collect();
        rag_answers::insert(
            &ctx.store,
            &NewAnswer {
                run_id: ctx.run_id,
                stage_run_id: ctx.stage_run_id,
                stage: self.stage,
                eval_set: &set.key,
                retriever: it.retriever.name(),
                model_id: it.model_id,
                question_id: &set.query_ids[it.q],
                question: &set.queries[it.q],
                passages: &serde_json::to_string(&ids).expect("json"),
                hit: it.hit,
                answer,
                answer_call,
                grade,
                reason: Some(&reason),
                grade_call,
            },
        )
        .await?;
        if grade == "failed" {
            self.failed += 1;
            self.first_error.get_or_insert(reason);
            ctx.progress.failed(1);
        } else {
            ctx.progress.done(1);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grades_from_json_and_prose() {
        assert_eq!(parse_grade("{\"correct\": true, \"reason\": \"ok\"}"), Some((true, "ok".into())));
        assert_eq!(parse_grade("{\"correct\": \"no\", \"reason\": \"x\"}").map(|g| g.0), Some(false));
        assert_eq!(parse_grade("The answer is incorrect.").map(|g| g.0), Some(false));
        assert_eq!(parse_grade("This is not correct").map(|g| g.0), Some(false));
        assert_eq!(parse_grade("Yes, it matches.").map(|g| g.0), Some(true));
        assert_eq!(parse_grade("Correct.").map(|g| g.0), Some(true));
        assert_eq!(parse_grade("hmm"), None);
        assert_eq!(parse_answer("{\"answer\": \" 42 \"}").as_deref(), Some("42"));
        assert_eq!(parse_answer("Revenue rose 4%.").as_deref(), Some("Revenue rose 4%."));
        assert_eq!(parse_answer("  "), None);
        assert!(abstains("I don't know.") && abstains("I do not know from these passages"));
        assert!(!abstains("Revenue was $4.2bn; I don't know the margin."));
    }
}
