//! The `generate` stage: asks an LLM for `per_chunk` grounded questions per chunk, drops
//! non-questions, questions that lean on "the passage" and duplicates across the corpus, and stores
//! each kept question with its provenance. One chunk is one item; a finished chunk is never asked again.

use async_trait::async_trait;
use serde_json::json;

use super::llm::{
    Chat, LlmStage, Prompted, UsageWriter, estimate, failure_verdict, llm_params, prompt, requests, settings_key,
};
use super::{Forecast, Kind, Outcome, PlanCtx, Stage, StageCtx, StagePlan};
use crate::error::Result;
use crate::llm::plan::Planned;
use crate::llm::{self, ChatDone, ChatRequest, LlmFailure};
use crate::prompt::Template;
use crate::store::queries::{self, Generation, NewQuery};
use crate::text::{DupIndex, QueryKind, QueryStatus, extract_questions, first_json, question_list, rule_violation_of};
use crate::workflow::{CheckCtx, Checked, Diagnostic, StageSpec, Workflow, check_typed, checked};

pub const KIND: Kind = Kind {
    name: "generate",
    about: "ask an LLM for grounded questions per chunk; drop non-questions and duplicates",
    check,
    preflight: |spec, wf| templates(spec, wf).map(|_| ()),
    build,
};

llm_params! {
    defaults { temperature: 0.7, max_tokens: 256, max_failures: 0.0 }
    pub struct Params {
        /// A minijinja template, relative to the workflow file (default: the built-in
        /// generate_queries.j2 for an API model, generate_query_local.j2 for a local one).
        #[serde(default)]
        pub prompt: Option<String>,
        #[serde(default = "default_per_chunk")]
        pub per_chunk: u32,
        /// A few words on the domain, given to the prompt.
        #[serde(default)]
        pub domain: Option<String>,
        /// Example questions, given to the prompt.
        #[serde(default)]
        pub examples: Vec<String>,
        /// Jaccard similarity of content words at which a question counts as a near duplicate.
        #[serde(default = "default_near_duplicate")]
        pub near_duplicate: f64,
        /// Ask about at most this many chunks: those whose text hashes lowest, so the sample is
        /// the same on every run and a chunk stays in it while the corpus around it changes.
        #[serde(default)]
        pub sample: Option<usize>,
        /// The kinds of query asked for per chunk: a list (`[question, keywords, claim]`, each
        /// `per_chunk` times) or a map of kind to count. Default: questions only.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub kinds: Option<Kinds>,
    }
}

/// `kinds:` as the YAML writes it.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(untagged)]
pub enum Kinds {
    List(Vec<QueryKind>),
    Counts(std::collections::BTreeMap<QueryKind, u32>),
}

impl Params {
    /// Each kind asked for and how many of it per chunk, in a fixed order.
    pub fn kind_counts(&self) -> Vec<(QueryKind, u32)> {
        match &self.kinds {
            None => vec![(QueryKind::Question, self.per_chunk)],
            Some(Kinds::List(l)) => {
                QueryKind::ALL.into_iter().filter(|k| l.contains(k)).map(|k| (k, self.per_chunk)).collect()
            }
            Some(Kinds::Counts(m)) => m.iter().map(|(k, n)| (*k, *n)).collect(),
        }
    }
}

fn default_per_chunk() -> u32 {
    2
}
fn default_near_duplicate() -> f64 {
    0.85
}

