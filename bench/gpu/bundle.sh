#!/usr/bin/env bash
# The carry folder for the GPU machine (issue 17 part B), at most 60 MiB: the stripped CUDA binary
# with llama.cpp's libraries (tar.xz), a BERT tokenizer and the data of device_run.sh (SciFact abstracts as pairs and texts). The
# weights are made there from a fixed seed (make_weights.py): real ones would not fit.
#   bash bench/gpu/toolkit.sh && source ~/.cache/flow/cuda13/env.sh
#   cargo build --release --features cuda --target-dir target/cuda
#   bash bench/gpu/bundle.sh        # -> bench/gpu/carry (git-ignored)
set -euo pipefail
cd "$(dirname "$0")/../.."
BIN=${BIN:-target/cuda/release/flow}
SCIFACT=${SCIFACT:-../shared/data/scifact}
TOKENIZER=${TOKENIZER:-${FLOW_MODELS:-$HOME/.cache/flow/models}/all-MiniLM-L6-v2}
C=bench/gpu/carry
[ -x "$BIN" ] || { echo "no CUDA binary at $BIN: build it first (see the top of this file)" >&2; exit 2; }
[ -f "$SCIFACT/corpus.jsonl" ] || { echo "no SciFact at $SCIFACT (set SCIFACT=...)" >&2; exit 2; }
[ -f "$TOKENIZER/tokenizer.json" ] || { echo "no tokenizer at $TOKENIZER: run \`flow models pull\`" >&2; exit 2; }
rm -rf "$C"
mkdir -p "$C"
T=$(mktemp -d)
# The binary links llama.cpp's shared libraries (found beside it through its $ORIGIN rpath) and
# loads its CPU kernels from the libggml-cpu-*.so beside it.
LLAMA=$(dirname "$(ls -t "$(dirname "$BIN")"/build/llama-cpp-sys-2-*/out/lib/libllama.so | head -1)")
mkdir -p "$T/bin"
strip -o "$T/bin/flow" "$BIN"
for f in "$LLAMA"/lib*.so.*.* "$LLAMA"/../backends/libggml-cpu-*.so; do
  strip -o "$T/bin/$(basename "$f")" "$f"
done
for f in "$LLAMA"/lib*.so.?; do
  ln -s "$(readlink "$f")" "$T/bin/$(basename "$f")"
done
tar -C "$T/bin" -cf - . | xz -T2 -9 > "$C/flow.tar.xz"
mkdir -p "$T/pack/tokenizer"
for f in tokenizer.json vocab.txt tokenizer_config.json special_tokens_map.json; do
  cp "$TOKENIZER/$f" "$T/pack/tokenizer/"
done
python3 bench/gpu/make_data.py "$SCIFACT" "$T/pack/data"
tar -C "$T/pack" -cf - tokenizer data | xz -T2 -9 > "$C/data.tar.xz"
rm -rf "$T"
du -b "$C"/* | awk '{ printf "%8.1f MiB  %s\n", $1 / 1048576, $2 }'
total=$(du -cb "$C"/* | tail -1 | cut -f1)
printf '%8.1f MiB  in all (limit 60 MiB)\n' "$(echo "$total / 1048576" | bc -l)"
[ "$total" -le $((60 << 20)) ] || { echo "the carry is over 60 MiB" >&2; exit 1; }
