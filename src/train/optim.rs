//! AdamW (PyTorch's decoupled weight decay) over candle Vars, with a linear warm-up then linear decay
//! schedule and global-norm gradient clipping. Its moments are plain tensors so a checkpoint can keep them.

use std::collections::HashMap;

use candle_core::{Result, Tensor, Var, backprop::GradStore};

/// Gradients by parameter name (summed over accumulation steps).
pub type Grads = HashMap<String, Tensor>;

#[derive(Debug, Clone, Copy)]
pub struct AdamWConfig {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

pub struct AdamW {
    pub config: AdamWConfig,
    /// (name, parameter, decays): biases and LayerNorm parameters do not decay, as in sentence-transformers.
    params: Vec<(String, Var, bool)>,
    pub m: HashMap<String, Tensor>,
    pub v: HashMap<String, Tensor>,
    pub t: u64,
}

impl AdamW {
    pub fn new(named: Vec<(String, Var)>, config: AdamWConfig) -> AdamW {
        let params = named
            .into_iter()
            .map(|(n, v)| {
                let decays = !(n.ends_with(".bias") || n.contains("LayerNorm"));
                (n, v, decays)
            })
            .collect();
        AdamW { config, params, m: HashMap::new(), v: HashMap::new(), t: 0 }
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.params.iter().map(|(n, _, _)| n.as_str())
    }

    /// Adds this backward pass's gradients of the parameters to `acc`, leaving the rest behind.
    pub fn collect(&self, store: &GradStore, acc: &mut Grads) -> Result<()> {
        for (name, var, _) in &self.params {
            if let Some(g) = store.get(var.as_tensor()) {
                accumulate(acc, name.clone(), g.clone())?;
            }
        }
        Ok(())
    }

    /// One update at learning rate `lr` with the gradients in `grads` (already clipped).
    pub fn step(&mut self, grads: &Grads, lr: f64) -> Result<()> {
        self.t += 1;
        let c = self.config;
        let (bc1, bc2) = (1.0 - c.beta1.powi(self.t as i32), 1.0 - c.beta2.powi(self.t as i32));
        for (name, var, decays) in &self.params {
            let Some(g) = grads.get(name) else { continue };
            let m = match self.m.get(name) {
                Some(m) => ((m * c.beta1)? + (g * (1.0 - c.beta1))?)?,
                None => (g * (1.0 - c.beta1))?,
            };
            let v = match self.v.get(name) {
                Some(v) => ((v * c.beta2)? + (g.sqr()? * (1.0 - c.beta2))?)?,
                None => (g.sqr()? * (1.0 - c.beta2))?,
            };
            let mut p = var.as_tensor().clone();
            if *decays && c.weight_decay > 0.0 {
                p = (p * (1.0 - lr * c.weight_decay))?;
            }
            let update = ((&m / bc1)? / ((&v / bc2)?.sqrt()? + c.eps)?)?;
            var.set(&(p - (update * lr)?)?)?;
            self.m.insert(name.clone(), m);
            self.v.insert(name.clone(), v);
        }
        Ok(())
    }
}

/// Adds one gradient to the sum kept for its parameter (accumulation over batches).
pub fn accumulate(acc: &mut Grads, name: String, g: Tensor) -> Result<()> {
    let sum = match acc.remove(&name) {
        Some(a) => (a + g)?,
        None => g,
    };
    acc.insert(name, sum);
    Ok(())
}

/// Scales the gradients so their global L2 norm is at most `max_norm`; returns the norm before.
pub fn clip_grad_norm(grads: &mut Grads, max_norm: f64) -> Result<f64> {
    let mut sq = 0.0f64;
    for g in grads.values() {
        sq += g.sqr()?.sum_all()?.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?;
    }
    let norm = sq.sqrt();
    if max_norm > 0.0 && norm > max_norm {
        let f = max_norm / (norm + 1e-6);
        for g in grads.values_mut() {
            *g = (&*g * f)?;
        }
    }
    Ok(norm)
}

/// Learning rate at optimiser step `step` (0-based) of `total`: linear warm-up over `warmup` steps
/// from 0 to `lr`, then linear decay to 0 (sentence-transformers' WarmupLinear).
pub fn lr_at(step: u64, total: u64, warmup: u64, lr: f64) -> f64 {
    if step < warmup {
        lr * (step + 1) as f64 / warmup.max(1) as f64
    } else {
        lr * (total.saturating_sub(step)) as f64 / total.saturating_sub(warmup).max(1) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn one_adamw_step_by_hand() {
        let w = Var::new(&[1.0f32, -2.0], &Device::Cpu).unwrap();
        let b = Var::new(&[0.5f32], &Device::Cpu).unwrap();
        let cfg = AdamWConfig { lr: 0.1, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.01 };
        let mut opt = AdamW::new(vec![("l.weight".into(), w.clone()), ("l.bias".into(), b.clone())], cfg);
        // loss = sum(w^2) + 3b: grads 2w and 3
        let loss = (w.as_tensor().sqr().unwrap().sum_all().unwrap()
            + (b.as_tensor() * 3.0).unwrap().sum_all().unwrap())
        .unwrap();
        let mut grads = Grads::new();
        opt.collect(&loss.backward().unwrap(), &mut grads).unwrap();
        opt.step(&grads, 0.1).unwrap();
        // First step: m_hat = g, v_hat = g^2, update = g/(|g| + eps) = sign(g).
        let got: Vec<f32> = w.as_tensor().to_vec1().unwrap();
        let want = [1.0 * (1.0 - 0.1 * 0.01) - 0.1, -2.0 * (1.0 - 0.1 * 0.01) + 0.1];
        assert!((got[0] - want[0] as f32).abs() < 1e-6 && (got[1] - want[1] as f32).abs() < 1e-6, "{got:?}");
        // The bias does not decay.
        assert!((b.as_tensor().to_vec1::<f32>().unwrap()[0] - 0.4).abs() < 1e-6);
    }

    #[test]
    fn schedule_and_clipping() {
        assert_eq!(lr_at(0, 10, 2, 1.0), 0.5);
        assert_eq!(lr_at(1, 10, 2, 1.0), 1.0);
        assert_eq!(lr_at(2, 10, 2, 1.0), 1.0);
        assert_eq!(lr_at(6, 10, 2, 1.0), 0.5);
        let v = Var::new(&[3.0f32, 4.0], &Device::Cpu).unwrap();
        let store = (v.as_tensor() * 1.0).unwrap().sqr().unwrap().sum_all().unwrap().backward().unwrap();
        let mut grads = Grads::new();
        grads.insert("v".into(), store.get(v.as_tensor()).unwrap().clone());
        // grad = 2v = [6, 8], norm 10
        let norm = clip_grad_norm(&mut grads, 1.0).unwrap();
        assert!((norm - 10.0).abs() < 1e-6);
        let g: Vec<f32> = grads["v"].to_vec1().unwrap();
        assert!((g[0] - 0.6).abs() < 1e-5 && (g[1] - 0.8).abs() < 1e-5);
    }
}