fn check(cx: &CheckCtx) -> Checked {
    let mut diags = Vec::new();
    let Some(mut p) = check_typed::<Params>(cx.node, cx.params.clone(), &mut diags) else { return Err(diags) };
    p.fill_defaults();
    let at = |key: &str| cx.node.get(key).map(|n| n.span()).unwrap_or(cx.node.span());
    let counts = p.kind_counts();
    if counts.is_empty() || counts.iter().any(|(_, n)| !(1..=20).contains(n)) {
        diags.push(
            Diagnostic::new(
                at("kinds"),
                format!("stage `{}`: kinds must name at least one kind, each 1 to 20 times", cx.stage),
            )
            .hint("kinds: [question, keywords, claim], or kinds: { question: 2, claim: 1 }"),
        );
    }
    if !(1..=20).contains(&p.per_chunk) {
        diags.push(
            Diagnostic::new(at("per_chunk"), format!("stage `{}`: per_chunk must be 1 to 20", cx.stage))
                .hint("2 to 5 is usual"),
        );
    }
    p.llm().check(cx, &mut diags);
    if p.sample == Some(0) {
        diags.push(
            Diagnostic::new(at("sample"), format!("stage `{}`: sample must be at least 1", cx.stage))
                .hint("leave `sample` out to ask about every chunk"),
        );
    }
    if !(p.near_duplicate > 0.0 && p.near_duplicate <= 1.0) {
        diags.push(
            Diagnostic::new(at("near_duplicate"), format!("stage `{}`: near_duplicate must be in (0, 1]", cx.stage))
                .hint("0.85 drops rewordings; 1.0 drops only exact repeats"),
        );
    }
    checked(&p, diags)
}

/// The prompt, rendered once against its documented variables.
fn templates(spec: &StageSpec, wf: &Workflow) -> Result<(Params, Template)> {
    let params: Params = spec.params()?;
    let sample =
        json!({ "chunk": "", "title": "", "path": "", "n": 2, "domain": "", "examples": [""], "kind": "question" });
    let files = ("generate_queries.j2", "generate_query_local.j2");
    let template = prompt(wf, &params.model, params.prompt.as_deref(), files, sample)?;
    Ok((params, template))
}

fn build(spec: &StageSpec, wf: &Workflow) -> Result<Box<dyn Stage>> {
    let (params, template) = templates(spec, wf)?;
    let model = params.model.clone();
    LlmStage::build(spec, wf, (params, template), &model)
}

type Generate = LlmStage<Params>;

/// Request ids are chunk id * KIND_SLOTS + the kind's index, so every kind asked of a chunk has an id.
const KIND_SLOTS: i64 = 8;

/// One kind's answer about a chunk.
type Answer = std::result::Result<ChatDone, LlmFailure>;

const QUERIES_SCHEMA: &str = r#"{"type":"object","properties":{"queries":{"type":"array","items":{"type":"string"}}},"required":["queries"],"additionalProperties":false}"#;

#[async_trait]
impl Stage for Generate {
    async fn inputs(&self) -> Result<String> {
        Ok(self.inputs_digest())
    }

