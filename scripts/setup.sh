#!/usr/bin/env bash
# Installs what ompq needs on a fresh Debian machine and builds it (editable, with the C++ ops).
#   - Fashion-MNIST from Debian's dataset-fashion-mnist package (offline data for the zoo models)
#   - torch 2.13.0 (the CPU wheel; a plain `torch` would pull a multi-GB CUDA build)
#   - the Python dependencies, then `pip install --no-build-isolation -e .[test]`
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -f /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz ] && [ -z "${OMPQ_FASHION_MNIST:-}" ]; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null
  else
    echo "setup: Fashion-MNIST not found; run 'sudo apt-get install dataset-fashion-mnist'" \
         "or set OMPQ_FASHION_MNIST to a folder with the four idx .gz files" >&2
  fi
fi

PIP="python -m pip --disable-pip-version-check -q"
python -c "import torch, sys; sys.exit(0 if torch.__version__.startswith('2.13.0') else 1)" 2>/dev/null \
  || $PIP install torch==2.13.0
$PIP install numpy ninja pybind11 "ortools>=9.8" tqdm matplotlib scipy onnx onnxruntime pytest hypothesis setuptools wheel
$PIP install --no-build-isolation -e ".[test]"
python -c "import ompq, ompq.ops as o; print('ompq', ompq.__version__, '| compiled ops:', o.HAS_EXTENSION)"
