"""BatchNorm folding: find the BatchNorms that directly follow a layer and fold them into it.

Pairs are found by tracing tensor identity over one forward (`find_conv_bn_pairs`), so they need
not be siblings in the module tree. `fold_bn` folds them in place, as PTQ and QAT do.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .layers import QUANTIZABLE_TYPES, set_submodule
from .trace import Hooks, forward

BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


class _PairTrace:
    """Hook bookkeeping: layer outputs by tensor id, their consumers, and call counts."""

    def __init__(self) -> None:
        self.outputs: dict[int, tuple[str, Tensor]] = {}
        self.calls: dict[str, int] = {}
        self.consumers: dict[int, list[str]] = {}

    def out_hook(self, name: str):
        def hook(mod: nn.Module, inp: Any, out: Any) -> None:
            self.calls[name] = self.calls.get(name, 0) + 1
            if isinstance(out, Tensor):
                self.outputs[id(out)] = (name, out)
        return hook

    def in_hook(self, name: str):
        def hook(mod: nn.Module, inp: Any) -> None:
            own = 0 if isinstance(mod, QUANTIZABLE_TYPES) else 1
            self.calls[name] = self.calls.get(name, 0) + own
            for t in inp:
                if isinstance(t, Tensor) and id(t) in self.outputs:
                    self.consumers.setdefault(id(t), []).append(name)
        return hook


def find_conv_bn_pairs(model: nn.Module, example_input: Any) -> list[tuple[str, str]]:
    """(layer, bn) pairs where a BatchNorm's input is exactly a conv/linear layer's output.

    A layer whose output also feeds something else than the BN, or a layer/BN called more than
    once in the forward of `example_input`, is not paired.
    """
    trace, hooks = _PairTrace(), Hooks()
    for n, m in model.named_modules():
        if not n:
            continue
        if isinstance(m, QUANTIZABLE_TYPES):
            hooks.post(m, trace.out_hook(n))
        if next(m.children(), None) is None:
            hooks.pre(m, trace.in_hook(n))
    forward(model, example_input, hooks)
    pairs = []
    for key, users in trace.consumers.items():
        layer, _ = trace.outputs[key]
        if len(users) != 1:
            continue
        bn = users[0]
        mod = model.get_submodule(bn)
        if isinstance(mod, BN_TYPES) and trace.calls.get(layer) == 1 \
                and trace.calls.get(bn) == 1 and mod.track_running_stats \
                and mod.running_mean is not None:
            pairs.append((layer, bn))
    return pairs


@torch.no_grad()
def fold_bn(model: nn.Module, example_input: Any) -> list[tuple[str, str]]:
    """Fold every BatchNorm directly following a conv/linear into it, in place.

    The BN's running statistics and affine parameters go into the layer's weight and bias (a
    bias is created when missing); the BN becomes `nn.Identity`. Returns the folded
    (layer, bn) pairs. `example_input`: one batch the model accepts.
    """
    pairs = find_conv_bn_pairs(model, example_input)
    for layer_name, bn_name in pairs:
        layer = model.get_submodule(layer_name)
        bn = model.get_submodule(bn_name)
        inv = torch.rsqrt(bn.running_var + bn.eps)
        gamma = bn.weight if bn.affine else torch.ones_like(inv)
        beta = bn.bias if bn.affine else torch.zeros_like(inv)
        factor = gamma * inv
        w = layer.weight
        shape = [-1] + [1] * (w.dim() - 1)
        w.mul_(factor.reshape(shape))
        b = layer.bias if layer.bias is not None else torch.zeros_like(bn.running_mean)
        new_b = (b - bn.running_mean) * factor + beta
        if layer.bias is None:
            layer.bias = nn.Parameter(new_b.detach().clone())
        else:
            layer.bias.copy_(new_b)
        set_submodule(model, bn_name, nn.Identity())
    return pairs
