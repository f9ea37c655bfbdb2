"""Accuracy against size: allocate with several methods at several budgets, quantize, evaluate.

`frontier(model, profile, train, test, avg_bits=(2, 3, 4, 5, 6))` allocates every method at
each average weight width (budget = avg × weights / 8 / 2**20 MiB), quantizes a copy of the model
with round-to-nearest PTQ (MSE weight scales, EMA activation ranges: no reconstruction, so a
whole sweep takes seconds per point on a CPU) and evaluates top-1. Methods: the default
objective ("error"), "uniform" (at its exact widths), "hawq" (needs labelled data) and the
paper's "orm-linear". Records carry method, avg_bits, size_mb (MiB), bops_g (GBOPs per sample),
top1 (%), n (images) and stage ("rtn"), ready for `ompq.report`.
"""
from __future__ import annotations

import warnings
from typing import Any, Optional, Sequence

from torch import nn

from .allocate import InfeasibleBudgetError, allocate
from .bitconfig import CostModel
from .stages import stage

DEFAULT_AVG_BITS = (2.0, 3.0, 4.0, 5.0, 6.0)
DEFAULT_METHODS = ("error", "uniform", "hawq", "orm-linear")
CANDIDATES = (2, 3, 4, 5, 6, 8)


@stage("accuracy-against-size sweep")
def frontier(model: nn.Module, profile: Any, train: Any, test: Any, *,
             avg_bits: Sequence[float] = DEFAULT_AVG_BITS,
             methods: Sequence[str] = DEFAULT_METHODS, bits: Sequence[int] = CANDIDATES,
             act_bits: int = 8, calib_samples: int = 256, eval_limit: Optional[int] = 2000,
             seed: int = 0, hawq_samples: int = 128, hawq_iters: int = 30,
             progress: bool = False) -> list[dict]:
    """Records of round-to-nearest PTQ at every (method, average width); see the module
    docstring. A budget a method cannot meet (e.g. below its narrowest candidate) is skipped
    with a warning that names it."""
    from . import proxies
    from .evaluate import evaluate
    from .ptq import ptq

    cost = CostModel.from_layers(profile.layers)
    shared: dict[str, Any] = {}
    if "hawq" in methods:  # one Hessian trace for the whole sweep
        shared["hawq"] = proxies.proxy_values("hawq", profile, tuple(bits), model=model,
                                              data=train, seed=seed, num_samples=hawq_samples,
                                              max_iters=hawq_iters)
    jobs = [(m, ab) for m in methods for ab in avg_bits]
    if progress:
        from tqdm.auto import tqdm
        jobs = tqdm(jobs, desc="ompq frontier", unit="point", leave=False)
    records = []
    for method, ab in jobs:
        size = cost.size_mb_at(ab)
        try:
            cfg = allocate(profile, size_mb=size, bits=tuple(bits), act_bits=act_bits,
                           proxy=shared.get(method, method), seed=seed)
        except InfeasibleBudgetError as err:
            warnings.warn(f"frontier: {method} at {ab:g} bits per weight skipped: {err}",
                          RuntimeWarning, stacklevel=2)
            continue
        q = ptq(model, cfg, train, num_samples=calib_samples, iters=0, act_iters=0, seed=seed,
                progress=False).model
        r = evaluate(q, test, progress=False, max_samples=eval_limit)
        records.append({"method": method, "avg_bits": float(ab), "size_mb": cfg.size_mb,
                        "bops_g": cfg.bops_g, "top1": r["top1"], "n": r["n"], "stage": "rtn",
                        "w_bits": dict(cfg.weight_bits)})
    return records
