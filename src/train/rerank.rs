//! Training a reranker (cross-encoder) from the same pairs: each query read with its positive and
//! `negatives` passages mined from the first stage's top ranks, a listwise softmax loss over them.
//!
//! It runs on the CPU training path (packed encoder with token types, hand-written backward); the
//! head (pooler and one-label classifier) goes through candle's autograd on the [CLS] rows only.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{Init, VarBuilder, VarMap};

use super::data::{Example, RetrievalSet};
use super::optim::Grads;
use super::{Learner, TrainConfig, Validation};
use crate::bert::cross::{self, CrossEncoder};
use crate::bert::dropout::Dropout;
use crate::bert::{Folder, Products};
use crate::error::{Error, Result};
use crate::rank::fuse::{self, Fusion};
use crate::rank::{Ranking, metrics};

/// The trainable cross-encoder: BERT's parameters (named as in a sentence-transformers folder) and
/// the head's (`pooler.dense.*`, `classifier.*`) in one VarMap.
pub struct CrossModel {
    pub varmap: VarMap,
    pub folder: Folder,
    pub device: Device,
}

fn weights_error(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::bad_input(
        format!("{}: cannot start a reranker from these weights: {e}", path.display()),
        "a reranker starts from a BERT folder (e.g. all-MiniLM-L6-v2) or a reranker flow trained",
    )
}

impl CrossModel {
    /// A cross-encoder over `folder`'s BERT, its weights from `weights` (a sentence-transformers or
    /// reranker model.safetensors). A head the file lacks starts as BERT initialises one (N(0, 0.02)
    /// weights, zero biases), drawn from `seed` so the same seed trains the same model; `fresh_head`
    /// says whether it did.
    pub fn new(folder: Folder, weights: &Path, seed: u64) -> Result<(CrossModel, bool)> {
        if folder.arch == crate::bert::Arch::Mpnet {
            return Err(weights_error(&folder.dir, "an MPNet has no token types to read a pair with"));
        }
        let varmap = VarMap::new();
        let device = Device::Cpu;
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &device);
        crate::bert::graph::TrainBert::load(vb.clone(), &folder.config).map_err(|e| weights_error(&folder.dir, e))?;
        let h = folder.config.hidden_size;
        let mut rng = fastrand::Rng::with_seed(seed);
        // Box-Muller: candle's own random initialisation cannot be seeded.
        let mut normal = |n: usize| -> Vec<f32> {
            (0..n)
                .map(|_| {
                    let (u, v) = (rng.f64().max(f64::MIN_POSITIVE), rng.f64());
                    (0.02 * (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()) as f32
                })
                .collect()
        };
        let head = [
            ("pooler.dense.weight", vec![h, h], normal(h * h)),
            ("pooler.dense.bias", vec![h], vec![0.0; h]),
            ("classifier.weight", vec![1, h], normal(h)),
            ("classifier.bias", vec![1], vec![0.0]),
        ];
        for (name, shape, values) in head {
            vb.get_with_hints(shape.clone(), name, Init::Const(0.0)).map_err(|e| weights_error(&folder.dir, e))?;
            let t = Tensor::from_vec(values, shape, &device).map_err(|e| weights_error(&folder.dir, e))?;
            varmap.data().lock().expect("varmap lock")[name].set(&t).map_err(|e| weights_error(&folder.dir, e))?;
        }
        let model = CrossModel { varmap, folder, device };
        let fresh_head = model.load_weights_from(weights, true)?;
        Ok((model, fresh_head))
    }

    /// Overwrites the parameters from a file; with `head_optional`, a missing head keeps its values
    /// (returns true then).
    fn load_weights_from(&self, path: &Path, head_optional: bool) -> Result<bool> {
        let tensors = candle_core::safetensors::load(path, &self.device).map_err(|e| weights_error(path, e))?;
        let head = |name: &str| head_optional && (name.starts_with("pooler.") || name.starts_with("classifier."));
        super::model::set_vars(&self.varmap, &tensors, head, &|e| weights_error(path, e))
    }

