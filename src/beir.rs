//! BEIR-format labelled sets (corpus.jsonl, queries.jsonl, qrels/<split>.tsv), read line by line;
//! every malformed line or unknown id is an input error naming the file and line.

use std::collections::HashMap;
use std::io::BufRead;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::error::{Error, Result};

/// A labelled set: documents and queries by position, and the relevant documents of each query.
#[derive(Debug, Default)]
pub struct Beir {
    pub dir: PathBuf,
    pub doc_ids: Vec<String>,
    /// A document as BEIR's own tools embed it: title + " " + text (trimmed).
    pub doc_texts: Vec<String>,
    pub query_ids: Vec<String>,
    pub query_texts: Vec<String>,
    /// A query's reference answer, where queries.jsonl gives one (`answer`, or `metadata.answer`).
    pub query_answers: Vec<Option<String>>,
    /// (query index, document index, graded relevance > 0), in qrels order.
    pub qrels: Vec<(usize, usize, i64)>,
}

#[derive(Deserialize)]
struct Line {
    #[serde(rename = "_id")]
    id: serde_json::Value,
    #[serde(default)]
    title: Option<String>,
    #[serde(default)]
    text: Option<String>,
    #[serde(default)]
    answer: Option<serde_json::Value>,
    #[serde(default)]
    metadata: Option<serde_json::Value>,
}

/// An answer given as a string, or as a list of acceptable strings (joined with " | ").
fn answer_text(v: &serde_json::Value) -> Option<String> {
    match v {
        serde_json::Value::String(s) if !s.trim().is_empty() => Some(s.trim().to_string()),
        serde_json::Value::Array(a) => {
            let parts: Vec<String> = a.iter().filter_map(answer_text).collect();
            (!parts.is_empty()).then(|| parts.join(" | "))
        }
        _ => None,
    }
}

