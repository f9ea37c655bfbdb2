"""Allocation study: does the default objective beat uniform and HAWQ-trace at equal size?

Grid (`run`): for each zoo model, average weight width (2, 2.5, 3, 4 bits with 8-bit
activations, and 3 bits with 4-bit activations; budget = avg × weights / 8 / 2**20 MiB) and seed,
every method allocates bits with the exact ILP, then PTQ runs (`--stage rtn`: round to nearest
with MSE weight scales; `--stage adaround`: the demo's 300 AdaRound + 30 LSQ iterations per
block) and top-1 is measured on the full 10 000-image test split. Methods:

- error      the default: minimise Σ_i D_i(b_i), the layers' output NSR (θ ≡ 1)
- orm        the same, ORM-weighted (θ = ORM importance, β = 3)
- random     the same, with the ORM weights shuffled over the layers (seeded null control)
- orm-linear the paper's objective Σ b_i·w_i with the reference's PTQ candidates {2, 3, 4}
- hawq       HAWQ-V2 trace × ‖Q_b(W) − W‖² (Hutchinson, 30 vectors, 128 images)
- uniform    the widest single width that fits (at 2.5 bits: 2 bits, labelled "floor")

A seed sets the profile sample, the calibration draw, the reconstruction and HAWQ's sample and
vectors. Each record keeps the per-image correctness (base64 bitmask), so `report` can bootstrap
paired differences over images and seeds.

Correlation (`corr`): ≥ 100 bit configurations of one model at one budget, spread around uniform
(random ±1/±2-bit moves on random layers, repaired to the budget), round-to-nearest PTQ on the
full test split; Kendall τ / Spearman ρ of each objective against top-1 with bootstrap CIs, and
the accuracy repeatability over two calibration seeds as the noise ceiling.

Resumable: every finished record is appended to `--out` at once (an atomic rewrite), and a rerun
skips what is there. Different `--out` shards can run in parallel; `report` merges them.

Usage:
  python benchmarks/allocation_study.py run --stage rtn --seeds 0 1 2 --out benchmarks/results/allocation_study.rtn.json
  python benchmarks/allocation_study.py run --stage adaround --avg-bits 3 --seeds 0 1 2 --out ....adaround.json
  python benchmarks/allocation_study.py corr --configs 100 --out ....corr.json
  python benchmarks/allocation_study.py timing --out ....timing.json      (on a quiet machine)
  python benchmarks/allocation_study.py report benchmarks/results/allocation_study.*.json \
      --merge benchmarks/results/allocation_study.json
"""
from __future__ import annotations

import argparse
import base64
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ompq import proxies, zoo  # noqa: E402
from ompq.allocate import allocate  # noqa: E402
from ompq.bitconfig import CostModel  # noqa: E402
from ompq.checkpoint import write_text_atomic  # noqa: E402
from ompq.data import fashion_mnist  # noqa: E402
from ompq.objectives import PAPER_BITS  # noqa: E402
from ompq.profile import profile  # noqa: E402
from ompq.ptq import ptq  # noqa: E402

BITS = (2, 3, 4, 5, 6, 8)
METHODS = ("error", "orm", "random", "orm-linear", "hawq", "uniform")
BUDGETS = ((2.0, 8), (2.5, 8), (3.0, 8), (4.0, 8), (3.0, 4))  # (avg weight bits, act bits)
STAGES = {"rtn": {"iters": 0, "act_iters": 0}, "adaround": {"iters": 300, "act_iters": 30}}
PROFILE_SAMPLES, CALIB = 64, 512
HAWQ = {"num_samples": 128, "max_iters": 30}


