//! Faults from outside the binary: closed and full output streams, templates and URLs that only a
//! run would have found, odd corpus and workflow files, and a damaged store.

use std::io::Read;
use std::process::Stdio;

use crate::harness::{Sandbox, prose};

const HEAD: &str =
    "name: t\nstore: t.db\nmodels:\n  black_box: { provider: local, model: all-MiniLM-L6-v2 }\nstages:\n";

fn chunk_only(sb: &Sandbox) {
    for i in 0..3 {
        sb.write(&format!("docs/d{i}.txt"), prose(i, 6));
    }
    sb.write("wf.yaml", format!("{HEAD}  chunk: {{ kind: chunk, corpus: docs, max_tokens: 64, overlap: 8 }}\n"));
}

#[test]
fn a_closed_stderr_does_not_stop_a_run_and_a_closed_stdout_is_no_panic() {
    let sb = Sandbox::new();
    chunk_only(&sb);
    // stderr into a pipe whose reader is gone at once, as `flow run ... 2>&1 | head -1` leaves it.
    let mut child = sb.cmd(&["run", "wf.yaml"]).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    drop(child.stderr.take());
    drop(child.stdout.take());
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(0), "the run finished despite its closed output");
    assert!(sb.db("t.db").scalar("SELECT COUNT(*) FROM chunks") > 3);

    // `flow runs --json | true`: the result cannot be written; exit 1, no panic (101).
    let mut child =
        sb.cmd(&["runs", "--json", "-w", "wf.yaml"]).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    drop(child.stdout.take());
    let mut err = String::new();
    child.stderr.take().unwrap().read_to_string(&mut err).unwrap();
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(!err.contains("panicked"), "{err}");

    // `flow status > /dev/full`: exit 1 with the reason on stderr.
    let full = std::fs::OpenOptions::new().write(true).open("/dev/full").unwrap();
    let out = sb.cmd(&["status", "-w", "wf.yaml"]).stdout(full).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("cannot write the output") && !err.contains("panicked"), "{err}");
}

#[test]
fn validate_renders_templates_and_parses_urls_before_anything_is_spent() {
    let sb = Sandbox::new();
    chunk_only(&sb);
    sb.write("bad_syntax.j2", "Questions about {{ chunk }}\n{% for x in %}{% endfor %}\n");
    sb.write("bad_var.j2", "Questions about {{ chunk }}\n\nfrom {{ titel }}\n");
    let wf = |prompt: &str, url: &str| {
        format!(
            "{HEAD}  chunk: {{ kind: chunk, corpus: docs }}\n  generate: {{ kind: generate, needs: [chunk], prompt: {prompt} }}\n"
        )
        .replace(
            "models:\n",
            &format!("models:\n  llm: {{ provider: openai, model: m, base_url: \"{url}\" }}\n"),
        )
    };
    for (prompt, place) in [("bad_syntax.j2", "bad_syntax.j2:2"), ("bad_var.j2", "bad_var.j2:3")] {
        sb.write("wf.yaml", wf(prompt, "http://127.0.0.1:9/v1"));
        let r = sb.flow(&["validate", "wf.yaml"]);
        assert_eq!(r.code, 2, "{}", r.all());
        assert!(r.all().contains(place), "{place}: {}", r.all());
        // A run stops at the same check, before the chunk stage starts.
        let r = sb.flow(&["run", "wf.yaml"]);
        assert_eq!(r.code, 2, "{}", r.all());
        assert!(!sb.path("t.db").exists() || sb.db("t.db").scalar("SELECT COUNT(*) FROM stage_runs") == 0);
    }
    sb.write("ok.j2", "Questions about {{ chunk }} {{ title }} {{ n }}");
    for url in ["htp://localhost:8000/v1", "localhost:8000/v1", "http//localhost"] {
        sb.write("wf.yaml", wf("ok.j2", url));
        let r = sb.flow(&["validate", "wf.yaml"]);
        assert_eq!(r.code, 2, "{url}: {}", r.all());
        assert!(r.all().contains("base_url") && r.all().contains("wf.yaml:4"), "{url}: {}", r.all());
    }
}

#[test]
fn odd_workflow_files_byte_order_mark_second_document_alias_bomb() {
    let sb = Sandbox::new();
    chunk_only(&sb);
    let body = std::fs::read_to_string(sb.path("wf.yaml")).unwrap();
    sb.write("wf.yaml", format!("\u{feff}{body}"));
    let r = sb.flow(&["validate", "wf.yaml"]);
    assert_eq!(r.code, 0, "a BOM is accepted: {}", r.all());
    sb.write("wf.yaml", format!("{body}---\nname: other\n"));
    let r = sb.flow(&["validate", "wf.yaml"]);
    assert_eq!(r.code, 2, "{}", r.all());
    assert!(r.all().contains("second YAML document"), "{}", r.all());
    let mut bomb = format!("{body}x0: &x0 [a, a, a, a, a, a, a, a, a, a]\n");
    for i in 1..9 {
        let p = i - 1;
        bomb.push_str(&format!("x{i}: &x{i} [*x{p}, *x{p}, *x{p}, *x{p}, *x{p}, *x{p}, *x{p}, *x{p}, *x{p}, *x{p}]\n"));
    }
    sb.write("wf.yaml", bomb);
    let r = sb.flow(&["validate", "wf.yaml"]);
    assert_eq!(r.code, 2, "{}", r.all());
    assert!(r.all().contains("alias bomb"), "{}", r.all());
}

