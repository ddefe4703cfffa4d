//! What a workflow file says, checked: schema, `${VAR}`, each stage's parameters (by its kind), the DAG.
//! Loading is pure apart from reading the file and the environment; the kinds are handed in from above.

pub mod budget;
pub mod cron;
mod env;
mod models;
pub mod yaml;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;

pub use crate::diag::{Diagnostic, Diagnostics, did_you_mean};
pub use models::{
    BatchSpec, DEFAULT_EMBEDDER, Device, Fallback, Limits, ModelSpec, Precision, Price, Provider, Requantize,
    RetryPolicy, check_base_url, shown_url,
};
use yaml::{Node, Span};

use crate::dag;
use crate::error::{Error, Result};

/// A checked workflow, with every path made absolute.
#[derive(Debug, Clone)]
pub struct Workflow {
    pub name: String,
    pub path: PathBuf,
    pub dir: PathBuf,
    pub store: PathBuf,
    pub schedule: Option<String>,
    /// IANA time zone of `schedule` (UTC when absent).
    pub timezone: Option<String>,
    pub models: BTreeMap<String, ModelSpec>,
    /// What the whole run may spend.
    pub budget: Option<budget::Budget>,
    pub stages: BTreeMap<String, StageSpec>,
    /// Stage names, each after everything it needs.
    pub order: Vec<String>,
}

#[derive(Debug, Clone)]
pub struct StageSpec {
    pub name: String,
    pub kind: String,
    pub needs: Vec<String>,
    /// What this stage may spend in a run (besides the run's own budget).
    pub budget: Option<budget::Budget>,
    /// The stage's parameters as its kind checked them, every default filled in: what the stage
    /// fingerprint hashes, so a default that changes between versions of flow redoes the work.
    pub params: Value,
}

impl StageSpec {
    /// The checked parameters as the kind's typed struct (the type that produced them).
    pub fn params<T: DeserializeOwned>(&self) -> Result<T> {
        serde_json::from_value(self.params.clone()).map_err(|e| Error::Internal {
            what: format!(
                "stage `{}`: its checked parameters do not read back as {}: {e}",
                self.name,
                std::any::type_name::<T>()
            ),
        })
    }
}

impl Workflow {
    /// Every stage `stage` reads from, directly or further up its `needs`, nearest first (each once).
    pub fn upstream(&self, stage: &str) -> Vec<&StageSpec> {
        let mut out: Vec<&StageSpec> = Vec::new();
        let mut todo: std::collections::VecDeque<&str> =
            self.stages.get(stage).map(|s| s.needs.iter().map(String::as_str).collect()).unwrap_or_default();
        while let Some(name) = todo.pop_front() {
            let Some(s) = self.stages.get(name) else { continue };
            if out.iter().any(|o| o.name == s.name) {
                continue;
            }
            todo.extend(s.needs.iter().map(String::as_str));
            out.push(s);
        }
        out
    }
}

/// The stage kinds a workflow may use, as the loader sees them. The kinds themselves live above
/// this layer (in `stages`), which hands them in.
pub trait Kinds {
    fn names(&self) -> Vec<&'static str>;
    /// Checks a stage's parameters with no I/O: all of them with every default filled in, or every
    /// problem found. None when no kind has this name.
    fn check(&self, kind: &str, cx: &CheckCtx) -> Option<Checked>;
}

/// A kind's verdict on a stage's parameters.
pub type Checked = std::result::Result<Value, Vec<Diagnostic>>;

/// The verdict for typed parameters `p` that passed with `diags` found: the canonical parameters
/// (serialised back, so every default is written out) when nothing was found.
pub fn checked<T: Serialize>(p: &T, diags: Vec<Diagnostic>) -> Checked {
    if !diags.is_empty() {
        return Err(diags);
    }
    serde_json::to_value(p).map_err(|e| vec![Diagnostic::new(Span::default(), format!("parameters: {e}"))])
}

/// A setting the user fixes or leaves to flow to choose on validation data (`auto`).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub enum Tunable {
    #[default]
    Auto,
    Fixed(f64),
}