# ----------------------------------------------------------------------------- storage
class Store:
    """Records in a JSON file, rewritten atomically after every append."""

    def __init__(self, path: str, settings: dict) -> None:
        self.path = path
        if os.path.exists(path):
            with open(path) as fh:
                self.doc = json.load(fh)
        else:
            self.doc = {"format": "ompq.AllocationStudy", "version": 2, "settings": settings,
                        "machine": machine(), "records": []}
        self.keys = {self.key(r) for r in self.doc["records"]}

    @staticmethod
    def key(r: dict) -> tuple:
        return tuple(r.get(k) for k in ("kind", "model", "stage", "avg_bits", "act_bits",
                                        "method", "seed", "config"))

    def has(self, **k: Any) -> bool:
        return self.key(k) in self.keys

    def add(self, rec: dict) -> None:
        self.doc["records"].append(rec)
        self.keys.add(self.key(rec))
        write_text_atomic(json.dumps(self.doc), self.path)


def machine() -> dict:
    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {"cpu": cpu, "threads": torch.get_num_threads(), "platform": platform.platform(),
            "torch": torch.__version__}


def pack(correct: torch.Tensor) -> str:
    return base64.b64encode(np.packbits(correct.numpy().astype(np.uint8)).tobytes()).decode()


def unpack(text: str, n: int) -> np.ndarray:
    return np.unpackbits(np.frombuffer(base64.b64decode(text), dtype=np.uint8))[:n].astype(bool)


@torch.no_grad()
def correct_mask(model: torch.nn.Module, test: tuple) -> torch.Tensor:
    x, y = test
    model.eval()
    out = [model(x[i:i + 1000]).argmax(1) == y[i:i + 1000] for i in range(0, x.size(0), 1000)]
    return torch.cat(out)


# ----------------------------------------------------------------------------- grid
def search(method: str, prof, model, train, size: float, act: int, seed: int,
           hawq_cache: dict) -> tuple[Any, float]:
    """(BitConfig, search seconds excluding the profile) of one method at one budget."""
    kw: dict[str, Any] = {"bits": BITS, "act_bits": act, "seed": seed}
    if method == "orm-linear":
        kw["bits"] = PAPER_BITS["ptq"]
    t0 = time.perf_counter()
    if method == "hawq":
        key = (id(model), seed)
        if key not in hawq_cache:
            t1 = time.perf_counter()
            hawq_cache[key] = (proxies.proxy_values("hawq", prof, BITS, model=model, data=train,
                                                    seed=seed, **HAWQ),
                               time.perf_counter() - t1)
        res, trace_s = hawq_cache[key]
        cfg = allocate(prof, size_mb=size, proxy=res, **kw)  # a precomputed ProxyResult
        return cfg, time.perf_counter() - t0 + trace_s
    cfg = allocate(prof, size_mb=size, proxy=method, **kw)
    return cfg, time.perf_counter() - t0


