//! `flow validate`: every check that spends nothing (the workflow file, its prompt templates rendered
//! against their variables, URLs); every problem in every file, exit 2 if any.

use crate::cli::ValidateArgs;

pub fn validate(a: ValidateArgs) -> anyhow::Result<u8> {
    let mut code = 0;
    let mut json = Vec::new();
    for file in &a.files {
        match flow::stages::load_workflow(file).and_then(|wf| flow::stages::preflight(&wf).map(|_| wf)) {
            Ok(wf) => {
                if a.json {
                    json.push(serde_json::json!({"file": file, "ok": true, "stages": wf.order}));
                } else {
                    let n = wf.order.len();
                    let noun = if n == 1 { "stage" } else { "stages" };
                    outln!("{}: ok ({n} {noun}: {})", file.display(), wf.order.join(" -> "))?;
                }
            }
            Err(e) => {
                code = code.max(e.exit_code());
                if a.json {
                    let problems: Vec<_> = match &e {
                        flow::Error::Workflow(d) => d
                            .items
                            .iter()
                            .map(|p| serde_json::json!({"line": p.span.line, "col": p.span.col, "message": p.message, "hint": p.hint}))
                            .collect(),
                        other => vec![serde_json::json!({"message": other.to_string()})],
                    };
                    json.push(serde_json::json!({"file": file, "ok": false, "problems": problems}));
                } else {
                    errln!("{}", super::render_error(&e.into()));
                }
            }
        }
    }
    if a.json {
        outln!("{}", serde_json::to_string_pretty(&json)?)?;
    }
    Ok(code)
}
