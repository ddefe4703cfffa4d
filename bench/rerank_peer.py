#!/usr/bin/env python3
"""The peer of bench/rerank_load.py's one-client row: sentence-transformers' CrossEncoder on the
reranker folder flow trained, scoring the same draws (each query with 30 of the folder's documents,
batch 32), in f32 and under bf16 autocast; milliseconds per query, one query at a time.

    /tmp/stvenv/bin/python bench/rerank_peer.py RERANKER_FOLDER BEIR_FOLDER [--requests 48] [--docs 30]
"""
import argparse
import json
import os
import random
import time

import torch
from sentence_transformers import CrossEncoder

ap = argparse.ArgumentParser()
ap.add_argument("model")
ap.add_argument("beir")
ap.add_argument("--requests", type=int, default=48)
ap.add_argument("--docs", type=int, default=30)
args = ap.parse_args()
with open(os.path.join(args.beir, "queries.jsonl")) as f:
    queries = [json.loads(l)["text"] for l in f]
with open(os.path.join(args.beir, "corpus.jsonl")) as f:
    corpus = [json.loads(l)["text"] for l in f]
torch.set_num_threads(os.cpu_count())
model = CrossEncoder(args.model, device="cpu")
batch = queries[2:2 + args.requests]
for name, ctx in (("f32", torch.autocast("cpu", enabled=False)), ("bf16 autocast", torch.autocast("cpu", dtype=torch.bfloat16))):
    with ctx:
        model.predict([(queries[0], d) for d in random.Random(queries[0]).sample(corpus, args.docs)], batch_size=32)
        lat = []
        for q in batch:
            pairs = [(q, d) for d in random.Random(q).sample(corpus, args.docs)]
            t = time.perf_counter()
            model.predict(pairs, batch_size=32, show_progress_bar=False)
            lat.append(time.perf_counter() - t)
    lat.sort()
    print(f"sentence-transformers {name}: p50 {lat[len(lat) // 2] * 1000:.0f} ms, "
          f"p99 {lat[min(len(lat) - 1, int(0.99 * len(lat)))] * 1000:.0f} ms per query of {args.docs} pairs")
