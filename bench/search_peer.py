"""Exact search peer for bench/search.rs: sentence-transformers' util.semantic_search (what its
InformationRetrievalEvaluator uses) on random unit vectors of the same shape; prints queries/s and peak RSS.

    /tmp/stvenv/bin/python bench/search_peer.py --docs 1000000 --queries 1000
"""

import argparse
import json
import resource
import time

import torch
from sentence_transformers import util

p = argparse.ArgumentParser()
p.add_argument("--docs", type=int, default=5183)
p.add_argument("--queries", type=int, default=300)
p.add_argument("--dim", type=int, default=384)
p.add_argument("--k", type=int, default=100)
a = p.parse_args()

g = torch.Generator().manual_seed(1)
q = torch.nn.functional.normalize(torch.rand(a.queries, a.dim, generator=g) * 2 - 1, dim=1)
# semantic_search needs the whole corpus as one tensor; it is made in blocks to keep the peak honest.
corpus = torch.empty(a.docs, a.dim)
for s in range(0, a.docs, 65536):
    e = min(a.docs, s + 65536)
    corpus[s:e] = torch.nn.functional.normalize(torch.rand(e - s, a.dim, generator=g) * 2 - 1, dim=1)
t = time.perf_counter()
hits = util.semantic_search(q, corpus, top_k=a.k, score_function=util.dot_score)
secs = time.perf_counter() - t
print(json.dumps({"peer": "sentence-transformers util.semantic_search", "torch_threads": torch.get_num_threads(),
                  "docs": a.docs, "queries": a.queries, "dim": a.dim, "k": a.k, "search_seconds": secs,
                  "queries_per_s": a.queries / secs,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