impl Tunable {
    pub fn fixed(self) -> Option<f64> {
        match self {
            Tunable::Auto => None,
            Tunable::Fixed(v) => Some(v),
        }
    }
}

impl Serialize for Tunable {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        match self {
            Tunable::Auto => s.serialize_str("auto"),
            Tunable::Fixed(v) => s.serialize_f64(*v),
        }
    }
}

impl<'de> Deserialize<'de> for Tunable {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        match Value::deserialize(d)? {
            Value::String(s) if s == "auto" => Ok(Tunable::Auto),
            Value::Number(n) if n.as_f64().is_some_and(f64::is_finite) => Ok(Tunable::Fixed(n.as_f64().unwrap_or(0.0))),
            other => Err(serde::de::Error::custom(format!("expected a number or `auto`, found {other}"))),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)] // fields are read through the checked tree; the struct is the schema
struct TopLevel {
    name: String,
    #[serde(default)]
    description: Option<String>,
    store: String,
    #[serde(default)]
    schedule: Option<String>,
    #[serde(default)]
    timezone: Option<String>,
    #[serde(default)]
    models: BTreeMap<String, ModelSpec>,
    #[serde(default)]
    budget: Option<budget::Budget>,
    stages: BTreeMap<String, Value>,
}

/// What a stage kind sees when it checks its parameters.
pub struct CheckCtx<'a> {
    pub stage: &'a str,
    pub node: &'a Node,
    pub params: Value,
    pub models: &'a BTreeMap<String, ModelSpec>,
}

/// Reads, parses and checks a workflow file against `kinds`, reporting every problem found.
pub fn load(path: &Path, kinds: &dyn Kinds) -> Result<Workflow> {
    let source = std::fs::read_to_string(path).map_err(|e| {
        Error::bad_input(
            format!("cannot read workflow {}: {e}", path.display()),
            "pass the path of a workflow YAML file, e.g. `flow run workflows/finance.yaml`",
        )
    })?;
    // A byte-order mark (as some Windows editors write) is not part of the YAML.
    let source = match source.strip_prefix('\u{feff}') {
        Some(rest) => rest.to_string(),
        None => source,
    };
    let abs = std::path::absolute(path).map_err(Error::io(path))?;
    let fail = |items: Vec<Diagnostic>| {
        Error::Workflow(Diagnostics { file: path.to_path_buf(), source: source.clone(), items })
    };
    let mut root = match yaml::parse(&source) {
        Ok(Some(root)) => root,
        Ok(None) => {
            return Err(fail(vec![
                Diagnostic::new(Span { line: 1, col: 1 }, "the workflow file is empty")
                    .hint("a workflow needs at least `name`, `store` and `stages`"),
            ]));
        }
        Err(e) => {
            return Err(fail(vec![
                Diagnostic::new(e.span, format!("YAML syntax: {}", e.message))
                    .hint("check indentation and that every `[`/`{` is closed"),
            ]));
        }
    };
    let mut diags = Vec::new();
    env::expand_env(&mut root, &mut diags);
    let wf = check(&root, &abs, kinds, &mut diags);
    if !diags.is_empty() {
        diags.sort_by_key(|d| (d.span.line, d.span.col));
        return Err(fail(diags));
    }
    Ok(wf.expect("a workflow with no problems is built"))
}

