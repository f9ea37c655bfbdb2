"""Plain-PyTorch reference implementations of every compiled ompq op.

These define the semantics the C++/CUDA kernels must match (see docs/DESIGN.md), are used by the
tests as the ground truth, and are the fallback when the compiled extension is missing. They are
written for clarity, not speed.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

ADAROUND_ZETA = 1.1
ADAROUND_GAMMA = -0.1


def _bcast(p: Tensor, x: Tensor, axis: Optional[int]) -> Tensor:
    """Shape a per-tensor (1 element) or per-channel parameter to broadcast against x."""
    if axis is None:
        return p.reshape(())
    shape = [1] * x.dim()
    shape[axis] = -1
    return p.reshape(shape)


def _reduce_to(g: Tensor, x: Tensor, axis: Optional[int], like: Tensor) -> Tensor:
    if axis is None:
        return g.sum().reshape(like.shape)
    dims = [d for d in range(x.dim()) if d != axis % x.dim()]
    return g.sum(dim=dims).reshape(like.shape) if dims else g.reshape(like.shape)


def quantize_int(x: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int,
                 axis: Optional[int] = None) -> Tensor:
    """Integer grid values `clamp(round_half_even(x * (1/scale)) + zp, qmin, qmax)` (as float)."""
    s = _bcast(scale, x, axis)
    z = _bcast(zero_point, x, axis)
    inv = 1.0 / s
    return torch.clamp(torch.round(x * inv) + z, qmin, qmax)


class _FakeQuantSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale, zero_point, qmin, qmax, axis):
        s = _bcast(scale, x, axis)
        z = _bcast(zero_point, x, axis)
        xq = torch.round(x * (1.0 / s)) + z
        mask = (xq >= qmin) & (xq <= qmax)
        ctx.save_for_backward(mask)
        return (torch.clamp(xq, qmin, qmax) - z) * s

    @staticmethod
    def backward(ctx, grad):
        (mask,) = ctx.saved_tensors
        return grad * mask, None, None, None, None, None


def fake_quant(x: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int,
               axis: Optional[int] = None) -> Tensor:
    """Fake quantization with a straight-through gradient for x (zero outside [qmin, qmax])."""
    return _FakeQuantSTE.apply(x, scale, zero_point, qmin, qmax, axis)


class _LSQ(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale, zero_point, qmin, qmax, axis, grad_factor):
        zp = torch.clamp(torch.round(zero_point), qmin, qmax)
        s = _bcast(scale, x, axis)
        z = _bcast(zp, x, axis)
        inv = 1.0 / s
        xq = torch.round(x * inv) + z
        ctx.save_for_backward(x, scale, zp)
        ctx.args = (qmin, qmax, axis, grad_factor)
        return (torch.clamp(xq, qmin, qmax) - z) * s

    @staticmethod
    def backward(ctx, grad):
        x, scale, zp = ctx.saved_tensors
        qmin, qmax, axis, grad_factor = ctx.args
        s = _bcast(scale, x, axis)
        z = _bcast(zp, x, axis)
        inv = 1.0 / s
        xq = torch.round(x * inv) + z
        low = xq < qmin
        high = xq > qmax
        inside = ~(low | high)
        gx = grad * inside
        gs = torch.where(low, (qmin - z) + torch.zeros_like(x),
                         torch.where(high, (qmax - z) + torch.zeros_like(x), (xq - z) - x * inv))
        gs = _reduce_to(grad * gs * grad_factor, x, axis, scale)
        gz = torch.where(inside, torch.zeros_like(x), -s + torch.zeros_like(x))
        gz = _reduce_to(grad * gz * grad_factor, x, axis, zp)
        return gx, gs, gz, None, None, None, None


def lsq_fake_quant(x: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int,
                   axis: Optional[int] = None, grad_factor: float = 1.0) -> Tensor:
    """LSQ fake quantization with gradients for x, scale and zero_point (as torch's learnable op)."""
    return _LSQ.apply(x, scale, zero_point, qmin, qmax, axis, grad_factor)


def adaround_h(v: Tensor) -> Tensor:
    """AdaRound's rectified sigmoid h(V) in [0, 1]."""
    return torch.clamp(torch.sigmoid(v) * (ADAROUND_ZETA - ADAROUND_GAMMA) + ADAROUND_GAMMA, 0, 1)


def _adaround_t(w: Tensor, scale: Tensor, zero_point: Tensor, v: Tensor, axis: Optional[int],
                soft: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Unclamped grid value `t = floor(w/s) + h + zp` and the broadcast scale and zero point."""
    s = _bcast(scale, w, axis)
    z = _bcast(zero_point, w, axis)
    h = adaround_h(v) if soft else (v >= 0).to(w.dtype)
    return torch.floor(w / s) + h + z, s, z


def adaround_fake_quant_backward(grad: Tensor, w: Tensor, scale: Tensor, zero_point: Tensor,
                                 v: Tensor, qmin: int, qmax: int, axis: Optional[int],
                                 soft: bool) -> tuple[Tensor, Tensor]:
    """Gradients (for w, for v) of `adaround_fake_quant`.

    w gets the straight-through gradient inside `[qmin, qmax]` (zero outside); v gets
    `grad · s · h'(v)` inside the range when `soft` (the rectified sigmoid's derivative, zero where
    the clamp of h is active) and zero in hard mode.
    """
    with torch.no_grad():
        t, s, _ = _adaround_t(w, scale, zero_point, v, axis, soft)
        gw = grad * ((t >= qmin) & (t <= qmax)).to(grad.dtype)
        if not soft:
            return gw, torch.zeros_like(v)
        sig = torch.sigmoid(v)
        raw = sig * (ADAROUND_ZETA - ADAROUND_GAMMA) + ADAROUND_GAMMA
        dh = ((raw >= 0) & (raw <= 1)).to(v.dtype) * (ADAROUND_ZETA - ADAROUND_GAMMA) * sig * (1 - sig)
        return gw, gw * s * dh


class _AdaRound(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w, scale, zero_point, v, qmin, qmax, axis, soft):
        ctx.save_for_backward(w, scale, zero_point, v)
        ctx.args = (qmin, qmax, axis, soft)
        t, s, z = _adaround_t(w, scale, zero_point, v, axis, soft)
        return (torch.clamp(t, qmin, qmax) - z) * s

    @staticmethod
    def backward(ctx, grad):
        w, scale, zero_point, v = ctx.saved_tensors
        gw, gv = adaround_fake_quant_backward(grad, w, scale, zero_point, v, *ctx.args)
        return gw, None, None, gv, None, None, None, None


def adaround_fake_quant(w: Tensor, scale: Tensor, zero_point: Tensor, v: Tensor, qmin: int,
                        qmax: int, axis: Optional[int], soft: bool) -> Tensor:
    """AdaRound fake quantization: floor(w/s) plus a learned rounding h(V) (soft) or V >= 0 (hard).

    `y = (clamp(floor(w/s) + h + zp, qmin, qmax) - zp) · s`. Gradients: straight-through for w
    inside the range, `s · h'(V)` for V (soft mode only); scale and zero_point get none.
    """
    return _AdaRound.apply(w, scale, zero_point, v, qmin, qmax, axis, soft)


def adaround_reg_backward(grad: Tensor, v: Tensor, beta: float) -> Tensor:
    """Gradient for v of `adaround_reg`: `-grad · β |u|^(β-1) sign(u) · 2 h'(v)`, u = 2h(v) - 1."""
    with torch.no_grad():
        sig = torch.sigmoid(v)
        raw = sig * (ADAROUND_ZETA - ADAROUND_GAMMA) + ADAROUND_GAMMA
        dh = ((raw >= 0) & (raw <= 1)).to(v.dtype) * (ADAROUND_ZETA - ADAROUND_GAMMA) * sig * (1 - sig)
        u = 2 * torch.clamp(raw, 0, 1) - 1
        d = -2.0 * grad * beta * u.abs().pow(beta - 1) * torch.sign(u) * dh
        return torch.where(u == 0, torch.zeros_like(d), d)


def adaround_reg(v: Tensor, beta: float) -> Tensor:
    """AdaRound rounding regulariser `sum(1 - |2 h(V) - 1| ** beta)` (a scalar)."""
    return (1 - (2 * adaround_h(v) - 1).abs().pow(beta)).sum()


def _check_gram_input(x: Tensor) -> None:
    """The input checks of the compiled `centered_gram` (same exception types and messages)."""
    if x.dim() < 2:
        raise ValueError(f"centered_gram: expected an N×D matrix (N samples along dim 0, features "
                         f"flattened), got a {x.dim()}-D tensor of shape {list(x.shape)}")
    if x.shape[0] < 2:
        raise ValueError(f"centered_gram: need at least 2 samples (rows) to centre, got N = "
                         f"{x.shape[0]}")
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"centered_gram: unsupported dtype {x.dtype}; expected float32, float16 "
                        f"or bfloat16 (convert with .float())")


def centered_gram(x: Tensor) -> Tensor:
    """N×N fp32 Gram `(x - x.mean(0)) @ (x - x.mean(0)).T` of the column-centred N×D matrix x.

    x may be N×… (features flattened per sample). Raises ValueError for fewer than 2 dims or
    samples and for NaN/Inf input, TypeError for dtypes other than float32/float16/bfloat16.
    """
    _check_gram_input(x)
    xf = x.reshape(x.shape[0], -1).float()
    xc = xf - xf.mean(dim=0, keepdim=True)
    g = xc @ xc.T
    if not bool(torch.isfinite(g).all()):
        raise ValueError("centered_gram: the input contains NaN or Inf (or values so large that "
                         "the fp32 Gram overflows); clean or rescale the features first")
    return g
