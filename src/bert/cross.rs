//! A cross-encoder (reranker): BERT reads `[CLS] query [SEP] passage [SEP]` and a scalar head on the
//! [CLS] state scores the pair, as transformers' BertForSequenceClassification with one label does.
//!
//! The folder is the one sentence-transformers' `CrossEncoder(path)` loads: config.json (architecture
//! `BertForSequenceClassification`, one label), model.safetensors (`bert.*`, `classifier.*`) and the
//! tokenizer; `CrossEncoder.predict` reports sigmoid(logit), which is `relevance`.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use candle_core::DType;
use candle_nn::VarBuilder;
use tokenizers::Tokenizer;

use super::packed::{CpuBert, Scratch};
use super::{Folder, Products};
use crate::error::{Error, Result};

/// The classification head: pooled = tanh(W_p h_cls + b_p), logit = w_c . pooled + b_c.
#[derive(Debug, Clone)]
pub struct Head {
    pub pool_w: Vec<f32>,
    pub pool_b: Vec<f32>,
    pub cls_w: Vec<f32>,
    pub cls_b: f32,
}

/// Tensor names of the head in a transformers checkpoint.
pub const POOLER: &str = "bert.pooler.dense";
pub const CLASSIFIER: &str = "classifier";

impl Head {
    /// Reads the head from `vb` (a checkpoint's tensors, by their transformers names).
    pub fn load(vb: &VarBuilder, h: usize) -> candle_core::Result<Head> {
        let get = |shape: &[usize], name: &str| -> candle_core::Result<Vec<f32>> {
            vb.get(shape, name)?.flatten_all()?.to_dtype(DType::F32)?.to_vec1()
        };
        Ok(Head {
            pool_w: get(&[h, h], &format!("{POOLER}.weight"))?,
            pool_b: get(&[h], &format!("{POOLER}.bias"))?,
            cls_w: get(&[1, h], &format!("{CLASSIFIER}.weight"))?,
            cls_b: get(&[1], &format!("{CLASSIFIER}.bias"))?[0],
        })
    }

    /// The logit of one [CLS] state.
    pub fn logit(&self, cls: &[f32]) -> f32 {
        let h = cls.len();
        let mut out = self.cls_b;
        for (j, row) in self.pool_w.chunks_exact(h).enumerate() {
            let z: f32 = row.iter().zip(cls).map(|(w, x)| w * x).sum::<f32>() + self.pool_b[j];
            out += self.cls_w[j] * z.tanh();
        }
        out
    }
}

/// (query, passage) pairs tokenized and packed one after another: ids, segments (query 0 and
/// passage 1) and each pair's length. Pairs longer than the tokenizer's window are cut longest-first, as
/// transformers' tokenizer (`truncation=True`) cuts them for `CrossEncoder`.
#[derive(Debug, Default)]
pub struct Pairs {
    pub ids: Vec<u32>,
    pub types: Vec<u32>,
    pub lens: Vec<usize>,
}

pub fn pairs(tokenizer: &Tokenizer, pairs: &[(&str, &str)]) -> Result<Pairs> {
    let inputs: Vec<tokenizers::EncodeInput> = pairs.iter().map(|&(q, p)| (q, p).into()).collect();
    let enc = tokenizer.encode_batch(inputs, true).map_err(Error::tokenizer("tokenizing (query, passage) pairs"))?;
    let mut out = Pairs::default();
    for e in enc {
        out.ids.extend_from_slice(e.get_ids());
        out.types.extend_from_slice(e.get_type_ids());
        out.lens.push(e.get_ids().len());
    }
    Ok(out)
}