#[test]
fn odd_corpus_entries_are_skipped_with_their_reason() {
    let sb = Sandbox::new();
    chunk_only(&sb);
    sb.write(
        "docs/dup.jsonl",
        "{\"id\": \"a\", \"text\": \"one\"}\n{\"id\": \"b\", \"text\": \"two\"}\n{\"id\": \"a\", \"text\": \"three\"}\n",
    );
    sb.write("docs/typed.jsonl", "{\"id\": \"n\", \"text\": 12}\n{\"id\": \"m\", \"text\": \"fine text here\"}\n");
    std::os::unix::fs::symlink(sb.path("docs/loop_b"), sb.path("docs/loop_a")).unwrap();
    std::os::unix::fs::symlink(sb.path("docs/loop_a"), sb.path("docs/loop_b")).unwrap();
    let r = sb.flow(&["run", "wf.yaml"]);
    assert_eq!(r.code, 0, "{}", r.all());
    let s: serde_json::Value = serde_json::from_str(&sb.flow(&["status", "--json", "-w", "wf.yaml"]).stdout).unwrap();
    let skipped = s["stages"][0]["summary"]["skipped"].to_string();
    assert!(skipped.contains("dup.jsonl") && skipped.contains("line 1 and line 3"), "{skipped}");
    assert!(skipped.contains("typed.jsonl#n") && skipped.contains("line 1"), "{skipped}");
    assert!(skipped.contains("loop_a") && skipped.contains("cannot be followed"), "{skipped}");
    assert_eq!(sb.db("t.db").scalar("SELECT COUNT(*) FROM documents WHERE path = 'typed.jsonl#m'"), 1);
}

#[test]
fn a_damaged_store_is_named_and_left_as_it_is() {
    let sb = Sandbox::new();
    chunk_only(&sb);
    assert_eq!(sb.flow(&["run", "wf.yaml"]).code, 0);
    // Garbage over the whole file.
    let garbage = vec![0x5au8; 64 * 1024];
    std::fs::write(sb.path("t.db"), &garbage).unwrap();
    let _ = std::fs::remove_file(sb.path("t.db-wal"));
    for args in [&["status", "-w", "wf.yaml"][..], &["run", "wf.yaml"][..]] {
        let r = sb.flow(args);
        assert_eq!(r.code, 2, "{args:?}: {}", r.all());
        assert!(r.stderr.contains("not an SQLite database") && r.stderr.contains(".recover"), "{}", r.stderr);
        assert_eq!(r.stderr.matches("error:").count(), 1, "one message: {}", r.stderr);
    }
    assert_eq!(std::fs::read(sb.path("t.db")).unwrap(), garbage, "never re-created or overwritten");

    // A sound header with damaged pages deeper in the file.
    let sb = Sandbox::new();
    chunk_only(&sb);
    for i in 3..40 {
        sb.write(&format!("docs/more{i}.txt"), prose(i, 30));
    }
    assert_eq!(sb.flow(&["run", "wf.yaml"]).code, 0);
    // Fold the WAL into the main file, then overwrite some pages in its middle.
    sb.db("t.db").execute("PRAGMA wal_checkpoint(TRUNCATE);");
    let mut bytes = std::fs::read(sb.path("t.db")).unwrap();
    assert!(bytes.len() > 64 * 4096, "{}", bytes.len());
    let mid = bytes.len() / 2 / 4096 * 4096;
    bytes[mid..mid + 3 * 4096].iter_mut().enumerate().for_each(|(i, b)| *b = (i * 7 % 251) as u8);
    std::fs::write(sb.path("t.db"), &bytes).unwrap();
    let r = sb.flow(&["status", "-w", "wf.yaml"]);
    assert_eq!(r.code, 2, "{}", r.all());
    assert!(r.stderr.contains("t.db") && r.stderr.contains(".recover"), "{}", r.stderr);
    assert_eq!(std::fs::read(sb.path("t.db")).unwrap(), bytes);
}

/// Unmounts on drop, so a failing assertion leaves no mount behind.
struct Mount(std::path::PathBuf);

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
    }
}

#[test]
fn a_store_on_a_read_only_mount_still_serves_status_runs_and_pairs() {
    let sb = Sandbox::new();
    chunk_only(&sb);
    assert_eq!(sb.flow(&["run", "wf.yaml"]).code, 0);
    // A read-only bind mount of the sandbox (root ignores file modes, so chmod would prove nothing).
    let ro = tempfile::tempdir().unwrap();
    let bind =
        |args: &[&str]| std::process::Command::new("mount").args(args).output().is_ok_and(|o| o.status.success());
    let src = sb.dir.path().to_string_lossy().to_string();
    let dst = ro.path().to_string_lossy().to_string();
    if !bind(&["--bind", &src, &dst]) {
        eprintln!("skipped: this machine does not allow a bind mount (needs root and mount(8))");
        return;
    }
    let _guard = Mount(ro.path().to_path_buf());
    if !bind(&["-o", "remount,bind,ro", &dst]) || std::fs::write(ro.path().join("probe"), b"x").is_ok() {
        eprintln!("skipped: the bind mount could not be made read-only");
        return;
    }
    let wf = ro.path().join("wf.yaml").to_string_lossy().to_string();
    for args in [vec!["status", "-w", &wf], vec!["runs", "-w", &wf], vec!["pairs", "-w", &wf]] {
        let r = sb.flow(&args);
        assert_eq!(r.code, 0, "{args:?}: {}", r.all());
    }
    let r = sb.flow(&["status", "-w", &wf]);
    assert!(r.stdout.contains("succeeded"), "{}", r.stdout);
}