fn check(root: &Node, abs: &Path, kinds: &dyn Kinds, diags: &mut Vec<Diagnostic>) -> Option<Workflow> {
    let Node::Map { .. } = root else {
        diags.push(
            Diagnostic::new(root.span(), format!("the workflow must be a mapping, found {}", root.type_name()))
                .hint("start with `name: ...`, `store: ...`, `stages: ...`"),
        );
        return None;
    };
    let top: Option<TopLevel> = check_typed(root, root.to_json(), diags);
    let mut top = top?;
    models::add_defaults(&mut top.models);

    check_top(root, &top, diags);

    let stages_node = root.get("stages")?;
    let mut stages = BTreeMap::new();
    for (name, raw) in &top.stages {
        let node = stages_node.get(name)?;
        let key_span = stages_node.key_span(name).unwrap_or_default();
        if let Some(spec) = check_stage(name, raw, node, key_span, &top.models, kinds, diags) {
            stages.insert(name.clone(), spec);
        }
    }
    if top.stages.is_empty() {
        diags.push(
            Diagnostic::new(stages_node.span(), "`stages` is empty")
                .hint("add a stage, e.g. `chunk: { kind: chunk, corpus: docs/ }`"),
        );
    }

    let edges = check_needs(stages_node, &stages, &top.stages, diags);
    let order = match dag::order(&edges) {
        Ok(order) => order,
        Err(cycle) => {
            let span = stages_node.key_span(&cycle[0]).unwrap_or_default();
            diags.push(
                Diagnostic::new(span, format!("the stages form a cycle: {}", cycle.join(" -> ")))
                    .hint("remove one of these `needs` so the stages can run in order"),
            );
            return None;
        }
    };
    if !diags.is_empty() {
        return None;
    }
    let dir = abs.parent().unwrap_or(Path::new("/")).to_path_buf();
    Some(Workflow {
        name: top.name,
        path: abs.to_path_buf(),
        store: dir.join(&top.store),
        dir,
        schedule: top.schedule,
        timezone: top.timezone,
        models: top.models,
        budget: top.budget,
        stages,
        order,
    })
}

/// The top-level settings besides models and stages: the cron schedule, its time zone, the run's budget;
/// and each model entry.
fn check_top(root: &Node, top: &TopLevel, diags: &mut Vec<Diagnostic>) {
    if top.store.trim().is_empty() {
        let span = root.get("store").map(Node::span).unwrap_or_default();
        diags.push(
            Diagnostic::new(span, "`store` is empty: it names the SQLite file the run keeps everything in")
                .hint("e.g. `store: finance.db` (relative to this file)"),
        );
    }
    if let Some(expr) = &top.schedule
        && let Err(e) = cron::parse(expr, None)
    {
        let span = root.get("schedule").map(Node::span).unwrap_or_default();
        diags.push(
            Diagnostic::new(span, format!("`schedule`: {e}")).hint(
                "five cron fields: minute hour day-of-month month day-of-week, e.g. \"0 2 * * *\" for 02:00 daily",
            ),
        );
    }
    if let Some(tz) = &top.timezone
        && tz.parse::<chrono_tz::Tz>().is_err()
    {
        let span = root.get("timezone").map(Node::span).unwrap_or_default();
        diags.push(
            Diagnostic::new(span, format!("`timezone`: unknown time zone {tz:?}"))
                .hint("an IANA name such as Europe/Berlin, America/New_York or UTC"),
        );
    }
    if let Some(problem) = top.budget.as_ref().and_then(budget::Budget::problem) {
        let span = root.get("budget").map(Node::span).unwrap_or_default();
        diags.push(Diagnostic::new(span, format!("`budget`: {problem}")));
    }
    for (name, spec) in &top.models {
        let entry = root.get("models").and_then(|m| m.get(name));
        let at = |key: &str| entry.and_then(|e| e.get(key)).or(entry).map(Node::span).unwrap_or_default();
        let key = root.get("models").and_then(|m| m.key_span(name)).unwrap_or_default();
        models::check(name, spec, (key, &at), diags);
    }
}

/// Each stage's `needs` against the stages there are (a name that is none is reported with a hint):
/// the edges among known stages, for the cycle check.
fn check_needs(
    stages_node: &Node,
    stages: &BTreeMap<String, StageSpec>,
    all: &BTreeMap<String, Value>,
    diags: &mut Vec<Diagnostic>,
) -> BTreeMap<String, Vec<String>> {
    let mut edges: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (name, spec) in stages {
        let mut known = Vec::new();
        for (i, need) in spec.needs.iter().enumerate() {
            if all.contains_key(need) {
                known.push(need.clone());
            } else {
                let node = stages_node.get(name).and_then(|s| s.get("needs"));
                let span = match node {
                    Some(Node::Seq { items, .. }) => items.get(i).map(Node::span),
                    other => other.map(Node::span),
                }
                .unwrap_or_default();
                let mut d = Diagnostic::new(span, format!("stage `{name}` needs `{need}`, which is not a stage"));
                d = match did_you_mean(need, all.keys().map(String::as_str)) {
                    Some(s) => d.hint(format!("did you mean `{s}`?")),
                    None => d.hint(format!("stages here: {}", all.keys().cloned().collect::<Vec<_>>().join(", "))),
                };
                diags.push(d);
            }
        }
        edges.insert(name.clone(), known);
    }
    edges
}

