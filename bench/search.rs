//! Exact search throughput: `cargo run --release --example search -- --docs N --queries Q [--dim 384] [--k 100]`
//! streams N random unit vectors in blocks through flow's top-k search (as eval_recall does) and
//! reports queries/s and peak RSS; `--check` also brute-forces the first queries to verify the result.

#[path = "common.rs"]
mod common;

use std::time::Instant;

fn unit_rows(rng: &mut fastrand::Rng, n: usize, dim: usize) -> Vec<f32> {
    let mut v: Vec<f32> = (0..n * dim).map(|_| rng.f32() * 2.0 - 1.0).collect();
    for row in v.chunks_mut(dim) {
        let norm = row.iter().map(|x| x * x).sum::<f32>().sqrt();
        row.iter_mut().for_each(|x| *x /= norm);
    }
    v
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let flag = |name: &str, default: usize| common::flag(&args, name, default);
    let (n, nq, dim, k) = (flag("--docs", 5183), flag("--queries", 300), flag("--dim", 384), flag("--k", 100));
    let check = args.iter().any(|a| a == "--check");
    let mut rng = fastrand::Rng::with_seed(1);
    let queries = unit_rows(&mut rng, nq, dim);
    let mut top = flow::rank::search::TopK::new(&queries, dim, k).unwrap();
    let mut kept_docs = Vec::new();
    // The corpus is made block by block, as eval_recall embeds it; only search time is counted.
    let mut search_s = 0.0;
    let mut made = 0;
    while made < n {
        let b = flow::rank::search::BLOCK.min(n - made);
        let block = unit_rows(&mut rng, b, dim);
        let t = Instant::now();
        top.push(&block).unwrap();
        search_s += t.elapsed().as_secs_f64();
        if check {
            kept_docs.extend_from_slice(&block);
        }
        made += b;
    }
    let hits = top.finish();
    if check {
        for (qi, q) in queries.chunks(dim).take(5).enumerate() {
            let mut all: Vec<(usize, f32)> =
                kept_docs.chunks(dim).map(|d| d.iter().zip(q).map(|(a, b)| a * b).sum()).enumerate().collect();
            all.sort_by(|a, b| b.1.total_cmp(&a.1));
            let same = all.iter().take(k).zip(&hits[qi]).filter(|(a, b)| a.0 == b.0).count();
            assert!(same >= k - 1, "query {qi}: only {same} of {k} agree with brute force");
        }
    }
    println!(
        "{}",
        serde_json::json!({"docs": n, "queries": nq, "dim": dim, "k": k, "search_seconds": search_s,
            "queries_per_s": nq as f64 / search_s, "peak_rss_mb": common::peak_rss_mb(), "checked": check})
    );
}
