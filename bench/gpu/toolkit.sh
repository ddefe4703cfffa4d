#!/usr/bin/env bash
# A build-only CUDA 13.0 toolkit from PyPI wheels in one folder (no GPU, no driver, nothing outside
# $TK), for `cargo build --release --features cuda` on a CPU machine (issue 17 part A).
#   bash bench/gpu/toolkit.sh            # then: source ~/.cache/flow/cuda13/env.sh
#   bash bench/gpu/toolkit.sh --check    # only what `cargo check --features cuda` needs (~100 MB; CI)
# Idempotent: wheels already downloaded are not fetched again. See bench/gpu/README.md.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
W=${W:-$HOME/.cache/flow/cuda-wheels}; TK=${TK:-$HOME/.cache/flow/cuda13}; CU=$TK/nvidia/cu13
mkdir -p "$W"
# 13.0.x: the H200's driver 580 is CUDA 13.0; a newer nvcc writes PTX that driver cannot load.
# nvcc, cicc, the headers (crt, cccl, runtime) build the kernels; the libraries are for linking.
WHEELS="nvidia-cuda-nvcc==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-crt==13.0.88 nvidia-cuda-cccl==13.0.85 nvidia-cuda-runtime==13.0.96"
[ "${1:-}" = --check ] || WHEELS="$WHEELS nvidia-cuda-nvrtc==13.0.88 nvidia-curand==10.4.0.35 nvidia-cublas==13.1.0.3"
# shellcheck disable=SC2086
python3 -m pip download --quiet --no-deps -d "$W" $WHEELS
for w in "$W"/nvidia_*.whl; do unzip -q -o "$w" 'nvidia/*' -d "$TK"; done
# The wheels ship only SONAME files; `-lfoo` needs the plain names.
cd "$CU/lib"
for l in cublas cublasLt nvrtc cudart; do
  if [ -e "lib$l.so.13" ]; then ln -sf "lib$l.so.13" "lib$l.so"; fi
done
if [ -e libcurand.so.10 ]; then ln -sf libcurand.so.10 libcurand.so; fi
ln -sfn lib "$CU/lib64"
if [ "${1:-}" != --check ]; then
  # No wheel has libcuda (the driver): a link stub of every cu* entry point cudarc's bindings name,
  # with the driver's SONAME so the real libcuda.so.1 is the one loaded at run time.
  REG="${CARGO_HOME:-$HOME/.cargo}/registry/src"
  ls -d "$REG"/*/cudarc-0.19.10 >/dev/null 2>&1 || (cd "$ROOT" && cargo fetch --locked)
  SYS=$(ls -d "$REG"/*/cudarc-0.19.10 | head -1)/src/driver/sys/mod.rs
  mkdir -p "$CU/lib/stubs"
  grep -oP '^pub unsafe fn \Kcu\w+(?=\()' "$SYS" | sort -u | sed 's/.*/void &(void){}/' > "$CU/lib/stubs/libcuda_stub.c"
  gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$CU/lib/stubs/libcuda.so" "$CU/lib/stubs/libcuda_stub.c"
fi
cat > "$TK/env.sh" <<ENV
export CUDA_HOME=$CU PATH=$CU/bin:\$PATH CUDA_COMPUTE_CAP=90 CUDARC_CUDA_VERSION=13000 CUDAFORGE_THREADS=2
ENV
"$CU/bin/nvcc" --version | tail -2
