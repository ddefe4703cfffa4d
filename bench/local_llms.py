#!/usr/bin/env python3
"""The local LLMs side by side on the default workflow (issue 14): workflows/finance.yaml as it is, with
only `models.llm` changed (and, for the 135M, the failure allowance it needs), one model after another
on the same 2 cores. For each: questions written, answers parsed (JSON that conformed on the first
attempt, and after the sampled retries), questions kept, pairs accepted, seconds per generate/judge
item, and the held-out Recall@10 of black_box vs mafin.

    cargo build --release && target/release/flow models pull && target/release/flow models pull qwen2.5-coder-1.5b-instruct
    python3 bench/local_llms.py [--models smollm2-135m-instruct qwen2.5-coder-0.5b-instruct qwen2.5-coder-1.5b-instruct]

Each model gets its own store, bench/out/local_llm_<model>.db (removed first), and the table is printed
as markdown.
"""
import argparse
import json
import os
import re
import sqlite3
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLOW = os.path.join(ROOT, "target", "release", "flow")
OUT = os.path.join(ROOT, "bench", "out")


# The 135M answers many judge and grade prompts in words without a score (stored as failed items), so
# it gets the allowance the default workflow gave it before the 0.5B (`max_failures: 0.6`).
ALLOWANCE = {"smollm2-135m-instruct": 0.6}


def workflow(model):
    src = open(os.path.join(ROOT, "workflows", "finance.yaml")).read()
    if model in ALLOWANCE:
        src = re.sub(r"max_failures: [0-9.]+", f"max_failures: {ALLOWANCE[model]}", src)
    src, n = re.subn(r"llm:\s*\{ provider: local, model: [^ }]+ \}", f"llm: {{ provider: local, model: {model} }}", src)
    assert n == 1, "finance.yaml's models.llm line changed; update this script"
    src = src.replace("store: finance.db", f"store: local_llm_{model}.db")
    src = src.replace("corpus: ../examples/finance", f"corpus: {os.path.join(ROOT, 'examples', 'finance')}")
    path = os.path.join(OUT, f"local_llm_{model}.yaml")
    with open(path, "w") as f:
        f.write(src)
    return path


def figures(db):
    c = sqlite3.connect(db)
    one = lambda q, *a: c.execute(q, a).fetchone()
    st = {r[0]: r[1:] for r in c.execute(
        "SELECT stage, items_done, items_failed, (finished_at - started_at) / 1000.0 FROM stage_runs")}
    written = one("SELECT count(*) FROM queries WHERE stage = 'generate'")[0]
    kept = one("SELECT count(*) FROM queries WHERE stage = 'generate' AND status = 'kept'")[0]
    accepted = one("SELECT count(*) FROM judgments WHERE verdict = 'accepted'")[0]
    calls = {}
    for stage in ("generate", "judge"):
        rows = [json.loads(r[0]) for r in c.execute("SELECT response FROM llm_calls WHERE stage = ?", (stage,))]
        first = sum(1 for r in rows if r.get("json_ok") is True and r.get("attempts") == 1)
        ok = sum(1 for r in rows if r.get("json_ok") is True)
        plain = sum(1 for r in rows if r.get("json_ok") is None)
        calls[stage] = (len(rows), first, ok, plain)
    recall = {}
    for retriever, m in c.execute(
            "SELECT retriever, metrics FROM eval_results WHERE stage = 'eval' ORDER BY id"):
        recall[retriever] = json.loads(m).get("recall@10")
    n_eval = one("SELECT count(*) FROM eval_results WHERE stage = 'eval'")[0]
    return st, written, kept, accepted, calls, recall, n_eval


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+",
                    default=["smollm2-135m-instruct", "qwen2.5-coder-0.5b-instruct", "qwen2.5-coder-1.5b-instruct"])
    args = ap.parse_args()
    os.makedirs(OUT, exist_ok=True)
    rows = []
    for model in args.models:
        wf = workflow(model)
        db = os.path.join(OUT, f"local_llm_{model}.db")
        for suffix in ("", "-wal", "-shm", ".lock"):
            if os.path.exists(db + suffix):
                os.remove(db + suffix)
        t = time.time()
        r = subprocess.run([FLOW, "run", wf, "-q"], capture_output=True, text=True)
        wall = time.time() - t
        if r.returncode != 0:
            print(f"{model}: flow run exited {r.returncode}\n{r.stderr[-2000:]}", file=sys.stderr)
        rows.append((model, wall, figures(db)))
        print(f"{model}: {wall:.0f} s", file=sys.stderr)
    print("| model | questions written | generate answers: JSON first try / after retries / plain | kept | "
          "judge answers: JSON first try / after retries / plain | accepted | s per chunk (generate) | "
          "s per question (judge) | items failed (generate / judge) | held-out R@10 black_box / mafin | total wall |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for model, wall, (st, written, kept, accepted, calls, recall, _) in rows:
        g, j = calls["generate"], calls["judge"]
        per = lambda s: f"{st[s][2] / max(1, st[s][0] + st[s][1]):.1f}" if s in st and st[s][2] else "-"
        fmt = lambda x: f"{x[1]}/{x[0]} / {x[2]}/{x[0]} / {x[3]}/{x[0]}"
        rec = f"{recall.get('black_box', float('nan')):.3f} / {recall.get('mafin', float('nan')):.3f}"
        failed = f"{st.get('generate', (0, 0))[1]} / {st.get('judge', (0, 0))[1]}"
        print(f"| {model} | {written} | {fmt(g)} | {kept} | {fmt(j)} | {accepted} | {per('generate')} | "
              f"{per('judge')} | {failed} | {rec} | {wall:.0f} s |")


if __name__ == "__main__":
    main()
