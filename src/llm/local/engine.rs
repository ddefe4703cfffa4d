//! The embedded chat engine: one llama.cpp model and context on a worker thread, decoding every
//! request in flight together (continuous batching), each in its own sequence, sampler and grammar.
//!
//! Each step adds one token for every sequence that is generating and fills the rest of the batch
//! with the prompts of sequences that are starting, then decodes the batch once (llama.cpp's
//! server does the same). A slot keeps its last prompt in the KV cache, so a new prompt that shares
//! its head (the same instructions before another passage) decodes only what differs.

use std::collections::VecDeque;
use std::num::NonZeroU32;
use std::path::PathBuf;
use std::sync::mpsc;

use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::context::params::LlamaContextParams;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::model::params::LlamaModelParams;
use llama_cpp_2::sampling::LlamaSampler;
use llama_cpp_2::token::LlamaToken;
use llama_cpp_2::token::data::LlamaTokenData;
use llama_cpp_2::token::data_array::LlamaTokenDataArray;

/// How the engine decodes: sequences at once, context per sequence, threads, tokens per decode.
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    pub parallel: usize,
    pub ctx_per_seq: u32,
    pub threads: i32,
    pub batch: u32,
}

/// Sampling of one request (greedy at temperature 0).
#[derive(Debug, Clone, Copy, Default)]
pub struct Sampling {
    pub temperature: f32,
    pub top_p: Option<f32>,
    pub seed: u32,
    pub repeat_penalty: Option<f32>,
}

/// Read the probabilities of these tokens (groups of token ids, e.g. the digits 1 to 5 with and without
/// a leading space) where the answer starts; with `stop`, the answer ends there with the likeliest group.
#[derive(Debug, Clone)]
pub struct Probe {
    pub groups: Vec<Vec<LlamaToken>>,
    pub stop: bool,
}

/// One request: a prompt rendered with the chat template (and any start of the answer appended).
pub struct Job {
    pub prompt: String,
    pub max_tokens: usize,
    pub sampling: Sampling,
    /// A GBNF grammar the answer must follow (root rule `root`).
    pub grammar: Option<String>,
    pub probe: Option<Probe>,
    pub reply: tokio::sync::oneshot::Sender<Result<Output, String>>,
}

/// What the engine answered.
#[derive(Debug, Clone)]
pub struct Output {
    pub text: String,
    pub prompt_tokens: u64,
    /// Prompt tokens the slot's cache already held (a shared head), not decoded again.
    pub reused_tokens: u64,
    pub completion_tokens: u64,
    /// `stop` (end of turn, or the probe's answer) or `length` (max_tokens).
    pub finish: &'static str,
    /// The probe's probability of each group, summing to 1 over the groups, and the share of the
    /// model's whole distribution the groups held.
    pub probe: Option<(Vec<f64>, f64)>,
    /// The prompt was longer than the context allows: its start was cut.
    pub cut_prompt: bool,
}

/// Starts the worker thread. It loads the model on the first request (a run whose answers are all
/// cached never pays for loading), and ends when every sender is gone.
pub fn spawn(path: PathBuf, settings: Settings) -> std::io::Result<mpsc::Sender<Job>> {
    let (tx, rx) = mpsc::channel::<Job>();
    std::thread::Builder::new().name("flow-llama".into()).spawn(move || {
        let Ok(first) = rx.recv() else { return };
        let backend = match super::backend() {
            Ok(b) => b,
            Err(e) => return refuse_all(first, &rx, e),
        };
        // Read, not mapped: the weights are repacked for the CPU's kernels as they load, and a mapped
        // file would keep a second copy of them resident.
        let model = match LlamaModel::load_from_file(backend, &path, &LlamaModelParams::default().with_use_mmap(false))
        {
            Ok(m) => m,
            Err(e) => return refuse_all(first, &rx, &format!("llama.cpp could not load {}: {e}", path.display())),
        };
        let params = LlamaContextParams::default()
            .with_n_ctx(NonZeroU32::new(settings.ctx_per_seq * settings.parallel as u32))
            .with_n_batch(settings.batch)
            .with_n_ubatch(settings.batch)
            .with_n_seq_max(settings.parallel as u32)
            .with_n_threads(settings.threads)
            .with_n_threads_batch(settings.threads);
        let ctx = match model.new_context(backend, params) {
            Ok(c) => c,
            Err(e) => return refuse_all(first, &rx, &format!("llama.cpp could not make a context: {e}")),
        };
        let mut engine = Engine::new(&model, ctx, settings);
        engine.queue.push_back(first);
        engine.run(&rx);
    })?;
    Ok(tx)
}