    pub fn named_vars(&self) -> Vec<(String, Var)> {
        let mut v: Vec<_> =
            self.varmap.data().lock().expect("varmap lock").iter().map(|(n, v)| (n.clone(), v.clone())).collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    fn var(&self, name: &str) -> Var {
        self.varmap.data().lock().expect("varmap lock")[name].clone()
    }

    /// An inference cross-encoder over the current weights (bf16 products where AMX is, as served).
    pub fn encoder(&self) -> Result<CrossEncoder> {
        let tensors = self.checkpoint_tensors();
        let vb = VarBuilder::from_tensors(tensors, DType::F32, &self.device);
        CrossEncoder::with_weights(self.folder.clone(), &vb, Products::auto())
            .map_err(Error::tensor("building the reranker for validation"))
    }

    /// The weights under the names transformers' BertForSequenceClassification gives them.
    fn checkpoint_tensors(&self) -> HashMap<String, Tensor> {
        self.varmap
            .data()
            .lock()
            .expect("varmap lock")
            .iter()
            .map(|(name, var)| {
                let key = if name.starts_with("classifier.") { name.clone() } else { format!("bert.{name}") };
                (key, var.as_tensor().clone())
            })
            .collect()
    }

    /// Writes a folder sentence-transformers' `CrossEncoder(path)` loads: config.json as a one-label
    /// BertForSequenceClassification, the weights, the tokenizer files, and tokenizer_config.json's
    /// `model_max_length` at the window trained at (so both truncate alike). Written beside `dest`
    /// and renamed into place, so a kill never leaves half a checkpoint.
    pub fn save(&self, dest: &Path, extra: &HashMap<String, Tensor>, state: Option<&serde_json::Value>) -> Result<()> {
        let tmp = dest.with_extension("tmp");
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp).map_err(Error::io(&tmp))?;
        let from = &self.folder.dir;
        let read = |name: &str| -> serde_json::Value {
            std::fs::read_to_string(from.join(name))
                .ok()
                .and_then(|t| serde_json::from_str(&t).ok())
                .unwrap_or_default()
        };
        let mut config = read("config.json");
        config["architectures"] = serde_json::json!(["BertForSequenceClassification"]);
        config["id2label"] = serde_json::json!({"0": "LABEL_0"});
        config["label2id"] = serde_json::json!({"LABEL_0": 0});
        let write = |name: &str, v: &serde_json::Value| -> Result<()> {
            let p = tmp.join(name);
            std::fs::write(&p, serde_json::to_vec_pretty(v).expect("json")).map_err(Error::io(&p))
        };
        write("config.json", &config)?;
        let mut tok_config = read("tokenizer_config.json");
        if !tok_config.is_object() {
            tok_config = serde_json::json!({});
        }
        tok_config["model_max_length"] = self.folder.max_seq_length.into();
        write("tokenizer_config.json", &tok_config)?;
        for name in ["tokenizer.json", "vocab.txt", "special_tokens_map.json"] {
            if from.join(name).exists() {
                std::fs::copy(from.join(name), tmp.join(name)).map_err(Error::io(from.join(name)))?;
            }
        }
        let weights = tmp.join("model.safetensors");
        candle_core::safetensors::save(&self.checkpoint_tensors(), &weights)
            .map_err(Error::tensor(format!("saving {}", weights.display())))?;
        if !extra.is_empty() {
            let p = tmp.join("optimizer.safetensors");
            candle_core::safetensors::save(extra, &p).map_err(Error::tensor(format!("saving {}", p.display())))?;
        }
        if let Some(state) = state {
            write("trainer_state.json", state)?;
        }
        super::model::replace_dir(&tmp, dest)
    }

