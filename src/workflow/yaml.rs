//! A YAML document as a tree that remembers where every key and value stood.
//! yaml-rust2's event parser gives the positions; serde only ever sees the checked tree.

use std::collections::BTreeMap;

use yaml_rust2::parser::{Event, MarkedEventReceiver, Parser};
use yaml_rust2::scanner::{Marker, TScalarStyle};

pub use crate::diag::Span;

fn span(m: Marker) -> Span {
    // yaml-rust2 counts lines from 1 and columns from 0.
    Span { line: m.line(), col: m.col() + 1 }
}

#[derive(Debug, Clone)]
pub enum Node {
    /// `plain` is false for quoted and block scalars: those are always strings.
    Scalar {
        value: String,
        plain: bool,
        span: Span,
    },
    Seq {
        items: Vec<Node>,
        span: Span,
    },
    Map {
        entries: Vec<(Key, Node)>,
        span: Span,
    },
}

#[derive(Debug, Clone)]
pub struct Key {
    pub name: String,
    pub span: Span,
}

impl Node {
    pub fn span(&self) -> Span {
        match self {
            Node::Scalar { span, .. } | Node::Seq { span, .. } | Node::Map { span, .. } => *span,
        }
    }

    pub fn get(&self, key: &str) -> Option<&Node> {
        match self {
            Node::Map { entries, .. } => entries.iter().find(|(k, _)| k.name == key).map(|(_, v)| v),
            _ => None,
        }
    }

    pub fn key_span(&self, key: &str) -> Option<Span> {
        match self {
            Node::Map { entries, .. } => entries.iter().find(|(k, _)| k.name == key).map(|(k, _)| k.span),
            _ => None,
        }
    }

    /// The value as JSON, with YAML 1.2 core-schema typing of plain scalars.
    pub fn to_json(&self) -> serde_json::Value {
        use serde_json::Value;
        match self {
            Node::Scalar { value, plain: false, .. } => Value::String(value.clone()),
            Node::Scalar { value, plain: true, .. } => plain_scalar(value),
            Node::Seq { items, .. } => Value::Array(items.iter().map(Node::to_json).collect()),
            Node::Map { entries, .. } => {
                Value::Object(entries.iter().map(|(k, v)| (k.name.clone(), v.to_json())).collect())
            }
        }
    }

    /// Finds the node at a path of map keys and list indexes, as serde_path_to_error reports it.
    pub fn at_path<'a>(&'a self, path: &[String]) -> Option<&'a Node> {
        let mut node = self;
        for seg in path {
            node = match node {
                Node::Map { .. } => node.get(seg)?,
                Node::Seq { items, .. } => items.get(seg.parse::<usize>().ok()?)?,
                Node::Scalar { .. } => return None,
            };
        }
        Some(node)
    }

    pub fn type_name(&self) -> &'static str {
        match self {
            Node::Scalar { .. } => "a value",
            Node::Seq { .. } => "a list",
            Node::Map { .. } => "a mapping",
        }
    }
}

fn plain_scalar(v: &str) -> serde_json::Value {
    use serde_json::Value;
    match v {
        "" | "~" | "null" | "Null" | "NULL" => return Value::Null,
        "true" | "True" | "TRUE" => return Value::Bool(true),
        "false" | "False" | "FALSE" => return Value::Bool(false),
        _ => {}
    }
    if let Ok(i) = v.parse::<i64>() {
        return Value::from(i);
    }
    let looks_numeric = v.bytes().next().is_some_and(|b| b.is_ascii_digit() || b"+-.".contains(&b));
    if looks_numeric
        && let Ok(f) = v.parse::<f64>()
        && f.is_finite()
    {
        return Value::from(f);
    }
    Value::String(v.to_string())
}

/// A syntax error: the parser stops at the first one.
#[derive(Debug)]
pub struct SyntaxError {
    pub message: String,
    pub span: Span,
}

/// The most values a workflow may expand to, aliases included: far above any real workflow, far
/// below what an alias bomb (`a: &a [*b, *b, ...]` nested) would need to exhaust memory.
const MAX_VALUES: usize = 100_000;

pub fn parse(src: &str) -> Result<Option<Node>, SyntaxError> {
    let mut builder = Builder::default();
    let mut parser = Parser::new_from_str(src);
    // All documents are read, so that a second one is reported rather than silently ignored.
    parser
        .load(&mut builder, true)
        .map_err(|e| SyntaxError { message: e.info().to_string(), span: span(*e.marker()) })?;
    if let Some(err) = builder.error {
        return Err(err);
    }
    Ok(builder.root)
}

enum Open {
    Seq(Vec<Node>, Span),
    Map(Vec<(Key, Node)>, Option<Key>, Span),
}

#[derive(Default)]
struct Builder {
    stack: Vec<Open>,
    root: Option<Node>,
    anchors: BTreeMap<usize, (Node, usize)>,
    pending_anchor: Vec<usize>,
    error: Option<SyntaxError>,
    documents: usize,
    /// Values made so far, each alias counting as many as it copies.
    values: usize,
}

fn count(node: &Node) -> usize {
    match node {
        Node::Scalar { .. } => 1,
        Node::Seq { items, .. } => 1 + items.iter().map(count).sum::<usize>(),
        Node::Map { entries, .. } => 1 + entries.iter().map(|(_, n)| 1 + count(n)).sum::<usize>(),
    }
}

