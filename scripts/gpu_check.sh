#!/usr/bin/env bash
# On a machine with a CUDA GPU and a CUDA build of torch: build ompq with its CUDA kernels, check
# that every op has a CUDA kernel, run the CUDA kernel tests, the GPU benchmark, a memcheck of a few
# kernel tests, then the CPU kernel tests (MEMCHECK_S=0 or CPU_TESTS_S=0 skips that stage).
# Logs and JSON go to $OUT (the device tool's output folder) or build/gpu_check. Needs no
# network: only torch, pytest, hypothesis and numpy (ortools is not imported by the kernels).
# The extension is built in place (no pip), so PYTHONPATH=$ROOT.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEST="${OUT:-$ROOT/build/gpu_check}"
PY="${PYTHON:-python3}"
mkdir -p "$DEST"
cd "$ROOT"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
MEMCHECK_S="${MEMCHECK_S:-150}" CPU_TESTS_S="${CPU_TESTS_S:-120}"  # stage limits, s (0: skip)
t0=$SECONDS
stamp() { echo "== [$((SECONDS - t0)) s] $*"; }
arch=$("$PY" - <<'PYEOF'
import torch
assert torch.cuda.is_available() and torch.version.cuda, "gpu_check.sh: needs a CUDA GPU and a CUDA torch"
major, minor = torch.cuda.get_device_capability()
import sys
print("torch", torch.__version__, "CUDA", torch.version.cuda, "device",
      torch.cuda.get_device_name(), file=sys.stderr)
print(f"{major}.{minor}")
PYEOF
) || exit 1
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-$arch}"
nvcc --version | tail -1
stamp "build for sm $TORCH_CUDA_ARCH_LIST (log: $DEST/build.log)"
MAX_JOBS="${MAX_JOBS:-$(nproc)}" "$PY" setup.py build_ext --inplace > "$DEST/build.log" 2>&1 || {
  grep -n -B2 -A6 "error" "$DEST/build.log" | head -150; tail -30 "$DEST/build.log"; exit 1; }
stamp "registered kernels"
"$PY" - <<'PYEOF' || exit 1
import torch
import ompq.ops
ops = ["fake_quant", "fake_quant_backward", "lsq_fake_quant", "lsq_fake_quant_backward",
       "adaround_fake_quant", "adaround_fake_quant_backward", "adaround_reg",
       "adaround_reg_backward", "centered_gram", "centered_gram_mm", "pack_rows", "unpack_rows",
       "packed_linear"]
missing = [o for o in ops if not torch._C._dispatch_has_kernel_for_dispatch_key(f"ompq::{o}", "CUDA")]
assert not missing, f"no CUDA kernel registered for {missing}"
print("CUDA kernels registered for all", len(ops), "ops")
PYEOF
stamp "CUDA tests"
"$PY" -m pytest -q -p no:cacheprovider -rfE --tb=short tests/test_ops_cuda.py tests/test_ops_gram_mm.py 2>&1 \
  | tee "$DEST/pytest_cuda.log"
status=${PIPESTATUS[0]}
stamp "benchmark"
"$PY" benchmarks/bench_cuda.py --json "$DEST/bench_cuda.json" 2>&1 | tee "$DEST/bench_cuda.log"
bench=${PIPESTATUS[0]}
if [ "$MEMCHECK_S" != 0 ] && command -v compute-sanitizer > /dev/null; then
  stamp "memcheck of a few CUDA tests (at most $MEMCHECK_S s)"
  timeout "$MEMCHECK_S" compute-sanitizer --tool memcheck --error-exitcode 9 \
    "$PY" -m pytest -q -p no:cacheprovider -x tests/test_ops_cuda.py \
    -k "layouts or many_channels or noncontiguous or float64 or adaround_matches or gram_matches or packed_cuda_misaligned" \
    > "$DEST/memcheck.log" 2>&1
  echo "memcheck exit status $? (0 clean, 9 errors found, 124 timed out)"
  grep -m 20 "=========" "$DEST/memcheck.log" || true
  tail -3 "$DEST/memcheck.log"
fi
if [ "$CPU_TESTS_S" != 0 ]; then
  stamp "CPU kernel tests (at most $CPU_TESTS_S s)"
  timeout "$CPU_TESTS_S" "$PY" -m pytest -q -p no:cacheprovider -rfE --tb=short \
    tests/test_ops_fake_quant.py tests/test_ops_gram_adaround.py tests/test_ops_packed.py \
    > "$DEST/pytest_cpu.log" 2>&1
  echo "CPU tests exit status $? (124: timed out)"; tail -3 "$DEST/pytest_cpu.log"
fi
rm -rf .hypothesis
stamp "done: CUDA tests exit $status, benchmark exit $bench"
[ "$status" = 0 ] && [ "$bench" = 0 ]