fn id_string(v: &serde_json::Value) -> Option<String> {
    match v {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

fn open(path: &Path) -> Result<std::io::BufReader<std::fs::File>> {
    let f = std::fs::File::open(path).map_err(|e| {
        Error::bad_input(
            format!("cannot read {}: {e}", path.display()),
            "a BEIR folder holds corpus.jsonl, queries.jsonl and qrels/<split>.tsv",
        )
    })?;
    Ok(std::io::BufReader::new(f))
}

fn bad_line(path: &Path, line: usize, what: impl std::fmt::Display, hint: &str) -> Error {
    Error::bad_input(format!("{}:{line}: {what}", path.display()), hint)
}

/// A line read from a BEIR file; bytes that are not UTF-8 (a binary file) are bad input at that line.
fn text_line(path: &Path, n: usize, line: std::io::Result<String>) -> Result<String> {
    line.map_err(|e| match e.kind() {
        std::io::ErrorKind::InvalidData => bad_line(
            path,
            n + 1,
            "is not UTF-8 text",
            "BEIR files are UTF-8 text: check that this is the right file (not a binary one), or convert it with iconv",
        ),
        _ => Error::io(path)(e),
    })
}

/// Ids, texts and answers of a jsonl file, and each id's position.
type Texts = (Vec<String>, Vec<String>, Vec<Option<String>>, HashMap<String, usize>);

/// Reads `{"_id", "title"?, "text"}` lines; returns ids and texts (title + " " + text).
fn read_jsonl(path: &Path, with_title: bool) -> Result<Texts> {
    let (mut ids, mut texts, mut answers, mut index) = (Vec::new(), Vec::new(), Vec::new(), HashMap::new());
    for (n, line) in open(path)?.lines().enumerate() {
        let line = text_line(path, n, line)?;
        if line.trim().is_empty() {
            continue;
        }
        let hint = r#"each line is a JSON object like {"_id": "d1", "title": "...", "text": "..."}"#;
        let parsed: Line = serde_json::from_str(&line).map_err(|e| bad_line(path, n + 1, e, hint))?;
        let id = id_string(&parsed.id).ok_or_else(|| bad_line(path, n + 1, "`_id` is not a string", hint))?;
        let answer = parsed
            .answer
            .as_ref()
            .or_else(|| parsed.metadata.as_ref().and_then(|m| m.get("answer")))
            .and_then(answer_text);
        let text = parsed.text.unwrap_or_default();
        let text = match parsed.title.filter(|t| with_title && !t.is_empty()) {
            Some(title) => format!("{title} {text}").trim().to_string(),
            None => text.trim().to_string(),
        };
        if index.insert(id.clone(), ids.len()).is_some() {
            return Err(bad_line(path, n + 1, format!("`_id` {id:?} appears twice"), "ids must be unique"));
        }
        ids.push(id);
        texts.push(text);
        answers.push(answer);
    }
    Ok((ids, texts, answers, index))
}

/// Loads a BEIR folder with the qrels of `split` (train, dev, test).
pub fn load(dir: &Path, split: &str) -> Result<Beir> {
    let (doc_ids, doc_texts, _, docs) = read_jsonl(&dir.join("corpus.jsonl"), true)?;
    let (query_ids, query_texts, query_answers, queries) = read_jsonl(&dir.join("queries.jsonl"), false)?;
    let path = dir.join("qrels").join(format!("{split}.tsv"));
    let mut qrels = Vec::new();
    let hint = "qrels lines are `query-id<TAB>corpus-id<TAB>score` after a header line";
    for (n, line) in open(&path)?.lines().enumerate() {
        let line = text_line(&path, n, line)?;
        let cols: Vec<&str> = line.split('\t').map(str::trim).collect();
        if line.trim().is_empty() || (n == 0 && cols.first().is_some_and(|c| c.eq_ignore_ascii_case("query-id"))) {
            continue;
        }
        let [q, d, score] = cols[..] else {
            return Err(bad_line(
                &path,
                n + 1,
                format!("expected 3 tab-separated columns, found {}", cols.len()),
                hint,
            ));
        };
        let score: i64 =
            score.parse().map_err(|_| bad_line(&path, n + 1, format!("score {score:?} is not an integer"), hint))?;
        let qi = *queries.get(q).ok_or_else(|| {
            bad_line(&path, n + 1, format!("query {q:?} is not in queries.jsonl"), "qrels must name known queries")
        })?;
        let di = *docs.get(d).ok_or_else(|| {
            bad_line(&path, n + 1, format!("document {d:?} is not in corpus.jsonl"), "qrels must name known documents")
        })?;
        if score > 0 {
            qrels.push((qi, di, score));
        }
    }
    if qrels.is_empty() {
        return Err(Error::bad_input(
            format!("{}: no relevant (score > 0) pairs", path.display()),
            "check the split name: `split: train` reads qrels/train.tsv",
        ));
    }
    Ok(Beir { dir: dir.to_path_buf(), doc_ids, doc_texts, query_ids, query_texts, query_answers, qrels })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) {
        std::fs::create_dir_all(dir.join(name).parent().unwrap()).unwrap();
        std::fs::write(dir.join(name), text).unwrap();
    }

    #[test]
    fn reads_a_set_and_names_the_line_of_a_bad_qrel() {
        let t = tempfile::tempdir().unwrap();
        write(
            t.path(),
            "corpus.jsonl",
            "{\"_id\": \"d1\", \"title\": \"T\", \"text\": \"body\"}\n{\"_id\": 2, \"text\": \"x\"}\n",
        );
        write(t.path(), "queries.jsonl", "{\"_id\": \"q1\", \"text\": \"what?\"}\n");
        write(t.path(), "qrels/train.tsv", "query-id\tcorpus-id\tscore\nq1\td1\t1\nq1\t2\t0\n");
        let b = load(t.path(), "train").unwrap();
        assert_eq!(b.doc_texts, ["T body", "x"]);
        assert_eq!(b.doc_ids, ["d1", "2"]);
        assert_eq!(b.qrels, [(0, 0, 1)]);

        write(t.path(), "qrels/test.tsv", "query-id\tcorpus-id\tscore\nq1\td1\t1\nq1\tnope\t1\n");
        let e = load(t.path(), "test").unwrap_err().to_string();
        assert!(e.contains("test.tsv:3") && e.contains("\"nope\" is not in corpus.jsonl"), "{e}");
        write(t.path(), "queries.jsonl", "{\"_id\": \"q1\", \"text\": \"what?\"}\nnot json\n");
        let e = load(t.path(), "train").unwrap_err().to_string();
        assert!(e.contains("queries.jsonl:2"), "{e}");

        write(t.path(), "queries.jsonl", "{\"_id\": \"q1\", \"text\": \"what?\"}\n");
        std::fs::write(t.path().join("qrels/bin.tsv"), b"query-id\tcorpus-id\tscore\nq1\td1\t1\n\xff\xfe\x00\x01\n")
            .unwrap();
        let e = load(t.path(), "bin").unwrap_err();
        assert_eq!(e.exit_code(), 2);
        assert!(e.to_string().contains("bin.tsv:3: is not UTF-8"), "{e}");
    }
}
