"""Benchmark ompq's fake-quant kernels against torch's built-ins on CPU (fp32, 2 threads).

Tensors (issue 3): weights 512×512×3×3 quantized per channel (axis 0) at 4 bits, activations
64×64×56×56 quantized per tensor at 8 bits. Every case runs once per round, rounds interleave all
cases (A B C … A B C …), and the table quotes the median time of each case in milliseconds, its
ratio to `x.clone()` (the memory-bandwidth yardstick: allocating and writing the output dominates)
and the speed-up of the ompq op over the matching torch op.

Page faults: every op allocates its output, and whether those pages are freshly mapped (the
kernel zero-fills each 4 KiB page on first touch, ~1 µs a page in a VM) or reused from the heap
depends on glibc malloc's state, which the cases before it leave behind. Left alone this makes
the clone yardstick bimodal. The script therefore runs each tensor twice, each in its own process
with glibc's malloc pinned (mallopt): `fresh` (outputs of 128 KiB or more always freshly mapped:
every case pays its page faults, as a first call or a 51 MB tensor does) and `reused` (no mmap,
no trimming: pages are reused, as in a steady training loop with a caching allocator). `--pages
default` leaves malloc alone.

Run:  python benchmarks/bench_fake_quant.py [--rounds 21] [--json benchmarks/results/fake_quant.json]
"""
from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Callable

import torch

from ompq import ops, reference
from _results import write_json  # benchmarks/_results.py: this folder is on sys.path

Case = Callable[[], object]


