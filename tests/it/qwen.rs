//! The qwen2 local LLM with its real weights (Qwen2.5-Coder-0.5B-Instruct, pulled by the harness):
//! its GGUF tokenizer against a reference tokenization, a real generation, and JSON answers.

use std::path::PathBuf;

use flow::llm::Message;
use flow::llm::local::{Engine, conforms};

/// The 0.5B GGUF, or None (with a plain message) when its weights are absent.
fn qwen() -> Option<PathBuf> {
    let p = crate::harness::models_dir().join("qwen2.5-coder-0.5b-instruct/Qwen2.5-Coder-0.5B-Instruct.gguf");
    if !p.exists() {
        eprintln!("SKIPPED: {} is absent (run `flow models pull qwen2.5-coder-0.5b-instruct`)", p.display());
        return None;
    }
    Some(p)
}

#[test]
fn qwen2_tokenizer_matches_the_reference_token_by_token() {
    let Some(path) = qwen() else { return };
    let (content, _) = flow::llm::gguf::read(&path).unwrap();
    let tok = flow::llm::gguf::tokenizer(&content, &path).unwrap();
    let fixture: Vec<serde_json::Value> =
        serde_json::from_str(include_str!("../fixtures/qwen2_tokens.json")).expect("fixture parses");
    assert_eq!(fixture.len(), 20);
    for case in &fixture {
        let text = case["text"].as_str().unwrap();
        let want: Vec<u32> = case["ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
        let got = tok.encode(text, false).unwrap().get_ids().to_vec();
        let first_diff = got.iter().zip(&want).position(|(a, b)| a != b).unwrap_or(got.len().min(want.len()));
        assert_eq!(got, want, "{text:?}: first difference at token {first_diff}");
        if !text.contains("<|im_") {
            assert_eq!(tok.decode(&got, false).unwrap(), text, "round trip");
        }
    }
    assert_eq!(tok.token_to_id("<|im_end|>"), Some(151645));
    assert_eq!(flow::llm::gguf::token_id(&content, "tokenizer.ggml.eos_token_id"), Some(151645));
}

#[test]
fn qwen2_generates_stops_at_end_of_turn_and_writes_the_json_asked_for() {
    let Some(path) = qwen() else { return };
    let (content, _) = flow::llm::gguf::read(&path).unwrap();
    let tok = flow::llm::gguf::tokenizer(&content, &path).unwrap();
    let template = flow::llm::gguf::ChatTemplate::from_gguf(&content, &path, &tok).unwrap();
    let prompt =
        template.render(&[Message::user("Complete the sentence in one word: The capital of France is")]).unwrap();
    assert!(prompt.starts_with("<|im_start|>system\n") && prompt.ends_with("<|im_start|>assistant\n"), "{prompt}");
    let mut e = Engine::load(&path, &candle_core::Device::Cpu).unwrap();
    let (text, _, n, finish) = e.generate(&prompt, 20, None, None, 0, None, None).unwrap();
    assert!(text.contains("Paris"), "{text:?}");
    assert_eq!(finish, "stop", "ends its turn within 20 tokens: {text:?} ({n} tokens)");

    let schema: serde_json::Value = serde_json::from_str(
        r#"{"type":"object","properties":{"queries":{"type":"array","items":{"type":"string"}}},"required":["queries"]}"#,
    )
    .unwrap();
    let ask = "Passage:\n\"\"\"\nNorthwind Harbor's Cold Chain Logistics segment had revenue of $742.8 million in fiscal 2025, up 5.9%.\n\"\"\"\n\nWrite 2 different questions that this passage answers.\n\nAnswer with JSON only: {\"queries\": [\"...\", \"...\"]}";
    let prompt = template.render(&[Message::user(ask)]).unwrap();
    let (text, _, _, finish) = e.generate(&prompt, 96, None, None, 0, None, None).unwrap();
    assert_eq!(finish, "stop", "{text:?}");
    assert!(conforms(&text, &schema), "not the JSON asked for: {text:?}");
    assert!(!conforms("{\"queries\": \"one\"}", &schema) && !conforms("What is it?", &schema));
}

#[test]
fn qwen2_port_matches_candle_step_by_step_and_its_f32_prompt_path_agrees() {
    use candle_core::{Device, Tensor};
    let Some(path) = qwen() else { return };
    let (content, _) = flow::llm::gguf::read(&path).unwrap();
    let tok = flow::llm::gguf::tokenizer(&content, &path).unwrap();
    let ids =
        tok.encode("Northwind Harbor reported revenue of $742.8 million in fiscal", false).unwrap().get_ids().to_vec();
    let (c, mut f) = flow::llm::gguf::read(&path).unwrap();
    let mut ours = flow::llm::qwen2::Qwen2::from_gguf(c, &mut f, &Device::Cpu).unwrap();
    let (c, mut f) = flow::llm::gguf::read(&path).unwrap();
    let mut candle =
        candle_transformers::models::quantized_qwen2::ModelWeights::from_gguf(c, &mut f, &Device::Cpu).unwrap();
    let logits = |t: Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let max_diff = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
    let argmax = |a: &[f32]| a.iter().enumerate().max_by(|x, y| x.1.total_cmp(y.1)).unwrap().0;
    // One token at a time both run the quantized weights: the same arithmetic.
    let mut stepped = Vec::new();
    for (i, id) in ids.iter().enumerate() {
        let x = Tensor::new(&[*id], &Device::Cpu).unwrap().unsqueeze(0).unwrap();
        let a = logits(ours.forward(&x, i).unwrap());
        let b = logits(candle.forward(&x, i).unwrap());
        assert!(max_diff(&a, &b) < 1e-3, "token {i}: logits differ by {}", max_diff(&a, &b));
        stepped = a;
    }
    // The whole prompt at once goes through the f32 copies: the same prediction, logits close.
    let x = Tensor::new(ids.as_slice(), &Device::Cpu).unwrap().unsqueeze(0).unwrap();
    let prompt = logits(ours.forward(&x, 0).unwrap());
    let scale = stepped.iter().fold(0f32, |m, x| m.max(x.abs()));
    assert_eq!(argmax(&prompt), argmax(&stepped));
    assert!(max_diff(&prompt, &stepped) < 0.05 * scale, "{} against logits up to {scale}", max_diff(&prompt, &stepped));
}