fn check_stage(
    name: &str,
    raw: &Value,
    node: &Node,
    key_span: Span,
    models: &BTreeMap<String, ModelSpec>,
    kinds: &dyn Kinds,
    diags: &mut Vec<Diagnostic>,
) -> Option<StageSpec> {
    let Value::Object(map) = raw else {
        diags.push(
            Diagnostic::new(node.span(), format!("stage `{name}` must be a mapping, found {}", node.type_name()))
                .hint("write `name: { kind: chunk, ... }`"),
        );
        return None;
    };
    let mut params = map.clone();
    let kind_name = match params.remove("kind") {
        Some(Value::String(k)) => k,
        Some(_) => {
            let span = node.get("kind").map(Node::span).unwrap_or(key_span);
            diags.push(
                Diagnostic::new(span, format!("stage `{name}`: `kind` must be a string")).hint(kinds_hint(kinds)),
            );
            return None;
        }
        None => {
            diags.push(Diagnostic::new(key_span, format!("stage `{name}` has no `kind`")).hint(kinds_hint(kinds)));
            return None;
        }
    };
    let needs = match params.remove("needs") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::String(s)) => vec![s],
        Some(Value::Array(items)) if items.iter().all(Value::is_string) => {
            items.into_iter().filter_map(|v| v.as_str().map(str::to_string)).collect()
        }
        Some(_) => {
            let span = node.get("needs").map(Node::span).unwrap_or(key_span);
            diags.push(
                Diagnostic::new(span, format!("stage `{name}`: `needs` must be a stage name or a list of them"))
                    .hint("e.g. `needs: [chunk]`"),
            );
            Vec::new()
        }
    };
    let budget = params.remove("budget").and_then(|v| {
        let span = node.get("budget").map(Node::span).unwrap_or(key_span);
        budget::of_stage(v, name, span, diags)
    });
    let params = Value::Object(params);
    let cx = CheckCtx { stage: name, node, params, models };
    let Some(verdict) = kinds.check(&kind_name, &cx) else {
        let span = node.get("kind").map(Node::span).unwrap_or(key_span);
        let mut d = Diagnostic::new(span, format!("stage `{name}`: unknown kind `{kind_name}`"));
        d = match did_you_mean(&kind_name, kinds.names()) {
            Some(s) => d.hint(format!("did you mean `{s}`? {}", kinds_hint(kinds))),
            None => d.hint(kinds_hint(kinds)),
        };
        diags.push(d);
        return None;
    };
    match verdict {
        Ok(params) => Some(StageSpec { name: name.to_string(), kind: kind_name, needs, budget, params }),
        Err(found) => {
            diags.extend(found);
            None
        }
    }
}

fn kinds_hint(kinds: &dyn Kinds) -> String {
    format!("stage kinds: {}", kinds.names().join(", "))
}

