//! Long documents as overlapping passages of a model's window (for MaxP scoring): windows of
//! token offsets cut back into the document's own text, so each passage is a substring the cache keys.

use tokenizers::Tokenizer;

use crate::error::{Error, Result};

/// What cuts one model's long documents: its tokenizer without truncation, and its window.
#[derive(Clone)]
pub struct Splitter {
    tokenizer: Tokenizer,
    /// Content tokens one pass sees (max_seq_length less the special tokens).
    pub window: usize,
}

impl Splitter {
    /// For a tokenizer that truncates at `max_seq_length`.
    pub fn new(tokenizer: &Tokenizer, max_seq_length: usize) -> Result<Splitter> {
        let mut tokenizer = tokenizer.clone();
        tokenizer.with_truncation(None).map_err(Error::tokenizer("turning off the tokenizer's truncation"))?;
        let specials = tokenizer.encode("", true).map(|e| e.len()).unwrap_or(2);
        Ok(Splitter { tokenizer, window: max_seq_length.saturating_sub(specials).max(1) })
    }

    /// `text` as passages of the window, neighbours sharing `overlap` tokens (default a quarter window).
    pub fn split(&self, text: &str, overlap: Option<usize>) -> Result<Vec<String>> {
        split(&self.tokenizer, text, self.window, overlap.unwrap_or(self.window / 4))
    }

    /// Every text's passages, flat, with the text each came from.
    pub fn split_all(&self, texts: &[String], overlap: Option<usize>) -> Result<(Vec<String>, Vec<usize>)> {
        let (mut out, mut owners) = (Vec::with_capacity(texts.len()), Vec::with_capacity(texts.len()));
        for (i, t) in texts.iter().enumerate() {
            for p in self.split(t, overlap)? {
                out.push(p);
                owners.push(i);
            }
        }
        Ok((out, owners))
    }
}

/// `text` as passages of at most `window` content tokens, neighbours sharing `overlap` tokens; a
/// text that fits is one passage, itself. `tokenizer` must not truncate.
pub fn split(tokenizer: &Tokenizer, text: &str, window: usize, overlap: usize) -> Result<Vec<String>> {
    let enc = tokenizer.encode(text, false).map_err(Error::tokenizer("tokenizing a document"))?;
    let offsets = enc.get_offsets();
    let n = offsets.len();
    let window = window.max(1);
    if n <= window {
        return Ok(vec![text.to_string()]);
    }
    let step = window - overlap.min(window - 1);
    let mut out = Vec::new();
    let mut start = 0;
    loop {
        let end = (start + window).min(n);
        let (a, b) = (offsets[start].0, offsets[end - 1].1);
        // Offsets are byte positions on character boundaries; a tokenizer that says otherwise
        // gets the whole rest of the text rather than a panic.
        out.push(text.get(a..b).unwrap_or(&text[a.min(text.len())..]).to_string());
        if end == n {
            return Ok(out);
        }
        start += step;
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn windows_overlap_and_cover_the_text() {
        use tokenizers::models::wordlevel::WordLevel;
        use tokenizers::pre_tokenizers::whitespace::Whitespace;
        let words: Vec<String> = (0..10).map(|i| format!("w{i}")).collect();
        let vocab = words.iter().enumerate().map(|(i, w)| (w.clone(), i as u32)).collect();
        let model = WordLevel::builder().vocab(vocab).unk_token("w0".into()).build().unwrap();
        let mut tok = tokenizers::Tokenizer::new(model);
        tok.with_pre_tokenizer(Some(Whitespace {}));
        let text = words.join(" ");
        // 10 tokens, window 4, overlap 1: starts 0, 3, 6 -> w0-w3, w3-w6, w6-w9.
        let got = super::split(&tok, &text, 4, 1).unwrap();
        assert_eq!(got, ["w0 w1 w2 w3", "w3 w4 w5 w6", "w6 w7 w8 w9"]);
        // A text that fits is itself.
        assert_eq!(super::split(&tok, "w1 w2", 4, 1).unwrap(), ["w1 w2"]);
        // The last window ends at the text's end.
        assert_eq!(super::split(&tok, &text, 8, 2).unwrap(), ["w0 w1 w2 w3 w4 w5 w6 w7", "w6 w7 w8 w9"]);
    }
}
