//! The trainable augment model: our differentiable BERT graph (`bert::graph`) over a candle-nn VarMap,
//! started from a sentence-transformers folder (or random weights), saved back as a folder it loads.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};

use super::loss::normalize;
use crate::bert::encoder::{Folder, SentenceEncoder, padded_batch, pool};
use crate::error::{Error, Result};

pub struct Augment {
    pub varmap: VarMap,
    pub model: crate::bert::graph::TrainBert,
    pub folder: Folder,
    pub device: Device,
    /// Tensors of the parent's file that are not trained (BERT's pooler): saved unchanged, so the
    /// checkpoint loads in transformers without "newly initialized" weights.
    kept: std::sync::Mutex<HashMap<String, Tensor>>,
}

fn weights_error(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::bad_input(
        format!("{}: cannot use these weights: {e}", path.display()),
        "the augment model starts from a BERT sentence-transformers folder (e.g. all-MiniLM-L6-v2)",
    )
}

impl Augment {
    /// A model over `folder`'s architecture with the weights of `weights` (a model.safetensors, with
    /// or without a `bert.` prefix), or candle's random initialisation when `weights` is None.
    pub fn new(folder: Folder, weights: Option<&Path>, device: &Device) -> Result<Augment> {
        if folder.arch == crate::bert::Arch::Mpnet {
            return Err(Error::bad_input(
                format!(
                    "{}: an MPNet model cannot be trained by flow (its augment model is a BERT)",
                    folder.dir.display()
                ),
                "use MPNet as `black_box:` and a BERT folder (e.g. all-MiniLM-L6-v2) as the train stage's `init:`",
            ));
        }
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, device);
        let model =
            crate::bert::graph::TrainBert::load(vb, &folder.config).map_err(|e| weights_error(&folder.dir, e))?;
        let aug = Augment { varmap, model, folder, device: device.clone(), kept: Default::default() };
        if let Some(path) = weights {
            aug.load_weights(path)?;
        }
        Ok(aug)
    }

    /// Overwrites every parameter from a safetensors file.
    pub fn load_weights(&self, path: &Path) -> Result<()> {
        let tensors = candle_core::safetensors::load(path, &self.device).map_err(|e| weights_error(path, e))?;
        set_vars(&self.varmap, &tensors, |_| false, &|e| weights_error(path, e))?;
        let mut kept = self.kept.lock().expect("kept lock");
        kept.clear();
        for (name, t) in tensors {
            let name = name.strip_prefix("bert.").unwrap_or(&name).to_string();
            if name.starts_with("pooler.") {
                kept.insert(name, t);
            }
        }
        Ok(())
    }

    /// Parameters by name, sorted so every run visits them in the same order.
    pub fn named_vars(&self) -> Vec<(String, candle_core::Var)> {
        let mut v: Vec<_> =
            self.varmap.data().lock().expect("varmap lock").iter().map(|(n, v)| (n.clone(), v.clone())).collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    /// Pooled (and, as the folder says, normalised) embeddings as a graph that gradients flow through.
    pub fn encode(&self, texts: &[&str]) -> candle_core::Result<Tensor> {
        self.encode_with(texts, None)
    }

    /// `encode` with training dropout.
    pub fn encode_with(
        &self,
        texts: &[&str],
        drop: Option<&crate::bert::dropout::Dropout>,
    ) -> candle_core::Result<Tensor> {
        let enc = self.folder.tokenizer.encode_batch(texts.to_vec(), true).map_err(candle_core::Error::msg)?;
        let seqs: Vec<&[u32]> = enc.iter().map(|e| e.get_ids()).collect();
        let (ids, mask) = padded_batch(&seqs, &self.device)?;
        let hidden = self.model.forward_with(&ids, &mask, drop)?;
        let pooled = pool(&hidden, &mask, self.folder.pooling)?;
        // Training always compares cosines, whether or not the folder normalises its output.
        normalize(&pooled)
    }

    /// An inference encoder over the current weights (the fast packed path on the CPU).
    pub fn encoder(&self) -> Result<SentenceEncoder> {
        let vb = VarBuilder::from_varmap(&self.varmap, DType::F32, &self.device);
        // The products eval will embed with (bf16 on a CPU with AMX), so validation scores what ships.
        SentenceEncoder::with_weights(self.folder.clone(), &vb, crate::bert::Products::auto())
            .map_err(Error::tensor("building the augment encoder"))
    }

    /// Writes a sentence-transformers folder: the parent folder's configuration files, this model's
    /// weights, and sentence_bert_config.json with the max_seq_length trained at. Written beside `dest`
    /// and renamed into place, so a kill never leaves half a checkpoint.
    pub fn save(&self, dest: &Path, extra: &HashMap<String, Tensor>, state: Option<&serde_json::Value>) -> Result<()> {
        let tmp = dest.with_extension("tmp");
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp).map_err(Error::io(&tmp))?;
        copy_config(&self.folder.dir, &tmp)?;
        let weights = tmp.join("model.safetensors");
        let mut tensors: HashMap<String, Tensor> = self.kept.lock().expect("kept lock").clone();
        for (name, var) in self.varmap.data().lock().expect("varmap lock").iter() {
            tensors.insert(name.clone(), var.as_tensor().clone());
        }
        candle_core::safetensors::save(&tensors, &weights)
            .map_err(Error::tensor(format!("saving {}", weights.display())))?;
        let sb = tmp.join("sentence_bert_config.json");
        let mut cfg: serde_json::Value = std::fs::read_to_string(&sb)
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok())
            .unwrap_or_else(|| serde_json::json!({"do_lower_case": false}));
        cfg["max_seq_length"] = self.folder.max_seq_length.into();
        std::fs::write(&sb, serde_json::to_vec_pretty(&cfg).expect("json")).map_err(Error::io(&sb))?;
        if !extra.is_empty() {
            let p = tmp.join("optimizer.safetensors");
            candle_core::safetensors::save(extra, &p).map_err(Error::tensor(format!("saving {}", p.display())))?;
        }
        if let Some(state) = state {
            let p = tmp.join("trainer_state.json");
            std::fs::write(&p, serde_json::to_vec_pretty(state).expect("json")).map_err(Error::io(&p))?;
        }
        replace_dir(&tmp, dest)
    }
}

