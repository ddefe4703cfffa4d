#!/usr/bin/env python3
"""The data the GPU runs carry (issue 17): SciFact's abstracts as (title, abstract) training pairs in
BEIR form (the pairs flow's train stage and sentence-transformers' MNRL both learn from) and the
abstracts as plain texts for the embedding benchmark.

    python3 bench/gpu/make_data.py ../shared/data/scifact OUT_DIR
"""
import json
import os
import sys

src, out = sys.argv[1], sys.argv[2]
docs = [json.loads(line) for line in open(os.path.join(src, "corpus.jsonl"), encoding="utf-8")]
docs = [d for d in docs if d.get("title", "").strip() and d.get("text", "").strip()]


def beir(folder, docs):
    os.makedirs(os.path.join(out, folder, "qrels"), exist_ok=True)
    with open(os.path.join(out, folder, "corpus.jsonl"), "w", encoding="utf-8") as c, open(
        os.path.join(out, folder, "queries.jsonl"), "w", encoding="utf-8"
    ) as q, open(os.path.join(out, folder, "qrels", "train.tsv"), "w", encoding="utf-8") as r:
        r.write("query-id\tcorpus-id\tscore\n")
        for d in docs:
            c.write(json.dumps({"_id": d["_id"], "title": "", "text": d["text"]}) + "\n")
            q.write(json.dumps({"_id": "q" + d["_id"], "text": d["title"]}) + "\n")
            r.write(f"q{d['_id']}\t{d['_id']}\t1\n")


# All of them; and 660, which a 2% validation split leaves at 20 steps of 32.
beir("pairs", docs)
beir("pairs_20", docs[:660])
with open(os.path.join(out, "texts.txt"), "w", encoding="utf-8") as t:
    for d in docs:
        t.write(" ".join(d["text"].split()) + "\n")
print(f"{len(docs)} pairs and texts in {out}")
