"""Model inputs of any form: one tensor, a tuple of positional tensors or a dict of keyword tensors.

Every tensor in an inputs structure holds the same number N of samples on dim 0 (its rows);
other values (None, bools, ints) pass through unchanged. `ompq.trace.call_model` calls a model
with a tensor as `model(x)`, a tuple as `model(*x)` and a dict as `model(**x)` (Hugging Face
style: `input_ids`, `attention_mask`, …). The functions here take rows, slice, stack,
concatenate and move such structures, so the sampler, the profiler, PTQ, QAT and evaluation
treat all three forms alike. Calling conventions: README, "Inputs of any form".
"""
from __future__ import annotations

from typing import Any, Callable, Iterator, Sequence, Union

import torch
from torch import Tensor

__all__ = ["Inputs", "is_inputs", "leaves", "num_rows", "map_tensors", "take_rows",
           "slice_rows", "cat_rows", "stack_items", "to_device", "first_leaf"]

Inputs = Union[Tensor, tuple, list, dict]


def is_inputs(x: Any) -> bool:
    """True for a tensor, a dict holding a tensor, or a tuple/list of tensors (and plain values)
    holding at least one tensor: the structures a model can be called with."""
    if isinstance(x, Tensor):
        return True
    if isinstance(x, dict):
        return any(isinstance(v, Tensor) for v in x.values())
    if isinstance(x, (tuple, list)) and x:
        return all(isinstance(v, (Tensor, type(None), bool, int, float)) for v in x) \
            and any(isinstance(v, Tensor) for v in x)
    return False


def _items(inp: Inputs) -> Iterator[tuple[str, Any]]:
    """(label, value) pairs: "input" for a tensor, the key of a dict entry, "#k" for the k-th
    positional value."""
    if isinstance(inp, Tensor):
        yield "input", inp
    elif isinstance(inp, dict):
        yield from ((repr(k), v) for k, v in inp.items())
    else:
        yield from ((f"#{k}", v) for k, v in enumerate(inp))


def leaves(inp: Inputs) -> list[tuple[str, Tensor]]:
    """The tensors of an inputs structure with their labels ("input", a dict key, "#k")."""
    return [(k, v) for k, v in _items(inp) if isinstance(v, Tensor)]


def first_leaf(inp: Inputs) -> Tensor:
    """The first tensor of an inputs structure (its device and row count stand for all)."""
    found = leaves(inp)
    if not found:
        raise TypeError(f"inputs hold no tensor: {type(inp).__name__}")
    return found[0][1]


def num_rows(inp: Inputs, what: str = "inputs") -> int:
    """N, the number of samples on dim 0, shared by every tensor of `inp`.

    Raises ValueError naming the entries when they disagree (e.g. `input_ids` with 64 rows and
    `attention_mask` with 32) or when a tensor is 0-d, TypeError when `inp` holds no tensor."""
    found = leaves(inp) if is_inputs(inp) else []
    if not found:
        raise TypeError(f"{what} must be a tensor, a tuple of tensors or a dict of tensors, got "
                        f"{type(inp).__name__}")
    sizes: dict[str, int] = {}
    for key, t in found:
        if t.dim() == 0:
            raise ValueError(f"{what}: entry {key} is a 0-d tensor; every tensor needs the "
                             "samples on dim 0")
        sizes[key] = int(t.shape[0])
    if len(set(sizes.values())) > 1:
        listed = ", ".join(f"{k} has {n}" for k, n in sizes.items())
        raise ValueError(f"{what}: inconsistent number of samples ({listed} rows on dim 0); every "
                         "tensor needs the same N")
    return next(iter(sizes.values()))


def map_tensors(inp: Inputs, fn: Callable[[Tensor], Tensor]) -> Inputs:
    """The same structure with `fn` applied to every tensor (other values unchanged)."""
    def f(v: Any) -> Any:
        return fn(v) if isinstance(v, Tensor) else v
    if isinstance(inp, Tensor):
        return fn(inp)
    if isinstance(inp, dict):
        return {k: f(v) for k, v in inp.items()}
    return type(inp)(f(v) for v in inp)


def take_rows(inp: Inputs, idx: Tensor) -> Inputs:
    """Rows `idx` (a 1-D index tensor) of every tensor: the same samples across entries."""
    return map_tensors(inp, lambda t: t[idx.to(t.device)])


def slice_rows(inp: Inputs, start: int, stop: int) -> Inputs:
    """Rows `start:stop` of every tensor (views)."""
    return map_tensors(inp, lambda t: t[start:stop])


def to_device(inp: Inputs, device: Union[str, torch.device, None]) -> Inputs:
    """Every tensor moved to `device` (None: unchanged)."""
    if device is None:
        return inp
    return map_tensors(inp, lambda t: t.to(device))


def _zip(parts: Sequence[Inputs], combine: Callable[[list[Tensor]], Tensor], what: str
         ) -> Inputs:
    """Combine same-structure parts entry by entry (tensors with `combine`, plain values must
    agree)."""
    head = parts[0]
    if isinstance(head, Tensor):
        return combine(list(parts))
    if isinstance(head, dict):
        keys = list(head)
        for p in parts:
            if not isinstance(p, dict) or list(p) != keys:
                raise ValueError(f"{what}: every item must be a dict with the keys {keys}, got "
                                 f"{list(p) if isinstance(p, dict) else type(p).__name__}")
        return {k: _combine_entry([p[k] for p in parts], combine, repr(k), what) for k in keys}
    for p in parts:
        if not isinstance(p, (tuple, list)) or len(p) != len(head):
            raise ValueError(f"{what}: every item must be a tuple of {len(head)} values")
    return type(head)(_combine_entry([p[k] for p in parts], combine, f"#{k}", what)
                      for k in range(len(head)))


def _combine_entry(values: list[Any], combine: Callable[[list[Tensor]], Tensor], key: str,
                   what: str) -> Any:
    if isinstance(values[0], Tensor):
        if not all(isinstance(v, Tensor) for v in values):
            raise ValueError(f"{what}: entry {key} is a tensor in some items only")
        try:
            return combine(values)
        except RuntimeError as err:
            raise ValueError(f"{what}: the items' entry {key} cannot be combined (shapes "
                             f"{sorted({tuple(v.shape) for v in values})}): {err}") from err
    if any(v != values[0] for v in values):
        raise ValueError(f"{what}: entry {key} is not a tensor and differs between items")
    return values[0]


def cat_rows(parts: Sequence[Inputs], what: str = "batches") -> Inputs:
    """Concatenate same-structure batches along dim 0."""
    return _zip(parts, torch.cat, what)


def stack_items(items: Sequence[Inputs], what: str = "dataset items") -> Inputs:
    """Stack per-sample items (no batch dim) into one batch structure."""
    return _zip(items, torch.stack, what)
