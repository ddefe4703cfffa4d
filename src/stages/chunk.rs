//! The `chunk` stage: reads a corpus (folder or globs) into documents and cuts token-aware,
//! overlapping chunks at paragraph and sentence bounds. Documents are keyed by content hash.

use std::collections::{HashMap, HashSet, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use tokenizers::Tokenizer;

use super::{Forecast, Kind, Outcome, PlanCtx, Stage, StageCtx, StagePlan};
use crate::corpus::{self, Document, JsonlFields, split::split};
use crate::digest::sha256_hex;
use crate::error::{Error, Result};
use crate::store::documents::{self, DocState, DocWrite};
use crate::store::queries::InputChunk;
use crate::workflow::{CheckCtx, Checked, Diagnostic, ModelSpec, Provider, StageSpec, Workflow, check_typed, checked};

pub const KIND: Kind = Kind {
    name: "chunk",
    about: "read a corpus folder or globs (txt, md, html, pdf, jsonl) into token-aware overlapping chunks",
    check,
    preflight: super::no_preflight,
    build,
};

/// Bumped when the way chunks are cut changes, so stored chunks are re-cut.
const CHUNKER_VERSION: u32 = 1;
/// Documents per transaction: small enough that a kill loses little, large enough to write fast.
const BATCH_DOCS: usize = 64;
const BATCH_BYTES: usize = 4 << 20;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Corpus {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Params {
    /// A folder (read recursively) or glob patterns, relative to the workflow file.
    pub corpus: Corpus,
    #[serde(default = "default_max_tokens")]
    pub max_tokens: usize,
    #[serde(default = "default_overlap")]
    pub overlap: usize,
    /// A tokenizer.json path or a model name; by default the local black box's tokenizer, else the
    /// default embedder's.
    #[serde(default)]
    pub tokenizer: Option<String>,
    #[serde(default)]
    pub jsonl: JsonlFields,
}

fn default_max_tokens() -> usize {
    256
}
fn default_overlap() -> usize {
    32
}

fn check(cx: &CheckCtx) -> Checked {
    let mut diags = Vec::new();
    let Some(p) = check_typed::<Params>(cx.node, cx.params.clone(), &mut diags) else {
        return Err(diags);
    };
    let at = |key: &str| cx.node.get(key).map(|n| n.span()).unwrap_or(cx.node.span());
    if p.max_tokens < 8 {
        diags.push(
            Diagnostic::new(at("max_tokens"), format!("stage `{}`: max_tokens must be at least 8", cx.stage))
                .hint("256 suits most embedding models"),
        );
    } else if p.overlap >= p.max_tokens {
        diags.push(
            Diagnostic::new(
                at("overlap"),
                format!(
                    "stage `{}`: overlap ({}) must be less than max_tokens ({})",
                    cx.stage, p.overlap, p.max_tokens
                ),
            )
            .hint("an overlap of about an eighth of max_tokens is usual, e.g. 32 for 256"),
        );
    }
    checked(&p, diags)
}

fn build(spec: &StageSpec, wf: &Workflow) -> Result<Box<dyn Stage>> {
    let params: Params = spec.params()?;
    let tokenizer_path = match &params.tokenizer {
        Some(t) if t.ends_with(".json") => wf.dir.join(t),
        Some(name) => crate::models::resolve(name, &wf.dir, "tokenizer.json")?.join("tokenizer.json"),
        None => {
            // The local black box's own tokenizer, so chunks fit its window; an API black box's
            // tokenizer is not to be had, so the default embedder's stands in.
            let name = match wf.models.get("black_box") {
                Some(ModelSpec { provider: Some(Provider::Local), model: Some(m), .. }) => m.clone(),
                _ => crate::workflow::DEFAULT_EMBEDDER.to_string(),
            };
            crate::models::resolve(&name, &wf.dir, "tokenizer.json")?.join("tokenizer.json")
        }
    };
    let tokenizer = load_tokenizer(&tokenizer_path)?;
    let tokenizer_hash = sha256_hex(&std::fs::read(&tokenizer_path).map_err(Error::io(&tokenizer_path))?);
    let patterns = match &params.corpus {
        Corpus::One(p) => vec![p.clone()],
        Corpus::Many(ps) => ps.clone(),
    };
    let config = serde_json::json!({
        "v": CHUNKER_VERSION, "max_tokens": params.max_tokens, "overlap": params.overlap,
        "tokenizer": tokenizer_hash, "jsonl": params.jsonl,
    });
    Ok(Box::new(Chunk {
        stage: spec.name.clone(),
        root: wf.dir.clone(),
        patterns,
        params,
        tokenizer: Arc::new(tokenizer),
        chunk_config: sha256_hex(config.to_string().as_bytes()),
        listing: Mutex::new(None),
        walk_skips: Mutex::new(Vec::new()),
    }))
}

/// Loads a tokenizer.json with truncation and padding off: the chunker needs true lengths.
pub fn load_tokenizer(path: &Path) -> Result<Tokenizer> {
    let mut tok = Tokenizer::from_file(path).map_err(|e| {
        Error::bad_input(
            format!("cannot load tokenizer {}: {e}", path.display()),
            "point `tokenizer:` at a Hugging Face tokenizer.json, or run `flow models pull`",
        )
    })?;
    tok.with_truncation(None).map_err(Error::tokenizer(format!("{}: turning off truncation", path.display())))?;
    tok.with_padding(None);
    Ok(tok)
}

struct Chunk {
    stage: String,
    root: PathBuf,
    patterns: Vec<String>,
    params: Params,
    tokenizer: Arc<Tokenizer>,
    chunk_config: String,
    /// The corpus as hashed for the fingerprint, reused by `run`.
    listing: Mutex<Option<Vec<FileJob>>>,
    /// What the folder walk could not read (unreadable folders, symlink loops), with the reasons.
    walk_skips: Mutex<Vec<(String, String)>>,
}

impl Chunk {
    /// (key relative to the corpus root, absolute path) of every corpus file, sorted; what the walk
    /// could not read is kept in `walk_skips`.
    fn files(&self) -> Result<Vec<(String, PathBuf)>> {
        let mut out = Vec::new();
        let mut skips = Vec::new();
        for pat in &self.patterns {
            let full = self.root.join(pat);
            if full.is_dir() {
                let base = full.clone();
                let mut found = Vec::new();
                std::fs::read_dir(&full).map_err(Error::io(&full))?;
                walk(&full, &base, &mut found, &mut skips);
                for p in found {
                    let ext = p.extension().and_then(|e| e.to_str()).map(str::to_ascii_lowercase).unwrap_or_default();
                    if corpus::EXTENSIONS.contains(&ext.as_str()) {
                        let rel = p.strip_prefix(&base).unwrap_or(&p).to_string_lossy().into_owned();
                        out.push((rel, p));
                    }
                }
            } else {
                let pattern = full.to_string_lossy().into_owned();
                let paths = glob::glob(&pattern).map_err(|e| {
                    Error::bad_input(
                        format!("stage `{}`: bad corpus pattern `{pat}`: {e}", self.stage),
                        "use a folder or a glob like `docs/**/*.md`",
                    )
                })?;
                let mut n = 0;
                for p in paths.flatten() {
                    if p.is_file() {
                        n += 1;
                        let rel = p.strip_prefix(&self.root).unwrap_or(&p).to_string_lossy().into_owned();
                        out.push((rel, p));
                    }
                }
                if n == 0 && !pat.contains(['*', '?', '[']) {
                    return Err(Error::bad_input(
                        format!("stage `{}`: corpus `{pat}` does not exist ({})", self.stage, full.display()),
                        "paths in a workflow are relative to the workflow file",
                    ));
                }
            }
        }
        out.sort();
        out.dedup_by(|a, b| a.1 == b.1);
        skips.sort();
        *self.walk_skips.lock().expect("skips lock") = skips;
        Ok(out)
    }
}

/// Every file below `dir`. A folder or entry that cannot be read, a symlink that cannot be followed
/// (a loop, a missing target) and a symlink to a folder (not followed: it could loop) are skips with
/// their reason; the walk goes on.
fn walk(dir: &Path, base: &Path, out: &mut Vec<PathBuf>, skips: &mut Vec<(String, String)>) {
    let rel = |p: &Path| p.strip_prefix(base).unwrap_or(p).to_string_lossy().into_owned();
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) => return skips.push((format!("{}/", rel(dir)), format!("unreadable folder: {e}"))),
    };
    for entry in entries {
        let entry = match entry {
            Ok(e) => e,
            Err(e) => {
                skips.push((format!("{}/", rel(dir)), format!("unreadable folder entry: {e}")));
                continue;
            }
        };
        if entry.file_name().to_string_lossy().starts_with('.') {
            continue;
        }
        let path = entry.path();
        match entry.file_type() {
            Ok(ty) if ty.is_symlink() => match std::fs::metadata(&path) {
                Ok(m) if m.is_dir() => skips.push((
                    rel(&path),
                    "symlink to a folder: not followed (it could loop); list that folder in `corpus:`".into(),
                )),
                Ok(_) => out.push(path),
                Err(e) => skips
                    .push((rel(&path), format!("symlink that cannot be followed (a loop or a missing target): {e}"))),
            },
            Ok(ty) if ty.is_dir() => walk(&path, base, out, skips),
            Ok(_) => out.push(path),
            Err(e) => skips.push((rel(&path), format!("unreadable: {e}"))),
        }
    }
}