/// The engine could not start: this request and every later one get `why`.
fn refuse_all(first: Job, rx: &mpsc::Receiver<Job>, why: &str) {
    let _ = first.reply.send(Err(why.to_string()));
    while let Ok(j) = rx.recv() {
        let _ = j.reply.send(Err(why.to_string()));
    }
}

/// A request being answered in one sequence.
struct Task {
    job: Job,
    tokens: Vec<LlamaToken>,
    /// Prompt tokens in the KV cache so far.
    prefilled: usize,
    reused: usize,
    cut: bool,
    generated: Vec<LlamaToken>,
    bytes: Vec<u8>,
    chain: LlamaSampler,
    grammar: Option<LlamaSampler>,
    /// The sampled token still to be decoded (its position is after every token before it).
    pending: Option<LlamaToken>,
    /// This step's index in the batch whose logits it samples from.
    at: Option<i32>,
    probe: Option<(Vec<f64>, f64)>,
}

struct Slot {
    seq: i32,
    /// The tokens this sequence holds in the KV cache, in order.
    cached: Vec<LlamaToken>,
    task: Option<Task>,
}

struct Engine<'m> {
    model: &'m LlamaModel,
    ctx: LlamaContext<'m>,
    settings: Settings,
    slots: Vec<Slot>,
    queue: VecDeque<Job>,
    batch: LlamaBatch<'static>,
}

impl<'m> Engine<'m> {
    fn new(model: &'m LlamaModel, ctx: LlamaContext<'m>, settings: Settings) -> Self {
        let slots = (0..settings.parallel).map(|i| Slot { seq: i as i32, cached: Vec::new(), task: None }).collect();
        let batch = LlamaBatch::new(settings.batch as usize, 1);
        Engine { model, ctx, settings, slots, queue: VecDeque::new(), batch }
    }

    fn run(&mut self, rx: &mpsc::Receiver<Job>) {
        loop {
            let idle = self.slots.iter().all(|s| s.task.is_none());
            if idle && self.queue.is_empty() {
                match rx.recv() {
                    Ok(j) => self.queue.push_back(j),
                    Err(_) => return,
                }
            }
            while let Ok(j) = rx.try_recv() {
                self.queue.push_back(j);
            }
            self.admit();
            if let Err(e) = self.step() {
                self.fail_all(&e);
            }
        }
    }

    /// Gives queued requests to free slots, the slot whose cache shares the longest head first.
    fn admit(&mut self) {
        while !self.queue.is_empty() && self.slots.iter().any(|s| s.task.is_none()) {
            let job = self.queue.pop_front().expect("not empty");
            if job.reply.is_closed() {
                continue;
            }
            let Some((tokens, cut)) = self.tokenize(&job) else {
                let _ = job.reply.send(Err("the prompt is empty".into()));
                continue;
            };
            let free = self.slots.iter().enumerate().filter(|(_, s)| s.task.is_none());
            let (i, _) = free.max_by_key(|(_, s)| common_prefix(&s.cached, &tokens)).expect("a free slot");
            if let Err(e) = self.start(i, job, tokens, cut) {
                self.fail_all(&e);
            }
        }
    }

    /// The prompt's tokens (BOS added where the model wants one and the template did not write it),
    /// cut to the context less `max_tokens` (the end is kept: it holds the question and the start of
    /// the answer), and whether it was cut.
    fn tokenize(&self, job: &Job) -> Option<(Vec<LlamaToken>, bool)> {
        let vocab = self.model.vocab();
        let mut tokens = vocab.tokenize(job.prompt.as_bytes(), false, true);
        if vocab.should_add_bos() && tokens.first() != Some(&vocab.bos()) {
            tokens.insert(0, vocab.bos());
        }
        let room = (self.settings.ctx_per_seq as usize).saturating_sub(job.max_tokens + 1).max(16);
        let cut = tokens.len() > room;
        if cut {
            tokens.drain(..tokens.len() - room);
        }
        (!tokens.is_empty()).then_some((tokens, cut))
    }

