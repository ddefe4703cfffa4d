//! Local LLM speed on this machine: prompt (prefill) and generation tokens/s of the embedded default.
//! `cargo run --release --example local_llm -- [GGUF] [--prompt-tokens 300] [--gen-tokens 64] [--runs 3]`

use std::time::Instant;

fn main() {
    let mut args = std::env::args().skip(1);
    let mut path = flow::models::models_dir().join("smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf");
    let (mut prompt_tokens, mut gen_tokens, mut runs) = (300usize, 64usize, 3usize);
    while let Some(a) = args.next() {
        let mut num = || args.next().and_then(|v| v.parse().ok()).expect("a number");
        match a.as_str() {
            "--prompt-tokens" => prompt_tokens = num(),
            "--gen-tokens" => gen_tokens = num(),
            "--runs" => runs = num(),
            p => path = p.into(),
        }
    }
    let t = Instant::now();
    let mut e = flow::llm::local::Engine::load(&path, &candle_core::Device::Cpu).expect("load the GGUF");
    eprintln!("loaded {} in {:.2}s", path.display(), t.elapsed().as_secs_f64());
    let para = "Northwind Harbor's Cold Chain Logistics segment reported revenue of $742.8 million in fiscal 2025, up 5.9% from the prior year, as reefer container monitoring contracts expanded across European ports. ";
    let mut text = String::new();
    while e.tokenizer.encode(text.as_str(), false).unwrap().len() < prompt_tokens {
        text.push_str(para);
    }
    let prompt = format!("<|im_start|>user\n{text}\nWrite a long essay about this.<|im_end|>\n<|im_start|>assistant\n");
    let n_prompt = e.tokenizer.encode(prompt.as_str(), false).unwrap().len();
    for run in 0..runs {
        // Prefill alone: one token out.
        let t = Instant::now();
        e.generate(&prompt, 1, None, None, 0, None, None).unwrap();
        let prefill = t.elapsed().as_secs_f64();
        let t = Instant::now();
        let (_, _, n_out, _) = e.generate(&prompt, gen_tokens, None, None, 0, None, None).unwrap();
        let total = t.elapsed().as_secs_f64();
        let decode = (total - prefill).max(1e-9);
        println!(
            "run {run}: prompt {n_prompt} tokens in {prefill:.2}s = {:.0} tok/s; generation {} tokens in {decode:.2}s = {:.1} tok/s",
            n_prompt as f64 / prefill,
            n_out.saturating_sub(1),
            n_out.saturating_sub(1) as f64 / decode
        );
    }
}
