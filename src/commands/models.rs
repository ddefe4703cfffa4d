//! `flow models pull|list|promote`: provision the default models offline, show what is installed
//! or a workflow's trained models, and promote one by hand.

use flow::models;
use flow::store::{Store, models as trained};

use crate::cli::ModelsCommand;

pub async fn models(c: ModelsCommand, quiet: bool) -> anyhow::Result<u8> {
    match c {
        ModelsCommand::Pull { names, find_links } => {
            let log = move |m: &str| {
                if !quiet {
                    errln!("{m}");
                }
            };
            let index = models::Index { find_links };
            let pulled = tokio::task::spawn_blocking(move || models::pull(&names, &index, &log)).await??;
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
        ModelsCommand::List { workflow: None, json } => list_installed(json),
    }
}

/// The models folder: each folder with its size, where it came from and whether it checks out, and
/// the catalogue models not pulled yet.
fn list_installed(json: bool) -> anyhow::Result<u8> {
    let root = models::models_dir();
    let mut names: Vec<String> = std::fs::read_dir(&root)
        .map(|entries| {
            entries
                .flatten()
                .filter(|e| e.path().is_dir())
                .map(|e| e.file_name().to_string_lossy().to_string())
                .filter(|n| !n.starts_with('.') && !n.ends_with(".partial"))
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    let mut rows: Vec<serde_json::Value> = names
        .iter()
        .map(|name| {
            let dir = root.join(name);
            let known = models::find(name);
            let state = match known {
                Some(k) => match models::verify(k, &dir) {
                    Ok(()) => "verified".to_string(),
                    Err(e) => format!("broken: {}", e.to_string().lines().next().unwrap_or_default()),
                },
                None => "local".to_string(),
            };
            serde_json::json!({
                "name": name, "state": state, "bytes": models::size_on_disk(&dir),
                "origin": known.map(|k| k.origin()).unwrap_or_else(|| "placed by hand".into()),
                "about": known.map(|k| k.about).unwrap_or(""), "path": dir,
            })
        })
        .collect();
    for k in models::CATALOGUE.iter().filter(|k| !names.iter().any(|n| n == k.name)) {
        rows.push(serde_json::json!({
            "name": k.name, "state": "not pulled", "bytes": 0, "origin": k.origin(), "about": k.about,
            "path": root.join(k.name),
        }));
    }
    if json {
        outln!("{}", serde_json::to_string_pretty(&rows)?)?;
        return Ok(0);
    }
    outln!("models folder: {}", root.display())?;
    for r in rows {
        let bytes = r["bytes"].as_u64().unwrap_or(0);
        let size = if bytes == 0 { "-".to_string() } else { format!("{:.1} MB", bytes as f64 / 1e6) };
        outln!(
            "  {:<28} {:<10} {:>9}  {}",
            r["name"].as_str().unwrap_or(""),
            r["state"].as_str().unwrap_or(""),
            size,
            r["about"].as_str().unwrap_or("")
        )?;
        outln!("  {:<28} from {}", "", r["origin"].as_str().unwrap_or(""))?;
    }
    Ok(0)
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
        match (v["validation"]["recall@10"].as_f64(), v["validation"]["ndcg@10"].as_f64()) {
            (Some(r), Some(n)) => format!("{r:.4} / {n:.4}"),
            _ => "-".into(),
        }
    };
    let table: Vec<Vec<String>> = rows
        .iter()
        .map(|m| {
            vec![
                m.id.to_string(),
                m.stage.clone(),
                m.retriever.clone(),
                m.status.to_string(),
                m.parent_id.map(|p| format!("model {p}")).unwrap_or_else(|| "base".into()),
                val(m),
                improved(m.improved).into(),
                flow::retriever::settings_label(m),
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
                "VAL R@10 / NDCG@10",
                "IMPROVED",
                "SETTINGS",
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
