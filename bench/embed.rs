//! Local embedding throughput: `cargo run --release --example embed -- TEXTS.json OUT.f32 [--batch 32] [--max-seq 256]
//! [--model DIR] [--precision auto|f32|bf16]`
//! reads a JSON list of strings, embeds them with the local all-MiniLM-L6-v2 and writes the vectors
//! (little-endian f32) so the Python side can compare them with sentence-transformers.

#[path = "common.rs"]
mod common;

use std::io::Write;
use std::time::Instant;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (input, output) = (&args[0], &args[1]);
    let flag = |name: &str, default: usize| common::flag(&args, name, default);
    let (batch, max_seq) = (flag("--batch", 32), flag("--max-seq", 256));
    let texts: Vec<String> = serde_json::from_str(&std::fs::read_to_string(input).unwrap()).unwrap();
    let dir = match args.iter().position(|a| a == "--model").and_then(|i| args.get(i + 1)) {
        Some(d) => std::path::PathBuf::from(d),
        None => flow::models::models_dir().join("all-MiniLM-L6-v2"),
    };
    let precision = match args.iter().position(|a| a == "--precision").and_then(|i| args.get(i + 1)) {
        Some(p) => serde_json::from_value(serde_json::json!(p)).expect("auto, f32 or bf16"),
        None => flow::workflow::Precision::Auto,
    };
    let products = flow::bert::Products::of(precision).unwrap();
    eprintln!("products: {}", products.name());
    let enc = flow::bert::SentenceEncoder::load(&dir, Some(max_seq), &candle_core::Device::Cpu, products).unwrap();
    // Warm-up on one batch, as sentence-transformers' first call also pays its set-up.
    enc.embed(&texts[..batch.min(texts.len())], batch).unwrap();
    let t = Instant::now();
    let vectors = enc.embed(&texts, batch).unwrap();
    let secs = t.elapsed().as_secs_f64();
    let mut f = std::fs::File::create(output).unwrap();
    for v in &vectors {
        for x in v {
            f.write_all(&x.to_le_bytes()).unwrap();
        }
    }
    println!(
        "{}",
        serde_json::json!({"texts": texts.len(), "seconds": secs, "texts_per_s": texts.len() as f64 / secs,
            "peak_rss_mb": common::peak_rss_mb()})
    );
}
