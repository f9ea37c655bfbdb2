#!/usr/bin/env bash
# Configure, build (Ninja, -j2) and run the C++ unit tests (ctest) in build/cmake against the
# libtorch of the installed torch wheel. Used by CI; takes a few minutes on 2 cores.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BUILD="$ROOT/build/cmake"
PY="${PYTHON:-python}"
TORCH_PREFIX="$("$PY" -c 'import torch; print(torch.utils.cmake_prefix_path)')"
cmake -S "$ROOT" -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release \
  -DCMAKE_PREFIX_PATH="$TORCH_PREFIX"
cmake --build "$BUILD" -j "${OMPQ_JOBS:-2}"
ctest --test-dir "$BUILD" --output-on-failure
