//! Ranking math shared by training and evaluation: metrics with sentence-transformers' definitions
//! and exact top-k search over vectors streamed in blocks. Pure functions over numbers, no I/O.

pub mod metrics;
pub mod search;
