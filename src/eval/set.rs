//! Eval sets: an external BEIR set (human-written queries) or the synthetic pairs of documents the
//! train stage held out; both as queries, a corpus and each query's relevant passages.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::digest::{sha256_file, sha256_hex};
use crate::error::{Error, Result};
use crate::store::pairs::{self, PairSource};
use crate::store::{Store, documents};
use crate::train::data::{self, Example};

/// `eval_set:` of an eval stage. No `beir:` means the synthetic held-out pairs.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SetParams {
    /// A BEIR folder (corpus.jsonl, queries.jsonl, qrels/<split>.tsv), relative to the workflow.
    #[serde(default)]
    pub beir: Option<String>,
    #[serde(default = "default_split")]
    pub split: String,
    /// Synthetic set: which judge verdicts of held-out pairs count as eval queries.
    #[serde(default = "default_verdicts")]
    pub verdicts: Vec<String>,
    /// Synthetic set: the train stage's split (its `seed` and `val_fraction`; defaults are theirs).
    #[serde(default)]
    pub seed: Option<u64>,
    #[serde(default)]
    pub val_fraction: Option<f64>,
    /// Evaluate on the first N queries only (all by default).
    #[serde(default)]
    pub max_queries: Option<usize>,
}

impl Default for SetParams {
    fn default() -> Self {
        serde_json::from_value(serde_json::json!({})).expect("defaults")
    }
}

fn default_split() -> String {
    "test".into()
}
fn default_verdicts() -> Vec<String> {
    vec!["accepted".into()]
}

pub const VERDICTS: &[&str] = &["accepted", "rejected", "failed", "unjudged"];

/// Queries, a corpus and relevance judgements; `key` names the set for comparisons across runs.
#[derive(Debug, Default)]
pub struct EvalSet {
    pub key: String,
    pub query_ids: Vec<String>,
    pub queries: Vec<String>,
    pub doc_ids: Vec<String>,
    pub docs: Vec<String>,
    pub relevant: Vec<HashSet<usize>>,
    /// The reference a RAG answer is graded against: the set's answer, else the relevant passages.
    pub references: Vec<String>,
    /// Whether each reference is an answer given by the set.
    pub answers: Vec<bool>,
}

/// Where the set comes from, resolved against the workflow folder.
#[derive(Debug, Clone)]
pub enum Source {
    Beir {
        dir: PathBuf,
        split: String,
    },
    /// The held-out pairs of the judges and generators `from` names.
    Synthetic {
        verdicts: Vec<String>,
        seed: u64,
        fraction: f64,
        from: PairSource,
    },
}

impl Source {
    /// `train_split` is (seed, val_fraction) of the train stage this eval follows, if any.
    pub fn new(p: &SetParams, wf_dir: &Path, train_split: Option<(u64, f64)>, from: PairSource) -> Result<Source> {
        if let Some(b) = &p.beir {
            // Canonical, so the set's key (and the change column) does not depend on how it was named.
            let dir = wf_dir.join(b);
            let dir = std::fs::canonicalize(&dir).unwrap_or(dir);
            for f in ["corpus.jsonl".to_string(), "queries.jsonl".into(), format!("qrels/{}.tsv", p.split)] {
                if !dir.join(&f).exists() {
                    return Err(Error::bad_input(
                        format!("eval set {} has no {f}", dir.display()),
                        "`eval_set: { beir: PATH, split: test }` names a BEIR folder relative to the workflow",
                    ));
                }
            }
            return Ok(Source::Beir { dir, split: p.split.clone() });
        }
        let (seed, fraction) = train_split.unwrap_or_else(|| {
            let d = crate::train::params::Params::default();
            (d.seed, d.val_fraction)
        });
        Ok(Source::Synthetic {
            verdicts: p.verdicts.clone(),
            seed: p.seed.unwrap_or(seed),
            fraction: p.val_fraction.unwrap_or(fraction),
            from,
        })
    }

    /// A digest of the files a BEIR set is read from (part of the stage fingerprint).
    pub fn files_digest(&self) -> Result<String> {
        match self {
            Source::Beir { dir, split } => {
                let parts = ["corpus.jsonl".to_string(), "queries.jsonl".into(), format!("qrels/{split}.tsv")]
                    .iter()
                    .map(|f| sha256_file(&dir.join(f)).map_err(Error::io(dir.join(f))))
                    .collect::<Result<Vec<String>>>()?;
                Ok(sha256_hex(parts.join("|").as_bytes()))
            }
            Source::Synthetic { .. } => Ok(String::new()),
        }
    }

