//! Gathers concurrent requests' texts into one encoder call: the first waits at most a short window
//! for others to join, up to a size cap, so many small clients do not mean many tiny batches.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

use super::metrics::Metrics;
use crate::llm::Account;
use crate::llm::embed::BlackBox;
use crate::store::Store;
use crate::workflow::Workflow;

/// How requests are gathered.
#[derive(Debug, Clone, Copy)]
pub struct Window {
    /// How long the first request of a batch waits for others.
    pub wait: Duration,
    /// Texts per batch at most (a single larger request still goes whole).
    pub cap: usize,
}

type Reply = std::result::Result<Vec<Vec<f32>>, String>;

struct Job {
    texts: Vec<String>,
    reply: oneshot::Sender<Reply>,
}

/// One encoder behind a queue; dropped with its last handle, after the queued work is done.
#[derive(Clone)]
pub struct Batcher {
    tx: mpsc::Sender<Job>,
}

/// What every batch needs to reach the cache.
#[derive(Clone)]
pub struct Shared {
    pub wf: Arc<Workflow>,
    pub store: Store,
    pub metrics: Arc<Metrics>,
}

impl Batcher {
    pub fn spawn(encoder: Arc<BlackBox>, name: &'static str, window: Window, shared: Shared) -> Batcher {
        let (tx, rx) = mpsc::channel::<Job>(1024);
        tokio::spawn(work(encoder, name, window, shared, rx));
        Batcher { tx }
    }

    /// The encoder's vectors for `texts`, in order (through the `embeddings` cache).
    pub async fn embed(&self, texts: Vec<String>) -> Reply {
        let (reply, rx) = oneshot::channel();
        self.tx.send(Job { texts, reply }).await.map_err(|_| "the encoder queue has closed".to_string())?;
        rx.await.map_err(|_| "the encoder stopped before answering".to_string())?
    }
}

async fn work(encoder: Arc<BlackBox>, name: &'static str, window: Window, shared: Shared, mut rx: mpsc::Receiver<Job>) {
    let mut held: Option<Job> = None;
    loop {
        let first = match held.take() {
            Some(j) => j,
            None => match rx.recv().await {
                Some(j) => j,
                None => return,
            },
        };
        let mut n = first.texts.len();
        let mut jobs = vec![first];
        let deadline = tokio::time::Instant::now() + window.wait;
        while n < window.cap {
            // What is queued already joins at once; otherwise wait out the window.
            let next = match rx.try_recv() {
                Ok(j) => Some(j),
                Err(mpsc::error::TryRecvError::Disconnected) => None,
                Err(mpsc::error::TryRecvError::Empty) => {
                    tokio::time::timeout_at(deadline, rx.recv()).await.ok().flatten()
                }
            };
            let Some(j) = next else { break };
            if n + j.texts.len() > window.cap {
                held = Some(j);
                break;
            }
            n += j.texts.len();
            jobs.push(j);
        }
        let texts: Vec<String> = jobs.iter().flat_map(|j| j.texts.iter().cloned()).collect();
        shared.metrics.batch(name, texts.len());
        let result = encoder.embed(&shared.wf, &shared.store, &Account::outside("serve"), &texts).await;
        match result {
            Ok(mut vectors) => {
                // Hand each job its own rows, first job first.
                for j in jobs {
                    let rest = vectors.split_off(j.texts.len().min(vectors.len()));
                    let _ = j.reply.send(Ok(std::mem::replace(&mut vectors, rest)));
                }
            }
            Err(e) => {
                let message = e.to_string();
                for j in jobs {
                    let _ = j.reply.send(Err(message.clone()));
                }
            }
        }
    }
}
