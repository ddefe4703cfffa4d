//! Retrieval evaluation: eval sets, the retrievers compared, BM25, and the promotion gate.
//! The ranking math they score with lives in `rank`.

pub mod bm25;
pub mod gate;
pub mod retrieve;
pub mod set;
