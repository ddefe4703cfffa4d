//! Gathers concurrent requests' texts (or a reranker's pairs) into one model call: the first waits at most a short window
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

/// What a queue's worker does with one gathered batch: its outputs, one per item, in order.
pub type Run<I, O> = Arc<
    dyn Fn(Vec<I>) -> std::pin::Pin<Box<dyn std::future::Future<Output = std::result::Result<Vec<O>, String>> + Send>>
        + Send
        + Sync,
>;

struct Job<I, O> {
    items: Vec<I>,
    reply: oneshot::Sender<std::result::Result<Vec<O>, String>>,
}

/// One model behind a queue (an encoder's texts, a reranker's pairs); dropped with its last
/// handle, after the queued work is done.
pub struct Queue<I, O> {
    tx: mpsc::Sender<Job<I, O>>,
}

impl<I, O> Clone for Queue<I, O> {
    fn clone(&self) -> Self {
        Queue { tx: self.tx.clone() }
    }
}

/// An encoder's queue: texts in, vectors out.
pub type Batcher = Queue<String, Vec<f32>>;

/// What every batch needs to reach the cache.
#[derive(Clone)]
pub struct Shared {
    pub wf: Arc<Workflow>,
    pub store: Store,
    pub metrics: Arc<Metrics>,
}

impl Batcher {
    /// A queue in front of `encoder`, its batches embedded through the `embeddings` cache.
    pub fn spawn(encoder: Arc<BlackBox>, name: &'static str, window: Window, shared: Shared) -> Batcher {
        let metrics = shared.metrics.clone();
        let run: Run<String, Vec<f32>> = Arc::new(move |texts| {
            let (encoder, shared) = (encoder.clone(), shared.clone());
            Box::pin(async move {
                encoder
                    .embed(&shared.wf, &shared.store, &Account::outside("serve"), &texts)
                    .await
                    .map_err(|e| e.to_string())
            })
        });
        Queue::start(name, window, metrics, run)
    }

    /// The encoder's vectors for `texts`, in order (through the `embeddings` cache).
    pub async fn embed(&self, texts: Vec<String>) -> Reply {
        self.call(texts).await
    }
}

impl<I: Send + 'static, O: Send + 'static> Queue<I, O> {
    /// A worker that gathers requests within `window` and hands each batch to `run`.
    pub fn start(name: &'static str, window: Window, metrics: Arc<Metrics>, run: Run<I, O>) -> Queue<I, O> {
        let (tx, rx) = mpsc::channel::<Job<I, O>>(1024);
        tokio::spawn(work(run, name, window, metrics, rx));
        Queue { tx }
    }

    /// The outputs for `items`, in order, computed in a batch with whatever other requests joined.
    pub async fn call(&self, items: Vec<I>) -> std::result::Result<Vec<O>, String> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(Job { items, reply }).await.map_err(|_| "the model queue has closed".to_string())?;
        rx.await.map_err(|_| "the model stopped before answering".to_string())?
    }
}

async fn work<I, O>(
    run: Run<I, O>,
    name: &'static str,
    window: Window,
    metrics: Arc<Metrics>,
    mut rx: mpsc::Receiver<Job<I, O>>,
) {
    let mut held: Option<Job<I, O>> = None;
    loop {
        let first = match held.take() {
            Some(j) => j,
            None => match rx.recv().await {
                Some(j) => j,
                None => return,
            },
        };
        let mut n = first.items.len();
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
            if n + j.items.len() > window.cap {
                held = Some(j);
                break;
            }
            n += j.items.len();
            jobs.push(j);
        }
        let mut replies = Vec::with_capacity(jobs.len());
        let mut items = Vec::with_capacity(n);
        for j in jobs {
            replies.push((j.items.len(), j.reply));
            items.extend(j.items);
        }
        metrics.batch(name, items.len());
        match run(items).await {
            Ok(mut outputs) => {
                // Hand each job its own outputs, first job first.
                for (len, reply) in replies {
                    let rest = outputs.split_off(len.min(outputs.len()));
                    let _ = reply.send(Ok(std::mem::replace(&mut outputs, rest)));
                }
            }
            Err(message) => {
                for (_, reply) in replies {
                    let _ = reply.send(Err(message.clone()));
                }
            }
        }
    }
}
