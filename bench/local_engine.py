#!/usr/bin/env python3
"""The local chat engine against llama.cpp itself, on the same GGUF and the same cores (issue 27).

    cargo build --release && cargo build --release --example local_llm
    python3 -m venv /tmp/llamapy && CMAKE_ARGS="-DGGML_NATIVE=ON" /tmp/llamapy/bin/pip install llama-cpp-python
    python3 bench/local_engine.py [--gguf PATH] [--llama-python /tmp/llamapy/bin/python] [--chunks 32]

1. One stream, as llama.cpp's llama-bench measures it: prompt (prefill) tokens/s over a 512-token
   prompt, generation tokens/s over 128 tokens, on the GGUF as it is and on flow's Q8_0 copy
   (`requantize:`), best of 3. Three engines: flow (`target/release/examples/local_llm`, through its
   engine and chat template); llama.cpp's own loop (bench/llama_bench.cpp, llama-bench's test_prompt
   and test_gen, compiled here against the very llama.cpp build flow links, its kernels picked at run
   time as flow's are); llama-cpp-python from PyPI built with GGML_NATIVE=ON, with llama.cpp's weight
   repacking (AMX) on and off (0.3.36 crashes in its AMX kernels on these files: recorded as failed).
2. The generate and judge stages on the sample report (examples/finance) with 1, 4, 8 and 16 requests
   in flight (`parallel:` and `max_in_flight:` both set to it), each on a fresh store: chunks/s,
   judgments/s, wall and peak RSS.
Prints one JSON object with everything, and the markdown rows BENCHMARKS.md holds.
"""
import argparse
import glob
import json
import os
import platform
import resource
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODELS = os.path.expanduser(os.environ.get("FLOW_MODELS", "~/.cache/flow/models"))
DEFAULT_GGUF = f"{MODELS}/qwen2.5-coder-0.5b-instruct/Qwen2.5-Coder-0.5B-Instruct.gguf"

LLAMA_CPP = r'''
import json, sys, time, os
import llama_cpp
from llama_cpp import Llama
gguf, n_prompt, n_gen, runs, extra = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5] == "1"
# llama-cpp-python's own model parameters, with llama.cpp's weight repacking (the AMX/AVX-512 extra
# buffer types) on or off: the PyPI build 0.3.36 crashes in ggml_backend_amx_mul_mat with it on.
_default = llama_cpp.llama_cpp.llama_model_default_params
def _params():
    p = _default()
    p.use_extra_bufts = extra
    return p
llama_cpp.llama_cpp.llama_model_default_params = _params
threads = os.cpu_count()
llm = Llama(model_path=gguf, n_ctx=4096, n_batch=512, n_ubatch=512, n_threads=threads, n_threads_batch=threads,
            verbose=False)
words = "revenue margin segment cloud growth quarter debt cash flow customers pricing region cost".split()
out = []
for run in range(runs):
    text = f"Run {run}. " + " ".join(words[i % len(words)] for i in range(n_prompt))
    tokens = llm.tokenize(text.encode())[:n_prompt]
    llm.reset()
    t = time.time(); llm.eval(tokens); pp = time.time() - t
    t = time.time()
    for _ in range(n_gen):
        tok = llm.sample(temp=0.0)
        llm.eval([tok])
    tg = time.time() - t
    out.append({"run": run, "prompt_tokens": len(tokens), "prompt_tok_per_s": len(tokens) / pp, "gen_tok_per_s": n_gen / tg})
print(json.dumps(out))
'''


def cpu():
    info = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    name = next((l.split(":", 1)[1].strip() for l in info.splitlines() if l.startswith("Model name")), platform.processor())
    flags = next((l.split(":", 1)[1].split() for l in info.splitlines() if l.startswith("Flags")), [])
    keep = [f for f in flags if f.startswith(("avx512", "amx")) or f in ("avx2", "avx_vnni")]
    return f"{name}, {os.cpu_count()} cores ({' '.join(keep)})"


def build_harness():
    """bench/llama_bench.cpp linked against the llama.cpp build flow's release binary uses."""
    libs = sorted(glob.glob(f"{ROOT}/target/release/build/llama-cpp-sys-2-*/out/lib/libllama.so"), key=os.path.getmtime)
    if not libs or not shutil.which("g++"):
        print("skipped llama.cpp's own loop: no release build of llama-cpp-sys-2 or no g++", file=sys.stderr)
        return None
    out = os.path.dirname(os.path.dirname(libs[-1]))
    src = glob.glob(os.path.expanduser("~/.cargo/registry/src/*/llama-cpp-sys-2-0.1.161/llama.cpp"))[0]
    exe = os.path.join(tempfile.mkdtemp(), "llama_bench")
    subprocess.run(["g++", "-O2", "-std=c++17", f"{ROOT}/bench/llama_bench.cpp", f"-I{src}/include", f"-I{src}/ggml/include",
                    f"-L{out}/lib", "-lllama", "-lggml", "-lggml-base", f"-Wl,--disable-new-dtags,-rpath,{out}/lib",
                    "-o", exe], check=True)
    return exe, f"{out}/backends"


def best(rows):
    runs = [x for x in rows if "run" in x]
    return {k: round(max(x[k] for x in runs), 1) for k in ("prompt_tok_per_s", "gen_tok_per_s")}