    /// One listwise step on the CPU: every (query, candidate) pair of the batch in one packed pass,
    /// the head and loss through autograd from the [CLS] rows, BERT's gradients by hand.
    /// `lists[i]` is query i's candidates, its positive first.
    pub fn listwise_step(
        &self,
        lists: &[(&str, Vec<&str>)],
        drop: Option<Dropout>,
        bf16: bool,
        accum: usize,
    ) -> candle_core::Result<(f64, Grads)> {
        let vb = VarBuilder::from_varmap(&self.varmap, DType::F32, &self.device);
        let products = if bf16 { Products::Bf16 } else { Products::F32 };
        let cpu = crate::bert::packed::CpuBert::load(&vb, &self.folder.config)?.with_products(products, false);
        let flat: Vec<(&str, &str)> = lists.iter().flat_map(|(q, c)| c.iter().map(move |p| (*q, *p))).collect();
        let p = cross::pairs(&self.folder.tokenizer, &flat).map_err(|e| candle_core::Error::msg(e.to_string()))?;
        let (hidden, tape) =
            crate::bert::backward::forward_typed(&cpu, &p.ids, Some(&p.types), &p.lens, drop.as_ref())?;
        let h = cpu.hidden_size();
        let mut starts = Vec::with_capacity(p.lens.len());
        let mut cls = Vec::with_capacity(p.lens.len() * h);
        let mut at = 0;
        for &n in &p.lens {
            starts.push(at);
            cls.extend_from_slice(&hidden[at * h..(at + 1) * h]);
            at += n;
        }
        let leaf = Var::from_vec(cls, (p.lens.len(), h), &self.device)?;
        let head =
            ["pooler.dense.weight", "pooler.dense.bias", "classifier.weight", "classifier.bias"].map(|n| self.var(n));
        let pooled = leaf.as_tensor().matmul(&head[0].as_tensor().t()?)?.broadcast_add(head[1].as_tensor())?.tanh()?;
        let logits = pooled.matmul(&head[2].as_tensor().t()?)?.broadcast_add(head[3].as_tensor())?.squeeze(1)?;
        let loss = listwise_loss(&logits, &lists.iter().map(|l| l.1.len()).collect::<Vec<_>>())?;
        let store = (&loss / accum as f64)?.backward()?;
        let mut grads = Grads::new();
        for (name, var) in
            ["pooler.dense.weight", "pooler.dense.bias", "classifier.weight", "classifier.bias"].iter().zip(&head)
        {
            if let Some(g) = store.get(var.as_tensor()) {
                grads.insert(name.to_string(), g.clone());
            }
        }
        let dcls: Vec<f32> = store
            .get(leaf.as_tensor())
            .ok_or_else(|| candle_core::Error::msg("no gradient reached the [CLS] states"))?
            .flatten_all()?
            .to_vec1()?;
        let mut dhidden = vec![0.0f32; hidden.len()];
        for (s, &r) in starts.iter().enumerate() {
            dhidden[r * h..(r + 1) * h].copy_from_slice(&dcls[s * h..(s + 1) * h]);
        }
        let mut flat_grads = crate::bert::backward::backward(&cpu, tape, dhidden);
        for (name, var) in self.named_vars() {
            if let Some(g) = flat_grads.remove(&name) {
                grads.insert(name, Tensor::from_vec(g, var.shape(), &self.device)?);
            }
        }
        Ok((loss.to_scalar::<f32>()? as f64, grads))
    }
}

/// Mean over queries of the softmax cross-entropy of each query's candidate logits (laid out one
/// list after another, `sizes[i]` long), its first candidate the target.
pub fn listwise_loss(logits: &Tensor, sizes: &[usize]) -> candle_core::Result<Tensor> {
    let mut total: Option<Tensor> = None;
    let mut at = 0;
    for &n in sizes {
        let row = logits.narrow(0, at, n)?;
        let max = row.max(0)?.detach();
        let lse = (row.broadcast_sub(&max)?.exp()?.sum(0)?.log()? + &max)?;
        let term = (lse - row.get(0)?)?;
        total = Some(match total {
            Some(t) => (t + term)?,
            None => term,
        });
        at += n;
    }
    let total = total.ok_or_else(|| candle_core::Error::msg("an empty batch"))?;
    total / sizes.len().max(1) as f64
}

/// Reranks each query's first `k` first-stage documents by `scores` (one per (query, document) in
/// that order), blends the two at `alpha` (0: the first stage, 1: the reranker alone), and keeps
/// the first stage's order after `k`.
pub fn reranked(first: &[Vec<(usize, f32)>], scores: &[Vec<f32>], k: usize, alpha: f64) -> Ranking {
    first
        .iter()
        .zip(scores)
        .map(|(hits, s)| {
            let head = &hits[..hits.len().min(k)];
            let mut by_reranker: Vec<(usize, f32)> = head.iter().zip(s).map(|(h, &s)| (h.0, s)).collect();
            by_reranker.sort_by(|a, b| b.1.total_cmp(&a.1));
            let mut out = fuse::fuse(head, &by_reranker, Fusion::Convex, alpha, head.len());
            out.extend(hits.iter().skip(head.len()).map(|&(d, _)| (d, f32::MIN)));
            out
        })
        .collect()
}

/// The reranker's learner: its model, the examples with their mined candidates, and the validation
/// split with its first-stage ranking computed once.
pub struct Reranking<'a> {
    pub cfg: &'a TrainConfig,
    pub model: &'a CrossModel,
    pub train: &'a [Example],
    /// Each example's mined negatives.
    pub negatives: &'a [Vec<String>],
    pub val: &'a RetrievalSet,
    /// The first stage's ranking of each validation query (`candidates::first_stage`).
    pub val_first: &'a Ranking,
    /// The first stage's alpha, as `candidates` chose it on the validation split.
    pub first_alpha: Option<f64>,
    /// How many first-stage documents validation reranks.
    pub k: usize,
}

