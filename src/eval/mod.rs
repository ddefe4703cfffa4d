//! Retrieval evaluation: eval sets, the retrievers compared (BM25, dense, hybrid), and the promotion gate.
//! The ranking math they score with lives in `rank`.

pub mod gate;
pub mod hybrid;
pub mod retrieve;
pub mod set;
