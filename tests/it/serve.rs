//! `flow serve`, `flow embed` and `flow search` on a trained toy workflow: vectors equal to what the
//! eval stage scored, OpenAI's shapes (and its Python client), hot swap mid-traffic, keys, limits, drain.

use std::io::{BufRead, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::harness::Sandbox;
use crate::train::toy_set;

/// A trained toy workflow: chunks of the toy corpus, a mafin model, and an eval of it on a test split.
fn trained(epochs: usize) -> Sandbox {
    let sb = Sandbox::new();
    toy_set(&sb);
    crate::train::toy_test_split(&sb);
    sb.write("wf.yaml", workflow(epochs));
    let r = sb.flow(&["run", "wf.yaml", "--quiet"]);
    assert_eq!(r.code, 0, "{}", r.all());
    sb
}

fn workflow(epochs: usize) -> String {
    format!(
        "name: t\nstore: t.db\nmodels:\n  black_box: {{ provider: local, model: tiny }}\n  augment: {{ init: tiny }}\nstages:\n  chunk:\n    kind: chunk\n    corpus: [toy/corpus.jsonl]\n    jsonl: {{ id: _id, title: title, text: text }}\n  train:\n    kind: train\n    beir: toy\n    retriever: mafin\n    epochs: {epochs}\n    batch_size: 8\n    lr: 1.0e-3\n    val_fraction: 0.25\n  eval:\n    kind: eval_recall\n    needs: [train]\n    eval_set: {{ beir: toy, split: test }}\n    retrievers: [black_box, mafin]\n"
    )
}

/// A running `flow serve` and what it has logged.
struct Server {
    child: Child,
    addr: String,
    log: Arc<Mutex<String>>,
}

impl Server {
    fn start(sb: &Sandbox, extra: &[&str], env: &[(&str, &str)]) -> Server {
        let mut args = vec!["serve", "-w", "wf.yaml", "--addr", "127.0.0.1:0", "--poll-secs", "0.2"];
        args.extend_from_slice(extra);
        let mut cmd = sb.cmd(&args);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.stderr(Stdio::piped()).stdout(Stdio::null()).spawn().expect("start flow serve");
        let log = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let stderr = child.stderr.take().unwrap();
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(rest) = line.split("listening on http://").nth(1) {
                    let _ = tx.send(rest.split_whitespace().next().unwrap_or_default().to_string());
                }
                sink.lock().unwrap().push_str(&format!("{line}\n"));
            }
        });
        let addr = rx.recv_timeout(Duration::from_secs(120)).unwrap_or_else(|_| {
            let _ = child.kill();
            panic!("flow serve did not start: {}", log.lock().unwrap())
        });
        Server { child, addr, log }
    }

    fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    fn term(&mut self) -> std::process::ExitStatus {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            assert!(Instant::now() < deadline, "flow serve did not stop on SIGTERM: {}", self.log());
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Reply {
    status: u16,
    headers: String,
    body: String,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }

    fn header(&self, name: &str) -> Option<String> {
        self.headers.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case(name).then(|| v.trim().to_string())
        })
    }
}

/// One HTTP/1.1 request on its own connection.
fn http(addr: &str, method: &str, path: &str, body: Option<&Value>, auth: Option<&str>) -> Reply {
    let gone = |status| Reply { status, headers: String::new(), body: String::new() };
    // 0: refused at connect (the listener is closed); 1: the connection broke mid-request.
    let Ok(mut s) = TcpStream::connect(addr) else { return gone(0) };
    let payload = body.map(Value::to_string).unwrap_or_default();
    let auth = auth.map(|k| format!("Authorization: Bearer {k}\r\n")).unwrap_or_default();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: application/json\r\n{auth}Content-Length: {}\r\n\r\n{payload}",
        payload.len()
    )
    .unwrap();
    let mut raw = String::new();
    if s.read_to_string(&mut raw).is_err() || raw.is_empty() {
        return gone(1);
    }
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((&raw, ""));
    let status = head.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    Reply { status, headers: head.to_string(), body: body.to_string() }
}

