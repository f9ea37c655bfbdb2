"""Hook tracing: forward hooks on named modules for one forward, removed afterwards.

Shared by the profiler, layer measurement, conv–BN pairing, PTQ block tracing and the proxies.
`Hooks` registers and removes hooks; `evaluating` runs a block in eval mode and restores the
model's training flag; `forward` is both plus the call.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator, Optional

import torch
from torch import Tensor, nn

__all__ = ["Hooks", "evaluating", "forward", "call_model", "first_tensor", "main_output"]


class Hooks(contextlib.AbstractContextManager):
    """Forward (pre-)hooks registered through it are all removed on `close()` / context exit."""

    def __init__(self) -> None:
        self._handles: list[Any] = []

    def pre(self, module: nn.Module, fn: Callable[..., Any], *, first: bool = False,
            with_kwargs: bool = False) -> None:
        """`fn(module, args)` (or `fn(module, args, kwargs)` `with_kwargs`) before every call of
        `module`; `first`: before its other pre-hooks (e.g. to see a quantized layer's input
        before it is quantized)."""
        self._handles.append(module.register_forward_pre_hook(fn, prepend=first,
                                                              with_kwargs=with_kwargs))

    def post(self, module: nn.Module, fn: Callable[..., Any]) -> None:
        """`fn(module, args, output)` after every call of `module`."""
        self._handles.append(module.register_forward_hook(fn))

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def __exit__(self, *exc: Any) -> None:
        self.close()


@contextlib.contextmanager
def evaluating(model: nn.Module) -> Iterator[nn.Module]:
    """`model` in eval mode inside the block; its training flag is restored on exit."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def call_model(model: nn.Module, inputs: Any) -> Any:
    """Run `model` on a tensor, a tuple/list of positional args, or a dict of keyword args."""
    if isinstance(inputs, dict):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


def forward(model: nn.Module, inputs: Any, hooks: Optional[Hooks] = None, *,
            grad_mode: str = "no_grad") -> Any:
    """One eval-mode forward of `inputs`; `hooks` (if given) are removed afterwards.

    `grad_mode`: "no_grad" or "inference" (`torch.inference_mode`, faster, outputs cannot be
    used in autograd later).
    """
    ctx = torch.inference_mode() if grad_mode == "inference" else torch.no_grad()
    try:
        with evaluating(model), ctx:
            return call_model(model, inputs)
    finally:
        if hooks is not None:
            hooks.close()


def main_output(out: Any) -> Optional[Tensor]:
    """A module's main output: the tensor itself, or the first element of a tuple/list
    (Hugging Face blocks return `(hidden_states, ...)`); None otherwise."""
    if isinstance(out, Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor):
        return out[0]
    return None


def first_tensor(args: Any) -> Optional[Tensor]:
    """The first tensor among a hook's positional arguments (or the value itself)."""
    if isinstance(args, Tensor):
        return args
    if isinstance(args, (tuple, list)):
        for a in args:
            if isinstance(a, Tensor):
                return a
    return None
