#!/usr/bin/env bash
# The test command: installs everything on a fresh machine, builds ompq, checks the CUDA sources
# compile (nvcc -c, when nvcc is present), runs the C++ unit tests (ctest) and the pytest suite.
# Extra arguments go to pytest: `bash scripts/test.sh -m "not slow"` skips the slow end-to-end
# tests (the quick loop, also `python -m pytest -m "not slow"`); CI runs everything.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if command -v nvcc >/dev/null 2>&1; then bash scripts/check_cuda.sh; else echo "nvcc not found: skipping the CUDA compile check"; fi
bash scripts/cpp_tests.sh
python -m pytest -q -p no:cacheprovider tests "$@"
