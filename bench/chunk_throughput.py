#!/usr/bin/env python3
"""Chunk + store throughput of `flow run` on a generated corpus (default 60 MB of prose-like text).

Usage: python3 bench/chunk_throughput.py [--mb 60] [--files 2400] [--flow target/release/flow]
Reports wall time, MB/s, chunks/s and the peak RSS of the flow process. Needs `flow models pull` done.
"""
import argparse
import json
import os
import random
import resource
import sqlite3
import subprocess
import sys
import tempfile
import time

WORDS = (
    "revenue operating income margin segment customers contracts cloud services hardware software subscription "
    "renewal backlog guidance fiscal quarter year growth decline interest rate exposure currency hedging liquidity "
    "cash flow capital expenditure dividend repurchase debt covenant facility maturity goodwill impairment lease "
    "inventory supply chain semiconductor logistics pricing inflation wage labor regulation compliance audit "
    "cybersecurity incident risk factor management board committee shareholders investors analysts market share "
    "competition acquisition integration synergy restructuring charge tax rate deferred asset liability pension "
    "the a of and in to for with on by from at as was were is are will may could increased decreased compared "
    "primarily due higher lower partially offset million billion percent approximately"
).split()


def make_corpus(root, mb, files, seed=7):
    rng = random.Random(seed)
    per_file = mb * 1_000_000 // files
    total = 0
    for i in range(files):
        paras, size = [], 0
        while size < per_file:
            sents = []
            for _ in range(rng.randint(3, 7)):
                n = rng.randint(8, 28)
                s = " ".join(rng.choice(WORDS) for _ in range(n))
                if rng.random() < 0.3:
                    s += f" {rng.randint(1, 999)}.{rng.randint(0, 9)} million"
                sents.append(s[0].upper() + s[1:] + ".")
            p = " ".join(sents)
            paras.append(p)
            size += len(p) + 2
        body = "\n\n".join(paras)
        sub = os.path.join(root, f"part{i % 16:02d}")
        os.makedirs(sub, exist_ok=True)
        ext = "md" if i % 4 == 0 else "txt"
        with open(os.path.join(sub, f"doc{i:05d}.{ext}"), "w") as f:
            f.write(("# Report section %d\n\n" % i if ext == "md" else "") + body)
        total += len(body)
    return total


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=int, default=60)
    ap.add_argument("--files", type=int, default=2400)
    ap.add_argument("--flow", default="target/release/flow")
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--overlap", type=int, default=32)
    args = ap.parse_args()
    flow = os.path.abspath(args.flow)
    with tempfile.TemporaryDirectory() as tmp:
        corpus = os.path.join(tmp, "corpus")
        t = time.time()
        make_corpus(corpus, args.mb, args.files)
        nbytes = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(corpus) for f in fs)
        print(f"corpus: {nbytes / 1e6:.1f} MB in {args.files} files (made in {time.time() - t:.1f}s)", file=sys.stderr)
        wf = os.path.join(tmp, "bench.yaml")
        with open(wf, "w") as f:
            f.write(
                "name: bench\nstore: bench.db\nmodels:\n  black_box: { provider: local, model: all-MiniLM-L6-v2 }\n"
                f"stages:\n  chunk: {{ kind: chunk, corpus: corpus, max_tokens: {args.max_tokens}, overlap: {args.overlap} }}\n"
            )
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        t = time.time()
        subprocess.run([flow, "run", "--quiet", wf], check=True)
        wall = time.time() - t
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        con = sqlite3.connect(os.path.join(tmp, "bench.db"))
        chunks = con.execute("SELECT COUNT(*) FROM chunks").fetchone()[0]
        docs = con.execute("SELECT COUNT(*) FROM documents WHERE status='active'").fetchone()[0]
        # An unchanged corpus must do no work: time the second (up-to-date) run too.
        t = time.time()
        subprocess.run([flow, "run", "--quiet", wf], check=True)
        rerun = time.time() - t
        result = {
            "mb": round(nbytes / 1e6, 1),
            "documents": docs,
            "chunks": chunks,
            "wall_s": round(wall, 2),
            "mb_per_s": round(nbytes / 1e6 / wall, 2),
            "chunks_per_s": round(chunks / wall),
            "cpu_s": round((after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime), 2),
            "peak_rss_mb": round(after.ru_maxrss / 1024, 1),
            "unchanged_rerun_s": round(rerun, 2),
            "cores": os.cpu_count(),
        }
        print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
