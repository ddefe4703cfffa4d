//! Ranking math shared by training and evaluation: metrics with sentence-transformers' definitions,
//! BM25, exact top-k search over vectors streamed in blocks, and hybrid fusion. No I/O.

pub mod bm25;
pub mod fuse;
pub mod metrics;
pub mod search;

/// Each query's hits, best first: (document index, score).
pub type Ranking = Vec<Vec<(usize, f32)>>;
