//! Prompt templates: minijinja files (or the built-in copies of prompts/) whose errors name the
//! template and line, and whose text is part of the stage fingerprint.

use std::path::{Path, PathBuf};

use minijinja::{Environment, UndefinedBehavior};
use serde::Serialize;

use crate::digest::sha256_hex;
use crate::error::{Error, Result};

pub struct Template {
    pub path: PathBuf,
    pub hash: String,
    env: Environment<'static>,
    name: String,
}

/// The templates of prompts/, carried in the binary: what a stage renders when its workflow names
/// no prompt file. (file name, source)
pub const BUILTIN: &[(&str, &str)] = &[
    ("generate_queries.j2", include_str!("../prompts/generate_queries.j2")),
    ("generate_query_local.j2", include_str!("../prompts/generate_query_local.j2")),
    ("judge.j2", include_str!("../prompts/judge.j2")),
    ("judge_local.j2", include_str!("../prompts/judge_local.j2")),
    ("rag_answer.j2", include_str!("../prompts/rag_answer.j2")),
    ("rag_grade.j2", include_str!("../prompts/rag_grade.j2")),
];

impl Template {
    pub fn load(path: &Path) -> Result<Template> {
        let source = std::fs::read_to_string(path).map_err(|e| {
            Error::bad_input(
                format!("cannot read prompt template {}: {e}", path.display()),
                "`prompt:` is relative to the workflow file; leave it out to use the built-in prompt",
            )
        })?;
        Template::new(path.display().to_string(), path, source)
    }

    /// The built-in copy of `prompts/<file>`.
    pub fn builtin(file: &str) -> Result<Template> {
        let (_, source) = BUILTIN
            .iter()
            .find(|(f, _)| *f == file)
            .ok_or_else(|| Error::Internal { what: format!("no built-in prompt {file}") })?;
        let name = format!("(built in) prompts/{file}");
        Template::new(name.clone(), Path::new(&name), source.to_string())
    }

    fn new(name: String, path: &Path, source: String) -> Result<Template> {
        let mut env = Environment::new();
        // A misspelt variable must fail loudly, not render as an empty string.
        env.set_undefined_behavior(UndefinedBehavior::Strict);
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.add_template_owned(name.clone(), source.clone()).map_err(|e| template_error(&name, &e))?;
        Ok(Template { path: path.to_path_buf(), hash: sha256_hex(source.as_bytes()), env, name })
    }

    /// Renders once with the documented variables (sample values), so a template that uses an
    /// unknown variable fails now, with its file:line, and not after calls were paid for.
    pub fn checked(self, sample: impl Serialize) -> Result<Template> {
        self.render(sample)?;
        Ok(self)
    }

    pub fn render(&self, ctx: impl Serialize) -> Result<String> {
        let t = self.env.get_template(&self.name).map_err(|e| template_error(&self.name, &e))?;
        let out = t.render(ctx).map_err(|e| template_error(&self.name, &e))?;
        Ok(out.trim().to_string())
    }
}

fn template_error(name: &str, e: &minijinja::Error) -> Error {
    let line = e.line().map(|l| format!(":{l}")).unwrap_or_default();
    let detail = e.detail().map(|d| format!(": {d}")).unwrap_or_default();
    Error::bad_input(
        format!("prompt template {name}{line}: {}{detail}", e.kind()),
        "fix the template; the variables each prompt gets are listed in the README",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_name_the_template_and_line() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t.j2");
        std::fs::write(&p, "Hello {{ chunk }}\n{% for x in %}{% endfor %}\n").unwrap();
        let t = Template::load(&p);
        let msg = t.err().map(|e| e.to_string()).unwrap_or_default();
        assert!(msg.contains("t.j2:2"), "{msg}");

        std::fs::write(&p, "Hello {{ chunk }}\n\n{{ tittle }}\n").unwrap();
        let t = Template::load(&p).unwrap();
        let msg = t.render(serde_json::json!({"chunk": "x", "title": "y"})).unwrap_err().to_string();
        assert!(msg.contains("t.j2:3") && msg.contains("undefined"), "{msg}");
        assert_eq!(t.render(serde_json::json!({"chunk": "x", "tittle": "y"})).unwrap(), "Hello x\n\ny");
    }
}
