//! Nightly refresh: `flow schedule` fires, skips or waits while a run is live, stops cleanly on
//! SIGTERM; a refresh pays only for new chunks; the promotion gate keeps the better model.

use std::time::{Duration, Instant};

use crate::harness::{Sandbox, prose};
use crate::openai_server::{self, Config};
use crate::train::toy_set;

fn chunk_workflow(schedule: &str) -> String {
    format!(
        "name: nightly\nstore: t.db\nschedule: \"{schedule}\"\nmodels:\n  black_box: {{ provider: local, model: all-MiniLM-L6-v2 }}\nstages:\n  chunk: {{ kind: chunk, corpus: docs, max_tokens: 64, overlap: 8 }}\n"
    )
}

fn sigterm(child: &std::process::Child) {
    // SAFETY: sending a signal to our own child process.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
}

fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let t = Instant::now();
    while !done() {
        assert!(t.elapsed() < Duration::from_secs(60), "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A scheduler started with its log collected as it is written, so a test waits for what it says
/// rather than for a fixed time.
struct Scheduler {
    child: std::process::Child,
    log: std::sync::Arc<std::sync::Mutex<String>>,
    reader: std::thread::JoinHandle<()>,
}

impl Scheduler {
    fn start(sb: &Sandbox, args: &[&str]) -> Scheduler {
        use std::io::Read;
        let mut child = sb.cmd(&[&["schedule"], args].concat()).stderr(std::process::Stdio::piped()).spawn().unwrap();
        let mut err = child.stderr.take().unwrap();
        let log = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let sink = log.clone();
        let reader = std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = err.read(&mut buf) {
                if n == 0 {
                    break;
                }
                sink.lock().unwrap().push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        Scheduler { child, log, reader }
    }

    fn wait_for_log(&self, text: &str) {
        wait_for(&format!("{text:?} in the log"), || self.log.lock().unwrap().contains(text));
    }

    /// SIGTERM, then the exit code and the whole log.
    fn stop(mut self) -> (i32, String) {
        sigterm(&self.child);
        let status = self.child.wait().unwrap();
        self.reader.join().unwrap();
        let log = self.log.lock().unwrap().clone();
        (status.code().unwrap_or(-1), log)
    }
}

#[test]
fn next_lists_five_firings_in_the_time_zone() {
    let sb = Sandbox::new();
    sb.write("wf.yaml", chunk_workflow("0 2 * * *").replace("models:", "timezone: Europe/Berlin\nmodels:"));
    let r = sb.flow(&["schedule", "--next", "wf.yaml"]);
    assert_eq!(r.code, 0, "{}", r.all());
    let lines: Vec<&str> = r.stdout.lines().filter(|l| l.contains("02:00:00")).collect();
    assert_eq!(lines.len(), 5, "{}", r.stdout);
    assert!(lines.iter().all(|l| l.contains("CET") || l.contains("CEST")), "{}", r.stdout);

    sb.write("plain.yaml", chunk_workflow("0 2 * * *").replace("schedule: \"0 2 * * *\"\n", ""));
    let r = sb.flow(&["schedule", "--next", "plain.yaml"]);
    assert_eq!(r.code, 2, "{}", r.all());
    assert!(r.all().contains("has no `schedule:`"), "{}", r.all());
    sb.write("bad.yaml", chunk_workflow("0 2 * * *").replace("models:", "timezone: Mars/Olympus\nmodels:"));
    let r = sb.flow(&["validate", "bad.yaml"]);
    assert_eq!(r.code, 2, "{}", r.all());
    assert!(r.all().contains("unknown time zone"), "{}", r.all());
}

#[test]
fn the_scheduler_fires_on_time_and_stops_cleanly_on_sigterm() {
    let sb = Sandbox::new();
    sb.write("docs/a.txt", prose(1, 4));
    sb.write("wf.yaml", chunk_workflow("*/2 * * * * *"));
    let sched = Scheduler::start(&sb, &["wf.yaml", "--no-catch-up"]);
    let db = sb.db("t.db");
    wait_for("two scheduled runs", || {
        db.try_scalar("SELECT COUNT(*) FROM runs WHERE status = 'succeeded'").unwrap_or(0) >= 2
    });
    let (code, log) = sched.stop();
    assert_eq!(code, 0, "{log}");
    assert!(log.contains("stopped (signal)"), "{log}");
    assert_eq!(db.scalar("SELECT COUNT(*) FROM runs WHERE status = 'running'"), 0);
    // Each run records the firing it was started for, two seconds apart.
    let firings: Vec<String> = (1..=2)
        .map(|id| db.text(&format!("SELECT json_extract(args, '$.scheduled_for') FROM runs WHERE id = {id}")))
        .collect();
    let t: Vec<chrono::DateTime<chrono::FixedOffset>> =
        firings.iter().map(|f| chrono::DateTime::parse_from_rfc3339(f).unwrap()).collect();
    assert!((t[1] - t[0]).num_seconds() >= 2 && (t[1] - t[0]).num_seconds() % 2 == 0, "{firings:?}");
}

#[test]
fn a_firing_skips_or_waits_while_a_run_is_live() {
    let sb = Sandbox::new();
    sb.write("docs/a.txt", prose(2, 4));
    // Far-off firings: only the missed-firing catch-up at start runs.
    sb.write("wf.yaml", chunk_workflow("0 3 1 1 *"));
    let db = sb.db("t.db");

    let live = flow::engine::lock::RunLock::acquire(&sb.path("t.db")).unwrap();
    let sched = Scheduler::start(&sb, &["wf.yaml"]);
    sched.wait_for_log("skipping this firing");
    let (code, log) = sched.stop();
    assert_eq!(code, 0, "{log}");
    assert!(log.contains("was missed; running once now") && log.contains("a run is live"), "{log}");
    assert_eq!(db.try_scalar("SELECT COUNT(*) FROM runs").unwrap_or(0), 0);

    let sched = Scheduler::start(&sb, &["wf.yaml", "--when-busy", "wait"]);
    sched.wait_for_log("waiting for it to end");
    drop(live);
    wait_for("the waiting run", || {
        db.try_scalar("SELECT COUNT(*) FROM runs WHERE status = 'succeeded'").unwrap_or(0) == 1
    });
    sched.wait_for_log("next at");
    let (code, log) = sched.stop();
    assert_eq!(code, 0, "{log}");

    // Started again: the catch-up firing has run, so nothing is missed.
    let sched = Scheduler::start(&sb, &["wf.yaml"]);
    sched.wait_for_log("next at");
    let (code, log) = sched.stop();
    assert_eq!(code, 0, "{log}");
    assert!(!log.contains("was missed"), "{log}");
    assert_eq!(db.scalar("SELECT COUNT(*) FROM runs"), 1);
}

#[test]
fn a_refresh_pays_only_for_the_new_document() {
    let server = openai_server::start(Config::default());
    let sb = Sandbox::new();
    for i in 0..6 {
        sb.write(&format!("docs/d{i}.txt"), prose(40 + i, 3));
    }
    sb.write("wf.yaml", crate::llm::workflow(&server.base_url(), "", ""));
    let r = sb.flow(&["run", "wf.yaml", "--quiet"]);
    assert_eq!(r.code, 0, "{}", r.all());
    let db = sb.db("t.db");
    let before = server.log.entries().len();
    let last_chunk = db.scalar("SELECT MAX(id) FROM chunks");
    let last_query = db.scalar("SELECT MAX(id) FROM queries");

    sb.write("docs/new.txt", prose(99, 3));
    let r = sb.flow(&["run", "wf.yaml", "--quiet"]);
    assert_eq!(r.code, 0, "{}", r.all());
    let new_chunks = db.scalar(&format!("SELECT COUNT(*) FROM chunks WHERE id > {last_chunk}"));
    let new_kept = db.scalar(&format!("SELECT COUNT(*) FROM queries WHERE id > {last_query} AND status = 'kept'"));
    assert!(new_chunks > 0 && new_kept > 0);
    // One generate call per new chunk, one judge call per new kept question; nothing else.
    assert_eq!(server.log.entries().len() - before, (new_chunks + new_kept) as usize);
    assert_eq!(
        db.scalar(&format!(
            "SELECT COUNT(*) FROM queries q JOIN chunks c ON c.id = q.chunk_id WHERE q.id > {last_query} AND c.id <= {last_chunk}"
        )),
        0,
        "old chunks got new questions"
    );
}

fn gate_workflow(train: &str) -> String {
    format!(
        "name: t\nstore: t.db\nmodels:\n  augment: {{ init: tiny }}\nstages:\n  train:\n    kind: train\n    beir: toy\n    retriever: augment_only\n    batch_size: 8\n    val_fraction: 0.25\n    dropout: 0\n{train}  eval:\n    kind: eval_recall\n    needs: [train]\n    eval_set: {{ beir: toy, split: test }}\n    retrievers: [augment_only]\n    gate_metric: recall@1\n"
    )
}

#[test]
fn the_gate_promotes_a_better_model_and_keeps_a_worse_one_as_candidate() {
    let sb = Sandbox::new();
    toy_set(&sb);
    crate::train::toy_test_split(&sb);
    let db = sb.db("t.db");
    let status = |id: i64| db.text(&format!("SELECT status FROM models WHERE id = {id}"));

    sb.write("wf.yaml", gate_workflow("    epochs: 6\n    lr: 1.0e-3\n"));
    let r = sb.flow(&["run", "wf.yaml"]);
    assert_eq!(r.code, 0, "{}", r.all());
    assert_eq!(status(1), "promoted", "{}", r.all());

    // Retrained from the untrained start with a learning rate that changes nothing: worse.
    sb.write("wf.yaml", gate_workflow("    epochs: 1\n    lr: 1.0e-9\n    init_from: base\n"));
    let r = sb.flow(&["run", "wf.yaml"]);
    assert_eq!(r.code, 0, "{}", r.all());
    assert_eq!((status(1).as_str(), status(2).as_str()), ("promoted", "candidate"), "{}", r.all());
    let why = db.text("SELECT status_reason FROM models WHERE id = 2");
    assert!(why.contains("did not beat its starting model"), "{why}");

    // Retrained from the start, briefly: better than its start, worse than the promoted model.
    sb.write("wf.yaml", gate_workflow("    epochs: 1\n    lr: 1.0e-3\n    init_from: base\n"));
    let r = sb.flow(&["run", "wf.yaml"]);
    assert_eq!(r.code, 0, "{}", r.all());
    assert_eq!(db.scalar("SELECT improved FROM models WHERE id = 3"), 1, "{}", r.all());
    assert_eq!((status(1).as_str(), status(3).as_str()), ("promoted", "candidate"), "{}", r.all());
    let why = db.text("SELECT status_reason FROM models WHERE id = 3");
    assert!(why.contains("recall@1 ") && why.contains(" < ") && why.contains("promoted model 1"), "{why}");

    // Continued from the promoted model: at least as good, so it replaces it.
    sb.write("wf.yaml", gate_workflow("    epochs: 8\n    lr: 1.0e-3\n"));
    let r = sb.flow(&["run", "wf.yaml"]);
    assert_eq!(r.code, 0, "{}", r.all());
    assert!(r.all().contains("continuing from the promoted model 1"), "{}", r.all());
    assert_eq!(db.scalar("SELECT parent_id FROM models WHERE id = 4"), 1);
    assert_eq!(
        (status(1).as_str(), status(4).as_str()),
        ("retired", "promoted"),
        "{}\n{}",
        r.all(),
        db.text("SELECT status_reason FROM models WHERE id = 4")
    );

    let list = sb.flow(&["models", "list", "-w", "wf.yaml"]);
    assert_eq!(list.code, 0, "{}", list.all());
    assert!(
        list.stdout.contains("promoted") && list.stdout.contains("retired") && list.stdout.contains("model 1"),
        "{}",
        list.stdout
    );

    // A person overrides the gate.
    let r = sb.flow(&["models", "promote", "2", "-w", "wf.yaml"]);
    assert_eq!(r.code, 0, "{}", r.all());
    assert_eq!((status(2).as_str(), status(4).as_str()), ("promoted", "retired"));
    assert_eq!(sb.flow(&["models", "promote", "99", "-w", "wf.yaml"]).code, 2);
}
