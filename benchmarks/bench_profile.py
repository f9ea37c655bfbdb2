"""Benchmark: streaming ORM profiler vs a plain forward and vs the reference approach.

Model: a ResNet-50-shaped net built here (standard bottleneck layout [3, 4, 6, 3], random
weights, no torchvision), input N×3×224×224 (N = 64 by default), CPU, 2 threads.

Measured in ONE run, interleaved (A B C A B C ...), medians over `--rounds` rounds:
  (a) forward  — a plain inference forward of the same batch (eval, torch.inference_mode);
  (a') forward, channels_last — the same with the input in channels_last (what ompq.profile's
      default memory_format="auto" feeds the model: faster oneDNN convolutions);
  (c) ompq     — ompq.profile with the ORM only (`distortion_bits=None`: one forward, a centred
      Gram per layer in hooks, one L×N² product); compared with (a') for the overhead target;
  (c') ompq, memory_format="preserve" — the same on the input as given; compared with (a);
  naive hook   — context: a forward hook per layer that centres and multiplies with plain torch.
Once: (b) reference — keep every layer's feature, then a Python double loop over all L×L
  ordered pairs (i, j) that recomputes both Grams (x xᵀ, then centred) for each pair in numpy,
  as the original code does (mixed_bit/feature_extract.py + ORM.py; numpy/OpenBLAS was also
  faster than the same loop in torch here). It is slow, so `--ref-pairs` random
  pairs are timed and the pair time is extrapolated to all L² pairs (stated in the output); the
  forward that keeps the features is timed in full.
Peak RSS (resource.getrusage ru_maxrss) of (a) and (c), each in its own fresh subprocess.

Targets (issue 2): ompq ≤ 1.2 × forward time (same input layout); ≥ 20 × faster than (b); peak RSS
≤ 1.3 × forward's.
`--table-only`: instead, time once the default ompq.profile (ORM + the distortion table the
default allocation needs) against (a'), and write benchmarks/results/profile_table.json.
Usage: python benchmarks/bench_profile.py [--rounds 3] [--num-samples 64] [--image-size 224]
Writes benchmarks/results/profile.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
import time

import numpy as np
import torch
from torch import nn
from _results import write_json  # benchmarks/_results.py: this folder is on sys.path

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


# ----------------------------------------------------------------------------- model
class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, width: int, stride: int = 1) -> None:
        super().__init__()
        cout = width * self.expansion
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False),
                                            nn.BatchNorm2d(cout))

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class ResNet50(nn.Module):
    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        cin, stages = 64, []
        for width, blocks, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
            layers = []
            for b in range(blocks):
                layers.append(Bottleneck(cin, width, stride if b == 0 else 1))
                cin = width * 4
            stages.append(nn.Sequential(*layers))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2048, num_classes)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def build(args) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = ResNet50().eval()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(args.num_samples, 3, args.image_size, args.image_size, generator=gen)
    return model, x


def layer_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


# ----------------------------------------------------------------------------- variants
def run_forward(model, x) -> float:
    t0 = time.perf_counter()
    with torch.inference_mode():
        model(x)
    return time.perf_counter() - t0


PROFILE_TIMINGS: list[dict] = []


def run_forward_cl(model, x) -> float:
    t0 = time.perf_counter()  # the conversion is timed: ompq.profile converts too
    with torch.inference_mode():
        model(x.contiguous(memory_format=torch.channels_last))
    return time.perf_counter() - t0


def run_ompq(model, x, memory_format: str = "auto", distortion_bits=None) -> float:
    from ompq.profile import profile

    t0 = time.perf_counter()
    prof = profile(model, x, num_samples=x.shape[0], progress=False, memory_format=memory_format,
                   distortion_bits=distortion_bits)
    elapsed = time.perf_counter() - t0
    if memory_format == "auto":
        PROFILE_TIMINGS.append(prof.timings)
    return elapsed


def run_ompq_preserve(model, x) -> float:
    return run_ompq(model, x, "preserve")


def run_naive(model, x) -> float:
    grams = []

    def hook(m, i, o):
        f = o.reshape(o.shape[0], -1).float()
        f = f - f.mean(0, keepdim=True)
        grams.append(f @ f.T)

    handles = [m.register_forward_hook(hook) for _, m in layer_modules(model)]
    t0 = time.perf_counter()
    try:
        with torch.inference_mode():
            model(x)
        g = torch.stack(grams).double().flatten(1)
        g = g / g.norm(dim=1, keepdim=True)
        g @ g.T
    finally:
        for h in handles:
            h.remove()
    return time.perf_counter() - t0


def run_reference(model, x, pairs: int, seed: int = 0) -> dict:
    """Keep all features, then recompute both Grams per pair (timed on a subset of pairs)."""
    feats = []
    handles = [m.register_forward_hook(lambda m, i, o: feats.append(o.clone()))
               for _, m in layer_modules(model)]
    t0 = time.perf_counter()
    try:
        with torch.inference_mode():
            model(x)
    finally:
        for h in handles:
            h.remove()
    t_forward = time.perf_counter() - t0
    num = len(feats)
    # the original loops over ALL ordered pairs (i, j), diagonal included
    all_pairs = [(i, j) for i in range(num) for j in range(num)]
    subset = random.Random(seed).sample(all_pairs, min(pairs, len(all_pairs)))

    arrays = [f.reshape(f.shape[0], -1).numpy() for f in feats]  # the original works in numpy

    def gram(f):  # the original's gram_linear: uncentred x xᵀ
        return f.dot(f.T)

    def center(k):  # the original's center_gram (biased): symmetry check, copy, double centring
        if not np.allclose(k, k.T):
            raise ValueError("Input must be a symmetric matrix.")
        k = k.copy()
        means = np.mean(k, 0, dtype=np.float64)
        means -= np.mean(means) / 2
        k -= means[:, None]
        k -= means[None, :]
        return k

    t1 = time.perf_counter()
    for i, j in subset:  # the original double loop body: both Grams recomputed per pair
        ki, kj = center(gram(arrays[i])), center(gram(arrays[j]))
        float(ki.ravel().dot(kj.ravel()) / (np.linalg.norm(ki) * np.linalg.norm(kj)))
    t_pairs = time.perf_counter() - t1
    feat_bytes = sum(f.numel() * f.element_size() for f in feats)
    per_pair = t_pairs / len(subset)
    return {"forward_keep_s": t_forward, "pairs_timed": len(subset), "pairs_total": len(all_pairs),
            "per_pair_s": per_pair, "total_s": t_forward + per_pair * len(all_pairs),
            "feature_bytes": feat_bytes}


# ----------------------------------------------------------------------------- RSS
def rss_child(args) -> None:
    model, x = build(args)
    torch.set_num_threads(args.threads)
    if args.rss == "forward":
        run_forward(model, x)
    else:
        run_ompq(model, x)
    print(json.dumps({"maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))


def measure_rss(args, mode: str) -> int:
    cmd = [sys.executable, os.path.abspath(__file__), "--rss", mode,
           "--num-samples", str(args.num_samples), "--image-size", str(args.image_size),
           "--threads", str(args.threads)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return int(json.loads(out.strip().splitlines()[-1])["maxrss_kib"])


def table_only(model, x, args) -> None:
    """Default profile (ORM + distortion table) once, against the channels_last forward."""
    from ompq.distortion import DISTORTION_BITS

    fwd = run_forward_cl(model, x)
    full = run_ompq(model, x, distortion_bits=DISTORTION_BITS)
    table_s = PROFILE_TIMINGS[-1]["distortion"]
    print(f"forward (channels_last) {fwd:.2f} s; default ompq.profile with the distortion table "
          f"{full:.2f} s = {full / fwd:.2f}x the forward (table {table_s:.2f} s)")
    write_json(os.path.join(RESULTS, "profile_table.json"),
               {"num_samples": args.num_samples, "image_size": args.image_size,
                "threads": args.threads, "forward_cl_s": fwd, "profile_default_s": full,
                "distortion_s": table_s, "ratio": full / fwd})


# ----------------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--num-samples", type=int, default=64)
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ref-pairs", type=int, default=30, help="pairs timed for the reference")
    ap.add_argument("--skip-reference", action="store_true")
    ap.add_argument("--skip-rss", action="store_true")
    ap.add_argument("--rss", choices=("forward", "profile"), default=None, help=argparse.SUPPRESS)
    ap.add_argument("--table-only", action="store_true",
                    help="time the default profile with its distortion table, once")
    ap.add_argument("--out", default=os.path.join(RESULTS, "profile.json"))
    args = ap.parse_args()
    if args.rss:
        rss_child(args)
        return
    torch.set_num_threads(args.threads)
    from ompq import ops

    model, x = build(args)
    num_layers = len(layer_modules(model))
    print(f"ResNet-50-shaped, {num_layers} layers, N = {args.num_samples}, "
          f"{args.image_size}x{args.image_size}, {args.threads} threads, compiled centered_gram: "
          f"{ops.has_op('centered_gram')}")
    run_forward(model, x[:4])  # warm-up (allocator, kernels)
    run_ompq(model, x[:8])
    if args.table_only:
        table_only(model, x, args)
        return
    variants = (("forward", run_forward), ("forward_cl", run_forward_cl), ("ompq", run_ompq),
                ("ompq_preserve", run_ompq_preserve), ("naive_hook", run_naive))
    times = {name: [] for name, _ in variants}
    cpu = {k: [] for k in times}  # process CPU seconds (user+sys): steadier on a shared machine
    for r in range(args.rounds):
        for name, fn in variants:
            c0 = time.process_time()
            times[name].append(fn(model, x))
            cpu[name].append(time.process_time() - c0)
        print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in times.items()),
              flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    # per-round ratios: robust to load drifting between rounds on a shared machine
    paired = [o / f for o, f in zip(times["ompq"], times["forward_cl"])]
    med_cpu = {k: statistics.median(v) for k, v in cpu.items()}
    ref = None if args.skip_reference else run_reference(model, x, args.ref_pairs)
    rss = None
    if not args.skip_rss:
        rss = {"forward_kib": measure_rss(args, "forward"),
               "ompq_kib": measure_rss(args, "profile")}
    result = {
        "model": "resnet50-shaped (random weights)", "layers": num_layers,
        "num_samples": args.num_samples, "image_size": args.image_size, "threads": args.threads,
        "rounds": args.rounds, "compiled_centered_gram": ops.has_op("centered_gram"),
        "torch": torch.__version__, "machine": platform.machine(),
        "times_s": times, "median_s": med,
        "ratio_ompq_vs_forward_cl": med["ompq"] / med["forward_cl"],
        "ratio_ompq_preserve_vs_forward": med["ompq_preserve"] / med["forward"],
        "ratio_ompq_vs_forward": med["ompq"] / med["forward"],
        "ratio_naive_vs_forward": med["naive_hook"] / med["forward"],
        "cpu_times_s": cpu, "median_cpu_s": med_cpu,
        "ratio_cpu_ompq_vs_forward_cl": med_cpu["ompq"] / med_cpu["forward_cl"],
        "ratio_cpu_naive_vs_forward": med_cpu["naive_hook"] / med_cpu["forward"],
        "paired_ratios_ompq_vs_forward_cl": paired,
        "median_paired_ratio_ompq_vs_forward_cl": statistics.median(paired),
        "reference": ref, "rss": rss,
        "ompq_internal_timings_s": PROFILE_TIMINGS[-args.rounds:],
    }
    print(f"\nmedians over {args.rounds} interleaved rounds:")
    print(f"  (a) plain forward        {med['forward']:8.3f} s")
    print(f"  (a') forward, channels_last {med['forward_cl']:8.3f} s")
    print(f"  (c) ompq.profile         {med['ompq']:8.3f} s   ratio "
          f"{result['ratio_ompq_vs_forward_cl']:.3f} x (a')   (target <= 1.2); "
          f"{result['ratio_ompq_vs_forward']:.3f} x (a)")
    print(f"  (c') ompq, preserve      {med['ompq_preserve']:8.3f} s   ratio "
          f"{result['ratio_ompq_preserve_vs_forward']:.3f} x (a)")
    print(f"      naive hook           {med['naive_hook']:8.3f} s   ratio "
          f"{result['ratio_naive_vs_forward']:.3f} x (a)")
    print(f"      per-round ratios (c)/(a'): {', '.join(f'{r:.3f}' for r in paired)}; "
          f"median {statistics.median(paired):.3f}")
    print(f"      process CPU time (median): (a') {med_cpu['forward_cl']:.2f} s, (c) "
          f"{med_cpu['ompq']:.2f} s (ratio {med_cpu['ompq'] / med_cpu['forward_cl']:.3f}), naive "
          f"{med_cpu['naive_hook']:.2f} s (ratio {med_cpu['naive_hook'] / med_cpu['forward']:.3f}"
          " x (a))")
    gram = statistics.median(t["gram"] for t in PROFILE_TIMINGS[-args.rounds:])
    print(f"      (inside ompq: Gram work {gram:.3f} s, "
          f"{100 * gram / med['ompq']:.1f} % of its time)")
    if ref is not None:
        speed = ref["total_s"] / med["ompq"]
        result["speedup_vs_reference"] = speed
        result["speedup_preserve_vs_reference"] = ref["total_s"] / med["ompq_preserve"]
        print(f"  (b) reference            {ref['total_s']:8.3f} s   = forward keeping features "
              f"{ref['forward_keep_s']:.2f} s + {ref['pairs_total']} pairs x "
              f"{ref['per_pair_s'] * 1e3:.1f} ms (extrapolated from {ref['pairs_timed']} timed "
              f"pairs); features held: {ref['feature_bytes'] / 2**30:.2f} GiB")
        print(f"      ompq speed-up vs (b) {speed:8.1f} x   (target >= 20); with "
              f"memory_format='preserve' {result['speedup_preserve_vs_reference']:.1f} x")
        ompq_stage = statistics.median(t["gram"] + t["orm"]
                                       for t in PROFILE_TIMINGS[-args.rounds:])
        ref_stage = ref["per_pair_s"] * ref["pairs_total"]
        result["stage_speedup_vs_reference"] = ref_stage / ompq_stage
        print(f"      Gram/ORM stage alone: reference pair loop {ref_stage:.1f} s vs ompq Gram+ORM "
              f"{ompq_stage:.2f} s = {ref_stage / ompq_stage:.0f} x")
    if rss is not None:
        ratio = rss["ompq_kib"] / rss["forward_kib"]
        result["ratio_rss_ompq_vs_forward"] = ratio
        print(f"  peak RSS: forward {rss['forward_kib'] / 2**20:.2f} GiB, ompq "
              f"{rss['ompq_kib'] / 2**20:.2f} GiB, ratio {ratio:.3f}   (target <= 1.3)")
    write_json(args.out, result)


if __name__ == "__main__":
    main()
