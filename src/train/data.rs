//! Training examples, the validation split held out by document, batches with no repeated text (a
//! repeated passage in a batch would be counted as its own negative), what the labels say is relevant
//! (never taught as a negative), and hard negatives mined with the black box.

use std::collections::{HashMap, HashSet};

use crate::digest::sha256_hex;
use crate::error::{Error, Result};

#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    pub query: String,
    pub positive: String,
    /// The document the passage comes from: the unit of the validation split.
    pub doc: String,
    /// A hard negative mined with the black box, if mining is on.
    pub negative: Option<String>,
}

/// Whether a document is held out for validation: a seeded hash, so the same documents are held out
/// on every run and by the evaluation stages.
pub fn is_validation(doc: &str, seed: u64, fraction: f64) -> bool {
    let h = sha256_hex(format!("{seed}|{doc}").as_bytes());
    let x = u64::from_str_radix(&h[..12], 16).unwrap_or(0) as f64 / (1u64 << 48) as f64;
    x < fraction
}

/// Splits by document. With at least two documents and a non-zero fraction, at least one is held out.
pub fn split(examples: Vec<Example>, seed: u64, fraction: f64) -> (Vec<Example>, Vec<Example>) {
    let (mut train, mut val): (Vec<_>, Vec<_>) =
        examples.into_iter().partition(|e| !is_validation(&e.doc, seed, fraction));
    if val.is_empty() && fraction > 0.0 {
        let docs: HashSet<&str> = train.iter().map(|e| e.doc.as_str()).collect();
        if docs.len() >= 2 {
            // The document that hashes lowest is the one nearest to being held out.
            let doc = docs.iter().min_by_key(|d| sha256_hex(format!("{seed}|{d}").as_bytes())).map(|d| d.to_string());
            let (t, v) = train.into_iter().partition(|e| Some(&e.doc) != doc.as_ref());
            (train, val) = (t, v);
        }
    }
    (train, val)
}

/// Batches of indices into `examples` for one epoch: a seeded shuffle, then each batch filled with
/// examples whose query, positive and negative texts are not already in it.
pub fn batches(examples: &[Example], size: usize, seed: u64, epoch: usize) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..examples.len()).collect();
    fastrand::Rng::with_seed(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ epoch as u64).shuffle(&mut order);
    let mut out = Vec::new();
    let size = size.max(1);
    while !order.is_empty() {
        let mut batch = Vec::with_capacity(size);
        let mut seen: HashSet<&str> = HashSet::new();
        let mut rest = Vec::with_capacity(order.len());
        for &i in &order {
            let e = &examples[i];
            let texts = [Some(e.query.as_str()), Some(e.positive.as_str()), e.negative.as_deref()];
            if batch.len() < size && texts.iter().flatten().all(|t| !seen.contains(t)) {
                seen.extend(texts.iter().flatten());
                batch.push(i);
            } else {
                rest.push(i);
            }
        }
        out.push(batch);
        order = rest;
    }
    out
}

/// A retrieval task built from examples: unique queries, unique passages (the corpus) and each
/// query's relevant passages.
#[derive(Debug, Default)]
pub struct RetrievalSet {
    pub queries: Vec<String>,
    pub corpus: Vec<String>,
    pub relevant: Vec<HashSet<usize>>,
    /// The corpus as the encoder's passages (MaxP) and the document each belongs to; empty: the
    /// corpus as it is.
    pub passages: Vec<String>,
    pub owners: Vec<usize>,
}

impl RetrievalSet {
    /// What validation embeds: the passages, or the documents when there are none.
    pub fn searched(&self) -> (&[String], std::borrow::Cow<'_, [usize]>) {
        if self.passages.is_empty() {
            (&self.corpus, (0..self.corpus.len()).collect::<Vec<_>>().into())
        } else {
            (&self.passages, std::borrow::Cow::Borrowed(&self.owners))
        }
    }
}

