#!/usr/bin/env python3
"""Training benchmark (issue 5): flow's train stage against sentence-transformers
MultipleNegativesRankingLoss on PyTorch CPU, same machine, same run, same settings:
SciFact train qrels, all-MiniLM-L6-v2, batch 32, max_seq_length 256, 1 epoch, lr 2e-5, warm-up 10%,
no-duplicates batches; sentence-transformers in f32 and under bf16 autocast (`bf16=True`), flow with
`precision: f32` and `precision: auto` (bf16 products on AMX where the CPU has it). Then, on the 300 SciFact test queries over the 5,183 abstracts, Recall@10 and
nDCG@10 of the frozen model, flow's augment_only and mafin models, and sentence-transformers' own
fine-tuned model; and the max difference between flow's and sentence-transformers' vectors of a flow
checkpoint loaded with SentenceTransformer(path).

    cargo build --release --example embed && cargo build --release
    python3 -m venv /tmp/stvenv && /tmp/stvenv/bin/pip install sentence-transformers datasets accelerate
    /tmp/stvenv/bin/python bench/train_throughput.py [--skip-st] [--skip-flow] [--epochs 1] [--skip-eval]

`--epochs 4` gives about 108 steps: flow's loss curves of f32 and auto are then compared step by step
(mean and largest relative difference of the per-step loss, and of its 10-step running mean).

flow's runs are timed by the stage itself (pairs/s over the training loop) and by wall clock; peak RSS
of flow comes from /usr/bin/time, of sentence-transformers from this process (VmHWM) before flow runs.
"""
import argparse
import json
import os
import sqlite3
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCIFACT = os.path.join(ROOT, "..", "shared", "data", "scifact")
MODEL = os.path.expanduser(os.environ.get("FLOW_MODELS", "~/.cache/flow/models")) + "/all-MiniLM-L6-v2"
WF = os.path.join(ROOT, "bench", "scifact_train.yaml")
DB = os.path.join(ROOT, "bench", "scifact.db")


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def load():
    corpus = {d["_id"]: (d.get("title", "") + " " + d.get("text", "")).strip() for d in read_jsonl(f"{SCIFACT}/corpus.jsonl")}
    queries = {q["_id"]: q["text"] for q in read_jsonl(f"{SCIFACT}/queries.jsonl")}

    def qrels(split):
        out = {}
        with open(f"{SCIFACT}/qrels/{split}.tsv") as f:
            next(f)
            for line in f:
                q, d, s = line.rstrip("\n").split("\t")
                if int(s) > 0:
                    out.setdefault(q, set()).add(d)
        return out

    return corpus, queries, qrels("train"), qrels("test")


def peak_rss_mb():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024


def metrics(q_emb, d_emb, doc_ids, test, query_ids):
    """Recall@10 and nDCG@10 as sentence-transformers' InformationRetrievalEvaluator defines them."""
    scores = q_emb @ d_emb.T
    rec, ndcg = [], []
    for i, qid in enumerate(query_ids):
        rel = test[qid]
        top = np.argsort(-scores[i])[:10]
        hits = [doc_ids[j] in rel for j in top]
        rec.append(sum(hits) / len(rel))
        dcg = sum(1 / np.log2(r + 2) for r, h in enumerate(hits) if h)
        idcg = sum(1 / np.log2(r + 2) for r in range(min(len(rel), 10)))
        ndcg.append(dcg / idcg)
    return {"recall@10": round(float(np.mean(rec)), 4), "ndcg@10": round(float(np.mean(ndcg)), 4)}