/// Sets every variable of `varmap` from `tensors` (named as it is, or with a `bert.` prefix); a
/// missing tensor `optional` allows keeps the variable's value (returns whether any did).
pub(crate) fn set_vars(
    varmap: &VarMap,
    tensors: &HashMap<String, Tensor>,
    optional: impl Fn(&str) -> bool,
    err: &dyn Fn(String) -> Error,
) -> Result<bool> {
    let mut missing = false;
    for (name, var) in varmap.data().lock().expect("varmap lock").iter() {
        let Some(t) = tensors.get(name).or_else(|| tensors.get(&format!("bert.{name}"))) else {
            if optional(name) {
                missing = true;
                continue;
            }
            return Err(err(format!("tensor `{name}` is missing")));
        };
        if t.dims() != var.dims() {
            return Err(err(format!("`{name}` is {:?}, config.json says {:?}", t.dims(), var.dims())));
        }
        var.set(&t.to_dtype(DType::F32).map_err(|e| err(e.to_string()))?).map_err(|e| err(e.to_string()))?;
    }
    Ok(missing)
}

/// Puts the finished folder `tmp` in `dest`'s place: `dest` is first renamed aside, so a kill at any
/// moment leaves `dest` or its `.old` copy whole (`existing_checkpoint` finds either).
pub(crate) fn replace_dir(tmp: &Path, dest: &Path) -> Result<()> {
    let old = dest.with_extension("old");
    let _ = std::fs::remove_dir_all(&old);
    if dest.exists() {
        std::fs::rename(dest, &old).map_err(Error::io(dest))?;
    }
    std::fs::rename(tmp, dest).map_err(Error::io(dest))?;
    let _ = std::fs::remove_dir_all(&old);
    Ok(())
}

