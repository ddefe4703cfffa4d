//! Text rules for generated queries: normalisation, cheap quality rules, exact and near-duplicate
//! detection across a corpus, and tolerant extraction of JSON from model output.

use std::collections::{HashMap, HashSet};

use serde_json::Value;

/// Lower case, letters and digits only, single spaces: the form duplicates are compared in.
pub fn normalise(s: &str) -> String {
    s.to_lowercase()
        .chars()
        .map(|c| if c.is_alphanumeric() { c } else { ' ' })
        .collect::<String>()
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

const QUESTION_WORDS: &[&str] = &[
    "what", "how", "why", "when", "where", "which", "who", "whom", "whose", "is", "are", "was", "were", "does", "do",
    "did", "can", "could", "should", "would", "will", "has", "have", "had",
];

const CONTEXT_PHRASES: &[&str] = &[
    "this question",
    "the question",
    "you like me to",
    "the passage",
    "this passage",
    "the text",
    "this text",
    "the document",
    "this document",
    "the above",
    "the given",
    "this section",
    "the section above",
    "the excerpt",
    "this excerpt",
    "the context",
    "mentioned above",
    "the article",
    "this article",
    "the author",
    "the paragraph",
    "this paragraph",
];

/// What became of a generated query: kept, or why it was dropped (stored in `queries.status` as
/// the same snake_case text it serialises to).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize, sqlx::Type)]
#[serde(rename_all = "snake_case")]
#[sqlx(rename_all = "snake_case")]
pub enum QueryStatus {
    Kept,
    TooShort,
    TooLong,
    RefersToContext,
    NotAQuestion,
    Duplicate,
    NearDuplicate,
    /// More questions than were asked for: the first ones are kept.
    OverQuota,
}

/// The kinds of query generate can ask for: how people search differs, and a retriever trained on
/// one kind alone learns only that one.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize, sqlx::Type,
)]
#[serde(rename_all = "snake_case")]
#[sqlx(rename_all = "snake_case")]
pub enum QueryKind {
    /// A question the passage answers ("What was cloud revenue in 2025?").
    Question,
    /// A few search keywords ("cloud revenue 2025 growth").
    Keywords,
    /// A statement the passage supports or refutes ("Cloud revenue grew 12% in 2025.").
    Claim,
}

impl QueryKind {
    pub const ALL: [QueryKind; 3] = [QueryKind::Question, QueryKind::Keywords, QueryKind::Claim];

    pub fn name(self) -> &'static str {
        match self {
            QueryKind::Question => "question",
            QueryKind::Keywords => "keywords",
            QueryKind::Claim => "claim",
        }
    }
}

/// Why a candidate query is dropped by the cheap rules, if it is (a question).
pub fn rule_violation(q: &str) -> Option<QueryStatus> {
    rule_violation_of(q, QueryKind::Question)
}

/// Why a candidate query of `kind` is dropped by the cheap rules, if it is: too short or long for
/// its kind, leaning on "the passage", or (a question) not a question.
pub fn rule_violation_of(q: &str, kind: QueryKind) -> Option<QueryStatus> {
    let n = normalise(q);
    let words: Vec<&str> = n.split(' ').filter(|w| !w.is_empty()).collect();
    let (min, max) = match kind {
        QueryKind::Question => (3, 60),
        QueryKind::Keywords => (2, 16),
        QueryKind::Claim => (4, 60),
    };
    if words.len() < min {
        return Some(QueryStatus::TooShort);
    }
    if words.len() > max {
        return Some(QueryStatus::TooLong);
    }
    let padded = format!(" {n} ");
    if CONTEXT_PHRASES.iter().any(|p| padded.contains(&format!(" {p} "))) {
        return Some(QueryStatus::RefersToContext);
    }
    if kind == QueryKind::Question && !q.trim_end().ends_with('?') && !QUESTION_WORDS.contains(&words[0]) {
        return Some(QueryStatus::NotAQuestion);
    }
    None
}

const STOP: &[&str] = &[
    "a", "an", "the", "of", "in", "on", "for", "to", "and", "or", "is", "are", "was", "were", "what", "how", "which",
    "did", "does", "do", "by", "at", "with", "from", "its", "it", "that", "this", "as", "be", "s",
];