    async fn run(&self, ctx: &StageCtx) -> Result<Outcome> {
        // `sample` decides which chunks are asked, not what an answer is: raising it keeps the
        // questions made so far (lowering it keeps them too).
        let settings = settings_key(&self.params, &["sample"], &self.template, self.provider.identity());
        let superseded = queries::activate(&ctx.store, &self.name, &settings).await?;
        if superseded > 0 {
            ctx.progress.log(&format!(
                "the settings changed: {superseded} questions made with other settings are superseded (kept in the store, not used)"
            ));
        }
        let chunks = sampled(queries::input_chunks(&ctx.store, &self.inputs_from).await?, self.params.sample);
        let done = queries::done_chunks(&ctx.store, &self.name, &settings).await?;
        let todo: Vec<_> = chunks.iter().filter(|c| !done.contains(&c.id)).cloned().collect();
        ctx.progress.set_total(chunks.len() as u64);
        ctx.progress.cached((chunks.len() - todo.len()) as u64);

        let chat = Chat::start(&self.wf, &self.params.model, self.provider.clone(), ctx)?;
        let mut dups = DupIndex::new(self.params.near_duplicate);
        for q in queries::kept_texts(&ctx.store, &self.name).await? {
            dups.check_and_add(&q);
        }
        let kinds = self.params.kind_counts();
        let mut results = chat.launch(self.requests(todo, chat.json)?, 256).await?;
        let mut tally = Tally::default();
        let mut usage = UsageWriter::default();
        // A chunk is one item: it is written once every kind asked of it has its answer.
        let mut answered: std::collections::HashMap<i64, Vec<(QueryKind, Answer)>> = Default::default();
        while let Some((item, outcome)) = results.recv().await {
            let (chunk_id, kind) = (item / KIND_SLOTS, kinds[(item % KIND_SLOTS) as usize].0);
            let got = answered.entry(chunk_id).or_default();
            got.push((kind, outcome?));
            if got.len() == kinds.len() {
                let got = answered.remove(&chunk_id).unwrap_or_default();
                let g = self.generation(chunk_id, &settings, got, &mut dups);
                queries::write_generation(&ctx.store, &self.name, &g).await?;
                tally.add(&g, &ctx.progress);
            }
            usage.tick(ctx, || chat.usage()).await?;
        }
        let usage = usage.finish(ctx, chat.usage()).await?;
        let by_status: serde_json::Map<String, serde_json::Value> =
            queries::drop_counts(&ctx.store, &self.name).await?.into_iter().map(|(k, v)| (k, v.into())).collect();
        let Tally { kept, dropped, failed, first_error } = tally;
        let no_question = queries::chunks_without_questions(&ctx.store, &self.name, &settings).await?;
        ctx.progress.log(&format!(
            "{} chunks: {kept} questions kept, {dropped} dropped this run; {failed} chunks failed; {} calls, {} from cache",
            chunks.len(),
            usage.calls,
            usage.cached
        ));
        if no_question > 0 {
            ctx.progress.log(&format!(
                "warning: {no_question} of {} chunks have no kept question (every question dropped; `flow pairs` and the queries table say why)",
                chunks.len()
            ));
        }
        let summary = json!({
            "chunks": chunks.len(), "kept": kept, "dropped": dropped, "failed": failed,
            "chunks_without_questions": no_question, "queries_by_status": by_status,
        });
        let max_failures = self.params.llm().max_failures;
        Ok(Outcome {
            summary,
            failure: failure_verdict(failed, chunks.len() as u64, max_failures, first_error, &ctx.progress),
        })
    }

    /// What a run would ask now: the chunks in the store (or those an upstream chunk stage would
    /// cut) that have no result under these settings and whose request the cache does not answer.
    async fn plan(&self, cx: &PlanCtx<'_>) -> Result<StagePlan> {
        let settings = settings_key(&self.params, &["sample"], &self.template, self.provider.identity());
        let mut notes = Vec::new();
        let cut: Vec<_> = cx
            .forecasts()
            .flat_map(|f| match f {
                Forecast::Chunks(c) => c.as_slice(),
                _ => &[],
            })
            .cloned()
            .collect();
        let (chunks, done) = if cut.is_empty() {
            let chunks = queries::input_chunks(cx.store, &self.inputs_from).await?;
            (chunks, queries::done_chunks(cx.store, &self.name, &settings).await?)
        } else {
            notes.push("its chunks are the ones the chunk stage before it would cut now".into());
            (cut, Default::default())
        };
        let chunks = sampled(chunks, self.params.sample);
        let todo: Vec<_> = chunks.iter().filter(|c| !done.contains(&c.id)).cloned().collect();
        let forecast = match cx.forecast {
            true => Some(self.forecast(cx, &todo, settings).await?),
            false => None,
        };
        let n_todo = todo.len() as u64;
        let json = llm::writes_json(&self.wf, &self.params.model)?;
        let planned: Vec<Planned> = self.requests(todo, json)?.into_iter().map(|(_, r)| Planned::known(r)).collect();
        let est = estimate(cx, &self.params.model, self.provider.as_ref(), &planned).await?;
        Ok(StagePlan { items: chunks.len() as u64, todo: n_todo, llm: Some(est), notes, forecast })
    }
}

/// Tokens of a question not yet written, where no kept question gives a measure (a one-line question).
const QUESTION_TOKENS: u64 = 16;