/// Distractors a validation search runs over at most (a seeded sample of them beyond this).
pub const MAX_DISTRACTORS: usize = 2_000;

/// Queries from `queries`, searched over the passages of `queries` and `extra_corpus` together,
/// and over `distractors` (the rest of the corpus the retriever will face: without them validation
/// is far easier than real search, and what it chooses, like the hybrid alpha, would not carry over).
pub fn retrieval_set(queries: &[Example], extra_corpus: &[Example], distractors: &[String], seed: u64) -> RetrievalSet {
    let mut set = RetrievalSet::default();
    let mut corpus_index: HashMap<&str, usize> = HashMap::new();
    for e in queries.iter().chain(extra_corpus) {
        corpus_index.entry(e.positive.as_str()).or_insert_with(|| {
            set.corpus.push(e.positive.clone());
            set.corpus.len() - 1
        });
    }
    let mut extra: Vec<&String> = distractors.iter().filter(|d| !corpus_index.contains_key(d.as_str())).collect();
    extra.sort();
    extra.dedup();
    if extra.len() > MAX_DISTRACTORS {
        fastrand::Rng::with_seed(seed).shuffle(&mut extra);
        extra.truncate(MAX_DISTRACTORS);
        extra.sort();
    }
    set.corpus.extend(extra.into_iter().cloned());
    let mut query_index: HashMap<&str, usize> = HashMap::new();
    for e in queries {
        let qi = *query_index.entry(e.query.as_str()).or_insert_with(|| {
            set.queries.push(e.query.clone());
            set.relevant.push(HashSet::new());
            set.queries.len() - 1
        });
        set.relevant[qi].insert(corpus_index[e.positive.as_str()]);
    }
    set
}

/// For each example, the passage the black box ranks highest among the others' passages that is not
/// one of its query's positives and scores at least `margin` below its own positive.
pub fn mine_negatives(examples: &mut [Example], bb: &HashMap<String, Vec<f32>>, margin: f64) -> Result<usize> {
    let mut passages: Vec<&str> = examples.iter().map(|e| e.positive.as_str()).collect();
    passages.sort();
    passages.dedup();
    let passages: Vec<String> = passages.into_iter().map(str::to_string).collect();
    let mut positives: HashMap<&str, Vec<&str>> = HashMap::new();
    for e in examples.iter() {
        positives.entry(e.query.as_str()).or_default().push(e.positive.as_str());
    }
    let rows = |texts: &[String]| -> Vec<f32> { texts.iter().flat_map(|t| super::normalized(&bb[t])).collect() };
    let queries: Vec<String> = examples.iter().map(|e| e.query.clone()).collect();
    let dim = bb.values().next().map_or(0, Vec::len);
    let q = rows(&queries);
    let d = rows(&passages);
    let k = 30.min(passages.len());
    let top = crate::rank::search::top_k(&q, &d, dim, k).map_err(Error::tensor("mining hard negatives"))?;
    let mut found = 0;
    let negatives: Vec<Option<String>> = examples
        .iter()
        .zip(&top)
        .map(|(e, cands)| {
            let pos: f32 = super::normalized(&bb[&e.query])
                .iter()
                .zip(super::normalized(&bb[&e.positive]))
                .map(|(a, b)| a * b)
                .sum();
            let own = &positives[e.query.as_str()];
            cands
                .iter()
                .find(|(j, s)| !own.contains(&passages[*j].as_str()) && (*s as f64) < pos as f64 - margin)
                .map(|(j, _)| passages[*j].clone())
        })
        .collect();
    for (e, n) in examples.iter_mut().zip(negatives) {
        found += n.is_some() as usize;
        e.negative = n;
    }
    Ok(found)
}

