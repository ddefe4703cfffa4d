#!/usr/bin/env python3
"""Retriever benchmark (issue 13), one script, one run: on SciFact (train qrels to learn from, the 300
human test queries over all 5,183 abstracts to score), bm25, black_box, augment_only, mafin (w = 0.5
and auto), hybrid over each dense retriever (convex with alpha chosen on the train stage's validation
split, and rrf), and sentence-transformers' MNRL fine-tune scored by flow's own evaluator (its folder
as a black box). Everything runs through `flow run bench/scifact_hybrid.yaml`, one stage at a time
(so the trainings do not share the two cores).

    cargo build --release
    /tmp/stvenv/bin/python bench/scifact_hybrid.py [--skip-st] [--tag NAME] [--env KEY=VALUE ...]

The long-document rows use bench/scifact_long (made by bench/make_longdoc.py when missing).
`--env DROPOUT=0` (or EPOCHS=2, HARD_NEGATIVES=1, PASSAGES=first) runs an ablation of the recipe: the
workflow reads those variables. Prints a markdown table and writes it to /tmp/scifact_hybrid_<tag>.md.
"""
import argparse
import json
import os
import sqlite3
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "bench")
WF = os.path.join(BENCH, "scifact_hybrid.yaml")
DB = os.path.join(BENCH, "scifact.db")
FLOW = os.path.join(ROOT, "target", "release", "flow")
ST_OUT = "/tmp/flow-bench-st-model"

TRAIN = ["train_aug", "train_mafin", "train_mafin_w05"]
EVAL = ["eval_aug", "eval_aug_rrf", "eval_mafin", "eval_mafin_rrf", "eval_mafin_w05", "eval_bb", "eval_bb_rrf", "eval_st",
        "eval_long_first", "eval_long_maxp"]
# (stage, retriever) -> row label, in table order.
ROWS = [
    ("eval_aug", "bm25", "bm25"),
    ("eval_aug", "black_box", "black_box (frozen all-MiniLM-L6-v2)"),
    ("eval_aug", "augment_only", "augment_only"),
    ("eval_mafin_w05", "mafin", "mafin, w = 0.5"),
    ("eval_mafin", "mafin", "mafin, w auto"),
    ("eval_bb", "hybrid", "hybrid: bm25 + black_box, convex (alpha on validation)"),
    ("eval_bb_rrf", "hybrid", "hybrid: bm25 + black_box, rrf"),
    ("eval_aug", "hybrid", "hybrid: bm25 + augment_only, convex (alpha on validation)"),
    ("eval_aug_rrf", "hybrid", "hybrid: bm25 + augment_only, rrf"),
    ("eval_mafin_w05", "hybrid", "hybrid: bm25 + mafin w 0.5, convex (alpha on validation)"),
    ("eval_mafin", "hybrid", "hybrid: bm25 + mafin w auto, convex (alpha on validation)"),
    ("eval_mafin_rrf", "hybrid", "hybrid: bm25 + mafin w auto, rrf"),
    ("eval_st", "black_box", "sentence-transformers MNRL fine-tune (scored by flow)"),
    ("eval_long_maxp", "bm25", "long documents: bm25 (whole document)"),
    ("eval_long_first", "black_box", "long documents: black_box, first window"),
    ("eval_long_maxp", "black_box", "long documents: black_box, MaxP"),
    ("eval_long_first", "mafin", "long documents: mafin w auto, first window"),
    ("eval_long_maxp", "mafin", "long documents: mafin w auto, MaxP"),
    ("eval_long_first", "hybrid", "long documents: hybrid bm25 + mafin, first window"),
    ("eval_long_maxp", "hybrid", "long documents: hybrid bm25 + mafin, MaxP"),
]


def train_st():
    """sentence-transformers' MNRL fine-tune with the settings flow trains with (bench/train_throughput.py)."""
    sys.path.insert(0, BENCH)
    import train_throughput as tt

    corpus, queries, train, _ = tt.load()
    model, info = tt.train_st(corpus, queries, train)
    model.save(ST_OUT)
    return info


def run_stage(stage, env, force):
    t = time.time()
    r = subprocess.run([FLOW, "run", WF, "--only", stage, "-q"] + (["--force", stage] if force else []), cwd=BENCH, env=env,
                       capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"flow run --only {stage} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
    return round(time.time() - t, 1)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--skip-st", action="store_true", help="reuse the fine-tune an earlier run left in " + ST_OUT)
    ap.add_argument("--tag", default="default")
    ap.add_argument("--env", action="append", default=[])
    ap.add_argument("--only-train", nargs="*", help="train only these stages (default: all)")
    ap.add_argument("--only-eval", nargs="*", help="evaluate only these stages (default: all)")
    ap.add_argument("--force", action="store_true", help="run every stage again, even if up to date")
    args = ap.parse_args()
    env = dict(os.environ, ST_MODEL=ST_OUT)
    for kv in args.env:
        k, v = kv.split("=", 1)
        env[k] = v
    times = {}
    if not os.path.exists(os.path.join(BENCH, "scifact_long", "corpus.jsonl")):
        subprocess.run([sys.executable, os.path.join(BENCH, "make_longdoc.py")], check=True)
    if not args.skip_st:
        info = train_st()
        times["st_train"] = info["seconds"]
    elif not os.path.exists(os.path.join(ST_OUT, "modules.json")):
        sys.exit(f"--skip-st needs an earlier fine-tune in {ST_OUT}")
    for stage in args.only_train if args.only_train is not None else TRAIN:
        times[stage] = run_stage(stage, env, args.force)
        print(f"{stage}: {times[stage]} s", file=sys.stderr)
    for stage in args.only_eval if args.only_eval is not None else EVAL:
        times[stage] = run_stage(stage, env, args.force)
        print(f"{stage}: {times[stage]} s", file=sys.stderr)

    con = sqlite3.connect(DB)
    out = ["| retriever | nDCG@10 | Recall@10 | Recall@100 | model | alpha / w |", "|---|---|---|---|---|---|"]
    for stage, retriever, label in ROWS:
        row = con.execute(
            "SELECT e.metrics, e.model_id, s.summary FROM eval_results e JOIN stage_runs s ON s.id = e.stage_run_id "
            "WHERE e.stage = ? AND e.retriever = ? ORDER BY e.id DESC LIMIT 1", (stage, retriever)).fetchone()
        if row is None:
            out.append(f"| {label} | - | - | - | | |")
            continue
        m, model_id, summary = json.loads(row[0]), row[1], json.loads(row[2])
        chosen = (summary.get("retrievers", {}).get(retriever) or {}).get("hybrid") or {}
        note = ""
        if chosen.get("alpha") is not None:
            note = f"alpha {chosen['alpha']:.2f}"
        if model_id is not None:
            w, = con.execute("SELECT weight FROM models WHERE id = ?", (model_id,)).fetchone()
            if "mafin" in label:
                note = (note + ", " if note else "") + f"w {w:.1f}"
        out.append(f"| {label} | {m['ndcg@10']:.4f} | {m['recall@10']:.4f} | {m['recall@100']:.4f} | "
                   f"{model_id if model_id is not None else ''} | {note} |")
    table = "\n".join(out)
    text = f"tag {args.tag}, env {args.env}\n\n{table}\n\nseconds per stage: {json.dumps(times)}\n"
    with open(f"/tmp/scifact_hybrid_{args.tag}.md", "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