def run(a: argparse.Namespace) -> None:
    store = Store(a.out, vars(a))
    train, test = fashion_mnist("train"), fashion_mnist("test")
    test_t = test.tensors
    stage = STAGES[a.stage]
    hawq_cache: dict = {}
    for name in a.models:
        model = zoo.load(name)
        if not store.has(kind="fp32", model=name):
            acc = correct_mask(model, test_t)
            store.add({"kind": "fp32", "model": name, "top1": float(acc.float().mean() * 100),
                       "n": int(acc.numel()), "correct": pack(acc)})
        for seed in a.seeds:
            prof, prof_s = None, 0.0
            for ab, act in BUDGETS:
                if ab not in a.avg_bits or (act != 8 and not a.act4):
                    continue
                for method in a.methods:
                    if store.has(kind="ptq", model=name, stage=a.stage, avg_bits=ab,
                                 act_bits=act, method=method, seed=seed):
                        continue
                    if prof is None:
                        t0 = time.perf_counter()
                        prof = profile(model, train, num_samples=PROFILE_SAMPLES, seed=seed,
                                       progress=False)
                        prof_s = time.perf_counter() - t0
                    size = CostModel.from_layers(prof.layers).size_mb_at(ab)
                    cfg, search_s = search(method, prof, model, train, size, act, seed,
                                           hawq_cache)
                    if method != "hawq" and method != "uniform":
                        search_s += prof_s
                    t0 = time.perf_counter()
                    q = ptq(model, cfg, train, num_samples=CALIB, seed=seed, progress=False,
                            act_bits=act, **stage).model
                    ptq_s = time.perf_counter() - t0
                    acc = correct_mask(q, test_t)
                    top1 = float(acc.float().mean() * 100)
                    store.add({"kind": "ptq", "model": name, "stage": a.stage, "avg_bits": ab,
                               "act_bits": act, "method": method, "seed": seed,
                               "budget_mb": size, "size_mb": cfg.size_mb, "bops_g": cfg.bops_g,
                               "bits": cfg.weight_bits, "top1": top1, "n": int(acc.numel()),
                               "search_seconds": search_s, "profile_seconds": prof_s,
                               "ptq_seconds": ptq_s,
                               "floor": method == "uniform" and cfg.size_mb < size * 0.99,
                               "correct": pack(acc)})
                    print(f"[{name} {a.stage} seed {seed}] {ab:g}b A{act} {method:10s} "
                          f"{cfg.size_mb:.4f} MiB top1 {top1:.2f} (search {search_s:.2f} s, "
                          f"ptq {ptq_s:.0f} s)", flush=True)


# ----------------------------------------------------------------------------- correlation
def _coin_pick(rng: np.random.Generator, bits: np.ndarray, order: np.ndarray) -> int:
    """The first layer in `order` above the narrowest width whose coin flip comes up; passes
    repeat until one does (the caller checks that such a layer exists)."""
    while True:
        for i in order:
            if bits[i] > BITS[0] and rng.random() < 0.5:
                return int(i)


