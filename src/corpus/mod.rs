//! Turns corpus files into plain text documents: .txt, .md, .html (visible text only), .pdf (text per
//! page, page starts kept) and .jsonl (one document per record). Bad input becomes a skip reason, never a panic.

mod html;
pub mod split;

use std::path::Path;

use serde::{Deserialize, Serialize};

/// The file endings a corpus folder is scanned for.
pub const EXTENSIONS: &[&str] = &["txt", "md", "markdown", "html", "htm", "pdf", "jsonl"];

/// Which fields of a .jsonl record hold the id, title and text.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct JsonlFields {
    pub id: String,
    pub title: String,
    pub text: String,
}

impl Default for JsonlFields {
    fn default() -> Self {
        JsonlFields { id: "id".into(), title: "title".into(), text: "text".into() }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Text,
    Markdown,
}

#[derive(Debug, Clone)]
pub struct Document {
    /// Key in the store: the path relative to the corpus root, `file.jsonl#id` for records.
    pub key: String,
    pub title: Option<String>,
    pub text: String,
    pub format: Format,
    /// (byte offset in `text`, 1-based page number) where each PDF page starts.
    pub pages: Vec<(usize, u32)>,
}

impl Document {
    pub fn page_at(&self, offset: usize) -> Option<u32> {
        let i = self.pages.partition_point(|(start, _)| *start <= offset);
        i.checked_sub(1).map(|i| self.pages[i].1)
    }
}

/// One document, or a reason (keyed by what would have been the document's key) why it was skipped.
pub type Read = Result<Document, (String, String)>;

/// Reads one file's bytes into documents.
pub fn read(rel: &str, path: &Path, bytes: &[u8], jsonl: &JsonlFields) -> Vec<Read> {
    let ext = path.extension().and_then(|e| e.to_str()).map(str::to_ascii_lowercase).unwrap_or_default();
    let skip = |reason: String| vec![Err((rel.to_string(), reason))];
    if ext == "pdf" {
        return match pdf(bytes) {
            Ok((text, pages)) if !text.trim().is_empty() => {
                vec![Ok(Document { key: rel.into(), title: stem(path), text, format: Format::Text, pages })]
            }
            Ok(_) => skip("PDF has no extractable text (scanned images need OCR first)".into()),
            Err(e) => skip(format!("unreadable PDF: {e}")),
        };
    }
    if !EXTENSIONS.contains(&ext.as_str()) {
        return skip(format!("unsupported file type `.{ext}` (supported: {})", EXTENSIONS.join(", ")));
    }
    if bytes.iter().take(8192).any(|&b| b == 0) {
        return skip("binary file (contains NUL bytes)".into());
    }
    let text = match std::str::from_utf8(bytes) {
        Ok(t) => t.strip_prefix('\u{feff}').unwrap_or(t),
        Err(e) => {
            return skip(format!(
                "not valid UTF-8 at byte {} (convert it, e.g. `iconv -f latin1 -t utf-8`)",
                e.valid_up_to()
            ));
        }
    };
    if text.trim().is_empty() {
        return skip("empty file".into());
    }
    match ext.as_str() {
        "jsonl" => jsonl_records(rel, text, jsonl),
        "html" | "htm" => {
            let (title, body) = html::visible_text(text);
            if body.trim().is_empty() {
                return skip("HTML has no visible text".into());
            }
            vec![Ok(Document {
                key: rel.into(),
                title: title.or_else(|| stem(path)),
                text: body,
                format: Format::Text,
                pages: vec![],
            })]
        }
        "md" | "markdown" => {
            let title = text.lines().find_map(|l| l.strip_prefix("# ")).map(|t| t.trim().to_string());
            vec![Ok(Document {
                key: rel.into(),
                title: title.or_else(|| stem(path)),
                text: text.to_string(),
                format: Format::Markdown,
                pages: vec![],
            })]
        }
        _ => vec![Ok(Document {
            key: rel.into(),
            title: stem(path),
            text: text.to_string(),
            format: Format::Text,
            pages: vec![],
        })],
    }
}

fn stem(path: &Path) -> Option<String> {
    path.file_stem().map(|s| s.to_string_lossy().replace(['_', '-'], " "))
}

fn jsonl_records(rel: &str, text: &str, f: &JsonlFields) -> Vec<Read> {
    let mut out = Vec::new();
    // Two records with one id would be one document: the file is refused, naming both lines.
    let mut first_line: std::collections::HashMap<String, usize> = std::collections::HashMap::new();
    for (i, line) in text.lines().enumerate() {
        let line_no = i + 1;
        if line.trim().is_empty() {
            continue;
        }
        let at = format!("{rel}:{line_no}");
        let rec: serde_json::Value = match serde_json::from_str(line) {
            Ok(v) => v,
            Err(e) => {
                out.push(Err((at, format!("not a JSON record: {e}"))));
                continue;
            }
        };
        let id = match rec.get(&f.id) {
            Some(serde_json::Value::String(s)) => s.clone(),
            Some(serde_json::Value::Number(n)) => n.to_string(),
            _ => {
                out.push(Err((
                    at,
                    format!("record has no `{}` field (set `jsonl: {{ id: ... }}` on the stage)", f.id),
                )));
                continue;
            }
        };
        if let Some(first) = first_line.insert(id.clone(), line_no) {
            return vec![Err((
                rel.to_string(),
                format!("id `{id}` is on line {first} and line {line_no}: record ids must be unique within a file"),
            ))];
        }
        let key = format!("{rel}#{id}");
        let title = match rec.get(&f.title) {
            Some(serde_json::Value::String(t)) if !t.is_empty() => Some(t.clone()),
            _ => None,
        };
        match rec.get(&f.text) {
            Some(serde_json::Value::String(body)) if !body.trim().is_empty() => {
                out.push(Ok(Document { key, title, text: body.clone(), format: Format::Text, pages: vec![] }))
            }
            Some(serde_json::Value::String(_)) => {
                out.push(Err((key, format!("line {line_no}: `{}` is empty", f.text))))
            }
            Some(other) => {
                out.push(Err((key, format!("line {line_no}: `{}` is {}, not a string", f.text, json_type(other)))))
            }
            None => out.push(Err((
                key,
                format!("line {line_no}: record has no `{}` field (set `jsonl: {{ text: ... }}` on the stage)", f.text),
            ))),
        }
    }
    if out.is_empty() {
        out.push(Err((rel.to_string(), "empty file".into())));
    }
    out
}

fn json_type(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "a list",
        serde_json::Value::Object(_) => "an object",
    }
}

