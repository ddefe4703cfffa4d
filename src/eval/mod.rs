//! Retrieval evaluation: eval sets, ranking them with each retriever, and the promotion gate.
//! The ranking math they score with lives in `rank`.

pub mod gate;
pub mod retrieve;
pub mod set;
