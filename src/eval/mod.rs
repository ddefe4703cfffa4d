//! Retrieval evaluation: eval sets, the retrievers compared, ranking metrics with
//! sentence-transformers' definitions, BM25, and exact top-k search over a corpus streamed in blocks.

pub mod bm25;
pub mod gate;
pub mod metrics;
pub mod retrieve;
pub mod search;
pub mod set;