def train_st(corpus, queries, train, bf16=False, epochs=1):
    from datasets import Dataset
    from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer, SentenceTransformerTrainingArguments
    from sentence_transformers.losses import MultipleNegativesRankingLoss
    from sentence_transformers.training_args import BatchSamplers

    model = SentenceTransformer(MODEL, device="cpu")
    model.max_seq_length = 256
    pairs = [(queries[q], corpus[d]) for q, ds in train.items() for d in sorted(ds)]
    ds = Dataset.from_dict({"anchor": [p[0] for p in pairs], "positive": [p[1] for p in pairs]})
    out = "/tmp/flow-bench-st-model" + ("-bf16" if bf16 else "")
    args = SentenceTransformerTrainingArguments(
        output_dir=out, num_train_epochs=epochs, bf16=bf16, per_device_train_batch_size=32, learning_rate=2e-5,
        warmup_ratio=0.1, weight_decay=0.01, max_grad_norm=1.0, batch_sampler=BatchSamplers.NO_DUPLICATES,
        save_strategy="no", logging_steps=5, report_to=[], seed=42, use_cpu=True, dataloader_num_workers=0,
    )
    trainer = SentenceTransformerTrainer(model=model, args=args, train_dataset=ds, loss=MultipleNegativesRankingLoss(model))
    t = time.time()
    trainer.train()
    secs = time.time() - t
    model.save(out)
    return model, {"pairs": len(pairs) * epochs, "seconds": round(secs, 1), "pairs_per_s": round(len(pairs) * epochs / secs, 2),
                   "peak_rss_mb": round(peak_rss_mb(), 0)}


def run_flow(retriever, precision="auto", epochs=1):
    import shutil
    # A finished training with the same data and settings would be reused, not redone.
    shutil.rmtree(os.path.join(ROOT, "bench", "scifact.models", "train"), ignore_errors=True)
    env = dict(os.environ, RETRIEVER=retriever, PRECISION=precision, EPOCHS=str(epochs))
    t = time.time()
    r = subprocess.run(["/usr/bin/time", "-f", "%M", os.path.join(ROOT, "target/release/flow"), "run", WF, "--force", "train"],
                       env=env, capture_output=True, text=True)
    wall = time.time() - t
    if r.returncode != 0:
        sys.exit(f"flow failed:\n{r.stderr}")
    rss_kb = int(r.stderr.strip().splitlines()[-1])
    con = sqlite3.connect(DB)
    run_id, summary = con.execute("SELECT id, summary FROM stage_runs WHERE stage = 'train' ORDER BY id DESC LIMIT 1").fetchone()
    s = json.loads(summary)
    s["loss_curve"] = [v for (v,) in con.execute(
        "SELECT value FROM train_curves WHERE stage_run_id = ? AND kind = 'loss' ORDER BY step", (run_id,))]
    # The next run clears the models folder: keep this checkpoint for the evaluation.
    keep = f"/tmp/flow-bench-{retriever}" + ("" if precision == "auto" else f"-{precision}")
    shutil.rmtree(keep, ignore_errors=True)
    shutil.copytree(s["path"], keep)
    s["path"] = keep
    return s, {"pairs": s["train_pairs"], "wall_seconds": round(wall, 1), "pairs_per_s": round(s["pairs_per_s"], 2),
               "stage_seconds": round(s["wall_seconds"], 1), "validation_recall@10": s["validation"].get("recall@10"),
               "peak_rss_mb": round(rss_kb / 1024, 0), "precision": precision,
               "log": [l for l in r.stderr.splitlines() if "precision" in l][:1]}