/// Whether a model folder holds a cross-encoder (its config.json names a sequence classifier).
pub fn is_cross_encoder(dir: &Path) -> bool {
    std::fs::read_to_string(dir.join("config.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .and_then(|c| c["architectures"].as_array().cloned())
        .is_some_and(|a| a.iter().any(|x| x.as_str().is_some_and(|s| s.ends_with("ForSequenceClassification"))))
}

/// sigmoid(logit): the relevance `CrossEncoder.predict` reports for a one-label model.
pub fn relevance(logit: f32) -> f32 {
    1.0 / (1.0 + (-logit).exp())
}

/// Pairs per packed forward pass: enough to keep both cores busy, few enough to bound memory.
const PAIRS_PER_PASS: usize = 32;

/// A cross-encoder on the CPU's packed path.
pub struct CrossEncoder {
    bert: CpuBert,
    head: Head,
    pub tokenizer: Tokenizer,
    pub max_seq_length: usize,
    pub dir: PathBuf,
    scratch: Mutex<Scratch>,
}

impl CrossEncoder {
    /// Loads a cross-encoder folder (config.json, model.safetensors, tokenizer.json).
    pub fn load(dir: &Path, max_seq_length: Option<usize>, products: Products) -> Result<CrossEncoder> {
        let folder = Folder::read(dir, max_seq_length.or_else(|| model_max_length(dir)))?;
        let weights = dir.join("model.safetensors");
        let bad = |e: &dyn std::fmt::Display| {
            Error::bad_input(
                format!("{}: not a BERT cross-encoder checkpoint: {e}", weights.display()),
                "a reranker folder holds config.json (BertForSequenceClassification, one label), model.safetensors and tokenizer.json, as `flow run` writes it",
            )
        };
        if !weights.exists() {
            return Err(bad(&"the file is missing"));
        }
        // SAFETY: the file is mapped read-only and not modified while the model lives.
        let vb = unsafe { VarBuilder::from_mmaped_safetensors(&[&weights], DType::F32, &candle_core::Device::Cpu) }
            .map_err(|e| bad(&e))?;
        CrossEncoder::with_weights(folder, &vb, products).map_err(|e| bad(&e))
    }

    /// A cross-encoder over the weights in `vb` (a file, or a training run's VarMap).
    pub fn with_weights(folder: Folder, vb: &VarBuilder, products: Products) -> candle_core::Result<CrossEncoder> {
        let h = folder.config.hidden_size;
        let bert = CpuBert::load(vb, &folder.config)?.with_products(products, true);
        if bert.rel.is_some() {
            candle_core::bail!("an MPNet cannot be a cross-encoder here (it has no token types)")
        }
        let head = Head::load(vb, h)?;
        Ok(CrossEncoder {
            bert,
            head,
            tokenizer: folder.tokenizer,
            max_seq_length: folder.max_seq_length,
            dir: folder.dir,
            scratch: Mutex::new(Scratch::default()),
        })
    }

    /// The logit of each (query, passage) pair, in order.
    pub fn score(&self, pairs_in: &[(&str, &str)]) -> Result<Vec<f32>> {
        let mut out = Vec::with_capacity(pairs_in.len());
        let h = self.bert.hidden_size();
        for chunk in pairs_in.chunks(PAIRS_PER_PASS) {
            let p = pairs(&self.tokenizer, chunk)?;
            let mut scratch = self.scratch.lock().unwrap_or_else(|e| e.into_inner());
            let hidden = self
                .bert
                .forward_typed(&p.ids, Some(&p.types), &p.lens, &mut scratch)
                .map_err(Error::tensor("scoring pairs with the reranker"))?;
            let mut start = 0;
            for &n in &p.lens {
                out.push(self.head.logit(&hidden[start * h..(start + 1) * h]));
                start += n;
            }
        }
        Ok(out)
    }

    /// Tokens the cross-encoder reads of one pair (cut at its window): what a server reports as usage.
    pub fn count_tokens(&self, query: &str, passage: &str) -> usize {
        self.tokenizer.encode((query, passage), true).map_or(0, |e| e.get_ids().len())
    }
}

/// The window a cross-encoder folder was trained at (tokenizer_config.json's `model_max_length`,
/// which transformers' tokenizer also truncates at), if it says one below BERT's 512.
pub fn model_max_length(dir: &Path) -> Option<usize> {
    std::fs::read_to_string(dir.join("tokenizer_config.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .and_then(|c| c["model_max_length"].as_u64())
        .map(|n| n as usize)
        .filter(|&n| n <= 512)
}
