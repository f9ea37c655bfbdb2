#!/usr/bin/env bash
# Compile every csrc/cuda/*.cu with `nvcc -c` for sm_80 and sm_90 (CUDA runtime headers only, no
# torch) into a temporary directory. Fails loudly on the first error. Used by CI; needs no GPU.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
NVCC="${NVCC:-$(command -v nvcc || true)}"
if [[ -z "$NVCC" && -x /usr/local/cuda/bin/nvcc ]]; then NVCC=/usr/local/cuda/bin/nvcc; fi
if [[ -z "$NVCC" ]]; then
  echo "check_cuda.sh: ERROR: nvcc not found (set NVCC=/path/to/nvcc)" >&2
  exit 1
fi
shopt -s nullglob
SOURCES=("$ROOT"/csrc/cuda/*.cu)
if (( ${#SOURCES[@]} == 0 )); then
  echo "check_cuda.sh: ERROR: no .cu files under csrc/cuda" >&2
  exit 1
fi
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
"$NVCC" --version | tail -1
status=0
for src in "${SOURCES[@]}"; do
  for arch in 80 90; do
    obj="$TMP/$(basename "$src" .cu).sm_${arch}.o"
    if "$NVCC" -c "$src" -o "$obj" -std=c++17 -O3 -I"$ROOT/csrc" -I"$ROOT/csrc/cuda" \
        -gencode "arch=compute_${arch},code=sm_${arch}" -Werror all-warnings; then
      echo "ok      sm_${arch}  ${src#$ROOT/}"
    else
      echo "FAILED  sm_${arch}  ${src#$ROOT/}" >&2
      status=1
    fi
  done
done
if (( status != 0 )); then
  echo "check_cuda.sh: ERROR: some CUDA sources failed to compile" >&2
fi
exit $status
