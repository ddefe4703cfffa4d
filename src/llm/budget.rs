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

/// Why a ledger sends no more requests.
#[derive(Debug, Clone, PartialEq)]
pub enum Stop {
    /// A cap would be crossed: what was reached and what was spent.
    Budget(String),
    /// A signal asked the run to stop.
    Interrupted,
}

#[derive(Default)]
struct State {
    /// Settled: requests that came back (or failed), with what they used.
    spent: Spent,
    /// Estimates of requests in flight.
    reserved: Spent,
    in_flight: u64,
    /// Why the ledger refused a request; once set, every later request is refused too.
    stopped: Option<Stop>,
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

    /// Reserves `est` (one request) or says why it may not be sent (the cap it would cross).
    fn reserve(&self, est: &Spent) -> Result<(), Stop> {
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
            s.stopped = Some(Stop::Budget(why.clone()));
            return Err(Stop::Budget(why));
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

    /// Why a cap stopped this ledger, if one did.
    pub fn stopped(&self) -> Option<String> {
        match &self.lock().stopped {
            Some(Stop::Budget(why)) => Some(why.clone()),
            _ => None,
        }
    }

    /// Refuses every request from now on (a signal stopped the run); those in flight settle as usual.
    pub fn interrupt(&self) {
        self.lock().stopped.get_or_insert(Stop::Interrupted);
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
    pub fn reserve(&self, est: &Spent) -> Result<(), Stop> {
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

/// The ledgers of one run: the run's own and one per stage that has started. Owned by the run and
/// handed to each stage through its context, so nothing outlives the run or is shared between runs.
pub struct Budgets {
    run: Arc<Ledger>,
    stages: Mutex<HashMap<String, Arc<Ledger>>>,
}

impl Budgets {
    /// The run's ledger at `caps`, starting from what earlier attempts of the run spent.
    pub fn new(caps: Budget, earlier: Spent) -> Budgets {
        Budgets { run: Arc::new(Ledger::new("the run", caps, earlier)), stages: Mutex::default() }
    }

    /// Opens the ledger of `stage` (replacing any earlier one of this run) and returns the ledgers
    /// its requests count against: the run's and its own.
    pub fn open_stage(&self, stage: &str, caps: Budget, earlier: Spent) -> (Arc<Ledger>, Ledgers) {
        let l = Arc::new(Ledger::new(&format!("stage `{stage}`"), caps, earlier));
        self.stages.lock().unwrap_or_else(|p| p.into_inner()).insert(stage.to_string(), l.clone());
        (l.clone(), Ledgers(vec![self.run.clone(), l]))
    }

    /// Sends no more requests: every ledger of the run refuses from now on.
    pub fn interrupt(&self) {
        for l in self.all() {
            l.interrupt();
        }
    }

    /// Every ledger of the run (to wait for their requests in flight).
    pub fn all(&self) -> Vec<Arc<Ledger>> {
        let stages = self.stages.lock().unwrap_or_else(|p| p.into_inner());
        std::iter::once(self.run.clone()).chain(stages.values().cloned()).collect()
    }
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
        let Stop::Budget(err) = l.reserve(&one(10)).unwrap_err() else { panic!("a budget refusal") };
        assert!(err.contains("max_requests 3") && err.contains("3 requests"), "{err}");
        l.settle(&one(10), &one(4));
        assert!(l.reserve(&one(1)).is_err(), "a stopped ledger stays stopped");
        assert_eq!(l.spent().requests, 2);
        assert_eq!(l.spent().prompt_tokens, 4);
    }

    #[test]
    fn a_stage_counts_against_the_run_and_itself_and_the_run_owns_both() {
        let run = Budgets::new(Budget { max_requests: Some(2), ..Default::default() }, Spent::default());
        let (_, a) = run.open_stage("a", Budget::default(), Spent::default());
        let (_, b) = run.open_stage("b", Budget { max_requests: Some(1), ..Default::default() }, Spent::default());
        assert!(b.reserve(&one(1)).is_ok());
        let refused = |r: Result<(), Stop>, what: &str| matches!(r, Err(Stop::Budget(w)) if w.contains(what));
        assert!(refused(b.reserve(&one(1)), "stage `b`"), "the stage's own cap");
        assert!(a.reserve(&one(1)).is_ok());
        assert!(refused(a.reserve(&one(1)), "the run"), "two requests in flight reach the run's cap");
        assert_eq!(run.all().len(), 3);
        // A signal: nothing more is sent, and what is in flight still settles.
        let fresh = Budgets::new(Budget::default(), Spent::default());
        let (ledger, c) = fresh.open_stage("c", Budget::default(), Spent::default());
        assert!(c.reserve(&one(1)).is_ok());
        fresh.interrupt();
        assert_eq!(c.reserve(&one(1)), Err(Stop::Interrupted));
        c.settle(&one(1), &one(2));
        assert_eq!(ledger.spent().prompt_tokens, 2);
    }

    #[test]
    fn tokens_and_dollars_are_capped_on_the_estimate() {
        let l = Ledger::new("stage `g`", Budget { max_tokens: Some(100), ..Default::default() }, Spent::default());
        assert!(l.reserve(&one(60)).is_ok());
        assert!(matches!(l.reserve(&one(60)).unwrap_err(), Stop::Budget(w) if w.contains("max_tokens 100")));
        let d = Ledger::new("the run", Budget { max_usd: Some(0.05), ..Default::default() }, Spent::default());
        assert!(d.reserve(&one(40)).is_ok());
        assert!(matches!(d.reserve(&one(20)).unwrap_err(), Stop::Budget(w) if w.contains("max_usd 0.05")));
    }
}
