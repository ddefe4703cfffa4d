#!/usr/bin/env python3
"""Local embedding throughput: flow (packed CPU encoder, f32 and bf16-on-AMX products) against
sentence-transformers (PyTorch CPU, f32 and under bf16 autocast), same texts, same model, same machine,
same run, every row in a process of its own (so one row's memory or threads never colour the next):
every text truncated to 256 tokens, batch 32.

    cargo build --release --example embed
    python3 -m venv /tmp/stvenv && /tmp/stvenv/bin/pip install sentence-transformers
    /tmp/stvenv/bin/python bench/embed_throughput.py [--n 640] [--model DIR] [--beir FOLDER]

Texts: the BEIR folder's corpus (title + " " + text; default ../shared/data/scifact) when present, else
generated prose; only texts of at least 256 tokens are used, so each is exactly 256 after truncation.
Every row's vectors are compared with sentence-transformers' f32 vectors: the least cosine over all
texts and the largest absolute difference.
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
MODELS = os.path.expanduser(os.environ.get("FLOW_MODELS", "~/.cache/flow/models"))
ROWS = ["st_f32", "st_bf16_autocast", "flow_f32", "flow_bf16"]


def texts(n, tokenizer, natural, beir):
    corpus = os.path.join(beir, "corpus.jsonl")
    pool = []
    if os.path.exists(corpus):
        with open(corpus) as f:
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


def run_st(model_dir, data, batch, autocast, out):
    """One sentence-transformers row, in this (child) process."""
    from sentence_transformers import SentenceTransformer
    import torch

    model = SentenceTransformer(model_dir, device="cpu")
    model.max_seq_length = 256

    def encode(xs):
        if autocast:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return model.encode(xs, batch_size=batch, convert_to_numpy=True, normalize_embeddings=False)
        return model.encode(xs, batch_size=batch, convert_to_numpy=True, normalize_embeddings=False)

    encode(data[:batch])  # warm-up: the first call pays oneDNN's set-up
    t = time.time()
    vecs = encode(data).astype("<f4")
    secs = time.time() - t
    vecs.tofile(out)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"texts_per_s": len(data) / secs, "peak_rss_mb": rss, "torch": torch.__version__,
            "threads": torch.get_num_threads()}


def row(name, model_dir, inp, out, batch):
    if name.startswith("st_"):
        r = subprocess.run([sys.executable, __file__, "--row", name, "--model", model_dir, "--texts", inp,
                            "--out", out, "--batch", str(batch)], check=True, capture_output=True, text=True)
    else:
        precision = name.split("_")[1]
        r = subprocess.run([os.path.join(ROOT, "target/release/examples/embed"), inp, out, "--batch", str(batch),
                            "--model", model_dir, "--precision", precision],
                           check=True, capture_output=True, text=True)
    return json.loads(r.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=640)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--model", default=os.path.join(MODELS, "all-MiniLM-L6-v2"))
    ap.add_argument("--beir", default=os.path.join(ROOT, "..", "shared", "data", "scifact"))
    ap.add_argument("--rows", default=",".join(ROWS), help="a comma-separated subset of " + ",".join(ROWS))
    ap.add_argument("--natural", action="store_true",
                    help="the first N abstracts at their own lengths (truncated at 256) instead of only long ones")
    # A child process runs one sentence-transformers row.
    ap.add_argument("--row")
    ap.add_argument("--texts")
    ap.add_argument("--out")
    args = ap.parse_args()

    if args.row:
        with open(args.texts) as f:
            data = json.load(f)
        print(json.dumps(run_st(args.model, data, args.batch, args.row == "st_bf16_autocast", args.out)))
        return

    from transformers import AutoTokenizer

    data = texts(args.n, AutoTokenizer.from_pretrained(args.model), args.natural, args.beir)
    print(f"{len(data)} texts ({'natural lengths' if args.natural else '>= 256 tokens'}), model {args.model}",
          file=sys.stderr)
    rows = [r for r in args.rows.split(",") if r]
    if "st_f32" not in rows:
        rows.insert(0, "st_f32")  # the reference every row is compared with
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        inp = os.path.join(tmp, "texts.json")
        with open(inp, "w") as f:
            json.dump(data, f)
        vecs = {}
        for name in rows:
            out = os.path.join(tmp, name + ".f32")
            results[name] = row(name, args.model, inp, out, args.batch)
            vecs[name] = np.fromfile(out, dtype="<f4").reshape(len(data), -1)
            print(f"{name}: {results[name]['texts_per_s']:.1f} texts/s", file=sys.stderr)
    ref = vecs["st_f32"]
    unit = lambda v: v / np.linalg.norm(v, axis=1, keepdims=True)
    for name in rows:
        r = results[name]
        r["texts_per_s"] = round(r["texts_per_s"], 1)
        r["peak_rss_mb"] = round(r["peak_rss_mb"] or float("nan"), 1)
        r["min_cosine_to_st_f32"] = round(float((unit(vecs[name]) * unit(ref)).sum(axis=1).min()), 6)
        r["max_abs_diff_to_st_f32"] = float(np.abs(vecs[name] - ref).max())
    print(json.dumps({"texts": len(data), "tokens_per_text": "natural, <= 256" if args.natural else 256,
                      "batch": args.batch, "model": os.path.basename(args.model.rstrip("/")), "rows": results},
                     indent=2))


if __name__ == "__main__":
    main()
