"""Evaluation: top-1 accuracy (%) and mean cross-entropy of a model on labelled data."""
from __future__ import annotations

from typing import Any, Iterable, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from .stages import stage


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


@stage("evaluation")
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
