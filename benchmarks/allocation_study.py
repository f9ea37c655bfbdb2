"""Allocation study: does OMPQ's orthogonality allocation beat uniform, HAWQ-trace and random?

For each zoo model and average weight widths (default 2.5, 3 and 4 bits; size budget =
avg_bits × total weights / 8 / 2**20 MiB; activations 8 bits; candidates 2,3,4,5,6,8) it
allocates bits with each proxy (the same exact ILP), runs PTQ (BRECQ-style AdaRound + LSQ act,
iterations reduced to fit a CPU) and evaluates top-1 on the Fashion-MNIST test split. For one
size it also runs a short QAT. Correlation: ≥ 30 random configurations at one size (random-proxy
allocations with seeds 0..K-1, i.e. random importance under the same budget), PTQ with reduced
iterations, Kendall τ / Spearman ρ (with p-values) of top-1 against the ORM objective
(Σ b_i · importance_i) and against the HAWQ objective (Σ −avg_trace_i · ‖Q_b(W_i) − W_i‖²).

Search time: "orm" = profile (forward + Grams + ORM) + ILP; "hawq" = Hessian trace (Hutchinson)
+ perturbations + ILP; "uniform"/"random" = ILP only.

Usage:  python benchmarks/allocation_study.py [--models resnet20 mobilenetv2] [--iters 100] ...
Writes benchmarks/results/allocation_study.json and prints a Markdown table.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ompq import proxies, zoo  # noqa: E402
from ompq.allocate import allocate  # noqa: E402
from ompq.data import fashion_mnist  # noqa: E402
from ompq.evaluate import evaluate  # noqa: E402
from ompq.profile import profile  # noqa: E402
from ompq.ptq import ptq  # noqa: E402
from ompq.qat import qat  # noqa: E402

BITS = (2, 3, 4, 5, 6, 8)


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=None, help="zoo models (default: all shipped)")
    p.add_argument("--avg-bits", nargs="+", type=float, default=[2.5, 3.0, 4.0])
    p.add_argument("--iters", type=int, default=0,
                   help="AdaRound iterations per block (0 = nearest rounding, MSE scales)")
    p.add_argument("--act-iters", type=int, default=0, help="LSQ act iterations per block")
    p.add_argument("--calib", type=int, default=128, help="calibration samples")
    p.add_argument("--eval", type=int, default=1000, help="test samples evaluated")
    p.add_argument("--corr-configs", type=int, default=30)
    p.add_argument("--corr-iters", type=int, default=0,
                   help="AdaRound iterations for the correlation configs (0 = nearest rounding)")
    p.add_argument("--corr-avg-bits", type=float, default=3.0)
    p.add_argument("--corr-models", nargs="+", default=["resnet20"])
    p.add_argument("--qat-avg-bits", type=float, default=3.0)
    p.add_argument("--qat-samples", type=int, default=512)
    p.add_argument("--qat-models", nargs="+", default=["resnet20"])
    p.add_argument("--hawq-iters", type=int, default=100, help="max Hutchinson vectors")
    p.add_argument("--hawq-samples", type=int, default=128, help="Hessian batch (samples)")
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/allocation_study.json"))
    p.add_argument("--threads", type=int, default=2)
    return p.parse_args(argv)


def save(path: str, doc: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1)
    os.replace(tmp, path)


def main(argv=None) -> int:
    a = parse(argv)
    torch.set_num_threads(a.threads)
    t_start = time.perf_counter()
    _cache_hawq(a)
    models = a.models or [m for m in zoo.list_models() if zoo.checkpoint_path(m).exists()]
    train, test = fashion_mnist("train"), fashion_mnist("test")
    ev = (test.tensors[0][:a.eval], test.tensors[1][:a.eval])
    doc = {"format": "ompq.AllocationStudy", "version": 1, "settings": vars(a),
           "machine": {"cpu_threads": a.threads, "platform": platform.platform(),
                       "torch": torch.__version__}, "records": [], "correlation": []}
    recs = doc["records"]
    for name in models:
        model = zoo.load(name)
        fp = evaluate(model, ev, progress=False)
        recs.append({"model": name, "budget_avg_bits": None, "budget_mb": None, "method": "fp32",
                     "stage": "fp32", "bits": None, "size_mb": None, "bops_g": None,
                     "top1": fp["top1"], "loss": fp["loss"], "n_eval": fp["n"], "seconds": 0.0})
        print(f"[{name}] fp32 top1 {fp['top1']:.2f}", flush=True)
        t0 = time.perf_counter()
        prof = profile(model, train, num_samples=64, seed=0, progress=False)
        prof_s = time.perf_counter() - t0
        total = sum(layer.params for layer in prof.layers)
        sizes = [ab * total / 8 / 2 ** 20 for ab in a.avg_bits]
        cfgs: dict[str, list] = {}
        secs: dict[str, float] = {}
        for method in ("uniform", "orm", "hawq", "random"):
            kw = {}  # proxy="uniform" ties all layers itself
            if method == "hawq":
                kw.update(model=model, data=train)
            t1 = time.perf_counter()
            out = allocate(prof, size_mb=list(sizes), bits=BITS, act_bits=8, proxy=method,
                           seed=0, **kw)
            secs[method] = time.perf_counter() - t1 + (prof_s if method == "orm" else 0.0)
            cfgs[method] = out
            print(f"[{name}] search {method}: {secs[method]:.2f} s", flush=True)
        doc.setdefault("search_seconds", {})[name] = dict(secs, profile=prof_s)
        for ab, s, k in zip(a.avg_bits, sizes, range(len(sizes))):
            for method in ("uniform", "orm", "hawq", "random"):
                cfg = cfgs[method][k]
                t1 = time.perf_counter()
                q = ptq(model, cfg, train, num_samples=a.calib, iters=a.iters,
                        act_iters=a.act_iters, seed=0, progress=False)
                ptq_s = time.perf_counter() - t1
                r = evaluate(q, ev, progress=False)
                recs.append({"model": name, "budget_avg_bits": ab, "budget_mb": s,
                             "method": method, "stage": "ptq", "bits": cfg.weight_bits,
                             "size_mb": cfg.size_mb, "bops_g": cfg.bops_g, "top1": r["top1"],
                             "loss": r["loss"], "n_eval": r["n"],
                             "seconds": secs[method], "ptq_seconds": ptq_s})
                print(f"[{name}] {ab} bits {method:8s} size {cfg.size_mb:.4f} MiB "
                      f"top1 {r['top1']:.2f} (ptq {ptq_s:.0f} s)", flush=True)
                save(a.out, doc)
        if name in a.qat_models and a.qat_avg_bits in a.avg_bits:
            k = a.avg_bits.index(a.qat_avg_bits)
            g = torch.Generator().manual_seed(0)
            idx = torch.randperm(len(train), generator=g)[:a.qat_samples]
            sub = (train.tensors[0][idx], train.tensors[1][idx])
            for method in ("uniform", "orm", "hawq", "random"):
                cfg = cfgs[method][k]
                t1 = time.perf_counter()
                q = qat(model, cfg, sub, epochs=1, lr=1e-3, batch_size=64, method="lsq",
                        seed=0, progress=False)
                r = evaluate(q, ev, progress=False)
                recs.append({"model": name, "budget_avg_bits": a.qat_avg_bits,
                             "budget_mb": sizes[k], "method": method, "stage": "qat",
                             "bits": cfg.weight_bits, "size_mb": cfg.size_mb,
                             "bops_g": cfg.bops_g, "top1": r["top1"], "loss": r["loss"],
                             "n_eval": r["n"], "seconds": secs[method],
                             "qat_seconds": time.perf_counter() - t1,
                             "qat": {"epochs": 1, "samples": a.qat_samples, "lr": 1e-3,
                                     "batch_size": 64, "method": "lsq"}})
                print(f"[{name}] QAT {a.qat_avg_bits} bits {method:8s} top1 {r['top1']:.2f}",
                      flush=True)
                save(a.out, doc)
        if name in a.corr_models:
            doc["correlation"].append(correlation(a, name, model, prof, train, ev))
            save(a.out, doc)
    doc["total_seconds"] = time.perf_counter() - t_start
    save(a.out, doc)
    print(table(doc))
    return 0


def _cache_hawq(a) -> None:
    """Compute the Hessian traces once per model: allocate's sweep and the correlation reuse
    them (the recorded search time is that of the one computation)."""
    orig = proxies.proxy_values
    cache: dict = {}  # keyed by the model itself (kept alive here, so never confused)

    def cached(proxy, prof, cand, **kw):
        if proxy != "hawq":
            return orig(proxy, prof, cand, **kw)
        key = kw.get("model")
        if key not in cache:
            kw.setdefault("num_samples", a.hawq_samples)
            kw.setdefault("max_iters", a.hawq_iters)
            cache[key] = orig(proxy, prof, BITS, **kw)
        return cache[key]

    proxies.proxy_values = cached


def correlation(a, name, model, prof, train, ev) -> dict:
    from scipy.stats import kendalltau, spearmanr
    total = sum(layer.params for layer in prof.layers)
    size = a.corr_avg_bits * total / 8 / 2 ** 20
    orm_cfg = allocate(prof, size_mb=size, bits=BITS, proxy="orm")
    hawq = proxies.proxy_values("hawq", prof, BITS, model=model, data=train, seed=0)
    rows = []
    for seed in range(a.corr_configs):
        cfg = allocate(prof, size_mb=size, bits=BITS, proxy="random", seed=seed + 1)
        q = ptq(model, cfg, train, num_samples=a.calib, iters=a.corr_iters,
                act_iters=0, seed=0, progress=False)
        r = evaluate(q, ev, progress=False)
        wb = cfg.weight_bits
        rows.append({"seed": seed + 1, "bits": wb, "size_mb": cfg.size_mb, "bops_g": cfg.bops_g,
                     "top1": r["top1"],
                     "orm_objective": sum(wb[n] * orm_cfg.importance[n] for n in wb),
                     "hawq_objective": sum(hawq.values[n][wb[n]] for n in wb)})
        print(f"[{name}] corr {seed + 1}: top1 {r['top1']:.2f}", flush=True)
    acc = [r["top1"] for r in rows]
    out = {"model": name, "budget_avg_bits": a.corr_avg_bits, "budget_mb": size,
           "n_configs": len(rows), "ptq_iters": a.corr_iters, "configs": rows}
    for key in ("orm", "hawq"):
        obj = [r[f"{key}_objective"] for r in rows]
        tau, tp = kendalltau(obj, acc)
        rho, rp = spearmanr(obj, acc)
        out[key] = {"kendall_tau": _f(tau), "kendall_p": _f(tp), "spearman_rho": _f(rho),
                    "spearman_p": _f(rp)}
    return out


def _f(x) -> float | None:
    x = float(x)
    return None if math.isnan(x) else x


def table(doc: dict) -> str:
    lines = ["| model | avg bits | size MiB | stage | method | top-1 % | search s |",
             "|---|---|---|---|---|---|---|"]
    for r in doc["records"]:
        ab = "-" if r["budget_avg_bits"] is None else f"{r['budget_avg_bits']:g}"
        sz = "-" if r["size_mb"] is None else f"{r['size_mb']:.4f}"
        lines.append(f"| {r['model']} | {ab} | {sz} | {r['stage']} | {r['method']} | "
                     f"{r['top1']:.2f} | {r['seconds']:.2f} |")
    for c in doc["correlation"]:
        lines.append("")
        lines.append(f"Correlation, {c['model']}, {c['n_configs']} random configs at "
                     f"{c['budget_avg_bits']:g} avg bits (PTQ iters {c['ptq_iters']}):")
        for key in ("orm", "hawq"):
            s = c[key]
            lines.append(f"- {key}: Kendall tau {s['kendall_tau']} (p {s['kendall_p']}), "
                         f"Spearman rho {s['spearman_rho']} (p {s['spearman_p']})")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
