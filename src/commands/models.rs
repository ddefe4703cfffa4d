//! `flow models pull|list`: provision the default models offline and show what is installed.

use flow::models;

use crate::cli::ModelsCommand;

pub async fn models(c: ModelsCommand, quiet: bool) -> anyhow::Result<u8> {
    match c {
        ModelsCommand::Pull => {
            let log = move |m: &str| {
                if !quiet {
                    eprintln!("{m}");
                }
            };
            let pulled = tokio::task::spawn_blocking(move || models::pull(&log)).await??;
            for p in pulled {
                println!("{:<24} {} {}", p.name, if p.already { "present " } else { "installed" }, p.dir.display());
            }
            Ok(0)
        }
        ModelsCommand::List { json } => {
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
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                println!("models folder: {}", root.display());
                if rows.is_empty() {
                    println!("(empty: run `flow models pull`)");
                }
                for (n, c, a) in rows {
                    println!("  {n:<24} {c:<10} {a}");
                }
            }
            Ok(0)
        }
    }
}
