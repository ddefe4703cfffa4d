#!/usr/bin/env python3
"""flow serve under load against flow embed offline, on the same texts (issue 15).

16 concurrent clients send requests of 1-8 texts each (sizes drawn from a seeded generator) to
`flow serve` with the default workflow's MiniLM-based mafin; the same texts go through `flow embed`.
Each side starts from its own copy of the store, so neither finds the other's vectors in the cache.
Reports throughput, p50/p99 latency, the serve/embed ratio, and the server's memory at rest and under
load; then one client alone (4 new texts a request) for latency at light load. Checks that served
vectors equal `flow embed`'s.

    python3 bench/serve_load.py [--texts 4000] [--clients 16] [--flow target/release/flow]

Needs a trained workflows/finance.yaml store (run the README's first command) and ../shared/data/scifact
for the texts (sentences of SciFact abstracts).
"""
import argparse
import base64
import http.client
import json
import os
import random
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def sentences(n):
    corpus = ROOT.parent / "shared" / "data" / "scifact" / "corpus.jsonl"
    out, seen = [], set()
    with open(corpus) as f:
        for line in f:
            for s in re.split(r"(?<=[.!?])\s+", json.loads(line)["text"]):
                s = s.strip()
                if 20 <= len(s) <= 400 and s not in seen:
                    seen.add(s)
                    out.append(s)
                    if len(out) == n:
                        return out
    return out


def copy_workflow(dst):
    shutil.copytree(ROOT / "workflows", dst)
    return dst / "finance.yaml"


def rss_kb(pid, field="VmRSS"):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def read_npy(path):
    data = Path(path).read_bytes()
    hlen = struct.unpack("<H", data[8:10])[0]
    header = data[10 : 10 + hlen].decode()
    n, dim = map(int, re.search(r"\((\d+), (\d+)\)", header).groups())
    floats = struct.unpack(f"<{n * dim}f", data[10 + hlen :])
    return [floats[i * dim : (i + 1) * dim] for i in range(n)]


def offline(flow, wf, texts_file, out, retriever):
    start = time.perf_counter()
    r = subprocess.run(
        ["/usr/bin/time", "-f", "%M", flow, "--quiet", "embed", "-w", wf, "--input", texts_file, "--output", out, "--retriever", retriever],
        capture_output=True,
        text=True,
    )
    wall = time.perf_counter() - start
    if r.returncode != 0:
        sys.exit(f"flow embed failed: {r.stderr}")
    peak_kb = int(r.stderr.strip().splitlines()[-1])
    return wall, peak_kb


def start_server(flow, wf):
    p = subprocess.Popen([flow, "serve", "-w", wf, "--addr", "127.0.0.1:0"], stderr=subprocess.PIPE, text=True)
    for line in p.stderr:
        m = re.search(r"listening on http://(\S+)", line)
        if m:
            threading.Thread(target=lambda: [None for _ in p.stderr], daemon=True).start()
            return p, m.group(1)
    sys.exit("flow serve did not start")


