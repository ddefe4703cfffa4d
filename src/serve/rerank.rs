//! The reranker `flow serve` holds: its cross-encoder behind a queue, so the (query, passage) pairs
//! of concurrent requests (`/v1/rerank`, and search with `rerank`) are scored together.

use std::sync::Arc;

use super::Service;
use super::batch::{self, Queue};
use crate::error::{Error, Result};
use crate::store::models::ModelRow;

/// The reranker being served: its model, its cross-encoder and the queue concurrent requests'
/// (query, passage) pairs go through together.
pub struct Reranker {
    pub model: ModelRow,
    pub encoder: Arc<crate::bert::cross::CrossEncoder>,
    queue: Queue<(String, String), f32>,
}

impl Reranker {
    pub fn label(&self) -> String {
        format!("rerank@{}", self.model.id)
    }
}

impl Service {
    pub(super) async fn load_reranker(&self, m: &ModelRow) -> Result<Reranker> {
        let path = std::path::PathBuf::from(&m.path);
        let encoder = tokio::task::spawn_blocking(move || {
            crate::bert::cross::CrossEncoder::load(&path, None, crate::bert::Products::auto())
        })
        .await
        .map_err(Error::task("loading a reranker"))??;
        let encoder = Arc::new(encoder);
        let scorer = encoder.clone();
        let run: batch::Run<(String, String), f32> = Arc::new(move |pairs| {
            let scorer = scorer.clone();
            Box::pin(async move {
                tokio::task::spawn_blocking(move || {
                    let refs: Vec<(&str, &str)> = pairs.iter().map(|(q, p)| (q.as_str(), p.as_str())).collect();
                    scorer.score(&refs).map_err(|e| e.to_string())
                })
                .await
                .map_err(|e| format!("the reranker task failed: {e}"))?
            })
        });
        let queue = Queue::start("reranker", self.window, self.metrics.clone(), run);
        Ok(Reranker { model: m.clone(), encoder, queue })
    }

    /// The reranker's logit for each (query, document), batched with concurrent requests.
    pub async fn rerank(&self, query: &str, documents: &[String]) -> Result<(Arc<Reranker>, Vec<f32>)> {
        let live = self.live();
        let r = live.reranker.clone().ok_or_else(|| {
            Error::bad_input(
                "no reranker is served",
                "train one (`retriever: reranker` in a train stage) and run the workflow; `flow models list` shows it",
            )
        })?;
        let pairs = documents.iter().map(|d| (query.to_string(), d.clone())).collect();
        let scores = r.queue.call(pairs).await.map_err(|e| Error::Service {
            what: format!("the reranker failed: {e}"),
            hint: "check the reranker's model folder (`flow models list`)".into(),
        })?;
        Ok((r, scores))
    }
}
