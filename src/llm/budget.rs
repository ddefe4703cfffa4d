//! What a run and each of its stages has spent against its `budget:`: a request reserves its estimate
//! when it is sent (in flight counts), is settled with what it used, and is refused if it would cross a cap.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::workflow::budget::Budget;

/// Requests, tokens and dollars.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Spent {
    pub requests: u64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub usd: f64,
}

impl Spent {
    fn tokens(&self) -> u64 {
        self.prompt_tokens + self.completion_tokens
    }

    pub fn add(&mut self, o: &Spent) {
        self.requests += o.requests;
        self.prompt_tokens += o.prompt_tokens;
        self.completion_tokens += o.completion_tokens;
        self.usd += o.usd;
    }

    fn sub(&mut self, o: &Spent) {
        self.requests = self.requests.saturating_sub(o.requests);
        self.prompt_tokens = self.prompt_tokens.saturating_sub(o.prompt_tokens);
        self.completion_tokens = self.completion_tokens.saturating_sub(o.completion_tokens);
        self.usd = (self.usd - o.usd).max(0.0);
    }

    /// `$0.42, 17 requests, 9,100 tokens`.
    pub fn describe(&self) -> String {
        format!("${:.4}, {} requests, {} tokens", self.usd, self.requests, self.tokens())
    }
}

#[derive(Default)]
struct State {
    /// Settled: requests that came back (or failed), with what they used.
    spent: Spent,
    /// Estimates of requests in flight.
    reserved: Spent,
    in_flight: u64,
    /// Why the ledger refused a request; once set, every later request is refused too.
    stopped: Option<String>,
}

pub struct Ledger {
    /// `the run` or `stage \`generate\``, for messages.
    pub scope: String,
    caps: Budget,
    state: Mutex<State>,
    idle: tokio::sync::Notify,
}

impl Ledger {
    pub fn new(scope: &str, caps: Budget, earlier: Spent) -> Ledger {
        let state = State { spent: earlier, ..Default::default() };
        Ledger { scope: scope.to_string(), caps, state: Mutex::new(state), idle: tokio::sync::Notify::new() }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Reserves `est` (one request) or says which cap it would cross.
    fn reserve(&self, est: &Spent) -> Result<(), String> {
        let mut s = self.lock();
        if let Some(why) = &s.stopped {
            return Err(why.clone());
        }
        let mut after = s.spent;
        after.add(&s.reserved);
        after.add(est);
        let crossed = match self.caps {
            Budget { max_requests: Some(m), .. } if after.requests > m => Some(format!("max_requests {m}")),
            Budget { max_tokens: Some(m), .. } if after.tokens() > m => Some(format!("max_tokens {m}")),
            Budget { max_usd: Some(m), .. } if after.usd > m => Some(format!("max_usd {m}")),
            _ => None,
        };
        if let Some(cap) = crossed {
            let mut used = s.spent;
            used.add(&s.reserved);
            let why =
                format!("the budget of {} ({cap}) is reached: {} spent or in flight", self.scope, used.describe());
            s.stopped = Some(why.clone());
            return Err(why);
        }
        s.reserved.add(est);
        s.in_flight += 1;
        Ok(())
    }

    fn settle(&self, est: &Spent, actual: &Spent) {
        let mut s = self.lock();
        s.reserved.sub(est);
        s.spent.add(actual);
        s.in_flight = s.in_flight.saturating_sub(1);
        if s.in_flight == 0 {
            self.idle.notify_waiters();
        }
    }

    /// Adds what a request this ledger did not reserve used (a batch sent by a killed process): it
    /// is paid for, so it counts, and it is never refused.
    fn record(&self, actual: &Spent) {
        self.lock().spent.add(actual);
    }

    /// What was settled so far (this process's requests and what `earlier` said).
    pub fn spent(&self) -> Spent {
        self.lock().spent
    }

    pub fn stopped(&self) -> Option<String> {
        self.lock().stopped.clone()
    }

    /// Completes once no request is in flight: their answers are stored before the run ends.
    pub async fn idle(&self) {
        loop {
            let wait = self.idle.notified();
            if self.lock().in_flight == 0 {
                return;
            }
            wait.await;
        }
    }
}

/// The ledgers one client's requests count against (the run's and its stage's), reserved together.
#[derive(Clone, Default)]
pub struct Ledgers(pub Vec<Arc<Ledger>>);

impl Ledgers {
    /// Reserves `est` on every ledger, or on none: the refusal says which budget.
    pub fn reserve(&self, est: &Spent) -> Result<(), String> {
        for (i, l) in self.0.iter().enumerate() {
            if let Err(why) = l.reserve(est) {
                for done in &self.0[..i] {
                    done.settle(est, &Spent::default());
                }
                return Err(why);
            }
        }
        Ok(())
    }

