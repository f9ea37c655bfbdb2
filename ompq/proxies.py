"""Baselines that need the model, feeding the same solver as the objectives.

"hawq" (HAWQ-V2: Hessian trace × weight error) and "uniform" (one tied width), as a
`ProxyResult` (values maximised, seconds); a `ProxyResult` can also carry any method's values.
Details: docs/DESIGN.md, "Proxies".
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.data import Dataset

from .data import draw_indices, split_labels
from .inputs import is_inputs, num_rows, stack_items, take_rows, to_device
from .objectives import OBJECTIVES
from .quantizers import WeightQuantizer
from .trace import call_model, evaluating, main_output
from .stages import stage

PROXIES = ("hawq", "uniform")


@dataclass
class ProxyResult:
    """values: layer -> {bits: value} (the ILP maximises the sum); importance: layer -> float;
    seconds: time spent computing the proxy; tie: groups of layers that must share bits."""

    values: dict[str, dict[int, float]]
    importance: dict[str, float]
    seconds: float
    tie: Optional[list[list[str]]] = None
    info: dict[str, Any] = field(default_factory=dict)


def _layer_names(profile: Any) -> list[str]:
    return [layer.name for layer in profile.layers]


def _candidates(names: Sequence[str], candidates: Union[Sequence[int], Mapping[str, Sequence[int]]]
                ) -> dict[str, list[int]]:
    if isinstance(candidates, Mapping):
        missing = [n for n in names if n not in candidates]
        if missing:
            raise ValueError(f"candidate bits missing for layers {missing}")
        return {n: [int(b) for b in candidates[n]] for n in names}
    bits = [int(b) for b in candidates]
    if not bits:
        raise ValueError("candidates: empty list of bit-widths")
    return {n: list(bits) for n in names}


def _labelled_batch(data: Any, model: nn.Module, num_samples: int, seed: int
                    ) -> tuple[Any, Tensor]:
    """(x, y) with `num_samples` samples drawn with `seed` (x inputs of any form); labels = the
    model's predictions (argmax of the last dim) where the data has none."""
    inputs, labels = split_labels(data)
    if labels is None and isinstance(data, Dataset) and hasattr(data, "__len__"):
        idx = draw_indices(len(data), num_samples, seed).tolist()
        items = [data[i] for i in idx]
        if isinstance(items[0], (tuple, list)) and len(items[0]) >= 2:
            x = stack_items([it[0] for it in items])
            y = torch.stack([torch.as_tensor(it[1]) for it in items])
        else:
            x, y = stack_items(items), None
    elif is_inputs(inputs):
        idx = draw_indices(num_rows(inputs), num_samples, seed)
        x, y = take_rows(inputs, idx), None if labels is None else labels[idx]
    else:
        raise TypeError("data must be a Dataset, an (inputs, labels) pair or inputs (a tensor "
                        f"or a dict of tensors), got {type(data).__name__}")
    dev = next(model.parameters()).device
    x = to_device(x, dev)
    if y is None:
        with torch.no_grad():
            y = _logits(model, x).argmax(-1)
    return x, y.to(dev)


def _logits(model: nn.Module, x: Any) -> Tensor:
    return main_output(call_model(model, x))


def _cross_entropy(logits: Tensor, y: Tensor) -> Tensor:
    """Mean cross-entropy of (N, C) logits, or of (N, …, C) per-position logits."""
    if logits.dim() > 2:
        return F.cross_entropy(logits.flatten(0, -2), y.flatten())
    return F.cross_entropy(logits, y)


@stage("HAWQ Hessian traces")
def hessian_traces(model: nn.Module, names: Sequence[str], x: Any, y: Tensor, *,
                   max_iters: int = 100, tol: float = 1e-3, seed: int = 0,
                   progress: bool = False) -> tuple[dict[str, float], int]:
    """Hutchinson estimates of Tr(∂²L/∂W_i²) (total, not averaged) of the mean cross-entropy.

    Returns (layer -> trace, number of Rademacher vectors used). `tol=0` runs all `max_iters`.
    """
    weights = [model.get_submodule(n).weight for n in names]
    saved = [w.requires_grad for w in weights]
    for w in weights:
        w.requires_grad_(True)
    try:
        # The math attention kernel has a second derivative; the fused ones do not.
        with evaluating(model), sdpa_kernel([SDPBackend.MATH]):
            grads = torch.autograd.grad(_cross_entropy(_logits(model, x), y), weights,
                                        create_graph=True)
            sums, used = _hutchinson(weights, grads, max_iters, tol, seed, progress)
    finally:
        for w, s in zip(weights, saved):
            w.requires_grad_(s)
    return {nm: float(s) / used for nm, s in zip(names, sums)}, used