def _plain_fq(x: torch.Tensor, s: torch.Tensor, z: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    """The plain-PyTorch expression users write (broadcast s/z already shaped like x)."""
    return (torch.clamp(torch.round(x * (1.0 / s)) + z, qmin, qmax) - z) * s


def _fwd_bwd(fn: Callable[..., torch.Tensor], x: torch.Tensor, g: torch.Tensor,
             *params: torch.Tensor) -> Case:
    """A case that runs fn forward on leaf copies requiring grad, then backward with g."""
    def run() -> None:
        xr = x.detach().requires_grad_()
        ps = [p.detach().requires_grad_() if p.is_floating_point() else p for p in params]
        fn(xr, *ps).backward(g)
    return run


def weight_cases(gen: torch.Generator) -> tuple[dict[str, Case], dict[str, str]]:
    """Cases for the 512×512×3×3 weight, per-channel (axis 0), 4 bits signed [-8, 7]."""
    w = torch.randn(512, 512, 3, 3, generator=gen)
    g = torch.randn(w.shape, generator=gen)
    qmin, qmax = -8, 7
    s = (w.abs().amax(dim=(1, 2, 3)) / qmax).contiguous()
    z = torch.zeros(512)
    zi = z.to(torch.int32)
    sb, zb = s.view(-1, 1, 1, 1), z.view(-1, 1, 1, 1)
    cases: dict[str, Case] = {
        "clone": lambda: w.clone(),
        "ompq fake_quant fwd": lambda: ops.fake_quant(w, s, z, qmin, qmax, 0),
        "torch per_channel fwd": lambda: torch.fake_quantize_per_channel_affine(w, s, zi, 0, qmin, qmax),
        "plain expression fwd": lambda: _plain_fq(w, sb, zb, qmin, qmax),
        "ompq fake_quant fwd+bwd": _fwd_bwd(lambda x: ops.fake_quant(x, s, z, qmin, qmax, 0), w, g),
        "torch per_channel fwd+bwd": _fwd_bwd(
            lambda x: torch.fake_quantize_per_channel_affine(x, s, zi, 0, qmin, qmax), w, g),
        "ompq lsq fwd+bwd": _fwd_bwd(
            lambda x, a, b: ops.lsq_fake_quant(x, a, b, qmin, qmax, 0), w, g, s, z),
        "torch learnable per_channel fwd+bwd": _fwd_bwd(
            lambda x, a, b: torch._fake_quantize_learnable_per_channel_affine(x, a, b, 0, qmin, qmax, 1.0),
            w, g, s, z),
        "reference lsq fwd+bwd": _fwd_bwd(
            lambda x, a, b: reference.lsq_fake_quant(x, a, b, qmin, qmax, 0), w, g, s, z),
    }
    pairs = {
        "ompq fake_quant fwd": "torch per_channel fwd",
        "ompq fake_quant fwd+bwd": "torch per_channel fwd+bwd",
        "ompq lsq fwd+bwd": "torch learnable per_channel fwd+bwd",
    }
    return cases, pairs


def activation_cases(gen: torch.Generator) -> tuple[dict[str, Case], dict[str, str]]:
    """Cases for the 64×64×56×56 activation, per-tensor, 8 bits unsigned [0, 255]."""
    x = torch.randn(64, 64, 56, 56, generator=gen).relu_()
    g = torch.randn(x.shape, generator=gen)
    qmin, qmax = 0, 255
    s = torch.tensor([float(x.max()) / 255.0])
    z = torch.tensor([0.0])
    sf, zf = float(s), int(z)
    cases: dict[str, Case] = {
        "clone": lambda: x.clone(),
        "ompq fake_quant fwd": lambda: ops.fake_quant(x, s, z, qmin, qmax),
        "torch per_tensor fwd": lambda: torch.fake_quantize_per_tensor_affine(x, sf, zf, qmin, qmax),
        "plain expression fwd": lambda: _plain_fq(x, s, z, qmin, qmax),
        "ompq fake_quant fwd+bwd": _fwd_bwd(lambda a: ops.fake_quant(a, s, z, qmin, qmax), x, g),
        "torch per_tensor fwd+bwd": _fwd_bwd(
            lambda a: torch.fake_quantize_per_tensor_affine(a, sf, zf, qmin, qmax), x, g),
        "ompq lsq fwd+bwd": _fwd_bwd(
            lambda a, b, c: ops.lsq_fake_quant(a, b, c, qmin, qmax), x, g, s, z),
        "torch learnable per_tensor fwd+bwd": _fwd_bwd(
            lambda a, b, c: torch._fake_quantize_learnable_per_tensor_affine(a, b, c, qmin, qmax, 1.0),
            x, g, s, z),
    }
    pairs = {
        "ompq fake_quant fwd": "torch per_tensor fwd",
        "ompq fake_quant fwd+bwd": "torch per_tensor fwd+bwd",
        "ompq lsq fwd+bwd": "torch learnable per_tensor fwd+bwd",
    }
    return cases, pairs


def interleaved(cases: dict[str, Case], rounds: int, warmup: int = 1
                ) -> tuple[dict[str, list[float]], dict[str, float]]:
    """Run every case once per round, in order, `rounds` times.

    Returns the seconds of every timed call per case and the mean number of minor page faults
    per call (the kernel zero-filling freshly mapped output pages; glibc maps large outputs
    anew on most calls, so this cost lands on whichever case allocates at the wrong moment).
    """
    times: dict[str, list[float]] = {k: [] for k in cases}
    faults: dict[str, int] = {k: 0 for k in cases}
    for r in range(warmup + rounds):
        for name, fn in cases.items():
            f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            t0 = time.perf_counter()
            fn()
            dt = time.perf_counter() - t0
            if r >= warmup:
                times[name].append(dt)
                faults[name] += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
    return times, {k: v / rounds for k, v in faults.items()}


def summarise(times: dict[str, list[float]], pairs: dict[str, str],
              faults: dict[str, float]) -> list[dict]:
    """Median milliseconds, ratio to clone, page faults per call, and speed-up over the paired
    torch op."""
    med = {k: statistics.median(v) for k, v in times.items()}
    rows = []
    for name, t in med.items():
        row = {"case": name, "median_ms": t * 1e3, "x_clone": t / med["clone"],
               "min_ms": min(times[name]) * 1e3, "max_ms": max(times[name]) * 1e3,
               "page_faults_per_call": faults[name]}
        if name in pairs:
            row["speedup_vs"] = pairs[name]
            row["speedup"] = med[pairs[name]] / t
        rows.append(row)
    return rows


def print_table(title: str, rows: list[dict]) -> None:
    print(f"\n{title}")
    print(f"{'case':40s} {'median ms':>10s} {'x clone':>8s} {'speed-up vs torch':>18s} "
          f"{'faults/call':>12s}")
    for r in rows:
        sp = f"{r['speedup']:.2f}x" if "speedup" in r else ""
        print(f"{r['case']:40s} {r['median_ms']:10.2f} {r['x_clone']:8.2f} {sp:>18s} "
              f"{r['page_faults_per_call']:12.0f}")


def targets(rows: list[dict], per_channel: bool) -> dict[str, bool]:
    """The issue-3 targets for one tensor."""
    by = {r["case"]: r for r in rows}
    t = {
        "fwd <= 1.2 x clone": by["ompq fake_quant fwd"]["x_clone"] <= 1.2,
        "fake_quant fwd+bwd <= 3 x clone": by["ompq fake_quant fwd+bwd"]["x_clone"] <= 3.0,
        "lsq fwd+bwd <= 3 x clone": by["ompq lsq fwd+bwd"]["x_clone"] <= 3.0,
    }
    if per_channel:
        t[">= 5x torch per-channel fwd"] = by["ompq fake_quant fwd"]["speedup"] >= 5.0
        t[">= 5x torch learnable per-channel fwd+bwd"] = by["ompq lsq fwd+bwd"]["speedup"] >= 5.0
    return t


PAGE_MODES = ("fresh", "reused")


def pin_malloc(mode: str) -> None:
    """Pin glibc malloc's handling of large blocks for this process (see the module docstring)."""
    if mode == "default":
        return
    path = ctypes.util.find_library("c")
    libc = ctypes.CDLL(path) if path else None
    if libc is None or not hasattr(libc, "mallopt"):
        raise SystemExit("bench_fake_quant: --pages fresh/reused needs glibc's mallopt; "
                         "use --pages default")
    m_trim_threshold, m_mmap_threshold, m_mmap_max = -1, -3, -4
    if mode == "fresh":
        ok = libc.mallopt(m_mmap_threshold, 128 * 1024)
    else:
        ok = libc.mallopt(m_mmap_max, 0) and libc.mallopt(m_trim_threshold, 1 << 30)
    if not ok:
        raise SystemExit(f"bench_fake_quant: mallopt refused --pages {mode}")


def run_tables(args: argparse.Namespace) -> dict:
    """Both tensors' tables in this process (malloc already pinned)."""
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    out: dict = {}
    for title, build, pc in [
        ("weights 512x512x3x3, per-channel axis 0, 4 bits", weight_cases, True),
        ("activations 64x64x56x56, per-tensor, 8 bits", activation_cases, False),
    ]:
        cases, pairs = build(gen)
        times, faults = interleaved(cases, args.rounds)
        rows = summarise(times, pairs, faults)
        print_table(f"{title} (pages: {args.pages})", rows)
        tg = targets(rows, pc)
        for k, v in tg.items():
            print(f"  target {k}: {'met' if v else 'MISSED'}")
        out[title] = {"rows": rows, "targets": tg}
        del cases
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=21, help="interleaved rounds (>= 7)")
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    ap.add_argument("--pages", choices=("both", "default") + PAGE_MODES, default="both",
                    help="malloc mode: both (fresh and reused, one process each; default), "
                         "fresh, reused or default (malloc left alone)")
    ap.add_argument("--json", default=os.path.join(os.path.dirname(__file__), "results",
                                                   "fake_quant.json"))
    args = ap.parse_args(argv)
    result = {"format": "ompq.Benchmark", "version": 2, "benchmark": "fake_quant",
              "torch": torch.__version__, "threads": args.threads, "rounds": args.rounds,
              "compiled_extension": ops.has_op("fake_quant"),
              "cpu": platform.processor() or platform.machine(), "pages": {}}
    if args.pages == "both":
        for mode in PAGE_MODES:  # one process per mode: mallopt settings are process-wide
            with tempfile.TemporaryDirectory() as tmp:
                part = os.path.join(tmp, "part.json")
                cmd = [sys.executable, os.path.abspath(__file__), "--pages", mode, "--rounds",
                       str(args.rounds), "--threads", str(args.threads), "--json", part]
                subprocess.run(cmd, check=True)
                with open(part) as f:
                    result["pages"][mode] = json.load(f)["pages"][mode]
    else:
        pin_malloc(args.pages)
        result["pages"][args.pages] = run_tables(args)
    write_json(args.json, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
