"""Quantized modules and `quantize_`: apply a BitConfig to any model.

Conventions (see docs/DESIGN.md):

- Weights are quantized per output channel (axis 0 of the weight of Conv1d/2d/3d, grouped and
  depthwise included, and Linear). Asymmetric (``qmin = 0, qmax = 2**b - 1`` with a per-channel
  zero point, the PTQ default of SPEC §5) or symmetric (``qmin = -2**(b-1), qmax = 2**(b-1) - 1``,
  ``scale = max|w| / (2**(b-1) - 1)``, the QAT default).
- Activations (the *input* of each quantized layer) are quantized per tensor. Their range comes
  from an EMA observer (momentum 0.99) during calibration; it is then fixed or learned (LSQ).
  An input observed non-negative (e.g. after ReLU) uses the unsigned grid ``[0, 2**b - 1]`` with
  zero point 0; otherwise an affine grid with a zero point (or a symmetric signed one).
- Defaults of `quantize_`: the first layer (first in the BitConfig, i.e. execution order) gets its
  input quantized at ``first_act_bits = 8`` bits (``quantize_input=False`` leaves the network input
  in floating point); every other layer's input at its BitConfig activation bits (8 by default);
  the last layer follows its BitConfig entry like any other. Residual additions, pooling and
  other non-layer operations stay in fp32: only the inputs of quantizable layers and their weights
  are quantized. BatchNorm is folded into the preceding conv by `fold_bn` (called by `ptq` and
  `qat`), not by `quantize_`.

All quantization arithmetic goes through `ompq.ops` (compiled kernels when present).
"""
from __future__ import annotations

import fnmatch
import math
import weakref
from typing import Any, Iterable, Mapping, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import ops
from .layers import QUANTIZABLE_TYPES

WEIGHT_INITS = ("minmax", "percentile", "mse")
WEIGHT_MODES = ("nearest", "adaround", "lsq")
ACT_MODES = ("fixed", "lsq")
ADAROUND_ZETA = 1.1
ADAROUND_GAMMA = -0.1


def _check_bits(bits: int, what: str) -> int:
    if isinstance(bits, bool) or not isinstance(bits, (int,)) or not 2 <= int(bits) <= 16:
        raise ValueError(f"{what}: bits must be an integer in [2, 16], got {bits!r}")
    return int(bits)


def weight_qrange(bits: int, symmetric: bool) -> tuple[int, int]:
    """Integer grid [qmin, qmax] of a weight quantizer."""
    if symmetric:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2 ** bits - 1


def _per_channel(w: Tensor, axis: int) -> Tensor:
    """View w as C × (rest) with the channel axis first."""
    return w.detach().transpose(0, axis).reshape(w.size(axis), -1)


def _scale_zp_from_range(lo: Tensor, hi: Tensor, bits: int, symmetric: bool
                         ) -> tuple[Tensor, Tensor]:
    """Scale and zero point (float tensors) covering [lo, hi] (per channel or per tensor)."""
    qmin, qmax = weight_qrange(bits, symmetric)
    eps = torch.finfo(torch.float32).eps
    if symmetric:
        amax = torch.maximum(lo.abs(), hi.abs())
        scale = torch.clamp(amax / max(qmax, 1), min=eps)
        return scale, torch.zeros_like(scale)
    lo = torch.minimum(lo, torch.zeros_like(lo))
    hi = torch.maximum(hi, torch.zeros_like(hi))
    scale = torch.clamp((hi - lo) / (qmax - qmin), min=eps)
    zp = torch.clamp(torch.round(qmin - lo / scale), qmin, qmax)
    return scale, zp


_SEARCH_ELEMS = 1 << 24  # elements per batched step of `search_scale` (64 MiB of fp32)


def _lp_errors(wc: Tensor, lo: Tensor, hi: Tensor, ratios: Tensor, bits: int, symmetric: bool,
               p: float) -> Tensor:
    """Lp error (mean over each row of wc, C×K) of quantizing with the range [lo, hi]·ratio, for
    every row of `ratios` (R×C); returns R×C."""
    qmin, qmax = weight_qrange(bits, symmetric)
    num_r, (chans, k) = ratios.shape[0], wc.shape
    s, z = _scale_zp_from_range(lo * ratios, hi * ratios, bits, symmetric)
    q = ops.fake_quant(wc.expand(num_r, chans, k).reshape(-1, k), s.reshape(-1),
                       z.reshape(-1), qmin, qmax, 0)
    return (q.reshape(num_r, chans, k) - wc).abs_().pow_(p).mean(dim=2)


