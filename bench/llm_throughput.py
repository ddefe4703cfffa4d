#!/usr/bin/env python3
"""LLM throughput of the generate stage against a loopback OpenAI-compatible server with 200 ms latency.

    cargo build --release && cargo build --release --example openai_server
    python3 bench/llm_throughput.py [--chunks 10000] [--latency-ms 200] [--sequential 200]

Scenarios, each on a fresh store (so nothing comes from the request cache):
  capped:    requests_per_minute 6000, 64 in flight  -> goal: >= 95% of 100 req/s sustained
  uncapped:  no rate cap, 64 in flight               -> goal: >= 90% of 320 req/s (64 / 0.2 s)
  sequential: one request at a time with Python's urllib (the way LlamaIndex's
             generate_qa_embedding_pairs calls the LLM chunk by chunk), on a sample of the chunks.
Reports the request rate measured at the server, flow's CPU seconds per 1,000 requests and its peak RSS.
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def server_stats(base):
    with urllib.request.urlopen(base.replace("/v1", "/stats")) as r:
        return json.load(r)["received_ms"]


def write_workspace(tmp, n, base, limits):
    docs = os.path.join(tmp, "docs")
    os.makedirs(docs)
    with open(os.path.join(docs, "records.jsonl"), "w") as f:
        for i in range(n):
            text = (f"Record {i}: segment revenue for unit {i % 97} rose {i % 13}.{i % 10}% in quarter {i % 4 + 1}, "
                    f"while operating costs in region {i % 7} fell by {i % 5 + 1} million dollars.")
            f.write(json.dumps({"id": f"r{i}", "title": f"Record {i}", "text": text}) + "\n")
    wf = os.path.join(tmp, "bench.yaml")
    with open(wf, "w") as f:
        f.write(f"""name: bench
store: bench.db
models:
  black_box: {{ provider: local, model: all-MiniLM-L6-v2 }}
  llm: {{ provider: openai, model: bench-model, base_url: "{base}", timeout_s: 30, limits: {limits} }}
stages:
  chunk: {{ kind: chunk, corpus: docs, max_tokens: 128, overlap: 0 }}
  generate: {{ kind: generate, needs: [chunk], prompt: {ROOT}/prompts/generate_queries.j2, per_chunk: 2 }}
""")
    return wf


def run_flow(flow, wf, only):
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.time()
    subprocess.run([flow, "run", "--quiet", wf, "--only", only], check=True, env={**os.environ, "OPENAI_API_KEY": "bench"})
    wall = time.time() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu, after.ru_maxrss / 1024


def scenario(flow, base, n, limits, label):
    with tempfile.TemporaryDirectory() as tmp:
        wf = write_workspace(tmp, n, base, limits)
        run_flow(flow, wf, "chunk")
        seen_before = len(server_stats(base))
        wall, cpu, rss = run_flow(flow, wf, "generate")
        ms = server_stats(base)[seen_before:]
        span = (max(ms) - min(ms)) / 1000 if len(ms) > 1 else float("nan")
        rate = (len(ms) - 1) / span
        return {
            "scenario": label, "requests": len(ms), "wall_s": round(wall, 1),
            "server_rate_rps": round(rate, 1), "cpu_s": round(cpu, 2),
            "cpu_s_per_1000_requests": round(cpu / len(ms) * 1000, 3), "peak_rss_mb": round(rss, 1),
        }


def sequential(base, n):
    body_tpl = {"model": "bench-model", "temperature": 0.7, "max_tokens": 256,
                "messages": [{"role": "user", "content": ""}]}
    t = time.time()
    for i in range(n):
        body = dict(body_tpl, messages=[{"role": "user", "content": f"Write 2 questions about record {i}."}])
        req = urllib.request.Request(base + "/chat/completions", data=json.dumps(body).encode(),
                                     headers={"content-type": "application/json", "authorization": "Bearer bench"})
        with urllib.request.urlopen(req) as r:
            json.load(r)
    wall = time.time() - t
    return {"scenario": "sequential (urllib, one at a time)", "requests": n, "wall_s": round(wall, 1),
            "server_rate_rps": round(n / wall, 1)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--chunks", type=int, default=10000)
    ap.add_argument("--latency-ms", type=int, default=200)
    ap.add_argument("--sequential", type=int, default=200)
    ap.add_argument("--flow", default=os.path.join(ROOT, "target/release/flow"))
    ap.add_argument("--server", default=os.path.join(ROOT, "target/release/examples/openai_server"))
    args = ap.parse_args()
    srv = subprocess.Popen([args.server, "--port", "0", "--latency-ms", str(args.latency_ms)], stdout=subprocess.PIPE, text=True)
    try:
        line = srv.stdout.readline().strip()
        base = line.split()[-1]
        print(f"server: {base}, latency {args.latency_ms} ms", file=sys.stderr)
        results = [
            scenario(args.flow, base, args.chunks, "{ requests_per_minute: 6000, max_in_flight: 64 }", "capped 6000/min, 64 in flight"),
            scenario(args.flow, base, args.chunks, "{ max_in_flight: 64 }", "uncapped, 64 in flight"),
            sequential(base, args.sequential),
        ]
        seq_rate = results[2]["server_rate_rps"]
        for r in results:
            r["vs_sequential"] = round(r["server_rate_rps"] / seq_rate, 1)
        print(json.dumps(results, indent=2))
    finally:
        srv.kill()


if __name__ == "__main__":
    main()
