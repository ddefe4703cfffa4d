//! A sentence-transformers BERT folder as an embedder in candle: reads modules.json and
//! 1_Pooling for pooling and normalisation, sorts a batch by length and pads each batch only as far as it needs.

use std::path::{Path, PathBuf};

use std::sync::Mutex;

use candle_core::{D, DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::bert::{BertModel, Config};
use serde::Deserialize;
use tokenizers::{Tokenizer, TruncationParams};

use super::Products;
use super::packed::{CpuBert, Scratch};
use crate::error::{Error, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pooling {
    Mean,
    Cls,
    Max,
}

/// On the CPU a packed forward pass of our own (several times faster than the padded graph);
/// elsewhere candle's BertModel on the device.
enum Backend {
    Cpu(CpuBert, Mutex<Scratch>),
    Device(BertModel),
}

pub struct SentenceEncoder {
    backend: Backend,
    tokenizer: Tokenizer,
    /// What cuts long documents into passages of this encoder's window.
    pub splitter: super::passages::Splitter,
    pub pooling: Pooling,
    pub normalize: bool,
    pub max_seq_length: usize,
    pub dim: usize,
    device: Device,
    pub dir: PathBuf,
}

#[derive(Deserialize)]
struct Module {
    path: String,
    #[serde(rename = "type")]
    kind: String,
}

#[derive(Deserialize)]
struct PoolingConfig {
    #[serde(default)]
    pooling_mode_cls_token: bool,
    #[serde(default)]
    pooling_mode_mean_tokens: bool,
    #[serde(default)]
    pooling_mode_max_tokens: bool,
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path, what: &str) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        Error::bad_input(
            format!("model folder: cannot read {} ({what}): {e}", path.display()),
            "point the model at a sentence-transformers folder, or run `flow models pull`",
        )
    })?;
    serde_json::from_str(&text).map_err(|e| {
        Error::bad_input(
            format!("{}: not a valid {what}: {e}", path.display()),
            "the file is corrupt: fetch the model again",
        )
    })
}

/// Which encoder a folder holds (config.json's `model_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    Bert,
    /// MPNet (all-mpnet-base-v2): embedded on the CPU's packed path only, and not trained by flow.
    Mpnet,
}

/// What a sentence-transformers folder says besides its weights.
#[derive(Clone)]
pub struct Folder {
    pub dir: PathBuf,
    pub arch: Arch,
    /// The encoder's shape in BERT's terms (MPNet's config.json reads as one with a single token type).
    pub config: Config,
    pub tokenizer: Tokenizer,
    pub pooling: Pooling,
    pub normalize: bool,
    pub max_seq_length: usize,
}