/// Deserialises `value` into `T`, turning every serde error into a diagnostic at the right place.
/// Unknown keys and badly typed values are removed one at a time and the rest checked again, so a
/// file with several mistakes reports them all at once.
pub fn check_typed<T: DeserializeOwned>(node: &Node, mut value: Value, diags: &mut Vec<Diagnostic>) -> Option<T> {
    let mut reported: Vec<String> = Vec::new();
    let mut clean = true;
    for _ in 0..64 {
        let err = match serde_path_to_error::deserialize::<_, T>(&value) {
            Ok(t) => return clean.then_some(t),
            Err(e) => e,
        };
        clean = false;
        let path: Vec<String> = err
            .path()
            .iter()
            .filter_map(|seg| match seg {
                serde_path_to_error::Segment::Map { key } => Some(key.clone()),
                serde_path_to_error::Segment::Seq { index } => Some(index.to_string()),
                _ => None,
            })
            .collect();
        let msg = err.inner().to_string();
        if let Some(field) = between(&msg, "unknown field `", "`") {
            let parent: Vec<String> = if path.last().map(String::as_str) == Some(field) {
                path[..path.len() - 1].to_vec()
            } else {
                path.clone()
            };
            let at = node.at_path(&parent);
            let span = at.and_then(|n| n.key_span(field)).or(at.map(Node::span)).unwrap_or_default();
            let expected: Vec<&str> = msg.split('`').skip(3).step_by(2).collect();
            let mut d = Diagnostic::new(span, format!("unknown key `{field}`{}", place(&parent)));
            d = match did_you_mean(field, expected.iter().copied()) {
                Some(s) => d.hint(format!("did you mean `{s}`?")),
                None if expected.is_empty() => d.hint("remove it"),
                None => d.hint(format!("expected one of: {}", expected.join(", "))),
            };
            diags.push(d);
            if !remove(&mut value, &parent, Some(field)) {
                return None;
            }
        } else if let Some(field) = between(&msg, "missing field `", "`") {
            let mut full = path.clone();
            full.push(field.to_string());
            if !reported.contains(&full.join(".")) {
                let span = node.at_path(&path).map(Node::span).unwrap_or_default();
                diags.push(
                    Diagnostic::new(span, format!("missing key `{field}`{}", place(&path)))
                        .hint(format!("add `{field}: ...`")),
                );
            }
            return None;
        } else {
            let span = node.at_path(&path).map(Node::span).unwrap_or_default();
            let what = if path.is_empty() { String::new() } else { format!("`{}`: ", path.join(".")) };
            diags.push(Diagnostic::new(span, format!("{what}{}", tidy_serde(&msg))).hint(type_hint(&msg)));
            reported.push(path.join("."));
            if path.is_empty() || !remove(&mut value, &path[..path.len() - 1], path.last().map(String::as_str)) {
                return None;
            }
        }
    }
    None
}

fn between<'a>(s: &'a str, start: &str, end: &str) -> Option<&'a str> {
    let rest = &s[s.find(start)? + start.len()..];
    Some(&rest[..rest.find(end)?])
}

fn place(path: &[String]) -> String {
    if path.is_empty() { String::new() } else { format!(" in `{}`", path.join(".")) }
}

fn tidy_serde(msg: &str) -> String {
    msg.replace("invalid type: ", "wrong type: found ").replace(", expected", "; expected")
}

fn type_hint(msg: &str) -> String {
    if msg.contains("expected usize") || msg.contains("expected u") || msg.contains("expected i") {
        "write a whole number, e.g. `256`".into()
    } else if msg.contains("expected f") {
        "write a number, e.g. `0.5`".into()
    } else if msg.contains("expected a string") {
        "quote the value: `\"...\"`".into()
    } else if msg.contains("expected a sequence") {
        "write a list: `[a, b]`".into()
    } else if msg.contains("unknown variant") {
        "use one of the values listed".into()
    } else {
        "see the stage kind's parameters in the README".into()
    }
}

fn remove(value: &mut Value, parent: &[String], key: Option<&str>) -> bool {
    let mut v = value;
    for seg in parent {
        v = match v {
            Value::Object(m) => match m.get_mut(seg) {
                Some(x) => x,
                None => return false,
            },
            Value::Array(a) => match seg.parse::<usize>().ok().and_then(|i| a.get_mut(i)) {
                Some(x) => x,
                None => return false,
            },
            _ => return false,
        };
    }
    match (v, key) {
        (Value::Object(m), Some(k)) => m.remove(k).is_some(),
        (Value::Array(a), Some(k)) => match k.parse::<usize>() {
            Ok(i) if i < a.len() => {
                a.remove(i);
                true
            }
            _ => false,
        },
        _ => false,
    }
}
