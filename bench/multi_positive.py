#!/usr/bin/env python3
"""A BEIR folder made to look like a multi-positive set (issue 28 item 6): every document is split into
passages of a few sentences, and each query's relevant set becomes every passage of its relevant
documents. Training is given one labelled positive per query (like the held-out medical set, where a
query has about 40 relevant documents and training saw one); the test qrels keep them all.

    python3 bench/multi_positive.py BEIR_FOLDER OUT_FOLDER [--sentences 3]
    BEIR=OUT_FOLDER BLACK_BOX=all-MiniLM-L6-v2 STORE=/tmp/multi.db target/release/flow run bench/scifact_mpnet.yaml

Writes OUT_FOLDER/corpus.jsonl (passage ids `<doc>#<n>`, the document's title on each passage),
queries.jsonl (copied), qrels/train.tsv (one passage per train query: the one a hash of the query
picks among the passages of its first relevant document), qrels/train_all.tsv (every relevant
passage of the train queries, for the complete-labels contrast) and qrels/test.tsv (every relevant
passage of the test queries). Nothing about the folder is assumed beyond BEIR's layout.
"""
import argparse
import hashlib
import json
import os
import re
import shutil

SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9(\[])")


def passages(text, per):
    sentences = [s for s in SENTENCE_END.split(text.strip()) if s.strip()]
    return [" ".join(sentences[i:i + per]) for i in range(0, len(sentences), per)] or [text]


def read_qrels(path):
    out = {}
    with open(path) as f:
        for i, line in enumerate(f):
            parts = line.rstrip("\n").split("\t")
            if i == 0 and not parts[-1].lstrip("-").isdigit():
                continue
            q, d, s = parts[0], parts[1], int(parts[2])
            if s > 0:
                out.setdefault(q, []).append(d)
    return out


def write_qrels(path, rows):
    with open(path, "w") as f:
        f.write("query-id\tcorpus-id\tscore\n")
        for q, d in rows:
            f.write(f"{q}\t{d}\t1\n")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("beir")
    ap.add_argument("out")
    ap.add_argument("--sentences", type=int, default=3, help="sentences a passage holds")
    args = ap.parse_args()
    os.makedirs(os.path.join(args.out, "qrels"), exist_ok=True)
    parts = {}
    with open(os.path.join(args.beir, "corpus.jsonl")) as f, open(os.path.join(args.out, "corpus.jsonl"), "w") as out:
        for line in f:
            if not line.strip():
                continue
            d = json.loads(line)
            ids = []
            for n, p in enumerate(passages(d.get("text", ""), args.sentences)):
                pid = f"{d['_id']}#{n}"
                ids.append(pid)
                out.write(json.dumps({"_id": pid, "title": d.get("title", ""), "text": p}) + "\n")
            parts[d["_id"]] = ids
    shutil.copy(os.path.join(args.beir, "queries.jsonl"), os.path.join(args.out, "queries.jsonl"))
    stats = {}
    for split in ("train", "test"):
        path = os.path.join(args.beir, "qrels", f"{split}.tsv")
        if not os.path.exists(path):
            continue
        qrels = read_qrels(path)
        every = [(q, p) for q, docs in qrels.items() for d in docs for p in parts.get(d, [])]
        if split == "test":
            write_qrels(os.path.join(args.out, "qrels", "test.tsv"), every)
        else:
            write_qrels(os.path.join(args.out, "qrels", "train_all.tsv"), every)
            one = []
            for q, docs in qrels.items():
                ps = parts.get(docs[0], [])
                if ps:
                    h = int(hashlib.sha256(q.encode()).hexdigest()[:8], 16)
                    one.append((q, ps[h % len(ps)]))
            write_qrels(os.path.join(args.out, "qrels", "train.tsv"), one)
        stats[split] = {"queries": len(qrels), "relevant passages per query": round(len(every) / max(len(qrels), 1), 2)}
    n = sum(len(v) for v in parts.values())
    print(json.dumps({"documents": len(parts), "passages": n, **stats}, indent=1))


if __name__ == "__main__":
    main()