def compare_curves(a, b):
    """Relative differences of curve b from curve a, step by step and as 10-step running means."""
    n = min(len(a), len(b))
    a, b = np.array(a[:n]), np.array(b[:n])
    # A last batch of one pair has nothing to rank against: its loss is 0 in both runs.
    keep = a != 0
    a, b, n = a[keep], b[keep], int(keep.sum())
    rel = np.abs(b - a) / np.abs(a)
    run = lambda x: np.convolve(x, np.ones(10) / 10, mode="valid")
    rel10 = np.abs(run(b) - run(a)) / np.abs(run(a)) if n >= 10 else rel
    return {"steps": int(n), "mean_rel_diff": round(float(rel.mean()), 4), "max_rel_diff": round(float(rel.max()), 4),
            "max_rel_diff_10_step_mean": round(float(rel10.max()), 4),
            "final_loss": [round(float(a[-1]), 4), round(float(b[-1]), 4)]}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--skip-st", action="store_true")
    ap.add_argument("--skip-flow", action="store_true")
    ap.add_argument("--skip-eval", action="store_true", help="speed and loss curves only")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--st-epochs", type=int, default=1, help="sentence-transformers' epochs (its speed per pair does not depend on them)")
    ap.add_argument("--retrievers", default="augment_only,mafin")
    ap.add_argument("--eval-only", action="store_true",
                    help="no training: evaluate the checkpoints an earlier run left in /tmp/flow-bench-*")
    args = ap.parse_args()
    corpus, queries, train, test = load()
    result = {}
    from sentence_transformers import SentenceTransformer

    st_model = None
    if args.eval_only:
        args.skip_st = args.skip_flow = True
        if os.path.exists("/tmp/flow-bench-st-model/modules.json"):
            st_model = SentenceTransformer("/tmp/flow-bench-st-model", device="cpu")
    if not args.skip_st:
        _, result["sentence_transformers_bf16_autocast"] = train_st(corpus, queries, train, bf16=True, epochs=args.st_epochs)
        print(json.dumps(result, indent=2), file=sys.stderr)
        st_model, result["sentence_transformers"] = train_st(corpus, queries, train, epochs=args.st_epochs)
        print(json.dumps(result, indent=2), file=sys.stderr)
    flow_models = {}
    if args.eval_only:
        flow_models = {r: f"/tmp/flow-bench-{r}" for r in ["augment_only", "mafin"]
                       if os.path.exists(f"/tmp/flow-bench-{r}/model.safetensors")}
    if not args.skip_flow:
        for retriever in args.retrievers.split(","):
            curves = {}
            for precision in ["f32", "auto"]:
                summary, row = run_flow(retriever, precision, args.epochs)
                curves[precision] = summary["loss_curve"]
                result[f"flow_{retriever}" + ("" if precision == "auto" else "_f32")] = row
                if precision == "auto":
                    flow_models[retriever] = summary["path"]
                else:
                    flow_models[retriever + "_f32"] = summary["path"]
                print(json.dumps(result, indent=2), file=sys.stderr)
            result[f"flow_{retriever}_loss_auto_vs_f32"] = compare_curves(curves["f32"], curves["auto"])
    if args.skip_eval:
        print(json.dumps(result, indent=2))
        return

    # Test-set retrieval: every abstract, the 300 test queries.
    doc_ids = list(corpus)
    docs = [corpus[d] for d in doc_ids]
    qids = sorted(test)
    qtexts = [queries[q] for q in qids]

    def encode(model_path_or_model, texts):
        m = model_path_or_model if not isinstance(model_path_or_model, str) else SentenceTransformer(model_path_or_model, device="cpu")
        m.max_seq_length = 256
        return m.encode(texts, batch_size=32, normalize_embeddings=True, convert_to_numpy=True)

    frozen_q, frozen_d = encode(MODEL, qtexts), encode(MODEL, docs)
    evals = {"frozen": metrics(frozen_q, frozen_d, doc_ids, test, qids)}
    if st_model is not None:
        evals["st_finetuned"] = metrics(encode(st_model, qtexts), encode(st_model, docs), doc_ids, test, qids)
    for retriever, path in flow_models.items():
        aq, ad = encode(path, qtexts), encode(path, docs)
        evals[f"flow_{retriever}"] = metrics(aq, ad, doc_ids, test, qids)
        if retriever.startswith("mafin"):
            w = 0.5
            cat = lambda b, a: np.concatenate([b, w * a], axis=1) / np.sqrt(1 + w * w)
            evals[f"flow_{retriever}"] = metrics(cat(frozen_q, aq), cat(frozen_d, ad), doc_ids, test, qids)
            evals[f"flow_{retriever}_augment_alone"] = metrics(aq, ad, doc_ids, test, qids)
            # The checkpoint through SentenceTransformer(path) against flow's own encoder.
            sample = docs[:64]
            st_vecs = SentenceTransformer(path, device="cpu").encode(sample, batch_size=32, convert_to_numpy=True)
            tmp_in, tmp_out = "/tmp/flow-bench-texts.json", "/tmp/flow-bench-vecs.f32"
            with open(tmp_in, "w") as f:
                json.dump(sample, f)
            subprocess.run([os.path.join(ROOT, "target/release/examples/embed"), tmp_in, tmp_out, "--model", path, "--precision", "f32"],
                           check=True, capture_output=True)
            flow_vecs = np.fromfile(tmp_out, dtype="<f4").reshape(len(sample), -1)
            result["checkpoint_max_abs_diff_vs_sentence_transformers"] = float(np.abs(flow_vecs - st_vecs).max())
    result["test_retrieval"] = evals
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
