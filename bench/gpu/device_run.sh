#!/usr/bin/env bash
# Issue 17 part B in one call on the GPU machine: correctness (CPU vs GPU loss curves, bf16 vs f32,
# embeddings across devices) and speed (flow's train stage vs sentence-transformers' MNRL, flow embed
# vs SentenceTransformer.encode), for a MiniLM-sized and a BERT-base-sized model. Results go to $OUT.
#
#   here:   bash bench/gpu/bundle.sh                      # makes bench/gpu/carry (<= 60 MiB)
#   device: run(command="bash bench/gpu/device_run.sh", carry=["bench/gpu/carry"], timeout_s=590)
#
# Also runs here, on the CPU build, to check everything but the GPU parts:
#   FLOW=target/release/flow DEVICE=cpu QUICK=1 bash bench/gpu/device_run.sh
set -uo pipefail
cd "$(dirname "$0")/../.."
C=bench/gpu/carry
OUT=${OUT:-/tmp/flow-gpu-out}
DEVICE=${DEVICE:-cuda}
QUICK=${QUICK:-0}
W=$(mktemp -d)
mkdir -p "$OUT"
log() { echo "[$(date +%T)] $*" | tee -a "$OUT/log.txt" >&2; }
log "work dir $W, device $DEVICE, quick $QUICK"

# 0. Unpack the binary and the data (xz, read with Python's lzma: the machine has no xz).
python3 - "$C" "$W" <<'PY'
import lzma, os, shutil, sys, tarfile
c, w = sys.argv[1], sys.argv[2]
if os.path.exists(os.path.join(c, "flow.tar.xz")):
    # flow with llama.cpp's libraries and CPU kernels beside it (its rpath is $ORIGIN).
    with tarfile.open(os.path.join(c, "flow.tar.xz")) as t:
        t.extractall(w)
with tarfile.open(os.path.join(c, "data.tar.xz")) as t:
    t.extractall(w)
PY
FLOW=${FLOW:-$W/flow}
# The CUDA libraries the binary links: the machine's toolkit, else the nvidia-* wheels beside PyTorch.
LIBS=$(python3 - <<'PY'
import glob, os, site
dirs = ["/usr/local/cuda/lib64", "/usr/local/cuda/targets/x86_64-linux/lib"] + sorted(glob.glob("/usr/local/cuda-13*/lib64"))
for sp in site.getsitepackages() + [site.getusersitepackages()]:
    dirs += sorted(glob.glob(os.path.join(sp, "nvidia", "*", "lib"))) + sorted(glob.glob(os.path.join(sp, "nvidia", "cu13", "lib")))
found = []
for lib in ["libcublas.so.13", "libcublasLt.so.13", "libcurand.so.10", "libnvrtc.so.13", "libcudart.so.13"]:
    d = next((d for d in dirs if os.path.exists(os.path.join(d, lib))), None)
    if d and d not in found:
        found.append(d)
print(":".join(found))
PY
)
export LD_LIBRARY_PATH="$LIBS${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
log "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
{ nvidia-smi || true; } > "$OUT/nvidia-smi.txt" 2>&1
{ ldd "$FLOW" || true; } > "$OUT/ldd.txt" 2>&1
"$FLOW" --version | tee "$OUT/flow-version.txt"
lscpu > "$OUT/lscpu.txt" 2>&1 || true

# 1. Weights from a fixed seed, written once and loaded by both flow and PyTorch.
if [ "$QUICK" = 1 ]; then
  SIZES="tiny"; python3 bench/gpu/make_weights.py "$W/tiny" --tokenizer "$W/tokenizer" --hidden 64 --layers 2 --heads 2 --intermediate 128 >&2
else
  SIZES="minilm bert-base"
  python3 bench/gpu/make_weights.py "$W/minilm" --tokenizer "$W/tokenizer" --hidden 384 --layers 6 --heads 12 --intermediate 1536 >&2
  python3 bench/gpu/make_weights.py "$W/bert-base" --tokenizer "$W/tokenizer" --hidden 768 --layers 12 --heads 12 --intermediate 3072 >&2
fi
FIRST=${SIZES%% *}

# A workflow with one train stage: NAME MODEL DEVICE PRECISION BATCH EPOCHS PAIRS [STORE]
wf() {
  cat > "$W/$1.yaml" <<EOF
name: $1
store: ${8:-$1}.db
models:
  black_box: { provider: local, model: $W/$2, max_seq_length: 256 }
  augment: { init: $W/$2, max_seq_length: 256 }
stages:
  train: { kind: train, retriever: augment_only, beir: $W/data/$7, epochs: $6, batch_size: $5, lr: 2.0e-5,
           warmup: 0.0, dropout: 0.0, val_fraction: 0.02, seed: 7, precision: $4, device: $3, weight: 1.0 }
EOF
}

# Peak GPU memory of the processes started while it runs (MiB), sampled every 100 ms.
gpu_peak_start() {
  rm -f "$W/smi.csv"
  (nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 100 > "$W/smi.csv" 2>/dev/null &
   echo $! > "$W/smi.pid")
  sleep 0.3
}
gpu_peak_stop() {
  kill "$(cat "$W/smi.pid" 2>/dev/null)" 2>/dev/null
  sort -n "$W/smi.csv" 2>/dev/null | tail -1
}

