#!/usr/bin/env python3
"""Local embedding throughput, flow (candle) vs sentence-transformers (PyTorch CPU), same texts, same model,
same machine, same run: all-MiniLM-L6-v2, every text truncated to 256 tokens, batch 32.

    cargo build --release --example embed
    python3 -m venv /tmp/stvenv && /tmp/stvenv/bin/pip install sentence-transformers
    /tmp/stvenv/bin/python bench/embed_throughput.py [--n 640]

Texts: SciFact abstracts (title + " " + text) from ../shared/data/scifact when present, else generated
prose; only texts of at least 256 tokens are used, so each is exactly 256 after truncation.
"""
import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = os.path.expanduser(os.environ.get("FLOW_MODELS", "~/.cache/flow/models")) + "/all-MiniLM-L6-v2"


def texts(n, tokenizer, natural):
    scifact = os.path.join(ROOT, "..", "shared", "data", "scifact", "corpus.jsonl")
    pool = []
    if os.path.exists(scifact):
        with open(scifact) as f:
            for line in f:
                d = json.loads(line)
                pool.append((d.get("title", "") + " " + d.get("text", "")).strip())
    else:
        rng = random.Random(1)
        words = "revenue margin segment cloud growth quarter debt cash flow customers pricing region cost".split()
        pool = [" ".join(rng.choice(words) for _ in range(400)) for _ in range(n * 2)]
    if natural:
        return pool[:n]
    long = [t for t in pool if len(tokenizer(t)["input_ids"]) >= 258]
    return long[:n]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=640)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--natural", action="store_true",
                    help="the first N abstracts at their own lengths (truncated at 256) instead of only long ones")
    args = ap.parse_args()
    from sentence_transformers import SentenceTransformer
    import torch

    model = SentenceTransformer(MODEL, device="cpu")
    model.max_seq_length = 256
    data = texts(args.n, model.tokenizer, args.natural)
    print(f"{len(data)} texts ({'natural lengths' if args.natural else '>= 256 tokens'}); torch {torch.__version__}, {torch.get_num_threads()} threads", file=sys.stderr)
    with tempfile.TemporaryDirectory() as tmp:
        inp, out = os.path.join(tmp, "texts.json"), os.path.join(tmp, "vectors.f32")
        with open(inp, "w") as f:
            json.dump(data, f)
        r = subprocess.run([os.path.join(ROOT, "target/release/examples/embed"), inp, out, "--batch", str(args.batch)],
                           check=True, capture_output=True, text=True)
        flow_rss = json.loads(r.stdout)["peak_rss_mb"] or float("nan")
        flow = json.loads(r.stdout)
        flow_vecs = np.fromfile(out, dtype="<f4").reshape(len(data), -1)

    model.encode(data[: args.batch], batch_size=args.batch)  # warm-up
    t = time.time()
    st_vecs = model.encode(data, batch_size=args.batch, convert_to_numpy=True, normalize_embeddings=False)
    st_secs = time.time() - t
    st_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result = {
        "texts": len(data), "tokens_per_text": "natural, <= 256" if args.natural else 256, "batch": args.batch,
        "flow_texts_per_s": round(flow["texts_per_s"], 1), "flow_peak_rss_mb": round(flow_rss, 1),
        "st_texts_per_s": round(len(data) / st_secs, 1), "st_peak_rss_mb": round(st_rss, 1),
        "ratio_flow_over_st": round(flow["texts_per_s"] / (len(data) / st_secs), 2),
        "max_abs_diff": float(np.abs(flow_vecs - st_vecs).max()),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
