"""Benchmark the packed runtime (`ompq.ops.packed_linear`, `ompq.runtime`) on CPU.

1. Linear 4096×4096, batch 1 and 64: FP32 `F.linear`, ompq's packed op at 2, 3, 4, 5, 6 and 8
   bits, torch's int4 path (`aten._weight_int4pack_mm_for_cpu`, bf16 activations, group 128),
   `torch.ao.quantization.quantize_dynamic` int8 and `aten._weight_int8pack_mm`. Every case runs
   once per round and rounds interleave all cases; the table quotes medians (ms), the speed-up
   over FP32 and the effective weight bandwidth (weight bytes read per call ÷ time) as a
   fraction of FP32's.
2. Resident memory of a ResNet-50-shaped model (random weights, every layer at 4 bits): each
   variant is built in its own process and the RSS it adds to a process that imported torch and
   ompq is measured (`/proc/self/statm`, after `malloc_trim`), after loading and after one
   224×224 forward.

Run:  python benchmarks/bench_runtime.py [--rounds 41] [--threads 2] [--json PATH]
"""
from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Callable

import torch
import torch.nn.functional as F

from ompq import ops
from _results import cpu_name, write_json  # benchmarks/_results.py: this folder is on sys.path

N = K = 4096
WIDTHS = (2, 3, 4, 5, 6, 8)
MIB = 2 ** 20


# ----------------------------------------------------------------------------- linear cases
def _packed_case(x: torch.Tensor, bits: int, gen: torch.Generator) -> tuple[Callable, int]:
    codes = torch.randint(0, 2 ** bits, (N, K), generator=gen, dtype=torch.int32)
    packed = ops.pack_rows(codes, bits)
    scale, offset = torch.rand(N, generator=gen) * 0.01, torch.rand(N, generator=gen) * 2 ** bits
    return (lambda: ops.packed_linear(x, packed, bits, K, scale, offset, None)), packed.numel()


def _int4_case(x: torch.Tensor, w: torch.Tensor, group: int = 128) -> tuple[Callable, int]:
    wr = w.reshape(N, K // group, group)
    lo, hi = wr.amin(-1, keepdim=True), wr.amax(-1, keepdim=True)
    scale = (hi - lo).clamp(min=1e-8) / 15
    q = ((wr - lo) / scale).round().clamp(0, 15).to(torch.int32).reshape(N, K)
    sz = torch.cat([scale, lo + 8 * scale], -1).transpose(0, 1).contiguous().to(torch.bfloat16)
    wp = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 2)
    xb = x.to(torch.bfloat16)
    return (lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(xb, wp, group, sz)), \
        wp.numel() + sz.numel() * 2


def _dynamic_int8_case(x: torch.Tensor, w: torch.Tensor) -> tuple[Callable, int]:
    lin = torch.nn.Linear(K, N, bias=False)
    lin.weight.data.copy_(w)
    q = torch.ao.quantization.quantize_dynamic(torch.nn.Sequential(lin), {torch.nn.Linear},
                                               dtype=torch.qint8)
    return (lambda: q(x)), N * K


def _int8pack_case(x: torch.Tensor, gen: torch.Generator) -> tuple[Callable, int]:
    w8 = torch.randint(-128, 127, (N, K), generator=gen, dtype=torch.int8)
    s8 = torch.rand(N, generator=gen)
    return (lambda: torch.ops.aten._weight_int8pack_mm(x, w8, s8)), N * K