    fn start(&mut self, i: usize, job: Job, tokens: Vec<LlamaToken>, cut: bool) -> Result<(), String> {
        // At least the last prompt token is decoded again: its logits start the answer.
        let keep = common_prefix(&self.slots[i].cached, &tokens).min(tokens.len() - 1);
        let seq = self.slots[i].seq;
        self.ctx
            .clear_kv_cache_seq(Some(seq as u32), Some(keep as u32), None)
            .map_err(|e| format!("clearing a sequence's cache: {e}"))?;
        self.slots[i].cached.truncate(keep);
        let grammar = match &job.grammar {
            Some(g) => match LlamaSampler::grammar(self.model, g, "root") {
                Ok(s) => Some(s),
                Err(e) => {
                    let _ = job.reply.send(Err(format!("the answer's grammar does not compile: {e}")));
                    return Ok(());
                }
            },
            None => None,
        };
        let chain = sampler_chain(&job.sampling, self.model.n_vocab());
        self.slots[i].task = Some(Task {
            job,
            tokens,
            prefilled: keep,
            reused: keep,
            cut,
            generated: Vec::new(),
            bytes: Vec::new(),
            chain,
            grammar,
            pending: None,
            at: None,
            probe: None,
        });
        Ok(())
    }

    /// One decode: a token of each generating sequence, then prompt tokens up to the batch size.
    fn step(&mut self) -> Result<(), String> {
        self.batch.clear();
        let cap = self.settings.batch as i32;
        for slot in &mut self.slots {
            let Some(t) = slot.task.as_mut() else { continue };
            t.at = None;
            if let Some(tok) = t.pending.take() {
                let pos = (t.tokens.len() + t.generated.len() - 1) as i32;
                t.at = Some(self.batch.n_tokens());
                self.batch.add(tok, pos, &[slot.seq], true).map_err(|e| e.to_string())?;
                slot.cached.push(tok);
            }
        }
        for slot in &mut self.slots {
            let Some(t) = slot.task.as_mut() else { continue };
            while t.prefilled < t.tokens.len() && self.batch.n_tokens() < cap {
                let last = t.prefilled + 1 == t.tokens.len();
                if last {
                    t.at = Some(self.batch.n_tokens());
                }
                self.batch
                    .add(t.tokens[t.prefilled], t.prefilled as i32, &[slot.seq], last)
                    .map_err(|e| e.to_string())?;
                slot.cached.push(t.tokens[t.prefilled]);
                t.prefilled += 1;
            }
        }
        if self.batch.n_tokens() == 0 {
            return Ok(());
        }
        self.ctx.decode(&mut self.batch).map_err(|e| format!("llama.cpp could not decode: {e}"))?;
        for i in 0..self.slots.len() {
            let Some(at) = self.slots[i].task.as_ref().and_then(|t| t.at) else { continue };
            if let Some(done) = self.sample(i, at) {
                let mut t = self.slots[i].task.take().expect("a task");
                let output = Output {
                    text: String::from_utf8_lossy(&t.bytes).into_owned(),
                    prompt_tokens: t.tokens.len() as u64,
                    reused_tokens: t.reused as u64,
                    completion_tokens: t.generated.len() as u64,
                    finish: done,
                    probe: t.probe.take(),
                    cut_prompt: t.cut,
                };
                let _ = t.job.reply.send(Ok(output));
            }
        }
        Ok(())
    }

    /// Samples the next token of slot `i` from the logits at batch index `at`; Some(finish reason)
    /// once its answer is complete.
    fn sample(&mut self, i: usize, at: i32) -> Option<&'static str> {
        let vocab = self.model.vocab();
        let t = self.slots[i].task.as_mut().expect("a task");
        if t.generated.is_empty()
            && let Some(p) = &t.job.probe
        {
            let (probs, mass) = probe(self.ctx.get_logits_ith(at), &p.groups);
            if p.stop {
                let best = (0..probs.len()).max_by(|&a, &b| probs[a].total_cmp(&probs[b])).unwrap_or(0);
                if let Some(&tok) = p.groups[best].first() {
                    t.bytes.extend(vocab.token_to_piece(tok, false, None));
                    t.generated.push(tok);
                }
                t.probe = Some((probs, mass));
                return Some("stop");
            }
            t.probe = Some((probs, mass));
        }
        let tok = match choose(&self.ctx, at, &mut t.chain, t.grammar.as_mut()) {
            Ok(tok) => tok,
            Err(e) => {
                crate::progress::stderr_line(&format!("local LLM: sampling failed ({e}); the answer ends here"));
                return Some("stop");
            }
        };
        if vocab.is_eog(tok) {
            return Some("stop");
        }
        t.generated.push(tok);
        t.bytes.extend(vocab.token_to_piece(tok, false, None));
        if t.generated.len() >= t.job.max_tokens {
            return Some("length");
        }
        t.pending = Some(tok);
        None
    }

    /// A decode failed: every request in flight gets the error, and the sequences start afresh.
    fn fail_all(&mut self, e: &str) {
        for slot in &mut self.slots {
            if let Some(t) = slot.task.take() {
                let _ = t.job.reply.send(Err(e.to_string()));
            }
            slot.cached.clear();
        }
        self.ctx.clear_kv_cache();
    }
}

