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
//! `passages.rs` cuts long documents into overlapping windows for MaxP scoring.
//! `kernels.rs` holds the packed path's row kernels (activations, LayerNorm, softmax, exp/erf).
//! `dropout.rs` draws the training dropout masks both training paths apply, the same elements in each.
//! `encoder.rs` also reads a sentence-transformers folder (config, tokenizer, pooling, normalisation)
//! for every path.

pub mod backward;
pub mod dropout;
pub mod encoder;
pub mod graph;
pub mod kernels;
pub mod packed;
pub mod passages;

pub use encoder::{Folder, Pooling, SentenceEncoder, normalize_rows, padded_batch, pool};
