//! The embedded default models with their real weights: the GGUF tokenizer and chat template,
//! seeded generation, the BERT embedder against the published reference vector, bad model files.

use std::path::PathBuf;

use flow::bert::SentenceEncoder;
use flow::llm::Message;
use flow::llm::local::Engine;

fn gguf() -> PathBuf {
    crate::harness::models_dir().join("smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf")
}

fn minilm() -> PathBuf {
    crate::harness::models_dir().join("all-MiniLM-L6-v2")
}

#[test]
fn gguf_tokenizer_round_trips_and_maps_special_tokens() {
    let (content, _) = flow::llm::gguf::read(&gguf()).unwrap();
    let tok = flow::llm::gguf::tokenizer(&content, &gguf()).unwrap();
    let samples = [
        "Net revenue rose 12.5% to $2,486.4 million in fiscal 2025.",
        "  leading spaces, trailing tabs\t\t\nand newlines\n\n",
        "Ünïcödé: naïve café, 東京, Ελληνικά, emoji 🚢⚓ and math ∑x² ≤ 10³",
        "fn main() { println!(\"{}\", 40 + 2); } // code",
        "ALL CAPS and MiXeD cAsE, hyphen-ated words; semi:colons — dashes",
    ];
    for s in samples {
        let enc = tok.encode(s, false).unwrap();
        assert!(!enc.get_ids().is_empty());
        assert_eq!(tok.decode(enc.get_ids(), false).unwrap(), s, "round trip");
    }
    // Digits are split one by one, as in SmolLM's own tokenizer.
    let enc = tok.encode("2025", false).unwrap();
    assert_eq!(enc.get_ids().len(), 4);
    // Special tokens are single ids, equal to their index in the GGUF vocabulary and the metadata ids.
    let tokens = content.metadata["tokenizer.ggml.tokens"].to_vec().unwrap();
    for name in ["<|im_start|>", "<|im_end|>", "<|endoftext|>"] {
        let id = tok.token_to_id(name).unwrap();
        assert_eq!(tokens[id as usize].to_string().unwrap(), name);
        assert_eq!(tok.encode(format!("a{name}b"), false).unwrap().get_ids().len(), 3, "{name} is one token");
    }
    assert_eq!(flow::llm::gguf::token_id(&content, "tokenizer.ggml.bos_token_id"), Some(1));
    assert_eq!(flow::llm::gguf::token_id(&content, "tokenizer.ggml.eos_token_id"), Some(2));
    assert_eq!(tok.token_to_id("<|im_start|>"), Some(1));
    assert_eq!(tok.token_to_id("<|im_end|>"), Some(2));
}

#[test]
fn chat_template_renders_a_known_conversation_exactly() {
    let (content, _) = flow::llm::gguf::read(&gguf()).unwrap();
    let tok = flow::llm::gguf::tokenizer(&content, &gguf()).unwrap();
    let t = flow::llm::gguf::ChatTemplate::from_gguf(&content, &gguf(), &tok).unwrap();
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
fn seeded_generation_is_reproducible_and_stops_at_end_of_turn() {
    let mut e = Engine::load(&gguf(), &candle_core::Device::Cpu).unwrap();
    let prompt = "<|im_start|>user\nWrite one question that is answered by this text.\n\nNorthwind Harbor's Cold Chain Logistics segment had revenue of $742.8 million in fiscal 2025.<|im_end|>\n<|im_start|>assistant\n";
    let greedy1 = e.generate(prompt, 40, None, None, 0, None, None).unwrap();
    let greedy2 = e.generate(prompt, 40, Some(0.0), None, 7, None, None).unwrap();
    assert_eq!(greedy1.0, greedy2.0, "greedy ignores the seed");
    assert!(!greedy1.0.is_empty());
    let s1 = e.generate(prompt, 30, Some(0.9), Some(0.95), 42, None, None).unwrap();
    let s2 = e.generate(prompt, 30, Some(0.9), Some(0.95), 42, None, None).unwrap();
    assert_eq!(s1, s2, "same seed, same text");
    let short = e.generate(prompt, 3, None, None, 0, None, None).unwrap();
    assert_eq!((short.2, short.3), (3, "length"));
    let stopped = e
        .generate("<|im_start|>user\nSay OK.<|im_end|>\n<|im_start|>assistant\n", 60, None, None, 0, None, None)
        .unwrap();
    assert_eq!(stopped.3, "stop", "{stopped:?}");
}

#[test]
fn minilm_matches_the_published_reference_vector() {
    let enc = SentenceEncoder::load(&minilm(), None, &candle_core::Device::Cpu).unwrap();
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

#[test]
fn bad_model_files_name_the_file_and_what_was_expected() {
    let sb = crate::harness::Sandbox::new();
    // A truncated GGUF.
    let bytes = std::fs::read(gguf()).unwrap();
    sb.write("bad/model.gguf", &bytes[..4096]);
    let err = Engine::load(&sb.path("bad/model.gguf"), &candle_core::Device::Cpu).err().unwrap().to_string();
    assert!(err.contains("bad/model.gguf") && err.contains("GGUF"), "{err}");
    // Not a GGUF at all.
    sb.write("bad/text.gguf", "hello");
    let err = Engine::load(&sb.path("bad/text.gguf"), &candle_core::Device::Cpu).err().unwrap().to_string();
    assert!(err.contains("text.gguf") && err.contains("not a readable GGUF"), "{err}");
    // A BERT folder without weights, and one whose weights do not match its config.
    for f in ["config.json", "tokenizer.json", "modules.json", "1_Pooling/config.json"] {
        std::fs::create_dir_all(sb.path("bert/1_Pooling")).unwrap();
        std::fs::copy(minilm().join(f), sb.path(&format!("bert/{f}"))).unwrap();
    }
    let err = SentenceEncoder::load(&sb.path("bert"), None, &candle_core::Device::Cpu).err().unwrap().to_string();
    assert!(err.contains("model.safetensors"), "{err}");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(minilm().join("config.json")).unwrap()).unwrap();
    cfg["hidden_size"] = 512.into();
    sb.write("bert/config.json", cfg.to_string());
    std::fs::copy(minilm().join("model.safetensors"), sb.path("bert/model.safetensors")).unwrap();
    let err = SentenceEncoder::load(&sb.path("bert"), None, &candle_core::Device::Cpu).err().unwrap().to_string();
    assert!(err.contains("not a BERT checkpoint matching config.json"), "{err}");
}