fn content_words(normalised: &str) -> HashSet<String> {
    normalised.split(' ').filter(|w| !w.is_empty() && !STOP.contains(w)).map(str::to_string).collect()
}

/// Remembers kept queries and says whether a new one repeats one of them, exactly (after
/// normalisation) or nearly (Jaccard similarity of content words at or above the threshold).
/// Near-duplicate candidates come from MinHash locality-sensitive hashing (16 bands of 8 rows: a pair
/// at similarity 0.85 is a candidate with probability 0.994, one at 0.5 with 0.06), and every candidate is checked
/// exactly, so the cost per query stays flat as the corpus grows instead of scanning all queries.
pub struct DupIndex {
    threshold: f64,
    exact: HashSet<String>,
    sets: Vec<HashSet<String>>,
    buckets: HashMap<(usize, u64), Vec<usize>>,
}

const BANDS: usize = 16;
const ROWS: usize = 8;

impl DupIndex {
    pub fn new(threshold: f64) -> DupIndex {
        DupIndex { threshold, exact: HashSet::new(), sets: Vec::new(), buckets: HashMap::new() }
    }

    /// `None` if new (and now remembered), else the reason it is a duplicate.
    pub fn check_and_add(&mut self, q: &str) -> Option<QueryStatus> {
        let n = normalise(q);
        if self.exact.contains(&n) {
            return Some(QueryStatus::Duplicate);
        }
        let words = content_words(&n);
        let keys = band_keys(&words);
        let mut seen = HashSet::new();
        for key in &keys {
            for &i in self.buckets.get(key).into_iter().flatten() {
                let gone = self.sets[i].is_empty();
                if seen.insert(i) && !gone && jaccard(&words, &self.sets[i]) >= self.threshold {
                    return Some(QueryStatus::NearDuplicate);
                }
            }
        }
        let i = self.sets.len();
        for key in keys {
            self.buckets.entry(key).or_default().push(i);
        }
        self.sets.push(words);
        self.exact.insert(n);
        None
    }

    /// Forgets a query added before (one that was not stored after all), so it makes nothing else a
    /// duplicate.
    pub fn forget(&mut self, q: &str) {
        let n = normalise(q);
        if !self.exact.remove(&n) {
            return;
        }
        let words = content_words(&n);
        // An emptied set is similar to nothing (a Jaccard of 0), so its bucket entries can stay.
        if let Some(set) = self.sets.iter_mut().rev().find(|s| **s == words) {
            set.clear();
        }
    }
}

/// One bucket key per band: the hash of that band's rows of the MinHash signature.
fn band_keys(words: &HashSet<String>) -> Vec<(usize, u64)> {
    let word_hashes: Vec<u64> = words.iter().map(|w| fnv1a(w.as_bytes())).collect();
    (0..BANDS)
        .map(|band| {
            let mut key = 0xcbf29ce484222325u64;
            for row in 0..ROWS {
                let seed = (band * ROWS + row) as u64;
                let min = word_hashes.iter().map(|h| mix(h ^ seed.wrapping_mul(0x9e3779b97f4a7c15))).min().unwrap_or(0);
                key = (key ^ min).wrapping_mul(0x100000001b3);
            }
            (band, key)
        })
        .collect()
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf29ce484222325u64, |h, b| (h ^ *b as u64).wrapping_mul(0x100000001b3))
}

/// splitmix64's finaliser: a cheap, well-spread permutation of u64.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58476d1ce4e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d049bb133111eb);
    z ^ (z >> 31)
}

pub fn jaccard(a: &HashSet<String>, b: &HashSet<String>) -> f64 {
    if a.is_empty() && b.is_empty() {
        return 1.0;
    }
    let inter = a.intersection(b).count() as f64;
    inter / ((a.len() + b.len()) as f64 - inter)
}

/// The first JSON object or array in a model's answer, ignoring prose and code fences around it.
pub fn first_json(text: &str) -> Option<Value> {
    for (i, c) in text.char_indices() {
        if c == '{' || c == '[' {
            let mut stream = serde_json::Deserializer::from_str(&text[i..]).into_iter::<Value>();
            if let Some(Ok(v)) = stream.next() {
                return Some(v);
            }
        }
    }
    None
}