def load(addr, requests, clients, retriever):
    host, port = addr.rsplit(":", 1)
    queue = list(enumerate(requests))
    lock = threading.Lock()
    latencies, results = [], {}

    def client():
        conn = http.client.HTTPConnection(host, int(port))
        while True:
            with lock:
                if not queue:
                    break
                i, texts = queue.pop()
            body = json.dumps({"model": retriever, "input": texts, "encoding_format": "base64"})
            t0 = time.perf_counter()
            conn.request("POST", "/v1/embeddings", body, {"Content-Type": "application/json"})
            resp = conn.getresponse()
            payload = resp.read()
            dt = time.perf_counter() - t0
            if resp.status != 200:
                raise SystemExit(f"request failed: {resp.status} {payload[:200]}")
            data = json.loads(payload)["data"]
            vecs = [struct.unpack(f"<{len(base64.b64decode(d['embedding'])) // 4}f", base64.b64decode(d["embedding"])) for d in data]
            with lock:
                latencies.append(dt)
                results[i] = vecs

    threads = [threading.Thread(target=client) for _ in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - start, sorted(latencies), results


def pct(xs, q):
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--texts", type=int, default=4000)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--retriever", default="mafin")
    ap.add_argument("--flow", default=str(ROOT / "target" / "release" / "flow"))
    ap.add_argument("--seed", type=int, default=7)
    a = ap.parse_args()

    pool = sentences(a.texts + 400)
    texts, light_texts = pool[: a.texts], pool[a.texts :]
    tmp = Path(tempfile.mkdtemp(prefix="flow-serve-bench-"))
    texts_file = tmp / "texts.txt"
    texts_file.write_text("\n".join(texts) + "\n")
    rng = random.Random(a.seed)
    requests, i = [], 0
    while i < len(texts):
        n = rng.randint(1, 8)
        requests.append(texts[i : i + n])
        i += n

    # Fixed cost of a flow embed process (loading the models): one text, on its own copy.
    one = tmp / "one.txt"
    one.write_text(texts[0] + "\n")
    fixed, _ = offline(a.flow, copy_workflow(tmp / "w0"), one, tmp / "one.npy", a.retriever)
    wall_off, peak_off = offline(a.flow, copy_workflow(tmp / "w1"), texts_file, tmp / "out.npy", a.retriever)
    off_rate = len(texts) / wall_off
    off_rate_net = len(texts) / max(wall_off - fixed, 1e-9)

    proc, addr = start_server(a.flow, copy_workflow(tmp / "w2"))
    time.sleep(1.0)
    rest_kb = rss_kb(proc.pid)
    peak = [0]
    sampling = [True]

    def sample():
        while sampling[0]:
            peak[0] = max(peak[0], rss_kb(proc.pid))
            time.sleep(0.05)

    threading.Thread(target=sample, daemon=True).start()
    wall_srv, lat, results = load(addr, requests, a.clients, a.retriever)
    sampling[0] = False
    metrics = http.client.HTTPConnection(*addr.rsplit(":", 1))
    metrics.request("GET", "/metrics")
    mtext = metrics.getresponse().read().decode()
    # Light load: one client at a time, texts the server has not seen.
    light = [light_texts[j : j + 4] for j in range(0, len(light_texts), 4)]
    _, light_lat, _ = load(addr, light, 1, a.retriever)
    hwm_kb = rss_kb(proc.pid, "VmHWM")
    proc.terminate()
    proc.wait(timeout=30)

    served = [v for i in range(len(requests)) for v in results[i]]
    offline_rows = read_npy(tmp / "out.npy")
    worst = max(max(abs(x - y) for x, y in zip(s, o)) for s, o in zip(served, offline_rows))
    batches = re.search(r'flow_encoder_batch_texts_count\{encoder="black_box"\} (\d+)', mtext)
    batch_sum = re.search(r'flow_encoder_batch_texts_sum\{encoder="black_box"\} ([\d.]+)', mtext)
    mean_batch = float(batch_sum.group(1)) / max(int(batches.group(1)), 1) if batches and batch_sum else float("nan")
    srv_rate = len(texts) / wall_srv
    report = {
        "texts": len(texts),
        "requests": len(requests),
        "clients": a.clients,
        "retriever": a.retriever,
        "embed_wall_s": wall_off,
        "embed_fixed_s": fixed,
        "embed_texts_per_s": off_rate,
        "embed_texts_per_s_after_load": off_rate_net,
        "embed_peak_rss_mb": peak_off / 1024,
        "serve_wall_s": wall_srv,
        "serve_texts_per_s": srv_rate,
        "serve_requests_per_s": len(requests) / wall_srv,
        "p50_ms": pct(lat, 0.50) * 1000,
        "p99_ms": pct(lat, 0.99) * 1000,
        "light_p50_ms": pct(light_lat, 0.50) * 1000,
        "light_p99_ms": pct(light_lat, 0.99) * 1000,
        "ratio_serve_to_embed": srv_rate / off_rate_net,
        "mean_encoder_batch": mean_batch,
        "serve_rss_rest_mb": rest_kb / 1024,
        "serve_rss_peak_mb": max(peak[0], hwm_kb) / 1024,
        "max_abs_diff_vs_embed": worst,
        "cpu": subprocess.run(["sh", "-c", "grep -m1 'model name' /proc/cpuinfo | cut -d: -f2"], capture_output=True, text=True).stdout.strip(),
        "cores": os.cpu_count(),
    }
    out = ROOT / "bench" / "out"
    out.mkdir(exist_ok=True)
    (out / "serve_load.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
