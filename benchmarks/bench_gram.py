"""Benchmark: ompq.ops.centered_gram against plain PyTorch on post-ReLU-like features.

Compares, interleaved (A B C A B C ...) over several rounds and quoting medians (seconds → ms):
  * ompq      : `ompq.ops.centered_gram(x)` (compiled kernel)
  * torch     : `xc = x - x.mean(0); xc @ xc.T`
  * reference : `ompq.reference.centered_gram(x)` (same as torch plus input checks)
and reports the speed-up of ompq over torch and each method's max error relative to the largest
entry of an fp64 reference Gram. Data: N samples × D features, `relu(randn) * 2 + 1000` (a mean
~500× the spread, the hard case for fp32). Rows for fp32 at D = 200 000 and 20 000, and for
fp16/bf16 inputs (torch baseline: the same expression after `.float()`).

Usage: python benchmarks/bench_gram.py [--rounds 9] [--threads 2] [--out benchmarks/results/gram.json]
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from typing import Callable

import torch

from ompq import ops, reference
from _results import write_json  # benchmarks/_results.py: this folder is on sys.path


def make_features(n: int, d: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """Post-ReLU-like N×D features with a large mean (≈1000) and a small spread (≈1)."""
    gen = torch.Generator().manual_seed(seed)
    return (torch.relu(torch.randn(n, d, generator=gen)) * 2 + 1000.0).to(dtype)


def torch_gram(x: torch.Tensor) -> torch.Tensor:
    """The plain-PyTorch baseline: centre, then one matrix product."""
    x = x.float()
    xc = x - x.mean(0)
    return xc @ xc.T


def fp64_gram(x: torch.Tensor) -> torch.Tensor:
    xd = x.double()
    xc = xd - xd.mean(0)
    return xc @ xc.T


def rel_err(g: torch.Tensor, ref: torch.Tensor) -> float:
    """Max absolute error divided by the largest reference entry."""
    return float((g.double() - ref).abs().max() / ref.abs().max())


def interleaved(fns: dict[str, Callable[[], object]], rounds: int
                ) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Run every function once per round, in turn (A B C A B C ...).

    Returns (wall seconds, process CPU seconds over all threads) per call. CPU time is the more
    robust measure of the work done when other processes compete for the cores.
    """
    wall: dict[str, list[float]] = {k: [] for k in fns}
    cpu: dict[str, list[float]] = {k: [] for k in fns}
    for f in fns.values():  # warm-up
        f()
    for _ in range(rounds):
        for k, f in fns.items():
            c0, t0 = time.process_time(), time.perf_counter()
            f()
            wall[k].append(time.perf_counter() - t0)
            cpu[k].append(time.process_time() - c0)
    return wall, cpu


def bench_case(n: int, d: int, dtype: torch.dtype, rounds: int) -> dict:
    x = make_features(n, d, dtype)
    ref = fp64_gram(x)
    fns = {
        "ompq": lambda: ops.centered_gram(x),
        "torch": lambda: torch_gram(x),
        "reference": lambda: reference.centered_gram(x),
    }
    times, cpu = interleaved(fns, rounds)
    med = {k: statistics.median(v) for k, v in times.items()}
    cmed = {k: statistics.median(v) for k, v in cpu.items()}
    return {
        "n": n, "d": d, "dtype": str(dtype).replace("torch.", ""), "rounds": rounds,
        "median_ms": {k: v * 1e3 for k, v in med.items()},
        "all_ms": {k: [t * 1e3 for t in v] for k, v in times.items()},
        "median_cpu_ms": {k: v * 1e3 for k, v in cmed.items()},
        "cpu_speedup_vs_torch": cmed["torch"] / cmed["ompq"],
        "speedup_vs_torch": med["torch"] / med["ompq"],
        "speedup_vs_reference": med["reference"] / med["ompq"],
        "max_rel_err": {k: rel_err(f(), ref) for k, f in fns.items()},
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=9, help="interleaved rounds (≥ 7)")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    p.add_argument("--n", type=int, default=64, help="samples N")
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "gram.json"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    cases = [(args.n, 200_000, torch.float32), (args.n, 20_000, torch.float32),
             (args.n, 200_000, torch.float16), (args.n, 200_000, torch.bfloat16)]
    rows = []
    print(f"centered_gram, N={args.n}, {args.threads} threads, median of {args.rounds} "
          f"interleaved rounds; compiled op present: {ops.has_op('centered_gram')}")
    print(f"{'D':>8} {'dtype':>9} {'ompq ms':>9} {'torch ms':>9} {'ref ms':>9} {'speedup':>8} "
          f"{'err ompq':>9} {'err torch':>9} {'cpu-time speedup':>16}")
    for n, d, dt in cases:
        r = bench_case(n, d, dt, args.rounds)
        rows.append(r)
        m, e = r["median_ms"], r["max_rel_err"]
        print(f"{d:>8} {r['dtype']:>9} {m['ompq']:>9.2f} {m['torch']:>9.2f} {m['reference']:>9.2f} "
              f"{r['speedup_vs_torch']:>7.2f}x {e['ompq']:>9.1e} {e['torch']:>9.1e} "
              f"{r['cpu_speedup_vs_torch']:>15.2f}x")
    print(f"load average while measuring: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    result = {
        "format": "ompq.BenchGram", "version": 1,
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": args.threads,
                    "torch": torch.__version__, "cores": os.cpu_count(),
                    "load_average_1min": os.getloadavg()[0]},
        "targets": {"speedup_vs_torch_fp32_d200k": 2.5, "max_rel_err": 1e-5},
        "cases": rows,
    }
    write_json(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