/// `text` cut right after the `max_items`-th item of the first array inside its first JSON object,
/// with the open brackets closed: `{"queries": ["a", "b", "c` with 2 gives `{"queries": ["a", "b"]}`.
/// None until that many items are complete. Lets a local model stop once it has written what was asked.
pub fn json_cut(text: &str, max_items: usize) -> Option<String> {
    let start = text.find('{')?;
    let (mut stack, mut in_string, mut escaped, mut items) = (Vec::<char>::new(), false, false, 0usize);
    // The depth of the array being counted (the first one opened), once it is open.
    let mut counted: Option<usize> = None;
    for (i, c) in text[start..].char_indices() {
        let at = start + i;
        if in_string {
            match (escaped, c) {
                (true, _) => escaped = false,
                (false, '\\') => escaped = true,
                (false, '"') => {
                    in_string = false;
                    if counted == Some(stack.len()) {
                        items += 1;
                        if items == max_items {
                            let closers: String =
                                stack.iter().rev().map(|&o| if o == '[' { ']' } else { '}' }).collect();
                            return Some(format!("{}{closers}", &text[..=at]));
                        }
                    }
                }
                _ => {}
            }
            continue;
        }
        match c {
            '"' => in_string = true,
            '{' => stack.push('{'),
            '[' => {
                stack.push('[');
                counted.get_or_insert(stack.len());
            }
            '}' | ']' => {
                if counted == Some(stack.len()) {
                    return None;
                }
                stack.pop();
                if stack.is_empty() {
                    return None;
                }
            }
            _ => {}
        }
    }
    None
}

/// The list of questions in a JSON answer: the value itself, or its `queries` (or `questions`,
/// `query`, `question`) field.
pub fn question_list(v: &Value) -> Option<&Vec<Value>> {
    match v {
        Value::Array(a) => Some(a),
        Value::Object(o) => ["queries", "questions", "query", "question"].iter().find_map(|k| o.get(*k)?.as_array()),
        _ => None,
    }
}

/// Questions in a model's answer: a JSON list (or `{"queries": [...]}`), else one per line.
pub fn extract_questions(text: &str) -> Vec<String> {
    let from_json = |v: &Value| -> Option<Vec<String>> {
        let list = question_list(v)?;
        Some(
            list.iter()
                .filter_map(|x| match x {
                    Value::String(s) => Some(s.clone()),
                    Value::Object(o) => {
                        ["query", "question", "text"].iter().find_map(|k| o.get(*k)?.as_str().map(str::to_string))
                    }
                    _ => None,
                })
                .collect(),
        )
    };
    if let Some(qs) = first_json(text).as_ref().and_then(from_json)
        && !qs.is_empty()
    {
        return qs.into_iter().map(|q| q.trim().to_string()).filter(|q| !q.is_empty()).collect();
    }
    let lines: Vec<String> = text
        .lines()
        .map(|l| {
            l.trim()
                .trim_start_matches(|c: char| {
                    c.is_ascii_digit() || matches!(c, '.' | ')' | '-' | '*' | '•' | ' ' | '#')
                })
                .trim_matches(|c| c == '"' || c == '\'' || c == '`')
                .trim()
                .to_string()
        })
        .filter(|l| !l.is_empty())
        .collect();
    // Small models often chain questions on one line ("What is the answer to this question? What
    // was ...?"): each becomes a candidate of its own, and the rules drop the filler.
    let questions: Vec<String> = lines
        .iter()
        .flat_map(|l| {
            l.split_inclusive('?').map(str::trim).filter(|q| q.ends_with('?')).map(str::to_string).collect::<Vec<_>>()
        })
        .collect();
    if !questions.is_empty() {
        return questions;
    }
    lines.into_iter().take(1).collect()
}

/// A plain text table with left-aligned columns.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            widths[i] = widths[i].max(c.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        cells
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<w$}", w = widths[i]))
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_string()
    };
    let mut out = line(header.to_vec());
    for r in rows {
        out.push('\n');
        out.push_str(&line(r.iter().map(String::as_str).collect()));
    }
    out
}

#[cfg(test)]
mod tests {