#[async_trait]
impl Stage for Chunk {
    async fn inputs(&self) -> Result<String> {
        let files = self.files()?;
        let hashed = tokio::task::spawn_blocking(move || {
            files
                .into_iter()
                .map(|(rel, path)| {
                    let hash = crate::digest::sha256_file(&path);
                    (rel, path, hash)
                })
                .collect::<Vec<_>>()
        })
        .await
        .map_err(Error::task("reading the corpus"))?;
        // An unreadable file still changes the fingerprint (the stage then reports it as skipped).
        let mut digest: Vec<(String, String)> = hashed
            .iter()
            .map(|(r, _, h)| (r.clone(), h.as_ref().map_or_else(|e| format!("unreadable: {e}"), Clone::clone)))
            .collect();
        let walk_skips = self.walk_skips.lock().expect("skips lock").clone();
        digest.extend(walk_skips);
        let hashed: Vec<(String, PathBuf, Option<String>)> =
            hashed.into_iter().map(|(r, p, h)| (r, p, h.ok())).collect();
        let d = sha256_hex(serde_json::to_string(&digest).expect("serialise").as_bytes());
        *self.listing.lock().expect("listing lock") = Some(hashed);
        Ok(format!("{d}:{}", self.chunk_config))
    }

    async fn run(&self, ctx: &StageCtx) -> Result<Outcome> {
        // The fingerprint already hashed every file: workers reuse those hashes instead of hashing again.
        let files: Vec<FileJob> = match self.listing.lock().expect("listing lock").take() {
            Some(l) => l,
            None => self.files()?.into_iter().map(|(r, p)| (r, p, None)).collect(),
        };
        let known = Arc::new(documents::state(&ctx.store, &self.stage).await?);
        ctx.progress.set_total(files.len() as u64);
        let mut skipped: Vec<(String, String)> = Vec::new();
        for (key, reason) in self.walk_skips.lock().expect("skips lock").iter() {
            ctx.progress.log(&format!("skipped {key}: {reason}"));
            skipped.push((key.clone(), reason.clone()));
        }
        // Walk skips are not documents the store knew: only the others count against `seen`.
        let walk_skipped = skipped.len();

        let queue = Arc::new(Mutex::new(files.into_iter().collect::<VecDeque<_>>()));
        let (tx, mut rx) = tokio::sync::mpsc::channel::<FileResult>(64);
        let workers = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2);
        for _ in 0..workers {
            let job = Worker { queue: queue.clone(), cutter: self.cutter(known.clone()), tx: tx.clone() };
            tokio::task::spawn_blocking(move || job.run());
        }
        drop(tx);