def one_stream(args):
    """Each engine on the GGUF as it is and on flow's Q8_0 copy of it (`requantize:`)."""
    out = {}
    harness = build_harness()
    for requantize in ("never", "q8_0"):
        r = subprocess.run([f"{ROOT}/target/release/examples/local_llm", args.gguf, "--requantize", requantize,
                            "--prompt-tokens", "512", "--gen-tokens", "128", "--runs", "3"],
                           capture_output=True, text=True, check=True)
        rows = [json.loads(l) for l in r.stdout.splitlines() if l.startswith("{")]
        weights = next(x["weights"] for x in rows if "weights" in x)
        row = {"weights": weights, "flow": best(rows),
               "kernels": next((x["llama_cpp_system_info"] for x in rows if "llama_cpp_system_info" in x), "")}
        if harness:
            r = subprocess.run([harness[0], weights, harness[1], "512", "128", "3"], capture_output=True, text=True)
            if r.returncode == 0:
                row["llama.cpp"] = best([json.loads(l) for l in r.stdout.splitlines() if l.startswith("{")])
            else:
                row["llama.cpp"] = {"failed": f"exit {r.returncode}: {r.stderr[-500:]}"}
        if os.path.exists(args.llama_python):
            for extra in ("1", "0"):
                name = "llama-cpp-python" + ("" if extra == "1" else ", no repack")
                r = subprocess.run([args.llama_python, "-c", LLAMA_CPP, weights, "512", "128", "3", extra],
                                   capture_output=True, text=True)
                if r.returncode == 0:
                    row[name] = best(json.loads(r.stdout.strip().splitlines()[-1]))
                else:
                    row[name] = {"failed": f"exit {r.returncode}"}
        else:
            print(f"skipped llama-cpp-python: {args.llama_python} is absent (see the docstring)", file=sys.stderr)
        out[requantize] = row
    return out


WORKFLOW = """name: bench
store: bench.db
models:
  llm: {{ provider: local, model: {model}, json_schema: true, parallel: {p}, limits: {{ max_in_flight: {p} }} }}
stages:
  chunk: {{ kind: chunk, corpus: {corpus}, max_tokens: 256, overlap: 32 }}
  generate: {{ kind: generate, needs: [chunk], sample: {chunks}, per_chunk: 2, temperature: 0, max_tokens: 96 }}
  judge: {{ kind: judge, needs: [generate], max_tokens: 64 }}
"""


def stages(args, p):
    with tempfile.TemporaryDirectory() as tmp:
        with open(f"{tmp}/wf.yaml", "w") as f:
            f.write(WORKFLOW.format(model=args.gguf, p=p, corpus=f"{ROOT}/examples/finance", chunks=args.chunks))
        t = time.time()
        r = subprocess.run(["/usr/bin/time", "-f", "%M", f"{ROOT}/target/release/flow", "run", f"{tmp}/wf.yaml", "--quiet"],
                           capture_output=True, text=True)
        wall = time.time() - t
        if r.returncode != 0:
            sys.exit(f"flow failed at {p} in flight:\n{r.stderr[-3000:]}")
        con = sqlite3.connect(f"{tmp}/bench.db")
        out = {"in_flight": p, "wall_s": round(wall, 1), "peak_rss_mb": round(int(r.stderr.strip().splitlines()[-1]) / 1024)}
        for stage in ("generate", "judge"):
            done, secs = con.execute(
                "SELECT items_done, (finished_at - started_at) / 1000.0 FROM stage_runs WHERE stage = ?", (stage,)).fetchone()
            out[stage] = {"items": done, "seconds": round(secs, 1), "items_per_s": round(done / secs, 3)}
        out["accepted"] = con.execute("SELECT COUNT(*) FROM judgments WHERE verdict = 'accepted'").fetchone()[0]
        return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--gguf", default=DEFAULT_GGUF)
    ap.add_argument("--llama-python", default="/tmp/llamapy/bin/python")
    ap.add_argument("--chunks", type=int, default=32)
    ap.add_argument("--in-flight", default="1,4,8,16", help="requests in flight per stage run; \"\" runs none")
    ap.add_argument("--skip-stream", action="store_true")
    args = ap.parse_args()
    result = {"cpu": cpu(), "gguf": args.gguf}
    if not args.skip_stream:
        result["one_stream"] = one_stream(args)
        print(json.dumps(result, indent=2), file=sys.stderr)
    result["stages"] = [stages(args, int(p)) for p in args.in_flight.split(",") if p]
    print(json.dumps(result, indent=2))
    for requantize, row in result.get("one_stream", {}).items():
        for peer in ("llama.cpp", "llama-cpp-python", "llama-cpp-python, no repack"):
            if "prompt_tok_per_s" in row.get(peer, {}):
                f, p = row["flow"], row[peer]
                print(f"| {requantize} | {peer} | {p['prompt_tok_per_s']} / {f['prompt_tok_per_s']} "
                      f"({f['prompt_tok_per_s'] / p['prompt_tok_per_s']:.2f}x) | {p['gen_tok_per_s']} / "
                      f"{f['gen_tok_per_s']} ({f['gen_tok_per_s'] / p['gen_tok_per_s']:.2f}x) |")
    for r in result["stages"]:
        print(f"| {r['in_flight']} | {r['generate']['items_per_s']} | {r['judge']['items_per_s']} | {r['wall_s']} | {r['peak_rss_mb']} |")


if __name__ == "__main__":
    main()