/// A checkpoint folder as it stands after a possible kill mid-save: `dest`, else the `.old` copy.
pub fn existing_checkpoint(dest: &Path) -> Option<std::path::PathBuf> {
    [dest.to_path_buf(), dest.with_extension("old")].into_iter().find(|p| p.join("model.safetensors").exists())
}

/// Copies what a sentence-transformers folder needs besides weights: top-level JSON and text files
/// and the numbered module folders (1_Pooling, 2_Normalize). Writes a mean-pooling module list when
/// the parent is a bare transformers folder (mean pooling, as flow reads such a folder).
fn copy_config(from: &Path, to: &Path) -> Result<()> {
    let entries = std::fs::read_dir(from).map_err(Error::io(from))?;
    for e in entries.flatten() {
        let (path, name) = (e.path(), e.file_name().to_string_lossy().to_string());
        let module = name.split_once('_').is_some_and(|(n, _)| n.parse::<u32>().is_ok());
        if path.is_dir() && module {
            std::fs::create_dir_all(to.join(&name)).map_err(Error::io(to))?;
            for f in std::fs::read_dir(&path).map_err(Error::io(&path))?.flatten() {
                if f.path().is_file() {
                    std::fs::copy(f.path(), to.join(&name).join(f.file_name())).map_err(Error::io(f.path()))?;
                }
            }
        } else if path.is_file()
            && (name.ends_with(".json") || name.ends_with(".txt") || name == "tokenizer.model")
            && name != "trainer_state.json"
        {
            std::fs::copy(&path, to.join(&name)).map_err(Error::io(&path))?;
        }
    }
    if !to.join("modules.json").exists() {
        let modules = serde_json::json!([
            {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
            {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}
        ]);
        std::fs::write(to.join("modules.json"), modules.to_string()).map_err(Error::io(to))?;
        std::fs::create_dir_all(to.join("1_Pooling")).map_err(Error::io(to))?;
        let dim = serde_json::from_str::<serde_json::Value>(
            &std::fs::read_to_string(to.join("config.json")).unwrap_or_default(),
        )
        .ok()
        .and_then(|c| c["hidden_size"].as_u64())
        .unwrap_or(384);
        let pooling = serde_json::json!({"word_embedding_dimension": dim, "pooling_mode_mean_tokens": true});
        std::fs::write(to.join("1_Pooling/config.json"), pooling.to_string()).map_err(Error::io(to))?;
    }
    Ok(())
}

/// Writes a tiny BERT configuration (2 layers, width 16) and a word-level tokenizer over `words` into
/// `dir`: a model folder for tests and demos that trains in seconds from random weights.
pub fn tiny_folder(dir: &Path, words: &[&str]) -> Result<Folder> {
    use tokenizers::models::wordlevel::WordLevel;
    use tokenizers::pre_tokenizers::whitespace::Whitespace;
    let vocab: HashMap<String, u32> =
        ["[PAD]", "[UNK]"].iter().chain(words).enumerate().map(|(i, w)| (w.to_string(), i as u32)).collect();
    let n = vocab.len();
    let model = WordLevel::builder()
        .vocab(vocab.into_iter().collect())
        .unk_token("[UNK]".into())
        .build()
        .map_err(Error::tokenizer("building a word-level tokenizer"))?;
    let mut tok = tokenizers::Tokenizer::new(model);
    tok.with_pre_tokenizer(Some(Whitespace {}));
    tok.save(dir.join("tokenizer.json"), false)
        .map_err(|e| Error::internal(format!("saving a tokenizer in {}: {e}", dir.display())))?;
    let config = serde_json::json!({
        "vocab_size": n, "hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2,
        "intermediate_size": 32, "hidden_act": "gelu", "hidden_dropout_prob": 0.1,
        "max_position_embeddings": 32, "type_vocab_size": 2, "initializer_range": 0.02,
        "layer_norm_eps": 1e-12, "pad_token_id": 0, "classifier_dropout": null, "model_type": "bert"
    });
    std::fs::write(dir.join("config.json"), config.to_string()).map_err(Error::io(dir))?;
    Folder::read(dir, Some(16))
}