/// Page texts joined by blank lines, with where each page starts. pdf-extract panics on some
/// malformed files, so it runs under catch_unwind: a bad PDF is a skipped file, not a crash.
fn pdf(bytes: &[u8]) -> Result<(String, Vec<(usize, u32)>), String> {
    let pages = std::panic::catch_unwind(|| pdf_extract::extract_text_from_mem_by_pages(bytes))
        .map_err(|p| {
            p.downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "the PDF parser gave up".into())
        })?
        .map_err(|e| e.to_string())?;
    let mut text = String::new();
    let mut starts = Vec::new();
    for (i, page) in pages.iter().enumerate() {
        let page = page.trim();
        if page.is_empty() {
            continue;
        }
        if !text.is_empty() {
            text.push_str("\n\n");
        }
        starts.push((text.len(), i as u32 + 1));
        text.push_str(page);
    }
    Ok((text, starts))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(name: &str, bytes: &[u8]) -> Read {
        read(name, Path::new(name), bytes, &JsonlFields::default()).remove(0)
    }

    #[test]
    fn bad_files_are_skipped_with_a_reason() {
        assert!(one("a.txt", b"").unwrap_err().1.contains("empty"));
        assert!(one("a.txt", b"ab\0cd").unwrap_err().1.contains("binary"));
        assert!(one("a.txt", b"caf\xe9 au lait").unwrap_err().1.contains("UTF-8 at byte 3"));
        assert!(one("a.pdf", b"%PDF-1.4 garbage").unwrap_err().1.contains("PDF"));
        assert!(one("a.docx", b"x").unwrap_err().1.contains("unsupported"));
    }

    #[test]
    fn jsonl_records_become_documents() {
        let src =
            b"{\"_id\": \"d1\", \"title\": \"T\", \"body\": \"hello\"}\n\nnot json\n{\"_id\": 2, \"body\": \"x\"}\n";
        let f = JsonlFields { id: "_id".into(), title: "title".into(), text: "body".into() };
        let docs = read("c.jsonl", Path::new("c.jsonl"), src, &f);
        assert_eq!(docs.len(), 3);
        let d = docs[0].as_ref().unwrap();
        assert_eq!((d.key.as_str(), d.title.as_deref(), d.text.as_str()), ("c.jsonl#d1", Some("T"), "hello"));
        assert_eq!(docs[1].as_ref().unwrap_err().0, "c.jsonl:3");
        assert_eq!(docs[2].as_ref().unwrap().key, "c.jsonl#2");
    }

    #[test]
    fn jsonl_duplicate_ids_refuse_the_file_and_non_string_text_is_skipped() {
        let f = JsonlFields::default();
        let dup = "{\"id\": 1, \"text\": \"a\"}\n{\"id\": 2, \"text\": \"b\"}\n{\"id\": 1, \"text\": \"c\"}\n";
        let r = jsonl_records("d.jsonl", dup, &f);
        assert_eq!(r.len(), 1);
        let (key, why) = r[0].as_ref().unwrap_err();
        assert_eq!(key, "d.jsonl");
        assert!(why.contains("line 1 and line 3"), "{why}");
        let r = jsonl_records("d.jsonl", "{\"id\": 1, \"text\": 42}\n{\"id\": 2, \"text\": \"ok\"}\n", &f);
        let (key, why) = r[0].as_ref().unwrap_err();
        assert!(key == "d.jsonl#1" && why.contains("line 1") && why.contains("a number"), "{why}");
        assert!(r[1].is_ok());
    }

    #[test]
    fn page_lookup() {
        let d = Document {
            key: "k".into(),
            title: None,
            text: "x".repeat(30),
            format: Format::Text,
            pages: vec![(0, 1), (10, 3)],
        };
        assert_eq!(d.page_at(0), Some(1));
        assert_eq!(d.page_at(9), Some(1));
        assert_eq!(d.page_at(10), Some(3));
    }
}
