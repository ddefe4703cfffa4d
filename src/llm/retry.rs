//! When to try again: exponential backoff with full jitter, a cap on attempts and a total deadline.
//! The policy is what the workflow says (`workflow::RetryPolicy`); this is how it is applied.

use std::time::Duration;

pub use crate::workflow::RetryPolicy;

impl RetryPolicy {
    /// Full jitter (AWS architecture blog): uniform in [0, min(max, base * 2^attempt)], and never
    /// shorter than what the server asked for with Retry-After.
    pub fn backoff(&self, attempt: u32, retry_after: Option<Duration>) -> Duration {
        let ceiling = self.base_ms.saturating_mul(1u64 << attempt.min(20)).min(self.max_ms);
        let jittered = Duration::from_millis(fastrand::u64(0..=ceiling));
        jittered.max(retry_after.unwrap_or_default())
    }

    pub fn deadline(&self) -> Duration {
        Duration::from_secs_f64(self.deadline_s.max(0.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_is_bounded_and_honours_retry_after() {
        let p = RetryPolicy { attempts: 5, base_ms: 100, max_ms: 1000, deadline_s: 10.0 };
        for attempt in 0..10 {
            let ceiling = (100u64 << attempt).min(1000);
            for _ in 0..50 {
                assert!(p.backoff(attempt, None) <= Duration::from_millis(ceiling));
            }
        }
        assert!(p.backoff(0, Some(Duration::from_secs(2))) >= Duration::from_secs(2));
    }
}
