//! `flow models pull|list|promote`: provision the default models offline, show what is installed
//! or a workflow's trained models, and promote one by hand.

use flow::models;
use flow::store::{Store, models as trained};

use crate::cli::ModelsCommand;

pub async fn models(c: ModelsCommand, quiet: bool) -> anyhow::Result<u8> {
    match c {
        ModelsCommand::Pull => {
            let log = move |m: &str| {
                if !quiet {
                    errln!("{m}");
                }
            };
            let pulled = tokio::task::spawn_blocking(move || models::pull(&log)).await??;
            for p in pulled {
                outln!("{:<24} {} {}", p.name, if p.already { "present " } else { "installed" }, p.dir.display())?;
            }
            Ok(0)
        }
        ModelsCommand::List { workflow: Some(wf), json } => list_trained(&wf, json).await,
        ModelsCommand::Promote { id, target } => {
            let wf = flow::stages::load_workflow(&target.workflow)?;
            let store = Store::open_existing(&wf.store).await?;
            let Some(m) = trained::get(&store, id).await? else {
                return Err(flow::Error::bad_input(
                    format!("model {id} is not in {}", wf.store.display()),
                    "list them with `flow models list -w WORKFLOW`",
                )
                .into());
            };
            if !std::path::Path::new(&m.path).join("model.safetensors").exists() {
                return Err(flow::Error::bad_input(
                    format!("model {id}'s folder {} is gone", m.path),
                    "promote a model whose folder is still there, or retrain",
                )
                .into());
            }
            let replaced = trained::promote(&store, id, "promoted by hand (`flow models promote`)", None).await?;
            match replaced {
                Some(old) => outln!("model {id} promoted; model {old} retired")?,
                None => outln!("model {id} promoted")?,
            }
            Ok(0)
        }
        ModelsCommand::List { workflow: None, json } => {
            let root = models::models_dir();
            let mut rows = Vec::new();
            if let Ok(entries) = std::fs::read_dir(&root) {
                let mut names: Vec<_> =
                    entries.flatten().filter(|e| e.path().is_dir()).map(|e| e.file_name()).collect();
                names.sort();
                for n in names {
                    let name = n.to_string_lossy().to_string();
                    if name.starts_with('.') || name.ends_with(".partial") {
                        continue;
                    }
                    let default = models::DEFAULTS.iter().find(|d| d.name == name);
                    let check = match default {
                        Some(d) => match models::verify(d, &root.join(&name)) {
                            Ok(()) => "verified".to_string(),
                            Err(e) => format!("broken: {e}"),
                        },
                        None => "local".to_string(),
                    };
                    rows.push((name, check, default.map(|d| d.about).unwrap_or("")));
                }
            }
            if json {
                let v: Vec<_> = rows
                    .iter()
                    .map(|(n, c, a)| serde_json::json!({"name": n, "state": c, "about": a, "path": root.join(n)}))
                    .collect();
                outln!("{}", serde_json::to_string_pretty(&v)?)?;
            } else {
                outln!("models folder: {}", root.display())?;
                if rows.is_empty() {
                    outln!("(empty: run `flow models pull`)")?;
                }
                for (n, c, a) in rows {
                    outln!("  {n:<24} {c:<10} {a}")?;
                }
            }
            Ok(0)
        }
    }
}

/// Whether training beat its starting model on validation, as `models list` and the report say it.
fn improved(v: Option<bool>) -> &'static str {
    match v {
        Some(true) => "yes",
        Some(false) => "no (start kept)",
        None => "no validation",
    }
}

async fn list_trained(wf: &std::path::Path, json: bool) -> anyhow::Result<u8> {
    let wf = flow::stages::load_workflow(wf)?;
    let store = Store::open_existing(&wf.store).await?;
    let rows = trained::list(&store).await?;
    if json {
        outln!("{}", serde_json::to_string_pretty(&rows)?)?;
        return Ok(0);
    }
    if rows.is_empty() {
        outln!("no trained models yet (a train stage makes them)")?;
        return Ok(0);
    }
    let metric = |m: &trained::ModelRow| -> String {
        let gate: serde_json::Value = m.gate.as_deref().and_then(|g| serde_json::from_str(g).ok()).unwrap_or_default();
        match (gate["metric"].as_str(), gate["value"].as_f64()) {
            (Some(name), Some(v)) => format!("{name} {v:.4}"),
            _ => "-".into(),
        }
    };
    let val = |m: &trained::ModelRow| -> String {
        let v: serde_json::Value = serde_json::from_str(&m.metrics).unwrap_or_default();
        v["validation"]["recall@10"].as_f64().map(|x| format!("{x:.4}")).unwrap_or_else(|| "-".into())
    };
    let table: Vec<Vec<String>> = rows
        .iter()
        .map(|m| {
            vec![
                m.id.to_string(),
                m.stage.clone(),
                m.retriever.clone(),
                m.status.clone(),
                m.parent_id.map(|p| format!("model {p}")).unwrap_or_else(|| "base".into()),
                val(m),
                improved(m.improved).into(),
                if m.retriever == "mafin" { format!("{:.1}", m.weight) } else { "-".into() },
                m.alpha.map(|a| format!("{a:.2}")).unwrap_or_else(|| "-".into()),
                metric(m),
                super::fmt_time(m.created_at),
                m.status_reason.clone().unwrap_or_default(),
            ]
        })
        .collect();
    outln!(
        "{}",
        super::table(
            &[
                "ID",
                "STAGE",
                "RETRIEVER",
                "STATUS",
                "FROM",
                "VAL R@10",
                "IMPROVED",
                "W",
                "ALPHA",
                "GATE",
                "CREATED",
                "WHY"
            ],
            &table
        )
    )?;
    Ok(0)
}