def _hutchinson(weights: list[Tensor], grads: Sequence[Tensor], max_iters: int, tol: float,
                seed: int, progress: bool) -> tuple[Tensor, int]:
    """Σ over Rademacher vectors v of vᵀHv per weight (float64), and the number of vectors."""
    g = torch.Generator().manual_seed(seed)
    sums = torch.zeros(len(weights), dtype=torch.float64)
    prev = None
    it_range = range(max_iters)
    if progress:
        from tqdm import tqdm
        it_range = tqdm(it_range, desc="Hutchinson", leave=False)
    n = 0
    for n in it_range:
        vs = [(torch.randint(0, 2, w.shape, generator=g) * 2 - 1).to(w) for w in weights]
        hvs = torch.autograd.grad(grads, weights, vs, retain_graph=True)
        sums += torch.tensor([float((hv * v).sum()) for hv, v in zip(hvs, vs)],
                             dtype=torch.float64)
        total = float(sums.sum()) / (n + 1)
        if prev is not None and tol > 0 and abs(total - prev) / (abs(prev) + 1e-6) < tol:
            break
        prev = total
    return sums, n + 1


@torch.no_grad()
def quant_perturbation(weight: Tensor, bits: int, *, symmetric: bool = False,
                       init: str = "mse") -> float:
    """‖Q_b(W) − W‖² with the per-channel weight quantizer used by PTQ."""
    wq = WeightQuantizer(bits, weight.size(0), symmetric=symmetric).to(weight.device)
    wq.init_scale(weight, init)
    return float((wq(weight) - weight).pow(2).sum())


def proxy_values(proxy: str, profile: Any, candidates: Union[Sequence[int], Mapping[str, Sequence[int]]],
                 *, model: Optional[nn.Module] = None, data: Any = None, seed: int = 0,
                 num_samples: int = 256, max_iters: int = 100, tol: float = 1e-3,
                 progress: bool = False) -> ProxyResult:
    """Per-layer, per-width ILP values of a baseline proxy (see module docstring).

    Args:
        proxy: "hawq" or "uniform".
        profile: a `Profile` (uses `.layers` names and `.params`).
        candidates: candidate bit-widths (a sequence, or layer -> sequence).
        model, data: needed by "hawq" (labelled data, or inputs labelled by the model).
        seed: seeds the data sample and the Rademacher vectors.
        num_samples: calibration batch size for "hawq".
        max_iters, tol: Hutchinson stopping rule.
    """
    if proxy not in PROXIES:
        raise ValueError(f"proxy {proxy!r} unknown; valid: "
                         f"{', '.join(OBJECTIVES + PROXIES)} or a dict layer -> importance")
    t0 = time.perf_counter()
    names = _layer_names(profile)
    cands = _candidates(names, candidates)
    params = {layer.name: int(layer.params) for layer in profile.layers}
    if proxy == "uniform":
        total = float(sum(params.values()))
        values = {n: {b: b * params[n] / total for b in cands[n]} for n in names}
        return ProxyResult(values, {n: 1.0 for n in names}, time.perf_counter() - t0,
                           tie=[list(names)])
    if model is None or data is None:
        raise ValueError("proxy 'hawq' needs model= and data= (a calibration set)")
    x, y = _labelled_batch(data, model, num_samples, seed)
    traces, used = hessian_traces(model, names, x, y, max_iters=max_iters, tol=tol, seed=seed,
                                  progress=progress)
    t_trace = time.perf_counter() - t0
    imp = {n: traces[n] / max(params[n], 1) for n in names}
    values = {}
    for n in names:
        w = model.get_submodule(n).weight.detach()
        values[n] = {b: -imp[n] * quant_perturbation(w, b) for b in cands[n]}
    return ProxyResult(values, imp, time.perf_counter() - t0,
                       info={"name": "hawq", "hutchinson_vectors": used, "trace_seconds": t_trace,
                             "traces": traces, "num_samples": int(y.shape[0])})
