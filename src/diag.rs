//! Problems found in a workflow file, printed the way `just` prints them: message, place, the line, a caret.
//! The bottom layer: every other module may report a `Diagnostic`; this one imports none of them.

use std::fmt;
use std::path::PathBuf;

/// A 1-based line and column in the workflow file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Span {
    pub line: usize,
    pub col: usize,
}

#[derive(Debug, Clone)]
pub struct Diagnostic {
    pub span: Span,
    pub message: String,
    pub hint: Option<String>,
}

impl Diagnostic {
    pub fn new(span: Span, message: impl Into<String>) -> Self {
        Diagnostic { span, message: message.into(), hint: None }
    }

    pub fn hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }
}

/// Every problem found in one file, with the file's text for showing the offending lines.
#[derive(Debug, Clone)]
pub struct Diagnostics {
    pub file: PathBuf,
    pub source: String,
    pub items: Vec<Diagnostic>,
}

impl fmt::Display for Diagnostics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let lines: Vec<&str> = self.source.lines().collect();
        for (i, d) in self.items.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            writeln!(f, "error: {}", d.message)?;
            writeln!(f, "  --> {}:{}:{}", self.file.display(), d.span.line, d.span.col)?;
            if let Some(line) = d.span.line.checked_sub(1).and_then(|i| lines.get(i)) {
                let num = d.span.line.to_string();
                let pad = " ".repeat(num.len());
                let (shown, caret) = window(line, d.span.col.saturating_sub(1));
                writeln!(f, "{pad} |")?;
                writeln!(f, "{num} | {shown}")?;
                writeln!(f, "{pad} | {}^", " ".repeat(caret))?;
            }
            if let Some(h) = &d.hint {
                writeln!(f, "  = hint: {h}")?;
            }
        }
        let n = self.items.len();
        write!(f, "{} problem{} in {}", n, if n == 1 { "" } else { "s" }, self.file.display())
    }
}

/// Characters of a source line shown around the column of a problem.
const SHOWN: usize = 100;

/// The part of `line` shown for a problem at character `col` (all of it when short; else a window
/// around `col` with `…` where it was cut), and where the caret goes in it.
fn window(line: &str, col: usize) -> (String, usize) {
    let chars: Vec<char> = line.chars().collect();
    if chars.len() <= SHOWN {
        return (line.to_string(), col);
    }
    let col = col.min(chars.len());
    let start = col.saturating_sub(SHOWN / 2).min(chars.len().saturating_sub(SHOWN));
    let end = (start + SHOWN).min(chars.len());
    let mut shown: String = chars[start..end].iter().collect();
    let mut caret = col - start;
    if start > 0 {
        shown.insert(0, '…');
        caret += 1;
    }
    if end < chars.len() {
        shown.push('…');
    }
    (shown, caret)
}

/// Levenshtein distance, for "did you mean" hints on misspelt keys.
pub fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            cur[j + 1] = (prev[j] + usize::from(ca != *cb)).min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

/// The closest of `candidates` to `word`, if it is close enough to be a likely typo.
pub fn did_you_mean<'a>(word: &str, candidates: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    candidates
        .into_iter()
        .map(|c| (edit_distance(word, c), c))
        .filter(|(d, c)| *d <= (c.len() / 3).max(2))
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_long_line_is_shown_around_the_problem_only() {
        assert_eq!(window("stages: x", 8), ("stages: x".to_string(), 8));
        let long = format!("{}X{}", "[".repeat(5000), "]".repeat(5000));
        let (shown, caret) = window(&long, 5000);
        assert!(shown.chars().count() <= SHOWN + 2, "{}", shown.len());
        assert_eq!(shown.chars().nth(caret), Some('X'));
        let (shown, caret) = window(&long, 9_999_999);
        assert!(shown.ends_with(']') && caret <= shown.chars().count());
    }

    #[test]
    fn distances() {
        assert_eq!(edit_distance("kitten", "sitting"), 3);
        assert_eq!(did_you_mean("max_tokns", ["max_tokens", "overlap"]), Some("max_tokens"));
        assert_eq!(did_you_mean("zzz", ["max_tokens", "overlap"]), None);
    }
}
