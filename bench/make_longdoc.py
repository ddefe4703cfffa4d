#!/usr/bin/env python3
"""A long-document retrieval set from SciFact (issue 13): the 5,183 abstracts, shuffled with a fixed
seed, joined into documents of 600 to 1,500 all-MiniLM-L6-v2 tokens; the 300 test queries, each
relevant to the documents that hold one of its relevant abstracts. Written as a BEIR folder.

    /tmp/stvenv/bin/python bench/make_longdoc.py [OUT]     # default bench/scifact_long
"""
import json
import os
import random
import sys

from tokenizers import Tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCIFACT = os.path.join(ROOT, "..", "shared", "data", "scifact")
TOKENIZER = os.path.expanduser(os.environ.get("FLOW_MODELS", "~/.cache/flow/models")) + "/all-MiniLM-L6-v2/tokenizer.json"


def main():
    out = sys.argv[1] if len(sys.argv) > 1 else os.path.join(ROOT, "bench", "scifact_long")
    tok = Tokenizer.from_file(TOKENIZER)
    tok.no_truncation()
    tok.no_padding()
    docs = [json.loads(l) for l in open(os.path.join(SCIFACT, "corpus.jsonl")) if l.strip()]
    random.Random(13).shuffle(docs)
    texts = [(d["_id"], (d.get("title", "") + " " + d.get("text", "")).strip()) for d in docs]
    lengths = [len(e.ids) for e in tok.encode_batch([t for _, t in texts], add_special_tokens=False)]
    groups, cur, cur_len = [], [], 0
    # Abstracts are added until a document reaches 600 tokens; one that would take it past 1,500 waits
    # for the next document.
    pending = list(zip(texts, lengths))
    while pending:
        item = pending.pop(0)
        if cur and cur_len + item[1] > 1500:
            k = next((j for j, p in enumerate(pending) if cur_len + p[1] <= 1500), None)
            if k is None:
                pending.insert(0, item)
                groups.append(cur)
                cur, cur_len = [], 0
                continue
            pending.insert(0, item)
            item = pending.pop(k + 1)
        cur.append(item[0])
        cur_len += item[1]
        if cur_len >= 600:
            groups.append(cur)
            cur, cur_len = [], 0
    if cur:
        groups[-1].extend(cur)
    where = {}
    os.makedirs(os.path.join(out, "qrels"), exist_ok=True)
    with open(os.path.join(out, "corpus.jsonl"), "w") as f:
        for g, members in enumerate(groups):
            for i, _ in members:
                where[i] = f"long{g}"
            f.write(json.dumps({"_id": f"long{g}", "title": "", "text": "\n\n".join(t for _, t in members)}) + "\n")
    rel = {}
    with open(os.path.join(SCIFACT, "qrels", "test.tsv")) as f:
        next(f)
        for line in f:
            q, d, s = line.rstrip("\n").split("\t")
            if int(s) > 0:
                rel.setdefault(q, set()).add(where[d])
    with open(os.path.join(out, "qrels", "test.tsv"), "w") as f:
        f.write("query-id\tcorpus-id\tscore\n")
        for q in sorted(rel):
            for d in sorted(rel[q]):
                f.write(f"{q}\t{d}\t1\n")
    queries = {json.loads(l)["_id"]: l for l in open(os.path.join(SCIFACT, "queries.jsonl")) if l.strip()}
    with open(os.path.join(out, "queries.jsonl"), "w") as f:
        for q in sorted(rel):
            f.write(queries[q] if queries[q].endswith("\n") else queries[q] + "\n")
    sizes = [len(e.ids) for e in tok.encode_batch(["\n\n".join(t for _, t in g) for g in groups], add_special_tokens=False)]
    print(json.dumps({"documents": len(groups), "queries": len(rel), "tokens_min": min(sizes),
                      "tokens_median": sorted(sizes)[len(sizes) // 2], "tokens_max": max(sizes)}))


if __name__ == "__main__":
    main()
