//! The local engine's speed for one stream: prompt (prefill) and generation tokens/s, as llama.cpp's
//! own `llama-bench` measures them (pp and tg), through flow's engine on the same GGUF.
//! `cargo run --release --example local_llm -- [GGUF] [--requantize auto|never|q8_0] [--prompt-tokens 512]
//! [--gen-tokens 128] [--runs 3]`. Prints one JSON object per line, the first naming the weights loaded.

use std::time::Instant;

use flow::llm::local::engine::{self, Job, Output, Sampling, Settings};
use flow::workflow::Requantize;

fn main() {
    let mut args = std::env::args().skip(1);
    let mut path = flow::models::models_dir().join("qwen2.5-coder-0.5b-instruct/Qwen2.5-Coder-0.5B-Instruct.gguf");
    let (mut prompt_tokens, mut gen_tokens, mut runs) = (512usize, 128usize, 3usize);
    let mut requantize = Requantize::Never;
    while let Some(a) = args.next() {
        let mut value = || args.next().expect("a value after the option");
        match a.as_str() {
            "--prompt-tokens" => prompt_tokens = value().parse().expect("a number"),
            "--gen-tokens" => gen_tokens = value().parse().expect("a number"),
            "--runs" => runs = value().parse().expect("a number"),
            "--requantize" => requantize = serde_json::from_value(value().into()).expect("auto, never or q8_0"),
            p => path = p.into(),
        }
    }
    let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2) as i32;
    let settings = Settings { parallel: 1, ctx_per_seq: 4096, threads, batch: 512 };
    flow::llm::local::backend().expect("llama.cpp starts");
    let checked = flow::llm::gguf::check(&path).expect("a GGUF");
    let cache = flow::models::models_dir().join(".requantized");
    let (path, _) = flow::llm::local::weights::choose(&path, &checked, requantize, &cache).expect("the weights");
    println!("{}", serde_json::json!({ "weights": path }));
    let jobs = engine::spawn(path.clone(), settings).expect("the engine thread");
    let ask = |prompt: String, max_tokens: usize| -> (Output, f64) {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let t = Instant::now();
        let sampling = Sampling::default();
        jobs.send(Job { prompt, max_tokens, sampling, grammar: None, probe: None, reply: tx }).expect("sent");
        let out = rx.blocking_recv().expect("an answer").expect("generation");
        (out, t.elapsed().as_secs_f64())
    };
    // Words of about one token each; every prompt starts differently, so nothing is reused.
    let words = "revenue margin segment cloud growth quarter debt cash flow customers pricing region cost";
    let prompt_of = |run: usize, n_words: usize| {
        let mut text = format!("Run {run}. ");
        text.push_str(&words.split(' ').cycle().take(n_words).collect::<Vec<_>>().join(" "));
        format!(
            "<|im_start|>user\n{text}\nContinue this list for as long as you can.<|im_end|>\n<|im_start|>assistant\n"
        )
    };
    let (_, load) = ask("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n".into(), 1);
    eprintln!("loaded {} in {load:.2}s", path.display());
    // SAFETY: llama.cpp returns a static NUL-terminated string.
    let info = unsafe { std::ffi::CStr::from_ptr(llama_cpp_sys_2::llama_print_system_info()) };
    println!("{}", serde_json::json!({ "llama_cpp_system_info": info.to_string_lossy() }));
    // As llama-bench's sequence, each prompt ends at position `prompt_tokens`: one token further
    // would pay a second, nearly empty pass, and past a multiple of 256 llama.cpp pads the attended
    // cache to the next one (positions 4..516 attend 768 cells, 1.5x llama-bench's 512, about 10% of
    // the prompt's time here). Each prompt starts with its own digit, so the slot's cache never holds
    // more than the chat template's head, and only the tokens decoded are counted.
    let calls = std::cell::Cell::new(0usize);
    let next = || {
        calls.set(calls.get() + 1);
        calls.get() % 10
    };
    let mut n_words = prompt_tokens;
    for _ in 0..4 {
        let (o, _) = ask(prompt_of(next(), n_words), 1);
        let ends_at = o.prompt_tokens as isize;
        if ends_at == prompt_tokens as isize {
            break;
        }
        n_words = (n_words as isize + prompt_tokens as isize - ends_at).max(1) as usize;
    }
    let prompt = || prompt_of(next(), n_words);
    for run in 0..runs {
        let (pre, t_pre) = ask(prompt(), 1);
        let (full, t_full) = ask(prompt(), gen_tokens);
        // Only the chat template's first tokens can come from the slot's cache.
        let decoded = pre.prompt_tokens - pre.reused_tokens;
        assert!(pre.reused_tokens < 8, "{} prompt tokens were reused", pre.reused_tokens);
        let decode = (t_full - t_pre).max(1e-9);
        println!(
            "{}",
            serde_json::json!({
                "run": run, "prompt_tokens": decoded, "prompt_tok_per_s": decoded as f64 / t_pre,
                "gen_tokens": full.completion_tokens, "gen_tok_per_s": (full.completion_tokens.saturating_sub(1)) as f64 / decode,
                "finish": full.finish,
            })
        );
    }
}
