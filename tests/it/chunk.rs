//! The chunk stage on real files: formats, bad files, page numbers, token limits and overlap.

use crate::harness::{Sandbox, pdf, prose};

const WF: &str = "name: t\nstore: t.db\nmodels:\n  black_box: { provider: local, model: all-MiniLM-L6-v2 }\nstages:\n  chunk: { kind: chunk, corpus: docs, max_tokens: 64, overlap: 8, jsonl: { id: _id, text: body } }\n";

#[test]
fn bad_files_are_recorded_and_summarised_while_good_ones_are_chunked() {
    let sb = Sandbox::new();
    sb.write("wf.yaml", WF)
        .write("docs/good.txt", prose(1, 5))
        .write("docs/binary.txt", b"\x7fELF\x00\x01\x02garbage")
        .write("docs/latin1.md", b"R\xe9sum\xe9 of the year")
        .write("docs/empty.html", "   \n")
        .write("docs/broken.pdf", b"%PDF-1.7\nthis is not really a pdf\n%%EOF")
        .write("docs/records.jsonl", "{\"_id\": \"r1\", \"body\": \"Net interest income rose 8%.\"}\n{oops\n");
    let r = sb.flow(&["run", "wf.yaml"]);
    assert_eq!(r.code, 0, "bad files do not fail the stage: {}", r.all());
    for (file, reason) in [
        ("binary.txt", "binary file"),
        ("latin1.md", "not valid UTF-8 at byte 1"),
        ("empty.html", "empty file"),
        ("broken.pdf", "unreadable PDF"),
        ("records.jsonl:2", "not a JSON record"),
    ] {
        assert!(r.stderr.contains(&format!("skipped {file}: {reason}")), "no line for {file} in:\n{}", r.stderr);
    }
    assert!(r.stderr.contains("5 skipped"), "{}", r.stderr);

    let st = sb.flow(&["status", "-w", "wf.yaml"]);
    assert!(st.stdout.contains("skipped broken.pdf: unreadable PDF"), "{}", st.stdout);
    let db = sb.db("t.db");
    assert_eq!(db.scalar("SELECT COUNT(*) FROM documents WHERE status = 'skipped'"), 5);
    assert_eq!(db.scalar("SELECT COUNT(*) FROM documents WHERE status = 'active'"), 2);
    assert_eq!(
        db.scalar(
            "SELECT COUNT(*) FROM chunks c JOIN documents d ON d.id = c.document_id WHERE d.path = 'records.jsonl#r1'"
        ),
        1
    );

    // Nothing changed: the second run does no work and still reports the skips.
    let again = sb.flow(&["run", "wf.yaml", "--force", "chunk"]);
    assert_eq!(again.code, 0);
    assert_eq!(db.scalar("SELECT COUNT(*) FROM documents WHERE status = 'skipped'"), 5);
}

#[test]
fn pdf_pages_html_text_and_markdown() {
    let sb = Sandbox::new();
    sb.write("wf.yaml", WF)
        .write(
            "docs/report.pdf",
            pdf(&[
                &format!("Segment revenue rose to 4.2 billion. {}", long(1)),
                &format!("Goodwill impairment was zero in 2025. {}", long(2)),
            ]),
        )
        .write(
            "docs/page.html",
            "<html><head><title>Results</title><script>var secret = 'hidden js';</script></head>\
             <body><h1>Results</h1><p>Operating margin reached 18.5 percent.</p><style>.x{}</style></body></html>",
        )
        .write("docs/notes.md", "# Notes\n\n## Leases\n\nOperating lease liabilities were 310 million.\n");
    let r = sb.flow(&["run", "wf.yaml"]);
    assert_eq!(r.code, 0, "{}", r.all());
    let db = sb.db("t.db");
    assert_eq!(db.scalar("SELECT COUNT(*) FROM documents WHERE status = 'active'"), 3, "{}", r.all());
    assert_eq!(db.scalar("SELECT MIN(page) FROM chunks WHERE text LIKE '%Segment revenue%'"), 1);
    assert_eq!(db.scalar("SELECT MAX(page) FROM chunks WHERE text LIKE '%Goodwill impairment%'"), 2);
    assert_eq!(db.scalar("SELECT COUNT(DISTINCT page) FROM chunks"), 2);
    assert_eq!(db.scalar("SELECT COUNT(*) FROM chunks WHERE text LIKE '%hidden js%' OR text LIKE '%.x{}%'"), 0);
    assert_eq!(db.scalar("SELECT COUNT(*) FROM chunks WHERE text LIKE '%Operating margin reached 18.5 percent.%'"), 1);
    assert_eq!(db.scalar("SELECT COUNT(*) FROM documents WHERE title = 'Results'"), 1);
    assert_eq!(db.scalar("SELECT COUNT(*) FROM chunks WHERE text LIKE '%Operating lease liabilities%'"), 1);
}

#[test]
fn chunks_respect_max_tokens_and_overlap_with_the_real_tokenizer() {
    let models = crate::harness::models_dir();
    let tok = flow::stages::chunk::load_tokenizer(&models.join("all-MiniLM-L6-v2/tokenizer.json")).unwrap();
    let text = prose(7, 60);
    let doc = flow::corpus::Document {
        key: "k".into(),
        title: None,
        text: text.clone(),
        format: flow::corpus::Format::Text,
        pages: vec![],
    };
    let chunks = flow::corpus::split::split(&doc, &tok, 100, 20).unwrap();
    assert!(chunks.len() > 10);
    let mut overlapping = 0;
    for (i, c) in chunks.iter().enumerate() {
        let direct = tok.encode(c.text.as_str(), false).unwrap().len();
        assert!(direct <= 100, "chunk {i} has {direct} tokens");
        assert_eq!(c.n_tokens as usize, direct, "stored count is the true count");
        assert_eq!(&text[c.start as usize..c.end as usize], c.text);
        if i > 0 && c.start < chunks[i - 1].end {
            overlapping += 1;
            let shared = &text[c.start as usize..chunks[i - 1].end as usize];
            let n = tok.encode(shared, false).unwrap().len();
            assert!(n <= 20, "chunk {i} shares {n} tokens with the one before, more than the overlap");
        }
        // Chunks end at a sentence or paragraph bound unless a single sentence is longer than the limit.
        assert!(c.text.ends_with('.') || i == chunks.len() - 1, "chunk {i} ends mid-sentence: {:?}", c.text);
    }
    // text-splitter overlaps by whole sentences (or smaller units) that fit in the overlap budget.
    assert!(overlapping > 0, "neighbouring chunks share text");
    let covered: usize = chunks.iter().map(|c| c.text.len()).sum();
    assert!(covered >= text.trim().len() - chunks.len() * 2, "no text is lost");
}

/// A page-long run of sentences, so each page needs a chunk of its own.
fn long(seed: u64) -> String {
    prose(seed, 1).replace('\n', " ")
}