    #[test]
    fn json_cut_closes_after_the_asked_number_of_items() {
        use super::json_cut;
        assert_eq!(json_cut(r#"{"queries": ["a?", "b"#, 1).as_deref(), Some(r#"{"queries": ["a?"]}"#));
        assert_eq!(
            json_cut("```json\n{\n \"queries\": [\"x \\\" y\", \"z\", \"w", 2).as_deref(),
            Some("```json\n{\n \"queries\": [\"x \\\" y\", \"z\"]}")
        );
        // Keys are not items; a string in a nested object is not either.
        assert_eq!(json_cut(r#"{"queries": ["a"#, 1), None);
        assert_eq!(json_cut(r#"{"queries": ["a"]}"#, 2), None, "the list closed with fewer items");
        assert_eq!(json_cut("no json here", 1), None);
    }

    use super::*;

    #[test]
    fn rules() {
        assert_eq!(rule_violation("What was Northwind's 2025 cloud revenue?"), None);
        assert_eq!(rule_violation("How did margins change in fiscal 2025"), None);
        assert_eq!(rule_violation("Revenue in 2025 was strong."), Some(QueryStatus::NotAQuestion));
        assert_eq!(rule_violation("What does the passage say about revenue?"), Some(QueryStatus::RefersToContext));
        assert_eq!(rule_violation("According to this document, what is the debt?"), Some(QueryStatus::RefersToContext));
        assert_eq!(rule_violation("Revenue?"), Some(QueryStatus::TooShort));
        // Keywords and claims are no questions, and have lengths of their own.
        assert_eq!(rule_violation_of("cloud segment revenue 2025", QueryKind::Keywords), None);
        assert_eq!(rule_violation_of("revenue", QueryKind::Keywords), Some(QueryStatus::TooShort));
        assert_eq!(rule_violation_of("Cloud revenue grew 12% in fiscal 2025.", QueryKind::Claim), None);
        assert_eq!(
            rule_violation_of("The passage says revenue grew.", QueryKind::Claim),
            Some(QueryStatus::RefersToContext)
        );
    }

    #[test]
    fn duplicates_exact_and_near() {
        let mut ix = DupIndex::new(0.8);
        assert_eq!(ix.check_and_add("What was the 2025 operating margin of the Cloud segment?"), None);
        assert_eq!(
            ix.check_and_add("what was the 2025 operating margin of the cloud segment"),
            Some(QueryStatus::Duplicate)
        );
        assert_eq!(
            ix.check_and_add("What was the Cloud segment's 2025 operating margin?"),
            Some(QueryStatus::NearDuplicate)
        );
        assert_eq!(ix.check_and_add("What was the 2024 operating margin of the Hardware segment?"), None);
        ix.forget("What was the 2024 operating margin of the Hardware segment?");
        assert_eq!(ix.check_and_add("what was the 2024 operating margin of the hardware segment"), None, "forgotten");
        // Many queries sharing common words stay distinct.
        for i in 0..2000 {
            assert_eq!(
                ix.check_and_add(&format!("What was the value of metric {i} reported in section {}?", i * 7)),
                None
            );
        }
    }

    #[test]
    fn jaccard_by_hand() {
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<HashSet<_>>();
        // |{b, c}| / |{a, b, c, d}| = 2 / 4
        assert!((jaccard(&s(&["a", "b", "c"]), &s(&["b", "c", "d"])) - 0.5).abs() < 1e-12);
    }

    #[test]
    fn questions_from_json_and_prose() {
        assert_eq!(
            extract_questions("Sure!\n```json\n{\"queries\": [\"A b c?\", \"D e f?\"]}\n```"),
            ["A b c?", "D e f?"]
        );
        assert_eq!(extract_questions("[\"x y z?\"] trailing"), ["x y z?"]);
        assert_eq!(
            extract_questions("Here are two:\n1. What is X?\n2) How is Y?\nThanks"),
            ["What is X?", "How is Y?"]
        );
        assert_eq!(
            extract_questions("What is the net revenue in the Cloud segment"),
            ["What is the net revenue in the Cloud segment"]
        );
        assert_eq!(
            extract_questions("What is the answer to this question? What was 2025 revenue?"),
            ["What is the answer to this question?", "What was 2025 revenue?"]
        );
        assert_eq!(rule_violation("What is the answer to this question?"), Some(QueryStatus::RefersToContext));
    }
}