    pub async fn load(&self, store: &Store, max_queries: Option<usize>) -> Result<EvalSet> {
        let mut set = match self {
            Source::Beir { dir, split } => {
                let (d, s) = (dir.clone(), split.clone());
                let digest = self.files_digest()?;
                let b = tokio::task::spawn_blocking(move || crate::beir::load(&d, &s))
                    .await
                    .map_err(Error::task("reading the BEIR set"))??;
                let mut set = from_beir(b);
                set.key = format!("beir|{}|{split}|{}", dir.display(), &digest[..12]);
                set
            }
            Source::Synthetic { verdicts, seed, fraction, from } => {
                synthetic(store, from, verdicts, *seed, *fraction).await?
            }
        };
        if let Some(n) = max_queries.filter(|&n| n < set.queries.len()) {
            set.query_ids.truncate(n);
            set.queries.truncate(n);
            set.relevant.truncate(n);
            set.references.truncate(n);
            set.answers.truncate(n);
            set.key.push_str(&format!("|first {n}"));
        }
        if set.queries.is_empty() {
            return Err(Error::bad_input(
                "the eval set has no queries with a relevant passage".to_string(),
                match self {
                    Source::Beir { .. } => "check the qrels split".to_string(),
                    Source::Synthetic { .. } => "no judged pairs come from held-out documents yet: add documents, \
                        raise the train stage's val_fraction, widen `verdicts:`, or name a BEIR set with `beir:`"
                        .to_string(),
                },
            ));
        }
        Ok(set)
    }
}

/// Queries that have relevant documents in the split, in queries.jsonl order; the whole corpus.
fn from_beir(b: crate::beir::Beir) -> EvalSet {
    let mut rel: HashMap<usize, HashSet<usize>> = HashMap::new();
    for &(q, d, _) in &b.qrels {
        rel.entry(q).or_default().insert(d);
    }
    let mut set = EvalSet { doc_ids: b.doc_ids, docs: b.doc_texts, ..Default::default() };
    for (q, (id, text)) in b.query_ids.into_iter().zip(b.query_texts).enumerate() {
        let Some(r) = rel.remove(&q) else { continue };
        let reference = match &b.query_answers[q] {
            Some(a) => a.clone(),
            None => r
                .iter()
                .collect::<BTreeSet<_>>()
                .iter()
                .map(|&&d| set.docs[d].as_str())
                .collect::<Vec<_>>()
                .join("\n\n"),
        };
        set.query_ids.push(id);
        set.queries.push(text);
        set.relevant.push(r);
        set.answers.push(b.query_answers[q].is_some());
        set.references.push(reference);
    }
    set
}

/// Pairs from the documents the train stage holds out (its seeded split of the accepted pairs),
/// searched over every live chunk.
async fn synthetic(store: &Store, from: &PairSource, verdicts: &[String], seed: u64, fraction: f64) -> Result<EvalSet> {
    let all = pairs::all(store, from).await?;
    let accepted: Vec<Example> = all
        .iter()
        .filter(|p| p.verdict == "accepted")
        .map(|p| Example {
            query: p.query.clone(),
            positive: p.passage.clone(),
            doc: p.document.clone(),
            negative: None,
        })
        .collect();
    // Held out: every document the seeded hash puts in validation (the train stage trains on none of
    // them, whatever their pairs' verdicts), plus the one its split falls back to.
    let (_, val) = data::split(accepted, seed, fraction);
    let mut held_out: HashSet<String> = val.into_iter().map(|e| e.doc).collect();
    held_out
        .extend(all.iter().filter(|p| data::is_validation(&p.document, seed, fraction)).map(|p| p.document.clone()));
    let chunks = documents::live_chunks(store).await?;
    let index: HashMap<i64, usize> = chunks.iter().enumerate().map(|(i, (id, _))| (*id, i)).collect();
    let mut set = EvalSet::default();
    for (id, text) in chunks {
        set.doc_ids.push(format!("chunk:{id}"));
        set.docs.push(text);
    }
    let mut digest = format!("{seed}|{fraction}|{verdicts:?}");
    let mut position: HashMap<String, usize> = HashMap::new();
    for p in all.iter().filter(|p| held_out.contains(&p.document) && verdicts.contains(&p.verdict)) {
        let Some(&d) = index.get(&p.chunk_id) else { continue };
        // The same question asked of two chunks is one query with two relevant passages.
        if let Some(&q) = position.get(&p.query) {
            set.relevant[q].insert(d);
            continue;
        }
        position.insert(p.query.clone(), set.queries.len());
        digest.push_str(&format!("|{}:{}", p.query_id, p.chunk_id));
        set.query_ids.push(format!("query:{}", p.query_id));
        set.queries.push(p.query.clone());
        set.relevant.push([d].into());
        set.references.push(p.passage.clone());
        set.answers.push(false);
    }
    set.key = format!(
        "synthetic|{}|held out {} of {} docs|{}",
        verdicts.join(","),
        held_out.len(),
        all.iter().map(|p| p.document.as_str()).collect::<HashSet<_>>().len(),
        &sha256_hex(digest.as_bytes())[..12]
    );
    Ok(set)
}

impl EvalSet {
    /// Whether query `q`'s reference is an answer (else it is the relevant passages).
    pub fn reference_is_answer(&self, q: usize) -> bool {
        self.answers.get(q).copied().unwrap_or(false)
    }
}
