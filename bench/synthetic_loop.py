#!/usr/bin/env python3
"""The label-free loop on any BEIR folder (issue 28): chunk its corpus, have the local model write
queries (of several kinds) for a sample of chunks, judge them, train mafin beside each black box on
the accepted pairs alone (and, with --reranker, a reranker over the black box's hybrid), and score
bm25, black_box, mafin, the hybrid and the reranker on the folder's human test queries (never seen by generation or training). Writes one table (markdown, and JSON beside it).

    cargo build --release && target/release/flow models pull all-mpnet-base-v2   # for that black box
    python3 bench/synthetic_loop.py BEIR_FOLDER [--sample 2000] [--kinds question,claim] [--reranker]
        [--black-boxes all-MiniLM-L6-v2,all-mpnet-base-v2] [--llm qwen2.5-coder-0.5b-instruct]
        [--domain "biomedical research abstracts"] [--work DIR] [--split test]

The folder needs corpus.jsonl (`_id`, `title`, `text`), queries.jsonl and qrels/<split>.tsv, as BEIR
ships them; nothing else about it is assumed. Everything runs as one flow workflow in `--work`
(default /tmp/flow-loop-<folder name>), so it resumes where it stopped when run again with the same
options (each finished stage is skipped, each paid or computed answer is reused); flow prints a
progress line per stage. A changed option is a changed stage setting: that stage and those after it
run again.
"""
import argparse
import json
import os
import sqlite3
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLOW = os.path.join(ROOT, "target", "release", "flow")


def workflow(args, beir):
    kinds = ", ".join(f"{k}: 1" for k in args.kinds.split(","))
    keys = {bb: "bb_" + "".join(c if c.isalnum() else "_" for c in bb) for bb in args.black_boxes.split(",")}
    lines = [
        "# Written by bench/synthetic_loop.py: the label-free loop on " + beir,
        "name: synthetic-loop",
        "store: loop.db",
        "models:",
        f'  llm: {{ provider: local, model: "{args.llm}" }}',
        f'  augment: {{ init: all-MiniLM-L6-v2, max_seq_length: {args.max_seq_length} }}',
    ]
    for bb, key in keys.items():
        lines.append(f'  {key}: {{ provider: local, model: "{bb}", max_seq_length: {args.max_seq_length} }}')
    lines += [
        "stages:",
        "  chunk:",
        "    kind: chunk",
        f'    corpus: ["{beir}/corpus.jsonl"]',
        "    jsonl: { id: _id, title: title, text: text }",
        "  generate:",
        "    kind: generate",
        "    needs: chunk",
        f"    sample: {args.sample}",
        f"    kinds: {{ {kinds} }}",
        f'    domain: "{args.domain}"',
        "    temperature: 0",
        "    max_tokens: 96",
        f"    max_failures: {args.max_failures}",
        "  judge:",
        "    kind: judge",
        "    needs: generate",
        f'    domain: "{args.domain}"',
        "    max_tokens: 64",
        f"    min_score: {args.min_score}",
        "    max_failures: 0.1",
    ]
    for key in keys.values():
        # What the synthetic pairs buy without training: the black box's hybrid with its alpha chosen
        # on the accepted pairs (label-free), and by RRF (no alpha at all).
        for stage, fusion in ((f"fuse_{key}", "convex"), (f"rrf_{key}", "rrf")):
            lines += [
                f"  {stage}:",
                "    kind: eval_recall",
                "    needs: [judge]",
                f"    black_box: {key}",
                f'    eval_set: {{ beir: "{beir}", split: {args.split} }}',
                "    promote: false",
                "    retrievers: [hybrid]",
                f"    hybrid: {{ dense: black_box, fusion: {fusion} }}",
            ]
        lines += [
            f"  train_{key}:",
            "    kind: train",
            "    needs: judge",
            "    retriever: mafin",
            f"    black_box: {key}",
            f"    epochs: {args.epochs}",
            f"  eval_{key}:",
            "    kind: eval_recall",
            f"    needs: train_{key}",
            f"    black_box: {key}",
            f'    eval_set: {{ beir: "{beir}", split: {args.split} }}',
            "    promote: false",
            "    retrievers: [bm25, black_box, mafin, hybrid]",
            "    hybrid: { dense: mafin }",
        ]
        if args.reranker:
            # The reranker from the same accepted pairs, over the black box's hybrid (issue 29).
            lines += [
                f"  rerank_{key}:",
                "    kind: train",
                "    needs: judge",
                "    retriever: reranker",
                f"    black_box: {key}",
                f"    epochs: {args.reranker_epochs}",
                "    batch_size: 4",
                "    lr: 7.0e-5",
                f"  eval_rerank_{key}:",
                "    kind: eval_recall",
                f"    needs: rerank_{key}",
                f"    black_box: {key}",
                f'    eval_set: {{ beir: "{beir}", split: {args.split} }}',
                "    promote: false",
                "    retrievers: [hybrid, rerank]",
                "    hybrid: { dense: black_box }",
                f"  eval_rerank_mafin_{key}:",
                "    kind: eval_recall",
                f"    needs: [train_{key}, rerank_{key}]",
                f"    black_box: {key}",
                f'    eval_set: {{ beir: "{beir}", split: {args.split} }}',
                "    promote: false",
                "    retrievers: [rerank]",
                "    hybrid: { dense: mafin }",
            ]
    return "\n".join(lines) + "\n", keys


