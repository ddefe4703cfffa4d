//! Retrieval evaluation: ranking metrics with sentence-transformers' definitions, and exact top-k
//! search over a corpus streamed in blocks.

pub mod metrics;
pub mod search;