impl Learner for Reranking<'_> {
    fn named_vars(&self) -> Vec<(String, Var)> {
        self.model.named_vars()
    }
    fn device(&self) -> &Device {
        &self.model.device
    }
    fn examples(&self) -> &[Example] {
        self.train
    }
    fn load_weights(&self, path: &Path) -> Result<()> {
        self.model.load_weights_from(path, false).map(|_| ())
    }
    fn save(&self, dest: &Path, extra: &HashMap<String, Tensor>, state: Option<&serde_json::Value>) -> Result<()> {
        self.model.save(dest, extra, state)
    }
    fn step(&self, batch: &[usize], drop: Option<Dropout>, accum: usize) -> candle_core::Result<(f64, Grads)> {
        let lists: Vec<(&str, Vec<&str>)> = batch
            .iter()
            .map(|&i| {
                let e = &self.train[i];
                let mut c = vec![e.positive.as_str()];
                c.extend(self.negatives[i].iter().map(String::as_str));
                (e.query.as_str(), c)
            })
            .collect();
        self.model.listwise_step(&lists, drop, self.cfg.bf16, accum)
    }
    fn validation_queries(&self) -> usize {
        self.val.queries.len()
    }
    fn validate(&self) -> Result<Validation> {
        let enc = self.model.encoder()?;
        let mut scores = Vec::with_capacity(self.val.queries.len());
        for (q, hits) in self.val.queries.iter().zip(self.val_first) {
            let pairs: Vec<(&str, &str)> =
                hits.iter().take(self.k).map(|&(d, _)| (q.as_str(), self.val.corpus[d].as_str())).collect();
            scores.push(enc.score(&pairs)?);
        }
        let firsts: Ranking = self.val_first.iter().map(|h| h[..h.len().min(self.k)].to_vec()).collect();
        let alone = reranked(self.val_first, &scores, self.k, 1.0);
        let heads: Ranking = alone.iter().map(|h| h[..h.len().min(self.k)].to_vec()).collect();
        let (alpha, _) = fuse::best_alpha(&firsts, &heads, &self.val.relevant);
        let top = reranked(self.val_first, &scores, self.k, alpha);
        let per: Vec<_> = top
            .iter()
            .zip(&self.val.relevant)
            .map(|(t, rel)| metrics::query_metrics(&t.iter().map(|x| x.0).collect::<Vec<_>>(), rel, &[1, 5, 10, 100]))
            .collect();
        let few = self.val.queries.len() < fuse::MIN_BLEND_QUERIES;
        let chosen = vec![format!(
            "reranker blend {alpha:.2} over the first stage's top {}{}",
            self.k,
            if few { " (too few validation queries to blend: the better side alone)" } else { "" }
        )];
        let per_query = super::gain::ndcg_per_query(&per);
        Ok(Validation { metrics: metrics::mean(&per), weight: None, alpha: Some(alpha), chosen, per_query })
    }
    fn black_box_alpha(&self) -> Result<Option<f64>> {
        Ok(self.first_alpha)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The listwise loss by hand: two queries, lists of 3 and 2.
    #[test]
    fn listwise_loss_by_hand() {
        let l = [2.0f32, 1.0, -1.0, 0.5, 1.5];
        let t = Tensor::new(&l, &Device::Cpu).unwrap();
        let got = listwise_loss(&t, &[3, 2]).unwrap().to_scalar::<f32>().unwrap() as f64;
        let ce = |xs: &[f32]| -> f64 {
            let z: f64 = xs.iter().map(|&x| (x as f64).exp()).sum();
            z.ln() - xs[0] as f64
        };
        let want = (ce(&l[..3]) + ce(&l[3..])) / 2.0;
        assert!((got - want).abs() < 1e-5, "{got} vs {want}");
    }

    /// Reranking puts the reranker's order on the first `k` (alpha 1), keeps the first stage's at
    /// alpha 0, and leaves what lies past `k` in the first stage's order.
    #[test]
    fn reranked_orders_the_head_and_keeps_the_tail() {
        let first = vec![vec![(7, 0.9), (3, 0.8), (5, 0.7), (1, 0.1)]];
        let scores = vec![vec![-1.0, 2.0, 0.5]];
        let ids = |r: &Ranking| r[0].iter().map(|x| x.0).collect::<Vec<_>>();
        assert_eq!(ids(&reranked(&first, &scores, 3, 1.0)), [3, 5, 7, 1]);
        assert_eq!(ids(&reranked(&first, &scores, 3, 0.0)), [7, 3, 5, 1]);
        assert_eq!(ids(&reranked(&first, &scores, 2, 1.0)), [3, 7, 5, 1]);
    }
}

#[cfg(test)]
mod grad_tests {
    use super::*;
    use crate::train::model::{Augment, tiny_folder};

