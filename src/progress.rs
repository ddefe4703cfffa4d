//! Progress as a person sees it: an indicatif bar per running stage on a terminal, plain timestamped
//! lines when stderr is a file or pipe, nothing with `--quiet`. Counts are also what the engine stores.

use std::io::IsTerminal;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::store::runs::Counts;

/// Writes a line to stderr. A closed or full stderr drops it: progress and logging must never take
/// down a run (`flow run ... 2>&1 | head -1`, a full disk under cron).
pub fn stderr_line(line: &str) {
    use std::io::Write;
    let mut err = std::io::stderr().lock();
    let _ = writeln!(err, "{line}");
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Bars,
    Plain,
    Quiet,
}

#[derive(Clone)]
pub struct Progress {
    mode: Mode,
    multi: MultiProgress,
}

impl Progress {
    pub fn new(quiet: bool) -> Progress {
        let mode = if quiet {
            Mode::Quiet
        } else if std::io::stderr().is_terminal() {
            Mode::Bars
        } else {
            Mode::Plain
        };
        let multi = MultiProgress::with_draw_target(if mode == Mode::Bars {
            ProgressDrawTarget::stderr()
        } else {
            ProgressDrawTarget::hidden()
        });
        Progress { mode, multi }
    }

    /// A line for the user that does not tear the bars.
    pub fn log(&self, line: &str) {
        match self.mode {
            Mode::Bars => {
                let _ = self.multi.println(line);
            }
            Mode::Plain => stderr_line(&format!("{} {line}", chrono::Local::now().format("%H:%M:%S"))),
            Mode::Quiet => {}
        }
    }

    pub fn stage(&self, name: &str) -> StageProgress {
        let bar = (self.mode == Mode::Bars).then(|| {
            let bar = self.multi.add(ProgressBar::new(0));
            bar.set_style(
                ProgressStyle::with_template(
                    "{prefix:>12.bold} [{bar:30.cyan/blue}] {pos}/{len} {per_sec:>10} ETA {eta:>4} {msg}",
                )
                .expect("static template")
                .progress_chars("=> "),
            );
            bar.set_prefix(name.to_string());
            bar.enable_steady_tick(Duration::from_millis(200));
            bar
        });
        StageProgress {
            inner: Arc::new(Inner {
                name: name.to_string(),
                progress: self.clone(),
                bar,
                counts: Mutex::new(Counts::default()),
                started: Instant::now(),
                last_line: Mutex::new(Instant::now()),
                message: Mutex::new(String::new()),
            }),
        }
    }
}

struct Inner {
    name: String,
    progress: Progress,
    bar: Option<ProgressBar>,
    counts: Mutex<Counts>,
    started: Instant,
    last_line: Mutex<Instant>,
    message: Mutex<String>,
}

/// One stage's counters; cheap to clone into worker tasks.
#[derive(Clone)]
pub struct StageProgress {
    inner: Arc<Inner>,
}

impl StageProgress {
    pub fn set_total(&self, total: u64) {
        self.update(|c| c.total = total as i64);
    }
    pub fn done(&self, n: u64) {
        self.update(|c| c.done += n as i64);
    }
    pub fn cached(&self, n: u64) {
        self.update(|c| c.cached += n as i64);
    }
    pub fn skipped(&self, n: u64) {
        self.update(|c| c.skipped += n as i64);
    }
    pub fn failed(&self, n: u64) {
        self.update(|c| c.failed += n as i64);
    }

    /// A short status shown beside the bar (e.g. the training loss).
    pub fn message(&self, msg: &str) {
        if let Some(bar) = &self.inner.bar {
            bar.set_message(msg.to_string());
        }
        *self.inner.message.lock().expect("message lock") = msg.to_string();
    }

    pub fn counts(&self) -> Counts {
        *self.inner.counts.lock().expect("counts lock")
    }

    /// A message about this stage (a skipped file, a warning), shown above the bars.
    pub fn log(&self, msg: &str) {
        self.inner.progress.log(&format!("[{}] {msg}", self.inner.name));
    }

    pub fn finish(&self, status: &str) {
        if let Some(bar) = &self.inner.bar {
            bar.finish_and_clear();
        }
        let c = self.counts();
        self.inner.progress.log(&format!(
            "[{}] {status} in {:.1}s: {} done, {} already stored, {} skipped, {} failed",
            self.inner.name,
            self.inner.started.elapsed().as_secs_f64(),
            c.done,
            c.cached,
            c.skipped,
            c.failed
        ));
    }

    fn update(&self, f: impl FnOnce(&mut Counts)) {
        let c = {
            let mut c = self.inner.counts.lock().expect("counts lock");
            f(&mut c);
            *c
        };
        let finished = (c.done + c.cached + c.skipped + c.failed) as u64;
        if let Some(bar) = &self.inner.bar {
            bar.set_length(c.total.max(0) as u64);
            bar.set_position(finished);
            return;
        }
        if self.inner.progress.mode != Mode::Plain {
            return;
        }
        let mut last = self.inner.last_line.lock().expect("line lock");
        if last.elapsed() >= Duration::from_secs(5) && c.total > 0 {
            *last = Instant::now();
            let secs = self.inner.started.elapsed().as_secs_f64().max(1e-3);
            let rate = finished as f64 / secs;
            let left = (c.total as u64).saturating_sub(finished) as f64;
            let eta = if rate > 0.0 { format!("{:.0}s", left / rate) } else { "?".into() };
            let msg = self.inner.message.lock().expect("message lock").clone();
            self.inner
                .progress
                .log(&format!("[{}] {finished}/{} items, {rate:.1}/s, ETA {eta} {msg}", self.inner.name, c.total));
        }
    }
}
