"""What the check on opening a store costs: `flow status` on a store grown to --gb gigabytes.

    cargo build --release && python3 bench/store_check.py --gb 1

Makes a store with flow's own schema (a one-stage chunk run), fills its `chunks` table with random text
through Python's sqlite3 until the file is --gb large, then times `flow status` (which opens the store
with SQLite's header check and `PRAGMA quick_check`) three times, and `PRAGMA quick_check` alone.
"""

import argparse
import os
import random
import sqlite3
import string
import subprocess
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLOW = os.path.join(ROOT, "target", "release", "flow")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--gb", type=float, default=1.0)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        os.makedirs(os.path.join(d, "docs"))
        with open(os.path.join(d, "docs", "a.txt"), "w") as f:
            f.write("A short document about revenue and margins.\n")
        with open(os.path.join(d, "wf.yaml"), "w") as f:
            f.write(
                "name: t\nstore: t.db\nmodels:\n  black_box: { provider: local, model: all-MiniLM-L6-v2 }\n"
                "stages:\n  chunk: { kind: chunk, corpus: docs }\n"
            )
        subprocess.run([FLOW, "run", "wf.yaml", "--quiet"], cwd=d, check=True)
        db = os.path.join(d, "t.db")
        con = sqlite3.connect(db)
        doc = con.execute("SELECT id FROM documents LIMIT 1").fetchone()[0]
        rng = random.Random(7)
        alphabet = string.ascii_lowercase + "      "
        block = "".join(rng.choice(alphabet) for _ in range(1 << 20))
        target = int(args.gb * (1 << 30))
        ordinal = 1
        def size():
            wal = db + "-wal"
            return os.path.getsize(db) + (os.path.getsize(wal) if os.path.exists(wal) else 0)

        while size() < target:
            rows = []
            for _ in range(256):
                start = rng.randrange(0, len(block) - 4096)
                text = block[start:start + 4000]
                rows.append((doc, ordinal, text, 1000, f"h{ordinal}", 0, 4000))
                ordinal += 1
            con.executemany(
                "INSERT INTO chunks (document_id, ordinal, text, n_tokens, content_hash, start_byte, end_byte) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                rows,
            )
            con.commit()
            con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        con.close()
        size = os.path.getsize(db)
        print(f"store: {size / (1 << 30):.2f} GiB, {ordinal - 1} chunks added")
        for i in range(3):
            t = time.perf_counter()
            subprocess.run([FLOW, "status", "-w", "wf.yaml"], cwd=d, check=True, capture_output=True)
            print(f"flow status (open + quick_check): {time.perf_counter() - t:.2f} s")
        con = sqlite3.connect(db)
        t = time.perf_counter()
        print("quick_check:", con.execute("PRAGMA quick_check").fetchone()[0], f"{time.perf_counter() - t:.2f} s (Python's sqlite3)")


if __name__ == "__main__":
    main()