@torch.no_grad()
def search_scale(wc: Tensor, bits: int, *, symmetric: bool = False, p: float = 2.4,
                 num_ratios: int = 80, stride: int = 4) -> tuple[Tensor, Tensor]:
    """Per-row (scale, zero point) of wc (C×K) minimising the Lp error over the clipping ratios
    1.0, 0.99, …, 1 − (num_ratios−1)/100 of each row's range, coarse to fine: every `stride`-th
    ratio, then the ratios within `stride` − 1 of the best. It equals the exhaustive search of
    `WeightQuantizer.init_scale(method="mse")` unless the error has a dip narrower than the
    stride; `stride=1` is the exhaustive search. Batched over ratios and channels."""
    lo, hi = wc.min(dim=1).values, wc.max(dim=1).values
    best_j = torch.empty(wc.shape[0], dtype=torch.long, device=wc.device)
    rows = max(1, _SEARCH_ELEMS // max(wc.shape[1] * (num_ratios // stride + 2 * stride), 1))
    for c0 in range(0, wc.shape[0], rows):
        w, lo_c, hi_c = wc[c0:c0 + rows], lo[c0:c0 + rows], hi[c0:c0 + rows]
        coarse = torch.arange(0, num_ratios, stride, device=wc.device)
        js = coarse[:, None].expand(-1, w.shape[0])
        err = _lp_errors(w, lo_c, hi_c, 1.0 - 0.01 * js.float(), bits, symmetric, p)
        centre = js.gather(0, err.argmin(dim=0, keepdim=True))
        offsets = torch.arange(1 - stride, stride, device=wc.device)[:, None]
        fine = (centre + offsets).clamp(0, num_ratios - 1)
        err = _lp_errors(w, lo_c, hi_c, 1.0 - 0.01 * fine.float(), bits, symmetric, p)
        # argmin takes the first minimum: the largest ratio wins ties, as in the exhaustive search
        best_j[c0:c0 + rows] = fine.gather(0, err.argmin(dim=0, keepdim=True))[0]
    r = 1.0 - 0.01 * best_j.float()
    return _scale_zp_from_range(lo * r, hi * r, bits, symmetric)


class WeightQuantizer(nn.Module):
    """Per-channel weight fake-quantizer.

    Args:
        bits: weight bits (2..16).
        channels: number of output channels (length of `scale`/`zero_point`).
        axis: channel axis of the weight (0 for conv and linear).
        symmetric: symmetric signed grid (True) or asymmetric with a zero point (False).
        mode: "nearest" (round to nearest, STE), "adaround" (learned rounding; `soft` selects the
            rectified-sigmoid relaxation or the hard 0/1 rounding), or "lsq" (learned step size).

    Attribute `dynamic` (nearest mode only): recompute the min-max scale from the current weight
    at every forward (HAWQ-V3 style STE QAT).

    `scale` is an `nn.Parameter` (trainable only in "lsq" mode) and `zero_point` a buffer holding
    integers as floats, both of length `channels`.
    """

    def __init__(self, bits: int, channels: int, *, axis: int = 0, symmetric: bool = False,
                 mode: str = "nearest") -> None:
        super().__init__()
        self.bits = _check_bits(bits, "WeightQuantizer")
        self.axis = axis
        self.symmetric = bool(symmetric)
        self.qmin, self.qmax = weight_qrange(self.bits, self.symmetric)
        self.scale = nn.Parameter(torch.ones(channels), requires_grad=False)
        self.register_buffer("zero_point", torch.zeros(channels))
        self.alpha: Optional[nn.Parameter] = None
        self.soft = True
        self._owner: Optional[weakref.ReferenceType] = None
        self.dynamic = False  # nearest mode: recompute a min-max scale from w at every forward
        self.mode = "nearest"
        self.set_mode(mode)

    # -- initialisation ---------------------------------------------------------------------
    @torch.no_grad()
    def init_scale(self, w: Tensor, method: str = "mse", *, percentile: float = 99.99,
                   num_ratios: int = 80, p: float = 2.4) -> None:
        """Initialise scale/zero point from the weight.

        `method`: "minmax" (full range), "percentile" (per-channel `percentile` of the values),
        or "mse" (search over clipping ratios 1.0, 0.99, …, 1 − (num_ratios−1)/100 of the
        min/max range, per channel, minimising the Lp (p = 2.4) quantization error, as BRECQ).
        """
        if method not in WEIGHT_INITS:
            raise ValueError(f"weight init {method!r} unknown; valid: {', '.join(WEIGHT_INITS)}")
        wc = _per_channel(w, self.axis).float()
        lo, hi = wc.min(dim=1).values, wc.max(dim=1).values
        if method == "percentile":
            q = percentile / 100.0
            lo = torch.quantile(wc, 1 - q, dim=1)
            hi = torch.quantile(wc, q, dim=1)
            scale, zp = _scale_zp_from_range(lo, hi, self.bits, self.symmetric)
        elif method == "minmax":
            scale, zp = _scale_zp_from_range(lo, hi, self.bits, self.symmetric)
        else:
            scale, zp = self._mse_search(wc, lo, hi, num_ratios, p)
        self.scale.data.copy_(scale)
        self.zero_point.copy_(zp)

    def _mse_search(self, wc: Tensor, lo: Tensor, hi: Tensor, num_ratios: int, p: float
                    ) -> tuple[Tensor, Tensor]:
        best_err = torch.full_like(lo, float("inf"))
        best_s, best_z = _scale_zp_from_range(lo, hi, self.bits, self.symmetric)
        for i in range(num_ratios):
            r = 1.0 - 0.01 * i
            s, z = _scale_zp_from_range(lo * r, hi * r, self.bits, self.symmetric)
            q = ops.fake_quant(wc, s, z, self.qmin, self.qmax, 0)
            err = (q - wc).abs().pow(p).mean(dim=1)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_s = torch.where(better, s, best_s)
            best_z = torch.where(better, z, best_z)
        return best_s, best_z

    # -- modes -----------------------------------------------------------------------------
    def set_mode(self, mode: str) -> None:
        """Switch between "nearest", "adaround" and "lsq" (see class docstring)."""
        if mode not in WEIGHT_MODES:
            raise ValueError(f"weight quantizer mode {mode!r} unknown; valid: {WEIGHT_MODES}")
        if mode == "adaround" and self.alpha is None:
            raise ValueError("call init_adaround(weight) to enter adaround mode")
        self.mode = mode
        self.scale.requires_grad_(mode == "lsq")

    @torch.no_grad()
    def init_adaround(self, w: Tensor) -> nn.Parameter:
        """Create the rounding variables V so that h(V) equals the fractional part of w/scale."""
        s = self._bcast(self.scale, w)
        rest = (w / s) - torch.floor(w / s)
        ratio = (ADAROUND_ZETA - ADAROUND_GAMMA) / (rest - ADAROUND_GAMMA) - 1
        alpha = -torch.log(ratio.clamp(min=1e-6))
        self.alpha = nn.Parameter(alpha.contiguous())
        self.soft = True
        self.set_mode("adaround")
        return self.alpha

    @torch.no_grad()
    def bake_adaround(self, weight: nn.Parameter) -> None:
        """Write the hard AdaRound weight into `weight` and return to "nearest" mode.

        The baked weight lies on the quantization grid, so nearest rounding reproduces it and
        `int_weight()` gives the learned integers.
        """
        if self.alpha is None:
            raise ValueError("bake_adaround: no AdaRound variables (call init_adaround first)")
        wq = ops.adaround_fake_quant(weight, self.scale, self.zero_point, self.alpha, self.qmin,
                                     self.qmax, self.axis, False)
        weight.data.copy_(wq)
        self.alpha = None
        self.soft = True
        self.set_mode("nearest")

    def _bcast(self, p: Tensor, w: Tensor) -> Tensor:
        shape = [1] * w.dim()
        shape[self.axis] = -1
        return p.reshape(shape)

    # -- forward ---------------------------------------------------------------------------
    def forward(self, w: Tensor) -> Tensor:
        """Fake-quantized weight (same shape and dtype as w)."""
        if self.mode == "adaround":
            return ops.adaround_fake_quant(w, self.scale.detach(), self.zero_point, self.alpha,
                                           self.qmin, self.qmax, self.axis, self.soft)
        if self.mode == "lsq":
            per_ch = w.numel() // max(w.size(self.axis), 1)
            g = 1.0 / math.sqrt(per_ch * max(self.qmax, 1))
            return ops.lsq_fake_quant(w, self.scale, self.zero_point, self.qmin, self.qmax,
                                      self.axis, g)
        if self.dynamic:
            self.init_scale(w, "minmax")
        return ops.fake_quant(w, self.scale.detach(), self.zero_point, self.qmin, self.qmax,
                              self.axis)

    @torch.no_grad()
    def int_weight(self, weight: Optional[Tensor] = None) -> Tensor:
        """Integer weight `clamp(round(w/scale) + zp, qmin, qmax)` as int32 (AdaRound: hard)."""
        if weight is None:
            owner = self._owner() if self._owner is not None else None
            if owner is None:
                raise ValueError("int_weight(): pass the weight (quantizer not attached to a layer)")
            weight = owner.weight
        s = self._bcast(self.scale.detach(), weight)
        z = self._bcast(self.zero_point, weight)
        if self.mode == "adaround" and self.alpha is not None:
            q = torch.floor(weight / s) + (self.alpha >= 0).to(weight.dtype) + z
        else:
            q = torch.round(weight * (1.0 / s)) + z
        return torch.clamp(q, self.qmin, self.qmax).to(torch.int32)

    def extra_repr(self) -> str:
        return (f"bits={self.bits}, axis={self.axis}, symmetric={self.symmetric}, "
                f"mode={self.mode}")


class ActQuantizer(nn.Module):
    """Per-tensor activation fake-quantizer with an EMA range observer.

    States: `observing=True` updates the running min/max (EMA, momentum 0.99; the first batch
    sets them) and passes x through unchanged; `freeze()` turns the range into scale/zero point;
    then x is fake-quantized with a fixed scale (mode "fixed", STE) or a learned one ("lsq").
    `enabled=False` passes x through. Unsigned grid when the observed minimum is ≥ 0.
    """

    def __init__(self, bits: int, *, symmetric: bool = False, momentum: float = 0.99,
                 mode: str = "fixed") -> None:
        super().__init__()
        self.bits = _check_bits(bits, "ActQuantizer")
        self.symmetric = bool(symmetric)
        self.momentum = momentum
        self.axis = None
        self.scale = nn.Parameter(torch.ones(1), requires_grad=False)
        self.register_buffer("zero_point", torch.zeros(1))
        self.register_buffer("running_min", torch.zeros(1))
        self.register_buffer("running_max", torch.zeros(1))
        self.register_buffer("qrange", torch.tensor([0, 2 ** bits - 1], dtype=torch.int64))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))
        self.observing = False
        self.enabled = True
        self.mode = "fixed"
        self.set_mode(mode)

    @property
    def qmin(self) -> int:
        return int(self.qrange[0])

    @property
    def qmax(self) -> int:
        return int(self.qrange[1])

    @property
    def unsigned(self) -> bool:
        """True when the observed input is non-negative (grid [0, 2**b − 1], zero point 0)."""
        return bool(self.running_min.item() >= 0)

    def set_mode(self, mode: str) -> None:
        if mode not in ACT_MODES:
            raise ValueError(f"activation quantizer mode {mode!r} unknown; valid: {ACT_MODES}")
        self.mode = mode
        self.scale.requires_grad_(mode == "lsq")

    @torch.no_grad()
    def observe(self, x: Tensor) -> None:
        lo, hi = x.detach().min().float().reshape(1), x.detach().max().float().reshape(1)
        if not bool(self.initialized):
            self.running_min.copy_(lo)
            self.running_max.copy_(hi)
            self.initialized.fill_(True)
        else:
            m = self.momentum
            self.running_min.mul_(m).add_(lo * (1 - m))
            self.running_max.mul_(m).add_(hi * (1 - m))

    @torch.no_grad()
    def freeze(self) -> None:
        """Set scale/zero point from the observed range and stop observing."""
        if not bool(self.initialized):
            raise RuntimeError("ActQuantizer.freeze(): no data observed (run a calibration forward)")
        lo, hi = self.running_min, self.running_max
        b = self.bits
        if float(lo) >= 0:
            qmin, qmax = 0, 2 ** b - 1
            scale = torch.clamp(hi / qmax, min=1e-8)
            zp = torch.zeros(1)
        elif self.symmetric:
            qmin, qmax = -(2 ** (b - 1)), 2 ** (b - 1) - 1
            scale = torch.clamp(torch.maximum(lo.abs(), hi.abs()) / qmax, min=1e-8)
            zp = torch.zeros(1)
        else:
            qmin, qmax = 0, 2 ** b - 1
            hi = torch.maximum(hi, torch.zeros_like(hi))
            scale = torch.clamp((hi - lo) / qmax, min=1e-8)
            zp = torch.clamp(torch.round(-lo / scale), qmin, qmax)
        self.scale.data.copy_(scale)
        self.zero_point.copy_(zp)
        self.qrange.copy_(torch.tensor([qmin, qmax]))
        self.observing = False

    def forward(self, x: Tensor) -> Tensor:
        if not self.enabled:
            return x
        if self.observing:
            self.observe(x)
            return x
        if self.mode == "lsq":
            g = 1.0 / math.sqrt(max(x.numel(), 1) * max(self.qmax, 1))
            return ops.lsq_fake_quant(x, self.scale, self.zero_point, self.qmin, self.qmax,
                                      None, g)
        return ops.fake_quant(x, self.scale.detach(), self.zero_point, self.qmin, self.qmax, None)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, symmetric={self.symmetric}, mode={self.mode}"


