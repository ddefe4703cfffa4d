//! Okapi BM25 over an in-memory inverted index, with Elasticsearch's `english` analysis (lowercase,
//! stop words, Porter stemming) and its defaults k1 = 1.2, b = 0.75: the lexical baseline of eval_recall.

use std::collections::HashMap;

use rayon::prelude::*;

/// Lucene's English stop words (what Elasticsearch's `english` analyzer removes).
const STOP: &[&str] = &[
    "a", "an", "and", "are", "as", "at", "be", "but", "by", "for", "if", "in", "into", "is", "it", "no", "not", "of",
    "on", "or", "such", "that", "the", "their", "then", "there", "these", "they", "this", "to", "was", "will", "with",
];

/// Lowercased alphanumeric runs, stop words dropped, each stemmed.
pub fn tokens(text: &str, stemmer: &rust_stemmers::Stemmer) -> Vec<String> {
    text.split(|c: char| !c.is_alphanumeric())
        .filter(|t| !t.is_empty())
        .map(str::to_lowercase)
        .filter(|t| !STOP.contains(&t.as_str()))
        .map(|t| stemmer.stem(&t).into_owned())
        .collect()
}

pub struct Bm25 {
    k1: f32,
    b: f32,
    stemmer: rust_stemmers::Stemmer,
    /// term -> (document, term frequency), documents ascending.
    postings: HashMap<String, Vec<(u32, u32)>>,
    lengths: Vec<u32>,
}

impl Default for Bm25 {
    fn default() -> Self {
        Bm25::new(1.2, 0.75)
    }
}

impl Bm25 {
    pub fn new(k1: f32, b: f32) -> Bm25 {
        Bm25 {
            k1,
            b,
            stemmer: rust_stemmers::Stemmer::create(rust_stemmers::Algorithm::English),
            postings: HashMap::new(),
            lengths: Vec::new(),
        }
    }

    /// Indexes the next document (its index is the number added before it).
    pub fn add(&mut self, text: &str) {
        let doc = self.lengths.len() as u32;
        let toks = tokens(text, &self.stemmer);
        self.lengths.push(toks.len() as u32);
        let mut tf: HashMap<String, u32> = HashMap::new();
        for t in toks {
            *tf.entry(t).or_default() += 1;
        }
        for (t, n) in tf {
            self.postings.entry(t).or_default().push((doc, n));
        }
    }

    pub fn len(&self) -> usize {
        self.lengths.len()
    }

    pub fn is_empty(&self) -> bool {
        self.lengths.is_empty()
    }

    /// Lucene's idf: ln(1 + (N - n + 0.5) / (n + 0.5)).
    fn idf(&self, n: usize) -> f32 {
        let total = self.lengths.len() as f32;
        (1.0 + (total - n as f32 + 0.5) / (n as f32 + 0.5)).ln()
    }

    /// Each query's `k` best (document, score), best first; equal scores by document order.
    /// Documents that share no term with the query are not returned.
    pub fn search(&self, queries: &[String], k: usize) -> Vec<Vec<(usize, f32)>> {
        let n = self.lengths.len();
        let avgdl = self.lengths.iter().map(|&l| l as f64).sum::<f64>() as f32 / n.max(1) as f32;
        queries
            .par_iter()
            .map_init(
                || (vec![0f32; n], Vec::<u32>::new()),
                |(scores, touched), q| {
                    for t in tokens(q, &self.stemmer) {
                        let Some(list) = self.postings.get(&t) else { continue };
                        let idf = self.idf(list.len());
                        for &(d, tf) in list {
                            let tf = tf as f32;
                            let norm = self.k1 * (1.0 - self.b + self.b * self.lengths[d as usize] as f32 / avgdl);
                            if scores[d as usize] == 0.0 {
                                touched.push(d);
                            }
                            scores[d as usize] += idf * tf * (self.k1 + 1.0) / (tf + norm);
                        }
                    }
                    let mut hits: Vec<(usize, f32)> =
                        touched.iter().map(|&d| (d as usize, scores[d as usize])).collect();
                    for &d in touched.iter() {
                        scores[d as usize] = 0.0;
                    }
                    touched.clear();
                    hits.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
                    hits.truncate(k);
                    hits
                },
            )
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn analysis_drops_stop_words_and_stems() {
        let s = rust_stemmers::Stemmer::create(rust_stemmers::Algorithm::English);
        assert_eq!(tokens("The Running of the BULLS, in 2025!", &s), ["run", "bull", "2025"]);
    }

    #[test]
    fn scores_match_the_formula_by_hand() {
        let mut bm = Bm25::default();
        for d in ["apple banana", "apple apple cherry date", "cherry"] {
            bm.add(d);
        }
        // "apple": n = 2 of N = 3; lengths 2, 4, 1, avgdl 7/3.
        let idf = (1.0f32 + (3.0 - 2.0 + 0.5) / (2.0 + 0.5)).ln();
        let part = |tf: f32, dl: f32| idf * tf * 2.2 / (tf + 1.2 * (0.25 + 0.75 * dl / (7.0 / 3.0)));
        let got = bm.search(&["apples?".into()], 10);
        assert_eq!(got[0].iter().map(|h| h.0).collect::<Vec<_>>(), [1, 0]);
        assert!((got[0][0].1 - part(2.0, 4.0)).abs() < 1e-6);
        assert!((got[0][1].1 - part(1.0, 2.0)).abs() < 1e-6);
        // A term no document has scores nothing; a query of two terms adds their parts.
        assert!(bm.search(&["zebra".into()], 10)[0].is_empty());
        let both = bm.search(&["apple cherry".into()], 1);
        let idf_c = (1.0f32 + (3.0 - 2.0 + 0.5) / (2.0 + 0.5)).ln();
        let want = part(2.0, 4.0) + idf_c * 2.2 / (1.0 + 1.2 * (0.25 + 0.75 * 4.0 / (7.0 / 3.0)));
        assert_eq!(both[0][0].0, 1);
        assert!((both[0][0].1 - want).abs() < 1e-5);
    }
}
