"""Distortion tables: what each candidate width costs each layer, measured in the profile.

Per layer and width (bits): the output noise-to-signal ratio (dimensionless) and the weight
error (weight units²) of PTQ's weight quantizer, inside the profiler's one forward.
Definitions: docs/DESIGN.md, "Distortion table".
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import ops
from .batchnorm import find_conv_bn_pairs
from .quantizers import search_scale, weight_qrange

DISTORTION_BITS: tuple[int, ...] = (2, 3, 4, 5, 6, 7, 8)
KINDS = ("output", "weight")
DEFAULT_SAMPLES = 16


class DistortionTableError(ValueError):
    """A distortion table that cannot serve the allocation (missing width, NaN, …)."""


@dataclass
class DistortionTable:
    """Per-layer, per-width distortion (see the module docstring).

    `bits`: the measured widths; `samples`: samples behind the output NSR; `weight`/`output`:
    layer -> one value per width of `bits` (weight units² / dimensionless NSR).
    """

    bits: tuple[int, ...]
    samples: int
    weight: dict[str, list[float]] = field(default_factory=dict)
    output: dict[str, list[float]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable dict."""
        return {"bits": list(self.bits), "samples": self.samples,
                "weight": {k: list(v) for k, v in self.weight.items()},
                "output": {k: list(v) for k, v in self.output.items()}}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "DistortionTable":
        """Inverse of `to_dict` (values are checked when used, by `values`)."""
        try:
            return cls(bits=tuple(int(b) for b in d["bits"]), samples=int(d["samples"]),
                       weight={k: [float(x) for x in v] for k, v in d["weight"].items()},
                       output={k: [float(x) for x in v] for k, v in d["output"].items()})
        except KeyError as err:
            raise ValueError(f"distortion table lacks the field {err.args[0]!r}") from None

    def values(self, kind: str, name: str, bits: Sequence[int]) -> dict[int, float]:
        """{b: distortion} of layer `name` for each width in `bits`; DistortionTableError names
        the layer and says what is wrong (unknown kind, layer or width, non-finite values)."""
        if kind not in KINDS:
            raise ValueError(f"distortion must be one of {KINDS}, got {kind!r}")
        rows = getattr(self, kind)
        if name not in rows:
            raise DistortionTableError(f"the profile's distortion table has no row for layer "
                                       f"{name!r}; re-profile the model")
        row = rows[name]
        if len(row) != len(self.bits):
            raise DistortionTableError(f"distortion table row {kind!r} of layer {name!r} has "
                                       f"{len(row)} values for {len(self.bits)} widths")
        out = {}
        for b in bits:
            if b not in self.bits:
                raise DistortionTableError(
                    f"layer {name!r}: {b} bits is not in the profile's distortion table (widths "
                    f"{list(self.bits)}); re-profile with distortion_bits including {b}")
            v = row[self.bits.index(b)]
            if not math.isfinite(v) or v < 0:
                raise DistortionTableError(f"layer {name!r}: {kind} distortion at {b} bits is "
                                           f"{v!r}; expected a finite value ≥ 0")
            out[int(b)] = float(v)
        return out


def running_min(row: Sequence[float]) -> list[float]:
    """Make a row (narrowest width first) non-increasing."""
    out, low = [], math.inf
    for v in row:
        low = min(low, float(v))
        out.append(low)
    return out


def fold_scales(model: nn.Module, example_input: Any) -> dict[str, Tensor]:
    """layer -> per-output-channel factor γ/√(var+ε) of the BatchNorm PTQ folds into it."""
    out = {}
    for layer, bn_name in find_conv_bn_pairs(model, example_input):
        bn = model.get_submodule(bn_name)
        inv = torch.rsqrt(bn.running_var.detach().float() + bn.eps)
        out[layer] = inv * bn.weight.detach().float() if bn.affine else inv
    return out


def _channel_view(module: nn.Module, y: Tensor) -> Tensor:
    """y as (channels, rest): channel dim 1 for convs, the last dim for Linear."""
    if isinstance(module, nn.Linear):
        return y.reshape(-1, y.shape[-1]).T
    return y.transpose(0, 1).reshape(y.shape[1], -1)


def _linear_part(module: nn.Module, x: Tensor, weight: Tensor) -> Tensor:
    """The layer's output on x with `weight` and no bias, without calling the module (its hooks
    would fire again). Convs go through `_conv_forward`, which keeps their padding mode."""
    if isinstance(module, nn.Linear):
        return F.linear(x, weight)
    return module._conv_forward(x, weight, None)