        let mut got = Gathered { skipped, ..Default::default() };
        while let Some(res) = rx.recv().await {
            got.take(ctx, &self.stage, res).await?;
        }
        got.written += flush(ctx, &self.stage, &mut got.pending).await?;
        let Gathered { seen, mut skipped, written: written_docs, unchanged, bytes, .. } = got;

        let gone: Vec<i64> =
            known.values().filter(|d| d.status != "gone" && !seen.contains(&d.path)).map(|d| d.id).collect();
        documents::mark_gone(&ctx.store, &gone).await?;
        let chunks = documents::count_chunks(&ctx.store, &self.stage).await?;
        skipped.sort();
        let documents_live = (seen.len() + walk_skipped).saturating_sub(skipped.len());
        ctx.progress.log(&format!(
            "{} documents ({} new or changed, {} unchanged, {} gone), {} chunks, {} skipped",
            documents_live,
            written_docs,
            unchanged,
            gone.len(),
            chunks,
            skipped.len()
        ));
        let summary = serde_json::json!({
            "documents": documents_live,
            "written": written_docs,
            "unchanged": unchanged,
            "gone": gone.len(),
            "chunks": chunks,
            "bytes": bytes,
            "skipped": skipped.iter().map(|(p, r)| serde_json::json!({"path": p, "reason": r})).collect::<Vec<_>>(),
        });
        Ok(Outcome { summary, failure: None })
    }

    /// The chunks a run would leave, cut in memory: every live document's (the stages after it
    /// check the cache for each), with how many documents are new or changed.
    async fn plan(&self, cx: &PlanCtx<'_>) -> Result<StagePlan> {
        if !cx.forecast {
            return Ok(StagePlan::default());
        }
        let files = self.files()?;
        let known = documents::state(cx.store, &self.stage).await?;
        // Knowing no document, the cutter cuts them all: the stages after it need every chunk.
        let cutter = self.cutter(Default::default());
        let cut = tokio::task::spawn_blocking(move || {
            let (mut chunks, mut docs, mut changed) = (Vec::new(), 0u64, 0u64);
            for (rel, path) in files {
                for w in cutter.file(&rel, &path, None).writes {
                    let Ok(cs) = w.chunks else { continue };
                    docs += 1;
                    let current = known.get(&w.path).is_some_and(|d| {
                        d.content_hash == w.content_hash && d.chunk_config == w.chunk_config && d.status == "active"
                    });
                    changed += u64::from(!current);
                    for c in cs {
                        let id = -(chunks.len() as i64) - 1;
                        chunks.push(InputChunk { id, text: c.text, title: w.title.clone(), path: w.path.clone() });
                    }
                }
            }
            (chunks, docs, changed)
        });
        let (chunks, docs, changed) = cut.await.map_err(Error::task("cutting the corpus for the plan"))?;
        Ok(StagePlan {
            items: docs,
            todo: changed,
            llm: None,
            notes: vec![format!("{} chunks", chunks.len())],
            forecast: Some(Forecast::Chunks(chunks)),
        })
    }
}

