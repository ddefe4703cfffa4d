//! A document cut into token-bounded, overlapping chunks at the largest semantic unit that fits,
//! in segments of bounded size so memory stays small on any input.

use text_splitter::{ChunkConfig, ChunkSizer, MarkdownSplitter, TextSplitter};
use tokenizers::Tokenizer;

use super::{Document, Format};
use crate::store::documents::NewChunk;

/// Counts tokens of a slice of the document from one tokenization of the whole document, so the
/// splitter's many size probes cost a binary search each instead of a tokenizer call.
struct OffsetSizer<'a> {
    base: usize,
    len: usize,
    starts: Vec<usize>,
    ends: Vec<usize>,
    tokenizer: &'a Tokenizer,
}

impl ChunkSizer for OffsetSizer<'_> {
    fn size(&self, chunk: &str) -> usize {
        let p = chunk.as_ptr() as usize;
        if p >= self.base && p + chunk.len() <= self.base + self.len {
            let (s, e) = (p - self.base, p - self.base + chunk.len());
            let first = self.ends.partition_point(|&x| x <= s);
            let last = self.starts.partition_point(|&x| x < e);
            return last.saturating_sub(first);
        }
        self.tokenizer.encode(chunk, false).map(|e| e.len()).unwrap_or(chunk.len())
    }
}

/// The most bytes tokenized at once. The tokenizer keeps per-byte alignments and per-token records
/// (about 100x the text), so a document is cut into segments of this size at a paragraph, line,
/// sentence or word break, and each is chunked on its own: memory stays bounded on any input.
const SEGMENT_BYTES: usize = 256 * 1024;

/// Cuts a document into chunks of at most `max_tokens` tokens, `overlap` tokens shared between
/// neighbours, breaking at the largest semantic unit that fits (sections, paragraphs, sentences).
pub fn split(
    doc: &Document,
    tokenizer: &Tokenizer,
    max_tokens: usize,
    overlap: usize,
) -> Result<Vec<NewChunk>, String> {
    let mut out = Vec::new();
    for (base, segment) in segments(&doc.text, SEGMENT_BYTES) {
        let attempt = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            split_segment(doc, base, segment, tokenizer, max_tokens, overlap, &mut out)
        }));
        attempt.unwrap_or_else(|_| Err("the splitter failed on this document".into()))?;
    }
    Ok(out)
}

/// `text` as (byte offset, piece) segments of at most `max` bytes, each ending at the last
/// paragraph break in its second half, else a line break, a sentence end, a space, a char boundary.
fn segments(text: &str, max: usize) -> Vec<(usize, &str)> {
    let mut out = Vec::new();
    let mut base = 0;
    let mut rest = text;
    while rest.len() > max {
        let mut limit = max;
        while !rest.is_char_boundary(limit) {
            limit -= 1;
        }
        let window = &rest[..limit];
        let half = limit / 2;
        let cut =
            [window.rfind("\n\n").map(|i| i + 2), window.rfind('\n').map(|i| i + 1), window.rfind(". ").map(|i| i + 2)]
                .into_iter()
                .flatten()
                .find(|&i| i > half)
                .or_else(|| window.rfind(char::is_whitespace).filter(|&i| i > half).map(|i| i + 1))
                .unwrap_or(limit);
        out.push((base, &rest[..cut]));
        base += cut;
        rest = &rest[cut..];
    }
    if !rest.is_empty() {
        out.push((base, rest));
    }
    out
}

fn split_segment(
    doc: &Document,
    base: usize,
    segment: &str,
    tokenizer: &Tokenizer,
    max_tokens: usize,
    overlap: usize,
    out: &mut Vec<NewChunk>,
) -> Result<(), String> {
    let enc = tokenizer.encode(segment, false).map_err(|e| format!("tokenizer failed: {e}"))?;
    let mut starts: Vec<usize> = enc.get_offsets().iter().map(|o| o.0).collect();
    let mut ends: Vec<usize> = enc.get_offsets().iter().map(|o| o.1).collect();
    drop(enc);
    starts.sort_unstable();
    ends.sort_unstable();
    let sizer = OffsetSizer { base: segment.as_ptr() as usize, len: segment.len(), starts, ends, tokenizer };
    let config = ChunkConfig::new(max_tokens).with_sizer(&sizer).with_overlap(overlap).map_err(|e| e.to_string())?;
    let pieces: Vec<(usize, &str)> = match doc.format {
        Format::Markdown => MarkdownSplitter::new(config).chunk_indices(segment).collect(),
        Format::Text => TextSplitter::new(config).chunk_indices(segment).collect(),
    };
    out.extend(pieces.into_iter().filter(|(_, t)| !t.trim().is_empty()).map(|(start, text)| {
        let start = base + start;
        NewChunk {
            n_tokens: sizer.size(text) as i64,
            page: doc.page_at(start).map(i64::from),
            start: start as i64,
            end: (start + text.len()) as i64,
            text: text.to_string(),
        }
    }));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::segments;

    #[test]
    fn segments_cover_the_text_at_breaks_and_stay_under_the_limit() {
        let para = "Revenue rose. Margins held up well in the year.\n\n";
        let text = para.repeat(50);
        let segs = segments(&text, 300);
        assert_eq!(segs.iter().map(|s| s.1).collect::<String>(), text);
        assert!(segs.iter().all(|(_, s)| s.len() <= 300 && s.ends_with("\n\n")), "{segs:?}");
        assert!(segs.windows(2).all(|w| w[0].0 + w[0].1.len() == w[1].0));
        // One long line of words: cut after a space; no spaces at all: at a char boundary.
        let line = "word ".repeat(200);
        assert!(segments(&line, 128).iter().all(|(_, s)| s.len() <= 128 && s.ends_with(' ')));
        let solid = "é".repeat(1000);
        let segs = segments(&solid, 101);
        assert_eq!(segs.iter().map(|s| s.1).collect::<String>(), solid);
        assert!(segs.iter().all(|(_, s)| s.len() <= 101));
    }
}
