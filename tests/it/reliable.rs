//! Never silently wrong, round two, from outside the binary: a key that cannot be a header, a garbled
//! batch output line, an interrupt with requests in flight, bad store paths, a very long YAML line,
//! credentials in a base URL, and two pulls of one model at once.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crate::harness::{Ran, Sandbox};
use crate::llm::{corpus, workflow};
use crate::openai_server::{self as server, Config};

#[test]
fn a_key_that_cannot_be_a_header_is_refused_before_any_call_naming_only_its_variable() {
    let srv = server::start(Config::default());
    let sb = Sandbox::new();
    corpus(&sb, 10);
    sb.write("wf.yaml", workflow(&srv.base_url(), "", ""));
    for bad in ["sk-test-0123\r", "sk-test-0123\n", "sk-\u{1}test"] {
        let r: Ran = sb.cmd(&["run", "wf.yaml"]).env("OPENAI_API_KEY", bad).output().unwrap().into();
        assert_eq!(r.code, 2, "{}", r.all());
        assert!(r.stderr.contains("OPENAI_API_KEY"), "{}", r.stderr);
        assert!(!r.all().contains("sk-test"), "the key's value is never shown: {}", r.all());
    }
    assert!(srv.log.entries().is_empty(), "nothing was sent");
}

#[test]
fn a_garbled_batch_output_line_is_unanswered_and_the_good_lines_are_stored() {
    let srv = server::start(Config { batch_garble_every: 4, ..Config::default() });
    let sb = Sandbox::new();
    corpus(&sb, 30);
    let model = "    batch: { poll_s: 0.1, max_requests: 12 }";
    sb.write("wf.yaml", workflow(&srv.base_url(), model, ""));
    let r = sb.flow(&["run", "wf.yaml"]);
    assert_eq!(r.code, 0, "the garbled lines' requests went live: {}", r.all());
    assert!(r.stderr.contains("are not result JSON"), "{}", r.stderr);
    let db = sb.db("t.db");
    assert_eq!(db.scalar("SELECT COUNT(*) FROM generations WHERE status = 'done'"), 30);
    let live = srv.log.count("chat") as i64;
    assert!(live > 0, "some lines were garbled and asked again live");
    // Every other answer came from the batches and is in the cache once.
    let answered = db.scalar("SELECT COUNT(*) FROM llm_calls WHERE usable = 1");
    let batched = db.scalar("SELECT COALESCE(SUM(requests), 0) FROM batches");
    assert_eq!(answered, batched, "garbled ones were answered live instead, each stored once");
    let kept = std::fs::read_dir(sb.path("t.db.batches")).unwrap().count();
    assert!(kept > 0, "the raw batch output is kept for inspection");
    // A rerun is up to date: the stage is not wedged.
    let again = sb.flow(&["run", "wf.yaml"]);
    assert_eq!(again.code, 0, "{}", again.all());
}

#[test]
fn an_interrupt_stores_the_answers_in_flight_and_resume_pays_for_nothing_twice() {
    let srv = server::start(Config { latency: Duration::from_millis(300), ..Config::default() });
    let sb = Sandbox::new();
    corpus(&sb, 80);
    sb.write("wf.yaml", workflow(&srv.base_url(), "    limits: { max_in_flight: 16 }", ""));
    let mut child = sb.cmd(&["run", "wf.yaml", "--quiet"]).env("OPENAI_API_KEY", "sk-test").spawn().unwrap();
    let t = Instant::now();
    while srv.log.count("chat") < 24 {
        assert!(t.elapsed() < Duration::from_secs(60), "the run did not start");
        std::thread::sleep(Duration::from_millis(5));
    }
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let status = child.wait().unwrap();
    assert!(!status.success(), "an interrupted run does not report success");
    let sent = srv.log.count("chat");
    let db = sb.db("t.db");
    assert_eq!(db.text("SELECT status FROM runs"), "interrupted");
    // Every request the server answered before the process exited is in the store.
    assert_eq!(db.scalar("SELECT COUNT(*) FROM llm_calls") as usize, sent, "an answer in flight was lost");

    let r: Ran = sb.cmd(&["resume", "-w", "wf.yaml"]).env("OPENAI_API_KEY", "sk-test").output().unwrap().into();
    assert_eq!(r.code, 0, "{}", r.all());
    let mut asked: HashMap<u64, usize> = HashMap::new();
    for e in srv.log.entries().iter().filter(|e| e.path == "chat") {
        *asked.entry(e.hash).or_default() += 1;
    }
    let twice: Vec<_> = asked.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "{} requests were paid twice", twice.len());
}

#[test]
fn bad_store_paths_and_a_huge_yaml_line_are_input_errors_that_say_where() {
    let sb = Sandbox::new();
    sb.write("docs/a.txt", "Some text about revenue.");
    std::fs::create_dir_all(sb.path("a-folder")).unwrap();
    let stages = "stages:\n  chunk: { kind: chunk, corpus: docs }\n";
    for (store, says) in [("a-folder", "is a folder"), ("\"\"", "is empty"), ("/proc/flow-test.db", "cannot create")] {
        sb.write("wf.yaml", format!("name: t\nstore: {store}\n{stages}"));
        let r = sb.flow(&["run", "wf.yaml"]);
        assert_eq!(r.code, 2, "{store}: {}", r.all());
        assert!(r.stderr.contains(says) && r.stderr.contains("hint:"), "{store}: {}", r.stderr);
        assert_eq!(r.stderr.matches("error:").count(), 1, "one message, not a raw OS error twice: {}", r.stderr);
    }
    let deep = format!("name: t\nstore: t.db\nx: {}{}\n{stages}", "[".repeat(100_000), "]".repeat(100_000));
    sb.write("wf.yaml", deep);
    let r = sb.flow(&["validate", "wf.yaml"]);
    assert_eq!(r.code, 2, "{}", &r.all()[..r.all().len().min(500)]);
    assert!(r.stderr.contains("wf.yaml:3"), "{}", &r.stderr[..r.stderr.len().min(500)]);
    assert!(r.stderr.len() < 2_000, "the 200 KB line is cut in the message ({} bytes)", r.stderr.len());
}

#[test]
fn credentials_in_a_base_url_are_refused_by_validate_without_showing_them() {
    let sb = Sandbox::new();
    sb.write("docs/a.txt", "Some text about revenue.");
    sb.write(
        "wf.yaml",
        "name: t\nstore: t.db\nmodels:\n  llm: { provider: openai, model: m, base_url: \"http://user:${SECRET_FOR_TEST}@127.0.0.1:9/v1\" }\n\
         stages:\n  chunk: { kind: chunk, corpus: docs }\n  generate: { kind: generate, needs: [chunk] }\n",
    );
    let r: Ran = sb.cmd(&["validate", "wf.yaml"]).env("SECRET_FOR_TEST", "hunter2-secret").output().unwrap().into();
    assert_eq!(r.code, 2, "{}", r.all());
    assert!(r.stderr.contains("credentials"), "{}", r.stderr);
    assert!(!r.all().contains("hunter2-secret"), "the secret is never printed: {}", r.all());
}