def table(db, keys, args, beir, wall):
    con = sqlite3.connect(db)
    chunks = con.execute("SELECT COUNT(*) FROM chunks").fetchone()[0]
    by_kind = dict(con.execute("SELECT kind, COUNT(*) FROM queries GROUP BY kind").fetchall())
    kept = con.execute("SELECT COUNT(*) FROM queries WHERE status = 'kept'").fetchone()[0]
    accepted = con.execute("SELECT COUNT(*) FROM judgments WHERE verdict = 'accepted'").fetchone()[0]
    judged = con.execute("SELECT COUNT(*) FROM judgments").fetchone()[0]
    rows = []
    for bb, key in keys.items():
        for retriever, metrics in latest_metrics(con, f"eval_{key}").items():
            name = "hybrid: bm25 + mafin" if retriever == "hybrid" else retriever
            rows.append({"black_box": bb, "retriever": name, **metrics})
        for retriever, metrics in latest_metrics(con, f"eval_rerank_{key}").items():
            name = {"hybrid": "hybrid: bm25 + black_box, alpha from the reranker's validation",
                    "rerank": "rerank over that hybrid"}.get(retriever, retriever)
            rows.append({"black_box": bb, "retriever": name, **metrics})
        for _, metrics in latest_metrics(con, f"eval_rerank_mafin_{key}").items():
            rows.append({"black_box": bb, "retriever": "rerank over hybrid: bm25 + mafin", **metrics})
        for stage, name in ((f"fuse_{key}", "hybrid: bm25 + black_box, alpha from the accepted pairs (no training)"),
                            (f"rrf_{key}", "hybrid: bm25 + black_box, rrf (no training)")):
            for _, metrics in latest_metrics(con, stage).items():
                rows.append({"black_box": bb, "retriever": name, **metrics})
    out = {"beir": beir, "sample": args.sample, "kinds": args.kinds, "llm": args.llm, "chunks": chunks,
           "queries_by_kind": by_kind, "kept": kept, "judged": judged, "accepted": accepted,
           "wall_s_this_run": round(wall), "rows": rows}
    md = [f"Label-free loop on `{beir}` ({args.split} queries, human labels): {args.llm} wrote "
          f"{sum(by_kind.values())} queries ({', '.join(f'{k} {v}' for k, v in sorted(by_kind.items()))}) "
          f"for a sample of {args.sample} of {chunks} chunks and kept {kept} (the rest were dropped by "
          f"generate's filters: `flow pairs` says why); the judge accepted {accepted} of {judged}.",
          "", "| black box | retriever | nDCG@10 | Recall@10 | Recall@100 | MRR@10 |", "|---|---|---:|---:|---:|---:|"]
    for r in rows:
        md.append(f"| {r['black_box']} | {r['retriever']} | {r.get('ndcg@10', float('nan')):.4f} | "
                  f"{r.get('recall@10', float('nan')):.4f} | {r.get('recall@100', float('nan')):.4f} | "
                  f"{r.get('mrr@10', float('nan')):.4f} |")
    return out, "\n".join(md)


def latest_metrics(con, stage):
    """{retriever: {metric: value}} from the stage's last run."""
    rows = con.execute("SELECT retriever, metrics FROM eval_results WHERE stage = ? ORDER BY id", (stage,)).fetchall()
    return {retriever: json.loads(metrics) for retriever, metrics in rows}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("beir", help="a BEIR folder: corpus.jsonl, queries.jsonl, qrels/<split>.tsv")
    ap.add_argument("--sample", type=int, default=2000, help="chunks asked for queries (drawn by a hash of their text)")
    ap.add_argument("--kinds", default="question,claim", help="query kinds, one query of each per chunk")
    ap.add_argument("--black-boxes", default="all-MiniLM-L6-v2,all-mpnet-base-v2")
    ap.add_argument("--llm", default="qwen2.5-coder-0.5b-instruct")
    ap.add_argument("--domain", default="the documents of this collection")
    ap.add_argument("--split", default="test")
    # The 0.5B copies its passage or repeats itself past 96 tokens in about a fifth of its answers on
    # SciFact: those chunks fail (nothing unusable is kept), and the loop goes on with the rest.
    ap.add_argument("--max-failures", type=float, default=0.25, help="share of chunks generate may fail")
    # The local 0.5B judge's best threshold on SciFact's train queries (bench/judge_auc.rs), as in
    # workflows/finance.yaml; the stage's own default, 4, suits an API judge.
    ap.add_argument("--min-score", type=float, default=3.5, help="the judge's acceptance threshold")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--reranker", action="store_true", help="also train a reranker beside each black box")
    ap.add_argument("--reranker-epochs", type=int, default=2)
    ap.add_argument("--max-seq-length", type=int, default=256)
    ap.add_argument("--work", help="where the workflow and its store live (default /tmp/flow-loop-<folder>)")
    args = ap.parse_args()
    beir = os.path.abspath(args.beir)
    for need in ("corpus.jsonl", "queries.jsonl", f"qrels/{args.split}.tsv"):
        if not os.path.exists(os.path.join(beir, need)):
            sys.exit(f"{beir} is not a BEIR folder: {need} is missing")
    work = args.work or f"/tmp/flow-loop-{os.path.basename(beir.rstrip('/'))}"
    os.makedirs(work, exist_ok=True)
    text, keys = workflow(args, beir)
    wf = os.path.join(work, "loop.yaml")
    with open(wf, "w") as f:
        f.write(text)
    print(f"workflow: {wf}", file=sys.stderr)
    t = time.time()
    r = subprocess.run([FLOW, "run", wf], cwd=work)
    if r.returncode != 0:
        sys.exit(f"flow run failed (exit {r.returncode}); run this script again to resume")
    out, md = table(os.path.join(work, "loop.db"), keys, args, beir, time.time() - t)
    with open(os.path.join(work, "table.json"), "w") as f:
        json.dump(out, f, indent=1)
    with open(os.path.join(work, "table.md"), "w") as f:
        f.write(md + "\n")
    print(md)


if __name__ == "__main__":
    main()
