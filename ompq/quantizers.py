"""Fake quantizers: `WeightQuantizer` (per output channel) and `ActQuantizer` (per tensor).

Weights: asymmetric grid ``[0, 2**b − 1]`` with a per-channel zero point (the PTQ default) or
symmetric ``[−2**(b−1), 2**(b−1) − 1]`` (the QAT default); scales from min-max, a percentile or
an Lp search (`search_scale`). Activations: an EMA range observer (momentum 0.99), then a fixed
or learned (LSQ) scale; an input observed non-negative uses the unsigned grid with zero point 0.
All arithmetic goes through `ompq.ops`. How quantizers are attached to a model: `ompq.quantize`.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, nn

from . import ops
from .bitconfig import check_width

WEIGHT_INITS = ("minmax", "percentile", "mse")
WEIGHT_MODES = ("nearest", "adaround", "lsq")
ACT_MODES = ("fixed", "lsq")
ADAROUND_ZETA = 1.1
ADAROUND_GAMMA = -0.1


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
        self.bits = check_width(bits, "WeightQuantizer bits")
        self.axis = axis
        self.symmetric = bool(symmetric)
        self.qmin, self.qmax = weight_qrange(self.bits, self.symmetric)
        self.scale = nn.Parameter(torch.ones(channels), requires_grad=False)
        self.register_buffer("zero_point", torch.zeros(channels))
        self.alpha: Optional[nn.Parameter] = None
        self.soft = True
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
    def int_weight(self, weight: Tensor) -> Tensor:
        """Integer weight `clamp(round(w/scale) + zp, qmin, qmax)` as int32 (AdaRound: hard)."""
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
        self.bits = check_width(bits, "ActQuantizer bits")
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