/// What the labels say is relevant, from every training pair: each query's documents (all its
/// qrels), and each passage's document. In a batch, another pair's passage whose document is
/// relevant to a query, or comes from the same document as the query's own passage (another chunk
/// of it, for generated pairs), is not taught as that query's negative: it is masked out of the
/// query's softmax. Without this, a query with many relevant documents learns to push away the ones
/// it was not paired with in this batch.
#[derive(Debug, Default)]
pub struct Relevance {
    docs: HashMap<String, HashSet<String>>,
    doc_of: HashMap<String, String>,
}

impl Relevance {
    pub fn new(examples: &[Example]) -> Relevance {
        let mut r = Relevance::default();
        for e in examples {
            r.docs.entry(e.query.clone()).or_default().insert(e.doc.clone());
            r.doc_of.entry(e.positive.clone()).or_insert_with(|| e.doc.clone());
        }
        r
    }

    /// The (query row, passage column) entries of a batch's score matrix that must not count as
    /// negatives; rows are `batch`'s queries, columns its positives then its hard negatives, in the
    /// order `step::batch_texts` lays them out. A query's own positive is never among them.
    pub fn masked(&self, examples: &[Example], batch: &[usize]) -> Vec<(usize, usize)> {
        let columns: Vec<Option<&str>> = batch
            .iter()
            .map(|&i| Some(examples[i].doc.as_str()))
            .chain(
                batch
                    .iter()
                    .filter_map(|&i| examples[i].negative.as_deref())
                    .map(|n| self.doc_of.get(n).map(String::as_str)),
            )
            .collect();
        let mut out = Vec::new();
        for (row, &i) in batch.iter().enumerate() {
            let e = &examples[i];
            let relevant = self.docs.get(&e.query);
            for (col, doc) in columns.iter().enumerate() {
                let Some(doc) = doc else { continue };
                if col != row && (*doc == e.doc || relevant.is_some_and(|r| r.contains(*doc))) {
                    out.push((row, col));
                }
            }
        }
        out
    }
}