impl Chunk {
    fn cutter(&self, known: Arc<HashMap<String, DocState>>) -> Cutter {
        Cutter {
            known,
            tokenizer: self.tokenizer.clone(),
            params: self.params.clone(),
            chunk_config: self.chunk_config.clone(),
        }
    }
}

/// Commits the pending documents in one transaction; returns how many were chunked (not skipped).
async fn flush(ctx: &StageCtx, stage: &str, pending: &mut Vec<DocWrite>) -> Result<u64> {
    if pending.is_empty() {
        return Ok(0);
    }
    documents::write_batch(&ctx.store, stage, pending).await?;
    let (ok, bad) = pending.iter().fold((0, 0), |(o, b), w| if w.chunks.is_ok() { (o + 1, b) } else { (o, b + 1) });
    ctx.progress.done(ok);
    ctx.progress.skipped(bad);
    pending.clear();
    Ok(ok)
}

/// A corpus file to read: key, path, and its content hash if the fingerprint already computed it.
type FileJob = (String, PathBuf, Option<String>);

/// What one corpus file turned into.
/// What the writer has gathered from the reader threads so far.
#[derive(Default)]
struct Gathered {
    /// Every document key found (stored, unchanged or skipped): the others are gone.
    seen: HashSet<String>,
    pending: Vec<DocWrite>,
    pending_bytes: usize,
    written: u64,
    unchanged: u64,
    bytes: u64,
    skipped: Vec<(String, String)>,
}

impl Gathered {
    /// Takes one file's result; writes the documents pending once a transaction's worth is there.
    async fn take(&mut self, ctx: &StageCtx, stage: &str, res: FileResult) -> Result<()> {
        if res.docs > 1 {
            let c = ctx.progress.counts();
            ctx.progress.set_total(c.total as u64 + res.docs as u64 - 1);
        }
        self.bytes += res.bytes;
        self.unchanged += res.unchanged.len() as u64;
        ctx.progress.cached(res.unchanged.len() as u64);
        self.seen.extend(res.unchanged);
        for w in res.writes {
            self.seen.insert(w.path.clone());
            if let Err(reason) = &w.chunks {
                ctx.progress.log(&format!("skipped {}: {reason}", w.path));
                self.skipped.push((w.path.clone(), reason.clone()));
            }
            self.pending_bytes += w.chunks.as_ref().map(|c| c.iter().map(|c| c.text.len()).sum()).unwrap_or(0);
            self.pending.push(w);
        }
        for (key, reason) in res.known_skips {
            self.seen.insert(key.clone());
            self.skipped.push((key, reason));
            ctx.progress.skipped(1);
        }
        if self.pending.len() >= BATCH_DOCS || self.pending_bytes >= BATCH_BYTES {
            self.written += flush(ctx, stage, &mut self.pending).await?;
            self.pending_bytes = 0;
        }
        Ok(())
    }
}