impl Folder {
    /// Reads config.json, tokenizer.json, modules.json and the pooling config. `max_seq_length`
    /// overrides sentence_bert_config.json.
    pub fn read(dir: &Path, max_seq_length: Option<usize>) -> Result<Folder> {
        let config_path = dir.join("config.json");
        let mut raw: serde_json::Value = read_json(&config_path, "BERT or MPNet config.json")?;
        let arch =
            if raw.get("model_type").and_then(|t| t.as_str()) == Some("mpnet") { Arch::Mpnet } else { Arch::Bert };
        if let (Arch::Mpnet, Some(fields)) = (arch, raw.as_object_mut()) {
            fields.entry("type_vocab_size").or_insert(1.into());
        }
        let config: Config = serde_json::from_value(raw).map_err(|e| {
            Error::bad_input(
                format!("{}: not a BERT or MPNet config: {e}", config_path.display()),
                "the file is corrupt or of another architecture: fetch the model again",
            )
        })?;
        let (pooling, normalize) = match std::fs::metadata(dir.join("modules.json")) {
            Ok(_) => {
                let modules: Vec<Module> = read_json(&dir.join("modules.json"), "modules.json")?;
                let normalize = modules.iter().any(|m| m.kind.ends_with(".Normalize"));
                let pooling = match modules.iter().find(|m| m.kind.ends_with(".Pooling")) {
                    Some(m) => {
                        let pc: PoolingConfig = read_json(&dir.join(&m.path).join("config.json"), "pooling config")?;
                        if pc.pooling_mode_cls_token {
                            Pooling::Cls
                        } else if pc.pooling_mode_max_tokens && !pc.pooling_mode_mean_tokens {
                            Pooling::Max
                        } else {
                            Pooling::Mean
                        }
                    }
                    None => Pooling::Mean,
                };
                (pooling, normalize)
            }
            Err(_) => (Pooling::Mean, false),
        };
        #[derive(Deserialize)]
        struct SbConfig {
            max_seq_length: Option<usize>,
        }
        let configured = std::fs::read_to_string(dir.join("sentence_bert_config.json"))
            .ok()
            .and_then(|t| serde_json::from_str::<SbConfig>(&t).ok())
            .and_then(|c| c.max_seq_length);
        let offset = if arch == Arch::Mpnet { super::mpnet::POSITION_OFFSET } else { 0 };
        let positions = config.max_position_embeddings.saturating_sub(offset);
        let max_seq_length = max_seq_length.or(configured).unwrap_or(512).min(positions).max(2);

        let tok_path = dir.join("tokenizer.json");
        let mut tokenizer = Tokenizer::from_file(&tok_path).map_err(|e| {
            Error::bad_input(
                format!("cannot load {}: {e}", tok_path.display()),
                "the model folder needs a tokenizer.json",
            )
        })?;
        // The bundled tokenizer.json fixes truncation and padding at 128: we truncate at
        // max_seq_length and pad each batch ourselves.
        tokenizer
            .with_truncation(Some(TruncationParams { max_length: max_seq_length, ..Default::default() }))
            .map_err(|e| {
                Error::bad_input(
                    format!("{}: cannot truncate at {max_seq_length}: {e}", tok_path.display()),
                    "set a smaller `max_seq_length`",
                )
            })?;
        tokenizer.with_padding(None);

        Ok(Folder { dir: dir.to_path_buf(), arch, config, tokenizer, pooling, normalize, max_seq_length })
    }
}

impl SentenceEncoder {
    /// Loads a sentence-transformers folder (config.json, model.safetensors, tokenizer.json,
    /// modules.json, 1_Pooling/config.json). `max_seq_length` overrides sentence_bert_config.json.
    pub fn load(
        dir: &Path,
        max_seq_length: Option<usize>,
        device: &Device,
        products: Products,
    ) -> Result<SentenceEncoder> {
        let folder = Folder::read(dir, max_seq_length)?;
        // MPNet has the packed CPU path only (candle has no MPNet graph); on a GPU machine it runs there.
        let device = if folder.arch == Arch::Mpnet { &Device::Cpu } else { device };
        let weights = dir.join("model.safetensors");
        if !weights.exists() {
            return Err(Error::bad_input(
                format!("model folder {} has no model.safetensors", dir.display()),
                "sentence-transformers folders with safetensors weights are supported; run `flow models pull`",
            ));
        }
        // SAFETY: the file is mapped read-only and not modified while the model lives.
        let vb = unsafe { VarBuilder::from_mmaped_safetensors(&[&weights], DType::F32, device) }.map_err(|e| {
            Error::bad_input(
                format!("{}: cannot read weights: {e}", weights.display()),
                "the file is corrupt: fetch the model again",
            )
        })?;
        SentenceEncoder::with_weights(folder, &vb, products).map_err(|e| {
            Error::bad_input(
                format!("{}: not a BERT or MPNet checkpoint matching config.json: {e}", weights.display()),
                "flow's local embedder runs BERT-family and MPNet sentence-transformers models (e.g. all-MiniLM-L6-v2, all-mpnet-base-v2)",
            )
        })
    }