class LayerMeter:
    """Accumulates one layer's distortion over its calls in the profiling forward(s).

    The output signal is the sum of squared deviations from each output channel's mean over
    every measured position, kept as per-channel sums (`channels` of them), so that
    micro-batches and processes add up to the full-batch value."""

    def __init__(self, bits: tuple[int, ...], samples: int, scale: Optional[Tensor],
                 channels: int) -> None:
        self.bits, self.samples, self.scale = bits, samples, scale
        self.qparams: Optional[list[tuple]] = None  # (scale, zp, qmin, qmax) per width
        self.w_folded: Optional[Tensor] = None
        self.weight = [0.0] * len(bits)
        self.noise = [0.0] * len(bits)
        self.sum_y = torch.zeros(channels, dtype=torch.float64)  # Σ y per output channel
        self.sum_y2 = 0.0  # Σ y² over channels and positions
        self.count = 0  # positions per channel

    @property
    def signal(self) -> float:
        """Σ over channels of Σ (y − mean_c)² over the measured positions."""
        if self.count == 0:
            return 0.0
        return max(0.0, self.sum_y2 - float(self.sum_y.square().sum()) / self.count)

    def _quantize_weights(self, module: nn.Module) -> None:
        """Search each width's scale on the (BN-folded) weight once; the weight row. The ΔW are
        rebuilt per call (one at a time), so the meters hold no copy per width."""
        w = module.weight.detach().float()
        if self.scale is not None:
            w = w * self.scale.to(w.device).reshape([-1] + [1] * (w.dim() - 1))
        self.w_folded, self.qparams = w, []
        for k, b in enumerate(self.bits):
            scale, zp = search_scale(w.reshape(w.shape[0], -1), b)
            self.qparams.append((scale, zp, *weight_qrange(b, False)))
            self.weight[k] = float(self._delta(k).double().square().sum())

    def _delta(self, k: int) -> Tensor:
        """ΔW = Q_b(W) − W at the k-th width."""
        w = self.w_folded
        wc = w.reshape(w.shape[0], -1)
        scale, zp, qmin, qmax = self.qparams[k]
        return (ops.fake_quant(wc, scale, zp, qmin, qmax, 0) - wc).reshape(w.shape)

    @torch.no_grad()
    def update(self, module: nn.Module, inp: Tensor, out: Tensor) -> None:
        """Add one call: `inp` holds the input rows to measure (the caller keeps the first
        `samples` samples, and for token inputs may pass the real tokens as a (tokens, H)
        matrix), `out` the layer's output."""
        if self.qparams is None:
            self._quantize_weights(module)
        x = inp
        if x.dtype != self.w_folded.dtype:
            x = x.to(self.w_folded.dtype)
        y = _channel_view(module, _linear_part(module, x, self.w_folded)).double()
        self.sum_y += y.sum(dim=1).cpu()
        self.sum_y2 += float(y.square().sum())
        self.count += y.shape[1]
        for k in range(len(self.bits)):
            self.noise[k] += float(_linear_part(module, x, self._delta(k)).double().square().sum())

    def state(self) -> tuple[Tensor, Tensor]:
        """(weight row, sums) as float64 vectors, for all-reduces: the weight row is the same
        in every process that measured (reduce with max; zeros elsewhere), the sums [noise per
        width, Σy², count, Σy per channel] add up."""
        sums = torch.cat([torch.tensor(self.noise + [self.sum_y2, float(self.count)],
                                       dtype=torch.float64), self.sum_y])
        return torch.tensor(self.weight, dtype=torch.float64), sums

    def load_state(self, weight: Tensor, sums: Tensor) -> None:
        """Replace the sums by reduced `state()` values."""
        k = len(self.bits)
        self.weight = [float(v) for v in weight]
        self.noise = [float(v) for v in sums[:k]]
        self.sum_y2, self.count = float(sums[k]), int(round(float(sums[k + 1])))
        self.sum_y = sums[k + 2:].to(torch.float64).clone()

    def rows(self) -> tuple[list[float], list[float]]:
        """(weight row, output NSR row), each non-increasing in bits."""
        if self.signal > 0:
            nsr = [n / self.signal for n in self.noise]
        else:  # a constant output: no signal to compare with, every width is equally harmless
            nsr = [0.0] * len(self.noise)
        return running_min(self.weight), running_min(nsr)


def table_from_meters(meters: Mapping[str, LayerMeter], order: Sequence[str], bits: tuple[int, ...],
                      samples: int) -> DistortionTable:
    """Collect the meters (in layer order) into a `DistortionTable`."""
    table = DistortionTable(bits=bits, samples=samples)
    for name in order:
        table.weight[name], table.output[name] = meters[name].rows()
    return table