def linear_cases(batch: int) -> dict[str, tuple[Callable, int]]:
    """name -> (call, weight bytes read per call)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, K, generator=gen)
    w = torch.randn(N, K, generator=gen) * 0.02
    cases = {"fp32 F.linear": ((lambda: F.linear(x, w)), N * K * 4)}
    for b in WIDTHS:
        cases[f"ompq packed {b}-bit"] = _packed_case(x, b, gen)
    cases["torch int4 (bf16, g128)"] = _int4_case(x, w)
    cases["torch quantize_dynamic int8"] = _dynamic_int8_case(x, w)
    cases["torch _weight_int8pack_mm"] = _int8pack_case(x, gen)
    return cases


def time_interleaved(cases: dict[str, tuple[Callable, int]], rounds: int) -> dict[str, float]:
    """Median seconds per case over `rounds` interleaved rounds (after 3 warm-up calls each)."""
    for fn, _ in cases.values():
        for _ in range(3):
            fn()
    times: dict[str, list[float]] = {k: [] for k in cases}
    for _ in range(rounds):
        for name, (fn, _) in cases.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def linear_table(batch: int, rounds: int) -> list[dict]:
    cases = linear_cases(batch)
    med = time_interleaved(cases, rounds)
    t32, b32 = med["fp32 F.linear"], cases["fp32 F.linear"][1]
    rows = []
    for name, (_, nbytes) in cases.items():
        rows.append({"case": name, "batch": batch, "ms": med[name] * 1e3,
                     "speedup_vs_fp32": t32 / med[name], "weight_bytes": nbytes,
                     "bandwidth_vs_fp32": (nbytes / med[name]) / (b32 / t32)})
    return rows


# ----------------------------------------------------------------------------- memory
def _rss_bytes() -> int:
    """Resident bytes now, after returning freed heap pages to the OS (glibc `malloc_trim`): the
    float architecture `runtime.load` starts from is freed, and glibc would otherwise keep it."""
    gc.collect()
    try:
        ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim(0)
    except (OSError, AttributeError):
        pass
    with open("/proc/self/statm", encoding="utf-8") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _resnet50():
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from bench_profile import ResNet50

    torch.manual_seed(0)
    return ResNet50().eval()


def make_checkpoint(path: str) -> dict:
    """Quantize the ResNet-50-shaped model at 4 bits (min-max scales, activations calibrated on
    two random images) and save it packed; returns its PackedInfo as a dict."""
    from ompq.batchnorm import fold_bn
    from ompq.layers import find_layers
    from ompq.packed import save_packed
    from ompq.quantize import QuantScheme, calibrate_activations, quantize_

    model = _resnet50()
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    fold_bn(model, x)
    quantize_(model, {n: 4 for n, _ in find_layers(model)}, QuantScheme(weight_init="minmax"))
    calibrate_activations(model, [x])
    return save_packed(model, path).to_dict()


def memory_child(variant: str, path: str) -> None:
    """Print the RSS (bytes) this variant adds after loading and after one forward. The
    baseline process has imported everything and run a tiny op of each kind once (module code
    and thread pools are the process's, not the model's)."""
    from ompq import runtime

    torch.set_num_threads(1)
    _resnet50()  # imports the architecture's module; the model is freed at once
    ops.pack_rows(torch.zeros(2, 8, dtype=torch.int32), 4)
    F.conv2d(torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 3, 3))
    base = _rss_bytes()
    model = _resnet50() if variant == "fp32" else runtime.load(path, _resnet50())
    loaded = _rss_bytes() - base
    with torch.no_grad():
        model(torch.randn(1, 3, 224, 224))
    print(json.dumps({"loaded": loaded, "after_forward": _rss_bytes() - base,
                      "tensor_bytes": sum(t.numel() * t.element_size() for t in
                                          list(model.parameters()) + list(model.buffers()))}))


def memory_table() -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "r50.ompq")
        info = make_checkpoint(path)
        out = {"packed": info}
        for variant in ("fp32", "runtime"):
            cmd = [sys.executable, os.path.abspath(__file__), "--memory-child", variant, path]
            res = subprocess.run(cmd, check=True, capture_output=True, text=True)
            out[variant] = json.loads(res.stdout.strip().splitlines()[-1])
    return out


# ----------------------------------------------------------------------------- report
def print_linear(rows: list[dict]) -> None:
    print(f"{'case':32s} {'batch':>5s} {'ms':>9s} {'× FP32':>8s} {'bandwidth vs FP32':>18s}")
    for r in rows:
        print(f"{r['case']:32s} {r['batch']:5d} {r['ms']:9.3f} {r['speedup_vs_fp32']:8.2f} "
              f"{r['bandwidth_vs_fp32']:17.0%}")


def print_memory(mem: dict) -> None:
    pk = mem["packed"]
    other = pk["other_tensor_bytes"] + pk["scale_bytes"]
    print(f"\nResNet-50-shaped at 4 bits: packed weights {pk['weight_bytes'] / MIB:.2f} MiB, "
          f"FP32 biases/BN/scales/act ranges {other / MIB:.2f} MiB")
    for v in ("fp32", "runtime"):
        m = mem[v]
        print(f"  {v:8s} RSS added: loaded {m['loaded'] / MIB:8.2f} MiB, after a 224×224 "
              f"forward {m['after_forward'] / MIB:8.2f} MiB (tensors {m['tensor_bytes'] / MIB:.2f} "
              "MiB)")
    ratio = mem["runtime"]["loaded"] / (pk["weight_bytes"] + other)
    print(f"  runtime loaded RSS ÷ (packed weights + stated FP32 tensors) = {ratio:.2f} "
          "(target ≤ 1.15)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=41)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batches", default="1,64")
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--json", default=None)
    p.add_argument("--memory-child", nargs=2, metavar=("VARIANT", "PATH"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.memory_child:
        memory_child(*args.memory_child)
        return
    torch.set_num_threads(args.threads)
    print(f"CPU: {cpu_name()}, {args.threads} threads, torch {torch.__version__}, "
          f"ompq ops compiled: {ops.HAS_EXTENSION}")
    rows = [r for b in args.batches.split(",") for r in linear_table(int(b), args.rounds)]
    print_linear(rows)
    mem = None if args.no_memory else memory_table()
    if mem:
        print_memory(mem)
    if args.json:
        write_json(args.json, {"cpu": cpu_name(), "threads": args.threads,
                               "torch": torch.__version__, "linear": rows, "memory": mem})


if __name__ == "__main__":
    main()