    /// An encoder over the weights in `vb` (a file, or a training run's VarMap) on `vb`'s device,
    /// with its CPU matrix products in `products`.
    pub fn with_weights(folder: Folder, vb: &VarBuilder, products: Products) -> candle_core::Result<SentenceEncoder> {
        let device = vb.device().clone();
        let backend = if device.is_cpu() {
            let model = CpuBert::load(vb, &folder.config)?.with_products(products, true);
            Backend::Cpu(model, Mutex::new(Scratch::default()))
        } else if folder.arch == Arch::Mpnet {
            candle_core::bail!("MPNet runs on the CPU only: load it with the CPU device")
        } else {
            Backend::Device(BertModel::load(vb.clone(), &folder.config)?)
        };
        let splitter = super::passages::Splitter::new(&folder.tokenizer, folder.max_seq_length)
            .map_err(|e| candle_core::Error::msg(e.to_string()))?;
        Ok(SentenceEncoder {
            backend,
            tokenizer: folder.tokenizer,
            splitter,
            pooling: folder.pooling,
            normalize: folder.normalize,
            max_seq_length: folder.max_seq_length,
            dim: folder.config.hidden_size,
            device,
            dir: folder.dir,
        })
    }

    /// Tokens the encoder reads of `text`, special tokens included and cut at its window: what a
    /// server reports as usage.
    pub fn count_tokens(&self, text: &str) -> usize {
        self.tokenizer.encode(text, true).map_or(0, |e| e.get_ids().len())
    }

