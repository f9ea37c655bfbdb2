"""Benchmark: exact bit allocation (OR-Tools CP-SAT) for L = 100 layers × 6 candidates.

Synthetic layers (parameter counts 1e3..2e6, MACs 1e6..1e8 per sample, a random ORM, a
distortion table D_i(b) = c_i·4^−b with c_i log-uniform over 1e−3..1e1), candidates
(2, 3, 4, 5, 6, 8), activation bits 8, BOTH a size and a BOPs budget. Measures, interleaved over
`--rounds` rounds (medians), each a full `allocate()` call: the exact ILP of the default
objective (one boolean per layer and width), the exact ILP of the paper's linear objective
(`proxy="orm-linear"`: one integer per layer), and the LP relaxation with budget-safe rounding
(`method="lp-round"`) of the default objective. The first (cold) ILP call, which includes
importing OR-Tools, is reported separately. Then a Pareto sweep of `--sweep` size budgets from one
profile. Target (issue 2): ILP < 1 s.
Usage: python benchmarks/bench_allocate.py [--layers 100] [--rounds 5] [--sweep 10]
Writes benchmarks/results/allocate.json.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np
import torch

from ompq.allocate import allocate
from ompq.distortion import DistortionTable
from ompq.layers import LayerInfo
from ompq.profile import Profile
from _results import write_json  # benchmarks/_results.py: this folder is on sys.path

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
MIB = 8 * 2 ** 20


def synthetic_profile(num: int, seed: int = 0) -> Profile:
    rng = np.random.default_rng(seed)
    layers = [LayerInfo(f"layer{i}", "Conv2d", int(rng.integers(1_000, 2_000_000)),
                        int(rng.integers(10 ** 6, 10 ** 8)), (1,), (1,)) for i in range(num)]
    feats = rng.normal(size=(num, 8)) @ rng.normal(size=(8, 40)) + rng.normal(size=(num, 40))
    orm = torch.tensor(np.corrcoef(feats) ** 2)
    bits = tuple(range(2, 9))
    table = DistortionTable(bits=bits, samples=16)
    for layer, c in zip(layers, 10.0 ** rng.uniform(-3, 1, size=num)):
        table.output[layer.name] = [float(c * 4.0 ** -b) for b in bits]
        table.weight[layer.name] = list(table.output[layer.name])
    return Profile(layers, orm, 64, seed, "auto", False, {}, "synthetic", distortion=table)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--sweep", type=int, default=10)
    ap.add_argument("--out", default=os.path.join(RESULTS, "allocate.json"))
    args = ap.parse_args()
    prof = synthetic_profile(args.layers)
    params = sum(layer.params for layer in prof.layers)
    macs = sum(layer.macs for layer in prof.layers)
    size_mb = 4.3 * params / MIB          # mean 4.3 weight bits
    bops_g = 4.1 * 8 * macs / 1e9         # mean 4.1 weight bits at 8-bit activations
    kw = dict(size_mb=size_mb, bops_g=bops_g, bits=(2, 3, 4, 5, 6, 8), act_bits=8)

    t0 = time.perf_counter()
    cold = allocate(prof, **kw)
    cold_s = time.perf_counter() - t0
    runs = {"ilp": dict(method="ilp"), "ilp orm-linear": dict(proxy="orm-linear"),
            "lp-round": dict(method="lp-round")}
    times: dict[str, list[float]] = {k: [] for k in runs}
    configs = {}
    for _ in range(args.rounds):
        for name, extra in runs.items():
            t0 = time.perf_counter()
            configs[name] = allocate(prof, **extra, **kw)
            times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}

    sizes = list(np.linspace(2.2, 7.8, args.sweep) * params / MIB)
    t0 = time.perf_counter()
    sweep = allocate(prof, size_mb=sizes, bops_g=8 * 8 * macs / 1e9)
    sweep_s = time.perf_counter() - t0

    ilp, lp = configs["ilp"], configs["lp-round"]
    assert ilp.weight_bits == cold.weight_bits
    print(f"L = {args.layers} layers x 6 candidates, size {size_mb:.3f} MiB + BOPs {bops_g:.2f} G"
          f" budgets; medians over {args.rounds} interleaved rounds")
    print(f"  ilp (CP-SAT)   {med['ilp'] * 1e3:8.1f} ms   status {ilp.status}, objective "
          f"{ilp.objective:.4f}, size {ilp.size_mb:.4f} MiB, BOPs {ilp.bops_g:.3f} G   "
          f"(target < 1000 ms)")
    lin = configs["ilp orm-linear"]
    print(f"  ilp cold call  {cold_s * 1e3:8.1f} ms   (includes importing OR-Tools)")
    print(f"  ilp orm-linear {med['ilp orm-linear'] * 1e3:8.1f} ms   status {lin.status}")
    gap = (ilp.objective - lp.objective) / abs(ilp.objective)
    print(f"  lp-round       {med['lp-round'] * 1e3:8.1f} ms   objective {lp.objective:.4f} "
          f"({100 * gap:.2f} % of |optimum| worse than the ILP), size "
          f"{lp.size_mb:.4f} MiB, BOPs {lp.bops_g:.3f} G")
    print(f"  Pareto sweep   {sweep_s * 1e3:8.1f} ms for {len(sizes)} size budgets "
          f"({sweep_s / len(sizes) * 1e3:.1f} ms each), statuses "
          f"{sorted({c.status for c in sweep})}")
    for c in sweep:
        print(f"    size <= {c.budget['size_mb']:.3f} MiB -> {c.size_mb:.3f} MiB, "
              f"mean bits {np.mean(list(c.weight_bits.values())):.2f}, objective {c.objective:.3f}")
    result = {"layers": args.layers, "candidates": [2, 3, 4, 5, 6, 8], "rounds": args.rounds,
              "budget": {"size_mb": size_mb, "bops_g": bops_g}, "times_s": times,
              "median_s": med, "ilp_cold_s": cold_s, "ilp_status": ilp.status,
              "ilp_objective": ilp.objective, "lp_round_objective": lp.objective,
              "lp_round_gap": gap, "orm_linear_status": lin.status,
              "sweep": {"budgets": len(sizes), "seconds": sweep_s,
                        "size_mb": [c.size_mb for c in sweep],
                        "objective": [c.objective for c in sweep],
                        "status": [c.status for c in sweep]}}
    write_json(args.out, result)


if __name__ == "__main__":
    main()
