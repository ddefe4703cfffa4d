#!/usr/bin/env bash
# What flow's build and tests need beyond Rust: pip (for `flow models pull`), and cmake, a C++
# compiler and libclang (llama-cpp-sys-2 builds llama.cpp and its bindings). Installs only what is
# missing, with apt-get (through sudo when not root). The README's two commands start here.
set -euo pipefail
need=()
command -v cargo >/dev/null 2>&1 || [ -x "$HOME/.cargo/bin/cargo" ] || {
  echo "setup.sh: Rust is missing: install it from https://rustup.rs, then run this again" >&2
  exit 2
}
python3 -m pip --version >/dev/null 2>&1 || need+=(python3-pip)
command -v cmake >/dev/null 2>&1 || need+=(cmake)
command -v c++ >/dev/null 2>&1 || need+=(g++)
{ ldconfig -p 2>/dev/null || true; } | grep -q 'libclang[-.0-9]*\.so' || need+=(libclang-dev)
[ ${#need[@]} -eq 0 ] && exit 0
command -v apt-get >/dev/null 2>&1 || {
  echo "setup.sh: install these with your package manager, then run this again: ${need[*]}" >&2
  exit 2
}
sudo=()
[ "$(id -u)" -eq 0 ] || sudo=(sudo)
echo "setup.sh: installing ${need[*]}" >&2
"${sudo[@]}" apt-get update -qq
"${sudo[@]}" apt-get install -y -qq "${need[@]}"