    pub fn settle(&self, est: &Spent, actual: &Spent) {
        for l in &self.0 {
            l.settle(est, actual);
        }
    }

    pub fn record(&self, actual: &Spent) {
        for l in &self.0 {
            l.record(actual);
        }
    }
}

type Key = (i64, Option<String>);

fn registry() -> &'static Mutex<HashMap<Key, Arc<Ledger>>> {
    static R: std::sync::OnceLock<Mutex<HashMap<Key, Arc<Ledger>>>> = std::sync::OnceLock::new();
    R.get_or_init(Default::default)
}

/// Opens the ledger of a run (`stage` None) or of one stage in it; it replaces any earlier one.
pub fn open(run_id: i64, stage: Option<&str>, caps: Budget, earlier: Spent) -> Arc<Ledger> {
    let scope = match stage {
        Some(s) => format!("stage `{s}`"),
        None => "the run".to_string(),
    };
    let l = Arc::new(Ledger::new(&scope, caps, earlier));
    registry().lock().unwrap_or_else(|p| p.into_inner()).insert((run_id, stage.map(str::to_string)), l.clone());
    l
}

/// The ledgers a client of `stage` in `run_id` counts against.
pub fn of(run_id: i64, stage: &str) -> Ledgers {
    let r = registry().lock().unwrap_or_else(|p| p.into_inner());
    Ledgers([(run_id, None), (run_id, Some(stage.to_string()))].iter().filter_map(|k| r.get(k).cloned()).collect())
}

/// Every ledger of the run (to wait for their requests in flight, or to read why one stopped).
pub fn of_run(run_id: i64) -> Vec<Arc<Ledger>> {
    let r = registry().lock().unwrap_or_else(|p| p.into_inner());
    r.iter().filter(|(k, _)| k.0 == run_id).map(|(_, l)| l.clone()).collect()
}

/// Forgets the run's ledgers once it ends.
pub fn close(run_id: i64) {
    registry().lock().unwrap_or_else(|p| p.into_inner()).retain(|k, _| k.0 != run_id);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(tokens: u64) -> Spent {
        Spent { requests: 1, prompt_tokens: tokens, completion_tokens: 0, usd: tokens as f64 * 1e-3 }
    }

    #[test]
    fn in_flight_requests_count_and_a_crossing_one_is_refused_for_good() {
        let l = Ledger::new("the run", Budget { max_requests: Some(3), ..Default::default() }, one(0));
        // One request settled earlier (a resume), two in flight: the fourth would cross max_requests 3.
        assert!(l.reserve(&one(10)).is_ok());
        assert!(l.reserve(&one(10)).is_ok());
        let err = l.reserve(&one(10)).unwrap_err();
        assert!(err.contains("max_requests 3") && err.contains("3 requests"), "{err}");
        l.settle(&one(10), &one(4));
        assert!(l.reserve(&one(1)).is_err(), "a stopped ledger stays stopped");
        assert_eq!(l.spent().requests, 2);
        assert_eq!(l.spent().prompt_tokens, 4);
    }

    #[test]
    fn tokens_and_dollars_are_capped_on_the_estimate() {
        let l = Ledger::new("stage `g`", Budget { max_tokens: Some(100), ..Default::default() }, Spent::default());
        assert!(l.reserve(&one(60)).is_ok());
        assert!(l.reserve(&one(60)).unwrap_err().contains("max_tokens 100"));
        let d = Ledger::new("the run", Budget { max_usd: Some(0.05), ..Default::default() }, Spent::default());
        assert!(d.reserve(&one(40)).is_ok());
        assert!(d.reserve(&one(20)).unwrap_err().contains("max_usd 0.05"));
    }
}
