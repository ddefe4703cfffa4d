#!/usr/bin/env python3
"""The PyTorch side of the GPU comparison (issue 17): sentence-transformers'
MultipleNegativesRankingLoss on the same weights, pairs, batch size and max_seq_length as flow's
train stage, bf16 autocast; then SentenceTransformer.encode over the same texts. Prints one JSON line.

    python3 st_bench.py --model DIR --pairs DIR --batch 32 --steps 60 [--f32] [--encode TEXTS]
"""
import argparse
import json
import random
import time

import torch
from sentence_transformers import SentenceTransformer, losses

p = argparse.ArgumentParser()
p.add_argument("--model", required=True)
p.add_argument("--pairs", required=True, help="the BEIR folder make_data.py wrote")
p.add_argument("--batch", type=int, default=32)
p.add_argument("--steps", type=int, default=60)
p.add_argument("--warmup-steps", type=int, default=5, help="steps not timed (CUDA start-up, autotuning)")
p.add_argument("--max-seq", type=int, default=256)
p.add_argument("--f32", action="store_true")
p.add_argument("--encode", help="a file of texts, one a line, to time SentenceTransformer.encode on")
p.add_argument("--encode-batch", type=int, default=256)
a = p.parse_args()

dev = "cuda"
model = SentenceTransformer(a.model, device=dev)
model.max_seq_length = a.max_seq
out = {"model": a.model, "batch": a.batch, "max_seq_length": a.max_seq, "precision": "f32" if a.f32 else "bf16"}

docs = {}
for line in open(f"{a.pairs}/corpus.jsonl", encoding="utf-8"):
    d = json.loads(line)
    docs[d["_id"]] = d["text"]
queries = {}
for line in open(f"{a.pairs}/queries.jsonl", encoding="utf-8"):
    q = json.loads(line)
    queries[q["_id"]] = q["text"]
pairs = []
for line in list(open(f"{a.pairs}/qrels/train.tsv", encoding="utf-8"))[1:]:
    qid, did, _ = line.rstrip("\n").split("\t")
    pairs.append((queries[qid], docs[did]))
random.Random(7).shuffle(pairs)

if a.steps > 0:
    loss_fn = losses.MultipleNegativesRankingLoss(model, scale=20.0)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-5, weight_decay=0.01)
    model.train()
    torch.cuda.reset_peak_memory_stats()
    timed, t0, losses_seen = 0, None, []
    for step in range(a.steps + a.warmup_steps):
        i = (step * a.batch) % max(1, len(pairs) - a.batch)
        batch = pairs[i : i + a.batch]
        feats = []
        for side in (0, 1):
            f = model.tokenize([x[side] for x in batch])
            feats.append({k: v.to(dev) for k, v in f.items()})
        if step == a.warmup_steps:
            torch.cuda.synchronize()
            t0 = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=not a.f32):
            loss = loss_fn(feats, None)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses_seen.append(float(loss.detach()))
        if step >= a.warmup_steps:
            timed += len(batch)
    torch.cuda.synchronize()
    secs = time.perf_counter() - t0
    out.update({
        "train_pairs_per_s": timed / secs, "train_seconds": secs, "train_steps": a.steps,
        "train_peak_gib": torch.cuda.max_memory_allocated() / 2**30, "last_loss": losses_seen[-1],
    })

if a.encode:
    texts = [t.rstrip("\n") for t in open(a.encode, encoding="utf-8")]
    model.eval()
    model.encode(texts[:512], batch_size=a.encode_batch)  # warm-up
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=not a.f32):
        model.encode(texts, batch_size=a.encode_batch)
    torch.cuda.synchronize()
    secs = time.perf_counter() - t0
    out.update({"encode_texts": len(texts), "encode_texts_per_s": len(texts) / secs,
                "encode_peak_gib": torch.cuda.max_memory_allocated() / 2**30})
print(json.dumps(out))