fn common_prefix(a: &[LlamaToken], b: &[LlamaToken]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

/// The sampler of one request: penalties, then greedy, or top-p and temperature with its seed.
fn sampler_chain(s: &Sampling, n_vocab: i32) -> LlamaSampler {
    let mut parts = Vec::new();
    if let Some(p) = s.repeat_penalty.filter(|p| *p != 1.0) {
        // Only what the answer repeats of itself: the prompt is never fed to the penalty.
        parts.push(LlamaSampler::penalties(n_vocab, 64, p, 0.0, 0.0));
    }
    if s.temperature > 0.0 {
        if let Some(p) = s.top_p.filter(|p| *p < 1.0) {
            parts.push(LlamaSampler::top_p(p, 1));
        }
        parts.push(LlamaSampler::temp(s.temperature));
        parts.push(LlamaSampler::dist(s.seed));
    } else {
        parts.push(LlamaSampler::greedy());
    }
    LlamaSampler::chain_simple(parts)
}

/// The next token: the chain picks from the whole distribution, and where a grammar rejects that
/// pick, the grammar prunes the distribution first and the chain picks again (llama.cpp's own order:
/// checking one token is far cheaper than pruning a 150k vocabulary at every step).
fn choose(
    ctx: &LlamaContext,
    at: i32,
    chain: &mut LlamaSampler,
    grammar: Option<&mut LlamaSampler>,
) -> Result<LlamaToken, String> {
    let mut cur = ctx.token_data_array_ith(at);
    chain.apply(&mut cur);
    let mut tok = cur.selected_token().ok_or("no token was selected")?;
    if let Some(g) = grammar {
        let mut one = LlamaTokenDataArray::new(vec![LlamaTokenData::new(tok, 1.0, 0.0)], false);
        g.apply(&mut one);
        if !one.data[0].logit().is_finite() {
            let mut cur = ctx.token_data_array_ith(at);
            g.apply(&mut cur);
            chain.apply(&mut cur);
            tok = cur.selected_token().ok_or("the grammar allows no token")?;
        }
        g.try_accept(tok).map_err(|e| e.to_string())?;
    }
    chain.accept(tok);
    Ok(tok)
}

/// Each group's probability among the groups, and the share of all probability they hold.
fn probe(logits: &[f32], groups: &[Vec<LlamaToken>]) -> (Vec<f64>, f64) {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let total: f64 = logits.iter().map(|&l| (l as f64 - max).exp()).sum();
    let mass: Vec<f64> = groups
        .iter()
        .map(|g| g.iter().filter_map(|t| logits.get(t.0 as usize)).map(|&l| (l as f64 - max).exp()).sum())
        .collect();
    let sum: f64 = mass.iter().sum();
    let probs =
        if sum > 0.0 { mass.iter().map(|m| m / sum).collect() } else { vec![1.0 / groups.len() as f64; groups.len()] };
    (probs, sum / total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_probe_reads_each_groups_share_of_the_distribution() {
        // Logits over 6 tokens; groups {1, 4} and {2}: exp(1)+exp(1) against exp(2).
        let logits = [0.0f32, 1.0, 2.0, 0.0, 1.0, -50.0];
        let groups = vec![vec![LlamaToken(1), LlamaToken(4)], vec![LlamaToken(2)]];
        let (p, mass) = probe(&logits, &groups);
        let e = std::f64::consts::E;
        let want = 2.0 * e / (2.0 * e + e * e);
        assert!((p[0] - want).abs() < 1e-9 && (p[0] + p[1] - 1.0).abs() < 1e-12, "{p:?}");
        let all: f64 = logits.iter().map(|&l| (l as f64).exp()).sum();
        assert!((mass - (2.0 * e + e * e) / all).abs() < 1e-9, "{mass}");
        assert_eq!(common_prefix(&[LlamaToken(1), LlamaToken(2)], &[LlamaToken(1), LlamaToken(3)]), 1);
    }
}
