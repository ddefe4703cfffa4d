//! BERT in flow, one folder for its four code paths; which one runs is decided here, nowhere else.
//! Inference and training each have a packed CPU path of our own and a candle graph for other devices.
//!
//! | path | file | runs when |
//! |---|---|---|
//! | inference, CPU | `packed.rs` | embedding on the CPU (black box, trained models, eval corpora): packed sequences, fused kernels |
//! | inference, other devices | `encoder.rs` (candle-transformers' `BertModel`) | embedding on CUDA |
//! | training graph | `graph.rs` | training on CUDA, with bf16, or with max pooling (candle autograd) |
//! | training, CPU fast path | `backward.rs` | training on the CPU in f32 with mean or CLS pooling: `packed.rs`'s forward plus a hand-written backward, checked against `graph.rs` |
//!
//! `amx.rs` holds the bf16 matrix products on AMX tiles that both CPU paths use where the CPU has them.
//! `passages.rs` cuts long documents into overlapping windows for MaxP scoring.
//! `kernels.rs` holds the packed path's row kernels (activations, LayerNorm, softmax, exp/erf).
//! `attention.rs` is the packed path's attention (both CPU paths), `mpnet.rs` what MPNet changes in it.
//! `cross.rs` is the cross-encoder (reranker): pairs with token types through the packed path, a scalar head.
//! `dropout.rs` draws the training dropout masks both training paths apply, the same elements in each.
//! `encoder.rs` also reads a sentence-transformers folder (config, tokenizer, pooling, normalisation)
//! for every path.

pub mod amx;
pub mod attention;
pub mod backward;
pub mod cross;
pub mod dropout;
pub mod encoder;
pub mod graph;
pub mod kernels;
pub mod mpnet;
pub mod packed;
pub mod passages;

pub use encoder::{Arch, Folder, Pooling, SentenceEncoder, normalize_rows, padded_batch, pool};

/// How the packed CPU path multiplies matrices: in f32, or in bf16 with f32 sums on AMX tiles
/// (LayerNorm, softmax, GELU, pooling and the optimiser stay f32, as under PyTorch's autocast).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Products {
    F32,
    Bf16,
}

impl Products {
    /// bf16 where this CPU has AMX and the OS lets this process use it; f32 elsewhere.
    pub fn auto() -> Products {
        if amx::available() { Products::Bf16 } else { Products::F32 }
    }

    /// The products a model entry's `precision:` asks for on the CPU.
    pub fn of(precision: crate::workflow::Precision) -> crate::error::Result<Products> {
        use crate::workflow::Precision;
        match precision {
            Precision::Auto => Ok(Products::auto()),
            Precision::F32 => Ok(Products::F32),
            Precision::Bf16 if amx::available() => Ok(Products::Bf16),
            Precision::Bf16 => Err(crate::error::Error::bad_input(
                "`precision: bf16` asks for bf16 products, and this CPU (or its kernel) offers no AMX",
                "use `precision: auto` (bf16 where AMX is present, f32 elsewhere) or `f32`",
            )),
        }
    }

    /// What a cache key adds for these products: vectors of f32 are not reused for bf16, nor those
    /// of one bf16 engine for the other's (they add in another order).
    pub fn cache_tag(self) -> &'static str {
        match (self, amx::engine()) {
            (Products::F32, _) => "",
            (Products::Bf16, Some(amx::Engine::Avx512Bf16)) => "|bf16-avx512",
            (Products::Bf16, _) => "|bf16",
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Products::F32 => "f32",
            Products::Bf16 => match amx::engine() {
                Some(amx::Engine::Avx512Bf16) => "bf16 (AVX512-BF16)",
                _ => "bf16 (AMX)",
            },
        }
    }
}