impl Generate {
    /// The questions a run would write, for the judge after it: at most per_chunk of each chunk
    /// asked, of the length its kept questions have.
    async fn forecast(&self, cx: &PlanCtx<'_>, todo: &[queries::InputChunk], settings: String) -> Result<Forecast> {
        let kinds = self.params.kind_counts();
        let about = todo
            .iter()
            .flat_map(|c| {
                kinds.iter().flat_map(move |&(kind, n)| {
                    let q = crate::store::judgments::JudgeInput {
                        query_id: 0,
                        query: String::new(),
                        kind,
                        chunk: c.text.clone(),
                        title: c.title.clone(),
                        path: c.path.clone(),
                    };
                    std::iter::repeat_n(q, n as usize)
                })
            })
            .collect();
        let (query_tokens, basis) = match queries::kept_mean_chars(cx.store, &self.name).await? {
            Some(chars) => ((chars / 4.0).ceil() as u64, "the mean length of this stage's kept questions".to_string()),
            None => (QUESTION_TOKENS, format!("{QUESTION_TOKENS} tokens a question (no questions yet to measure)")),
        };
        Ok(Forecast::Questions { stage: self.name.clone(), settings, about, query_tokens, basis })
    }

    /// One request per chunk; `json`: whether the model is asked for JSON.
    fn requests(&self, todo: Vec<queries::InputChunk>, json: bool) -> Result<Vec<(i64, ChatRequest)>> {
        let p = &self.params;
        let llm = p.llm();
        let gen_params = llm.gen_params(None);
        let mut all = Vec::new();
        for (slot, (kind, n)) in p.kind_counts().into_iter().enumerate() {
            let mut schema: serde_json::Value = serde_json::from_str(QUERIES_SCHEMA).expect("static schema");
            if self.provider.identity().provider == crate::workflow::Provider::Local {
                // The local engine's grammar stops the list at this many (an API's structured output
                // may not take maxItems).
                schema["properties"]["queries"]["maxItems"] = json!(n);
            }
            let items = todo
                .iter()
                .map(|c| {
                    let vars = json!({
                        "chunk": c.text, "title": c.title.clone().unwrap_or_default(), "path": c.path,
                        "n": n, "domain": p.domain.clone().unwrap_or_default(), "examples": p.examples,
                        "kind": kind.name(),
                    });
                    (c.id * KIND_SLOTS + slot as i64, vars)
                })
                .collect();
            let how = Prompted {
                template: &self.template,
                system: llm.system.as_deref(),
                params: &gen_params,
                schema: ("queries", &schema),
                accept: answer_parses,
                score: None,
            };
            all.extend(requests(items, &how, json)?);
        }
        Ok(all)
    }

    /// One chunk's result: its queries of every kind asked, each kept or dropped with the reason,
    /// or why it failed (any kind's answer failing fails the chunk; the others are in the cache).
    fn generation(
        &self,
        chunk_id: i64,
        settings: &str,
        answers: Vec<(QueryKind, Answer)>,
        dups: &mut DupIndex,
    ) -> Generation {
        let llm = self.params.llm();
        let id = self.provider.identity();
        let mut g = Generation {
            chunk_id,
            settings: settings.to_string(),
            call_id: None,
            model: id.model.clone(),
            prompt_hash: self.template.hash.clone(),
            params: String::new(),
            queries: Vec::new(),
            error: None,
        };
        let counts = self.params.kind_counts();
        let mut kept_here = Vec::new();
        for (kind, outcome) in answers {
            let wanted = counts.iter().find(|(k, _)| *k == kind).map_or(0, |c| c.1);
            match kept_of(kind, wanted, outcome, llm.max_tokens, dups, &mut kept_here) {
                Ok((call_id, response_id, qs)) => {
                    g.call_id.get_or_insert(call_id);
                    g.queries.extend(qs);
                    g.params = json!({
                        "provider": id.provider, "base_url": id.base_url, "temperature": llm.temperature,
                        "top_p": llm.top_p, "max_tokens": llm.max_tokens, "seed": llm.seed, "response_id": response_id,
                    })
                    .to_string();
                }
                Err(e) => {
                    g.error.get_or_insert(e);
                }
            }
        }
        if g.error.is_some() {
            // Asked again on resume (from the cache for the kinds that answered), so nothing is written now.
            g.queries.clear();
            for q in kept_here {
                dups.forget(&q);
            }
        }
        g
    }
}