impl Builder {
    fn push_value(&mut self, node: Node) {
        match self.stack.last_mut() {
            None => self.root = Some(node),
            Some(Open::Seq(items, _)) => items.push(node),
            Some(Open::Map(entries, key, _)) => match key.take() {
                None => match node {
                    Node::Scalar { value, span, .. } => {
                        if entries.iter().any(|(k, _)| k.name == value) && self.error.is_none() {
                            self.error = Some(SyntaxError {
                                message: format!("duplicate key `{value}`: each key may appear once in a mapping"),
                                span,
                            });
                        }
                        *key = Some(Key { name: value, span });
                    }
                    other => {
                        if self.error.is_none() {
                            self.error = Some(SyntaxError {
                                message: "a mapping key must be a plain value, not a list or mapping".into(),
                                span: other.span(),
                            });
                        }
                        *key = Some(Key { name: String::new(), span: other.span() });
                    }
                },
                Some(k) => entries.push((k, node)),
            },
        }
    }

    fn remember(&mut self, anchor: usize, node: &Node) {
        if anchor > 0 {
            self.anchors.insert(anchor, (node.clone(), count(node)));
        }
    }

    fn fail(&mut self, message: String, span: Span) {
        if self.error.is_none() {
            self.error = Some(SyntaxError { message, span });
        }
    }
}

impl MarkedEventReceiver for Builder {
    fn on_event(&mut self, ev: Event, mark: Marker) {
        let span = span(mark);
        if self.error.is_some() {
            return;
        }
        self.values += 1;
        match ev {
            Event::Scalar(value, style, anchor, _tag) => {
                let node = Node::Scalar { value, plain: style == TScalarStyle::Plain, span };
                self.remember(anchor, &node);
                self.push_value(node);
            }
            Event::SequenceStart(anchor, _) => {
                self.pending_anchor.push(anchor);
                self.stack.push(Open::Seq(Vec::new(), span));
            }
            Event::MappingStart(anchor, _) => {
                self.pending_anchor.push(anchor);
                self.stack.push(Open::Map(Vec::new(), None, span));
            }
            Event::SequenceEnd | Event::MappingEnd => {
                let node = match self.stack.pop() {
                    Some(Open::Seq(items, span)) => Node::Seq { items, span },
                    Some(Open::Map(entries, _, span)) => Node::Map { entries, span },
                    None => return,
                };
                let anchor = self.pending_anchor.pop().unwrap_or(0);
                self.remember(anchor, &node);
                self.push_value(node);
            }
            Event::Alias(id) => {
                let (node, size) = self
                    .anchors
                    .get(&id)
                    .cloned()
                    .unwrap_or((Node::Scalar { value: String::new(), plain: true, span }, 1));
                self.values += size;
                if self.values > MAX_VALUES {
                    let msg =
                        format!("the aliases here expand the file to more than {MAX_VALUES} values (an alias bomb?)");
                    return self.fail(msg, span);
                }
                self.push_value(node);
            }
            Event::DocumentStart => {
                self.documents += 1;
                if self.documents > 1 {
                    let msg = "a second YAML document (after `---`): a workflow file holds one".to_string();
                    self.fail(msg, span);
                }
            }
            Event::Nothing | Event::StreamStart | Event::StreamEnd | Event::DocumentEnd => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_document_and_an_alias_bomb_are_errors() {
        let err = parse("name: a\n---\nname: b\n").unwrap_err();
        assert!(err.message.contains("second YAML document") && err.span.line == 2, "{err:?}");
        let mut bomb = String::from("a: &a [x, x, x, x, x, x, x, x, x, x]\n");
        for (i, prev) in ["b", "c", "d", "e", "f", "g", "h"].iter().zip(["a", "b", "c", "d", "e", "f", "g"]) {
            bomb.push_str(&format!(
                "{i}: &{i} [*{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}]\n"
            ));
        }
        let err = parse(&bomb).unwrap_err();
        assert!(err.message.contains("alias bomb"), "{err:?}");
        assert!(parse("a: &x [1, 2]\nb: *x\n").is_ok());
    }

    #[test]
    fn spans_and_types() {
        let src = "name: x\nstages:\n  a: { kind: chunk, max_tokens: 256 }\n  b:\n    kind: \"42\"\n";
        let root = parse(src).unwrap().unwrap();
        assert_eq!(root.key_span("stages"), Some(Span { line: 2, col: 1 }));
        let a = root.get("stages").unwrap().get("a").unwrap();
        assert_eq!(a.key_span("max_tokens"), Some(Span { line: 3, col: 21 }));
        let json = root.to_json();
        assert_eq!(json["stages"]["a"]["max_tokens"], 256);
        assert_eq!(json["stages"]["b"]["kind"], "42");
    }

    #[test]
    fn duplicate_key_is_an_error() {
        let err = parse("a: 1\na: 2\n").unwrap_err();
        assert_eq!(err.span.line, 2);
        assert!(err.message.contains("duplicate key"));
    }

    #[test]
    fn syntax_error_has_a_place() {
        let err = parse("a: [1, 2\nb: 3\n").unwrap_err();
        assert!(err.span.line >= 1);
    }
}