    /// Embeds texts in batches of `batch_size`, longest first so padding stays small; the output
    /// is in the input order.
    /// Where it runs.
    /// How its matrix products run: f32, or bf16 on AMX (a GPU's own precision counts as f32 here).
    pub fn products(&self) -> Products {
        match &self.backend {
            Backend::Cpu(m, _) => m.products,
            Backend::Device(_) => Products::F32,
        }
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn embed(&self, texts: &[String], batch_size: usize) -> Result<Vec<Vec<f32>>> {
        let encodings = self
            .tokenizer
            .encode_batch(texts.iter().map(String::as_str).collect::<Vec<_>>(), true)
            .map_err(Error::tokenizer("tokenizing a batch of texts"))?;
        let mut order: Vec<usize> = (0..texts.len()).collect();
        order.sort_by_key(|&i| std::cmp::Reverse(encodings[i].get_ids().len()));
        let mut out = vec![Vec::new(); texts.len()];
        for batch in order.chunks(batch_size.max(1)) {
            let seqs: Vec<&[u32]> = batch.iter().map(|&i| encodings[i].get_ids()).collect();
            let vectors = match &self.backend {
                Backend::Cpu(model, scratch) => self.forward_cpu(model, scratch, &seqs),
                Backend::Device(model) => self.forward_device(model, &seqs),
            }
            .map_err(Error::tensor("the BERT forward pass"))?;
            for (row, &i) in vectors.into_iter().zip(batch) {
                out[i] = row;
            }
        }
        Ok(out)
    }

    /// The packed CPU pass over `seqs`, in slices of about `SLICE_TOKENS` tokens (see there).
    fn forward_cpu(
        &self,
        model: &CpuBert,
        scratch: &Mutex<Scratch>,
        seqs: &[&[u32]],
    ) -> candle_core::Result<Vec<Vec<f32>>> {
        let mut out = Vec::with_capacity(seqs.len());
        let (mut start, mut tokens) = (0, 0);
        for (i, s) in seqs.iter().enumerate() {
            if tokens > 0 && tokens + s.len() > SLICE_TOKENS {
                out.extend(self.forward_slice(model, scratch, &seqs[start..i])?);
                (start, tokens) = (i, 0);
            }
            tokens += s.len();
        }
        out.extend(self.forward_slice(model, scratch, &seqs[start..])?);
        Ok(out)
    }

    fn forward_slice(
        &self,
        model: &CpuBert,
        scratch: &Mutex<Scratch>,
        seqs: &[&[u32]],
    ) -> candle_core::Result<Vec<Vec<f32>>> {
        if seqs.is_empty() {
            return Ok(Vec::new());
        }
        let lens: Vec<usize> = seqs.iter().map(|s| s.len()).collect();
        let ids: Vec<u32> = seqs.concat();
        let mut scratch = scratch.lock().unwrap_or_else(|p| p.into_inner());
        let hidden = model.forward(&ids, &lens, &mut scratch)?;
        let h = self.dim;
        let mut start = 0;
        let mut out = Vec::with_capacity(seqs.len());
        for &n in &lens {
            let rows = hidden[start * h..(start + n) * h].chunks_exact(h);
            start += n;
            let mut v = match self.pooling {
                Pooling::Cls => rows.clone().next().map(<[f32]>::to_vec).unwrap_or_else(|| vec![0.0; h]),
                Pooling::Mean => {
                    let mut acc = vec![0.0f32; h];
                    for r in rows {
                        acc.iter_mut().zip(r).for_each(|(a, x)| *a += x);
                    }
                    let inv = 1.0 / n.max(1) as f32;
                    acc.iter_mut().for_each(|a| *a *= inv);
                    acc
                }
                Pooling::Max => {
                    let mut acc = vec![f32::NEG_INFINITY; h];
                    for r in rows {
                        acc.iter_mut().zip(r).for_each(|(a, x)| *a = a.max(*x));
                    }
                    acc
                }
            };
            if self.normalize {
                let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
                v.iter_mut().for_each(|x| *x /= norm);
            }
            out.push(v);
        }
        Ok(out)
    }

    fn forward_device(&self, model: &BertModel, seqs: &[&[u32]]) -> candle_core::Result<Vec<Vec<f32>>> {
        let (ids, mask) = padded_batch(seqs, &self.device)?;
        let hidden = model.forward(&ids, &ids.zeros_like()?, Some(&mask))?;
        let pooled = pool(&hidden, &mask, self.pooling)?;
        let pooled = if self.normalize { normalize_rows(&pooled)? } else { pooled };
        pooled.to_vec2::<f32>()
    }
}

/// Tokens per packed forward pass on the CPU: a caller's batch is cut into slices this long, so an
/// encoder layer's activations (about 9 KB a token) stay near the cores instead of streaming
/// through memory; 32 texts of 256 tokens in four slices embed 10% faster than in one (bf16 on AMX,
/// 2 Sapphire Rapids cores), and slices this size still give every core many row panels.
const SLICE_TOKENS: usize = 2048;

/// Token ids and attention mask [B, L] of `seqs` padded to the longest.
pub fn padded_batch(seqs: &[&[u32]], device: &Device) -> candle_core::Result<(Tensor, Tensor)> {
    let (b, len) = (seqs.len(), seqs.iter().map(|s| s.len()).max().unwrap_or(1).max(1));
    let (mut ids, mut mask) = (Vec::with_capacity(b * len), Vec::with_capacity(b * len));
    for e in seqs {
        ids.extend(e.iter().copied().chain(std::iter::repeat_n(0u32, len - e.len())));
        mask.extend(std::iter::repeat_n(1u32, e.len()).chain(std::iter::repeat_n(0u32, len - e.len())));
    }
    Ok((Tensor::from_vec(ids, (b, len), device)?, Tensor::from_vec(mask, (b, len), device)?))
}

/// One vector per sequence from hidden states [B, L, H], counting only the tokens `mask` marks.
pub fn pool(hidden: &Tensor, mask: &Tensor, pooling: Pooling) -> candle_core::Result<Tensor> {
    let maskf = mask.to_dtype(DType::F32)?.unsqueeze(2)?;
    match pooling {
        Pooling::Cls => hidden.get_on_dim(1, 0),
        Pooling::Mean => hidden.broadcast_mul(&maskf)?.sum(1)?.broadcast_div(&maskf.sum(1)?.clamp(1e-9, f64::MAX)?),
        Pooling::Max => hidden.broadcast_add(&((maskf.ones_like()? - &maskf)? * -1e9)?)?.max(1),
    }
}

/// L2-normalised rows.
pub fn normalize_rows(x: &Tensor) -> candle_core::Result<Tensor> {
    let norm = x.sqr()?.sum_keepdim(D::Minus1)?.sqrt()?.clamp(1e-12, f64::MAX)?;
    x.broadcast_div(&norm)
}