train() { # NAME ...: runs the workflow, prints the stage summary JSON
  local name=$1; shift
  wf "$name" "$@"
  log "flow train $name ($*)"
  "$FLOW" run "$W/$name.yaml" --quiet >> "$OUT/$name.log" 2>&1 || log "  FAILED: see $name.log"
  "$FLOW" status -w "$W/$name.yaml" --json > "$OUT/$name.status.json" 2>>"$OUT/$name.log"
  python3 - "$W/${8:-$name}.db" "$OUT/$name.curve.json" <<'PY'
import json, sqlite3, sys
db = sqlite3.connect(sys.argv[1])
rows = db.execute("SELECT step, value FROM train_curves WHERE kind = 'loss' ORDER BY stage_run_id DESC, step").fetchall()
json.dump(rows, open(sys.argv[2], "w"))
PY
}

# 2. Correctness. The same seeded 20 steps on the CPU and the GPU in f32 (dropout off: the two
#    devices draw different masks); bf16 vs f32 over 200+ steps; a checkpoint's embeddings on both.
if [ "$DEVICE" = cuda ]; then
  train f32_cpu "$FIRST" cpu f32 32 1 pairs_20
fi
train f32_dev "$FIRST" "$DEVICE" f32 32 1 pairs_20
EPOCHS_200=2; [ "$QUICK" = 1 ] && EPOCHS_200=1
train f32_200 "$FIRST" "$DEVICE" f32 32 "$EPOCHS_200" pairs
train bf16_200 "$FIRST" "$DEVICE" bf16 32 "$EPOCHS_200" pairs
head -1000 "$W/data/texts.txt" > "$W/texts_1k.txt"
wf embed_cpu "$FIRST" cpu f32 32 1 pairs_20 f32_dev
wf embed_dev "$FIRST" "$DEVICE" f32 32 1 pairs_20 f32_dev
"$FLOW" embed -w "$W/embed_cpu.yaml" -r augment_only -i "$W/texts_1k.txt" -o "$W/cpu.npy" --quiet 2>>"$OUT/log.txt"
"$FLOW" embed -w "$W/embed_dev.yaml" -r augment_only -i "$W/texts_1k.txt" -o "$W/dev.npy" --quiet 2>>"$OUT/log.txt"

# 3. Speed: flow's train stage vs MNRL, bf16, batch 32 and 256, max_seq_length 256, each size.
for size in $SIZES; do
  for b in 32 256; do
    ep=1; [ "$b" = 256 ] && ep=3; [ "$QUICK" = 1 ] && ep=1
    [ "$DEVICE" = cuda ] && gpu_peak_start
    train "speed_${size}_b$b" "$size" "$DEVICE" bf16 "$b" "$ep" pairs
    [ "$DEVICE" = cuda ] && gpu_peak_stop > "$OUT/speed_${size}_b$b.gpu_mib"
    if [ "$DEVICE" = cuda ]; then
      steps=$(( b == 32 ? 150 : 50 ))
      log "sentence-transformers MNRL $size batch $b ($steps steps)"
      gpu_peak_start
      python3 bench/gpu/st_bench.py --model "$W/$size" --pairs "$W/data/pairs" --batch "$b" --steps "$steps" \
        > "$OUT/st_${size}_b$b.json" 2>>"$OUT/st.log" || log "  FAILED: see st.log"
      gpu_peak_stop > "$OUT/st_${size}_b$b.gpu_mib"
    fi
  done
  # Corpus embedding: flow embed (its own trained checkpoint of this size) vs SentenceTransformer.encode.
  wf "embed_$size" "$size" "$DEVICE" bf16 32 1 pairs "speed_${size}_b32"
  log "flow embed $size"
  python3 - "$FLOW" "$W/embed_$size.yaml" "$W/data/texts.txt" "$W/e.npy" "$OUT/flow_embed_$size.json" <<'PY'
import json, subprocess, sys, time
flow, wf, texts, out, res = sys.argv[1:]
t0 = time.perf_counter()
subprocess.run([flow, "embed", "-w", wf, "-r", "augment_only", "-i", texts, "-o", out, "--quiet"], check=True)
secs = time.perf_counter() - t0
n = sum(1 for _ in open(texts, encoding="utf-8"))
json.dump({"texts": n, "seconds_with_load": secs, "texts_per_s_with_load": n / secs}, open(res, "w"))
PY
  if [ "$DEVICE" = cuda ]; then
    log "SentenceTransformer.encode $size"
    python3 bench/gpu/st_bench.py --model "$W/$size" --pairs "$W/data/pairs" --steps 0 --encode "$W/data/texts.txt" \
      > "$OUT/st_encode_$size.json" 2>>"$OUT/st.log" || log "  FAILED: see st.log"
  fi
done

# 4. The figures, side by side.
python3 bench/gpu/summarize.py "$OUT" "$W" | tee "$OUT/summary.md"
log "done"