/// One kind's answer about a chunk as queries (each kept or dropped by the rules and the duplicate
/// index), with its call and response id; or why it gives none.
fn kept_of(
    kind: QueryKind,
    wanted: u32,
    outcome: Answer,
    max_tokens: u32,
    dups: &mut DupIndex,
    kept: &mut Vec<String>,
) -> std::result::Result<(i64, Option<String>, Vec<NewQuery>), String> {
    let done = outcome.map_err(|f| f.message)?;
    match done.answer.finish_reason.as_deref() {
        Some("length") => {
            return Err(format!(
                "the answer was cut off at max_tokens = {max_tokens} (finish_reason: length); raise max_tokens"
            ));
        }
        Some("content_filter") => return Err("the server's content filter stopped the answer".into()),
        _ if !answer_parses(&done.answer.text) => {
            return Err(format!(
                "the answer did not parse (cut off or malformed JSON); it is asked again on resume: {}",
                done.answer.text.chars().take(200).collect::<String>()
            ));
        }
        _ => {}
    }
    let mut out = Vec::new();
    let mut n_kept = 0;
    for q in extract_questions(&done.answer.text) {
        let status = if n_kept >= wanted {
            Some(QueryStatus::OverQuota)
        } else {
            rule_violation_of(&q, kind).or_else(|| dups.check_and_add(&q))
        };
        if status.is_none() {
            n_kept += 1;
            kept.push(q.clone());
        }
        out.push(NewQuery { text: q, kind, status: status.unwrap_or(QueryStatus::Kept) });
    }
    Ok((done.call_id, done.answer.response_id, out))
}

/// The chunks `sample` keeps (all without one), in their stored order.
fn sampled(chunks: Vec<queries::InputChunk>, sample: Option<usize>) -> Vec<queries::InputChunk> {
    let Some(n) = sample.filter(|n| *n < chunks.len()) else { return chunks };
    let mut keyed: Vec<(String, queries::InputChunk)> =
        chunks.into_iter().map(|c| (crate::digest::sha256_hex(c.text.as_bytes()), c)).collect();
    keyed.sort_by(|a, b| a.0.cmp(&b.0));
    let mut kept: Vec<queries::InputChunk> = keyed.into_iter().take(n).map(|(_, c)| c).collect();
    kept.sort_by_key(|c| c.id);
    kept
}

/// Whether an answer parsed: JSON holding a list of questions (an empty list is an answer too), or
/// plain prose (its lines are the candidates; the rules judge them). JSON cut off mid-way is neither.
pub fn answer_parses(text: &str) -> bool {
    match first_json(text) {
        Some(v) => question_list(&v).is_some(),
        None => !text.contains('{') && !text.contains('[') && !text.trim().is_empty(),
    }
}

/// What this run of the stage did, for its summary.
#[derive(Default)]
struct Tally {
    kept: u64,
    dropped: u64,
    failed: u64,
    first_error: Option<String>,
}

impl Tally {
    fn add(&mut self, g: &Generation, progress: &crate::progress::StageProgress) {
        match &g.error {
            Some(e) => {
                self.failed += 1;
                progress.failed(1);
                self.first_error.get_or_insert_with(|| e.clone());
            }
            None => {
                progress.done(1);
                let k = g.queries.iter().filter(|q| q.status == QueryStatus::Kept).count() as u64;
                self.kept += k;
                self.dropped += g.queries.len() as u64 - k;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::answer_parses;

    #[test]
    fn a_cut_off_answer_does_not_parse() {
        assert!(answer_parses(r#"{"queries": ["What was revenue in 2024?", "Who audits the firm?"]}"#));
        assert!(answer_parses(r#"{"queries": []}"#));
        assert!(answer_parses("1. What was revenue in 2024?\n2. Who audits the firm?"));
        assert!(!answer_parses(r#"{"queries": ["What was revenue in 2024?", "How did"#));
        assert!(!answer_parses(r#"["What was revenue"#));
        assert!(answer_parses("What was revenue"), "prose: the rules decide what is a question");
        assert!(!answer_parses("  "));
    }
}