struct FileResult {
    docs: usize,
    bytes: u64,
    writes: Vec<DocWrite>,
    /// Keys of documents stored before with the same content and settings: no work.
    unchanged: Vec<String>,
    /// Keys and reasons of documents skipped before for the same content.
    known_skips: Vec<(String, String)>,
}

/// One reader thread: takes files off the queue and sends what each became.
struct Worker {
    queue: Arc<Mutex<VecDeque<FileJob>>>,
    cutter: Cutter,
    tx: tokio::sync::mpsc::Sender<FileResult>,
}

/// Reads a corpus file into documents and chunks, skipping those the store holds unchanged.
struct Cutter {
    known: Arc<HashMap<String, DocState>>,
    tokenizer: Arc<Tokenizer>,
    params: Params,
    chunk_config: String,
}

impl Worker {
    fn run(self) {
        loop {
            let Some((rel, path, hash)) = self.queue.lock().expect("queue lock").pop_front() else {
                return;
            };
            let res = self.cutter.file(&rel, &path, hash);
            if self.tx.blocking_send(res).is_err() {
                return;
            }
        }
    }
}

impl Cutter {
    fn is_current(&self, key: &str, hash: &str) -> Option<&DocState> {
        self.known
            .get(key)
            .filter(|d| d.content_hash == hash && d.chunk_config == self.chunk_config && d.status != "gone")
    }

    fn file(&self, rel: &str, path: &Path, known_hash: Option<String>) -> FileResult {
        let mut res = FileResult { docs: 1, bytes: 0, writes: vec![], unchanged: vec![], known_skips: vec![] };
        let bytes = match std::fs::read(path) {
            Ok(b) => b,
            Err(e) => {
                res.writes.push(skip_write(rel, "", &self.chunk_config, 0, format!("cannot read: {e}")));
                return res;
            }
        };
        res.bytes = bytes.len() as u64;
        let file_hash = known_hash.unwrap_or_else(|| sha256_hex(&bytes));
        let is_jsonl = path.extension().is_some_and(|e| e.eq_ignore_ascii_case("jsonl"));
        if !is_jsonl && let Some(d) = self.is_current(rel, &file_hash) {
            if d.status == "skipped" {
                let reason = "unchanged since it was skipped".to_string();
                res.known_skips.push((rel.to_string(), reason));
            } else {
                res.unchanged.push(rel.to_string());
            }
            return res;
        }
        let docs = corpus::read(rel, path, &bytes, &self.params.jsonl);
        res.docs = docs.len();
        for doc in docs {
            match doc {
                Ok(doc) => {
                    let hash = if is_jsonl { doc_hash(&doc) } else { file_hash.clone() };
                    if is_jsonl && self.is_current(&doc.key, &hash).is_some() {
                        res.unchanged.push(doc.key);
                        continue;
                    }
                    let chunks = split(&doc, &self.tokenizer, self.params.max_tokens, self.params.overlap);
                    let doc_bytes = if is_jsonl { doc.text.len() as i64 } else { bytes.len() as i64 };
                    res.writes.push(DocWrite {
                        path: doc.key,
                        title: doc.title,
                        content_hash: hash,
                        chunk_config: self.chunk_config.clone(),
                        bytes: doc_bytes,
                        chunks,
                    });
                }
                Err((key, reason)) => {
                    res.writes.push(skip_write(&key, &file_hash, &self.chunk_config, bytes.len() as i64, reason))
                }
            }
        }
        res
    }
}

fn skip_write(key: &str, hash: &str, config: &str, bytes: i64, reason: String) -> DocWrite {
    DocWrite {
        path: key.to_string(),
        title: None,
        content_hash: hash.to_string(),
        chunk_config: config.to_string(),
        bytes,
        chunks: Err(reason),
    }
}

fn doc_hash(doc: &Document) -> String {
    sha256_hex(format!("{}\0{}", doc.title.as_deref().unwrap_or(""), doc.text).as_bytes())
}
