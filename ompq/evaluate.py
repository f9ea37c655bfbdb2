"""Evaluation: top-1 accuracy (%) and mean cross-entropy of a model on labelled data."""
from __future__ import annotations

from typing import Any, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from .data import labelled_batches
from .inputs import slice_rows, to_device
from .stages import stage
from .trace import call_model, main_output


@stage("evaluation")
@torch.no_grad()
def evaluate(model: nn.Module, data: Any, *, batch_size: int = 256,
             device: Union[str, torch.device, None] = None, progress: bool = True,
             max_samples: Optional[int] = None) -> dict[str, float]:
    """Top-1 accuracy (%) and mean cross-entropy of `model` on labelled `data`.

    `data`: an `(inputs, labels)` pair (inputs a tensor, or a dict/tuple of tensors passed as
    keyword/positional arguments), a Dataset of `(x, y)` items (e.g.
    `ompq.data.fashion_mnist("test")`), or an iterable of `(x, y)` batches. The model's output
    (or the first element of a tuple output) holds the logits. The model is run in
    eval mode (its mode is restored afterwards). `max_samples` evaluates only the first samples.
    Returns `{"top1": %, "loss": float, "n": int}`.
    """
    if device is None:
        prm = next(iter(model.parameters()), None)
        device = prm.device if prm is not None else torch.device("cpu")
    was_training = model.training
    model.eval()
    correct, loss_sum, n = 0, 0.0, 0
    it = labelled_batches(data, batch_size)
    if progress:
        from tqdm import tqdm
        it = tqdm(it, desc="evaluate", leave=False)
    try:
        for x, y in it:
            if max_samples is not None and n >= max_samples:
                break
            if max_samples is not None:
                x, y = slice_rows(x, 0, max_samples - n), y[:max_samples - n]
            x, y = to_device(x, device), y.to(device)
            logits = main_output(call_model(model, x))
            loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
            correct += int((logits.argmax(1) == y).sum())
            n += y.numel()
    finally:
        model.train(was_training)
    if n == 0:
        raise ValueError("evaluate: no samples")
    return {"top1": 100.0 * correct / n, "loss": loss_sum / n, "n": n}
