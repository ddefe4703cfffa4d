"""Peak memory of the chunk stage on one-line documents: a file of --mb megabytes with no line break.

    cargo build --release && target/release/flow models pull
    python3 bench/chunk_memory.py --mb 1 10 50

For each size, writes one file of prose-like words on a single line, runs a one-stage chunk workflow
(all-MiniLM-L6-v2 tokenizer, 256 tokens, overlap 32) into a fresh store and reports the child's peak RSS
(getrusage), wall time, chunks, and peak RSS over the file size.
"""

import argparse
import os
import random
import sqlite3
import subprocess
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLOW = os.environ.get("FLOW_BIN", os.path.join(ROOT, "target", "release", "flow"))
WORDS = (
    "revenue margin fiscal quarter growth segment operating income cash flow dividend share capital "
    "expenditure guidance outlook customer product market region cost savings investment debt equity"
).split()


def run_one(mb):
    with tempfile.TemporaryDirectory() as d:
        os.makedirs(os.path.join(d, "docs"))
        rng = random.Random(mb)
        path = os.path.join(d, "docs", "one_line.txt")
        target = int(mb * 1_000_000)
        with open(path, "w") as f:
            written = 0
            while written < target:
                piece = " ".join(rng.choice(WORDS) for _ in range(2000)) + (". " if rng.random() < 0.5 else " ")
                f.write(piece)
                written += len(piece)
        with open(os.path.join(d, "wf.yaml"), "w") as f:
            f.write(
                "name: t\nstore: t.db\nmodels:\n  black_box: { provider: local, model: all-MiniLM-L6-v2 }\n"
                "stages:\n  chunk: { kind: chunk, corpus: docs, max_tokens: 256, overlap: 32 }\n"
            )
        size = os.path.getsize(path)
        t = time.perf_counter()
        child = subprocess.Popen([FLOW, "run", "wf.yaml", "--quiet"], cwd=d)
        _, status, usage = os.wait4(child.pid, 0)
        wall = time.perf_counter() - t
        assert status == 0, status
        peak = usage.ru_maxrss * 1024  # this child's own peak, in bytes
        chunks = sqlite3.connect(os.path.join(d, "t.db")).execute("SELECT COUNT(*) FROM chunks").fetchone()[0]
        return size, chunks, wall, peak


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=float, nargs="+", default=[1, 10, 50])
    args = ap.parse_args()
    # The same workflow on a tiny file: what the binary, its runtime and the tokenizer take anyway.
    _, _, _, base = run_one(0.001)
    print(f"baseline (a 1 kB file): peak RSS {base / 1e6:.0f} MB")
    print("| file | chunks | wall | peak RSS | peak / file size | (peak - baseline) / file size |")
    print("|---|---|---|---|---|---|")
    for mb in args.mb:
        size, chunks, wall, peak = run_one(mb)
        print(
            f"| {size / 1e6:.1f} MB, one line | {chunks:,} | {wall:.1f} s | {peak / 1e6:.0f} MB | "
            f"{peak / size:.1f}x | {(peak - base) / size:.1f}x |"
        )



if __name__ == "__main__":
    main()