/// The (query row, passage column) entries of a batch whose passage the black box scores within
/// `margin` of the row's own positive (cosine): likely relevant passages the labels do not name (a
/// medical query can have dozens of relevant documents and its labels one), so not taught as
/// negatives. Label-free, it covers what `Relevance` cannot know. Texts without a vector are skipped.
pub fn likely_positives(
    queries: &[&str],
    passages: &[&str],
    bb: &HashMap<String, Vec<f32>>,
    margin: f64,
) -> Vec<(usize, usize)> {
    let unit = |t: &str| bb.get(t).map(|v| super::normalized(v));
    let ps: Vec<Option<Vec<f32>>> = passages.iter().map(|p| unit(p)).collect();
    let dot = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f32>() as f64;
    let mut out = Vec::new();
    for (row, q) in queries.iter().enumerate() {
        let (Some(q), Some(Some(own))) = (unit(q), ps.get(row)) else { continue };
        let bar = dot(&q, own) - margin;
        for (col, p) in ps.iter().enumerate() {
            if col != row && p.as_ref().is_some_and(|p| dot(&q, p) > bar) {
                out.push((row, col));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ex(q: &str, p: &str, doc: &str) -> Example {
        Example { query: q.into(), positive: p.into(), doc: doc.into(), negative: None }
    }

    #[test]
    fn batches_hold_no_repeated_text_and_cover_everything() {
        let mut data = Vec::new();
        for i in 0..50 {
            // Every passage is shared by two queries.
            data.push(ex(&format!("q{i}"), &format!("p{}", i / 2), "d"));
        }
        let bs = batches(&data, 8, 1, 0);
        let mut all: Vec<usize> = bs.concat();
        all.sort();
        assert_eq!(all, (0..50).collect::<Vec<_>>());
        for b in &bs {
            let passages: HashSet<&str> = b.iter().map(|&i| data[i].positive.as_str()).collect();
            assert_eq!(passages.len(), b.len());
            assert!(b.len() <= 8);
        }
        assert_eq!(bs, batches(&data, 8, 1, 0));
        assert_ne!(bs, batches(&data, 8, 1, 1));
    }

    #[test]
    fn split_holds_out_whole_documents() {
        let data: Vec<Example> =
            (0..200).map(|i| ex(&format!("q{i}"), &format!("p{i}"), &format!("d{}", i % 20))).collect();
        let (train, val) = split(data, 3, 0.2);
        assert!(!val.is_empty() && !train.is_empty());
        let val_docs: HashSet<&str> = val.iter().map(|e| e.doc.as_str()).collect();
        assert!(train.iter().all(|e| !val_docs.contains(e.doc.as_str())));
        let set = retrieval_set(&val, &train, &[], 1);
        assert_eq!(set.corpus.len(), 200);
        assert!(set.relevant.iter().all(|r| r.len() == 1));
    }

    /// Two queries share a relevant document: q0 is paired with A and B, q1 with B. In a batch
    /// holding (q0, A) and (q1, B), B is relevant to q0 and must not be its negative; A is not
    /// known to be relevant to q1 and stays its negative. Chunks of one document mask each other.
    #[test]
    fn labelled_positives_are_never_negatives() {
        let mut data = vec![ex("q0", "A", "a"), ex("q1", "B", "b"), ex("q0", "B", "b"), ex("q2", "C", "c")];
        data.push(ex("q3", "C2", "c"));
        let rel = Relevance::new(&data);
        assert_eq!(rel.masked(&data, &[0, 1, 3]), vec![(0, 1)]);
        // q2's C and q3's C2 are two chunks of document c.
        assert_eq!(rel.masked(&data, &[3, 4, 0]), vec![(0, 1), (1, 0)]);
        // Hard negatives are columns too: q1's negative A is fine for q1 and q0's own document.
        data[0].negative = Some("C".into());
        data[1].negative = Some("A".into());
        // Columns: A (q0's), B (q1's), then the negatives C (q0's) and A (q1's).
        assert_eq!(rel.masked(&data, &[0, 1]), vec![(0, 1), (0, 3)]);
        // Nothing shared, nothing masked.
        let plain = vec![ex("x", "X", "dx"), ex("y", "Y", "dy")];
        assert!(Relevance::new(&plain).masked(&plain, &[0, 1]).is_empty());
    }

    /// Two queries on one topic whose labels name one passage each, while the other's passage is as
    /// close to them as their own (an unlabelled positive), and a third on another topic. The guard
    /// keeps the unlabelled positives out of the negatives, and only them; a passage just outside
    /// the margin stays a negative.
    #[test]
    fn the_black_box_guard_leaves_out_unlabelled_positives() {
        let v = |x: f32, y: f32| vec![x, y];
        let bb: HashMap<String, Vec<f32>> = [
            ("q0", v(1.0, 0.0)),
            ("q1", v(1.0, 0.05)),
            ("q2", v(0.0, 1.0)),
            ("A", v(0.9, 0.44)),  // q0's positive: cos 0.898 to q0
            ("B", v(0.92, 0.40)), // q1's positive: cos 0.917 to q0, 0.935 to q1
            ("C", v(0.30, 0.95)), // q2's positive: far from q0 and q1
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        let got = likely_positives(&["q0", "q1", "q2"], &["A", "B", "C"], &bb, 0.05);
        // B is above q0's bar, A within 0.05 of q1's own; C is far below both, and q2's bar.
        assert_eq!(got, vec![(0, 1), (1, 0)]);
        // With no margin, B still beats A for q0 (a passage scored above the positive itself),
        // but A is now below q1's bar.
        assert_eq!(likely_positives(&["q0", "q1", "q2"], &["A", "B", "C"], &bb, 0.0), vec![(0, 1)]);
        // A text the black box has no vector for is left alone.
        assert!(likely_positives(&["q0", "zz"], &["A", "B"], &bb, 0.05).iter().all(|&(r, _)| r == 0));
    }
}
