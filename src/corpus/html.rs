//! Visible text of an HTML page: no scripts, styles or head; block elements become paragraph breaks
//! so the chunker can cut at them.

use scraper::{Html, Node, Selector};

const HIDDEN: &[&str] = &["script", "style", "noscript", "template", "head", "svg", "iframe", "object"];
const BLOCK: &[&str] = &[
    "p",
    "div",
    "section",
    "article",
    "header",
    "footer",
    "main",
    "aside",
    "nav",
    "h1",
    "h2",
    "h3",
    "h4",
    "h5",
    "h6",
    "ul",
    "ol",
    "li",
    "table",
    "tr",
    "blockquote",
    "pre",
    "figure",
    "figcaption",
    "dl",
    "dt",
    "dd",
    "hr",
    "form",
    "caption",
    "thead",
    "tbody",
    "tfoot",
    "address",
    "details",
    "summary",
];

/// The page title (from `<title>`, else the first `<h1>`) and the visible text.
pub fn visible_text(src: &str) -> (Option<String>, String) {
    let doc = Html::parse_document(src);
    let mut out = String::new();
    walk(doc.tree.root(), &mut out);
    let text = out
        .split("\n\n")
        .map(|p| p.lines().map(str::trim).filter(|l| !l.is_empty()).collect::<Vec<_>>().join("\n"))
        .filter(|p| !p.is_empty())
        .collect::<Vec<_>>()
        .join("\n\n");
    (first_text(&doc, "title").or_else(|| first_text(&doc, "h1")), text)
}

fn first_text(doc: &Html, tag: &str) -> Option<String> {
    let sel = Selector::parse(tag).ok()?;
    let el = doc.select(&sel).next()?;
    let t = el.text().collect::<Vec<_>>().join(" ");
    let t = t.split_whitespace().collect::<Vec<_>>().join(" ");
    (!t.is_empty()).then_some(t)
}

fn walk(node: ego_tree::NodeRef<'_, Node>, out: &mut String) {
    for child in node.children() {
        match child.value() {
            Node::Text(t) => push_text(out, t),
            Node::Element(e) => {
                let name = e.name();
                if HIDDEN.contains(&name) {
                    continue;
                }
                let block = BLOCK.contains(&name);
                if block {
                    out.push_str("\n\n");
                } else if name == "br" {
                    out.push('\n');
                } else if name == "td" || name == "th" {
                    out.push_str(" | ");
                }
                walk(child, out);
                if block {
                    out.push_str("\n\n");
                } else if name == "tr" {
                    out.push('\n');
                }
            }
            _ => walk(child, out),
        }
    }
}

fn push_text(out: &mut String, t: &str) {
    let mut words = t.split_whitespace().peekable();
    if words.peek().is_none() {
        if !t.is_empty() && !out.ends_with([' ', '\n']) {
            out.push(' ');
        }
        return;
    }
    if t.starts_with(char::is_whitespace) && !out.ends_with([' ', '\n']) && !out.is_empty() {
        out.push(' ');
    }
    let joined: Vec<&str> = words.collect();
    out.push_str(&joined.join(" "));
    if t.ends_with(char::is_whitespace) {
        out.push(' ');
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_visible_text_with_paragraphs() {
        let src = "<html><head><title>Annual Report</title><style>p{color:red}</style></head>\
                   <body><h1>Overview</h1><p>Revenue   grew <b>12%</b>.</p><script>var x=1;</script>\
                   <div>Second<br>line</div></body></html>";
        let (title, text) = visible_text(src);
        assert_eq!(title.as_deref(), Some("Annual Report"));
        assert_eq!(text, "Overview\n\nRevenue grew 12%.\n\nSecond\nline");
    }
}
