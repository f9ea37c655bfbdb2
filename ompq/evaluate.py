"""Evaluation (top-1 %, mean cross-entropy) and size/BOPs helpers for a BitConfig."""
from __future__ import annotations

from typing import Any, Iterable, Mapping, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _batches(data: Any, batch_size: int) -> Iterable[tuple[Tensor, Tensor]]:
    """(x, y) batches from a `(x, y)` tuple of tensors, a Dataset or an iterable of batches."""
    if isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[0], Tensor):
        x, y = data
        for i in range(0, x.size(0), batch_size):
            yield x[i:i + batch_size], y[i:i + batch_size]
        return
    if isinstance(data, torch.utils.data.Dataset) and hasattr(data, "__len__"):
        tensors = getattr(data, "tensors", None)
        if tensors is not None and len(tensors) >= 2:
            yield from _batches((tensors[0], tensors[1]), batch_size)
            return
        data = torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=False)
    for batch in data:
        if not isinstance(batch, (tuple, list)) or len(batch) < 2:
            raise TypeError("evaluate: data must yield (inputs, labels) batches")
        yield batch[0], batch[1]


@torch.no_grad()
def evaluate(model: nn.Module, data: Any, *, batch_size: int = 256,
             device: Union[str, torch.device, None] = None, progress: bool = True,
             max_samples: Optional[int] = None) -> dict[str, float]:
    """Top-1 accuracy (%) and mean cross-entropy of `model` on labelled `data`.

    `data`: a `(inputs, labels)` pair of tensors, a Dataset of `(x, y)` items (e.g.
    `ompq.data.fashion_mnist("test")`), or an iterable of `(x, y)` batches. The model is run in
    eval mode (its mode is restored afterwards). `max_samples` evaluates only the first samples.
    Returns `{"top1": %, "loss": float, "n": int}`.
    """
    if device is None:
        prm = next(iter(model.parameters()), None)
        device = prm.device if prm is not None else torch.device("cpu")
    was_training = model.training
    model.eval()
    correct, loss_sum, n = 0, 0.0, 0
    it = _batches(data, batch_size)
    if progress:
        from tqdm import tqdm
        it = tqdm(it, desc="evaluate", leave=False)
    try:
        for x, y in it:
            if max_samples is not None and n >= max_samples:
                break
            if max_samples is not None:
                x, y = x[:max_samples - n], y[:max_samples - n]
            x, y = x.to(device), y.to(device)
            logits = model(x)
            loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
            correct += int((logits.argmax(1) == y).sum())
            n += y.numel()
    finally:
        model.train(was_training)
    if n == 0:
        raise ValueError("evaluate: no samples")
    return {"top1": 100.0 * correct / n, "loss": loss_sum / n, "n": n}


def model_size(bit_config: Any, params: Optional[Mapping[str, int]] = None) -> float:
    """Size in MiB of the quantized weights: Σ params_i · bits_i / (8 · 2**20).

    `params` (layer -> weight elements) is needed when `bit_config` is a plain dict; for a
    `BitConfig` its stored `size_mb` is returned.
    """
    if params is None:
        size = getattr(bit_config, "size_mb", None)
        if size is None:
            raise ValueError("model_size: pass params= (layer -> weight elements) for a dict")
        return float(size)
    bits = getattr(bit_config, "weight_bits", bit_config)
    missing = [n for n in bits if n not in params]
    if missing:
        raise ValueError(f"model_size: no parameter count for layers {missing}")
    return sum(params[n] * int(b) for n, b in bits.items()) / (8 * 2 ** 20)


def model_bops(bit_config: Any, macs: Mapping[str, int], act_bits: Union[int, Mapping[str, int]]
               = 8) -> float:
    """GBOPs per sample: Σ MACs_i · b_w,i · b_a,i / 1e9."""
    bits = getattr(bit_config, "weight_bits", bit_config)
    ab = getattr(bit_config, "act_bits", None) or act_bits
    total = 0.0
    for n, b in bits.items():
        a = ab.get(n, 8) if isinstance(ab, Mapping) else int(ab)
        total += macs[n] * int(b) * int(a)
    return total / 1e9