def neighbour(rng: np.random.Generator, params: np.ndarray, base: int, cap: int) -> list[int]:
    """A random config around uniform `base`: ±1/±2-bit moves on random layers, then repaired
    to the budget `cap` (bits) by lowering, and raised while it still fits."""
    num = len(params)
    bits = np.full(num, base)
    moves = rng.integers(2, num // 2 + 1)
    for i in rng.choice(num, size=moves, replace=False):
        bits[i] = BITS[int(np.clip(BITS.index(base) + rng.choice([-2, -1, 1, 2]), 0,
                                   len(BITS) - 1))]
    order = rng.permutation(num)
    while int(bits @ params) > cap and (bits > BITS[0]).any():  # lower random layers
        i = _coin_pick(rng, bits, order)
        bits[i] = BITS[BITS.index(int(bits[i])) - 1]
    for i in order:  # fill: raise one step where it still fits
        if bits[i] < BITS[-1]:
            up = BITS[BITS.index(int(bits[i])) + 1]
            if int(bits @ params) + (up - bits[i]) * params[i] <= cap:
                bits[i] = up
    return [int(b) for b in bits]


def corr(a: argparse.Namespace) -> None:
    store = Store(a.out, vars(a))
    train, test = fashion_mnist("train"), fashion_mnist("test")
    name, ab = a.model, a.corr_bits
    model = zoo.load(name)
    prof = profile(model, train, num_samples=PROFILE_SAMPLES, seed=0, progress=False)
    names = prof.names
    params = np.array([layer.params for layer in prof.layers], dtype=np.int64)
    cap = int(ab * params.sum())
    rng = np.random.default_rng(1234)
    configs = [neighbour(rng, params, int(ab), cap) for _ in range(a.configs)]
    hawq = proxies.proxy_values("hawq", prof, BITS, model=model, data=train, seed=0, **HAWQ)
    objs = {m: _objective_values(prof, m) for m in ("error", "orm", "orm-linear")}
    for k, bits in enumerate(configs):
        for seed in ([0, 1] if k < a.repeat else [0]):
            if store.has(kind="corr", model=name, avg_bits=ab, seed=seed, config=k):
                continue
            wb = dict(zip(names, bits))
            q = ptq(model, wb, train, num_samples=CALIB, iters=0, act_iters=0, seed=seed,
                    progress=False).model
            acc = correct_mask(q, test.tensors)
            rec = {"kind": "corr", "model": name, "avg_bits": ab, "seed": seed, "config": k,
                   "bits": wb, "size_mb": int(np.dot(bits, params)) / 8 / 2 ** 20,
                   "top1": float(acc.float().mean() * 100), "n": int(acc.numel()),
                   "objective": {"hawq": sum(hawq.values[n][wb[n]] for n in names)}}
            for m, table in objs.items():
                rec["objective"][m] = sum(table[n][wb[n]] for n in names)
            store.add(rec)
            print(f"[corr {name} {k} seed {seed}] top1 {rec['top1']:.2f}", flush=True)


def _objective_values(prof, method: str) -> dict:
    """layer -> {bits: value} of an objective (values the ILP maximises)."""
    from ompq import objectives

    cand = {n: BITS for n in prof.names}
    obj = objectives.build(method, prof, cand, beta=objectives.DEFAULT_BETA, seed=0)
    return dict(zip(prof.names, obj.values))


# ----------------------------------------------------------------------------- timing
def timing(a: argparse.Namespace) -> None:
    """Search time on a quiet machine: plain profile (no table), profile with the table, the
    default ILP, and the Hessian trace (+ ILP), medians over `--repeats` interleaved rounds."""
    store = Store(a.out, vars(a))
    train = fashion_mnist("train")
    for name in a.models:
        model = zoo.load(name)
        profile(model, train, num_samples=PROFILE_SAMPLES, seed=0, progress=False)  # warm-up
        t: dict[str, list[float]] = {"plain": [], "profile": [], "ilp": [], "hawq": []}
        for k in range(a.repeats):
            t0 = time.perf_counter()
            profile(model, train, num_samples=PROFILE_SAMPLES, seed=k, progress=False,
                    distortion_bits=None)
            t["plain"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            prof = profile(model, train, num_samples=PROFILE_SAMPLES, seed=k, progress=False)
            t["profile"].append(time.perf_counter() - t0)
            size = CostModel.from_layers(prof.layers).size_mb_at(3)
            t0 = time.perf_counter()
            allocate(prof, size_mb=size, bits=BITS)
            t["ilp"].append(time.perf_counter() - t0)
            if k < a.hawq_repeats:
                t0 = time.perf_counter()
                res = proxies.proxy_values("hawq", prof, BITS, model=model, data=train, seed=k,
                                           **HAWQ)
                allocate(prof, size_mb=size, bits=BITS, proxy=res)
                t["hawq"].append(time.perf_counter() - t0)
        med = {k: float(np.median(v)) for k, v in t.items()}
        store.add({"kind": "timing", "model": name, "seconds": med, "runs": t,
                   "default": med["profile"] + med["ilp"]})
        print(f"[{name}] plain {med['plain']:.3f} s, profile+table {med['profile']:.3f} s, "
              f"ILP {med['ilp']:.3f} s, hawq {med['hawq']:.2f} s", flush=True)


# ----------------------------------------------------------------------------- report
def load(paths: list[str]) -> list[dict]:
    """Records of every file, each (kind, model, stage, budget, method, seed, config) once."""
    recs, seen = [], set()
    for p in paths:
        with open(p) as fh:
            for r in json.load(fh)["records"]:
                if Store.key(r) not in seen:
                    seen.add(Store.key(r))
                    recs.append(r)
    return recs


def paired_ci(a: list[dict], b: list[dict], rng: np.random.Generator, reps: int = 2000
              ) -> tuple[float, float, float, int]:
    """Mean paired difference (points) of top-1 a − b over common seeds, and a 95 % bootstrap CI
    resampling seeds and, within each, images."""
    seeds = sorted({r["seed"] for r in a} & {r["seed"] for r in b})
    if not seeds:
        return float("nan"), float("nan"), float("nan"), 0
    da = {r["seed"]: unpack(r["correct"], r["n"]) for r in a}
    db = {r["seed"]: unpack(r["correct"], r["n"]) for r in b}
    diffs = np.stack([da[s].astype(np.int8) - db[s].astype(np.int8) for s in seeds])  # S×N
    mean = diffs.mean() * 100
    n = diffs.shape[1]
    boots = np.empty(reps)
    for k in range(reps):
        ss = rng.integers(0, len(seeds), len(seeds))
        idx = rng.integers(0, n, n)
        boots[k] = diffs[ss][:, idx].mean() * 100
    lo, hi = np.percentile(boots, [2.5, 97.5])
    return float(mean), float(lo), float(hi), len(seeds)


def report(a: argparse.Namespace) -> None:
    recs = load(a.paths)
    rng = np.random.default_rng(0)
    out: dict[str, Any] = {"grid": [], "targets": {}, "correlation": None}
    ptq_recs = [r for r in recs if r["kind"] == "ptq"]
    lines = []
    for stage in ("rtn", "adaround"):
        rows = [r for r in ptq_recs if r["stage"] == stage]
        if not rows:
            continue
        lines += [f"\n### {stage}: top-1 % on the 10 000 test images (mean over seeds)\n",
                  "| model | avg bits | A | " + " | ".join(METHODS) +
                  " | error − uniform [95 % CI] | error − hawq [95 % CI] | seeds |",
                  "|---|---|---|" + "---|" * len(METHODS) + "---|---|---|"]
        for name in sorted({r["model"] for r in rows}):
            for ab, act in BUDGETS:
                cell = {m: [r for r in rows if r["model"] == name and r["avg_bits"] == ab
                            and r["act_bits"] == act and r["method"] == m] for m in METHODS}
                if not cell["error"]:
                    continue
                # compare like with like: only the seeds every method of the row has finished
                common = set.intersection(*({r["seed"] for r in v} for v in cell.values() if v))
                cell = {m: [r for r in v if r["seed"] in common] for m, v in cell.items()}
                vals = []
                for m in METHODS:
                    if not cell[m]:
                        vals.append("–")
                        continue
                    mean = np.mean([r["top1"] for r in cell[m]])
                    tag = " (2-bit floor)" if m == "uniform" and cell[m][0].get("floor") else ""
                    vals.append(f"{mean:.2f}{tag}")
                du = paired_ci(cell["error"], cell["uniform"], rng)
                dh = paired_ci(cell["error"], cell["hawq"], rng)
                best = {m: paired_ci(cell["error"], cell[m], rng) for m in
                        ("uniform", "hawq", "orm") if cell[m]}
                row = {"stage": stage, "model": name, "avg_bits": ab, "act_bits": act,
                       "mean": {m: (float(np.mean([r["top1"] for r in cell[m]]))
                                    if cell[m] else None) for m in METHODS},
                       "seeds": {m: len(cell[m]) for m in METHODS},
                       "diff": {k: dict(zip(("mean", "lo", "hi", "seeds"), v))
                                for k, v in best.items()},
                       "uniform_floor": bool(cell["uniform"] and cell["uniform"][0].get("floor"))}
                for m in ("random", "orm-linear"):
                    if cell[m]:
                        row["diff"][m] = dict(zip(("mean", "lo", "hi", "seeds"),
                                                  paired_ci(cell["error"], cell[m], rng)))
                out["grid"].append(row)
                lines.append(f"| {name} | {ab:g} | {act} | " + " | ".join(vals) +
                             f" | {du[0]:+.2f} [{du[1]:+.2f}, {du[2]:+.2f}] | "
                             f"{dh[0]:+.2f} [{dh[1]:+.2f}, {dh[2]:+.2f}] | {du[3]} |")
    lines += orm_table(out["grid"])
    lines += search_table([r for r in recs if r["kind"] == "timing"])
    c = [r for r in recs if r["kind"] == "corr"]
    if c:
        out["correlation"], more = correlation_report(c, ptq_recs, rng)
        lines += more
    out["timing"] = [r for r in recs if r["kind"] == "timing"]
    lines += targets(out)
    print("\n".join(lines))
    if a.merge:  # one file with every record and the summary; `run --out` can resume from it
        first = json.load(open(a.paths[0]))
        doc = {"format": "ompq.AllocationStudy", "version": 2, "settings": first["settings"],
               "machine": first["machine"], "records": recs, "summary": out}
        write_text_atomic(json.dumps(doc), a.merge)


def orm_table(grid: list[dict]) -> list[str]:
    """What the ORM adds: paired differences of the ORM-weighted objective, the shuffled-ORM
    null control and the paper's objective against θ ≡ 1 (the default)."""
    lines = ["\n### The ORM's share: top-1 difference against the default (θ ≡ 1), points "
             "[95 % CI]\n", "| stage | model | avg bits | A | orm − default | random − default "
             "| orm-linear − default |", "|---|---|---|---|---|---|---|"]
    for g in grid:
        cells = []
        for m in ("orm", "random", "orm-linear"):
            d = g["diff"].get(m)
            cells.append("–" if d is None else
                         f"{-d['mean']:+.2f} [{-d['hi']:+.2f}, {-d['lo']:+.2f}]")
        lines.append(f"| {g['stage']} | {g['model']} | {g['avg_bits']:g} | {g['act_bits']} | "
                     + " | ".join(cells) + " |")
    return lines


def search_table(rows: list[dict]) -> list[str]:
    if not rows:
        return []
    lines = ["\n### Search time (s, medians of the `timing` runs on a quiet machine)\n",
             "| model | plain profile | profile + distortion table | ILP | default search | "
             "HAWQ trace + ILP | default ÷ plain profile | HAWQ ÷ default |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        m = r["seconds"]
        lines.append(f"| {r['model']} | {m['plain']:.3f} | {m['profile']:.3f} | {m['ilp']:.3f} "
                     f"| {r['default']:.3f} | {m['hawq']:.2f} | {r['default'] / m['plain']:.1f}× "
                     f"| {m['hawq'] / r['default']:.0f}× |")
    return lines


def correlation_report(c: list[dict], ptq_recs: list[dict], rng) -> tuple[dict, list[str]]:
    from scipy.stats import kendalltau, spearmanr

    base = sorted([r for r in c if r["seed"] == 0], key=lambda r: r["config"])
    acc = np.array([r["top1"] for r in base])
    res: dict[str, Any] = {"n_configs": len(base), "model": base[0]["model"],
                           "avg_bits": base[0]["avg_bits"], "objectives": {}}
    lines = [f"\n### Correlation: {len(base)} configurations of {base[0]['model']} at "
             f"{base[0]['avg_bits']:g} bits, round-to-nearest, full test split\n",
             "| objective | Kendall τ [95 % CI] | p | Spearman ρ [95 % CI] | p |",
             "|---|---|---|---|---|"]
    for m in ("error", "orm", "orm-linear", "hawq"):
        obj = np.array([r["objective"][m] for r in base])
        tau, tp = kendalltau(obj, acc)
        rho, rp = spearmanr(obj, acc)
        bt, br = [], []
        for _ in range(1000):
            idx = rng.integers(0, len(acc), len(acc))
            bt.append(kendalltau(obj[idx], acc[idx])[0])
            br.append(spearmanr(obj[idx], acc[idx])[0])
        ci_t = np.nanpercentile(bt, [2.5, 97.5])
        ci_r = np.nanpercentile(br, [2.5, 97.5])
        res["objectives"][m] = {"kendall_tau": float(tau), "kendall_p": float(tp),
                                "tau_ci": [float(x) for x in ci_t], "spearman_rho": float(rho),
                                "spearman_p": float(rp), "rho_ci": [float(x) for x in ci_r]}
        lines.append(f"| {m} | {tau:.3f} [{ci_t[0]:.3f}, {ci_t[1]:.3f}] | {tp:.1e} | "
                     f"{rho:.3f} [{ci_r[0]:.3f}, {ci_r[1]:.3f}] | {rp:.1e} |")
    rep = {r["config"]: r["top1"] for r in c if r["seed"] == 1}
    if len(rep) >= 3:
        pairs = np.array([(b["top1"], rep[b["config"]]) for b in base if b["config"] in rep])
        tau_rep = kendalltau(pairs[:, 0], pairs[:, 1])[0]
        sd = float(np.std(pairs[:, 0] - pairs[:, 1]) / np.sqrt(2))
        res["repeatability"] = {"n": len(pairs), "kendall_tau": float(tau_rep),
                                "seed_sd_points": sd}
        lines.append(f"\nNoise ceiling: Kendall τ between two calibration seeds over "
                     f"{len(pairs)} configurations = {tau_rep:.3f}; seed-to-seed SD of top-1 "
                     f"{sd:.2f} points.")
    default = [r for r in ptq_recs if r["stage"] == "rtn" and r["model"] == res["model"]
               and r["avg_bits"] == res["avg_bits"] and r["act_bits"] == 8
               and r["method"] == "error" and r["seed"] == 0]
    if default:
        pct = float((acc < default[0]["top1"]).mean() * 100)
        res["default_top1"], res["default_percentile"] = default[0]["top1"], pct
        lines.append(f"The default's allocation (seed 0, {default[0]['top1']:.2f} %) is above "
                     f"{pct:.0f} % of the sampled configurations (median {np.median(acc):.2f} "
                     f"%, 95th percentile {np.percentile(acc, 95):.2f} %).")
    return res, lines


def targets(out: dict) -> list[str]:
    lines = ["\n### Targets\n"]
    grid = out["grid"]
    t1 = [g for g in grid if not g["uniform_floor"] and "uniform" in g["diff"]]
    ok1 = all(g["diff"]["uniform"]["mean"] >= 0 and g["diff"]["uniform"]["lo"] > -0.2 for g in t1)
    t1b = [g for g in grid if g["uniform_floor"] and "uniform" in g["diff"]]
    ok1b = all(g["diff"]["uniform"]["lo"] > 0 for g in t1b)
    lines.append(f"- default ≥ uniform at exactly-uniform budgets (mean ≥ 0, CI low > −0.2): "
                 f"{'met' if ok1 else 'NOT met'} in {sum(1 for g in t1 if g['diff']['uniform']['mean'] >= 0 and g['diff']['uniform']['lo'] > -0.2)}/{len(t1)} rows")
    lines.append(f"- default clearly above uniform where uniform drops a width (CI low > 0): "
                 f"{'met' if ok1b else 'NOT met'} in "
                 f"{sum(1 for g in t1b if g['diff']['uniform']['lo'] > 0)}/{len(t1b)} rows")
    fails = []
    for g in grid:
        best = max(v for m, v in g["mean"].items() if m in ("uniform", "hawq") and v is not None)
        if g["mean"]["error"] < best - 0.2:
            fails.append(f"{g['stage']} {g['model']} {g['avg_bits']:g}b A{g['act_bits']}: "
                         f"{g['mean']['error']:.2f} vs {best:.2f}")
    lines.append(f"- default ≥ best of uniform, HAWQ-trace, error-only − 0.2 in every row "
                 f"(error-only is the default itself): {'met' if not fails else 'NOT met'} "
                 f"({len(grid) - len(fails)}/{len(grid)} rows)" +
                 ("; missed: " + "; ".join(fails) if fails else ""))
    orm_rows = [g for g in grid if "orm" in g["diff"]]
    helps = [g for g in orm_rows if g["diff"]["orm"]["hi"] < 0]
    hurts = [g for g in orm_rows if g["diff"]["orm"]["lo"] > 0]
    lines.append(f"- ORM-weighted vs θ ≡ 1: ORM better with CI excluding 0 in {len(helps)} "
                 f"rows, worse in {len(hurts)} rows, of {len(orm_rows)}")
    out["targets"] = {"uniform_exact": ok1, "uniform_floor": ok1b, "best_minus_0.2": not fails,
                      "orm_helps_rows": len(helps), "orm_hurts_rows": len(hurts)}
    for r in out.get("timing") or []:
        m = r["seconds"]
        ratio, speedup = r["default"] / m["plain"], m["hawq"] / r["default"]
        lines.append(f"- {r['model']}: search ≤ 3× the plain profile: "
                     f"{'met' if ratio <= 3 else 'NOT met'} ({ratio:.1f}×); ≥ 20× less than the "
                     f"Hessian trace: {'met' if speedup >= 20 else 'NOT met'} ({speedup:.0f}×)")
    c = out.get("correlation")
    if c:
        e = c["objectives"]["error"]
        lines.append(f"- Kendall τ(default, accuracy) ≥ 0.4 with p < 0.01: "
                     f"{'met' if e['kendall_tau'] >= 0.4 and e['kendall_p'] < 0.01 else 'NOT met'}"
                     f" (τ = {e['kendall_tau']:.3f}, 95 % CI [{e['tau_ci'][0]:.3f}, "
                     f"{e['tau_ci'][1]:.3f}], p = {e['kendall_p']:.1e})")
        if "default_percentile" in c:
            lines.append(f"- default at or above the 95th percentile of sampled configurations: "
                         f"{'met' if c['default_percentile'] >= 95 else 'NOT met'} "
                         f"({c['default_percentile']:.0f}th)")
    return lines


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="the PTQ grid")
    r.add_argument("--models", nargs="+", default=["resnet20", "mobilenetv2"])
    r.add_argument("--stage", choices=tuple(STAGES), default="rtn")
    r.add_argument("--avg-bits", nargs="+", type=float, default=[2.0, 2.5, 3.0, 4.0])
    r.add_argument("--no-act4", dest="act4", action="store_false",
                   help="skip the 3-bit / A4 row")
    r.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    r.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    r.add_argument("--threads", type=int, default=2)
    r.add_argument("--out", required=True)
    c = sub.add_parser("corr", help="objective-accuracy correlation over sampled configurations")
    c.add_argument("--model", default="resnet20")
    c.add_argument("--corr-bits", type=float, default=3.0)
    c.add_argument("--configs", type=int, default=100)
    c.add_argument("--repeat", type=int, default=30, help="configs also run with seed 1")
    c.add_argument("--threads", type=int, default=2)
    c.add_argument("--out", required=True)
    t = sub.add_parser("timing", help="search time of the default and of HAWQ, quiet machine")
    t.add_argument("--models", nargs="+", default=["resnet20", "mobilenetv2"])
    t.add_argument("--repeats", type=int, default=7)
    t.add_argument("--hawq-repeats", type=int, default=3)
    t.add_argument("--threads", type=int, default=2)
    t.add_argument("--out", required=True)
    rep = sub.add_parser("report", help="tables, paired CIs and targets from result shards")
    rep.add_argument("paths", nargs="+")
    rep.add_argument("--merge", default=None, metavar="PATH",
                     help="write every record and the summary to one study file (which `run` "
                     "and `corr` can also resume from)")
    return p.parse_args(argv)


def main(argv: Optional[list] = None) -> int:
    a = parse(argv)
    if hasattr(a, "threads"):
        torch.set_num_threads(a.threads)
    {"run": run, "corr": corr, "timing": timing, "report": report}[a.cmd](a)
    return 0


if __name__ == "__main__":
    sys.exit(main())