fn embed(addr: &str, model: &str, input: &[String]) -> (Vec<Vec<f32>>, Reply) {
    let r = http(addr, "POST", "/v1/embeddings", Some(&json!({ "model": model, "input": input })), None);
    assert_eq!(r.status, 200, "{}", r.body);
    let v = r.json();
    let rows = v["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["embedding"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect())
        .collect();
    (rows, r)
}

fn toy_texts(sb: &Sandbox, file: &str) -> Vec<(String, String)> {
    std::fs::read_to_string(sb.path(file))
        .unwrap()
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            (v["_id"].as_str().unwrap().to_string(), v["text"].as_str().unwrap().to_string())
        })
        .collect()
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

#[test]
fn served_vectors_reproduce_the_eval_stages_metrics_and_speak_openais_shapes() {
    let sb = trained(2);
    let mut server = Server::start(&sb, &[], &[]);
    let addr = server.addr.clone();

    let models = http(&addr, "GET", "/v1/models", None, None).json();
    let ids: Vec<&str> = models["data"].as_array().unwrap().iter().map(|m| m["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["black_box", "mafin"], "{models}");

    // Rank the eval set with the server's vectors: the metrics must be the eval stage's own.
    let docs = toy_texts(&sb, "toy/corpus.jsonl");
    let queries: Vec<(String, String)> = toy_texts(&sb, "toy/queries.jsonl")
        .into_iter()
        .filter(|(id, _)| (12..48).any(|i| *id == format!("q{i}")))
        .collect();
    let db = sb.db("t.db");
    for retriever in ["black_box", "mafin"] {
        let (d, _) = embed(&addr, retriever, &docs.iter().map(|x| x.1.clone()).collect::<Vec<_>>());
        let (q, r) = embed(&addr, retriever, &queries.iter().map(|x| x.1.clone()).collect::<Vec<_>>());
        if retriever == "mafin" {
            assert_eq!(r.header("x-flow-model").as_deref(), Some("mafin@1"));
        }
        let (mut ndcg, mut recall) = (0.0, 0.0);
        for (qi, (qid, _)) in queries.iter().enumerate() {
            let mut order: Vec<usize> = (0..docs.len()).collect();
            order.sort_by(|&a, &b| dot(&q[qi], &d[b]).total_cmp(&dot(&q[qi], &d[a])).then(a.cmp(&b)));
            let want = format!("d{}", &qid[1..]);
            if let Some(rank) = order.iter().take(10).position(|&i| docs[i].0 == want) {
                ndcg += 1.0 / (rank as f64 + 2.0).log2();
                recall += 1.0;
            }
        }
        let n = queries.len() as f64;
        let stored: Value = serde_json::from_str(&db.text(&format!(
            "SELECT metrics FROM eval_results WHERE retriever = '{retriever}' ORDER BY id DESC LIMIT 1"
        )))
        .unwrap();
        let (e_ndcg, e_recall) = (stored["ndcg@10"].as_f64().unwrap(), stored["recall@10"].as_f64().unwrap());
        assert!(
            (ndcg / n - e_ndcg).abs() < 1e-6,
            "{retriever}: nDCG@10 {} from served vectors, {e_ndcg} in eval",
            ndcg / n
        );
        assert!((recall / n - e_recall).abs() < 1e-6, "{retriever}: R@10 {} served, {e_recall} in eval", recall / n);
    }

    // OpenAI's shapes: a single string, base64, usage; errors in its error shape.
    let one = http(&addr, "POST", "/v1/embeddings", Some(&json!({"model": "mafin", "input": "w1 w2"})), None).json();
    assert_eq!(one["object"], "list");
    assert_eq!(one["data"][0]["object"], "embedding");
    assert!(one["usage"]["prompt_tokens"].as_u64().unwrap() > 0);
    let b64 = http(
        &addr,
        "POST",
        "/v1/embeddings",
        Some(&json!({"model": "mafin", "input": ["w1 w2"], "encoding_format": "base64"})),
        None,
    )
    .json();
    use base64::Engine;
    let bytes =
        base64::engine::general_purpose::STANDARD.decode(b64["data"][0]["embedding"].as_str().unwrap()).unwrap();
    let floats: Vec<f32> = bytes.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
    let plain: Vec<f32> =
        one["data"][0]["embedding"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect();
    assert_eq!(floats, plain);
    let unknown = http(&addr, "POST", "/v1/embeddings", Some(&json!({"model": "gpt-x", "input": "a"})), None);
    assert_eq!(unknown.status, 404);
    assert_eq!(unknown.json()["error"]["code"], "model_not_found");
    assert!(unknown.json()["error"]["message"].as_str().unwrap().contains("black_box, mafin"));
    let tokens = http(&addr, "POST", "/v1/embeddings", Some(&json!({"model": "mafin", "input": [1, 2]})), None);
    assert_eq!(tokens.status, 400, "{}", tokens.body);

    // Search: the live chunks, with their documents, for every retriever.
    for retriever in ["mafin", "black_box", "bm25", "hybrid"] {
        let s =
            http(&addr, "POST", "/v1/search", Some(&json!({"query": "w15 w5", "k": 3, "retriever": retriever})), None);
        assert_eq!(s.status, 200, "{retriever}: {}", s.body);
        let hits = s.json()["data"].as_array().unwrap().clone();
        assert_eq!(hits.len(), 3, "{retriever}: {}", s.body);
        assert!(hits[0]["document"].as_str().unwrap().contains("corpus.jsonl#d"), "{}", s.body);
        assert!(hits[0]["score"].as_f64().unwrap() >= hits[2]["score"].as_f64().unwrap());
    }
    let h = http(&addr, "GET", "/healthz", None, None);
    assert_eq!(h.status, 200);
    let m = http(&addr, "GET", "/metrics", None, None).body;
    assert!(m.contains("flow_http_requests_total{route=\"embeddings\",status=\"200\"}"), "{m}");
    assert!(m.contains("flow_encoder_batch_texts_count{encoder=\"black_box\"}"), "{m}");
    assert!(m.contains("flow_black_box_texts_total{source=\"cache\"}"), "{m}");
    assert!(server.term().success(), "{}", server.log());

    // flow embed: the same vectors as the server's, into .npy and .jsonl; a rerun is all cache.
    let texts: Vec<String> = docs.iter().take(7).map(|x| x.1.clone()).collect();
    sb.write("in.txt", texts.join("\n") + "\n");
    let r = sb.flow(&["embed", "-w", "wf.yaml", "--input", "in.txt", "--output", "out.jsonl", "--retriever", "mafin"]);
    assert_eq!(r.code, 0, "{}", r.all());
    let r2 = sb.flow(&["embed", "-w", "wf.yaml", "--input", "in.txt", "--output", "out.npy", "--retriever", "mafin"]);
    assert_eq!(r2.code, 0, "{}", r2.all());
    assert!(r2.stderr.contains("7 from the cache, 0 computed"), "{}", r2.stderr);
    let npy = std::fs::read(sb.path("out.npy")).unwrap();
    let hlen = u16::from_le_bytes([npy[8], npy[9]]) as usize;
    let from_npy: Vec<f32> =
        npy[10 + hlen..].chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
    let from_jsonl: Vec<f32> = std::fs::read_to_string(sb.path("out.jsonl"))
        .unwrap()
        .lines()
        .flat_map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            v["embedding"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect::<Vec<_>>()
        })
        .collect();
    assert_eq!(from_npy, from_jsonl);
    let server = Server::start(&sb, &[], &[]);
    let (served, _) = embed(&server.addr, "mafin", &texts);
    assert_eq!(served.concat(), from_npy, "flow embed and flow serve give the same vectors");
    openai_client_agrees(&server.addr, &texts, &from_npy);
    readme_curl_examples_work(&server.addr);

    let s = sb.flow(&["search", "-w", "wf.yaml", "w15 w5", "--json", "-k", "2"]);
    assert_eq!(s.code, 0, "{}", s.all());
    let found: Value = serde_json::from_str(&s.stdout).unwrap();
    assert_eq!(found["hits"].as_array().unwrap().len(), 2);
    let bad = sb.flow(&["embed", "-w", "wf.yaml", "--input", "in.txt", "--output", "out.csv"]);
    assert_eq!(bad.code, 2, "{}", bad.all());
}

/// The official `openai` Python package against the server: the same vectors as `flow embed`.
fn openai_client_agrees(addr: &str, texts: &[String], want: &[f32]) {
    let Some(pythonpath) = openai_package() else { return };
    let script = format!(
        "import json, openai\nc = openai.OpenAI(base_url='http://{addr}/v1', api_key='unused')\nr = c.embeddings.create(model='mafin', input={})\nprint(json.dumps([d.embedding for d in r.data]))\n",
        serde_json::to_string(texts).unwrap()
    );
    let out =
        std::process::Command::new("python3").args(["-c", &script]).env("PYTHONPATH", pythonpath).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let got: Vec<Vec<f32>> = serde_json::from_slice(&out.stdout).unwrap();
    // The client asks for base64 by default and decodes it into floats.
    assert_eq!(got.concat(), want);
}

/// A folder holding the `openai` package (installed there with pip once), or None with a plain
/// message where pip cannot reach PyPI.
fn openai_package() -> Option<std::path::PathBuf> {
    python_package("openai")
}

/// A folder holding the Python package `name` (installed there with pip once), or None with a plain
/// message where pip cannot reach PyPI.
fn python_package(name: &str) -> Option<std::path::PathBuf> {
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("py-{name}"));
    let importable = |d: &std::path::Path| {
        std::process::Command::new("python3")
            .args(["-c", &format!("import {name}")])
            .env("PYTHONPATH", d)
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if !importable(&dir) {
        let _ = std::process::Command::new("python3")
            .args(["-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--target"])
            .arg(&dir)
            .arg(name)
            .output();
    }
    if importable(&dir) {
        return Some(dir);
    }
    eprintln!("skipped: the {name} Python client check (pip could not install `{name}`)");
    None
}

/// The README's curl examples, run as written but for the address.
fn readme_curl_examples_work(addr: &str) {
    let readme = std::fs::read_to_string(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md")).unwrap();
    let section = readme.split("\n### Call it with curl").nth(1).expect("README has a curl section");
    let block = section.split("```").nth(1).expect("a code block");
    let mut commands = Vec::new();
    let mut current = String::new();
    for line in block.lines().skip(1) {
        current.push_str(line.trim_end_matches('\\'));
        if !line.ends_with('\\') {
            if current.trim_start().starts_with("curl") {
                commands.push(current.replace("localhost:8088", addr));
            }
            current.clear();
        }
    }
    assert!(commands.len() >= 3, "{commands:?}");
    for c in commands {
        let out = std::process::Command::new("bash")
            .args(["-c", &format!("{c} --fail --silent --show-error")])
            .output()
            .unwrap();
        assert!(out.status.success(), "{c}: {}", String::from_utf8_lossy(&out.stderr));
        let body = String::from_utf8_lossy(&out.stdout);
        assert!(body.starts_with('{'), "{c}: {body}");
    }
}

/// Each answer's model header and vector.
type Seen = Vec<(String, Vec<f32>)>;

#[test]
fn a_promotion_mid_traffic_swaps_the_model_without_a_failed_request() {
    let sb = trained(1);
    sb.write("wf.yaml", workflow(2));
    let r = sb.flow(&["run", "wf.yaml", "--quiet"]);
    assert_eq!(r.code, 0, "{}", r.all());
    let db = sb.db("t.db");
    assert_eq!(db.scalar("SELECT COUNT(*) FROM models WHERE retriever = 'mafin'"), 2);
    assert_eq!(sb.flow(&["models", "promote", "1", "-w", "wf.yaml"]).code, 0);
    let server = Server::start(&sb, &[], &[]);
    let addr = server.addr.clone();
    let text = vec!["w3 w9 w27".to_string()];
    let (old, r) = embed(&addr, "mafin", &text);
    assert_eq!(r.header("x-flow-model").as_deref(), Some("mafin@1"));

    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let seen: Arc<Mutex<Seen>> = Arc::default();
    let clients: Vec<_> = (0..4)
        .map(|_| {
            let (addr, stop, seen, text) = (addr.clone(), stop.clone(), seen.clone(), text.clone());
            std::thread::spawn(move || {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let r =
                        http(&addr, "POST", "/v1/embeddings", Some(&json!({"model": "mafin", "input": text})), None);
                    assert_eq!(r.status, 200, "a request failed during the swap: {}", r.body);
                    let v: Vec<f32> = r.json()["data"][0]["embedding"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|x| x.as_f64().unwrap() as f32)
                        .collect();
                    seen.lock().unwrap().push((r.header("x-flow-model").unwrap(), v));
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(sb.flow(&["models", "promote", "2", "-w", "wf.yaml"]).code, 0);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !seen.lock().unwrap().iter().any(|(m, _)| m == "mafin@2") {
        assert!(Instant::now() < deadline, "the new model never answered: {}", server.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for c in clients {
        c.join().expect("a client saw a failed request");
    }
    let (new, _) = embed(&addr, "mafin", &text);
    assert_ne!(old, new, "the two models differ");
    let seen = seen.lock().unwrap();
    for (model, v) in seen.iter() {
        match model.as_str() {
            "mafin@1" => assert_eq!(v, &old[0]),
            "mafin@2" => assert_eq!(v, &new[0]),
            m => panic!("answered by {m}"),
        }
    }
    // Once the new model answers, the old one never does again.
    let first_new = seen.iter().position(|(m, _)| m == "mafin@2").unwrap();
    assert!(seen[first_new..].iter().all(|(m, _)| m == "mafin@2"));
    let models = http(&addr, "GET", "/v1/models", None, None).json();
    assert!(models.to_string().contains("mafin@2"), "{models}");
    assert!(server.log().contains("now serving mafin@2"), "{}", server.log());
}

#[test]
fn a_key_limits_and_sigterm_are_kept() {
    let sb = trained(1);
    let missing = sb.flow(&["serve", "-w", "wf.yaml", "--api-key-env", "FLOW_TEST_NO_SUCH_KEY"]);
    assert_eq!(missing.code, 2, "{}", missing.all());
    assert!(missing.stderr.contains("FLOW_TEST_NO_SUCH_KEY"), "{}", missing.stderr);

    let mut server = Server::start(
        &sb,
        &["--api-key-env", "FLOW_TEST_KEY", "--max-inputs", "4", "--max-chars", "50"],
        &[("FLOW_TEST_KEY", "s3cret-key")],
    );
    let addr = server.addr.clone();
    let body = json!({"model": "mafin", "input": ["w1"]});
    assert_eq!(http(&addr, "POST", "/v1/embeddings", Some(&body), None).status, 401);
    let wrong = http(&addr, "POST", "/v1/embeddings", Some(&body), Some("s3cret-kez"));
    assert_eq!(wrong.status, 401);
    assert_eq!(wrong.json()["error"]["code"], "invalid_api_key");
    assert_eq!(http(&addr, "GET", "/healthz", None, None).status, 200, "health checks need no key");
    let key = Some("s3cret-key");
    assert_eq!(http(&addr, "POST", "/v1/embeddings", Some(&body), key).status, 200);
    let many = http(
        &addr,
        "POST",
        "/v1/embeddings",
        Some(&json!({"model": "mafin", "input": ["a", "b", "c", "d", "e"]})),
        key,
    );
    assert_eq!(many.status, 400);
    assert!(many.json()["error"]["message"].as_str().unwrap().contains("at most 4"), "{}", many.body);
    let long = http(&addr, "POST", "/v1/embeddings", Some(&json!({"model": "mafin", "input": ["x".repeat(51)]})), key);
    assert_eq!(long.status, 400);
    assert!(long.body.contains("51 characters"), "{}", long.body);
    let m = http(&addr, "GET", "/metrics", None, key).body;
    // Refused requests never reached the encoder: one text embedded, one batch.
    assert!(m.contains("flow_encoder_batch_texts_count{encoder=\"black_box\"} 1"), "{m}");
    assert!(m.contains("flow_http_requests_total{route=\"embeddings\",status=\"401\"} 2"), "{m}");

    // SIGTERM while requests are in flight: each is answered, then the server exits 0.
    let inflight: Vec<_> = (0..4)
        .map(|i| {
            let addr = addr.clone();
            std::thread::spawn(move || {
                let input: Vec<String> = (0..4).map(|j| format!("w{} w{}", i * 4 + j, j + 7)).collect();
                http(
                    &addr,
                    "POST",
                    "/v1/embeddings",
                    Some(&json!({"model": "mafin", "input": input})),
                    Some("s3cret-key"),
                )
                .status
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(20));
    let status = server.term();
    for t in inflight {
        let code = t.join().unwrap();
        // A request sent after the listener closed is refused at connect (status 0), never cut off.
        assert!(code == 200 || code == 0, "an in-flight request got {code}");
    }
    assert!(status.success(), "exit {status:?}: {}", server.log());
    assert!(server.log().contains("stopped"), "{}", server.log());
}

#[test]
fn wrong_types_are_400s_and_an_oversized_body_is_a_413_in_openais_shape() {
    let sb = trained(1);
    let server = Server::start(&sb, &[], &[]);
    let addr = server.addr.clone();
    let cases = [
        (json!({"model": 7, "input": "w1"}), "invalid_model"),
        (json!({"model": "mafin", "input": "w1", "encoding_format": 3}), "invalid_encoding_format"),
        (json!({"model": "mafin", "input": "w1", "dimensions": -1}), "invalid_dimensions"),
        (json!({"model": "mafin", "input": "w1", "dimensions": "10"}), "invalid_dimensions"),
        (json!({"model": "mafin", "input": "w1", "dimensions": 0}), "invalid_dimensions"),
    ];
    for (body, code) in cases {
        let r = http(&addr, "POST", "/v1/embeddings", Some(&body), None);
        assert_eq!(r.status, 400, "{body}: {}", r.body);
        assert_eq!(r.json()["error"]["code"], code, "{body}: {}", r.body);
        assert_eq!(r.json()["error"]["type"], "invalid_request_error");
    }
    let r = http(&addr, "POST", "/v1/search", Some(&json!({"query": "w1", "retriever": 3})), None);
    assert_eq!((r.status, r.json()["error"]["code"].clone()), (400, json!("invalid_retriever")), "{}", r.body);
    // A 65 MiB body: the server refuses it once it passes 64 MiB (the writer may see the connection
    // close before it is done, which is fine).
    let mut s = TcpStream::connect(&addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let mut writer = s.try_clone().unwrap();
    let len = 65usize << 20;
    let head = format!(
        "POST /v1/embeddings HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {len}\r\n\r\n"
    );
    let sending = std::thread::spawn(move || {
        let _ = writer.write_all(head.as_bytes());
        let chunk = vec![b'x'; 1 << 20];
        for _ in 0..65 {
            if writer.write_all(&chunk).is_err() {
                break;
            }
        }
    });
    let mut raw = String::new();
    let _ = s.read_to_string(&mut raw);
    let _ = sending.join();
    assert!(raw.starts_with("HTTP/1.1 413"), "{raw}");
    let body: Value = serde_json::from_str(raw.split_once("\r\n\r\n").map_or("", |x| x.1)).unwrap();
    assert_eq!(body["error"]["code"], "request_too_large", "{raw}");
    // The ordinary request still works.
    let ok =
        http(&addr, "POST", "/v1/embeddings", Some(&json!({"model": "mafin", "input": "w1", "dimensions": 32})), None);
    assert!(ok.status == 200 || ok.status == 400, "{}", ok.body);
}

#[test]
fn an_api_black_box_is_asked_once_per_text_and_concurrent_requests_share_batches() {
    let upstream = crate::openai_server::start(crate::openai_server::Config {
        latency: Duration::from_millis(40),
        ..Default::default()
    });
    let sb = Sandbox::new();
    toy_set(&sb);
    sb.write(
        "wf.yaml",
        format!(
            "name: t\nstore: t.db\nmodels:\n  black_box: {{ provider: openai, model: test-embed, base_url: \"{}\" }}\nstages:\n  chunk:\n    kind: chunk\n    corpus: [toy/corpus.jsonl]\n    jsonl: {{ id: _id, text: text }}\n",
            upstream.base_url()
        ),
    );
    let r = sb.flow(&["run", "wf.yaml", "--quiet"]);
    assert_eq!(r.code, 0, "{}", r.all());
    let server = Server::start(&sb, &["--batch-wait-ms", "20"], &[]);
    let texts: Vec<String> = (0..8).map(|i| format!("w{i} w{}", i + 20)).collect();
    let run_clients = |n: usize| {
        let handles: Vec<_> = (0..n)
            .map(|c| {
                let (addr, texts) = (server.addr.clone(), texts.clone());
                std::thread::spawn(move || {
                    // Each client sends an overlapping half of the same eight texts.
                    let mine: Vec<String> = texts.iter().cycle().skip(c % 8).take(4).cloned().collect();
                    embed(&addr, "black_box", &mine).0
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect::<Vec<_>>()
    };
    let first = run_clients(16);
    let paid = upstream.log.entries().len();
    assert!((1..16).contains(&paid), "16 clients made {paid} upstream requests: they were not batched");
    let metrics = http(&server.addr, "GET", "/metrics", None, None).body;
    assert!(metrics.contains("flow_black_box_texts_total{source=\"computed\"} 8"), "each text once: {metrics}");
    // Again: every vector from the cache, nothing paid, the same vectors.
    let again = run_clients(16);
    assert_eq!(upstream.log.entries().len(), paid, "a text already seen was paid for again");
    assert_eq!(first, again);
    assert_eq!(sb.db("t.db").scalar("SELECT COUNT(*) FROM embeddings"), 8);
}

#[test]
fn search_follows_the_chunks_a_later_run_changes() {
    let sb = Sandbox::new();
    toy_set(&sb);
    sb.write(
        "wf.yaml",
        "name: t\nstore: t.db\nmodels:\n  black_box: { provider: local, model: tiny }\nstages:\n  chunk:\n    kind: chunk\n    corpus: [toy/corpus.jsonl]\n    jsonl: { id: _id, text: text }\n",
    );
    assert_eq!(sb.flow(&["run", "wf.yaml", "--quiet"]).code, 0);
    let server = Server::start(&sb, &[], &[]);
    let search = |retriever: &str| {
        let r = http(
            &server.addr,
            "POST",
            "/v1/search",
            Some(&json!({"query": "w5 w6 w7", "k": 1, "retriever": retriever})),
            None,
        );
        assert_eq!(r.status, 200, "{}", r.body);
        r.json()["data"][0]["document"].as_str().unwrap().to_string()
    };
    for r in ["bm25", "black_box"] {
        assert_ne!(search(r), "toy/corpus.jsonl#new", "{r}");
    }
    let mut corpus = std::fs::read_to_string(sb.path("toy/corpus.jsonl")).unwrap();
    corpus.push_str("{\"_id\": \"new\", \"text\": \"w5 w6 w7\"}\n");
    sb.write("toy/corpus.jsonl", corpus);
    assert_eq!(sb.flow(&["run", "wf.yaml", "--quiet"]).code, 0);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !server.log().contains("the chunks changed") {
        assert!(Instant::now() < deadline, "the server never saw the new chunks: {}", server.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    // The new chunk is the query itself: first for both the lexical and the dense retriever.
    for r in ["bm25", "black_box"] {
        assert_eq!(search(r), "toy/corpus.jsonl#new", "{r}");
    }
}

/// A reranker trained from the toy set's labels: the eval stage scores `rerank` over the hybrid, and
/// `flow serve` reranks in Cohere's shape (checked with the `cohere` Python client where pip can
/// install it) with the scores the model folder gives, and serves `rerank` in search.
#[test]
fn a_reranker_trains_is_evaluated_and_answers_coheres_rerank() {
    let sb = Sandbox::new();
    toy_set(&sb);
    crate::train::toy_test_split(&sb);
    let wf = workflow(4)
        .replace("retriever: mafin", "retriever: reranker\n    negatives: 3\n    rerank_k: 10")
        .replace("retrievers: [black_box, mafin]", "retrievers: [bm25, black_box, hybrid, rerank]");
    sb.write("wf.yaml", &wf);
    let r = sb.flow(&["run", "wf.yaml"]);
    assert_eq!(r.code, 0, "{}", r.all());
    let out = r.all();
    assert!(out.contains("negatives mined for"), "{out}");
    assert!(out.contains("rerank over hybrid (black_box, convex alpha"), "{out}");
    let db = sb.db("t.db");
    assert_eq!(db.text("SELECT retriever FROM models"), "reranker");
    let m: Value = serde_json::from_str(&db.text("SELECT metrics FROM models")).unwrap();
    assert_eq!(m["rerank_k"], 10, "{m}");
    assert!(m["alpha"].as_f64().is_some() && m["black_box_alpha"].as_f64().is_some(), "{m}");
    let first: f64 = db.real("SELECT value FROM train_curves WHERE kind = 'loss' ORDER BY step LIMIT 1");
    let last: f64 = db.real("SELECT value FROM train_curves WHERE kind = 'loss' ORDER BY step DESC LIMIT 1");
    assert!(last < first, "listwise loss did not fall: {first} -> {last}");
    let path: String = db.text("SELECT path FROM models");
    assert!(flow::bert::cross::is_cross_encoder(std::path::Path::new(&path)));
    let rerank: Value =
        serde_json::from_str(&db.text("SELECT metrics FROM eval_results WHERE retriever = 'rerank'")).unwrap();
    assert!(rerank["ndcg@10"].as_f64().is_some(), "{rerank}");
    let listed = sb.flow(&["models", "list", "-w", "wf.yaml"]);
    assert!(listed.all().contains("reranker") && listed.all().contains("top 10, blend"), "{}", listed.all());

    let server = Server::start(&sb, &[], &[]);
    let addr = server.addr.clone();
    let docs = toy_texts(&sb, "toy/corpus.jsonl");
    let queries = toy_texts(&sb, "toy/queries.jsonl");
    let documents: Vec<String> = docs.iter().take(6).map(|d| d.1.clone()).collect();
    let query = &queries[2].1;
    let body =
        json!({ "model": "rerank", "query": query, "documents": documents, "top_n": 3, "return_documents": true });
    let reply = http(&addr, "POST", "/v1/rerank", Some(&body), None);
    assert_eq!(reply.status, 200, "{}", reply.body);
    let v = reply.json();
    let results = v["results"].as_array().unwrap();
    assert_eq!(results.len(), 3, "{v}");
    // The scores are the model folder's, as sigmoid(logit), best first.
    let enc =
        flow::bert::cross::CrossEncoder::load(std::path::Path::new(&path), None, flow::bert::Products::auto()).unwrap();
    let pairs: Vec<(&str, &str)> = documents.iter().map(|d| (query.as_str(), d.as_str())).collect();
    let want: Vec<f32> = enc.score(&pairs).unwrap().into_iter().map(flow::bert::cross::relevance).collect();
    let mut prev = f64::MAX;
    for hit in results {
        let (i, s) = (hit["index"].as_u64().unwrap() as usize, hit["relevance_score"].as_f64().unwrap());
        assert!((s - want[i] as f64).abs() < 1e-5, "document {i}: {s} vs {}", want[i]);
        assert!(s <= prev, "{v}");
        prev = s;
        assert_eq!(hit["document"]["text"], documents[i]);
    }
    assert!(want.iter().filter(|w| (**w as f64) > prev).count() <= 2, "top_n kept the best: {v}");
    // Bad requests are 400s in the same error shape.
    for bad in
        [json!({ "query": query }), json!({ "query": query, "documents": [1, 2] }), json!({ "documents": ["a"] })]
    {
        let r = http(&addr, "POST", "/v1/rerank", Some(&bad), None);
        assert_eq!(r.status, 400, "{bad}: {}", r.body);
        assert!(r.json()["error"]["message"].is_string());
    }
    // Search with the reranker over the hybrid.
    let s = http(&addr, "POST", "/v1/search", Some(&json!({ "query": query, "retriever": "rerank", "k": 5 })), None);
    assert_eq!(s.status, 200, "{}", s.body);
    let found = s.json();
    assert!(found["model"].as_str().unwrap().starts_with("rerank@"), "{found}");
    assert_eq!(found["data"].as_array().unwrap().len(), 5);
    cohere_client_agrees(&addr, query, &documents, &want);
}

/// The `cohere` Python client's rerank call against the server (skipped where pip cannot install it).
fn cohere_client_agrees(addr: &str, query: &str, documents: &[String], want: &[f32]) {
    let Some(dir) = python_package("cohere") else { return };
    let script = format!(
        "import json, cohere\nc = cohere.Client(api_key='unused', base_url='http://{addr}')\nr = c.rerank(model='rerank', query={}, documents={}, top_n=2)\nprint(json.dumps([[x.index, x.relevance_score] for x in r.results]))\n",
        serde_json::to_string(query).unwrap(),
        serde_json::to_string(documents).unwrap()
    );
    let out = std::process::Command::new("python3").args(["-c", &script]).env("PYTHONPATH", &dir).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let got: Vec<(usize, f64)> = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(got.len(), 2);
    for (i, s) in got {
        assert!((s - want[i] as f64).abs() < 1e-5, "cohere client: document {i} {s} vs {}", want[i]);
    }
}