class QuantLayerMixin:
    """Common part of quantized layers: `weight_quantizer`, `act_quantizer` (None = fp input)."""

    weight_quantizer: WeightQuantizer
    act_quantizer: Optional[ActQuantizer]

    def quant_weight(self) -> Tensor:
        return self.weight_quantizer(self.weight)

    def quant_input(self, x: Tensor) -> Tensor:
        return x if self.act_quantizer is None else self.act_quantizer(x)

    def int_weight(self) -> Tensor:
        """Integer weight tensor (int32) on the quantizer's grid."""
        return self.weight_quantizer.int_weight(self.weight)


class QuantConv(QuantLayerMixin):
    """Marker base of QuantConv1d/2d/3d (quantized input and per-channel weight)."""

    def forward(self, x: Tensor) -> Tensor:
        return self._conv_forward(self.quant_input(x), self.quant_weight(), self.bias)


class QuantConv1d(QuantConv, nn.Conv1d):
    pass


class QuantConv2d(QuantConv, nn.Conv2d):
    pass


class QuantConv3d(QuantConv, nn.Conv3d):
    pass


class QuantLinear(QuantLayerMixin, nn.Linear):
    """Linear layer with quantized input and per-output-channel quantized weight."""

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(self.quant_input(x), self.quant_weight(), self.bias)


