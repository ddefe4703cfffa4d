//! What `/v1/search` ranks: the workflow's live chunks with their sources and a BM25 index over them
//! (shared by every retriever), and each dense retriever's chunk rows, built from the `embeddings` cache.

use crate::error::{Error, Result};
use crate::rank::bm25::Bm25;
use crate::store::documents::SourcedChunk;

pub struct Corpus {
    pub chunks: Vec<SourcedChunk>,
    pub bm25: Bm25,
    /// `documents::live_stamp` when the chunks were read.
    pub stamp: String,
}

impl Corpus {
    pub fn new(chunks: Vec<SourcedChunk>, stamp: String) -> Corpus {
        let mut bm25 = Bm25::default();
        for c in &chunks {
            bm25.add(&c.text);
        }
        Corpus { chunks, bm25, stamp }
    }
}

/// One dense retriever's rows over a corpus: passage rows and the chunk each belongs to (a chunk
/// longer than the encoder's window scores its best passage, as the eval stages score documents).
pub struct Dense {
    pub rows: Vec<f32>,
    pub owners: Vec<usize>,
    pub dim: usize,
}

impl Dense {
    /// The `k` best chunks for one query row, best first.
    pub fn search(&self, query: &[f32], k: usize) -> Result<Vec<(usize, f32)>> {
        if query.len() != self.dim {
            return Err(Error::internal(format!("a {}-wide query against {}-wide chunk rows", query.len(), self.dim)));
        }
        let mut hits = crate::rank::search::top_k_grouped(query, &self.rows, &self.owners, self.dim, k)
            .map_err(Error::tensor("searching the chunks"))?;
        Ok(hits.pop().unwrap_or_default())
    }
}