    /// A tiny random cross-encoder: a random BERT saved by the augment model, the head fresh.
    fn tiny(dir: &Path) -> CrossModel {
        let words = ["alpha", "beta", "gamma", "delta", "one", "two", "three", "four"];
        let folder = tiny_folder(dir, &words).unwrap();
        let aug = Augment::new(folder.clone(), None, &Device::Cpu).unwrap();
        aug.save(&dir.join("start"), &HashMap::new(), None).unwrap();
        let (model, fresh) = CrossModel::new(folder, &dir.join("start/model.safetensors"), 1).unwrap();
        assert!(fresh, "a sentence-transformers folder has no classifier");
        model
    }

    fn lists() -> Vec<(&'static str, Vec<&'static str>)> {
        vec![("alpha beta", vec!["one two", "three", "four alpha delta"]), ("gamma", vec!["delta two", "beta one"])]
    }

    /// The step's gradients (packed forward with token types, hand-written backward, autograd head)
    /// against central differences of its own loss, for the head, a layer weight and the passage
    /// segment's token-type row.
    #[test]
    fn listwise_gradients_match_finite_differences() {
        let t = tempfile::tempdir().unwrap();
        let model = tiny(t.path());
        let (loss, grads) = model.listwise_step(&lists(), None, false, 1).unwrap();
        assert!(loss > 0.0);
        let vars: HashMap<String, Var> = model.named_vars().into_iter().collect();
        let checks = [
            ("classifier.weight", 3),
            ("pooler.dense.weight", 17),
            ("encoder.layer.1.attention.self.query.weight", 40),
            ("encoder.layer.0.intermediate.dense.weight", 9),
            ("embeddings.token_type_embeddings.weight", 16 + 5),
            ("embeddings.token_type_embeddings.weight", 2),
        ];
        for (name, at) in checks {
            let var = &vars[name];
            let base: Vec<f32> = var.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
            let eps = 1e-2f32;
            let at_value = |delta: f32| -> f64 {
                let mut w = base.clone();
                w[at] += delta;
                var.set(&Tensor::from_vec(w, var.shape(), &Device::Cpu).unwrap()).unwrap();
                model.listwise_step(&lists(), None, false, 1).unwrap().0
            };
            let numeric = (at_value(eps) - at_value(-eps)) / (2.0 * eps as f64);
            var.set(&Tensor::from_vec(base.clone(), var.shape(), &Device::Cpu).unwrap()).unwrap();
            let analytic = grads[name].flatten_all().unwrap().to_vec1::<f32>().unwrap()[at] as f64;
            let tol = 2e-3 + 0.05 * numeric.abs().max(analytic.abs());
            assert!((numeric - analytic).abs() < tol, "{name}[{at}]: numeric {numeric} vs analytic {analytic}");
        }
        // Both segments are in use: the passage row of the token types has a gradient.
        let types = grads["embeddings.token_type_embeddings.weight"].to_vec2::<f32>().unwrap();
        assert!(types[1].iter().any(|g| g.abs() > 0.0), "segment 1 received no gradient");
    }

    /// A saved reranker reloads as the inference cross-encoder with the scores training's model gives,
    /// and its folder is a one-label sequence classifier.
    #[test]
    fn a_saved_reranker_scores_as_it_trained() {
        let t = tempfile::tempdir().unwrap();
        let model = tiny(t.path());
        model.save(&t.path().join("ckpt"), &HashMap::new(), None).unwrap();
        assert!(cross::is_cross_encoder(&t.path().join("ckpt")));
        let pairs = [("alpha beta", "one two"), ("gamma", "delta two beta")];
        let from_vars = CrossEncoder::with_weights(
            model.folder.clone(),
            &VarBuilder::from_tensors(model.checkpoint_tensors(), DType::F32, &Device::Cpu),
            Products::F32,
        )
        .unwrap()
        .score(&pairs)
        .unwrap();
        let loaded = CrossEncoder::load(&t.path().join("ckpt"), None, Products::F32).unwrap().score(&pairs).unwrap();
        assert_eq!(from_vars, loaded);
        // The training step's logits are these: a one-candidate list's loss is 0 whatever the logit,
        // so compare through a two-candidate list: loss = log(1 + e^(b - a)).
        let (loss, _) = model.listwise_step(&[("alpha beta", vec!["one two", "three"])], None, false, 1).unwrap();
        let s = CrossEncoder::load(&t.path().join("ckpt"), None, Products::F32)
            .unwrap()
            .score(&[("alpha beta", "one two"), ("alpha beta", "three")])
            .unwrap();
        let want = (1.0 + ((s[1] - s[0]) as f64).exp()).ln();
        assert!((loss - want).abs() < 1e-5, "{loss} vs {want}");
    }
}