_QUANT_CLASS = {nn.Conv1d: QuantConv1d, nn.Conv2d: QuantConv2d, nn.Conv3d: QuantConv3d,
                nn.Linear: QuantLinear}
QUANT_LAYER_TYPES = (QuantConv1d, QuantConv2d, QuantConv3d, QuantLinear)


def _base_type(m: nn.Module) -> Optional[type]:
    for t in QUANTIZABLE_TYPES:
        if type(m) is t:
            return t
    return None


def to_quant_module(layer: nn.Module, weight_bits: int, act_bits: Optional[int], *,
                    weight_init: str = "mse", weight_symmetric: bool = False,
                    act_symmetric: bool = False, weight_mode: str = "nearest",
                    act_mode: str = "fixed", name: str = "") -> nn.Module:
    """Quantized copy of a Conv1d/2d/3d or Linear sharing its parameters (no weight copy).

    `act_bits=None` leaves the input in floating point.
    """
    base = _base_type(layer)
    if base is None:
        raise TypeError(f"layer {name!r}: {type(layer).__name__} is not quantizable; valid: "
                        f"{', '.join(t.__name__ for t in QUANTIZABLE_TYPES)}")
    cls = _QUANT_CLASS[base]
    q = cls.__new__(cls)
    q.__dict__.update(layer.__dict__)
    for d in ("_parameters", "_buffers", "_modules", "_forward_hooks", "_forward_pre_hooks"):
        if d in layer.__dict__:
            q.__dict__[d] = type(layer.__dict__[d])(layer.__dict__[d])
    wq = WeightQuantizer(weight_bits, layer.weight.size(0), axis=0, symmetric=weight_symmetric)
    wq = wq.to(layer.weight.device)
    wq.init_scale(layer.weight, weight_init)
    wq.set_mode("nearest" if weight_mode == "adaround" else weight_mode)
    q.weight_quantizer = wq
    wq._owner = weakref.ref(q)
    if act_bits is None:
        q.act_quantizer = None
    else:
        q.act_quantizer = ActQuantizer(act_bits, symmetric=act_symmetric, mode=act_mode).to(
            layer.weight.device)
    return q


