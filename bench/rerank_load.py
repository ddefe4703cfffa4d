#!/usr/bin/env python3
"""What reranking costs `flow serve` (issue 29): p50/p99 latency and queries/s under 1 and 8
concurrent clients, on a BEIR folder's queries. The server batches the (query, passage) pairs of
concurrent requests through the embeddings' batching window.

    python3 bench/rerank_load.py WORKFLOW BEIR_FOLDER [--mode rerank|search] [--clients 1,8]
        [--requests 48] [--docs 30] [--flow target/release/flow]

`--mode rerank` (default): `POST /v1/rerank` with each query and `--docs` of the folder's documents
(a seeded draw): the reranking alone, as a RAG stack calls it. `--mode search`: `/v1/search` with
`retriever: rerank` against `hybrid` alone; the workflow then needs a chunk stage over the corpus.
WORKFLOW must have a trained reranker. Environment variables the workflow reads are passed through.
"""
import argparse
import http.client
import json
import os
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_load import start_server  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def search(addr, query, retriever, k, docs=None):
    host, port = addr.rsplit(":", 1)
    c = http.client.HTTPConnection(host, int(port), timeout=600)
    if docs is None:
        path, body = "/v1/search", json.dumps({"query": query, "retriever": retriever, "k": k})
    else:
        path, body = "/v1/rerank", json.dumps({"query": query, "documents": docs, "top_n": k})
    t = time.perf_counter()
    c.request("POST", path, body, {"Content-Type": "application/json"})
    r = c.getresponse()
    data = r.read()
    dt = time.perf_counter() - t
    if r.status != 200:
        sys.exit(f"search failed ({r.status}): {data[:300]}")
    return dt


def run(addr, queries, retriever, clients, k, docs_of=None):
    lat, lock = [], threading.Lock()
    todo = list(queries)

    def client():
        while True:
            with lock:
                if not todo:
                    return
                q = todo.pop()
            dt = search(addr, q, retriever, k, docs_of(q) if docs_of else None)
            with lock:
                lat.append(dt)

    t = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    [th.start() for th in threads]
    [th.join() for th in threads]
    wall = time.perf_counter() - t
    lat.sort()
    pick = lambda q: lat[min(len(lat) - 1, int(q * len(lat)))] * 1000
    return {"retriever": retriever, "clients": clients, "requests": len(lat), "p50_ms": round(pick(0.5)),
            "p99_ms": round(pick(0.99)), "queries_per_s": round(len(lat) / wall, 2)}


def rss_mb(pid):
    with open(f"/proc/{pid}/status") as f:
        return next(int(l.split()[1]) // 1024 for l in f if l.startswith("VmHWM"))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("workflow")
    ap.add_argument("beir")
    ap.add_argument("--clients", default="1,8")
    ap.add_argument("--requests", type=int, default=48)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--retrievers", default="hybrid,rerank")
    ap.add_argument("--mode", choices=["rerank", "search"], default="rerank")
    ap.add_argument("--docs", type=int, default=30, help="documents per /v1/rerank request")
    ap.add_argument("--flow", default=str(ROOT / "target" / "release" / "flow"))
    args = ap.parse_args()
    with open(os.path.join(args.beir, "queries.jsonl")) as f:
        queries = [json.loads(l)["text"] for l in f]
    with open(os.path.join(args.beir, "corpus.jsonl")) as f:
        corpus = [json.loads(l)["text"] for l in f]
    docs_of = None
    if args.mode == "rerank":
        docs_of = lambda q: random.Random(q).sample(corpus, args.docs)  # noqa: E731
        args.retrievers = "rerank"
    server, addr = start_server(args.flow, args.workflow)
    try:
        # The first search builds the chunk index from the embeddings cache (or embeds the chunks).
        if docs_of:
            search(addr, queries[0], "rerank", args.k, docs_of(queries[0]))
        else:
            search(addr, queries[0], "hybrid", args.k)
            search(addr, queries[1], "rerank", args.k)
        rows, at = [], 2
        for clients in [int(c) for c in args.clients.split(",")]:
            for retriever in args.retrievers.split(","):
                batch = queries[at:at + args.requests]
                at += args.requests
                rows.append(run(addr, batch, retriever, clients, args.k, docs_of))
                print(json.dumps(rows[-1]), flush=True)
        print(f"server peak RSS {rss_mb(server.pid)} MB")
        tokens = [len(d.split()) for d in corpus]
        print(f"mode {args.mode}; documents per request {args.docs}; corpus words per document: median "
              f"{sorted(tokens)[len(tokens) // 2]}")
        print("| retriever | clients | requests | p50 ms | p99 ms | queries/s |")
        print("|---|---:|---:|---:|---:|---:|")
        for r in rows:
            print(f"| {r['retriever']} | {r['clients']} | {r['requests']} | {r['p50_ms']} | {r['p99_ms']} | "
                  f"{r['queries_per_s']} |")
    finally:
        server.terminate()
        server.wait()


if __name__ == "__main__":
    main()
