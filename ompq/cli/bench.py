"""`ompq bench`: latency and resident memory of the FP32, fake-quant and packed-runtime models.

One run loads the three models of one packed checkpoint (FP32: --model itself; fake-quant:
`ompq.packed.load_packed`; runtime: `ompq.runtime.load`), times their forwards interleaved
(every timed round runs each model once, in a rotating order) and reports, per model, the
median milliseconds per batch for each --batch size, the bytes of parameters + buffers, the
runtime's conv scratch, and the process RSS delta while building the model.
"""
from __future__ import annotations

import argparse
import gc
import os
import statistics
import time
from typing import Any, Callable

from .common import (add_common_args, add_data_arg, add_model_arg, data_spec, nonneg_int,
                     positive_int, positive_int_list, print_table, resolve_data, resolve_model)

MIB = 2 ** 20
MODELS = ("fp32", "fake-quant", "runtime")


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "bench", help="latency and memory of FP32 vs fake-quant vs packed runtime",
        description="Load --packed FILE three ways (FP32 --model, the fake-quant model, the "
                    "packed runtime) and print, for each, the median latency per batch "
                    "(interleaved runs) and resident memory (parameter + buffer bytes, the "
                    "runtime's conv scratch, process RSS delta while loading).")
    p.add_argument("--packed", metavar="FILE", required=True,
                   help="bit-packed checkpoint (.ompq) from `ompq quantize --out`")
    add_model_arg(p, " (the architecture of --packed)")
    add_data_arg(p, extra="; the inputs are its first test samples")
    p.add_argument("--batch", type=positive_int_list, default=(1, 64), metavar="B,B,...",
                   help="batch sizes (default 1,64)")
    p.add_argument("--iters", type=positive_int, default=20,
                   help="timed forwards per model and batch size (20)")
    p.add_argument("--warmup", type=nonneg_int, default=3,
                   help="untimed forwards per model and batch size first (3)")
    p.add_argument("--threads", type=positive_int, default=None,
                   help="torch intra-op threads (default: torch's)")
    add_common_args(p)
    p.set_defaults(func=run)
    return p


def _rss_bytes() -> int:
    """Resident set size of this process now (bytes; Linux /proc), else its peak so far."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _builders(args: argparse.Namespace) -> dict[str, Callable[[], Any]]:
    """The three models of the comparison, each built from a fresh --model."""
    from ..packed import load_packed
    from ..runtime import SCRATCH, load

    def runtime() -> Any:
        SCRATCH.clear()  # measure this model's scratch, not what earlier work left behind
        return load(args.packed, resolve_model(args.model)[0])

    return {"fp32": lambda: resolve_model(args.model)[0],
            "fake-quant": lambda: load_packed(args.packed, resolve_model(args.model)[0]),
            "runtime": runtime}


def _load_models(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, int]]:
    """(models by name, RSS delta in bytes while building each), built one after the other."""
    models, rss = {}, {}
    for name, build in _builders(args).items():
        gc.collect()
        before = _rss_bytes()
        models[name] = build().eval()
        rss[name] = _rss_bytes() - before
    return models, rss


def _inputs(data: Any, n: int) -> Any:
    """The first `n` inputs of `data` (repeated when it holds fewer), one tensor."""
    import torch

    tensors = getattr(data, "tensors", None)
    x = tensors[0][:n] if tensors is not None else \
        torch.stack([data[i][0] for i in range(min(n, len(data)))])
    reps = -(-n // x.shape[0])
    return x.repeat(reps, *([1] * (x.dim() - 1)))[:n] if reps > 1 else x


def _time(models: dict[str, Any], x: Any, iters: int, warmup: int, progress: bool
          ) -> dict[str, float]:
    """Median milliseconds per forward of each model on `x`, interleaved: each of the `iters`
    rounds runs every model once, the order rotating by one model per round."""
    import torch
    from tqdm import tqdm

    names = list(models)
    times: dict[str, list[float]] = {n: [] for n in names}
    with torch.no_grad():
        for name in names:
            for _ in range(warmup):
                models[name](x)
        for it in tqdm(range(iters), desc=f"bench batch {x.shape[0]}", leave=False,
                       disable=not progress):
            for name in names[it % len(names):] + names[:it % len(names)]:
                t = time.perf_counter()
                models[name](x)
                times[name].append(1e3 * (time.perf_counter() - t))
    return {n: statistics.median(v) for n, v in times.items()}


def _max_diff(models: dict[str, Any], x: Any) -> float:
    """max |runtime − fake-quant| of the outputs on `x` (a sanity check of the run)."""
    import torch

    with torch.no_grad():
        return float((models["runtime"](x) - models["fake-quant"](x)).abs().max())


def run(args: argparse.Namespace) -> dict:
    """Load, time and print one table (a row per model); the JSON result holds the same."""
    import torch

    from ..runtime import memory_bytes

    if args.threads:
        torch.set_num_threads(args.threads)
    spec = data_spec(args.data, args.model)
    x = _inputs(resolve_data(spec, "test", seed=args.seed), max(args.batch))
    models, rss = _load_models(args)
    latency = {n: {} for n in MODELS}
    for b in args.batch:
        for name, ms in _time(models, x[:b], args.iters, args.warmup, args.progress).items():
            latency[name][str(b)] = ms
    results = []
    for name in MODELS:
        mem = memory_bytes(models[name])
        results.append({"model": name, "param_buffer_bytes": mem["parameters"] + mem["buffers"],
                        "packed_weight_bytes": mem["packed_weights"],
                        "scratch_bytes": mem["scratch"], "rss_delta_bytes": rss[name],
                        "latency_ms": latency[name]})
    print_table([[r["model"], f"{r['param_buffer_bytes'] / MIB:.4f}",
                  f"{r['scratch_bytes'] / MIB:.4f}", f"{r['rss_delta_bytes'] / MIB:.1f}",
                  *(f"{r['latency_ms'][str(b)]:.3f}" for b in args.batch)] for r in results],
                ["model", "params+buffers MiB", "scratch MiB", "RSS delta MiB",
                 *(f"ms/batch @{b}" for b in args.batch)])
    diff = _max_diff(models, x[:max(args.batch)])
    print(f"runtime vs fake-quant: max |diff| {diff:.3e} on {max(args.batch)} inputs; "
          f"{torch.get_num_threads()} threads, median of {args.iters} interleaved runs")
    return {"command": "bench", "model": args.model, "packed": args.packed, "data": spec,
            "threads": torch.get_num_threads(), "iters": args.iters, "warmup": args.warmup,
            "batches": list(args.batch),
            "max_abs_diff": diff, "results": results}
