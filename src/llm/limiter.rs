//! Shared limits for one endpoint: requests per minute and tokens per minute (governor), a cap on
//! requests in flight, and a pause that a 429 with Retry-After imposes on every task at once.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

pub use crate::workflow::Limits;

pub struct Limiter {
    requests: Option<DefaultDirectRateLimiter>,
    tokens: Option<(DefaultDirectRateLimiter, u32)>,
    in_flight: Arc<Semaphore>,
    paused_until: Mutex<Option<Instant>>,
    /// Tokens estimated beyond what calls really used; spent before asking the token limiter again.
    credit: AtomicI64,
}

impl Limiter {
    pub fn new(l: &Limits) -> Limiter {
        // Burst 1: requests are spread evenly, so no window of any length sees more than the rate.
        let requests = l.requests_per_minute.filter(|r| *r > 0).map(|rpm| {
            let period = Duration::from_secs_f64(60.0 / rpm as f64);
            RateLimiter::direct(Quota::with_period(period).expect("positive period"))
        });
        let tokens = l.tokens_per_minute.filter(|t| *t > 0).map(|tpm| {
            // A burst of two seconds' worth lets one large request through without starving.
            let burst = (tpm / 30).max(1);
            let quota = Quota::per_minute(NonZeroU32::new(tpm).expect("positive"))
                .allow_burst(NonZeroU32::new(burst).expect("positive"));
            (RateLimiter::direct(quota), burst)
        });
        Limiter {
            requests,
            tokens,
            in_flight: Arc::new(Semaphore::new(l.max_in_flight.unwrap_or(16).max(1) as usize)),
            paused_until: Mutex::new(None),
            credit: AtomicI64::new(0),
        }
    }

    /// The limiter shared by every client of the same endpoint and limits in this process.
    pub fn shared(key: &str, l: &Limits) -> Arc<Limiter> {
        static ALL: OnceLock<Mutex<HashMap<String, Arc<Limiter>>>> = OnceLock::new();
        let key = format!("{key}|{l:?}");
        ALL.get_or_init(Default::default)
            .lock()
            .expect("limiter registry")
            .entry(key)
            .or_insert_with(|| Arc::new(Limiter::new(l)))
            .clone()
    }

    /// Waits for a slot in flight, the request rate, the token budget and any pause; the permit is
    /// held until the call returns.
    pub async fn acquire(&self, est_tokens: u64) -> OwnedSemaphorePermit {
        let permit = self.in_flight.clone().acquire_owned().await.expect("semaphore never closed");
        self.wait_pause().await;
        if let Some(r) = &self.requests {
            r.until_ready().await;
        }
        self.take_tokens(est_tokens).await;
        // A 429 may have arrived while we waited for the rate: honour it before sending.
        self.wait_pause().await;
        permit
    }

    async fn take_tokens(&self, n: u64) {
        let Some((lim, burst)) = &self.tokens else { return };
        // Races between tasks can only make the credit slightly stale, never the rate wrong by much.
        let from_credit = (self.credit.load(Ordering::Acquire).max(0) as u64).min(n);
        self.credit.fetch_sub(from_credit as i64, Ordering::AcqRel);
        let mut left = n - from_credit;
        while left > 0 {
            let chunk = left.min(*burst as u64) as u32;
            let _ = lim.until_n_ready(NonZeroU32::new(chunk).expect("positive")).await;
            left -= chunk as u64;
        }
    }

    /// After a call: the usage the server reported replaces the estimate.
    pub async fn reconcile(&self, estimated: u64, actual: u64) {
        if actual > estimated {
            self.take_tokens(actual - estimated).await;
        } else if self.tokens.is_some() {
            self.credit.fetch_add((estimated - actual) as i64, Ordering::AcqRel);
        }
    }

    /// Stops every task from sending until `d` from now (a 429 with Retry-After).
    pub fn pause_for(&self, d: Duration) {
        let until = Instant::now() + d;
        let mut p = self.paused_until.lock().expect("pause lock");
        if p.is_none_or(|cur| cur < until) {
            *p = Some(until);
        }
    }

    async fn wait_pause(&self) {
        loop {
            let until = *self.paused_until.lock().expect("pause lock");
            match until {
                Some(t) if t > Instant::now() => tokio::time::sleep_until(t).await,
                _ => return,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn requests_are_spaced_by_the_rate() {
        let l =
            Limiter::new(&Limits { requests_per_minute: Some(600), tokens_per_minute: None, max_in_flight: Some(4) });
        let t = Instant::now();
        for _ in 0..6 {
            drop(l.acquire(10).await);
        }
        // 600/min is one per 100 ms; the first is free.
        assert!(t.elapsed() >= Duration::from_millis(480), "{:?}", t.elapsed());
    }

    #[tokio::test]
    async fn a_pause_holds_everyone() {
        let l = Limiter::new(&Limits::default());
        l.pause_for(Duration::from_millis(200));
        let t = Instant::now();
        drop(l.acquire(1).await);
        assert!(t.elapsed() >= Duration::from_millis(190));
    }
}
