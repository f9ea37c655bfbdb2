#!/usr/bin/env bash
# On a machine with a CUDA GPU and a CUDA build of torch: build ompq with its CUDA kernels, check
# that every op has a CUDA kernel, run the kernel tests (CPU and CUDA) and the GPU benchmark.
# Logs and JSON go to $OUT (the device tool's output folder) or build/gpu_check. Needs no network:
# only torch, pytest, hypothesis and numpy (ortools is not imported by the kernels).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEST="${OUT:-$ROOT/build/gpu_check}"
PY="${PYTHON:-python3}"
mkdir -p "$DEST"
cd "$ROOT"
"$PY" - <<'PYEOF'
import torch
assert torch.cuda.is_available() and torch.version.cuda, "gpu_check.sh: needs a CUDA GPU and a CUDA torch"
print("torch", torch.__version__, "CUDA", torch.version.cuda, "device", torch.cuda.get_device_name())
PYEOF
echo "== build (log: $DEST/build.log)"
MAX_JOBS="${MAX_JOBS:-$(nproc)}" "$PY" -m pip install --no-build-isolation --no-deps -e . \
  > "$DEST/build.log" 2>&1 || { tail -50 "$DEST/build.log"; exit 1; }
"$PY" - <<'PYEOF'
import torch
import ompq.ops
ops = ["fake_quant", "fake_quant_backward", "lsq_fake_quant", "lsq_fake_quant_backward",
       "adaround_fake_quant", "adaround_fake_quant_backward", "adaround_reg",
       "adaround_reg_backward", "centered_gram"]
missing = [o for o in ops if not torch._C._dispatch_has_kernel_for_dispatch_key(f"ompq::{o}", "CUDA")]
assert not missing, f"no CUDA kernel registered for {missing}"
print("CUDA kernels registered for all", len(ops), "ops")
PYEOF
echo "== tests"
set +e
"$PY" -m pytest -q -p no:cacheprovider tests/test_ops_cuda.py tests/test_ops_fake_quant.py \
  tests/test_ops_gram_adaround.py 2>&1 | tee "$DEST/pytest.log"
status=${PIPESTATUS[0]}
set -e
rm -rf .hypothesis
echo "== benchmark"
"$PY" benchmarks/bench_cuda.py --json "$DEST/bench_cuda.json" 2>&1 | tee "$DEST/bench_cuda.log"
exit "$status"