def _as_bit_dicts(bit_config: Any) -> tuple[dict[str, int], dict[str, int]]:
    if isinstance(bit_config, Mapping):
        return {k: int(v) for k, v in bit_config.items()}, {}
    wb = getattr(bit_config, "weight_bits", None)
    if not isinstance(wb, Mapping):
        raise TypeError("bit_config must be a BitConfig (with .weight_bits) or a dict "
                        f"layer name -> bits, got {type(bit_config).__name__}")
    ab = getattr(bit_config, "act_bits", None) or {}
    return {k: int(v) for k, v in wb.items()}, {k: int(v) for k, v in ab.items()}


def _matches(name: str, patterns: Union[str, Sequence[str], None]) -> bool:
    if patterns is None:
        return False
    if isinstance(patterns, str):
        patterns = [patterns]
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def quantizable_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every not yet quantized Conv1d/2d/3d and Linear, registration order."""
    return [(n, m) for n, m in model.named_modules() if _base_type(m) is not None and n]


def quantize_(model: nn.Module, bit_config: Any, *, act_bits: Union[int, Mapping[str, int],
              None] = None, quantize_input: bool = True, first_act_bits: int = 8,
              weight_init: str = "mse", weight_symmetric: bool = False,
              act_symmetric: bool = False, weight_mode: str = "nearest", act_mode: str = "fixed",
              skip: Union[str, Sequence[str], None] = None) -> nn.Module:
    """Replace, in place, every layer named in `bit_config` by its quantized version.

    Args:
        model: any module; its Conv1d/2d/3d and Linear layers are the quantizable ones.
        bit_config: a `BitConfig` (uses `.weight_bits` and `.act_bits`) or a dict name -> bits.
        act_bits: activation bits for every layer (int) or per layer (dict); default: the
            BitConfig's `act_bits`, else 8.
        quantize_input: quantize the input of the first layer (the network input) at
            `first_act_bits` (default 8 bits, as the paper's stem); False keeps it fp32.
        weight_init: "mse" (default), "percentile" or "minmax" scale initialisation.
        weight_symmetric / act_symmetric: grids (see module docstring).
        weight_mode: "nearest" or "lsq" ("adaround" is set up by `ptq`).
        act_mode: "fixed" or "lsq". Activation quantizers start *observing*: run
            `calibrate_activations` (or a few forwards then `freeze_activations`) before use.
        skip: name patterns (fnmatch) of quantizable layers to keep in floating point.

    Raises:
        ValueError: the BitConfig names layers the model lacks, or the model has quantizable
            layers that the BitConfig does not cover and `skip` does not exclude (both listed).
    """
    wbits, cfg_abits = _as_bit_dicts(bit_config)
    layers = dict(quantizable_layers(model))
    quantized = {n for n, m in model.named_modules() if isinstance(m, QUANT_LAYER_TYPES)}
    missing = [n for n in wbits if n not in layers and n not in quantized]
    if missing:
        raise ValueError(f"bit_config names {len(missing)} layer(s) the model does not have: "
                         f"{missing}; quantizable layers of the model: {sorted(layers)}")
    already = [n for n in wbits if n in quantized]
    if already:
        raise ValueError(f"layers already quantized: {already}")
    uncovered = [n for n in layers if n not in wbits and not _matches(n, skip)]
    if uncovered:
        raise ValueError(f"the model has {len(uncovered)} quantizable layer(s) missing from the "
                         f"bit_config: {uncovered}; allocate bits for them or exclude them with "
                         f"skip=[...]")
    order = list(wbits)
    for i, name in enumerate(order):
        if _matches(name, skip):
            continue
        if i == 0:
            ab: Optional[int] = first_act_bits if quantize_input else None
        elif isinstance(act_bits, Mapping):
            ab = int(act_bits.get(name, cfg_abits.get(name, 8)))
        elif act_bits is not None:
            ab = int(act_bits)
        else:
            ab = cfg_abits.get(name, 8)
        q = to_quant_module(layers[name], wbits[name], ab, weight_init=weight_init,
                            weight_symmetric=weight_symmetric, act_symmetric=act_symmetric,
                            weight_mode=weight_mode, act_mode=act_mode, name=name)
        _set_submodule(model, name, q)
    for aq in act_quantizers(model):
        aq.observing = True
    return model


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def quant_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of the quantized layers of a model."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, QUANT_LAYER_TYPES)]


def act_quantizers(model: nn.Module) -> list[ActQuantizer]:
    return [m for m in model.modules() if isinstance(m, ActQuantizer)]


def set_act_quant(model: nn.Module, enabled: bool) -> None:
    """Enable or disable (pass-through) every activation quantizer."""
    for aq in act_quantizers(model):
        aq.enabled = enabled


def freeze_activations(model: nn.Module) -> None:
    """Turn every observing activation quantizer's EMA range into a fixed scale."""
    for aq in act_quantizers(model):
        if aq.observing:
            aq.freeze()


@torch.no_grad()
def calibrate_activations(model: nn.Module, batches: Iterable[Tensor]) -> nn.Module:
    """Observe activation ranges (EMA) over `batches` (tensors of inputs), then freeze them."""
    was_training = model.training
    model.eval()
    for aq in act_quantizers(model):
        aq.observing = True
        aq.enabled = True
        aq.initialized.fill_(False)
    for x in batches:
        model(x)
    freeze_activations(model)
    model.train(was_training)
    return model


# --------------------------------------------------------------------------------------------
# BatchNorm folding
_BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


@torch.no_grad()
def find_conv_bn_pairs(model: nn.Module, example_input: Any) -> list[tuple[str, str]]:
    """(layer, bn) pairs where a BatchNorm's input is exactly a conv/linear layer's output.

    Found by tracing tensor identity with forward hooks over one forward of `example_input`, so
    the pairs need not be siblings in the module tree. A layer whose output also feeds something
    else than the BN (seen as another hooked module input), or a layer/BN used more than once,
    is not folded.
    """
    outputs: dict[int, tuple[str, Tensor]] = {}
    calls: dict[str, int] = {}
    consumers: dict[int, list[str]] = {}
    handles = []

    def out_hook(name):
        def hook(mod, inp, out):
            calls[name] = calls.get(name, 0) + 1
            if isinstance(out, Tensor):
                outputs[id(out)] = (name, out)
        return hook

    def in_hook(name):
        def hook(mod, inp):
            calls[name] = calls.get(name, 0) + (0 if isinstance(mod, QUANTIZABLE_TYPES) else 1)
            for t in inp:
                if isinstance(t, Tensor) and id(t) in outputs:
                    consumers.setdefault(id(t), []).append(name)
        return hook

    names = {}
    for n, m in model.named_modules():
        if not n:
            continue
        names[m] = n
        if isinstance(m, QUANTIZABLE_TYPES):
            handles.append(m.register_forward_hook(out_hook(n)))
        if len(list(m.children())) == 0:
            handles.append(m.register_forward_pre_hook(in_hook(n)))
    was_training = model.training
    model.eval()
    try:
        model(example_input)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    pairs = []
    for key, users in consumers.items():
        layer, _ = outputs[key]
        if len(users) != 1:
            continue
        bn = users[0]
        mod = model.get_submodule(bn)
        if isinstance(mod, _BN_TYPES) and calls.get(layer) == 1 and calls.get(bn) == 1 \
                and mod.track_running_stats and mod.running_mean is not None:
            pairs.append((layer, bn))
    return pairs


@torch.no_grad()
def fold_bn(model: nn.Module, example_input: Any) -> list[tuple[str, str]]:
    """Fold every BatchNorm directly following a conv/linear into it, in place.

    The BN's running statistics and affine parameters are folded into the layer's weight and
    bias (a bias is created when missing); the BN is replaced by `nn.Identity`. Returns the
    folded (layer, bn) pairs. `example_input`: one batch the model accepts.
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
        _set_submodule(model, bn_name, nn.Identity())
    return pairs
